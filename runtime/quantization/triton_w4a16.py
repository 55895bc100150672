"""W4A16 on CUDA: a Triton GEMM that dequantizes 4-bit weights in registers.

``y [M, N] = x [M, K] @ W.T`` with ``W[n, k] = (q[n, k] - 8) * scale[k // g, n] +
zero[k // g, n]``: the :class:`~.int4.Int4Weight` convention every 4-bit format maps onto
(GGUF Q4_0/Q4_1/Q4_K, compressed-tensors W4A16, AWQ, GPTQ), so one kernel serves them
all. Layout made by :func:`pack`:

- ``qweight [K / 8, N] int32``: eight 4-bit values of one output column per word, input
  row ``k`` at bits ``4 * (k % 8)`` of word ``k // 8`` (consecutive ``k`` in one word, as
  GPTQ packs them), so a tile of ``BLOCK_K`` input rows reads ``BLOCK_K / 8`` words per
  column, coalesced along ``N``;
- ``scales``, ``zeros`` ``[K / g, N]`` in the activation dtype (float16 or bfloat16).

Each program computes a ``BLOCK_M x BLOCK_N`` tile of ``y``, walking ``K`` in steps of
``BLOCK_K`` (which divides the group size, so a step has one scale and zero per column):
it loads the words, shifts out the nibbles, applies the step's scales and zeros in fp32,
rounds the tile to the activation dtype and multiplies on the tensor cores (``tl.dot``,
fp32 accumulation). The weight streams from memory once per ``BLOCK_M`` rows: a quarter
of a 16-bit weight's bytes, which is what decode steps (few rows, memory-bound) gain.
Every step of a CUDA layer runs it; the layer keeps no dense copy
(:mod:`argosy.runtime.layers.linear`).

Dequantizing in registers inside the GEMM's K loop is the scheme of the Triton W4A16
kernels in AutoGPTQ (``qlinear_triton``) and vLLM (``awq_triton``); the code here is our
own. An act-order weight (:attr:`~.int4.Int4Weight.perm`) gathers ``x``'s columns
before the kernel. The module imports Triton; import it only where the kernel may run.

Tested under Triton's CPU interpreter against :func:`reference` and compiled ahead of time
for sm_80 / sm_90 (:mod:`argosy.runtime.attention.compile_check`); not yet run or timed on
a GPU.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .base import LinearMethod, hold_buffers

try:  # Triton is optional on CPU-only installs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None

#: Kernel names of this module (for the ahead-of-time compile check).
KERNELS = ("_w4a16_gemm_kernel",)


def _interpreting() -> bool:
    """Whether ``@triton.jit`` kernels run under Triton's CPU interpreter."""
    from argosy.runtime.attention.triton_kernels import _interpreting as interp

    return interp()


def supports(w) -> bool:
    """Whether :func:`pack` takes ``w`` (an :class:`~.int4.Int4Weight`; this module does
    not import :mod:`.int4`, which imports it when a layer runs it): K a multiple of 32 and a group size that is a
    multiple of 32 dividing K (every format Argosy reads yields such weights)."""
    n, k = w.shape
    return k % 32 == 0 and w.group_size % 32 == 0 and k % w.group_size == 0


def pack(w, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w`` (an :class:`~.int4.Int4Weight` ``[N, K]``) in the kernel's layout (module
    doc), on the CPU.

    Returns:
        ``(qweight [K / 8, N] int32, scales [K / g, N] dtype, zeros [K / g, N] dtype)``.
    Raises:
        ValueError: a weight :func:`supports` refuses.
    """
    if not supports(w):
        raise ValueError(f"int4 weight {w.shape} with group size {w.group_size} does not fit the W4A16 kernel")
    n, k = w.shape
    q = w.q.astype(np.uint32).T.reshape(k // 8, 8, n)  # [K/8, 8, N]
    words = np.zeros((k // 8, n), dtype=np.uint32)
    for j in range(8):
        words |= q[:, j, :] << np.uint32(4 * j)
    qweight = torch.from_numpy(words.view(np.int32).copy())
    scales = torch.from_numpy(np.ascontiguousarray(w.scale.T)).to(dtype)
    zeros = torch.from_numpy(np.ascontiguousarray(w.zero.T)).to(dtype)
    return qweight, scales, zeros


def unpack(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """``W.T [K, N] float32`` from the kernel's layout (:func:`pack`'s outputs), in the
    stored column order: ``(q - 8) * scale + zero`` per group of ``group_size`` rows of K."""
    kw, n = qweight.shape
    shifts = torch.arange(8, dtype=torch.int32, device=qweight.device) * 4
    q = ((qweight[:, None, :] >> shifts[None, :, None]) & 0xF).reshape(kw * 8, n).float()  # [K, N]
    s = scales.float().repeat_interleave(group_size, dim=0)
    z = zeros.float().repeat_interleave(group_size, dim=0)
    return (q - 8.0) * s + z


def reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              group_size: int, round_weight: bool = True) -> torch.Tensor:
    """The kernel's function in PyTorch: ``x [M, K] @ W.T`` -> ``[M, N]`` float32, ``W``
    unpacked from the kernel's layout and dequantized in float32 (:func:`unpack`), then
    (``round_weight``) rounded to ``x``'s dtype as the GPU kernel rounds its tile for the
    16-bit product; float32 accumulation. Under Triton's interpreter the kernel multiplies
    the unrounded tile (``round_weight=False``): the interpreter's bfloat16 casts truncate
    instead of rounding to nearest, so rounding there would not be the GPU's."""
    w = unpack(qweight, scales, zeros, group_size)
    return x.float() @ (w.to(x.dtype).float() if round_weight else w)


