"""The synchronous engine: one ``step()`` = schedule, run the model, sample, update."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

from ..config import (EngineArgs, ModelConfig, SchedulerConfig, default_num_threads, resolve_dtype,
                      resolve_kv_cache_dtype)
from ..loader import Checkpoint, load_checkpoint
from ..models.llama import check_tp_divisibility
from ..quantization import ONLINE_METHODS as _ONLINE_METHODS
from ..worker.executor import ModelSpec, MultiprocExecutor, UniprocExecutor, WorkerDiedError
from ..worker.model_runner import StepPlanner, kv_bytes_per_block
from .detokenizer import IncrementalDetokenizer
from .kv_cache_manager import KVCacheManager
from .request import Request, RequestStatus
from .sampler import Sampler
from .structured_output import StructuredOutputManager
from .sampling_params import PoolingParams, SamplingParams
from .scheduler import Scheduler, SchedulerOutput

logger = logging.getLogger("argosy.engine")


@dataclass
class RequestOutput:
    """What one step produced for one request.

    Attributes:
        request_id: the request.
        new_token_ids: tokens generated this step (0 or 1 per step).
        new_text: text that became final this step (may be empty while held back).
        text: all final text so far.
        finished / finish_reason: ``"stop" | "length" | "abort" | "error"`` once finished.
        stop_reason: the stop string or stop token id that ended it (None for EOS).
        num_prompt_tokens / num_output_tokens / num_cached_tokens: token counts.
        logprobs: per new token ``(token_id, logprob, [(top_id, top_logprob), ...])``.
        arrival_time / first_scheduled_time / first_token_time: ``time.monotonic()`` seconds.
    """

    request_id: str
    new_token_ids: list[int]
    new_text: str
    text: str
    finished: bool
    finish_reason: Optional[str]
    stop_reason: object
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    output_token_ids: list[int]
    logprobs: list = field(default_factory=list)
    arrival_time: float = 0.0
    first_scheduled_time: Optional[float] = None
    first_token_time: Optional[float] = None
    #: an embedding request's vector (``hidden_size`` floats), once finished
    embedding: Optional[list[float]] = None
    #: with ``prompt_logprobs``: one entry per prompt token (None for the first, else
    #: ``(token_id, logprob, rank, [(top_id, top_logprob), ...])``), once the prompt is done
    prompt_logprobs: Optional[list] = None


@dataclass
class EngineStats:
    """Monotonic counters since start (feed ``/metrics``)."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    computed_tokens: int = 0  # tokens run through the model (prefill + decode)
    finished: dict = field(default_factory=lambda: {"stop": 0, "length": 0, "abort": 0, "error": 0})
    steps: int = 0


#: ``--quantization`` values naming a checkpoint's own method (the formats Argosy reads).
QUANTIZATION_METHODS = ("gguf", "compressed-tensors", "awq", "gptq")
#: Methods applied at load to a float checkpoint (vLLM's online quantization).
ONLINE_METHODS = _ONLINE_METHODS
#: vLLM's kernel-specific names for the same checkpoint methods, accepted as those.
QUANTIZATION_ALIASES = {"awq_marlin": "awq", "gptq_marlin": "gptq"}


def check_quantization(requested: Optional[str], checkpoint: Checkpoint) -> None:
    """``--quantization`` against the checkpoint's own method, as vLLM does: unset or the
    same method is fine; another method on a quantized checkpoint is refused naming both
    (no double quantization); ``fp8`` on a float Hugging Face checkpoint quantizes its
    linear layers at load (online FP8, :mod:`argosy.runtime.quantization.fp8`); another
    method on a float checkpoint is refused (it needs a checkpoint quantized that way). A
    checkpoint whose method quantizes only the KV cache (a compressed-tensors
    ``kv_cache_scheme`` with dense weights) takes ``fp8`` too: its weights are quantized at
    load and its KV-cache scales still apply (vLLM refuses this combination).

    Raises:
        ValueError: one line saying which and what to do.
    """
    if requested is None:
        return
    requested = QUANTIZATION_ALIASES.get(requested, requested)
    own = checkpoint.config.quantization
    if own is not None and requested != own and (checkpoint.config.weights_quantized
                                                 or requested not in ONLINE_METHODS):
        raise ValueError(f"--quantization {requested} does not match {checkpoint.path}, which is already quantized "
                         f"with {own}: drop the flag or pass --quantization {own}")
    if requested not in QUANTIZATION_METHODS + ONLINE_METHODS:
        raise ValueError(f"--quantization {requested} is not supported (supported: "
                         f"{', '.join(QUANTIZATION_METHODS)}, for checkpoints quantized that way; "
                         f"{', '.join(ONLINE_METHODS)}, applied at load to a float checkpoint)")
    if own is None and requested not in ONLINE_METHODS:
        raise ValueError(f"--quantization {requested} needs a checkpoint quantized with {requested} "
                         f"({checkpoint.path} is not quantized; online quantization: "
                         f"--quantization {' or '.join(ONLINE_METHODS)})")


