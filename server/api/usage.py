"""Per-tenant usage since the server started: what a multi-tenant operator bills and a tenant checks.

Prometheus metrics carry no tenant labels (ids are private, and thousands of tenants would blow up the series), so
per-tenant counts live here and are served as JSON by `GET /usage` (a tenant sees its own; the admin key every
tenant). Like Prometheus counters they are per process and start at zero with it (`since`); sum them over
replicas. Every engine request counts its prompt (the part taken from the prompt cache also as `cached_tokens`)
and the tokens it generated, also when the client left before the end; a request the engine failed counts no
tokens. Runs on the event loop only.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

BASE = "base"  # the prefix name of requests without a prefix


@dataclass
class Counts:
    requests: int = 0  # generation requests admitted (one per HTTP request, whatever its `n`)
    completions: int = 0  # engine requests that ended: finished, aborted by the client, or failed
    aborted: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0

    def to_dict(self) -> dict[str, int]:
        d = asdict(self)
        d["total_tokens"] = self.prompt_tokens + self.completion_tokens
        return d


@dataclass
class TenantUsage:
    counts: Counts = field(default_factory=Counts)
    rejected: int = 0  # refused by a rate or concurrency limit (429)
    training_jobs: int = 0  # training jobs submitted
    prefixes: dict[str, Counts] = field(default_factory=dict)

    def prefix(self, name: str | None) -> Counts:
        key = name or BASE
        c = self.prefixes.get(key)
        if c is None:
            c = self.prefixes[key] = Counts()
        return c


class UsageMeter:
    def __init__(self) -> None:
        self.since = time.time()
        self._tenants: dict[str, TenantUsage] = {}

    def _tenant(self, tenant: str) -> TenantUsage:
        u = self._tenants.get(tenant)
        if u is None:
            u = self._tenants[tenant] = TenantUsage()
        return u

    def request(self, tenant: str, prefix: str | None) -> None:
        u = self._tenant(tenant)
        for c in (u.counts, u.prefix(prefix)):
            c.requests += 1

    def completion(
        self, tenant: str, prefix: str | None, outcome: str, prompt: int, cached: int, completion: int
    ) -> None:
        """One engine request ended: `outcome` is its finish reason (stop, length, abort, error)."""
        u = self._tenant(tenant)
        for c in (u.counts, u.prefix(prefix)):
            c.completions += 1
            c.aborted += outcome == "abort"
            c.failed += outcome == "error"
            c.prompt_tokens += prompt
            c.cached_tokens += cached
            c.completion_tokens += completion

    def rejected(self, tenant: str) -> None:
        self._tenant(tenant).rejected += 1

    def training_job(self, tenant: str) -> None:
        self._tenant(tenant).training_jobs += 1

    def tenants(self) -> list[str]:
        return sorted(self._tenants)

    def report(self, tenant: str) -> dict[str, Any]:
        u = self._tenants.get(tenant) or TenantUsage()
        return {
            "tenant_id": tenant,
            **u.counts.to_dict(),
            "rejected": u.rejected,
            "training_jobs": u.training_jobs,
            "prefixes": {name: c.to_dict() for name, c in sorted(u.prefixes.items())},
        }
