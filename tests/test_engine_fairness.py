"""Fair turns between tenants under a flood (step-counted, tiny model): a tenant below its even share of the rows
gets one from the tenant furthest above its own; when the KV pool runs dry, the tenant holding the most blocks above
its share loses its newest rows, not another tenant's; FCFS and priorities keep their rules; outputs stay exact."""

from __future__ import annotations

import itertools
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest
import torch

from server.engine import LLMEngine, PrefixKey, Request, SamplingParams
from server.engine.scheduler import FAIR_PREEMPT_LIMIT
from tests.engine_utils import make_engine, pool_bytes, random_kv, random_prompt


@dataclass
class Run:
    eng: LLMEngine
    reqs: dict[str, Request] = field(default_factory=dict)
    got: dict[str, list[int]] = field(default_factory=dict)
    finished: set[str] = field(default_factory=set)
    added: dict[str, int] = field(default_factory=dict)  # quiet request -> the step it arrived before
    first: dict[str, int] = field(default_factory=dict)  # quiet request -> the step that gave its first token
    last: dict[str, int] = field(default_factory=dict)
    gap: int = 0  # the longest run of steps between two tokens of one quiet request
    victims: list[str] = field(default_factory=list)
    fair_per_step: list[int] = field(default_factory=list)  # fair preemptions made by each step

    def waits(self) -> dict[str, int]:
        return {rid: self.first.get(rid, 10**9) - s for rid, s in self.added.items()}

    def step(self, step: int) -> None:
        before = self.eng.scheduler.num_fair_preemptions
        for ev in self.eng.step():
            self.got.setdefault(ev.request_id, []).extend(ev.token_ids)
            if ev.finished:
                self.finished.add(ev.request_id)
            if ev.request_id in self.added and ev.token_ids:
                if ev.request_id in self.last:
                    self.gap = max(self.gap, step - self.last[ev.request_id])
                else:
                    self.first[ev.request_id] = step
                self.last[ev.request_id] = step
        self.fair_per_step.append(self.eng.scheduler.num_fair_preemptions - before)


def _engine(bundle, prefixes: dict[PrefixKey, torch.Tensor] | None = None, **cfg) -> Run:
    eng = make_engine(bundle, prefixes or {}, **cfg)
    run = Run(eng)
    preempt = eng.scheduler._preempt

    def record(seq):
        run.victims.append(seq.request_id)
        preempt(seq)

    eng.scheduler._preempt = record  # type: ignore[method-assign]
    return run


_ids = itertools.count()


def _add(
    run: Run, bundle, tenant: str, prompt: int, new: int, priority: int = 0, prefix: PrefixKey | None = None
) -> str:
    i = next(_ids)
    rid = f"{tenant}-{i}"
    req = Request(
        rid,
        random_prompt(bundle.spec.vocab_size, prompt, i),
        SamplingParams(max_tokens=new, ignore_eos=True),
        prefix,
        cache_salt=tenant,
        priority=priority,
    )
    run.reqs[rid] = req
    run.eng.add_request(req)
    return rid


def _flood(
    bundle, *, flood_priority: int = 0, quiet_priority: int = 0, steps: int = 110, flood_new: int = 40, **cfg
) -> Run:
    """Tenant "flood" keeps 8 requests of `flood_new` tokens queued or running (a client at its concurrency limit: each that
    ends is replaced), filling all 8 rows; tenant "quiet" sends a 6-token request every 4 steps, so it has one or
    two running whenever the next arrives."""
    run = _engine(bundle, max_num_seqs=8, **cfg)
    for _ in range(8):
        _add(run, bundle, "flood", 12, flood_new, flood_priority)
    for step in range(steps):
        if 8 <= step <= steps - 30 and step % 4 == 0:
            run.added[_add(run, bundle, "quiet", 12, 6, quiet_priority)] = step
        done = set(run.finished)
        run.step(step)
        for rid in run.finished - done:
            if rid.startswith("flood"):
                _add(run, bundle, "flood", 12, flood_new, flood_priority)
    return run


