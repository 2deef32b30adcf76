"""The API keys file and the tenant limits file reloaded while the server runs: keys added and revoked, limits
changed, bad files refused with the previous configuration kept (and counted)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tests.fixtures.server import assert_error, metric_value

POLL_S = 0.05


def replace(path: Path, text: str) -> None:
    """Write the file the way a deployment should: a new file renamed over the old one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def eventually(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the change was not picked up"
        time.sleep(0.02)


def reloads(s, file: str, result: str) -> float:
    text = s.client(s.admin_key).get("/metrics").text
    return metric_value(text, "prefixserve:config_reloads_total", {"file": file, "result": result}) or 0.0


def test_keys_added_and_revoked_without_restart_and_bad_files_refused(server_factory, tmp_path):
    keys = tmp_path / "keys.txt"
    replace(keys, "acme:k-a\n")
    s = server_factory(api_keys_file=str(keys), config_reload_s=POLL_S)
    new = s.client("k-new")
    assert_error(new.get("/v1/models"), 401)
    replace(keys, "acme:k-a\n# onboarded\nglobex:k-new\n")
    eventually(lambda: new.get("/v1/models").status_code == 200)
    assert [m["id"] for m in new.get("/v1/models").json()["data"]] == ["globex/base"]  # its own tenant
    old = s.client("k-a")
    assert old.get("/v1/models").status_code == 200
    replace(keys, "globex:k-new\n")  # acme's key revoked
    eventually(lambda: old.get("/v1/models").status_code == 401)
    assert reloads(s, "api_keys", "ok") == 2
    # a malformed file, then one with no key at all (the server would be open): refused, the keys stay
    replace(keys, "globex-without-a-key\n")
    eventually(lambda: reloads(s, "api_keys", "error") == 1)
    replace(keys, "# nothing\n")
    eventually(lambda: reloads(s, "api_keys", "error") == 2)
    assert new.get("/v1/models").status_code == 200
    assert_error(s.client().get("/v1/models"), 401)
    assert_error(old.get("/v1/models"), 401)
    replace(keys, "globex:k-new\nacme:k-a2\n")
    eventually(lambda: s.client("k-a2").get("/v1/models").status_code == 200)


def test_an_emptied_keys_file_does_not_lock_every_tenant_out(server_factory, tmp_path):
    """With an admin key the server would stay closed, but an emptied file (a bad ConfigMap render) would turn every
    tenant away: refused like a missing file, the keys kept. A byte-order mark (Windows editors) is fine."""
    keys = tmp_path / "keys.txt"
    keys.write_bytes("\ufeffacme:k-a\n".encode())
    s = server_factory(api_keys_file=str(keys), admin_key="adm", config_reload_s=POLL_S)
    acme = s.client("k-a")
    assert acme.get("/v1/models").status_code == 200
    replace(keys, "")
    eventually(lambda: reloads(s, "api_keys", "error") == 1)
    assert acme.get("/v1/models").status_code == 200
    replace(keys, "acme:k-a\nglobex:k-g\n")
    eventually(lambda: s.client("k-g").get("/v1/models").status_code == 200)


def test_tenant_limits_file_reloaded(server_factory, tmp_path):
    limits = tmp_path / "limits.json"
    replace(limits, json.dumps({"acme": {"requests_per_minute": 100}}))
    s = server_factory(tenant_limits_file=str(limits), config_reload_s=POLL_S)
    c = s.client()

    def limit_headers() -> str | None:
        body = {"tenant_id": "acme", "prefix": "base", "prompt": "Hi", "max_tokens": 1}
        r = c.post("/generate", json=body)
        assert r.status_code in (200, 429), r.text
        return r.headers.get("x-ratelimit-limit-requests")

    assert limit_headers() == "100"
    replace(limits, json.dumps({"*": {"requests_per_minute": 1000}, "acme": {"requests_per_minute": 2}}))
    eventually(lambda: limit_headers() == "2")
    assert (
        c.get("/usage", params={"tenant_id": "globex"}).json()["data"][0]["limits"]["requests_per_minute"]
        == 1000
    )
    replace(limits, json.dumps({"acme": {"rpm": 5}}))  # unknown field: refused, the limits stay
    eventually(lambda: reloads(s, "tenant_limits", "error") == 1)
    assert limit_headers() == "2"
    limits.unlink()  # gone: refused too
    eventually(lambda: reloads(s, "tenant_limits", "error") == 2)
    assert reloads(s, "tenant_limits", "ok") == 1


def test_a_change_applies_only_once_the_file_stays_the_same(tmp_path):
    """A file caught mid-write (it changes between two polls) is not taken; one that stayed the same for a poll
    is, once."""
    from types import SimpleNamespace

    from server.api.auth import KeyRing
    from server.api.metrics import Metrics
    from server.api.reload import ConfigReloader
    from server.settings import Settings

    keys = tmp_path / "keys.txt"
    replace(keys, "acme:k-a\n")
    settings = Settings(api_keys_file=str(keys))
    state = SimpleNamespace(
        settings=settings, keyring=KeyRing(settings.tenant_keys(), None), limiter=None, metrics=Metrics()
    )
    r = ConfigReloader(state, 1.0)
    first = state.keyring
    r.check()
    assert state.keyring is first  # nothing changed
    replace(keys, "acme:k-a\nglobex:k-")  # half-written
    r.check()
    assert state.keyring is first
    replace(keys, "acme:k-a\nglobex:k-g\n")  # finished before the next poll: still moving, not taken
    r.check()
    assert state.keyring is first
    r.check()  # unchanged since the last poll: applied
    assert state.keyring is not first and state.keyring.lookup("k-g").tenant_id == "globex"
    second = state.keyring
    r.check()
    assert state.keyring is second  # applied once


def test_a_change_made_while_the_server_starts_is_applied(api_bundle, tmp_path):
    """The files are read when the app is built; a key rotated while the model loads (tens of seconds on a first
    start) is applied by the reloader, not taken for what was loaded."""
    from prefix_store import open_store
    from server.api import create_app
    from server.settings import Settings
    from tests.fixtures.server import LiveServer, start_server

    keys = tmp_path / "keys.txt"
    replace(keys, "acme:k-old\n")
    store = open_store(f"file://{tmp_path}/store")
    settings = Settings(
        store_url=store.url, api_keys_file=str(keys), config_reload_s=POLL_S, kv_cache_mb=16, max_model_len=512,
        training_workers=0, shutdown_grace_s=5,
    )  # fmt: skip
    app = create_app(settings, bundle=api_bundle, store=store)  # the keys are read here
    time.sleep(0.02)
    replace(keys, "acme:k-new\n")  # rotated before the server is up
    server, thread, url = start_server(app)
    live = LiveServer(url, app, server, thread, store)
    try:
        eventually(lambda: live.client("k-new").get("/v1/models").status_code == 200)
        assert_error(live.client("k-old").get("/v1/models"), 401)
    finally:
        live.stop()
        store.close()
