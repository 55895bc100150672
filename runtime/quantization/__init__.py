"""Weight formats executed in their quantized form (see ``ARCHITECTURE.md``, "Fast CPU
path and quantized weights"). :mod:`.int4` holds the packed 4-bit weight every 4-bit
format maps onto; :mod:`.gguf` decodes GGUF blocks into it."""
