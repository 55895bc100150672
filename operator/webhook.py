"""The validating admission webhook's HTTPS server: an aiohttp route around :func:`argosy.operator.admission.review`.

Why aiohttp and not kopf's admission server: the Helm chart owns the
ValidatingWebhookConfiguration; the serving certificate comes from cert-manager (a mounted
``kubernetes.io/tls`` Secret, renewed in place) or from the operator itself
(:mod:`argosy.operator.certs`, which also injects the ``caBundle``); serving that pair is one
``ssl.SSLContext`` here, reloaded when its files change (:class:`CertReloader`), while kopf's
webhook servers want to manage the configuration object (and its RBAC) themselves. aiohttp
comes with kopf.

Routes: ``POST /validate/inferenceservices`` (the review) and ``GET /healthz``. The cluster
snapshot (GPUQuotas, InferenceServices, namespace labels) comes from a callable the
operator passes in; it is read in a worker thread per review.

``failurePolicy`` (set in the chart, default ``Fail``): a quota that is skipped whenever the
operator is unreachable is not a quota, and reservations are not something the
ResourceQuota backstop can see (it bounds pods, not ``minReplicas``). The webhook covers
only CREATE and UPDATE of ``inferenceservices`` (never deletes), with a short timeout, so an
operator outage blocks new or growing services and nothing else; ``Ignore`` is available
in the chart for clusters that prefer availability.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

from aiohttp import web

from . import admission

logger = logging.getLogger("argosy.operator.webhook")

PATH = "/validate/inferenceservices"
#: Largest review body accepted (an InferenceService is a few KiB; old + new object).
MAX_BODY = 3 * 1024 * 1024


@dataclass
class Snapshot:
    """What a review needs to know about the cluster."""

    quotas: list[dict] = field(default_factory=list)
    services: list[dict] = field(default_factory=list)
    namespace_labels: Mapping[str, Mapping[str, str]] = field(default_factory=dict)


def make_app(snapshot: Callable[[], Snapshot]) -> web.Application:
    """The aiohttp application. A review runs in a thread and calls ``snapshot`` only when
    its decision needs the cluster (see :func:`argosy.operator.admission.review`); when that
    raises, the answer is HTTP 500 and the API server applies the webhook's ``failurePolicy``."""

    def cluster() -> tuple:
        snap = snapshot()
        return snap.quotas, snap.services, snap.namespace_labels

    async def validate(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            code, out = await asyncio.to_thread(admission.review, body, cluster=cluster)
        except Exception as e:  # noqa: BLE001 - reported to the API server
            return web.json_response({"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": 500,
                                      "reason": "InternalError", "message": f"cannot read quotas: {e}"},
                                     status=500)
        return web.json_response(out, status=code)

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_post(PATH, validate)
    app.router.add_get("/healthz", healthz)
    return app


class CertReloader:
    """Keeps a server ``SSLContext`` serving the current files: :meth:`maybe_reload` loads
    the pair again when either file changed (cert-manager renewing a mounted Secret, the
    operator rotating its own); new handshakes then present the new certificate, without
    a restart.

    Args:
        context: the context the server was started with (from :func:`ssl_context`).
        cert_file, key_file: the PEM files it was loaded from.
    """

    def __init__(self, context: ssl.SSLContext, cert_file: str, key_file: str):
        self.context, self.cert_file, self.key_file = context, cert_file, key_file
        self._seen = self._stamp()

    def _stamp(self) -> tuple:
        out = []
        for path in (self.cert_file, self.key_file):
            try:
                st = os.stat(path)  # mounted Secrets change through a symlink swap: stat follows it
                out.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                out.append(None)
        return tuple(out)

    def maybe_reload(self) -> bool:
        """Reload when the files changed; True when a new pair is now served. A pair that
        does not load (half-written, mismatched) keeps the old one and is retried later."""
        stamp = self._stamp()
        if stamp == self._seen:
            return False
        try:
            self.context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as e:
            logger.warning("webhook certificate changed but does not load yet: %s", e)
            return False
        self._seen = stamp
        logger.info("webhook certificate reloaded from %s", self.cert_file)
        return True


def ssl_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A TLS server context from PEM files (the chart mounts the Secret's tls.crt and tls.key).

    Raises:
        OSError, ssl.SSLError: the files are missing or do not hold a matching pair.
    """
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


async def start(snapshot: Callable[[], Snapshot], port: int, *, host: str = "0.0.0.0",
                tls: Optional[ssl.SSLContext] = None) -> web.AppRunner:
    """Serve the webhook until the returned runner's ``cleanup()`` is awaited."""
    runner = web.AppRunner(make_app(snapshot))
    await runner.setup()
    await web.TCPSite(runner, host, port, ssl_context=tls).start()
    return runner
