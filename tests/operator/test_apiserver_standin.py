"""The API stand-in keeps the Kubernetes semantics the operator tests rely on."""

from __future__ import annotations

import json
import threading
import urllib.request

import pytest

from .apiserver_standin import APPLY_PATCH, JSON_PATCH, MERGE_PATCH, StandIn, json_patch, label_selector, merge_patch

CM = "/api/v1/namespaces/default/configmaps"
DEP = "/apis/apps/v1/namespaces/default/deployments"
ISVC = "/apis/serving.argosy.dev/v1alpha1/namespaces/default/inferenceservices"
CRDS = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"


@pytest.fixture
def standin():
    with StandIn(bookmark_interval=0.5) as s:
        yield s


@pytest.fixture
def with_crd(standin, crd):
    status, _ = standin.http("POST", CRDS, crd)
    assert status == 201
    return standin


def _cm(name="a", **data):
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data}


def _isvc(name="llm", uri="hf://org/model"):
    return {"apiVersion": "serving.argosy.dev/v1alpha1", "kind": "InferenceService", "metadata": {"name": name},
            "spec": {"model": {"uri": uri}}}


def test_create_get_404_and_already_exists(standin):
    assert standin.http("POST", CM, _cm(x="1"))[0] == 201
    status, body = standin.http("POST", CM, _cm(x="2"))
    assert (status, body["reason"], body["kind"]) == (409, "AlreadyExists", "Status")
    status, body = standin.http("GET", f"{CM}/missing")
    assert (status, body["reason"], body["details"]["name"]) == (404, "NotFound", "missing")
    assert standin.http("POST", "/api/v1/namespaces/nope/configmaps", _cm())[0] == 404
    assert standin.http("POST", CM, _cm("Bad_Name"))[0] == 422
    status, obj = standin.http("GET", f"{CM}/a")
    assert status == 200 and obj["data"] == {"x": "1"} and obj["metadata"]["uid"]


def test_stale_resource_version_is_a_conflict(standin):
    _, first = standin.http("POST", CM, _cm(x="1"))
    _, second = standin.http("PUT", f"{CM}/a", dict(first, data={"x": "2"}))
    assert int(second["metadata"]["resourceVersion"]) > int(first["metadata"]["resourceVersion"])
    status, body = standin.http("PUT", f"{CM}/a", dict(first, data={"x": "3"}))  # first's version is stale
    assert (status, body["reason"]) == (409, "Conflict")
    stale = {"metadata": {"resourceVersion": first["metadata"]["resourceVersion"]}, "data": {"x": "4"}}
    assert standin.http("PATCH", f"{CM}/a", stale, content_type=MERGE_PATCH)[0] == 409
    test_op = [{"op": "test", "path": "/metadata/resourceVersion", "value": first["metadata"]["resourceVersion"]},
               {"op": "replace", "path": "/data/x", "value": "5"}]
    assert standin.http("PATCH", f"{CM}/a", test_op, content_type=JSON_PATCH)[0] == 422
    assert standin.http("GET", f"{CM}/a")[1]["data"] == {"x": "2"}
    # a write that changes nothing keeps the version
    status, same = standin.http("PUT", f"{CM}/a", second)
    assert status == 200 and same["metadata"]["resourceVersion"] == second["metadata"]["resourceVersion"]


def _watch(standin, path, query, out, ready):
    url = f"{standin.url}{path}?" + "&".join(f"{k}={v}" for k, v in query.items())
    with urllib.request.urlopen(url, timeout=10) as resp:
        ready.set()
        for line in resp:
            out.append(json.loads(line))


