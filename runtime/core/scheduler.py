"""Continuous-batching scheduler (vLLM V1 style: one token budget per step).

Each step, running requests are served first (in arrival order), then waiting ones,
until ``max_num_batched_tokens`` is spent or ``max_num_seqs`` sequences run. Every
request just advances ``num_computed_tokens``, so a decode (1 token), a prefill chunk
(up to the remaining budget), a prefix-cache hit (skips whole blocks) and a recompute
after preemption are the same operation. When blocks run out, the lowest-priority
running request (latest arrival) is preempted: its blocks are freed and it goes back
to the front of the waiting queue to be recomputed later (Kwon et al., SOSP 2023, §4.5
"recomputation"). The waiting queue stays in arrival order (a preempted request goes
back ahead of every newer one). With prefix caching, a waiting request whose next prompt
blocks a running prefill is computing is held back until they are cached instead of
computing them again (:data:`DEFER_SHARED_FRACTION`); it keeps its seat in
``max_num_seqs``, and newer requests may take the step's token budget meanwhile. Pure
bookkeeping: no tensors.
"""

from __future__ import annotations

import bisect
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Optional

from ..config import SchedulerConfig
from .kv_cache_manager import KVCacheManager
from .request import Request, RequestStatus

logger = logging.getLogger("argosy.engine")

#: A warning on the first preemption and on every 50th after it (vLLM V0's cadence); the
#: running total is ``vllm:num_preemptions_total``.
PREEMPTION_LOG_EVERY = 50


#: A waiting request whose next prompt blocks are being computed by a running prefill
#: (same block hashes: a burst of requests sharing a system prompt that is not cached yet)
#: waits until they are cached, rather than computing them a second time, when those
#: blocks make up at least this fraction of what it would compute now. A short shared
#: preamble (a chat template's system line) in front of a long distinct prompt does not
#: delay it. The idea of SGLang's in-batch prefix caching check; vLLM computes both.
DEFER_SHARED_FRACTION = 0.5


