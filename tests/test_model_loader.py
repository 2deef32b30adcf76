"""Model loading: embedded SmolLM2 (cached conversion), local folders, fingerprint, prompt rendering."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import BertConfig

from server.model import (
    bundle_from_model,
    compute_fingerprint,
    default_prompt_format,
    load_model,
    render_messages,
    render_prompt,
    spec_from_config,
)
from tests.fixtures.models import make_tiny_gpt2, make_tiny_llama, make_tiny_tokenizer


@pytest.mark.slow
def test_embedded_smollm2_loads_fast_and_answers(smollm2_bundle):
    b = smollm2_bundle
    assert b.spec.family == "llama"
    assert (b.spec.num_heads, b.spec.num_kv_heads, b.spec.num_layers) == (9, 3, 30)
    assert b.tokenizer.eos_token == "<|im_end|>"
    assert b.tokenizer.convert_tokens_to_ids("<|im_end|>") in b.spec.eos_token_ids
    assert all(not p.requires_grad for p in b.hf_model.parameters())
    assert not b.hf_model.training
    t0 = time.perf_counter()
    again = load_model("smollm2", device="cpu")
    assert time.perf_counter() - t0 < 5.0  # cached conversion + cached fingerprint (measured ~0.5 s idle)
    assert again.fingerprint == b.fingerprint
    ids = render_prompt(b.tokenizer, "What is the capital of France?", "chat")
    out = b.hf_model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    assert "Paris" in b.tokenizer.decode(out[0, len(ids) :])


def test_local_folder_roundtrip_and_fingerprint(tmp_path):
    tok = make_tiny_tokenizer()
    m = make_tiny_llama(tok, seed=3)
    m.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    a = load_model(str(tmp_path / "m"), device="cpu", cache_dir=tmp_path / "cache")
    b = load_model(str(tmp_path / "m"), device="cpu", dtype="bfloat16", cache_dir=tmp_path / "cache")
    assert a.fingerprint == b.fingerprint  # independent of the serving dtype
    assert b.dtype == torch.bfloat16 and a.dtype == torch.float32
    assert a.fingerprint == compute_fingerprint(make_tiny_llama(tok, seed=3), tok)
    assert a.fingerprint != compute_fingerprint(make_tiny_llama(tok, seed=4), tok)  # other weights
    assert a.fingerprint != bundle_from_model(make_tiny_gpt2(tok), tok).fingerprint


def test_unsupported_family_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unsupported model_type 'bert'"):
        spec_from_config(BertConfig())
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_model(str(tmp_path))


def test_prompt_rendering_is_one_function():
    tok = make_tiny_tokenizer()
    assert default_prompt_format(tok) == "chat"
    chat = render_prompt(tok, "hi", "chat")
    assert tok.decode(chat) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert chat == render_messages(tok, [{"role": "user", "content": "hi"}])
    assert tok.decode(render_prompt(tok, "hi", "raw")) == "hi"
    with pytest.raises(ValueError, match="unknown prompt format"):
        render_prompt(tok, "hi", "xml")
    tok.chat_template = None
    assert default_prompt_format(tok) == "raw"
    with pytest.raises(ValueError, match="chat template"):
        render_prompt(tok, "hi", "chat")
