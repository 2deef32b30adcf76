"""PEFT adapters (prefix tuning with/without projection, prompt tuning) saved with `save_pretrained`, imported into
a file store, generate token for token what PEFT's own `generate` produces (fp32, greedy), when a plain
transformers loop is fed the stored kv as `past_key_values`."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model
from safetensors.torch import save_file

from prefix_store import open_store
from prefix_store.errors import InvalidPrefix
from server.prefixes import compile_record, import_peft, kv_to_past_key_values
from tests.fixtures.models import make_tiny_gpt2, make_tiny_llama, make_tiny_tokenizer, tiny_gpt2, tiny_llama

pytestmark = pytest.mark.usefixtures("torch_single_thread")

NEW = 8
BUILDERS = {"llama": (make_tiny_llama, tiny_llama), "gpt2": (make_tiny_gpt2, tiny_gpt2)}


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (3, 9, 17)]


def _peft_model(family: str, cfg):
    tok = make_tiny_tokenizer()
    pm = get_peft_model(BUILDERS[family][0](tok, seed=0), cfg)
    torch.manual_seed(cfg.num_virtual_tokens)
    with torch.no_grad():  # default inits are near zero; a larger one makes the adapter change the output
        for q in pm.prompt_encoder["default"].parameters():
            q.normal_(0, 1.0 if isinstance(cfg, PromptTuningConfig) else 0.5)
    return pm.eval()


@torch.no_grad()
def _peft_greedy(peft_model, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    out = peft_model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False
    )
    return out[0, len(prompt) :].tolist()


@torch.no_grad()
def _loop_greedy(model, kv: torch.Tensor | None, prompt: list[int], eos: tuple[int, ...]) -> list[int]:
    """Plain transformers decoding loop; the prefix kv fed as past_key_values, the prompt from position P."""
    p = 0 if kv is None else kv.shape[3]
    cache = kv_to_past_key_values(kv) if kv is not None else None
    out = model(
        input_ids=torch.tensor([prompt]),
        past_key_values=cache,
        attention_mask=torch.ones(1, p + len(prompt), dtype=torch.long),
        use_cache=True,
    )
    toks: list[int] = []
    while len(toks) < NEW:
        t = int(out.logits[0, -1].argmax())
        toks.append(t)
        if t in eos:
            break
        out = model(
            input_ids=torch.tensor([[t]]),
            past_key_values=out.past_key_values,
            attention_mask=torch.ones(1, p + len(prompt) + len(toks), dtype=torch.long),
            use_cache=True,
        )
    return toks


CASES = [
    ("llama-prefix-proj-p4", "llama", PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                                         prefix_projection=True, encoder_hidden_size=32)),
    ("llama-prefix-noproj-p10", "llama", PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10)),
    ("llama-prompt-p6", "llama", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6)),
    ("llama-prompt-p13", "llama", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=13)),
    ("gpt2-prefix-proj-p3", "gpt2", PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                       prefix_projection=True, encoder_hidden_size=16)),
    ("gpt2-prompt-p5", "gpt2", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)),
]  # fmt: skip


@pytest.mark.parametrize(("name", "family", "cfg"), CASES, ids=[c[0] for c in CASES])
def test_imported_adapter_generates_like_peft(name, family, cfg, tmp_path):
    peft_model = _peft_model(family, cfg)
    peft_model.save_pretrained(tmp_path / "adapter")
    bundle = BUILDERS[family][1](seed=0)  # the same base model, built separately
    store = open_store(f"file://{tmp_path / 'store'}")
    meta = import_peft(tmp_path / "adapter", bundle, store, "acme", name)
    p = cfg.num_virtual_tokens
    is_prompt = isinstance(cfg, PromptTuningConfig)
    assert meta.kind == ("prompt_tuning" if is_prompt else "prefix_tuning")
    assert meta.prefix_length == p
    assert meta.base_model_fingerprint == bundle.fingerprint
    assert meta.extra["prompt_format"] == "raw" and meta.extra["source"] == "peft"
    rec = store.get("acme", name, expected_fingerprint=bundle.fingerprint)
    kv = rec.tensors["kv"]
    assert tuple(kv.shape) == bundle.spec.kv_shape(p) and kv.dtype == torch.float32
    if is_prompt:
        torch.testing.assert_close(rec.tensors["soft_prompt"], peft_model.get_prompt(batch_size=1)[0])
    eos = bundle.spec.eos_token_ids
    prompts = _prompts(bundle.spec.vocab_size)
    for pr in prompts:
        ours = _loop_greedy(bundle.hf_model, kv, pr, eos)
        assert ours == _peft_greedy(peft_model, pr), pr
    # the adapter really changes the output
    assert any(_loop_greedy(bundle.hf_model, None, pr, eos) != _peft_greedy(peft_model, pr) for pr in prompts)


def test_raw_prefix_encoder_state_dict_with_mlp(tmp_path):
    """`prefix_encoder.embedding.weight` + `prefix_encoder.transform.*` (the encoder's own weights, GQA width K*D)
    import too, keep the MLP for further training, and generate like PEFT."""
    cfg = PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=5, prefix_projection=True, encoder_hidden_size=20
    )
    peft_model = _peft_model("llama", cfg)
    d = tmp_path / "raw"
    peft_model.save_pretrained(d)
    enc = peft_model.prompt_encoder["default"].state_dict()
    save_file(
        {f"prefix_encoder.{k}": v.contiguous() for k, v in enc.items()}, str(d / "adapter_model.safetensors")
    )
    bundle = tiny_llama(seed=0)
    store = open_store(f"file://{tmp_path / 'store'}")
    meta = import_peft(d, bundle, store, "acme", "raw")
    rec = store.get("acme", "raw")
    sp = bundle.spec
    assert meta.shapes["embedding"] == [5, sp.num_kv_heads * sp.head_dim]
    assert meta.shapes["mlp.0.weight"] == [20, sp.num_kv_heads * sp.head_dim]
    torch.testing.assert_close(compile_record(bundle, "prefix_tuning", rec.tensors), rec.tensors["kv"])
    for pr in _prompts(sp.vocab_size):
        assert _loop_greedy(bundle.hf_model, rec.tensors["kv"], pr, sp.eos_token_ids) == _peft_greedy(
            peft_model, pr
        )


@pytest.mark.parametrize(
    ("base_kw", "cfg", "match"),
    [
        ({"layers": 3}, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), "3 layers"),
        ({"kv_heads": 4}, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), "key/value heads"),
        ({"hidden": 32, "heads": 2, "kv_heads": 1}, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
         "does not fit"),
    ],
    ids=["layers", "kv-heads", "hidden"],
)  # fmt: skip
def test_import_refuses_adapter_of_another_base_model(base_kw, cfg, match, tmp_path):
    other = get_peft_model(make_tiny_llama(make_tiny_tokenizer(), seed=0, **base_kw), cfg)
    other.save_pretrained(tmp_path / "adapter")
    store = open_store(f"file://{tmp_path / 'store'}")
    with pytest.raises(InvalidPrefix, match=match):
        import_peft(tmp_path / "adapter", tiny_llama(seed=0), store, "acme", "x")
    assert store.list("acme") == []


def test_import_refuses_unsupported_or_broken_folders(tmp_path):
    bundle = tiny_llama(seed=0)
    store = open_store(f"file://{tmp_path / 's'}")
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(InvalidPrefix, match="unsupported PEFT type 'LORA'"):
        import_peft(lora, bundle, store, "acme", "x")
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json"):
        import_peft(tmp_path / "nope", bundle, store, "acme", "x")
    pm = get_peft_model(make_tiny_llama(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    pm.save_pretrained(tmp_path / "trunc")
    st = tmp_path / "trunc" / "adapter_model.safetensors"
    st.write_bytes(st.read_bytes()[:-40])
    with pytest.raises(InvalidPrefix, match="cannot read"):
        import_peft(tmp_path / "trunc", bundle, store, "acme", "x")
    st.unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model"):
        import_peft(tmp_path / "trunc", bundle, store, "acme", "x")
    # a .bin that is no state dict: said so (its use raised "'Tensor' object has no attribute 'endswith'")
    for odd in ([torch.zeros(3)], torch.zeros(3), {"prompt_embeddings": 3}):
        torch.save(odd, tmp_path / "trunc" / "adapter_model.bin")
        with pytest.raises(InvalidPrefix, match="is not a state dict of named tensors"):
            import_peft(tmp_path / "trunc", bundle, store, "acme", "x")
    # a config nested past Python's stack: an InvalidPrefix, not a RecursionError (a 422 naming adapter_config)
    (tmp_path / "trunc" / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(InvalidPrefix, match="is not valid JSON"):
        import_peft(tmp_path / "trunc", bundle, store, "acme", "x")
    assert store.list("acme") == []


def test_a_prefix_with_no_room_left_in_a_learned_position_table_is_too_long():
    """A prompt-tuning prefix compiles through the model's own positions: one of P >= the table's size (GPT-2's
    n_positions) is a PrefixTooLong (the upload's 413), not an IndexError deep in the embedding (a 500)."""
    from server.prefixes.kinds import PrefixTooLongForModel, compile_propagation
    from server.prefixes.peft_import import PrefixTooLong, peft_adapter

    bundle = tiny_gpt2(seed=0, n_positions=16)
    h = bundle.spec.hidden_size
    cfg = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM"}
    with pytest.raises(PrefixTooLong, match="16 positions"):
        peft_adapter({**cfg, "num_virtual_tokens": 16}, {"prompt_embeddings": torch.randn(16, h)}, bundle)
    ok = peft_adapter({**cfg, "num_virtual_tokens": 15}, {"prompt_embeddings": torch.randn(15, h)}, bundle)
    assert ok.prefix_length == 15
    with pytest.raises(PrefixTooLongForModel):
        compile_propagation(bundle, torch.randn(bundle.spec.num_layers, 16, h))


def test_peft_weights_must_be_floating_point_and_of_a_sane_size():
    """Integer/bool/float8 PEFT weights were cast to float and imported (an export's int kv is refused); a soft
    prompt of ~1e30 overflowed the norm's sum of squares (rsqrt(inf) = 0), compiled to an all-zero kv that passed
    every check and was stored to seed later training. Both are refused now, naming the tensor."""
    from server.prefixes.kinds import MAX_TRAINED_ABS, compile_prompt_tuning, compile_propagation
    from server.prefixes.peft_import import peft_adapter

    bundle = tiny_llama(seed=0)
    sp = bundle.spec
    width = sp.num_layers * 2 * sp.num_kv_heads * sp.head_dim
    prompt = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4}
    prefix = {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4}
    for cfg, emb, why in (
        (prefix, torch.randint(-3, 3, (4, width), dtype=torch.int32), "dtype int32"),
        (prefix, torch.randn(4, width).to(torch.float8_e4m3fn), "dtype float8_e4m3fn"),
        (prompt, torch.randint(-3, 3, (4, sp.hidden_size)), "dtype int64"),
        (prompt, torch.ones(4, sp.hidden_size, dtype=torch.bool), "dtype bool"),
        (prompt, torch.randn(4, sp.hidden_size) * 1e30, "in magnitude"),
        (prompt, torch.full((4, sp.hidden_size), float("nan")), "NaN"),
    ):
        with pytest.raises(InvalidPrefix, match=why):
            peft_adapter(cfg, {"prompt_embeddings": emb}, bundle)
    # the raw encoder's MLP weights too
    enc = 8
    raw = {
        "prefix_encoder.embedding.weight": torch.randn(4, enc),
        "prefix_encoder.transform.0.weight": torch.randn(16, enc),
        "prefix_encoder.transform.0.bias": torch.zeros(16, dtype=torch.int64),
        "prefix_encoder.transform.2.weight": torch.randn(width, 16),
        "prefix_encoder.transform.2.bias": torch.zeros(width),
    }
    with pytest.raises(InvalidPrefix, match=r"transform\.0\.bias.*int64"):
        peft_adapter(prefix, raw, bundle)
    # the same bound for what is compiled (training's compile, an export's trained tensors)
    soft = torch.randn(4, sp.hidden_size)
    soft[0, 0] = MAX_TRAINED_ABS * 2
    with pytest.raises(InvalidPrefix, match="in magnitude"):
        compile_prompt_tuning(bundle, soft)
    with pytest.raises(InvalidPrefix, match="in magnitude"):
        compile_propagation(bundle, torch.full((sp.num_layers, 4, sp.hidden_size), -MAX_TRAINED_ABS * 2))
    # large (what training at the largest learning rate makes) is still fine
    ok = peft_adapter(prompt, {"prompt_embeddings": torch.randn(4, sp.hidden_size) * 1e4}, bundle)
    assert ok.tensors["kv"].abs().max() > 0
