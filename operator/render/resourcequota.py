"""The API server's backstop for a GPUQuota: a core/v1 ``ResourceQuota`` per covered namespace.

A ResourceQuota bounds one namespace, a GPUQuota a set of them, so each covered namespace
gets ``hard: {requests.<gpuResourceName>: spec.gpus}``: no namespace alone can request more
GPUs than the whole quota even if the webhook is bypassed (``failurePolicy`` or an operator
outage); the cross-namespace sum is what admission and the autoscaler cap enforce.
Extended resources such as ``nvidia.com/gpu`` can only be quota'd under the ``requests.``
prefix (Kubernetes "Resource Quotas": extended resources).

A quota scoped to one ``tenant`` renders no ResourceQuota: a ResourceQuota cannot tell
tenants sharing a namespace apart, and would wrongly bound the others.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from .. import api, quota

MANAGED_BY = "argosy-operator"
#: Label on each ResourceQuota naming its GPUQuota (for listing and orphan clean-up).
QUOTA_LABEL = f"{api.GROUP}/gpuquota"


def resource_quota_name(gq: api.GPUQuota) -> str:
    """``argosy-gpu-<GPUQuota name>`` (at most 63 characters, see :data:`api.MAX_QUOTA_NAME_LENGTH`)."""
    return f"argosy-gpu-{gq.metadata.name}"


def covered_namespaces(gq: api.GPUQuota, namespace_labels: Mapping[str, Mapping[str, str]]) -> list[str]:
    """The namespaces ``gq`` covers, sorted: the listed ones (existing or not), or those of
    ``namespace_labels`` its selector matches."""
    if gq.spec.namespaces is not None:
        return sorted(set(gq.spec.namespaces))
    return sorted(ns for ns, labels in namespace_labels.items() if quota.covers_namespace(gq, ns, labels))


def resource_quotas(gq: api.GPUQuota, namespace_labels: Mapping[str, Mapping[str, str]],
                    gpu_resource_names: Iterable[str] = ("nvidia.com/gpu",)) -> list[dict]:
    """One ResourceQuota per covered namespace, or none (``enforceResourceQuota: false`` or a tenant scope).

    Args:
        gq: the GPUQuota (needs ``metadata.uid`` for the ownerReference).
        namespace_labels: labels of every namespace by name.
        gpu_resource_names: extended resource names to bound (the ``resources.gpuResourceName``
            values in use; default ``nvidia.com/gpu``).

    Raises:
        ValueError: the GPUQuota has no ``metadata.uid``.
    """
    if not gq.spec.enforce_resource_quota or gq.spec.tenant is not None:
        return []
    if not gq.metadata.uid:
        raise ValueError(f"GPUQuota {gq.metadata.name!r} has no metadata.uid")
    hard = {f"requests.{name}": str(gq.spec.gpus) for name in sorted(set(gpu_resource_names))}
    owner = {"apiVersion": api.API_VERSION, "kind": api.QUOTA_KIND, "name": gq.metadata.name,
             "uid": gq.metadata.uid, "controller": True}
    return [{
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {
            "name": resource_quota_name(gq),
            "namespace": ns,
            "labels": {"app.kubernetes.io/name": "argosy", "app.kubernetes.io/part-of": "argosy",
                       "app.kubernetes.io/component": "gpu-quota", "app.kubernetes.io/managed-by": MANAGED_BY,
                       QUOTA_LABEL: gq.metadata.name},
            "ownerReferences": [owner],
        },
        "spec": {"hard": hard},
    } for ns in covered_namespaces(gq, namespace_labels)]
