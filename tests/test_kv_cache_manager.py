"""KVCacheManager property tests: no leak, no double free, prefix cache consistency."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from argosy.runtime.core.kv_cache_manager import KVCacheManager

BS = 4


class KVMachine(RuleBasedStateMachine):
    """Random allocate / append / fork / free / preempt sequences over a small pool, with
    steps that complete or fail.

    ``self.kv_data`` simulates the KV tensors: per block, the token each slot's KV was
    computed from, written only when a step completes (a fresh block holds garbage,
    ``None``, because a failed step may have written anything into it). Every prefix hit
    must return blocks whose simulated KV holds exactly the queried tokens.
    """

    def __init__(self):
        super().__init__()
        self.kv = KVCacheManager(num_blocks=12, block_size=BS, enable_caching=True)
        self.reqs: dict[str, dict] = {}  # id -> {"tokens": [...], "computed": int}
        self.kv_data: dict[int, list] = {}
        self.n = 0

    def _lookup(self, rid, tokens):
        hits, num_hit = self.kv.get_computed_blocks(rid, tokens)
        assert num_hit % BS == 0 and num_hit < len(tokens) and num_hit == len(hits) * BS
        for i, bid in enumerate(hits):  # a hit's KV holds the queried tokens
            assert self.kv_data.get(bid) == tokens[i * BS : (i + 1) * BS], f"block {bid} hit with other KV"
        return hits, num_hit

    def _run_step(self, rid, tokens, start, before, hits, completes):
        """The step after an allocation: fresh blocks hold garbage; a completed step
        writes tokens ``[start, len(tokens))`` and makes full blocks hit-able."""
        table = self.kv.get_block_ids(rid)
        for bid in table:
            if bid not in before and bid not in hits:
                self.kv_data[bid] = [None] * BS
        if not completes:
            return False
        for pos in range(start, len(tokens)):
            self.kv_data[table[pos // BS]][pos % BS] = tokens[pos]
        self.kv.cache_blocks(rid, tokens, len(tokens))
        return True

    def _admit(self, rid, tokens, completes):
        hits, num_hit = self._lookup(rid, tokens)
        if not self.kv.allocate_slots(rid, tokens, 0, len(tokens) - num_hit, hits):
            assert rid not in self.kv.req_blocks
            self.kv.free(rid)  # must be a harmless no-op
            return False
        assert len(self.kv.get_block_ids(rid)) == -(-len(tokens) // BS)
        if self._run_step(rid, tokens, num_hit, [], hits, completes):
            self.reqs[rid] = {"tokens": tokens, "computed": len(tokens)}
        else:
            self.kv.free(rid)  # the failed step's request is aborted
        return True

    @rule(length=st.integers(1, 20), vocab=st.integers(1, 3), completes=st.booleans())
    def allocate(self, length, vocab, completes):
        rid = f"r{self.n}"
        self.n += 1
        # Small vocabularies make shared prefixes (cache hits) common.
        self._admit(rid, [(i * 7 + vocab) % vocab for i in range(length)], completes)

    @precondition(lambda self: self.reqs)
    @rule(data=st.data(), tok=st.integers(0, 2), completes=st.booleans())
    def append(self, data, tok, completes):
        rid = data.draw(st.sampled_from(sorted(self.reqs)))
        r = self.reqs[rid]
        r["tokens"].append(tok)
        before = list(self.kv.get_block_ids(rid))
        if not self.kv.allocate_slots(rid, r["tokens"], r["computed"], 1):
            r["tokens"].pop()
            assert self.kv.get_block_ids(rid) == before
            return
        assert self.kv.get_block_ids(rid)[: len(before)] == before
        if self._run_step(rid, r["tokens"], r["computed"], before, [], completes):
            r["computed"] += 1
        else:
            self.kv.free(rid)
            del self.reqs[rid]

    @precondition(lambda self: self.reqs)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(sorted(self.reqs)))
        child = f"r{self.n}"
        self.n += 1
        p = self.reqs[parent]
        try:
            copy = self.kv.fork(parent, child, p["computed"])
        except MemoryError:
            return
        if p["computed"] % BS:
            assert copy is not None and copy[0] in self.kv.get_block_ids(parent)
            self.kv_data[copy[1]] = list(self.kv_data[copy[0]])  # the caller copies the data
        else:
            assert copy is None
        self.reqs[child] = {"tokens": list(p["tokens"]), "computed": p["computed"]}

    @precondition(lambda self: self.reqs)
    @rule(data=st.data(), preempt=st.booleans(), completes=st.booleans())
    def free(self, data, preempt, completes):
        rid = data.draw(st.sampled_from(sorted(self.reqs)))
        self.kv.free(rid)
        self.kv.free(rid)  # idempotent: a second free must not double-free
        tokens = self.reqs.pop(rid)["tokens"]
        if preempt:  # recompute preemption: the request comes back and looks up its own prefix
            self._admit(rid, tokens, completes)

    @invariant()
    def consistent(self):
        self.kv.check_invariants()
        held = {b for r in self.reqs for b in self.kv.get_block_ids(r)}
        assert len(held) + self.kv.num_free_blocks == self.kv.num_blocks
        for h, bid in self.kv.cached.items():  # every hit-able block holds its tokens' KV
            assert tuple(self.kv_data.get(bid) or ()) == self.kv.blocks[bid].token_ids

    def teardown(self):
        for rid in list(self.reqs):
            self.kv.free(rid)
        self.kv.check_invariants()
        assert self.kv.num_free_blocks == self.kv.num_blocks, "blocks leaked at idle"


TestKVMachine = KVMachine.TestCase
TestKVMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_prefix_hit_is_verified_against_token_ids():
    kv = KVCacheManager(8, BS)
    a = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert kv.allocate_slots("a", a, 0, len(a))
    kv.cache_blocks("a", a, len(a))
    kv.free("a")
    hits, n = kv.get_computed_blocks("b", a)
    assert n == 8 and len(hits) == 2
    # Corrupt the stored tokens of the first block: a hash match alone must not hit.
    kv.blocks[hits[0]].token_ids = (9, 9, 9, 9)
    assert kv.get_computed_blocks("c", a) == ([], 0)


def test_lru_eviction_keeps_recent_prefix():
    kv = KVCacheManager(4, BS)
    old, new = [1] * 8, [2] * 8
    for rid, toks in (("old", old), ("new", new)):
        assert kv.allocate_slots(rid, toks, 0, 8)
        kv.cache_blocks(rid, toks, 8)
        kv.free(rid)
    # Needing two fresh blocks evicts the least recently freed prefix ("old").
    assert kv.allocate_slots("x", [3] * 8, 0, 8)
    assert kv.get_computed_blocks("q1", old + [0])[1] == 0
    assert kv.get_computed_blocks("q2", new + [0])[1] == 8


def test_full_prompt_hit_leaves_one_token_to_compute():
    kv = KVCacheManager(8, BS)
    toks = list(range(8))
    assert kv.allocate_slots("a", toks, 0, 8)
    kv.cache_blocks("a", toks, 8)
    kv.free("a")
    # 8 tokens = 2 full blocks, but at most 7 may be reused: only the first block hits.
    assert kv.get_computed_blocks("b", toks)[1] == 4


@given(st.lists(st.integers(1, 30), min_size=1, max_size=30))
@settings(max_examples=50, deadline=None)
def test_idle_after_any_allocation_sequence(lengths):
    kv = KVCacheManager(10, BS)
    held = []
    for i, n in enumerate(lengths):
        toks = list(range(n))
        hits, num_hit = kv.get_computed_blocks(str(i), toks)
        if kv.allocate_slots(str(i), toks, 0, n - num_hit, hits):
            kv.cache_blocks(str(i), toks, n)
            held.append(str(i))
        elif held:
            kv.free(held.pop(0))  # "preempt" the oldest
    for rid in held:
        kv.free(rid)
    kv.check_invariants()
    assert kv.num_free_blocks == kv.num_blocks and kv.usage == 0.0


def test_invalid_sizes():
    with pytest.raises(ValueError):
        KVCacheManager(0, 16)


def test_block_is_hit_able_only_after_its_step_completed():
    """Allocation alone registers nothing: a step that fails (or an interrupted loop)
    must not leave blocks with unwritten KV in the prefix cache."""
    kv = KVCacheManager(8, BS)
    toks = list(range(9))
    assert kv.allocate_slots("a", toks, 0, 9)
    assert kv.get_computed_blocks("b", toks) == ([], 0)  # the step has not run
    kv.free("a")  # ... and never completes: the request is aborted
    assert kv.get_computed_blocks("c", toks) == ([], 0)
    assert kv.allocate_slots("d", toks, 0, 9)
    kv.cache_blocks("d", toks, 6)  # a chunk of 6 tokens completed: one full block
    assert kv.get_computed_blocks("e", toks)[1] == 4
    kv.cache_blocks("d", toks, 9)
    assert kv.get_computed_blocks("f", toks)[1] == 8


def test_lookups_are_counted_by_record_prefix_lookup_only():
    kv = KVCacheManager(8, BS)
    toks = list(range(9))
    for _ in range(3):  # a waiting request looked up on every step it cannot be scheduled
        kv.get_computed_blocks("a", toks)
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (0, 0)
    kv.record_prefix_lookup(9, 4)
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (9, 4)
    off = KVCacheManager(8, BS, enable_caching=False)
    off.record_prefix_lookup(9, 0)
    assert off.prefix_cache_queries == 0


@pytest.mark.parametrize("algo", ["sha256", "sha256_cbor"])
def test_block_hashes_are_sha256_and_deterministic_across_processes(algo, tmp_path):
    """The same tokens hash the same in another interpreter (with another
    PYTHONHASHSEED), parents chain, and the value is SHA-256 of the documented layout."""
    import hashlib
    import os
    import struct
    import subprocess
    import sys

    from argosy.runtime.core.kv_cache_manager import get_hash_fn

    fn = get_hash_fn(algo)
    h1 = fn(None, [1, 2, 3, 4], None)
    h2 = fn(h1, [5, 6, 7, 8], None)
    assert len(h1) == 32 and h1 != h2 and fn(None, [5, 6, 7, 8], None) != h2
    if algo == "sha256":
        assert h1 == hashlib.sha256(b"\x00" * 32 + struct.pack("<4i", 1, 2, 3, 4)).digest()
    else:
        import cbor2

        assert h1 == hashlib.sha256(cbor2.dumps([None, [1, 2, 3, 4], None], canonical=True)).digest()
    code = (f"from argosy.runtime.core.kv_cache_manager import get_hash_fn as g; f = g({algo!r}); "
            "print(f(f(None, [1, 2, 3, 4], None), [5, 6, 7, 8], None).hex())")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONHASHSEED="12345")).stdout.strip()
    assert out == h2.hex()
    with pytest.raises(ValueError, match="sha256"):
        KVCacheManager(4, BS, hash_algo="builtin")
