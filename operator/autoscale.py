"""The built-in autoscaler (``scaling.autoscaler: builtin``): a pure decision function and its Prometheus reads.

:func:`decide` follows the autoscaling/v2 HPA algorithm for ``AverageValue`` targets
(Kubernetes "Horizontal Pod Autoscaling": algorithm details), which is also what the KEDA
triggers the operator renders ask for, so switching autoscalers does not change the
steady state:

1. per target, ``ceil(sum over the service's pods / per-replica target)``, the largest wins
   (a target of 0 is off); a ratio within ``tolerance`` of the current count keeps it;
2. bounds: at least ``minReplicas`` (at least 1 when requests are waiting), at most
   ``min(maxReplicas, quota cap)``;
3. stabilization: scaling down uses the highest recommendation of the last ``window``
   seconds (``scaling.cooldownPeriod``), so a short dip does not drop replicas;
4. step limits: at most ``up_step`` replicas more and ``down_step`` fewer than now per decision.

:func:`query_metrics` reads the sums with ``prometheus-api-client`` using exactly the PromQL
rendered for the KEDA triggers (:func:`argosy.operator.render.scaling.promql`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from . import api
from .render import router, scaling
from .settings import OperatorSettings


@dataclass(frozen=True)
class Inputs:
    """What one decision looks at.

    Attributes:
        current: replicas the Deployment has now (``spec.replicas``).
        waiting: sum of ``vllm:num_requests_waiting`` over the pods (None: no data).
        kv_usage: sum of ``vllm:kv_cache_usage_perc`` (0..1 per pod) over the pods (None: no data).
        waiting_target, kv_target: per-replica targets (0 turns one off).
        min_replicas, max_replicas: the spec's bounds.
        quota_cap: the GPUQuota cap on replicas (None: no quota applies).
        now: seconds (any monotonic origin, the same as in ``history``).
        history: earlier (time, recommendation) pairs, oldest first.
        window: scale-down stabilization window in seconds.
        up_step, down_step: most replicas added / removed by one decision.
        tolerance: relative change below which nothing happens (the HPA's default 0.1).
    """

    current: int
    waiting: Optional[float]
    kv_usage: Optional[float]
    waiting_target: float
    kv_target: float
    min_replicas: int
    max_replicas: int
    quota_cap: Optional[int] = None
    now: float = 0.0
    history: Sequence[tuple[float, int]] = ()
    window: float = 300.0
    up_step: int = 4
    down_step: int = 1
    tolerance: float = 0.1


@dataclass(frozen=True)
class Decision:
    """The outcome: ``desired`` replicas, a CamelCase ``reason`` and a message with the inputs.

    ``recommendation`` is the bounded, unstabilized count to append to the history.
    Reasons: ``ScaleUp``, ``ScaleDown``, ``NoChange``, ``MetricsUnavailable``,
    ``StabilizingDown`` (held up by the window), ``LimitedByMax``, ``QuotaLimited``,
    ``StepLimited``, ``BelowMin``.
    """

    desired: int
    reason: str
    message: str
    recommendation: int
    history: list[tuple[float, int]] = field(default_factory=list)


def raw_recommendation(i: Inputs) -> Optional[int]:
    """Step 1: replicas the metrics ask for, None when no enabled target has data."""
    wants = []
    for total, target in ((i.waiting, i.waiting_target), (i.kv_usage, i.kv_target)):
        if not target or total is None:
            continue
        if i.current > 0 and abs(total / (target * i.current) - 1.0) <= i.tolerance:
            wants.append(i.current)
        else:
            wants.append(math.ceil(total / target - 1e-9))
    return max(wants) if wants else None


def decide(i: Inputs) -> Decision:
    """One built-in autoscaler decision (see the module docstring for the steps).

    Returns:
        A :class:`Decision`; its ``history`` is ``i.history`` pruned to the window plus this
        recommendation, ready for the next call. Never raises for consistent inputs.
    """
    upper = i.max_replicas if i.quota_cap is None else max(min(i.max_replicas, i.quota_cap), i.min_replicas)
    raw = raw_recommendation(i)
    inputs = (f"waiting={_fmt(i.waiting)} (target {_fmt(i.waiting_target)}/replica), "
              f"kvCacheUsage={_fmt(i.kv_usage)} (target {_fmt(i.kv_target)}/replica), current={i.current}, "
              f"min={i.min_replicas}, max={i.max_replicas}"
              + (f", quotaCap={i.quota_cap}" if i.quota_cap is not None else ""))
    kept = [(t, r) for t, r in i.history if i.now - t <= i.window]
    if raw is None:
        hold = min(max(i.current, i.min_replicas), upper)
        return Decision(hold, "MetricsUnavailable", f"no metrics, keeping {hold}: {inputs}", hold, kept)

    reason = None
    rec = raw
    if (i.waiting or 0) > 0 and rec < 1:
        rec = 1
    if rec < i.min_replicas:
        rec, reason = i.min_replicas, "BelowMin"
    if rec > upper:
        reason = "QuotaLimited" if (i.quota_cap is not None and upper < i.max_replicas and rec > upper) \
            else "LimitedByMax"
        rec = upper
    history = kept + [(i.now, rec)]

    desired = rec
    if desired < i.current:
        peak = max(r for _, r in history)
        if peak > desired:
            desired, reason = min(peak, i.current), "StabilizingDown"
    if desired > i.current + i.up_step:
        desired, reason = i.current + i.up_step, "StepLimited"
    if desired < i.current - i.down_step:
        desired, reason = i.current - i.down_step, "StepLimited"
    # the bounds beat the step limits: a lowered quota cap or a raised minReplicas applies at once
    if desired > upper:
        desired, reason = upper, "QuotaLimited" if upper < i.max_replicas else "LimitedByMax"
    if desired < i.min_replicas:
        desired, reason = i.min_replicas, "BelowMin"
    if reason is None or (reason == "BelowMin" and desired != i.current):
        reason = "ScaleUp" if desired > i.current else "ScaleDown" if desired < i.current else "NoChange"
    return Decision(desired, reason, f"{i.current} -> {desired} replicas (metrics ask for {raw}): {inputs}",
                    rec, history)


def _fmt(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:g}"


def queries(isvc: api.InferenceService, settings: OperatorSettings) -> dict[str, str]:
    """The PromQL the built-in autoscaler runs, by metric: the same text as the KEDA triggers
    (with ``spec.router``, also the router's pending requests)."""
    out = {m: scaling.promql(isvc, settings, m) for m in (scaling.WAITING_METRIC, scaling.KV_CACHE_METRIC)}
    if isvc.spec.router.enabled:
        out[router.PENDING_METRIC] = router.pending_promql(isvc, settings)
    return out


def scalar(result: Any) -> Optional[float]:
    """The value of an instant-query result (a list of ``{"metric", "value": [ts, "v"]}``),
    None when it is empty (``sum()`` over no series returns no sample)."""
    if not result:
        return None
    return float(result[0]["value"][1])


def query_metrics(prom: Any, isvc: api.InferenceService, settings: OperatorSettings) -> tuple[Optional[float],
                                                                                                Optional[float]]:
    """(waiting sum, KV-cache usage sum) from Prometheus.

    With ``spec.router`` the requests the router holds count as waiting: at zero replicas
    the engines export no series at all, and the router's pending count is what brings a
    replica back (as its KEDA trigger does).

    Args:
        prom: a ``prometheus_api_client.PrometheusConnect`` (or anything with ``custom_query``).

    Raises:
        Whatever ``custom_query`` raises (connection errors, ``PrometheusApiClientException``).
    """
    q = queries(isvc, settings)
    waiting = scalar(prom.custom_query(q[scaling.WAITING_METRIC]))
    if router.PENDING_METRIC in q:
        pending = scalar(prom.custom_query(q[router.PENDING_METRIC]))
        if pending is not None:
            waiting = (waiting or 0.0) + pending
    return waiting, scalar(prom.custom_query(q[scaling.KV_CACHE_METRIC]))


def inputs_for(isvc: api.InferenceService, current: int, waiting: Optional[float], kv: Optional[float], *,
               now: float, history: Sequence[tuple[float, int]], quota_cap: Optional[int] = None,
               up_step: int = 4, down_step: int = 1) -> Inputs:
    """:class:`Inputs` from a parsed InferenceService's ``spec.scaling`` (window = ``cooldownPeriod``)."""
    s = isvc.spec.scaling
    return Inputs(current=current, waiting=waiting, kv_usage=kv, waiting_target=s.targets.waiting_requests,
                  kv_target=s.targets.kv_cache_usage, min_replicas=s.min_replicas,
                  max_replicas=s.max_replicas or s.min_replicas, quota_cap=quota_cap, now=now, history=history,
                  window=float(s.cooldown_period), up_step=up_step, down_step=down_step)
