"""The children cache (``argosy.operator.informer``) and the no-op apply check, against the
API stand-in: list-and-watch with a server-side label selector, events folded in, a relist
after 410 Gone, passes that read the cache and skip applies that would change nothing, and
drift (a user's edit of an applied field, a deleted child) still repaired."""

from __future__ import annotations

import time

import pytest

from argosy.operator import reconcile
from argosy.operator.handlers import CHILD_KINDS, Context, converge
from argosy.operator.informer import Informer
from argosy.operator.kube import Kube
from argosy.operator.render import ISVC_LABEL

from .apiserver_standin import MERGE_PATCH
from .test_kopf_shell import FAST, ISVCS, KINDS, NS, _api_client, _new_isvc, cluster, one, wait_for  # noqa: F401

DEPLOYMENTS = KINDS["Deployment"]


def _deployment(name: str, labels: dict) -> dict:
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": NS, "labels": labels},
            "spec": {"selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}},
                                  "spec": {"containers": [{"name": "c", "image": "busybox:1"}]}}}}


@pytest.fixture
def cached_service(cluster, tmp_path):
    """``start(spec)``: an InferenceService ``llm`` with ``spec``, converged once without the
    children cache, then again with the cache synced and holding its Deployment; returns
    the :class:`Context`. The cache is stopped after the test."""
    contexts: list[Context] = []

    def start(spec: dict) -> Context:
        assert cluster.http("POST", ISVCS, _new_isvc("llm", spec))[0] == 201
        ctx = Context(FAST, api_client=_api_client(cluster.url), discovery_cache=str(tmp_path / "discovery.json"),
                      namespaces=[NS])
        contexts.append(ctx)
        converge(ctx, NS, "llm")  # creates the children (no cache yet)
        assert ctx.start_children_cache().wait_synced(10)
        wait_for(lambda: ctx.children.get("apps/v1", "Deployment", NS, "llm") is not None, "the cached Deployment")
        converge(ctx, NS, "llm")  # settles anything the first pass left to do
        return ctx

    yield start
    for ctx in contexts:
        ctx.stop_children_cache()


HPA_SPEC = {"model": {"uri": "pvc://models/smol"}, "resources": {"gpus": 0},
            "scaling": {"autoscaler": "hpa", "minReplicas": 1, "maxReplicas": 2}}


@pytest.fixture
def informer(cluster, tmp_path):
    kube = Kube(_api_client(cluster.url), cache_file=str(tmp_path / "discovery.json"))
    inf = Informer(kube, "apps/v1", "Deployment", ISVC_LABEL, NS).start()
    assert inf.synced.wait(10)
    yield inf
    inf.stop()


def test_informer_follows_labelled_objects_only(cluster, informer):
    """Create, modify, relabel, delete: the cache follows each labelled Deployment; an
    unlabelled one never reaches it, because the selector is evaluated by the server (the
    list and the watch requests carry it)."""
    s = cluster
    assert s.http("POST", DEPLOYMENTS, _deployment("a", {ISVC_LABEL: "llm"}))[0] == 201
    assert s.http("POST", DEPLOYMENTS, _deployment("b", {ISVC_LABEL: "llm"}))[0] == 201
    assert s.http("POST", DEPLOYMENTS, _deployment("other", {"app": "x"}))[0] == 201
    wait_for(lambda: len(informer.by_label(NS, "llm") or []) == 2, "two cached Deployments")
    assert informer.get(NS, "other") is None and len(informer) == 2
    code, _ = s.http("PATCH", f"{DEPLOYMENTS}/a", {"spec": {"replicas": 3}}, content_type=MERGE_PATCH)
    assert code == 200
    wait_for(lambda: (informer.get(NS, "a") or {}).get("spec", {}).get("replicas") == 3, "the modified replicas")
    # moved to another owner's label, then the label removed: indexed under the new value, then gone
    s.http("PATCH", f"{DEPLOYMENTS}/b", {"metadata": {"labels": {ISVC_LABEL: "other-llm"}}}, content_type=MERGE_PATCH)
    wait_for(lambda: [o["metadata"]["name"] for o in informer.by_label(NS, "other-llm") or []] == ["b"], "relabelled")
    assert [o["metadata"]["name"] for o in informer.by_label(NS, "llm")] == ["a"]
    s.http("PATCH", f"{DEPLOYMENTS}/b", {"metadata": {"labels": {ISVC_LABEL: None}}}, content_type=MERGE_PATCH)
    wait_for(lambda: informer.get(NS, "b") is None, "the unlabelled Deployment dropped")
    assert s.http("DELETE", f"{DEPLOYMENTS}/a")[0] == 200
    wait_for(lambda: informer.get(NS, "a") is None, "the deleted Deployment dropped")
    assert informer.by_label(NS, "llm") == [] and len(informer) == 0
    sent = [r for r in s.requests if r.path == DEPLOYMENTS and r.verb in ("list", "watch")]
    assert sent and all(r.query.get("labelSelector") == ISVC_LABEL for r in sent)
    assert informer.lists == 1


