"""Incremental detokenization with stop strings.

Text is decoded from a sliding window of tokens (as vLLM does) so each step costs O(1) tokens, and incomplete UTF-8
sequences are held back. Text that could still turn into a stop string is held back too, so a client never sees
characters that are later cut.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable
from typing import Any

from server.engine.token_bytes import TokenTexts, fallback_byte, is_byte_fallback

CONTEXT_TOKENS = 6  # prompt tokens decoded before the output: a first token's leading space depends on them
REPLACEMENT = "\ufffd"  # what an incomplete UTF-8 sequence decodes to
# An incomplete character holds back at most 3 bytes, so at most the last 3 (non-empty) tokens: with more tokens
# than this waiting, the text before the last 3 is final (complete characters, or bytes that no later byte can make
# valid), and the window moves on; without it a run of bytes that never completes (a tenant can push a model to
# write lone lead bytes) re-decoded a growing window at every token, quadratic on the engine thread.
MAX_WAITING = 8


def kept_length(before: str, after: str) -> int:
    """How much of `before` (the text of some tokens) the text of those tokens and more (`after`) keeps as it was:
    all of it, except that a prompt ending inside a character decodes to U+FFFD there, and the output tokens that
    complete the character turn it into that character, which is output text."""
    whole = len(before.rstrip(REPLACEMENT))
    n = whole
    while n < len(before) and n < len(after) and after[n] == before[n]:
        n += 1
    return n


_RUST_DECODE: dict[type, bool] = {}


def _rust_decoder(tokenizer) -> Any:
    """The `tokenizers` (Rust) object whose `decode` is exactly what transformers' `decode` does for this tokenizer
    without clean-up (its fast backend's `_decode`, neither overridden), else None: called directly, one token's
    decode costs a third (the engine thread decodes every token twice)."""
    cls = type(tokenizer)
    ok = _RUST_DECODE.get(cls)
    if ok is None:
        try:
            from transformers.tokenization_utils_base import PreTrainedTokenizerBase
            from transformers.tokenization_utils_tokenizers import TokenizersBackend

            ok = cls.decode is PreTrainedTokenizerBase.decode and cls._decode is TokenizersBackend._decode
        except (ImportError, AttributeError):  # another transformers layout: its own decode
            ok = False
        _RUST_DECODE[cls] = ok
    return getattr(tokenizer, "_tokenizer", None) if ok else None


def decode_text(tokenizer, ids: list[int], skip_special_tokens: bool = True, spaces: bool = True) -> str:
    """`ids` as output text: special tokens left out or not (vLLM's skip_special_tokens), spaces between them or
    not (its spaces_between_special_tokens: slow tokenizers only, fast ones ignore it)."""
    rust = _rust_decoder(tokenizer)
    if rust is not None:
        return rust.decode(ids, skip_special_tokens=skip_special_tokens)
    return tokenizer.decode(
        ids,
        skip_special_tokens=skip_special_tokens,
        spaces_between_special_tokens=spaces,
        clean_up_tokenization_spaces=False,
    )


# A ByteFallback decoder (SentencePiece vocabularies with `<0xNN>` byte tokens: Llama 2, Mistral, Gemma) turns every
# byte of a run of byte tokens into U+FFFD when the run is not valid UTF-8 as a whole: a window of tokens decoded from
# the middle of a character, or up to a character not yet complete, lost the characters around it too. Windows start
# at a character's first byte (`char_start`) and an incomplete end is decoded apart (`settled`).


def char_start(tokenizer, ids: list[int], i: int) -> int:
    """`i` moved back over byte fallback tokens that go on a character (at most 3: a character's bytes after its
    first), to the character's first byte."""
    for _ in range(3):
        b = fallback_byte(tokenizer, ids[i]) if 0 < i < len(ids) else None
        if b is None or not 0x80 <= b <= 0xBF:
            break
        i -= 1
    return i


def context(tokenizer, prompt_ids: list[int], byte_fallback: bool) -> list[int]:
    """The prompt tokens decoded before the output: its last CONTEXT_TOKENS, from a character's first byte."""
    start = max(0, len(prompt_ids) - CONTEXT_TOKENS)
    return list(prompt_ids[char_start(tokenizer, prompt_ids, start) if byte_fallback else start :])


def _incomplete_end(tokenizer, ids: list[int]) -> int:
    """How many byte fallback tokens at the end of `ids` are a character begun and not yet complete (0: none)."""
    after = 0
    for t in reversed(ids[-4:]):
        b = fallback_byte(tokenizer, t)
        if b is None:
            return 0
        if 0x80 <= b <= 0xBF:
            after += 1
            continue
        need = 1 if 0xC2 <= b <= 0xDF else 2 if 0xE0 <= b <= 0xEF else 3 if 0xF0 <= b <= 0xF4 else 0
        return after + 1 if after < need else 0
    return 0


def settled(decode: Callable[[list[int]], str], tokenizer, ids: list[int], byte_fallback: bool) -> str:
    """`decode(ids)`, where a character begun and not complete at the end is one U+FFFD after the text before it (as
    a byte-level decoder has it, not a U+FFFD for every byte of its run)."""
    text = decode(ids)
    if byte_fallback and text.endswith(REPLACEMENT) and (k := _incomplete_end(tokenizer, ids)):
        return decode(ids[:-k]) + REPLACEMENT
    return text


def decode_output(
    tokenizer,
    prompt_ids: list[int],
    ids: list[int],
    skip_special_tokens: bool = True,
    spaces: bool = True,
    texts: Any = None,
) -> str:
    """The text of `ids` as they follow the prompt, decoded at once: the same text an `IncrementalDetokenizer` gives
    (SentencePiece-style decoders drop the leading space of whatever they decode first, so the output is decoded
    after the end of the prompt and that part taken off). `texts`: the tokens' `TokenTexts`, as the streamed
    text's detokenizer has them."""

    def decode(t: list[int]) -> str:
        return decode_text(tokenizer, t, skip_special_tokens, spaces)

    fallback = is_byte_fallback(tokenizer)
    ctx = context(tokenizer, prompt_ids, fallback)
    before, whole = settled(decode, tokenizer, ctx, fallback), settled(decode, tokenizer, ctx + ids, fallback)
    if fallback and REPLACEMENT in whole:
        # bytes that are not UTF-8 among byte fallback tokens: the decoder turns their whole run into U+FFFD, so
        # which characters around them survive depends on where a decoded window starts; decoded as a stream is,
        # the text is the stream's (rare: a model writing invalid bytes)
        d = IncrementalDetokenizer(
            tokenizer,
            prompt_ids,
            (),
            skip_special_tokens=skip_special_tokens,
            spaces_between_special_tokens=spaces,
            texts=texts if texts is not None else TokenTexts(tokenizer),
        )
        return "".join(d.add(t)[0] for t in ids) + d.finish()
    if not whole.startswith(before.rstrip(REPLACEMENT)):
        return decode(ids)
    return whole[kept_length(before, whole) :]


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer,
        prompt_ids: list[int],
        stop: tuple[str, ...],
        include_stop: bool = False,
        *,
        min_tokens: int = 0,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        texts: Any = None,
    ) -> None:
        """`min_tokens`: stop strings count only from the token that reaches it on (vLLM's rule: a match must
        take in text of that token or a later one; EOS and stop token ids are banned until then by the sampler).
        `texts`: the tokens' own bytes (`TokenTexts`), by which text ending inside a character is held back; without
        them, text ending in U+FFFD is (so a model that writes U+FFFD itself would be held back to the end)."""
        self.tok = tokenizer
        self.skip_special = skip_special_tokens
        self.spaces = spaces_between_special_tokens
        self.texts = texts
        # the bytes of the text so far: its last character is complete when none are pending
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stop = stop
        self.min_tokens = min_tokens
        self.generated = 0  # tokens added
        self.include_stop = include_stop  # the text ends with the stop string that ended it (else before it)
        self.hold = max((len(s) for s in stop), default=1) - 1
        # context, so the first tokens decode with their spacing
        self.fallback = is_byte_fallback(tokenizer)
        self.ids: list[int] = context(tokenizer, prompt_ids, self.fallback)
        for t in self.ids:
            self._feed(t)
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # all generated text so far (complete characters)
        self.emitted = 0  # characters of self.text already returned to the caller
        self.stopped = False  # a stop string ended the text
        self.stop_string: str | None = None  # the one that did

    def _decode(self, ids: list[int]) -> str:
        return decode_text(self.tok, ids, self.skip_special, self.spaces)

    def _settled(self, ids: list[int]) -> str:
        return settled(self._decode, self.tok, ids, self.fallback)

    def _feed(self, token_id: int) -> None:
        if self.texts is not None and not (self.skip_special and self.texts.dropped(token_id)):
            self._utf8.decode(self.texts.entry(token_id)[1])

    def _complete(self, text: str) -> bool:
        """Whether the text decoded so far ends with a whole character."""
        if self.texts is not None:
            return not self._utf8.getstate()[0]
        return not text.endswith(REPLACEMENT)

    def add(self, token_id: int) -> tuple[str, bool]:
        """Add one token; returns (text delta safe to emit, stop string hit)."""
        self.generated += 1
        if self.texts is not None and self.skip_special and self.texts.dropped(token_id):
            # a token the text leaves out (a special token): no text, and nothing to decode again later (kept in
            # the window, a run of them re-decoded a growing window at every token)
            return self._emit()
        self.ids.append(token_id)
        self._feed(token_id)
        # (the prompt may end inside a character: its text so far ends in U+FFFD)
        prefix_text = self._settled(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        kept = kept_length(prefix_text, new_text)
        end = len(self.ids)
        if not self._complete(new_text):
            if end - self.read_offset <= MAX_WAITING:
                end = -1  # (wait for the character's other bytes)
            else:
                end -= 3  # (the bytes before the last 3 tokens are final; see MAX_WAITING)
                new_text = self._decode(self.ids[self.prefix_offset : end])
                kept = kept_length(prefix_text, new_text)
        if end > 0 and len(new_text) > kept:
            start = len(self.text)
            self.text += new_text[kept:]
            # (the next window starts where this one's new text did, at that character's first byte)
            self.prefix_offset = (
                char_start(self.tok, self.ids, self.read_offset) if self.fallback else self.read_offset
            )
            self.read_offset = end
            if self._cut_at_stop(start):
                return self._flush(), True
        return self._emit()

    def _emit(self) -> tuple[str, bool]:
        safe = max(self.emitted, len(self.text) - self.hold) if self.stop else len(self.text)
        delta = self.text[self.emitted : safe]
        self.emitted = safe
        return delta, False

    def _cut_at_stop(self, start: int) -> bool:
        """Whether the text from `start` on completes a stop string; if so the text ends there."""
        if not self.stop or self.generated < self.min_tokens:
            return False
        # a match ends in the new text (so it takes in text of the min_tokens-th token or a later one); it may
        # straddle the previous text, each stop string by its own length
        hits = [(i, s) for s in self.stop if (i := self.text.find(s, max(0, start - len(s) + 1))) != -1]
        if not hits:
            return False
        i, s = min(hits, key=lambda h: (h[0], -len(h[1])))  # the first; at one place the longest
        self.text = self.text[: i + len(s) if self.include_stop else i]
        self.stopped = True
        self.stop_string = s
        return True

    def _flush(self) -> str:
        delta = self.text[self.emitted :]
        self.emitted = len(self.text)
        return delta

    def finish(self) -> str:
        """Remaining text at the end of generation (an incomplete UTF-8 tail is decoded with replacement). Text held
        back as an incomplete character may hold a stop string: it is cut there too (`stopped` says so)."""
        if self.read_offset < len(self.ids) and not self.stopped:
            prefix_text = self._settled(self.ids[self.prefix_offset : self.read_offset])
            new_text = self._settled(self.ids[self.prefix_offset :])
            start = len(self.text)
            self.text += new_text[kept_length(prefix_text, new_text) :]
            self.read_offset = len(self.ids)
            self._cut_at_stop(start)
        return self._flush()
