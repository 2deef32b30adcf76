"""PREFIXSERVE_* environment variables, read whatever the case of their names. Importable without the API stack
(pydantic): the model loader uses it, and the GPU image runs the engine without the web packages."""

from __future__ import annotations

import os
from collections.abc import Mapping

ENV_PREFIX = "PREFIXSERVE_"


def env_get(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The PREFIXSERVE_* variable `name` whatever the case of its name, as the settings read theirs
    (`prefixserve_device` is `PREFIXSERVE_DEVICE`): every PREFIXSERVE_* variable is read through this. If several
    spellings are set, the last in the environment wins, and an empty one is unset, as pydantic-settings decides for
    the server's settings (`env_ignore_empty`): a command and the server must not read different values from one
    environment."""
    upper = name.upper()
    found = [
        v for k, v in (os.environ if environ is None else environ).items() if k.upper() == upper and v != ""
    ]
    return found[-1] if found else None
