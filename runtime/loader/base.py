"""Types shared by the loaders."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch

from ..config import ModelConfig
from .errors import ModelLoadError  # noqa: F401  (re-exported)

#: Architectures the Llama implementation serves (HF ``architectures`` / GGUF ``general.architecture``).
SUPPORTED_HF_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
SUPPORTED_MODEL_TYPES = ("llama", "mistral")


#: ``hf_name -> (dim, start, stop) | None``: the slice of each tensor to load.
ShardFn = Callable[[str], Optional[tuple[int, int, int]]]


def narrow(t: torch.Tensor, shard: Optional[tuple[int, int, int]]) -> torch.Tensor:
    """``t`` restricted to ``shard`` (a contiguous copy), or ``t`` when ``shard`` is None."""
    if shard is None:
        return t
    dim, start, stop = shard
    return t.narrow(dim, start, stop - start).contiguous()


@dataclass
class Checkpoint:
    """A loadable model.

    Attributes:
        config: architecture hyper-parameters.
        weights: ``weights(shard_for=None, int4=False)`` returns an iterator of
            ``(hf_name, tensor)``; with ``int4`` (bfloat16 on CPU, float16/bfloat16 on
            CUDA: :attr:`LlamaForCausalLM.uses_int4`), quantized weights come in their own
            form instead: 4-bit GGUF, compressed-tensors W4A16, AWQ and GPTQ linear
            weights as :class:`~argosy.runtime.quantization.int4.Int4Weight`, 8-bit GPTQ
            ones as ``q8_0.Q8Weight``,
            GGUF Q8_0/Q5_0/Q5_1/Q5_K/Q6_K linear weights, embedding and LM head as
            ``q8_0.Q8Weight``, compressed-tensors int8 weights as ``int8.Int8Weight``;
            tensors are float32 (dequantized GGUF) or the checkpoint's dtype (safetensors),
            on CPU, in Hugging Face layout (``[out_features, in_features]`` for linear
            weights). ``shard_for(hf_name)`` may return ``(dim, start, stop)``: then only
            that slice of the tensor is yielded, and read from disk alone where the
            format allows (tensor-parallel loading).
        tokenizer: a ``transformers`` tokenizer (``PreTrainedTokenizerBase``) with
            ``chat_template`` set when the checkpoint ships one.
        name: default served model name.
        path: local file or directory the checkpoint was read from.
    """

    config: ModelConfig
    weights: Callable[..., Iterator[tuple[str, torch.Tensor]]]
    tokenizer: Any
    name: str
    path: str
