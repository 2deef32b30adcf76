"""HTTPS serving (`ssl_certfile`, `ssl_keyfile`, `ssl_ca_certs`, `ssl_cert_reqs`, as vLLM's `--ssl-*` flags).

uvicorn terminates TLS itself (the settings go to `uvicorn.Config`); this module reads the files first, at
start-up, so that a missing file, a key that is not the certificate's or an encrypted key is a one-line error
naming the setting, not a traceback from uvicorn once the model has loaded (nor, for an encrypted key, OpenSSL
prompting on the terminal for a passphrase).
"""

from __future__ import annotations

import asyncio
import ssl
import sys
from pathlib import Path
from typing import Any

from server.settings import setting_name

CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


class _Encrypted(Exception):
    pass


def _ask_password() -> bytes:
    # called by OpenSSL only for an encrypted key (uvicorn would let OpenSSL prompt on the terminal for it)
    raise _Encrypted


def _readable(field: str, path: Path) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise ValueError(f"{setting_name(field)}: cannot read {path}: {e.strerror or e}") from None


def check_tls_files(settings: Any) -> None:
    """Load the TLS files as uvicorn will (ValueError naming the setting and the file if one cannot be used);
    nothing to do for a plain-HTTP server."""
    if not settings.ssl_enabled:
        return
    cert, key, ca = settings.ssl_certfile, settings.ssl_keyfile, settings.ssl_ca_certs
    for field, path in (("ssl_certfile", cert), ("ssl_keyfile", key), ("ssl_ca_certs", ca)):
        if path is not None:
            _readable(field, path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_verify_locations(cafile=cert)  # (parses the certificates only: the key's errors come below)
    except ssl.SSLError:
        raise ValueError(f"{setting_name('ssl_certfile')}: {cert} holds no PEM certificate") from None
    key_field, key_path = ("ssl_keyfile", key) if key is not None else ("ssl_certfile", cert)
    try:
        ctx.load_cert_chain(cert, key, password=_ask_password)
    except _Encrypted:
        raise ValueError(
            f"{setting_name(key_field)}: the private key in {key_path} is encrypted, which is not supported: "
            "decrypt it (`openssl pkey -in KEY -out KEY.plain`) and keep that file readable by the server only"
        ) from None
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            why = f"the private key in {key_path} is not the key of the certificate in {cert}"
        elif key is None:
            why = f"{cert} holds no private key: set {setting_name('ssl_keyfile')} to the certificate's key file"
        else:
            why = f"{key_path} holds no PEM private key" + (f" ({e.reason})" if e.reason else "")
        raise ValueError(f"{setting_name(key_field)}: {why}") from None
    if ca is not None:
        try:
            ctx.load_verify_locations(cafile=ca)
        except ssl.SSLError:
            raise ValueError(f"{setting_name('ssl_ca_certs')}: {ca} holds no PEM CA certificate") from None


def uvicorn_ssl_options(settings: Any) -> dict[str, Any]:
    """The `uvicorn.Config` keyword arguments of the TLS settings (none for plain HTTP)."""
    if not settings.ssl_enabled:
        return {}
    return {
        "ssl_certfile": str(settings.ssl_certfile),
        "ssl_keyfile": None if settings.ssl_keyfile is None else str(settings.ssl_keyfile),
        "ssl_ca_certs": None if settings.ssl_ca_certs is None else str(settings.ssl_ca_certs),
        "ssl_cert_reqs": CERT_REQS[settings.ssl_cert_reqs],
    }


def _fresh_context(settings: Any, verify_mode: ssl.VerifyMode) -> ssl.SSLContext:
    """A server context holding only the TLS files as they are now (ValueError if they changed while read)."""
    cert, key, ca = settings.ssl_certfile, settings.ssl_keyfile, settings.ssl_ca_certs
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cert, key, password=_ask_password)
        if ca is not None:
            ctx.load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError, _Encrypted) as e:
        # (they passed check_tls_files a moment ago: a renewal is writing them)
        raise ValueError(f"the files changed while they were read ({e or type(e).__name__})") from None
    ctx.verify_mode = verify_mode
    return ctx


class RenewableTLS:
    """uvicorn's server context, whose certificate, key and client CA files may be renewed while it serves
    (`renew`, by the config reloader): each renewal is a context of its own, built from the files once they pass
    `check_tls_files`, which new connections switch to as their handshake begins (the live context's SNI
    callback, which OpenSSL runs for every handshake, with or without SNI). No certificate, key or CA store of a
    context in use is ever changed: a renewal that fails leaves what is served as it was (loading a certificate into the live context
    dropped its key first, and a mismatched key then left it with none), the new context holds only the new files
    (loading into the live one kept a certificate of another key type, and every CA it had trusted), and no
    thread touches a context another uses: the callback is set on the event loop's thread (the one that makes
    connections), at the first renewal (with a callback set, CPython fails a handshake whose SNI is not ASCII,
    which RFC 6066 forbids, and reports each as an unraisable exception: those reports are dropped). Open
    connections keep theirs; a session resumed from before a renewal keeps the verification it had (OpenSSL's
    session cache belongs to the live context)."""

    def __init__(self, live: ssl.SSLContext, loop: asyncio.AbstractEventLoop) -> None:
        self.live, self.loop = live, loop
        self.current: ssl.SSLContext | None = None  # None: the live context's own files
        self._installed = False

    def _pick(self, conn: Any, server_name: str | None, ctx: ssl.SSLContext) -> None:
        current = self.current
        if current is not None:
            conn.context = current

    def _install(self) -> None:
        if not self._installed:
            self._installed = True
            _quiet_non_ascii_sni()
            self.live.sni_callback = self._pick

    def renew(self, settings: Any) -> None:
        """Serve the files as they are now to new connections (ValueError naming the setting if one cannot be
        used, nothing changed then). From any thread."""
        check_tls_files(settings)  # (the one-line reasons)
        self.current = _fresh_context(settings, self.live.verify_mode)
        if not self._installed:
            self.loop.call_soon_threadsafe(self._install)


def _quiet_non_ascii_sni() -> None:
    """Drop CPython's unraisable-exception report of a handshake whose SNI is not ASCII (the handshake fails):
    any peer could fill the log with them."""
    previous = sys.unraisablehook

    def hook(u: Any) -> None:
        if u.exc_type is UnicodeDecodeError and isinstance(u.object, bytes) and u.err_msg is None:
            return
        previous(u)

    sys.unraisablehook = hook
