"""The chart's alerts and dashboard (issue 12, observability), checked with the real tools:
``helm template`` renders them, ``promtool check rules`` parses the PrometheusRule and every
dashboard query, and ``promtool test rules`` fires each alert on series fixtures (and
keeps it quiet on healthy ones). promtool comes from the Debian ``prometheus`` package,
which ``.ci/run`` installs for the slow suites; without it these tests skip."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import yaml

from .test_helm import CHART, NAMESPACE, RELEASE, by_kind, run_helm

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package prometheus)")
VALUES = {"monitoring": {"prometheusRule": {"enabled": True, "labels": {"release": "prometheus"}},
                         "grafanaDashboard": {"enabled": True}}}


@pytest.fixture(scope="module")
def rendered(helm_env, tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("monitoring")
    res = run_helm(helm_env, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, values=VALUES, tmp=tmp)
    assert res.returncode == 0, res.stderr
    return [d for d in yaml.safe_load_all(res.stdout) if d]


def test_rendered_only_when_enabled(rendered, helm_env, tmp_path):
    (rule,) = by_kind(rendered, "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert alerts == {"ArgosyQueueDepthHigh", "ArgosyTimeToFirstTokenHigh", "ArgosyEndToEndLatencyHigh",
                      "ArgosyKVCacheNearFull", "ArgosyErrorRateHigh", "ArgosyInferenceServiceNotReady"}
    (cm,) = [c for c in by_kind(rendered, "ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dash = json.loads(cm["data"]["argosy.json"])
    titles = {p["title"] for p in dash["panels"]}
    for want in ("Request rate", "Queue depth", "Time to first token p95", "Generation throughput", "KV-cache usage",
                 "Error rate", "Preemptions", "Prefix-cache hit rate", "Replicas: ready vs desired"):
        assert any(t.startswith(want) for t in titles), want
    res = run_helm(helm_env, "template", RELEASE, str(CHART), "--namespace", NAMESPACE)
    assert "PrometheusRule" not in res.stdout and "grafana_dashboard" not in res.stdout


def _rule_file(rendered, tmp_path):
    (rule,) = by_kind(rendered, "PrometheusRule")
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    return path


@needs_promtool
def test_promtool_checks_the_rules_and_every_dashboard_query(rendered, tmp_path):
    out = subprocess.run([PROMTOOL, "check", "rules", str(_rule_file(rendered, tmp_path))], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    (cm,) = [c for c in by_kind(rendered, "ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]
    dash = json.loads(cm["data"]["argosy.json"])
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    # Grafana variables become matchers promtool can parse
    rules = [{"record": f"argosy:dashboard_query_{i}",
              "expr": e.replace("$namespace", ".*").replace("$service", ".*")} for i, e in enumerate(exprs)]
    qfile = tmp_path / "dashboard.yaml"
    qfile.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = subprocess.run([PROMTOOL, "check", "rules", str(qfile)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_promtool_fires_each_alert_on_fixtures(rendered, tmp_path):
    rules = _rule_file(rendered, tmp_path)
    s = 'namespace="ml",service="llm"'
    # 30 minutes at 1-minute steps
    series = [
        {"series": f"vllm:num_requests_waiting{{{s},pod=\"a\"}}", "values": "30x30"},
        {"series": f"vllm:kv_cache_usage_perc{{{s},pod=\"a\"}}", "values": "0.99x30"},
        # TTFT: every request lands in the le=+Inf bucket only above 5 s
        {"series": f"vllm:time_to_first_token_seconds_bucket{{{s},le=\"5\"}}", "values": "0x30"},
        {"series": f"vllm:time_to_first_token_seconds_bucket{{{s},le=\"+Inf\"}}", "values": "0+10x30"},
        {"series": f"vllm:e2e_request_latency_seconds_bucket{{{s},le=\"100\"}}", "values": "0x30"},
        {"series": f"vllm:e2e_request_latency_seconds_bucket{{{s},le=\"+Inf\"}}", "values": "0+10x30"},
        {"series": f"vllm:request_success_total{{{s},finished_reason=\"error\"}}", "values": "0+5x30"},
        {"series": f"vllm:request_success_total{{{s},finished_reason=\"stop\"}}", "values": "0+5x30"},
        {"series": 'kube_deployment_spec_replicas{namespace="ml",deployment="llm"}', "values": "2x30"},
        {"series": 'kube_deployment_status_replicas_ready{namespace="ml",deployment="llm"}', "values": "0x30"},
        {"series": 'kube_deployment_labels{namespace="ml",deployment="llm",'
                   'label_app_kubernetes_io_managed_by="argosy-operator"}', "values": "1x30"},
        # a healthy service next to it: no alert names it
        {"series": 'vllm:num_requests_waiting{namespace="ml",service="ok",pod="b"}', "values": "1x30"},
        {"series": 'vllm:kv_cache_usage_perc{namespace="ml",service="ok",pod="b"}', "values": "0.3x30"},
    ]
    expected = {
        "ArgosyQueueDepthHigh": {"namespace": "ml", "service": "llm", "severity": "warning"},
        "ArgosyKVCacheNearFull": {"namespace": "ml", "service": "llm", "severity": "warning"},
        "ArgosyTimeToFirstTokenHigh": {"namespace": "ml", "service": "llm", "severity": "warning"},
        "ArgosyEndToEndLatencyHigh": {"namespace": "ml", "service": "llm", "severity": "warning"},
        "ArgosyErrorRateHigh": {"namespace": "ml", "service": "llm", "severity": "critical"},
        "ArgosyInferenceServiceNotReady": {"namespace": "ml", "deployment": "llm", "severity": "critical"},
    }
    # the summaries with the fixtures' values (humanized as Alertmanager shows them)
    summaries = {"ArgosyQueueDepthHigh": "ml/llm: 30 requests waiting", "ArgosyKVCacheNearFull": "ml/llm: KV cache 99% full",
                 "ArgosyTimeToFirstTokenHigh": "ml/llm: TTFT p95 5s",
                 "ArgosyEndToEndLatencyHigh": "ml/llm: request latency p95 1m 40s",
                 "ArgosyErrorRateHigh": "ml/llm: 50% of requests fail", "ArgosyInferenceServiceNotReady": "ml/llm: no ready replica"}
    (rule,) = by_kind(rendered, "PrometheusRule")
    descriptions = {r["alert"]: r["annotations"]["description"] for g in rule["spec"]["groups"] for r in g["rules"]}
    tests = {"rule_files": [str(rules)], "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": series,
        "alert_rule_test": [{"eval_time": "25m", "alertname": name, "exp_alerts": [{
            "exp_labels": labels,
            "exp_annotations": {"summary": summaries[name], "description": descriptions[name]}}]}
            for name, labels in expected.items()]
        + [{"eval_time": "5m", "alertname": "ArgosyQueueDepthHigh", "exp_alerts": []}],  # not yet: for 10m
    }]}
    tfile = tmp_path / "alerts_test.yaml"
    tfile.write_text(yaml.safe_dump(tests))
    out = subprocess.run([PROMTOOL, "test", "rules", str(tfile)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
