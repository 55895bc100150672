"""The Llama decoder family (Llama 2/3, SmolLM2, Mistral-style GQA) over a paged KV cache.

Architecture: Touvron et al., "LLaMA" (2023) and "Llama 2" (2023): pre-norm RMSNorm
(Zhang & Sennrich 2019), rotary position embedding (Su et al., RoFormer 2021, Hugging
Face's rotate-half layout), SwiGLU MLP (Shazeer 2020), grouped-query attention
(Ainslie et al. 2023). Numerics follow ``transformers``' ``LlamaForCausalLM`` op for op
so float32 logits agree with it to rounding.

The forward pass takes one engine step's flattened tokens (prefill chunks and decodes
mixed) and the step's :class:`AttentionMetadata`; there is no batch dimension.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import AttentionMetadata, resolve_backend
from ..config import ModelConfig


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in float32 as in HF ``LlamaRMSNorm``.

    ``forward(x [T, H])`` -> ``[T, H]`` in ``x``'s dtype.
    """

    def __init__(self, hidden: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden, dtype=dtype), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


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

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions [T]`` -> ``(cos, sin)``, each ``[T, 1, head_dim]`` (computed once per step)."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``x [T, heads, head_dim]`` (q and k heads may be stacked in one call)."""
        return x * cos + _rotate_half(x) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _linear_param(out_f: int, in_f: int, dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(out_f, in_f, dtype=dtype, device=device), requires_grad=False)


class LlamaAttention(nn.Module):
    """GQA self-attention with fused QKV projection over the paged cache."""

    def __init__(self, cfg: ModelConfig, dtype, device):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj = _linear_param(self.q_size + 2 * self.kv_size, cfg.hidden_size, dtype, device)
        self.qkv_bias = (
            nn.Parameter(torch.zeros(self.q_size + 2 * self.kv_size, dtype=dtype, device=device), requires_grad=False)
            if cfg.attention_bias
            else None
        )
        self.o_proj = _linear_param(cfg.hidden_size, self.q_size, dtype, device)
        self.store_kv, self.paged_attention = resolve_backend(torch.device(device))

    def forward(self, rope_cs, hidden, kv_cache, meta: AttentionMetadata):
        t = hidden.shape[0]
        qkv = F.linear(hidden, self.qkv_proj, self.qkv_bias)
        # q and k heads rotated together: [T, H + H_kv, D]
        qk = RotaryEmbedding.apply(qkv[:, : self.q_size + self.kv_size].view(t, -1, self.head_dim), *rope_cs)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, self.q_size + self.kv_size :].view(t, self.num_kv_heads, self.head_dim)
        self.store_kv(k, v, kv_cache, meta)
        o = self.paged_attention(q, kv_cache, meta, self.scale)
        return F.linear(o.reshape(t, self.q_size), self.o_proj)


