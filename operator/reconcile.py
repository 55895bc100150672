"""Reconcile as a pure function: (InferenceService, observed children) -> (manifests, status).

The kopf shell reads the InferenceService and, for every role :func:`desired_children`
returns, the live object of the same kind and name (None when absent); it calls
:func:`reconcile`, server-side applies ``manifests_to_apply`` in order, deletes
:func:`orphans`, and patches ``status``. Nothing here does I/O or reads the clock.

Gating: the Deployment and its autoscaler are applied only once ``ModelCached`` is True.
Until then a new service has no server pods (which would only crash-loop on a half-filled
volume); a service whose model changes keeps its old Deployment, untouched and serving the
old model, until the new one is in the cache, so a model switch has no gap. Other spec
edits made while a download runs wait for it too.

Status follows the Kubernetes API conventions ("typical status properties"): conditions
with ``type``, ``status`` (True/False/Unknown), CamelCase ``reason``, ``message``,
``lastTransitionTime`` (changes only when ``status`` does) and ``observedGeneration``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Mapping, Optional

import pydantic

from . import api, quota, render
from .render import common
from .settings import OperatorSettings

READY = "Ready"
MODEL_CACHED = "ModelCached"
WORKLOAD_READY = "WorkloadReady"
SCALING_READY = "ScalingReady"
#: Whether the last pass wrote every child (set by the shell, which does the writes).
CHILDREN_APPLIED = "ChildrenApplied"
CONDITION_TYPES = (READY, MODEL_CACHED, WORKLOAD_READY, SCALING_READY)

#: ScalingReady reason when a GPUQuota lowered the autoscaler's maxReplicas.
QUOTA_LIMITED = "QuotaLimited"
#: WorkloadReady reason when the Deployment could not create pods: a ResourceQuota refused them.
QUOTA_EXCEEDED = "QuotaExceeded"

#: Roles held back until the model is cached.
GATED_ROLES = (render.ROLE_DEPLOYMENT, render.ROLE_AUTOSCALER, render.ROLE_ROUTER_DEPLOYMENT)


@dataclass
class Cond:
    """A condition before timestamps: status ``"True"``, ``"False"`` or ``"Unknown"``."""

    status: str
    reason: str
    message: str = ""


@dataclass
class ReconcileResult:
    """What the shell should do.

    Attributes:
        manifests_to_apply: children to server-side apply, in this order.
        status: the new ``status`` of the InferenceService.
        children: every desired child by role, applied or held back (the shell reads the
            live objects of these names for the next call).
        to_delete: live children to delete (after the applies): a failed prefetch Job
            whose spec has changed, so that the next pass creates it anew.
    """

    manifests_to_apply: list[dict]
    status: dict
    children: dict[str, dict] = field(default_factory=dict)
    to_delete: list[dict] = field(default_factory=list)


def desired_children(isvc: dict, settings: OperatorSettings) -> dict[str, dict]:
    """Every child an InferenceService should have, by role (``{}`` for an invalid spec).

    Raises:
        ValueError: the object has no ``metadata.uid``.
    """
    try:
        parsed = api.parse(isvc)
    except pydantic.ValidationError:
        return {}
    return render.render_children(parsed, settings)


def _cond_of(obj: Optional[dict], type_: str) -> Optional[dict]:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return cond
    return None


def _same_object(observed: Optional[dict], desired: Optional[dict]) -> Optional[dict]:
    # Observed objects count only when kind and name are the ones now desired (a Job of the
    # previous model, a ScaledObject after a switch to hpa are not "ours" any more).
    if observed is None or desired is None:
        return None
    if observed.get("kind") != desired["kind"]:
        return None
    if (observed.get("metadata") or {}).get("name") != desired["metadata"]["name"]:
        return None
    return observed


def _job_failed(job: dict) -> bool:
    cond = _cond_of(job, "Failed")
    return bool(cond and cond.get("status") == "True")


def prefetch_job_action(observed: Optional[dict], desired: Optional[dict]) -> str:
    """What to do with the prefetch Job: ``"create"``, ``"keep"`` or ``"recreate"``.

    A Job is created once and never updated: its pod template is immutable, and applying a
    changed one would be refused (422) on every pass. A live Job is kept, whatever settings
    it was made with (a running or finished download stays valid), except a *failed* one
    whose spec hash differs from the desired one (a new image, resources, token secret or
    retry limit may succeed): that one is deleted, and created anew on the next pass.
    A Job already being deleted is waited for.
    """
    if desired is None:
        return "keep"
    if observed is None:
        return "create"
    meta = observed.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return "keep"
    key = render.SPEC_HASH_ANNOTATION
    old_hash = (meta.get("annotations") or {}).get(key)
    if _job_failed(observed) and old_hash != desired["metadata"]["annotations"][key]:
        return "recreate"
    return "keep"


def provisioning_failed_message(isvc: api.InferenceService, claim: str, event_message: str) -> str:
    """What to tell a user whose cache claim cannot be provisioned: the provisioner's words
    and, for the default ReadWriteMany, the usual cause (most default StorageClasses, block
    storage such as EBS, Persistent Disk or Azure Disk, only provide ReadWriteOnce)."""
    head = f"claim {claim} cannot be provisioned: "
    if event_message.startswith(head):  # the previous pass's message, kept while events cannot be read
        return event_message
    text = head + event_message.strip()[:600]
    cache = isvc.spec.cache
    if cache.existing_claim_name is None and cache.access_mode == "ReadWriteMany":
        text += ("; the cache asks for ReadWriteMany (shared by all replicas): if the StorageClass does not provide "
                 "it (most block storage does not; NFS, CephFS, EFS, Filestore, Azure Files do), set "
                 "spec.cache.storageClassName to one that does, or spec.cache.accessMode: ReadWriteOnce (replicas "
                 "must then share a node); while this claim exists neither can change: delete the claim, or create "
                 "a new InferenceService")
    return text


def model_cached(isvc: api.InferenceService, job: Optional[dict], claim: Optional[dict],
                 recreating: bool = False,
                 provisioning_failure: Optional[Callable[[], Optional[str]]] = None) -> Cond:
    """``ModelCached`` from the prefetch Job (and the cache claim, for its message);
    ``recreating``: the failed Job is being replaced by one with the current settings;
    ``provisioning_failure``: returns the newest ``ProvisioningFailed`` event message of the
    claim (reason ``ProvisioningFailed``: the claim will not bind as it is), or None; called
    only when the answer matters (an unfinished Job waiting for a Pending claim), since it
    costs an Event list."""
    plan = common.model_plan(isvc)
    if plan.claim is None:
        return Cond("True", "CacheDisabled", "the cache is disabled: each server downloads the model at startup")
    if isvc.spec.model.uri.startswith("pvc://"):
        return Cond("True", "ModelOnVolume", f"the model is read from claim {plan.claim}")
    if not plan.prefetch:
        return Cond("True", "PrefetchDisabled", f"claim {plan.claim} is expected to hold the model already")
    if job is None:
        return Cond("False", "Downloading", "creating the prefetch Job")
    name = job["metadata"]["name"]
    status = job.get("status") or {}
    complete = _cond_of(job, "Complete")
    if (complete and complete.get("status") == "True") or (status.get("succeeded") or 0) >= 1:
        return Cond("True", "Downloaded", f"Job {name} downloaded {isvc.spec.model.uri}")
    if _job_failed(job):
        if recreating:
            return Cond("False", "Downloading", f"Job {name} failed; starting it again with the changed settings")
        failed = _cond_of(job, "Failed")
        detail = failed.get("message") or failed.get("reason") or "failed"
        return Cond("False", "DownloadFailed", f"Job {name}: {detail} (kubectl logs job/{name})")
    if claim is not None and (claim.get("status") or {}).get("phase") == "Pending":
        message = provisioning_failure() if provisioning_failure else None
        if message:
            return Cond("False", "ProvisioningFailed", provisioning_failed_message(isvc, plan.claim, message))
        return Cond("False", "Downloading", f"Job {name} is waiting for claim {plan.claim} to bind")
    return Cond("False", "Downloading", f"Job {name} is downloading {isvc.spec.model.uri}")


def workload_ready(isvc: api.InferenceService, dep: Optional[dict], desired: dict, gated: bool) -> Cond:
    """``WorkloadReady`` from the Deployment: its controller has seen the current generation, it runs
    the current pod template (spec-hash annotation), and at least one replica is available (or
    zero replicas are wanted). A ``ReplicaFailure`` condition with reason ``FailedCreate`` and an
    "exceeded quota" message (what the ReplicaSet controller reports when a ResourceQuota refuses
    a pod) gives reason ``QuotaExceeded``: False with no replica available, True with some."""
    if dep is None:
        if gated:
            return Cond("False", "WaitingForModel", "the Deployment is created once the model is cached")
        return Cond("False", "Creating", "creating the Deployment")
    meta, spec, status = dep.get("metadata") or {}, dep.get("spec") or {}, dep.get("status") or {}
    available = status.get("availableReplicas") or 0
    wanted = spec.get("replicas", status.get("replicas", 1))  # the live object always has spec.replicas
    have_hash = ((spec.get("template") or {}).get("metadata") or {}).get("annotations", {}).get(
        common.SPEC_HASH_ANNOTATION)
    want_hash = desired["spec"]["template"]["metadata"]["annotations"][common.SPEC_HASH_ANNOTATION]
    if have_hash != want_hash:
        if gated:
            return Cond("False", "WaitingForModel",
                        f"serving the previous spec ({available} replicas available) until the new model is cached")
        return Cond("False", "Updating", "applying the new pod template")
    if (status.get("observedGeneration") or 0) < (meta.get("generation") or 0):
        return Cond("False", "Progressing", "the Deployment controller has not seen the latest spec yet")
    progressing = _cond_of(dep, "Progressing")
    failure = _cond_of(dep, "ReplicaFailure")
    quota_hit = (failure is not None and failure.get("status") == "True" and failure.get("reason") == "FailedCreate"
                 and "exceeded quota" in (failure.get("message") or ""))
    if quota_hit and available < wanted:
        # the ResourceQuota backstop refused pods: say so instead of "pulling, scheduling or loading"
        detail = f"{available}/{wanted} replicas available; {failure.get('message', '')}"
        if available >= 1:
            return Cond("True", QUOTA_EXCEEDED, detail)
        return Cond("False", "QuotaExceeded", detail)
    if progressing and progressing.get("reason") == "ProgressDeadlineExceeded":
        return Cond("False", "ProgressDeadlineExceeded", progressing.get("message", ""))
    if wanted == 0:
        return Cond("True", "ScaledToZero", "0 replicas wanted")
    if available >= 1:
        return Cond("True", "Available", f"{available}/{wanted} replicas available")
    return Cond("False", "NoReplicasAvailable", f"0/{wanted} replicas available (pulling, scheduling or loading)")


def scaling_ready(isvc: api.InferenceService, scaler: Optional[dict], gated: bool) -> Cond:
    """``ScalingReady`` from the KEDA ScaledObject's ``Ready`` condition or the HPA's ``AbleToScale``
    and ``ScalingActive`` conditions; True (``NoAutoscaler``) without an autoscaler, True
    (``BuiltinAutoscaler``) once the Deployment exists with the operator's own autoscaler."""
    kind = isvc.spec.scaling.autoscaler
    if kind == "none":
        return Cond("True", "NoAutoscaler", f"fixed at {isvc.spec.scaling.min_replicas} replicas")
    if kind == "builtin":
        if gated:
            return Cond("Unknown", "WaitingForModel", "the operator scales the Deployment once it exists")
        return Cond("True", "BuiltinAutoscaler",
                    f"the operator scales between {isvc.spec.scaling.min_replicas} and "
                    f"{isvc.spec.scaling.max_replicas} replicas")
    if scaler is None:
        if gated:
            return Cond("Unknown", "WaitingForModel", "the autoscaler is created with the Deployment")
        return Cond("Unknown", "Creating", f"creating the {'ScaledObject' if kind == 'keda' else 'HPA'}")
    if kind == "keda":
        ready = _cond_of(scaler, "Ready")
        if ready is None or ready.get("status") not in ("True", "False"):
            return Cond("Unknown", "Pending", "KEDA has not reported on the ScaledObject yet")
        if ready["status"] == "True":
            return Cond("True", "ScaledObjectReady", ready.get("message", ""))
        return Cond("False", ready.get("reason") or "ScaledObjectNotReady", ready.get("message", ""))
    able, active = _cond_of(scaler, "AbleToScale"), _cond_of(scaler, "ScalingActive")
    for cond in (able, active):
        if cond is not None and cond.get("status") == "False":
            return Cond("False", cond.get("reason") or "HPANotActive", cond.get("message", ""))
    if able and active and able.get("status") == active.get("status") == "True":
        return Cond("True", "HPAActive", active.get("message", ""))
    return Cond("Unknown", "Pending", "the HPA has not reported yet")


