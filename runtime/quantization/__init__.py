"""Weight formats executed in their quantized form (see ``ARCHITECTURE.md``, "Fast CPU
path and quantized weights"). Checkpoint formats (:mod:`.gguf`, :mod:`.gptq_awq`,
:mod:`.compressed_tensors`, :mod:`.fp8`) decode their tensors into a few weight forms
(:mod:`.int4`, :mod:`.int8`, :mod:`.q8_0`, :mod:`.fp8`); each form's module registers the
linear-layer methods that run it (:class:`.base.LinearMethod`, chosen per layer by
:func:`.base.choose_linear_method`)."""

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
