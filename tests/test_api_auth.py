"""API keys: a tenant key acts only as its tenant (others' prefixes and jobs answer 404), admin key for operations."""

from __future__ import annotations

import pytest

from tests.fixtures.server import FakeJobManager, assert_error, put_random_prefix

KEY_A, KEY_B, ADMIN = "key-A-7f3c9e1d", "key-B-0b8a2d44", "admin-5e6f7a8b"
EXAMPLES = [{"prompt": "hi", "completion": " there"}]


@pytest.fixture
def jobs():
    return FakeJobManager(max_jobs_per_tenant=2)


@pytest.fixture
def srv(server_factory, jobs):
    prefixes = {
        ("acme", "default"): {"seed": 1},
        ("acme", "support"): {"seed": 2},
        ("globex", "default"): {"seed": 3},
        ("globex", "secret-plan"): {"seed": 4},
    }
    return server_factory(
        prefixes=prefixes, keys={"acme": KEY_A, "globex": KEY_B}, admin_key=ADMIN, job_manager=jobs
    )


def test_missing_wrong_or_malformed_key_is_401(srv):
    anon = srv.client()
    body = {"tenant_id": "acme", "prompt": "x", "max_tokens": 2}
    for client in (
        anon,
        srv.client("wrong-key-1234"),
        srv.client(headers={"Authorization": f"Basic {KEY_A}"}),
    ):
        r = client.post("/generate", json=body)
        assert_error(r, 401, "invalid_api_key")
        assert r.headers["www-authenticate"] == "Bearer"
        assert "wrong-key-1234" not in r.text and KEY_A not in r.text
    for path in ("/v1/models", "/prefixes", "/prefixes/acme/default", "/prefixes/jobs/job0001"):
        assert_error(anon.get(path), 401)
    # probes stay open
    assert anon.get("/health").status_code == 200
    assert anon.get("/ready").status_code == 200
    assert anon.get("/metrics").status_code == 200


def test_tenant_key_generates_only_as_itself(srv):
    a = srv.client(KEY_A)
    ok = a.post("/generate", json={"prompt": "x", "max_tokens": 2})  # tenant_id defaults to the key's tenant
    assert ok.status_code == 200 and ok.json()["tenant_id"] == "acme"
    assert a.post("/generate", json={"tenant_id": "acme", "prompt": "x", "max_tokens": 2}).status_code == 200
    foreign = a.post("/generate", json={"tenant_id": "globex", "prefix": "secret-plan", "prompt": "x"})
    missing = a.post("/generate", json={"tenant_id": "globex", "prefix": "no-such", "prompt": "x"})
    e1, e2 = assert_error(foreign, 404), assert_error(missing, 404)
    assert e1["code"] == e2["code"]  # an existing foreign prefix looks exactly like a missing one
    assert_error(
        a.post("/v1/completions", json={"model": "globex/secret-plan", "prompt": "x"}), 404, "model_not_found"
    )
    assert_error(
        a.post(
            "/v1/chat/completions", json={"model": "globex", "messages": [{"role": "user", "content": "x"}]}
        ),
        404,
    )
    assert (
        a.post("/v1/completions", json={"model": "acme/support", "prompt": "x", "max_tokens": 2}).status_code
        == 200
    )


