"""Fan-out and merge: a request with ``n`` choices (times its prompts, for completions)
becomes that many engine requests, run concurrently and folded back into one
:class:`Choice` each. Closing the merge aborts the unfinished engine requests (their KV
blocks freed)."""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional

from ..core.async_llm import AsyncLLM
from ..core.engine import RequestOutput
from ..core.sampling_params import SamplingParams
from .errors import ApiError


@dataclass
class Choice:
    """One engine request behind one response choice, and what it produced so far."""

    index: int
    prompt_index: int
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    prompt_text: Optional[str] = None
    text: str = ""
    num_tokens: int = 0
    logprobs: list = field(default_factory=list)
    finish_reason: Optional[str] = None
    stop_reason: object = None
    text_offset: int = 0  # legacy logprobs: characters emitted so far
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    prompt_logprobs: Optional[list] = None  # the engine's entries, once the prompt is done
    prompt_logprobs_sent: bool = False  # stream: already in a chunk
    echo_sent: bool = False  # stream, echo with logprobs: the prompt went out

    def update(self, out: RequestOutput) -> None:
        """Fold one engine output into this choice."""
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.text += out.new_text
        self.num_tokens = out.num_output_tokens
        self.num_cached_tokens = out.num_cached_tokens
        self.logprobs.extend(out.logprobs)
        if out.finished:
            self.finish_reason = out.finish_reason
            self.stop_reason = out.stop_reason


def fan_out(async_llm: AsyncLLM, request_id: str, prompts: list[list[int]], params: SamplingParams,
            prompt_texts: Optional[list[Optional[str]]] = None) -> list[Choice]:
    """One :class:`Choice` per prompt x ``params.n`` (choice index ``prompt * n + j``).

    Sub-request ``j`` of a seeded request uses ``seed + j`` so the choices differ but
    stay reproducible.

    Raises:
        ApiError(400): a prompt the engine would refuse (empty, too long, bad ids).
    """
    choices = []
    for p, ids in enumerate(prompts):
        for j in range(params.n):
            child = dataclasses.replace(params, n=1, seed=None if params.seed is None else params.seed + j)
            try:
                async_llm.check_request(ids, child)
            except ValueError as e:
                raise ApiError(400, str(e)) from None
            idx = p * params.n + j
            choices.append(Choice(idx, p, f"{request_id}-{idx}", ids, child,
                                  prompt_texts[p] if prompt_texts else None))
    return choices


async def generate_choices(async_llm: AsyncLLM, choices: list[Choice]) -> AsyncIterator[tuple[Choice, RequestOutput]]:
    """Run every choice's engine request concurrently; yield ``(choice, output)`` as they come.

    Closing the iterator (or cancelling its consumer) aborts the unfinished requests.

    Raises:
        EngineDeadError: the engine stopped.
        ValueError: the engine refused a request.
    """
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(ch: Choice) -> None:
        try:
            async for out in async_llm.generate(ch.request_id, ch.prompt_ids, ch.params):
                queue.put_nowait((ch, out))
        except Exception as e:  # delivered to the consumer; CancelledError propagates
            queue.put_nowait((ch, e))

    tasks = [asyncio.create_task(pump(ch)) for ch in choices]
    remaining = len(choices)
    try:
        while remaining:
            ch, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if item.finished:
                remaining -= 1
            yield ch, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def usage(choices: list[Choice]) -> dict:
    """OpenAI ``usage``: prompt tokens counted once per prompt, completion tokens summed, and
    ``prompt_tokens_details.cached_tokens``: the counted prompts' tokens served from the
    prefix cache (per prompt, its first choice's; further choices of ``n`` share it)."""
    first: dict[int, Choice] = {}
    for ch in sorted(choices, key=lambda c: c.index):
        first.setdefault(ch.prompt_index, ch)
    prompt = sum(len(ch.prompt_ids) for ch in first.values())
    cached = sum(ch.num_cached_tokens for ch in first.values())
    completion = sum(ch.num_tokens for ch in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}
