"""Continuous batching: every step decodes all running requests and admits waiting ones within a token budget.

Running requests come first, by priority then age (one token each when decoding, or their next prefill chunk);
newcomers are admitted while the step's token budget, the sequence limit and free KV blocks allow, tenants taking
turns (the tenant with the fewest running requests first, each tenant's own in arrival order; `fair=False`: arrival
order). A newcomer whose prefix is still being fetched is skipped (others behind it go ahead). Requests carry a
priority (vLLM's; default 0): a lower value is admitted before every higher one, preempted after them, and never
preempted to make room for one.

Fair turns (`fair=True`, LoRAX-like): each tenant with work (rows running or requests waiting) has an even share of
the rows, `max_num_seqs // tenants` (at least 1), and of the KV blocks rows hold or could take. While every row is
taken, a waiting request (its prefix at hand) of a tenant below its row share takes the place of the newest row of
the tenant furthest above its own, one a step (`_starved_victim`; a row gives its place up `FAIR_PREEMPT_LIMIT`
times at most). With rows to spare, a waiting request that its tenant's share of the blocks has room for but the
pool has not takes, the same way, the blocks of the newest row of the tenant most above its block share
(`_block_starved_victim`); either request is admitted first in that step. When the pool runs dry, idle prefixes
are evicted first, then a running request is preempted (its blocks freed, recomputed later): of the worst priority
level, the newest row of the tenant holding the most blocks above its share (`_keep_order`), else the newest row
(rows get the step's tokens by priority then age all the same). A row preempted for being above its tenant's share,
or while its tenant holds more blocks than its share, waits its tenant's turn to resume; others resume first
(vLLM's rule). `fair=False`: the newest row of the worst priority level, and no preemption for turns.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from collections.abc import Callable, Iterator
from collections.abc import Sequence as Sequence_
from dataclasses import dataclass, field

from server.engine.kv_cache import KVPool
from server.engine.prefix_cache import PrefixCache, PrefixEntry, PrefixLoadError
from server.engine.sequence import SeqStatus, Sequence
from server.engine.spec import NgramIndex, speculable
from server.engine.waiting import WaitQueue


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_waiting: int = 1024
    prompt_cache: bool = True  # reuse the KV of full blocks of earlier requests' identical leading tokens
    max_model_len: int | None = None  # positions the model has: prefix + prompt beyond it fail that request
    fair: bool = True  # tenants take turns at admission (see `Scheduler._admission_order`); False: FCFS
    # speculative decoding by prompt lookup (server.engine.spec): draft tokens a step per eligible decoding row
    spec_tokens: int = 0
    spec_min_n: int = 2
    spec_max_n: int = 4
    # while other rows decode, a prompt computes at most this many tokens a step (vLLM's
    # long_prefill_token_threshold, which applies always): a long prompt's chunk would hold every stream's next token
    # for its whole step (seconds on a CPU); alone, a prompt takes the whole step budget. 0: no cap
    long_prefill_tokens: int = 0


# a row gives its place to a tenant below its share of the rows at most this many times (`_starved_victim`): each
# time it is recomputed from scratch, and a steady stream of a light tenant's requests beside a flood would otherwise
# preempt about once per arrival, the same long request again and again without bound (27 times in one review run)
FAIR_PREEMPT_LIMIT = 2
PROMPT_LOGPROBS_CHUNK = 512  # 512 x a 128k vocabulary x 4 bytes = 256 MiB of logits at most


def _block_key(parent: object, tokens: list[int], i: int, bs: int) -> tuple[object, tuple[int, ...]]:
    """Prompt-cache key of own block i: its parent node (or the chain's root) and its tokens, compared by value."""
    return parent, tuple(tokens[i * bs : (i + 1) * bs])


@dataclass
class ScheduledItem:
    seq: Sequence
    num_tokens: int  # computed this step: own tokens (prefill chunk, or the last token when decoding) + draft
    draft: list[int] = field(default_factory=list)  # speculative tokens after the row's last token, to verify


class Scheduler:
    def __init__(
        self,
        cfg: SchedulerConfig,
        pool: KVPool,
        prefixes: PrefixCache,
        marked: Callable[[Sequence], bool] | None = None,
    ) -> None:
        """`marked`: a fixed property of requests that the engine looks for among the waiting ones
        (`WaitQueue.marked`)."""
        self.cfg = cfg
        self.pool = pool
        self.prefixes = prefixes
        self.waiting = WaitQueue(marked)
        self.running: list[Sequence] = []
        self.failed: list[Sequence] = []  # prefix load failures, reported by the engine
        self.num_preemptions = 0
        self.num_fair_preemptions = 0  # of which gave a row to a tenant below its share
        self.cache_query_tokens = 0  # own tokens of admitted requests (prompt cache on)
        self.cache_hit_tokens = 0  # of which found in the prompt cache
        self._fresh: list[int] = []  # blocks registered by the step being scheduled (see `_register`)
        self._prefill_cap = 0  # this step's cap on a prompt's chunk (`begin_step`); 0: none
        self.spec_draft_tokens = 0  # drafted tokens scheduled for verification
        self.spec_accepted_tokens = 0  # of which the model agreed with (counted by the engine)
        # the waiting request the last admission stopped at for want of KV blocks (`_block_starved_victim`)
        self._short_of_blocks: Sequence | None = None
        # the waiting request a fair preemption of this step made room for: admitted before any other (`_order_within`)
        self._yield_to: Sequence | None = None
        # tenants holding more KV blocks than their share, as of this step's first need (`_over_block_share`)
        self._over_share: set[str | None] | None = None

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    # ------------------------------------------------------------------ blocks
    def _ensure_blocks(self, seq: Sequence, num_tokens: int) -> bool:
        need = self.pool.blocks_for(seq.num_cached + num_tokens) - len(seq.own_blocks)
        if need <= 0:
            return True
        if self.pool.num_free < need and not self.prefixes.evict(need):
            return False
        seq.own_blocks.extend(self.pool.allocate(need))
        return True

    def free(self, seq: Sequence, keep_prefix: bool = False) -> None:
        """Give back the row's blocks and, unless `keep_prefix`, its prefix. A row that goes back to waiting after
        it produced tokens keeps its prefix (`_requeued`): resumed on a fresh lookup it would fail if its version
        was deleted meanwhile (a rollback, `keep_versions` pruning), or run on other tensors."""
        self.pool.free(reversed(seq.own_blocks))  # tail first: cached leading blocks outlive it
        seq.own_blocks = []
        seq.cache_nodes = []
        if seq.prefix is not None and not keep_prefix:
            self.prefixes.release(seq.prefix)
            seq.prefix = None
        self._unclaim(seq)

    @staticmethod
    def _requeued(seq: Sequence) -> bool:
        """Whether a row going back to waiting keeps its prefix (see `free`)."""
        return bool(seq.output)

    def _release_waiting_prefixes(self, keep: Sequence) -> bool:
        """`keep` cannot get blocks and nothing else running would free any (nothing runs, or only `keep`): the
        prefixes that waiting rows hold (`free`) may be what holds the pool. They let go (each looks its prefix up
        again when admitted); whether any did."""
        held = [s for s in self.waiting if s is not keep and s.prefix is not None]
        for s in held:
            self.prefixes.release(s.prefix)  # type: ignore[arg-type]
            s.prefix = None
        return bool(held)

    def _unclaim(self, seq: Sequence) -> None:
        if seq.prefix_claimed:
            seq.prefix_claimed = False
            self.prefixes.unclaim(seq.req.prefix)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ prompt cache
    def _match_cached(self, seq: Sequence) -> bool:
        """Start a newcomer on the cached blocks of its longest cached run of leading full blocks (at least its last
        token is always computed: the step needs its logits). Whether the cache was asked."""
        if not self.cfg.prompt_cache or seq.num_cached or seq.prompt_logprobs is not None:
            return False
        bs, toks = self.pool.block_size, seq.tokens
        parent: object = seq.cache_root
        blocks: list[int] = []
        for i in range((len(toks) - 1) // bs):
            hit = self.pool.lookup(_block_key(parent, toks, i, bs))
            if hit is None:
                break
            blocks.append(hit[0])
            seq.cache_nodes.append(hit[1])
            parent = hit[1]
        self.pool.acquire(blocks)
        seq.own_blocks = blocks
        seq.num_cached = len(blocks) * bs
        return True

    def _register(self, seq: Sequence, upto: int) -> None:
        """Register the full own blocks that this step's `upto` own tokens complete, before the step runs.

        Registering at scheduling (as vLLM v1 does) lets a request admitted later in the same step take blocks
        whose KV this step computes: every layer writes the whole batch's keys/values before any row attends, so
        such a row reads them in the same forward. Identical prompts arriving together (OpenAI `n`, a shared system
        prompt) are prefilled once. If the step fails, `rollback` forgets these entries (their KV was never
        written)."""
        if not self.cfg.prompt_cache:
            return
        bs = self.pool.block_size
        for i in range(len(seq.cache_nodes), upto // bs):
            parent = seq.cache_nodes[-1] if seq.cache_nodes else seq.cache_root
            key = _block_key(parent, seq.tokens, i, bs)
            if self.pool.lookup(key) is None:
                self._fresh.append(seq.own_blocks[i])
            seq.cache_nodes.append(self.pool.register(seq.own_blocks[i], key))

    def draft_verified(self, seq: Sequence, accepted: int) -> None:
        """Count a verified draft's accepted tokens; a row whose draft failed entirely backs off (1, 3, 7, then 15
        steps without drafting after 1, 2, 3, 4+ failures in a row)."""
        self.spec_accepted_tokens += accepted
        seq.spec_misses = 0 if accepted else seq.spec_misses + 1
        seq.spec_wait = (1 << min(seq.spec_misses, 4)) - 1

    def register_accepted(self, seq: Sequence) -> None:
        """After a verified step: register the blocks that the row's accepted draft tokens completed."""
        if seq.status is SeqStatus.RUNNING:
            self._register(seq, seq.num_cached)

    def rollback(self) -> None:
        """The scheduled step failed: drop the prompt-cache entries it registered (their KV is not valid). Rows
        that carry on (an async follow-up's) lose the nodes from the first forgotten one on, so that `_register`
        registers those blocks again once they are computed, on a live chain."""
        dead = self.pool.forget(self._fresh)
        self._fresh = []
        if dead:
            for seq in itertools.chain(self.running, self.waiting):
                cut = next((i for i, node in enumerate(seq.cache_nodes) if node in dead), None)
                if cut is not None:
                    del seq.cache_nodes[cut:]

    def unadmit(self, seqs: list[Sequence]) -> None:
        """Requests admitted by a step that failed before it ran go back to the front of the queue, as they
        were: a newcomer may have taken prompt-cache blocks that another row of that step registered, whose KV was
        never written (`rollback` forgets them), and its `num_cached` counts them."""
        for seq in reversed(seqs):
            if seq.status is not SeqStatus.RUNNING:
                continue
            self.running.remove(seq)
            self.free(seq, keep_prefix=self._requeued(seq))
            # its counts stay (counters never go down); its next admission is not counted again
            seq.preempted = seq.admission[2]
            seq.admission_counted = True
            seq.num_cached = 0
            seq.status = SeqStatus.WAITING
            self.waiting.appendleft(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.free(seq, keep_prefix=self._requeued(seq))
        seq.num_cached = 0
        seq.preempted = True
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    # ------------------------------------------------------------------ schedule
    def begin_step(self) -> None:
        """Before a step is planned: take in loaded prefixes, and cap prompt chunks if any row is decoding."""
        self.prefixes.process()
        cap = self.cfg.long_prefill_tokens
        # (decoding: a row with its next token to feed, or with it in flight: the async chain's)
        decoding = any(s.to_compute == 0 or (s.output and s.to_compute <= 1) for s in self.running)
        self._prefill_cap = cap if cap > 0 and decoding else 0
        self._over_share = None

    def _chunk(self, seq: Sequence, budget: int) -> int:
        """Tokens of `seq` to run this step. A prefill with prompt logprobs returns every position's logits
        ([tokens, vocab] float32), so its chunks are capped to bound that memory; beside decoding rows, a prompt's
        chunk is capped to `long_prefill_tokens` (`begin_step`)."""
        n = min(seq.to_compute, budget)
        if seq.prompt_logprobs is not None and len(seq.prompt_logprobs) < len(seq.prompt):
            n = min(n, PROMPT_LOGPROBS_CHUNK)
        if self._prefill_cap:
            n = min(n, self._prefill_cap)
        return n

    def schedule(self) -> list[ScheduledItem]:
        self.begin_step()
        self._fresh = []
        if self.cfg.fair and self.waiting:
            full = len(self.running) >= self.cfg.max_num_seqs
            victim = self._starved_victim() if full else self._block_starved_victim()
            if victim is not None:
                # the request it makes room for is admitted first this step: by the rows it waits behind (the
                # victim's tenant ran fewer rows), the victim itself took them back, recomputed, at once
                self._yield_to = self._first_ready(self._tenant_rows()) if full else self._short_of_blocks
                self._fair_preempt(victim)
        self._short_of_blocks = None
        budget = self.cfg.max_num_batched_tokens
        # planned in place order (priority, then age): the rows' tokens within the step's budget
        plan: list[tuple[Sequence, int, list[int]]] = []
        for seq in self._ranked():
            n = self._chunk(seq, budget)
            if n <= 0:
                continue
            plan.append((seq, n, []))
            budget -= n
        if self.cfg.spec_tokens > 0:
            budget = self._plan_drafts(plan, budget)
        # then their blocks, in the same order; a row short of them preempts the last running row in the victim
        # order (`_keep_order`, computed once a victim is needed and fixed for the step), itself at worst. Nothing
        # is registered or scheduled before every row has its blocks, so any row may be the victim: one planned
        # earlier gives back its blocks, its planned tokens go to the newcomers
        keep: list[Sequence] | None = None
        over: set[int] = set()
        for seq, n, _ in plan:
            if seq.status is not SeqStatus.RUNNING:  # preempted below by an earlier row
                continue
            while not self._ensure_blocks(seq, n):
                if keep is None:
                    keep, over = self._keep_order()
                victim = self._victim(keep)
                if victim is seq and len(self.running) == 1 and self._release_waiting_prefixes(seq):
                    continue  # the only row: the prefixes that waiting rows hold give way, not its KV
                self._preempt(victim)
                if id(victim) in over:
                    # taken because its tenant held more than its share: it waits its tenant's turn (not ahead of
                    # the tenants it made room for), as a fair preemption's victim does
                    victim.preempted = False
                if victim is seq:
                    break
        items: list[ScheduledItem] = []
        for seq, n, draft in plan:
            if seq.status is not SeqStatus.RUNNING:
                budget += n
                continue
            items.append(ScheduledItem(seq, n, draft))
            self._register(seq, seq.num_cached + n - len(draft))  # drafted tokens are not known to be right
            self.spec_draft_tokens += len(draft)
        if self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            items.extend(self._admit(budget))
        self._yield_to = None
        self._drop_drafts_beside_long_prefills(items)
        return items

    def _new_blocks(self, seq: Sequence, n: int) -> int:
        """New blocks that `n` more tokens of `seq` take beyond those it holds."""
        return max(0, self.pool.blocks_for(seq.num_cached + n) - len(seq.own_blocks))

    def _plan_drafts(self, plan: list[tuple[Sequence, int, list[int]]], budget: int) -> int:
        """Add drafts to the planned decoding rows (in `plan`'s order), once every planned row's own tokens and
        their new blocks are known: a draft takes only blocks beyond all of them (a row planned after the drafting
        one may be mid-prefill and need several), and only the step's budget they leave. No draft where a planned
        chunk is longer than k + 1 tokens (`_drop_drafts_beside_long_prefills` would drop it and keep its blocks).
        The budget left."""
        taken = sum(self._new_blocks(seq, n) for seq, n, _ in plan)
        allowed = all(n <= self.cfg.spec_tokens + 1 for _, n, _ in plan)
        for i, (seq, n, _) in enumerate(plan):
            if n != 1 or seq.to_compute != 1:
                continue
            own = self._new_blocks(seq, 1)
            draft = self._draft(seq, budget + 1, taken - own, allowed)
            if draft:
                plan[i] = (seq, 1 + len(draft), draft)
                taken += self._new_blocks(seq, 1 + len(draft)) - own
                budget -= len(draft)
        return budget

    def _drop_drafts_beside_long_prefills(self, items: list[ScheduledItem]) -> None:
        """Rows verifying a draft are attended with the step's prefill chunks, each padded to the longest chunk's
        length: next to a long prompt chunk a 5-token draft would cost that chunk's attention. Such a step decodes
        those rows plainly (their extra blocks stay theirs for the tokens to come). (The CPU attends every
        multi-token row in a call of its own and a greedy row's drafts as decode rows, so there the drop only gives
        up the drafts' speed; kept for one behaviour on every device.)"""
        if self.cfg.spec_tokens <= 0:
            return
        longest = max((it.num_tokens for it in items if not it.draft), default=1)
        if longest <= self.cfg.spec_tokens + 1:
            return
        for it in items:
            if it.draft:
                self.spec_draft_tokens -= len(it.draft)
                it.num_tokens -= len(it.draft)
                it.draft = []

    def _draft(self, seq: Sequence, budget: int, taken: int = 0, allowed: bool = True) -> list[int]:
        """Speculative tokens for a decoding row (prompt lookup), within the step's budget (its own token
        included), the tokens the request may still produce, the model's positions and the blocks the row holds or
        the pool has free beyond one per running row (what their plain decode steps may need) and the new blocks
        `taken` by the other rows planned this step (`_plan_drafts`): a draft never preempts or evicts anything.
        `allowed`: False counts the step against the row's back-off but drafts nothing."""
        cfg = self.cfg
        if cfg.spec_tokens <= 0 or not speculable(seq.req.sampling):
            return []
        if seq.spec_wait > 0:  # its recent drafts all failed: decode plainly for a while
            seq.spec_wait -= 1
            return []
        if not allowed:
            return []
        k = min(cfg.spec_tokens, budget - 1, seq.req.sampling.max_tokens - len(seq.output) - 1)
        if cfg.max_model_len is not None:
            k = min(k, cfg.max_model_len - seq.prefix_len - seq.num_tokens)
        spare = max(0, self.pool.num_free - taken - len(self.running))
        room = (len(seq.own_blocks) + spare) * self.pool.block_size - seq.num_cached - 1
        k = min(k, room)
        if seq.ngrams is None:
            seq.ngrams = NgramIndex(cfg.spec_min_n, cfg.spec_max_n)
        return seq.ngrams.propose(seq.tokens, k)

    def _admit(
        self,
        budget: int,
        only: Callable[[Sequence], bool] | None = None,
        admitted: list[Sequence] | None = None,
    ) -> list[ScheduledItem]:
        """Admit waiting requests in `_admission_order` while the token budget, the sequence limit and free blocks
        allow; a request whose prefix is still being fetched is passed over, the first that does not fit stops.
        `only`: requests it refuses are passed over too (the engine's async chain admits those it can defer).
        `admitted`: the caller's list, given each request as it is admitted (a caller whose step fails part-way
        through the admissions knows every one to take back: `unadmit`)."""
        items: list[ScheduledItem] = []
        taken: list[Sequence] = []  # sequences leaving the waiting queue
        self._short_of_blocks = None  # (this admission's first request short of blocks, if any)
        # running requests per tenant, as admissions go on
        counts: dict[str | None, int] = self._tenant_rows() if self.cfg.fair else {}

        def fail(seq: Sequence, error: str, error_type: str, entry: PrefixEntry | None = None) -> None:
            """Reported by the engine after the step. `entry`: its prefix, installed for it: no longer held for
            it (nor counted as fetched ahead of use)."""
            seq.error, seq.error_type = error, error_type
            self.failed.append(seq)
            taken.append(seq)
            if entry is not None:
                entry.used = True

        try:
            order = self._admission_order(counts)
            # (checked before the next request is asked for: the walk would otherwise run on past requests it
            # passes over, into the next priority level's preempted requests and their block shares, for nothing)
            while budget > 0 and len(self.running) < self.cfg.max_num_seqs:
                seq = next(order, None)
                if seq is None:
                    break
                if only is not None and not only(seq):
                    continue
                if seq.req.prefix is not None and seq.prefix is None:
                    got = self.prefixes.lookup(seq.req.prefix, count=not seq.prefix_counted)
                    seq.prefix_counted = True
                    if not seq.prefix_claimed:
                        self.prefixes.claim(seq.req.prefix)
                        seq.prefix_claimed = True
                    if isinstance(got, PrefixLoadError):
                        fail(seq, got.message, got.error_type)
                        continue
                    if got is None and self.prefixes.install_fetched(seq.req.prefix):
                        got = self.prefixes.entries[seq.req.prefix]  # (a fair preemption made room)
                    if got is None:
                        if self._short_of_blocks is None and self.prefixes.blocks_wanted(seq.req.prefix):
                            self._short_of_blocks = seq  # fetched, and the pool has no room for it
                        continue  # still being fetched (or installed): others go ahead
                    limit = self.cfg.max_model_len
                    if limit is not None and got.length + len(seq.prompt) > limit:
                        why = f"prefix ({got.length}) + prompt ({len(seq.prompt)}) tokens exceed the context limit of {limit}"
                        fail(seq, why, "RequestTooLarge", got)
                        continue
                    need = len(got.blocks) + self.pool.blocks_for(
                        len(seq.prompt) + seq.req.sampling.max_tokens
                    )
                    if need > self.pool.num_blocks:  # could never run, however long it waited
                        why = (
                            f"prefix ({got.length}) + prompt ({len(seq.prompt)}) + max_tokens "
                            f"({seq.req.sampling.max_tokens}) need {need} KV cache blocks; the cache holds "
                            f"{self.pool.num_blocks}"
                        )
                        fail(seq, why, "RequestTooLarge", got)
                        continue
                    if seq.output and seq.prefix_digest not in (None, got.digest):
                        # preempted after it produced tokens, its prefix's tensors changed meanwhile (the same version
                        # number after a store was emptied): resuming would continue them on other tensors
                        why = "its prefix changed while the request waited to resume; retry"
                        fail(seq, why, "PrefixChanged", got)
                        continue
                    if seq.prefix_digest not in (None, got.digest) and seq.prompt_logprobs is not None:
                        # preempted mid-prefill, before anything was sent: the prompt logprobs computed on the old
                        # tensors are computed again on the new ones (every value a request reports is from one prefix)
                        del seq.prompt_logprobs[1:]
                    self.prefixes.acquire(got)
                    seq.prefix = got
                    seq.prefix_digest = got.digest
                    self._unclaim(seq)
                queried = self._match_cached(seq)
                n = self._chunk(seq, budget)
                if not self._ensure_blocks(seq, n) and not (
                    not self.running and self._release_waiting_prefixes(seq) and self._ensure_blocks(seq, n)
                ):
                    self.free(
                        seq, keep_prefix=self._requeued(seq)
                    )  # its prefix and any cached blocks it took
                    seq.num_cached = 0
                    if self._short_of_blocks is None:
                        self._short_of_blocks = seq
                    break
                # counted once it is admitted (it may wait, and be matched again, many steps first)
                seq.admission = (
                    len(seq.tokens) if queried else 0,
                    seq.num_cached if queried else 0,
                    seq.preempted,
                )
                if seq.admission_counted:
                    seq.admission_counted = False
                else:
                    self.cache_query_tokens += seq.admission[0]
                    self.cache_hit_tokens += seq.admission[1]
                seq.status = SeqStatus.RUNNING
                seq.preempted = False
                self.running.append(seq)
                taken.append(seq)
                if admitted is not None:
                    admitted.append(seq)
                counts[seq.tenant] = counts.get(seq.tenant, 0) + 1
                items.append(ScheduledItem(seq, n))
                self._register(seq, seq.num_cached + n)
                budget -= n
        finally:  # (also when a step fails part-way: what left the queue is not in it twice)
            for seq in taken:
                self.waiting.remove(seq)
        return items

    def _tenant_rows(self) -> dict[str | None, int]:
        """Running rows per tenant."""
        counts: dict[str | None, int] = {}
        for r in self.running:
            counts[r.tenant] = counts.get(r.tenant, 0) + 1
        return counts

    def _num_tenants(self, running: dict[str | None, int]) -> int:
        """Tenants with work: rows running (`running`'s keys) or requests waiting (preempted rows among them)."""
        waiting = self.waiting.tenants()
        return len(waiting) + sum(1 for t in running if t not in waiting)

    def _starved_victim(self) -> Sequence | None:
        """The row to give up its place when every row is taken (`_fair_preempt`), or None.

        Each tenant with work (rows running or requests waiting) has an even share of the rows: `max_num_seqs //
        tenants`, at least 1. Rounded down, the shares fit in the batch together, so while the rows are full a
        tenant below its share means another is above its own (one that could give a row up). The request that a
        freed row would go to (the first ready one in `_admission_order`) gets one if its tenant runs fewer rows
        than its share: the newest row of the tenant furthest above its share (ties: whose row is newer), among its
        rows of a priority value no lower than the request's, of the worst such level. So no tenant is taken below
        its share, none gives up its only row, and a lower priority value never yields to a higher one. Among that
        tenant's rows, the one given up the fewest times so far (then the newest); a row that gave its place up
        `FAIR_PREEMPT_LIMIT` times keeps it (if none is left to give, the request waits for a row to end)."""
        counts = self._tenant_rows()
        share = max(1, self.cfg.max_num_seqs // self._num_tenants(counts))
        if all(c <= share for c in counts.values()):
            return None
        starved = self._first_ready(counts)
        if starved is None or counts.get(starved.tenant, 0) >= share:
            return None
        best: tuple[int, int, int] | None = None
        victim = None
        for r in self._ranked():  # worst priority, then newest, last
            c = counts[r.tenant]
            if c > share and self._may_yield(r, starved):
                key = (r.req.priority, c, -r.fair_preemptions)
                if best is None or key >= best:
                    best, victim = key, r
        return victim

    def _block_starved_victim(self) -> Sequence | None:
        """The row to give up its KV blocks, rows to spare, or None: the waiting request the last admission stopped
        at for want of blocks (`_short_of_blocks`, still the first ready one) is of a tenant whose blocks, with those
        its first chunk takes, stay within its share of the pool (`_block_shares`), and another tenant holds more
        than its own: the last row `_keep_order` places for that excess (its tenant's newest of the worst priority
        level), of a priority value no lower than the request's and given up fewer than `FAIR_PREEMPT_LIMIT` times.
        Without this a tenant's long rows that filled the pool held another tenant's short requests until one of
        them needed a block (111 steps in `benchmarks/bench_fair_steps.py`'s 80-block workload)."""
        seq = self._short_of_blocks
        if seq is None or seq.status is not SeqStatus.WAITING or len(self.running) >= self.cfg.max_num_seqs:
            return None
        need = self.pool.blocks_for(self._chunk(seq, self.cfg.max_num_batched_tokens))
        if seq.req.prefix is not None and seq.prefix is None:  # (its prefix, fetched, waits for blocks too)
            need += self.prefixes.blocks_wanted(seq.req.prefix)
        if need <= self.pool.num_free:
            return None
        # (the cheap checks first: this runs each step while the request stays short)
        shares = self._block_shares()
        if shares is None:
            return None
        held, share = shares
        self._over_block_share(shares)  # (this step's, for `_order_within`: computed once)
        if held.get(seq.tenant, 0) + need > share:
            return None
        # (no row could be the victim: `_keep_order`'s work is spared)
        if not any(held[r.tenant] > share and self._may_yield(r, seq) for r in self.running):
            return None
        if self._first_ready(self._tenant_rows()) is not seq:  # (another request comes first now)
            return None
        keep, over = self._keep_order(shares)
        for r in reversed(keep):
            if id(r) not in over:
                break
            if self._may_yield(r, seq):
                return r
        return None

    @staticmethod
    def _may_yield(r: Sequence, seq: Sequence) -> bool:
        """Whether running row `r` may give its place or its blocks to waiting `seq` (`_starved_victim`,
        `_block_starved_victim`): another tenant's, of a priority value no lower, given up fewer than
        `FAIR_PREEMPT_LIMIT` times."""
        return (
            r.tenant != seq.tenant
            and r.req.priority >= seq.req.priority
            and r.fair_preemptions < FAIR_PREEMPT_LIMIT
        )

    def _fair_preempt(self, victim: Sequence | None) -> None:
        """`victim` (`_starved_victim`, `_block_starved_victim`) gives its place or its blocks to a tenant below its
        share. It is recomputed later and waits its tenant's turn (not ahead of the tenant it made room for).
        Without this, one tenant's flood that filled the batch held every other tenant's requests until its own
        rows ended (each request of a steady tenant beside it, not only its first: the next one finds that tenant
        running)."""
        if victim is None:
            return
        self._preempt(victim)
        victim.preempted = False  # (preempted rows are admitted first: this one waits its tenant's turn)
        victim.fair_preemptions += 1
        self.num_fair_preemptions += 1

    def _passed_over(self, seq: Sequence) -> bool:
        """Whether `_admit` would pass `seq` over without changing anything, and `_ready` refuse it: it has asked
        for its prefix already (claimed it, and so was counted) and asking again would start nothing
        (`PrefixCache.unchanged_miss`: its fetch is under way, or every fetch slot is taken). `_admission_order`
        leaves those out, on this check alone: with many tenants missing the prefix cache they are most of the
        queue, walked every step."""
        key = seq.req.prefix
        return (
            key is not None
            and seq.prefix is None
            and seq.prefix_claimed
            and self.prefixes.unchanged_miss(key)
        )

    def _first_ready(self, counts: dict[str | None, int]) -> Sequence | None:
        """The first request of `_admission_order(counts)` that `_ready` accepts (a lazy walk: fetches start as
        they would walking the order)."""
        return next((s for s in self._admission_order(counts) if self._ready(s)), None)

    def _ready(self, seq: Sequence) -> bool:
        """Whether `seq` could be admitted now as far as its prefix goes (a fetch is started if it is not): resident,
        or fetched and waiting for the blocks to install it (what a fair preemption gives it: `_admit` installs it)."""
        key = seq.req.prefix
        if key is None or seq.prefix is not None:
            return True
        return isinstance(self.prefixes.lookup(key, count=False), PrefixEntry) or bool(
            self.prefixes.blocks_wanted(key)
        )

    def _keep_order(
        self, shares: tuple[dict[str | None, int], int] | None = None
    ) -> tuple[list[Sequence], set[int]]:
        """Running requests in the order they keep their places when the KV pool runs dry: priority (lower value
        first), then age; and the id()s of those placed by their tenant's excess (below).

        `cfg.fair`, with more than one tenant with work: each has an even share of the blocks that rows hold or
        could take (their own blocks, a tenant's shared prompt-cache blocks once, plus the free ones). Within the
        worst priority level the last places go to the rows of tenants above their share, taken in turn from the
        tenant furthest above it, newest first (each row taken counts the blocks it would free off its tenant's
        excess: those no untaken row of its tenant also holds), until no tenant of that level is above its share
        (then the rest by age), or none of the level's rows is left (then the next level the same way). So a tenant
        flooding the pool with long requests loses its own newest rows, not another tenant's just-started ones."""
        ranked = self._ranked()
        if not self.cfg.fair or len(ranked) < 2:
            return ranked, set()
        rows: dict[str | None, list[Sequence]] = {}
        for r in ranked:
            rows.setdefault(r.tenant, []).append(r)
        # (`shares`: the caller's, of the same rows, just computed)
        shares = shares or self._block_shares(rows)
        if shares is None:
            return ranked, set()
        held, share = shares
        excess = {t: h - share for t, h in held.items() if h > share}
        if not excess:
            return ranked, set()
        # taken from the back: the worst level's rows, per tenant (age order); `rest` keeps the untaken in order. A
        # row taken frees the blocks that no other untaken row of its tenant holds (`refs`: a shared prompt-cache
        # block counts once it is its last holder)
        age = {id(r): i for i, r in enumerate(self.running)}
        refs: dict[str | None, Counter[int]] = {t: Counter() for t in excess}
        for t in excess:
            for r in rows[t]:
                refs[t].update(r.own_blocks)
        rest = ranked
        tail: list[Sequence] = []
        while rest:
            level = rest[-1].req.priority
            stacks: dict[str | None, list[Sequence]] = {}
            for r in rest:
                if r.req.priority == level and r.tenant in excess:
                    stacks.setdefault(r.tenant, []).append(r)
            taken: list[Sequence] = []
            while True:
                live = [t for t, st in stacks.items() if st and excess[t] > 0]
                if not live:
                    break
                t = max(live, key=lambda t: (excess[t], age[id(stacks[t][-1])]))
                r = stacks[t].pop()
                taken.append(r)
                held_by = refs[t]
                held_by.subtract(r.own_blocks)
                excess[t] -= sum(1 for b in r.own_blocks if not held_by[b])
            tail.extend(taken)
            gone = {id(r) for r in taken}
            rest = [r for r in rest if id(r) not in gone]
            if not rest or rest[-1].req.priority == level:
                break  # rows of this level within share remain: the rest go by age
        return rest + tail[::-1], {id(r) for r in tail}

    def _block_shares(
        self, rows: dict[str | None, list[Sequence]] | None = None
    ) -> tuple[dict[str | None, int], int] | None:
        """The blocks each tenant's running rows hold (`rows`, default all of them by tenant; a shared prompt-cache
        block counted once) and the even share of them each tenant with work has (those held, plus the free ones,
        split evenly). None without fair scheduling or with fewer than two tenants with work."""
        if not self.cfg.fair:
            return None
        if rows is None:
            rows = {}
            for r in self.running:
                rows.setdefault(r.tenant, []).append(r)
        tenants = self._num_tenants(dict.fromkeys(rows, 0))
        if tenants < 2:
            return None
        held = {t: len(set().union(*(r.own_blocks for r in rs))) for t, rs in rows.items()}
        return held, (sum(held.values()) + self.pool.num_free) // tenants

    def _over_block_share(self, shares: tuple[dict[str | None, int], int] | None = None) -> set[str | None]:
        """The tenants whose rows hold more blocks than their share (`_block_shares`, or the caller's `shares` just
        computed), computed once a step (their preempted rows wait their turn: `_order_within`)."""
        if self._over_share is None:
            shares = shares or self._block_shares()
            self._over_share = {t for t, h in shares[0].items() if h > shares[1]} if shares else set()
        return self._over_share

    def _ranked(self) -> list[Sequence]:
        """Running requests by priority (lower value first), then age: the order they get the step's token budget
        in (and, without fair scheduling, keep their places in when the KV pool runs dry)."""
        running = self.running
        return [running[i] for i in sorted(range(len(running)), key=lambda i: (running[i].req.priority, i))]

    @staticmethod
    def _victim(order: list[Sequence]) -> Sequence:
        """The running request to preempt: the last of `order` (`_keep_order`, fixed for the step) still running."""
        while order[-1].status is not SeqStatus.RUNNING:
            order.pop()
        return order[-1]

    def _admission_order(self, counts: dict[str | None, int]) -> Iterator[Sequence]:
        """Waiting requests in the order they may start: by priority (lower first), and within a priority
        first-come-first-served unless `cfg.fair`: then preempted requests first (they were running; not those of a
        tenant that holds more KV blocks than its share, `_block_shares`: they wait its turn), then tenants take
        turns, the one with the fewest running requests first (ties: whose oldest waiting request came first),
        each tenant's requests in arrival order. So one tenant's burst cannot hold every other tenant's requests
        behind it. `counts` (running per tenant) is read each time a tenant's turn comes round, so the caller's
        admissions count."""
        for level in self.waiting.levels():
            yield from self._order_within(level, counts)

    def _order_within(self, level: int, counts: dict[str | None, int]) -> Iterator[Sequence]:
        """`_admission_order` within one priority value, read from the queue's index (`WaitQueue`): a walk costs
        the tenants running and the requests it visits (yields, or passes over), not the queue's length nor the
        number of tenants waiting. Requests `_passed_over` are left out, checked where they would be yielded (what
        the caller would do with one, nothing, changes nothing: the order of the rest is the same)."""
        waiting = self.waiting
        passed_over = self._passed_over
        if not self.cfg.fair:
            for seq in waiting.in_order(level):
                if not passed_over(seq):
                    yield seq
            return
        skipped: list[Sequence] = []
        first = self._yield_to
        if first is not None and first in waiting and first.req.priority == level:
            if not passed_over(first):
                yield first
            skipped.append(first)
        for seq in waiting.fronts(level):  # (every preempted request is one of them)
            if seq is not first and seq.preempted and seq.tenant not in self._over_block_share():
                if not passed_over(seq):
                    yield seq
                skipped.append(seq)
        # Then each tenant's next request by (its running requests, its place in the queue): a heap of tenants,
        # which those with no running request (the most, with many tenants) join only once their first request's
        # place comes up in `heads` (their key until then), so a walk costs the tenants running and the requests
        # taken, not every tenant waiting. The queues are read as they are walked (nothing changes the waiting
        # queue while an admission order is walked).
        skip = {id(s) for s in skipped}
        touched = {s.tenant for s in skipped}
        by_tenant = waiting.by_tenant(level)
        rest: list[Iterator[Sequence]] = []
        heap: list[tuple[int, int, int, Sequence]] = []

        def join(t: str | None, after: int | None = None) -> None:
            """Tenant `t` joins the heap with its first request not yielded above (nor at or before `after`)."""
            it: Iterator[Sequence] = iter(by_tenant[t])
            if t in touched:
                it = (s for s in it if id(s) not in skip)
            if after is not None:
                it = itertools.dropwhile(lambda s: waiting.pos(s) <= after, it)
            head = next(it, None)
            if head is not None:
                heapq.heappush(heap, (counts.get(t, 0), waiting.pos(head), len(rest), head))
                rest.append(it)

        early = {t for t in counts.keys() & by_tenant.keys() if counts[t] > 0}  # (tenants with rows running)
        heads: Sequence_[tuple[int, str | None]] = waiting.heads(level)
        ahead = sum(waiting.tenant_count(level, t) for t in early)
        if waiting.level_count(level) >= 2 * ahead:
            # Every request of a tenant with no row running comes before any other (its key's count is 0), and
            # those come in queue order: while they are at least half the level, walking the level's own order is
            # cheaper than the heap (with many tenants missing the prefix cache, each has several requests, all
            # passed over). A tenant whose request is admitted here runs a row now: its later requests join the
            # heap below, with the running tenants'.
            admitted: dict[str | None, int] = {}
            for seq in waiting.in_order(level):
                t = seq.tenant
                if t in early or t in admitted or id(seq) in skip or passed_over(seq):
                    continue
                yield seq
                if counts.get(t, 0) > 0:  # (admitted)
                    admitted[t] = waiting.pos(seq)
            for t, p in admitted.items():
                join(t, after=p)
            heads = ()
        # (a tenant with requests passed over above joins at its first request's place: no later than its key's)
        for t in early:
            join(t)
        i = 0
        while True:
            while i < len(heads) and (not heap or (0, heads[i][0]) < heap[0][:2]):
                t = heads[i][1]
                i += 1
                if t not in early:
                    join(t)
            if not heap:
                return
            _, _, k, seq = heapq.heappop(heap)
            if not passed_over(seq):
                yield seq
            after = next(rest[k], None)
            if after is not None:
                heapq.heappush(heap, (counts.get(after.tenant, 0), waiting.pos(after), k, after))

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.free(seq)
        seq.status = SeqStatus.FINISHED
