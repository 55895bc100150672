"""The validating webhook's handler on real AdmissionReview JSON (admission.k8s.io/v1)."""

from __future__ import annotations

import copy
import json

import pytest

from argosy.operator import admission, api

QUOTA = {"apiVersion": api.API_VERSION, "kind": "GPUQuota", "metadata": {"name": "team-a", "uid": "q1"},
         "spec": {"namespaces": ["ml"], "gpus": 8}}


def isvc(name="llm", *, gpus=2, min_r=1, max_r=4, namespace=None):
    meta = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": meta,
            "spec": {"model": {"uri": "hf://HuggingFaceTB/SmolLM2-135M-Instruct"},
                     "resources": {"gpus": gpus},
                     "scaling": {"minReplicas": min_r, "maxReplicas": max_r, "autoscaler": "keda"}}}


# What kube-apiserver sends (fields as in the admission.k8s.io/v1 AdmissionReview reference).
REVIEW_JSON = """
{
  "kind": "AdmissionReview",
  "apiVersion": "admission.k8s.io/v1",
  "request": {
    "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
    "kind": {"group": "serving.argosy.dev", "version": "v1alpha1", "kind": "InferenceService"},
    "resource": {"group": "serving.argosy.dev", "version": "v1alpha1", "resource": "inferenceservices"},
    "requestKind": {"group": "serving.argosy.dev", "version": "v1alpha1", "kind": "InferenceService"},
    "requestResource": {"group": "serving.argosy.dev", "version": "v1alpha1", "resource": "inferenceservices"},
    "name": "llm",
    "namespace": "ml",
    "operation": "CREATE",
    "userInfo": {"username": "admin", "uid": "014fbff9a07c", "groups": ["system:authenticated"]},
    "object": null,
    "oldObject": null,
    "dryRun": false,
    "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
  }
}
"""


def review_of(obj, operation="CREATE", old=None) -> bytes:
    body = json.loads(REVIEW_JSON)
    body["request"]["object"] = obj
    body["request"]["operation"] = operation
    body["request"]["oldObject"] = old
    return json.dumps(body).encode()


def call(body, services=(), quotas=(QUOTA,)):
    return admission.review(body, quotas=list(quotas), services=list(services), namespace_labels={"ml": {}})


def stored(obj, ns="ml"):
    obj = copy.deepcopy(obj)
    obj["metadata"]["namespace"] = ns
    return obj


def test_allowed():
    code, out = call(review_of(isvc(gpus=2, min_r=2)))
    assert code == 200 and out["apiVersion"] == "admission.k8s.io/v1" and out["kind"] == "AdmissionReview"
    assert out["response"] == {"uid": "705ab4f5-6393-11e8-b7cc-42010a800002", "allowed": True}


def test_denied_with_message():
    others = [stored(isvc("other", gpus=2, min_r=3))]  # 6 of 8 reserved
    code, out = call(review_of(isvc(gpus=2, min_r=2)), services=others)
    assert code == 200
    r = out["response"]
    assert r["uid"] == "705ab4f5-6393-11e8-b7cc-42010a800002" and r["allowed"] is False
    assert r["status"]["code"] == 403 and r["status"]["reason"] == "Forbidden"
    msg = r["status"]["message"]
    assert "GPUQuota team-a" in msg and "4 GPUs (minReplicas 2 x 2 GPUs)" in msg and "2 GPUs left" in msg
    json.dumps(out)  # serialisable as is


def test_update_that_does_not_grow_is_allowed_even_over_quota():
    old = stored(isvc(gpus=2, min_r=5, max_r=6))  # 10 > 8: admitted before the quota shrank
    new = stored(isvc(gpus=2, min_r=5, max_r=8))
    code, out = call(review_of(new, "UPDATE", old), services=[old])
    assert out["response"]["allowed"] is True
    code, out = call(review_of(stored(isvc(gpus=2, min_r=6, max_r=8)), "UPDATE", old), services=[old])
    assert out["response"]["allowed"] is False


