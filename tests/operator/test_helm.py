"""The Helm chart, checked with the real helm binary: lint, template, schema, RBAC, settings.

Every object ``helm template`` renders is validated with kubernetes-validate (strict) for
a current Kubernetes; the ServiceMonitor, a Prometheus Operator kind it has no schema
for, is checked structurally. RBAC is compared with what the renderers actually produce,
so a new child kind without a rule fails here.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from argosy.operator import api, crdgen, render
from argosy.operator.settings import OperatorSettings

from . import helmbin
from .conftest import REPO, make_isvc
from .specs import SPECS

CHART = REPO / "charts" / "argosy-operator"
K8S_VERSION = "1.33.0"
RELEASE, NAMESPACE = "argosy", "argosy-system"

#: Value sets every check runs on.
VALUE_SETS: dict[str, dict] = {
    "default": {},
    "namespaced": {"watchNamespaces": ["ml", "research"]},
    "namespaced-no-discovery": {"watchNamespaces": ["ml"], "rbac": {"clusterDiscovery": False}},
    "service-monitor": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"},
                                           "interval": "30s", "scrapeTimeout": "20s"}},
    "custom-image": {
        "image": {"repository": "registry.example.com/platform/argosy-operator", "tag": "0.2.0-rc.1",
                  "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "regcred"}],
        "settings": {"runtimeImage": "registry.example.com/platform/argosy-runtime:0.2.0-rc.1",
                     "imagePullPolicy": "Always", "startupTimeout": 3600},
        "logFormat": "json",
        "extraArgs": ["--verbose"],
        "extraEnv": [{"name": "TZ", "value": "UTC"}],
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "infra", "operator": "Exists", "effect": "NoSchedule"}],
        "priorityClassName": "system-cluster-critical",
        "podAnnotations": {"example.com/team": "ml-platform"},
        "podLabels": {"team": "ml-platform"},
        "resources": {"requests": {"cpu": "200m", "memory": "256Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
    },
    "digest-openshift": {
        "image": {"digest": "sha256:" + "ab" * 32},
        "securityContext": {"runAsUser": None, "runAsGroup": None},
        "serviceAccount": {"create": True, "name": "argosy", "annotations": {"example.com/role": "operator"}},
        "fullnameOverride": "argosy-operator",
    },
    "existing-service-account": {"serviceAccount": {"create": False, "name": "platform-operator"},
                                 "rbac": {"create": True}},
    "webhook": {"webhook": {"enabled": True}, "watchNamespaces": ["ml"]},
    "webhook-cert-manager": {"webhook": {"enabled": True, "failurePolicy": "Ignore",
                                         "certManager": {"enabled": True}}},
}

#: What the kopf shell does with children (operator/kube.py, operator/informer.py): get, list
#: and watch by label (the children cache), server-side apply (create or patch), delete orphans.
CHILD_VERBS = {"get", "list", "watch", "create", "patch", "delete"}
#: ResourceQuotas (GPUQuota backstops) are applied and read, not cached.
QUOTA_VERBS = {"get", "list", "create", "patch", "delete"}
#: Resources the operator itself is granted besides its children.
OWN_RESOURCES = {("serving.argosy.dev", "inferenceservices"): {"get", "list", "watch", "patch", "update"},
                 ("serving.argosy.dev", "inferenceservices/status"): {"get", "patch", "update"},
                 # blockOwnerDeletion under OwnerReferencesPermissionEnforcement
                 ("serving.argosy.dev", "inferenceservices/finalizers"): {"update"},
                 ("", "events"): {"create", "patch", "list"},  # list: a Pending claim's ProvisioningFailed events
                 # GPUQuota backstops in each covered namespace, and the builtin autoscaler
                 ("", "resourcequotas"): QUOTA_VERBS,
                 ("apps", "deployments/scale"): {"get", "patch"},
                 # what the router's Role grants (spec.router): RBAC lets no one grant more than it holds
                 ("discovery.k8s.io", "endpointslices"): {"get", "list", "watch"}}
#: Cluster-wide GPUQuota accounting (with the discovery rules wherever those are granted).
QUOTA = {("serving.argosy.dev", "gpuquotas"): {"get", "list", "watch"},
         ("serving.argosy.dev", "gpuquotas/status"): {"get", "patch", "update"},
         ("serving.argosy.dev", "inferenceservices"): {"list"}}
DISCOVERY_ONLY = {("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
                  ("", "namespaces"): {"list", "watch"}}
DISCOVERY = {**DISCOVERY_ONLY, **QUOTA}


# ------------------------------------------------------------------------ helpers


@functools.lru_cache(maxsize=None)
def _helm_path() -> str:
    return str(helmbin.helm())


def run_helm(env: dict, *args: str, values: dict | None = None, tmp: Path | None = None) -> subprocess.CompletedProcess:
    """Run helm with ``args`` (plus ``-f`` a file holding ``values``); never raises on failure."""
    cmd = [_helm_path(), *args]
    if values is not None:
        assert tmp is not None
        f = tmp / f"values-{abs(hash(json.dumps(values, sort_keys=True)))}.json"
        f.write_text(json.dumps(values))
        cmd += ["-f", str(f)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)


_RENDERED: dict[str, list[dict]] = {}


def template(env: dict, tmp: Path, values: "str | dict", *extra: str) -> list[dict]:
    """Objects ``helm template`` renders for ``values`` (a :data:`VALUE_SETS` name or a dict),
    cached per values and flags."""
    if isinstance(values, str):
        values = VALUE_SETS[values]
    key = json.dumps(values, sort_keys=True) + "|" + " ".join(extra)
    if key not in _RENDERED:
        res = run_helm(env, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version",
                       K8S_VERSION, *extra, values=values, tmp=tmp)
        assert res.returncode == 0, res.stderr
        _RENDERED[key] = [d for d in yaml.safe_load_all(res.stdout) if d]
    return _RENDERED[key]


@pytest.fixture(scope="session")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("helm-values")


def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def aggregated(role: dict) -> bool:
    """A ClusterRole for users (joins the default admin/edit/view roles), not the operator's."""
    return any(k.startswith("rbac.authorization.k8s.io/aggregate-to-") for k in role["metadata"].get("labels", {}))


