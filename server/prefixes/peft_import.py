"""Import adapters saved by PEFT's `save_pretrained`: PREFIX_TUNING (with or without `prefix_projection`) and
PROMPT_TUNING, for a causal-LM base model.

What PEFT writes (peft 0.13+, checked against the installed source, `BasePromptEncoder._get_adapter_state_dict`):
one tensor `prompt_embeddings`. For prefix tuning it is the prefix encoder's *output* `[P, L*2*K*D]` (with the
projection, the MLP is applied before saving and the MLP itself is not saved; K = `num_key_value_heads` for GQA
models, PEFT's `token_dim = K*D`); for prompt tuning it is the soft prompt `[P, H]`. PEFT's `get_prompt` views the
prefix as `[P, L*2, K, D]` (layer-major, key then value) and the prompt's first token gets position P; prompt
tuning's virtual tokens are real positions 0..P-1. Raw state dicts of the prefix encoder
(`...prefix_encoder.embedding.weight` + `...transform.{0,2}.{weight,bias}`) are accepted too.

The files are read directly; PEFT itself is not imported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file

from prefix_store.errors import InvalidPrefix
from server.model.spec import ModelBundle, ModelSpec
from server.prefixes.kinds import (
    PrefixTooLongForModel,
    check_fits_model,
    check_trained_values,
    compile_prefix_tuning,
    compile_prompt_tuning,
    flat_to_kv,
    validate_kv,
)

_KIND = {"PREFIX_TUNING": "prefix_tuning", "PROMPT_TUNING": "prompt_tuning"}
_MLP_KEYS = {f"transform.{i}.{w}": f"mlp.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}


class PeftAdapter(NamedTuple):
    kind: str  # "prefix_tuning" | "prompt_tuning"
    tensors: dict[str, torch.Tensor]  # "kv" plus the trained tensors in our names
    prefix_length: int
    config: dict[str, Any]  # adapter_config.json


def _load_weights(folder: Path) -> dict[str, torch.Tensor]:
    st = folder / "adapter_model.safetensors"
    try:
        if st.exists():
            return load_file(str(st))
        binf = folder / "adapter_model.bin"
        if binf.exists():
            got = torch.load(binf, map_location="cpu", weights_only=True)
            if (
                not isinstance(got, dict)
                or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in got.items())
            ):  # (a list, a bare tensor, a dict of numbers: its use raised 'Tensor' object has no attribute ...)
                raise InvalidPrefix(f"{binf} is not a state dict of named tensors (got {type(got).__name__})")
            return got
    except InvalidPrefix:
        raise
    except Exception as e:  # truncated / corrupt file
        raise InvalidPrefix(f"cannot read the adapter weights in {folder}: {e}") from None
    raise FileNotFoundError(f"{folder} has no adapter_model.safetensors or adapter_model.bin")


def _find(weights: dict[str, torch.Tensor], suffix: str) -> torch.Tensor | None:
    hits = [k for k in weights if k == suffix or k.endswith("." + suffix)]
    if len(hits) > 1:
        raise InvalidPrefix(f"adapter holds several {suffix!r} tensors ({', '.join(sorted(hits))})")
    return weights[hits[0]] if hits else None


def _int(cfg: dict[str, Any], key: str, default: int | None = None) -> int | None:
    """An integer field of the config (None when absent or null); InvalidPrefix when it is not a whole number."""
    value = cfg.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InvalidPrefix(f"adapter config field {key!r} must be an integer, got {value!r}")
    try:
        out = int(value)
    except (ValueError, OverflowError):
        raise InvalidPrefix(f"adapter config field {key!r} must be an integer, got {value!r}") from None
    if isinstance(value, float) and out != value:
        raise InvalidPrefix(f"adapter config field {key!r} must be an integer, got {value!r}")
    return out


class PrefixTooLong(InvalidPrefix):
    """A prefix longer than this server takes from elsewhere (`max_upload_prefix_length`), or than its base model's
    positions leave room for: a 413."""


def check_prefix_length(p: int, limit: int | None, spec: ModelSpec | None = None) -> None:
    if limit is not None and p > limit:
        raise PrefixTooLong(
            f"prefix of {p} positions is longer than this server takes ({limit}: max_upload_prefix_length)"
        )
    if spec is not None:
        try:
            check_fits_model(p, spec)
        except PrefixTooLongForModel as e:
            raise PrefixTooLong(str(e)) from None


def check_peft_config(cfg: dict[str, Any], spec: ModelSpec) -> str:
    """The adapter's PEFT type (ours supported), checked before any weight is read; the adapter's own record of the
    base model's depth, when present, must match (clear error first)."""
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type not in _KIND:
        raise InvalidPrefix(f"unsupported PEFT type {peft_type!r}: expected PREFIX_TUNING or PROMPT_TUNING")
    if (_int(cfg, "num_transformer_submodules") or 1) != 1:
        raise InvalidPrefix("encoder-decoder adapters are not supported: the base model is a causal decoder")
    if _int(cfg, "num_layers", spec.num_layers) != spec.num_layers:
        raise InvalidPrefix(
            f"adapter was made for a base model with {cfg['num_layers']} layers; this one has "
            f"{spec.num_layers} (the adapter does not fit this base model)"
        )
    return peft_type


