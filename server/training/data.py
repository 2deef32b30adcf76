"""Tokenization of training examples and mini-batches (right-padded, prompt tokens masked out of the loss)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from server.model import render_prompt
from server.training.config import TrainingLimits, TrainingValidationError

IGNORE = -100


@dataclass(frozen=True)
class EncodedExample:
    input_ids: tuple[int, ...]  # rendered prompt + completion (+ eos)
    prompt_len: int  # the first prompt_len tokens carry no loss

    @property
    def completion_len(self) -> int:
        return len(self.input_ids) - self.prompt_len


def eos_token_id(bundle: Any) -> int | None:
    tok_eos = getattr(bundle.tokenizer, "eos_token_id", None)
    if tok_eos is not None:
        return int(tok_eos)
    ids = bundle.spec.eos_token_ids
    return int(ids[0]) if ids else None


_SENTINEL = "\n"  # text a completion is tokenized after (see `completion_ids`)


def completion_ids(tok: Any, text: str) -> list[int]:
    """The tokens of a completion as the model writes it after a prompt: tokenized after a newline whose tokens are
    then taken off. Tokenized on its own, SentencePiece vocabularies (Llama 2, Mistral, Gemma: "▁" for a space, put
    in front of any text they tokenize alone) gave " Paris" an extra "▁" and "Paris" a space it never had, and
    a prefix trained on them wrote that space. On its own where the newline's tokens do not come off whole."""
    head = list(tok(_SENTINEL, add_special_tokens=False)["input_ids"])
    after = list(tok(_SENTINEL + text, add_special_tokens=False)["input_ids"])
    if head and after[: len(head)] == head and len(after) > len(head):
        return after[len(head) :]
    return list(tok(text, add_special_tokens=False)["input_ids"])


def encode_examples(
    bundle: Any,
    examples: list[dict[str, str]],
    prompt_format: str,
    prefix_length: int,
    *,
    append_eos: bool = True,
    limits: TrainingLimits | None = None,
) -> list[EncodedExample]:
    """The prompt exactly as the server renders it (``server.model.render_prompt``), then the completion's tokens as
    the model writes them after it (``completion_ids``) and the tokenizer's eos (``<|im_end|>`` for ChatML)."""
    limits = limits or TrainingLimits()
    tok = bundle.tokenizer
    eos = eos_token_id(bundle) if append_eos else None
    positions = min(bundle.spec.max_positions, limits.max_positions or bundle.spec.max_positions)
    if prefix_length >= positions:
        raise TrainingValidationError(
            f"prefix_length {prefix_length} leaves no room for a prompt: this server serves at most {positions} "
            "positions (prefix + prompt + output)",
            param="prefix_length",
        )
    most = limits.max_prefix_positions
    if most is not None and prefix_length > most:
        raise TrainingValidationError(
            f"prefix_length {prefix_length} leaves no room for a prompt in this server's KV cache: its blocks hold a "
            f"prefix of at most {most} positions beside a request (kv_cache_mb raises it)",
            param="prefix_length",
        )
    max_len = min(limits.max_example_tokens, positions - prefix_length)
    out: list[EncodedExample] = []
    total = 0
    for i, ex in enumerate(examples):
        try:
            prompt_ids = render_prompt(tok, ex["prompt"], prompt_format)
        except ValueError as e:
            raise TrainingValidationError(str(e), param="hyperparameters.prompt_format") from None
        if not prompt_ids:
            # nothing before the completion: its first token would predict nothing (no target), and no request
            # can send an empty prompt either
            raise TrainingValidationError(
                f"examples[{i}].prompt is empty: with the {prompt_format!r} prompt format it needs at least one token",
                param=f"examples[{i}].prompt",
            )
        comp_ids = completion_ids(tok, ex["completion"])
        if not comp_ids:
            raise TrainingValidationError(
                f"examples[{i}].completion has no tokens", param=f"examples[{i}].completion"
            )
        if eos is not None and all(t == eos for t in comp_ids):
            # ("<|im_end|>" as text is the end-of-sequence token: the example taught the model to answer nothing)
            raise TrainingValidationError(
                f"examples[{i}].completion is only the end-of-sequence token (the server adds it after each "
                "completion); give the text to learn",
                param=f"examples[{i}].completion",
            )
        if eos is not None:
            comp_ids.append(eos)
        ids = tuple(int(t) for t in prompt_ids + comp_ids)
        if len(ids) > max_len:
            raise TrainingValidationError(
                f"examples[{i}] is {len(ids)} tokens long; the limit is {max_len} "
                f"(with a prefix of {prefix_length} positions, of {positions} served)",
                param=f"examples[{i}]",
            )
        total += len(ids)
        if total > limits.max_total_tokens:
            raise TrainingValidationError(
                f"the examples exceed {limits.max_total_tokens} tokens in total", param="examples"
            )
        out.append(EncodedExample(ids, len(prompt_ids)))
    return out


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] (padding: pad id)
    attention_mask: torch.Tensor  # [B, T] 1 for real tokens
    labels: torch.Tensor  # [B, T] token id where it is a completion token, else IGNORE
    common: int = 0  # leading tokens shared by every row (all prompt tokens, before the last prompt token)


def common_prefix_length(examples: list[EncodedExample]) -> int:
    """How many leading tokens all rows share, kept below every row's last prompt token (whose output predicts
    the first completion token), so the shared part carries no loss."""
    limit = min(e.prompt_len for e in examples) - 1
    first = examples[0].input_ids
    n = 0
    while n < limit and all(e.input_ids[n] == first[n] for e in examples[1:]):
        n += 1
    return max(n, 0)


def collate(
    examples: list[EncodedExample],
    pad_id: int,
    device: torch.device | str = "cpu",
    *,
    share_common: bool = True,
) -> Batch:
    t = max(len(e.input_ids) for e in examples)
    b = len(examples)
    ids = torch.full((b, t), pad_id, dtype=torch.long)
    mask = torch.zeros((b, t), dtype=torch.long)
    labels = torch.full((b, t), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        row = torch.tensor(e.input_ids, dtype=torch.long)
        ids[i, :n] = row
        mask[i, :n] = 1
        labels[i, e.prompt_len : n] = row[e.prompt_len :]
    common = common_prefix_length(examples) if share_common else 0
    return Batch(ids.to(device), mask.to(device), labels.to(device), common)


def pad_token_id(bundle: Any) -> int:
    tok = bundle.tokenizer
    for cand in (getattr(tok, "pad_token_id", None), eos_token_id(bundle)):
        if cand is not None:
            return int(cand)
    return 0
