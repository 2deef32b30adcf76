"""Per-tenant rate limits: requests and tokens per minute (OpenAI's RPM / TPM), as token buckets.

A generation request is charged one request when it is admitted, and for each prompt it holds ``prompt + n x
max_tokens`` tokens (OpenAI's count: `n` samples, `best_of`, beams share their prompt); what a request did not use is refunded when it ends, so the token
budget follows what tenants really consumed, and a request the server then refuses to start (the tenant's
concurrency limit, a full queue) is given back whole. A bucket holds one minute of budget and refills continuously, so a
tenant may burst up to its per-minute limit and then proceeds at the limit's pace. Over the limit: 429 with a
Retry-After of when the request would fit; a single request larger than the whole per-minute token budget can
never fit: 413.

Limits come from the settings (every tenant) and an optional JSON file of per-tenant overrides (keys are tenant
ids, ``"*"`` sets every tenant's default; null lifts a limit). ``priority`` is a tenant's scheduling tier, added to
each of its requests' own priority (lower runs first):

    {"*": {"requests_per_minute": 600}, "acme": {"tokens_per_minute": 200000, "max_concurrent": 16, "priority": -1}}

The buckets live in the server process (`RateLimiter`), or with ``limits_url`` in Redis (`RedisRateLimiter`), so
every replica of a deployment draws on the same budget; if Redis does not answer, each replica falls back to its own
buckets for a while and says so in its log (a limit is then per replica, never a reason to refuse work). Everything
here runs on the event loop.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from prefix_store.names import is_valid_name
from server.api.errors import APIError, field_name

log = logging.getLogger("prefixserve.limits")

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
        if tenant != "*" and not is_valid_name(tenant):  # it would apply to nobody, without a word
            raise ValueError(
                f"{where}: {tenant!r} is not a tenant id (letters, digits, '.', '_', '-') nor '*'"
            )
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


# a bucket refills its whole capacity in this long (its limit is per minute)
REFILL_S = 60.0


class Bucket:
    """`capacity` units, refilled at `capacity` per minute."""

    def __init__(self, capacity: int, now: float) -> None:
        self.capacity = capacity
        self.level = float(capacity)
        self.rate = capacity / REFILL_S
        self.t = now

    def refill(self, now: float) -> float:
        # a minute refills the whole capacity: exactly, not short by a rounding error (60 x (123 / 60) < 123)
        dt = now - self.t
        self.level = self.capacity if dt >= REFILL_S else min(self.capacity, self.level + dt * self.rate)
        self.t = now
        return self.level

    def wait(self, cost: int) -> float:
        """Seconds until `cost` would fit (0: it fits now); call after `refill`."""
        return 0.0 if self.level >= cost else (cost - self.level) / self.rate

    def add(self, amount: float) -> None:
        """Take (negative) or give back (positive), never above capacity."""
        self.level = min(self.capacity, self.level + amount)


@dataclass
class Levels:
    """A tenant's budgets after an operation: what is left (None: no such limit) and, if the operation was refused
    (nothing taken), how long until it would fit and which limit refused it."""

    requests: float | None
    tokens: float | None
    wait_s: float = 0.0
    short: str = ""  # "requests" | "tokens"


def _duration(seconds: float) -> str:
    """OpenAI's x-ratelimit-reset-* format: '1s', '6m0s', '0.5s'."""
    if seconds < 60:
        return f"{math.ceil(seconds * 10) / 10:g}s"
    m, s = divmod(math.ceil(seconds), 60)
    return f"{m}m{s}s"


# A bucket untouched this long has refilled to capacity whatever its level was (a level never goes below 0 and a
# bucket refills its capacity in a minute): it is what a tenant without a bucket gets, so it can be forgotten.
FORGET_AFTER_S = REFILL_S
# at most this many a call: a request never pays for thousands of tenants gone idle together, and the tables still
# shrink faster than a call can grow them (one bucket each)
FORGET_PER_CALL = 32


