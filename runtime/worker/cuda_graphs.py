"""CUDA graphs for decode-only steps, and KV cache sizing by profiling (CUDA).

A decode step runs hundreds of small kernels whose launch cost dominates at small
batch; replaying a captured CUDA graph launches them all at once (the technique vLLM
uses; NVIDIA, "CUDA Graphs", CUDA C++ Programming Guide §3.2.8.10). A graph replays fixed
shapes and fixed buffer addresses, so:

- one graph per padded batch size (:func:`capture_sizes`: 1, 2, 4, 8, then every 8 up
  to ``--max-num-seqs``); a step with ``n`` decodes runs the smallest size ``>= n``;
- every input lives in a static buffer the graph was captured with; a step copies its
  tensors in. Padding rows get slot ``-1`` (no KV write), context length 1 and token 0,
  and their outputs are dropped;
- the attention kernels' launch grid is fixed at capture with ``max_seq_len =
  max_model_len``; they bound their loops by each row's ``seq_lens`` entry, so shorter
  contexts cost little more than their own length;
- block tables are copied into a ``[max_batch, ceil(max_model_len / block_size)]``
  buffer; columns past a row's blocks keep stale but valid block ids that are never
  read.

Prefill and mixed steps, steps with more decodes than the largest size, and
``--enforce-eager`` run eagerly. Tensor-parallel engines run eagerly too (collectives
inside graphs are not enabled yet).
"""

from __future__ import annotations

import logging
import time
from typing import Optional

import torch

from ..attention import AttentionMetadata

logger = logging.getLogger("argosy.cuda_graphs")


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Padded batch sizes to capture: ``1, 2, 4, 8, 16, 24, ...`` up to and including
    ``max_num_seqs`` (which is always the last entry)."""
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs] + list(range(8, max_num_seqs, 8))
    return sizes + [max_num_seqs]


class DecodeGraphRunner:
    """Runs decode-only steps through per-batch-size CUDA graphs.

    Args:
        model: the model (one rank, ``tp.world_size == 1``).
        kv_caches: the engine's KV cache tensors (captured by address).
        max_num_seqs: largest batch to capture.
        max_model_len: longest context in tokens (sizes block tables and attention grids).
        block_size: tokens per KV block.
        device: where the buffers live.
        capture: False runs the same static-buffer path eagerly (for tests on CPU).
    """

    def __init__(self, model, kv_caches: list[torch.Tensor], max_num_seqs: int, max_model_len: int,
                 block_size: int, device: torch.device, capture: bool = True):
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = capture_sizes(max_num_seqs)
        self.max_model_len = max_model_len
        self.capture = capture
        b, w = self.sizes[-1], -(-max_model_len // block_size)
        self.max_blocks = w
        self.input_ids = torch.zeros(b, dtype=torch.int64, device=device)
        self.positions = torch.zeros(b, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((b,), -1, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(b, w, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(b, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(b + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.graph_bytes = 0
        if capture:
            self._capture_all()

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:b], block_tables=self.block_tables[:b], seq_lens=self.seq_lens[:b],
            query_start_loc=self.query_start_loc[: b + 1], max_query_len=1, max_seq_len=self.max_model_len,
            num_decodes=b, seq_lens_cpu=[self.max_model_len] * b, query_lens_cpu=[1] * b, has_padding=True,
        )

    def _forward(self, b: int) -> torch.Tensor:
        return self.model(self.input_ids[:b], self.positions[:b], self.kv_caches, self._meta(b))

    @torch.inference_mode()
    def _capture_all(self) -> None:
        """Capture largest first so the smaller graphs reuse its memory pool."""
        t0 = time.monotonic()
        before = torch.cuda.memory_allocated()
        pool = None
        for b in reversed(self.sizes):
            self._forward(b)  # warm-up: Triton compiles and autotunes outside the capture
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                out = self._forward(b)
            pool = g.pool()
            self.graphs[b], self.outputs[b] = g, out
        torch.cuda.synchronize()
        self.graph_bytes = torch.cuda.memory_allocated() - before
        logger.info("captured %d CUDA graphs (batch sizes %s..%s) in %.1fs, %.0f MiB",
                    len(self.sizes), self.sizes[0], self.sizes[-1], time.monotonic() - t0, self.graph_bytes / 2**20)

    def bucket(self, num_seqs: int) -> Optional[int]:
        """The padded batch size for ``num_seqs`` decodes, or None above the largest."""
        for s in self.sizes:
            if s >= num_seqs:
                return s
        return None

    def can_run(self, meta: AttentionMetadata) -> bool:
        """True for a decode-only step that fits a captured size."""
        return (meta.max_query_len == 1 and meta.num_decodes == meta.num_seqs
                and self.bucket(meta.num_seqs) is not None and meta.block_tables.shape[1] <= self.max_blocks)

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Replay (or, without capture, run) the step padded to its bucket.

        Args:
            input_ids / positions: ``[n] int64``; meta: a decode-only step's metadata.
        Returns:
            Hidden states ``[n, hidden_size]`` (a view into the graph's output buffer,
            valid until the next call).
        """
        n = meta.num_seqs
        b = self.bucket(n)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.seq_lens[:n].copy_(meta.seq_lens)
        self.block_tables[:n, : meta.block_tables.shape[1]].copy_(meta.block_tables)
        if b > n:  # padding rows: no KV write, a one-token context, token 0 at position 0
            self.slot_mapping[n:b].fill_(-1)
            self.seq_lens[n:b].fill_(1)
            self.input_ids[n:b].zero_()
            self.positions[n:b].zero_()
        if self.capture:
            self.graphs[b].replay()
            return self.outputs[b][:n]
        return self._forward(b)[:n]


