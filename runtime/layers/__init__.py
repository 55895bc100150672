"""Model building blocks that hide the weight format from the model code."""

from .linear import INT4_MAX_ROWS, Linear

__all__ = ["INT4_MAX_ROWS", "Linear"]
