"""Prefixes moved between tenants and servers: GET .../download (an export file) and POST .../upload (an export, or
a PEFT adapter's adapter_config.json + adapter_model.safetensors), through the HTTP API."""

from __future__ import annotations

import io
import json
import time

import pytest
import torch
from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model
from safetensors.torch import load as st_load

from prefix_store.errors import InvalidPrefix
from prefix_store.export import read_export
from tests.fixtures.models import make_tiny_llama, make_tiny_tokenizer
from tests.fixtures.server import assert_error, put_random_prefix

PROMPT = "Once upon a time"


def upload(c, tenant: str, name: str, data: bytes, config: bytes | None = None, **form: str):
    files = {"file": ("prefix.safetensors", io.BytesIO(data), "application/octet-stream")}
    if config is not None:
        files["adapter_config"] = ("adapter_config.json", io.BytesIO(config), "application/json")
    return c.post(f"/prefixes/{tenant}/{name}/upload", files=files, data=form)


def greedy_ids(c, tenant: str, prefix: str, prompt: str = PROMPT, n: int = 8) -> list[int]:
    body = {"tenant_id": tenant, "prefix": prefix, "prompt": prompt, "max_tokens": n, "logprobs": 0}
    r = c.post("/generate", json={**body, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return [lp["id"] for lp in r.json()["logprobs"]]


def test_download_then_upload_to_another_tenant_serves_the_same_tokens(server_factory):
    s = server_factory(
        keys={"acme": "k-a", "globex": "k-g"},
        prefixes={("acme", "support"): {"prefix_length": 6, "seed": 3}, ("acme", "other"): {"seed": 4}},
    )
    a, g = s.client("k-a"), s.client("k-g")
    put_random_prefix(s.store, s.app.state.ps.bundle, "acme", "support", prefix_length=6, seed=5)  # version 2
    r = a.get("/prefixes/acme/support/download")
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    assert r.headers["x-prefix-version"] == "2"
    assert 'filename="acme--support--v2.safetensors"' in r.headers["content-disposition"]
    exported = read_export(r.content)
    assert exported.meta.version == 2 and exported.meta.prefix_length == 6
    stored = s.store.get("acme", "support")
    assert torch.equal(exported.kv, stored.kv)
    assert set(st_load(r.content)) == {"kv"}  # any safetensors reader opens it
    v1 = a.get("/prefixes/acme/support/download", params={"version": 1})
    assert v1.headers["x-prefix-version"] == "1" and torch.equal(
        read_export(v1.content).kv, s.store.get("acme", "support", 1).kv
    )

    up = upload(g, "globex", "copied", r.content)
    assert up.status_code == 201, up.text
    info = up.json()
    assert up.headers["location"] == "/prefixes/globex/copied"
    assert info["tenant_id"] == "globex" and info["version"] == 1 and info["prefix_length"] == 6
    assert info["extra"]["imported_from"] == {"prefix": "'acme/support' v2", "sha256": stored.meta.sha256}
    assert info["extra"]["prompt_format"] == "raw"  # the exported prefix's own
    assert torch.equal(s.store.get("globex", "copied").kv, stored.kv)
    ours = greedy_ids(a, "acme", "support")
    assert greedy_ids(g, "globex", "copied") == ours
    assert greedy_ids(a, "acme", "other") != ours  # the prefix decides the tokens: the comparison can fail
    # a second upload of the same name is a new version; prompt_format can be set
    again = upload(g, "globex", "copied", r.content, prompt_format="chat")
    assert again.status_code == 201 and again.json()["version"] == 2
    assert again.json()["extra"]["prompt_format"] == "chat"
    assert g.get("/prefixes/globex/copied").json()["versions"] == [1, 2]


def _peft(cfg, tmp_path):
    pm = get_peft_model(make_tiny_llama(make_tiny_tokenizer(), seed=0), cfg)  # the server's tiny base model
    torch.manual_seed(1)
    with torch.no_grad():
        for q in pm.prompt_encoder["default"].parameters():
            q.normal_(0, 0.5)
    pm.eval().save_pretrained(tmp_path)
    return (
        pm,
        (tmp_path / "adapter_config.json").read_bytes(),
        (tmp_path / "adapter_model.safetensors").read_bytes(),
    )


@pytest.mark.parametrize(
    "cfg",
    [
        PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=5, prefix_projection=True, encoder_hidden_size=24
        ),
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    ],
    ids=["prefix-tuning", "prompt-tuning"],
)
def test_peft_adapter_upload_generates_like_peft(cfg, server_factory, tmp_path):
    s = server_factory()
    c = s.client()
    pm, config, weights = _peft(cfg, tmp_path)
    r = upload(c, "acme", "peft", weights, config)
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["kind"] == ("prompt_tuning" if isinstance(cfg, PromptTuningConfig) else "prefix_tuning")
    assert info["prefix_length"] == cfg.num_virtual_tokens and info["extra"]["source"] == "peft"
    ids = c.post("/tokenize", json={"tenant_id": "acme", "prefix": "peft", "prompt": PROMPT}).json()["tokens"]
    with torch.no_grad():
        x = torch.tensor([ids])
        ref = pm.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False)
    want = ref[0, len(ids) :].tolist()
    eos = s.app.state.ps.bundle.spec.eos_token_ids
    got = greedy_ids(c, "acme", "peft")[: len(want)]
    assert got == want and not set(want) & set(eos)
    assert got != greedy_ids(c, "acme", "base")  # the adapter changes the output


