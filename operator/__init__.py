"""Argosy operator: reconciles ``InferenceService`` resources (see issue tracker; not yet built)."""
