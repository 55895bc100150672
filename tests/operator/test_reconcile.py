"""reconcile(): which children get applied, and the status a user sees at each stage."""

from __future__ import annotations

import copy
from datetime import datetime, timedelta, timezone

from argosy.operator import reconcile as rec
from argosy.operator import render
from argosy.operator.settings import OperatorSettings

from . import crdcheck
from .conftest import make_isvc
from .specs import SPECS

SETTINGS = OperatorSettings()
T0 = datetime(2025, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
T1 = T0 + timedelta(minutes=5)


def run(obj, observed=None, now=T0):
    return rec.reconcile(obj, observed or {}, SETTINGS, now=now)


def conds(result) -> dict[str, dict]:
    return {c["type"]: c for c in result.status["conditions"]}


def kinds(result) -> list[str]:
    return [m["kind"] for m in result.manifests_to_apply]


def live(obj, role, status=None, generation=1) -> dict:
    """The live version of a desired child, as the API server would return it."""
    m = copy.deepcopy(rec.desired_children(obj, SETTINGS)[role])
    m["metadata"]["generation"] = generation
    m["status"] = status or {}
    return m


def job_done(obj):
    return live(obj, "prefetch", {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]})


def dep_available(obj, available=1, replicas=1):
    dep = live(obj, "deployment", {"observedGeneration": 1, "replicas": replicas, "readyReplicas": available,
                                   "availableReplicas": available, "updatedReplicas": replicas})
    dep["spec"]["replicas"] = replicas  # set by the API server or the autoscaler when we leave it out
    return dep


def test_new_service_downloads_first():
    obj = make_isvc(SPECS["keda"], name="chat", namespace="team-a")
    r = run(obj)
    assert kinds(r) == ["PersistentVolumeClaim", "Job", "Service", "ServiceMonitor", "PodDisruptionBudget"]
    c = conds(r)
    assert [x["type"] for x in r.status["conditions"]] == ["Ready", "ModelCached", "WorkloadReady", "ScalingReady"]
    assert c["ModelCached"]["status"] == "False" and c["ModelCached"]["reason"] == "Downloading"
    assert c["WorkloadReady"]["reason"] == "WaitingForModel"
    assert c["ScalingReady"]["status"] == "Unknown"
    assert c["Ready"]["status"] == "False" and c["Ready"]["reason"] == "Downloading"
    assert all(x["lastTransitionTime"] == "2025-01-01T12:00:00Z" for x in c.values())
    assert all(x["observedGeneration"] == 1 for x in c.values())
    s = r.status
    assert s["observedGeneration"] == 1 and s["replicas"] == 0 and s["readyReplicas"] == 0
    assert s["url"] == "http://chat.team-a.svc.cluster.local:8000/v1"
    assert s["selector"] == "app.kubernetes.io/component=server,app.kubernetes.io/instance=chat,app.kubernetes.io/name=argosy"
    assert set(r.children) == {"cache", "prefetch", "service", "monitor", "pdb", "deployment", "autoscaler"}


def test_claim_pending_and_job_running_messages():
    obj = make_isvc()
    pvc = live(obj, "cache", {"phase": "Pending"})
    job = live(obj, "prefetch", {"active": 1})
    c = conds(run(obj, {"cache": pvc, "prefetch": job}))["ModelCached"]
    assert c["reason"] == "Downloading" and "bind" in c["message"]
    c = conds(run(obj, {"cache": {**pvc, "status": {"phase": "Bound"}}, "prefetch": job}))["ModelCached"]
    assert c["reason"] == "Downloading" and job["metadata"]["name"] in c["message"]


