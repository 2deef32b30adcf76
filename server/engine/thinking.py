"""A thinking budget (vLLM's `thinking_token_budget`): a reasoning model writes at most N tokens inside its
thinking; then its closing tag is forced, token by token, and the answer follows.

The thinking is followed on the output's bytes (each token's own, `TokenTexts`), the way the reasoning parser
(`server.api.reasoning.ReasoningStream`) follows the text, so the two always agree whatever tokens spell a tag (on
SmolLM2 `</think>` and ` </think>` share no token): an output opens a thinking only with the opening tag at its start
(after up to MAX_LEAD whitespace bytes), or starts inside one its prompt or template opened
(`ThinkingBudget.opened`); the first closing tag ends it, and nothing after that is thinking. Once N tokens were
written inside it, the closing tag is forced from where the output already is in it (a model that began the tag
itself is not made to write it twice). The engine takes a forced token whatever the logits say; its log-probability
is still the model's. A budget spent in the middle of a character (a byte-level BPE splits most non-ASCII characters
over tokens) lets the model finish the character first, at most MAX_OVERSHOOT tokens more: a grammar that follows
the output (thinking before a structured answer) takes no `<` after a character's first byte.
"""

from __future__ import annotations

from typing import Any

from server.engine.token_bytes import TokenTexts
from server.engine.types import ThinkingBudget

MAX_LEAD = 64  # whitespace that may come before an opening tag (bytes here, characters in the parser: ASCII)
MAX_OVERSHOOT = (
    3  # tokens past the budget that finish a cut character (each adds at least one of its 3 last bytes)
)


def cut_character(data: bytes) -> bool:
    """Whether `data` ends inside a UTF-8 character (its first byte and fewer than all of the rest)."""
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if b & 0xC0 != 0x80:  # not a continuation byte: the character's first byte (or ASCII)
            need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 else 1
            return back < need
    return False


class ThinkingState:
    """One output's place against its budget: before / inside / after its thinking, and its tokens inside."""

    __slots__ = ("budget", "buf", "count", "end", "forcing", "start", "state", "texts")

    def __init__(self, budget: ThinkingBudget, texts: TokenTexts) -> None:
        self.budget = budget
        self.texts = texts
        self.start, self.end = budget.start.encode(), budget.end.encode()
        self.state = "thinking" if budget.opened else "start"  # start | thinking | answer
        self.count = budget.spent if budget.opened else 0  # tokens written inside the thinking
        self.buf = (
            b""  # start: the output's bytes so far; thinking: its last bytes (a closing tag may be cut)
        )
        self.forcing: list[int] = []  # the closing tag's tokens still to force

    def feed(self, token: int) -> None:
        """The output's next token."""
        if self.forcing:
            self.forcing = self.forcing[1:] if self.forcing[0] == token else []
        if self.state == "answer":
            return
        self.buf += self.texts.entry(token)[1]
        if self.state == "start":
            lead = self.buf.lstrip()
            if len(self.buf) - len(lead) > MAX_LEAD:
                lead = self.buf
            if not lead.startswith(self.start):
                if not self.start.startswith(lead):
                    self.state = "answer"
                return  # (else maybe the opening tag, cut)
            self.state, self.buf = "thinking", lead[len(self.start) :]
        else:
            self.count += 1
        if self.end in self.buf:
            self.state, self.forcing = "answer", []
        else:
            self.buf = self.buf[-max(len(self.end) - 1, 3) :]  # (3: the start of a cut character)

    def forced(self) -> int | None:
        """The token the output must take next (the closing tag's next one once the budget is spent), or None."""
        if self.state != "thinking" or self.count < self.budget.tokens:
            return None
        if not self.forcing:
            if cut_character(self.buf) and self.count < self.budget.tokens + MAX_OVERSHOOT:
                return None
            # the longest end of the output that is a start of the closing tag (shorter than the whole tag)
            k = next(
                (
                    k
                    for k in range(min(len(self.end) - 1, len(self.buf)), 0, -1)
                    if self.buf.endswith(self.end[:k])
                ),
                0,
            )
            rest = self.budget.rest
            self.forcing = list(rest[k] if k < len(rest) and rest[k] else rest[0])
        return self.forcing[0]


def closing_tag_rest(tokenizer: Any, tag: str) -> tuple[tuple[int, ...], ...]:
    """A closing tag's token ids from each of its bytes on (`ThinkingBudget.rest`: what is forced where the output
    already ends with the tag's first k bytes; () where k splits a character)."""
    raw = tag.encode()
    out = []
    for k in range(len(raw)):
        try:
            piece = raw[k:].decode()
        except UnicodeDecodeError:
            out.append(())
            continue
        out.append(tuple(tokenizer.encode(piece, add_special_tokens=False)))
    return tuple(out)


def tokens_after_tag(texts: TokenTexts, ids: list[int], tag: bytes, most: int = 4096) -> int:
    """How many tokens of `ids` come after the token that ends the last `tag` in their bytes (the prompt's own
    thinking so far), looking at the last `most` tokens; 0 where there is none."""
    follow = b""  # the bytes after the token looked at, as many as can complete a tag starting in it
    for j in range(len(ids) - 1, max(-1, len(ids) - 1 - most), -1):
        own = texts.entry(ids[j])[1]
        window = own + follow
        at = window.rfind(tag)
        if 0 <= at < len(own):  # (the last tag: none started in the tokens after this one)
            t, reached = j, len(own)
            while reached < at + len(tag):  # the token in which the tag ends
                t += 1
                reached += len(texts.entry(ids[t])[1])
            return len(ids) - 1 - t
        follow = window[: len(tag) - 1]
    return 0