if triton is not None:

    @triton.jit
    def _w4a16_gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                           GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_mask = offs_m < M
        n_mask = offs_n < N
        shifts = (offs_k % 8) * 4
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :], mask=m_mask[:, None],
                        other=0.0)
            words = tl.load(qw_ptr + ((k0 + offs_k) // 8)[:, None] * N + offs_n[None, :], mask=n_mask[None, :],
                            other=0)
            q = (words >> shifts[:, None]) & 0xF
            g = k0 // GROUP_SIZE
            s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            w = (q.to(tl.float32) - 8.0) * s[None, :] + z[None, :]  # [BLOCK_K, BLOCK_N]
            if DOT_FP32:  # float32 layers; the interpreter (its bfloat16 casts truncate): unrounded tile
                acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
            else:
                acc += tl.dot(x, w.to(x.dtype))
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])

else:  # pragma: no cover
    _w4a16_gemm_kernel = None


def _tiles(m: int, group_size: int) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps)`` for ``m`` rows: one 16-row tile and
    narrow column tiles (more programs) for decode-sized calls, wider tiles above."""
    block_k = 64 if group_size % 64 == 0 else 32
    if m <= 16:
        return 16, 64, block_k, 4
    if m <= 64:
        return 32 if m <= 32 else 64, 64, block_k, 4
    return 64, 128, block_k, 8


def matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
           perm: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ W.T`` on the kernel: ``x [M, K]`` float16/bfloat16 (float32 under the
    interpreter too) -> ``[M, N]`` in ``x``'s dtype. ``perm``: the weight's column order
    (act-order), applied to ``x`` first.

    Raises:
        ValueError: shapes that do not match the packed weight, or Triton missing.
    """
    if _w4a16_gemm_kernel is None:
        raise ValueError("the W4A16 kernel needs triton")
    if perm is not None:
        x = x.index_select(1, perm)
    x = x if x.stride(-1) == 1 else x.contiguous()
    m, k = x.shape
    kw, n = qweight.shape
    if kw * 8 != k or scales.shape != (k // group_size, n) or zeros.shape != scales.shape:
        raise ValueError(f"x {tuple(x.shape)} does not match the packed weight {tuple(qweight.shape)} "
                         f"(scales {tuple(scales.shape)}, group size {group_size})")
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    bm, bn, bk, warps = _tiles(m, group_size)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _w4a16_gemm_kernel[grid](x, qweight, scales, zeros, y, m, n, k, x.stride(0), y.stride(0),
                             GROUP_SIZE=group_size, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                             DOT_FP32=x.dtype == torch.float32 or _interpreting(), num_warps=warps)
    return y


class W4A16Method(LinearMethod):
    """A 4-bit layer on the Triton kernel (:func:`matmul`) for every call, on a GPU in
    float16 / bfloat16 (:data:`~.int4.W4A16_DEVICES`); the layer's dense weight is freed:
    on a GPU the point of a 4-bit checkpoint is the memory (0.5 + 4/g bytes a weight
    instead of 2). Chosen by :mod:`.int4`'s registration (this module imports Triton).

    Buffers: ``qweight [K / 8, N] int32``, ``scales`` / ``zeros [K / g, N]`` (layer dtype),
    ``perm [K] int64`` or None (act-order: ``x``'s columns gathered first).
    """

    kind = "int4"

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 perm: Optional[torch.Tensor]):
        super().__init__()
        hold_buffers(self, qweight=qweight, scales=scales, zeros=zeros, perm=perm)
        self.group_size = group_size

    @classmethod
    def create(cls, whole, layer) -> Optional["W4A16Method"]:
        if not supports(whole):
            return None
        dev = layer.weight.device
        qw, sc, zr = pack(whole, layer.weight.dtype)
        perm = None if whole.perm is None else torch.as_tensor(whole.perm, dtype=torch.int64, device=dev)
        m = cls(qw.to(dev), sc.to(dev), zr.to(dev), whole.group_size, perm)
        layer.free_dense_weight()
        return m

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        y = matmul(x, self.qweight, self.scales, self.zeros, self.group_size, self.perm)
        return y if layer.bias is None else y + layer.bias

    def dense_weight(self, layer) -> torch.Tensor:
        w = unpack(self.qweight, self.scales, self.zeros, self.group_size).t().to(layer.weight.dtype)
        return w if self.perm is None else torch.empty_like(w).index_copy_(1, self.perm, w)

    def signature(self) -> tuple:
        return (self.group_size, self.perm is not None)
