"""A linear layer that does not show the model its weight format.

``Linear`` holds a dense weight ``[out_features, in_features]`` in the model dtype, unless
its checkpoint weight is quantized and a kernel runs it without one. When the weight is
4-bit (GGUF Q4_0/Q4_1/Q4_K, :mod:`..quantization.gguf`; compressed-tensors W4A16, AWQ,
GPTQ) and the model runs in bfloat16 on the CPU, it is packed for PyTorch's int4 kernel
(``_weight_int4pack_mm_for_cpu``, :mod:`..quantization.int4`), and each call picks the
kernel by the number of rows:

- ``rows <= INT4_MAX_ROWS`` (decode at low batch sizes): the packed int4 kernel, which
  reads a quarter of the bytes; the memory-bound matrix-vector case.
- more rows (prefill, large decode batches): a bfloat16 GEMM through oneDNN (AMX/AVX-512
  BF16), several times faster than the int4 kernel there, on a dense copy of the weight
  kept beside the packed one (2 bytes a weight), or, when the layer keeps none
  (:attr:`Linear.keep_dense_copy`, decided per model by :func:`keep_dense_copies`:
  ``ARGOSY_CPU_DENSE_COPIES=auto`` drops them when a model's would take more than 1/16 of
  the memory limit), on the weight dequantized for that call into a per-thread scratch
  matrix (:mod:`..quantization.dequant`, a C++ kernel: 0.13 ms for a 3072 x 576 weight on
  2 cores, against 0.62 ms for the 64-row product it feeds and 8.6 ms for 1,024 rows). A
  layer without a dense copy keeps no second copy of its 4-bit integers: the kernel reads
  PyTorch's packed weight itself, whose layout depends on the CPU capability PyTorch runs
  with and is checked once per process (:func:`..quantization.dequant.int4pack_block`);
  where it does not match, the integers are kept a second time in the kernel's own layout
  (0.5 bytes a weight). Measured on whole passes over the bundled model's 120 layers
  (``benchmarks/dense_copies.py``, 2-vCPU VM): the scratch costs 0-4% at 16-2,048 rows
  in some periods and up to 2x at 16-32 rows in others (the scratch written by one core
  and read by the other's GEMM when the vCPUs share no cache), hence ``auto``. A machine
  where the C++ kernel cannot be built keeps the dense copies.

Both paths compute with the same values: the scratch (or the dense copy) holds the int4
weight with the scales rounded to bfloat16 as the kernel rounds them. A weight stored with
its columns permuted (GPTQ act-order, :attr:`Int4Weight.perm`) gathers the input's columns
the same way before either kernel (one small copy of ``x``: ``index_select`` for the int4
kernel, a C++ gather, :func:`..quantization.dequant.gather_columns`, before the scratch's
GEMM); a kept dense
copy is in the layer's own order. An int8 weight with
per-row scales served weight-only (a compressed-tensors ``int-quantized`` checkpoint
without int8 activations) works the same way through ``_weight_int8pack_mm`` (one 3072 x 576 weight: 1 row 67 vs 184 us dense, 4
rows 106 vs 199 us, 8 rows 246 vs 206 us; the same row limit keeps the compiled decode
graphs' batch buckets). GGUF's 8-, 6- and 5-bit types (Q8_0, Q5_0, Q5_1, Q5_K, Q6_K) come
as grouped int8 (:mod:`..quantization.q8_0`, the file's values without loss) and run on
our C++ kernel (``argosy::q8_linear``, float32 math) for the same rows, output rounded
to the activation dtype; larger calls dequantize them into the scratch too. A W8A8
layer (int8 weights and dynamic per-token int8 activations) runs every call on
``torch._int_mm`` (:func:`..quantization.int8.w8a8_linear`) and keeps no dense weight at
all on the CPU in bfloat16. An FP8 weight
(:mod:`..quantization.fp8`: a compressed-tensors
``float-quantized`` checkpoint, or ``--quantization fp8`` quantizing a float one at load)
runs on ``torch._scaled_mm`` with per-token FP8 activations for every call where the
GPU takes it, the dense weight freed; elsewhere it runs dense on its FP8 values. The
threshold is measured
on whole decode steps of the bundled model (2 cores, AVX-512 + AMX, torch 2.13), where
the weights stream from memory: batch 2 int4 23 ms vs dense 46 ms per step, batch 8
33 vs 46 ms, batch 16 51 vs 51 ms. (In isolation, with the weight warm in cache, the int4
kernel loses already at 8 rows: one 3072 x 576 weight, 8 rows 214 vs 229 us, 32 rows 792
vs 244 us.)

Loading: a layer whose rows all arrive quantized (:meth:`Linear.load_quantized`) is
processed as soon as the last part arrives, so its dense weight is never written (the
allocation's pages are never touched on the CPU) and a checkpoint is never held dense as a
whole while loading.
"""

