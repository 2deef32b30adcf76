"""Structured outputs in the engine: outputs match their JSON schema / regex / choice / grammar, a complete match
ends the request, and constrained rows in a mixed-tenant batch equal the same request alone and a plain
transformers reference whose logits are masked by llguidance directly (not through the engine's code)."""

from __future__ import annotations

import dataclasses
import json
import re
import time

import numpy as np
import pytest
import torch

from server.engine import GrammarError, PrefixKey, Request, SamplingParams, StructuredOutputs
from server.engine.structured import MAX_JSON_WHITESPACE, GrammarCompiler, allowed_tokens, fill_masks
from tests.engine_utils import hf_greedy, make_engine, pool_bytes, random_kv, random_prompt

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
JSON_COMPACT = StructuredOutputs("json", json.dumps(PERSON), any_whitespace=False)
REGEX = StructuredOutputs("regex", r"[0-9]{3}-[a-z]{2,5}(\.[a-z]{2})?")
CHOICE = StructuredOutputs("choice", json.dumps(["yes", "no", "it depends"]))
LARK = StructuredOutputs("grammar", 'start: "(" expr ")"\nexpr: /[a-z]{1,3}/ | "(" expr ")"')


def check_person(text: str) -> None:
    obj = json.loads(text)
    assert set(obj) == {"name", "age", "tags"}, obj
    assert isinstance(obj["name"], str) and len(obj["name"]) <= 6
    assert isinstance(obj["age"], int) and 0 <= obj["age"] <= 150
    assert isinstance(obj["tags"], list) and len(obj["tags"]) <= 3 and set(obj["tags"]) <= {"a", "b", "c"}


def matches(so: StructuredOutputs, text: str) -> bool:
    if so is JSON_COMPACT:
        check_person(text)
        return " " not in text and "\n" not in text
    if so is REGEX:
        return re.fullmatch(REGEX.spec, text, re.ASCII) is not None
    if so is CHOICE:
        return text in json.loads(CHOICE.spec)
    if so is LARK:
        return re.fullmatch(r"(\()+[a-z]{1,3}(\))+", text) is not None and text.count("(") == text.count(")")
    raise AssertionError(so)


def _req(
    rid: str, spec, so, seed: int, temperature: float = 0.0, prefix=None, max_tokens: int = 64
) -> Request:
    return Request(
        rid,
        random_prompt(spec.vocab_size, 5 + seed % 7, seed),
        SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed, structured=so),
        prefix,
    )


@pytest.mark.parametrize("so", [JSON_COMPACT, REGEX, CHOICE, LARK], ids=["json", "regex", "choice", "lark"])
def test_outputs_match_their_spec_and_a_complete_match_stops(tiny_llama_bundle, so):
    b = tiny_llama_bundle
    reqs = [_req(f"r{i}", b.spec, so, seed=i, temperature=0.0 if i == 0 else 1.5) for i in range(8)]
    outs = make_engine(b, {}).generate(reqs)
    for o in outs:
        assert o.error is None, o.error
        assert o.finish_reason == "stop", (o.text, o.token_ids)
        assert len(o.token_ids) < 64
        assert matches(so, o.text), o.text
        if so is not REGEX:  # these grammars end by themselves: no end-of-sequence token needed
            assert b.tokenizer.eos_token_id not in o.token_ids
        else:  # after 2-5 letters the regex may end (end-of-sequence allowed) or go on with ".xx"
            assert o.token_ids[-1] == b.tokenizer.eos_token_id or o.text.count(".") == 1
    assert len({o.text for o in outs}) > 1, "sampled rows should differ"


def test_unconstrained_model_does_not_match_on_its_own(tiny_llama_bundle):
    """The constraint is what makes the outputs above match (the random model alone never writes such text)."""
    b = tiny_llama_bundle
    outs = make_engine(b, {}).generate(
        [_req(f"r{i}", b.spec, None, seed=i, temperature=1.5) for i in range(8)]
    )
    for so in (JSON_COMPACT, REGEX, CHOICE):
        for o in outs:
            try:
                ok = matches(so, o.text)
            except (ValueError, AssertionError):
                ok = False
            assert not ok, o.text


