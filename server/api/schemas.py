"""Request and response models (pydantic v2) of the HTTP API; they make the OpenAPI schema at /openapi.json."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

NAME_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"
BASE_PREFIX = "base"  # reserved prefix name: no prefix, the base model alone
DEFAULT_PREFIX = "default"

# C0 controls other than tab, newline and carriage return; lone surrogates cannot be encoded as UTF-8.
_BAD_CHARS = {chr(c) for c in range(0x20) if chr(c) not in "\t\n\r"}


def check_text(v: str) -> str:
    if any(ch in _BAD_CHARS for ch in v):
        raise ValueError(
            "text contains control characters (only tab, newline and carriage return are allowed)"
        )
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text is not valid Unicode (lone surrogate)") from None
    return v


def check_name(v: str) -> str:
    if v in (".", ".."):
        raise ValueError("'.' and '..' are not valid names")
    return v


# Documents check_text in the schema (the validator gives the clearer message).
NO_CONTROL_CHARS = {"pattern": "^[^\\u0000-\\u0008\\u000B\\u000C\\u000E-\\u001F]*$"}
Text = Annotated[str, Field(json_schema_extra=NO_CONTROL_CHARS), AfterValidator(check_text)]
PromptText = Annotated[
    str, Field(min_length=1, json_schema_extra=NO_CONTROL_CHARS), AfterValidator(check_text)
]
Name = Annotated[str, Field(pattern=NAME_PATTERN, examples=["acme"]), AfterValidator(check_name)]
Temperature = Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
TopK = Annotated[int, Field(ge=0, le=2**31 - 1)]
Seed = Annotated[int, Field(ge=-(2**53 - 1), le=2**53 - 1)]  # exact in every JSON parser
StopText = Annotated[str, Field(min_length=1, json_schema_extra=NO_CONTROL_CHARS), AfterValidator(check_text)]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


# --------------------------------------------------------------------------------------------- /generate
class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant_id: Name | None = Field(None, description="Tenant; defaults to the API key's tenant")
    prefix: Name | None = Field(
        DEFAULT_PREFIX,
        description=f"Prefix name (null means {DEFAULT_PREFIX!r}); {BASE_PREFIX!r} means the base model, no prefix",
    )
    prompt: PromptText
    max_tokens: int = Field(64, ge=1)
    temperature: Temperature = 0.0
    top_p: TopP = 1.0
    top_k: TopK = 0
    seed: Seed | None = None
    stop: list[StopText] | StopText | None = None
    stream: bool = False
    ignore_eos: bool = Field(False, description="Keep generating past end-of-sequence (benchmarks)")


class GenerateResponse(BaseModel):
    id: str
    tenant_id: str
    prefix: str | None = Field(description="Prefix name, null for the base model")
    prefix_version: int | None
    text: str
    finish_reason: Literal["stop", "length"]
    usage: Usage


class GenerateChunk(BaseModel):
    """One Server-Sent Event of a streamed /generate: `data: {...}`; the stream ends with `data: [DONE]`."""

    id: str
    tenant_id: str
    prefix: str | None
    prefix_version: int | None
    text: str
    finish_reason: Literal["stop", "length"] | None = None
    usage: Usage | None = None


# --------------------------------------------------------------------------------------------- OpenAI
class StreamOptions(BaseModel):
    include_usage: bool = False


class _OpenAIBase(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(
        min_length=1,
        max_length=260,
        description="'{tenant_id}/{prefix}'; '{tenant_id}' alone means its 'default' prefix, "
        f"'{{tenant_id}}/{BASE_PREFIX}' the base model",
    )
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = Field(None, description="Extension (vLLM): top-k sampling, 0 disables")
    seed: Seed | None = None
    stop: list[StopText] | StopText | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="Extension (vLLM): keep generating past end-of-sequence")
    n: int | None = Field(None, ge=1, le=1, description="Only 1 is supported")
    presence_penalty: float | None = Field(None, ge=0, le=0, description="Only 0 is supported")
    frequency_penalty: float | None = Field(None, ge=0, le=0, description="Only 0 is supported")
    user: str | None = Field(None, max_length=256)


class CompletionRequest(_OpenAIBase):
    prompt: PromptText | Annotated[list[PromptText], Field(min_length=1, max_length=1)]
    max_tokens: int | None = Field(None, ge=1, description="Default 16")
    echo: Literal[False] | None = Field(None, description="Only false is supported")
    logprobs: None = Field(None, description="Not supported (null only)")
    best_of: int | None = Field(None, ge=1, le=1, description="Only 1 is supported")
    suffix: Literal[""] | None = Field(None, description="Not supported (null or empty only)")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_OpenAIBase):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    max_tokens: int | None = Field(None, ge=1, description="Default: up to the server's max_new_tokens")
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: Literal[False] | None = Field(None, description="Only false is supported")


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str | None = Field(None, description="The base model")
    prefix_version: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --------------------------------------------------------------------------------------------- prefixes
class PrefixInfo(BaseModel):
    tenant_id: str
    name: str
    kind: str
    prefix_length: int
    version: int
    versions: list[int] | None = None
    created: float
    base_model_fingerprint: str
    dtype: str
    shapes: dict[str, list[int]]
    sha256: str
    training: dict[str, Any] | None = None
    extra: dict[str, Any] = Field(default_factory=dict)


class PrefixList(BaseModel):
    object: Literal["list"] = "list"
    data: list[PrefixInfo]


class TrainExample(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str
    completion: str = Field(min_length=1)


class TrainRequest(BaseModel):
    """A training job. Hyperparameters beyond the listed ones (`warmup_ratio`, `weight_decay`, ...) go to the
    trainer, which validates them (422 naming the field)."""

    model_config = ConfigDict(extra="allow")

    tenant_id: Name | None = Field(None, description="Tenant; defaults to the API key's tenant")
    name: Name = Field(
        description=f"Prefix name to create (a new version if it exists); {BASE_PREFIX!r} is reserved"
    )
    method: Literal["prefix_tuning", "prefix_propagation", "prompt_tuning"] | None = Field(
        None, description="Training method (default: the trainer's, prefix_tuning)"
    )
    examples: list[TrainExample] = Field(min_length=1, description="Training pairs")
    prefix_length: int | None = Field(
        None, ge=1, le=256, description="Virtual tokens P (default: the trainer's)"
    )
    epochs: int | None = Field(None, ge=1, le=100)
    learning_rate: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    batch_size: int | None = Field(None, ge=1, le=64)
    max_steps: int | None = Field(None, ge=1, le=100_000)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    prompt_format: Literal["chat", "raw"] | None = Field(
        None, description="How prompts are rendered in training and later serving (default: the model's)"
    )
    hyperparameters: dict[str, Any] | None = Field(
        None, description="Hyperparameters as one object (the same keys as at the top level; not both)"
    )


class JobInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    job_id: str
    status: str
    tenant_id: str | None = None
    name: str | None = None


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobInfo]


class TenantInfo(BaseModel):
    tenant_id: str
    prefixes: int
    has_key: bool


class TenantList(BaseModel):
    object: Literal["list"] = "list"
    data: list[TenantInfo]


# --------------------------------------------------------------------------------------------- ops
class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    model: str | None = None
    checks: dict[str, str]
