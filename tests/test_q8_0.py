"""GGUF Q8_0, Q5_0, Q5_1, Q5_K and Q6_K weights kept as grouped int8, and the C++ linear
over them (:mod:`argosy.runtime.quantization.q8_0`), against the ``gguf`` package's own
dequantizer (the oracle): on the bundled model's Q8_0 embedding / LM head, and on blocks
of every type (quantized by the ``gguf`` package where it can, random bytes with small
scales for the K-quants, which it only reads)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from argosy.runtime import cpu_kernels
from argosy.runtime.quantization import base, q8_0

# Skipped only on a developer machine without a C++ compiler (where one exists, a kernel
# that fails to build fails test_the_kernel_builds_and_loads); under CI (``CI`` set) a
# missing compiler fails these tests instead of hiding them.
pytestmark = pytest.mark.skipif(cpu_kernels.compiler() is None and not os.environ.get("CI"),
                                reason="no C++ compiler to build the kernel")


@pytest.fixture(scope="module")
def embed(model_path):
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(model_path)
    t = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert t.tensor_type.name == "Q8_0"
    shape = tuple(int(x) for x in reversed(t.shape.tolist()))
    ref = torch.from_numpy(dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float64))
    return q8_0.Q8Weight.from_gguf(t.data, shape), ref


def test_decoded_weight_equals_the_gguf_dequantizer(embed):
    w, ref = embed
    assert w.shape == (49152, 576) and w.q.dtype == np.int8 and w.scale.dtype == np.float16
    assert torch.equal(w.dequantize().double(), ref)
    with pytest.raises(ValueError, match="does not hold"):
        q8_0.Q8Weight.from_gguf(np.zeros(34 * 17, dtype=np.uint8), (1, 576))


def test_the_kernel_builds_and_loads():
    assert q8_0.KERNEL.build().exists()  # a compile error is raised here, with the compiler's stderr
    assert q8_0.kernel() is not None


@pytest.mark.parametrize("rows", [(0, 49152), (0, 24576), (32768, 49152)])  # whole, TP=2 rank 0, TP=3 rank 2
def test_linear_equals_x_times_dequantized_w(embed, rows):
    """float32 math over the file's values: within 2e-5 of float64 (logits here reach ~20)."""
    w, ref = embed
    lo, hi = rows
    shard = q8_0.Q8Weight(w.q[lo:hi], w.scale[lo:hi])
    packed = q8_0.PackedQ8.pack(shard)
    g = torch.Generator().manual_seed(lo)
    for m in (1, 2, 4, 7, 8, 9, 17):
        x = torch.randn(m, 576, generator=g).to(torch.bfloat16)
        got = torch.ops.argosy.q8_linear(x, packed.w, packed.scales, None, 32, packed.n)
        assert got.dtype == torch.float32 and got.shape == (m, hi - lo)
        want = x.double() @ ref[lo:hi].T
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=0)


def test_padded_rows_and_a_width_that_is_not_a_whole_tile(embed):
    """A vocabulary slice padded to the other ranks' size (rows past N are zero) and an
    N that is not a multiple of the 16-row tile: only ``n`` columns come back, the
    padding's are zero."""
    w, ref = embed
    part = q8_0.Q8Weight(w.q[:1000], w.scale[:1000])
    packed = q8_0.PackedQ8.pack(part, rows=1003)
    assert packed.n == 1003 and packed.w.shape == (63, 576, 16)
    x = torch.randn(3, 576)
    got = torch.ops.argosy.q8_linear(x, packed.w, packed.scales, None, 32, packed.n)
    assert got.shape == (3, 1003)
    torch.testing.assert_close(got[:, :1000].double(), x.double() @ ref[:1000].T, atol=2e-5, rtol=0)
    assert torch.equal(got[:, 1000:], torch.zeros(3, 3))
    with pytest.raises(ValueError, match="cannot pack"):
        q8_0.PackedQ8.pack(part, rows=999)


def test_mismatched_inputs_are_refused(embed):
    w, _ = embed
    packed = q8_0.PackedQ8.pack(q8_0.Q8Weight(w.q[:64], w.scale[:64]))
    with pytest.raises(ValueError, match="does not match"):
        torch.ops.argosy.q8_linear(torch.randn(2, 512), packed.w, packed.scales, None, 32, packed.n)
    with pytest.raises(ValueError, match="does not match"):
        torch.ops.argosy.q8_linear(torch.randn(2, 576), packed.w, packed.scales, None, 32, 65)


