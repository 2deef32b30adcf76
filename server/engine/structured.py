"""Structured outputs: a request's tokens constrained to a JSON schema, any JSON object, a regular expression, one of
a list of strings, or a context-free grammar (vLLM's `structured_outputs`, OpenAI's `response_format`).

The constraint engine is llguidance (one of vLLM's backends): a grammar compiles against the tokenizer once, and at
every step a matcher yields the bitmask of the tokens that keep the output inside the grammar. Here:

- `GrammarCompiler.compile` (called by the HTTP layer off the event loop, so a bad spec is a 422 before anything is
  queued) checks and compiles a spec and keeps the result in an LRU; the engine thread's `constraint` then only
  copies the compiled matcher for each request.
- In a step, `fill_masks` computes the constrained rows' bitmasks on the CPU after the forward was launched (on a GPU
  the work overlaps the forward), `apply_masks` sets the disallowed tokens' scores to -inf after every other score
  processing, and the sampled token advances the matcher. A grammar that is complete ends the request ("stop");
  while it may still continue, end-of-sequence is allowed exactly where the grammar accepts.
- A reasoning model thinks first (`StructuredOutputs.think`): the grammar becomes a free thinking up to `</think>`,
  then the request's grammar (vLLM's structured outputs with a reasoning parser). The tags are the tokenizer's added
  tokens where it has them (Qwen3, DeepSeek-R1), else text.

llguidance is imported on first use: a server that never gets a constrained request does not need it loaded.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypedDict

import torch

from server.engine.types import StructuredOutputs

# Whitespace a JSON output may have between two tokens: enough for pretty-printing (a newline and 8 levels of
# 4-space indentation), bounded so that a model cannot spend its whole budget on blank lines.
MAX_JSON_WHITESPACE = 33
JSON_WHITESPACE = rf"[\x20\x0A\x0D\x09]{{0,{MAX_JSON_WHITESPACE}}}"


class _GrammarLimits(TypedDict):  # (LLParserLimits' keyword arguments used here)
    step_lexer_fuel: int
    initial_lexer_fuel: int
    max_lexer_states: int


# llguidance's parser limits, tighter than its defaults (step lexer fuel 200k, initial 1M, 250k lexer states): a
# request's masks are computed on the engine thread, so one tenant's grammar must not slow every step. Measured on
# this project's CPU (SmolLM2's vocabulary): realistic grammars (a 40-property schema with patterns and enums,
# maxLength 1000, date-time/email/uuid formats, an SQL-like Lark grammar) stay under 0.5 ms a mask either way, while
# the regex ((a{50}){50}){50} cost 46 ms a step (235 ms at worst) with the defaults and is refused at its first mask
# with these (a 422 before it is queued: `compile` computes that first mask).
GRAMMAR_LIMITS: _GrammarLimits = {
    "step_lexer_fuel": 50_000,
    "initial_lexer_fuel": 200_000,
    "max_lexer_states": 50_000,
}
# The limits do not bound a mask's time well ((a{300}){300} passes them at 55 ms a step), so the engine also times
# masks (`MaskBudget`): a request whose mask takes over the budget MASK_STRIKES times ends with an error, and a
# grammar whose first mask already takes MASK_STRIKES budgets is refused when it is compiled.
MASK_BUDGET_MS = 10.0
MASK_STRIKES = 3
# Many rows each just under the budget add up (64 x 9 ms a step): a step's masks together may take MASK_STEP_BUDGETS
# budgets; beyond that the tenant whose rows cost most pays, its most expensive rows first (a strike each), until
# the rest fit. Realistic grammars (0.02-0.2 ms a mask) stay far below it at any batch size we run.
MASK_STEP_BUDGETS = 4


# llguidance compiles a chain of references recursively: ~2,000 schema definitions referring one to the next (or
# ~4,000 grammar rules) overflowed a thread's 8 MiB stack and killed the server (one tenant's request). A grammar
# compiles on a thread of its own with this much stack (address space, used only as deep as the chain goes:
# measured up to ~40 KiB a level), and a spec may hold at most so many references / rules (a third of what that
# stack was measured to take), so no spec that fits a request can reach the stack's end.
COMPILE_STACK_BYTES = 512 << 20
MAX_SCHEMA_REFS = 4_000
MAX_GRAMMAR_RULES = 20_000
MAX_GBNF_RULES = 1_000
_RULE_LINE = re.compile(r"^[ \t]*[?!]?[A-Za-z_][\w.-]*(?:\{[^}\n]*\})?[ \t]*(?:::=|:)", re.MULTILINE)

# llguidance messages that name its internals or options a request cannot set, said in the request's terms
_PLAIN_WORDS = (
    (
        "oneOf constraints are not supported",
        "oneOf whose branches may match the same value is not supported; use anyOf",
    ),
    ("NoExtensionBias", "a $ref cycle that never reaches a value (a schema that refers only to itself)"),
)


class GrammarError(ValueError):
    """The spec cannot be compiled (invalid JSON schema, regex or grammar) or the model's tokenizer cannot be
    constrained; the message says why."""

    def __init__(self, message: str) -> None:
        for needle, plain in _PLAIN_WORDS:
            if needle in message:
                message = plain
                break
        super().__init__(message)


def _has_big_int(value: Any) -> bool:
    """Whether a parsed JSON value holds an integer outside 64 bits (signed or unsigned)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, int) and not isinstance(v, bool) and not -(2**63) <= v < 2**64:
            return True
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


