"""Offline batch API: ``LLM(model).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from tqdm import tqdm

from ..config import EngineArgs
from .engine import LLMEngine
from .sampling_params import PoolingParams, SamplingParams


@dataclass
class CompletionOutput:
    """One completion of a prompt (vLLM's field names)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: Optional[str]
    stop_reason: object = None
    logprobs: Optional[list] = None


@dataclass
class GenerationResult:
    """All ``n`` completions of one prompt."""

    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0
    #: with ``SamplingParams.prompt_logprobs``: per prompt token None (the first) or
    #: ``(token_id, logprob, rank, [(top_id, top_logprob), ...])``
    prompt_logprobs: Optional[list] = None


PromptType = Union[str, list[int], dict]


class LLM:
    """Run a model over a batch of prompts.

    Args:
        model: GGUF file, HF directory or hub id; None = the bundled default model.
        **kwargs: any :class:`EngineArgs` field (``max_num_seqs=``, ``dtype=``, ...).
    Raises:
        ModelLoadError: the model cannot be loaded.
    """

    def __init__(self, model: Optional[str] = None, **kwargs):
        self.engine = LLMEngine(EngineArgs(model=model, **kwargs))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def _tokenize(self, prompt: PromptType) -> tuple[Optional[str], list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=True)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return None, list(prompt["prompt_token_ids"])
            return self._tokenize(prompt["prompt"])
        return None, list(prompt)

    def generate(self, prompts: Union[PromptType, Sequence[PromptType]],
                 sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                 use_tqdm: bool = False) -> list[GenerationResult]:
        """Generate for every prompt; results are in prompt order.

        Args:
            prompts: a string, a token-id list, ``{"prompt_token_ids": [...]}``, or a list of those.
            sampling_params: one for all prompts or one per prompt (default: greedy-free
                ``SamplingParams()``).
        Raises:
            ValueError: a prompt that does not fit ``max_model_len`` or bad parameters;
                nothing stays queued (requests added before the bad one are aborted).
        """
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = sampling_params if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("need one SamplingParams per prompt")
        results: list[GenerationResult] = []
        pending: dict[str, tuple[int, int]] = {}
        logprobs: dict[str, list] = {}
        bar = tqdm(total=sum(sp.n for sp in params), disable=not use_tqdm, desc="generate")
        try:
            # inside the try: a bad prompt in the middle aborts the ones already queued
            for i, (prompt, sp) in enumerate(zip(prompts, params)):
                text, ids = self._tokenize(prompt)
                rid = str(next(self._ids))
                results.append(GenerationResult(rid, text, ids, [None] * sp.n))
                for j in range(sp.n):
                    child = sp if sp.n == 1 else dataclasses.replace(
                        sp, n=1, seed=None if sp.seed is None else sp.seed + j)
                    sub = f"{rid}-{j}"
                    self.engine.add_request(sub, ids, child)
                    pending[sub] = (i, j)
                    logprobs[sub] = []
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    logprobs[out.request_id].extend(out.logprobs)
                    if out.finished:
                        i, j = pending[out.request_id]
                        wants_lp = params[i].logprobs is not None
                        results[i].outputs[j] = CompletionOutput(
                            j, out.text, list(out.output_token_ids), out.finish_reason, out.stop_reason,
                            logprobs[out.request_id] if wants_lp else None)
                        results[i].num_cached_tokens = max(results[i].num_cached_tokens, out.num_cached_tokens)
                        if out.prompt_logprobs is not None:
                            results[i].prompt_logprobs = out.prompt_logprobs
                        bar.update(1)
        finally:
            bar.close()
            unfinished = [k for k, (i, j) in pending.items() if results[i].outputs[j] is None]
            if unfinished:
                self.engine.abort_request(unfinished)
        return results

    def embed(self, prompts: Union[PromptType, Sequence[PromptType]],
              pooling_params: Optional[PoolingParams] = None) -> list[list[float]]:
        """One embedding per prompt (``hidden_size`` floats; LAST pooling, L2-normalized
        by default; see :class:`PoolingParams`), in prompt order, batched by the scheduler.

        Raises:
            ValueError: a prompt that does not fit ``max_model_len`` (nothing stays queued).
        """
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        pp = pooling_params or PoolingParams()
        out: dict[str, list[float]] = {}
        rids = []
        try:
            for prompt in prompts:
                rid = f"embd-{next(self._ids)}"
                self.engine.add_request(rid, self._tokenize(prompt)[1], pp)
                rids.append(rid)
            while self.engine.has_unfinished_requests():
                for o in self.engine.step():
                    if o.finished:
                        out[o.request_id] = o.embedding
        finally:
            left = [r for r in rids if r not in out]
            if left:
                self.engine.abort_request(left)
        return [out[r] for r in rids]

    def chat(self, messages: list[dict], sampling_params: Optional[SamplingParams] = None) -> GenerationResult:
        """Apply the model's chat template to one conversation and generate."""
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if not isinstance(ids, list):
            ids = ids["input_ids"]
        return self.generate([{"prompt_token_ids": ids}], sampling_params)[0]