def test_the_engine_takes_it_for_few_rows_and_the_dense_copy_for_more(make_engine, embed):
    """bfloat16 engine on the bundled model: the LM head is kept as Q8_0 too, and logits
    of up to MAX_ROWS rows are the kernel's (float32 math over the file's values: within
    1e-4 of float64, where the dense bfloat16 copy is off by ~0.05); more rows take the
    dense copy."""
    _, ref = embed
    model = make_engine(dtype="bfloat16", compilation_config="0").executor.runner.model
    assert model.logits_q8 is not None and model.logits_q8.n == 49152
    g = torch.Generator().manual_seed(3)
    few = torch.randn(q8_0.MAX_ROWS, 576, generator=g).to(torch.bfloat16)
    want = few.double() @ ref.T
    torch.testing.assert_close(model.compute_logits(few).double(), want, atol=1e-4, rtol=0)
    many = torch.randn(q8_0.MAX_ROWS + 1, 576, generator=g).to(torch.bfloat16)
    dense = model.compute_logits(many).double()
    err = (dense - many.double() @ ref.T).abs().max().item()
    assert 1e-3 < err < 0.5, err  # the bfloat16 copy's rounding: a different path
    f32 = make_engine(dtype="float32").executor.runner.model
    assert f32.logits_q8 is None  # the exact path keeps dense float32 weights only


def test_the_portable_build_gives_the_same_answer(embed, tmp_path, monkeypatch):
    """Without AVX-512 flags the source compiles its portable loop (a CPU without
    AVX-512, or inductor finding no vector ISA): same results."""
    import ctypes

    w, ref = embed
    monkeypatch.setattr(cpu_kernels, "isa_flags", lambda: [])
    lib = ctypes.CDLL(str(q8_0.KERNEL.build(tmp_path)))
    q8_0._declare(lib)
    part = q8_0.Q8Weight(w.q[:200], w.scale[:200])
    packed = q8_0.PackedQ8.pack(part)
    x = torch.randn(3, 576)
    out = torch.empty(3, 200)
    assert _call(lib, packed, x, out) == 0
    torch.testing.assert_close(out.double(), x.double() @ ref[:200].T, atol=2e-5, rtol=0)


def _call(lib, p: q8_0.PackedQ8, x: torch.Tensor, out: torch.Tensor) -> int:
    """``argosy_q8_linear`` of a library loaded by hand, float32 ``x [M, K]`` -> ``out [M, n]``."""
    return lib.argosy_q8_linear(p.w.data_ptr(), None if p.hbits is None else p.hbits.data_ptr(), p.planes, p.is_signed,
                                p.scales.data_ptr(), None if p.mins is None else p.mins.data_ptr(),
                                p.scales.dtype == torch.int16, p.group_size, x.data_ptr(), 0, out.data_ptr(), 0,
                                x.shape[0], p.n, x.shape[1])


def test_each_tensor_parallel_rank_keeps_its_vocabulary_slice(checkpoint, embed):
    """Under TP=3 (the bundled model's 9 heads allow it) each rank's Q8_0 head holds its
    vocabulary rows (the GGUF's row slice, decoded without the others) and its logits are
    that slice of the whole (49,152 / 3 leaves no padding; padding is tested above)."""
    from argosy.runtime.distributed import TPGroup
    from argosy.runtime.models import LlamaForCausalLM

    _, ref = embed
    x = torch.randn(2, 576).to(torch.bfloat16)
    for rank in range(3):
        model = LlamaForCausalLM(checkpoint.config, torch.bfloat16, torch.device("cpu"), 256, TPGroup(rank, 3))
        model.load_weights(checkpoint.weights(model.shard_for, int4=True))
        p = model.logits_q8
        assert p is not None and p.n == model.vocab_per_rank == 16384
        got = torch.ops.argosy.q8_linear(x, p.w, p.scales, p.mins, p.group_size, p.n).double()
        lo = model.vocab_start
        torch.testing.assert_close(got, x.double() @ ref[lo : lo + p.n].T, atol=2e-5, rtol=0)


