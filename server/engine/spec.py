"""Speculative decoding by prompt lookup: n-gram drafts (vLLM's `ngram` method, TGI's n-gram `--speculate`).

A decoding row whose last n tokens (n from `max_n` down to `min_n`) occurred earlier in its own prompt + output
proposes the up to k tokens that followed that occurrence. The step computes the row's last token and the draft
together (k + 1 positions, like a prefill chunk); the model's greedy choice at each position verifies the draft: the
leading drafted tokens it agrees with are accepted, and its choice after them comes free. Greedy decoding is
unchanged (every emitted token is the model's argmax after the tokens before it), while a row that repeats its
context (summaries, code edits, extraction, JSON with the prompt's values) emits several tokens a step.

A row whose drafts all fail backs off (it decodes 1, 3, 7, then 15 steps without drafting after 1, 2, 3, 4+
failures in a row): on the CPU a draft can push a step's row count into the next GEMM bucket, so failing drafts are
not free. Only rows whose next token is a plain argmax draft: greedy, no penalties, logit_bias or min_tokens, no logprobs, no
structured outputs (each needs a per-position treatment the verifier does not do).
"""

from __future__ import annotations

from server.engine.types import SamplingParams


def speculable(p: SamplingParams) -> bool:
    """Whether a row with these parameters may decode with drafts (its next token is the logits' argmax)."""
    return p.greedy and not p.processed and p.logprobs is None and p.structured is None


class NgramIndex:
    """Every n-gram of one sequence's tokens (n in [min_n, max_n]) -> where its latest occurrence ends, built as the
    sequence grows (each position is indexed once)."""

    __slots__ = ("_latest", "_upto", "max_n", "min_n")

    def __init__(self, min_n: int, max_n: int) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError("need 1 <= min_n <= max_n")
        self.min_n, self.max_n = min_n, max_n
        self._latest: dict[tuple[int, ...], int] = {}
        self._upto = 0  # n-grams ending before this position are indexed

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest matching suffix, or []."""
        last = len(tokens) - 1
        latest = self._latest
        # index the n-grams ending before the last token (the suffix itself is what we look up)
        for e in range(self._upto, last):
            for n in range(self.min_n, min(self.max_n, e + 1) + 1):
                latest[tuple(tokens[e - n + 1 : e + 1])] = e
        self._upto = max(self._upto, last)
        if k <= 0:
            return []
        for n in range(min(self.max_n, last), self.min_n - 1, -1):
            e = latest.get(tuple(tokens[last - n + 1 :]))
            if e is not None:
                return tokens[e + 1 : e + 1 + k]
        return []


def accept(draft: list[int], greedy: list[int]) -> list[int]:
    """Tokens a verified row emits: the drafted tokens the model agrees with, then its own choice after them.
    `greedy[i]` is the model's argmax after the row's input token and `draft[:i]`."""
    a = 0
    while a < len(draft) and draft[a] == greedy[a]:
        a += 1
    return [*draft[:a], greedy[a]]
