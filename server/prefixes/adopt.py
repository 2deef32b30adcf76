"""Prefixes of one base-model fingerprint stored again for another: the same weights under a new fingerprint.

A prefix is served only on the base model it was made on, told by the fingerprint of the model's config, vocabulary
and weights. Some changes move the fingerprint without changing what the model computes: a transformers upgrade
that adds a config default, a config.json field edited that the model never reads, the embedded model converted
again. `adopt` stores, for each name whose newest version made on the old fingerprint is newer than any made on
this one, that version's tensors again as a new version for this model (the old version stays: a fleet still on the
old model keeps serving it). Only the operator can know the weights are the same; on other weights an adopted
prefix is accepted and answers nonsense, so the old fingerprint is named explicitly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from prefix_store import PrefixMeta, PrefixStore
from prefix_store.errors import ChecksumMismatch, FingerprintMismatch, InvalidPrefix, PrefixNotFound
from prefix_store.format import label
from server.model.spec import ModelBundle
from server.prefixes.kinds import check_trained_tensors, validate_kv

MIN_FINGERPRINT_CHARS = 12  # what error messages show of one
_HEX = re.compile(r"[0-9a-f]+")


class AmbiguousFingerprint(ValueError):
    """The abbreviated fingerprint names more than one stored fingerprint."""


def check_abbreviation(fingerprint: str) -> None:
    """ValueError unless `fingerprint` is at least MIN_FINGERPRINT_CHARS lowercase hex digits."""
    if len(fingerprint) < MIN_FINGERPRINT_CHARS or not _HEX.fullmatch(fingerprint):
        raise ValueError(
            f"the old fingerprint must be at least {MIN_FINGERPRINT_CHARS} hex digits (as GET /info, "
            f"`prefixes list --json` and prefix_incompatible errors show it), got {fingerprint!r}"
        )


@dataclass(frozen=True)
class Adoption:
    """One name's newest version on the old fingerprint, to be stored again for this model."""

    tenant_id: str
    name: str
    from_version: int
    from_fingerprint: str

    def to_dict(self) -> dict[str, Any]:
        return {"tenant_id": self.tenant_id, "name": self.name, "from_version": self.from_version}


@dataclass
class AdoptPlan:
    adopt: list[Adoption] = field(default_factory=list)
    current: int = 0  # names with an old version and a newer one for this model: nothing to do
    fingerprints: set[str] = field(default_factory=set)  # the full old fingerprints the abbreviation matched


def plan(
    store: PrefixStore,
    old: str,
    new: str,
    tenant_id: str | None = None,
    name: str | None = None,
) -> AdoptPlan:
    """What `adopt` would store (reads metadata only). AmbiguousFingerprint if `old` abbreviates several."""
    check_abbreviation(old)
    if new.startswith(old):
        raise ValueError(f"{old!r} is this model's own fingerprint: there is nothing to adopt")
    out = AdoptPlan()
    for t, n in store.names(tenant_id):
        if name is not None and n != name:
            continue
        newer = False  # a version for this model newer than the versions looked at so far
        for v in reversed(store.versions(t, n)):
            try:
                meta = store.get_meta(t, n, v)
            except (PrefixNotFound, InvalidPrefix):  # deleted meanwhile; unreadable: not one to copy
                continue
            if meta.base_model_fingerprint == new:
                newer = True
            elif meta.base_model_fingerprint.startswith(old):
                out.fingerprints.add(meta.base_model_fingerprint)
                if newer:
                    out.current += 1
                else:
                    out.adopt.append(Adoption(t, n, v, meta.base_model_fingerprint))
                break
    if len(out.fingerprints) > 1:
        raise AmbiguousFingerprint(
            f"{old!r} abbreviates {len(out.fingerprints)} stored fingerprints "
            f"({', '.join(sorted(f[:16] for f in out.fingerprints))}): give more of it"
        )
    return out


def adopt_one(store: PrefixStore, a: Adoption, bundle: ModelBundle) -> PrefixMeta:
    """Store `a`'s version again, checked to fit this model, as the name's new version for it. ADOPT_ERRORS: this
    one cannot be (another shape, unreadable, deleted or replaced meanwhile); other StoreErrors: the store."""
    rec = store.get(a.tenant_id, a.name, a.from_version, expected_fingerprint=a.from_fingerprint)
    m = rec.meta
    validate_kv(rec.kv, bundle.spec, m.prefix_length)
    check_trained_tensors(m.kind, rec.tensors, bundle.spec)
    extra = {
        **(m.extra or {}),
        "adopted_from": {"version": m.version, "base_model_fingerprint": m.base_model_fingerprint},
    }
    return store.put(
        a.tenant_id,
        a.name,
        m.kind,
        rec.tensors,
        base_model_fingerprint=bundle.fingerprint,
        prefix_length=m.prefix_length,
        training=m.training,
        extra=extra,
    )


ADOPT_ERRORS = (InvalidPrefix, ChecksumMismatch, PrefixNotFound, FingerprintMismatch)


def describe(a: Adoption) -> str:
    return label(a.tenant_id, a.name, a.from_version)


def foreign_store_hint(store: PrefixStore, fingerprint: str, sample: int = 50) -> str | None:
    """A start-up hint, or None: the first `sample` prefixes of the store (sorted by tenant, name) hold versions,
    none of them for this model, and most were made for one other fingerprint, which is what a fingerprint moved
    by a transformers upgrade or a config edit looks like (every prefix refused until adopted or retrained)."""
    metas, _ = store.list_page(limit=sample)
    others: dict[str, int] = {}
    for m in metas:
        if m.base_model_fingerprint == fingerprint:
            return None
        others[m.base_model_fingerprint] = others.get(m.base_model_fingerprint, 0) + 1
    if not others:
        return None
    for m in metas:  # an older version for this model (a blue/green store): served, nothing to say
        if store.servable_meta(m.tenant_id, m.name, None, fingerprint).base_model_fingerprint == fingerprint:
            return None
    old, n = max(others.items(), key=lambda kv: kv[1])
    return (
        f"none of the store's first {len(metas)} prefixes has a version for this base model (fingerprint "
        f"{fingerprint[:12]}); {n} were made for fingerprint {old[:12]}, and requests naming them are refused "
        "(422 prefix_incompatible). If that model had these weights and tokenizer (only the fingerprint moved: a "
        "transformers upgrade, a config.json edit), `prefixserve prefixes adopt --from-fingerprint "
        f"{old[:12]} --model MODEL --store URL` serves them again; otherwise they must be trained again"
    )
