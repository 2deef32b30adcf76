"""The container's liveness probe (`python -m server.healthcheck`, the image's and compose file's healthcheck): GET
/health on the loopback at PREFIXSERVE_PORT, exit 0 only on a 200. HTTPS (and mutual TLS) against a real server
process: tests/test_tls.py."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from server import healthcheck
from tests.fixtures.server import free_port

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def health_server() -> Iterator[tuple[int, list[int]]]:
    """A stand-in server on the loopback: GET /health answers the status at the head of the returned list."""
    status = [200]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            code = status[0] if self.path == "/health" else 404
            self.send_response(code)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *a: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1], status
    srv.shutdown()
    srv.server_close()


def test_the_probe_follows_the_port_and_says_why_it_fails(health_server, capsys):
    port, status = health_server
    assert healthcheck.main({"PREFIXSERVE_PORT": str(port)}) == 0
    status[0] = 503
    assert healthcheck.main({"PREFIXSERVE_PORT": str(port)}) == 1
    assert capsys.readouterr().err.startswith(f"healthcheck: http://127.0.0.1:{port}/health: HTTP Error 503")
    closed = free_port()
    assert healthcheck.main({"PREFIXSERVE_PORT": str(closed)}) == 1
    assert "Connection refused" in capsys.readouterr().err
    # the TLS settings make it speak HTTPS: a plain HTTP server does not answer that
    assert healthcheck.main({"PREFIXSERVE_PORT": str(port), "PREFIXSERVE_SSL_CERTFILE": "/x/server.pem"}) == 1
    assert f"https://127.0.0.1:{port}/health" in capsys.readouterr().err


def test_the_module_runs_as_the_images_healthcheck_runs_it(health_server):
    """`python -m server.healthcheck` with the server's environment (the default port when none is set is 8000)."""
    port, _ = health_server
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFIXSERVE_")}
    env["PYTHONPATH"] = str(REPO)
    run = [sys.executable, "-m", "server.healthcheck"]
    assert subprocess.run(run, env={**env, "PREFIXSERVE_PORT": str(port)}, timeout=60).returncode == 0
    assert healthcheck.probe_url(env) == "http://127.0.0.1:8000/health"


def test_the_probe_asks_the_address_the_server_listens_on():
    """PREFIXSERVE_HOST: the loopback when the server listens on every address (the image's 0.0.0.0), else that
    address (an IPv6 one in brackets). A server on ::1 only answers there, not at 127.0.0.1."""
    url = healthcheck.probe_url
    for host in ("", "0.0.0.0", "::", "[::]"):
        assert url({"PREFIXSERVE_HOST": host, "PREFIXSERVE_PORT": "9"}) == "http://127.0.0.1:9/health", host
    assert url({"PREFIXSERVE_HOST": "10.1.2.3"}) == "http://10.1.2.3:8000/health"
    assert (
        url({"PREFIXSERVE_HOST": "::1", "PREFIXSERVE_SSL_CERTFILE": "c.pem"}) == "https://[::1]:8000/health"
    )
    assert url({"PREFIXSERVE_HOST": "[fe80::1]"}) == "http://[fe80::1]:8000/health"
    # names in any case, as the server reads them (pydantic-settings: case-insensitive); an empty value is unset
    mixed = {"prefixserve_port": "18432", "Prefixserve_Ssl_Certfile": "c.pem", "PREFIXSERVE_HOST": ""}
    assert url(mixed) == "https://127.0.0.1:18432/health"


def test_the_probe_reaches_a_server_on_the_ipv6_loopback():
    class V6(http.server.ThreadingHTTPServer):
        address_family = socket.AF_INET6

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a: object) -> None:
            pass

    try:
        srv = V6(("::1", 0), Handler)
    except OSError as e:
        pytest.skip(f"no IPv6 loopback here: {e}")
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        port = str(srv.server_address[1])
        assert healthcheck.main({"PREFIXSERVE_HOST": "::1", "PREFIXSERVE_PORT": port}) == 0
        assert healthcheck.main({"PREFIXSERVE_PORT": port}) == 1  # (nothing at 127.0.0.1)
    finally:
        srv.shutdown()
        srv.server_close()
