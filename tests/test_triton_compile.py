"""The Triton kernels compile for NVIDIA GPUs (cubin via Triton's bundled ptxas), no GPU needed.

The interpreter tests (test_triton_kernels.py) check the kernels' arithmetic on CPU; they
cannot see what only the GPU compiler sees: ops it rejects, shared memory over the
architecture's limit, a constexpr combination that fails to lower. Here every launch the
wrappers make for a model shape is compiled ahead of time for a CUDA target by
:mod:`argosy.runtime.attention.compile_check`.

Each check runs in a child Python process without ``TRITON_INTERPRET``: the root conftest
puts this process in interpreter mode (for the CPU kernel tests), and Triton's
interpreter patches ``triton.language`` at import, so the compiler cannot run in the same
interpreter (it fails with ``'value' object has no attribute 'dtype'``). The child
prints its compiled variants as JSON; the assertions are made here.

Default run: the bundled model's shapes in bf16 (the CUDA default dtype) for sm_90
(H100/H200), ~20 s. Each compiled variant must fit the architecture's shared memory and
spill no registers (the wrappers' tile sizes were chosen so: a spill makes a kernel
several times slower). Slow suite (``ARGOSY_RUN_SLOW=1``): four model shapes (GQA 1, 3, 4,
7; head_dim 64, 128, 256) x bf16/fp16/fp32 for sm_80 and sm_90.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from argosy.runtime.attention import compile_check as cc  # noqa: E402  (no Triton import at module level)

_PRELUDE = """
import dataclasses, importlib, json, sys
import torch
from argosy.runtime.attention import compile_check as cc
tk = importlib.import_module("argosy.runtime.attention.triton_kernels")

def variant(launch, arch):
    try:
        return dataclasses.asdict(cc.compile_launch(launch, arch=arch))
    except Exception as e:  # reported, asserted on by the parent
        return {"name": launch.name, "error": str(e).splitlines()[0]}
"""


def _run_compiled(body: str, tmp_path) -> object:
    """Run ``body`` (after a prelude importing the kernels) in a fresh Python without
    ``TRITON_INTERPRET``; it must print one JSON document as its last line."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = textwrap.dedent(_PRELUDE) + textwrap.dedent(body)
    # cwd: a scratch folder, so that neither the repository's operator/ nor tests/operator
    # can shadow the standard library's operator module in the child
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, f"compile child failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_bundled_model_kernels_compile_for_hopper(tmp_path):
    out = _run_compiled("""
        launches = cc.unique(cc.record_launches(tk, cc.SHAPES["smollm2-135m"], torch.bfloat16))
        print(json.dumps({"names": [la.name for la in launches],
                          "attn": [{k: v for k, v in la.kwargs.items() if k in ("BLOCK_M", "DOT_FP32")}
                                   for la in launches if la.name == "_paged_attention_kernel"],
                          "variants": [variant(la, 90) for la in launches]}))
    """, tmp_path)
    # every kernel is exercised: mixed-step and decode attention tiles, split-KV pair,
    # RMSNorm with and without residual, KV store, rotary
    assert sorted(set(out["names"])) == sorted(cc.KERNELS)
    assert sorted(k["BLOCK_M"] for k in out["attn"]) == [16, 64]
    assert all(k["DOT_FP32"] is False for k in out["attn"])  # 16-bit MMA operands, as on the GPU
    assert len(out["names"]) == 8
    for v in out["variants"]:
        assert "error" not in v, v
        assert v["cubin_bytes"] > 0 and v["registers"] > 0, v
        assert v["shared_bytes"] <= cc.MAX_SHARED_BYTES[90], v
        assert v["spill_bytes"] == 0, v  # the wrappers' tiles fit the register file
        assert "*bf16" in v["signature"].values(), v["signature"]  # compiled for bf16 tensors


