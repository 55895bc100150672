"""AWQ and GPTQ checkpoints (issue 16) in the layouts AutoAWQ and AutoGPTQ write, made
from the bundled model and packed by those tools' own code (:mod:`tests.quant_tools`);
the oracle is the tools' own dequantization (AutoAWQ's ``dequantize_gemm``, AutoGPTQ's
``QuantLinear`` PyTorch forward) put into Hugging Face ``transformers``' float model,
never Argosy's decoder.

The quantization itself is round-to-nearest with min-max scales (the AWQ and GPTQ
searches choose other scales; the format does not depend on how they were chosen).
GPTQ's act-order is reproduced as AutoGPTQ stores it: each layer's columns are taken in
a random order, grouped in that order, and ``g_idx`` records each column's group;
q/k/v (and gate/up) share one order, as they share their input's statistics in GPTQ.
"""

from __future__ import annotations

import copy
import json
import os
import shutil

import numpy as np
import pytest
import torch

from argosy.runtime.loader import ModelLoadError, load_checkpoint
from argosy.runtime.quantization.int4 import Int4CpuMethod
from argosy.runtime.quantization.q8_0 import Q8Method

from .test_compressed_tensors import _kl, _our_logits

PROMPT = "The capital of France is Paris, and the capital of Italy is"
GROUP = 64  # hidden 576 is not a multiple of 128: AWQ's and GPTQ's default group size cannot be used here


@pytest.fixture(scope="session")
def tools(tmp_path_factory):
    from . import quant_tools

    try:
        return quant_tools.load(tmp_path_factory.mktemp("quant-tools"))
    except Exception as e:  # noqa: BLE001
        if os.environ.get("CI"):
            raise
        pytest.skip(f"AutoAWQ / AutoGPTQ could not be downloaded from PyPI: {e}")


