"""GGUF quantization blocks decoded into :class:`~.int4.Int4Weight` without loss.

Block layouts are those of ggml (``ggml/src/ggml-common.h``; the ``gguf`` package's
``gguf.quants`` implements the same in numpy and is the oracle in the tests). Each maps
onto ``W = (q - 8) * scale + zero`` with groups of 32 input columns:

- ``Q4_0`` (18 bytes / 32 values): ``d`` fp16, 16 bytes of nibbles; ``W = (q - 8) * d``
  -> ``scale = d``, ``zero = 0``.
- ``Q4_1`` (20 bytes / 32): ``d``, ``m`` fp16, nibbles; ``W = q * d + m``
  -> ``scale = d``, ``zero = m + 8 d``.
- ``Q4_K`` (144 bytes / 256): ``d``, ``dmin`` fp16, 12 bytes of 6-bit sub-block scales
  ``sc`` and mins ``mn`` (8 sub-blocks of 32), 128 bytes of nibbles; ``W = d sc q - dmin mn``
  -> ``scale = d sc``, ``zero = 8 d sc - dmin mn``.

In a 32-value group the byte ``j`` holds value ``j`` in its low nibble and value
``j + 16`` in its high nibble (Q4_0/Q4_1); in Q4_K each 64-value chunk holds 32 bytes
whose low nibbles are the chunk's first sub-block and high nibbles its second.
"""

from __future__ import annotations

import numpy as np

from .int4 import Int4Weight

#: GGUF type names this module turns into int4 weights.
INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")

_NIBBLE_SHIFTS = np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)[..., 0]


def _nibbles(qs: np.ndarray, half: int) -> np.ndarray:
    """``[B, n * half] uint8`` bytes -> ``[B, n * 2 * half]`` values: each run of ``half``
    bytes gives ``half`` low nibbles, then ``half`` high nibbles."""
    b = qs.shape[0]
    return ((qs.reshape(b, -1, 1, half) >> _NIBBLE_SHIFTS) & np.uint8(0x0F)).reshape(b, -1)


def decode_int4(raw: np.ndarray, type_name: str, shape: tuple[int, int]) -> Int4Weight:
    """Decode a 2-D GGUF tensor's raw blocks.

    Args:
        raw: the tensor's bytes, ``[N, K / block_values * block_bytes] uint8`` (as
            ``gguf.GGUFReader`` maps them, rows along the output dimension).
        type_name: ``"Q4_0"``, ``"Q4_1"`` or ``"Q4_K"``.
        shape: ``(N, K)`` in Hugging Face layout.
    Returns:
        The weight with ``group_size`` 32.
    Raises:
        ValueError: another type, or a size that does not match ``shape``.
    """
    n, k = shape
    if k % 32:
        raise ValueError(f"K={k} is not a multiple of 32")
    per_block = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q4_K": (256, 144)}
    if type_name not in per_block:
        raise ValueError(f"GGUF type {type_name} is not a 4-bit type ({', '.join(INT4_TYPES)})")
    values, nbytes = per_block[type_name]
    if k % values or raw.size != n * (k // values) * nbytes:
        raise ValueError(f"{type_name} tensor of {raw.size} bytes does not hold shape {shape}")
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n * (k // values), nbytes)
    g = k // 32
    if type_name == "Q4_0":
        d = _f16(blocks[:, 0:2])
        q = _nibbles(blocks[:, 2:], 16)
        scale, zero = d, np.zeros_like(d)
    elif type_name == "Q4_1":
        d, m = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
        q = _nibbles(blocks[:, 4:], 16)
        scale, zero = d, m + 8.0 * d
    else:
        from gguf.quants import Q4_K

        d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
        sc, mn = Q4_K.get_scale_min(blocks[:, 4:16])
        q = _nibbles(blocks[:, 16:], 32)
        scale = d[:, None] * sc.astype(np.float32)
        zero = 8.0 * scale - dmin[:, None] * mn.astype(np.float32)
    return Int4Weight(q.reshape(n, k), scale.reshape(n, g).astype(np.float32),
                      zero.reshape(n, g).astype(np.float32), 32)