def test_list_and_watch_stream(standin):
    standin.http("POST", CM, _cm("before", x="0"))
    listing = standin.http("GET", CM)[1]
    assert [i["metadata"]["name"] for i in listing["items"]] == ["before"]
    events, ready = [], threading.Event()
    since = listing["metadata"]["resourceVersion"]
    t = threading.Thread(target=_watch, args=(standin, CM, {"watch": "true", "resourceVersion": since,
                                                             "timeoutSeconds": "1"}, events, ready))
    t.start()
    ready.wait(5)
    standin.http("POST", CM, _cm("b", x="1"))
    standin.http("PATCH", f"{CM}/b", {"data": {"x": "2"}}, content_type=MERGE_PATCH)
    standin.http("DELETE", f"{CM}/b")
    t.join(10)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "b"), ("MODIFIED", "b"), ("DELETED", "b")]
    assert events[1]["object"]["data"] == {"x": "2"}
    versions = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
    assert versions == sorted(versions) and versions[0] > int(since)

    # no resourceVersion: the current objects first; a label selector filters
    standin.http("POST", CM, dict(_cm("labelled"), metadata={"name": "labelled", "labels": {"app": "x"}}))
    events, ready = [], threading.Event()
    _watch(standin, CM, {"watch": "true", "labelSelector": "app%3Dx", "timeoutSeconds": "1"}, events, ready)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "labelled")]


def test_watch_from_expired_version_is_gone():
    with StandIn(history=3) as s:
        for i in range(6):
            s.http("POST", CM, _cm(f"c{i}"))
        events, ready = [], threading.Event()
        _watch(s, CM, {"watch": "true", "resourceVersion": "1"}, events, ready)
        assert len(events) == 1 and events[0]["type"] == "ERROR" and events[0]["object"]["code"] == 410


def test_label_selectors():
    match = label_selector("a=1,b!=2,c,!d,e in (x, y),f notin (z)")
    assert match({"a": "1", "c": "", "e": "x"})
    assert not match({"a": "1", "c": "", "e": "x", "d": "1"})
    assert not match({"a": "1", "c": "", "e": "q"})
    assert not match({"a": "1", "b": "2", "c": "", "e": "x"})


def test_patch_helpers():
    assert merge_patch({"a": {"b": 1, "c": 2}, "l": [1]}, {"a": {"b": None, "d": 3}, "l": [2]}) == \
        {"a": {"c": 2, "d": 3}, "l": [2]}
    doc = {"a": [1, 2], "b": {"c": 1}}
    assert json_patch(doc, [{"op": "add", "path": "/a/-", "value": 3}, {"op": "remove", "path": "/b/c"},
                            {"op": "move", "from": "/a/0", "path": "/b/first"}]) == {"a": [2, 3], "b": {"first": 1}}


def test_status_subresource_and_generation(with_crd):
    s = with_crd
    status, obj = s.http("POST", ISVC, dict(_isvc(), status={"url": "ignored on create"}))
    assert status == 201 and obj["metadata"]["generation"] == 1 and "status" not in obj
    # status writes change status only, and not the generation
    _, obj = s.http("PATCH", f"{ISVC}/llm/status", {"status": {"url": "u"}, "spec": {"tenant": "x"}},
                    content_type=MERGE_PATCH)
    assert obj["status"] == {"url": "u"} and "tenant" not in obj["spec"] and obj["metadata"]["generation"] == 1
    # writes to the object ignore status; only spec changes bump the generation
    _, obj = s.http("PATCH", f"{ISVC}/llm", {"metadata": {"labels": {"team": "a"}}, "status": {"url": "v"}},
                    content_type=MERGE_PATCH)
    assert obj["metadata"]["generation"] == 1 and obj["status"] == {"url": "u"}
    _, obj = s.http("PATCH", f"{ISVC}/llm", {"spec": {"tenant": "t"}}, content_type=MERGE_PATCH)
    assert obj["metadata"]["generation"] == 2
    _, obj = s.http("PUT", f"{ISVC}/llm/status", dict(obj, status={"url": "w"}))
    assert obj["status"] == {"url": "w"} and obj["metadata"]["generation"] == 2
    # custom resources take no strategic merge patch
    assert s.http("PATCH", f"{ISVC}/llm", {"spec": {}}, content_type="application/strategic-merge-patch+json")[0] \
        == 415


