"""int8 weights with one scale per output row, for PyTorch's ``_weight_int8pack_mm``.

``W[n, k] = q[n, k] * scale[n]`` with ``q`` int8: the layout of
``torch.ops.aten._weight_int8pack_mm(x [M, K] bf16, q [N, K] int8, scale [N] bf16)``
(``aten/src/ATen/native/cpu/int8mm_kernel.cpp``), as compressed-tensors ``int-quantized``
checkpoints with per-channel (or per-tensor) scales store them (:mod:`.compressed_tensors`).

GGUF's 8/6/5-bit types are not requantized to this form: their group-wise scales go to
:mod:`.q8_0` without loss. A per-row requantization of those files was measured and
failed the accuracy gate (mean KL 0.0045 against llama.cpp's 0.0034, see the README).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Int8Weight:
    """An int8 weight with one scale per output row: ``W[n, k] = q[n, k] * scale[n]``.

    Attributes:
        q: ``[N, K] int8`` torch tensor.
        scale: ``[N] float32``.
    """

    q: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def rows(self, start: int, stop: int) -> "Int8Weight":
        """Output rows ``[start, stop)`` (a column-parallel shard or a fused part)."""
        return Int8Weight(self.q[start:stop], self.scale[start:stop])

    def cols(self, start: int, stop: int) -> "Int8Weight":
        """Input columns ``[start, stop)`` (a row-parallel shard; scales are per row)."""
        return Int8Weight(self.q[:, start:stop].contiguous(), self.scale)

    @staticmethod
    def cat(parts: list["Int8Weight"]) -> "Int8Weight":
        """Stack along the output rows."""
        return Int8Weight(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]))

    def dequantize(self, dtype=torch.float32, kernel_rounding: bool = True) -> torch.Tensor:
        """``W [N, K]``; ``kernel_rounding``: from the scales rounded to bfloat16 as
        ``_weight_int8pack_mm`` takes them (the dense copy beside the int8 one)."""
        s = self.scale.to(torch.bfloat16).float() if kernel_rounding else self.scale.float()
        return (self.q.float() * s[:, None]).to(dtype)

