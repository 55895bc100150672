"""Dense products over quantized weights without a dense copy (CPU, bfloat16).

A quantized linear layer on the CPU runs its packed kernel for calls of at most
``INT4_MAX_ROWS`` rows (:mod:`argosy.runtime.layers.linear`); larger calls (prefill,
large decode batches) are faster through oneDNN's bfloat16 GEMM. A layer that keeps no
dense bfloat16 copy (2 bytes a weight, more than the packed weight itself;
``ARGOSY_CPU_DENSE_COPIES``, :func:`argosy.runtime.layers.linear.keep_dense_copies`)
dequantizes itself on each such call into one scratch matrix per thread
(``csrc/dequant.cpp``, OpenMP) and multiplies that: the scratch is as large as the
largest layer (at most :data:`SCRATCH_MAX_ELEMENTS`; larger layers run in row blocks),
and is reused by every layer and every call.

The ops (``torch.ops.argosy.int4_dense_linear``, ``int8_dense_linear``,
``q8_dense_linear``) are opaque to ``torch.compile`` (fake implementations give the
output shape), so the compiled decode graphs call them like ``F.linear``.

Values: each dequantized weight is computed in float32 and rounded once to bfloat16 (to
nearest even), bit-identical to the dense copy the layer kept before (the reference
dequantizers :meth:`~.int4.Int4Weight.dequantize`, :meth:`~.int8.Int8Weight.dequantize`,
:meth:`~.q8_0.Q8Weight.dequantize` with the kernels' scale rounding; the tests check it).

Where the C++ library cannot be built (no compiler), :func:`kernel` answers None and
layers keep their dense copies, as before.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .. import cpu_kernels

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "dequant.cpp"


def _declare(lib: ctypes.CDLL) -> None:
    lib.argosy_int4_dequant.restype = ctypes.c_int
    lib.argosy_int4_dequant.argtypes = [ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 5 + [ctypes.c_void_p]
    lib.argosy_int4pack_dequant.restype = ctypes.c_int
    lib.argosy_int4pack_dequant.argtypes = [ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 6 + [ctypes.c_void_p]
    lib.argosy_int8_dequant.restype = ctypes.c_int
    lib.argosy_int8_dequant.argtypes = [ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 2 + [ctypes.c_void_p]
    lib.argosy_gather_columns.restype = ctypes.c_int
    lib.argosy_gather_columns.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                          ctypes.c_void_p]
    lib.argosy_q8_dequant.restype = ctypes.c_int
    lib.argosy_q8_dequant.argtypes = ([ctypes.c_void_p] * 2 + [ctypes.c_int] * 2 + [ctypes.c_void_p] * 2
                                      + [ctypes.c_int] + [ctypes.c_int64] * 3 + [ctypes.c_void_p])


KERNEL = cpu_kernels.Kernel(SOURCE, "dequant", _declare, "dense bfloat16 copies of quantized layers")


def kernel() -> Optional[ctypes.CDLL]:
    """The loaded library (built on first call), or None where it cannot be built (logged
    once; layers then keep dense copies)."""
    return KERNEL.library()


_SCRATCH = threading.local()
#: The scratch's largest size (bfloat16 elements, 64 MiB): a larger 4-bit weight (e.g. a
#: 70B model's 57,344 x 8,192 gate/up projection) is dequantized and multiplied in row blocks.
SCRATCH_MAX_ELEMENTS = 32 << 20


def scratch(n: int, k: int) -> torch.Tensor:
    """This thread's scratch matrix viewed as ``[n, k] bfloat16`` (grown, never shrunk:
    after the first call of the largest layer it is never allocated again)."""
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < n * k:
        buf = _SCRATCH.buf = torch.empty(n * k, dtype=torch.bfloat16)
    return buf[: n * k].view(n, k)


def pack_nibbles(q: np.ndarray) -> torch.Tensor:
    """4-bit integers ``q [N, K] uint8`` in [0, 15] (K a multiple of 32) to the dequant
    kernel's layout ``[N, K // 2] uint8``: in each 32-column chunk ``c``, byte ``16c + j``
    holds column ``32c + j`` in its low nibble and ``32c + 16 + j`` in its high one."""
    n, k = q.shape
    if k % 32:
        raise ValueError(f"int4 nibbles need K a multiple of 32, got {k}")
    c = np.asarray(q, dtype=np.uint8).reshape(n, k // 32, 2, 16)
    return torch.from_numpy(np.ascontiguousarray((c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, k // 2)))


def _out(out: Optional[torch.Tensor], n: int, k: int, *inputs: Optional[torch.Tensor]) -> torch.Tensor:
    """``out``, checked to be a contiguous ``[n, k]`` bfloat16 CPU tensor (a new one if
    None), after checking every input is a CPU tensor: the kernels write through raw
    pointers.

    Raises:
        ValueError: an input off the CPU, or ``out`` of another shape, dtype, device or layout.
    """
    if any(t is not None and t.device.type != "cpu" for t in inputs):
        raise ValueError("the dequantization kernels run on CPU tensors only")
    if out is None:
        return torch.empty(n, k, dtype=torch.bfloat16)
    if out.dtype != torch.bfloat16 or out.device.type != "cpu" or tuple(out.shape) != (n, k) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{n}, {k}] bfloat16 CPU tensor, got {tuple(out.shape)} "
                         f"{out.dtype} on {out.device}")
    return out


def _lib() -> ctypes.CDLL:
    lib = KERNEL.loaded or kernel()
    if lib is None:
        raise RuntimeError("the CPU dequantization kernel is not available")
    return lib


def int4_dequantize(nibbles: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
                    out: Optional[torch.Tensor] = None, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """``W [N, K] bfloat16`` (or its rows ``rows = (n0, n1)``: ``[n1 - n0, K]``) from
    :func:`pack_nibbles`' ``nibbles [N, K // 2] uint8`` and PyTorch's int4
    ``scales_and_zeros [K // g, N, 2] bfloat16`` (``W = (q - 8) * scale + zero``), into
    ``out`` (a new tensor if None).

    Raises:
        ValueError: shapes, dtypes, group size or row range that do not match.
        RuntimeError: the kernel is not built.
    """
    n, k2 = nibbles.shape
    k = 2 * k2
    n0, n1 = rows or (0, n)
    if (nibbles.dtype != torch.uint8 or scales_and_zeros.dtype != torch.bfloat16 or group_size % 32 or k % group_size
            or tuple(scales_and_zeros.shape) != (k // group_size, n, 2) or not nibbles.is_contiguous()
            or not scales_and_zeros.is_contiguous() or not 0 <= n0 <= n1 <= n):
        raise ValueError(f"int4_dequantize: nibbles {tuple(nibbles.shape)} {nibbles.dtype}, scales_and_zeros "
                         f"{tuple(scales_and_zeros.shape)} {scales_and_zeros.dtype}, group {group_size}, rows "
                         f"{rows} do not match")
    out = _out(out, n1 - n0, k, nibbles, scales_and_zeros)
    _lib().argosy_int4_dequant(nibbles.data_ptr(), scales_and_zeros.data_ptr(), group_size, n, k, n0, n1,
                               out.data_ptr())
    return out


def torch_int4pack_model(q: np.ndarray, block: int) -> np.ndarray:
    """What ``_convert_weight_to_int4pack_for_cpu(q, 1)`` returns (flattened ``uint8``)
    for ``q [N, K]`` in [0, 15] when PyTorch's CPU int4 layout has row blocks of
    ``block`` (64 with AVX-512, 32 otherwise; ``aten/src/ATen/native/cpu/int4mm_kernel.cpp``):
    per whole block ``[K, block / 2]`` bytes, byte ``j`` of column ``k`` holding row ``j``
    (low nibble) and ``j + block / 2`` (high); a last block of ``t < block`` rows
    ``[K, t / 2]``, byte ``d`` holding rows ``2d`` and ``2d + 1``. A model of PyTorch's
    layout, for :func:`int4pack_block`'s check and the tests."""
    n, k = q.shape
    q = np.asarray(q, dtype=np.uint8)
    parts = []
    for b0 in range(0, n, block):
        blk = q[b0 : b0 + block]
        t = blk.shape[0]
        lo, hi = (blk[: t // 2], blk[t // 2 :]) if t == block else (blk[0::2], blk[1::2])
        parts.append((lo | (hi << 4)).T.reshape(-1))
    return np.concatenate(parts)


_INT4PACK_BLOCK: Optional[int] = None


def int4pack_block() -> int:
    """The row block of PyTorch's CPU int4 layout in this process (64 or 32), or 0 when
    the layout is not one :func:`int4pack_dequantize` reads (another PyTorch version or
    CPU capability) or the kernel is not built: then layers keep their integers a second
    time in :func:`pack_nibbles`' layout. Checked once per process: a ``[176, 64]``
    weight (whole blocks and a tail under either block size) packed by PyTorch against
    :func:`torch_int4pack_model`, then dequantized by the C++ kernel against the integers."""
    global _INT4PACK_BLOCK
    if _INT4PACK_BLOCK is None:
        _INT4PACK_BLOCK = 0
        if kernel() is not None:
            q = np.random.default_rng(0).integers(0, 16, size=(176, 64), dtype=np.uint8)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.from_numpy(q.astype(np.int32)), 1)
            flat = packed.contiguous().view(-1).numpy()
            for block in (64, 32):
                if np.array_equal(flat, torch_int4pack_model(q, block)):
                    sz = torch.zeros(2, 176, 2, dtype=torch.bfloat16)
                    sz[..., 0] = 1.0
                    w = int4pack_dequantize(packed, sz, 32, block)
                    if torch.equal(w, torch.from_numpy(q.astype(np.float32) - 8.0).to(torch.bfloat16)):
                        _INT4PACK_BLOCK = block
                    break
            if not _INT4PACK_BLOCK:
                logger.warning("PyTorch %s's packed int4 layout (CPU capability %s) is not one the dequantization "
                               "kernel reads: 4-bit layers without dense copies keep their integers a second time "
                               "(0.5 bytes a weight)", torch.__version__, torch.backends.cpu.get_cpu_capability())
    return _INT4PACK_BLOCK


def int4pack_dequantize(packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, block: int,
                        out: Optional[torch.Tensor] = None, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """:func:`int4_dequantize` from PyTorch's own packed int4 weight ``packed [N, K // 2]
    uint8`` (:func:`..int4.pack`), whose layout has row blocks of ``block``
    (:func:`int4pack_block`); ``rows`` must start on a block and end on one or at ``N``.
    The kernel writes the transpose (the layout's columns are its natural order, and
    oneDNN's GEMM takes either as fast): ``out`` is a contiguous ``[K, n1 - n0]`` buffer,
    and the result ``W [n1 - n0, K]`` its transposed view.

    Raises:
        ValueError: shapes, dtypes, group size, block or row range that do not match.
        RuntimeError: the kernel is not built.
    """
    n, k2 = packed.shape
    k = 2 * k2
    n0, n1 = rows or (0, n)
    if (packed.dtype != torch.uint8 or scales_and_zeros.dtype != torch.bfloat16 or group_size % 32 or k % group_size
            or block <= 0 or block % 32 or n % 2 or n0 % block or (n1 % block and n1 != n)
            or tuple(scales_and_zeros.shape) != (k // group_size, n, 2) or not packed.is_contiguous()
            or not scales_and_zeros.is_contiguous() or not 0 <= n0 <= n1 <= n):
        raise ValueError(f"int4pack_dequantize: packed {tuple(packed.shape)} {packed.dtype}, scales_and_zeros "
                         f"{tuple(scales_and_zeros.shape)} {scales_and_zeros.dtype}, group {group_size}, block "
                         f"{block}, rows {rows} do not match")
    out = _out(out, k, n1 - n0, packed, scales_and_zeros)
    _lib().argosy_int4pack_dequant(packed.data_ptr(), scales_and_zeros.data_ptr(), group_size, n, k, block, n0, n1,
                                   out.data_ptr())
    return out.t()


def gather_columns(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``x[:, perm]`` for ``x [M, K]`` bfloat16/float16 and ``perm [K] int64`` (a GPTQ
    act-order layer's column order); several times faster than ``index_select`` on
    dimension 1 (2048 x 576: ~0.1 vs 2.4 ms on 2 cores).

    Raises:
        ValueError: shapes, dtypes or an index outside ``[0, K)``. RuntimeError: the kernel is not built.
    """
    m, k = x.shape
    if x.element_size() != 2 or perm.dtype != torch.int64 or tuple(perm.shape) != (k,) or not perm.is_contiguous() \
            or x.device.type != "cpu" or perm.device.type != "cpu":
        raise ValueError(f"gather_columns: x {tuple(x.shape)} {x.dtype}, perm {tuple(perm.shape)} {perm.dtype}")
    x = x.contiguous()
    out = torch.empty_like(x)
    if _lib().argosy_gather_columns(x.data_ptr(), perm.data_ptr(), m, k, out.data_ptr()) != 0:
        raise ValueError("gather_columns: perm has an index outside [0, K)")
    return out


def int8_dequantize(q: torch.Tensor, scales: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``W [N, K] bfloat16 = q [N, K] int8 * scales [N] bfloat16`` (per row), into ``out``.

    Raises:
        ValueError: shapes or dtypes that do not match. RuntimeError: the kernel is not built.
    """
    n, k = q.shape
    if q.dtype != torch.int8 or scales.dtype != torch.bfloat16 or tuple(scales.shape) != (n,) \
            or not q.is_contiguous() or not scales.is_contiguous():
        raise ValueError(f"int8_dequantize: q {tuple(q.shape)} {q.dtype}, scales {tuple(scales.shape)} "
                         f"{scales.dtype} do not match")
    out = _out(out, n, k, q, scales)
    _lib().argosy_int8_dequant(q.data_ptr(), scales.data_ptr(), n, k, out.data_ptr())
    return out


def q8_layout_ok(w: torch.Tensor, hbits: Optional[torch.Tensor], is_signed: bool, k: int) -> bool:
    """Whether ``w`` (and ``hbits``, ``is_signed``) are a :class:`~.q8_0.PackedQ8` layout for
    ``k`` input columns: int8 ``[T, k, 16]`` with no ``hbits`` and not signed, or uint8
    ``[T, k / 2, 16]`` with int16 ``hbits [T, 1 or 2, k]`` (``k`` a multiple of 4), all
    contiguous."""
    shape = w.shape
    if len(shape) != 3 or shape[2] != 16 or not w.is_contiguous():
        return False
    if hbits is None:
        return w.dtype == torch.int8 and shape[1] == k and not is_signed
    return (w.dtype == torch.uint8 and 2 * shape[1] == k and k % 4 == 0 and hbits.dtype == torch.int16
            and hbits.dim() == 3 and hbits.shape[0] == shape[0] and hbits.shape[1] in (1, 2) and hbits.shape[2] == k
            and hbits.is_contiguous())


def q8_dequantize(w: torch.Tensor, scales: torch.Tensor, mins: Optional[torch.Tensor], group_size: int, n: int,
                  out: Optional[torch.Tensor] = None, hbits: Optional[torch.Tensor] = None,
                  is_signed: bool = False) -> torch.Tensor:
    """``W [n, K] bfloat16`` from a :class:`~.q8_0.PackedQ8`'s ``w [ceil(n / 16), K, 16]
    int8`` (or, with ``hbits [ceil(n / 16), P, K] int16`` and ``is_signed``, the 5/6-bit layout's
    ``w [ceil(n / 16), K // 2, 16] uint8``), ``scales`` / ``mins`` ``[ceil(n / 16), K // G,
    16]`` (int16 float16 bits or float32), into ``out``.

    Raises:
        ValueError: shapes or dtypes that do not match. RuntimeError: the kernel is not built.
    """
    tiles = w.shape[0] if w.dim() == 3 else 0
    k = (w.shape[1] if hbits is None else 2 * w.shape[1]) if w.dim() == 3 else 0
    g = group_size
    if (not q8_layout_ok(w, hbits, is_signed, k) or g not in (16, 32) or k % g
            or tuple(scales.shape) != (tiles, k // g, 16)
            or scales.dtype not in (torch.int16, torch.float32) or not 0 < n <= tiles * 16
            or (mins is not None and (mins.shape != scales.shape or mins.dtype != scales.dtype))
            or not scales.is_contiguous() or (mins is not None and not mins.is_contiguous())):
        raise ValueError(f"q8_dequantize: w {tuple(w.shape)} {w.dtype}, scales {tuple(scales.shape)} {scales.dtype}, "
                         f"group {g}, n {n}, high bits {None if hbits is None else tuple(hbits.shape)} signed {is_signed} "
                         "do not match")
    out = _out(out, n, k, w, scales, mins, hbits)
    _lib().argosy_q8_dequant(w.data_ptr(), None if hbits is None else hbits.data_ptr(),
                             0 if hbits is None else hbits.shape[1], bool(is_signed), scales.data_ptr(),
                             None if mins is None else mins.data_ptr(), scales.dtype == torch.int16, g, n, k,
                             out.data_ptr())
    return out


# ------------------------------------------------------------------------- the torch ops
_LIBRARY = torch.library.Library("argosy", "FRAGMENT")
_LIBRARY.define("int4_dense_linear(Tensor x, Tensor q, Tensor scales_and_zeros, int group_size, int block, "
                "Tensor? perm, Tensor? bias) -> Tensor")
_LIBRARY.define("int8_dense_linear(Tensor x, Tensor q, Tensor scales, Tensor? bias) -> Tensor")
_LIBRARY.define("q8_dense_linear(Tensor x, Tensor w, Tensor scales, Tensor? mins, int group_size, int n, "
                "Tensor? bias, Tensor? hbits=None, bool is_signed=False) -> Tensor")


def _dense_linear(x: torch.Tensor, n: int, k: int, bias: Optional[torch.Tensor], fill, align: int = 16,
                  transposed: bool = False, max_elements: int = 0) -> torch.Tensor:
    """``y [M, n] = x @ W.T (+ bias)`` with ``fill(n0, n1, out)`` returning rows ``[n0,
    n1)`` of ``W`` written into the scratch ``out``: ``[n1 - n0, k]``, or ``[k, n1 - n0]``
    (``transposed``, ``fill`` returning its transposed view); the whole weight, or row
    blocks of at most ``max_elements`` (default :data:`SCRATCH_MAX_ELEMENTS`; multiples of
    ``align`` rows, a multiple of 16), each product written into its columns of ``y``."""
    max_elements = max_elements or SCRATCH_MAX_ELEMENTS
    buf = (lambda rows: scratch(k, rows)) if transposed else (lambda rows: scratch(rows, k))
    if n * k <= max_elements:
        return F.linear(x, fill(0, n, buf(n)), bias)
    step = max(align, max_elements // k // align * align)
    y = x.new_empty(x.shape[0], n)
    for n0 in range(0, n, step):
        n1 = min(n, n0 + step)
        y[:, n0:n1] = F.linear(x, fill(n0, n1, buf(n1 - n0)), None if bias is None else bias[n0:n1])
    return y


def int4_dense_linear(x: torch.Tensor, q: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
                      block: int, perm: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``y [M, N] = x[:, perm] @ W.T (+ bias)`` with ``W`` dequantized into the scratch
    from ``q [N, K // 2] uint8``: PyTorch's packed int4 weight with row blocks of
    ``block`` (:func:`int4pack_dequantize`), or with ``block = 0`` :func:`pack_nibbles`'
    layout (:func:`int4_dequantize`); ``perm`` the act-order column order, or None;
    ``x [M, K]`` bfloat16."""
    n, k = q.shape[0], 2 * q.shape[1]
    xp = x if perm is None else gather_columns(x, perm)
    if block:
        return _dense_linear(xp, n, k, bias, lambda n0, n1, out: int4pack_dequantize(
            q, scales_and_zeros, group_size, block, out, (n0, n1)), align=block, transposed=True)
    return _dense_linear(xp, n, k, bias,
                         lambda n0, n1, out: int4_dequantize(q, scales_and_zeros, group_size, out, (n0, n1)))


def int8_dense_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor,
                      bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``y [M, N] = x @ (q * scales).T (+ bias)`` through the scratch; ``x [M, K]`` bfloat16."""
    return _dense_linear(x, q.shape[0], q.shape[1], bias,
                         lambda n0, n1, out: int8_dequantize(q[n0:n1], scales[n0:n1], out))


def q8_dense_linear(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, mins: Optional[torch.Tensor],
                    group_size: int, n: int, bias: Optional[torch.Tensor], hbits: Optional[torch.Tensor] = None,
                    is_signed: bool = False, max_elements: int = 0) -> torch.Tensor:
    """``y [M, n] = x @ W.T (+ bias)``, ``W`` the grouped int8 weight (either layout of
    :func:`q8_dequantize`) dequantized into the scratch (row blocks of at most
    ``max_elements``, :func:`_dense_linear`, starting on the layout's 16-row tiles);
    ``x [M, K]`` bfloat16."""
    def fill(n0: int, n1: int, out: torch.Tensor) -> torch.Tensor:
        t0, t1 = n0 // 16, -(-n1 // 16)
        return q8_dequantize(w[t0:t1], scales[t0:t1], None if mins is None else mins[t0:t1], group_size, n1 - n0,
                             out, None if hbits is None else hbits[t0:t1], is_signed)

    k = w.shape[1] * (1 if hbits is None else 2)
    return _dense_linear(x, n, k, bias, fill, max_elements=max_elements)


_LIBRARY.impl("int4_dense_linear", int4_dense_linear, "CPU")
_LIBRARY.impl("int8_dense_linear", int8_dense_linear, "CPU")
_LIBRARY.impl("q8_dense_linear", q8_dense_linear, "CPU")


@torch.library.register_fake("argosy::int4_dense_linear")
def _(x, q, scales_and_zeros, group_size, block, perm, bias):
    return x.new_empty(x.shape[0], q.shape[0])


@torch.library.register_fake("argosy::int8_dense_linear")
def _(x, q, scales, bias):
    return x.new_empty(x.shape[0], q.shape[0])


@torch.library.register_fake("argosy::q8_dense_linear")
def _(x, w, scales, mins, group_size, n, bias, hbits=None, is_signed=False):
    return x.new_empty(x.shape[0], n)
