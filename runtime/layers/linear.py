"""A linear layer that does not show the model its weight format.

``Linear`` holds a dense weight ``[out_features, in_features]`` in the model dtype, unless
its checkpoint weight is quantized and a kernel runs it without one. A quantized weight is
run by its quantization method (:class:`~..quantization.base.LinearMethod`, vLLM's
``QuantizeMethodBase``: one per weight form and device, in that form's module, chosen by
:func:`~..quantization.base.choose_linear_method`); the layer only collects the rows,
holds the dense-copy policy and calls ``method.forward(layer, x)``. What the methods do:

When the weight is 4-bit (GGUF Q4_0/Q4_1/Q4_K, :mod:`..quantization.gguf`;
compressed-tensors W4A16, AWQ, GPTQ) and the model runs in bfloat16 on the CPU, it is
packed for PyTorch's int4 kernel (``_weight_int4pack_mm_for_cpu``,
:class:`..quantization.int4.Int4CpuMethod`), and each call picks the kernel by the number
of rows (the rule of :class:`..quantization.base.CpuPackedMethod`, shared by the int8 and
grouped int8 CPU methods):

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
vs 244 us.) On AVX-512 CPUs without AMX the limit is 16
(:func:`..quantization.base._packed_kernel_rows`, measured there).

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
from ..quantization import fp8 as _fp8  # noqa: F401  (each form's module registers its methods)
from ..quantization import int4 as _int4  # noqa: F401
from ..quantization import int8 as _int8  # noqa: F401
from ..quantization import q8_0 as _q8  # noqa: F401
from ..quantization.base import INT4_MAX_ROWS, LinearMethod, choose_linear_method
from ..quantization.fp8 import Fp8Weight
from ..quantization.int4 import Int4Weight
from ..quantization.int8 import Int8Weight
from ..quantization.q8_0 import Q8Weight

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
    gives the whole weight to its quantization method (:attr:`quant_method`) if every
    row came in one form, and writes the dense values of the quantized rows where the
    layer keeps a dense weight.
    """

    def __init__(self, out_features: int, in_features: int, bias: bool, dtype: torch.dtype,
                 device: torch.device):
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device),
                                   requires_grad=False)
        self.bias: Optional[nn.Parameter] = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None)
        #: the quantization method running the weight (:class:`~..quantization.base.LinearMethod`),
        #: or None: a dense layer
        self.quant_method: Optional[LinearMethod] = None
        #: True / False: keep a dense copy beside a quantized CPU weight, or not (the model
        #: sets it, :func:`keep_dense_copies`); None: ``ARGOSY_CPU_DENSE_COPIES=keep`` decides
        self.keep_dense_copy: Optional[bool] = None
        #: row start -> quantized rows handed over by :meth:`load_quantized`
        self._quantized_parts: dict[int, Union[Int4Weight, Int8Weight, Q8Weight, Fp8Weight]] = {}

    @property
    def dense_on_demand(self) -> bool:
        """Whether calls of more than ``INT4_MAX_ROWS`` rows dequantize the weight into the
        scratch (:class:`~..quantization.base.CpuPackedMethod`) rather than use a dense copy."""
        return bool(getattr(self.quant_method, "dense_on_demand", False))

    def keeps_dense_copy(self) -> bool:
        """Whether a CPU-packed quantized weight keeps the dense copy for large calls:
        :attr:`keep_dense_copy` (``ARGOSY_CPU_DENSE_COPIES=keep`` when unset), and always
        where the scratch cannot run: not a bfloat16 CPU layer (the kernels write
        bfloat16) or the dequantization kernel not built."""
        keep = self.keep_dense_copy if self.keep_dense_copy is not None else DENSE_COPIES == "keep"
        return (keep or self.weight.dtype != torch.bfloat16 or self.weight.device.type != "cpu"
                or dequant.kernel() is None)

    def free_dense_weight(self) -> None:
        """Replace the dense weight by an empty ``[0, in_features]`` one (its memory freed;
        on the CPU a layer's pages were never touched when every row came quantized: the
        allocation is lazy)."""
        self.weight = nn.Parameter(torch.empty(0, self.in_features, dtype=self.weight.dtype,
                                               device=self.weight.device), requires_grad=False)

    def load_quantized(self, row_start: int, w: Union[Int4Weight, Int8Weight, Q8Weight, Fp8Weight]) -> None:
        """Take rows ``[row_start, row_start + N)`` as a 4-bit, int8, grouped int8 or FP8
        weight. Once every row of the layer has arrived this way, the layer is processed
        at once (:meth:`process_weights_after_loading`), so a checkpoint's layers are never
        all held dense while loading; rows the layer keeps dense get their values there
        (beside a kernel in a 16-bit dtype dequantized the way the kernel sees them, scales
        rounded as it rounds them; in float32, or where no method runs the layer, exactly).

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
        """When every row arrived quantized in one form: give the whole weight to its
        quantization method (:func:`~..quantization.base.choose_linear_method`), which packs
        it for its kernel and frees the dense weight where it needs none; then, where the
        layer keeps a dense weight (no method took it, some rows came dense, or the method
        uses a dense copy), write the dense values of the quantized rows."""
        parts, self._quantized_parts = self._quantized_parts, {}
        if not parts:
            return
        ordered = [parts[s] for s in sorted(parts)]
        if sum(p.shape[0] for p in ordered) == self.out_features and len({type(p) for p in ordered}) == 1:
            try:
                whole = type(ordered[0]).cat(ordered)
            except ValueError:  # parts that do not stack (4-bit parts of different group sizes)
                whole = None
            if whole is not None:
                self.quant_method = choose_linear_method(whole, self)
        if self.weight.numel():  # the layer runs dense (for some calls, or all): the dense values of its rows
            # a dense copy beside a CPU kernel holds the kernel's values (its scales rounded to
            # the 16-bit dtype it packs them in); a float32 layer's kernel keeps float32
            # scales, and a layer no method runs is exact
            rounded = self.quant_method is not None and self.weight.dtype != torch.float32
            for start, w in parts.items():
                self.weight.data[start : start + w.shape[0]].copy_(w.dequantize(self.weight.dtype,
                                                                               kernel_rounding=rounded))

    def dense_weight(self) -> torch.Tensor:
        """``W [out_features, in_features]`` in the layer's dtype, input columns in the
        layer's own order: :attr:`weight`, or, for a layer whose method keeps no dense
        weight, its quantized weight dequantized into a new tensor (the values its calls
        multiply)."""
        return self.weight if self.quant_method is None else self.quant_method.dense_weight(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_method is None:
            return F.linear(x, self.weight, self.bias)
        return self.quant_method.forward(self, x)
