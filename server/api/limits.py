"""Per-tenant rate limits: requests and tokens per minute (OpenAI's RPM / TPM), as token buckets.

A generation request is charged one request when it is admitted, and each engine request it makes (OpenAI `n`,
prompt lists) ``prompt + max_tokens`` tokens; what a request did not use is refunded when it ends, so the token
budget follows what tenants really consumed. A bucket holds one minute of budget and refills continuously, so a
tenant may burst up to its per-minute limit and then proceeds at the limit's pace. Over the limit: 429 with a
Retry-After of when the request would fit; a single request larger than the whole per-minute token budget can
never fit: 413.

Limits come from the settings (every tenant) and an optional JSON file of per-tenant overrides (keys are tenant
ids, ``"*"`` sets every tenant's default; null lifts a limit). ``priority`` is a tenant's scheduling tier, added to
each of its requests' own priority (lower runs first):

    {"*": {"requests_per_minute": 600}, "acme": {"tokens_per_minute": 200000, "max_concurrent": 16, "priority": -1}}

Everything here runs on the event loop (no locks). Counts are per server process, like the Prometheus counters.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from server.api.errors import APIError

FIELDS = ("requests_per_minute", "tokens_per_minute", "max_concurrent", "priority")
MAX_PRIORITY = 1_000_000


@dataclass(frozen=True)
class TenantLimit:
    requests_per_minute: int | None = None  # None: unlimited
    tokens_per_minute: int | None = None
    max_concurrent: int | None = None  # generation requests in flight (None: the server's default)
    priority: int = 0  # added to every request's own priority (lower runs first): a tenant's tier

    def merged(self, other: dict[str, Any]) -> TenantLimit:
        return replace(self, **other)


def parse_limits(data: Any, where: str) -> dict[str, dict[str, int | None]]:
    """`{tenant or "*": {field: positive int or null; priority: any int}}` (raises ValueError naming the entry)."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object of tenant id -> limits")
    out: dict[str, dict[str, int | None]] = {}
    for tenant, entry in data.items():
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: limits of {tenant!r} must be an object")
        unknown = sorted(set(entry) - set(FIELDS))
        if unknown:
            raise ValueError(
                f"{where}: {tenant!r} has unknown field(s) {unknown} (known: {', '.join(FIELDS)})"
            )
        for k, v in entry.items():
            if k == "priority":
                if isinstance(v, bool) or not isinstance(v, int) or abs(v) > MAX_PRIORITY:
                    raise ValueError(
                        f"{where}: {tenant!r}.priority must be an integer in ±{MAX_PRIORITY}, got {v!r}"
                    )
            elif v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{where}: {tenant!r}.{k} must be a positive integer or null, got {v!r}")
        out[str(tenant)] = dict(entry)
    return out


def load_limits_file(path: str | Path | None) -> dict[str, dict[str, int | None]]:
    if path is None:
        return {}
    p = Path(path).expanduser()
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"tenant limits file {p}: {e}") from None
    return parse_limits(data, f"tenant limits file {p}")


class Bucket:
    """`capacity` units, refilled at `capacity` per minute."""

    def __init__(self, capacity: int, now: float) -> None:
        self.capacity = capacity
        self.level = float(capacity)
        self.rate = capacity / 60.0
        self.t = now

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.t) * self.rate)
        self.t = now

    def take(self, cost: int, now: float) -> float:
        """Take `cost` if there is that much; else the seconds until there would be (nothing taken)."""
        self._refill(now)
        if self.level >= cost:
            self.level -= cost
            return 0.0
        return (cost - self.level) / self.rate

    def give(self, amount: int, now: float) -> None:
        self._refill(now)
        self.level = min(self.capacity, self.level + amount)

    def remaining(self, now: float) -> int:
        self._refill(now)
        return int(self.level)

    def reset_s(self, now: float) -> float:
        """Seconds until full again."""
        self._refill(now)
        return (self.capacity - self.level) / self.rate


