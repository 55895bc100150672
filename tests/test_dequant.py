"""Quantized CPU layers without dense copies (``argosy.runtime.quantization.dequant``):
the C++ dequantization kernels against the ``gguf`` package's own dequantizer (GGUF 4-,
5-, 6- and 8-bit blocks) and against the dense copies the layers kept before (bit for
bit), the portable (no AVX-512) build, ``Linear``'s large calls on the scratch matrix, and
the ops under ``torch.compile``."""

from __future__ import annotations

import ctypes
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from argosy.runtime import cpu_kernels
from argosy.runtime.layers import INT4_MAX_ROWS, Linear
from argosy.runtime.layers import linear as linear_mod
from argosy.runtime.quantization import dequant, q8_0
from argosy.runtime.quantization.gguf import decode_int4
from argosy.runtime.quantization.int4 import Int4CpuMethod, Int4Weight, pack
from argosy.runtime.quantization.int8 import Int8Weight

from .test_q8_0 import _raw, _reference
from .test_quantization import _gguf_dequantize, _raw_blocks

# Skipped only on a developer machine without a C++ compiler; under CI (``CI`` set) a
# kernel that does not build fails test_the_kernel_builds_and_loads and the tests below.
pytestmark = pytest.mark.skipif(cpu_kernels.compiler() is None and not os.environ.get("CI"),
                                reason="no C++ compiler to build the kernel")
_INT4PACK_BLOCK = dequant.int4pack_block


def test_the_kernel_builds_and_loads():
    assert dequant.KERNEL.build().exists()  # a compile error is raised here, with the compiler's stderr
    assert dequant.kernel() is not None


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


def _int4(type_name: str, n: int, k: int, seed: int = 0) -> tuple[Int4Weight, np.ndarray]:
    raw = _raw_blocks(type_name, n, k, seed=seed)
    return decode_int4(raw, type_name, (n, k)), _gguf_dequantize(raw, type_name, n, k)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q4_K"])
def test_int4_dequantization_equals_the_gguf_dequantizer(type_name):
    """``W = (q - 8) * scale + zero`` from the nibbles and PyTorch's bfloat16 scales and
    zeros: within the bfloat16 rounding of the scales (2^-7 of the largest weight) of the
    ``gguf`` package's dequantization, and bit-identical to the dense copy a layer kept
    before (:meth:`Int4Weight.dequantize`, kernel rounding)."""
    n, k = 96, 512
    w, ref = _int4(type_name, n, k)
    _, sz = pack(w, torch.bfloat16)
    got = dequant.int4_dequantize(dequant.pack_nibbles(w.q), sz, w.group_size)
    np.testing.assert_allclose(got.float().numpy(), ref, rtol=0, atol=float(np.abs(ref).max()) * 2**-7)
    assert torch.equal(_bits(got), _bits(w.dequantize(torch.bfloat16, kernel_rounding=True)))


@pytest.mark.parametrize("n", [64, 96, 160, 576])
def test_pytorchs_packed_int4_weight_is_read_directly(n):
    """The kernel reads PyTorch's own packed int4 weight (no second copy of the
    integers): this PyTorch's layout is the one :func:`dequant.torch_int4pack_model`
    describes (whole row blocks and, for 96 and 160 rows, a last partial block), and
    dequantizing it gives the nibble layout's bits, whole and by row blocks. Fails when a
    PyTorch upgrade changes the layout (layers would then keep the nibbles again)."""
    block = dequant.int4pack_block()
    assert block in (64, 32), "PyTorch's CPU int4 layout is not the one the kernel reads"
    w, _ = _int4("Q4_K", n, 512, seed=n)
    packed, sz = pack(w, torch.bfloat16)
    assert np.array_equal(packed.view(-1).numpy(), dequant.torch_int4pack_model(w.q, block))
    want = dequant.int4_dequantize(dequant.pack_nibbles(w.q), sz, w.group_size)
    assert torch.equal(_bits(dequant.int4pack_dequantize(packed, sz, w.group_size, block)), _bits(want))
    for n0 in range(0, n, block):
        n1 = min(n, n0 + block)
        part = dequant.int4pack_dequantize(packed, sz, w.group_size, block, rows=(n0, n1))
        assert torch.equal(_bits(part), _bits(want[n0:n1]))


