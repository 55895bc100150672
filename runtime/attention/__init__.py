"""Paged attention: metadata shared by all backends, and backend selection.

:func:`store_kv` and :func:`paged_attention` dispatch per call on the tensors' device:
CUDA tensors go to the Triton kernels (:mod:`.triton_kernels`), everything else to the
pure-torch path (:mod:`.torch_paged`, also the kernels' oracle). Both take the same
:class:`AttentionMetadata`.

``ARGOSY_ATTENTION_BACKEND`` overrides the choice: ``torch`` forces the torch path
everywhere; ``triton`` forces the Triton kernels (on CPU tensors this needs
``TRITON_INTERPRET=1`` set before the kernels are first imported, and is only for
testing); ``auto`` (default) is the device rule above. Triton is imported only when a
Triton kernel is first needed, so the CPU path never imports it.
"""

from __future__ import annotations

import os

import torch

from . import torch_paged
from .metadata import AttentionMetadata, DecodeMetadata

__all__ = ["AttentionMetadata", "DecodeMetadata", "paged_attention", "store_kv", "backend_for", "resolve_backend"]

_ENV = "ARGOSY_ATTENTION_BACKEND"
_triton_mod = None


def _triton():
    """The Triton kernels module, imported on first use."""
    global _triton_mod
    if _triton_mod is None:
        from . import triton_kernels

        _triton_mod = triton_kernels
    return _triton_mod


def backend_for(t: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"``: the backend used for tensors like ``t``.

    Raises:
        ValueError: ``ARGOSY_ATTENTION_BACKEND`` has an unknown value.
    """
    choice = os.environ.get(_ENV, "auto").strip().lower() or "auto"
    if choice == "auto":
        return "triton" if t.is_cuda else "torch"
    if choice in ("torch", "triton"):
        return choice
    raise ValueError(f"{_ENV} must be auto, torch or triton, not {choice!r}")


def store_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> None:
    """Write the step's new keys/values into the paged cache (see ``torch_paged.store_kv``).

    Args:
        key, value: ``[num_tokens, num_kv_heads, head_dim]``, the model dtype (an FP8 cache
            converts them, ``torch_paged.to_cache_dtype``).
        kv_cache: ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (modified in place).
        meta: ``slot_mapping`` gives each token's flat slot; -1 entries are skipped.
    """
    if backend_for(kv_cache) == "triton":
        _triton().store_kv(key, value, kv_cache, meta)
    else:
        torch_paged.store_kv(key, value, kv_cache, meta)


def paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Attention of the step's queries over each sequence's paged context.

    See ``torch_paged.paged_attention`` for the semantics (causal within the new tokens,
    full over cached ones, GQA ``h -> h // (H / H_kv)``).

    Args:
        query: ``[num_tokens, num_heads, head_dim]``.
        kv_cache: ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` holding this
            step's keys/values.
        meta: step metadata.
        scale: softmax scale.
    Returns:
        ``[num_tokens, num_heads, head_dim]`` in the query's dtype.
    """
    if backend_for(query) == "triton":
        return _triton().paged_attention(query, kv_cache, meta, scale)
    return torch_paged.paged_attention(query, kv_cache, meta, scale)


def resolve_backend(device: torch.device):
    """The ``(store_kv, paged_attention)`` pair for ``device``, chosen once (the model
    resolves it at construction so the per-layer calls skip the dispatch).

    Raises:
        ValueError: ``ARGOSY_ATTENTION_BACKEND`` has an unknown value.
    """
    probe = torch.empty(0, device=device)
    if backend_for(probe) == "triton":
        mod = _triton()
        return mod.store_kv, mod.paged_attention
    return torch_paged.store_kv, torch_paged.paged_attention
