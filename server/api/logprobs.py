r"""Token log-probabilities in the three response formats: /generate, OpenAI completions (legacy) and OpenAI chat.

The engine reports ids and numbers (`TokenLogprob`); here they get their text. A token is reported by its own bytes
(byte-level BPE tokens mapped back to bytes, SentencePiece `<0xNN>` byte tokens, otherwise `tokenizer.decode([id])`
with special tokens kept). A token holding only part of a multi-byte character is not valid UTF-8 on its own: its
text is then `bytes:\xe2\x80` (OpenAI's convention), so different partial tokens never collapse into one U+FFFD key,
and the chat format carries the exact bytes.
"""

from __future__ import annotations

import codecs
import math
from collections.abc import Callable, Iterable
from typing import Any

from server.engine import TokenLogprob
from server.engine.token_bytes import TokenTexts

FLOOR = -9999.0  # what a log-probability of -inf is reported as (JSON has no infinities; vLLM does the same)


def finite_logprob(x: float) -> float:
    return x if math.isfinite(x) else FLOOR


def generate_logprobs(lps: Iterable[TokenLogprob], text: Callable[[int], str]) -> list[dict[str, Any]]:
    return [
        {
            "id": lp.token_id,
            "text": text(lp.token_id),
            "logprob": finite_logprob(lp.logprob),
            "top_logprobs": [{"id": t, "text": text(t), "logprob": finite_logprob(v)} for t, v in lp.top],
        }
        for lp in lps
    ]


def generate_prompt_logprobs(
    lps: list[TokenLogprob | None] | None, text: Callable[[int], str]
) -> list[dict[str, Any] | None] | None:
    """/generate's `prompt_logprobs`: the engine's per prompt token entries (None for the first) in its format."""
    if lps is None:
        return None
    return [None if lp is None else generate_logprobs([lp], text)[0] for lp in lps]


def vllm_prompt_logprobs(
    lps: list[TokenLogprob | None] | None, k: int, text: Callable[[int], str]
) -> list[dict[str, dict[str, Any]] | None] | None:
    """vLLM's `prompt_logprobs` of the /v1 routes: per prompt token (None for the first), token id (as a string) ->
    {logprob, rank, decoded_token} for the prompt's token and the k most likely there."""
    if lps is None:
        return None
    out: list[dict[str, dict[str, Any]] | None] = []
    for lp in lps:
        if lp is None:
            out.append(None)
            continue
        entry = {
            str(lp.token_id): {
                "logprob": finite_logprob(lp.logprob),
                "rank": lp.rank,
                "decoded_token": text(lp.token_id),
            }
        }
        for rank, (t, v) in enumerate(lp.top[:k], 1):
            entry.setdefault(str(t), {"logprob": finite_logprob(v), "rank": rank, "decoded_token": text(t)})
        out.append(entry)
    return out


class TextOffsets:
    """Where each token of a choice starts in its text, in characters (the legacy format's `text_offset`): the
    complete characters of all the bytes before it. A token holding the rest of a character split across tokens
    starts where that character does, and a `bytes:\\xNN` token counts the characters it adds to the text, not the
    length of its spelling. With `skip_special` an output token the text leaves out (a special token) adds nothing;
    echoed prompt tokens are shown whole."""

    def __init__(self, texts: TokenTexts, skip_special: bool = True) -> None:
        self._texts = texts
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.chars = 0
        self.skip_special = skip_special

    def take(self, token_id: int, prompt: bool = False) -> int:
        at = self.chars
        if prompt or not (self.skip_special and self._texts.dropped(token_id)):
            self.chars += len(self._decoder.decode(self._texts.entry(token_id)[1]))
        return at


def completion_logprobs(
    lps: list[TokenLogprob],
    text: TokenTexts,
    offsets: TextOffsets,
    first_token: int | None = None,
    prompt: bool = False,
) -> dict[str, Any]:
    """OpenAI legacy format; `offsets` follows the choice's text across calls (a stream's chunks, echo then
    output). `first_token`: echoed prompts start with a token nothing predicts, reported with null
    log-probabilities; `prompt`: these are (echoed) prompt tokens."""
    tokens: list[str] = []
    starts: list[int] = []
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    entries: list[tuple[int, TokenLogprob | None]] = [(first_token, None)] if first_token is not None else []
    entries += [(lp.token_id, lp) for lp in lps]
    for token_id, lp in entries:
        t = text(token_id)
        tokens.append(t)
        starts.append(offsets.take(token_id, prompt))
        if lp is None:
            values.append(None)
            tops.append(None)
            continue
        top = {text(i): finite_logprob(v) for i, v in lp.top}
        top.setdefault(
            t, finite_logprob(lp.logprob)
        )  # OpenAI: the sampled token is always there (up to N+1 entries)
        values.append(finite_logprob(lp.logprob))
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": starts}


def chat_logprobs(lps: Iterable[TokenLogprob], texts: TokenTexts) -> dict[str, Any]:
    def entry(token_id: int, value: float) -> dict[str, Any]:
        t, raw = texts.entry(token_id)
        return {"token": t, "logprob": finite_logprob(value), "bytes": list(raw)}

    return {
        "content": [
            {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top]} for lp in lps
        ]
    }
