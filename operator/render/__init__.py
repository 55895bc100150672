"""Pure renderers: a validated InferenceService (+ operator settings) to child manifests.

No I/O. Every child is a plain dict carrying the standard ``app.kubernetes.io/*`` labels
and a controller ownerReference to the InferenceService, ready for server-side apply.
:func:`render_children` returns them all, keyed by role (the ``ROLE_*`` constants), which
is also how :func:`argosy.operator.reconcile.reconcile` receives the observed objects.
"""

from __future__ import annotations

from .. import api
from ..settings import OperatorSettings
from .common import (ISVC_LABEL, SPEC_HASH_ANNOTATION, ModelPlan, labels, model_plan, owner_reference,
                     selector_labels, selector_string, url)
from .scaling import autoscaler, horizontal_pod_autoscaler, scaled_object
from .storage import cache_pvc, prefetch_job
from . import router
from .workload import deployment, pod_disruption_budget, service, service_monitor

ROLE_CACHE = "cache"            # PersistentVolumeClaim
ROLE_PREFETCH = "prefetch"      # Job
ROLE_SERVICE = "service"        # Service
ROLE_MONITOR = "monitor"        # ServiceMonitor
ROLE_PDB = "pdb"                # PodDisruptionBudget
ROLE_DEPLOYMENT = "deployment"  # Deployment
ROLE_AUTOSCALER = "autoscaler"  # ScaledObject or HorizontalPodAutoscaler
ROLE_ROUTER_ACCOUNT = "router-account"        # ServiceAccount   (spec.router)
ROLE_ROUTER_ROLE = "router-role"              # Role
ROLE_ROUTER_BINDING = "router-binding"        # RoleBinding
ROLE_ROUTER_SERVICE = "router-service"        # Service
ROLE_ROUTER_MONITOR = "router-monitor"        # ServiceMonitor
ROLE_ROUTER_DEPLOYMENT = "router-deployment"  # Deployment
#: Roles in apply order: storage first, then what points at the pods, the pods, their scaler,
#: then the router (its RBAC before its pods).
ROLES = (ROLE_CACHE, ROLE_PREFETCH, ROLE_SERVICE, ROLE_MONITOR, ROLE_PDB, ROLE_DEPLOYMENT, ROLE_AUTOSCALER,
         ROLE_ROUTER_ACCOUNT, ROLE_ROUTER_ROLE, ROLE_ROUTER_BINDING, ROLE_ROUTER_SERVICE, ROLE_ROUTER_MONITOR,
         ROLE_ROUTER_DEPLOYMENT)


def render_children(isvc: api.InferenceService, settings: OperatorSettings) -> dict[str, dict]:
    """Every child the InferenceService should have, keyed by role, in :data:`ROLES` order.

    Roles with nothing to render are absent (no ``cache`` with an existing claim, no
    ``prefetch`` for ``pvc://``, no ``autoscaler`` for ``none``, no ``monitor`` when
    ``settings.service_monitor`` is off, no ``router-*`` without ``spec.router.enabled``).

    Raises:
        ValueError: the InferenceService has no ``metadata.uid``.
    """
    out = {
        ROLE_CACHE: cache_pvc(isvc, settings),
        ROLE_PREFETCH: prefetch_job(isvc, settings),
        ROLE_SERVICE: service(isvc, settings),
        ROLE_MONITOR: service_monitor(isvc, settings) if settings.service_monitor else None,
        ROLE_PDB: pod_disruption_budget(isvc, settings),
        ROLE_DEPLOYMENT: deployment(isvc, settings),
        ROLE_AUTOSCALER: autoscaler(isvc, settings),
    }
    if isvc.spec.router.enabled:
        out.update({
            ROLE_ROUTER_ACCOUNT: router.service_account(isvc, settings),
            ROLE_ROUTER_ROLE: router.role(isvc, settings),
            ROLE_ROUTER_BINDING: router.role_binding(isvc, settings),
            ROLE_ROUTER_SERVICE: router.service(isvc, settings),
            ROLE_ROUTER_MONITOR: router.service_monitor(isvc, settings) if settings.service_monitor else None,
            ROLE_ROUTER_DEPLOYMENT: router.deployment(isvc, settings),
        })
    return {role: m for role, m in out.items() if m is not None}


__all__ = [
    "ISVC_LABEL", "SPEC_HASH_ANNOTATION", "ModelPlan", "ROLES", "ROLE_AUTOSCALER", "ROLE_CACHE",
    "ROLE_DEPLOYMENT", "ROLE_MONITOR", "ROLE_PDB", "ROLE_PREFETCH", "ROLE_SERVICE", "ROLE_ROUTER_ACCOUNT",
    "ROLE_ROUTER_BINDING", "ROLE_ROUTER_DEPLOYMENT", "ROLE_ROUTER_MONITOR", "ROLE_ROUTER_ROLE", "ROLE_ROUTER_SERVICE", "autoscaler", "cache_pvc",
    "deployment", "horizontal_pod_autoscaler", "labels", "model_plan", "owner_reference", "pod_disruption_budget",
    "prefetch_job", "render_children", "scaled_object", "selector_labels", "selector_string", "service",
    "service_monitor", "url",
]
