"""The operator against a real Kubernetes cluster (skipped unless ``KUBECONFIG`` is set).

The same scenario as the in-process tests against the API stand-in, with the real API
server's validation (CRD schema and CEL rules), ownerReferences and garbage collector:

1. the minimal example gets its model-cache PVC and prefetch Job, owned by the
   InferenceService, and no Deployment while the model is not cached;
2. a ``pvc://`` model (nothing to download) gets its Deployment, Service and
   PodDisruptionBudget at once; a spec edit rolls the Deployment; deleting the
   InferenceService garbage-collects every child;
3. the API server rejects an object that breaks a CEL rule.

No GPU and no runtime image are needed: the tests wait for objects, not for running
server pods (``kubectl wait --for=condition=Ready`` needs both; see e2e/README.md).
"""

from __future__ import annotations

import copy

import pytest
import yaml

from .conftest import EXAMPLES, GROUP, PLURAL, VERSION, Kube, wait_for

pytestmark = pytest.mark.timeout(600)

ISVC_LABEL = "serving.argosy.dev/inferenceservice"
SPEC_HASH = "serving.argosy.dev/spec-hash"


def create(kube: Kube, namespace: str, obj: dict) -> dict:
    """Create an InferenceService in ``namespace`` and return it as stored."""
    obj = copy.deepcopy(obj)
    obj["metadata"]["namespace"] = namespace
    return kube.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, obj)


def read(kube: Kube, namespace: str, name: str) -> dict:
    return kube.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def condition(obj: dict, type_: str) -> dict | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return c
    return None


def owned_by(meta, owner: dict) -> bool:
    """Whether a child's metadata (client model) has ``owner`` as its controller."""
    refs = meta.owner_references or []
    return any(r.uid == owner["metadata"]["uid"] and r.kind == "InferenceService" and r.controller
               and r.block_owner_deletion for r in refs)


def gone(read_fn, *args) -> bool:
    """Whether ``read_fn(*args)`` answers 404."""
    from kubernetes.client.rest import ApiException

    try:
        read_fn(*args)
    except ApiException as e:
        if e.status == 404:
            return True
        raise
    return False


def children_by_label(kube: Kube, namespace: str, name: str) -> dict[str, list]:
    selector = f"{ISVC_LABEL}={name}"
    return {
        "pvc": kube.core.list_namespaced_persistent_volume_claim(namespace, label_selector=selector).items,
        "job": kube.batch.list_namespaced_job(namespace, label_selector=selector).items,
        "deployment": kube.apps.list_namespaced_deployment(namespace, label_selector=selector).items,
        "service": kube.core.list_namespaced_service(namespace, label_selector=selector).items,
        "pdb": kube.policy.list_namespaced_pod_disruption_budget(namespace, label_selector=selector).items,
    }


def test_minimal_example_caches_before_serving(kube, namespace, operator):
    example = yaml.safe_load((EXAMPLES / "inferenceservice-minimal.yaml").read_text())
    isvc = create(kube, namespace, example)
    name = isvc["metadata"]["name"]

    pvc = wait_for(lambda: kube.core.read_namespaced_persistent_volume_claim(f"{name}-model-cache", namespace),
                   90, "the model-cache PVC")
    assert owned_by(pvc.metadata, isvc)
    assert pvc.spec.access_modes == ["ReadWriteMany"]

    jobs = wait_for(lambda: kube.batch.list_namespaced_job(
        namespace, label_selector=f"{ISVC_LABEL}={name},app.kubernetes.io/component=prefetch").items,
        90, "the prefetch Job")
    (job,) = jobs
    assert job.metadata.name.startswith(f"{name}-prefetch-")
    assert owned_by(job.metadata, isvc)
    container = job.spec.template.spec.containers[0]
    assert container.command == ["argosy"] and container.args[:2] == ["download", example["spec"]["model"]["uri"]]

    def status_reported():
        obj = read(kube, namespace, name)
        status = obj.get("status") or {}
        return obj if status.get("observedGeneration") == obj["metadata"]["generation"] and condition(
            obj, "ModelCached") else None

    obj = wait_for(status_reported, 90, "status with observedGeneration and ModelCached")
    cached = condition(obj, "ModelCached")
    if cached["status"] != "True":
        # the model is not cached (no network, no runtime image, or a Pending RWX claim): no server pods yet
        assert cached["reason"] in {"Downloading", "DownloadFailed"}
        assert condition(obj, "Ready")["status"] == "False"
        assert not kube.apps.list_namespaced_deployment(namespace, label_selector=f"{ISVC_LABEL}={name}").items
    assert obj["status"]["url"] == f"http://{name}.{namespace}.svc.cluster.local:8000/v1"

    kube.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    wait_for(lambda: gone(kube.batch.read_namespaced_job, job.metadata.name, namespace), 180,
             "the garbage collector to delete the prefetch Job")
    # a PVC goes once no pod uses it (kubernetes.io/pvc-protection): mark for deletion is enough
    wait_for(lambda: gone(kube.core.read_namespaced_persistent_volume_claim, pvc.metadata.name, namespace)
             or kube.core.read_namespaced_persistent_volume_claim(pvc.metadata.name, namespace).metadata.deletion_timestamp,
             180, "the garbage collector to delete the model-cache PVC")


