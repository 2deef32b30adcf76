"""Structured outputs: a request's tokens constrained to a JSON schema, any JSON object, a regular expression, one of
a list of strings, or a context-free grammar (vLLM's `structured_outputs`, OpenAI's `response_format`).

The constraint engine is llguidance (one of vLLM's backends): a grammar compiles against the tokenizer once, and at
every step a matcher yields the bitmask of the tokens that keep the output inside the grammar. Here:

- `GrammarCompiler.compile` (called by the HTTP layer off the event loop, so a bad spec is a 422 before anything is
  queued) checks and compiles a spec and keeps the result in an LRU; the engine thread's `matcher` then only copies
  the compiled matcher for each request.
- In a step, `fill_masks` computes the constrained rows' bitmasks on the CPU after the forward was launched (on a GPU
  the work overlaps the forward), `apply_masks` sets the disallowed tokens' scores to -inf after every other score
  processing, and the sampled token advances the matcher. A grammar that is complete ends the request ("stop");
  while it may still continue, end-of-sequence is allowed exactly where the grammar accepts.

llguidance is imported on first use: a server that never gets a constrained request does not need it loaded.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

import torch

from server.engine.types import StructuredOutputs

# Whitespace a JSON output may have between two tokens: enough for pretty-printing (a newline and 8 levels of
# 4-space indentation), bounded so that a model cannot spend its whole budget on blank lines.
MAX_JSON_WHITESPACE = 33
JSON_WHITESPACE = rf"[\x20\x0A\x0D\x09]{{0,{MAX_JSON_WHITESPACE}}}"


class GrammarError(ValueError):
    """The spec cannot be compiled (invalid JSON schema, regex or grammar) or the model's tokenizer cannot be
    constrained; the message says why."""


def _grammar_text(so: StructuredOutputs) -> str:
    """llguidance's grammar for a spec (it does not check validity: the matcher does)."""
    from llguidance import LLMatcher, grammar_from, regex_to_lark

    if so.kind in ("json", "json_object"):
        if so.kind == "json_object":
            schema: Any = {"type": "object"}
        else:
            try:
                schema = json.loads(so.spec)
            except ValueError as e:
                raise GrammarError(f"the JSON schema is not valid JSON: {e}") from None
            if not isinstance(schema, (dict, bool)):
                raise GrammarError("a JSON schema must be an object (or true/false)")
            if isinstance(schema, bool):
                schema = {} if schema else {"not": {}}
        ws = {"whitespace_pattern": JSON_WHITESPACE} if so.any_whitespace else {"whitespace_flexible": False}
        try:
            return LLMatcher.grammar_from_json_schema(schema, overrides=ws)  # type: ignore[arg-type]
        except ValueError as e:
            raise GrammarError(f"invalid JSON schema: {e}") from None
    if so.kind == "choice":
        try:
            choices = json.loads(so.spec)
        except ValueError:
            choices = None
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
            raise GrammarError("choice must be a non-empty list of non-empty strings")
        return grammar_from("choice", so.spec)
    if so.kind == "regex":
        # JSON Schema / ECMAScript classes, as in JSON schemas' `pattern`: \d is [0-9] and \w [0-9A-Za-z_]
        # (Rust's regex would take every Unicode digit and letter)
        return LLMatcher.grammar_from_lark(f"start: /{regex_to_lark(so.spec, 'dw')}/")
    try:
        return grammar_from("grammar", so.spec)
    except ValueError as e:
        raise GrammarError(str(e)) from None


class Constraint:
    """One request's position in its grammar."""

    __slots__ = ("matcher",)

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher

    def accept(self, token: int) -> bool:
        """Advance by the sampled token; False if the grammar does not allow it (the matcher is then in error)."""
        return bool(self.matcher.consume_token(int(token)))

    @property
    def done(self) -> bool:
        """The grammar is complete and allows no further token."""
        return bool(self.matcher.is_stopped())

    @property
    def error(self) -> str:
        return str(self.matcher.get_error())


class GrammarCompiler:
    """Compiles specs against one tokenizer; compiled matchers are kept (LRU) and copied per request. Thread-safe."""

    def __init__(
        self, tokenizer: Any, vocab_size: int, eos_token_id: int | None, cache_size: int = 256
    ) -> None:
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos = eos_token_id
        self._cache_size = cache_size
        self._lltok: Any = None
        self._compiled: OrderedDict[StructuredOutputs, Any] = OrderedDict()
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

    def _compiled_matcher(self, so: StructuredOutputs) -> Any:
        with self._lock:
            m = self._compiled.get(so)
            if m is not None:
                self._compiled.move_to_end(so)
                return m
            tok = self._tokenizer()
        from llguidance import LLMatcher

        try:
            m = LLMatcher(tok, _grammar_text(so), log_level=0)
        except GrammarError:
            raise
        except ValueError as e:  # e.g. text that is not valid Unicode (lone surrogates)
            raise GrammarError(str(e)) from None
        if m.is_error():
            raise GrammarError(m.get_error().strip())
        with self._lock:
            self.compilations += 1
            self._compiled[so] = m
            while len(self._compiled) > self._cache_size:
                self._compiled.popitem(last=False)
        return m

    def compile(self, so: StructuredOutputs) -> None:
        """Check `so` and keep its compiled matcher; raises GrammarError with the reason. Can take up to a second
        for a large grammar (llguidance releases the GIL meanwhile): call it off the event loop and the engine
        thread."""
        self._compiled_matcher(so)

    def constraint(self, so: StructuredOutputs) -> Constraint:
        """A fresh matcher at the start of `so`'s grammar (compiled now if it is no longer cached)."""
        return Constraint(self._compiled_matcher(so).deep_copy())


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


def fill_masks(constraints: list[Constraint], vocab_size: int) -> torch.Tensor:
    """Bitmasks (int32 `[R, ceil(vocab / 32)]`, bit j of word w = token 32w + j allowed) of the constraints' next
    tokens, computed in parallel threads outside the GIL."""
    out = torch.empty((len(constraints), mask_words(vocab_size)), dtype=torch.int32)
    if len(constraints) == 1:
        row = out[0]
        constraints[0].matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)
    else:
        _executor().unsafe_compute_mask_ptr(
            [(c.matcher, i) for i, c in enumerate(constraints)],
            out.data_ptr(),
            out.shape[1] * 4,
            len(constraints),
        )
    return out


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