def test_cluster_lists_only_when_the_decision_needs_them():
    """The cluster-wide lists (every GPUQuota, InferenceService, Namespace) are read only
    for creates and growing updates: an update that does not raise the reservation, or an
    invalid object, is answered without them."""
    calls = []

    def cluster():
        calls.append(1)
        return [QUOTA], [old], {"ml": {}}

    old = stored(isvc(gpus=2, min_r=1, max_r=6))
    code, out = admission.review(review_of(stored(isvc(gpus=2, min_r=1, max_r=8)), "UPDATE", old), cluster=cluster)
    assert out["response"]["allowed"] is True and calls == []
    code, out = admission.review(review_of({"apiVersion": "serving.argosy.dev/v1alpha1", "kind": "InferenceService",
                                            "metadata": {"name": "x", "namespace": "ml"}, "spec": {}}),
                                 cluster=cluster)
    assert out["response"]["allowed"] is False and calls == []
    code, out = admission.review(review_of(stored(isvc(gpus=2, min_r=3, max_r=8)), "UPDATE", old), cluster=cluster)
    assert out["response"]["allowed"] is True and calls == [1]


def test_update_counts_the_stored_version_once():
    old = stored(isvc(gpus=2, min_r=2))
    code, out = call(review_of(stored(isvc(gpus=2, min_r=4)), "UPDATE", old), services=[old])
    assert out["response"]["allowed"] is True  # 8 of 8, the old 4 not added on top


def test_other_operations_and_kinds_are_allowed():
    body = json.loads(review_of(isvc(gpus=64, min_r=100)))
    body["request"]["operation"] = "DELETE"
    assert call(body)[1]["response"]["allowed"] is True
    body["request"]["operation"] = "CREATE"
    body["request"]["kind"] = {"group": "", "version": "v1", "kind": "Pod"}
    assert call(body)[1]["response"]["allowed"] is True


def test_invalid_object_is_denied_cleanly():
    bad = isvc()
    bad["spec"]["resources"]["gpus"] = -1
    code, out = call(review_of(bad))
    assert code == 200 and out["response"]["allowed"] is False
    assert out["response"]["status"]["code"] == 422 and "gpus" in out["response"]["status"]["message"]


@pytest.mark.parametrize("body", [
    b"not json", b"[]", b"{}", json.dumps({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview",
                                           "request": {"uid": "x"}}).encode(),
    json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).encode(),
    json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": ""}}).encode(),
    b"\xff\xfe",
])
def test_malformed_review_is_a_clean_400(body):
    code, out = call(body)
    assert code == 400
    assert out["kind"] == "Status" and out["code"] == 400 and out["reason"] == "BadRequest" and out["message"]


def _scale_review(old: int, new, name="llm") -> dict:
    """What kube-apiserver sends for ``kubectl scale ais/NAME --replicas=N``."""
    scale = {"apiVersion": "autoscaling/v1", "kind": "Scale", "metadata": {"name": name, "namespace": "ml"}}
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": "u-scale", "kind": {"group": "autoscaling", "version": "v1", "kind": "Scale"},
        "resource": {"group": api.GROUP, "version": api.VERSION, "resource": api.PLURAL}, "subResource": "scale",
        "name": name, "namespace": "ml", "operation": "UPDATE",
        "object": {**scale, "spec": {"replicas": new}}, "oldObject": {**scale, "spec": {"replicas": old}}}}


def test_kubectl_scale_is_judged_as_the_minreplicas_it_writes():
    stored = isvc("llm", gpus=2, min_r=1, max_r=8, namespace="ml")
    other = isvc("other", gpus=2, min_r=2, namespace="ml")  # 4 of the 8 GPUs
    seen = []

    def cluster():
        seen.append(1)
        return [QUOTA], [stored, other], {"ml": {}}

    def answer(body):
        code, out = admission.review(body, cluster=cluster)
        assert code == 200 and out["response"]["uid"] == "u-scale"
        return out["response"]

    assert answer(_scale_review(1, 2))["allowed"]  # 4 + 4 GPUs: fits
    denied = answer(_scale_review(1, 3))  # 6 + 4 > 8
    assert not denied["allowed"] and denied["status"]["code"] == 403 and "GPUQuota team-a" in denied["status"]["message"]
    calls = len(seen)
    assert answer(_scale_review(3, 1))["allowed"] and len(seen) == calls  # lowering: no cluster read
    unknown = answer(_scale_review(1, 2, name="ghost"))
    assert not unknown["allowed"] and "not in the operator's view" in unknown["status"]["message"]
    bad = answer(_scale_review(1, -1))
    assert not bad["allowed"] and bad["status"]["code"] == 422
    over_max = answer(_scale_review(1, 9))
    assert not over_max["allowed"] and over_max["status"]["code"] == 422
