"""Validation of tenant ids and prefix names.

Allowed: 1..128 characters from ``[A-Za-z0-9._-]``, except ``.`` and ``..``. That makes every valid name a safe
single path component (no ``/``, no traversal) and a safe Redis key component (no ``:``). Backends rely on it:
their own bookkeeping files and keys use characters outside this set (``@``, ``:``), so they can never collide with
a tenant or prefix.
"""

from __future__ import annotations

import re

from prefix_store.errors import InvalidName

NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")
MAX_NAME_LENGTH = 128
# the prefix name that means "no prefix" (the base model alone) to the server: never a stored prefix's
RESERVED_PREFIX_NAME = "base"
# a tenant id that cannot store prefixes: the server's /prefixes/jobs/... are the training job routes
JOBS_TENANT = "jobs"


def reserved(tenant_id: str, name: str) -> tuple[str, str] | None:
    """(the field, why) when a prefix the server serves may not be stored under this tenant id or name, else None
    (the API and the offline CLI alike; here so that the CLI's store commands need not load the HTTP app)."""
    if name == RESERVED_PREFIX_NAME:
        return "name", f"prefix name {RESERVED_PREFIX_NAME!r} is reserved for the base model"
    if tenant_id == JOBS_TENANT:
        return (
            "tenant_id",
            f"tenant id {JOBS_TENANT!r} cannot store prefixes: /prefixes/{JOBS_TENANT}/... are the "
            "training job routes",
        )
    return None


def is_valid_name(value: object) -> bool:
    return isinstance(value, str) and value not in (".", "..") and NAME_PATTERN.fullmatch(value) is not None


def validate_name(value: object, what: str = "name") -> str:
    """Return ``value`` unchanged if it is a valid tenant id / prefix name, else raise :class:`InvalidName`.

    ``what`` names the argument in the error message (``"tenant_id"``, ``"name"``).
    """
    if is_valid_name(value):
        return value  # type: ignore[return-value]
    if not isinstance(value, str):
        raise InvalidName(f"{what} must be a string, got {type(value).__name__}")
    shown = value if len(value) <= 40 else value[:37] + "..."
    if not value:
        reason = "it is empty"
    elif len(value) > MAX_NAME_LENGTH:
        reason = f"it is {len(value)} characters long (max {MAX_NAME_LENGTH})"
    elif value in (".", ".."):
        reason = "'.' and '..' are reserved"
    else:
        reason = "only letters, digits, '.', '_' and '-' are allowed"
    raise InvalidName(f"invalid {what} {shown!r}: {reason}")
