"""Every prefix kind compiles to KV that reproduces the model run with the prefix as real positions."""

from __future__ import annotations

import pytest
import torch

from prefix_store.errors import InvalidPrefix
from server.engine import PrefixKey, Request, SamplingParams
from server.prefixes import (
    PrefixTuningParams,
    compile_prefix_tuning,
    compile_prompt_tuning,
    compile_propagation,
    flat_to_kv,
    kv_to_cache,
    kv_to_flat,
    prefix_forward,
    validate_kv,
)
from tests.engine_utils import hf_greedy, make_engine, random_prompt


def _embed(bundle, ids: list[int]) -> torch.Tensor:
    return bundle.hf_model.get_input_embeddings()(torch.tensor(ids))


def _full_logits(bundle, prefix_embeds, additions, prompt):
    """The prefix as real positions 0..P-1 followed by the prompt, in one transformers forward."""
    p = prefix_embeds.shape[0]
    x = torch.cat([prefix_embeds, _embed(bundle, prompt)])[None]
    with torch.no_grad():
        out = prefix_forward(bundle.hf_model, x, additions, p, position_ids=torch.arange(x.shape[1])[None])
    return out.logits[0, p:]


def _kv_logits(bundle, kv, prompt):
    p = kv.shape[3]
    n = len(prompt)
    with torch.no_grad():
        out = bundle.hf_model(
            input_ids=torch.tensor([prompt]),
            past_key_values=kv_to_cache(kv),
            attention_mask=torch.ones(1, p + n, dtype=torch.long),
            position_ids=torch.arange(p, p + n)[None],
        )
    return out.logits[0]


@pytest.mark.parametrize("bundle_name", ["tiny_llama_bundle", "tiny_gpt2_bundle"])
@pytest.mark.parametrize("p", [3, 12])
def test_propagation_kv_equals_prefix_as_positions(bundle_name, p, request):
    b = request.getfixturevalue(bundle_name)
    sp = b.spec
    g = torch.Generator().manual_seed(p)
    additions = torch.randn(sp.num_layers, p, sp.hidden_size, generator=g)
    kv = compile_propagation(b, additions)
    validate_kv(kv, sp, p)
    prompt = random_prompt(sp.vocab_size, 7, p)
    full = _full_logits(b, torch.zeros(p, sp.hidden_size), additions, prompt)
    assert torch.allclose(_kv_logits(b, kv, prompt), full, atol=1e-4)
    # the additions matter: without them the logits differ
    plain = _full_logits(b, torch.zeros(p, sp.hidden_size), None, prompt)
    assert not torch.allclose(plain, full, atol=1e-2)
    # and the engine serves it: greedy through the engine == transformers fed the kv
    key = PrefixKey("t", "prop", 1)
    out = make_engine(b, {key: kv}).generate(
        [Request("r", prompt, SamplingParams(max_tokens=8, ignore_eos=True), key)]
    )
    assert out[0].token_ids == hf_greedy(b.hf_model, kv, prompt, 8)


@pytest.mark.parametrize("bundle_name", ["tiny_llama_bundle", "tiny_gpt2_bundle"])
def test_prompt_tuning_is_layer0_propagation(bundle_name, request):
    b = request.getfixturevalue(bundle_name)
    sp = b.spec
    p = 5
    soft = torch.randn(p, sp.hidden_size, generator=torch.Generator().manual_seed(0))
    kv = compile_prompt_tuning(b, soft)
    additions = torch.zeros(sp.num_layers, p, sp.hidden_size)
    additions[0] = soft
    assert torch.allclose(kv, compile_propagation(b, additions), atol=1e-5)
    prompt = random_prompt(sp.vocab_size, 6, 1)
    assert torch.allclose(_kv_logits(b, kv, prompt), _full_logits(b, soft, None, prompt), atol=1e-4)


def test_prefix_tuning_mlp_layout_and_gradients(tiny_llama_bundle):
    sp = tiny_llama_bundle.spec
    params = PrefixTuningParams(sp, 6, hidden=32)
    kv = compile_prefix_tuning(params, sp)
    validate_kv(kv, sp, 6)
    # layout: flat [P, L*2*K*D] with layer-major, key-then-value blocks (PEFT's view/permute)
    flat = params.flat().detach()
    assert torch.equal(kv[1, 1, 0, 2], flat[2].view(sp.num_layers, 2, sp.num_kv_heads, sp.head_dim)[1, 1, 0])
    assert torch.equal(kv_to_flat(flat_to_kv(flat, sp)), flat)
    # a state dict compiles to the same kv
    assert torch.equal(compile_prefix_tuning(dict(params.state_dict()), sp), kv)
    # gradients reach the MLP through the transformers cache
    b = tiny_llama_bundle
    out = b.hf_model(
        input_ids=torch.tensor([[1, 2, 3]]),
        past_key_values=kv_to_cache(params.kv()),
        attention_mask=torch.ones(1, 9, dtype=torch.long),
        position_ids=torch.arange(6, 9)[None],
    )
    out.logits.sum().backward()
    assert params.mlp[0].weight.grad is not None and params.mlp[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in b.hf_model.parameters())


def test_validate_kv_refuses_mismatches(tiny_llama_bundle):
    sp = tiny_llama_bundle.spec
    good = torch.zeros(sp.kv_shape(4))
    validate_kv(good, sp, 4)
    with pytest.raises(InvalidPrefix, match="shape"):
        validate_kv(good, sp, 5)
    with pytest.raises(InvalidPrefix, match="shape"):
        validate_kv(torch.zeros(sp.num_layers + 1, 2, sp.num_kv_heads, 4, sp.head_dim), sp, 4)
    bad = good.clone()
    bad[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(InvalidPrefix, match="NaN"):
        validate_kv(bad, sp, 4)
    with pytest.raises(InvalidPrefix, match="floating"):
        validate_kv(good.long(), sp, 4)
