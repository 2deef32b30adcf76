"""Public engine types: what goes in (requests) and what comes out (token events)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

FinishReason = Literal["stop", "length", "abort", "error"]


class EngineError(Exception):
    """Base class for errors the engine reports to callers."""


class QueueFull(EngineError):
    """The engine's waiting queue is at its limit; the caller should retry later (HTTP 503)."""


class RequestTooLarge(EngineError):
    """Prompt + max_tokens (+ prefix) do not fit the engine's context or KV budget (HTTP 413)."""


StructuredKind = Literal["json", "json_object", "regex", "choice", "grammar", "structural_tag"]
STRUCTURED_KINDS: tuple[str, ...] = get_args(StructuredKind)
# A reasoning model's thinking before the constrained answer (vLLM applies the grammar once the reasoning ends):
# "opened", the output starts inside a thinking (an optional `<think>`, any text, `</think>`); "optional", it may
# start with one (`<think>`, any text, `</think>`) or go straight to the answer.
ThinkMode = Literal["opened", "optional"]
THINK_MODES: tuple[str, ...] = get_args(ThinkMode)


@dataclass(frozen=True)
class StructuredOutputs:
    """What the output must match (vLLM's `structured_outputs`). `spec` is the JSON schema as JSON text (`json`),
    the regular expression (`regex`), the choices as a JSON list of strings (`choice`), the grammar in Lark or GBNF
    syntax (`grammar`), vLLM's structural tags as JSON text (`structural_tag`: `{"structures": [{"begin", "schema",
    "end"}], "triggers": [...]}`: free text, where a trigger starts one of the structures beginning with it, its
    content following its JSON schema), or empty (`json_object`: any JSON object). JSON may have whitespace between tokens, at most
    33 characters at a time (pretty-printing, but no endless blank lines); `any_whitespace` False allows none
    (vLLM's `disable_any_whitespace`). `think`: the answer may follow a thinking the grammar leaves free (ThinkMode;
    JSON may then start after up to 33 characters of whitespace, the blank line models write after `</think>`,
    whatever `any_whitespace`)."""

    kind: StructuredKind
    spec: str = ""
    any_whitespace: bool = True
    think: ThinkMode | None = None
    # the thinking's opening and closing tags (the reasoning parser's)
    think_tags: tuple[str, str] = ("<think>", "</think>")
    # whose entry of the compiled-grammar cache this is (the server's: the tenant): no tenant is handed a grammar
    # another compiled, so none can time which specs another sent (a cache hit is faster). Not used to compile.
    cache_salt: str = ""
    # The compiled grammar (GrammarCompiler.compile's result) when the caller compiled it first: the engine starts
    # from it instead of its compiler's LRU cache, which may have evicted it meanwhile. Not part of equality.
    compiled: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in STRUCTURED_KINDS:
            raise ValueError(f"structured output kind must be one of {', '.join(STRUCTURED_KINDS)}")
        if self.think is not None and self.think not in THINK_MODES:
            raise ValueError(f"think must be one of {', '.join(THINK_MODES)}")


