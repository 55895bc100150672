"""Watch-backed caches of the operator's children: what a pass reads without calling the API.

A resync pass over one InferenceService used to make a ``get`` for each child it wants and a
label-selected ``list`` for each child kind (to find orphans): ~17 calls per service every
``resyncInterval``, most of them answered with what the previous pass already saw. An
:class:`Informer` keeps one kind's labelled objects in memory instead: it lists them once
(``labelSelector`` evaluated by the API server, so unrelated Deployments, Services, Jobs...
of the cluster never reach the operator), then watches from the list's ``resourceVersion``
(Kubernetes API concepts, "Efficient detection of changes"), asks for bookmarks, resumes a
stream the server ended, and lists again after an error (410 Gone included). It is the
list-and-watch pattern of client-go's informers and controller-runtime's cache, written for
this operator's few kinds; the kopf indexes would do the same job but watch every object of a
kind cluster-wide (kopf filters labels on the client).

:class:`ChildCache` runs one informer per child kind (and per namespace for a namespaced
install) and answers the pass's two questions: the live object of a given name, and every
object carrying an InferenceService's label. It answers only while every informer it needs has
listed at least once and its stream is healthy (``synced``); otherwise the caller asks the
API server, as before. A cached object may be a moment older than the server's (a watch
event in flight): passes treat a cache miss as "ask the server" (``get``), so only present
objects are ever read from the cache; and the operator tells the cache of each of its own
writes (:meth:`ChildCache.expect`, the resourceVersion the server answered), so a cached
copy older than that write is not trusted to skip an apply (:meth:`ChildCache.caught_up`)
until the write's event has arrived. Other writers' changes reach the cache by their events
and are repaired by the next pass that sees them.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Iterable, Optional

from .kube import MISSING_KIND_RECHECK, KindNotServed, Kube

logger = logging.getLogger("argosy.operator.informer")

#: Seconds a watch stream may stay open before the server ends it (``timeoutSeconds``); the
#: informer then resumes from its last resourceVersion (no relist). Short, so that a
#: connection that died without a close (no events, no bookmarks) is noticed within this
#: plus the request timeout, not after many minutes of serving a stale cache.
WATCH_TIMEOUT_S = 60
#: Seconds between relist attempts after an error, doubling up to :data:`RELIST_MAX_DELAY_S`.
RELIST_DELAY_S = 1.0
RELIST_MAX_DELAY_S = 30.0


class Informer:
    """The objects of one kind that carry a label key, in one namespace or cluster-wide, kept
    current by a daemon thread (list, then watch).

    Args:
        kube: the API client wrapper (its request timeout bounds every call).
        api_version: e.g. ``"apps/v1"``.
        kind: e.g. ``"Deployment"``.
        label: the label key whose presence selects the objects (the selector sent to the
            server is the key alone, "exists"); objects are also indexed by its value.
        namespace: one namespace, or None for every namespace.
        watch_timeout_s: seconds per watch stream (:data:`WATCH_TIMEOUT_S`).

    ``synced`` is set once a list has been stored and cleared while the informer recovers from
    an error (its data may then be stale). A kind the cluster does not serve counts as synced
    and empty, and is looked up again every :data:`~argosy.operator.kube.MISSING_KIND_RECHECK`
    seconds (KEDA's CRDs installed later).
    """

    def __init__(self, kube: Kube, api_version: str, kind: str, label: str, namespace: Optional[str] = None, *,
                 watch_timeout_s: int = WATCH_TIMEOUT_S):
        self.kube, self.api_version, self.kind, self.label, self.namespace = kube, api_version, kind, label, namespace
        self.watch_timeout_s = watch_timeout_s
        self.synced = threading.Event()
        #: lists made (the first one and every relist after an error), for tests and logs
        self.lists = 0
        self._lock = threading.Lock()
        self._objects: dict[tuple[str, str], dict] = {}  # (namespace, name) -> object
        self._by_value: dict[tuple[str, str], set[str]] = {}  # (namespace, label value) -> names
        #: (namespace, name) -> resourceVersion of a write of ours the cache has not seen yet
        self._pending: dict[tuple[str, str], str] = {}
        self._stop = threading.Event()
        self._watchers: list = []
        self._thread: Optional[threading.Thread] = None

    # -- reading
    def get(self, namespace: str, name: str) -> Optional[dict]:
        """The cached object (shared: do not modify it), None when absent or not synced."""
        if not self.synced.is_set():
            return None
        with self._lock:
            return self._objects.get((namespace, name))

    def by_label(self, namespace: str, value: str) -> Optional[list[dict]]:
        """The cached objects of ``namespace`` whose label is ``value``; None when not synced."""
        if not self.synced.is_set():
            return None
        with self._lock:
            return [self._objects[(namespace, n)] for n in sorted(self._by_value.get((namespace, value), ()))]

    def __len__(self) -> int:
        with self._lock:
            return len(self._objects)

    def expect(self, namespace: str, name: str, resource_version: str) -> None:
        """Note a write of ours that the server answered with ``resource_version``: until the
        cache holds that version of the object (its watch event), :meth:`caught_up` is False
        for it. A write the cache already shows (the event came first) leaves nothing pending."""
        key = (namespace, name)
        with self._lock:
            cur = self._objects.get(key)
            if cur is not None and str((cur.get("metadata") or {}).get("resourceVersion")) == resource_version:
                self._pending.pop(key, None)
            else:
                self._pending[key] = resource_version

    def caught_up(self, namespace: str, name: str) -> bool:
        """Whether the cached object reflects every write :meth:`expect` was told of."""
        with self._lock:
            return (namespace, name) not in self._pending

    # -- the store
    def _put(self, obj: dict) -> None:
        meta = obj.get("metadata") or {}
        key = (meta.get("namespace") or "", meta.get("name") or "")
        self._drop(key)
        self._objects[key] = obj
        if self._pending.get(key) == str(meta.get("resourceVersion")):
            del self._pending[key]  # our write has arrived (later ones arrive after it)
        value = (meta.get("labels") or {}).get(self.label)
        if value is not None:
            self._by_value.setdefault((key[0], value), set()).add(key[1])

    def _drop(self, key: tuple[str, str], deleted: bool = False) -> None:
        if deleted:
            self._pending.pop(key, None)
        old = self._objects.pop(key, None)
        if old is None:
            return
        value = ((old.get("metadata") or {}).get("labels") or {}).get(self.label)
        names = self._by_value.get((key[0], value))
        if names is not None:
            names.discard(key[1])
            if not names:
                del self._by_value[(key[0], value)]

    def _replace(self, items: Iterable[dict]) -> None:
        with self._lock:
            self._objects.clear()
            self._by_value.clear()
            for obj in items:
                self._put(obj)

    def apply_event(self, type_: str, obj: dict) -> None:
        """Fold one watch event into the store (``ADDED``/``MODIFIED`` store the object,
        ``DELETED`` drops it; an object whose label was removed arrives as ``DELETED``
        from a label-selected watch)."""
        with self._lock:
            if type_ in ("ADDED", "MODIFIED"):
                self._put(obj)
            elif type_ == "DELETED":
                meta = obj.get("metadata") or {}
                self._drop((meta.get("namespace") or "", meta.get("name") or ""), deleted=True)

    # -- the thread
    def start(self) -> "Informer":
        """Start the list-and-watch thread (a daemon); returns self."""
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"informer-{self.kind}-{self.namespace or 'all'}")
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread: ends the open watch stream and waits up to ``timeout`` seconds."""
        self._stop.set()
        for w in list(self._watchers):
            try:
                w.stop()
                resp = getattr(w, "_resp", None)
                if resp is not None:
                    resp.close()
            except Exception:  # noqa: BLE001 - best effort: the thread is a daemon
                pass
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        delay = RELIST_DELAY_S
        selector = self.label
        while not self._stop.is_set():
            healthy = False  # a watch delivered an event or ran to its end since the last list
            try:
                items, version = self.kube.list_versioned(self.api_version, self.kind, self.namespace, selector)
                self._replace(items)
                self.lists += 1
                self.synced.set()
                while not self._stop.is_set():
                    self._watchers.clear()
                    for type_, obj in self.kube.watch(self.api_version, self.kind, self.namespace, selector, version,
                                                      self.watch_timeout_s, stopper=self._watchers):
                        healthy = True
                        got = (obj.get("metadata") or {}).get("resourceVersion")
                        if got:
                            version = str(got)
                        if type_ != "BOOKMARK":
                            self.apply_event(type_, obj)
                        if self._stop.is_set():
                            break
                    healthy = True  # the server ended the stream: resume from ``version``
            except KindNotServed:
                self._replace(())
                self.synced.set()  # nothing of that kind can exist
                self._stop.wait(MISSING_KIND_RECHECK)
            except Exception as e:  # noqa: BLE001 - relist after any failure (410 Gone, 403, a dropped socket)
                if self._stop.is_set():
                    break
                self.synced.clear()
                if healthy:
                    delay = RELIST_DELAY_S
                # a watch that fails at once after every list (e.g. 403: a ClusterRole without
                # ``watch``) backs off to RELIST_MAX_DELAY_S instead of listing every second
                logger.warning("watch of %s (%s) failed, listing again in %.0fs: %s", self.kind,
                               self.namespace or "all namespaces", delay, e)
                self._stop.wait(delay)
                delay = min(delay * 2, RELIST_MAX_DELAY_S)


class ChildCache:
    """One :class:`Informer` per ``(apiVersion, kind)`` in ``kinds`` (per namespace in
    ``namespaces``, or cluster-wide when it is None), all selecting ``label``.

    Args:
        kube: the API client wrapper.
        kinds: ``(apiVersion, kind)`` pairs.
        label: the label key every child carries; its value is the owner's name.
        namespaces: the namespaces served, None for all.
    """

    def __init__(self, kube: Kube, kinds: Iterable[tuple[str, str]], label: str,
                 namespaces: Optional[Iterable[str]] = None, *, watch_timeout_s: int = WATCH_TIMEOUT_S):
        spaces = [None] if namespaces is None else list(dict.fromkeys(namespaces))
        self.kube = kube
        self.label = label
        self.informers: dict[tuple[str, str], dict[Optional[str], Informer]] = {
            (av, k): {ns: Informer(kube, av, k, label, ns, watch_timeout_s=watch_timeout_s) for ns in spaces}
            for av, k in kinds}

    def start(self) -> "ChildCache":
        """Start every informer; returns self."""
        for per_ns in self.informers.values():
            for inf in per_ns.values():
                inf.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop every informer, waiting ``timeout`` seconds in all (not per informer) for
        their threads (daemons: one still blocked in a read dies with the process), then
        close the API client's connection pool."""
        for per_ns in self.informers.values():
            for inf in per_ns.values():
                inf._stop.set()
        deadline = time.monotonic() + timeout
        for per_ns in self.informers.values():
            for inf in per_ns.values():
                inf.stop(max(0.0, deadline - time.monotonic()))
        client = getattr(self.kube, "_api_client", None)
        if client is not None and hasattr(client, "close"):
            try:
                client.close()
            except Exception:  # noqa: BLE001 - shutting down
                pass

    def wait_synced(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every informer's first list; True when all have."""
        deadline = time.monotonic() + timeout
        for per_ns in self.informers.values():
            for inf in per_ns.values():
                if not inf.synced.wait(max(0.0, deadline - time.monotonic())):
                    return False
        return True

    def _informer(self, api_version: str, kind: str, namespace: str) -> Optional[Informer]:
        per_ns = self.informers.get((api_version, kind))
        if per_ns is None:
            return None
        cluster_wide = per_ns.get(None)  # (not ``or``: an empty informer is falsy, len() 0)
        return cluster_wide if cluster_wide is not None else per_ns.get(namespace)

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> Optional[dict]:
        """The cached child, None when it is not cached (absent, not synced or not a watched kind:
        ask the API server)."""
        inf = self._informer(api_version, kind, namespace)
        return None if inf is None else inf.get(namespace, name)

    def expect(self, obj: Optional[dict]) -> None:
        """Note a write of ours (``obj``: the server's answer) for :meth:`caught_up`."""
        md = (obj or {}).get("metadata") or {}
        if not md.get("resourceVersion"):
            return
        inf = self._informer(obj.get("apiVersion", ""), obj.get("kind", ""), md.get("namespace") or "")
        if inf is not None:
            inf.expect(md.get("namespace") or "", md.get("name") or "", str(md["resourceVersion"]))

    def caught_up(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        """Whether the cached child reflects this operator's last write of it (its watch
        event has arrived); True for kinds not cached."""
        inf = self._informer(api_version, kind, namespace)
        return True if inf is None else inf.caught_up(namespace, name)

    def owned(self, api_version: str, kind: str, namespace: str, owner: str) -> Optional[list[dict]]:
        """The cached objects of ``kind`` in ``namespace`` labelled ``label=owner``; None when
        the cache cannot say (not synced, not a watched kind): list them from the server."""
        inf = self._informer(api_version, kind, namespace)
        return None if inf is None else inf.by_label(namespace, owner)
