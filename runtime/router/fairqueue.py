"""Requests waiting for an upstream, served in a fair order.

A request waits when no upstream is ready (scale from zero) or every ready one has
``--max-inflight-per-upstream`` requests in flight. Whenever capacity may have appeared
(an upstream became ready, a request ended), every waiter is woken in order of its
tenant's weight (the tokens the tenant was charged in the last minute, see
:mod:`.tenants`; 0 without tenants) and then of arrival, so each retries in that order
and the lightest tenant's oldest request takes the first free slot: a tenant sending ten
times the load of another cannot push the other's requests behind its own queue. A waiter
that finds no slot waits again in its original place.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Callable, Optional


class FairWaitQueue:
    """Waiters keyed by ``(weight(tenant), arrival)``.

    Args:
        weight: tenant (None without tenants) -> weight; lower is served first.
    """

    def __init__(self, weight: Callable[[Optional[str]], float]):
        self.weight = weight
        self._waiters: list[tuple[Optional[str], int, asyncio.Future]] = []
        self._arrivals = itertools.count()

    def __len__(self) -> int:
        return len(self._waiters)

    def ticket(self) -> int:
        """An arrival number (keep it across re-waits to keep the place)."""
        return next(self._arrivals)

    async def wait(self, tenant: Optional[str], ticket: int, timeout: float) -> bool:
        """Wait until woken or ``timeout`` seconds pass; False on timeout."""
        fut = asyncio.get_running_loop().create_future()
        entry = (tenant, ticket, fut)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(fut, timeout)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            self._waiters.remove(entry)

    def wake_all(self) -> None:
        """Wake every waiter, lightest tenant first, then oldest first."""
        for _, _, fut in sorted(self._waiters, key=lambda e: (self.weight(e[0]), e[1])):
            if not fut.done():
                fut.set_result(None)
