"""Sampler semantics on synthetic logits (no model)."""

from __future__ import annotations

import math

import pytest
import torch

from argosy.runtime import SamplingParams
from argosy.runtime.core.request import Request
from argosy.runtime.core.sampler import Sampler

V = 8


def _req(sp, prompt=(0,), out=()):
    r = Request("r", list(prompt), sp, eos_token_ids=(7,), max_tokens=100)
    for t in out:
        r.append_output_token(t)
    return r


def test_greedy_is_argmax_per_row():
    s = Sampler(V)
    logits = torch.randn(5, V)
    reqs = [_req(SamplingParams(temperature=0)) for _ in range(5)]
    assert s(logits, reqs).token_ids == logits.argmax(-1).tolist()


def test_top_k_1_and_tiny_top_p_are_greedy():
    s = Sampler(V, seed=3)
    logits = torch.randn(4, V)
    reqs = [_req(SamplingParams(temperature=1.5, top_k=1)), _req(SamplingParams(temperature=1.0, top_p=1e-6)),
            _req(SamplingParams(temperature=1.0, min_p=1.0)), _req(SamplingParams(temperature=0))]
    for _ in range(20):
        assert s(logits, reqs).token_ids == logits.argmax(-1).tolist()


def test_sampling_follows_the_distribution():
    s = Sampler(V, seed=0)
    probs = torch.tensor([0.5, 0.3, 0.2, 0, 0, 0, 0, 0])
    logits = probs.clamp_min(1e-12).log().expand(4000, V).contiguous()
    reqs = [_req(SamplingParams(temperature=1.0))] * 4000
    counts = torch.bincount(torch.tensor(s(logits, reqs).token_ids), minlength=V).float() / 4000
    assert torch.allclose(counts[:3], probs[:3], atol=0.03)
    assert counts[3:].sum() == 0


def test_top_p_cuts_the_tail():
    s = Sampler(V, seed=0)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0, 0, 0, 0])
    logits = probs.clamp_min(1e-12).log().expand(2000, V).contiguous()
    toks = s(logits, [_req(SamplingParams(top_p=0.75))] * 2000).token_ids
    assert set(toks) == {0, 1}


def test_top_k_keeps_k():
    s = Sampler(V, seed=0)
    logits = torch.arange(V, dtype=torch.float32).expand(2000, V).contiguous()
    toks = s(logits, [_req(SamplingParams(top_k=2))] * 2000).token_ids
    assert set(toks) == {6, 7}