from __future__ import annotations

import os
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..quantization import dequant
from ..quantization import int4 as int4_mod
from ..quantization import int8 as int8_mod
from ..quantization import fp8 as fp8_mod
from ..quantization import q8_0
from ..quantization.fp8 import Fp8Weight
from ..quantization.int4 import Int4Weight
from ..quantization.int8 import Int8Weight
from ..quantization.q8_0 import PackedQ8, Q8Weight

#: Calls with at most this many rows use the packed int4 kernel (see the module doc).
INT4_MAX_ROWS = 8
#: ``ARGOSY_CPU_DENSE_COPIES``: whether quantized CPU layers keep a dense copy for calls of
#: more than ``INT4_MAX_ROWS`` rows (``keep``: 2 bytes a weight beside the quantized one)
#: or dequantize into a scratch matrix per call (``scratch``); ``auto`` (the default) keeps
#: them when a model's copies take at most :data:`AUTO_DENSE_COPIES_FRACTION` of the memory
#: the process may use (:func:`keep_dense_copies`; see the module doc for the trade).
DENSE_COPIES = os.environ.get("ARGOSY_CPU_DENSE_COPIES", "auto").strip().lower()
#: ``auto``'s share of the memory limit that dense copies may take
AUTO_DENSE_COPIES_FRACTION = 1 / 16


