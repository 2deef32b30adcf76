"""Decoder-only families without a native forward run through transformers' own modeling code with the engine's
paged attention plugged in: exact against the model's own forward fed the prefix as past_key_values, every prefix
kind compiles for them, other threads keep plain SDPA, and what cannot be served is refused with a reason."""

from __future__ import annotations

import threading

import pytest
import torch
import transformers

from server.engine import PrefixKey, Request, SamplingParams
from server.engine.hf_attention import NAME
from server.model import bundle_from_model, load_model, spec_from_config
from server.prefixes import compile_propagation, kv_to_past_key_values
from tests.engine_utils import hf_greedy, make_engine, mixed_workload, random_kv
from tests.fixtures.models import make_tiny_causal_lm, make_tiny_tokenizer

pytestmark = pytest.mark.usefixtures("torch_single_thread")

NEW = 8
FAMILIES = {  # model_type -> config extras (a mix of GQA, MoE, parallel blocks, learned positions, norms)
    "phi3": {"num_key_value_heads": 2},
    "gemma": {"num_key_value_heads": 2, "head_dim": 16},
    "olmo2": {"num_key_value_heads": 2},
    "gpt_neox": {},
    "opt": {"ffn_dim": 128, "word_embed_proj_dim": 64},
    "mixtral": {"num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2},
}


def tiny(model_type: str, seed: int = 0):
    tok = make_tiny_tokenizer()
    return make_tiny_causal_lm(model_type, tok, seed, **FAMILIES.get(model_type, {})), tok


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_generic_family_mixed_batch_is_exact(model_type):
    model, tok = tiny(model_type)
    b = bundle_from_model(model, tok, name=model_type)
    assert b.spec.family == "hf"
    keys, reqs = mixed_workload(b.spec, (8, 20, 37), 7, NEW, no_prefix=6)
    eng = make_engine(b, keys, max_num_batched_tokens=24)  # chunked prefill mixed with decode steps
    assert (
        b.hf_model.config._attn_implementation == NAME and not eng.runner.packed and eng.runner.graphs is None
    )
    outs = eng.generate(reqs)
    for r, o in zip(reqs, outs, strict=True):
        kv = keys[r.prefix] if r.prefix is not None else None
        assert o.token_ids == hf_greedy(b.hf_model, kv, r.prompt_token_ids, NEW), (model_type, r.request_id)
    assert len({tuple(o.token_ids) for o in outs[:3]}) == 3  # the prefixes matter


@pytest.mark.parametrize(
    ("model_type", "extras"),
    [("llama", {"hidden_act": "gelu", "num_key_value_heads": 2}), ("gpt2", {"scale_attn_by_inverse_layer_idx": True,
      "reorder_and_upcast_attn": True, "n_inner": 128})],
)  # fmt: skip
def test_native_families_the_native_forward_cannot_compute_run_through_transformers(model_type, extras):
    """A Llama with another activation than SiLU, a GPT-2 with per-layer attention scaling: refused at the engine's
    start before (the native forward does not compute them); now run by transformers' modeling code, exact."""
    tok = make_tiny_tokenizer()
    b = bundle_from_model(make_tiny_causal_lm(model_type, tok, 0, **extras), tok, name=model_type)
    assert b.spec.family == "hf"
    keys, reqs = mixed_workload(b.spec, (8, 20), 5, NEW, no_prefix=4)
    outs = make_engine(b, keys, max_num_batched_tokens=24).generate(reqs)
    for r, o in zip(reqs, outs, strict=True):
        kv = keys[r.prefix] if r.prefix is not None else None
        assert o.token_ids == hf_greedy(b.hf_model, kv, r.prompt_token_ids, NEW), (model_type, r.request_id)


def test_other_threads_keep_sdpa_and_propagation_compiles():
    """After the engine switched the shared model to its attention, a forward on another thread (training, prefix
    compilation) equals the plain SDPA model's; a prefix-propagation prefix compiled on it serves exactly."""
    model, tok = tiny("gemma")
    ref_model, _ = tiny("gemma")  # same seed: same weights, untouched SDPA
    b = bundle_from_model(model, tok, name="gemma")
    kv = random_kv(b.spec, 5, seed=1)
    eng = make_engine(b, {})
    ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    got: dict[str, torch.Tensor] = {}

    def other_thread() -> None:
        with torch.no_grad():
            got["x"] = model(input_ids=ids, past_key_values=kv_to_past_key_values(kv)).logits

    t = threading.Thread(target=other_thread)
    t.start()
    t.join()
    with torch.no_grad():
        want = ref_model(input_ids=ids, past_key_values=kv_to_past_key_values(kv)).logits
    torch.testing.assert_close(got["x"], want)
    additions = torch.randn(
        b.spec.num_layers, 4, b.spec.hidden_size, generator=torch.Generator().manual_seed(2)
    )
    pkv = compile_propagation(b, additions)
    key = PrefixKey("acme", "prop", 1)
    eng = make_engine(b, {key: pkv})
    out = eng.generate([Request("p", [7, 8, 9], SamplingParams(max_tokens=NEW, ignore_eos=True), key)])[0]
    assert out.token_ids == hf_greedy(b.hf_model, pkv, [7, 8, 9], NEW)


def test_generic_family_loads_from_a_local_folder(tmp_path):
    model, tok = tiny("olmo2")
    model.save_pretrained(tmp_path / "olmo2")
    tok.save_pretrained(tmp_path / "olmo2")
    b = load_model(str(tmp_path / "olmo2"), device="cpu", cache_dir=tmp_path / "cache")
    assert b.spec.family == "hf" and b.spec.num_kv_heads == 2
    eng = make_engine(b, {})
    out = eng.generate([Request("x", [5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True))])[0]
    assert out.token_ids == hf_greedy(b.hf_model, None, [5, 6, 7], 4)


def test_unservable_models_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="not a decoder-only causal LM"):
        spec_from_config(transformers.BertConfig())
    with pytest.raises(ValueError, match="not a decoder-only causal LM"):
        spec_from_config(transformers.T5Config())
    with pytest.raises(ValueError, match="soft-capping"):
        spec_from_config(transformers.Gemma2Config())
    # modeling code that does not go through transformers' AttentionInterface: refused by its config, before any
    # weights load (it was refused once they had, at the engine's start)
    for config in (transformers.FalconConfig(), transformers.BloomConfig(), transformers.GPTJConfig()):
        with pytest.raises(
            ValueError, match="does not route attention through transformers' AttentionInterface"
        ):
            spec_from_config(config)
    with pytest.raises(ValueError, match=r"\['chunked_attention'\] \(only full and sliding-window attention"):
        spec_from_config(
            transformers.Llama4TextConfig(layer_types=["chunked_attention", "full_attention"] * 24)
        )


LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "original_max_position_embeddings": 32,
    "short_factor": [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7],
    "long_factor": [2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0],
}


@pytest.mark.parametrize("model_type", ["llama", "phi3"])
def test_longrope_models_are_served_within_their_original_context(model_type):
    """Longrope (Phi-3/3.5/4 long-context) picks its frequencies by the longest position of each forward call: the
    native path took the long ones for every row (its table reaches past the original context) and the generic
    path took whichever the batch's longest row called for. Served within the original context, a row is exact
    alone and beside others."""
    tok = make_tiny_tokenizer()
    extra = {"original_max_position_embeddings": 32} if model_type == "phi3" else {}
    m = make_tiny_causal_lm(model_type, tok, num_key_value_heads=2, rope_parameters=LONGROPE, **extra)
    b = bundle_from_model(m, tok, name=model_type)
    assert b.spec.max_positions == 32
    ka, kb = PrefixKey("a", "d", 1), PrefixKey("b", "d", 1)
    kvs = {ka: random_kv(b.spec, 4, 1), kb: random_kv(b.spec, 12, 2)}
    short = Request("short", [5, 6, 7], SamplingParams(max_tokens=6, ignore_eos=True), ka)
    longer = Request("longer", list(range(10, 22)), SamplingParams(max_tokens=6, ignore_eos=True), kb)
    want = hf_greedy(b.hf_model, kvs[ka], [5, 6, 7], 6)
    assert make_engine(b, kvs).generate([short])[0].token_ids == want
    mixed = make_engine(b, kvs).generate([short, longer])
    assert mixed[0].token_ids == want
    assert mixed[1].token_ids == hf_greedy(b.hf_model, kvs[kb], list(range(10, 22)), 6)