def test_claim_that_cannot_be_provisioned_says_why():
    """A Pending cache claim with a ProvisioningFailed event (a StorageClass without
    ReadWriteMany, the default access mode) is reported as such, with what to do."""
    obj = make_isvc()
    pvc = live(obj, "cache", {"phase": "Pending"})
    job = live(obj, "prefetch", {"active": 1})
    msg = "failed to provision volume with StorageClass \"standard\": rpc error: access mode RWX not supported"
    r = rec.reconcile(obj, {"cache": pvc, "prefetch": job}, SETTINGS, now=T0, provisioning_failure=lambda: msg)
    c = conds(r)
    assert c["ModelCached"]["status"] == "False" and c["ModelCached"]["reason"] == "ProvisioningFailed"
    assert msg in c["ModelCached"]["message"] and "ReadWriteMany" in c["ModelCached"]["message"]
    assert "storageClassName" in c["ModelCached"]["message"]
    assert c["Ready"]["reason"] == "ProvisioningFailed"
    # ReadWriteOnce asked for: the provisioner's words only; once bound, the event no longer matters
    rwo = make_isvc({"model": {"uri": "hf://HuggingFaceTB/SmolLM2-135M-Instruct"}, "cache": {"accessMode": "ReadWriteOnce"}})
    c = conds(rec.reconcile(rwo, {"cache": live(rwo, "cache", {"phase": "Pending"}), "prefetch": job},
                            SETTINGS, now=T0, provisioning_failure=lambda: msg))["ModelCached"]
    assert c["reason"] == "ProvisioningFailed" and "ReadWriteMany" not in c["message"]
    bound = {**pvc, "status": {"phase": "Bound"}}
    c = conds(rec.reconcile(obj, {"cache": bound, "prefetch": job}, SETTINGS, now=T0,
                                  provisioning_failure=lambda: msg))["ModelCached"]
    assert c["reason"] == "Downloading"
    # the Event list is made only when its answer matters: not for a finished Job
    def no_list():
        raise AssertionError("events listed although the model is cached")

    done = live(obj, "prefetch", {"succeeded": 1})
    c = conds(rec.reconcile(obj, {"cache": pvc, "prefetch": done}, SETTINGS, now=T0,
                            provisioning_failure=no_list))["ModelCached"]
    assert c["status"] == "True"


def test_download_failure():
    obj = make_isvc()
    job = live(obj, "prefetch", {"failed": 4, "conditions": [
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}]})
    r = run(obj, {"prefetch": job})
    c = conds(r)
    assert c["ModelCached"]["status"] == "False" and c["ModelCached"]["reason"] == "DownloadFailed"
    assert "backoff limit" in c["ModelCached"]["message"] and "kubectl logs" in c["ModelCached"]["message"]
    assert c["Ready"]["reason"] == "DownloadFailed"
    assert "Deployment" not in kinds(r)


def _failed(job):
    job = copy.deepcopy(job)
    job["status"] = {"failed": 1, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}
    return job


def test_prefetch_job_is_created_once_and_recreated_only_when_failed_with_other_settings():
    """A Job's pod template is immutable: a live Job is never re-applied (a changed
    template would be refused on every pass). A failed Job is deleted for a retry only when
    its spec hash differs from the current one (here: the operator now runs a new image)."""
    obj = make_isvc()
    old_running = live(obj, "prefetch", {"active": 1})  # made under SETTINGS
    old_failed = _failed(old_running)
    upgraded = OperatorSettings(runtime_image="example.com/argosy-runtime:2")

    def run_upgraded(observed):
        return rec.reconcile(obj, observed, upgraded, now=T0)

    new = rec.desired_children(obj, upgraded)["prefetch"]
    assert new["metadata"]["name"] == old_running["metadata"]["name"]  # same download, same name
    key = render.SPEC_HASH_ANNOTATION
    assert new["metadata"]["annotations"][key] != old_running["metadata"]["annotations"][key]
    for job, reason in ((old_running, "Downloading"), (job_done(obj), "Downloaded")):
        r = run_upgraded({"prefetch": job})
        assert "Job" not in kinds(r) and r.to_delete == []
        assert conds(r)["ModelCached"]["reason"] == reason
    r = run_upgraded({"prefetch": old_failed})  # failed with the old image: try again with the new one
    assert "Job" not in kinds(r) and r.to_delete == [old_failed]
    c = conds(r)["ModelCached"]
    assert c["reason"] == "Downloading" and "again" in c["message"]
    assert "Job" in kinds(run_upgraded({}))  # the next pass, once it is gone
    deleting = copy.deepcopy(old_failed)
    deleting["metadata"]["deletionTimestamp"] = "2025-01-01T12:00:00Z"
    r = run_upgraded({"prefetch": deleting})  # still terminating: wait
    assert "Job" not in kinds(r) and r.to_delete == []
    r = run(obj, {"prefetch": old_failed})  # failed with the current settings: it would only fail again
    assert "Job" not in kinds(r) and r.to_delete == []
    assert conds(r)["ModelCached"]["reason"] == "DownloadFailed"