def _qparams(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min-max round-to-nearest parameters of ``w [N, G, g]``: ``(scale [N, G]`` rounded to
    float16, ``zero [N, G]`` integer, ``w`` clamped to what they represent)."""
    maxq = (1 << bits) - 1
    if sym:  # GPTQ's symmetric grid: zero at the middle
        amax = w.abs().amax(-1).clamp(min=1e-6)
        scale = (2 * amax / maxq).half().float()
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
        scale = ((hi - lo).clamp(min=1e-6) / maxq).half().float()
        # 1..maxq, not 0: AutoGPTQ's v1 format stores zero - 1 and wraps a 0 into its neighbours
        zero = torch.round(-lo / scale).clamp(1, maxq)
    w = torch.maximum(torch.minimum(w, ((maxq - zero) * scale)[..., None]), (-zero * scale)[..., None])
    return scale, zero, w


def _pack(vals: torch.Tensor, bits: int, dim: int, order=None) -> torch.Tensor:
    """Unsigned ``vals`` (int64) packed ``32 / bits`` to an int32 word along ``dim`` (0:
    rows, GPTQ's qweight; 1: columns), value ``i`` of a word at bits ``bits * i``, taken
    from position ``order[i]`` of its run (AWQ's interleaving) when given."""
    per = 32 // bits
    v = vals if dim == 1 else vals.t()
    v = v.reshape(v.shape[0], -1, per)
    if order is not None:
        v = v[:, :, list(order)]
    words = (v << (torch.arange(per) * bits)).sum(-1)  # < 2^32
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    return words if dim == 1 else words.t().contiguous()


def _ints(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """``round((w + zero * scale) / scale)`` per element, as both tools' packers compute
    it (float32), with each column's group from ``g_idx``: ``[N, K]`` int64."""
    s, z = scale[:, g_idx.long()], zero[:, g_idx.long()]
    return torch.round((w + z * s) / s).long()


def _awq_layer(tools, lin: torch.nn.Linear, with_tool: bool = False) -> tuple[dict, torch.Tensor]:
    """One layer in AutoAWQ's GEMM layout, and the oracle weight ``[N, K]`` from
    AutoAWQ's ``dequantize_gemm``. Packed here (vectorized); ``with_tool``: by
    ``WQLinear_GEMM.from_linear`` (a Python loop per column: the tests check once that
    both give the same bytes)."""
    n, k = lin.weight.shape
    scale, zero, wq = _qparams(lin.weight.detach().float().view(n, k // GROUP, GROUP), 4, sym=False)
    wq = wq.reshape(n, k)
    if with_tool:
        src = torch.nn.Linear(k, n, bias=False)
        src.weight.data = wq
        q = tools.WQLinear_GEMM.from_linear(src, 4, GROUP, scales=scale.t().contiguous(),
                                            zeros=zero.t().contiguous())
        qweight, qzeros = q.qweight, q.qzeros
    else:
        awq_order = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i of a word holds column awq_order[i] of its eight
        qweight = _pack(_ints(wq, scale, zero, torch.arange(k) // GROUP).t(), 4, 1, awq_order)
        qzeros = _pack(zero.t().long(), 4, 1, awq_order)
    ref = tools.dequantize_gemm(qweight, qzeros, scale.t().contiguous(), 4, GROUP).t()  # float32 scales: exact
    return {"qweight": qweight, "qzeros": qzeros, "scales": scale.t().half().contiguous()}, ref


def _gptq_layer(tools, lin: torch.nn.Linear, bits: int, sym: bool, perm,
                with_tool: bool = False) -> tuple[dict, torch.Tensor]:
    """One layer in AutoGPTQ's layout (``perm``: act-order, the columns' quantization
    order, or None), and the oracle weight ``[N, K]`` from AutoGPTQ's ``QuantLinear``
    PyTorch forward on the identity. Packed here (vectorized); ``with_tool``: by
    ``QuantLinear.pack``."""
    n, k = lin.weight.shape
    w = lin.weight.detach().float()
    order = torch.arange(k) if perm is None else perm
    scale, zero, wq = _qparams(w[:, order].view(n, k // GROUP, GROUP), bits, sym)
    wfull = torch.empty_like(w)
    wfull[:, order] = wq.reshape(n, k)
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = (torch.arange(k) // GROUP).int()
    q = tools.QuantLinear(bits, GROUP, k, n, False, weight_dtype=torch.float32)
    if with_tool:
        src = torch.nn.Linear(k, n, bias=False)
        src.weight.data = wfull
        q.pack(src, scale, zero, g_idx)
    else:
        q.qweight = _pack(_ints(wfull, scale, zero, g_idx).t(), bits, 0)  # [K, N] -> [K * bits / 32, N]
        q.qzeros = _pack((zero.t() - 1).long(), bits, 1)  # the v1 format: zero - 1
        q.scales, q.g_idx = scale.t().contiguous(), g_idx
    with torch.no_grad():
        ref = q(torch.eye(k)).t()  # its PyTorch path: scales[g_idx] * (weight - zeros[g_idx])
    return {"qweight": q.qweight, "qzeros": q.qzeros, "scales": q.scales.half(), "g_idx": q.g_idx.int()}, ref


PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _make(tools, hf_model, tokenizer, out, kind: str):
    """A checkpoint directory of ``kind`` and the oracle model (HF's float model with
    every linear weight replaced by the tool's dequantization)."""
    from safetensors.torch import save_file

    m = copy.deepcopy(hf_model).eval()
    m.hf_quantizer = None
    if hasattr(m.config, "quantization_config"):
        del m.config.quantization_config
    out.mkdir(parents=True, exist_ok=True)
    m.config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    tensors = {k: v.detach().contiguous() for k, v in m.state_dict().items()
               if not (k == "lm_head.weight" and m.config.tie_word_embeddings)}
    gen = torch.Generator().manual_seed(0)
    for i, layer in enumerate(m.model.layers):
        perms = {}
        if kind == "gptq4-actorder":  # one order per input: q/k/v share one, gate/up another
            perms = {"qkv": torch.randperm(576, generator=gen), "o": torch.randperm(576, generator=gen),
                     "gu": torch.randperm(576, generator=gen), "d": torch.randperm(1536, generator=gen)}
        for p in PROJ:
            mod = f"model.layers.{i}.{'self_attn' if p in PROJ[:4] else 'mlp'}.{p}"
            lin = m.get_submodule(mod)
            if kind == "awq":
                parts, ref = _awq_layer(tools, lin)
            else:
                key = {"q": "qkv", "k": "qkv", "v": "qkv", "o": "o", "g": "gu", "u": "gu", "d": "d"}[p[0]]
                parts, ref = _gptq_layer(tools, lin, 8 if kind == "gptq8" else 4, sym=kind == "gptq8",
                                         perm=perms.get(key))
            del tensors[mod + ".weight"]
            tensors.update({f"{mod}.{n}": t.contiguous() for n, t in parts.items()})
            with torch.no_grad():
                lin.weight.copy_(ref)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = (
        {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm",
         "modules_to_not_convert": None} if kind == "awq" else
        {"quant_method": "gptq", "bits": 8 if kind == "gptq8" else 4, "group_size": GROUP,
         "desc_act": kind == "gptq4-actorder", "sym": kind == "gptq8", "static_groups": False,
         "true_sequential": True, "damp_percent": 0.01, "checkpoint_format": "gptq"})
    (out / "config.json").write_text(json.dumps(cfg))
    return str(out), m


KINDS = ("awq", "gptq4-actorder", "gptq8")


@pytest.fixture(scope="module")
def legacy(tools, hf_model, checkpoint, tmp_path_factory):
    """``kind -> (checkpoint directory, oracle model)``: AWQ 4-bit GEMM with zero points,
    GPTQ 4-bit asymmetric act-order, GPTQ 8-bit symmetric; all group size 64."""
    root = tmp_path_factory.mktemp("legacy-quant")
    return {kind: _make(tools, hf_model, checkpoint.tokenizer, root / kind, kind) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_float32_logits_equal_the_tools_dequantization(legacy, checkpoint, kind):
    """float32: every layer decoded to its float weight; the logits are the oracle's
    within the float32 tolerance the dense HF tests use."""
    path, oracle = legacy[kind]
    ids = checkpoint.tokenizer.encode(PROMPT)
    ours, _ = _our_logits(path, ids, "float32")
    with torch.no_grad():
        ref = oracle(torch.tensor([ids])).logits[0].float()
    assert (ours - ref).abs().max().item() < 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_runs_the_quantized_kernels_and_agrees(legacy, checkpoint, kind):
    """bfloat16 on CPU: 4-bit layers hold packed int4 (act-order ones gather their input
    columns first), 8-bit ones grouped int8. The prompt's prefill (more rows than
    ``INT4_MAX_ROWS``) runs the dense bfloat16 copies: its next-token distributions stay
    within the accuracy gate's order of magnitude of the oracle (mean KL < 0.01, top-1
    >= 90%). A decode-sized call runs the kernel, checked on one layer against the dense
    copy (and whole decode steps in the greedy test)."""
    path, oracle = legacy[kind]
    ids = checkpoint.tokenizer.encode(PROMPT * 3)
    ours, model = _our_logits(path, ids, "bfloat16")
    layers = [m for m in model.modules() if type(m).__name__ == "Linear" and hasattr(m, "quant_method")
              and m is not getattr(model, "lm_head", None)]
    assert len(layers) == 4 * 30
    if kind == "gptq8":
        assert all(isinstance(m.quant_method, Q8Method) for m in layers)
    else:
        assert all(isinstance(m.quant_method, Int4CpuMethod) and m.quant_method.group_size == GROUP for m in layers)
        assert all((m.quant_method.perm is not None) == (kind == "gptq4-actorder") for m in layers)
    with torch.no_grad():
        ref = oracle(torch.tensor([ids])).logits[0].float()
    kl, top1 = _kl(ours, ref), (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert kl < 0.01 and top1 >= 0.9, (kl, top1)
    # one layer on its kernel (a decode-sized call) against the same layer dense
    lin = layers[0]
    x = torch.randn(2, lin.in_features, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    torch.testing.assert_close(lin(x).float(), torch.nn.functional.linear(x, lin.dense_weight()).float(), atol=0.06,
                               rtol=0.03)


def test_greedy_decoding_agrees_with_the_oracle(legacy, checkpoint):
    """16 greedy tokens through the engine (bfloat16, packed int4 with act-order) equal
    the oracle's ``generate`` where its top-2 margin is clear (>= 0.5 nats) at every step."""
    from argosy.runtime.config import EngineArgs
    from argosy.runtime.core.engine import LLMEngine
    from argosy.runtime.core.sampling_params import SamplingParams

    from .conftest import run_to_completion

    path, oracle = legacy["gptq4-actorder"]
    ids = checkpoint.tokenizer.encode("Counting: 1, 2, 3, 4, 5, 6, 7, 8, 9,")
    with torch.no_grad():
        out = oracle.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, output_scores=True,
                              return_dict_in_generate=True)
    want = out.sequences[0, len(ids):].tolist()
    margins = [torch.topk(s[0].float().log_softmax(-1), 2).values for s in out.scores]
    clear = 0
    while clear < len(want) and (margins[clear][0] - margins[clear][1]).item() >= 0.5:
        clear += 1
    assert clear >= 4, "the prompt's continuation is not clear enough to compare"
    eng = LLMEngine(EngineArgs(model=path, dtype="bfloat16", max_model_len=256, kv_cache_memory=16 << 20,
                               compilation_config="0"))
    got = run_to_completion(eng, [ids], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))["0"]
    assert got[:clear] == want[:clear], (got, want, clear)


def test_each_tensor_parallel_rank_decodes_its_slice(legacy, checkpoint):
    """TP=3 against TP=1 on the 4-bit formats: column-parallel ranks get the rows of the
    full weight (act-order's permutation with them); row-parallel ranks get whole-group
    columns (AWQ: o_proj 192 = 3 groups of 64), or, for act-order, the dense float
    columns (a range of input features is not a range of its groups)."""
    from pathlib import Path

    from argosy.runtime.loader.hf_loader import _config_json, iter_weights, quant_scheme
    from argosy.runtime.quantization.int4 import Int4Weight

    from .conftest import shard_plan

    for kind in ("awq", "gptq4-actorder"):
        p = Path(legacy[kind][0])
        scheme = quant_scheme(p, _config_json(p))
        full = {n: w for n, w in iter_weights(p, None, True, scheme) if n.endswith("proj.weight")}
        assert len(full) == 210
        for rank in range(3):
            model = shard_plan(checkpoint.config, rank, 3)
            for name, w in iter_weights(p, model.shard_for, True, scheme):
                if name not in full:
                    continue
                dim, start, stop = model.shard_for(name)
                if dim == 0 or kind == "awq":
                    want = full[name].rows(start, stop) if dim == 0 else full[name].cols(start, stop)
                    assert isinstance(w, Int4Weight) and (w.q == want.q).all() and (w.scale == want.scale).all() \
                        and (w.zero == want.zero).all()
                    assert (w.perm is None) == (want.perm is None)
                    if w.perm is not None:
                        assert (w.perm == want.perm).all()
                else:
                    assert isinstance(w, torch.Tensor), name
                    torch.testing.assert_close(w, full[name].dequantize(torch.float32, kernel_rounding=False)
                                               [:, start:stop], rtol=0, atol=0)


def test_quantization_flag_matches_the_checkpoint(legacy):
    from argosy.runtime.config import EngineArgs
    from argosy.runtime.core.engine import LLMEngine

    path = legacy["awq"][0]
    small = dict(model=path, max_model_len=128, kv_cache_memory=8 << 20, compilation_config="0")
    for same in ("awq", "awq_marlin"):  # vLLM's kernel-specific name for the same checkpoints
        assert LLMEngine(EngineArgs(quantization=same, **small)).model_config.quantization == "awq"
    with pytest.raises(ValueError, match="--quantization gptq does not match .* already quantized with awq"):
        LLMEngine(EngineArgs(quantization="gptq", **small))


@pytest.mark.parametrize("kind,change,named", [
    ("awq", {"version": "gemv"}, "awq version 'gemv'"),
    ("awq", {"bits": 3}, "awq with 3-bit"),
    ("awq", {"zero_point": False}, "zero_point: false"),
    ("gptq8", {"bits": 3}, "gptq with 3-bit"),
    ("gptq8", {"checkpoint_format": "gptq_v2"}, "checkpoint_format 'gptq_v2'"),
    ("gptq8", {"group_size": 48}, "group size 48"),
])
def test_unsupported_configs_are_one_error_line(legacy, tmp_path, kind, change, named):
    src = legacy[kind][0]
    for f in os.listdir(src):
        shutil.copy(os.path.join(src, f), tmp_path / f)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"].update(change)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="pre-quantized checkpoint") as e:
        load_checkpoint(str(tmp_path))
    assert named in str(e.value) and "\n" not in str(e.value)


def test_decoding_equals_the_tools_on_odd_layouts(tools):
    """Unit level, against the tools directly: their own packers write the same bytes as
    the fixture's vectorized ones, and Argosy's decoding equals their dequantization
    exactly: GPTQ per-channel (``group_size: -1``) symmetric 4-bit, asymmetric 8-bit,
    group 128, act-order, 8-bit group 32 (the 8-bit decode returns a dense tensor for
    act-order, a grouped int8 weight otherwise); AWQ groups 128 and 64."""
    from argosy.runtime.quantization import gptq_awq

    gen = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(256, 96, bias=False)
    lin.weight.data = torch.randn(96, 256, generator=gen)
    global GROUP
    saved = GROUP
    try:
        for bits, sym, g, perm in ((4, True, 256, None), (8, False, 64, None), (4, False, 128, None),
                                   (4, False, 64, torch.randperm(256, generator=gen)), (8, True, 32, None),
                                   (8, False, 64, torch.randperm(256, generator=gen))):
            GROUP = g
            parts, ref = _gptq_layer(tools, lin, bits, sym, perm, with_tool=True)
            mine, _ = _gptq_layer(tools, lin, bits, sym, perm)
            for name in parts:  # the fixture's vectorized packing writes the tool's bytes
                assert torch.equal(parts[name], mine[name]), (bits, sym, g, name)
            w = gptq_awq.decode_gptq(parts, gptq_awq.GPTQScheme(bits, None if g == 256 else g, perm is not None))
            assert isinstance(w, torch.Tensor) == (bits == 8 and perm is not None)
            got = w if isinstance(w, torch.Tensor) else w.dequantize(torch.float32, kernel_rounding=False)
            torch.testing.assert_close(got, ref, rtol=0, atol=0)
            if perm is None:  # older exports without desc_act leave g_idx out: groups in column order
                scheme = gptq_awq.GPTQScheme(bits, None if g == 256 else g, False)
                bare = {n: t for n, t in parts.items() if n != "g_idx"}
                assert gptq_awq.complete(bare, scheme) and not gptq_awq.complete(bare, gptq_awq.GPTQScheme(
                    bits, None if g == 256 else g, True))
                w2 = gptq_awq.decode_gptq(bare, scheme)
                torch.testing.assert_close(w2.dequantize(torch.float32, kernel_rounding=False), ref, rtol=0, atol=0)
        for g in (128, 64):
            GROUP = g
            parts, ref = _awq_layer(tools, lin, with_tool=True)
            mine, _ = _awq_layer(tools, lin)
            for name in parts:
                assert torch.equal(parts[name], mine[name]), (g, name)
            w = gptq_awq.decode_awq(parts, gptq_awq.AWQScheme(g))
            torch.testing.assert_close(w.dequantize(torch.float32, kernel_rounding=False), ref, rtol=0, atol=0)
    finally:
        GROUP = saved
