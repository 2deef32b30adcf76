"""The three prefix kinds and their compilation to the one serving form, `kv [L, 2, K, P, D]`.

- prefix-tuning (Li & Liang 2021): embedding `[P, H]` → MLP (H→h, tanh, h→L·2·K·D) whose output is the per-layer
  KV (PEFT's layout); only the compiled KV is served.
- prefix-propagation (arXiv 2305.12086): additions `A [L, P, H]` added to the hidden states of the P prefix
  positions at the input of every layer. In a causal decoder those positions never see the user's tokens, so their
  per-layer K/V are input-independent: one frozen forward over the P positions records them.
- prompt tuning: a soft prompt `S [P, H]` at the input only (propagation restricted to layer 0).

Prefix positions have token embedding zero and are real positions `0..P-1` (rotary / learned positions apply); the
prompt's first token has position P, exactly as transformers' `past_key_values` convention.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from prefix_store.errors import InvalidPrefix
from server.model.spec import ModelBundle, ModelSpec

KINDS = ("prefix_tuning", "prefix_propagation", "prompt_tuning")


# ------------------------------------------------------------------------------------------------ layout helpers
def flat_to_kv(flat: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """PEFT layout `[P, L*2*K*D]` (layer-major, key then value) → `[L, 2, K, P, D]`."""
    p = flat.shape[0]
    return flat.reshape(p, spec.num_layers, 2, spec.num_kv_heads, spec.head_dim).permute(1, 2, 3, 0, 4)


def kv_to_flat(kv: torch.Tensor) -> torch.Tensor:
    """Inverse of `flat_to_kv`."""
    layers, two, k, p, d = kv.shape
    return kv.permute(3, 0, 1, 2, 4).reshape(p, layers * two * k * d)


def kv_to_cache(kv: torch.Tensor, batch: int = 1, dtype: torch.dtype | None = None) -> DynamicCache:
    """A transformers DynamicCache holding the prefix for `batch` rows (differentiable: no copies, no detach)."""
    cache = DynamicCache()
    for layer in range(kv.shape[0]):
        k = kv[layer, 0].unsqueeze(0).expand(batch, -1, -1, -1)
        v = kv[layer, 1].unsqueeze(0).expand(batch, -1, -1, -1)
        if dtype is not None:
            k, v = k.to(dtype), v.to(dtype)
        cache.update(k, v, layer)
    return cache


def cache_to_kv(cache: Any, num_layers: int, row: int = 0) -> torch.Tensor:
    """Per-layer K/V recorded in a transformers cache → `[L, 2, K, T, D]` (float32)."""
    out = []
    for layer in range(num_layers):
        lay = cache.layers[layer]
        out.append(torch.stack([lay.keys[row], lay.values[row]]))
    return torch.stack(out).float()


def validate_kv(kv: Any, spec: ModelSpec, prefix_length: int) -> None:
    """Refuse a kv tensor that does not fit this base model (raises prefix_store.errors.InvalidPrefix)."""
    if not isinstance(kv, torch.Tensor) or not kv.is_floating_point():
        raise InvalidPrefix("prefix 'kv' must be a floating-point tensor")
    want = spec.kv_shape(prefix_length)
    if tuple(kv.shape) != want:
        raise InvalidPrefix(
            f"prefix kv has shape {list(kv.shape)}, this base model needs {list(want)} "
            "(layers, key/value, kv heads, prefix length, head dim)"
        )
    if not torch.isfinite(kv).all():
        raise InvalidPrefix("prefix kv contains NaN or infinite values")


# ------------------------------------------------------------------------------------------------ prefix-tuning
class PrefixTuningParams(nn.Module):
    """Trainable prefix-tuning parameters with the MLP reparameterization (or the direct KV when projection=False).

    State-dict names: `embedding`, `mlp.0.weight`, `mlp.0.bias`, `mlp.2.weight`, `mlp.2.bias`.
    """

    def __init__(
        self,
        spec: ModelSpec,
        prefix_length: int,
        hidden: int = 512,
        projection: bool = True,
        init_embedding: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.prefix_length = prefix_length
        self.projection = projection
        out = spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim
        if projection:
            emb = (
                init_embedding.clone().float()
                if init_embedding is not None
                else torch.randn(prefix_length, spec.hidden_size) * 0.02
            )
            self.embedding = nn.Parameter(emb)
            self.mlp = nn.Sequential(nn.Linear(spec.hidden_size, hidden), nn.Tanh(), nn.Linear(hidden, out))
        else:
            self.embedding = nn.Parameter(torch.randn(prefix_length, out) * 0.02)
            self.mlp = None

    def flat(self) -> torch.Tensor:
        return self.mlp(self.embedding) if self.mlp is not None else self.embedding

    def kv(self) -> torch.Tensor:
        return flat_to_kv(self.flat(), self.spec)


def compile_prefix_tuning(
    params: PrefixTuningParams | dict[str, torch.Tensor], spec: ModelSpec
) -> torch.Tensor:
    """Serving form of prefix-tuning parameters (a module or its state dict)."""
    if isinstance(params, dict):
        emb = params["embedding"]
        projection = "mlp.0.weight" in params
        hidden = params["mlp.0.weight"].shape[0] if projection else 512
        mod = PrefixTuningParams(spec, emb.shape[0], hidden=hidden, projection=projection)
        mod.load_state_dict({k: v.float() for k, v in params.items()})
        params = mod
    with torch.no_grad():
        return params.kv().detach().float().contiguous()


# ------------------------------------------------------------------------------------------------ propagation
def decoder_layers(hf_model: nn.Module) -> nn.ModuleList:
    for path in ("model.layers", "transformer.h"):
        obj: Any = hf_model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return obj
    raise ValueError(f"cannot find decoder layers in {type(hf_model).__name__}")


@contextlib.contextmanager
def propagation_hooks(hf_model: nn.Module, additions: torch.Tensor, prefix_len: int) -> Iterator[None]:
    """While active, `additions[l]` is added to the hidden states of the first `prefix_len` positions at the input
    of decoder layer l (differentiable). Assumes each forward starts at position 0 (training, compilation)."""
    handles = []

    def make(layer_idx: int):
        def hook(_mod, args, kwargs):
            if args:
                h, rest = args[0], args[1:]
            else:
                h, rest = kwargs["hidden_states"], ()
            if h.shape[1] < prefix_len:
                return None
            add = additions[layer_idx].to(h.dtype)
            h = torch.cat([h[:, :prefix_len] + add, h[:, prefix_len:]], dim=1)
            if args:
                return (h, *rest), kwargs
            return args, {**kwargs, "hidden_states": h}

        return hook

    for i, layer in enumerate(decoder_layers(hf_model)):
        handles.append(layer.register_forward_pre_hook(make(i), with_kwargs=True))
    try:
        yield
    finally:
        for hd in handles:
            hd.remove()


def prefix_forward(
    hf_model: nn.Module,
    inputs_embeds: torch.Tensor,
    additions: torch.Tensor | None,
    prefix_len: int,
    **kwargs: Any,
) -> Any:
    """Forward with the prefix positions first (zero/soft embeddings) and, for propagation, the per-layer additions."""
    ctx = (
        propagation_hooks(hf_model, additions, prefix_len)
        if additions is not None
        else contextlib.nullcontext()
    )
    with ctx:
        return hf_model(inputs_embeds=inputs_embeds, **kwargs)


def _record_kv(
    bundle: ModelBundle, inputs_embeds: torch.Tensor, additions: torch.Tensor | None
) -> torch.Tensor:
    m = bundle.hf_model
    p = inputs_embeds.shape[0]
    dev = next(m.parameters()).device
    dtype = next(m.parameters()).dtype
    with torch.no_grad():
        out = prefix_forward(
            m,
            inputs_embeds[None].to(dev, dtype),
            additions.to(dev) if additions is not None else None,
            p,
            position_ids=torch.arange(p, device=dev)[None],
            attention_mask=torch.ones(1, p, dtype=torch.long, device=dev),
            past_key_values=DynamicCache(),
            use_cache=True,
        )
    return cache_to_kv(out.past_key_values, bundle.spec.num_layers).cpu().contiguous()


def compile_propagation(bundle: ModelBundle, additions: torch.Tensor) -> torch.Tensor:
    """Run the frozen model once over P zero-embedded positions with the additions and record each layer's K/V."""
    layers, p, h = additions.shape
    if layers != bundle.spec.num_layers or h != bundle.spec.hidden_size:
        raise InvalidPrefix(
            f"additions {list(additions.shape)} do not fit the model (L={bundle.spec.num_layers}, H={h})"
        )
    return _record_kv(bundle, torch.zeros(p, h), additions)


def compile_prompt_tuning(bundle: ModelBundle, soft_prompt: torch.Tensor) -> torch.Tensor:
    """Run the frozen model once over the soft prompt and record each layer's K/V."""
    if soft_prompt.dim() != 2 or soft_prompt.shape[1] != bundle.spec.hidden_size:
        raise InvalidPrefix(
            f"soft prompt {list(soft_prompt.shape)} does not fit hidden size {bundle.spec.hidden_size}"
        )
    return _record_kv(bundle, soft_prompt, None)


def compile_record(bundle: ModelBundle, kind: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Serving kv from the trained tensors of any kind."""
    if kind == "prefix_tuning":
        return compile_prefix_tuning(
            {k: v for k, v in tensors.items() if k == "embedding" or k.startswith("mlp.")}, bundle.spec
        )
    if kind == "prefix_propagation":
        return compile_propagation(bundle, tensors["additions"])
    if kind == "prompt_tuning":
        return compile_prompt_tuning(bundle, tensors["soft_prompt"])
    raise ValueError(f"unknown prefix kind {kind!r}: expected one of {', '.join(KINDS)}")
