"""Import adapters saved by PEFT's `save_pretrained` (PREFIX_TUNING with or without projection, PROMPT_TUNING).

PEFT saves a prefix-tuning adapter as `prompt_embeddings [P, L*2*K*D]` (with projection, the MLP output is what it
saves) and a prompt-tuning adapter as `prompt_embeddings [P, H]`. Both become a stored prefix: `kv` plus the
trained tensor. The files are read directly; PEFT itself is not needed at import time.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from prefix_store import PrefixMeta, PrefixStore
from prefix_store.errors import InvalidPrefix
from server.model.spec import ModelBundle
from server.prefixes.kinds import compile_prompt_tuning, flat_to_kv, validate_kv

_KIND = {"PREFIX_TUNING": "prefix_tuning", "PROMPT_TUNING": "prompt_tuning"}


def _load_weights(folder: Path) -> dict[str, torch.Tensor]:
    st = folder / "adapter_model.safetensors"
    if st.exists():
        return load_file(str(st))
    binf = folder / "adapter_model.bin"
    if binf.exists():
        return torch.load(binf, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder} has no adapter_model.safetensors or adapter_model.bin")


def _prompt_embeddings(weights: dict[str, torch.Tensor]) -> torch.Tensor:
    for key, t in weights.items():
        if key == "prompt_embeddings" or key.endswith(".prompt_embeddings"):
            return t
    raise InvalidPrefix(
        f"adapter has no prompt_embeddings tensor (found: {', '.join(sorted(weights)) or 'nothing'})"
    )


def read_peft_adapter(
    adapter_dir: str | Path, bundle: ModelBundle
) -> tuple[str, dict[str, torch.Tensor], int]:
    """(kind, tensors incl. compiled kv, prefix length) for a PEFT adapter folder on this base model."""
    folder = Path(adapter_dir)
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{folder} has no adapter_config.json (not a PEFT adapter folder)")
    cfg = json.loads(cfg_path.read_text())
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type not in _KIND:
        raise InvalidPrefix(f"unsupported PEFT type {peft_type!r}: expected PREFIX_TUNING or PROMPT_TUNING")
    if int(cfg.get("num_transformer_submodules") or 1) != 1:
        raise InvalidPrefix("encoder-decoder adapters are not supported: the base model is a causal decoder")
    emb = _prompt_embeddings(_load_weights(folder)).float()
    spec = bundle.spec
    p = emb.shape[0]
    if p != int(cfg.get("num_virtual_tokens", p)):
        raise InvalidPrefix(
            f"adapter has {p} virtual tokens, its config says {cfg.get('num_virtual_tokens')}"
        )
    if peft_type == "PREFIX_TUNING":
        want = spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim
        if emb.dim() != 2 or emb.shape[1] != want:
            raise InvalidPrefix(
                f"prefix-tuning adapter width {list(emb.shape)} does not fit this base model "
                f"(expected [P, {want}] = L*2*K*D for L={spec.num_layers}, K={spec.num_kv_heads}, D={spec.head_dim})"
            )
        kv = flat_to_kv(emb, spec).contiguous()
        tensors = {"kv": kv}
    else:
        if emb.dim() != 2 or emb.shape[1] != spec.hidden_size:
            raise InvalidPrefix(
                f"prompt-tuning adapter {list(emb.shape)} does not fit hidden size {spec.hidden_size}"
            )
        kv = compile_prompt_tuning(bundle, emb)
        tensors = {"kv": kv, "soft_prompt": emb.contiguous()}
    validate_kv(tensors["kv"], spec, p)
    return _KIND[peft_type], tensors, p


def import_peft(
    adapter_dir: str | Path, bundle: ModelBundle, store: PrefixStore, tenant_id: str, name: str
) -> PrefixMeta:
    """Store a PEFT adapter as a prefix of `tenant_id`/`name` (new version)."""
    kind, tensors, p = read_peft_adapter(adapter_dir, bundle)
    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    return store.put(
        tenant_id,
        name,
        kind,
        tensors,
        base_model_fingerprint=bundle.fingerprint,
        prefix_length=p,
        training={
            "source": "peft",
            "peft_type": cfg.get("peft_type"),
            "prefix_projection": cfg.get("prefix_projection"),
        },
        extra={"prompt_format": "raw", "source": "peft"},
    )