def test_max_tokens_cuts_a_constrained_output_short(tiny_llama_bundle):
    b = tiny_llama_bundle
    out = make_engine(b, {}).generate([_req("r", b.spec, JSON_COMPACT, seed=0, max_tokens=4)])[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 4
    assert out.text.startswith('{"')


def test_json_whitespace_is_bounded(tiny_llama_bundle):
    """Pretty-printing is allowed, endless blank lines are not: a +100 bias on the space token fills every gap
    between JSON tokens with exactly the maximum run of whitespace, and the object still completes."""
    b = tiny_llama_bundle
    space = b.tokenizer.convert_tokens_to_ids("Ġ")
    so = StructuredOutputs("json", JSON_COMPACT.spec)  # any_whitespace (the default)
    p = SamplingParams(max_tokens=600, structured=so, logit_bias=((space, 100.0),))
    out = make_engine(b, {}).generate([Request("r", [1, 2, 3], p)])[0]
    assert out.finish_reason == "stop", out.text
    check_person(out.text)
    outside_strings = re.sub(r'"[^"]*"', '""', out.text)
    assert {len(m) for m in re.findall(r"\s+", outside_strings)} == {MAX_JSON_WHITESPACE}
    assert json.loads(out.text)["name"] == " " * 6  # inside a string a space is content (up to maxLength)


def test_logit_bias_cannot_force_a_token_outside_the_grammar(tiny_llama_bundle):
    b = tiny_llama_bundle
    x = b.tokenizer.convert_tokens_to_ids("x")
    p = SamplingParams(max_tokens=16, structured=REGEX, logit_bias=((x, 100.0),))
    out = make_engine(b, {}).generate([Request("r", random_prompt(b.spec.vocab_size, 5, 0), p)])[0]
    assert out.finish_reason == "stop" and matches(REGEX, out.text), out.text
    # the bias does act where the grammar allows the token: a regex allowing x takes it every time
    p = SamplingParams(
        max_tokens=16, structured=StructuredOutputs("regex", "[a-z]{1,4}"), logit_bias=((x, 100.0),)
    )
    assert make_engine(b, {}).generate([Request("r", [1, 2, 3], p)])[0].text == "xxxx"


class _LLGuidanceReference:
    """A transformers LogitsProcessor masking with llguidance's own API (bitmask bytes → numpy), independent of
    server.engine.structured."""

    def __init__(self, tokenizer, vocab: int, grammar: str, prompt_len: int) -> None:
        import llguidance
        import llguidance.hf

        tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
        self.matcher = llguidance.LLMatcher(tok, grammar, log_level=0)
        self.vocab, self.n = vocab, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        gen = input_ids[0, self.n :].tolist()
        if gen:
            self.matcher.consume_token(gen[-1])
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = torch.from_numpy(bits[: self.vocab].astype(bool))
        if not allowed.any():  # the grammar is complete (its end was consumed): nothing more to compare
            return scores
        return scores.masked_fill(~allowed[None], float("-inf"))


def _reference_grammar(so: StructuredOutputs) -> str:
    from llguidance import LLMatcher, grammar_from

    if so.kind == "json":
        return LLMatcher.grammar_from_json_schema(
            json.loads(so.spec), overrides={"whitespace_flexible": False}
        )
    return grammar_from({"regex": "regex", "choice": "choice", "grammar": "grammar"}[so.kind], so.spec)


def test_mixed_batch_constrained_rows_equal_alone_and_transformers_reference(tiny_llama_bundle):
    """fp32 exactness anchor with structured outputs: tenants with their own prefixes, constrained (greedy and
    seeded) and unconstrained rows in one continuous batch, joining mid-flight; each equals its request alone, and
    the greedy constrained rows equal transformers decoding with the same prefix KV and llguidance's mask."""
    b = tiny_llama_bundle
    keys = {PrefixKey(f"t{i}", "default", 1): random_kv(b.spec, p, seed=i) for i, p in enumerate((8, 20, 13))}
    kl = list(keys)
    specs = [JSON_COMPACT, REGEX, None, CHOICE, LARK, JSON_COMPACT, None, REGEX]
    reqs = [
        _req(f"r{i}", b.spec, so, seed=i, temperature=1.0 if i in (5, 7) else 0.0, prefix=kl[i % 3])
        for i, so in enumerate(specs)
    ]
    eng = make_engine(b, keys, max_num_batched_tokens=24)  # chunked prefill: newcomers join running rows
    mixed = eng.generate(reqs)
    for r, m in zip(reqs, mixed, strict=True):
        alone = make_engine(b, keys).generate([r])[0]
        assert m.token_ids == alone.token_ids, r.request_id
        so = r.sampling.structured
        if so is None:
            continue
        assert m.finish_reason == "stop" and matches(so, m.text), (r.request_id, m.text)
        if r.sampling.temperature == 0.0:
            proc = _LLGuidanceReference(
                b.tokenizer, b.spec.vocab_size, _reference_grammar(so), len(r.prompt_token_ids)
            )
            ref = hf_greedy(b.hf_model, keys[r.prefix], r.prompt_token_ids, len(m.token_ids), processor=proc)
            assert ref == m.token_ids, r.request_id


def test_constrained_rows_survive_preemption(tiny_llama_bundle):
    """A preempted row is recomputed from its tokens; its grammar state stays where its output got to."""
    b = tiny_llama_bundle
    reqs = [
        _req(f"r{i}", b.spec, JSON_COMPACT if i % 2 else REGEX, seed=i, temperature=1.0, max_tokens=60)
        for i in range(10)
    ]
    roomy = make_engine(b, {}).generate(reqs)
    eng = make_engine(b, {}, kv_cache_bytes=pool_bytes(b, 40, block_size=4), block_size=4)
    tight = eng.generate(reqs)
    assert eng.scheduler.num_preemptions > 0
    assert [o.token_ids for o in tight] == [o.token_ids for o in roomy]
    assert all(
        o.finish_reason == "stop" and matches(r.sampling.structured, o.text)
        for r, o in zip(reqs, tight, strict=True)
    )


def test_a_grammar_past_the_parser_limits_fails_its_request_alone(tiny_llama_bundle):
    """Counted repeats nested in a regex pass the first mask, then blow the lexer's state budget once the output
    reaches them: that request ends with an error naming the limit (without llguidance's parser state and grammar
    dump), its neighbours are unaffected."""
    b = tiny_llama_bundle
    so = StructuredOutputs("regex", "b{1,5}((a{60}){60}){60}")
    free = _req("free", b.spec, None, seed=1, max_tokens=8)
    out = make_engine(b, {}).generate([_req("bad", b.spec, so, seed=0), free])
    assert out[0].finish_reason == "error" and "too many expressions" in out[0].error, out[0]
    generated = b.tokenizer.decode(out[0].token_ids)  # an error has no text: the tokens say how far it got
    assert re.fullmatch("b{1,5}a?", generated), generated
    assert "<state>" not in out[0].error and "a{60}" not in out[0].error
    assert out[1].error is None and out[1].token_ids == make_engine(b, {}).generate([free])[0].token_ids


def test_a_grammar_too_slow_to_follow_fails_alone(tiny_llama_bundle):
    """A grammar whose masks take over the engine's budget (here ~17 ms a token against 3 ms) ends after three
    slow masks; a cheap grammar and a free row in the same steps carry on. Its first mask is refused at compile
    time when it already takes three budgets."""
    b = tiny_llama_bundle
    slow = StructuredOutputs("regex", "xyz((a{40}){40}){40}")
    cheap = StructuredOutputs("regex", "[a-z]{30}")
    eng = make_engine(b, {}, mask_budget_ms=3)
    with pytest.raises(GrammarError, match="too expensive to follow: its first token mask took"):
        eng.grammars.compile(slow)
    # compiled by a lenient compiler (a grammar that passed its check): the step budget still catches it
    eng.grammars = GrammarCompiler(
        b.tokenizer, b.spec.vocab_size, b.tokenizer.eos_token_id, mask_budget_ms=1e4
    )
    reqs = [_req("slow", b.spec, slow, 0, max_tokens=30), _req("cheap", b.spec, cheap, 1, max_tokens=40)]
    reqs.append(_req("free", b.spec, None, 2, max_tokens=30))
    out = eng.generate(reqs)
    assert (
        out[0].finish_reason == "error"
        and "too expensive to follow: 3 token masks over the time budget (3 ms a mask" in out[0].error
    )
    assert len(out[0].token_ids) < 10 and out[0].error_type == "GrammarError"
    assert out[1].finish_reason == "stop" and matches_regex(cheap, out[1].text)
    assert out[2].finish_reason == "length" and out[2].error is None


class _Row:
    """A constraint as MaskBudget sees it."""

    def __init__(self) -> None:
        self.strikes, self.slowest_s, self.failed, self.error = 0, 0.0, False, ""


def test_many_rows_under_the_budget_are_charged_to_their_tenant(monkeypatch):
    """Eight rows of one tenant at 9 ms a mask (each under the 10 ms budget, 72 ms a step together) and two cheap
    rows of another tenant: once a step's masks take over the budget, the next step is timed row by row; the step
    total may be 40 ms, so the heavy tenant's costliest rows are struck until the rest fit (4 of 8: 36 ms + 2 ms),
    and end after three strikes. The cheap tenant is never struck."""
    from server.engine import structured

    cost = [0.009] * 8 + [0.001] * 2
    owners = ["heavy"] * 8 + ["light"] * 2

    def fake_fill(constraints, vocab_size, timings=None):
        if timings is None:
            time.sleep(0.015)  # the parallel fill of a 72 ms step over 2 cores: over the 10 ms budget
        else:
            timings.extend(cost)
        return torch.ones(len(constraints), structured.mask_words(vocab_size), dtype=torch.int32)

    monkeypatch.setattr(structured, "fill_masks", fake_fill)
    budget = structured.MaskBudget(0.010)
    rows = [_Row() for _ in cost]
    failed: dict[int, str] = {}
    for _ in range(6):  # parallel (over) -> timed -> parallel -> timed ...
        _, failed = budget.fill(rows, 64, owners)  # type: ignore[arg-type]
    assert sorted(failed) == [0, 1, 2, 3]
    assert "10 ms a mask, 40 ms for a step's masks together; the slowest took 9.0 ms" in failed[0]
    assert [r.strikes for r in rows] == [3] * 4 + [0] * 6
    # without owners every row is one tenant's: still only as many rows as needed to fit
    rows = [_Row() for _ in cost]
    budget = structured.MaskBudget(0.010)
    for _ in range(6):
        _, failed = budget.fill(rows, 64)  # type: ignore[arg-type]
    assert sorted(failed) == [0, 1, 2, 3]


def test_the_engine_charges_mask_time_to_each_rows_tenant(tiny_llama_bundle):
    """The engine hands MaskBudget each constrained row's tenant: the cache salt (the server's tenant id), else the
    prefix's tenant."""
    b = tiny_llama_bundle
    key = PrefixKey("globex", "p", 1)
    eng = make_engine(b, {key: random_kv(b.spec, 4, 0)})
    seen: list[list] = []
    fill = eng.mask_budget.fill

    def spy(constraints, vocab_size, owners=None):
        seen.append(list(owners))
        return fill(constraints, vocab_size, owners)

    eng.mask_budget.fill = spy  # type: ignore[method-assign]
    so = StructuredOutputs("regex", "[a-z]{4}")
    salted = _req("salted", b.spec, so, 0, max_tokens=8)
    salted.cache_salt = "acme"
    by_prefix = _req("by-prefix", b.spec, so, 1, max_tokens=8)
    by_prefix.prefix = key
    free = _req("free", b.spec, None, 2, max_tokens=8)
    eng.generate([salted, by_prefix, free])
    assert seen and all(o == ["acme", "globex"] for o in seen if len(o) == 2)
    assert ["acme", "globex"] in seen


def matches_regex(so: StructuredOutputs, text: str) -> bool:
    return re.fullmatch(so.spec, text, re.ASCII) is not None


def test_thousands_of_choices(tiny_llama_bundle):
    """A choice is one regex lexeme, not a grammar rule per string (the parser stops at 2,000 alternatives)."""
    b = tiny_llama_bundle
    options = [f"option {i}" for i in range(4096)]
    so = StructuredOutputs("choice", json.dumps(options))
    outs = make_engine(b, {}).generate([_req(f"c{i}", b.spec, so, seed=i, temperature=1.0) for i in range(4)])
    assert all(o.finish_reason == "stop" and o.text in options for o in outs), [o.text for o in outs]
    assert len({o.text for o in outs}) > 1


@pytest.mark.parametrize(
    ("so", "needle"),
    [
        (StructuredOutputs("regex", "a(b"), "unclosed group"),
        (StructuredOutputs("json", "{not json"), "not valid JSON"),
        (StructuredOutputs("json", '["a list"]'), "must be an object"),
        (StructuredOutputs("json", json.dumps({"type": "frobnicate"})), "frobnicate"),
        (StructuredOutputs("choice", "[]"), "non-empty list"),
        (StructuredOutputs("choice", '["ok", 3]'), "non-empty list"),
        (StructuredOutputs("grammar", "start: undefined_rule"), "undefined_rule"),
        (StructuredOutputs("regex", "a\ud800"), "surrogate"),
        # nested past the JSON parser's recursion limit (a RecursionError, once a 500; Python 3.13's parser reads it,
        # and a list is no schema)
        (StructuredOutputs("json", "[" * 5000 + "]" * 5000), "RecursionError|must be an object"),
        (StructuredOutputs("choice", "[" * 5000 + "]" * 5000), "non-empty list"),
    ],
)
def test_invalid_specs_raise_grammar_error(tiny_llama_bundle, so, needle):
    g = GrammarCompiler(tiny_llama_bundle.tokenizer, tiny_llama_bundle.spec.vocab_size, 0)
    with pytest.raises(GrammarError) as e:
        g.compile(so)
    assert any(n in str(e.value) for n in needle.split("|")), (needle, str(e.value))
    assert g.compilations == 0


def test_a_refused_spec_is_refused_again_without_compiling(tiny_llama_bundle, monkeypatch):
    """A spec that failed (invalid, or too expensive to follow after seconds of work) is refused at once when sent
    again: a tenant repeating it made the server pay the whole compilation each time."""
    g = GrammarCompiler(tiny_llama_bundle.tokenizer, tiny_llama_bundle.spec.vocab_size, 0)
    tries = []
    real = g._compile_matcher
    monkeypatch.setattr(g, "_compile_matcher", lambda so: tries.append(so) or real(so))
    bad = StructuredOutputs("grammar", "start: undefined_rule")
    for _ in range(3):
        with pytest.raises(GrammarError, match="undefined_rule"):
            g.compile(bad)
    assert len(tries) == 1
    g.compile(REGEX)  # a good spec still compiles
    assert len(tries) == 2 and g.compilations == 1


# A chain of definitions each referring to the next, and of grammar rules: at these depths llguidance's
# compilation overflowed an 8 MiB thread stack (SIGSEGV: the whole server gone, from one request).
_DEEP_SPECS = """
import json, sys
from server.engine.structured import GrammarCompiler
from server.engine.types import StructuredOutputs
from tests.fixtures.models import make_tiny_tokenizer
tok = make_tiny_tokenizer()
g = GrammarCompiler(tok, len(tok), tok.eos_token_id)
n = 3000
defs = {f"d{i}": {"type": "object", "properties": {"a": {"$ref": f"#/$defs/d{i + 1}"}}, "required": ["a"]}
        for i in range(n)}
defs[f"d{n}"] = {"type": "string"}
g.compile(StructuredOutputs("json", json.dumps({"$ref": "#/$defs/d0", "$defs": defs})))
rules = "".join(f'r{i}: "x" r{i + 1} | "y"\\n' for i in range(6000))
g.compile(StructuredOutputs("grammar", "start: r0\\n" + rules + 'r6000: "z"\\n'))
print("compiled", g.compilations)
"""


def test_deep_chains_of_references_compile_on_a_deep_stack():
    """Run in a process of its own (a regression is a crash, not a failure)."""
    import subprocess
    import sys

    pytest.importorskip("llguidance")
    run = subprocess.run([sys.executable, "-c", _DEEP_SPECS], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "compiled 2" in run.stdout, (run.returncode, run.stderr[-2000:])


def test_specs_with_too_many_references_or_rules_are_refused(tiny_llama_bundle, monkeypatch):
    import threading

    from server.engine.structured import MAX_GBNF_RULES, MAX_GRAMMAR_RULES, MAX_SCHEMA_REFS

    g = GrammarCompiler(tiny_llama_bundle.tokenizer, tiny_llama_bundle.spec.vocab_size, 0)
    n = MAX_SCHEMA_REFS  # + the root's
    defs = {f"d{i}": {"type": "array", "items": {"$ref": f"#/$defs/d{i + 1}"}} for i in range(n)}
    defs[f"d{n}"] = {"type": "string"}
    with pytest.raises(GrammarError, match=f"{n + 1} \\$ref references: at most {MAX_SCHEMA_REFS}"):
        g.compile(StructuredOutputs("json", json.dumps({"$ref": "#/$defs/d0", "$defs": defs})))
    # counted once parsed: "\u0024ref" and "$\u0072ef" are the same key to the schema compiler
    for spelled in ("\\u0024ref", "$\\u0072ef"):
        escaped = json.dumps({"$ref": "#/$defs/d0", "$defs": defs}).replace('"$ref"', f'"{spelled}"')
        assert '"$ref"' not in escaped and json.loads(escaped)["$ref"] == "#/$defs/d0"
        with pytest.raises(GrammarError, match=f"{n + 1} \\$ref references: at most {MAX_SCHEMA_REFS}"):
            g.compile(StructuredOutputs("json", escaped))
    # GBNF (converted in Python, quadratic in its rules: 3,000 took 6 s), whatever separates its rules
    n = MAX_GBNF_RULES  # + root
    gbnf = "root ::= r0\r" + "".join(f"r{i} ::= r{i + 1}\r" for i in range(n - 1)) + f'r{n - 1} ::= "z"\r'
    with pytest.raises(GrammarError, match=f"{n + 1} GBNF rules: at most {MAX_GBNF_RULES}"):
        g.compile(StructuredOutputs("grammar", gbnf))
    n = MAX_GRAMMAR_RULES  # + start
    lark = "start: r0\r" + "".join(f"r{i}: r{i + 1}\r" for i in range(n - 1)) + f'r{n - 1}: "z"\r'
    with pytest.raises(GrammarError, match=f"{n + 1} rules: at most {MAX_GRAMMAR_RULES}"):
        g.compile(StructuredOutputs("grammar", lark))

    # no thread with the deep stack: refused, not compiled on an ordinary stack (which a deep chain overflows)
    def no_thread(self):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", no_thread)
    with pytest.raises(GrammarError, match="no thread for a compilation"):
        g.compile(REGEX)
    assert g.compilations == 0


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="kind"):
        StructuredOutputs("yaml", "x")  # type: ignore[arg-type]


def test_compiled_specs_are_cached_and_each_request_gets_its_own_matcher(tiny_llama_bundle):
    b = tiny_llama_bundle
    g = GrammarCompiler(b.tokenizer, b.spec.vocab_size, b.tokenizer.eos_token_id, cache_size=2)
    g.compile(REGEX)
    g.compile(REGEX)
    assert g.compilations == 1
    c1, c2 = g.constraint(REGEX), g.constraint(REGEX)
    assert g.compilations == 1
    one = b.tokenizer.convert_tokens_to_ids("1")
    assert c1.accept(one)
    masks = allowed_tokens(fill_masks([c1, c2], b.spec.vocab_size), b.spec.vocab_size)
    digits = {b.tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)}
    assert set(masks[1].nonzero().flatten().tolist()) == digits  # c2 still at the start
    assert set(masks[0].nonzero().flatten().tolist()) == digits  # c1 after one digit: still digits
    assert not c1.accept(b.tokenizer.convert_tokens_to_ids("-")) and c1.error  # after one digit '-' is wrong
    g.compile(CHOICE)
    g.compile(LARK)  # evicts REGEX (LRU of 2)
    g.constraint(REGEX)
    assert g.compilations == 4


