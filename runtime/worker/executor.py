"""Executors: where the model runs.

:class:`UniprocExecutor` runs the model in the engine's process. :class:`MultiprocExecutor`
runs ``--tensor-parallel-size N`` ranks: rank 0 in the engine's process (next to the
scheduler and sampler) and ranks ``1..N-1`` in spawned worker processes.

Each step, rank 0 pickles the :class:`StepPlan` (this step's tokens and new block ids,
not whole sequences) once and writes it to every worker's pipe; all ranks then build
the same input tensors and run their shard of the model, meeting in the row-parallel
all-reduces and the logits gather (``torch.distributed``: gloo on CPU, NCCL on CUDA).
Between steps the workers block on their pipe, so an idle server has no collective
waiting to time out.

Failure model: a watcher thread in rank 0 waits on the workers' process sentinels. When
one exits, the executor is marked failed, the remaining workers are killed (so a
collective rank 0 is blocked in fails at once: gloo reports the closed connection), and
the failure callbacks run; every later :meth:`MultiprocExecutor.execute` raises
:class:`WorkerDiedError`. Workers die with the engine: ``PR_SET_PDEATHSIG`` (Linux)
plus end-of-file on their pipe, so no worker outlives its server.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_any
from typing import Callable, Optional

import torch

from ..config import CacheConfig, EngineArgs, default_num_threads, resolve_kv_cache_dtype
from ..distributed import TPGroup, destroy_group, init_group, open_store
from ..loader import Checkpoint, load_checkpoint
from ..models import LlamaForCausalLM
from ..quantization import online_quantization
from .cpu_compile import resolve_mode, should_compile
from .model_runner import ModelRunner, StepPlan, num_kv_blocks

logger = logging.getLogger("argosy.executor")

#: Longest wait for a worker to load its shard and report (seconds).
STARTUP_TIMEOUT_S = 600.0


class WorkerDiedError(RuntimeError):
    """A tensor-parallel worker process exited; the engine cannot run another step."""


@dataclass
class ModelSpec:
    """What every rank needs to build its shard (picklable)."""

    args: EngineArgs
    checkpoint_path: str
    dtype: torch.dtype
    max_model_len: int
    cache: CacheConfig
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256

    @property
    def kv_cache_dtype(self) -> torch.dtype:
        """The KV cache's element type (``--kv-cache-dtype``; ``auto``: :attr:`dtype`)."""
        return resolve_kv_cache_dtype(self.cache.cache_dtype, self.dtype)


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank ``rank``'s device: ``cuda:<rank>`` on CUDA (one GPU per rank), else ``device``."""
    return torch.device("cuda", rank) if device.type == "cuda" else device


