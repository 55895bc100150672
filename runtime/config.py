"""Engine configuration with vLLM's flag names.

``EngineArgs`` is the flat set of user-facing knobs (one field per ``argosy serve``
flag, named as ``vllm serve`` names them); ``EngineArgs.create_configs`` splits it
into the per-concern configs the engine's parts consume.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Optional, Union

import torch

#: Default KV cache size on CPU when ``--kv-cache-memory`` is not given (bytes).
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30  # 1 GiB

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


#: ``--kv-cache-dtype`` values (vLLM's names) other than ``auto`` -> the cache's element type.
KV_CACHE_DTYPES = {
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """Map ``--kv-cache-dtype`` to the KV cache's element type: ``auto`` is the model dtype;
    ``fp8`` / ``fp8_e4m3`` is OCP FP8 E4M3 (``float8_e4m3fn``, max 448), ``fp8_e5m2``
    FP8 E5M2 (max 57,344), one byte per value (half of bfloat16's two).

    Raises:
        ValueError: another name.
    """
    if name == "auto":
        return model_dtype
    try:
        return KV_CACHE_DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown --kv-cache-dtype {name!r}; choose one of auto, {', '.join(KV_CACHE_DTYPES)}") from None


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Map a ``--dtype`` value to a torch dtype.

    ``auto`` is bfloat16 on every device: on the CPU that is what the packed int4
    kernel and AMX/AVX-512 BF16 matmuls run fastest (4-bit GGUF weights then execute
    packed, see :mod:`argosy.runtime.layers.linear`). ``float32`` is the exact path:
    dense dequantized weights, logits that agree with Hugging Face's float32 reference.

    Raises:
        ValueError: unknown dtype name.
    """
    if name == "auto":
        return torch.bfloat16
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown --dtype {name!r}; choose one of auto, {', '.join(sorted(_DTYPES))}") from None


@dataclass
class ModelConfig:
    """Architecture hyper-parameters of a Llama-family decoder (HF ``LlamaConfig`` names)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    #: HF ``rope_scaling`` dict (``rope_type`` "llama3" / "linear" supported) or None.
    rope_scaling: Optional[dict] = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple[int, ...] = ()
    attention_bias: bool = False
    mlp_bias: bool = False
    architecture: str = "LlamaForCausalLM"
    #: the checkpoint's own quantization method (``gguf``, ``compressed-tensors``, ``awq``, ``gptq``), None if dense
    quantization: Optional[str] = None
    #: whether that method quantizes only the KV cache (a compressed-tensors ``kv_cache_scheme``
    #: with dense weights): ``--quantization fp8`` may then quantize the weights at load
    kv_cache_only_quantization: bool = False

    @property
    def weights_quantized(self) -> bool:
        """Whether the checkpoint's weights are quantized (a method that quantizes only the
        KV cache leaves them dense: ``--quantization fp8`` may then quantize them at load)."""
        return self.quantization is not None and not self.kv_cache_only_quantization


@dataclass
class CacheConfig:
    """Paged KV cache settings. ``num_gpu_blocks`` is filled in after memory profiling."""

    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    kv_cache_memory: Optional[int] = None  # bytes; CPU (and explicit override on CUDA)
    enable_prefix_caching: bool = True
    num_blocks: Optional[int] = None
    prefix_caching_hash_algo: str = "sha256"
    #: ``--kv-cache-dtype`` (``auto``: the model dtype; see :func:`resolve_kv_cache_dtype`)
    cache_dtype: str = "auto"


@dataclass
class SchedulerConfig:
    """Continuous-batching limits, all in tokens or sequences."""

    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int
    enable_chunked_prefill: bool = True
    #: Bound on the waiting queue; requests beyond it are refused (HTTP 503). None = unbounded.
    max_waiting_requests: Optional[int] = None


@dataclass
class EngineArgs:
    """All engine flags, named as in ``vllm serve`` (``--max-num-seqs`` -> ``max_num_seqs``)."""

    model: Optional[str] = None
    tokenizer: Optional[str] = None
    revision: Optional[str] = None
    #: Names clients may send as ``model`` (the first is the one responses report); one
    #: string or a list. None: the MODEL argument as given, else the bundled model's name.
    served_model_name: Union[None, str, list[str]] = None
    dtype: str = "auto"
    quantization: Optional[str] = None
    device: str = "auto"
    max_model_len: Optional[int] = None
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    kv_cache_memory: Optional[int] = None
    num_gpu_blocks_override: Optional[int] = None
    enable_prefix_caching: bool = True
    prefix_caching_hash_algo: str = "sha256"
    kv_cache_dtype: str = "auto"
    enable_chunked_prefill: bool = True
    max_num_batched_tokens: Optional[int] = None
    max_num_seqs: int = 256
    max_waiting_requests: Optional[int] = None
    tensor_parallel_size: int = 1
    seed: int = 0
    enforce_eager: bool = False
    compilation_config: Optional[str] = None
    num_threads: Optional[int] = None
    structured_outputs_backend: str = "auto"
    #: vLLM's ``--swap-space`` (GiB of CPU memory for swapped-out KV blocks): accepted, no
    #: effect: a preempted request is recomputed, as in vLLM V1.
    swap_space: Optional[float] = None

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Register the engine flags on ``parser`` (names and meanings follow ``vllm serve``)."""
        d = EngineArgs()
        g = parser.add_argument_group("engine")
        g.add_argument("--tokenizer", default=None, help="tokenizer path (default: the model's)")
        g.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) for hub ids")
        g.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                       help="model names the API accepts in requests' model field; the first is the one responses "
                            "and /metrics report (default: MODEL exactly as given, as vLLM; the bundled model's "
                            "name when no MODEL is given)")
        g.add_argument("--dtype", default=d.dtype, help="auto | float32 | bfloat16 | float16 (auto: bfloat16; 4-bit GGUF weights run packed in bfloat16 "
                            "on CPU; float32 = dense dequantized weights, exact against HF)")
        g.add_argument("--quantization", "-q", default=None,
                       help="the checkpoint's quantization method, detected when omitted: gguf (with bfloat16 on CPU "
                            "4-bit tensors run packed int4, Q8_0/Q5_x/Q6_K grouped int8, others are dequantized to "
                            "--dtype), compressed-tensors "
                            "(W4A16, W8A8, FP8), awq (4-bit GEMM) or gptq (4/8-bit, act-order too; awq_marlin and "
                            "gptq_marlin are taken as those); a method other than the checkpoint's own is an error; "
                            "fp8: a quant_method fp8 checkpoint (per-tensor or block scales), or on a float Hugging "
                            "Face checkpoint it quantizes the linear layers at load (E4M3, one "
                            "scale per output row; torch._scaled_mm with per-token FP8 activations on GPUs that take "
                            "it, dense on the FP8 values elsewhere)")
        g.add_argument("--device", default=d.device, help="auto | cpu | cuda")
        g.add_argument("--max-model-len", type=int, default=None, help="context length in tokens (prompt + output); default: the model's")
        g.add_argument("--block-size", type=int, default=d.block_size, help="tokens per KV cache block")
        g.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization,
                       help="fraction of GPU memory for weights, activations and KV cache (CUDA)")
        g.add_argument("--kv-cache-memory", type=_parse_bytes, default=None,
                       help="KV cache size in bytes (suffixes KiB/MiB/GiB accepted); default 1GiB on CPU")
        g.add_argument("--kv-cache-dtype", default=d.kv_cache_dtype, choices=["auto", *KV_CACHE_DTYPES],
                       help="KV cache element type: auto (the model dtype) or fp8 (= fp8_e4m3) / fp8_e5m2, one byte "
                            "per value, so twice the tokens in the same memory; values are stored divided by the "
                            "checkpoint's per-tensor KV-cache scales (fp8 / fp8_e4m3, when it has them; else "
                            "unscaled, as vLLM) and widened to the model dtype on read (CPU, and "
                            "CUDA through the Triton kernels)")
        g.add_argument("--swap-space", type=float, default=None, metavar="GIB",
                       help="accepted for vLLM manifests, no effect: preempted requests are recomputed (vLLM V1's "
                            "only preemption mode), never swapped to CPU memory")
        g.add_argument("--num-gpu-blocks-override", type=int, default=None, help="force the number of KV blocks (testing)")
        g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=d.enable_prefix_caching,
                       help="reuse KV blocks of shared prompt prefixes (default on)")
        g.add_argument("--prefix-caching-hash-algo", default=d.prefix_caching_hash_algo, choices=["sha256", "sha256_cbor"],
                       help="block hash for prefix caching: sha256 (default; fixed byte layout, deterministic across "
                            "processes) or sha256_cbor (canonical CBOR, reproducible from other languages; slower)")
        g.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=d.enable_chunked_prefill,
                       help="split long prefills across steps to share the token budget with decodes (default on)")
        g.add_argument("--max-num-batched-tokens", type=int, default=None, help="token budget per engine step")
        g.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs, help="max sequences per engine step")
        g.add_argument("--max-waiting-requests", type=int, default=None,
                       help="refuse new requests with HTTP 503 while this many are waiting (default unbounded)")
        g.add_argument("--tensor-parallel-size", "-tp", type=int, default=d.tensor_parallel_size,
                       help="ranks to split the model over (Megatron-style; worker processes joined by gloo on CPU, "
                            "NCCL on CUDA); must divide the attention heads, KV heads and MLP width")
        g.add_argument("--seed", type=int, default=d.seed, help="engine random seed")
        g.add_argument("--enforce-eager", action="store_true",
                       help="always run eagerly: no CUDA graphs, no torch.compile (same as -O0)")
        g.add_argument("--compilation-config", "-O", dest="compilation_config", default=None,
                       help="torch.compile of decode steps and prefill layer stages on CPU (bfloat16/float16, one rank): "
                            "3 (default) or 0, "
                            "or JSON like '{\"mode\": 3}'; -O0 / -O3 for short. The default can also be set with "
                            "$ARGOSY_COMPILATION_MODE. Compiling takes ~2.5-3 min on 2 cores the first time, ~25-35 s "
                            "from inductor's cache ($ARGOSY_CACHE_DIR/inductor/<vector ISA>-rows<N>)")
        g.add_argument("--structured-outputs-config.backend", "--guided-decoding-backend",
                       dest="structured_outputs_backend", default=d.structured_outputs_backend,
                       choices=["auto", "xgrammar"],
                       help="grammar engine for response_format / guided_* / structured_outputs / tool_choice "
                            "(auto = xgrammar; llguidance was measured slower here and is not wired in)")
        g.add_argument("--num-threads", type=int, default=None, help="torch CPU threads (default: $OMP_NUM_THREADS, else the cores this process may use: CPU affinity capped by the cgroup CPU limit)")
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "EngineArgs":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def scheduler_config(self, model_max_len: int) -> SchedulerConfig:
        """Build the scheduler config; ``model_max_len`` is the model's trained context (tokens).

        Raises:
            ValueError: ``--max-model-len`` above the model's limit, or a token budget that
                cannot hold one max-length prompt when chunked prefill is off.
        """
        max_model_len = self.max_model_len or model_max_len
        if max_model_len > model_max_len:
            raise ValueError(f"--max-model-len {max_model_len} exceeds the model's context length {model_max_len}")
        if self.max_num_batched_tokens is not None:
            budget = self.max_num_batched_tokens
        elif self.enable_chunked_prefill:
            budget = 2048
        else:
            budget = max(max_model_len, 2048)
        if not self.enable_chunked_prefill and budget < max_model_len:
            raise ValueError(
                f"--max-num-batched-tokens ({budget}) is smaller than --max-model-len ({max_model_len}) "
                "with chunked prefill disabled: long prompts could never be scheduled"
            )
        if budget < 1 or self.max_num_seqs < 1:
            raise ValueError("--max-num-batched-tokens and --max-num-seqs must be positive")
        return SchedulerConfig(
            max_num_batched_tokens=budget,
            max_num_seqs=self.max_num_seqs,
            max_model_len=max_model_len,
            enable_chunked_prefill=self.enable_chunked_prefill,
            max_waiting_requests=self.max_waiting_requests,
        )

    def cache_config(self) -> CacheConfig:
        return CacheConfig(
            block_size=self.block_size,
            gpu_memory_utilization=self.gpu_memory_utilization,
            kv_cache_memory=self.kv_cache_memory,
            enable_prefix_caching=self.enable_prefix_caching,
            num_blocks=self.num_gpu_blocks_override,
            prefix_caching_hash_algo=self.prefix_caching_hash_algo,
            cache_dtype=self.kv_cache_dtype,
        )


