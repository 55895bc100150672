"""Fixtures for end-to-end tests against a real Kubernetes cluster.

Cluster tests run only when ``KUBECONFIG`` names a kubeconfig file; without it every test
that uses :func:`kube` is skipped with the reason. With it, an unreachable cluster is a
failure, not a skip. See ``e2e/README.md``.

The operator is started here as a user would start it (``argosy operator --namespace NS
--standalone --liveness ...``, using the same kubeconfig), watching only the test's fresh
namespace, unless ``ARGOSY_E2E_OPERATOR=deployed`` says one already runs in the cluster
(e.g. installed with the Helm chart) and watches every namespace.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
CRD_FILE = REPO / "crds" / "inferenceservices.serving.argosy.dev.yaml"
EXAMPLES = REPO / "charts" / "argosy-operator" / "examples"
FIELD_MANAGER = "argosy-e2e"

GROUP, VERSION, PLURAL = "serving.argosy.dev", "v1alpha1", "inferenceservices"


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 1.0) -> Any:
    """Call ``check`` until it returns something truthy, and return that; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last_error: Optional[BaseException] = None
    while True:
        try:
            value = check()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - an API hiccup while polling is retried
            last_error = e
        if time.monotonic() > deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)


@dataclass
class Kube:
    """The Kubernetes API clients the tests use."""

    api: Any
    core: Any
    apps: Any
    batch: Any
    policy: Any
    custom: Any
    extensions: Any

    def has_crd(self, name: str) -> bool:
        """Whether the cluster serves the CustomResourceDefinition ``name``."""
        from kubernetes.client.rest import ApiException

        try:
            self.extensions.read_custom_resource_definition(name)
            return True
        except ApiException as e:
            if e.status == 404:
                return False
            raise


@pytest.fixture(scope="session")
def kube() -> Kube:
    """Clients for the cluster ``KUBECONFIG`` points at (skips the test without one)."""
    path = os.environ.get("KUBECONFIG")
    if not path:
        pytest.skip("KUBECONFIG is not set: the operator e2e tests need a real Kubernetes cluster "
                    "(kind or k3d; see e2e/README.md)")
    first = path.split(os.pathsep)[0]
    if not Path(first).is_file():
        pytest.skip(f"KUBECONFIG={path!r} names no file: the operator e2e tests need a real cluster")
    try:
        from kubernetes import client, config
    except ImportError:
        pytest.skip("the kubernetes client is not installed: pip install -e '.[operator]'")
    config.load_kube_config()
    api = client.ApiClient()
    try:
        client.VersionApi(api).get_code(_request_timeout=10)
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"KUBECONFIG is set but the cluster does not answer: {e}")
    return Kube(api=api, core=client.CoreV1Api(api), apps=client.AppsV1Api(api), batch=client.BatchV1Api(api),
                policy=client.PolicyV1Api(api), custom=client.CustomObjectsApi(api),
                extensions=client.ApiextensionsV1Api(api))


@pytest.fixture(scope="session")
def crd(kube: Kube) -> dict:
    """The InferenceService CRD, server-side applied from ``crds/`` and Established."""
    import yaml

    body = yaml.safe_load(CRD_FILE.read_text())
    name = body["metadata"]["name"]
    kube.extensions.patch_custom_resource_definition(
        name, body, field_manager=FIELD_MANAGER, force=True, _content_type="application/apply-patch+yaml")

    def established():
        obj = kube.extensions.read_custom_resource_definition(name)
        return any(c.type == "Established" and c.status == "True" for c in (obj.status.conditions or []))

    wait_for(established, 60, f"CRD {name} to be Established")
    return body


@pytest.fixture
def namespace(kube: Kube, crd: dict):
    """A fresh namespace for one test, deleted afterwards (with whatever is left in it)."""
    from kubernetes import client

    name = f"argosy-e2e-{uuid.uuid4().hex[:8]}"
    kube.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(
        name=name, labels={"app.kubernetes.io/part-of": "argosy-e2e"})))
    yield name
    try:
        kube.core.delete_namespace(name, propagation_policy="Foreground")
    except Exception:  # noqa: BLE001 - best effort; the namespace name is unique per test
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def operator(kube: Kube, namespace: str, tmp_path: Path, request):
    """The operator watching ``namespace``: started here (default) or already deployed."""
    if os.environ.get("ARGOSY_E2E_OPERATOR") == "deployed":
        yield None
        return
    exe = shutil.which("argosy", path=str(Path(sys.executable).parent)) or shutil.which("argosy")
    if exe is None:
        pytest.fail("the argosy command is not installed: pip install -e '.[operator]'")
    port = _free_port()
    env = dict(os.environ)
    # Without the Prometheus Operator's CRDs a ServiceMonitor cannot be applied.
    env.setdefault("ARGOSY_SERVICE_MONITOR",
                   "true" if kube.has_crd("servicemonitors.monitoring.coreos.com") else "false")
    log_path = tmp_path / "operator.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [exe, "operator", "--namespace", namespace, "--standalone", "--liveness",
         f"http://127.0.0.1:{port}/healthz"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def healthy():
        if proc.poll() is not None:
            pytest.fail(f"argosy operator exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            return r.status == 200

    try:
        wait_for(healthy, 60, "the operator's liveness endpoint")
        yield proc
    finally:
        _delete_inference_services(kube, namespace)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            sys.stderr.write(f"\n--- operator log ({log_path}) ---\n{log_path.read_text()[-8000:]}\n")


def _delete_inference_services(kube: Kube, namespace: str) -> None:
    """Delete the InferenceServices a test left behind while the operator still runs (so any
    finalizer of its is removed), and strip finalizers from those that do not go, so the
    namespace can be deleted."""
    def remaining():
        return kube.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]

    try:
        for obj in remaining():
            kube.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, obj["metadata"]["name"])
        deadline = time.monotonic() + 60
        while remaining() and time.monotonic() < deadline:
            time.sleep(1)
        for obj in remaining():
            kube.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, obj["metadata"]["name"],
                                                       {"metadata": {"finalizers": None}},
                                                       _content_type="application/merge-patch+json")
    except Exception:  # noqa: BLE001 - cleanup is best effort
        pass


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item, so fixtures can tell whether the test failed."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
