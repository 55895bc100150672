"""The Llama decoder family (Llama 2/3, SmolLM2, Mistral-style GQA) over a paged KV cache.

Architecture: Touvron et al., "LLaMA" (2023) and "Llama 2" (2023): pre-norm RMSNorm
(Zhang & Sennrich 2019), rotary position embedding (Su et al., RoFormer 2021, Hugging
Face's rotate-half layout), SwiGLU MLP (Shazeer 2020), grouped-query attention
(Ainslie et al. 2023). Numerics follow ``transformers``' ``LlamaForCausalLM`` op for op
so float32 logits agree with it to rounding.

The forward pass takes one engine step's flattened tokens (prefill chunks and decodes
mixed) and the step's :class:`AttentionMetadata`; there is no batch dimension.

Tensor parallelism (Megatron-LM, Shoeybi et al. 2019, §3) over ``tp.world_size`` ranks:
the fused QKV and gate/up projections are column-parallel (each rank holds
``heads / N`` query heads, ``kv_heads / N`` KV heads and ``intermediate / N`` MLP
columns), ``o_proj`` and ``down_proj`` are row-parallel (partial sums all-reduced), the
embedding and LM head are vocab-parallel (``ceil(vocab / N)`` rows per rank; the
embedding all-reduces, the logits are gathered to rank 0). Query head ``h`` uses KV head
``h // (heads / kv_heads)``, so rank ``r``'s query heads only need its own KV heads and
the KV cache is sharded by KV heads with no communication in attention.
"""

from __future__ import annotations

import logging
import math
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import AttentionMetadata, DecodeMetadata, resolve_backend, torch_paged
from ..config import ModelConfig
from ..distributed import TPGroup
from ..layers import INT4_MAX_ROWS, Linear
from ..quantization import dequant, q8_0
from ..quantization.base import CpuPackedMethod
from ..quantization.fp8 import Fp8Weight
from ..quantization.int8 import Int8Weight
from ..quantization.int4 import Int4Embedding, Int4Weight
from ..quantization.q8_0 import PackedQ8, Q8Embedding, Q8Weight

logger = logging.getLogger("argosy.model")

#: Rows of a 4-bit embedding dequantized at a time into its dense table (the float32
#: temporaries then take ~3 x 8,192 x hidden x 4 bytes, not three times the whole table's)
EMBEDDING_DEQUANT_ROWS = 8192


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in float32 as in HF ``LlamaRMSNorm``.

    ``forward(x [T, H])`` -> ``[T, H]`` in ``x``'s dtype. float32 inputs take HF's exact
    op sequence (the float32 path matches HF to the bit); 16-bit inputs take ATen's fused
    ``rms_norm`` on the float32 upcast (same formula, one op instead of four).
    """

    def __init__(self, hidden: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden, dtype=dtype), requires_grad=False)
        self.eps = eps
        self._shape = (hidden,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype != torch.float32:
            return self.weight * F.rms_norm(x.float(), self._shape, eps=self.eps).to(dtype)
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies ``[head_dim // 2] float32`` incl. llama3 / linear rope scaling.

    llama3 scaling follows Meta's Llama 3.1 reference (``apply_scaling`` in
    ``llama/model.py``), as also implemented by HF ``_compute_llama3_parameters``.
    """
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type"))
    if kind == "linear":
        inv = inv / float(rs["factor"])
    elif kind == "llama3":
        factor = float(rs["factor"])
        lo, hi = float(rs.get("low_freq_factor", 1.0)), float(rs.get("high_freq_factor", 4.0))
        old = float(rs.get("original_max_position_embeddings", 8192))
        low_wl, high_wl = old / lo, old / hi
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wl) & (wavelen <= low_wl)
        inv = torch.where(medium, smoothed, scaled)
    elif kind not in (None, "default"):
        raise ValueError(f"unsupported rope_scaling type {kind!r}")
    return inv


