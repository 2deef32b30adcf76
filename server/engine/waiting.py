"""The scheduler's queue of waiting requests, indexed by priority and tenant so that a step's admission order costs
the tenants running and the requests it visits, not the queue's length nor the number of tenants waiting.

Requests join at the back (`append`: new ones) or at the front (`appendleft`: preempted or un-admitted rows, which
were running), and leave from anywhere (`remove`: admitted, aborted). Every request sits in three orderings at once:
the whole queue, its priority level, and its tenant within its level; each is an `_Ends`: two insertion-ordered
dicts, the front one read backwards, so each of those operations is O(1) (reading a view's first request is
amortized O(1): a dict passes over the slots of removed entries until it next resizes) and the order of every view is
the order the requests would have in one deque. Per level, the tenants are also kept sorted by the place of their first
request (`heads`; O(log tenants) to find, a memmove to insert), which is what lets the fair order visit only the
tenants it serves (`Scheduler._order_within`).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Iterable, Iterator, KeysView, Mapping
from collections.abc import Sequence as Sequence_

from server.engine.sequence import Sequence


class _Ends:
    """An ordered set of requests with O(1) append, appendleft and removal (keyed by identity)."""

    __slots__ = ("back", "front")

    def __init__(self) -> None:
        self.front: dict[int, Sequence] = {}  # appendleft's, newest first when read backwards
        self.back: dict[int, Sequence] = {}

    def __len__(self) -> int:
        return len(self.front) + len(self.back)

    def __iter__(self) -> Iterator[Sequence]:
        return itertools.chain(reversed(self.front.values()), self.back.values())

    def append(self, seq: Sequence) -> None:
        self.back[id(seq)] = seq

    def appendleft(self, seq: Sequence) -> None:
        self.front[id(seq)] = seq

    def remove(self, seq: Sequence) -> None:
        if self.front.pop(id(seq), None) is None:
            del self.back[id(seq)]

    def head(self) -> Sequence:
        if self.front:
            return next(reversed(self.front.values()))
        return next(iter(self.back.values()))


class WaitQueue:
    """Waiting requests in order (iterating gives the order of one deque that took the same appends), with each
    priority level's and each tenant's requests in that order (`in_order`, `by_tenant`, `heads`) and the tenants waiting
    (`tenants`) at hand. `pos(seq)` orders requests of different tenants: smaller is nearer the front."""

    def __init__(self, marked: Callable[[Sequence], bool] | None = None) -> None:
        """`marked`: a fixed property of a request (decided when it joins) whose holders `marked()` lists."""
        self._is_marked = marked
        self._marked: dict[int, Sequence] = {}
        self._all = _Ends()
        self._levels: dict[int, _Ends] = {}
        self._tenants: dict[int, dict[str | None, _Ends]] = {}  # priority -> tenant -> its requests
        self._per_tenant: dict[str | None, int] = {}  # requests waiting per tenant (all levels)
        self._pos: dict[int, int] = {}  # id -> position: appends count up from 0, appendlefts down from -1
        # per priority: (position of its first request, tenant) of each tenant waiting, sorted
        self._heads: dict[int, list[tuple[int, str | None]]] = {}
        self._next_back = 0
        self._next_front = -1

    def __len__(self) -> int:
        return len(self._all)

    def __bool__(self) -> bool:
        return len(self._all) > 0

    def __iter__(self) -> Iterator[Sequence]:
        return iter(self._all)

    def __contains__(self, seq: object) -> bool:
        return id(seq) in self._pos

    def append(self, seq: Sequence) -> None:
        self._add(seq, front=False)

    def appendleft(self, seq: Sequence) -> None:
        self._add(seq, front=True)

    def _add(self, seq: Sequence, front: bool) -> None:
        if id(seq) in self._pos:
            raise ValueError(f"request {seq.request_id} is already waiting")
        if front:
            self._pos[id(seq)] = self._next_front
            self._next_front -= 1
        else:
            self._pos[id(seq)] = self._next_back
            self._next_back += 1
        level, tenant = seq.req.priority, seq.tenant
        mine = self._tenants.setdefault(level, {}).setdefault(tenant, _Ends())
        heads = self._heads.setdefault(level, [])
        if front or not mine:  # the tenant's first request now
            if mine:
                self._drop_head(heads, self.pos(mine.head()), tenant)
            bisect.insort(heads, (self._pos[id(seq)], tenant))
        for e in (self._all, self._levels.setdefault(level, _Ends()), mine):
            (e.appendleft if front else e.append)(seq)
        if self._is_marked is not None and self._is_marked(seq):
            self._marked[id(seq)] = seq
        self._per_tenant[tenant] = self._per_tenant.get(tenant, 0) + 1

    @staticmethod
    def _drop_head(heads: list[tuple[int, str | None]], pos: int, tenant: str | None) -> None:
        i = bisect.bisect_left(heads, (pos,))
        assert heads[i] == (pos, tenant)
        del heads[i]

    def remove(self, seq: Sequence) -> None:
        """Take `seq` out (ValueError if it is not waiting)."""
        pos = self._pos.pop(id(seq), None)
        if pos is None:
            raise ValueError(f"request {seq.request_id} is not waiting")
        level, tenant = seq.req.priority, seq.tenant
        self._marked.pop(id(seq), None)
        self._all.remove(seq)
        by_level = self._levels[level]
        by_level.remove(seq)
        if not by_level:
            del self._levels[level]
        tenants = self._tenants[level]
        mine = tenants[tenant]
        first = mine.head() is seq
        mine.remove(seq)
        heads = self._heads[level]
        if first:
            self._drop_head(heads, pos, tenant)
            if mine:
                bisect.insort(heads, (self._pos[id(mine.head())], tenant))
        if not mine:
            del tenants[tenant]
            if not tenants:
                del self._tenants[level]
                del self._heads[level]
        left = self._per_tenant[tenant] - 1
        if left:
            self._per_tenant[tenant] = left
        else:
            del self._per_tenant[tenant]

    def pos(self, seq: Sequence) -> int:
        return self._pos[id(seq)]

    def levels(self) -> list[int]:
        """The priority values waiting, lowest (first served) first."""
        return sorted(self._levels)

    def heads(self, priority: int) -> Sequence_[tuple[int, str | None]]:
        """(position of its first request, tenant) of each tenant with a request of this priority value, in queue
        order of those first requests: a live view (read, do not keep, while the queue changes)."""
        return self._heads.get(priority, [])

    def by_tenant(self, priority: int) -> Mapping[str | None, Iterable[Sequence]]:
        """Each tenant's requests of one priority value, each iterable in queue order, tenants in no particular
        order: live views, not copies (iterating one while the queue changes raises RuntimeError)."""
        return self._tenants.get(priority, {})

    def in_order(self, priority: int) -> Iterator[Sequence]:
        """The requests of one priority value in queue order: a live view (iterating it while the queue changes
        raises RuntimeError)."""
        ends = self._levels.get(priority)
        return iter(ends) if ends is not None else iter(())

    def level_count(self, priority: int) -> int:
        """Requests of one priority value waiting."""
        ends = self._levels.get(priority)
        return len(ends) if ends is not None else 0

    def tenant_count(self, priority: int, tenant: str | None) -> int:
        """Requests of one priority value and tenant waiting."""
        ends = self._tenants.get(priority, {}).get(tenant)
        return len(ends) if ends is not None else 0

    def fronts(self, priority: int) -> list[Sequence]:
        """The requests of one priority value that joined at the front (preempted or un-admitted rows), in queue
        order: a preempted request is always one of them."""
        ends = self._levels.get(priority)
        return [*reversed(ends.front.values())] if ends is not None else []

    def marked(self) -> Iterable[Sequence]:
        """The waiting requests `marked` accepted, in no particular order (a live view)."""
        return self._marked.values()

    def tenants(self) -> KeysView[str | None]:
        """The tenants with a request waiting (a live view)."""
        return self._per_tenant.keys()
