"""Per-tenant usage: what a multi-tenant operator bills and a tenant checks (`GET /usage`).

Prometheus metrics carry no tenant labels (ids are private, and thousands of tenants would blow up the series), so
per-tenant counts live here. Every engine request counts its prompt (the part taken from the prompt cache also as
`cached_tokens`) and the tokens it generated, also when the client left before the end; a request the engine
failed counts no tokens, one the client left before its first token counts as an aborted completion of none. The
samples of one prompt (`n`, `best_of`, beams) count it once, as the response's usage does (Prometheus'
`prompt_tokens_total` counts it per sample, as vLLM's does).

`UsageMeter` counts in the server process from its start (`since`), like the Prometheus counters. With
``limits_url`` the counts go to Redis instead (`RedisUsageMeter`): every replica adds to the same counters, which
outlive restarts; they are flushed in batches every second, kept and retried while Redis does not answer (a batch
whose reply was lost is sent again as it was, and Redis applies each batch once), and flushed before a report.
Counting runs on the event loop only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter
from typing import Any

log = logging.getLogger("prefixserve.usage")

BASE = "base"  # the prefix name of requests without a prefix
COUNT_FIELDS = (
    "requests",  # generation requests admitted (one per HTTP request, whatever its `n`)
    "completions",  # engine requests that ended: finished, aborted by the client, or failed
    "aborted",
    "failed",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
)
TENANT_FIELDS = ("rejected", "training_jobs")  # refused by a rate or concurrency limit (429); jobs submitted


def _both(prefix: str | None, **counts: int) -> dict[str, int]:
    """The tenant's counters and the same of its prefix (`p:{prefix}:{field}`; names hold no ':')."""
    return {**counts, **{f"p:{prefix or BASE}:{k}": v for k, v in counts.items()}}


def tenant_report(tenant: str, flat: dict[str, int]) -> dict[str, Any]:
    """`GET /usage`'s entry of a tenant from its flat counters."""

    def counts(get: Any) -> dict[str, int]:
        d = {k: int(get(k)) for k in COUNT_FIELDS}
        d["total_tokens"] = d["prompt_tokens"] + d["completion_tokens"]
        return d

    prefixes = sorted({k.split(":")[1] for k in flat if k.startswith("p:")})
    return {
        "tenant_id": tenant,
        **counts(lambda k: flat.get(k, 0)),
        **{k: int(flat.get(k, 0)) for k in TENANT_FIELDS},
        "prefixes": {p: counts(lambda k, p=p: flat.get(f"p:{p}:{k}", 0)) for p in prefixes},
    }


class UsageMeter:
    def __init__(self) -> None:
        self._since = time.time()
        self._counts: dict[str, Counter[str]] = {}

    # ------------------------------------------------------------------ counting
    def _add(self, tenant: str, counts: dict[str, int]) -> None:
        c = self._counts.get(tenant)
        if c is None:
            c = self._counts[tenant] = Counter()
        c.update({k: v for k, v in counts.items() if v})

    def request(self, tenant: str, prefix: str | None) -> None:
        self._add(tenant, _both(prefix, requests=1))

    def completion(
        self, tenant: str, prefix: str | None, outcome: str, prompt: int, cached: int, completion: int
    ) -> None:
        """One engine request ended: `outcome` is its finish reason (stop, length, abort, error)."""
        self._add(
            tenant,
            _both(
                prefix,
                completions=1,
                aborted=int(outcome == "abort"),
                failed=int(outcome == "error"),
                prompt_tokens=prompt,
                cached_tokens=cached,
                completion_tokens=completion,
            ),
        )

    def prompt(self, tenant: str, prefix: str | None, prompt: int, cached: int) -> None:
        """The prompt of several samples (OpenAI `n`, `best_of`, beams), billed once for all of them."""
        self._add(tenant, _both(prefix, prompt_tokens=prompt, cached_tokens=cached))

    def rejected(self, tenant: str) -> None:
        self._add(tenant, {"rejected": 1})

    def training_job(self, tenant: str) -> None:
        self._add(tenant, {"training_jobs": 1})

    # ------------------------------------------------------------------ reading
    async def since(self) -> float:
        return self._since

    async def tenants(self) -> list[str]:
        return sorted(self._counts)

    async def report(self, tenant: str) -> dict[str, Any]:
        return tenant_report(tenant, dict(self._counts.get(tenant, {})))

    def start(self) -> None:
        pass

    async def close(self) -> None:
        pass


FLUSH_S = 1.0
# how long Redis remembers a flushed batch's id (a batch is resent within seconds of a reply lost)
BATCH_TTL_S = 3600

# One flush, applied at most once whatever number of times it is sent (its reply may be lost: a timeout while Redis
# stalls, after which Redis still runs it). KEYS: the batch's marker, `since`, the tenants set, then each tenant's
# hash; ARGV: since, the marker's TTL, then per tenant (in KEYS' order) its id, its number of fields, field, n, ...
# Returns {1, refused, first refusal} or {0} for a batch applied before. A refused count (a key of the wrong type)
# does not stop the others, as in a MULTI/EXEC; a write refused as a whole (read-only replica, out of memory) fails
# the marker first, so nothing is applied.
_FLUSH_LUA = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[2]) then
  return {0}