@pytest.mark.parametrize("low_bits", [False, True], ids=["int8", "5-6bit"])
@pytest.mark.parametrize("type_name", q8_0.TYPES)
def test_grouped_int8_dequantization_equals_the_gguf_dequantizer(type_name, low_bits):
    """Q8_0, Q5_0, Q5_1, Q5_K, Q6_K (group 16, float32 scales, offsets) from the tiled
    layout (int8, or the 5/6-bit one of the linear layers): the ``gguf`` package's float32
    dequantization rounded once to bfloat16, bit for bit, for 40 rows (a partial tile of
    16); and the scratch product over it, blocks of rows starting on tiles."""
    n, k = 40, 512
    raw = _raw(type_name, n, k, seed=5)
    w = q8_0.Q8Weight.from_gguf(raw, (n, k), type_name)
    p = q8_0.PackedQ8.pack(w, max_bits=6 * low_bits)
    got = dequant.q8_dequantize(p.w, p.scales, p.mins, p.group_size, p.n, hbits=p.hbits, is_signed=p.is_signed)
    want = _reference(raw, type_name, n, k).float().to(torch.bfloat16)
    assert torch.equal(_bits(got), _bits(want))
    x = torch.randn(24, k).to(torch.bfloat16)
    y = dequant.q8_dense_linear(x, p.w, p.scales, p.mins, p.group_size, p.n, None, p.hbits, p.is_signed,
                                max_elements=16 * k)  # three 16-row blocks, each on its own GEMM
    for n0 in range(0, n, 16):
        assert torch.equal(y[:, n0 : n0 + 16], torch.nn.functional.linear(x, want[n0 : n0 + 16])), n0


def test_int8_dequantization():
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-128, 128, (48, 80), dtype=torch.int8, generator=gen)
    s = (torch.rand(48, generator=gen) * 0.01).to(torch.bfloat16)
    got = dequant.int8_dequantize(q, s)
    assert torch.equal(_bits(got), _bits((q.float() * s.float()[:, None]).to(torch.bfloat16)))
    assert torch.equal(_bits(got), _bits(Int8Weight(q, s.float()).dequantize(torch.bfloat16)))


def test_the_portable_build_gives_the_same_bits(tmp_path, monkeypatch):
    """Without the AVX-512 flags the source compiles its portable loops (a CPU without
    AVX-512): the same bits for all three kernels."""
    monkeypatch.setattr(cpu_kernels, "isa_flags", lambda: [])
    lib = ctypes.CDLL(str(dequant.KERNEL.build(tmp_path)))
    dequant._declare(lib)
    w, _ = _int4("Q4_1", 64, 256, seed=2)
    _, sz = pack(w, torch.bfloat16)
    out = torch.empty(48, 256, dtype=torch.bfloat16)  # rows 16..64
    assert lib.argosy_int4_dequant(dequant.pack_nibbles(w.q).data_ptr(), sz.data_ptr(), 32, 64, 256, 16, 64,
                                   out.data_ptr()) == 0
    assert torch.equal(_bits(out), _bits(w.dequantize(torch.bfloat16)[16:]))
    for n, block in ((96, 64), (96, 32), (80, 32)):  # PyTorch's layout, whole and partial blocks
        w, _ = _int4("Q4_K", n, 256, seed=n)
        sz = torch.stack([torch.from_numpy(w.scale).t(), torch.from_numpy(w.zero).t()], -1).to(torch.bfloat16)
        packed = torch.from_numpy(dequant.torch_int4pack_model(w.q, block)).view(n, 128)
        out = torch.empty(256, n, dtype=torch.bfloat16)  # (this kernel writes W transposed)
        assert lib.argosy_int4pack_dequant(packed.data_ptr(), sz.data_ptr(), w.group_size, n, 256, block, 0, n,
                                           out.data_ptr()) == 0
        assert torch.equal(_bits(out.t()), _bits(w.dequantize(torch.bfloat16))), (n, block)
    for type_name, low_bits in (("Q5_K", False), ("Q6_K", False), ("Q8_0", False), ("Q5_K", True), ("Q6_K", True),
                                ("Q5_0", True)):
        n, k = 24, 512
        qw = q8_0.Q8Weight.from_gguf(_raw(type_name, n, k, seed=3), (n, k), type_name)
        p = q8_0.PackedQ8.pack(qw, max_bits=6 * low_bits)
        assert (p.hbits is not None) == low_bits
        out = torch.empty(n, k, dtype=torch.bfloat16)
        assert lib.argosy_q8_dequant(p.w.data_ptr(), None if p.hbits is None else p.hbits.data_ptr(), p.planes,
                                     p.is_signed, p.scales.data_ptr(), None if p.mins is None else p.mins.data_ptr(),
                                     p.scales.dtype == torch.int16, p.group_size, n, k, out.data_ptr()) == 0
        assert torch.equal(_bits(out), _bits(qw.dequantize(torch.bfloat16))), (type_name, low_bits)
    q = torch.randint(-128, 128, (8, 40), dtype=torch.int8)
    s = torch.rand(8).to(torch.bfloat16)
    out = torch.empty(8, 40, dtype=torch.bfloat16)
    assert lib.argosy_int8_dequant(q.data_ptr(), s.data_ptr(), 8, 40, out.data_ptr()) == 0
    assert torch.equal(_bits(out), _bits((q.float() * s.float()[:, None]).to(torch.bfloat16)))


