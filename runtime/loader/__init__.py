"""Model loading: GGUF files, Hugging Face directories and hub ids.

Every loader yields a :class:`Checkpoint`: the architecture as a :class:`ModelConfig`,
a lazy iterator of weights under Hugging Face parameter names, and a tokenizer with
its chat template. ``resolve_model`` turns what the user typed into a local path.
"""

from .base import Checkpoint, ModelLoadError
from .resolve import DEFAULT_MODEL_HINT, default_model_path, load_checkpoint, resolve_model

__all__ = [
    "Checkpoint",
    "ModelLoadError",
    "DEFAULT_MODEL_HINT",
    "default_model_path",
    "load_checkpoint",
    "resolve_model",
]