def kv_cache_budget(total: int, utilization: float, weights: int, peak_activations: int, non_torch: int,
                    reserve: int) -> int:
    """Bytes the KV cache may take on one GPU (vLLM's profiling rule).

    ``utilization x total - weights - peak_activations - non_torch - reserve``, where
    ``non_torch`` is memory in use outside PyTorch's allocator (CUDA context, NCCL) and
    ``reserve`` covers CUDA graphs and allocator fragmentation. All in bytes.

    Raises:
        RuntimeError: nothing left for the KV cache (the message lists the terms).
    """
    budget = int(total * utilization) - weights - peak_activations - non_torch - reserve
    if budget <= 0:
        gib = 2**30
        raise RuntimeError(
            f"no GPU memory left for the KV cache: {utilization} x {total / gib:.1f} GiB total - weights "
            f"{weights / gib:.2f} GiB - peak activations {peak_activations / gib:.2f} GiB - non-torch "
            f"{non_torch / gib:.2f} GiB - reserve {reserve / gib:.2f} GiB <= 0; raise --gpu-memory-utilization "
            "or lower --max-num-batched-tokens"
        )
    return budget


@torch.inference_mode()
def profile_peak_activations(model, num_tokens: int, max_model_len: int, block_size: int, device: torch.device) -> int:
    """Peak bytes a forward over ``num_tokens`` tokens allocates beyond what is already
    held (weights), measured with ``torch.cuda.max_memory_allocated``.

    The dummy step is prefill chunks of at most ``max_model_len`` tokens each, over a
    scratch KV cache just large enough for them (its size is subtracted). Run it before
    the real KV cache is allocated.
    """
    cfg = model.cfg
    seqs = [min(max_model_len, num_tokens - s) for s in range(0, num_tokens, max_model_len)]
    blocks_per = [-(-n // block_size) for n in seqs]
    nblk = sum(blocks_per)
    shape = (2, nblk, block_size, model.num_kv_heads, cfg.head_dim)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    caches = [torch.zeros(shape, dtype=model.dtype, device=device) for _ in range(cfg.num_hidden_layers)]
    scratch = torch.cuda.memory_allocated(device) - base
    tables = torch.zeros(len(seqs), max(blocks_per), dtype=torch.int32, device=device)
    start = 0
    for i, k in enumerate(blocks_per):
        tables[i, :k] = torch.arange(start, start + k, dtype=torch.int32)
        start += k
    positions = torch.cat([torch.arange(n) for n in seqs]).to(device)
    slots = torch.cat([tables[i, torch.arange(n) // block_size].long() * block_size + torch.arange(n, device=device) % block_size
                       for i, n in enumerate(seqs)])
    qsl = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(torch.tensor(seqs), 0)
    meta = AttentionMetadata(slot_mapping=slots, block_tables=tables, seq_lens=torch.tensor(seqs, dtype=torch.int32, device=device),
                             query_start_loc=qsl.to(device), max_query_len=max(seqs), max_seq_len=max(seqs), num_decodes=0,
                             seq_lens_cpu=seqs, query_lens_cpu=seqs)
    hidden = model(torch.zeros(num_tokens, dtype=torch.int64, device=device), positions, caches, meta)
    model.compute_logits(hidden[-len(seqs):])
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base - scratch
    del caches, hidden
    torch.cuda.empty_cache()
    return max(0, peak)