def _without_dump(error: str) -> str:
    """llguidance's error without the parser state and grammar dump it appends (user content, possibly huge) and
    without the Rust backtrace of a caught panic (the server's internals)."""
    for mark in ("\n<state>", "<backtrace>"):
        error = error.split(mark, 1)[0]
    return error.strip()


def _count_refs(spec: str) -> int:
    """How many `$ref` keys the JSON text `spec` holds once parsed (escapes such as `\\u0024ref` included); the
    textual count where it is not JSON (that is refused later, with its own message)."""
    try:
        stack = [json.loads(spec)]
    except (ValueError, RecursionError):
        return spec.count('"$ref"')
    refs = 0
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            refs += "$ref" in node
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return refs


_REGEX_SPECIAL = frozenset("\\.+*?()|[]{}^$#&-~/")


def _regex_literal(text: str) -> str:
    """`text` as a literal inside a Lark `/.../` regex (llguidance's Rust syntax: only its metacharacters and the
    delimiter escaped; `\\<` there would be a word boundary)."""
    return "".join("\\" + ch if ch in _REGEX_SPECIAL else ch for ch in text)


def _grammar_text(so: StructuredOutputs, added: frozenset[str] = frozenset()) -> str:
    """llguidance's grammar for a spec (it does not check validity: the matcher does); `added`: the tokenizer's
    added tokens (a tag or trigger that is one is matched as that token, written `<think>` in Lark, not as text)."""
    answer = _answer_grammar(so, added)
    return answer if so.think is None else _after_thinking(answer, so, added)


def _after_thinking(answer: str, so: StructuredOutputs, added: frozenset[str]) -> str:
    """`answer` (a grammar: top-level JSON or Lark text) after a thinking the grammar leaves free: a Lark grammar
    refers to it by name (`@name`), as one more grammar of the same top-level grammar."""
    top = json.loads(answer) if answer.lstrip().startswith("{") else {"grammars": [{"lark_grammar": answer}]}
    first = top["grammars"][0]
    name = first["name"] = first.get("name") or "prefixserve_answer"  # (a name no user grammar refers to)
    # lazy: the thinking's text is as short as it can be, so it ends at the first `</think>` (where the reasoning
    # parser, which reads the text, ends it)
    start, end = so.think_tags
    end_rx = _regex_literal(end)
    rules = [f"think_text[lazy]: /(?s:.*){end_rx}/"]
    body = "think_text"
    if end in added:  # or at the tag's token, after text without the tag written out
        body = f"({body} | THINK_FREE {end})"
        rules.append(f"THINK_FREE: /(?s:.*)/ & ~/(?s:.*){end_rx}(?s:.*)/")
    start_tag = start if start in added else json.dumps(start)
    # "opened": the output starts inside the thinking (a leading `<think>` text is thinking text)
    if so.think == "opened":
        rules.append(f"think: {start + '? ' if start in added else ''}{body}")
    else:  # (not after whitespace, which the parser would take: a model could spend its tokens on it)
        rules.append(f"think: {start_tag} {body}")
    # a JSON answer may start after whitespace (models write a blank line after `</think>`), even one without
    # whitespace between its tokens
    ws = ""
    if so.kind in ("json", "json_object"):
        ws = "ws? "
        rules.append(f"ws: /[\\x20\\x0A\\x0D\\x09]{{1,{MAX_JSON_WHITESPACE}}}/")
    answered = f"think {ws}@{name}"
    rules.insert(0, f"start: {answered}" if so.think == "opened" else f"start: {answered} | @{name}")
    top["grammars"] = [{"lark_grammar": "\n".join(rules)}, *top["grammars"]]
    return json.dumps(top)


