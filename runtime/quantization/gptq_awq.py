"""AWQ and GPTQ checkpoints (``quant_method: awq`` / ``gptq``), the layouts of AutoAWQ's
``WQLinear_GEMM`` and AutoGPTQ's ``QuantLinear``, read onto Argosy's weight classes without
loss, so they run on the same kernels as GGUF's (:mod:`.int4`, :mod:`.q8_0`).

Per linear layer (``K`` input features, ``N`` output features, ``g`` = ``group_size``,
``G = K / g`` groups; ``W [N, K]`` is the Hugging Face weight):

AWQ, ``version: gemm`` (AutoAWQ ``awq/modules/linear/gemm.py``, vLLM ``awq.py``):
    ``qweight [K, N / 8] int32``: eight 4-bit values of one input row per word, word ``c``
    nibble ``i`` (bits ``4i..4i+3``) holding output column ``8c + AWQ_ORDER[i]`` with
    ``AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]``; ``qzeros [G, N / 8] int32`` packed alike;
    ``scales [G, N] float16``; ``W[n, k] = (q[k, n] - z[k // g, n]) * s[k // g, n]``.

GPTQ, ``checkpoint_format: gptq`` (AutoGPTQ ``nn_modules/qlinear/qlinear_cuda.py``, vLLM
``gptq.py``), 4 or 8 bits ``b``:
    ``qweight [K * b / 32, N] int32``: ``32 / b`` consecutive input rows per word, row
    ``j`` of a word at bits ``b*j``; ``qzeros [G, N * b / 32] int32`` packed along the
    output dimension and stored minus one (``z - 1``: the v1 format's offset);
    ``scales [G, N] float16``; ``g_idx [K] int32``, the group of each input column;
    ``W[n, k] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n]``. Symmetric checkpoints
    store ``z = 2^(b-1)``. With ``desc_act`` (act-order) ``g_idx`` is not ``k // g``:
    the columns of a group are scattered. Sorting the columns by group makes the groups
    contiguous again; the weight is kept in that order with the permutation
    (:attr:`~.int4.Int4Weight.perm`), and the layer gathers its input columns the same
    way before the kernel.

Mapping (exact in float32): 4-bit -> :class:`~.int4.Int4Weight` with ``q' = q`` and
``zero = (8 - z) * s``; 8-bit GPTQ -> :class:`~.q8_0.Q8Weight` with ``q' = q - 128``
(int8), ``scale = s`` and ``min = (128 - z) * s``, groups re-expressed as groups of 32
(the kernels' sizes) by repeating scales where needed. An 8-bit act-order layer is
served dense (the grouped int8 kernel takes no column permutation).

Refused at load with one line (never read as something else): AWQ other than 4-bit GEMM
with zero points (``gemv``, ``gemv_fast``, ``marlin`` layouts; ``zero_point: false``),
GPTQ other than 4 or 8 bits, the ``gptq_v2`` / ``marlin`` checkpoint formats, and group
sizes that are not a multiple of 32 (or ``-1``, one group per row).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

from .base import UnsupportedQuantization
from .int4 import KERNEL_GROUP_SIZES, Int4Weight
from .q8_0 import Q8Weight

#: Output column held by nibble ``i`` of an AWQ word (relative to the word's first column).
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


@dataclass(frozen=True)
class AWQScheme:
    """A ``quant_method: awq`` config Argosy serves: 4-bit GEMM layout with zero points.

    Attributes:
        group_size: input columns per scale (a multiple of 32).
    """

    group_size: int
    #: modules the checkpoint left unquantized (``modules_to_not_convert``, name prefixes)
    not_converted: tuple = ()
    #: tensor names (after the layer's prefix) of one quantized layer
    parts = ("qweight", "qzeros", "scales")
    method = "awq"


@dataclass(frozen=True)
class GPTQScheme:
    """A ``quant_method: gptq`` config Argosy serves.

    Attributes:
        bits: 4 or 8.
        group_size: input columns per scale (a multiple of 32), or None: one group per row.
        desc_act: act-order (``g_idx`` scatters groups); read from ``g_idx`` per layer anyway.
    """

    bits: int
    group_size: Optional[int]
    desc_act: bool
    not_converted: tuple = ()
    parts = ("qweight", "qzeros", "scales", "g_idx")
    method = "gptq"


Scheme = Union[AWQScheme, GPTQScheme]


def _group_size(qc: dict, method: str, *keys: str) -> Optional[int]:
    gs = next((qc[k] for k in keys if k in qc), 128)
    if gs == -1 and method == "gptq":
        return None
    if not isinstance(gs, int) or isinstance(gs, bool) or gs <= 0 or gs % 32:
        raise UnsupportedQuantization(f"{method} group size {gs!r} is not supported (multiples of 32 are"
                                      f"{', or -1' if method == 'gptq' else ''})")
    return gs


def parse_config(qc: dict) -> Scheme:
    """Read a ``quant_method: awq`` or ``gptq`` ``quantization_config`` (the keys AutoAWQ
    and AutoGPTQ write: ``bits`` / ``w_bit``, ``group_size`` / ``q_group_size``,
    ``zero_point``, ``version``; ``desc_act``, ``sym``, ``checkpoint_format``).

    Raises:
        UnsupportedQuantization: what the module doc lists as refused, one line naming it.
    """
    method = str(qc.get("quant_method", "")).lower()
    if method == "awq":
        bits = qc.get("bits", qc.get("w_bit", 4))
        version = str(qc.get("version", "gemm")).lower()
        if bits != 4:
            raise UnsupportedQuantization(f"awq with {bits}-bit weights is not supported (4-bit is)")
        if version != "gemm":
            raise UnsupportedQuantization(f"awq version {version!r} is not supported (the GEMM layout is; "
                                          "re-export the model with version 'gemm')")
        if qc.get("zero_point", True) is False:
            raise UnsupportedQuantization("awq without zero points (zero_point: false) is not supported")
        return AWQScheme(_group_size(qc, "awq", "group_size", "q_group_size"),
                         tuple(qc.get("modules_to_not_convert") or ()))
    if method == "gptq":
        bits = qc.get("bits", 4)
        if bits not in (4, 8):
            raise UnsupportedQuantization(f"gptq with {bits}-bit weights is not supported (4 and 8 bits are)")
        fmt = str(qc.get("checkpoint_format", "gptq")).lower()
        if fmt != "gptq":
            raise UnsupportedQuantization(f"gptq checkpoint_format {fmt!r} is not supported (the 'gptq' layout, "
                                          "zero points stored minus one, is)")
        return GPTQScheme(int(bits), _group_size(qc, "gptq", "group_size"), bool(qc.get("desc_act", False)),
                          tuple(qc.get("modules_to_not_convert") or ()))
    raise UnsupportedQuantization(f"quant_method {method!r} is not awq or gptq")


def quantized_part(name: str, scheme: Scheme) -> Optional[str]:
    """The part name if checkpoint tensor ``name`` belongs to a quantized layer of
    ``scheme`` (``qweight``, ``qzeros``, ``scales``, ``g_idx``), else None (a plain tensor)."""
    part = name.rpartition(".")[2]
    return part if part in scheme.parts else None


def unexpected_dense(name: str, scheme: Scheme) -> bool:
    """Whether plain tensor ``name`` is a decoder projection's weight that ``scheme``
    should have quantized (not named by ``modules_to_not_convert``): a checkpoint that
    says AWQ / GPTQ but holds float weights there is refused rather than served as if."""
    if not name.endswith("_proj.weight"):
        return False
    module = name[: -len(".weight")]
    return not any(m and (module == m or module.startswith(m + ".") or f".{m}." in f".{module}.")
                   for m in scheme.not_converted)


def complete(parts: dict, scheme: Scheme) -> bool:
    """Whether ``parts`` holds every tensor one layer of ``scheme`` needs (GPTQ without
    ``desc_act`` may leave ``g_idx`` out, as older exports do: groups in column order)."""
    need = scheme.parts if not (isinstance(scheme, GPTQScheme) and not scheme.desc_act) else scheme.parts[:3]
    return all(p in parts for p in need)


def _unpack_rows(packed: np.ndarray, bits: int) -> np.ndarray:
    """``[R, C] int32`` with ``32 / bits`` values a word along the rows -> ``[R * 32 / bits, C]``
    unsigned integers (value ``j`` of a word at bits ``bits * j``)."""
    per = 32 // bits
    u = packed.astype(np.uint32)
    shifts = (np.arange(per, dtype=np.uint32) * bits)[None, :, None]
    vals = (u[:, None, :] >> shifts) & np.uint32((1 << bits) - 1)  # [R, per, C]
    return vals.reshape(-1, packed.shape[1])


def _unpack_cols(packed: np.ndarray, bits: int, order: Optional[tuple] = None) -> np.ndarray:
    """``[R, C] int32`` with ``32 / bits`` values a word along the columns -> ``[R, C * 32 / bits]``;
    value ``i`` of word ``c`` is column ``c * per + order[i]`` (``order`` default: ``i``)."""
    per = 32 // bits
    u = packed.astype(np.uint32)
    shifts = (np.arange(per, dtype=np.uint32) * bits)[None, None, :]
    vals = (u[:, :, None] >> shifts) & np.uint32((1 << bits) - 1)  # [R, C, per]
    if order is not None:
        out = np.empty_like(vals)
        out[:, :, list(order)] = vals
        vals = out
    return vals.reshape(packed.shape[0], -1)


def _check(parts: dict, q_shape: tuple, k: int, n: int, groups: int) -> None:
    if tuple(parts["scales"].shape) != (groups, n):
        raise ValueError(f"scales {tuple(parts['scales'].shape)} do not match {groups} groups x {n} columns "
                         f"(qweight {q_shape})")


def _as_int4(q_nk: np.ndarray, z_gn: np.ndarray, s_gn: np.ndarray, g: int,
             perm: Optional[np.ndarray] = None) -> Int4Weight:
    """``W[n, k] = (q[n, k] - z[k // g, n]) * s[k // g, n]`` -> :class:`Int4Weight`
    (``q`` already in the column order of ``perm`` when given)."""
    s = s_gn.T.astype(np.float32)
    zero = (8.0 - z_gn.T.astype(np.float32)) * s
    w = Int4Weight(np.ascontiguousarray(q_nk.astype(np.uint8)), np.ascontiguousarray(s), np.ascontiguousarray(zero),
                   g, perm)
    return w if g in KERNEL_GROUP_SIZES else w.regroup(32)


def decode_awq(parts: dict[str, torch.Tensor], scheme: AWQScheme) -> Int4Weight:
    """One AWQ GEMM layer (``qweight``, ``qzeros``, ``scales``; module doc) -> an
    :class:`~.int4.Int4Weight` ``[N, K]``, lossless (scales as float32).

    Raises:
        ValueError: shapes that do not fit each other or the group size.
    """
    qw = parts["qweight"].numpy()
    k, n = qw.shape[0], qw.shape[1] * 8
    g = scheme.group_size
    if k % g:
        raise ValueError(f"{k} input features are not a multiple of the group size {g}")
    _check(parts, qw.shape, k, n, k // g)
    if tuple(parts["qzeros"].shape) != (k // g, n // 8):
        raise ValueError(f"qzeros {tuple(parts['qzeros'].shape)} do not match {k // g} groups x {n} columns")
    q = _unpack_cols(qw, 4, AWQ_ORDER)  # [K, N]
    z = _unpack_cols(parts["qzeros"].numpy(), 4, AWQ_ORDER)  # [G, N]
    return _as_int4(q.T, z, parts["scales"].float().numpy(), g)


def decode_gptq(parts: dict[str, torch.Tensor], scheme: GPTQScheme) -> Union[Int4Weight, Q8Weight, torch.Tensor]:
    """One GPTQ layer (``qweight``, ``qzeros``, ``scales``, ``g_idx``; module doc) -> an
    :class:`~.int4.Int4Weight` (4-bit; with :attr:`~.int4.Int4Weight.perm` for
    act-order), a :class:`~.q8_0.Q8Weight` (8-bit), or, for an 8-bit act-order layer,
    its float32 weight ``[N, K]``. Lossless.

    Raises:
        ValueError: shapes that do not fit each other, or a ``g_idx`` whose groups are
            not all of ``group_size`` columns.
    """
    b = scheme.bits
    qw = parts["qweight"].numpy()
    k, n = qw.shape[0] * 32 // b, qw.shape[1]
    g = k if scheme.group_size is None else scheme.group_size
    if k % g:
        raise ValueError(f"{k} input features are not a multiple of the group size {g}")
    groups = k // g
    _check(parts, qw.shape, k, n, groups)
    if tuple(parts["qzeros"].shape) != (groups, n * b // 32):
        raise ValueError(f"qzeros {tuple(parts['qzeros'].shape)} do not match {groups} groups x {n} columns")
    g_idx = parts["g_idx"].numpy().astype(np.int64) if "g_idx" in parts else np.arange(k) // g
    if g_idx.shape != (k,) or g_idx.min(initial=0) < 0 or g_idx.max(initial=0) >= groups:
        raise ValueError(f"g_idx {tuple(g_idx.shape)} does not give each of {k} columns one of {groups} groups")
    q = _unpack_rows(qw, b).T  # [N, K]
    z = _unpack_cols(parts["qzeros"].numpy(), b).astype(np.int32) + 1  # [G, N]: the v1 offset
    s = parts["scales"].float().numpy()  # [G, N]
    perm = None
    if not np.array_equal(g_idx, np.arange(k) // g):  # act-order: make each group's columns contiguous
        perm = np.argsort(g_idx, kind="stable")
        if not np.array_equal(g_idx[perm], np.arange(k) // g):
            raise ValueError(f"g_idx groups are not all of {g} columns")
        q = q[:, perm]
    if b == 4:
        return _as_int4(q, z, s, g, perm)
    if perm is not None:  # the grouped int8 kernel takes no input permutation: dense
        w = (q.astype(np.float32) - z.T.astype(np.float32).repeat(g, axis=1)) * s.T.astype(np.float32).repeat(g, axis=1)
        dense = np.empty_like(w)
        dense[:, perm] = w
        return torch.from_numpy(dense)
    if g % 32:
        raise ValueError(f"8-bit group size {g} is not a multiple of 32")
    r = g // 32  # groups of 32, the grouped int8 kernel's, by repeating each scale
    scale = np.repeat(s.T.astype(np.float32), r, axis=1)
    mins = np.repeat(((128 - z.T).astype(np.float32) * s.T.astype(np.float32)), r, axis=1)
    return Q8Weight(np.ascontiguousarray((q.astype(np.int16) - 128).astype(np.int8)), np.ascontiguousarray(scale),
                    32, np.ascontiguousarray(mins))
