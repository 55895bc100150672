"""What every checkpoint quantization format shares: the errors, the row-scaled weight
base, and the interface of a linear layer's quantization method with its registry."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class UnsupportedQuantization(ValueError):
    """A ``quantization_config`` Argosy cannot serve (the message says what and why)."""


@dataclass
class RowScaledWeight:
    """A weight with one scale per output row, ``W[n, k] = q[n, k] * scale[n]``: the
    slicing and stacking shared by :class:`~argosy.runtime.quantization.int8.Int8Weight`
    and :class:`~argosy.runtime.quantization.fp8.Fp8Weight` (subclasses add fields, which
    the slices keep).

    Attributes:
        q: ``[N, K]`` quantized values (int8 or float8_e4m3fn).
        scale: ``[N] float32``.
    """

    q: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def rows(self, start: int, stop: int):
        """Output rows ``[start, stop)`` (a column-parallel shard or a fused part)."""
        return replace(self, q=self.q[start:stop], scale=self.scale[start:stop])

    def cols(self, start: int, stop: int):
        """Input columns ``[start, stop)`` (a row-parallel shard; scales are per row)."""
        return replace(self, q=self.q[:, start:stop].contiguous())

    @classmethod
    def cat(cls, parts: list):
        """Stack ``parts`` (of this class) along the output rows; other fields from the
        first part."""
        return replace(parts[0], q=torch.cat([p.q for p in parts]), scale=torch.cat([p.scale for p in parts]))


def avx512_without_amx() -> bool:
    """Whether PyTorch runs AVX-512 kernels on this CPU (``ATEN_CPU_CAPABILITY`` at least
    AVX512) and oneDNN's bfloat16 GEMM has no AMX tiles: there the GEMM runs on AVX-512
    BF16 alone and the packed kernels stay ahead of it for more rows (AMD EPYC, Intel
    before Sapphire Rapids). False where PyTorch cannot tell."""
    try:
        avx512, amx = torch.cpu._is_avx512_supported(), torch.cpu._is_amx_tile_supported()
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return False
    return avx512 and not amx and capability.startswith("AVX512")


def _packed_kernel_rows() -> int:
    """:data:`INT4_MAX_ROWS` for this CPU. 8 with AMX, measured on whole decode steps of
    the bundled model (2 cores, torch 2.13; the weights stream from memory): batch 2 int4
    23 ms vs dense 46 ms per step, batch 8 33 vs 46 ms, batch 16 51 vs 51 ms. 16 on AVX-512
    without AMX (:func:`avx512_without_amx`; this project's 2-vCPU EPYC VM): one pass over
    the bundled model's 120 layers, int4 kernel vs dense bfloat16, 8 / 12 / 16 / 20 / 24 /
    32 rows 13 / 29 / 23 / 28 / 33 / 43 ms vs 29 / 32 / 28 / 30 / 32 / 36 ms (grouped int8
    11 / 16 / 20 / 26 / 32 / 42 vs 20 / 22 / 23 / 29 / 31 / 36), eager decoding of 12
    sequences 264-286 -> 336-345 tok/s, 16 sequences 304-325 -> 339-363. 8 elsewhere (not
    measured)."""
    return 16 if avx512_without_amx() else 8


#: Calls of at most this many rows run a CPU-packed layer's quantized kernel (decode at low
#: batch sizes: memory-bound, the kernel reads a quarter or half of the bytes); more rows
#: (prefill, large decode batches) run a bfloat16 GEMM on a dense copy or a dequantized
#: scratch (:class:`CpuPackedMethod`). By CPU (:func:`_packed_kernel_rows`): 8 or 16. It
#: also bounds the compiled decode graphs' batch buckets (1, 2 to this, more).
INT4_MAX_ROWS = _packed_kernel_rows()


def hold_buffers(module: nn.Module, **tensors: Optional[torch.Tensor]) -> None:
    """Register ``tensors`` as ``module``'s non-persistent buffers (None: an optional one
    absent), so the compiled graphs take them as the module's inputs and ``.to()`` moves
    them; a quantization method's packed weight, scales and the like."""
    for name, t in tensors.items():
        module.register_buffer(name, t, persistent=False)


