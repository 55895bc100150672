"""C++ implementations of the ``argosy::`` ops a decode step calls once per layer.

``torch.ops.argosy.q8_linear`` (:mod:`argosy.runtime.quantization.q8_0`) and
``torch.ops.argosy.paged_decode_attention`` (:mod:`argosy.runtime.attention.cpu_decode`)
are defined in Python (schema, fake implementation for the compiled graphs, and a Python
CPU implementation that checks its arguments and calls the kernel library through
``ctypes``). Going dispatcher -> Python -> ctypes costs ~8-10 us a call beyond the kernel
(measured, one row / one sequence: q8_linear 15.1 us through the op against 7.7 us for the
Python function alone; the decode attention 14.2 us against 5.6 us for the bare ctypes
call), and the compiled decode graphs call these ops from their Python wrapper once per
layer: 31 calls a step for the bundled model, 151 for a GGUF whose linear layers are
8/6/5-bit. ``csrc/torch_ops.cpp`` implements both ops in C++ (the same checks and messages,
then the kernel's entry point, which it receives as a function pointer from the kernel's
own library) and registers them in place of the Python implementations, once each kernel
library has loaded (:func:`install`, from :class:`argosy.runtime.cpu_kernels.Kernel`'s
``on_load``).

The library is built like the kernels (:func:`argosy.runtime.cpu_kernels.build`, ~7 s, once
per cache directory) with PyTorch's headers and linked to ``libc10`` / ``libtorch_cpu`` of
the running torch (its version and C++ ABI are part of the cache key). Where it cannot be
built or loaded, or with ``ARGOSY_TORCH_OPS=python``, the Python implementations stay (one
log line); results are the same either way (the same kernel computes them).
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path
from typing import Callable, Optional

import torch

from . import cpu_kernels

logger = logging.getLogger("argosy.kernels")

SOURCE = Path(__file__).parent / "csrc" / "torch_ops.cpp"
#: ``python`` keeps the Python implementations of the ops (the C++ library is not built)
ENV = "ARGOSY_TORCH_OPS"

#: op name -> (its Python CPU registration, the Python function), while it is in place
_python: dict[str, tuple[torch.library.Library, Callable]] = {}
#: ops whose CPU implementation is the C++ one
installed: set[str] = set()


def torch_build_flags() -> tuple[list[str], list[str]]:
    """``(compile flags, link flags)`` for a library using PyTorch's C++ API: the running
    torch's include directory, C++17, its ``_GLIBCXX_USE_CXX11_ABI`` and version (so a
    library built for another torch is never loaded), and ``libc10`` / ``libtorch_cpu``
    with an rpath to them."""
    root = Path(torch.__file__).parent
    lib = root / "lib"
    cflags = [f"-I{root / 'include'}", "-std=c++17",
              f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
              f"-DARGOSY_TORCH_VERSION=\"{torch.__version__}\""]
    return cflags, [f"-L{lib}", f"-Wl,-rpath,{lib}", "-lc10", "-ltorch_cpu"]


def _declare(lib: ctypes.CDLL) -> None:
    lib.argosy_set_q8_linear.argtypes = [ctypes.c_void_p]
    lib.argosy_set_q8_linear.restype = None
    lib.argosy_set_paged_decode_attention.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    lib.argosy_set_paged_decode_attention.restype = ctypes.c_int
    lib.argosy_register.argtypes = [ctypes.c_char_p]
    lib.argosy_register.restype = ctypes.c_int


#: The library, built and loaded like the kernels (one try per process, one warning line
#: where it cannot be built); ``ARGOSY_TORCH_OPS=python`` keeps it unbuilt.
KERNEL = cpu_kernels.Kernel(SOURCE, "torch_ops", _declare, "the ops' Python implementations (~10 us more a call)",
                            disabled=lambda: os.environ.get(ENV, "auto").strip().lower() == "python",
                            flags=torch_build_flags)


def build(cache_dir: Optional[Path] = None) -> Path:
    """Compile ``csrc/torch_ops.cpp`` (or find it compiled) and return the library's path.

    Raises:
        RuntimeError: no C++ compiler, or it failed (e.g. no PyTorch headers in this install)
            or took more than 300 s.
        OSError: the cache directory cannot be written.
    """
    return KERNEL.build(cache_dir)


def library() -> Optional[ctypes.CDLL]:
    """The loaded library (built on first call), or None where it cannot be built or
    loaded (logged once) or ``ARGOSY_TORCH_OPS=python``."""
    return KERNEL.library()


def python_impl(op: str, fn: Callable) -> None:
    """Register ``fn`` as the CPU implementation of ``argosy::<op>`` (defined before), in
    a registration of its own so that :func:`install` can remove it."""
    lib = torch.library.Library("argosy", "IMPL", "CPU")
    lib.impl(op, fn)
    _python[op] = (lib, fn)


def install(op: str, set_pointers: Callable[[ctypes.CDLL], None]) -> bool:
    """Make the C++ implementation ``argosy::<op>``'s CPU kernel: hand the kernel's entry
    points over (``set_pointers(library)``), remove the Python registration, register the
    C++ one. Returns whether the C++ implementation is in place; False leaves the Python one
    (no library, or the dispatcher refused: logged)."""
    if op in installed:
        return True
    lib = library()
    if lib is None:
        return False
    set_pointers(lib)
    # Python registration out, C++ in: for this moment the op has no CPU kernel (a call
    # from another thread would fail); installs run when the kernel library loads, at
    # engine startup before any request (or inside the op's own first Python call, which
    # touches nothing of its registration after the kernel returns)
    old = _python.pop(op, None)
    if old is not None:
        old[0]._destroy()
    rc = lib.argosy_register(op.encode())
    if rc != 0:
        if old is not None:
            python_impl(op, old[1])
        logger.warning("argosy::%s: the C++ implementation could not be registered (code %d); it stays in Python",
                       op, rc)
        return False
    installed.add(op)
    logger.debug("argosy::%s runs its C++ implementation", op)
    return True


def function_pointer(fn) -> int:
    """The address of a ``ctypes`` function of a loaded library (for ``set_pointers``)."""
    return ctypes.cast(fn, ctypes.c_void_p).value