def test_bad_layouts_are_refused():
    w, _ = _int4("Q4_0", 32, 64)
    _, sz = pack(w, torch.bfloat16)
    with pytest.raises(ValueError, match="do not match"):
        dequant.int4_dequantize(dequant.pack_nibbles(w.q), sz, 64)  # the scales are per 32
    with pytest.raises(ValueError, match="multiple of 32"):
        dequant.pack_nibbles(np.zeros((4, 48), dtype=np.uint8))
    w96, _ = _int4("Q4_0", 96, 64)
    packed96, sz96 = pack(w96, torch.bfloat16)
    for bad_rows in ((32, 96), (0, 48)):  # PyTorch's layout: row ranges start on a block, end on one or at N
        with pytest.raises(ValueError, match="do not match"):
            dequant.int4pack_dequantize(packed96, sz96, 32, 64, rows=bad_rows)
    with pytest.raises(ValueError, match="do not match"):
        dequant.int4pack_dequantize(packed96, sz96, 32, 48)  # not a block of the layout
    with pytest.raises(ValueError, match="do not match"):
        dequant.int8_dequantize(torch.zeros(4, 8, dtype=torch.int8), torch.ones(3, dtype=torch.bfloat16))
    # the kernels write through raw pointers: a wrong output buffer is refused, not overrun
    q, s = torch.zeros(4, 8, dtype=torch.int8), torch.ones(4, dtype=torch.bfloat16)
    for bad in (torch.empty(3, 8, dtype=torch.bfloat16), torch.empty(4, 8, dtype=torch.float32),
                torch.empty(8, 4, dtype=torch.bfloat16).t()):
        with pytest.raises(ValueError, match="out must be"):
            dequant.int8_dequantize(q, s, bad)
    with pytest.raises(ValueError, match="out must be"):
        dequant.int4_dequantize(dequant.pack_nibbles(w.q), sz, 32, torch.empty(16, 64, dtype=torch.bfloat16))
    p = q8_0.PackedQ8.pack(q8_0.Q8Weight.from_gguf(_raw("Q8_0", 16, 64), (16, 64), "Q8_0"))
    with pytest.raises(ValueError, match="do not match"):
        dequant.q8_dequantize(p.w, p.scales.reshape(1, 1, 32), None, 64, 16)  # not a group size of the layout


