"""Sampler cost per step: Argosy's truncated-candidate sampler vs a full-vocabulary sort.

    python benchmarks/sampler.py                 # batch 32, the bundled model's vocabulary
    python benchmarks/sampler.py --batch 8 --vocab 128256

For each parameter mix, one step's logits (``--batch`` rows of ``--vocab`` float32,
drawn once with a seeded generator, scaled so the distribution is as peaked as a small
LM's: standard normal x ``--sharpness``) are sampled ``--iters`` times by

* ``argosy``: :class:`argosy.runtime.core.sampler.Sampler` (greedy rows argmax only,
  top-k / top-p from a ``topk`` candidate set, one uniform draw per row);
* ``full sort``: the textbook path (vLLM's PyTorch fallback ``apply_top_k_top_p`` does the
  same): sort every row, mask by rank and cumulative probability, softmax over the whole
  vocabulary, then an exponential race (``argmax(p / q)``, ``q ~ Exp(1)``).

Prints milliseconds per step for both and the ratio.
"""

from __future__ import annotations

import argparse
import time

import torch


def full_sort_sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                     gen: torch.Generator) -> torch.Tensor:
    """The baseline: ``[N, V]`` logits -> ``[N]`` tokens via a full sort."""
    if temperature == 0:
        return logits.argmax(-1)
    x = logits / temperature
    if top_k > 0 or top_p < 1.0:
        v = x.shape[1]
        s, idx = x.sort(dim=-1, descending=True)
        if top_k > 0:
            s = s.masked_fill(torch.arange(v).unsqueeze(0) >= top_k, float("-inf"))
        if top_p < 1.0:
            pr = torch.softmax(s, -1)
            s = s.masked_fill(pr.cumsum(-1) - pr >= top_p, float("-inf"))
        x = torch.empty_like(x).scatter_(1, idx, s)
    probs = torch.softmax(x, -1)
    q = torch.empty_like(probs).exponential_(generator=gen)
    return (probs / q).argmax(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=49152, help="default: SmolLM2's vocabulary")
    ap.add_argument("--sharpness", type=float, default=4.0)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()

    from argosy.runtime import SamplingParams
    from argosy.runtime.core.request import Request
    from argosy.runtime.core.sampler import Sampler

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(args.batch, args.vocab, generator=g) * args.sharpness
    mixes = [("greedy", dict(temperature=0.0)), ("temperature 1.0", dict(temperature=1.0)),
             ("top_p 0.9", dict(temperature=0.8, top_p=0.9)), ("top_k 50", dict(temperature=0.8, top_k=50)),
             ("top_k 50 + top_p 0.95", dict(temperature=0.8, top_k=50, top_p=0.95))]
    print(f"batch {args.batch}, vocab {args.vocab}, torch threads {torch.get_num_threads()}")
    print(f"{'parameters':<24}{'argosy ms':>11}{'full sort ms':>14}{'ratio':>8}")
    for name, kw in mixes:
        sampler = Sampler(args.vocab, seed=0)
        reqs = [Request(str(i), [1], SamplingParams(**kw), (0,), 16) for i in range(args.batch)]
        times = []
        for fn in (lambda: sampler(logits, reqs),
                   lambda: full_sort_sample(logits, kw["temperature"], kw.get("top_k", -1), kw.get("top_p", 1.0), g)):
            fn()
            t = time.perf_counter()
            for _ in range(args.iters):
                fn()
            times.append((time.perf_counter() - t) / args.iters * 1e3)
        print(f"{name:<24}{times[0]:>11.2f}{times[1]:>14.2f}{times[1] / times[0]:>7.1f}x")


if __name__ == "__main__":
    main()
