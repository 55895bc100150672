"""The generated CRD: up to date, structural, valid, and its schema and CEL rules bite."""

from __future__ import annotations

import copy

import kubernetes_validate
import pydantic
import pytest

from argosy.operator import api, crdgen

from . import crdcheck
from .conftest import EXAMPLE_FILES, load_example, make_isvc
from .specs import SMOL, SPECS

K8S_VERSION = "1.30.0"  # the oldest Kubernetes the operator supports


def test_crd_file_is_up_to_date():
    path = crdgen.CRDS_DIR / crdgen.CRD_FILE
    assert path.exists(), "crds/ has no InferenceService CRD: run python -m argosy.operator.crdgen"
    assert path.read_text() == crdgen.render_yaml(), "crds/ is stale: run python -m argosy.operator.crdgen"
    assert crdgen.main(["--check"]) == 0


def test_crd_check_reports_stale_file(tmp_path, capsys):
    (tmp_path / crdgen.CRD_FILE).write_text("stale\n")
    assert crdgen.main(["--check", "--output-dir", str(tmp_path)]) == 1
    assert "stale" in capsys.readouterr().err


@pytest.mark.parametrize("version", [K8S_VERSION, kubernetes_validate.latest_version()])
def test_crd_is_a_valid_crd(crd, version):
    kubernetes_validate.validate(crd, version, strict=True)


def _walk(node, path=""):
    yield path, node
    for key, sub in (node.get("properties") or {}).items():
        yield from _walk(sub, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


def test_schema_is_structural(schema):
    for path, node in _walk(schema):
        assert "$ref" not in node and "$defs" not in node and "allOf" not in node and "oneOf" not in node, path
        assert "nullable" not in node and "title" not in node, path
        if node.get("x-kubernetes-int-or-string"):
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}] and "type" not in node, path
        else:
            assert "anyOf" not in node, path
            assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), f"{path} has no type"
        if node.get("type") == "object" and "properties" in node:
            assert "additionalProperties" not in node, path
        for key in ("exclusiveMinimum", "exclusiveMaximum"):
            if key in node:
                assert node[key] is True and ("minimum" if key == "exclusiveMinimum" else "maximum") in node, path
        assert "default" not in node or node["default"] is not None, path


def test_every_field_is_described(schema):
    for top in ("spec", "status"):
        for path, node in _walk(schema["properties"][top], top):
            if path.endswith(("[]", "{}")) and node.get("type") != "object":
                continue  # scalar list items and map values: the field itself is described
            assert node.get("description"), f"{path} has no description (kubectl explain shows it)"


def test_defaults_and_preserved_fields(schema):
    spec = schema["properties"]["spec"]["properties"]
    assert spec["cache"]["properties"]["accessMode"]["default"] == "ReadWriteMany"
    assert spec["resources"]["properties"]["gpuResourceName"]["default"] == "nvidia.com/gpu"
    assert spec["scaling"]["properties"]["autoscaler"]["enum"] == ["keda", "hpa", "none", "builtin"]
    assert spec["cache"]["default"] == {} and spec["scaling"]["default"] == {}
    assert "default" not in spec["model"]["properties"]["credentialsSecretRef"]  # optional, not {}
    preserved = [p for p, n in _walk(schema["properties"]["spec"], "spec")
                 if n.get("x-kubernetes-preserve-unknown-fields")]
    assert preserved == ["spec.runtime.env[].valueFrom", "spec.scheduling.affinity"]
    assert spec["resources"]["properties"]["memory"]["x-kubernetes-int-or-string"] is True


def test_subresources_and_columns(crd, schema):
    version = crd["spec"]["versions"][0]
    scale = version["subresources"]["scale"]
    assert version["subresources"]["status"] == {}
    assert scale == {"specReplicasPath": ".spec.scaling.minReplicas", "statusReplicasPath": ".status.replicas",
                     "labelSelectorPath": ".status.selector"}
    for path in scale.values():
        node = schema
        for part in path.strip(".").split("."):
            node = node["properties"][part]
        assert node["type"] in ("integer", "string")
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert set(columns) >= {"Model", "Ready", "Replicas", "Available", "URL", "Age"}
    assert columns["Age"]["type"] == "date"
    # kubectl get -o wide: what the service is and who owns it
    assert {n for n, c in columns.items() if c.get("priority") == 1} == {"Reason", "Autoscaler", "GPUs", "Tenant"}
    for c in columns.values():  # every column reads a declared field
        if c["jsonPath"].startswith((".spec", ".status")):
            node = schema
            for part in c["jsonPath"].strip(".").split("."):
                if part.startswith("conditions["):
                    break
                node = node["properties"][part]
    assert crd["spec"]["names"]["shortNames"] == ["ais"] and "isvc" not in crd["spec"]["names"]["shortNames"]
    assert crd["spec"]["scope"] == "Namespaced"