PVC_MODEL = {
    "apiVersion": f"{GROUP}/{VERSION}",
    "kind": "InferenceService",
    "metadata": {"name": "on-volume"},
    "spec": {
        "model": {"uri": "pvc://e2e-models/smollm2", "servedName": "smol"},
        "resources": {"gpus": 0, "cpu": "100m", "memory": "512Mi"},
        "runtime": {"maxModelLen": 2048},
    },
}


def test_pvc_model_serves_rolls_and_is_garbage_collected(kube, namespace, operator):
    isvc = create(kube, namespace, PVC_MODEL)
    name = isvc["metadata"]["name"]

    dep = wait_for(lambda: kube.apps.read_namespaced_deployment(name, namespace), 90, "the Deployment")
    svc = wait_for(lambda: kube.core.read_namespaced_service(name, namespace), 90, "the Service")
    pdb = wait_for(lambda: kube.policy.read_namespaced_pod_disruption_budget(name, namespace), 90, "the PDB")
    for child in (dep, svc, pdb):
        assert owned_by(child.metadata, isvc), child.metadata.name
        assert child.metadata.labels["app.kubernetes.io/managed-by"] == "argosy-operator"
    pod = dep.spec.template.spec
    assert pod.containers[0].args[:2] == ["serve", "/models/smollm2"]
    assert pod.volumes[0].persistent_volume_claim.claim_name == "e2e-models"
    assert pod.security_context.run_as_non_root and pod.security_context.run_as_user == 1000
    assert svc.spec.selector == dep.spec.selector.match_labels
    assert dep.spec.replicas == 1  # no autoscaler: the operator owns replicas
    assert not children_by_label(kube, namespace, name)["job"], "a pvc:// model needs no prefetch Job"

    obj = wait_for(lambda: (o := read(kube, namespace, name)) and condition(o, "WorkloadReady") and o,
                   90, "WorkloadReady")
    assert condition(obj, "ModelCached")["status"] == "True"
    assert condition(obj, "ModelCached")["reason"] == "ModelOnVolume"

    # a spec edit rolls the Deployment (new pod-template hash); the status follows the new generation
    old_hash = dep.spec.template.metadata.annotations[SPEC_HASH]
    kube.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                               {"spec": {"runtime": {"maxModelLen": 4096}}},
                                               _content_type="application/merge-patch+json")

    def rolled():
        d = kube.apps.read_namespaced_deployment(name, namespace)
        return d if d.spec.template.metadata.annotations[SPEC_HASH] != old_hash else None

    dep2 = wait_for(rolled, 90, "the Deployment to get the new pod template")
    assert "4096" in dep2.spec.template.spec.containers[0].args
    wait_for(lambda: (o := read(kube, namespace, name))["status"].get("observedGeneration") == o["metadata"][
        "generation"] == 2, 90, "status.observedGeneration 2")

    kube.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    wait_for(lambda: gone(kube.apps.read_namespaced_deployment, name, namespace), 180, "GC of the Deployment")
    wait_for(lambda: gone(kube.core.read_namespaced_service, name, namespace), 180, "GC of the Service")
    wait_for(lambda: gone(kube.policy.read_namespaced_pod_disruption_budget, name, namespace), 180, "GC of the PDB")


def test_api_server_enforces_the_cel_rules(kube, namespace):
    from kubernetes.client.rest import ApiException

    bad = copy.deepcopy(PVC_MODEL)
    bad["metadata"]["name"] = "bad-scaling"
    bad["spec"]["scaling"] = {"autoscaler": "keda", "minReplicas": 3, "maxReplicas": 2}
    with pytest.raises(ApiException) as err:
        create(kube, namespace, bad)
    assert err.value.status == 422
    assert "minReplicas must not exceed maxReplicas" in err.value.body
    # and a good object passes the same validation
    good = copy.deepcopy(bad)
    good["spec"]["scaling"]["maxReplicas"] = 3
    created = create(kube, namespace, good)
    assert created["spec"]["scaling"]["maxReplicas"] == 3
    kube.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "bad-scaling")
