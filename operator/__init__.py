"""Argosy operator: reconciles ``InferenceService`` resources (``serving.argosy.dev/v1alpha1``).

Functional core, imperative shell: :mod:`.api` (the pydantic models, the single source of
truth), :mod:`.crdgen` (the CRD from them), :mod:`.render` (children as plain dicts) and
:mod:`.reconcile` (children to apply + status) are pure; the kopf shell does the I/O.
"""
