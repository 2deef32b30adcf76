"""`python -m server.healthcheck`: the container's liveness probe (the image's HEALTHCHECK, the compose file's).

GET /health at the server's address (PREFIXSERVE_HOST; the loopback when it listens on every address, as the image's
0.0.0.0) and port (PREFIXSERVE_PORT, default 8000): exit 0 on a 200, else 1 with one line on stderr. It reads the server's own settings from the environment, so it follows them: HTTPS when
PREFIXSERVE_SSL_CERTFILE is set (the certificate is not verified: the probe checks that the local process answers,
not who it is, and the certificate need not name 127.0.0.1); under PREFIXSERVE_SSL_CERT_REQS required, a client
certificate is needed, PREFIXSERVE_HEALTHCHECK_CERTFILE (and _KEYFILE, unless the certificate file holds the key),
signed by the server's PREFIXSERVE_SSL_CA_CERTS. Standard library only (it runs every few seconds: no torch).
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.error
import urllib.request

from server.env import env_get

TIMEOUT_S = 4.0


def probe_url(environ: dict[str, str] | os._Environ[str]) -> str:
    """The server's /health: at PREFIXSERVE_HOST (the loopback when it listens on every address), its port."""
    port = env_get("PREFIXSERVE_PORT", environ) or "8000"
    scheme = "https" if env_get("PREFIXSERVE_SSL_CERTFILE", environ) else "http"
    host = (env_get("PREFIXSERVE_HOST", environ) or "").strip()
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):  # an IPv6 address
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}/health"


def tls_context(environ: dict[str, str] | os._Environ[str]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    cert = env_get("PREFIXSERVE_HEALTHCHECK_CERTFILE", environ)
    if cert:
        ctx.load_cert_chain(cert, env_get("PREFIXSERVE_HEALTHCHECK_KEYFILE", environ) or None)
    return ctx


def main(environ: dict[str, str] | os._Environ[str] = os.environ) -> int:
    url = probe_url(environ)
    try:
        ctx = tls_context(environ) if url.startswith("https:") else None
        with urllib.request.urlopen(url, timeout=TIMEOUT_S, context=ctx) as r:
            if r.status == 200:
                return 0
            print(f"healthcheck: {url} answered {r.status}", file=sys.stderr)
    except (OSError, ssl.SSLError, ValueError) as e:  # (urllib's errors are OSErrors)
        print(f"healthcheck: {url}: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
