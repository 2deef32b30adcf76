"""Model loading: embedded SmolLM2 (converted once, cached), local folders, fingerprint, prompt rendering."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import processors
from transformers import BertConfig

from server.model import (
    bundle_from_model,
    compute_fingerprint,
    default_prompt_format,
    ensure_embedded_converted,
    load_model,
    render_messages,
    render_prompt,
    resolve_device,
    resolve_dtype,
    spec_from_config,
)
from server.model import loader as loader_mod
from tests.fixtures.models import make_tiny_causal_lm, make_tiny_gpt2, make_tiny_llama, make_tiny_tokenizer

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.mark.slow
def test_embedded_smollm2_cached_load_and_answer(smollm2_bundle, tmp_path):
    b = smollm2_bundle
    assert b.name == "SmolLM2-135M-Instruct"
    assert b.spec.family == "llama"
    assert (b.spec.num_heads, b.spec.num_kv_heads, b.spec.num_layers, b.spec.hidden_size) == (9, 3, 30, 576)
    im_end = b.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert b.tokenizer.eos_token == "<|im_end|>" and im_end in b.spec.eos_token_ids
    gen_eos = b.hf_model.generation_config.eos_token_id
    assert im_end in (gen_eos if isinstance(gen_eos, list) else [gen_eos])
    assert all(not p.requires_grad for p in b.hf_model.parameters()) and not b.hf_model.training
    folder = ensure_embedded_converted()
    cfg = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in cfg  # a plain float checkpoint, no GGUF quantizer on reload
    # later loads read the converted folder and the cached fingerprint
    times = []
    for _ in range(3):  # best of 3: other processes share this CPU
        t0 = time.perf_counter()
        again = load_model("smollm2", device="cpu")
        times.append(time.perf_counter() - t0)
        assert again.fingerprint == b.fingerprint
    assert min(times) < 2.0, times
    # the fingerprint does not depend on the serving dtype, nor on the cache (fresh cache dir: recomputed)
    bf16 = load_model(str(folder), device="cpu", dtype="bfloat16", cache_dir=tmp_path)
    assert bf16.dtype == torch.bfloat16 and bf16.fingerprint == b.fingerprint
    # it answers
    ids = render_prompt(b.tokenizer, "What is the capital of France?", "chat")
    out = b.hf_model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    assert "Paris" in b.tokenizer.decode(out[0, len(ids) :])


def _save(model, tok, path):
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _tiny(family: str, tok, seed: int = 0):
    if family == "gpt2":
        return make_tiny_gpt2(tok, seed=seed)
    if family == "llama":
        return make_tiny_llama(tok, seed=seed)
    return make_tiny_causal_lm(family, tok, seed, num_key_value_heads=2, max_position_embeddings=256)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gpt2"])
def test_local_folder_families(family, tmp_path):
    tok = make_tiny_tokenizer()
    path = _save(_tiny(family, tok), tok, tmp_path / family)
    b = load_model(path, device="cpu", cache_dir=tmp_path / "cache")
    assert b.spec.family == ("gpt2" if family == "gpt2" else "llama")
    assert b.spec.num_kv_heads == (4 if family == "gpt2" else 2)
    assert b.device == torch.device("cpu") and b.dtype == torch.float32 and b.name == family
    assert all(not p.requires_grad for p in b.hf_model.parameters()) and not b.hf_model.training
    assert b.hf_model.config._attn_implementation == "sdpa"
    assert tok.convert_tokens_to_ids("<|im_end|>") in b.spec.eos_token_ids
    with torch.no_grad():
        out = b.hf_model(input_ids=torch.tensor([[1, 2, 3]]))
    assert out.logits.shape == (1, 3, len(tok))


def test_sliding_window_caps_the_context(caplog):
    """Full attention equals sliding-window attention only within the window: the context is capped there, and
    the log says so once (as for a rotary scaling's cap)."""
    mk = transformers.MistralConfig
    caplog.set_level(logging.WARNING, logger="prefixserve.model")
    capped = mk(sliding_window=64, max_position_embeddings=1024, name_or_path="window-test-model")
    assert spec_from_config(capped).max_positions == 64 and spec_from_config(capped).max_positions == 64
    said = [r.getMessage() for r in caplog.records if "window-test-model" in r.getMessage()]
    assert said == ["window-test-model: sliding-window attention of 64 positions; served within that window (of "
                    "1024 positions)"]  # fmt: skip
    assert spec_from_config(mk(sliding_window=64, max_position_embeddings=1024)).max_positions == 64
    assert spec_from_config(mk(sliding_window=None, max_position_embeddings=1024)).max_positions == 1024
    q2 = transformers.Qwen2Config(sliding_window=64, use_sliding_window=False, max_position_embeddings=1024)
    assert spec_from_config(q2).max_positions == 1024  # configured but unused


def test_fingerprint_stable_and_discriminating(tmp_path, monkeypatch):
    tok = make_tiny_tokenizer()
    path = _save(make_tiny_llama(tok, seed=3), tok, tmp_path / "m")
    a = load_model(path, device="cpu", cache_dir=tmp_path / "c1")
    b = load_model(
        path, device="cpu", dtype="bfloat16", cache_dir=tmp_path / "c2"
    )  # computed again, in bf16 serving
    assert len(a.fingerprint) == 64 and int(a.fingerprint, 16) >= 0
    assert a.fingerprint == b.fingerprint
    assert (a.dtype, b.dtype) == (torch.float32, torch.bfloat16)
    assert a.fingerprint == compute_fingerprint(make_tiny_llama(tok, seed=3), tok)  # in memory == loaded
    assert a.fingerprint != compute_fingerprint(make_tiny_llama(tok, seed=4), tok)  # other weights
    assert a.fingerprint != compute_fingerprint(
        make_tiny_llama(tok, seed=3, rope_theta=500.0), tok
    )  # other config
    assert a.fingerprint != bundle_from_model(make_tiny_gpt2(tok), tok).fingerprint  # other family
    tok2 = make_tiny_tokenizer()
    tok2.add_tokens(["<extra>"])
    assert a.fingerprint != compute_fingerprint(make_tiny_llama(tok, seed=3), tok2)  # other vocabulary
    # restarts read the cached fingerprint (keyed by path + file sizes/mtimes) instead of rehashing
    monkeypatch.setattr(loader_mod, "compute_fingerprint", lambda *a: pytest.fail("rehashed"))
    assert load_model(path, device="cpu", cache_dir=tmp_path / "c1").fingerprint == a.fingerprint
    monkeypatch.undo()
    # ...until the weights change in place
    _save(make_tiny_llama(tok, seed=5), tok, tmp_path / "m")
    c = load_model(path, device="cpu", cache_dir=tmp_path / "c1")
    assert c.fingerprint == compute_fingerprint(make_tiny_llama(tok, seed=5), tok) != a.fingerprint
    # ...even with the same sizes and the modification times pinned (a Nix store, a reproducible image build)
    times = {f: (f.stat().st_atime_ns, f.stat().st_mtime_ns) for f in Path(path).iterdir()}
    _save(make_tiny_llama(tok, seed=6), tok, tmp_path / "m")
    for f, ns in times.items():
        os.utime(f, ns=ns)
    d = load_model(path, device="cpu", cache_dir=tmp_path / "c1")
    assert d.fingerprint == compute_fingerprint(make_tiny_llama(tok, seed=6), tok) != c.fingerprint


def test_unsupported_or_missing_models_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unsupported model_type 'bert'"):
        spec_from_config(BertConfig())
    BertConfig(num_hidden_layers=1).save_pretrained(
        tmp_path / "bert"
    )  # no weights: refused before loading them
    with pytest.raises(
        ValueError, match=r"unsupported model_type 'bert'.*llama, mistral, qwen2, qwen3, gpt2"
    ):
        load_model(str(tmp_path / "bert"), cache_dir=tmp_path / "c")
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_model(str(tmp_path / "empty-or-hub-id"))
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(str(tmp_path / "bert"), dtype="int4")


def test_device_and_dtype_resolution():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", cuda) == torch.bfloat16
    assert (
        resolve_dtype("float16", cpu) == torch.float16 and resolve_dtype("bfloat16", cuda) == torch.bfloat16
    )
    assert resolve_dtype(torch.float64, cpu) == torch.float64
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == cpu


class _FakeQuantizer:
    pass


def test_embedded_conversion_is_atomic(tmp_path, monkeypatch):
    """A crash while writing leaves no folder that a later load would pick up; the next start converts again.
    (The GGUF loading is replaced by a tiny model: this is about the write, the real conversion is tested above.)"""

    def gguf_tokenizer(*_a, **kw):
        assert kw.get("gguf_file") == loader_mod.EMBEDDED_GGUF
        t = make_tiny_tokenizer()
        t.eos_token = "<|endoftext|>"  # as a GGUF might say; the chat model must stop at <|im_end|>
        t.save_pretrained = crash if crashing else t.save_pretrained
        return t

    def gguf_model(*_a, **kw):
        assert kw.get("gguf_file") == loader_mod.EMBEDDED_GGUF and kw.get("local_files_only")
        m = make_tiny_llama(seed=9)
        m.hf_quantizer = _FakeQuantizer()
        m.config.quantization_config = {"quant_method": "gguf"}
        return m

    def crash(*_a, **_kw):
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", gguf_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", gguf_tokenizer)
    target = tmp_path / "models" / "smollm2-135m-instruct"
    crashing = True
    with pytest.raises(RuntimeError, match="killed"):
        ensure_embedded_converted(tmp_path)
    assert not target.exists()
    assert not list(target.parent.glob(".tmp-convert-*"))  # cleaned up
    crashing = False
    assert ensure_embedded_converted(tmp_path) == target
    assert "quantization_config" not in json.loads((target / "config.json").read_text())
    tok = make_tiny_tokenizer()
    im_end, eot = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    assert json.loads((target / "generation_config.json").read_text())["eos_token_id"] == [im_end, eot]
    monkeypatch.undo()
    b = load_model(None, device="cpu", cache_dir=tmp_path)  # the converted folder, loaded for real
    assert b.name == "SmolLM2-135M-Instruct" and b.tokenizer.eos_token == "<|im_end|>"
    assert b.fingerprint == compute_fingerprint(make_tiny_llama(seed=9), b.tokenizer)
    assert set(b.spec.eos_token_ids) == {im_end, eot}