def test_every_cel_rule_compiles_and_names_declared_fields(schema):
    rules = list(crdcheck.all_rules(schema))
    assert len(rules) >= 10
    for path, node, rule in rules:
        crdcheck.compile_rule(rule["rule"])  # raises on a syntax error
        assert not crdcheck.undeclared_references(rule["rule"], node), (path, rule["rule"])
        assert rule["message"]


def test_cel_field_paths_exist(schema):
    for path, node, rule in crdcheck.all_rules(schema):
        if "fieldPath" in rule:
            target = node
            for part in rule["fieldPath"].strip(".").split("."):
                target = target["properties"][part]


def test_lists_with_rules_are_bounded(schema):
    """The API server estimates a rule's cost from list and string bounds; unbounded lists of
    objects with rules (or strings compared in them) would exceed the budget at CRD creation."""
    for path, node in _walk(schema):
        if node.get("type") == "array" and list(crdcheck.all_rules(node["items"])):
            assert "maxItems" in node, path
            for _, item_node, rule in crdcheck.all_rules(node["items"]):
                for name, prop in (item_node.get("properties") or {}).items():
                    if prop.get("type") == "string" and f"self.{name} " in rule["rule"] + " ":
                        if "==" in rule["rule"] or "!=" in rule["rule"]:
                            assert "maxLength" in prop, (path, name)


GOOD = {name: make_isvc(spec) for name, spec in SPECS.items()}
GOOD.update({p.name: load_example(p) for p in EXAMPLE_FILES})


@pytest.mark.parametrize("name", sorted(GOOD))
def test_crd_and_models_accept(schema, name):
    obj = GOOD[name]
    assert crdcheck.validate_custom_resource(schema, obj) == []
    api.parse(obj)


def test_examples_exist():
    assert {p.name for p in EXAMPLE_FILES} >= {"inferenceservice-minimal.yaml", "inferenceservice-keda-rwx.yaml"}


def test_pydantic_defaults_match_crd_defaults(schema):
    """The API server's defaulting and pydantic's give the same spec."""
    for name, obj in GOOD.items():
        defaulted = crdcheck.apply_defaults(schema, obj)
        via_pydantic = api.parse(obj).spec.model_dump(mode="json", by_alias=True, exclude_none=True)
        via_crd = defaulted["spec"]
        # pydantic materialises empty lists/dicts the CRD leaves out
        for section in ("runtime", "scheduling"):
            via_pydantic[section] = {k: v for k, v in via_pydantic[section].items() if v not in ([], {})}
        # resources.gpus defaults to parallelism.tensor: derived, so no CRD default can say it
        if "gpus" not in via_crd["resources"]:
            assert via_pydantic["resources"].pop("gpus") == via_crd["parallelism"]["tensor"], name
        assert via_crd == via_pydantic, name


def _with(path: str, value, base: dict | None = None) -> dict:
    obj = copy.deepcopy(base or make_isvc({"model": {"uri": SMOL}}))
    node = obj
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return obj


def _spec(**sections) -> dict:
    spec = {"model": {"uri": SMOL}}
    spec.update(sections)
    return make_isvc(spec)