def test_server_side_apply(standin):
    cfg = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "labels": {"a": "1"}},
           "spec": {"replicas": 2, "paused": False, "selector": {"matchLabels": {"app": "d"}},
                    "template": {"metadata": {"annotations": {"h": "1"}, "labels": {"app": "d"}},
                                 "spec": {"containers": [{"name": "c", "image": "i"}]}}}}
    status, obj = standin.http("PATCH", f"{DEP}/d", cfg, content_type=APPLY_PATCH, query={"fieldManager": "op"})
    assert status == 201 and obj["spec"]["replicas"] == 2
    (entry,) = obj["metadata"]["managedFields"]
    assert (entry["manager"], entry["operation"]) == ("op", "Apply")
    assert entry["fieldsV1"]["f:spec"]["f:replicas"] == {}
    assert standin.http("PATCH", f"{DEP}/d", cfg, content_type=APPLY_PATCH)[0] == 400  # fieldManager required
    # re-applying the same configuration is a no-op
    _, again = standin.http("PATCH", f"{DEP}/d", cfg, content_type=APPLY_PATCH, query={"fieldManager": "op"})
    assert again["metadata"]["resourceVersion"] == obj["metadata"]["resourceVersion"]
    # another manager takes spec.paused with an update; a different applied value then conflicts
    standin.http("PATCH", f"{DEP}/d", {"spec": {"paused": True}}, content_type=MERGE_PATCH,
                 query={"fieldManager": "kubectl"})
    status, body = standin.http("PATCH", f"{DEP}/d", cfg, content_type=APPLY_PATCH, query={"fieldManager": "op"})
    assert (status, body["reason"]) == (409, "Conflict")
    assert body["details"]["causes"][0]["field"] == ".spec.paused"
    _, obj = standin.http("PATCH", f"{DEP}/d", cfg, content_type=APPLY_PATCH,
                          query={"fieldManager": "op", "force": "true"})
    assert obj["spec"]["paused"] is False
    # a field the manager stops applying is removed; a field someone else set stays
    standin.http("PATCH", f"{DEP}/d", {"spec": {"minReadySeconds": 5}}, content_type=MERGE_PATCH,
                 query={"fieldManager": "kubectl"})
    smaller = json.loads(json.dumps(cfg))
    del smaller["spec"]["replicas"], smaller["metadata"]["labels"]
    _, obj = standin.http("PATCH", f"{DEP}/d", smaller, content_type=APPLY_PATCH, query={"fieldManager": "op"})
    assert "replicas" not in obj["spec"] and "labels" not in obj["metadata"]
    assert obj["spec"]["minReadySeconds"] == 5 and obj["spec"]["template"]["metadata"]["annotations"] == {"h": "1"}
    # template change bumps the generation
    gen = obj["metadata"]["generation"]
    smaller["spec"]["template"]["metadata"]["annotations"]["h"] = "2"
    _, obj = standin.http("PATCH", f"{DEP}/d", smaller, content_type=APPLY_PATCH, query={"fieldManager": "op"})
    assert obj["metadata"]["generation"] == gen + 1