def operator_cluster_roles(objs: list[dict]) -> list[dict]:
    return [o for o in by_kind(objs, "ClusterRole") if not aggregated(o)]


def operator_container(objs: list[dict]) -> dict:
    (dep,) = by_kind(objs, "Deployment")
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def grants(role: dict) -> dict[tuple[str, str], set[str]]:
    """(apiGroup, resource) -> verbs of a Role or ClusterRole."""
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule.get("apiGroups", []):
            for res in rule.get("resources", []):
                out.setdefault((group, res), set()).update(rule["verbs"])
    return out


def plural(kind: str) -> str:
    """Resource name of a kind (all the operator's child kinds pluralise regularly)."""
    low = kind.lower()
    return low[:-1] + "ies" if low.endswith("y") else low + "s"


def child_resources() -> set[tuple[str, str]]:
    """(apiGroup, resource) of every child kind the renderers produce over the spec matrix."""
    settings = OperatorSettings(service_monitor=True)
    out = set()
    for spec in SPECS.values():
        for m in render.render_children(api.parse(make_isvc(spec)), settings).values():
            group = m["apiVersion"].rsplit("/", 1)[0] if "/" in m["apiVersion"] else ""
            out.add((group, plural(m["kind"])))
    return out


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.capitalize() for p in rest)