def test_a_compiled_spec_carries_its_grammar_past_cache_eviction(tiny_llama_bundle):
    """What the server queues is `compile`'s result, grammar attached: evicted from the LRU meanwhile, the engine
    still starts from it instead of compiling on its own thread. `cached` never compiles."""
    b = tiny_llama_bundle
    g = GrammarCompiler(b.tokenizer, b.spec.vocab_size, b.tokenizer.eos_token_id, cache_size=1)
    assert g.cached(REGEX) is None and g.compilations == 0
    ready = g.compile(REGEX)
    assert ready == REGEX and ready.compiled is not None and g.cached(REGEX).compiled is ready.compiled
    g.compile(CHOICE)  # evicts REGEX
    assert g.cached(REGEX) is None
    c = g.constraint(ready)
    assert g.compilations == 2  # no third compilation
    one = b.tokenizer.convert_tokens_to_ids("1")
    assert c.accept(one)
    assert g.constraint(ready).accept(one)  # each constraint is its own copy at the grammar's start
    out = make_engine(b, {}).generate([_req("r", b.spec, ready, 0, max_tokens=20)])[0]
    assert out.finish_reason == "stop" and matches_regex(REGEX, out.text)


def test_masks_never_allow_tokens_past_the_tokenizer(tiny_llama_bundle):
    """A model whose logits are wider than its tokenizer's vocabulary (padded embeddings): the extra ids are never
    allowed, and JSON's end-of-sequence is the tokenizer's."""
    tok = tiny_llama_bundle.tokenizer
    g = GrammarCompiler(tok, 320, tok.eos_token_id)
    c = g.constraint(StructuredOutputs("regex", "(.|\n)*"))
    allowed = allowed_tokens(fill_masks([c], 320), 320)[0]
    assert allowed.shape == (320,)
    assert not allowed[len(tok) :].any()
    ascii_ids = tok.encode("".join(map(chr, range(32, 127))) + "\n\t", add_special_tokens=False)
    assert len(ascii_ids) == 97 and allowed[ascii_ids].all()
    assert allowed[tok.eos_token_id]  # the regex accepts here, so the output may end