def memory_limit_bytes(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int:
    """The memory this process may use (bytes): physical memory, or the lowest memory limit
    of its cgroup and the cgroups above it when lower (a Kubernetes pod's
    ``resources.limits.memory``): cgroup v2 ``memory.max`` under the ``0::<path>`` line of
    ``/proc/self/cgroup``, v1 ``memory.limit_in_bytes`` under the ``memory`` controller's
    line (Linux ``Documentation/admin-guide/cgroup-v2.rst``, ``cgroup-v1/memory.rst``); in a
    cgroup namespace the path is ``/``, the container's own."""
    from pathlib import PurePosixPath

    limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        lines = open(proc_cgroup).read().splitlines()
    except OSError:
        lines = []
    candidates = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            candidates.append((root, PurePosixPath(parts[2] or "/"), "memory.max"))
        elif "memory" in parts[1].split(","):
            candidates.append((f"{root}/memory", PurePosixPath(parts[2] or "/"), "memory.limit_in_bytes"))
    for base, path, name in candidates:
        for p in (path, *path.parents):
            try:
                text = open(f"{base}{'' if str(p) == '/' else p}/{name}").read().strip()
            except OSError:
                continue
            if text.isdigit():
                limit = min(limit, int(text))
    return limit


def keep_dense_copies(dense_bytes: int) -> bool:
    """Whether a model's quantized CPU layers keep dense copies, their total being
    ``dense_bytes``: ``ARGOSY_CPU_DENSE_COPIES=keep`` / ``scratch`` decide; ``auto`` keeps
    them when ``dense_bytes <= AUTO_DENSE_COPIES_FRACTION * memory_limit_bytes()``.

    Raises:
        ValueError: another value of ``ARGOSY_CPU_DENSE_COPIES``.
    """
    if DENSE_COPIES not in ("auto", "keep", "scratch"):
        raise ValueError(f"ARGOSY_CPU_DENSE_COPIES={DENSE_COPIES!r}: expected auto, keep or scratch")
    if DENSE_COPIES != "auto":
        return DENSE_COPIES == "keep"
    return dense_bytes <= AUTO_DENSE_COPIES_FRACTION * memory_limit_bytes()
#: Devices whose 4-bit layers run the Triton W4A16 kernel
#: (:mod:`..quantization.triton_w4a16`; float16 / bfloat16) for every call, the dense
#: weight freed after packing: on a GPU the point of a 4-bit checkpoint is the memory
#: (0.5 + 4/g bytes a weight instead of 2). Tests add ``"cpu"`` to run the kernel under
#: Triton's interpreter through this class.
W4A16_DEVICES = ("cuda",)
#: :mod:`..quantization.triton_w4a16`, once a layer has packed for it (it imports Triton,
#: which a CPU server need not load)
_triton_w4a16 = None


class Linear(nn.Module):
    """``y = x W^T (+ b)`` over ``x [M, in_features]`` -> ``[M, out_features]``.

    Args:
        out_features, in_features: weight shape (this rank's shard).
        bias: whether a bias ``[out_features]`` exists (zeros until loaded).
        dtype, device: of the dense weight and the activations.

    Loading: the model copies dense tensors into :attr:`weight` (or row ranges of it,
    for fused projections), and hands 4-bit, int8, grouped int8 and FP8 ones to
    :meth:`load_quantized`; :meth:`process_weights_after_loading` (called by
    ``load_quantized`` once every row came quantized, and by the model after loading)
    packs the weight for its kernel if every row came in one form, and writes the dense
    values of the quantized rows where the layer keeps a dense weight.
    """

    def __init__(self, out_features: int, in_features: int, bias: bool, dtype: torch.dtype,
                 device: torch.device):
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device),
                                   requires_grad=False)
        self.bias: Optional[nn.Parameter] = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None)
        self.group_size = 0
        self.register_buffer("int4_packed", None, persistent=False)
        self.register_buffer("int4_scales_zeros", None, persistent=False)
        #: ``[in_features] int64`` or None: the packed int4 weight's column order (GPTQ act-order)
        self.register_buffer("input_perm", None, persistent=False)
        #: the 4-bit weight in the Triton W4A16 layout (CUDA): words, scales, zeros
        self.register_buffer("w4_qweight", None, persistent=False)
        self.register_buffer("w4_scales", None, persistent=False)
        self.register_buffer("w4_zeros", None, persistent=False)
        #: the 4-bit weight's integers a second time for the CPU dequantization kernel
        #: (:func:`..quantization.dequant.pack_nibbles`), only where it cannot read
        #: :attr:`int4_packed` itself (:func:`..quantization.dequant.int4pack_block` is 0)
        self.register_buffer("int4_nibbles", None, persistent=False)
        #: row block of :attr:`int4_packed`'s layout the dequantization kernel reads (64 or
        #: 32), or 0 where it reads :attr:`int4_nibbles`
        self.int4_block = 0
        self.register_buffer("int8_weight", None, persistent=False)
        #: ``[N]``: bfloat16 for ``_weight_int8pack_mm`` (weight-only), float32 for a W8A8 layer
        self.register_buffer("int8_scales", None, persistent=False)
        #: whether the layer quantizes its input to int8 per token (a W8A8 checkpoint:
        #: :func:`..quantization.int8.w8a8_linear` on the CPU in bfloat16, else its dense
        #: weight after :func:`..quantization.int8.fake_quantize_per_token`)
        self.int8_activations = False
        self.register_buffer("q8_weight", None, persistent=False)
        self.register_buffer("q8_scales", None, persistent=False)
        self.register_buffer("q8_mins", None, persistent=False)
        self.q8_group = 0
        #: the FP8 weight ``[N, K] float8_e4m3fn`` and its scales ``[1, N] float32`` (``_scaled_mm``, GPU)
        self.register_buffer("fp8_weight", None, persistent=False)
        self.register_buffer("fp8_scales", None, persistent=False)
        #: whether the dense weight holds FP8 values (an FP8 layer where ``_scaled_mm`` does not run)
        self.fp8_dense = False
        #: True / False: keep a dense copy beside a quantized CPU weight, or not (the model
        #: sets it, :func:`keep_dense_copies`); None: ``ARGOSY_CPU_DENSE_COPIES=keep`` decides
        self.keep_dense_copy: Optional[bool] = None
        #: whether calls of more than ``INT4_MAX_ROWS`` rows dequantize the int4, int8 or
        #: grouped int8 weight into a per-thread scratch matrix (:mod:`..quantization.dequant`)
        #: instead of keeping a dense copy (the dense weight is then freed)
        self.dense_on_demand = False
        #: row start -> quantized rows handed over by :meth:`load_quantized`
        self._quantized_parts: dict[int, Union[Int4Weight, Int8Weight, Q8Weight, Fp8Weight]] = {}

    @property
    def is_int4(self) -> bool:
        """Whether the packed int4 weight is in use."""
        return self.int4_packed is not None

    @property
    def is_w4a16(self) -> bool:
        """Whether the Triton W4A16 weight is in use (CUDA)."""
        return self.w4_qweight is not None

    @property
    def is_int8(self) -> bool:
        """Whether the int8 weight is in use."""
        return self.int8_weight is not None

    @property
    def is_fp8(self) -> bool:
        """Whether the FP8 weight runs on ``_scaled_mm`` (a GPU that takes it)."""
        return self.fp8_weight is not None

    @property
    def is_q8(self) -> bool:
        """Whether the grouped int8 weight (GGUF Q8_0/Q5_x/Q6_K) is in use."""
        return self.q8_weight is not None

    def load_quantized(self, row_start: int, w: Union[Int4Weight, Int8Weight, Q8Weight, Fp8Weight]) -> None:
        """Take rows ``[row_start, row_start + N)`` as a 4-bit, int8, grouped int8 or FP8
        weight. Once every row of the layer has arrived this way, the layer is processed
        at once (:meth:`process_weights_after_loading`), so a checkpoint's layers are never
        all held dense while loading; rows the layer keeps dense get their values there (on
        the CPU dequantized the way its kernel sees them, scales rounded as the kernel
        rounds them; elsewhere, where only the W4A16 kernel runs and a layer it does not
        take stays dense, exactly).

        Raises:
            ValueError: the rows do not fit the layer.
        """
        n, k = w.shape
        if k != self.in_features or row_start + n > self.out_features:
            raise ValueError(f"quantized rows [{row_start}, {row_start + n}) x {k} do not fit "
                             f"{tuple(self.weight.shape)}")
        self._quantized_parts[row_start] = w
        if sum(p.shape[0] for p in self._quantized_parts.values()) == self.out_features:
            self.process_weights_after_loading()

    def process_weights_after_loading(self) -> None:
        """When every row arrived quantized in one form: pack the int4 weight for the
        Triton W4A16 kernel (CUDA, float16/bfloat16) or for PyTorch's CPU int4 kernel
        (CPU, bfloat16) if the kernel takes its shape and group size, keep the int8 weight
        if the model runs in bfloat16 on the CPU (``_weight_int8pack_mm``'s case), or pack
        the grouped int8 weight where its C++ kernel builds (CPU, bfloat16), keep the FP8
        weight where ``_scaled_mm`` runs (:func:`~argosy.runtime.quantization.fp8.scaled_mm_supported`,
        16-multiple shapes; the dense weight freed); otherwise stay dense."""
        parts, self._quantized_parts = self._quantized_parts, {}
        if not parts:
            return
        self._pack([parts[s] for s in sorted(parts)])
        if self.weight.numel():  # the layer runs dense (for some calls, or all): the dense values of its rows
            for start, w in parts.items():
                self.weight.data[start : start + w.shape[0]].copy_(
                    w.dequantize(self.weight.dtype, kernel_rounding=self.weight.device.type == "cpu"))

    def _pack(self, ordered: list) -> None:
        """:meth:`process_weights_after_loading` for the quantized parts ``ordered`` by row."""
        if sum(p.shape[0] for p in ordered) != self.out_features or len({type(p) for p in ordered}) != 1:
            return  # some rows were dense in the checkpoint (or came in another form)
        if isinstance(ordered[0], Fp8Weight):
            self.fp8_dense = True
            dev = self.weight.device
            whole = Fp8Weight.cat(ordered)
            if whole.dynamic_activations and fp8_mod.shape_supported(self.out_features, self.in_features) \
                    and fp8_mod.scaled_mm_supported(dev):
                self.fp8_weight = whole.q.to(dev).contiguous()
                self.fp8_scales = whole.scale.to(dev, torch.float32)[None, :].contiguous()
                self.fp8_dense = False
                # every call runs _scaled_mm: the dense weight is not kept (its memory is freed)
                self.weight = nn.Parameter(torch.empty(0, self.in_features, dtype=self.weight.dtype, device=dev),
                                           requires_grad=False)
            return
        if isinstance(ordered[0], Q8Weight):
            if self.weight.dtype == torch.bfloat16 and self.weight.device.type == "cpu" and q8_0.kernel() is not None:
                p = PackedQ8.pack(Q8Weight.cat(ordered))
                self.q8_weight, self.q8_scales, self.q8_mins, self.q8_group = p.w, p.scales, p.mins, p.group_size
                self._free_dense_copy()
            return
        if isinstance(ordered[0], Int8Weight):
            whole8 = Int8Weight.cat(ordered)
            self.int8_activations = whole8.dynamic_activations
            if self.weight.dtype == torch.bfloat16 and self.weight.device.type == "cpu":
                self.int8_weight = whole8.q.contiguous().to(self.weight.device)
                if self.int8_activations:  # every call runs _int_mm: no dense weight at all
                    self.int8_scales = whole8.scale.to(self.weight.device, torch.float32).contiguous()
                    self.weight = nn.Parameter(torch.empty(0, self.in_features, dtype=self.weight.dtype,
                                                           device=self.weight.device), requires_grad=False)
                    return
                self.int8_scales = whole8.scale.to(torch.bfloat16).to(self.weight.device)
                self._free_dense_copy()
            return
        try:
            whole = Int4Weight.cat(ordered)
        except ValueError:
            return
        if self.weight.device.type in W4A16_DEVICES and self.weight.dtype in (torch.float16, torch.bfloat16):
            global _triton_w4a16
            from ..quantization import triton_w4a16

            _triton_w4a16 = triton_w4a16  # imported once, here: it imports Triton
            if triton_w4a16.supports(whole):
                qw, sc, zr = triton_w4a16.pack(whole, self.weight.dtype)
                dev = self.weight.device
                self.w4_qweight, self.w4_scales, self.w4_zeros = qw.to(dev), sc.to(dev), zr.to(dev)
                self.group_size = whole.group_size
                if whole.perm is not None:
                    self.input_perm = torch.as_tensor(whole.perm, dtype=torch.int64, device=dev)
                # every call runs the kernel: the dense weight is not kept (its memory is freed)
                self.weight = nn.Parameter(torch.empty(0, self.in_features, dtype=self.weight.dtype, device=dev),
                                           requires_grad=False)
            return
        if self.weight.device.type != "cpu" or not int4_mod.kernel_supports(whole):
            return
        packed, sz = int4_mod.pack(whole, self.weight.dtype)
        self.int4_packed, self.int4_scales_zeros = packed.to(self.weight.device), sz.to(self.weight.device)
        self.group_size = whole.group_size
        if whole.perm is not None:
            self.input_perm = torch.as_tensor(whole.perm, dtype=torch.int64, device=self.weight.device)
        self.int4_block = dequant.int4pack_block()
        if not self.int4_block:
            self.int4_nibbles = dequant.pack_nibbles(whole.q)
        self._free_dense_copy()

    def _free_dense_copy(self) -> None:
        """Run calls of more than ``INT4_MAX_ROWS`` rows on a dequantized scratch
        (:mod:`..quantization.dequant`) and free the dense weight, unless the layer keeps
        its dense copy (:attr:`keep_dense_copy`), is not a bfloat16 CPU layer (the kernels
        write bfloat16) or the kernel is not built."""
        keep = self.keep_dense_copy if self.keep_dense_copy is not None else DENSE_COPIES == "keep"
        if keep or self.weight.dtype != torch.bfloat16 or self.weight.device.type != "cpu" \
                or dequant.kernel() is None:
            self.int4_nibbles, self.int4_block = None, 0
            return
        self.dense_on_demand = True
        self.weight = nn.Parameter(torch.empty(0, self.in_features, dtype=self.weight.dtype,
                                               device=self.weight.device), requires_grad=False)

    def dense_weight(self) -> torch.Tensor:
        """``W [out_features, in_features]`` in the layer's dtype, input columns in the
        layer's own order: :attr:`weight`, or for a layer that keeps no dense copy
        (:attr:`dense_on_demand`) its quantized weight dequantized into a new tensor (the
        values its large calls multiply)."""
        if self.int8_activations and self.int8_weight is not None:
            return Int8Weight(self.int8_weight, self.int8_scales, True).dequantize(self.weight.dtype)
        if not self.dense_on_demand:
            return self.weight
        if self.int4_packed is not None:
            w = (dequant.int4pack_dequantize(self.int4_packed, self.int4_scales_zeros, self.group_size,
                                             self.int4_block).contiguous()
                 if self.int4_block else dequant.int4_dequantize(self.int4_nibbles, self.int4_scales_zeros,
                                                                 self.group_size))
            return w if self.input_perm is None else torch.empty_like(w).index_copy_(1, self.input_perm, w)
        if self.q8_weight is not None:
            return dequant.q8_dequantize(self.q8_weight, self.q8_scales, self.q8_mins, self.q8_group,
                                         self.out_features)
        return dequant.int8_dequantize(self.int8_weight, self.int8_scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8_weight is not None:
            return fp8_mod.fp8_linear(x, self.fp8_weight, self.fp8_scales, self.bias)
        if self.w4_qweight is not None:
            y = _triton_w4a16.matmul(x, self.w4_qweight, self.w4_scales, self.w4_zeros, self.group_size,
                                    self.input_perm)
            return y if self.bias is None else y + self.bias
        if self.int8_activations:
            if self.int8_weight is not None:
                return int8_mod.w8a8_linear(x, self.int8_weight, self.int8_scales, self.bias)
            return F.linear(int8_mod.fake_quantize_per_token(x), self.weight, self.bias)
        if self.int4_packed is not None and x.shape[0] <= INT4_MAX_ROWS:
            xp = x if self.input_perm is None else x.index_select(1, self.input_perm)
            y = int4_mod.matmul(xp, self.int4_packed, self.int4_scales_zeros, self.group_size)
            return y if self.bias is None else y + self.bias
        if self.q8_weight is not None and x.shape[0] <= INT4_MAX_ROWS:
            y = torch.ops.argosy.q8_linear(x, self.q8_weight, self.q8_scales, self.q8_mins, self.q8_group,
                                           self.out_features, x.dtype)
            return y if self.bias is None else y + self.bias
        if self.int8_weight is not None and x.shape[0] <= INT4_MAX_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(x, self.int8_weight, self.int8_scales)
            return y if self.bias is None else y + self.bias
        if self.dense_on_demand:
            if self.int4_packed is not None:
                return torch.ops.argosy.int4_dense_linear(
                    x, self.int4_packed if self.int4_block else self.int4_nibbles, self.int4_scales_zeros,
                    self.group_size, self.int4_block, self.input_perm, self.bias)
            if self.q8_weight is not None:
                return torch.ops.argosy.q8_dense_linear(x, self.q8_weight, self.q8_scales, self.q8_mins,
                                                        self.q8_group, self.out_features, self.bias)
            return torch.ops.argosy.int8_dense_linear(x, self.int8_weight, self.int8_scales, self.bias)
        return F.linear(x, self.weight, self.bias)