def served_model_aliases(flag: Union[None, str, Sequence[str]], names: Sequence[str], checkpoint_name: str
                         ) -> tuple[str, ...]:
    """Names also accepted in requests but never listed by ``/v1/models``: without
    ``--served-model-name``, the checkpoint's file or directory name, which was the default
    before the MODEL-as-given one (clients configured with it keep working)."""
    return () if flag or checkpoint_name in names else (checkpoint_name,)


def served_model_names(flag: Union[None, str, Sequence[str]], model: Optional[str], checkpoint_name: str
                       ) -> list[str]:
    """The names the API answers to, first one reported (``--served-model-name``).

    Without the flag, vLLM's default: the model argument exactly as given (a hub id such
    as ``meta-llama/Llama-3.1-8B-Instruct`` stays that, not the snapshot directory it
    resolved to; a path stays the path as typed); with no model argument (the bundled
    model), the checkpoint's own name.

    Raises:
        ValueError: an empty name, or the same name twice.
    """
    names = [flag] if isinstance(flag, str) else list(flag or [])
    if not names:
        names = [model if model else checkpoint_name]
    if any(not n or not n.strip() for n in names):
        raise ValueError("--served-model-name: a name must not be empty")
    if len(set(names)) != len(names):
        raise ValueError(f"--served-model-name: a name is given twice ({' '.join(names)})")
    return names