def test_seeded_rows_do_not_depend_on_batch():
    """A row with a ``seed`` draws its noise from its own generator: over many steps on a
    realistic vocabulary (nearly flat, so two independent draws almost never agree), its
    tokens are the same alone and inside batches of changing size, position and
    neighbours (unseeded, greedy, top-k/top-p/min-p, other seeds, the same seed), whatever
    the shared generator's seed. A sampler that drew seeded rows from the shared generator
    (or from any noise laid out per batch) would match on all steps with probability
    about (sum p^2)^steps, i.e. never."""
    vocab, steps = 32000, 40
    g = torch.Generator().manual_seed(0)
    step_logits = torch.randn(steps, vocab, generator=g)
    assert (torch.softmax(step_logits, -1) ** 2).sum(-1).max() < 1e-3  # a repeat by chance: < 1 in 1000
    sp = SamplingParams(temperature=1.0, seed=42)
    alone_sampler, batch_sampler = Sampler(vocab, seed=1), Sampler(vocab, seed=2)
    alone_req, batch_req, twin_req = _req(sp), _req(sp), _req(sp)
    other_req = _req(SamplingParams(temperature=1.0, seed=43))
    neighbours = [SamplingParams(temperature=1.0), SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_k=50),
                  SamplingParams(temperature=1.3, top_p=0.9), SamplingParams(temperature=1.0, min_p=0.05, seed=7)]
    alone, batched, twin, other = [], [], [], []
    for t in range(steps):
        alone.append(alone_sampler(step_logits[t : t + 1], [alone_req]).token_ids[0])
        # 2..6 rows; the seeded row moves; neighbours (and their logits) change every step
        n_others = 1 + t % 5
        rows = [(_req(neighbours[(t + j) % len(neighbours)]), torch.randn(vocab, generator=g)) for j in range(n_others)]
        pos = t % (n_others + 1)
        rows.insert(pos, (batch_req, step_logits[t]))
        rows.append((twin_req, step_logits[t]))  # the same seed twice in one batch
        rows.append((other_req, step_logits[t]))
        out = batch_sampler(torch.stack([lg for _, lg in rows]), [r for r, _ in rows]).token_ids
        batched.append(out[pos])
        twin.append(out[-2])
        other.append(out[-1])
    assert len(set(alone)) > steps // 2, "the seeded row was meant to be sampled, not greedy"
    assert batched == alone, "a seeded row's tokens depend on the batch it is in"
    assert twin == alone, "two rows with the same seed in one batch must draw the same tokens"
    assert sum(a == b for a, b in zip(other, alone)) <= 2, "a different seed must give different draws"
    # and a fresh request with the same seed replays the sequence on yet another sampler
    fresh, s3 = _req(sp), Sampler(vocab, seed=3)
    assert [s3(step_logits[t : t + 1], [fresh]).token_ids[0] for t in range(steps)] == alone


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    """OpenAI/vLLM presence/frequency penalties: ``logit - frequency * count - presence * (count > 0)``
    where ``count`` is the token's count in the OUTPUT so far (prompt tokens do not count).
    Each case has a margin of 0.05 or more, and flips if a term is dropped, if presence
    scaled with the count, or if prompt tokens were counted. Checked row by row and as
    one batch with mixed parameters."""
    def row(*head):
        return torch.tensor([*head, *([-3.0] * (V - len(head)))])

    pres, freq = SamplingParams(temperature=0, presence_penalty=0.2), SamplingParams(temperature=0, frequency_penalty=0.1)
    cases = {  # name: (logits, params, prompt, output, expected argmax)
        "presence, nothing generated": (row(1.0, 0.9), pres, (3,), (), 0),
        "presence applies": (row(1.0, 0.9), pres, (3,), (0,), 1),  # 1.0 - 0.2 = 0.8 < 0.9
        "presence does not scale with the count": (row(1.0, 0.7), pres, (3,), (0, 0, 0), 0),  # 0.8 > 0.7
        "presence ignores the prompt (rival)": (row(1.0, 0.9), pres, (1, 1, 1), (0,), 1),  # else 0.7 < 0.8
        "presence ignores the prompt": (row(1.0, 0.9), pres, (0, 0, 0), (), 0),  # else 0.8 < 0.9
        "negative presence boosts": (row(0.9, 1.0), SamplingParams(temperature=0, presence_penalty=-0.2), (3,), (0,), 0),
        "frequency x2": (row(2.0, 1.75), freq, (3,), (0, 0), 0),  # 2.0 - 2 * 0.1 = 1.8 > 1.75
        "frequency x3": (row(2.0, 1.75), freq, (3,), (0, 0, 0), 1),  # 2.0 - 3 * 0.1 = 1.7 < 1.75
        "frequency ignores the prompt (rival)": (row(2.0, 1.75), freq, (1,), (0, 0, 0), 1),  # else 1.65 < 1.7
        "frequency ignores the prompt": (row(2.0, 1.75), freq, (0, 0), (0,), 0),  # 1.9 (else 1.7 < 1.75)
        # both terms add: 2.0 - 0.2 - 0.05 = 1.75 < 1.78; without presence 1.8, without frequency 1.95
        "presence + frequency": (row(2.0, 1.78), SamplingParams(temperature=0, frequency_penalty=0.1,
                                                                presence_penalty=0.05), (3,), (0, 0), 1),
        "no penalties in this row": (row(2.0, 1.78), SamplingParams(temperature=0), (3,), (0, 0), 0),
    }
    s = Sampler(V)
    reqs = [_req(sp, prompt=prompt, out=out) for _, sp, prompt, out, _ in cases.values()]
    expected = [e for *_, e in cases.values()]
    alone = [s(lg[None], [r]).token_ids[0] for (lg, *_), r in zip(cases.values(), reqs)]
    batched = s(torch.stack([lg for lg, *_ in cases.values()]), reqs).token_ids
    for got in (alone, batched):
        wrong = [name for name, g, e in zip(cases, got, expected) if g != e]
        assert not wrong, f"wrong argmax after penalties: {wrong}"


def test_repetition_penalty_counts_prompt_and_output():
    """CTRL repetition penalty: positive logits of tokens seen in the prompt OR the output
    are divided by the penalty, negative ones multiplied."""
    s = Sampler(V)
    logits = torch.tensor([[2.0, 1.9, -1.0, 0, 0, 0, 0, 0]])
    rep = SamplingParams(temperature=0, repetition_penalty=1.2)
    assert s(logits, [_req(rep, prompt=(0,))]).token_ids == [1]  # 2.0 / 1.2 < 1.9
    assert s(logits, [_req(rep, prompt=(5,), out=(0,))]).token_ids == [1]
    assert s(logits, [_req(rep, prompt=(5,))]).token_ids == [0]
    neg = torch.tensor([[-1.0, -1.1, -5.0, -5.0, -5.0, -5.0, -5.0, -5.0]])
    assert s(neg, [_req(rep, prompt=(0,))]).token_ids == [1]  # -1.0 * 1.2 < -1.1 (dividing would keep 0)


