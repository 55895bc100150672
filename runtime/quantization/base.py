"""What every checkpoint quantization format shares."""


class UnsupportedQuantization(ValueError):
    """A ``quantization_config`` Argosy cannot serve (the message says what and why)."""
