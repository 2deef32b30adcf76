"""vLLM's thinking_token_budget in the engine: once an output has written its budget of tokens inside a thinking, the
closing tag's tokens are forced, and what follows is the model's own greedy continuation of that (exact, against
plain transformers fed the same prefix KV)."""

from __future__ import annotations

import pytest

from server.engine import PrefixKey, Request, SamplingParams
from server.engine.sampler import NON_FINITE, sample
from server.engine.thinking import ThinkingState
from server.engine.types import ThinkingBudget
from tests.engine_utils import hf_greedy, make_engine, random_kv, random_prompt

START, END = (7,), (11, 12)  # token ids of made-up tags: a one-token opening, a two-token closing


def _feed(state: ThinkingState, tokens: list[int]) -> list[int | None]:
    """What `state` forces before each of `tokens` (fed after)."""
    seen = []
    for t in tokens:
        seen.append(state.forced())
        state.feed(t)
    return seen


def test_the_state_counts_tokens_inside_a_thinking_and_forces_its_closing_tag():
    # opened by the prompt: 3 tokens, then the closing tag, then nothing more is forced
    s = ThinkingState(ThinkingBudget(3, START, END, opened=True))
    assert _feed(s, [1, 2, 3, 11, 12, 4, 5]) == [None, None, None, 11, 12, None, None]
    assert not s.inside
    # not opened: only an opening tag starts the count (each thinking its own)
    s = ThinkingState(ThinkingBudget(2, START, END))
    assert _feed(s, [1, 2, 3, 7, 1, 2, 11, 12, 5, 7, 9]) == [None] * 6 + [11, 12, None, None, None]
    assert s.forced() is None and s.inside and s.count == 1
    # a thinking the model closes within its budget is left alone
    s = ThinkingState(ThinkingBudget(5, START, END, opened=True))
    assert _feed(s, [1, 11, 12, 2, 3, 4, 5, 6, 7]) == [None] * 9
    # a closing tag the model began itself is finished, not written twice
    s = ThinkingState(ThinkingBudget(2, START, END, opened=True))
    assert _feed(s, [1, 11, 12]) == [None, None, 12]
    # a prompt that wrote 2 tokens of its thinking already (a continued message): 1 more, then the tag
    s = ThinkingState(ThinkingBudget(3, START, END, opened=True, spent=2))
    assert _feed(s, [1, 11, 12]) == [None, 11, 12]
    # budget 0: the closing tag at once
    s = ThinkingState(ThinkingBudget(0, START, END, opened=True))
    assert _feed(s, [11, 12, 3]) == [11, 12, None]
    with pytest.raises(ValueError, match="thinking_token_budget"):
        ThinkingBudget(-1, START, END)
    with pytest.raises(ValueError, match="tags"):
        ThinkingBudget(1, (), END)


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
    opening tag the model writes itself (made the tag here: its own second greedy token) starts the count; an output
    that never opens one is untouched; budget 0 forces the tag first. Every row equals transformers' greedy decoding
    of its prompt followed by the tokens forced (async decoding leaves such rows to the host, which forces in
    time; so does speculative decoding, `test_which_rows_speculate`)."""
    b, keys = setup
    k0, k1 = list(keys)
    vocab, new = b.spec.vocab_size, 14
    p0, p1 = random_prompt(vocab, 9, 1), random_prompt(vocab, 5, 2)
    plain = {
        r.request_id: r.token_ids
        for r in make_engine(b, keys).generate(
            [
                Request("a", p0, SamplingParams(max_tokens=new, ignore_eos=True), k0),
                Request("b", p1, SamplingParams(max_tokens=new, ignore_eos=True), k1),
            ]
        )
    }
    # a two-token closing tag the plain outputs do not write: forced, it is what changes them
    end = tuple(t for t in range(vocab) if t not in plain["a"] + plain["b"])[:2]
    opened_at, budget = plain["b"][1], 3
    absent = next(t for t in range(vocab) if t not in plain["a"] and t not in end)
    reqs = [
        Request("opened", p0, _budgeted(new, ThinkingBudget(4, (opened_at,), end, opened=True)), k0),
        Request("writes-tag", p1, _budgeted(new, ThinkingBudget(budget, (opened_at,), end)), k1),
        Request("never", p0, _budgeted(new, ThinkingBudget(2, (absent,), end)), k0),
        Request("zero", p1, _budgeted(new, ThinkingBudget(0, (opened_at,), end, opened=True)), k1),
        Request("plain", p1, SamplingParams(max_tokens=new, ignore_eos=True), k1),
    ]
    out = {o.request_id: o.token_ids for o in make_engine(b, keys, **cfg).generate(reqs)}

    def continued(kv, prompt, head):  # the model's greedy output after `head`
        return head + hf_greedy(b.hf_model, kv, prompt + head, new - len(head))

    assert out["opened"] == continued(keys[k0], p0, plain["a"][:4] + list(end))
    # the tag is its second token: 3 tokens inside the thinking after it, then the closing
    assert out["writes-tag"] == continued(keys[k1], p1, plain["b"][: 2 + budget] + list(end))
    assert out["never"] == plain["a"]
    assert out["zero"] == continued(keys[k1], p1, list(end))
    assert out["plain"] == plain["b"]


def _budgeted(new: int, budget: ThinkingBudget, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=new, ignore_eos=True, thinking_budget=budget, **kw)


def test_a_sampled_row_is_forced_at_its_budget_and_reproducible(setup):
    b, keys = setup
    k0 = next(iter(keys))
    prompt = random_prompt(b.spec.vocab_size, 6, 4)
    end = (3, 4, 5)
    sp = _budgeted(10, ThinkingBudget(2, (1,), end, opened=True), temperature=1.0, seed=7)
    eng = make_engine(b, keys)
    first, again = (eng.generate([Request(f"s{i}", prompt, sp, k0)])[0].token_ids for i in range(2))
    assert first == again
    cut = next(i for i in range(len(first)) if tuple(first[i : i + 3]) == end)
    assert cut <= 2  # at the budget, or earlier where the model began the tag itself