def _duration(seconds: float) -> str:
    """OpenAI's x-ratelimit-reset-* format: '1s', '6m0s', '0.5s'."""
    if seconds < 60:
        return f"{math.ceil(seconds * 10) / 10:g}s"
    m, s = divmod(math.ceil(seconds), 60)
    return f"{m}m{s}s"


class RateLimiter:
    def __init__(
        self,
        default: TenantLimit,
        overrides: dict[str, dict[str, int | None]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        overrides = dict(overrides or {})
        self.default = default.merged(overrides.pop("*", {}))
        self.overrides = {t: self.default.merged(o) for t, o in overrides.items()}
        self.clock = clock
        self._requests: dict[str, Bucket] = {}
        self._tokens: dict[str, Bucket] = {}

    def limit(self, tenant: str) -> TenantLimit:
        return self.overrides.get(tenant, self.default)

    @property
    def active(self) -> bool:
        """Whether any tenant has a rate limit at all."""
        return any(
            lim.requests_per_minute or lim.tokens_per_minute
            for lim in (self.default, *self.overrides.values())
        )

    def _bucket(
        self, table: dict[str, Bucket], tenant: str, capacity: int | None, now: float
    ) -> Bucket | None:
        if capacity is None:
            return None
        b = table.get(tenant)
        if b is None or b.capacity != capacity:
            b = table[tenant] = Bucket(capacity, now)
        return b

    def charge_request(self, tenant: str) -> None:
        now = self.clock()
        lim = self.limit(tenant)
        b = self._bucket(self._requests, tenant, lim.requests_per_minute, now)
        if b is not None:
            wait = b.take(1, now)
            if wait:
                raise _limited(
                    f"tenant is over its limit of {lim.requests_per_minute} requests per minute", wait
                )

    def charge_tokens(self, tenant: str, tokens: int) -> None:
        now = self.clock()
        lim = self.limit(tenant)
        b = self._bucket(self._tokens, tenant, lim.tokens_per_minute, now)
        if b is None:
            return
        if tokens > b.capacity:
            raise APIError(
                413,
                f"request needs {tokens} tokens (prompt + max_tokens), more than the tenant's limit of "
                f"{b.capacity} tokens per minute; lower max_tokens",
                code="tokens_per_minute_exceeded",
                param="max_tokens",
            )
        wait = b.take(tokens, now)
        if wait:
            raise _limited(
                f"tenant is over its limit of {b.capacity} tokens per minute (this request needs {tokens})",
                wait,
            )

    def refund_tokens(self, tenant: str, tokens: int) -> None:
        b = self._tokens.get(tenant)
        if b is not None and tokens > 0:
            b.give(tokens, self.clock())

    def state(self, tenant: str) -> dict[str, Any]:
        """The tenant's limits and what is left of them now (None where unlimited)."""
        now = self.clock()
        lim = self.limit(tenant)
        out: dict[str, Any] = {f.name: getattr(lim, f.name) for f in fields(lim)}
        for kind, table, cap in (
            ("requests", self._requests, lim.requests_per_minute),
            ("tokens", self._tokens, lim.tokens_per_minute),
        ):
            b = self._bucket(table, tenant, cap, now)
            out[f"remaining_{kind}"] = None if b is None else b.remaining(now)
        return out

    def headers(self, tenant: str) -> dict[str, str]:
        """OpenAI's x-ratelimit-* response headers for the limits this tenant has."""
        now = self.clock()
        lim = self.limit(tenant)
        out: dict[str, str] = {}
        for kind, table, cap in (
            ("requests", self._requests, lim.requests_per_minute),
            ("tokens", self._tokens, lim.tokens_per_minute),
        ):
            b = self._bucket(table, tenant, cap, now)
            if b is not None:
                out[f"x-ratelimit-limit-{kind}"] = str(b.capacity)
                out[f"x-ratelimit-remaining-{kind}"] = str(b.remaining(now))
                out[f"x-ratelimit-reset-{kind}"] = _duration(b.reset_s(now))
        return out


def _limited(message: str, wait_s: float) -> APIError:
    return APIError(
        429, message, code="rate_limit_exceeded", headers={"Retry-After": str(max(1, math.ceil(wait_s)))}
    )
