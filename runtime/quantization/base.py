"""What every checkpoint quantization format shares."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


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
