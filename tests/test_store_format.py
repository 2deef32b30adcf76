"""prefix_store: name validation and the record format (no backend)."""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

import prefix_store
from prefix_store import KINDS, ChangeEvent, PrefixMeta, errors, validate_name
from prefix_store.format import decode_record, encode_prefix, validate_tensors

FP = "sha256:" + "ab" * 32
BAD_NAMES = [
    "../x",
    "",
    "x" * 129,
    "a/b",
    "a b",
    "..",
    ".",
    "a\x00b",
    "né",
    "a\n",
    "a:b",
    "a@b",
    "/abs",
    "x\\y",
]


def kv(L=2, K=1, P=4, D=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, 2, K, P, D, generator=g).to(dtype)


def enc(tensors=None, kind="prefix_tuning", P=4, **kw):
    return encode_prefix(
        kind,
        tensors if tensors is not None else {"kv": kv(P=P)},
        base_model_fingerprint=FP,
        prefix_length=P,
        **kw,
    )


# ------------------------------------------------------------------------------------------------- names
@pytest.mark.parametrize("good", ["a", "A-b_c.d", "0", "x" * 128, "...", ".hidden", "v1.json", "-"])
def test_valid_names_pass(good):
    assert validate_name(good) == good


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_invalid_names_raise(bad):
    with pytest.raises(errors.InvalidName) as ei:
        validate_name(bad, "tenant_id")
    assert "tenant_id" in str(ei.value)


@pytest.mark.parametrize("bad", [None, 5, b"abc", ["a"]])
def test_non_string_names_raise(bad):
    with pytest.raises(errors.InvalidName, match="must be a string"):
        validate_name(bad)


def test_long_name_message_is_shortened():
    with pytest.raises(errors.InvalidName) as ei:
        validate_name("y" * 5000)
    assert len(str(ei.value)) < 200 and "5000 characters" in str(ei.value)


def test_errors_hierarchy():
    for cls in (
        errors.InvalidName,
        errors.PrefixNotFound,
        errors.FingerprintMismatch,
        errors.ChecksumMismatch,
        errors.InvalidPrefix,
        errors.StoreUnavailable,
    ):
        assert issubclass(cls, errors.StoreError)


def test_public_exports():
    for name in ("open_store", "PrefixStore", "PrefixMeta", "PrefixRecord", "ChangeEvent", "errors", "KINDS"):
        assert hasattr(prefix_store, name), name
    assert prefix_store.validate_name is validate_name
    assert set(KINDS) == {"prefix_tuning", "prefix_propagation", "prompt_tuning"}


