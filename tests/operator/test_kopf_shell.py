"""The kopf shell, run in-process against the API stand-in; the test plays the kubelet and
the controllers (Job, Deployment, KEDA) by writing the children's status."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Optional

import kopf
import kubernetes
import pytest
import yaml

from argosy.operator import api
from argosy.operator.handlers import Context, build_registry, converge, kopf_settings, transition_events
from argosy.operator.kube import FIELD_MANAGER, Kube
from argosy.operator.render import ISVC_LABEL, SPEC_HASH_ANNOTATION
from argosy.operator.settings import OperatorSettings

from . import crdcheck
from .apiserver_standin import MERGE_PATCH, StandIn
from .specs import SMOL

NS = "ml"
ISVCS = f"/apis/{api.GROUP}/{api.VERSION}/namespaces/{NS}/{api.PLURAL}"
CRDS = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
KINDS = {
    "PersistentVolumeClaim": f"/api/v1/namespaces/{NS}/persistentvolumeclaims",
    "Job": f"/apis/batch/v1/namespaces/{NS}/jobs",
    "Service": f"/api/v1/namespaces/{NS}/services",
    "ServiceMonitor": f"/apis/monitoring.coreos.com/v1/namespaces/{NS}/servicemonitors",
    "PodDisruptionBudget": f"/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets",
    "Deployment": f"/apis/apps/v1/namespaces/{NS}/deployments",
    "ScaledObject": f"/apis/keda.sh/v1alpha1/namespaces/{NS}/scaledobjects",
    "HorizontalPodAutoscaler": f"/apis/autoscaling/v2/namespaces/{NS}/horizontalpodautoscalers",
    "ServiceAccount": f"/api/v1/namespaces/{NS}/serviceaccounts",
    "Role": f"/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/roles",
    "RoleBinding": f"/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/rolebindings",
}
FAST = OperatorSettings(resync_interval=0.3, retry_delay=0.1, retry_max_delay=0.5)


@pytest.fixture
def cluster(crd):
    with StandIn() as standin:
        assert standin.http("POST", CRDS, crd)[0] == 201
        assert standin.http("POST", "/api/v1/namespaces", {"metadata": {"name": NS}})[0] == 201
        yield standin


def _api_client(url: str, token: str | None = None) -> kubernetes.client.ApiClient:
    config = kubernetes.client.Configuration()
    config.host = url
    if token:
        config.api_key = {"authorization": f"Bearer {token}"}
    return kubernetes.client.ApiClient(config)


class RunningOperator:
    """The operator (kopf's ``operator()`` coroutine) in a thread, pointed at the stand-in."""

    def __init__(self, standin: StandIn, workdir, settings: OperatorSettings = FAST, token: str | None = None):
        workdir.mkdir(parents=True, exist_ok=True)
        self.ctx = Context(settings, api_client=_api_client(standin.url, token), namespaces=[NS],
                           connection=kopf.ConnectionInfo(server=standin.url, insecure=True, token=token),
                           discovery_cache=str(workdir / "discovery.json"))
        self.stop_flag, self.ready_flag = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run, name="operator", daemon=True)

    def _run(self) -> None:
        asyncio.run(kopf.operator(registry=build_registry(self.ctx), settings=kopf_settings(self.ctx),
                                  standalone=True, namespaces=[NS], stop_flag=self.stop_flag,
                                  ready_flag=self.ready_flag))

    def __enter__(self) -> "RunningOperator":
        self.thread.start()
        assert self.ready_flag.wait(20), "the operator did not start"
        return self

    def __exit__(self, *exc) -> None:
        self.stop_flag.set()
        self.thread.join(20)
        assert not self.thread.is_alive(), "the operator did not stop"


