"""Compiled steps on the CPU (``torch.compile``, inductor), the CPU's counterpart of
:mod:`.cuda_graphs`.

At batch 1 an eager decode step of the bundled model spends about as long in ~5,000
small ATen calls and their Python dispatch (norms, rotary, residuals, views, KV writes)
as in its matmuls. Inductor traces the whole decode step once (all layers, the KV write
and the attention: :class:`~argosy.runtime.attention.DecodeMetadata`), fuses the
elementwise work into a few generated C++ loops per layer and calls the matmul kernels
(the packed int4 one, our grouped int8 op, oneDNN) directly. The model code is the same as the eager path's;
only the attention metadata differs.

Decode shapes. The batch size ``B`` and the block-table width ``W`` are symbolic, so a
step never recompiles for a new context length or batch size. Three graphs cover every
decode-only step (each compiled once at startup, :meth:`CompiledDecodeRunner.warmup`):
``B = 1`` (PyTorch specializes size 1), ``2 <= B <= INT4_MAX_ROWS`` (packed int4 or
grouped int8 matmuls) and ``B > INT4_MAX_ROWS`` (dense bfloat16 matmuls). ``W`` is padded to at least
2 (a size-1 width would be specialized too: a fourth graph).

Prefill and mixed steps of at least :data:`LAYER_STAGES_MIN_TOKENS` tokens run each
layer's attention-free halves compiled (:class:`CompiledLayerStages`, one graph per half
for all layers, symbolic token count) with the attention eager between them; smaller
ones run eagerly.

Wrapper. The code that runs a graph (calls its kernels and the ``argosy::`` ops, allocates
its buffers) is generated C++ by default (inductor's ``cpp_wrapper``), not generated
Python: see :data:`CPP_WRAPPER_ENV` for the measurements and the switch.

Cost. Compiling all of it takes ~1.5-2 minutes on 2 cores with an empty cache (mostly
C++ compilation; measured 2026-12-05: the engine's whole start 109 s on the bundled model
with either wrapper), ~20 s when inductor's on-disk cache holds the graphs (kept under
``$ARGOSY_CACHE_DIR/inductor/<vector ISA>-rows<INT4_MAX_ROWS>`` unless ``TORCHINDUCTOR_CACHE_DIR`` is set, see
:func:`argosy.runtime.cache_dirs.inductor_vec_isa`). After
warm-up nothing compiles: a call whose shapes would need a new graph runs eagerly
(counted; see :meth:`CompiledDecodeRunner.run`).

Numerics: the fused loops round bfloat16 intermediates differently from the eager ops
(logits agree to bfloat16 rounding, not to the bit; against float32 they are slightly
closer than eager bfloat16), which is why the float32 path, the exact one against
Hugging Face, is never compiled.
"""

from __future__ import annotations

import logging
import os
import time
import types
from typing import Optional

import torch

from ..attention import AttentionMetadata, DecodeMetadata
from ..cache_dirs import inductor_vec_isa
from ..layers.linear import INT4_MAX_ROWS

logger = logging.getLogger("argosy.cpu_compile")

#: ``--compilation-config`` modes (vLLM's numbering): 0 = none (eager), 3 = compiled decode steps.
COMPILATION_MODES = (0, 3)
#: Environment override of the default mode (an explicit flag wins); the test suite sets 0.
MODE_ENV = "ARGOSY_COMPILATION_MODE"


#: Steps of at least this many tokens (prefill chunks, mixed steps) run each layer's
#: attention-free halves compiled (:class:`CompiledLayerStages`); fewer run eagerly.
LAYER_STAGES_MIN_TOKENS = INT4_MAX_ROWS + 1