def rank_threads(args: EngineArgs) -> int:
    """CPU threads per rank: ``--num-threads``, else the cores shared evenly between ranks."""
    return args.num_threads or max(1, default_num_threads() // args.tensor_parallel_size)


def weight_bytes_by_format(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of ``model``'s parameters and buffers by the format they are held in
    (this rank's shard): a linear layer's quantization method's buffers count as its
    :attr:`~argosy.runtime.quantization.base.LinearMethod.kind`: ``int4`` (packed weights, scales and zeros, act-order permutations, a
    4-bit embedding held only in that form, and
    where the CPU dequantization kernel cannot read PyTorch's packed layout the second copy
    of the integers it reads), ``grouped int8`` (with its scales and offsets, including the LM head's
    ``logits_q8`` and an embedding held only in that form), ``grouped 5-bit`` / ``grouped 6-bit``
    (Q5_x / Q6_K layers in the 5/6-bit layout, :mod:`argosy.runtime.quantization.q8_0`), ``int8``, ``fp8`` (FP8 weights on ``_scaled_mm`` and their scales),
    ``<dtype> dense copies`` (dense weights kept beside a quantized one for large batches:
    ``ARGOSY_CPU_DENSE_COPIES=auto`` for a model whose copies are small next to the memory
    limit, ``keep``, or where the CPU dequantization kernel is not built; or holding an FP8
    layer's values where ``_scaled_mm`` does not run, or a W8A8 layer's off the CPU's
    bfloat16 path,
    :mod:`argosy.runtime.layers.linear`) and ``<dtype>``
    for everything else (embeddings, norms, dense layers, rotary tables). Tied tensors
    count once."""
    from ..layers.linear import Linear
    from ..quantization.int4 import Int4Embedding
    from ..quantization.q8_0 import Q8Embedding

    out: dict[str, int] = {}
    seen: set[int] = set()

    def add(kind: str, t: Optional[torch.Tensor]) -> None:
        if t is None or t.numel() == 0 or t.data_ptr() in seen:  # (a freed dense weight is empty)
            return
        seen.add(t.data_ptr())
        out[kind] = out.get(kind, 0) + t.numel() * t.element_size()

    for m in model.modules():
        if isinstance(m, Linear):
            method = m.quant_method
            if method is not None:
                for b in method.buffers():
                    add(method.kind, b)
            dtype = str(m.weight.dtype).removeprefix("torch.")
            add(f"{dtype} dense copies" if method is not None else dtype, m.weight)
            add(dtype, m.bias)
        elif isinstance(m, Q8Embedding):
            for b in m.buffers():
                add("grouped int8", b)
        elif isinstance(m, Int4Embedding):
            for b in m.buffers():
                add("int4", b)
    p = getattr(model, "logits_q8", None)
    if p is not None:  # (a tied one shares its tensors with the Q8Embedding)
        for t in (p.w, p.scales, p.mins):
            add("grouped int8", t)
    for t in (*model.parameters(), *model.buffers()):
        add(str(t.dtype).removeprefix("torch."), t)
    return out


def release_freed_heap() -> bool:
    """Hand the C heap's free memory back to the system (glibc ``malloc_trim(0)``), after
    loading: the checkpoint's decoded tensors, freed layer by layer, leave freed chunks
    the allocator keeps, ~80-140 MiB of resident memory for the bundled model on the CPU
    (the README's "Memory"). Returns whether it ran (False where the C library is not
    glibc); never raises."""
    import ctypes
    import ctypes.util

    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True


def build_shard(spec: ModelSpec, checkpoint: Checkpoint, tp: TPGroup, device: torch.device
                ) -> tuple[LlamaForCausalLM, int, int]:
    """Build rank ``tp.rank``'s model shard and size its KV cache.

    Returns:
        ``(model, weight_bytes, kv_blocks_that_fit)`` for this rank.
    Raises:
        ValueError: the model does not split over ``tp.world_size`` ranks, a weight has
            the wrong shape, or not one KV block fits.
    """
    model = LlamaForCausalLM(checkpoint.config, spec.dtype, device, spec.max_model_len, tp)
    model.online_quantization = online_quantization(spec.args.quantization, checkpoint.config.weights_quantized)
    model.kv_cache_dtype = spec.kv_cache_dtype  # (a checkpoint's FP8 KV-cache scales apply to E4M3 only)
    model.load_weights(checkpoint.weights(model.shard_for, int4=model.uses_int4))
    release_freed_heap()
    # parameters plus buffers (packed int4 weights, rotary tables) plus the Q8_0 LM head
    model.weight_bytes_by_format = weight_bytes_by_format(model)
    weight_bytes = sum(model.weight_bytes_by_format.values())

    def profile() -> int:
        from .cuda_graphs import profile_peak_activations

        return profile_peak_activations(model, spec.max_num_batched_tokens, spec.max_model_len,
                                        spec.cache.block_size, device)

    blocks = num_kv_blocks(checkpoint.config, spec.cache, spec.kv_cache_dtype, device, weight_bytes, tp.world_size,
                           profile=profile, enforce_eager=spec.args.enforce_eager or tp.world_size > 1)
    return model, weight_bytes, blocks


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _compile_or_eager(runner: ModelRunner, max_num_seqs: int) -> None:
    """Build the compiled CPU steps (:meth:`ModelRunner.enable_compiled_decode`); if that
    fails with inductor's C++ wrapper (the default), once more with its Python wrapper; if
    that fails too (say, no C++ compiler), serve eagerly rather than not at all. Each
    failure is one warning line."""
    from .cpu_compile import CPP_WRAPPER_ENV, cpp_wrapper_setting

    for cpp_wrapper in ([True, False] if cpp_wrapper_setting() else [False]):
        try:
            runner.enable_compiled_decode(max_num_seqs, cpp_wrapper=cpp_wrapper)
            return
        except Exception as e:
            runner.disable_compiled()
            if cpp_wrapper:
                logger.warning("torch.compile with inductor's C++ wrapper failed, trying its Python wrapper "
                               "(%s=0 skips the attempt): %s", CPP_WRAPPER_ENV, _first_line(e))
            else:
                logger.warning("torch.compile failed, decode steps run eagerly (-O0 skips the attempt): %s",
                               _first_line(e))


class UniprocExecutor:
    """The model in this process (``--tensor-parallel-size 1``).

    Args:
        spec: model and cache settings.
        checkpoint: the opened checkpoint.
        device: compute device.
    """

    world_size = 1

    def __init__(self, spec: ModelSpec, checkpoint: Checkpoint, device: torch.device):
        # settings first: a bad flag or variable is refused before the weights load
        why_not = should_compile(resolve_mode(spec.args.compilation_config, spec.args.enforce_eager), device,
                                 spec.dtype, 1)
        model, self.weight_bytes, self.num_blocks = build_shard(spec, checkpoint, TPGroup(), device)
        self.runner = ModelRunner(model, self.num_blocks, spec.cache.block_size, device, spec.kv_cache_dtype)
        if device.type == "cuda" and not spec.args.enforce_eager:
            self.runner.enable_cuda_graphs(spec.max_num_seqs, spec.max_model_len)
        if why_not is None:
            _compile_or_eager(self.runner, spec.max_num_seqs)
        elif device.type == "cpu":
            logger.info("decode steps run eagerly: %s", why_not)
        self.failure: Optional[str] = None

    def execute(self, plan: StepPlan) -> Optional[torch.Tensor]:
        """Run one step; logits as :meth:`ModelRunner.execute`."""
        return self.runner.execute(plan)

    def add_failure_callback(self, fn: Callable[[], None]) -> None:
        """Nothing can fail apart from the caller's own thread here."""

    def shutdown(self) -> None:
        """Nothing to stop."""


class MultiprocExecutor:
    """Tensor parallelism over ``N`` ranks (see the module docstring).

    Args:
        spec: model and cache settings (``spec.args.tensor_parallel_size`` ranks).
        checkpoint: rank 0's opened checkpoint (workers reopen ``spec.checkpoint_path``).
        device: ``cpu`` (gloo) or ``cuda`` (NCCL; rank ``r`` on ``cuda:r``).
    Raises:
        RuntimeError: a worker failed to start (its error is in the message), or no
            worker reported within :data:`STARTUP_TIMEOUT_S`.
    """

    def __init__(self, spec: ModelSpec, checkpoint: Checkpoint, device: torch.device):
        n = spec.args.tensor_parallel_size
        # validate the flag before any worker starts
        why_not = should_compile(resolve_mode(spec.args.compilation_config, spec.args.enforce_eager), device,
                                 spec.dtype, n)
        self.world_size = n
        self.failure: Optional[str] = None
        self._callbacks: list[Callable[[], None]] = []
        self._closing = False
        self._procs: list[subprocess.Popen] = []
        self._plan_conns: list[Connection] = []
        self._status_conns: list[Connection] = []
        store = open_store(n)
        try:
            for rank in range(1, n):
                self._spawn(spec, rank, store.port)
            torch.set_num_threads(rank_threads(spec.args))
            dev0 = rank_device(device, 0)
            model, self.weight_bytes, blocks = build_shard(spec, checkpoint, TPGroup(0, n), dev0)
            for rank, msg in self._collect("ready"):
                blocks = min(blocks, msg)
            init_group(0, n, dev0, store.port, store=store)
            self.num_blocks = blocks
            for conn in self._plan_conns:
                conn.send(("init", blocks))
            for rank, _ in self._collect("joined"):
                pass
            self.runner = ModelRunner(model, blocks, spec.cache.block_size, dev0, spec.kv_cache_dtype)
        except BaseException:
            self._kill_all()
            for conn in self._plan_conns + self._status_conns:
                conn.close()
            destroy_group()
            raise
        self._store = store
        atexit.register(self.shutdown)
        self._watcher = threading.Thread(target=self._watch, name="argosy-tp-watch", daemon=True)
        self._watcher.start()
        logger.info("tensor parallel: %d ranks (%s), worker pids %s", n,
                    "nccl" if device.type == "cuda" else "gloo", [p.pid for p in self._procs])
        if device.type == "cuda" and not spec.args.enforce_eager:
            logger.info("CUDA graphs are not used with tensor parallelism yet: decode steps run eagerly")
        if device.type == "cpu" and why_not:
            logger.info("decode steps run eagerly: %s", why_not)

    def _spawn(self, spec: ModelSpec, rank: int, port: int) -> None:
        """Start rank ``rank`` as ``python -m argosy.runtime.worker`` (a fresh interpreter:
        nothing of this process, not even its ``__main__``, is re-imported), connected by
        two pipes: plans in, status out. The status pipe's write end lives only in the
        worker, so its end-of-file doubles as the worker's death notice."""
        plan_r, plan_w = os.pipe()
        status_r, status_w = os.pipe()
        try:
            p = subprocess.Popen([sys.executable, "-m", "argosy.runtime.worker", str(plan_r), str(status_w)],
                                 pass_fds=(plan_r, status_w), close_fds=True)
        finally:
            os.close(plan_r)
            os.close(status_w)
        self._procs.append(p)
        plan_conn = Connection(plan_w, readable=False)
        self._plan_conns.append(plan_conn)
        self._status_conns.append(Connection(status_r, writable=False))
        plan_conn.send((spec, rank, port, os.getpid()))

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of ranks ``1..N-1``."""
        return [p.pid for p in self._procs]

    # ------------------------------------------------------------- startup
    def _collect(self, kind: str):
        """Wait for one ``(kind, rank, payload)`` message per worker; yields ``(rank, payload)``.

        Raises:
            RuntimeError: a worker reported an error, exited, or was silent for
                :data:`STARTUP_TIMEOUT_S`.
        """
        pending = {c: r for r, c in enumerate(self._status_conns, start=1)}
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"tensor-parallel workers {sorted(pending.values())} did not report "
                                   f"{kind!r} within {STARTUP_TIMEOUT_S:.0f}s")
            for conn in wait_any(list(pending), timeout=left):
                rank = pending[conn]
                try:
                    what, _, payload = conn.recv()
                except EOFError:
                    p = self._procs[rank - 1]
                    try:
                        code = p.wait(5.0)
                    except subprocess.TimeoutExpired:
                        code = None
                    raise RuntimeError(f"tensor-parallel worker {rank} exited with code {code} during startup") from None
                if what == "error":
                    raise RuntimeError(f"tensor-parallel worker {rank} failed during startup: {payload}")
                del pending[conn]
                yield rank, payload

    # ------------------------------------------------------------- running
    def add_failure_callback(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` (from the watcher thread) when a worker dies."""
        self._callbacks.append(fn)
        if self.failure is not None:
            fn()

    def execute(self, plan: StepPlan) -> Optional[torch.Tensor]:
        """Send ``plan`` to every worker, run rank 0's shard, return rank 0's logits.

        Raises:
            WorkerDiedError: a worker is gone (before or during the step).
        """
        if self.failure is not None:
            raise WorkerDiedError(self.failure)
        data = pickle.dumps(plan, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            for conn in self._plan_conns:
                conn.send_bytes(data)
            return self.runner.execute(plan)
        except Exception as e:
            # A dead peer surfaces as a broken pipe or a failed collective; wait briefly
            # for the watcher so the error names the worker.
            deadline = time.monotonic() + 2.0
            while self.failure is None and time.monotonic() < deadline and not self._closing:
                time.sleep(0.01)
            raise WorkerDiedError(self.failure or f"tensor-parallel step failed: {e}") from e

    def _watch(self) -> None:
        conns = {c: rank for rank, c in enumerate(self._status_conns, start=1)}
        ready = wait_any(list(conns))  # readable only at end of file: the worker exited
        if self._closing:
            return
        rank = conns[ready[0]]
        p = self._procs[rank - 1]
        try:
            code = p.wait(1.0)
        except subprocess.TimeoutExpired:
            code = None
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        self.failure = f"tensor-parallel worker {rank} (pid {p.pid}) {how}"
        logger.error("%s; stopping the other workers", self.failure)
        self._kill_all()
        for fn in self._callbacks:
            try:
                fn()
            except Exception:  # pragma: no cover - a callback must not stop the others
                logger.exception("failure callback raised")

    # ------------------------------------------------------------ shutdown
    def _kill_all(self) -> None:
        for p in self._procs:
            if p.poll() is None:
                p.kill()
        for p in self._procs:
            try:
                p.wait(5.0)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL is not ignorable
                logger.error("tensor-parallel worker pid %d did not exit after SIGKILL", p.pid)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the workers (ask, then kill after ``timeout`` seconds) and leave the
        process group. Idempotent."""
        if self._closing:
            return
        self._closing = True
        for conn in self._plan_conns:
            try:
                conn.send_bytes(pickle.dumps(None))
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + timeout
        for p in self._procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self._kill_all()
        for conn in self._plan_conns + self._status_conns:
            conn.close()
        destroy_group()


# ----------------------------------------------------------------- the worker
def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (``PR_SET_PDEATHSIG``)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except OSError:  # pragma: no cover - no libc: EOF on the pipe still stops us
        pass


def worker_main(argv: list[str]) -> None:
    """Entry point of a tensor-parallel worker: ``python -m argosy.runtime.worker PLAN_FD STATUS_FD``.

    Reads ``(spec, rank, port, parent_pid)`` from the plan pipe, loads its shard,
    reports ``ready`` (with the KV blocks that fit), joins the process group, allocates
    its KV cache, reports ``joined``, then runs every plan it receives until ``None`` or
    end of file. Never returns: exits 0 on a normal stop, 1 on any error.
    """
    plan_conn = Connection(int(argv[0]), writable=False)
    status_conn = Connection(int(argv[1]), readable=False)
    _die_with_parent()
    rank = -1
    try:
        spec, rank, port, parent_pid = plan_conn.recv()
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: rank 0 decides
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format=f"%(asctime)s %(levelname)s %(name)s [tp rank {rank}]: %(message)s")
        torch.set_num_threads(rank_threads(spec.args))
        device = rank_device(spec.args.resolve_device(), rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        checkpoint = load_checkpoint(spec.checkpoint_path, with_tokenizer=False)
        tp = TPGroup(rank, spec.args.tensor_parallel_size)
        model, _, blocks = build_shard(spec, checkpoint, tp, device)
        status_conn.send(("ready", rank, blocks))
        init_group(rank, tp.world_size, device, port)
        _, num_blocks = plan_conn.recv()
        runner = ModelRunner(model, num_blocks, spec.cache.block_size, device, spec.kv_cache_dtype)
        status_conn.send(("joined", rank, None))
    except EOFError:  # rank 0 went away during startup
        os._exit(1)
    except BaseException as e:  # report, then exit non-zero: rank 0 raises with this text
        try:
            status_conn.send(("error", rank, f"{type(e).__name__}: {e}"))
        except OSError:
            pass
        traceback.print_exc()
        os._exit(1)
    try:
        while True:
            plan = pickle.loads(plan_conn.recv_bytes())
            if plan is None:
                break
            runner.execute(plan)
    except EOFError:  # rank 0 is gone
        os._exit(0)
    except BaseException:
        logger.exception("step failed")
        os._exit(1)
    destroy_group()
    os._exit(0)
