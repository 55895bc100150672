"""The chart's ValidatingWebhookConfiguration, exercised the way kube-apiserver exercises
it (issue 12): the stand-in sends InferenceService writes to the operator's webhook
server over real TLS, trusting only the ``caBundle`` the operator injected, for the
Service's DNS name, with the configuration's rules, ``matchConditions`` and
``failurePolicy``. The operator's settings are the ones the chart's Deployment sets."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import socket
import threading

import kubernetes
import pytest

from argosy.operator import api, certs, webhook
from argosy.operator.handlers import Context, ensure_webhook_certificate
from argosy.operator.settings import OperatorSettings

from .apiserver_standin import MERGE_PATCH, StandIn
from .test_admission import QUOTA, isvc

CRDS = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
VWC = "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations"
ISVCS = f"/apis/{api.GROUP}/{api.VERSION}/namespaces/ml/{api.PLURAL}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebhookServer:
    """The operator's webhook server (its aiohttp app and TLS context) on its own loop."""

    def __init__(self, snapshot, port: int, cert_dir):
        self.snapshot, self.port = snapshot, port
        self.tls = webhook.ssl_context(str(cert_dir / "tls.crt"), str(cert_dir / "tls.key"))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        self.runner = asyncio.run_coroutine_threadsafe(
            webhook.start(self.snapshot, self.port, host="127.0.0.1", tls=self.tls), self.loop).result(10)
        return self

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def chart_webhook(helm_env, tmp_path_factory):
    """What ``helm template`` renders with the webhook on: the configuration, and the
    operator's settings from its Deployment's environment."""
    from .test_helm import NAMESPACE, operator_container, template

    objs = template(helm_env, tmp_path_factory.mktemp("webhook-values"), {"webhook": {"enabled": True}})
    (vwc,) = [o for o in objs if o["kind"] == "ValidatingWebhookConfiguration"]
    env = {e["name"]: e["value"] for e in operator_container(objs).get("env", []) if "value" in e}
    settings = OperatorSettings.from_env(env)
    return vwc, dataclasses.replace(settings, webhook_namespace=settings.webhook_namespace or NAMESPACE), NAMESPACE


