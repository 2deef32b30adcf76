"""Server settings: `PREFIXSERVE_*` environment variables, overridden by CLI flags (`prefixserve serve --help`).

Every field maps to the environment variable `PREFIXSERVE_<FIELD>` (case-insensitive), e.g. `PREFIXSERVE_STORE_URL`.
Secrets (`api_keys`, `admin_key`) are `SecretStr`: they never show up in reprs, logs or error messages.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_origin
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from prefix_store import check_store_url, default_store_url, expand_home
from prefix_store.names import is_valid_name
from server.env import ENV_PREFIX, env_get

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def optional_number(annotation: Any) -> type | None:
    """int or float for a setting typed `int | None` / `float | None` (one that `none` sets to None), else None."""
    args = getattr(annotation, "__args__", ())
    num = [a for a in args if a in (int, float)]
    return num[0] if num and type(None) in args else None


class Settings(BaseSettings):
    # hide_input_in_errors: a refused URL holds a password, an api_keys_file line a key
    # env_ignore_empty: `PREFIXSERVE_HOST=` is unset, not "" (which uvicorn binds as every interface)
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        validate_default=True,
        hide_input_in_errors=True,
        env_ignore_empty=True,
    )

    # ------------------------------------------------------------------ model and store
    model: str = Field(
        "smollm2",
        description="Base model: 'smollm2' (embedded SmolLM2-135M-Instruct) or a local Hugging Face model folder",
    )
    store_url: str = Field(
        default_factory=lambda: default_store_url(env_get(ENV_PREFIX + "HOME")),
        description="Prefix store: file:///abs/path or redis://host:port/db[?prefix=ns]; add keep_versions=N to "
        "keep only the newest N versions of each prefix; default: $PREFIXSERVE_HOME if set",
    )
    jobs_url: str | None = Field(
        None, description="Training job queue location (default: next to the prefix store)"
    )
    cache: str | None = Field(
        None, description="Model conversion cache folder (default: ~/.cache/prefixserve)"
    )
    device: str = Field("auto", description="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    dtype: str = Field("auto", description="'auto', 'float32', 'bfloat16', 'float16'")

    # ------------------------------------------------------------------ HTTP
    host: str = Field("127.0.0.1", description="Bind address")
    port: int = Field(8000, ge=0, le=65535, description="Bind port")
    ssl_keyfile: Path | None = Field(
        None,
        description="HTTPS: the server certificate's private key (PEM, not encrypted), with ssl_certfile; default: "
        "plain HTTP",
    )
    ssl_certfile: Path | None = Field(
        None,
        description="HTTPS: the server certificate (PEM, intermediates after it; it may hold the key too, then "
        "ssl_keyfile may be left out)",
    )
    ssl_ca_certs: Path | None = Field(
        None,
        description="Mutual TLS: CA certificates (PEM) that client certificates must be signed by (needs "
        "ssl_cert_reqs optional or required)",
    )
    ssl_cert_reqs: Literal["none", "optional", "required"] = Field(
        "none",
        description="Client certificates: 'none' (not asked for), 'optional' (verified against ssl_ca_certs if "
        "sent), 'required' (a connection without one signed by ssl_ca_certs fails its handshake); vLLM's 0, 1, 2 "
        "are accepted",
    )

    # ------------------------------------------------------------------ auth
    api_keys: SecretStr | None = Field(
        None, description="Tenant API keys 'tenantA:keyA,tenantB:keyB' (a tenant may have several keys)"
    )
    api_keys_file: Path | None = Field(
        None, description="File with one 'tenant:key' per line ('#' comments); merged with api_keys"
    )
    admin_key: SecretStr | None = Field(
        None, description="Operator key: every tenant, admin routes, metrics if metrics_require_admin"
    )
    metrics_require_admin: bool = Field(
        False, description="Require the admin key for GET /metrics (needs an admin key; an open server warns)"
    )
    cors_allow_origins: str | None = Field(
        None,
        description="Origins browsers may call the API from (CORS: 'https://app.example.com,...', or '*' for any); "
        "default: none, no CORS headers",
    )

    # ------------------------------------------------------------------ limits
    max_prompt_tokens: int = Field(4096, ge=1, description="Longest prompt after rendering (413 above)")
    max_new_tokens: int = Field(
        4096, ge=1, description="Largest max_tokens a request may ask for (422 above)"
    )
    max_model_len: int | None = Field(
        None, ge=2, description="Context limit prefix+prompt+output (default: min(model limit, 8192))"
    )
    max_queued: int = Field(
        1024,
        ge=1,
        description="Requests waiting beyond the batch's free rows (max_num_seqs) before 503 + Retry-After",
    )
    max_concurrent_per_tenant: int = Field(
        64, ge=1, description="Generation requests in flight per tenant before 429 + Retry-After"
    )
    max_jobs_per_tenant: int = Field(2, ge=1, description="Queued + running training jobs per tenant (429)")
    jobs_kept_per_tenant: int = Field(
        1000,
        ge=1,
        description="Finished training jobs kept per tenant: about every tenth of this many submissions (per "
        "server) deletes the tenant's oldest finished ones past it, sparing as many again that an Idempotency-Key "
        "still answers with (24 h)",
    )
    jobs_retention_s: float = Field(
        7 * 86400.0,
        ge=0,
        allow_inf_nan=False,
        description="How long a finished training job is kept (its record, for GET /prefixes/jobs); 0: until "
        "`jobs_kept_per_tenant` deletes it. Applied by the process that ends the job (set it on workers too)",
    )
    tenant_requests_per_minute: int | None = Field(
        None,
        ge=1,
        description="Generation requests per minute per tenant (429 + Retry-After above; none: unlimited)",
    )
    tenant_tokens_per_minute: int | None = Field(
        None,
        ge=1,
        description="Tokens per minute per tenant, prompt + max_tokens charged at admission and the unused part "
        "refunded (429 + Retry-After above; none: unlimited)",
    )
    limits_url: str | None = Field(
        None,
        description="redis://host:port/db[?prefix=ns] shared by replicas for per-tenant rate limits and usage counts "
        "(which then outlive restarts); default: each server process counts alone",
    )
    tenant_limits_file: Path | None = Field(
        None,
        description="JSON of per-tenant limits: {tenant or '*': {requests_per_minute, tokens_per_minute, "
        "max_concurrent, priority}}; '*' sets every tenant's defaults, a tenant's entry overrides them field by field",
    )
    config_reload_s: float = Field(
        2.0,
        ge=0,
        description="How often api_keys_file, tenant_limits_file and the ssl_* files are checked for changes (0: "
        "never); a change applies once the file has stayed the same for one interval, a bad file is logged and the "
        "old one kept",
    )
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Largest request body (413 above)")
    max_upload_bytes: int = Field(
        67_108_864,
        ge=1024,
        description="Largest prefix upload (POST /prefixes/{tenant_id}/{name}/upload: an export or a PEFT adapter; "
        "413 above)",
    )
    max_upload_prefix_length: int = Field(
        1024,
        ge=1,
        description="Longest prefix (positions) an upload may store (413 above; never less than "
        "training_max_prefix_length); checked before a PEFT adapter's kv is computed, whose few bytes of weights "
        "can stand for a kv thousands of times their size",
    )
    max_concurrent_uploads: int = Field(
        2,
        ge=1,
        description="Prefix uploads received and parsed at once, one per tenant (each holds up to max_upload_bytes "
        "and its tensors in memory); more get 503 with Retry-After",
    )
    max_concurrent_downloads: int = Field(
        4,
        ge=1,
        description="Prefix downloads read from the store and encoded at once (each holds its record about three "
        "times in memory meanwhile); more get 503 with Retry-After",
    )
    max_stop_strings: int = Field(16, ge=0, description="Most stop strings per request (422 above)")
    max_stop_chars: int = Field(256, ge=1, description="Longest stop string in characters (422 above)")
    max_best_of: int = Field(
        2, ge=1, le=64, description="Most sequences a TGI request's best_of may sample (TGI's --max-best-of)"
    )
    watermark_gamma: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="A watermarked request's green list: this share of the vocabulary (TGI's WATERMARK_GAMMA)",
    )
    watermark_delta: float = Field(
        2.0,
        ge=0,
        le=100,
        description="What a watermarked request adds to its green list's logits (TGI's WATERMARK_DELTA)",
    )
    max_logprob_entries: int = Field(
        262_144,
        ge=1,
        description="Most log-probability entries one request may ask for in all (choices x tokens x (top "
        "alternatives + 1), prompt tokens with prompt_logprobs or echo included; 422 above): each is JSON to build "
        "and send",
    )
    max_logprobs: int = Field(
        20,
        ge=0,
        le=1000,
        description="Most top log-probabilities per generated token a request may ask for (422 above)",
    )
    retry_after_s: int = Field(1, ge=1, description="Retry-After seconds sent with 429 and 503")

    # ------------------------------------------------------------------ engine
    kv_cache_mb: int | None = Field(
        None,
        ge=1,
        description="KV cache pool (prefixes + requests) in MiB (default: 512, or more where one request at the "
        "full context, max_model_len, needs it)",
    )
    prefix_cache_mb: int | None = Field(
        None, ge=1, description="Budget for device-resident prefixes in MiB (default: half the pool)"
    )
    max_num_seqs: int = Field(64, ge=1, description="Most requests in one running batch")
    max_batched_tokens: int = Field(2048, ge=16, description="Most tokens (prefill + decode) in one step")
    long_prefill_token_threshold: int | None = Field(
        None,
        ge=0,
        description="While other requests decode, a prompt computes at most this many tokens a step, so a long "
        "prompt does not hold their streams (0: no cap; default: 256 on CPU, none on CUDA)",
    )
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: torch's)")
    prompt_cache: bool = Field(
        True,
        description="Reuse the KV of identical leading prompt tokens of earlier requests of the same tenant and prefix "
        "(full blocks; free blocks keep it until reused)",
    )
    scheduling_policy: Literal["fair", "fcfs"] = Field(
        "fair",
        description="Order in which waiting requests start: 'fair' lets tenants take turns (the tenant with the fewest "
        "running requests first), 'fcfs' is arrival order",
    )
    generation_config: Literal["auto", "ignore"] = Field(
        "auto",
        description="'auto': a /v1 request's sampling fields it leaves out (temperature, top_p, top_k, min_p, "
        "repetition_penalty) default to the model's generation_config.json where it sets them, as vLLM's "
        "--generation-config auto; 'ignore': OpenAI's defaults",
    )
    base_prompt_format: Literal["auto", "chat", "raw"] = Field(
        "auto",
        description="How a text prompt reaches the base model (no prefix): 'auto' is 'chat' for a model with a chat "
        "template (as a chat-trained prefix's prompts), else 'raw'; 'raw' is vLLM's /v1/completions (text as sent)",
    )
    served_model_name: str | None = Field(
        None,
        description="Names (comma-separated) that a tenant key's /v1 `model` may give for its tenant on the base model, "
        "as vLLM's --served-model-name (e.g. 'HuggingFaceTB/SmolLM2-135M-Instruct'); default: the model's name",
    )
    reasoning_parser: Literal[
        "none", "deepseek_r1", "qwen3", "glm45", "olmo3", "step3", "minimax_m2", "seed_oss"
    ] = Field(
        "none",
        description="Reasoning models (vLLM's --reasoning-parser): a chat's <think>...</think> becomes the message's "
        "reasoning_content; 'deepseek_r1': the template opens the thinking (R1 and its distills, Qwen3 Thinking; also "
        "olmo3, step3, minimax_m2, and seed_oss with <seed:think> tags); 'qwen3': the model opens it (Qwen3 hybrid; "
        "also glm45); a structured output's or forced tool call's grammar holds the answer after the thinking",
    )
    tool_call_parser: Literal[
        "auto", "hermes", "llama3_json", "mistral", "pythonic", "qwen3_coder", "granite", "phi4_mini_json"
    ] = Field(
        "auto",
        description="How tool_choice 'auto' finds the calls a model writes: 'hermes' (<tool_call> blocks), "
        "'llama3_json', 'mistral' ([TOOL_CALLS]), 'pythonic' ([f(a=1)]), 'qwen3_coder' (<function=f><parameter=a>), "
        "'granite' (<|tool_call|>[...]), 'phi4_mini_json' (functools[...]); 'auto' picks what the chat template asks for",
    )
    speculative_tokens: int = Field(
        0,
        ge=0,
        le=16,
        description="Speculative decoding by prompt lookup: up to this many tokens drafted a step from the request's "
        "own earlier text and verified in one forward (requests without penalties, logit_bias, allowed_token_ids, "
        "bad_words, min_tokens, a watermark, structured outputs or seeded sampling; greedy outputs unchanged, sampled "
        "ones equally distributed); 0 turns it off",
    )
    cpu_packed_weights: bool | None = Field(
        None,
        description="CPU float32, or bfloat16 on CPUs with native bf16 (AVX512-BF16/AMX): oneDNN-prepacked linear "
        "weights (faster decode, one more copy of the weights; default: on where available)",
    )
    kernels: Literal["auto", "triton", "torch"] = Field(
        "auto",
        description="'triton': attention as Triton paged kernels over the block tables (decode and prefill) and, "
        "for Llama-family models, fused norm/rotary/activation kernels (needs CUDA); 'torch': torch ops only; "
        "'auto': 'triton' on CUDA when triton is installed and works there",
    )
    async_decode: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Launch each decode step from the previous step's tokens on the device, preparing it "
        "while the previous one runs ('auto': on CUDA, unless speculative decoding is on)",
    )
    stream_interval: int = Field(
        1,
        ge=1,
        le=1024,
        description="As vLLM's: a request's tokens reach its stream (and the server) at least this many at a time "
        "(its first token and its end at once); above 1, fewer frames and less work per token on a busy server, "
        "in coarser steps",
    )
    prefix_meta_ttl_s: float = Field(
        10.0,
        ge=0,
        description="How long resolved prefix metadata is reused without asking the store (store events drop "
        "it sooner; past it, it is still served while one lookup refreshes it)",
    )

    # ------------------------------------------------------------------ training
    training_workers: int = Field(1, ge=0, description="Training workers inside the server process (0: none)")
    training_threads: int | None = Field(
        None,
        ge=1,
        description="Intra-op threads of each in-process training job; default: half the cores (serving keeps the "
        "rest)",
    )
    training_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="Niceness of in-process training threads (Linux): serving wins the CPU when both want it; 0: "
        "as serving",
    )
    training_max_seconds: float | None = Field(
        3600.0,
        gt=0,
        allow_inf_nan=False,
        description="Training time of one job: past it, training ends after the step under way and the job "
        "succeeds with the prefix trained so far (summary `stopped: time_limit`); none: unlimited",
    )
    training_max_steps: int = Field(
        100_000, ge=1, description="Optimizer steps of one training job (422 above)"
    )
    training_max_examples: int = Field(1000, ge=1, description="Examples of one training job (422 above)")
    training_max_total_tokens: int = Field(
        200_000,
        ge=1,
        description="Prompt + completion tokens over all examples of one training job (422 above)",
    )
    training_max_prefix_length: int = Field(256, ge=1, description="Prefix length a training job may ask for")

    # ------------------------------------------------------------------ lifecycle and logs
    shutdown_grace_s: float = Field(30.0, ge=0, description="SIGTERM: how long in-flight requests may finish")
    log_level: str = Field("info", description="debug, info, warning, error")
    log_json: bool = Field(True, description="JSON log lines (one per request) instead of plain text")
    log_prompts: bool = Field(
        False, description="Include prompt text in request log lines (off: never logged)"
    )
    log_stats_interval_s: float = Field(
        10.0,
        ge=0,
        allow_inf_nan=False,
        description="Every this many seconds while requests run, one log line of throughput, running and waiting "
        "requests, KV-cache use and cache hit rates (as vLLM's); 0: none",
    )

    @field_validator("*", mode="before")
    @classmethod
    def _none(cls, v: Any, info: ValidationInfo) -> Any:
        """`none` as a flag or env value of an optional number: what None means there (no limit, or automatic)."""
        unset = isinstance(v, str) and v.strip().lower() in ("none", "null", "")
        annotation = cls.model_fields[str(info.field_name)].annotation
        if unset and optional_number(annotation) is not None:
            return None
        if isinstance(v, str) and (
            annotation is bool or get_origin(annotation) is Literal or info.field_name in ("dtype", "device")
        ):
            # a choice or a switch is read as `serve`'s log_level always was: FCFS, Float16, "true " (a numbers'
            # surrounding spaces were already let through)
            v = v.strip() if annotation is bool else v.strip().lower()
        return v

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        v = v.lower()
        if v not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
        return v

    @field_validator("store_url")
    @classmethod
    def _expand_store(cls, v: str) -> str:
        _check_scheme(v, "store_url", STORE_SCHEMES)
        v = expand_home(v)
        check_store_url(v)  # a relative file path, keep_versions=0, a Redis db that is not a number
        return v

    @field_validator("jobs_url")
    @classmethod
    def _jobs_scheme(cls, v: str | None) -> str | None:
        # a mistyped scheme would otherwise be a folder named after it: a job queue no worker reads
        if v is None:
            return v
        _check_scheme(v, "jobs_url", STORE_SCHEMES)
        v = expand_home(v)
        check_store_url(v)
        return v

    @field_validator("limits_url")
    @classmethod
    def _limits_scheme(cls, v: str | None) -> str | None:
        if v is not None:
            _check_scheme(v, "limits_url", REDIS_SCHEMES)
            check_store_url(v)  # (its port and db, as a store's)
        return v

    @field_validator("ssl_cert_reqs", mode="before")
    @classmethod
    def _cert_reqs(cls, v: Any) -> Any:
        # vLLM's and uvicorn's --ssl-cert-reqs is ssl.CERT_NONE/OPTIONAL/REQUIRED as a number; Python's names too
        if isinstance(v, bool):
            return v  # (not a number here: refused as not one of the choices)
        if isinstance(v, int):
            v = str(v)
        return cert_reqs_choice(v) if isinstance(v, str) else v

    @field_validator("ssl_keyfile", "ssl_certfile", "ssl_ca_certs")
    @classmethod
    def _expand_tls_path(cls, v: Path | None) -> Path | None:
        return None if v is None else v.expanduser()

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        if v not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {v!r}")
        return v

    @model_validator(mode="after")
    def _compatible(self) -> Settings:
        if self.async_decode == "on" and self.speculative_tokens > 0:
            raise ValueError(
                "async_decode on cannot run with speculative_tokens > 0 (a step's drafts need the tokens "
                "sampled before it); use async_decode auto or off"
            )
        self._check_tls()
        return self

    def _check_tls(self) -> None:
        """The TLS settings go together (their files are read by `server.tls.check_tls_files`, at start-up)."""
        if self.ssl_keyfile is not None and self.ssl_certfile is None:
            raise ValueError(
                f"{setting_name('ssl_keyfile')} is set but {setting_name('ssl_certfile')} is not: HTTPS needs the "
                "server certificate as well as its key"
            )
        if self.ssl_certfile is None and (self.ssl_ca_certs is not None or self.ssl_cert_reqs != "none"):
            given = "ssl_ca_certs" if self.ssl_ca_certs is not None else "ssl_cert_reqs"
            raise ValueError(
                f"{setting_name(given)} is set but {setting_name('ssl_certfile')} is not: client certificates are "
                "asked for only over HTTPS (set ssl_certfile and ssl_keyfile)"
            )
        if self.ssl_cert_reqs != "none" and self.ssl_ca_certs is None:
            raise ValueError(
                f"{setting_name('ssl_cert_reqs')} {self.ssl_cert_reqs} needs {setting_name('ssl_ca_certs')}: the "
                "CA certificates that client certificates are verified against"
            )
        if self.ssl_ca_certs is not None and self.ssl_cert_reqs == "none":
            # (uvicorn, and vLLM with its default --ssl-cert-reqs 0, would load the CA and never ask a client for a
            # certificate: a server its operator believes closed to clients without one)
            raise ValueError(
                f"{setting_name('ssl_ca_certs')} is set but {setting_name('ssl_cert_reqs')} is none, so no client "
                "certificate would be asked for: set ssl_cert_reqs to required (vLLM's 2) or optional (1), or unset "
                "ssl_ca_certs"
            )

    # ------------------------------------------------------------------ helpers
    @property
    def auth_enabled(self) -> bool:
        return bool(self.tenant_keys()) or self.admin_key is not None

    @property
    def ssl_enabled(self) -> bool:
        """The server speaks HTTPS (only): a certificate is set."""
        return self.ssl_certfile is not None

    def served_model_names(self) -> tuple[str, ...]:
        """`served_model_name`'s names (empty: the model's own name is used)."""
        return tuple(n.strip() for n in (self.served_model_name or "").split(",") if n.strip())

    def tenant_keys(self) -> dict[str, str]:
        """key -> tenant id, from `api_keys` and `api_keys_file` (raises ValueError on malformed entries)."""
        out: dict[str, str] = {}
        entries: list[tuple[str, str]] = []
        if self.api_keys is not None:
            for i, item in enumerate(self.api_keys.get_secret_value().split(",")):
                if item.strip():
                    entries.append((f"PREFIXSERVE_API_KEYS entry {i + 1}", item))
        if self.api_keys_file is not None:
            text = (
                Path(self.api_keys_file).expanduser().read_text(encoding="utf-8-sig")
            )  # (a BOM: Windows editors)
            for n, line in enumerate(text.splitlines(), 1):
                line = line.strip()
                if line and not line.startswith("#"):
                    entries.append((f"{self.api_keys_file} line {n}", line))
        for where, item in entries:
            tenant, sep, key = item.strip().partition(":")
            tenant, key = tenant.strip(), key.strip()
            if not sep or not key:
                raise ValueError(f"{where}: expected 'tenant:key'")  # never echo the entry: it holds a key
            if not is_valid_name(tenant):
                raise ValueError(f"{where}: invalid tenant id (letters, digits, '.', '_', '-')")
            if key in out and out[key] != tenant:
                raise ValueError(f"{where}: the same key is given to two tenants")
            if self.admin_key is not None and key == self.admin_key.get_secret_value():
                raise ValueError(f"{where}: a tenant key equals the admin key")
            out[key] = tenant
        if self.api_keys_file is not None and not out and self.admin_key is None:
            # a keys file mounted before it was filled in must not start a server open to every caller
            raise ValueError(
                f"PREFIXSERVE_API_KEYS_FILE {self.api_keys_file}: no 'tenant:key' line, so the server would be "
                "open to everyone (unset it to run an open server on purpose)"
            )
        return out

    def public_dict(self) -> dict[str, Any]:
        """Settings without secrets (start-up log): keys, and the passwords of store, jobs and limits URLs."""
        d = self.model_dump(exclude={"api_keys", "admin_key"})
        d["api_keys"] = "<set>" if self.api_keys else None
        d["admin_key"] = "<set>" if self.admin_key else None
        for k in ("store_url", "jobs_url", "limits_url"):
            d[k] = redact_url(d[k])
        return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


# vLLM's (and uvicorn's) --ssl-cert-reqs numbers: ssl.CERT_NONE, ssl.CERT_OPTIONAL, ssl.CERT_REQUIRED
CERT_REQS = {"0": "none", "1": "optional", "2": "required"}


def cert_reqs_choice(given: str) -> str:
    """An ssl_cert_reqs value as its choice: vLLM's numbers, Python's names (CERT_REQUIRED), any case."""
    v = given.strip().lower().removeprefix("cert_")
    return CERT_REQS.get(v, v)


def setting_name(field: str) -> str:
    """How a setting is named to the user: its variable and its flag."""
    return f"{ENV_PREFIX}{field.upper()} / --{field.replace('_', '-')}"


STORE_SCHEMES = ("", "file", "redis", "rediss", "unix")  # "": a plain path
REDIS_SCHEMES = ("redis", "rediss", "unix")


def _check_scheme(url: str, field: str, allowed: tuple[str, ...]) -> str:
    scheme = urlsplit(url).scheme.lower()
    if scheme not in allowed:
        kinds = " or ".join(f"{s}://" for s in allowed if s) + (" or a path" if "" in allowed else "")
        raise ValueError(f"{field}: unsupported scheme {scheme!r} in {redact_url(url)!r}: use {kinds}")
    return url


def redact_url(url: str | None) -> str | None:
    """`url` with the password of its user info (redis://:pw@host, redis://user:pw@host) and a `password` query
    parameter replaced by ***."""
    if not url:
        return url
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        # the user info ends at the last "@": a password may hold "/", "?" or "#" that urlsplit would take for
        # the end of the host (over-redacting an "@" in a query is the safe side)
        userinfo, _, tail = rest.rpartition("@")
        if ":" in userinfo:
            rest = f"{userinfo.partition(':')[0]}:***@{tail}"
    return re.sub(r"(?i)([?&]password=)[^&#]*", r"\1***", f"{scheme}{sep}{rest}")


def settings_from(
    overrides: dict[str, Any] | None = None, fixed: Mapping[str, Any] | None = None
) -> Settings:
    """Environment + `.env`-free defaults, overridden by non-None `overrides` (CLI flags); `fixed`'s fields are
    those values whatever the environment says (None included)."""
    kw = {k: v for k, v in (overrides or {}).items() if v is not None and k in Settings.model_fields}
    return Settings(**{**kw, **(fixed or {})})


# PREFIXSERVE_* variables that are not settings: the model cache and the default store folder, the client SDK's,
# and the container probe's client certificate (server/healthcheck.py)
OTHER_ENV = frozenset({"CACHE", "HOME", "API_KEY", "BASE_URL", "HEALTHCHECK_CERTFILE", "HEALTHCHECK_KEYFILE"})


def unknown_env(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """The PREFIXSERVE_* variables no setting reads (a typo is ignored without a word otherwise), each with the
    closest setting's variable, if one is close."""
    import difflib

    known = [f.upper() for f in Settings.model_fields] + sorted(OTHER_ENV)
    out = []
    for name in sorted(environ):
        rest = name[len(ENV_PREFIX) :].upper()  # (settings read their variables whatever the case)
        if name.upper().startswith(ENV_PREFIX) and rest not in known and not rest.startswith("CLI_UNREAD_"):
            close = difflib.get_close_matches(rest, known, n=1, cutoff=0.8)
            # (a flag's spelling as a variable: PREFIXSERVE_STORE for --store, the setting being STORE_URL)
            close = close or sorted(k for k in known if k.startswith(rest + "_"))[:1]
            out.append((name, ENV_PREFIX + close[0] if close else None))
    return out