def _raw(type_name: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    """``[n, k / values * bytes] uint8`` blocks of ``type_name``."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    rng = np.random.default_rng(seed)
    if type_name in ("Q8_0", "Q5_0", "Q5_1"):
        w = (rng.standard_normal((n, k)) * 0.05 + rng.uniform(-0.02, 0.02, (n, 1))).astype(np.float32)
        return quantize(w, GGMLQuantizationType[type_name])
    values, nbytes = q8_0.BLOCKS[type_name]
    raw = rng.integers(0, 256, (n * k // values, nbytes), dtype=np.uint8)
    scales = rng.uniform(1e-4, 2e-3, (n * k // values, 2)).astype(np.float16).view(np.uint8)
    if type_name == "Q5_K":
        raw[:, 0:4] = scales  # d, dmin
    else:
        raw[:, 208:210] = scales[:, :2]  # d
    return raw.reshape(n, -1)


def _reference(raw: np.ndarray, type_name: str, n: int, k: int) -> torch.Tensor:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    return torch.from_numpy(dequantize(raw, GGMLQuantizationType[type_name]).reshape(n, k).astype(np.float64))


@pytest.mark.parametrize("type_name", q8_0.TYPES)
def test_every_type_decodes_to_the_gguf_dequantizer_exactly(type_name):
    n, k = 48, 512
    raw = _raw(type_name, n, k)
    w = q8_0.Q8Weight.from_gguf(raw, (n, k), type_name)
    assert w.q.dtype == np.int8 and w.group_size == (16 if type_name == "Q6_K" else 32)
    assert (w.min is not None) == (type_name in ("Q5_1", "Q5_K"))
    assert torch.equal(w.dequantize().double(), _reference(raw, type_name, n, k))
    with pytest.raises(ValueError, match="does not hold"):
        q8_0.Q8Weight.from_gguf(raw[:, :-1], (n, k), type_name)


#: The bundled model's linear shapes ``(N, K)`` and one TP=3 rank's shards (as in
#: tests/test_quantization.py), plus a width that is not a whole 16-row tile; the
#: K-quants' 256-value blocks fit only K = 1536 (down_proj) and its 512-column shard.
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (320, 576), (576, 192), (1024, 576), (576, 512),
          (40, 512)]


@pytest.mark.parametrize("low_bits", [False, True], ids=["int8", "5-6bit"])
@pytest.mark.parametrize("type_name", q8_0.TYPES)
def test_kernel_equals_x_times_dequantized_w_for_every_type(type_name, low_bits):
    """Group 16 and 32, float16 and float32 scales, with and without offsets, both
    layouts (int8, and the 5/6-bit one the linear layers hold for Q5_x / Q6_K); 1 to 17 rows
    of x: float32 math over the file's values, within 2e-5 relative of float64."""
    values = q8_0.BLOCKS[type_name][0]
    g = torch.Generator().manual_seed(2)
    for n, k in (s for s in SHAPES if s[1] % values == 0):
        raw = _raw(type_name, n, k, seed=n + k)
        ref = _reference(raw, type_name, n, k)
        packed = q8_0.PackedQ8.pack(q8_0.Q8Weight.from_gguf(raw, (n, k), type_name), max_bits=6 * low_bits)
        assert (packed.hbits is not None) == (low_bits and type_name != "Q8_0")
        extra = (packed.hbits, packed.is_signed)
        for m in (1, 3, 8, 9, 16, 17):
            x = torch.randn(m, k, generator=g).to(torch.bfloat16)
            got = torch.ops.argosy.q8_linear(x, packed.w, packed.scales, packed.mins, packed.group_size, packed.n,
                                             None, *extra)
            want = x.double() @ ref.T
            torch.testing.assert_close(got.double(), want, atol=2e-5 * max(1.0, want.abs().max().item()), rtol=0,
                                       msg=lambda e: f"{type_name} {n}x{k} m={m}: {e}")
            # a linear layer's bfloat16 output: the float32 result rounded as torch rounds it
            bf = torch.ops.argosy.q8_linear(x, packed.w, packed.scales, packed.mins, packed.group_size, packed.n,
                                            torch.bfloat16, *extra)
            assert bf.dtype == torch.bfloat16 and torch.equal(bf, got.to(torch.bfloat16)), (type_name, n, k, m)


def test_fused_parts_of_different_types_stack_exactly():
    """q/k/v (or gate/up) stored in different types: one weight with the smallest group,
    float32 scales and zero offsets where a part had none; every value unchanged."""
    k = 512
    parts = {t: q8_0.Q8Weight.from_gguf(_raw(t, 32, k, seed=i), (32, k), t)
             for i, t in enumerate(("Q8_0", "Q6_K", "Q5_1"))}
    whole = q8_0.Q8Weight.cat(list(parts.values()))
    assert whole.group_size == 16 and whole.scale.dtype == np.float32 and whole.min is not None
    assert torch.equal(whole.dequantize(), torch.cat([p.dequantize() for p in parts.values()]))
    packed = q8_0.PackedQ8.pack(whole)
    x = torch.randn(2, k)
    got = torch.ops.argosy.q8_linear(x, packed.w, packed.scales, packed.mins, 16, packed.n)
    torch.testing.assert_close(got.double(), x.double() @ whole.dequantize(torch.float64).T, atol=1e-4, rtol=0)
    same = q8_0.Q8Weight.cat([parts["Q8_0"], parts["Q8_0"]])
    assert same.scale.dtype == np.float16 and same.min is None and same.group_size == 32


def test_column_shards_split_on_group_boundaries_only():
    w = q8_0.Q8Weight.from_gguf(_raw("Q6_K", 16, 512), (16, 512), "Q6_K")
    assert torch.equal(w.cols(16, 272).dequantize(), w.dequantize()[:, 16:272])
    with pytest.raises(ValueError, match="splits a quantization group"):
        w.cols(8, 264)


@pytest.mark.parametrize("type_name", ["Q5_K", "Q6_K", "Q5_0"])
def test_the_portable_build_handles_offsets_group_16_and_the_5_6_bit_layout(type_name, tmp_path, monkeypatch):
    import ctypes

    monkeypatch.setattr(cpu_kernels, "isa_flags", lambda: [])
    lib = ctypes.CDLL(str(q8_0.KERNEL.build(tmp_path)))
    q8_0._declare(lib)
    n, k = 24, 512
    raw = _raw(type_name, n, k, seed=3)
    w = q8_0.Q8Weight.from_gguf(raw, (n, k), type_name)
    x = torch.randn(3, k)
    outs = []
    for low_bits in (False, True):
        packed = q8_0.PackedQ8.pack(w, max_bits=6 * low_bits)
        assert packed.planes == (0 if not low_bits else 2 if type_name == "Q6_K" else 1)
        out = torch.empty(3, n)
        assert _call(lib, packed, x, out) == 0
        torch.testing.assert_close(out.double(), x.double() @ _reference(raw, type_name, n, k).T, atol=1e-4, rtol=0)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])  # the same values summed in the same order


