"""The webhook's HTTPS server on loopback: real TLS (a throw-away certificate from openssl), real JSON."""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess

import pytest

aiohttp = pytest.importorskip("aiohttp")

from argosy.operator import webhook  # noqa: E402

from .test_admission import QUOTA, isvc, review_of, stored  # noqa: E402


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(d / "tls.key"), "-out", str(d / "tls.crt")], check=True, capture_output=True)
    return str(d / "tls.crt"), str(d / "tls.key")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_webhook_over_tls(cert):
    crt, key = cert
    snap = webhook.Snapshot(quotas=[QUOTA], services=[stored(isvc("other", gpus=2, min_r=3))],
                            namespace_labels={"ml": {}})

    async def main():
        port = free_port()
        runner = await webhook.start(lambda: snap, port, host="127.0.0.1", tls=webhook.ssl_context(crt, key))
        client_ctx = ssl.create_default_context(cafile=crt)
        try:
            async with aiohttp.ClientSession() as http:
                base = f"https://127.0.0.1:{port}"
                async with http.get(base + "/healthz", ssl=client_ctx) as r:
                    assert r.status == 200
                async with http.post(base + webhook.PATH, data=review_of(isvc(gpus=2, min_r=1)), ssl=client_ctx,
                                     headers={"Content-Type": "application/json"}) as r:
                    ok = (r.status, await r.json())
                async with http.post(base + webhook.PATH, data=review_of(isvc(gpus=2, min_r=2)), ssl=client_ctx,
                                     headers={"Content-Type": "application/json"}) as r:
                    denied = (r.status, await r.json())
                async with http.post(base + webhook.PATH, data=b"{broken", ssl=client_ctx) as r:
                    bad = (r.status, await r.json())
        finally:
            await runner.cleanup()
        return ok, denied, bad

    ok, denied, bad = asyncio.run(main())
    assert ok[0] == 200 and ok[1]["response"]["allowed"] is True
    assert denied[0] == 200 and denied[1]["response"]["allowed"] is False
    assert "GPUQuota team-a" in denied[1]["response"]["status"]["message"]
    assert bad[0] == 400 and bad[1]["reason"] == "BadRequest"


def test_snapshot_failure_is_a_500():
    def broken():
        raise RuntimeError("apiserver down")

    async def main():
        port = free_port()
        runner = await webhook.start(broken, port, host="127.0.0.1")
        try:
            async with aiohttp.ClientSession() as http:
                async with http.post(f"http://127.0.0.1:{port}{webhook.PATH}",
                                     data=review_of(stored(isvc()))) as r:  # a create: needs the quotas
                    return r.status, await r.json()
        finally:
            await runner.cleanup()

    status, body = asyncio.run(main())
    assert status == 500 and "apiserver down" in body["message"]
