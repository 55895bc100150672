"""Paged KV cache bookkeeping: block pool, per-request block tables, prefix caching.

Design after vLLM V1's ``KVCacheManager`` / ``BlockPool`` (Kwon et al., SOSP 2023 for
paging; automatic prefix caching as in vLLM's design doc): a block is a fixed run of
``block_size`` token slots. A request owns a list of block ids (its block table);
blocks are reference counted so requests with a common prefix share them.

Prefix caching: once a block is full and a step that wrote its KV has completed
(:meth:`KVCacheManager.cache_blocks`, called after the step), its hash chains the parent
block's hash with the block's token ids, so equal hashes mean equal prefixes. A block is
never hit-able before its KV exists: a step that fails or is interrupted registers
nothing. Hashes are SHA-256 (``--prefix-caching-hash-algo``, as vLLM's: predictable
64-bit hashes let one tenant plant collisions for another's prompts, the class of
CVE-2025-25183), deterministic across processes and machines so a router can compute
the same ones; a hit is also verified against the stored token ids and parent hash.
Freed blocks keep their hash and sit in an LRU free queue; they are reused on a hit or
evicted (hash dropped) when a fresh block is needed, least recently freed first.

This module imports no torch: the router computes block hashes with the same function.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from typing import Callable, Optional, Sequence

from .kv_events import KVEventLog


class KVCacheBlock:
    """Metadata of one physical block (the data lives in the model runner's cache tensors)."""

    __slots__ = ("block_id", "ref_cnt", "block_hash", "parent_hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: Optional[BlockHash] = None
        self.parent_hash: Optional[BlockHash] = None
        self.token_ids: Optional[tuple[int, ...]] = None

    def reset_hash(self) -> None:
        self.block_hash = self.parent_hash = self.token_ids = None


#: A block hash: 32 bytes of SHA-256.
BlockHash = bytes

_NO_PARENT = b"\x00" * 32


def hash_block_sha256(parent_hash: Optional[BlockHash], token_ids: Sequence[int], extra: object = None) -> BlockHash:
    """Chained block hash, ``--prefix-caching-hash-algo sha256`` (the default).

    ``SHA-256(parent || tokens || extra)`` over a fixed byte layout: the parent's 32-byte
    hash (32 zero bytes for the first block), each token id as a little-endian int32,
    then, when ``extra`` (adapter id, ...) is not None, ``0xff`` and ``repr(extra)`` in
    UTF-8. The same tokens give the same hash in every process and on every machine.

    Args:
        parent_hash: the previous block's hash, or None for a sequence's first block.
        token_ids: the block's ``block_size`` token ids (each in ``[0, 2**31)``).
        extra: optional key mixed in (None for plain text requests).
    Returns:
        32 bytes.
    Raises:
        struct.error: a token id outside the int32 range.
    """
    h = hashlib.sha256(parent_hash or _NO_PARENT)
    h.update(struct.pack(f"<{len(token_ids)}i", *token_ids))
    if extra is not None:
        h.update(b"\xff" + repr(extra).encode())
    return h.digest()


def hash_block_sha256_cbor(parent_hash: Optional[BlockHash], token_ids: Sequence[int],
                           extra: object = None) -> BlockHash:
    """Chained block hash, ``--prefix-caching-hash-algo sha256_cbor`` (as vLLM's): SHA-256
    of the canonical CBOR encoding (RFC 8949 §4.2.1, via ``cbor2``) of
    ``[parent_hash, [token ids], extra]``, reproducible from any language with a CBOR
    library. Slower than ``sha256`` (see the README for the measured cost per block).

    Raises:
        ImportError: ``cbor2`` is not installed.
    """
    import cbor2

    return hashlib.sha256(cbor2.dumps([parent_hash, list(token_ids), extra], canonical=True)).digest()


#: ``--prefix-caching-hash-algo`` values -> block hash function.
HASH_ALGOS: dict[str, Callable[[Optional[BlockHash], Sequence[int], object], BlockHash]] = {
    "sha256": hash_block_sha256,
    "sha256_cbor": hash_block_sha256_cbor,
}


def get_hash_fn(name: str) -> Callable[[Optional[BlockHash], Sequence[int], object], BlockHash]:
    """The block hash function for a ``--prefix-caching-hash-algo`` name.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    try:
        return HASH_ALGOS[name]
    except KeyError:
        raise ValueError(f"--prefix-caching-hash-algo must be one of {', '.join(HASH_ALGOS)}, not {name!r}") from None



class KVCacheManager:
    """Allocates and frees KV blocks for requests.

    Args:
        num_blocks: physical blocks in the cache.
        block_size: tokens per block.
        enable_caching: automatic prefix caching on/off.
        hash_algo: ``--prefix-caching-hash-algo`` (``sha256`` or ``sha256_cbor``).

    Counters (monotonic, for metrics): ``prefix_cache_queries`` and ``prefix_cache_hits``
    in tokens (vLLM's ``vllm:prefix_cache_queries_total`` / ``..._hits_total``), counted
    by :meth:`record_prefix_lookup` once per scheduled lookup.

    Raises:
        ValueError: non-positive sizes or an unknown ``hash_algo``.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True, hash_algo: str = "sha256"):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.hash_algo = hash_algo
        self._hash = get_hash_fn(hash_algo)
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        # LRU free queue: front = next to hand out / evict.
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[BlockHash, int] = {}  # block hash -> block id
        self.req_blocks: dict[str, list[int]] = {}
        self.req_hashes: dict[str, list[BlockHash]] = {}
        self.req_num_cached: dict[str, int] = {}
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        #: Stored / removed hashes for routers (``GET /kv_events``); None when caching is off.
        self.events: Optional[KVEventLog] = KVEventLog(block_size, hash_algo) if enable_caching else None

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests, in [0, 1] (``vllm:kv_cache_usage_perc``)."""
        return 1.0 - len(self.free_queue) / self.num_blocks

    def get_block_ids(self, request_id: str) -> list[int]:
        """The request's block table (empty if it holds none)."""
        return self.req_blocks.get(request_id, [])

    def _block_hashes(self, request_id: str, token_ids: Sequence[int], num_full: int) -> list[BlockHash]:
        hashes = self.req_hashes.setdefault(request_id, [])
        bs = self.block_size
        while len(hashes) < num_full:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(self._hash(parent, token_ids[i * bs : (i + 1) * bs], None))
        return hashes

    def get_computed_blocks(self, request_id: str, token_ids: Sequence[int]) -> tuple[list[int], int]:
        """Longest verified cached prefix of ``token_ids``.

        At most ``len(token_ids) - 1`` tokens are reported as computed, so the last
        prompt token is always run through the model to produce logits.

        Returns:
            ``(block_ids, num_computed_tokens)``; the blocks are not yet referenced
            (pass them to :meth:`allocate_slots`).
        """
        if not self.enable_caching:
            return [], 0
        n = len(token_ids)
        num_full = (n - 1) // self.block_size
        hashes = self._block_hashes(request_id, token_ids, num_full)
        hits: list[int] = []
        parent = None
        bs = self.block_size
        for i in range(num_full):
            bid = self.cached.get(hashes[i])
            if bid is None:
                break
            blk = self.blocks[bid]
            if blk.parent_hash != parent or blk.token_ids != tuple(token_ids[i * bs : (i + 1) * bs]):
                break  # hash collision: treat as a miss
            hits.append(bid)
            parent = hashes[i]
        return hits, len(hits) * bs

    def prompt_block_hashes(self, request_id: str, token_ids: Sequence[int], start: int, end: int) -> list[BlockHash]:
        """Hashes of the full blocks lying in tokens ``[start, end)`` of ``token_ids``
        (block ``i`` covers tokens ``[i * block_size, (i + 1) * block_size)``; the block
        holding ``start`` counts when it ends by ``end``). Empty with caching off."""
        if not self.enable_caching:
            return []
        bs = self.block_size
        first, last = start // bs, end // bs
        if last <= first:
            return []
        return self._block_hashes(request_id, token_ids, last)[first:last]

    def num_prefix_tokens_in(self, request_id: str, token_ids: Sequence[int], start: int,
                             hashes: "set[BlockHash]") -> int:
        """Tokens of the consecutive full blocks from token ``start`` (a block boundary: the
        end of a prefix-cache hit) whose hashes are in ``hashes``; the last prompt token is
        not counted (as in :meth:`get_computed_blocks`). 0 with caching off."""
        if not self.enable_caching or not hashes:
            return 0
        bs = self.block_size
        num_full = (len(token_ids) - 1) // bs
        own = self._block_hashes(request_id, token_ids, num_full)
        i = start // bs
        while i < num_full and own[i] in hashes:
            i += 1
        return max(0, i * bs - start)

    def record_prefix_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Count one request's prefix-cache lookup (tokens queried, tokens hit) in the
        metrics counters. The scheduler calls it once per lookup whose request was
        scheduled, not on every step a request waits for blocks. No-op with caching off."""
        if self.enable_caching:
            self.prefix_cache_queries += num_tokens
            self.prefix_cache_hits += num_hit_tokens

    # --------------------------------------------------------------- mutations
    def allocate_slots(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int,
                       num_new_tokens: int, new_computed_blocks: Sequence[int] = ()) -> bool:
        """Make room for ``num_new_tokens`` more tokens of a request.

        Args:
            request_id: the request.
            token_ids: all of the request's known tokens (prompt + output).
            num_computed_tokens: tokens already in the cache for this request, excluding
                ``new_computed_blocks``.
            num_new_tokens: tokens to be computed this step.
            new_computed_blocks: prefix-cache hits from :meth:`get_computed_blocks`
                (first allocation only).
        Returns:
            False, with nothing changed, when not enough free blocks exist.

        New blocks are not hit-able yet: :meth:`cache_blocks` registers them once the
        step that writes their KV has completed.
        """
        blocks = self.req_blocks.setdefault(request_id, [])
        bs = self.block_size
        total = num_computed_tokens + len(new_computed_blocks) * bs + num_new_tokens
        need = -(-total // bs) - len(blocks) - len(new_computed_blocks)
        reviving = sum(1 for b in new_computed_blocks if self.blocks[b].ref_cnt == 0)
        if need + reviving > len(self.free_queue):
            if not blocks:
                del self.req_blocks[request_id]
            return False
        for bid in new_computed_blocks:
            blk = self.blocks[bid]
            if blk.ref_cnt == 0:
                del self.free_queue[bid]
            blk.ref_cnt += 1
            blocks.append(bid)
        for _ in range(max(need, 0)):
            blocks.append(self._pop_free_block())
        return True

    def _pop_free_block(self) -> int:
        """Take the least recently freed block, evicting its cached hash; ref count 1."""
        bid, _ = self.free_queue.popitem(last=False)
        blk = self.blocks[bid]
        if blk.block_hash is not None:
            if self.cached.get(blk.block_hash) == bid:
                del self.cached[blk.block_hash]
                if self.events is not None:
                    self.events.removed(blk.block_hash)
            blk.reset_hash()
        blk.ref_cnt = 1
        return bid

    def cache_blocks(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """Make the request's full blocks among its first ``num_computed_tokens`` tokens
        hit-able for other requests. Call only after the step that wrote their KV has
        completed (the scheduler does, in ``update``). Idempotent; no-op with caching off.

        Args:
            request_id: the request.
            token_ids: all of its known tokens (prompt + output).
            num_computed_tokens: tokens whose KV is in the cache now.
        """
        if not self.enable_caching:
            return
        blocks = self.req_blocks.get(request_id)
        if not blocks:
            return
        num_full = min(num_computed_tokens, len(token_ids), len(blocks) * self.block_size) // self.block_size
        start = self.req_num_cached.get(request_id, 0)
        if num_full <= start:
            return
        hashes = self._block_hashes(request_id, token_ids, num_full)
        bs = self.block_size
        for i in range(start, num_full):
            blk = self.blocks[blocks[i]]
            if blk.block_hash is None and hashes[i] not in self.cached:
                blk.block_hash = hashes[i]
                blk.parent_hash = hashes[i - 1] if i else None
                blk.token_ids = tuple(token_ids[i * bs : (i + 1) * bs])
                self.cached[hashes[i]] = blk.block_id
                if self.events is not None:
                    self.events.stored(hashes[i])
        self.req_num_cached[request_id] = num_full

    def free(self, request_id: str) -> None:
        """Release the request's blocks (preemption or finish). Idempotent.

        Blocks are released tail first so that, among equally old blocks, a prefix's
        later blocks are evicted before its earlier ones; blocks without a hash go to
        the front of the free queue (reused first, nothing to lose).
        """
        blocks = self.req_blocks.pop(request_id, None)
        self.req_hashes.pop(request_id, None)
        self.req_num_cached.pop(request_id, None)
        if not blocks:
            return
        for bid in reversed(blocks):
            blk = self.blocks[bid]
            blk.ref_cnt -= 1
            if blk.ref_cnt < 0:  # pragma: no cover - guarded by the property tests
                raise RuntimeError(f"double free of KV block {bid}")
            if blk.ref_cnt == 0:
                self.free_queue[bid] = None
                if blk.block_hash is None:
                    self.free_queue.move_to_end(bid, last=False)

    def fork(self, parent_id: str, child_id: str, num_tokens: int) -> Optional[tuple[int, int]]:
        """Give ``child_id`` the parent's first ``num_tokens`` tokens of KV.

        Full blocks are shared (ref count + 1); a partially filled last block is
        copy-on-write: the child gets a fresh block and the caller must copy the
        returned ``(src_block, dst_block)`` pair's data.

        Returns:
            The copy pair, or None when no copy is needed.
        Raises:
            ValueError: child already holds blocks; MemoryError: no free block for the copy.
        """
        if self.req_blocks.get(child_id):
            raise ValueError(f"request {child_id} already holds KV blocks")
        parent = self.req_blocks.get(parent_id, [])
        n_full, partial = divmod(num_tokens, self.block_size)
        if n_full + (1 if partial else 0) > len(parent):
            raise ValueError(f"parent {parent_id} holds fewer than {num_tokens} tokens")
        if partial and not self.free_queue:
            raise MemoryError("no free KV block for copy-on-write")
        child = list(parent[:n_full])
        for bid in child:
            self.blocks[bid].ref_cnt += 1
        copy = None
        if partial:
            bid = self._pop_free_block()
            child.append(bid)
            copy = (parent[n_full], bid)
        self.req_blocks[child_id] = child
        if parent_id in self.req_hashes:
            self.req_hashes[child_id] = list(self.req_hashes[parent_id][:n_full])
            self.req_num_cached[child_id] = min(self.req_num_cached.get(parent_id, 0), n_full)
        return copy

    def reset_prefix_cache(self) -> bool:
        """Drop every cached hash of free blocks. Returns False if blocks are still in use."""
        if len(self.free_queue) != self.num_blocks:
            return False
        for blk in self.blocks:
            blk.reset_hash()
        self.cached.clear()
        if self.events is not None:
            self.events.cleared()
        return True

    def check_invariants(self) -> None:
        """Assert internal consistency (tests): ref counts match holders, the free queue
        holds exactly the unreferenced blocks, and the hash map points at hashed blocks.

        Raises:
            AssertionError: naming the broken invariant.
        """
        refs = [0] * self.num_blocks
        for rid, blocks in self.req_blocks.items():
            assert len(set(blocks)) == len(blocks), f"{rid} holds a block twice"
            for b in blocks:
                refs[b] += 1
        for blk in self.blocks:
            assert blk.ref_cnt == refs[blk.block_id], f"block {blk.block_id}: ref_cnt {blk.ref_cnt} != holders {refs[blk.block_id]}"
            assert (blk.ref_cnt == 0) == (blk.block_id in self.free_queue), f"block {blk.block_id} free-queue mismatch"
        for h, bid in self.cached.items():
            assert self.blocks[bid].block_hash == h, f"hash map entry for block {bid} is stale"
        if self.events is not None:
            assert self.events._held == set(self.cached), "the KV event log disagrees with the hash map"