class LLMEngine:
    """Owns scheduler, KV cache, model runner, sampler and detokenizers.

    Not thread-safe: drive it from one thread (``AsyncLLM`` runs it on its own thread).
    With ``--tensor-parallel-size N > 1`` it starts ``N - 1`` worker processes
    (:class:`~argosy.runtime.worker.executor.MultiprocExecutor`); :meth:`shutdown` stops
    them (also run at interpreter exit).

    Args:
        args: engine flags.
        checkpoint: an already opened checkpoint (default: ``load_checkpoint(args.model)``).
    Raises:
        ModelLoadError: the model cannot be loaded.
        ValueError: inconsistent flags (e.g. KV cache too small for ``--max-model-len``).
    """

    def __init__(self, args: EngineArgs, checkpoint: Optional[Checkpoint] = None):
        t0 = time.monotonic()
        self.args = args
        self.device = args.resolve_device()
        if self.device.type == "cpu":
            torch.set_num_threads(args.num_threads or default_num_threads())
        self.checkpoint = checkpoint or load_checkpoint(args.model, args.tokenizer, args.revision)
        check_quantization(args.quantization, self.checkpoint)
        self.model_config: ModelConfig = self.checkpoint.config
        self.tokenizer = self.checkpoint.tokenizer
        self._fast_tokenizer = getattr(self.tokenizer, "backend_tokenizer", None) or self.tokenizer
        if args.swap_space is not None:
            logger.info("--swap-space %s has no effect: preempted requests are recomputed, not swapped",
                        args.swap_space)
        self.served_model_names = served_model_names(args.served_model_name, args.model, self.checkpoint.name)
        self.served_model_name = self.served_model_names[0]
        self.served_model_aliases = served_model_aliases(args.served_model_name, self.served_model_names,
                                                         self.checkpoint.name)
        self.dtype = resolve_dtype(args.dtype, self.device)
        self.scheduler_config: SchedulerConfig = args.scheduler_config(self.model_config.max_position_embeddings)
        cache_cfg = args.cache_config()
        self.kv_cache_dtype = resolve_kv_cache_dtype(cache_cfg.cache_dtype, self.dtype)

        tp = args.tensor_parallel_size
        check_tp_divisibility(self.model_config, tp)
        sc = self.scheduler_config
        spec = ModelSpec(args, self.checkpoint.path, self.dtype, sc.max_model_len, cache_cfg,
                         sc.max_num_batched_tokens, sc.max_num_seqs)
        self.executor = (UniprocExecutor if tp == 1 else MultiprocExecutor)(spec, self.checkpoint, self.device)
        try:
            self._finish_init(cache_cfg, t0)
        except BaseException:
            self.executor.shutdown()
            raise

    def _finish_init(self, cache_cfg, t0: float) -> None:
        ex = self.executor
        weight_bytes = ex.weight_bytes
        self.num_blocks = ex.num_blocks
        self.block_size = cache_cfg.block_size
        capacity = self.num_blocks * self.block_size
        max_len = self.scheduler_config.max_model_len
        if capacity < max_len:
            raise ValueError(
                f"KV cache holds {capacity} tokens ({self.num_blocks} blocks) but --max-model-len is {max_len}; "
                "raise --kv-cache-memory / --gpu-memory-utilization or lower --max-model-len"
            )
        self.kv = KVCacheManager(self.num_blocks, self.block_size, cache_cfg.enable_prefix_caching,
                                 cache_cfg.prefix_caching_hash_algo)
        self.scheduler = Scheduler(self.scheduler_config, self.kv)
        self.planner = StepPlanner(self.kv.get_block_ids)
        self._scratch_ids = 0
        self.sampler = Sampler(self.model_config.vocab_size, self.args.seed)
        self.structured = StructuredOutputManager(self.tokenizer, self.model_config.vocab_size,
                                                  self.model_config.eos_token_ids,
                                                  getattr(self.args, "structured_outputs_backend", "auto"))
        self.detok: dict[str, IncrementalDetokenizer] = {}
        self._pooled_done: list[Request] = []
        self.stats = EngineStats()
        self.load_time_s = time.monotonic() - t0
        tp = ex.world_size
        per_block = kv_bytes_per_block(self.model_config, self.block_size, self.kv_cache_dtype, tp)
        kv_gib = self.num_blocks * per_block / 2**30
        logger.info(
            "model %s (%s, %d layers, weights %.0f MiB%s: %s) dtype=%s device=%s | KV cache %d blocks x %d tokens = %d tokens "
            "(%.2f GiB%s, %s, %d bytes a token) | max_model_len=%d -> max concurrency at max length %.1fx | max_num_seqs=%d "
            "max_num_batched_tokens=%d chunked_prefill=%s prefix_caching=%s | loaded in %.1fs",
            self.served_model_name, self.checkpoint.path, self.model_config.num_hidden_layers,
            weight_bytes / 2**20, f" per rank, tensor parallel x{tp}" if tp > 1 else "",
            ", ".join(f"{kind} {n / 2**20:.0f} MiB" for kind, n in sorted(
                getattr(ex.runner.model, "weight_bytes_by_format", {}).items(), key=lambda kv: -kv[1])),
            str(self.dtype).removeprefix("torch."), self.device,
            self.num_blocks, self.block_size, capacity, kv_gib, " per rank" if tp > 1 else "",
            str(self.kv_cache_dtype).removeprefix("torch."), per_block // self.block_size, max_len, capacity / max_len,
            self.scheduler_config.max_num_seqs, self.scheduler_config.max_num_batched_tokens,
            self.scheduler_config.enable_chunked_prefill, cache_cfg.enable_prefix_caching, self.load_time_s,
        )

    # ------------------------------------------------------------------ API
    @property
    def max_model_len(self) -> int:
        return self.scheduler_config.max_model_len

    @staticmethod
    def _as_sampling(params):
        """An embedding request runs as a one-token request that never samples."""
        return SamplingParams(max_tokens=1, temperature=0) if isinstance(params, PoolingParams) else params

    def check_request(self, prompt_token_ids: list[int], params) -> None:
        """Validate a request against the engine's limits; the only state it touches is the
        structured-output grammar cache (a constraint is compiled here, once per spec).

        Raises:
            ValueError: empty prompt, prompt (+ ``max_tokens``) longer than
                ``max_model_len``, a token id out of range, or an invalid
                ``structured_outputs`` constraint (compiled here, once per distinct spec).
        """
        params = self._as_sampling(params)
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("prompt is empty")
        if n >= self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{n} tokens in the prompt, leaving no room for output tokens. Please reduce the length of the prompt."
            )
        vocab = self.model_config.vocab_size
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        for name, ids in (("stop_token_ids", params.stop_token_ids), ("allowed_token_ids", params.allowed_token_ids),
                          ("bad_words token ids", [t for seq in params.bad_words_token_ids or [] for t in seq])):
            bad = [t for t in ids or [] if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"{name} must be in [0, {vocab}), got {bad[0]}")
        if params.max_tokens is not None and n + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{n + params.max_tokens} tokens ({n} in the prompt, {params.max_tokens} for the completion). "
                "Please reduce the length of the prompt or max_tokens."
            )
        if params.structured_outputs is not None:
            self.structured.compile(params.structured_outputs)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params,
                    arrival_time: Optional[float] = None) -> Request:
        """Queue a tokenized prompt: a generation (``SamplingParams``) or an embedding
        (``PoolingParams``: finishes after its prefill with ``RequestOutput.embedding``).

        Raises:
            ValueError: see :meth:`check_request`; or a duplicate request id.
        """
        if request_id in self.scheduler.requests:
            raise ValueError(f"duplicate request id {request_id}")
        self.check_request(prompt_token_ids, params)
        pooling = params if isinstance(params, PoolingParams) else None
        params = self._as_sampling(params)
        n = len(prompt_token_ids)
        room = self.max_model_len - n
        max_tokens = room if params.max_tokens is None else params.max_tokens
        req = Request(request_id, prompt_token_ids, params, self.model_config.eos_token_ids, max_tokens, arrival_time)
        req.pooling_params = pooling
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None]  # the first prompt token has no prediction
        if params.structured_outputs is not None:
            req.grammar = self.structured.new_state(params.structured_outputs)
        self.detok[request_id] = IncrementalDetokenizer(
            self._fast_tokenizer, req.prompt_token_ids, params.stop_strings,
            params.include_stop_str_in_output, params.skip_special_tokens,
        )
        self.scheduler.add_request(req)
        self.stats.prompt_tokens += n
        return req

    def abort_request(self, request_ids) -> list[RequestOutput]:
        """Abort requests (unknown ids ignored); their blocks are freed at once."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        outs = []
        for req in self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED):
            outs.append(self._output(req, [], []))
        return outs

    def fail_unfinished_requests(self) -> list[RequestOutput]:
        """Finish every queued and running request with ``finish_reason="error"`` (the
        engine cannot go on: a step raised, a tensor-parallel worker died) and free its
        blocks. Pure bookkeeping, safe after a failed step; returns each request's last
        output (its final text, ``finished=True``)."""
        ids = list(self.scheduler.requests)
        return [self._output(req, [], []) for req in self.scheduler.finish_requests(ids, RequestStatus.FINISHED_ERROR)]

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def check_health(self) -> None:
        """Raise if the engine can no longer run a step.

        Raises:
            WorkerDiedError: a tensor-parallel worker process has exited.
        """
        if self.executor.failure is not None:
            raise WorkerDiedError(self.executor.failure)

    def add_failure_callback(self, fn) -> None:
        """Call ``fn()`` from another thread when a worker process dies (tensor parallel)."""
        self.executor.add_failure_callback(fn)

    def shutdown(self) -> None:
        """Stop worker processes (tensor parallel) and leave the process group. Idempotent;
        the engine cannot step afterwards."""
        self.executor.shutdown()

    def prompt_logits(self, prompt_token_ids: list[int], chunk_size: Optional[int] = None):
        """Logits at every position of one prompt through the whole (possibly
        tensor-parallel) model: ``[len(prompt), vocab_size] float32`` on CPU.

        For verification (comparing against a reference or across parallel sizes, the
        teacher-forced accuracy gate). By default one forward pass over the whole
        prompt; with ``chunk_size`` the prompt goes through ``chunk_size`` tokens per
        step, as chunked prefill does (``chunk_size=1``: decode-shaped steps, which on
        the CPU run the packed int4 kernel). Runs between steps on scratch KV blocks that
        are freed afterwards; with prefix caching on, the prompt's full blocks stay
        cached like any request's.

        Raises:
            ValueError: empty prompt, longer than ``max_model_len``, out-of-range ids,
                ``chunk_size < 1``, or not enough free KV blocks right now.
        """
        ids = list(prompt_token_ids)
        self.check_request(ids, SamplingParams(max_tokens=1))
        n = len(ids)
        chunk = n if chunk_size is None else chunk_size
        if chunk < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self._scratch_ids += 1
        rid = f"__prompt_logits_{self._scratch_ids}"
        if not self.kv.allocate_slots(rid, ids, 0, n):
            raise ValueError(f"not enough free KV blocks for a {n}-token prompt")
        try:
            req = Request(rid, ids, SamplingParams(max_tokens=1), self.model_config.eos_token_ids, 1)
            parts = []
            for start in range(0, n, chunk):
                req.num_computed_tokens = start
                num = min(chunk, n - start)
                plan, _ = self.planner.plan(SchedulerOutput([(req, num)], num))
                plan.all_logits = True
                parts.append(self.executor.execute(plan).cpu())
            self.kv.cache_blocks(rid, ids, n)
            return torch.cat(parts)
        finally:
            self.kv.free(rid)

    def step(self) -> list[RequestOutput]:
        """Run one engine step; returns outputs for requests that got a token or finished."""
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        now = time.monotonic()
        for req, _ in sched.scheduled:
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
        plan, reqs = self.planner.plan(sched)  # also marks prompt_logprobs rows and embedding rows
        logits = self.executor.execute(plan)
        if plan.prompt_logits:
            self._record_prompt_logprobs(plan)
        pooled = [i for i, r in enumerate(reqs) if r.pooling_params is not None] if plan.return_hidden else []
        sampled_map: dict[str, int] = {}
        lp_map: dict[str, object] = {}
        if pooled:
            logits, reqs = self._pool(logits, reqs, pooled)
        if reqs:
            if any(r.grammar is not None for r in reqs):
                self.structured.apply_bitmask(logits, [r.grammar for r in reqs])
            out = self.sampler(logits, reqs)
            for r, t, lp in zip(reqs, out.token_ids, out.logprobs):
                sampled_map[r.request_id] = t
                if lp is not None:
                    lp_map[r.request_id] = lp
        self.stats.steps += 1
        self.stats.computed_tokens += sched.num_scheduled_tokens
        got = self.scheduler.update(sched, sampled_map)
        now = time.monotonic()
        outputs = []
        for req in self._pooled_done:  # embeddings: done after their prefill (blocks cached by update)
            req.first_token_time = req.last_token_time = now
            self.scheduler.finish_request(req.request_id, RequestStatus.FINISHED_STOPPED)
            outputs.append(self._output(req, [], []))
        self._pooled_done = []
        for req in got:
            tok = req.output_token_ids[-1]
            self.stats.generation_tokens += 1
            if req.first_token_time is None:
                req.first_token_time = now
            req.last_token_time = now
            lps = []
            if req.request_id in lp_map:
                lp, top = lp_map[req.request_id]
                lps = [(tok, lp, top)]
            if req.grammar is not None and not self._advance_grammar(req, tok):
                outputs.append(self._output(req, [tok], lps))
                continue
            det = self.detok[req.request_id]
            hit = det.append(tok, check_stop=req.num_output_tokens >= req.sampling_params.min_tokens)
            if hit is not None and not req.status.finished:
                req.stop_reason = hit
                self.scheduler.finish_request(req.request_id, RequestStatus.FINISHED_STOPPED)
            elif hit is not None:
                req.stop_reason = hit
                req.status = RequestStatus.FINISHED_STOPPED
            outputs.append(self._output(req, [tok], lps))
        return outputs

    def _record_prompt_logprobs(self, plan) -> None:
        """Turn the step's reduced prompt-position logits (the runner's
        ``last_prompt_logprobs``: the logits at position ``j - 1`` give prompt token ``j``'s
        log-probability, its rank (1 = most likely) and the top alternatives) into
        ``req.prompt_logprobs`` entries. Positions already recorded (a recompute after
        preemption) are skipped."""
        own, ranks, top_vals, top_ids = self.executor.runner.last_prompt_logprobs
        off = 0
        for i in plan.prompt_logits:
            req, c, n = self.scheduler.requests[plan.req_ids[i]], plan.num_computed[i], plan.num_new[i]
            base, off = off, off + n
            prompt = req.prompt_token_ids
            if req.prompt_logprobs is None:
                req.prompt_logprobs = [None]
            first = len(req.prompt_logprobs)  # next prompt token index to record
            lo, hi = max(first - 1 - c, 0), min(n, len(prompt) - 1 - c)  # rows r: token c + r + 1
            k = req.sampling_params.prompt_logprobs
            for r in range(lo, hi):
                row = base + r
                top = list(zip(top_ids[row, :k].tolist(), top_vals[row, :k].tolist())) if k else []
                req.prompt_logprobs.append((prompt[c + r + 1], float(own[row]), int(ranks[row]), top))

    def _pool(self, logits: torch.Tensor, reqs: list[Request], pooled: list[int]):
        """Take the embedding rows out of a step: store each one's pooled (LAST) vector,
        L2-normalized when asked, and return the logits and requests left to sample."""
        hidden = self.executor.runner.last_hidden
        keep = [i for i in range(len(reqs)) if reqs[i].pooling_params is None]
        for i in pooled:
            req = reqs[i]
            v = hidden[i]
            if req.pooling_params.normalize:
                v = torch.nn.functional.normalize(v, dim=0)
            req.embedding = v.tolist()
            self._pooled_done.append(req)
        if len(keep) == len(reqs):
            return logits, reqs
        return logits[keep], [reqs[i] for i in keep]

    def _advance_grammar(self, req: Request, tok: int) -> bool:
        """Feed a constrained request's new token to its matcher. A completed grammar
        finishes the request (``stop``); a token the grammar refuses (only possible when
        ``min_tokens`` banned the one token the grammar allowed, the stop token) ends it
        with ``error`` and returns False."""
        if req.grammar.accept(tok):
            if req.grammar.is_terminated and not req.status.finished:
                self.scheduler.finish_request(req.request_id, RequestStatus.FINISHED_STOPPED)
            return True
        logger.warning("request %s: token %d is not allowed by its structured-output grammar; finishing it",
                       req.request_id, tok)
        if not req.status.finished:
            self.scheduler.finish_request(req.request_id, RequestStatus.FINISHED_ERROR)
        else:
            req.status = RequestStatus.FINISHED_ERROR
        return False

    def _output(self, req: Request, new_ids: list[int], lps: list) -> RequestOutput:
        finished = req.status.finished
        det = self.detok.get(req.request_id)
        new_text = det.take(finished) if det else ""
        text = det.output_text[: det.emitted] if det else ""
        if finished:
            self.detok.pop(req.request_id, None)
            self.stats.finished[req.status.value] = self.stats.finished.get(req.status.value, 0) + 1
        return RequestOutput(
            request_id=req.request_id,
            new_token_ids=new_ids,
            new_text=new_text,
            text=text,
            finished=finished,
            finish_reason=req.status.value if finished else None,
            stop_reason=req.stop_reason,
            num_prompt_tokens=req.num_prompt_tokens,
            num_output_tokens=req.num_output_tokens,
            num_cached_tokens=req.num_cached_tokens,
            output_token_ids=req.output_token_ids,
            logprobs=lps,
            arrival_time=req.arrival_time,
            first_scheduled_time=req.first_scheduled_time,
            first_token_time=req.first_token_time,
            embedding=req.embedding,
            prompt_logprobs=req.prompt_logprobs if req.prompt_logprobs is not None
            and len(req.prompt_logprobs) == req.num_prompt_tokens else None,
        )
