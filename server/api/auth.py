"""API keys: Bearer tokens mapped to tenants, plus one operator (admin) key.

* Keys are kept and looked up as SHA-256 digests only (a dict by digest: one lookup whatever the number of keys; its
  timing depends on the digest of what was sent, which tells nothing of any key) and never logged or echoed.
* A tenant key acts only as its tenant: anything naming another tenant answers 404, exactly as if it did not exist.
* The admin key acts as every tenant and may use the admin routes (403 for tenant keys).
* With no key configured at all the server runs open (every caller is treated as admin) and warns at start-up.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from server.api.errors import APIError

bearer_scheme = HTTPBearer(auto_error=False, description="API key: a tenant key or the admin key")


@dataclass(frozen=True)
class Principal:
    """Who is calling: a tenant (tenant key), the operator (admin key) or anyone (open server)."""

    tenant_id: str | None
    admin: bool
    open: bool = False

    @property
    def label(self) -> str:
        """For logs: never the key."""
        if self.open:
            return "open"
        return "admin" if self.admin else f"tenant:{self.tenant_id}"

    def can_access(self, tenant_id: str) -> bool:
        return self.admin or self.tenant_id == tenant_id

    def resolve_tenant(self, requested: str | None) -> str:
        """The tenant a request acts as: the key's own when omitted; another tenant's → 404 (no existence leak)."""
        if requested is None:
            if self.tenant_id is not None:
                return self.tenant_id
            raise APIError(422, "tenant_id is required", param="tenant_id", code="missing_tenant_id")
        if not self.can_access(requested):
            raise APIError(404, f"tenant {requested!r} not found", code="tenant_not_found", param="tenant_id")
        return requested

    def require_admin(self) -> None:
        if not self.admin:
            raise APIError(403, "this route needs the admin key", code="admin_required")


OPEN = Principal(tenant_id=None, admin=True, open=True)


# a key shorter than this is said at start-up: failed keys are not throttled (a throttle keyed by client address
# would lock out everyone behind one proxy), so a key must be too long to guess (`openssl rand -hex 24`: 48)
MIN_KEY_CHARS = 24


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class KeyRing:
    @classmethod
    def from_settings(cls, settings: Any) -> KeyRing:
        """The keys of `settings` (`api_keys`, `api_keys_file`, `admin_key`); ValueError on a malformed entry."""
        admin = settings.admin_key.get_secret_value() if settings.admin_key else None
        return cls(settings.tenant_keys(), admin)

    def __init__(self, tenant_keys: dict[str, str], admin_key: str | None) -> None:
        self._tenant_of: dict[bytes, str] = {_digest(k): t for k, t in tenant_keys.items()}
        self._admin = _digest(admin_key) if admin_key else None
        # which keys are short (for the start-up warning; never the keys themselves)
        self.short_keys = sorted({f"tenant {t}'s" for k, t in tenant_keys.items() if len(k) < MIN_KEY_CHARS})
        if admin_key and len(admin_key) < MIN_KEY_CHARS:
            self.short_keys.insert(0, "the admin's")
        self.enabled = bool(self._tenant_of) or self._admin is not None
        self.tenants = sorted(set(self._tenant_of.values()))

    def lookup(self, key: str) -> Principal | None:
        d = _digest(key)
        if self._admin is not None and hmac.compare_digest(d, self._admin):
            return Principal(tenant_id=None, admin=True)
        tenant = self._tenant_of.get(d)
        return Principal(tenant_id=tenant, admin=False) if tenant is not None else None

    def authenticate(self, credentials: HTTPAuthorizationCredentials | None) -> Principal:
        if not self.enabled:
            return OPEN
        challenge = {"WWW-Authenticate": "Bearer"}
        if credentials is None or not credentials.credentials:
            raise APIError(
                401,
                "missing API key: send 'Authorization: Bearer <key>' (or 'x-api-key: <key>')",
                headers=challenge,
            )
        if credentials.scheme.lower() != "bearer":
            raise APIError(401, "use 'Authorization: Bearer <key>'", headers=challenge)
        principal = self.lookup(credentials.credentials)
        if principal is None:
            raise APIError(401, "invalid API key", headers=challenge)
        return principal


def with_api_key_header(
    credentials: HTTPAuthorizationCredentials | None, api_key: str | None
) -> HTTPAuthorizationCredentials | None:
    """The key of an `Authorization: Bearer` header, else of an `x-api-key` header (what Anthropic's clients
    send). A Bearer header without a key (`Bearer ` alone) is no key: the x-api-key one counts, as when the
    Authorization header is empty."""
    if (
        credentials is not None
        and credentials.scheme.lower() == "bearer"
        and not credentials.credentials.strip()
    ):
        credentials = None
    if credentials is None and api_key and api_key.strip():
        return HTTPAuthorizationCredentials(scheme="Bearer", credentials=api_key.strip())
    return credentials


async def get_principal(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer_scheme)
) -> Principal:
    """FastAPI dependency: the caller (401 if keys are configured and none or a wrong one is sent)."""
    credentials = with_api_key_header(credentials, request.headers.get("x-api-key"))
    principal = request.app.state.ps.keyring.authenticate(credentials)
    info = request.scope.get("prefixserve")
    if info is not None:
        info.principal = principal.label
    return principal
