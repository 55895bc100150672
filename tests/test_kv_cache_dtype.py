"""``--kv-cache-dtype fp8`` (issue 16, item 4): one byte a cached value, so twice the
tokens in the same memory; attention widens the blocks it reads to the model dtype.

Oracles: a float64 dense attention over the keys/values rounded to FP8 by PyTorch's own
conversion (the storage step), and the float32 dense model (which equals Hugging Face
``transformers``, tests/test_hf_reference.py) for greedy output.
"""

from __future__ import annotations

import os

import pytest
import torch

from argosy.runtime.attention import AttentionMetadata, DecodeMetadata, cpu_decode, torch_paged
from argosy.runtime.config import EngineArgs, resolve_kv_cache_dtype
from argosy.runtime.quantization.int4 import Int4CpuMethod

from .test_fast_path import assert_greedy_agrees_where_decisive

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]


def _dense(q, k, v, scale):
    """One decode query per sequence: ``q [H, d]``, ``k``/``v [L, Hkv, d]`` -> ``[H, d]`` float64."""
    h, hkv = q.shape[0], k.shape[1]
    k = k.double().repeat_interleave(h // hkv, dim=1)
    v = v.double().repeat_interleave(h // hkv, dim=1)
    p = torch.softmax(torch.einsum("hd,lhd->hl", q.double(), k) * scale, -1)
    return torch.einsum("hl,lhd->hd", p, v)


@pytest.mark.parametrize("cache_dtype", FP8)
def test_fp8_cache_stores_rounded_values_and_attention_reads_them(cache_dtype):
    """Decode rows (eager ``paged_attention`` and the traceable ``decode_attention`` of
    compiled steps) and a prefill chunk over an FP8 cache: the cache holds each value
    as PyTorch rounds it to FP8 (saturated at the type's maximum), and attention equals
    float64 attention over those rounded values, to bfloat16 rounding."""
    g = torch.Generator().manual_seed(0)
    h, hkv, d, bs, nblk = 9, 3, 64, 16, 40
    lens = [37, 5, 64]
    scale = d**-0.5
    ctx = {i: (torch.randn(n, hkv, d, generator=g), torch.randn(n, hkv, d, generator=g)) for i, n in enumerate(lens)}
    ctx[0][0][3, 1, 7] = 1e6  # past either type's range: stored as its maximum
    perm = torch.randperm(nblk, generator=g).tolist()
    tables = [[perm.pop() for _ in range(-(-n // bs))] for n in lens]
    width = max(map(len, tables))
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)

    def slot(i, p):
        return tables[i][p // bs] * bs + p % bs

    cache = torch.zeros(2, nblk, bs, hkv, d, dtype=cache_dtype)
    # everything but each sequence's last token through store_kv (a prefill-shaped write)
    prefix = [(i, p) for i, n in enumerate(lens) for p in range(n - 1)]
    meta = AttentionMetadata(slot_mapping=torch.tensor([slot(i, p) for i, p in prefix]), block_tables=bt,
                             seq_lens=torch.tensor(lens, dtype=torch.int32), query_start_loc=torch.tensor([0, 1]),
                             max_query_len=1, max_seq_len=max(lens), num_decodes=0, seq_lens_cpu=lens,
                             query_lens_cpu=[1] * len(lens))
    keys = torch.stack([ctx[i][0][p] for i, p in prefix]).to(torch.bfloat16)
    vals = torch.stack([ctx[i][1][p] for i, p in prefix]).to(torch.bfloat16)
    torch_paged.store_kv(keys, vals, cache, meta)
    # the last tokens as a decode step writes them (store_kv_decode: the compiled path)
    last = torch.tensor([slot(i, n - 1) for i, n in enumerate(lens)])
    dmeta = DecodeMetadata(slot_mapping=last, block_tables=bt, seq_lens=torch.tensor(lens, dtype=torch.int32))
    torch_paged.store_kv_decode(torch.stack([ctx[i][0][-1] for i in range(3)]).to(torch.bfloat16),
                                torch.stack([ctx[i][1][-1] for i in range(3)]).to(torch.bfloat16), cache, dmeta)
    fmax = torch.finfo(cache_dtype).max
    for i, n in enumerate(lens):
        for which in (0, 1):
            want = ctx[i][which].to(torch.bfloat16).float().clamp(-fmax, fmax).to(cache_dtype)
            got = torch.stack([cache[which, tables[i][p // bs], p % bs] for p in range(n)])
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (i, which)
    assert cache[0, tables[0][0], 3, 1, 7].float() == fmax

    q = torch.randn(3, h, d, generator=g).to(torch.bfloat16)
    ref = torch.stack([_dense(q[i], *(t.to(torch.bfloat16).float().clamp(-fmax, fmax).to(cache_dtype).float()
                                      for t in ctx[i]), scale) for i in range(3)])
    eager_meta = AttentionMetadata(slot_mapping=last, block_tables=bt, seq_lens=torch.tensor(lens, dtype=torch.int32),
                                   query_start_loc=torch.arange(4, dtype=torch.int32), max_query_len=1,
                                   max_seq_len=max(lens), num_decodes=3, seq_lens_cpu=lens, query_lens_cpu=[1] * 3)
    outs = [torch_paged.paged_attention(q, cache, eager_meta, scale, use_kernel=False),
            torch_paged.decode_attention(q, cache, dmeta, scale, use_kernel=False)]
    if cpu_decode.kernel() is not None:  # the C++ kernel widening the FP8 rows itself
        assert torch_paged.use_decode_kernel(q, cache)
        outs.append(torch.ops.argosy.paged_decode_attention(q, cache, bt, dmeta.seq_lens, scale))
        outs.append(torch.ops.argosy.paged_decode_attention(q.float(), cache, bt, dmeta.seq_lens, scale))
    for out in outs:
        assert out.dtype in (torch.bfloat16, torch.float32)
        err = (out.double() - ref).abs().max().item()
        assert err < 3e-2, err
    # a prefill row over the same cache (sequence 2's last token as a 1-token chunk)
    pmeta = AttentionMetadata(slot_mapping=last[2:], block_tables=bt[2:], seq_lens=torch.tensor([64], dtype=torch.int32),
                              query_start_loc=torch.tensor([0, 1], dtype=torch.int32), max_query_len=1, max_seq_len=64,
                              num_decodes=0, seq_lens_cpu=[64], query_lens_cpu=[1])
    err = (torch_paged.paged_attention(q[2:], cache, pmeta, scale).double() - ref[2:]).abs().max().item()
    assert err < 3e-2, err


def test_kv_cache_dtype_names():
    assert resolve_kv_cache_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert resolve_kv_cache_dtype("fp8", torch.bfloat16) == torch.float8_e4m3fn
    assert resolve_kv_cache_dtype("fp8_e5m2", torch.float32) == torch.float8_e5m2
    with pytest.raises(ValueError, match="unknown --kv-cache-dtype 'int4'"):
        resolve_kv_cache_dtype("int4", torch.bfloat16)


@pytest.fixture(scope="module")
def fp8_engine(make_engine):
    return make_engine(dtype="bfloat16", kv_cache_dtype="fp8")


def test_fp8_doubles_the_token_capacity(make_engine, fp8_engine, caplog):
    """Same --kv-cache-memory: twice the blocks, and the model keeps its dtype. The
    startup line gives the KV bytes a token (``2 x layers x kv_heads x head_dim x bytes``
    = 2 x 30 x 3 x 64 x 2) and the weight bytes by format, which add up to all of the
    model's tensors."""
    from argosy.runtime.layers.linear import Linear
    from argosy.runtime.worker.executor import weight_bytes_by_format

    with caplog.at_level("INFO", logger="argosy.engine"):
        bf16 = make_engine(dtype="bfloat16")
    (line,) = [r.getMessage() for r in caplog.records if "bytes a token" in r.getMessage()]
    assert "23040 bytes a token" in line and "int4" in line, line
    model = bf16.executor.runner.model
    by = weight_bytes_by_format(model)
    linears = [m for m in model.modules() if isinstance(m, Linear) and isinstance(m.quant_method, Int4CpuMethod)]
    assert len(linears) == 4 * 30  # q/k/v, o, gate/up, down: Q4_1 in the bundled file
    # packed: half a byte a weight, and as much again as nibbles for the dequantization
    # kernel where no dense copy is kept (ARGOSY_CPU_DENSE_COPIES, layers.linear); scales
    # and zeros: two bfloat16 per group of 32
    assert by["int4"] == sum(m.out_features * m.in_features // 2 * (2 if m.dense_on_demand else 1)
                             + m.out_features * m.in_features // 32 * 4 for m in linears)
    assert by.get("bfloat16 dense copies", 0) == sum(2 * m.out_features * m.in_features for m in linears
                                                     if not m.dense_on_demand)
    assert ("bfloat16 dense copies" in line) == (not linears[0].dense_on_demand), line
    everything = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    assert sum(by.values()) == everything + model.logits_q8.nbytes
    assert fp8_engine.num_blocks == 2 * bf16.num_blocks
    runner = fp8_engine.executor.runner
    assert runner.kv_caches[0].dtype == torch.float8_e4m3fn and runner.model.dtype == torch.bfloat16
    assert runner.decode_kernel or cpu_decode.kernel() is None  # decode rows read the FP8 blocks in place


def test_fp8_greedy_agrees_with_float32_where_decisive(fp8_engine, ref_engine):
    assert_greedy_agrees_where_decisive(fp8_engine, ref_engine)


def test_the_flag_parses_as_vllm_spells_it():
    import argparse

    p = EngineArgs.add_cli_args(argparse.ArgumentParser())
    assert p.parse_args(["--kv-cache-dtype", "fp8"]).kv_cache_dtype == "fp8"
    with pytest.raises(SystemExit):
        p.parse_args(["--kv-cache-dtype", "int8"])


@pytest.fixture(scope="module")
def portable_decode_kernel(tmp_path_factory):
    """The decode kernel built without AVX-512 flags (as on a CPU without AVX-512), once
    for the module (~11 s of compiling): a ``ctypes.CDLL``."""
    import ctypes

    from argosy.runtime import cpu_kernels

    if cpu_kernels.compiler() is None and not os.environ.get("CI"):  # under CI a missing compiler fails
        pytest.skip("no C++ compiler")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_kernels, "isa_flags", lambda: [])
        lib = ctypes.CDLL(str(cpu_decode.KERNEL.build(tmp_path_factory.mktemp("portable"))))
    cpu_decode._declare(lib)
    return lib


@pytest.mark.parametrize("cache_dtype", FP8)
def test_the_decode_kernels_portable_build_widens_fp8_the_same_way(cache_dtype, portable_decode_kernel):
    """Without AVX-512 flags the kernel compiles its scalar FP8 widening (a CPU without
    AVX-512): same attention as the torch path, which widens with PyTorch's own FP8
    conversion; the values cover normals, subnormals (below 2^-6 for E4M3) and zeros."""
    lib = portable_decode_kernel
    g = torch.Generator().manual_seed(5)
    b, h, kvh, d, bs, nb = 3, 9, 3, 64, 16, 12
    vals = torch.randn(2, nb, bs, kvh, d, generator=g) * torch.logspace(-4, 1, d)  # tiny to large
    vals[..., :4] = 0.0
    cache = vals.to(cache_dtype)
    cache[0, 11, 3, 1, 9] = float("nan")  # a NaN the model produced reads back as NaN (sequence 2, token 51)
    bt = torch.arange(12, dtype=torch.int32).view(3, 4)
    lens = torch.tensor([5, 33, 64], dtype=torch.int32)
    q = torch.randn(b, h, d, generator=g).to(torch.bfloat16)
    want = torch_paged.decode_attention(q, cache, DecodeMetadata(slot_mapping=torch.zeros(3, dtype=torch.int64),
                                                                 block_tables=bt, seq_lens=lens),
                                        d**-0.5, use_kernel=False)
    out = torch.empty_like(q)
    fn = getattr(lib, cpu_decode._symbol(torch.bfloat16, cache_dtype))
    assert fn(q.data_ptr(), cache.data_ptr(), bt.data_ptr(), lens.data_ptr(), out.data_ptr(),
              b, h, kvh, d, nb, bs, 4, d**-0.5) == 0
    assert want[2, 3:6].isnan().all() and not want[:2].isnan().any()  # KV head 1 of sequence 2
    torch.testing.assert_close(out.float(), want.float(), atol=3e-2, rtol=2e-2, equal_nan=True)
    if cpu_decode.kernel() is not None:  # the vector build agrees, NaN included
        got = torch.ops.argosy.paged_decode_attention(q, cache, bt, lens, d**-0.5)
        torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=2e-2, equal_nan=True)
