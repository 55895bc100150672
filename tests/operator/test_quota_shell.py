"""The kopf shell's quota and builtin-autoscaler passes, against an in-memory fake of operator.kube.Kube."""

from __future__ import annotations

import copy
import logging
from datetime import datetime, timezone

import pytest

pytest.importorskip("kopf", reason="the kopf shell needs the operator extra")

from argosy.operator import api, handlers  # noqa: E402
from argosy.operator.settings import OperatorSettings  # noqa: E402

from .conftest import make_isvc  # noqa: E402

NOW = datetime(2025, 1, 1, tzinfo=timezone.utc)
LOG = logging.getLogger("test")


class FakeKube:
    def __init__(self, objects):
        self.objects = [copy.deepcopy(o) for o in objects]
        self.applied, self.statuses, self.scaled, self.events = [], [], [], []

    def list(self, api_version, kind, namespace, label_selector):
        return [copy.deepcopy(o) for o in self.objects if o["kind"] == kind and o["apiVersion"] == api_version
                and (namespace is None or o["metadata"].get("namespace") == namespace)]

    def apply(self, manifest):
        self.applied.append(manifest)
        return manifest

    def patch_status(self, api_version, kind, namespace, name, status):
        self.statuses.append((kind, name, status))
        return {}

    def patch_replicas(self, namespace, name, replicas):
        self.scaled.append((namespace, name, replicas))
        return {}

    def post_event(self, obj, type_, reason, message):
        self.events.append((type_, reason, message))
        return {}


def ctx_with(kube):
    ctx = handlers.Context(OperatorSettings())
    ctx._kube = kube
    return ctx


def quota_obj(name="team-a", gpus=8, **spec):
    return {"apiVersion": api.API_VERSION, "kind": "GPUQuota", "metadata": {"name": name, "uid": "q-uid",
                                                                            "generation": 3},
            "spec": {"namespaces": ["ml"], "gpus": gpus, **spec}}


def ns(name, **labels):
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def isvc(name, gpus, min_r, max_r, ready=0, namespace="ml"):
    obj = make_isvc({"model": {"uri": "hf://a/b"}, "resources": {"gpus": gpus},
                     "scaling": {"autoscaler": "keda", "minReplicas": min_r, "maxReplicas": max_r}},
                    name=name, namespace=namespace)
    obj["status"] = {"readyReplicas": ready}
    return obj


def test_converge_quotas_writes_status_and_resource_quotas():
    kube = FakeKube([quota_obj(), ns("ml"), ns("web"), isvc("a", 2, 1, 4, ready=2), isvc("b", 1, 3, 3, ready=3),
                     isvc("c", 4, 1, 1, namespace="web")])
    (status,) = handlers.converge_quotas(ctx_with(kube), now=NOW)
    assert (status["gpusReserved"], status["gpusInUse"], status["gpusRemaining"]) == (5, 7, 3)
    assert status["observedGeneration"] == 3
    assert [s["name"] for s in status["services"]] == ["a", "b"]
    conds = {c["type"]: c for c in status["conditions"]}
    assert conds["Ready"]["status"] == "True" and conds["Exceeded"]["status"] == "False"
    api.GPUQuotaStatus.model_validate(status)
    (rq,) = kube.applied
    assert rq["kind"] == "ResourceQuota" and rq["metadata"]["namespace"] == "ml"
    assert rq["spec"]["hard"] == {"requests.nvidia.com/gpu": "8"}
    assert kube.statuses == [("GPUQuota", "team-a", status)]


def test_quota_cap_from_the_cluster():
    kube = FakeKube([quota_obj(gpus=6), ns("ml"), isvc("a", 2, 1, 10)])
    cap = handlers.quota_cap(kube, "ml", "a")
    assert cap.max_replicas == 3 and cap.limited
    assert handlers.quota_cap(FakeKube([isvc("a", 2, 1, 10)]), "ml", "a") is None


class FakeProm:
    def __init__(self, waiting):
        self.waiting = waiting

    def custom_query(self, query):
        if "num_requests_waiting" in query:
            return [{"metric": {}, "value": [0, str(self.waiting)]}]
        return [{"metric": {}, "value": [0, "0"]}]


def test_builtin_autoscale_scales_and_records():
    obj = make_isvc({"model": {"uri": "hf://a/b"},
                     "scaling": {"autoscaler": "builtin", "minReplicas": 1, "maxReplicas": 8,
                                 "targets": {"waitingRequests": 2}}}, name="b1")
    kube = FakeKube([])
    ctx = ctx_with(kube)
    dep = {"spec": {"replicas": 1}}
    out = handlers.builtin_autoscale(ctx, obj, dep, None, log=LOG, prom=FakeProm(8), clock=lambda: 1000.0)
    assert out["desiredReplicas"] == 4 and out["reason"] == "ScaleUp" and out["lastDecisionTime"]
    assert kube.scaled == [("ml", "b1", 4)]
    assert kube.events and kube.events[0][1] == "BuiltinScaleUp"
    api.AutoscalerStatus.model_validate(out)
    # the quota cap bounds it
    from argosy.operator import quota

    out = handlers.builtin_autoscale(ctx, obj, {"spec": {"replicas": 4}}, quota.Cap(2, True), log=LOG,
                                     prom=FakeProm(100), clock=lambda: 1001.0)
    assert out["desiredReplicas"] == 2 and out["reason"] == "QuotaLimited"
    # not builtin, or no Deployment yet: nothing
    assert handlers.builtin_autoscale(ctx, make_isvc(), dep, None, log=LOG, prom=FakeProm(8)) is None
    assert handlers.builtin_autoscale(ctx, obj, None, None, log=LOG, prom=FakeProm(8)) is None


def test_builtin_autoscale_holds_when_prometheus_fails():
    class Broken:
        def custom_query(self, query):
            raise ConnectionError("refused")

    obj = make_isvc({"model": {"uri": "hf://a/b"},
                     "scaling": {"autoscaler": "builtin", "minReplicas": 1, "maxReplicas": 8}}, name="b2")
    kube = FakeKube([])
    out = handlers.builtin_autoscale(ctx_with(kube), obj, {"spec": {"replicas": 3}}, None, log=LOG, prom=Broken(),
                                     clock=lambda: 5.0)
    assert out["reason"] == "MetricsUnavailable" and out["desiredReplicas"] == 3 and kube.scaled == []
