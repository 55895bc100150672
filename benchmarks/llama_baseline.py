"""llama.cpp baselines for the benchmarks: find or build ``llama-server`` and ``llama-bench``.

The baseline is the llama.cpp that ships inside the PyPI sdist of ``llama-cpp-python``
(its ``vendor/llama.cpp``), so the binaries and the ``llama_cpp`` Python package used by
``offline_throughput.py`` come from the same source tree.

    python benchmarks/llama_baseline.py              # print the paths, building them if needed
    python benchmarks/llama_baseline.py --find-only  # print the paths or fail; never builds
    python benchmarks/llama_baseline.py --pip-install /work/llama-venv   # also install llama-cpp-python
                                                # (same sdist, same CPU flags) into that venv

Lookup order of ``find_or_build()``:

1. ``$ARGOSY_LLAMA_SERVER`` / ``$ARGOSY_LLAMA_BENCH`` (explicit paths);
2. a previous build in the cache, ``$ARGOSY_BENCH_CACHE/llama.cpp-<version>/build/bin``
   (the cache defaults to ``~/.cache/argosy-bench``; it is never inside the repo);
3. ``llama-server`` / ``llama-bench`` on ``$PATH``;
4. otherwise (unless ``build=False``) download the sdist with ``pip download``, unpack it
   into the cache and build with CMake. That takes ~10 minutes on 2 cores.

Build flags (from issue 17): ``GGML_NATIVE=ON`` crashes on this CPU with gcc 12, so the
ISA extensions are switched on explicitly, each where ``/proc/cpuinfo`` lists it
(:data:`GGML_CPU_FLAGS`). ``llama-server``
embeds a Web UI that is normally downloaded prebuilt or built with npm; neither is
possible offline, so the build turns that off and puts small non-empty placeholder files
in ``tools/ui/dist`` (the asset check only wants them to exist and be non-empty).

Nothing in the default test run calls this module. (It is not named ``llama_cpp.py`` on
purpose: that would shadow the ``llama_cpp`` package of llama-cpp-python.)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

#: llama-cpp-python release whose vendored llama.cpp is the baseline.
LLAMA_CPP_PYTHON_VERSION = os.environ.get("ARGOSY_LLAMA_CPP_PYTHON_VERSION", "0.3.36")

#: ggml's CPU extensions and the ``/proc/cpuinfo`` flag each needs.
_GGML_ISA = [("AVX", "avx"), ("AVX2", "avx2"), ("FMA", "fma"), ("F16C", "f16c"), ("BMI2", "bmi2"),
             ("AVX512", "avx512f"), ("AVX512_VBMI", "avx512vbmi"), ("AVX512_VNNI", "avx512_vnni"),
             ("AVX512_BF16", "avx512_bf16"), ("AVX_VNNI", "avx_vnni"), ("AMX_TILE", "amx_tile"),
             ("AMX_INT8", "amx_int8"), ("AMX_BF16", "amx_bf16")]


def ggml_cpu_flags(cpuinfo: str | None = None) -> list[str]:
    """Explicit CPU features for ggml's CMake build: GGML_NATIVE=ON crashes on one of this
    project's VMs with gcc 12 (issue 17), so each extension is switched on where
    ``/proc/cpuinfo`` lists it and off otherwise (a fixed list once had AVX-VNNI on, which
    AMD EPYC Zen 4 lacks: the library then died of SIGILL)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    have = set(cpuinfo.split())
    return ["-DGGML_NATIVE=OFF"] + [f"-DGGML_{name}={'ON' if flag in have else 'OFF'}" for name, flag in _GGML_ISA]


GGML_CPU_FLAGS = ggml_cpu_flags()

#: Extra flags for the standalone llama-server / llama-bench build (no network at build time).
SERVER_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_CURL=OFF",
]

