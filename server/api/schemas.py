"""Request and response models (pydantic v2) of the HTTP API; they make the OpenAPI schema at /openapi.json."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr

from prefix_store.names import MAX_NAME_LENGTH, RESERVED_PREFIX_NAME

NAME_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"
BASE_PREFIX = RESERVED_PREFIX_NAME  # reserved prefix name: no prefix, the base model alone


DEFAULT_PREFIX = "default"

# Text may hold any character a tokenizer takes: control characters too (a PDF's form feeds, a terminal's ANSI
# escapes, as OpenAI and vLLM take them), except NUL, which is binary data sent by mistake; lone surrogates cannot
# be encoded as UTF-8.


def check_text(v: str) -> str:
    if "\x00" in v:
        raise ValueError("text contains a NUL character (\\u0000)")
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
NO_NUL = {"pattern": "^[^\\u0000]*$"}
Text = Annotated[str, Field(json_schema_extra=NO_NUL), AfterValidator(check_text)]
PromptText = Annotated[str, Field(min_length=1, json_schema_extra=NO_NUL), AfterValidator(check_text)]
Name = Annotated[str, Field(pattern=NAME_PATTERN, examples=["acme"]), AfterValidator(check_name)]
Temperature = Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
# 0 or -1 (vLLM's own default before 0.10, still what many scripts send): off
TopK = Annotated[int, Field(ge=-1, le=2**31 - 1), AfterValidator(lambda k: max(k, 0))]
Seed = Annotated[int, Field(ge=-(2**53 - 1), le=2**53 - 1)]  # exact in every JSON parser
StopText = Annotated[str, Field(min_length=1, json_schema_extra=NO_NUL), AfterValidator(check_text)]
Penalty = Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)]
RepetitionPenalty = Annotated[float, Field(ge=0.01, le=2, allow_inf_nan=False)]  # below 0.01 logits overflow
TopLogprobs = Annotated[int, Field(ge=0, le=1000)]  # the server's max_logprobs (default 20) is the real limit
LogitBias = Annotated[
    dict[
        Annotated[str, Field(pattern=r"^[0-9]{1,10}$")],
        Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)],
    ],
    Field(max_length=1024),
]
TokenIdList = Annotated[list[Annotated[int, Field(ge=0, le=2**31 - 1)]], Field(max_length=64)]
AllowedTokenIds = Annotated[
    list[Annotated[int, Field(ge=0, le=2**31 - 1)]], Field(min_length=1, max_length=1 << 18)
]
BAD_WORDS_DOC = (
    "vLLM: words the output must not contain: each word (and its form after a space) as tokens; its last token is "
    "banned wherever the output ends with the rest (as many and as long as stop strings may be)"
)
ALLOWED_TOKEN_IDS_DOC = (
    "vLLM: only these token ids may be sampled (the model's log-probabilities are still reported)"
)
LOGIT_BIAS_DOC = (
    "OpenAI: token id (as a string) -> bias added to its logit before sampling (-100 bans, 100 forces)"
)
MIN_TOKENS_DOC = "vLLM: end-of-sequence and stop_token_ids cannot end the output before this many tokens"
MIN_P_DOC = (
    "vLLM: drop tokens less likely than min_p times the most likely one (0 disables); applied after top-k and top-p "
    "as transformers does (vLLM v1 applies it before them: the two differ only when min_p and top_p are both set)"
)
TYPICAL_P_DOC = (
    "TGI / transformers: locally typical sampling, keep the tokens whose surprisal is closest to the entropy, the "
    "fewest whose mass reaches typical_p (after min-p; 1 disables)"
)
INCLUDE_STOP_DOC = "vLLM: end the text with the stop string that ended it (default: the text stops before it)"
SKIP_SPECIAL_DOC = "vLLM: the text leaves out special tokens (false: keeps them, e.g. `<|im_end|>`)"
SPACES_SPECIAL_DOC = (
    "vLLM: spaces between special tokens in the text (slow tokenizers only; fast ones ignore it)"
)
TRUNCATE_DOC = (
    "vLLM: keep only the last N prompt tokens (after rendering), so a long prompt fits instead of being refused; "
    "-1: as many as fit beside max_tokens (the context, the KV cache's share of one request, max_prompt_tokens)"
)
PROMPT_FORMAT_DOC = (
    "How a text prompt becomes tokens: 'chat' (one user message through the model's chat template, with the "
    "assistant's turn opened) or 'raw' (the text as it is). Default: the prefix's own, the format it was trained "
    "with; for the base model, the model's default (/info `default_prompt_format`: 'chat' when it has a chat template)"
)
PromptFormat = Literal["chat", "raw"]
PRIORITY_DOC = (
    "vLLM: scheduling priority, lower starts first and is preempted last (added to the tenant's own tier); "
    "below 0 needs the admin key"
)
Priority = Annotated[int, Field(ge=-1_000_000, le=1_000_000)]
PrefixVersion = Annotated[int, Field(ge=1)]
PREFIX_VERSION_DOC = (
    "Serve this stored version of the prefix (default: the latest); the /v1 routes take it as `model: "
    '"tenant/prefix@version"`'
)
MinP = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
TypicalP = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]


def _not_zero(v: int) -> int:
    if v == 0:
        raise ValueError("must be -1 (as many as fit) or at least 1")
    return v


TruncatePromptTokens = Annotated[int, Field(ge=-1), AfterValidator(_not_zero)]
STOP_TOKEN_IDS_DOC = (
    "vLLM: token ids that end the output (the token is among the output's token ids; its text only with "
    "include_stop_str_in_output)"
)

PRESENCE_DOC = "OpenAI: lowers the logit of every token already generated by this amount (-2..2)"
FREQUENCY_DOC = (
    "OpenAI: lowers each token's logit by this amount times its count in the output so far (-2..2)"
)
REPETITION_DOC = (
    "transformers/vLLM: tokens of the prompt and output get positive logits divided and negative ones multiplied by "
    "this (0.01..2; 1: off; > 1 discourages repeats)"
)


STRUCTURED_DOC = (
    "Constrain the output (vLLM's structured_outputs): exactly one of `json` (a JSON schema), `json_object` (any "
    "JSON object), `regex`, `choice` (one of these strings) or `grammar` (Lark or GBNF)"
)


JsonSchemaValue = dict[str, Any] | bool | str  # a schema, true, or its JSON text
Choices = Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=4096)]


class StructuredOutputsParam(BaseModel):
    """What the output must match; give exactly one of json, json_object, regex, choice, grammar, structural_tag. A
    complete match ends the output (finish_reason `stop`); `max_tokens` can still cut it short (`length`)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    json_schema: JsonSchemaValue | None = Field(
        None,
        alias="json",
        description="A JSON schema (an object, or its JSON text): the output is one such value",
    )
    json_object: bool | None = Field(None, description="true: the output is one JSON object")
    regex: str | None = Field(
        None, min_length=1, description="The whole output matches this regular expression"
    )
    choice: Choices | None = Field(None, description="The output is exactly one of these strings")
    grammar: str | None = Field(
        None, min_length=1, description="A context-free grammar (llguidance's Lark syntax, or GBNF)"
    )
    structural_tag: dict[str, Any] | str | None = Field(
        None,
        description='vLLM\'s structural tags (an object, or its JSON text): {"structures": [{"begin", "schema", '
        '"end"}], "triggers": [...]}: free text, where a trigger must go on as one of the structures that begin '
        "with it, its content following its JSON schema, then its end",
    )
    disable_any_whitespace: bool = Field(
        False,
        description="JSON without whitespace between tokens (keeps small models from emitting blank lines)",
    )


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = Field(max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class StructuralTag(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    begin: str = Field(
        min_length=1, description="The structure's opening text; it starts with one of the triggers"
    )
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="Its content's JSON schema")
    end: str = Field("", description="Its closing text")


class ResponseFormat(BaseModel):
    """OpenAI's response_format: `text` (no constraint), `json_object` or `json_schema` (its `schema`); vLLM's
    `structural_tag` (its `structures` and `triggers`)."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaFormat | None = None
    structures: list[StructuralTag] | None = None
    triggers: list[str] | None = None


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(
        0, description="Prompt tokens whose KV came from the prompt cache (earlier requests of the tenant)"
    )


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


# --------------------------------------------------------------------------------------------- /generate
class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant_id: Name | None = Field(None, description="Tenant; defaults to the API key's tenant")
    prefix: Name | None = Field(
        DEFAULT_PREFIX,
        description=f"Prefix name (null means {DEFAULT_PREFIX!r}); {BASE_PREFIX!r} means the base model, no prefix",
    )
    prefix_version: PrefixVersion | None = Field(None, description=PREFIX_VERSION_DOC)
    prompt: PromptText
    max_tokens: int = Field(64, ge=1)
    temperature: Temperature = 0.0
    top_p: TopP = 1.0
    top_k: TopK = 0
    min_p: MinP = Field(0.0, description=MIN_P_DOC)
    typical_p: TypicalP = Field(1.0, description=TYPICAL_P_DOC)
    watermark: bool = Field(
        False, description="TGI's watermark: a green list of tokens favoured, drawn from the previous token"
    )
    seed: Seed | None = None
    stop: list[StopText] | StopText | None = None
    include_stop_str_in_output: bool = Field(False, description=INCLUDE_STOP_DOC)
    skip_special_tokens: bool = Field(True, description=SKIP_SPECIAL_DOC)
    spaces_between_special_tokens: bool = Field(True, description=SPACES_SPECIAL_DOC)
    prompt_format: PromptFormat | None = Field(None, description=PROMPT_FORMAT_DOC)
    truncate_prompt_tokens: TruncatePromptTokens | None = Field(None, description=TRUNCATE_DOC)
    priority: Priority = Field(0, description=PRIORITY_DOC)
    stream: bool = False
    ignore_eos: bool = Field(False, description="Keep generating past end-of-sequence (benchmarks)")
    presence_penalty: Penalty = Field(0.0, description=PRESENCE_DOC)
    frequency_penalty: Penalty = Field(0.0, description=FREQUENCY_DOC)
    repetition_penalty: RepetitionPenalty = Field(1.0, description=REPETITION_DOC)
    logit_bias: LogitBias | None = Field(None, description=LOGIT_BIAS_DOC)
    min_tokens: int = Field(0, ge=0, description=MIN_TOKENS_DOC)
    stop_token_ids: TokenIdList | None = Field(None, description=STOP_TOKEN_IDS_DOC)
    allowed_token_ids: AllowedTokenIds | None = Field(None, description=ALLOWED_TOKEN_IDS_DOC)
    bad_words: list[StopText] | None = Field(None, description=BAD_WORDS_DOC)
    logprobs: TopLogprobs | None = Field(
        None,
        description="Return each generated token's log-probability under the model and the N most likely tokens "
        "at that step (0: only the token's own)",
    )
    prompt_logprobs: TopLogprobs | None = Field(
        None,
        description="Also return each prompt token's log-probability given the prefix and the tokens before it, and "
        "the N most likely tokens at that position (0: only the token's own): scores a text under a tenant's prefix",
    )
    structured_outputs: StructuredOutputsParam | None = Field(None, description=STRUCTURED_DOC)


class TopLogprob(BaseModel):
    id: int
    text: str
    logprob: float


class TokenLogprobInfo(BaseModel):
    """A generated token: its id, text, log-probability (the model's, before penalties and temperature) and the most
    likely tokens at that step, most likely first."""

    id: int
    text: str
    logprob: float
    top_logprobs: list[TopLogprob]


STOP_REASON: Any = Field(
    None,
    description="What stopped it (as vLLM's): the stop string matched, or the `stop_token_ids` entry sampled; null "
    "for end-of-sequence, a length cut, or while a stream goes on",
)


class GenerateResponse(BaseModel):
    id: str
    tenant_id: str
    prefix: str = Field(description='Prefix name ("base": the base model alone)')
    prefix_version: int | None
    text: str
    finish_reason: Literal["stop", "length"]
    stop_reason: str | int | None = STOP_REASON
    usage: Usage
    logprobs: list[TokenLogprobInfo] | None = Field(
        None, description="With `logprobs`: one per generated token"
    )
    prompt_logprobs: list[TokenLogprobInfo | None] | None = Field(
        None,
        description="With `prompt_logprobs`: one per prompt token, null for the first (a prefix is keys and values "
        "only: nothing predicts the prompt's first token)",
    )


class GenerateChunk(BaseModel):
    """One Server-Sent Event of a streamed /generate: `data: {...}`; the stream ends with `data: [DONE]`."""

    id: str
    tenant_id: str
    prefix: str
    prefix_version: int | None
    text: str
    token_ids: list[int] = Field(
        default_factory=list, description="The tokens generated since the last event"
    )
    finish_reason: Literal["stop", "length"] | None = None
    stop_reason: str | int | None = STOP_REASON
    usage: Usage | None = None
    logprobs: list[TokenLogprobInfo] | None = Field(
        None, description="With `logprobs`: the tokens since the last event"
    )
    prompt_logprobs: list[TokenLogprobInfo | None] | None = Field(
        None,
        description="With `prompt_logprobs`: on the first event only, one per prompt token (null for the first)",
    )


# --------------------------------------------------------------------------------------------- OpenAI
class StreamOptions(BaseModel):
    include_usage: bool = Field(False, description="A last chunk with the whole request's usage")
    continuous_usage_stats: bool = Field(
        False, description="vLLM: with include_usage, every chunk carries its choice's usage so far"
    )


def _refuse_unless_default(v: Any) -> Any:
    """A vLLM field this server does not implement: ignoring it would change what the client gets without a word
    (vLLM ignores unknown fields, but these are ones it honours), so any value but its default is refused."""
    if v not in (None, False, [], {}, ""):
        raise ValueError("not supported by this server (only its default: null)")
    return v


ADD_SPECIAL_DOC = (
    "vLLM: add the tokenizer's special tokens (a BOS) to a text prompt or not; default: as the prompt format does "
    "(raw: the tokenizer's default; chat: what the template writes)"
)

# vLLM fields that change the output, refused rather than ignored (every other unknown field is ignored, as vLLM)
Unsupported = Annotated[Any, AfterValidator(_refuse_unless_default)]
UNSUPPORTED_DOC = "vLLM's; not supported here: any value but null (false, empty) is a 400"

# the longest id `parse_model` takes: tenant/prefix@version, 128-character names and an 18-digit version
MAX_MODEL_ID = 2 * MAX_NAME_LENGTH + 2 + 18


class OpenAIBase(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(
        min_length=1,
        max_length=MAX_MODEL_ID,
        description="'{tenant_id}/{prefix}'; '{tenant_id}' alone means its 'default' prefix, "
        f"'{{tenant_id}}/{BASE_PREFIX}' the base model",
    )
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = Field(None, description="Extension (vLLM): top-k sampling, 0 or -1 disables")
    min_p: MinP | None = Field(None, description="Extension (" + MIN_P_DOC + ")")
    typical_p: TypicalP | None = Field(None, description="Extension (" + TYPICAL_P_DOC + ")")
    seed: Seed | None = None
    stop: list[StopText] | StopText | None = None
    include_stop_str_in_output: bool = Field(False, description="Extension (" + INCLUDE_STOP_DOC + ")")
    skip_special_tokens: bool = Field(True, description="Extension (" + SKIP_SPECIAL_DOC + ")")
    spaces_between_special_tokens: bool = Field(True, description="Extension (" + SPACES_SPECIAL_DOC + ")")
    prompt_logprobs: TopLogprobs | None = Field(
        None,
        description="Extension (vLLM): the log-probability of each prompt token and of the N most likely tokens "
        "there (null for the first; not with stream)",
    )
    truncate_prompt_tokens: TruncatePromptTokens | None = Field(
        None, description="Extension (" + TRUNCATE_DOC + ")"
    )
    priority: Priority = Field(0, description="Extension (" + PRIORITY_DOC + ")")
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="Extension (vLLM): keep generating past end-of-sequence")
    n: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Choices per prompt (each a separate request of the batch; with a seed, choice j draws from "
        "seed + j)",
    )
    presence_penalty: Penalty | None = Field(None, description=PRESENCE_DOC)
    frequency_penalty: Penalty | None = Field(None, description=FREQUENCY_DOC)
    repetition_penalty: RepetitionPenalty | None = Field(
        None, description="Extension (vLLM): " + REPETITION_DOC
    )
    logit_bias: LogitBias | None = Field(None, description=LOGIT_BIAS_DOC)
    min_tokens: int | None = Field(None, ge=0, description="Extension (" + MIN_TOKENS_DOC + ")")
    stop_token_ids: TokenIdList | None = Field(None, description="Extension (" + STOP_TOKEN_IDS_DOC + ")")
    user: str | None = Field(None, max_length=256)
    best_of: int | None = Field(None, ge=1, le=1, description="Only 1 is supported")
    use_beam_search: bool | None = Field(
        None,
        description="Extension (vLLM): beam search; the n best of n beams, best first (deterministic: sampling "
        "fields do not apply; not with stop, penalties, logit_bias, allowed_token_ids, bad_words, min_tokens, "
        "structured outputs, forced tool calls, echo or prompt_logprobs)",
    )
    thinking_token_budget: int | None = Field(
        None,
        ge=0,
        description="Extension (vLLM): a reasoning model writes at most this many tokens inside its thinking; its "
        "closing tag is then forced and the answer follows (needs the server's reasoning parser)",
    )
    length_penalty: float | None = Field(
        None,
        allow_inf_nan=False,
        ge=-10,
        le=10,
        description="Extension (vLLM, with use_beam_search): a beam's score is its summed log-probability over its "
        "length to this power (default 1; above 0 favours longer outputs)",
    )
    allowed_token_ids: AllowedTokenIds | None = Field(
        None, description="Extension (" + ALLOWED_TOKEN_IDS_DOC + ")"
    )
    bad_words: list[StopText] | None = Field(None, description="Extension (" + BAD_WORDS_DOC + ")")
    logits_processors: Unsupported = Field(None, description=UNSUPPORTED_DOC)
    return_token_ids: bool | None = Field(
        None,
        description="Extension (vLLM): the prompt's and the output's token ids beside the text (`prompt_token_ids`, "
        "`token_ids`; streamed: the prompt's with a choice's first chunk, each chunk's own tokens)",
    )
    return_tokens_as_token_ids: bool | None = Field(
        None,
        description="Extension (vLLM): log-probabilities' tokens spelled `token_id:N` (chat: their `bytes` stay the "
        "token's own); prompt_logprobs are not changed",
    )
    prompt_embeds: Unsupported = Field(None, description=UNSUPPORTED_DOC)
    response_format: ResponseFormat | None = Field(
        None,
        description='OpenAI: `{"type": "json_object"}` or `{"type": "json_schema", "json_schema": {name, schema}}`',
    )
    structured_outputs: StructuredOutputsParam | None = Field(
        None, description="Extension (vLLM; not with response_format): " + STRUCTURED_DOC
    )
    # vLLM's earlier names for the same (still sent by older clients; never silently ignored)
    guided_json: JsonSchemaValue | None = Field(None, description="Deprecated: structured_outputs.json")
    guided_regex: str | None = Field(None, min_length=1, description="Deprecated: structured_outputs.regex")
    guided_choice: Choices | None = Field(None, description="Deprecated: structured_outputs.choice")
    guided_grammar: str | None = Field(
        None, min_length=1, description="Deprecated: structured_outputs.grammar"
    )
    guided_whitespace_pattern: str | None = Field(
        None,
        description='Deprecated (vLLM): "" (no whitespace between JSON tokens) is '
        "structured_outputs.disable_any_whitespace; another pattern is refused",
    )
    guided_decoding_backend: str | None = Field(
        None, max_length=64, description="Deprecated (vLLM): accepted and unused (one backend: llguidance)"
    )

    def structured_param(self) -> StructuredOutputsParam | None:
        """structured_outputs, or the same built from the guided_* fields."""
        guided: dict[str, Any] = {
            k: v
            for k, v in (
                ("json", self.guided_json),
                ("regex", self.guided_regex),
                ("choice", self.guided_choice),
                ("grammar", self.guided_grammar),
            )
            if v is not None
        }
        ws = self.guided_whitespace_pattern
        if ws is not None and ws != "":
            raise ValueError(
                "guided_whitespace_pattern: only '' (no whitespace between JSON tokens) is supported; other "
                "patterns are not (structured_outputs.disable_any_whitespace is the same as '')"
            )
        if not guided:
            if ws is not None and self.structured_outputs is not None:
                return self.structured_outputs.model_copy(update={"disable_any_whitespace": True})
            return self.structured_outputs
        if self.structured_outputs is not None:
            raise ValueError("give structured_outputs or the guided_* fields, not both")
        if ws is not None:
            guided["disable_any_whitespace"] = True
        return StructuredOutputsParam.model_validate(guided)


TokenIds = Annotated[list[Annotated[int, Field(ge=0, le=2**31 - 1)]], Field(min_length=1)]


class CompletionRequest(OpenAIBase):
    prompt: (
        PromptText
        | Annotated[list[PromptText], Field(min_length=1, max_length=64)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=64)]
    ) = Field(
        description="A prompt, a list of prompts, or token ids (one list, or a list of lists; used as given, without "
        "the prefix's prompt format). Choice index = prompt index x n + sample index"
    )
    prompt_format: PromptFormat | None = Field(None, description="Extension: " + PROMPT_FORMAT_DOC)
    max_tokens: int | None = Field(
        None,
        ge=0,
        description="Default 16; 0 only with echo (the prompt and its log-probabilities, no output)",
    )
    echo: bool | None = Field(
        None,
        description="Return the prompt before the completion, with its log-probabilities when logprobs is set",
    )
    logprobs: TopLogprobs | None = Field(
        None,
        description="Log-probabilities of the sampled tokens and of the N most likely tokens at each step (with echo: "
        "of the prompt tokens too, null for the first)",
    )
    suffix: Literal[""] | None = Field(None, description="Not supported (null or empty only)")
    add_special_tokens: bool | None = Field(None, description="Extension (" + ADD_SPECIAL_DOC + ")")


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="The arguments as JSON text")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="An assistant turn's earlier tool calls")
    tool_call_id: str | None = Field(None, description="A tool turn: the call it answers")
    reasoning_content: Text | None = Field(
        None, description="An assistant turn's thinking (a reasoning model's), for the chat template"
    )
    reasoning: Text | None = Field(None, description="The same, by vLLM's newer name")


ToolName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: ToolName
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="JSON schema of the arguments (an object)")
    strict: bool | None = None


class ChatTool(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: ToolName


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatTemplateFields(BaseModel):
    """How messages are rendered (vLLM's extensions): the same on /v1/chat/completions and /tokenize."""

    add_generation_prompt: bool = Field(
        True, description="Extension (vLLM): end the prompt with the assistant turn's opening"
    )
    continue_final_message: bool = Field(
        False,
        description="Extension (vLLM): the last message is an assistant message to continue (needs "
        "add_generation_prompt false), e.g. to start the answer with given text",
    )
    chat_template_kwargs: dict[str, Any] | None = Field(
        None,
        max_length=32,
        description="Extension (vLLM): extra variables for the chat template (any JSON: Llama 3.1's "
        "`builtin_tools` is a list)",
    )
    documents: list[dict[str, str]] | None = Field(
        None,
        max_length=128,
        description="Extension (vLLM): documents for a retrieval template that lists them (Command R, Granite; "
        'others ignore them), each e.g. {"title": ..., "text": ...}',
    )
    chat_template: Unsupported = Field(
        None,
        description="vLLM's own template for this request: not supported here (the model's template is used)",
    )


class ChatCompletionRequest(OpenAIBase, ChatTemplateFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    include_reasoning: bool = Field(
        True,
        description="Extension (vLLM): with a reasoning parser, return the thinking (it is never content)",
    )
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = Field(
        None,
        description="Reaches the chat template as `reasoning_effort` (as vLLM's: gpt-oss-style templates read it; "
        "others ignore it)",
    )
    add_special_tokens: bool = Field(
        False,
        description="Extension (vLLM): the tokenizer's special tokens (a BOS) on top of what the chat template writes",
    )
    max_tokens: int | None = Field(None, ge=1, description="Default: up to the server's max_new_tokens")
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = Field(None, description="Return the log-probability of each output token")
    top_logprobs: TopLogprobs | None = Field(
        None, description="With logprobs: also the N most likely tokens at each step"
    )
    tools: list[ChatTool] | None = Field(
        None, max_length=128, description="Functions the model may call (rendered by the chat template)"
    )
    # OpenAI's deprecated form of tools: refused (naming `tools`), never silently ignored
    functions: list[Any] | None = Field(
        None, description="Not supported (deprecated by OpenAI): send `tools`"
    )
    function_call: Any = Field(None, description="Not supported (deprecated by OpenAI): send `tool_choice`")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None,
        description="'auto' (default with tools): calls the model writes as <tool_call>{json}</tool_call> are "
        "parsed; 'required': one or more calls, forced by structured outputs; a named function: that call, forced; "
        "'none': text only",
    )
    parallel_tool_calls: bool | None = Field(None, description="false: at most one call ('required')")
    echo: bool = Field(
        False,
        description="Extension (vLLM): when the last message is the assistant's (continue_final_message), the "
        "answer's content starts with it",
    )
    # the Responses API's truncation "auto": the oldest turns (after the leading system messages) are dropped, whole,
    # until the prompt fits; not a request field
    _drop_turns: bool = PrivateAttr(False)


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completions format; `top_logprobs[i]` maps token text to log-probability for the N most likely
    tokens and the sampled one."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class PromptLogprob(BaseModel):
    """vLLM's prompt logprob entry (keyed by token id)."""

    logprob: float
    rank: int | None = Field(None, description="How many tokens are at least as likely, this one included")
    decoded_token: str | None = None


# one per prompt token (null for the first: nothing comes before it but the prefix)
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None
    stop_reason: str | int | None = STOP_REASON
    prompt_logprobs: PromptLogprobs | None = Field(None, description="Extension (vLLM): with prompt_logprobs")
    prompt_token_ids: list[int] | None = Field(None, description="Extension (vLLM): with return_token_ids")
    token_ids: list[int] | None = Field(None, description="Extension (vLLM): with return_token_ids")


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
    content: str | None
    tool_calls: list[ToolCall] | None = None
    reasoning_content: str | None = Field(
        None, description="Extension (vLLM): a reasoning model's thinking (with a reasoning_parser)"
    )
    reasoning: str | None = Field(None, description="The same, by vLLM's newer name")


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"]
    stop_reason: str | int | None = STOP_REASON
    token_ids: list[int] | None = Field(None, description="Extension (vLLM): with return_token_ids")


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    prompt_logprobs: PromptLogprobs | None = Field(None, description="Extension (vLLM): with prompt_logprobs")
    prompt_token_ids: list[int] | None = Field(None, description="Extension (vLLM): with return_token_ids")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str | None = Field(None, description="The base model")
    prefix_version: int | None = None
    max_model_len: int | None = Field(
        None, description="Context limit: prefix + prompt + output (vLLM's field)"
    )


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
    versions: list[int] | None = Field(
        None,
        description="Every stored version, oldest first: in `GET /prefixes/{tenant_id}/{name}` only (absent elsewhere)",
        exclude_if=lambda v: v is None,
    )
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
    has_more: bool = Field(
        False, description="More prefixes follow this page: ask again with `after=last_id`"
    )
    first_id: str | None = Field(
        None, description="`tenant_id/name` of the page's first prefix (None: empty)"
    )
    last_id: str | None = Field(
        None, description="`tenant_id/name` of the page's last prefix: the next `after`"
    )


class TrainExample(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: Text
    completion: Text = Field(min_length=1)


class InitFrom(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name = Field(description="A prefix of the same tenant (the job's own name continues that prefix)")
    version: int | None = Field(
        None, ge=1, description="Its version (default: the latest, pinned at submission)"
    )


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
    # numbers are checked by the trainer, with the server's limits, as they would be inside `hyperparameters`
    # (one set of bounds whatever the spelling); only their JSON type here (no booleans or strings)
    prefix_length: int | None = Field(
        None,
        strict=True,
        description="Virtual tokens P (default: the trainer's; at most --training-max-prefix-length)",
    )
    epochs: int | None = Field(None, strict=True, description="Passes over the examples (1..100)")
    learning_rate: float | None = Field(None, strict=True, description="AdamW learning rate, in (0, 10]")
    batch_size: int | None = Field(None, strict=True, description="Examples per optimizer step (1..64)")
    max_steps: int | None = Field(
        None, strict=True, description="Optimizer steps at most (caps epochs; at most --training-max-steps)"
    )
    seed: int | None = Field(None, strict=True, description="Seed of the init, data order and held-out split")
    prompt_format: Literal["chat", "raw"] | None = Field(
        None, description="How prompts are rendered in training and later serving (default: the model's)"
    )
    hyperparameters: dict[str, Any] | None = Field(
        None, description="Hyperparameters as one object (the same keys as at the top level; not both)"
    )
    init_from: InitFrom | None = Field(
        None,
        description="Continue training from a stored version instead of a fresh init (its method, prefix length, "
        "prompt format and MLP width unless given); the result is a new version of `name`",
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
    has_more: bool = Field(False, description="More jobs follow this page: ask again with `after=last_id`")
    first_id: str | None = Field(None, description="Job id of the page's first job (None: empty)")
    last_id: str | None = Field(None, description="Job id of the page's last job: the next `after`")


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


class ServerInfo(BaseModel):
    """What a client can plan with (TGI's `/info`): the model, its limits and how this server runs it."""

    version: str = Field(description="PrefixServe's version")
    model: str = Field(description="The base model (its folder or the embedded model's name)")
    model_fingerprint: str = Field(
        description="Prefixes are served only for the base model of this fingerprint"
    )
    architecture: str = Field(description="The model's transformers class")
    model_path: str = Field(
        description="`llama`/`gpt2`: the native fast path; `hf`: transformers' own modeling"
    )
    dtype: str
    device: str
    num_layers: int
    vocab_size: int
    max_model_len: int = Field(description="Context limit: prefix + prompt + output")
    max_request_tokens: int = Field(
        description="Prompt + output tokens one request may hold in the KV cache (half the pool less a block; "
        "kv_cache_mb raises it): requests need both limits"
    )
    max_prompt_tokens: int = Field(description="Longest prompt after rendering; past it 413")
    max_new_tokens: int = Field(description="Largest max_tokens a request may ask for; past it 422")
    max_num_seqs: int = Field(description="Requests decoded in one batch at most")
    max_batched_tokens: int = Field(
        description="Tokens in one engine step at most (prefill chunks + decodes)"
    )
    max_queued: int = Field(description="Requests waiting at most; past it 503 with Retry-After")
    kv_cache: dict[str, int] = Field(description="`blocks`, `block_size` (tokens) and `bytes` of the KV pool")
    prefix_cache_bytes: int = Field(
        description="Budget of device-resident prefix KV (LRU in front of the store)"
    )
    prompt_cache: bool
    speculative_tokens: int
    cuda_graphs: str = Field(description="`cuda`: decode steps replayed as CUDA graphs; `off` otherwise")
    kernels: str = Field(
        description="`triton`: paged attention (decode, and prefill where its kernel starts) and fused kernels in "
        "Triton; `torch` otherwise"
    )
    async_decode: bool = Field(
        description="Greedy decode steps are launched from the previous step's device tokens"
    )
    store: str = Field(description="Prefix store backend: `disk` or `redis`")
    training: bool = Field(description="Training jobs are accepted (`POST /prefixes`)")
    training_workers: int = Field(
        0, description="Training workers inside this server (0: jobs wait for `prefixserve worker` processes)"
    )
    default_prompt_format: str
    served_model_names: list[str] = Field(
        default_factory=list,
        description="`model` values that name a tenant key's base model (served_model_name)",
    )
    reasoning_parser: str = Field(
        "none", description="How a reasoning model's thinking is split off (or none)"
    )
    sampling_defaults: dict[str, float | int] = Field(
        default_factory=dict,
        description="The /v1 routes' defaults for sampling fields a request leaves out, from the model's "
        "generation_config.json (setting generation_config); OpenAI's for the rest",
    )
    tool_call_parser: str


# --------------------------------------------------------------------------------------------- tokenizer
class TokenizeRequest(ChatTemplateFields):
    """A prompt, or chat messages with what /v1/chat/completions takes to render them (the template fields and
    tools count only with messages)."""

    model_config = ConfigDict(extra="forbid")

    tenant_id: Name | None = Field(None, description="Tenant; defaults to the API key's tenant")
    prefix: Name | None = Field(DEFAULT_PREFIX, description="Whose prompt format and length to apply")
    prefix_version: PrefixVersion | None = Field(None, description=PREFIX_VERSION_DOC)
    prompt: PromptText | None = Field(
        None, description="Rendered in the prefix's prompt format (or `prompt_format`), as /generate does"
    )
    prompt_format: PromptFormat | None = Field(None, description=PROMPT_FORMAT_DOC)
    messages: list[ChatMessage] | None = Field(
        None, min_length=1, max_length=1024, description="Rendered with the chat template, as /v1/chat does"
    )
    tools: list[ChatTool] | None = Field(
        None, max_length=128, description="With messages: the tools the chat template describes, as /v1/chat"
    )
    add_special_tokens: bool | None = Field(
        None,
        description=ADD_SPECIAL_DOC
        + "; with messages, on top of what the chat template writes (default: no)",
    )
    model: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_MODEL_ID,
        description="vLLM's way to name the prefix: a /v1 model id ('tenant/prefix[@version]'), instead of "
        "tenant_id, prefix and prefix_version",
    )
    return_token_strs: bool = Field(
        False, description="Extension (vLLM): also each token's string (token_strs)"
    )


class TokenizeResponse(BaseModel):
    tokens: list[int]
    token_strs: list[str] | None = Field(
        None, description="With return_token_strs: each token as the vocabulary has it"
    )
    count: int
    prefix_length: int = Field(description="Positions the prefix takes before the prompt")
    max_model_len: int = Field(description="Context limit: prefix + prompt + output")
    max_request_tokens: int = Field(
        description="Prompt + output one request of this prefix may hold in the KV cache (its share of the pool, "
        "less than /info's where the prefix's own blocks leave less)"
    )
    max_new_tokens: int = Field(description="Largest max_tokens a request may ask for (the server's limit)")
    prompt_format: str


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tokens: list[Annotated[int, Field(ge=0, le=2**31 - 1)]] = Field(max_length=65536)
    model: str | None = Field(
        None, min_length=1, max_length=MAX_MODEL_ID, description="vLLM's: a /v1 model id the caller may use"
    )


class DetokenizeResponse(BaseModel):
    prompt: str


# --------------------------------------------------------------------------------------------- /usage
class UsageCounts(BaseModel):
    requests: int = Field(description="Generation requests admitted (one per HTTP request, whatever its n)")
    completions: int = Field(description="Engine requests that ended (finished, aborted or failed)")
    aborted: int = Field(description="... of which the client left before the end")
    failed: int = Field(description="... of which failed (their tokens are not counted)")
    prompt_tokens: int
    cached_tokens: int = Field(description="Prompt tokens taken from the prompt cache (not computed)")
    completion_tokens: int
    total_tokens: int


class RateLimitState(BaseModel):
    requests_per_minute: int | None
    tokens_per_minute: int | None
    max_concurrent: int | None
    remaining_requests: int | None = Field(
        description="Left of the per-minute request budget now (null: no limit)"
    )
    remaining_tokens: int | None = Field(
        description="Left of the per-minute token budget now (null: no limit)"
    )
    in_flight: int = Field(description="Generation requests of the tenant running or queued now")


class TenantUsageInfo(UsageCounts):
    tenant_id: str
    rejected: int = Field(description="Requests refused by a rate or concurrency limit (429)")
    training_jobs: int = Field(description="Training jobs submitted")
    prefixes: dict[str, UsageCounts] = Field(
        description="The same counts per prefix name ('base': no prefix)"
    )
    limits: RateLimitState


class UsageReport(BaseModel):
    object: Literal["usage"] = "usage"
    since: float = Field(description="Unix time the counts start from (this server process's start)")
    data: list[TenantUsageInfo]
    has_more: bool = Field(False, description="More tenants after this page: ask again with after=last_id")
    last_id: str | None = Field(None, description="The page's last tenant id")
