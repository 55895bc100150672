"""GGUF Q8_0 weights kept in their own form, and a CPU linear over them (``csrc/q8_0_gemm.cpp``).

Q8_0 (ggml's ``block_q8_0``, ``ggml-common.h``): each row of a ``[N, K]`` weight is split
into groups of 32 values, stored as one float16 scale ``d`` then 32 int8 ``q`` (34 bytes),
and ``W[n, k] = q[n, k] * d[n, k // 32]``. The bundled model's tied embedding / LM head
(49,152 x 576) is Q8_0: 28 MB of int8 and 1.8 MB of scales, against 56 MB as a dense
bfloat16 matrix, and the LM head is the largest matrix a decode step reads. The kernel
computes ``x @ W.T`` from the int8 values and float16 scales in float32, nothing rounded,
so it is also closer to the file than the bfloat16 copy (whose rounding moves logits by
up to ~0.05). Measured alone, warm, 2 cores, 49,152 x 576: 0.8 ms for one row (bfloat16
``F.linear`` 2.1 ms), 1.1 ms for four, parity at eight; at 16 rows and more oneDNN's AMX
bfloat16 GEMM wins (2.4 vs 3.7 ms). Whole decode steps of the bundled model: batch 1
16.0 -> 12.6-13.4 ms, batch 4 18.8 -> 17.6 ms, batch 8 27.4 -> 28.2 ms (slower), so the
model uses this kernel for up to :data:`MAX_ROWS` rows and the dense copy above (whose
bfloat16 rounding moves logits by up to ~0.05, so a greedy choice between two nearly
tied tokens can depend on how many rows a step computes logits for; see
:meth:`argosy.runtime.models.llama.LlamaForCausalLM.compute_logits`).

The op is ``torch.ops.argosy.q8_0_linear``; its library is built like the other C++
kernels (:mod:`argosy.runtime.cpu_kernels`).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .. import cpu_kernels

#: Values per Q8_0 group, and bytes per block (float16 scale + 32 int8).
GROUP = 32
BLOCK_BYTES = 34
#: Most rows of ``x`` per call that take the kernel in the model (more: the dense copy).
MAX_ROWS = 4
#: Output rows per tile of the packed layout.
TILE = 16

SOURCE = Path(__file__).parent / "csrc" / "q8_0_gemm.cpp"


@dataclass
class Q8Weight:
    """A Q8_0 weight as stored in the file (host numpy arrays, Hugging Face row order).

    Attributes:
        q: ``[N, K] int8``.
        scale: ``[N, K // 32] float16``.
    """

    q: np.ndarray
    scale: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    @staticmethod
    def from_gguf(raw: np.ndarray, shape: tuple[int, int]) -> "Q8Weight":
        """Decode a 2-D Q8_0 tensor's raw blocks (``[N, K / 32 * 34] uint8``, as
        ``gguf.GGUFReader`` maps them) of Hugging Face shape ``(N, K)``.

        Raises:
            ValueError: K not a multiple of 32, or a size that does not match ``shape``.
        """
        n, k = shape
        if k % GROUP or raw.size != n * (k // GROUP) * BLOCK_BYTES:
            raise ValueError(f"Q8_0 tensor of {raw.size} bytes does not hold shape {shape}")
        blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n, k // GROUP, BLOCK_BYTES)
        scale = np.ascontiguousarray(blocks[:, :, :2]).view(np.float16).reshape(n, k // GROUP)
        q = np.ascontiguousarray(blocks[:, :, 2:]).view(np.int8).reshape(n, k)
        return Q8Weight(q, scale)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """``W [N, K]`` as a torch tensor (computed in float32, then cast to ``dtype``)."""
        n, k = self.shape
        w = torch.from_numpy(self.q.astype(np.float32)).view(n, k // GROUP, GROUP)
        w = w * torch.from_numpy(self.scale.astype(np.float32)).unsqueeze(-1)
        return w.view(n, k).to(dtype)


@dataclass
class PackedQ8:
    """A Q8_0 weight in the kernel's tiled layout (see the source's header).

    Attributes:
        w: ``[ceil(N / 16), K, 16] int8``.
        scales: ``[ceil(N / 16), K // 32, 16] int16`` (float16 bit patterns).
        n: output features (``pack``'s ``rows``; rows past the weight's own are zero, so
            their outputs are 0; tile padding past ``n`` is never written out).
    """

    w: torch.Tensor
    scales: torch.Tensor
    n: int

    @staticmethod
    def pack(weight: Q8Weight, rows: Optional[int] = None) -> "PackedQ8":
        """Tile ``weight``; ``rows`` (>= N) pads it with zero rows first (a tensor-parallel
        vocabulary slice shorter than the others). About 31 MB for 49,152 x 576."""
        n, k = weight.shape
        rows = n if rows is None else rows
        if rows < n:
            raise ValueError(f"cannot pack {n} rows into {rows}")
        padded = -(-rows // TILE) * TILE
        q = np.zeros((padded, k), dtype=np.int8)
        q[:n] = weight.q
        s = np.zeros((padded, k // GROUP), dtype=np.float16)
        s[:n] = weight.scale
        w = torch.from_numpy(q).view(padded // TILE, TILE, k).transpose(1, 2).contiguous()
        sc = torch.from_numpy(s.view(np.int16)).view(padded // TILE, TILE, k // GROUP).transpose(1, 2).contiguous()
        return PackedQ8(w, sc, rows)

    @property
    def nbytes(self) -> int:
        return self.w.numel() + 2 * self.scales.numel()


def _declare(lib: ctypes.CDLL) -> None:
    fn = lib.argosy_q8_0_linear
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3


KERNEL = cpu_kernels.Kernel(SOURCE, "q8_0_gemm", _declare, "the dense bfloat16 LM head")


def kernel():
    """The loaded kernel library (built on first call), or None where it cannot be built
    (logged once; callers keep the dense path)."""
    return KERNEL.library()


_LIBRARY = torch.library.Library("argosy", "FRAGMENT")
_LIBRARY.define("q8_0_linear(Tensor x, Tensor w, Tensor scales, int n) -> Tensor")


def q8_0_linear(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, n: int) -> torch.Tensor:
    """``x @ W.T`` over a :class:`PackedQ8` weight: the CPU implementation of
    ``torch.ops.argosy.q8_0_linear``.

    Args:
        x: ``[M, K]`` float32 or bfloat16 (converted to float32; exact).
        w, scales: :attr:`PackedQ8.w` / :attr:`PackedQ8.scales`.
        n: :attr:`PackedQ8.n`.
    Returns:
        ``[M, n] float32``.
    Raises:
        ValueError: shapes or dtypes that do not match the packed layout.
        RuntimeError: the kernel is not built (:func:`kernel` returned None).
    """
    lib = KERNEL.loaded or kernel()
    if lib is None:
        raise RuntimeError("the CPU Q8_0 linear kernel is not available")
    if (x.dim() != 2 or w.dim() != 3 or w.dtype != torch.int8 or scales.dtype != torch.int16
            or w.shape[2] != TILE or x.shape[1] != w.shape[1] or w.shape[1] % GROUP
            or scales.shape != (w.shape[0], w.shape[1] // GROUP, TILE) or not 0 < n <= w.shape[0] * TILE
            or not (w.is_contiguous() and scales.is_contiguous())):
        raise ValueError(f"q8_0_linear: x {tuple(x.shape)} does not match packed weight {tuple(w.shape)} "
                         f"{w.dtype} / scales {tuple(scales.shape)} {scales.dtype} for {n} outputs")
    xf = x.to(torch.float32).contiguous()
    out = torch.empty(x.shape[0], n, dtype=torch.float32)
    if x.shape[0] and lib.argosy_q8_0_linear(w.data_ptr(), scales.data_ptr(), xf.data_ptr(), out.data_ptr(),
                                             x.shape[0], n, x.shape[1]) != 0:
        raise ValueError(f"q8_0_linear: K={x.shape[1]} is not a multiple of {GROUP}")
    return out


_LIBRARY.impl("q8_0_linear", q8_0_linear, "CPU")


@torch.library.register_fake("argosy::q8_0_linear")
def _(x, w, scales, n):
    return x.new_empty(x.shape[0], n, dtype=torch.float32)
