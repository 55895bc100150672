"""The AWQ and GPTQ formats' own tools, as the tests' packers and oracles.

AutoAWQ (``autoawq`` 0.2.9, pure Python) and AutoGPTQ (``auto_gptq`` 0.7.1) wrote the
layouts users have (``TheBloke/*-AWQ``, ``*-GPTQ``). Neither installs into the test
environment as a whole (AutoAWQ's package imports ``datasets``; AutoGPTQ's wheels are
built against torch 2.2 and CUDA), so their distributions are downloaded from PyPI with
``pip download --no-deps`` and only the modules that pack and dequantize a linear layer
are imported from them, unchanged: AutoAWQ's ``awq/modules/linear/gemm.py``
(``WQLinear_GEMM.from_linear``) and ``awq/utils/packing_utils.py`` (``dequantize_gemm``),
AutoGPTQ's ``auto_gptq/nn_modules/qlinear/qlinear_cuda.py`` (``QuantLinear.pack`` and its
PyTorch forward, which dequantizes on the CPU). Nothing is installed.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tarfile
import types
import zipfile
from pathlib import Path

AUTOAWQ = "autoawq==0.2.9"
AUTO_GPTQ = "auto_gptq==0.7.1"


def _download(spec: str, dest: Path, binary: bool) -> Path:
    """``pip download --no-deps spec`` into ``dest``; the file's path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dest), spec]
    # AutoGPTQ ships only binary wheels; any CPython 3.11 x86-64 one holds the same Python files
    cmd += (["--only-binary=:all:", "--python-version", "3.11", "--platform", "manylinux2014_x86_64",
             "--implementation", "cp"] if binary else ["--no-binary=:all:"])
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    name = spec.split("==")[0].replace("-", "_").lower()
    (found,) = [p for p in dest.iterdir() if p.name.replace("-", "_").lower().startswith(name)]
    return found


def load(root: Path) -> types.SimpleNamespace:
    """Download both tools under ``root`` and import their modules.

    Returns:
        a namespace with ``WQLinear_GEMM``, ``dequantize_gemm`` (AutoAWQ) and
        ``QuantLinear`` (AutoGPTQ).
    Raises:
        subprocess.CalledProcessError: PyPI could not be reached.
    """
    awq_sdist = _download(AUTOAWQ, root / "dl", binary=False)
    with tarfile.open(awq_sdist) as t:
        t.extractall(root / "awq-src", filter="data")
    (awq_dir,) = (root / "awq-src").glob("*/awq")
    if "awq" not in sys.modules:  # the package without its __init__ (which imports datasets, models, ...)
        pkg = types.ModuleType("awq")
        pkg.__path__ = [str(awq_dir)]
        sys.modules["awq"] = pkg
    import awq.modules.linear.gemm as gemm  # noqa: E402  (AutoAWQ's own module)
    from awq.utils.packing_utils import dequantize_gemm

    wheel = _download(AUTO_GPTQ, root / "dl", binary=True)
    member = "auto_gptq/nn_modules/qlinear/qlinear_cuda.py"
    with zipfile.ZipFile(wheel) as z:
        z.extract(member, root / "gptq-src")
    spec = importlib.util.spec_from_file_location("auto_gptq_qlinear_cuda", root / "gptq-src" / member)
    qlinear = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(qlinear)  # logs "CUDA extension not installed": its PyTorch path is used
    return types.SimpleNamespace(WQLinear_GEMM=gemm.WQLinear_GEMM, dequantize_gemm=dequantize_gemm,
                                 QuantLinear=qlinear.QuantLinear)
