"""Shape facts about the frozen base model that every other module relies on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class ModelSpec:
    family: str  # "llama" (also mistral, qwen2, qwen3) or "gpt2"
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_positions: int
    eos_token_ids: tuple[int, ...] = ()

    @property
    def kv_shape_tail(self) -> tuple[int, int, int]:
        """(L, 2, K) leading dims of a prefix kv tensor `[L, 2, K, P, D]` minus P and D."""
        return (self.num_layers, 2, self.num_kv_heads)

    def kv_shape(self, prefix_length: int) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, self.num_kv_heads, prefix_length, self.head_dim)


def spec_from_config(config: Any, eos_token_ids: tuple[int, ...] = ()) -> ModelSpec:
    mt = getattr(config, "model_type", "")
    if mt in LLAMA_LIKE:
        heads = config.num_attention_heads
        max_positions = config.max_position_embeddings
        window = getattr(config, "sliding_window", None)
        if window and getattr(config, "use_sliding_window", True):
            # the engine attends to the whole context: within the window that is exactly sliding-window attention,
            # so the context is capped there rather than silently computing something else beyond it
            max_positions = min(max_positions, int(window))
        return ModelSpec(
            family="llama",
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            hidden_size=config.hidden_size,
            vocab_size=config.vocab_size,
            max_positions=max_positions,
            eos_token_ids=eos_token_ids,
        )
    if mt == "gpt2":
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
    raise ValueError(f"unsupported model_type {mt!r}: supported are {', '.join((*LLAMA_LIKE, 'gpt2'))}")


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