def test_padded_decode_path_with_structured_rows(tiny_llama_bundle):
    """The body of the CUDA-graph test (tests/test_engine_cuda.py) on the padded static-buffer path, eagerly."""
    from tests.test_engine_cuda import structured_rows_graphed

    structured_rows_graphed(tiny_llama_bundle, "eager")


@pytest.mark.slow
def test_smollm2_answers_in_the_schema(smollm2_bundle):
    """The real model, greedy, chat prompts: constrained answers parse and carry the facts of the prompt; the same
    request unconstrained does not come back as bare JSON."""
    from server.model import render_prompt

    b = smollm2_bundle
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"}},
        "required": ["name", "age", "city"],
        "additionalProperties": False,
    }
    ask = "Give me JSON for a person named Alice who is 30 and lives in Paris."
    prompt = render_prompt(b.tokenizer, ask, "chat")
    so = StructuredOutputs("json", json.dumps(schema))
    yes_no = StructuredOutputs("choice", json.dumps(["yes", "no"]))
    date = StructuredOutputs("regex", r"\d{4}-\d{2}-\d{2}")
    reqs = [
        Request("json", prompt, SamplingParams(max_tokens=80, structured=so)),
        Request("free", prompt, SamplingParams(max_tokens=80)),
        Request(
            "choice",
            render_prompt(b.tokenizer, "Is Paris in France? Answer yes or no.", "chat"),
            SamplingParams(max_tokens=8, structured=yes_no),
        ),
        Request(
            "date",
            render_prompt(b.tokenizer, "When did the Apollo 11 moon landing happen?", "chat"),
            SamplingParams(max_tokens=16, structured=date),
        ),
    ]
    out = {o.request_id: o for o in make_engine(b, {}, kv_cache_bytes=64 * 2**20).generate(reqs)}
    assert out["json"].finish_reason == "stop"
    person = json.loads(out["json"].text)
    assert person["name"] == "Alice" and person["city"] == "Paris" and isinstance(person["age"], int)
    with pytest.raises(ValueError):
        json.loads(out["free"].text)
    assert out["choice"].text == "yes"
    assert re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", out["date"].text), out["date"].text


