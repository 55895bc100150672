"""The Triton W4A16 GEMM (issue 16) under Triton's CPU interpreter (the root conftest
sets ``TRITON_INTERPRET=1``): the kernel against its PyTorch reference, the packed layout
against the 4-bit weight it came from, and :class:`~argosy.runtime.layers.linear.Linear`
choosing it (with the device list widened to the CPU, as no GPU is here). Its ahead-of-time
compilation for sm_90 / sm_80 is in ``tests/test_triton_compile.py``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from argosy.runtime.quantization import triton_w4a16 as w4  # noqa: E402
from argosy.runtime.quantization.int4 import Int4Weight  # noqa: E402


def _weight(n: int, k: int, g: int, seed: int = 0, perm: bool = False) -> Int4Weight:
    rng = np.random.default_rng(seed)
    return Int4Weight(rng.integers(0, 16, (n, k), dtype=np.uint8),
                      (rng.random((n, k // g), dtype=np.float32) * 0.02 + 0.001).astype(np.float32),
                      (rng.standard_normal((n, k // g)) * 0.01).astype(np.float32), g,
                      rng.permutation(k) if perm else None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("m", [1, 5, 17, 70])
@pytest.mark.parametrize("g", [32, 64, 128])
def test_kernel_equals_its_reference(dtype, m, g):
    """Every tile choice (1-16, 17-32, 33-64, 65+ rows), N not a multiple of the column
    tile (96), group sizes with one and two K steps a group."""
    w = _weight(96, 256, g, seed=m)
    qw, s, z = w4.pack(w, torch.bfloat16 if dtype == torch.float32 else dtype)
    x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m)).to(dtype)
    got = w4.matmul(x, qw, s, z, g)
    assert got.dtype == dtype and got.shape == (m, 96)
    want = w4.reference(x, qw, s, z, g, round_weight=False)  # the interpreter's tile (see reference)
    # 16-bit outputs: one rounding of the result (the interpreter truncates to bfloat16)
    tol = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


def test_packed_layout_holds_the_weight():
    """The reference over the packed words equals the product with the weight itself
    (scales and zeros rounded to bfloat16, as packed): the layout loses nothing."""
    w = _weight(64, 128, 32, seed=3)
    qw, s, z = w4.pack(w, torch.bfloat16)
    assert qw.shape == (16, 64) and qw.dtype == torch.int32 and s.shape == (4, 64)
    x = torch.randn(3, 128)
    torch.testing.assert_close(w4.reference(x, qw, s, z, 32), x @ w.dequantize(torch.float32).T,
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="does not fit the W4A16 kernel"):
        w4.pack(_weight(64, 96, 48), torch.bfloat16)
    with pytest.raises(ValueError, match="does not match the packed weight"):
        w4.matmul(torch.zeros(2, 64), qw, s, z, 32)


@pytest.mark.parametrize("perm", [False, True], ids=["plain", "act-order"])
def test_linear_runs_the_kernel_for_few_rows(monkeypatch, perm):
    """A layer whose 4-bit weight arrived (in two fused parts) runs the kernel for every
    call (decode- and prefill-sized), act-order input gathered first, equal to the
    weight's own product; its dense weight is freed (the memory a 4-bit model saves)."""
    from argosy.runtime.layers import linear
    from argosy.runtime.quantization import int4
    from argosy.runtime.quantization.triton_w4a16 import W4A16Method

    monkeypatch.setattr(int4, "W4A16_DEVICES", ("cuda", "cpu"))
    w = _weight(128, 256, 64, seed=5, perm=perm)
    lin = linear.Linear(128, 256, False, torch.bfloat16, torch.device("cpu"))
    lin.load_quantized(0, w.rows(0, 96))
    lin.load_quantized(96, w.rows(96, 128))
    lin.process_weights_after_loading()
    assert isinstance(lin.quant_method, W4A16Method) and (lin.quant_method.perm is not None) == perm
    assert lin.weight.numel() == 0
    dense = w.dequantize(torch.float32)
    for m in (3, 70):
        x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
        torch.testing.assert_close(lin(x).float(), x.float() @ dense.T, rtol=2e-2, atol=2e-2)