BAD_CEL = {
    "min-above-max": (_spec(scaling={"autoscaler": "keda", "minReplicas": 3, "maxReplicas": 2}),
                      "minReplicas must not exceed maxReplicas"),
    "min-above-max-none": (_spec(scaling={"minReplicas": 3, "maxReplicas": 2}), "minReplicas must not exceed"),
    "autoscaler-without-max": (_spec(scaling={"autoscaler": "hpa"}), "maxReplicas is required"),
    "hpa-to-zero": (_spec(scaling={"autoscaler": "hpa", "minReplicas": 0, "maxReplicas": 2}),
                    "an HPA cannot scale to zero"),
    "idle-without-keda": (_spec(scaling={"idleReplicaCount": 0}), "needs autoscaler keda"),
    "idle-not-below-min": (_spec(scaling={"autoscaler": "keda", "minReplicas": 0, "maxReplicas": 2,
                                          "idleReplicaCount": 0}), "idleReplicaCount must be below minReplicas"),
    "keda-zero-without-router": (_spec(scaling={"autoscaler": "keda", "minReplicas": 0, "maxReplicas": 2}),
                                 "needs router.enabled"),
    "idle-without-router": (_spec(scaling={"autoscaler": "keda", "minReplicas": 1, "maxReplicas": 2,
                                           "idleReplicaCount": 0}), "needs router.enabled"),
    "builtin-zero-without-router": (_spec(scaling={"autoscaler": "builtin", "minReplicas": 0, "maxReplicas": 2}),
                                    "needs router.enabled"),
    "s3-with-prefetch": (make_isvc({"model": {"uri": "s3://bucket/m"}}), "not downloaded by the operator yet"),
    "gs-with-prefetch": (make_isvc({"model": {"uri": "gs://bucket/m"}, "cache": {"existingClaimName": "c"}}),
                         "not downloaded by the operator yet"),
    "no-targets": (_spec(scaling={"autoscaler": "keda", "maxReplicas": 2,
                                  "targets": {"waitingRequests": 0, "kvCacheUsage": 0}}),
                   "at least one scaling target"),
    "gpus-not-multiple-of-tp": (_spec(resources={"gpus": 3}, parallelism={"tensor": 2}),
                                "multiple of parallelism.tensor"),
    "no-cache-s3": (make_isvc({"model": {"uri": "s3://bucket/m"}, "cache": {"enabled": False}}),
                    "with the cache disabled"),
    "no-cache-hf-file": (make_isvc({"model": {"uri": "hf://org/name/model.gguf"}, "cache": {"enabled": False}}),
                         "with the cache disabled"),
    "prefetch-off-new-claim": (_spec(cache={"prefetch": False}), "prefetch: false needs existingClaimName"),
    "claim-and-class": (_spec(cache={"existingClaimName": "x", "storageClassName": "y"}),
                        "storageClassName applies only"),
    "budget-below-len": (_spec(runtime={"maxModelLen": 4096, "maxNumBatchedTokens": 2048,
                                        "enableChunkedPrefill": False}), "maxNumBatchedTokens must be at least"),
    "env-both": (_spec(runtime={"env": [{"name": "A", "value": "x", "valueFrom": {"fieldRef": {"fieldPath": "x"}}}]}),
                 "set value or valueFrom"),
    "toleration-exists-value": (_spec(scheduling={"tolerations": [{"key": "k", "operator": "Exists", "value": "v"}]}),
                                "value must be empty"),
    "long-name": (make_isvc(name="a" * (api.MAX_NAME_LENGTH + 1)), "metadata.name must be at most"),
    "dotted-name": (make_isvc(name="a.b"), "metadata.name must be at most"),
}

BAD_SCHEMA = {
    "bad-uri-scheme": _with("spec.model.uri", "http://example.com/model"),
    "hf-without-name": _with("spec.model.uri", "hf://org"),
    "pvc-bad-claim": _with("spec.model.uri", "pvc://Claim_1/x"),
    "missing-uri": _with("spec.model", {}),
    "missing-spec": {k: v for k, v in make_isvc().items() if k != "spec"},
    "gpu-util-above-1": _with("spec.runtime", {"gpuMemoryUtilization": 1.5}),
    "gpu-util-zero": _with("spec.runtime", {"gpuMemoryUtilization": 0}),
    "bad-dtype": _with("spec.runtime", {"dtype": "int4"}),
    "bad-kv-cache-dtype": _with("spec.runtime", {"kvCacheDtype": "int8"}),
    "bad-quantization": _with("spec.runtime", {"quantization": "int3"}),
    "bad-autoscaler": _with("spec.scaling", {"autoscaler": "vpa"}),
    "bad-quantity": _with("spec.resources", {"memory": "32 GB"}),
    "float-quantity": _with("spec.resources", {"cpu": 0.5}),
    "bad-max-unavailable": _with("spec.disruption", {"maxUnavailable": "ten"}),
    "negative-min": _with("spec.scaling", {"minReplicas": -1}),
    "idle-nonzero": _with("spec.scaling", {"autoscaler": "keda", "minReplicas": 2, "maxReplicas": 3,
                                           "idleReplicaCount": 1}),
    "tp-zero": _with("spec.parallelism", {"tensor": 0}),
    "kv-above-1": _with("spec.scaling", {"targets": {"kvCacheUsage": 1.5}}),
    "bad-tenant": _with("spec.tenant", "Research"),
    "bad-access-mode": _with("spec.cache", {"accessMode": "ReadWriteAll"}),
    "bad-effect": _with("spec.scheduling", {"tolerations": [{"key": "k", "effect": "Sometimes"}]}),
    "secret-without-name": _with("spec.model.credentialsSecretRef", {"key": "token"}),
    "typo-field": _with("spec.scaling", {"maxReplica": 3}),
    "typo-section": _with("spec.autoscaling", {"maxReplicas": 3}),
}


