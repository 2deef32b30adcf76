import pytest

from server.engine import Request, SamplingParams
from tests.engine_utils import make_engine, pool_bytes, random_prompt
from tests.test_engine_batching import record_preemptions


@pytest.mark.parametrize("fair", [True, False])
def test_a_preempted_request_resumes_before_newcomers(tiny_llama_bundle, fair):
    """A3 is preempted while A1 and A2 keep running; B1 (another tenant, none running) arrives meanwhile. The blocks
    freed later go to A3 first (vLLM puts preempted requests back at the front of the queue)."""
    b = tiny_llama_bundle
    V = b.spec.vocab_size
    eng = make_engine(b, {}, kv_cache_bytes=pool_bytes(b, 16), fair_scheduling=fair)
    admitted: list[str] = []
    admit = eng.scheduler._admit

    def spy(*a, **kw):
        items = admit(*a, **kw)
        admitted.extend(it.seq.request_id for it in items)
        return items

    eng.scheduler._admit = spy
    victims = record_preemptions(eng)
    for i, name in enumerate(("A1", "A2", "A3")):
        eng.add_request(
            Request(
                name, random_prompt(V, 60, i), SamplingParams(max_tokens=44, ignore_eos=True), cache_salt="A"
            )
        )
    for _ in range(200):
        eng.step()
        if victims:
            break
    assert victims == ["A3"]
    mark = len(admitted)
    eng.add_request(
        Request("B1", random_prompt(V, 5, 9), SamplingParams(max_tokens=2, ignore_eos=True), cache_salt="B")
    )
    for _ in range(400):
        eng.step()
        if not eng.has_unfinished():
            break
    assert not eng.has_unfinished()
    after = [r for r in admitted[mark:] if r in ("A3", "B1")]
    assert after[:2] == ["A3", "B1"], (admitted, victims)
