"""One-file export of a stored prefix version, to move a prefix between stores, servers or tenants.

An export is a plain safetensors file (any safetensors reader opens it) holding every tensor of the record, whose
header metadata (``__metadata__``, strings only) carries:

* ``format``: ``"prefixserve.prefix"`` and ``format_version``: ``"1"``;
* ``meta``: JSON of the exported version's :meth:`PrefixMeta.to_dict` (kind, prefix length, base-model
  fingerprint, training summary, prompt format, ...);
* ``tensors_sha256``: :func:`tensors_digest` of the tensors, so a file damaged in transit or edited by hand is
  refused (the stored blob's own ``sha256`` cannot serve: the header changes the bytes).

:func:`export_prefix` writes one; :func:`read_export` verifies one (header, digest, tensors against the metadata)
and returns the record as it was exported. Whether the prefix fits a base model is the importer's check
(:func:`prefix_store.format.check_fingerprint`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import safetensors.torch
import torch

from prefix_store.errors import ChecksumMismatch, InvalidPrefix
from prefix_store.format import IDEMPOTENCY, PrefixMeta, PrefixRecord, check_against_meta, load_safetensors

EXPORT_FORMAT = "prefixserve.prefix"
EXPORT_FORMAT_VERSION = "1"
MAX_HEADER_BYTES = 1 << 24  # a record's header is a few KiB; refuse absurd lengths before parsing


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order (independent of file layout)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def export_prefix(record: PrefixRecord) -> bytes:
    """The export file of one stored version (bytes)."""
    tensors = {k: t.detach().to("cpu").contiguous() for k, t in record.tensors.items()}
    meta = record.meta.to_dict()
    # the Idempotency-Key it was uploaded with belongs to that store, not to whoever gets the file
    meta["extra"] = {k: v for k, v in (meta.get("extra") or {}).items() if k != IDEMPOTENCY}
    metadata = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "meta": json.dumps(meta, sort_keys=True),
        "tensors_sha256": tensors_digest(tensors),
    }
    return safetensors.torch.save(tensors, metadata=metadata)


def header_metadata(data: bytes) -> dict[str, Any] | None:
    """The ``__metadata__`` of safetensors bytes; None if the bytes are not a safetensors file at all."""
    if len(data) < 8:
        return None
    n = int.from_bytes(data[:8], "little")
    if n < 2 or n > min(len(data) - 8, MAX_HEADER_BYTES):
        return None
    try:
        header = json.loads(data[8 : 8 + n])
    except ValueError:
        return None
    if not isinstance(header, dict):
        return None
    meta = header.get("__metadata__")
    return meta if isinstance(meta, dict) else {}


def is_export(data: bytes) -> bool:
    """True if ``data`` says it is a PrefixServe export (it may still fail :func:`read_export`'s checks)."""
    meta = header_metadata(data)
    return meta is not None and meta.get("format") == EXPORT_FORMAT


def read_export(data: bytes) -> PrefixRecord:
    """Parse and verify an export. Raises :class:`InvalidPrefix` (not an export, unsupported version, malformed
    metadata, tensors that disagree with it) or :class:`ChecksumMismatch` (tensor bytes changed)."""
    header = header_metadata(data)
    if header is None or header.get("format") != EXPORT_FORMAT:
        raise InvalidPrefix(
            f"not a PrefixServe prefix export (its safetensors header has no format {EXPORT_FORMAT!r})"
        )
    if header.get("format_version") != EXPORT_FORMAT_VERSION:
        raise InvalidPrefix(
            f"unsupported prefix export version {header.get('format_version')!r} (this server reads "
            f"{EXPORT_FORMAT_VERSION!r})"
        )
    try:
        meta_dict = json.loads(str(header.get("meta", "")))
    except (ValueError, RecursionError) as e:
        raise InvalidPrefix(f"prefix export metadata is not valid JSON: {e}") from None
    meta = PrefixMeta.from_dict(meta_dict)
    tensors = load_safetensors(data, f"prefix export {meta.label}")
    digest = tensors_digest(tensors)
    if digest != header.get("tensors_sha256"):
        raise ChecksumMismatch(
            f"prefix export {meta.label}: tensor bytes changed since export (sha256 {digest[:12]}…, the file "
            f"records {str(header.get('tensors_sha256'))[:12]}…)"
        )
    check_against_meta(meta, tensors)
    return PrefixRecord(meta=meta, tensors=tensors)
