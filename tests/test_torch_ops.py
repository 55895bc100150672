"""The C++ implementations of ``torch.ops.argosy.q8_linear`` and
``torch.ops.argosy.paged_decode_attention`` (:mod:`argosy.runtime.torch_ops`): once the
kernels load they are the ops' CPU implementations (the Python ones removed, not
shadowed), and they return what the Python implementations return, bit for bit (the same
kernel computes both), and refuse what those refuse with the same kind of error. The
kernels' own accuracy is tested against independent references in test_q8_0.py and
test_cpu_decode_kernel.py (which call the ops, so they run this C++ path too)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from argosy.runtime import cpu_kernels, torch_ops
from argosy.runtime.attention import cpu_decode
from argosy.runtime.quantization import q8_0

from .test_cpu_decode_kernel import _case
from .test_q8_0 import _raw

pytestmark = pytest.mark.skipif(cpu_kernels.compiler() is None and not os.environ.get("CI"),
                                reason="no C++ compiler to build the kernels")


@pytest.fixture(scope="module", autouse=True)
def kernels():
    assert cpu_decode.kernel() is not None and q8_0.kernel() is not None
    if os.environ.get(torch_ops.ENV, "").strip().lower() == "python":
        pytest.skip("ARGOSY_TORCH_OPS=python keeps the Python implementations")


def test_both_ops_run_their_cpp_implementation_only():
    assert torch_ops.installed == {"q8_linear", "paged_decode_attention"}
    for op in ("q8_linear", "paged_decode_attention"):
        dump = torch._C._dispatch_dump(f"argosy::{op}")
        cpu = [line for line in dump.splitlines() if line.startswith("CPU:")]
        assert len(cpu) == 1 and "torch_ops.cpp" in cpu[0], dump  # the Python registration is gone
    assert "torch_ops.cpp" not in torch._C._dispatch_dump("argosy::q8_dense_linear")  # untouched


@pytest.mark.parametrize("low_bits", [False, True], ids=["int8", "5-6bit"])
@pytest.mark.parametrize("type_name", ["Q8_0", "Q5_1", "Q5_0", "Q6_K"])
def test_q8_linear_equals_the_python_implementation(type_name, low_bits):
    """float16 / float32 scales, with and without offsets (Q5_1), group 32 and 16 (Q6_K),
    the int8 and the 5/6-bit layouts (one or two high-bit planes, unsigned or signed); 1 to
    17 rows; float32 and bfloat16 inputs and outputs; a non-contiguous x."""
    g = torch.Generator().manual_seed(0)
    n, k = 320, 512  # (K-quants come in blocks of 256)
    packed = q8_0.PackedQ8.pack(q8_0.Q8Weight.from_gguf(_raw(type_name, n, k, seed=3), (n, k), type_name),
                                max_bits=6 * low_bits)
    args = (packed.w, packed.scales, packed.mins, packed.group_size, packed.n)
    for m in (1, 5, 17):
        for x in (torch.randn(m, k, generator=g), torch.randn(m, k, generator=g).to(torch.bfloat16),
                  torch.randn(k, m, generator=g).t()):
            for out_dtype in (None, torch.bfloat16):
                got = torch.ops.argosy.q8_linear(x, *args, out_dtype, packed.hbits, packed.is_signed)
                want = q8_0.q8_linear(x, *args, out_dtype, packed.hbits, packed.is_signed)
                assert got.dtype == want.dtype and torch.equal(got, want), (type_name, m, x.dtype, out_dtype)
    empty = torch.ops.argosy.q8_linear(torch.zeros(0, k), *args, None, packed.hbits, packed.is_signed)
    assert empty.shape == (0, n)


def test_q8_linear_refuses_what_the_python_implementation_refuses():
    n, k = 64, 64
    packed = q8_0.PackedQ8.pack(q8_0.Q8Weight.from_gguf(_raw("Q8_0", n, k), (n, k), "Q8_0"))
    x = torch.randn(2, k)
    bad = [(x[:, :32], packed.w, packed.scales, None, 32, n),  # K does not match
           (x, packed.w, packed.scales, None, 24, n),  # a group size the kernel does not take
           (x, packed.w, packed.scales, None, 32, n + 1000),  # more outputs than the tiles hold
           (x.double(), packed.w, packed.scales, None, 32, n),  # input dtype
           (x, packed.w.float(), packed.scales, None, 32, n),  # weight dtype
           (x, packed.w, packed.scales, packed.scales[:, :1], 32, n)]  # offsets of another shape
    five = q8_0.PackedQ8.pack(q8_0.Q8Weight.from_gguf(_raw("Q5_1", n, k), (n, k), "Q5_1"), max_bits=6)
    low = (five.w, five.scales, five.mins, 32, n)
    bad += [(x, *low),  # the 5-bit layout without its high bits
            (x, packed.w, packed.scales, None, 32, n, None, five.hbits),  # high bits with the int8 layout
            (x, *low, None, five.hbits[:, :, :32]),  # high bits of another shape
            (x, *low, None, five.hbits.float()),  # high bits of another dtype
            (x, *low, None, torch.cat([five.hbits] * 3, 1)),  # three planes
            (x, packed.w, packed.scales, None, 32, n, None, None, True)]  # signed with the int8 layout
    for a in bad:
        for fn in (torch.ops.argosy.q8_linear, q8_0.q8_linear):
            with pytest.raises(ValueError, match="does not match packed weight"):
                fn(*a)


@pytest.mark.parametrize("cache_dtype", [None, torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_decode_attention_equals_the_python_implementation(dtype, cache_dtype):
    """Every (query dtype, cache dtype) entry point (a wrong pointer would read the cache
    as another type); int64 tables and lengths (converted as the Python side converts)."""
    q, cache, bt, sl = _case([1, 16, 17, 97, 250], 9, 3, 64, 16, dtype)
    cache = cache if cache_dtype is None else (cache * 0.5).to(cache_dtype)
    for tables, lens in ((bt, sl), (bt.long(), sl.long())):
        got = torch.ops.argosy.paged_decode_attention(q, cache, tables, lens, 0.125)
        want = cpu_decode.paged_decode_attention(q, cache, tables, lens, 0.125)
        assert got.dtype == dtype and torch.equal(got, want)


def test_paged_decode_attention_refuses_what_the_python_implementation_refuses():
    q, cache, bt, sl = _case([40, 20], 9, 3, 64, 16, torch.float32)
    bad_block = bt.clone()
    bad_block[1, 0] = cache.shape[1]
    cases = [((q, cache, bt, torch.tensor([40, bt.shape[1] * 16 + 1], dtype=torch.int32)), "more blocks"),
             ((q, cache, bad_block, sl), "out of range"),
             ((q, cache, bt, torch.tensor([40, 0], dtype=torch.int32)), "more blocks"),
             ((q.to(torch.bfloat16), cache, bt, sl), "unsupported query"),
             ((q[:, :, :32], cache[..., :32].contiguous(), bt, sl), "unsupported query"),  # head size 32
             ((q, cache.transpose(1, 2), bt, sl), "unsupported query"),  # not contiguous
             ((q, cache, bt[:1], sl), "do not match")]
    for args, match in cases:
        for fn in (torch.ops.argosy.paged_decode_attention, cpu_decode.paged_decode_attention):
            with pytest.raises(ValueError, match=match):
                fn(*args, 0.125)


def test_argosy_torch_ops_python_keeps_the_python_implementations(tmp_path):
    """``ARGOSY_TORCH_OPS=python``: the ops stay in Python (and still compute)."""
    code = ("import torch; from argosy.runtime.attention import cpu_decode; from argosy.runtime import torch_ops; "
            "assert cpu_decode.kernel() is not None; assert not torch_ops.installed; "
            "d = torch._C._dispatch_dump('argosy::paged_decode_attention'); "
            "assert 'torch_ops.cpp' not in d and 'cpu_decode.py' in d, d; print('ok')")
    env = {**os.environ, torch_ops.ENV: "python"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_the_library_key_follows_the_torch_build():
    cflags, lflags = torch_ops.torch_build_flags()
    assert f"-DARGOSY_TORCH_VERSION=\"{torch.__version__}\"" in cflags
    assert any(f.startswith("-D_GLIBCXX_USE_CXX11_ABI=") for f in cflags)
    assert "-ltorch_cpu" in lflags and "-lc10" in lflags
