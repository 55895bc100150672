"""FP8 weights (issue 16): online ``--quantization fp8`` of a float checkpoint, and the
``torch._scaled_mm`` path FP8 layers take on GPUs.

The oracle is compressed-tensors' own FP8 quantizer (``calculate_qparams`` min-max scale
per output channel, ``fake_quantize``) applied to Hugging Face ``transformers``' float
model of the bundled GGUF: an independent implementation of the same per-channel E4M3
quantization vLLM's online FP8 applies. ``torch._scaled_mm`` also runs on the CPU (20-30x
slower than dense there, so the engine does not use it on the CPU): the tests run the GPU
path's exact calls through it, including a whole engine with the path forced on.
"""

from __future__ import annotations

import copy

import pytest
import torch

from argosy.runtime.quantization.fp8 import Fp8DenseMethod, Fp8ScaledMMMethod
from .test_compressed_tensors import PROMPT, _kl, _our_logits

#: ~1 min on 2 cores (several engines, two checkpoints written by ``transformers``):
#: ``.ci/run`` runs it after the default suite (``pytest -m slow tests/test_fp8.py``)
pytestmark = pytest.mark.slow

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _ct_fake_quantize(w: torch.Tensor, strategy: str = "channel") -> torch.Tensor:
    """compressed-tensors' symmetric FP8 quantize-dequantize of ``w [N, K]``, one min-max
    scale per row (``channel`` for weights, ``token`` for activations)."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    args = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=strategy,
                            dynamic=strategy == "token")
    scale, zp = calculate_qparams(w.amin(-1, keepdim=True), w.amax(-1, keepdim=True), args)
    return fake_quantize(w, scale, zp, args)


@pytest.fixture(scope="module")
def dense_dir(hf_model, checkpoint, tmp_path_factory) -> str:
    """The bundled model as a float32 Hugging Face directory (no quantization_config)."""
    out = tmp_path_factory.mktemp("dense")
    m = copy.deepcopy(hf_model)
    m.hf_quantizer = None
    if hasattr(m.config, "quantization_config"):
        del m.config.quantization_config
    m.save_pretrained(out)
    checkpoint.tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def oracle(hf_model):
    """HF's float32 model with every decoder projection replaced by compressed-tensors'
    FP8 quantize-dequantize (the embeddings / tied LM head stay float, as vLLM leaves them)."""
    m = copy.deepcopy(hf_model).eval()
    n = 0
    with torch.no_grad():
        for name, mod in m.named_modules():
            if name.rpartition(".")[2] in PROJ:
                mod.weight.copy_(_ct_fake_quantize(mod.weight.float()))
                n += 1
    assert n == 7 * m.config.num_hidden_layers
    return m


@pytest.fixture(scope="module")
def w8a8_oracle(oracle):
    """:func:`oracle` with each projection's input also quantized to FP8 per token by
    compressed-tensors (dynamic, min-max): the arithmetic of the ``_scaled_mm`` path."""
    m = copy.deepcopy(oracle)
    for name, mod in m.named_modules():
        if name.rpartition(".")[2] in PROJ:
            mod.register_forward_pre_hook(lambda _m, args: (_ct_fake_quantize(args[0], "token"),))
    return m


def test_quantize_equals_compressed_tensors():
    """Our per-row E4M3 quantization gives compressed-tensors' values bit for bit (scales,
    saturation, rounding), including a zero row and values at the range's edge."""
    from argosy.runtime.quantization.fp8 import Fp8Weight

    torch.manual_seed(0)
    w = torch.randn(48, 80) * torch.logspace(-4, 1, 48)[:, None]
    w[3] = 0.0
    w[5, 7] = 1e4  # one outlier: its row's scale
    q = Fp8Weight.quantize(w)
    assert q.q.dtype == torch.float8_e4m3fn and q.scale.shape == (48,)
    assert torch.equal(q.dequantize(), _ct_fake_quantize(w))
    assert torch.equal(q.rows(8, 16).dequantize(), q.dequantize()[8:16])
    assert torch.equal(q.cols(16, 32).dequantize(), q.dequantize()[:, 16:32])
    assert torch.equal(Fp8Weight.cat([q.rows(0, 20), q.rows(20, 48)]).dequantize(), q.dequantize())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_fp8_linear_is_the_scaled_product(dtype, rows):
    """:func:`fp8_linear` (``torch._scaled_mm``, row-wise scales, the GPU path's call) equals
    the product of the per-token FP8 activations and the FP8 weight computed in float64,
    within the bfloat16 output rounding; with a bias; a zero row stays zero."""
    from argosy.runtime.quantization.fp8 import Fp8Weight, fp8_linear, quantize_per_token

    torch.manual_seed(1)
    w = Fp8Weight.quantize(torch.randn(96, 64) * 0.1)
    x = torch.randn(rows, 64).to(dtype)
    x[0] = 0.0
    bias = torch.randn(96).to(dtype)
    y = fp8_linear(x, w.q, w.scale[None, :], bias)
    assert y.dtype == dtype and y.shape == (rows, 96)
    xq, xs = quantize_per_token(x)
    ref = (xq.double() * xs.double()) @ (w.q.double() * w.scale.double()[:, None]).t() + bias.double()
    torch.testing.assert_close(y.double(), ref, atol=2e-2, rtol=1e-2)
    assert torch.equal(y[0].float(), bias.float())
    # per-token activation quantization is close to the unquantized product
    dense = x.double() @ w.dequantize(torch.float64).t() + bias.double()
    assert ((y.double() - dense).norm() / dense.norm()).item() < 0.05


