"""PEFT adapters (prefix tuning with/without projection, prompt tuning) imported into the store generate exactly
what PEFT's own `generate` produces."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

from prefix_store import open_store
from prefix_store.errors import InvalidPrefix
from server.engine import PrefixKey, Request, SamplingParams
from server.prefixes import import_peft
from tests.engine_utils import make_engine, random_prompt
from tests.fixtures.models import make_tiny_llama, make_tiny_tokenizer, tiny_llama

NEW = 8


def _peft_model(cfg, seed: int):
    tok = make_tiny_tokenizer()
    base = make_tiny_llama(tok, seed=0)
    torch.manual_seed(seed)
    return get_peft_model(base, cfg), tok


def _peft_greedy(peft_model, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = peft_model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW,
            min_new_tokens=NEW,
            do_sample=False,
        )
    return out[0, len(prompt) :].tolist()


CASES = [
    (
        "prefix_proj_p4",
        PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=32
        ),
    ),
    (
        "prefix_noproj_p10",
        PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10, prefix_projection=False),
    ),
    ("prompt_p6", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6)),
    ("prompt_p13", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=13)),
]


@pytest.mark.parametrize(("name", "cfg"), CASES, ids=[c[0] for c in CASES])
def test_imported_adapter_generates_like_peft(name, cfg, tmp_path):
    peft_model, _tok = _peft_model(cfg, seed=len(name))
    if isinstance(cfg, PromptTuningConfig):  # default init is too close to zero to change outputs much
        with torch.no_grad():
            for p in peft_model.prompt_encoder.parameters():
                p.normal_(0, 1.0)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    bundle = tiny_llama(seed=0)  # the same base model, loaded separately
    store = open_store(f"file://{tmp_path / 'store'}")
    meta = import_peft(tmp_path / "adapter", bundle, store, "acme", name.replace("_", "-"))
    assert meta.prefix_length == cfg.num_virtual_tokens
    assert meta.base_model_fingerprint == bundle.fingerprint
    rec = store.get("acme", meta.name, expected_fingerprint=bundle.fingerprint)
    key = PrefixKey("acme", meta.name, meta.version)
    engine = make_engine(bundle, {key: rec.tensors["kv"]})
    prompts = [random_prompt(bundle.spec.vocab_size, n, i) for i, n in enumerate((3, 9, 17))]
    outs = engine.generate(
        [
            Request(f"r{i}", pr, SamplingParams(max_tokens=NEW, ignore_eos=True), key)
            for i, pr in enumerate(prompts)
        ]
    )
    no_prefix = make_engine(bundle, {}).generate(
        [Request("np", prompts[0], SamplingParams(max_tokens=NEW, ignore_eos=True))]
    )
    for pr, out in zip(prompts, outs, strict=True):
        assert out.token_ids == _peft_greedy(peft_model, pr)
    assert outs[0].token_ids != no_prefix[0].token_ids  # the adapter really changes the output


def test_import_refuses_adapter_of_another_shape(tmp_path):
    tok = make_tiny_tokenizer()
    other = get_peft_model(
        make_tiny_llama(tok, seed=0, layers=3),
        PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    )
    other.save_pretrained(tmp_path / "adapter")
    store = open_store(f"file://{tmp_path / 'store'}")
    with pytest.raises(InvalidPrefix, match="does not fit"):
        import_peft(tmp_path / "adapter", tiny_llama(seed=0), store, "acme", "x")
    assert store.list("acme") == []


def test_import_refuses_lora(tmp_path):
    d = tmp_path / "lora"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(InvalidPrefix, match="unsupported PEFT type"):
        import_peft(d, tiny_llama(seed=0), open_store(f"file://{tmp_path / 's'}"), "acme", "x")


def test_cli_import_peft_help():
    out = subprocess.run(
        [sys.executable, "-m", "server.cli", "import-peft", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0
    for flag in ("--tenant-id", "--name", "--model", "--store"):
        assert flag in out.stdout
