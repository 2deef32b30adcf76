import asyncio

import pytest

from server.api.limits import RateLimiter, TenantLimit, parse_limits
from server.api.logprobs import TextOffsets, TokenTexts, chat_logprobs, completion_logprobs
from server.engine import TokenLogprob
from tests.fixtures.models import make_tiny_tokenizer


def _byte_id(tok, byte):
    from server.engine.token_bytes import _byte_level_table

    ch = next(c for c, b in _byte_level_table().items() if b == byte)
    return tok.convert_tokens_to_ids(ch)


def test_chat_logprobs_carry_the_raw_bytes_of_a_partial_character():
    tok = make_tiny_tokenizer()
    texts = TokenTexts(tok)
    i = _byte_id(tok, 0xE2)
    out = chat_logprobs([TokenLogprob(i, -1.0, ((i, -1.0),), 1)], texts)["content"][0]
    assert (
        out["token"] == "bytes:\\xe2" and out["bytes"] == [0xE2] and out["top_logprobs"][0]["bytes"] == [0xE2]
    )


def test_completion_top_logprobs_always_hold_the_sampled_token():
    """OpenAI / vLLM legacy completions: up to logprobs+1 entries, the sampled token's always among them."""
    tok = make_tiny_tokenizer()
    texts = TokenTexts(tok)
    a, b = tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b")
    out = completion_logprobs([TokenLogprob(a, -3.0, ((b, -0.1),), 7)], texts, TextOffsets(texts))
    assert out["top_logprobs"][0] == {"b": -0.1, "a": -3.0}


def test_sentencepiece_byte_fallback_tokens_are_their_byte():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "<0xE2>", "<0x82>", "<0xAC>", "▁a"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="</s>", bos_token="<s>", unk_token="<unk>"
    )
    texts = TokenTexts(tok)
    assert texts.entry(3) == ("bytes:\\xe2", b"\xe2")
    offs = TextOffsets(texts)
    assert [offs.take(i) for i in (3, 4, 5, 6)] == [0, 0, 0, 1]  # the euro sign is one character


def test_star_defaults_apply_under_a_tenant_override():
    rl = RateLimiter(
        TenantLimit(),
        parse_limits(
            {"*": {"tokens_per_minute": 100, "max_concurrent": 4}, "acme": {"requests_per_minute": 5}}, "x"
        ),
    )
    assert rl.limit("acme") == TenantLimit(5, 100, 4)


def test_a_request_of_exactly_the_whole_token_budget_fits():
    rl = RateLimiter(TenantLimit(tokens_per_minute=100), {})
    h = asyncio.run(rl.charge("t", 100))
    assert h["x-ratelimit-remaining-tokens"] == "0"


def test_a_reloaded_limit_takes_effect_for_a_tenant_already_seen():
    rl = RateLimiter(TenantLimit(tokens_per_minute=100), {})

    async def main():
        await rl.charge("t", 90)
        rl.reconfigure(TenantLimit(tokens_per_minute=1000), {})
        h = await rl.charge("t", 500)
        assert h["x-ratelimit-limit-tokens"] == "1000"

    asyncio.run(main())


def test_redis_buckets_refill_at_capacity_per_minute(redis_store_url):
    from server.api.limits import RedisRateLimiter

    async def main():
        rl = RedisRateLimiter(redis_store_url, TenantLimit(tokens_per_minute=600_000))  # 10,000 a second
        try:
            await rl.charge("t", 600_000)
            await asyncio.sleep(0.5)
            left = (await rl.state("t"))["remaining_tokens"]
            assert 4_000 <= left <= 9_000, left
        finally:
            await rl.close()

    asyncio.run(main())


def test_redis_down_is_not_asked_again_within_the_fallback_window(monkeypatch):
    from server.api.limits import RedisRateLimiter

    async def main():
        rl = RedisRateLimiter("redis://127.0.0.1:18099/0", TenantLimit(tokens_per_minute=100))
        calls = []

        async def failing(**kw):
            calls.append(1)
            raise ConnectionError("down")

        rl._script = failing
        await rl.charge("t", 10)
        await rl.charge("t", 10)
        await rl.charge("t", 10)
        assert len(calls) == 1
        await rl.close()

    asyncio.run(main())


def test_redis_usage_since_is_the_first_replicas_start(redis_store_url):
    from server.api.usage import RedisUsageMeter

    async def main():
        a, b = RedisUsageMeter(redis_store_url), RedisUsageMeter(redis_store_url)
        b._since = a._since + 100.0  # started later (a restart)
        try:
            a.request("t", None)
            await a.flush()
            b.request("t", None)
            await b.flush()
            assert await a.since() == pytest.approx(a._since, abs=1e-3) and await b.since() == pytest.approx(
                a._since, abs=1e-3
            )
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_redis_usage_report_includes_what_was_just_counted(redis_store_url):
    from server.api.usage import RedisUsageMeter

    async def main():
        m = RedisUsageMeter(redis_store_url)
        try:
            m.request("t", "p")
            m.completion("t", "p", "stop", 5, 2, 3)
            r = await m.report("t")
            assert (r["requests"], r["prompt_tokens"], r["completion_tokens"], r["cached_tokens"]) == (
                1,
                5,
                3,
                2,
            )
        finally:
            await m.close()

    asyncio.run(main())