def test_cached_model_brings_up_the_fleet():
    obj = make_isvc(SPECS["keda"])
    r = run(obj, {"prefetch": job_done(obj)})
    assert kinds(r)[-2:] == ["Deployment", "ScaledObject"]
    c = conds(r)
    assert c["ModelCached"]["status"] == "True" and c["ModelCached"]["reason"] == "Downloaded"
    assert c["WorkloadReady"]["reason"] == "Creating"
    # pods still loading
    dep = dep_available(obj, available=0)
    c = conds(run(obj, {"prefetch": job_done(obj), "deployment": dep}))
    assert c["WorkloadReady"]["status"] == "False" and c["WorkloadReady"]["reason"] == "NoReplicasAvailable"
    # serving, KEDA ready
    so = live(obj, "autoscaler", {"conditions": [{"type": "Ready", "status": "True", "reason": "ScaledObjectReady",
                                                  "message": "ScaledObject is defined correctly"}]})
    r = run(obj, {"prefetch": job_done(obj), "deployment": dep_available(obj, 2, 2), "autoscaler": so})
    c = conds(r)
    assert (c["WorkloadReady"]["status"], c["WorkloadReady"]["message"]) == ("True", "2/2 replicas available")
    assert c["ScalingReady"]["status"] == "True"
    assert c["Ready"]["status"] == "True" and c["Ready"]["reason"] == "Ready"
    assert r.status["replicas"] == 2 and r.status["readyReplicas"] == 2


def test_keda_not_ready():
    obj = make_isvc(SPECS["keda"])
    so = live(obj, "autoscaler", {"conditions": [{"type": "Ready", "status": "False", "reason": "ScaledObjectCheckFailed",
                                                  "message": "Target resource doesn't exist"}]})
    c = conds(run(obj, {"prefetch": job_done(obj), "deployment": dep_available(obj), "autoscaler": so}))
    assert c["ScalingReady"]["status"] == "False" and c["ScalingReady"]["reason"] == "ScaledObjectCheckFailed"
    assert c["Ready"]["status"] == "False" and "ScalingReady" in c["Ready"]["message"]
    so["status"] = {}
    assert conds(run(obj, {"prefetch": job_done(obj), "deployment": dep_available(obj), "autoscaler": so}))[
        "ScalingReady"]["status"] == "Unknown"


def test_hpa_conditions():
    obj = make_isvc(SPECS["hpa"])
    base = {"prefetch": job_done(obj), "deployment": dep_available(obj)}
    ok = live(obj, "autoscaler", {"conditions": [
        {"type": "AbleToScale", "status": "True", "reason": "ReadyForNewScale"},
        {"type": "ScalingActive", "status": "True", "reason": "ValidMetricFound", "message": "the HPA was able to compute"}]})
    assert conds(run(obj, {**base, "autoscaler": ok}))["ScalingReady"]["reason"] == "HPAActive"
    broken = copy.deepcopy(ok)
    broken["status"]["conditions"][1] = {"type": "ScalingActive", "status": "False", "reason": "FailedGetPodsMetric",
                                         "message": "unable to get metric vllm_num_requests_waiting"}
    c = conds(run(obj, {**base, "autoscaler": broken}))["ScalingReady"]
    assert (c["status"], c["reason"]) == ("False", "FailedGetPodsMetric")