def _check_exact(bundle, run: Run, rids, prefixes: dict[PrefixKey, torch.Tensor] | None = None) -> None:
    """The requests `rids` (finished) produced what each produces alone."""
    alone = make_engine(bundle, prefixes or {})
    for rid in rids:
        assert rid in run.finished, rid
        assert run.got[rid] == alone.generate([run.reqs[rid]])[0].token_ids, rid


@pytest.mark.parametrize("async_decode", ["off", "on"])
def test_a_steady_quiet_tenant_beside_a_flood_starts_every_request_at_once(tiny_llama_bundle, async_decode):
    """Every quiet request starts within a step or two, not only its first: the quiet tenant runs fewer rows than
    its share (8 // 2 tenants = 4), so the newest flood row gives it its place (the rule before served only a
    tenant with nothing running: from the second request on, quiet waited for a flood row to end, 10 steps at most
    here, and 34 with async decode, whose chain never let the scheduler's step preempt). One fair preemption a step
    at most; preempted rows recompute to the same tokens."""
    b = tiny_llama_bundle
    run = _flood(b, async_decode=async_decode)
    waits = run.waits()
    assert len(waits) >= 15
    assert max(waits.values()) <= 2, waits
    sched = run.eng.scheduler
    assert sched.num_fair_preemptions >= 2  # the second request and on too
    assert max(run.fair_per_step) == 1
    assert all(v.startswith("flood") for v in run.victims), run.victims
    if async_decode == "off":  # (the async chain's tokens are the same: test_engine_async)
        victims = [v for v in dict.fromkeys(run.victims) if v in run.finished]
        assert victims
        _check_exact(b, run, victims[:3] + [r for r in run.added if r in run.finished][:3])


def test_a_row_gives_its_place_to_a_tenant_below_its_share_at_most_twice(tiny_llama_bundle):
    """Long flood requests (120 tokens) beside the quiet tenant's steady stream: each quiet arrival preempts a flood
    row, and without a bound the same flood requests were preempted again and again (one 27 times here, 70 fair
    preemptions in all), recomputed from scratch each time. A row gives its place up at most `FAIR_PREEMPT_LIMIT`
    (2) times, the least-preempted rows first; quiet's requests still start (later, when no flood row is left
    to give one up) and every request ends."""
    b = tiny_llama_bundle
    run = _flood(b, steps=330, flood_new=120, async_decode="off")
    while run.eng.has_unfinished():
        run.step(len(run.fair_per_step))
    per_request = Counter(run.victims)
    assert run.eng.scheduler.num_fair_preemptions >= 10
    assert sum(per_request.values()) == run.eng.scheduler.num_fair_preemptions  # (the pool never runs dry)
    assert max(per_request.values()) == FAIR_PREEMPT_LIMIT == 2, per_request
    assert all(rid in run.finished for rid in run.added)
    assert max(run.fair_per_step) == 1


def test_fcfs_keeps_arrival_order_under_a_flood(tiny_llama_bundle):
    """`fair_scheduling=False`: no fair preemption; quiet's requests queue behind the flood's (as before)."""
    run = _flood(tiny_llama_bundle, fair_scheduling=False)
    assert run.eng.scheduler.num_fair_preemptions == 0 and run.victims == []
    assert max(run.waits().values()) > 20


def test_a_lower_priority_value_never_yields_a_row_to_a_higher_one(tiny_llama_bundle):
    """The flood's rows have priority 0, quiet's requests 1: quiet waits for rows to end (no fair preemption).
    The other way round (flood 1, quiet 0), quiet starts at once."""
    b = tiny_llama_bundle
    held = _flood(b, flood_priority=0, quiet_priority=1, steps=80)
    assert held.eng.scheduler.num_fair_preemptions == 0 and held.victims == []
    assert max(held.waits().values()) > 20
    served = _flood(b, flood_priority=1, quiet_priority=0, steps=80)
    assert max(served.waits().values()) <= 2