def test_models_and_prefix_listing_show_only_own(srv):
    a, b, admin = srv.client(KEY_A), srv.client(KEY_B), srv.client(ADMIN)
    ids = {m["id"] for m in a.get("/v1/models").json()["data"]}
    assert ids == {"acme/default", "acme/support", "acme/base"}
    assert {m["id"] for m in b.get("/v1/models").json()["data"]} == {
        "globex/default",
        "globex/secret-plan",
        "globex/base",
    }
    every = {m["id"] for m in admin.get("/v1/models").json()["data"]}
    assert every == ids | {"globex/default", "globex/secret-plan", "globex/base"}
    assert {(p["tenant_id"], p["name"]) for p in a.get("/prefixes").json()["data"]} == {
        ("acme", "default"),
        ("acme", "support"),
    }
    assert_error(a.get("/prefixes", params={"tenant_id": "globex"}), 404)
    assert len(admin.get("/prefixes").json()["data"]) == 4
    assert len(admin.get("/prefixes", params={"tenant_id": "globex"}).json()["data"]) == 2
    # paging: a tenant's cursor never reaches another tenant's prefixes
    first = a.get("/prefixes", params={"limit": 1}).json()
    assert [p["name"] for p in first["data"]] == ["default"] and first["has_more"] is True
    assert first["first_id"] == first["last_id"] == "acme/default"
    rest = a.get("/prefixes", params={"limit": 1, "after": first["last_id"]}).json()
    assert [p["name"] for p in rest["data"]] == ["support"] and rest["has_more"] is False
    assert a.get("/prefixes", params={"after": "acme/support"}).json()["data"] == []
    ids, after = [], None
    while True:
        page = admin.get("/prefixes", params={"limit": 3, **({"after": after} if after else {})}).json()
        ids += [f"{p['tenant_id']}/{p['name']}" for p in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert ids == ["acme/default", "acme/support", "globex/default", "globex/secret-plan"]
    assert admin.get("/prefixes").json()["has_more"] is False
    for bad in ({"limit": 0}, {"limit": 10_001}, {"after": "acme"}, {"after": "acme/../x"}, {"after": "/x"}):
        assert assert_error(a.get("/prefixes", params=bad), 422)["param"] in ("limit", "after")
    assert_error(a.get("/v1/models/globex/secret-plan"), 404)
    assert a.get("/v1/models/acme/support").json()["id"] == "acme/support"


def test_get_and_delete_foreign_prefix_is_404_and_harmless(srv):
    a, b = srv.client(KEY_A), srv.client(KEY_B)
    r_foreign, r_missing = a.get("/prefixes/globex/secret-plan"), a.get("/prefixes/globex/nothing-here")
    assert assert_error(r_foreign, 404)["code"] == assert_error(r_missing, 404)["code"]
    assert_error(a.delete("/prefixes/globex/secret-plan"), 404)
    assert b.get("/prefixes/globex/secret-plan").status_code == 200  # still there
    assert a.get("/prefixes/acme/support").json()["versions"] == [1]
    assert a.delete("/prefixes/acme/support").json()["deleted"] is True
    assert_error(a.get("/prefixes/acme/support"), 404)
    # another tenant's prefix answers exactly as one of its own that does not exist (the name changed alone)
    own = assert_error(a.get("/prefixes/acme/support"), 404)
    foreign = assert_error(r_foreign, 404)
    assert own == {**foreign, "message": foreign["message"].replace("globex/secret-plan", "acme/support")}
    for call in (a.delete, lambda u: a.get(u + "/download")):
        assert assert_error(call("/prefixes/acme/support"), 404)["message"] == own["message"]


def test_jobs_are_isolated(srv, jobs):
    a, b = srv.client(KEY_A), srv.client(KEY_B)
    assert_error(a.post("/prefixes", json={"tenant_id": "globex", "name": "x", "examples": EXAMPLES}), 404)
    r = b.post("/prefixes", json={"name": "plan2", "examples": EXAMPLES})
    assert r.status_code == 202 and r.json()["status"] == "queued"
    assert r.headers["location"] == f"/prefixes/jobs/{r.json()['job_id']}"
    b_job = r.json()["job_id"]
    assert jobs.jobs[b_job]["tenant_id"] == "globex"
    a_job = a.post("/prefixes", json={"name": "mine", "examples": EXAMPLES}).json()["job_id"]
    assert_error(a.get(f"/prefixes/jobs/{b_job}"), 404, "job_not_found")
    assert_error(a.get("/prefixes/jobs/job9999"), 404, "job_not_found")
    assert_error(a.post(f"/prefixes/jobs/{b_job}/cancel"), 404)
    assert jobs.jobs[b_job]["status"] == "queued"  # untouched
    assert [j["job_id"] for j in a.get("/prefixes/jobs").json()["data"]] == [a_job]
    assert b.post(f"/prefixes/jobs/{b_job}/cancel").json()["status"] == "cancelled"
    assert b.get(f"/prefixes/jobs/{b_job}").json()["status"] == "cancelled"
    jobs.jobs[a_job]["worker"] = "trainer-host-4242-0f1e2d3c"  # host and pid: shown to the admin key only
    assert a.get(f"/prefixes/jobs/{a_job}").json()["worker"] is None
    assert [j["worker"] for j in a.get("/prefixes/jobs").json()["data"]] == [None]
    admin = srv.client(ADMIN)
    assert admin.get(f"/prefixes/jobs/{a_job}").json()["worker"] == "trainer-host-4242-0f1e2d3c"


def test_training_limits_and_validation(srv, jobs):
    a = srv.client(KEY_A)
    assert assert_error(a.post("/prefixes", json={"name": "x", "examples": []}), 422)["param"] == "examples"
    bad = {"name": "x", "examples": [{"prompt": "a", "completion": "b", "label": 1}]}
    assert assert_error(a.post("/prefixes", json=bad), 422)["param"] == "examples[0].label"
    assert_error(a.post("/prefixes", json={"name": "x", "examples": EXAMPLES, "method": "lora"}), 422)
    # the trainer's own validation comes back as 422 naming its field
    jobs.reject_next = ("learning rate too high", "learning_rate")
    err = assert_error(
        a.post("/prefixes", json={"name": "x", "examples": EXAMPLES}), 422, "invalid_training_spec"
    )
    assert err["param"] == "learning_rate"
    assert_error(a.post("/prefixes", json={"name": "base", "examples": EXAMPLES}), 422)
    assert_error(a.post("/prefixes", json={"name": "../x", "examples": EXAMPLES}), 422)
    for i in range(2):
        assert a.post("/prefixes", json={"name": f"n{i}", "examples": EXAMPLES}).status_code == 202
    assert_error(a.post("/prefixes", json={"name": "n3", "examples": EXAMPLES}), 429, "too_many_jobs")
    # another tenant is not affected
    assert srv.client(KEY_B).post("/prefixes", json={"name": "n", "examples": EXAMPLES}).status_code == 202


def test_admin_routes_need_the_admin_key(srv):
    a, admin = srv.client(KEY_A), srv.client(ADMIN)
    assert_error(a.get("/admin/tenants"), 403, "admin_required")
    data = admin.get("/admin/tenants").json()["data"]
    assert {t["tenant_id"]: t["prefixes"] for t in data} == {"acme": 2, "globex": 2}
    assert all(t["has_key"] for t in data)
    # the admin acts as any tenant but must name it
    assert_error(admin.post("/generate", json={"prompt": "x"}), 422, "missing_tenant_id")
    assert (
        admin.post("/generate", json={"tenant_id": "globex", "prompt": "x", "max_tokens": 2}).status_code
        == 200
    )


def test_metrics_can_require_admin(server_factory):
    s = server_factory(keys={"acme": KEY_A}, admin_key=ADMIN, metrics_require_admin=True)
    assert_error(s.client().get("/metrics"), 401)
    assert_error(s.client(KEY_A).get("/metrics"), 403)
    assert s.client(ADMIN).get("/metrics").status_code == 200


def test_open_mode_without_keys(server_factory, api_bundle, caplog):
    caplog.set_level("WARNING", logger="prefixserve.api")
    s = server_factory()
    assert any("OPEN" in r.getMessage() for r in caplog.records)
    put_random_prefix(s.store, api_bundle, "anyone")
    c = s.client()
    assert (
        c.post("/generate", json={"tenant_id": "anyone", "prompt": "x", "max_tokens": 2}).status_code == 200
    )
    assert_error(c.post("/generate", json={"prompt": "x"}), 422, "missing_tenant_id")
    # metrics_require_admin cannot protect anything without an admin key: said at start-up
    caplog.clear()
    server_factory(metrics_require_admin=True)
    assert any("metrics_require_admin" in r.getMessage() and "open" in r.getMessage() for r in caplog.records)


def test_short_keys_are_said_at_start_up_without_the_keys(server_factory, caplog):
    caplog.set_level("WARNING", logger="prefixserve.api")
    server_factory(keys={"acme": KEY_A, "globex": "g" * 40}, admin_key="a" * 40)
    (said,) = [r.getMessage() for r in caplog.records if "shorter than" in r.getMessage()]
    assert "tenant acme's" in said and "globex" not in said and "admin" not in said and KEY_A not in said
    caplog.clear()
    server_factory(keys={"acme": "k" * 40}, admin_key=ADMIN)
    (said,) = [r.getMessage() for r in caplog.records if "shorter than" in r.getMessage()]
    assert "the admin's" in said and "acme" not in said and ADMIN not in said
    caplog.clear()
    server_factory(keys={"acme": "k" * 40}, admin_key="a" * 40)
    assert not [r for r in caplog.records if "shorter than" in r.getMessage()]


def test_key_configuration_is_validated():
    from server.settings import Settings

    with pytest.raises(ValueError) as e:
        Settings(api_keys="acme:k1,globex:k1").tenant_keys()
    assert "k1" not in str(e.value)
    with pytest.raises(ValueError) as e:
        Settings(api_keys="not-a-pair-secretvalue").tenant_keys()
    assert "secretvalue" not in str(e.value)
    s = Settings(api_keys="acme:k1, acme:k2 ,globex:k3")
    assert s.tenant_keys() == {"k1": "acme", "k2": "acme", "k3": "globex"}
    assert "k1" not in repr(s) and "k1" not in str(s.public_dict())


def test_api_keys_file(tmp_path):
    from server.settings import Settings

    f = tmp_path / "keys"
    f.write_text("# tenants\nacme:file-key-1\n\nglobex: file-key-2\n")
    s = Settings(api_keys_file=f, api_keys="initech:env-key")
    assert s.tenant_keys() == {"file-key-1": "acme", "file-key-2": "globex", "env-key": "initech"}


def test_keys_are_held_and_looked_up_as_digests_in_one_step_whatever_their_number(monkeypatch):
    """The ring keeps SHA-256 digests, never a key, and finds one in a dict by digest: a request does not compare
    its key against every configured one (10,000 keys took ~0.6 ms a lookup, twice a request, on the event loop)."""
    from server.api import auth

    many = {f"key-{i:05d}-{'x' * 24}": f"t{i}" for i in range(10_000)}
    ring = auth.KeyRing({**many, KEY_A: "acme", KEY_B: "globex"}, ADMIN)
    held = repr(vars(ring))
    assert KEY_A not in held and ADMIN not in held and "key-00001" not in held
    digests: list[bytes] = []
    compared: list[bytes] = []
    real, real_compare = auth._digest, auth.hmac.compare_digest
    monkeypatch.setattr(auth, "_digest", lambda k: digests.append(real(k)) or digests[-1])
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: compared.append(b) or real_compare(a, b))
    for key, want in (
        (KEY_A, "acme"),
        ("key-09999-" + "x" * 24, "t9999"),
        ("nope-0000", None),
        (ADMIN, None),
    ):
        digests.clear()
        compared.clear()
        p = ring.lookup(key)
        assert len(digests) == 1, key  # the sent key's digest alone: nothing computed per configured key
        assert len(compared) <= 1, key  # (the admin key's digest at most): no pass over the configured keys
        assert (p.tenant_id if p else None) == want and (p is None or not p.admin or key == ADMIN)
    assert ring.lookup(ADMIN).admin and ring.tenants[:2] == ["acme", "globex"]


