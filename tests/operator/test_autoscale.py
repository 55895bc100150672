"""The built-in autoscaler's pure decision function."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from argosy.operator import api, autoscale
from argosy.operator.render import scaling
from argosy.operator.settings import OperatorSettings

from .conftest import make_isvc


def inputs(**kw):
    base = dict(current=2, waiting=0.0, kv_usage=0.0, waiting_target=5.0, kv_target=0.8, min_replicas=1,
                max_replicas=10, now=1000.0, window=300.0, up_step=4, down_step=1)
    base.update(kw)
    return autoscale.Inputs(**base)


def test_scale_up_on_waiting_requests():
    d = autoscale.decide(inputs(current=2, waiting=20.0))
    assert (d.desired, d.reason) == (4, "ScaleUp") and "waiting=20" in d.message


def test_kv_usage_target_can_win():
    d = autoscale.decide(inputs(current=2, waiting=1.0, kv_usage=3.0))  # ceil(3 / 0.8) = 4
    assert d.desired == 4


def test_tolerance_keeps_current():
    d = autoscale.decide(inputs(current=4, waiting=21.0))  # 21 / 20 = 1.05, within 10%
    assert (d.desired, d.reason) == (4, "NoChange")


def test_step_limit_up_and_down():
    assert autoscale.decide(inputs(current=1, waiting=100.0)).desired == 5
    assert autoscale.decide(inputs(current=1, waiting=100.0)).reason == "StepLimited"
    d = autoscale.decide(inputs(current=6, waiting=0.0, history=[]))
    assert d.desired == 5 and d.reason == "StepLimited"


def test_bounds_and_quota_cap():
    assert autoscale.decide(inputs(current=2, waiting=200.0, up_step=100)).reason == "LimitedByMax"
    d = autoscale.decide(inputs(current=2, waiting=200.0, up_step=100, quota_cap=3))
    assert (d.desired, d.reason) == (3, "QuotaLimited")
    d = autoscale.decide(inputs(current=8, waiting=200.0, quota_cap=3))  # cap lowered: applies at once
    assert (d.desired, d.reason) == (3, "QuotaLimited")
    d = autoscale.decide(inputs(current=1, waiting=0.0, min_replicas=3))
    assert d.desired == 3


def test_wakes_from_zero_on_any_waiting_request():
    d = autoscale.decide(inputs(current=0, waiting=1.0, min_replicas=0, waiting_target=5.0))
    assert d.desired == 1 and d.reason == "ScaleUp"


def test_stabilization_window_holds_scale_down_until_cooldown():
    history = [(900.0, 4)]
    d = autoscale.decide(inputs(current=4, waiting=0.0, history=history, now=1000.0))
    assert (d.desired, d.reason) == (4, "StabilizingDown")
    assert d.history == [(900.0, 4), (1000.0, 1)]
    d = autoscale.decide(inputs(current=4, waiting=0.0, history=d.history, now=1201.0))  # 900 left the window
    assert (d.desired, d.reason) == (3, "StepLimited")


def test_missing_metrics_hold():
    d = autoscale.decide(inputs(current=3, waiting=None, kv_usage=None))
    assert (d.desired, d.reason) == (3, "MetricsUnavailable")


def test_up_then_down_after_cooldown():
    hist, now, cur = [], 0.0, 1
    for _ in range(5):  # load
        d = autoscale.decide(inputs(current=cur, waiting=40.0, kv_usage=None, history=hist, now=now, window=60))
        hist, cur, now = d.history, d.desired, now + 15
    assert cur == 8
    for _ in range(3):  # idle, inside the window
        d = autoscale.decide(inputs(current=cur, waiting=0.0, kv_usage=0.0, history=hist, now=now, window=60))
        hist, cur, now = d.history, d.desired, now + 15
    assert cur == 8
    for _ in range(20):  # after the cooldown, one step per decision
        d = autoscale.decide(inputs(current=cur, waiting=0.0, kv_usage=0.0, history=hist, now=now, window=60))
        hist, cur, now = d.history, d.desired, now + 15
    assert cur == 1


@settings(max_examples=300, deadline=None)
@given(current=st.integers(0, 20), waiting=st.one_of(st.none(), st.floats(0, 500)),
       kv=st.one_of(st.none(), st.floats(0, 20)), mn=st.integers(0, 5), extra=st.integers(0, 10),
       cap=st.one_of(st.none(), st.integers(0, 15)), up=st.integers(1, 5), down=st.integers(1, 5))
def test_decision_always_within_bounds(current, waiting, kv, mn, extra, cap, up, down):
    i = inputs(current=current, waiting=waiting, kv_usage=kv, min_replicas=mn, max_replicas=mn + extra,
               quota_cap=cap, up_step=up, down_step=down)
    d = autoscale.decide(i)
    upper = mn + extra if cap is None else max(min(mn + extra, cap), mn)
    assert mn <= d.desired <= upper
    if mn <= current <= upper:
        assert current - down <= d.desired <= current + up


def test_queries_are_the_keda_promql():
    isvc = api.parse(make_isvc({"model": {"uri": "hf://a/b"},
                                "scaling": {"autoscaler": "builtin", "minReplicas": 1, "maxReplicas": 4}}))
    s = OperatorSettings()
    q = autoscale.queries(isvc, s)
    assert q[scaling.WAITING_METRIC] == scaling.promql(isvc, s, scaling.WAITING_METRIC)
    assert q[scaling.WAITING_METRIC].startswith("sum(vllm:num_requests_waiting{")

    class FakeProm:
        def custom_query(self, query):
            return [{"metric": {}, "value": [0, "7"]}] if "waiting" in query else []

    assert autoscale.query_metrics(FakeProm(), isvc, s) == (7.0, None)
    i = autoscale.inputs_for(isvc, 1, 7.0, None, now=0, history=[])
    assert (i.min_replicas, i.max_replicas, i.window) == (1, 4, 300.0)


def test_router_pending_requests_wake_the_builtin_autoscaler_from_zero():
    """At zero replicas the engines export nothing; the router's held requests count as
    waiting, so the builtin autoscaler brings a replica back (as the KEDA trigger does)."""
    isvc = api.parse(make_isvc({"model": {"uri": "hf://a/b"}, "router": {"enabled": True},
                                "scaling": {"autoscaler": "builtin", "minReplicas": 0, "maxReplicas": 4}}))
    s = OperatorSettings()

    class AtZero:  # no engine series; the router holds 2 requests
        def custom_query(self, query):
            return [{"metric": {}, "value": [0, "2"]}] if "argosy_router_pending_requests" in query else []

    waiting, kv = autoscale.query_metrics(AtZero(), isvc, s)
    assert (waiting, kv) == (2.0, None)
    d = autoscale.decide(autoscale.inputs_for(isvc, 0, waiting, kv, now=0, history=[]))
    assert d.desired == 1 and d.reason == "ScaleUp"
    no_router = api.parse(make_isvc({"model": {"uri": "hf://a/b"},
                                     "scaling": {"autoscaler": "builtin", "minReplicas": 1, "maxReplicas": 4}}))
    assert autoscale.query_metrics(AtZero(), no_router, s) == (None, None)
    with pytest.raises(ValueError, match="needs router.enabled"):  # nothing would wake it: refused
        api.parse(make_isvc({"model": {"uri": "hf://a/b"},
                             "scaling": {"autoscaler": "builtin", "minReplicas": 0, "maxReplicas": 4}}))


def test_prometheus_adapter_rules_serve_the_hpa_metric_names():
    s = OperatorSettings()
    rules = scaling.prometheus_adapter_rules(s)
    assert [r["name"]["as"] for r in rules] == [s.hpa_waiting_metric, s.hpa_kv_cache_metric]
    hpa = scaling.horizontal_pod_autoscaler(api.parse(make_isvc({
        "model": {"uri": "hf://a/b"}, "scaling": {"autoscaler": "hpa", "minReplicas": 1, "maxReplicas": 3}})), s)
    assert {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]} <= {r["name"]["as"] for r in rules}
    q = scaling.expand_adapter_query(rules[0], "ml", ["a-1", "a-2"], s)
    assert q == 'sum(vllm:num_requests_waiting{namespace="ml",pod=~"a-1|a-2"}) by (pod)'


def test_chart_readme_gives_the_prometheus_adapter_rules_the_hpas_need():
    """The chart README's prometheus-adapter values are the rules the operator's HPAs need
    (a rule renamed in code but not in the README fails here)."""
    import re
    from pathlib import Path

    import yaml

    readme = (Path(__file__).resolve().parents[2] / "charts" / "argosy-operator" / "README.md").read_text()
    block = re.search(r"<!-- prometheus-adapter-values -->\n```yaml\n(.*?)```", readme, re.S)
    assert block, "the README's prometheus-adapter block is missing"
    values = yaml.safe_load(block.group(1))
    assert values["rules"]["custom"] == scaling.prometheus_adapter_rules(OperatorSettings())