def _answer_grammar(so: StructuredOutputs, added: frozenset[str] = frozenset()) -> str:
    """llguidance's grammar (top-level JSON or Lark text) of a spec's own constraint."""
    from llguidance import LLMatcher, grammar_from, regex_to_lark

    if so.kind == "structural_tag":
        return _structural_tags(so, added)
    if so.kind in ("json", "json_object"):
        if so.kind == "json_object":
            schema: Any = {"type": "object"}
        else:
            try:
                schema = json.loads(so.spec)
            except (ValueError, RecursionError) as e:  # nested too deep for the parser: RecursionError
                raise GrammarError(f"the JSON schema is not valid JSON: {type(e).__name__}: {e}") from None
            if not isinstance(schema, (dict, bool)):
                raise GrammarError("a JSON schema must be an object (or true/false)")
            if schema is False:
                raise GrammarError("the schema false admits no value")
            if schema is True:
                schema = {}
        ws = {"whitespace_pattern": JSON_WHITESPACE} if so.any_whitespace else {"whitespace_flexible": False}
        try:
            return LLMatcher.grammar_from_json_schema(schema, overrides=ws)  # type: ignore[arg-type]
        except ValueError as e:
            if "not JSON serializable" in str(e) and _has_big_int(schema):
                raise GrammarError(
                    "the JSON schema holds an integer beyond 64 bits, which the grammar compiler does not take"
                ) from None
            raise GrammarError(f"invalid JSON schema: {e}") from None
    if so.kind == "choice":
        try:
            choices = json.loads(so.spec)
        except (ValueError, RecursionError):
            choices = None
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
            raise GrammarError("choice must be a non-empty list of non-empty strings")
        # one regex lexeme (a trie for the lexer) rather than one grammar alternative per string: the parser limits
        # a rule to 2,000 alternatives, the lexer has no such limit (4,096 choices: first mask 0.2 ms)
        return LLMatcher.grammar_from_lark(f"start: /({'|'.join(map(_regex_literal, choices))})/")
    if so.kind == "regex":
        # JSON Schema / ECMAScript classes, as in JSON schemas' `pattern`: \d is [0-9] and \w [0-9A-Za-z_]
        # (Rust's regex would take every Unicode digit and letter)
        return LLMatcher.grammar_from_lark(f"start: /{regex_to_lark(so.spec, 'dw')}/")
    try:
        return grammar_from("grammar", so.spec)
    except ValueError as e:
        raise GrammarError(str(e)) from None


# structural tags: at most this many structures and triggers (each structure's schema is compiled into the grammar)
MAX_STRUCTURES, MAX_TRIGGERS = 128, 32


