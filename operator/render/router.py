"""``spec.router``: the `argosy router` Deployment, its Service (the user-facing endpoint), and the
ServiceAccount, Role and RoleBinding that let it watch the server Service's EndpointSlices."""

from __future__ import annotations

from .. import api
from ..settings import OperatorSettings
from . import common as c
from .storage import model_access

_HTTP = "http"
#: Where the tenants Secret is mounted in router pods.
TENANTS_MOUNT = "/etc/argosy/tenants"

#: Metric the router exports for requests waiting for a ready server pod (scale from zero).
PENDING_METRIC = "argosy_router_pending_requests"


def router_name(isvc: api.InferenceService) -> str:
    """Name of the router's Deployment, Service, ServiceAccount, Role and RoleBinding."""
    return f"{isvc.metadata.name}-router"


def router_selector_labels(isvc: api.InferenceService) -> dict[str, str]:
    """The router pods' selector (never changes: a Deployment's selector is immutable)."""
    return {"app.kubernetes.io/name": "argosy", "app.kubernetes.io/instance": isvc.metadata.name,
            "app.kubernetes.io/component": c.ROUTER}


def router_args(isvc: api.InferenceService) -> list[str]:
    """Arguments of ``argosy router``: the server Service's EndpointSlices as upstreams, the
    model (for its tokenizer and chat template) exactly as the servers get it."""
    r = isvc.spec.router
    plan = c.model_plan(isvc)
    args = ["router", "--host", "0.0.0.0", "--port", str(api.ROUTER_PORT),
            "--upstream-service", isvc.metadata.name, "--namespace", isvc.metadata.namespace,
            "--routing", r.routing, "--max-pending", str(r.max_pending),
            "--pending-timeout", str(r.pending_timeout_seconds), "--service", isvc.metadata.name]
    if r.max_inflight_per_upstream:
        args += ["--max-inflight-per-upstream", str(r.max_inflight_per_upstream)]
    if r.tenants_secret_ref is not None:
        args += ["--tenants", f"{TENANTS_MOUNT}/tenants.json"]
    if r.routing == "prefix":
        args += ["--model", plan.serve_model]
        if plan.hub_revision:
            args += ["--revision", plan.hub_revision]
    return args


def _meta(isvc: api.InferenceService) -> dict:
    return c.metadata(isvc, router_name(isvc), c.ROUTER)


def service_account(isvc: api.InferenceService, settings: OperatorSettings) -> dict:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(isvc),
            "automountServiceAccountToken": False}


def role(isvc: api.InferenceService, settings: OperatorSettings) -> dict:
    """Read access to EndpointSlices in the namespace (all the router asks the API for)."""
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": _meta(isvc),
            "rules": [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                       "verbs": ["get", "list", "watch"]}]}


def role_binding(isvc: api.InferenceService, settings: OperatorSettings) -> dict:
    name = router_name(isvc)
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": _meta(isvc),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": isvc.metadata.namespace}]}


def deployment(isvc: api.InferenceService, settings: OperatorSettings) -> dict:
    """The router Deployment: no GPU, restricted pod security, the model cache mounted
    read-only when there is one (the router reads the tokenizer from it), the service-account
    token mounted (it watches EndpointSlices), spread over nodes."""
    r = isvc.spec.router
    env: list[dict] = []
    mounts, volumes = [], []
    if c.model_plan(isvc).claim or r.routing == "prefix":  # the tokenizer: from the cache, or the hub
        env, mounts, volumes = model_access(isvc)
    if r.tenants_secret_ref is not None:
        ref = r.tenants_secret_ref
        mounts.append({"name": "tenants", "mountPath": TENANTS_MOUNT, "readOnly": True})
        volumes.append({"name": "tenants", "secret": {"secretName": ref.name,
                                                      "items": [{"key": ref.key, "path": "tenants.json"}]}})
    probe = {"httpGet": {"path": "/health", "port": _HTTP}, "periodSeconds": 5, "timeoutSeconds": 3}
    container = {
        "name": "router",
        "image": c.image(isvc, settings),
        "command": ["argosy"],
        "args": router_args(isvc),
        "ports": [{"name": _HTTP, "containerPort": api.ROUTER_PORT, "protocol": "TCP"}],
        "resources": {"requests": {"cpu": r.cpu, "memory": r.memory}, "limits": {"memory": r.memory}},
        "startupProbe": {**probe, "failureThreshold": max(1, settings.startup_timeout // 5)},
        "readinessProbe": {**probe, "failureThreshold": 2},
        "livenessProbe": {**probe, "periodSeconds": 15, "failureThreshold": 4},
        "securityContext": c.restricted_container_security(),
    }
    c.finish_container(container, env, mounts, settings)
    pod = c.image_pull_secrets({
        "serviceAccountName": router_name(isvc),
        "automountServiceAccountToken": True,
        "enableServiceLinks": False,
        "securityContext": c.restricted_pod_security(settings),
        "containers": [container],
        "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                       "whenUnsatisfiable": "ScheduleAnyway",
                                       "labelSelector": {"matchLabels": router_selector_labels(isvc)}}],
    }, settings)
    if volumes:
        pod["volumes"] = volumes
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(isvc),
        "spec": {
            "replicas": r.replicas,
            "selector": {"matchLabels": router_selector_labels(isvc)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": {**c.labels(isvc, c.ROUTER), **router_selector_labels(isvc)},
                             "annotations": {"prometheus.io/scrape": "true",
                                             "prometheus.io/port": str(api.ROUTER_PORT),
                                             "prometheus.io/path": "/metrics"}},
                "spec": pod,
            },
        },
    }


def service(isvc: api.InferenceService, settings: OperatorSettings) -> dict:
    """ClusterIP Service in front of the router pods: the InferenceService's endpoint."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(isvc),
        "spec": {"type": "ClusterIP", "selector": router_selector_labels(isvc),
                 "ports": [{"name": _HTTP, "port": api.ROUTER_PORT, "targetPort": _HTTP, "protocol": "TCP",
                            "appProtocol": "http"}]},
    }


def service_monitor(isvc: api.InferenceService, settings: OperatorSettings) -> dict:
    """ServiceMonitor scraping the router pods (the pending metric the KEDA trigger reads)."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": c.with_labels(_meta(isvc), settings.service_monitor_label_map()),
        "spec": {"selector": {"matchLabels": router_selector_labels(isvc)},
                 "namespaceSelector": {"matchNames": [isvc.metadata.namespace]},
                 "endpoints": [{"port": _HTTP, "path": "/metrics", "interval": "15s"}]},
    }


def pending_promql(isvc: api.InferenceService, settings: OperatorSettings) -> str:
    """Requests the router holds for this InferenceService, summed over router pods (series of
    the router's Service in its namespace, as the ServiceMonitor scrape labels them)."""
    m = isvc.metadata
    return (f'sum({PENDING_METRIC}{{{settings.prometheus_namespace_label}="{m.namespace}",'
            f'{settings.prometheus_service_label}="{router_name(isvc)}"}})')
