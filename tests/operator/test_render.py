"""Renderers: every manifest valid for Kubernetes, and the fields that matter asserted."""

from __future__ import annotations

import re

import kubernetes_validate
import pytest

from argosy.operator import api, render
from argosy.operator.render import common
from argosy.operator.settings import OperatorSettings

from .conftest import EXAMPLE_FILES, load_example, make_isvc
from .specs import SPECS

K8S_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
SETTINGS = OperatorSettings()

CASES = {name: make_isvc(spec) for name, spec in SPECS.items()}
CASES.update({p.name: load_example(p) for p in EXAMPLE_FILES})
#: Kinds kubernetes-validate has no schema for (CRDs of KEDA and the Prometheus Operator).
NOT_BUILT_IN = {"ScaledObject", "ServiceMonitor"}


def children(obj: dict, settings: OperatorSettings = SETTINGS) -> dict[str, dict]:
    return render.render_children(api.parse(obj), settings)


def server(obj: dict) -> dict:
    return children(obj)["deployment"]["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("name", sorted(CASES))
def test_manifests_validate(name):
    for m in children(CASES[name]).values():
        if m["kind"] in NOT_BUILT_IN:
            continue
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(m, version, strict=True)


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_child_is_owned_and_labelled(name):
    obj = CASES[name]
    for m in children(obj).values():
        meta = m["metadata"]
        assert meta["namespace"] == obj["metadata"]["namespace"]
        assert len(meta["name"]) <= 63
        (ref,) = meta["ownerReferences"]
        assert ref == {"apiVersion": api.API_VERSION, "kind": api.KIND, "name": obj["metadata"]["name"],
                       "uid": obj["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}
        labels = meta["labels"]
        assert labels["app.kubernetes.io/name"] == "argosy"
        assert labels["app.kubernetes.io/instance"] == obj["metadata"]["name"]
        assert labels["app.kubernetes.io/managed-by"] == "argosy-operator"
        assert labels["app.kubernetes.io/part-of"] == "argosy"
        assert labels["app.kubernetes.io/component"]
        if obj["spec"].get("tenant"):
            assert labels["serving.argosy.dev/tenant"] == obj["spec"]["tenant"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_selectors_match_pod_labels(name):
    obj = CASES[name]
    kids = children(obj)
    dep = kids["deployment"]
    selector = dep["spec"]["selector"]["matchLabels"]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items()
    assert kids["service"]["spec"]["selector"] == selector
    assert kids["pdb"]["spec"]["selector"]["matchLabels"] == selector
    assert kids["monitor"]["spec"]["selector"]["matchLabels"].items() <= kids["service"]["metadata"]["labels"].items()
    as_string = dict(kv.split("=") for kv in render.selector_string(api.parse(obj)).split(","))
    assert as_string == selector
    # prefetch pods must not be picked up by the Service
    if "prefetch" in kids:
        job_pod_labels = kids["prefetch"]["spec"]["template"]["metadata"]["labels"]
        assert not selector.items() <= job_pod_labels.items()


@pytest.mark.parametrize("name", sorted(CASES))
def test_pods_are_restricted(name):
    kids = children(CASES[name])
    pods = [kids["deployment"]["spec"]["template"]["spec"]]
    if "prefetch" in kids:
        pods.append(kids["prefetch"]["spec"]["template"]["spec"])
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        assert "hostNetwork" not in pod and "hostPID" not in pod
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert not sc.get("privileged")


@pytest.mark.parametrize("name", sorted(CASES))
def test_server_container(name):
    obj = CASES[name]
    isvc = api.parse(obj)
    dep = children(obj)["deployment"]
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["command"] == ["argosy"] and c["args"][0] == "serve"
    assert c["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    args = c["args"]
    assert args[args.index("--port") + 1] == "8000" and args[args.index("--host") + 1] == "0.0.0.0"
    assert args[args.index("--tensor-parallel-size") + 1] == str(isvc.spec.parallelism.tensor)
    shutdown = int(args[args.index("--shutdown-timeout") + 1])
    assert shutdown == isvc.spec.runtime.shutdown_timeout_seconds
    # probes on /health through the named port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= SETTINGS.startup_timeout
    # drain: preStop sleep, then the server's own drain, within the grace period
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop + shutdown
    # GPUs: requests = limits = spec.resources.gpus
    gpus, gpu_name = isvc.spec.resources.gpus, isvc.spec.resources.gpu_resource_name
    if gpus:
        assert c["resources"]["limits"][gpu_name] == c["resources"]["requests"][gpu_name] == gpus
    else:
        assert gpu_name not in c["resources"].get("limits", {})
    # the cache is mounted read-only
    for m in c.get("volumeMounts", []):
        if m["mountPath"] == common.MODEL_MOUNT:
            assert m["readOnly"] is True
            vol = next(v for v in pod["volumes"] if v["name"] == m["name"])
            assert vol["persistentVolumeClaim"]["readOnly"] is True
    assert c["args"][c["args"].index("--served-model-name") + 1]
    # the compile caches sit in a pod-lifetime emptyDir, and no variable is set twice
    names = [e["name"] for e in c["env"]]
    assert len(names) == len(set(names))
    assert {"name": "compile-cache", "mountPath": common.COMPILE_CACHE_MOUNT} in c["volumeMounts"]
    assert {"name": "compile-cache", "emptyDir": {}} in pod["volumes"]


def test_compile_cache_survives_container_restarts_and_user_env_wins():
    c = server(_spec_isvc())
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["ARGOSY_CACHE_DIR"] == "/var/cache/argosy/argosy"
    assert env["TRITON_CACHE_DIR"] == "/var/cache/argosy/triton"
    # a user's own cache location replaces ours instead of appearing twice
    c = server(_spec_isvc(runtime={"env": [{"name": "ARGOSY_CACHE_DIR", "value": "/models/.argosy"}]}))
    assert [e for e in c["env"] if e["name"] == "ARGOSY_CACHE_DIR"] == [
        {"name": "ARGOSY_CACHE_DIR", "value": "/models/.argosy"}]
    assert {"name": "TRITON_CACHE_DIR", "value": "/var/cache/argosy/triton"} in c["env"]
    # so does one the operator sets for hub downloads (HF_HOME of a pod without a cache claim)
    spec = {"model": {"uri": "hf://HuggingFaceTB/SmolLM2-135M-Instruct"}, "cache": {"enabled": False},
            "runtime": {"env": [{"name": "HF_HOME", "value": "/models/hf"}]}}
    c = server(make_isvc(spec))
    assert [e for e in c["env"] if e["name"] == "HF_HOME"] == [{"name": "HF_HOME", "value": "/models/hf"}]


@pytest.mark.parametrize("name", sorted(CASES))
def test_replicas_left_to_the_autoscaler(name):
    obj = CASES[name]
    isvc = api.parse(obj)
    kids = children(obj)
    if isvc.spec.scaling.autoscaler == "none":
        assert kids["deployment"]["spec"]["replicas"] == isvc.spec.scaling.min_replicas
        assert "autoscaler" not in kids
    else:
        assert "replicas" not in kids["deployment"]["spec"]
        target = kids["autoscaler"]["spec"]["scaleTargetRef"]
        assert target == {"apiVersion": "apps/v1", "kind": "Deployment", "name": kids["deployment"]["metadata"]["name"]}


_MATCHERS = re.compile(r"^sum\((vllm:[a-z_]+)\{([^}]*)\}\)$")


def test_keda_scaled_object():
    obj = make_isvc(SPECS["keda"], name="chat", namespace="team-a")
    so = children(obj)["autoscaler"]
    assert so["apiVersion"] == "keda.sh/v1alpha1" and so["kind"] == "ScaledObject"
    spec = so["spec"]
    assert (spec["minReplicaCount"], spec["maxReplicaCount"], spec["cooldownPeriod"]) == (1, 4, 120)
    assert "idleReplicaCount" not in spec
    triggers = {t["name"]: t for t in spec["triggers"]}
    assert set(triggers) == {"waiting-requests", "kv-cache-usage"}
    metrics = {}
    for t in triggers.values():
        assert t["type"] == "prometheus" and t["metricType"] == "AverageValue"
        meta = t["metadata"]
        assert meta["serverAddress"] == SETTINGS.prometheus_server_address
        assert all(isinstance(v, str) for v in meta.values())  # KEDA metadata is string-valued
        metric, matchers = _MATCHERS.match(meta["query"]).groups()
        # exactly this namespace and this Service: no other InferenceService's pods
        assert sorted(matchers.split(",")) == ['namespace="team-a"', 'service="chat"']
        metrics[metric] = meta["threshold"]
    assert metrics == {"vllm:num_requests_waiting": "3", "vllm:kv_cache_usage_perc": "0.75"}


def test_keda_scale_to_zero():
    spec = children(make_isvc(SPECS["scale-to-zero"]))["autoscaler"]["spec"]
    assert spec["idleReplicaCount"] == 0 and spec["minReplicaCount"] == 1
    assert {t["metadata"]["serverAddress"] for t in spec["triggers"]} == {"http://prom.monitoring:9090"}


def test_hpa():
    hpa = children(make_isvc(SPECS["hpa"]))["autoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    spec = hpa["spec"]
    assert (spec["minReplicas"], spec["maxReplicas"]) == (2, 6)
    # kvCacheUsage 0 turns that target off
    assert spec["metrics"] == [{"type": "Pods", "pods": {"metric": {"name": "vllm_num_requests_waiting"},
                                                         "target": {"type": "AverageValue", "averageValue": "5"}}}]
    both = children(make_isvc({**SPECS["hpa"], "scaling": {**SPECS["hpa"]["scaling"], "targets": {}}}))
    values = [m["pods"]["target"]["averageValue"] for m in both["autoscaler"]["spec"]["metrics"]]
    assert values == ["5", "800m"]


def test_minimal_children():
    kids = children(make_isvc(SPECS["minimal"], name="smol"))
    assert list(kids) == ["cache", "prefetch", "service", "monitor", "pdb", "deployment"]
    pvc = kids["cache"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "50Gi"
    assert "storageClassName" not in pvc["spec"]
    job = kids["prefetch"]
    jc = job["spec"]["template"]["spec"]["containers"][0]
    target = "/models/hf/HuggingFaceTB/SmolLM2-135M-Instruct/main"
    assert jc["args"] == ["download", "hf://HuggingFaceTB/SmolLM2-135M-Instruct", target]
    assert {"name": "model-cache", "mountPath": "/models"} in jc["volumeMounts"]  # writable for the Job
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    c = kids["deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert c["args"][1] == target
    assert c["args"][c["args"].index("--served-model-name") + 1] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert kids["deployment"]["spec"]["template"]["spec"]["volumes"] == [
        {"name": "model", "persistentVolumeClaim": {"claimName": "smol-model-cache", "readOnly": True}},
        {"name": "compile-cache", "emptyDir": {}}]
    svc = kids["service"]
    assert svc["spec"]["ports"][0]["port"] == 8000 and svc["spec"]["type"] == "ClusterIP"
    assert kids["pdb"]["spec"]["maxUnavailable"] == 1
    assert "nodeSelector" not in kids["deployment"]["spec"]["template"]["spec"]


def test_keda_rwx_example():
    obj = load_example(next(p for p in EXAMPLE_FILES if p.name == "inferenceservice-keda-rwx.yaml"))
    kids = children(obj)
    assert kids["cache"]["spec"]["storageClassName"] == "nfs-rwx"
    job_env = kids["prefetch"]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "HF_TOKEN"}}} in job_env
    assert kids["prefetch"]["spec"]["template"]["spec"]["containers"][0]["args"][-2:] == ["--revision", "main"]
    c = server(obj)
    assert "HF_TOKEN" not in {e["name"] for e in c.get("env", [])}  # the server reads the cache, not the hub
    args = c["args"]
    for flag, value in (("--max-model-len", "8192"), ("--gpu-memory-utilization", "0.9"), ("--max-num-seqs", "128"),
                        ("--dtype", "bfloat16"), ("--served-model-name", "llama-3.1-8b-instruct")):
        assert args[args.index(flag) + 1] == value
    assert "--enable-prefix-caching" in args
    assert c["resources"] == {"requests": {"cpu": "4", "memory": "32Gi", "nvidia.com/gpu": 1},
                              "limits": {"memory": "32Gi", "nvidia.com/gpu": 1}}
    pod = kids["deployment"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L4"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def test_kv_cache_dtype_becomes_the_flag():
    """``runtime.kvCacheDtype`` is passed as ``--kv-cache-dtype`` (vLLM's name); unset, no flag."""
    args = server(_spec_isvc(runtime={"kvCacheDtype": "fp8"}, resources={"gpus": 0}))["args"]
    assert args[args.index("--kv-cache-dtype") + 1] == "fp8"
    args = server(_spec_isvc(runtime={"kvCacheDtype": "fp8_e5m2"}))["args"]  # on GPUs too (the Triton kernels)
    assert args[args.index("--kv-cache-dtype") + 1] == "fp8_e5m2"
    assert "--kv-cache-dtype" not in server(_spec_isvc())["args"]


def test_quantization_becomes_the_flag():
    """``runtime.quantization`` (an enum of the methods the runtime reads) is passed as
    ``--quantization``; unset, no flag (the runtime detects the checkpoint's method)."""
    args = server(_spec_isvc(runtime={"quantization": "awq"}))["args"]
    assert args[args.index("--quantization") + 1] == "awq"
    args = server(_spec_isvc(runtime={"quantization": "fp8"}))["args"]  # online FP8 of a float checkpoint
    assert args[args.index("--quantization") + 1] == "fp8"
    assert "--quantization" not in server(_spec_isvc())["args"]


def _spec_isvc(**sections):
    spec = {"model": {"uri": "hf://HuggingFaceTB/SmolLM2-135M-Instruct"}}
    spec.update(sections)
    return make_isvc(spec)


def test_existing_claim():
    kids = children(make_isvc(SPECS["existing-claim"]))
    assert "cache" not in kids
    vols = kids["deployment"]["spec"]["template"]["spec"]["volumes"]
    assert vols[0]["persistentVolumeClaim"]["claimName"] == "shared-models"
    assert kids["prefetch"]["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] \
        == "shared-models"
    # a revision with slashes becomes one directory
    assert server(make_isvc(SPECS["existing-claim"]))["args"][1] == \
        "/models/hf/HuggingFaceTB/SmolLM2-135M-Instruct/refs--pr--1"


def test_tensor_parallel():
    obj = make_isvc(SPECS["tp2"])
    c = server(obj)
    pod = children(obj)["deployment"]["spec"]["template"]["spec"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2
    args = c["args"]
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
    assert "--no-enable-chunked-prefill" in args and "--no-enable-prefix-caching" in args
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}} in pod["volumes"]
    assert "dshm" not in str(children(make_isvc(SPECS["minimal"]))["deployment"])


def test_tensor_parallel_without_gpus_requests_one_gpu_per_rank():
    obj = make_isvc({"model": {"uri": "hf://HuggingFaceTB/SmolLM2-135M-Instruct"}, "parallelism": {"tensor": 4}})
    c = server(obj)
    pod = children(obj)["deployment"]["spec"]["template"]["spec"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"] == 4
    assert c["args"][c["args"].index("--tensor-parallel-size") + 1] == "4"
    # no size given: memory-backed, bounded by the pod's memory limit
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in pod["volumes"]
    assert api.parse(obj).spec.resources.gpus == 4


def test_scheduling():
    obj = make_isvc(SPECS["tolerations"])
    pod = children(obj)["deployment"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "gpu", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"][1] == {"key": "dedicated", "operator": "Equal", "value": "llm",
                                     "effect": "NoExecute", "tolerationSeconds": 60}
    assert pod["affinity"] == SPECS["tolerations"]["scheduling"]["affinity"]
    assert pod["priorityClassName"] == "inference"
    assert children(obj)["pdb"]["spec"]["maxUnavailable"] == "50%"
    # the download Job does not need GPU nodes
    assert "nodeSelector" not in children(obj)["prefetch"]["spec"]["template"]["spec"]


def test_pvc_model():
    kids = children(make_isvc(SPECS["pvc-model"]))
    assert "cache" not in kids and "prefetch" not in kids
    c = server(make_isvc(SPECS["pvc-model"]))
    assert c["args"][1] == "/models/llama/8b"
    vols = kids["deployment"]["spec"]["template"]["spec"]["volumes"]
    assert vols == [{"name": "model", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}},
                    {"name": "compile-cache", "emptyDir": {}}]


def test_cache_disabled_downloads_in_the_server():
    obj = make_isvc(SPECS["no-cache-gated"])
    kids = children(obj)
    assert "cache" not in kids and "prefetch" not in kids
    c = server(obj)
    assert c["args"][:2] == ["serve", "HuggingFaceTB/SmolLM2-135M-Instruct"]
    assert c["args"][c["args"].index("--revision") + 1] == "main"
    assert c["args"][-2:] == ["--max-waiting-requests", "100"]
    env = {e["name"]: e for e in c["env"]}
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    assert env["POD"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["HF_HOME"]["value"].startswith(common.SCRATCH_MOUNT)


def test_single_file_and_s3():
    gguf = make_isvc(SPECS["gguf-file"])
    job = children(gguf)["prefetch"]["spec"]["template"]["spec"]["containers"][0]
    assert job["args"][2] == "/models/hf/bartowski/SmolLM2-135M-Instruct-GGUF/main"
    assert server(gguf)["args"][1] == job["args"][2] + "/SmolLM2-135M-Instruct-Q4_K_M.gguf"
    s3 = make_isvc(SPECS["s3-prefetch-off"])
    kids = children(s3)
    assert "prefetch" not in kids and "cache" not in kids
    assert server(s3)["args"][1] == "/models/s3/models/llama-3-8b"
    assert kids["deployment"]["spec"]["replicas"] == 0


def test_spec_hash_rolls_on_spec_edits_only():
    def spec_hash(obj):
        return children(obj)["deployment"]["spec"]["template"]["metadata"]["annotations"][
            render.SPEC_HASH_ANNOTATION]

    base = make_isvc(SPECS["keda"])
    h = spec_hash(base)
    assert re.fullmatch(r"[0-9a-f]{16}", h)
    unrelated = make_isvc(SPECS["keda"], labels={"team": "x"}, annotations={"note": "y"}, generation=7)
    unrelated["status"] = {"replicas": 3}
    scaled = make_isvc({**SPECS["keda"], "scaling": {**SPECS["keda"]["scaling"], "maxReplicas": 9}})
    resized = make_isvc({**SPECS["keda"], "cache": {"size": "500Gi"}})
    for same in (unrelated, scaled, resized):
        assert spec_hash(same) == h
    edited = make_isvc({**SPECS["keda"], "runtime": {"maxNumSeqs": 64}})
    assert spec_hash(edited) != h
    assert spec_hash(make_isvc(SPECS["keda"])) == h  # deterministic
    other_image = children(base, OperatorSettings(runtime_image="example.com/argosy:2"))
    assert other_image["deployment"]["spec"]["template"]["metadata"]["annotations"][
        render.SPEC_HASH_ANNOTATION] != h


def test_prefetch_job_name_follows_the_model():
    name = children(make_isvc(SPECS["minimal"]))["prefetch"]["metadata"]["name"]
    assert re.fullmatch(r"llm-prefetch-[0-9a-f]{6}", name)
    assert children(make_isvc(SPECS["minimal"]))["prefetch"]["metadata"]["name"] == name
    pinned = make_isvc({"model": {"uri": SPECS["minimal"]["model"]["uri"], "revision": "v2"}})
    assert children(pinned)["prefetch"]["metadata"]["name"] != name
    tuned = make_isvc({**SPECS["minimal"], "runtime": {"maxNumSeqs": 8}})
    assert children(tuned)["prefetch"]["metadata"]["name"] == name


def test_longest_name_fits():
    obj = make_isvc(name="a" * api.MAX_NAME_LENGTH)
    for m in children(obj).values():
        assert len(m["metadata"]["name"]) <= 63


def test_no_service_monitor_when_disabled():
    kids = children(make_isvc(), OperatorSettings(service_monitor=False))
    assert "monitor" not in kids


def test_owner_reference_needs_uid():
    obj = make_isvc()
    del obj["metadata"]["uid"]
    with pytest.raises(ValueError, match="uid"):
        children(obj)


def test_settings_from_env():
    s = OperatorSettings.from_env({"ARGOSY_RUNTIME_IMAGE": "r:1", "ARGOSY_STARTUP_TIMEOUT": "60",
                                   "ARGOSY_SERVICE_MONITOR": "false"})
    assert (s.runtime_image, s.startup_timeout, s.service_monitor) == ("r:1", 60, False)
    with pytest.raises(ValueError):
        OperatorSettings.from_env({"ARGOSY_PRE_STOP_SLEEP": "soon"})


def test_router_children():
    """spec.router: the router's objects, its args, its RBAC (EndpointSlice reads only), a
    Service that selects router pods only, status.url at the router, and the KEDA trigger on
    its pending requests so a minReplicas 0 service activates again."""
    obj = CASES["router-from-zero"]
    kids = children(obj)
    dep, svc = kids["router-deployment"], kids["router-service"]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    args = c["args"]
    assert args[0] == "router" and args[args.index("--upstream-service") + 1] == "llm"
    assert args[args.index("--namespace") + 1] == "ml" and args[args.index("--routing") + 1] == "prefix"
    assert args[args.index("--pending-timeout") + 1] == "600"
    assert args[args.index("--max-inflight-per-upstream") + 1] == "8"
    # the tenants Secret, mounted read-only where --tenants reads it
    assert args[args.index("--tenants") + 1] == "/etc/argosy/tenants/tenants.json"
    assert {"name": "tenants", "secret": {"secretName": "llm-tenants", "items": [
        {"key": "tenants.json", "path": "tenants.json"}]}} in pod["volumes"]
    assert {"name": "tenants", "mountPath": "/etc/argosy/tenants", "readOnly": True} in c["volumeMounts"]
    # the tokenizer comes from the model cache, read-only, as the servers read the model
    server_args = kids["deployment"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--model") + 1] == server_args[1]
    assert {"name": "model", "mountPath": "/models", "readOnly": True} in c["volumeMounts"]
    assert not any("gpu" in k for k in c["resources"]["requests"])
    assert dep["spec"]["replicas"] == 2
    assert pod["securityContext"]["runAsNonRoot"] is True and c["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["serviceAccountName"] == kids["router-account"]["metadata"]["name"] == "llm-router"
    assert kids["router-binding"]["subjects"] == [{"kind": "ServiceAccount", "name": "llm-router", "namespace": "ml"}]
    assert kids["router-binding"]["roleRef"]["name"] == kids["router-role"]["metadata"]["name"]
    assert kids["router-role"]["rules"] == [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                                             "verbs": ["get", "list", "watch"]}]
    router_pods = dep["spec"]["template"]["metadata"]["labels"]
    server_pods = kids["deployment"]["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= router_pods.items()
    assert not svc["spec"]["selector"].items() <= server_pods.items()
    assert not kids["service"]["spec"]["selector"].items() <= router_pods.items()
    assert render.url(api.parse(obj), SETTINGS) == "http://llm-router.ml.svc.cluster.local:8080/v1"
    so = kids["autoscaler"]
    assert so["spec"]["minReplicaCount"] == 0
    trig = so["spec"]["triggers"][-1]
    assert trig["name"] == "router-pending"
    assert trig["metadata"]["query"] == 'sum(argosy_router_pending_requests{namespace="ml",service="llm-router"})'
    assert trig["metadata"]["activationThreshold"] == "0"
    assert kids["router-monitor"]["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    # without a cache claim the router downloads the model like the servers (prefix routing
    # only: least-load needs no tokenizer)
    nc = children(CASES["router-no-cache"])["router-deployment"]["spec"]["template"]["spec"]
    assert "--model" not in nc["containers"][0]["args"] and "volumes" not in nc


def test_no_router_by_default():
    kids = children(CASES["keda"])
    assert not any(role.startswith("router") for role in kids)
    assert all("argosy_router" not in t["metadata"]["query"] for t in kids["autoscaler"]["spec"]["triggers"])
    assert render.url(api.parse(CASES["keda"]), SETTINGS) == "http://llm.ml.svc.cluster.local:8000/v1"


def test_runtime_image_pull_secrets_setting():
    """A private runtime image: every pod the operator renders (server, prefetch Job,
    router) pulls with the Secrets of the setting; none without it; a bad name is refused."""
    settings = OperatorSettings(runtime_image_pull_secrets="regcred, mirror.example")
    obj = make_isvc({"model": {"uri": SPECS["minimal"]["model"]["uri"]}, "router": {"enabled": True}})
    kids = render.render_children(api.parse(obj), settings).values()
    specs = [k["spec"]["template"]["spec"] for k in kids if k["kind"] in ("Deployment", "Job")]
    assert sorted(k["kind"] for k in kids if k["kind"] in ("Deployment", "Job")) == ["Deployment", "Deployment", "Job"]
    for pod in specs:
        assert pod["imagePullSecrets"] == [{"name": "regcred"}, {"name": "mirror.example"}]
    plain = [k["spec"]["template"]["spec"] for k in render.render_children(api.parse(obj), SETTINGS).values()
             if k["kind"] in ("Deployment", "Job")]
    assert all("imagePullSecrets" not in pod for pod in plain)
    with pytest.raises(ValueError, match="not a Secret name"):
        OperatorSettings(runtime_image_pull_secrets="Reg_Cred").runtime_image_pull_secret_names()


def test_service_monitor_labels_setting():
    """kube-prometheus-stack selects ServiceMonitors by its release label: the setting puts
    it on the server's and the router's ServiceMonitors (the children's own labels win)."""
    settings = OperatorSettings(service_monitor_labels="release=prometheus, team=ml")
    obj = make_isvc({"model": {"uri": "pvc://models/smol"}, "resources": {"gpus": 0},
                     "scaling": {"autoscaler": "keda", "minReplicas": 0, "maxReplicas": 2},
                     "router": {"enabled": True}})
    monitors = [m for m in render.render_children(api.parse(obj), settings).values() if m["kind"] == "ServiceMonitor"]
    assert len(monitors) == 2
    for m in monitors:
        assert m["metadata"]["labels"]["release"] == "prometheus" and m["metadata"]["labels"]["team"] == "ml"
        assert m["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "argosy-operator"
    plain = [m for m in render.render_children(api.parse(obj), SETTINGS).values() if m["kind"] == "ServiceMonitor"]
    assert all("release" not in m["metadata"]["labels"] for m in plain)
    with pytest.raises(ValueError, match="not key=value"):
        OperatorSettings(service_monitor_labels="release").service_monitor_label_map()
