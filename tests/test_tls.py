"""HTTPS serving (`--ssl-certfile`, `--ssl-keyfile`, `--ssl-ca-certs`, `--ssl-cert-reqs`, as vLLM's): the settings'
checks before anything loads, the header deadline over TLS, and a real server process over HTTPS and mutual TLS.

Certificates are made with the `openssl` command in a temporary folder: a throwaway CA, a server certificate for
127.0.0.1 and localhost, a client certificate it signed, and one it did not.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from server import cli

pytestmark = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="needs the openssl command (test certs)"
)

EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate the CA did not sign
    rogue_key: Path
    other_key: Path  # a key that is no certificate's here
    encrypted_key: Path  # the server's key, encrypted
    renewed_cert: Path  # another certificate for the server, with its own key (a renewal)
    renewed_key: Path

    def trusting(self, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
        """A client's context trusting the CA, presenting `cert` if given."""
        ctx = ssl.create_default_context(cafile=str(self.ca))
        if cert is not None:
            ctx.load_cert_chain(str(cert), str(key))
        return ctx


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def _issue(d: Path, name: str, ca: str, ext: str) -> tuple[Path, Path]:
    key, csr, cert, extfile = d / f"{name}.key", d / f"{name}.csr", d / f"{name}.pem", d / f"{name}.ext"
    _openssl("req", *EC, "-keyout", key, "-out", csr, "-subj", f"/CN={name}")
    extfile.write_text(ext + "\nauthorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n")
    _openssl("x509", "-req", "-in", csr, "-CA", d / f"{ca}.pem", "-CAkey", d / f"{ca}.key", "-CAcreateserial",
             "-out", cert, "-days", "2", "-extfile", extfile)  # fmt: skip
    return cert, key


