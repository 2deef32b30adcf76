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
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from prefix_store.errors import InvalidPrefix, PrefixValuesOutOfRange
from prefix_store.format import check_kv_values, check_tensor_dtype
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


def kv_to_past_key_values(
    kv: torch.Tensor,
    batch: int = 1,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> DynamicCache:
    """A transformers `DynamicCache` holding the prefix `kv [L, 2, K, P, D]` for `batch` rows.

    Feed it as `past_key_values` with an attention mask of `P + T` ones; the prompt then starts at position P.
    Differentiable (no detach): gradients reach `kv` (prefix-tuning training). The cache copies on first update.
    """
    if kv.dim() != 5 or kv.shape[1] != 2:
        raise InvalidPrefix(f"prefix kv must be [L, 2, K, P, D], got {list(kv.shape)}")
    cache = DynamicCache()
    for layer in range(kv.shape[0]):
        k = kv[layer, 0].unsqueeze(0).expand(batch, -1, -1, -1)
        v = kv[layer, 1].unsqueeze(0).expand(batch, -1, -1, -1)
        if dtype is not None or device is not None:
            k, v = k.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype)
        cache.update(k, v, layer)
    return cache


def kv_to_cache(kv: torch.Tensor, batch: int = 1, dtype: torch.dtype | None = None) -> DynamicCache:
    """Alias of `kv_to_past_key_values` (kept for callers of the first version)."""
    return kv_to_past_key_values(kv, batch=batch, dtype=dtype)


def cache_to_kv(cache: Any, num_layers: int, row: int = 0) -> torch.Tensor:
    """Per-layer K/V recorded in a transformers cache → `[L, 2, K, T, D]` (float32)."""
    out = []
    for layer in range(num_layers):
        lay = cache.layers[layer]
        out.append(torch.stack([lay.keys[row], lay.values[row]]))
    return torch.stack(out).float()


# the largest entry of a trained tensor (soft prompt, propagation additions, prefix-tuning embedding / MLP weights)
# taken from elsewhere or compiled. Training with the largest learning rate accepted (10) makes propagation
# additions of ~8e3 within 60 steps (they are scaled by each layer's hidden-state RMS); far larger ones mean nothing
# more (the model normalizes its hidden states) until, past ~1e18, the norm's float32 sum of squares overflows,
# rsqrt(inf) = 0 and the prefix compiles to an all-zero kv that passes every check on the kv
MAX_TRAINED_ABS = 1e6


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise PrefixValuesOutOfRange(f"{what} contains NaN or infinite values")


def check_trained_values(t: torch.Tensor, what: str) -> None:
    """Refuse a trained tensor that is not floating-point, not finite or over MAX_TRAINED_ABS (InvalidPrefix)."""
    check_tensor_dtype(what, t)
    if not t.numel():
        return
    _check_finite(t, f"tensor {what!r}")
    biggest = float(t.abs().max())
    if biggest > MAX_TRAINED_ABS:
        raise PrefixValuesOutOfRange(
            f"tensor {what!r} holds values up to {biggest:.3g}; at most {MAX_TRAINED_ABS:g} in magnitude is accepted"
        )


def validate_kv(kv: Any, spec: ModelSpec, prefix_length: int) -> None:
    """Refuse a kv tensor that does not fit this base model, or whose values the store would refuse (dtype,
    non-finite, over prefix_store.format.MAX_KV_ABS; raises prefix_store.errors.InvalidPrefix)."""
    if not isinstance(kv, torch.Tensor):
        raise InvalidPrefix("prefix 'kv' must be a floating-point tensor")
    check_tensor_dtype("kv", kv)
    want = spec.kv_shape(prefix_length)
    if tuple(kv.shape) != want:
        raise InvalidPrefix(
            f"prefix kv has shape {list(kv.shape)}, this base model needs {list(want)} "
            "(layers, key/value, kv heads, prefix length, head dim)"
        )
    check_kv_values(kv)


