"""GPUQuota: the model and its CRD rules, quota accounting, admission, the autoscaler cap, ResourceQuotas."""

from __future__ import annotations

import pydantic
import pytest
from hypothesis import given, settings, strategies as st

from argosy.operator import api, crdgen, quota
from argosy.operator.render import resourcequota

from . import crdcheck


def gq(name="team-a", gpus=16, *, namespaces=("ml",), selector=None, tenant=None, per_product=None,
       enforce=True, uid="gq-uid"):
    spec = {"gpus": gpus, "enforceResourceQuota": enforce}
    if selector is not None:
        spec["namespaceSelector"] = selector
    else:
        spec["namespaces"] = list(namespaces)
    if tenant:
        spec["tenant"] = tenant
    if per_product:
        spec["perProduct"] = per_product
    return {"apiVersion": api.API_VERSION, "kind": "GPUQuota", "metadata": {"name": name, "uid": uid,
                                                                            "generation": 1}, "spec": spec}


def svc(name, ns="ml", *, gpus=1, min_r=1, max_r=None, tenant=None, product=None, ready=0):
    return quota.ServiceUsage(ns, name, tenant, gpus, product, min_r, max_r if max_r is not None else min_r, ready)


def parsed(*objs):
    return [api.parse_quota(o) for o in objs]


# ------------------------------------------------------------------------ model and CRD
@pytest.fixture(scope="module")
def qschema():
    return crdgen.quota_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_quota_crd_file_is_up_to_date():
    path = crdgen.CRDS_DIR / crdgen.QUOTA_CRD_FILE
    assert path.read_text() == crdgen.render_quota_yaml(), "run python -m argosy.operator.crdgen"
    assert crdgen.quota_crd()["spec"]["scope"] == "Cluster"


def test_quota_crd_is_a_valid_crd():
    import kubernetes_validate

    kubernetes_validate.validate(crdgen.quota_crd(), "1.30.0", strict=True)


@pytest.mark.parametrize("obj", [gq(), gq(selector={"matchLabels": {"team": "a"}}), gq(gpus=0),
                                 gq(per_product={"NVIDIA-H100-80GB-HBM3": 8}, tenant="blue"),
                                 gq(selector={"matchExpressions": [{"key": "team", "operator": "Exists"}]})])
def test_valid_quotas_pass_schema_cel_and_pydantic(qschema, obj):
    assert crdcheck.validate_custom_resource(qschema, obj) == []
    api.parse_quota(obj)


def _both(o):
    o["spec"]["namespaceSelector"] = {"matchLabels": {"a": "b"}}
    return o


def _neither(o):
    del o["spec"]["namespaces"]
    return o


@pytest.mark.parametrize("obj,needle", [
    (_both(gq()), "exactly one"),
    (_neither(gq()), "exactly one"),
    (gq(per_product={"X": 17}), "perProduct"),
    (gq(gpus=-1), "gpus"),
    (gq(selector={"matchExpressions": [{"key": "team", "operator": "In"}]}), "values"),
])
def test_invalid_quotas_are_refused_by_both(qschema, obj, needle):
    errors = crdcheck.validate_custom_resource(qschema, obj)
    assert errors and any(needle in e for e in errors), errors
    with pytest.raises(pydantic.ValidationError):
        api.parse_quota(obj)


# ------------------------------------------------------------------------ which quota applies
def test_selector_semantics():
    sel = api.LabelSelector.model_validate({"matchLabels": {"team": "a"}, "matchExpressions": [
        {"key": "env", "operator": "In", "values": ["prod", "stg"]},
        {"key": "frozen", "operator": "DoesNotExist"}]})
    assert quota.selector_matches(sel, {"team": "a", "env": "prod"})
    assert not quota.selector_matches(sel, {"team": "a", "env": "dev"})
    assert not quota.selector_matches(sel, {"team": "a", "env": "prod", "frozen": "1"})
    assert not quota.selector_matches(sel, {"team": "b", "env": "prod"})
    assert quota.selector_matches(api.LabelSelector(), {})
    notin = api.LabelSelector.model_validate({"matchExpressions": [{"key": "x", "operator": "NotIn",
                                                                     "values": ["1"]}]})
    assert quota.selector_matches(notin, {}) and not quota.selector_matches(notin, {"x": "1"})


def test_applicable_by_name_selector_and_tenant():
    qs = parsed(gq("by-name", namespaces=["ml"]), gq("by-label", selector={"matchLabels": {"team": "a"}}),
                gq("blue-only", namespaces=["ml", "shared"], tenant="blue"))
    labels = {"ml": {"team": "a"}, "shared": {}}
    names = lambda s: [q.metadata.name for q in quota.applicable(qs, s, labels)]  # noqa: E731
    assert names(svc("x", "ml")) == ["by-label", "by-name"]
    assert names(svc("x", "ml", tenant="blue")) == ["blue-only", "by-label", "by-name"]
    assert names(svc("x", "shared", tenant="blue")) == ["blue-only"]
    assert names(svc("x", "shared", tenant="red")) == []
    assert names(svc("x", "other")) == []