def test_the_chart_webhook_is_called_over_tls_as_configured(chart_webhook, crd, tmp_path):
    vwc, settings, release_ns = chart_webhook
    port = _free_port()
    hook = vwc["webhooks"][0]
    svc = hook["clientConfig"]["service"]
    assert "caBundle" not in hook["clientConfig"]  # the chart renders no key material
    settings = dataclasses.replace(settings, webhook_port=port, webhook_cert_dir=str(tmp_path / "tls"))
    with StandIn(services={(svc["namespace"], svc["name"]): ("127.0.0.1", port)}) as s:
        assert s.http("POST", CRDS, crd)[0] == 201
        for ns in (release_ns, "ml"):
            assert s.http("POST", "/api/v1/namespaces", {"metadata": {"name": ns}})[0] == 201
        assert s.http("POST", VWC, vwc)[0] == 201
        config = kubernetes.client.Configuration()
        config.host = s.url
        ctx = Context(settings, api_client=kubernetes.client.ApiClient(config))
        assert ensure_webhook_certificate(ctx) is True  # the operator's own CA, injected as caBundle

        reviews = []

        def snapshot() -> webhook.Snapshot:  # what the operator reads: the live services
            reviews.append(1)
            items = s.http("GET", ISVCS)[1]["items"]
            return webhook.Snapshot(quotas=[QUOTA], services=items, namespace_labels={"ml": {}})

        with WebhookServer(snapshot, port, tmp_path / "tls"):
            # within the quota (4 of 8 GPUs): admitted through the webhook
            assert s.http("POST", ISVCS, isvc("a", gpus=2, min_r=2))[0] == 201
            assert len(reviews) == 1 and s.webhook_calls == [(hook["name"], "CREATE", api.PLURAL, "a")]
            # labels only, and a status write: matchConditions / rules keep them away from it
            assert s.http("PATCH", f"{ISVCS}/a", {"metadata": {"labels": {"x": "1"}}}, content_type=MERGE_PATCH)[0] \
                == 200
            assert s.http("PATCH", f"{ISVCS}/a/status", {"status": {"replicas": 1}}, content_type=MERGE_PATCH)[0] \
                == 200
            assert len(reviews) == 1 and len(s.webhook_calls) == 1  # not sent
            # over the quota: the webhook's denial, worded as the API server words it
            code, body = s.http("POST", ISVCS, isvc("b", gpus=2, min_r=3))
            assert code == 403 and body["message"].startswith(
                f'admission webhook "{hook["name"]}" denied the request: '), body
            assert "GPUQuota team-a" in body["message"]
            assert s.http("GET", f"{ISVCS}/b")[0] == 404  # nothing stored
            # growing a service is reviewed too
            code, body = s.http("PATCH", f"{ISVCS}/a", {"spec": {"resources": {"gpus": 5}}},
                                content_type=MERGE_PATCH)
            assert code == 403, body
            # kubectl scale (the scale subresource writes spec.scaling.minReplicas): reviewed too
            assert s.http("PATCH", f"{ISVCS}/a", {"spec": {"scaling": {"maxReplicas": 8}}},
                          content_type=MERGE_PATCH)[0] == 200  # a higher bound reserves nothing
            code, scale = s.http("GET", f"{ISVCS}/a/scale")
            assert code == 200 and scale["kind"] == "Scale" and scale["spec"]["replicas"] == 2, scale
            calls = len(s.webhook_calls)
            code, body = s.http("PATCH", f"{ISVCS}/a/scale", {"spec": {"replicas": 5}}, content_type=MERGE_PATCH)
            assert code == 403 and "GPUQuota team-a" in body["message"], body  # 10 of 8 GPUs
            assert s.webhook_calls[calls:] == [(hook["name"], "UPDATE", api.PLURAL, "a")]
            assert s.http("GET", f"{ISVCS}/a")[1]["spec"]["scaling"]["minReplicas"] == 2
            code, body = s.http("PATCH", f"{ISVCS}/a/scale", {"spec": {"replicas": 3}}, content_type=MERGE_PATCH)
            assert code == 200 and body["spec"]["replicas"] == 3, body  # 6 of 8
            assert s.http("GET", f"{ISVCS}/a")[1]["spec"]["scaling"]["minReplicas"] == 3
            code, body = s.http("PATCH", f"{ISVCS}/a/scale", {"spec": {"replicas": 9}}, content_type=MERGE_PATCH)
            assert code == 422 and "minReplicas must not exceed maxReplicas" in body["message"], body
            code, body = s.http("PUT", f"{ISVCS}/a/scale", {**scale, "spec": {"replicas": 1}})
            assert code == 409, body  # the Scale read before the writes above is stale
            scale = s.http("GET", f"{ISVCS}/a/scale")[1]
            assert s.http("PUT", f"{ISVCS}/a/scale", {**scale, "spec": {"replicas": 1}})[0] == 200
            # a caBundle that does not sign what the webhook serves (the chart's old failure
            # after an upgrade): with failurePolicy Fail every write is refused
            other_ca = certs.generate(certs.service_dns_names(svc["name"], svc["namespace"]), 30).ca
            patch = [{"op": "replace", "path": "/webhooks/0/clientConfig/caBundle",
                      "value": base64.b64encode(other_ca).decode()}]
            assert s.http("PATCH", f"{VWC}/{vwc['metadata']['name']}", patch,
                          content_type="application/json-patch+json")[0] == 200
            code, body = s.http("POST", ISVCS, isvc("c", gpus=0, min_r=1))
            assert code == 500 and f'failed calling webhook "{hook["name"]}"' in body["message"], body
            assert "CERTIFICATE_VERIFY_FAILED" in body["message"] or "certificate verify failed" in body["message"]
            # ... and the operator puts its CA back (its periodic check), which admits again
            from argosy.operator.handlers import repair_ca_bundle

            assert repair_ca_bundle(ctx) is True
            assert s.http("POST", ISVCS, isvc("c", gpus=0, min_r=1))[0] == 201
            held = isvc("e", gpus=0, min_r=1)
            held["metadata"]["finalizers"] = ["example.com/hold"]
            assert s.http("POST", ISVCS, held)[0] == 201
        # the webhook unreachable: Fail refuses; the configuration's Ignore would admit
        code, body = s.http("POST", ISVCS, isvc("d", gpus=0, min_r=1))
        assert code == 500 and "failed calling webhook" in body["message"], body
        # ... but an object being deleted can still lose its finalizer (matchConditions keep
        # it away from the webhook): an operator outage does not wedge deletions
        assert s.http("DELETE", f"{ISVCS}/e")[0] == 200
        assert s.http("PATCH", f"{ISVCS}/e", {"metadata": {"finalizers": None}}, content_type=MERGE_PATCH)[0] == 200
        assert s.http("GET", f"{ISVCS}/e")[0] == 404
        patch = [{"op": "replace", "path": "/webhooks/0/failurePolicy", "value": "Ignore"}]
        s.http("PATCH", f"{VWC}/{vwc['metadata']['name']}", patch, content_type="application/json-patch+json")
        assert s.http("POST", ISVCS, isvc("d", gpus=0, min_r=1))[0] == 201
