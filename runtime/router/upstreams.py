"""The router's upstreams: health, load and prefix-cache state, polled.

Every ``poll_interval`` seconds each upstream (an ``argosy serve`` base URL) is asked, in
parallel and each with a timeout:

* ``GET /health``: 200 = ready;
* ``GET /metrics``: ``vllm:num_requests_waiting``, ``vllm:num_requests_running`` and
  ``vllm:kv_cache_usage_perc`` (summed over label sets), parsed with
  ``prometheus_client``'s text parser;
* ``GET /kv_events?since=SEQ&instance_id=ID``: the block hashes its prefix cache stored
  and removed since the last poll, applied to a :class:`~argosy.runtime.core.kv_events.HeldBlocks`
  copy (a snapshot when the engine restarted or the router fell behind).

An upstream that fails its health check or a proxied request's connection is not ready
until a later poll passes. Static upstreams come from ``--upstream``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Optional

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from ..core.kv_events import HeldBlocks
from .policy import UpstreamView

logger = logging.getLogger("argosy.router")

#: Seconds a routed request's block hashes count as cached on its upstream before the
#: engine's own report must confirm them.
RECENT_TTL_S = 30.0

_LOAD_METRICS = {"vllm:num_requests_waiting": "waiting", "vllm:num_requests_running": "running",
                 "vllm:kv_cache_usage_perc": "kv_usage"}


def parse_load(text: str) -> dict[str, float]:
    """``{"waiting", "running", "kv_usage"}`` from a Prometheus text exposition (missing
    series count as 0).

    Raises:
        ValueError: text that is not the exposition format.
    """
    out = {"waiting": 0.0, "running": 0.0, "kv_usage": 0.0}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = _LOAD_METRICS.get(s.name)
            if key is not None:
                out[key] += float(s.value)
    return out


class Upstream:
    """One upstream engine as the router knows it.

    Attributes:
        url: base URL (``http://host:port``).
        ready: last health check passed and no connection failure since.
        in_flight: requests this router is proxying to it now.
        waiting / running / kv_usage: from its last ``/metrics``.
        held: its prefix cache's block hashes (from ``/kv_events``).
        recent: ``hash -> expiry`` (monotonic s) for blocks of requests routed here recently.
        prefix_events: whether it publishes KV events (False: prefix caching off or an
            engine without the endpoint).
    """

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.ready = False
        self.in_flight = 0
        self.waiting = self.running = self.kv_usage = 0.0
        self.held = HeldBlocks()
        self.recent: dict[bytes, float] = {}
        self.prefix_events = False
        self.last_error: Optional[str] = None

    def view(self, block_size: int, hash_algo: str) -> UpstreamView:
        """The policy's view (``recent`` as of the last poll's expiry sweep)."""
        return UpstreamView(self.url, self.ready, self.in_flight + self.waiting, self.kv_usage,
                            self.prefix_compatible(block_size, hash_algo), self.held.hashes, self.recent)

    def prefix_compatible(self, block_size: int, hash_algo: str) -> bool:
        """Its engine hashes blocks as the router does (unknown counts as no)."""
        return self.prefix_events and self.held.block_size == block_size and self.held.hash_algo == hash_algo

    def remember(self, hashes: list[bytes]) -> None:
        """Count ``hashes`` as cached here for :data:`RECENT_TTL_S` (a request was sent)."""
        expiry = time.monotonic() + RECENT_TTL_S
        for h in hashes:
            self.recent[h] = expiry

    def mark_failed(self, why: str) -> None:
        """A connection to it failed: not ready until a poll passes."""
        if self.ready:
            logger.warning("upstream %s failed (%s); not routing to it until its health check passes", self.url, why)
        self.ready = False
        self.last_error = why

    def expire_recent(self) -> None:
        """Drop ``recent`` entries older than :data:`RECENT_TTL_S` (once per poll, not per request)."""
        now = time.monotonic()
        for h in [h for h, t in self.recent.items() if t < now]:
            del self.recent[h]

    async def poll(self, session: aiohttp.ClientSession, timeout: float) -> None:
        """Refresh health, load and held blocks (never raises; failures mark it not ready)."""
        self.expire_recent()
        t = aiohttp.ClientTimeout(total=timeout)
        try:
            async with session.get(self.url + "/health", timeout=t) as r:
                healthy = r.status == 200
            if not healthy:
                self.mark_failed(f"/health answered {r.status}")
                return
            async with session.get(self.url + "/metrics", timeout=t) as r:
                if r.status == 200:
                    load = parse_load(await r.text())
                    self.waiting, self.running, self.kv_usage = load["waiting"], load["running"], load["kv_usage"]
            await self._poll_events(session, t)
            if not self.ready:
                logger.info("upstream %s is ready", self.url)
            self.ready, self.last_error = True, None
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError) as e:
            self.mark_failed(f"{type(e).__name__}: {e}")
            self.held.reset()

    async def _poll_events(self, session: aiohttp.ClientSession, t: aiohttp.ClientTimeout) -> None:
        params = {}
        if self.held.seq is not None:
            params = {"since": str(self.held.seq), "instance_id": self.held.instance_id}
        async with session.get(self.url + "/kv_events", params=params, timeout=t) as r:
            if r.status != 200:
                self.prefix_events = False
                return
            msg = await r.json()
        try:
            self.held.apply(msg)
        except ValueError:  # events from a new instance without a snapshot: start over
            self.held.reset()
            return
        self.prefix_events = True


class UpstreamPool:
    """The upstreams and their poll loop.

    Args:
        urls: base URLs.
        poll_interval: seconds between polls.
        timeout: seconds per poll request.
        fallback: ``--fallback`` base URL (another InferenceService), or None.
    """

    def __init__(self, urls: list[str], poll_interval: float = 1.0, timeout: float = 2.0,
                 fallback: Optional[str] = None):
        #: The current upstreams (replaced as a whole by :meth:`set_urls`).
        self.upstreams = [Upstream(u) for u in urls]
        #: ``--fallback``: polled like the others, used only when none of them can take a request.
        self.fallback = Upstream(fallback) if fallback else None
        self.poll_interval = poll_interval
        self.timeout = timeout
        #: Notified whenever an upstream may have become ready.
        self.changed = asyncio.Condition()
        #: Called (on the event loop) after every poll round.
        self.on_poll: list = []
        self._task: Optional[asyncio.Task] = None

    def set_urls(self, urls: list[str], session: Optional[aiohttp.ClientSession] = None) -> None:
        """Replace the upstream list (EndpointSlice discovery): URLs still listed keep their
        state, new ones start not ready and are polled at once (with ``session``), gone ones
        stop receiving requests (those in flight finish)."""
        have = {u.url: u for u in self.upstreams}
        self.upstreams = [have.get(u.rstrip("/")) or Upstream(u) for u in urls]
        new = [u for u in self.upstreams if u.url not in have]
        if new and session is not None:
            asyncio.get_running_loop().create_task(self._poll_some(session, new))

    async def _poll_some(self, session: aiohttp.ClientSession, ups: list[Upstream]) -> None:
        await asyncio.gather(*(u.poll(session, self.timeout) for u in ups))
        async with self.changed:
            self.changed.notify_all()
        for fn in self.on_poll:
            fn()

    def any_ready(self) -> bool:
        return any(u.ready for u in self.upstreams)

    async def poll_once(self, session: aiohttp.ClientSession) -> None:
        """Poll every upstream (and the fallback) once, in parallel, then wake waiters."""
        await self._poll_some(session, list(self.upstreams) + ([self.fallback] if self.fallback else []))

    async def _loop(self, session: aiohttp.ClientSession) -> None:
        while True:
            await self.poll_once(session)
            await asyncio.sleep(self.poll_interval)

    def start(self, session: aiohttp.ClientSession) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(session))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
