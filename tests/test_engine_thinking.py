"""vLLM's thinking_token_budget in the engine: once an output has written its budget of tokens inside a thinking, the
closing tag's tokens are forced, and what follows is the model's own greedy continuation of that (exact, against
plain transformers fed the same prefix KV)."""

from __future__ import annotations

import pytest

from server.engine import PrefixKey, Request, SamplingParams
from server.engine.sampler import NON_FINITE, sample
from server.engine.thinking import (
    MAX_OVERSHOOT,
    ThinkingState,
    closing_tag_rest,
    cut_character,
    tokens_after_tag,
)
from server.engine.types import ThinkingBudget
from tests.engine_utils import hf_greedy, make_engine, random_kv, random_prompt


class _Bytes:
    """Token texts of a made-up vocabulary: token i is the byte i (ASCII)."""

    def entry(self, token: int) -> tuple[str, bytes]:
        return chr(token), bytes([token])


def _ids(text: str) -> list[int]:
    return list(text.encode())


def _budget(tokens: int, opened: bool = False, spent: int = 0, end: str = "</t>") -> ThinkingBudget:
    # what is forced from each byte of the closing tag on: its bytes (one token each here)
    rest = tuple(tuple(_ids(end[k:])) for k in range(len(end)))
    return ThinkingBudget(tokens, "<t>", end, rest, opened, spent)


def _feed(state: ThinkingState, text: str) -> str:
    """What `state` forces before each token of `text` (fed after): the forced token's character, or '.'."""
    seen = []
    for t in _ids(text):
        f = state.forced()
        seen.append("." if f is None else chr(f))
        state.feed(t)
    return "".join(seen)


def test_the_state_follows_the_thinking_as_the_parser_does_and_forces_its_closing_tag():
    b = _Bytes()
    # opened by the prompt: 3 tokens, then the closing tag, then nothing more is forced
    s = ThinkingState(_budget(3, opened=True), b)
    assert _feed(s, "abc</t>de") == "...</t>.." and s.state == "answer"
    # not opened: an opening tag at the output's start (after whitespace) opens it
    s = ThinkingState(_budget(2), b)
    assert _feed(s, " <t>ab</t>c") == "......</t>." and s.state == "answer"
    # ... anywhere else it is answer text, as for the parser (which never re-enters a thinking either)
    s = ThinkingState(_budget(1), b)
    assert _feed(s, "x<t>abcd") == "........" and s.state == "answer"
    s = ThinkingState(_budget(1, opened=True), b)
    assert _feed(s, "a</t><t>bcd") == ".</t>......" and s.state == "answer"
    # a thinking the model closes within its budget is left alone
    s = ThinkingState(_budget(5, opened=True), b)
    assert _feed(s, "a</t>bcdefg") == "..........."
    # a closing tag the model began itself is finished, not written twice
    s = ThinkingState(_budget(3, opened=True), b)
    assert _feed(s, "a</t>") == "...t>"
    # a prompt that wrote 2 tokens of its thinking already (a continued message): 1 more, then the tag
    s = ThinkingState(_budget(3, opened=True, spent=2), b)
    assert _feed(s, "a</t>") == ".</t>"
    # budget 0: the closing tag at once
    s = ThinkingState(_budget(0, opened=True), b)
    assert _feed(s, "</t>x") == "</t>."
    with pytest.raises(ValueError, match="thinking_token_budget"):
        _budget(-1)
    with pytest.raises(ValueError, match="tags"):
        ThinkingBudget(1, "<t>", "", ((),))


def test_a_budget_spent_inside_a_character_lets_the_model_finish_it():
    """A byte-level BPE splits a non-ASCII character over tokens: the closing tag is forced once the character is
    whole (a grammar after the thinking takes no `<` after a character's first byte), at most MAX_OVERSHOOT tokens
    late; a byte that starts no character (or ASCII) is whole."""
    assert not cut_character(b"") and not cut_character(b"a") and not cut_character("é".encode())
    assert cut_character(b"a\xc3") and cut_character("😀".encode()[:3]) and cut_character(b"\xe2\x82")
    assert not cut_character(b"\x82") and not cut_character(b"\xf0x") and not cut_character(b"\xff")
    b = _Bytes()

    def forced(budget: int, ids: list[int]) -> list[int | None]:
        s = ThinkingState(_budget(budget, opened=True), b)
        out = []
        for t in ids:
            out.append(s.forced())
            s.feed(t)
        return [*out, s.forced()]

    lt = ord("<")
    # 2 tokens: "a" and é's first byte; é's second byte is the model's, then the tag
    assert forced(2, [*_ids("aé")]) == [None, None, None, lt]
    assert forced(1, [*_ids("😀")]) == [
        None,
        None,
        None,
        None,
        lt,
    ]  # (the 4th byte: MAX_OVERSHOOT tokens late)
    assert forced(1, _ids("ab")) == [None, lt, lt]
    # first bytes that never end (each starts another character): forced after MAX_OVERSHOOT tokens anyway
    assert forced(1, [0xE0] * 6) == [None] * (1 + MAX_OVERSHOOT) + [lt] * 3


