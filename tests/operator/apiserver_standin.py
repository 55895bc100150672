"""A stand-in for the Kubernetes API server, for tests. It is NOT a kube-apiserver.

It serves, over plain HTTP on loopback, the part of the Kubernetes REST API that the Argosy
operator uses through kopf and the ``kubernetes`` client, with the semantics those clients
rely on, as the Kubernetes API conventions and "API concepts" pages describe them
(https://kubernetes.io/docs/reference/using-api/api-concepts/). What it does:

- **resourceVersion**: one cluster-wide counter (like etcd's revision) stamped on every
  write. A PUT, or a patch or apply carrying ``metadata.resourceVersion``, with a stale
  value gets 409 Conflict. A write that changes nothing is a no-op and keeps the version.
- **Errors** as ``Status`` objects: 404 NotFound (objects, namespaces, resource types),
  409 AlreadyExists on create, 409 Conflict, 422 Invalid (bad names, failed JSON-patch
  ``test``), 400 BadRequest, 415 for strategic merge patches of custom resources.
- **list** and **watch**: lists carry the collection's resourceVersion; ``?watch=true``
  streams newline-delimited JSON ``ADDED``/``MODIFIED``/``DELETED`` events after the given
  ``resourceVersion`` (410 Gone as an ``ERROR`` event once that version has left the
  history), or, without one, the current objects as ``ADDED`` first; ``labelSelector``
  (``=``, ``==``, ``!=``, ``in``, ``notin``, existence) and ``fieldSelector`` (``=``,
  ``==``, ``!=`` on any dotted field) filter both, and an object that stops (starts)
  matching a watch's selector is sent as ``DELETED`` (``ADDED``); ``timeoutSeconds``,
  ``sendInitialEvents`` (with the initial-events-end ``BOOKMARK``) and periodic bookmarks
  with ``allowWatchBookmarks``.
- **Writes**: create (with ``generateName``), replace (PUT), JSON merge patch (RFC 7386),
  JSON patch (RFC 6902, every operation), strategic merge patch for built-in kinds only
  (applied as a JSON merge patch), server-side apply (``application/apply-patch+yaml``
  with ``fieldManager`` and ``force``): the configuration's fields are merged over the
  object and owned by that manager in ``metadata.managedFields``; fields the manager
  applied before and no longer applies are removed unless another manager owns them; a
  field another manager owns with a different value is a 409 Conflict unless ``force``.
  Updates record their manager's changed fields too.
- **status subresource** (built-in kinds and CRDs that declare it): writes to ``/status``
  change only ``status``; writes to the object ignore ``status``; ``status`` is dropped on
  create. ``metadata.generation`` starts at 1 and grows only when something other than
  ``metadata`` and ``status`` changes (or when deletion starts).
- **scale subresource of CRDs that declare it** (what ``kubectl scale`` uses): GET, PUT and
  merge PATCH of an ``autoscaling/v1`` Scale mapped onto ``specReplicasPath``; the object
  is then validated whole, and validating webhooks whose rules name ``<plural>/scale`` see
  the old and new Scale.
- **Deletion**: ``metadata.finalizers`` hold an object in ``deletionTimestamp`` until they
  are removed; ``ownerReferences`` garbage collection deletes, right away and recursively,
  every dependent whose owners are all gone (``propagationPolicy=Orphan`` removes the
  reference instead); deleting a namespace deletes its contents; deleting a CRD deletes
  its custom resources and stops serving them.
- **Namespaces** must exist for namespaced objects (``default``, ``kube-system`` and
  ``kube-public`` do from the start).
- **CustomResourceDefinitions** (``apiextensions.k8s.io/v1``): creating one serves its
  resources under every served version and marks it ``Established``.
- **Built-in kinds**: Namespace, Event, ConfigMap, Secret, ServiceAccount, Pod, Service,
  PersistentVolumeClaim, Deployment, Job, PodDisruptionBudget, HorizontalPodAutoscaler
  (``autoscaling/v2``), Lease, ValidatingWebhookConfiguration; KEDA's ScaledObject and the Prometheus Operator's
  ServiceMonitor are served as if their CRDs were installed (``third_party=False`` turns
  that off).
- **Discovery**: ``/version``, ``/api``, ``/api/v1``, ``/apis``, ``/apis/GROUP``,
  ``/apis/GROUP/VERSION`` (with ``status`` subresources listed), and ``/healthz``.
- **Fault injection** for tests: :meth:`StandIn.fail_next` makes the next N writes to a
  resource answer 409, 500 or any other code; :attr:`StandIn.requests` logs every request.

- **Custom resources** are pruned of undeclared fields, defaulted, and validated against
  their CRD's structural schema and ``x-kubernetes-validations`` CEL rules (transition
  rules with ``oldSelf`` on updates; Kubernetes' ``quantity()`` library as far as the CRD
  uses it) on every write: 422 Invalid otherwise (``tests/operator/crdcheck.py``).
- **Validation and admission the operator's writes can hit**, as the real server and
  KEDA answer them: an HPA's ``behavior`` stabilization window above 3600 s is 422
  Invalid; a PersistentVolumeClaim's spec is immutable except a growing
  ``resources.requests.storage`` (422 otherwise); so are a Deployment's selector, a Job's
  selector, template, completions and completionMode, and a Service's clusterIP(s), which
  are allocated on create (10.96.0.0/16, kept by updates that leave them out, as
  ``patchAllocatedValues`` does); KEDA's ScaledObject webhook denies (403)
  a ScaledObject whose workload an HPA not owned by a ScaledObject already scales.

- **Authentication and RBAC** when built with ``users`` (bearer token -> the
  :class:`~tests.operator.rbac.Authorizer` of a ServiceAccount, made from the Roles,
  ClusterRoles and bindings a chart renders): a request with an unknown token is 401; a
  known user's request is checked against its rules (verb, API group, resource or
  ``resource/subresource``, namespace, resourceNames) and refused with the real server's
  403 message; its writes also pass OwnerReferencesPermissionEnforcement (setting
  ``blockOwnerDeletion`` needs ``update`` on the owner's ``finalizers``) and RBAC's
  escalation check (a Role / ClusterRole it writes may grant, and a RoleBinding bind,
  only what it holds itself). A request without a token is the test harness, unrestricted
  (cluster-admin). Errors are ``Status`` bodies sent as ``Content-Type: application/json``
  exactly, as the real server sends them.
- **Validating admission webhooks**: every create, update and patch is computed without
  being stored, then sent to the ValidatingWebhookConfigurations whose rules,
  namespaceSelector, objectSelector and ``matchConditions`` (CEL) select it, over real
  TLS verified against the configuration's ``caBundle`` for ``<service>.<namespace>.svc``
  (``services`` maps a Service to a loopback address), with ``failurePolicy`` and
  ``timeoutSeconds`` applied as the real server applies them. Mutating webhooks are not
  modelled.
- **Built-in kinds' schemas**: every write of a built-in object is validated against
  Kubernetes' OpenAPI schema of that kind for v1.31 (``kubernetes-validate``, strict:
  unknown fields and wrong types are 422 Invalid naming the field). Third-party kinds
  are served without a schema (as if their CRDs had none).

Not implemented (a real API server does these; tests must not rely on them):
mutating admission webhooks; other authentication methods (client certificates), the ``escalate`` / ``bind`` verbs,
RBAC without ``users`` (every request allowed) and TLS for its own clients; other admission (policies, quotas,
LimitRanges); server-side field validation (``fieldValidation=Strict``: unknown fields
are always pruned); defaulting of built-in kinds and their validation beyond the
schema (a Deployment gets no default ``replicas``, a Job no selector; a selector that does
not match the template's labels is accepted); controllers of any kind (no ReplicaSets, Pods, Job runs,
endpoints, PVC binding: tests play the controllers by writing ``status``); conversion
between versions (a CRD's versions share the stored object); the ``scale`` subresource of
built-in kinds and subresources other than ``status`` and a CRD's ``scale``; server-side apply's merging of associative lists by key and ownership
inside lists (lists are atomic here) and ``managedFields`` sent by clients (ignored: the
server's are kept); ``Foreground`` deletion (treated as ``Background``), asynchronous
garbage collection (it is synchronous here) and GC of objects whose owners never
existed; ``deletecollection``; paging
(``limit``/``continue``: lists come whole); ``dryRun``; ``resourceVersion``/
``resourceVersionMatch`` on GET and list (always the latest state); the ``/watch/``
legacy paths; protobuf, CBOR and Table output; OpenAPI documents, aggregated discovery
and aggregated APIs; server-side field validation; exec, logs, port-forward and proxy.

Run one by hand with ``python -m tests.operator.apiserver_standin [--port N] [--crd FILE]``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextvars
import copy
import json
import logging
import random
import re
import string
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Optional

import yaml
from aiohttp import web

from .rbac import Authorizer

#: The authenticated user of the request being served (None: the test harness, unrestricted).
CALLER: contextvars.ContextVar[Optional[Authorizer]] = contextvars.ContextVar("caller", default=None)
#: Set while a write is computed without being stored (to show validating webhooks the
#: object it would store).
_DRY_RUN: contextvars.ContextVar[bool] = contextvars.ContextVar("dry_run", default=False)


class _Candidate(Exception):
    """Raised by a write under :data:`_DRY_RUN` instead of storing: the old object (None on
    create) and the one it would store (None for a removal)."""

    def __init__(self, old: Optional[dict], new: Optional[dict]):
        super().__init__("dry run")
        self.old, self.new = old, new


#: Where a request keeps its authenticated user.
_USER = web.RequestKey("user", object) if hasattr(web, "RequestKey") else "user"

WRITE_VERBS = ("create", "update", "patch", "delete")
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
STRATEGIC_PATCH = "application/strategic-merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"

_MISSING = object()
_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# metadata fields the server owns; clients' values are ignored
_SERVER_META = ("uid", "resourceVersion", "generation", "creationTimestamp", "managedFields",
                "deletionTimestamp", "deletionGracePeriodSeconds", "selfLink")
# metadata fields clients may own (server-side apply tracks these)
_OWNED_META = ("labels", "annotations", "ownerReferences", "finalizers")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------ resource types
@dataclass(frozen=True)
class ResourceType:
    """A served resource: ``group`` (``""`` for the core group), served ``versions``, ``plural``,
    ``kind``, scope, whether it has a ``status`` subresource, and whether a CRD defines it."""

    group: str
    versions: tuple[str, ...]
    plural: str
    kind: str
    namespaced: bool = True
    status: bool = True
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    crd: bool = False
    #: A CRD's ``scale`` subresource: (specReplicasPath, statusReplicasPath,
    #: labelSelectorPath), JSON paths like ``.spec.replicas``; () without one.
    scale: tuple[str, ...] = ()

    def api_version(self, version: Optional[str] = None) -> str:
        """``group/version`` (just ``version`` for the core group)."""
        v = version or self.versions[0]
        return f"{self.group}/{v}" if self.group else v


def _builtin(group_version: str, plural: str, kind: str, *, namespaced: bool = True, status: bool = True,
             short: tuple[str, ...] = ()) -> ResourceType:
    group, _, version = group_version.rpartition("/")
    return ResourceType(group, (version,), plural, kind, namespaced, status, short)


BUILTIN_TYPES = (
    _builtin("v1", "namespaces", "Namespace", namespaced=False, short=("ns",)),
    _builtin("v1", "events", "Event", status=False, short=("ev",)),
    _builtin("v1", "configmaps", "ConfigMap", status=False, short=("cm",)),
    _builtin("v1", "secrets", "Secret", status=False),
    _builtin("v1", "serviceaccounts", "ServiceAccount", status=False, short=("sa",)),
    _builtin("v1", "pods", "Pod", short=("po",)),
    _builtin("v1", "services", "Service", short=("svc",)),
    _builtin("v1", "persistentvolumeclaims", "PersistentVolumeClaim", short=("pvc",)),
    _builtin("apps/v1", "deployments", "Deployment", short=("deploy",)),
    _builtin("batch/v1", "jobs", "Job"),
    _builtin("policy/v1", "poddisruptionbudgets", "PodDisruptionBudget", short=("pdb",)),
    _builtin("autoscaling/v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler", short=("hpa",)),
    _builtin("coordination.k8s.io/v1", "leases", "Lease", status=False),
    _builtin("discovery.k8s.io/v1", "endpointslices", "EndpointSlice", status=False),
    _builtin("rbac.authorization.k8s.io/v1", "roles", "Role", status=False),
    _builtin("rbac.authorization.k8s.io/v1", "rolebindings", "RoleBinding", status=False),
    _builtin("apiextensions.k8s.io/v1", "customresourcedefinitions", "CustomResourceDefinition",
             namespaced=False, short=("crd", "crds")),
    _builtin("admissionregistration.k8s.io/v1", "validatingwebhookconfigurations", "ValidatingWebhookConfiguration",
             namespaced=False, status=False),
)
#: Kinds a real cluster gets from third-party CRDs (KEDA, Prometheus Operator).
THIRD_PARTY_TYPES = (
    _builtin("keda.sh/v1alpha1", "scaledobjects", "ScaledObject", short=("so",)),
    _builtin("monitoring.coreos.com/v1", "servicemonitors", "ServiceMonitor", status=False, short=("smon",)),
)
_NAMESPACES = ("", "namespaces")
_CRDS = ("apiextensions.k8s.io", "customresourcedefinitions")


class ApiError(Exception):
    """An error answer: HTTP ``code`` with a ``Status`` body (``reason`` as in metav1.StatusReason)."""

    def __init__(self, code: int, reason: str, message: str, details: Optional[dict] = None):
        super().__init__(f"{code} {reason}: {message}")
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}

    def status(self) -> dict:
        """The ``Status`` object sent as the body."""
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": self.message,
                "reason": self.reason, "details": self.details, "code": self.code}


def _quantity_bytes(q: Any) -> float:
    """A Kubernetes quantity (``10Gi``, ``500M``, ``1e3``) in bytes (0 when absent)."""
    if q is None:
        return 0.0
    text = str(q)
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "k": 1e3, "M": 1e6, "G": 1e9,
             "T": 1e12, "P": 1e15}
    for suffix in sorted(units, key=len, reverse=True):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * units[suffix]
    return float(text)


def _not_found(rt: ResourceType, name: str) -> ApiError:
    what = f"{rt.plural}.{rt.group}" if rt.group else rt.plural
    return ApiError(404, "NotFound", f'{what} "{name}" not found',
                    {"name": name, "group": rt.group, "kind": rt.plural})


# ------------------------------------------------------------------ pure helpers
def _user_info(user: Optional[Authorizer]) -> dict:
    """An AdmissionReview's ``userInfo``: the token's service account, or the admin."""
    return {"username": user.user if user else "kubernetes-admin",
            "groups": ["system:serviceaccounts", "system:authenticated"] if user
            else ["system:masters", "system:authenticated"]}


def _path_get(obj: Any, path: str) -> Any:
    for part in path.lstrip(".").split("."):
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


def _set_path(obj: dict, path: str, value: Any) -> None:
    *parents, leaf = path.lstrip(".").split(".")
    for part in parents:
        obj = obj.setdefault(part, {})
    obj[leaf] = value


def _scale_view(rt: ResourceType, obj: dict) -> dict:
    """The ``autoscaling/v1`` Scale of a custom resource (its CRD's scale paths)."""
    spec_path, status_path, selector_path = rt.scale
    meta = obj.get("metadata") or {}
    status = {"replicas": _path_get(obj, status_path) or 0} if status_path else {"replicas": 0}
    selector = _path_get(obj, selector_path) if selector_path else None
    if selector:
        status["selector"] = selector
    return {"apiVersion": "autoscaling/v1", "kind": "Scale",
            "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                         if k in meta},
            "spec": {"replicas": _path_get(obj, spec_path) or 0}, "status": status}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: maps merge recursively, ``null`` deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ApiError(422, "Invalid", f"bad JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _resolve_parent(doc: Any, tokens: list[str]) -> tuple[Any, str]:
    cur = doc
    for tok in tokens[:-1]:
        if isinstance(cur, dict) and tok in cur:
            cur = cur[tok]
        elif isinstance(cur, list) and tok.isdigit() and int(tok) < len(cur):
            cur = cur[int(tok)]
        else:
            raise ApiError(422, "Invalid", f"path /{'/'.join(tokens)} does not exist")
    return cur, tokens[-1]


def _pointer_get(doc: Any, tokens: list[str]) -> Any:
    if not tokens:
        return doc
    parent, last = _resolve_parent(doc, tokens)
    if isinstance(parent, dict) and last in parent:
        return parent[last]
    if isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
        return parent[int(last)]
    raise ApiError(422, "Invalid", f"path /{'/'.join(tokens)} does not exist")


def _pointer_remove(doc: Any, tokens: list[str]) -> Any:
    value = _pointer_get(doc, tokens)
    parent, last = _resolve_parent(doc, tokens)
    if isinstance(parent, dict):
        del parent[last]
    else:
        del parent[int(last)]
    return value


def _pointer_add(doc: Any, tokens: list[str], value: Any) -> Any:
    if not tokens:
        return value
    parent, last = _resolve_parent(doc, tokens)
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        if last == "-":
            parent.append(value)
        elif last.isdigit() and int(last) <= len(parent):
            parent.insert(int(last), value)
        else:
            raise ApiError(422, "Invalid", f"bad array index {last!r}")
    else:
        raise ApiError(422, "Invalid", f"cannot add below a scalar at /{'/'.join(tokens)}")
    return doc


def json_patch(doc: Any, ops: Any) -> Any:
    """RFC 6902 JSON patch (add, remove, replace, move, copy, test) on a copy of ``doc``.

    Raises:
        ApiError: 422 on a failed ``test`` or a path that does not exist; 400 on a malformed patch.
    """
    if not isinstance(ops, list):
        raise ApiError(400, "BadRequest", "a JSON patch must be a list of operations")
    doc = copy.deepcopy(doc)
    for op in ops:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise ApiError(400, "BadRequest", f"malformed JSON patch operation {op!r}")
        kind, tokens = op["op"], _pointer(op["path"])
        if kind == "add":
            doc = _pointer_add(doc, tokens, copy.deepcopy(op.get("value")))
        elif kind == "remove":
            _pointer_remove(doc, tokens)
        elif kind == "replace":
            _pointer_get(doc, tokens)
            if tokens:
                parent, last = _resolve_parent(doc, tokens)
                parent[int(last) if isinstance(parent, list) else last] = copy.deepcopy(op.get("value"))
            else:
                doc = copy.deepcopy(op.get("value"))
        elif kind in ("move", "copy"):
            source = _pointer(op.get("from", ""))
            value = _pointer_remove(doc, source) if kind == "move" else copy.deepcopy(_pointer_get(doc, source))
            doc = _pointer_add(doc, tokens, value)
        elif kind == "test":
            if _pointer_get(doc, tokens) != op.get("value"):
                raise ApiError(422, "Invalid", f"the value at {op['path']} is not {op.get('value')!r}")
        else:
            raise ApiError(400, "BadRequest", f"unknown JSON patch operation {kind!r}")
    return doc


def _leaves(obj: Any, prefix: tuple = ()) -> dict[tuple, Any]:
    # Field paths of the leaves (scalars, lists, empty maps) of a JSON object.
    if isinstance(obj, dict) and obj:
        out = {}
        for key, value in obj.items():
            out.update(_leaves(value, prefix + (key,)))
        return out
    return {prefix: obj} if prefix else {}


def _get_path(obj: Any, path: tuple) -> Any:
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return _MISSING
        obj = obj[key]
    return obj


def _remove_path(obj: dict, path: tuple) -> None:
    # Remove a field and the maps that it leaves empty.
    chain = [obj]
    for key in path[:-1]:
        nxt = chain[-1].get(key)
        if not isinstance(nxt, dict):
            return
        chain.append(nxt)
    chain[-1].pop(path[-1], None)
    for depth in range(len(path) - 1, 0, -1):
        if chain[depth]:
            break
        chain[depth - 1].pop(path[depth - 1], None)


def _overlaps(a: tuple, b: tuple) -> bool:
    n = min(len(a), len(b))
    return a[:n] == b[:n]


def _tracked(obj: dict, subresource: Optional[str], has_status: bool) -> dict[tuple, Any]:
    """Leaf fields a manager can own: ``status`` for the status subresource; otherwise every
    field but identity and server-owned metadata (and ``status`` when it is a subresource)."""
    if subresource == "status":
        return _leaves({"status": obj.get("status")}) if obj.get("status") is not None else {}
    body = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}
    if has_status:
        body.pop("status", None)
    meta = {k: v for k, v in (obj.get("metadata") or {}).items() if k in _OWNED_META}
    if meta:
        body["metadata"] = meta
    return _leaves(body)


def _encode_fields(paths: Iterable[tuple]) -> dict:
    # managedFields' FieldsV1 form: {"f:spec": {"f:replicas": {}}}
    root: dict = {}
    for path in sorted(paths):
        node = root
        for key in path:
            node = node.setdefault(f"f:{key}", {})
    return root


def _decode_fields(fields: dict, prefix: tuple = ()) -> set[tuple]:
    out = set()
    for key, sub in (fields or {}).items():
        if not key.startswith("f:"):
            continue
        path = prefix + (key[2:],)
        out |= _decode_fields(sub, path) if sub else {path}
    return out


def _spec_part(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata", "status")}


_SELECTOR_SPLIT = re.compile(r",(?![^()]*\))")


def label_selector(text: str) -> Callable[[dict], bool]:
    """A predicate on a labels dict from a label selector string (Kubernetes "Labels and Selectors").

    Raises:
        ApiError: 400 on a malformed selector.
    """
    reqs: list[Callable[[dict], bool]] = []
    for part in _SELECTOR_SPLIT.split(text or ""):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)", part)
        if m:
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",") if v.strip()}
            if op == "in":
                reqs.append(lambda ls, k=key, vs=values: k in ls and ls[k] in vs)
            else:
                reqs.append(lambda ls, k=key, vs=values: ls.get(k) not in vs)
            continue
        m = re.fullmatch(r"([\w./-]+)\s*(==|=|!=)\s*([\w.-]*)", part)
        if m:
            key, op, value = m.groups()
            if op == "!=":
                reqs.append(lambda ls, k=key, v=value: ls.get(k) != v)
            else:
                reqs.append(lambda ls, k=key, v=value: ls.get(k) == v)
            continue
        m = re.fullmatch(r"(!?)([\w./-]+)", part)
        if not m:
            raise ApiError(400, "BadRequest", f"unable to parse requirement {part!r}")
        negate, key = m.groups()
        reqs.append(lambda ls, k=key, neg=bool(negate): (k in ls) != neg)
    return lambda labels: all(r(labels or {}) for r in reqs)


