"""Prefixes brought from elsewhere: a PrefixServe export or a PEFT adapter, checked against this base model.

The HTTP upload route turns the bytes it is given into an :class:`IncomingPrefix` here and stores it with one
`store.put` (a new version, atomic like any other): either the prefix fits this server's base model and is stored
whole, or nothing is written. `prefixserve prefixes import` stores a verified export checked as far as no model is
needed (`portable`), with no model loaded.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prefix_store import PrefixMeta, PrefixRecord, PrefixStore
from prefix_store.errors import InvalidPrefix
from prefix_store.export import is_export, read_export
from prefix_store.format import IDEMPOTENCY, check_fingerprint, label, load_safetensors
from server.model.spec import ModelBundle
from server.prefixes.kinds import check_trained_names_and_shapes, check_trained_tensors, validate_kv
from server.prefixes.peft_import import (
    PeftAdapter,
    check_peft_config,
    check_prefix_length,
    parse_adapter_config,
    peft_adapter,
    read_peft_adapter,
)

PROMPT_FORMATS = ("chat", "raw")


class InvalidAdapterConfig(InvalidPrefix):
    """The PEFT adapter_config.json itself is refused (not JSON, unsupported type, another model's depth)."""


@dataclass(frozen=True)
class IncomingPrefix:
    """What `store.put` needs besides tenant and name."""

    kind: str
    tensors: dict[str, torch.Tensor]
    prefix_length: int
    base_model_fingerprint: str
    training: dict[str, Any] | None
    extra: dict[str, Any]

    def put(self, store: PrefixStore, tenant_id: str, name: str) -> PrefixMeta:
        return store.put(
            tenant_id,
            name,
            self.kind,
            self.tensors,
            base_model_fingerprint=self.base_model_fingerprint,
            prefix_length=self.prefix_length,
            training=self.training,
            extra=self.extra,
        )

    def put_once(
        self, store: PrefixStore, tenant_id: str, name: str, idempotency_key: str, digest: str
    ) -> tuple[PrefixMeta, bool]:
        """`put` at most once per Idempotency-Key of the name (`PrefixStore.put_once`)."""
        return store.put_once(
            tenant_id,
            name,
            self.kind,
            self.tensors,
            idempotency_key=idempotency_key,
            digest=digest,
            base_model_fingerprint=self.base_model_fingerprint,
            prefix_length=self.prefix_length,
            training=self.training,
            extra=self.extra,
        )


def exported(rec: PrefixRecord, prompt_format: str | None = None) -> IncomingPrefix:
    """A verified export (:func:`prefix_store.export.read_export`) as it was, plus where it came from; its base
    model stays the one it was made for (servers of another base model refuse to serve it)."""
    meta = rec.meta
    extra = {k: v for k, v in meta.extra.items() if k != IDEMPOTENCY}  # the key of its upload there, not here
    extra["imported_from"] = {"prefix": label(meta.tenant_id, meta.name, meta.version), "sha256": meta.sha256}
    if prompt_format is not None:
        extra["prompt_format"] = prompt_format
    return IncomingPrefix(
        meta.kind, rec.tensors, meta.prefix_length, meta.base_model_fingerprint, meta.training, extra
    )


# the most JSON an uploaded export's `training` summary or `extra` metadata may hold (each listing repeats it)
MAX_UPLOAD_META_BYTES = 65536


def from_export(
    data: bytes, bundle: ModelBundle, prompt_format: str | None = None, max_prefix_length: int | None = None
) -> IncomingPrefix:
    """A PrefixServe export (`GET /prefixes/{t}/{n}/download`) made on this base model, as an upload stores it:
    its tensors the kind's own (`check_trained_tensors`), its metadata of a bounded size with a prompt format this
    server knows, and not the training job id its summary names (a job of this server would take it for its own).

    Raises InvalidPrefix, PrefixTooLong, ChecksumMismatch (changed bytes) or FingerprintMismatch (another base
    model)."""
    rec = read_export(data)
    check_fingerprint(rec.meta, bundle.fingerprint)
    check_prefix_length(rec.meta.prefix_length, max_prefix_length, bundle.spec)
    validate_kv(rec.kv, bundle.spec, rec.meta.prefix_length)
    check_trained_tensors(rec.meta.kind, rec.tensors, bundle.spec)
    return portable(rec, prompt_format)


def portable(rec: PrefixRecord, prompt_format: str | None = None) -> IncomingPrefix:
    """A verified export as an upload stores it, checked as far as no base model is needed (what `prefixserve
    prefixes import` stores; `from_export` checks the fit to the model first): the kind's own trained tensors
    (`check_trained_names_and_shapes`), metadata of a bounded size with a known prompt format, and the training job
    id renamed. Raises InvalidPrefix."""
    check_trained_names_and_shapes(rec.meta.kind, rec.tensors)
    incoming = exported(rec, prompt_format)
    fmt = incoming.extra.get("prompt_format")
    if fmt is not None and fmt not in PROMPT_FORMATS:
        raise InvalidPrefix(f"the export's prompt_format {fmt!r} is not one of {', '.join(PROMPT_FORMATS)}")
    training = incoming.training
    if isinstance(training, dict) and "job_id" in training:
        training = {k: v for k, v in training.items() if k != "job_id"}
        training["exported_job_id"] = rec.meta.training["job_id"]  # type: ignore[index]
    for what, value in (("training summary", training), ("metadata", incoming.extra)):
        size = len(json.dumps(value, default=str))
        if size > MAX_UPLOAD_META_BYTES:
            raise InvalidPrefix(
                f"the export's {what} is {size} bytes of JSON; at most {MAX_UPLOAD_META_BYTES}"
            )
    return dataclasses.replace(incoming, training=training)


def from_peft_adapter(
    ad: PeftAdapter, bundle: ModelBundle, prompt_format: str | None = None
) -> IncomingPrefix:
    """A read PEFT adapter; its prefix is served on raw prompts (PEFT users tokenize raw text) unless told."""
    cfg = ad.config
    training = {
        "source": "peft",
        "peft_type": cfg.get("peft_type"),
        "prefix_projection": cfg.get("prefix_projection"),
        "base_model_name_or_path": cfg.get("base_model_name_or_path"),
    }
    extra = {"prompt_format": prompt_format or "raw", "source": "peft"}
    return IncomingPrefix(ad.kind, ad.tensors, ad.prefix_length, bundle.fingerprint, training, extra)


def import_peft(
    adapter_dir: str | Path, bundle: ModelBundle, store: PrefixStore, tenant_id: str, name: str
) -> PrefixMeta:
    """Store a PEFT adapter folder as a new version of prefix `tenant_id`/`name` for this base model.

    Raises FileNotFoundError (no adapter files), InvalidPrefix (unsupported type, shapes that do not fit the base
    model, unreadable weights) and the store's own errors (InvalidName, StoreUnavailable).
    """
    return from_peft_adapter(read_peft_adapter(adapter_dir, bundle), bundle).put(store, tenant_id, name)


def from_peft(
    weights: bytes,
    adapter_config: bytes,
    bundle: ModelBundle,
    prompt_format: str | None = None,
    max_prefix_length: int | None = None,
) -> IncomingPrefix:
    """A PEFT PREFIX_TUNING / PROMPT_TUNING adapter: its adapter_config.json and adapter_model.safetensors bytes
    (pickled .bin weights are not taken over the network)."""
    try:
        cfg = parse_adapter_config(adapter_config)
        check_peft_config(cfg, bundle.spec)
    except InvalidPrefix as e:
        raise InvalidAdapterConfig(str(e)) from None
    ad = peft_adapter(cfg, load_safetensors(weights, "adapter weights"), bundle, max_prefix_length)
    return from_peft_adapter(ad, bundle, prompt_format)


def from_upload(
    data: bytes,
    bundle: ModelBundle,
    adapter_config: bytes | None = None,
    prompt_format: str | None = None,
    max_prefix_length: int | None = None,
) -> IncomingPrefix:
    """An uploaded file: with `adapter_config`, a PEFT adapter's weights; without, a PrefixServe export. A prefix
    longer than `max_prefix_length` raises PrefixTooLong."""
    if prompt_format is not None and prompt_format not in PROMPT_FORMATS:
        raise InvalidPrefix(
            f"prompt_format must be one of {', '.join(PROMPT_FORMATS)}, not {prompt_format!r}"
        )
    if adapter_config is not None:
        return from_peft(data, adapter_config, bundle, prompt_format, max_prefix_length)
    if not is_export(data):
        raise InvalidPrefix(
            "the file is not a PrefixServe prefix export (GET /prefixes/{tenant_id}/{name}/download); "
            "for a PEFT adapter send its adapter_model.safetensors together with its adapter_config.json"
        )
    return from_export(data, bundle, prompt_format, max_prefix_length)
