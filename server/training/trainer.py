"""Fit a prefix (prefix-tuning, prefix-propagation or prompt tuning) against the frozen base model.

Every method trains the way it is served (docs/ARCHITECTURE.md): the prefix occupies positions ``0..P-1`` and the
prompt starts at position ``P``; the prompt is rendered by ``server.model.render_prompt`` (the function the server
uses) and the completion is appended with the tokenizer's eos so the model learns to stop. The loss is the mean
cross-entropy over completion tokens (prompt and padding masked); logits are computed for those positions only.

- ``prefix_tuning``: ``PrefixTuningParams`` (embedding ``[P,H]`` -> MLP -> ``[L,2,K,P,D]``) fed as
  ``past_key_values`` (a DynamicCache holding the differentiable KV); attention mask ``P+T``; positions from ``P``.
- ``prefix_propagation``: additions ``[L,P,H]`` added to the P prefix positions' hidden states at the input of every
  layer (forward pre-hooks); input = P zero embeddings + the prompt embeddings, positions ``0..P+T-1``.
- ``prompt_tuning``: a soft prompt ``[P,H]`` in front of the prompt embeddings.

Initialization (``init="text"``, the default): every method starts from the KV of real text, so at step 0 the model
behaves like the base model reading a short preamble, instead of attending to random keys. The text is the
training prompts' own tokens (cycled to P). Prompt tuning's soft prompt and propagation's layer-0 additions are
those tokens' embeddings (later layers' additions start at 0); prefix-tuning's embedding is those embeddings and the
MLP's output bias is set so that the MLP's initial output is exactly the recorded KV of that text. ``init="random"``
gives the classic inits (PEFT's N(0,1) embedding, small random additions/soft prompt).

Optimizer: AdamW on the prefix parameters only (the base model is frozen and never written), linear warmup then
linear decay, gradient clipping, mini-batches (right padding), an optional held-out split (>= 16 examples), all
randomness from one seeded generator (same seed, same threads -> identical tensors).

Threads: ``num_threads`` bounds the intra-op threads of the calling thread only (PyTorch's OpenMP backend keeps the
setting per OS thread). The job manager runs each job on its own thread, so training uses ``num_threads`` cores and
the server's engine thread keeps its own setting. With a non-OpenMP build the setting would be process-wide; run
heavy training in a separate worker process then (``prefixserve worker``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from prefix_store.errors import InvalidPrefix, PrefixValuesOutOfRange
from prefix_store.format import check_kv_values
from server.model import default_prompt_format
from server.prefixes import (
    PREFIX_TUNING_KEYS,
    PrefixTuningParams,
    compile_prefix_tuning,
    compile_prompt_tuning,
    compile_propagation,
    kv_to_flat,
    kv_to_past_key_values,
    prefix_tuning_params,
    propagation_hooks,
)
from server.prefixes.kinds import check_trained_values
from server.training.config import (
    MIN_EXAMPLES_FOR_EVAL,
    Hyperparameters,
    TrainingCancelled,
    TrainingLimits,
    TrainingValidationError,
    check_examples,
    check_method,
    check_prefix_length,
    resolve_hyperparameters,
)
from server.training.data import IGNORE, Batch, EncodedExample, collate, encode_examples, pad_token_id

log = logging.getLogger("prefixserve.training")

ProgressCallback = Callable[[int, int, float, int], None]  # (step, total_steps, loss, epoch)
MAX_CURVE_POINTS = 200
PROGRESS_LOG_S = 60.0  # a long training says how far it got this often (INFO)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite, or the trained prefix holds values the store refuses."""


@dataclass
class TrainResult:
    tensors: dict[str, torch.Tensor]  # "kv" [L,2,K,P,D] float32 + the trained tensors of the method
    summary: dict[str, Any]
    prompt_format: str


# ------------------------------------------------------------------------------------------------ model plumbing
def _base_model(hf_model: nn.Module) -> nn.Module:
    base = getattr(hf_model, "base_model", None)
    if base is None or base is hf_model:
        raise ValueError(f"cannot find the decoder of {type(hf_model).__name__}")
    return base


