"""int8 weights with one scale per output row, for PyTorch's ``_weight_int8pack_mm``
and, with int8 activations, ``torch._int_mm``.

``W[n, k] = q[n, k] * scale[n]`` with ``q`` int8: the layout of
``torch.ops.aten._weight_int8pack_mm(x [M, K] bf16, q [N, K] int8, scale [N] bf16)``
(``aten/src/ATen/native/cpu/int8mm_kernel.cpp``), as compressed-tensors ``int-quantized``
checkpoints with per-channel (or per-tensor) scales store them (:mod:`.compressed_tensors`).

A W8A8 checkpoint (``input_activations``: 8-bit int, dynamic, per token) also quantizes
each layer's input per token (:func:`quantize_per_token`, compressed-tensors' formula);
:func:`w8a8_linear` multiplies the int8 values exactly (``torch._int_mm``, int32
accumulation) and rescales in float32, as vLLM runs these checkpoints.

GGUF's 8/6/5-bit types are not requantized to this form: their group-wise scales go to
:mod:`.q8_0` without loss. A per-row requantization of those files was measured and
failed the accuracy gate (mean KL 0.0045 against llama.cpp's 0.0034, see the README).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F

from . import dequant
from .base import CpuPackedMethod, LinearMethod, RowScaledMethod, RowScaledWeight, register


@dataclass
class Int8Weight(RowScaledWeight):
    """An int8 weight with one scale per output row: ``W[n, k] = q[n, k] * scale[n]``
    (slicing and stacking from :class:`~.base.RowScaledWeight`).

    Attributes:
        q: ``[N, K] int8`` torch tensor.
        scale: ``[N] float32``.
        dynamic_activations: whether the layer quantizes its input to int8 per token
            (a W8A8 checkpoint), or runs weight-only.
    """

    dynamic_activations: bool = False

    def dequantize(self, dtype=torch.float32, kernel_rounding: bool = True) -> torch.Tensor:
        """``W [N, K]``; ``kernel_rounding``: from the scales rounded to bfloat16 as
        ``_weight_int8pack_mm`` takes them (the values a large call multiplies,
        :mod:`.dequant`), for a weight-only layer (a W8A8 layer rescales with the float32
        scales)."""
        s = self.scale.float()
        if kernel_rounding and not self.dynamic_activations:
            s = s.to(torch.bfloat16).float()
        return (self.q.float() * s[:, None]).to(dtype)

    @classmethod
    def cat(cls, parts: list) -> "Int8Weight":
        return replace(super().cat(parts), dynamic_activations=all(p.dynamic_activations for p in parts))


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token symmetric int8 quantization of ``x [M, K]`` (any float dtype):
    ``(x_q [M, K] int8, scale [M, 1] float32)`` with ``x ~ x_q * scale``, computed in
    float32 as compressed-tensors computes it (``calculate_qparams`` then ``_quantize``):
    ``scale = max(|x|) / 127.5`` per row (a zero row: float32 eps), ``x_q =
    clamp(round(x / scale), -128, 127)`` (round half to even)."""
    x32 = x.to(torch.float32)
    scale = x32.abs().amax(dim=1, keepdim=True) / 127.5
    scale = torch.where(scale == 0, torch.finfo(torch.float32).eps, scale)
    return torch.round(x32 / scale).clamp(-128, 127).to(torch.int8), scale


def fake_quantize_per_token(x: torch.Tensor) -> torch.Tensor:
    """``x`` through :func:`quantize_per_token` and back, in ``x.dtype``: a W8A8 layer's
    input where its weight runs dense (float32, or off the CPU)."""
    q, scale = quantize_per_token(x)
    return (q.to(torch.float32) * scale).to(x.dtype)


def w8a8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
    """``y [M, N] = quant(x) W^T (+ bias)`` for ``x [M, K]`` (bfloat16 on the CPU), ``q
    [N, K] int8`` and ``scale [N] float32``: ``x`` quantized per token
    (:func:`quantize_per_token`), ``torch._int_mm(x_q, q.t())`` (exact int32 sums; oneDNN
    on the CPU), then ``acc * x_scale * scale`` in float32, rounded to ``x.dtype``. Inside
    the compiled graphs inductor fuses the quantization and the rescale into one pass each."""
    xq, xs = quantize_per_token(x)
    y = (torch._int_mm(xq, q.t()).to(torch.float32) * xs * scale).to(x.dtype)
    return y if bias is None else y + bias



@register(Int8Weight)
class W8A8Method(RowScaledMethod, LinearMethod):
    """An int8 weight with dynamic per-token int8 activations (a W8A8 checkpoint). In a
    bfloat16 CPU layer every call runs :func:`w8a8_linear` (``torch._int_mm``) and the
    layer holds no dense weight at all (buffers ``weight [N, K] int8``, ``scales [N]
    float32``); elsewhere (float32, off the CPU) the layer keeps its dense weight (the
    int8 values times the scales) and multiplies the input after
    :func:`fake_quantize_per_token`: the scheme's values, no speed-up."""

    kind = "int8"

    @classmethod
    def create(cls, whole: Int8Weight, layer) -> Optional["W8A8Method"]:
        if not whole.dynamic_activations:
            return None
        w = layer.weight
        if w.dtype != torch.bfloat16 or w.device.type != "cpu":
            return cls(None, None)
        m = cls(whole.q.contiguous().to(w.device), whole.scale.to(w.device, torch.float32).contiguous())
        layer.free_dense_weight()
        return m

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None:
            return w8a8_linear(x, self.weight, self.scales, layer.bias)
        return F.linear(fake_quantize_per_token(x), layer.weight, layer.bias)

    def dense_weight(self, layer) -> torch.Tensor:
        if self.weight is None:
            return layer.weight
        return Int8Weight(self.weight, self.scales, True).dequantize(layer.weight.dtype)

    def signature(self) -> tuple:
        return (self.weight is not None,)


@register(Int8Weight)
class Int8CpuMethod(RowScaledMethod, CpuPackedMethod):
    """A weight-only int8 weight (per-row scales) in a bfloat16 CPU layer:
    ``_weight_int8pack_mm`` for calls of at most ``INT4_MAX_ROWS`` rows (one 3072 x 576
    weight: 1 row 67 vs 184 us dense, 8 rows 246 vs 206 us), and for more the layer's
    dense copy or the scratch (:func:`.dequant.int8_dense_linear`).

    Buffers: ``weight [N, K] int8``, ``scales [N] bfloat16`` (the kernel's dtype).
    """

    kind = "int8"

    @classmethod
    def create(cls, whole: Int8Weight, layer) -> Optional["Int8CpuMethod"]:
        w = layer.weight
        if whole.dynamic_activations or w.dtype != torch.bfloat16 or w.device.type != "cpu":
            return None
        m = cls(whole.q.contiguous().to(w.device), whole.scale.to(torch.bfloat16).to(w.device))
        m.finish(layer)
        return m

    def small(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scales)

    def scratch(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return torch.ops.argosy.int8_dense_linear(x, self.weight, self.scales, bias)

    def dequantize(self) -> torch.Tensor:
        return dequant.int8_dequantize(self.weight, self.scales)
