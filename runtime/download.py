"""``argosy download URI DIR``: put a model into a directory, once.

The operator's prefetch Job runs this against the model-cache volume, then every server
replica runs ``argosy serve DIR`` from it. Supported URIs:

- ``hf://ORG/NAME`` -- the Hugging Face hub repository's config, tokenizer and
  safetensors weights (``huggingface_hub.snapshot_download`` with its progress bars);
  ``hf://ORG/NAME/PATH`` downloads that one file (e.g. a GGUF) and returns its path. The
  token comes from ``token`` or the ``HF_TOKEN`` environment variable.
- ``pvc://CLAIM/PATH`` -- nothing to do: the claim is mounted at DIR, the model is DIR/PATH.
- ``s3://`` and ``gs://`` -- not supported yet (:class:`UnsupportedURIError`).

A finished download writes ``DIR/.argosy-complete`` (JSON, one entry per URI and
revision); a rerun that finds its entry returns at once, so a Job that is recreated or
retried after success costs nothing. Without the marker a rerun resumes: files already
complete in DIR are not fetched again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Optional

#: Completion marker, relative to DIR.
MARKER = ".argosy-complete"
#: What ``argosy serve`` reads from a Hugging Face model directory.
HF_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]
#: Exit code for a URI that can never be fetched (the operator's Job fails without retrying).
EXIT_USAGE = 2


class DownloadError(RuntimeError):
    """A download failed (network, authentication, missing file); a retry may help."""


class UnsupportedURIError(ValueError):
    """The URI is malformed or its scheme is not supported; a retry will not help."""


def _split(uri: str) -> tuple[str, list[str]]:
    if "://" not in uri:
        raise UnsupportedURIError(f"{uri!r} is not a model URI (hf://ORG/NAME, pvc://CLAIM/PATH, s3://, gs://)")
    scheme, rest = uri.split("://", 1)
    parts = [p for p in rest.split("/") if p]
    if not parts:
        raise UnsupportedURIError(f"{uri!r} names nothing after {scheme}://")
    if any(p in (".", "..") for p in parts):
        raise UnsupportedURIError(f"{uri!r}: '.' and '..' are not allowed in a model URI")
    return scheme, parts


def _read_marker(dest: str) -> list[dict]:
    try:
        with open(os.path.join(dest, MARKER)) as f:
            data = json.load(f)
        return list(data.get("completed", []))
    except (OSError, ValueError, AttributeError):
        return []


def _write_marker(dest: str, entries: list[dict]) -> None:
    # Atomic: a crash leaves the old marker or the new one, never half a file.
    fd, tmp = tempfile.mkstemp(prefix=MARKER, dir=dest)
    with os.fdopen(fd, "w") as f:
        json.dump({"completed": entries}, f, indent=1)
    os.replace(tmp, os.path.join(dest, MARKER))


def is_complete(uri: str, dest: str, revision: Optional[str] = None) -> bool:
    """Whether DIR's marker records a finished download of ``uri`` at ``revision``."""
    return any(e.get("uri") == uri and e.get("revision") == revision for e in _read_marker(dest))


def download(uri: str, dest: str, revision: Optional[str] = None, token: Optional[str] = None) -> str:
    """Download ``uri`` into directory ``dest`` unless the marker says it is already there.

    Args:
        uri: ``hf://ORG/NAME[/PATH]``, ``pvc://CLAIM[/PATH]`` (``s3://``/``gs://`` raise).
        dest: target directory (created if missing).
        revision: hub branch, tag or commit (default: the repository's default branch).
        token: hub token (default: ``HF_TOKEN`` from the environment, via huggingface_hub).

    Returns:
        The local path to pass to ``argosy serve``: ``dest``, or ``dest/PATH`` for a
        single file or a ``pvc://`` path.

    Raises:
        UnsupportedURIError: malformed URI or unsupported scheme.
        DownloadError: the hub refused or the network failed; the file asked for is missing.
    """
    scheme, parts = _split(uri)
    if scheme == "pvc":
        return os.path.join(dest, *parts[1:])
    if scheme in ("s3", "gs"):
        raise UnsupportedURIError(
            f"{scheme}:// models are not supported yet: copy the model onto a PersistentVolumeClaim and use "
            "pvc://CLAIM/PATH (or point cache.existingClaimName at a pre-populated claim with prefetch: false)")
    if scheme != "hf":
        raise UnsupportedURIError(f"unknown scheme {scheme}:// in {uri!r} (use hf://, pvc://)")
    if len(parts) < 2:
        raise UnsupportedURIError(f"{uri!r}: a hub model is hf://ORG/NAME")
    repo, file = "/".join(parts[:2]), "/".join(parts[2:])
    target = os.path.join(dest, file) if file else dest
    if is_complete(uri, dest, revision):
        print(f"argosy download: {uri} already complete in {dest}", file=sys.stderr, flush=True)
        return target

    os.makedirs(dest, exist_ok=True)
    from huggingface_hub import snapshot_download

    print(f"argosy download: {uri} (revision {revision or 'default'}) -> {dest}", file=sys.stderr, flush=True)
    try:
        snapshot_download(repo_id=repo, revision=revision, local_dir=dest, token=token,
                          allow_patterns=[file] if file else HF_PATTERNS)
    except Exception as e:  # huggingface_hub raises many types (HTTP, auth, offline, not found)
        first = str(e).splitlines()[0] if str(e) else ""
        raise DownloadError(f"{uri}: {type(e).__name__}: {first} (gated or private models need HF_TOKEN, from "
                            "the InferenceService's model.credentialsSecretRef)") from e
    if not os.path.exists(target):
        raise DownloadError(f"{uri}: {file!r} is not in {repo} at revision {revision or 'default'}")
    entries = [e for e in _read_marker(dest) if not (e.get("uri") == uri and e.get("revision") == revision)]
    done_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    entries.append({"uri": uri, "revision": revision, "completedAt": done_at})
    _write_marker(dest, entries)
    return target


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``download`` on an ``argparse`` subparsers object; sets ``func`` to :func:`run`."""
    p = subparsers.add_parser(
        "download",
        help="download a model into a directory (once)",
        description="Download URI (hf://ORG/NAME[/FILE]; pvc://CLAIM/PATH is a no-op) into DIR and mark it "
                    "complete, so reruns return at once. The hub token is read from $HF_TOKEN.",
    )
    p.add_argument("uri", metavar="URI", help="model URI")
    p.add_argument("dest", metavar="DIR", help="target directory")
    p.add_argument("--revision", default=None, help="hub branch, tag or commit")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace, parser: Optional[argparse.ArgumentParser] = None) -> int:
    """Run ``argosy download``; prints the model path on stdout.

    Returns:
        0 on success, 1 when the download failed (a retry may help), 2 for an
        unsupported or malformed URI (one ``argosy: error: ...`` line on stderr).
    """
    try:
        path = download(args.uri, args.dest, revision=args.revision, token=os.environ.get("HF_TOKEN") or None)
    except UnsupportedURIError as e:
        print(f"argosy: error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except (DownloadError, OSError) as e:
        print(f"argosy: error: {e}", file=sys.stderr, flush=True)
        return 1
    print(path, flush=True)
    return 0
