"""The kopf shell around the pure core: read, :func:`~argosy.operator.reconcile.reconcile`, write.

One function, :func:`converge`, does a whole pass for one InferenceService: read it and
its children, reconcile, server-side apply the children (field manager
``argosy-operator``), delete orphans, patch ``status`` through the status subresource, and
post a core/v1 Event for every condition whose status changed.

kopf calls it from the create, update and resume handlers. The update handler fires on
spec changes only: a label or status change does not reconcile, and the pod template's
spec hash changes only with the spec, so nothing else rolls the Deployment. A resync loop
calls it for every served InferenceService each ``resync_interval`` seconds: that is how
status follows the Deployment, the prefetch Job and the autoscaler, how the Deployment
appears once the model is cached, and how drift (a deleted child) is repaired. The loop
walks a kopf index; it is not a kopf timer because kopf puts a finalizer on every object
with a timer or daemon, and deletion here is garbage collection: every child carries a
controller ownerReference, so there is no finalizer and no delete handler, and an
InferenceService can be deleted while the operator is down.

In the handlers, API errors, 409 conflicts and connection failures become
:class:`kopf.TemporaryError` with a delay that doubles per retry (``retry_delay`` to
``retry_max_delay``); other 4xx answers become :class:`kopf.PermanentError`. The resync
loop logs a failed pass and tries again on its next round.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import defaultdict
from datetime import datetime, timezone
from typing import Any, Optional

import kopf

from . import api, autoscale, quota, reconcile
from .informer import WATCH_TIMEOUT_S, ChildCache
from .kube import Kube, KindNotServed, load_api_client
from .render import ISVC_LABEL, ROLE_CACHE, ROLE_DEPLOYMENT
from .settings import OperatorSettings

logger = logging.getLogger("argosy.operator")

#: Prefix of kopf's own annotations on InferenceServices (progress, last handled spec).
KOPF_PREFIX = "kopf.serving.argosy.dev"
#: Every kind the operator may create, for finding orphans (by the InferenceService label).
CHILD_KINDS = (
    ("v1", "PersistentVolumeClaim"),
    ("batch/v1", "Job"),
    ("v1", "Service"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("policy/v1", "PodDisruptionBudget"),
    ("apps/v1", "Deployment"),
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"),
    ("v1", "ServiceAccount"),
    ("rbac.authorization.k8s.io/v1", "Role"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"),
)
#: Seconds one Prometheus query of the builtin autoscaler may take.
PROMETHEUS_TIMEOUT_S = 10

#: Condition reasons reported as Warning events (``QuotaExceeded``: a GPU quota holds the
#: service's replicas back; a new service goes from ``WaitingForModel`` to it while still
#: False, which only a warning reason turns into an event for ``kubectl describe``).
WARNING_REASONS = frozenset({"DownloadFailed", "ProgressDeadlineExceeded", "InvalidSpec", "ApplyFailed",
                             "KindNotServed", "ProvisioningFailed", "QuotaExceeded"})
#: HTTP codes worth retrying soon (Kubernetes API conventions: 409 is an optimistic-lock conflict).
TRANSIENT_CODES = frozenset({404, 408, 409, 429, 500, 502, 503, 504})


class Context:
    """What the handlers share: operator settings, the API client, per-object locks.

    Args:
        settings: operator settings (renderers, resync interval, retry delays).
        api_client: a ``kubernetes.client.ApiClient``; default: in-cluster config, else kubeconfig.
        connection: what kopf's login returns (a :class:`kopf.ConnectionInfo`); default:
            kopf's login through the ``kubernetes`` client's configuration.
        discovery_cache: file for the DynamicClient's discovery cache (default: its temp file).
        namespaces: the namespaces served (kopf's ``--namespace`` values), None for all: where
            :meth:`start_children_cache` watches.
    """

    def __init__(self, settings: OperatorSettings, *, api_client: Any = None,
                 connection: Optional[kopf.ConnectionInfo] = None, discovery_cache: Optional[str] = None,
                 namespaces: Optional[list[str]] = None):
        self.settings = settings
        self.namespaces = list(namespaces) if namespaces else None
        #: the watch-backed cache of children passes read first (:meth:`start_children_cache`)
        self.children: Optional[ChildCache] = None
        self.connection = connection
        self._api_client = api_client
        self._discovery_cache = discovery_cache
        self._kube: Optional[Kube] = None
        self._guard = threading.Lock()
        self._locks: dict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)
        self.resync_task: Optional[asyncio.Task] = None
        self.webhook_runner: Any = None

    @property
    def kube(self) -> Kube:
        """The API client wrapper, created on first use."""
        with self._guard:
            if self._kube is None:
                self._kube = Kube(self._api_client or load_api_client(), cache_file=self._discovery_cache)
            return self._kube

    def start_children_cache(self, *, watch_timeout_s: int = WATCH_TIMEOUT_S) -> Optional[ChildCache]:
        """Start a :class:`~argosy.operator.informer.ChildCache` of every kind in
        :data:`CHILD_KINDS` labelled :data:`ISVC_LABEL`, in :attr:`namespaces` (cluster-wide
        when None), on its own API connection pool (one long-lived connection per watch).
        Passes read it first and fall back to the API while it is not synced. Not started
        (None) when a namespace is a kopf glob pattern (``team-*``): passes then read the API.
        """
        import copy

        if self.namespaces and any(set(ns) & set("*?[]!") for ns in self.namespaces):
            logger.info("namespace patterns %s: children are read from the API server, not watched", self.namespaces)
            return None
        base = self.kube._api_client
        cfg = copy.deepcopy(base.configuration)
        streams = len(CHILD_KINDS) * len(self.namespaces or [None])
        cfg.connection_pool_maxsize = max(getattr(cfg, "connection_pool_maxsize", 0) or 0, streams + 4)
        from kubernetes import client as kclient

        cache_file = f"{self._discovery_cache}.informers" if self._discovery_cache else None
        kube = Kube(kclient.ApiClient(cfg), cache_file=cache_file, request_timeout=self.kube.request_timeout)
        self.children = ChildCache(kube, CHILD_KINDS, ISVC_LABEL, self.namespaces,
                                   watch_timeout_s=watch_timeout_s).start()
        return self.children

    def stop_children_cache(self) -> None:
        """Stop the children cache (passes read the API server again)."""
        cache, self.children = self.children, None
        if cache is not None:
            cache.stop()

    def note_written(self, obj: Optional[dict]) -> None:
        """Tell the children cache of a write of ours (``obj``: the server's answer), so that
        a copy older than it is not trusted to skip an apply (:meth:`ChildCache.caught_up`)."""
        if self.children is not None:
            self.children.expect(obj)

    def prune(self, present: set[tuple[str, str]]) -> None:
        """Forget the per-service state (locks not held, autoscaler history) of
        InferenceServices not in ``present``: deleted ones."""
        with self._guard:
            for key in [k for k in self._locks if k not in present and not self._locks[k].locked()]:
                del self._locks[key]
        for key in [k for k in _HISTORY if k not in present]:
            _HISTORY.pop(key, None)

    def lock(self, namespace: str, name: str) -> threading.Lock:
        """The lock that keeps passes over one InferenceService from overlapping."""
        with self._guard:
            return self._locks[(namespace, name)]

    def retry_delay(self, retry: int) -> float:
        """Seconds before retry number ``retry`` (0 for the first): doubling, capped."""
        s = self.settings
        return min(s.retry_delay * (2 ** max(0, retry)), s.retry_max_delay)


def transition_events(previous: Optional[list[dict]], current: list[dict]) -> list[tuple[str, str, str]]:
    """Events for conditions whose ``status`` changed (or that are new), as (type, reason, message).

    A condition turning False is a ``Warning`` when it was True before or its reason is in
    :data:`WARNING_REASONS`; everything else is ``Normal``. A condition that stays False
    but whose reason becomes one of :data:`WARNING_REASONS` (``Downloading`` ->
    ``DownloadFailed``) is a ``Warning`` too. ``Ready`` repeats the reason of the condition
    that holds it back: its event is left out when another condition's event of this pass
    already says the same (type and reason), so one failure is not posted twice.
    """
    before = {c.get("type"): c for c in previous or []}
    out: list[tuple[str, str, str]] = []
    for cond in sorted(current, key=lambda c: c.get("type") == "Ready"):  # Ready last
        old = before.get(cond["type"])
        warn_reason = cond["status"] == "False" and cond["reason"] in WARNING_REASONS
        if old is not None and old.get("status") == cond["status"] and not (
                warn_reason and old.get("reason") != cond["reason"]):
            continue
        warning = warn_reason or (cond["status"] == "False" and old is not None and old.get("status") == "True")
        type_ = "Warning" if warning else "Normal"
        if cond["type"] == "Ready" and any((t, r) == (type_, cond["reason"]) for t, r, _ in out):
            continue
        text = f"{cond['type']} is {cond['status']}"
        if cond.get("message"):
            text += f": {cond['message']}"
        out.append((type_, cond["reason"], text[:1024]))
    return out


def provisioning_failure(kube: Kube, claim: Optional[dict], previous: Optional[list[dict]],
                         log: logging.Logger) -> Optional[str]:
    """For a Pending claim, the message of its newest ``ProvisioningFailed`` event (posted by
    the PV controller or an external provisioner, e.g. when the StorageClass cannot provide
    the access mode), else None. One Event list (server-side filtered by object and
    reason), made only while the claim is Pending. A failed list (a timeout, an older chart
    without ``list`` on events) is logged and keeps what the previous status said
    (``previous``: its conditions), so an API hiccup does not flip the condition and post
    its Warning again.
    """
    if claim is None or (claim.get("status") or {}).get("phase") != "Pending":
        return None
    md = claim["metadata"]
    selector = f"involvedObject.kind=PersistentVolumeClaim,involvedObject.name={md['name']},reason=ProvisioningFailed"
    try:
        events = kube.list("v1", "Event", md.get("namespace"), "", field_selector=selector)
    except Exception as e:  # noqa: BLE001 - a message in status is not worth failing the pass
        log.debug("cannot list the events of claim %s: %s", md["name"], _summary(e))
        cached = next((c for c in previous or [] if c.get("type") == reconcile.MODEL_CACHED), {})
        return cached.get("message") if cached.get("reason") == "ProvisioningFailed" else None
    mine = [e for e in events if e.get("reason") == "ProvisioningFailed"
            and (e.get("involvedObject") or {}).get("uid") in (None, md.get("uid"))]  # not an older same-named claim
    if not mine:
        return None

    def when(e: dict) -> datetime:
        text = e.get("lastTimestamp") or e.get("eventTime") or (e.get("metadata") or {}).get("creationTimestamp")
        try:
            return datetime.fromisoformat(str(text).replace("Z", "+00:00"))
        except ValueError:
            return datetime.min.replace(tzinfo=timezone.utc)

    return max(mine, key=when).get("message") or "ProvisioningFailed"


def converge(ctx: Context, namespace: str, name: str, *, log: Optional[logging.Logger] = None,
             now: Optional[datetime] = None, snapshot: Optional[tuple] = None) -> Optional[dict]:
    """One reconcile pass over the InferenceService ``namespace/name``.

    ``snapshot``: a :func:`cluster_snapshot` to compute the GPUQuota cap from (the resync
    loop reads it once per round for all services instead of once per service); None: read
    it now.

    Returns:
        The status written (or already there), None when the object is gone or being deleted.

    Children are read from :attr:`Context.children` (the list-and-watch cache) when it holds
    them, else from the API server; orphans are found the same way. Each applied manifest
    carries :data:`~argosy.operator.reconcile.APPLIED_HASH_ANNOTATION` and is not sent when
    the live object already holds it and every applied field
    (:func:`~argosy.operator.reconcile.up_to_date`), so a steady-state pass with a synced
    cache makes one API call (the GET of the InferenceService, read fresh so the status
    patch compares against the latest status) plus the status patch when status changed.

    Every child is written independently (orphans deleted first, then a replica restored
    for an HPA taking over a Deployment at zero, then the applies): one failed write does
    not stop the others, the orphan clean-up or the status patch. Failures are reported in
    the ``ChildrenApplied`` condition (reason ``ApplyFailed``, or ``KindNotServed`` when
    only missing kinds failed, each object named) and its Warning event, then the first
    one is raised.

    Raises:
        kubernetes.dynamic.exceptions.DynamicApiError: an API call failed (after the others
            were made and the status written).
        KindNotServed: a child's kind is not served by the cluster (likewise).
    """
    log = log or logger
    kube = ctx.kube
    with ctx.lock(namespace, name):
        isvc = kube.get(api.API_VERSION, api.KIND, namespace, name)
        if isvc is None or isvc["metadata"].get("deletionTimestamp"):
            return None
        wanted = reconcile.desired_children(isvc, ctx.settings)
        cache = ctx.children

        stale_ok: set[tuple[str, str]] = set()  # children read from the server in this pass

        def live(api_version: str, kind: str, child: str) -> Optional[dict]:
            """The cached child, else the server's (a miss is never trusted: it is read)."""
            hit = cache.get(api_version, kind, namespace, child) if cache is not None else None
            if hit is not None:
                return hit
            stale_ok.add((kind, child))
            return kube.get(api_version, kind, namespace, child)

        def fresh(manifest: dict) -> bool:
            """Whether the live copy of ``manifest``'s object read in this pass is at least this
            operator's last write of it (read from the server, or the cache has its event)."""
            kind, child = manifest["kind"], manifest["metadata"]["name"]
            if cache is None or (kind, child) in stale_ok:
                return True
            return cache.caught_up(manifest["apiVersion"], kind, namespace, child)

        observed = {role: live(m["apiVersion"], m["kind"], m["metadata"]["name"]) for role, m in wanted.items()}
        live_by_name = {(m["kind"], m["metadata"]["name"]): observed[role] for role, m in wanted.items()}
        cap = quota_cap(kube, namespace, name, snapshot)
        stamp = now or datetime.now(timezone.utc)
        result = reconcile.reconcile(isvc, observed, ctx.settings, now=stamp, cap=cap,
                                     provisioning_failure=lambda: provisioning_failure(
                                         kube, observed.get(ROLE_CACHE), (isvc.get("status") or {}).get("conditions"),
                                         log))
        decision = builtin_autoscale(ctx, isvc, observed.get("deployment"), cap, log=log)
        if decision is not None:
            result.status["autoscaler"] = decision
        failures: list[tuple[dict, BaseException]] = []

        def attempt(obj: dict, verb: str, fn) -> None:
            """One child write; a failure is recorded and the pass goes on with the others."""
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - recorded in status, re-raised after it is written
                log.warning("cannot %s %s %s: %s", verb, obj["kind"], obj["metadata"]["name"], _summary(e))
                failures.append((obj, e))

        # Orphans first: the HPA of a previous hpa -> keda switch must be gone before the
        # ScaledObject comes (KEDA's webhook refuses a second owner of the Deployment).
        gone = []
        if wanted:
            owned: list[dict] = []
            for api_version, kind in CHILD_KINDS:
                cached = cache.owned(api_version, kind, namespace, name) if cache is not None else None
                if cached is not None:
                    owned.extend(cached)
                    continue
                attempt({"kind": kind, "metadata": {"name": f"{ISVC_LABEL}={name}"}}, "list",
                        lambda a=api_version, k=kind: owned.extend(kube.list(a, k, namespace, f"{ISVC_LABEL}={name}")))
            for obj in reconcile.orphans(isvc, owned, ctx.settings):
                log.info("deleting %s %s, no longer part of the service", obj["kind"], obj["metadata"]["name"])
                before = len(failures)
                attempt(obj, "delete", lambda obj=obj: kube.delete(obj))
                if len(failures) == before:
                    gone.append(obj)
        leaving_keda = any(o["kind"] == "ScaledObject" for o in gone)  # deleted in this pass, not just wanted gone
        restore = reconcile.replicas_from_zero(isvc, observed.get(ROLE_DEPLOYMENT), leaving_keda)
        if restore is not None:  # an HPA does not scale a Deployment KEDA left at zero
            log.info("Deployment %s is at 0 replicas under an HPA: setting %d", name, restore["spec"]["replicas"])
            attempt(restore, "scale", lambda: ctx.note_written(kube.apply(
                restore, field_manager=reconcile.REPLICAS_HANDOVER_MANAGER)))
        for manifest in result.manifests_to_apply:
            if manifest["kind"] == "Deployment":
                handover = reconcile.replicas_handover(manifest, observed.get(ROLE_DEPLOYMENT),
                                                       kube.field_manager)
                if handover is not None and ("Deployment", manifest["metadata"]["name"]) not in stale_ok:
                    # The cache's copy can be a moment old (an autoscaler may just have scaled):
                    # hand over the server's replicas, not the cached ones (the cached ones if
                    # the read fails: the pass goes on, as for any other failed call).
                    try:
                        handover = reconcile.replicas_handover(
                            manifest, kube.get(manifest["apiVersion"], "Deployment", namespace,
                                               manifest["metadata"]["name"]), kube.field_manager)
                    except Exception as e:  # noqa: BLE001 - recorded as a failure; the pass goes on
                        log.warning("cannot read Deployment %s for the replicas hand-over: %s", name, _summary(e))
                        failures.append((manifest, e))
                if handover is not None:
                    attempt(handover, "hand over replicas of",
                            lambda h=handover: ctx.note_written(kube.apply(
                                h, field_manager=reconcile.REPLICAS_HANDOVER_MANAGER)))
            manifest = reconcile.with_applied_hash(manifest)
            current = live_by_name.get((manifest["kind"], manifest["metadata"]["name"]))
            if reconcile.up_to_date(manifest, current) and fresh(manifest):
                continue  # the live object already is what this apply would make it
            attempt(manifest, "apply", lambda m=manifest: ctx.note_written(kube.apply(m)))
        for obj in result.to_delete:
            log.info("deleting %s %s to recreate it with the current spec", obj["kind"], obj["metadata"]["name"])
            attempt(obj, "delete", lambda obj=obj: kube.delete(obj))
        previous = isvc.get("status") or {}
        if wanted:
            result.status["conditions"] += reconcile.conditions(
                [(reconcile.CHILDREN_APPLIED, reconcile.children_applied(failures, _summary))],
                previous.get("conditions") or [], stamp, result.status.get("observedGeneration"))
        if {k: previous.get(k) for k in result.status} != result.status:
            kube.patch_status(api.API_VERSION, api.KIND, namespace, name, result.status)
        for type_, reason, message in transition_events(previous.get("conditions"), result.status["conditions"]):
            log.log(logging.WARNING if type_ == "Warning" else logging.INFO, "%s: %s", reason, message)
            try:
                kube.post_event(isvc, type_, reason, message)
            except Exception as e:  # noqa: BLE001 - an event is not worth a retry of the whole pass
                log.warning("could not post the %s event: %s", reason, e)
        if failures:  # status and events are out; the caller retries: a transient failure first
            raise next((e for _, e in failures if _transient(e)), failures[0][1])
        return result.status


def ensure_webhook_certificate(ctx: Context, now: Optional[datetime] = None) -> bool:
    """Issue or rotate the webhook certificate in its Secret, keep the webhook
    configuration's caBundle on its CA, and write the pair into ``webhook_cert_dir``
    (:mod:`argosy.operator.certs`); True when the files changed.

    Raises:
        ValueError: the namespace, Service or webhook configuration setting is missing.
        kubernetes.dynamic.exceptions.DynamicApiError: an API call failed.
    """
    from . import certs

    s = ctx.settings
    missing = [f"ARGOSY_{n.upper()}" for n in ("webhook_namespace", "webhook_service", "webhook_configuration")
               if not getattr(s, n)]
    if missing:
        raise ValueError(f"ARGOSY_WEBHOOK_CERT_SECRET needs {', '.join(missing)} (the chart sets them)")
    names = certs.service_dns_names(s.webhook_service, s.webhook_namespace)
    pems = certs.ensure(ctx.kube, s.webhook_namespace, s.webhook_cert_secret, s.webhook_configuration, names,
                        validity_days=s.webhook_cert_validity_days, renew_days=s.webhook_cert_renew_days, now=now)
    return certs.write_files(s.webhook_cert_dir, pems)


def repair_ca_bundle(ctx: Context) -> bool:
    """Put the served CA (``ca.crt`` in ``webhook_cert_dir``) back into the webhook
    configuration's caBundle when it is missing or different (the configuration recreated,
    a Helm upgrade or an Argo CD replace wiped it); True when it changed. Self-issued
    certificates only."""
    from . import certs

    try:
        with open(os.path.join(ctx.settings.webhook_cert_dir, "ca.crt"), "rb") as f:
            ca = f.read()
    except OSError:
        return False
    return certs.inject_ca_bundle(ctx.kube, ctx.settings.webhook_configuration, ca)


async def certificate_loop(ctx: Context, reloader: Any) -> None:
    """Every ``webhook_cert_reload_interval`` seconds: serve changed certificate files, and
    (self-issued certificates) repair a wiped caBundle; every ``webhook_cert_check_interval``
    seconds after the last successful check, or on the next tick after a failed one, rotate
    before expiry and follow the Secret (another replica's rotation). Errors are logged and
    retried; the current certificate keeps being served."""
    s = ctx.settings
    last_ok = time.monotonic()
    failed = False
    while True:
        await asyncio.sleep(s.webhook_cert_reload_interval)
        try:
            if s.webhook_cert_secret:
                if failed or time.monotonic() - last_ok >= s.webhook_cert_check_interval:
                    failed = True
                    await asyncio.to_thread(ensure_webhook_certificate, ctx)
                    failed, last_ok = False, time.monotonic()
                else:
                    await asyncio.to_thread(repair_ca_bundle, ctx)
            reloader.maybe_reload()
        except Exception as e:  # noqa: BLE001 - the current certificate keeps being served
            logger.warning("webhook certificate check failed (retrying): %s", _summary(e))


async def webhook_main(ctx: Context, snapshot: Any) -> None:
    """Get a serving certificate (issuing one when self-issued; retried every
    ``webhook_cert_reload_interval`` seconds while the API refuses, e.g. missing RBAC),
    start the admission webhook's HTTPS server, then run :func:`certificate_loop`. Runs in
    the background so that a certificate problem never keeps the operator itself (its
    reconciling and health endpoint) from starting."""
    from . import webhook

    s = ctx.settings
    crt, key = os.path.join(s.webhook_cert_dir, "tls.crt"), os.path.join(s.webhook_cert_dir, "tls.key")
    while True:
        try:
            if s.webhook_cert_secret:
                await asyncio.to_thread(ensure_webhook_certificate, ctx)
            tls = webhook.ssl_context(crt, key)
            break
        except Exception as e:  # noqa: BLE001 - logged, retried; the webhook is not served meanwhile
            logger.error("admission webhook not served yet, no usable certificate (retrying in %gs): %s",
                         s.webhook_cert_reload_interval, _summary(e))
            await asyncio.sleep(s.webhook_cert_reload_interval)
    ctx.webhook_runner = await webhook.start(snapshot, s.webhook_port, tls=tls)
    await certificate_loop(ctx, webhook.CertReloader(tls, crt, key))


def cluster_snapshot(kube: Kube) -> tuple[list[dict], list[dict], dict[str, dict[str, str]]]:
    """(GPUQuotas, InferenceServices of all namespaces, labels of each namespace) as read now;
    empty lists when the GPUQuota kind is not served or not readable (403). Raises what other
    API failures raise."""
    try:
        quotas = kube.list(api.API_VERSION, api.QUOTA_KIND, None, "")
    except Exception as e:  # noqa: BLE001 - 403: a namespaced install without cluster-wide quota rules
        if getattr(e, "status", None) == 403:
            return [], [], {}
        raise
    if not quotas:
        return [], [], {}
    services = kube.list(api.API_VERSION, api.KIND, None, "")
    labels = {ns["metadata"]["name"]: (ns["metadata"].get("labels") or {}) for ns in kube.list("v1", "Namespace",
                                                                                              None, "")}
    return quotas, services, labels


def quota_cap(kube: Kube, namespace: str, name: str, snapshot: Optional[tuple] = None) -> Optional[quota.Cap]:
    """The GPUQuota cap of one InferenceService (None when no quota exists or applies), from
    ``snapshot`` (a :func:`cluster_snapshot`) or one read now."""
    quotas, services, labels = snapshot if snapshot is not None else cluster_snapshot(kube)
    if not quotas:
        return None
    parsed = []
    for obj in quotas:
        try:
            parsed.append(api.parse_quota(obj))
        except Exception:  # noqa: BLE001 - an invalid quota (the CRD should have stopped it) binds nothing
            continue
    caps = quota.caps(parsed, quota.usages(services), labels)
    return caps.get((namespace, name))


#: Builtin autoscaler: recommendations of each service within its window, by (namespace, name).
_HISTORY: dict[tuple[str, str], list[tuple[float, int]]] = {}


def builtin_autoscale(ctx: Context, isvc: dict, dep: Optional[dict], cap: Optional[quota.Cap], *,
                      log: logging.Logger, prom: Any = None, clock: Any = None) -> Optional[dict]:
    """One builtin autoscaler step for an InferenceService with ``scaling.autoscaler: builtin``
    whose Deployment exists: query Prometheus, :func:`argosy.operator.autoscale.decide`, patch
    the Deployment's ``spec.replicas`` when the decision differs, post an Event for a change.

    Returns:
        ``status.autoscaler`` (desiredReplicas, reason, message, lastDecisionTime), or None when
        the builtin autoscaler does not apply. A Prometheus failure gives reason
        ``MetricsUnavailable`` (replicas kept).
    """
    try:
        parsed = api.parse(isvc)
    except Exception:  # noqa: BLE001 - reconcile reports InvalidSpec
        return None
    if parsed.spec.scaling.autoscaler != "builtin" or dep is None:
        return None
    import time

    now = (clock or time.time)()
    current = int((dep.get("spec") or {}).get("replicas", 1))
    try:
        if prom is None:
            from prometheus_api_client import PrometheusConnect

            address = parsed.spec.scaling.prometheus.server_address or ctx.settings.prometheus_server_address
            prom = PrometheusConnect(url=address, disable_ssl=False, timeout=PROMETHEUS_TIMEOUT_S)
        waiting, kv = autoscale.query_metrics(prom, parsed, ctx.settings)
    except Exception as e:  # noqa: BLE001 - no metrics: keep the replicas
        log.warning("builtin autoscaler: Prometheus query failed: %s", _summary(e))
        waiting = kv = None
    key = (parsed.metadata.namespace, parsed.metadata.name)
    inputs = autoscale.inputs_for(parsed, current, waiting, kv, now=now, history=_HISTORY.get(key, []),
                                  quota_cap=cap.max_replicas if cap else None,
                                  up_step=ctx.settings.autoscale_up_step, down_step=ctx.settings.autoscale_down_step)
    decision = autoscale.decide(inputs)
    _HISTORY[key] = decision.history
    if decision.desired != current:
        ctx.kube.patch_replicas(parsed.metadata.namespace, parsed.metadata.name, decision.desired)
        try:
            ctx.kube.post_event(isvc, "Normal", f"Builtin{decision.reason}", decision.message)
        except Exception as e:  # noqa: BLE001
            log.warning("could not post the autoscaler event: %s", e)
    return {"desiredReplicas": decision.desired, "reason": decision.reason, "message": decision.message[:4096],
            "lastDecisionTime": datetime.fromtimestamp(now, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def converge_quotas(ctx: Context, *, now: Optional[datetime] = None) -> list[dict]:
    """One pass over every GPUQuota: server-side apply its ResourceQuotas (the backstop in each
    covered namespace) and patch its status (gpusReserved, gpusInUse, gpusRemaining, services,
    Ready/Exceeded conditions). Returns the statuses written. Raises what the API calls raise."""
    from .render import resourcequota

    kube = ctx.kube
    quotas, services, labels = cluster_snapshot(kube)
    if not quotas:
        return []
    usages = quota.usages(services)
    gpu_names = set()
    for obj in services:
        try:
            gpu_names.add(api.parse(obj).spec.resources.gpu_resource_name)
        except Exception:  # noqa: BLE001
            continue
    parsed = []
    for obj in quotas:
        try:
            parsed.append((obj, api.parse_quota(obj)))
        except Exception:  # noqa: BLE001
            continue
    caps = quota.caps([q for _, q in parsed], usages, labels)
    out = []
    stamp = now or datetime.now(timezone.utc)
    for obj, q in parsed:
        for rq in resourcequota.resource_quotas(q, labels, gpu_names or {"nvidia.com/gpu"}):
            try:
                kube.apply(rq)
            except Exception as e:  # noqa: BLE001 - e.g. 403 outside the watched namespaces
                logger.warning("GPUQuota %s: cannot apply ResourceQuota in %s: %s", q.metadata.name,
                               rq["metadata"]["namespace"], _summary(e))
        u = quota.quota_usage(q, usages, labels, caps)
        exceeded = reconcile.Cond("True", "OverReserved",
                                  f"{u.reserved} GPUs reserved, above the quota of {q.spec.gpus}") if u.exceeded \
            else reconcile.Cond("False", "WithinQuota", f"{u.reserved} of {q.spec.gpus} GPUs reserved")
        ready = reconcile.Cond("True", "Accounted", f"{len(u.services)} services charged")
        previous = (obj.get("status") or {}).get("conditions") or []
        status = {"observedGeneration": q.metadata.generation, "gpusReserved": u.reserved, "gpusInUse": u.in_use,
                  "gpusRemaining": u.remaining, "services": u.services,
                  "conditions": reconcile.conditions([("Ready", ready), ("Exceeded", exceeded)], previous, stamp,
                                                     q.metadata.generation)}
        before = obj.get("status") or {}
        if {k: before.get(k) for k in status} != status:
            kube.patch_status(api.API_VERSION, api.QUOTA_KIND, None, q.metadata.name, status)
        out.append(status)
    return out


def _summary(exc: BaseException) -> str:
    # DynamicApiError.summary() is "CODE: message"; other errors print as themselves.
    summary = getattr(exc, "summary", None)
    return f"{type(exc).__name__}: {summary() if callable(summary) else exc}"


def _transient(exc: BaseException) -> bool:
    status = getattr(exc, "status", None)
    if isinstance(status, int):
        return status in TRANSIENT_CODES
    import urllib3

    return isinstance(exc, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError, OSError))


def handle(ctx: Context, namespace: str, name: str, retry: int, log: logging.Logger) -> None:
    """Run :func:`converge` for a kopf handler, mapping failures to kopf's retry errors.

    Raises:
        kopf.TemporaryError: a transient API failure or a kind the cluster does not serve (yet).
        kopf.PermanentError: the API server rejected a request for good (e.g. 403, 422).
    """
    try:
        converge(ctx, namespace, name, log=log)
    except KindNotServed as e:
        raise kopf.TemporaryError(str(e), delay=ctx.settings.retry_max_delay) from e
    except Exception as e:  # noqa: BLE001 - classified below
        summary = _summary(e)
        if _transient(e):
            raise kopf.TemporaryError(f"will retry: {summary}", delay=ctx.retry_delay(retry)) from e
        raise kopf.PermanentError(summary) from e


def resync_round(ctx: Context, keys: list[tuple[str, str]]) -> None:
    """One resync round: the GPUQuota pass, then :func:`converge` of each ``(namespace,
    name)`` in turn, all sharing one :func:`cluster_snapshot` (the cluster-wide lists once
    per round, not once per service). ``keys`` is every InferenceService: the state kept
    for others (deleted ones) is dropped (:meth:`Context.prune`). Failures are logged; the
    next round retries."""
    ctx.prune(set(keys))
    try:
        converge_quotas(ctx)
    except Exception as e:  # noqa: BLE001 - logged, retried next round
        logger.warning("GPUQuota pass failed, retrying in %gs: %s", ctx.settings.resync_interval, _summary(e))
    try:
        snapshot = cluster_snapshot(ctx.kube)
    except Exception as e:  # noqa: BLE001 - each pass then reads its own
        logger.warning("cannot read GPUQuotas for this round: %s", _summary(e))
        snapshot = None
    for namespace, name in keys:
        try:
            converge(ctx, namespace, name, snapshot=snapshot)
        except Exception as e:  # noqa: BLE001 - logged, retried next round
            logger.warning("resync of %s/%s failed, retrying in %gs: %s", namespace, name,
                           ctx.settings.resync_interval, _summary(e))


async def resync_loop(ctx: Context, index: Any) -> None:
    """Every ``resync_interval`` seconds, a :func:`resync_round` over each InferenceService in
    ``index`` (a kopf index keyed by (namespace, name)), in a worker thread. Runs until
    cancelled."""
    while True:
        await asyncio.sleep(ctx.settings.resync_interval)
        await asyncio.to_thread(resync_round, ctx, list(index))


def kopf_settings(ctx: Context) -> kopf.OperatorSettings:
    """kopf's settings for this operator: bookkeeping in annotations under :data:`KOPF_PREFIX`
    (status fields outside the CRD's schema would be pruned); kopf's own events only for
    warnings and errors, such as a handler failing (the operator posts its own on condition
    changes)."""
    settings = kopf.OperatorSettings()
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=KOPF_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=KOPF_PREFIX)
    settings.posting.level = logging.WARNING
    if hasattr(settings.posting, "loggers"):  # kopf >= 1.38 posts nothing from its logs by default
        settings.posting.loggers = True
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    return settings


def build_registry(ctx: Context) -> kopf.OperatorRegistry:
    """A kopf registry with the operator's handlers bound to ``ctx``."""
    registry = kopf.OperatorRegistry()
    resource = (api.GROUP, api.VERSION, api.PLURAL)

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> Optional[kopf.ConnectionInfo]:
        return ctx.connection or kopf.login_via_client(**kwargs)

    @kopf.on.create(*resource, registry=registry)
    def created(namespace: str, name: str, retry: int, logger: logging.Logger, **_: Any) -> None:
        handle(ctx, namespace, name, retry, logger)

    @kopf.on.update(*resource, field="spec", registry=registry)
    def spec_changed(namespace: str, name: str, retry: int, logger: logging.Logger, **_: Any) -> None:
        handle(ctx, namespace, name, retry, logger)

    @kopf.on.resume(*resource, registry=registry)
    def resumed(namespace: str, name: str, retry: int, logger: logging.Logger, **_: Any) -> None:
        handle(ctx, namespace, name, retry, logger)

    @kopf.index(*resource, id="inference_services", registry=registry)
    def inference_services(namespace: str, name: str, **_: Any) -> dict:
        return {(namespace, name): True}

    @kopf.on.startup(registry=registry)
    async def start_children_cache(**_: Any) -> None:
        try:
            await asyncio.to_thread(ctx.start_children_cache)
        except Exception as e:  # noqa: BLE001 - the cache is an optimization: passes read the API instead
            logger.warning("children cache not started, passes read the API server: %s", _summary(e))

    @kopf.on.cleanup(registry=registry)
    async def stop_children_cache(**_: Any) -> None:
        await asyncio.to_thread(ctx.stop_children_cache)

    @kopf.on.startup(registry=registry)
    async def start_resync(inference_services: Any, **_: Any) -> None:
        ctx.resync_task = asyncio.create_task(resync_loop(ctx, inference_services))

    @kopf.on.startup(registry=registry)
    async def start_webhook(**_: Any) -> None:
        if not ctx.settings.webhook_port:
            return
        from . import webhook

        def snapshot() -> "webhook.Snapshot":
            quotas, services, labels = cluster_snapshot(ctx.kube)
            return webhook.Snapshot(quotas, services, labels)

        ctx.cert_task = asyncio.create_task(webhook_main(ctx, snapshot))

    @kopf.on.cleanup(registry=registry)
    async def stop_webhook(**_: Any) -> None:
        task = getattr(ctx, "cert_task", None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            ctx.cert_task = None
        if getattr(ctx, "webhook_runner", None) is not None:
            await ctx.webhook_runner.cleanup()
            ctx.webhook_runner = None

    @kopf.on.cleanup(registry=registry)
    async def stop_resync(**_: Any) -> None:
        if ctx.resync_task is not None:
            ctx.resync_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ctx.resync_task
            ctx.resync_task = None

    return registry
