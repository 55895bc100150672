"""GGUF checkpoints through the ``gguf`` package.

Metadata keys and tensor names follow the GGUF spec
(https://github.com/ggml-org/ggml/blob/master/docs/gguf.md). Quantized tensors are
dequantized with ``gguf.quants.dequantize`` to float32. llama.cpp's converter stores
``attn_q``/``attn_k`` rows permuted for its interleaved rotary embedding; we undo that
so the weights match the Hugging Face layout (rotate-half RoPE).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from ..config import ModelConfig
from .base import Checkpoint, ModelLoadError, ShardFn, SUPPORTED_MODEL_TYPES, narrow
from .tokenizer import load_gguf_tokenizer as load_tokenizer

logger = logging.getLogger(__name__)

_LAYER_MAP = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def _open(path: str):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # gguf raises ValueError/struct errors/IndexError on bad files
        raise ModelLoadError(f"{path}: not a valid GGUF file ({type(e).__name__}: {e})") from None


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


def hf_name(gguf_name: str) -> str | None:
    """Hugging Face parameter name for a GGUF tensor name, or None if unused."""
    if gguf_name in _GLOBAL_MAP:
        return _GLOBAL_MAP[gguf_name]
    m = _BLK.match(gguf_name)
    if m and m.group(2) in _LAYER_MAP:
        return f"model.layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's ``permute`` of q/k projection rows.

    llama.cpp's ``convert_hf_to_gguf.py`` reshapes rows as ``[n_head, 2, d/2]`` and swaps
    the last two axes so that rotary pairs are adjacent; this is the inverse.

    Args:
        w: ``[n_head * head_dim, ...]`` rows in GGUF order (or the bias ``[n_head*head_dim]``).
        n_head: number of heads in this projection (query heads for q, KV heads for k).
    Returns:
        Array of the same shape in Hugging Face order.
    """
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def read_config(reader, path: str) -> ModelConfig:
    """Build a :class:`ModelConfig` from GGUF metadata.

    Raises:
        ModelLoadError: unsupported architecture or missing required keys.
    """
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"{path}: unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )

    def req(key):
        v = _field(reader, f"{arch}.{key}")
        if v is None:
            raise ModelLoadError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return v

    hidden = int(req("embedding_length"))
    n_head = int(req("attention.head_count"))
    n_kv = int(_field(reader, f"{arch}.attention.head_count_kv", n_head))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = int(_field(reader, f"{arch}.vocab_size", len(tokens.data) if tokens is not None else 0))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // n_head))
    rope_scaling = None
    st = _field(reader, f"{arch}.rope.scaling.type")
    if st == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(_field(reader, f"{arch}.rope.scaling.factor", 1.0))}
    names = {t.name for t in reader.tensors}
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    return ModelConfig(
        hidden_size=hidden,
        intermediate_size=int(req("feed_forward_length")),
        num_hidden_layers=int(req("block_count")),
        num_attention_heads=n_head,
        num_key_value_heads=n_kv,
        vocab_size=vocab,
        head_dim=head_dim,
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 2048)),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=() if eos is None else (int(eos),),
        attention_bias="blk.0.attn_q.bias" in names,
        mlp_bias="blk.0.ffn_down.bias" in names,
        architecture="LlamaForCausalLM",
        quantization="gguf",
    )


