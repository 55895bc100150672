"""Quantized CPU layers with and without dense copies: time and bytes, side by side.

Builds the bundled model's 120 linear layers (30 x q/k/v, o, gate/up, down: 960 x 576,
576 x 576, 3072 x 576, 576 x 1536) from random quantized weights of one kind, twice: with
the dense bfloat16 copy kept beside each packed weight (``ARGOSY_CPU_DENSE_COPIES=keep``,
the layout before 2026-12-05) and without it (the default: calls of more than
``INT4_MAX_ROWS`` rows dequantize into a per-thread scratch matrix,
``runtime/quantization/dequant.py``). Then runs every layer once per pass, as a forward
pass does (the weights stream from memory, as in a real step), for several row counts, the
two variants interleaved, and prints the best of ``--reps`` passes of each and the bytes
each holds.

Kinds: ``int4`` (group 32, as GGUF Q4_0/Q4_1), ``int4-actorder`` (group 64 with a column
permutation, as GPTQ ``desc_act``), ``int8`` (per-row scales, a compressed-tensors int8 checkpoint served weight-only; W8A8
with int8 activations keeps no dense weight at all, :func:`argosy.runtime.quantization.int8.w8a8_linear`),
``q8`` (GGUF Q8_0: int8 with one float16 scale per 32).

    python benchmarks/dense_copies.py
    python benchmarks/dense_copies.py --kinds int4 --rows 16 2048 --reps 3
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]


def make_weight(kind: str, n: int, k: int, rng: np.random.Generator):
    from argosy.runtime.quantization.int4 import Int4Weight
    from argosy.runtime.quantization.int8 import Int8Weight
    from argosy.runtime.quantization.q8_0 import Q8Weight

    if kind in ("int4", "int4-actorder"):
        g = 32 if kind == "int4" else 64
        return Int4Weight(rng.integers(0, 16, (n, k), dtype=np.uint8),
                          (rng.random((n, k // g)) * 0.01).astype(np.float32),
                          (rng.random((n, k // g)) * 0.01 - 0.005).astype(np.float32), g,
                          rng.permutation(k) if kind == "int4-actorder" else None)
    if kind == "int8":
        return Int8Weight(torch.from_numpy(rng.integers(-127, 128, (n, k), dtype=np.int8)),
                          torch.from_numpy((rng.random(n) * 0.01).astype(np.float32)))
    return Q8Weight(rng.integers(-127, 128, (n, k), dtype=np.int8),
                    (rng.random((n, k // 32)) * 0.01).astype(np.float16), 32)


def build(kind: str, keep: bool, weights: list) -> list:
    from argosy.runtime.layers import linear

    linear.DENSE_COPIES = "keep" if keep else "scratch"
    layers = []
    for _ in range(30):
        for (n, k), w in zip(SHAPES, weights):
            lin = linear.Linear(n, k, False, torch.bfloat16, torch.device("cpu"))
            lin.load_quantized(0, w)
            layers.append(lin)
    return layers


def held_bytes(layers: list) -> int:
    return sum(t.numel() * t.element_size() for m in layers for t in (*m.parameters(), *m.buffers()))


def one_pass(layers: list, xs: dict) -> float:
    start = time.perf_counter()
    for lin in layers:
        lin(xs[lin.in_features])
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", nargs="+", default=["int4", "int4-actorder", "int8", "q8"],
                    choices=["int4", "int4-actorder", "int8", "q8"])
    ap.add_argument("--rows", nargs="+", type=int, default=[16, 32, 512, 2048])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    from argosy.runtime.layers import INT4_MAX_ROWS
    from argosy.runtime.quantization import dequant

    if dequant.kernel() is None:
        raise SystemExit("the C++ dequantization kernel cannot be built here (no compiler?)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, INT4_MAX_ROWS={INT4_MAX_ROWS}, "
          f"120 layers a pass, best of {args.reps} passes (ms)")
    print(f"{'kind':14s} {'rows':>5s} {'dense copies':>13s} {'scratch':>9s} {'ratio':>6s}")
    for kind in args.kinds:
        rng = np.random.default_rng(0)
        weights = [make_weight(kind, n, k, rng) for n, k in SHAPES]
        keep, lean = build(kind, True, weights), build(kind, False, weights)
        assert all(m.dense_on_demand for m in lean) and not any(m.dense_on_demand for m in keep)
        for rows in args.rows:
            gen = torch.Generator().manual_seed(rows)
            xs = {k: torch.randn(rows, k, generator=gen).to(torch.bfloat16) for k in (576, 1536)}
            one_pass(keep, xs)  # warm-up (the scratch is allocated once)
            one_pass(lean, xs)
            a, b = [], []
            for _ in range(args.reps):  # interleaved, so a slow moment of the machine hits both
                a.append(one_pass(keep, xs))
                b.append(one_pass(lean, xs))
            print(f"{kind:14s} {rows:5d} {min(a) * 1e3:13.1f} {min(b) * 1e3:9.1f} {min(b) / min(a):6.3f}", flush=True)
        print(f"{kind:14s} bytes held: dense copies {held_bytes(keep) / 2**20:.1f} MiB, "
              f"scratch {held_bytes(lean) / 2**20:.1f} MiB (+ {max(n * k for n, k in SHAPES) * 2 / 2**20:.1f} MiB "
              f"scratch matrix per thread)")
        del keep, lean


if __name__ == "__main__":
    main()
