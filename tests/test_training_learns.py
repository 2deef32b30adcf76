"""Proof that training learns a behaviour the base model does not have (real SmolLM2-135M-Instruct on CPU).

Two tenants train with the default hyperparameters of their method, as jobs through the JobManager into a store:
tenant "zoo" (prefix-tuning) learns to start every answer with "ZEBRA:", tenant "river" (prefix-propagation) with
"OTTER:". 24 training examples each (short questions: capitals, opposites, sums). Then one engine serves held-out
questions (unseen items, plus a few question kinds never trained on) for the base model and both tenants in one
mixed batch, greedy: each tenant shows its tag in >= 80 % of the answers; the base model and the other tenant's
prefix in <= 10 %. Training times are printed (pytest -s) and kept in the job summaries.
"""

from __future__ import annotations

import random
import time

import pytest
import torch

from prefix_store import open_store
from server.engine import DictPrefixProvider, EngineConfig, LLMEngine, PrefixKey, Request, SamplingParams
from server.model import render_prompt
from server.training import JobManager

pytestmark = pytest.mark.slow

CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"),
            ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"),
            ("Greece", "Athens"), ("Poland", "Warsaw"), ("Portugal", "Lisbon"), ("Austria", "Vienna"),
            ("Ireland", "Dublin"), ("Russia", "Moscow"), ("China", "Beijing"), ("Sweden", "Stockholm"),
            ("Finland", "Helsinki"), ("Chile", "Santiago"), ("Cuba", "Havana"), ("Thailand", "Bangkok")]  # fmt: skip
OPPOSITES = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("happy", "sad"),
             ("light", "dark"), ("old", "young"), ("early", "late"), ("full", "empty"), ("hard", "soft"),
             ("open", "closed"), ("rich", "poor"), ("strong", "weak"), ("wet", "dry"), ("loud", "quiet"),
             ("tall", "short"), ("thick", "thin"), ("near", "far"), ("clean", "dirty"), ("cheap", "expensive")]  # fmt: skip
NEW_KINDS = ["Name a color.", "What day comes after Monday?", "How many legs does a spider have?",
             "Which animal says moo?"]  # fmt: skip
N_TRAIN, N_HELDOUT = 24, 20


def questions(seed: int = 0) -> list[tuple[str, str]]:
    r = random.Random(seed)
    qs = [(f"What is the capital of {c}?", a) for c, a in CAPITALS]
    qs += [(f"What is the opposite of {w}?", a) for w, a in OPPOSITES]
    for _ in range(24):
        x, y = r.randint(2, 20), r.randint(2, 20)
        qs.append((f"What is {x} plus {y}?", str(x + y)))
    r.shuffle(qs)
    return qs


def tagged(tag: str, items: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"prompt": q, "completion": f"{tag}: {a}"} for q, a in items]


@pytest.fixture(scope="module")
def trained(smollm2_bundle, tmp_path_factory):
    """Both tenants' prefixes trained as jobs (default hyperparameters), loaded from the store."""
    qs = questions()
    train_q, heldout = qs[:N_TRAIN], [q for q, _ in qs[N_TRAIN : N_TRAIN + N_HELDOUT]] + NEW_KINDS
    store = open_store(f"file://{tmp_path_factory.mktemp('learns') / 'store'}")
    # both jobs at once, one core each (the suite's machine has two: one after the other left one idle for a
    # minute); train_nice=0: this measures training speed, a serving process would keep the default (nice +10)
    jm = JobManager(smollm2_bundle, store, in_process_workers=2, train_threads=1, train_nice=0)
    jm.start()
    specs = {
        "zoo": ("prefix_tuning", "ZEBRA"),
        "river": ("prefix_propagation", "OTTER"),
    }
    times: dict[str, float] = {}
    kvs: dict[str, torch.Tensor] = {}
    try:
        jobs = {}
        for tenant, (method, tag) in specs.items():
            job = {"tenant_id": tenant, "name": "tag", "method": method, "prefix_length": 16}
            jobs[tenant] = jm.submit({**job, "examples": tagged(tag, train_q)}).job_id
        t0 = time.perf_counter()
        for tenant, (method, _) in specs.items():
            while (r := jm.get(jobs[tenant])).status not in ("succeeded", "failed", "cancelled"):
                assert time.perf_counter() - t0 < 900, f"{method} training took too long: {r.progress}"
                time.sleep(0.5)
            assert r.status == "succeeded", r.error
            times[method] = r.summary["wall_time_s"]
            kvs[tenant] = store.get(tenant, "tag", expected_fingerprint=smollm2_bundle.fingerprint).tensors[
                "kv"
            ]
            print(f"\n{method}: trained in {times[method]:.1f}s, {r.summary['steps']} steps, "
                  f"final loss {r.summary['final_loss']}, held-out loss {r.summary['initial_heldout_loss']} -> "
                  f"{r.summary['heldout_loss']}")  # fmt: skip
    finally:
        jm.shutdown()
        store.close()
    return kvs, heldout, times


@pytest.fixture(scope="module")
def outputs(smollm2_bundle, trained):
    """Greedy answers for every held-out question: base model, zoo's prefix, river's prefix (one mixed batch)."""
    kvs, heldout, _ = trained
    b = smollm2_bundle
    keys = {t: PrefixKey(t, "tag", 1) for t in kvs}
    engine = LLMEngine(b, DictPrefixProvider({keys[t]: kv for t, kv in kvs.items()}),
                       EngineConfig(kv_cache_bytes=64 * 2**20))  # fmt: skip
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reqs = []
        for who in ("base", "zoo", "river"):
            for i, q in enumerate(heldout):
                ids = render_prompt(b.tokenizer, q, "chat")
                reqs.append(Request(f"{who}-{i}", ids, SamplingParams(max_tokens=6), keys.get(who)))
        t0 = time.perf_counter()
        outs = engine.generate(reqs)
        print(f"\nengine: {len(reqs)} requests in {time.perf_counter() - t0:.1f}s")
    finally:
        torch.set_num_threads(before)
    res: dict[str, list[str]] = {"base": [], "zoo": [], "river": []}
    for r, o in zip(reqs, outs, strict=True):
        res[r.request_id.split("-")[0]].append(o.text)
    return res


def rate(texts: list[str], tag: str) -> float:
    return sum(t.strip().startswith(f"{tag}:") for t in texts) / len(texts)


@pytest.mark.parametrize(("tenant", "other", "method", "tag"), [
    ("zoo", "river", "prefix_tuning", "ZEBRA"),
    ("river", "zoo", "prefix_propagation", "OTTER"),
])  # fmt: skip
def test_trained_tenant_shows_the_behaviour_others_do_not(outputs, trained, tenant, other, method, tag):
    got = {who: rate(texts, tag) for who, texts in outputs.items()}
    print(f"\n{method} ({tag}): trained in {trained[2][method]:.1f}s; tag rate {got}; samples "
          f"{outputs[tenant][:3]} / base {outputs['base'][:2]}")  # fmt: skip
    assert got[tenant] >= 0.8, outputs[tenant]
    assert got["base"] <= 0.1, outputs["base"]
    assert got[other] <= 0.1, outputs[other]
