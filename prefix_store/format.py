"""The record format shared by every backend.

A stored version of a prefix is two byte strings:

* the **blob**: the tensors serialized with ``safetensors.torch.save`` (a plain safetensors file);
* the **metadata**: UTF-8 JSON of :meth:`PrefixMeta.to_dict` plus ``"format": 1``. Its ``sha256`` field is the hex
  digest of the blob, its ``dtype`` the dtype of ``kv`` (``"float32"``, ...) and ``shapes`` the shape of every
  tensor in the blob.

:func:`encode_prefix` validates tensors and builds the blob (everything but version and creation time, which the
backend assigns); :func:`decode_record` verifies a blob against its metadata (checksum first, then that it parses,
then names/shapes/dtype and the ``kv`` invariants) before any tensor is handed out.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import safetensors.torch
import torch

from prefix_store.errors import ChecksumMismatch, FingerprintMismatch, InvalidPrefix, PrefixValuesOutOfRange

FORMAT_VERSION = 1

KINDS: tuple[str, ...] = ("prefix_tuning", "prefix_propagation", "prompt_tuning")

# Optional per-kind tensors besides `kv` whose leading dims are checked when present:
# name -> (rank, {dim index: "L" | "P"}); "L"/"P" must equal kv's layers / prefix length.
_KIND_TENSORS: dict[str, dict[str, tuple[int, dict[int, str]]]] = {
    "prefix_tuning": {"embedding": (2, {0: "P"})},
    "prefix_propagation": {"additions": (3, {0: "L", 1: "P"})},
    "prompt_tuning": {"soft_prompt": (2, {0: "P"})},
}

# "resync" (never on the wire; tenant_id and name empty): a backend lost its change subscription, events may have
# been missed, so subscribers drop whatever they cached
EventOp = Literal["put", "delete", "resync"]


def short_fingerprint(fp: str, n: int = 12) -> str:
    return fp if len(fp) <= n else fp[:n] + "…"


def label(tenant_id: str, name: str, version: int | None = None) -> str:
    s = f"'{tenant_id}/{name}'"
    return s if version is None else f"{s} v{version}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# extra[IDEMPOTENCY] = {"key", "digest"}: the Idempotency-Key a version was put with (PrefixStore.put_once)
IDEMPOTENCY = "idempotency"


def idempotency_key_of(meta: PrefixMeta) -> str | None:
    entry = meta.extra.get(IDEMPOTENCY) if isinstance(meta.extra, dict) else None
    key = entry.get("key") if isinstance(entry, dict) else None
    return key if isinstance(key, str) else None


# --------------------------------------------------------------------------------------------------- dataclasses
@dataclass(frozen=True)
class PrefixMeta:
    tenant_id: str
    name: str
    kind: str
    prefix_length: int
    version: int
    created: float  # unix seconds
    base_model_fingerprint: str
    dtype: str  # dtype of kv, e.g. "float32"
    shapes: dict[str, list[int]]
    sha256: str  # hex digest of the safetensors bytes
    training: dict | None = None
    extra: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return label(self.tenant_id, self.name, self.version)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tenant_id": self.tenant_id,
            "name": self.name,
            "kind": self.kind,
            "prefix_length": self.prefix_length,
            "version": self.version,
            "created": self.created,
            "base_model_fingerprint": self.base_model_fingerprint,
            "dtype": self.dtype,
            "shapes": {k: list(v) for k, v in self.shapes.items()},
            "sha256": self.sha256,
            "training": copy.deepcopy(self.training),
            "extra": copy.deepcopy(self.extra),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PrefixMeta:
        """Build from a dict (unknown keys are ignored); malformed metadata raises :class:`InvalidPrefix`."""
        if not isinstance(d, Mapping):
            raise InvalidPrefix(f"prefix metadata must be a JSON object, got {type(d).__name__}")
        missing = [f.name for f in fields(cls) if f.name not in d and f.name not in ("training", "extra")]
        if missing:
            raise InvalidPrefix(f"prefix metadata is missing field(s): {', '.join(missing)}")

        def typed(key: str, types: type | tuple[type, ...]) -> Any:
            v = d[key]
            if isinstance(v, bool) or not isinstance(v, types):
                raise InvalidPrefix(f"prefix metadata field {key!r} has type {type(v).__name__}")
            return v

        shapes = typed("shapes", dict)
        for k, v in shapes.items():
            if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
                raise InvalidPrefix(f"prefix metadata field 'shapes': shape of {k!r} is not a list of ints")
        training = d.get("training")
        if training is not None and not isinstance(training, dict):
            raise InvalidPrefix("prefix metadata field 'training' must be an object or null")
        extra = d.get("extra") or {}
        if not isinstance(extra, dict):
            raise InvalidPrefix("prefix metadata field 'extra' must be an object")
        return cls(
            tenant_id=typed("tenant_id", str),
            name=typed("name", str),
            kind=typed("kind", str),
            prefix_length=typed("prefix_length", int),
            version=typed("version", int),
            created=_finite_float(typed("created", (int, float)), "created"),
            base_model_fingerprint=typed("base_model_fingerprint", str),
            dtype=typed("dtype", str),
            shapes={k: list(v) for k, v in shapes.items()},
            sha256=typed("sha256", str),
            training=copy.deepcopy(training),
            extra=copy.deepcopy(extra),
        )

    def to_json(self) -> bytes:
        return json.dumps(
            {"format": FORMAT_VERSION, **self.to_dict()}, sort_keys=True, allow_nan=False
        ).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> PrefixMeta:
        try:
            d = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise InvalidPrefix(f"prefix metadata is not valid JSON ({e.__class__.__name__}: {e})") from None
        if isinstance(d, dict) and d.get("format", FORMAT_VERSION) != FORMAT_VERSION:
            raise InvalidPrefix(f"prefix metadata has unsupported format {d.get('format')!r}")
        try:  # "\ud800" escapes decode to text no response can encode (stored before writes refused them)
            json.dumps(d, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidPrefix("prefix metadata holds invalid Unicode text (a lone surrogate)") from None
        return cls.from_dict(d)


@dataclass(frozen=True)
class PrefixRecord:
    meta: PrefixMeta
    tensors: dict[str, torch.Tensor]

    @property
    def kv(self) -> torch.Tensor:
        return self.tensors["kv"]


@dataclass(frozen=True)
class ChangeEvent:
    op: EventOp  # "put" | "delete" | "resync"
    tenant_id: str
    name: str
    version: int  # the version written, or the highest version deleted

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "tenant_id": self.tenant_id, "name": self.name, "version": self.version}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ChangeEvent:
        op = d.get("op")
        # (resync: a writer's earlier change did not reach the journal)
        if op not in ("put", "delete", "resync"):
            raise ValueError(f"unknown change event op {op!r}")
        version = d.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise ValueError("change event version must be an int")
        tenant_id, name = d.get("tenant_id"), d.get("name")
        if not isinstance(tenant_id, str) or not isinstance(name, str):
            raise ValueError("change event tenant_id/name must be strings")
        return cls(op=op, tenant_id=tenant_id, name=name, version=version)


# ------------------------------------------------------------------------------------------------- validation
def _finite_float(value: float, field: str) -> float:
    try:
        out = float(value)
    except OverflowError:
        out = math.inf
    if not math.isfinite(out):
        raise InvalidPrefix(f"prefix metadata field {field!r} must be a finite number")
    return out


def _check_prefix_length(prefix_length: object) -> int:
    if isinstance(prefix_length, bool) or not isinstance(prefix_length, int) or prefix_length < 1:
        raise InvalidPrefix(f"prefix_length must be a positive int, got {prefix_length!r}")
    return prefix_length


# the dtypes a stored tensor may have: what the engine and training compute in. float8 is refused too (torch has no
# isfinite / aminmax for it, so its values could not even be checked), as are complex, integer and bool tensors
TENSOR_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# the largest key/value entry a served prefix may hold. Real ones stay far below (SmolLM2's own KV: under 20); a
# huge one would make attention scores overflow to inf and every request on it fail: refused on every way in
# (upload, import, training, load), here where no base model is needed
MAX_KV_ABS = 1e4


def check_tensor_dtype(key: str, t: torch.Tensor) -> None:
    """Raise :class:`InvalidPrefix` unless ``t`` has one of :data:`TENSOR_DTYPES`."""
    if t.dtype not in TENSOR_DTYPES:
        allowed = ", ".join(dtype_name(d) for d in TENSOR_DTYPES)
        raise InvalidPrefix(
            f"tensor {key!r} has dtype {dtype_name(t.dtype)}; a prefix's tensors must be floating-point: {allowed}"
        )


def check_kv_values(kv: torch.Tensor) -> None:
    """Raise :class:`InvalidPrefix` unless every entry of ``kv`` is finite and at most :data:`MAX_KV_ABS` in
    magnitude (``kv`` of one of :data:`TENSOR_DTYPES`)."""
    if not kv.numel():
        return
    lo, hi = torch.aminmax(kv)  # one pass, no copy (NaN propagates into both)
    biggest = max(-float(lo), float(hi))
    if not math.isfinite(biggest):
        raise PrefixValuesOutOfRange("prefix kv contains NaN or infinite values")
    if biggest > MAX_KV_ABS:
        raise PrefixValuesOutOfRange(
            f"prefix kv holds values up to {biggest:.3g}; at most {MAX_KV_ABS:g} in magnitude is accepted"
        )


def validate_tensors(
    kind: str, tensors: Mapping[str, torch.Tensor], prefix_length: int, *, all_values: bool = True
) -> None:
    """Raise :class:`InvalidPrefix` unless ``tensors`` is a valid record body for ``kind``.

    Rules: ``kind`` in :data:`KINDS`; a ``kv`` of shape ``[L, 2, K, P, D]`` (all dims >= 1) with
    ``P == prefix_length`` and entries at most :data:`MAX_KV_ABS` in magnitude; every tensor a dense tensor of one
    of :data:`TENSOR_DTYPES` with finite values; kind-specific tensors (``embedding``, ``additions``,
    ``soft_prompt``), when present, agree with ``L`` and ``P``. ``all_values=False`` checks the values of ``kv``
    only (the served tensor; the others' were checked when the record was written).
    """
    if kind not in KINDS:
        raise InvalidPrefix(f"unknown prefix kind {kind!r}; expected one of {', '.join(KINDS)}")
    _check_prefix_length(prefix_length)
    if not isinstance(tensors, Mapping) or not tensors:
        raise InvalidPrefix("tensors must be a non-empty dict of name -> torch.Tensor")
    for key, t in tensors.items():
        if not isinstance(key, str) or not key:
            raise InvalidPrefix(f"tensor names must be non-empty strings, got {key!r}")
        if not isinstance(t, torch.Tensor):
            raise InvalidPrefix(f"tensor {key!r} is a {type(t).__name__}, not a torch.Tensor")
        if t.layout != torch.strided or t.is_quantized or t.device.type == "meta":
            raise InvalidPrefix(f"tensor {key!r} must be a dense tensor with data (layout {t.layout})")
        check_tensor_dtype(key, t)
    kv = tensors.get("kv")
    if kv is None:
        raise InvalidPrefix(f"a prefix record needs a 'kv' tensor; got {sorted(tensors)}")
    shape = tuple(kv.shape)
    if kv.dim() != 5:
        raise InvalidPrefix(f"'kv' must have rank 5 [L, 2, K, P, D], got shape {list(shape)}")
    if shape[1] != 2:
        raise InvalidPrefix(f"'kv' dim 1 must be 2 (key, value), got shape {list(shape)}")
    if shape[3] != prefix_length:
        raise InvalidPrefix(f"'kv' dim 3 must equal prefix_length={prefix_length}, got shape {list(shape)}")
    if min(shape) < 1:
        raise InvalidPrefix(f"'kv' has an empty dimension: shape {list(shape)}")
    dims = {"L": shape[0], "P": prefix_length}
    for key, (rank, checks) in _KIND_TENSORS[kind].items():
        kind_tensor = tensors.get(key)
        if kind_tensor is None:
            continue
        if kind_tensor.dim() != rank or any(kind_tensor.shape[i] != dims[sym] for i, sym in checks.items()):
            want = ", ".join(f"dim {i} = {sym} = {dims[sym]}" for i, sym in checks.items())
            raise InvalidPrefix(
                f"{kind} tensor {key!r} must have rank {rank} with {want}; got {list(kind_tensor.shape)}"
            )
    for key, t in tensors.items() if all_values else ():
        if key != "kv" and t.numel() and not bool(torch.isfinite(t).all()):
            raise PrefixValuesOutOfRange(f"tensor {key!r} contains NaN or infinite values")
    check_kv_values(kv)


def _json_dict(value: object, what: str, allow_none: bool) -> dict | None:
    if value is None:
        return None if allow_none else {}
    if not isinstance(value, dict):
        raise InvalidPrefix(f"{what} must be a dict, got {type(value).__name__}")
    try:
        # ensure_ascii=False + encode: a lone surrogate (valid in a str, not in UTF-8) is refused here, not stored to
        # fail every response that shows it later
        return json.loads(json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8"))
    except (TypeError, ValueError) as e:
        raise InvalidPrefix(
            f"{what} must be JSON-serializable (finite numbers, valid Unicode text only): {e}"
        ) from None


def check_fingerprint(meta: PrefixMeta, expected: str | None) -> None:
    if expected is not None and meta.base_model_fingerprint != expected:
        raise FingerprintMismatch(
            f"prefix {meta.label} was trained on base model {short_fingerprint(meta.base_model_fingerprint)}, "
            f"but this server runs base model {short_fingerprint(expected)}; refusing to serve it"
        )


# --------------------------------------------------------------------------------------------- encode / decode
@dataclass(frozen=True)
class EncodedPrefix:
    """A validated, serialized record body: everything of a :class:`PrefixMeta` except identity and version."""

    kind: str
    prefix_length: int
    base_model_fingerprint: str
    dtype: str
    shapes: dict[str, list[int]]
    sha256: str
    training: dict | None
    extra: dict
    blob: bytes

    def meta(self, tenant_id: str, name: str, version: int, created: float) -> PrefixMeta:
        return PrefixMeta(
            tenant_id=tenant_id,
            name=name,
            kind=self.kind,
            prefix_length=self.prefix_length,
            version=version,
            created=created,
            base_model_fingerprint=self.base_model_fingerprint,
            dtype=self.dtype,
            shapes={k: list(v) for k, v in self.shapes.items()},
            sha256=self.sha256,
            training=copy.deepcopy(self.training),
            extra=copy.deepcopy(self.extra),
        )


def encode_prefix(
    kind: str,
    tensors: Mapping[str, torch.Tensor],
    *,
    base_model_fingerprint: str,
    prefix_length: int,
    training: dict | None = None,
    extra: dict | None = None,
) -> EncodedPrefix:
    """Validate and serialize (raises :class:`InvalidPrefix`). Tensors are stored as given (dtype kept)."""
    validate_tensors(kind, tensors, prefix_length)
    if not isinstance(base_model_fingerprint, str) or not base_model_fingerprint:
        raise InvalidPrefix("base_model_fingerprint must be a non-empty string")
    training_d = _json_dict(training, "training", allow_none=True)
    extra_d = _json_dict(extra, "extra", allow_none=False) or {}
    prepared: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for key, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages and t.numel():  # safetensors refuses tensors sharing memory
            t = t.clone()
        storages.add(ptr)
        prepared[key] = t
    try:
        blob = safetensors.torch.save(prepared)
    except Exception as e:  # pragma: no cover - validated above; defensive
        raise InvalidPrefix(f"cannot serialize tensors: {e.__class__.__name__}") from None
    return EncodedPrefix(
        kind=kind,
        prefix_length=prefix_length,
        base_model_fingerprint=base_model_fingerprint,
        dtype=dtype_name(prepared["kv"].dtype),
        shapes={k: list(t.shape) for k, t in prepared.items()},
        sha256=hashlib.sha256(blob).hexdigest(),
        training=training_d,
        extra=extra_d,
        blob=blob,
    )


def load_safetensors(blob: bytes, what: str) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes; :class:`InvalidPrefix` naming ``what`` if they are not a valid file."""
    try:
        return safetensors.torch.load(blob)
    except Exception as e:
        msg = str(e).splitlines()[0][:200] if str(e) else e.__class__.__name__
        raise InvalidPrefix(
            f"{what}: tensor bytes are not a valid safetensors file ({len(blob)} bytes): {msg}"
        ) from None


def check_against_meta(
    meta: PrefixMeta, tensors: Mapping[str, torch.Tensor], *, all_values: bool = True
) -> None:
    """Raise :class:`InvalidPrefix` unless ``tensors`` are the ones ``meta`` describes (names, shapes, kv dtype)
    and a valid record body for its kind (``all_values``: as `validate_tensors`)."""
    if set(tensors) != set(meta.shapes):
        raise InvalidPrefix(
            f"prefix {meta.label}: tensors {sorted(tensors)} do not match metadata {sorted(meta.shapes)}"
        )
    for key, t in tensors.items():
        if list(t.shape) != list(meta.shapes[key]):
            raise InvalidPrefix(
                f"prefix {meta.label}: tensor {key!r} has shape {list(t.shape)}, metadata says {meta.shapes[key]}"
            )
    if "kv" in tensors and dtype_name(tensors["kv"].dtype) != meta.dtype:
        raise InvalidPrefix(
            f"prefix {meta.label}: 'kv' has dtype {dtype_name(tensors['kv'].dtype)}, metadata says {meta.dtype}"
        )
    try:
        validate_tensors(meta.kind, tensors, meta.prefix_length, all_values=all_values)
    except InvalidPrefix as e:
        raise InvalidPrefix(f"prefix {meta.label}: {e}") from None


def decode_record(meta: PrefixMeta, blob: bytes) -> PrefixRecord:
    """Verify ``blob`` against ``meta`` and deserialize it.

    Raises :class:`ChecksumMismatch` if the sha256 differs, :class:`InvalidPrefix` if the bytes do not parse as
    safetensors or the tensors disagree with the metadata (names, shapes, kv dtype, kv invariants).
    """
    digest = hashlib.sha256(blob).hexdigest()
    if digest != meta.sha256:
        raise ChecksumMismatch(
            f"prefix {meta.label}: stored tensor bytes are corrupted (sha256 of {len(blob)} bytes is "
            f"{digest[:12]}…, metadata records {meta.sha256[:12]}…); refusing to serve it"
        )
    tensors = load_safetensors(blob, f"prefix {meta.label}")
    # the bytes are those `encode_prefix` validated (the checksum says so): the served kv's values are checked again,
    # not the training tensors' (a prefix-tuning MLP is ~35x the kv: checking it was much of a prefix-cache miss)
    check_against_meta(meta, tensors, all_values=False)
    return PrefixRecord(meta=meta, tensors=tensors)
