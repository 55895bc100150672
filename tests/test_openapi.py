"""``GET /openapi.json`` and fuzzing every endpoint with ``schemathesis`` (issue 14 item 5)
against a live ``argosy serve``: no 5xx over the generated cases (valid and invalid
bodies), every status documented, every body (errors included: OpenAI's format) valid
against the document."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from argosy.runtime.server.openapi import openapi_document

from .serving import API_KEY, ServerProcess, http_request


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # a short context keeps every generated request cheap (prompt + output <= 64 tokens)
    srv = ServerProcess(tmp_path_factory.mktemp("argosy_openapi"), "openapi", ["--max-model-len", "64"],
                        api_key=API_KEY)
    yield srv
    srv.stop()


def test_openapi_document_is_served(server):
    status, doc = http_request(server, "GET", "/openapi.json", auth=False)
    assert status == 200
    assert doc == openapi_document()
    assert doc["openapi"].startswith("3.1")
    body = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ChatCompletionRequest"}
    chat = doc["components"]["schemas"]["ChatCompletionRequest"]
    for field in ("messages", "response_format", "tools", "tool_choice", "guided_json", "logit_bias"):
        assert field in chat["properties"], field
    assert set(doc["paths"]) >= {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models"}


def test_schemathesis_finds_no_server_error(server, tmp_path):
    st = shutil.which("st") or str(Path(sys.executable).with_name("st"))
    cmd = [st, "run", f"{server.base_url}/openapi.json",
           "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
                       "response_schema_conformance",
           "--phases", "coverage,fuzzing", "--max-examples", "25", "--seed", "7", "--workers", "1",
           "--request-timeout", "60", "-H", f"Authorization: Bearer {API_KEY}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    report = out.stdout + out.stderr
    assert out.returncode == 0, report[-6000:]
    assert " passed" in report and "failures" not in report.split("SUMMARY")[-1], report[-3000:]
