"""Model runner: owns the weights and the KV cache tensors, turns a schedule into tensors,
runs the forward pass and returns logits for the rows that sample."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from ..attention import AttentionMetadata
from ..config import CacheConfig, ModelConfig, DEFAULT_CPU_KV_CACHE_BYTES
from ..core.request import Request
from ..core.scheduler import SchedulerOutput
from ..models import LlamaForCausalLM

logger = logging.getLogger(__name__)


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers: ``2 * layers * block_size * kv_heads * head_dim * itemsize``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * itemsize


def num_kv_blocks(cfg: ModelConfig, cache: CacheConfig, dtype: torch.dtype, device: torch.device,
                  weight_bytes: int) -> int:
    """How many KV blocks fit.

    CPU: ``--kv-cache-memory`` bytes (default 1 GiB). CUDA: ``gpu_memory_utilization`` x
    total memory minus what is already allocated (weights) minus an activation reserve.
    ``--num-gpu-blocks-override`` wins over both.
    """
    per_block = kv_bytes_per_block(cfg, cache.block_size, dtype)
    if cache.num_blocks:
        return cache.num_blocks
    if device.type == "cuda" and cache.kv_cache_memory is None:
        free, total = torch.cuda.mem_get_info(device)
        used = total - free
        budget = int(total * cache.gpu_memory_utilization) - used - (512 << 20)
        if budget < per_block:
            raise RuntimeError(
                f"no GPU memory left for the KV cache: {total / 2**30:.1f} GiB total x {cache.gpu_memory_utilization} "
                f"utilization < {used / 2**30:.1f} GiB in use; raise --gpu-memory-utilization"
            )
        return budget // per_block
    mem = cache.kv_cache_memory or DEFAULT_CPU_KV_CACHE_BYTES
    n = mem // per_block
    if n < 1:
        raise ValueError(f"--kv-cache-memory {mem} bytes is smaller than one KV block ({per_block} bytes)")
    return n


@dataclass
class StepInputs:
    """Tensors for one forward pass plus the row -> request map for sampling."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_indices: torch.Tensor
    sample_reqs: list[Request]


class ModelRunner:
    """Runs the model for a :class:`SchedulerOutput`.

    Args:
        model: loaded model.
        num_blocks: KV blocks to allocate.
        block_size: tokens per block.
        device: compute device.
        block_table_fn: ``request_id -> list[int]`` (the KV manager's block table).
    """

    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int, device: torch.device, block_table_fn):
        cfg = model.cfg
        self.model = model
        self.device = device
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.block_table_fn = block_table_fn
        shape = (2, num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=model.dtype, device=device) for _ in range(cfg.num_hidden_layers)]

    def prepare(self, sched: SchedulerOutput) -> StepInputs:
        """Flatten the step's tokens (decodes first) and build attention metadata."""
        decodes = [(r, n) for r, n in sched.scheduled if n == 1]
        prefills = [(r, n) for r, n in sched.scheduled if n != 1]
        order = decodes + prefills
        bs = self.block_size
        ids: list[int] = []
        pos_parts, slot_parts = [], []
        seq_lens, query_lens, tables = [], [], []
        logits_idx, sample_reqs = [], []
        cursor = 0
        for req, n in order:
            c = req.num_computed_tokens
            table = self.block_table_fn(req.request_id)
            ids.extend(req.all_token_ids[c : c + n])
            if n == 1:
                pos_parts.append(np.array([c]))
                slot_parts.append(np.array([table[c // bs] * bs + c % bs]))
            else:
                p = np.arange(c, c + n)
                pos_parts.append(p)
                slot_parts.append(np.asarray(table, dtype=np.int64)[p // bs] * bs + p % bs)
            seq_lens.append(c + n)
            query_lens.append(n)
            tables.append(table)
            cursor += n
            if c + n == req.num_tokens:
                logits_idx.append(cursor - 1)
                sample_reqs.append(req)
        max_blocks = max(len(t) for t in tables)
        bt = np.zeros((len(tables), max_blocks), dtype=np.int32)
        for i, t in enumerate(tables):
            bt[i, : len(t)] = t
        qsl = np.zeros(len(order) + 1, dtype=np.int32)
        np.cumsum(query_lens, out=qsl[1:])
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(np.concatenate(slot_parts).astype(np.int64)).to(dev),
            block_tables=torch.from_numpy(bt).to(dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            query_start_loc=torch.from_numpy(qsl).to(dev),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            num_decodes=len(decodes),
            seq_lens_cpu=seq_lens,
            query_lens_cpu=query_lens,
        )
        return StepInputs(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=dev),
            positions=torch.from_numpy(np.concatenate(pos_parts).astype(np.int64)).to(dev),
            meta=meta,
            logits_indices=torch.tensor(logits_idx, dtype=torch.int64, device=dev),
            sample_reqs=sample_reqs,
        )

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> tuple[torch.Tensor, list[Request]]:
        """Run one step. Returns ``(logits [num_sampling_rows, vocab] float32, requests)``."""
        inp = self.prepare(sched)
        hidden = self.model(inp.input_ids, inp.positions, self.kv_caches, inp.meta)
        if not inp.sample_reqs:
            return hidden.new_empty((0, self.model.cfg.vocab_size), dtype=torch.float32), []
        return self.model.compute_logits(hidden[inp.logits_indices]), inp.sample_reqs
