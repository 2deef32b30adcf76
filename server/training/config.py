"""Training specs: limits, per-method default hyperparameters and validation (clear errors naming the field).

A training request (the body of ``POST /prefixes`` or ``JobManager.submit``)::

    {"tenant_id": "acme", "name": "support", "method": "prefix_tuning", "prefix_length": 16,
     "examples": [{"prompt": "...", "completion": "..."}, ...],
     "hyperparameters": {"epochs": 8, "learning_rate": 3e-3, "batch_size": 8, "seed": 0, ...}}

Hyperparameters may also be given at the top level (the CLI and SDK send ``epochs``, ``lr``, ``max_steps`` there);
``lr`` is an alias of ``learning_rate``. Unknown fields are refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METHODS = ("prefix_tuning", "prefix_propagation", "prompt_tuning")
DEFAULT_METHOD = "prefix_tuning"
PROMPT_FORMATS = ("chat", "raw")
INITS = ("text", "random")


class TrainingValidationError(ValueError):
    """A training request is invalid. ``param`` names the offending field (e.g. ``"examples[3].completion"``)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class InitFromNotFound(TrainingValidationError):
    """`init_from` names a prefix (or version) the tenant does not have (the API answers 404)."""


class TrainingCancelled(Exception):
    """Raised by the trainer when ``should_stop()`` answered True; nothing was produced."""


@dataclass(frozen=True)
class TrainingLimits:
    """Server-side bounds on a training request (configurable per deployment)."""

    max_examples: int = 1000
    max_total_tokens: int = 200_000  # prompt + completion tokens over all examples
    max_example_tokens: int = 2048  # one example (prefix positions come on top)
    min_prefix_length: int = 1
    max_prefix_length: int = 256
    max_epochs: int = 100
    max_batch_size: int = 64
    max_steps: int = 100_000
    max_prompt_chars: int = 100_000  # per prompt/completion string, before tokenizing
    # positions a served request may hold (prefix + prompt + output: the server's max_model_len); None: the model's.
    # A prefix, and an example with it, must fit, or nothing trained could be served.
    max_positions: int | None = None
    # the longest prefix the serving KV cache holds beside a request (`LLMEngine.max_prefix_len`: its pool of
    # blocks); None: not known where the job is submitted
    max_prefix_positions: int | None = None
    # training time of one job (seconds): past it, training ends after the step under way and the job succeeds with
    # the prefix trained so far (its summary says `stopped: "time_limit"`); None: no limit
    max_seconds: float | None = None
    # bytes of the stored record (the served KV and the trained tensors, float32): the server's max_upload_bytes, so
    # that a download can be uploaded again (an mlp_hidden of 8192 made 397 MB records, 16x slower to fetch on a
    # prefix-cache miss); None: no limit
    max_record_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainingLimits:
        """The limits a job was accepted under (its record's copy); fields unknown to this version are ignored,
        missing ones take the defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class Hyperparameters:
    """Optimizer and schedule. Every method has its own defaults (see ``DEFAULTS``)."""

    epochs: int = 10
    learning_rate: float = 3e-3
    batch_size: int = 8
    seed: int = 0
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    prompt_format: str | None = None  # None: the model's default (chat if it has a chat template)
    max_steps: int | None = None  # stop after this many optimizer steps (caps epochs)
    # at least this many optimizer steps (more epochs) when the request leaves `epochs` to the method: a few
    # examples make a few steps an epoch, too few to learn (prompt tuning: 8 examples, 8 steps, nothing learned)
    min_steps: int = 0
    eval_fraction: float = 0.1  # held-out share when there are >= MIN_EXAMPLES_FOR_EVAL examples
    init: str = "text"  # "text": start from the KV of real text; "random"
    mlp_hidden: int = 512  # prefix_tuning: width of the reparameterization MLP
    append_eos: bool = True  # teach the model to stop after the completion
    rms_scale: bool = True  # propagation: learning rate relative to each layer's hidden-state RMS

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


MIN_EXAMPLES_FOR_EVAL = 16

# Tuned on SmolLM2-135M-Instruct (chat format) with a 24..48-example "answer starts with a tag" task and a
# 4-label classification task (benchmarks/compare_methods.py); see the module docs of server/training/trainer.py.
DEFAULTS: dict[str, Hyperparameters] = {
    # min_steps measured on SmolLM2-135M (8 prompts -> " ZEBRA", 6 held-out prompts, greedy): prompt tuning
    # answered 0/6 after 16 steps, 6/6 after 24; prefix-tuning and propagation 6/6 after 6
    "prefix_tuning": Hyperparameters(epochs=6, learning_rate=3e-4, min_steps=12),
    "prefix_propagation": Hyperparameters(epochs=6, learning_rate=1e-2, min_steps=12),
    "prompt_tuning": Hyperparameters(epochs=8, learning_rate=1e-1, min_steps=30),
}
DEFAULT_PREFIX_LENGTH: dict[str, int] = {"prefix_tuning": 16, "prefix_propagation": 16, "prompt_tuning": 16}
# The default learning rate when training continues from a stored version (`init_from`) and the request gives
# none. A fresh AdamW moves every coordinate by about the learning rate in its first steps, whatever the gradient:
# prompt tuning's 1e-1 threw a trained soft prompt away (SmolLM2-135M, 20 prompts -> " ZEBRA", held-out loss
# 0.0084: 2 more steps at 1e-1 -> 3.24, at 3e-2 -> 0.046, at 1e-2 -> 0.0082; 30 steps towards a new answer at
# 1e-2: 3.34 -> 0.0074). Prefix-tuning and propagation continue well at their defaults.
WARM_START_LEARNING_RATE: dict[str, float] = {"prompt_tuning": 1e-2}

HP_FIELDS = {f.name for f in dataclasses.fields(Hyperparameters)}
HP_ALIASES = {"lr": "learning_rate"}
TOP_LEVEL_FIELDS = {
    "tenant_id",
    "name",
    "method",
    "prefix_length",
    "examples",
    "hyperparameters",
    "init_from",
}


def hp_name(key: str) -> str:
    """A hyperparameter's own name for one of its spellings (`lr`: `learning_rate`)."""
    return HP_ALIASES.get(key, key)