def test_min_tokens_masks_eos_and_stop_ids():
    s = Sampler(V)
    logits = torch.zeros(1, V)
    logits[0, 7] = 10.0  # EOS
    logits[0, 6] = 9.0   # a stop token id
    r = _req(SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[6]))
    assert s(logits, [r]).token_ids == [0]
    r = _req(SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[6]), out=(1, 1))
    assert s(logits, [r]).token_ids == [7]


def test_logprobs_are_raw_log_softmax():
    """Returned log-probs are those of the raw model distribution, before penalties,
    temperature, top-k/top-p/min-p: each row's raw most likely tokens were generated
    already, so the processed distribution differs from the raw one, and the test checks
    the returned values against both."""
    vocab = 64
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, vocab, generator=g) * 2
    order = logits.argsort(dim=-1, descending=True).tolist()
    params = [
        SamplingParams(temperature=0.5, top_k=3, presence_penalty=1.5, frequency_penalty=1.0, logprobs=5, seed=1),
        SamplingParams(temperature=0, presence_penalty=2.0, repetition_penalty=2.0, logprobs=3),
        SamplingParams(temperature=1.7, top_p=0.6, min_p=0.05, frequency_penalty=0.8, logprobs=0, seed=2),
        SamplingParams(temperature=0.8, top_k=4),  # no logprobs asked
    ]
    reqs = [_req(sp, prompt=(order[i][3],), out=(order[i][0], order[i][0], order[i][1])) for i, sp in enumerate(params)]
    out = Sampler(vocab, seed=0)(logits, reqs)

    raw = torch.log_softmax(logits, -1)
    # the processed distribution, computed here independently of the sampler
    processed = []
    for i, sp in enumerate(params):
        x = logits[i].clone()
        counts = torch.bincount(torch.tensor(reqs[i].output_token_ids), minlength=vocab).float()
        if sp.repetition_penalty != 1.0:
            seen = counts > 0
            seen[reqs[i].prompt_token_ids] = True
            x = torch.where(seen, torch.where(x > 0, x / sp.repetition_penalty, x * sp.repetition_penalty), x)
        x = x - sp.frequency_penalty * counts - sp.presence_penalty * (counts > 0).float()
        if sp.temperature > 0:
            x = x / sp.temperature
        if sp.min_p > 0:
            x = x.masked_fill(torch.softmax(x, -1) < sp.min_p * torch.softmax(x, -1).max(), float("-inf"))
        if sp.top_k > 0:
            x = x.masked_fill(x < x.topk(sp.top_k).values[-1], float("-inf"))
        if sp.top_p < 1.0:
            probs, idx = torch.softmax(x, -1).sort(descending=True)
            x[idx[probs.cumsum(-1) - probs >= sp.top_p]] = float("-inf")
        processed.append(torch.log_softmax(x, -1))

    assert out.logprobs[3] is None
    for i in range(3):
        tok = out.token_ids[i]
        lp, top = out.logprobs[i]
        k = params[i].logprobs
        assert math.isclose(lp, raw[i, tok].item(), rel_tol=1e-5, abs_tol=1e-6), \
            f"row {i}: log-prob {lp} is not the raw log_softmax {raw[i, tok].item()}"
        assert processed[i][tok] > float("-inf")  # (the reference agrees with what was sampled)
        assert abs(lp - processed[i][tok].item()) > 0.05, f"row {i}: log-prob of the processed distribution"
        assert [t for t, _ in top] == (raw[i].topk(k).indices.tolist() if k else [])
        for t, v in top:
            assert math.isclose(v, raw[i, t].item(), rel_tol=1e-5, abs_tol=1e-6)
    # the greedy row picked the processed argmax, yet its top-1 log-prob is still the raw argmax
    assert out.token_ids[1] == processed[1].argmax().item() != order[1][0]
    assert out.logprobs[1][1][0][0] == order[1][0]


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_p=0), dict(top_k=-5), dict(max_tokens=0),
                                dict(n=0), dict(min_tokens=5, max_tokens=2), dict(logprobs=50), dict(stop=[""]),
                                dict(presence_penalty=3)])
def test_invalid_params(kw):
    with pytest.raises(ValueError):
        SamplingParams(**kw)


def _reference_keep(row: torch.Tensor, top_k: int, top_p: float) -> set[int]:
    """Kept token ids under top-k then top-p, from a full sort in float64 (the oracle)."""
    order = torch.argsort(row.double(), descending=True)
    vals = row.double()[order]
    k = top_k if top_k > 0 else len(order)
    vals, order = vals[:k], order[:k]
    probs = torch.softmax(vals, dim=0)
    before = torch.cumsum(probs, 0) - probs
    keep = before < top_p if top_p < 1.0 else torch.ones_like(before, dtype=torch.bool)
    return set(order[keep].tolist())