# ------------------------------------------------------------------------------------------------ prefix-tuning
class PrefixTuningParams(nn.Module):
    """Trainable prefix-tuning parameters with the MLP reparameterization (or the direct KV when projection=False).

    projection=True: `embedding [P, E]` → Linear(E→hidden) → tanh → Linear(hidden→L·2·K·D); E defaults to the
    model's hidden size H (Li & Liang). PEFT uses E = K·D (its `token_dim`, smaller than H under grouped-query
    attention), so imported PEFT encoders keep their own E. projection=False: `embedding [P, L·2·K·D]` is the prefix.
    State-dict names: `embedding`, `mlp.0.weight`, `mlp.0.bias`, `mlp.2.weight`, `mlp.2.bias`.
    """

    def __init__(
        self,
        spec: ModelSpec,
        prefix_length: int,
        hidden: int = 512,
        projection: bool = True,
        init_embedding: torch.Tensor | None = None,
        embed_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.prefix_length = prefix_length
        self.projection = projection
        out = spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim
        width = (embed_dim or spec.hidden_size) if projection else out
        if init_embedding is not None:
            if tuple(init_embedding.shape) != (prefix_length, width):
                raise ValueError(
                    f"init_embedding must be [{prefix_length}, {width}], got {list(init_embedding.shape)}"
                )
            emb = init_embedding.detach().clone().float()
        else:
            emb = torch.randn(prefix_length, width) * 0.02
        self.embedding = nn.Parameter(emb)
        self.mlp: nn.Sequential | None
        if projection:
            self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, out))
        else:
            self.mlp = None

    def flat(self) -> torch.Tensor:
        return self.mlp(self.embedding) if self.mlp is not None else self.embedding

    def linears(self) -> tuple[nn.Linear, nn.Linear]:
        """The MLP's input and output layers (a module made with `projection`)."""
        assert self.mlp is not None, "no MLP: made without projection"
        first, last = self.mlp[0], self.mlp[2]
        assert isinstance(first, nn.Linear) and isinstance(last, nn.Linear)
        return first, last

    def kv(self) -> torch.Tensor:
        return flat_to_kv(self.flat(), self.spec)


def prefix_tuning_shapes(tensors: dict[str, torch.Tensor], out: int) -> tuple[int, bool]:
    """Check a prefix-tuning state dict's shapes for a model whose prefix KV has `out` (L·2·K·D) values a position
    (`embedding [P, E]`, with the MLP `mlp.0.weight [h, E]`, `mlp.0.bias [h]`, `mlp.2.weight [out, h]`,
    `mlp.2.bias [out]`; without it `embedding [P, out]`); returns (h, projection). Raises InvalidPrefix.

    Every shape is checked before anything is built from them: a module allocates what they say (a 1 KB file
    declaring an MLP [3e6, 0] made the server allocate gigabytes, or fail with a 500, before load_state_dict
    refused the tensors). Needs no model: `prefixserve prefixes import` checks a record with it too."""
    if "embedding" not in tensors:
        raise InvalidPrefix(f"prefix-tuning tensors need 'embedding' (got {', '.join(sorted(tensors))})")
    emb = tensors["embedding"]
    if emb.dim() != 2 or emb.shape[0] < 1 or emb.shape[1] < 1:
        raise InvalidPrefix(f"prefix-tuning embedding must be [P, E], got {list(emb.shape)}")
    if "mlp.0.weight" not in tensors:
        stray = sorted(k for k in tensors if k.startswith("mlp."))
        if stray:
            raise InvalidPrefix(
                f"prefix-tuning tensors {stray} without 'mlp.0.weight': an MLP needs all four"
            )
        if emb.shape[1] != out:
            raise InvalidPrefix(
                f"prefix-tuning tensors do not fit this base model: an embedding without an MLP is the prefix "
                f"itself, [P, {out}], got {list(emb.shape)}"
            )
        return 1, False
    w0 = tensors["mlp.0.weight"]
    hidden = w0.shape[0] if w0.dim() == 2 else 0
    want = {
        "mlp.0.weight": (hidden, emb.shape[1]),
        "mlp.0.bias": (hidden,),
        "mlp.2.weight": (out, hidden),
        "mlp.2.bias": (out,),
    }
    for key, shape in want.items():
        got = tensors.get(key)
        if got is None or tuple(got.shape) != shape or hidden < 1:
            raise InvalidPrefix(
                f"prefix-tuning tensors do not fit this base model: {key!r} must be "
                f"{list(shape) if hidden >= 1 else '[width >= 1, E]'} (embedding [P, {emb.shape[1]}], an MLP of "
                f"width {hidden}, out {out}), got " + (f"{list(got.shape)}" if got is not None else "none")
            )
    return hidden, True


def prefix_tuning_params(tensors: dict[str, torch.Tensor], spec: ModelSpec) -> PrefixTuningParams:
    """The module of a prefix-tuning state dict (`embedding` and, with the MLP, `mlp.0.weight`, `mlp.0.bias`,
    `mlp.2.weight`, `mlp.2.bias`: `PREFIX_TUNING_KEYS`). Raises InvalidPrefix if they do not fit."""
    out = spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim
    hidden, projection = prefix_tuning_shapes(tensors, out)
    emb = tensors["embedding"]
    mod = PrefixTuningParams(
        spec,
        emb.shape[0],
        hidden=hidden,
        projection=projection,
        embed_dim=emb.shape[1] if projection else None,
    )
    try:
        mod.load_state_dict({k: v.detach().float() for k, v in tensors.items()})
    except RuntimeError as e:
        raise InvalidPrefix(f"prefix-tuning tensors do not fit this base model: {e}") from None
    return mod


