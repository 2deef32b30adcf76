"""The scheduler's waiting queue (`server.engine.waiting.WaitQueue`): its orders against a plain deque driven by
the same operations, and the fair admission order read from its index against the order's plain definition (the
whole queue scanned, as the scheduler did before the index)."""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Callable, Iterator

import pytest

from server.engine import Request, SamplingParams
from server.engine.scheduler import Scheduler
from server.engine.sequence import Sequence
from server.engine.waiting import WaitQueue
from tests.engine_utils import make_engine
from tests.fixtures.models import tiny_llama


def _seq(i: int, tenant: str | None, priority: int) -> Sequence:
    req = Request(f"r{i}", [5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True), None, cache_salt=tenant,
                  priority=priority)  # fmt: skip
    return Sequence(req, None, None)


def _random_ops(rnd: random.Random, n: int) -> Iterator[tuple[str, Sequence | None]]:
    """A mix of appends, appendlefts (a request going back to the front) and removals from anywhere."""
    live: list[Sequence] = []
    for i in range(n):
        op = rnd.random()
        if op < 0.5 or not live:
            t = rnd.randrange(7)
            s = _seq(i, f"t{t}" if t < 6 else None, rnd.choice((0, 0, 0, 1, -2)))
            live.append(s)
            yield "append", s
        elif op < 0.75:
            s = live.pop(rnd.randrange(len(live)))
            yield "remove", s
            live.append(s)
            yield "appendleft", s
        else:
            yield "remove", live.pop(rnd.randrange(len(live)))


@pytest.mark.parametrize("seed", range(5))
def test_waitqueue_orders_are_a_deques(seed):
    rnd = random.Random(seed)

    def marked(s: Sequence) -> bool:
        return int(s.request_id[1:]) % 3 == 0

    q, ref = WaitQueue(marked), deque()
    for op, s in _random_ops(rnd, 600):
        getattr(q, op)(s)
        getattr(ref, op)(s)
        if rnd.random() < 0.1:
            assert list(q) == list(ref)
            assert len(q) == len(ref) and bool(q) == bool(ref)
            assert q.levels() == sorted({x.req.priority for x in ref})
            assert set(q.tenants()) == {x.tenant for x in ref}
            assert sorted(map(id, q.marked())) == sorted(id(x) for x in ref if marked(x))
            for level in q.levels():
                mine = [x for x in ref if x.req.priority == level]
                assert list(q.in_order(level)) == mine
                tenants = {t: list(mine) for t, mine in q.by_tenant(level).items()}
                assert set(tenants) == {x.tenant for x in mine}
                for t, got in tenants.items():
                    assert got == [x for x in mine if x.tenant == t]
                firsts = {}
                for x in mine:
                    firsts.setdefault(x.tenant, q.pos(x))
                assert list(q.heads(level)) == sorted((p, t) for t, p in firsts.items())
            ranks = [q.pos(x) for x in ref]
            assert ranks == sorted(ranks)  # positions order requests as the queue does
    assert all(s in q for s in ref)
    gone = _seq(10**6, "t0", 0)
    assert gone not in q
    with pytest.raises(ValueError):
        q.remove(gone)
    with pytest.raises(ValueError):
        q.append(next(iter(q)))  # already waiting


def _plain_order(sched: Scheduler, counts: dict[str | None, int]) -> Iterator[Sequence]:
    """The fair admission order's definition (`Scheduler._admission_order`'s docstring), over the whole queue."""
    waiting_all = list(sched.waiting)
    for level in sorted({s.req.priority for s in waiting_all}):
        waiting = [s for s in waiting_all if s.req.priority == level]
        queues: dict[str | None, deque[tuple[int, Sequence]]] = {}
        first = sched._yield_to
        if first is not None and any(s is first for s in waiting):
            yield first
        for i, seq in enumerate(waiting):
            if seq is first:
                continue
            if seq.preempted and seq.tenant not in sched._over_block_share():
                yield seq
                continue
            queues.setdefault(seq.tenant, deque()).append((i, seq))
        heap = [(counts.get(t, 0), q[0][0], k) for k, (t, q) in enumerate(queues.items())]
        tenants = list(queues)
        heapq.heapify(heap)
        while heap:
            _, _, k = heapq.heappop(heap)
            q = queues[tenants[k]]
            yield q.popleft()[1]
            if q:
                heapq.heappush(heap, (counts.get(tenants[k], 0), q[0][0], k))


def _walk(
    order: Callable[[dict[str | None, int]], Iterator[Sequence]], running: dict, take: int, passed: set[str]
) -> list[str]:
    """The first `take` requests of an order, each counted as admitted (its tenant runs one more) as it is taken,
    but those in `passed` (as `_admit` passes over a request whose prefix is still being fetched)."""
    counts = dict(running)  # read by the order as it goes
    out = []
    for s in order(counts):
        if len(out) == take:
            break
        out.append(s.request_id)
        if s.request_id not in passed:
            counts[s.tenant] = counts.get(s.tenant, 0) + 1
    return out


@pytest.mark.parametrize("walk", ["as chosen", "queue order", "heap"])
@pytest.mark.parametrize("seed", range(8))
def test_fair_admission_order_from_the_index_is_the_plain_order(seed, walk, monkeypatch):
    """Random queues (priorities, preempted and un-admitted requests at the front, a request a fair preemption made
    room for, tenants over their block share), and admissions counted as the order is walked, as `_admit` does.
    `walk`: the tenants with no row running taken in the queue's order or through the heap, whichever the
    scheduler chooses (by their share of the level), or always the one (the order is the same)."""
    rnd = random.Random(seed)
    eng = make_engine(tiny_llama(0), {}, max_num_seqs=8)
    sched = eng.scheduler
    if walk != "as chosen":  # (the choice reads the level's size alone)
        monkeypatch.setattr(
            sched.waiting, "level_count", lambda level: 10**9 if walk == "queue order" else -1
        )
    for op, s in _random_ops(rnd, 300):
        getattr(sched.waiting, op)(s)
        if op == "appendleft":
            s.preempted = rnd.random() < 0.7
    for trial in range(12):
        waiting = list(sched.waiting)
        sched._yield_to = rnd.choice(waiting) if trial % 2 else None
        sched._over_share = {f"t{i}" for i in range(6) if rnd.random() < 0.3} | (
            {None} if trial % 3 else set()
        )
        # (a count of 0 too: a tenant listed with no row running is one with none)
        running = {t: rnd.randrange(0, 3) for t in (*(f"t{i}" for i in range(6)), None) if rnd.random() < 0.4}
        take = rnd.randrange(len(waiting) + 1)  # how far `_admit` walks the order (then stops)
        passed = {s.request_id for s in waiting if rnd.random() < 0.3}

        got = _walk(sched._admission_order, running, take, passed)
        assert got == _walk(lambda counts: _plain_order(sched, counts), running, take, passed)
        assert len(got) == take
        assert any(s.preempted for s in waiting)  # (the case is exercised)
    sched._yield_to = None
    sched._over_share = None