def test_a_family_without_sdpa_loads_with_eager_attention_and_is_judged_on_it(tmp_path):
    """transformers has no SDPA attention for granite_swa: the CLI refused it with transformers' advice to load it
    with eager attention, which no flag could do. It loads with eager, and the engine refuses it for what it is
    (attention sinks), leaving the model with the attention it was loaded with."""
    tok = make_tiny_tokenizer()
    model = make_tiny_causal_lm("granite_swa", tok, attn_implementation="eager", num_key_value_heads=2)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    b = load_model(str(tmp_path / "m"), device="cpu", cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match=r"GraniteSWAForCausalLM .* attention sinks"):
        make_engine(b, {})
    assert b.hf_model.config._attn_implementation == "eager"


def test_a_model_loaded_with_eager_attention_keeps_it_outside_the_engine():
    """Other threads (training, compilation) and the start-up check get the attention the model was loaded with,
    not SDPA in its place (for a family whose eager attention does more than SDPA's, that was another model)."""
    model, tok = tiny("olmo2")
    model.config._attn_implementation = "eager"
    ref, _ = tiny("olmo2")
    ref.config._attn_implementation = "eager"
    b = bundle_from_model(model, tok, name="olmo2")
    kv = random_kv(b.spec, 5, seed=1)
    key = PrefixKey("acme", "p", 1)
    eng = make_engine(b, {key: kv})
    assert model.config._prefixserve_fallback == "eager"
    out = eng.generate([Request("x", [4, 2, 9], SamplingParams(max_tokens=5, ignore_eos=True), key)])[0]
    assert out.token_ids == hf_greedy(ref, kv, [4, 2, 9], 5)
    calls: list[str] = []
    from transformers.models.olmo2 import modeling_olmo2

    real = modeling_olmo2.eager_attention_forward

    def spy(*a, **kw):
        calls.append("eager")
        return real(*a, **kw)

    ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(modeling_olmo2, "eager_attention_forward", spy)
        t = threading.Thread(target=lambda: model(input_ids=ids))
        t.start()
        t.join()
    assert calls == ["eager"] * b.spec.num_layers


def test_attention_the_engine_does_not_compute_is_refused_at_start_up():
    """gpt_oss's attention sinks: the engine dropped them, and its start-up check compared against the model after
    the switch (whose fallback dropped them too), so it served different tokens than the model's own."""
    tok = make_tiny_tokenizer()
    cfg = transformers.AutoConfig.for_model(
        "gpt_oss", vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
        initializer_range=0.5, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    b = bundle_from_model(m, tok, name="gpt_oss")
    with pytest.raises(ValueError, match="attention sinks"):
        make_engine(b, {})
    assert m.config._attn_implementation == "eager"  # given back as it was loaded
    # multi-head latent attention: refused by its config, with a reason (it failed deep in the KV cache before)
    with pytest.raises(ValueError, match="latent attention"):
        spec_from_config(transformers.AutoConfig.for_model("deepseek_v3"))


def test_a_model_with_zero_dim_buffers_gets_a_fingerprint():
    """Apertus' xIELU activation keeps 0-dim buffers, which the fingerprint could not view as bytes (start-up
    crashed)."""
    model, tok = tiny("apertus")
    assert any(t.dim() == 0 for t in model.state_dict().values())
    b = bundle_from_model(model, tok, name="apertus")
    assert len(b.fingerprint) == 64


@pytest.mark.parametrize("method", ["prefix_tuning", "prefix_propagation", "prompt_tuning"])
def test_training_works_on_a_generic_family(method):
    """The trainer (its own thread of forwards with gradients) fits every kind on a generic-family model that an
    engine is serving; the result serves exactly."""
    from server.training import train_prefix

    model, tok = tiny("phi3")
    b = bundle_from_model(model, tok, name="phi3")
    make_engine(b, {})  # switches the shared model to the engine's attention first
    lr = {"prefix_tuning": 3e-3, "prefix_propagation": 1e-1, "prompt_tuning": 3e-1}[method]
    ex = [{"prompt": f"question {i}?", "completion": "zebra"} for i in range(6)]
    res = train_prefix(b, method, ex, 3, {"learning_rate": lr, "epochs": 12, "batch_size": 3})
    s = res.summary
    assert s["final_loss"] < s["epoch_losses"][0]
    kv = res.tensors["kv"]
    key = PrefixKey("acme", method, 1)
    req = Request("x", [4, 2], SamplingParams(max_tokens=5, ignore_eos=True), key)
    out = make_engine(b, {key: kv}).generate([req])[0]
    assert out.token_ids == hf_greedy(b.hf_model, kv, [4, 2], 5)