def _structural_tags(so: StructuredOutputs, added: frozenset[str]) -> str:
    """vLLM's structural tags as llguidance compiles them (`StructTag`, as vLLM's guidance backend): any text, where
    a trigger must go on as one of the structures that begin with it, its content a JSON value of its schema, then
    its end. A trigger written `<...>` is matched as the tokenizer's token where every such trigger is one."""
    from llguidance import StructTag

    try:
        spec = json.loads(so.spec)
    except (ValueError, RecursionError):
        spec = None
    # (vLLM's JSON form of a response_format carries its "type")
    if not isinstance(spec, dict) or set(spec) - {"structures", "triggers", "type"}:
        raise GrammarError('structural_tag must be an object {"structures": [...], "triggers": [...]}')
    if spec.get("type", "structural_tag") != "structural_tag":
        raise GrammarError('structural_tag\'s "type", where given, must be "structural_tag"')
    structures, triggers = spec.get("structures"), spec.get("triggers")
    if not isinstance(triggers, list) or not 0 < len(triggers) <= MAX_TRIGGERS:
        raise GrammarError(f"structural_tag.triggers must be a list of 1 to {MAX_TRIGGERS} strings")
    if not all(isinstance(t, str) and t for t in triggers):
        raise GrammarError("structural_tag.triggers must be non-empty strings")
    if not isinstance(structures, list) or not 0 < len(structures) <= MAX_STRUCTURES:
        raise GrammarError(f"structural_tag.structures must be a list of 1 to {MAX_STRUCTURES} objects")
    ws = {"whitespace_pattern": JSON_WHITESPACE} if so.any_whitespace else {"whitespace_flexible": False}
    tags = []
    for i, s in enumerate(structures):
        where = f"structural_tag.structures[{i}]"
        if (
            not isinstance(s, dict)
            or set(s) - {"begin", "schema", "end"}
            or not isinstance(s.get("begin"), str)
        ):
            raise GrammarError(f'{where} must be an object {{"begin", "schema", "end"}} with a string begin')
        if not isinstance(s.get("end", ""), str):
            raise GrammarError(f"{where}.end must be a string")
        schema = s.get("schema")
        schema = {} if schema is None or schema is True else schema
        if not isinstance(schema, dict):
            raise GrammarError(f"{where}.schema must be a JSON schema object")
        trigger = next((t for t in triggers if s["begin"].startswith(t)), None)
        if trigger is None:
            raise GrammarError(f"{where}.begin {s['begin']!r} starts with none of the triggers")
        # (JSON's whitespace as in a `json` spec: bounded, or none)
        schema = {**schema, "x-guidance": {**(schema.get("x-guidance") or {}), **ws}}
        tags.append(StructTag(trigger=trigger, begin=s["begin"], grammar=schema, end=s.get("end", "")))
    tokens = [t for t in triggers if t.startswith("<") and t.endswith(">")]
    try:
        return StructTag.to_grammar(tags, assume_special=bool(tokens) and all(t in added for t in tokens))
    except (AssertionError, ValueError) as e:
        raise GrammarError(f"invalid structural_tag: {e}") from None


class Constraint:
    """One request's position in its grammar."""

    __slots__ = ("matcher", "slowest_s", "strikes")

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher
        self.strikes = 0  # masks that took longer than the budget
        self.slowest_s = 0.0

    def accept(self, token: int) -> bool:
        """Advance by the sampled token; False if the grammar does not allow it (the matcher is then in error)."""
        return bool(self.matcher.consume_token(int(token)))

    @property
    def done(self) -> bool:
        """The grammar is complete and allows no further token."""
        return bool(self.matcher.is_stopped())

    @property
    def failed(self) -> bool:
        """The matcher is in an error state (a token outside the grammar, or a parser/lexer limit exceeded)."""
        return bool(self.matcher.is_error())

    @property
    def error(self) -> str:
        return _without_dump(str(self.matcher.get_error()))


GRAMMAR_CACHE_CHARS = 2 << 20  # spec text the compiled-grammar cache holds at most (~100 MB of grammars)