class RateLimiter:
    """Per-tenant budgets in this process."""

    def __init__(
        self,
        default: TenantLimit,
        overrides: dict[str, dict[str, int | None]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.reconfigure(default, overrides)
        self.clock = clock
        # least recently touched first: forgetting the idle buckets looks at the front only
        self._requests: OrderedDict[str, Bucket] = OrderedDict()
        self._tokens: OrderedDict[str, Bucket] = OrderedDict()

    def reconfigure(self, default: TenantLimit, overrides: dict[str, dict[str, int | None]] | None) -> None:
        """New limits (a reloaded limits file), effective from the next request; an in-process bucket whose
        capacity changed starts full at its new capacity (in Redis its level is capped at it), the others keep
        their levels."""
        overrides = dict(overrides or {})
        base = default.merged(overrides.pop("*", {}))
        # one assignment: the reloader runs this on a thread, and a request must never see the new overrides with
        # the old default (or the reverse)
        self._limits = ({t: base.merged(o) for t, o in overrides.items()}, base)

    def limit(self, tenant: str) -> TenantLimit:
        overrides, default = self._limits
        return overrides.get(tenant, default)

    # ------------------------------------------------------------------ the one operation, per backend
    def _bucket(
        self, table: OrderedDict[str, Bucket], tenant: str, capacity: int | None, now: float
    ) -> Bucket | None:
        if capacity is None:
            return None
        b = table.get(tenant)
        if b is None or b.capacity != capacity:
            b = table[tenant] = Bucket(capacity, now)
        table.move_to_end(tenant)
        b.refill(now)
        return b

    async def _apply(self, tenant: str, lim: TenantLimit, requests: int, tokens: int) -> Levels:
        """Take `requests` and `tokens` (negative: give back, never above capacity) if both fit, else nothing."""
        return self._apply_local(tenant, lim, requests, tokens)

    def _sweep(self, now: float) -> None:
        """Forget the buckets untouched for `FORGET_AFTER_S` (full by then): a tenant seen once held its buckets
        for ever (one per tenant id, growing without bound). The tables are in order of last touch, so this looks
        at the idle ones and the first busy one only, and at most `FORGET_PER_CALL` of them (a sweep of every
        bucket once a minute cost one request ~5 ms at 10,000 tenants here; this, under 0.1 ms)."""
        for table in (self._requests, self._tokens):
            for _ in range(min(FORGET_PER_CALL, len(table))):
                tenant, b = next(iter(table.items()))
                if now - b.t < FORGET_AFTER_S:
                    break
                del table[tenant]

    def _apply_local(self, tenant: str, lim: TenantLimit, requests: int, tokens: int) -> Levels:
        now = self.clock()
        self._sweep(now)
        rb = self._bucket(self._requests, tenant, lim.requests_per_minute, now)
        tb = self._bucket(self._tokens, tenant, lim.tokens_per_minute, now)
        wait_t = tb.wait(tokens) if tb is not None and tokens > 0 else 0.0
        wait_r = rb.wait(requests) if rb is not None and requests > 0 else 0.0
        if not (wait_t or wait_r):
            if rb is not None:
                rb.add(-requests)
            if tb is not None:
                tb.add(-tokens)
        return Levels(
            None if rb is None else rb.level,
            None if tb is None else tb.level,
            max(wait_t, wait_r),
            "tokens" if wait_t else "requests" if wait_r else "",
        )

    # ------------------------------------------------------------------ API
    async def charge(
        self,
        tenant: str,
        tokens: int,
        *,
        prompt_param: str = "prompt",
        max_tokens_param: str = "max_tokens",
    ) -> dict[str, str]:
        """Charge one request and `tokens` (prompt + n x max_tokens of each of its prompts), both or neither; returns the
        x-ratelimit-* headers. Raises APIError 413 (more tokens than the whole budget) or 429 + Retry-After.
        `prompt_param`, `max_tokens_param`: the request's own fields for the two (`RequestInfo`'s), which the 413
        names."""
        lim = self.limit(tenant)
        if lim.tokens_per_minute is not None and tokens > lim.tokens_per_minute:
            out = field_name(max_tokens_param)
            raise APIError(
                413,
                f"request needs {tokens} tokens ({field_name(prompt_param)} + {out}), more than the tenant's "
                f"limit of {lim.tokens_per_minute} tokens per minute; lower {out}",
                code="tokens_per_minute_exceeded",
                param=max_tokens_param,
            )
        lv = await self._apply(tenant, lim, 1, tokens)
        headers = self._headers(lim, lv)
        if lv.wait_s:
            what = (
                f"{lim.tokens_per_minute} tokens per minute (this request needs {tokens})"
                if lv.short == "tokens"
                else f"{lim.requests_per_minute} requests per minute"
            )
            headers["Retry-After"] = str(max(1, math.ceil(lv.wait_s)))
            raise APIError(
                429, f"tenant is over its limit of {what}", code="rate_limit_exceeded", headers=headers
            )
        return headers

    async def refund(self, tenant: str, tokens: int, requests: int = 0) -> dict[str, str]:
        """Give back tokens a request did not use, and `requests` the server refused to start after charging them
        (the tenant's concurrency limit, a full queue): a refusal costs the tenant nothing. Returns the
        x-ratelimit-* headers after the refund (none for a tenant without limits)."""
        lim = self.limit(tenant)
        tokens = tokens if lim.tokens_per_minute is not None else 0
        requests = requests if lim.requests_per_minute is not None else 0
        if tokens > 0 or requests > 0:
            return self._headers(lim, await self._apply(tenant, lim, -max(requests, 0), -max(tokens, 0)))
        if lim.tokens_per_minute is None and lim.requests_per_minute is None:
            return {}
        return self._headers(lim, await self._apply(tenant, lim, 0, 0))

    async def state(self, tenant: str) -> dict[str, Any]:
        """The tenant's limits and what is left of them now (None where unlimited)."""
        lim = self.limit(tenant)
        lv = await self._apply(tenant, lim, 0, 0)
        out: dict[str, Any] = {f.name: getattr(lim, f.name) for f in fields(lim)}
        out["remaining_requests"] = None if lv.requests is None else int(lv.requests)
        out["remaining_tokens"] = None if lv.tokens is None else int(lv.tokens)
        return out

    @staticmethod
    def _headers(lim: TenantLimit, lv: Levels) -> dict[str, str]:
        """OpenAI's x-ratelimit-* response headers for the limits this tenant has."""
        out: dict[str, str] = {}
        for kind, cap, level in (
            ("requests", lim.requests_per_minute, lv.requests),
            ("tokens", lim.tokens_per_minute, lv.tokens),
        ):
            if cap is not None and level is not None:
                out[f"x-ratelimit-limit-{kind}"] = str(cap)
                out[f"x-ratelimit-remaining-{kind}"] = str(int(level))
                out[f"x-ratelimit-reset-{kind}"] = _duration((cap - level) * 60.0 / cap)
        return out

    async def close(self) -> None:
        pass


# Both buckets of a tenant in one atomic step, on Redis' own clock (replicas' clocks may differ).
# KEYS: requests bucket, tokens bucket. ARGV: requests capacity, tokens capacity (0: no limit), requests, tokens.
# Returns {refused?, wait seconds, "requests" | "tokens" | "", requests level, tokens level} (levels "": no limit).
# A clock stepped back below a bucket's last write (NTP, a failover to a replica behind) refills nothing for that
# call, and the bucket counts on from the new time (a negative refill emptied it for as long as the step; a level
# left below zero by that, in a bucket written by an older build, counts as empty).
_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function level(key, cap)
  if cap <= 0 then return nil end
  local v = redis.call('HMGET', key, 'level', 'ts')
  local l, ts = tonumber(v[1]), tonumber(v[2])
  if l == nil then return cap end
  return math.min(cap, math.max(0, l) + math.max(0, now - ts) * cap / 60)
end
local rcap, tcap = tonumber(ARGV[1]), tonumber(ARGV[2])
local rcost, tcost = tonumber(ARGV[3]), tonumber(ARGV[4])
local r, k = level(KEYS[1], rcap), level(KEYS[2], tcap)
local wait_t, wait_r = 0, 0
if k ~= nil and tcost > 0 and k < tcost then wait_t = (tcost - k) * 60 / tcap end
if r ~= nil and rcost > 0 and r < rcost then wait_r = (rcost - r) * 60 / rcap end
local wait, short = math.max(wait_t, wait_r), ''
if wait_t > 0 then short = 'tokens' elseif wait_r > 0 then short = 'requests' end
if short == '' then
  if r ~= nil then r = math.min(rcap, r - rcost) end
  if k ~= nil then k = math.min(tcap, k - tcost) end
end
for i, pair in ipairs({{KEYS[1], r}, {KEYS[2], k}}) do
  if pair[2] ~= nil then
    redis.call('HSET', pair[1], 'level', tostring(pair[2]), 'ts', tostring(now))
    redis.call('EXPIRE', pair[1], 120)
  end
end
return {short ~= '' and 1 or 0, tostring(wait), short, r and tostring(r) or '', k and tostring(k) or ''}
"""

FALLBACK_S = 5.0  # after Redis failed, use the local buckets this long before asking it again


class RedisRateLimiter(RateLimiter):
    """The same budgets kept in Redis, shared by every server process that points at it (`limits_url`)."""

    def __init__(
        self,
        url: str,
        default: TenantLimit,
        overrides: dict[str, dict[str, int | None]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        timeout_s: float = 0.5,
    ) -> None:
        import redis.asyncio as aioredis

        from prefix_store.redis_store import reconnect_once, split_url

        super().__init__(default, overrides, clock)
        client_url, self.namespace = split_url(url)
        self._r = aioredis.Redis.from_url(
            client_url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=reconnect_once(for_asyncio=True),
        )
        self._script = self._r.register_script(_LUA)
        self._down_until = 0.0

    def _key(self, tenant: str, kind: str) -> str:
        return f"{self.namespace}:ratelimit:{tenant}:{kind}"

    async def _apply(self, tenant: str, lim: TenantLimit, requests: int, tokens: int) -> Levels:
        if lim.requests_per_minute is None and lim.tokens_per_minute is None:
            return Levels(None, None)
        if self.clock() < self._down_until:
            return self._apply_local(tenant, lim, requests, tokens)
        try:
            res = await self._script(
                keys=[self._key(tenant, "requests"), self._key(tenant, "tokens")],
                args=[lim.requests_per_minute or 0, lim.tokens_per_minute or 0, requests, tokens],
            )
        except Exception as e:  # Redis down or slow: never refuse work for it
            self._down_until = self.clock() + FALLBACK_S
            log.warning(
                "rate limits: redis unavailable (%s); this replica counts alone for %.0fs", e, FALLBACK_S
            )
            return self._apply_local(tenant, lim, requests, tokens)
        refused, wait, short, r, k = (x.decode() if isinstance(x, bytes) else x for x in res)
        return Levels(
            float(r) if r else None,
            float(k) if k else None,
            float(wait) if int(refused) else 0.0,
            short,
        )

    async def close(self) -> None:
        await self._r.aclose()
