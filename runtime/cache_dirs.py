"""Argosy's on-disk caches, and inductor's setup that depends on them.

Kept free of a module-level torch import: the router (``argosy router``), which runs
without torch, reaches :func:`argosy_cache_root` through the tokenizer loader.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def argosy_cache_root() -> Path:
    """Argosy's own on-disk cache (``gguf-tokenizers/`` converted GGUF tokenizers,
    ``inductor/`` compiled graphs, ``kernels/`` the C++ decode kernel): ``$ARGOSY_CACHE_DIR``,
    default ``~/.cache/argosy``."""
    return Path(os.environ.get("ARGOSY_CACHE_DIR", Path.home() / ".cache" / "argosy"))


def _shadows_stdlib(entry: str) -> bool:
    root = entry or "."
    return os.path.isfile(os.path.join(root, "operator", "__init__.py")) or os.path.isfile(
        os.path.join(root, "operator.py"))


#: whether Argosy chooses inductor's cache directory: decided on the first
#: :func:`inductor_vec_isa` call (``TORCHINDUCTOR_CACHE_DIR`` not set by the user then, or
#: set by Argosy in a parent process, which marks it with :data:`_OWN_ENV`)
_OWN_INDUCTOR_CACHE: list[bool] = []
_OWN_ENV = "ARGOSY_SET_TORCHINDUCTOR_CACHE_DIR"


def inductor_vec_isa(graph_tag: str = ""):
    """The vector ISA inductor generates C++ for on this CPU (``avx512``, ``avx2`` ...; falsy
    when none), or None when this torch has no such probe.

    Inductor decides by compiling a probe library and loading it in a child Python whose
    ``PYTHONPATH`` is this process's ``sys.path``. Under pytest or ``python -m`` started in
    Argosy's repository root, that path holds the root, whose ``operator/`` package then
    shadows the standard library's ``operator`` in the child: the child dies while
    starting, and inductor silently generates scalar code (kept in its on-disk cache for
    every later process: its cache key does not include the ISA). So before the first
    probe (the answer is cached per process) this sets inductor's own override,
    ``TORCH_CUSTOM_PYTHONPATH``, to ``sys.path`` without such entries (left set: inductor's
    compile workers read it too; it only affects inductor's children), and
    ``PYTHONSAFEPATH=1`` for the probe alone (so that the child does not put its working
    directory first either), restored afterwards.

    Unless the user set ``TORCHINDUCTOR_CACHE_DIR``, the probe writes under
    ``$ARGOSY_CACHE_DIR/inductor/probe`` (default ``~/.cache/argosy/inductor/...``), and a
    call with ``graph_tag`` (the compiled steps', :mod:`argosy.runtime.worker.cpu_compile`:
    ``rows<INT4_MAX_ROWS>``) points inductor's on-disk cache at
    ``$ARGOSY_CACHE_DIR/inductor/<ISA>-<graph_tag>``, so that graphs built without a vector
    ISA are never served to a process that has one, nor graphs built under another
    packed-kernel row limit (:data:`argosy.runtime.quantization.base.INT4_MAX_ROWS`, by CPU
    and ``ATEN_CPU_CAPABILITY``): inductor's cache hands such a graph back with the
    batch-size guards of the bucket it was compiled for (seen: a 2-8 graph served for 2-16,
    so batches of 9-16 ran eagerly). Like inductor's own default, the variable is set in
    this process's environment (child processes inherit it).
    """
    first = not _OWN_INDUCTOR_CACHE
    if first:
        inherited = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        _OWN_INDUCTOR_CACHE.append(inherited is None or inherited == os.environ.get(_OWN_ENV))
    own_cache = _OWN_INDUCTOR_CACHE[0]
    if own_cache and first:
        # the probe itself writes there (else inductor picks a /tmp default)
        _set_inductor_cache(str(argosy_cache_root() / "inductor" / "probe"))
    if "TORCH_CUSTOM_PYTHONPATH" not in os.environ:
        os.environ["TORCH_CUSTOM_PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and not _shadows_stdlib(p))
    safe_path = os.environ.get("PYTHONSAFEPATH")
    os.environ["PYTHONSAFEPATH"] = "1"
    try:
        from torch._inductor.cpu_vec_isa import pick_vec_isa
    except ImportError:
        isa = None
    else:
        isa = pick_vec_isa()
    finally:
        if safe_path is None:
            del os.environ["PYTHONSAFEPATH"]
        else:
            os.environ["PYTHONSAFEPATH"] = safe_path
    if own_cache and graph_tag:
        name = str(isa).replace(" ", "-") if isa else "scalar"
        _set_inductor_cache(str(argosy_cache_root() / "inductor" / f"{name}-{graph_tag}"))
    return isa


def _set_inductor_cache(path: str) -> None:
    """Point ``TORCHINDUCTOR_CACHE_DIR`` at ``path`` and mark it as Argosy's choice (so a
    child process that inherits it chooses its own directory again rather than compiling
    into this one, which may be the probe's or another row limit's)."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    os.environ[_OWN_ENV] = path

