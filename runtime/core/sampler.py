"""Batched token sampling with per-row parameters.

All rows of a step are processed with tensor ops; per-row Python work is limited to
building small parameter tensors and, for requests with a ``seed``, drawing their noise
from their own generator (so their tokens do not depend on the batch they are in).

Order of operations (vLLM's): penalties (repetition as in CTRL, Keskar et al. 2019;
OpenAI presence/frequency), OpenAI's ``logit_bias``, vLLM's ``allowed_token_ids`` mask,
min_tokens EOS suppression and ``bad_words`` bans, temperature, min_p
(Nguyen et al. 2024), top-k, top-p (nucleus, Holtzman et al. 2020), then one uniform
draw per row and inverse-CDF sampling over the kept tokens. Greedy rows take ``argmax``
only; top-k / top-p rows work on a truncated candidate set (``topk``), not a sort of the
whole vocabulary; only rows with neither touch every token (they need to).
Log-probabilities are those of the raw model distribution (before processing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .request import Request

#: Candidates per row for top-p without top-k (tokens): the nucleus is cut from the
#: ``TOP_P_CANDIDATES`` most likely tokens when they hold at least ``top_p`` of the
#: mass (exact then); a row whose nucleus is wider is redone with 16x as many
#: candidates, and finally over the whole (sorted) vocabulary.
TOP_P_CANDIDATES = 256


@dataclass
class SamplerOutput:
    """Result of one sampling call.

    Attributes:
        token_ids: ``[N]`` sampled token per row (Python list).
        logprobs: per row, None or ``(sampled_logprob, [(token_id, logprob), ...top-k])``.
    """

    token_ids: list[int]
    logprobs: list[Optional[tuple[float, list[tuple[int, float]]]]]


def _bad_word_bans(sequences: list[list[int]], output: list[int]) -> list[int]:
    """Token ids that would complete one of ``sequences`` after ``output`` (vLLM's
    ``bad_words`` rule: a sequence's last id is banned when the output ends with the rest
    of it; a one-id sequence is always banned)."""
    out = []
    for seq in sequences:
        k = len(seq) - 1
        if k == 0 or (k <= len(output) and output[len(output) - k:] == seq[:-1]):
            out.append(seq[-1])
    return out


def _allowed_index(params, device: torch.device) -> torch.Tensor:
    """``params.allowed_token_ids`` as an ``int64`` index tensor on ``device``, built once
    per request and kept on its parameters (not rebuilt every step)."""
    idx = getattr(params, "_allowed_index", None)
    if idx is None or idx.device != device:
        idx = torch.tensor(params.allowed_token_ids, dtype=torch.int64, device=device)
        params._allowed_index = idx
    return idx


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
        biased = [(i, t, b) for i, p in enumerate(params) if p.logit_bias for t, b in p.logit_bias.items()]
        if biased:
            if logits is orig:
                logits = logits.clone()
            rows, cols, vals = zip(*biased)
            logits[list(rows), list(cols)] += torch.tensor(vals, dtype=logits.dtype, device=logits.device)
        ban = [(i, t) for i, r in enumerate(reqs) if r.num_output_tokens < r.sampling_params.min_tokens
               for t in (*(() if r.sampling_params.ignore_eos else r.eos_token_ids), *r.sampling_params.stop_token_ids)]
        ban += [(i, t) for i, r in enumerate(reqs) if r.sampling_params.bad_words_token_ids
                for t in _bad_word_bans(r.sampling_params.bad_words_token_ids, r.output_token_ids)]
        allowed = [(i, _allowed_index(p, logits.device)) for i, p in enumerate(params) if p.allowed_token_ids]
        if allowed:
            if logits is orig:
                logits = logits.clone()
            for i, idx in allowed:
                kept = logits[i].index_select(0, idx)
                logits[i] = float("-inf")
                logits[i].index_copy_(0, idx, kept)
        if ban:
            if logits is orig:
                logits = logits.clone()
            rows, cols = zip(*ban)
            banned_rows = set(rows)
            saved = {i: logits[i].index_select(0, idx) for i, idx in allowed if i in banned_rows}
            logits[list(rows), list(cols)] = float("-inf")
            for i, idx in allowed:  # bans that leave no allowed token are dropped for that row
                if i in saved and not torch.isfinite(logits[i]).any():
                    logits[i].index_copy_(0, idx, saved[i])

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
        """Tokens ``[N] int64`` for a batch with at least one non-greedy row.

        Greedy rows take ``argmax``. Each sampled row gets one uniform draw ``u`` (from its
        request's generator when it has a ``seed``) and takes the token where the
        cumulative distribution of its kept tokens first exceeds ``u`` (inverse-CDF
        sampling). Rows with top-k or top-p only look at a truncated candidate set
        (:meth:`_truncate`); rows with neither need the whole vocabulary and get it.
        """
        dev = logits.device
        n, v = logits.shape
        out = torch.empty(n, dtype=torch.int64, device=dev)
        g_rows = [i for i, g in enumerate(greedy) if g]
        s_rows = [i for i, g in enumerate(greedy) if not g]
        if g_rows:
            out[g_rows] = logits[g_rows].argmax(dim=-1)
        sp = [params[i] for i in s_rows]
        x = logits[s_rows] / torch.tensor([p.temperature for p in sp], device=dev).unsqueeze(1)
        if any(p.min_p for p in sp):
            # p >= min_p * p_max  <=>  logit >= max_logit + log(min_p) (softmax is monotone)
            min_p = torch.tensor([p.min_p for p in sp], device=dev).unsqueeze(1)
            floor = x.max(dim=-1, keepdim=True).values + torch.log(min_p)
            x = x.masked_fill((x < floor) & (min_p > 0), float("-inf"))
        u = self._uniforms([reqs[i] for i in s_rows], dev)
        trunc = [j for j, p in enumerate(sp) if p.top_k > 0 or p.top_p < 1.0]
        full = [j for j, p in enumerate(sp) if not (p.top_k > 0 or p.top_p < 1.0)]
        tokens = torch.empty(len(s_rows), dtype=torch.int64, device=dev)
        if full:
            tokens[full] = _inverse_cdf(torch.softmax(x[full], dim=-1), u[full])
        if trunc:
            xt, ut = x[trunc], u[trunc]
            for rows, vals, ids in self._candidates(xt, [sp[j].top_k for j in trunc], [sp[j].top_p for j in trunc]):
                pick = _inverse_cdf(torch.softmax(vals, dim=-1), ut[rows])
                tokens[[trunc[r] for r in rows]] = ids.gather(1, pick.unsqueeze(1)).squeeze(1)
        out[s_rows] = tokens
        return out

    def _uniforms(self, reqs: list[Request], dev: torch.device) -> torch.Tensor:
        """One ``U[0, 1)`` draw per row, ``[N] float32``: from the request's own generator
        when it has a ``seed`` (so its tokens do not depend on the batch it is in), else
        from the sampler's generator."""
        u = torch.rand(len(reqs), generator=self.generator)
        for i, r in enumerate(reqs):
            if r.generator is not None:
                u[i] = torch.rand((), generator=r.generator)
        return u.to(dev)

    @classmethod
    def _candidates(cls, x: torch.Tensor, top_k: list[int], top_p: list[float]):
        """The tokens each row keeps under top-k and top-p, found from as few candidates as
        exactness allows: ``max(top_k)`` or :data:`TOP_P_CANDIDATES` per row first, rows
        whose nucleus is wider again with 16x as many, the last round over the whole
        sorted vocabulary.

        Args:
            x: ``[R, V] float32`` processed logits; top_k / top_p: per row (see
                :meth:`_truncate`).
        Returns:
            ``[(rows, vals [len(rows), k], ids [len(rows), k])]``: groups of row indices
            with their candidates' logits (cut ones at ``-inf``) and token ids.
        """
        v = x.shape[1]
        k = min(v, max([t for t in top_k if t > 0] + ([TOP_P_CANDIDATES] if any(t <= 0 for t in top_k) else [])))
        rows = list(range(len(top_k)))
        groups = []
        while rows:
            sub = x if len(rows) == len(top_k) else x[rows]
            vals, ids, covered = cls._truncate(sub, [top_k[r] for r in rows], [top_p[r] for r in rows], k)
            if k >= v or all(covered):
                groups.append((rows, vals, ids))
                break
            done = [i for i, c in enumerate(covered) if c]
            if done:
                groups.append(([rows[i] for i in done], vals[done], ids[done]))
            rows = [rows[i] for i, c in enumerate(covered) if not c]
            k = v if k * 16 >= v // 2 else k * 16
        return groups

    @staticmethod
    def _truncate(x: torch.Tensor, top_k: list[int], top_p: list[float], k: int):
        """Top-k, then top-p on the top-k-renormalized distribution (vLLM's order), over
        the ``k`` largest logits of each row.

        Args:
            x: ``[R, V] float32`` processed logits (temperature and min-p applied).
            top_k: per row, <= 0 = off; every ``top_k`` that is on must be ``<= k``.
            top_p: per row, 1.0 = off.
            k: candidates per row (``V``: exact for every row).
        Returns:
            ``(vals [R, k], ids [R, k], covered)``: the candidates' logits in descending
            order with the cut ones at ``-inf``, their token ids, and per row whether that
            is exact. A row with top-p but no top-k is exact when its ``k`` candidates hold
            at least ``top_p`` of the probability mass (then every token past them is cut).
        """
        dev = x.device
        v = x.shape[1]
        vals, ids = x.topk(k, dim=-1, sorted=True) if k < v else x.sort(dim=-1, descending=True)
        kk = torch.tensor([t if t > 0 else v for t in top_k], device=dev).unsqueeze(1)
        ranks = torch.arange(vals.shape[1], device=dev).unsqueeze(0)
        vals = vals.masked_fill(ranks >= kk, float("-inf"))
        if all(p >= 1.0 for p in top_p):
            return vals, ids, [True] * len(top_k)
        p = torch.tensor(top_p, device=dev).unsqueeze(1)
        has_k = kk < v
        # probabilities under the top-k survivors, or under the whole row without top-k
        norm = torch.where(has_k, torch.logsumexp(vals, dim=-1, keepdim=True), torch.logsumexp(x, dim=-1, keepdim=True))
        probs = torch.exp(vals - norm)
        cum = probs.cumsum(dim=-1)
        cum_before = cum - probs  # mass strictly above each candidate: rank 0 is always kept
        # rows without top-p (p = 1) are never cut, even where the float32 sum rounds to 1 early
        vals = vals.masked_fill((cum_before >= p) & (p < 1.0), float("-inf"))
        covered = (has_k | (p >= 1.0) | (cum[:, -1:] >= p)).squeeze(1).tolist()
        return vals, ids, covered

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


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: ``probs [R, C]`` (rows sum to ~1, zeros allowed) and ``u [R]``
    in ``[0, 1)`` -> ``[R] int64``: per row the first column whose cumulative probability
    exceeds ``u`` times the row's total, which is never a zero-probability column."""
    cdf = probs.cumsum(dim=-1)
    target = (u.unsqueeze(1) * cdf[:, -1:]).contiguous()
    idx = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return idx.clamp(max=probs.shape[1] - 1)