def read_peft_adapter(adapter_dir: str | Path, bundle: ModelBundle) -> PeftAdapter:
    """Read a PEFT adapter folder and compile it to the serving kv for this base model."""
    cfg = read_peft_config(adapter_dir)
    check_peft_config(cfg, bundle.spec)
    return peft_adapter(cfg, _load_weights(Path(adapter_dir)), bundle)


def read_peft_config(adapter_dir: str | Path) -> dict[str, Any]:
    """A PEFT adapter folder's adapter_config.json (FileNotFoundError if the folder has none, InvalidPrefix if it is
    not a JSON object)."""
    cfg_path = Path(adapter_dir) / "adapter_config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{adapter_dir} has no adapter_config.json (not a PEFT adapter folder)")
    return parse_adapter_config(cfg_path.read_bytes(), str(cfg_path))


def parse_adapter_config(data: bytes, what: str = "adapter_config.json") -> dict[str, Any]:
    """PEFT's adapter_config.json as a dict (InvalidPrefix if it is not a JSON object)."""
    try:
        cfg = json.loads(data)
    except (ValueError, RecursionError) as e:  # (RecursionError: nested past Python's stack)
        raise InvalidPrefix(f"{what} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise InvalidPrefix(f"{what} must be a JSON object, got {type(cfg).__name__}")
    return cfg


def peft_adapter(
    cfg: dict[str, Any],
    weights: dict[str, torch.Tensor],
    bundle: ModelBundle,
    max_prefix_length: int | None = None,
) -> PeftAdapter:
    """Compile a PEFT adapter (its config and its saved tensors) to the serving kv for this base model; one of
    more than `max_prefix_length` virtual tokens raises PrefixTooLong before anything is computed (a few bytes of
    MLP weights can stand for a kv thousands of times their size)."""
    spec = bundle.spec
    peft_type = check_peft_config(cfg, spec)
    saved = _find(weights, "prompt_embeddings")
    emb = saved if saved is not None else _find(weights, "embedding.weight")
    if emb is None:
        raise InvalidPrefix(
            "adapter has no prompt_embeddings / prefix_encoder.embedding.weight tensor "
            f"(found: {', '.join(sorted(weights)) or 'nothing'})"
        )
    # before any cast: an integer/bool/float8 tensor is no trained adapter (an export's int kv is refused too), and
    # a huge soft prompt would compile to an all-zero kv (see MAX_TRAINED_ABS)
    check_trained_values(emb, "prompt_embeddings" if saved is not None else "embedding.weight")
    emb = emb.float()
    if emb.dim() != 2 or emb.shape[0] < 1:
        raise InvalidPrefix(f"adapter embedding must be [P, ...], got {list(emb.shape)}")
    p = emb.shape[0]
    if _int(cfg, "num_virtual_tokens", p) != p:
        raise InvalidPrefix(f"adapter has {p} virtual tokens, its config says {cfg['num_virtual_tokens']}")
    check_prefix_length(p, max_prefix_length, spec)

    if peft_type == "PREFIX_TUNING":
        k_heads = _int(cfg, "num_attention_heads", spec.num_kv_heads)
        if k_heads != spec.num_kv_heads:
            raise InvalidPrefix(
                f"adapter was made with {k_heads} key/value heads; this base model has {spec.num_kv_heads} "
                "(the adapter does not fit this base model)"
            )
        found = {ours: _find(weights, theirs) for theirs, ours in _MLP_KEYS.items()}
        mlp = {ours: t for ours, t in found.items() if t is not None}
        if saved is None and len(mlp) == len(found):  # raw encoder with the MLP
            for theirs, ours in _MLP_KEYS.items():
                check_trained_values(mlp[ours], theirs)
            tensors = {"embedding": emb, **{k: v.float() for k, v in mlp.items()}}
            kv = compile_prefix_tuning(tensors, spec)
            tensors = {"kv": kv, **tensors}
        else:
            want = spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim
            if emb.shape[1] != want:
                raise InvalidPrefix(
                    f"prefix-tuning adapter width {list(emb.shape)} does not fit this base model (expected "
                    f"[P, {want}] = L*2*K*D for L={spec.num_layers}, K={spec.num_kv_heads}, D={spec.head_dim})"
                )
            # the saved tensor *is* the prefix (PEFT's layout); kv is its [L, 2, K, P, D] view, no copy kept
            tensors = {"kv": flat_to_kv(emb, spec).contiguous()}
    else:
        if emb.shape[1] != spec.hidden_size:
            raise InvalidPrefix(
                f"prompt-tuning adapter {list(emb.shape)} does not fit this base model (expected [P, "
                f"{spec.hidden_size}])"
            )
        tensors = {"kv": compile_prompt_tuning(bundle, emb), "soft_prompt": emb.contiguous()}
    validate_kv(tensors["kv"], spec, p)
    return PeftAdapter(_KIND[peft_type], tensors, p, cfg)