def test_refused_uploads_are_4xx_and_store_nothing(server_factory, tmp_path):
    from tests.fixtures.models import tiny_llama

    s = server_factory(keys={"acme": "k-a", "globex": "k-g"}, max_upload_bytes=64 * 1024, max_model_len=64)
    a = s.client("k-a")
    bundle = s.app.state.ps.bundle
    put_random_prefix(s.store, bundle, "globex", "mine", prefix_length=4)
    good = s.client("k-g").get("/prefixes/globex/mine/download").content
    # another base model's export: refused with both fingerprints' reason
    other = tiny_llama(seed=1)
    put_random_prefix(s.store, other, "globex", "foreign", fingerprint=other.fingerprint)
    from prefix_store.export import export_prefix

    foreign = export_prefix(s.store.get("globex", "foreign"))
    err = assert_error(upload(a, "acme", "x", foreign), 422, "prefix_incompatible")
    assert err["param"] == "file" and "base model" in err["message"]
    # values so large that attention scores overflow (and the KV blocks they leave behind poison other tenants'
    # rows), and float8 values (torch cannot check them: a 500 and a closed connection, a stored one failing every
    # request): refused on upload, and one already in the store (stored before the store checked) is not served
    from tests.fixtures.server import put_unchecked, random_kv

    base = random_kv(bundle, 4, 0)
    for name, kv, why in (
        ("huge", base * 1e6, "in magnitude"),
        ("e5m2", base.to(torch.float8_e5m2), "dtype float8_e5m2"),
        ("e4m3", base.to(torch.float8_e4m3fn), "dtype float8_e4m3fn"),
    ):
        exported = put_unchecked(s.store, bundle, "globex", name, kv)
        err = assert_error(upload(a, "acme", "x", exported), 422, "invalid_prefix")
        assert why in err["message"], err
        ask = {"tenant_id": "globex", "prefix": name, "prompt": "x", "max_tokens": 2}
        err = assert_error(s.client("k-g").post("/generate", json=ask), 422, "prefix_corrupt")
        assert why in err["message"], err
    # one flipped byte in the tensor data
    bad = bytearray(good)
    bad[-3] ^= 0x40
    assert_error(upload(a, "acme", "x", bytes(bad)), 422, "prefix_corrupt")
    assert_error(upload(a, "acme", "x", good[:-10]), 422, "invalid_prefix")  # truncated
    err = assert_error(upload(a, "acme", "x", b"\x00" * 100), 422, "invalid_prefix")
    assert "PEFT" in err["message"] and err["param"] == "file"
    # PEFT: a LoRA config, a config that is not JSON, weights that are not safetensors
    _, config, weights = _peft(PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), tmp_path)
    lora = json.dumps({**json.loads(config), "peft_type": "LORA"}).encode()
    err = assert_error(upload(a, "acme", "x", weights, lora), 422, "invalid_prefix")
    assert err["param"] == "adapter_config" and "LORA" in err["message"]
    assert assert_error(upload(a, "acme", "x", weights, b"{nope"), 422)["param"] == "adapter_config"
    assert assert_error(upload(a, "acme", "x", b"PK\x03\x04pickle", config), 422)["param"] == "file"
    assert_error(upload(a, "acme", "x", good, prompt_format="markdown"), 422)
    assert_error(a.post("/prefixes/acme/x/upload", data={"prompt_format": "raw"}), 422)  # no file part
    assert_error(upload(a, "acme", "base", good), 422)  # reserved name
    assert_error(
        upload(a, "globex", "x", good), 404, "prefix_not_found"
    )  # another tenant's: no existence leak
    err = assert_error(upload(a, "acme", "x", b"\x00" * (65 * 1024)), 413, "body_too_large")
    assert "(max_upload_bytes)" in err["message"]  # the setting to raise
    put_random_prefix(s.store, bundle, "globex", "long", prefix_length=64)
    too_long = s.client("k-g").get("/prefixes/globex/long/download").content
    assert_error(upload(a, "acme", "x", too_long), 413, "prefix_too_long")
    # a request needs a prompt token and an output token after the prefix: 63 of 64 positions could never serve
    for p, status in ((63, 413), (62, 201)):
        put_random_prefix(s.store, bundle, "globex", f"p{p}", prefix_length=p)
        got = s.client("k-g").get(f"/prefixes/globex/p{p}/download").content
        assert upload(a, "acme", f"p{p}", got).status_code == status, p
    r = a.post(
        "/generate",
        json={"tenant_id": "acme", "prefix": "p62", "prompt": "a", "max_tokens": 1, "prompt_format": "raw"},
    )
    assert r.json()["usage"]["completion_tokens"] == 1
    assert a.delete("/prefixes/acme/p62").status_code == 200  # (this test stores nothing else)
    # parseable files with fields of the wrong type or out of range (crafted, not made by any tool)
    header_len = int.from_bytes(good[:8], "little")
    header = json.loads(good[8 : 8 + header_len])
    meta = json.loads(header["__metadata__"]["meta"])
    # (extra and training are checked when stored: a NaN, or a lone surrogate that no response could encode)
    for bad_meta in (
        "5",
        json.dumps({**meta, "created": 10**400}),
        json.dumps({**meta, "created": "NaN"}),
        json.dumps({**meta, "extra": {"x": float("nan")}}),
        json.dumps({**meta, "extra": {"x": "\ud800"}}),
        json.dumps({**meta, "training": {"note": ["\udfff"]}}),
    ):
        crafted = json.dumps(
            {**header, "__metadata__": {**header["__metadata__"], "meta": bad_meta}}
        ).encode()
        err = assert_error(
            upload(a, "acme", "x", len(crafted).to_bytes(8, "little") + crafted + good[8 + header_len :]), 422
        )
        assert err["code"] == "invalid_prefix" and err["param"] == "file"
    for field, value in (("num_layers", "abc"), ("num_transformer_submodules", [1]), ("num_virtual_tokens", "3.5"),
                         ("num_virtual_tokens", float("inf")), ("num_layers", True)):  # fmt: skip
        cfg = json.dumps({**json.loads(config), field: value}).encode()
        err = assert_error(upload(a, "acme", "x", weights, cfg), 422, "invalid_prefix")
        assert field in err["message"]
    cfg = json.dumps({**json.loads(config), "base_model_name_or_path": "\ud800"}).encode()
    assert_error(upload(a, "acme", "x", weights, cfg), 422, "invalid_prefix")
    assert s.store.list("acme") == []
    assert a.get("/prefixes").status_code == 200
    # and a good one goes through afterwards
    assert upload(a, "acme", "x", good).status_code == 201


