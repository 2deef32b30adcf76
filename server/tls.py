"""HTTPS serving (`ssl_certfile`, `ssl_keyfile`, `ssl_ca_certs`, `ssl_cert_reqs`, as vLLM's `--ssl-*` flags).

uvicorn terminates TLS itself (the settings go to `uvicorn.Config`); this module reads the files first, at
start-up, so that a missing file, a key that is not the certificate's or an encrypted key is a one-line error
naming the setting, not a traceback from uvicorn once the model has loaded (nor, for an encrypted key, OpenSSL
prompting on the terminal for a passphrase).
"""

from __future__ import annotations

import ssl
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
