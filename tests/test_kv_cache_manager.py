"""KVCacheManager property tests: no leak, no double free, prefix cache consistency."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from argosy.runtime.core.kv_cache_manager import KVCacheManager

BS = 4


class KVMachine(RuleBasedStateMachine):
    """Random allocate / append / fork / free / preempt sequences over a small pool."""

    def __init__(self):
        super().__init__()
        self.kv = KVCacheManager(num_blocks=12, block_size=BS, enable_caching=True)
        self.reqs: dict[str, dict] = {}  # id -> {"tokens": [...], "computed": int}
        self.n = 0

    @rule(length=st.integers(1, 20), vocab=st.integers(1, 3))
    def allocate(self, length, vocab):
        rid = f"r{self.n}"
        self.n += 1
        # Small vocabularies make shared prefixes (cache hits) common.
        tokens = [(i * 7 + vocab) % vocab for i in range(length)]
        hits, num_hit = self.kv.get_computed_blocks(rid, tokens)
        assert num_hit % BS == 0 and num_hit < length
        if self.kv.allocate_slots(rid, tokens, 0, length - num_hit, hits):
            self.reqs[rid] = {"tokens": tokens, "computed": length}
            assert len(self.kv.get_block_ids(rid)) == -(-length // BS)
        else:
            assert rid not in self.kv.req_blocks
            self.kv.free(rid)  # must be a harmless no-op

    @precondition(lambda self: self.reqs)
    @rule(data=st.data(), tok=st.integers(0, 2))
    def append(self, data, tok):
        rid = data.draw(st.sampled_from(sorted(self.reqs)))
        r = self.reqs[rid]
        r["tokens"].append(tok)
        before = list(self.kv.get_block_ids(rid))
        if self.kv.allocate_slots(rid, r["tokens"], r["computed"], 1):
            r["computed"] += 1
            assert self.kv.get_block_ids(rid)[: len(before)] == before
        else:
            r["tokens"].pop()
            assert self.kv.get_block_ids(rid) == before

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
        else:
            assert copy is None
        self.reqs[child] = {"tokens": list(p["tokens"]), "computed": p["computed"]}

    @precondition(lambda self: self.reqs)
    @rule(data=st.data(), preempt=st.booleans())
    def free(self, data, preempt):
        rid = data.draw(st.sampled_from(sorted(self.reqs)))
        self.kv.free(rid)
        self.kv.free(rid)  # idempotent: a second free must not double-free
        del self.reqs[rid]

    @invariant()
    def consistent(self):
        self.kv.check_invariants()
        held = {b for r in self.reqs for b in self.kv.get_block_ids(r)}
        assert len(held) + self.kv.num_free_blocks == self.kv.num_blocks

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
        kv.free(rid)
    # Needing two fresh blocks evicts the least recently freed prefix ("old").
    assert kv.allocate_slots("x", [3] * 8, 0, 8)
    assert kv.get_computed_blocks("q1", old + [0])[1] == 0
    assert kv.get_computed_blocks("q2", new + [0])[1] == 8


def test_full_prompt_hit_leaves_one_token_to_compute():
    kv = KVCacheManager(8, BS)
    toks = list(range(8))
    assert kv.allocate_slots("a", toks, 0, 8)
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