def _own_code(fn):
    """``fn`` with its own code object. Dynamo keeps compiled graphs on the code object:
    each runner compiling its own copy never picks a graph traced for another model in
    the same process (their module guards are skipped, see :func:`_compile`)."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__)


#: Inductor's wrapper: ``1`` (the default) compiles the graphs with inductor's C++ wrapper,
#: its entry code built at ``-O1`` apart from the generated kernels (inductor's
#: ``cpp_wrapper_build_separate``); ``0`` with its Python wrapper. The wrapper is the code
#: that calls the graph's kernels, the ``argosy::`` ops and allocates the buffers: at batch 1
#: it was ~1.6 ms of a ~8 ms step on the Q6_K GGUF file in Python (122 op calls a step) and
#: ~0.9 ms in C++ (torch profiler). Measured 2026-12-05 on this project's 2-vCPU VM (Q6_K
#: file, batch 1, 128 tokens, alternating processes, medians of 6 runs each, four processes
#: per variant): Python 131 / 130 / 123 / 120 tok/s, C++ built apart 131 / 138 / 152 / 153,
#: C++ in one file 134 / 145 / 151 / 140; the engine's start with an empty cache: Python
#: 95 s, C++ built apart 114 s, C++ in one file 228 s (inductor compiles the one file at
#: ``-O3``), hence the separate build. On the bundled Q4_1 model (packed int4 matmuls, aten
#: ops) the two wrappers measured alike: batch 1 138 / 144 (C++) vs 139 / 146 / 144 tok/s,
#: empty-cache start 109 s each.
CPP_WRAPPER_ENV = "ARGOSY_INDUCTOR_CPP_WRAPPER"


def cpp_wrapper_setting() -> bool:
    """``ARGOSY_INDUCTOR_CPP_WRAPPER`` (:data:`CPP_WRAPPER_ENV`): True for ``1`` or unset
    (inductor's C++ wrapper, the default), False for ``0`` (its Python wrapper).

    Raises:
        ValueError: another value (one line naming the variable and the values it takes).
    """
    raw = os.environ.get(CPP_WRAPPER_ENV, "1").strip()
    if raw not in ("0", "1"):
        raise ValueError(f"{CPP_WRAPPER_ENV}={raw!r}: expected 1 (inductor's C++ wrapper, the default) or 0 "
                         "(its Python wrapper)")
    return raw == "1"


def _compile(fn, cpp_wrapper: Optional[bool] = None):
    # cpp_wrapper: None = ARGOSY_INDUCTOR_CPP_WRAPPER (cpp_wrapper_setting)
    # No guards on the model's modules and parameters: the model object and its weights
    # never change after loading, and checking ~300 tensors cost ~1 ms a step. The guards
    # on the call's own inputs (token count, block-table width, KV caches) stay.
    options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
    if cpp_wrapper_setting() if cpp_wrapper is None else cpp_wrapper:
        options["cpp_wrapper"] = True
        options["cpp_wrapper_build_separate"] = True
    return torch.compile(_own_code(fn), dynamic=False, fullgraph=True, options=options)


#: Most padding (``B x max(seq_lens) - sum(seq_lens)`` tokens) a decode step of more than
#: ``INT4_MAX_ROWS`` sequences may carry into the compiled graph's attention
#: (see :meth:`CompiledDecodeRunner.padding_ok`).
MAX_PADDED_CONTEXT_TOKENS = 12288


def _is_recompile(e: RuntimeError) -> bool:
    """Dynamo's ``fail_on_recompile`` refusal (raised before anything ran)."""
    return "Detected recompile" in str(e)


class _CompiledOrEager:
    """Runs a call through its compiled graph under dynamo's ``fail_on_recompile`` stance,
    or eagerly when the call's shapes would need a graph not built at warm-up (dynamo
    refuses before anything ran), so nothing compiles while serving. Counts both; the
    first eager call is logged with dynamo's reason. Entering the stance costs ~6 us
    (measured), 60 times in a prefill step of the bundled model: noise against the step.

    Args:
        what / unit: for the log line ("a decode step of 3 sequences ...").
    """

    def __init__(self, what: str, unit: str):
        self.what = what
        self.unit = unit
        self.compiled = 0
        self.eager = 0

    def __call__(self, compiled, eager, size: int):
        """``compiled()`` under the stance, else ``eager()``; ``size`` is for the log line.

        Raises:
            RuntimeError: any error of ``compiled()`` other than dynamo's refusal.
        """
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                out = compiled()
        except RuntimeError as e:  # raised before anything ran (dynamo's frame callback)
            if not _is_recompile(e):
                raise
            if not self.eager:
                logger.warning("%s of %d %s has no compiled graph; running it eagerly (%s)", self.what, size,
                               self.unit, str(e).splitlines()[-1].strip())
            self.eager += 1
            return eager()
        self.compiled += 1
        return out


def _pre_attention(layer, rope_cs, x):
    return layer.pre_attention(rope_cs, x)


def _post_attention(layer, x, o):
    return layer.post_attention(x, o)


def layer_signature(layer) -> tuple:
    """What a decoder layer's stages branch on besides its tensors: for each linear layer,
    its quantization method and that method's
    :meth:`~argosy.runtime.quantization.base.LinearMethod.signature` (whether it keeps a
    dense copy, group sizes, an offset or a column permutation present), a bias, and the
    dense weight's shape (empty where it was freed). A layer stage graph is traced on one layer and, its
    module guards skipped (:func:`_compile`), runs every layer of the same signature; a
    GGUF whose layers mix quantization types (or an ``auto`` choice per layer) gets one
    graph per signature."""
    from ..layers import Linear

    sig = []
    for name, m in layer.named_modules():
        if isinstance(m, Linear):
            method = m.quant_method
            sig.append((name, None if method is None else (type(method).__name__, method.signature()),
                        m.bias is not None, tuple(m.weight.shape)))
    return tuple(sig)


class CompiledLayerStages:
    """Each decoder layer's attention-free halves (:meth:`LlamaDecoderLayer.pre_attention`:
    norm, QKV, rotary; ``post_attention``: o_proj, residual, norm, MLP, residual)
    compiled with a symbolic token count, once for all layers of the same
    :func:`layer_signature` (one graph per half for a uniform model), for prefill and mixed
    steps (attention between them stays eager: its per-sequence loop depends on the step's
    lengths). Inductor fuses the bfloat16 elementwise work that takes ~35% of an eager
    prefill step. Installed as the model's ``layer_stages``.

    Args:
        model: the model (one rank).
        cpp_wrapper: inductor's C++ wrapper (else its Python one); None: :func:`cpp_wrapper_setting`.
    """

    def __init__(self, model, cpp_wrapper: Optional[bool] = None):
        self.model = model
        self.cpp_wrapper = cpp_wrapper
        #: ``id(layer)`` -> its signature's ``(pre, post)`` compiled functions
        self.fns: dict[int, tuple] = {}
        #: stage calls run compiled (``calls.compiled``) or eagerly because their shapes
        #: needed a graph not built at warm-up (``calls.eager``)
        self.calls = _CompiledOrEager("a layer stage", "tokens")

    def warmup(self) -> None:
        """Compile both halves on the first layer of each signature with a dummy input of
        ``2 * INT4_MAX_ROWS`` tokens (no KV cache involved; above ``INT4_MAX_ROWS``, the
        dense matmuls' side, as every call of :data:`LAYER_STAGES_MIN_TOKENS` tokens or more)."""
        model = self.model
        t = 2 * INT4_MAX_ROWS
        by_sig: dict[tuple, tuple] = {}
        for i, layer in enumerate(model.layers):
            sig = layer_signature(layer)
            if sig not in by_sig:
                fns = by_sig[sig] = (_compile(_pre_attention, self.cpp_wrapper), _compile(_post_attention, self.cpp_wrapper))
                x = torch.zeros(t, model.cfg.hidden_size, dtype=model.dtype)
                cos, sin = model.rope.cos_sin(torch.arange(t))
                for v in (x, cos, sin):
                    torch._dynamo.mark_dynamic(v, 0)
                q, _, _ = fns[0](layer, (cos, sin), x)
                o = torch.zeros_like(q)
                torch._dynamo.mark_dynamic(o, 0)
                fns[1](layer, x, o)
            self.fns[id(layer)] = by_sig[sig]
        if len(by_sig) > 1:
            logger.info("torch.compile: layer stages for %d kinds of decoder layers", len(by_sig))
        model.layer_stages = (self.pre, self.post)
        model.layer_stages_min_tokens = LAYER_STAGES_MIN_TOKENS

    def pre(self, layer, rope_cs, x):
        fn = self.fns[id(layer)][0]
        return self.calls(lambda: fn(layer, rope_cs, x), lambda: _pre_attention(layer, rope_cs, x), x.shape[0])

    def post(self, layer, x, o):
        fn = self.fns[id(layer)][1]
        return self.calls(lambda: fn(layer, x, o), lambda: _post_attention(layer, x, o), x.shape[0])


def _decode_step(model, input_ids, positions, kv_caches, meta):
    # the forward without its ``@torch.inference_mode()`` wrapper: the caller is already in
    # inference mode, and entering it again inside the traced region fails on the KV
    # caches (inference tensors)
    return type(model).forward.__wrapped__(model, input_ids, positions, kv_caches, meta)


class CompiledDecodeRunner:
    """Runs decode-only steps through ``torch.compile``-d graphs of the model's forward.

    Args:
        model: the model (one rank, ``tp.world_size == 1``).
        kv_caches: the runner's KV cache tensors.
        max_num_seqs: the largest decode batch (``--max-num-seqs``).
        decode_kernel: whether the model's decode attention is the C++ kernel
            (:func:`argosy.runtime.attention.torch_paged.use_decode_kernel`).
        cpp_wrapper: inductor's C++ wrapper (else its Python one); None:
            :func:`cpp_wrapper_setting`.
    Raises:
        ValueError: ``cpp_wrapper`` None and a bad ``ARGOSY_INDUCTOR_CPP_WRAPPER``.
    """

    def __init__(self, model, kv_caches: list[torch.Tensor], max_num_seqs: int, decode_kernel: bool = False,
                 cpp_wrapper: Optional[bool] = None):
        #: the graphs are built with inductor's C++ wrapper (else its Python one)
        self.cpp_wrapper = cpp_wrapper_setting() if cpp_wrapper is None else cpp_wrapper
        # also sets inductor's cache directory, per vector ISA and row limit (see there)
        if not inductor_vec_isa(graph_tag=f"rows{INT4_MAX_ROWS}"):
            logger.warning("inductor found no vector instruction set on this CPU (or could not probe it): "
                           "compiled steps will run scalar C++ and gain little")
        self.model = model
        self.kv_caches = kv_caches
        self.max_num_seqs = max_num_seqs
        #: the graphs' attention is the C++ decode kernel (no padding) rather than the torch one
        self.decode_kernel = decode_kernel
        self.fn = _compile(_decode_step, self.cpp_wrapper)
        self.stages = CompiledLayerStages(model, self.cpp_wrapper)
        self.compile_seconds = 0.0
        #: decode steps run through a compiled graph since warm-up (``steps.compiled``) or
        #: eagerly for want of a graph built at warm-up (``steps.eager``)
        self.steps = _CompiledOrEager("a decode step", "sequences")

    def can_run(self, meta: AttentionMetadata) -> bool:
        """True for a decode-only step without padding slots, and, when the graph's attention
        is the padded torch one (no C++ decode kernel), :meth:`padding_ok`."""
        if meta.max_query_len != 1 or meta.num_decodes != meta.num_seqs or meta.has_padding:
            return False
        return self.decode_kernel or self.padding_ok(meta)

    @staticmethod
    def padding_ok(meta: AttentionMetadata) -> bool:
        """Whether the torch decode attention in the graph is not too wasteful: it reads
        ``B x max(seq_lens)`` context tokens, and above ``INT4_MAX_ROWS`` sequences, when that
        exceeds the real ``sum(seq_lens)`` by more than :data:`MAX_PADDED_CONTEXT_TOKENS`, the
        eager attention (which groups similar lengths) with compiled layer stages is faster.
        Measured (prompts of 50-500 tokens): 32 prompts x 64 out (~8k padding tokens) 216
        tok/s through the graph vs 183 eager attention; 64 x 128 (~18k) 211 vs 262. The C++
        decode kernel (:mod:`argosy.runtime.attention.cpu_decode`) reads no padding."""
        lens = meta.seq_lens_cpu
        return len(lens) <= INT4_MAX_ROWS or max(lens) * len(lens) - sum(lens) <= MAX_PADDED_CONTEXT_TOKENS

    def _call(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
              block_tables: torch.Tensor, seq_lens: torch.Tensor, mark: bool) -> torch.Tensor:
        if block_tables.shape[1] < 2:  # keep W symbolic (see the module doc)
            block_tables = torch.cat((block_tables, block_tables), dim=1)
        if mark:
            for t in (input_ids, positions, slots, block_tables, seq_lens):
                torch._dynamo.mark_dynamic(t, 0)
            torch._dynamo.mark_dynamic(block_tables, 1)
        meta = DecodeMetadata(slot_mapping=slots, block_tables=block_tables, seq_lens=seq_lens)
        return self.fn(self.model, input_ids, positions, self.kv_caches, meta)

    def warm_sizes(self) -> list[int]:
        """One batch size per graph (see the module doc), within ``max_num_seqs``."""
        sizes = [1, min(2, self.max_num_seqs), min(INT4_MAX_ROWS + 1, self.max_num_seqs)]
        return list(dict.fromkeys(sizes))

    @torch.inference_mode()
    def warmup(self) -> float:
        """Compile every graph with dummy steps that write only block 0's first slots
        (call before any request holds a block). Returns the seconds it took."""
        t0 = time.monotonic()
        for b in self.warm_sizes():
            zeros = torch.zeros(b, dtype=torch.int64)
            self._call(zeros, zeros.clone(), torch.arange(b, dtype=torch.int64), torch.zeros(b, 2, dtype=torch.int32),
                       torch.ones(b, dtype=torch.int32), mark=True)
        self.stages.warmup()
        self.compile_seconds = time.monotonic() - t0
        logger.info("torch.compile (%s wrapper): decode step graphs for batch sizes %s and the layer stages for "
                    "steps of %d+ tokens in %.1f s (cache: %s)", "C++" if self.cpp_wrapper else "Python",
                    self.warm_sizes(), LAYER_STAGES_MIN_TOKENS, self.compile_seconds,
                    os.environ.get("TORCHINDUCTOR_CACHE_DIR"))
        return self.compile_seconds

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Run a decode-only step (:meth:`can_run`) through the compiled graphs, or eagerly
        when its shapes would need a graph that was not built at warm-up (never compiles
        while serving; counted in ``steps.eager``, the first one logged with dynamo's
        reason).

        Args:
            input_ids / positions: ``[B] int64``; meta: the step's metadata.
        Returns:
            Final hidden states ``[B, hidden_size]``.
        """
        return self.steps(
            lambda: self._call(input_ids, positions, meta.slot_mapping, meta.block_tables, meta.seq_lens, mark=False),
            lambda: self.model(input_ids, positions, self.kv_caches, meta), input_ids.shape[0])


def resolve_mode(value, enforce_eager: bool) -> int:
    """The compilation mode from ``--compilation-config`` / ``-O`` (``0``, ``3``, or JSON
    ``{"mode": N}``; vLLM's older ``{"level": N}`` too), ``--enforce-eager`` (always 0)
    and ``$ARGOSY_COMPILATION_MODE`` (the default when the flag is absent; else 3).

    Raises:
        ValueError: a mode other than 0 or 3, or a malformed value.
    """
    import json

    if enforce_eager:
        return 0
    if value is None:
        value = os.environ.get(MODE_ENV, "3")
    if isinstance(value, str):
        text = value.strip()
        try:
            value = json.loads(text) if text.startswith("{") else int(text)
        except ValueError:
            raise ValueError(f"--compilation-config must be 0, 3 or JSON like '{{\"mode\": 3}}', not {value!r}") from None
    if isinstance(value, dict):
        unknown = set(value) - {"mode", "level"}
        if unknown:
            raise ValueError(f"--compilation-config: unsupported keys {sorted(unknown)} (supported: mode)")
        value = value.get("mode", value.get("level", 3))
    if isinstance(value, bool) or not isinstance(value, int) or value not in COMPILATION_MODES:
        raise ValueError(f"--compilation-config mode must be one of {COMPILATION_MODES} (0 = eager, 3 = compiled "
                         f"decode steps), not {value!r}")
    return value


def should_compile(mode: int, device: torch.device, dtype: torch.dtype, world_size: int) -> Optional[str]:
    """None when decode steps are compiled, else why not (for the startup log).

    Raises:
        ValueError: steps would be compiled and ``ARGOSY_INDUCTOR_CPP_WRAPPER`` has a value
            other than 0 or 1 (:func:`cpp_wrapper_setting`).
    """
    if mode == 0:
        return "compilation mode 0 (--enforce-eager or -O0)"
    if device.type != "cpu":
        return "CUDA decode steps use CUDA graphs instead"
    if world_size > 1:
        return "tensor parallelism (collectives inside compiled graphs are not enabled)"
    if dtype == torch.float32:
        return "float32 is the exact path (compiled loops round differently)"
    cpp_wrapper_setting()
    return None
