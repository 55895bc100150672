"""The CPU paged decode attention kernel (:mod:`argosy.runtime.attention.cpu_decode`)
against the torch paged attention (gather + SDPA), which is its oracle: float32 to
float32 rounding, bfloat16 to bfloat16 rounding; GQA groups, head sizes, block sizes,
lengths of 1, exact multiples of a block and ragged batches; bad tables are refused
before anything is read; without a compiler the torch path is kept."""

from __future__ import annotations

import os
import time

import pytest
import torch

from argosy.runtime import cpu_kernels
from argosy.runtime.attention import DecodeMetadata, cpu_decode, torch_paged

# Skipped only on a developer machine without a C++ compiler (where one exists, a kernel
# that fails to build fails test_the_kernel_builds_and_loads); under CI (``CI`` set) a
# missing compiler fails these tests instead of hiding them.
pytestmark = pytest.mark.skipif(cpu_kernels.compiler() is None and not os.environ.get("CI"),
                                reason="no C++ compiler to build the kernel")


def test_the_kernel_builds_and_loads():
    assert cpu_decode.build().exists()  # a compile error is raised here, with the compiler's stderr
    assert cpu_decode.kernel() is not None


def _case(lens, heads, kv_heads, d, block_size, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = max(-(-n // block_size) for n in lens) + 1  # one spare column, never read
    num_blocks = len(lens) * width + 3
    cache = torch.randn(2, num_blocks, block_size, kv_heads, d, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g)[: len(lens) * width]
    bt = perm.view(len(lens), width).to(torch.int32)
    q = torch.randn(len(lens), heads, d, generator=g).to(dtype)
    return q, cache, bt, torch.tensor(lens, dtype=torch.int32)


def _reference(q, cache, bt, lens, scale):
    meta = DecodeMetadata(slot_mapping=torch.zeros(len(lens), dtype=torch.int64), block_tables=bt, seq_lens=lens)
    return torch_paged.decode_attention(q.float(), cache.float(), meta, scale)  # float32: the torch path


@pytest.mark.parametrize("heads,kv_heads,d,block_size", [(9, 3, 64, 16), (8, 8, 64, 16), (32, 4, 128, 32),
                                                         (4, 1, 64, 64), (6, 3, 128, 8)])
def test_kernel_equals_the_torch_paged_attention(heads, kv_heads, d, block_size):
    lens = [1, block_size, block_size + 1, 3 * block_size, 97, 250, 2, 181]
    scale = d ** -0.5
    q, cache, bt, sl = _case(lens, heads, kv_heads, d, block_size, torch.float32)
    ref = _reference(q, cache, bt, sl, scale)
    got = torch.ops.argosy.paged_decode_attention(q, cache, bt, sl, scale)
    assert got.dtype == torch.float32 and got.shape == q.shape
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=2e-5)
    qb, cb = q.to(torch.bfloat16), cache.to(torch.bfloat16)
    got_b = torch.ops.argosy.paged_decode_attention(qb, cb, bt, sl, scale)
    ref_b = _reference(qb, cb, bt, sl, scale)  # same bf16 inputs, float32 math
    assert got_b.dtype == torch.bfloat16
    torch.testing.assert_close(got_b.float(), ref_b, atol=2e-2, rtol=1.6e-2)  # one bfloat16 rounding of the output
    # a single sequence, and the sequences one at a time, equal the batch
    for i in (0, 5):
        one = torch.ops.argosy.paged_decode_attention(q[i : i + 1], cache, bt[i : i + 1], sl[i : i + 1], scale)
        torch.testing.assert_close(one, got[i : i + 1], atol=1e-6, rtol=1e-6)


def test_large_scores_do_not_overflow_and_the_max_token_wins():
    """Scores far apart (an online softmax that loses its running max would give NaN or
    the wrong weights): one key aligned with a huge query dominates."""
    q, cache, bt, sl = _case([300], 9, 3, 64, 16, torch.float32, seed=1)
    q = q * 40
    ref = _reference(q, cache, bt, sl, 0.125)
    got = torch.ops.argosy.paged_decode_attention(q, cache, bt, sl, 0.125)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_bad_tables_are_refused_before_anything_is_read():
    q, cache, bt, sl = _case([40, 20], 9, 3, 64, 16, torch.float32)
    too_long = torch.tensor([40, bt.shape[1] * 16 + 1], dtype=torch.int32)
    with pytest.raises(ValueError, match="more blocks"):
        torch.ops.argosy.paged_decode_attention(q, cache, bt, too_long, 0.125)
    bad = bt.clone()
    bad[1, 0] = cache.shape[1]  # one past the last block
    with pytest.raises(ValueError, match="out of range"):
        torch.ops.argosy.paged_decode_attention(q, cache, bad, sl, 0.125)
    with pytest.raises(ValueError, match="more blocks"):
        torch.ops.argosy.paged_decode_attention(q, cache, bt, torch.tensor([40, 0], dtype=torch.int32), 0.125)
    with pytest.raises(ValueError, match="unsupported query"):  # a cache of another dtype is never read as this one
        torch.ops.argosy.paged_decode_attention(q.to(torch.bfloat16), cache, bt, sl, 0.125)
    with pytest.raises(ValueError, match="do not match"):
        torch.ops.argosy.paged_decode_attention(q, cache, bt[:1], sl, 0.125)


def test_the_engine_path_takes_the_kernel_only_where_supported():
    q, cache, _, _ = _case([5], 9, 3, 64, 16, torch.bfloat16)
    assert torch_paged.use_decode_kernel(q, cache)
    assert not torch_paged.use_decode_kernel(q.float(), cache.float())  # float32: the exact torch path
    q5, c5, _, _ = _case([5], 10, 1, 64, 16, torch.bfloat16)  # 10 query heads per KV head
    assert not cpu_decode.supports(q5, c5)
    q6, c6, _, _ = _case([5], 9, 3, 80, 16, torch.bfloat16)  # head size 80
    assert not cpu_decode.supports(q6, c6)


def test_the_decision_made_once_is_used_on_every_call(monkeypatch):
    """The model runner decides at startup (``use_kernel``); the per-call check is not
    evaluated again, and ``use_kernel=False`` keeps the torch path."""
    q, cache, bt, sl = _case([30, 7], 9, 3, 64, 16, torch.bfloat16)
    meta = DecodeMetadata(slot_mapping=torch.zeros(2, dtype=torch.int64), block_tables=bt, seq_lens=sl)
    real_op = torch.ops.argosy.paged_decode_attention

    def fail(*_a):
        raise AssertionError("use_decode_kernel evaluated again")

    monkeypatch.setattr(torch_paged, "use_decode_kernel", fail)
    with_kernel = torch_paged.decode_attention(q, cache, meta, 0.125, use_kernel=True)
    without = torch_paged.decode_attention(q, cache, meta, 0.125, use_kernel=False)
    torch.testing.assert_close(with_kernel.float(), without.float(), atol=2e-2, rtol=1.6e-2)
    assert torch.equal(with_kernel, real_op(q, cache, bt, sl, 0.125))


def test_without_a_compiler_the_build_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(RuntimeError, match="cannot run"):
        cpu_decode.build(tmp_path)
    monkeypatch.setenv("CXX", "false")  # a "compiler" that fails
    with pytest.raises(RuntimeError, match="failed"):
        cpu_decode.build(tmp_path)
    assert not list(tmp_path.glob("*.so")), "no half-written library is left behind"


def test_build_is_cached_and_leaves_other_builds(tmp_path):
    other = tmp_path / "paged_decode-0123456789abcdef.so"  # another machine's compiler, sharing the directory
    other.write_bytes(b"other")
    # a partial library of a builder killed two hours ago goes; one being written now stays
    stale, live = tmp_path / f"{cpu_kernels.PARTIAL_PREFIX}dead.so", tmp_path / f"{cpu_kernels.PARTIAL_PREFIX}live.so"
    stale.write_bytes(b"half")
    live.write_bytes(b"half")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    lib = cpu_decode.build(tmp_path)
    assert lib.exists() and lib.parent == tmp_path and other.exists()
    assert not stale.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([lib.name, other.name, live.name])
    mtime = lib.stat().st_mtime_ns
    assert cpu_decode.build(tmp_path) == lib and lib.stat().st_mtime_ns == mtime  # not rebuilt


def test_the_engine_decides_once_for_every_layer(make_engine):
    """bfloat16 engine: the runner builds the kernel at startup and every layer takes it;
    float32: every layer keeps the torch path."""
    bf16 = make_engine(dtype="bfloat16", compilation_config="0").executor.runner
    assert bf16.decode_kernel is True
    assert all(layer.self_attn.decode_kernel is True for layer in bf16.model.layers)
    f32 = make_engine(dtype="float32").executor.runner
    assert f32.decode_kernel is False
    assert all(layer.self_attn.decode_kernel is False for layer in f32.model.layers)
