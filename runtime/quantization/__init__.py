"""Weight formats executed in their quantized form (see ``ARCHITECTURE.md``, "Fast CPU
path and quantized weights"). :mod:`.int4` holds the packed 4-bit weight every 4-bit
format maps onto; :mod:`.gguf` decodes GGUF blocks into it."""

from typing import Optional

#: ``--quantization`` methods applied at load to a checkpoint that is not quantized
#: (vLLM's online quantization): ``fp8``, :mod:`.fp8`.
ONLINE_METHODS = ("fp8",)


def online_quantization(requested: Optional[str], weights_quantized: bool) -> Optional[str]:
    """The online method to apply at load: ``requested`` (``--quantization``) when it is one
    of :data:`ONLINE_METHODS` and the checkpoint's weights are not quantized
    (``ModelConfig.weights_quantized``: no method, or one that quantizes only the KV
    cache), else None. The flags are checked before (``check_quantization`` in
    :mod:`argosy.runtime.core.engine`)."""
    return requested if requested in ONLINE_METHODS and not weights_quantized else None