PREFIX_TUNING_KEYS = ("embedding", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias")
# what a stored version must hold to continue training from it (its trained tensors, not just the served kv)
TRAINED_KEYS: dict[str, tuple[str, ...]] = {
    "prefix_tuning": PREFIX_TUNING_KEYS,
    "prefix_propagation": ("additions",),
    "prompt_tuning": ("soft_prompt",),
}


def check_trained_names_and_shapes(kind: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What `check_trained_tensors` checks without a base model (`prefixserve prefixes import`): the tensors
    besides `kv` are the kind's trained tensors, with finite values in range, and a prefix-tuning MLP's shapes agree
    with each other and with the `kv` beside them. Returns the trained tensors; raises InvalidPrefix."""
    trained_keys = TRAINED_KEYS.get(kind, ())
    odd = sorted(set(tensors) - {"kv", *trained_keys})
    if odd:
        raise InvalidPrefix(
            f"unexpected tensors {odd} in a {kind} prefix (it holds 'kv' and may hold {', '.join(trained_keys)})"
        )
    trained = {k: tensors[k] for k in trained_keys if k in tensors}
    for key, t in trained.items():
        check_trained_values(t, key)  # they seed init_from training
    kv = tensors.get("kv")
    if kind == "prefix_tuning" and trained and isinstance(kv, torch.Tensor) and kv.dim() == 5:
        prefix_tuning_shapes(trained, kv.shape[0] * 2 * kv.shape[2] * kv.shape[4])
    return trained


def check_trained_tensors(kind: str, tensors: dict[str, torch.Tensor], spec: ModelSpec) -> None:
    """Raise InvalidPrefix unless the tensors besides `kv` are the kind's trained tensors (`TRAINED_KEYS`: what
    `init_from` continues from), floating-point and fitting this base model. A record made elsewhere (an upload)
    carries nothing else."""
    trained = check_trained_names_and_shapes(kind, tensors)
    if kind == "prefix_tuning" and trained:
        prefix_tuning_params(trained, spec)
        return
    for key, t in trained.items():  # additions [L, P, H], soft_prompt [P, H]: L and P are checked with the kv
        if t.shape[-1] != spec.hidden_size:
            raise InvalidPrefix(
                f"tensor {key!r} of shape {list(t.shape)} does not fit this base model (hidden size "
                f"{spec.hidden_size})"
            )


def compile_prefix_tuning(
    params: PrefixTuningParams | dict[str, torch.Tensor], spec: ModelSpec
) -> torch.Tensor:
    """Serving form of prefix-tuning parameters: a `PrefixTuningParams` or its state dict (`embedding` and, with
    the MLP, `mlp.0.weight`, `mlp.0.bias`, `mlp.2.weight`, `mlp.2.bias`). Raises InvalidPrefix if they do not fit."""
    if isinstance(params, dict):
        params = prefix_tuning_params(params, spec)
    with torch.no_grad():
        kv = params.kv().detach().float().contiguous()
    validate_kv(kv, spec, kv.shape[3])
    return kv


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
    # other families: the first module list with one entry per hidden layer (model.decoder.layers, gpt_neox.layers)
    n = getattr(hf_model.config, "num_hidden_layers", None)
    for mod in hf_model.modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            return mod
    raise ValueError(f"cannot find decoder layers in {type(hf_model).__name__}")


@contextlib.contextmanager
def propagation_hooks(hf_model: nn.Module, additions: torch.Tensor, prefix_len: int) -> Iterator[None]:
    """While active, `additions[l]` (`additions [L, P, H]`) is added to the hidden states of the prefix positions
    at the input of decoder layer l; differentiable, so training can use it.

    The prefix positions are the tokens whose position id is `< prefix_len` (position ids reach every decoder
    layer of Llama-family and GPT-2 models in transformers 5): with the usual position ids `0..T-1` that is
    `hidden_states[:, :P]`; a later forward that continues from a cache (positions >= P) gets nothing added. If a
    layer receives no position ids, the first `prefix_len` positions of a forward at least that long get it.

    Thread-local: the hooks act only in the thread that entered the context, so a training thread (or a compile)
    never changes forwards that other threads run on the shared frozen model at the same time.
    """
    layers = decoder_layers(hf_model)
    if additions.dim() != 3 or additions.shape[0] != len(layers) or additions.shape[1] != prefix_len:
        raise ValueError(
            f"additions must be [L={len(layers)}, P={prefix_len}, H], got {list(additions.shape)}"
        )
    owner = threading.get_ident()
    handles = []

    def make(layer_idx: int):
        def hook(_mod, args, kwargs):
            if threading.get_ident() != owner:
                return None
            if args:
                h, rest = args[0], args[1:]
            else:
                h, rest = kwargs["hidden_states"], ()
            add = additions[layer_idx].to(device=h.device, dtype=h.dtype)  # [P, H]
            pos = kwargs.get("position_ids")
            if pos is not None:
                pos = pos.to(h.device)
                in_prefix = (pos >= 0) & (pos < prefix_len)  # [1 or B, T]; no .any(): avoids a device sync
                delta = add[pos.clamp(0, prefix_len - 1)] * in_prefix.unsqueeze(-1).to(h.dtype)
                h = h + delta
            else:
                if h.shape[1] < prefix_len:
                    return None
                h = torch.cat([h[:, :prefix_len] + add, h[:, prefix_len:]], dim=1)
            if args:
                return (h, *rest), kwargs
            return args, {**kwargs, "hidden_states": h}

        return hook

    for i, layer in enumerate(layers):
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


class PrefixTooLongForModel(ValueError):
    """A prefix with no room left for a prompt in the base model's positions."""


def check_fits_model(p: int, spec: Any) -> None:
    """A prefix must leave at least one of the model's positions for the prompt (and a learned-position model has no
    position past its table to compile one at)."""
    if p >= spec.max_positions:
        raise PrefixTooLongForModel(
            f"prefix of {p} positions leaves no room for a prompt: this base model has {spec.max_positions} positions"
        )


def _record_kv(
    bundle: ModelBundle, inputs_embeds: torch.Tensor, additions: torch.Tensor | None
) -> torch.Tensor:
    m = bundle.hf_model
    p = inputs_embeds.shape[0]
    check_fits_model(p, bundle.spec)
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
    kv = cache_to_kv(out.past_key_values, bundle.spec.num_layers).cpu().contiguous()
    _check_finite(kv, "the compiled kv (the base model's forward overflowed)")
    return kv


def compile_propagation(bundle: ModelBundle, additions: torch.Tensor) -> torch.Tensor:
    """Run the frozen model once over P zero-embedded positions with the additions and record each layer's K/V."""
    sp = bundle.spec
    if additions.dim() != 3 or additions.shape[0] != sp.num_layers or additions.shape[2] != sp.hidden_size:
        raise InvalidPrefix(
            f"additions {list(additions.shape)} do not fit this base model: need [L={sp.num_layers}, P, "
            f"H={sp.hidden_size}]"
        )
    if additions.shape[1] < 1:
        raise InvalidPrefix("prefix length must be at least 1")
    check_trained_values(additions, "additions")
    return _record_kv(bundle, torch.zeros(additions.shape[1], sp.hidden_size), additions.float())


def compile_prompt_tuning(bundle: ModelBundle, soft_prompt: torch.Tensor) -> torch.Tensor:
    """Run the frozen model once over the soft prompt and record each layer's K/V."""
    if soft_prompt.dim() != 2 or soft_prompt.shape[1] != bundle.spec.hidden_size or soft_prompt.shape[0] < 1:
        raise InvalidPrefix(
            f"soft prompt {list(soft_prompt.shape)} does not fit this base model: need [P, H={bundle.spec.hidden_size}]"
        )
    check_trained_values(soft_prompt, "soft_prompt")
    return _record_kv(bundle, soft_prompt.float(), None)


def compile_record(bundle: ModelBundle, kind: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Serving kv from the trained tensors of any kind."""
    if kind == "prefix_tuning":
        if "embedding" not in tensors and "kv" in tensors:  # imported from PEFT: the kv is the parameter
            return tensors["kv"].float().contiguous()
        return compile_prefix_tuning(
            {k: v for k, v in tensors.items() if k == "embedding" or k.startswith("mlp.")}, bundle.spec
        )
    if kind == "prefix_propagation":
        return compile_propagation(bundle, tensors["additions"])
    if kind == "prompt_tuning":
        return compile_prompt_tuning(bundle, tensors["soft_prompt"])
    raise ValueError(f"unknown prefix kind {kind!r}: expected one of {', '.join(KINDS)}")
