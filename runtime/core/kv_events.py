"""What an engine's prefix cache holds, as a log a router can follow.

The KV cache manager reports every block hash it makes hit-able (*stored*) and every one
it drops (*removed*: eviction, or a reset of the prefix cache), as vLLM's KV cache events
do (``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared``). The server publishes the
log at ``GET /kv_events`` (:meth:`KVEventLog.read`); ``argosy router`` polls it and so
knows, per engine, which prompt prefixes are cached, hashed with the engine's own
function (:func:`~argosy.runtime.core.kv_cache_manager.get_hash_fn`).

Protocol: every event has a sequence number (1, 2, ...). A reader sends the last
``seq`` and ``instance_id`` it saw; it gets the events after that one, or, when it is new,
the engine restarted (another ``instance_id``) or the events it missed were dropped from
the bounded log, a *snapshot*: every hash held now. Applying snapshot then events in
order reproduces the engine's set exactly.

This module imports no torch (the router uses it to parse the log).
"""

from __future__ import annotations

import threading
import uuid
from collections import deque
from typing import Optional

#: Events kept for readers that are behind (one per block hash stored or removed).
DEFAULT_CAPACITY = 1 << 16


class KVEventLog:
    """Thread-safe log of stored / removed block hashes (the engine thread writes, the
    server's event loop reads).

    Args:
        block_size: tokens per KV block of the engine.
        hash_algo: its ``--prefix-caching-hash-algo``.
        capacity: events kept (older ones are dropped; readers behind them get a snapshot).
    """

    def __init__(self, block_size: int, hash_algo: str, capacity: int = DEFAULT_CAPACITY):
        self.block_size = block_size
        self.hash_algo = hash_algo
        self.instance_id = uuid.uuid4().hex
        self._lock = threading.Lock()
        self._held: set[bytes] = set()
        self._events: deque[tuple[int, bool, bytes]] = deque(maxlen=capacity)  # (seq, stored?, hash)
        self._seq = 0

    @property
    def seq(self) -> int:
        """Sequence number of the last event (0 before any)."""
        return self._seq

    def stored(self, block_hash: bytes) -> None:
        """A block with this hash became hit-able."""
        with self._lock:
            if block_hash not in self._held:
                self._held.add(block_hash)
                self._seq += 1
                self._events.append((self._seq, True, block_hash))

    def removed(self, block_hash: bytes) -> None:
        """The block with this hash is no longer hit-able."""
        with self._lock:
            if block_hash in self._held:
                self._held.discard(block_hash)
                self._seq += 1
                self._events.append((self._seq, False, block_hash))

    def cleared(self) -> None:
        """Every hash was dropped (prefix cache reset)."""
        with self._lock:
            for h in self._held:
                self._seq += 1
                self._events.append((self._seq, False, h))
            self._held.clear()

    def read(self, since: Optional[int] = None, instance_id: Optional[str] = None) -> dict:
        """The events after ``since``, or a snapshot (see the module doc).

        Returns:
            A JSON-able dict: ``instance_id``, ``block_size``, ``hash_algo``, ``seq`` (the
            last event's number), ``snapshot`` (bool), and either ``hashes`` (snapshot:
            every held hash, hex) or ``events`` (``[["stored" | "removed", hex], ...]`` in
            order).
        """
        head = {"instance_id": self.instance_id, "block_size": self.block_size, "hash_algo": self.hash_algo}
        with self._lock:
            first = self._events[0][0] if self._events else self._seq + 1
            fresh = since is None or instance_id != self.instance_id or since > self._seq or since < first - 1
            if fresh:
                return {**head, "seq": self._seq, "snapshot": True, "hashes": [h.hex() for h in self._held]}
            events = [("stored" if s else "removed", h.hex()) for n, s, h in self._events if n > since]
            return {**head, "seq": self._seq, "snapshot": False, "events": events}


class HeldBlocks:
    """A reader's copy of one engine's held hashes, kept in step with :meth:`KVEventLog.read`.

    Attributes:
        hashes: the block hashes (bytes) the engine holds, as of ``seq``.
        instance_id / seq: where to continue from.
        block_size / hash_algo: as the engine reports them.
    """

    def __init__(self):
        self.hashes: set[bytes] = set()
        self.instance_id: Optional[str] = None
        self.seq: Optional[int] = None
        self.block_size: Optional[int] = None
        self.hash_algo: Optional[str] = None

    def apply(self, msg: dict) -> None:
        """Apply one :meth:`KVEventLog.read` answer.

        Raises:
            KeyError / ValueError: a malformed answer (the copy is left as it was).
        """
        if msg["snapshot"]:
            hashes = {bytes.fromhex(h) for h in msg["hashes"]}
        else:
            if msg["instance_id"] != self.instance_id:
                raise ValueError("events from another engine instance without a snapshot")
            hashes = set(self.hashes)
            for kind, h in msg["events"]:
                (hashes.add if kind == "stored" else hashes.discard)(bytes.fromhex(h))
        self.hashes = hashes
        self.instance_id, self.seq = msg["instance_id"], int(msg["seq"])
        self.block_size, self.hash_algo = int(msg["block_size"]), str(msg["hash_algo"])

    def reset(self) -> None:
        """Forget everything (the engine went away)."""
        self.__init__()
