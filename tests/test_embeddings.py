"""Embeddings (issue 14 item 3): ``POST /v1/embeddings`` and ``LLM.embed`` pool the
final hidden states on the serving engine (LAST token, L2-normalized). The oracle is
Hugging Face ``transformers``' Llama on the same GGUF: ``model.model(ids)``'s
``last_hidden_state`` at the last position, normalized."""

from __future__ import annotations

import base64
import struct
from pathlib import Path

import openai
import pytest
import torch

from argosy.runtime.loader import default_model_path

from .serving import API_KEY, ServerProcess, assert_error_body, http_request, scrape

MODEL = Path(default_model_path()).name.removesuffix(".gguf")
HIDDEN = 576
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Kubernetes schedules pods onto nodes.",
         "A short one", "Embeddings map text to vectors; similar texts land close together in that space."]


def _hf_embedding(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        h = hf_model.model(torch.tensor([ids])).last_hidden_state[0, -1].float()
    return torch.nn.functional.normalize(h, dim=0)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("argosy_embed"), "embed", ["--dtype", "float32"], api_key=API_KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.client()


def _ids(server, text: str) -> list[int]:
    status, out = http_request(server, "POST", "/tokenize", {"prompt": text})
    assert status == 200, out
    return out["tokens"]


def test_float32_embeddings_equal_hf(server, client, hf_model):
    """float32 (dense weights, the exact path) against HF on the same ids: equal to 1e-4."""
    r = client.embeddings.create(model=MODEL, input=TEXTS)
    assert [d.index for d in r.data] == list(range(len(TEXTS)))
    ids = [_ids(server, t) for t in TEXTS]
    for d, t_ids in zip(r.data, ids):
        v = torch.tensor(d.embedding)
        assert v.shape == (HIDDEN,)
        assert abs(float(v.norm()) - 1.0) < 1e-5
        ref = _hf_embedding(hf_model, t_ids)
        assert torch.allclose(v, ref, atol=1e-4), float((v - ref).abs().max())
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(len(i) for i in ids)
    # different texts give different vectors; related ones are closer than unrelated ones
    e = torch.tensor([d.embedding for d in r.data])
    assert float(e[0] @ e[1]) < 0.999


def test_batch_single_token_ids_and_base64_agree(server, client):
    batch = client.embeddings.create(model=MODEL, input=TEXTS).data
    for i, t in enumerate(TEXTS):
        single = client.embeddings.create(model=MODEL, input=t).data[0].embedding
        assert torch.allclose(torch.tensor(single), torch.tensor(batch[i].embedding), atol=1e-5)
    ids = _ids(server, TEXTS[1])
    by_ids = client.embeddings.create(model=MODEL, input=[ids]).data[0].embedding
    assert torch.allclose(torch.tensor(by_ids), torch.tensor(batch[1].embedding), atol=1e-5)
    # base64: little-endian float32, as the SDK decodes it (the SDK asks for base64 itself
    # and decodes when encoding_format is not given; ask explicitly and decode here)
    raw = client.embeddings.create(model=MODEL, input=TEXTS[0], encoding_format="base64").data[0].embedding
    if isinstance(raw, str):
        raw = list(struct.unpack(f"<{HIDDEN}f", base64.b64decode(raw)))
    assert torch.allclose(torch.tensor(raw), torch.tensor(batch[0].embedding), atol=1e-6)
    assert client.embeddings.create(model=MODEL, input="x", dimensions=HIDDEN).data[0].embedding


@pytest.mark.parametrize("body, param", [
    ({"input": []}, None),
    ({"input": "hi", "dimensions": 64}, "dimensions"),
    ({"input": [[1, 2], [99999999]]}, "input"),
    ({"input": "hi", "encoding_format": "int8"}, "encoding_format"),
    ({"input": 5}, "input"),
])
def test_bad_embedding_requests_are_400(server, body, param):
    status, out = http_request(server, "POST", "/v1/embeddings", {"model": MODEL, **body})
    err = assert_error_body(out, 400)
    assert status == 400
    if param is not None:
        assert err["param"] == param, err


def test_embeddings_share_the_engine_with_generation(server, client):
    """Embedding and chat requests run side by side; every KV block comes back."""
    import threading

    errors = []

    def chat():
        try:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=16)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=chat) for _ in range(3)]
    for t in threads:
        t.start()
    for _ in range(3):
        assert len(client.embeddings.create(model=MODEL, input=TEXTS).data) == len(TEXTS)
    for t in threads:
        t.join()
    assert not errors
    m = scrape(server)
    assert m["vllm:num_requests_running"] == 0 and m["vllm:kv_cache_usage_perc"] == 0.0


def test_default_dtype_embeddings_close_to_hf(hf_model):
    """The default fast path (bfloat16, packed int4 weights) through ``LLM.embed``:
    cosine similarity to HF's float32 vectors >= 0.99 (measured: 0.995-0.999)."""
    from argosy.runtime.core.llm import LLM

    llm = LLM(max_model_len=512, kv_cache_memory=32 << 20)
    try:
        vecs = llm.embed(TEXTS)
        for t, v in zip(TEXTS, vecs):
            ids = llm.tokenizer.encode(t, add_special_tokens=True)
            cos = float(torch.tensor(v) @ _hf_embedding(hf_model, ids))
            assert cos >= 0.99, (t, cos)
        assert llm.engine.kv.num_free_blocks == llm.engine.num_blocks
    finally:
        llm.engine.shutdown()
