"""Training jobs through the HTTP API with the real JobManager, and `prefixserve worker` taking queued jobs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.fixtures.server import REPO, assert_error, metric_value, put_random_prefix

EXAMPLES = [{"prompt": f"Say the word {i}", "completion": " ZEBRA"} for i in range(8)]


def wait_job(client, job_id: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/prefixes/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled") or time.monotonic() > deadline:
            return job
        time.sleep(0.1)


def test_train_then_serve_new_versions(server_factory):
    s = server_factory(keys={"acme": "k-acme"}, max_jobs_per_tenant=1)
    c = s.client("k-acme")
    body = {"name": "zebra", "method": "prefix_tuning", "examples": EXAMPLES, "prefix_length": 4, "epochs": 2}
    r = c.post("/prefixes", json=body)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "queued" and job["tenant_id"] == "acme" and job["name"] == "zebra"
    # one active job per tenant here; its Retry-After is a training job's wait, not the engine's 1 s
    over = c.post("/prefixes", json=body)
    assert_error(over, 429, "too_many_jobs")
    assert int(over.headers["retry-after"]) > 1
    done = wait_job(c, job["job_id"])
    assert done["status"] == "succeeded", done
    assert done["prefix_version"] == 1 and done["progress"]["step"] >= 1
    info = c.get("/prefixes/acme/zebra").json()
    assert info["version"] == 1 and info["kind"] == "prefix_tuning" and info["prefix_length"] == 4
    g1 = c.post("/generate", json={"prefix": "zebra", "prompt": "Say the word 3", "max_tokens": 6})
    assert g1.status_code == 200 and g1.json()["prefix_version"] == 1
    # a second job for the same name makes version 2, served at once (store change event drops cached metadata)
    job2 = c.post("/prefixes", json={**body, "epochs": 1, "seed": 7}).json()
    assert wait_job(c, job2["job_id"])["status"] == "succeeded"
    g2 = c.post("/generate", json={"prefix": "zebra", "prompt": "Say the word 3", "max_tokens": 6})
    assert g2.json()["prefix_version"] == 2
    assert c.get("/prefixes/acme/zebra").json()["versions"] == [1, 2]
    # the list names each prefix's latest version only: no `versions: null` there
    (listed,) = c.get("/prefixes").json()["data"]
    assert listed["version"] == 2 and "versions" not in listed
    m = c.get("/metrics").text
    assert metric_value(m, "prefixserve:training_jobs", {"status": "succeeded"}) == 2
    jobs = c.get("/prefixes/jobs").json()["data"]
    assert sorted(j["job_id"] for j in jobs) == sorted([job["job_id"], job2["job_id"]])


def test_training_limits_are_the_operators(server_factory):
    """`--training-max-*` settings bound what a job may ask for (422 naming the field) and how long it may train
    (the job succeeds with the prefix trained so far, and shows the limits it runs under)."""
    s = server_factory(keys={"acme": "k-acme"}, training_max_prefix_length=8, training_max_seconds=1e-6)
    c = s.client("k-acme")
    body = {
        "name": "zebra",
        "method": "prompt_tuning",
        "examples": EXAMPLES,
        "prefix_length": 9,
        "epochs": 50,
    }
    err = assert_error(c.post("/prefixes", json=body), 422, "invalid_training_spec")
    assert err["param"] == "prefix_length" and "8" in err["message"]
    assert c.get("/prefixes/jobs").json()["data"] == []  # nothing was queued
    r = c.post("/prefixes", json={**body, "prefix_length": 8})
    assert r.status_code == 202, r.text
    assert r.json()["limits"]["max_seconds"] == 1e-6 and r.json()["limits"]["max_prefix_length"] == 8
    done = wait_job(c, r.json()["job_id"])
    assert done["status"] == "succeeded", done
    assert (
        done["summary"]["stopped"] == "time_limit"
        and done["summary"]["steps"] < done["summary"]["total_steps"]
    )
    assert c.get("/prefixes/acme/zebra").json()["version"] == 1


def test_hyperparameters_have_one_set_of_bounds_whatever_the_spelling(server_factory):
    """Top-level fields, their aliases and `hyperparameters` go through the trainer's checks with the server's
    limits: the same value is accepted or refused the same way; booleans are not numbers; and what the server could
    not serve (a prefix filling its max_model_len) is refused before a job exists."""
    s = server_factory(
        keys={"acme": "k-acme"}, training_max_prefix_length=300, max_model_len=64, max_jobs_per_tenant=8
    )
    c = s.client("k-acme")
    base = {"name": "z", "method": "prompt_tuning", "examples": EXAMPLES, "prefix_length": 4, "max_steps": 1}
    for bad in ({"learning_rate": 11}, {"lr": 11}, {"hyperparameters": {"learning_rate": 11}}):
        assert_error(c.post("/prefixes", json={**base, **bad}), 422)
    for bad in (
        {"epochs": True},
        {"hyperparameters": {"epochs": True}},
        {"learning_rate": True},
        {"seed": "3"},
    ):
        assert_error(c.post("/prefixes", json={**base, **bad}), 422)
    for ok in (
        {"learning_rate": 5},
        {"lr": 5},
        {"hyperparameters": {"learning_rate": 5}},
        {"seed": 3_000_000_000},
    ):
        r = c.post("/prefixes", json={**base, **ok})
        assert r.status_code == 202, (ok, r.text)
        assert r.json()["hyperparameters"]["learning_rate" if "seed" not in ok else "seed"] in (
            5,
            3_000_000_000,
        )
    # the operator's prefix limit (300) is above the old fixed 256, but this server serves 64 positions
    err = assert_error(c.post("/prefixes", json={**base, "prefix_length": 257}), 422, "invalid_training_spec")
    assert err["param"] == "prefix_length" and "64 positions" in err["message"]


def test_continue_training_from_a_stored_version(server_factory):
    """init_from continues a tenant's prefix: the job takes the source's method, prefix length and prompt format,
    pins its version, starts at the loss the source reached and makes a new version; what cannot be continued is
    refused before a job exists."""
    s = server_factory(keys={"acme": "k-acme", "globex": "k-g"})
    c = s.client("k-acme")
    body = {"name": "zebra", "method": "prompt_tuning", "examples": EXAMPLES, "prefix_length": 4, "epochs": 6,
            "learning_rate": 0.3, "prompt_format": "raw"}  # fmt: skip
    v1 = wait_job(c, c.post("/prefixes", json=body).json()["job_id"])
    assert v1["status"] == "succeeded" and v1["prefix_version"] == 1
    more = {
        "name": "zebra",
        "examples": EXAMPLES,
        "epochs": 2,
        "learning_rate": 0.3,
        "init_from": {"name": "zebra"},
    }
    r = c.post("/prefixes", json=more)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["init_from"] == {"name": "zebra", "version": 1} and job["method"] == "prompt_tuning"
    assert job["prefix_length"] == 4 and job["hyperparameters"]["prompt_format"] == "raw"
    v2 = wait_job(c, job["job_id"])
    assert v2["status"] == "succeeded" and v2["prefix_version"] == 2, v2
    s1, s2 = v1["summary"], v2["summary"]
    assert s2["init_from"] == {"name": "zebra", "version": 1}
    start, end, resumed = s1["loss_curve"][0][1], s1["final_loss"], s2["loss_curve"][0][1]
    assert abs(resumed - end) < 0.25 * (start - end), (start, end, resumed)  # it started where v1 ended
    meta = c.get("/prefixes/acme/zebra").json()
    assert meta["version"] == 2 and meta["training"]["init_from"] == {"name": "zebra", "version": 1}
    # branch from a pinned version under another name, with the SDK
    import prefixserve_client as ps

    with ps.Client(s.url, api_key="k-acme") as sdk:
        branch = sdk.prefixes.train(None, "zebra-b", examples=EXAMPLES, epochs=1, init_from=("zebra", 1))
        assert branch.init_from == {"name": "zebra", "version": 1}
        assert branch.wait(timeout=120).status == "succeeded"
    # refused up front
    assert_error(c.post("/prefixes", json={**more, "init_from": {"name": "nope"}}), 404, "prefix_not_found")
    assert_error(c.post("/prefixes", json={**more, "init_from": {"name": "zebra", "version": 9}}), 404)
    g = s.client("k-g")  # another tenant's prefix does not exist for globex
    assert_error(g.post("/prefixes", json={**more, "init_from": {"name": "zebra"}}), 404, "prefix_not_found")
    err = assert_error(c.post("/prefixes", json={**more, "method": "prefix_tuning"}), 422)
    assert err["param"] == "method"
    err = assert_error(c.post("/prefixes", json={**more, "prompt_format": "chat"}), 422)  # v1 was trained raw
    assert err["param"] == "prompt_format"
    nested = {**more, "hyperparameters": {"prompt_format": "chat"}}  # (as the SDK and the CLI send it)
    assert assert_error(c.post("/prefixes", json=nested), 422)["param"] == "hyperparameters.prompt_format"
    # the same
    same = c.post("/prefixes", json={**more, "prompt_format": "raw", "epochs": 1})
    assert same.status_code == 202
    assert (
        assert_error(c.post("/prefixes", json={**more, "prefix_length": 8}), 422)["param"] == "prefix_length"
    )
    # kv only, as an upload of a served prefix
    put_random_prefix(s.store, s.state.bundle, "acme", "served-only")
    err = assert_error(c.post("/prefixes", json={**more, "init_from": {"name": "served-only"}}), 422)
    assert err["param"] == "init_from" and "no trained tensors" in err["message"]
    assert_error(c.post("/prefixes", json={**more, "init_from": {"name": "zebra", "bogus": 1}}), 422)
    # a version whose stored metadata is unreadable (a damaged disk): 422 naming it, not a 500
    meta_file = next(Path(s.store.root).glob("acme/served-only/v1.json"))
    meta_file.write_text("{ damaged")
    err = assert_error(c.post("/prefixes", json={**more, "init_from": {"name": "served-only"}}), 422)
    assert err["param"] == "init_from"
    # the refused submissions made no job: v1, v2, the branch and the one with the same prompt format
    assert wait_job(c, same.json()["job_id"])["status"] == "succeeded"
    assert [v["status"] for v in c.get("/prefixes/jobs").json()["data"]] == ["succeeded"] * 4


def test_cancel_a_job_writes_nothing(server_factory):
    s = server_factory(training_workers=0)  # nobody runs it: it stays queued until cancelled
    c = s.client()
    job = c.post("/prefixes", json={"tenant_id": "acme", "name": "never", "examples": EXAMPLES}).json()
    assert c.get(f"/prefixes/jobs/{job['job_id']}").json()["status"] == "queued"
    assert c.post(f"/prefixes/jobs/{job['job_id']}/cancel").json()["status"] == "cancelled"
    assert_error(c.get("/prefixes/acme/never"), 404)
    assert_error(c.get("/prefixes/jobs/job-does-not-exist"), 404, "job_not_found")
    assert_error(c.post("/prefixes/jobs/job-does-not-exist/cancel"), 404)


def test_job_listing_pages(server_factory):
    """`GET /prefixes/jobs` pages as `GET /prefixes` does (`limit`, `after` = the page before's `last_id`, `has_more`),
    oldest first; without `limit`, every job; an `after` that names no job here is a 422 naming it."""
    s = server_factory(training_workers=0, max_jobs_per_tenant=10)
    c = s.client()
    ids = []
    for i in range(5):
        job = c.post("/prefixes", json={"tenant_id": "acme", "name": f"p{i}", "examples": EXAMPLES}).json()
        ids.append(job["job_id"])
    whole = c.get("/prefixes/jobs", params={"tenant_id": "acme"}).json()
    assert [j["job_id"] for j in whole["data"]] == ids and whole["has_more"] is False
    got, after = [], None
    while True:
        page = c.get(
            "/prefixes/jobs", params={"tenant_id": "acme", "limit": 2, **({"after": after} if after else {})}
        )
        body = page.json()
        assert page.status_code == 200 and len(body["data"]) <= 2
        got += [j["job_id"] for j in body["data"]]
        assert body["first_id"] == body["data"][0]["job_id"] and body["last_id"] == got[-1]
        after = body["last_id"]
        if not body["has_more"]:
            break
    assert got == ids
    # a page holding exactly the last jobs says so (a client stops there, not at an empty page after it)
    last = c.get("/prefixes/jobs", params={"tenant_id": "acme", "limit": 3, "after": ids[1]}).json()
    assert [j["job_id"] for j in last["data"]] == ids[2:] and last["has_more"] is False
    err = assert_error(c.get("/prefixes/jobs", params={"after": "job-gone"}), 422, "invalid_value")
    assert err["param"] == "after" and "job-gone" in err["message"]
    assert_error(c.get("/prefixes/jobs", params={"limit": 0}), 422)


def test_training_submission_with_an_idempotency_key_creates_one_job(server_factory):
    """A retried submission (same Idempotency-Key, same body) answers the first one's job and creates nothing, even
    past the per-tenant job limit; the key with another body, or a malformed key, is a 422 that creates nothing;
    another tenant's identical key is its own."""
    s = server_factory(keys={"acme": "k-acme", "globex": "k-g"}, training_workers=0, max_jobs_per_tenant=1)
    c, g = s.client("k-acme"), s.client("k-g")
    body = {"name": "once", "examples": EXAMPLES, "prefix_length": 4}
    key = {"Idempotency-Key": "3f2c9a1e-retry-me"}
    first = c.post("/prefixes", json=body, headers=key)
    assert first.status_code == 202 and "idempotent-replayed" not in first.headers
    job = first.json()
    assert job["idempotency_key"] == "3f2c9a1e-retry-me" and "request_digest" not in job
    again = c.post("/prefixes", json=body, headers=key)
    assert again.status_code == 202 and again.headers["idempotent-replayed"] == "true"
    assert (
        again.json()["job_id"] == job["job_id"]
        and again.headers["location"] == f"/prefixes/jobs/{job['job_id']}"
    )
    err = assert_error(
        c.post("/prefixes", json={**body, "epochs": 3}, headers=key), 422, "idempotency_key_reused"
    )
    assert err["param"] == "Idempotency-Key" and job["job_id"] in err["message"]
    for bad in (b"", b"x" * 256, b"has space", "caf\u00e9".encode()):
        r = c.post("/prefixes", json=body, headers={"Idempotency-Key": bad})
        assert assert_error(r, 422)["param"] == "Idempotency-Key", bad
    # without the key: a new job, over the limit
    assert_error(c.post("/prefixes", json=body), 429, "too_many_jobs")
    assert [j["job_id"] for j in c.get("/prefixes/jobs").json()["data"]] == [job["job_id"]]
    (usage,) = c.get("/usage").json()["data"]
    assert usage["training_jobs"] == 1  # the replay is not a second submission
    other = g.post("/prefixes", json=body, headers=key)  # the same key of another tenant: its own job
    assert other.status_code == 202 and "idempotent-replayed" not in other.headers
    assert other.json()["job_id"] != job["job_id"] and other.json()["tenant_id"] == "globex"
    # once cancelled the job is still the key's answer (a late retry must not start it again)
    assert c.post(f"/prefixes/jobs/{job['job_id']}/cancel").json()["status"] == "cancelled"
    replay = c.post("/prefixes", json=body, headers=key)
    assert replay.json()["job_id"] == job["job_id"] and replay.json()["status"] == "cancelled"


def test_job_retention_and_cap_are_the_servers_settings(server_factory):
    """How long finished jobs are kept (`jobs_retention_s`, 7 days: it was a constant) and how many a tenant keeps
    reach the job queue the server opens."""
    s = server_factory(training_workers=0, jobs_retention_s=60, jobs_kept_per_tenant=5)
    jm = s.state.job_manager
    assert jm.backend.retention_s == 60 and jm.jobs_kept_per_tenant == 5
    assert server_factory(training_workers=0).state.job_manager.backend.retention_s == 7 * 86400
    # the settings' defaults are the job classes' own (settings.py spells them out: importing the training package
    # for them would load torch into every command)
    import inspect

    from server.settings import Settings
    from server.training.jobs import JobManager
    from server.training.records import RETENTION_S

    defaults = Settings()
    assert defaults.jobs_retention_s == RETENTION_S
    assert (
        defaults.jobs_kept_per_tenant
        == inspect.signature(JobManager).parameters["jobs_kept_per_tenant"].default
    )


def test_trainer_validation_is_422_with_param(server_factory):
    s = server_factory()
    c = s.client()
    err = assert_error(
        c.post("/prefixes", json={"tenant_id": "acme", "name": "x", "examples": EXAMPLES, "warmup_ratio": 7}),
        422,
    )
    assert err["param"] == "warmup_ratio"
    err = assert_error(
        c.post("/prefixes", json={"tenant_id": "acme", "name": "x", "examples": EXAMPLES, "bogus": 1}), 422
    )
    assert err["param"] == "bogus"
    # text a tokenizer cannot take (a lone surrogate, escaped in the JSON) or a NUL (binary data): 422, no job
    for field, bad in (("prompt", "\ud800"), ("completion", " \ud800"), ("prompt", "a\u0000b")):
        examples = [{**EXAMPLES[0], field: bad}]
        body = json.dumps({"tenant_id": "acme", "name": "x", "examples": examples}, ensure_ascii=True)
        r = c.post("/prefixes", content=body, headers={"content-type": "application/json"})
        err = assert_error(r, 422)
        assert err["param"] == f"examples[0].{field}", err
    assert c.get("/prefixes/jobs").json()["data"] == []
    # the tenant "jobs" cannot store prefixes: GET /prefixes/jobs/{name} is a job's route
    err = assert_error(
        c.post("/prefixes", json={"tenant_id": "jobs", "name": "faq", "examples": EXAMPLES}), 422
    )
    assert err["param"] == "tenant_id" and "job routes" in err["message"]
    files = {"file": ("p.safetensors", b"\0" * 64, "application/octet-stream")}
    assert assert_error(c.post("/prefixes/jobs/faq/upload", files=files), 422)["param"] == "tenant_id"
    assert c.get("/prefixes/jobs").json()["data"] == []


def test_worker_process_runs_queued_jobs(server_factory, tmp_path):
    from server.model import load_model
    from tests.fixtures.models import make_tiny_llama, make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    make_tiny_llama(tok, seed=0).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    bundle = load_model(str(tmp_path / "model"), device="cpu", cache_dir=tmp_path / "cache")
    s = server_factory(bundle=bundle, training_workers=0)
    c = s.client()
    job = c.post(
        "/prefixes", json={"tenant_id": "acme", "name": "w", "examples": EXAMPLES, "epochs": 1}
    ).json()
    time.sleep(0.5)
    assert c.get(f"/prefixes/jobs/{job['job_id']}").json()["status"] == "queued"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFIXSERVE_CACHE": str(tmp_path / "cache")}
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server",
            "worker",
            "--store",
            s.store.url,
            "--model",
            str(tmp_path / "model"),
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        done = wait_job(c, job["job_id"], timeout=180)
        assert done["status"] == "succeeded", done
        r = c.post(
            "/generate",
            json={"tenant_id": "acme", "prefix": "w", "prompt": "Say the word 1", "max_tokens": 4},
        )
        assert r.status_code == 200 and r.json()["prefix_version"] == 1
    finally:
        worker.send_signal(signal.SIGTERM)
        rc = worker.wait(60)
    assert rc == 0, worker.stderr.read().decode()[-2000:]


def test_changes_by_another_process_reach_a_server_on_a_file_store(server_factory, api_bundle):
    """The CLI or a training worker changing a file store the server uses: the server serves the new version, and
    stops serving a deleted prefix, within a poll of the store's change journal, not after its metadata TTL."""
    from prefix_store import open_store

    s = server_factory(prefixes={("acme", "bot"): {}}, prefix_meta_ttl_s=600)
    c = s.client()
    body = {"tenant_id": "acme", "prefix": "bot", "prompt": "hello", "max_tokens": 2}
    assert c.post("/generate", json=body).json()["prefix_version"] == 1  # resolved and cached for 10 minutes
    other = open_store(s.store.url)  # another process's view of the same directory
    try:
        put_random_prefix(other, api_bundle, "acme", "bot", seed=5)

        def served() -> tuple[int, int | None]:
            deadline = time.monotonic() + 5
            while True:
                r = c.post("/generate", json=body)
                v = r.json().get("prefix_version") if r.status_code == 200 else None
                if (r.status_code, v) != (200, 1) or time.monotonic() > deadline:
                    return r.status_code, v
                time.sleep(0.05)

        assert served() == (200, 2)
        other.delete("acme", "bot")
        deadline = time.monotonic() + 5
        while (r := c.post("/generate", json=body)).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert_error(r, 404, "prefix_not_found")
    finally:
        other.close()