def test_truncated_candidates_match_a_full_sort(monkeypatch):
    """Top-k / top-p from a truncated candidate set keep exactly the tokens a full sort
    keeps, also for nuclei wider than the first and the second round of candidates."""
    import argosy.runtime.core.sampler as sampler_mod

    monkeypatch.setattr(sampler_mod, "TOP_P_CANDIDATES", 8)
    vocab = 3000
    g = torch.Generator().manual_seed(0)
    sharp = torch.randn(vocab, generator=g) * 6      # nucleus of a few tokens
    medium = torch.randn(vocab, generator=g) * 2.5   # tens to hundreds
    flat = torch.randn(vocab, generator=g) * 0.3     # thousands: needs the full sort
    narrow = [(sharp, -1, 0.9), (medium, -1, 0.9), (flat, -1, 0.95), (flat, -1, 0.5), (medium, 40, 0.8),
              (sharp, 5, 1.0), (medium, -1, 0.999), (flat, 3, 0.3)]
    # 8 -> 128 -> full sort; with a top-k of 200 in the batch: 200 -> full sort
    for rows, rounds in ((narrow, 3), (narrow + [(flat, 200, 0.99), (medium, 200, 0.5)], 2)):
        x = torch.stack([r[0] for r in rows])
        groups = Sampler._candidates(x, [r[1] for r in rows], [r[2] for r in rows])
        assert len(groups) == rounds
        seen = []
        for idx, vals, ids in groups:
            for j, i in enumerate(idx):
                kept = set(ids[j][vals[j] > float("-inf")].tolist())
                want = _reference_keep(x[i], rows[i][1], rows[i][2])
                assert kept == want, f"row {i}: {len(kept)} kept, the full sort keeps {len(want)}"
                seen.append(i)
        assert sorted(seen) == list(range(len(rows)))


def test_sampling_from_a_wide_nucleus_follows_the_distribution(monkeypatch):
    """A nucleus wider than the first candidate round is sampled with the probabilities
    of the full distribution (renormalized over the nucleus), compared in ten
    probability-mass bins against the float64 reference."""
    import argosy.runtime.core.sampler as sampler_mod

    monkeypatch.setattr(sampler_mod, "TOP_P_CANDIDATES", 8)
    vocab, n = 300, 20000
    logits = torch.linspace(3.0, -3.0, vocab)  # token i is the i-th most likely
    keep = _reference_keep(logits, -1, 0.9)
    assert len(keep) > 64
    probs = torch.softmax(logits.double(), 0)
    probs[len(keep):] = 0
    probs /= probs.sum()
    toks = Sampler(vocab, seed=0)(logits.expand(n, vocab).contiguous(),
                                  [_req(SamplingParams(temperature=1.0, top_p=0.9))] * n).token_ids
    assert max(toks) < len(keep), "a token outside the nucleus was drawn"
    counts = torch.bincount(torch.tensor(toks), minlength=vocab).double() / n
    edges = torch.searchsorted(torch.cumsum(probs, 0), torch.linspace(0.1, 1.0, 10, dtype=torch.float64))
    lo = 0
    for hi in (edges.clamp(max=vocab - 1) + 1).tolist():
        assert abs(counts[lo:hi].sum() - probs[lo:hi].sum()) < 0.02, (lo, hi)
        lo = hi


def test_allowed_token_ids_and_bad_words():
    """allowed_token_ids keeps only those tokens; a bad word's last token is banned only
    after the rest of it (a one-token word always); bans that would leave no allowed
    token are dropped for that row instead of sampling from nothing."""
    s = Sampler(V)
    logits = torch.arange(V, dtype=torch.float32).repeat(4, 1)  # argmax 7, then 6, 5...
    reqs = [
        _req(SamplingParams(temperature=0, allowed_token_ids=[1, 3])),
        _req(SamplingParams(temperature=0, ignore_eos=True, bad_words_token_ids=[[6], [2, 5]]), out=(4,)),
        _req(SamplingParams(temperature=0, ignore_eos=True, bad_words_token_ids=[[2, 6], [7]]), out=(2,)),
        _req(SamplingParams(temperature=0, min_tokens=2, allowed_token_ids=[7])),
    ]
    assert s(logits, reqs).token_ids == [3, 7, 5, 7]
    reqs[1].append_output_token(2)  # now ends with 2: the word [2, 5] bans 5 too
    assert s(logits[1:2], reqs[1:2]).token_ids == [7]
    assert s(logits[1:2], [_req(SamplingParams(temperature=0, ignore_eos=True, bad_words_token_ids=[[7], [6]]),
                                out=(2,))]).token_ids == [5]
    for _ in range(10):  # sampled rows respect the mask too
        sampled = s(torch.randn(1, V), [_req(SamplingParams(temperature=1.0, allowed_token_ids=[0, 2]))])
        assert sampled.token_ids[0] in (0, 2)
    with pytest.raises(ValueError, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=[])