def test_informer_lists_again_after_410_gone(cluster, informer):
    """The server drops its history and ends the stream (an etcd compaction): resuming from
    the informer's version is 410 Gone, so it lists again, and what changed meanwhile is
    there."""
    s = cluster
    assert s.http("POST", DEPLOYMENTS, _deployment("a", {ISVC_LABEL: "llm"}))[0] == 201
    wait_for(lambda: informer.get(NS, "a") is not None, "the first Deployment")
    assert s.http("POST", DEPLOYMENTS, _deployment("unrelated", {"app": "x"}))[0] == 201  # moves the version on
    s.compact()
    assert s.http("POST", DEPLOYMENTS, _deployment("b", {ISVC_LABEL: "llm"}))[0] == 201
    wait_for(lambda: informer.get(NS, "b") is not None, "the Deployment created across the compaction")
    assert informer.lists >= 2 and informer.synced.is_set()
    assert any(r.verb == "watch" and r.path == DEPLOYMENTS for r in s.requests)


def test_an_unserved_kind_is_synced_and_empty(cluster, tmp_path):
    kube = Kube(_api_client(cluster.url), cache_file=str(tmp_path / "discovery.json"))
    inf = Informer(kube, "example.com/v1", "Gadget", ISVC_LABEL, NS).start()
    try:
        assert inf.synced.wait(10) and inf.by_label(NS, "llm") == [] and inf.get(NS, "x") is None
    finally:
        inf.stop()


def test_up_to_date():
    """The no-op check: same applied hash and every applied field equal; extra live fields
    (defaults, status, other managers) do not matter; a dropped field changes the hash."""
    m = reconcile.with_applied_hash(_deployment("a", {ISVC_LABEL: "llm"}))
    live = {**m, "metadata": {**m["metadata"], "uid": "u", "resourceVersion": "9"}, "status": {"replicas": 1}}
    live["spec"] = {**m["spec"], "replicas": 1, "strategy": {"type": "RollingUpdate"}}
    assert reconcile.up_to_date(m, live)
    assert not reconcile.up_to_date(m, None)
    edited = {**live, "spec": {**live["spec"], "selector": {"matchLabels": {"app": "b"}}}}
    assert not reconcile.up_to_date(m, edited)
    # a container added by someone else: lists compare element by element, same length
    tmpl = live["spec"]["template"]
    more = {**live, "spec": {**live["spec"], "template": {**tmpl, "spec": {"containers": [
        *tmpl["spec"]["containers"], {"name": "sidecar", "image": "x"}]}}}}
    assert not reconcile.up_to_date(m, more)
    # the operator stops applying a label it applied before: same fields otherwise, new hash
    fewer = _deployment("a", {ISVC_LABEL: "llm"})
    fewer["metadata"]["labels"] = {}
    assert not reconcile.up_to_date(reconcile.with_applied_hash(fewer), live)
    # quantities come back as strings
    q = reconcile.with_applied_hash({"apiVersion": "v1", "kind": "X", "metadata": {"name": "q"},
                                     "spec": {"limits": {"nvidia.com/gpu": 1}}})
    assert reconcile.up_to_date(q, {**q, "spec": {"limits": {"nvidia.com/gpu": "1"}}})
    assert not reconcile.up_to_date(q, {**q, "spec": {"limits": {"nvidia.com/gpu": "2"}}})
    assert reconcile.with_applied_hash(m) == m  # idempotent