def _ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", *EC, "-keyout", d / f"{name}.key", "-out", d / f"{name}.pem", "-days", "2",
             "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "rogue-ca")
    leaf = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
    server = _issue(
        d, "server", "ca", leaf + "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost"
    )
    client = _issue(d, "client", "ca", leaf + "extendedKeyUsage=clientAuth")
    rogue = _issue(d, "rogue", "rogue-ca", leaf + "extendedKeyUsage=clientAuth")
    other = d / "other.key"
    _openssl("genpkey", "-algorithm", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-out", other)
    encrypted = d / "encrypted.key"
    _openssl("pkey", "-in", server[1], "-aes256", "-passout", "pass:secret", "-out", encrypted)
    renewed = _issue(
        d, "renewed", "ca", leaf + "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost"
    )
    return Pki(d / "ca.pem", *server, *client, *rogue, other, encrypted, *renewed)


# ------------------------------------------------------------------------------------------------ settings
def _tls_args(pki: Pki, **over: str | Path | None) -> list[str]:
    given = {"ssl_certfile": pki.server_cert, "ssl_keyfile": pki.server_key, **over}
    return [a for k, v in given.items() if v is not None for a in (f"--{k.replace('_', '-')}", str(v))]


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        (
            {"ssl_certfile": None},
            "PREFIXSERVE_SSL_KEYFILE / --ssl-keyfile is set but PREFIXSERVE_SSL_CERTFILE / --ssl-certfile is not",
        ),
        (
            {"ssl_certfile": "missing.pem"},
            "PREFIXSERVE_SSL_CERTFILE / --ssl-certfile: cannot read missing.pem",
        ),
        ({"ssl_keyfile": "missing.key"}, "PREFIXSERVE_SSL_KEYFILE / --ssl-keyfile: cannot read missing.key"),
        ({"ssl_certfile": "server.key"}, "--ssl-certfile: server.key holds no PEM certificate"),
        ({"ssl_keyfile": "ca.pem"}, "--ssl-keyfile: ca.pem holds no PEM private key"),
        (
            {"ssl_keyfile": "other.key"},
            "--ssl-keyfile: the private key in other.key is not the key of the cert",
        ),
        ({"ssl_keyfile": "encrypted.key"}, "--ssl-keyfile: the private key in encrypted.key is encrypted"),
        (
            {"ssl_keyfile": None},
            "--ssl-certfile: {d}/server.pem holds no private key: set PREFIXSERVE_SSL_KEYFILE",
        ),
        (
            {"ssl_cert_reqs": "2"},
            "PREFIXSERVE_SSL_CERT_REQS / --ssl-cert-reqs required needs PREFIXSERVE_SSL_CA_CERTS / --ssl-ca-certs",
        ),
        ({"ssl_cert_reqs": "optional"}, "--ssl-cert-reqs optional needs PREFIXSERVE_SSL_CA_CERTS"),
        (
            {"ssl_ca_certs": "ca.pem"},
            "--ssl-ca-certs is set but PREFIXSERVE_SSL_CERT_REQS / --ssl-cert-reqs is none",
        ),
        (
            {"ssl_ca_certs": "server.key", "ssl_cert_reqs": "2"},
            "--ssl-ca-certs: server.key holds no PEM CA cert",
        ),
        (
            {"ssl_certfile": None, "ssl_keyfile": None, "ssl_ca_certs": "ca.pem", "ssl_cert_reqs": "2"},
            "PREFIXSERVE_SSL_CA_CERTS / --ssl-ca-certs is set but PREFIXSERVE_SSL_CERTFILE / --ssl-certfile is not",
        ),
    ],
)
def test_tls_settings_that_cannot_work_are_refused_in_one_line(pki, over, needle, capsys, monkeypatch):
    """Exit 2 before the model loads, naming the variable, the flag and the file (uvicorn's answer was a traceback
    once the model had loaded, "[SSL] PEM lib" for most of them, and an encrypted key a passphrase prompt)."""
    monkeypatch.chdir(pki.ca.parent)  # (the file names above are relative to it)
    assert cli.main(["serve", "--port", "0", "--device", "cpu", *_tls_args(pki, **over)]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "invalid settings" in err and needle.format(d=pki.ca.parent) in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_ssl_cert_reqs_takes_vllms_numbers_and_names(pki, monkeypatch):
    from server.settings import Settings
    from server.tls import uvicorn_ssl_options

    base = {"ssl_certfile": pki.server_cert, "ssl_keyfile": pki.server_key, "ssl_ca_certs": pki.ca}
    for given, want in [
        (2, "required"),
        ("1", "optional"),
        ("CERT_REQUIRED", "required"),
        (" Optional ", "optional"),
    ]:
        assert Settings(**base, ssl_cert_reqs=given).ssl_cert_reqs == want
    with pytest.raises(ValueError, match="ssl_cert_reqs"):
        Settings(**base, ssl_cert_reqs=3)
    monkeypatch.setenv("PREFIXSERVE_SSL_CERT_REQS", "2")
    assert Settings(**base).ssl_cert_reqs == "required"
    # the flag takes what the setting takes (CERT_REQUIRED was refused by argparse, accepted from the environment)
    for given, want in (("1", "optional"), ("CERT_REQUIRED", "required"), ("Required", "required")):
        assert cli.build_parser().parse_args(["serve", "--ssl-cert-reqs", given]).ssl_cert_reqs == want
    with pytest.raises(SystemExit):  # (argparse: not a choice)
        cli.build_parser().parse_args(["serve", "--ssl-cert-reqs", "3"])
    opts = uvicorn_ssl_options(Settings(**base, ssl_cert_reqs="required"))
    assert opts == {"ssl_certfile": str(pki.server_cert), "ssl_keyfile": str(pki.server_key),
                    "ssl_ca_certs": str(pki.ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}  # fmt: skip
    monkeypatch.delenv("PREFIXSERVE_SSL_CERT_REQS")
    plain = Settings()
    assert uvicorn_ssl_options(plain) == {} and not plain.ssl_enabled
    assert cli.make_server(object(), plain).config.is_ssl is False  # the default stays plain HTTP


# ------------------------------------------------------------------------------------------------ in process
def _serve_in_thread(settings, app):
    """`make_server` (the server `serve` runs) with `app`, in a thread, on a socket of its own."""
    sock = cli.bind_listen_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = cli.make_server(app, settings)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started
    return server, thread, port


async def _ok_app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = scope["scheme"].encode()
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]}
    )
    await send({"type": "http.response.body", "body": body})