def _parse_bytes(text: str) -> int:
    """Parse ``"512MiB"``, ``"2GiB"``, ``"1G"`` or a plain integer into bytes."""
    t = text.strip().lower().replace(" ", "")
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "k": 10**3, "m": 10**6, "g": 10**9,
             "kb": 10**3, "mb": 10**6, "gb": 10**9}
    for suffix in sorted(units, key=len, reverse=True):
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * units[suffix])
    return int(t)


def cgroup_cpu_limit(root: str = "/sys/fs/cgroup") -> Optional[float]:
    """The CPU limit of this process's cgroup in cores (a Kubernetes ``limits.cpu``), or None
    when there is none or it cannot be read.

    cgroup v2: ``cpu.max`` holds ``"QUOTA PERIOD"`` (microseconds; ``max`` = no limit);
    cgroup v1: ``cpu/cpu.cfs_quota_us`` / ``cpu/cpu.cfs_period_us`` (-1 = no limit)
    (Linux kernel documentation, "Control Group v2", CPU interface files).
    """
    try:
        with open(os.path.join(root, "cpu.max")) as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as f:
            quota = int(f.read())
        with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as f:
            period = int(f.read())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def default_num_threads(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """Torch CPU threads when ``--num-threads`` is not given: ``$OMP_NUM_THREADS`` when set,
    else the cores this process may use: its CPU affinity (container cpusets), capped by
    its cgroup's CPU limit rounded up (a pod with ``limits.cpu: 4`` on a 64-core node gets 4
    threads, not 64: more OpenMP threads than the CFS quota allows spin and get throttled,
    and two engines sharing cores that way ran 39x slower than one alone in one
    measurement). At least 1."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit(cgroup_root)
    if limit is not None:
        cores = min(cores, max(1, math.ceil(limit - 1e-9)))
    return max(1, cores)