def test_an_upload_the_server_has_no_room_to_receive_is_a_503(server_factory, monkeypatch):
    """An upload's body is spooled to the temporary folder twice (the server's buffer, then the multipart
    parser's file): a full disk at the first was a 500 (an unhandled OSError), at the second a 400 `invalid_json`
    blaming the client. Both are a 503 to retry, nothing stored, and the next upload works."""
    import errno
    import tempfile

    import starlette.formparsers

    s = server_factory(prefixes={("acme", "src"): {"prefix_length": 5, "seed": 1}})
    c = s.client()
    data = c.get("/prefixes/acme/src/download").content

    class Full(tempfile.SpooledTemporaryFile):  # type: ignore[type-arg]
        def write(self, b):
            raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr("server.api.app.tempfile.SpooledTemporaryFile", Full)
        err = assert_error(upload(c, "acme", "copy", data), 503, "server_busy")
        assert "no room to receive" in err["message"]
    real = starlette.formparsers.MultiPartParser.parse

    async def parse_on_a_full_disk(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(starlette.formparsers.MultiPartParser, "parse", parse_on_a_full_disk)
        r = upload(c, "acme", "copy", data)
        assert_error(r, 503, "server_busy")
        assert r.headers["retry-after"]
    assert starlette.formparsers.MultiPartParser.parse is real
    assert not s.store.exists("acme", "copy")
    assert upload(c, "acme", "copy", data).status_code == 201


def test_an_upload_with_an_idempotency_key_stores_one_version(server_factory):
    """A retried upload (same key, same file) answers the first one's version and stores nothing; the key with
    another file is a 422 that stores nothing; an export carries no key into the store it is uploaded to."""
    s = server_factory(keys={"acme": "k-a"}, prefixes={("acme", "src"): {"prefix_length": 5, "seed": 1}})
    a = s.client("k-a")
    data = a.get("/prefixes/acme/src/download").content
    put_random_prefix(s.store, s.app.state.ps.bundle, "acme", "src", prefix_length=5, seed=2)
    other = a.get("/prefixes/acme/src/download").content  # its next version: another file
    key = {"Idempotency-Key": "up-1"}

    def up(content, headers=key):
        return up_form(content, {}, headers)

    def up_form(content, form, headers=key):
        files = {"file": ("prefix.safetensors", io.BytesIO(content), "application/octet-stream")}
        return a.post("/prefixes/acme/copy/upload", files=files, data=form, headers=headers)

    first = up(data)
    assert (
        first.status_code == 201
        and "idempotent-replayed" not in first.headers
        and first.json()["version"] == 1
    )
    again = up(data)
    assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true"
    assert again.json()["version"] == 1 and s.store.versions("acme", "copy") == [1]
    err = assert_error(up(other), 422, "idempotency_key_reused")
    assert err["param"] == "Idempotency-Key" and s.store.versions("acme", "copy") == [1]
    assert assert_error(up(data, {"Idempotency-Key": "two words"}), 422)["param"] == "Idempotency-Key"
    assert up(data, {}).json()["version"] == 2  # no key: a new version each time
    # leaving prompt_format out or sending the export's own is the same upload
    assert up_form(data, {"prompt_format": "raw"}).headers["idempotent-replayed"] == "true"
    # the key stays with this store: a download does not carry it, an upload elsewhere with it is new there
    assert s.store.get_meta("acme", "copy", 1).extra["idempotency"]["key"] == "up-1"
    copied = a.get("/prefixes/acme/copy/download", params={"version": 1}).content
    assert "idempotency" not in read_export(copied).meta.extra
    files = {"file": ("prefix.safetensors", io.BytesIO(copied), "application/octet-stream")}
    moved = a.post("/prefixes/acme/moved/upload", files=files)
    assert moved.status_code == 201 and "idempotency" not in s.store.get_meta("acme", "moved").extra
    files = {"file": ("prefix.safetensors", io.BytesIO(copied), "application/octet-stream")}
    assert a.post("/prefixes/acme/moved/upload", files=files, headers=key).json()["version"] == 2


def test_download_errors(server_factory):
    s = server_factory(keys={"acme": "k-a", "globex": "k-g"}, prefixes={("globex", "mine"): {}})
    a = s.client("k-a")
    assert_error(a.get("/prefixes/acme/nope/download"), 404, "prefix_not_found")
    assert_error(a.get("/prefixes/globex/mine/download"), 404, "prefix_not_found")  # no existence leak
    g = s.client("k-g")
    assert_error(g.get("/prefixes/globex/mine/download", params={"version": 9}), 404, "prefix_not_found")
    assert_error(g.get("/prefixes/globex/mine/download", params={"version": 0}), 422)
    assert g.get("/prefixes/globex/mine/download").status_code == 200


def test_downloads_at_once_are_bounded(server_factory):
    """Each download holds its record about three times in memory while it is read and encoded: past
    `max_concurrent_downloads` of them a download is a 503 with Retry-After, and the slot comes back after each."""
    import threading

    s = server_factory(keys={"acme": "k-a"}, prefixes={("acme", "big"): {}}, max_concurrent_downloads=1)
    a = s.client("k-a")
    entered, release = threading.Event(), threading.Event()
    read = s.store.get

    def slow_get(*args, **kw):
        entered.set()
        release.wait(30)
        return read(*args, **kw)

    s.store.get = slow_get
    first: list = []
    t = threading.Thread(target=lambda: first.append(a.get("/prefixes/acme/big/download")))
    t.start()
    try:
        assert entered.wait(30)
        busy = a.get("/prefixes/acme/big/download")
        assert_error(busy, 503, "too_many_downloads")
        assert int(busy.headers["retry-after"]) >= 1
    finally:
        release.set()
        t.join(30)
    assert first[0].status_code == 200
    del s.store.get
    assert a.get("/prefixes/acme/big/download").status_code == 200
    assert_error(a.get("/prefixes/acme/nope/download"), 404)  # a failed read gives its slot back too
    assert a.get("/prefixes/acme/big/download").status_code == 200


# ------------------------------------------------------------------------------------------ SDK, real server
def test_sdk_download_and_upload(server_factory, tmp_path):
    import prefixserve_client as ps

    s = server_factory(keys={"acme": "k-a", "globex": "k-g"}, prefixes={("acme", "support"): {"seed": 9}})
    with ps.Client(s.url, api_key="k-a") as a, ps.Client(s.url, api_key="k-g") as g:
        out = tmp_path / "support.safetensors"
        data = a.prefixes.download("acme", "support", path=out)
        assert out.read_bytes() == data and read_export(data).meta.name == "support"
        info = g.prefixes.upload("globex", "copy", out)
        assert isinstance(info, ps.PrefixInfo) and (info.tenant_id, info.name, info.version) == (
            "globex",
            "copy",
            1,
        )
        assert (
            g.generate("globex", PROMPT, prefix="copy", max_tokens=6).text
            == a.generate("acme", PROMPT, prefix="support", max_tokens=6).text
        )
        # a PEFT folder as save_pretrained wrote it
        folder = tmp_path / "peft"
        _peft(PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), folder)
        assert a.prefixes.upload("acme", "from-peft", folder).kind == "prompt_tuning"
        # the weights file alone finds its adapter_config.json beside it; bytes need it given
        assert a.prefixes.upload("acme", "from-peft", folder / "adapter_model.safetensors").version == 2
        with pytest.raises(ps.UnprocessableEntity) as e:
            a.prefixes.upload("acme", "x", (folder / "adapter_model.safetensors").read_bytes())
        assert e.value.code == "invalid_prefix" and e.value.param == "file"
        with pytest.raises(ps.NotFound):
            a.prefixes.download("globex", "copy")
        with pytest.raises(FileNotFoundError, match="safetensors"):
            a.prefixes.upload("acme", "x", tmp_path)  # a folder without adapter files
    assert [m.name for m in s.store.list("acme")] == ["from-peft", "support"]