def test_min_tokens_holds_off_the_end_only_while_the_grammar_can_go_on(tiny_llama_bundle):
    """min_tokens bans end-of-sequence while the grammar allows another token (the regex's optional `.xx` is then
    written instead of ending), but a grammar that is complete wins: the request ends, short of min_tokens, with
    `stop` and not an error (masking every token the grammar allows would leave nothing to sample)."""
    b = tiny_llama_bundle
    eos = b.tokenizer.eos_token_id

    def pair(so, seed: int) -> tuple:
        free = _req("free", b.spec, so, seed=seed)
        held = Request("held", free.prompt_token_ids, dataclasses.replace(free.sampling, min_tokens=40))
        return tuple(make_engine(b, {}).generate([free, held]))

    ended_early = 0
    for seed in range(6):
        free, held = pair(REGEX, seed)
        assert held.error is None and held.finish_reason == "stop" and len(held.token_ids) < 40
        assert matches(REGEX, held.text) and eos not in held.token_ids
        if free.token_ids[-1] == eos:  # free ended after the letters; held could not, so wrote ".xx"
            ended_early += 1
            assert held.text.startswith(free.text) and re.fullmatch(
                r"\.[a-z]{2}", held.text[len(free.text) :]
            )
        else:
            assert held.text == free.text
    assert ended_early >= 2  # the seeds do exercise the ban
    for so in (JSON_COMPACT, CHOICE, LARK):
        free, held = pair(so, 3)
        assert held.error is None and held.finish_reason == "stop" and held.text == free.text
        assert len(held.token_ids) < 40 and matches(so, held.text)


