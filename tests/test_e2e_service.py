"""Issue 5 acceptance: the real server process (tiny model) on a loopback port with a Redis store; two prefixes
trained through the SDK; concurrent generate calls of three tenants each equal to the same request alone; the
`openai` package gets the same text from /v1/completions."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import openai
import pytest

from tests.fixtures.server import metric_value

CLIENT_DIR = Path(__file__).resolve().parents[1] / "clients" / "python"
if str(CLIENT_DIR) not in sys.path:  # `make install` installs it; the suite also runs from a bare checkout
    sys.path.insert(0, str(CLIENT_DIR))

import prefixserve_client as ps  # noqa: E402

pytestmark = pytest.mark.redis

KEYS = {"acme": "sk-acme-e2e-11111111", "globex": "sk-globex-e2e-2222222", "initech": "sk-initech-e2e-333333"}
PROMPTS = ["Where do zebras live?", "Name an animal.", "Tell me something"]
MAX_TOKENS = 12
TRAIN = {"epochs": 2, "batch_size": 8, "seed": 0}


def examples(word: str) -> list[dict[str, str]]:
    return [{"prompt": f"Question {i}: what is the word?", "completion": f" {word}"} for i in range(8)]


@pytest.fixture
def service(subprocess_server, redis_store_url):
    sp = subprocess_server(
        store_url=redis_store_url,
        api_keys=",".join(f"{t}:{k}" for t, k in KEYS.items()),
        training_workers=1,
        max_model_len=512,
    )
    yield sp


def test_issue5_acceptance(service):
    url = service.url
    clients = {t: ps.Client(base_url=url, api_key=k, max_retries=3) for t, k in KEYS.items()}
    progress: list[tuple[str, object]] = []

    # ---- two prefixes trained through the SDK (different methods), visible once the jobs succeed
    jobs = {
        "acme": clients["acme"].prefixes.train(
            None, "zebra", "prefix_tuning", examples("ZEBRA"), prefix_length=6, **TRAIN
        ),
        "globex": clients["globex"].prefixes.train(
            None, "okapi", "prefix_propagation", examples("OKAPI"), prefix_length=4, **TRAIN
        ),
    }
    for tenant, job in jobs.items():
        assert job.status in ("queued", "running", "succeeded")
        done = job.wait(lambda j, t=tenant: progress.append((t, j.status)), poll_interval=0.2, timeout=240)
        assert done.status == "succeeded", done
    assert {t for t, _ in progress} == {"acme", "globex"}
    info = clients["acme"].prefixes.get("acme", "zebra")
    assert info.version == 1 and info.kind == "prefix_tuning" and info.prefix_length == 6
    assert [p.name for p in clients["globex"].prefixes.list()] == ["okapi"]
    with pytest.raises(ps.NotFound):  # isolation holds for trained prefixes too
        clients["acme"].prefixes.get("globex", "okapi")

    # ---- every tenant alone (initech uses the base model: rows without a prefix share the batch too)
    prefix_of = {"acme": "zebra", "globex": "okapi", "initech": "base"}
    calls = [(t, p) for t in KEYS for p in PROMPTS]
    alone = {
        (t, p): clients[t].generate(None, p, prefix=prefix_of[t], max_tokens=MAX_TOKENS).text
        for t, p in calls
    }
    for p in PROMPTS:  # the trained prefixes really steer the model
        assert alone[("acme", p)] != alone[("initech", p)] or alone[("globex", p)] != alone[("initech", p)]

    # ---- concurrent calls of the three tenants, batched together, each equal to its single-request output
    async def burst() -> list[str]:
        acs = {t: ps.AsyncClient(base_url=url, api_key=k, max_retries=3) for t, k in KEYS.items()}
        try:
            outs = await asyncio.gather(
                *(
                    acs[t].generate(None, p, prefix=prefix_of[t], max_tokens=MAX_TOKENS)
                    for _ in range(3)
                    for t, p in calls
                )
            )
        finally:
            for ac in acs.values():
                await ac.close()
        return [o.text for o in outs]

    together = asyncio.run(burst())
    assert together == [alone[c] for _ in range(3) for c in calls]
    m = (
        clients["acme"].metrics()
        if hasattr(clients["acme"], "metrics")
        else service.client().get("/metrics").text
    )
    total = metric_value(m, "prefixserve:distinct_prefixes_per_batch_count")
    single = metric_value(m, "prefixserve:distinct_prefixes_per_batch_bucket", {"le": "1.0"})
    assert total - single > 0, "no engine step mixed tenants"

    # ---- streaming through the SDK gives the same text
    streamed = "".join(
        d.text for d in clients["globex"].stream(None, PROMPTS[0], prefix="okapi", max_tokens=MAX_TOKENS)
    )
    assert streamed == alone[("globex", PROMPTS[0])]

    # ---- the openai package gets the same text from /v1/completions
    for tenant in ("acme", "globex"):
        oai = openai.OpenAI(base_url=url + "/v1", api_key=KEYS[tenant], max_retries=0)
        for p in PROMPTS:
            c = oai.completions.create(
                model=f"{tenant}/{prefix_of[tenant]}", prompt=p, max_tokens=MAX_TOKENS, temperature=0
            )
            assert c.choices[0].text == alone[(tenant, p)]
        assert {m.id for m in oai.models.list()} == {f"{tenant}/{prefix_of[tenant]}", f"{tenant}/base"}
        oai.close()
    for c in clients.values():
        c.close()