def field_selector(text: str) -> Callable[[dict], bool]:
    """A predicate on an object from a field selector (``a.b=v``, ``a.b==v``, ``a.b!=v``, comma-joined).

    Raises:
        ApiError: 400 on a malformed selector.
    """
    reqs = []
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"([\w.-]+)\s*(==|=|!=)\s*(.*)", part)
        if not m:
            raise ApiError(400, "BadRequest", f"invalid field selector {part!r}")
        path, op, value = m.group(1).split("."), m.group(2), m.group(3)
        reqs.append((path, op == "!=", value))

    def match(obj: dict) -> bool:
        for path, negate, value in reqs:
            got = _get_path(obj, tuple(path))
            got = "" if got is _MISSING or got is None else str(got).lower() if isinstance(got, bool) else str(got)
            if (got == value) == negate:
                return False
        return True

    return match


# ------------------------------------------------------------------ the store
@dataclass
class _Event:
    rv: int
    type_key: tuple[str, str]
    type: str
    obj: dict
    old: Optional[dict]


class _Watch:
    # One open watch stream: its filter, and a queue on the server's event loop.
    def __init__(self, rt: ResourceType, version: str, namespace: Optional[str], labels: str, fields: str,
                 loop: asyncio.AbstractEventLoop):
        self.rt, self.version, self.namespace = rt, version, namespace
        self.labels, self.fields = label_selector(labels), field_selector(fields)
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def matches(self, obj: Optional[dict]) -> bool:
        if obj is None:
            return False
        meta = obj.get("metadata") or {}
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        return self.labels(meta.get("labels") or {}) and self.fields(obj)

    def translate(self, ev: _Event) -> Optional[tuple[str, dict]]:
        if ev.type_key != (self.rt.group, self.rt.plural):
            return None
        now, before = self.matches(ev.obj), self.matches(ev.old)
        kind = ev.type
        if kind == "MODIFIED" and now != before:
            kind = "ADDED" if now else "DELETED"
        elif not now:
            return None
        obj = copy.deepcopy(ev.obj)
        obj["apiVersion"] = self.rt.api_version(self.version)
        return kind, obj

    def offer(self, ev: _Event) -> None:
        out = self.translate(ev)
        if out is not None:
            self.push(out)

    def push(self, item: Optional[tuple[str, dict]]) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: the stream is gone
            pass


