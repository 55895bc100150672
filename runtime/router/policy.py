"""Routing decisions, pure: request block hashes + upstream states -> an upstream.

Policies (``--routing``):

* ``prefix`` (default): for each ready upstream, the estimated cost of serving the request
  there, in prompt tokens: the tokens it would have to prefill (prompt blocks not already
  in its prefix cache) plus ``load_cost_tokens`` for every request queued or in flight
  there. The cheapest wins; ties go to the less loaded, then the first. A cached 600-token
  prefix is thus worth ~2 queued requests at the default 256 tokens each. The cache an
  upstream holds is what its engine reports, plus the blocks of requests this router sent
  it recently (their KV is being computed; the engine reports it once a step has written
  it), so a burst of requests with one new prefix lands on one engine.
* ``least-load``: fewest requests queued or in flight; KV-cache usage breaks ties.
* ``round-robin``: the next ready upstream in turn.

An upstream whose engine hashes blocks differently (another block size or hash
algorithm than the router's ``--block-size`` / ``--prefix-caching-hash-algo``) has no
prefix score at all: its hashes could never match, so it is routed on load alone, and
the router reports the mismatch (``argosy_router_upstream_prefix_config_mismatch``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

POLICIES = ("prefix", "least-load", "round-robin")

#: Default prompt tokens one queued or in-flight request is worth (``--load-cost-tokens``).
DEFAULT_LOAD_COST_TOKENS = 256


def block_hashes(token_ids: Sequence[int], block_size: int,
                 hash_fn: Callable[[Optional[bytes], Sequence[int], object], bytes]) -> list[bytes]:
    """Chained hashes of the prompt's full blocks, exactly as the engine's KV cache
    manager computes them (``hash_fn`` is :func:`~argosy.runtime.core.kv_cache_manager.get_hash_fn`'s).

    Returns:
        ``len(token_ids) // block_size`` hashes; block ``i`` chains block ``i - 1``'s.
    """
    out: list[bytes] = []
    parent = None
    for i in range(len(token_ids) // block_size):
        parent = hash_fn(parent, token_ids[i * block_size : (i + 1) * block_size], None)
        out.append(parent)
    return out


def matched_blocks(hashes: Sequence[bytes], *held: "set[bytes] | dict") -> int:
    """How many leading ``hashes`` are in any of the ``held`` sets (a prefix match: the
    first block not held ends it, as in the engine's lookup)."""
    n = 0
    for h in hashes:
        if not any(h in s for s in held):
            break
        n += 1
    return n


@dataclass
class UpstreamView:
    """What the policy sees of one upstream.

    Attributes:
        name: its URL (for metrics and logs).
        ready: passing its health check.
        load: requests queued or in flight there (the router's own in-flight count plus
            the engine's ``vllm:num_requests_waiting``).
        kv_usage: ``vllm:kv_cache_usage_perc`` in [0, 1].
        prefix_ok: it hashes blocks the way the router does (else no prefix score).
        held: block hashes its prefix cache holds (reported).
        recent: block hashes of requests the router sent it recently (a dict or set).
    """

    name: str
    ready: bool = True
    load: float = 0.0
    kv_usage: float = 0.0
    prefix_ok: bool = True
    held: set = field(default_factory=set)
    recent: dict = field(default_factory=dict)


@dataclass
class Decision:
    """The choice: ``index`` into the views, and the prompt tokens already cached there."""

    index: int
    matched_tokens: int = 0


def choose(policy: str, views: Sequence[UpstreamView], hashes: Sequence[bytes], block_size: int,
           rr_counter: int = 0, load_cost_tokens: float = DEFAULT_LOAD_COST_TOKENS) -> Optional[Decision]:
    """Pick an upstream for a request (see the module doc).

    Args:
        policy: one of :data:`POLICIES`.
        views: every upstream, ready or not.
        hashes: the request's prompt block hashes (:func:`block_hashes`; may be empty).
        block_size: tokens per block of those hashes.
        rr_counter: requests routed so far (``round-robin``'s turn).
        load_cost_tokens: see the module doc.
    Returns:
        The decision, or None when no upstream is ready.
    Raises:
        ValueError: unknown policy.
    """
    if policy not in POLICIES:
        raise ValueError(f"--routing must be one of {', '.join(POLICIES)}, not {policy!r}")
    ready = [i for i, v in enumerate(views) if v.ready]
    if not ready:
        return None
    if policy == "round-robin":
        return Decision(ready[rr_counter % len(ready)])
    if policy == "least-load":
        return Decision(min(ready, key=lambda i: (views[i].load, views[i].kv_usage, i)))
    best, best_key, best_match = ready[0], None, 0
    for i in ready:
        v = views[i]
        m = matched_blocks(hashes, v.held, v.recent) if v.prefix_ok else 0
        cost = (len(hashes) - m) * block_size + load_cost_tokens * v.load
        key = (cost, v.load, v.kv_usage, i)
        if best_key is None or key < best_key:
            best, best_key, best_match = i, key, m
    return Decision(best, best_match * block_size)