def _ready(parts: list[tuple[str, Cond]]) -> Cond:
    for type_, cond in parts:
        if cond.status != "True":
            return Cond("False", cond.reason, f"{type_}: {cond.message}" if cond.message else type_)
    return Cond("True", "Ready", "serving")


def _timestamp(now: datetime) -> str:
    if now.tzinfo is None:
        now = now.replace(tzinfo=timezone.utc)
    return now.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def conditions(new: list[tuple[str, Cond]], previous: list[dict], now: datetime,
               generation: Optional[int]) -> list[dict]:
    """Condition dicts; ``lastTransitionTime`` is kept from ``previous`` when ``status`` is unchanged."""
    before = {c.get("type"): c for c in previous or []}
    out = []
    for type_, cond in new:
        old = before.get(type_)
        since = old["lastTransitionTime"] if (
            old and old.get("status") == cond.status and old.get("lastTransitionTime")) else _timestamp(now)
        entry = {"type": type_, "status": cond.status, "reason": cond.reason, "message": cond.message,
                 "lastTransitionTime": since}
        if generation is not None:
            entry["observedGeneration"] = generation
        out.append(entry)
    return out


def capped(isvc: api.InferenceService, cap: Optional[quota.Cap]) -> api.InferenceService:
    """``isvc`` with ``scaling.maxReplicas`` lowered to ``cap.max_replicas`` when the cap bites
    (an autoscaler is set and the cap is below the spec's bound); else ``isvc`` itself."""
    s = isvc.spec.scaling
    if cap is None or s.autoscaler == "none" or s.max_replicas is None or cap.max_replicas >= s.max_replicas:
        return isvc
    scaling = s.model_copy(update={"max_replicas": max(cap.max_replicas, s.min_replicas)})
    return isvc.model_copy(update={"spec": isvc.spec.model_copy(update={"scaling": scaling})})