class Store:
    """Objects, resource types, the event history and open watches; thread-safe.

    Methods raise :class:`ApiError` for every failure a client should see.
    """

    def __init__(self, *, history: int = 5000, third_party: bool = True):
        self.lock = threading.RLock()
        self.rv = 0
        self.next_cluster_ip = 0  # Service clusterIPs handed out (10.96.0.0/16)
        self.types: dict[tuple[str, str], ResourceType] = {}
        self.objects: dict[tuple[str, str, str, str], dict] = {}
        #: the storage version's openAPIV3Schema of each CRD-defined type
        self.crd_schemas: dict[tuple[str, str], dict] = {}
        self.log: deque[_Event] = deque(maxlen=history)
        self.expired_rv = 0  # highest resourceVersion dropped from the history
        self.watches: set[_Watch] = set()
        self._valid_builtin: set[str] = set()  # built-in objects kubernetes-validate accepted
        for rt in BUILTIN_TYPES + (THIRD_PARTY_TYPES if third_party else ()):
            self.types[(rt.group, rt.plural)] = rt
        for ns in ("default", "kube-system", "kube-public"):
            self.create(self.types[_NAMESPACES], None, {"metadata": {"name": ns}})

    # -- lookup
    def resolve(self, group: str, version: str, plural: str) -> ResourceType:
        """The resource type served at ``group/version/plural``; 404 if none."""
        rt = self.types.get((group, plural))
        if rt is None or version not in rt.versions:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return rt

    def groups(self) -> dict[str, list[str]]:
        """Served versions by group (the core group is ``""``)."""
        out: dict[str, list[str]] = {}
        with self.lock:
            for rt in self.types.values():
                for v in rt.versions:
                    if v not in out.setdefault(rt.group, []):
                        out[rt.group].append(v)
        return out

    def _key(self, rt: ResourceType, namespace: Optional[str], name: str) -> tuple[str, str, str, str]:
        return (rt.group, rt.plural, (namespace or "") if rt.namespaced else "", name)

    def _existing(self, rt: ResourceType, namespace: Optional[str], name: str) -> dict:
        obj = self.objects.get(self._key(rt, namespace, name))
        if obj is None:
            raise _not_found(rt, name)
        return obj

    def _require_namespace(self, rt: ResourceType, namespace: Optional[str]) -> None:
        if not rt.namespaced:
            return
        if not namespace:
            raise ApiError(400, "BadRequest", "a namespace is required for a namespaced resource")
        if ("", "namespaces", "", namespace) not in self.objects:
            raise ApiError(404, "NotFound", f'namespaces "{namespace}" not found',
                           {"name": namespace, "kind": "namespaces"})

    @staticmethod
    def _view(rt: ResourceType, obj: dict, version: Optional[str]) -> dict:
        out = copy.deepcopy(obj)
        out["apiVersion"] = rt.api_version(version)
        out["kind"] = rt.kind
        return out

    # -- commit
    def _commit(self, rt: ResourceType, key: tuple, old: Optional[dict], new: dict, kind: str) -> dict:
        if _DRY_RUN.get():
            if kind == "DELETED":
                raise _Candidate(old, None)
            candidate = copy.deepcopy(new)
            if not new["metadata"].get("deletionTimestamp"):  # as below: a terminating object is not re-admitted
                allocated = self.next_cluster_ip
                try:
                    self._allocate(rt, old, candidate)
                    self._admit(rt, old, candidate)
                finally:
                    self.next_cluster_ip = allocated
            raise _Candidate(old, candidate)
        if kind != "DELETED" and not new["metadata"].get("deletionTimestamp"):
            self._allocate(rt, old, new)
            self._admit(rt, old, new)
        self.rv += 1
        new["metadata"]["resourceVersion"] = str(self.rv)
        if kind == "DELETED":
            self.objects.pop(key, None)
        else:
            self.objects[key] = new
        if len(self.log) == self.log.maxlen:
            self.expired_rv = self.log[0].rv
        ev = _Event(self.rv, (rt.group, rt.plural), kind, copy.deepcopy(new), copy.deepcopy(old))
        self.log.append(ev)
        for watch in list(self.watches):
            watch.offer(ev)
        return new

    # -- allocation, validation and admission of the kinds the operator writes
    def _allocate(self, rt: ResourceType, old: Optional[dict], new: dict) -> None:
        """Values the real server allocates: a Service's ``clusterIP``/``clusterIPs`` on
        create (``None`` keeps a headless Service, ExternalName gets none) and, on an update
        that leaves them empty, the allocated ones kept (pkg/registry/core/service/storage:
        ``patchAllocatedValues``)."""
        if rt.kind != "Service":
            return
        spec = new.setdefault("spec", {})
        if spec.get("type") == "ExternalName":
            return
        if old is None:
            if not spec.get("clusterIP"):
                self.next_cluster_ip += 1
                spec["clusterIP"] = f"10.96.{self.next_cluster_ip // 250}.{self.next_cluster_ip % 250 + 1}"
            spec.setdefault("clusterIPs", [spec["clusterIP"]])
            return
        old_spec = old.get("spec") or {}
        if not spec.get("clusterIP") and old_spec.get("clusterIP"):
            spec["clusterIP"] = old_spec["clusterIP"]
        if not spec.get("clusterIPs") and old_spec.get("clusterIPs"):
            spec["clusterIPs"] = list(old_spec["clusterIPs"])

    def _admit(self, rt: ResourceType, old: Optional[dict], new: dict) -> None:
        """The real server's checks that the operator's writes can hit (see the module
        doc): HPA behavior windows; immutable fields of PVCs, Deployments, Jobs and
        Services; KEDA's ScaledObject webhook.

        Raises:
            ApiError: 422 Invalid (built-in validation) or 403 (a webhook's denial).
        """
        name = new["metadata"].get("name")
        self._validate_builtin(rt, new)
        user = CALLER.get()
        if user is not None:
            self._check_rbac_admission(user, rt, old, new)
        schema = self.crd_schemas.get((rt.group, rt.plural)) if rt.crd else None
        if schema is not None:
            self._validate_custom_resource(rt, schema, old, new)
        spec = new.get("spec") or {}
        if rt.kind == "HorizontalPodAutoscaler":
            # k8s.io/kubernetes pkg/apis/autoscaling/validation: MaxStabilizationWindowSeconds = 3600
            for way in ("scaleUp", "scaleDown"):
                w = ((spec.get("behavior") or {}).get(way) or {}).get("stabilizationWindowSeconds")
                if w is not None and not 0 <= w <= 3600:
                    raise ApiError(422, "Invalid", f'HorizontalPodAutoscaler.autoscaling "{name}" is invalid: '
                                                   f"spec.behavior.{way}.stabilizationWindowSeconds: Invalid value: "
                                                   f"{w}: must be less than or equal to 3600")
        if rt.kind == "PersistentVolumeClaim" and old is not None and old.get("spec") != spec:
            # pkg/apis/core/validation ValidatePersistentVolumeClaimUpdate
            def size(obj):
                return ((obj.get("spec") or {}).get("resources") or {}).get("requests", {}).get("storage")

            rest = lambda o: {k: v for k, v in (o.get("spec") or {}).items() if k not in ("resources", "volumeName")}  # noqa: E731
            if rest(old) != rest(new):
                raise ApiError(422, "Invalid", f'PersistentVolumeClaim "{name}" is invalid: spec: Forbidden: spec is '
                                               "immutable after creation except resources.requests and "
                                               "volumeAttributesClassName for bound claims")
            if _quantity_bytes(size(new)) < _quantity_bytes(size(old)):
                raise ApiError(422, "Invalid", f'PersistentVolumeClaim "{name}" is invalid: '
                                               "spec.resources.requests.storage: Forbidden: field can not be less "
                                               "than previous value")
        if old is not None:
            self._check_immutable(rt, name, old.get("spec") or {}, spec)
        if rt.kind == "ScaledObject":
            # KEDA's validating webhook (vscaledobject.kb.io): one owner per workload
            ref = spec.get("scaleTargetRef") or {}
            target = (ref.get("kind") or "Deployment", ref.get("name"))
            ns = new["metadata"].get("namespace")
            uid = new["metadata"].get("uid")
            for (group, plural, o_ns, _), obj in self.objects.items():
                if o_ns != ns or plural != "horizontalpodautoscalers":
                    continue
                o_ref = (obj.get("spec") or {}).get("scaleTargetRef") or {}
                owned_by_so = any(r.get("kind") == "ScaledObject" and (r.get("uid") == uid or r.get("name") == name)
                                  for r in obj["metadata"].get("ownerReferences") or [])
                if (o_ref.get("kind"), o_ref.get("name")) == target and not owned_by_so:
                    raise ApiError(403, "Forbidden", 'admission webhook "vscaledobject.kb.io" denied the request: '
                                                     f"the workload '{target[1]}' of type 'apps/v1.{target[0]}' is "
                                                     f"already managed by the hpa '{obj['metadata']['name']}'")

    #: Kubernetes version whose built-in schemas writes are validated against (the stand-in
    #: reports v1.31 at /version).
    K8S_VERSION = "1.31.0"

    def _validate_builtin(self, rt: ResourceType, new: dict) -> None:
        """A built-in kind's object against Kubernetes' own OpenAPI schema of that kind
        (``kubernetes-validate``, strict: unknown fields are errors), as the real server's
        decoding and validation refuse a malformed object. Third-party kinds (KEDA, the
        Prometheus Operator) and CRDs are not built-in; identical objects are checked once.

        Raises:
            ApiError: 422 Invalid naming the field.
        """
        if rt.crd or rt in THIRD_PARTY_TYPES:
            return
        import kubernetes_validate

        obj = self._view(rt, new, None)
        obj["metadata"] = {k: v for k, v in obj["metadata"].items() if k != "managedFields"}
        key = json.dumps(obj, sort_keys=True)
        if key in self._valid_builtin:
            return
        try:
            kubernetes_validate.validate(obj, self.K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path) or "(root)"
            raise ApiError(422, "Invalid", f'{rt.kind} "{new["metadata"].get("name")}" is invalid: {where}: '
                                           f"{e.message}") from None
        except kubernetes_validate.utils.SchemaNotFoundError:
            return  # a kind this Kubernetes version's schemas do not have
        if len(self._valid_builtin) > 20000:
            self._valid_builtin.clear()
        self._valid_builtin.add(key)

    def _check_rbac_admission(self, user: Authorizer, rt: ResourceType, old: Optional[dict], new: dict) -> None:
        """What the real server checks on an RBAC-restricted user's writes beyond the
        request itself: OwnerReferencesPermissionEnforcement (setting
        ``blockOwnerDeletion`` on a reference needs ``update`` on the owner's
        ``finalizers``) and RBAC's escalation prevention (a Role or ClusterRole may only
        grant what its writer holds; a RoleBinding only bind a role whose permissions
        its writer holds).

        Raises:
            ApiError: 403 Forbidden.
        """
        meta = new["metadata"]
        name, ns = meta.get("name"), meta.get("namespace")
        what = f'{rt.plural}{"." + rt.group if rt.group else ""} "{name}"'
        before = {(r.get("uid"), r.get("name")): r for r in ((old or {}).get("metadata") or {}).get("ownerReferences")
                  or []}
        for ref in meta.get("ownerReferences") or []:
            if not ref.get("blockOwnerDeletion") or (before.get((ref.get("uid"), ref.get("name"))) or {}).get(
                    "blockOwnerDeletion"):
                continue
            group = ref.get("apiVersion", "").rpartition("/")[0]
            owner = next((t for t in self.types.values() if t.group == group and t.kind == ref.get("kind")), None)
            plural = owner.plural if owner else str(ref.get("kind", "")).lower() + "s"
            owner_ns = ns if owner is None or owner.namespaced else None
            if not user.allows("update", group, plural, "finalizers", owner_ns, ref.get("name")):
                raise ApiError(403, "Forbidden", f"{what} is forbidden: cannot set blockOwnerDeletion if an "
                                                 "ownerReference refers to a resource you can't set finalizers on: "
                                                 + user.forbidden("update", group, plural, "finalizers", owner_ns,
                                                                  ref.get("name")))
        if rt.group != "rbac.authorization.k8s.io":
            return
        scope = ns if rt.kind in ("Role", "RoleBinding") else None
        if rt.kind in ("Role", "ClusterRole"):
            rules = new.get("rules") or []
        elif rt.kind in ("RoleBinding", "ClusterRoleBinding"):
            ref = new.get("roleRef") or {}
            role_key = ("rbac.authorization.k8s.io", "roles" if ref.get("kind") == "Role" else "clusterroles",
                        (ns or "") if ref.get("kind") == "Role" else "", ref.get("name"))
            rules = (self.objects.get(role_key) or {}).get("rules") or []
        else:
            return
        missing = user.covers(rules, scope)
        if missing is not None:
            raise ApiError(403, "Forbidden", f'{what} is forbidden: user "{user.user}" is attempting to grant RBAC '
                                             f"permissions not currently held: {missing}")

    #: Built-in fields that updates may not change (pkg/apis/{apps,batch,core}/validation:
    #: ValidateDeploymentUpdate's selector, ValidateJobSpecUpdate's selector, template,
    #: completions and completionMode, ValidateServiceUpdate's clusterIP(s)).
    _IMMUTABLE = {"Deployment": ("selector",), "Job": ("selector", "template", "completions", "completionMode"),
                  "Service": ("clusterIP", "clusterIPs")}

    @classmethod
    def _check_immutable(cls, rt: ResourceType, name: str, old_spec: dict, spec: dict) -> None:
        for field in cls._IMMUTABLE.get(rt.kind, ()):
            if old_spec.get(field) != spec.get(field):
                what = f"{rt.plural}.{rt.group}" if rt.group else rt.kind
                raise ApiError(422, "Invalid", f'{what} "{name}" is invalid: spec.{field}: Invalid value: '
                                               f"{json.dumps(spec.get(field))}: field is immutable")

    @staticmethod
    def _validate_custom_resource(rt: ResourceType, schema: dict, old: Optional[dict], new: dict) -> None:
        """What the API server does with a custom resource on every write, from its CRD:
        pruning of undeclared fields and defaulting (in place), the structural schema, and the
        ``x-kubernetes-validations``
        CEL rules, transition rules (``oldSelf``) included on updates.

        Raises:
            ApiError: 422 Invalid naming the fields and the rules' messages.
        """
        from . import crdcheck

        crdcheck.prune(schema, new)  # unknown fields are dropped (no fieldValidation=Strict here)
        defaulted = crdcheck.apply_defaults(schema, new)
        for k, v in defaulted.items():
            if k != "metadata":
                new[k] = v
        old_body = None if old is None else crdcheck.apply_defaults(schema, old)
        errors = crdcheck.schema_errors(schema, new) or crdcheck.cel_errors(schema, new, old_body)
        if errors:
            raise ApiError(422, "Invalid", f'{rt.kind}.{rt.group} "{new["metadata"].get("name")}" is invalid: '
                                           + "; ".join(errors[:8]))

    # -- managed fields
    @staticmethod
    def _managers(obj: Optional[dict]) -> dict[tuple[str, str, Optional[str]], set[tuple]]:
        out = {}
        for entry in ((obj or {}).get("metadata") or {}).get("managedFields") or []:
            key = (entry.get("manager", ""), entry.get("operation", "Update"), entry.get("subresource"))
            out[key] = _decode_fields(entry.get("fieldsV1") or {})
        return out

    @staticmethod
    def _stamp_managers(obj: dict, managers: dict, api_version: str, old: Optional[dict]) -> None:
        times = {(e.get("manager"), e.get("operation"), e.get("subresource")): e.get("time")
                 for e in ((old or {}).get("metadata") or {}).get("managedFields") or []}
        previous = Store._managers(old)
        entries = []
        for (manager, operation, sub), paths in managers.items():
            if not paths:
                continue
            key = (manager, operation, sub)
            entry = {"manager": manager, "operation": operation, "apiVersion": api_version,
                     "time": times.get(key) if previous.get(key) == paths and times.get(key) else _now(),
                     "fieldsType": "FieldsV1", "fieldsV1": _encode_fields(paths)}
            if sub:
                entry["subresource"] = sub
            entries.append(entry)
        if entries:
            obj["metadata"]["managedFields"] = entries
        else:
            obj["metadata"].pop("managedFields", None)

    @staticmethod
    def _record_update(managers: dict, rt: ResourceType, old: dict, new: dict, manager: str,
                       subresource: Optional[str]) -> None:
        # An Update takes the fields it changed from everyone; removed fields lose their owners.
        before, after = _tracked(old, subresource, rt.status), _tracked(new, subresource, rt.status)
        changed = {p for p, v in after.items() if before.get(p, _MISSING) != v}
        removed = set(before) - set(after)
        for paths in managers.values():
            paths.difference_update(changed | removed)
        if changed:
            managers.setdefault((manager, "Update", subresource), set()).update(changed)

    # -- reads
    def get(self, rt: ResourceType, namespace: Optional[str], name: str, version: Optional[str] = None) -> dict:
        """One object; 404 if absent."""
        with self.lock:
            return self._view(rt, self._existing(rt, namespace, name), version)

    def list(self, rt: ResourceType, namespace: Optional[str], labels: str = "", fields: str = "",
             version: Optional[str] = None) -> dict:
        """A ``<Kind>List`` of the matching objects, with the collection's resourceVersion."""
        match_labels, match_fields = label_selector(labels), field_selector(fields)
        with self.lock:
            items = [self._view(rt, obj, version) for key, obj in sorted(self.objects.items())
                     if key[:2] == (rt.group, rt.plural) and (namespace is None or key[2] == namespace)
                     and match_labels((obj.get("metadata") or {}).get("labels") or {}) and match_fields(obj)]
            return {"apiVersion": rt.api_version(version), "kind": f"{rt.kind}List",
                    "metadata": {"resourceVersion": str(self.rv)}, "items": items}

    # -- writes
    def create(self, rt: ResourceType, namespace: Optional[str], body: Any, *, manager: str = "unknown",
               version: Optional[str] = None, operation: str = "Update", apply_paths: Optional[set] = None) -> dict:
        """Create an object; 409 AlreadyExists if the name is taken, 404 if the namespace is missing."""
        if not isinstance(body, dict) or not isinstance(body.get("metadata", {}), dict):
            raise ApiError(400, "BadRequest", "the body must be an object with a metadata map")
        obj = copy.deepcopy(body)
        self._check_kind(rt, obj)
        meta = obj.setdefault("metadata", {})
        with self.lock:
            if rt.namespaced:
                if meta.get("namespace") and namespace and meta["namespace"] != namespace:
                    raise ApiError(400, "BadRequest", "the namespace of the provided object does not match the "
                                                      "namespace sent on the request")
                namespace = namespace or meta.get("namespace")
                self._require_namespace(rt, namespace)
                meta["namespace"] = namespace
            else:
                meta.pop("namespace", None)
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + "".join(random.choices(string.ascii_lowercase + string.digits,
                                                                             k=5))
            name = meta.get("name") or ""
            if not _NAME_RE.match(name) or len(name) > 253:
                raise ApiError(422, "Invalid", f'{rt.kind} "{name}" is invalid: metadata.name: a lowercase RFC 1123 '
                                               "subdomain is required")
            key = self._key(rt, namespace, name)
            if key in self.objects:
                what = f"{rt.plural}.{rt.group}" if rt.group else rt.plural
                raise ApiError(409, "AlreadyExists", f'{what} "{name}" already exists',
                               {"name": name, "group": rt.group, "kind": rt.plural})
            for f in _SERVER_META:
                meta.pop(f, None)
            meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
            obj["apiVersion"], obj["kind"] = rt.api_version(version), rt.kind
            if rt.status:
                obj.pop("status", None)
            if (rt.group, rt.plural) == _NAMESPACES:
                obj["status"] = {"phase": "Active"}
            if (rt.group, rt.plural) == _CRDS:
                self._validate_crd(obj)
            managers = {(manager, operation, None): set(apply_paths if apply_paths is not None
                                                        else _tracked(obj, None, rt.status))}
            self._stamp_managers(obj, managers, rt.api_version(version), None)
            created = self._commit(rt, key, None, obj, "ADDED")
            if (rt.group, rt.plural) == _CRDS:
                created = self._establish_crd(rt, key, created)
            return self._view(rt, created, version)

    def replace(self, rt: ResourceType, namespace: Optional[str], name: str, body: Any, *,
                subresource: Optional[str] = None, manager: str = "unknown", version: Optional[str] = None) -> dict:
        """PUT: replace the object (or its status); 409 Conflict on a stale ``metadata.resourceVersion``."""
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body must be an object")
        self._check_kind(rt, body)
        with self.lock:
            old = self._existing(rt, namespace, name)
            meta = body.get("metadata") or {}
            if meta.get("name", name) != name:
                raise ApiError(400, "BadRequest", "the name of the object does not match the name on the URL")
            self._precondition(rt, old, meta.get("resourceVersion"))
            new = self._combine(rt, old, body, subresource)
            managers = self._managers(old)
            self._record_update(managers, rt, old, new, manager, subresource)
            return self._view(rt, self._update(rt, old, new, managers, version), version)

    def patch(self, rt: ResourceType, namespace: Optional[str], name: str, patch_type: str, body: Any, *,
              subresource: Optional[str] = None, manager: Optional[str] = None, force: bool = False,
              version: Optional[str] = None) -> tuple[dict, bool]:
        """PATCH with a merge, JSON, strategic-merge (built-ins) or apply patch.

        Returns:
            (the object, whether it was created: only an apply creates).
        """
        with self.lock:
            if patch_type == APPLY_PATCH:
                return self._apply(rt, namespace, name, body, subresource=subresource, manager=manager,
                                   force=force, version=version)
            old = self._existing(rt, namespace, name)
            if patch_type == JSON_PATCH:
                patched = json_patch(old, body)
            elif patch_type == MERGE_PATCH or (patch_type == STRATEGIC_PATCH and not rt.crd):
                if not isinstance(body, dict):
                    raise ApiError(400, "BadRequest", "a merge patch must be a JSON object")
                self._precondition(rt, old, (body.get("metadata") or {}).get("resourceVersion"))
                patched = merge_patch(old, body)
            else:
                raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - "
                                                            f"accepted media types include: {JSON_PATCH}, "
                                                            f"{MERGE_PATCH}, {APPLY_PATCH}")
            if not isinstance(patched, dict):
                raise ApiError(422, "Invalid", "the patched object is not a JSON object")
            if (patched.get("metadata") or {}).get("name", name) != name:
                raise ApiError(400, "BadRequest", "a patch cannot change metadata.name")
            new = self._combine(rt, old, patched, subresource)
            managers = self._managers(old)
            self._record_update(managers, rt, old, new, manager or "unknown", subresource)
            return self._view(rt, self._update(rt, old, new, managers, version), version), False

    def _apply(self, rt: ResourceType, namespace: Optional[str], name: str, cfg: Any, *,
               subresource: Optional[str], manager: Optional[str], force: bool,
               version: Optional[str]) -> tuple[dict, bool]:
        if not manager:
            raise ApiError(400, "BadRequest", "PatchOptions.meta.k8s.io is invalid: fieldManager: Required value: "
                                              "is required for apply patch")
        if not isinstance(cfg, dict) or not cfg.get("apiVersion") or not cfg.get("kind"):
            raise ApiError(400, "BadRequest", "an apply configuration needs apiVersion and kind")
        self._check_kind(rt, cfg)
        meta = cfg.get("metadata") or {}
        if meta.get("name", name) != name:
            raise ApiError(400, "BadRequest", "the name of the object does not match the name on the URL")
        if rt.namespaced and meta.get("namespace", namespace) != namespace:
            raise ApiError(400, "BadRequest", "the namespace of the object does not match the namespace on the URL")
        cfg = copy.deepcopy(cfg)
        if subresource != "status" and rt.status:
            cfg.pop("status", None)
        paths = _tracked(cfg, subresource, rt.status)
        key = self._key(rt, namespace, name)
        old = self.objects.get(key)
        if old is None:
            if subresource:
                raise _not_found(rt, name)
            body = dict(cfg, metadata=dict(meta, name=name))
            return self.create(rt, namespace, body, manager=manager, version=version, operation="Apply",
                               apply_paths=set(paths)), True
        self._precondition(rt, old, meta.get("resourceVersion"))
        managers = self._managers(old)
        me = (manager, "Apply", subresource)
        conflicts = []
        for owner, owned in managers.items():
            if owner == me or owner[2] != subresource:
                continue
            for path, value in paths.items():
                clash = [q for q in owned if _overlaps(path, q)]
                if clash and _get_path(old, path) != value:
                    conflicts.append((owner, path, clash))
        if conflicts and not force:
            causes = [{"type": "FieldManagerConflict", "message": f'conflict with "{owner[0]}"',
                       "field": "." + ".".join(path)} for owner, path, _ in conflicts]
            raise ApiError(409, "Conflict", f"Apply failed with {len(causes)} conflict(s)",
                           {"name": name, "group": rt.group, "kind": rt.plural, "causes": causes})
        for owner, _, clash in conflicts:
            managers[owner].difference_update(clash)
        new = copy.deepcopy(old)
        for path in managers.get(me, set()) - set(paths):
            if not any(_overlaps(path, q) for owner, owned in managers.items() if owner != me for q in owned):
                _remove_path(new, path)
        if subresource == "status":
            new["status"] = merge_patch(new.get("status"), cfg.get("status") or {})
        else:
            for field_name, value in cfg.items():
                if field_name in ("apiVersion", "kind"):
                    continue
                if field_name == "metadata":
                    owned_meta = {k: v for k, v in (value or {}).items() if k in _OWNED_META}
                    new["metadata"] = merge_patch(new["metadata"], owned_meta)
                else:
                    new[field_name] = merge_patch(new.get(field_name), value)
        managers[me] = set(paths)
        return self._view(rt, self._update(rt, old, new, managers, version), version), False

    def delete(self, rt: ResourceType, namespace: Optional[str], name: str, *, propagation: str = "Background",
               preconditions: Optional[dict] = None, version: Optional[str] = None) -> dict:
        """Delete an object (or start its deletion when it has finalizers), then collect its dependents."""
        with self.lock:
            old = self._existing(rt, namespace, name)
            pre = preconditions or {}
            if pre.get("uid") and pre["uid"] != old["metadata"]["uid"]:
                raise ApiError(409, "Conflict", "Precondition failed: UID in precondition does not match")
            if pre.get("resourceVersion") and pre["resourceVersion"] != old["metadata"]["resourceVersion"]:
                raise ApiError(409, "Conflict", "Precondition failed: ResourceVersion in precondition does not "
                                                "match")
            key = self._key(rt, namespace, name)
            if old["metadata"].get("finalizers"):
                if old["metadata"].get("deletionTimestamp"):
                    return self._view(rt, old, version)
                new = copy.deepcopy(old)
                new["metadata"].update(deletionTimestamp=_now(), deletionGracePeriodSeconds=0,
                                       generation=old["metadata"].get("generation", 1) + 1)
                return self._view(rt, self._commit(rt, key, old, new, "MODIFIED"), version)
            return self._view(rt, self._remove(rt, key, old, propagation), version)

    # -- internals of writes
    def _check_kind(self, rt: ResourceType, body: dict) -> None:
        if body.get("kind") not in (None, rt.kind):
            raise ApiError(400, "BadRequest", f"kind {body.get('kind')!r} does not match the resource {rt.plural}")
        av = body.get("apiVersion")
        if av is not None and av not in [rt.api_version(v) for v in rt.versions]:
            raise ApiError(400, "BadRequest", f"apiVersion {av!r} is not served for {rt.plural}")

    @staticmethod
    def _precondition(rt: ResourceType, old: dict, rv: Optional[str]) -> None:
        if rv and rv != old["metadata"]["resourceVersion"]:
            what = f"{rt.plural}.{rt.group}" if rt.group else rt.plural
            raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {what} "{old["metadata"]["name"]}": '
                                            "the object has been modified; please apply your changes to the latest "
                                            "version and try again",
                           {"name": old["metadata"]["name"], "group": rt.group, "kind": rt.plural})

    @staticmethod
    def _combine(rt: ResourceType, old: dict, candidate: dict, subresource: Optional[str]) -> dict:
        # What a write may change: only status through /status; all but status otherwise.
        if subresource == "status":
            new = copy.deepcopy(old)
            if candidate.get("status") is None:
                new.pop("status", None)
            else:
                new["status"] = copy.deepcopy(candidate["status"])
            return new
        new = copy.deepcopy(candidate)
        new["apiVersion"], new["kind"] = old["apiVersion"], old["kind"]
        if rt.status:
            new.pop("status", None)
            if "status" in old:
                new["status"] = copy.deepcopy(old["status"])
        meta = new.setdefault("metadata", {})
        for f in _SERVER_META + ("name", "namespace"):
            meta.pop(f, None)
            if f in old["metadata"]:
                meta[f] = copy.deepcopy(old["metadata"][f])
        return new

    def _update(self, rt: ResourceType, old: dict, new: dict, managers: dict, version: Optional[str]) -> dict:
        key = self._key(rt, old["metadata"].get("namespace"), old["metadata"]["name"])
        if _spec_part(new) != _spec_part(old):
            new["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
        self._stamp_managers(new, managers, rt.api_version(version), old)
        if (rt.group, rt.plural) == _CRDS:
            self._validate_crd(new)
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            return self._remove(rt, key, new, "Background")
        if new == old:
            return old
        committed = self._commit(rt, key, old, new, "MODIFIED")
        if (rt.group, rt.plural) == _CRDS:
            committed = self._establish_crd(rt, key, committed)
        return committed

    def _remove(self, rt: ResourceType, key: tuple, obj: dict, propagation: str) -> dict:
        if _DRY_RUN.get():
            raise _Candidate(obj, None)
        gone = self._commit(rt, key, obj, copy.deepcopy(obj), "DELETED")
        if (rt.group, rt.plural) == _CRDS:
            self._drop_crd(obj)
        if (rt.group, rt.plural) == _NAMESPACES:
            for k in [k for k in self.objects if k[2] == obj["metadata"]["name"]]:
                if k in self.objects:
                    self._remove(self.types[k[:2]], k, self.objects[k], "Background")
        self._collect(obj["metadata"]["uid"], propagation)
        return gone

    def _collect(self, uid: str, propagation: str) -> None:
        # Garbage collection: dependents of a deleted owner go when none of their owners is left.
        alive = {o["metadata"]["uid"] for o in self.objects.values()}
        for key, obj in list(self.objects.items()):
            refs = obj["metadata"].get("ownerReferences") or []
            if key not in self.objects or not any(r.get("uid") == uid for r in refs):
                continue
            rt = self.types[key[:2]]
            if propagation == "Orphan":
                new = copy.deepcopy(obj)
                new["metadata"]["ownerReferences"] = [r for r in refs if r.get("uid") != uid]
                if not new["metadata"]["ownerReferences"]:
                    del new["metadata"]["ownerReferences"]
                self._commit(rt, key, obj, new, "MODIFIED")
            elif not any(r.get("uid") in alive for r in refs if r.get("uid") != uid):
                if obj["metadata"].get("finalizers"):
                    if not obj["metadata"].get("deletionTimestamp"):
                        new = copy.deepcopy(obj)
                        new["metadata"]["deletionTimestamp"] = _now()
                        self._commit(rt, key, obj, new, "MODIFIED")
                else:
                    self._remove(rt, key, obj, "Background")

    # -- CRDs
    @staticmethod
    def _validate_crd(obj: dict) -> None:
        spec = obj.get("spec") or {}
        names = spec.get("names") or {}
        group, plural, kind = spec.get("group"), names.get("plural"), names.get("kind")
        versions = [v for v in spec.get("versions") or [] if v.get("served", True)]
        problems = []
        if not group or not plural or not kind:
            problems.append("spec.group, spec.names.plural and spec.names.kind are required")
        elif obj["metadata"].get("name") != f"{plural}.{group}":
            problems.append(f"metadata.name must be spec.names.plural+\".\"+spec.group ({plural}.{group})")
        if spec.get("scope") not in ("Namespaced", "Cluster"):
            problems.append("spec.scope must be Namespaced or Cluster")
        if not versions:
            problems.append("spec.versions must have a served version")
        if problems:
            raise ApiError(422, "Invalid", f'CustomResourceDefinition "{obj["metadata"].get("name")}" is invalid: '
                                           + "; ".join(problems))

    def _establish_crd(self, crd_type: ResourceType, key: tuple, crd: dict) -> dict:
        spec = crd["spec"]
        names = spec["names"]
        versions = [v for v in spec["versions"] if v.get("served", True)]
        rt = ResourceType(
            group=spec["group"], versions=tuple(v["name"] for v in versions), plural=names["plural"],
            kind=names["kind"], namespaced=spec["scope"] == "Namespaced",
            status=any((v.get("subresources") or {}).get("status") is not None for v in versions),
            short_names=tuple(names.get("shortNames") or ()), categories=tuple(names.get("categories") or ()),
            crd=True, scale=next(((sc.get("specReplicasPath", ""), sc.get("statusReplicasPath", ""),
                                   sc.get("labelSelectorPath", ""))
                                  for v in versions for sc in [(v.get("subresources") or {}).get("scale")] if sc), ()))
        self.types[(rt.group, rt.plural)] = rt
        storage = next((v for v in spec["versions"] if v.get("storage")), versions[0] if versions else None)
        schema = ((storage or {}).get("schema") or {}).get("openAPIV3Schema")
        if schema:
            self.crd_schemas[(rt.group, rt.plural)] = schema
        status = {"acceptedNames": copy.deepcopy(names),
                  "storedVersions": [v["name"] for v in spec["versions"] if v.get("storage")],
                  "conditions": [{"type": t, "status": "True", "reason": r, "message": m,
                                  "lastTransitionTime": _now()}
                                 for t, r, m in (("NamesAccepted", "NoConflicts", "no conflicts found"),
                                                 ("Established", "InitialNamesAccepted",
                                                  "the initial names have been accepted"))]}
        old_status = dict(crd.get("status") or {})
        if {k: v for k, v in old_status.items() if k != "conditions"} == \
                {k: v for k, v in status.items() if k != "conditions"} and old_status.get("conditions"):
            return crd
        new = copy.deepcopy(crd)
        new["status"] = status
        return self._commit(crd_type, key, crd, new, "MODIFIED")

    def _drop_crd(self, crd: dict) -> None:
        spec = crd.get("spec") or {}
        type_key = (spec.get("group"), (spec.get("names") or {}).get("plural"))
        rt = self.types.get(type_key)
        if rt is None or not rt.crd:
            return
        for key in [k for k in self.objects if k[:2] == type_key]:
            if key in self.objects:
                self._remove(rt, key, self.objects[key], "Background")
        del self.types[type_key]

    # -- watches
    def open_watch(self, watch: _Watch, since: Optional[str], initial: bool) -> list[tuple[str, dict]]:
        """Register a watch; returns the events to send before the live ones.

        Raises:
            ApiError: 410 Gone (sent as an ``ERROR`` event) when ``since`` has left the history.
        """
        with self.lock:
            out: list[tuple[str, dict]] = []
            if since in (None, "", "0") or initial:
                for key, obj in sorted(self.objects.items(), key=lambda kv: int(kv[1]["metadata"]["resourceVersion"])):
                    if key[:2] == (watch.rt.group, watch.rt.plural) and watch.matches(obj):
                        out.append(("ADDED", self._view(watch.rt, obj, watch.version)))
                if initial:
                    out.append(("BOOKMARK", self._bookmark(watch, {"k8s.io/initial-events-end": "true"})))
            else:
                try:
                    since_rv = int(since)
                except ValueError:
                    raise ApiError(400, "BadRequest", f"invalid resourceVersion {since!r}") from None
                if since_rv < self.expired_rv:
                    raise ApiError(410, "Expired", f"too old resource version: {since_rv} ({self.expired_rv + 1})")
                for ev in self.log:
                    if ev.rv > since_rv:
                        item = watch.translate(ev)
                        if item is not None:
                            out.append(item)
            self.watches.add(watch)
            return out

    def close_watch(self, watch: _Watch) -> None:
        """Forget a watch (its stream has ended)."""
        with self.lock:
            self.watches.discard(watch)

    def _bookmark(self, watch: _Watch, annotations: Optional[dict] = None) -> dict:
        meta: dict = {"resourceVersion": str(self.rv)}
        if annotations:
            meta["annotations"] = annotations
        return {"apiVersion": watch.rt.api_version(watch.version), "kind": watch.rt.kind, "metadata": meta}

    def bookmark(self, watch: _Watch) -> dict:
        """A ``BOOKMARK`` object at the current resourceVersion."""
        with self.lock:
            return self._bookmark(watch)


# ------------------------------------------------------------------ the HTTP server
@dataclass
class Fault:
    """A pending injected failure: the next ``times`` matching requests answer ``code``."""

    plural: str
    code: int
    times: int
    verbs: tuple[str, ...]
    subresource: Optional[str] = None
    namespace: Optional[str] = None
    name: Optional[str] = None
    hits: list = field(default_factory=list)


@dataclass
class RequestRecord:
    """One request the stand-in answered."""

    method: str
    path: str
    query: dict
    content_type: str
    status: int
    verb: str = ""


_REASONS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 409: "Conflict",
            410: "Gone", 422: "Invalid", 429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable",
            504: "Timeout"}


