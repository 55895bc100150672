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

from .base import RowScaledWeight


@dataclass
class Int8Weight(RowScaledWeight):
    """An int8 weight with one scale per output row: ``W[n, k] = q[n, k] * scale[n]``
    (slicing and stacking from :class:`~.base.RowScaledWeight`).

    Attributes:
        q: ``[N, K] int8`` torch tensor.
        scale: ``[N] float32``.
    """

    def dequantize(self, dtype=torch.float32, kernel_rounding: bool = True) -> torch.Tensor:
        """``W [N, K]``; ``kernel_rounding``: from the scales rounded to bfloat16 as
        ``_weight_int8pack_mm`` takes them (the values a large call multiplies,
        :mod:`.dequant`)."""
        s = self.scale.to(torch.bfloat16).float() if kernel_rounding else self.scale.float()
        return (self.q.float() * s[:, None]).to(dtype)