def test_embedding_rows_from_the_packed_form_equal_the_dequantized_rows(embed):
    """``q8_0.embedding`` reads rows straight from the tiled layout: bit for bit the rows
    of ``Q8Weight.dequantize`` (float32 product, one rounding), for the bundled Q8_0
    embedding (ids across tiles, the last row, repeats) and a Q5_1 weight with offsets
    and a partial last tile."""
    w, _ = embed
    p = q8_0.PackedQ8.pack(w)
    ids = torch.tensor([0, 1, 15, 16, 17, 12345, 49151, 1, 0])
    for dtype in (torch.bfloat16, torch.float32):
        got = q8_0.embedding(ids, p.w, p.scales, p.mins, p.group_size, dtype)
        assert got.dtype == dtype and torch.equal(got, w.dequantize(dtype)[ids])
    w5 = q8_0.Q8Weight.from_gguf(_raw("Q5_1", 40, 64), (40, 64), "Q5_1")
    p5 = q8_0.PackedQ8.pack(w5)
    assert p5.mins is not None
    ids = torch.arange(40).flip(0)
    assert torch.equal(q8_0.embedding(ids, p5.w, p5.scales, p5.mins, p5.group_size, torch.bfloat16),
                       w5.dequantize(torch.bfloat16)[ids])


