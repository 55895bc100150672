"""Argosy runtime: paged-KV, continuously batched LLM inference with an OpenAI-compatible server.

Offline use::

    from argosy.runtime import LLM, SamplingParams
    LLM().generate(["Hello"], SamplingParams(max_tokens=32))
"""

__version__ = "0.1.0"

from .core.sampling_params import SamplingParams  # noqa: E402  (light: no torch at import)


def __getattr__(name):
    # LLM pulls in torch and transformers; import it lazily.
    if name == "LLM":
        from .core.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "__version__"]
