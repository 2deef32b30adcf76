"""Training jobs in Redis: a Stream with a consumer group is the queue, each job a hash.

Keys (``<ns>``: the store URL's ``prefix`` namespace, default ``prefixserve``)::

    <ns>:jobs:queue            Stream; entries {"job_id"}; consumer group "trainers"
    <ns>:jobs:job:<job_id>     Hash: one field per JobRecord field (JSON values) + "examples" while the job is open,
                               + "queue_entry" (its stream entry's id, while queued: a cancel removes the entry)
    <ns>:jobs:index            ZSET job_id -> created (every job)
    <ns>:jobs:tenant:<tenant>  ZSET job_id -> created (a tenant's jobs)
    <ns>:jobs:active:<tenant>  SET of the tenant's queued or running jobs (the per-tenant limit)
    <ns>:jobs:served           HASH tenant -> when a job of it last started, by Redis' clock, and "@latest" -> the
                               latest of those (fair turns, `_defer`, `_SERVE`)
    <ns>:jobs:idem:<tenant>:<h>  the job_id submitted with Idempotency-Key k (h = sha256(k)); expires after
                               IDEMPOTENCY_TTL_S

Life of a job: ``submit`` checks the Idempotency-Key and the tenant's limit and creates the hash + stream entry
atomically (Lua). Workers ``XREADGROUP`` (blocking); claiming sets ``running`` only from ``queued`` (Lua). While it runs, a heartbeat thread
``XCLAIM``s the entry to itself every ``heartbeat_s`` (resetting its idle time) and stamps ``heartbeat``. A worker
that dies stops doing that; once the entry has been idle longer than ``stale_after_s`` another worker's
``XAUTOCLAIM`` takes it over and runs the job again, or, when it was already started ``max_attempts`` times, fails
it with the reason. Every transition checks that the job is still owned by the worker that asks (a worker that was
presumed dead cannot overwrite the outcome). Terminal jobs expire after ``retention_s``.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any, cast

import redis

from prefix_store.errors import StoreUnavailable
from server.training.records import (
    ACTIVE,
    IDEMPOTENCY_TTL_S,
    RETENTION_S,
    UNDECIDED,
    JobRecord,
    TooManyJobs,
    found_stored,
    idempotency_slot,
    stored_by_dead_worker,
    trimmable,
)

log = logging.getLogger("prefixserve.training.jobs")

GROUP = "trainers"
# XAUTOCLAIM calls one claim makes at most (each scans up to 10 pending entries): 10,000 jobs in flight
MAX_CLAIM_SCANS = 1000
FAIR_SCAN = 256  # queued entries a claim looks through for a tenant whose turn comes first
RECORD_FIELDS = [f.name for f in fields(JobRecord)]


class LostClaim(RuntimeError):
    """The job is no longer this worker's (reclaimed or failed by another worker)."""


# KEYS: active set, job hash, index, tenant zset, stream, idempotency key (unused when ARGV[4] is '').
# ARGV: max_active, job_id, created, job hash key prefix or '' (no Idempotency-Key), ttl, field, value, ...
# -> {1} created | {-1} over the limit | {0, job_id} the key's earlier job (nothing created)
_CREATE = """
if ARGV[4] ~= '' then
  local earlier = redis.call('GET', KEYS[6])
  if earlier and redis.call('EXISTS', ARGV[4] .. earlier) == 1 then return {0, earlier} end
end
if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[1]) then return {-1} end
redis.call('HSET', KEYS[2], unpack(ARGV, 6))
redis.call('SADD', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[2])
if ARGV[4] ~= '' then redis.call('SET', KEYS[6], ARGV[2], 'EX', ARGV[5]) end
redis.call('HSET', KEYS[2], 'queue_entry', redis.call('XADD', KEYS[5], '*', 'job_id', ARGV[2]))
return {1}
"""

# KEYS: job hash. ARGV: worker, now, max_attempts.
# -> {'claimed', attempts} | {'cancelled'} | {'exhausted', attempts, old worker} | {<status>} | {'missing'}
_CLAIM = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return {'missing'} end
st = cjson.decode(st)
if st ~= 'queued' and st ~= 'running' then return {'ended', st} end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
local cancel = redis.call('HGET', KEYS[1], 'cancel_requested')
if cancel == 'true' then return {'cancel_requested'} end
if st == 'running' and attempts >= tonumber(ARGV[3]) then
  return {'exhausted', attempts, redis.call('HGET', KEYS[1], 'worker')}
