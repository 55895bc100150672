"""4-bit GGUF weights executed packed (issue 17): block decoding against the ``gguf``
package's own dequantizer, the packed int4 linear against ``x @ dequantize(W).T`` for
every supported block type at the bundled model's shapes and its tensor-parallel (TP=3)
shards, sharded loading, and the choice between the int4 and dense kernels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from argosy.runtime.layers import INT4_MAX_ROWS, Linear
from argosy.runtime.quantization.gguf import decode_int4
from argosy.runtime.quantization.int4 import Int4CpuMethod, Int4Weight

#: Bundled SmolLM2-135M (hidden 576, 9 heads / 3 KV heads of 64, MLP 1536) linear shapes
#: ``(N, K)``, whole and as one rank's shard at TP=3.
SHAPES = {
    "qkv": (960, 576), "o_proj": (576, 576), "gate_up": (3072, 576), "down": (576, 1536),
    "qkv/3": (320, 576), "o_proj/3": (576, 192), "gate_up/3": (1024, 576), "down/3": (576, 512),
}


def _raw_blocks(type_name: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    """A GGUF tensor's raw bytes: Q4_0/Q4_1 quantized by ``gguf.quants`` from random
    weights; Q4_K (which the package cannot quantize) from random bytes with small
    fp16 super-block scales."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    rng = np.random.default_rng(seed)
    if type_name != "Q4_K":
        w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
        return quantize(w, GGMLQuantizationType[type_name])
    raw = rng.integers(0, 256, (n * k // 256, 144), dtype=np.uint8)
    raw[:, 0:4] = rng.uniform(1e-4, 2e-3, (n * k // 256, 2)).astype(np.float16).view(np.uint8)
    return raw.reshape(n, -1)


def _gguf_dequantize(raw, type_name, n, k) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    return dequantize(raw, GGMLQuantizationType[type_name]).reshape(n, k)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q4_K"])
def test_decoded_blocks_equal_the_gguf_dequantizer(type_name):
    n, k = 64, 512
    raw = _raw_blocks(type_name, n, k)
    w = decode_int4(raw, type_name, (n, k))
    assert w.q.dtype == np.uint8 and w.q.max() <= 15 and w.group_size == 32
    mine = ((w.q.astype(np.float32) - 8).reshape(n, k // 32, 32) * w.scale[..., None]
            + w.zero[..., None]).reshape(n, k)
    ref = _gguf_dequantize(raw, type_name, n, k)
    np.testing.assert_allclose(mine, ref, rtol=0, atol=1e-6 * np.abs(ref).max())


#: Q4_K's 256-value super-blocks only exist where K is a multiple of 256 (llama.cpp
#: stores other tensors in another type), so it gets the shapes with K = 1536 and 512.
CASES = [(t, s) for t in ("Q4_0", "Q4_1", "Q4_K") for s in SHAPES if t != "Q4_K" or SHAPES[s][1] % 256 == 0]


@pytest.mark.parametrize("type_name,shape", CASES, ids=[f"{t}-{s}" for t, s in CASES])
def test_packed_int4_linear_equals_dequantized_matmul(type_name, shape):
    """``Linear`` on the packed kernel = ``x @ W.T`` with ``W`` the GGUF file's own
    dequantization (scales rounded to bfloat16, as the kernel stores them). Tolerance:
    1% of the output's largest magnitude (bfloat16 output and accumulation order)."""
    n, k = SHAPES[shape]
    raw = _raw_blocks(type_name, n, k, seed=n + k)
    w = decode_int4(raw, type_name, (n, k))
    lin = Linear(n, k, False, torch.bfloat16, torch.device("cpu"))
    lin.load_quantized(0, w)
    lin.process_weights_after_loading()
    assert isinstance(lin.quant_method, Int4CpuMethod)
    ref_w = torch.from_numpy(_gguf_dequantize(raw, type_name, n, k))
    # the kernel's scales and zeros are bfloat16: the reference uses the same rounding
    np.testing.assert_allclose(w.dequantize().numpy(), ref_w.numpy(), rtol=0,
                               atol=float(ref_w.abs().max()) * 2**-7)
    x = torch.randn(INT4_MAX_ROWS, k, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    got = lin(x).float()
    want = x.float() @ w.dequantize().t()
    assert (got - want).abs().max() <= 0.01 * want.abs().max(), (got - want).abs().max()
    # and the dense path (more rows) computes the same function
    xx = torch.cat([x] * 4)
    assert xx.shape[0] > INT4_MAX_ROWS
    dense = lin(xx).float()[: x.shape[0]]
    assert (dense - want).abs().max() <= 0.01 * want.abs().max()


def test_int4_kernel_is_used_for_few_rows_and_dense_for_many(monkeypatch):
    from argosy.runtime.quantization import int4 as int4_mod

    n, k = 64, 64
    lin = Linear(n, k, True, torch.bfloat16, torch.device("cpu"))
    lin.load_quantized(0, decode_int4(_raw_blocks("Q4_1", n, k), "Q4_1", (n, k)))
    lin.process_weights_after_loading()
    calls = []
    real = int4_mod.matmul
    monkeypatch.setattr(int4_mod, "matmul", lambda *a: (calls.append(a[0].shape[0]), real(*a))[1])
    lin(torch.zeros(1, k, dtype=torch.bfloat16))
    lin(torch.zeros(INT4_MAX_ROWS, k, dtype=torch.bfloat16))
    lin(torch.zeros(INT4_MAX_ROWS + 1, k, dtype=torch.bfloat16))
    assert calls == [1, INT4_MAX_ROWS]


def test_fused_rows_pack_in_row_order_and_partial_dense_rows_stay_dense():
    k = 64
    parts = [decode_int4(_raw_blocks("Q4_0", n, k, seed=n), "Q4_0", (n, k)) for n in (32, 64, 32)]
    lin = Linear(128, k, False, torch.bfloat16, torch.device("cpu"))
    for start, p in ((96, parts[2]), (0, parts[1]), (64, parts[0])):  # loaded out of row order
        lin.load_quantized(start, p)
    lin.process_weights_after_loading()
    assert isinstance(lin.quant_method, Int4CpuMethod)
    x = torch.randn(1, k).to(torch.bfloat16)
    want = x.float() @ Int4Weight.cat([parts[1], parts[0], parts[2]]).dequantize().t()
    assert (lin(x).float() - want).abs().max() <= 0.01 * want.abs().max()
    half = Linear(128, k, False, torch.bfloat16, torch.device("cpu"))
    half.load_quantized(0, parts[1])  # rows 64.. come as dense tensors
    half.process_weights_after_loading()
    assert half.quant_method is None


def test_column_shard_must_not_split_a_group():
    w = decode_int4(_raw_blocks("Q4_1", 32, 128), "Q4_1", (32, 128))
    assert w.cols(32, 96).shape == (32, 64)
    with pytest.raises(ValueError, match="splits a quantization group"):
        w.cols(16, 80)


def test_sharded_int4_loading_equals_slicing_the_whole(checkpoint, model_path):
    """TP=3 shards of the bundled model's 4-bit tensors, read from the file slice by
    slice, equal the whole tensor decoded and sliced (rows for column-parallel layers,
    32-aligned columns for row-parallel ones), including the q/k row un-permutation."""
    from .conftest import shard_plan

    whole = dict(checkpoint.weights(None, int4=True))
    assert isinstance(whole["model.layers.0.self_attn.q_proj.weight"], Int4Weight)
    assert not isinstance(whole["model.embed_tokens.weight"], Int4Weight)  # Q8_0, looked up
    for rank in range(3):
        model = shard_plan(checkpoint.config, rank, 3)
        shards = dict(checkpoint.weights(model.shard_for, int4=True))
        for name in ("model.layers.3.self_attn.q_proj.weight", "model.layers.3.self_attn.k_proj.weight",
                     "model.layers.3.self_attn.o_proj.weight", "model.layers.3.mlp.down_proj.weight"):
            dim, start, stop = model.shard_for(name)
            full = whole[name]
            want = full.rows(start, stop) if dim == 0 else full.cols(start, stop)
            got = shards[name]
            assert isinstance(got, Int4Weight)
            for a, b in ((got.q, want.q), (got.scale, want.scale), (got.zero, want.zero)):
                np.testing.assert_array_equal(a, b)


def test_each_weight_form_gets_the_method_its_device_and_dtype_run():
    """The registry (``quantization.base.choose_linear_method``) by weight form, dtype and
    device on the CPU: 4-bit -> the packed int4 method; weight-only int8 and grouped int8
    -> their CPU methods in bfloat16, dense in float32 (no method); W8A8 -> the
    ``_int_mm`` method in bfloat16 (no dense weight), its fake-quantized dense form in
    float32; FP8 -> dense on its FP8 values (no ``_scaled_mm`` on the CPU). A decoder
    layer's compile signature tells the methods apart."""
    from argosy.runtime.quantization.fp8 import Fp8DenseMethod, Fp8Weight
    from argosy.runtime.quantization.int8 import Int8CpuMethod, Int8Weight, W8A8Method
    from argosy.runtime.quantization.q8_0 import Q8Method, Q8Weight
    from argosy.runtime.worker.cpu_compile import layer_signature

    from .test_q8_0 import _raw

    n, k = 64, 64
    g = torch.Generator().manual_seed(0)
    q8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    forms = {
        "int4": decode_int4(_raw_blocks("Q4_1", n, k), "Q4_1", (n, k)),
        "int8": Int8Weight(q8, torch.rand(n, generator=g) / 100),
        "w8a8": Int8Weight(q8, torch.rand(n, generator=g) / 100, dynamic_activations=True),
        "q8": Q8Weight.from_gguf(_raw("Q8_0", n, k), (n, k), "Q8_0"),
        "fp8": Fp8Weight.quantize(torch.randn(n, k, generator=g)),
    }
    want = {torch.bfloat16: {"int4": Int4CpuMethod, "int8": Int8CpuMethod, "w8a8": W8A8Method, "q8": Q8Method,
                             "fp8": Fp8DenseMethod},
            torch.float32: {"int4": Int4CpuMethod, "int8": type(None), "w8a8": W8A8Method, "q8": type(None),
                            "fp8": Fp8DenseMethod}}
    for dtype, methods in want.items():
        layers = {}
        for name, w in forms.items():
            lin = layers[name] = Linear(n, k, False, dtype, torch.device("cpu"))
            lin.load_quantized(0, w)
            assert type(lin.quant_method) is methods[name], (dtype, name, lin.quant_method)
            # every layer computes its weight's function, small calls (the kernels) and large
            # ones (the dense copy) alike; float32: the checkpoint's exact values
            want_w = w.dequantize(torch.float32, kernel_rounding=dtype != torch.float32)
            tol = 0.03 if dtype == torch.bfloat16 or name == "w8a8" else 1e-5
            for rows in (3, 24):
                xr = torch.randn(rows, k, generator=g).to(dtype)
                want_y = xr.float() @ want_w.t()
                torch.testing.assert_close(lin(xr).float(), want_y, atol=tol * want_y.abs().max().item(), rtol=0,
                                           msg=lambda m: f"{dtype} {name} {rows} rows: {m}")
        w8a8 = layers["w8a8"]
        assert (w8a8.weight.numel() == 0) == (dtype == torch.bfloat16)
        sigs = {layer_signature(torch.nn.ModuleDict({"proj": lin})) for lin in layers.values()}
        assert len(sigs) == len(set(methods.values()))  # (float32: int8 and q8 both dense)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q4_K"])
def test_int4_embedding_rows_equal_the_dequantized_table(type_name):
    """A 4-bit embedding held packed (``int4.Int4Embedding``): lookups equal the weight's
    own float32-scale dequantization rounded to bfloat16 bit for bit, and the ``gguf``
    package's dequantizer (the format's own tool) within one bfloat16 rounding; rows past
    the weight's (a vocabulary-parallel rank's short slice) are zero; traced by torch.compile."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from argosy.runtime.quantization.int4 import Int4Embedding

    n, k = 300, 512
    raw = _raw_blocks(type_name, n, k, seed=7)
    w = decode_int4(raw, type_name, (n, k))
    emb = Int4Embedding(w, n + 20, torch.bfloat16)
    assert emb.packed.shape == (n + 20, k // 2) and emb.packed.dtype == torch.uint8
    ids = torch.tensor([0, 299, 17, 17, 150, 310])
    got = emb(ids)
    want = w.dequantize(torch.bfloat16, kernel_rounding=False)
    assert got.dtype == torch.bfloat16 and torch.equal(got[:5], want[ids[:5]])
    assert torch.equal(got[5], torch.zeros(k, dtype=torch.bfloat16))
    tool = torch.from_numpy(dequantize(raw, GGMLQuantizationType[type_name]).reshape(n, k).copy())
    torch.testing.assert_close(got[:5].float(), tool[ids[:5]].to(torch.bfloat16).float(), atol=1e-6, rtol=2 ** -8)
    compiled = torch.compile(emb, backend="aot_eager", fullgraph=True, dynamic=True)
    assert torch.equal(compiled(ids), got)
    with pytest.raises(ValueError, match="cannot be held"):
        Int4Embedding(w, n - 1, torch.bfloat16)


def test_an_untied_4bit_embedding_is_held_packed_without_dense_copies(model_path, tmp_path, monkeypatch):
    """A GGUF with a Q4_0 ``token_embd`` and its own ``output.weight``: without dense
    copies the model holds the embedding 4-bit only (0.75 bytes a weight against
    bfloat16's 2), its lookups equal the dense model's bit for bit and its logits equal
    them (same weights otherwise); with dense copies it is a dense bfloat16 table of the
    same values (filled in row blocks); under TP=3 a rank looks up its own vocabulary slice."""
    import os

    from argosy.runtime import cpu_kernels
    from argosy.runtime.distributed import TPGroup
    from argosy.runtime.models import llama
    from argosy.runtime.layers import linear
    from argosy.runtime.loader import load_checkpoint
    from argosy.runtime.models import LlamaForCausalLM
    from argosy.runtime.quantization import dequant
    from argosy.runtime.quantization.int4 import Int4Embedding
    from argosy.runtime.worker.executor import weight_bytes_by_format

    from .gguf_files import requantize_gguf

    if cpu_kernels.compiler() is None and not os.environ.get("CI"):  # under CI a missing kernel fails
        pytest.skip("no C++ compiler to build the dequantization kernel")
    assert dequant.kernel() is not None
    path = str(tmp_path / "q4-embd.gguf")
    requantize_gguf(model_path, path, lambda i, kind: None, embedding="Q4_0", untie=True)
    ckpt = load_checkpoint(path)
    assert not ckpt.config.tie_word_embeddings

    def build(copies, tp=None):
        monkeypatch.setattr(linear, "DENSE_COPIES", copies)
        m = LlamaForCausalLM(ckpt.config, torch.bfloat16, torch.device("cpu"), 256, *([tp] if tp else []))
        m.load_weights(ckpt.weights(m.shard_for, int4=True))
        return m

    dense, lean = build("keep"), build("scratch")
    assert dense.embed_int4 is None and dense.embed_tokens.shape == (49152, 576)
    assert isinstance(lean.embed_int4, Int4Embedding) and lean.embed_tokens.numel() == 0
    fmt = weight_bytes_by_format(lean)
    assert fmt["bfloat16"] < 1 << 20, fmt  # norms and rotary tables only: no dense table
    held, lean.embed_int4 = lean.embed_int4, None
    without = weight_bytes_by_format(lean)
    lean.embed_int4 = held
    assert fmt["int4"] - without["int4"] == 49152 * 576 * 3 // 4  # nibbles + float32 scale and zero per 32
    ids = torch.tensor([0, 1, 5000, 49151, 5000])
    assert torch.equal(lean._embed(ids), dense._embed(ids))
    x = torch.randn(3, 576, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    assert torch.equal(lean.compute_logits(x), dense.compute_logits(x))  # (the Q8_0 head: the kernel, both)
    part = build("scratch", TPGroup(1, 3))  # rank 1 of 3: rows 16,384-32,767
    assert part.embed_int4 is not None and part.embed_int4.packed.shape[0] == 16384
    assert torch.equal(part._embed(torch.tensor([0, 16383])), dense._embed(torch.tensor([16384, 32767])))
    assert lean._embed(torch.zeros(0, dtype=torch.int64)).shape == (0, 576)  # an empty lookup
    # a dense table is filled in row blocks: a block size that does not divide the vocabulary
    monkeypatch.setattr(llama, "EMBEDDING_DEQUANT_ROWS", 5000)
    assert torch.equal(build("keep").embed_tokens, dense.embed_tokens)
