"""Prometheus metrics under vLLM's names (``vllm:...``), one registry per app.

Two sources:

* counters and gauges the engine already keeps (token counts, finished requests,
  scheduler queue lengths, KV usage, prefix-cache counters) are read at scrape time by
  a custom collector, so they can never drift from the engine's own numbers;
* latency histograms are fed from ``AsyncLLM.output_observers``, i.e. on the engine
  thread, once per request output.

All times are seconds; every series carries the ``model_name`` label.
"""

from __future__ import annotations

import logging
import threading
from typing import Iterable

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

logger = logging.getLogger("argosy.server")

#: ``Content-Type`` of the text exposition.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
_ITL_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.0, 5.0,
                10.0, 20.0, 60.0)
_REQUEST_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0,
                    120.0, 180.0, 300.0, 600.0, 1200.0, 2400.0, 4800.0)

#: Finish reasons exported by ``vllm:request_success_total`` (vLLM's three, plus ``error``: requests the
#: engine failed, which the chart's ArgosyErrorRateHigh alert and error-rate panel read).
SUCCESS_REASONS = ("stop", "length", "abort", "error")

#: Per-request state older than this (seconds since its last token) is dropped: it
#: belongs to a request aborted before its final output reached the observers.
_STALE_S = 600.0


class _EngineCollector(Collector):
    """Reads the engine's counters and gauges at scrape time."""

    def __init__(self, engine, model_name: str):
        self.engine = engine
        self.model_name = model_name

    def collect(self) -> Iterable[Metric]:
        eng, name = self.engine, self.model_name
        sched, kv, stats = eng.scheduler, eng.kv, eng.stats

        def gauge(metric: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(metric, doc, labels=["model_name"])
            g.add_metric([name], value)
            return g

        def counter(metric: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(metric, doc, labels=["model_name"])
            c.add_metric([name], value)
            return c

        usage = float(kv.usage)
        yield gauge("vllm:num_requests_running", "Number of requests in the running batch.", sched.num_running)
        yield gauge("vllm:num_requests_waiting", "Number of requests waiting to be scheduled.", sched.num_waiting)
        yield gauge("vllm:kv_cache_usage_perc", "KV cache usage (fraction of blocks held by requests, 0..1).", usage)
        yield gauge("vllm:gpu_cache_usage_perc", "Deprecated alias of vllm:kv_cache_usage_perc.", usage)
        yield counter("vllm:prompt_tokens", "Prompt tokens received.", stats.prompt_tokens)
        yield counter("vllm:generation_tokens", "Tokens generated.", stats.generation_tokens)
        yield counter("vllm:num_preemptions", "Requests preempted (KV blocks reclaimed).", sched.num_preemptions)
        yield counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      kv.prefix_cache_queries)
        yield counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", kv.prefix_cache_hits)
        ok = CounterMetricFamily("vllm:request_success", "Finished requests, by finish reason.",
                                 labels=["model_name", "finished_reason"])
        finished = dict(stats.finished)
        for reason in SUCCESS_REASONS:
            ok.add_metric([name, reason], finished.get(reason, 0))
        yield ok


class ServerMetrics:
    """The app's registry: engine collector plus latency histograms.

    Args:
        engine: the :class:`LLMEngine` (read at scrape time, never modified).
        model_name: value of the ``model_name`` label.

    Register :meth:`observe` in ``AsyncLLM.output_observers`` to feed the histograms.
    """

    def __init__(self, engine, model_name: str):
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_EngineCollector(engine, model_name))

        def hist(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, labelnames=["model_name"], buckets=buckets,
                             registry=self.registry).labels(model_name)

        self.ttft = hist("vllm:time_to_first_token_seconds", "Time to first token (arrival to first token).",
                         _TTFT_BUCKETS)
        self.itl = hist("vllm:inter_token_latency_seconds", "Time between successive output tokens.", _ITL_BUCKETS)
        self.tpot = hist("vllm:time_per_output_token_seconds",
                         "Deprecated alias of vllm:inter_token_latency_seconds.", _ITL_BUCKETS)
        self.e2e = hist("vllm:e2e_request_latency_seconds", "Arrival to last output.", _REQUEST_BUCKETS)
        self.queue = hist("vllm:request_queue_time_seconds", "Arrival to first scheduled step.", _REQUEST_BUCKETS)
        self._last_token: dict[str, float] = {}
        self._lock = threading.Lock()
        self._since_prune = 0

    def observe(self, out, now: float) -> None:
        """Feed one :class:`RequestOutput` (``now``: ``time.monotonic()`` of the step).

        Called on the engine thread; never raises (an exception there would stop the
        engine loop).
        """
        try:
            self._observe(out, now)
        except Exception:  # pragma: no cover - defensive
            logger.exception("metrics observer failed")

    def _observe(self, out, now: float) -> None:
        rid = out.request_id
        with self._lock:
            if out.new_token_ids:
                prev = self._last_token.get(rid)
                if prev is None:
                    if out.first_token_time is not None:
                        self.ttft.observe(max(0.0, out.first_token_time - out.arrival_time))
                    if out.first_scheduled_time is not None:
                        self.queue.observe(max(0.0, out.first_scheduled_time - out.arrival_time))
                else:
                    gap = max(0.0, now - prev)
                    self.itl.observe(gap)
                    self.tpot.observe(gap)
                self._last_token[rid] = now
            if out.finished:
                self._last_token.pop(rid, None)
                self.e2e.observe(max(0.0, now - out.arrival_time))
            self._since_prune += 1
            if self._since_prune >= 4096:
                self._since_prune = 0
                cutoff = now - _STALE_S
                for k in [k for k, t in self._last_token.items() if t < cutoff]:
                    del self._last_token[k]

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
