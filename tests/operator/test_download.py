"""``argosy download`` without network: huggingface_hub.snapshot_download is replaced."""

from __future__ import annotations

import argparse
import json
import os

import huggingface_hub
import pytest

from argosy.runtime import download as dl


@pytest.fixture
def hub(monkeypatch):
    """A fake snapshot_download that records its calls and writes the files asked for."""
    calls = []

    def fake(repo_id, *, revision=None, local_dir=None, token=None, allow_patterns=None, **kw):
        calls.append({"repo_id": repo_id, "revision": revision, "local_dir": local_dir, "token": token,
                      "allow_patterns": allow_patterns})
        names = ["config.json", "model.safetensors"] if allow_patterns == dl.HF_PATTERNS else \
            [p for p in allow_patterns if p != "missing.gguf"]
        for name in names:
            path = os.path.join(local_dir, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(repo_id)
        return local_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return calls


def test_hub_repo_downloads_once(tmp_path, hub):
    dest = str(tmp_path / "m")
    assert dl.download("hf://org/model", dest, revision="v1", token="t") == dest
    assert hub == [{"repo_id": "org/model", "revision": "v1", "local_dir": dest, "token": "t",
                    "allow_patterns": dl.HF_PATTERNS}]
    assert os.path.exists(os.path.join(dest, "model.safetensors"))
    marker = json.loads((tmp_path / "m" / dl.MARKER).read_text())
    assert marker["completed"][0]["uri"] == "hf://org/model" and marker["completed"][0]["revision"] == "v1"
    assert dl.is_complete("hf://org/model", dest, "v1")
    # rerun: the marker matches, nothing is fetched
    assert dl.download("hf://org/model", dest, revision="v1") == dest
    assert len(hub) == 1
    # another revision is another download
    dl.download("hf://org/model", dest, revision="v2")
    assert len(hub) == 2
    assert {e["revision"] for e in json.loads((tmp_path / "m" / dl.MARKER).read_text())["completed"]} == {"v1", "v2"}


def test_single_file(tmp_path, hub):
    dest = str(tmp_path / "repo")
    path = dl.download("hf://org/model-GGUF/sub/model-Q4.gguf", dest)
    assert path == os.path.join(dest, "sub", "model-Q4.gguf") and os.path.exists(path)
    assert hub[0]["allow_patterns"] == ["sub/model-Q4.gguf"] and hub[0]["repo_id"] == "org/model-GGUF"
    # a second file of the same repository in the same directory is its own download
    dl.download("hf://org/model-GGUF/model-Q8.gguf", dest)
    assert len(hub) == 2
    assert dl.download("hf://org/model-GGUF/sub/model-Q4.gguf", dest) == path and len(hub) == 2


def test_missing_file_is_an_error_and_leaves_no_marker(tmp_path, hub):
    with pytest.raises(dl.DownloadError, match="missing.gguf"):
        dl.download("hf://org/model/missing.gguf", str(tmp_path))
    assert not (tmp_path / dl.MARKER).exists()


def test_hub_errors_are_download_errors(tmp_path, monkeypatch):
    def refuse(*a, **kw):
        raise OSError("401 Client Error: Unauthorized\nmore lines")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    with pytest.raises(dl.DownloadError, match="401 Client Error.*HF_TOKEN"):
        dl.download("hf://org/gated", str(tmp_path))
    assert not (tmp_path / dl.MARKER).exists()


def test_pvc_is_a_no_op(tmp_path, hub):
    assert dl.download("pvc://models/llama/8b", str(tmp_path)) == os.path.join(str(tmp_path), "llama", "8b")
    assert dl.download("pvc://models", str(tmp_path)) == str(tmp_path)
    assert hub == [] and not (tmp_path / dl.MARKER).exists()


@pytest.mark.parametrize("uri, match", [
    ("s3://bucket/model", "not supported yet.*pvc://"),
    ("gs://bucket/model", "not supported yet"),
    ("ftp://host/model", "unknown scheme"),
    ("org/model", "not a model URI"),
    ("hf://org", "hf://ORG/NAME"),
    ("hf://org/model/../../etc", "not allowed"),
    ("hf://", "names nothing"),
])
def test_unsupported_uris(tmp_path, hub, uri, match):
    with pytest.raises(dl.UnsupportedURIError, match=match):
        dl.download(uri, str(tmp_path))
    assert hub == []


def _cli(argv):
    parser = argparse.ArgumentParser(prog="argosy")
    sub = parser.add_subparsers(dest="command", required=True)
    dl.add_parser(sub)
    ns = parser.parse_args(argv)
    return ns.func(ns, parser)


def test_cli(tmp_path, hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "secret")
    dest = str(tmp_path / "d")
    assert _cli(["download", "hf://org/model", dest, "--revision", "main"]) == 0
    assert hub[0]["token"] == "secret" and hub[0]["revision"] == "main"
    assert capsys.readouterr().out.strip() == dest
    assert _cli(["download", "hf://org/model", dest, "--revision", "main"]) == 0
    assert "already complete" in capsys.readouterr().err


def test_cli_exit_codes(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert _cli(["download", "s3://bucket/m", str(tmp_path)]) == dl.EXIT_USAGE == 2
    err = capsys.readouterr().err
    assert err.startswith("argosy: error: s3:// models are not supported yet") and err.count("\n") == 1

    def boom(*a, **kw):
        raise RuntimeError("connection reset")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", boom)
    assert _cli(["download", "hf://org/model", str(tmp_path)]) == 1
    assert "connection reset" in capsys.readouterr().err
