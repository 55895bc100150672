"""Hugging Face model directories: ``config.json``, ``*.safetensors``, ``tokenizer.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Optional

import torch

from ..config import ModelConfig
from .base import Checkpoint, ModelLoadError, ShardFn, SUPPORTED_HF_ARCHITECTURES, SUPPORTED_MODEL_TYPES
from .tokenizer import load_hf_tokenizer


def read_config(path: Path) -> ModelConfig:
    """Parse ``config.json`` into a :class:`ModelConfig`.

    Raises:
        ModelLoadError: missing/invalid JSON, an unsupported architecture, or a
            ``quantization_config`` (AWQ, GPTQ, compressed-tensors, FP8: not implemented yet).
    """
    cfg_path = path / "config.json"
    try:
        c = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: no config.json (not a Hugging Face model directory)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{cfg_path}: unreadable config ({e})") from None
    qc = c.get("quantization_config")
    if qc:
        # loading packed or scaled weights as plain floats would serve garbage (an FP8
        # checkpoint's weights without their scales): refuse until the format is implemented
        method = qc.get("quant_method", "unknown") if isinstance(qc, dict) else "unknown"
        detail = ""
        if isinstance(qc, dict):
            bits = qc.get("bits") or qc.get("w_bit")
            fmt = qc.get("format")
            detail = ", ".join(x for x in (f"{bits}-bit" if bits else "", f"format {fmt}" if fmt else "") if x)
        raise ModelLoadError(
            f"{path}: pre-quantized checkpoint (quant_method {method!r}{', ' + detail if detail else ''}) is not "
            f"supported yet; supported: GGUF files and unquantized safetensors directories")
    archs = c.get("architectures") or []
    if not (set(archs) & set(SUPPORTED_HF_ARCHITECTURES)) and c.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"{path}: unsupported architecture {archs or c.get('model_type')!r} "
            f"(supported: {', '.join(SUPPORTED_HF_ARCHITECTURES)})"
        )
    try:
        n_head = int(c["num_attention_heads"])
        hidden = int(c["hidden_size"])
        eos = c.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        rope_params = c.get("rope_parameters") or {}
        rope_scaling = c.get("rope_scaling") or (rope_params if rope_params.get("rope_type", "default") != "default" else None)
        return ModelConfig(
            hidden_size=hidden,
            intermediate_size=int(c["intermediate_size"]),
            num_hidden_layers=int(c["num_hidden_layers"]),
            num_attention_heads=n_head,
            num_key_value_heads=int(c.get("num_key_value_heads") or n_head),
            vocab_size=int(c["vocab_size"]),
            head_dim=int(c.get("head_dim") or hidden // n_head),
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            rope_theta=float(c.get("rope_theta", rope_params.get("rope_theta", 10000.0))),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(c.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            bos_token_id=c.get("bos_token_id"),
            eos_token_ids=eos_ids,
            attention_bias=bool(c.get("attention_bias", False)),
            mlp_bias=bool(c.get("mlp_bias", False)),
            architecture=(archs or ["LlamaForCausalLM"])[0],
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{cfg_path}: missing or invalid field {e}") from None


def iter_weights(path: Path, shard_for: Optional[ShardFn] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` from every ``*.safetensors`` file, one tensor at a time.

    With ``shard_for``, a sharded tensor is read as a slice (``safe_open(...).get_slice``),
    so a tensor-parallel rank reads only its own rows or columns from disk.
    """
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path}: no *.safetensors weights")
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    shard = shard_for(name) if shard_for else None
                    if shard is None:
                        yield name, st.get_tensor(name)
                        continue
                    dim, start, stop = shard
                    sl = st.get_slice(name)
                    index = (slice(None),) * dim + (slice(start, stop),)
                    yield name, sl[index]
        except ModelLoadError:
            raise
        except Exception as e:
            raise ModelLoadError(f"{f}: corrupt safetensors file ({e})") from None


def load_hf_dir(path: str, tokenizer_path: str | None = None, with_tokenizer: bool = True) -> Checkpoint:
    """Load a Hugging Face model directory (the tokenizer too unless ``with_tokenizer`` is False).

    Raises:
        ModelLoadError: missing files, unsupported architecture or unreadable tokenizer.
    """
    p = Path(path)
    cfg = read_config(p)
    if not any(p.glob("*.safetensors")):
        raise ModelLoadError(f"{path}: no *.safetensors weights")
    tok = None
    if with_tokenizer:
        tok = load_hf_tokenizer(tokenizer_path or str(p))
    if tok is not None and tok.eos_token_id is not None and tok.eos_token_id not in cfg.eos_token_ids:
        cfg.eos_token_ids = cfg.eos_token_ids + (int(tok.eos_token_id),)
    return Checkpoint(config=cfg, weights=lambda shard_for=None, int4=False: iter_weights(p, shard_for), tokenizer=tok, name=p.name, path=str(p))