def test_refusals_are_said_in_the_requests_terms():
    """llguidance's words for two refusals named an option no request can set ('coerce_one_of') or an internal
    type ('NoExtensionBias')."""
    from tests.fixtures.models import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    g = GrammarCompiler(tok, len(tok), tok.eos_token_id)
    for schema, words in (
        ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "use anyOf"),
        ({"$ref": "#"}, "refers only to itself"),
    ):
        with pytest.raises(GrammarError) as e:
            g.compile(StructuredOutputs("json", json.dumps(schema)))
        assert (
            words in str(e.value)
            and "coerce_one_of" not in str(e.value)
            and "NoExtension" not in str(e.value)
        )


@pytest.mark.parametrize("tags", ["text", "added tokens"])
def test_a_grammar_after_the_thinking_leaves_the_thinking_free(tags):
    """`think`: any text up to the first `</think>`, then the spec's own grammar (JSON may start after whitespace,
    other kinds at once); "opened" starts inside the thinking, "optional" may open one or answer at once. The tags are
    single tokens where the tokenizer has them (llguidance matches those by token, not by text)."""
    pytest.importorskip("llguidance")
    from tokenizers import AddedToken

    from tests.fixtures.models import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    if tags == "added tokens":
        tok.add_tokens([AddedToken("<think>", special=False), AddedToken("</think>", special=False)])
    compiler = GrammarCompiler(tok, len(tok), tok.eos_token_id)

    def follows(so: StructuredOutputs, text: str) -> bool:
        c = compiler.constraint(compiler.compile(so))
        return (
            all(c.accept(t) for t in tok.encode(text, add_special_tokens=False)) and c.matcher.is_accepting()
        )

    person = StructuredOutputs("json", json.dumps({"type": "object", "properties": {"a": {"type": "integer"}},
                                                   "required": ["a"], "additionalProperties": False}))  # fmt: skip
    opened = dataclasses.replace(person, think="opened")
    assert follows(opened, 'hmm {"a": 1} </thin\n</think>\n\n{"a": 1}')
    assert follows(opened, '<think>x</think>{"a": 2}')  # a leading <think> is thinking text
    assert not follows(opened, '{"a": 1}')  # the thinking is not over: no answer yet
    assert not follows(opened, 'x</think>{"a": 1}</think>')  # the thinking ends at the first </think>
    assert not follows(opened, 'x</think>{"b": 1}') and not follows(opened, "x</think>")
    compact = dataclasses.replace(opened, any_whitespace=False)
    assert follows(compact, 'x</think>\n\n{"a":1}')  # the blank line after the tag, whatever any_whitespace
    assert not follows(compact, 'x</think>{"a": 1}') and not follows(
        compact, "x</think>" + " " * 34 + '{"a":1}'
    )
    choice = StructuredOutputs("choice", json.dumps(["yes", "no"]), think="optional")
    assert follows(choice, "<think>maybe? </think>yes") and follows(choice, "no")
    assert not follows(choice, "maybe</think>yes")  # without <think> first, no thinking
    assert not follows(
        choice, "\n<think>a</think>no"
    )  # (nor after whitespace: a model could spend its tokens there)
    assert not follows(choice, "<think>x</think>\nyes")  # a regex answer starts right after the tag
    if tags == "added tokens":  # the tag written out as text ends the thinking too (where the parser ends it)
        written = [tok.convert_tokens_to_ids(c) for c in "x</think>"]
        end = tok.convert_tokens_to_ids("</think>")
        c = compiler.constraint(compiler.compile(choice))
        assert all(c.accept(t) for t in [tok.convert_tokens_to_ids("<think>"), *written])
        assert not c.accept(end)  # no more thinking after it: the answer's turn
        c = compiler.constraint(compiler.compile(choice))
        assert all(c.accept(t) for t in [tok.convert_tokens_to_ids("<think>"), *written[:-1], end])
        assert all(c.accept(tok.convert_tokens_to_ids(ch)) for ch in "no") and c.matcher.is_accepting()
    grammar = StructuredOutputs("grammar", 'start: "a"+', think="optional")
    assert follows(grammar, "<think></think>aaa") and not follows(grammar, "<think></think>b")
    regex = StructuredOutputs("regex", r"\d{3}", think="opened")
    assert follows(regex, "think</think>123") and not follows(regex, "think</think>12a")
    # a user grammar's references mean what they mean without the thinking (not the wrapper's names)
    with pytest.raises(GrammarError, match="unknown grammar"):
        compiler.compile(StructuredOutputs("grammar", 'start: "a" @answer', think="opened"))
    # the spec with and without thinking are two cache entries
    assert compiler.cached(dataclasses.replace(regex, think=None)) is None