def test_built_in_objects_are_validated_against_their_schema(standin):
    """Like the real server, a malformed built-in object is refused (422 naming the field):
    Kubernetes' own schema of the kind (kubernetes-validate, strict), on create and on
    every later write; third-party kinds are not checked here (their CRDs would be)."""
    dep = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "v"},
           "spec": {"selector": {"matchLabels": {"app": "v"}},
                    "template": {"metadata": {"labels": {"app": "v"}},
                                 "spec": {"containers": [{"name": "c", "image": "i"}]}}}}
    bad = json.loads(json.dumps(dep))
    bad["spec"]["replicas"] = "two"
    status, body = standin.http("POST", DEP, bad)
    assert (status, body["reason"]) == (422, "Invalid") and "spec.replicas" in body["message"], body
    bad = json.loads(json.dumps(dep))
    bad["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"  # a typo: strict
    assert standin.http("POST", DEP, bad)[0] == 422
    assert standin.http("POST", DEP, dep)[0] == 201
    status, body = standin.http("PATCH", f"{DEP}/v", {"spec": {"strategy": {"type": 3}}}, content_type=MERGE_PATCH)
    assert status == 422 and "spec.strategy.type" in body["message"], body


def test_garbage_collection_and_finalizers(with_crd):
    s = with_crd
    _, owner = s.http("POST", ISVC, _isvc())
    _, other = s.http("POST", ISVC, _isvc("other"))

    def ref(o):
        return {"apiVersion": o["apiVersion"], "kind": o["kind"], "name": o["metadata"]["name"],
                "uid": o["metadata"]["uid"], "controller": o is owner}

    _, dep = s.http("POST", DEP, {"metadata": {"name": "d", "ownerReferences": [ref(owner)]},
                                  "spec": {"selector": {"matchLabels": {"app": "d"}},
                                           "template": {"metadata": {"labels": {"app": "d"}},
                                                        "spec": {"containers": [{"name": "c", "image": "i"}]}}}})
    s.http("POST", "/api/v1/namespaces/default/pods",
           {"metadata": {"name": "p", "ownerReferences": [ref(dep | {"apiVersion": "apps/v1", "kind": "Deployment"})]}})
    s.http("POST", CM, {"metadata": {"name": "shared", "ownerReferences": [ref(owner), ref(other)]}})
    s.http("POST", CM, {"metadata": {"name": "held", "ownerReferences": [ref(owner)], "finalizers": ["x/y"]}})
    assert s.http("DELETE", f"{ISVC}/llm")[0] == 200
    assert s.http("GET", f"{DEP}/d")[0] == 404
    assert s.http("GET", "/api/v1/namespaces/default/pods/p")[0] == 404  # recursively
    assert s.http("GET", f"{CM}/shared")[0] == 200  # another owner is alive
    _, held = s.http("GET", f"{CM}/held")
    assert held["metadata"]["deletionTimestamp"]  # waits for its finalizer
    s.http("PATCH", f"{CM}/held", {"metadata": {"finalizers": None}}, content_type=MERGE_PATCH)
    assert s.http("GET", f"{CM}/held")[0] == 404
    # orphan propagation keeps dependents and drops the reference
    s.http("POST", CM, {"metadata": {"name": "orphan", "ownerReferences": [ref(other)]}})
    s.http("DELETE", f"{ISVC}/other", query={"propagationPolicy": "Orphan"})
    _, orphan = s.http("GET", f"{CM}/orphan")
    assert "ownerReferences" not in orphan["metadata"]


def test_crds_and_discovery(with_crd, crd):
    s = with_crd
    _, groups = s.http("GET", "/apis")
    assert "serving.argosy.dev" in [g["name"] for g in groups["groups"]]
    _, resources = s.http("GET", "/apis/serving.argosy.dev/v1alpha1")
    assert {r["name"] for r in resources["resources"]} == {"inferenceservices", "inferenceservices/status"}
    _, stored = s.http("GET", f"{CRDS}/{crd['metadata']['name']}")
    assert {c["type"]: c["status"] for c in stored["status"]["conditions"]}["Established"] == "True"
    s.http("POST", ISVC, _isvc())
    s.http("DELETE", f"{CRDS}/{crd['metadata']['name']}")
    assert s.http("GET", f"{ISVC}/llm")[0] == 404
    assert s.http("GET", "/apis/serving.argosy.dev/v1alpha1")[0] == 404
    assert s.http("GET", "/api")[1]["versions"] == ["v1"]
    assert "pods/status" in {r["name"] for r in s.http("GET", "/api/v1")[1]["resources"]}


def test_fault_injection(standin):
    conflict = standin.fail_next("configmaps", 409, times=2, verbs=("create",))
    assert standin.http("POST", CM, _cm())[0] == 409
    assert standin.http("POST", CM, _cm())[0] == 409
    assert standin.http("POST", CM, _cm())[0] == 201
    assert len(conflict.hits) == 2
    standin.fail_next("configmaps", 500, name="a")
    assert standin.http("GET", f"{CM}/a")[0] == 200  # reads are not writes
    status, body = standin.http("PATCH", f"{CM}/a", {"data": {"k": "v"}}, content_type=MERGE_PATCH)
    assert (status, body["reason"]) == (500, "InternalError")
    assert standin.http("PATCH", f"{CM}/a", {"data": {"k": "v"}}, content_type=MERGE_PATCH)[0] == 200


def test_namespace_deletion_removes_contents(standin):
    standin.http("POST", "/api/v1/namespaces", {"metadata": {"name": "tmp"}})
    standin.http("POST", "/api/v1/namespaces/tmp/configmaps", _cm())
    standin.http("DELETE", "/api/v1/namespaces/tmp")
    assert standin.http("GET", "/api/v1/namespaces/tmp/configmaps/a")[0] == 404
    assert standin.http("GET", "/api/v1/namespaces/tmp")[0] == 404


def test_validation_and_admission_the_operator_can_hit(standin):
    """As the real server and KEDA answer: an HPA window above 3600 s is 422, a PVC's spec
    is immutable but for a growing storage request, and KEDA's webhook refuses a
    ScaledObject for a Deployment an HPA already scales."""
    hpa_path = "/apis/autoscaling/v2/namespaces/default/horizontalpodautoscalers"
    hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "web"},
           "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
                    "maxReplicas": 3, "behavior": {"scaleDown": {"stabilizationWindowSeconds": 3601}}}}
    status, body = standin.http("POST", hpa_path, hpa)
    assert status == 422 and "must be less than or equal to 3600" in body["message"]
    hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] = 3600
    assert standin.http("POST", hpa_path, hpa)[0] == 201

    so_path = "/apis/keda.sh/v1alpha1/namespaces/default/scaledobjects"
    so = {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": "web"},
          "spec": {"scaleTargetRef": {"name": "web"}, "triggers": []}}
    status, body = standin.http("POST", so_path, so)
    assert status == 403 and "already managed by the hpa 'web'" in body["message"]
    assert standin.http("DELETE", f"{hpa_path}/web")[0] == 200
    assert standin.http("POST", so_path, so)[0] == 201

    pvc_path = "/api/v1/namespaces/default/persistentvolumeclaims"
    pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "cache"},
           "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "nfs",
                    "resources": {"requests": {"storage": "20Gi"}}}}
    assert standin.http("POST", pvc_path, pvc)[0] == 201
    grow = {"spec": {"resources": {"requests": {"storage": "30Gi"}}}}
    assert standin.http("PATCH", f"{pvc_path}/cache", grow, content_type=MERGE_PATCH)[0] == 200
    shrink = {"spec": {"resources": {"requests": {"storage": "10Gi"}}}}
    status, body = standin.http("PATCH", f"{pvc_path}/cache", shrink, content_type=MERGE_PATCH)
    assert status == 422 and "can not be less than previous value" in body["message"]
    status, body = standin.http("PATCH", f"{pvc_path}/cache", {"spec": {"storageClassName": "fast"}},
                                content_type=MERGE_PATCH)
    assert status == 422 and "spec is immutable" in body["message"]