def _model_dtype(bundle: Any) -> torch.dtype:
    return next(bundle.hf_model.parameters()).dtype


def _model_device(bundle: Any) -> torch.device:
    return next(bundle.hf_model.parameters()).device


def _text_init_ids(bundle: Any, examples: list[dict[str, str]], prefix_length: int) -> list[int]:
    """P token ids of real text for the "text" init: the training prompts' tokens, cycled."""
    tok = bundle.tokenizer
    ids: list[int] = []
    for ex in examples:
        ids.extend(tok(ex["prompt"] + "\n", add_special_tokens=False)["input_ids"])
        if len(ids) >= prefix_length:
            break
    if not ids:
        ids = list(tok("\n", add_special_tokens=False)["input_ids"]) or [0]
    return [int(ids[i % len(ids)]) for i in range(prefix_length)]


def _token_embeddings(bundle: Any, ids: list[int]) -> torch.Tensor:
    emb = bundle.hf_model.get_input_embeddings()
    with torch.no_grad():
        return emb(torch.tensor(ids, device=_model_device(bundle))).float().cpu().clone()


def _fit_output_layer(mod: PrefixTuningParams, target: torch.Tensor) -> None:
    """Set the MLP's output layer so that its output for the initial embedding is (nearly) ``target [P, out]``:
    bias = mean over positions, weight = ridge least squares on the tanh activations (exact when hidden >= P)."""
    assert mod.mlp is not None  # (made with projection)
    _, last = mod.linears()
    with torch.no_grad():
        z = mod.mlp[1](mod.mlp[0](mod.embedding)).double()  # [P, h]
        bias = target.double().mean(0)
        resid = target.double() - bias
        # min-norm least squares (ridge in its dual form: a P x P system)
        gram = z @ z.T
        lam = 1e-8 * float(gram.diagonal().mean()) + 1e-12
        eye = torch.eye(gram.shape[0], dtype=gram.dtype)
        w = z.T @ torch.linalg.solve(gram + lam * eye, resid)  # [h, out]
        last.weight.copy_(w.T.float())
        last.bias.copy_(bias.float())


# ------------------------------------------------------------------------------------------------ methods
def _cache_of(layers_kv: list[tuple[torch.Tensor, torch.Tensor]], batch: int) -> DynamicCache:
    """A DynamicCache holding per-layer (K, V) `[1, K, S, D]` expanded to `batch` rows (no copy, differentiable)."""
    cache = DynamicCache()
    for i, (k, v) in enumerate(layers_kv):
        cache.update(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1), i)
    return cache


def _cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(lay.keys, lay.values) for lay in cache.layers]