#: Files the llama-server UI asset check requires in tools/ui/dist (placeholders, non-empty).
UI_PLACEHOLDERS = {
    "index.html": "<!doctype html><title>llama-server</title><p>UI not built (benchmark build)</p>\n",
    "manifest.webmanifest": '{"name": "llama-server"}\n',
    "sw.js": "// placeholder\n",
    "build.json": "{}\n",
    "version.json": "{}\n",
    "bundle0.js": "// placeholder\n",
    "bundle0.css": "/* placeholder */\n",
    "workbox0.js": "// placeholder\n",
}


def cache_dir() -> Path:
    return Path(os.environ.get("ARGOSY_BENCH_CACHE", Path.home() / ".cache" / "argosy-bench")).expanduser()


def source_dir(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """Where the sdist is unpacked: ``<cache>/llama_cpp_python-<version>``."""
    return cache_dir() / f"llama_cpp_python-{version}"


def build_dir(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """The build directory, one per version and CPU feature set (a cache shared by two
    machines never hands one the other's binaries)."""
    key = hashlib.sha256(" ".join(GGML_CPU_FLAGS).encode()).hexdigest()[:8]
    return cache_dir() / f"llama.cpp-{version}-{key}" / "build"


@dataclass
class LlamaCpp:
    server: Path
    bench: Path | None
    source: str  # how they were found: env / cache / PATH / built

    def version(self) -> str:
        try:
            out = subprocess.run([str(self.server), "--version"], capture_output=True, text=True, timeout=30)
            return (out.stdout + out.stderr).strip().splitlines()[0]
        except Exception as e:  # pragma: no cover - informative only
            return f"unknown ({e})"


def _log(msg: str) -> None:
    print(f"[llama_baseline] {msg}", file=sys.stderr, flush=True)


def sdist_path(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """Download (once) the llama-cpp-python sdist into ``<cache>/sdist`` and return its path."""
    d = cache_dir() / "sdist"
    d.mkdir(parents=True, exist_ok=True)
    tgz = d / f"llama_cpp_python-{version}.tar.gz"
    if not tgz.exists():
        _log(f"downloading llama-cpp-python=={version} sdist into {d}")
        subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}",
                        "--no-deps", "--no-binary", ":all:", "-d", str(d)], check=True, cwd=d)
    return tgz


