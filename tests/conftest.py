"""Shared fixtures: the bundled model, loaded once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Engines built by the tests (and the servers they start) run eagerly unless a test asks
# for compiled decode steps (tests/test_cpu_compile.py): compiling takes ~1 minute per
# graph on 2 cores with an empty cache, which every engine would otherwise pay.
os.environ.setdefault("ARGOSY_COMPILATION_MODE", "0")


def _set_triton_interpret() -> None:
    """Without CUDA, Triton must be in interpreter mode from its first import on: its own
    library functions (``tl.max``, ``tl.sum``, ...) are decorated once, at that import, and
    interpreted kernels cannot call compiled ones. Several test modules import Triton
    (the interpreter tests, the ahead-of-time compile check, which works either way), so
    it is decided here, before any of them is collected."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


_set_triton_interpret()


def pytest_collection_modifyitems(config, items):
    """``slow`` suites (the real-Prometheus test, the full Triton compile matrix) run only
    when asked for: ``-m slow`` (or any ``-m`` expression naming slow) or
    ``ARGOSY_RUN_SLOW=1``; the default run stays fast."""
    if "slow" in (config.getoption("-m") or "") or os.environ.get("ARGOSY_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow or ARGOSY_RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def model_path() -> str:
    from argosy.runtime.loader import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def checkpoint(model_path):
    """The bundled GGUF opened once (weights are read lazily on each load)."""
    from argosy.runtime.loader import load_checkpoint

    return load_checkpoint(model_path)


@pytest.fixture(scope="session")
def hf_model(model_path):
    """Hugging Face transformers' own Llama loaded from the same GGUF: the oracle."""
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(model_path), gguf_file=os.path.basename(model_path), dtype=torch.float32
    )
    m.eval()
    return m


@pytest.fixture(scope="session")
def make_engine(checkpoint):
    """Factory for engines on the bundled model sharing one opened checkpoint."""
    from argosy.runtime.config import EngineArgs
    from argosy.runtime.core.engine import LLMEngine

    def make(**kw):
        kw.setdefault("dtype", "float32")
        kw.setdefault("max_model_len", 1024)
        kw.setdefault("kv_cache_memory", 128 << 20)
        return LLMEngine(EngineArgs(**kw), checkpoint=checkpoint)

    return make


@pytest.fixture(scope="session")
def ref_engine(make_engine):
    """The float32 engine on the bundled model (dense dequantized weights, equal to Hugging
    Face ``transformers``): the reference of the fast-path tests, built once per run."""
    return make_engine(dtype="float32", max_model_len=1024)


def shard_plan(config, rank: int, world_size: int):
    """A ``LlamaForCausalLM`` of ``config`` holding only what :meth:`shard_for` needs to
    name rank ``rank``'s slices (no weights allocated, no process group): for tests that
    read a checkpoint's tensor-parallel shards."""
    import torch

    from argosy.runtime.distributed import TPGroup
    from argosy.runtime.models.llama import LlamaForCausalLM

    tp = TPGroup.__new__(TPGroup)
    tp.rank, tp.world_size = rank, world_size
    model = LlamaForCausalLM.__new__(LlamaForCausalLM)
    torch.nn.Module.__init__(model)
    model.cfg, model.tp = config, tp
    model.vocab_per_rank = -(-config.vocab_size // world_size)
    model.vocab_start = rank * model.vocab_per_rank
    return model


def run_to_completion(engine, prompts, params) -> dict[str, list[int]]:
    """Add ``prompts`` (token-id lists) to ``engine`` and step until all finish.

    Returns request id (``"0"``, ``"1"``, ...) -> generated token ids.
    """
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), ids, params if not isinstance(params, list) else params[i])
    done: dict[str, list[int]] = {}
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.output_token_ids)
        steps += 1
        assert steps < 100_000, "engine did not finish"
    return done


def prefill_logits(engine, ids: list[int]):
    """Logits ``[len(ids), vocab] float32`` of one whole-prompt forward pass through the
    engine's (possibly tensor-parallel) model."""
    return engine.prompt_logits(ids)