def test_prompt_thinking_is_counted_in_tokens_after_its_last_opening_tag():
    b = _Bytes()
    assert tokens_after_tag(b, _ids("q<t>x</t>y<t>abc"), b"<t>") == 3
    assert tokens_after_tag(b, _ids("q<t>"), b"<t>") == 0
    assert tokens_after_tag(b, _ids("no tag here"), b"<t>") == 0


def test_a_forced_token_wins_over_the_scores_but_not_over_non_finite_logits():
    import torch

    logits = torch.zeros(3, 20)
    logits[:, 5] = 10.0
    logits[2, 0] = float("nan")
    params = [
        SamplingParams(max_tokens=4, logprobs=0),
        SamplingParams(max_tokens=4, temperature=1.0, seed=1),
    ] * 2
    gens = [None, torch.Generator().manual_seed(1), None]
    out = sample(logits, params[:3], gens, forced={0: 9, 1: 9, 2: 9})
    assert out.tokens[:2] == [9, 9] and out.failed == {2: NON_FINITE}
    # the forced token's log-probability is the model's
    assert out.logprobs[0].token_id == 9 and out.logprobs[0].logprob == pytest.approx(
        float(torch.log_softmax(logits[0], -1)[9])
    )


@pytest.fixture
def setup(tiny_llama_bundle):
    b = tiny_llama_bundle
    keys = {PrefixKey(f"t{i}", "p", 1): random_kv(b.spec, 6, i) for i in range(2)}
    return b, keys


@pytest.mark.parametrize("cfg", [{}, {"async_decode": "on"}], ids=["sync", "async"])
def test_budgeted_outputs_equal_the_models_continuation_of_the_forced_tag(setup, cfg):
    """In one mixed batch (two tenants, a plain row beside): a thinking the prompt opened is cut at its budget; an
    opening tag the model writes at its start (made the tag here: its own first greedy token) starts the count; an
    output that does not open one is untouched; budget 0 forces the tag first. Every row equals transformers'
    greedy decoding of its prompt followed by the tokens forced (async decoding leaves such rows to the host, which
    forces in time; so does speculative decoding, `test_which_rows_speculate`)."""
    from server.engine.token_bytes import TokenTexts

    b, keys = setup
    k0, k1 = list(keys)
    texts, tok = TokenTexts(b.tokenizer), b.tokenizer
    vocab, new = b.spec.vocab_size, 14
    plain: dict[str, list[int]] = {}
    prompts = {}
    for seed in range(40):  # prompts whose greedy outputs start with a printable character (an opening tag)
        p = random_prompt(vocab, 7, seed)
        out = make_engine(b, keys).generate(
            [Request("x", p, SamplingParams(max_tokens=new, ignore_eos=True), k1)]
        )
        first = texts.entry(out[0].token_ids[0])[1]
        if len(first) == 1 and 33 <= first[0] < 127:
            prompts["b"], plain["b"] = p, out[0].token_ids
            break
    assert plain, "no prompt of 40 starts its output with a printable character"
    prompts["a"] = random_prompt(vocab, 9, 1)
    plain["a"] = (
        make_engine(b, keys)
        .generate([Request("a", prompts["a"], SamplingParams(max_tokens=new, ignore_eos=True), k0)])[0]
        .token_ids
    )
    p0, p1 = prompts["a"], prompts["b"]
    seen = {bytes(texts.entry(t)[1]) for t in plain["a"] + plain["b"]}
    # a two-character closing tag the plain outputs do not write: forced, it is what changes them
    end = "".join(c for c in "~}|{`^]\\[@?" if c.encode() not in seen)[:2]
    assert len(end) == 2
    rest = tuple(tuple(tok.encode(end[k:], add_special_tokens=False)) for k in range(len(end)))
    opening = texts.entry(plain["b"][0])[0]  # the model's own first token, as the opening tag
    absent = next(c for c in "ZQXJ" if c != opening and c.encode() not in seen)

    def budget(n: int, start: str, opened: bool = False) -> SamplingParams:
        return _budgeted(new, ThinkingBudget(n, start, end, rest, opened))

    reqs = [
        Request("opened", p0, budget(4, absent, opened=True), k0),
        Request("writes-tag", p1, budget(3, opening), k1),
        Request("never", p0, budget(2, absent), k0),
        Request("zero", p1, budget(0, absent, opened=True), k1),
        Request("plain", p1, SamplingParams(max_tokens=new, ignore_eos=True), k1),
    ]
    out = {o.request_id: o.token_ids for o in make_engine(b, keys, **cfg).generate(reqs)}
    forced = list(rest[0])

    def continued(kv, prompt, head):  # the model's greedy output after `head`
        return head + hf_greedy(b.hf_model, kv, prompt + head, new - len(head))

    assert out["opened"] == continued(keys[k0], p0, plain["a"][:4] + forced)
    # the tag is its first token: 3 tokens inside the thinking after it, then the closing
    assert out["writes-tag"] == continued(keys[k1], p1, plain["b"][:4] + forced)
    assert out["never"] == plain["a"]
    assert out["zero"] == continued(keys[k1], p1, forced)
    assert out["plain"] == plain["b"]