def test_no_autoscaler_and_pvc_model_start_at_once():
    obj = make_isvc(SPECS["pvc-model"])
    r = run(obj)
    assert "Deployment" in kinds(r) and "Job" not in kinds(r)
    c = conds(r)
    assert (c["ModelCached"]["status"], c["ModelCached"]["reason"]) == ("True", "ModelOnVolume")
    assert (c["ScalingReady"]["status"], c["ScalingReady"]["reason"]) == ("True", "NoAutoscaler")
    assert conds(run(obj, {"deployment": dep_available(obj)}))["Ready"]["status"] == "True"
    for name, reason in (("no-cache-gated", "CacheDisabled"), ("s3-prefetch-off", "PrefetchDisabled")):
        c = conds(run(make_isvc(SPECS[name])))["ModelCached"]
        assert (c["status"], c["reason"]) == ("True", reason)


def test_scaled_to_zero_is_ready():
    obj = make_isvc(SPECS["s3-prefetch-off"])  # minReplicas 0, no autoscaler
    dep = live(obj, "deployment", {"observedGeneration": 1})
    c = conds(run(obj, {"deployment": dep}))
    assert (c["WorkloadReady"]["status"], c["WorkloadReady"]["reason"]) == ("True", "ScaledToZero")


def test_rollout_states():
    obj = make_isvc(SPECS["pvc-model"])
    stale_gen = dep_available(obj)
    stale_gen["metadata"]["generation"] = 2
    assert conds(run(obj, {"deployment": stale_gen}))["WorkloadReady"]["reason"] == "Progressing"
    stuck = dep_available(obj, available=0)
    stuck["status"]["conditions"] = [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                                      "message": "ReplicaSet has timed out progressing."}]
    assert conds(run(obj, {"deployment": stuck}))["WorkloadReady"]["reason"] == "ProgressDeadlineExceeded"
    # a spec edit: the live pods run the old template until the new one is applied
    edited = make_isvc({**SPECS["pvc-model"], "runtime": {"maxNumSeqs": 16}}, generation=2)
    c = conds(run(edited, {"deployment": dep_available(obj)}))
    assert (c["WorkloadReady"]["status"], c["WorkloadReady"]["reason"]) == ("False", "Updating")


def test_model_switch_keeps_the_old_fleet_until_cached():
    old = make_isvc(SPECS["keda"])
    new = make_isvc({**SPECS["keda"], "model": {"uri": "hf://HuggingFaceTB/SmolLM2-360M-Instruct"}}, generation=2)
    observed = {"prefetch": job_done(old), "deployment": dep_available(old), "autoscaler": live(old, "autoscaler")}
    r = run(new, observed)
    # the old Job has another name: it is not the new model's download
    assert rec.desired_children(new, SETTINGS)["prefetch"]["metadata"]["name"] != observed["prefetch"]["metadata"]["name"]
    assert "Deployment" not in kinds(r) and "ScaledObject" not in kinds(r)
    assert "Job" in kinds(r)
    c = conds(r)
    assert c["ModelCached"]["reason"] == "Downloading"
    assert c["WorkloadReady"]["reason"] == "WaitingForModel" and "1 replicas available" in c["WorkloadReady"]["message"]
    assert r.status["replicas"] == 1  # the old fleet still serves
    # once the new model is cached, the Deployment is applied with the new template
    r = run(new, {**observed, "prefetch": job_done(new)})
    assert "Deployment" in kinds(r)
    dep = next(m for m in r.manifests_to_apply if m["kind"] == "Deployment")
    assert "SmolLM2-360M" in dep["spec"]["template"]["spec"]["containers"][0]["args"][1]


