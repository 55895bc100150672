"""Weight formats executed in their quantized form (see ``ARCHITECTURE.md``, "Fast CPU
path and quantized weights"). :mod:`.int4` holds the packed 4-bit weight every 4-bit
format maps onto; :mod:`.gguf` decodes GGUF blocks into it."""

from typing import Optional

#: ``--quantization`` methods applied at load to a checkpoint that is not quantized
#: (vLLM's online quantization): ``fp8``, :mod:`.fp8`.
ONLINE_METHODS = ("fp8",)


def online_quantization(requested: Optional[str], checkpoint_method: Optional[str],
                        kv_cache_only: bool = False) -> Optional[str]:
    """The online method to apply at load: ``requested`` (``--quantization``) when it is one
    of :data:`ONLINE_METHODS` and the checkpoint's weights are not quantized
    (``checkpoint_method`` None, or ``kv_cache_only``: its method quantizes only the KV
    cache), else None. The flags are checked before (``check_quantization`` in
    :mod:`argosy.runtime.core.engine`)."""
    return requested if requested in ONLINE_METHODS and (checkpoint_method is None or kv_cache_only) else None