def _layer(parts, monkeypatch, keep: bool, nibbles: bool = False) -> Linear:
    """A layer of ``parts``; ``nibbles``: as where PyTorch's int4 layout is not the one the
    kernel reads (the integers kept a second time)."""
    monkeypatch.setattr(linear_mod, "DENSE_COPIES", "keep" if keep else "scratch")
    monkeypatch.setattr(dequant, "int4pack_block", (lambda: 0) if nibbles else _INT4PACK_BLOCK)
    n = sum(p.shape[0] for _, p in parts)
    lin = Linear(n, parts[0][1].shape[1], True, torch.bfloat16, torch.device("cpu"))
    lin.bias.data.copy_(torch.linspace(-1, 1, n))
    for start, p in parts:
        lin.load_quantized(start, p)
    return lin


def _parts(kind: str, k: int = 256) -> list:
    """Quantized parts ``(row start, weight)`` of a layer of each kind (96 rows; q8: 88, its
    last 16-row tile partial)."""
    if kind.startswith("int4"):  # "int4", "int4-actorder", "int4-nibbles"
        a, _ = _int4("Q4_1", 64, k, seed=1)
        b, _ = _int4("Q4_0", 32, k, seed=2)
        if kind == "int4-actorder":
            perm = np.random.default_rng(0).permutation(k)
            a, b = (Int4Weight(w.q, w.scale, w.zero, w.group_size, perm) for w in (a, b))
        return [(0, a), (64, b)]
    if kind == "int8":
        gen = torch.Generator().manual_seed(0)
        return [(0, Int8Weight(torch.randint(-127, 128, (96, k), dtype=torch.int8, generator=gen),
                               torch.rand(96, generator=gen) * 0.01))]
    return [(0, q8_0.Q8Weight.from_gguf(_raw("Q5_1", 64, k, seed=1), (64, k), "Q5_1")),
            (64, q8_0.Q8Weight.from_gguf(_raw("Q6_K", 24, k, seed=2), (24, k), "Q6_K"))]  # a partial 16-row tile