def canonical_request(request: Any) -> Any:
    """The form of a submission that its Idempotency-Key is compared by: one logical request in any of the
    accepted spellings gives one form (hyperparameters at the top level or nested, `lr` or `learning_rate`, a field
    null or absent, 2 or 2.0)."""

    def norm(v: Any) -> Any:
        if isinstance(v, float) and v.is_integer() and abs(v) < 2**53:
            return int(v)
        if isinstance(v, Mapping):
            return {k: norm(x) for k, x in v.items() if x is not None}
        if isinstance(v, list):
            return [norm(x) for x in v]
        return v

    if not isinstance(request, Mapping):
        return request
    out: dict[str, Any] = {}
    hp: dict[str, Any] = {}
    nested = request.get("hyperparameters")
    for key, v in request.items():
        if v is None or key == "hyperparameters":
            continue
        if key in TOP_LEVEL_FIELDS:
            out[key] = norm(v)
        else:
            hp[hp_name(key)] = norm(v)
    if isinstance(nested, Mapping):
        hp.update({hp_name(k): norm(v) for k, v in nested.items() if v is not None})
    elif nested is not None:  # not an object: invalid, compared as given
        out["hyperparameters"] = norm(nested)
    if hp:
        out["hyperparameters"] = hp
    return out


def default_hyperparameters(method: str) -> Hyperparameters:
    check_method(method)
    return DEFAULTS[method]


