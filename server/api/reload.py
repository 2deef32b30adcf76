"""Reload the API keys file, the tenant limits file and the TLS certificate files while the server runs (no
restart, nothing in flight disturbed): onboard a tenant, rotate or revoke a key, change a tenant's limits, renew
the server certificate (vLLM's ``--enable-ssl-refresh``, here always on for an HTTPS server).

Each file is polled every ``config_reload_s``; a change (modification time, size or inode: an atomic replace, as a
Kubernetes ConfigMap or ``mv`` does, counts) is applied once the file has stayed the same for one more interval, so
a file caught half-written is not taken. A file that does not parse, or a keys file that would leave the server
without any key (open to everyone) when it started with keys, or a certificate that is not its key's, is refused:
the error is logged, counted in ``prefixserve:config_reloads_total{result="error"}``, and the previous
configuration stays in force. The certificate, its key and the client CA file are one group (``tls``): a renewal
that writes the certificate and the key one after the other is refused while they do not match, then taken once
both are written.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.api.auth import MIN_KEY_CHARS, KeyRing
from server.api.limits import load_limits_file
from server.api.service import default_limit

log = logging.getLogger("prefixserve.reload")

FileSignature = tuple[int, int, int] | None
Signature = tuple[FileSignature, ...] | None  # a group of files' (None: not polled yet)


def file_signature(path: Path) -> FileSignature:
    """What changes when the file does (None: missing or unreadable)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def signature(paths: tuple[Path, ...]) -> Signature:
    return tuple(file_signature(p) for p in paths)


def config_files(settings: Any) -> dict[str, tuple[Path, ...]]:
    """The reloadable files of `settings`, grouped by their metric label."""
    out: dict[str, tuple[Path, ...]] = {}
    if settings.api_keys_file is not None:
        out["api_keys"] = (Path(settings.api_keys_file).expanduser(),)
    if settings.tenant_limits_file is not None:
        out["tenant_limits"] = (Path(settings.tenant_limits_file).expanduser(),)
    if settings.ssl_enabled:
        tls = (settings.ssl_certfile, settings.ssl_keyfile, settings.ssl_ca_certs)
        out["tls"] = tuple(Path(p).expanduser() for p in tls if p is not None)
    return out


def loaded_signatures(settings: Any) -> dict[str, Signature]:
    """The files' signatures as start-up is about to read them: a change made after this (during the model load,
    say) is then applied by the reloader's first polls instead of being taken for what was loaded."""
    return {name: signature(paths) for name, paths in config_files(settings).items()}


@dataclass
class Watched:
    name: str  # metric label
    paths: tuple[Path, ...]
    apply: Callable[[], str]  # reloads; returns a summary for the log line, raises ValueError/OSError if bad
    applied: Signature = None
    seen: Signature = None


@dataclass
class ConfigReloader:
    state: Any  # AppState: its keyring is replaced, its limiter reconfigured
    interval_s: float
    files: list[Watched] = field(default_factory=list)

    def __post_init__(self) -> None:
        appliers = {"api_keys": self._keys, "tenant_limits": self._limits, "tls": self._tls}
        for name, paths in config_files(self.state.settings).items():
            if name == "tenant_limits" and self.state.limiter is None:
                continue
            if name == "tls" and getattr(self.state, "tls", None) is None:
                continue  # (an app served without uvicorn's TLS: run-batch, a test client)
            self.files.append(Watched(name, paths, appliers[name]))
        loaded = getattr(self.state, "config_loaded", {})
        for w in self.files:  # what was loaded at start-up
            w.applied = w.seen = loaded[w.name] if w.name in loaded else signature(w.paths)

    def _keys(self) -> str:
        ring = KeyRing.from_settings(self.state.settings)
        if self.state.keyring.enabled and not ring.enabled:
            raise ValueError("it holds no key: the server would be open to everyone")
        if self.state.keyring.tenants and not ring.tenants:
            # an emptied file (a bad ConfigMap render, `: > keys`) is a mistake far more often than a wish to lock
            # every tenant out: kept as the missing file is (a restart applies it on purpose)
            raise ValueError(
                "it holds no tenant key: every tenant would be locked out (restart to apply that)"
            )
        self.state.keyring = ring
        short = f" (keys shorter than {MIN_KEY_CHARS} characters: {', '.join(ring.short_keys)})" * bool(
            ring.short_keys
        )
        return f"{len(ring.tenants)} tenants{short}"

    def _limits(self) -> str:
        s = self.state.settings
        overrides = load_limits_file(s.tenant_limits_file)
        self.state.limiter.reconfigure(default_limit(s), overrides)
        return f"{len(overrides)} entries"

    def _tls(self) -> str:
        """New connections get the files as they are now (`RenewableTLS`); open ones keep theirs."""
        self.state.tls.renew(self.state.settings)
        return "new connections get the new certificate"

    def check(self) -> None:
        """One poll: apply every group of files that changed and then stayed the same since the previous poll."""
        for w in self.files:
            sig = signature(w.paths)
            stable, w.seen = sig == w.seen, sig
            if not stable or sig == w.applied:
                continue
            w.applied = sig  # tried once per version of the files, whatever the outcome
            assert sig is not None
            if None in sig:
                gone = ", ".join(str(p) for p, f in zip(w.paths, sig, strict=True) if f is None)
                self._refused(w, f"{gone}: the file is gone")
                continue
            try:
                summary = w.apply()
            except (ValueError, OSError) as e:
                self._refused(w, str(e))
                continue
            log.info("reloaded %s (%s): %s", _names(w), w.name, summary)
            self.state.metrics.config_reloads.labels(w.name, "ok").inc()

    def _refused(self, w: Watched, why: str) -> None:
        log.error(
            "not reloading %s (%s): %s; the previous configuration stays in force", _names(w), w.name, why
        )
        self.state.metrics.config_reloads.labels(w.name, "error").inc()

    async def run(self) -> None:
        if not self.files or self.interval_s <= 0:
            return
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await asyncio.to_thread(self.check)
            except Exception:  # never let one poll end the watcher
                log.exception("config reload check failed")


def _names(w: Watched) -> str:
    return ", ".join(str(p) for p in w.paths)