@dataclass
class SchedulerOutput:
    """What to compute this step.

    Attributes:
        scheduled: ``(request, num_new_tokens)`` in scheduling order.
        num_scheduled_tokens: sum of ``num_new_tokens`` (tokens).
        preempted: requests preempted while building this step.
    """

    scheduled: list[tuple[Request, int]] = field(default_factory=list)
    num_scheduled_tokens: int = 0
    preempted: list[Request] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """Decides each step's batch.

    Args:
        config: token budget, sequence limit, model length, chunked prefill.
        kv_cache: the block manager (shared with nobody else).
    """

    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager):
        self.config = config
        self.kv = kv_cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._running_keys: list[tuple[float, int]] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self._seq = 0
        self._order: dict[str, int] = {}

    # --------------------------------------------------------------- intake
    def add_request(self, req: Request) -> None:
        """Queue a request (priority = arrival order)."""
        self._seq += 1
        self._order[req.request_id] = self._seq
        self.requests[req.request_id] = req
        self._insert_waiting(req)

    def _insert_waiting(self, req: Request) -> None:
        """Put ``req`` in the waiting queue at its arrival-order place: the queue stays
        ordered by arrival (a preempted request goes back ahead of every newer one, and
        behind an older one that is still waiting, e.g. held back by the shared-prefix
        rule)."""
        key = self._key(req)
        if not self.waiting or self._key(self.waiting[-1]) <= key:
            self.waiting.append(req)
        elif key <= self._key(self.waiting[0]):
            self.waiting.appendleft(req)
        else:
            items = list(self.waiting)
            keys = [self._key(r) for r in items]
            items.insert(bisect.bisect_right(keys, key), req)
            self.waiting = deque(items)

    def _key(self, req: Request) -> tuple[float, int]:
        return (req.arrival_time, self._order[req.request_id])

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    # -------------------------------------------------------------- schedule
    def schedule(self) -> SchedulerOutput:
        """Build one step's batch. See the module docstring for the policy."""
        cfg = self.config
        out = SchedulerOutput()
        budget = cfg.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if n <= 0:  # defensive: nothing to compute (should not happen)
                i += 1
                continue
            while not self.kv.allocate_slots(req.request_id, req.all_token_ids, req.num_computed_tokens, n):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:
                break
            out.scheduled.append((req, n))
            budget -= n
            i += 1

        if not out.preempted:
            # blocks that running prefills are computing (this step or in later chunks)
            in_flight = self._in_flight_blocks() if self.kv.enable_caching and self.waiting else set()
            w = 0  # requests held back so far: they keep their seats (max_num_seqs)
            while w < len(self.waiting) and budget > 0 and len(self.running) + w < cfg.max_num_seqs:
                req = self.waiting[w]
                hits, num_hit = [], 0
                lookup = req.num_computed_tokens == 0 and req.sampling_params.prompt_logprobs is None
                if lookup:
                    # (prompt_logprobs needs logits at every prompt position: no cache reads)
                    hits, num_hit = self.kv.get_computed_blocks(req.request_id, req.all_token_ids)
                n = req.num_tokens - num_hit - req.num_computed_tokens
                if lookup and in_flight and DEFER_SHARED_FRACTION * n <= self.kv.num_prefix_tokens_in(
                        req.request_id, req.all_token_ids, num_hit, in_flight):
                    w += 1  # wait for those blocks to be cached instead of computing them twice
                    continue
                if n > budget and not cfg.enable_chunked_prefill:
                    break
                n = min(n, budget)
                if not self.kv.allocate_slots(req.request_id, req.all_token_ids, req.num_computed_tokens, n, hits):
                    break  # looked up again next step; counted only once it is scheduled
                if req.num_computed_tokens == 0:
                    self.kv.record_prefix_lookup(req.num_tokens, num_hit)
                del self.waiting[w]
                if req.status is RequestStatus.WAITING:
                    req.num_cached_tokens = num_hit
                req.num_computed_tokens += num_hit
                req.status = RequestStatus.RUNNING
                key = self._key(req)
                pos = bisect.bisect_right(self._running_keys, key)
                self._running_keys.insert(pos, key)
                self.running.insert(pos, req)
                out.scheduled.append((req, n))
                budget -= n
                if self.kv.enable_caching:
                    in_flight.update(self._prefill_blocks(req, req.num_computed_tokens))
        out.num_scheduled_tokens = cfg.max_num_batched_tokens - budget
        return out

    def _prefill_blocks(self, req: Request, start: int) -> list:
        """Hashes of the prompt blocks ``req`` has still to compute from token ``start``."""
        return self.kv.prompt_block_hashes(req.request_id, req.all_token_ids, start, req.num_prompt_tokens)

    def _in_flight_blocks(self) -> set:
        """Hashes of the prompt blocks that running requests still in prefill will compute."""
        out: set = set()
        for req in self.running:
            if req.num_computed_tokens < req.num_prompt_tokens:
                out.update(self._prefill_blocks(req, req.num_computed_tokens))
        return out

    def _preempt(self, req: Request) -> None:
        self._remove_running(req)
        self.kv.free(req.request_id)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        if self.num_preemptions % PREEMPTION_LOG_EVERY == 1:
            logger.warning(
                "Request %s was preempted (recompute): the KV cache has no room for every running request. This "
                "slows requests down; give the cache more memory (--kv-cache-memory, --gpu-memory-utilization) or "
                "admit fewer sequences (--max-num-seqs). Preemptions so far: %d",
                req.request_id, self.num_preemptions)
        self._insert_waiting(req)

    def _remove_running(self, req: Request) -> None:
        pos = bisect.bisect_left(self._running_keys, self._key(req))
        if pos < len(self.running) and self.running[pos] is req:
            del self.running[pos]
            del self._running_keys[pos]

    # ---------------------------------------------------------------- update
    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Account a finished step.

        Args:
            out: the step's schedule.
            sampled: request id -> sampled token, for requests that reached the end of
                their known tokens this step.
        Returns:
            Requests that received a new token this step (finished ones have a
            finished status and no blocks).
        """
        got_token = []
        for req, n in out.scheduled:
            if req.status is not RequestStatus.RUNNING:
                continue
            req.num_computed_tokens += n
            # the step wrote these tokens' KV: their full blocks become hit-able now
            self.kv.cache_blocks(req.request_id, req.all_token_ids, req.num_computed_tokens)
            tok = sampled.get(req.request_id)
            if tok is None:
                continue
            req.append_output_token(tok)
            got_token.append(req)
            status = self._check_stop(req, tok)
            if status is not None:
                self.finish_request(req.request_id, status)
        return got_token

    def _check_stop(self, req: Request, tok: int) -> Optional[RequestStatus]:
        sp = req.sampling_params
        if req.num_output_tokens >= sp.min_tokens:
            if not sp.ignore_eos and tok in req.eos_token_ids:
                req.stop_reason = None
                return RequestStatus.FINISHED_STOPPED
            if tok in sp.stop_token_ids:
                req.stop_reason = tok
                return RequestStatus.FINISHED_STOPPED
        if req.num_output_tokens >= req.max_tokens or req.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def finish_request(self, request_id: str, status: RequestStatus) -> Optional[Request]:
        """Finish (stop, length, abort) a request wherever it is; frees its blocks.
        Unknown or already finished ids are ignored (returns None)."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        if req.status is RequestStatus.RUNNING:
            self._remove_running(req)
        else:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        req.status = status
        self.kv.free(request_id)
        self._order.pop(request_id, None)
        return req

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[Request]:
        return [r for r in (self.finish_request(i, status) for i in request_ids) if r is not None]