class GrammarCompiler:
    """Compiles specs against one tokenizer; compiled matchers are kept (LRU) and copied per request. Thread-safe."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        eos_token_id: int | None,
        cache_size: int = 256,
        mask_budget_ms: float = MASK_BUDGET_MS,
    ) -> None:
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos = eos_token_id
        self._cache_size = cache_size
        self.mask_budget_s = mask_budget_ms / 1000
        self._lltok: Any = None
        self._limits: Any = None
        self._added: frozenset[str] | None = None
        self._compiled: OrderedDict[StructuredOutputs, Any] = OrderedDict()
        self._compiled_chars = (
            0  # of the cached specs' text: what bounds the cache's memory (besides the count)
        )
        # specs refused, with why: a repeat is refused at once instead of paying the compilation again
        self._refused: OrderedDict[StructuredOutputs, str] = OrderedDict()
        self._refused_chars = 0
        self._lock = threading.Lock()
        self.compilations = 0  # distinct specs compiled (cache misses)

    def _tokenizer(self) -> Any:
        if self._lltok is None:
            import llguidance.hf

            backend = getattr(self._hf_tokenizer, "backend_tokenizer", None)
            if backend is None:
                raise GrammarError("structured outputs need a fast (Rust `tokenizers`) tokenizer")
            try:
                # the model's logits may be wider than the tokenizer's vocabulary (padded embeddings): tokens
                # past the tokenizer are never allowed
                self._lltok = llguidance.hf.from_tokenizer(
                    self._hf_tokenizer, n_vocab=self.vocab_size, eos_token=self._eos
                )
            except Exception as e:  # the tokenizer's format is not one llguidance understands
                raise GrammarError(f"structured outputs are not available for this tokenizer: {e}") from None
        return self._lltok

    def _added_tokens(self) -> frozenset[str]:
        """The tokenizer's added tokens (llguidance matches them by token, not by their text)."""
        if self._added is None:
            self._added = frozenset(self._hf_tokenizer.get_added_vocab())
        return self._added

    def _parser_limits(self) -> Any:
        if self._limits is None:
            from llguidance import LLParserLimits

            self._limits = LLParserLimits(**GRAMMAR_LIMITS)
        return self._limits

    def _hit(self, so: StructuredOutputs) -> Any:
        """`so`'s compiled matcher from the LRU cache (now the most recent), or None."""
        with self._lock:
            m = self._compiled.get(so)
            if m is not None:
                self._compiled.move_to_end(so)
            return m

    def _compiled_matcher(self, so: StructuredOutputs) -> Any:
        m = self._hit(so)
        if m is not None:
            return m
        with self._lock:
            why = self._refused.get(so)
        if why is not None:
            raise GrammarError(why)
        try:
            return self._compile_matcher(so)
        except GrammarError as e:
            with self._lock:
                if so not in self._refused:
                    self._refused_chars += len(so.spec)
                self._refused[so] = str(e)
                while len(self._refused) > 1 and (
                    len(self._refused) > self._cache_size or self._refused_chars > GRAMMAR_CACHE_CHARS
                ):
                    old, _ = self._refused.popitem(last=False)
                    self._refused_chars -= len(old.spec)
            raise

    def _compile_matcher(self, so: StructuredOutputs) -> Any:
        _check_depth(so)
        with self._lock:
            tok = self._tokenizer()
        from llguidance import LLMatcher

        try:
            text = _grammar_text(so, self._added_tokens())
            m = _on_deep_stack(lambda: LLMatcher(tok, text, log_level=0, limits=self._parser_limits()))
        except GrammarError:
            raise
        except ValueError as e:  # e.g. text that is not valid Unicode (lone surrogates)
            raise GrammarError(_without_dump(str(e))) from None
        t0 = time.perf_counter()
        if not m.is_error():
            m.compute_bitmask()  # the first step: a grammar over the parser's or lexer's limits fails here already
        first_s = time.perf_counter() - t0
        if m.is_error():
            raise GrammarError(_without_dump(m.get_error()))
        if first_s > MASK_STRIKES * self.mask_budget_s:
            raise GrammarError(
                f"the grammar is too expensive to follow: its first token mask took {1000 * first_s:.0f} ms "
                f"(the budget is {1000 * self.mask_budget_s:.0f} ms a token)"
            )
        with self._lock:
            self.compilations += 1
            if so not in self._compiled:
                self._compiled_chars += len(so.spec)
            self._compiled[so] = m
            # a compiled grammar takes ~50x its spec's size (lexer states): many large schemas of one tenant held
            # 0.5-0.8 GB at 256 entries; the newest is always kept
            while len(self._compiled) > 1 and (
                len(self._compiled) > self._cache_size or self._compiled_chars > GRAMMAR_CACHE_CHARS
            ):
                old, _ = self._compiled.popitem(last=False)
                self._compiled_chars -= len(old.spec)
        return m

    def compile(self, so: StructuredOutputs) -> StructuredOutputs:
        """Check `so` and return it with its compiled grammar attached (`compiled`, also kept in the LRU cache);
        raises GrammarError with the reason. Can take up to a second for a large grammar (llguidance releases the
        GIL meanwhile): call it off the event loop and the engine thread, unless `cached` has it."""
        return dataclasses.replace(so, compiled=self._compiled_matcher(so))

    def cached(self, so: StructuredOutputs) -> StructuredOutputs | None:
        """`so` with its compiled grammar attached if the cache holds it (no compilation), else None."""
        m = self._hit(so)
        return None if m is None else dataclasses.replace(so, compiled=m)

    def constraint(self, so: StructuredOutputs) -> Constraint:
        """A fresh matcher at the start of `so`'s grammar: from `so.compiled` when attached, else from the cache
        (compiled now if it is no longer there)."""
        m = so.compiled if so.compiled is not None else self._compiled_matcher(so)
        return Constraint(m.deep_copy())