def _quota_limited(cond: Cond, isvc: api.InferenceService, cap: Optional[quota.Cap]) -> Cond:
    if cond.status != "True" or capped(isvc, cap) is isvc:
        return cond
    return Cond("True", QUOTA_LIMITED, cap.message + (f"; {cond.message}" if cond.message else ""))


def reconcile(isvc: dict, observed: Mapping[str, Optional[dict]], settings: OperatorSettings, *,
              now: datetime, cap: Optional[quota.Cap] = None,
              provisioning_failure: Optional[Callable[[], Optional[str]]] = None) -> ReconcileResult:
    """Compute the children to apply and the status of one InferenceService.

    Args:
        isvc: the InferenceService as read from the API server (needs ``metadata.uid``).
        observed: live children by role (``render.ROLE_*``), None or missing when absent.
        settings: operator settings.
        now: the time to stamp on conditions that change.
        cap: the GPUQuota cap of this service (:func:`argosy.operator.quota.caps`); when it
            is below ``scaling.maxReplicas`` the autoscaler is rendered with the cap and
            ``ScalingReady`` (if True) gets reason ``QuotaLimited``. None: no quota applies.
        provisioning_failure: returns the newest ``ProvisioningFailed`` event message of the
            Pending cache claim, or None; called only when it matters (see :func:`model_cached`).

    Returns:
        A :class:`ReconcileResult`. An invalid spec (which the CRD's validation should have
        stopped) gives no manifests and ``Ready=False`` with reason ``InvalidSpec``.

    Raises:
        ValueError: ``metadata.uid`` is missing.
    """
    meta = isvc.get("metadata") or {}
    generation = meta.get("generation")
    previous = (isvc.get("status") or {}).get("conditions") or []
    try:
        parsed = api.parse(isvc)
    except pydantic.ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        cond = Cond("False", "InvalidSpec", f"{where}: {first.get('msg')}" if where else str(first.get("msg")))
        status = {"observedGeneration": generation,
                  "conditions": conditions([(READY, cond)], previous, now, generation)}
        return ReconcileResult([], status)

    spec_parsed = parsed
    parsed = capped(parsed, cap)
    children = render.render_children(parsed, settings)
    seen = {role: _same_object(observed.get(role), children.get(role)) for role in render.ROLES}

    job_action = prefetch_job_action(seen[render.ROLE_PREFETCH], children.get(render.ROLE_PREFETCH))
    cached = model_cached(parsed, seen[render.ROLE_PREFETCH], seen[render.ROLE_CACHE], job_action == "recreate",
                          provisioning_failure)
    gated = cached.status != "True"
    apply = [m for role, m in children.items()
             if not (gated and role in GATED_ROLES) and not (role == render.ROLE_PREFETCH and job_action != "create")]

    dep = seen[render.ROLE_DEPLOYMENT]
    parts = [
        (MODEL_CACHED, cached),
        (WORKLOAD_READY, workload_ready(parsed, dep, children[render.ROLE_DEPLOYMENT], gated)),
        (SCALING_READY, _quota_limited(scaling_ready(parsed, seen[render.ROLE_AUTOSCALER], gated), spec_parsed,
                                       cap)),
    ]
    dep_status = (dep or {}).get("status") or {}
    status = {
        "observedGeneration": generation,
        "conditions": conditions([(READY, _ready(parts))] + parts, previous, now, generation),
        "replicas": dep_status.get("replicas") or 0,
        "readyReplicas": dep_status.get("readyReplicas") or 0,
        "selector": render.selector_string(parsed),
        "url": render.url(parsed, settings),
    }
    to_delete = [seen[render.ROLE_PREFETCH]] if job_action == "recreate" else []
    return ReconcileResult(apply, status, children, to_delete)