end
attempts = attempts + 1
redis.call('HSET', KEYS[1], 'status', '"running"', 'worker', cjson.encode(ARGV[1]), 'attempts', attempts,
           'started', ARGV[2], 'heartbeat', ARGV[2], 'progress', ARGV[4], 'error', 'null')
return {'claimed', attempts}
"""

# KEYS: job hash. ARGV: worker, now, progress json or ''. -> -1 lost, 0 ok, 1 cancel requested
_HEARTBEAT = """
local w = redis.call('HGET', KEYS[1], 'worker')
local st = redis.call('HGET', KEYS[1], 'status')
if (not w) or (not st) or w == 'null' or cjson.decode(w) ~= ARGV[1] or cjson.decode(st) ~= 'running' then
  return -1
end
redis.call('HSET', KEYS[1], 'heartbeat', ARGV[2])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'progress', ARGV[3]) end
if redis.call('HGET', KEYS[1], 'cancel_requested') == 'true' then return 1 end
return 0
"""

# KEYS: job hash, active set, stream. ARGV: owner ('' = any), job_id, entry id or '', ttl, field, value, ...
_FINISH = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 0 end
st = cjson.decode(st)
if ARGV[1] ~= '' then
  local w = redis.call('HGET', KEYS[1], 'worker')
  if (not w) or w == 'null' or cjson.decode(w) ~= ARGV[1] or st ~= 'running' then return 0 end
elseif st ~= 'queued' and st ~= 'running' then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('HDEL', KEYS[1], 'examples')
redis.call('SREM', KEYS[2], ARGV[2])
if ARGV[3] ~= '' then
  redis.call('XACK', KEYS[3], 'trainers', ARGV[3])
  redis.call('XDEL', KEYS[3], ARGV[3])
end
if tonumber(ARGV[4]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[4]) end
return 1
"""

# KEYS: job hash, stream. ARGV: worker, entry id, reason json, attempts delta applied (int)
_REQUEUE = """
local w = redis.call('HGET', KEYS[1], 'worker')
local st = redis.call('HGET', KEYS[1], 'status')
if (not w) or w == 'null' or cjson.decode(w) ~= ARGV[1] or cjson.decode(st) ~= 'running' then return 0 end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '1') - tonumber(ARGV[4])
if attempts < 0 then attempts = 0 end
redis.call('HSET', KEYS[1], 'status', '"queued"', 'worker', 'null', 'started', 'null', 'heartbeat', 'null',
           'attempts', attempts, 'error', ARGV[3],
           'progress', '{"epoch": 0, "loss": null, "step": 0, "total_steps": null}')
redis.call('XACK', KEYS[2], 'trainers', ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
local job_id = cjson.decode(redis.call('HGET', KEYS[1], 'job_id'))
redis.call('HSET', KEYS[1], 'queue_entry', redis.call('XADD', KEYS[2], '*', 'job_id', job_id))
return 1
"""

