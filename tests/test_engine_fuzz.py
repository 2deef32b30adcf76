"""A fixed set of the engine fuzzer's seeds (tests/engine_fuzz.py): every invariant must hold for each, and each
must still exercise what it was chosen for, so that a change to the fuzzer or the engine cannot silently turn
these into trivial runs. Long runs over many seeds: `python -m tests.engine_fuzz START COUNT`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest

from server.engine import LLMEngine, TokenEvent
from server.engine.kv_cache import KVPool
from tests.engine_fuzz import MODELS, Counters, References, _SeedRun, run_seed

pytestmark = pytest.mark.usefixtures("torch_single_thread")

# What the suite must cover: Counters fields that must be non-zero in some seed, the models, the fault sites.
FEATURES = frozenset(
    {
        "preemptions",
        "prefix_evictions",
        "async_steps",
        "spec_accepted_tokens",
        "cache_hit_tokens",
        "prefix_replaced",
        "fault_failed_requests",
    }
)
FAULT_SITES = frozenset({"forward_before", "forward_after", "read", "sample_on_device"})


@dataclass(frozen=True)
class Expect:
    model: str
    fault_site: str
    exercises: frozenset[str]  # Counters fields that must be non-zero


def _expect(model: str, fault_site: str, features: str) -> Expect:
    return Expect(model, fault_site, frozenset(features.split()))


# Chosen from the fuzzer's counters over seeds 0-299; each usually shows these (prefix fetches run on
# loader threads, so the counts vary a little from run to run).
SEEDS: dict[int, Expect] = {
    199: _expect(
        "llama",
        "forward_before",
        "preemptions prefix_evictions spec_accepted_tokens cache_hit_tokens prefix_replaced fault_failed_requests",
    ),
    282: _expect(
        "gpt2",
        "forward_after",
        "preemptions prefix_evictions spec_accepted_tokens cache_hit_tokens fault_failed_requests",
    ),
    163: _expect(
        "gpt2",
        "sample_on_device",
        "preemptions prefix_evictions async_steps cache_hit_tokens fault_failed_requests",
    ),
    265: _expect("phi3", "read", "prefix_evictions async_steps prefix_replaced fault_failed_requests"),
    60: _expect(
        "llama", "forward_after", "prefix_evictions async_steps cache_hit_tokens fault_failed_requests"
    ),
    109: _expect(
        "llama", "sample_on_device", "prefix_evictions async_steps prefix_replaced fault_failed_requests"
    ),
    48: _expect(
        "gpt2", "forward_before", "prefix_evictions async_steps cache_hit_tokens fault_failed_requests"
    ),
    244: _expect(
        "phi3",
        "forward_before",
        "preemptions prefix_evictions spec_accepted_tokens cache_hit_tokens prefix_replaced fault_failed_requests",
    ),
    3: _expect(
        "llama", "forward_before", "preemptions prefix_evictions cache_hit_tokens fault_failed_requests"
    ),
    4: _expect("llama", "forward_after", "prefix_evictions async_steps prefix_replaced"),
}

QUICK_SEED = 10  # gpt2, no async decode, a fraction of a second: for the fuzzer's own checks below


def test_seed_list_covers_every_feature() -> None:
    assert set(Counters.__dataclass_fields__) >= FEATURES
    chosen = [f for e in SEEDS.values() for f in e.exercises]
    assert all(chosen.count(f) >= 2 for f in FEATURES), {f: chosen.count(f) for f in FEATURES}
    assert {e.model for e in SEEDS.values()} == set(MODELS)
    assert {e.fault_site for e in SEEDS.values()} == FAULT_SITES


# each seed's counters, for the coverage check after them (prefix fetches run on loader threads: under load a seed
# may miss a feature it usually shows, e.g. a prompt-cache hit, so coverage is asserted over the seeds together)
_COUNTERS: dict[int, Counters] = {}


# (in one worker when the suite runs in several, `scripts/run_tests.py`: the last reads what the seeds counted, and
# runs those it has not seen itself)
@pytest.mark.xdist_group("fuzz-seeds")
@pytest.mark.parametrize("seed", list(SEEDS))
def test_fuzz_seed(seed: int) -> None:
    res = run_seed(seed)
    assert res.ok, f"seed {seed}: {len(res.failures)} failure(s):\n" + "\n".join(res.failures[:10])
    expect = SEEDS[seed]
    assert (res.model, res.fault_site) == (expect.model, expect.fault_site)
    assert res.counters.checked > 0
    _COUNTERS[seed] = res.counters


@pytest.mark.xdist_group("fuzz-seeds")
def test_the_seeds_together_exercise_every_feature() -> None:
    """Each feature is shown by at least one of the seeds chosen for it (each by two or more), so a change to the
    fuzzer or the engine cannot silently turn these runs trivial."""
    for seed in (
        SEEDS.keys() - _COUNTERS.keys()
    ):  # (this test selected alone, or the seeds run in another process)
        res = run_seed(seed)
        assert res.ok, f"seed {seed}: {res.failures[:10]}"
        _COUNTERS[seed] = res.counters
    missing = {
        f: [s for s, e in SEEDS.items() if f in e.exercises]
        for f in FEATURES
        if not any(getattr(_COUNTERS[s], f) for s, e in SEEDS.items() if f in e.exercises)
    }
    assert not missing, f"no seed chosen for these showed them: {missing}"


def test_fuzzer_catches_a_wrong_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness is not vacuous: an engine that emits one wrong token in nine fails the reference check."""
    append = LLMEngine._append
    calls = [0]

    def wrong_append(self: LLMEngine, seq, tok: int, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls[0] += 1
        return append(self, seq, (tok + 1) % 256 if calls[0] % 9 == 0 else tok, *args, **kwargs)

    monkeypatch.setattr(LLMEngine, "_append", wrong_append)
    res = run_seed(QUICK_SEED)
    assert calls[0] > 9
    assert any("want" in f for f in res.failures), res.failures


def test_fuzzer_catches_a_leaked_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """An engine that forgets to free one batch of KV blocks fails the idle leak check."""
    free = KVPool.free
    calls = [0]

    def leaky_free(self: KVPool, blocks) -> None:  # type: ignore[no-untyped-def]
        blocks = list(blocks)
        calls[0] += bool(blocks)
        if calls[0] != 3 or not blocks:
            free(self, blocks)

    monkeypatch.setattr(KVPool, "free", leaky_free)
    res = run_seed(QUICK_SEED)
    assert calls[0] > 3
    assert any(f.startswith(("LEAK", "refcount")) for f in res.failures), res.failures


# a seed that draws `[a-z]{1,40}` with bad_words banning every letter (tokens 40-199): r2 and r3 fail at their first
# token with GrammarError, the request's own error, which the fuzzer must check against the request run alone
GRAMMAR_DEAD_END_SEED = 8246


def _grammar_errors(run: _SeedRun) -> list[str]:
    return [
        rid
        for rid, fin in run.finished.items()
        if isinstance(fin, TokenEvent) and fin.error_type == "GrammarError"
    ]


def test_a_grammar_the_requests_bad_words_dead_end_is_checked_against_the_request_alone() -> None:
    """A structured request whose bad_words (or allowed_token_ids) leave its grammar no token fails with
    GrammarError wherever it runs: the fuzzer checks that error, and the tokens before it, against the request run
    alone rather than reporting it as a failure (seeds 8037 and 8246 did)."""
    run = _SeedRun(GRAMMAR_DEAD_END_SEED)
    res = run.run()
    assert res.ok, res.failures
    assert sorted(_grammar_errors(run)) == ["r2", "r3"]
    assert res.counters.checked >= 2


def test_fuzzer_catches_a_grammar_error_the_request_alone_does_not_have(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not vacuous: the error must be the one the request meets alone."""
    alone = References.alone

    def alone_without_the_error(self: References, *args, **kwargs):  # type: ignore[no-untyped-def]
        out = alone(self, *args, **kwargs)
        return dataclasses.replace(out, error_type="NoTokenAllowed") if out.error_type else out

    monkeypatch.setattr(References, "alone", alone_without_the_error)
    res = run_seed(GRAMMAR_DEAD_END_SEED)
    assert any("vs alone NoTokenAllowed" in f for f in res.failures), res.failures