def test_without_dense_copies_the_embedding_and_head_stay_q8_0(checkpoint, embed, monkeypatch):
    """With ``ARGOSY_CPU_DENSE_COPIES=scratch`` the tied Q8_0 embedding / LM head is held
    once, in the file's form (no bfloat16 copy, 54 MiB on this model): lookups equal the
    dense copy's rows bit for bit, logits of up to ``LEAN_MAX_ROWS`` rows are the kernel's
    (within 1e-4 of float64), more rows run on the dequantization scratch in row blocks
    and equal the dense copy's product within bfloat16 rounding; under TP=3 each rank's
    lookups are its vocabulary slice."""
    from argosy.runtime.distributed import TPGroup
    from argosy.runtime.layers import linear
    from argosy.runtime.models import LlamaForCausalLM
    from argosy.runtime.quantization import dequant
    from argosy.runtime.worker.executor import weight_bytes_by_format

    if dequant.kernel() is None:
        pytest.skip("needs a C++ compiler")
    w, ref = embed
    dense = w.dequantize(torch.bfloat16)
    monkeypatch.setattr(linear, "DENSE_COPIES", "scratch")
    model = LlamaForCausalLM(checkpoint.config, torch.bfloat16, torch.device("cpu"), 256)
    model.load_weights(checkpoint.weights(model.shard_for, int4=True))
    assert model.embed_tokens.numel() == 0 and model.embed_q8 is not None
    fmt = weight_bytes_by_format(model)
    assert fmt["bfloat16"] < 1 << 20, fmt  # norms and rotary tables only
    assert fmt["grouped int8"] == model.logits_q8.nbytes  # the head and the embedding share it
    ids = torch.tensor([5, 49151, 0, 1234])
    assert torch.equal(model._embed(ids), dense[ids])
    g = torch.Generator().manual_seed(5)
    for rows in (1, q8_0.LEAN_MAX_ROWS):
        x = torch.randn(rows, 576, generator=g).to(torch.bfloat16)
        torch.testing.assert_close(model.compute_logits(x).double(), x.double() @ ref.T, atol=1e-4, rtol=0)
    calls = []
    real = dequant._dense_linear
    monkeypatch.setattr(dequant, "_dense_linear", lambda *a, **k: (calls.append(k), real(*a, **k))[1])
    x = torch.randn(q8_0.LEAN_MAX_ROWS + 1, 576, generator=g).to(torch.bfloat16)
    want = torch.nn.functional.linear(x, dense).float()
    torch.testing.assert_close(model.compute_logits(x), want, atol=0.02 * want.abs().max().item(), rtol=0)
    assert calls and calls[0]["max_elements"] == q8_0.LOGITS_SCRATCH_ELEMENTS
    for rank in range(3):
        part = LlamaForCausalLM(checkpoint.config, torch.bfloat16, torch.device("cpu"), 256, TPGroup(rank, 3))
        part.load_weights(checkpoint.weights(part.shard_for, int4=True))
        assert part.embed_tokens.numel() == 0
        lo = part.vocab_start
        assert torch.equal(part._embed(torch.tensor([0, 16383])), dense[[lo, lo + 16383]])


def test_the_head_kernel_row_limit_follows_the_cpu(monkeypatch):
    """4 rows where oneDNN's GEMM has AMX tiles, 16 on AVX-512 without them (measured:
    ``q8_0._head_kernel_rows``), 4 elsewhere, where PyTorch runs below AVX-512, or when
    PyTorch cannot say; the linear layers' ``INT4_MAX_ROWS`` likewise 8 or 16."""
    for avx512, amx, capability, rows in ((True, True, "AVX512", 4), (True, False, "AVX512", 16),
                                          (True, False, "AVX2", 4), (False, False, "AVX2", 4)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda v=avx512: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda v=capability: v)
        assert q8_0._head_kernel_rows() == rows
        # the linear layers' packed kernels: 8 with AMX (and where unmeasured), 16 on AVX-512 without
        assert base._packed_kernel_rows() == (16 if rows == 16 else 8)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert q8_0._head_kernel_rows() == 4
    assert base._packed_kernel_rows() == 8


@pytest.mark.parametrize("type_name,form,bytes_per_weight", [("Q5_0", (1, True), 0.6875), ("Q5_1", (1, False), 0.75),
                                                             ("Q5_K", (1, False), 0.875), ("Q6_K", (2, True), 1.0),
                                                             ("Q8_0", None, 1.0625)])