class LinearMethod(nn.Module):
    """How a :class:`~argosy.runtime.layers.Linear` holds and runs a quantized weight: the
    interface of vLLM's ``QuantizeMethodBase`` (``create_weights``,
    ``process_weights_after_loading``, ``apply``), one object per layer. vLLM's ``apply``
    is :meth:`forward` here: a method is a module (it holds buffers), and a module's
    ``apply(fn)`` is PyTorch's walk over the module tree, which ``model.apply(fn)`` calls
    on every submodule.

    Every checkpoint format decodes its tensors into one of a few weight forms
    (:class:`~.int4.Int4Weight`, :class:`~.int8.Int8Weight`, :class:`~.q8_0.Q8Weight`,
    :class:`~.fp8.Fp8Weight`; AWQ, GPTQ, compressed-tensors and GGUF 4-bit all become
    ``Int4Weight``), so a method is registered per weight form (:func:`register`), not per
    checkpoint format, and lives in that form's module. The layer hands the whole weight
    (its rows stacked) to :func:`choose_linear_method` once every row has arrived; the
    first registered method whose :meth:`create` takes it (device, dtype, shape, kernel
    built) packs it into its own buffers (tensors of this module, so the compiled graphs
    see them as the layer's inputs) and frees the layer's dense weight where it does not
    need it. A layer no method takes stays dense.

    The layer is passed to every call (it owns ``weight [out_features, in_features]``,
    ``bias [out_features]`` or None, and the dense-copy policy) rather than kept here, so
    the module tree has no cycle.
    """

    #: what :func:`~argosy.runtime.worker.executor.weight_bytes_by_format` counts this
    #: method's buffers as (``int4``, ``int8``, ``grouped int8``, ``grouped 5-bit`` / ``grouped
    #: 6-bit``, ``fp8``); a layer with a
    #: method counts a dense weight it keeps as ``<dtype> dense copies``
    kind: str = ""

    @classmethod
    def create(cls, whole, layer) -> Optional["LinearMethod"]:
        """The method running ``whole`` (the layer's quantized weight, ``[out_features,
        in_features]``) in ``layer``, its tensors packed, or None when it cannot run here.
        May free the layer's dense weight (:meth:`~argosy.runtime.layers.Linear.free_dense_weight`)."""
        raise NotImplementedError

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        """``x [M, in_features] -> x W^T (+ bias) [M, out_features]`` in ``x.dtype``."""
        raise NotImplementedError

    def dense_weight(self, layer) -> torch.Tensor:
        """``W [out_features, in_features]`` in the layer's dtype and input-column order:
        the values :meth:`forward` multiplies (quantized weights dequantized into a new tensor
        where the layer keeps no dense copy)."""
        return layer.weight

    def signature(self) -> tuple:
        """What :meth:`forward` branches on besides its tensors' values (flags, group sizes,
        which optional buffers exist): compiled graphs traced on one layer run every layer
        of the same signature (:func:`argosy.runtime.worker.cpu_compile.layer_signature`)."""
        return ()


class RowScaledMethod:
    """Mixin (before :class:`LinearMethod` or :class:`CpuPackedMethod` in the bases) of a
    method that holds a :class:`RowScaledWeight` as it is: buffers ``weight [N, K]``
    (int8 or float8_e4m3fn; None where the method runs the layer's dense weight) and
    ``scales`` (one per output row, in the shape and dtype its kernel takes)."""

    def __init__(self, weight: Optional[torch.Tensor], scales: Optional[torch.Tensor]):
        super().__init__()
        hold_buffers(self, weight=weight, scales=scales)


class CpuPackedMethod(LinearMethod):
    """A CPU layer with a packed quantized weight and a kernel for few rows (:meth:`small`;
    bfloat16, and for the 4-bit kernel also float16 / float32 layers, which always keep
    their dense copy); the rule by rows, in one place: at most :data:`INT4_MAX_ROWS` rows run
    :meth:`small`; more run a bfloat16 GEMM on the layer's dense copy, or, where the layer
    keeps none (:attr:`dense_on_demand`), on the weight dequantized into a per-thread
    scratch (:meth:`scratch`, :mod:`.dequant`)."""

    def __init__(self):
        super().__init__()
        #: whether calls of more than ``INT4_MAX_ROWS`` rows dequantize into the scratch
        #: (the layer's dense weight freed) instead of using the dense copy
        self.dense_on_demand = False

    def finish(self, layer) -> None:
        """After packing: free the layer's dense weight and run large calls on the scratch,
        unless the layer keeps its dense copy (:meth:`~argosy.runtime.layers.Linear.keeps_dense_copy`)."""
        if not layer.keeps_dense_copy():
            self.dense_on_demand = True
            layer.free_dense_weight()

    def small(self, x: torch.Tensor) -> torch.Tensor:
        """``x [M <= INT4_MAX_ROWS, K] bfloat16 -> x W^T [M, N]`` on the packed kernel (no bias)."""
        raise NotImplementedError

    def scratch(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """``x W^T (+ bias)`` through the dequantized scratch (:mod:`.dequant`'s ops)."""
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        """The packed weight as a new ``[N, K] bfloat16`` tensor in the layer's column order."""
        raise NotImplementedError

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= INT4_MAX_ROWS:
            y = self.small(x)
            return y if layer.bias is None else y + layer.bias
        if self.dense_on_demand:
            return self.scratch(x, layer.bias)
        return F.linear(x, layer.weight, layer.bias)

    def dense_weight(self, layer) -> torch.Tensor:
        return self.dequantize() if self.dense_on_demand else layer.weight

    def signature(self) -> tuple:
        return (self.dense_on_demand,)


#: weight form -> the method classes that may run it, in the order tried
_METHODS: dict[type, list] = {}


def register(weight_cls: type):
    """Class decorator: the decorated :class:`LinearMethod` (or an object with its
    ``create``) may run layers whose weight is a ``weight_cls``; tried in registration
    order."""
    def deco(method):
        _METHODS.setdefault(weight_cls, []).append(method)
        return method

    return deco


def choose_linear_method(whole, layer) -> Optional[LinearMethod]:
    """The first registered method for ``type(whole)`` whose ``create`` takes it, or None
    (the layer stays dense)."""
    for method in _METHODS.get(type(whole), ()):
        m = method.create(whole, layer)
        if m is not None:
            return m
    return None
