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

The module imports torch only inside functions that need it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

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
        import torch

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
    import torch

    if not kernel_supports(w):
        raise ValueError(f"int4 weight {w.shape} with group size {w.group_size} is not supported by the CPU kernel")
    q = torch.from_numpy(np.ascontiguousarray(w.q, dtype=np.int32))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    sz = torch.stack([torch.from_numpy(w.scale).t(), torch.from_numpy(w.zero).t()], dim=-1)
    return packed, sz.to(dtype).contiguous()


def matmul(x, packed, scales_and_zeros, group_size: int):
    """``x @ W.T`` with the packed weight: ``x [M, K]`` bfloat16 -> ``[M, N]`` bfloat16."""
    import torch

    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros)
