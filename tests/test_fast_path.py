"""The fast CPU path (bfloat16, 4-bit GGUF weights packed) against the float32 dense
path on the bundled model (issue 17): greedy agreement where float32 is decisive, and the
teacher-forced accuracy gate measured against llama.cpp on the same text.

The float32 path (the same file dequantized, dense) is the reference: it agrees with
Hugging Face ``transformers`` exactly (tests/test_hf_reference.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from argosy.runtime import SamplingParams
from argosy.runtime.layers import INT4_MAX_ROWS
from argosy.runtime.quantization.accuracy import distribution_agreement
from argosy.runtime.quantization.int4 import Int4CpuMethod

from .conftest import run_to_completion

#: llama.cpp on the same slice and the same GGUF (``benchmarks/accuracy_gate.py --slice
#: tests/data/seed_slice.txt``, llama-cpp-python 0.3.36 built from its PyPI sdist,
#: ``logits_all=True``), against the same float32 reference, 733 positions: mean KL
#: divergence 0.003128 nats, top-1 agreement 0.9823 (720 of 733). The KL gate is strict
#: (ours: 0.00137-0.00140). Top-1 on 733 positions moves with arithmetic that does not
#: change the model: the same fast path gave 719 of 733 in 4-token steps, 715 in 8-token
#: steps, and the dense bf16 prefill 716; on a CPU without AMX (AVX-512 BF16 only, where
#: oneDNN's bfloat16 kernels accumulate differently) the same code gives 712 with KL
#: 0.00136. One standard error of a top-1 rate near 0.98 over 733 positions is 0.005, so
#: top-1 is checked to within 1.5% (11 positions, three standard errors) of llama.cpp
#: here; KL is the strict criterion. Over all seed texts (20,968 positions, 4-token
#: steps) ours is better on both: KL 0.00133 vs 0.00336, top-1 0.9728 vs 0.9673 (README).
LLAMA_CPP_SLICE_KL = 0.003128
LLAMA_CPP_SLICE_TOP1 = 720 / 733
TOP1_RESOLUTION = 0.015
SLICE_POSITIONS = 733

SLICE = Path(__file__).parent / "data" / "seed_slice.txt"

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Kubernetes is an open-source system for",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "To make a cup of tea, first",
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nName the largest planet in the solar system.<|im_end|>\n<|im_start|>assistant\n",
    "import numpy as np\n\ndef mean(x):\n",
    "Monday, Tuesday, Wednesday,",
    "1, 2, 3, 4, 5,",
    "The quick brown fox",
]
#: float32 top-2 log-probability gap below which a greedy step is a near tie (bfloat16's
#: logit error on this model is a few hundredths; see the accuracy gate)
MARGIN = 0.5


@pytest.fixture(scope="module")
def fast_engine(make_engine):
    eng = make_engine(dtype="bfloat16", max_model_len=1024)
    model = eng.executor.runner.model
    packed = [m for m in model.modules() if isinstance(getattr(m, "quant_method", None), Int4CpuMethod)]
    assert len(packed) == 4 * model.cfg.num_hidden_layers, "every Q4_1 linear layer runs packed"
    return eng


def assert_greedy_agrees_where_decisive(engine, ref_engine, max_tokens: int = 16) -> None:
    """Per prompt of PROMPTS, ``engine``'s greedy tokens equal the float32 ``ref_engine``'s
    up to the first step where float32's top-2 log-probabilities are within MARGIN (a near
    tie bfloat16 may legitimately flip); at least 32 tokens in all are compared."""
    tok = ref_engine.tokenizer
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=2)
    compared = 0
    for p in PROMPTS:
        ids = tok.encode(p)
        ref_engine.add_request("r", ids, params)
        steps = []
        while ref_engine.has_unfinished_requests():
            steps += ref_engine.step()
        ref_tokens = steps[-1].output_token_ids
        margins = [top[0][1] - top[1][1] for (_, _, top) in (s.logprobs[0] for s in steps)]
        clear = next((i for i, m in enumerate(margins) if m < MARGIN), len(margins))
        got = run_to_completion(engine, [ids], SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
        assert got["0"][:clear] == ref_tokens[:clear], (p, tok.decode(ref_tokens), tok.decode(got["0"]))
        compared += clear
    assert compared >= 32, f"only {compared} decisive tokens compared"


def test_pytorchs_module_walk_reaches_every_module(fast_engine):
    """``model.apply(fn)`` (PyTorch's walk, calling each submodule's ``apply``) runs over
    the loaded model, quantization methods and rotary embedding included: none of our
    modules names a method ``apply`` (vLLM's ``apply`` is the methods' ``forward``)."""
    model = fast_engine.executor.runner.model
    seen = []
    model.apply(lambda m: seen.append(m))
    assert len(seen) == len(list(model.modules()))
    assert sum(isinstance(m, Int4CpuMethod) for m in seen) == 4 * model.cfg.num_hidden_layers


def test_greedy_agrees_with_float32_where_float32_is_decisive(fast_engine, ref_engine):
    """See :func:`assert_greedy_agrees_where_decisive`."""
    assert_greedy_agrees_where_decisive(fast_engine, ref_engine)


def test_accuracy_gate_against_llama_cpp(fast_engine, ref_engine):
    """Teacher-forced over a slice of the founding documents: the fast path's next-token
    distributions (decode-shaped steps of INT4_MAX_ROWS tokens, so the packed int4
    kernel runs) against float32 dense, no worse than llama.cpp's on the same file."""
    ids = ref_engine.tokenizer.encode(SLICE.read_text())
    assert len(ids) == SLICE_POSITIONS + 1
    ref = ref_engine.prompt_logits(ids)[:-1]
    fast = fast_engine.prompt_logits(ids, chunk_size=INT4_MAX_ROWS)[:-1]
    got = distribution_agreement(ref, fast)
    assert got.mean_kl <= LLAMA_CPP_SLICE_KL, got
    assert got.top1 >= LLAMA_CPP_SLICE_TOP1 - TOP1_RESOLUTION, got