def test_w4a16_gemm_compiles_for_hopper(tmp_path):
    """The W4A16 GEMM (issue 16) for the bundled model's four linear shapes in bf16: every
    tile choice and both group sizes compile for sm_90, fit its shared memory and spill
    no registers."""
    out = _run_compiled("""
        launches = cc.unique(cc.record_w4a16_launches(cc.SHAPES["smollm2-135m"], torch.bfloat16))
        print(json.dumps([variant(la, 90) for la in launches]))
    """, tmp_path)
    tiles = {(v["constexprs"]["BLOCK_M"], v["constexprs"]["BLOCK_N"]) for v in out}
    assert tiles == {(16, 64), (32, 64), (64, 64), (64, 128)}
    assert {v["constexprs"]["GROUP_SIZE"] for v in out} == {64, 128}
    for v in out:
        assert "error" not in v, v
        assert v["constexprs"]["DOT_FP32"] is False, v  # 16-bit MMA operands, as on the GPU
        assert v["shared_bytes"] <= cc.MAX_SHARED_BYTES[90] and v["spill_bytes"] == 0, v


@pytest.mark.parametrize("arch", [80, 90])
def test_fp8_cache_kernels_compile(arch, tmp_path):
    """``--kv-cache-dtype fp8`` (E4M3 and E5M2) on the bundled model in bf16: the byte
    copy and the attention kernels that widen FP8 in registers compile for sm_80 too
    (which has no E4M3 conversion instruction: the widening is integer arithmetic),
    fit shared memory and spill nothing."""
    out = _run_compiled(f"""
        rows = []
        for kv in (torch.float8_e4m3fn, torch.float8_e5m2):
            launches = [la for la in cc.record_launches(tk, cc.SHAPES["smollm2-135m"], torch.bfloat16,
                                                        kv_cache_dtype=kv)
                        if la.name in ("_store_kv_kernel", "_paged_attention_kernel", "_paged_decode_split_kernel")]
            rows += [variant(la, {arch}) for la in cc.unique(launches)]
        print(json.dumps(rows))
    """, tmp_path)
    assert {v["constexprs"].get("KV_FP8") for v in out if "KV_FP8" in v.get("constexprs", {})} == {1, 2}
    assert len(out) >= 7
    for v in out:
        assert "error" not in v, v
        assert v["shared_bytes"] <= cc.MAX_SHARED_BYTES[arch] and v["spill_bytes"] == 0, v


def test_tile_over_the_shared_memory_limit_is_reported(tmp_path):
    """The check can fail: 64 x 128 bf16 tiles at head_dim 256 need more shared memory
    (~290 KB) than an H100 block may use (227 KB), and the compiled variant says so."""
    out = _run_compiled("""
        shape = cc.ModelShape(heads=2, kv_heads=2, head_dim=256, hidden=256)
        q, k, v, cache, meta = cc._step(shape, torch.bfloat16, 16, [(0, 130)])
        with cc.recording(tk) as launches:
            tk.paged_attention(q, cache, meta, 0.0625, block_m=64, block_n=128)
        print(json.dumps([variant(la, 90) for la in launches]))
    """, tmp_path)
    (variant,) = out
    assert "error" not in variant, variant
    assert variant["shared_bytes"] > cc.MAX_SHARED_BYTES[90]


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_every_shape_and_dtype_compiles(arch, tmp_path):
    rows = _run_compiled(f"""
        rows = []
        for name, shape in cc.SHAPES.items():
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                launches = cc.record_launches(tk, shape, dtype)
                if dtype != torch.float32:  # the W4A16 GEMM runs float16 / bfloat16 layers
                    launches += cc.record_w4a16_launches(shape, dtype)
                    for kv in (torch.float8_e4m3fn, torch.float8_e5m2):  # --kv-cache-dtype fp8
                        launches += [la for la in cc.record_launches(tk, shape, dtype, kv_cache_dtype=kv)
                                     if la.name != "_rms_norm_kernel" and la.name != "_rotary_kernel"]
                for launch in cc.unique(launches):
                    rows.append(dict(variant(launch, {arch}), shape=name, dtype=str(dtype)))
        print(json.dumps(rows))
    """, tmp_path)
    failures = []
    for v in rows:
        where = f"{v['shape']} {v['dtype']} {v['name']}"
        if "error" in v:
            failures.append(f"{where}: {v['error']}")
            continue
        if v["shared_bytes"] > cc.MAX_SHARED_BYTES[arch]:
            failures.append(f"{where}: {v['shared_bytes']} B shared memory")
        if v["spill_bytes"]:  # the tile choice in the wrappers avoids register spills
            failures.append(f"{where} {v['constexprs']}: {v['spill_bytes']} B spilled")
    assert len(rows) >= 4 * 3 * 6
    assert not failures, "\n".join(failures)

