"""Paged decode attention on a CUDA GPU: Argosy's Triton kernel vs dense SDPA.

For each (context length, batch) the script builds a decode-only step (one query token
per sequence, every sequence at the same context) over a paged KV cache with scattered
blocks, times ``argosy.runtime.attention.triton_kernels.paged_attention`` with CUDA
events, and reports the achieved memory bandwidth (K, V, q and out bytes / time) as a
fraction of the device-to-device copy bandwidth measured at start-up (``2 x bytes /
time`` of a large ``Tensor.copy_``). Beside it: ``torch.nn.functional.
scaled_dot_product_attention`` on the equivalent dense, contiguous ``[B, H_kv, ctx, D]``
tensors (GQA through ``enable_gqa``), which is the non-paged baseline.

    python benchmarks/gpu_attention.py                            # defaults: Llama-3-8B shapes, bf16
    python benchmarks/gpu_attention.py --contexts 512,4096 --batches 1,64 --iters 50

Target (issue 4): long-context decode above 70% of the measured copy bandwidth.
Combinations whose tensors exceed ``--max-gib`` are skipped. Prints a table last.
"""

from __future__ import annotations

import argparse
import statistics


def _parse_ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def _time_ms(fn, iters: int, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` runs, timed with CUDA events."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def copy_bandwidth_gbs(gib: float = 1.0, iters: int = 20) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written per second)."""
    import torch

    n = int(gib * (1 << 30))
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), iters)
    del src, dst
    return 2 * n / (ms * 1e-3) / 1e9


def build_decode_step(batch: int, ctx: int, args, dtype):
    """Random paged cache + decode-only metadata; returns (q, kv_cache, meta, dense k, v)."""
    import torch

    from argosy.runtime.attention import AttentionMetadata

    dev = "cuda"
    bs = args.block_size
    nblk_seq = -(-ctx // bs)
    num_blocks = batch * nblk_seq
    kv_cache = torch.empty(2, num_blocks, bs, args.num_kv_heads, args.head_dim, dtype=dtype, device=dev).normal_()
    perm = torch.randperm(num_blocks, device=dev, dtype=torch.int64).to(torch.int32)
    block_tables = perm.view(batch, nblk_seq).contiguous()
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(batch, dtype=torch.int64, device=dev),
        block_tables=block_tables,
        seq_lens=seq_lens,
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=dev),
        max_query_len=1,
        max_seq_len=ctx,
        num_decodes=batch,
        seq_lens_cpu=[ctx] * batch,
        query_lens_cpu=[1] * batch,
    )
    q = torch.randn(batch, args.num_heads, args.head_dim, dtype=dtype, device=dev)
    return q, kv_cache, meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="512,2048,8192,32768", help="comma-separated context lengths")
    ap.add_argument("--batches", default="1,16,64,256", help="comma-separated batch sizes")
    ap.add_argument("--num-heads", type=int, default=32)
    ap.add_argument("--num-kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--max-gib", type=float, default=None,
                    help="skip combinations needing more memory (default: 80%% of free memory)")
    ap.add_argument("--no-sdpa", action="store_true", help="skip the dense SDPA baseline")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        raise SystemExit("gpu_attention.py needs a CUDA device")
    from argosy.runtime.attention import triton_kernels as tk

    dtype = getattr(torch, args.dtype)
    el = torch.tensor([], dtype=dtype).element_size()
    free, total = torch.cuda.mem_get_info()
    budget = (args.max_gib * (1 << 30)) if args.max_gib else 0.8 * free
    copy_bw = copy_bandwidth_gbs()
    scale = args.head_dim**-0.5
    print(f"device: {torch.cuda.get_device_name()}, {total / 2**30:.0f} GiB; d2d copy bandwidth {copy_bw:.0f} GB/s")
    print(f"shapes: H={args.num_heads} H_kv={args.num_kv_heads} D={args.head_dim} block_size={args.block_size} {args.dtype}")

    rows = []
    for ctx in _parse_ints(args.contexts):
        for batch in _parse_ints(args.batches):
            kv_bytes = 2 * batch * ctx * args.num_kv_heads * args.head_dim * el
            need = kv_bytes * (1 if args.no_sdpa else 3)  # gather + contiguous copies for SDPA
            if need > budget:
                rows.append((ctx, batch, None, None, None, None, None))
                continue
            q, kv_cache, meta = build_decode_step(batch, ctx, args, dtype)
            out = torch.empty_like(q)
            moved = kv_bytes + 2 * q.numel() * el
            ms = _time_ms(lambda: tk.paged_attention(q, kv_cache, meta, scale, out=out), args.iters)
            bw = moved / (ms * 1e-3) / 1e9
            sdpa_ms = sdpa_bw = None
            if not args.no_sdpa:
                # the same context as dense [B, H_kv, ctx, D] tensors
                k = kv_cache[0][meta.block_tables.long()].reshape(batch, -1, args.num_kv_heads, args.head_dim)
                k = k[:, :ctx].transpose(1, 2).contiguous()
                v = kv_cache[1][meta.block_tables.long()].reshape(batch, -1, args.num_kv_heads, args.head_dim)
                v = v[:, :ctx].transpose(1, 2).contiguous()
                qd = q.view(batch, args.num_heads, 1, args.head_dim)
                ref = F.scaled_dot_product_attention(qd, k, v, scale=scale, enable_gqa=True)
                err = (ref.view_as(out).float() - tk.paged_attention(q, kv_cache, meta, scale).float()).abs().max().item()
                if err > 5e-2:
                    print(f"WARNING: ctx {ctx} batch {batch}: max |ours - sdpa| = {err:.3g}")
                sdpa_ms = _time_ms(lambda: F.scaled_dot_product_attention(qd, k, v, scale=scale, enable_gqa=True),
                                   args.iters)
                sdpa_bw = moved / (sdpa_ms * 1e-3) / 1e9
                del k, v, qd, ref
            rows.append((ctx, batch, ms, bw, bw / copy_bw, sdpa_ms, sdpa_bw))
            del q, kv_cache, meta, out
            torch.cuda.empty_cache()

    print()
    print(f"{'context':>8}{'batch':>7}{'ours us':>10}{'ours GB/s':>11}{'% copy':>8}{'sdpa us':>10}{'sdpa GB/s':>11}")
    for ctx, batch, ms, bw, frac, sms, sbw in rows:
        if ms is None:
            print(f"{ctx:>8}{batch:>7}{'skipped (memory)':>25}")
            continue
        s_us = f"{sms * 1e3:>10.1f}" if sms is not None else f"{'-':>10}"
        s_bw = f"{sbw:>11.0f}" if sbw is not None else f"{'-':>11}"
        print(f"{ctx:>8}{batch:>7}{ms * 1e3:>10.1f}{bw:>11.0f}{frac * 100:>7.0f}%{s_us}{s_bw}")
    print(f"(copy bandwidth {copy_bw:.0f} GB/s; target: > 70% at long context)")


if __name__ == "__main__":
    main()
