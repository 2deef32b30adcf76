"""Per-request sampling: greedy rows vectorized, sampled rows with their own seeded generator.

A request's generator is seeded from its `seed` (or a random one), so the same seed gives the same tokens whatever
else shares the batch.
"""

from __future__ import annotations

import torch

from server.engine.types import SamplingParams


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    return g


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, top-k then top-p (nucleus) on one row of float32 logits."""
    logits = logits / p.temperature
    vocab = logits.shape[-1]
    if 0 < p.top_k < vocab:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        cum = probs.cumsum(-1)
        remove = cum - probs > p.top_p  # keep the smallest set whose mass reaches top_p
        remove[0] = False
        logits = logits.masked_fill(torch.zeros_like(remove).scatter(0, order, remove), float("-inf"))
    return logits


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> tuple[list[int], dict[int, str]]:
    """logits: float32 `[R, vocab]`; one token per row, and the rows that could not be sampled with the reason.

    A row whose logits are not finite (a prefix or input that overflows) or whose sampling fails is reported on its
    own: the other rows of the batch are unaffected, so one tenant's request can never fail its neighbours'.
    """
    both = torch.stack([logits.argmax(-1), torch.isfinite(logits).all(-1).long()]).tolist()  # one device sync
    out, finite = both[0], both[1]
    failed = {
        i: "the model produced non-finite logits for this request" for i, ok in enumerate(finite) if not ok
    }
    for i, p in enumerate(params):
        if p.greedy or i in failed:
            continue
        try:
            probs = filter_logits(logits[i], p).softmax(-1)
            out[i] = int(torch.multinomial(probs, 1, generator=generators[i]).item())
        except RuntimeError as e:
            failed[i] = f"sampling failed: {e}"
    return out, failed
