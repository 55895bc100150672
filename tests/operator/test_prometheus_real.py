"""The operator's PromQL against a real Prometheus scraping a real ``argosy serve`` (loopback only).

Started here: ``argosy serve`` (the bundled model, small KV cache, 4 sequences at most) and
the Debian ``prometheus`` binary with a 1 s scrape of the server's /metrics. The scrape
config's relabeling adds the ``namespace``, ``service`` and ``pod`` labels a ServiceMonitor
scrape would, so the queries the operator renders select this server as they would in a
cluster. Under a bounded burst of concurrent requests (more than ``--max-num-seqs``, so some
wait), the test checks that

- the KEDA trigger queries (also the builtin autoscaler's) and the Prometheus Adapter
  rules' expanded queries return exactly one series for this service, with waiting
  requests seen above 0, and that a query for another service returns nothing;
- the builtin autoscaler, fed through ``prometheus-api-client``, decides to scale up under
  the burst and back down to ``minReplicas`` once it is over and the cooldown has passed.

Slow (a model load, a burst of generations): marked ``slow``.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

import pytest

from ..serving import terminate

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PROMETHEUS = shutil.which("prometheus")
if PROMETHEUS is None:
    pytest.skip("the prometheus binary is not installed (Debian package prometheus)", allow_module_level=True)
prometheus_api_client = pytest.importorskip("prometheus_api_client")
pytest.importorskip("torch", reason="argosy serve needs the runtime extra")

from argosy.operator import api, autoscale  # noqa: E402
from argosy.operator.render import scaling  # noqa: E402
from argosy.operator.settings import OperatorSettings  # noqa: E402

from .conftest import make_isvc  # noqa: E402

NAMESPACE, SERVICE, POD = "ml", "llm", "llm-7d4b9c-x2x9z"
BURST = 12  # concurrent requests: 4 run (--max-num-seqs 4), the rest wait
_LISTEN_RE = re.compile(r"on http://127\.0\.0\.1:(\d+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, body: dict | None = None, timeout: float = 300) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "argosy.runtime.cli", "serve", "--host", "127.0.0.1", "--port", "0",
                             "--max-model-len", "512", "--kv-cache-memory", "128MiB", "--max-num-seqs", "4"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        port = None
        while port is None:
            m = _LISTEN_RE.search(log_path.read_text(errors="replace"))
            if m:
                port = int(m.group(1))
            elif proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"argosy serve did not start:\n{log_path.read_text(errors='replace')[-3000:]}")
            else:
                time.sleep(0.3)
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                urllib.request.urlopen(base + "/health", timeout=5)
                break
            except OSError:
                time.sleep(0.3)
        yield port
    finally:
        terminate(proc)
        log.close()


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    d = tmp_path_factory.mktemp("prom")
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{
            "job_name": "argosy-runtime",
            "metrics_path": "/metrics",
            "static_configs": [{"targets": [f"127.0.0.1:{server}"]}],
            # what a ServiceMonitor scrape adds from the endpoints' metadata
            "relabel_configs": [
                {"target_label": "namespace", "replacement": NAMESPACE},
                {"target_label": "service", "replacement": SERVICE},
                {"target_label": "pod", "replacement": POD},
            ],
        }],
    }
    (d / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    port = free_port()
    log = open(d / "prometheus.log", "wb")
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={d / 'prometheus.yml'}", f"--storage.tsdb.path={d / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                res = http_json(f"{url}/api/v1/query?query=up", timeout=5)["data"]["result"]
                if res and res[0]["value"][1] == "1":
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prometheus did not scrape the server:\n{(d / 'prometheus.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        terminate(proc)
        log.close()


def burst(server_port: int, n: int, done: threading.Event) -> None:
    """``n`` concurrent completions on loopback, each long enough to keep the queue full a while."""
    base = f"http://127.0.0.1:{server_port}"
    model = http_json(base + "/v1/models")["data"][0]["id"]

    def one(i: int) -> None:
        try:
            http_json(base + "/v1/completions", {"model": model, "prompt": f"Count from {i}:", "max_tokens": 96,
                                                  "temperature": 0, "ignore_eos": True})
        except Exception:  # noqa: BLE001 - the queries are what is tested
            pass

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()


def test_rendered_promql_and_builtin_autoscaler_against_real_prometheus(server, prometheus):
    settings = OperatorSettings(prometheus_server_address=prometheus)
    spec = {"model": {"uri": "hf://HuggingFaceTB/SmolLM2-135M-Instruct"},
            "scaling": {"autoscaler": "builtin", "minReplicas": 1, "maxReplicas": 6, "cooldownPeriod": 5,
                        "targets": {"waitingRequests": 2, "kvCacheUsage": 0.8}}}
    isvc = api.parse(make_isvc(spec, name=SERVICE, namespace=NAMESPACE))
    keda_spec = dict(spec, scaling=dict(spec["scaling"], autoscaler="keda"))
    keda = scaling.scaled_object(api.parse(make_isvc(keda_spec, name=SERVICE, namespace=NAMESPACE)), settings)
    keda_queries = {t["name"]: t["metadata"]["query"] for t in keda["spec"]["triggers"]}
    builtin_queries = autoscale.queries(isvc, settings)
    assert set(keda_queries.values()) == set(builtin_queries.values())  # one PromQL for both
    adapter_queries = [scaling.expand_adapter_query(r, NAMESPACE, [POD], settings)
                       for r in scaling.prometheus_adapter_rules(settings)]
    prom = prometheus_api_client.PrometheusConnect(url=prometheus, disable_ssl=True)

    # idle: every query returns exactly this service's series; another service's returns none
    for q in [*keda_queries.values(), *adapter_queries]:
        result = prom.custom_query(q)
        assert len(result) == 1, (q, result)
    for (pod_series,) in [prom.custom_query(q) for q in adapter_queries]:
        assert pod_series["metric"] == {"pod": POD}
    other = api.parse(make_isvc(spec, name="other", namespace=NAMESPACE))
    assert prom.custom_query(scaling.promql(other, settings, scaling.WAITING_METRIC)) == []

    history: list[tuple[float, int]] = []
    current = 1
    decisions = []

    def step() -> autoscale.Decision:
        nonlocal history, current
        waiting, kv = autoscale.query_metrics(prom, isvc, settings)
        d = autoscale.decide(autoscale.inputs_for(isvc, current, waiting, kv, now=time.monotonic(),
                                                  history=history, up_step=4, down_step=2))
        history, current = d.history, d.desired
        decisions.append((round(time.monotonic(), 1), waiting, kv, d.desired, d.reason))
        return d

    done = threading.Event()
    loader = threading.Thread(target=burst, args=(server, BURST, done), daemon=True)
    loader.start()
    peak_waiting, peak_replicas = 0.0, current
    adapter_waiting = 0.0
    while not done.is_set():
        d = step()
        peak_replicas = max(peak_replicas, d.desired)
        peak_waiting = max(peak_waiting, decisions[-1][1] or 0.0)
        (series,) = prom.custom_query(adapter_queries[0])
        adapter_waiting = max(adapter_waiting, float(series["value"][1]))
        time.sleep(1.0)
    loader.join()
    assert peak_waiting > 0, decisions
    assert adapter_waiting > 0, "the Prometheus Adapter query never saw waiting requests"
    assert peak_replicas > 1, f"the builtin autoscaler never scaled up: {decisions}"

    # after the burst: waiting back to 0, and after the 5 s cooldown the decision returns to minReplicas
    deadline = time.monotonic() + 60
    while current > 1:
        assert time.monotonic() < deadline, f"never scaled back down: {decisions}"
        step()
        time.sleep(1.0)
    assert any(r == "StabilizingDown" for *_, r in decisions) or len(decisions) > 2
    assert decisions[-1][3] == 1


_METRIC_RE = re.compile(r"\b((?:vllm|argosy|kube)[a-z0-9_:]*[a-z0-9_])\s*(?=[{\[)\s]|$)")
_THRESHOLD_RE = re.compile(r"\s*>\s*[0-9.eE+-]+\s*$")


def test_chart_dashboard_and_alert_queries_against_real_prometheus(server, prometheus, helm_env, tmp_path):
    """Every query of the chart's Grafana dashboard (its ``$namespace``/``$service``
    variables set to this service) and every alert expression of its PrometheusRule (the
    threshold comparison removed, so the series is there to compare) runs on the real
    Prometheus scraping ``argosy serve``: each succeeds, each runtime query returns exactly
    one series for this service, and each runtime metric name it uses is one the server
    exports. The kube-state-metrics queries (the replica panel, the not-Ready alert) run
    and return nothing here: no kube-state-metrics runs on loopback, so their metric names
    are not checked."""
    from .test_helm import CHART, RELEASE, by_kind, run_helm
    from .test_monitoring import VALUES

    res = run_helm(helm_env, "template", RELEASE, str(CHART), "--namespace", "argosy-system", values=VALUES,
                   tmp=tmp_path)
    assert res.returncode == 0, res.stderr
    import yaml

    rendered = [d for d in yaml.safe_load_all(res.stdout) if d]
    (cm,) = [c for c in by_kind(rendered, "ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]
    dash = json.loads(cm["data"]["argosy.json"])
    panels = [(p["title"], t["expr"].replace("$namespace", NAMESPACE).replace("$service", SERVICE))
              for p in dash["panels"] for t in p["targets"]]
    (rule,) = by_kind(rendered, "PrometheusRule")
    alerts = [(r["alert"], _THRESHOLD_RE.sub("", r["expr"].strip())) for g in rule["spec"]["groups"]
              for r in g["rules"]]
    assert len(panels) >= 9 and len(alerts) >= 6

    # traffic inside the queries' 5 m windows (the same prompt twice: a prefix-cache hit),
    # then two scrapes so the counters' increase is stored
    base = f"http://127.0.0.1:{server}"
    model = http_json(base + "/v1/models")["data"][0]["id"]
    for _ in range(2):
        http_json(base + "/v1/completions", {"model": model, "prompt": "The dashboard of a language model server shows",
                                              "max_tokens": 8, "temperature": 0})
    time.sleep(3)

    exported = set(http_json(f"{prometheus}/api/v1/label/__name__/values")["data"])
    assert "vllm:num_requests_waiting" in exported
    checked = []
    for source, expr in [*(("panel " + t, e) for t, e in panels), *(("alert " + a, e) for a, e in alerts)]:
        names = set(_METRIC_RE.findall(expr))
        assert names, (source, expr)
        body = http_json(f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        assert body["status"] == "success", (source, expr, body)
        result = body["data"]["result"]
        if any(n.startswith("kube_") for n in names):
            assert result == [], (source, result)  # no kube-state-metrics here
            continue
        missing = sorted(n for n in names if n not in exported)
        assert not missing, f"{source}: {missing} not exported by argosy serve"
        assert len(result) == 1, (source, expr, result)
        labels = result[0]["metric"]
        assert labels.get("service") == SERVICE, (source, labels)
        if source.startswith("alert"):
            assert labels.get("namespace") == NAMESPACE, (source, labels)
        checked.append(source)
    print(f"{len(checked)} dashboard and alert queries answered for {NAMESPACE}/{SERVICE}: {checked}")