# ------------------------------------------------------------------------ the helm binary
def test_helmbin_extracts_once_into_its_cache(tmp_path):
    first = helmbin.helm(tmp_path)
    assert first.is_file() and first.parent.parent == tmp_path
    mtime = first.stat().st_mtime_ns
    assert helmbin.helm(tmp_path) == first and first.stat().st_mtime_ns == mtime  # reused, not rewritten
    out = subprocess.run([str(first), "version", "--short"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.startswith("v"), out.stderr
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")], "temporary files left behind"


# ------------------------------------------------------------------------ chart files
@pytest.mark.parametrize("name", [crdgen.CRD_FILE, crdgen.QUOTA_CRD_FILE])
def test_chart_crd_is_the_generated_one(name):
    chart_copy = CHART / "crds" / name
    generated = REPO / "crds" / name
    assert chart_copy.read_bytes() == generated.read_bytes(), (
        f"{chart_copy.relative_to(REPO)} is stale: cp {generated.relative_to(REPO)} {chart_copy.relative_to(REPO)}")
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == sorted(crdgen.files())


def test_chart_metadata():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"] == "0.1.0"
    assert chart["name"] == "argosy-operator"


def test_values_schema_is_closed_and_accepts_the_defaults():
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["additionalProperties"] is False
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(values)

    def walk(node: dict, sch: dict, where: str) -> None:
        # every key of values.yaml has its own schema entry with a description
        for key, value in node.items():
            props = sch.get("properties", {})
            assert key in props, f"values.schema.json does not describe {where}{key}"
            assert props[key].get("description"), f"{where}{key} has no description"
            if isinstance(value, dict) and "properties" in props[key]:
                assert props[key].get("additionalProperties") is False, f"{where}{key} accepts unknown keys"
                walk(value, props[key], f"{where}{key}.")

    walk(values, schema, "")


def test_settings_cover_operator_settings():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    fields = [f.name for f in OperatorSettings.__dataclass_fields__.values()]
    assert sorted(values["settings"]) == sorted(camel(f) for f in fields), (
        "values.yaml settings and OperatorSettings fields differ: add the new setting to values.yaml, "
        "values.schema.json and the README")
    assert all(v is None for v in values["settings"].values()), "settings default to the operator's own (null)"


# ------------------------------------------------------------------------ helm lint / template
@pytest.mark.parametrize("strict", [False, True], ids=["lint", "lint-strict"])
def test_helm_lint(helm_env, strict):
    res = run_helm(helm_env, "lint", str(CHART), *(["--strict"] if strict else []))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 chart(s) failed" in res.stdout


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_helm_lint_strict_with_values(helm_env, tmp, name):
    res = run_helm(helm_env, "lint", str(CHART), "--strict", "--namespace", NAMESPACE, values=VALUE_SETS[name],
                   tmp=tmp)
    assert res.returncode == 0, res.stdout + res.stderr


def check_service_monitor(sm: dict) -> None:
    """Structural check of a monitoring.coreos.com/v1 ServiceMonitor (no schema ships for it)."""
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", sm["metadata"]["name"])
    assert sm["metadata"]["namespace"] == NAMESPACE
    spec = sm["spec"]
    assert set(spec) <= {"selector", "namespaceSelector", "endpoints", "jobLabel", "targetLabels"}
    assert spec["selector"]["matchLabels"] and all(isinstance(v, str) for v in spec["selector"]["matchLabels"].values())
    ns = spec["namespaceSelector"]
    assert ns == {"any": True} or (set(ns) == {"matchNames"} and ns["matchNames"])
    for ep in spec["endpoints"]:
        assert set(ep) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
        assert ep["path"].startswith("/")
        for key in ("interval", "scrapeTimeout"):
            assert re.fullmatch(r"([0-9]+(ms|s|m|h))+", ep[key])


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_rendered_objects_validate(helm_env, tmp, name):
    objs = template(helm_env, tmp, name, "--include-crds")
    kinds = {o["kind"] for o in objs}
    assert {"Deployment", "CustomResourceDefinition"} <= kinds
    for obj in objs:
        if obj["kind"] == "ServiceMonitor":
            check_service_monitor(obj)
            continue
        if obj["apiVersion"].startswith("cert-manager.io/"):
            assert obj["kind"] in {"Issuer", "Certificate"} and obj["spec"], obj
            continue
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        if obj["kind"] in {"Deployment", "ServiceAccount", "Role", "RoleBinding"}:
            assert obj["metadata"].get("namespace"), f"{obj['kind']} {obj['metadata']['name']} has no namespace"


def test_crd_is_installed_from_crds_folder(helm_env, tmp):
    objs = template(helm_env, tmp, "default", "--include-crds")
    crds = {c["metadata"]["name"]: c for c in by_kind(objs, "CustomResourceDefinition")}
    assert crds == {f.removesuffix(".yaml"): yaml.safe_load((REPO / "crds" / f).read_text()) for f in crdgen.files()}
    assert not by_kind(template(helm_env, tmp, "default"), "CustomResourceDefinition")


@pytest.mark.parametrize("name", ["default", "namespaced", "service-monitor"])
def test_install_dry_run_renders_notes(helm_env, tmp, name):
    res = run_helm(helm_env, "install", "argosy-operator", str(CHART), "--namespace", NAMESPACE,
                   "--dry-run=client", values=VALUE_SETS[name], tmp=tmp)
    assert res.returncode == 0, res.stderr
    notes = res.stdout.split("NOTES:", 1)[1]
    ns = (VALUE_SETS[name].get("watchNamespaces") or ["default"])[0]
    assert f"kubectl -n {ns} wait --for=condition=Ready ais/smollm2" in notes
    assert "rollout status deployment/argosy-operator" in notes


# ------------------------------------------------------------------------ the operator Deployment
def test_operator_deployment_defaults(helm_env, tmp):
    objs = template(helm_env, tmp, "default")
    (dep,) = by_kind(objs, "Deployment")
    assert dep["metadata"]["namespace"] == NAMESPACE
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
    pod = dep["spec"]["template"]["spec"]
    (sa,) = by_kind(objs, "ServiceAccount")
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                                      "seccompProfile": {"type": "RuntimeDefault"}}
    c = operator_container(objs)
    assert c["image"] == "ghcr.io/argosy-dev/argosy-operator:0.1.0"
    assert c["args"] == ["--standalone", "--liveness", "http://0.0.0.0:8080/healthz", "--all-namespaces"]
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]},
                                    "seccompProfile": {"type": "RuntimeDefault"}}
    assert c["ports"] == [{"name": "health", "containerPort": 8080, "protocol": "TCP"}]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    # nothing set: the operator runs on its own defaults, with per-InferenceService ServiceMonitors
    assert env_of(c) == {"ARGOSY_SERVICE_MONITOR": "true"}
    assert OperatorSettings.from_env(env_of(c)) == OperatorSettings()