# ------------------------------------------------------------------------ admission
def test_admit_denies_with_quota_request_and_what_is_left():
    qs = parsed(gq("team-a", 16))
    others = [svc("a", gpus=4, min_r=2), svc("b", gpus=2, min_r=2)]  # 12 reserved
    ok = quota.admit(svc("new", gpus=4, min_r=1), qs, others, {})
    assert ok.allowed and ok.quotas == ("team-a",)
    no = quota.admit(svc("new", gpus=4, min_r=2), qs, others, {})
    assert not no.allowed
    assert "GPUQuota team-a" in no.message and "8 GPUs (minReplicas 2 x 4 GPUs)" in no.message
    assert "12 of 16 GPUs" in no.message and "2 other services" in no.message and "4 GPUs left" in no.message


def test_admit_does_not_count_the_previous_version_of_the_same_service():
    qs = parsed(gq("q", 8))
    existing = [svc("llm", gpus=4, min_r=2)]  # the stored version of the service being updated
    assert quota.admit(svc("llm", gpus=4, min_r=2), qs, existing, {}).allowed
    assert not quota.admit(svc("llm", gpus=4, min_r=3), qs, existing, {}).allowed


def test_admit_zero_gpus_and_unquoted_namespaces_pass():
    qs = parsed(gq("q", 0))
    assert quota.admit(svc("cpu", gpus=0, min_r=5), qs, [], {}).allowed
    assert quota.admit(svc("x", "elsewhere", gpus=8, min_r=8), qs, [], {}).allowed
    assert not quota.admit(svc("x", gpus=1), qs, [], {}).allowed


def test_admit_per_product():
    h100 = "NVIDIA-H100-80GB-HBM3"
    qs = parsed(gq("q", 16, per_product={h100: 4}))
    others = [svc("a", gpus=2, min_r=1, product=h100)]
    assert quota.admit(svc("b", gpus=2, product=h100), qs, others, {}).allowed
    d = quota.admit(svc("b", gpus=4, product=h100), qs, others, {})
    assert not d.allowed and h100 in d.message and "2 GPUs of" in d.message
    assert quota.admit(svc("b", gpus=8, product="NVIDIA-A100"), qs, others, {}).allowed  # no product limit


def test_every_applicable_quota_binds():
    qs = parsed(gq("big", 100, namespaces=["ml", "ml2"]), gq("small", 4, namespaces=["ml"]))
    d = quota.admit(svc("x", "ml", gpus=5), qs, [], {})
    assert not d.allowed and "GPUQuota small" in d.message
    assert quota.admit(svc("x", "ml2", gpus=5), qs, [], {}).allowed


# ------------------------------------------------------------------------ cap
def test_cap_shares_free_gpus_round_robin():
    qs = parsed(gq("q", 10))
    services = [svc("a", gpus=2, min_r=1, max_r=10), svc("b", gpus=1, min_r=2, max_r=3)]
    caps = quota.caps(qs, services, {})
    # reserved 2 + 2 = 4, free 6: a+1 (2), b+1 (1), a+1 (2) -> free 1, a cannot fit, b is at max
    assert caps[("ml", "a")].max_replicas == 3 and caps[("ml", "a")].limited
    assert "capped from 10 to 3 by GPUQuota q" in caps[("ml", "a")].message
    assert caps[("ml", "b")].max_replicas == 3 and not caps[("ml", "b")].limited


def test_cap_untouched_without_quota_or_gpus():
    caps = quota.caps(parsed(gq("q", 1)), [svc("x", "other", gpus=8, max_r=9), svc("c", gpus=0, max_r=9)], {})
    assert caps[("other", "x")] == quota.Cap(9, False, ())
    assert caps[("ml", "c")].max_replicas == 9 and not caps[("ml", "c")].limited


def test_cap_never_below_min():
    caps = quota.caps(parsed(gq("q", 2)), [svc("x", gpus=4, min_r=2, max_r=5)], {})  # admitted before a shrink
    assert caps[("ml", "x")].max_replicas == 2


namespaces = st.sampled_from(["a", "b", "c", "d"])
services_st = st.lists(st.builds(
    lambda ns, i, gpus, mn, extra, tenant, product: svc(f"s{i}", ns, gpus=gpus, min_r=mn, max_r=mn + extra,
                                                          tenant=tenant, product=product),
    namespaces, st.integers(0, 30), st.integers(0, 8), st.integers(0, 3), st.integers(0, 6),
    st.sampled_from([None, "blue", "red"]), st.sampled_from([None, "H100", "A100"])),
    max_size=12, unique_by=lambda s: s.key)
quotas_st = st.lists(st.builds(
    lambda i, gpus, nss, tenant, h100: gq(f"q{i}", gpus, namespaces=sorted(nss), tenant=tenant,
                                          per_product={"H100": min(h100, gpus)} if h100 is not None else None),
    st.integers(0, 5), st.integers(0, 40), st.sets(namespaces, min_size=1), st.sampled_from([None, "blue"]),
    st.one_of(st.none(), st.integers(0, 20))), max_size=4, unique_by=lambda o: o["metadata"]["name"])


