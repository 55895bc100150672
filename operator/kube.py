"""The few Kubernetes API calls the operator makes, through the ``kubernetes`` client's DynamicClient.

Every call is synchronous (the kopf handlers that use it run in kopf's thread pool) and
works on plain dicts. Children are written with server-side apply (``PATCH`` with
``application/apply-patch+yaml``, ``fieldManager=argosy-operator``, ``force=true``: the
operator is the authority on the fields it sets, Kubernetes "Server-Side Apply" docs);
status goes through the ``status`` subresource as a JSON merge patch.

Errors come out as ``kubernetes.dynamic.exceptions.DynamicApiError`` (with ``.status``,
the HTTP code), ``urllib3`` errors for connection failures, and :class:`KindNotServed`.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone
from typing import Any, Iterator, Optional

#: Field manager of everything the operator applies (Kubernetes "Server-Side Apply").
FIELD_MANAGER = "argosy-operator"
#: Seconds before a kind the cluster did not serve is looked up again (e.g. KEDA installed later).
MISSING_KIND_RECHECK = 300.0


#: Default seconds one API call may take (``_request_timeout`` of the kubernetes client).
REQUEST_TIMEOUT_S = 30.0


class KindNotServed(RuntimeError):
    """The cluster does not serve ``apiVersion``/``kind`` (e.g. KEDA's CRDs are not installed)."""

    def __init__(self, api_version: str, kind: str):
        super().__init__(f"the cluster does not serve {kind} ({api_version}); install its CRDs or change the spec")
        self.api_version, self.kind = api_version, kind


def load_api_client() -> Any:
    """An ``ApiClient`` from the in-cluster service account, else from the kubeconfig (the
    same order kopf's own login uses).

    Raises:
        kubernetes.config.ConfigException: neither is available.
    """
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


class Kube:
    """get / list / apply / delete / patch_status for objects given as dicts.

    Args:
        api_client: a configured ``kubernetes.client.ApiClient``.
        cache_file: where the DynamicClient caches discovery (default: its file in the temp dir).
        request_timeout: seconds any one API call may take (discovery included).
    """

    def __init__(self, api_client: Any, *, cache_file: Optional[str] = None, field_manager: str = FIELD_MANAGER,
                 request_timeout: float = REQUEST_TIMEOUT_S):
        self._api_client = api_client
        self._cache_file = cache_file
        self.field_manager = field_manager
        #: seconds any one API call may take (connect + read): a hung socket fails the call
        #: (and the pass is retried) instead of stalling the operator's loop
        self.request_timeout = request_timeout
        # the same bound for calls made without one (the DynamicClient's discovery passes
        # _request_timeout=None, which urllib3 reads as "wait forever")
        call_api = getattr(api_client, "call_api", None)
        if call_api is not None and not getattr(call_api, "_argosy_bounded", False):
            def bounded(*args: Any, **kwargs: Any) -> Any:
                if kwargs.get("_request_timeout") is None:
                    kwargs["_request_timeout"] = request_timeout
                return call_api(*args, **kwargs)

            bounded._argosy_bounded = True  # type: ignore[attr-defined]
            api_client.call_api = bounded
        self._lock = threading.Lock()
        self._dynamic: Any = None
        self._resources: dict[tuple[str, str], Any] = {}
        self._missing: dict[tuple[str, str], float] = {}

    def _client(self) -> Any:
        if self._dynamic is None:
            from kubernetes import dynamic

            self._dynamic = dynamic.DynamicClient(self._api_client, cache_file=self._cache_file)
        return self._dynamic

    def resource(self, api_version: str, kind: str) -> Optional[Any]:
        """The discovered API resource for ``apiVersion``/``kind``, None when the cluster does not serve it."""
        from kubernetes.dynamic.exceptions import ResourceNotFoundError

        key = (api_version, kind)
        with self._lock:
            if key in self._resources:
                return self._resources[key]
            if time.monotonic() - self._missing.get(key, -MISSING_KIND_RECHECK) < MISSING_KIND_RECHECK:
                return None
            try:
                found = self._client().resources.get(api_version=api_version, kind=kind)
            except ResourceNotFoundError:
                self._missing[key] = time.monotonic()
                return None
            self._resources[key] = found
            return found

    def _served(self, api_version: str, kind: str) -> Any:
        res = self.resource(api_version, kind)
        if res is None:
            raise KindNotServed(api_version, kind)
        return res

    def get(self, api_version: str, kind: str, namespace: Optional[str], name: str) -> Optional[dict]:
        """The object, or None when it (or its kind) does not exist."""
        from kubernetes.dynamic.exceptions import NotFoundError

        res = self.resource(api_version, kind)
        if res is None:
            return None
        try:
            return res.get(name=name, namespace=namespace, _request_timeout=self.request_timeout).to_dict()
        except NotFoundError:
            return None

    def list(self, api_version: str, kind: str, namespace: Optional[str], label_selector: str,
             field_selector: str = "") -> list[dict]:
        """Objects matching a label selector and a field selector (``[]`` when the kind is not served)."""
        res = self.resource(api_version, kind)
        if res is None:
            return []
        extra = {"field_selector": field_selector} if field_selector else {}
        items = res.get(namespace=namespace, label_selector=label_selector,
                        _request_timeout=self.request_timeout, **extra).to_dict().get("items") or []
        for item in items:  # list items may come without them
            item.setdefault("apiVersion", api_version)
            item.setdefault("kind", kind)
        return items

    def list_versioned(self, api_version: str, kind: str, namespace: Optional[str],
                       label_selector: str) -> tuple[list[dict], str]:
        """The objects matching ``label_selector`` and the collection's ``resourceVersion`` (the
        point a watch of the same collection starts from, Kubernetes "Efficient detection of
        changes").

        Raises:
            KindNotServed: the cluster does not serve the kind.
        """
        res = self._served(api_version, kind)
        got = res.get(namespace=namespace, label_selector=label_selector,
                      _request_timeout=self.request_timeout).to_dict()
        items = got.get("items") or []
        for item in items:
            item.setdefault("apiVersion", api_version)
            item.setdefault("kind", kind)
        return items, str((got.get("metadata") or {}).get("resourceVersion") or "")

    def watch(self, api_version: str, kind: str, namespace: Optional[str], label_selector: str,
              resource_version: str, timeout_s: int, stopper: Optional[list] = None) -> Iterator[tuple[str, dict]]:
        """Watch events after ``resource_version``: ``(type, object)`` with type ``ADDED``,
        ``MODIFIED``, ``DELETED`` or ``BOOKMARK`` (bookmarks asked for, Kubernetes API
        concepts "Watch bookmarks"), until the server ends the stream after ``timeout_s``
        seconds (``timeoutSeconds``). The socket's read timeout is ``timeout_s`` plus
        :attr:`request_timeout`, so a silent dead connection ends the stream too.

        ``stopper``: a list the open ``kubernetes.watch.Watch`` is appended to, for another
        thread to ``stop()`` it.

        Raises:
            KindNotServed: the cluster does not serve the kind.
            kubernetes.client.exceptions.ApiException: an ``ERROR`` event, e.g. 410 Gone when
                ``resource_version`` is too old (list again).
        """
        import json

        from kubernetes import watch as kwatch

        res = self._served(api_version, kind)
        # return_type "object": events are parsed to dicts and keep their raw_object, which the
        # client's ERROR handling reads (with deserialize=False it fails on a KeyError instead)
        w = kwatch.Watch(return_type="object")
        if stopper is not None:
            stopper.append(w)
        for event in w.stream(res.get, namespace=namespace, label_selector=label_selector,
                              resource_version=resource_version, timeout_seconds=int(timeout_s),
                              allow_watch_bookmarks=True, serialize=False,
                              _request_timeout=(self.request_timeout, timeout_s + self.request_timeout)):
            if isinstance(event, (str, bytes)):
                event = json.loads(event)
            obj = event.get("object") or {}
            if event.get("type") == "ERROR":
                from kubernetes.client.exceptions import ApiException

                raise ApiException(status=obj.get("code"), reason=f"{obj.get('reason')}: {obj.get('message')}")
            if event.get("type") != "BOOKMARK":
                obj.setdefault("apiVersion", api_version)
                obj.setdefault("kind", kind)
            yield event["type"], obj

    def apply(self, manifest: dict, field_manager: Optional[str] = None) -> dict:
        """Server-side apply ``manifest`` as ``field_manager`` (default :attr:`field_manager`),
        taking over conflicting fields.

        Raises:
            KindNotServed: the cluster does not serve the manifest's kind.
        """
        res = self._served(manifest["apiVersion"], manifest["kind"])
        meta = manifest["metadata"]
        return self._client().server_side_apply(
            res, body=manifest, name=meta["name"], namespace=meta.get("namespace"),
            field_manager=field_manager or self.field_manager, force_conflicts=True,
            _request_timeout=self.request_timeout).to_dict()

    def delete(self, obj: dict, propagation: str = "Background") -> None:
        """Delete an object and (``Background``) its dependents; a missing object is fine."""
        from kubernetes.dynamic.exceptions import NotFoundError

        res = self.resource(obj["apiVersion"], obj["kind"])
        if res is None:
            return
        meta = obj["metadata"]
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": propagation}
        if meta.get("uid"):
            body["preconditions"] = {"uid": meta["uid"]}
        try:
            res.delete(name=meta["name"], namespace=meta.get("namespace"), body=body,
                       _request_timeout=self.request_timeout)
        except NotFoundError:
            pass

    def post_event(self, obj: dict, type_: str, reason: str, message: str) -> dict:
        """Create a core/v1 Event about ``obj`` (``type_`` ``Normal`` or ``Warning``, CamelCase
        ``reason``), the kind ``kubectl describe`` lists, reported by :attr:`field_manager`."""
        meta = obj["metadata"]
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta.get("namespace") or "default"},
            "involvedObject": {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": meta["name"],
                               "namespace": meta.get("namespace"), "uid": meta.get("uid"),
                               "resourceVersion": meta.get("resourceVersion")},
            "type": type_, "reason": reason, "message": message[:1024],
            "source": {"component": self.field_manager}, "reportingComponent": self.field_manager,
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        }
        res = self._served("v1", "Event")
        return self._client().create(res, body=event, namespace=event["metadata"]["namespace"],
                                     _request_timeout=self.request_timeout).to_dict()

    def patch_status(self, api_version: str, kind: str, namespace: Optional[str], name: str, status: dict) -> dict:
        """JSON-merge-patch ``status`` through the ``status`` subresource.

        Raises:
            KindNotServed: the kind (or its status subresource) is not served.
        """
        res = self._served(api_version, kind)
        sub = res.subresources.get("status") if getattr(res, "subresources", None) else None
        if sub is None:
            raise KindNotServed(f"{api_version} (status subresource)", kind)
        return self._client().patch(sub, body={"status": status}, name=name, namespace=namespace,
                                    content_type="application/merge-patch+json",
                                    _request_timeout=self.request_timeout).to_dict()

    def json_patch(self, api_version: str, kind: str, namespace: Optional[str], name: str, ops: list[dict]) -> dict:
        """Apply a JSON patch (RFC 6902) to an object.

        Raises:
            KindNotServed: the kind is not served.
            kubernetes.dynamic.exceptions.DynamicApiError: e.g. 422 when a ``test`` fails.
        """
        res = self._served(api_version, kind)
        return self._client().patch(res, body=ops, name=name, namespace=namespace,
                                    content_type="application/json-patch+json",
                                    _request_timeout=self.request_timeout).to_dict()

    def patch_replicas(self, namespace: str, name: str, replicas: int) -> dict:
        """Set a Deployment's ``spec.replicas`` through its ``scale`` subresource (what
        ``kubectl scale`` does), leaving the applied manifest's fields alone.

        Raises:
            KindNotServed: Deployments (or their scale subresource) are not served.
        """
        res = self._served("apps/v1", "Deployment")
        sub = res.subresources.get("scale") if getattr(res, "subresources", None) else None
        if sub is None:
            raise KindNotServed("apps/v1 (scale subresource)", "Deployment")
        return self._client().patch(sub, body={"spec": {"replicas": replicas}}, name=name, namespace=namespace,
                                    content_type="application/merge-patch+json",
                                    _request_timeout=self.request_timeout).to_dict()
