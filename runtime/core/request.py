"""Request state as the scheduler sees it."""

from __future__ import annotations

import enum
import time
from typing import Optional

import torch

from .sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR)


class Request:
    """One sequence being generated.

    ``num_computed_tokens`` counts the tokens whose K/V are in the cache; the tokens
    still to compute are ``all_token_ids[num_computed_tokens:]``. Chunked prefill, prefix
    cache hits and recompute after preemption all move this one counter.

    Attributes:
        request_id: unique id.
        prompt_token_ids: prompt tokens.
        output_token_ids: generated tokens so far.
        sampling_params: how to sample.
        arrival_time: ``time.monotonic()`` at submission (seconds); earlier = higher priority.
        generator: per-request ``torch.Generator`` when ``seed`` is set.
        grammar: the structured-output matcher when the request is constrained, else None.
    """

    __slots__ = (
        "request_id", "prompt_token_ids", "output_token_ids", "all_token_ids", "sampling_params",
        "arrival_time", "status", "num_computed_tokens", "num_cached_tokens", "generator",
        "max_tokens", "eos_token_ids", "first_scheduled_time", "first_token_time", "last_token_time",
        "num_preemptions", "stop_reason", "logprobs", "finish_reason_override", "grammar",
        "pooling_params", "embedding", "prompt_logprobs",
    )

    def __init__(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                 eos_token_ids: tuple[int, ...], max_tokens: int, arrival_time: Optional[float] = None):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prefix-cache hit on first scheduling (tokens)
        self.generator: Optional[torch.Generator] = None
        if sampling_params.seed is not None:
            self.generator = torch.Generator()
            self.generator.manual_seed(sampling_params.seed)
        self.max_tokens = max_tokens
        self.eos_token_ids = eos_token_ids
        self.first_scheduled_time: Optional[float] = None
        self.first_token_time: Optional[float] = None
        self.last_token_time: Optional[float] = None
        self.num_preemptions = 0
        self.stop_reason = None  # the stop string or token id that ended it
        self.logprobs: list = []
        self.finish_reason_override: Optional[str] = None
        #: the structured-output matcher (``GrammarState``) of a constrained request
        self.grammar = None
        #: an embedding request's ``PoolingParams``, and its vector once computed
        self.pooling_params = None
        self.embedding: Optional[list[float]] = None
        #: with ``prompt_logprobs``: per prompt token, None for the first, else
        #: ``(token_id, logprob, rank, [(top_id, top_logprob), ...])``
        self.prompt_logprobs: Optional[list] = None

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return (f"Request({self.request_id}, prompt={self.num_prompt_tokens}, out={self.num_output_tokens}, "
                f"computed={self.num_computed_tokens}, {self.status.value})")