def wait_for(probe, what: str, timeout: float = 20.0):
    """Poll ``probe`` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def children(standin: StandIn, name: str = "llm") -> dict[str, list[dict]]:
    out = {}
    for kind, path in KINDS.items():
        status, listing = standin.http("GET", path, query={"labelSelector": f"{ISVC_LABEL}={name}"})
        assert status == 200
        if listing["items"]:
            out[kind] = listing["items"]
    return out


def isvc(standin: StandIn, name: str = "llm") -> dict:
    return standin.http("GET", f"{ISVCS}/{name}")[1]


def condition(obj: dict, type_: str) -> dict:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), {})


def is_true(standin: StandIn, type_: str, name: str = "llm") -> bool:
    return condition(isvc(standin, name), type_).get("status") == "True"


def one(standin: StandIn, kind: str, name: str = "llm") -> dict:
    return wait_for(lambda: (children(standin, name).get(kind) or [None])[0], f"a {kind}")


def play_deployment(standin: StandIn, ready: int = 1) -> None:
    """The Deployment controller and kubelet: the current generation is rolled out and available."""
    dep = one(standin, "Deployment")
    status = {"observedGeneration": dep["metadata"]["generation"], "replicas": ready, "readyReplicas": ready,
              "availableReplicas": ready, "updatedReplicas": ready}
    code, _ = standin.http("PATCH", f"{KINDS['Deployment']}/{dep['metadata']['name']}/status", {"status": status},
                           content_type=MERGE_PATCH)
    assert code == 200


def template_hash(dep: dict) -> str:
    return dep["spec"]["template"]["metadata"]["annotations"][SPEC_HASH_ANNOTATION]


def patch_isvc(standin: StandIn, patch: dict, name: str = "llm") -> dict:
    code, obj = standin.http("PATCH", f"{ISVCS}/{name}", patch, content_type=MERGE_PATCH)
    assert code == 200, obj
    return obj


def _new_isvc(name: str, spec: dict) -> dict:
    return {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": name}, "spec": spec}


def test_lifecycle_cache_ready_roll_faults_and_delete(cluster, crd, tmp_path):
    s = cluster
    spec = {"model": {"uri": SMOL}, "scaling": {"autoscaler": "keda", "minReplicas": 1, "maxReplicas": 3}}
    with RunningOperator(s, tmp_path):
        code, created = s.http("POST", ISVCS, _new_isvc("llm", spec))
        assert code == 201
        uid = created["metadata"]["uid"]

        # the cache and prefetch Job come first; the Deployment waits for the model
        job = one(s, "Job")
        wait_for(lambda: condition(isvc(s), "ModelCached").get("reason") == "Downloading", "ModelCached=False")
        kids = children(s)
        assert set(kids) == {"PersistentVolumeClaim", "Job", "Service", "ServiceMonitor", "PodDisruptionBudget"}
        for kind, objs in kids.items():
            (obj,) = objs
            (ref,) = obj["metadata"]["ownerReferences"]
            assert (ref["uid"], ref["controller"], ref["kind"]) == (uid, True, api.KIND), kind
            managers = {(m["manager"], m["operation"]) for m in obj["metadata"]["managedFields"]}
            assert (FIELD_MANAGER, "Apply") in managers, kind
        assert not isvc(s)["metadata"].get("finalizers")  # deletion is garbage collection
        assert not is_true(s, "Ready")

        # the Job controller reports success: the model is cached, the Deployment and ScaledObject appear
        s.http("PATCH", f"{KINDS['Job']}/{job['metadata']['name']}/status",
               {"status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}},
               content_type=MERGE_PATCH)
        wait_for(lambda: is_true(s, "ModelCached"), "ModelCached=True")
        dep = one(s, "Deployment")
        assert "replicas" not in dep["spec"]  # KEDA owns replicas
        scaled = one(s, "ScaledObject")
        s.http("PATCH", f"{KINDS['ScaledObject']}/{scaled['metadata']['name']}/status",
               {"status": {"conditions": [{"type": "Ready", "status": "True", "reason": "ScaledObjectReady"}]}},
               content_type=MERGE_PATCH)

        # pods become available: Ready, for the current generation
        play_deployment(s)
        wait_for(lambda: is_true(s, "Ready"), "Ready=True")
        status = isvc(s)["status"]
        assert status["observedGeneration"] == 1 and status["readyReplicas"] == 1
        assert condition(isvc(s), "Ready")["observedGeneration"] == 1
        def reasons() -> set[str]:
            events = s.http("GET", f"/api/v1/namespaces/{NS}/events")[1]["items"]
            return {e["reason"] for e in events if e["involvedObject"].get("uid") == uid}

        # events are posted after the status write that the wait above saw: poll for them
        wait_for(lambda: {"Downloading", "Downloaded", "Ready"} <= reasons(), f"the events (have {reasons()})")

        # GitOps: on the InferenceService itself the operator writes only status and kopf's
        # bookkeeping annotations, never a field a Git copy holds, so Argo CD sees no drift.
        live = isvc(s)
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        assert live["spec"] == crdcheck.apply_defaults(schema, {"spec": spec})["spec"]  # the server's defaults only
        assert not live["metadata"].get("labels")
        assert all(k.startswith("kopf.serving.argosy.dev/") for k in live["metadata"].get("annotations") or {})

        # a spec edit rolls the Deployment; Ready waits for the rollout
        before = template_hash(one(s, "Deployment"))
        assert patch_isvc(s, {"spec": {"runtime": {"maxNumSeqs": 64}}})["metadata"]["generation"] == 2
        dep = wait_for(lambda: (d := one(s, "Deployment")) and template_hash(d) != before and d, "a rollout")
        args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[args.index("--max-num-seqs") + 1] == "64"
        wait_for(lambda: isvc(s)["status"]["observedGeneration"] == 2 and not is_true(s, "Ready"),
                 "Ready=False during the rollout")
        play_deployment(s)
        wait_for(lambda: is_true(s, "Ready"), "Ready=True after the rollout")

        # a label on the InferenceService changes nothing downstream
        dep = one(s, "Deployment")
        assert patch_isvc(s, {"metadata": {"labels": {"team": "a"}}})["metadata"]["generation"] == 2
        time.sleep(5 * FAST.resync_interval)
        after = one(s, "Deployment")
        assert after["metadata"]["resourceVersion"] == dep["metadata"]["resourceVersion"]
        assert is_true(s, "Ready")

        # a 409 on the Deployment and a 500 on the status: retried until converged
        conflict = s.fail_next("deployments", 409, times=2, verbs=("patch",))
        error = s.fail_next("inferenceservices", 500, times=1, verbs=("patch",), subresource="status")
        before = template_hash(after)
        patch_isvc(s, {"spec": {"runtime": {"maxNumSeqs": 128}}})
        wait_for(lambda: template_hash(one(s, "Deployment")) != before, "the rollout despite a 409")
        wait_for(lambda: isvc(s)["status"]["observedGeneration"] == 3, "status despite a 500")
        assert len(conflict.hits) == 2 and len(error.hits) == 1
        play_deployment(s)
        wait_for(lambda: is_true(s, "Ready"), "Ready=True after the faults")

        # deleting the InferenceService: garbage collection removes every child
        assert s.http("DELETE", f"{ISVCS}/llm")[0] == 200
        wait_for(lambda: not children(s), "children garbage-collected")
        time.sleep(3 * FAST.resync_interval)
        assert not children(s)  # and the operator does not bring them back


def _snapshot(standin: StandIn) -> dict[str, list[tuple[str, str, str]]]:
    return {kind: sorted((o["metadata"]["name"], o["metadata"]["uid"], o["metadata"]["resourceVersion"])
                         for o in objs) for kind, objs in children(standin).items()}


def test_restart_resumes_without_duplicates(cluster, tmp_path):
    s = cluster
    spec = {"model": {"uri": "pvc://models/smol"}, "resources": {"gpus": 0}}  # on a volume: no download
    with RunningOperator(s, tmp_path / "first"):
        s.http("POST", ISVCS, _new_isvc("llm", spec))
        one(s, "Deployment")
        play_deployment(s)
        wait_for(lambda: is_true(s, "Ready"), "Ready=True")
    before = _snapshot(s)
    assert set(before) == {"Service", "ServiceMonitor", "PodDisruptionBudget", "Deployment"}
    # while the operator is down, a child is deleted and the scale is changed
    s.http("DELETE", f"{KINDS['Service']}/llm")
    patch_isvc(s, {"spec": {"scaling": {"minReplicas": 2}}})
    mark = len(s.requests)
    with RunningOperator(s, tmp_path / "second"):
        wait_for(lambda: "Service" in children(s), "the deleted Service back")
        wait_for(lambda: one(s, "Deployment")["spec"]["replicas"] == 2, "the new replica count")
        wait_for(lambda: isvc(s)["status"]["observedGeneration"] == 2, "status of generation 2")
        time.sleep(3 * FAST.resync_interval)
    after = _snapshot(s)
    assert {k: len(v) for k, v in after.items()} == {k: 1 for k in before}  # nothing duplicated
    for kind in ("ServiceMonitor", "PodDisruptionBudget"):
        assert after[kind] == before[kind], kind  # untouched: same object, same version
    assert after["Deployment"][0][1] == before["Deployment"][0][1]  # updated in place
    assert after["Service"][0][1] != before["Service"][0][1]  # recreated
    applies = [r for r in list(s.requests)[mark:] if r.verb == "patch" and r.query.get("fieldManager") == FIELD_MANAGER]
    assert applies and all(r.content_type.startswith("application/apply-patch+yaml") for r in applies)


def test_switch_to_autoscaler_keeps_replicas(cluster, tmp_path):
    """autoscaler none -> keda on a 3-replica service: the Deployment keeps 3 replicas (not
    reset to the default 1 when the operator's apply stops setting the field), and the
    operator no longer owns the field, so KEDA's HPA can take it; back to none -> the
    operator sets minReplicas again."""
    s = cluster
    ctx = Context(FAST, api_client=_api_client(s.url), discovery_cache=str(tmp_path / "discovery.json"))
    spec = {"model": {"uri": "pvc://models/smol"}, "resources": {"gpus": 0}, "scaling": {"minReplicas": 3}}
    s.http("POST", ISVCS, _new_isvc("llm", spec))
    converge(ctx, NS, "llm")
    assert one(s, "Deployment")["spec"]["replicas"] == 3
    patch_isvc(s, {"spec": {"scaling": {"autoscaler": "keda", "minReplicas": 1, "maxReplicas": 4}}})
    converge(ctx, NS, "llm")
    dep = one(s, "Deployment")
    assert dep["spec"]["replicas"] == 3
    assert "ScaledObject" in children(s)
    owners = {m["manager"] for m in dep["metadata"]["managedFields"] if "f:replicas" in m["fieldsV1"].get("f:spec", {})}
    assert owners == {"argosy-operator-handover"}
    converge(ctx, NS, "llm")  # a later pass changes nothing
    assert one(s, "Deployment")["spec"]["replicas"] == 3
    patch_isvc(s, {"spec": {"scaling": {"autoscaler": "none", "minReplicas": 2}}})
    converge(ctx, NS, "llm")
    assert one(s, "Deployment")["spec"]["replicas"] == 2
    assert "ScaledObject" not in children(s)


def test_router_from_zero_is_created_and_removed(cluster, tmp_path):
    """spec.router on a KEDA service with minReplicas 0: the router's Deployment, Service,
    ServiceAccount, Role and RoleBinding are created through the stand-in, the ScaledObject
    gets the router's pending-requests trigger, status.url points at the router; turning the
    router off deletes its objects and the trigger."""
    s = cluster
    ctx = Context(FAST, api_client=_api_client(s.url), discovery_cache=str(tmp_path / "discovery.json"))
    spec = {"model": {"uri": "pvc://models/smol"}, "resources": {"gpus": 0},
            "scaling": {"autoscaler": "keda", "minReplicas": 0, "maxReplicas": 2}, "router": {"enabled": True}}
    s.http("POST", ISVCS, _new_isvc("llm", spec))
    converge(ctx, NS, "llm")
    kids = children(s)
    assert {d["metadata"]["name"] for d in kids["Deployment"]} == {"llm", "llm-router"}
    assert {x["metadata"]["name"] for x in kids["Service"]} == {"llm", "llm-router"}
    assert [x["metadata"]["name"] for x in kids["ServiceAccount"]] == ["llm-router"]
    (role,) = kids["Role"]
    assert role["rules"] == [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                              "verbs": ["get", "list", "watch"]}]
    assert kids["RoleBinding"][0]["subjects"][0]["name"] == "llm-router"
    (so,) = kids["ScaledObject"]
    assert "argosy_router_pending_requests" in so["spec"]["triggers"][-1]["metadata"]["query"]
    assert so["spec"]["minReplicaCount"] == 0
    assert isvc(s)["status"]["url"].startswith("http://llm-router.")
    code, out = s.http("PATCH", f"{ISVCS}/llm", {"spec": {"router": {"enabled": False}}}, content_type=MERGE_PATCH)
    assert code == 422 and "needs router.enabled" in json.dumps(out), out  # nothing would wake it from zero
    patch_isvc(s, {"spec": {"router": {"enabled": False}, "scaling": {"minReplicas": 1}}})
    converge(ctx, NS, "llm")
    kids = children(s)
    assert {d["metadata"]["name"] for d in kids["Deployment"]} == {"llm"}
    assert "ServiceAccount" not in kids and "Role" not in kids and "RoleBinding" not in kids
    assert all("argosy_router" not in t["metadata"]["query"] for t in kids["ScaledObject"][0]["spec"]["triggers"])
    assert isvc(s)["status"]["url"].startswith("http://llm.")


# ------------------------------------------------------------------ RBAC from the chart
OPERATOR_TOKEN = "operator-token"


def _operator_permissions(helm_env, tmp_path_factory, drop: tuple = (), values: Optional[dict] = None):
    """The permissions ``helm template`` of the chart (``values``, default the chart's
    defaults) gives the operator's ServiceAccount, optionally without ``drop``:
    ``(resource, verb)`` pairs taken out of every rule naming that resource."""
    from .rbac import Authorizer
    from .test_helm import NAMESPACE, template

    objs = template(helm_env, tmp_path_factory.mktemp("rbac-values"), values or {})
    (sa,) = [o for o in objs if o["kind"] == "ServiceAccount"]

    def without(rule: dict) -> list[dict]:
        out = [rule]
        for res, verb in drop:
            nxt = []
            for r in out:
                if res in r.get("resources", []) and verb in r.get("verbs", []):
                    rest = [x for x in r["resources"] if x != res]
                    nxt += ([dict(r, resources=rest)] if rest else []) + [
                        dict(r, resources=[res], verbs=[v for v in r["verbs"] if v != verb])]
                else:
                    nxt.append(r)
            out = nxt
        return out

    # (the rendered objects are cached per values: filter copies)
    objs = [dict(o, rules=[r2 for r in o["rules"] for r2 in without(r)]) if o["kind"] in ("Role", "ClusterRole")
            else o for o in objs]
    return Authorizer.for_service_account(objs, NAMESPACE, sa["metadata"]["name"])


def _rbac_cluster(crd, permissions):
    standin = StandIn(users={OPERATOR_TOKEN: permissions})
    standin.start()
    try:
        assert standin.http("POST", CRDS, crd)[0] == 201  # the test is the cluster admin (no token)
        assert standin.http("POST", "/api/v1/namespaces", {"metadata": {"name": NS}})[0] == 201
    except BaseException:
        standin.stop()
        raise
    return standin


@pytest.mark.parametrize("values", [{}, {"watchNamespaces": [NS]}], ids=["cluster-wide", "namespaced"])
def test_the_charts_rbac_lets_the_operator_do_its_work(crd, helm_env, tmp_path_factory, tmp_path, values):
    """The operator (kopf and the reconcile passes) authenticated as its ServiceAccount,
    every request checked against the RBAC the chart renders (one ClusterRole; or, with
    ``watchNamespaces``, a Role in each watched namespace plus the cluster-wide discovery
    and GPUQuota reads), including the admission checks RBAC brings
    (``blockOwnerDeletion`` needs ``update`` on ``inferenceservices/finalizers``; the
    router's Role and RoleBinding only grant what the operator holds): a service with a
    model cache, KEDA and the router is built without one 403."""
    s = _rbac_cluster(crd, _operator_permissions(helm_env, tmp_path_factory, values=values))
    try:
        spec = {"model": {"uri": SMOL}, "resources": {"gpus": 0},
                "scaling": {"autoscaler": "keda", "minReplicas": 0, "maxReplicas": 2}, "router": {"enabled": True}}
        with RunningOperator(s, tmp_path, token=OPERATOR_TOKEN):
            assert s.http("POST", ISVCS, _new_isvc("llm", spec))[0] == 201
            job = one(s, "Job")
            s.http("PATCH", f"{KINDS['Job']}/{job['metadata']['name']}/status",
                   {"status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}},
                   content_type=MERGE_PATCH)
            wait_for(lambda: {"Deployment", "ScaledObject", "Role", "RoleBinding", "ServiceAccount"}
                     <= set(children(s)), "every child")
            wait_for(lambda: condition(isvc(s), "ChildrenApplied").get("status") == "True", "ChildrenApplied")
        denied = [(r.method, r.path) for r in s.requests if r.status in (401, 403)]
        assert not denied, denied
        # kopf's own calls went through the check too (its list before each watch; a watch
        # is logged when its stream ends)
        assert any(r.verb == "list" and r.path.endswith("/inferenceservices") for r in s.requests)
    finally:
        s.stop()


@pytest.mark.parametrize("drop,what", [
    ((("inferenceservices/finalizers", "update"),), "cannot set blockOwnerDeletion"),
    ((("endpointslices", "watch"),), "attempting to grant RBAC permissions not currently held: watch"),
    ((("deployments", "patch"),), 'cannot patch resource "deployments"'),
], ids=["finalizers", "escalation", "patch"])
def test_a_permission_the_chart_lacks_is_a_403_in_status(crd, helm_env, tmp_path_factory, tmp_path, drop, what):
    """The same chart without one rule: the writes that need it are refused as a real
    server refuses them, and the refusal is in the service's status."""
    s = _rbac_cluster(crd, _operator_permissions(helm_env, tmp_path_factory, drop))
    try:
        ctx = Context(FAST, api_client=_api_client(s.url, OPERATOR_TOKEN),
                      discovery_cache=str(tmp_path / "discovery.json"))
        spec = {"model": {"uri": "pvc://models/smol"}, "resources": {"gpus": 0},
                "scaling": {"autoscaler": "keda", "minReplicas": 0, "maxReplicas": 2}, "router": {"enabled": True}}
        s.http("POST", ISVCS, _new_isvc("llm", spec))
        with pytest.raises(Exception):
            converge(ctx, NS, "llm")
        assert any(r.status == 403 for r in s.requests)
        cond = condition(isvc(s), "ChildrenApplied")
        assert cond.get("status") == "False" and what in cond["message"], cond
    finally:
        s.stop()


def test_kube_client_against_standin(cluster, tmp_path):
    kube = Kube(_api_client(cluster.url), cache_file=str(tmp_path / "discovery.json"))
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": NS, "labels": {"a": "1"}},
          "data": {"k": "v"}}
    applied = kube.apply(cm)
    assert applied["data"] == {"k": "v"}
    assert kube.get("v1", "ConfigMap", NS, "c")["metadata"]["uid"] == applied["metadata"]["uid"]
    assert kube.get("v1", "ConfigMap", NS, "missing") is None
    assert kube.get("example.com/v1", "Nothing", NS, "x") is None
    assert [o["metadata"]["name"] for o in kube.list("v1", "ConfigMap", NS, "a=1")] == ["c"]
    kube.delete(applied)
    kube.delete(applied)  # already gone: fine
    assert kube.get("v1", "ConfigMap", NS, "c") is None


def test_transition_events():
    def cond(type_, status, reason):
        return {"type": type_, "status": status, "reason": reason, "message": "m"}

    previous = [cond("Ready", "True", "Ready"), cond("ModelCached", "True", "Downloaded")]
    current = [cond("Ready", "False", "Updating"), cond("ModelCached", "True", "Downloaded"),
               cond("ScalingReady", "False", "DownloadFailed")]
    assert transition_events(previous, current) == [  # Ready's event comes last
        ("Warning", "DownloadFailed", "ScalingReady is False: m"), ("Warning", "Updating", "Ready is False: m")]
    assert transition_events(None, [cond("Ready", "False", "Creating")]) == [
        ("Normal", "Creating", "Ready is False: m")]
    # still False, the reason turns into a failure: a Warning, once (Ready repeats the reason)
    previous = [cond("Ready", "False", "Downloading"), cond("ModelCached", "False", "Downloading")]
    current = [cond("Ready", "False", "DownloadFailed"), cond("ModelCached", "False", "DownloadFailed")]
    assert transition_events(previous, current) == [("Warning", "DownloadFailed", "ModelCached is False: m")]
    assert transition_events(current, current) == []  # the next pass: nothing new
    # a reason change that is not a failure posts nothing while the status stays
    assert transition_events(previous, [cond("ModelCached", "False", "Downloading2")]) == []
    # two conditions with the same Normal reason are both posted; Ready's copy of one is not
    new = [cond("Ready", "False", "WaitingForModel"), cond("WorkloadReady", "False", "WaitingForModel"),
           cond("ScalingReady", "Unknown", "WaitingForModel")]
    assert transition_events(None, new) == [("Normal", "WaitingForModel", "WorkloadReady is False: m"),
                                            ("Normal", "WaitingForModel", "ScalingReady is Unknown: m")]
    # a new service held back by a GPU quota: still False, the refusal is a Warning kubectl describe shows
    quota = [cond("WorkloadReady", "False", "QuotaExceeded")]
    assert transition_events(new, quota) == [("Warning", "QuotaExceeded", "WorkloadReady is False: m")]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_argosy_operator_command(cluster, tmp_path):
    """`argosy operator` as the chart runs it: kubeconfig login, JSON logs, liveness, SIGTERM."""
    s = cluster
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "standin",
        "clusters": [{"name": "standin", "cluster": {"server": s.url}}],
        "users": [{"name": "tester", "user": {}}],
        "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "tester", "namespace": NS}}]}))
    port = _free_port()
    env = dict(os.environ, KUBECONFIG=str(kubeconfig), ARGOSY_RESYNC_INTERVAL="0.3", TMPDIR=str(tmp_path))
    env.pop("KUBERNETES_SERVICE_HOST", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "argosy.runtime.cli", "operator", "--standalone", "--namespace", NS,
         "--liveness", f"http://127.0.0.1:{port}/healthz", "--log-format", "json"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        s.http("POST", ISVCS, _new_isvc("llm", {"model": {"uri": SMOL}}))
        one(s, "Job")

        def alive():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
                    return resp.status == 200
            except OSError:
                return False

        wait_for(alive, "the liveness endpoint")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert lines and all("message" in json.loads(line) for line in lines)


def test_operator_command_needs_no_torch(tmp_path):
    """`argosy operator` and `argosy download` parse without torch, transformers or aiohttp;
    `argosy serve` then says what is missing."""
    code = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "aiohttp", "numpy"):
            raise ImportError(f"No module named {name!r} (blocked)")
sys.meta_path.insert(0, Block())
from argosy.runtime import cli
try:
    cli.main(["operator", "--help"])
except SystemExit as e:
    assert e.code == 0, e.code
assert "kopf" not in sys.modules
assert cli.main(["serve", "model"]) == 2
try:
    cli.main(["--help"])
except SystemExit as e:
    assert e.code == 0, e.code
print("loaded:", sorted(m for m in ("torch", "transformers", "aiohttp", "kopf", "kubernetes") if m in sys.modules))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--all-namespaces" in proc.stdout and "--peering" in proc.stdout
    assert "loaded: []" in proc.stdout
    assert "argosy serve` needs the runtime extra" in proc.stderr


# ------------------------------------------------- issue 12: partial failures and handovers
def _events(standin: StandIn) -> list[dict]:
    code, listing = standin.http("GET", f"/api/v1/namespaces/{NS}/events")
    assert code == 200
    return listing["items"]


def test_one_failed_child_does_not_freeze_the_others(cluster, tmp_path):
    """The Service apply fails (500): every other child is still applied, the failure is
    in status (ChildrenApplied False, the object named) and in a Warning event, and the pass
    raises so it is retried; the next pass applies the Service and clears the condition."""
    s = cluster
    ctx = Context(FAST, api_client=_api_client(s.url), discovery_cache=str(tmp_path / "discovery.json"))
    spec = {"model": {"uri": "pvc://models/smol"}, "resources": {"gpus": 0},
            "scaling": {"autoscaler": "keda", "minReplicas": 1, "maxReplicas": 2}}
    s.http("POST", ISVCS, _new_isvc("llm", spec))
    s.fail_next("services", 500, times=5, verbs=("patch",))
    with pytest.raises(Exception):
        converge(ctx, NS, "llm")
    kids = children(s)
    assert "Service" not in kids
    assert {"Deployment", "ScaledObject", "PodDisruptionBudget"} <= set(kids)
    cond = condition(isvc(s), "ChildrenApplied")
    assert cond["status"] == "False" and cond["reason"] == "ApplyFailed" and "Service llm" in cond["message"]
    assert any(e["reason"] == "ApplyFailed" and e["type"] == "Warning" for e in _events(s))
    for f in list(s.faults):
        s.faults.remove(f)
    converge(ctx, NS, "llm")
    assert "Service" in children(s) and condition(isvc(s), "ChildrenApplied")["status"] == "True"


def test_a_claim_that_cannot_be_provisioned_is_reported_once(cluster, tmp_path):
    """The PV controller cannot provision the cache claim (no ReadWriteMany in the default
    StorageClass): its ProvisioningFailed event reaches status (ModelCached False, reason
    ProvisioningFailed, the provisioner's words and what to do) and one Warning event;
    later passes post no duplicate; an event of an older claim of the same name is ignored."""
    s = cluster
    ctx = Context(FAST, api_client=_api_client(s.url), discovery_cache=str(tmp_path / "discovery.json"))
    s.http("POST", ISVCS, _new_isvc("llm", {"model": {"uri": SMOL}}))
    converge(ctx, NS, "llm")
    pvc = one(s, "PersistentVolumeClaim")
    name = pvc["metadata"]["name"]
    code, _ = s.http("PATCH", f"{KINDS['PersistentVolumeClaim']}/{name}/status", {"status": {"phase": "Pending"}},
                     content_type=MERGE_PATCH)
    assert code == 200

    def provisioner_event(uid: str, message: str, ts: str) -> None:
        ev = {"apiVersion": "v1", "kind": "Event", "metadata": {"generateName": f"{name}."},
              "involvedObject": {"kind": "PersistentVolumeClaim", "namespace": NS, "name": name, "uid": uid},
              "reason": "ProvisioningFailed", "type": "Warning", "message": message, "lastTimestamp": ts,
              "source": {"component": "persistentvolume-controller"}}
        code, body = s.http("POST", f"/api/v1/namespaces/{NS}/events", ev)
        assert code == 201, body

    provisioner_event("uid-of-an-older-claim", "stale", "2026-01-01T00:00:00Z")
    converge(ctx, NS, "llm")
    assert condition(isvc(s), "ModelCached")["reason"] == "Downloading"
    provisioner_event(pvc["metadata"]["uid"], "storageclass standard does not support access mode RWX",
                      "2026-01-01T00:01:00Z")
    for _ in range(3):
        converge(ctx, NS, "llm")
    cond = condition(isvc(s), "ModelCached")
    assert cond["status"] == "False" and cond["reason"] == "ProvisioningFailed", cond
    assert "does not support access mode RWX" in cond["message"] and "storageClassName" in cond["message"]
    ours = [e for e in _events(s) if e["reason"] == "ProvisioningFailed" and e["involvedObject"]["kind"] == api.KIND]
    assert len(ours) == 1 and ours[0]["type"] == "Warning", ours
    # the events cannot be read for a while (an API hiccup): the condition stays as it was, nothing is re-posted
    fault = s.fail_next("events", 500, times=2, verbs=("list",))
    for _ in range(2):
        converge(ctx, NS, "llm")
    assert len(fault.hits) == 2
    assert condition(isvc(s), "ModelCached") == cond
    ours = [e for e in _events(s) if e["reason"] == "ProvisioningFailed" and e["involvedObject"]["kind"] == api.KIND]
    assert len(ours) == 1, ours
    # bound after all (the admin added a StorageClass): back to downloading
    s.http("PATCH", f"{KINDS['PersistentVolumeClaim']}/{name}/status", {"status": {"phase": "Bound"}},
           content_type=MERGE_PATCH)
    converge(ctx, NS, "llm")
    assert condition(isvc(s), "ModelCached")["reason"] == "Downloading"


def test_hpa_to_keda_and_back_at_zero(cluster, tmp_path):
    """hpa -> keda: the old HPA goes before the ScaledObject comes (KEDA's webhook refuses
    a second owner of the Deployment); keda -> hpa while KEDA had scaled to zero: the
    Deployment gets a replica back (an HPA does not scale a workload at 0 replicas)."""
    s = cluster
    ctx = Context(FAST, api_client=_api_client(s.url), discovery_cache=str(tmp_path / "discovery.json"))
    spec = {"model": {"uri": "pvc://models/smol"}, "resources": {"gpus": 0},
            "scaling": {"autoscaler": "hpa", "minReplicas": 1, "maxReplicas": 3}}
    s.http("POST", ISVCS, _new_isvc("llm", spec))
    converge(ctx, NS, "llm")
    assert "HorizontalPodAutoscaler" in children(s)
    patch_isvc(s, {"spec": {"scaling": {"autoscaler": "keda", "minReplicas": 0}, "router": {"enabled": True}}})
    converge(ctx, NS, "llm")
    kids = children(s)
    assert "ScaledObject" in kids and "HorizontalPodAutoscaler" not in kids
    assert condition(isvc(s), "ChildrenApplied")["status"] == "True"
    # KEDA scales the Deployment to zero
    code, _ = s.http("PATCH", f"{KINDS['Deployment']}/llm", {"spec": {"replicas": 0}}, content_type=MERGE_PATCH)
    assert code == 200
    patch_isvc(s, {"spec": {"scaling": {"autoscaler": "hpa", "minReplicas": 2}}})
    converge(ctx, NS, "llm")
    kids = children(s)
    assert "HorizontalPodAutoscaler" in kids and "ScaledObject" not in kids
    assert one(s, "Deployment")["spec"]["replicas"] == 2


def test_long_cooldown_fits_the_hpa_limit(cluster, tmp_path):
    """cooldownPeriod 7200 s: KEDA's cooldownPeriod keeps it, but an HPA's stabilization
    window is capped at 3600 s by the API (the stand-in answers 422 above it, as the real one)."""
    s = cluster
    ctx = Context(FAST, api_client=_api_client(s.url), discovery_cache=str(tmp_path / "discovery.json"))
    spec = {"model": {"uri": "pvc://models/smol"}, "resources": {"gpus": 0},
            "scaling": {"autoscaler": "hpa", "minReplicas": 1, "maxReplicas": 3, "cooldownPeriod": 7200}}
    s.http("POST", ISVCS, _new_isvc("llm", spec))
    converge(ctx, NS, "llm")
    assert one(s, "HorizontalPodAutoscaler")["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 3600
    patch_isvc(s, {"spec": {"scaling": {"autoscaler": "keda"}}})
    converge(ctx, NS, "llm")
    so = one(s, "ScaledObject")["spec"]
    assert so["cooldownPeriod"] == 7200
    assert so["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 3600


def test_a_hung_api_server_fails_a_call_instead_of_stalling(tmp_path):
    """A socket that accepts and never answers: every call (discovery included) fails within
    the request timeout, so one hung connection cannot stall the operator's loop."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    try:
        kube = Kube(_api_client(f"http://127.0.0.1:{server.getsockname()[1]}"),
                    cache_file=str(tmp_path / "discovery.json"), request_timeout=0.5)
        t0 = time.monotonic()
        with pytest.raises(Exception):
            kube.get("v1", "Secret", "ml", "x")
        assert time.monotonic() - t0 < 10
    finally:
        server.close()


@pytest.mark.slow
def test_fleet_pass_cost(cluster, tmp_path):
    """Slow (~30 s at 100 services, 4 min at 500): ``.ci/run`` runs it after the default suite;
    tests/operator/test_informer.py checks the cached steady state's single call in the default run.

    A resync round over a fleet (ARGOSY_FLEET_SIZE services, default 100, with a GPUQuota
    so the cap is computed): the cluster-wide lists are read once per round, not once per
    service, and each service's pass costs a bounded number of API calls. Prints the calls
    per service by verb and the pass time (the chart README quotes the 500-service numbers)."""
    from collections import Counter
    from pathlib import Path

    from argosy.operator.handlers import resync_round

    s = cluster
    n = int(os.environ.get("ARGOSY_FLEET_SIZE", "100"))
    quota_crd = yaml.safe_load((Path(__file__).resolve().parents[2] / "crds" / "gpuquotas.serving.argosy.dev.yaml")
                               .read_text())
    assert s.http("POST", CRDS, quota_crd)[0] == 201
    quota = {"apiVersion": api.API_VERSION, "kind": "GPUQuota", "metadata": {"name": "team"},
             "spec": {"namespaces": [NS], "gpus": 4 * n}}
    assert s.http("POST", f"/apis/{api.GROUP}/{api.VERSION}/gpuquotas", quota)[0] == 201
    spec = {"model": {"uri": "pvc://models/smol"}, "resources": {"gpus": 1},
            "scaling": {"autoscaler": "keda", "minReplicas": 1, "maxReplicas": 2}}
    for i in range(n):
        assert s.http("POST", ISVCS, _new_isvc(f"llm-{i}", spec))[0] == 201
    ctx = Context(FAST, api_client=_api_client(s.url), discovery_cache=str(tmp_path / "discovery.json"))
    converge(ctx, NS, "llm-0")  # discovery warm
    rounds = []
    labels = ("first", "steady, API reads", "steady, children cache")
    try:
        for label in labels:
            # the first round creates the children, the second reads them from the API server,
            # the third from the list-and-watch cache started after the first
            if label == labels[2]:
                assert ctx.start_children_cache().wait_synced(60)
            s.requests.clear()  # (the log keeps the last 20,000)
            t0 = time.monotonic()
            resync_round(ctx, [(NS, f"llm-{i}") for i in range(n)])
            elapsed = time.monotonic() - t0
            reqs = [r for r in s.requests if r.verb != "watch"]  # (the cache's long-lived streams)
            assert len(s.requests) < s.requests.maxlen
            rounds.append((elapsed, reqs))
    finally:
        ctx.stop_children_cache()
    for label, (elapsed, reqs) in zip(labels, rounds):
        verbs = Counter(r.verb for r in reqs)
        cluster_lists = sum(1 for r in reqs if r.verb == "list" and r.path.endswith(f"/{api.PLURAL}")
                            and "/namespaces/" not in r.path)
        print(f"{label} round, {n} services: {len(reqs) / n:.1f} API calls per service "
              f"({', '.join(f'{v} {c / n:.1f}' for v, c in sorted(verbs.items()))}), "
              f"{elapsed / n * 1e3:.0f} ms per service, {elapsed:.1f} s per round; "
              f"cluster-wide InferenceService lists: {cluster_lists}")
        assert cluster_lists <= 2  # the GPUQuota pass and the round's snapshot: not one per service
        assert len(reqs) / n <= 40
    assert len(rounds[1][1]) <= len(rounds[0][1])
    # with the cache, a pass that changes nothing reads the InferenceService and writes nothing
    cached = Counter(r.verb for r in rounds[2][1])
    # (the lists are the round's cluster-wide GPUQuota, InferenceService and Namespace reads)
    assert cached["list"] <= 6 and not cached["create"] and not cached["delete"], cached
    assert len(rounds[2][1]) / n <= 2, cached