def test_last_transition_time_moves_only_on_status_change():
    obj = make_isvc(SPECS["pvc-model"])
    first = run(obj, {}, now=T0)
    obj["status"] = first.status
    # same conditions later: times kept
    again = run(obj, {}, now=T1)
    assert conds(again)["WorkloadReady"]["lastTransitionTime"] == "2025-01-01T12:00:00Z"
    # WorkloadReady and Ready flip at T1; ModelCached stays
    obj["status"] = again.status
    flipped = conds(run(obj, {"deployment": dep_available(obj)}, now=T1))
    assert flipped["WorkloadReady"]["lastTransitionTime"] == "2025-01-01T12:05:00Z"
    assert flipped["Ready"]["lastTransitionTime"] == "2025-01-01T12:05:00Z"
    assert flipped["ModelCached"]["lastTransitionTime"] == "2025-01-01T12:00:00Z"
    # a reason change without a status change keeps the time too
    obj["status"] = first.status
    other_reason = conds(run(obj, {"deployment": {**dep_available(obj, 0)}}, now=T1))["WorkloadReady"]
    assert other_reason["reason"] == "NoReplicasAvailable"
    assert other_reason["lastTransitionTime"] == "2025-01-01T12:00:00Z"


def test_naive_now_is_utc():
    r = rec.reconcile(make_isvc(), {}, SETTINGS, now=datetime(2025, 1, 1, 12, 0, 0))
    assert r.status["conditions"][0]["lastTransitionTime"] == "2025-01-01T12:00:00Z"


def test_invalid_spec():
    obj = make_isvc({"model": {"uri": "ftp://nope"}})
    r = run(obj)
    assert r.manifests_to_apply == [] and r.children == {}
    (c,) = r.status["conditions"]
    assert (c["type"], c["status"], c["reason"]) == ("Ready", "False", "InvalidSpec")
    assert "model.uri" in c["message"]


def test_status_from_another_operator_version_is_not_an_invalid_spec():
    """A status field this version does not know (written by a newer operator, the CRD
    upgraded first) leaves the spec valid: status is output, not input."""
    obj = make_isvc({"model": {"uri": "pvc://models/smol"}, "resources": {"gpus": 0}})
    obj["status"] = {"conditions": [{"type": "Ready", "status": "True", "reason": "Ready", "message": "",
                                     "lastTransitionTime": "2025-01-01T00:00:00Z", "severity": "Info"}],
                     "fromTheFuture": {"x": 1}}
    r = run(obj)
    assert r.manifests_to_apply and conds(r)["Ready"]["reason"] != "InvalidSpec"


def test_status_fits_the_crd(schema):
    status_schema = schema["properties"]["status"]
    obj = make_isvc(SPECS["keda"])
    for observed in ({}, {"prefetch": job_done(obj), "deployment": dep_available(obj)}):
        status = run(obj, observed).status
        assert crdcheck.schema_errors(status_schema, status) == []
        assert crdcheck.unknown_fields(status_schema, status) == []
    assert crdcheck.schema_errors(status_schema, run(make_isvc({"model": {}})).status) == []


def test_orphans():
    obj = make_isvc(SPECS["hpa"])
    uid = obj["metadata"]["uid"]
    keda = make_isvc(SPECS["keda"])
    old_so = live(keda, "autoscaler")
    old_job = live(make_isvc({"model": {"uri": "hf://a/b"}}), "prefetch")
    current = [live(obj, role) for role in ("cache", "prefetch", "service", "deployment", "autoscaler")]
    keda_hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
                "metadata": {"name": "keda-hpa-llm", "ownerReferences": [
                    {"kind": "ScaledObject", "name": "llm", "uid": "so-uid", "controller": True}]}}
    foreign = copy.deepcopy(old_job)
    foreign["metadata"]["ownerReferences"][0]["uid"] = "someone-else"
    out = rec.orphans(obj, current + [old_so, old_job, keda_hpa, foreign], SETTINGS)
    assert [(m["kind"], m["metadata"]["name"]) for m in out] == [
        ("ScaledObject", "llm"), ("Job", old_job["metadata"]["name"])]
    assert all(m["metadata"]["ownerReferences"][0]["uid"] == uid for m in out)
    assert rec.orphans(make_isvc({"model": {}}), [old_so], SETTINGS) == []


