"""Tenants: API keys, per-tenant limits and usage (pure, with an injectable clock).

``argosy router --tenants FILE`` reads a JSON file (in a cluster: a Secret mounted as a
file)::

    {"keys": {"sk-team-a-1": "team-a", "sk-team-b-1": "team-b"},
     "limits": {"team-a": {"requests_per_minute": 600, "tokens_per_minute": 200000,
                           "max_concurrent": 16},
                "default": {"requests_per_minute": 60}}}

Every request must then carry ``Authorization: Bearer KEY`` with a listed key (else 401).
A tenant's limits are its own entry, else ``default``, else none; each limit may be left
out. Windows are sliding 60-second windows. A request is refused with 429 and a
``Retry-After`` (seconds until the window has room) when the tenant already has
``max_concurrent`` requests in flight, ``requests_per_minute`` requests admitted in the
last minute, or ``tokens_per_minute`` tokens charged in the last minute. Tokens are
charged when a request ends, from the ``usage`` the engine reports: prompt tokens not
served from the prefix cache plus completion tokens (what a platform team bills).
"""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

WINDOW_S = 60.0


@dataclass(frozen=True)
class TenantLimits:
    """Limits of one tenant (None = unlimited)."""

    requests_per_minute: Optional[int] = None
    tokens_per_minute: Optional[int] = None
    max_concurrent: Optional[int] = None


@dataclass
class _State:
    admitted: deque = field(default_factory=deque)  # admission times (s)
    charged: deque = field(default_factory=deque)   # (time s, tokens)
    charged_sum: int = 0
    in_flight: int = 0


class Tenants:
    """Keys -> tenants, and each tenant's limits and live counters.

    Args:
        keys: API key -> tenant name.
        limits: tenant name (or ``default``) -> limits.
        clock: seconds, monotonic (tests inject one).
    """

    def __init__(self, keys: dict[str, str], limits: dict[str, TenantLimits],
                 clock: Callable[[], float] = time.monotonic):
        self.keys = dict(keys)
        self.limits = dict(limits)
        self.clock = clock
        self._state: dict[str, _State] = {}

    @classmethod
    def load(cls, path: str) -> "Tenants":
        """Read the JSON file described in the module doc.

        Raises:
            ValueError: not JSON, no ``keys``, a key mapped to a non-string, an unknown
                limit name or a negative limit (the message names it).
        """
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--tenants {path}: {e}") from None
        keys = doc.get("keys") if isinstance(doc, dict) else None
        if not isinstance(keys, dict) or not keys or not all(isinstance(v, str) and v for v in keys.values()):
            raise ValueError(f"--tenants {path}: needs \"keys\": {{API key: tenant name}}")
        limits = {}
        for tenant, lim in (doc.get("limits") or {}).items():
            unknown = set(lim) - set(TenantLimits.__dataclass_fields__)
            if unknown:
                raise ValueError(f"--tenants {path}: tenant {tenant!r}: unknown limit(s) {sorted(unknown)}")
            if any(not isinstance(v, int) or v < 0 for v in lim.values()):
                raise ValueError(f"--tenants {path}: tenant {tenant!r}: limits must be non-negative integers")
            limits[tenant] = TenantLimits(**lim)
        return cls(keys, limits)

    def tenant_for(self, authorization: Optional[str]) -> Optional[str]:
        """The tenant of an ``Authorization: Bearer KEY`` header, or None."""
        if not authorization:
            return None
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return None
        return self.keys.get(key.strip())

    def limits_of(self, tenant: str) -> TenantLimits:
        return self.limits.get(tenant) or self.limits.get("default") or TenantLimits()

    def _st(self, tenant: str, now: float) -> _State:
        st = self._state.setdefault(tenant, _State())
        while st.admitted and st.admitted[0] <= now - WINDOW_S:
            st.admitted.popleft()
        while st.charged and st.charged[0][0] <= now - WINDOW_S:
            st.charged_sum -= st.charged.popleft()[1]
        return st

    def admit(self, tenant: str) -> tuple[Optional[float], str]:
        """Admit a request (counts it in flight) or refuse it.

        Returns:
            ``(None, "")`` when admitted (call :meth:`release` when it ends), else
            ``(retry_after_seconds, which limit)``.
        """
        now = self.clock()
        st, lim = self._st(tenant, now), self.limits_of(tenant)
        if lim.max_concurrent is not None and st.in_flight >= lim.max_concurrent:
            return 1.0, f"max_concurrent ({lim.max_concurrent})"
        if lim.requests_per_minute is not None and len(st.admitted) >= lim.requests_per_minute:
            oldest = st.admitted[0] if st.admitted else now
            return max(1.0, oldest + WINDOW_S - now), f"requests_per_minute ({lim.requests_per_minute})"
        if lim.tokens_per_minute is not None and st.charged_sum >= lim.tokens_per_minute:
            # room once enough of the window's charges have aged out
            need, t = st.charged_sum - lim.tokens_per_minute + 1, now
            for at, tokens in st.charged:
                need -= tokens
                t = at
                if need <= 0:
                    break
            return max(1.0, t + WINDOW_S - now), f"tokens_per_minute ({lim.tokens_per_minute})"
        st.admitted.append(now)
        st.in_flight += 1
        return None, ""

    def charged(self, tenant: str) -> int:
        """Tokens charged to ``tenant`` in the last minute (its weight in the fair queue)."""
        return self._st(tenant, self.clock()).charged_sum

    def release(self, tenant: str, tokens: int) -> None:
        """An admitted request ended; charge its billable tokens."""
        now = self.clock()
        st = self._st(tenant, now)
        st.in_flight = max(0, st.in_flight - 1)
        if tokens > 0:
            st.charged.append((now, tokens))
            st.charged_sum += tokens


def billable(usage: Optional[dict]) -> tuple[int, int, int]:
    """``(prompt, cached, completion)`` tokens of an OpenAI ``usage`` object (zeros when
    absent); ``cached`` is ``prompt_tokens_details.cached_tokens``."""
    if not isinstance(usage, dict):
        return 0, 0, 0
    details = usage.get("prompt_tokens_details") or {}
    cached = int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0
    return int(usage.get("prompt_tokens") or 0), cached, int(usage.get("completion_tokens") or 0)