def test_two_floods_converge_to_even_shares_and_stay(tiny_llama_bundle):
    """A fills all 8 rows, then B queues 8: one of A's newest rows a step gives B its place until each runs 4
    (its share); then neither is preempted for the other, and A never drops below 4. Outputs stay exact."""
    b = tiny_llama_bundle
    run = _engine(b, max_num_seqs=8)
    for _ in range(8):
        _add(run, b, "A", 12, 30)
    run.step(0)
    run.step(1)
    for _ in range(8):
        _add(run, b, "B", 12, 30)
    counts: list[dict[str | None, int]] = []
    step = 2
    while run.eng.has_unfinished():
        run.step(step)
        step += 1
        c: dict[str | None, int] = {}
        for r in run.eng.scheduler.running:
            c[r.req.tenant] = c.get(r.req.tenant, 0) + 1
        counts.append(c)
    assert max(run.fair_per_step) == 1
    assert run.eng.scheduler.num_fair_preemptions == 4
    assert counts[3] == {"A": 4, "B": 4}, counts[:5]
    assert all(c.get("A", 0) >= 4 for c in counts[:20]), counts[:20]
    _check_exact(b, run, list(dict.fromkeys(run.victims))[:4])


def _hog(bundle, *, hog_priority: int = 0, quiet_priority: int = 0, **cfg) -> Run:
    """A KV pool of 48 blocks, rows to spare (16): tenant "hog" runs 8 requests of 40 + 200 tokens (15 blocks
    each at the end), tenant "quiet" sends a 20 + 8-token request every 10 steps. The pool runs dry again and again;
    steps until quiet's requests are done."""
    run = _engine(bundle, max_num_seqs=16, kv_cache_bytes=pool_bytes(bundle, 48), **cfg)
    for _ in range(8):
        _add(run, bundle, "hog", 40, 200, hog_priority)
    for step in range(3000):
        if step % 10 == 0 and step <= 150:
            run.added[_add(run, bundle, "quiet", 20, 8, quiet_priority)] = step
        run.step(step)
        if step > 150 and all(r in run.finished for r in run.added):
            break
    return run


def test_when_the_pool_runs_dry_the_tenant_over_its_share_loses_its_rows(tiny_llama_bundle):
    """The hog holds nearly every block (its share is half): its newest rows are preempted, never quiet's (the
    newest row overall, usually quiet's just-started one, was before: its stream stopped for hundreds of steps
    while it waited behind the hog's preempted rows). Quiet's streams run without a gap; outputs stay exact."""
    b = tiny_llama_bundle
    run = _hog(b)
    assert run.eng.scheduler.num_preemptions >= 5
    assert all(v.startswith("hog") for v in run.victims), run.victims
    assert run.gap == 1
    assert max(run.waits().values()) < 150, run.waits()
    _check_exact(b, run, list(run.added)[:3])
    while run.eng.has_unfinished():
        run.step(0)
    _check_exact(b, run, list(dict.fromkeys(run.victims))[:2])


def test_when_the_pool_runs_dry_fcfs_and_priorities_keep_their_victims(tiny_llama_bundle):
    """FCFS: the newest row is preempted whoever holds the blocks (quiet's rows among them, as before). Fair, but
    quiet's requests of a worse priority (1) than the hog's (0): quiet's rows go first all the same."""
    b = tiny_llama_bundle
    fcfs = _hog(b, fair_scheduling=False)
    assert any(v.startswith("quiet") for v in fcfs.victims), fcfs.victims
    worse = _hog(b, quiet_priority=1)
    assert any(v.startswith("quiet") for v in worse.victims), worse.victims
    assert all(run.gap > 1 for run in (fcfs, worse))


@pytest.mark.parametrize("async_decode", ["off", "on"])
def test_a_tenant_over_its_block_share_keeps_its_place_in_the_token_budget(tiny_llama_bundle, async_decode):
    """Tenant A's 6 long rows hold more than half of a 120-block pool that is not short (about 20 blocks stay
    free: nothing is preempted); tenant B's 700-token prompt arrives with a 64-token step budget. Rows get the
    budget by priority then age, so each of A's rows still decodes a token every step (the budget went in the
    victim order before: B's chunk took it first and A's newest row got no token for 11 steps)."""
    b = tiny_llama_bundle
    run = _engine(
        b,
        max_num_seqs=16,
        max_num_batched_tokens=64,
        long_prefill_tokens=0,
        kv_cache_bytes=pool_bytes(b, 120),
        async_decode=async_decode,
    )
    for _ in range(6):
        run.added[_add(run, b, "A", 150, 200)] = 0
    for step in range(120):
        if step == 20:
            _add(run, b, "B", 700, 5)
        run.step(step)
    assert run.victims == []
    assert run.gap == 1, run.gap
    assert all(len(run.got[r]) >= 90 for r in run.added)