def test_async_sdk_download_and_upload(server_factory, tmp_path):
    import asyncio

    import prefixserve_client as ps

    s = server_factory(prefixes={("acme", "support"): {"seed": 2}})

    async def main() -> None:
        async with ps.AsyncClient(s.url) as c:
            data = await c.prefixes.download("acme", "support", version=1, path=tmp_path / "f")
            assert (tmp_path / "f").read_bytes() == data
            info = await c.prefixes.upload("acme", "again", data, prompt_format="chat")
            assert info.version == 1 and info.extra["prompt_format"] == "chat"

    asyncio.run(main())
    assert torch.equal(s.store.get("acme", "again").kv, s.store.get("acme", "support").kv)


def test_uploads_beyond_the_concurrency_limit_get_503_and_store_nothing(server_factory, monkeypatch):
    """While `max_concurrent_uploads` uploads are being parsed, another gets 503 + Retry-After (each parse holds
    its file and tensors in memory); once they finish, uploads go through again."""
    import threading

    import server.api.routes_prefixes as routes

    s = server_factory(keys={"acme": "k-a", "globex": "k-g"}, max_concurrent_uploads=1)
    a = s.client("k-a")
    put_random_prefix(s.store, s.app.state.ps.bundle, "globex", "mine", prefix_length=4)
    good = s.client("k-g").get("/prefixes/globex/mine/download").content
    entered, release = threading.Event(), threading.Event()
    real = routes.from_upload

    def held(*args, **kw):
        entered.set()
        assert release.wait(30)
        return real(*args, **kw)

    monkeypatch.setattr(routes, "from_upload", held)
    out: list[int] = []
    t = threading.Thread(target=lambda: out.append(upload(a, "acme", "first", good).status_code))
    t.start()
    try:
        assert entered.wait(30)
        r = upload(a, "acme", "second", good)
        assert_error(r, 503, "too_many_uploads")
        assert int(r.headers["retry-after"]) >= 1
    finally:
        release.set()
        t.join(30)
    assert out == [201]
    assert [m.name for m in s.store.list("acme")] == ["first"]
    assert upload(a, "acme", "second", good).status_code == 201