def test_operator_deployment_custom_image(helm_env, tmp):
    objs = template(helm_env, tmp, "custom-image")
    c = operator_container(objs)
    assert c["image"] == "registry.example.com/platform/argosy-operator:0.2.0-rc.1"
    assert c["imagePullPolicy"] == "Always"
    assert c["args"][-3:] == ["--log-format", "json", "--verbose"]
    env = env_of(c)
    assert env["ARGOSY_RUNTIME_IMAGE"] == "registry.example.com/platform/argosy-runtime:0.2.0-rc.1"
    assert env["TZ"] == "UTC"
    pod = by_kind(objs, "Deployment")[0]["spec"]["template"]
    assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["metadata"]["labels"]["team"] == "ml-platform"
    digest = operator_container(template(helm_env, tmp, "digest-openshift"))
    assert digest["image"] == "ghcr.io/argosy-dev/argosy-operator@sha256:" + "ab" * 32
    ctx = by_kind(template(helm_env, tmp, "digest-openshift"), "Deployment")[0]["spec"]["template"]["spec"][
        "securityContext"]
    assert ctx == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}


_NON_DEFAULT = {"image_pull_policy": "Always", "prometheus_server_address": "http://prom.example:9090",
                "prefetch_cpu": "750m", "prefetch_memory": "3Gi", "service_monitor": False,
                "service_monitor_labels": "release=prometheus,team=ml"}


def test_every_setting_reaches_the_operator(helm_env, tmp):
    """Each values.yaml setting becomes the ARGOSY_* variable that OperatorSettings.from_env reads."""
    expected = {}
    for f in OperatorSettings.__dataclass_fields__.values():
        if f.name in _NON_DEFAULT:
            expected[f.name] = _NON_DEFAULT[f.name]
        elif isinstance(f.default, float):
            expected[f.name] = f.default + 0.5  # a fraction must survive
        elif isinstance(f.default, int):
            expected[f.name] = f.default * 1000 + 7  # large enough to catch float formatting (1e+06)
        else:
            expected[f.name] = f"custom-{f.name.replace('_', '-')}"
    values = {"settings": {camel(k): v for k, v in expected.items()}}
    c = operator_container(template(helm_env, tmp, values))
    env = env_of(c)
    assert set(env) == {f"ARGOSY_{k.upper()}" for k in expected}
    assert OperatorSettings.from_env(env) == OperatorSettings(**expected)



