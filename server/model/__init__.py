"""The frozen base model: loading, fingerprint, prompt rendering."""

from server.model.loader import (
    bundle_from_model,
    compute_fingerprint,
    default_cache_dir,
    default_prompt_format,
    embedded_gguf_dir,
    ensure_embedded_converted,
    load_model,
    render_messages,
    render_prompt,
    resolve_device,
    resolve_dtype,
)
from server.model.spec import ModelBundle, ModelSpec, spec_from_config

__all__ = [
    "ModelBundle",
    "ModelSpec",
    "bundle_from_model",
    "compute_fingerprint",
    "default_cache_dir",
    "default_prompt_format",
    "embedded_gguf_dir",
    "ensure_embedded_converted",
    "load_model",
    "render_messages",
    "render_prompt",
    "resolve_device",
    "resolve_dtype",
    "spec_from_config",
]