def unpack_sdist(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """Unpack the sdist into the cache (once); return its ``vendor/llama.cpp`` folder."""
    src = source_dir(version)
    llama = src / "vendor" / "llama.cpp"
    if not (llama / "CMakeLists.txt").exists():
        tgz = sdist_path(version)
        _log(f"unpacking {tgz.name} into {cache_dir()}")
        with tarfile.open(tgz) as tf:
            tf.extractall(cache_dir(), filter="data") if sys.version_info >= (3, 12) else tf.extractall(cache_dir())
    ui_dist = llama / "tools" / "ui" / "dist"
    ui_dist.mkdir(parents=True, exist_ok=True)
    for name, text in UI_PLACEHOLDERS.items():
        if not (ui_dist / name).exists():
            (ui_dist / name).write_text(text)
    return llama


def _from_env() -> LlamaCpp | None:
    s = os.environ.get("ARGOSY_LLAMA_SERVER")
    if not s:
        return None
    b = os.environ.get("ARGOSY_LLAMA_BENCH")
    return LlamaCpp(Path(s), Path(b) if b else None, "env")


def _from_cache(version: str) -> LlamaCpp | None:
    bin_dir = build_dir(version) / "bin"
    s, b = bin_dir / "llama-server", bin_dir / "llama-bench"
    if s.exists() and os.access(s, os.X_OK):
        return LlamaCpp(s, b if b.exists() else None, "cache")
    return None


def _from_path() -> LlamaCpp | None:
    s = shutil.which("llama-server")
    if not s:
        return None
    b = shutil.which("llama-bench")
    return LlamaCpp(Path(s), Path(b) if b else None, "PATH")


def build(version: str = LLAMA_CPP_PYTHON_VERSION, jobs: int | None = None) -> LlamaCpp:
    """Configure and build llama-server and llama-bench from the sdist (~10 min on 2 cores)."""
    llama = unpack_sdist(version)
    bdir = build_dir(version)
    bdir.mkdir(parents=True, exist_ok=True)
    jobs = jobs or os.cpu_count() or 2
    t0 = time.time()
    _log(f"configuring {llama} -> {bdir}")
    subprocess.run(["cmake", "-S", str(llama), "-B", str(bdir), *SERVER_FLAGS, *GGML_CPU_FLAGS], check=True)
    _log(f"building llama-server llama-bench with {jobs} jobs (takes ~10 minutes on 2 cores)")
    subprocess.run(["cmake", "--build", str(bdir), "--config", "Release", "-j", str(jobs),
                    "--target", "llama-server", "llama-bench"], check=True)
    _log(f"build done in {time.time() - t0:.0f} s")
    found = _from_cache(version)
    if found is None:
        raise RuntimeError(f"build finished but {bdir / 'bin' / 'llama-server'} is missing")
    found.source = "built"
    return found


def find(version: str = LLAMA_CPP_PYTHON_VERSION) -> LlamaCpp | None:
    """The binaries if already available (env, cache, PATH), else None. Never builds."""
    return _from_env() or _from_cache(version) or _from_path()


def find_or_build(build_if_missing: bool = True, version: str = LLAMA_CPP_PYTHON_VERSION) -> LlamaCpp:
    """Paths of llama-server / llama-bench; builds them into the cache if missing and allowed."""
    found = find(version)
    if found is not None:
        return found
    if not build_if_missing:
        raise FileNotFoundError(
            "llama-server not found (set ARGOSY_LLAMA_SERVER, put it on PATH, or run "
            "`python benchmarks/llama_baseline.py` to build it into the cache)")
    return build(version)


def pip_install(venv: str | Path, version: str = LLAMA_CPP_PYTHON_VERSION, jobs: int | None = None) -> None:
    """Install llama-cpp-python from the same sdist with the same CPU flags into ``venv``.

    Creates the venv if needed and installs numpy with it (``llama_cpp`` imports it). The
    venv needs nothing else: offline_throughput.py tokenizes in its own process and hands
    token ids to the worker (``offline_worker``) running in that venv.
    """
    venv = Path(venv)
    py = venv / "bin" / "python"
    if not py.exists():
        _log(f"creating venv {venv}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    tgz = sdist_path(version)
    env = dict(os.environ)
    env["CMAKE_ARGS"] = " ".join(GGML_CPU_FLAGS)
    env["CMAKE_BUILD_PARALLEL_LEVEL"] = str(jobs or os.cpu_count() or 2)
    t0 = time.time()
    _log(f"pip installing {tgz.name} into {venv} with CMAKE_ARGS={env['CMAKE_ARGS']!r}")
    # not the repo root: its operator/ would shadow the stdlib module. The package is rebuilt
    # even when installed (it may hold another CPU's flags); the second call, finding it
    # installed, only adds the dependencies it lacks.
    subprocess.run([str(py), "-m", "pip", "install", "-v", "--no-cache-dir", "--force-reinstall", "--no-deps",
                    str(tgz)], check=True, env=env, cwd=cache_dir())
    subprocess.run([str(py), "-m", "pip", "install", str(tgz), "numpy"], check=True, env=env, cwd=cache_dir())
    _log(f"pip install done in {time.time() - t0:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--find-only", action="store_true", help="never build; exit 1 if not found")
    ap.add_argument("--rebuild", action="store_true", help="build even if a build is found")
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--pip-install", metavar="VENV", default=None,
                    help="after the binaries, pip-install llama-cpp-python into VENV (same sdist and flags)")
    args = ap.parse_args()
    if args.rebuild:
        lc = build(jobs=args.jobs)
    else:
        try:
            lc = find_or_build(build_if_missing=not args.find_only)
        except FileNotFoundError as e:
            print(e, file=sys.stderr)
            sys.exit(1)
    print(f"llama-server: {lc.server}")
    print(f"llama-bench:  {lc.bench}")
    print(f"found via:    {lc.source}")
    print(f"version:      {lc.version()}")
    if args.pip_install:
        pip_install(args.pip_install, jobs=args.jobs)


if __name__ == "__main__":
    main()