def test_decimal_settings_from_set_flags(helm_env, tmp):
    """``helm --set settings.retryDelay=2.5`` passes a string; the schema and the env accept it."""
    res = run_helm(helm_env, "template", RELEASE, str(CHART), "--set", "settings.retryDelay=2.5",
                   "--set", "settings.resyncInterval=30")
    assert res.returncode == 0, res.stderr
    (dep,) = by_kind([d for d in yaml.safe_load_all(res.stdout) if d], "Deployment")
    env = env_of(dep["spec"]["template"]["spec"]["containers"][0])
    settings = OperatorSettings.from_env(env)
    assert settings.retry_delay == 2.5 and settings.resync_interval == 30.0


# ------------------------------------------------------------------------ RBAC
@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_rbac_has_no_wildcards(helm_env, tmp, name):
    for obj in template(helm_env, tmp, name):
        if obj["kind"] not in {"Role", "ClusterRole"}:
            continue
        assert "aggregationRule" not in obj
        for rule in obj["rules"]:
            for key, items in rule.items():
                assert all("*" not in item for item in items), f"{obj['kind']} {obj['metadata']['name']}: {key} {items}"
            assert "nonResourceURLs" not in rule
            # resourceNames only narrow: the webhook certificate's Secret and configuration
            assert "resourceNames" not in rule or obj["metadata"]["name"].endswith("-webhook-cert")


def test_rbac_covers_every_child_kind_and_nothing_else(helm_env, tmp):
    children = child_resources()
    # the matrix must exercise every child kind, including both autoscalers and the ServiceMonitor
    assert {("keda.sh", "scaledobjects"), ("autoscaling", "horizontalpodautoscalers"),
            ("monitoring.coreos.com", "servicemonitors"), ("batch", "jobs"), ("apps", "deployments")} <= children
    expected = {res: CHILD_VERBS for res in children} | OWN_RESOURCES
    (role,) = operator_cluster_roles(template(helm_env, tmp, "default"))
    want = dict(expected)
    for res, verbs in DISCOVERY.items():
        want[res] = set(want.get(res, set())) | verbs
    assert grants(role) == want
    for name in ("namespaced", "namespaced-no-discovery"):
        objs = template(helm_env, tmp, name)
        roles = by_kind(objs, "Role")
        assert sorted(r["metadata"]["namespace"] for r in roles) == sorted(VALUE_SETS[name]["watchNamespaces"])
        for r in roles:
            assert grants(r) == expected
        cluster_roles = operator_cluster_roles(objs)
        if VALUE_SETS[name].get("rbac", {}).get("clusterDiscovery") is False:
            assert not cluster_roles and not by_kind(objs, "ClusterRoleBinding")
        else:
            (discovery,) = cluster_roles
            assert grants(discovery) == DISCOVERY


def test_rbac_covers_the_kinds_the_shell_lists(helm_env, tmp):
    """The kopf shell lists every kind in CHILD_KINDS to find orphans, rendered now or not."""
    pytest.importorskip("kopf", reason="the kopf shell needs the operator extra")
    from argosy.operator import handlers

    (role,) = operator_cluster_roles(template(helm_env, tmp, "default"))
    granted = grants(role)
    for api_version, kind in handlers.CHILD_KINDS:
        group = api_version.rsplit("/", 1)[0] if "/" in api_version else ""
        assert granted.get((group, plural(kind)), set()) >= CHILD_VERBS, f"{kind} ({api_version})"


def test_user_roles_join_the_default_admin_edit_and_view_roles(helm_env, tmp):
    """KServe-style aggregated ClusterRoles: editors manage and scale InferenceServices,
    viewers read them and GPUQuotas; nothing binds them (they join admin/edit/view)."""
    objs = template(helm_env, tmp, "default")
    users = {o["metadata"]["name"].rsplit("-", 1)[-1]: o for o in by_kind(objs, "ClusterRole") if aggregated(o)}
    assert set(users) == {"edit", "view"}
    labels = {k: v for k, v in users["edit"]["metadata"]["labels"].items() if "aggregate" in k}
    assert labels == {"rbac.authorization.k8s.io/aggregate-to-admin": "true",
                      "rbac.authorization.k8s.io/aggregate-to-edit": "true"}
    g = "serving.argosy.dev"
    assert grants(users["edit"]) == {(g, "inferenceservices"): WRITE_AND_READ, (g, "inferenceservices/scale"): WRITE_AND_READ,
                                     (g, "inferenceservices/status"): {"get", "list", "watch"}}
    assert [k for k in users["view"]["metadata"]["labels"] if "aggregate" in k] == [
        "rbac.authorization.k8s.io/aggregate-to-view"]
    assert all(v == {"get", "list", "watch"} for v in grants(users["view"]).values())
    assert {r for _, r in grants(users["view"])} == {"inferenceservices", "inferenceservices/status",
                                                     "inferenceservices/scale", "gpuquotas", "gpuquotas/status"}
    bound = {b["roleRef"]["name"] for b in objs if b["kind"] in ("RoleBinding", "ClusterRoleBinding")}
    assert not bound & {o["metadata"]["name"] for o in users.values()}
    off = template(helm_env, tmp, {"rbac": {"aggregateToDefaultRoles": False}})
    assert not [o for o in by_kind(off, "ClusterRole") if aggregated(o)]


