"""The wheel (what Dockerfile.runtime and Dockerfile.operator install, not editable) holds
every Python package of the source tree: pyproject's explicit ``packages`` list names
each directory with an ``__init__.py`` under ``runtime/`` and ``operator/``."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _declared() -> tuple[set[str], dict[str, str]]:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return set(cfg["packages"]), cfg["package-dir"]


def test_every_package_directory_is_in_the_wheel():
    packages, package_dir = _declared()
    missing = []
    for prefix, src in package_dir.items():
        for init in sorted((ROOT / src).rglob("__init__.py")):
            rel = init.parent.relative_to(ROOT / src)
            name = ".".join([prefix, *rel.parts]) if rel.parts else prefix
            if name not in packages:
                missing.append(name)
    assert not missing, f"pyproject.toml [tool.setuptools] packages lacks {missing}"


def test_every_declared_package_exists():
    packages, package_dir = _declared()
    for name in packages:
        prefix = next(p for p in sorted(package_dir, key=len, reverse=True) if name == p or name.startswith(p + "."))
        path = ROOT / package_dir[prefix] / Path(*name[len(prefix):].lstrip(".").split(".") if name != prefix else ())
        assert (path / "__init__.py").is_file(), f"{name}: no {path}/__init__.py"


def test_the_built_wheel_holds_every_source_file(tmp_path):
    """Build the wheel with setuptools (as the images' ``pip install .`` does) and compare its
    file list with the tree: every ``.py`` module and every C++ source or header the kernels
    compile at run time (``csrc/``) is in it, under ``argosy/runtime`` and ``argosy/operator``."""
    # a copy of what the images COPY: no stale build/ of an earlier build leaks into the wheel
    src = tmp_path / "src"
    _, package_dir = _declared()
    for name in ("pyproject.toml", "README.md"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, src / name)
    for folder in package_dir.values():
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("argosy-*.whl")
    held = set(zipfile.ZipFile(wheel).namelist())
    want = []
    for prefix, src in package_dir.items():
        base = ROOT / src
        for f in sorted(base.rglob("*")):
            if f.suffix in (".py", ".cpp", ".h") and "__pycache__" not in f.parts:
                want.append("/".join([*prefix.split("."), *f.relative_to(base).parts]))
    assert len(want) > 100
    missing = [w for w in want if w not in held]
    assert not missing, f"the wheel lacks {missing[:20]} ({len(missing)} files)"