def _check_depth(so: StructuredOutputs) -> None:
    """Refuse a spec whose chains of references could be deeper than a compilation's stack takes (a count of its
    `$ref`s and of its grammar's rules bounds them: inline nesting is bounded by the JSON and grammar parsers)."""
    refs = so.spec.count('"$ref"')
    if so.kind in ("json", "structural_tag"):  # (any letter of the key may be escaped: parsed, always)
        refs = max(refs, _count_refs(so.spec))
    if refs > MAX_SCHEMA_REFS:
        raise GrammarError(f"the schema has {refs} $ref references: at most {MAX_SCHEMA_REFS} are allowed")
    if so.kind == "grammar":
        # GBNF is converted to Lark by llguidance in Python, in time quadratic in its rules (3,000: 6 s, holding the
        # GIL and a compile thread): far fewer of those
        gbnf = so.spec.count("::=")
        if gbnf > MAX_GBNF_RULES:
            raise GrammarError(f"the grammar has {gbnf} GBNF rules: at most {MAX_GBNF_RULES} are allowed")
        rules = len(_RULE_LINE.findall(so.spec.replace("\r", "\n")))
        if rules > MAX_GRAMMAR_RULES:
            raise GrammarError(f"the grammar has {rules} rules: at most {MAX_GRAMMAR_RULES} are allowed")


