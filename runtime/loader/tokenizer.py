"""A model's tokenizer and chat template, without loading its weights (no torch here).

``argosy serve`` and ``argosy router`` use the same functions, so a router tokenizes a
request exactly as the engine behind it will (which its prefix-cache routing relies on).
GGUF files carry the tokenizer in their metadata; ``transformers`` converts it
(``AutoTokenizer.from_pretrained(dir, gguf_file=...)``); Hugging Face directories hold
``tokenizer.json`` / ``tokenizer_config.json``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Optional

from ..cache_dirs import argosy_cache_root
from .errors import ModelLoadError

logger = logging.getLogger(__name__)


def _tokenizer_cache_dir(path: str) -> Path:
    st = os.stat(path)
    key = hashlib.sha256(f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return argosy_cache_root() / "gguf-tokenizers" / key


def load_gguf_tokenizer(path: str):
    """The GGUF file's tokenizer and chat template, converted by ``transformers``.

    The conversion (merges -> ``tokenizer.json``) takes seconds, so the result is saved
    under ``$ARGOSY_CACHE_DIR`` (default ``~/.cache/argosy``) keyed by path, size and
    mtime, and reloaded from there next time.

    Raises:
        ModelLoadError: the metadata holds no usable tokenizer.
    """
    from transformers import AutoTokenizer

    cache = _tokenizer_cache_dir(path)
    if (cache / "tokenizer.json").exists():
        try:
            return AutoTokenizer.from_pretrained(str(cache))
        except Exception:  # a damaged cache is rebuilt below
            logger.warning("tokenizer cache %s unreadable; rebuilding", cache)
    p = Path(path)
    try:
        tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    except Exception as e:
        raise ModelLoadError(f"{path}: cannot build tokenizer from GGUF metadata ({type(e).__name__}: {e})") from None
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(cache))
    except OSError as e:  # read-only home: fine, just slower next time
        logger.info("not caching tokenizer at %s: %s", cache, e)
    return tok


def load_hf_tokenizer(path: str):
    """A Hugging Face directory's tokenizer.

    Raises:
        ModelLoadError: missing or unreadable tokenizer files.
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ModelLoadError(f"{path}: cannot load tokenizer ({type(e).__name__}: {e})") from None


def load_model_tokenizer(model: Optional[str] = None, tokenizer: Optional[str] = None,
                         revision: Optional[str] = None):
    """The tokenizer ``argosy serve MODEL [--tokenizer T]`` uses, resolved the same way
    (a GGUF file, a model directory, a hub id, or the bundled model when ``model`` is None).

    Raises:
        ModelLoadError: nothing at that path, or no usable tokenizer.
    """
    from .resolve import checkpoint_format, resolve_model

    if tokenizer is not None:
        return load_hf_tokenizer(tokenizer)
    kind, path = checkpoint_format(resolve_model(model, revision))
    return load_gguf_tokenizer(path) if kind == "gguf" else load_hf_tokenizer(path)


#: ``apply_chat_template``'s own keyword arguments (``transformers``' signature): not
#: template variables, so ``chat_template_kwargs`` may not set them.
_TEMPLATE_ARGS = frozenset({
    "add_generation_prompt", "continue_final_message", "tokenize", "return_dict", "chat_template", "documents",
    "padding", "truncation", "max_length", "return_tensors", "return_assistant_tokens_mask", "tokenizer_kwargs",
    "processor_kwargs",
})


def chat_prompt_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                    tools: Optional[list[dict]] = None, continue_final_message: bool = False,
                    template_kwargs: Optional[dict] = None) -> list[int]:
    """Token ids of a conversation through the model's chat template (what the engine runs).

    Args:
        tools: OpenAI-format tool definitions, handed to the template as ``tools`` (a
            template without tool support ignores them).
        continue_final_message: leave the last (assistant) message open so the model
            continues it (``transformers``' ``apply_chat_template`` argument).
        template_kwargs: extra variables for the template (vLLM's ``chat_template_kwargs``,
            e.g. ``{"enable_thinking": false}``); keys that are ``apply_chat_template``'s
            own arguments are refused.
    Raises:
        ValueError: the template cannot render these messages, or a reserved
            ``template_kwargs`` key (the message says why).
    """
    extra = dict(template_kwargs or {})
    reserved = sorted(set(extra) & (_TEMPLATE_ARGS | {"messages", "conversation", "tools"}))
    if reserved:
        raise ValueError(f"chat_template_kwargs must not set {', '.join(reserved)} (a request field or the "
                         "server sets it)")
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                            continue_final_message=continue_final_message,
                                            **({"tools": tools} if tools else {}), **extra)
    except Exception as e:  # jinja errors, missing template, ...
        raise ValueError(f"cannot apply the chat template: {e}") from None
    if not isinstance(ids, list):
        ids = ids["input_ids"]
    return list(ids)