def test_the_5_6_bit_layout_holds_the_same_values_in_fewer_bytes(type_name, form, bytes_per_weight):
    """The narrowest layout is picked from the values themselves (Q5_x: 5 bits, Q6_K: 6,
    Q8_0: 8), it takes the bytes a weight the file's own blocks take or close to it
    (nibbles + high-bit planes + scales; the K-quants' per-group scales are float32), and
    it gives the int8 layout's results bit for bit (the same sums in the same order) for
    every row count the kernel's variants cover."""
    n, k = 64, 1536
    w = q8_0.Q8Weight.from_gguf(_raw(type_name, n, k, seed=7), (n, k), type_name)
    assert q8_0.low_bit_form(w.q) == form
    a, b = q8_0.PackedQ8.pack(w), q8_0.PackedQ8.pack(w, max_bits=6)
    assert b.nbytes == pytest.approx(bytes_per_weight * n * k)
    if form is None:
        assert b.hbits is None and torch.equal(a.w, b.w)
        return
    assert b.w.dtype == torch.uint8 and b.w.shape == (n // 16, k // 2, 16) and b.hbits.shape == (n // 16, form[0], k)
    g = torch.Generator().manual_seed(1)
    for m in range(1, 18):
        x = torch.randn(m, k, generator=g)
        want = torch.ops.argosy.q8_linear(x, a.w, a.scales, a.mins, a.group_size, a.n)
        got = torch.ops.argosy.q8_linear(x, b.w, b.scales, b.mins, b.group_size, b.n, None, b.hbits, b.is_signed)
        assert torch.equal(got, want), m
    with pytest.raises(ValueError, match="does not match"):  # high bits without the nibble layout
        torch.ops.argosy.q8_linear(x, a.w, a.scales, a.mins, a.group_size, a.n, None, b.hbits, b.is_signed)
    with pytest.raises(ValueError, match="does not match"):  # the nibble layout without its high bits
        torch.ops.argosy.q8_linear(x, b.w, b.scales, b.mins, b.group_size, b.n)
    with pytest.raises(ValueError, match="does not match"):  # high bits of another layout
        torch.ops.argosy.q8_linear(x, b.w, b.scales, b.mins, b.group_size, b.n, None, b.hbits.transpose(1, 2))


def test_low_bit_form_picks_the_narrowest_range():
    def form(lo, hi):
        return q8_0.low_bit_form(np.array([lo, hi], dtype=np.int8))

    assert form(0, 31) == (1, False) and form(-16, 15) == (1, True) and form(0, 63) == (2, False)
    assert form(-32, 31) == (2, True) and form(-17, 15) == (2, True) and form(-33, 0) is None
    assert form(0, 64) is None and form(-128, 127) is None
    assert q8_0.low_bit_form(np.zeros((0, 4), dtype=np.int8)) is None


def test_a_q5_layer_holds_5_bits_a_q6_k_layer_8_unless_set(monkeypatch):
    """``Linear`` in bfloat16 holds a Q5_1 weight in the 5-bit layout (``hbits`` set) and a
    Q6_K one in the int8 layout by default (``ARGOSY_Q8_LOW_BITS=5``; 6 bits measured slower
    from 2 rows), both low with ``6``, both int8 with ``0``; every layout computes the same
    outputs bit for bit, small calls (the kernel) and large ones (the dense copy or the
    dequantization scratch, whichever the layer keeps) alike; any other value is one clear
    error."""
    from argosy.runtime.layers import Linear

    n, k = 64, 512
    weights = {t: q8_0.Q8Weight.from_gguf(_raw(t, n, k, seed=4), (n, k), t) for t in ("Q5_1", "Q6_K")}
    planes = {None: {"Q5_1": 1, "Q6_K": 0}, "5": {"Q5_1": 1, "Q6_K": 0}, "6": {"Q5_1": 1, "Q6_K": 2},
              "0": {"Q5_1": 0, "Q6_K": 0}}
    outs = {t: [] for t in weights}
    for env, want in planes.items():
        if env is None:
            monkeypatch.delenv(q8_0.LOW_BITS_ENV, raising=False)
        else:
            monkeypatch.setenv(q8_0.LOW_BITS_ENV, env)
        for t, w in weights.items():
            lin = Linear(n, k, False, torch.bfloat16, torch.device("cpu"))
            lin.load_quantized(0, w)
            m = lin.quant_method
            assert isinstance(m, q8_0.Q8Method) and (0 if m.hbits is None else m.hbits.shape[1]) == want[t], (env, t)
            g = torch.Generator().manual_seed(0)
            outs[t].append([lin(torch.randn(rows, k, generator=g).to(torch.bfloat16)) for rows in (1, 5, 12, 40)])
    for t, runs in outs.items():
        for run in runs[1:]:
            assert all(torch.equal(a, b) for a, b in zip(runs[0], run)), t
    monkeypatch.setenv(q8_0.LOW_BITS_ENV, "4")
    with pytest.raises(ValueError, match="ARGOSY_Q8_LOW_BITS='4': expected 5"):
        q8_0.low_bits_setting()
