"""Paged decode attention on the CPU as a compiled C++ kernel (``csrc/paged_decode.cpp``).

The torch decode attention (:func:`.torch_paged.decode_attention`) gathers every
sequence's blocks into a dense ``[B, kv_heads, W * block_size, head_dim]`` tensor and
runs SDPA over it with a mask, so a batch reads ``B x`` the longest context twice (the
copy, then the attention). The kernel reads each sequence's own ``seq_len`` tokens in
place from the paged cache, once, with an online softmax in float32 (see the source's
header). Measured on this 2-core machine, bfloat16, 9 query / 3 KV heads of 64, block 16,
one layer: 32 sequences of 1-560 tokens (~9,700 tokens) 0.44-0.5 ms vs 1.7-2.0 ms for the
torch path; one sequence of 300 tokens 16 us vs 74 us.

Build: on first use the source is compiled with the C++ compiler inductor uses
(``$CXX``, else ``g++``), ``-O3 -fopenmp`` and the vector ISA flags inductor picked for
this CPU, into ``$ARGOSY_CACHE_DIR/kernels/`` (keyed by source, flags and compiler), and
loaded with ``ctypes``; its OpenMP calls bind to the runtime torch already loaded (one
thread pool). If there is no compiler or the build fails, :func:`kernel` returns None
(one warning line) and callers keep the torch path.

It is registered as the op ``argosy::paged_decode_attention`` so that
``torch.compile`` keeps it as one opaque call inside the compiled decode step.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional

import torch

from ..cache_dirs import argosy_cache_root, inductor_vec_isa

logger = logging.getLogger("argosy.attention")

SOURCE = Path(__file__).parent / "csrc" / "paged_decode.cpp"
#: Query heads per KV head, head sizes and block sizes the kernel supports (else the torch path).
SUPPORTED_GROUPS = range(1, 9)
SUPPORTED_HEAD_DIMS = (64, 128)
MAX_BLOCK_SIZE = 64
_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}

_lock = threading.Lock()
_lib = None
_tried = False


def _compiler() -> Optional[str]:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _isa_flags() -> list[str]:
    isa = inductor_vec_isa()  # the ISA inductor's compiled graphs use too
    return isa.build_arch_flags().split() if isa else []  # none: portable code, no ISA flags


def build(cache_dir: Optional[Path] = None) -> Path:
    """Compile the kernel (or find it already compiled) and return the shared library's path.

    Libraries of other sources, compilers or flags are left in place (a cache directory
    may be shared by machines with different CPUs or compilers).

    Raises:
        RuntimeError: no C++ compiler, or the compiler failed or timed out (its stderr in
            the message).
        OSError: the cache directory cannot be created or written.
    """
    cxx = _compiler()
    if not cxx:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    # -fassociative-math (with the two flags it needs) lets the dot products end in a tree
    # of vector adds instead of a serial chain of scalar ones (0.73 -> 0.49 ms a layer at
    # batch 32, measured). Not -ffast-math: it would also link crtfastmath, which turns on
    # flush-to-zero for the whole process.
    flags = ["-O3", "-shared", "-fPIC", "-fopenmp", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
             "-fno-trapping-math", *_isa_flags()]
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except OSError as e:
        raise RuntimeError(f"C++ compiler {cxx!r} cannot run: {e}") from None
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cxx, version, *flags]).encode()).hexdigest()[:16]
    out_dir = Path(cache_dir) if cache_dir else argosy_cache_root() / "kernels"
    lib = out_dir / f"paged_decode-{key}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        try:
            res = subprocess.run([cxx, *flags, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{cxx} took more than 300 s") from None
        if res.returncode != 0:
            raise RuntimeError(f"{cxx} failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
        os.replace(tmp, lib)  # atomic: concurrent builders never load a half-written file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def kernel():
    """The loaded kernel library, building it on first call; None when it cannot be built
    (logged once) or ``ARGOSY_ATTENTION_BACKEND=torch`` asks for the torch path. Inside a
    ``torch.compile`` trace it only reports what an eager call decided before (the model
    runner builds it at startup, before any graph is traced)."""
    global _lib, _tried
    if torch.compiler.is_compiling():  # traced code: decided before (the model runner builds it at startup)
        return _lib
    if os.environ.get("ARGOSY_ATTENTION_BACKEND", "auto").strip().lower() == "torch":
        return None
    with _lock:
        if not _tried:
            _tried = True
            try:
                lib = ctypes.CDLL(str(build()))
                for name in ("f32", "bf16"):
                    fn = getattr(lib, f"argosy_paged_decode_attention_{name}")
                    fn.restype = ctypes.c_int
                    fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 7 + [ctypes.c_float]
                _lib = lib
            except Exception as e:  # noqa: BLE001 - any build/load problem means: keep the torch path
                logger.warning("CPU paged decode attention kernel unavailable, using the torch path: %s",
                               str(e).splitlines()[0] if str(e) else type(e).__name__)
    return _lib


def supports(query: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    """True when the kernel handles these tensors: CPU, float32/bfloat16 (both the same),
    ``query [B, H, D]``, a contiguous ``[2, blocks, block_size, KVH, D]`` cache, ``H / KVH``
    in 1..8, head size 64 or 128, block size <= 64."""
    if query.device.type != "cpu" or query.dtype not in _DTYPES or kv_cache.dtype != query.dtype:
        return False
    if query.dim() != 3 or kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or not kv_cache.is_contiguous() \
            or query.shape[-1] != kv_cache.shape[-1]:
        return False
    h, d = query.shape[-2], query.shape[-1]
    kvh, bs = kv_cache.shape[-2], kv_cache.shape[2]
    return h % kvh == 0 and h // kvh in SUPPORTED_GROUPS and d in SUPPORTED_HEAD_DIMS and bs <= MAX_BLOCK_SIZE


# Defined with ``torch.library.Library`` rather than ``torch.library.custom_op``: the latter
# wraps the call in autograd and dynamo-disable layers, ~38 us a call against ~4 us here
# (measured), and a decode step makes one call per layer.
_LIBRARY = torch.library.Library("argosy", "DEF")
_LIBRARY.define("paged_decode_attention(Tensor query, Tensor kv_cache, Tensor block_tables, Tensor seq_lens, "
                "float scale) -> Tensor")


def paged_decode_attention(query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Decode attention read in place from the paged cache (same semantics as
    :func:`.torch_paged.decode_attention`; check :func:`supports` and :func:`kernel` first).
    The CPU implementation of the op ``torch.ops.argosy.paged_decode_attention``.

    Args:
        query: ``[B, H, D]`` float32 or bfloat16.
        kv_cache: ``[2, num_blocks, block_size, KVH, D]``, contiguous, the query's dtype.
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
    lib = _lib if _lib is not None else kernel()
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
    fn = lib.argosy_paged_decode_attention_bf16 if q.dtype == torch.bfloat16 else lib.argosy_paged_decode_attention_f32
    rc = fn(q.data_ptr(), kv_cache.data_ptr(), bt.data_ptr(), sl.data_ptr(), out.data_ptr(),
            b, h, kvh, d, nb, bs, bt.shape[1], scale)
    if rc == 1:
        raise ValueError(f"paged_decode_attention: unsupported shape (H={h}, KVH={kvh}, D={d}, block={bs})")
    if rc == 2:
        raise ValueError("paged_decode_attention: a sequence length needs more blocks than its table row "
                         "holds, or a block id is out of range")
    return out


_LIBRARY.impl("paged_decode_attention", paged_decode_attention, "CPU")


@torch.library.register_fake("argosy::paged_decode_attention")
def _(query, kv_cache, block_tables, seq_lens, scale):
    return torch.empty_like(query, memory_format=torch.contiguous_format)
