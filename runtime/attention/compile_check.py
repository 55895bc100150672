"""Ahead-of-time compilation of the Triton kernels for NVIDIA GPUs, on a machine without one.

Triton compiles a kernel on its first launch on a GPU, so a kernel that the CPU
interpreter runs correctly can still fail there: an op the compiler rejects, a tile that
does not fit the architecture's shared memory, a constexpr combination never tried. This
module finds those failures on any Linux x86-64 machine:

1. :func:`record_launches` runs the Python wrappers of :mod:`.triton_kernels`
   (``store_kv``, ``paged_attention`` for mixed, decode-only and split-KV decode steps,
   ``rms_norm``, ``rotary_embedding``; and :func:`record_w4a16_launches`, the W4A16
   GEMM of :mod:`argosy.runtime.quantization.triton_w4a16`) on small CPU tensors shaped like a given model,
   with every kernel's launch replaced by a recorder and the wrappers' CUDA choices
   (16-bit ``tl.dot``) in force. So the recorded launches carry exactly the constexprs
   (tile sizes, GQA group, head_dim padding) the wrappers pick on a GPU.
2. :func:`compile_launch` specialises each launch as Triton's launcher does for a CUDA
   target (argument types, 16-byte divisibility of pointers and integers) and runs
   Triton's whole pipeline (TTIR, TTGIR, LLVM IR, PTX) and its bundled ``ptxas`` to a
   cubin for the requested compute capability, then reads registers per thread, local
   memory (register spills) and shared memory with the bundled ``cuobjdump -res-usage``.

What it shows: the kernels compile for that architecture with those constexprs, and
their shared memory fits it. What it does not: that they run correctly or fast (the
interpreter tests check the arithmetic, ``benchmarks/gpu_attention.py`` the speed).

Uses two internals of Triton's launcher (``triton.runtime.jit.create_function_from_signature``
and ``JITFunction._pack_args``; written against triton 3.9), so a Triton upgrade that
changes them makes this fail loudly rather than check something else.

    python -m argosy.runtime.attention.compile_check                          # sm_90, every shape, bf16
    python -m argosy.runtime.attention.compile_check --arch 80 --dtypes bf16,fp16 --shapes llama3-8b
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from .metadata import AttentionMetadata

#: Kernels of :mod:`.triton_kernels` (module attribute names).
KERNELS = (
    "_store_kv_kernel",
    "_paged_attention_kernel",
    "_paged_decode_split_kernel",
    "_combine_splits_kernel",
    "_rms_norm_kernel",
    "_rotary_kernel",
)

#: Largest shared memory one block may use, bytes (CUDA C++ Programming Guide, "Compute
#: Capabilities", Table 24: 163 KB on 8.0, 99 KB on 8.6/8.9, 227 KB on 9.0).
MAX_SHARED_BYTES = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
#: 32-bit registers per SM and resident warps per SM (same table; 48 warps on 8.6/8.9).
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = {80: 64, 86: 48, 89: 48, 90: 64}

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class ModelShape:
    """The attention/norm sizes of one model, per GPU (tensor-parallel size 1)."""

    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    #: MLP width (the W4A16 GEMM's gate/up and down shapes); 0: ``4 * hidden``
    intermediate: int = 0


#: Shapes the check covers: the bundled model, the common GQA ratios, and head_dim 256
#: (the kernels' upper limit).
SHAPES = {
    "smollm2-135m": ModelShape(heads=9, kv_heads=3, head_dim=64, hidden=576, intermediate=1536),  # GQA 3, bundled
    "llama3-8b": ModelShape(heads=32, kv_heads=8, head_dim=128, hidden=4096, intermediate=14336),  # GQA 4
    "qwen2.5-7b": ModelShape(heads=28, kv_heads=4, head_dim=128, hidden=3584, intermediate=18944),  # GQA 7
    "head-dim-256": ModelShape(heads=16, kv_heads=16, head_dim=256, hidden=4096),  # MHA at the head_dim limit
}


@dataclass
class Launch:
    """One recorded kernel launch: the kernel's Python function and its arguments."""

    name: str
    fn: object  # the undecorated Python function
    grid: tuple
    args: tuple
    kwargs: dict