def _selector_matches(selector: dict, labels: dict) -> bool:
    """A ``LabelSelector`` (``matchLabels``, ``matchExpressions`` with In, NotIn, Exists,
    DoesNotExist) against ``labels``; the empty selector matches everything."""
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e.get("key"), e.get("operator"), e.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def _status_response(e: ApiError) -> web.Response:
    """An error as the real server sends it: a ``Status`` body with ``Content-Type:
    application/json`` exactly (no charset; the Python client's ``summary()`` reads the
    message only then)."""
    return web.Response(body=json.dumps(e.status()).encode(), status=e.code,
                        headers={"Content-Type": "application/json"})


class StandIn:
    """The stand-in API server on ``http://127.0.0.1:PORT``, run in a background thread.

    Use as a context manager (or :meth:`start` / :meth:`stop`). :attr:`store` holds the
    state; :meth:`fail_next` injects failures; :attr:`requests` logs what was asked.
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, history: int = 5000, third_party: bool = True,
                 bookmark_interval: float = 30.0, users: Optional[dict[str, Authorizer]] = None,
                 services: Optional[dict[tuple[str, str], tuple[str, int]]] = None):
        self.store = Store(history=history, third_party=third_party)
        #: ``(namespace, Service name) -> (host, port)``: where a webhook's ``clientConfig.service``
        #: is reached (the stand-in has no cluster network); the TLS name checked is still
        #: ``<name>.<namespace>.svc``
        self.services = services or {}
        #: ``(webhook name, operation, resource, object name)`` of every webhook call made
        self.webhook_calls: list[tuple[str, str, str, str]] = []
        #: bearer token -> the RBAC-restricted user it authenticates (see the module doc)
        self.users = users
        self.host, self.port = host, port
        self.bookmark_interval = bookmark_interval
        self.requests: deque[RequestRecord] = deque(maxlen=20000)
        self.faults: list[Fault] = []
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._runner: Optional[web.AppRunner] = None
        self._stopping: Optional[asyncio.Event] = None

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:40123``."""
        return f"http://{self.host}:{self.port}"

    # -- lifecycle
    def start(self) -> str:
        """Start serving in a daemon thread; returns :attr:`url`."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._start_site())
            except BaseException as e:  # noqa: BLE001 - reported to start()
                failure.append(e)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=serve, name="apiserver-standin", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        return self.url

    async def _start_site(self) -> None:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._stopping = asyncio.Event()
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def compact(self) -> None:
        """Drop the whole event history and end every open watch stream, as an API server
        does after an etcd compaction or a restart: a watch resumed from a version older than
        the current one gets 410 Gone and must list again."""
        assert self._loop is not None
        with self.store.lock:
            self.store.log.clear()
            self.store.expired_rv = self.store.rv
            for watch in list(self.store.watches):
                watch.push(None)

    def stop(self) -> None:
        """Close every watch stream and stop the server."""
        if self._loop is None or self._thread is None:
            return

        async def shutdown() -> None:
            assert self._stopping is not None and self._runner is not None
            self._stopping.set()
            with self.store.lock:
                for watch in list(self.store.watches):
                    watch.push(None)
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop = self._thread = None

    def __enter__(self) -> "StandIn":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- test hooks
    def fail_next(self, plural: str, code: int = 500, *, times: int = 1, verbs: Iterable[str] = WRITE_VERBS,
                  subresource: Optional[str] = None, namespace: Optional[str] = None,
                  name: Optional[str] = None) -> Fault:
        """Make the next ``times`` requests of ``verbs`` to ``plural`` (optionally only its
        ``subresource``, ``namespace``, object ``name``) answer HTTP ``code`` without doing
        anything. Returns the :class:`Fault`; its ``hits`` list the requests it answered."""
        fault = Fault(plural, code, times, tuple(verbs), subresource, namespace, name)
        with self.store.lock:
            self.faults.append(fault)
        return fault

    def _fault_for(self, verb: str, plural: str, sub: Optional[str], namespace: Optional[str],
                   name: Optional[str]) -> Optional[Fault]:
        with self.store.lock:
            for fault in self.faults:
                if (fault.times > 0 and fault.plural == plural and verb in fault.verbs
                        and fault.subresource == sub
                        and fault.namespace in (None, namespace) and fault.name in (None, name)):
                    fault.times -= 1
                    fault.hits.append((verb, namespace, name))
                    return fault
        return None

    def http(self, method: str, path: str, body: Any = None, *, content_type: str = "application/json",
             query: Optional[dict] = None, timeout: float = 10.0) -> tuple[int, Any]:
        """A plain synchronous request to the stand-in (for tests): returns (HTTP status, JSON body)."""
        url = self.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        data = None if body is None else (body if isinstance(body, (bytes, str)) else json.dumps(body))
        if isinstance(data, str):
            data = data.encode()
        req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    # -- request handling
    async def _handle(self, request: web.Request) -> web.StreamResponse:
        record = RequestRecord(request.method, request.path, dict(request.query),
                               request.headers.get("Content-Type", ""), 0)
        try:
            auth = request.headers.get("Authorization", "")
            request[_USER] = None
            if auth.startswith("Bearer ") and self.users is not None:
                request[_USER] = self.users.get(auth[len("Bearer "):].strip())
                if request[_USER] is None:
                    raise ApiError(401, "Unauthorized", "Unauthorized")
            response = await self._dispatch(request, record)
        except ApiError as e:
            response = _status_response(e)
        except Exception as e:  # noqa: BLE001 - a stand-in bug: answer like an API server would
            logging.getLogger(__name__).exception("stand-in failure on %s %s", request.method, request.path)
            response = _status_response(ApiError(500, "InternalError", repr(e)))
        record.status = response.status
        self.requests.append(record)
        return response

    async def _dispatch(self, request: web.Request, record: RequestRecord) -> web.StreamResponse:
        path = request.path.rstrip("/") or "/"
        if path in ("/healthz", "/livez", "/readyz"):
            return web.Response(text="ok")
        if path == "/version":
            return web.json_response({"major": "1", "minor": "31", "gitVersion": "v1.31.0-argosy-standin",
                                      "platform": "linux/amd64"})
        parts = [urllib.parse.unquote(p) for p in path.strip("/").split("/")]
        groups = self.store.groups()
        if parts == ["api"]:
            return web.json_response({"kind": "APIVersions", "versions": groups.get("", []),
                                      "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0",
                                                                      "serverAddress": f"{self.host}:{self.port}"}]})
        if parts == ["apis"]:
            return web.json_response({"kind": "APIGroupList", "apiVersion": "v1",
                                      "groups": [self._group_doc(g, vs) for g, vs in sorted(groups.items()) if g]})
        if parts[0] == "api" and len(parts) >= 2:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[0] == "apis" and len(parts) >= 2:
            if len(parts) == 2:
                if parts[1] not in groups:
                    raise ApiError(404, "NotFound", "the server could not find the requested resource")
                return web.json_response(self._group_doc(parts[1], groups[parts[1]]))
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if not rest:
            if version not in groups.get(group, []):
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            return web.json_response(self._resource_list(group, version))

        namespace = None
        if rest[0] == "namespaces" and len(rest) >= 3 and not (len(rest) == 3 and rest[2] in ("status", "finalize")):
            namespace, rest = rest[1], rest[2:]
        if len(rest) > 3:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        plural, name, sub = rest[0], (rest[1] if len(rest) > 1 else None), (rest[2] if len(rest) > 2 else None)
        rt = self.store.resolve(group, version, plural)
        if (namespace is not None and not rt.namespaced) or (
                sub is not None and not ((sub == "status" and rt.status) or (sub == "scale" and rt.scale))):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if rt.namespaced and namespace is None and not (name is None and request.method == "GET"):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return await self._serve(request, record, rt, version, namespace, plural, name, sub)

    async def _serve(self, request: web.Request, record: RequestRecord, rt: ResourceType, version: str,
                     namespace: Optional[str], plural: str, name: Optional[str],
                     sub: Optional[str]) -> web.StreamResponse:
        q = request.query
        method = request.method
        if name is None:
            verb = {"GET": "watch" if q.get("watch") in ("true", "1") else "list", "POST": "create"}.get(method)
        else:
            verb = {"GET": "get", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(method)
        if verb is None:
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported here")
        record.verb = verb
        if verb in WRITE_VERBS and q.get("dryRun"):
            raise ApiError(400, "BadRequest", "dryRun is not supported by the stand-in")
        user: Optional[Authorizer] = request.get(_USER)
        if user is not None and not user.allows(verb, rt.group, plural, sub, namespace, name):
            raise ApiError(403, "Forbidden", user.forbidden(verb, rt.group, plural, sub, namespace, name))
        fault = self._fault_for(verb, plural, sub, namespace, name)  # reads too, when a test asks for them
        if fault is not None:
            reason = _REASONS.get(fault.code, "InternalError")
            raise ApiError(fault.code, reason, f"injected {fault.code} {reason} for {verb} {plural}")
        CALLER.set(user)  # this request's task: the store's admission checks read it
        manager = q.get("fieldManager") or request.headers.get("User-Agent", "unknown").split("/")[0] or "unknown"
        store = self.store
        if sub == "scale":
            return await self._scale(request, rt, version, namespace, name, verb, manager, user)
        if verb == "watch":
            return await self._watch(request, rt, version, namespace)
        if verb == "list":
            return web.json_response(store.list(rt, namespace, q.get("labelSelector", ""),
                                                q.get("fieldSelector", ""), version))
        if verb == "get":
            return web.json_response(store.get(rt, namespace, name, version))
        body = await self._body(request)
        if verb in ("create", "update", "patch"):
            configs = self._webhook_configurations()
            if configs:
                await self._validating_webhooks(configs, request, rt, version, namespace, name, sub, verb, body,
                                                manager, user)
        if verb == "create":
            return web.json_response(store.create(rt, namespace, body, manager=manager, version=version), status=201)
        if verb == "update":
            return web.json_response(store.replace(rt, namespace, name, body, subresource=sub, manager=manager,
                                                   version=version))
        if verb == "patch":
            ctype = request.headers.get("Content-Type", "").split(";")[0].strip()
            obj, created = store.patch(rt, namespace, name, ctype, body, subresource=sub,
                                       manager=q.get("fieldManager") or (None if ctype == APPLY_PATCH else manager),
                                       force=q.get("force") in ("true", "1"), version=version)
            return web.json_response(obj, status=201 if created else 200)
        options = body if isinstance(body, dict) else {}
        propagation = q.get("propagationPolicy") or options.get("propagationPolicy") or "Background"
        if q.get("orphanDependents") == "true" or options.get("orphanDependents") is True:
            propagation = "Orphan"
        return web.json_response(store.delete(rt, namespace, name, propagation=propagation,
                                              preconditions=options.get("preconditions"), version=version))

    # -- the scale subresource of custom resources
    async def _scale(self, request: web.Request, rt: ResourceType, version: str, namespace: Optional[str], name: str,
                     verb: str, manager: str, user: Optional[Authorizer]) -> web.Response:
        """``/scale`` of a CRD that declares it: an ``autoscaling/v1`` Scale whose
        ``spec.replicas`` is the object's ``specReplicasPath``. GET reads it; PUT and
        merge PATCH write that one field of the object, which is validated whole (schema,
        CEL, transition rules) as any update, after the validating webhooks whose rules
        name ``<plural>/scale`` reviewed the Scale (``kind`` ``autoscaling/v1`` Scale,
        ``subResource`` ``scale``, the old and new Scale as objects)."""
        current = self.store.get(rt, namespace, name, version)
        old_scale = _scale_view(rt, current)
        if verb == "get":
            return web.json_response(old_scale)
        if verb not in ("update", "patch"):
            raise ApiError(405, "MethodNotAllowed", f"{verb} is not supported on the scale subresource")
        body = await self._body(request)
        if verb == "patch":
            ctype = request.headers.get("Content-Type", "").split(";")[0].strip()
            if ctype not in (MERGE_PATCH, STRATEGIC_PATCH):
                raise ApiError(415, "UnsupportedMediaType", f"the stand-in's scale subresource takes merge patches, "
                                                            f"not {ctype}")
            new_scale = merge_patch(copy.deepcopy(old_scale), body)
        else:
            new_scale = body
            want_rv = ((body or {}).get("metadata") or {}).get("resourceVersion") if isinstance(body, dict) else None
            if want_rv and want_rv != current["metadata"]["resourceVersion"]:
                raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {rt.plural}.{rt.group} "{name}": '
                                                "the object has been modified; please apply your changes to the "
                                                "latest version and try again")
        replicas = ((new_scale or {}).get("spec") or {}).get("replicas") if isinstance(new_scale, dict) else None
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
            raise ApiError(422, "Invalid", f'Scale.autoscaling "{name}" is invalid: spec.replicas: Invalid value: '
                                           f"{replicas!r}: must be greater than or equal to 0")
        new_scale = {**old_scale, "spec": {"replicas": replicas}}
        obj = copy.deepcopy(current)
        _set_path(obj, rt.scale[0], replicas)
        configs = self._webhook_configurations()
        if configs and replicas != old_scale["spec"]["replicas"]:
            token = _DRY_RUN.set(True)  # validated first, as the real server validates before admission
            try:
                self.store.replace(rt, namespace, name, obj, manager=manager, version=version)
            except _Candidate:
                pass
            finally:
                _DRY_RUN.reset(token)
            await self._scale_webhooks(configs, rt, version, namespace, name, old_scale, new_scale, user)
        stored = self.store.replace(rt, namespace, name, obj, manager=manager, version=version)
        return web.json_response(_scale_view(rt, stored))

    async def _scale_webhooks(self, configs: list[dict], rt: ResourceType, version: str, namespace: Optional[str],
                              name: str, old_scale: dict, new_scale: dict, user: Optional[Authorizer]) -> None:
        req = {"uid": str(uuid.uuid4()),
               "kind": {"group": "autoscaling", "version": "v1", "kind": "Scale"},
               "resource": {"group": rt.group, "version": version, "resource": rt.plural},
               "subResource": "scale",
               "requestKind": {"group": "autoscaling", "version": "v1", "kind": "Scale"},
               "requestResource": {"group": rt.group, "version": version, "resource": rt.plural},
               "requestSubResource": "scale",
               "name": name, "namespace": namespace, "operation": "UPDATE", "userInfo": _user_info(user),
               "object": new_scale, "oldObject": old_scale, "dryRun": False,
               "options": {"kind": "UpdateOptions", "apiVersion": "meta.k8s.io/v1"}}
        ns_labels = self._namespace_labels(namespace)
        for config in configs:
            for hook in config.get("webhooks") or []:
                if self._selects(hook, rt, version, "scale", "UPDATE", ns_labels, old_scale, new_scale, req):
                    await self._call_webhook(hook, req)

    def _namespace_labels(self, ns: Optional[str]) -> dict:
        """A namespace's labels with ``kubernetes.io/metadata.name`` (what namespaceSelector reads)."""
        with self.store.lock:
            ns_obj = self.store.objects.get(("", "namespaces", "", ns)) if ns else None
        labels = dict(((ns_obj or {}).get("metadata") or {}).get("labels") or {})
        if ns:
            labels.setdefault("kubernetes.io/metadata.name", ns)
        return labels

    # -- validating admission webhooks
    def _webhook_configurations(self) -> list[dict]:
        """Copies of the stored ValidatingWebhookConfigurations."""
        with self.store.lock:
            return [copy.deepcopy(o) for k, o in self.store.objects.items()
                    if k[:2] == ("admissionregistration.k8s.io", "validatingwebhookconfigurations")]

    def _dry_write(self, request: web.Request, rt: ResourceType, version: str, namespace: Optional[str],
                   name: Optional[str], sub: Optional[str], verb: str, body: Any,
                   manager: str) -> Optional[_Candidate]:
        """The write computed (schemas, immutability, RBAC admission included) but not
        stored; None when it would change nothing."""
        q = request.query
        token = _DRY_RUN.set(True)
        try:
            if verb == "create":
                self.store.create(rt, namespace, body, manager=manager, version=version)
            elif verb == "update":
                self.store.replace(rt, namespace, name, body, subresource=sub, manager=manager, version=version)
            else:
                ctype = request.headers.get("Content-Type", "").split(";")[0].strip()
                self.store.patch(rt, namespace, name, ctype, body, subresource=sub,
                                 manager=q.get("fieldManager") or (None if ctype == APPLY_PATCH else manager),
                                 force=q.get("force") in ("true", "1"), version=version)
        except _Candidate as c:
            return c
        finally:
            _DRY_RUN.reset(token)
        return None

    async def _validating_webhooks(self, configs: list[dict], request: web.Request, rt: ResourceType, version: str,
                                   namespace: Optional[str], name: Optional[str], sub: Optional[str], verb: str,
                                   body: Any, manager: str, user: Optional[Authorizer]) -> None:
        """Call every validating webhook whose rules select this write, as the real
        server does after validation and before storing: ``rules`` (operations, API
        groups, versions, resources with ``resource/subresource``, scope),
        ``namespaceSelector`` and ``objectSelector`` (label selectors; namespaces carry
        ``kubernetes.io/metadata.name``), ``matchConditions`` (CEL over ``object``,
        ``oldObject``, ``request``); then an ``AdmissionReview`` v1 POSTed over HTTPS to
        ``clientConfig`` (``url``, or ``service`` through :attr:`services`), the server
        certificate verified against ``caBundle`` for the Service's DNS name, within
        ``timeoutSeconds``. A denial is the webhook's code (403 by default) with
        ``admission webhook "<name>" denied the request: <message>``; a call that fails is
        500 under ``failurePolicy: Fail`` and ignored under ``Ignore``. Updates of objects
        being deleted (finalizer removal) are reviewed like any update. Differences from
        the real server: the write is computed again when stored (a change in between is
        not re-reviewed, and a ``generateName`` name or ``uid`` reviewed is not the one
        stored), and a write that changes nothing is not reviewed.

        Raises:
            ApiError: a denial or a failed call (see above).
        """
        candidate = self._dry_write(request, rt, version, namespace, name, sub, verb, body, manager)
        if candidate is None or candidate.new is None:
            return
        old, new = candidate.old, candidate.new
        operation = "CREATE" if old is None else "UPDATE"
        ns = new["metadata"].get("namespace")
        ns_labels = self._namespace_labels(ns)
        obj_view = self.store._view(rt, new, version)
        old_view = self.store._view(rt, old, version) if old is not None else None
        req = {"uid": str(uuid.uuid4()),
               "kind": {"group": rt.group, "version": version, "kind": rt.kind},
               "resource": {"group": rt.group, "version": version, "resource": rt.plural},
               "requestKind": {"group": rt.group, "version": version, "kind": rt.kind},
               "requestResource": {"group": rt.group, "version": version, "resource": rt.plural},
               "name": new["metadata"].get("name"), "namespace": ns, "operation": operation,
               "userInfo": _user_info(user),
               "object": obj_view, "oldObject": old_view, "dryRun": False,
               "options": {"kind": "CreateOptions" if operation == "CREATE" else "UpdateOptions",
                           "apiVersion": "meta.k8s.io/v1"}}
        if sub:
            req["subResource"] = sub
        for config in configs:
            for hook in config.get("webhooks") or []:
                if not self._selects(hook, rt, version, sub, operation, ns_labels, old_view, obj_view, req):
                    continue
                await self._call_webhook(hook, req)

    @staticmethod
    def _rule_matches(rule: dict, rt: ResourceType, version: str, sub: Optional[str], operation: str) -> bool:
        def has(values, want):
            return "*" in (values or []) or want in (values or [])

        target = f"{rt.plural}/{sub}" if sub else rt.plural
        resources = rule.get("resources") or []
        res_ok = target in resources or "*/*" in resources or (not sub and "*" in resources) or bool(
            sub and f"*/{sub}" in resources)
        scope = rule.get("scope", "*")
        scope_ok = scope == "*" or (scope == "Namespaced") == rt.namespaced
        return (has(rule.get("operations"), operation) and has(rule.get("apiGroups"), rt.group)
                and has(rule.get("apiVersions"), version) and res_ok and scope_ok)

    def _selects(self, hook: dict, rt: ResourceType, version: str, sub: Optional[str], operation: str,
                 ns_labels: dict, old: Optional[dict], new: dict, req: dict) -> bool:
        if not any(self._rule_matches(r, rt, version, sub, operation) for r in hook.get("rules") or []):
            return False
        if rt.namespaced and not _selector_matches(hook.get("namespaceSelector") or {}, ns_labels):
            return False
        obj_sel = hook.get("objectSelector") or {}
        if obj_sel and not any(_selector_matches(obj_sel, ((o or {}).get("metadata") or {}).get("labels") or {})
                               for o in (new, old) if o is not None):
            return False
        if hook.get("matchConditions"):
            import celpy

            env = celpy.Environment()
            act = {"object": celpy.json_to_cel(new), "oldObject": celpy.json_to_cel(old),
                   "request": celpy.json_to_cel({k: v for k, v in req.items() if k not in ("object", "oldObject")})}
            for cond in hook["matchConditions"]:
                result = env.program(env.compile(cond["expression"])).evaluate(act)
                if not bool(result):
                    return False
        return True

    async def _call_webhook(self, hook: dict, req: dict) -> None:
        import ssl as ssl_mod

        import aiohttp

        name = hook.get("name", "")
        self.webhook_calls.append((name, req["operation"], req["resource"]["resource"], req["name"]))
        cc = hook.get("clientConfig") or {}
        policy = hook.get("failurePolicy", "Fail")
        timeout = float(hook.get("timeoutSeconds", 10))
        try:
            ca = base64.b64decode(cc.get("caBundle") or "").decode() or None
            tls = ssl_mod.create_default_context(cadata=ca) if ca else ssl_mod.create_default_context()
            if "url" in cc:
                url, server_name = cc["url"], None
            else:
                svc = cc.get("service") or {}
                host, port = self.services.get((svc.get("namespace"), svc.get("name")), (None, None))
                if host is None:
                    raise ConnectionError(f'service "{svc.get("name")}" not found')
                url = f"https://{host}:{port}{svc.get('path') or '/'}"
                server_name = f"{svc.get('name')}.{svc.get('namespace')}.svc"
            review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": req}
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
                async with session.post(url, json=review, ssl=tls, server_hostname=server_name) as resp:
                    if resp.status != 200:
                        raise ConnectionError(f"the server responded with {resp.status}")
                    answer = await resp.json(content_type=None)
            response = (answer or {}).get("response") or {}
            if response.get("uid") != req["uid"]:
                raise ConnectionError("expected response.uid to match the request.uid")
        except Exception as e:  # noqa: BLE001 - a call that failed, as the real server reports it
            if policy == "Ignore":
                return
            raise ApiError(500, "InternalError", f'Internal error occurred: failed calling webhook "{name}": '
                                                 f"{type(e).__name__}: {e}") from None
        if not response.get("allowed"):
            st = response.get("status") or {}
            code = int(st.get("code") or 400)  # the real server's default for a denial without a code
            why = (f'denied the request: {st["message"]}' if st.get("message")
                   else "denied the request without explanation")
            raise ApiError(code, st.get("reason") or _REASONS.get(code, "BadRequest"),
                           f'admission webhook "{name}" {why}')

    @staticmethod
    async def _body(request: web.Request) -> Any:
        raw = await request.read()
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            pass
        if request.headers.get("Content-Type", "").startswith(APPLY_PATCH):
            try:
                return yaml.safe_load(raw)
            except yaml.YAMLError as e:
                raise ApiError(400, "BadRequest", f"invalid YAML: {e}") from None
        raise ApiError(400, "BadRequest", "the body is not valid JSON")

    async def _watch(self, request: web.Request, rt: ResourceType, version: str,
                     namespace: Optional[str]) -> web.StreamResponse:
        q = request.query
        watch = _Watch(rt, version, namespace, q.get("labelSelector", ""), q.get("fieldSelector", ""),
                       asyncio.get_running_loop())
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)

        async def send(kind: str, obj: dict) -> None:
            await response.write((json.dumps({"type": kind, "object": obj}) + "\n").encode())

        try:
            initial = self.store.open_watch(watch, q.get("resourceVersion"), q.get("sendInitialEvents") == "true")
        except ApiError as e:
            await send("ERROR", e.status())
            await response.write_eof()
            return response
        loop = asyncio.get_running_loop()
        timeout = float(q["timeoutSeconds"]) if q.get("timeoutSeconds") else None
        deadline = loop.time() + timeout if timeout else None
        bookmarks = q.get("allowWatchBookmarks") == "true"
        try:
            for kind, obj in initial:
                await send(kind, obj)
            while self._stopping is not None and not self._stopping.is_set():
                wait = self.bookmark_interval if bookmarks else None
                if deadline is not None:
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    wait = left if wait is None else min(wait, left)
                try:
                    item = await asyncio.wait_for(watch.queue.get(), wait)
                except asyncio.TimeoutError:
                    if bookmarks and (deadline is None or loop.time() < deadline):
                        await send("BOOKMARK", self.store.bookmark(watch))
                    continue
                if item is None:
                    break
                await send(*item)
            await response.write_eof()
        except ConnectionResetError:
            pass
        finally:
            self.store.close_watch(watch)
        return response

    # -- discovery documents
    @staticmethod
    def _group_doc(group: str, versions: list[str]) -> dict:
        gvs = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        return {"kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": gvs, "preferredVersion": gvs[0]}

    def _resource_list(self, group: str, version: str) -> dict:
        resources = []
        verbs = ["create", "delete", "get", "list", "patch", "update", "watch"]
        with self.store.lock:
            types = [rt for rt in self.store.types.values() if rt.group == group and version in rt.versions]
        for rt in sorted(types, key=lambda t: t.plural):
            entry = {"name": rt.plural, "singularName": rt.kind.lower(), "namespaced": rt.namespaced,
                     "kind": rt.kind, "verbs": verbs}
            if rt.short_names:
                entry["shortNames"] = list(rt.short_names)
            if rt.categories:
                entry["categories"] = list(rt.categories)
            resources.append(entry)
            if rt.status:
                resources.append({"name": f"{rt.plural}/status", "singularName": "", "namespaced": rt.namespaced,
                                  "kind": rt.kind, "verbs": ["get", "patch", "update"]})
        return {"kind": "APIResourceList", "apiVersion": "v1",
                "groupVersion": f"{group}/{version}" if group else version, "resources": resources}


def _main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Run the Kubernetes API stand-in (for tests; not a kube-apiserver)")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--crd", action="append", default=[], help="CRD YAML file to install at start")
    ns = parser.parse_args(argv)
    standin = StandIn(port=ns.port)
    standin.start()
    crds = standin.store.types[_CRDS]
    for path in ns.crd:
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if doc:
                    standin.store.create(crds, None, doc)
    print(f"stand-in API server on {standin.url} (Ctrl-C stops it)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        standin.stop()


if __name__ == "__main__":
    _main()