def test_online_fp8_float32_logits_equal_the_oracle(dense_dir, checkpoint, oracle):
    """``--quantization fp8`` on a float checkpoint in float32 on the CPU: every decoder
    projection holds compressed-tensors' FP8 values, so the logits are the oracle's within
    the float32 tolerance of the dense HF tests, and far from the unquantized model's."""
    ids = checkpoint.tokenizer.encode(PROMPT)
    ours, model = _our_logits(dense_dir, ids, "float32", quantization="fp8")
    layers = [m for m in model.modules() if type(m).__name__ == "Linear"]
    assert layers and all(isinstance(m.quant_method, Fp8DenseMethod) for m in layers)
    with torch.no_grad():
        ref = oracle(torch.tensor([ids])).logits[0].float()
    assert (ours - ref).abs().max().item() < 1e-3
    plain, _ = _our_logits(dense_dir, ids, "float32")
    assert (plain - ref).abs().max().item() > 1e-2  # the quantization is really there


def test_online_fp8_bfloat16_and_the_startup_accounting(dense_dir, checkpoint, oracle):
    """bfloat16 on the CPU: the FP8 layers run dense on their FP8 values (counted as
    "bfloat16 dense copies"), next-token distributions within the accuracy gate of the
    oracle (mean KL < 0.01, top-1 >= 90%)."""
    ids = checkpoint.tokenizer.encode(PROMPT * 3)
    ours, model = _our_logits(dense_dir, ids, "bfloat16", quantization="fp8")
    fmt = model.weight_bytes_by_format
    proj = sum(m.weight.numel() for m in model.modules() if type(m).__name__ == "Linear")
    assert fmt["bfloat16 dense copies"] == 2 * proj and "fp8" not in fmt
    with torch.no_grad():
        ref = oracle(torch.tensor([ids])).logits[0].float()
    kl, top1 = _kl(ours, ref), (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert kl < 0.01 and top1 >= 0.9, (kl, top1)


def test_the_scaled_mm_path_through_the_engine(dense_dir, checkpoint, hf_model, w8a8_oracle, monkeypatch):
    """The GPU path, forced on the CPU: every projection keeps only its FP8 weight and
    scales (1 byte a weight + 4 a row, counted as "fp8"; the dense weight freed) and runs
    ``_scaled_mm`` with per-token FP8 activations.

    Each layer equals the oracle's arithmetic within the bfloat16 output rounding
    (:func:`test_fp8_linear_is_the_scaled_product`), but across 30 layers two runs of
    FP8 activations drift apart by about as much as the activation quantization itself
    costs (an input a rounding apart flips E4M3 roundings, each 1/16 of a value), so the
    whole model is held to: as close to the unquantized model as the oracle quantizing
    weights and activations the same way (within 1.5x; measured 0.041 vs 0.036 nats), and
    within 0.05 nats / 85% top-1 of that oracle (measured 0.026 / 90%). A dropped or wrong
    scale is far outside both."""
    from argosy.runtime.quantization import fp8

    monkeypatch.setattr(fp8, "scaled_mm_supported", lambda device: True)
    ids = checkpoint.tokenizer.encode(PROMPT * 3)
    ours, model = _our_logits(dense_dir, ids, "bfloat16", quantization="fp8")
    layers = [m for m in model.modules() if type(m).__name__ == "Linear"]
    assert layers and all(isinstance(m.quant_method, Fp8ScaledMMMethod) and m.weight.numel() == 0 for m in layers)
    want = sum(m.out_features * m.in_features + 4 * m.out_features for m in layers)
    assert model.weight_bytes_by_format["fp8"] == want
    assert "bfloat16 dense copies" not in model.weight_bytes_by_format
    with torch.no_grad():
        ref = w8a8_oracle(torch.tensor([ids])).logits[0].float()
        dense = hf_model(torch.tensor([ids])).logits[0].float()
    kl, top1 = _kl(ours, ref), (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"_scaled_mm path: KL {kl:.4f} / top-1 {top1:.3f} against the W8A8-FP8 oracle; from the float model "
          f"{_kl(ours, dense):.4f} (the oracle {_kl(ref, dense):.4f})")
    assert _kl(ours, dense) <= 1.5 * _kl(ref, dense)
    assert kl < 0.05 and top1 >= 0.85, (kl, top1)


def test_compressed_tensors_fp8_checkpoint_takes_the_same_path(hf_model, checkpoint, tmp_path, monkeypatch):
    """A compressed-tensors ``float-quantized`` checkpoint (per-channel, dynamic per-token
    activations) arrives as the same FP8 weights: where ``_scaled_mm`` runs its layers keep
    the checkpoint's bytes; a weight-only one stays dense there too."""
    from safetensors import safe_open

    from argosy.runtime.quantization import fp8

    from .test_compressed_tensors import _make

    path = _make(hf_model, checkpoint.tokenizer, tmp_path / "fp8ch", "channel", True, kind="fp8")
    monkeypatch.setattr(fp8, "scaled_mm_supported", lambda device: True)
    _, model = _our_logits(path, checkpoint.tokenizer.encode(PROMPT), "bfloat16")
    down = model.layers[0].mlp.down_proj
    assert isinstance(down.quant_method, Fp8ScaledMMMethod)
    with safe_open(f"{path}/model.safetensors", "pt") as st:
        want = st.get_tensor("model.layers.0.mlp.down_proj.weight")
        scale = st.get_tensor("model.layers.0.mlp.down_proj.weight_scale")
    assert torch.equal(down.quant_method.weight.view(torch.uint8), want.view(torch.uint8))
    torch.testing.assert_close(down.quant_method.scales.flatten(), scale.float().flatten())
    # a weight-only FP8 checkpoint (no input_activations) never quantizes activations: dense
    path = _make(hf_model, checkpoint.tokenizer, tmp_path / "fp8wo", "channel", True, kind="fp8", weight_only=True)
    _, model = _our_logits(path, checkpoint.tokenizer.encode(PROMPT), "bfloat16")
    down = model.layers[0].mlp.down_proj
    assert isinstance(down.quant_method, Fp8DenseMethod)



def test_fp8_flag_errors(make_engine, dense_dir):
    """``--quantization fp8`` on the GGUF (already quantized) is one line naming both;
    a checkpoint method on the float directory names the online one."""
    from argosy.runtime.config import EngineArgs
    from argosy.runtime.core.engine import LLMEngine

    with pytest.raises(ValueError, match="--quantization fp8 does not match .* already quantized with gguf") as e:
        make_engine(quantization="fp8")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="needs a checkpoint quantized with awq .* --quantization fp8"):
        LLMEngine(EngineArgs(model=dense_dir, quantization="awq", max_model_len=128, kv_cache_memory=8 << 20))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_online_fp8_on_cuda(dense_dir, checkpoint, oracle):
    """On a GPU that takes row-wise ``_scaled_mm`` (sm_89+), the layers keep FP8 only and
    agree with the oracle; elsewhere they run dense on the FP8 values."""
    from argosy.runtime.quantization import fp8

    ids = checkpoint.tokenizer.encode(PROMPT * 3)
    ours, model = _our_logits(dense_dir, ids, "bfloat16", quantization="fp8", device="cuda")
    layers = [m for m in model.modules() if type(m).__name__ == "Linear"]
    on_kernel = fp8.scaled_mm_supported(torch.device("cuda"))
    assert all(isinstance(m.quant_method, Fp8ScaledMMMethod if on_kernel else Fp8DenseMethod) for m in layers)
    with torch.no_grad():
        ref = oracle(torch.tensor([ids])).logits[0].float()
    kl, top1 = _kl(ours.cpu(), ref), (ours.cpu().argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert kl < 0.02 and top1 >= 0.9, (kl, top1)


def test_each_tensor_parallel_rank_quantizes_its_shard(dense_dir, checkpoint, hf_model):
    """TP=3 with ``--quantization fp8`` (each rank quantizes what it reads, as vLLM does):
    a column-parallel layer holds rows of the whole layer's FP8 values, a row-parallel one
    the FP8 values of its own columns (their scales from those columns), every value
    compressed-tensors'."""
    from pathlib import Path

    from argosy.runtime.distributed import TPGroup
    from argosy.runtime.loader.hf_loader import iter_weights
    from argosy.runtime.models import LlamaForCausalLM

    layer = hf_model.model.layers[2]
    full = {"q": layer.self_attn.q_proj.weight.float(), "o": layer.self_attn.o_proj.weight.float(),
            "down": layer.mlp.down_proj.weight.float()}
    for rank in range(3):
        model = LlamaForCausalLM(checkpoint.config, torch.float32, torch.device("cpu"), 256, TPGroup(rank, 3))
        model.online_quantization = "fp8"
        model.load_weights(iter_weights(Path(dense_dir), model.shard_for))
        ours = model.layers[2]
        _, start, stop = model.shard_for("model.layers.2.self_attn.q_proj.weight")
        q_rows = ours.self_attn.qkv_proj.weight[: stop - start]
        assert torch.equal(q_rows, _ct_fake_quantize(full["q"])[start:stop])
        for name, lin in (("o", ours.self_attn.o_proj), ("down", ours.mlp.down_proj)):
            dim, start, stop = model.shard_for(f"model.layers.2.{'self_attn.o_proj' if name == 'o' else 'mlp.down_proj'}"
                                               ".weight")
            assert dim == 1 and isinstance(lin.quant_method, Fp8DenseMethod)
            assert torch.equal(lin.weight, _ct_fake_quantize(full[name][:, start:stop].contiguous())), name


@pytest.fixture(scope="module")
def fp8_checkpoints(dense_dir, tmp_path_factory) -> dict[str, str]:
    """``quant_method: fp8`` checkpoints written by ``transformers``' own FP8 quantizer
    (``FineGrainedFP8Config``, the format of the ``*-FP8`` releases): per tensor, 64 x 64
    blocks. (A block size that does not divide a layer's columns makes ``transformers``
    leave that layer in float with an orphan scale, so no per-row block case is made.) Its environment check refuses to
    quantize without a GPU, although the quantization runs on the CPU: the check is
    skipped here, the quantizer itself is unchanged."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, FineGrainedFP8Config
    from transformers.quantizers import quantizer_finegrained_fp8 as qf

    root = tmp_path_factory.mktemp("fp8fmt")
    out = {}
    mp = pytest.MonkeyPatch()
    mp.setattr(qf.FineGrainedFP8HfQuantizer, "validate_environment", lambda self, *a, **k: None)
    try:
        for name, block in (("tensor", None), ("block64", (64, 64))):
            m = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32,
                                                     quantization_config=FineGrainedFP8Config(weight_block_size=block))
            m.save_pretrained(root / name)
            AutoTokenizer.from_pretrained(dense_dir).save_pretrained(root / name)
            out[name] = str(root / name)
    finally:
        mp.undo()
    return out


@pytest.mark.parametrize("which", ["tensor", "block64"])
def test_fp8_format_checkpoints_equal_transformers(fp8_checkpoints, checkpoint, which, monkeypatch):
    """A ``quant_method: fp8`` directory is served with no flag: float32 logits equal
    ``transformers`` loading the same directory (on the CPU it dequantizes the FP8 weights:
    the oracle) within 1e-3; per-tensor and per-row scaled layers arrive as FP8 weights
    (kept as the file's bytes where ``_scaled_mm`` runs), block-scaled ones run dense."""
    from transformers import AutoModelForCausalLM

    from argosy.runtime.quantization import fp8

    path = fp8_checkpoints[which]
    ids = checkpoint.tokenizer.encode(PROMPT)
    ours, model = _our_logits(path, ids, "float32")
    assert model.cfg.quantization == "fp8"
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = m(torch.tensor([ids])).logits[0].float()
    assert (ours - ref).abs().max().item() < 1e-3
    monkeypatch.setattr(fp8, "scaled_mm_supported", lambda device: True)
    _, model = _our_logits(path, ids, "bfloat16", quantization="fp8")
    down, o = model.layers[0].mlp.down_proj, model.layers[0].self_attn.o_proj
    assert isinstance(down.quant_method, Fp8ScaledMMMethod) == isinstance(o.quant_method, Fp8ScaledMMMethod) \
        == (which == "tensor")
    from safetensors import safe_open

    with safe_open(f"{path}/model.safetensors", "pt") as st:
        want = st.get_tensor("model.layers.0.self_attn.o_proj.weight")
    if isinstance(o.quant_method, Fp8ScaledMMMethod):
        assert torch.equal(o.quant_method.weight.view(torch.uint8), want.view(torch.uint8))


def test_fp8_format_refusals(fp8_checkpoints, tmp_path):
    """A malformed ``weight_block_size``, and scales that do not fit the blocks, are one
    error line each; ``--quantization awq`` on an fp8 directory names both methods."""
    import json
    import shutil

    from argosy.runtime.config import EngineArgs
    from argosy.runtime.core.engine import LLMEngine
    from argosy.runtime.loader import ModelLoadError, load_checkpoint

    src = fp8_checkpoints["block64"]
    shutil.copytree(src, tmp_path / "bad")
    cfg = json.loads((tmp_path / "bad" / "config.json").read_text())
    cfg["quantization_config"]["weight_block_size"] = [64]
    (tmp_path / "bad" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="weight_block_size .* is not supported") as e:
        load_checkpoint(str(tmp_path / "bad"))
    assert "\n" not in str(e.value)
    cfg["quantization_config"]["weight_block_size"] = [128, 128]  # the file holds 64 x 64 blocks
    (tmp_path / "bad" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="does not match .* in blocks of 128 x 128"):
        list(load_checkpoint(str(tmp_path / "bad")).weights())
    with pytest.raises(ValueError, match="--quantization awq does not match .* already quantized with fp8"):
        LLMEngine(EngineArgs(model=src, quantization="awq", max_model_len=128, kv_cache_memory=8 << 20))


# ------------------------------------------------------------------ FP8 KV-cache scales
def _kv_fake_quantize(x: torch.Tensor, scale: float) -> torch.Tensor:
    """compressed-tensors' per-tensor FP8 quantize-dequantize of ``x`` with a fixed
    (calibrated, static) ``scale``: what a ``kv_cache_scheme`` does to keys and values."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    args = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="tensor", dynamic=False)
    return fake_quantize(x, torch.tensor([scale], dtype=x.dtype), torch.zeros(1, dtype=torch.float8_e4m3fn), args)


def _hf_with_kv(hf_model, ids: list[int], scales: dict[int, tuple[float, float]] | None = None,
                seen: dict | None = None) -> torch.Tensor:
    """HF's float32 logits with every layer's post-rotary keys and values passed through
    :func:`_kv_fake_quantize` (``scales``: layer -> (k_scale, v_scale)) on their way into the
    cache, as compressed-tensors' hooked KV cache does (``QuantizedKVCache``; its hook does
    not attach to ``transformers`` 5.25's attention, which names the argument ``cache``);
    ``seen`` collects each layer's largest |k| and |v| instead."""
    from transformers import DynamicCache

    class QuantizedCache(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            if seen is not None:
                k, v = seen.get(layer_idx, (0.0, 0.0))
                seen[layer_idx] = (max(k, key_states.abs().max().item()), max(v, value_states.abs().max().item()))
            if scales is not None:
                ks, vs = scales[layer_idx]
                key_states, value_states = _kv_fake_quantize(key_states, ks), _kv_fake_quantize(value_states, vs)
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    with torch.no_grad():
        return hf_model(torch.tensor([ids]), cache=QuantizedCache(config=hf_model.config),
                        use_cache=True).logits[0].float()


@pytest.fixture(scope="module")
def kv_scaled_dir(dense_dir, checkpoint, hf_model, tmp_path_factory):
    """The float directory plus a compressed-tensors ``kv_cache_scheme`` (8-bit float, per
    tensor, static; the config written by compressed-tensors' own ``QuantizationConfig``)
    and each layer's ``self_attn.k_scale`` / ``v_scale``, calibrated as llm-compressor's
    min-max observer does (the largest |k| and |v| the float model produces on a
    calibration text, over 448), then rounded up to a power of two. Returns ``(path, scales)``.

    Why powers of two: with FP8 keys and values in every layer the forward pass is
    chaotic (a 1-ulp difference in one layer flips E4M3 roundings, 1/16 of a value, in the
    next), so two correct implementations that divide by an arbitrary scale in a different
    order end up measurably apart after 30 layers (0.075 in the logits here, against 2.6
    for the quantization itself). A power-of-two scale makes the division exact in both,
    and the whole model comparable within float32 rounding; arbitrary scales are checked
    one attention layer at a time (:func:`test_kv_scales_fold_around_the_attention`)."""
    import math
    import json
    import shutil

    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationStatus
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("kvscaled") / "m"
    shutil.copytree(dense_dir, out)
    seen: dict = {}
    _hf_with_kv(hf_model, checkpoint.tokenizer.encode(PROMPT * 4 + " Rome, Madrid, Berlin and Vienna."), seen=seen)
    f32 = lambda x: torch.tensor(x, dtype=torch.float32).item()  # noqa: E731 - as the file stores them
    pow2 = lambda x: 2.0 ** math.ceil(math.log2(x / 448.0))  # noqa: E731
    scales = {i: (f32(pow2(k)), f32(pow2(v))) for i, (k, v) in seen.items()}
    assert len(set(scales.values())) > 3  # the layers differ
    tensors = load_file(str(out / "model.safetensors"))
    for i, (ks, vs) in scales.items():
        # layer 0 under the names older llm-compressor versions used (k_proj / v_proj
        # output_scale), layer 1 under AutoFP8's (k_proj.k_scale / v_proj.v_scale)
        names = {0: ("k_proj.output_scale", "v_proj.output_scale"),
                 1: ("k_proj.k_scale", "v_proj.v_scale")}.get(i, ("k_scale", "v_scale"))
        tensors[f"model.layers.{i}.self_attn.{names[0]}"] = torch.tensor([ks], dtype=torch.float32)
        tensors[f"model.layers.{i}.self_attn.{names[1]}"] = torch.tensor([vs], dtype=torch.float32)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    qc = QuantizationConfig(config_groups={}, quantization_status=QuantizationStatus.COMPRESSED,
                            kv_cache_scheme=QuantizationArgs(num_bits=8, type="float", symmetric=True,
                                                             strategy="tensor", dynamic=False))
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = json.loads(qc.model_dump_json()) | {"quant_method": "compressed-tensors"}
    (out / "config.json").write_text(json.dumps(cfg))
    return str(out), scales


def test_checkpoint_kv_scales_with_an_fp8_kv_cache(kv_scaled_dir, checkpoint, hf_model):
    """``--kv-cache-dtype fp8`` on a checkpoint with per-tensor KV-cache scales: keys and
    values are stored divided by them and multiplied back on read, so float32 logits equal
    HF's model whose keys and values compressed-tensors quantizes with the same scales,
    within 1e-3; unscaled (1.0, what vLLM uses without scales) is measurably farther from
    it; with the model dtype's KV cache the scales are not used (the float model's logits)."""
    path, scales = kv_scaled_dir
    ids = checkpoint.tokenizer.encode(PROMPT * 2)
    ref = _hf_with_kv(hf_model, ids, scales)
    ours, model = _our_logits(path, ids, "float32", kv_cache_dtype="fp8")
    assert [layer.self_attn.kv_scales for layer in model.layers] == [scales[i] for i in range(len(model.layers))]
    err = (ours - ref).abs().max().item()
    assert err < 1e-3, err
    unscaled = _hf_with_kv(hf_model, ids, {i: (1.0, 1.0) for i in scales})
    assert (unscaled - ref).abs().max().item() > 10 * max(err, 1e-4)
    plain, model = _our_logits(path, ids, "float32")
    assert all(layer.self_attn.kv_scales is None for layer in model.layers)
    with torch.no_grad():
        dense = hf_model(torch.tensor([ids])).logits[0].float()
    assert (plain - dense).abs().max().item() < 1e-3


def test_online_fp8_weights_with_the_checkpoints_kv_scales(kv_scaled_dir, checkpoint, oracle):
    """A checkpoint whose compressed-tensors config quantizes only the KV cache takes
    ``--quantization fp8`` (vLLM refuses it as a method mismatch): the weights are
    quantized at load and the checkpoint's KV scales still apply, so float32 logits equal
    HF's model with compressed-tensors' FP8 weights and its FP8 keys and values, within
    1e-3. Another method is still refused, naming both."""
    from argosy.runtime.config import EngineArgs
    from argosy.runtime.core.engine import LLMEngine

    path, scales = kv_scaled_dir
    ids = checkpoint.tokenizer.encode(PROMPT * 2)
    ours, model = _our_logits(path, ids, "float32", quantization="fp8", kv_cache_dtype="fp8")
    layers = [m for m in model.modules() if type(m).__name__ == "Linear"]
    assert layers and all(isinstance(m.quant_method, Fp8DenseMethod) for m in layers)
    assert [layer.self_attn.kv_scales for layer in model.layers] == [scales[i] for i in range(len(model.layers))]
    ref = _hf_with_kv(oracle, ids, scales)
    assert (ours - ref).abs().max().item() < 1e-3
    with pytest.raises(ValueError, match="--quantization awq does not match .* compressed-tensors"):
        LLMEngine(EngineArgs(model=path, quantization="awq", max_model_len=128, kv_cache_memory=8 << 20))


@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.0195, 0.00134), (2.0, 0.125)])
def test_kv_scales_fold_around_the_attention(scales):
    """One attention layer over an E4M3 paged cache (two blocks, GQA 9/3 heads, a causal
    prompt): with scales ``(s_k, s_v)`` its output equals attention over compressed-tensors'
    per-tensor FP8 quantize-dequantize of the keys and values with those scales, within
    float32 rounding, for arbitrary scales (the engine test uses powers of two)."""
    from argosy.runtime.attention import AttentionMetadata
    from argosy.runtime.config import ModelConfig
    from argosy.runtime.distributed import TPGroup
    from argosy.runtime.models.llama import LlamaAttention

    cfg = ModelConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=1, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=8, head_dim=64)
    attn = LlamaAttention(cfg, torch.float32, torch.device("cpu"), TPGroup())
    attn.kv_scales = None if scales == (1.0, 1.0) else scales
    T, H, Hkv, D, bs = 26, 9, 3, 64, 16
    torch.manual_seed(0)
    q, k, v = torch.randn(T, H, D), torch.randn(T, Hkv, D) * 8, torch.randn(T, Hkv, D) * 0.5
    meta = AttentionMetadata(slot_mapping=torch.arange(T), block_tables=torch.arange(2)[None].int(),
                             seq_lens=torch.tensor([T], dtype=torch.int32),
                             query_start_loc=torch.tensor([0, T], dtype=torch.int32), max_query_len=T,
                             max_seq_len=T, num_decodes=0, seq_lens_cpu=[T], query_lens_cpu=[T])
    cache = torch.zeros(2, 4, bs, Hkv, D, dtype=torch.float8_e4m3fn)
    out = attn.attend(q, k, v, cache, meta)
    kq = _kv_fake_quantize(k, scales[0]).repeat_interleave(H // Hkv, 1)
    vq = _kv_fake_quantize(v, scales[1]).repeat_interleave(H // Hkv, 1)
    p = (torch.einsum("thd,shd->hts", q, kq) * D ** -0.5).masked_fill(~torch.ones(T, T).tril().bool(),
                                                                      float("-inf")).softmax(-1)
    torch.testing.assert_close(out, torch.einsum("hts,shd->thd", p, vq), atol=1e-5, rtol=1e-5)


def test_each_tensor_parallel_rank_reads_the_kv_scales_whole(kv_scaled_dir, checkpoint):
    """TP=3: the per-tensor scales kept under a projection's name (``k_proj.output_scale``)
    are read whole by every rank, not sliced like the projection's weight."""
    from pathlib import Path

    from argosy.runtime.distributed import TPGroup
    from argosy.runtime.loader.hf_loader import iter_weights
    from argosy.runtime.models import LlamaForCausalLM

    path, scales = kv_scaled_dir
    for rank in range(3):
        model = LlamaForCausalLM(checkpoint.config, torch.float32, torch.device("cpu"), 256, TPGroup(rank, 3))
        model.kv_cache_dtype = torch.float8_e4m3fn
        model.load_weights(iter_weights(Path(path), model.shard_for))
        assert [layer.self_attn.kv_scales for layer in model.layers] == [scales[i] for i in range(len(model.layers))]


def test_kv_scales_refusals(kv_scaled_dir, tmp_path):
    """A per-head (not per-tensor) KV scale and a ``kv_cache_scheme`` other than 8-bit float
    per tensor are one clear error each."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from argosy.runtime.loader import ModelLoadError, load_checkpoint

    path, _ = kv_scaled_dir
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["kv_cache_scheme"]["strategy"] = "attn_head"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="kv_cache_scheme .* is not supported .* per tensor"):
        load_checkpoint(str(bad))
    shutil.rmtree(bad)
    shutil.copytree(path, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["model.layers.3.self_attn.k_scale"] = torch.ones(3)
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(Exception, match="only per-tensor FP8 KV-cache scales are supported, got shape \\(3,\\)"):
        _our_logits(str(bad), [1, 2, 3], "float32", kv_cache_dtype="fp8")