def _on_deep_stack(fn: Callable[[], Any]) -> Any:
    """`fn()` on a new thread with COMPILE_STACK_BYTES of stack (GrammarError where the system will not give it)."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append((True, fn()))
        except BaseException as e:  # handed to the caller
            out.append((False, e))

    with _STACK_LOCK:  # (threading.stack_size is the process's setting for threads started after it)
        old = threading.stack_size()
        try:
            threading.stack_size(COMPILE_STACK_BYTES)
            t = threading.Thread(target=run, name="grammar-compile", daemon=True)
            t.start()
        except (RuntimeError, ValueError, MemoryError):
            t = None
        finally:
            threading.stack_size(old)
    if (
        t is None
    ):  # (an address-space limit): on an ordinary stack a spec within the limits could still overflow it
        raise GrammarError(
            "structured outputs are not available now: no thread for a compilation could start"
        )
    t.join()
    ok, value = out[0]
    if not ok:
        raise value
    return value


_STACK_LOCK = threading.Lock()
_EXECUTOR: Any = None
_EXECUTOR_LOCK = threading.Lock()


def _executor() -> Any:
    global _EXECUTOR
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None:
            from llguidance import LLExecutor

            _EXECUTOR = LLExecutor()
        return _EXECUTOR


def mask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def fill_masks(
    constraints: list[Constraint], vocab_size: int, timings: list[float] | None = None
) -> torch.Tensor:
    """Bitmasks (int32 `[R, ceil(vocab / 32)]`, bit j of word w = token 32w + j allowed) of the constraints' next
    tokens, computed outside the GIL: in parallel threads, or one by one with each row's time appended to
    `timings`."""
    out = torch.empty((len(constraints), mask_words(vocab_size)), dtype=torch.int32)
    if timings is None and len(constraints) > 1:
        _executor().unsafe_compute_mask_ptr(
            [(c.matcher, i) for i, c in enumerate(constraints)],
            out.data_ptr(),
            out.shape[1] * 4,
            len(constraints),
        )
        return out
    for c, row in zip(constraints, out, strict=True):
        t0 = time.perf_counter()
        c.matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)
        if timings is not None:
            timings.append(time.perf_counter() - t0)
    return out


class MaskBudget:
    """One tenant's grammars must not slow every step. When a step's masks (computed in parallel) take longer than
    the budget, the next step times each row: a row over the budget gets a strike, and if the rows together took
    over MASK_STEP_BUDGETS budgets, the heaviest tenant's most expensive rows get one until the rest fit. A row with
    MASK_STRIKES strikes fails. A single row is always timed."""

    def __init__(self, budget_s: float) -> None:
        self.budget_s = budget_s
        self._audit = False

    def fill(
        self, constraints: list[Constraint], vocab_size: int, owners: Sequence[Hashable] | None = None
    ) -> tuple[torch.Tensor, dict[int, str]]:
        """(bitmasks, {index in `constraints`: why that row cannot go on}); `owners[i]` is row i's tenant."""
        timings: list[float] | None = [] if self._audit or len(constraints) == 1 else None
        t0 = time.perf_counter()
        bitmask = fill_masks(constraints, vocab_size, timings)
        self._audit = timings is None and time.perf_counter() - t0 > self.budget_s
        if timings is not None:
            for i in self._over_budget(timings, owners):
                c = constraints[i]
                c.strikes += 1
                c.slowest_s = max(c.slowest_s, timings[i])
        live = bitmask.ne(0).any(1).tolist()
        failed: dict[int, str] = {}
        step_ms = MASK_STEP_BUDGETS * 1000 * self.budget_s
        for i, c in enumerate(constraints):
            if c.failed:
                failed[i] = c.error
            elif c.strikes >= MASK_STRIKES:
                failed[i] = (
                    f"the grammar is too expensive to follow: {c.strikes} token masks over the time budget "
                    f"({1000 * self.budget_s:.0f} ms a mask, {step_ms:.0f} ms for a step's masks together; "
                    f"the slowest took {1000 * c.slowest_s:.1f} ms)"
                )
            elif not live[i]:
                failed[i] = "the grammar allows no further token"
        return bitmask, failed

    def _over_budget(self, timings: list[float], owners: Sequence[Hashable] | None) -> list[int]:
        """Rows that get a strike: each one over the budget, then, while the step's total is over MASK_STEP_BUDGETS
        budgets, the rows of the costliest tenant (most expensive first)."""
        struck = [i for i, t in enumerate(timings) if t > self.budget_s]
        total = sum(timings) - sum(timings[i] for i in struck)
        limit = MASK_STEP_BUDGETS * self.budget_s
        if total <= limit:
            return struck
        own = list(owners) if owners is not None else [None] * len(timings)
        cost: dict[Hashable, float] = {}
        for o, t in zip(own, timings, strict=True):
            cost[o] = cost.get(o, 0.0) + t
        done = set(struck)
        for i in sorted(range(len(timings)), key=lambda i: (-cost[own[i]], -timings[i], i)):
            if total <= limit:
                break
            if i not in done:
                struck.append(i)
                total -= timings[i]
        return struck


_BITS = torch.arange(32, dtype=torch.int32)


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Bool `[R, vocab]` from the bitmasks (on the bitmask's device)."""
    bits = (bitmask[:, :, None] >> _BITS.to(bitmask.device)) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()


def apply_masks(scores: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> None:
    """Set the disallowed tokens of `rows` (distinct, ascending) of `scores` to -inf, in place (one transfer of
    the bitmasks)."""
    disallowed = ~allowed_tokens(bitmask.to(scores.device, non_blocking=True), scores.shape[-1])
    if len(rows) == scores.shape[0]:  # every row constrained: no gather
        scores.masked_fill_(disallowed, float("-inf"))
        return
    idx = torch.tensor(rows, device=scores.device)
    scores.index_copy_(0, idx, scores.index_select(0, idx).masked_fill_(disallowed, float("-inf")))
