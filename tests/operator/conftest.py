"""Fixtures for the operator's pure core: the generated CRD, example objects, an object factory."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from argosy.operator import api, crdgen

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "charts" / "argosy-operator" / "examples"
EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))


@pytest.fixture(scope="session")
def crd() -> dict:
    return crdgen.crd()


@pytest.fixture(scope="session")
def schema(crd) -> dict:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def make_isvc(spec: dict | None = None, *, name: str = "llm", namespace: str = "ml", uid: str = "uid-1",
              generation: int = 1, **meta) -> dict:
    """An InferenceService object as the API server would return it (spec defaults not applied)."""
    spec = copy.deepcopy(spec) if spec is not None else {"model": {"uri": "hf://HuggingFaceTB/SmolLM2-135M-Instruct"}}
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": name, "namespace": namespace, "uid": uid, "generation": generation, **meta},
        "spec": spec,
    }


def load_example(path: Path) -> dict:
    obj = yaml.safe_load(path.read_text())
    obj.setdefault("metadata", {}).setdefault("namespace", "default")
    obj["metadata"].setdefault("uid", "uid-example")
    obj["metadata"].setdefault("generation", 1)
    return obj


@pytest.fixture(scope="session")
def helm_env(tmp_path_factory) -> dict:
    """Environment for helm: its own cache/config/data folders, nothing from the user's."""
    home = tmp_path_factory.mktemp("helm-home")
    return {"PATH": "/usr/bin:/bin", "HOME": str(home), "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"), "HELM_DATA_HOME": str(home / "data")}