def test_older_rows_of_the_tenant_over_its_block_share_are_the_victims(tiny_llama_bundle):
    """Tenant A's 6 rows (older, sharing a 10-block system prompt) and B's 3 (newer) grow in a 60-block pool.
    Rows get the budget oldest first, yet when the pool runs dry A's rows are preempted, not B's; and A's excess
    counts what a row frees: its own 5 blocks, not the 10 shared that its other rows keep (so 2 of A's rows pay
    off an excess of 10, where 1 did before)."""
    b = tiny_llama_bundle
    run = _engine(b, max_num_seqs=16, kv_cache_bytes=pool_bytes(b, 60))
    system = random_prompt(b.spec.vocab_size, 160, 999)
    for i in range(6):
        req = Request(
            f"A-{i}", system + random_prompt(b.spec.vocab_size, 8, i), SamplingParams(max_tokens=200, ignore_eos=True),
            cache_salt="A",
        )  # fmt: skip
        run.reqs[req.request_id] = req
        run.eng.add_request(req)
    for step in range(3):
        run.step(step)
    for _ in range(3):
        _add(run, b, "B", 40, 200)
    sched = run.eng.scheduler
    marked = None
    for step in range(3, 130):
        if marked is None and sched.pool.num_free < 3:
            order, over = sched._keep_order()
            marked = [r.request_id for r in order if id(r) in over]
        run.step(step)
    assert marked == ["A-4", "A-5"], marked
    assert len(run.victims) >= 3
    assert all(v.startswith("A") for v in run.victims[:3]), run.victims


def _kv_hog(
    bundle, *, hog_priority: int = 0, quiet_priority: int = 0, quiet_prefix: bool = False, **cfg
) -> Run:
    """Rows to spare (32), a 40-block pool: tenant "hog" has 12 requests of 40 + 240 tokens (up to 18 blocks each),
    more than the pool holds, so its rows fill it and its preempted rows wait to resume; tenant "quiet" sends a
    20 + 6-token request (2 blocks) every 10 steps up to step 150 (`quiet_prefix`: with its 16-token prefix, which
    is evicted while quiet has nothing running, so each request fetches it and needs a block to install it)."""
    key = PrefixKey("quiet", "default", 1)
    prefixes = {key: random_kv(bundle.spec, 16, seed=1)} if quiet_prefix else {}
    run = _engine(bundle, prefixes, max_num_seqs=32, kv_cache_bytes=pool_bytes(bundle, 40), **cfg)
    for _ in range(12):
        _add(run, bundle, "hog", 40, 240, hog_priority)
    for step in range(400):
        if 10 <= step <= 150 and step % 10 == 0:
            run.added[_add(run, bundle, "quiet", 20, 6, quiet_priority, key if quiet_prefix else None)] = step
        run.step(step)
        # (the prefix is fetched on a loader thread: each step waits for a fetch under way, so that the steps
        # counted do not depend on how fast that thread ran)
        deadline = time.monotonic() + 10
        while quiet_prefix and not run.eng.prefix_cache.settled(key) and time.monotonic() < deadline:
            time.sleep(0.001)
    return run


