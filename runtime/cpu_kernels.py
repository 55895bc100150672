"""Building and loading Argosy's C++ CPU kernels (``csrc/*.cpp`` next to their modules).

A kernel source is compiled on first use with the C++ compiler inductor uses (``$CXX``,
else ``g++``, else ``c++``), ``-O3 -fopenmp`` and the vector ISA flags inductor picked for
this CPU, into ``$ARGOSY_CACHE_DIR/kernels/<name>-<key>.so`` (the key hashes the source and the
headers next to it, compiler, its version and the flags), and loaded with ``ctypes`` (which releases the GIL
during calls). Its OpenMP calls bind to the runtime torch already loaded: one thread
pool in the process. If there is no compiler or the build fails, :meth:`Kernel.library`
returns None (one warning line) and the caller keeps its torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .cache_dirs import argosy_cache_root, inductor_vec_isa

logger = logging.getLogger("argosy.kernels")

# -fassociative-math (with the two flags it needs) lets dot products end in a tree of
# vector adds instead of a serial chain of scalar ones (the decode attention: 0.73 -> 0.49
# ms a layer at batch 32, measured). Not -ffast-math: it would also link crtfastmath,
# which turns on flush-to-zero for the whole process.
BASE_FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
              "-fno-trapping-math")


def compiler() -> Optional[str]:
    """The C++ compiler to use (``$CXX``, ``g++``, ``c++``), or None."""
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def isa_flags() -> list[str]:
    """The ``-m...`` flags of the vector ISA inductor's compiled graphs use (none: portable code)."""
    isa = inductor_vec_isa()
    return isa.build_arch_flags().split() if isa else []


#: File-name prefix of a library being written (renamed into place when complete).
PARTIAL_PREFIX = ".building-"
#: A partial library older than this (seconds) belongs to a builder that died (killed, OOM):
#: a live one gives up after 300 s. Such files would otherwise pile up in a cache directory
#: that outlives the process (the operator's emptyDir survives container restarts).
STALE_PARTIAL_S = 3600


def _remove_stale_partial_builds(out_dir: Path) -> None:
    """Delete ``PARTIAL_PREFIX*`` files in ``out_dir`` last modified more than
    :data:`STALE_PARTIAL_S` seconds ago (best effort: a file another process removes first,
    or one that cannot be removed, is left alone)."""
    now = time.time()
    for f in out_dir.glob(PARTIAL_PREFIX + "*"):
        try:
            if now - f.stat().st_mtime > STALE_PARTIAL_S:
                f.unlink()
        except OSError:
            pass


def build(source: Path, name: str, cache_dir: Optional[Path] = None, extra_flags: Sequence[str] = (),
          link_flags: Sequence[str] = ()) -> Path:
    """Compile ``source`` (or find it already compiled) and return the shared library's path.
    ``extra_flags`` go with the compiler flags, ``link_flags`` after the source (libraries);
    both are part of the cache key.

    Libraries of other sources, compilers or flags are left in place (a cache directory
    may be shared by machines with different CPUs or compilers). The library is written
    to a temporary file (``PARTIAL_PREFIX*``) and renamed into place, so concurrent
    builders never load a half-written file; partial files of builders that died more than
    :data:`STALE_PARTIAL_S` seconds ago are removed first.

    Raises:
        RuntimeError: no C++ compiler, or the compiler failed or took more than 300 s
            (its stderr in the message).
        OSError: the cache directory cannot be created or written.
    """
    cxx = compiler()
    if not cxx:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    flags = [*BASE_FLAGS, *isa_flags(), *extra_flags]
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except OSError as e:
        raise RuntimeError(f"C++ compiler {cxx!r} cannot run: {e}") from None
    # the headers next to the source (its local #includes) are part of the key too
    headers = [h.read_text() for h in sorted(source.parent.glob("*.h"))]
    key = hashlib.sha256("\0".join([source.read_text(), *headers, cxx, version, *flags, *link_flags]).encode()
                         ).hexdigest()[:16]
    out_dir = Path(cache_dir) if cache_dir else argosy_cache_root() / "kernels"
    lib = out_dir / f"{name}-{key}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_partial_builds(out_dir)
    fd, tmp = tempfile.mkstemp(prefix=PARTIAL_PREFIX, suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        try:
            res = subprocess.run([cxx, *flags, "-o", tmp, str(source), *link_flags], capture_output=True, text=True,
                                 timeout=300)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{cxx} took more than 300 s") from None
        if res.returncode != 0:
            raise RuntimeError(f"{cxx} failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


class Kernel:
    """One C++ kernel library, built and loaded once per process on first use.

    Args:
        source: the ``.cpp`` file.
        name: the library's file-name stem and the name in log lines.
        declare: sets ``restype``/``argtypes`` of the library's functions (ctypes).
        what: what the caller falls back to, for the warning line.
        disabled: when it returns True, :meth:`library` answers None (the caller's
            switch to its torch path, e.g. ``ARGOSY_ATTENTION_BACKEND=torch``).
        on_load: called once with the library after it loaded (the kernel's torch op
            taking its C++ implementation, :func:`argosy.runtime.torch_ops.install`); an
            exception there is logged and leaves the library in use.
        flags: returns ``(compile flags, link flags)`` added to :func:`build`'s (e.g.
            PyTorch's headers and libraries, :func:`argosy.runtime.torch_ops.torch_build_flags`);
            called at build time.
    """

    def __init__(self, source: Path, name: str, declare: Callable[[ctypes.CDLL], None], what: str,
                 disabled: Callable[[], bool] = lambda: False,
                 on_load: Optional[Callable[[ctypes.CDLL], None]] = None,
                 flags: Optional[Callable[[], tuple[Sequence[str], Sequence[str]]]] = None):
        self.source = source
        self.name = name
        self.declare = declare
        self.what = what
        self.disabled = disabled
        self.on_load = on_load
        self.flags = flags
        self._lib: Optional[ctypes.CDLL] = None
        self._tried = False
        self._lock = threading.Lock()

    def build(self, cache_dir: Optional[Path] = None) -> Path:
        """:func:`build` of this kernel's source (with its ``flags``)."""
        extra, link = self.flags() if self.flags else ((), ())
        return build(self.source, self.name, cache_dir, extra_flags=extra, link_flags=link)

    @property
    def loaded(self) -> Optional[ctypes.CDLL]:
        """The library if an earlier :meth:`library` call loaded it (no build, no lock)."""
        return self._lib

    def library(self) -> Optional[ctypes.CDLL]:
        """The loaded library, building it on first call; None when it cannot be built
        (logged once) or ``disabled()``. Inside a ``torch.compile`` trace it only reports
        what an eager call decided before."""
        if torch.compiler.is_compiling():
            return self._lib
        if self.disabled():
            return None
        with self._lock:
            if not self._tried:
                self._tried = True
                try:
                    lib = ctypes.CDLL(str(self.build()))
                    self.declare(lib)
                    self._lib = lib
                except Exception as e:  # noqa: BLE001 - any build/load problem means: keep the torch path
                    logger.warning("CPU kernel %s unavailable, using %s: %s", self.name, self.what,
                                   str(e).splitlines()[0] if str(e) else type(e).__name__)
                if self._lib is not None and self.on_load is not None:
                    try:
                        self.on_load(self._lib)
                    except Exception as e:  # noqa: BLE001 - the library works without it
                        logger.warning("CPU kernel %s: %s", self.name, e)
        return self._lib