class RotaryEmbedding(nn.Module):
    """Rotate-half rotary embedding with a precomputed cos/sin table
    (``[max_positions, head_dim]`` each, in the model dtype)."""

    def __init__(self, cfg: ModelConfig, max_positions: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        inv = rope_inv_freq(cfg)
        freqs = torch.arange(max_positions, dtype=torch.int64).float()[:, None] * inv[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos().to(dtype=dtype, device=device), persistent=False)
        self.register_buffer("sin", emb.sin().to(dtype=dtype, device=device), persistent=False)
        half = inv.shape[0]
        #: ``sin`` with its first half negated: ``rotate_half(x) * sin == roll(x, d/2) * sin_signed``
        #: exactly (negation is exact), in 2 ops instead of 5.
        self.register_buffer("sin_signed", torch.cat((-self.sin[:, :half], self.sin[:, half:]), dim=-1),
                             persistent=False)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions [T]`` -> ``(cos, sin_signed)``, each ``[T, 1, head_dim]`` (computed
        once per step, for :meth:`apply_signed`)."""
        return self.cos[positions].unsqueeze(1), self.sin_signed[positions].unsqueeze(1)

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``x [T, heads, head_dim]`` (q and k heads may be stacked in one call):
        HF's ``x * cos + rotate_half(x) * sin`` (the reference form)."""
        return x * cos + _rotate_half(x) * sin

    @staticmethod
    def apply_signed(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
        """:meth:`rotate` with ``sin_signed`` from :meth:`cos_sin`: the same values, bit for
        bit, with ``roll`` in place of rotate-half's slice/negate/concatenate."""
        return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * sin_signed


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _bias_param(size: int, enabled: bool, dtype, device) -> Optional[nn.Parameter]:
    if not enabled:
        return None
    return nn.Parameter(torch.zeros(size, dtype=dtype, device=device), requires_grad=False)


class LlamaAttention(nn.Module):
    """GQA self-attention with fused QKV projection over the paged cache, in three calls
    (:meth:`project`, :meth:`attend`, :meth:`output`) so the layer can compile the parts
    around the attention.

    Under tensor parallelism this rank's ``qkv_proj`` holds its query and KV heads
    (column-parallel) and ``o_proj`` its input columns (row-parallel, all-reduced).
    With ``attention_bias`` (HF Llama: q, k, v and o projections all biased) the q/k/v
    bias is sharded with its heads and the o bias is added once, after the all-reduce.
    """

    def __init__(self, cfg: ModelConfig, dtype, device, tp: TPGroup):
        super().__init__()
        self.tp = tp
        self.num_heads = cfg.num_attention_heads // tp.world_size
        self.num_kv_heads = cfg.num_key_value_heads // tp.world_size
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj = Linear(self.q_size + 2 * self.kv_size, cfg.hidden_size, cfg.attention_bias, dtype, device)
        self.o_proj = Linear(cfg.hidden_size, self.q_size, False, dtype, device)
        self.o_bias = _bias_param(cfg.hidden_size, cfg.attention_bias, dtype, device)
        self.store_kv, self.paged_attention = resolve_backend(torch.device(device))
        #: decode rows take the C++ paged decode kernel (set once by the model runner,
        #: :meth:`LlamaForCausalLM.set_decode_kernel`); None: decided on every call
        self.decode_kernel: Optional[bool] = None
        #: the checkpoint's per-tensor FP8 KV-cache scales ``(k_scale, v_scale)``, used with an
        #: E4M3 KV cache (:meth:`LlamaForCausalLM.load_weights`); None: values stored unscaled
        self.kv_scales: Optional[tuple[float, float]] = None

    def project(self, rope_cs, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``hidden [T, hidden_size]`` -> rotated ``q [T, H, D]``, rotated ``k [T, H_kv, D]``, ``v [T, H_kv, D]``."""
        # heads first, then slices: viewing a column slice would make torch.compile
        # specialize the token count 1 (a view of a non-contiguous tensor)
        qkv = self.qkv_proj(hidden).unflatten(1, (-1, self.head_dim))  # [T, H + 2 H_kv, D]
        # q and k heads rotated together: [T, H + H_kv, D]
        qk = RotaryEmbedding.apply_signed(qkv[:, : self.num_heads + self.num_kv_heads], *rope_cs)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        return q, k, qkv[:, self.num_heads + self.num_kv_heads :]

    def attend(self, q, k, v, kv_cache, meta) -> torch.Tensor:
        """Write ``k``/``v`` into the paged cache and attend: ``[T, H, D]`` out.

        With :attr:`kv_scales` ``(s_k, s_v)`` the cache holds ``k / s_k`` and ``v / s_v``
        (vLLM's FP8 KV-cache scales: stored divided, multiplied on read); the attention
        kernels read the cache unscaled, so the scales are folded around them:
        ``q s_k . k / s_k = q . k`` and ``softmax (v / s_v) s_v = softmax v``, exact up to
        rounding, with no kernel change. Every attention path reads keys and values from
        the cache after storing them, so the current chunk's are scaled alike."""
        if self.kv_scales is not None:
            ks, vs = self.kv_scales
            return self._attend(q * ks, k / ks, v / vs, kv_cache, meta) * vs
        return self._attend(q, k, v, kv_cache, meta)

    def _attend(self, q, k, v, kv_cache, meta) -> torch.Tensor:
        if isinstance(meta, DecodeMetadata):  # a compiled decode step (tensor-only attention)
            torch_paged.store_kv_decode(k, v, kv_cache, meta)
            return torch_paged.decode_attention(q, kv_cache, meta, self.scale, self.decode_kernel)
        self.store_kv(k, v, kv_cache, meta)
        if self.paged_attention is torch_paged.paged_attention:
            return torch_paged.paged_attention(q, kv_cache, meta, self.scale, self.decode_kernel)
        return self.paged_attention(q, kv_cache, meta, self.scale)

    def output(self, o: torch.Tensor) -> torch.Tensor:
        """``o [T, H, D]`` -> ``[T, hidden_size]`` (o_proj, all-reduced, o bias)."""
        out = self.tp.all_reduce(self.o_proj(o.reshape(o.shape[0], self.q_size)))
        return out if self.o_bias is None else out + self.o_bias


class LlamaMLP(nn.Module):
    """SwiGLU MLP with fused gate/up projection: ``down(silu(gate(x)) * up(x))``.

    Under tensor parallelism gate/up are column-parallel (``intermediate / N`` columns
    each) and ``down_proj`` row-parallel (all-reduced). With ``mlp_bias`` the gate/up
    bias is sharded like its rows and the down bias is added once, after the all-reduce.
    """

    def __init__(self, cfg: ModelConfig, dtype, device, tp: TPGroup):
        super().__init__()
        self.tp = tp
        self.inter = cfg.intermediate_size // tp.world_size
        self.gate_up_proj = Linear(2 * self.inter, cfg.hidden_size, cfg.mlp_bias, dtype, device)
        self.down_proj = Linear(cfg.hidden_size, self.inter, False, dtype, device)
        self.down_bias = _bias_param(cfg.hidden_size, cfg.mlp_bias, dtype, device)

    def forward(self, x):
        gu = self.gate_up_proj(x)
        gate, up = gu.split(self.inter, dim=-1)
        out = self.tp.all_reduce(self.down_proj(F.silu(gate) * up))
        return out if self.down_bias is None else out + self.down_bias


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype, device, tp: TPGroup):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = LlamaAttention(cfg, dtype, device, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = LlamaMLP(cfg, dtype, device, tp)

    def pre_attention(self, rope_cs, x: torch.Tensor):
        """Everything before attention: input norm, QKV projection, rotary (``q, k, v``)."""
        return self.self_attn.project(rope_cs, self.input_layernorm(x))

    def post_attention(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """Everything after attention: o_proj + residual, post-attention norm, MLP + residual."""
        x = x + self.self_attn.output(o)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward(self, rope_cs, x, kv_cache, meta, stages=None):
        """One layer. ``stages``: ``(pre, post)`` callables taking ``(layer, ...)`` like
        :meth:`pre_attention` / :meth:`post_attention` (compiled versions of them;
        :mod:`argosy.runtime.worker.cpu_compile`), default the methods themselves."""
        pre, post = stages or (LlamaDecoderLayer.pre_attention, LlamaDecoderLayer.post_attention)
        q, k, v = pre(self, rope_cs, x)
        return post(self, x, self.self_attn.attend(q, k, v, kv_cache, meta))


def check_tp_divisibility(cfg: ModelConfig, world_size: int) -> None:
    """Raise a clear error when the model cannot be split over ``world_size`` ranks.

    Raises:
        ValueError: attention heads, KV heads or the MLP width not divisible by
            ``world_size`` (message names the counts and the sizes that would work).
    """
    if world_size < 1:
        raise ValueError(f"--tensor-parallel-size must be >= 1, got {world_size}")
    if world_size == 1:
        return
    checks = [
        ("attention heads", cfg.num_attention_heads),
        ("KV heads", cfg.num_key_value_heads),
        ("intermediate size", cfg.intermediate_size),
    ]
    for what, n in checks:
        if n % world_size:
            ok = [k for k in range(1, cfg.num_key_value_heads + 1)
                  if all(v % k == 0 for _, v in checks)]
            raise ValueError(
                f"--tensor-parallel-size {world_size} does not divide the model: it has "
                f"{cfg.num_attention_heads} attention heads and {cfg.num_key_value_heads} KV heads "
                f"(intermediate size {cfg.intermediate_size}); {what} ({n}) % {world_size} != 0. "
                f"Sizes that work: {', '.join(map(str, ok))}"
            )


#: ``(dim, start, stop)``: the slice of a full checkpoint tensor one rank loads.
Shard = tuple[int, int, int]


#: checkpoint names of FP8 KV-cache scales (compressed-tensors' ``kv_cache_scheme``,
#: vLLM's ``fp8`` format; ``kv_scale``: one for both, older checkpoints)
KV_SCALE_NAMES = ("k_scale", "v_scale", "kv_scale")


def _kv_scale_name(name: str) -> Optional[tuple[int, str]]:
    """``(layer index, "k_scale" | "v_scale" | "kv_scale")`` for
    ``model.layers.<i>.self_attn.<k|v|kv>_scale``, or for the same scales under the
    ``k_proj`` / ``v_proj`` names older writers used (llm-compressor's ``output_scale``,
    AutoFP8's ``k_proj.k_scale`` / ``v_proj.v_scale``; vLLM reads them all), else None."""
    parts = name.split(".")
    if len(parts) < 5 or parts[:2] != ["model", "layers"] or parts[3] != "self_attn" or not parts[2].isdigit():
        return None
    if len(parts) == 5 and parts[4] in KV_SCALE_NAMES:
        return int(parts[2]), parts[4]
    if len(parts) == 6 and (parts[4], parts[5]) in (("k_proj", "output_scale"), ("v_proj", "output_scale"),
                                                    ("k_proj", "k_scale"), ("v_proj", "v_scale")):
        return int(parts[2]), parts[4][0] + "_scale"
    return None


def _scalar_scale(name: str, w) -> float:
    """A per-tensor KV-cache scale as a float. Raises ValueError for a tensor of more than
    one value (per-head scales are not supported)."""
    if not isinstance(w, torch.Tensor) or w.numel() != 1:
        shape = tuple(w.shape) if hasattr(w, "shape") else type(w).__name__
        raise ValueError(f"{name}: only per-tensor FP8 KV-cache scales are supported, got shape {shape}")
    return float(w.float().item())


class LlamaForCausalLM(nn.Module):
    """Llama decoder over a paged KV cache.

    Args:
        cfg: architecture (full, unsharded sizes).
        dtype: weight and activation dtype (float32 / bfloat16 / float16).
        device: where weights live.
        max_positions: rotary table length in tokens (>= the engine's ``max_model_len``).
        tp: this rank's tensor-parallel group (default: a single rank).
    Raises:
        ValueError: see :func:`check_tp_divisibility`.
    """

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, max_positions: Optional[int] = None,
                 tp: Optional[TPGroup] = None):
        super().__init__()
        tp = tp or TPGroup()
        check_tp_divisibility(cfg, tp.world_size)
        self.cfg = cfg
        self.dtype = dtype
        self.tp = tp
        #: Vocabulary rows per rank (the last rank's tail past ``vocab_size`` is zero padding).
        self.vocab_per_rank = -(-cfg.vocab_size // tp.world_size)
        self.vocab_start = tp.rank * self.vocab_per_rank
        self.rope = RotaryEmbedding(cfg, max_positions or cfg.max_position_embeddings, dtype, device)
        self.embed_tokens = nn.Parameter(torch.zeros(self.vocab_per_rank, cfg.hidden_size, dtype=dtype, device=device),
                                         requires_grad=False)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, dtype, device, tp) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(self.vocab_per_rank, cfg.hidden_size, False, dtype,
                                                                   device)
        if self.lm_head is not None:
            self.lm_head.weight.data.zero_()  # the last rank's rows past vocab_size stay zero
        #: ``(pre, post)`` replacing every layer's :meth:`LlamaDecoderLayer.pre_attention` /
        #: ``post_attention`` in steps of at least ``layer_stages_min_tokens`` tokens that
        #: are not compiled decode steps (set by :mod:`argosy.runtime.worker.cpu_compile`).
        self.layer_stages: Optional[tuple] = None
        self.layer_stages_min_tokens = 1
        #: quantized checkpoint weights come to the layers in their own form, to run packed:
        #: bfloat16 on CPU (the int4, int8 and grouped int8 kernels' case; a Q8_0, Q5_x or
        #: Q6_K LM head is also kept as such, :attr:`logits_q8`) and float16 / bfloat16 on
        #: CUDA (4-bit weights on the Triton W4A16 kernel, the others dense)
        dev_type = torch.device(device).type
        self.uses_int4 = (dev_type == "cpu" and dtype == torch.bfloat16) or (
            dev_type == "cuda" and dtype in (torch.float16, torch.bfloat16))
        #: the LM head in the file's grouped int8 form (Q8_0, Q5_x, Q6_K), for logits of few rows
        #: (decode at low batch: :meth:`compute_logits`); None: the dense matrix only
        self.logits_q8: Optional[PackedQ8] = None
        #: the embedding held only in its grouped int8 form (its dense :attr:`embed_tokens`
        #: then empty): a Q8_0 / Q5_x / Q6_K embedding on the CPU in bfloat16 when the
        #: model keeps no dense copies of quantized weights (:meth:`_decide_dense_copies`),
        #: which also drops a Q8 LM head's dense copy (logits of more rows then run on the
        #: kernel or the dequantization scratch, :meth:`compute_logits`); None: dense
        self.embed_q8: Optional[Q8Embedding] = None
        #: the embedding held only in its 4-bit form (GGUF Q4_0 / Q4_1 / Q4_K ``token_embd``),
        #: under the same conditions, for a model whose LM head is a separate tensor (a tied
        #: 4-bit one keeps its dense matrix for the logits); None: dense
        self.embed_int4: Optional[Int4Embedding] = None
        #: whether quantized embeddings / LM heads keep a dense copy (False: decided by
        #: :meth:`_decide_dense_copies`, as for the linear layers)
        self.dense_embedding_copy = True
        #: ``--quantization`` applied at load to a float checkpoint's linear layers (``"fp8"``:
        #: :meth:`~argosy.runtime.quantization.fp8.Fp8Weight.quantize`; the embeddings and
        #: LM head stay as they are, as in vLLM), None: none
        self.online_quantization: Optional[str] = None
        #: the KV cache's element type (set before :meth:`load_weights`): a checkpoint's FP8
        #: KV-cache scales are used with ``float8_e4m3fn`` only, as vLLM does
        self.kv_cache_dtype: Optional[torch.dtype] = None

    def set_decode_kernel(self, enabled: bool) -> None:
        """Decide once, for every layer, whether decode rows take the C++ paged decode
        kernel (:func:`argosy.runtime.attention.torch_paged.use_decode_kernel`, evaluated
        by the model runner at startup) instead of on every layer call."""
        for layer in self.layers:
            layer.self_attn.decode_kernel = bool(enabled)

    @property
    def num_kv_heads(self) -> int:
        """KV heads held by this rank (the KV cache's head dimension)."""
        return self.cfg.num_key_value_heads // self.tp.world_size

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        """Run one step.

        Args:
            input_ids: ``[num_tokens] int64``.
            positions: ``[num_tokens] int64`` absolute positions.
            kv_caches: one ``[2, num_blocks, block_size, num_kv_heads / N, head_dim]`` per layer.
            meta: the step's attention metadata; a :class:`DecodeMetadata` (decode-only
                steps, one rank) takes the tensor-only attention that ``torch.compile``
                traces (:mod:`argosy.runtime.worker.cpu_compile`).
        Returns:
            Final hidden states ``[num_tokens, hidden_size]`` (after the last norm), the
            same on every rank.
        """
        if self.tp.is_parallel:
            local = input_ids - self.vocab_start
            mine = (local >= 0) & (local < self.vocab_per_rank)
            x = self._embed(torch.where(mine, local, 0))
            x = self.tp.all_reduce(x * mine.unsqueeze(-1).to(x.dtype))
        else:
            x = self._embed(input_ids)
        rope_cs = self.rope.cos_sin(positions)
        stages = None
        if self.layer_stages is not None and not isinstance(meta, DecodeMetadata) \
                and input_ids.shape[0] >= self.layer_stages_min_tokens:
            stages = self.layer_stages
        for layer, cache in zip(self.layers, kv_caches):
            x = layer(rope_cs, x, cache, meta, stages)
        return self.norm(x)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding rows ``ids [T] int64`` (this rank's vocabulary slice) -> ``[T, hidden_size]``."""
        if self.embed_q8 is not None:
            return self.embed_q8(ids)
        if self.embed_int4 is not None:
            return self.embed_int4(ids)
        return F.embedding(ids, self.embed_tokens)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> Optional[torch.Tensor]:
        """``[N, hidden_size]`` -> logits ``[N, vocab_size] float32`` on rank 0. A grouped
        int8 LM head (:attr:`logits_q8`) runs its kernel for at most ``q8_0.MAX_ROWS``
        rows, more rows the dense copy; where the head's dense weight was dropped (no
        dense copies: the tied :attr:`embed_q8`, or an untied head's empty weight), the
        kernel up to ``q8_0.LEAN_MAX_ROWS`` rows and the dequantization scratch in row
        blocks of ``q8_0.LOGITS_SCRATCH_ELEMENTS`` beyond.

        Under tensor parallelism every rank must call this (the vocab slices are
        gathered to rank 0); the other ranks get None.
        """
        p = self.logits_q8  # the file's int8 values and scales, float32 math (see q8_0)
        dense = self.embed_tokens if self.lm_head is None else self.lm_head.weight
        rows = hidden.shape[0]
        if p is not None and (rows <= q8_0.MAX_ROWS or (not dense.numel() and rows <= q8_0.LEAN_MAX_ROWS)):
            local = torch.ops.argosy.q8_linear(hidden, p.w, p.scales, p.mins, p.group_size, p.n)
        elif p is not None and not dense.numel():
            local = dequant.q8_dense_linear(hidden, p.w, p.scales, p.mins, p.group_size, p.n, None,
                                            max_elements=q8_0.LOGITS_SCRATCH_ELEMENTS)
        else:
            local = F.linear(hidden, self.embed_tokens) if self.lm_head is None else self.lm_head(hidden)
        logits = self.tp.gather_to_first(local)
        if logits is None:
            return None
        return logits[:, : self.cfg.vocab_size].float()

    # ------------------------------------------------------------- loading
    def shard_for(self, name: str) -> Optional[Shard]:
        """The slice of checkpoint tensor ``name`` (Hugging Face naming, full shape) this
        rank loads, or None for the whole tensor (replicated, or a single rank). Only a
        ``weight`` or ``bias`` is sharded: the per-tensor scales some checkpoints keep
        under a projection's name (``k_proj.output_scale``, ``q_proj.input_scale``) are
        read whole."""
        tp = self.tp
        if not tp.is_parallel or name.rpartition(".")[2] not in ("weight", "bias"):
            return None
        cfg = self.cfg
        r = tp.rank
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            return (0, self.vocab_start, min(cfg.vocab_size, self.vocab_start + self.vocab_per_rank))
        d = cfg.head_dim
        hq, hkv, inter = cfg.num_attention_heads // tp.world_size, self.num_kv_heads, cfg.intermediate_size // tp.world_size
        for suffix, dim, size in (
            ("self_attn.q_proj", 0, hq * d), ("self_attn.k_proj", 0, hkv * d), ("self_attn.v_proj", 0, hkv * d),
            ("self_attn.o_proj.weight", 1, hq * d),
            ("mlp.gate_proj", 0, inter), ("mlp.up_proj", 0, inter), ("mlp.down_proj.weight", 1, inter),
        ):
            if suffix in name:
                return (dim, r * size, (r + 1) * size)
        return None

    def _decide_dense_copies(self) -> None:
        """On the CPU, tell every linear layer (the LM head included) whether a quantized
        weight keeps a dense copy for large calls
        (:func:`~argosy.runtime.layers.linear.keep_dense_copies` on the whole model's dense
        bytes: every tensor-parallel rank runs on this machine); what the layers did is
        logged after loading when one is quantized."""
        from ..layers import linear

        layers = [m for m in self.modules() if isinstance(m, Linear)]
        if not layers or layers[0].weight.device.type != "cpu":
            return
        # every rank of the machine holds its shard's copies: decide on the model's total
        dense = sum(m.out_features * m.in_features * m.weight.element_size() for m in layers) * self.tp.world_size
        keep = linear.keep_dense_copies(dense)
        for m in layers:
            m.keep_dense_copy = keep
        self.dense_embedding_copy = keep
        self._dense_copies_note = (f"ARGOSY_CPU_DENSE_COPIES={linear.DENSE_COPIES}, {dense >> 20} MiB if all were "
                                   f"dense, memory limit {linear.memory_limit_bytes() >> 20} MiB")

    def load_weights(self, weights: Iterable[tuple[str, object]]) -> None:
        """Copy Hugging Face-named tensors in, fusing q/k/v and gate/up, then pack the
        4-bit ones (:meth:`process_weights_after_loading`).

        A weight is a tensor (dense, any float dtype) or an
        :class:`~argosy.runtime.quantization.int4.Int4Weight` (a 4-bit GGUF tensor, when
        :attr:`uses_int4`), which its :class:`~argosy.runtime.layers.Linear` keeps packed,
        a :class:`~argosy.runtime.quantization.q8_0.Q8Weight` (grouped int8: GGUF Q8_0,
        Q5_x, Q6_K): an embedding / LM head is kept dense and, where the C++ kernel
        builds, also as :attr:`logits_q8` (without dense copies, only in that form:
        :attr:`embed_q8`), a linear layer's goes to its ``Linear``, or a
        :class:`~argosy.runtime.quantization.int8.Int8Weight` (int8 with
        per-row scales), which its ``Linear`` keeps for the int8 kernel, or an
        :class:`~argosy.runtime.quantization.fp8.Fp8Weight` (FP8 with per-row scales). With
        :attr:`online_quantization` ``"fp8"``, a dense weight of a decoder layer's linear
        projection is quantized to FP8 as it arrives (this rank's shard).
        Under tensor parallelism each tensor must already be this rank's slice
        (:meth:`shard_for`); the loaders read only that slice where the format allows.

        Raises:
            ValueError: a tensor with an unexpected shape, or required weights missing.
        """
        cfg = self.cfg
        attn0 = self.layers[0].self_attn
        q_size, kv_size = attn0.q_size, attn0.kv_size
        self._decide_dense_copies()
        seen: set[str] = set()
        kv_scales: dict[int, dict[str, float]] = {}
        for name, w in weights:
            scale_of = _kv_scale_name(name)
            if scale_of is not None:
                kv_scales.setdefault(scale_of[0], {})[scale_of[1]] = _scalar_scale(name, w)
                continue
            owner, target, rows = self._target(name, q_size, kv_size)
            if target is None:
                continue
            dst = target if rows is None else target[rows[0] : rows[1]]
            if name in ("model.embed_tokens.weight", "lm_head.weight") and w.shape[0] < dst.shape[0]:
                dst = dst[: w.shape[0]]  # the last rank's vocab slice is short; the rest stays zero
            if tuple(dst.shape) != tuple(w.shape):
                raise ValueError(f"weight {name}: shape {tuple(w.shape)} does not match model {tuple(dst.shape)}")
            if isinstance(w, Q8Weight) and name in ("model.embed_tokens.weight", "lm_head.weight"):
                head = name == "lm_head.weight" or cfg.tie_word_embeddings
                packed = dst.device.type == "cpu" and q8_0.kernel() is not None
                lean = (packed and not self.dense_embedding_copy and self.dtype == torch.bfloat16
                        and dequant.kernel() is not None)
                # the int8 layout: the head's kernel call and the lookups below read no high-bit planes
                p = PackedQ8.pack(w, self.vocab_per_rank, max_bits=0) if packed and (head or lean) else None
                if head and p is not None:
                    self.logits_q8 = p
                if not lean:
                    dst.copy_(w.dequantize(dst.dtype))  # lookups, and logits of many rows
                elif name == "model.embed_tokens.weight":
                    self.embed_q8 = Q8Embedding(p, self.dtype)
                    self.embed_tokens = nn.Parameter(torch.empty(0, cfg.hidden_size, dtype=self.dtype,
                                                                 device=dst.device), requires_grad=False)
                else:
                    self.lm_head.free_dense_weight()
            elif isinstance(w, Int4Weight) and name == "model.embed_tokens.weight":
                if (dst.device.type == "cpu" and not self.dense_embedding_copy and self.dtype == torch.bfloat16
                        and not cfg.tie_word_embeddings and w.perm is None and w.shape[1] % 2 == 0):
                    self.embed_int4 = Int4Embedding(w, self.vocab_per_rank, self.dtype)
                    self.embed_tokens = nn.Parameter(torch.empty(0, cfg.hidden_size, dtype=self.dtype,
                                                                 device=dst.device), requires_grad=False)
                else:  # the file's values (float32 scales), in row blocks (float32 temporaries stay small)
                    for r0 in range(0, w.shape[0], EMBEDDING_DEQUANT_ROWS):
                        r1 = min(w.shape[0], r0 + EMBEDDING_DEQUANT_ROWS)
                        dst[r0:r1].copy_(w.rows(r0, r1).dequantize(dst.dtype, kernel_rounding=False))
            elif self.online_quantization == "fp8" and owner is not None and owner is not self.lm_head \
                    and isinstance(w, torch.Tensor) and name.endswith("_proj.weight"):
                owner.load_quantized(rows[0] if rows else 0, Fp8Weight.quantize(w))
            elif isinstance(w, (Int4Weight, Int8Weight, Q8Weight, Fp8Weight)):
                if owner is not None:  # a linear layer's weight (or rows of a fused one)
                    owner.load_quantized(rows[0] if rows else 0, w)
                else:
                    dst.copy_(w.dequantize(dst.dtype))
            else:
                dst.copy_(w.to(dst.dtype))
            seen.add(name)
        needed = 2 + 9 * cfg.num_hidden_layers + (0 if cfg.tie_word_embeddings else 1)
        if cfg.attention_bias:
            needed += 4 * cfg.num_hidden_layers
        if cfg.mlp_bias:
            needed += 3 * cfg.num_hidden_layers
        if len(seen) < needed:
            raise ValueError(f"checkpoint is missing weights: loaded {len(seen)} of {needed} tensors")
        self._set_kv_scales(kv_scales)
        self.process_weights_after_loading()
        note = getattr(self, "_dense_copies_note", None)
        quantized = [m for m in self.modules() if isinstance(m, Linear) and isinstance(m.quant_method, CpuPackedMethod)]
        if self.embed_int4 is not None:
            logger.info("the 4-bit embedding is held in that form only (lookups dequantize their rows)")
        if self.embed_q8 is not None:
            logger.info("the grouped int8 embedding%s is held in that form only (lookups dequantize their rows; "
                        "logits of more than %d rows run on the dequantization scratch)",
                        " / LM head" if self.cfg.tie_word_embeddings else "", q8_0.LEAN_MAX_ROWS)
        if note and quantized:
            lean = sum(m.dense_on_demand for m in quantized)
            logger.info("%d of %d quantized linear layers keep a dense copy for steps of more than %d rows, the "
                        "others dequantize into a scratch matrix (%s)", len(quantized) - lean, len(quantized),
                        INT4_MAX_ROWS, note)

    def _set_kv_scales(self, found: dict[int, dict[str, float]]) -> None:
        """Give each attention layer its checkpoint KV-cache scales when the cache is E4M3
        (``k_scale``/``v_scale``, or one ``kv_scale`` for both); a layer without them keeps
        1.0 (unscaled), as vLLM does.

        Raises:
            ValueError: a non-positive or non-finite scale.
        """
        if not found:
            return
        if self.kv_cache_dtype != torch.float8_e4m3fn:
            logger.info("the checkpoint's FP8 KV-cache scales are not used: the KV cache is %s (they apply to "
                        "--kv-cache-dtype fp8 / fp8_e4m3)", self.kv_cache_dtype)
            return
        for i, layer in enumerate(self.layers):
            got = found.get(i, {})
            ks = got.get("k_scale", got.get("kv_scale", 1.0))
            vs = got.get("v_scale", got.get("kv_scale", 1.0))
            for v in (ks, vs):
                if not (v > 0 and v < float("inf")):
                    raise ValueError(f"layer {i}: FP8 KV-cache scale {v} is not a positive finite number")
            layer.self_attn.kv_scales = None if (ks, vs) == (1.0, 1.0) else (float(ks), float(vs))
        logger.info("FP8 KV cache with the checkpoint's per-tensor scales (%d of %d layers scaled)",
                    sum(layer.self_attn.kv_scales is not None for layer in self.layers), len(self.layers))

    def process_weights_after_loading(self) -> None:
        """Pack every linear layer whose weight arrived in 4-bit form (see
        :class:`~argosy.runtime.layers.Linear`)."""
        for m in self.modules():
            if isinstance(m, Linear):
                m.process_weights_after_loading()

    def _target(self, name: str, q_size: int, kv_size: int):
        """``(owning Linear or None, destination tensor, row range or None)`` for a
        checkpoint tensor name; ``(None, None, None)`` for names the model does not use."""
        if name == "model.embed_tokens.weight":
            return None, self.embed_tokens.data, None
        if name == "model.norm.weight":
            return None, self.norm.weight.data, None
        if name == "lm_head.weight":
            return (None, None, None) if self.lm_head is None else (self.lm_head, self.lm_head.weight.data, None)
        parts = name.split(".")
        if len(parts) < 5 or parts[0] != "model" or parts[1] != "layers":
            return None, None, None
        layer = self.layers[int(parts[2])]
        sub = ".".join(parts[3:])
        attn, mlp = layer.self_attn, layer.mlp
        inter = mlp.inter
        qkv, gu = attn.qkv_proj, mlp.gate_up_proj
        table = {
            "input_layernorm.weight": (None, layer.input_layernorm.weight.data, None),
            "post_attention_layernorm.weight": (None, layer.post_attention_layernorm.weight.data, None),
            "self_attn.q_proj.weight": (qkv, qkv.weight.data, (0, q_size)),
            "self_attn.k_proj.weight": (qkv, qkv.weight.data, (q_size, q_size + kv_size)),
            "self_attn.v_proj.weight": (qkv, qkv.weight.data, (q_size + kv_size, q_size + 2 * kv_size)),
            "self_attn.o_proj.weight": (attn.o_proj, attn.o_proj.weight.data, None),
            "mlp.gate_proj.weight": (gu, gu.weight.data, (0, inter)),
            "mlp.up_proj.weight": (gu, gu.weight.data, (inter, 2 * inter)),
            "mlp.down_proj.weight": (mlp.down_proj, mlp.down_proj.weight.data, None),
        }
        if qkv.bias is not None:
            table.update({
                "self_attn.q_proj.bias": (None, qkv.bias.data, (0, q_size)),
                "self_attn.k_proj.bias": (None, qkv.bias.data, (q_size, q_size + kv_size)),
                "self_attn.v_proj.bias": (None, qkv.bias.data, (q_size + kv_size, q_size + 2 * kv_size)),
                "self_attn.o_proj.bias": (None, attn.o_bias.data, None),
            })
        if gu.bias is not None:
            table.update({
                "mlp.gate_proj.bias": (None, gu.bias.data, (0, inter)),
                "mlp.up_proj.bias": (None, gu.bias.data, (inter, 2 * inter)),
                "mlp.down_proj.bias": (None, mlp.down_bias.data, None),
            })
        return table.get(sub, (None, None, None))
