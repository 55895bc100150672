"""``argosy router``: the fleet's front door (prefix-cache-aware routing, held requests).

An OpenAI-compatible reverse proxy in front of ``argosy serve`` replicas. It tokenizes
each request with the model's own tokenizer and chat template, hashes the prompt's full
blocks with the engine's own block-hash function, and sends the request where the most
of that prefix is already cached, balanced against load (:mod:`.policy`). Engines
publish what they hold at ``GET /kv_events`` (:mod:`argosy.runtime.core.kv_events`),
which the router follows, with their load from ``/metrics`` (:mod:`.upstreams`). With no
ready upstream, requests wait in a bounded queue, exported as
``argosy_router_pending_requests`` for scale-from-zero triggers (:mod:`.app`).

Nothing here imports torch.
"""