def test_the_grammar_cache_is_bounded_by_its_specs_size(monkeypatch):
    """Besides its count, the compiled-grammar cache holds at most GRAMMAR_CACHE_CHARS of spec text (large schemas
    of one tenant held 0.5-0.8 GB at 256 entries): the oldest go first, the newest always stays."""
    pytest.importorskip("llguidance")
    import server.engine.structured as st
    from tests.fixtures.models import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    compiler = GrammarCompiler(tok, len(tok), tok.eos_token_id)
    specs = [
        StructuredOutputs("json", json.dumps({"type": "object", "properties": {f"p{i}_{j}": {"type": "string"}
                                                                           for j in range(20)}}))
        for i in range(6)
    ]  # fmt: skip
    size = len(specs[0].spec)
    monkeypatch.setattr(st, "GRAMMAR_CACHE_CHARS", 3 * size)
    for so in specs:
        compiler.compile(so)
    assert [compiler.cached(so) is not None for so in specs] == [False] * 3 + [True] * 3
    assert compiler._compiled_chars == sum(len(so.spec) for so in specs[3:])
    monkeypatch.setattr(st, "GRAMMAR_CACHE_CHARS", 1)  # smaller than any: the newest alone
    compiler.compile(specs[0])
    assert list(compiler._compiled) == [specs[0]] and compiler._compiled_chars == size
    # the refused specs (kept to refuse a repeat at once) likewise
    monkeypatch.setattr(st, "GRAMMAR_CACHE_CHARS", 2 * size)
    bad = [StructuredOutputs("regex", "(" * 3 + f"x{i}" + " " * (size - 5)) for i in range(4)]
    for so in bad:
        with pytest.raises(GrammarError):
            compiler.compile(so)
    assert list(compiler._refused) == bad[2:] and compiler._refused_chars == sum(
        len(so.spec) for so in bad[2:]
    )


@pytest.mark.parametrize("tags", ["text", "added tokens"])
def test_the_thinking_ends_at_the_parsers_own_tag(tags):
    """Another parser's tags (seed_oss: `<seed:think>...</seed:think>`, with regex metacharacters and `/` in them)
    bound the thinking instead of `<think>`, as text or as the tokenizer's tokens."""
    pytest.importorskip("llguidance")
    from tokenizers import AddedToken

    from tests.fixtures.models import make_tiny_tokenizer

    start, end = "<seed:think>", "</seed:think>"
    tok = make_tiny_tokenizer()
    if tags == "added tokens":
        tok.add_tokens([AddedToken(start, special=False), AddedToken(end, special=False)])
    compiler = GrammarCompiler(tok, len(tok), tok.eos_token_id)

    def follows(so: StructuredOutputs, text: str) -> bool:
        c = compiler.constraint(compiler.compile(so))
        return (
            all(c.accept(t) for t in tok.encode(text, add_special_tokens=False)) and c.matcher.is_accepting()
        )

    seed = {"think_tags": (start, end)}
    opened = StructuredOutputs("regex", r"\d{2}", think="opened", **seed)
    assert follows(opened, "a.b*c</think>x</seed:think>42")
    assert not follows(opened, "x</think>42") and not follows(opened, "x</seed:think>4a")
    choice = StructuredOutputs("choice", json.dumps(["yes", "no"]), think="optional", **seed)
    assert follows(choice, "<seed:think>hm</seed:think>no") and follows(choice, "yes")
    assert not follows(choice, "<think>hm</think>no")
    # another parser's tags are another grammar
    assert compiler.cached(dataclasses.replace(opened, think_tags=("<think>", "</think>"))) is None


