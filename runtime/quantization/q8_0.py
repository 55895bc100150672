"""GGUF's 8-bit and 5/6-bit weights kept as grouped int8, and a CPU linear over them
(``csrc/q8_0_gemm.cpp``, op ``torch.ops.argosy.q8_linear``).

A :class:`Q8Weight` is ``W[n, k] = q[n, k] * scale[n, k // G] (+ min[n, k // G])`` with
``q`` int8 and groups of ``G`` = 32 or 16 input columns. GGUF block types map onto it
without loss (block layouts: ggml's ``ggml-common.h``; the ``gguf`` package's
``gguf.quants`` implements the same and is the tests' oracle):

- ``Q8_0`` (34 bytes / 32 values): float16 ``d``, 32 int8 ``q``; ``W = q d``: as stored.
- ``Q5_0`` (22 / 32): ``d``, 32 high bits, 16 bytes of nibbles; ``W = (q - 16) d`` with
  ``q`` in [0, 31]: int8 ``q - 16``, scale ``d``.
- ``Q5_1`` (24 / 32): ``d``, ``m``, high bits, nibbles; ``W = q d + m``: scale ``d``, min ``m``.
- ``Q5_K`` (176 / 256): ``d``, ``dmin``, 12 bytes of 6-bit sub-block scales ``sc`` and mins
  ``mn`` (8 sub-blocks of 32), high bits, nibbles; ``W = d sc q - dmin mn``: scale
  ``d sc``, min ``-dmin mn`` (float32: exact products of a float16 and a 6-bit integer).
- ``Q6_K`` (210 / 256): 4-bit low parts, 2-bit high parts, 16 int8 sub-block scales
  ``sc`` (sub-blocks of 16), float16 ``d``; ``W = d sc (q - 32)``: ``G`` = 16, scale ``d sc``.

The integers are unpacked by the ``gguf`` package itself (its dequantizer run on a copy of
the blocks whose scales are set to 1 and offsets to 0, which returns the integers
exactly); the scales and offsets are read from the block headers (``Q4_K.get_scale_min``
for the K-quants' packed 6-bit ones).

The kernel computes ``x @ W.T`` from those integers and scales in float32, nothing
rounded, so it is also closer to the file than a bfloat16 copy. A linear layer whose
integers fit 5 bits (Q5_0, Q5_1, Q5_K) holds them so (``csrc/lowbit.h``: a nibble plane
and a high-bit plane, as the file does; Q6_K's 6 bits, two planes, only with
``ARGOSY_Q8_LOW_BITS=6``, :func:`low_bits_setting`), decoded in registers to the same int8
values: the same results bit for bit, 0.625 bytes a weight instead of 1 plus the scales
(Q5_1: 0.625 + 0.125 = 0.75, as llama.cpp reads it). It serves:

- linear layers stored in these types, for steps of at most ``INT4_MAX_ROWS`` rows
  (:mod:`argosy.runtime.layers.linear`; larger steps multiply a dense bfloat16 copy or,
  where the layer keeps none, the weight dequantized into a scratch matrix, :mod:`.dequant`). One
  row, warm, 2 cores: 28 / 23 / 53 / 33 us for the bundled model's 960 x 576, 576 x 576,
  3072 x 576 and 576 x 1536 weights against 52 / 38 / 141 / 71 us for bfloat16; parity
  near 8 rows. A per-row int8 requantization on ``_weight_int8pack_mm`` (18 / 12 / 59 /
  25 us) was measured and dropped: it fails the accuracy gate (mean KL 0.0045 against
  llama.cpp's 0.0034 on the same Q8_0/Q5_x file; see the README).
- the embedding / LM head: kept also in its file form for logits of at most
  :data:`MAX_ROWS` rows (the bundled model's tied 49,152 x 576 Q8_0 matrix: 0.8 ms for one
  row against bfloat16 ``F.linear``'s 2.1 ms, 1.1 ms for four, parity at eight; at 16
  rows and more oneDNN's AMX bfloat16 GEMM wins, 2.4 vs 3.7 ms. Whole decode steps:
  batch 1 16.0 -> 12.6-13.4 ms, batch 4 18.8 -> 17.6 ms, batch 8 27.4 -> 28.2 ms, hence
  4 rows on a CPU with AMX; without AMX the kernel wins up to ~24 rows and the limit is
  16, :func:`_head_kernel_rows`). The dense copy's bfloat16 rounding moves logits by up to ~0.05, so a greedy
  choice between two nearly tied tokens can depend on how many rows a step computes
  logits for (see :meth:`argosy.runtime.models.llama.LlamaForCausalLM.compute_logits`).
  A model that keeps no dense copies holds it in this form only (:class:`Q8Embedding`:
  lookups dequantize their rows; logits of up to :data:`LEAN_MAX_ROWS` rows on the kernel,
  more on the dequantization scratch).

The library is built like the other C++ kernels (:mod:`argosy.runtime.cpu_kernels`).
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from .. import cpu_kernels, torch_ops
from . import dequant
from .base import CpuPackedMethod, avx512_without_amx, hold_buffers, register

#: GGUF block types read as :class:`Q8Weight`.
TYPES = ("Q8_0", "Q5_0", "Q5_1", "Q5_K", "Q6_K")
#: Values and bytes per block of each type.
BLOCKS = {"Q8_0": (32, 34), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q5_K": (256, 176), "Q6_K": (256, 210)}
#: Group sizes the kernel takes.
GROUP_SIZES = (16, 32)


def _head_kernel_rows() -> int:
    """:data:`MAX_ROWS` for this CPU: 4 where oneDNN's bfloat16 GEMM has AMX tiles
    (measured on such a machine, the bundled model's head alone: parity at 8 rows, AMX ahead
    from 16; whole decode steps batch 8 27.4 dense vs 28.2 ms kernel), 16 on AVX-512 without
    AMX (this project's 2-vCPU EPYC VM, head alone 8 / 16 / 24 / 32 rows 2.2 / 4.4 / 6.6 /
    8.7 ms kernel vs 5.5 / 6.4 / 7.6 / 8.0 dense; decoding 8 sequences 297-316 -> 393-404
    tok/s, 16 325-414 -> 403-424, two runs each), 4 elsewhere (not measured), and 4 where
    PyTorch runs below AVX-512 (``ATEN_CPU_CAPABILITY``; the kernels then build their
    portable loop, :mod:`argosy.runtime.cpu_kernels`)."""
    return 16 if avx512_without_amx() else 4


#: Most rows of ``x`` per call that take the kernel for the logits (more: the dense copy);
#: by CPU, :func:`_head_kernel_rows`.
MAX_ROWS = _head_kernel_rows()
#: Where the LM head keeps no dense copy (:attr:`~argosy.runtime.models.llama.LlamaForCausalLM.embed_q8`):
#: most rows that take the kernel for the logits (at least :data:`MAX_ROWS`); more rows run on the dequantization
#: scratch (:func:`.dequant.q8_dense_linear`) in row blocks of at most
#: ``LOGITS_SCRATCH_ELEMENTS`` weights (the scratch stays near the linear layers' size).
LEAN_MAX_ROWS = max(24, MAX_ROWS)
LOGITS_SCRATCH_ELEMENTS = 2 << 20
#: Output rows per tile of the packed layout.
TILE = 16
#: The widest integers a grouped linear layer holds below 8 bits: ``5`` (default: Q5_0 / Q5_1 /
#: Q5_K layers in 5 bits), ``6`` (Q6_K layers in 6 bits too), ``0`` (all in the int8 layout).
#: Measured on this project's VM (AVX-512, no AMX), 120 layers streamed from memory, ms,
#: int8 layout vs 5-bit at 1 / 2 / 4 / 8 / 16 rows: 4.80 / 4.94 / 6.19 / 10.29 / 18.29 vs
#: 3.62 / 4.10 / 5.97 / 11.58 / 21.19 (the decode in registers costs compute, which the
#: rows share less as they grow); 6-bit (two planes) 4.87 / 5.11 / 6.03 / 9.38 / 17.33 vs
#: 4.54 / 5.29 / 6.92 / 11.00 / 20.69: a loss from 2 rows, hence not by default.
LOW_BITS_ENV = "ARGOSY_Q8_LOW_BITS"

SOURCE = Path(__file__).parent / "csrc" / "q8_0_gemm.cpp"

#: Blocks decoded per call of the ``gguf`` dequantizer (~8 M values: ~64 MB of float32 temporaries).
_CHUNK_BLOCKS = 1 << 15
_ONE_F16 = np.array([1.0], dtype=np.float16).view(np.uint8)
_ZERO_F16 = np.array([0.0], dtype=np.float16).view(np.uint8)


def _f16(raw: np.ndarray) -> np.ndarray:
    """``[B, 2] uint8`` -> ``[B] float16``."""
    return np.ascontiguousarray(raw).view(np.float16)[:, 0]


def _integers(blocks: np.ndarray, type_name: str, unit: dict) -> np.ndarray:
    """The blocks' integers through the ``gguf`` package's own dequantizer, run on a copy
    whose header bytes ``unit`` (``{(start, stop): bytes}``) set every scale to 1 and
    every offset to 0: ``[B, values] int8``."""
    import gguf
    from gguf.quants import dequantize

    qtype = gguf.GGMLQuantizationType[type_name]
    out = []
    for start in range(0, blocks.shape[0], _CHUNK_BLOCKS):  # bounded float32 temporaries
        b = blocks[start : start + _CHUNK_BLOCKS].copy()
        for (lo, hi), v in unit.items():
            b[:, lo:hi] = v
        vals = dequantize(b, qtype)
        q = np.rint(vals).astype(np.int8)
        if not np.array_equal(q.astype(np.float32), vals):  # the unit scales make them integers
            raise ValueError(f"{type_name}: blocks did not decode to integers")
        out.append(q)
    return np.concatenate(out) if len(out) != 1 else out[0]


@dataclass
class Q8Weight:
    """A grouped int8 weight (host numpy arrays, Hugging Face row order):
    ``W[n, k] = q[n, k] * scale[n, k // group_size] (+ min[n, k // group_size])``.

    Attributes:
        q: ``[N, K] int8``.
        scale: ``[N, K // group_size]`` float16 (Q8_0, Q5_0, Q5_1: the file's own) or
            float32 (the K-quants' products ``d * sc``).
        group_size: 32 or 16.
        min: like ``scale``, or None (no offsets).
    """

    q: np.ndarray
    scale: np.ndarray
    group_size: int = 32
    min: Optional[np.ndarray] = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    @staticmethod
    def from_gguf(raw: np.ndarray, shape: tuple[int, int], type_name: str = "Q8_0") -> "Q8Weight":
        """Decode a 2-D tensor's raw blocks (``[N, K / values * bytes] uint8``, as
        ``gguf.GGUFReader`` maps them) of Hugging Face shape ``(N, K)`` and GGUF type
        ``type_name`` (one of :data:`TYPES`).

        Raises:
            ValueError: another type, K not a multiple of the block, or a size that does
                not match ``shape``.
        """
        if type_name not in BLOCKS:
            raise ValueError(f"GGUF type {type_name} is not read as grouped int8 ({', '.join(TYPES)})")
        values, nbytes = BLOCKS[type_name]
        n, k = shape
        if k % values or raw.size != n * (k // values) * nbytes:
            raise ValueError(f"{type_name} tensor of {raw.size} bytes does not hold shape {shape}")
        blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n * (k // values), nbytes)
        mins = None
        group = 32
        if type_name == "Q8_0":
            scale = _f16(blocks[:, 0:2])
            q = blocks[:, 2:].copy().view(np.int8)
        elif type_name == "Q5_0":
            scale = _f16(blocks[:, 0:2])
            q = _integers(blocks, type_name, {(0, 2): _ONE_F16})
        elif type_name == "Q5_1":
            scale, mins = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
            q = _integers(blocks, type_name, {(0, 2): _ONE_F16, (2, 4): _ZERO_F16})
        elif type_name == "Q5_K":
            from gguf.quants import Q4_K

            d = _f16(blocks[:, 0:2]).astype(np.float32)
            dmin = _f16(blocks[:, 2:4]).astype(np.float32)
            sc, mn = Q4_K.get_scale_min(blocks[:, 4:16])
            scale = d[:, None] * sc.astype(np.float32)
            mins = -(dmin[:, None] * mn.astype(np.float32))
            # d = 1, dmin = 0, every 6-bit sub-block scale 1 (bytes 0-3 and the low nibbles of 8-11)
            q = _integers(blocks, type_name, {(0, 2): _ONE_F16, (2, 4): _ZERO_F16, (4, 8): 1, (8, 12): 0,
                                              (12, 16): 1})
        else:  # Q6_K
            d = _f16(blocks[:, 208:210]).astype(np.float32)
            scale = d[:, None] * blocks[:, 192:208].copy().view(np.int8).astype(np.float32)
            q = _integers(blocks, type_name, {(192, 208): 1, (208, 210): _ONE_F16})
            group = 16
        return Q8Weight(np.ascontiguousarray(q.reshape(n, k)), np.ascontiguousarray(scale.reshape(n, k // group)),
                        group, None if mins is None else np.ascontiguousarray(mins.reshape(n, k // group)))

    def rows(self, start: int, stop: int) -> "Q8Weight":
        """Output rows ``[start, stop)`` (a column-parallel shard or a vocabulary slice)."""
        return Q8Weight(self.q[start:stop], self.scale[start:stop], self.group_size,
                        None if self.min is None else self.min[start:stop])

    def cols(self, start: int, stop: int) -> "Q8Weight":
        """Input columns ``[start, stop)`` (a row-parallel shard).

        Raises:
            ValueError: the range does not start and end on a group boundary.
        """
        g = self.group_size
        if start % g or stop % g:
            raise ValueError(f"column range [{start}, {stop}) splits a quantization group of {g}")
        return Q8Weight(np.ascontiguousarray(self.q[:, start:stop]), self.scale[:, start // g : stop // g], g,
                        None if self.min is None else self.min[:, start // g : stop // g])

    def permute_rows(self, order: np.ndarray) -> "Q8Weight":
        """Rows reordered: row ``i`` of the result is row ``order[i]``."""
        return Q8Weight(self.q[order], self.scale[order], self.group_size,
                        None if self.min is None else self.min[order])

    def _as(self, group_size: int, dtype, with_min: bool) -> "Q8Weight":
        r = self.group_size // group_size
        scale = np.repeat(self.scale, r, axis=1).astype(dtype)
        mins = self.min if self.min is not None or not with_min else np.zeros_like(self.scale)
        mins = None if mins is None else np.repeat(mins, r, axis=1).astype(dtype)
        return Q8Weight(self.q, scale, group_size, mins)

    @staticmethod
    def cat(parts: list["Q8Weight"]) -> "Q8Weight":
        """Stack along the output rows (fused q/k/v or gate/up parts, which a file may
        store in different types): the result takes the smallest group size, float32
        scales unless all are float16, and offsets if any part has them (zero for the
        others); every value stays exact.

        Raises:
            ValueError: parts with different K.
        """
        if len({p.q.shape[1] for p in parts}) != 1:
            raise ValueError("cannot stack grouped int8 weights with different K")
        g = min(p.group_size for p in parts)
        dtype = np.float16 if all(p.scale.dtype == np.float16 for p in parts) else np.float32
        with_min = any(p.min is not None for p in parts)
        parts = [p._as(g, dtype, with_min) for p in parts]
        return Q8Weight(np.concatenate([p.q for p in parts]), np.concatenate([p.scale for p in parts]), g,
                        np.concatenate([p.min for p in parts]) if with_min else None)

    def dequantize(self, dtype=torch.float32, kernel_rounding: bool = True) -> torch.Tensor:
        """``W [N, K]`` as a torch tensor (computed in float32, then cast to ``dtype``;
        ``kernel_rounding`` is accepted for the other weight classes' signature: the
        kernel rounds nothing)."""
        n, k = self.shape
        g = self.group_size
        w = torch.from_numpy(self.q.astype(np.float32)).view(n, k // g, g)
        w = w * torch.from_numpy(self.scale.astype(np.float32)).unsqueeze(-1)
        if self.min is not None:
            w = w + torch.from_numpy(self.min.astype(np.float32)).unsqueeze(-1)
        return w.view(n, k).to(dtype)


@dataclass
class PackedQ8:
    """A :class:`Q8Weight` in the kernel's tiled layout (see the source's header).

    Attributes:
        w: ``[ceil(N / 16), K, 16] int8``; or, in the 5/6-bit layout (``hbits`` set;
            ``csrc/lowbit.h``), ``[ceil(N / 16), K // 2, 16] uint8`` low nibbles, four columns
            in 32 bytes (byte ``j`` of half ``h`` of columns ``4c..4c+3``: row ``j``'s column
            ``4c + h`` in bits 0-3, ``4c + 2 + h`` in bits 4-7).
        scales: ``[ceil(N / 16), K // G, 16]`` int16 (float16 bit patterns) or float32.
        mins: like ``scales``, or None.
        group_size: ``G``.
        n: output features (``pack``'s ``rows``; rows past the weight's own are zero, so
            their outputs are 0; tile padding past ``n`` is never written out).
        hbits: None (int8 layout), or ``[ceil(N / 16), P, K] int16``: ``P`` = 1 or 2 bit
            planes, bit ``j`` of ``hbits[t, p, k]`` being bit ``4 + p`` of row ``16 t + j``'s
            stored value in column ``k``.
        is_signed: the 5/6-bit layout's stored bits are two's complement (Q5_0: -16..15,
            Q6_K: -32..31) rather than unsigned (Q5_1 / Q5_K: 0..31); False for int8.
    """

    w: torch.Tensor
    scales: torch.Tensor
    mins: Optional[torch.Tensor]
    group_size: int
    n: int
    hbits: Optional[torch.Tensor] = None
    is_signed: bool = False

    @staticmethod
    def pack(weight: Q8Weight, rows: Optional[int] = None, max_bits: int = 0) -> "PackedQ8":
        """Tile ``weight``; ``rows`` (>= N) pads it with zero rows first (a tensor-parallel
        vocabulary slice shorter than the others). About 31 MB for a 49,152 x 576 Q8_0.
        ``max_bits`` (5 or 6; 0: never): where every integer fits that many bits or fewer
        (:func:`low_bit_form`), the 5/6-bit layout (what :class:`Q8Method` holds;
        :func:`embedding` reads the int8 one).

        Raises:
            ValueError: ``rows < N``, or a group size the kernel does not take.
        """
        n, k = weight.shape
        g = weight.group_size
        rows = n if rows is None else rows
        if rows < n:
            raise ValueError(f"cannot pack {n} rows into {rows}")
        if g not in GROUP_SIZES or k % g:
            raise ValueError(f"grouped int8 weight {weight.shape} with group size {g} is not supported")
        padded = -(-rows // TILE) * TILE
        form = low_bit_form(weight.q) if max_bits else None
        if form is not None and 4 + form[0] > max_bits:
            form = None

        def tiles(a: np.ndarray, width: int) -> torch.Tensor:
            full = np.zeros((padded, width), dtype=a.dtype)
            full[:n] = a
            if full.dtype == np.float16:
                full = full.view(np.int16)
            return torch.from_numpy(full).view(padded // TILE, TILE, width).transpose(1, 2).contiguous()

        scale_dtype = np.float16 if weight.scale.dtype == np.float16 else np.float32
        mins = None if weight.min is None else tiles(weight.min.astype(scale_dtype), k // g)
        scales = tiles(weight.scale.astype(scale_dtype), k // g)
        if form is None:
            return PackedQ8(tiles(weight.q, k), scales, mins, g, rows)
        planes, is_signed = form
        u = np.zeros((padded, k), dtype=np.uint8)  # stored bits (two's complement when signed); padding 0
        u[:n] = (weight.q.astype(np.int16) & ((1 << (4 + planes)) - 1)).astype(np.uint8)
        tiles_n = padded // TILE
        ut = u.reshape(tiles_n, TILE, k).transpose(0, 2, 1)  # [tiles, K, 16]
        nib = (ut & 0x0F).reshape(tiles_n, k // 4, 4, TILE)
        w = np.stack([nib[:, :, h] | (nib[:, :, 2 + h] << 4) for h in (0, 1)], axis=2)  # [tiles, K / 4, 2, 16]
        # bit j of each plane's 16-bit word is row j's bit: little-endian bit and byte order
        hb = np.stack([np.packbits((ut >> (4 + p)) & 1, axis=2, bitorder="little").view("<u2")[..., 0]
                       for p in range(planes)], axis=1)  # [tiles, P, K] uint16
        return PackedQ8(torch.from_numpy(np.ascontiguousarray(w).reshape(tiles_n, k // 2, TILE)), scales, mins, g,
                        rows, torch.from_numpy(np.ascontiguousarray(hb).view(np.int16)), is_signed)

    @property
    def planes(self) -> int:
        """High-bit planes: 0 (int8 layout), 1 (5 bits), 2 (6 bits)."""
        return 0 if self.hbits is None else self.hbits.shape[1]

    @property
    def nbytes(self) -> int:
        return (self.w.numel() + self.scales.nbytes + (0 if self.mins is None else self.mins.nbytes)
                + (0 if self.hbits is None else self.hbits.nbytes))


def low_bit_form(q: np.ndarray) -> Optional[tuple[int, bool]]:
    """``(planes, is_signed)`` of the narrowest 5/6-bit layout that holds every value of
    ``q`` (int8): ``bits = 4 + planes`` bits, unsigned (``[0, 2**bits)``) or two's
    complement (``[-2**(bits - 1), 2**(bits - 1))``). Q5_1 / Q5_K integers (0..31) give
    ``(1, False)``, Q5_0's (-16..15) ``(1, True)``, Q6_K's (-32..31) ``(2, True)``; None
    where 8 bits are needed (Q8_0, 8-bit GPTQ) or ``q`` is empty."""
    if not q.size:
        return None
    lo, hi = int(q.min()), int(q.max())
    for bits in (5, 6):
        if lo >= 0 and hi < 1 << bits:
            return bits - 4, False
        if lo >= -(1 << (bits - 1)) and hi < 1 << (bits - 1):
            return bits - 4, True
    return None


def low_bits_setting() -> int:
    """``ARGOSY_Q8_LOW_BITS`` (:data:`LOW_BITS_ENV`): 5 (default), 6 or 0.

    Raises:
        ValueError: another value (one line naming the variable and the values it takes).
    """
    raw = os.environ.get(LOW_BITS_ENV, "5").strip()
    if raw not in ("0", "5", "6"):
        raise ValueError(f"{LOW_BITS_ENV}={raw!r}: expected 5 (5-bit layers held in 5 bits, the default), "
                         "6 (also 6-bit ones) or 0 (all in 8 bits)")
    return int(raw)


def _declare(lib: ctypes.CDLL) -> None:
    fn = lib.argosy_q8_linear
    fn.restype = ctypes.c_int
    fn.argtypes = ([ctypes.c_void_p] * 2 + [ctypes.c_int] * 2 + [ctypes.c_void_p] * 2 + [ctypes.c_int, ctypes.c_int64]
                   + [ctypes.c_void_p, ctypes.c_int] * 2 + [ctypes.c_int64] * 3)


def _install_op(lib: ctypes.CDLL) -> None:
    """The op's C++ implementation (:mod:`argosy.runtime.torch_ops`) calls this library."""
    torch_ops.install("q8_linear",
                      lambda ops: ops.argosy_set_q8_linear(torch_ops.function_pointer(lib.argosy_q8_linear)))


KERNEL = cpu_kernels.Kernel(SOURCE, "q8_0_gemm", _declare, "dense bfloat16 weights", on_load=_install_op)


def kernel():
    """The loaded kernel library (built on first call), or None where it cannot be built
    (logged once; callers keep the dense path)."""
    return KERNEL.library()


_LIBRARY = torch.library.Library("argosy", "FRAGMENT")
_LIBRARY.define("q8_linear(Tensor x, Tensor w, Tensor scales, Tensor? mins, int group_size, int n, "
                "ScalarType? out_dtype=None, Tensor? hbits=None, bool is_signed=False) -> Tensor")


def q8_linear(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, mins: Optional[torch.Tensor],
              group_size: int, n: int, out_dtype: Optional[torch.dtype] = None,
              hbits: Optional[torch.Tensor] = None, is_signed: bool = False) -> torch.Tensor:
    """``x @ W.T`` over a :class:`PackedQ8` weight: the Python implementation of
    ``torch.ops.argosy.q8_linear``, in place where the C++ one
    (:mod:`argosy.runtime.torch_ops`, same checks) is not.

    Args:
        x: ``[M, K]`` float32 or bfloat16 (widened to float32 in the kernel; exact).
        w, scales, mins, group_size: :attr:`PackedQ8.w`, ``.scales``, ``.mins``, ``.group_size``.
        n: :attr:`PackedQ8.n`.
        out_dtype: float32 (default) or bfloat16 (the float32 result rounded to nearest
            even, as ``.to(torch.bfloat16)`` rounds; a linear layer's output).
        hbits, is_signed: :attr:`PackedQ8.hbits` and ``.is_signed`` (the 5/6-bit layout), or
            None and False.
    Returns:
        ``[M, n]`` of ``out_dtype``.
    Raises:
        ValueError: shapes or dtypes that do not match the packed layout.
        RuntimeError: the kernel is not built (:func:`kernel` returned None).
    """
    lib = KERNEL.loaded or kernel()
    if lib is None:
        raise RuntimeError("the CPU grouped int8 linear kernel is not available")
    out_dtype = out_dtype or torch.float32
    g = group_size
    k = x.shape[-1]
    shape, sshape = w.shape, scales.shape
    if (x.dim() != 2 or not dequant.q8_layout_ok(w, hbits, is_signed, k) or g not in GROUP_SIZES or k % g
            or sshape != (shape[0], k // g, TILE) or not 0 < n <= shape[0] * TILE
            or scales.dtype not in (torch.int16, torch.float32)
            or x.dtype not in (torch.float32, torch.bfloat16) or out_dtype not in (torch.float32, torch.bfloat16)
            or not scales.is_contiguous()
            or (mins is not None and (mins.shape != sshape or mins.dtype != scales.dtype or not mins.is_contiguous()))):
        raise ValueError(f"q8_linear: x {tuple(x.shape)} {x.dtype} does not match packed weight {tuple(shape)} "
                         f"{w.dtype} / scales {tuple(sshape)} {scales.dtype} / group {g} for {n} outputs "
                         f"/ high bits {None if hbits is None else tuple(hbits.shape)} signed {is_signed} "
                         f"(or out_dtype {out_dtype} is not float32/bfloat16)")
    x = x.contiguous()
    out = torch.empty(x.shape[0], n, dtype=out_dtype)
    planes = 0 if hbits is None else hbits.shape[1]
    if x.shape[0] and lib.argosy_q8_linear(w.data_ptr(), None if hbits is None else hbits.data_ptr(), planes,
                                           bool(is_signed),
                                           scales.data_ptr(), None if mins is None else mins.data_ptr(),
                                           scales.dtype == torch.int16, g, x.data_ptr(), x.dtype == torch.bfloat16,
                                           out.data_ptr(), out_dtype == torch.bfloat16, x.shape[0], n, k) != 0:
        raise ValueError(f"q8_linear: K={k} is not a multiple of the group size {g}")
    return out


torch_ops.python_impl("q8_linear", q8_linear)


@torch.library.register_fake("argosy::q8_linear")
def _(x, w, scales, mins, group_size, n, out_dtype=None, hbits=None, is_signed=False):
    return x.new_empty(x.shape[0], n, dtype=out_dtype or torch.float32)


def embedding(ids: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, mins: Optional[torch.Tensor],
              group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``ids [T] int64`` of a :class:`PackedQ8` weight in the int8 layout (``w``,
    ``scales``, ``mins``, ``group_size`` its fields) dequantized: ``[T, K]`` in ``dtype``, the values of
    :meth:`Q8Weight.dequantize` (float32 product and offset, one rounding), bit for bit.
    The embedding lookup of a model that keeps its quantized embedding only."""
    tile, r = ids // TILE, ids % TILE
    q = w[tile, :, r].to(torch.float32)  # [T, K]
    t, k = q.shape

    def per_group(a: torch.Tensor) -> torch.Tensor:
        a = a[tile, :, r]  # [T, K // G]
        return (a.view(torch.float16) if a.dtype == torch.int16 else a).to(torch.float32).unsqueeze(-1)

    out = q.view(t, k // group_size, group_size) * per_group(scales)
    if mins is not None:
        out = out + per_group(mins)
    return out.view(t, k).to(dtype)


class Q8Embedding(nn.Module):
    """An embedding table held only in its grouped int8 form (a GGUF Q8_0 / Q5_x / Q6_K
    ``token_embd``, :class:`PackedQ8`'s layout, no dense copy): ``ids [T] int64 -> [T, K]``
    in ``dtype`` through :func:`embedding`.

    Buffers: ``w``, ``scales``, ``mins`` (or None), :class:`PackedQ8`'s tensors (shared
    with the LM head's :attr:`~argosy.runtime.models.llama.LlamaForCausalLM.logits_q8`
    when tied).
    """

    def __init__(self, p: PackedQ8, dtype: torch.dtype):
        super().__init__()
        if p.hbits is not None:
            raise ValueError("an embedding is read from the int8 layout only (pack it with max_bits=0)")
        hold_buffers(self, w=p.w, scales=p.scales, mins=p.mins)
        self.group_size, self.dtype = p.group_size, dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return embedding(ids, self.w, self.scales, self.mins, self.group_size, self.dtype)


@register(Q8Weight)
class Q8Method(CpuPackedMethod):
    """A grouped int8 weight (GGUF Q8_0 / Q5_x / Q6_K, 8-bit GPTQ) in a bfloat16 CPU layer
    where the kernel builds: :func:`q8_linear` (float32 math, output rounded to ``x``'s
    dtype) for calls of at most ``INT4_MAX_ROWS`` rows, and for more the layer's dense copy
    or the scratch (:func:`.dequant.q8_dense_linear`).

    Buffers: :class:`PackedQ8`'s ``w``, ``scales``, ``mins`` (or None), ``hbits`` (or None:
    integers that need 8 bits). Integers that fit 5 or 6 bits (Q5_x, Q6_K) are held in the
    5/6-bit layout (:func:`low_bit_form`) up to the bits :func:`low_bits_setting` allows (5 by
    default).
    """

    kind = "grouped int8"

    def __init__(self, p: PackedQ8):
        super().__init__()
        hold_buffers(self, w=p.w, scales=p.scales, mins=p.mins, hbits=p.hbits)
        self.group_size, self.n, self.is_signed = p.group_size, p.n, p.is_signed
        if p.planes:  # the startup summary's format name
            self.kind = f"grouped {4 + p.planes}-bit"

    @classmethod
    def create(cls, whole: Q8Weight, layer) -> Optional["Q8Method"]:
        if layer.weight.dtype != torch.bfloat16 or layer.weight.device.type != "cpu" or kernel() is None:
            return None
        m = cls(PackedQ8.pack(whole, max_bits=low_bits_setting()))
        m.finish(layer)
        return m

    def small(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.argosy.q8_linear(x, self.w, self.scales, self.mins, self.group_size, self.n, x.dtype,
                                          self.hbits, self.is_signed)

    def scratch(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return torch.ops.argosy.q8_dense_linear(x, self.w, self.scales, self.mins, self.group_size, self.n, bias,
                                                self.hbits, self.is_signed)

    def dequantize(self) -> torch.Tensor:
        return dequant.q8_dequantize(self.w, self.scales, self.mins, self.group_size, self.n, hbits=self.hbits,
                                     is_signed=self.is_signed)

    def signature(self) -> tuple:
        return (self.dense_on_demand, self.mins is not None, self.group_size,
                0 if self.hbits is None else self.hbits.shape[1], self.is_signed)
