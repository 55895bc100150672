"""compressed-tensors checkpoints (``quant_method: compressed-tensors``), as written by
``llmcompressor`` and vLLM's other tools, read onto Argosy's weight classes.

Supported so far: ``pack-quantized`` W4A16, i.e. 4-bit integer weights, no activation
quantization, ``group`` or ``channel`` strategy, symmetric or with zero points. Per
linear layer the checkpoint holds ``weight_packed [N, ceil(K / 8)] int32`` (eight 4-bit
values per word, offset by 8; compressed-tensors' ``pack_to_int32``), ``weight_scale
[N, K / g]`` (``g`` = ``group_size``, or ``K`` for ``channel``), ``weight_shape [2]`` and,
when asymmetric, ``weight_zero_point`` packed the same way along the output dimension.
The weight is ``W = (q - zero_point) * scale`` (compressed-tensors' ``dequantize``), which
is :class:`~.int4.Int4Weight`'s ``(q' - 8) * scale + zero`` with ``q' = q + 8`` and
``zero = -zero_point * scale``: lossless, and the same packed int4 kernel as GGUF's 4-bit
types runs it. Group sizes the kernel does not take but that are multiples of 32 (the
``channel`` strategy's ``K`` among them) are re-expressed as groups of 32 by repeating
their scales, exactly.

8-bit ``int-quantized`` checkpoints (int8 weights with per-channel or per-tensor scales)
whose activations are dynamic per-token symmetric int8 (W8A8, :data:`W8A8_ACTIVATIONS`)
run that whole scheme at every dtype: their layers come as :class:`Int8Weight` with
``dynamic_activations`` and run :func:`~.int8.w8a8_linear` (``torch._int_mm``) on the CPU
in bfloat16, or their dense int8 values after :func:`~.int8.fake_quantize_per_token`
elsewhere. Other int8 checkpoints (no, static or asymmetric activation quantization) and
``float-quantized`` ones (FP8: e4m3 weights, per-channel or per-tensor scales) are served
weight-only, the activation quantization not applied, as vLLM's weight-only FP8 fallback
on GPUs without FP8 compute does not apply it either: int8 weights on the CPU fast path
(bfloat16) run on PyTorch's ``_weight_int8pack_mm`` (int8 weights, bfloat16 activations,
one scale per output row) for small batches, and larger ones multiply a dense copy or,
where the layer keeps none, the weight dequantized per call into a scratch matrix, like
the int4 weights (:mod:`argosy.runtime.layers.linear`, :mod:`.dequant`); FP8 weights run
on ``torch._scaled_mm`` where a GPU takes row-wise scales (:mod:`.fp8`), and otherwise,
like every weight-only int8 layer in float32 or on a GPU, dense.

Everything else in a ``quantization_config`` (other bit widths, block or group FP8,
sparsity, several config groups) is refused at load with one line naming it, as are AWQ,
GPTQ and ``fp8`` (vLLM's own format) checkpoints. Unpacking and dequantizing use
compressed-tensors' own functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

from .base import UnsupportedQuantization  # noqa: F401  (re-exported)
from .int4 import KERNEL_GROUP_SIZES, Int4Weight
from .int8 import Int8Weight  # noqa: F401  (re-exported: the int8 weight class these checkpoints load into)

#: The suffixes of one quantized linear layer's tensors in the checkpoint.
PARTS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")


@dataclass(frozen=True)
class W4A16Scheme:
    """The one compressed-tensors scheme supported so far.

    Attributes:
        group_size: input columns per scale (None: ``channel``, one scale per row).
        symmetric: no zero points in the checkpoint.
    """

    group_size: Optional[int]
    symmetric: bool


@dataclass(frozen=True)
class Int8WeightScheme:
    """``int-quantized`` (W8A8) or ``float-quantized`` (FP8) 8-bit weights: int8 weights
    with :data:`W8A8_ACTIVATIONS` run with int8 activations (:func:`~.int8.w8a8_linear`),
    FP8 ones with per-token activations on ``_scaled_mm`` where a GPU takes it; otherwise
    weight-only (int8 on the int8 kernel, or dequantized: see the module doc).

    Attributes:
        format: ``int-quantized`` or ``float-quantized``.
        weights: the config group's ``weights`` arguments (compressed-tensors'
            ``QuantizationArgs`` fields).
        activations: what the checkpoint asks for its activations (for the log), or None.
    """

    format: str
    weights: tuple
    activations: Optional[str]

    @property
    def symmetric(self) -> bool:
        return bool(dict(self.weights).get("symmetric", True))


Scheme = Union[W4A16Scheme, Int8WeightScheme]


#: The tensor names (after the layer's prefix) of a dequantized 8-bit layer.
INT8_PARTS = ("weight", "weight_scale", "weight_zero_point")


def quantized_part(name: str, dtype: str, scheme: Scheme) -> Optional[str]:
    """The part name if checkpoint tensor ``name`` (of safetensors dtype ``dtype``, e.g.
    ``"I8"``, ``"F8_E4M3"``, ``"BF16"``) belongs to a quantized layer of ``scheme`` (to be
    gathered with the layer's other parts), else None (a plain tensor: norms, embeddings,
    an ignored ``lm_head``)."""
    part = name.rpartition(".")[2]
    if part == "weight_zero_point" and scheme.symmetric:
        return None  # older writers kept all-zero points of symmetric layers: not a part
    if isinstance(scheme, W4A16Scheme):
        return part if part in PARTS else None
    if part == "weight":
        return part if dtype in ("I8", "F8_E4M3") else None
    return part if part in INT8_PARTS[1:] else None


def complete(parts: dict, scheme: Scheme) -> bool:
    """Whether ``parts`` holds every tensor one layer of ``scheme`` needs."""
    if isinstance(scheme, Int8WeightScheme):
        need = INT8_PARTS if not scheme.symmetric else INT8_PARTS[:2]
    else:
        need = PARTS if not scheme.symmetric else PARTS[:3]
    return all(p in parts for p in need)


#: the activation scheme of a W8A8 checkpoint that runs with int8 activations
#: (:attr:`Int8WeightScheme.activations`' wording): dynamic symmetric per-token int8
W8A8_ACTIVATIONS = "8-bit int dynamic per token"


def int8_weight(parts: dict[str, torch.Tensor], dynamic_activations: bool = False) -> Int8Weight:
    """An ``int-quantized`` symmetric layer as an :class:`Int8Weight` (a per-tensor scale
    repeated per row: the same values); ``dynamic_activations``: a W8A8 layer whose input
    is quantized per token.

    Raises:
        ValueError: a scale that fits neither per-tensor nor per-row.
    """
    q, scale = parts["weight"], parts["weight_scale"].to(torch.float32).flatten()
    if scale.numel() not in (1, q.shape[0]):
        raise ValueError(f"weight_scale {tuple(scale.shape)} is neither per-tensor nor per-row for {tuple(q.shape)}")
    return Int8Weight(q.contiguous(), scale.expand(q.shape[0]).contiguous(), dynamic_activations)


def dequantize_8bit(parts: dict[str, torch.Tensor], scheme: Int8WeightScheme) -> torch.Tensor:
    """One 8-bit layer -> its float32 weight ``[N, K]``, by compressed-tensors'
    ``dequantize`` (``(q - zero_point) * scale``, scales per tensor or per row).

    Raises:
        ValueError: a scale that fits neither per-tensor nor per-row.
    """
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    q, scale = parts["weight"], parts["weight_scale"]
    if scale.numel() not in (1, q.shape[0]):
        raise ValueError(f"weight_scale {tuple(scale.shape)} is neither per-tensor nor per-row for {tuple(q.shape)}")
    w = dequantize(x_q=q, scale=scale.to(torch.float32), zero_point=parts.get("weight_zero_point"),
                   args=QuantizationArgs(**dict(scheme.weights)), dtype=torch.float32)
    return w.to(torch.float32)


_SUPPORTED = ("supported: pack-quantized 4-bit integer weights (W4A16), int-quantized 8-bit integer and "
              "float-quantized 8-bit float weights per channel or tensor (W8A8, FP8)")


def parse_config(qc: dict) -> Optional[Scheme]:
    """Read a ``quant_method: compressed-tensors`` ``quantization_config`` (None: only a
    ``kv_cache_scheme``, the weights are dense). A ``kv_cache_scheme`` of 8-bit float
    per-tensor scales is accepted: its ``k_scale`` / ``v_scale`` tensors are read by the
    model and used with an E4M3 KV cache
    (:meth:`~argosy.runtime.models.llama.LlamaForCausalLM.load_weights`).

    Raises:
        UnsupportedQuantization: anything but one group of Linear layers that is
            ``pack-quantized`` 4-bit integer weights (group or channel strategy, no
            activation quantization), or ``int-quantized`` / ``float-quantized`` 8-bit
            weights per channel or tensor; sparsity; a ``kv_cache_scheme`` other than
            8-bit float per tensor.
    """
    groups = qc.get("config_groups") or {}
    kv = qc.get("kv_cache_scheme")
    if kv:
        if not (isinstance(kv, dict) and kv.get("num_bits") == 8 and kv.get("type") == "float"
                and kv.get("strategy", "tensor") == "tensor" and kv.get("symmetric", True)):
            raise UnsupportedQuantization(f"compressed-tensors kv_cache_scheme {kv!r} is not supported (8-bit float "
                                          "per tensor, symmetric, is: used with --kv-cache-dtype fp8)")
        if not groups:
            return None  # only the KV cache is quantized: dense weights, scales read by the model
    if qc.get("format") not in (None, "pack-quantized", "int-quantized", "float-quantized", "naive-quantized"):
        raise UnsupportedQuantization(f"compressed-tensors format {qc.get('format')} is not supported yet ({_SUPPORTED})")
    if qc.get("sparsity_config"):
        raise UnsupportedQuantization("compressed-tensors sparsity (e.g. 2:4) is not supported")
    if len(groups) != 1:
        raise UnsupportedQuantization(f"compressed-tensors with {len(groups)} config groups is not supported "
                                      "(one group of Linear layers is)")
    (group,) = groups.values()
    fmt = group.get("format") or qc.get("format")
    w = group.get("weights") or {}
    bits, kind, strategy = w.get("num_bits"), w.get("type", "int"), w.get("strategy")
    acts = group.get("input_activations")
    what = f"format {fmt}, {bits}-bit {kind} weights, strategy {strategy}" + (
        f", {acts.get('num_bits')}-bit {acts.get('type', 'int')} activations" if isinstance(acts, dict) else "")
    targets = group.get("targets") or []
    if targets not in (["Linear"], ["re:.*Linear"]):
        raise UnsupportedQuantization(f"compressed-tensors targets {targets} are not supported (['Linear'] is)")
    if fmt in ("int-quantized", "float-quantized", "naive-quantized") and bits == 8 \
            and kind == ("float" if fmt == "float-quantized" else "int") and strategy in ("channel", "tensor") \
            and not group.get("output_activations") and w.get("symmetric", True):
        act = None if not isinstance(acts, dict) else (
            f"{acts.get('num_bits')}-bit {acts.get('type', 'int')} {'dynamic' if acts.get('dynamic') else 'static'} "
            f"per {acts.get('strategy')}" + ("" if acts.get("symmetric", True) else " asymmetric"))
        return Int8WeightScheme(fmt, tuple(sorted((k, v) for k, v in w.items() if not isinstance(v, (dict, list)))),
                                act)
    if fmt != "pack-quantized" or bits != 4 or kind != "int" or acts or group.get("output_activations"):
        raise UnsupportedQuantization(f"compressed-tensors {what} is not supported yet ({_SUPPORTED})")
    if strategy not in ("group", "channel"):
        raise UnsupportedQuantization(f"compressed-tensors {what} is not supported (group or channel strategy is)")
    if w.get("actorder") not in (None, False, "static", "weight"):
        raise UnsupportedQuantization(f"compressed-tensors activation ordering {w.get('actorder')!r} is not supported")
    gs = w.get("group_size") if strategy == "group" else None
    if strategy == "group" and (not isinstance(gs, int) or gs <= 0 or gs % 32):
        raise UnsupportedQuantization(f"compressed-tensors group size {gs} is not supported (multiples of 32 are)")
    return W4A16Scheme(gs, bool(w.get("symmetric", True)))


def decode(parts: dict[str, torch.Tensor], scheme: W4A16Scheme) -> Int4Weight:
    """One layer's checkpoint tensors (keyed by :data:`PARTS` names) -> an
    :class:`~.int4.Int4Weight`, lossless (scales as float32).

    Raises:
        ValueError: missing parts, or shapes that do not match each other.
    """
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    packed, scale, shape = parts.get("weight_packed"), parts.get("weight_scale"), parts.get("weight_shape")
    if packed is None or scale is None or shape is None:
        raise ValueError("a packed layer needs weight_packed, weight_scale and weight_shape")
    n, k = (int(x) for x in shape.tolist())
    g = k if scheme.group_size is None else scheme.group_size
    if k % g or tuple(scale.shape) != (n, k // g):
        raise ValueError(f"weight_scale {tuple(scale.shape)} does not match weight_shape ({n}, {k}) in groups of {g}")
    q = unpack_from_int32(packed.to(torch.int32), 4, torch.Size((n, k)))  # int8 in [-8, 7]
    s = scale.to(torch.float32)
    if scheme.symmetric:
        zero = torch.zeros_like(s)
    else:
        zp_packed = parts.get("weight_zero_point")
        if zp_packed is None:
            raise ValueError("an asymmetric layer needs weight_zero_point")
        zp = unpack_from_int32(zp_packed.to(torch.int32), 4, torch.Size((n, k // g)), packed_dim=0)
        zero = -zp.to(torch.float32) * s
    if g not in KERNEL_GROUP_SIZES:  # a multiple of 32 (parse_config checks): groups of 32, same values
        s, zero = s.repeat_interleave(g // 32, dim=1), zero.repeat_interleave(g // 32, dim=1)
        g = 32
    qu = (q.to(torch.int16) + 8).to(torch.uint8).numpy()
    return Int4Weight(qu, np.ascontiguousarray(s.numpy()), np.ascontiguousarray(zero.numpy()), g)
