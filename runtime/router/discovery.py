"""Upstreams from a Kubernetes Service's EndpointSlices (``discovery.k8s.io/v1``), watched.

``argosy router --upstream-service NAME [--namespace NS]`` follows the EndpointSlices
labelled ``kubernetes.io/service-name=NAME`` (list, then watch from the list's
resourceVersion; a 410 Gone or a dropped stream lists again) and routes to the
endpoints whose ``conditions.ready`` is true (a missing condition counts as ready, as the
API documents), at the slice's port named ``--upstream-port-name`` (default ``http``; a
slice with a single port uses it). It needs ``get``, ``list`` and ``watch`` on
``endpointslices`` in that namespace. The watch runs on a thread with the ``kubernetes``
client; each change replaces the router's upstream list on its event loop.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Optional

logger = logging.getLogger("argosy.router")

SERVICE_NAME_LABEL = "kubernetes.io/service-name"


def ready_urls(slices: list[dict], port_name: str = "http") -> list[str]:
    """``http://ADDRESS:PORT`` of every ready endpoint in ``slices`` (EndpointSlice objects
    as dicts, API field names), sorted, without duplicates.

    An endpoint is ready unless ``conditions.ready`` is false; a slice's port is the one
    named ``port_name``, or its only port; slices with neither are skipped.
    """
    urls = set()
    for s in slices:
        ports = s.get("ports") or []
        port = next((p.get("port") for p in ports if p.get("name") == port_name), None)
        if port is None and len(ports) == 1:
            port = ports[0].get("port")
        if port is None:
            continue
        for ep in s.get("endpoints") or []:
            if (ep.get("conditions") or {}).get("ready") is False:
                continue
            for addr in (ep.get("addresses") or [])[:1]:  # one address per endpoint (the API's rule)
                host = f"[{addr}]" if ":" in addr else addr
                urls.add(f"http://{host}:{port}")
    return sorted(urls)


class EndpointSliceWatcher:
    """Watches one Service's EndpointSlices and reports the ready URLs on every change.

    Args:
        service / namespace: the Service whose slices to follow.
        on_change: called (on the watcher's thread) with the sorted ready URLs.
        port_name: the slice port to use (see :func:`ready_urls`).
        kubeconfig: a kubeconfig file; None = in-cluster config, else ``$KUBECONFIG`` /
            ``~/.kube/config``.
    Raises:
        ImportError: the ``kubernetes`` package is missing (``pip install 'argosy[router]'``).
    """

    def __init__(self, service: str, namespace: str, on_change: Callable[[list[str]], None],
                 port_name: str = "http", kubeconfig: Optional[str] = None):
        import kubernetes  # noqa: F401  (fail at start, not on the thread)

        self.service, self.namespace, self.port_name = service, namespace, port_name
        self.on_change = on_change
        self.kubeconfig = kubeconfig
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._slices: dict[str, dict] = {}
        self._last: Optional[list[str]] = None

    def _api(self):
        from kubernetes import client, config

        if self.kubeconfig:
            cfg = client.Configuration()
            config.load_kube_config(config_file=self.kubeconfig, client_configuration=cfg)
        else:
            cfg = client.Configuration()
            try:
                config.load_incluster_config(client_configuration=cfg)
            except config.ConfigException:
                config.load_kube_config(client_configuration=cfg)
        return client.DiscoveryV1Api(client.ApiClient(cfg))

    def _publish(self) -> None:
        urls = ready_urls(list(self._slices.values()), self.port_name)
        if urls != self._last:
            self._last = urls
            logger.info("service %s/%s: %d ready upstream(s)", self.namespace, self.service, len(urls))
            self.on_change(urls)

    def _run(self) -> None:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        api = self._api()
        selector = f"{SERVICE_NAME_LABEL}={self.service}"
        while not self._stop.is_set():
            try:
                lst = api.list_namespaced_endpoint_slice(self.namespace, label_selector=selector,
                                                         _request_timeout=30)
                self._slices = {s.metadata.name: api.api_client.sanitize_for_serialization(s) for s in lst.items}
                self._publish()
                w = watch.Watch()
                for ev in w.stream(api.list_namespaced_endpoint_slice, self.namespace, label_selector=selector,
                                   resource_version=lst.metadata.resource_version, timeout_seconds=300,
                                   _request_timeout=330):
                    if self._stop.is_set():
                        w.stop()
                        break
                    obj = api.api_client.sanitize_for_serialization(ev["object"])
                    name = (obj.get("metadata") or {}).get("name")
                    if ev["type"] == "DELETED":
                        self._slices.pop(name, None)
                    elif ev["type"] in ("ADDED", "MODIFIED"):
                        self._slices[name] = obj
                    self._publish()
            except ApiException as e:
                if e.status != 410:  # 410 Gone: our resourceVersion is too old; list again
                    logger.warning("EndpointSlice watch for %s/%s failed: %s %s", self.namespace, self.service,
                                   e.status, e.reason)
                    self._stop.wait(2.0)
            except Exception as e:  # noqa: BLE001 - network trouble: retry, never die
                logger.warning("EndpointSlice watch for %s/%s: %s: %s", self.namespace, self.service,
                               type(e).__name__, e)
                self._stop.wait(2.0)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="endpointslice-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()


def in_cluster_namespace() -> Optional[str]:
    """The pod's namespace from its service-account mount, or None outside a cluster."""
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
            return f.read().strip() or None
    except OSError:
        return None


