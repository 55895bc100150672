"""The server fleet: Deployment, Service, PodDisruptionBudget and ServiceMonitor."""

from __future__ import annotations

import math

from .. import api
from ..settings import OperatorSettings
from . import common as c
from .storage import model_access

_HTTP = "http"


def server_args(isvc: api.InferenceService) -> list[str]:
    """Arguments of ``argosy serve`` (the container's command is ``argosy``), vLLM flag names."""
    spec, rt = isvc.spec, isvc.spec.runtime
    plan = c.model_plan(isvc)
    args = ["serve", plan.serve_model, "--host", "0.0.0.0", "--port", str(api.SERVER_PORT),
            "--served-model-name", plan.served_name]
    if plan.hub_revision:
        args += ["--revision", plan.hub_revision]
    for flag, value in (
        ("--max-model-len", rt.max_model_len),
        ("--gpu-memory-utilization", rt.gpu_memory_utilization),
        ("--max-num-seqs", rt.max_num_seqs),
        ("--max-num-batched-tokens", rt.max_num_batched_tokens),
        ("--dtype", rt.dtype),
        ("--quantization", rt.quantization),
        ("--kv-cache-dtype", rt.kv_cache_dtype),
    ):
        if value is not None:
            args += [flag, str(value)]
    for name, value in (("enable-prefix-caching", rt.enable_prefix_caching),
                        ("enable-chunked-prefill", rt.enable_chunked_prefill)):
        if value is not None:
            args.append(f"--{name}" if value else f"--no-{name}")
    args += ["--tensor-parallel-size", str(spec.parallelism.tensor),
             "--shutdown-timeout", str(rt.shutdown_timeout_seconds)]
    return args + list(rt.extra_args)


def termination_grace_seconds(isvc: api.InferenceService, settings: OperatorSettings) -> int:
    """preStop sleep + the server's drain timeout + a margin, so SIGKILL never cuts a drain short."""
    return settings.pre_stop_sleep + isvc.spec.runtime.shutdown_timeout_seconds + settings.termination_margin


def _resources(isvc: api.InferenceService) -> dict:
    r = isvc.spec.resources
    requests, limits = {}, {}
    if r.cpu is not None:
        requests["cpu"] = r.cpu
    if r.memory is not None:
        requests["memory"] = limits["memory"] = r.memory
    if r.gpus:
        requests[r.gpu_resource_name] = limits[r.gpu_resource_name] = r.gpus
    out = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _probe(settings: OperatorSettings, period: int, failures: int, timeout: int) -> dict:
    return {"httpGet": {"path": "/health", "port": _HTTP}, "periodSeconds": period,
            "failureThreshold": failures, "timeoutSeconds": timeout}


def pod_spec_hash(isvc: api.InferenceService, settings: OperatorSettings) -> str:
    """Hash of every input that shapes a server pod: the spec without scaling, disruption and
    the cache claim's size/class/access mode, plus the pod-related operator settings. Labels,
    annotations and status of the InferenceService do not enter it."""
    spec = isvc.spec.model_dump(mode="json", by_alias=True, exclude={
        "scaling": True, "disruption": True, "cache": {"size", "storage_class_name", "access_mode"}})
    pod_settings = {k: getattr(settings, k) for k in (
        "runtime_image", "image_pull_policy", "startup_timeout", "pre_stop_sleep", "termination_margin",
        "run_as_user")}
    return c.short_hash({"spec": spec, "settings": pod_settings})