def _read_slice(t, shard, full_shape: tuple[int, ...]) -> tuple[np.ndarray, tuple[int, ...]]:
    """The raw GGUF data of tensor ``t`` restricted to ``shard`` where its layout allows.

    GGUF stores a 2-D tensor as rows of quantization blocks along the last (input)
    dimension, so a row range (``dim 0``) is a plain row slice, and a column range
    (``dim 1``) is a byte slice when it starts and ends on a block boundary.

    Returns:
        ``(data, shape)``: what to dequantize, and the HF-layout shape it will have; a
        column range that splits a block comes back whole (``shape == full_shape``).
    """
    import gguf

    data = t.data
    if shard is None:
        return data, full_shape
    dim, start, stop = shard
    if dim == 0:
        return data[start:stop], (stop - start, *full_shape[1:])
    if data.dtype != np.uint8:  # unquantized: element-addressed
        return data[:, start:stop], (full_shape[0], stop - start)
    blk, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type]
    if start % blk or stop % blk:
        return data, full_shape
    return data[:, start // blk * type_size : stop // blk * type_size], (full_shape[0], stop - start)


def _quantized_weight(t, shard, full_shape: tuple[int, ...], cfg: ModelConfig, grouped_int8: bool):
    """Tensor ``t`` (2-D) decoded without loss, HF row order, restricted to ``shard``: a
    :class:`~argosy.runtime.quantization.q8_0.Q8Weight` when ``grouped_int8`` (Q8_0, Q5_x,
    Q6_K), else an :class:`~argosy.runtime.quantization.int4.Int4Weight` (Q4_0, Q4_1,
    Q4_K); None when the shard splits a quantization group (the caller then
    dequantizes).

    Raises:
        ValueError: the blocks do not match the tensor's shape.
    """
    from ..quantization.gguf import decode_int4
    from ..quantization.q8_0 import Q8Weight

    data, shape = _read_slice(t, shard, full_shape)
    kind = t.tensor_type.name
    w = Q8Weight.from_gguf(data, shape, kind) if grouped_int8 else decode_int4(data, kind, shape)
    if t.name.endswith(("attn_q.weight", "attn_k.weight")):
        order = unpermute_qk(np.arange(shape[0]), shape[0] // cfg.head_dim)
        w = w.permute_rows(order)
    if shard is not None and shape == full_shape:  # a column range inside quantization blocks
        dim, start, stop = shard
        try:
            w = w.rows(start, stop) if dim == 0 else w.cols(start, stop)
        except ValueError:
            return None
    return w


def iter_weights(reader, cfg: ModelConfig, path: str, shard_for: Optional[ShardFn] = None,
                 int4: bool = False) -> Iterator[tuple[str, object]]:
    """Yield ``(hf_name, weight)`` for every tensor the Llama model uses.

    A weight is a float32 tensor, or, with ``int4`` (the packed fast path): for a 2-D
    linear weight stored as Q4_0/Q4_1/Q4_K, an
    :class:`~argosy.runtime.quantization.int4.Int4Weight` decoded without loss (the
    embedding too: the model holds it packed or dequantizes it); for a
    linear weight, the embedding or the LM head stored as Q8_0, Q5_0, Q5_1, Q5_K or Q6_K,
    a :class:`~argosy.runtime.quantization.q8_0.Q8Weight` (grouped int8, also without
    loss). Other types (Q2_K, Q3_K, the IQ types, floats) come dequantized.
    With ``shard_for``, only each tensor's slice is decoded (see :func:`_read_slice`);
    the file is memory-mapped, so the rest is never read.

    Raises:
        ModelLoadError: a tensor that cannot be decoded or has the wrong size.
    """
    from gguf.quants import dequantize

    from ..quantization.gguf import INT4_TYPES
    from ..quantization.q8_0 import TYPES as Q8_TYPES

    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            continue
        shard = shard_for(name) if shard_for else None
        full_shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        kind = t.tensor_type.name
        if int4 and len(full_shape) == 2 and (kind in Q8_TYPES or kind in INT4_TYPES):
            try:
                w = _quantized_weight(t, shard, full_shape, cfg, kind in Q8_TYPES)
            except ValueError as e:
                raise ModelLoadError(f"{path}: cannot decode tensor {t.name} ({kind}): {e}") from None
            if w is not None:
                yield name, w
                continue
        data, shape = _read_slice(t, shard, full_shape)
        try:
            arr = dequantize(data, t.tensor_type)
        except Exception as e:
            raise ModelLoadError(f"{path}: cannot dequantize tensor {t.name} ({t.tensor_type.name}): {e}") from None
        if arr.size != int(np.prod(shape)):
            raise ModelLoadError(f"{path}: tensor {t.name} has {arr.size} values, expected shape {shape} (truncated file?)")
        arr = arr.reshape(shape)
        if t.name.endswith(("attn_q.weight", "attn_q.bias", "attn_k.weight", "attn_k.bias")):
            # the permutation is within each head, so a slice of whole heads unpermutes alone
            arr = unpermute_qk(arr, arr.shape[0] // cfg.head_dim)
        out = torch.from_numpy(np.array(arr, dtype=np.float32, copy=not arr.flags.writeable, order="C"))
        if shard is not None and shape == full_shape:  # a column range inside quantization blocks
            out = narrow(out, shard)
        yield name, out


def load_gguf(path: str, with_tokenizer: bool = True) -> Checkpoint:
    """Load a GGUF file (metadata, tokenizer unless ``with_tokenizer`` is False, lazy weights).

    Raises:
        ModelLoadError: invalid file, unsupported architecture or tokenizer.
    """
    reader = _open(path)
    cfg = read_config(reader, path)
    tok = load_tokenizer(path) if with_tokenizer else None
    if tok is not None and tok.eos_token_id is not None and tok.eos_token_id not in cfg.eos_token_ids:
        cfg.eos_token_ids = cfg.eos_token_ids + (int(tok.eos_token_id),)
    name = Path(path).name
    if name.endswith(".gguf"):
        name = name[: -len(".gguf")]
    return Checkpoint(config=cfg, weights=lambda shard_for=None, int4=False: iter_weights(reader, cfg, path, shard_for, int4), tokenizer=tok, name=name, path=path)
