"""Names, labels, owner references and the model's place on disk: shared by every renderer."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Optional

from .. import api
from ..settings import OperatorSettings

MANAGED_BY = "argosy-operator"
#: Label carrying the InferenceService's name on every child (unambiguous across apps).
ISVC_LABEL = f"{api.GROUP}/inferenceservice"
TENANT_LABEL = f"{api.GROUP}/tenant"
#: Pod-template annotation: hash of the inputs that shape the server pods.
SPEC_HASH_ANNOTATION = f"{api.GROUP}/spec-hash"

#: Where the model volume is mounted in server and prefetch pods.
MODEL_MOUNT = "/models"
#: Scratch emptyDir (HF_HOME of downloads, HOME of the prefetch Job).
SCRATCH_MOUNT = "/scratch"
#: Server pods' emptyDir for what the runtime compiles at startup (``ARGOSY_CACHE_DIR``:
#: inductor's CPU graphs, the C++ kernels, the tokenizer cache; ``TRITON_CACHE_DIR``: Triton's
#: kernels). An emptyDir outlives the container, so a restarted container (liveness failure,
#: OOM kill, crash) loads its compiled graphs instead of compiling them again; a new pod
#: starts empty.
COMPILE_CACHE_MOUNT = "/var/cache/argosy"
#: Environment variables pointing the runtime's caches into :data:`COMPILE_CACHE_MOUNT`.
COMPILE_CACHE_ENV = {"ARGOSY_CACHE_DIR": f"{COMPILE_CACHE_MOUNT}/argosy",
                     "TRITON_CACHE_DIR": f"{COMPILE_CACHE_MOUNT}/triton"}

# Component label values (app.kubernetes.io/component).
SERVER = "server"
MODEL_CACHE = "model-cache"
PREFETCH = "prefetch"
AUTOSCALER = "autoscaler"
DISRUPTION_BUDGET = "disruption-budget"
ROUTER = "router"


def labels(isvc: api.InferenceService, component: str) -> dict[str, str]:
    """Standard ``app.kubernetes.io/*`` labels (Kubernetes "Recommended Labels") plus ours."""
    out = {
        "app.kubernetes.io/name": "argosy",
        "app.kubernetes.io/instance": isvc.metadata.name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "argosy",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        ISVC_LABEL: isvc.metadata.name,
    }
    if isvc.spec.tenant:
        out[TENANT_LABEL] = isvc.spec.tenant
    return out


def selector_labels(isvc: api.InferenceService) -> dict[str, str]:
    """The server pods' selector (Deployment, Service, PDB, status.selector). Never changes for a
    given InferenceService, since a Deployment's selector is immutable."""
    return {
        "app.kubernetes.io/name": "argosy",
        "app.kubernetes.io/instance": isvc.metadata.name,
        "app.kubernetes.io/component": SERVER,
    }


def selector_string(isvc: api.InferenceService) -> str:
    """:func:`selector_labels` as a label selector string (``k=v,k=v``, sorted)."""
    return ",".join(f"{k}={v}" for k, v in sorted(selector_labels(isvc).items()))


def owner_reference(isvc: api.InferenceService) -> dict:
    """The controller reference every child carries, so deleting the InferenceService deletes it.

    Raises:
        ValueError: ``metadata.uid`` is missing (only objects read from the API server have one).
    """
    if not isvc.metadata.uid:
        raise ValueError(f"InferenceService {isvc.metadata.name!r} has no metadata.uid")
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "name": isvc.metadata.name,
        "uid": isvc.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metadata(isvc: api.InferenceService, name: str, component: str) -> dict:
    """``metadata`` of a child object: name, namespace, labels, ownerReferences."""
    return {
        "name": name,
        "namespace": isvc.metadata.namespace,
        "labels": labels(isvc, component),
        "ownerReferences": [owner_reference(isvc)],
    }


def with_labels(meta: dict, extra: dict[str, str]) -> dict:
    """``meta`` with ``extra`` labels added (the child's own labels win on a clash: they
    select and own it)."""
    if extra:
        meta["labels"] = {**extra, **meta.get("labels", {})}
    return meta


def short_hash(value: object, length: int = 16) -> str:
    """Hex SHA-256 prefix of ``value``'s canonical JSON (sorted keys)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def image(isvc: api.InferenceService, settings: OperatorSettings) -> str:
    """The runtime image: the spec's, else the operator's default."""
    return isvc.spec.runtime.image or settings.runtime_image


def url(isvc: api.InferenceService, settings: OperatorSettings) -> str:
    """In-cluster OpenAI base URL users call: the router Service's
    (``http://NAME-router.NS.svc.DOMAIN:8080/v1``) with ``spec.router.enabled``, else the
    server Service's (``http://NAME.NS.svc.DOMAIN:8000/v1``)."""
    m = isvc.metadata
    if isvc.spec.router.enabled:
        return f"http://{m.name}-router.{m.namespace}.svc.{settings.cluster_domain}:{api.ROUTER_PORT}/v1"
    return f"http://{m.name}.{m.namespace}.svc.{settings.cluster_domain}:{api.SERVER_PORT}/v1"


def finish_container(container: dict, env: list[dict], mounts: list[dict], settings: OperatorSettings) -> dict:
    """Add ``env``, ``volumeMounts`` (when not empty) and the operator's ``imagePullPolicy``
    to ``container``; returns it."""
    if env:
        container["env"] = env
    if mounts:
        container["volumeMounts"] = mounts
    if settings.image_pull_policy:
        container["imagePullPolicy"] = settings.image_pull_policy
    return container


def restricted_pod_security(settings: OperatorSettings) -> dict:
    """Pod securityContext meeting the Pod Security Standards' "restricted" profile."""
    uid = settings.run_as_user
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "fsGroupChangePolicy": "OnRootMismatch",  # no recursive chown of a large model volume
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def restricted_container_security() -> dict:
    """Container securityContext meeting the "restricted" profile."""
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


@dataclass(frozen=True)
class ModelPlan:
    """Where the model lives and how it gets there.

    Attributes:
        claim: PersistentVolumeClaim mounted at :data:`MODEL_MOUNT` (None: no volume, the
            server downloads the model itself).
        create_claim: the operator creates ``claim`` (the model-cache PVC).
        prefetch: a Job downloads the model into ``download_dir`` first.
        download_dir: directory on the volume the download fills (under the mount).
        serve_model: the MODEL argument of ``argosy serve``: a path under the mount, or a
            hub id when there is no volume.
        served_name: ``--served-model-name`` (the metrics' ``model_name`` label).
        hub_revision: ``--revision`` for ``argosy serve`` (hub ids only).
    """

    claim: Optional[str]
    create_claim: bool
    prefetch: bool
    download_dir: Optional[str]
    serve_model: str
    served_name: str
    hub_revision: Optional[str] = None


def cache_claim_name(isvc: api.InferenceService) -> str:
    """Name of the PVC the operator creates for the model cache."""
    return f"{isvc.metadata.name}-model-cache"


def _safe(part: str) -> str:
    return part.replace("/", "--")


def model_plan(isvc: api.InferenceService) -> ModelPlan:
    """Decide the model's volume, download directory and serve argument (pure).

    Layout inside the cache volume: ``hf/ORG/NAME/REVISION`` (revision ``main`` when
    unset, ``/`` in it written as ``--``), ``s3/BUCKET/PREFIX``, ``gs/BUCKET/PREFIX``. A
    single-file hub URI (``hf://ORG/NAME/FILE``) downloads that file into the repository's
    directory and serves the file. ``pvc://CLAIM/PATH`` mounts CLAIM and serves PATH on it.
    """
    spec = isvc.spec
    uri = spec.model.uri
    scheme, rest = uri.split("://", 1)
    parts = [p for p in rest.split("/") if p]
    if scheme == "pvc":
        claim, path = parts[0], "/".join(parts[1:])
        serve = f"{MODEL_MOUNT}/{path}" if path else MODEL_MOUNT
        name = spec.model.served_name or (parts[-1] if len(parts) > 1 else claim)
        return ModelPlan(claim, False, False, None, serve, name)
    if scheme == "hf":
        repo, file = "/".join(parts[:2]), "/".join(parts[2:])
        default_name = repo
        if not spec.cache.enabled:
            return ModelPlan(None, False, False, None, repo, spec.model.served_name or repo,
                             hub_revision=spec.model.revision)
        subdir = f"hf/{repo}/{_safe(spec.model.revision or 'main')}"
    else:  # s3, gs
        file = ""
        default_name = parts[-1] if len(parts) > 1 else parts[0]
        subdir = f"{scheme}/{'/'.join(parts)}"
    download_dir = f"{MODEL_MOUNT}/{subdir}"
    serve = f"{download_dir}/{file}" if file else download_dir
    claim = spec.cache.existing_claim_name or cache_claim_name(isvc)
    return ModelPlan(
        claim=claim,
        create_claim=spec.cache.existing_claim_name is None,
        prefetch=spec.cache.prefetch,
        download_dir=download_dir,
        serve_model=serve,
        served_name=spec.model.served_name or default_name,
    )


def prefetch_job_name(isvc: api.InferenceService) -> str:
    """Name of the prefetch Job: ``NAME-prefetch-HASH``, the hash of what it downloads where, so a
    new model or revision gets a new Job (a Job's pod template is immutable)."""
    plan = model_plan(isvc)
    key = [isvc.spec.model.uri, isvc.spec.model.revision, plan.claim, plan.download_dir]
    return f"{isvc.metadata.name}-prefetch-{short_hash(key, 6)}"


def promql_selector(isvc: api.InferenceService, settings: OperatorSettings) -> str:
    """PromQL label matchers that pick this InferenceService's series only: its namespace and
    its Service (labels a ServiceMonitor scrape adds)."""
    m = isvc.metadata
    return f'{{{settings.prometheus_namespace_label}="{m.namespace}",{settings.prometheus_service_label}="{m.name}"}}'


def image_pull_secrets(pod: dict, settings: OperatorSettings) -> dict:
    """``pod`` with ``imagePullSecrets`` from the operator's ``runtimeImagePullSecrets``
    setting (none: unchanged), for every pod the operator renders."""
    names = settings.runtime_image_pull_secret_names()
    if names:
        pod["imagePullSecrets"] = [{"name": n} for n in names]
    return pod