def test_passes_read_the_cache_skip_no_op_applies_and_repair_drift(cluster, cached_service):
    """With the children cache synced, a steady-state pass reads the InferenceService and
    nothing else; a user's edit of a field the operator applied, and a deleted child, are
    put back by the next pass."""
    s = cluster
    ctx = cached_service(HPA_SPEC)
    dep = one(s, "Deployment")
    time.sleep(0.3)
    s.requests.clear()
    converge(ctx, NS, "llm")
    calls = [(r.verb, r.path) for r in s.requests]
    assert calls == [("get", f"{ISVCS}/llm")], calls
    # drift: the container image edited by hand
    image = dep["spec"]["template"]["spec"]["containers"][0]["image"]
    containers = [{**dep["spec"]["template"]["spec"]["containers"][0], "image": "evil:1"}]
    code, _ = s.http("PATCH", f"{KINDS['Deployment']}/llm", {"spec": {"template": {"spec": {
        "containers": containers}}}}, content_type=MERGE_PATCH)
    assert code == 200
    wait_for(lambda: ctx.children.get("apps/v1", "Deployment", NS, "llm")["spec"]["template"]["spec"][
        "containers"][0]["image"] == "evil:1", "the edit in the cache")
    converge(ctx, NS, "llm")
    assert one(s, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"] == image
    # a deleted child is a cache miss, read from the server and created again
    assert s.http("DELETE", f"{KINDS['HorizontalPodAutoscaler']}/llm")[0] == 200
    wait_for(lambda: ctx.children.get("autoscaling/v2", "HorizontalPodAutoscaler", NS, "llm") is None,
             "the deletion in the cache")
    converge(ctx, NS, "llm")
    one(s, "HorizontalPodAutoscaler")
    assert len(ctx.children.informers) == len(CHILD_KINDS)


def _freeze_deployments(ctx: Context):
    """Stop the Deployments' informer: the cache keeps its current copies (still "synced")
    and falls behind every later write."""
    (inf,) = ctx.children.informers[("apps/v1", "Deployment")].values()
    inf.stop()
    assert inf.synced.is_set()
    return inf


def test_a_stale_cached_child_does_not_skip_a_needed_apply(cluster, cached_service):
    """The cache can hold an older copy of a child than the operator's own last write (the
    write's watch event still in flight). A pass whose desired manifest equals that older
    copy (a spec changed and changed back) must apply, not skip: a cached child is trusted
    to skip only once its informer has seen the resourceVersion this operator's last write
    returned. Here the Deployments' watch is stopped before the write (its event never
    arrives), the cache staying "synced" with the old copy."""
    s = cluster
    ctx = cached_service(HPA_SPEC)
    old_hash = one(s, "Deployment")["metadata"]["annotations"][reconcile.APPLIED_HASH_ANNOTATION]
    inf = _freeze_deployments(ctx)

    code, _ = s.http("PATCH", f"{ISVCS}/llm", {"spec": {"runtime": {"maxNumSeqs": 7}}}, content_type=MERGE_PATCH)
    assert code == 200
    converge(ctx, NS, "llm")  # writes the changed Deployment; the cache still shows the old one
    assert one(s, "Deployment")["metadata"]["annotations"][reconcile.APPLIED_HASH_ANNOTATION] != old_hash
    assert not inf.caught_up(NS, "llm")
    code, obj = s.http("GET", f"{ISVCS}/llm")
    obj["spec"]["runtime"].pop("maxNumSeqs")  # changed back: the desired Deployment is the stale copy's
    assert s.http("PUT", f"{ISVCS}/llm", obj)[0] == 200
    converge(ctx, NS, "llm")
    assert one(s, "Deployment")["metadata"]["annotations"][reconcile.APPLIED_HASH_ANNOTATION] == old_hash


def test_a_replicas_hand_over_reads_the_server_not_the_cache(cluster, cached_service):
    """autoscaler none -> hpa hands the Deployment's live replicas to a second field manager
    (``reconcile.replicas_handover``). The cached Deployment can be older than the server's
    (here: the operator's own scale 3 -> 4 whose watch event never arrived); the hand-over
    must carry the server's 4, not the cache's 3."""
    s = cluster
    ctx = cached_service({"model": {"uri": "pvc://models/smol"}, "resources": {"gpus": 0},
                          "scaling": {"autoscaler": "none", "minReplicas": 3}})
    assert one(s, "Deployment")["spec"]["replicas"] == 3
    inf = _freeze_deployments(ctx)
    code, _ = s.http("PATCH", f"{ISVCS}/llm", {"spec": {"scaling": {"minReplicas": 4}}}, content_type=MERGE_PATCH)
    assert code == 200
    converge(ctx, NS, "llm")
    assert one(s, "Deployment")["spec"]["replicas"] == 4
    assert inf.get(NS, "llm")["spec"]["replicas"] == 3  # the cache is behind
    code, _ = s.http("PATCH", f"{ISVCS}/llm", {"spec": {"scaling": {
        "autoscaler": "hpa", "minReplicas": 1, "maxReplicas": 5}}}, content_type=MERGE_PATCH)
    assert code == 200
    converge(ctx, NS, "llm")
    dep = one(s, "Deployment")
    assert dep["spec"]["replicas"] == 4
    owners = {m["manager"] for m in dep["metadata"]["managedFields"] if "f:replicas" in m["fieldsV1"].get("f:spec", {})}
    assert owners == {reconcile.REPLICAS_HANDOVER_MANAGER}


def test_our_write_seen_by_the_cache_is_caught_up():
    """:meth:`Informer.expect` / ``caught_up``: pending until the event of that version is
    folded in (or the object is deleted); a write the cache already shows leaves nothing
    pending; a newer write replaces an older pending one."""
    inf = Informer(None, "apps/v1", "Deployment", ISVC_LABEL, NS)
    dep = lambda rv: {"metadata": {"namespace": NS, "name": "d", "resourceVersion": rv,  # noqa: E731
                                   "labels": {ISVC_LABEL: "llm"}}}
    inf.apply_event("ADDED", dep("1"))
    inf.expect(NS, "d", "2")
    assert not inf.caught_up(NS, "d")
    inf.apply_event("MODIFIED", dep("2"))
    assert inf.caught_up(NS, "d")
    inf.apply_event("MODIFIED", dep("3"))  # e.g. a status update by another controller
    inf.expect(NS, "d", "3")  # a no-op apply answered with the version the cache shows
    assert inf.caught_up(NS, "d")
    inf.expect(NS, "d", "4")
    inf.expect(NS, "d", "5")
    inf.apply_event("MODIFIED", dep("4"))
    assert not inf.caught_up(NS, "d")
    inf.apply_event("DELETED", dep("5"))
    assert inf.caught_up(NS, "d")


def test_a_watch_refused_after_every_list_backs_off(cluster, tmp_path, monkeypatch):
    """A watch that fails at once after each successful list (403: a ClusterRole without
    ``watch``) doubles the wait between lists instead of listing at the base rate."""
    from argosy.operator import informer as informer_mod

    monkeypatch.setattr(informer_mod, "RELIST_DELAY_S", 0.1)
    s = cluster
    fault = s.fail_next("deployments", 403, times=4, verbs=("watch",))
    kube = Kube(_api_client(s.url), cache_file=str(tmp_path / "discovery.json"))
    t0 = time.monotonic()
    inf = Informer(kube, "apps/v1", "Deployment", ISVC_LABEL, NS).start()
    try:
        wait_for(lambda: inf.lists == 5 and inf.synced.is_set(), "four refused watches, then a healthy list")
        elapsed = time.monotonic() - t0
        assert len(fault.hits) == 4
        assert elapsed >= 0.1 + 0.2 + 0.4 + 0.8 - 0.05, elapsed  # 0.4 s at the base rate
    finally:
        inf.stop()


def test_state_of_deleted_services_is_pruned(tmp_path):
    """A resync round drops the locks and autoscaler history of
    InferenceServices it no longer sees, and keeps the others'."""
    from argosy.operator import handlers

    ctx = Context(FAST, api_client=object(), discovery_cache=str(tmp_path / "d.json"))
    for name in ("gone", "kept"):
        ctx.lock(NS, name)
        handlers._HISTORY[(NS, name)] = [(0.0, 1)]
    ctx.prune({(NS, "kept")})
    assert set(ctx._locks) == {(NS, "kept")}
    assert (NS, "gone") not in handlers._HISTORY and (NS, "kept") in handlers._HISTORY
    handlers._HISTORY.pop((NS, "kept"))


def test_a_failed_hand_over_read_does_not_stop_the_pass(cluster, cached_service):
    """The hand-over's read of the Deployment from the server fails (a connection reset):
    the pass hands over the cached replicas, makes its other writes and writes the status,
    then raises the failure so that the pass is retried (as for any failed call)."""
    s = cluster
    ctx = cached_service({"model": {"uri": "pvc://models/smol"}, "resources": {"gpus": 0},
                          "scaling": {"autoscaler": "none", "minReplicas": 3}})
    code, _ = s.http("PATCH", f"{ISVCS}/llm", {"spec": {"scaling": {
        "autoscaler": "hpa", "minReplicas": 1, "maxReplicas": 5}}}, content_type=MERGE_PATCH)
    assert code == 200
    real_get = ctx.kube.get

    def get(api_version, kind, namespace, name):
        if kind == "Deployment":
            raise ConnectionResetError("connection reset by peer")
        return real_get(api_version, kind, namespace, name)

    ctx.kube.get = get
    with pytest.raises(ConnectionResetError):
        converge(ctx, NS, "llm")
    ctx.kube.get = real_get
    dep = one(s, "Deployment")
    assert dep["spec"]["replicas"] == 3  # the cached copy's replicas, handed over
    one(s, "HorizontalPodAutoscaler")  # the other writes were made
    code, isvc = s.http("GET", f"{ISVCS}/llm")
    cond = {c["type"]: c for c in isvc["status"]["conditions"]}
    assert cond["ChildrenApplied"]["status"] == "False" and "connection reset" in cond["ChildrenApplied"]["message"]
