"""How models write tool calls, for `tool_choice: "auto"` (vLLM's `--tool-call-parser`).

Each parser finds the calls a model wrote in its output and says where, in a stream, text could be the start of
one (so it is held back instead of sent as content):

- ``hermes``: ``<tool_call>{"name", "arguments"}</tool_call>`` blocks anywhere in the text (Qwen2.5/3, Hermes, many
  fine-tunes);
- ``llama3_json``: the output is one or more ``{"name", "parameters"}`` objects separated by ``;``, after the
  ``<|python_tag|>`` special token or without it (Llama 3.1 / 3.2 JSON tool calling);
- ``mistral``: ``[TOOL_CALLS]`` then a JSON list of ``{"name", "arguments"}`` (the marker is a special token that
  decoding drops, so a bare list at the start of the output counts too);
- ``pythonic``: the output is a Python list of calls, ``[get_weather(city="Paris"), get_time()]`` (Llama 3.2 / 4
  pythonic, ToolACE), read with ``ast`` (literals only; nothing is evaluated);
- ``qwen3_coder``: ``<tool_call><function=NAME><parameter=P>value</parameter>...</function></tool_call>`` blocks
  anywhere in the text (Qwen3-Coder); each value is read by its parameter's type in the tool's schema (a string
  stays text; a number, boolean, object or array is parsed);
- ``granite``: ``<|tool_call|>`` then a JSON list of ``{"name", "arguments"}`` (IBM Granite 3; the marker may be
  dropped by decoding, as mistral's);
- ``phi4_mini_json``: ``functools`` then a JSON list of ``{"name", "arguments"}`` (Phi-4-mini).

Only calls of the request's tools count; anything that does not parse stays content. ``detect`` picks the parser
a chat template was written for (``auto``, the default setting): the tokens the template itself tells the model
to write.
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

Calls = list[tuple[str, Any]]  # (function name, arguments as a JSON value)
# the request's tools: their names, or (what ToolPlan gives) a mapping of each name to its parameters' JSON schema
Tools = Collection[str]
PARSERS = ("hermes", "llama3_json", "mistral", "pythonic", "qwen3_coder", "granite", "phi4_mini_json")

HERMES_TAG = "<tool_call>"
HERMES_END = "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
MISTRAL_TAG = "[TOOL_CALLS]"
GRANITE_TAG = "<|tool_call|>"
GRANITE_TAGS = (GRANITE_TAG, HERMES_TAG)
PHI4_TAG = "functools"


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number out of range: {text[:32]}")
    return value


def _not_a_number(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# JSON as strict clients read it: NaN/Infinity are not JSON, and a number past a double's range (`1e999`, legal JSON
# a grammar's number allows) would be read as infinity, which no JSON answer can carry
_DECODER = json.JSONDecoder(parse_float=_finite, parse_constant=_not_a_number)


def loads(text: str) -> Any:
    """`json.loads`, refusing (ValueError) what a strict client could not read back: NaN, Infinity, and numbers
    with a fraction or exponent out of a double's range (read as infinity; integers stay exact, as JSON writes
    them)."""
    return _DECODER.decode(text)


def _tag_prefix_at_end(text: str, tag: str) -> int:
    """How many trailing characters of `text` could start `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def _args(obj: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        if k in obj:
            return obj[k]
    return {}


# ------------------------------------------------------------------------------------------------ hermes
def _tool_call_blocks(text: str) -> Iterator[tuple[int, int, str]]:
    """(start, end, body without its surrounding whitespace) of each `<tool_call>...</tool_call>` block of a
    finished output; the last may be left open (a model that ends after its call: vLLM's parsers take it). Found
    with `str.find`, in one pass: a regular expression with whitespace around a lazy body backtracks quadratically
    over a long blank run."""
    at = 0
    while (i := text.find(HERMES_TAG, at)) >= 0:
        body = i + len(HERMES_TAG)
        j = text.find(HERMES_END, body)
        if j < 0:
            yield i, len(text), text[body:].strip()
            return
        yield i, j + len(HERMES_END), text[body:j].strip()
        at = j + len(HERMES_END)


def _blocks_split(text: str, names: Tools, read: Callable[[str, Tools], Calls | None]) -> tuple[str, Calls]:
    """The calls `read` finds in each `<tool_call>` block (None: the block is text), and the text around them."""
    calls: Calls = []
    kept, last = [], 0
    for start, end, body in _tool_call_blocks(text):
        found = read(body, names)
        if found is None:
            continue
        calls += found
        kept.append(text[last:start])
        last = end
    return "".join(kept) + text[last:], calls


def _named(obj: Any, names: Tools) -> bool:
    """`obj` is a call object of one of the tools (a name that is not a string is no tool's: a list or an object
    there could not even be looked up)."""
    return isinstance(obj, dict) and isinstance(obj.get("name"), str) and obj["name"] in names


def _hermes_call(body: str, names: Tools) -> Calls | None:
    """A hermes block's `{"name", "arguments"}` of a known tool, or None."""
    try:
        obj = loads(body)
    except (ValueError, RecursionError):  # RecursionError: nesting too deep
        return None
    if not _named(obj, names):
        return None
    return [(obj["name"], _args(obj, "arguments", "parameters"))]


def _hermes_split(text: str, names: Tools) -> tuple[str, Calls]:
    return _blocks_split(text, names, _hermes_call)


def _hermes_hold(text: str) -> int:
    tag = text.find(HERMES_TAG)
    return tag if tag >= 0 else len(text) - _tag_prefix_at_end(text, HERMES_TAG)


# ------------------------------------------------------------------------------------------------ start-anchored
# a start-anchored call begins within this much whitespace: past it, an output is text (so a stream never re-reads
# an endless blank run at every token)
MAX_LEAD = 64
_LEAD_WS = re.compile(r"\s*")


def _lead(text: str, tags: tuple[str, ...]) -> tuple[str, str]:
    """(the leading whitespace, the body after it and any of `tags`); past MAX_LEAD whitespace, (the text, "")."""
    n = _LEAD_WS.match(text, 0, MAX_LEAD + 1).end()  # type: ignore[union-attr]
    if n > MAX_LEAD:
        return text, ""
    ws, body = text[:n], text[n:]
    for tag in tags:
        if body.startswith(tag):
            body = body[len(tag) :].lstrip()
    return ws, body


def _start_hold(text: str, tags: tuple[str, ...], opener: str) -> int:
    """Start-anchored formats: everything is held from the first non-space character when the output begins as a
    call could (one of the `opener` characters, a tag, or a prefix of a tag); else nothing is. Looks at the first
    MAX_LEAD + 1 characters only."""
    i = _LEAD_WS.match(text, 0, MAX_LEAD + 1).end()  # type: ignore[union-attr]
    if i > MAX_LEAD:
        return len(text)
    rest = text[i : i + max(map(len, tags), default=1)]
    if not rest:
        return i
    if rest[0] in opener or any(rest.startswith(t) or t.startswith(rest) for t in tags):
        return i
    return len(text)


def _json_objects(body: str) -> list[Any] | None:
    """`{...}; {...}` (semicolons or whitespace between), or None if anything else is there."""
    dec = _DECODER
    out: list[Any] = []
    i = 0
    while True:
        while i < len(body) and body[i] in " \t\r\n;":
            i += 1
        if i >= len(body):
            return out or None
        try:
            obj, i = dec.raw_decode(body, i)
        except (ValueError, RecursionError):  # RecursionError: nesting too deep
            return None
        out.append(obj)


def _llama3_split(text: str, names: Tools) -> tuple[str, Calls]:
    ws, body = _lead(text, (PYTHON_TAG,))
    objs = _json_objects(body)
    if not objs or not all(_named(o, names) for o in objs):
        return text, []
    return ws, [(o["name"], _args(o, "parameters", "arguments")) for o in objs]


def _json_list_split(*tags: str, required: bool = False) -> Callable[[str, Tools], tuple[str, Calls]]:
    """One of `tags` (that decoding may have dropped, unless `required`: a text marker) then a JSON list of
    `{"name", "arguments"}` (or one such object)."""
    return lambda text, names: _list_split(text, names, tags, required)


def _marked_list_split(tag: str, required: bool = False) -> Callable[[str, Tools], tuple[str, Calls]]:
    """As `_json_list_split`, and the text marker `tag` after some text begins the calls too (vLLM's mistral and
    phi4_mini_json parsers look for it anywhere): the text before it is content."""

    def split(text: str, names: Tools) -> tuple[str, Calls]:
        outside, calls = _list_split(text, names, (tag,), required)
        if calls:
            return outside, calls
        i = text.find(tag, 1)
        while i > 0:  # (the marker may be mentioned in text before the calls: each is tried)
            after, calls = _list_split(text[i:], names, (tag,), True)
            if calls:
                return text[:i] + after, calls
            i = text.find(tag, i + 1)
        return text, []

    return split


def _marked_hold(tag: str, opener: str) -> Callable[[str], int]:
    """`_start_hold`, and from the marker `tag` (or what could begin it at the end) wherever it is."""

    def hold(text: str) -> int:
        i = text.find(tag)
        return min(
            _start_hold(text, (tag,), opener), i if i >= 0 else len(text) - _tag_prefix_at_end(text, tag)
        )

    return hold


def _list_split(text: str, names: Tools, tags: tuple[str, ...], required: bool = False) -> tuple[str, Calls]:
    ws, body = _lead(text, tags)
    if required and len(ws) + len(body) == len(text):  # no marker
        return text, []
    try:
        calls, end = _DECODER.raw_decode(body)
    except (ValueError, RecursionError):  # RecursionError: nesting too deep
        return text, []
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list) or not calls:
        return text, []
    if not all(_named(c, names) for c in calls):
        return text, []
    return ws + body[end:].strip(), [(c["name"], _args(c, "arguments", "parameters")) for c in calls]


def _literal(node: ast.expr) -> Any:
    value = ast.literal_eval(node)  # literals only: strings, numbers, lists, dicts, True/False/None
    json.dumps(value, allow_nan=False)  # and JSON-representable (no tuples of sets, bytes, `1e999`, ...)
    return value


def _pythonic_split(text: str, names: Tools) -> tuple[str, Calls]:
    ws, body = _lead(text, (PYTHON_TAG,))
    body = body.strip()
    if not body.startswith("["):
        return text, []
    try:
        tree = ast.parse(body, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return text, []
    if not isinstance(tree.body, ast.List) or not tree.body.elts:
        return text, []
    calls: Calls = []
    for node in tree.body.elts:
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in names):
            return text, []
        if node.args or any(k.arg is None for k in node.keywords):
            return text, []  # keyword arguments only, as the format has them
        try:
            calls.append((node.func.id, {k.arg: _literal(k.value) for k in node.keywords}))
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
            return text, []
    return ws, calls


# ------------------------------------------------------------------------------------------------ qwen3_coder
# one block may hold several functions; the last one may be left open
# (names are bounded: an unclosed `<parameter=` ran its name to the text's end at each one, quadratic)
_QWEN3_FUNCTION = re.compile(
    r"\s*<function=([^>\n]{1,256})>(.*?)(?:</function>|(?=<function=)|\Z)\s*", re.DOTALL
)
# a value ends at its closing tag, or (a model that left it out) at the next parameter or the function's end
_QWEN3_PARAMETER = re.compile(
    r"<parameter=([^>\n]{1,256})>(.*?)(?:</parameter>|(?=<parameter=)|\Z)", re.DOTALL
)


def _qwen3_value(raw: str, schema: Any) -> Any:
    """A parameter's text read by its type in the tool's schema: a string (or a parameter the schema does not
    describe) stays text; numbers, booleans, null, objects and arrays are parsed, and stay text if they do not."""
    value = raw[1:] if raw.startswith("\n") else raw
    value = value[:-1] if value.endswith("\n") else value
    types = schema.get("type") if isinstance(schema, dict) else None
    types = [types] if isinstance(types, str) else [t for t in types or [] if isinstance(t, str)]
    kinds = [t for t in types if t != "null"]
    if not kinds or "string" in kinds:
        return value
    if value.strip().lower() in ("null", "none"):  # (as vLLM's parser reads it for any type but a string)
        return None
    text = value.strip()
    for kind in kinds:
        if kind == "boolean" and text.lower() in ("true", "false"):
            return text.lower() == "true"
        if kind in ("integer", "number"):
            try:
                return int(text)
            except ValueError:
                pass
            if kind == "number":
                try:
                    number = float(text)
                except ValueError:
                    continue
                if math.isfinite(number):
                    return number
        if kind in ("object", "array"):
            try:
                parsed = loads(text)
            except (ValueError, RecursionError):
                try:
                    parsed = _literal(ast.parse(text, mode="eval").body)
                except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
                    continue
            if isinstance(parsed, dict if kind == "object" else list):
                return parsed
    return value


def _qwen3_functions(body: str, names: Tools) -> Calls | None:
    """The calls of one block's functions (every one of a known tool, nothing else in the block), or None."""
    calls: Calls = []
    at = 0
    while at < len(body):
        f = _QWEN3_FUNCTION.match(body, at)
        if f is None or f.end() == at or (name := f.group(1).strip()) not in names:
            return None
        at = f.end()
        schema = names.get(name) if isinstance(names, Mapping) else None
        props = schema.get("properties") if isinstance(schema, dict) else None
        props = props if isinstance(props, dict) else {}
        args = {}
        for p in _QWEN3_PARAMETER.finditer(f.group(2)):
            key = p.group(1).strip()
            args[key] = _qwen3_value(p.group(2), props.get(key))
        calls.append((name, args))
    return calls or None


def _qwen3_coder_split(text: str, names: Tools) -> tuple[str, Calls]:
    return _blocks_split(text, names, _qwen3_functions)


# ------------------------------------------------------------------------------------------------ registry
Item = tuple[str, Any]  # ("content", text) or ("call", (name, arguments)), in output order


class ToolParser:
    def __init__(
        self,
        name: str,
        split: Callable[[str, Tools], tuple[str, Calls]],
        hold: Callable[[str], int],
        *,
        blocks: bool = False,
        short_ids: bool = False,
        marker_is_special: bool = False,
    ) -> None:
        self.name = name
        self._split = split
        self._hold = hold
        # the model's chat template takes only 9-character alphanumeric call ids (Mistral's: vLLM makes them so)
        self.short_ids = short_ids
        # its marker is a special token that decoding drops by default: "auto" requests decode with special tokens
        # (vLLM's mistral parser turns skip_special_tokens off), or a call after some text would be lost
        self.marker_is_special = marker_is_special
        self.blocks = (
            blocks  # calls are closed blocks anywhere in the text (hermes): each is final once closed
        )

    def split(self, text: str, names: Tools) -> tuple[str, Calls]:
        """(the text outside the calls, the calls of known tools) of a finished output; the outside text begins
        with whatever of the output precedes the first call (what a stream may already have sent)."""
        return self._split(text, names)

    def hold_from(self, text: str) -> int:
        """In a stream: the text from this index on may be (the start of) a call, so it waits."""
        return self._hold(text)


class AutoStream:
    """tool_choice "auto" in a stream: what of the output can be sent so far, in output order. Text goes as soon
    as it cannot be the start of a call; with a block format (hermes) each call goes as soon as its block closes
    (and text after it streams again); with the formats that are the whole output, the calls go at the end.
    What `feed` returns over a whole output is what `ToolParser.split` makes of it (the same calls, the same text),
    except blank runs: whitespace alone before a call, between calls or after the last is not content (it waits
    until text follows it, and goes with that text). Whatever the pieces the output comes in, the items are the
    same: the server answers a request that is not streamed with one `feed` of the whole output."""

    def __init__(self, parser: ToolParser, names: Tools) -> None:
        self.parser, self.names = parser, names
        self.full = ""
        self.sent = 0  # self.full[:sent] has been returned
        self.blank: list[str] = []  # whitespace since the start or the last call, not sent yet (its pieces)
        self.in_blank = True  # nothing but whitespace since the start or the last call
        self.called = False
        self._end_from = 0  # an open block's end tag is not before this index of `full`

    def feed(self, text: str, *, final: bool = False) -> list[Item]:
        self.full += text
        items = self._blocks(final) if self.parser.blocks else self._whole(final)
        out: list[Item] = []
        for kind, value in items:
            if kind == "call":
                self.blank, self.in_blank, self.called = [], True, True
                out.append((kind, value))
            elif self.in_blank and not value.strip():
                self.blank.append(value)
            else:
                out.append((kind, "".join(self.blank) + value))
                self.blank, self.in_blank = [], False
        if final and self.blank and not self.called:
            out.append(("content", "".join(self.blank)))
            self.blank = []
        return [(k, v) for k, v in out if v != ""]

    def _whole(self, final: bool) -> list[Item]:
        if not final:
            upto = self.parser.hold_from(self.full)
            if upto <= self.sent:
                return []
            piece, self.sent = self.full[self.sent : upto], upto
            return [("content", piece)]
        outside, calls = self.parser.split(self.full, self.names)
        rest = (outside if calls else self.full)[self.sent :]
        self.sent = len(self.full)
        return [("content", rest), *(("call", c) for c in calls)]

    def _blocks(self, final: bool) -> list[Item]:
        """Each feed looks at the new text only (an open block's end is searched for from where the last search
        stopped), so a long output costs linear time."""
        items: list[Item] = []
        full = self.full
        while True:
            i = full.find(HERMES_TAG, self.sent)
            if i < 0:
                upto = len(full) if final else len(full) - _tag_prefix_at_end(full, HERMES_TAG)
                upto = max(upto, self.sent)
                items.append(("content", full[self.sent : upto]))
                self.sent = upto
                return items
            items.append(("content", full[self.sent : i]))
            self.sent = i
            j = full.find(HERMES_END, max(i + len(HERMES_TAG), self._end_from))
            if j < 0:  # not closed yet (at the end: a call if it parses as one left open, else text)
                if final:
                    _, calls = self.parser.split(full[i:], self.names)
                    items += [("call", c) for c in calls] if calls else [("content", full[i:])]
                    self.sent = len(full)
                else:  # (the end tag, when it comes, ends after what is here)
                    self._end_from = max(i + len(HERMES_TAG), len(full) - len(HERMES_END) + 1)
                return items
            block = full[i : j + len(HERMES_END)]
            self._end_from = 0
            _, calls = self.parser.split(block, self.names)
            items += [("call", c) for c in calls] if calls else [("content", block)]
            self.sent = j + len(HERMES_END)


_REGISTRY = {
    "hermes": ToolParser("hermes", _hermes_split, _hermes_hold, blocks=True),
    "llama3_json": ToolParser("llama3_json", _llama3_split, lambda t: _start_hold(t, (PYTHON_TAG,), "{")),
    # (a bare object is a call too: `_mistral_split` takes one)
    "mistral": ToolParser(
        "mistral",
        _marked_list_split(MISTRAL_TAG),
        _marked_hold(MISTRAL_TAG, "[{"),
        short_ids=True,
        marker_is_special=True,
    ),
    "pythonic": ToolParser("pythonic", _pythonic_split, lambda t: _start_hold(t, (PYTHON_TAG,), "[")),
    "qwen3_coder": ToolParser("qwen3_coder", _qwen3_coder_split, _hermes_hold, blocks=True),
    # (Granite 3.0 writes the special token, decoded away; 3.1+ the text <tool_call>)
    "granite": ToolParser(
        "granite", _json_list_split(*GRANITE_TAGS), lambda t: _start_hold(t, GRANITE_TAGS, "[{")
    ),
    # (functools is text: only the marker starts a call, as vLLM's parser has it)
    "phi4_mini_json": ToolParser(
        "phi4_mini_json", _marked_list_split(PHI4_TAG, required=True), _marked_hold(PHI4_TAG, "")
    ),
}


def get_parser(name: str) -> ToolParser:
    return _REGISTRY[name]


def detect(chat_template: str | None) -> str:
    """The parser a chat template was written for; hermes when it says nothing recognizable."""
    t = chat_template or ""
    if MISTRAL_TAG in t:
        return "mistral"
    if "<function=" in t and "<parameter=" in t:  # (inside hermes' <tool_call> blocks)
        return "qwen3_coder"
    if HERMES_TAG in t:
        return "hermes"
    if GRANITE_TAG in t:
        return "granite"
    if PHI4_TAG + "[" in t:
        return "phi4_mini_json"
    if "[func_name1(" in t or "func_name1(param" in t:  # Llama 3.2 / 4 pythonic system prompt
        return "pythonic"
    if PYTHON_TAG in t or '"parameters": dictionary of argument name and its value' in t:
        return "llama3_json"
    return "hermes"
