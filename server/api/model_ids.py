"""OpenAI model ids: what `model` (and TGI's `adapter_id`, vLLM's /tokenize `model`) names."""

from __future__ import annotations

from fastapi import Request

from prefix_store.names import is_valid_name
from server.api.auth import Principal
from server.api.errors import APIError
from server.api.schemas import BASE_PREFIX, DEFAULT_PREFIX
from server.api.service import Service


def model_not_found(model: str) -> APIError:
    """OpenAI's answer to a model that does not exist, or is another tenant's (no existence leak)."""
    return APIError(404, f"model {model!r} not found", code="model_not_found", param="model")


def parse_model(
    model: str, principal: Principal, served: tuple[str, ...] = ()
) -> tuple[str, str, int | None]:
    """`tenant[/prefix][@version]` → (tenant, prefix name, pinned version or None for the latest). `served`: names of
    the base model (`/info`'s): from a tenant key, such a name is the key's tenant on the base model (`tenant/base`),
    what vLLM's clients send as `model`; without a tenant key it names no tenant (404 saying so)."""
    if model in served:
        if principal.tenant_id is not None and not principal.admin:
            return principal.tenant_id, BASE_PREFIX, None
        raise APIError(
            404,
            f"model {model!r} is the base model, which a request without a tenant API key names as "
            f"'tenant/{BASE_PREFIX}'",
            code="model_not_found",
            param="model",
        )
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
        raise model_not_found(model)
    return tenant, name, pinned


# what TGI's clients send as `model` (TGI ignores it): "tgi", and huggingface_hub's InferenceClient given a base URL
# sends "dummy"
TGI_PLACEHOLDER_MODELS = ("tgi", "dummy")


def served_names(request: Request, svc: Service) -> tuple[str, ...]:
    """The `model` values that name the base model: its name, and under /tgi TGI's clients' placeholders."""
    if request.url.path.startswith("/tgi/"):
        return (svc.bundle.name, *TGI_PLACEHOLDER_MODELS)
    return (svc.bundle.name,)
