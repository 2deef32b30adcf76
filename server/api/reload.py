"""Reload the API keys file and the tenant limits file while the server runs (no restart, nothing in flight
disturbed): onboard a tenant, rotate or revoke a key, change a tenant's limits.

Each file is polled every ``config_reload_s``; a change (modification time, size or inode: an atomic replace, as a
Kubernetes ConfigMap or ``mv`` does, counts) is applied once the file has stayed the same for one more interval, so
a file caught half-written is not taken. A file that does not parse, or a keys file that would leave the server
without any key (open to everyone) when it started with keys, is refused: the error is logged, counted in
``prefixserve:config_reloads_total{result="error"}``, and the previous configuration stays in force.
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

Signature = tuple[int, int, int] | None


def signature(path: Path) -> Signature:
    """What changes when the file does (None: missing or unreadable)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def config_files(settings: Any) -> dict[str, Path]:
    """The reloadable files of `settings`, by their metric label."""
    out: dict[str, Path] = {}
    if settings.api_keys_file is not None:
        out["api_keys"] = Path(settings.api_keys_file).expanduser()
    if settings.tenant_limits_file is not None:
        out["tenant_limits"] = Path(settings.tenant_limits_file).expanduser()
    return out


def loaded_signatures(settings: Any) -> dict[str, Signature]:
    """The files' signatures as start-up is about to read them: a change made after this (during the model load,
    say) is then applied by the reloader's first polls instead of being taken for what was loaded."""
    return {name: signature(path) for name, path in config_files(settings).items()}


@dataclass
class Watched:
    name: str  # metric label
    path: Path
    apply: Callable[[], str]  # reloads; returns a summary for the log line, raises ValueError/OSError if bad
    applied: Signature = None
    seen: Signature = None


@dataclass
class ConfigReloader:
    state: Any  # AppState: its keyring is replaced, its limiter reconfigured
    interval_s: float
    files: list[Watched] = field(default_factory=list)

    def __post_init__(self) -> None:
        appliers = {"api_keys": self._keys, "tenant_limits": self._limits}
        for name, path in config_files(self.state.settings).items():
            if name != "tenant_limits" or self.state.limiter is not None:
                self.files.append(Watched(name, path, appliers[name]))
        loaded = getattr(self.state, "config_loaded", {})
        for w in self.files:  # what was loaded at start-up
            w.applied = w.seen = loaded[w.name] if w.name in loaded else signature(w.path)

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

    def check(self) -> None:
        """One poll: apply every file that changed and then stayed the same since the previous poll."""
        for w in self.files:
            sig = signature(w.path)
            stable, w.seen = sig == w.seen, sig
            if not stable or sig == w.applied:
                continue
            w.applied = sig  # tried once per version of the file, whatever the outcome
            if sig is None:
                self._refused(w, "the file is gone")
                continue
            try:
                summary = w.apply()
            except (ValueError, OSError) as e:
                self._refused(w, str(e))
                continue
            log.info("reloaded %s (%s): %s", w.path, w.name, summary)
            self.state.metrics.config_reloads.labels(w.name, "ok").inc()

    def _refused(self, w: Watched, why: str) -> None:
        log.error("not reloading %s (%s): %s; the previous configuration stays in force", w.path, w.name, why)
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