@dataclass
class CompiledVariant:
    """A launch compiled to a cubin, with its resource usage.

    Attributes:
        name: kernel name. signature: Triton argument types (``constexpr`` for constexprs).
        constexprs: the compile-time values. num_warps: warps per program.
        shared_bytes: shared memory per program (bytes). registers: 32-bit registers
        per thread. spill_bytes: stack frame plus local memory per thread (bytes; > 0
        means registers spilled to slow local memory).
        cubin_bytes: size of the cubin.
    """

    name: str
    signature: dict
    constexprs: dict
    num_warps: int
    shared_bytes: int
    registers: int
    spill_bytes: int
    cubin_bytes: int

    def occupancy(self, arch: int) -> float:
        """Theoretical resident warps / maximum warps on one SM, limited by registers
        (allocated per warp in units of 256) and the warp maximum; shared memory is
        not limiting for these kernels (see :attr:`shared_bytes`)."""
        per_warp = -(-self.registers * 32 // 256) * 256
        blocks = REGS_PER_SM // (per_warp * self.num_warps) if per_warp else 32
        max_warps = MAX_WARPS_PER_SM.get(arch, 64)
        return min(blocks * self.num_warps, max_warps) / max_warps


class _Recorder:
    def __init__(self, name: str, kernel, sink: list[Launch]):
        self.name, self.fn, self.sink = name, kernel.fn, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append(Launch(self.name, self.fn, tuple(grid), args, dict(kwargs)))

        return launch


@contextlib.contextmanager
def recording(tk, kernels: tuple = KERNELS) -> Iterator[list[Launch]]:
    """Within the block, launches of the kernels ``kernels`` of module ``tk`` are
    recorded, not run, and the wrappers choose as they do for CUDA tensors (16-bit
    ``tl.dot`` operands)."""
    launches: list[Launch] = []
    saved = {name: getattr(tk, name) for name in kernels + ("_interpreting",)}
    try:
        for name in kernels:
            setattr(tk, name, _Recorder(name, saved[name], launches))
        tk._interpreting = lambda: False
        yield launches
    finally:
        for name, value in saved.items():
            setattr(tk, name, value)


def _step(shape: ModelShape, dtype: torch.dtype, block_size: int, seqs: list[tuple[int, int]]):
    """Random step tensors for ``seqs = [(cached, new)]`` on CPU: (q, k, v, kv_cache, meta)."""
    nblk = sum(-(-(c + n) // block_size) for c, n in seqs)
    tables, slots, seq_lens, qlens = [], [], [], []
    nxt = 0
    for c, n in seqs:
        k = -(-(c + n) // block_size)
        tables.append(list(range(nxt, nxt + k)))
        nxt += k
        slots += [tables[-1][p // block_size] * block_size + p % block_size for p in range(c, c + n)]
        seq_lens.append(c + n)
        qlens.append(n)
    t = len(slots)
    bt = torch.zeros(len(seqs), max(map(len, tables)), dtype=torch.int32)
    for i, tab in enumerate(tables):
        bt[i, : len(tab)] = torch.tensor(tab, dtype=torch.int32)
    qsl = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    qsl[1:] = torch.tensor(qlens).cumsum(0)
    nd = 0
    while nd < len(qlens) and qlens[nd] == 1:
        nd += 1
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64), block_tables=bt,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), query_start_loc=qsl,
        max_query_len=max(qlens), max_seq_len=max(seq_lens), num_decodes=nd,
        seq_lens_cpu=seq_lens, query_lens_cpu=qlens,
    )
    h, kvh, d = shape.heads, shape.kv_heads, shape.head_dim
    # q, k, v as views of one fused projection output, as the model passes them
    qkv = torch.zeros(t, h + 2 * kvh, d, dtype=dtype)
    cache = torch.zeros(2, nblk, block_size, kvh, d, dtype=dtype)
    return qkv[:, :h], qkv[:, h : h + kvh], qkv[:, h + kvh :], cache, meta


def record_launches(tk, shape: ModelShape, dtype: torch.dtype, block_size: int = 16,
                    kv_cache_dtype: Optional[torch.dtype] = None) -> list[Launch]:
    """The launches the wrappers of module ``tk`` make for one model shape and dtype:
    ``store_kv`` and ``paged_attention`` on a mixed step (decodes + prefill chunks), a
    decode-only step (one kernel) and a decode-only step split 4 ways (split kernel +
    combine), ``rms_norm`` with and without residual, ``rotary_embedding`` on the
    stacked q/k heads. ``kv_cache_dtype``: an FP8 cache (``--kv-cache-dtype fp8``)
    instead of the model dtype."""
    scale = shape.head_dim**-0.5
    with recording(tk) as launches:
        for seqs, splits in (([(40, 1), (7, 1), (0, 37), (20, 13)], None), ([(40, 1), (300, 1)], 1),
                             ([(40, 1), (300, 1)], 4)):
            q, k, v, cache, meta = _step(shape, dtype, block_size, seqs)
            if kv_cache_dtype is not None:
                cache = cache.to(kv_cache_dtype)
            tk.store_kv(k, v, cache, meta)
            tk.paged_attention(q, cache, meta, scale, num_splits=splits)
        x = torch.zeros(5, shape.hidden, dtype=dtype)
        w = torch.ones(shape.hidden, dtype=dtype)
        tk.rms_norm(x, w, 1e-5)
        tk.rms_norm(x, w, 1e-5, residual=x.clone())
        qk = torch.zeros(5, shape.heads + shape.kv_heads, shape.head_dim, dtype=dtype)
        cos = torch.zeros(64, shape.head_dim, dtype=dtype)
        tk.rotary_embedding(qk, torch.arange(5), cos, cos.clone(), out=qk)
    return launches


def record_w4a16_launches(shape: ModelShape, dtype: torch.dtype) -> list[Launch]:
    """The launches :func:`argosy.runtime.quantization.triton_w4a16.matmul` makes for the
    model's four linear shapes (fused q/k/v, o, fused gate/up, down) at 1, 16, 32, 64 and
    256 rows (every tile choice), group size 128 where the input width allows, else 64."""
    from ..quantization import triton_w4a16 as w4

    hidden, inter = shape.hidden, shape.intermediate or 4 * shape.hidden
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    layers = ((q + 2 * kv, hidden), (hidden, q), (2 * inter, hidden), (hidden, inter))
    with recording(w4, w4.KERNELS) as launches:
        for n, k in layers:
            g = 128 if k % 128 == 0 else 64
            qw = torch.zeros(k // 8, n, dtype=torch.int32)
            sz = torch.zeros(k // g, n, dtype=dtype)
            for m in (1, 16, 32, 64, 256):
                w4.matmul(torch.zeros(m, k, dtype=dtype), qw, sz, sz.clone(), g)
    return launches


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def resource_usage(cubin: bytes) -> dict[str, int]:
    """``REG``, ``SHARED``, ``LOCAL``, ``STACK`` of a single-kernel cubin, from ``cuobjdump
    -res-usage`` (Triton's bundled copy).

    Raises:
        RuntimeError: cuobjdump failed or printed no resource line.
    """
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res.stdout)
    if res.returncode or not m:
        raise RuntimeError(f"cuobjdump -res-usage failed: {res.stdout}{res.stderr}")
    return dict(zip(("REG", "STACK", "SHARED", "LOCAL"), map(int, m.groups())))


def compile_launch(launch: Launch, arch: int = 90) -> CompiledVariant:
    """Compile one recorded launch for ``sm_<arch>`` down to a cubin (no GPU needed).

    Raises:
        triton.compiler.errors.CompilationError (or another Triton/ptxas error): the
        kernel does not compile for that architecture with those arguments.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    jit = JITFunction(launch.fn)
    kwargs = dict(launch.kwargs, debug=False)
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
    kernel = triton.compile(ASTSource(jit, signature, constexprs, attrs), target=target, options=options.__dict__)
    cubin = kernel.asm["cubin"]
    usage = resource_usage(cubin)
    names = [p.name for p in jit.params]
    return CompiledVariant(
        name=launch.name.strip("_").removesuffix("_kernel"),
        signature=signature,
        constexprs={names[path[0]]: value for path, value in constexprs.items()},
        num_warps=kernel.metadata.num_warps,
        shared_bytes=max(kernel.metadata.shared, usage["SHARED"]),
        registers=usage["REG"],
        spill_bytes=usage["STACK"] + usage["LOCAL"],
        cubin_bytes=len(cubin),
    )


def variant_key(launch: Launch) -> tuple:
    """Launches with equal keys compile to the same kernel (same dtypes and constexprs)."""
    types = tuple(str(a.dtype) if isinstance(a, torch.Tensor) else type(a).__name__ for a in launch.args)
    return launch.name, types, tuple(sorted(launch.kwargs.items()))


def unique(launches: list[Launch]) -> list[Launch]:
    """``launches`` without repeats of the same :func:`variant_key`, in first-seen order."""
    seen, out = set(), []
    for launch in launches:
        key = variant_key(launch)
        if key not in seen:
            seen.add(key)
            out.append(launch)
    return out


def _describe(v: CompiledVariant) -> str:
    keys = ("QUERIES_PER_KV", "HEAD_DIM", "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_SIZE", "BLOCK", "BLOCK_H",
            "NUM_SPLITS", "HAS_RESIDUAL", "KV_FP8")
    return " ".join(f"{k}={v.constexprs[k]}" for k in keys if k in v.constexprs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, choices=sorted(MAX_SHARED_BYTES), help="compute capability x 10")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--dtypes", default="bf16", help="comma list of bf16, fp16, fp32")
    ap.add_argument("--block-size", type=int, default=16, help="KV cache block size (tokens)")
    args = ap.parse_args(argv)
    from . import triton_kernels as tk

    rows, failures = [], 0
    for shape_name in args.shapes.split(","):
        for dt in args.dtypes.split(","):
            launches = record_launches(tk, SHAPES[shape_name], _DTYPES[dt], args.block_size)
            if dt != "fp32":  # the W4A16 GEMM runs float16 / bfloat16 layers
                launches += record_w4a16_launches(SHAPES[shape_name], _DTYPES[dt])
            for launch in unique(launches):
                try:
                    v = compile_launch(launch, args.arch)
                except Exception as e:  # report every failing variant, not just the first
                    failures += 1
                    rows.append((shape_name, dt, launch.name, "FAILED", str(e).splitlines()[0][:80], "", "", "", ""))
                    continue
                fits = v.shared_bytes <= MAX_SHARED_BYTES[args.arch]
                failures += not fits
                rows.append((shape_name, dt, v.name, _describe(v), str(v.num_warps), str(v.registers),
                             str(v.spill_bytes), f"{v.shared_bytes}{'' if fits else ' (too big)'}",
                             f"{v.occupancy(args.arch):.0%}"))
    head = ("shape", "dtype", "kernel", "constexprs", "warps", "regs", "spill B", "shared B", "occupancy")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    print(f"Triton kernels compiled for sm_{args.arch} (cubin via ptxas; occupancy is theoretical, from registers)")
    for r in [head] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