# KEYS: job hash, active set, stream. ARGV: job_id, now, ttl. -> previous status ('missing' if none)
# (a queued job's stream entry goes with it: with no worker reading the stream, they piled up)
_CANCEL = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'missing' end
st = cjson.decode(st)
if st == 'queued' then
  redis.call('HSET', KEYS[1], 'status', '"cancelled"', 'finished', ARGV[2], 'cancel_requested', 'true',
             'error', '"cancelled before it started"')
  redis.call('HDEL', KEYS[1], 'examples')
  local entry = redis.call('HGET', KEYS[1], 'queue_entry')
  if entry then redis.call('XDEL', KEYS[3], entry) end
  redis.call('SREM', KEYS[2], ARGV[1])
  if tonumber(ARGV[3]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
elseif st == 'running' then
  redis.call('HSET', KEYS[1], 'cancel_requested', 'true')
end
return st
"""

# KEYS: stream, job hash. ARGV: entry id, job_id. A queued job's entry moved to the stream's end (fair turns), its
# id kept in the job hash (`queue_entry`: a cancel removes it); a job no longer queued (cancelled meanwhile, gone)
# only loses its entry.
_MOVE_BACK = """
redis.call('XACK', KEYS[1], 'trainers', ARGV[1])
redis.call('XDEL', KEYS[1], ARGV[1])
local st = redis.call('HGET', KEYS[2], 'status')
if not st or cjson.decode(st) ~= 'queued' then return false end  -- (cancelled meanwhile: no entry left behind)
local entry = redis.call('XADD', KEYS[1], '*', 'job_id', ARGV[2])
redis.call('HSET', KEYS[2], 'queue_entry', entry)
return entry
"""

# KEYS: the served hash. ARGV: tenant. Its last start by Redis' clock (every worker's), or just after the latest
# stamp (field "@latest"; no tenant id holds a '@') if that is later: a clock stepped back (a failover to a replica
# behind) must not make the tenant served after the step look served least recently. Returns the stamp.
_SERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local latest = tonumber(redis.call('HGET', KEYS[1], '@latest') or '0')
if now <= latest then now = latest + 0.001 end
local s = string.format('%.6f', now)
redis.call('HSET', KEYS[1], ARGV[1], s, '@latest', s)
return s
"""

EMPTY_PROGRESS = json.dumps({"epoch": 0, "loss": None, "step": 0, "total_steps": None}, sort_keys=True)


@dataclass
class RedisClaim:
    record: JobRecord
    examples: list[dict[str, str]]
    worker_id: str
    entry_id: str


# an XRANGE reply: (entry id, fields) pairs
StreamRange = list[tuple[bytes | str, dict[bytes | str, bytes | str]]]


def _dec(v: bytes | str | None) -> Any:
    if v is None:
        return None
    return json.loads(v)


def _text(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


def _members(reply: Iterable[Any]) -> list[str]:
    """A ZRANGE's members (without scores; redis-py's type also covers WITHSCORES replies) as text."""
    return [_text(x) for x in reply]


class RedisJobBackend:
    kind = "redis"

    def __init__(self, url: str, namespace: str, *, max_attempts: int = 2, stale_after_s: float = 60.0,
                 retention_s: float = RETENTION_S, socket_timeout: float = 5.0) -> None:  # fmt: skip
        self.url = url
        self.ns = namespace
        self.max_attempts = max_attempts
        self.stale_after_s = stale_after_s
        self.retention_s = retention_s
        # set by the JobManager: the prefix version a job stored, if any (None: none; may raise: the store is down)
        self.stored_version: Callable[[JobRecord], Any] | None = None
        self._r = redis.Redis.from_url(
            url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout
        )
        self._stream = f"{namespace}:jobs:queue"
        self._index = f"{namespace}:jobs:index"
        self._served = f"{namespace}:jobs:served"
        self._create = self._r.register_script(_CREATE)
        self._claim = self._r.register_script(_CLAIM)
        self._heartbeat = self._r.register_script(_HEARTBEAT)
        self._finish = self._r.register_script(_FINISH)
        self._requeue = self._r.register_script(_REQUEUE)
        self._cancel = self._r.register_script(_CANCEL)
        self._serve = self._r.register_script(_SERVE)
        self._move_back = self._r.register_script(_MOVE_BACK)
        self._group_ready = False

    def __repr__(self) -> str:
        return f"RedisJobBackend(namespace={self.ns!r})"

    def _job(self, job_id: str) -> str:
        return f"{self.ns}:jobs:job:{job_id}"

    def _tenant(self, tenant_id: str) -> str:
        return f"{self.ns}:jobs:tenant:{tenant_id}"

    def _active(self, tenant_id: str) -> str:
        return f"{self.ns}:jobs:active:{tenant_id}"

    def _idempotency(self, tenant_id: str, key: str) -> str:
        return f"{self.ns}:jobs:idem:{tenant_id}:{idempotency_slot(key)}"

    @contextlib.contextmanager
    def _errors(self, what: str):
        try:
            yield
        except redis.RedisError as e:
            raise StoreUnavailable(f"job queue (redis): cannot {what}: {e}") from e

    def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            self._r.xgroup_create(self._stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._group_ready = True

    def _group_lost(self, e: redis.ResponseError) -> bool:
        """The stream (and its consumer group) went away (a Redis restart without persistence, a flush, a
        failover to an empty replica) and a later XADD made a bare one: create the group again."""
        if "NOGROUP" not in str(e):
            return False
        log.warning("job queue (redis): the consumer group of %s is gone; creating it again", self._stream)
        self._group_ready = False
        self._ensure_group()
        return True

    @staticmethod
    def _encode(rec: JobRecord) -> dict[str, str]:
        d = rec.to_dict()
        return {k: json.dumps(d[k], sort_keys=True, allow_nan=False) for k in RECORD_FIELDS}

    def _decode(self, h: dict[str, bytes | str | None]) -> JobRecord | None:
        if not h:
            return None
        d = {}
        for k, v in h.items():
            key = k.decode() if isinstance(k, bytes) else k
            if key in RECORD_FIELDS:
                d[key] = _dec(v)
        try:
            return JobRecord.from_dict(d)
        except TypeError as e:
            log.warning("unreadable job record: %s", e)
            return None

    def _read(self, job_id: str) -> JobRecord | None:
        vals = self._r.hmget(self._job(job_id), RECORD_FIELDS)
        if all(v is None for v in vals):
            return None
        return self._decode(dict(zip(RECORD_FIELDS, vals, strict=True)))

    # ------------------------------------------------------------------------------------------ API side
    def ping(self) -> None:
        with self._errors("ping"):
            self._r.ping()

    def find_submitted(self, tenant_id: str, key: str) -> JobRecord | None:
        """The job a submission with this Idempotency-Key created, while it is remembered."""
        with self._errors("read the job"):
            job_id = self._r.get(self._idempotency(tenant_id, key))
            rec = self._read(_text(job_id)) if job_id else None
        return rec if rec is not None and rec.tenant_id == tenant_id else None

    def create(self, rec: JobRecord, examples: list[dict[str, str]], max_active: int) -> JobRecord:
        """Queue ``rec`` and return it; or, when a job was already submitted with ``rec.idempotency_key``, return
        that job and create nothing."""
        key = rec.idempotency_key
        with self._errors("create the job"):
            self._ensure_group()
            enc = self._encode(rec)
            enc["examples"] = json.dumps(examples)
            flat: list[str] = []
            for k, v in enc.items():
                flat += [k, v]
            keys = [self._active(rec.tenant_id), self._job(rec.job_id), self._index, self._tenant(rec.tenant_id),
                    self._stream, self._idempotency(rec.tenant_id, key or "")]  # fmt: skip
            args: list[str | int | float]
            args = [max_active, rec.job_id, rec.created, "" if key is None else self._job(""),
                    max(1, int(IDEMPOTENCY_TTL_S)), *flat]  # fmt: skip
            out = self._create(keys=keys, args=args)
            if int(out[0]) == 0:
                earlier = self._read(out[1].decode())
                if earlier is not None:
                    return earlier
                raise StoreUnavailable("job queue (redis): the job of this Idempotency-Key vanished; retry")
        if int(out[0]) < 0:
            n = self._r.scard(self._active(rec.tenant_id))
            raise TooManyJobs(
                f"tenant {rec.tenant_id!r} already has {n} queued or running training jobs (max {max_active}); "
                "wait for one to finish or cancel one"
            )
        return rec

    def get(self, job_id: str) -> JobRecord | None:
        with self._errors("read the job"):
            return self._read(job_id)

    def list(self, tenant_id: str | None = None) -> list[JobRecord]:
        with self._errors("list jobs"):
            zkey = self._index if tenant_id is None else self._tenant(tenant_id)
            ids = _members(self._r.zrange(zkey, 0, -1))
            pipe = self._r.pipeline(transaction=False)
            for i in ids:
                pipe.hmget(self._job(i), RECORD_FIELDS)
            rows = pipe.execute()
            out, gone = [], []
            for i, vals in zip(ids, rows, strict=True):
                if all(v is None for v in vals):
                    gone.append(i)
                    continue
                rec = self._decode(dict(zip(RECORD_FIELDS, vals, strict=True)))
                if rec is not None:
                    out.append(rec)
            if gone:  # expired terminal jobs: drop them from the indexes
                self._r.zrem(zkey, *gone)
                if tenant_id is None:
                    self._r.zrem(self._index, *gone)
        out.sort(key=lambda r: (r.created, r.job_id))
        return out

    def trim(self, tenant_id: str, keep: int) -> int:
        """Delete the tenant's oldest finished jobs past its newest `keep` (once past `keep` by a tenth), sparing those
        `trimmable` spares (an Idempotency-Key still answers with them); returns how many. Unfinished ones stay,
        whatever their age."""
        zkey = self._tenant(tenant_id)
        with self._errors("delete old jobs"):
            pipe = self._r.pipeline(transaction=False)
            pipe.zcard(zkey)
            pipe.scard(self._active(tenant_id))
            total, active = pipe.execute()
            if total - active <= keep + keep // 10:
                return 0
            finished = [r for r in self.list(tenant_id) if r.status not in ACTIVE]  # (drops expired ones too)
            old = [r.job_id for r in trimmable(finished, keep, time.time())]
            if old:
                pipe = self._r.pipeline(transaction=False)
                pipe.delete(*(self._job(i) for i in old))
                pipe.zrem(zkey, *old)
                pipe.zrem(self._index, *old)
                pipe.execute()
            return len(old)

    def counts(self) -> dict[str, int]:
        """Jobs by status, for /metrics: one field of each job (its status), not the whole record decoded."""
        out: dict[str, int] = {}
        with self._errors("count jobs"):
            ids = _members(self._r.zrange(self._index, 0, -1))
            pipe = self._r.pipeline(transaction=False)
            for i in ids:
                pipe.hget(self._job(i), "status")
            for v in pipe.execute():
                if v is None:  # expired: list() drops it from the index
                    continue
                status = _dec(v)
                if isinstance(status, str):
                    out[status] = out.get(status, 0) + 1
        return out

    def cancel(self, job_id: str) -> JobRecord | None:
        with self._errors("cancel the job"):
            rec = self._read(job_id)
            if rec is None:
                return None
            self._cancel(
                keys=[self._job(job_id), self._active(rec.tenant_id), self._stream],
                args=[job_id, json.dumps(time.time()), int(self.retention_s)],
            )
            return self._read(job_id)

    # ------------------------------------------------------------------------------------------ worker side
    def claim(self, worker_id: str, block_ms: int = 1000) -> RedisClaim | None:
        """Take over a stale job (XAUTOCLAIM) or read a new one (XREADGROUP, blocking up to ``block_ms``)."""
        with self._errors("claim a job"):
            try:
                return self._claim_once(worker_id, block_ms)
            except redis.ResponseError as e:
                if self._group_lost(e):
                    return None  # the next poll reads from the new group (jobs queued since are in it)
                raise

    def _claim_once(self, worker_id: str, block_ms: int) -> RedisClaim | None:
        self._ensure_group()
        entries: list[tuple[bytes, dict]] = []
        # one at a time: XAUTOCLAIM hands every entry it returns to this worker and restarts its idle time, so the
        # other stale jobs would wait another stale period although other workers are idle. It scans at most
        # 10 x COUNT pending entries a call (running jobs stay pending, kept fresh by their heartbeats): follow its
        # cursor through the whole list
        cursor: Any = "0-0"
        for _ in range(MAX_CLAIM_SCANS):
            res = self._r.xautoclaim(
                self._stream, GROUP, worker_id, min_idle_time=int(self.stale_after_s * 1000), start_id=cursor,
                count=1,
            )  # fmt: skip
            entries.extend(e for e in res[1] if e and e[1] is not None)
            for entry_id in res[2] if len(res) > 2 else []:  # deleted entries still pending: drop them
                self._r.xack(self._stream, GROUP, entry_id)
            cursor = res[0]
            if entries or cursor in (b"0-0", "0-0"):
                break
        for _ in range(FAIR_SCAN if not entries else 0):
            got = self._r.xreadgroup(GROUP, worker_id, {self._stream: ">"}, count=1, block=block_ms)
            # (a RESP2 reply, this client's: [[stream, entries]]; redis-py's type also covers RESP3's dict)
            for _stream, msgs in cast(list[list[Any]] | None, got) or []:
                entries.extend(msgs)
            if not entries or not self._defer(*entries[0]):
                break
            entries = []  # gone to the queue's end: the next one
        claim = None
        for entry_id, data in entries:
            eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            if claim is not None:  # more than one reclaimed at once: leave the others pending for later
                continue
            claim = self._take(worker_id, eid, data)
        return claim

    def _turns(self, tenants: set[str]) -> dict[str, tuple[int, float]]:
        """Each tenant's place in the turn order: (its running jobs, when its last job started); lower goes first."""
        order = sorted(tenants)
        with self._r.pipeline(transaction=False) as pipe:
            for t in order:
                pipe.smembers(self._active(t))
            pipe.hmget(self._served, order)
            *actives, served = pipe.execute()
        with self._r.pipeline(transaction=False) as pipe:
            for members in actives:
                for j in members:
                    pipe.hget(self._job(_text(j)), "status")
            statuses = iter(pipe.execute())
        out = {}
        for t, members, last in zip(order, actives, served, strict=True):
            running = sum(1 for _ in members if _dec(next(statuses)) == "running")
            out[t] = (running, float(last or 0))
        return out

    def _defer(self, entry_id: Any, data: dict) -> bool:
        """Fair turns between tenants: a job read from the queue goes back to its end when a job of another
        tenant waits whose turn comes first (fewer running jobs, or an older last start), so one tenant's queued
        jobs (up to its limit, each up to training_max_seconds) cannot hold every worker for hours. Only the
        FAIR_SCAN entries after it are looked at."""
        raw = data.get(b"job_id") or data.get("job_id")
        job_id = _text(raw) if raw else None
        if not job_id:
            return False
        tenant = _dec(self._r.hget(self._job(job_id), "tenant_id"))
        if tenant is None:
            return False
        others: set[str] = set()
        eid = _text(entry_id)
        # the entries after this one: not delivered yet (an entry delivered to a worker that died before taking it
        # still says queued, but no read returns it until it is stale: counting it deferred every job meanwhile)
        # (entries with their fields: redis-py's type also covers deleted entries, and no reply)
        head = cast(StreamRange, self._r.xrange(self._stream, f"({eid}", "+", count=FAIR_SCAN))
        with self._r.pipeline(transaction=False) as pipe:
            ids = [_text(d.get(b"job_id") or d.get("job_id") or b"") for _e, d in head]
            for j in ids:
                pipe.hmget(self._job(j), ["tenant_id", "status"])
            for j, (t_raw, st) in zip(ids, pipe.execute(), strict=True):
                t = _dec(t_raw)
                if j != job_id and t is not None and t != tenant and _dec(st) == "queued":
                    others.add(t)
        if not others:
            return False
        turns = self._turns(others | {tenant})
        if min(turns[t] for t in others) >= turns[tenant]:
            return False
        self._move_back(keys=[self._stream, self._job(job_id)], args=[eid, job_id])
        log.debug("job %s (%s) waits for another tenant's turn", job_id, tenant)
        return True

    def _ack(self, entry_id: str) -> None:
        self._r.xack(self._stream, GROUP, entry_id)
        self._r.xdel(self._stream, entry_id)

    def _take(self, worker_id: str, entry_id: str, data: dict) -> RedisClaim | None:
        raw = data.get(b"job_id") or data.get("job_id")
        job_id = _text(raw) if raw else None
        if not job_id:
            self._ack(entry_id)
            return None
        res = self._claim(keys=[self._job(job_id)], args=[worker_id, json.dumps(time.time()), self.max_attempts,
                                                         EMPTY_PROGRESS])  # fmt: skip
        what = res[0].decode() if isinstance(res[0], bytes) else res[0]
        if what == "claimed":
            rec = self._read(job_id)
            ex = self._r.hget(self._job(job_id), "examples")
            if rec is None or ex is None:
                self._ack(entry_id)
                return None
            if int(res[1]) > 1:
                log.warning("job %s: taken over by %s (attempt %d)", job_id, worker_id, int(res[1]))
            # on Redis' clock, which every worker shares (a worker's own, behind the others', won it the turns)
            self._serve(keys=[self._served], args=[rec.tenant_id])
            return RedisClaim(rec, json.loads(ex), worker_id, entry_id)
        if what in ("cancel_requested", "exhausted"):
            rec = self._read(job_id)
            if rec is not None:
                # a run that stored its prefix before its worker went away: the job succeeded
                stored = stored_by_dead_worker(self.stored_version, rec)
                if stored is UNDECIDED:  # left pending: taken up again once idle
                    return None
                if stored is not None:
                    vals = found_stored(rec, stored.version, stored.training)
                elif what == "cancel_requested":
                    vals = {"status": "cancelled", "finished": time.time(), "cancel_requested": True,
                            "error": "cancelled; its worker went away" if rec.worker else
                            "cancelled before it started"}  # fmt: skip
                else:
                    dead = _dec(res[2]) if len(res) > 2 else rec.worker
                    vals = {"status": "failed", "finished": time.time(),
                            "error": f"its worker stopped heartbeating while running the job (attempt "
                                     f"{rec.attempts} of {self.max_attempts}); giving up"}  # fmt: skip
                    log.warning("job %s (worker %s): %s", job_id, dead, vals["error"])
                self._end(rec, "", entry_id, vals)
            else:
                self._ack(entry_id)
            return None
        self._ack(entry_id)  # ended (a job cancelled while queued, say) or missing: nothing to do
        return None

    def _end(self, rec: JobRecord, owner: str, entry_id: str, vals: dict[str, Any]) -> bool:
        flat: list[str] = []
        for k, v in vals.items():
            flat += [k, json.dumps(v, sort_keys=True, allow_nan=False)]
        ok = self._finish(
            keys=[self._job(rec.job_id), self._active(rec.tenant_id), self._stream],
            args=[owner, rec.job_id, entry_id, int(self.retention_s), *flat],
        )
        return bool(int(ok))

    def cancel_requested(self, claim: RedisClaim) -> bool:
        with self._errors("read the cancel flag"):
            return self._r.hget(self._job(claim.record.job_id), "cancel_requested") == b"true"

    def heartbeat(self, claim: RedisClaim, progress: dict[str, Any] | None) -> bool:
        with self._errors("heartbeat"):
            pipe = self._r.pipeline(transaction=False)
            pipe.xclaim(self._stream, GROUP, claim.worker_id, 0, [claim.entry_id], justid=True)
            pipe.execute()
            res = self._heartbeat(
                keys=[self._job(claim.record.job_id)],
                args=[claim.worker_id, json.dumps(time.time()),
                      json.dumps(progress, sort_keys=True) if progress is not None else ""],
            )  # fmt: skip
        if int(res) < 0:
            raise LostClaim(f"job {claim.record.job_id} is no longer run by {claim.worker_id}")
        return int(res) == 1

    def owns(self, claim: RedisClaim) -> bool:
        with self._errors("read the job"):
            rec = self._read(claim.record.job_id)
        return rec is not None and rec.status == "running" and rec.worker == claim.worker_id

    def finish(self, claim: RedisClaim, status: str, **fields_: Any) -> JobRecord:
        vals = {"status": status, "finished": time.time(), **fields_}
        if status == "cancelled":
            vals["cancel_requested"] = True
        with self._errors("finish the job"):
            if not self._end(claim.record, claim.worker_id, claim.entry_id, vals):
                raise LostClaim(f"job {claim.record.job_id} is no longer run by {claim.worker_id}")
            return self._read(claim.record.job_id) or claim.record

    def requeue(self, claim: RedisClaim, reason: str) -> None:
        with self._errors("requeue the job"):
            self._requeue(
                keys=[self._job(claim.record.job_id), self._stream],
                args=[claim.worker_id, claim.entry_id, json.dumps(reason), 1],
            )

    def release(self, claim: RedisClaim) -> None:
        return None  # the new owner holds the stream entry now

    def reclaim_stale(self) -> builtins.list[str]:
        return []  # XAUTOCLAIM inside claim() does it

    def prune(self) -> int:
        return 0  # terminal jobs expire (retention_s)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._r.close()