def test_prompt_rendering_is_one_function():
    tok = make_tiny_tokenizer()
    assert default_prompt_format(tok) == "chat"
    chat = render_prompt(tok, "hi", "chat")
    assert tok.decode(chat) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert chat == render_messages(tok, [{"role": "user", "content": "hi"}])
    two = render_messages(tok, [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])
    assert tok.decode(two).startswith("<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nu")
    assert tok.decode(render_prompt(tok, "hi", "raw")) == "hi"
    with pytest.raises(ValueError, match="unknown prompt format"):
        render_prompt(tok, "hi", "xml")
    tok.chat_template = None
    assert default_prompt_format(tok) == "raw"
    with pytest.raises(ValueError, match="chat template"):
        render_prompt(tok, "hi", "chat")


def test_raw_adds_bos_only_when_the_tokenizer_does():
    tok = make_tiny_tokenizer()
    bos = tok.convert_tokens_to_ids("<|im_start|>")
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)]
    )
    raw = render_prompt(tok, "hi", "raw")
    assert raw[0] == bos and tok.decode(raw[1:]) == "hi"
    chat = render_prompt(tok, "hi", "chat")
    assert chat.count(bos) == 2  # the template's own markers only: no extra BOS in front


def test_embedded_conversion_survives_another_process_sweep_after_a_clock_step(tmp_path, monkeypatch):
    """Leftover conversion folders are swept by age; a conversion under way in another process holds its folder's
    lock, so a sweep run while the wall clock reads two hours later leaves it alone (and the conversion ends whole),
    while a dead conversion's folder of the same age is removed."""
    parent = tmp_path / "models"
    parent.mkdir()
    dead = parent / ".tmp-convert-dead"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"x")
    swept: list[list[str]] = []

    def sweep_meanwhile(*_a: object, **_kw: object) -> None:
        later = time.time() + 7200.0
        with pytest.MonkeyPatch.context() as clock:
            clock.setattr(loader_mod.time, "time", lambda: later)
            loader_mod._remove_stale_temp_dirs(parent)  # as another process starting its conversion would
        swept.append(sorted(p.name for p in parent.glob(".tmp-convert-*")))

    def gguf_tokenizer(*_a, **_kw):
        t = make_tiny_tokenizer()
        save = t.save_pretrained

        def save_after_sweep(path, *a, **kw):
            sweep_meanwhile()
            return save(path, *a, **kw)

        t.save_pretrained = save_after_sweep
        return t

    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", lambda *_a, **_kw: make_tiny_llama()
    )
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", gguf_tokenizer)
    target = ensure_embedded_converted(tmp_path)
    assert len(swept) == 1 and len(swept[0]) == 1 and swept[0][0] != dead.name  # ours kept, the dead one gone
    assert (target / "config.json").exists() and (target / "tokenizer_config.json").exists()
    assert not list(parent.glob(".tmp-convert-*"))


def test_a_killed_conversions_folder_goes_at_a_later_start_once_the_cache_exists(tmp_path):
    """SIGTERM during start-up exits at once (no clean-up runs): its conversion's temp folder (~200 MB) stayed for
    good, since the sweep ran only while converting, spared folders under an hour old, and once a later start had
    converted none converted again. Every load sweeps now, and a folder whose lock is free is a dead conversion's
    a minute on; a folder younger than that (between its creation and its lock) is left."""
    models = tmp_path / "models"
    target = models / "smollm2-135m-instruct"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    dead, young = models / ".tmp-convert-dead", models / ".tmp-convert-young"
    for d in (dead, young):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x" * 100)
    minutes_ago = time.time() - 120
    os.utime(dead, (minutes_ago, minutes_ago))
    assert ensure_embedded_converted(tmp_path) == target
    assert not dead.exists() and young.exists()