@settings(max_examples=150, deadline=None)
@given(services_st, quotas_st)
def test_caps_keep_possible_gpus_within_every_quota(services, quota_objs):
    qs = parsed(*quota_objs)
    caps = quota.caps(qs, services, {})
    for s in services:
        c = caps[s.key]
        assert s.min_replicas <= c.max_replicas <= s.max_replicas
        assert c.limited == (c.max_replicas < s.max_replicas)
    for q in qs:
        mine = quota.charged(q, services, {})
        if sum(s.reserved for s in mine) > q.spec.gpus:
            continue  # over-reserved (quota shrank): only the minimum is kept, checked above
        assert sum(caps[s.key].max_replicas * s.gpus for s in mine) <= q.spec.gpus
        for product, limit in q.spec.per_product.items():
            of = [s for s in mine if s.product == product]
            if sum(s.reserved for s in of) <= limit:
                assert sum(caps[s.key].max_replicas * s.gpus for s in of) <= limit


@settings(max_examples=150, deadline=None)
@given(services=services_st, quota_objs=quotas_st, svc_new=st.builds(
    lambda ns, gpus, mn, tenant: svc("new", ns, gpus=gpus, min_r=mn, tenant=tenant),
    namespaces, st.integers(0, 8), st.integers(0, 4), st.sampled_from([None, "blue"])))
def test_admission_keeps_reservations_within_quotas(services, quota_objs, svc_new):
    qs = parsed(*quota_objs)
    d = quota.admit(svc_new, qs, services, {})
    for q in quota.applicable(qs, svc_new, {}):
        before = sum(s.reserved for s in quota.charged(q, services, {}))
        if d.allowed:
            assert before + svc_new.reserved <= q.spec.gpus or svc_new.reserved == 0
    if not d.allowed:
        assert d.message.startswith("GPUQuota ") and svc_new.reserved > 0


def test_quota_usage_for_status():
    q = parsed(gq("q", 10))[0]
    services = [svc("a", gpus=2, min_r=1, max_r=4, ready=2), svc("b", "other", gpus=8)]
    u = quota.quota_usage(q, services, {}, quota.caps([q], services, {}))
    assert (u.reserved, u.in_use, u.remaining, u.exceeded) == (2, 4, 8, False)
    assert u.services == [{"namespace": "ml", "name": "a", "gpusReserved": 2, "gpusMax": 8}]
    api.GPUQuotaStatus.model_validate({"gpusReserved": u.reserved, "services": u.services})


def test_usages_skips_invalid_services():
    good = {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "x", "namespace": "ml"},
            "spec": {"model": {"uri": "hf://a/b"}, "resources": {"gpus": 2},
                     "scaling": {"minReplicas": 1, "maxReplicas": 3, "autoscaler": "keda"}},
            "status": {"readyReplicas": 2}}
    bad = {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "y"}, "spec": {}}
    (u,) = quota.usages([good, bad])
    assert (u.gpus, u.min_replicas, u.max_replicas, u.ready_replicas) == (2, 1, 3, 2)


# ------------------------------------------------------------------------ ResourceQuota
def test_resource_quotas_per_namespace():
    q = parsed(gq("team-a", 12, selector={"matchLabels": {"team": "a"}}))[0]
    labels = {"ml": {"team": "a"}, "ml2": {"team": "a"}, "web": {"team": "b"}}
    rqs = resourcequota.resource_quotas(q, labels, ["nvidia.com/gpu", "amd.com/gpu"])
    assert [r["metadata"]["namespace"] for r in rqs] == ["ml", "ml2"]
    r = rqs[0]
    assert r["metadata"]["name"] == "argosy-gpu-team-a"
    assert r["spec"]["hard"] == {"requests.amd.com/gpu": "12", "requests.nvidia.com/gpu": "12"}
    assert r["metadata"]["ownerReferences"][0]["kind"] == "GPUQuota"
    assert r["metadata"]["labels"][resourcequota.QUOTA_LABEL] == "team-a"


def test_resource_quotas_off_or_tenant_scoped():
    assert resourcequota.resource_quotas(parsed(gq(enforce=False))[0], {}) == []
    assert resourcequota.resource_quotas(parsed(gq(tenant="blue"))[0], {}) == []
    assert [r["metadata"]["namespace"] for r in resourcequota.resource_quotas(parsed(gq())[0], {})] == ["ml"]


def test_resource_quota_validates():
    import kubernetes_validate

    for r in resourcequota.resource_quotas(parsed(gq())[0], {}):
        kubernetes_validate.validate(r, "1.30.0", strict=True)


def test_quota_cel_rules_compile_and_name_declared_fields(qschema):
    rules = list(crdcheck.all_rules(qschema))
    assert len(rules) >= 5
    for _, node, r in rules:
        crdcheck.compile_rule(r["rule"])
        assert crdcheck.undeclared_references(r["rule"], node) == [], r["rule"]
