"""4-bit weights with group-wise affine scales, packed for PyTorch's CPU int4 kernel.

A weight ``W [N, K]`` (N output features, K input features) is stored as integers
``q in [0, 15]`` with one ``scale`` and one ``zero`` per row and group of ``group_size``
consecutive input columns, meaning

    W[n, k] = (q[n, k] - 8) * scale[n, k // g] + zero[n, k // g]

which is the convention of the CUDA W4A16 kernel (:mod:`.triton_w4a16`) and of
``torch.ops.aten._weight_int4pack_mm_for_cpu`` (PyTorch's
``aten/src/ATen/native/cpu/int4mm_kernel.cpp``: ``scales_and_zeros[k // g, n] =
(scale, zero)``, both in the activation dtype, bfloat16 here). GGUF's Q4_0, Q4_1 and Q4_K
blocks map onto it exactly (:mod:`.gguf`), up to the bfloat16 rounding of the scales.

:class:`Int4CpuMethod` runs such a weight in a bfloat16 CPU layer (packed kernel for few
rows, a dense copy or the dequantization scratch for more); on a GPU the Triton W4A16
kernel runs it (:class:`.triton_w4a16.W4A16Method`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

from . import dequant
from .base import CpuPackedMethod, hold_buffers, register

#: Group sizes the CPU kernel accepts (``_weight_int4pack_mm_for_cpu``'s check).
KERNEL_GROUP_SIZES = (32, 64, 128, 256)


@dataclass
class Int4Weight:
    """An unpacked 4-bit weight (host numpy arrays).

    Attributes:
        q: ``[N, K] uint8`` in ``[0, 15]``.
        scale: ``[N, K // group_size] float32``.
        zero: ``[N, K // group_size] float32``.
        group_size: input columns per scale/zero group.
        perm: ``[K] int64`` or None. When set, the columns are stored permuted: column
            ``j`` of ``q`` (and its group ``j // group_size``) is input feature
            ``perm[j]`` of the layer, so ``x @ W.T == x[:, perm] @ Wp.T``. GPTQ's
            act-order (``desc_act``) checkpoints come this way (:mod:`.gptq_awq`).
    """

    q: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    group_size: int
    perm: Optional[np.ndarray] = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def rows(self, start: int, stop: int) -> "Int4Weight":
        """Output rows ``[start, stop)`` (a column-parallel shard or a fused part)."""
        return Int4Weight(self.q[start:stop], self.scale[start:stop], self.zero[start:stop], self.group_size,
                          self.perm)

    def cols(self, start: int, stop: int) -> "Int4Weight":
        """Input columns ``[start, stop)`` (a row-parallel shard).

        Raises:
            ValueError: the range does not start and end on a group boundary, or the
                columns are permuted (:attr:`perm`: a range of input features is not a
                range of stored columns).
        """
        if self.perm is not None:
            raise ValueError("a column range of a weight with permuted columns (GPTQ act-order) is not a range "
                             "of its groups")
        g = self.group_size
        if start % g or stop % g:
            raise ValueError(f"column range [{start}, {stop}) splits a quantization group of {g}")
        return Int4Weight(self.q[:, start:stop], self.scale[:, start // g : stop // g],
                          self.zero[:, start // g : stop // g], g)

    def regroup(self, group_size: int) -> "Int4Weight":
        """The same values with smaller groups (each scale and zero repeated).

        Raises:
            ValueError: ``group_size`` does not divide the current one.
        """
        if self.group_size % group_size:
            raise ValueError(f"group size {group_size} does not divide {self.group_size}")
        r = self.group_size // group_size
        return Int4Weight(self.q, np.repeat(self.scale, r, axis=1), np.repeat(self.zero, r, axis=1), group_size,
                          self.perm)

    def permute_rows(self, order: np.ndarray) -> "Int4Weight":
        """Rows reordered: row ``i`` of the result is row ``order[i]``."""
        return Int4Weight(self.q[order], self.scale[order], self.zero[order], self.group_size, self.perm)

    @staticmethod
    def cat(parts: list["Int4Weight"]) -> "Int4Weight":
        """Stack weights with the same K and group size along the output rows.

        Raises:
            ValueError: mismatched K, group size or column permutation.
        """
        if len({p.group_size for p in parts}) != 1 or len({p.q.shape[1] for p in parts}) != 1:
            raise ValueError("cannot stack int4 weights with different K or group size")
        perm = parts[0].perm
        if any((p.perm is None) != (perm is None) or (perm is not None and not np.array_equal(p.perm, perm))
               for p in parts):
            raise ValueError("cannot stack int4 weights whose columns are permuted differently")
        return Int4Weight(np.concatenate([p.q for p in parts]), np.concatenate([p.scale for p in parts]),
                          np.concatenate([p.zero for p in parts]), parts[0].group_size, perm)

    def dequantize(self, dtype=None, kernel_rounding: bool = True):
        """``W [N, K]`` as a torch tensor (float32 by default), columns in input-feature
        order (:attr:`perm` undone).

        Args:
            dtype: result dtype (torch dtype; None = float32).
            kernel_rounding: compute from the scales and zeros rounded as the packed
                kernels see them (the dense values a large call multiplies): to ``dtype``
                when it is float16 (the CUDA W4A16 kernel's float16 case), else to
                bfloat16 (the CPU int4 kernel; W4A16 in bfloat16); False: from the float32
                scales and zeros (the checkpoint's own values).
        """
        n, k = self.q.shape
        g = self.group_size
        scale = torch.from_numpy(self.scale)
        zero = torch.from_numpy(self.zero)
        if kernel_rounding:
            r = torch.float16 if dtype == torch.float16 else torch.bfloat16
            scale, zero = scale.to(r).float(), zero.to(r).float()
        q = torch.from_numpy(self.q.astype(np.float32)).view(n, k // g, g)
        w = ((q - 8.0) * scale.unsqueeze(-1) + zero.unsqueeze(-1)).view(n, k)
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(1, torch.from_numpy(np.asarray(self.perm, dtype=np.int64)), w)
        return w if dtype is None else w.to(dtype)


def kernel_supports(w: Int4Weight) -> bool:
    """Whether ``_weight_int4pack_mm_for_cpu`` can run ``w``: a supported group size, and
    N and K multiples of 32 (its packing works on 32-wide tiles; a 16-row tail would
    need a padded copy, which these models never need)."""
    n, k = w.shape
    return w.group_size in KERNEL_GROUP_SIZES and n % 32 == 0 and k % 32 == 0 and k % w.group_size == 0


def pack(w: Int4Weight, dtype):
    """Pack for the CPU kernel.

    Returns:
        ``(packed [N, K // 2] uint8, scales_and_zeros [K // g, N, 2] dtype)``.
    Raises:
        ValueError: shapes the kernel cannot run (:func:`kernel_supports`).
    """
    if not kernel_supports(w):
        raise ValueError(f"int4 weight {w.shape} with group size {w.group_size} is not supported by the CPU kernel")
    q = torch.from_numpy(np.ascontiguousarray(w.q, dtype=np.int32))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    sz = torch.stack([torch.from_numpy(w.scale).t(), torch.from_numpy(w.zero).t()], dim=-1)
    return packed, sz.to(dtype).contiguous()


def matmul(x, packed, scales_and_zeros, group_size: int):
    """``x @ W.T`` with the packed weight: ``x [M, K]`` bfloat16 -> ``[M, N]`` bfloat16."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros)


#: Devices whose 4-bit layers run the Triton W4A16 kernel (:mod:`.triton_w4a16`; float16 /
#: bfloat16) for every call. Tests add ``"cpu"`` to run the kernel under Triton's
#: interpreter through the layer.
W4A16_DEVICES = ("cuda",)


@register(Int4Weight)
class _W4A16:
    """Registration of :class:`.triton_w4a16.W4A16Method` (imported on first use: it
    imports Triton, which a CPU server need not load). On a W4A16 device a weight the
    kernel does not take goes to the next method, :class:`Int4CpuMethod`, which runs on
    the CPU only: on a GPU it stays dense."""

    @staticmethod
    def create(whole: Int4Weight, layer):
        if layer.weight.device.type not in W4A16_DEVICES or layer.weight.dtype not in (torch.float16, torch.bfloat16):
            return None
        from . import triton_w4a16

        return triton_w4a16.W4A16Method.create(whole, layer)


@register(Int4Weight)
class Int4CpuMethod(CpuPackedMethod):
    """A 4-bit weight on the CPU: ``_weight_int4pack_mm_for_cpu`` (:func:`matmul`) for
    calls of at most ``INT4_MAX_ROWS`` rows, and for more the layer's dense copy or the
    weight dequantized into the scratch (:func:`.dequant.int4_dense_linear`), which reads
    PyTorch's packed weight itself where its layout is the one checked
    (:func:`.dequant.int4pack_block`), else a second copy of the integers
    (:func:`.dequant.pack_nibbles`, 0.5 bytes a weight).

    Buffers: ``packed [N, K / 2] uint8`` (PyTorch's layout), ``scales_and_zeros [K / g, N,
    2]`` (layer dtype), ``perm [K] int64`` or None (act-order: ``x``'s columns gathered
    first), ``nibbles [N, K / 2] uint8`` or None.
    """

    kind = "int4"

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
                 perm: Optional[torch.Tensor]):
        super().__init__()
        hold_buffers(self, packed=packed, scales_and_zeros=scales_and_zeros, perm=perm, nibbles=None)
        self.group_size = group_size
        #: row block of :attr:`packed`'s layout the scratch kernel reads (64 or 32), or 0
        #: where it reads :attr:`nibbles` (or the layer keeps its dense copy)
        self.block = 0

    @classmethod
    def create(cls, whole: Int4Weight, layer) -> Optional["Int4CpuMethod"]:
        dev = layer.weight.device
        if dev.type != "cpu" or not kernel_supports(whole):
            return None
        packed, sz = pack(whole, layer.weight.dtype)
        perm = None if whole.perm is None else torch.as_tensor(whole.perm, dtype=torch.int64, device=dev)
        m = cls(packed.to(dev), sz.to(dev), whole.group_size, perm)
        m.finish(layer)
        if m.dense_on_demand:
            m.block = dequant.int4pack_block()
            if not m.block:
                m.nibbles = dequant.pack_nibbles(whole.q)
        return m

    def small(self, x: torch.Tensor) -> torch.Tensor:
        xp = x if self.perm is None else x.index_select(1, self.perm)
        return matmul(xp, self.packed, self.scales_and_zeros, self.group_size)

    def scratch(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return torch.ops.argosy.int4_dense_linear(x, self.packed if self.block else self.nibbles,
                                                  self.scales_and_zeros, self.group_size, self.block, self.perm, bias)

    def dequantize(self) -> torch.Tensor:
        w = (dequant.int4pack_dequantize(self.packed, self.scales_and_zeros, self.group_size, self.block).contiguous()
             if self.block else dequant.int4_dequantize(self.nibbles, self.scales_and_zeros, self.group_size))
        return w if self.perm is None else torch.empty_like(w).index_copy_(1, self.perm, w)

    def signature(self) -> tuple:
        return (self.dense_on_demand, self.block, self.nibbles is not None, self.group_size, self.perm is not None)


class Int4Embedding(nn.Module):
    """An embedding table held in its 4-bit form (a GGUF Q4_0 / Q4_1 / Q4_K ``token_embd``
    of a model whose LM head is a separate tensor, kept without dense copies): lookups
    dequantize their rows, ``(q - 8) * scale + zero`` in float32 rounded once to the model
    dtype, the values of :meth:`Int4Weight.dequantize` with ``kernel_rounding=False`` bit
    for bit. Traceable (gathers, shifts, one multiply-add), so it runs inside the compiled
    decode graphs. 0.5 byte a weight plus 8 bytes a group (float32 scale and zero, exact
    for every 4-bit GGUF type; Q4_K's are products of 6-bit sub-scales and float16 ones):
    in groups of 32, 0.75 bytes a weight, so a 128,256 x 4,096 table holds 394 MB instead
    of bfloat16's 1,051 MB.

    Buffers: ``packed [V, K / 2] uint8`` (column ``2j`` in the low nibble, ``2j + 1`` in
    the high one), ``scales`` and ``zeros [V, K / g] float32``; rows past the weight's own
    (the short last slice of a vocabulary-parallel rank) are zero.

    Args:
        w: the weight ``[N, K]`` (no column permutation, ``K`` even), ``N <= rows``.
        rows: the table's rows (this rank's vocabulary slice).
        dtype: the lookups' dtype.
    Raises:
        ValueError: a permuted or odd-width weight, or more rows than ``rows``.
    """

    def __init__(self, w: Int4Weight, rows: int, dtype: torch.dtype):
        super().__init__()
        n, k = w.shape
        if w.perm is not None or k % 2 or n > rows:
            raise ValueError(f"an int4 embedding of {n} x {k} (permuted: {w.perm is not None}) cannot be held "
                             f"packed in {rows} rows")
        q = np.zeros((rows, k), dtype=np.uint8)
        q[:n] = w.q
        packed = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)

        def groups(a: np.ndarray) -> torch.Tensor:
            full = np.zeros((rows, k // w.group_size), dtype=np.float32)
            full[:n] = a
            return torch.from_numpy(full)

        hold_buffers(self, packed=torch.from_numpy(np.ascontiguousarray(packed)), scales=groups(w.scale),
                     zeros=groups(w.zero))
        self.group_size = w.group_size
        self.width = k
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids [T] int64`` -> rows ``[T, K]`` in :attr:`dtype` (``T`` may be 0)."""
        p = self.packed[ids]  # [T, K / 2]
        t, k, g = p.shape[0], self.width, self.group_size
        q = torch.stack((p & 15, p >> 4), dim=-1).view(t, k // g, g).to(torch.float32)
        w = (q - 8.0) * self.scales[ids].unsqueeze(-1) + self.zeros[ids].unsqueeze(-1)
        return w.view(t, k).to(self.dtype)
