"""Attention metadata for one engine step (vLLM's field names)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class AttentionMetadata:
    """Where one step's tokens sit in the paged KV cache.

    The step's sequences are ordered decodes first (``query_len == 1``), then prefill
    chunks. Token ``t`` of the flattened step belongs to sequence ``s`` when
    ``query_start_loc[s] <= t < query_start_loc[s+1]``.

    Attributes:
        slot_mapping: ``[num_tokens] int64``: cache slot (``block_id * block_size + offset``)
            where each new token's K/V is written; -1 marks padding (skipped).
        block_tables: ``[num_seqs, max_blocks_per_seq] int32``: physical block ids per
            sequence, padded with 0 past the sequence's blocks.
        seq_lens: ``[num_seqs] int32``: context length incl. this step's new tokens.
        query_start_loc: ``[num_seqs + 1] int32``: prefix sums of query lengths.
        max_query_len: longest query in the step (tokens).
        max_seq_len: longest context in the step (tokens).
        num_decodes: number of leading sequences with exactly one new token.
        seq_lens_cpu / query_lens_cpu: the same lengths as Python lists, so CPU-side
            code never syncs with the device to read them.
        has_padding: whether ``slot_mapping`` contains -1 entries.
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    max_query_len: int
    max_seq_len: int
    num_decodes: int
    seq_lens_cpu: list[int]
    query_lens_cpu: list[int]
    has_padding: bool = False
    _decode_groups: Optional[list] = field(default=None, init=False, repr=False)
    _prefix_groups: Optional[tuple] = field(default=None, init=False, repr=False)
    _row_starts: Optional[list[int]] = field(default=None, init=False, repr=False)
    #: derived tensors a backend builds once per step and reuses in every layer (keyed by
    #: the backend; e.g. cascade attention's row indices and masks)
    step_cache: dict = field(default_factory=dict, init=False, repr=False)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def row_starts(self) -> list[int]:
        """``query_start_loc`` on the host: sequence ``s``'s query rows are
        ``[row_starts[s], row_starts[s + 1])`` (``num_seqs + 1`` entries, computed once)."""
        if self._row_starts is None:
            self._row_starts = list(itertools.accumulate(self.query_lens_cpu, initial=0))
        return self._row_starts

    def decode_groups(self, max_groups: int = 4, ratio: float = 1.25) -> list[tuple[Optional[torch.Tensor], list[int]]]:
        """Split the decode sequences into groups of similar context length.

        Backends that gather each group's context into a padded dense tensor (the torch
        path) then copy and read about ``sum(seq_lens)`` tokens instead of
        ``num_decodes * max_seq_len``. Computed once per step and cached.

        Returns:
            ``[(index_tensor or None, member_indices)]``; ``None`` means "all decodes,
            in order" (one group, no reordering).
        """
        if self._decode_groups is None:
            nd = self.num_decodes
            lens = self.seq_lens_cpu[:nd]
            if nd < 8 or max(lens) <= ratio * min(lens):
                groups = [(None, list(range(nd)))]
            else:
                order = sorted(range(nd), key=lens.__getitem__)
                size = -(-nd // max_groups)
                groups = []
                for i in range(0, nd, size):
                    members = order[i : i + size]
                    groups.append((torch.tensor(members, dtype=torch.int64, device=self.seq_lens.device), members))
            self._decode_groups = groups
        return self._decode_groups


    def shared_prefix_groups(self, block_size: int, min_tokens: int,
                             min_seqs: int = 2) -> list[tuple[list[int], int]]:
        """Groups of this step's prefill sequences (those after the decodes) whose block
        tables start with the same physical blocks (a prompt prefix they hit in the prefix
        cache), for cascade attention. Computed once per step (per arguments) and cached.
        Grouped by their first block, so sequences sharing a long prefix are not grouped
        when another one shares only its first block with them (a missed speed-up, never
        a wrong answer).

        A group's shared prefix is capped at the context every member has before its
        first query token, so each query sees all of it (no mask on that part).

        Args:
            block_size: tokens per KV block.
            min_tokens: shortest shared prefix worth a group (tokens).
            min_seqs: fewest members of a group.
        Returns:
            ``[(member sequence indices, shared blocks)]``, members in step order.
        """
        if self._prefix_groups is None or self._prefix_groups[0] != (block_size, min_tokens, min_seqs):
            by_first: dict[int, list[int]] = {}
            first = self.num_decodes
            if self.num_seqs - first >= min_seqs:
                heads = self.block_tables[first:, 0].tolist()
                for s, b in enumerate(heads, start=first):
                    if (self.seq_lens_cpu[s] - self.query_lens_cpu[s]) >= min_tokens:
                        by_first.setdefault(b, []).append(s)
            groups = []
            for members in by_first.values():
                if len(members) < min_seqs:
                    continue
                cap = min(self.seq_lens_cpu[s] - self.query_lens_cpu[s] for s in members) // block_size
                idx = torch.tensor(members, device=self.block_tables.device)
                bt = self.block_tables.index_select(0, idx)[:, :cap]
                same = (bt == bt[:1]).all(0)
                n = cap if bool(same.all()) else int(same.to(torch.int8).argmin())
                if n * block_size >= min_tokens:
                    groups.append((members, n))
            self._prefix_groups = ((block_size, min_tokens, min_seqs), groups)
        return self._prefix_groups[1]


@dataclass
class DecodeMetadata:
    """A decode-only step (one new token per sequence) described by tensors alone.

    Unlike :class:`AttentionMetadata` it carries no Python lists, so a step function that
    takes it can be traced once by ``torch.compile`` with the batch size and the block
    table width as symbolic sizes (:mod:`argosy.runtime.worker.cpu_compile`).

    Attributes:
        slot_mapping: ``[B] int64``: cache slot of each sequence's new token (no -1 padding).
        block_tables: ``[B, W] int32``: each sequence's physical blocks, padded with any
            valid block id past its own (never read: masked by ``seq_lens``).
        seq_lens: ``[B] int32``: context length incl. the new token (tokens).
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