def test_over_tls_the_header_deadline_holds_and_the_log_says_https(pki, monkeypatch, caplog):
    """uvicorn hands the protocol TLS's transport: a connection whose request headers stop coming is still closed
    once they are late, complete requests are served (the app sees scheme https), and the start-up line gives the
    https:// URL (it said http:// whatever the settings)."""
    from server.http_protocol import HeaderDeadlineProtocol
    from server.settings import Settings

    monkeypatch.setattr(HeaderDeadlineProtocol, "header_timeout_s", 0.5)
    caplog.set_level(logging.INFO, logger="prefixserve.cli")
    settings = Settings(ssl_certfile=pki.server_cert, ssl_keyfile=pki.server_key)
    server, thread, port = _serve_in_thread(settings, _ok_app)
    try:
        assert f"listening on https://127.0.0.1:{port}" in caplog.text
        ctx = pki.trusting()
        with httpx.Client(verify=ctx) as c:
            r = c.get(f"https://127.0.0.1:{port}/")
            assert r.status_code == 200 and r.text == "https"
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        slow = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        slow.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and no more
        try:
            got = slow.recv(100)
        except (ssl.SSLError, ConnectionResetError):
            got = b""
        assert got == b""  # closed by the deadline (within the 10 s socket timeout), not answered
        slow.close()
    finally:
        server.should_exit = True
        thread.join(10)


def test_plain_http_start_up_line_says_http(caplog):
    from server.settings import Settings

    caplog.set_level(logging.INFO, logger="prefixserve.cli")
    server, thread, port = _serve_in_thread(Settings(), _ok_app)
    try:
        assert f"listening on http://127.0.0.1:{port}" in caplog.text
        assert httpx.get(f"http://127.0.0.1:{port}/").text == "http"
    finally:
        server.should_exit = True
        thread.join(10)


