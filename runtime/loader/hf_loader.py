"""Hugging Face model directories: ``config.json``, ``*.safetensors``, ``tokenizer.json``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterator, Optional, Union

import torch

from ..config import ModelConfig
from .base import Checkpoint, ModelLoadError, narrow, ShardFn, SUPPORTED_HF_ARCHITECTURES, SUPPORTED_MODEL_TYPES
from ..quantization import fp8, gptq_awq
from ..quantization.base import UnsupportedQuantization
from ..quantization.compressed_tensors import (W8A8_ACTIVATIONS, Int8WeightScheme, Scheme as CTScheme, complete, decode,
                                               dequantize_8bit, int8_weight, parse_config, quantized_part)
from ..quantization.fp8 import Fp8Weight
from ..quantization.int4 import Int4Weight

#: A checkpoint's quantization scheme: compressed-tensors, AWQ, GPTQ or FP8.
Scheme = Union[CTScheme, gptq_awq.Scheme, fp8.Fp8Scheme]
from .tokenizer import load_hf_tokenizer

logger = logging.getLogger("argosy.loader")


def _config_json(path: Path) -> dict:
    cfg_path = path / "config.json"
    try:
        return json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: no config.json (not a Hugging Face model directory)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{cfg_path}: unreadable config ({e})") from None


def quant_scheme(path: Path, c: dict) -> Optional[Scheme]:
    """The checkpoint's quantization scheme from ``config.json`` ``c``: None when dense.

    Raises:
        ModelLoadError: a ``quantization_config`` that cannot be served (another method,
            and the schemes the parsers refuse:
            :func:`~argosy.runtime.quantization.compressed_tensors.parse_config`,
            :func:`~argosy.runtime.quantization.gptq_awq.parse_config`,
            :func:`~argosy.runtime.quantization.fp8.parse_config`), one line naming
            it. Packed or scaled weights are never read as plain floats.
    """
    qc = c.get("quantization_config")
    if not qc:
        return None
    method = str(qc.get("quant_method", "unknown")).lower() if isinstance(qc, dict) else "unknown"
    if method in ("compressed-tensors", "awq", "gptq", "fp8"):
        try:
            if method == "fp8":
                return fp8.parse_config(qc)
            return parse_config(qc) if method == "compressed-tensors" else gptq_awq.parse_config(qc)
        except UnsupportedQuantization as e:
            raise ModelLoadError(f"{path}: pre-quantized checkpoint: {e}") from None
    detail = ""
    if isinstance(qc, dict):
        bits = qc.get("bits") or qc.get("w_bit")
        fmt = qc.get("format")
        detail = ", ".join(x for x in (f"{bits}-bit" if bits else "", f"format {fmt}" if fmt else "") if x)
    raise ModelLoadError(
        f"{path}: pre-quantized checkpoint (quant_method {method!r}{', ' + detail if detail else ''}) is not "
        f"supported yet; supported: GGUF files, unquantized safetensors directories, AWQ (4-bit GEMM), GPTQ "
        f"(4/8-bit), fp8 (per-tensor or block scales) and compressed-tensors W4A16 / W8A8 / FP8")


def read_config(path: Path) -> ModelConfig:
    """Parse ``config.json`` into a :class:`ModelConfig`.

    Raises:
        ModelLoadError: missing/invalid JSON, an unsupported architecture, or a
            ``quantization_config`` that cannot be served (:func:`quant_scheme`).
    """
    cfg_path = path / "config.json"
    c = _config_json(path)
    scheme = quant_scheme(path, c)  # refuses what cannot be served, before anything else is read
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
            quantization=(str(c["quantization_config"].get("quant_method")).lower()
                          if isinstance(c.get("quantization_config"), dict) else None),
            kv_cache_only_quantization=isinstance(c.get("quantization_config"), dict) and scheme is None,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{cfg_path}: missing or invalid field {e}") from None


def _take(w, shard: Optional[tuple[int, int, int]]):
    """``w`` (a quantized weight class with ``rows``/``cols``) restricted to ``shard``
    ``(dim, start, stop)``: output rows for dim 0, input columns for dim 1; ``w`` itself
    when ``shard`` is None."""
    if shard is None:
        return w
    dim, start, stop = shard
    return w.rows(start, stop) if dim == 0 else w.cols(start, stop)


def _packed_layer(path: Path, module: str, parts: dict, scheme: Scheme, shard_for: Optional[ShardFn],
                  int4: bool) -> tuple[str, object]:
    """One quantized layer (compressed-tensors, AWQ or GPTQ) as ``(hf weight name, Int4Weight, Q8Weight, Int8Weight or float32
    tensor)``, restricted to this rank's shard (4-bit: on group boundaries, groups split
    to 32 columns where a shard needs it; a shard that cuts even those is an error)."""
    name = module + ".weight"
    try:
        if isinstance(scheme, fp8.Fp8Scheme):
            w = fp8.decode(parts, scheme)
            shard = shard_for(name) if shard_for else None
            if isinstance(w, torch.Tensor):  # block scales: dense
                return name, w if shard is None else narrow(w, shard)
            w = _take(w, shard)
            return name, w if int4 else w.dequantize(torch.float32)
        if isinstance(scheme, (gptq_awq.AWQScheme, gptq_awq.GPTQScheme)):
            return name, _awq_gptq_layer(parts, scheme, shard_for(name) if shard_for else None, int4)
        if isinstance(scheme, Int8WeightScheme):
            shard = shard_for(name) if shard_for else None
            w8a8 = scheme.format != "float-quantized" and scheme.symmetric and scheme.activations == W8A8_ACTIVATIONS
            if w8a8 or (int4 and (scheme.format != "float-quantized" or
                                  (scheme.symmetric and parts["weight"].dtype == torch.float8_e4m3fn))):
                # (a W8A8 layer comes as int8 at every dtype: its activations are quantized too)
                w8 = int8_weight(parts, w8a8) if scheme.format != "float-quantized" else \
                    Fp8Weight.from_checkpoint(parts["weight"], parts["weight_scale"],
                                              dynamic_activations=scheme.activations is not None)
                return name, _take(w8, shard)
            dense = dequantize_8bit(parts, scheme)
            return name, dense if shard is None else narrow(dense, shard)
        w = decode(parts, scheme)
        shard = shard_for(name) if shard_for else None
        if shard is not None:
            dim, start, stop = shard
            if dim == 1 and (start % w.group_size or stop % w.group_size) and w.group_size > 32:
                w = w.regroup(32)  # e.g. 192 columns a rank of group-128 scales: same values, groups of 32
            w = _take(w, shard)
    except ValueError as e:
        raise ModelLoadError(f"{path}: layer {module}: {e}") from None
    return name, (w if int4 else w.dequantize(torch.float32, kernel_rounding=False))


def _awq_gptq_layer(parts: dict, scheme: gptq_awq.Scheme, shard, int4: bool) -> object:
    """One AWQ / GPTQ layer, restricted to ``shard``: the packed weight's class when
    ``int4`` (the quantized kernels' case, :attr:`LlamaForCausalLM.uses_int4`) and the shard
    keeps whole groups, else float32."""
    w = gptq_awq.decode_awq(parts, scheme) if isinstance(scheme, gptq_awq.AWQScheme) else \
        gptq_awq.decode_gptq(parts, scheme)
    if isinstance(w, torch.Tensor):  # an 8-bit act-order layer: dense
        return w if shard is None else narrow(w, shard)
    if shard is not None:
        dim, start, stop = shard
        if dim == 1 and isinstance(w, Int4Weight) and w.perm is not None:
            return narrow(w.dequantize(torch.float32, kernel_rounding=False), shard)  # act-order, row-parallel: dense
        if dim == 1 and isinstance(w, Int4Weight) and (start % w.group_size or stop % w.group_size) \
                and w.group_size > 32:
            w = w.regroup(32)
        w = _take(w, shard)
    return w if int4 else w.dequantize(torch.float32, kernel_rounding=False)


def iter_weights(path: Path, shard_for: Optional[ShardFn] = None, int4: bool = False,
                 scheme: Optional[Scheme] = None) -> Iterator[tuple[str, object]]:
    """Yield ``(name, tensor)`` from every ``*.safetensors`` file, one tensor at a time.

    With ``shard_for``, a sharded tensor is read as a slice (``safe_open(...).get_slice``),
    so a tensor-parallel rank reads only its own rows or columns from disk. With a
    compressed-tensors ``scheme``, each packed layer's tensors are gathered and yielded
    once as ``<layer>.weight``: an :class:`~argosy.runtime.quantization.int4.Int4Weight`
    with ``int4`` (run packed), else dequantized to float32; a tensor-parallel shard of
    it is cut after decoding, on whole quantization groups. 8-bit layers: int8 (W8A8)
    as an :class:`~argosy.runtime.quantization.int8.Int8Weight` with
    ``int4`` (the quantized kernels' case), else dequantized to float32; FP8 (E4M3,
    symmetric) as an :class:`~argosy.runtime.quantization.fp8.Fp8Weight` with ``int4``,
    else dequantized.
    AWQ / GPTQ layers likewise (:func:`_awq_gptq_layer`). ``fp8`` checkpoints: per-tensor
    (or per-row) scaled layers as :class:`~argosy.runtime.quantization.fp8.Fp8Weight`
    with ``int4``, block-scaled ones dequantized to float32.

    Raises:
        ModelLoadError: no weights, a corrupt file, a packed layer with missing or
            inconsistent parts, or a shard that splits a quantization group.
    """
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path}: no *.safetensors weights")
    pending: dict[str, dict[str, torch.Tensor]] = {}  # packed layers whose parts are still arriving
    legacy = isinstance(scheme, (gptq_awq.AWQScheme, gptq_awq.GPTQScheme))  # AWQ / GPTQ, not compressed-tensors
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    if scheme is None:
                        part = None
                    elif isinstance(scheme, fp8.Fp8Scheme):
                        part = fp8.quantized_part(name, st.get_slice(name).get_dtype())
                    elif legacy:
                        part = gptq_awq.quantized_part(name, scheme)
                    else:
                        part = quantized_part(name, st.get_slice(name).get_dtype(), scheme)
                    if part is not None:
                        module = name.rpartition(".")[0]
                        parts = pending.setdefault(module, {})
                        parts[part] = st.get_tensor(name)
                        done = fp8.complete(parts) if isinstance(scheme, fp8.Fp8Scheme) else \
                            gptq_awq.complete(parts, scheme) if legacy else complete(parts, scheme)
                        if done:
                            del pending[module]
                            yield _packed_layer(path, module, parts, scheme, shard_for, int4)
                        continue
                    if (legacy or isinstance(scheme, fp8.Fp8Scheme)) and gptq_awq.unexpected_dense(name, scheme):
                        expected = "an F8_E4M3 weight with its weight_scale_inv" if not legacy else \
                            f"{name[:-len('weight')]}qweight"
                        raise ModelLoadError(f"{path}: {name} is a plain float weight in a {scheme.method} "
                                             f"checkpoint (expected {expected}, or the module in "
                                             "modules_to_not_convert)")
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
    if pending:
        first = next(iter(pending))
        raise ModelLoadError(f"{path}: quantized layer {first} is missing some of its tensors "
                             f"(has {', '.join(sorted(pending[first]))})")


def load_hf_dir(path: str, tokenizer_path: str | None = None, with_tokenizer: bool = True) -> Checkpoint:
    """Load a Hugging Face model directory (the tokenizer too unless ``with_tokenizer`` is False).

    Raises:
        ModelLoadError: missing files, unsupported architecture or unreadable tokenizer.
    """
    p = Path(path)
    cfg = read_config(p)
    scheme = quant_scheme(p, _config_json(p))
    if isinstance(scheme, fp8.Fp8Scheme):
        logger.info("%s: fp8 checkpoint (%s scales, %s activations): %s", p.name,
                    f"{scheme.block[0]} x {scheme.block[1]} block" if scheme.block else "per-tensor",
                    scheme.activation_scheme,
                    "block-scaled layers run dense on their FP8 values" if scheme.block else
                    "torch._scaled_mm with per-token FP8 activations on GPUs that take row-wise scales, elsewhere "
                    "dense on the FP8 values")
    if isinstance(scheme, Int8WeightScheme) and scheme.format == "float-quantized":
        if scheme.activations is None:
            logger.info("%s: compressed-tensors FP8 weight-only checkpoint: dense on its FP8 values", p.name)
        else:
            logger.warning("%s: compressed-tensors FP8 checkpoint: its layers run torch._scaled_mm with per-token "
                           "FP8 activations on GPUs that take row-wise scales, elsewhere weight-only (dense on the "
                           "FP8 values; its %s activation quantization is not applied there)", p.name,
                           scheme.activations)
    elif isinstance(scheme, Int8WeightScheme) and scheme.symmetric and scheme.activations == W8A8_ACTIVATIONS:
        logger.info("%s: compressed-tensors W8A8 checkpoint: int8 weights and dynamic per-token int8 activations "
                    "(torch._int_mm on the CPU in bfloat16; elsewhere the weights run dense on their int8 values, "
                    "the activations quantized the same way)", p.name)
    elif isinstance(scheme, Int8WeightScheme):
        logger.warning("%s: compressed-tensors %s checkpoint served weight-only (int8 weights on the CPU in "
                       "bfloat16: _weight_int8pack_mm for small batches; otherwise dequantized at load)%s", p.name,
                       scheme.format,
                       f"; its {scheme.activations} activation quantization is not applied"
                       if scheme.activations else "")
    if not any(p.glob("*.safetensors")):
        raise ModelLoadError(f"{path}: no *.safetensors weights")
    tok = None
    if with_tokenizer:
        tok = load_hf_tokenizer(tokenizer_path or str(p))
    if tok is not None and tok.eos_token_id is not None and tok.eos_token_id not in cfg.eos_token_ids:
        cfg.eos_token_ids = cfg.eos_token_ids + (int(tok.eos_token_id),)
    return Checkpoint(config=cfg, weights=lambda shard_for=None, int4=False: iter_weights(p, shard_for, int4, scheme),
                      tokenizer=tok, name=p.name, path=str(p))