#: Field manager that keeps a Deployment's ``spec.replicas`` while an autoscaler takes it over.
REPLICAS_HANDOVER_MANAGER = "argosy-operator-handover"


def replicas_handover(desired: dict, observed: Optional[dict], field_manager: str) -> Optional[dict]:
    """The apply configuration that hands a Deployment's ``spec.replicas`` over to an
    autoscaler, or None when there is nothing to hand over.

    With ``scaling.autoscaler: none`` the operator applies ``spec.replicas``; with an
    autoscaler the manifest leaves it out. Server-side apply removes a field its only
    manager stops applying, and the Deployment then defaults to 1 replica: switching a
    3-replica service to KEDA would drop it to 1 pod until KEDA scales back. Kubernetes'
    recipe ("Server-Side Apply: transferring ownership", kubernetes.io/docs/reference/
    using-api/server-side-apply) is to apply the live value first under a second manager
    (:data:`REPLICAS_HANDOVER_MANAGER`), which then co-owns the field, so the value stays
    when ``field_manager`` lets it go; the autoscaler takes it from there.

    Args:
        desired: the Deployment manifest about to be applied.
        observed: the live Deployment (None when absent).
        field_manager: the operator's own field manager.
    Returns:
        ``{apiVersion, kind, metadata: {name, namespace}, spec: {replicas: live}}`` when
        ``desired`` has no ``spec.replicas`` but ``field_manager`` owns the live one by
        apply; else None.
    """
    if observed is None or "replicas" in (desired.get("spec") or {}):
        return None
    live = (observed.get("spec") or {}).get("replicas")
    if live is None:
        return None
    for entry in observed.get("metadata", {}).get("managedFields") or []:
        fields = (entry.get("fieldsV1") or {}).get("f:spec") or {}
        if entry.get("manager") == field_manager and entry.get("operation") == "Apply" and "f:replicas" in fields:
            meta = desired["metadata"]
            return {"apiVersion": desired["apiVersion"], "kind": desired["kind"],
                    "metadata": {"name": meta["name"], "namespace": meta.get("namespace")},
                    "spec": {"replicas": live}}
    return None


