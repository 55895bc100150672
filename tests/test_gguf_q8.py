"""A GGUF file whose linear layers are 8- and 5-bit (Q8_0, Q5_1, Q5_0) on the fast path:
every layer runs on the grouped int8 kernel (the file's values without loss), greedy
output agrees with the float32 path where that is decisive, and the accuracy gate holds
against llama.cpp on the same file (issue 17, item 1).

The file is the bundled model with layer ``i``'s linear weights re-encoded by the
``gguf`` package (``tests/gguf_files.py``) as Q8_0, Q5_1 or Q5_0 for ``i % 3`` = 0, 1, 2;
K-quant files (Q5_K, Q6_K), which the package cannot write, are covered per block in
tests/test_q8_0.py and end to end by ``benchmarks/accuracy_gate.py`` on llama-quantize
output (README). The float32 path (dense, dequantized by the ``gguf`` package) is the
reference; it equals Hugging Face ``transformers`` (tests/test_hf_reference.py).
"""

from __future__ import annotations

import os

import pytest

from argosy.runtime import cpu_kernels
from argosy.runtime.layers import INT4_MAX_ROWS
from argosy.runtime.quantization.accuracy import distribution_agreement
from argosy.runtime.quantization.q8_0 import Q8Method
from argosy.runtime.worker.executor import weight_bytes_by_format

from .gguf_files import requantize_gguf
from .test_fast_path import SLICE, SLICE_POSITIONS, TOP1_RESOLUTION, assert_greedy_agrees_where_decisive

pytestmark = pytest.mark.skipif(cpu_kernels.compiler() is None and not os.environ.get("CI"),
                                reason="no C++ compiler to build the kernel")

KINDS = ("Q8_0", "Q5_1", "Q5_0")

#: llama.cpp on this file and slice (``benchmarks/accuracy_gate.py --model <this file>
#: --slice tests/data/seed_slice.txt``, llama-cpp-python 0.3.36, ``logits_all=True``)
#: against the float32 reference, 733 positions: KL 0.003418 nats, top-1 713 of 733.
#: Ours in the same run: 0.001329 / 716 of 733. (A per-row int8 requantization of the
#: same layers on ``_weight_int8pack_mm``, tried first: 0.004509 / 704, failing both.)
LLAMA_CPP_MIXED_SLICE_KL = 0.003418
LLAMA_CPP_MIXED_SLICE_TOP1 = 713 / 733


@pytest.fixture(scope="module")
def mixed(model_path, tmp_path_factory):
    from argosy.runtime.loader import load_checkpoint

    path = str(tmp_path_factory.mktemp("gguf_q8") / "smollm2-q8_0-q5_1-q5_0.gguf")
    requantize_gguf(model_path, path, lambda i, kind: KINDS[i % 3])
    return load_checkpoint(path)


@pytest.fixture(scope="module")
def engines(mixed):
    from argosy.runtime.config import EngineArgs
    from argosy.runtime.core.engine import LLMEngine
    from argosy.runtime.quantization import q8_0

    def make(dtype):
        return LLMEngine(EngineArgs(model=mixed.path, dtype=dtype, max_model_len=1024, kv_cache_memory=128 << 20),
                         checkpoint=mixed)

    with pytest.MonkeyPatch.context() as mp:  # the layouts asserted below are the default setting's
        mp.delenv(q8_0.LOW_BITS_ENV, raising=False)
        return make("bfloat16"), make("float32")


def test_tensor_parallel_shards_equal_slicing_the_whole(mixed):
    """TP=3 shards read from the file slice by slice equal the whole weight decoded and
    sliced: rows for column-parallel layers (with the q/k row un-permutation), group
    aligned columns for row-parallel ones, for each of the three types."""
    import numpy as np

    from argosy.runtime.quantization.q8_0 import Q8Weight

    from .conftest import shard_plan

    whole = dict(mixed.weights(None, int4=True))
    for rank in range(3):
        model = shard_plan(mixed.config, rank, 3)
        shards = dict(mixed.weights(model.shard_for, int4=True))
        for layer in (3, 4, 5):
            for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.down_proj"):
                name = f"model.layers.{layer}.{part}.weight"
                dim, start, stop = model.shard_for(name)
                want = whole[name].rows(start, stop) if dim == 0 else whole[name].cols(start, stop)
                got = shards[name]
                assert isinstance(got, Q8Weight) and got.group_size == want.group_size, name
                for a, b in ((got.q, want.q), (got.scale, want.scale), (got.min, want.min)):
                    if a is None or b is None:
                        assert a is None and b is None, name
                    else:
                        np.testing.assert_array_equal(a, b)


def test_every_linear_layer_runs_on_the_grouped_int8_kernel(engines):
    fast, ref = engines
    model = fast.executor.runner.model
    assert sum(isinstance(getattr(m, "quant_method", None), Q8Method) for m in model.modules()) == 4 * model.cfg.num_hidden_layers
    assert model.logits_q8 is not None  # the Q8_0 tied head, as in the bundled file
    # Q5_1 / Q5_0 layers hold their integers in 5 bits (nibbles + one high-bit plane, unsigned / two's
    # complement), Q8_0 in 8
    form = {"Q8_0": (None, False), "Q5_1": (1, False), "Q5_0": (1, True)}
    for i, layer in enumerate(model.layers):
        methods = [m.quant_method for m in layer.modules() if isinstance(getattr(m, "quant_method", None), Q8Method)]
        assert len(methods) == 4
        for m in methods:
            assert (None if m.hbits is None else m.hbits.shape[1], m.is_signed) == form[KINDS[i % 3]], i
    fmt = weight_bytes_by_format(model)  # the startup summary's weight bytes by format
    five = [m.quant_method for m in model.modules() if getattr(getattr(m, "quant_method", None), "hbits", None) is not None]
    assert fmt["grouped 5-bit"] == sum(b.nbytes for m in five for b in m.buffers())
    assert fmt["grouped int8"] > model.logits_q8.nbytes  # the head and the Q8_0 layers
    assert not any(isinstance(getattr(m, "quant_method", None), Q8Method) for m in ref.executor.runner.model.modules())


@pytest.mark.slow
def test_greedy_agrees_with_float32_where_float32_is_decisive(engines):
    fast, ref = engines
    assert_greedy_agrees_where_decisive(fast, ref)


@pytest.mark.slow
def test_accuracy_gate_against_llama_cpp_on_the_same_file(engines):
    """Teacher-forced over the slice in decode-shaped steps (the kernel runs): KL and
    top-1 against float32 dense on the same file no worse than llama.cpp's."""
    fast, ref = engines
    ids = ref.tokenizer.encode(SLICE.read_text())
    assert len(ids) == SLICE_POSITIONS + 1
    got = distribution_agreement(ref.prompt_logits(ids)[:-1], fast.prompt_logits(ids, chunk_size=INT4_MAX_ROWS)[:-1])
    assert got.mean_kl <= LLAMA_CPP_MIXED_SLICE_KL, got
    assert got.top1 >= LLAMA_CPP_MIXED_SLICE_TOP1 - TOP1_RESOLUTION, got
