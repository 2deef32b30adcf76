"""Reasoning models' thinking, split from their answer (vLLM's `--reasoning-parser`): `<think>...</think>`.

A chat completion then carries the thinking as the message's `reasoning_content` (streamed: `reasoning_content`
deltas) and the answer as its `content`, which tool calls are parsed from. Two conventions, as vLLM names them:

- `deepseek_r1`: the chat template opens the thinking (DeepSeek-R1, its distills, Qwen3 "Thinking" models): the
  output starts inside it, a leading `<think>` is dropped, and an output without `</think>` is all thinking (cut
  short while thinking). So do vLLM's `olmo3`, `step3` and `minimax_m2` (their models write only the closing tag),
  and `seed_oss` with Seed-OSS's `<seed:think>...</seed:think>`.
- `qwen3`: the model opens it itself (Qwen3 hybrid models): an output that starts with `<think>` (after whitespace,
  if any) thinks until `</think>`; one that does not (`enable_thinking: false`) is all answer. So does `glm45`.

The whole output is split by running the stream over it, so a streamed answer and an unstreamed one are the same.

Under a structured output (a response format, vLLM's `structured_outputs`, a forced tool call), the grammar applies
to the answer: the model thinks freely first (`ReasoningParser.think_mode`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from server.engine.thinking import MAX_LEAD
from server.engine.types import ThinkMode

START, END = "<think>", "</think>"


@dataclass(frozen=True)
class Convention:
    """A model family's thinking: its tags, and whether the output starts inside it (the template opened it)."""

    start: str = START
    end: str = END
    opened: bool = True


CONVENTIONS = {
    "deepseek_r1": Convention(),
    "qwen3": Convention(opened=False),
    "glm45": Convention(opened=False),
    "olmo3": Convention(),
    "step3": Convention(),
    "minimax_m2": Convention(),
    "seed_oss": Convention("<seed:think>", "</seed:think>"),
}
PARSERS = tuple(CONVENTIONS)


def _held(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a start of `tag` (held back: it may be the tag, cut)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def prompt_opened(tail: str, start: str = START, end: str = END) -> bool | None:
    """What the end of a prompt says of the output's start: True, it is inside a thinking the prompt opened (a
    template that opens it: R1, Qwen3 Thinking); False, the prompt closed it (`enable_thinking: false` writes an empty
    `<think></think>`; a continued assistant message past its thinking); None, it says nothing."""
    opened, closed = tail.rfind(start), tail.rfind(end)
    if opened < 0 and closed < 0:
        return None
    return opened > closed


class ReasoningStream:
    """Follows one output: `feed` gives the (thinking, answer) text that can be sent so far."""

    def __init__(
        self, starts_thinking: bool, answering: bool = False, start: str = START, end: str = END
    ) -> None:
        self.state = (
            "answer" if answering else "start"
        )  # start (the opening tag may come) | thinking | answer
        self.starts_thinking = starts_thinking
        self.start, self.end = start, end
        self.buf = ""
        self.thought = False  # it entered the thinking

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        self.buf += text
        thinking, answer = [], []
        while True:
            if self.state == "start":  # (whitespace before the opening tag: vLLM's parsers take it too)
                lead = self.buf.lstrip()
                if len(self.buf) - len(lead) > MAX_LEAD:  # not an opening: no waiting on an endless blank run
                    lead = self.buf
                if self.start.startswith(lead) and not final:
                    break  # maybe the opening tag, cut
                if lead.startswith(self.start):
                    self.buf, self.state = lead[len(self.start) :], "thinking"
                else:
                    self.state = "thinking" if self.starts_thinking else "answer"
                self.thought = self.state == "thinking"
            elif self.state == "thinking":
                at = self.buf.find(self.end)
                if at >= 0:
                    thinking.append(self.buf[:at])
                    self.buf, self.state = self.buf[at + len(self.end) :], "answer"
                    continue
                keep = 0 if final else _held(self.buf, self.end)
                thinking.append(self.buf[: len(self.buf) - keep])
                self.buf = self.buf[len(self.buf) - keep :]
                break
            else:
                answer.append(self.buf)
                self.buf = ""
                break
        return "".join(thinking), "".join(answer)


class ReasoningParser:
    def __init__(self, name: str) -> None:
        if name not in CONVENTIONS:
            raise ValueError(f"unknown reasoning parser {name!r}: use one of {', '.join(PARSERS)}")
        self.name = name
        self.convention = c = CONVENTIONS[name]
        self.start, self.end = c.start, c.end

    def prompt_opened(self, tail: str) -> bool | None:
        """`prompt_opened` with this parser's tags."""
        return prompt_opened(tail, self.start, self.end)

    def stream(self, opened: bool | None = None) -> ReasoningStream:
        """A stream for one output; `opened`: what its prompt says (`prompt_opened`), None for the parser's own
        convention."""
        if opened is False:
            return ReasoningStream(False, answering=True, start=self.start, end=self.end)
        return ReasoningStream(opened is True or self.convention.opened, start=self.start, end=self.end)

    def hidden_tags(self, tokenizer: Any) -> list[str]:
        """The tags that are the tokenizer's special tokens: decoding with skip_special_tokens (the default) drops
        them, and the parser, which reads the text, cannot see them."""
        special = set(getattr(tokenizer, "all_special_tokens", None) or [])
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        special |= {t.content for t in added.values() if getattr(t, "special", False)}
        return [tag for tag in (self.start, self.end) if tag in special]

    def think_mode(self, opened: bool | None = None) -> ThinkMode | None:
        """How a constrained output may think before its grammar's answer, as `stream` follows it: from inside the
        thinking, possibly from a `<think>`, or not at all (the prompt closed the thinking)."""
        if opened is False:
            return None
        return "opened" if opened is True or self.convention.opened else "optional"

    def split(self, text: str, opened: bool | None = None) -> tuple[str | None, str | None]:
        """(thinking, answer) of a finished output; None where there is none (an answer of only thinking: null
        content, as vLLM's)."""
        stream = self.stream(opened)
        thinking, answer = stream.feed(text, final=True)
        if not stream.thought:
            return None, answer
        return thinking, (answer or None) if stream.state == "answer" else None


def get_reasoning_parser(name: str) -> ReasoningParser | None:
    """The parser of the `reasoning_parser` setting ('none': None)."""
    return None if name == "none" else ReasoningParser(name)