class LlamaMLP(nn.Module):
    """SwiGLU MLP with fused gate/up projection: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: ModelConfig, dtype, device):
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = _linear_param(2 * self.inter, cfg.hidden_size, dtype, device)
        self.down_proj = _linear_param(cfg.hidden_size, self.inter, dtype, device)

    def forward(self, x):
        gu = F.linear(x, self.gate_up_proj)
        gate, up = gu.split(self.inter, dim=-1)
        return F.linear(F.silu(gate) * up, self.down_proj)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype, device):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = LlamaAttention(cfg, dtype, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = LlamaMLP(cfg, dtype, device)

    def forward(self, rope_cs, x, kv_cache, meta):
        x = x + self.self_attn(rope_cs, self.input_layernorm(x), kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    """Llama decoder over a paged KV cache.

    Args:
        cfg: architecture.
        dtype: weight and activation dtype (float32 / bfloat16 / float16).
        device: where weights live.
        max_positions: rotary table length in tokens (>= the engine's ``max_model_len``).
    """

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, max_positions: Optional[int] = None):
        super().__init__()
        self.cfg = cfg
        self.dtype = dtype
        self.rope = RotaryEmbedding(cfg, max_positions or cfg.max_position_embeddings, dtype, device)
        self.embed_tokens = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device), requires_grad=False)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, dtype, device) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = None if cfg.tie_word_embeddings else _linear_param(cfg.vocab_size, cfg.hidden_size, dtype, device)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        """Run one step.

        Args:
            input_ids: ``[num_tokens] int64``.
            positions: ``[num_tokens] int64`` absolute positions.
            kv_caches: one ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` per layer.
            meta: the step's attention metadata.
        Returns:
            Final hidden states ``[num_tokens, hidden_size]`` (after the last norm).
        """
        x = F.embedding(input_ids, self.embed_tokens)
        rope_cs = self.rope.cos_sin(positions)
        for layer, cache in zip(self.layers, kv_caches):
            x = layer(rope_cs, x, cache, meta)
        return self.norm(x)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[N, hidden_size]`` -> logits ``[N, vocab_size] float32``."""
        w = self.embed_tokens if self.lm_head is None else self.lm_head
        return F.linear(hidden, w).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors in, fusing q/k/v and gate/up.

        Raises:
            ValueError: a tensor with an unexpected shape, or required weights missing.
        """
        cfg = self.cfg
        q_size = cfg.num_attention_heads * cfg.head_dim
        kv_size = cfg.num_key_value_heads * cfg.head_dim
        seen: set[str] = set()
        for name, w in weights:
            target, rows = self._target(name, q_size, kv_size)
            if target is None:
                continue
            dst = target if rows is None else target[rows[0] : rows[1]]
            if tuple(dst.shape) != tuple(w.shape):
                raise ValueError(f"weight {name}: shape {tuple(w.shape)} does not match model {tuple(dst.shape)}")
            dst.copy_(w.to(dst.dtype))
            seen.add(name)
        needed = 2 + 9 * cfg.num_hidden_layers + (0 if cfg.tie_word_embeddings else 1)
        if cfg.attention_bias:
            needed += 3 * cfg.num_hidden_layers
        if len(seen) < needed:
            raise ValueError(f"checkpoint is missing weights: loaded {len(seen)} of {needed} tensors")

    def _target(self, name: str, q_size: int, kv_size: int):
        if name == "model.embed_tokens.weight":
            return self.embed_tokens.data, None
        if name == "model.norm.weight":
            return self.norm.weight.data, None
        if name == "lm_head.weight":
            return (None, None) if self.lm_head is None else (self.lm_head.data, None)
        parts = name.split(".")
        if len(parts) < 5 or parts[0] != "model" or parts[1] != "layers":
            return None, None
        layer = self.layers[int(parts[2])]
        sub = ".".join(parts[3:])
        attn, mlp = layer.self_attn, layer.mlp
        inter = self.cfg.intermediate_size
        table = {
            "input_layernorm.weight": (layer.input_layernorm.weight.data, None),
            "post_attention_layernorm.weight": (layer.post_attention_layernorm.weight.data, None),
            "self_attn.q_proj.weight": (attn.qkv_proj.data, (0, q_size)),
            "self_attn.k_proj.weight": (attn.qkv_proj.data, (q_size, q_size + kv_size)),
            "self_attn.v_proj.weight": (attn.qkv_proj.data, (q_size + kv_size, q_size + 2 * kv_size)),
            "self_attn.o_proj.weight": (attn.o_proj.data, None),
            "mlp.gate_proj.weight": (mlp.gate_up_proj.data, (0, inter)),
            "mlp.up_proj.weight": (mlp.gate_up_proj.data, (inter, 2 * inter)),
            "mlp.down_proj.weight": (mlp.down_proj.data, None),
        }
        if attn.qkv_bias is not None:
            table.update({
                "self_attn.q_proj.bias": (attn.qkv_bias.data, (0, q_size)),
                "self_attn.k_proj.bias": (attn.qkv_bias.data, (q_size, q_size + kv_size)),
                "self_attn.v_proj.bias": (attn.qkv_bias.data, (q_size + kv_size, q_size + 2 * kv_size)),
            })
        return table.get(sub, (None, None))