WRITE_AND_READ = {"get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"}


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_bindings_name_the_operator_service_account(helm_env, tmp, name):
    objs = template(helm_env, tmp, name)
    sa_name = by_kind(objs, "Deployment")[0]["spec"]["template"]["spec"]["serviceAccountName"]
    roles = {(o["kind"], o["metadata"]["name"], o["metadata"].get("namespace")) for o in objs
             if o["kind"] in {"Role", "ClusterRole"}}
    bindings = [o for o in objs if o["kind"] in {"RoleBinding", "ClusterRoleBinding"}]
    assert bindings
    for b in bindings:
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": sa_name, "namespace": NAMESPACE}]
        ref = b["roleRef"]
        ns = b["metadata"].get("namespace") if ref["kind"] == "Role" else None
        assert (ref["kind"], ref["name"], ns) in roles
    service_accounts = by_kind(objs, "ServiceAccount")
    if VALUE_SETS[name].get("serviceAccount", {}).get("create", True):
        assert [s["metadata"]["name"] for s in service_accounts] == [sa_name]
    else:
        assert not service_accounts and sa_name == VALUE_SETS[name]["serviceAccount"]["name"]


def test_namespaced_operator_watches_only_its_namespaces(helm_env, tmp):
    args = operator_container(template(helm_env, tmp, "namespaced"))["args"]
    assert "--all-namespaces" not in args
    assert args[3:] == ["--namespace", "ml", "--namespace", "research"]
    (binding,) = by_kind(template(helm_env, tmp, "namespaced"), "ClusterRoleBinding")
    assert binding["roleRef"]["name"].endswith("-discovery"), "only the discovery ClusterRole is bound cluster-wide"


