"""Batched token sampling with per-row parameters.

All rows of a step are processed with tensor ops; per-row Python work is limited to
building small parameter tensors and, for requests with a ``seed``, drawing their noise
from their own generator (so their tokens do not depend on the batch they are in).

Order of operations (vLLM's): penalties (repetition as in CTRL, Keskar et al. 2019;
OpenAI presence/frequency), min_tokens EOS suppression, temperature, min_p
(Nguyen et al. 2024), top-k, top-p (nucleus, Holtzman et al. 2020), then sampling by
the exponential-race trick: ``argmax(p / q)`` with ``q ~ Exp(1)`` draws from ``p``.
Log-probabilities are those of the raw model distribution (before processing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .request import Request


@dataclass
class SamplerOutput:
    """Result of one sampling call.

    Attributes:
        token_ids: ``[N]`` sampled token per row (Python list).
        logprobs: per row, None or ``(sampled_logprob, [(token_id, logprob), ...top-k])``.
    """

    token_ids: list[int]
    logprobs: list[Optional[tuple[float, list[tuple[int, float]]]]]


class Sampler:
    """Turns logits into tokens for a batch of requests.

    Args:
        vocab_size: logits width.
        seed: seed of the generator used by rows without their own ``seed``.
    """

    def __init__(self, vocab_size: int, seed: int = 0):
        self.vocab_size = vocab_size
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, reqs: list[Request]) -> SamplerOutput:
        """Sample one token per row.

        Args:
            logits: ``[N, vocab] float32`` (CPU or device).
            reqs: the N requests, row-aligned.
        """
        n = len(reqs)
        orig = logits
        params = [r.sampling_params for r in reqs]
        want_lp = [p.logprobs for p in params]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(k is not None for k in want_lp) else None

        if any(p.has_penalties for p in params):
            logits = self._apply_penalties(logits.clone(), reqs)
        ban = [(i, t) for i, r in enumerate(reqs) if r.num_output_tokens < r.sampling_params.min_tokens
               for t in (*(() if r.sampling_params.ignore_eos else r.eos_token_ids), *r.sampling_params.stop_token_ids)]
        if ban:
            if logits is orig:
                logits = logits.clone()
            rows, cols = zip(*ban)
            logits[list(rows), list(cols)] = float("-inf")

        greedy = [p.greedy for p in params]
        if all(greedy):
            tokens = logits.argmax(dim=-1)
        else:
            tokens = self._sample(logits, reqs, params, greedy)
        token_list = tokens.tolist()
        lps: list = [None] * n
        if raw_logprobs is not None:
            lps = self._gather_logprobs(raw_logprobs, tokens, want_lp)
        return SamplerOutput(token_list, lps)

    def _apply_penalties(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        dev = logits.device
        n, v = logits.shape
        rep = torch.tensor([r.sampling_params.repetition_penalty for r in reqs], device=dev).unsqueeze(1)
        pres = torch.tensor([r.sampling_params.presence_penalty for r in reqs], device=dev).unsqueeze(1)
        freq = torch.tensor([r.sampling_params.frequency_penalty for r in reqs], device=dev).unsqueeze(1)
        max_out = max(1, max(r.num_output_tokens for r in reqs))
        out_ids = torch.full((n, max_out), v, dtype=torch.int64)
        for i, r in enumerate(reqs):
            if r.output_token_ids:
                out_ids[i, : r.num_output_tokens] = torch.tensor(r.output_token_ids)
        counts = torch.zeros(n, v + 1, device=dev)
        counts.scatter_add_(1, out_ids.to(dev), torch.ones(n, max_out, device=dev))
        counts = counts[:, :v]
        if (rep != 1.0).any():
            max_p = max(1, max(r.num_prompt_tokens for r in reqs))
            p_ids = torch.full((n, max_p), v, dtype=torch.int64)
            for i, r in enumerate(reqs):
                if r.sampling_params.repetition_penalty != 1.0:
                    p_ids[i, : r.num_prompt_tokens] = torch.tensor(r.prompt_token_ids)
            seen = torch.zeros(n, v + 1, dtype=torch.bool, device=dev)
            seen.scatter_(1, p_ids.to(dev), True)
            seen = seen[:, :v] | (counts > 0)
            penalized = torch.where(logits > 0, logits / rep, logits * rep)
            logits = torch.where(seen, penalized, logits)
        logits = logits - freq * counts - pres * (counts > 0).float()
        return logits

    def _sample(self, logits: torch.Tensor, reqs: list[Request], params, greedy: list[bool]) -> torch.Tensor:
        dev = logits.device
        n, v = logits.shape
        greedy_tokens = logits.argmax(dim=-1)
        temp = torch.tensor([1.0 if g else p.temperature for p, g in zip(params, greedy)], device=dev)
        logits = logits / temp.unsqueeze(1)
        min_p = [p.min_p for p in params]
        if any(min_p):
            probs = torch.softmax(logits, dim=-1)
            thresh = torch.tensor(min_p, device=dev).unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
            logits = logits.masked_fill(probs < thresh, float("-inf"))
        top_k = [p.top_k for p in params]
        top_p = [p.top_p for p in params]
        if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
            logits = self._top_k_top_p(logits, top_k, top_p)
        probs = torch.softmax(logits, dim=-1)
        q = torch.empty_like(probs)
        seeded = [i for i, r in enumerate(reqs) if r.generator is not None]
        if len(seeded) < n:
            q.exponential_(generator=self.generator if dev.type == "cpu" else None)
        for i in seeded:
            row = torch.empty(v, dtype=probs.dtype)
            row.exponential_(generator=reqs[i].generator)
            q[i] = row.to(dev)
        sampled = (probs / q).argmax(dim=-1)
        g = torch.tensor(greedy, device=dev)
        return torch.where(g, greedy_tokens, sampled)

    @staticmethod
    def _top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
        dev = logits.device
        v = logits.shape[1]
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        k = torch.tensor([kk if kk > 0 else v for kk in top_k], device=dev).clamp(max=v)
        ranks = torch.arange(v, device=dev).unsqueeze(0)
        sorted_logits = sorted_logits.masked_fill(ranks >= k.unsqueeze(1), float("-inf"))
        p = torch.tensor(top_p, device=dev).unsqueeze(1)
        probs = torch.softmax(sorted_logits, dim=-1)
        cum_before = probs.cumsum(dim=-1) - probs  # mass strictly above each token
        # always keeps rank 0; rows without top-p (p = 1) are never cut, even where the
        # float32 cumulative sum rounds up to 1 before the last token
        sorted_logits = sorted_logits.masked_fill((cum_before >= p) & (p < 1.0), float("-inf"))
        return torch.empty_like(logits).scatter_(1, idx, sorted_logits)

    @staticmethod
    def _gather_logprobs(logprobs: torch.Tensor, tokens: torch.Tensor, want: list[Optional[int]]):
        k = max((w or 0) for w in want)
        sampled_lp = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
        if k > 0:
            top_v, top_i = logprobs.topk(k, dim=-1)
            top_v, top_i = top_v.tolist(), top_i.tolist()
        out = []
        for i, w in enumerate(want):
            if w is None:
                out.append(None)
            else:
                top = list(zip(top_i[i][:w], top_v[i][:w])) if w > 0 else []
                out.append((sampled_lp[i], top))
        return out
