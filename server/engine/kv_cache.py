"""Paged KV cache: one preallocated pool of fixed-size blocks, a free list and reference counts.

A sequence's keys/values live in a list of blocks (its block table). A tenant's prefix is copied into blocks once
and those blocks are shared read-only (ref-counted) by every running request of that tenant: the block table of a
request is `prefix blocks + own blocks`. The prefix's last block may be partly filled; the request's own tokens
always start in a fresh block, so shared blocks are never written.

Prompt caching (vLLM's automatic prefix caching, nano-vllm's block manager): a full block of a request's own tokens
can be registered under a key `(parent node, its tokens)`, where the chain starts at a root naming the tenant's cache
salt and prefix version (the same tokens after another prefix or for another tenant never match). Keys are compared
by value (no hash collisions can hand one request another's KV). A registered block whose last user leaves goes to the
end of the free queue still holding its KV: a later request with the same leading tokens takes it back instead of
recomputing; allocation takes the oldest free block first and forgets whatever it held.
"""

from __future__ import annotations

import array
import itertools
from collections import OrderedDict
from collections.abc import Hashable, Iterable

import torch


class OutOfBlocks(Exception):
    pass


def upload_ints(values: list[int], device: torch.device) -> torch.Tensor:
    """Host integers on `device` (int64) without a host sync: on CUDA through pinned memory, since a copy from
    pageable memory waits for the stream to drain (which would stop the host from preparing a step while the previous
    one runs). Through an `array` (a quarter of `torch.tensor`'s time on a list: it runs for every step)."""
    packed = array.array("q", values)
    t = torch.frombuffer(packed, dtype=torch.long) if packed else torch.empty(0, dtype=torch.long)
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


class KVPool:
    """Storage: `data[L, 2, num_blocks * block_size, K, D]` (flat slots; slot = block * block_size + offset)."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        self.device = device
        # +1 block: the last block is a scratch target for padding writes (its first slot); never handed out. Its
        # last slot is never written: the zeros that masked key slots read instead of what they hold (a reused block
        # keeps its old contents, NaN after an overflowed forward, and a masked NaN still turns attention into NaN);
        # a slot more where a block has only one
        slots = (num_blocks + 1) * block_size + int(block_size == 1)
        self.data = torch.zeros(num_layers, 2, slots, num_kv_heads, head_dim, dtype=dtype, device=device)
        self.scratch_slot = num_blocks * block_size
        self.zero_slot = slots - 1
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # oldest first
        self._refs = [0] * num_blocks
        # prompt cache: key -> (block, node id); block -> key (node ids are never reused)
        self._cached: dict[Hashable, tuple[int, int]] = {}
        self._key_of: dict[int, Hashable] = {}
        self._node_ids = itertools.count(1)
        self.cache_evictions = 0

    @staticmethod
    def bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return num_layers * 2 * block_size * num_kv_heads * head_dim * itemsize

    @property
    def block_bytes(self) -> int:
        return self.bytes_per_block(
            self.num_layers, self.num_kv_heads, self.head_dim, self.block_size, self.dtype
        )

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_cached(self) -> int:
        """Blocks holding a registered prompt-cache entry (in use or free)."""
        return len(self._key_of)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"need {n} blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            key = self._key_of.pop(b, None)
            if key is not None:  # its cached KV is about to be overwritten
                del self._cached[key]
                self.cache_evictions += 1
            self._refs[b] = 1
            out.append(b)
        return out

    def free(self, blocks: Iterable[int]) -> None:
        """Drop one reference of each block; a block nobody uses goes to the end of the free queue (a registered
        one keeps its KV until it is allocated again). Free a sequence's blocks last-first, so its tail goes first."""
        for b in blocks:
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free[b] = None
            elif self._refs[b] < 0:  # pragma: no cover - a bug, never silently
                raise RuntimeError(f"block {b} freed twice")

    # ------------------------------------------------------------------ prompt cache
    def lookup(self, key: Hashable) -> tuple[int, int] | None:
        """(block, node id) registered under `key`, or None."""
        return self._cached.get(key)

    def acquire(self, blocks: list[int]) -> None:
        """Take a reference on cached blocks found by `lookup` (taking free ones back out of the free queue)."""
        for b in blocks:
            if self._refs[b] == 0:
                del self._free[b]
            self._refs[b] += 1

    def register(self, block: int, key: Hashable) -> int:
        """Register `block` (a full block of computed KV, in use) under `key`; returns the key's node id. If the key
        is already registered (the same tokens computed by another request meanwhile), that entry is kept."""
        hit = self._cached.get(key)
        if hit is not None:
            return hit[1]
        if block in self._key_of:  # pragma: no cover - a bug: a block's content has one key
            raise RuntimeError(f"block {block} is already registered")
        node = next(self._node_ids)
        self._cached[key] = (block, node)
        self._key_of[block] = key
        return node

    def forget(self, blocks: Iterable[int]) -> set[int]:
        """Unregister `blocks` (their KV was never computed); they stay allocated to whoever holds them. Returns
        the node ids of the keys forgotten."""
        nodes = set()
        for b in blocks:
            key = self._key_of.pop(b, None)
            if key is not None:
                nodes.add(self._cached.pop(key)[1])
        return nodes

    def refcount(self, block: int) -> int:
        return self._refs[block]

    def stage(self, kv: torch.Tensor) -> torch.Tensor:
        """A prefix `kv[L, 2, K, P, D]` ready for `write_prefix`: for a CUDA pool, in the pool's dtype in pinned host
        memory, so that the copy does not wait for the device's queue to drain (one from pageable memory would);
        otherwise `kv` itself. The prefix cache's loader threads stage what they fetch, off the engine thread."""
        if self.device.type != "cuda" or kv.device.type != "cpu":
            return kv
        return kv.to(dtype=self.dtype).contiguous().pin_memory()

    def write_prefix(self, blocks: list[int], kv: torch.Tensor) -> None:
        """Copy a prefix `kv[L, 2, K, P, D]` into `blocks` (P slots, in order); without a host sync if `stage`d."""
        slots = self.slots_of(blocks, kv.shape[3])
        src = kv.to(device=self.device, dtype=self.dtype, non_blocking=True)
        self.data[:, :, slots] = src.permute(0, 1, 3, 2, 4)

    def slots_of(self, blocks: list[int], num_tokens: int) -> torch.Tensor:
        bs = self.block_size
        return upload_ints([b * bs + i for b in blocks for i in range(bs)][:num_tokens], self.device)

    def read(self, blocks: list[int], num_tokens: int) -> torch.Tensor:
        """The `[L, 2, K, T, D]` stored in the first `num_tokens` slots of `blocks` (tests, debugging)."""
        return self.data[:, :, self.slots_of(blocks, num_tokens)].permute(0, 1, 3, 2, 4)