end
local refused, first = 0, ''
local function apply(reply)
  if type(reply) == 'table' and reply.err then
    if refused == 0 then first = reply.err end
    refused = refused + 1
  end
end
apply(redis.pcall('SETNX', KEYS[2], ARGV[1]))
local a = 3
for i = 4, #KEYS do
  apply(redis.pcall('SADD', KEYS[3], ARGV[a]))
  local n = tonumber(ARGV[a + 1])
  for j = 0, n - 1 do
    apply(redis.pcall('HINCRBY', KEYS[i], ARGV[a + 2 + 2 * j], ARGV[a + 3 + 2 * j]))
  end
  a = a + 2 + 2 * n
end
return {1, refused, first}
"""


class RedisUsageMeter(UsageMeter):
    """Counters in Redis (hash `{ns}:usage:tenant:{tenant}`, set `{ns}:usage:tenants`, `{ns}:usage:since`), shared
    by every replica that points at it; this process only holds what it has not flushed yet. A tenant's hash is one
    level below the bookkeeping keys (tenant ids have no ':'), so no tenant id, `tenants` or `since` included, can
    name one of them."""

    def __init__(self, url: str, timeout_s: float = 1.0) -> None:
        import redis
        import redis.asyncio as aioredis

        from prefix_store.redis_store import reconnect_once, split_url

        super().__init__()
        client_url, self.namespace = split_url(url)
        self._r = aioredis.Redis.from_url(
            client_url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=reconnect_once(for_asyncio=True),
        )
        self._script = self._r.register_script(_FLUSH_LUA)
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self._refused: type[Exception] = redis.ResponseError
        # a batch sent whose outcome is not known (no reply): sent again, as it is, before anything counted since
        self._unconfirmed: tuple[str, dict[str, Counter[str]]] | None = None

    def _key(self, *parts: str) -> str:
        return ":".join((self.namespace, "usage", *parts))

    def _tenant_key(self, tenant: str) -> str:
        return self._key("tenant", tenant)

    def start(self) -> None:
        """Flush every second (call on the event loop)."""
        if self._task is None:
            self._task = asyncio.ensure_future(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            with contextlib.suppress(Exception):
                await self.flush()

    async def flush(self) -> None:
        """Send the pending counts (a batch: one script, applied at most once, `_FLUSH_LUA`); on failure they stay
        pending, to be sent again as they are, and the error is raised. A batch left unconfirmed by an earlier
        flush goes first, then what was counted since."""
        resent = self._unconfirmed is not None
        await self._send()
        if resent:
            await self._send()

    async def _send(self) -> None:
        if self._unconfirmed is None:
            if not self._counts:
                return
            self._unconfirmed, self._counts = (uuid.uuid4().hex, self._counts), {}
        batch, pending = self._unconfirmed
        tenants = list(pending)
        args: list[Any] = [repr(self._since), BATCH_TTL_S]
        for tenant in tenants:
            counts = pending[tenant]
            args += [tenant, len(counts), *(x for kv in counts.items() for x in kv)]
        keys = [self._key("batch", batch), self._key("since"), self._key("tenants")]
        try:
            res = await self._script(keys=keys + [self._tenant_key(t) for t in tenants], args=args)
        except Exception as e:
            # no answer (it may still have run: sent again, it is not applied twice), or refused as a whole
            if not self._failing:
                log.warning("usage: redis unavailable (%s); counts are kept here until it answers", e)
            self._failing = True
            raise
        if (
            self._unconfirmed is not None and self._unconfirmed[0] == batch
        ):  # (a flush beside may have moved on)
            self._unconfirmed = None
        if self._failing:
            log.info("usage: redis answers again; pending counts flushed")
        self._failing = False
        if int(res[0]) and int(res[1]):
            # part of it refused (a key of the wrong type): what was applied stays applied, the rest is dropped
            first = res[2].decode() if isinstance(res[2], bytes) else str(res[2])
            log.error("usage: redis refused %d of the counts (%s); they are dropped", int(res[1]), first)
            raise self._refused(first)

    async def since(self) -> float:
        await self.flush()
        v = await self._r.get(self._key("since"))
        return float(v) if v is not None else self._since

    async def tenants(self) -> list[str]:
        await self.flush()
        return sorted(
            t.decode() if isinstance(t, bytes) else t for t in await self._r.smembers(self._key("tenants"))
        )

    async def report(self, tenant: str) -> dict[str, Any]:
        await self.flush()
        raw = await self._r.hgetall(self._tenant_key(tenant))
        return tenant_report(
            tenant, {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()}
        )

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        with contextlib.suppress(Exception):
            await self.flush()  # the last counts of a stopping server
        if self._counts or self._unconfirmed is not None:
            lost = set(self._counts) | set(self._unconfirmed[1] if self._unconfirmed else ())
            log.warning("usage: %d tenants' last counts could not reach redis", len(lost))
        await self._r.aclose()
