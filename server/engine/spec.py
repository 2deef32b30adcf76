"""Speculative decoding by prompt lookup: n-gram drafts (vLLM's `ngram` method, TGI's n-gram `--speculate`).

A decoding row whose last n tokens (n from `max_n` down to `min_n`) occurred earlier in its own prompt + output
proposes the up to k tokens that followed that occurrence. The step computes the row's last token and the draft
together (k + 1 positions, like a prefill chunk); the model's greedy choice at each position verifies the draft: the
leading drafted tokens it agrees with are accepted, and its choice after them comes free. Greedy decoding is
unchanged (every emitted token is the model's argmax after the tokens before it), while a row that repeats its
context (summaries, code edits, extraction, JSON with the prompt's values) emits several tokens a step.

A row whose drafts all fail backs off (it decodes 1, 3, 7, then 15 steps without drafting after 1, 2, 3, 4+
failures in a row): on the CPU a draft can push a step's row count into the next GEMM bucket, so failing drafts are
not free. Sampled rows (temperature, top-k, top-p) verify by speculative sampling (`accept_sampled`): the emitted tokens are
distributed exactly as without drafts; requested logprobs come from the verified positions' logits. Not for rows
with penalties, logit_bias, min_tokens or structured outputs (each needs a per-position treatment of the scores
that the verifier does not do).
"""

from __future__ import annotations

import torch

from server.engine.sampler import filter_logits
from server.engine.types import SamplingParams


def speculable(p: SamplingParams) -> bool:
    """Whether a row with these parameters may decode with drafts: its next token comes from the logits alone
    (greedy, or sampled with temperature / top-k / top-p; logprobs are read from the verified positions), no
    per-position score processing, grammar or thinking budget. Not a seeded sampled row: whether a step drafts depends on the other
    rows (the step's budget, free blocks, long prefills beside it), and a draft draws from the row's generator
    differently, so its output would depend on what shares its batch; a seed promises the same output whatever
    does."""
    seeded_sampling = p.seed is not None and p.temperature > 0
    return not p.processed and p.structured is None and p.thinking_budget is None and not seeded_sampling


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
            end = latest.get(tuple(tokens[last - n + 1 :]))
            if end is not None:
                return tokens[end + 1 : end + 1 + k]
        return []


def accept_sampled(
    draft: list[int], logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None
) -> list[int]:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023) with a one-token draft distribution: drafted
    token d at position i is kept with probability p_i(d) (the row's filtered distribution there); the first one
    rejected is replaced by a draw from p_i without d, renormalized; if all are kept, one more token is drawn from
    the last position. The emitted tokens are distributed exactly as plain sampling's (a seeded row is reproducible,
    but its random stream differs from decoding without drafts). `logits`: `[len(draft) + 1, vocab]` float32."""
    dev = logits.device
    for i, d in enumerate(draft):
        probs = filter_logits(logits[i], p).softmax(-1)
        if float(torch.rand((), generator=generator, device=dev)) < float(probs[d]):
            continue
        probs[d] = 0.0  # p(d) < 1 here, so the rest has mass
        return [*draft[:i], int(torch.multinomial(probs, 1, generator=generator))]
    probs = filter_logits(logits[len(draft)], p).softmax(-1)
    return [*draft, int(torch.multinomial(probs, 1, generator=generator))]


def accept(draft: list[int], greedy: list[int]) -> list[int]:
    """Tokens a verified row emits: the drafted tokens the model agrees with, then its own choice after them.
    `greedy[i]` is the model's argmax after the row's input token and `draft[:i]`."""
    a = 0
    while a < len(draft) and draft[a] == greedy[a]:
        a += 1
    return [*draft[:a], greedy[a]]
