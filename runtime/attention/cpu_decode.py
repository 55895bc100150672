"""Paged decode attention on the CPU as a compiled C++ kernel (``csrc/paged_decode.cpp``).

The torch decode attention (:func:`.torch_paged.decode_attention`) gathers every
sequence's blocks into a dense ``[B, kv_heads, W * block_size, head_dim]`` tensor and
runs SDPA over it with a mask, so a batch reads ``B x`` the longest context twice (the
copy, then the attention). The kernel reads each sequence's own ``seq_len`` tokens in
place from the paged cache, once, with an online softmax in float32 (see the source's
header). Measured on this 2-core machine, bfloat16, 9 query / 3 KV heads of 64, block 16,
one layer: 32 sequences of 1-560 tokens (~9,700 tokens) 0.44-0.5 ms vs 1.7-2.0 ms for the
torch path; one sequence of 300 tokens 16 us vs 74 us.

Build and load: :mod:`argosy.runtime.cpu_kernels` (compiled on first use into
``$ARGOSY_CACHE_DIR/kernels/``; no compiler or a failed build: :func:`kernel` returns
None, one warning line, and callers keep the torch path).

It is registered as the op ``argosy::paged_decode_attention`` so that
``torch.compile`` keeps it as one opaque call inside the compiled decode step.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Optional

import torch

from .. import cpu_kernels, torch_ops

SOURCE = Path(__file__).parent / "csrc" / "paged_decode.cpp"
#: Query heads per KV head, head sizes and block sizes the kernel supports (else the torch path).
SUPPORTED_GROUPS = range(1, 9)
SUPPORTED_HEAD_DIMS = (64, 128)
MAX_BLOCK_SIZE = 64
_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}
#: FP8 caches (``--kv-cache-dtype``) the kernel widens as it reads them, with either query dtype.
_CACHE_DTYPES = {torch.float8_e4m3fn: "e4m3", torch.float8_e5m2: "e5m2"}


def _symbol(query_dtype: torch.dtype, cache_dtype: torch.dtype) -> str:
    q = _DTYPES[query_dtype]
    return f"argosy_paged_decode_attention_{q}" + ("" if cache_dtype == query_dtype else f"_{_CACHE_DTYPES[cache_dtype]}")


def _declare(lib: ctypes.CDLL) -> None:
    for q in _DTYPES:
        for c in (q, *_CACHE_DTYPES):
            fn = getattr(lib, _symbol(q, c))
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 7 + [ctypes.c_float]


def _install_op(lib: ctypes.CDLL) -> None:
    """The op's C++ implementation (:mod:`argosy.runtime.torch_ops`) calls this library's
    entry points (query float32 / bfloat16 x cache of the query's dtype / E4M3 / E5M2)."""
    def set_pointers(ops: ctypes.CDLL) -> None:
        for qi, q in enumerate((torch.float32, torch.bfloat16)):
            for ci, c in enumerate((q, *_CACHE_DTYPES)):
                ops.argosy_set_paged_decode_attention(qi, ci, torch_ops.function_pointer(getattr(lib, _symbol(q, c))))

    torch_ops.install("paged_decode_attention", set_pointers)


KERNEL = cpu_kernels.Kernel(SOURCE, "paged_decode", _declare, "the torch path", disabled=lambda: os.environ.get(
    "ARGOSY_ATTENTION_BACKEND", "auto").strip().lower() == "torch", on_load=_install_op)


def build(cache_dir: Optional[Path] = None) -> Path:
    """Compile the kernel (or find it compiled) and return the library's path
    (:func:`argosy.runtime.cpu_kernels.build`).

    Raises:
        RuntimeError: no C++ compiler, or the compiler failed or timed out.
        OSError: the cache directory cannot be written.
    """
    return KERNEL.build(cache_dir)


def kernel():
    """The loaded kernel library, building it on first call; None when it cannot be built
    (logged once) or ``ARGOSY_ATTENTION_BACKEND=torch`` asks for the torch path. Inside a
    ``torch.compile`` trace it only reports what an eager call decided before (the model
    runner builds it at startup, before any graph is traced)."""
    return KERNEL.library()


def supports(query: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    """True when the kernel handles these tensors: CPU, a float32/bfloat16 query and a cache
    of the same dtype or FP8 (E4M3/E5M2), ``query [B, H, D]``, a contiguous ``[2, blocks,
    block_size, KVH, D]`` cache, ``H / KVH`` in 1..8, head size 64 or 128, block size <= 64."""
    if query.device.type != "cpu" or query.dtype not in _DTYPES \
            or (kv_cache.dtype != query.dtype and kv_cache.dtype not in _CACHE_DTYPES):
        return False
    if query.dim() != 3 or kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or not kv_cache.is_contiguous() \
            or query.shape[-1] != kv_cache.shape[-1]:
        return False
    h, d = query.shape[-2], query.shape[-1]
    kvh, bs = kv_cache.shape[-2], kv_cache.shape[2]
    return h % kvh == 0 and h // kvh in SUPPORTED_GROUPS and d in SUPPORTED_HEAD_DIMS and bs <= MAX_BLOCK_SIZE


# Defined with ``torch.library.Library`` rather than ``torch.library.custom_op``: the latter
# wraps the call in autograd and dynamo-disable layers, ~38 us a call (measured), and a
# decode step makes one call per layer. Its CPU implementation is the C++ one of
# :mod:`argosy.runtime.torch_ops` once the kernel loads (~8 us a call less than the Python
# function below, which is the fallback and the reference of tests/test_torch_ops.py).
_LIBRARY = torch.library.Library("argosy", "FRAGMENT")
_LIBRARY.define("paged_decode_attention(Tensor query, Tensor kv_cache, Tensor block_tables, Tensor seq_lens, "
                "float scale) -> Tensor")


def paged_decode_attention(query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Decode attention read in place from the paged cache (same semantics as
    :func:`.torch_paged.decode_attention`; check :func:`supports` and :func:`kernel` first).
    The Python implementation of the op ``torch.ops.argosy.paged_decode_attention``, in
    place where the C++ one (:mod:`argosy.runtime.torch_ops`, same checks) is not.

    Args:
        query: ``[B, H, D]`` float32 or bfloat16.
        kv_cache: ``[2, num_blocks, block_size, KVH, D]``, contiguous, the query's dtype or
            FP8 (``float8_e4m3fn`` / ``float8_e5m2``, widened exactly as it is read).
        block_tables: ``[B, W]`` integer block ids.
        seq_lens: ``[B]`` context lengths in tokens (>= 1, at most ``W * block_size``).
        scale: softmax scale.
    Returns:
        ``[B, H, D]`` in the query's dtype.
    Raises:
        ValueError: a length needs more than ``W`` blocks or a block id is out of range
            (checked before anything is read), or the shapes are unsupported.
        RuntimeError: the kernel is not built (:func:`kernel` returned None).
    """
    lib = KERNEL.loaded or kernel()
    if lib is None:
        raise RuntimeError("the CPU paged decode attention kernel is not available")
    if not supports(query, kv_cache):
        raise ValueError(f"paged_decode_attention: unsupported query {tuple(query.shape)} {query.dtype} / KV cache "
                         f"{tuple(kv_cache.shape)} {kv_cache.dtype} (contiguous: {kv_cache.is_contiguous()})")
    if block_tables.dim() != 2 or block_tables.shape[0] != query.shape[0] or seq_lens.shape != (query.shape[0],):
        raise ValueError(f"paged_decode_attention: block_tables {tuple(block_tables.shape)} / seq_lens "
                         f"{tuple(seq_lens.shape)} do not match {query.shape[0]} sequences")
    q = query.contiguous()
    bt = (block_tables if block_tables.dtype == torch.int32 else block_tables.to(torch.int32)).contiguous()
    sl = (seq_lens if seq_lens.dtype == torch.int32 else seq_lens.to(torch.int32)).contiguous()
    out = torch.empty_like(q)
    b, h, d = q.shape
    _, nb, bs, kvh, _ = kv_cache.shape
    fn = getattr(lib, _symbol(q.dtype, kv_cache.dtype))
    rc = fn(q.data_ptr(), kv_cache.data_ptr(), bt.data_ptr(), sl.data_ptr(), out.data_ptr(),
            b, h, kvh, d, nb, bs, bt.shape[1], scale)
    if rc == 1:
        raise ValueError(f"paged_decode_attention: unsupported shape (H={h}, KVH={kvh}, D={d}, block={bs})")
    if rc == 2:
        raise ValueError("paged_decode_attention: a sequence length needs more blocks than its table row "
                         "holds, or a block id is out of range")
    return out


torch_ops.python_impl("paged_decode_attention", paged_decode_attention)


@torch.library.register_fake("argosy::paged_decode_attention")
def _(query, kv_cache, block_tables, seq_lens, scale):
    return torch.empty_like(query, memory_format=torch.contiguous_format)
