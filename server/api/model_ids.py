"""OpenAI model ids: what `model` (and TGI's `adapter_id`, vLLM's /tokenize `model`) names."""

from __future__ import annotations

from fastapi import Request

from prefix_store.names import is_valid_name
from server.api.auth import Principal
from server.api.errors import APIError
from server.api.prefix_meta import ResolvedPrefix
from server.api.schemas import BASE_PREFIX, DEFAULT_PREFIX
from server.api.service import Service


def model_not_found(model: str, served: tuple[str, ...] = ()) -> APIError:
    """OpenAI's answer to a model that does not exist, or is another tenant's (no existence leak); for a name of
    the base model (`served`), what to send instead."""
    message = f"model {model!r} not found"
    if model in served:
        message += (
            f": it names the base model only from a tenant API key (its tenant's); otherwise send "
            f"'tenant/{BASE_PREFIX}'"
        )
    return APIError(404, message, code="model_not_found", param="model")


def hinted(principal: Principal, model: str, served: tuple[str, ...]) -> tuple[str, ...]:
    """The served names a 404 for `model` may hint at: none when `model` is the caller's own tenant id (there it
    names its default prefix, not the base model)."""
    return () if principal.tenant_id == model else served


def parse_model(
    model: str, principal: Principal, served: tuple[str, ...] = ()
) -> tuple[str, str, int | None]:
    """`tenant[/prefix][@version]` → (tenant, prefix name, pinned version or None for the latest). `served`: names of
    the base model (`served_model_name`): from a tenant key, such a name is the key's tenant on the base model
    (`tenant/base`), what vLLM's clients send as `model`, unless the tenant itself has that name (then, as any
    other id, its default prefix). Without a tenant key (admin, open server) it is an id like any other."""
    tenant_key = principal.tenant_id is not None and not principal.admin
    if model in served and tenant_key and principal.tenant_id != model:
        return principal.tenant_id, BASE_PREFIX, None  # type: ignore[return-value]
    tenant, sep, name = model.partition("/")
    if not sep:  # "tenant" or "tenant@3": its default prefix
        tenant, at, version = model.partition("@")
        name = DEFAULT_PREFIX + at + version
    name, at, version = name.partition("@")
    digits = at and version.isascii() and version.isdigit() and len(version) <= 18
    pinned = int(version) if digits and int(version) > 0 else None
    if (
        not is_valid_name(tenant)
        or not is_valid_name(name)
        or (at and (pinned is None or name == BASE_PREFIX))
        or not principal.can_access(tenant)
    ):
        raise model_not_found(model, hinted(principal, model, served))
    return tenant, name, pinned


async def resolve_model(request: Request, svc: Service, principal: Principal, model: str) -> ResolvedPrefix:
    """The prefix (or base model) a `model` id names, as the /v1 routes resolve it: 404 `model_not_found` (with the
    base-model hint for a served name) for one that does not exist or is another tenant's."""
    served = served_names(request, svc)
    tenant, name, version = parse_model(model, principal, served)
    try:
        return await svc.resolve(tenant, name, version, param="model")
    except APIError as e:
        if e.status == 404:
            raise model_not_found(model, hinted(principal, model, served)) from None
        raise


# what TGI's clients send as `model` (TGI ignores it): "tgi", and huggingface_hub's InferenceClient given a base URL
# sends "dummy"
TGI_PLACEHOLDER_MODELS = ("tgi", "dummy")


def served_names(request: Request, svc: Service) -> tuple[str, ...]:
    """The `model` values that name the base model: `served_model_name` (default: its name), and under /tgi TGI's
    clients' placeholders."""
    if request.url.path.startswith("/tgi/"):
        return (*svc.served_names, *TGI_PLACEHOLDER_MODELS)
    return svc.served_names