@pytest.mark.parametrize("name", sorted(BAD_CEL))
def test_cel_rule_rejects(schema, name):
    obj, message = BAD_CEL[name]
    defaulted = crdcheck.apply_defaults(schema, obj)
    assert crdcheck.schema_errors(schema, defaulted) == [], "must pass the schema and fail on CEL alone"
    errors = crdcheck.cel_errors(schema, defaulted)
    assert any(message in e for e in errors), errors
    with pytest.raises(pydantic.ValidationError):
        api.parse(obj)


@pytest.mark.parametrize("name", sorted(BAD_SCHEMA))
def test_schema_rejects(schema, name):
    obj = BAD_SCHEMA[name]
    assert crdcheck.validate_custom_resource(schema, obj)
    with pytest.raises(pydantic.ValidationError):
        api.parse(obj)


def _cache(**cache) -> dict:
    return _with("spec.cache", cache)


#: Updates the API server refuses with the CRD's transition rules: (stored, new, message).
BAD_TRANSITION = {
    "shrink-cache": (_cache(size="50Gi"), _cache(size="20Gi"), "cache.size cannot shrink"),
    "storage-class-change": (_cache(storageClassName="nfs"), _cache(storageClassName="fast"),
                             "cache.storageClassName cannot change"),
    "storage-class-added": (_cache(), _cache(storageClassName="fast"), "cache.storageClassName cannot change"),
    "access-mode-change": (_cache(), _cache(accessMode="ReadWriteOnce"), "cache.accessMode cannot change"),
}
#: Updates they let through.
GOOD_TRANSITION = {
    "grow-cache": (_cache(size="50Gi"), _cache(size="0.1Ti")),
    "integer-size": (_cache(size=1000), _cache(size="1Gi")),
    "same": (_cache(storageClassName="nfs"), _cache(storageClassName="nfs")),
    "to-existing-claim": (_cache(storageClassName="nfs"), _cache(existingClaimName="shared")),
    "cache-off": (_cache(storageClassName="nfs"), _cache(enabled=False, storageClassName="fast")),
    "other-spec-change": (_cache(), _with("spec.scaling", {"minReplicas": 2}, _cache())),
}


@pytest.mark.parametrize("name", sorted(BAD_TRANSITION))
def test_transition_rule_rejects(schema, name):
    old, new, message = BAD_TRANSITION[name]
    old_d, new_d = crdcheck.apply_defaults(schema, old), crdcheck.apply_defaults(schema, new)
    assert crdcheck.cel_errors(schema, new_d) == [], "a create of the new object is fine"
    errors = crdcheck.cel_errors(schema, new_d, old_d)
    assert any(message in e for e in errors), errors


@pytest.mark.parametrize("name", sorted(GOOD_TRANSITION))
def test_transition_rule_allows(schema, name):
    old, new = GOOD_TRANSITION[name]
    assert crdcheck.cel_errors(schema, crdcheck.apply_defaults(schema, new), crdcheck.apply_defaults(schema, old)) == []


def test_every_cel_rule_has_a_failing_case(schema):
    """A rule no bad object violates may not bite at all."""
    messages = {r["message"] for _, _, r in crdcheck.all_rules(schema)}
    expected_parts = [m for _, m in BAD_CEL.values()] + [m for _, _, m in BAD_TRANSITION.values()]
    exercised = {m for m in messages if any(expected in m for expected in expected_parts)}
    assert exercised == messages


def test_name_with_leading_digit_is_caught_by_the_operator():
    # The CRD leaves it to the operator (a regex on metadata.name would exceed CEL's cost budget).
    with pytest.raises(pydantic.ValidationError):
        api.parse(make_isvc(name="1llm"))
