"""A request's state inside the engine."""

from __future__ import annotations

import enum
import time

import torch

from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.prefix_cache import PrefixEntry, prompt_cache_root
from server.engine.spec import NgramIndex
from server.engine.structured import Constraint
from server.engine.thinking import ThinkingState
from server.engine.token_bytes import TokenTexts
from server.engine.types import Request, TokenLogprob


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(
        self,
        req: Request,
        tokenizer,
        generator: torch.Generator | None,
        constraint: Constraint | None = None,
        texts: TokenTexts | None = None,
    ) -> None:
        self.req = req
        self.request_id = req.request_id
        self.tenant = req.tenant  # (read often by the fair scheduler; a request's tenant does not change)
        self.prompt = list(req.prompt_token_ids)
        self.output: list[int] = []
        self.status = SeqStatus.WAITING
        self.preempted = False  # waits to resume: admitted before requests that never ran
        self.fair_preemptions = 0  # times it gave its row to a tenant below its share (`FAIR_PREEMPT_LIMIT`)
        self.prefix: PrefixEntry | None = None
        self.prefix_digest: str | None = None  # the tensors it first ran on (`PrefixEntry.digest`)
        self.own_blocks: list[int] = []
        self.num_cached = 0  # own tokens (prompt + output) whose KV is in the pool
        self.cached_prompt_tokens = 0  # prompt tokens taken from the prompt cache when first scheduled
        # prompt cache: the node ids of its full own blocks so far (their chain hangs off `cache_root`)
        self.cache_nodes: list[int] = []
        self.generator = generator
        self.constraint = constraint  # structured outputs: the grammar's state after the output so far
        # a thinking budget: where the output stands against it
        budget = req.sampling.thinking_budget
        self.thinking = ThinkingState(budget, texts or TokenTexts(tokenizer)) if budget is not None else None
        # speculative decoding: the n-grams of its tokens (built on first use), drafts in a row of which nothing was
        # accepted, and steps to decode without drafting (2^misses - 1 after a miss, at most 15)
        self.ngrams: NgramIndex | None = None
        self.spec_misses = 0
        self.spec_wait = 0
        self.detok = (
            IncrementalDetokenizer(
                tokenizer,
                self.prompt,
                req.sampling.stop,
                req.sampling.include_stop_str_in_output,
                min_tokens=req.sampling.min_tokens,
                skip_special_tokens=req.sampling.skip_special_tokens,
                spaces_between_special_tokens=req.sampling.spaces_between_special_tokens,
                texts=texts,
            )
            if (req.sampling.stop or req.stream_text)
            else None
        )
        self.stop_reason: str | int | None = None  # the stop string or stop token id that ended it
        self.arrival = time.monotonic()
        self.first_scheduled: float | None = None
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.itl: list[float] = []  # the gaps between the steps that gave it tokens
        self.prefix_counted = False
        self.prefix_claimed = False  # a claim on its prefix in the prefix cache (asked for, not yet taken)
        # at its last admission: (prompt-cache query tokens, hit tokens) counted, and whether it was preempted
        self.admission: tuple[int, int, bool] = (0, 0, False)
        # its last admission was undone (`Scheduler.unadmit`) after being counted: the next one is not counted again
        # (the prompt-cache counters are Prometheus counters: they never go down)
        self.admission_counted = False
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.error_type: str | None = None
        self.aborted = False
        # prompt tokens whose log-probability is known (first token: None); filled during prefill when asked for
        self.prompt_logprobs: list[TokenLogprob | None] | None = (
            [None] if req.sampling.prompt_logprobs is not None else None
        )

    @property
    def cache_root(self) -> tuple[object, ...]:
        """The root of its prompt-cache key chain (see `prompt_cache_root`): known once it holds its prefix."""
        return prompt_cache_root(self.req.cache_salt, self.prefix)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def prefix_len(self) -> int:
        return self.prefix.length if self.prefix is not None else 0

    @property
    def to_compute(self) -> int:
        """Own tokens not yet in the cache (prompt during prefill, 1 when decoding)."""
        return self.num_tokens - self.num_cached
