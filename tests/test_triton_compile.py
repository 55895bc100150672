"""The Triton kernels compile for NVIDIA GPUs (cubin via Triton's bundled ptxas), no GPU needed.

The interpreter tests (test_triton_kernels.py) check the kernels' arithmetic on CPU; they
cannot see what only the GPU compiler sees: ops it rejects, shared memory over the
architecture's limit, a constexpr combination that fails to lower. Here every launch the
wrappers make for a model shape is compiled ahead of time for a CUDA target by
:mod:`argosy.runtime.attention.compile_check`.

Default run: the bundled model's shapes in bf16 (the CUDA default dtype) for sm_90
(H100/H200), ~20 s. Each compiled variant must fit the architecture's shared memory and
spill no registers (the wrappers' tile sizes were chosen so: a spill makes a kernel
several times slower). Slow suite (``ARGOSY_RUN_SLOW=1``): four model shapes (GQA 1, 3, 4,
7; head_dim 64, 128, 256) x bf16/fp16/fp32 for sm_80 and sm_90.
"""

from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from argosy.runtime.attention import compile_check as cc  # noqa: E402

tk = importlib.import_module("argosy.runtime.attention.triton_kernels")


def test_bundled_model_kernels_compile_for_hopper():
    launches = cc.unique(cc.record_launches(tk, cc.SHAPES["smollm2-135m"], torch.bfloat16))
    # every kernel is exercised: mixed-step and decode attention tiles, split-KV pair,
    # RMSNorm with and without residual, KV store, rotary
    assert sorted({la.name for la in launches}) == sorted(cc.KERNELS)
    attn = [la.kwargs for la in launches if la.name == "_paged_attention_kernel"]
    assert sorted(k["BLOCK_M"] for k in attn) == [16, 64]
    assert all(k["DOT_FP32"] is False for k in attn)  # 16-bit MMA operands, as on the GPU
    assert len(launches) == 8
    for launch in launches:
        v = cc.compile_launch(launch, arch=90)
        assert v.cubin_bytes > 0 and v.registers > 0, v
        assert v.shared_bytes <= cc.MAX_SHARED_BYTES[90], v
        assert v.spill_bytes == 0, v  # the wrappers' tiles fit the register file
        assert "*bf16" in v.signature.values(), v.signature  # compiled for bf16 tensors


def test_tile_over_the_shared_memory_limit_is_reported():
    """The check can fail: 64 x 128 bf16 tiles at head_dim 256 need more shared memory
    (~290 KB) than an H100 block may use (227 KB), and the compiled variant says so."""
    shape = cc.ModelShape(heads=2, kv_heads=2, head_dim=256, hidden=256)
    q, k, v, cache, meta = cc._step(shape, torch.bfloat16, 16, [(0, 130)])
    with cc.recording(tk) as launches:
        tk.paged_attention(q, cache, meta, 0.0625, block_m=64, block_n=128)
    (launch,) = launches
    variant = cc.compile_launch(launch, arch=90)
    assert variant.shared_bytes > cc.MAX_SHARED_BYTES[90]


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_every_shape_and_dtype_compiles(arch):
    failures = []
    for name, shape in cc.SHAPES.items():
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for launch in cc.unique(cc.record_launches(tk, shape, dtype)):
                try:
                    v = cc.compile_launch(launch, arch=arch)
                except Exception as e:  # collect all, then fail once
                    failures.append(f"{name} {dtype} {launch.name}: {str(e).splitlines()[0]}")
                    continue
                if v.shared_bytes > cc.MAX_SHARED_BYTES[arch]:
                    failures.append(f"{name} {dtype} {v.name}: {v.shared_bytes} B shared memory")
                if v.spill_bytes:  # the tile choice in the wrappers avoids register spills
                    failures.append(f"{name} {dtype} {v.name} {v.constexprs}: {v.spill_bytes} B spilled")
    assert not failures, "\n".join(failures)