def test_one_tenants_slow_uploads_do_not_hold_every_upload_slot(server_factory, monkeypatch):
    """An upload holds its slot from its headers on: one per tenant (a tenant's second waits: 503), so another
    tenant still uploads; and a body that trickles in past the deadline is a 408 that frees the slot."""
    import socket

    import server.api.app as app_module

    monkeypatch.setattr(app_module, "UPLOAD_BODY_S", 1.0)
    s = server_factory(keys={"acme": "k-a", "globex": "k-g"}, max_concurrent_uploads=2)
    put_random_prefix(s.store, s.app.state.ps.bundle, "globex", "mine", prefix_length=4)
    good = s.client("k-g").get("/prefixes/globex/mine/download").content
    host, port = s.url.removeprefix("http://").split(":")
    slow = socket.create_connection((host, int(port)))
    try:  # acme's upload: headers and a few bytes of a 1 MB body, then nothing
        slow.sendall(b"POST /prefixes/acme/slow/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k-a\r\n"
                     b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 1000000\r\n\r\n--b\r\n")  # fmt: skip
        deadline = time.monotonic() + 10
        while s.app.state.ps.svc.uploads_active != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert s.app.state.ps.svc.uploads_active == 1
        r = upload(s.client("k-a"), "acme", "second", good)
        assert_error(r, 503, "too_many_uploads")
        assert upload(s.client("k-g"), "globex", "other", good).status_code == 201
        slow.settimeout(10)
        assert b" 408 " in slow.recv(4096).split(b"\r\n")[0] + b" "
        while s.app.state.ps.svc.uploads_active and time.monotonic() < deadline + 10:
            time.sleep(0.01)
        assert s.app.state.ps.svc.uploads_active == 0
    finally:
        slow.close()
    assert upload(s.client("k-a"), "acme", "second", good).status_code == 201


def test_a_body_that_trickles_in_past_the_deadline_is_a_408(server_factory, monkeypatch):
    """Any request body, not only an upload's, has a deadline: a client sending a /generate body a byte at a time
    (or never finishing it) held its connection and task for as long as it liked."""
    import socket

    import server.api.app as app_module

    monkeypatch.setattr(app_module, "BODY_S", 1.0)
    s = server_factory()
    host, port = s.url.removeprefix("http://").split(":")
    slow = socket.create_connection((host, int(port)))
    try:
        slow.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"tenant_id\": ")  # fmt: skip
        slow.settimeout(10)
        t0 = time.monotonic()
        answer = slow.recv(4096)
        took = time.monotonic() - t0
        while b"request_timeout" not in answer and (more := slow.recv(4096)):  # the body may come on its own
            answer += more
        assert b" 408 " in answer.split(b"\r\n")[0] + b" " and b"request_timeout" in answer
        assert 0.9 <= took < 5
    finally:
        slow.close()
    r = s.client().post(
        "/generate", json={"tenant_id": "acme", "prefix": "base", "prompt": "hi", "max_tokens": 1}
    )
    assert r.status_code == 200


