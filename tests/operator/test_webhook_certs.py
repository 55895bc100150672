"""The admission webhook's own certificate (issue 12 item 1): without cert-manager the
operator issues a CA and serving certificate into a Secret, fills the webhook
configuration's caBundle, serves the pair, and rotates both before expiry; a changed
pair on disk (cert-manager's renewal, or a rotation) is served without a restart. Real
TLS handshakes check that what the API server trusts is what the operator serves."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import shutil
import ssl
import socket

import kubernetes
import pytest

from argosy.operator import certs, webhook
from argosy.operator.handlers import Context, ensure_webhook_certificate, repair_ca_bundle
from argosy.operator.settings import OperatorSettings

from .apiserver_standin import StandIn

NS = "argosy-system"
VWC = "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations"
SECRET = f"/api/v1/namespaces/{NS}/secrets/argosy-webhook-tls"
HOST = "argosy-webhook.argosy-system.svc"


def _vwc() -> dict:
    hook = {"name": "gpuquota.serving.argosy.dev", "admissionReviewVersions": ["v1"], "sideEffects": "None",
            "clientConfig": {"service": {"name": "argosy-webhook", "namespace": NS, "path": webhook.PATH}},
            "rules": [{"apiGroups": ["serving.argosy.dev"], "apiVersions": ["v1alpha1"],
                       "operations": ["CREATE", "UPDATE"], "resources": ["inferenceservices"]}]}
    return {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": "argosy"}, "webhooks": [hook]}


@pytest.fixture
def cluster():
    with StandIn() as s:
        assert s.http("POST", "/api/v1/namespaces", {"metadata": {"name": NS}})[0] == 201
        assert s.http("POST", VWC, _vwc())[0] == 201
        yield s


def _ctx(standin: StandIn, cert_dir) -> Context:
    config = kubernetes.client.Configuration()
    config.host = standin.url
    settings = OperatorSettings(webhook_port=1, webhook_cert_dir=str(cert_dir), webhook_cert_secret="argosy-webhook-tls",
                                webhook_namespace=NS, webhook_service="argosy-webhook",
                                webhook_configuration="argosy", webhook_cert_validity_days=365,
                                webhook_cert_renew_days=30)
    return Context(settings, api_client=kubernetes.client.ApiClient(config))


def _ca_bundle(standin: StandIn) -> bytes:
    return base64.b64decode(standin.http("GET", f"{VWC}/argosy")[1]["webhooks"][0]["clientConfig"]["caBundle"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serving_setup(cert_dir):
    """The webhook's TLS context from ``cert_dir``, its reloader, and a free port."""
    crt, key = str(cert_dir / "tls.crt"), str(cert_dir / "tls.key")
    tls = webhook.ssl_context(crt, key)
    return tls, webhook.CertReloader(tls, crt, key), _free_port()


async def _handshake(port: int, ca_pem: bytes) -> bytes:
    """Connect as the API server would (trusting ``ca_pem``, checking the Service's DNS
    name) and return the certificate the server presented (DER)."""
    client = ssl.create_default_context(cadata=ca_pem.decode())
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname=HOST)
    try:
        return writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()


def test_issue_inject_serve_and_rotate(cluster, tmp_path):
    ctx = _ctx(cluster, tmp_path / "tls")
    assert ensure_webhook_certificate(ctx) is True
    status, secret = cluster.http("GET", SECRET)
    assert status == 200 and secret["type"] == "kubernetes.io/tls"
    ca = base64.b64decode(secret["data"]["ca.crt"])
    assert _ca_bundle(cluster) == ca
    rv = secret["metadata"]["resourceVersion"]
    assert ensure_webhook_certificate(ctx) is False  # valid: nothing rewritten
    assert cluster.http("GET", SECRET)[1]["metadata"]["resourceVersion"] == rv

    tls, reloader, port = _serving_setup(tmp_path / "tls")

    async def scenario():
        runner = await webhook.start(lambda: webhook.Snapshot(), port, host="127.0.0.1", tls=tls)
        try:
            first = await _handshake(port, ca)  # the API server's view: trusted, right name
            # 340 days later the pair is within 30 days of expiry: a new CA and certificate
            later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=340)
            assert await asyncio.to_thread(ensure_webhook_certificate, ctx, later) is True
            new_ca = _ca_bundle(cluster)
            assert new_ca != ca and base64.b64decode(cluster.http("GET", SECRET)[1]["data"]["ca.crt"]) == new_ca
            assert new_ca.endswith(ca)  # the old CA stays trusted through the switch
            await _handshake(port, new_ca)  # the old certificate (not reloaded yet) still verifies
            assert reloader.maybe_reload() is True and reloader.maybe_reload() is False
            second = await _handshake(port, new_ca)  # served without a restart
            assert second != first
            with pytest.raises(ssl.SSLCertVerificationError):
                await _handshake(port, ca)  # the old CA no longer verifies what is served
        finally:
            await runner.cleanup()

    asyncio.run(scenario())
    # a wiped caBundle (configuration recreated, Helm upgrade) is put back from the served CA
    code, _ = cluster.http("PATCH", f"{VWC}/argosy", [{"op": "remove", "path": "/webhooks/0/clientConfig/caBundle"}],
                           content_type="application/json-patch+json")
    assert code == 200
    assert repair_ca_bundle(ctx) is True and _ca_bundle(cluster) == (tmp_path / "tls" / "ca.crt").read_bytes()
    assert repair_ca_bundle(ctx) is False


def test_mounted_files_are_reloaded(tmp_path):
    """cert-manager renews the mounted Secret: the new pair is served on the next check."""
    names = certs.service_dns_names("argosy-webhook", NS)
    a, b = certs.generate(names, 90), certs.generate(names, 90)
    certs.write_files(str(tmp_path), a)
    tls, reloader, port = _serving_setup(tmp_path)

    async def scenario():
        runner = await webhook.start(lambda: webhook.Snapshot(), port, host="127.0.0.1", tls=tls)
        try:
            await _handshake(port, a.ca)
            staging = tmp_path / "staging"
            certs.write_files(str(staging), b)
            for name in ("tls.key", "tls.crt"):  # not atomic as a pair: a half-written state first
                shutil.copy(staging / name, tmp_path / name)
                if name == "tls.key":
                    assert reloader.maybe_reload() is False  # key and certificate disagree: keep serving a
            assert reloader.maybe_reload() is True
            await _handshake(port, b.ca)
        finally:
            await runner.cleanup()

    asyncio.run(scenario())


def test_rotation_reasons():
    names = certs.service_dns_names("argosy-webhook", NS)
    now = dt.datetime.now(dt.timezone.utc)
    good = certs.generate(names, 365, now)
    assert certs.rotation_reason(good, names, 30, now) is None
    assert "expires" in certs.rotation_reason(good, names, 30, now + dt.timedelta(days=340))
    assert "the Service needs" in certs.rotation_reason(good, certs.service_dns_names("other", NS), 30, now)
    other = certs.generate(names, 365, now)
    assert "not signed" in certs.rotation_reason(certs.Pems(other.ca, good.cert, good.key), names, 30, now)
    assert "does not match" in certs.rotation_reason(certs.Pems(good.ca, good.cert, other.key), names, 30, now)
    assert certs.rotation_reason(None, names, 30, now) == "no certificate yet"