def test_immutable_fields_of_deployments_jobs_and_services(standin):
    """As the real server: a Deployment's selector, a Job's selector/template/completions
    and a Service's allocated clusterIP cannot change (422 "field is immutable"); other
    fields can; a Service update that leaves clusterIP out keeps the allocated one (server-
    side apply by a manager that never set it, or a PUT without it)."""
    dep = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
           "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
                    "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": []}}}}
    assert standin.http("POST", DEP, dep)[0] == 201
    assert standin.http("PATCH", f"{DEP}/web", {"spec": {"replicas": 3}}, content_type=MERGE_PATCH)[0] == 200
    status, body = standin.http("PATCH", f"{DEP}/web", {"spec": {"selector": {"matchLabels": {"app": "new"}}}},
                                content_type=MERGE_PATCH)
    assert status == 422 and "spec.selector" in body["message"] and "field is immutable" in body["message"]

    jobs = "/apis/batch/v1/namespaces/default/jobs"
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "fetch"},
           "spec": {"backoffLimit": 2, "template": {"spec": {"containers": [{"name": "f", "image": "a:1"}]}}}}
    assert standin.http("POST", jobs, job)[0] == 201
    assert standin.http("PATCH", f"{jobs}/fetch", {"spec": {"backoffLimit": 4}}, content_type=MERGE_PATCH)[0] == 200
    changed = {"spec": {"template": {"spec": {"containers": [{"name": "f", "image": "a:2"}]}}}}
    status, body = standin.http("PATCH", f"{jobs}/fetch", changed, content_type=MERGE_PATCH)
    assert status == 422 and "spec.template" in body["message"] and "field is immutable" in body["message"]

    svcs = "/api/v1/namespaces/default/services"
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
           "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}}
    status, created = standin.http("POST", svcs, svc)
    assert status == 201 and created["spec"]["clusterIP"].startswith("10.96.")
    ip = created["spec"]["clusterIP"]
    status, applied = standin.http("PATCH", f"{svcs}/web?fieldManager=op&force=true",
                                   {**svc, "spec": {**svc["spec"], "ports": [{"port": 8080}]}},
                                   content_type=APPLY_PATCH)
    assert status == 200 and applied["spec"]["clusterIP"] == ip and applied["spec"]["ports"][0]["port"] == 8080
    put = {**applied, "spec": {k: v for k, v in applied["spec"].items() if k not in ("clusterIP", "clusterIPs")}}
    status, replaced = standin.http("PUT", f"{svcs}/web", put)
    assert status == 200 and replaced["spec"]["clusterIP"] == ip and replaced["spec"]["clusterIPs"] == [ip]
    status, body = standin.http("PATCH", f"{svcs}/web", {"spec": {"clusterIP": "10.96.9.9"}},
                                content_type=MERGE_PATCH)
    assert status == 422 and "spec.clusterIP" in body["message"]
    headless = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "peers"},
                "spec": {"clusterIP": "None", "selector": {"app": "web"}}}
    assert standin.http("POST", svcs, headless)[1]["spec"]["clusterIP"] == "None"


