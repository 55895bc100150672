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

import logging
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F

from .base import LinearMethod, RowScaledMethod, RowScaledWeight, register

logger = logging.getLogger(__name__)

#: ``torch.finfo(torch.float8_e4m3fn).max``
E4M3_MAX = 448.0
#: smallest scale used, so an all-zero row or token does not divide by zero
MIN_SCALE = 1e-12


@dataclass
class Fp8Weight(RowScaledWeight):
    """An E4M3 weight with one float32 scale per output row (slicing and stacking from
    :class:`~.base.RowScaledWeight`).

    Attributes:
        q: ``[N, K] float8_e4m3fn``.
        scale: ``[N] float32``.
        dynamic_activations: whether the layer may quantize its activations per token
            (``_scaled_mm``); False for a weight-only FP8 checkpoint (no
            ``input_activations``), which then runs dense on its FP8 values everywhere,
            as vLLM runs such checkpoints weight-only.
    """

    dynamic_activations: bool = True

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
    def from_checkpoint(q: torch.Tensor, scale: torch.Tensor, dynamic_activations: bool = True) -> "Fp8Weight":
        """A checkpoint's E4M3 weight ``q [N, K]`` with a per-tensor (one element) or
        per-row (``N`` elements, any shape) scale. Raises ValueError for another scale shape
        or a weight that is not ``float8_e4m3fn``."""
        if q.dtype != torch.float8_e4m3fn or q.dim() != 2:
            raise ValueError(f"an FP8 weight is a 2-D float8_e4m3fn tensor, got {q.dtype} {tuple(q.shape)}")
        s = scale.to(torch.float32).flatten()
        if s.numel() not in (1, q.shape[0]):
            raise ValueError(f"weight_scale {tuple(scale.shape)} is neither per-tensor nor per-row for "
                             f"{tuple(q.shape)}")
        return Fp8Weight(q.contiguous(), s.expand(q.shape[0]).contiguous(), dynamic_activations)

    @classmethod
    def cat(cls, parts: list["Fp8Weight"]) -> "Fp8Weight":
        """Stack along the output rows; dynamic activations only if every part has them."""
        return replace(super().cat(parts), dynamic_activations=all(p.dynamic_activations for p in parts))

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
    device on a 16 x 32 x 16 product, the answer kept; a failing probe is logged once as a
    warning). False on the CPU (slower than dense there, see the module doc)."""
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
            except (RuntimeError, NotImplementedError) as e:
                logger.warning("%s: torch._scaled_mm with row-wise scales failed (%s); FP8 layers run dense "
                               "on their FP8 values (no memory saved)", device, str(e).splitlines()[0] if str(e) else e)
                ok = False
        _PROBED[key] = ok
    return _PROBED[key]


@register(Fp8Weight)
class Fp8ScaledMMMethod(RowScaledMethod, LinearMethod):
    """An FP8 weight on ``torch._scaled_mm`` with per-token FP8 activations
    (:func:`fp8_linear`) for every call, where the GPU takes it (:func:`scaled_mm_supported`,
    :func:`shape_supported`, a checkpoint with dynamic activations); the layer's dense
    weight is freed.

    Buffers: ``weight [N, K] float8_e4m3fn``, ``scales [1, N] float32``.
    """

    kind = "fp8"

    @classmethod
    def create(cls, whole: Fp8Weight, layer) -> Optional["Fp8ScaledMMMethod"]:
        dev = layer.weight.device
        if not (whole.dynamic_activations and shape_supported(layer.out_features, layer.in_features)
                and scaled_mm_supported(dev)):
            return None
        m = cls(whole.q.to(dev).contiguous(), whole.scale.to(dev, torch.float32)[None, :].contiguous())
        layer.free_dense_weight()
        return m

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.scales, layer.bias)

    def dense_weight(self, layer) -> torch.Tensor:
        return Fp8Weight(self.weight, self.scales[0]).dequantize(layer.weight.dtype)


@register(Fp8Weight)
class Fp8DenseMethod(LinearMethod):
    """An FP8 weight where ``_scaled_mm`` does not run (the CPU, older GPUs, other shapes,
    weight-only checkpoints): the layer's dense weight holds the FP8 values (times the
    scales, in the layer's dtype) and every call is a dense product; no memory saved."""

    kind = "fp8"

    @classmethod
    def create(cls, whole: Fp8Weight, layer) -> "Fp8DenseMethod":
        return cls()

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, layer.weight, layer.bias)