@pytest.mark.parametrize("trigger", ["text", "added token"])
def test_structural_tags(trigger):
    """Free text; a trigger must go on as a structure that begins with it (its content a value of its schema, then
    its end); a `<...>` trigger the tokenizer has as a token is matched as that token."""
    pytest.importorskip("llguidance")
    from tokenizers import AddedToken

    from tests.fixtures.models import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    if trigger == "added token":
        tok.add_tokens([AddedToken("<tool>", special=False)])
        begins, triggers = ["<tool>"], ["<tool>"]
    else:
        begins, triggers = ["<function=get_weather>", "<function=get_time>"], ["<function="]
    compiler = GrammarCompiler(tok, len(tok), tok.eos_token_id)
    city = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
            "additionalProperties": False}  # fmt: skip
    so = StructuredOutputs("structural_tag", json.dumps({
        "structures": [{"begin": b, "schema": city, "end": "</function>"} for b in begins], "triggers": triggers}))  # fmt: skip

    def follows(text: str) -> bool:
        c = compiler.constraint(compiler.compile(so))
        return (
            all(c.accept(t) for t in tok.encode(text, add_special_tokens=False)) and c.matcher.is_accepting()
        )

    call = f'{begins[-1]}{{"city": "Oslo"}}</function>'
    assert follows("just text") and follows(f"Sure. {call} and {call}") and follows("")
    assert not follows(f'{begins[0]}{{"town": 1}}</function>')  # the schema holds
    assert not follows(call[: -len("</function>")])  # the end is owed
    if trigger == "text":
        assert not follows('<function=get_date>{"city": "a"}</function>')  # no structure begins so
    for bad, why in [
        ({"structures": [], "triggers": ["<f"]}, "structures must be a list"),
        ({"structures": [{"begin": "x"}], "triggers": ["<f"]}, "starts with none of the triggers"),
        ({"structures": [{"begin": "<f", "schema": 3}], "triggers": ["<f"]}, "schema must be a JSON schema"),
        ({"structures": [{"begin": "<f", "extra": 1}], "triggers": ["<f"]}, "must be an object"),
        ({"structures": [{"begin": "<f"}], "triggers": [""]}, "non-empty strings"),
        ([1], "must be an object"),
    ]:
        with pytest.raises(GrammarError, match=why):
            compiler.compile(StructuredOutputs("structural_tag", json.dumps(bad)))


def test_compiler_errors_keep_neither_the_grammar_dump_nor_a_panic_backtrace():
    from server.engine.structured import _without_dump

    said = "panicked at src/earley/parser.rs:12: index out of bounds\n<backtrace>\n   0: llguidance::x\n   1: std"
    assert _without_dump(said) == "panicked at src/earley/parser.rs:12: index out of bounds"
    assert _without_dump("unexpected token 'x'\n<state>\nrule r0 ::= SECRET") == "unexpected token 'x'"


def test_a_token_the_grammar_refuses_is_not_the_outputs(tiny_llama_bundle, monkeypatch):
    """A grammar that refuses a token the mask let through (a parser limit) fails the request: the refused token is
    neither sent nor counted in its usage, and the engine's generated-token count leaves it out too."""
    from server.engine.structured import Constraint

    b = tiny_llama_bundle
    calls: dict[int, int] = {}
    accept = Constraint.accept

    def refuse_the_fourth(self: Constraint, token: int) -> bool:
        calls[id(self)] = calls.get(id(self), 0) + 1
        return calls[id(self)] < 4 and accept(self, token)

    monkeypatch.setattr(Constraint, "accept", refuse_the_fourth)
    eng = make_engine(b, {})
    eng.add_request(_req("r", b.spec, StructuredOutputs("regex", "[a-z]{30}"), 0))
    events = []
    while eng.has_unfinished():
        events += eng.step()
    sent = [t for ev in events for t in ev.token_ids]
    last = events[-1]
    assert last.finished and last.finish_reason == "error" and last.error_type == "GrammarError"
    assert len(sent) == 3 and last.completion_tokens == 3 and eng.num_generated_tokens == 3, (sent, last)


def test_a_grammar_its_bad_words_or_allowed_tokens_leave_no_token_for_fails_where_it_dead_ends(
    tiny_llama_bundle,
):
    """The grammar's mask and the request's own token masks (bad_words, allowed_token_ids) together may leave no
    token: the request fails with GrammarError at that token, keeping the tokens before it (the fuzzer's seeds 8037
    and 8246 draw `[a-z]{1,40}` with bad_words banning every letter); a ban that leaves the grammar a token is
    followed. Tokens of the tiny byte tokenizer: "0"-"9" are 15-24, "-" 12, "a"-"z" 64-89."""
    b = tiny_llama_bundle
    letters = tuple((t,) for t in range(64, 90))
    prompt = random_prompt(b.spec.vocab_size, 6, 0)

    def req(rid: str, so: StructuredOutputs, **kw) -> Request:
        return Request(rid, prompt, SamplingParams(max_tokens=20, ignore_eos=True, structured=so, **kw))

    reqs = [
        req("first", StructuredOutputs("regex", "[a-z]{1,40}"), bad_words_token_ids=letters),
        req("later", REGEX, bad_words_token_ids=letters),
        req("allowed", REGEX, allowed_token_ids=tuple(range(40, 80))),
        req("some", StructuredOutputs("regex", "[a-z]{1,40}"), bad_words_token_ids=letters[:25]),
    ]
    out = {o.request_id: o for o in make_engine(b, {}).generate(reqs)}
    for rid, n_sent in (("first", 0), ("later", 4), ("allowed", 0)):
        o = out[rid]
        assert o.finish_reason == "error" and o.error_type == "GrammarError", (rid, o)
        # (and says the request's own masks took part)
        why = "no token can continue the output within its structured-output constraint and its allowed_token_ids"
        assert o.error == why + " / bad_words", (rid, o.error)
        assert len(o.token_ids) == n_sent, (rid, o.token_ids)
    sent = out["later"].token_ids  # three digits and "-": then only banned letters can go on
    assert all(15 <= t <= 24 for t in sent[:3]) and sent[3] == 12, sent
    assert out["some"].error is None and set(out["some"].text) == {"z"}, out["some"]