def children_applied(failures: list[tuple[dict, BaseException]], describe) -> Cond:
    """The ``ChildrenApplied`` condition for a pass whose writes failed as ``failures``
    (``(object, error)``; ``describe(error)`` gives a one-line reason): True/``Applied``, or
    False with reason ``KindNotServed`` (only kinds the cluster does not serve: install
    KEDA or the Prometheus Operator, or change the spec) or ``ApplyFailed``, naming each
    object."""
    if not failures:
        return Cond("True", "Applied", "")
    from .kube import KindNotServed

    reason = "KindNotServed" if all(isinstance(e, KindNotServed) for _, e in failures) else "ApplyFailed"
    parts = [f"{o['kind']} {o['metadata']['name']}: {describe(e)}" for o, e in failures]
    return Cond("False", reason, "; ".join(parts)[:4000])


def replicas_from_zero(isvc: dict, observed: Optional[dict], leaving_keda: bool) -> Optional[dict]:
    """The apply configuration that gives a Deployment left at 0 replicas by KEDA
    ``max(minReplicas, 1)`` replicas again when the service switches to ``autoscaler: hpa``
    (``leaving_keda``: this pass deletes its ScaledObject), or None.

    An HPA does not act on a workload at zero replicas (Kubernetes' HPA documentation:
    scaling is disabled while ``replicas`` is 0), so without this the service would stay
    down. Only at the switch: a user who scales an HPA-managed Deployment to 0 later (the
    documented way to pause an HPA) is left alone. Applied under
    :data:`REPLICAS_HANDOVER_MANAGER`, which the HPA then overrides.
    """
    if not leaving_keda or observed is None or (observed.get("spec") or {}).get("replicas") != 0:
        return None
    try:
        parsed = api.parse(isvc)
    except pydantic.ValidationError:
        return None
    if parsed.spec.scaling.autoscaler != "hpa":
        return None
    return {"apiVersion": observed["apiVersion"] if "apiVersion" in observed else "apps/v1", "kind": "Deployment",
            "metadata": {"name": observed["metadata"]["name"], "namespace": observed["metadata"].get("namespace")},
            "spec": {"replicas": max(parsed.spec.scaling.min_replicas, 1)}}