def test_custom_resources_are_defaulted_and_validated_from_their_crd(with_crd):
    """As the real server: defaults filled on create, the structural schema and the CEL
    rules enforced on every write (422), transition rules on updates."""
    s = with_crd
    status, obj = s.http("POST", ISVC, _isvc())
    assert status == 201
    assert obj["spec"]["cache"]["accessMode"] == "ReadWriteMany" and obj["spec"]["cache"]["size"] == "50Gi"
    typo = _isvc("typo")
    typo["spec"]["scaling"] = {"maxReplica": 3}
    status, body = s.http("POST", ISVC, typo)
    assert status == 201 and "maxReplica" not in body["spec"]["scaling"]  # pruned, as the server does
    bad = _isvc("bad")
    bad["spec"]["scaling"] = {"minReplicas": -1}
    status, body = s.http("POST", ISVC, bad)
    assert status == 422 and "minReplicas" in body["message"]
    rule = _isvc("rule")
    rule["spec"]["scaling"] = {"autoscaler": "keda", "minReplicas": 3, "maxReplicas": 2}
    status, body = s.http("POST", ISVC, rule)
    assert status == 422 and "minReplicas must not exceed maxReplicas" in body["message"]
    status, body = s.http("PATCH", f"{ISVC}/llm", {"spec": {"cache": {"size": "20Gi"}}}, content_type=MERGE_PATCH)
    assert status == 422 and "cache.size cannot shrink" in body["message"]
    assert s.http("PATCH", f"{ISVC}/llm", {"spec": {"cache": {"size": "60Gi"}}}, content_type=MERGE_PATCH)[0] == 200
