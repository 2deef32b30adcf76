import server.engine.scheduler as scheduler
from server.engine import Request, SamplingParams
from tests.engine_utils import make_engine, pool_bytes, random_prompt


class _Always:
    def __init__(self, *a):
        pass

    def propose(self, tokens, k):
        return [1] * k  # always a (wrong) draft of all it may


def test_a_draft_never_preempts_a_running_request(tiny_llama_bundle, monkeypatch):
    """Three rows on a 16-block pool that fit without preemption when decoding plainly: drafting must not take the
    blocks the other rows' plain decode steps need (the docstring of Scheduler._draft)."""
    b = tiny_llama_bundle
    V = b.spec.vocab_size
    monkeypatch.setattr(scheduler, "NgramIndex", _Always)

    def preemptions(spec):
        eng = make_engine(b, {}, kv_cache_bytes=pool_bytes(b, 16), speculative_tokens=spec)
        reqs = [
            Request(f"r{i}", random_prompt(V, n, i), SamplingParams(max_tokens=m, ignore_eos=True))
            for i, (n, m) in enumerate([(60, 20), (64, 20), (99, 4)])
        ]
        outs = eng.generate(reqs)
        return eng.scheduler.num_preemptions, [o.token_ids for o in outs]

    plain, plain_out = preemptions(0)
    spec, spec_out = preemptions(4)
    assert plain == 0 and spec == 0
    assert spec_out == plain_out