@pytest.mark.parametrize("async_decode", ["off", "on"])
def test_a_tenant_whose_rows_fill_the_pool_gives_blocks_to_another_below_its_share(
    tiny_llama_bundle, async_decode
):
    """With rows to spare, the hog's rows hold every block (its share is half): a quiet request that fits in its
    own share takes the blocks of the hog's newest row (one fair preemption a step), and the hog's preempted rows
    do not resume ahead of it (they did: a preempted row resumed before any other tenant's request, and the first
    that did not fit held every request behind it). Quiet's requests start within a step, 3 with async decode (they
    waited up to 79 here before, and up to 111 steps in `benchmarks/bench_fair_steps.py`'s 80-block workload); only
    the hog's rows are preempted; outputs stay exact (the async chain's tokens are the same: test_engine_async)."""
    b = tiny_llama_bundle
    run = _kv_hog(b, async_decode=async_decode)
    waits = run.waits()
    # (async: the chain's own admission finds the request short of blocks, and the step after it preempts)
    assert len(waits) == 15 and max(waits.values()) <= (1 if async_decode == "off" else 3), waits
    assert run.eng.scheduler.num_fair_preemptions >= 1
    assert max(run.fair_per_step) == 1
    assert run.victims and all(v.startswith("hog") for v in run.victims), run.victims
    assert all(rid in run.finished for rid in run.added)
    if async_decode == "off":
        while run.eng.has_unfinished():
            run.step(0)
        _check_exact(b, run, list(run.added)[:3] + list(dict.fromkeys(run.victims))[:2])


def test_block_turns_keep_priorities_and_fcfs_keeps_its_order(tiny_llama_bundle):
    """Quiet's requests of a worse priority (1) than the hog's (0) take no blocks from it, and FCFS makes no fair
    preemption: in both, quiet's requests wait for the hog's rows (tens of steps)."""
    b = tiny_llama_bundle
    for run in (_kv_hog(b, quiet_priority=1), _kv_hog(b, fair_scheduling=False)):
        assert run.eng.scheduler.num_fair_preemptions == 0
        assert max(run.waits().values()) > 20, run.waits()


@pytest.mark.parametrize("async_decode", ["off", "on"])
def test_a_tenants_prefix_that_the_pool_has_no_room_for_takes_blocks_the_same_way(
    tiny_llama_bundle, async_decode
):
    """Quiet's requests carry its prefix, evicted while quiet is idle: fetched again, it waits for blocks to be
    installed, which left the request not ready, never short of blocks, so no fair preemption helped it (32 steps
    here, 80 before the block shares). The blocks its prefix needs count in its need; the prefix is installed in
    the step that made room. Outputs stay exact."""
    b = tiny_llama_bundle
    run = _kv_hog(b, quiet_prefix=True, async_decode=async_decode)
    waits = run.waits()
    # (a step to fetch the prefix; async: the chain's admission finds it short, the step after preempts)
    assert len(waits) == 15 and max(waits.values()) <= (2 if async_decode == "off" else 5), waits
    assert run.eng.scheduler.num_fair_preemptions >= 1
    assert all(v.startswith("hog") for v in run.victims), run.victims
    if async_decode == "off":
        key = PrefixKey("quiet", "default", 1)
        _check_exact(b, run, list(run.added)[:3], {key: random_kv(b.spec, 16, seed=1)})


def test_the_row_that_gave_its_blocks_up_does_not_take_them_back_first(tiny_llama_bundle):
    """Tenant A holds most of the pool with no more rows (2) than B (1): after A's newest row gave its blocks up,
    A ran the fewest rows again and its row, first in A's queue, took them straight back, recomputed, before the
    request it yielded to (which then waited as before: its first token 38 steps after it came, as without block
    shares). The request a fair preemption makes room for is admitted first in that step."""
    b = tiny_llama_bundle
    run = _engine(b, max_num_seqs=8, kv_cache_bytes=pool_bytes(b, 40))
    for _ in range(2):
        _add(run, b, "A", 200, 100)  # 13 blocks, growing to 19
    _add(run, b, "B", 4, 200)  # 1 block, growing to 13
    for step in range(62):
        run.step(step)
    run.added[_add(run, b, "B", 30, 4)] = 62
    step = 62
    while run.eng.has_unfinished():
        run.step(step)
        step += 1
    assert run.eng.scheduler.num_fair_preemptions == 1 and run.victims[0].startswith("A")
    assert max(run.waits().values()) <= 1, run.waits()
    _check_exact(b, run, list(run.added) + run.victims[:1])
