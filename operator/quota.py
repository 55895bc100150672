"""GPU quota accounting as pure functions: which GPUQuotas apply, what is reserved, admission, caps.

Vocabulary (all counts are whole GPUs, the unit of ``resources.gpus``):

- a service's **reserved** GPUs are ``minReplicas x resources.gpus``: what it is guaranteed
  and what admission charges;
- its **possible** GPUs are ``maxReplicas x resources.gpus`` with an autoscaler
  (``minReplicas x gpus`` without one): what it could reach;
- a quota **applies** to an InferenceService when the quota covers its namespace (by name
  in ``spec.namespaces`` or by ``spec.namespaceSelector`` over the namespace's labels, with
  meta/v1 LabelSelector semantics) and, when the quota names a ``tenant``, the service's
  ``spec.tenant`` is that tenant. Every quota that applies binds: a service must fit all of
  them (several quotas over one namespace act as nested budgets).

Admission (:func:`admit`) charges reserved GPUs: the new or changed service's reserved GPUs
plus those of every *other* service already charged to the quota must not exceed
``spec.gpus`` (and, for a service with ``resources.gpuProduct`` named in ``perProduct``,
that product's limit).

The autoscaler cap (:func:`caps`) shares out what reservations leave free so that the sum
of possible GPUs over a quota's services never exceeds the quota: every service keeps its
``minReplicas`` (already admitted), then free GPUs are handed out one replica at a time,
round-robin over the services in (namespace, name) order, while a replica still fits every
quota (and per-product limit) that applies to its service. The result is deterministic, fair
between services, and needs no coordination between reconcile passes. A service whose
``minReplicas`` alone already exceeds a quota (admitted before the quota shrank) keeps
``minReplicas``; the per-namespace ResourceQuota is the backstop there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

import pydantic

from . import api


@dataclass(frozen=True)
class ServiceUsage:
    """What quota accounting needs from one InferenceService.

    Attributes:
        namespace, name: identity.
        tenant: ``spec.tenant`` (None when unset).
        gpus: ``resources.gpus`` per replica.
        product: ``resources.gpuProduct`` (None when unset).
        min_replicas: ``scaling.minReplicas``.
        max_replicas: the autoscaler's upper bound (``minReplicas`` without an autoscaler).
        ready_replicas: ready server pods (for ``gpusInUse``).
    """

    namespace: str
    name: str
    tenant: Optional[str]
    gpus: int
    product: Optional[str]
    min_replicas: int
    max_replicas: int
    ready_replicas: int = 0

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    @property
    def reserved(self) -> int:
        """Guaranteed GPUs: ``minReplicas x gpus``."""
        return self.min_replicas * self.gpus

    @property
    def possible(self) -> int:
        """GPUs at ``maxReplicas`` (before any cap)."""
        return self.max_replicas * self.gpus


def usage_of(isvc: api.InferenceService, ready_replicas: int = 0) -> ServiceUsage:
    """The :class:`ServiceUsage` of a parsed InferenceService."""
    s = isvc.spec.scaling
    top = s.max_replicas if (s.autoscaler != "none" and s.max_replicas is not None) else s.min_replicas
    return ServiceUsage(isvc.metadata.namespace, isvc.metadata.name, isvc.spec.tenant, isvc.spec.resources.gpus,
                        isvc.spec.resources.gpu_product, s.min_replicas, max(top, s.min_replicas), ready_replicas)


def usages(objects: Iterable[dict]) -> list[ServiceUsage]:
    """:class:`ServiceUsage` of every valid InferenceService dict (invalid ones are skipped:
    they have no children and hold no GPUs). Ready replicas come from ``status.readyReplicas``."""
    out = []
    for obj in objects:
        try:
            parsed = api.parse(obj)
        except pydantic.ValidationError:
            continue
        out.append(usage_of(parsed, int(((obj.get("status") or {}).get("readyReplicas")) or 0)))
    return out


def selector_matches(selector: api.LabelSelector, labels: Mapping[str, str]) -> bool:
    """meta/v1 LabelSelector semantics: every ``matchLabels`` pair and every expression hold
    (an empty selector matches everything)."""
    for key, value in selector.match_labels.items():
        if labels.get(key) != value:
            return False
    for req in selector.match_expressions:
        present = req.key in labels
        if req.operator == "In" and not (present and labels[req.key] in req.values):
            return False
        if req.operator == "NotIn" and present and labels[req.key] in req.values:
            return False
        if req.operator == "Exists" and not present:
            return False
        if req.operator == "DoesNotExist" and present:
            return False
    return True


def covers_namespace(quota: api.GPUQuota, namespace: str, namespace_labels: Mapping[str, str]) -> bool:
    """Whether ``quota`` covers ``namespace`` (by name, or by selector over its labels)."""
    spec = quota.spec
    if spec.namespaces is not None:
        return namespace in spec.namespaces
    assert spec.namespace_selector is not None  # the model enforces exactly one
    return selector_matches(spec.namespace_selector, namespace_labels)


def applies(quota: api.GPUQuota, svc: ServiceUsage, namespace_labels: Mapping[str, str]) -> bool:
    """Whether ``quota`` charges ``svc``: it covers the namespace and, if it names a tenant, the tenant matches."""
    if quota.spec.tenant is not None and svc.tenant != quota.spec.tenant:
        return False
    return covers_namespace(quota, svc.namespace, namespace_labels)


def applicable(quotas: Sequence[api.GPUQuota], svc: ServiceUsage,
               namespace_labels: Mapping[str, Mapping[str, str]]) -> list[api.GPUQuota]:
    """Every quota that charges ``svc``, sorted by name.

    Args:
        namespace_labels: labels of each namespace by name (a missing namespace has none).
    """
    labels = namespace_labels.get(svc.namespace) or {}
    return sorted((q for q in quotas if applies(q, svc, labels)), key=lambda q: q.metadata.name)


def charged(quota: api.GPUQuota, services: Iterable[ServiceUsage],
            namespace_labels: Mapping[str, Mapping[str, str]]) -> list[ServiceUsage]:
    """The services ``quota`` charges, sorted by (namespace, name)."""
    return sorted((s for s in services if applies(quota, s, namespace_labels.get(s.namespace) or {})),
                  key=lambda s: s.key)


def _product_limit(quota: api.GPUQuota, svc: ServiceUsage) -> Optional[int]:
    if svc.product is None:
        return None
    return quota.spec.per_product.get(svc.product)


# ------------------------------------------------------------------------ admission
@dataclass(frozen=True)
class Decision:
    """An admission decision: ``allowed``, and when denied a message naming the quota, the
    request and what is left."""

    allowed: bool
    message: str = ""
    quotas: tuple[str, ...] = ()


def _gpus(n: int) -> str:
    return f"{n} GPU" if n == 1 else f"{n} GPUs"


def admit(svc: ServiceUsage, quotas: Sequence[api.GPUQuota], services: Iterable[ServiceUsage],
          namespace_labels: Mapping[str, Mapping[str, str]]) -> Decision:
    """Whether ``svc`` (being created or updated) fits every quota that applies to it.

    Args:
        svc: the incoming InferenceService.
        quotas: every GPUQuota in the cluster.
        services: InferenceServices already in the cluster; the one with ``svc``'s namespace
            and name (its previous version on an update) is not counted.
        namespace_labels: labels of each namespace by name.

    Returns:
        A :class:`Decision`; a service with 0 reserved GPUs is always allowed. The message of
        a denial names the first quota (by name) that does not fit, e.g. ``GPUQuota team-a:
        this InferenceService reserves 8 GPUs (minReplicas 2 x 4 GPUs), 12 of 16 GPUs are
        reserved by 3 other services, 4 GPUs left``.
    """
    mine = applicable(quotas, svc, namespace_labels)
    names = tuple(q.metadata.name for q in mine)
    if svc.reserved == 0 or not mine:
        return Decision(True, "", names)
    others = [s for s in services if s.key != svc.key]
    request = f"{_gpus(svc.reserved)} (minReplicas {svc.min_replicas} x {_gpus(svc.gpus)})"
    for q in mine:
        charged_others = charged(q, others, namespace_labels)
        used = sum(s.reserved for s in charged_others)
        left = q.spec.gpus - used
        if svc.reserved > left:
            return Decision(False, (
                f"GPUQuota {q.metadata.name}: this InferenceService reserves {request}, {used} of "
                f"{_gpus(q.spec.gpus)} are reserved by {len(charged_others)} other service"
                f"{'' if len(charged_others) == 1 else 's'}, {_gpus(max(left, 0))} left"), names)
        limit = _product_limit(q, svc)
        if limit is not None:
            used_p = sum(s.reserved for s in charged_others if s.product == svc.product)
            left_p = limit - used_p
            if svc.reserved > left_p:
                return Decision(False, (
                    f"GPUQuota {q.metadata.name}: this InferenceService reserves {request} of {svc.product}, "
                    f"{used_p} of the {_gpus(limit)} allowed for {svc.product} are reserved, "
                    f"{_gpus(max(left_p, 0))} of {svc.product} left"), names)
    return Decision(True, "", names)


# ------------------------------------------------------------------------ autoscaler cap
@dataclass(frozen=True)
class Cap:
    """The autoscaler bound of one service after quotas.

    Attributes:
        max_replicas: the ``maxReplicas`` to render (never below ``minReplicas``).
        limited: True when quotas lowered it below the spec's ``maxReplicas``.
        quotas: names of the quotas that apply.
        message: why, for the ``QuotaLimited`` condition reason (empty when not limited).
    """

    max_replicas: int
    limited: bool = False
    quotas: tuple[str, ...] = ()
    message: str = ""


def caps(quotas: Sequence[api.GPUQuota], services: Sequence[ServiceUsage],
         namespace_labels: Mapping[str, Mapping[str, str]]) -> dict[tuple[str, str], Cap]:
    """The capped ``maxReplicas`` of every service, keyed by (namespace, name).

    See the module docstring for the sharing rule. Guarantees, for every quota Q whose
    services' reservations fit: sum over Q's services of ``cap x gpus`` <= ``Q.spec.gpus``
    (and the same per product listed in ``perProduct``). Services without GPUs or without
    any applicable quota keep their own ``maxReplicas``.
    """
    ordered = sorted(services, key=lambda s: s.key)
    applying = {s.key: applicable(quotas, s, namespace_labels) for s in ordered}
    # free GPUs per quota, and per (quota, product)
    free: dict[str, int] = {}
    free_product: dict[tuple[str, str], int] = {}
    for q in quotas:
        mine = [s for s in ordered if q in applying[s.key]]
        free[q.metadata.name] = q.spec.gpus - sum(s.reserved for s in mine)
        for product, limit in q.spec.per_product.items():
            free_product[(q.metadata.name, product)] = limit - sum(s.reserved for s in mine if s.product == product)
    replicas = {s.key: s.min_replicas for s in ordered}
    growing = [s for s in ordered if s.gpus > 0 and applying[s.key] and s.max_replicas > s.min_replicas]
    while growing:  # each round every service either gains a replica or leaves for good (free only shrinks)
        still = []
        for s in growing:
            qs = applying[s.key]
            limited_products = [(q.metadata.name, s.product) for q in qs
                                if s.product is not None and (q.metadata.name, s.product) in free_product]
            if any(free[q.metadata.name] < s.gpus for q in qs) or any(free_product[k] < s.gpus
                                                                       for k in limited_products):
                continue
            for q in qs:
                free[q.metadata.name] -= s.gpus
            for k in limited_products:
                free_product[k] -= s.gpus
            replicas[s.key] += 1
            if replicas[s.key] < s.max_replicas:
                still.append(s)
        growing = still
    out = {}
    for s in ordered:
        names = tuple(q.metadata.name for q in applying[s.key])
        if s.gpus == 0 or not names:
            out[s.key] = Cap(s.max_replicas, False, names)
            continue
        cap = replicas[s.key]
        limited = cap < s.max_replicas
        msg = ""
        if limited:
            msg = (f"maxReplicas capped from {s.max_replicas} to {cap} by GPUQuota {', '.join(names)}: "
                   f"{_gpus(cap * s.gpus)} possible at {_gpus(s.gpus)} per replica")
        out[s.key] = Cap(cap, limited, names, msg)
    return out


@dataclass
class QuotaUsage:
    """A GPUQuota's status numbers."""

    reserved: int
    in_use: int
    remaining: int
    services: list[dict] = field(default_factory=list)
    exceeded: bool = False


def quota_usage(quota: api.GPUQuota, services: Sequence[ServiceUsage],
                namespace_labels: Mapping[str, Mapping[str, str]],
                cap_by_service: Optional[Mapping[tuple[str, str], Cap]] = None) -> QuotaUsage:
    """Reserved GPUs (``minReplicas x gpus``), GPUs in use (ready replicas x gpus), what is left
    (``spec.gpus - reserved``, negative when the quota was lowered below its reservations) and
    the charged services, for ``status``."""
    mine = charged(quota, services, namespace_labels)
    reserved = sum(s.reserved for s in mine)
    in_use = sum(s.ready_replicas * s.gpus for s in mine)
    rows = []
    for s in mine:
        top = (cap_by_service or {}).get(s.key)
        rows.append({"namespace": s.namespace, "name": s.name, "gpusReserved": s.reserved,
                     "gpusMax": (top.max_replicas if top else s.max_replicas) * s.gpus})
    return QuotaUsage(reserved, in_use, quota.spec.gpus - reserved, rows, reserved > quota.spec.gpus)
