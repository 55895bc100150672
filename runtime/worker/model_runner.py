"""Model runner: owns the weights and the KV cache tensors, turns a schedule into tensors,
runs the forward pass and returns logits for the rows that sample."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from ..attention import AttentionMetadata, torch_paged
from ..config import CacheConfig, ModelConfig, DEFAULT_CPU_KV_CACHE_BYTES
from ..core.request import Request
from ..core.scheduler import SchedulerOutput
from ..models import LlamaForCausalLM

logger = logging.getLogger(__name__)


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype, tp_size: int = 1) -> int:
    """Bytes one block takes on one rank across all layers:
    ``2 * layers * block_size * (kv_heads / tp_size) * head_dim * itemsize``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * block_size * (cfg.num_key_value_heads // tp_size) * cfg.head_dim * itemsize


#: CUDA: bytes held back from the KV cache for allocator fragmentation, plus (unless
#: ``--enforce-eager``) for the decode CUDA graphs. Estimates, not yet measured on a GPU.
CUDA_FRAGMENTATION_RESERVE = 256 << 20
CUDA_GRAPH_RESERVE = 512 << 20


def num_kv_blocks(cfg: ModelConfig, cache: CacheConfig, dtype: torch.dtype, device: torch.device,
                  weight_bytes: int, tp_size: int = 1, profile=None, enforce_eager: bool = True) -> int:
    """How many KV blocks fit on this rank (each rank holds ``kv_heads / tp_size`` heads
    of every block, so all ranks get the same count on equal devices).

    CPU (or ``--kv-cache-memory``): that many bytes per rank (default 1 GiB). CUDA: run
    ``profile()`` (a forward at ``--max-num-batched-tokens``, returning its peak
    activation bytes), then give the KV cache
    :func:`~argosy.runtime.worker.cuda_graphs.kv_cache_budget` bytes:
    ``gpu_memory_utilization x total - weights - peak activations - non-torch memory -
    reserves``. ``--num-gpu-blocks-override`` wins over both.

    Raises:
        ValueError / RuntimeError: not even one block fits.
    """
    per_block = kv_bytes_per_block(cfg, cache.block_size, dtype, tp_size)
    if cache.num_blocks:
        return cache.num_blocks
    if device.type == "cuda" and cache.kv_cache_memory is None:
        from .cuda_graphs import kv_cache_budget

        peak = profile() if profile is not None else 0
        free, total = torch.cuda.mem_get_info(device)
        non_torch = max(0, (total - free) - torch.cuda.memory_reserved(device))
        reserve = CUDA_FRAGMENTATION_RESERVE + (0 if enforce_eager else CUDA_GRAPH_RESERVE)
        budget = kv_cache_budget(total, cache.gpu_memory_utilization, weight_bytes, peak, non_torch, reserve)
        logger.info("KV cache sizing on %s: %.2f GiB total x %.2f, weights %.2f GiB, peak activations %.2f GiB, "
                    "non-torch %.2f GiB, reserve %.2f GiB -> %.2f GiB for the KV cache", device, total / 2**30,
                    cache.gpu_memory_utilization, weight_bytes / 2**30, peak / 2**30, non_torch / 2**30,
                    reserve / 2**30, budget / 2**30)
        if budget < per_block:
            raise RuntimeError(f"the KV cache budget ({budget} bytes) is smaller than one block ({per_block} bytes)")
        return budget // per_block
    mem = cache.kv_cache_memory or DEFAULT_CPU_KV_CACHE_BYTES
    n = mem // per_block
    if n < 1:
        raise ValueError(f"--kv-cache-memory {mem} bytes is smaller than one KV block ({per_block} bytes)")
    return n


@dataclass
class StepPlan:
    """One step, as rank 0 sends it to every rank (plain lists: cheap to pickle).

    It carries only what changed: this step's input tokens and the block ids appended
    to each scheduled sequence's block table since the last step; every rank keeps the
    tables (:class:`ModelRunner` ``tables``) and rebuilds the same tensors from them.

    Attributes:
        req_ids: scheduled sequences in execution order (decodes first).
        num_computed: per sequence, tokens already in the KV cache (``num_computed_tokens``).
        num_new: per sequence, tokens computed this step.
        token_ids: the step's input token ids, flattened (``sum(num_new)`` of them).
        block_updates: ``(seq_index, replace, block_ids)``: append ``block_ids`` to that
            sequence's table, or replace the table (a new or resumed request).
        sample: indices of the sequences whose last new token needs logits.
        freed: request ids whose tables every rank drops (finished or preempted).
        all_logits: return logits for every token of the step, not only ``sample``'s
            (used by :meth:`LLMEngine.prompt_logits`).
        return_hidden: also keep the ``sample`` rows' final hidden states (embedding
            requests) in :attr:`ModelRunner.last_hidden`.
        prompt_logits: indices of sequences whose every new token needs logits
            (``prompt_logprobs``); reduced on rank 0, :data:`PROMPT_LOGITS_SLICE` rows at
            a time, into :attr:`ModelRunner.last_prompt_logprobs`.
        prompt_targets: for those sequences' rows (in order), the token whose
            log-probability each row gives (the next prompt token), -1 for none.
        prompt_topk: how many top alternatives to keep per row.
    """

    req_ids: list[str] = field(default_factory=list)
    num_computed: list[int] = field(default_factory=list)
    num_new: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    block_updates: list[tuple[int, bool, list[int]]] = field(default_factory=list)
    sample: list[int] = field(default_factory=list)
    freed: list[str] = field(default_factory=list)
    all_logits: bool = False
    return_hidden: bool = False
    prompt_logits: list[int] = field(default_factory=list)
    prompt_targets: list[int] = field(default_factory=list)
    prompt_topk: int = 0


class StepPlanner:
    """Rank 0's side: turns a :class:`SchedulerOutput` into a :class:`StepPlan`.

    It remembers which block-table list object (the KV manager's live list) and how many
    of its entries each rank has been sent, so only new entries travel; a request whose
    list changed identity was freed and re-allocated (preemption), and is re-sent whole.

    Args:
        block_table_fn: ``request_id -> list[int]``, the KV manager's live block table
            (a fresh empty list for a request that holds no blocks).
    """

    def __init__(self, block_table_fn: Callable[[str], list[int]]):
        self.block_table_fn = block_table_fn
        self._sent: dict[str, tuple[list[int], int]] = {}

    def plan(self, sched: SchedulerOutput) -> tuple[StepPlan, list[Request]]:
        """Returns ``(plan, sampling requests in plan.sample order)``; the plan also names the
        rows whose logits ``prompt_logprobs`` needs and whether embedding rows need hidden
        states."""
        order = [(r, n) for r, n in sched.scheduled if n == 1] + [(r, n) for r, n in sched.scheduled if n != 1]
        p = StepPlan()
        sample_reqs: list[Request] = []
        sent = self._sent
        for i, (req, n) in enumerate(order):
            rid = req.request_id
            c = req.num_computed_tokens
            p.req_ids.append(rid)
            p.num_computed.append(c)
            p.num_new.append(n)
            p.token_ids.extend(req.all_token_ids[c : c + n])
            table = self.block_table_fn(rid)
            known = sent.get(rid)
            # a new list object = freed and re-allocated; the freed scan below normally
            # catches that a step earlier (a preempted request never resumes in the step
            # that preempted it), this also covers a re-allocation within one step
            if known is None or known[0] is not table:
                p.block_updates.append((i, True, list(table)))
            elif len(table) > known[1]:
                p.block_updates.append((i, False, table[known[1] :]))
            sent[rid] = (table, len(table))
            if c + n == req.num_tokens:
                p.sample.append(i)
                sample_reqs.append(req)
                p.return_hidden |= req.pooling_params is not None
            k = req.sampling_params.prompt_logprobs
            if k is not None and c < req.num_prompt_tokens - 1:
                # row r of this chunk predicts prompt token c + r + 1
                prompt = req.prompt_token_ids
                p.prompt_logits.append(i)
                p.prompt_targets.extend(prompt[c + r + 1] if c + r + 1 < len(prompt) else -1 for r in range(n))
                p.prompt_topk = max(p.prompt_topk, k)
        scheduled = set(p.req_ids)
        for rid, (table, _) in list(sent.items()):
            if rid not in scheduled and self.block_table_fn(rid) is not table:
                p.freed.append(rid)
                del sent[rid]
        return p, sample_reqs


#: Rows of prompt-position logits computed at once for ``prompt_logprobs`` (memory:
#: this x vocabulary x 4 bytes, twice, instead of a whole prefill chunk's).
PROMPT_LOGITS_SLICE = 256


def _reduce_logprobs(logits: torch.Tensor, targets: torch.Tensor, k: int) -> tuple:
    """``logits [R, V] float32`` -> ``(logprob of targets [R], rank [R] (1 = most likely),
    top-k values [R, k], top-k ids [R, k])`` on CPU; rows whose target is -1 get 0 / 0."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    t = targets.to(lp.device).clamp(min=0)
    own = lp.gather(1, t[:, None])[:, 0]
    ranks = (lp > own[:, None]).sum(dim=1) + 1
    top = lp.topk(k, dim=-1) if k else None
    empty = torch.empty(len(t), 0)
    return (own.cpu(), ranks.cpu(), top.values.cpu() if k else empty,
            top.indices.cpu() if k else empty.long())


@dataclass
class StepInputs:
    """Tensors for one forward pass."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_indices: Optional[torch.Tensor]


class ModelRunner:
    """Runs the model for a :class:`StepPlan` (the same on every tensor-parallel rank).

    Args:
        model: loaded model (this rank's shard).
        num_blocks: KV blocks to allocate.
        block_size: tokens per block.
        device: compute device.
        kv_cache_dtype: the cache's element type (None: the model dtype; FP8 halves its
            bytes: ``[2, num_blocks, block_size, kv_heads, head_dim]`` per layer).
    """

    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int, device: torch.device,
                 kv_cache_dtype: Optional[torch.dtype] = None):
        cfg = model.cfg
        self.model = model
        self.device = device
        self.block_size = block_size
        self.num_blocks = num_blocks
        #: request id -> block table, mirrored from rank 0's KV manager through the plans.
        self.tables: dict[str, list[int]] = {}
        #: Decode-only steps replay CUDA graphs when set (see :meth:`enable_cuda_graphs`).
        self.graphs = None
        #: Decode-only steps run torch.compile-d graphs when set (see :meth:`enable_compiled_decode`).
        self.compiled = None
        shape = (2, num_blocks, block_size, model.num_kv_heads, cfg.head_dim)
        #: the KV cache's element type: the model dtype, or FP8 (``--kv-cache-dtype``; stored
        #: unscaled, widened to the model dtype where attention reads it)
        self.kv_cache_dtype = kv_cache_dtype or model.dtype
        self.kv_caches = [torch.zeros(shape, dtype=self.kv_cache_dtype, device=device)
                          for _ in range(cfg.num_hidden_layers)]
        #: decode rows read the paged cache in place through the C++ kernel (reduced
        #: precision on CPU; built here, at startup, rather than in the first step)
        self.decode_kernel = False
        if self.kv_caches:
            probe = torch.empty(1, cfg.num_attention_heads // model.tp.world_size, cfg.head_dim,
                                dtype=model.dtype, device=device)
            self.decode_kernel = torch_paged.use_decode_kernel(probe, self.kv_caches[0])
        if hasattr(model, "set_decode_kernel"):
            model.set_decode_kernel(self.decode_kernel)

    def enable_cuda_graphs(self, max_num_seqs: int, max_model_len: int, capture: bool = True) -> None:
        """Capture decode CUDA graphs over this runner's KV cache (``capture=False``: the same
        padded static-buffer path, run eagerly; used by tests on CPU)."""
        from .cuda_graphs import DecodeGraphRunner

        self.graphs = DecodeGraphRunner(self.model, self.kv_caches, max_num_seqs, max_model_len, self.block_size,
                                        self.device, capture=capture)

    def enable_compiled_decode(self, max_num_seqs: int, warmup: bool = True, cpp_wrapper: Optional[bool] = None) -> float:
        """Compile decode steps with ``torch.compile`` (CPU; see :mod:`.cpu_compile`) and,
        with ``warmup``, build every graph now. Call before any request runs. Returns the
        compile time in seconds. ``cpp_wrapper``: inductor's C++ wrapper or its Python one
        (None: ``ARGOSY_INDUCTOR_CPP_WRAPPER``, :func:`.cpu_compile.cpp_wrapper_setting`)."""
        from .cpu_compile import CompiledDecodeRunner

        self.compiled = CompiledDecodeRunner(self.model, self.kv_caches, max_num_seqs, self.decode_kernel,
                                             cpp_wrapper)
        return self.compiled.warmup() if warmup else 0.0

    def disable_compiled(self) -> None:
        """Back to eager steps (after a failed compile)."""
        self.compiled = None
        self.model.layer_stages = None

    def apply(self, plan: StepPlan) -> list[list[int]]:
        """Update the mirrored block tables; returns the step's tables in plan order.

        Raises:
            RuntimeError: the plan refers to a request this rank has no table for
                (the ranks' views diverged: a bug, never silently computed).
        """
        tables = self.tables
        for rid in plan.freed:
            tables.pop(rid, None)
        for i, replace, blocks in plan.block_updates:
            rid = plan.req_ids[i]
            if replace:
                tables[rid] = list(blocks)
            else:
                tables[rid].extend(blocks)
        try:
            return [tables[rid] for rid in plan.req_ids]
        except KeyError as e:
            raise RuntimeError(f"step plan names request {e} with no block table on this rank") from None

    def prepare(self, plan: StepPlan) -> StepInputs:
        """Flatten the step's tokens and build attention metadata."""
        step_tables = self.apply(plan)
        bs = self.block_size
        pos_parts, slot_parts = [], []
        seq_lens = []
        query_lens = plan.num_new
        for table, c, n in zip(step_tables, plan.num_computed, query_lens):
            if n == 1:
                pos_parts.append(np.array([c]))
                slot_parts.append(np.array([table[c // bs] * bs + c % bs]))
            else:
                pos = np.arange(c, c + n)
                pos_parts.append(pos)
                slot_parts.append(np.asarray(table, dtype=np.int64)[pos // bs] * bs + pos % bs)
            seq_lens.append(c + n)
        max_blocks = max(len(t) for t in step_tables)
        bt = np.zeros((len(step_tables), max_blocks), dtype=np.int32)
        for i, t in enumerate(step_tables):
            bt[i, : len(t)] = t
        qsl = np.zeros(len(query_lens) + 1, dtype=np.int32)
        np.cumsum(query_lens, out=qsl[1:])
        num_decodes = 0
        while num_decodes < len(query_lens) and query_lens[num_decodes] == 1:
            num_decodes += 1
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(np.concatenate(slot_parts).astype(np.int64)).to(dev),
            block_tables=torch.from_numpy(bt).to(dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            query_start_loc=torch.from_numpy(qsl).to(dev),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            num_decodes=num_decodes,
            seq_lens_cpu=seq_lens,
            query_lens_cpu=list(query_lens),
        )
        logits_idx = None if plan.all_logits else torch.from_numpy(qsl[1:][plan.sample].astype(np.int64) - 1).to(dev)
        return StepInputs(
            input_ids=torch.tensor(plan.token_ids, dtype=torch.int64, device=dev),
            positions=torch.from_numpy(np.concatenate(pos_parts).astype(np.int64)).to(dev),
            meta=meta,
            logits_indices=logits_idx,
        )

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> Optional[torch.Tensor]:
        """Run one step.

        Returns:
            On rank 0: logits ``[len(plan.sample), vocab] float32`` (every token's row
            with ``plan.all_logits``); None on the other ranks.
        """
        if not plan.req_ids:  # only frees to mirror
            self.apply(plan)
            return None
        inp = self.prepare(plan)
        if self.graphs is not None and self.graphs.can_run(inp.meta):
            hidden = self.graphs.run(inp.input_ids, inp.positions, inp.meta)
        elif self.compiled is not None and self.compiled.can_run(inp.meta):
            hidden = self.compiled.run(inp.input_ids, inp.positions, inp.meta)
        else:
            hidden = self.model(inp.input_ids, inp.positions, self.kv_caches, inp.meta)
        #: with ``plan.prompt_logits``, on rank 0, per row of those sequences (plan order):
        #: ``(logprob [R], rank [R], top values [R, k], top ids [R, k])`` on CPU
        self.last_prompt_logprobs = None
        if plan.prompt_logits:
            starts = np.concatenate(([0], np.cumsum(plan.num_new)))
            rows = torch.from_numpy(np.concatenate([np.arange(starts[i], starts[i + 1]) for i in plan.prompt_logits]))
            targets = torch.tensor(plan.prompt_targets, dtype=torch.int64)
            parts = []
            for lo in range(0, len(rows), PROMPT_LOGITS_SLICE):  # bounded memory: slice x vocab
                logits = self.model.compute_logits(hidden[rows[lo : lo + PROMPT_LOGITS_SLICE].to(hidden.device)])
                if logits is not None:
                    parts.append(_reduce_logprobs(logits, targets[lo : lo + PROMPT_LOGITS_SLICE], plan.prompt_topk))
            if parts:
                self.last_prompt_logprobs = tuple(torch.cat(x) for x in zip(*parts))
        if inp.logits_indices is not None:
            if not plan.sample:
                return hidden.new_empty((0, self.model.cfg.vocab_size), dtype=torch.float32)
            hidden = hidden[inp.logits_indices]
        #: ``[len(plan.sample), hidden_size] float32`` on CPU when ``plan.return_hidden``, else None
        self.last_hidden = hidden.float().cpu() if plan.return_hidden else None
        return self.model.compute_logits(hidden)