def test_an_upload_stores_no_more_than_a_prefix_of_its_limits(server_factory):
    """PEFT weights of a few bytes that stand for a kv thousands of times their size (a raw prefix encoder of width
    1) are refused past max_upload_prefix_length before the kv is computed; an export carries only the tensors and
    metadata a record holds, and not the training job id its summary names (a job here would take the version for
    the one it stored)."""
    from safetensors.torch import save

    from prefix_store.export import export_prefix
    from tests.fixtures.server import random_kv

    s = server_factory(max_upload_prefix_length=16, training_max_prefix_length=8)
    c = s.client()
    bundle = s.app.state.ps.bundle
    spec = bundle.spec
    width = spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim

    def amplifier(p: int) -> tuple[bytes, bytes]:
        torch.manual_seed(0)
        w = {
            "base_model.prefix_encoder.embedding.weight": torch.full((p, 1), 0.01),
            "base_model.prefix_encoder.transform.0.weight": torch.full((1, 1), 0.01),
            "base_model.prefix_encoder.transform.0.bias": torch.zeros(1),
            "base_model.prefix_encoder.transform.2.weight": torch.randn(width, 1) * 0.1,
            "base_model.prefix_encoder.transform.2.bias": torch.randn(width) * 0.1,
        }
        cfg = {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": p,
               "prefix_projection": True}  # fmt: skip
        return save(w), json.dumps(cfg).encode()

    err = assert_error(upload(c, "acme", "amp", *amplifier(17)), 413, "prefix_too_long")
    assert "max_upload_prefix_length" in err["message"] and err["param"] == "file"
    assert upload(c, "acme", "amp", *amplifier(16)).status_code == 201
    # exports (made here by putting odd records in the store and downloading them)
    kv = random_kv(bundle, 4, 0)
    fp, h = bundle.fingerprint, spec.hidden_size

    def export(tensors=None, training=None, extra=None, kind="prompt_tuning") -> bytes:
        s.store.put("globex", "odd", kind, {"kv": kv, **(tensors or {})}, base_model_fingerprint=fp,
                    prefix_length=4, training=training, extra=extra or {})  # fmt: skip
        return export_prefix(s.store.get("globex", "odd"))

    for odd, why in (
        (export({"junk": torch.zeros(8)}), "unexpected tensors ['junk']"),
        (export({"soft_prompt": torch.zeros(4, h + 1)}), "does not fit"),
        (export({"soft_prompt": torch.full((4, h), 2e6)}), "in magnitude"),  # it would seed init_from
        (export(extra={"prompt_format": "evil"}), "prompt_format"),
        (export(training={"note": "x" * 70_000}), "training summary"),
    ):
        err = assert_error(upload(c, "acme", "x", odd), 422, "invalid_prefix")
        assert why in err["message"], err
    with pytest.raises(InvalidPrefix, match="int64"):  # the store itself keeps trained tensors floating-point
        export({"soft_prompt": torch.zeros(4, h, dtype=torch.int64)})
    assert s.store.versions("acme", "x") == []
    good = export({"soft_prompt": torch.zeros(4, h)}, training={"job_id": "job-elsewhere", "steps": 3})
    r = upload(c, "acme", "x", good)
    assert r.status_code == 201, r.text
    training = s.store.get_meta("acme", "x").training
    assert (
        "job_id" not in training and training["exported_job_id"] == "job-elsewhere" and training["steps"] == 3
    )


def test_a_tenants_next_upload_may_come_as_soon_as_the_last_is_answered(server_factory, monkeypatch):
    """One upload per tenant at a time: the slot comes back with the answer, not once FastAPI has closed the
    upload's spooled file afterwards (on a thread, for files past 1 MiB): a client uploading one file after
    another got a 503 now and then."""
    import asyncio

    from starlette.datastructures import UploadFile

    close = UploadFile.close

    async def slow_close(self):  # the close after the answer, made slow
        await asyncio.sleep(0.5)
        await close(self)

    monkeypatch.setattr(UploadFile, "close", slow_close)
    s = server_factory(prefixes={("acme", "src"): {}})
    c = s.client()
    data = c.get("/prefixes/acme/src/download").content
    for i in range(3):
        r = upload(c, "acme", f"copy{i}", data)
        assert r.status_code == 201, r.text
