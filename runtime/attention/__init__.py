"""Paged attention: metadata shared by all backends and the pure-torch backend."""

from .metadata import AttentionMetadata
from .torch_paged import paged_attention, store_kv

__all__ = ["AttentionMetadata", "paged_attention", "store_kv"]
