"""Autoscaling: a KEDA ScaledObject (Prometheus triggers) or an autoscaling/v2 HPA (pod metrics)."""

from __future__ import annotations

from typing import Optional

from .. import api
from ..settings import OperatorSettings
from . import common as c

#: The runtime's gauges (vLLM names) the autoscalers act on.
WAITING_METRIC = "vllm:num_requests_waiting"
KV_CACHE_METRIC = "vllm:kv_cache_usage_perc"


def _number(value: float) -> str:
    # KEDA thresholds are strings; "5" rather than "5.0".
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _quantity(value: float) -> str:
    # Kubernetes quantity: whole numbers as is, fractions in milli-units (0.8 -> "800m").
    return str(int(value)) if float(value).is_integer() else f"{round(value * 1000)}m"


def _targets(isvc: api.InferenceService) -> list[tuple[str, str, float]]:
    """(name, Prometheus metric, per-replica target) of each enabled target (0 disables one)."""
    t = isvc.spec.scaling.targets
    out = []
    if t.waiting_requests:
        out.append(("waiting-requests", WAITING_METRIC, t.waiting_requests))
    if t.kv_cache_usage:
        out.append(("kv-cache-usage", KV_CACHE_METRIC, t.kv_cache_usage))
    return out


def promql(isvc: api.InferenceService, settings: OperatorSettings, metric: str) -> str:
    """Sum of ``metric`` over this InferenceService's pods (namespace and Service matchers)."""
    return f"sum({metric}{c.promql_selector(isvc, settings)})"


def scaled_object(isvc: api.InferenceService, settings: OperatorSettings) -> dict:
    """KEDA ``ScaledObject`` (keda.sh/v1alpha1) scaling the Deployment on the summed gauges.

    Each trigger uses ``metricType: AverageValue``: replicas = ceil(sum / target), so the
    target is per replica. ``cooldownPeriod`` governs scaling to ``idleReplicaCount`` and is
    also the HPA's scale-down stabilization window.
    """
    s = isvc.spec.scaling
    address = s.prometheus.server_address or settings.prometheus_server_address
    triggers = [{
        "type": "prometheus",
        "name": name,
        "metricType": "AverageValue",
        "metadata": {"serverAddress": address, "query": promql(isvc, settings, metric),
                     "threshold": _number(target)},
    } for name, metric, target in _targets(isvc)]
    if isvc.spec.router.enabled:
        # requests the router holds while no server pod is ready: the series that exists at
        # zero replicas, so KEDA activates the Deployment again (the engines' own gauges vanish
        # with their pods); per replica like the waiting-requests target
        from .router import pending_promql

        per_replica = isvc.spec.scaling.targets.waiting_requests or 1
        triggers.append({"type": "prometheus", "name": "router-pending", "metricType": "AverageValue",
                         "metadata": {"serverAddress": address, "query": pending_promql(isvc, settings),
                                      "threshold": _number(per_replica), "activationThreshold": "0"}})
    spec = {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": isvc.metadata.name},
        "pollingInterval": settings.keda_polling_interval,
        "cooldownPeriod": s.cooldown_period,
        "minReplicaCount": s.min_replicas,
        "maxReplicaCount": s.max_replicas,
        "advanced": {"horizontalPodAutoscalerConfig": {
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": hpa_window(s.cooldown_period)}}}},
        "triggers": triggers,
    }
    if s.idle_replica_count is not None:
        spec["idleReplicaCount"] = s.idle_replica_count
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": c.metadata(isvc, isvc.metadata.name, c.AUTOSCALER),
        "spec": spec,
    }


#: The API's bound on an HPA behavior's ``stabilizationWindowSeconds`` (autoscaling/v2
#: validation, ``MaxStabilizationWindowSeconds``).
MAX_STABILIZATION_WINDOW_S = 3600


def hpa_window(cooldown_period: int) -> int:
    """``cooldownPeriod`` (seconds) as an HPA scale-down stabilization window: capped at
    :data:`MAX_STABILIZATION_WINDOW_S`, which the API server enforces (KEDA's own
    ``cooldownPeriod`` keeps the full value)."""
    return min(cooldown_period, MAX_STABILIZATION_WINDOW_S)


def horizontal_pod_autoscaler(isvc: api.InferenceService, settings: OperatorSettings) -> dict:
    """autoscaling/v2 HPA on ``Pods`` metrics (served by Prometheus Adapter under
    ``settings.hpa_*_metric`` names). A Pods metric is averaged over the target's own pods,
    so it covers this InferenceService only."""
    s = isvc.spec.scaling
    names = {WAITING_METRIC: settings.hpa_waiting_metric, KV_CACHE_METRIC: settings.hpa_kv_cache_metric}
    metrics = [{
        "type": "Pods",
        "pods": {"metric": {"name": names[metric]},
                 "target": {"type": "AverageValue", "averageValue": _quantity(target)}},
    } for _, metric, target in _targets(isvc)]
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": c.metadata(isvc, isvc.metadata.name, c.AUTOSCALER),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": isvc.metadata.name},
            "minReplicas": s.min_replicas,
            "maxReplicas": s.max_replicas,
            "metrics": metrics,
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": hpa_window(s.cooldown_period)}},
        },
    }


def prometheus_adapter_rules(settings: OperatorSettings) -> list[dict]:
    """The Prometheus Adapter ``rules`` (its config file's custom-metrics rules) that serve the
    runtime's gauges as the pod metrics the rendered HPAs ask for (``settings.hpa_*_metric``).

    Series are tied to Kubernetes objects by the ``namespace`` label
    (``settings.prometheus_namespace_label``) and the ``pod`` label a ServiceMonitor scrape
    adds; the adapter fills ``<<.LabelMatchers>>`` with the namespace and the HPA target's
    pods and ``<<.GroupBy>>`` with ``pod`` (see :func:`expand_adapter_query`).
    """
    ns = settings.prometheus_namespace_label
    names = ((WAITING_METRIC, settings.hpa_waiting_metric), (KV_CACHE_METRIC, settings.hpa_kv_cache_metric))
    return [{
        "seriesQuery": f'{metric}{{{ns}!="",pod!=""}}',
        "resources": {"overrides": {ns: {"resource": "namespace"}, "pod": {"resource": "pod"}}},
        "name": {"matches": f"^{metric}$", "as": name},
        "metricsQuery": "sum(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)",
    } for metric, name in names]


def expand_adapter_query(rule: dict, namespace: str, pods: list[str], settings: OperatorSettings) -> str:
    """The PromQL Prometheus Adapter runs for ``rule`` when an HPA in ``namespace`` asks for the
    metric of ``pods`` (its template expansion: the series name, the namespace and pod
    matchers, grouped by pod)."""
    metric = rule["seriesQuery"].split("{", 1)[0]
    matchers = f'{settings.prometheus_namespace_label}="{namespace}",pod=~"{"|".join(pods)}"'
    return (rule["metricsQuery"].replace("<<.Series>>", metric).replace("<<.LabelMatchers>>", matchers)
            .replace("<<.GroupBy>>", "pod"))


def autoscaler(isvc: api.InferenceService, settings: OperatorSettings) -> Optional[dict]:
    """The ScaledObject or HPA ``spec.scaling.autoscaler`` asks for, or None for ``none`` and
    ``builtin`` (the operator scales the Deployment itself, :mod:`argosy.operator.autoscale`)."""
    kind = isvc.spec.scaling.autoscaler
    if kind == "keda":
        return scaled_object(isvc, settings)
    if kind == "hpa":
        return horizontal_pod_autoscaler(isvc, settings)
    return None
