import pytest

from server.engine import Request, SamplingParams
from server.engine.engine import AsyncEngine
from server.engine.types import RequestTooLarge
from tests.engine_utils import make_engine, pool_bytes


def test_refused_requests_do_not_hold_queue_places(tiny_llama_bundle):
    """A request that fails validation (413/400) leaves no trace in the queue count: after max_waiting of them a
    valid request is still accepted (else every request gets 503 from then on)."""
    b = tiny_llama_bundle
    eng = AsyncEngine(make_engine(b, {}, max_waiting=2, max_num_seqs=1, max_model_len=64))
    try:
        for i in range(3):
            with pytest.raises((RequestTooLarge, ValueError)):
                eng.submit(Request(f"bad{i}", [1] * 70, SamplingParams(max_tokens=4)), lambda ev: None)
        assert eng.num_waiting == 0
        for i in range(3):  # one row + two queued
            eng.submit(Request(f"ok{i}", [1, 2], SamplingParams(max_tokens=2)), lambda ev: None)
    finally:
        pass


def test_a_request_that_fills_the_context_exactly_is_accepted(tiny_llama_bundle):
    """vLLM's rule: prompt + max_tokens <= max_model_len."""
    b = tiny_llama_bundle
    eng = make_engine(b, {}, max_model_len=64)
    out = eng.generate([Request("full", [1] * 60, SamplingParams(max_tokens=4, ignore_eos=True))])[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 4
    with pytest.raises(RequestTooLarge):
        eng.add_request(Request("over", [1] * 60, SamplingParams(max_tokens=5)))


def test_kv_budget_admission_boundary(tiny_llama_bundle):
    """A request's own blocks + one may take half of the pool, not more (16 blocks: 7 own blocks fit, 8 do not)."""
    b = tiny_llama_bundle
    eng = make_engine(b, {}, kv_cache_bytes=pool_bytes(b, 16))
    eng.add_request(Request("fits", [1] * 100, SamplingParams(max_tokens=12)))  # 112 tokens: 7 blocks
    with pytest.raises(RequestTooLarge):
        eng.add_request(Request("over", [1] * 100, SamplingParams(max_tokens=13)))  # 113: 8 blocks