def pod_template(isvc: api.InferenceService, settings: OperatorSettings) -> dict:
    """The server pod template: runtime container, GPU resources, probes, drain, restricted
    security, and an emptyDir for the runtime's compile caches (:data:`common.COMPILE_CACHE_MOUNT`)."""
    spec = isvc.spec
    env, mounts, volumes = model_access(isvc)  # the cache claim, or a hub download into an emptyDir
    if spec.parallelism.tensor > 1:  # tensor-parallel ranks exchange tensors through shared memory
        shm = {"medium": "Memory"}
        if spec.resources.shared_memory_size is not None:
            shm["sizeLimit"] = spec.resources.shared_memory_size
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
        volumes.append({"name": "dshm", "emptyDir": shm})
    # compiled graphs and kernels survive a container restart (an emptyDir lives as long as the pod)
    env += [{"name": k, "value": v} for k, v in c.COMPILE_CACHE_ENV.items()]
    mounts.append({"name": "compile-cache", "mountPath": c.COMPILE_CACHE_MOUNT})
    volumes.append({"name": "compile-cache", "emptyDir": {}})
    # a variable the user sets in spec.runtime.env replaces the operator's (HF_HOME, HF_TOKEN, the
    # cache directories): a name twice in a container's env is refused by server-side apply
    # (env is a list keyed by name)
    user_env = [e.model_dump(mode="json", by_alias=True, exclude_none=True) for e in spec.runtime.env]
    user_names = {e["name"] for e in user_env}
    env = [e for e in env if e["name"] not in user_names] + user_env

    container = {
        "name": "server",
        "image": c.image(isvc, settings),
        "command": ["argosy"],
        "args": server_args(isvc),
        "ports": [{"name": _HTTP, "containerPort": api.SERVER_PORT, "protocol": "TCP"}],
        "resources": _resources(isvc),
        "startupProbe": _probe(settings, 10, max(1, math.ceil(settings.startup_timeout / 10)), 5),
        "readinessProbe": _probe(settings, 5, 2, 5),
        "livenessProbe": _probe(settings, 15, 4, 10),
        "lifecycle": {"preStop": {"sleep": {"seconds": settings.pre_stop_sleep}}},
        "securityContext": c.restricted_container_security(),
    }
    c.finish_container(container, env, mounts, settings)

    node_selector = dict(spec.scheduling.node_selector)
    if spec.resources.gpu_product:
        node_selector["nvidia.com/gpu.product"] = spec.resources.gpu_product
    pod = c.image_pull_secrets({
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": termination_grace_seconds(isvc, settings),
        "securityContext": c.restricted_pod_security(settings),
        "containers": [container],
    }, settings)
    if volumes:
        pod["volumes"] = volumes
    if node_selector:
        pod["nodeSelector"] = node_selector
    if spec.scheduling.tolerations:
        pod["tolerations"] = [t.model_dump(mode="json", by_alias=True, exclude_none=True)
                              for t in spec.scheduling.tolerations]
    if spec.scheduling.affinity:
        pod["affinity"] = spec.scheduling.affinity
    if spec.scheduling.priority_class_name:
        pod["priorityClassName"] = spec.scheduling.priority_class_name
    return {
        "metadata": {
            "labels": {**c.labels(isvc, c.SERVER), **c.selector_labels(isvc)},
            "annotations": {
                c.SPEC_HASH_ANNOTATION: pod_spec_hash(isvc, settings),
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(api.SERVER_PORT),
                "prometheus.io/path": "/metrics",
            },
        },
        "spec": pod,
    }


def deployment(isvc: api.InferenceService, settings: OperatorSettings) -> dict:
    """The server Deployment. ``replicas`` is ``scaling.minReplicas`` without an autoscaler and
    left out with one (the autoscaler owns it). Rollouts surge one pod and keep every old
    pod until its replacement is ready (``maxUnavailable: 0``)."""
    spec = {
        "selector": {"matchLabels": c.selector_labels(isvc)},
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
        "revisionHistoryLimit": 5,
        # model loading counts as progress: don't flag a rollout as stuck before the startup probe gives up
        "progressDeadlineSeconds": settings.startup_timeout + 600,
        "template": pod_template(isvc, settings),
    }
    if isvc.spec.scaling.autoscaler == "none":
        spec = {"replicas": isvc.spec.scaling.min_replicas, **spec}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": c.metadata(isvc, isvc.metadata.name, c.SERVER),
        "spec": spec,
    }


def service(isvc: api.InferenceService, settings: OperatorSettings) -> dict:
    """ClusterIP Service on port 8000 in front of the ready server pods."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": c.metadata(isvc, isvc.metadata.name, c.SERVER),
        "spec": {
            "type": "ClusterIP",
            "selector": c.selector_labels(isvc),
            "ports": [{"name": _HTTP, "port": api.SERVER_PORT, "targetPort": _HTTP, "protocol": "TCP",
                       "appProtocol": "http"}],
        },
    }


def pod_disruption_budget(isvc: api.InferenceService, settings: OperatorSettings) -> dict:
    """PodDisruptionBudget limiting voluntary evictions (drains) of server pods. Pods that are not
    ready (e.g. still loading) may always be evicted."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": c.metadata(isvc, isvc.metadata.name, c.DISRUPTION_BUDGET),
        "spec": {
            "maxUnavailable": isvc.spec.disruption.max_unavailable,
            "selector": {"matchLabels": c.selector_labels(isvc)},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def service_monitor(isvc: api.InferenceService, settings: OperatorSettings) -> dict:
    """Prometheus Operator ServiceMonitor scraping ``/metrics`` of every server pod; its series
    get the ``namespace`` and ``service`` labels the autoscaler queries select on."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": c.with_labels(c.metadata(isvc, isvc.metadata.name, c.SERVER), settings.service_monitor_label_map()),
        "spec": {
            "selector": {"matchLabels": c.selector_labels(isvc)},
            "namespaceSelector": {"matchNames": [isvc.metadata.namespace]},
            "endpoints": [{"port": _HTTP, "path": "/metrics", "interval": "15s"}],
        },
    }