def _served_certificate(port: int, ctx: ssl.SSLContext) -> bytes:
    """The certificate a new connection to the server gets (DER)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with raw, ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def _der(pem: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.read_text())


def test_a_renewed_certificate_is_served_without_a_restart(pki, api_bundle, tmp_path, caplog):
    """vLLM's --enable-ssl-refresh, always on: the certificate and key files replaced while the server runs are
    served to new connections, an open connection keeps working; a certificate written before its key (they do
    not match yet) is refused and the old pair kept, then taken once the key is written; a bad file is refused
    too. Each counted in config_reloads_total{file="tls"}. The client CA file is renewed whole: a CA taken out of
    it is no longer trusted (loading into the live context only ever added CAs)."""
    from prefix_store import open_store
    from server.api import create_app
    from server.settings import Settings
    from tests.fixtures.server import metric_value
    from tests.test_api_reload import eventually, replace

    def reloads(result: str) -> float:
        text = keep.get(f"https://127.0.0.1:{port}/metrics").text
        return (
            metric_value(text, "prefixserve:config_reloads_total", {"file": "tls", "result": result}) or 0.0
        )

    cert, key, ca = (tmp_path / "tls" / f for f in ("server.pem", "server.key", "clients-ca.pem"))
    cert.parent.mkdir()
    replace(cert, pki.server_cert.read_text())
    replace(key, pki.server_key.read_text())
    replace(ca, pki.ca.read_text())
    store = open_store(f"file://{tmp_path}/store")
    settings = Settings(store_url=store.url, ssl_certfile=cert, ssl_keyfile=key, ssl_ca_certs=ca,
                        ssl_cert_reqs="required", config_reload_s=0.05, kv_cache_mb=16, max_model_len=512,
                        training_workers=0, shutdown_grace_s=5)  # fmt: skip
    caplog.set_level(logging.INFO, logger="prefixserve.reload")
    server, thread, port = _serve_in_thread(settings, create_app(settings, bundle=api_bundle, store=store))
    ctx = pki.trusting(pki.client_cert, pki.client_key)
    keep = httpx.Client(verify=ctx, timeout=30)  # one connection, open across the renewal
    try:
        assert keep.get(f"https://127.0.0.1:{port}/health").status_code == 200
        assert _served_certificate(port, ctx) == _der(pki.server_cert)
        replace(cert, pki.renewed_cert.read_text())  # the new certificate, its key not written yet
        eventually(lambda: reloads("error") == 1)
        assert "is not the key of the certificate" in caplog.text
        assert _served_certificate(port, ctx) == _der(pki.server_cert)  # the old pair, whole
        replace(key, pki.renewed_key.read_text())
        eventually(lambda: _served_certificate(port, ctx) == _der(pki.renewed_cert))
        eventually(lambda: reloads("ok") == 1)  # (counted once the switch is made: just after)
        assert keep.get(f"https://127.0.0.1:{port}/health").status_code == 200  # (the open connection)
        replace(cert, "not a certificate\n")
        eventually(lambda: reloads("error") == 2)
        assert _served_certificate(port, ctx) == _der(pki.renewed_cert)
        assert "no PEM certificate" in caplog.text
        # the clients' CA replaced by another: the first's client certificates are refused, the other's served
        replace(cert, pki.renewed_cert.read_text())
        rogue = pki.trusting(pki.rogue_cert, pki.rogue_key)
        replace(ca, (pki.ca.parent / "rogue-ca.pem").read_text())
        eventually(lambda: reloads("ok") == 2)
        assert _served_certificate(port, rogue) == _der(pki.renewed_cert)
        with httpx.Client(verify=ctx, timeout=10) as fresh, pytest.raises(httpx.TransportError):
            fresh.get(f"https://127.0.0.1:{port}/health")
        assert keep.get(f"https://127.0.0.1:{port}/health").status_code == 200
    finally:
        keep.close()
        server.should_exit = True
        thread.join(10)
        store.close()


def test_a_renewal_caught_mid_write_changes_nothing_served(pki, tmp_path, monkeypatch):
    """Files that pass the check and change before they are loaded (a renewal writing them that moment) are
    refused with nothing served changed: loading them into the live context dropped its key first and left it
    with none, every new handshake failing."""
    import server.tls as tls
    from server.settings import Settings
    from tests.test_api_reload import replace

    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    replace(cert, pki.server_cert.read_text())
    replace(key, pki.server_key.read_text())
    settings = Settings(ssl_certfile=cert, ssl_keyfile=key)
    import asyncio

    live = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    live.load_cert_chain(cert, key)
    loop = asyncio.new_event_loop()
    monkeypatch.setattr(loop, "call_soon_threadsafe", lambda f, *a: f(*a))  # (no loop runs here)
    renewable = tls.RenewableTLS(live, loop)
    assert live.sni_callback is None  # set at the first renewal only
    renewable.renew(settings)
    first = renewable.current
    assert first is not None and first is not live and live.sni_callback is not None
    checked = tls.check_tls_files

    def check_then_renewal_writes(s):
        checked(s)
        replace(cert, pki.renewed_cert.read_text())  # its key not written yet

    monkeypatch.setattr(tls, "check_tls_files", check_then_renewal_writes)
    with pytest.raises(ValueError, match="changed while they were read"):
        renewable.renew(settings)
    assert renewable.current is first  # what new connections get is as it was
    monkeypatch.setattr(tls, "check_tls_files", checked)
    replace(key, pki.renewed_key.read_text())
    renewable.renew(settings)
    assert renewable.current is not first
    loop.close()


# ------------------------------------------------------------------------------------------------ real server
GENERATE = {"tenant_id": "acme", "prefix": "base", "prompt": "Hello", "max_tokens": 4}  # (base: no prefix)


def test_a_server_process_serves_https(pki, subprocess_server, monkeypatch):
    """`serve`'s own path (run_server) with the TLS settings: HTTPS with the CA's trust, the SDK with a client of
    that trust; plain HTTP on the port, or HTTPS without the CA, gets nothing."""
    from prefixserve_client import Client

    sp = subprocess_server(
        ssl_certfile=str(pki.server_cert), ssl_keyfile=str(pki.server_key), verify=pki.trusting()
    )
    assert sp.url.startswith("https://127.0.0.1:")
    port = sp.url.rsplit(":", 1)[1]
    assert f"listening on https://127.0.0.1:{port}" in sp.log()
    with sp.client() as c:
        assert c.get("/health").status_code == 200
        r = c.post("/generate", json=GENERATE)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] >= 1
    with pytest.raises(httpx.TransportError):  # the port speaks TLS only
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=10)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):  # (default trust: not our CA)
        httpx.get(f"{sp.url}/health", timeout=10)
    with Client(base_url=sp.url, http_client=httpx.Client(verify=pki.trusting(), timeout=60)) as sdk:
        assert sdk.health().status == "ok"
        out = sdk.generate("acme", "Hello", prefix="base", max_tokens=4)
        assert out.usage.completion_tokens >= 1
    # without an http_client of its own, the SDK's httpx takes the CA from SSL_CERT_FILE (as the README says)
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
    with Client(base_url=sp.url) as sdk:
        assert sdk.health().status == "ok"
    # the container's probe follows the server's settings: HTTPS once ssl_certfile is set (plain HTTP fails)
    from server import healthcheck

    assert healthcheck.main({"PREFIXSERVE_PORT": port, "PREFIXSERVE_SSL_CERTFILE": str(pki.server_cert)}) == 0
    assert healthcheck.main({"PREFIXSERVE_PORT": port}) == 1


def test_mutual_tls_requires_a_client_certificate_the_ca_signed(pki, subprocess_server, tmp_path, capsys):
    """ssl_cert_reqs 2 (required) with ssl_ca_certs: no client certificate, or one another CA signed, fails the
    handshake (no HTTP answer at all); the CA's client certificate is served. `prefixserve train` presents one with
    curl's `--cacert` / `--cert` / `--key` (it could not before: its submit failed the handshake)."""
    with_cert = pki.trusting(pki.client_cert, pki.client_key)
    sp = subprocess_server(ssl_certfile=str(pki.server_cert), ssl_keyfile=str(pki.server_key),
                           ssl_ca_certs=str(pki.ca), ssl_cert_reqs=2, verify=with_cert)  # fmt: skip
    with sp.client() as c:
        assert c.get("/health").status_code == 200
        assert c.post("/generate", json=GENERATE).status_code == 200
    for ctx in (pki.trusting(), pki.trusting(pki.rogue_cert, pki.rogue_key)):
        with httpx.Client(verify=ctx, timeout=10) as c, pytest.raises(httpx.TransportError):
            c.get(f"{sp.url}/health")
    with httpx.Client(verify=with_cert, timeout=10) as c:  # (the server still serves after refusing those)
        assert c.get(f"{sp.url}/health").status_code == 200
    # the container's probe presents PREFIXSERVE_HEALTHCHECK_CERTFILE / _KEYFILE (without them: no answer)
    from server import healthcheck

    probe = {"PREFIXSERVE_PORT": sp.url.rsplit(":", 1)[1], "PREFIXSERVE_SSL_CERTFILE": str(pki.server_cert)}
    assert healthcheck.main(probe) == 1
    probe |= {"PREFIXSERVE_HEALTHCHECK_CERTFILE": str(pki.client_cert)}
    assert healthcheck.main({**probe, "PREFIXSERVE_HEALTHCHECK_KEYFILE": str(pki.client_key)}) == 0

    from server.cli import main

    data = tmp_path / "examples.jsonl"
    data.write_text('{"prompt": "hi", "completion": "hello"}\n')
    train = ["train", "--tenant-id", "acme", "--name", "tls", "--data", str(data), "--base-url", sp.url,
             "--no-wait", "--cacert", str(pki.ca)]  # fmt: skip
    capsys.readouterr()
    assert main([*train, "--cert", str(pki.client_cert), "--key", str(pki.client_key)]) == 0
    job = json.loads(capsys.readouterr().out)
    assert job["status"] == "queued" and job["tenant_id"] == "acme" and job["name"] == "tls"
    assert main(train) == 1  # no client certificate: the handshake fails
    assert "submit failed" in capsys.readouterr().err
    assert main([*train, "--cert", str(pki.ca)]) == 2  # a certificate without its key: said in one line
    err = capsys.readouterr().err
    assert err.startswith(f"prefixserve: --cert {pki.ca}: ") and err.count("\n") == 1, err