@dataclass(frozen=True)
class ThinkingBudget:
    """vLLM's `thinking_token_budget`: at most `tokens` output tokens inside a thinking, then its closing tag is
    forced (`server.engine.thinking`). `start` and `end` are the tags' text (the reasoning parser's); the thinking is
    found in the output's bytes, as the parser finds it in the text, whatever tokens spell a tag. `rest[k]` is the
    token ids of the closing tag's bytes from k on (what is forced where the output ends with its first k bytes);
    `opened`: the output starts inside a thinking (its prompt, or the template, opened it), of which the prompt
    already wrote `spent` tokens (a continued assistant message's thinking, as vLLM counts)."""

    tokens: int
    start: str
    end: str
    rest: tuple[tuple[int, ...], ...]
    opened: bool = False
    spent: int = 0

    def __post_init__(self) -> None:
        if self.tokens < 0 or self.spent < 0:
            raise ValueError("thinking_token_budget must be >= 0")
        if not self.start or not self.end or not self.rest or not self.rest[0]:
            raise ValueError("the thinking's tags must not be empty")
        object.__setattr__(self, "rest", tuple(tuple(int(t) for t in r) for r in self.rest))


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    # drop tokens less likely than min_p x the most likely one (after top-k and top-p: transformers' order)
    min_p: float = 0.0
    # TGI / transformers (locally typical sampling, Meister et al. 2022): keep the tokens whose surprisal is
    # closest to the distribution's entropy, the fewest whose mass reaches typical_p (after min-p; 1 disables).
    typical_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # vLLM: keep the stop string that ended the output at its end (default: cut before it)
    include_stop_str_in_output: bool = False
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # OpenAI semantics over the generated tokens: logit -= frequency * count + presence * (count > 0).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # transformers / vLLM semantics over prompt and generated tokens: positive logits / r, negative * r.
    repetition_penalty: float = 1.0
    # Log-probabilities to report per generated token: None none, 0 the sampled token's, k also the top k.
    logprobs: int | None = None
    # The same for every prompt token after the first (OpenAI `echo` + `logprobs`, lm-eval's loglikelihood).
    prompt_logprobs: int | None = None
    # OpenAI: (token id, bias) added to the logits before sampling (-100 bans, +100 forces).
    logit_bias: tuple[tuple[int, float], ...] = ()
    # vLLM: only these token ids may be sampled (empty: any).
    allowed_token_ids: tuple[int, ...] = ()
    # vLLM: end-of-sequence and stop_token_ids are banned until this many tokens are generated.
    min_tokens: int = 0
    # vLLM's bad_words, as token id sequences: a sequence's last token is banned where the output ends with the rest
    # of it (a one-token sequence: always).
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()
    # The output is constrained to this JSON schema / regex / choice / grammar (server.engine.structured).
    structured: StructuredOutputs | None = None
    # TGI's watermark (Kirchenbauer et al. 2023): before anything else, `watermark_delta` is added to the logits of
    # a "green list" of `watermark_gamma` x vocabulary tokens drawn from the previous token (TGI's hashing, so its
    # detectors find it).
    watermark: bool = False
    watermark_gamma: float = 0.5
    watermark_delta: float = 2.0
    # vLLM: the text leaves out special tokens (default), and puts spaces between them (slow tokenizers only).
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    # vLLM's thinking_token_budget: a reasoning model's thinking is cut at this many tokens (its closing tag forced)
    thinking_budget: ThinkingBudget | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        for name in (
            "temperature",
            "top_p",
            "min_p",
            "typical_p",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
        ):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or math.isnan(v) or math.isinf(v):
                raise ValueError(f"{name} must be a finite number")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0 <= self.min_p <= 1:
            raise ValueError("min_p must be in [0, 1]")
        if not 0 < self.typical_p <= 1:
            raise ValueError("typical_p must be in (0, 1]")
        if not (0 < self.watermark_gamma < 1 and 0 <= self.watermark_delta <= 100):
            raise ValueError("watermark_gamma must be in (0, 1) and watermark_delta in [0, 100]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2]")
        if not 0.01 <= self.repetition_penalty <= 2.0:  # dividing by less overflows float32 logits
            raise ValueError("repetition_penalty must be in [0.01, 2]")
        if self.min_tokens < 0:
            raise ValueError("min_tokens must be >= 0")
        if self.min_tokens > self.max_tokens:
            raise ValueError("min_tokens must be at most max_tokens")
        bias = tuple((int(t), float(b)) for t, b in self.logit_bias)
        if any(t < 0 or not -100.0 <= b <= 100.0 for t, b in bias):
            raise ValueError("logit_bias needs token ids >= 0 and biases in [-100, 100]")
        object.__setattr__(self, "logit_bias", bias)
        allowed = tuple(sorted({int(t) for t in self.allowed_token_ids}))
        if any(t < 0 for t in allowed):
            raise ValueError("allowed_token_ids must be >= 0")
        object.__setattr__(self, "allowed_token_ids", allowed)
        bad = tuple(tuple(int(t) for t in seq) for seq in self.bad_words_token_ids)
        if any(not seq or min(seq) < 0 for seq in bad):
            raise ValueError("bad_words_token_ids must be non-empty sequences of token ids >= 0")
        object.__setattr__(self, "bad_words_token_ids", bad)
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ValueError(f"{name} must be >= 0")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def processed(self) -> bool:
        """Whether the row's scores differ from the logits (watermark, bias, allowed tokens, bad words, min_tokens or
        penalties)."""
        return bool(
            self.watermark
            or self.logit_bias
            or self.allowed_token_ids
            or self.bad_words_token_ids
            or self.min_tokens
            or self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
        )


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model (before penalties, temperature and top-k/top-p) and,
    when asked for, the most likely tokens at that step, most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    rank: int | None = None  # how many tokens are at least as likely, itself included (1: the most likely)


@dataclass(frozen=True)
class PrefixKey:
    """A tenant's prefix at one resolved version."""

    tenant_id: str
    name: str
    version: int

    def __str__(self) -> str:
        return f"{self.tenant_id}/{self.name}@v{self.version}"


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    prefix: PrefixKey | None = None
    # Produce text deltas on every step (streaming); otherwise text is decoded once at the end.
    stream_text: bool = False
    # Prompt-cache namespace (vLLM's cache_salt): requests share cached prompt blocks only with the same salt and
    # prefix; the server salts with the tenant id so one tenant cannot time another's prompts.
    cache_salt: str | None = None
    # Scheduling priority (vLLM's): lower starts first, and is preempted last when memory runs short.
    priority: int = 0
    # A continuation of work the server accepted already (a beam search's later steps): never refused for a full
    # queue (its first step was counted), and failed like the running requests once the engine `fail_all`ed.
    continuation: bool = False

    @property
    def tenant(self) -> str | None:
        """Whose request this is, for per-tenant accounting: the cache salt (the server's tenant id), else the
        prefix's tenant."""
        if self.cache_salt is not None:
            return self.cache_salt
        return self.prefix.tenant_id if self.prefix is not None else None


@dataclass
class TokenEvent:
    request_id: str
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: FinishReason | None = None
    # what stopped it (vLLM's stop_reason): the stop string matched, or the stop_token_ids entry sampled; None for
    # EOS, a length cut, or a completed grammar
    stop_reason: str | int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # prompt tokens whose KV came from the prompt cache (not computed for this request), OpenAI's cached_tokens
    cached_tokens: int = 0
    error: str | None = None
    error_type: str | None = None
    # One per entry of token_ids when the request asked for logprobs, else None.
    logprobs: list[TokenLogprob] | None = None
    # With prompt_logprobs, on the request's first event: one per prompt token, None for the first (nothing
    # predicts it).
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # Timing (monotonic seconds): when the request was added and first scheduled.
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    # Its tokens' inter-token latencies, by the engine's clock: one per step that gave the request tokens after
    # its first (accepted drafts come in their step's), so the same whatever events a stream interval joins.
    itl: tuple[float, ...] = ()


@dataclass
class Output:
    """A finished request, as returned by LLMEngine.generate."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    error: str | None = None
    error_type: str | None = None  # the error's kind: RequestTooLarge, GrammarError, SamplingError, ...
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    e2e: float | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