# --------------------------------------------------------------- the ``fp8`` checkpoint format
@dataclass(frozen=True)
class Fp8Scheme:
    """A ``quant_method: fp8`` checkpoint (vLLM's and ``transformers``' FP8 format, e.g. the
    ``*-FP8`` releases of Qwen and DeepSeek): each quantized linear layer stores ``weight``
    ``[N, K] float8_e4m3fn`` and ``weight_scale_inv`` (or, in older checkpoints,
    ``weight_scale``) in float32, multiplied to dequantize: one value per tensor, or one
    per ``weight_block_size`` block ``[ceil(N / b0), ceil(K / b1)]``. Layers in
    ``modules_to_not_convert`` (``transformers``) or ``ignored_layers`` (vLLM) are plain
    float weights; any other float projection weight is refused. Static activation scales
    (``input_scale``) are not used: activations are quantized per token where
    ``_scaled_mm`` runs (see the module doc).

    Attributes:
        block: ``(b0, b1)`` rows and columns a scale covers, or None (per tensor).
        activation_scheme: ``dynamic`` or ``static`` (as written; logged).
        not_converted: module names left in float.
    """

    block: Optional[tuple[int, int]]
    activation_scheme: str
    not_converted: tuple[str, ...] = ()
    method: str = "fp8"


#: the tensor names (after the layer's prefix) of a ``quant_method: fp8`` layer
FP8_SCALE_NAMES = ("weight_scale_inv", "weight_scale")


def parse_config(qc: dict) -> Fp8Scheme:
    """Read a ``quant_method: fp8`` ``quantization_config``.

    Raises:
        UnsupportedQuantization: a ``weight_block_size`` that is not two positive integers,
            an ``activation_scheme`` other than dynamic / static, or experts stored in
            another type (``expert_dtype``).
    """
    from .base import UnsupportedQuantization

    block = qc.get("weight_block_size")
    if block is not None:
        if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0
                                                                             for b in block)):
            raise UnsupportedQuantization(f"fp8 weight_block_size {block!r} is not supported (two positive integers "
                                          "or none are)")
        block = (int(block[0]), int(block[1]))
    scheme = str(qc.get("activation_scheme", "dynamic"))
    if scheme not in ("dynamic", "static"):
        raise UnsupportedQuantization(f"fp8 activation_scheme {scheme!r} is not supported (dynamic or static is)")
    if qc.get("expert_dtype") not in (None, "fp8"):
        raise UnsupportedQuantization(f"fp8 expert_dtype {qc.get('expert_dtype')!r} is not supported")
    skip = [*(qc.get("modules_to_not_convert") or ()), *(qc.get("ignored_layers") or ())]
    return Fp8Scheme(block, scheme, tuple(str(m) for m in skip))


def quantized_part(name: str, dtype: str) -> Optional[str]:
    """``"weight"`` / ``"weight_scale"`` when checkpoint tensor ``name`` (safetensors dtype
    ``dtype``) is part of an FP8 layer, else None (plain: norms, embeddings, float layers
    left unconverted, static ``input_scale`` tensors, which the model ignores)."""
    part = name.rpartition(".")[2]
    if part == "weight":
        return "weight" if dtype == "F8_E4M3" else None
    return "weight_scale" if part in FP8_SCALE_NAMES else None


def complete(parts: dict) -> bool:
    """Whether ``parts`` holds one FP8 layer's weight and scale."""
    return "weight" in parts and "weight_scale" in parts


def decode(parts: dict[str, torch.Tensor], scheme: Fp8Scheme) -> "Fp8Weight | torch.Tensor":
    """One layer -> an :class:`Fp8Weight` (a per-tensor scale, the file's bytes kept) or,
    for block scales, its float32 weight ``[N, K]`` (``q * scale`` block by block, as
    vLLM's and ``transformers``' dequantization).

    Raises:
        ValueError: a weight that is not ``float8_e4m3fn``, or a scale whose shape fits
            neither one value nor the blocks.
    """
    q, scale = parts["weight"], parts["weight_scale"].to(torch.float32)
    if q.dtype != torch.float8_e4m3fn or q.dim() != 2:
        raise ValueError(f"an fp8 layer's weight is a 2-D float8_e4m3fn tensor, got {q.dtype} {tuple(q.shape)}")
    n, k = q.shape
    if scale.numel() == 1:
        return Fp8Weight.from_checkpoint(q, scale)
    if scheme.block is None:
        raise ValueError(f"weight scale {tuple(scale.shape)} for {tuple(q.shape)} without weight_block_size")
    b0, b1 = scheme.block
    want = (-(-n // b0), -(-k // b1))
    if tuple(scale.shape) != want:
        raise ValueError(f"weight scale {tuple(scale.shape)} does not match {tuple(q.shape)} in blocks of "
                         f"{b0} x {b1} (expected {want})")
    full = scale.repeat_interleave(b0, dim=0)[:n].repeat_interleave(b1, dim=1)[:, :k]
    return q.to(torch.float32) * full