def _budgeted(new: int, budget: ThinkingBudget, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=new, ignore_eos=True, thinking_budget=budget, **kw)


def test_a_sampled_row_is_forced_at_its_budget_and_reproducible(setup):
    b, keys = setup
    k0 = next(iter(keys))
    prompt = random_prompt(b.spec.vocab_size, 6, 4)
    end = "</x>"
    rest = tuple(tuple(b.tokenizer.encode(end[k:], add_special_tokens=False)) for k in range(len(end)))
    sp = _budgeted(10, ThinkingBudget(2, "<x>", end, rest, opened=True), temperature=1.0, seed=7)
    eng = make_engine(b, keys)
    first, again = (eng.generate([Request(f"s{i}", prompt, sp, k0)])[0].token_ids for i in range(2))
    assert first == again
    # the closing tag's tokens at the budget, or earlier where the model began the tag itself
    tag = list(rest[0])
    at = next(i for i in range(len(first)) if first[i : i + len(tag)] == tag)
    assert at <= 2, first


def test_a_closing_tag_spelled_by_other_tokens_ends_the_thinking(smollm2_bundle):
    """On SmolLM2 `</think>` alone is [</, think, >] but after a space [ </, think, >]: the thinking ends at the tag's
    text whatever tokens spell it, as the reasoning parser reads it (matching the tag's own token ids missed it,
    and forced a `</think>` into the answer)."""
    from server.engine.token_bytes import TokenTexts

    tok = smollm2_bundle.tokenizer
    spaced = tok.encode("easy </think> A: 8", add_special_tokens=False)
    assert (
        tok.encode("</think>", add_special_tokens=False)[0] not in spaced
    )  # other tokens than the tag alone
    budget = ThinkingBudget(6, "<think>", "</think>", closing_tag_rest(tok, "</think>"), opened=True)
    s = ThinkingState(budget, TokenTexts(tok))
    for t in spaced:
        assert s.forced() is None
        s.feed(t)
    assert s.state == "answer"
    # cut: the tag's first bytes written by the model, the rest forced (`</` then `think`, `>`)
    s = ThinkingState(ThinkingBudget(1, "<think>", "</think>", budget.rest, opened=True), TokenTexts(tok))
    for t in tok.encode("a </", add_special_tokens=False):
        s.feed(t)
    rest = []
    while (f := s.forced()) is not None:
        rest.append(f)
        s.feed(f)
    assert tok.decode(rest) == "think>" and s.state == "answer"


def test_a_structured_answer_after_a_budget_that_cuts_a_character(tiny_llama_bundle):
    """A thinking budget with a structured answer (its grammar follows the thinking): budgets that end the thinking
    inside a character (the tiny model's byte-level tokens split them) once failed the request with the grammar
    refusing the forced `<`; each now answers JSON that parses (or is cut by its length)."""
    pytest.importorskip("llguidance")
    import json

    from server.engine import StructuredOutputs

    b = tiny_llama_bundle
    tok = b.tokenizer
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    so = StructuredOutputs("json", json.dumps(schema), any_whitespace=False, think="opened")
    rest = closing_tag_rest(tok, "</think>")
    eng = make_engine(b, {})
    cases = [(budget, seed) for budget in (1, 2, 8) for seed in range(4)]
    reqs = [
        Request(
            f"{budget}-{seed}",
            random_prompt(250, 9, seed),
            SamplingParams(
                max_tokens=60,
                thinking_budget=ThinkingBudget(budget, "<think>", "</think>", rest, opened=True),
                structured=so,
            ),
        )
        for budget, seed in cases
    ]
    late = 0
    for (budget, _), out in zip(cases, eng.generate(reqs), strict=True):
        assert out.error is None, (out.request_id, out.error)
        text = tok.decode(out.token_ids)
        _, tag, answer = text.partition("</think>")
        assert tag, out.request_id
        cut = out.token_ids.index(tok.convert_tokens_to_ids("<"))  # where the forced tag starts
        assert budget <= cut <= budget + MAX_OVERSHOOT, (out.request_id, cut)
        late += cut > budget
        if out.finish_reason == "stop":
            assert "n" in json.loads(answer)
    assert late, "no budget ended inside a character: the case is not exercised"
