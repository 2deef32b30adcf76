"""Shape facts about the frozen base model that every other module relies on."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class ModelSpec:
    family: str  # native: "llama" (also mistral, qwen2, qwen3) or "gpt2"; "hf": transformers' modeling code
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_positions: int
    eos_token_ids: tuple[int, ...] = ()

    def kv_shape(self, prefix_length: int) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, self.num_kv_heads, prefix_length, self.head_dim)


def _capped_by_window(config: Any, max_positions: int) -> int:
    """The engine attends to the whole context: within a sliding window that is exactly sliding-window attention,
    so the context is capped at the window rather than silently computing something else beyond it."""
    window = getattr(config, "sliding_window", None)
    if (
        window
        and int(window) > 0
        and getattr(config, "use_sliding_window", True)
        and int(window) < max_positions
    ):
        said = (getattr(config, "name_or_path", ""), "window", int(window))
        if said not in _CAPPED:  # (said once per model, as the rotary cap)
            _CAPPED.add(said)
            log.warning(
                "%s: sliding-window attention of %d positions; served within that window (of %d positions)",
                said[0] or getattr(config, "model_type", "model"),
                int(window),
                max_positions,
            )
        return int(window)
    return max_positions


# rotary scalings whose frequencies transformers picks by the longest position of each forward call: beyond the
# original context, a row's rotations would depend on what else is in the batch
LENGTH_DEPENDENT_ROPE = ("longrope", "dynamic")
_CAPPED: set[tuple[str, str, int]] = set()  # (model, which cap, its length) of the caps logged
log = logging.getLogger("prefixserve.model")


def _rope_parameters(config: Any) -> dict[str, Any]:
    """The rotary scaling of a config (transformers 5's `rope_parameters`, earlier `rope_scaling`); {} if none."""
    for attr in ("rope_parameters", "rope_scaling"):
        rp = getattr(config, attr, None)
        if isinstance(rp, dict) and rp:
            if all(isinstance(v, dict) for v in rp.values()):  # per layer type: one of them is enough to cap
                rp = next((v for v in rp.values() if v.get("rope_type") in LENGTH_DEPENDENT_ROPE), {})
            return rp
    return {}


def _capped_by_rope(config: Any, max_positions: int) -> int:
    """Longrope (Phi-3/3.5/4 long-context) and dynamic NTK scaling switch frequencies once a forward call reaches
    past the original context, for every position of that call; the engine batches rows of any length, so it serves
    them within the original context, where the frequencies are the ones every row gets alone."""
    rp = _rope_parameters(config)
    if rp.get("rope_type", rp.get("type")) not in LENGTH_DEPENDENT_ROPE:
        return max_positions
    original = rp.get("original_max_position_embeddings") or getattr(
        config, "original_max_position_embeddings", None
    )
    if not original or int(original) >= max_positions:
        return max_positions
    said = (getattr(config, "name_or_path", ""), "rope", int(original))
    if said not in _CAPPED:
        _CAPPED.add(said)
        log.warning(
            "%s: %s rotary scaling; served within its original context of %d positions (of %d)",
            said[0] or getattr(config, "model_type", "model"),
            rp.get("rope_type", rp.get("type")),
            int(original),
            max_positions,
        )
    return int(original)


def spec_from_config(config: Any, eos_token_ids: tuple[int, ...] = ()) -> ModelSpec:
    mt = getattr(config, "model_type", "")
    try:
        return _spec_from_config(config, mt, eos_token_ids)
    except ValueError:
        raise
    except Exception as e:  # a config this code cannot read (an attribute transformers will not give, ...)
        raise ValueError(
            f"unsupported model_type {mt!r}: its config cannot be read ({type(e).__name__}: {e})"
        ) from e


def _native(config: Any, mt: str) -> bool:
    """The engine's own forward computes this config (else transformers' modeling code runs it, as any other
    family): Llama-like with SiLU, GPT-2 without its per-layer attention scaling or upcast variants."""
    if mt in LLAMA_LIKE:
        return getattr(config, "hidden_act", "silu") == "silu"
    if mt == "gpt2":
        return not (
            getattr(config, "scale_attn_by_inverse_layer_idx", False)
            or getattr(config, "reorder_and_upcast_attn", False)
        )
    return False


def _spec_from_config(config: Any, mt: str, eos_token_ids: tuple[int, ...]) -> ModelSpec:
    native = _native(config, mt)
    if mt != "gpt2" or not native:
        if not native:
            _check_generic(config, mt)
        heads = config.num_attention_heads
        max_positions = (
            getattr(config, "max_position_embeddings", None)
            or getattr(config, "n_positions", None)
            or getattr(config, "max_sequence_length", None)
            or 2048
        )
        return ModelSpec(
            family="llama" if native else "hf",
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            hidden_size=config.hidden_size,
            vocab_size=config.vocab_size,
            max_positions=_capped_by_rope(config, _capped_by_window(config, int(max_positions))),
            eos_token_ids=eos_token_ids,
        )
    return ModelSpec(
        family="gpt2",
        num_layers=config.n_layer,
        num_heads=config.n_head,
        num_kv_heads=config.n_head,
        head_dim=config.n_embd // config.n_head,
        hidden_size=config.n_embd,
        vocab_size=config.vocab_size,
        max_positions=config.n_positions,
        eos_token_ids=eos_token_ids,
    )


def _check_generic(config: Any, mt: str) -> None:
    """Other decoder-only causal LMs run through transformers' own modeling code with the engine's paged attention
    (server/engine/hf_attention.py); the engine checks the result against the model's own forward at start-up.
    Refused here, before any weights load: what is not a decoder-only causal LM, and attention the engine does not
    compute (logit soft-capping, layers that are not attention)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    native = ", ".join((*LLAMA_LIKE, "gpt2"))
    if (
        mt not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        or mt in MODEL_FOR_MASKED_LM_MAPPING_NAMES
        or getattr(config, "is_encoder_decoder", False)
    ):
        raise ValueError(
            f"unsupported model_type {mt!r}: not a decoder-only causal LM (native: {native}; other decoder-only "
            "transformers models run through their own modeling code)"
        )
    if getattr(config, "attn_logit_softcapping", None):
        raise ValueError(f"unsupported model_type {mt!r}: attention logit soft-capping is not implemented")
    layer_types = getattr(config, "layer_types", None) or ()
    odd = sorted({t for t in layer_types if t not in ("full_attention", "sliding_attention")})
    if odd:
        raise ValueError(
            f"unsupported model_type {mt!r}: layers of type {odd} (only full and sliding-window attention layers "
            "are computed)"
        )
    import transformers

    cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[mt], None)
    if cls is not None and not getattr(cls, "_supports_attention_backend", False):
        # (found here rather than once its weights have loaded: for a large checkpoint, minutes)
        raise ValueError(
            f"unsupported model_type {mt!r}: {cls.__name__} does not route attention through transformers' "
            "AttentionInterface, where the engine plugs its paged attention in"
        )
    for attr in ("num_hidden_layers", "num_attention_heads", "hidden_size", "vocab_size"):
        if not isinstance(getattr(config, attr, None), int):
            raise ValueError(f"unsupported model_type {mt!r}: its config has no integer {attr}")
    latent = [a for a in ("kv_lora_rank", "qk_rope_head_dim", "v_head_dim") if getattr(config, a, None)]
    if latent:
        raise ValueError(
            f"unsupported model_type {mt!r}: multi-head latent attention or key and value heads of different sizes "
            f"({', '.join(latent)}); the engine's KV cache holds keys and values of one head size"
        )


@dataclass
class ModelBundle:
    """The frozen model, its tokenizer and the facts derived from them; loaded once per process."""

    hf_model: Any  # transformers PreTrainedModel, frozen, eval mode
    tokenizer: Any
    spec: ModelSpec
    fingerprint: str
    device: torch.device
    dtype: torch.dtype
    name: str = "model"
    extra: dict[str, Any] = field(default_factory=dict)