def test_manifests_are_in_apply_order():
    obj = make_isvc(SPECS["keda"])
    r = run(obj, {"prefetch": job_done(obj)})
    roles = [next(role for role, m in r.children.items() if m is applied) for applied in r.manifests_to_apply]
    assert roles == [role for role in render.ROLES if role in roles]


# ------------------------------------------------------------------------ quotas and the builtin autoscaler
def test_quota_cap_lowers_the_autoscaler_and_says_quota_limited():
    from argosy.operator import quota

    obj = make_isvc(SPECS["keda"])
    max_r = SPECS["keda"]["scaling"]["maxReplicas"]
    cap = quota.Cap(2, True, ("team-a",), f"maxReplicas capped from {max_r} to 2 by GPUQuota team-a")
    so = live(obj, "autoscaler", {"conditions": [{"type": "Ready", "status": "True", "reason": "ScaledObjectReady",
                                                   "message": "ok"}]})
    r = rec.reconcile(obj, {"prefetch": job_done(obj), "deployment": dep_available(obj), "autoscaler": so},
                      SETTINGS, now=T0, cap=cap)
    (scaler,) = [m for m in r.manifests_to_apply if m["kind"] == "ScaledObject"]
    assert scaler["spec"]["maxReplicaCount"] == 2
    c = conds(r)["ScalingReady"]
    assert (c["status"], c["reason"]) == ("True", "QuotaLimited") and "GPUQuota team-a" in c["message"]
    assert conds(r)["Ready"]["status"] == "True"
    # the pod template does not change with the cap: no rollout
    plain = run(obj, {"prefetch": job_done(obj), "deployment": dep_available(obj), "autoscaler": so})
    dep = lambda res: [m for m in res.manifests_to_apply if m["kind"] == "Deployment"][0]  # noqa: E731
    assert dep(plain) == dep(r)
    # a cap at or above maxReplicas changes nothing
    same = rec.reconcile(obj, {"prefetch": job_done(obj), "deployment": dep_available(obj), "autoscaler": so},
                         SETTINGS, now=T0, cap=quota.Cap(max_r))
    assert conds(same)["ScalingReady"]["reason"] == "ScaledObjectReady"


def test_quota_exceeded_from_the_deployment():
    obj = make_isvc(SPECS["keda"])
    dep = dep_available(obj, available=0, replicas=2)
    dep["status"]["conditions"] = [{
        "type": "ReplicaFailure", "status": "True", "reason": "FailedCreate",
        "message": 'pods "llm-5d9c-x" is forbidden: exceeded quota: argosy-gpu-team-a, requested: '
                   "requests.nvidia.com/gpu=1, used: requests.nvidia.com/gpu=8, limited: requests.nvidia.com/gpu=8"}]
    c = conds(run(obj, {"prefetch": job_done(obj), "deployment": dep}))
    assert (c["WorkloadReady"]["status"], c["WorkloadReady"]["reason"]) == ("False", "QuotaExceeded")
    assert "exceeded quota" in c["WorkloadReady"]["message"] and c["Ready"]["reason"] == "QuotaExceeded"
    dep["status"]["availableReplicas"] = 1
    c = conds(run(obj, {"prefetch": job_done(obj), "deployment": dep}))
    assert (c["WorkloadReady"]["status"], c["WorkloadReady"]["reason"]) == ("True", "QuotaExceeded")


def test_builtin_autoscaler_renders_no_scaler_and_leaves_replicas_to_the_operator():
    spec = copy.deepcopy(SPECS["keda"])
    spec["scaling"]["autoscaler"] = "builtin"
    spec["scaling"].pop("idleReplicaCount", None)
    obj = make_isvc(spec)
    r = run(obj, {"prefetch": job_done(obj), "deployment": dep_available(obj)})
    assert "autoscaler" not in r.children
    (dep,) = [m for m in r.manifests_to_apply if m["kind"] == "Deployment"]
    assert "replicas" not in dep["spec"]
    c = conds(r)["ScalingReady"]
    assert (c["status"], c["reason"]) == ("True", "BuiltinAutoscaler")
