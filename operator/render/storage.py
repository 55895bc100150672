"""The model cache: its PersistentVolumeClaim and the prefetch Job that fills it."""

from __future__ import annotations

from typing import Optional

from .. import api
from ..settings import OperatorSettings
from . import common as c

#: Exit code of ``argosy download`` for a URI it can never fetch (unsupported scheme, bad
#: URI): the Job fails at once instead of retrying.
DOWNLOAD_USAGE_EXIT_CODE = 2


def cache_pvc(isvc: api.InferenceService, settings: OperatorSettings) -> Optional[dict]:
    """The model-cache PVC, or None when the model needs no claim of ours (existing claim,
    ``pvc://`` model, cache disabled)."""
    plan = c.model_plan(isvc)
    if not plan.create_claim:
        return None
    cache = isvc.spec.cache
    spec = {
        "accessModes": [cache.access_mode],
        "resources": {"requests": {"storage": cache.size}},
        "volumeMode": "Filesystem",
    }
    if cache.storage_class_name:
        spec["storageClassName"] = cache.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": c.metadata(isvc, plan.claim, c.MODEL_CACHE),
        "spec": spec,
    }


def hf_token_env(isvc: api.InferenceService) -> list[dict]:
    """``HF_TOKEN`` from ``spec.model.credentialsSecretRef`` (empty when there is none)."""
    ref = isvc.spec.model.credentials_secret_ref
    if ref is None:
        return []
    return [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}]


def model_access(isvc: api.InferenceService) -> tuple[list[dict], list[dict], list[dict]]:
    """``(env, volumeMounts, volumes)`` that give a pod the model: the cache claim mounted
    read-only at ``MODEL_MOUNT`` when there is one, else a scratch emptyDir the pod downloads
    the model into from the hub (``HF_HOME`` there, ``HF_TOKEN`` from the credentials)."""
    plan = c.model_plan(isvc)
    if plan.claim:
        return ([], [{"name": "model", "mountPath": c.MODEL_MOUNT, "readOnly": True}],
                [{"name": "model", "persistentVolumeClaim": {"claimName": plan.claim, "readOnly": True}}])
    return (hf_token_env(isvc) + [{"name": "HF_HOME", "value": f"{c.SCRATCH_MOUNT}/huggingface"}],
            [{"name": "scratch", "mountPath": c.SCRATCH_MOUNT}], [{"name": "scratch", "emptyDir": {}}])


def prefetch_job(isvc: api.InferenceService, settings: OperatorSettings) -> Optional[dict]:
    """The Job running ``argosy download URI DIR`` into the cache volume, or None when nothing
    needs downloading (``pvc://`` model, cache disabled, ``cache.prefetch: false``).

    ``argosy download`` leaves a completion marker in DIR, so a rerun (a new Job after the
    old one was deleted) finishes at once. Exit code 2 (a URI it cannot fetch) fails the Job
    without retries; other failures retry ``settings.prefetch_backoff_limit`` times.
    The ``spec-hash`` annotation is the hash of the Job's spec (the reconciler recreates a
    failed Job whose spec has changed since; a Job's pod template cannot be updated).
    """
    plan = c.model_plan(isvc)
    if not plan.prefetch:
        return None
    model = isvc.spec.model
    args = ["download", model.uri, plan.download_dir]
    if model.revision:
        args += ["--revision", model.revision]
    container = {
        "name": "download",
        "image": c.image(isvc, settings),
        "command": ["argosy"],
        "args": args,
        "env": hf_token_env(isvc) + [
            {"name": "HOME", "value": c.SCRATCH_MOUNT},
            {"name": "HF_HOME", "value": f"{c.SCRATCH_MOUNT}/huggingface"},
        ],
        "resources": {
            "requests": {"cpu": settings.prefetch_cpu, "memory": settings.prefetch_memory},
            "limits": {"memory": settings.prefetch_memory},
        },
        "securityContext": c.restricted_container_security(),
        "volumeMounts": [
            {"name": "model-cache", "mountPath": c.MODEL_MOUNT},
            {"name": "scratch", "mountPath": c.SCRATCH_MOUNT},
        ],
    }
    if settings.image_pull_policy:
        container["imagePullPolicy"] = settings.image_pull_policy
    pod_spec = c.image_pull_secrets({
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": c.restricted_pod_security(settings),
        "containers": [container],
        "volumes": [
            {"name": "model-cache", "persistentVolumeClaim": {"claimName": plan.claim}},
            {"name": "scratch", "emptyDir": {}},
        ],
    }, settings)
    spec = {
        "backoffLimit": settings.prefetch_backoff_limit,
        "podFailurePolicy": {"rules": [{
            "action": "FailJob",
            "onExitCodes": {"containerName": "download", "operator": "In",
                            "values": [DOWNLOAD_USAGE_EXIT_CODE]},
        }]},
        "template": {
            "metadata": {"labels": c.labels(isvc, c.PREFETCH)},
            "spec": pod_spec,
        },
    }
    meta = c.metadata(isvc, c.prefetch_job_name(isvc), c.PREFETCH)
    # a Job's template is immutable: the hash tells a failed Job run with other settings
    # (image, resources, token secret, retries) from one that would only fail again
    meta["annotations"] = {c.SPEC_HASH_ANNOTATION: c.short_hash(spec)}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": spec}
