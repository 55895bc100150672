"""Model loading: GGUF files, Hugging Face directories and hub ids.

Every loader yields a :class:`Checkpoint`: the architecture as a :class:`ModelConfig`,
a lazy iterator of weights under Hugging Face parameter names, and a tokenizer with
its chat template. ``resolve_model`` turns what the user typed into a local path.

Importing this package loads no torch (``argosy router`` needs only the tokenizer, from
:mod:`.tokenizer`); ``Checkpoint`` and ``load_checkpoint`` bring the loaders in on first use.
"""

from .errors import ModelLoadError
from .resolve import DEFAULT_MODEL_HINT, default_model_path, resolve_model

__all__ = [
    "Checkpoint",
    "ModelLoadError",
    "DEFAULT_MODEL_HINT",
    "default_model_path",
    "load_checkpoint",
    "resolve_model",
]


def __getattr__(name):
    if name == "Checkpoint":
        from .base import Checkpoint

        return Checkpoint
    if name == "load_checkpoint":
        from .checkpoint import load_checkpoint

        return load_checkpoint
    raise AttributeError(name)
