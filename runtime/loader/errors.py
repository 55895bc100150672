"""Loader errors (no torch: the router and the CLI import this)."""


class ModelLoadError(Exception):
    """A model could not be loaded; the message is one line naming the problem and the path."""
