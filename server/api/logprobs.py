r"""Token log-probabilities in the three response formats: /generate, OpenAI completions (legacy) and OpenAI chat.

The engine reports ids and numbers (`TokenLogprob`); here they get their text. A token is reported by its own bytes
(byte-level BPE tokens mapped back to bytes, SentencePiece `<0xNN>` byte tokens, otherwise `tokenizer.decode([id])`
with special tokens kept). A token holding only part of a multi-byte character is not valid UTF-8 on its own: its
text is then `bytes:\xe2\x80` (OpenAI's convention), so different partial tokens never collapse into one U+FFFD key,
and the chat format carries the exact bytes.
"""

from __future__ import annotations

import codecs
import json
import math
import re
from collections.abc import Callable, Iterable
from typing import Any

from server.engine import TokenLogprob

FLOOR = -9999.0  # what a log-probability of -inf is reported as (JSON has no infinities; vLLM does the same)
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_table() -> dict[str, int]:
    """GPT-2's reversible byte <-> printable character map (used by every byte-level BPE tokenizer)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {b: b for b in keep}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return {chr(c): b for b, c in chars.items()}


def _is_byte_level(tokenizer: Any) -> bool:
    try:
        decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder")
    except Exception:  # a slow tokenizer, or none of the expected attributes
        return False
    return '"ByteLevel"' in json.dumps(decoder)


class TokenTexts:
    """id -> (text, bytes) of one token, cached: the vocabulary is finite and the same tokens come back."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self._cache: dict[int, tuple[str, bytes]] = {}
        self._special = {int(i) for i in getattr(tokenizer, "all_special_ids", None) or []}
        self._byte_table = _byte_level_table() if _is_byte_level(tokenizer) else None

    def _bytes(self, token_id: int) -> bytes:
        piece = self._tok.convert_ids_to_tokens(token_id)
        if piece is None:  # an id past the tokenizer's vocabulary (padded embedding rows)
            return b""
        if token_id not in self._special:
            if m := _BYTE_TOKEN.fullmatch(piece):
                return bytes([int(m.group(1), 16)])
            table = self._byte_table
            if table is not None and all(ch in table for ch in piece):
                return bytes(table[ch] for ch in piece)
        text = self._tok.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return text.encode("utf-8")

    def entry(self, token_id: int) -> tuple[str, bytes]:
        hit = self._cache.get(token_id)
        if hit is None:
            raw = self._bytes(token_id)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            hit = self._cache[token_id] = (text, raw)
        return hit

    def __call__(self, token_id: int) -> str:
        return self.entry(token_id)[0]

    def piece(self, token_id: int) -> str:
        """The token decoded alone, part of a character as U+FFFD (TGI's token text), not in `bytes:` notation."""
        return self.entry(token_id)[1].decode("utf-8", errors="replace")


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
    length of its spelling."""

    def __init__(self, texts: TokenTexts) -> None:
        self._texts = texts
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.chars = 0

    def take(self, token_id: int) -> int:
        at = self.chars
        self.chars += len(self._decoder.decode(self._texts.entry(token_id)[1]))
        return at


def completion_logprobs(
    lps: list[TokenLogprob], text: TokenTexts, offsets: TextOffsets, first_token: int | None = None
) -> dict[str, Any]:
    """OpenAI legacy format; `offsets` follows the choice's text across calls (a stream's chunks, echo then
    output). `first_token`: echoed prompts start with a token nothing predicts, reported with null
    log-probabilities."""
    tokens, starts, values, tops = [], [], [], []
    entries: list[tuple[int, TokenLogprob | None]] = [(first_token, None)] if first_token is not None else []
    entries += [(lp.token_id, lp) for lp in lps]
    for token_id, lp in entries:
        t = text(token_id)
        tokens.append(t)
        starts.append(offsets.take(token_id))
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
