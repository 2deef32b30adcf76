"""How a chat template takes a message's content: as one string, or as a list of OpenAI content parts it loops
over (Gemma 3, Llama 4, Mistral 3 write `{% for item in message['content'] %}`). vLLM decides the same way, by
reading the template's syntax tree, and passes parts to the second kind: joined by newlines they would render
differently ("Hello" and "world" are "Helloworld" there, and a template reading `content[0]['text']` would index a
string)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from typing import Any

from jinja2 import nodes

log = logging.getLogger("prefixserve.model")


def _reads(node: nodes.Node, names: set[str], key: str | None = None) -> bool:
    """`node` is one of `names` (or its `key` item/attribute), possibly sliced, filtered or tested."""
    while isinstance(node, (nodes.Filter, nodes.Test)) or (
        isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Slice)
    ):
        if node.node is None:
            return False
        node = node.node
    if key is not None:
        item = isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and node.arg.value == key
        if not (item or (isinstance(node, nodes.Getattr) and node.attr == key)):
            return False
        node = node.node  # type: ignore[attr-defined]
    return isinstance(node, nodes.Name) and node.name in names


def _aliases(root: nodes.Template, name: str) -> set[str]:
    """`name` and every variable assigned from it (`{% set loop_messages = messages[1:] %}`), transitively."""
    names = {name}
    grew = True
    while grew:
        grew = False
        for a in root.find_all(nodes.Assign):
            if isinstance(a.target, nodes.Name) and a.target.name not in names and _reads(a.node, names):
                names.add(a.target.name)
                grew = True
    return names


def _loop_targets(root: nodes.Template, names: set[str], key: str | None = None) -> Iterator[str]:
    for loop in root.find_all(nodes.For):
        if isinstance(loop.target, nodes.Name) and _reads(loop.iter, names, key):
            yield loop.target.name


@functools.lru_cache(maxsize=16)
def loops_over_content(template: str) -> bool:
    """The template iterates over a message's `content` (so takes it as a list of parts). A template that does not
    parse takes strings (rendering it will say what is wrong)."""
    try:  # (transformers' own environment: its extensions, `{% generation %}`, parse; private, so guarded)
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError as e:
        log.warning("cannot read chat templates' content format (%s): every template gets text content", e)
        return False
    try:
        root = _compile_jinja_template(template).environment.parse(template)
    except Exception:
        return False
    message_names = set(_loop_targets(root, _aliases(root, "messages")))
    return bool(message_names) and next(_loop_targets(root, message_names, "content"), None) is not None


class TextParts(str):
    """A chat message's text (its parts joined by newlines, as vLLM joins them for a template that prints
    `message.content`) that keeps the parts, for a template that loops over them (`content_parts`)."""

    parts: tuple[str, ...]

    def __new__(cls, parts: list[str]) -> TextParts:
        text = super().__new__(cls, "\n".join(parts))
        text.parts = tuple(parts)
        return text

    def __reduce__(self) -> tuple[Any, ...]:
        """(copy, deepcopy, pickle: made again from its parts, not its text)"""
        return TextParts, (list(self.parts),)


class NotTextPart(ValueError):
    """A message's content part that is not text (an image, audio, ...); `index`: its place in the content."""

    def __init__(self, message: str, index: int = 0) -> None:
        super().__init__(message)
        self.index = index


def message_text(content: Any) -> str:
    """The text of an OpenAI chat message's content as the chat template takes it: a string as it is (None: ""), a
    list of text parts (`{"type": "text", "text": ...}`) as `TextParts` (any other part: NotTextPart). Every route
    that takes text parts (chat, Responses, Anthropic) passes them this way, so the same parts are the same tokens."""
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for i, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise NotTextPart("only text content parts are supported", i)
        parts.append(part["text"])
    # joined by newlines, as vLLM does ("Hello" + "world" is not "Helloworld"), unless the template loops over them
    return TextParts(parts)


def content_parts(content: Any) -> Any:
    """A message's content as OpenAI text parts: a string's own parts where it keeps them (`TextParts`), else the
    string as one part, "" too (as vLLM's: `continue_final_message` needs a text part to continue)."""
    if not isinstance(content, str):
        return content
    return [{"type": "text", "text": p} for p in getattr(content, "parts", None) or (content,)]
