"""The Argo CD health check (Lua) for InferenceService, run in a real Lua interpreter (lupa).

The statuses come from :func:`argosy.operator.reconcile.reconcile` itself where possible,
so the script is checked against what the operator actually writes. Every Ready=False
reason reconcile can produce must be classified (Progressing in the script's table, or
Degraded in :data:`DEGRADED_REASONS`), so a new reason forces a decision here.
"""

from __future__ import annotations

import copy
import re
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from argosy.operator import reconcile as rec
from argosy.operator.settings import OperatorSettings

from .conftest import REPO, make_isvc
from .specs import SPECS

lupa = pytest.importorskip("lupa", reason="lupa (Lua in Python, test extra) is not installed")

CHART = REPO / "charts" / "argosy-operator"
SCRIPT = CHART / "argocd" / "health-inferenceservice.lua"
QUOTA_SCRIPT = CHART / "argocd" / "health-gpuquota.lua"
README = CHART / "README.md"
SETTINGS = OperatorSettings()
NOW = datetime(2025, 1, 1, tzinfo=timezone.utc)
#: Ready=False reasons that need a person (or an external fix), not more time.
DEGRADED_REASONS = {"DownloadFailed", "ProgressDeadlineExceeded", "InvalidSpec", "ScaledObjectNotReady",
                    "HPANotActive", "QuotaExceeded", "ProvisioningFailed"}


def health(obj: dict) -> dict:
    """Run the health script on ``obj`` as Argo CD does (global ``obj``, returns ``hs``)."""
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    hs = lua.execute(SCRIPT.read_text())
    return dict(hs.items())


def with_status(obj: dict, observed: dict) -> dict:
    """``obj`` with the status reconcile computes from ``observed`` children."""
    out = copy.deepcopy(obj)
    out["status"] = rec.reconcile(obj, observed, SETTINGS, now=NOW).status
    return out


def live(obj: dict, role: str, status: dict) -> dict:
    m = copy.deepcopy(rec.desired_children(obj, SETTINGS)[role])
    m["metadata"]["generation"] = 1
    m["status"] = status
    return m


def job(obj: dict, **status) -> dict:
    return live(obj, "prefetch", status)


def serving(obj: dict) -> dict:
    """Children of a service whose model is cached and whose Deployment has one available pod."""
    dep = live(obj, "deployment", {"observedGeneration": 1, "replicas": 1, "readyReplicas": 1, "availableReplicas": 1})
    return {"prefetch": job(obj, succeeded=1, conditions=[{"type": "Complete", "status": "True"}]), "deployment": dep}


def test_healthy_when_ready_and_generation_observed():
    obj = make_isvc(SPECS["minimal"], name="chat")
    hs = health(with_status(obj, serving(obj)))
    assert hs["status"] == "Healthy"
    assert "http://chat." in hs["message"]


def test_progressing_when_generation_not_observed():
    obj = make_isvc(SPECS["minimal"])
    healthy = with_status(obj, serving(obj))
    healthy["metadata"]["generation"] = 2  # a spec edit the operator has not reconciled yet
    hs = health(healthy)
    assert hs["status"] == "Progressing" and "generation 2" in hs["message"]


def test_degraded_when_the_download_failed():
    obj = make_isvc(SPECS["minimal"])
    failed = job(obj, failed=4, conditions=[{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                             "message": "Job has reached the specified backoff limit"}])
    out = with_status(obj, {"prefetch": failed})
    assert out["status"]["conditions"][0]["reason"] == "DownloadFailed"
    hs = health(out)
    assert hs["status"] == "Degraded" and "backoff limit" in hs["message"]


@pytest.mark.parametrize("observed", ["nothing", "job-running"])
def test_progressing_while_downloading(observed):
    obj = make_isvc(SPECS["keda"])
    children = {} if observed == "nothing" else {"prefetch": job(obj, active=1)}
    assert health(with_status(obj, children))["status"] == "Progressing"


def test_progressing_without_status_or_ready():
    obj = make_isvc()
    assert health(obj)["status"] == "Progressing"
    obj["status"] = {"observedGeneration": 1, "conditions": []}
    assert health(obj)["status"] == "Progressing"
    obj["status"]["conditions"] = [{"type": "Ready", "status": "Unknown", "reason": "Pending", "message": "m"}]
    assert health(obj)["status"] == "Progressing"


def test_degraded_on_invalid_spec():
    obj = make_isvc({"model": {"uri": "ftp://nope"}})
    hs = health(with_status(obj, {}))
    assert hs["status"] == "Degraded"


