"""The periodic engine line an operator reads in the log (vLLM's "Avg prompt throughput ... Running: N reqs"):
throughput, queue and cache use over the last interval, written while there is work and once when it ends."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("prefixserve.stats")


@dataclass(frozen=True)
class Sample:
    """Counters and gauges read at one moment (counters only grow)."""

    t: float
    prompt_tokens: int  # prompt tokens computed by the engine's steps so far
    generation_tokens: int  # tokens they generated so far
    running: int
    waiting: int
    kv_usage: float
    prefix_hits: int
    prefix_misses: int
    prefix_evictions: int
    prompt_query_tokens: int
    prompt_hit_tokens: int
    preemptions: int


def sample(svc: Any) -> Sample:
    """What the service's metrics and engine say now (plain reads: no store call, no lock)."""
    snap = svc.snapshot(jobs=False)
    return Sample(
        t=time.monotonic(),
        # what the engine's steps processed in the interval (as vLLM's line), not the request-level counters
        # that count a request's tokens when it ends (a long request would read 0 tokens/s, then a spike)
        prompt_tokens=snap["prompt_tokens_computed"],
        generation_tokens=snap["generation_tokens_computed"],
        running=snap["running"],
        waiting=snap["waiting"],
        kv_usage=snap["kv_cache_usage"],
        prefix_hits=snap["prefix_cache_hits"],
        prefix_misses=snap["prefix_cache_misses"],
        prefix_evictions=snap["prefix_cache_evictions"],
        prompt_query_tokens=snap["prompt_cache_query_tokens"],
        prompt_hit_tokens=snap["prompt_cache_hit_tokens"],
        preemptions=snap["num_preemptions"],
    )


def _rate(hits: int, lookups: int) -> float | None:
    return None if lookups <= 0 else round(100.0 * hits / lookups, 1)


def stats_line(prev: Sample, cur: Sample) -> tuple[str, dict[str, Any]] | None:
    """The line for the interval from `prev` to `cur` (message, fields); None when nothing ran in it and nothing
    runs or waits now (an idle server writes nothing)."""
    prompt = cur.prompt_tokens - prev.prompt_tokens
    gen = cur.generation_tokens - prev.generation_tokens
    if not (prompt or gen or cur.running or cur.waiting or prev.running or prev.waiting):
        return None
    dt = max(cur.t - prev.t, 1e-9)
    lookups = (cur.prefix_hits - prev.prefix_hits) + (cur.prefix_misses - prev.prefix_misses)
    fields: dict[str, Any] = {
        "event": "engine_stats",
        "interval_s": round(dt, 3),
        "prompt_tokens_per_s": round(prompt / dt, 1),
        "generation_tokens_per_s": round(gen / dt, 1),
        "running": cur.running,
        "waiting": cur.waiting,
        "kv_cache_usage_perc": round(100.0 * cur.kv_usage, 1),
        "prefix_cache_hit_rate_perc": _rate(cur.prefix_hits - prev.prefix_hits, lookups),
        "prefix_cache_evictions": cur.prefix_evictions - prev.prefix_evictions,
        "prompt_cache_hit_rate_perc": _rate(
            cur.prompt_hit_tokens - prev.prompt_hit_tokens, cur.prompt_query_tokens - prev.prompt_query_tokens
        ),
        "preemptions": cur.preemptions - prev.preemptions,
    }

    def perc(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}%"

    msg = (
        f"Avg prompt throughput: {fields['prompt_tokens_per_s']:.1f} tokens/s, "
        f"Avg generation throughput: {fields['generation_tokens_per_s']:.1f} tokens/s, "
        f"Running: {cur.running} reqs, Waiting: {cur.waiting} reqs, "
        f"KV cache usage: {fields['kv_cache_usage_perc']:.1f}%, "
        f"Prefix cache hit rate: {perc(fields['prefix_cache_hit_rate_perc'])} "
        f"({fields['prefix_cache_evictions']} evicted), "
        f"Prompt cache hit rate: {perc(fields['prompt_cache_hit_rate_perc'])}, "
        f"Preemptions: {fields['preemptions']}"
    )
    return msg, fields


async def log_stats(svc: Any, interval_s: float) -> None:
    """Write `stats_line` every `interval_s` seconds until cancelled."""
    prev = sample(svc)
    while True:
        await asyncio.sleep(interval_s)
        try:
            cur = sample(svc)
        except Exception as e:  # (a stats line is never worth stopping for)
            log.debug("engine stats not read: %s", e)
            continue
        said = stats_line(prev, cur)
        if said is not None:
            # (its message already says every figure: a text log does not repeat them as key=value pairs)
            log.info("%s", said[0], extra={"fields": said[1], "message_says_fields": True})
        prev = cur
