"""FP8 (OCP E4M3) linear weights with one scale per output row, and the FP8 matmul.

``W[n, k] = q[n, k] * scale[n]`` with ``q`` in ``float8_e4m3fn`` (max 448, OCP 8-bit
floating point spec v1.0). Two sources:

- compressed-tensors ``float-quantized`` checkpoints (per-tensor or per-channel scales,
  :mod:`.compressed_tensors`; a per-tensor scale is repeated per row, the same values);
- online quantization of a 16/32-bit checkpoint (``--quantization fp8``, as vLLM's online
  FP8): :meth:`Fp8Weight.quantize`, one scale per output row ``amax(|W[n, :]|) / 448``
  (compressed-tensors' symmetric min-max scale for an 8-bit float), the weight divided,
  saturated to +-448 and rounded to nearest-even in E4M3. Under tensor parallelism each
  rank quantizes its own shard (as vLLM does after sharding): a row-parallel shard's
  scales come from its columns only.

Execution (:class:`~argosy.runtime.layers.Linear`): on a GPU where PyTorch's
``torch._scaled_mm`` takes row-wise scales (probed once, :func:`scaled_mm_supported`;
sm_90 with PyTorch 2.5+), the layer keeps only the FP8 weight (1 byte a weight plus 4 a
row) and every call quantizes its activations per token (``amax(|x[m, :]|) / 448``,
dynamic, as vLLM's ``Fp8LinearMethod``) and runs :func:`fp8_linear`. Elsewhere the layer
runs dense on the weight dequantized once at load (the FP8 values, no memory saved):
PyTorch's CPU ``_scaled_mm`` was measured 20-30x slower than bfloat16 ``F.linear``
(3072 x 576, 2 cores: 1 row 5.1 ms vs 0.23 ms, 64 rows 6.5 ms vs 0.61 ms).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

#: ``torch.finfo(torch.float8_e4m3fn).max``
E4M3_MAX = 448.0
#: smallest scale used, so an all-zero row or token does not divide by zero
MIN_SCALE = 1e-12


@dataclass
class Fp8Weight:
    """An E4M3 weight with one float32 scale per output row.

    Attributes:
        q: ``[N, K] float8_e4m3fn``.
        scale: ``[N] float32``.
    """

    q: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    @staticmethod
    def quantize(w: torch.Tensor) -> "Fp8Weight":
        """Per-row symmetric E4M3 quantization of ``w [N, K]`` (any float dtype): scale
        ``amax(|w[n]|) / 448`` in float32, values saturated to +-448 and rounded to nearest
        (PyTorch's float8 conversion). Raises ValueError for a tensor that is not 2-D."""
        if w.dim() != 2:
            raise ValueError(f"an FP8 weight is 2-D, got shape {tuple(w.shape)}")
        w32 = w.to(torch.float32)
        scale = (w32.abs().amax(dim=1) / E4M3_MAX).clamp_min(MIN_SCALE)
        q = (w32 / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        return Fp8Weight(q.contiguous(), scale.contiguous())

    @staticmethod
    def from_checkpoint(q: torch.Tensor, scale: torch.Tensor) -> "Fp8Weight":
        """A checkpoint's E4M3 weight ``q [N, K]`` with a per-tensor (one element) or
        per-row (``N`` elements, any shape) scale. Raises ValueError for another scale shape
        or a weight that is not ``float8_e4m3fn``."""
        if q.dtype != torch.float8_e4m3fn or q.dim() != 2:
            raise ValueError(f"an FP8 weight is a 2-D float8_e4m3fn tensor, got {q.dtype} {tuple(q.shape)}")
        s = scale.to(torch.float32).flatten()
        if s.numel() not in (1, q.shape[0]):
            raise ValueError(f"weight_scale {tuple(scale.shape)} is neither per-tensor nor per-row for "
                             f"{tuple(q.shape)}")
        return Fp8Weight(q.contiguous(), s.expand(q.shape[0]).contiguous())

    def rows(self, start: int, stop: int) -> "Fp8Weight":
        """Output rows ``[start, stop)`` (a column-parallel shard or a fused part)."""
        return Fp8Weight(self.q[start:stop], self.scale[start:stop])

    def cols(self, start: int, stop: int) -> "Fp8Weight":
        """Input columns ``[start, stop)`` (a row-parallel shard; scales are per row)."""
        return Fp8Weight(self.q[:, start:stop].contiguous(), self.scale)

    @staticmethod
    def cat(parts: list["Fp8Weight"]) -> "Fp8Weight":
        """Stack along the output rows."""
        return Fp8Weight(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]))

    def dequantize(self, dtype: torch.dtype = torch.float32, kernel_rounding: bool = False) -> torch.Tensor:
        """``W [N, K]`` in ``dtype`` (float32 product, then rounded once). ``kernel_rounding``
        is accepted for the other weight classes' signature; FP8 has no rounded copy."""
        return (self.q.to(torch.float32) * self.scale[:, None]).to(dtype)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token E4M3 quantization of activations ``x [M, K]``:
    ``(x_q [M, K] float8_e4m3fn, scale [M, 1] float32)`` with ``x ~ x_q * scale``."""
    x32 = x.to(torch.float32)
    scale = (x32.abs().amax(dim=1, keepdim=True) / E4M3_MAX).clamp_min(MIN_SCALE)
    return (x32 / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def fp8_linear(x: torch.Tensor, q: torch.Tensor, scale_row: torch.Tensor, bias: Optional[torch.Tensor] = None
               ) -> torch.Tensor:
    """``y = x W^T (+ bias)`` with FP8 weight ``q [N, K] float8_e4m3fn`` (row-major) and
    ``scale_row [1, N] float32``, activations ``x [M, K]`` (bfloat16/float16/float32)
    quantized per token: ``torch._scaled_mm(x_q, q.t(), scale_a [M, 1], scale_b [1, N],
    out_dtype=bfloat16)`` (row-wise scaling; PyTorch requires bfloat16 output for it),
    returned in ``x.dtype`` as ``[M, N]``. ``K`` and ``N`` must be multiples of 16."""
    xq, xs = quantize_per_token(x)
    y = torch._scaled_mm(xq, q.t(), scale_a=xs, scale_b=scale_row, out_dtype=torch.bfloat16)
    y = y if y.dtype == x.dtype else y.to(x.dtype)
    return y if bias is None else y + bias


def shape_supported(n: int, k: int) -> bool:
    """Whether ``_scaled_mm`` takes a weight of ``n`` rows and ``k`` columns (both
    multiples of 16)."""
    return n % 16 == 0 and k % 16 == 0


_PROBED: dict[str, bool] = {}


def scaled_mm_supported(device: torch.device) -> bool:
    """Whether :func:`fp8_linear` runs on ``device``: a CUDA device of compute capability
    8.9 or newer whose PyTorch build runs a row-wise scaled ``_scaled_mm`` (tried once per
    device on a 16 x 32 x 16 product, the answer kept). False on the CPU (slower than
    dense there, see the module doc)."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    key = str(device)
    if key not in _PROBED:
        ok = torch.cuda.get_device_capability(device) >= (8, 9)
        if ok:
            try:
                w = Fp8Weight.quantize(torch.randn(16, 32, device=device))
                fp8_linear(torch.randn(16, 32, device=device, dtype=torch.bfloat16), w.q, w.scale[None, :])
                torch.cuda.synchronize(device)
            except (RuntimeError, NotImplementedError):
                ok = False
        _PROBED[key] = ok
    return _PROBED[key]