def _reconcile_reasons() -> set[str]:
    """Every non-True condition reason literal in reconcile.py (incl. fallbacks like ``or "X"``)."""
    src = Path(rec.__file__).read_text()
    reasons = set(re.findall(r'Cond\("(?:False|Unknown)",\s*"(\w+)"', src))
    for call in re.findall(r'Cond\("(?:False|Unknown)",[^\n]*', src):
        reasons.update(re.findall(r'or "([A-Z]\w+)"', call))
    return reasons


def _script_progressing_reasons() -> set[str]:
    table = re.search(r"local progressing_reasons = \{(.*?)\n\}", SCRIPT.read_text(), re.S).group(1)
    return set(re.findall(r"^\s*(\w+) = true", table, re.M))


def test_every_reason_is_classified():
    reasons = _reconcile_reasons()
    progressing = _script_progressing_reasons()
    assert {"Downloading", "DownloadFailed", "WaitingForModel", "InvalidSpec"} <= reasons  # the regexes work
    assert progressing <= reasons, f"the script lists reasons reconcile never writes: {progressing - reasons}"
    assert not progressing & DEGRADED_REASONS
    assert reasons == progressing | DEGRADED_REASONS, (
        f"classify these Ready=False reasons in {SCRIPT.name}: {reasons - progressing - DEGRADED_REASONS}")
    for reason in sorted(reasons):
        obj = make_isvc()
        obj["status"] = {"observedGeneration": 1,
                         "conditions": [{"type": "Ready", "status": "False", "reason": reason, "message": reason}]}
        want = "Degraded" if reason in DEGRADED_REASONS else "Progressing"
        assert health(obj)["status"] == want, reason


def test_readme_embeds_the_script():
    """The README's Lua block and its argocd-cm example are the script, not a stale copy."""
    text = README.read_text()
    script = SCRIPT.read_text()
    quota_script = QUOTA_SCRIPT.read_text()
    assert re.findall(r"```lua\n(.*?)```", text, re.S) == [script, quota_script]
    (cm_block,) = re.findall(r"```yaml\n(apiVersion: v1\nkind: ConfigMap.*?)```", text, re.S)
    cm = yaml.safe_load(cm_block)
    assert cm["data"]["resource.customizations.health.serving.argosy.dev_InferenceService"] == script
    assert cm["data"]["resource.customizations.health.serving.argosy.dev_GPUQuota"] == quota_script


# ------------------------------------------------------------------------ GPUQuota
def quota_health(obj: dict) -> dict:
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    return dict(lua.execute(QUOTA_SCRIPT.read_text()).items())


def quota_with_status(gpus: int, services: list[tuple[int, int]], generation: int = 1) -> dict:
    """A GPUQuota over namespace ml with the status the operator's accounting computes for
    ``services`` ((minReplicas, gpus) each)."""
    from argosy.operator import api, quota

    obj = {"apiVersion": api.API_VERSION, "kind": "GPUQuota",
           "metadata": {"name": "team-a", "generation": generation}, "spec": {"namespaces": ["ml"], "gpus": gpus}}
    q = api.parse_quota(obj)
    usages = [quota.ServiceUsage("ml", f"s{i}", None, g, None, m, m) for i, (m, g) in enumerate(services)]
    u = quota.quota_usage(q, usages, {})
    exceeded = rec.Cond("True", "OverReserved", "over") if u.exceeded else rec.Cond("False", "WithinQuota", "ok")
    obj["status"] = {"observedGeneration": 1, "gpusReserved": u.reserved, "gpusInUse": u.in_use,
                     "gpusRemaining": u.remaining,
                     "conditions": rec.conditions([("Ready", rec.Cond("True", "Accounted", "")),
                                                   ("Exceeded", exceeded)], [], NOW, 1)}
    return obj


def test_quota_healthy():
    hs = quota_health(quota_with_status(8, [(1, 2), (2, 1)]))
    assert hs["status"] == "Healthy" and "4 of 8 GPUs reserved" in hs["message"]


def test_quota_progressing_on_generation_mismatch_or_no_status():
    assert quota_health(quota_with_status(8, [], generation=2))["status"] == "Progressing"
    obj = quota_with_status(8, [])
    del obj["status"]
    assert quota_health(obj)["status"] == "Progressing"


def test_quota_degraded_when_over_reserved_or_not_ready():
    hs = quota_health(quota_with_status(2, [(2, 2)]))
    assert hs["status"] == "Degraded" and "over" in hs["message"]
    obj = quota_with_status(8, [])
    obj["status"]["conditions"][0].update(status="False", reason="Broken", message="cannot list")
    assert quota_health(obj)["status"] == "Degraded"
