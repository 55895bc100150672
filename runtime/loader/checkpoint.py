"""Open a checkpoint (GGUF file or Hugging Face directory) from what the user typed.

Kept apart from :mod:`.resolve` (paths only, no torch) so that the tokenizer-only path
(:mod:`.tokenizer`, used by ``argosy router``) never reaches the weight loaders.
"""

from __future__ import annotations

from typing import Optional

from .base import Checkpoint
from .gguf_loader import load_gguf
from .hf_loader import load_hf_dir
from .resolve import checkpoint_format, resolve_model


def load_checkpoint(model: Optional[str] = None, tokenizer: Optional[str] = None, revision: Optional[str] = None,
                    with_tokenizer: bool = True) -> Checkpoint:
    """Resolve and open a checkpoint (GGUF file or HF directory); weights are read lazily.
    ``with_tokenizer=False`` skips the tokenizer (tensor-parallel workers need only weights).

    Raises:
        ModelLoadError: one line naming the path and the problem.
    """
    kind, path = checkpoint_format(resolve_model(model, revision))
    return load_gguf(path, with_tokenizer) if kind == "gguf" else load_hf_dir(path, tokenizer, with_tokenizer)