def test_store_does_not_import_server():
    for path in Path(prefix_store.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
            else:
                continue
            assert not any(m == "server" or m.startswith("server.") for m in mods), (path, mods)


# ------------------------------------------------------------------------------------------------ format
def test_encode_decode_roundtrip_and_meta_dict():
    tensors = {"kv": kv(), "embedding": torch.randn(4, 16), "mlp.0.weight": torch.randn(3, 16)}
    e = enc(tensors, training={"steps": 10, "loss": 0.5}, extra={"prompt_format": "chat"})
    assert e.sha256 == hashlib.sha256(e.blob).hexdigest()
    assert e.dtype == "float32"
    assert e.shapes == {"kv": [2, 2, 1, 4, 8], "embedding": [4, 16], "mlp.0.weight": [3, 16]}
    meta = e.meta("t", "n", 3, 123.5)
    assert PrefixMeta.from_dict(meta.to_dict()) == meta
    assert PrefixMeta.from_json(meta.to_json()) == meta
    assert json.loads(meta.to_json())["format"] == 1
    rec = decode_record(meta, e.blob)
    assert rec.meta is meta
    assert set(rec.tensors) == set(tensors)
    for k, t in tensors.items():
        assert torch.equal(rec.tensors[k], t)
    assert rec.kv is rec.tensors["kv"]
    # the blob is a plain safetensors file
    assert torch.equal(safetensors.torch.load(e.blob)["kv"], tensors["kv"])


def test_to_dict_is_a_copy():
    meta = enc(extra={"a": [1]}).meta("t", "n", 1, 0.0)
    d = meta.to_dict()
    d["extra"]["a"].append(2)
    d["shapes"]["kv"][0] = 99
    assert meta.extra == {"a": [1]} and meta.shapes["kv"][0] == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtype_is_kept(dtype):
    t = kv(dtype=dtype)
    e = enc({"kv": t})
    rec = decode_record(e.meta("t", "n", 1, 0.0), e.blob)
    assert rec.kv.dtype == dtype and torch.equal(rec.kv, t)
    assert e.dtype == str(dtype).removeprefix("torch.")


def test_views_and_shared_storage_are_stored():
    base = torch.randn(2, 2, 1, 4, 8)
    tensors = {"kv": base, "alias": base, "view": base[0, 0, 0]}
    e = enc(tensors)
    rec = decode_record(e.meta("t", "n", 1, 0.0), e.blob)
    assert torch.equal(rec.tensors["alias"], base) and torch.equal(rec.tensors["view"], base[0, 0, 0])


def test_noncontiguous_kv_is_stored():
    t = torch.randn(8, 1, 4, 2, 2).permute(3, 4, 2, 1, 0)  # [2,2,4,1,8] non-contiguous
    t = t.transpose(2, 3)  # [2,2,1,4,8]
    assert not t.is_contiguous()
    e = enc({"kv": t})
    assert torch.equal(decode_record(e.meta("t", "n", 1, 0.0), e.blob).kv, t)


BAD_RECORDS = {
    "unknown kind": dict(kind="lora"),
    "no kv": dict(tensors={"embedding": torch.randn(4, 8)}),
    "kv rank 4": dict(tensors={"kv": torch.randn(2, 2, 4, 8)}),
    "kv dim1 3": dict(tensors={"kv": torch.randn(2, 3, 1, 4, 8)}),
    "kv P mismatch": dict(tensors={"kv": kv(P=5)}),
    "kv int": dict(tensors={"kv": torch.ones(2, 2, 1, 4, 8, dtype=torch.int32)}),
    "kv float8_e4m3fn": dict(tensors={"kv": kv().to(torch.float8_e4m3fn)}),
    "kv float8_e5m2": dict(tensors={"kv": kv().to(torch.float8_e5m2)}),
    "kv complex": dict(tensors={"kv": kv().to(torch.complex64)}),
    "kv bool": dict(tensors={"kv": torch.ones(2, 2, 1, 4, 8, dtype=torch.bool)}),
    "kv over MAX_KV_ABS": dict(tensors={"kv": kv().index_put_((torch.tensor([0]),), torch.tensor(-1.5e4))}),
    "soft_prompt float8": dict(
        kind="prompt_tuning", tensors={"kv": kv(), "soft_prompt": torch.randn(4, 16).to(torch.float8_e5m2)}
    ),
    "extra int": dict(tensors={"kv": kv(), "embedding": torch.ones(4, 8, dtype=torch.int64)}),
    "kv empty dim": dict(tensors={"kv": torch.randn(0, 2, 1, 4, 8)}),
    "kv nan": dict(tensors={"kv": kv().index_put_((torch.tensor([0]),), torch.tensor(float("nan")))}),
    "extra inf": dict(tensors={"kv": kv(), "embedding": torch.full((4, 8), float("inf"))}),
    "not a tensor": dict(tensors={"kv": kv(), "x": [1, 2]}),
    "empty": dict(tensors={}),
    "prefix_length 0": dict(P=0),
    "prefix_length bool": dict(P=True),
    "additions wrong L": dict(
        kind="prefix_propagation", tensors={"kv": kv(), "additions": torch.randn(3, 4, 16)}
    ),
    "soft_prompt wrong P": dict(
        kind="prompt_tuning", tensors={"kv": kv(), "soft_prompt": torch.randn(5, 16)}
    ),
    "embedding rank 3": dict(tensors={"kv": kv(), "embedding": torch.randn(1, 4, 16)}),
    "training not json": dict(training={"x": object()}),
    "extra nan": dict(extra={"x": float("nan")}),
    "extra lone surrogate": dict(extra={"x": "\ud800"}),
    "training lone surrogate key": dict(training={"\udfff": 1}),
    "extra not dict": dict(extra=["a"]),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_bad_records_refused(case):
    kw = dict(BAD_RECORDS[case])
    with pytest.raises(errors.InvalidPrefix) as ei:
        enc(**kw)
    assert "tensor(" not in str(ei.value)  # never dumps tensor data


def test_only_the_four_float_dtypes_are_stored_and_read_back():
    """float8 has no isfinite / aminmax in torch: a float8 kv made the checks raise NotImplementedError (a 500 on
    upload, a traceback in the CLI, a stored e5m2 prefix failing every request). It is refused with the dtype named,
    when written and when a record that holds one is read back; kv over MAX_KV_ABS is refused by the store too."""
    with pytest.raises(errors.InvalidPrefix) as ei:
        enc({"kv": kv().to(torch.float8_e4m3fn)})
    msg = str(ei.value)
    assert "float8_e4m3fn" in msg and all(d in msg for d in ("float16", "bfloat16", "float32", "float64"))
    good = enc()
    meta = good.meta("t", "n", 1, 0.0)
    for bad in (kv().to(torch.float8_e5m2), kv() * 2e4):
        blob = safetensors.torch.save({"kv": bad})
        d = meta.to_dict() | {"sha256": hashlib.sha256(blob).hexdigest(), "dtype": str(bad.dtype)[6:]}
        with pytest.raises(errors.InvalidPrefix, match=r"float8_e5m2|at most 10000"):
            decode_record(PrefixMeta.from_dict(d), blob)
    near = kv()
    near[0, 0, 0, 0, 0] = 9999.0
    e = enc({"kv": near})
    assert decode_record(e.meta("t", "n", 1, 0.0), e.blob).kv.abs().max() == 9999.0


def test_good_kind_specific_tensors_pass():
    validate_tensors("prefix_propagation", {"kv": kv(), "additions": torch.randn(2, 4, 16)}, 4)
    validate_tensors("prompt_tuning", {"kv": kv(), "soft_prompt": torch.randn(4, 16)}, 4)


def test_empty_fingerprint_refused():
    with pytest.raises(errors.InvalidPrefix, match="fingerprint"):
        encode_prefix("prefix_tuning", {"kv": kv()}, base_model_fingerprint="", prefix_length=4)


def test_decode_detects_corruption_and_truncation():
    e = enc()
    meta = e.meta("t", "n", 1, 0.0)
    flipped = bytearray(e.blob)
    flipped[len(flipped) // 2] ^= 0xFF
    with pytest.raises(errors.ChecksumMismatch) as ei:
        decode_record(meta, bytes(flipped))
    assert "'t/n' v1" in str(ei.value)
    truncated = e.blob[: len(e.blob) - 10]
    with pytest.raises(errors.ChecksumMismatch):
        decode_record(meta, truncated)
    # checksum matching the truncated bytes: the parser must refuse them
    d = meta.to_dict() | {"sha256": hashlib.sha256(truncated).hexdigest()}
    with pytest.raises(errors.InvalidPrefix, match="not a valid safetensors"):
        decode_record(PrefixMeta.from_dict(d), truncated)


def test_decode_detects_metadata_disagreement():
    e = enc()
    meta = e.meta("t", "n", 1, 0.0)
    for change in ({"shapes": {"kv": [2, 2, 1, 4, 9]}}, {"shapes": {"kv": [2, 2, 1, 4, 8], "x": [1]}}):
        with pytest.raises(errors.InvalidPrefix):
            decode_record(PrefixMeta.from_dict(meta.to_dict() | change), e.blob)
    with pytest.raises(errors.InvalidPrefix, match="dtype"):
        decode_record(PrefixMeta.from_dict(meta.to_dict() | {"dtype": "float16"}), e.blob)
    with pytest.raises(errors.InvalidPrefix, match="prefix_length"):
        decode_record(PrefixMeta.from_dict(meta.to_dict() | {"prefix_length": 5}), e.blob)


@pytest.mark.parametrize(
    "raw",
    [b"not json", b"[1, 2]", b'{"tenant_id": "t"}', b'{"format": 99}'],
)
def test_bad_metadata_json(raw):
    with pytest.raises(errors.InvalidPrefix):
        PrefixMeta.from_json(raw)


def test_metadata_with_a_lone_surrogate_is_refused_when_read():
    """A record stored before writes refused them: its `\\ud800` escape decodes to text no response can encode, so
    reading it is an InvalidPrefix (listings skip it) instead of a 500 wherever it is shown."""
    d = enc().meta("t", "n", 1, 0.0).to_dict()
    ok = json.dumps({**d, "extra": {"x": "\u00e9"}})
    assert PrefixMeta.from_json(ok).extra == {"x": "\u00e9"}
    with pytest.raises(errors.InvalidPrefix, match="surrogate"):
        PrefixMeta.from_json(json.dumps({**d, "extra": {"x": "\ud800"}}))


def test_metadata_field_types_checked():
    d = enc().meta("t", "n", 1, 0.0).to_dict()
    for key, bad in [("version", "1"), ("prefix_length", 4.5), ("shapes", {"kv": "x"}), ("version", True)]:
        with pytest.raises(errors.InvalidPrefix, match=key):
            PrefixMeta.from_dict(d | {key: bad})


def test_change_event_dict_roundtrip():
    ev = ChangeEvent("delete", "t", "n", 7)
    assert ChangeEvent.from_dict(ev.to_dict()) == ev
    with pytest.raises(ValueError):
        ChangeEvent.from_dict({"op": "update", "tenant_id": "t", "name": "n", "version": 1})


def test_reading_a_record_checks_the_served_kvs_values_and_trusts_the_checksum_for_the_rest(monkeypatch):
    """What `get` decodes are the bytes `encode_prefix` validated (their sha256 matches): the served kv's values
    are checked again, the training tensors' (a prefix-tuning MLP, ~35x the kv) not — their finiteness check was
    a large part of a prefix-cache miss (SmolLM2, P 16, MLP 512: 57-63 ms a fetch, 29-45 ms without it; a
    kv-only record 1.2 ms)."""
    import dataclasses

    mlp = torch.randn(32, 2 * 1 * 8 * 2)
    good = enc(tensors={"kv": kv(), "embedding": torch.randn(4, 8), "mlp.2.weight": mlp})
    meta = good.meta("t", "n", 1, 0.0)
    checked: list[int] = []
    real = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: checked.append(t.numel()) or real(t))
    assert set(decode_record(meta, good.blob).tensors) == {"kv", "embedding", "mlp.2.weight"}
    assert mlp.numel() not in checked  # (the kv's own check may use isfinite)

    def forged(tensors: dict) -> tuple:
        blob = safetensors.torch.save(tensors)
        return dataclasses.replace(meta, sha256=hashlib.sha256(blob).hexdigest()), blob

    # bytes written around the checks (a hand-made Redis value with its own sha256): a bad kv is still refused
    with pytest.raises(errors.InvalidPrefix, match="NaN"):
        decode_record(
            *forged({"kv": kv().fill_(float("nan")), "embedding": torch.randn(4, 8), "mlp.2.weight": mlp})
        )
    rec = decode_record(
        *forged({"kv": kv(), "embedding": torch.full((4, 8), float("nan")), "mlp.2.weight": mlp})
    )
    assert rec.tensors["kv"].isfinite().all()  # served; training from it would diverge (the trainer says so)