class _Method:
    """One prefix kind: its trainable tensors, the differentiable prefix KV they produce, and the loss.

    The fast training forward (``hidden``) exploits causality twice, exactly (tests compare it with the literal
    per-row forward of ``literal_hidden``): (1) the P prefix positions never see the prompt, so their KV is computed
    once per step (batch 1) and shared by every row; (2) the tokens every row of the mini-batch starts with (for a
    chat model: the template's system preamble) see only the prefix and themselves, so they also run once with
    batch 1 and are shared. Only the rest of each row runs batched.
    """

    kind: str

    def __init__(self, bundle: Any, prefix_length: int, hp: Hyperparameters, init_ids: list[int],
                 gen: torch.Generator) -> None:  # fmt: skip
        self.bundle = bundle
        self.P = prefix_length
        self.hp = hp
        self.device = _model_device(bundle)
        self.dtype = _model_dtype(bundle)
        self.base = _base_model(bundle.hf_model)
        self.embed = bundle.hf_model.get_input_embeddings()
        self.lm_head = bundle.hf_model.get_output_embeddings()

    # -- per kind
    def parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def prefix_cache(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer prefix (K, V) `[1, K, P, D]` in the model dtype, differentiable w.r.t. the parameters."""
        raise NotImplementedError

    def literal_hidden(self, batch: Batch) -> torch.Tensor:
        """Reference forward as the method is defined (every row runs the prefix positions itself)."""
        raise NotImplementedError

    def trained_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def warm_start(self, tensors: dict[str, torch.Tensor]) -> None:
        """Start from a stored version's trained tensors (`trained_tensors()` of an earlier run) instead of the
        init; raises TrainingValidationError if they are missing or do not fit."""
        raise NotImplementedError

    def _stored(self, tensors: dict[str, torch.Tensor], key: str, shape: tuple[int, ...]) -> torch.Tensor:
        t = tensors.get(key)
        if t is None:
            raise TrainingValidationError(
                f"init_from: that version has no {key!r} tensor to continue from (only {', '.join(sorted(tensors))})",
                param="init_from",
            )
        if tuple(t.shape) != shape:
            raise TrainingValidationError(
                f"init_from: its {key!r} is {list(t.shape)}, this job needs {list(shape)}", param="init_from"
            )
        return t.detach().float().to(self.device).clone()

    def compile(self) -> torch.Tensor:
        """Serving kv ``[L, 2, K, P, D]`` through the ``server.prefixes`` compile function of the kind."""
        raise NotImplementedError

    # -- shared
    def _ones(self, b: int, n: int) -> torch.Tensor:
        return torch.ones(b, n, dtype=torch.long, device=self.device)

    def _positions(self, b: int, start: int, stop: int) -> torch.Tensor:
        return torch.arange(start, stop, device=self.device)[None].expand(b, -1)

    def _prefix_forward(self, inputs_embeds: torch.Tensor, additions: torch.Tensor | None) -> Any:
        """Batch-1 forward over the P prefix positions (positions 0..P-1), recording their KV."""
        ctx = (
            propagation_hooks(self.bundle.hf_model, additions, self.P)
            if additions is not None
            else contextlib.nullcontext()
        )
        with ctx:
            return self.base(
                inputs_embeds=inputs_embeds[None].to(self.dtype),
                attention_mask=self._ones(1, self.P),
                position_ids=self._positions(1, 0, self.P),
                past_key_values=DynamicCache(),
                use_cache=True,
            )

    def hidden(self, batch: Batch) -> tuple[torch.Tensor, int]:
        """Final hidden states of positions ``c..T-1`` of the batch ``[B, T-c, H]`` and ``c``."""
        b, t = batch.input_ids.shape
        layers = self.prefix_cache()
        c = batch.common
        if c > 0:
            out = self.base(
                input_ids=batch.input_ids[:1, :c],
                attention_mask=self._ones(1, self.P + c),
                position_ids=self._positions(1, self.P, self.P + c),
                past_key_values=_cache_of(layers, 1),
                use_cache=True,
            )
            layers = _cache_layers(out.past_key_values)
        out = self.base(
            input_ids=batch.input_ids[:, c:],
            attention_mask=torch.cat([self._ones(b, self.P + c), batch.attention_mask[:, c:]], dim=1),
            position_ids=self._positions(b, self.P + c, self.P + t),
            past_key_values=_cache_of(layers, b),
            use_cache=True,
        )
        return out.last_hidden_state, c

    def _loss_from(self, h: torch.Tensor, c: int, batch: Batch) -> tuple[torch.Tensor, int]:
        tgt = batch.labels[:, c + 1 :]
        sel = tgt != IGNORE
        logits = self.lm_head(h[:, :-1][sel]).float()
        return F.cross_entropy(logits, tgt[sel], reduction="sum"), int(sel.sum())

    def loss_sum(self, batch: Batch) -> tuple[torch.Tensor, int]:
        """Summed cross-entropy over the completion tokens of ``batch`` and their count."""
        h, c = self.hidden(batch)
        return self._loss_from(h, c, batch)

    def literal_loss_sum(self, batch: Batch) -> tuple[torch.Tensor, int]:
        return self._loss_from(self.literal_hidden(batch), 0, batch)


class _PrefixTuning(_Method):
    kind = "prefix_tuning"

    def __init__(self, bundle, prefix_length, hp, init_ids, gen) -> None:
        super().__init__(bundle, prefix_length, hp, init_ids, gen)
        spec = bundle.spec
        # The embedding is only the MLP's input code: PEFT's N(0, 1) (distinct rows, so the fit below is exact).
        emb = torch.randn(prefix_length, spec.hidden_size, generator=gen)
        mod = PrefixTuningParams(
            spec, prefix_length, hidden=hp.mlp_hidden, projection=True, init_embedding=emb
        )
        with torch.no_grad():  # nn.Linear's default init, but from our seeded generator
            for lin in mod.linears():
                bound = 1.0 / math.sqrt(lin.in_features)
                lin.weight.uniform_(-bound, bound, generator=gen)
                lin.bias.uniform_(-bound, bound, generator=gen)
            if hp.init == "text":  # output layer solved so that the initial KV is the real text's KV
                real = compile_prompt_tuning(bundle, _token_embeddings(bundle, init_ids))
                _fit_output_layer(mod, kv_to_flat(real))
        self.mod = mod.to(self.device)

    def parameters(self):
        return list(self.mod.parameters())

    def prefix_cache(self):
        kv = self.mod.kv().to(self.dtype)  # [L, 2, K, P, D]
        return [(kv[i, 0][None], kv[i, 1][None]) for i in range(kv.shape[0])]

    def literal_hidden(self, batch: Batch) -> torch.Tensor:
        b, t = batch.input_ids.shape
        out = self.base(
            input_ids=batch.input_ids,
            attention_mask=torch.cat([self._ones(b, self.P), batch.attention_mask], dim=1),
            position_ids=self._positions(b, self.P, self.P + t),
            past_key_values=kv_to_past_key_values(self.mod.kv(), batch=b, dtype=self.dtype),
            use_cache=True,
        )
        return out.last_hidden_state

    def trained_tensors(self):
        return {k: v.detach().float().cpu().contiguous() for k, v in self.mod.state_dict().items()}

    def warm_start(self, tensors):
        missing = [k for k in PREFIX_TUNING_KEYS if k not in tensors]
        if missing:
            raise TrainingValidationError(
                f"init_from: that version has no MLP to continue training (missing {', '.join(missing)}; a prefix "
                "imported from PEFT holds only its kv)",
                param="init_from",
            )
        try:
            mod = prefix_tuning_params({k: tensors[k] for k in PREFIX_TUNING_KEYS}, self.bundle.spec)
        except InvalidPrefix as e:
            raise TrainingValidationError(f"init_from: {e}", param="init_from") from None
        if mod.prefix_length != self.P:
            raise TrainingValidationError(
                f"init_from: that version has {mod.prefix_length} positions, this job {self.P}",
                param="init_from",
            )
        self.mod = mod.to(self.device)

    def compile(self):
        return compile_prefix_tuning(self.trained_tensors(), self.bundle.spec).cpu().contiguous()


def _layer_rms(bundle: Any, ids: list[int]) -> torch.Tensor:
    """Typical RMS of the hidden states at the input of every decoder layer `[L]`, measured on real text (the
    median over its positions, the first one excluded: it is the attention sink with outsized activations)."""
    base = _base_model(bundle.hf_model)
    with torch.no_grad():
        out = base(input_ids=torch.tensor([ids], device=_model_device(bundle)), output_hidden_states=True)
    hs = out.hidden_states[: bundle.spec.num_layers]
    rms = torch.stack([h[0].float().pow(2).mean(-1).sqrt() for h in hs])  # [L, n]
    if rms.shape[1] > 1:
        rms = rms[:, 1:]
    return rms.median(dim=1).values.clamp_min(1e-6).cpu()


class _Propagation(_Method):
    """additions = raw * scale[l]: with ``rms_scale`` each layer's additions are parameterized relative to that
    layer's hidden-state RMS (which grows ~200x from the embeddings to the last layer in SmolLM2), so one learning
    rate moves every layer by the same relative amount under Adam; the stored tensor is the product."""

    kind = "prefix_propagation"

    def __init__(self, bundle, prefix_length, hp, init_ids, gen) -> None:
        super().__init__(bundle, prefix_length, hp, init_ids, gen)
        spec = bundle.spec
        scale = _layer_rms(bundle, init_ids) if hp.rms_scale else torch.ones(spec.num_layers)
        self.scale = scale[:, None, None].to(self.device)
        add = torch.zeros(spec.num_layers, prefix_length, spec.hidden_size)
        if hp.init == "text":  # layer 0 sees real token embeddings, deeper layers start at +0
            add[0] = _token_embeddings(bundle, init_ids)
        else:
            add.normal_(0.0, 0.02, generator=gen)
        self.raw = nn.Parameter((add.to(self.device) / self.scale).contiguous())

    @property
    def additions(self) -> torch.Tensor:
        return self.raw * self.scale

    def parameters(self):
        return [self.raw]

    def prefix_cache(self):
        zeros = torch.zeros(self.P, self.raw.shape[-1], device=self.device)
        return _cache_layers(self._prefix_forward(zeros, self.additions).past_key_values)

    def literal_hidden(self, batch: Batch) -> torch.Tensor:
        b, t = batch.input_ids.shape
        tok = self.embed(batch.input_ids)
        zeros = torch.zeros(b, self.P, tok.shape[-1], dtype=tok.dtype, device=self.device)
        with propagation_hooks(self.bundle.hf_model, self.additions, self.P):
            out = self.base(
                inputs_embeds=torch.cat([zeros, tok], dim=1),
                attention_mask=torch.cat([self._ones(b, self.P), batch.attention_mask], dim=1),
                position_ids=self._positions(b, 0, self.P + t),
                use_cache=False,
            )
        return out.last_hidden_state[:, self.P :]

    def trained_tensors(self):
        return {"additions": self.additions.detach().float().cpu().contiguous()}

    def warm_start(self, tensors):
        add = self._stored(tensors, "additions", tuple(self.raw.shape))
        self.raw = nn.Parameter((add / self.scale).contiguous())

    def compile(self):
        return compile_propagation(self.bundle, self.trained_tensors()["additions"]).contiguous()


class _PromptTuning(_Method):
    """A soft prompt ``[P, H]`` at the input (the classic absolute learning rate: one layer, one scale)."""

    kind = "prompt_tuning"

    def __init__(self, bundle, prefix_length, hp, init_ids, gen) -> None:
        super().__init__(bundle, prefix_length, hp, init_ids, gen)
        if hp.init == "text":  # Lester et al.: initialise from vocabulary embeddings
            sp = _token_embeddings(bundle, init_ids)
        else:
            std = float(self.embed.weight.float().std())
            sp = torch.randn(prefix_length, bundle.spec.hidden_size, generator=gen) * std
        self.scale = 1.0
        self.raw = nn.Parameter(sp.to(self.device))

    @property
    def soft_prompt(self) -> torch.Tensor:
        return self.raw

    def parameters(self):
        return [self.raw]

    def prefix_cache(self):
        return _cache_layers(self._prefix_forward(self.soft_prompt, None).past_key_values)

    def literal_hidden(self, batch: Batch) -> torch.Tensor:
        b, t = batch.input_ids.shape
        tok = self.embed(batch.input_ids)
        sp = self.soft_prompt.to(tok.dtype)[None].expand(b, -1, -1)
        out = self.base(
            inputs_embeds=torch.cat([sp, tok], dim=1),
            attention_mask=torch.cat([self._ones(b, self.P), batch.attention_mask], dim=1),
            position_ids=self._positions(b, 0, self.P + t),
            use_cache=False,
        )
        return out.last_hidden_state[:, self.P :]

    def trained_tensors(self):
        return {"soft_prompt": self.soft_prompt.detach().float().cpu().contiguous()}

    def warm_start(self, tensors):
        self.raw = nn.Parameter(self._stored(tensors, "soft_prompt", tuple(self.raw.shape)))

    def compile(self):
        return compile_prompt_tuning(self.bundle, self.trained_tensors()["soft_prompt"]).contiguous()


METHOD_CLASSES: dict[str, type[_Method]] = {
    "prefix_tuning": _PrefixTuning,
    "prefix_propagation": _Propagation,
    "prompt_tuning": _PromptTuning,
}


def build_method(
    bundle: Any, method: str, prefix_length: int, hp: Hyperparameters, examples: list[dict[str, str]],
    gen: torch.Generator, init_tensors: dict[str, torch.Tensor] | None = None,
) -> _Method:  # fmt: skip
    """The method's trainable prefix: from its init, or continuing from `init_tensors` (a stored version's)."""
    init_ids = _text_init_ids(bundle, examples, prefix_length)
    m = METHOD_CLASSES[method](bundle, prefix_length, hp, init_ids, gen)
    if init_tensors is not None:
        m.warm_start(init_tensors)
    return m


def trainable_parameter_count(method: str, spec: Any, prefix_length: int, mlp_hidden: int = 512) -> int:
    """Parameters trained by ``method`` (prefix-tuning counts its MLP; only the KV is served)."""
    L, H, P = spec.num_layers, spec.hidden_size, prefix_length
    if method == "prefix_tuning":
        out = L * 2 * spec.num_kv_heads * spec.head_dim
        return P * H + H * mlp_hidden + mlp_hidden + mlp_hidden * out + out
    if method == "prefix_propagation":
        return L * P * H
    return P * H


# ------------------------------------------------------------------------------------------------ schedule
def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then linear decay; step is 0-based; never exactly 0."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def _split(n: int, hp: Hyperparameters, gen: torch.Generator) -> tuple[list[int], list[int]]:
    order = torch.randperm(n, generator=gen).tolist()
    if n < MIN_EXAMPLES_FOR_EVAL or hp.eval_fraction <= 0:
        return sorted(order), []
    n_eval = max(1, round(n * hp.eval_fraction))
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def _batches(
    data: list[EncodedExample], idx: list[int], size: int, pad: int, device: torch.device
) -> Iterator[Batch]:
    for i in range(0, len(idx), size):
        yield collate([data[j] for j in idx[i : i + size]], pad, device)


def _downsample(points: list[list[float]], n: int = MAX_CURVE_POINTS) -> list[list[float]]:
    if len(points) <= n:
        return points
    stride = len(points) / n
    picked = [points[int(i * stride)] for i in range(n - 1)]
    return [*picked, points[-1]]


def default_train_threads() -> int:
    """Intra-op threads for training: half the cores (at least 1), leaving the rest to serving."""
    return max(1, (os.cpu_count() or 2) // 2)


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    if n is None:
        n = default_train_threads()
    if n <= 0:  # leave the calling thread's setting alone
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate_loss(
    method: _Method, batches: list[Batch], should_stop: Callable[[], bool] | None = None
) -> float | None:
    """The mean token loss over the held-out `batches`; `should_stop` is checked before each batch (a held-out set
    of hundreds of examples takes tens of seconds: a cancel waited for all of it)."""
    total, count = 0.0, 0
    for b in batches:
        if should_stop is not None and should_stop():
            raise TrainingCancelled("cancelled while evaluating the held-out examples")
        s, n = method.loss_sum(b)
        total += float(s)
        count += n
    return total / count if count else None


# ------------------------------------------------------------------------------------------------ entry point
def train_prefix(
    bundle: Any,
    method: str,
    examples: list[dict[str, str]],
    prefix_length: int,
    hyperparameters: dict[str, Any] | Hyperparameters | None = None,
    *,
    progress_cb: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    limits: TrainingLimits | None = None,
    num_threads: int | None = None,
    init_tensors: dict[str, torch.Tensor] | None = None,
    label: str | None = None,
) -> TrainResult:
    """Train a prefix of ``prefix_length`` positions for ``method`` on ``examples`` and compile it to serving KV.

    ``hyperparameters`` override the method's defaults (``server.training.config.DEFAULTS``). ``should_stop()`` is
    checked before every optimizer step (raises ``TrainingCancelled``); ``progress_cb(step, total_steps, loss,
    epoch)`` is called after every step. ``init_tensors`` (a stored version's tensors of the same method and
    prefix length) continue training from there instead of the init. ``label`` names the training in its log lines
    (a job's id and prefix: concurrent jobs are told apart). Raises ``TrainingValidationError`` for bad
    input (before any compute), ``TrainingDiverged`` if the loss becomes non-finite or the result holds values
    the store refuses (the prefix's KV over ``prefix_store.format.MAX_KV_ABS``, its trained tensors over
    ``server.prefixes.kinds.MAX_TRAINED_ABS``).
    """
    t_start = time.perf_counter()
    limits = limits or TrainingLimits()
    method = check_method(method)
    prefix_length = check_prefix_length(prefix_length, limits)
    examples = check_examples(examples, limits)
    hp = resolve_hyperparameters(method, hyperparameters, limits)
    fmt = hp.prompt_format or default_prompt_format(bundle)
    data = encode_examples(bundle, examples, fmt, prefix_length, append_eos=hp.append_eos, limits=limits)

    with _threads(num_threads):
        return _train(
            bundle,
            method,
            examples,
            data,
            prefix_length,
            hp,
            fmt,
            t_start,
            progress_cb,
            should_stop,
            init_tensors,
            limits,
            label,
        )


def _train(
    bundle: Any,
    method_name: str,
    examples: list[dict[str, str]],
    data: list[EncodedExample],
    prefix_length: int,
    hp: Hyperparameters,
    fmt: str,
    t_start: float,
    progress_cb: ProgressCallback | None,
    should_stop: Callable[[], bool] | None,
    init_tensors: dict[str, torch.Tensor] | None = None,
    limits: TrainingLimits | None = None,
    label: str | None = None,
) -> TrainResult:
    limits = limits or TrainingLimits()
    deadline = None if limits.max_seconds is None else t_start + limits.max_seconds
    stopped: str | None = None  # why training ended before total_steps
    gen = torch.Generator().manual_seed(hp.seed)
    train_idx, eval_idx = _split(len(data), hp, gen)
    train_examples = [examples[i] for i in train_idx]
    method = build_method(bundle, method_name, prefix_length, hp, train_examples, gen, init_tensors)
    params = method.parameters()
    device = method.device
    pad = pad_token_id(bundle)
    steps_per_epoch = math.ceil(len(train_idx) / hp.batch_size)
    # the operator's bound on one job, whatever epochs x examples come to
    total_steps = min(max(hp.epochs * steps_per_epoch, hp.min_steps), limits.max_steps)
    if hp.max_steps is not None:
        total_steps = min(total_steps, hp.max_steps)
    warmup = int(hp.warmup_ratio * total_steps)
    opt = torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, warmup))
    eval_batches = list(_batches(data, eval_idx, hp.batch_size, pad, device))

    initial_eval = evaluate_loss(method, eval_batches, should_stop) if eval_batches else None
    curve: list[list[float]] = []
    eval_curve: list[list[float]] = []
    epoch_losses: list[float] = []
    best_loss = math.inf
    step = 0
    epoch = 0
    who = f"{label}: " if label else ""
    log.info(
        "%straining %s P=%d on %d examples (%d held out), %d steps, lr %g, batch %d",
        who, method_name, prefix_length, len(train_idx), len(eval_idx), total_steps, hp.learning_rate, hp.batch_size,
    )  # fmt: skip
    said_at = time.perf_counter()
    while step < total_steps and stopped is None:
        perm = torch.randperm(len(train_idx), generator=gen).tolist()
        order = [train_idx[i] for i in perm]
        ep_sum, ep_n = 0.0, 0
        for batch in _batches(data, order, hp.batch_size, pad, device):
            if step >= total_steps:
                break
            if should_stop is not None and should_stop():
                raise TrainingCancelled(f"cancelled at step {step} of {total_steps}")
            opt.zero_grad(set_to_none=True)
            s, n = method.loss_sum(batch)
            loss = s / max(n, 1)
            lv = float(loss.detach())
            if not math.isfinite(lv):
                raise TrainingDiverged(
                    f"loss became {lv} at step {step + 1}; lower the learning_rate (was {hp.learning_rate:g})"
                )
            loss.backward()
            if hp.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm)
            opt.step()
            sched.step()
            step += 1
            ep_sum += float(s.detach())
            ep_n += n
            best_loss = min(best_loss, lv)
            curve.append([step, round(lv, 6)])
            if progress_cb is not None:
                progress_cb(step, total_steps, lv, epoch + 1)
            if time.perf_counter() - said_at >= PROGRESS_LOG_S and step < total_steps:
                said_at = time.perf_counter()
                log.info(
                    "%sstep %d of %d, loss %.6f, %.0fs so far", who, step, total_steps, lv, said_at - t_start
                )
            if deadline is not None and step < total_steps and time.perf_counter() >= deadline:
                stopped = "time_limit"
                log.info("%straining stopped at its time limit (%gs) after step %d of %d", who, limits.max_seconds,
                         step, total_steps)  # fmt: skip
                break
        epoch += 1
        if ep_n:
            epoch_losses.append(ep_sum / ep_n)
        if eval_batches:
            ev = evaluate_loss(method, eval_batches, should_stop)
            if ev is not None:
                eval_curve.append([epoch, round(ev, 6)])

    try:  # what the store would refuse after the whole run (compiling checks the KV): said as what it is
        with torch.no_grad():
            kv = method.compile()
        tensors = {"kv": kv, **method.trained_tensors()}
        check_kv_values(kv)
        for key, t in tensors.items():
            if key != "kv":
                check_trained_values(t, key)
    except PrefixValuesOutOfRange as e:
        raise TrainingDiverged(
            f"the trained prefix cannot be stored ({e}): its values ran away; lower the learning_rate (was "
            f"{hp.learning_rate:g})" + (" or set max_grad_norm" if hp.max_grad_norm <= 0 else "")
        ) from None
    final_eval = eval_curve[-1][1] if eval_curve else None
    summary: dict[str, Any] = {
        "method": method_name,
        "prefix_length": prefix_length,
        "steps": step,
        "total_steps": total_steps,
        "stopped": stopped,
        "epochs": epoch,
        "examples": len(data),
        "train_examples": len(train_idx),
        "heldout_examples": len(eval_idx),
        "train_tokens": sum(len(data[i].input_ids) for i in train_idx),
        "completion_tokens": sum(data[i].completion_len for i in train_idx),
        "final_loss": round(epoch_losses[-1], 6) if epoch_losses else None,
        "last_step_loss": curve[-1][1] if curve else None,
        "best_loss": round(best_loss, 6) if math.isfinite(best_loss) else None,
        "initial_heldout_loss": round(initial_eval, 6) if initial_eval is not None else None,
        "heldout_loss": final_eval,
        "best_heldout_loss": min(e[1] for e in eval_curve) if eval_curve else None,
        "epoch_losses": [round(x, 6) for x in epoch_losses],
        "heldout_curve": eval_curve,
        "loss_curve": _downsample(curve),
        "wall_time_s": round(time.perf_counter() - t_start, 3),
        "trainable_parameters": sum(p.numel() for p in params),
        "num_threads": torch.get_num_threads(),
        "prompt_format": fmt,
        "hyperparameters": {**hp.to_dict(), "prompt_format": fmt},
    }
    log.info(
        "%strained %s in %.1fs: %d steps, final loss %s%s",
        who, method_name, summary["wall_time_s"], step, summary["final_loss"],
        "" if final_eval is None else f", held-out loss {final_eval}",
    )  # fmt: skip
    return TrainResult(tensors=tensors, summary=summary, prompt_format=fmt)


__all__ = [
    "TrainResult",
    "TrainingCancelled",
    "TrainingDiverged",
    "TrainingValidationError",
    "build_method",
    "default_train_threads",
    "evaluate_loss",
    "lr_factor",
    "train_prefix",
    "trainable_parameter_count",
]