def test_metrics_carry_no_keys_and_no_per_tenant_labels(srv):
    """After traffic from two tenants, failed auth and training calls, /metrics names neither keys nor tenants."""
    a, b = srv.client(KEY_A), srv.client(KEY_B)
    assert a.post("/generate", json={"tenant_id": "acme", "prompt": "x", "max_tokens": 2}).status_code == 200
    assert b.post("/generate", json={"prompt": "y", "max_tokens": 2}).status_code == 200
    srv.client("stolen-key-9999").post("/generate", json={"tenant_id": "acme", "prompt": "z"})
    text = srv.client(ADMIN).get("/metrics").text
    assert "prefixserve:" in text
    for secret in (KEY_A, KEY_B, ADMIN, "stolen-key-9999", "acme", "globex", "secret-plan"):
        assert secret not in text, secret


def test_cors_answers_a_browsers_preflight_only_for_allowed_origins(server_factory):
    """With cors_allow_origins, a browser on an allowed origin gets its preflight (no key: browsers send none)
    answered and may read the response; another origin gets no CORS headers; by default none are sent."""
    s = server_factory(keys={"acme": KEY_A}, cors_allow_origins="https://app.example.com")
    c = s.client()
    pre = {"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization,content-type"}  # fmt: skip
    r = c.options("/v1/chat/completions", headers=pre)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example.com"
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = s.client(KEY_A).get("/v1/models", headers={"Origin": "https://app.example.com"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example.com"
    assert "x-ratelimit-remaining-tokens" in r.headers["access-control-expose-headers"].lower()
    other = c.options("/v1/chat/completions", headers={**pre, "Origin": "https://evil.example.com"})
    assert "access-control-allow-origin" not in other.headers
    plain = server_factory(keys={"acme": KEY_A}).client()
    assert "access-control-allow-origin" not in plain.options("/v1/chat/completions", headers=pre).headers