@pytest.mark.parametrize("kind", ["int4", "int4-nibbles", "int4-actorder", "int8", "q8"])
def test_a_weight_larger_than_the_scratch_runs_in_row_blocks(kind, monkeypatch):
    """With the scratch capped at 40 rows' worth, the layer runs in blocks of 32 rows
    (16-row multiples; the q8 layer's last block 24 rows, a partial tile; PyTorch's int4
    layout in its own row blocks, 64 and a partial 32 with AVX-512), each product written
    into its columns: the same output, bit for bit, as one whole-weight product."""
    lin = _layer(_parts(kind), monkeypatch, keep=False, nibbles=kind == "int4-nibbles")
    x = torch.randn(24, 256, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    whole = lin(x)
    monkeypatch.setattr(dequant, "SCRATCH_MAX_ELEMENTS", 40 * 256)
    calls = []
    real = dequant.scratch
    # (rows of the weight each block dequantizes: the scratch is [rows, 256], or [256, rows] transposed)
    monkeypatch.setattr(dequant, "scratch", lambda n, k: (calls.append(n * k // 256), real(n, k))[1])
    assert torch.equal(_bits(lin(x)), _bits(whole))
    block = dequant.int4pack_block()
    assert calls == ([32, 32, 24] if kind == "q8" else [64, 32] if kind in ("int4", "int4-actorder") and block == 64
                     else [32, 32, 32])


@pytest.mark.parametrize("kind", ["int4", "int4-nibbles", "int4-actorder", "int8", "q8"])
def test_large_calls_run_on_the_scratch_and_equal_the_dense_copy(kind, monkeypatch):
    """A quantized CPU layer frees its dense weight once every row arrived (no
    ``process_weights_after_loading`` call needed) and runs calls of more than
    ``INT4_MAX_ROWS`` rows on the scratch matrix: the same output as the same layer with
    its dense copy kept (``ARGOSY_CPU_DENSE_COPIES=keep``), bit for bit (act-order: the
    input's columns are gathered instead, so the sums run in another order); small calls
    still take the packed kernels."""
    k = 256
    parts = _parts(kind, k)
    lean = _layer(parts, monkeypatch, keep=False, nibbles=kind == "int4-nibbles")
    kept = _layer(parts, monkeypatch, keep=True)
    assert lean.dense_on_demand and lean.weight.numel() == 0
    if kind.startswith("int4"):  # the integers once (PyTorch's packed weight), or twice where it cannot be read
        assert (lean.quant_method.nibbles is not None) == (kind == "int4-nibbles")
        assert (lean.quant_method.block == 0) == (kind == "int4-nibbles")
        assert kept.quant_method.nibbles is None
    assert not kept.dense_on_demand and kept.weight.shape == (lean.out_features, k)
    assert torch.equal(lean.dense_weight(), kept.weight)  # (as values: a weight of zero may differ in sign)
    gen = torch.Generator().manual_seed(3)
    for rows in (INT4_MAX_ROWS + 1, 40):
        x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
        got, want = lean(x), kept(x)
        if kind == "int4-actorder":
            torch.testing.assert_close(got.float(), want.float(), atol=0.02 * want.abs().max().item(), rtol=0)
        else:
            assert torch.equal(_bits(got), _bits(want)), kind
        torch.testing.assert_close(got.float(), F.linear(x.float(), lean.dense_weight().float(), lean.bias.float()),
                                   atol=0.02 * want.abs().max().item(), rtol=0)
    x = torch.randn(INT4_MAX_ROWS, k, generator=gen).to(torch.bfloat16)
    assert torch.equal(_bits(lean(x)), _bits(kept(x)))  # the packed kernels, same in both


def test_a_partly_dense_layer_keeps_its_dense_weight(monkeypatch):
    """Rows that came dense (some other form in the checkpoint) keep the layer dense:
    the quantized rows' values are written into it at processing, exactly (no kernel
    runs them: the checkpoint's float32 scales, not the kernels' rounded ones)."""
    w, _ = _int4("Q4_1", 64, 128)
    lin = _layer([(0, w)], monkeypatch, keep=False)
    lin2 = Linear(96, 128, False, torch.bfloat16, torch.device("cpu"))
    lin2.weight.data[64:] = 1.0
    lin2.load_quantized(0, w)
    lin2.process_weights_after_loading()
    assert not lin2.dense_on_demand and lin2.quant_method is None
    assert torch.equal(_bits(lin2.weight[:64]), _bits(w.dequantize(torch.bfloat16, kernel_rounding=False)))
    assert torch.equal(lin2.weight[64:], torch.ones(32, 128, dtype=torch.bfloat16))
    assert lin.dense_on_demand


def test_the_ops_trace_under_torch_compile(monkeypatch):
    """``torch.compile`` traces through the opaque ops (their fake implementations give
    the shapes), as the compiled decode graphs of more than ``INT4_MAX_ROWS`` rows do."""
    w, _ = _int4("Q4_1", 64, 128)
    lin = _layer([(0, w)], monkeypatch, keep=False)
    x = torch.randn(INT4_MAX_ROWS + 8, 128).to(torch.bfloat16)
    compiled = torch.compile(lambda t: lin(t) * 2, backend="aot_eager", fullgraph=True, dynamic=True)
    assert torch.equal(compiled(x), lin(x) * 2)


def test_gather_columns():
    """The act-order input gather equals ``x[:, perm]`` (bfloat16 and float16); an index
    outside ``[0, K)`` is refused, not read."""
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(300, 96, generator=gen).to(dtype)  # enough rows for the parallel loop
        perm = torch.randperm(96, generator=gen)
        assert torch.equal(dequant.gather_columns(x, perm), x[:, perm])
    with pytest.raises(ValueError, match="outside"):
        dequant.gather_columns(x, torch.full((96,), 96, dtype=torch.int64))


def test_the_memory_limit_is_the_lowest_cgroup_limit_on_the_path(tmp_path):
    """cgroup v2: ``memory.max`` of the process's cgroup and every parent (``max`` = no
    limit); v1: the ``memory`` controller's ``memory.limit_in_bytes`` likewise; physical
    memory when nothing is lower."""
    import os

    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    root = tmp_path / "cg"
    (root / "kubepods" / "pod1" / "ctr").mkdir(parents=True)
    (root / "kubepods" / "pod1" / "ctr" / "memory.max").write_text("max\n")
    (root / "kubepods" / "pod1" / "memory.max").write_text(f"{4 << 30}\n")
    (root / "kubepods" / "memory.max").write_text(f"{8 << 30}\n")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/kubepods/pod1/ctr\n")
    assert linear_mod.memory_limit_bytes(str(proc), str(root)) == min(physical, 4 << 30)
    (root / "memory" / "docker" / "c1").mkdir(parents=True)
    (root / "memory" / "docker" / "c1" / "memory.limit_in_bytes").write_text(f"{2 << 30}\n")
    proc.write_text("12:cpu,cpuacct:/docker/c1\n4:memory:/docker/c1\n")
    assert linear_mod.memory_limit_bytes(str(proc), str(root)) == min(physical, 2 << 30)
    proc.write_text("0::/\n")
    assert linear_mod.memory_limit_bytes(str(proc), str(tmp_path / "none")) == physical


def test_the_decision_counts_the_whole_model_under_tensor_parallelism(checkpoint, monkeypatch):
    """Every tensor-parallel rank runs on the machine: each rank decides on the whole
    model's dense bytes (its shard's x the world size), LM head included, and every linear
    layer gets the answer. (The bundled model ties its LM head, so an untied config is
    used; weights are allocated, never written.)"""
    import dataclasses

    from argosy.runtime.distributed import TPGroup
    from argosy.runtime.models.llama import LlamaForCausalLM

    cfg = dataclasses.replace(checkpoint.config, tie_word_embeddings=False, num_hidden_layers=2)

    def model(rank: int, world: int) -> LlamaForCausalLM:
        tp = TPGroup.__new__(TPGroup)
        tp.rank, tp.world_size = rank, world
        return LlamaForCausalLM(cfg, torch.bfloat16, torch.device("cpu"), max_positions=64, tp=tp)

    whole = model(0, 1)
    assert whole.lm_head is not None
    want = sum(m.out_features * m.in_features * 2 for m in whole.modules() if isinstance(m, Linear))
    for answer in (True, False):
        seen = []
        monkeypatch.setattr(linear_mod, "keep_dense_copies", lambda b: (seen.append(b), answer)[1])
        shard = model(1, 3)
        shard._decide_dense_copies()
        assert seen == [want]
        layers = [m for m in shard.modules() if isinstance(m, Linear)]
        assert shard.lm_head in layers and all(m.keep_dense_copy is answer for m in layers)


def test_auto_keeps_dense_copies_only_when_they_are_a_small_share_of_memory(monkeypatch):
    """``ARGOSY_CPU_DENSE_COPIES``: ``keep`` / ``scratch`` decide; ``auto`` keeps the copies
    when they take at most 1/16 of the memory limit (physical memory or the cgroup's); any
    other value is one clear error."""
    monkeypatch.setattr(linear_mod, "memory_limit_bytes", lambda: 16 << 30)
    for mode, small, large in (("auto", True, False), ("keep", True, True), ("scratch", False, False)):
        monkeypatch.setattr(linear_mod, "DENSE_COPIES", mode)
        assert linear_mod.keep_dense_copies(1 << 30) is small, mode
        assert linear_mod.keep_dense_copies((1 << 30) + 1) is large, mode
    monkeypatch.setattr(linear_mod, "DENSE_COPIES", "never")
    with pytest.raises(ValueError, match="ARGOSY_CPU_DENSE_COPIES='never'"):
        linear_mod.keep_dense_copies(0)
    monkeypatch.undo()
    limit = linear_mod.memory_limit_bytes()
    import os

    assert 0 < limit <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@pytest.mark.slow
def test_the_bundled_model_without_dense_copies(make_engine, monkeypatch, caplog):
    """The bundled model without dense copies (``ARGOSY_CPU_DENSE_COPIES=auto`` under a 1 GiB
    memory limit) against ``keep``: its 120
    4-bit layers hold no dense copy (the weight bytes drop by the copies, 2 bytes a weight,
    and by the tied Q8_0 embedding's bfloat16 copy, and nothing else: the dequantization
    reads PyTorch's packed weight), and greedy output is identical token for token
    (prompts of more than ``INT4_MAX_ROWS`` tokens: their prefill runs on the scratch
    matrix, the same values as the dense copies)."""
    from argosy.runtime import SamplingParams
    from argosy.runtime.worker.executor import weight_bytes_by_format

    from .conftest import run_to_completion
    from .test_fast_path import PROMPTS

    engines = {}
    monkeypatch.setattr(linear_mod, "DENSE_COPIES", "keep")
    engines["keep"] = make_engine(dtype="bfloat16", compilation_config="0")
    # auto, in a 1 GiB container: the copies (202 MiB) would pass 1/16 of it
    monkeypatch.setattr(linear_mod, "DENSE_COPIES", "auto")
    monkeypatch.setattr(linear_mod, "memory_limit_bytes", lambda: 1 << 30)
    with caplog.at_level("INFO", logger="argosy.model"):
        engines["scratch"] = make_engine(dtype="bfloat16", compilation_config="0")
    assert any(r.getMessage().startswith("0 of 120 quantized linear layers keep a dense copy") for r in caplog.records)
    layers = {mode: [m for m in e.executor.runner.model.modules() if isinstance(m, Linear) and isinstance(m.quant_method, Int4CpuMethod)]
              for mode, e in engines.items()}
    assert len(layers["scratch"]) == 120 and all(m.dense_on_demand for m in layers["scratch"])
    assert not any(m.dense_on_demand for m in layers["keep"])
    by = {mode: weight_bytes_by_format(e.executor.runner.model) for mode, e in engines.items()}
    weights = sum(m.out_features * m.in_features for m in layers["scratch"])
    assert "bfloat16 dense copies" not in by["scratch"] and by["keep"]["bfloat16 dense copies"] == 2 * weights
    # and the tied Q8_0 embedding / LM head is held once, in the file's form
    models = {mode: e.executor.runner.model for mode, e in engines.items()}
    assert models["scratch"].embed_q8 is not None and models["keep"].embed_q8 is None
    embedding = 2 * models["keep"].embed_tokens.numel()
    assert sum(by["keep"].values()) - sum(by["scratch"].values()) == 2 * weights + embedding
    tok = engines["keep"].tokenizer
    prompts = [ids for ids in (tok.encode(p) for p in PROMPTS) if len(ids) > INT4_MAX_ROWS]
    prompts.append(tok.encode(" ".join(PROMPTS)))
    assert len(prompts) >= 3
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    assert run_to_completion(engines["scratch"], prompts, params) == run_to_completion(engines["keep"], prompts, params)


@pytest.mark.parametrize("capability,block", [("avx2", 32), ("default", 0)])
def test_the_layout_check_follows_pytorchs_cpu_capability(capability, block, tmp_path):
    """PyTorch packs int4 weights by the CPU capability it runs with: under AVX2 in row
    blocks of 32, which the kernel reads (a 4-bit layer without a dense copy then holds
    no nibbles and equals its dense copy); without vector code in another layout, which
    the check refuses: the layer keeps the nibbles and still computes the same output."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import numpy as np, torch\n"
        "from argosy.runtime.layers import Linear, linear\n"
        "from argosy.runtime.quantization import dequant\n"
        "from argosy.runtime.quantization.int4 import Int4Weight\n"
        "rng = np.random.default_rng(0)\n"
        "w = Int4Weight(rng.integers(0, 16, (96, 128), dtype=np.uint8), rng.random((96, 4), dtype=np.float32) / 50,\n"
        "               rng.random((96, 4), dtype=np.float32) / 50 - 0.01, 32)\n"
        "layers = []\n"
        "for mode in ('scratch', 'keep'):\n"
        "    linear.DENSE_COPIES = mode\n"
        "    lin = Linear(96, 128, False, torch.bfloat16, torch.device('cpu'))\n"
        "    lin.load_quantized(0, w)\n"
        "    layers.append(lin)\n"
        "x = torch.randn(40, 128).to(torch.bfloat16)\n"
        "assert layers[0].dense_on_demand and torch.equal(layers[0](x), layers[1](x))\n"
        "print(dequant.int4pack_block(), layers[0].quant_method.nibbles is not None)\n")
    import os
    import subprocess
    import sys

    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(block), str(block == 0)]
    assert ("not one the dequantization kernel reads" in out.stderr) == (block == 0)
