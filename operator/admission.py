"""The validating admission webhook's logic, as a pure function over AdmissionReview dicts.

The API server POSTs an ``AdmissionReview`` (``admission.k8s.io/v1``) for every CREATE and
UPDATE of an InferenceService, and for every UPDATE of its ``scale`` subresource (``kubectl
scale``: an ``autoscaling/v1`` Scale whose ``spec.replicas`` is ``spec.scaling.minReplicas``); :func:`review` answers with an ``AdmissionReview`` whose
``response`` carries the request's ``uid``, ``allowed`` and, on a denial, a meta/v1 Status
(``code`` 403, ``reason`` Forbidden, the message :func:`argosy.operator.quota.admit` wrote).
That message is what ``kubectl apply`` prints (Kubernetes "Dynamic Admission Control").

A body that is not an AdmissionReview of that version (not JSON, no ``request.uid``, wrong
``apiVersion``/``kind``) gets HTTP 400 and a meta/v1 ``Status`` with reason ``BadRequest``:
there is no uid to answer to, and the API server treats the failed call according to the
webhook's ``failurePolicy``.

Updates that do not raise a service's reserved GPUs (``minReplicas x gpus``) and keep its
namespace, tenant and GPU product are always allowed, so that lowering a quota below its
reservations does not freeze unrelated edits (labels, model, runtime flags) of services
already admitted. Deletes are never sent (the webhook registers CREATE and UPDATE only).
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import pydantic

from . import api, quota

ADMISSION_API_VERSION = "admission.k8s.io/v1"


def _status(code: int, reason: str, message: str) -> dict:
    return {"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": code, "reason": reason,
            "message": message}


def bad_request(message: str) -> tuple[int, dict]:
    """HTTP 400 and a meta/v1 Status (reason ``BadRequest``) for a body that is not an AdmissionReview."""
    return 400, _status(400, "BadRequest", message)


def _answer(uid: str, allowed: bool, code: int = 200, reason: str = "", message: str = "") -> tuple[int, dict]:
    response: dict[str, Any] = {"uid": uid, "allowed": allowed}
    if not allowed:
        response["status"] = {"code": code, "reason": reason, "message": message}
    return 200, {"apiVersion": ADMISSION_API_VERSION, "kind": "AdmissionReview", "response": response}


def _with_namespace(obj: Any, namespace: str) -> Any:
    # On CREATE the object may not carry metadata.namespace yet; the request's namespace is the truth.
    if not isinstance(obj, dict):
        return obj
    obj = dict(obj)
    meta = dict(obj.get("metadata") or {})
    if namespace:
        meta["namespace"] = namespace
    obj["metadata"] = meta
    return obj


def _first_error(e: pydantic.ValidationError) -> str:
    first = e.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    return f"{where}: {first.get('msg')}" if where else str(first.get("msg"))


def review(body: Union[bytes, str, Mapping[str, Any]], *, quotas: Sequence[dict] = (),
           services: Iterable[dict] = (), namespace_labels: Optional[Mapping[str, Mapping[str, str]]] = None,
           cluster: Optional[Callable[[], tuple]] = None) -> tuple[int, dict]:
    """Answer one AdmissionReview about an InferenceService.

    Args:
        body: the request body (raw JSON or already decoded).
        quotas: every GPUQuota object in the cluster (invalid ones are ignored).
        services: every InferenceService object in the cluster (the reviewed one's stored
            version is recognised by namespace and name and not counted twice).
        namespace_labels: labels of each namespace by name (for ``namespaceSelector``).
        cluster: instead of the three above, a callable returning ``(quotas, services,
            namespace_labels)``, called only when the decision needs them (not for an
            update that does not raise the reservation, nor for an invalid object): the
            cluster-wide lists are the expensive part of a review. Its exceptions propagate.

    Returns:
        ``(http_status, body)``: 200 and an AdmissionReview response, or 400 and a meta/v1
        Status when ``body`` is not an ``admission.k8s.io/v1`` AdmissionReview with a
        ``request.uid``. Never raises on bad input.
    """
    if isinstance(body, (bytes, str)):
        try:
            body = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            return bad_request(f"the body is not JSON: {e}")
    if not isinstance(body, Mapping):
        return bad_request("the body is not a JSON object")
    if body.get("apiVersion") != ADMISSION_API_VERSION or body.get("kind") != "AdmissionReview":
        return bad_request(f"expected apiVersion {ADMISSION_API_VERSION} and kind AdmissionReview, got "
                           f"{body.get('apiVersion')!r} and {body.get('kind')!r}")
    request = body.get("request")
    if not isinstance(request, Mapping) or not isinstance(request.get("uid"), str) or not request.get("uid"):
        return bad_request("the AdmissionReview has no request.uid")
    uid = request["uid"]
    operation = request.get("operation")
    kind = request.get("kind") or {}
    resource = request.get("resource") or {}
    if (operation == "UPDATE" and request.get("subResource") == "scale" and resource.get("group") == api.GROUP
            and resource.get("resource") == api.PLURAL):
        return _review_scale(uid, request, quotas, services, namespace_labels, cluster)
    if operation not in ("CREATE", "UPDATE") or kind.get("kind") != api.KIND or kind.get("group") != api.GROUP:
        return _answer(uid, True)  # not ours to judge
    namespace = request.get("namespace") or ""
    try:
        incoming = api.parse(_with_namespace(request.get("object"), namespace))
    except pydantic.ValidationError as e:
        return _answer(uid, False, 422, "Invalid", f"invalid InferenceService: {_first_error(e)}")
    svc = quota.usage_of(incoming)

    if operation == "UPDATE" and request.get("oldObject"):
        try:
            old = quota.usage_of(api.parse(_with_namespace(request["oldObject"], namespace)))
        except pydantic.ValidationError:
            old = None
        if old is not None and svc.reserved <= old.reserved and (old.tenant, old.product) == (svc.tenant,
                                                                                                svc.product):
            return _answer(uid, True)

    if cluster is not None:
        quotas, services, namespace_labels = cluster()
    return _decide(uid, svc, quotas, services, namespace_labels)


def _decide(uid: str, svc: quota.ServiceUsage, quotas: Sequence[dict], services: Iterable[dict],
            namespace_labels: Optional[Mapping[str, Mapping[str, str]]]) -> tuple[int, dict]:
    parsed_quotas = []
    for obj in quotas:
        try:
            parsed_quotas.append(api.parse_quota(obj))
        except pydantic.ValidationError:
            continue
    decision = quota.admit(svc, parsed_quotas, quota.usages(services), namespace_labels or {})
    if decision.allowed:
        return _answer(uid, True)
    return _answer(uid, False, 403, "Forbidden", decision.message)


def _review_scale(uid: str, request: Mapping[str, Any], quotas: Sequence[dict], services: Iterable[dict],
                  namespace_labels: Optional[Mapping[str, Mapping[str, str]]],
                  cluster: Optional[Callable[[], tuple]]) -> tuple[int, dict]:
    """``kubectl scale`` of an InferenceService: an ``autoscaling/v1`` Scale whose
    ``spec.replicas`` becomes ``spec.scaling.minReplicas`` (the CRD's ``specReplicasPath``).
    Lowering it is always allowed; raising it is judged as the update it makes to the
    stored service (found in the cluster view by namespace and name)."""
    new = ((request.get("object") or {}).get("spec") or {}).get("replicas")
    old = ((request.get("oldObject") or {}).get("spec") or {}).get("replicas")
    if not isinstance(new, int) or isinstance(new, bool) or new < 0:
        return _answer(uid, False, 422, "Invalid", f"spec.replicas must be a non-negative integer, got {new!r}")
    if isinstance(old, int) and new <= old:
        return _answer(uid, True)
    if cluster is not None:
        quotas, services, namespace_labels = cluster()
    services = list(services)
    namespace, name = request.get("namespace") or "", request.get("name") or ""
    stored = next((s for s in services if (s.get("metadata") or {}).get("namespace") == namespace
                   and (s.get("metadata") or {}).get("name") == name), None)
    if stored is None:  # not in the operator's view yet: judging blind could let a reservation through
        return _answer(uid, False, 403, "Forbidden", f"InferenceService {namespace}/{name} is not in the operator's "
                                                     "view of the cluster yet; retry in a few seconds")
    try:
        spec = dict(stored.get("spec") or {})
        spec["scaling"] = {**(spec.get("scaling") or {}), "minReplicas": new}
        svc = quota.usage_of(api.parse({**stored, "spec": spec}))
    except pydantic.ValidationError as e:
        return _answer(uid, False, 422, "Invalid", f"invalid InferenceService at minReplicas {new}: "
                                                   f"{_first_error(e)}")
    return _decide(uid, svc, quotas, services, namespace_labels)