# ------------------------------------------------------------------------ ServiceMonitor
def test_service_monitor_selects_every_runtime_service(helm_env, tmp):
    assert not by_kind(template(helm_env, tmp, "default"), "ServiceMonitor")
    objs = template(helm_env, tmp, "service-monitor")
    (sm,) = by_kind(objs, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    assert sm["spec"]["namespaceSelector"] == {"any": True}
    selector = sm["spec"]["selector"]["matchLabels"]
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["interval"] == "30s" and endpoint["path"] == "/metrics"
    for name, spec in SPECS.items():
        svc = render.service(api.parse(make_isvc(spec, name=name)), OperatorSettings())
        assert selector.items() <= svc["metadata"]["labels"].items(), name
        assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
    # it never selects the chart's own objects
    assert not selector.items() <= by_kind(objs, "Deployment")[0]["metadata"]["labels"].items()
    # and it replaces the per-InferenceService ServiceMonitors
    assert env_of(operator_container(objs))["ARGOSY_SERVICE_MONITOR"] == "false"
    values = {**VALUE_SETS["service-monitor"], "watchNamespaces": ["ml"]}
    (sm,) = by_kind(template(helm_env, tmp, values), "ServiceMonitor")
    assert sm["spec"]["namespaceSelector"] == {"matchNames": ["ml"]}


# ------------------------------------------------------------------------ bad values
BAD_VALUES = {
    "unknown-top-level-key": ({"replicas": 2}, "additional properties 'replicas'"),
    "bad-pull-policy": ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    "setting-not-an-integer": ({"settings": {"startupTimeout": "half an hour"}}, "/settings/startupTimeout"),
    "unknown-setting": ({"settings": {"gpuVendor": "nvidia"}}, "gpuVendor"),
    "bad-namespace": ({"watchNamespaces": ["Not_A_Namespace"]}, "/watchNamespaces/0"),
    "bad-interval": ({"serviceMonitor": {"interval": "often"}}, "/serviceMonitor/interval"),
    "bad-log-format": ({"logFormat": "xml"}, "/logFormat"),
    "root-uid": ({"securityContext": {"runAsUser": 0}}, "/securityContext/runAsUser"),
    "bad-quantity": ({"settings": {"prefetchMemory": "lots"}}, "/settings/prefetchMemory"),
    "bad-interval-string": ({"settings": {"resyncInterval": "soon"}}, "/settings/resyncInterval"),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_schema_rejects_bad_values(helm_env, tmp, case):
    values, where = BAD_VALUES[case]
    res = run_helm(helm_env, "template", RELEASE, str(CHART), values=values, tmp=tmp)
    assert res.returncode != 0, f"helm accepted {values}"
    assert "schema" in res.stderr and where in res.stderr, res.stderr


def test_two_service_monitor_modes_are_refused(helm_env, tmp):
    values = {"serviceMonitor": {"enabled": True}, "settings": {"serviceMonitor": True}}
    res = run_helm(helm_env, "template", RELEASE, str(CHART), values=values, tmp=tmp)
    assert res.returncode != 0 and "scrape every runtime pod twice" in res.stderr


# ------------------------------------------------------------------------ admission webhook
def test_no_webhook_by_default(helm_env, tmp):
    objs = template(helm_env, tmp, "default")
    assert not by_kind(objs, "ValidatingWebhookConfiguration")
    assert "ARGOSY_WEBHOOK_PORT" not in env_of(operator_container(objs))


def test_webhook_with_operator_issued_certificate(helm_env, tmp):
    """Without cert-manager the chart renders no key material (the operator issues and
    rotates the certificate and fills caBundle): two renders are byte-identical, as Argo
    CD's ``helm template`` needs, and the operator gets exactly the RBAC that takes."""
    objs = template(helm_env, tmp, "webhook")
    (vwc,) = by_kind(objs, "ValidatingWebhookConfiguration")
    (hook,) = vwc["webhooks"]
    assert hook["failurePolicy"] == "Fail" and hook["sideEffects"] == "None"
    assert hook["admissionReviewVersions"] == ["v1"]
    assert hook["rules"] == [{"apiGroups": ["serving.argosy.dev"], "apiVersions": ["v1alpha1"],
                              "operations": ["CREATE", "UPDATE"],
                              "resources": ["inferenceservices", "inferenceservices/scale"],
                              "scope": "Namespaced"}]
    assert hook["namespaceSelector"]["matchExpressions"][0]["values"] == ["ml"]
    assert "caBundle" not in hook["clientConfig"]
    assert [c["expression"] for c in hook["matchConditions"]] == [
        "!has(object.metadata.deletionTimestamp)", "request.operation == 'CREATE' || object.spec != oldObject.spec"]
    svc_ref = hook["clientConfig"]["service"]
    (svc,) = [o for o in by_kind(objs, "Service") if o["metadata"]["name"] == svc_ref["name"]]
    assert svc["metadata"]["namespace"] == svc_ref["namespace"] == NAMESPACE
    assert svc["spec"]["ports"][0]["targetPort"] == "webhook"
    assert not by_kind(objs, "Secret")
    first = run_helm(helm_env, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version",
                     K8S_VERSION, values=VALUE_SETS["webhook"], tmp=tmp)
    second = run_helm(helm_env, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version",
                      K8S_VERSION, values=VALUE_SETS["webhook"], tmp=tmp)
    assert first.returncode == 0 and first.stdout == second.stdout
    # a setting the chart also sets is not rendered twice (duplicate env names break server-side apply)
    custom = {**VALUE_SETS["webhook"], "settings": {"webhookCertValidityDays": 90}}
    names = [e["name"] for e in operator_container(template(helm_env, tmp, custom))["env"]]
    assert len(names) == len(set(names))
    assert env_of(operator_container(template(helm_env, tmp, custom)))["ARGOSY_WEBHOOK_CERT_VALIDITY_DAYS"] == "90"
    assert "PRIVATE KEY" not in first.stdout and "BEGIN CERTIFICATE" not in first.stdout
    container = operator_container(objs)
    env = env_of(container)
    assert env["ARGOSY_WEBHOOK_PORT"] == "9443"
    assert env["ARGOSY_WEBHOOK_CERT_SECRET"] == f"{vwc['metadata']['name']}-webhook-tls"
    assert env["ARGOSY_WEBHOOK_SERVICE"] == svc["metadata"]["name"] and env["ARGOSY_WEBHOOK_NAMESPACE"] == NAMESPACE
    assert env["ARGOSY_WEBHOOK_CONFIGURATION"] == vwc["metadata"]["name"]
    assert {"name": "webhook", "containerPort": 9443, "protocol": "TCP"} in container["ports"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "webhook-tls"]
    assert mount["mountPath"] == OperatorSettings().webhook_cert_dir and not mount["readOnly"]
    pod = by_kind(objs, "Deployment")[0]["spec"]["template"]["spec"]
    (vol,) = [v for v in pod["volumes"] if v["name"] == "webhook-tls"]
    assert vol["emptyDir"]["medium"] == "Memory"
    (cert_role,) = [o for o in by_kind(objs, "Role") if o["metadata"]["name"].endswith("-webhook-cert")]
    assert cert_role["metadata"]["namespace"] == NAMESPACE
    assert {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [env["ARGOSY_WEBHOOK_CERT_SECRET"]],
            "verbs": ["get", "patch", "update"]} in cert_role["rules"]
    vwc_rule = [r for o in by_kind(objs, "ClusterRole") for r in o["rules"]
                if "validatingwebhookconfigurations" in r["resources"]]
    assert vwc_rule == [{"apiGroups": ["admissionregistration.k8s.io"], "resources": ["validatingwebhookconfigurations"],
                         "resourceNames": [vwc["metadata"]["name"]], "verbs": ["get", "patch"]}]


def test_webhook_match_conditions_select_what_can_change_a_reservation(helm_env, tmp):
    """The rendered matchConditions, evaluated with cel-python as the API server would:
    creates and spec changes reach the webhook; label-only updates and objects being
    deleted do not."""
    import celpy

    (vwc,) = by_kind(template(helm_env, tmp, "webhook"), "ValidatingWebhookConfiguration")
    env = celpy.Environment()
    programs = [env.program(env.compile(c["expression"])) for c in vwc["webhooks"][0]["matchConditions"]]

    def sent(operation, obj, old=None):
        act = {"request": celpy.json_to_cel({"operation": operation}), "object": celpy.json_to_cel(obj),
               "oldObject": celpy.json_to_cel(old)}
        return all(bool(p.evaluate(act)) for p in programs)

    base = {"metadata": {"name": "llm", "labels": {}}, "spec": {"scaling": {"minReplicas": 1}}}
    relabeled = {**base, "metadata": {"name": "llm", "labels": {"team": "a"}}}
    grown = {**base, "spec": {"scaling": {"minReplicas": 3}}}
    deleting = {**grown, "metadata": {"name": "llm", "deletionTimestamp": "2026-01-01T00:00:00Z"}}
    assert sent("CREATE", base)
    assert sent("UPDATE", grown, base)
    assert not sent("UPDATE", relabeled, base)
    assert not sent("UPDATE", deleting, base)
    # kubectl scale: the scale subresource's Scale objects
    scale = {"apiVersion": "autoscaling/v1", "kind": "Scale", "metadata": {"name": "llm"}, "spec": {"replicas": 1}}
    assert sent("UPDATE", {**scale, "spec": {"replicas": 3}}, scale)


def test_webhook_with_cert_manager(helm_env, tmp):
    objs = template(helm_env, tmp, "webhook-cert-manager")
    (vwc,) = by_kind(objs, "ValidatingWebhookConfiguration")
    (cert,) = by_kind(objs, "Certificate")
    assert vwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == (
        f"{NAMESPACE}/{cert['metadata']['name']}")
    assert "caBundle" not in vwc["webhooks"][0]["clientConfig"] and vwc["webhooks"][0]["failurePolicy"] == "Ignore"
    assert not by_kind(objs, "Secret") and by_kind(objs, "Issuer")
    svc = vwc["webhooks"][0]["clientConfig"]["service"]
    assert f"{svc['name']}.{NAMESPACE}.svc" in cert["spec"]["dnsNames"]