def orphans(isvc: dict, owned: list[dict], settings: OperatorSettings) -> list[dict]:
    """Owned objects that are no longer desired and should be deleted: the Job of a previous
    model, a ScaledObject after a switch to hpa (or the reverse), the cache claim after a
    switch to an existing claim, a Deployment's autoscaler after a switch to none.

    Args:
        owned: live objects whose controller ownerReference is this InferenceService (the
            shell lists them by the ``serving.argosy.dev/inferenceservice`` label; objects
            controlled by anything else, such as KEDA's own HPA, are ignored here).

    Returns:
        The subset of ``owned`` to delete (none when the spec is invalid).
    """
    uid = (isvc.get("metadata") or {}).get("uid")
    desired = desired_children(isvc, settings)
    if not desired:
        return []
    keep = {(m["apiVersion"].split("/")[0] if "/" in m["apiVersion"] else "", m["kind"], m["metadata"]["name"])
            for m in desired.values()}
    out = []
    for obj in owned:
        refs = (obj.get("metadata") or {}).get("ownerReferences") or []
        if not any(r.get("controller") and r.get("uid") == uid for r in refs):
            continue
        av = obj.get("apiVersion", "")
        key = (av.split("/")[0] if "/" in av else "", obj.get("kind"), obj["metadata"].get("name"))
        if key not in keep:
            out.append(obj)
    return out


#: Annotation on every applied child: a digest of the manifest the operator last applied.
APPLIED_HASH_ANNOTATION = "serving.argosy.dev/applied-hash"


def with_applied_hash(manifest: dict) -> dict:
    """``manifest`` with :data:`APPLIED_HASH_ANNOTATION` set to the first 16 hex digits of
    the SHA-256 of its canonical JSON (sorted keys, the annotation itself left out); a copy,
    the input is not modified."""
    import hashlib
    import json

    meta = dict(manifest.get("metadata") or {})
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k != APPLIED_HASH_ANNOTATION}
    meta["annotations"] = annotations
    body = {**manifest, "metadata": meta}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
    return {**body, "metadata": {**meta, "annotations": {**annotations, APPLIED_HASH_ANNOTATION: digest}}}


def _contained(want, have) -> bool:
    if isinstance(want, dict):
        return isinstance(have, dict) and all(k in have and _contained(v, have[k]) for k, v in want.items())
    if isinstance(want, list):
        return isinstance(have, list) and len(want) == len(have) and all(map(_contained, want, have))
    if want == have:
        return True
    # a quantity or int-or-string applied as a number comes back as its string (resources: 1 -> "1")
    return isinstance(want, (int, float)) and not isinstance(want, bool) and isinstance(have, str) \
        and str(want) == have


def up_to_date(manifest: dict, live: Optional[dict]) -> bool:
    """Whether server-side applying ``manifest`` (as made by :func:`with_applied_hash`) onto
    ``live`` would change nothing, so the write can be skipped.

    True only when ``live`` carries the same applied hash (so no field the operator applied
    before and has since dropped is still owned: dropping it would need the apply) and every
    field of ``manifest`` has the same value in ``live`` (dicts by key, lists element by
    element with the same length; a number equals its string form, as quantities come back).
    Fields others set (defaults, other managers) are ignored, as server-side apply leaves
    them. A False answer only costs an apply.
    """
    if live is None:
        return False
    want = ((manifest.get("metadata") or {}).get("annotations") or {}).get(APPLIED_HASH_ANNOTATION)
    have = ((live.get("metadata") or {}).get("annotations") or {}).get(APPLIED_HASH_ANNOTATION)
    return want is not None and want == have and _contained(manifest, live)