def check_method(method: Any) -> str:
    if method is None:
        return DEFAULT_METHOD
    if not isinstance(method, str) or method not in METHODS:
        raise TrainingValidationError(
            f"unknown method {method!r}: use one of {', '.join(METHODS)}", param="method"
        )
    return method


# ------------------------------------------------------------------------------------------------ helpers
def _int(value: Any, param: str, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise TrainingValidationError(f"{param} must be an integer, got {value!r}", param=param)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise TrainingValidationError(f"{param} must be in {lo}..{hi}, got {value}", param=param)
    return value


def _float(value: Any, param: str, lo: float, hi: float, *, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TrainingValidationError(f"{param} must be a number, got {value!r}", param=param)
    try:
        v = float(value)
    except OverflowError:  # an integer too large for a float
        v = math.inf
    if not math.isfinite(v):
        raise TrainingValidationError(f"{param} must be finite, got {value!r}", param=param)
    if (v <= lo if lo_open else v < lo) or v > hi:
        bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise TrainingValidationError(f"{param} must be in {bound}, got {value!r}", param=param)
    return v


def resolve_hyperparameters(
    method: str,
    given: Mapping[str, Any] | Hyperparameters | None,
    limits: TrainingLimits | None = None,
    *,
    params: Mapping[str, str] | None = None,
) -> Hyperparameters:
    """Method defaults overridden by ``given`` (validated; unknown keys refused). Errors name the field as it was
    given: ``params[key]`` if present, else ``hyperparameters.<key>``."""
    params = params or {}
    limits = limits or TrainingLimits()
    base = DEFAULTS[check_method(method)]
    if given is None:
        given = {}
    if isinstance(given, Hyperparameters):
        given = given.to_dict()
    if not isinstance(given, Mapping):
        raise TrainingValidationError("hyperparameters must be an object", param="hyperparameters")
    values: dict[str, Any] = {}
    labels: dict[str, str] = {}
    for key, v in given.items():
        name = HP_ALIASES.get(key, key)
        label = params.get(key, f"hyperparameters.{key}")
        if name not in HP_FIELDS:
            raise TrainingValidationError(
                f"unknown hyperparameter {key!r}: known are {', '.join(sorted(HP_FIELDS | set(HP_ALIASES)))}",
                param=label,
            )
        if name in labels:  # `lr` and `learning_rate` both
            raise TrainingValidationError(
                f"{labels[name]!r} and {label!r} both set {name}: give one", param=label
            )
        labels[name] = label
        if v is None and name not in ("prompt_format", "max_steps"):
            continue
        values[name] = v

    def p(n: str) -> str:
        return labels[n]

    out: dict[str, Any] = {}
    for name, v in values.items():
        if name == "epochs":
            out[name] = _int(v, p(name), 1, limits.max_epochs)
        elif name == "learning_rate":
            out[name] = _float(v, p(name), 0.0, 10.0, lo_open=True)
        elif name == "batch_size":
            out[name] = _int(v, p(name), 1, limits.max_batch_size)
        elif name == "seed":
            out[name] = _int(v, p(name), 0, 2**63 - 1)
        elif name == "warmup_ratio":
            out[name] = _float(v, p(name), 0.0, 0.9)
        elif name == "weight_decay":
            out[name] = _float(v, p(name), 0.0, 10.0)
        elif name == "max_grad_norm":
            out[name] = _float(v, p(name), 0.0, 1e6)  # 0 disables clipping
        elif name == "prompt_format":
            if v is not None and v not in PROMPT_FORMATS:
                raise TrainingValidationError(
                    f"prompt_format must be one of {', '.join(PROMPT_FORMATS)}, got {v!r}", param=p(name)
                )
            out[name] = v
        elif name == "max_steps":
            out[name] = None if v is None else _int(v, p(name), 1, limits.max_steps)
        elif name == "min_steps":
            out[name] = _int(v, p(name), 0, limits.max_steps)
        elif name == "eval_fraction":
            out[name] = _float(v, p(name), 0.0, 0.5)
        elif name == "init":
            if v not in INITS:
                raise TrainingValidationError(
                    f"init must be one of {', '.join(INITS)}, got {v!r}", param=p(name)
                )
            out[name] = v
        elif name == "mlp_hidden":
            out[name] = _int(v, p(name), 1, 8192)
        elif name in ("append_eos", "rms_scale"):
            if not isinstance(v, bool):
                raise TrainingValidationError(f"{name} must be true or false, got {v!r}", param=p(name))
            out[name] = v
    if "epochs" in out and "min_steps" not in out:
        out["min_steps"] = 0  # epochs asked for are what runs
    elif "min_steps" not in out:
        # a default never exceeds the operator's limit
        out["min_steps"] = min(base.min_steps, limits.max_steps)
    hp = dataclasses.replace(base, **out)
    if hp.learning_rate * hp.weight_decay >= 1.0:
        # AdamW scales the prefix by 1 - lr x weight_decay every step: at 1 it is zeroed (the job "succeeded" with
        # nothing learnt), past it flipped until it diverged
        name = "weight_decay" if "weight_decay" in out else "learning_rate"
        raise TrainingValidationError(
            f"learning_rate x weight_decay must be below 1 (AdamW scales the prefix by 1 - their product each step); "
            f"got {hp.learning_rate:g} x {hp.weight_decay:g}",
            param=labels.get(name, f"hyperparameters.{name}"),
        )
    return hp


def check_prefix_length(value: Any, limits: TrainingLimits | None = None) -> int:
    limits = limits or TrainingLimits()
    return _int(value, "prefix_length", limits.min_prefix_length, limits.max_prefix_length)


def check_examples(examples: Any, limits: TrainingLimits | None = None) -> list[dict[str, str]]:
    """Shape checks (no tokenizer): a non-empty list of {"prompt": str, "completion": non-empty str}."""
    limits = limits or TrainingLimits()
    if not isinstance(examples, list):
        raise TrainingValidationError("examples must be a list of {prompt, completion} objects", "examples")
    if not examples:
        raise TrainingValidationError("examples: at least one example is required", "examples")
    if len(examples) > limits.max_examples:
        raise TrainingValidationError(
            f"too many examples: {len(examples)} (max {limits.max_examples})", param="examples"
        )
    out = []
    for i, ex in enumerate(examples):
        where = f"examples[{i}]"
        if not isinstance(ex, Mapping):
            raise TrainingValidationError(f"{where} must be an object with prompt and completion", where)
        extra = set(ex) - {"prompt", "completion"}
        if extra:
            raise TrainingValidationError(
                f"{where} has unknown fields {sorted(extra)}: use prompt and completion", where
            )
        prompt, completion = ex.get("prompt"), ex.get("completion")
        if not isinstance(prompt, str):
            raise TrainingValidationError(f"{where}.prompt must be a string", f"{where}.prompt")
        if not isinstance(completion, str):
            raise TrainingValidationError(f"{where}.completion must be a string", f"{where}.completion")
        if not completion.strip():
            raise TrainingValidationError(f"{where}.completion is empty", f"{where}.completion")
        for key, s in (("prompt", prompt), ("completion", completion)):
            if len(s) > limits.max_prompt_chars:
                raise TrainingValidationError(
                    f"{where}.{key} is {len(s)} characters long (max {limits.max_prompt_chars})",
                    f"{where}.{key}",
                )
        out.append({"prompt": prompt, "completion": completion})
    return out


def load_examples(source: str | Path | Iterable[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Examples from a JSONL file (one ``{"prompt", "completion"}`` object a line) or an iterable of dicts."""
    if isinstance(source, (str, Path)):
        rows: list[Any] = []
        with open(source, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise TrainingValidationError(
                        f"{source} line {n}: not JSON ({e.msg})", "examples"
                    ) from None
        return check_examples(rows, TrainingLimits(max_examples=10**9))
    return check_examples(list(source), TrainingLimits(max_examples=10**9))


@dataclass
class TrainSpec:
    """A validated request (before tokenization)."""

    tenant_id: str
    name: str
    method: str
    prefix_length: int
    examples: list[dict[str, str]]
    hyperparameters: Hyperparameters
    extra: dict[str, Any] = field(default_factory=dict)
    init_from: dict[str, Any] | None = None  # {"name", "version"}: continue training from that stored version


def parse_request(request: Mapping[str, Any], limits: TrainingLimits | None = None) -> TrainSpec:
    """Validate a job request's structure (names, method, prefix length, examples, hyperparameters)."""
    from prefix_store.errors import InvalidName
    from prefix_store.names import validate_name

    limits = limits or TrainingLimits()
    if not isinstance(request, Mapping):
        raise TrainingValidationError("the training request must be an object", None)
    for key in ("tenant_id", "name"):
        try:
            validate_name(request.get(key), key)
        except InvalidName as e:
            raise TrainingValidationError(str(e), param=key) from None
    method = check_method(request.get("method"))
    hp: dict[str, Any] = {}
    labels: dict[str, str] = {}
    nested = request.get("hyperparameters")
    if nested is not None and not isinstance(nested, Mapping):
        raise TrainingValidationError("hyperparameters must be an object", param="hyperparameters")
    for key, v in request.items():
        if key in TOP_LEVEL_FIELDS:
            continue
        if HP_ALIASES.get(key, key) in HP_FIELDS:
            hp[key] = v
            labels[key] = key
        else:
            raise TrainingValidationError(f"unknown field {key!r}", param=key)
    top = {HP_ALIASES.get(k, k) for k in hp}
    for key, v in (nested or {}).items():
        if HP_ALIASES.get(key, key) in top:
            # nested wins over top level only if the top level did not set it; both set: refuse ambiguity
            raise TrainingValidationError(
                f"{key!r} given both at the top level and in hyperparameters", param=f"hyperparameters.{key}"
            )
        hp[key] = v
    hyper = resolve_hyperparameters(method, hp, limits, params=labels)
    init_from = check_init_from(request.get("init_from"))
    warm_lr = WARM_START_LEARNING_RATE.get(method)
    if (
        init_from is not None
        and warm_lr is not None
        and "learning_rate" not in {HP_ALIASES.get(k, k) for k in hp}
    ):
        hyper = dataclasses.replace(hyper, learning_rate=warm_lr)
    plen = request.get("prefix_length")
    # the method's default P, within the operator's limit (a limit below it makes the default smaller)
    default_p = min(DEFAULT_PREFIX_LENGTH[method], limits.max_prefix_length)
    prefix_length = default_p if plen is None else check_prefix_length(plen, limits)
    examples = check_examples(request.get("examples"), limits)
    return TrainSpec(
        tenant_id=request["tenant_id"],
        name=request["name"],
        method=method,
        prefix_length=prefix_length,
        examples=examples,
        hyperparameters=hyper,
        init_from=init_from,
    )


def check_init_from(value: Any) -> dict[str, Any] | None:
    """`{"name": prefix name, "version": int or null (latest)}`, or None."""
    from prefix_store.errors import InvalidName
    from prefix_store.names import validate_name

    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TrainingValidationError('init_from must be an object {"name", "version"}', param="init_from")
    unknown = sorted(set(value) - {"name", "version"})
    if unknown:
        raise TrainingValidationError(f"init_from: unknown field(s) {unknown}", param="init_from")
    try:
        name = validate_name(value.get("name"), "init_from.name")
    except InvalidName as e:
        raise TrainingValidationError(str(e), param="init_from.name") from None
    version = value.get("version")
    if version is not None:
        version = _int(version, "init_from.version", lo=1)
    return {"name": name, "version": version}
