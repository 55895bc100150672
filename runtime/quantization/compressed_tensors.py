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

Everything else in a ``quantization_config`` (W8A8 ``int-quantized``, FP8
``float-quantized``, other bit widths, activation quantization, sparsity, AWQ, GPTQ,
FP8) is refused at load with one line naming it (issue 16 tracks them). Unpacking uses
compressed-tensors' own ``unpack_from_int32``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .int4 import KERNEL_GROUP_SIZES, Int4Weight

#: The suffixes of one quantized linear layer's tensors in the checkpoint.
PARTS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")


class UnsupportedQuantization(ValueError):
    """A ``quantization_config`` Argosy cannot serve (the message says what and why)."""


@dataclass(frozen=True)
class W4A16Scheme:
    """The one compressed-tensors scheme supported so far.

    Attributes:
        group_size: input columns per scale (None: ``channel``, one scale per row).
        symmetric: no zero points in the checkpoint.
    """

    group_size: Optional[int]
    symmetric: bool


def complete(parts: dict, scheme: W4A16Scheme) -> bool:
    """Whether ``parts`` holds every tensor one layer of ``scheme`` needs."""
    need = PARTS if not scheme.symmetric else PARTS[:3]
    return all(p in parts for p in need)


def parse_config(qc: dict) -> W4A16Scheme:
    """Read a ``quant_method: compressed-tensors`` ``quantization_config``.

    Raises:
        UnsupportedQuantization: anything but one ``pack-quantized`` group of 4-bit integer
            weights (group or channel strategy) without activation quantization or sparsity.
    """
    groups = qc.get("config_groups") or {}
    if qc.get("format") not in (None, "pack-quantized"):
        raise UnsupportedQuantization(f"compressed-tensors format {qc.get('format')} is not supported yet "
                                      "(supported: pack-quantized 4-bit integer weights, W4A16)")
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
    if fmt != "pack-quantized" or bits != 4 or kind != "int" or acts or group.get("output_activations"):
        raise UnsupportedQuantization(f"compressed-tensors {what} is not supported yet (supported: pack-quantized "
                                      "4-bit integer weights, W4A16)")
    if strategy not in ("group", "channel"):
        raise UnsupportedQuantization(f"compressed-tensors {what} is not supported (group or channel strategy is)")
    if w.get("actorder") not in (None, False, "static", "weight"):
        raise UnsupportedQuantization(f"compressed-tensors activation ordering {w.get('actorder')!r} is not supported")
    targets = group.get("targets") or []
    if targets not in (["Linear"], ["re:.*Linear"]):
        raise UnsupportedQuantization(f"compressed-tensors targets {targets} are not supported (['Linear'] is)")
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
