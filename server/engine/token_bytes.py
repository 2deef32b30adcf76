"""Each token's own bytes and text: byte-level BPE tokens mapped back to bytes, SentencePiece `<0xNN>` byte tokens,
otherwise `tokenizer.decode([id])` with special tokens kept. The engine's detokenizer tells a complete character from
part of one by them; the API reports log-probabilities' tokens by them."""

from __future__ import annotations

import json
import re
from typing import Any

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


def _decoder(tokenizer: Any) -> str:
    """The fast tokenizer's decoder as JSON text ("" for a slow tokenizer, or none of the expected attributes)."""
    try:
        decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder")
    except Exception:
        return ""
    return json.dumps(decoder, ensure_ascii=False)


_FALLBACK: dict[int, tuple[Any, bool]] = {}


def is_byte_fallback(tokenizer: Any) -> bool:
    """A SentencePiece-style decoder with byte fallback (Llama 2, Mistral, Gemma: `<0xNN>` tokens), which turns
    every byte of a run of byte tokens into U+FFFD when the run is not valid UTF-8 as a whole."""
    hit = _FALLBACK.get(id(tokenizer))
    if hit is None or hit[0] is not tokenizer:
        if len(_FALLBACK) > 64:  # (tokenizers of models loaded and dropped, e.g. by tests)
            _FALLBACK.clear()
        hit = _FALLBACK[id(tokenizer)] = (tokenizer, '"ByteFallback"' in _decoder(tokenizer))
    return hit[1]


def _piece_byte(piece: object) -> int | None:
    """The byte a byte fallback token's piece `<0xNN>` stands for, else None."""
    m = _BYTE_TOKEN.fullmatch(piece) if isinstance(piece, str) else None
    return None if m is None else int(m.group(1), 16)


def fallback_byte(tokenizer: Any, token_id: int) -> int | None:
    """The byte of a byte fallback token `<0xNN>`, else None."""
    return _piece_byte(tokenizer.convert_ids_to_tokens(token_id))


class TokenTexts:
    """id -> (text, bytes) of one token, cached: the vocabulary is finite and the same tokens come back."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self._cache: dict[int, tuple[str, bytes]] = {}
        self._dropped: dict[int, bool] = {}
        self._special = {int(i) for i in getattr(tokenizer, "all_special_ids", None) or []}
        try:  # added tokens are spelled as they are decoded (their text is their own, no "▁" for a space)
            self._added = frozenset(tokenizer.get_added_vocab())
        except Exception:
            self._added = frozenset()
        decoder = _decoder(tokenizer)
        self._byte_table = _byte_level_table() if '"ByteLevel"' in decoder else None
        # SentencePiece's "▁" for a space (Llama 2, Mistral, Gemma): its decoder drops the space that starts the
        # text it decodes, so a token decoded alone ("▁Paris": "Paris") would lose the space it has in any text
        self._metaspace = "▁" in decoder

    def _bytes(self, token_id: int) -> bytes:
        piece = self._tok.convert_ids_to_tokens(token_id)
        if piece is None:  # an id past the tokenizer's vocabulary (padded embedding rows)
            return b""
        if token_id not in self._special:
            if (b := _piece_byte(piece)) is not None:
                return bytes([b])
            table = self._byte_table
            if table is not None and all(ch in table for ch in piece):
                return bytes(table[ch] for ch in piece)
            if self._metaspace and piece not in self._added:
                return piece.replace("▁", " ").encode("utf-8")
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

    def dropped(self, token_id: int) -> bool:
        """The token has text of its own but `decode(..., skip_special_tokens=True)` leaves it out (a special
        token, or an added token marked special)."""
        hit = self._dropped.get(token_id)
        if hit is None:
            shown = self._tok.decode([token_id], skip_special_tokens=True, clean_up_tokenization_spaces=False)
            # (decoded alone: "▁" of a SentencePiece vocabulary is "" either way, and is text)
            kept = self._tok.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            hit = self._dropped[token_id] = shown == "" and kept != ""
        return hit


class TokenIdTexts(TokenTexts):
    """vLLM's `return_tokens_as_token_ids`: each token spelled `token_id:N` (its bytes stay its own), for clients
    that need the ids of tokens whose texts do not tell them apart."""

    def __init__(self, texts: TokenTexts) -> None:  # (no cache of its own: the spelling is the id's)
        self._texts = texts

    def entry(self, token_id: int) -> tuple[str, bytes]:
        return f"token_id:{token_id}", self._texts.entry(token_id)[1]

    def dropped(self, token_id: int) -> bool:
        return self._texts.dropped(token_id)
