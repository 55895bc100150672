"""Asyncio front of the engine.

The engine runs on its own thread (torch releases the GIL inside ops, so the event
loop stays responsive while a step computes). Requests and aborts cross into that
thread through a locked inbox; outputs come back per request through
``loop.call_soon_threadsafe`` into an ``asyncio.Queue``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import AsyncIterator, Callable, Optional, Union

from .engine import LLMEngine, RequestOutput
from .sampling_params import SamplingParams

logger = logging.getLogger("argosy.engine")


def _put_all(items: list) -> None:
    """Put each ``(queue, item)`` (on the queues' event loop)."""
    for q, item in items:
        q.put_nowait(item)


class EngineDeadError(RuntimeError):
    """The engine loop has stopped (crashed or shut down); no request can complete."""


class AsyncLLM:
    """Drives an :class:`LLMEngine` on a background thread for asyncio callers.

    Args:
        engine: the engine (owned by this object from now on), or a function that builds
            one. With a function, the engine is built on the engine thread itself, which
            then runs every step and shuts the engine down when it stops. Prefer it on
            the CPU: OpenMP gives each thread that starts parallel work its own worker
            team, and steps run on a thread other than the one that loaded the model were
            measured 1.6x slower here (bundled model, 2 cores: 44 ms vs 27 ms per decode
            step), which made ``argosy serve`` slower than the offline engine.
        stall_timeout_s: health turns false when the engine has work but no step has
            finished for this many seconds.
        log_interval_s: period of the throughput log line while busy (seconds).
    Raises:
        Whatever building the engine raises (``ModelLoadError``, ``ValueError``, ...),
        re-raised here when ``engine`` is a function.
    """

    def __init__(self, engine: Union[LLMEngine, Callable[[], LLMEngine]], stall_timeout_s: float = 120.0,
                 log_interval_s: float = 10.0):
        self.engine: LLMEngine = engine if isinstance(engine, LLMEngine) else None  # type: ignore[assignment]
        self.stall_timeout_s = stall_timeout_s
        self.log_interval_s = log_interval_s
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._inbox: list[tuple] = []
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = False
        self.error: Optional[BaseException] = None
        self.last_progress = time.monotonic()
        self._busy = False
        #: Callbacks ``f(output, now)`` run on the engine thread for every output (metrics).
        self.output_observers: list[Callable[[RequestOutput, float], None]] = []
        #: Callbacks ``f(error)`` run on the engine thread once if the loop dies (not on shutdown).
        self.dead_observers: list[Callable[[BaseException], None]] = []
        if self.engine is not None:
            self.engine.add_failure_callback(self._wake.set)  # a dead worker wakes an idle loop
            self._thread = threading.Thread(target=self._run, name="argosy-engine", daemon=True)
            self._thread.start()
            return
        built = threading.Event()
        failure: list[BaseException] = []

        def build_then_run() -> None:
            try:
                self.engine = engine()
                self.engine.add_failure_callback(self._wake.set)
            except BaseException as e:  # re-raised by the constructor
                failure.append(e)
                return
            finally:
                built.set()
            try:
                self._run()
            finally:
                self.engine.shutdown()  # the thread that built the engine stops its workers

        self._thread = threading.Thread(target=build_then_run, name="argosy-engine", daemon=True)
        self._thread.start()
        built.wait()
        if failure:
            self._thread.join()
            raise failure[0]

    # ------------------------------------------------------------ properties
    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self.error is None and not self._stop

    @property
    def is_healthy(self) -> bool:
        """False when the loop died, or has work and made no progress for ``stall_timeout_s``."""
        if not self.is_running:
            return False
        return not (self._busy and time.monotonic() - self.last_progress > self.stall_timeout_s)

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    @property
    def num_waiting(self) -> int:
        """Requests waiting for the engine: queued in the scheduler plus those still in
        the inbox (so a burst cannot overshoot ``--max-waiting-requests``)."""
        with self._lock:
            pending = sum(1 for c in self._inbox if c[0] == "add")
        return self.engine.scheduler.num_waiting + pending

    # --------------------------------------------------------------- request
    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Validate without queuing (thread-safe: reads configuration, and compiles a
        structured-output grammar into the engine's lock-protected cache, which may take
        milliseconds for a large schema).

        Raises:
            ValueError: the request would be refused by the engine.
        """
        self.engine.check_request(prompt_token_ids, params)

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its outputs until it finishes.

        If the consumer stops early (client disconnect, task cancelled), the request is
        aborted and its KV blocks are freed.

        Raises:
            ValueError: invalid request (raised before anything is queued).
            EngineDeadError: the engine is not running or died mid-request.
        """
        if not self.is_running:
            raise EngineDeadError("engine is not running")
        self.engine.check_request(prompt_token_ids, params)
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        arrival = time.monotonic()
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"duplicate request id {request_id}")
            self._streams[request_id] = (loop, q)
            self._inbox.append(("add", request_id, list(prompt_token_ids), params, arrival))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request (no-op if it already finished)."""
        with self._lock:
            if self._streams.pop(request_id, None) is None:
                return
            self._inbox.append(("abort", request_id))
        self._wake.set()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread and the engine's worker processes; pending requests
        fail with :class:`EngineDeadError`."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)
        self.engine.shutdown()

    # ------------------------------------------------------------ the loop
    def _deliver(self, request_id: str, item) -> None:
        entry = self._streams.get(request_id)
        if entry is None:
            return
        loop, q = entry
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
        except RuntimeError:  # event loop closed
            pass

    def _drain_inbox(self) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
        eng = self.engine
        for cmd in inbox:
            if cmd[0] == "add":
                _, rid, ids, params, arrival = cmd
                if rid not in self._streams:  # aborted before it reached the engine
                    continue
                try:
                    eng.add_request(rid, ids, params, arrival)
                except Exception as e:  # a bad request must never kill the loop
                    self._deliver(rid, e if isinstance(e, ValueError) else ValueError(f"invalid request: {e}"))
                    with self._lock:
                        self._streams.pop(rid, None)
            else:
                now = time.monotonic()
                for out in eng.abort_request([cmd[1]]):
                    for obs in self.output_observers:
                        obs(out, now)

    def _fail_in_flight(self) -> None:
        """After a fatal error: every request the engine holds ends with a last output
        whose ``finish_reason`` is ``"error"`` (its text so far, then the stream ends
        normally); requests still in the inbox get :class:`EngineDeadError`."""
        try:
            outputs = self.engine.fail_unfinished_requests()
        except Exception:  # pragma: no cover - bookkeeping must not mask the original error
            logger.exception("could not finish in-flight requests")
            return
        now = time.monotonic()
        for out in outputs:
            for obs in self.output_observers:
                obs(out, now)
            self._deliver(out.request_id, out)
            with self._lock:
                self._streams.pop(out.request_id, None)

    def _run(self) -> None:
        eng = self.engine
        last_log = time.monotonic()
        last_prompt, last_gen = 0, 0
        try:
            while not self._stop:
                eng.check_health()  # raises once a tensor-parallel worker has died
                self._drain_inbox()
                if not eng.has_unfinished_requests():
                    self._busy = False
                    self._wake.wait(timeout=1.0)
                    self._wake.clear()
                    self.last_progress = time.monotonic()
                    continue
                self._busy = True
                outputs = eng.step()
                now = time.monotonic()
                self.last_progress = now
                batches: dict = {}  # one wake-up of each event loop per step, not one per output
                for out in outputs:
                    for obs in self.output_observers:
                        obs(out, now)
                    entry = self._streams.get(out.request_id)
                    if entry is not None:
                        batches.setdefault(entry[0], []).append((entry[1], out))
                    if out.finished:
                        with self._lock:
                            self._streams.pop(out.request_id, None)
                for loop, items in batches.items():
                    try:
                        loop.call_soon_threadsafe(_put_all, items)
                    except RuntimeError:  # event loop closed
                        pass
                if now - last_log >= self.log_interval_s:
                    dt = now - last_log
                    st = eng.stats
                    kv = eng.kv
                    hit = kv.prefix_cache_hits / kv.prefix_cache_queries * 100 if kv.prefix_cache_queries else 0.0
                    logger.info(
                        "Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, "
                        "Running: %d reqs, Waiting: %d reqs, KV cache usage: %.1f%%, Prefix cache hit rate: %.1f%%",
                        (st.computed_tokens - last_prompt) / dt - (st.generation_tokens - last_gen) / dt,
                        (st.generation_tokens - last_gen) / dt, eng.scheduler.num_running,
                        eng.scheduler.num_waiting, kv.usage * 100, hit,
                    )
                    last_log, last_prompt, last_gen = now, st.computed_tokens, st.generation_tokens
        except BaseException as e:  # the loop is dead: fail everyone, health turns 503
            self.error = e
            logger.exception("engine loop died")
            self._fail_in_flight()
        finally:
            err = EngineDeadError(f"engine loop stopped: {self.error!r}" if self.error else "engine shut down")
            with self._lock:
                streams = list(self._streams)
            for rid in streams:
                self._deliver(rid, err)
            with self._lock:
                self._streams.clear()
            if self.error is not None:
                for obs in self.dead_observers:
                    try:
                        obs(self.error)
                    except Exception:  # pragma: no cover - an observer must not mask the error
                        logger.exception("dead observer raised")
