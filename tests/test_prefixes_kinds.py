"""Every prefix kind compiles to a serving kv `[L, 2, K, P, D]` that reproduces the model run with the prefix.

Reference for propagation / prompt tuning: one transformers forward over the P prefix positions as real positions
(zero or soft embeddings, the per-layer additions via hooks) followed by the prompt, recomputed from scratch for
every generated token. Reference for prefix tuning: PEFT's own `get_prompt`.
"""

from __future__ import annotations

import threading

import pytest
import torch
from peft import PrefixTuningConfig, get_peft_model

from prefix_store.errors import InvalidPrefix
from server.model import spec_from_config
from server.prefixes import (
    PrefixTuningParams,
    cache_to_kv,
    compile_prefix_tuning,
    compile_prompt_tuning,
    compile_propagation,
    compile_record,
    flat_to_kv,
    kv_to_flat,
    kv_to_past_key_values,
    prefix_forward,
    propagation_hooks,
    validate_kv,
)
from tests.fixtures.models import make_tiny_gpt2, make_tiny_llama, make_tiny_tokenizer

pytestmark = pytest.mark.usefixtures("torch_single_thread")

NEW = 8
BUNDLES = ["tiny_llama_bundle", "tiny_gpt2_bundle"]


def _prompt(vocab: int, n: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(100 + seed)).tolist()


def _embed(bundle, ids: list[int]) -> torch.Tensor:
    return bundle.hf_model.get_input_embeddings()(torch.tensor(ids))


@torch.no_grad()
def _full_logits(bundle, prefix_embeds, additions, prompt):
    """The prefix as real positions 0..P-1 followed by the prompt, in one transformers forward (no cache)."""
    p = prefix_embeds.shape[0]
    x = torch.cat([prefix_embeds, _embed(bundle, prompt)])[None]
    out = prefix_forward(bundle.hf_model, x, additions, p, position_ids=torch.arange(x.shape[1])[None])
    return out.logits[0, p:]


def _greedy_full(bundle, prefix_embeds, additions, prompt, n=NEW) -> list[int]:
    """Greedy, stopping after eos like `generate` (no min_new_tokens: that would mask eos out of the argmax)."""
    ids, out = list(prompt), []
    for _ in range(n):
        t = int(_full_logits(bundle, prefix_embeds, additions, ids)[-1].argmax())
        out.append(t)
        ids.append(t)
        if t in bundle.spec.eos_token_ids:
            break
    return out


@torch.no_grad()
def _kv_logits(bundle, kv, prompt):
    p, n = kv.shape[3], len(prompt)
    out = bundle.hf_model(
        input_ids=torch.tensor([prompt]),
        past_key_values=kv_to_past_key_values(kv),
        attention_mask=torch.ones(1, p + n, dtype=torch.long),
    )
    return out.logits[0]


@torch.no_grad()
def _generate_with_kv(bundle, kv, prompt, n=NEW) -> list[int]:
    """transformers' own greedy `generate`, the prefix fed as past_key_values with a P+T attention mask."""
    ids = torch.tensor([prompt])
    out = bundle.hf_model.generate(
        input_ids=ids,
        past_key_values=kv_to_past_key_values(kv),
        attention_mask=torch.ones(1, kv.shape[3] + len(prompt), dtype=torch.long),
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=bundle.tokenizer.pad_token_id,
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("bundle_name", BUNDLES)
@pytest.mark.parametrize("kind", ["propagation", "prompt_tuning"])
@pytest.mark.parametrize("p", [1, 4, 12])
def test_compiled_kv_serves_like_prefix_as_real_positions(bundle_name, kind, p, request):
    b = request.getfixturevalue(bundle_name)
    sp = b.spec
    g = torch.Generator().manual_seed(p)
    if kind == "propagation":
        additions = torch.randn(sp.num_layers, p, sp.hidden_size, generator=g)
        prefix_embeds = torch.zeros(p, sp.hidden_size)  # prefix positions have token embedding zero
        kv = compile_propagation(b, additions)
    else:
        prefix_embeds, additions = torch.randn(p, sp.hidden_size, generator=g), None
        kv = compile_prompt_tuning(b, prefix_embeds)
    assert kv.dtype == torch.float32 and tuple(kv.shape) == sp.kv_shape(p)
    validate_kv(kv, sp, p)
    prompt = _prompt(sp.vocab_size, 7, p)
    full = _full_logits(b, prefix_embeds, additions, prompt)
    torch.testing.assert_close(_kv_logits(b, kv, prompt), full, atol=1e-4, rtol=1e-4)
    # greedy decoding: transformers generate fed the kv == recomputing the whole sequence with the prefix
    expected = _greedy_full(b, prefix_embeds, additions, prompt)
    assert _generate_with_kv(b, kv, prompt) == expected
    # the prefix matters: without it the logits differ
    assert not torch.allclose(_full_logits(b, torch.zeros(0, sp.hidden_size), None, prompt), full, atol=1e-2)


@pytest.mark.parametrize("bundle_name", BUNDLES)
def test_prompt_tuning_is_layer0_propagation(bundle_name, request):
    b = request.getfixturevalue(bundle_name)
    sp = b.spec
    p = 5
    soft = torch.randn(p, sp.hidden_size, generator=torch.Generator().manual_seed(0))
    additions = torch.zeros(sp.num_layers, p, sp.hidden_size)
    additions[0] = soft
    torch.testing.assert_close(compile_prompt_tuning(b, soft), compile_propagation(b, additions))
    # and a later layer's additions do change the kv (of that layer and above only)
    additions[-1] = soft
    kv2 = compile_propagation(b, additions)
    torch.testing.assert_close(kv2[:-1], compile_prompt_tuning(b, soft)[:-1])
    assert not torch.allclose(kv2[-1], compile_prompt_tuning(b, soft)[-1], atol=1e-3)


@pytest.mark.parametrize("bundle_name", BUNDLES)
def test_propagation_hooks_follow_positions_across_cached_chunks(bundle_name, request):
    """Hooks add to positions < P even when the forward is split (training or prefill in chunks)."""
    b = request.getfixturevalue(bundle_name)
    m, sp = b.hf_model, b.spec
    p = 4
    additions = torch.randn(sp.num_layers, p, sp.hidden_size, generator=torch.Generator().manual_seed(1))
    prompt = _prompt(sp.vocab_size, 6, 0)
    x = torch.cat([torch.zeros(p, sp.hidden_size), _embed(b, prompt)])[None]
    full = _full_logits(b, torch.zeros(p, sp.hidden_size), additions, prompt)
    for split in (2, p, p + 3):  # inside the prefix, at its end, inside the prompt
        with torch.no_grad(), propagation_hooks(m, additions, p):
            o1 = m(inputs_embeds=x[:, :split], use_cache=True)
            o2 = m(inputs_embeds=x[:, split:], past_key_values=o1.past_key_values, use_cache=True)
        chunked = torch.cat([o1.logits, o2.logits], dim=1)[0, p:]
        torch.testing.assert_close(chunked, full, atol=1e-4, rtol=1e-4)
    # the hooks are gone afterwards
    with torch.no_grad():
        plain = m(inputs_embeds=x).logits[0, p:]
    assert not torch.allclose(plain, full, atol=1e-2)


def test_propagation_hooks_act_only_in_their_thread(tiny_llama_bundle):
    b = tiny_llama_bundle
    m, sp = b.hf_model, b.spec
    p = 3
    additions = torch.randn(sp.num_layers, p, sp.hidden_size, generator=torch.Generator().manual_seed(2))
    x = torch.cat([torch.zeros(p, sp.hidden_size), _embed(b, [5, 6, 7])])[None]
    with torch.no_grad():
        plain = m(inputs_embeds=x).logits
    entered, release, seen = threading.Event(), threading.Event(), {}

    def trainer():
        with torch.no_grad(), propagation_hooks(m, additions, p):
            seen["hooked"] = m(inputs_embeds=x).logits
            entered.set()
            release.wait(30)

    t = threading.Thread(target=trainer)
    t.start()
    try:
        assert entered.wait(30)
        with torch.no_grad():  # another thread, while the hooks are registered on the shared model
            torch.testing.assert_close(m(inputs_embeds=x).logits, plain)
    finally:
        release.set()
        t.join(30)
    assert not torch.allclose(seen["hooked"], plain, atol=1e-2)


@pytest.mark.parametrize("bundle_name", BUNDLES)
def test_propagation_hooks_are_differentiable(bundle_name, request):
    b = request.getfixturevalue(bundle_name)
    sp = b.spec
    p = 3
    additions = torch.zeros(sp.num_layers, p, sp.hidden_size, requires_grad=True)
    x = torch.cat([torch.zeros(p, sp.hidden_size), _embed(b, [1, 2, 3, 4]).detach()])[None]
    out = prefix_forward(b.hf_model, x, additions, p)
    out.logits[0, p:].logsumexp(-1).sum().backward()
    assert additions.grad is not None
    assert all(additions.grad[layer].abs().sum() > 0 for layer in range(sp.num_layers))
    assert all(q.grad is None for q in b.hf_model.parameters())  # the base model stays frozen


def _peft_prefix(base, p: int, projection: bool):
    cfg = PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=p, prefix_projection=projection, encoder_hidden_size=24
    )
    pm = get_peft_model(base, cfg)
    torch.manual_seed(p)
    with torch.no_grad():
        for q in pm.prompt_encoder["default"].parameters():
            q.normal_(0, 0.5)
    return pm


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("projection", [True, False])
def test_compile_prefix_tuning_matches_peft_get_prompt(family, projection):
    tok = make_tiny_tokenizer()
    base = make_tiny_llama(tok) if family == "llama" else make_tiny_gpt2(tok)
    sp = spec_from_config(base.config)
    p = 5
    pm = _peft_prefix(base, p, projection)
    sd = pm.prompt_encoder["default"].state_dict()
    ours = {"embedding": sd["embedding.weight"]}
    if projection:
        ours.update({f"mlp.{i}.{w}": sd[f"transform.{i}.{w}"] for i in (0, 2) for w in ("weight", "bias")})
    kv = compile_prefix_tuning(ours, sp)
    assert tuple(kv.shape) == sp.kv_shape(p)
    if family == "llama":
        assert kv.shape[2] == 2 < sp.num_heads  # grouped-query attention: K = num_key_value_heads
    with torch.no_grad():
        cache = pm.get_prompt(batch_size=2)
    for row in (0, 1):
        torch.testing.assert_close(kv, cache_to_kv(cache, sp.num_layers, row=row), atol=1e-6, rtol=1e-6)
    # the nn.Module form compiles to the same kv
    mod = PrefixTuningParams(sp, p, hidden=24, projection=projection, embed_dim=sp.num_kv_heads * sp.head_dim)
    mod.load_state_dict(ours)
    torch.testing.assert_close(compile_prefix_tuning(mod, sp), kv)


def test_prefix_tuning_params_layout_and_gradients(tiny_llama_bundle):
    b = tiny_llama_bundle
    sp = b.spec
    params = PrefixTuningParams(sp, 6, hidden=32)
    assert sorted(params.state_dict()) == [
        "embedding",
        "mlp.0.bias",
        "mlp.0.weight",
        "mlp.2.bias",
        "mlp.2.weight",
    ]
    assert params.embedding.shape == (6, sp.hidden_size)
    assert params.mlp[2].out_features == sp.num_layers * 2 * sp.num_kv_heads * sp.head_dim
    kv = compile_prefix_tuning(params, sp)
    # PEFT's layout: flat [P, L*2*K*D] with layer-major, key-then-value blocks
    flat = params.flat().detach()
    assert torch.equal(kv[1, 1, 0, 2], flat[2].view(sp.num_layers, 2, sp.num_kv_heads, sp.head_dim)[1, 1, 0])
    assert torch.equal(kv_to_flat(flat_to_kv(flat, sp)), flat)
    # a stored record recompiles from its trained tensors (or is its kv, for PEFT imports without the MLP)
    state = dict(params.state_dict())
    assert torch.equal(compile_record(b, "prefix_tuning", {"kv": torch.zeros_like(kv), **state}), kv)
    assert torch.equal(compile_record(b, "prefix_tuning", {"kv": kv}), kv)
    noproj = PrefixTuningParams(sp, 3, projection=False)
    assert list(noproj.state_dict()) == ["embedding"]
    assert torch.equal(compile_prefix_tuning(dict(noproj.state_dict()), sp), flat_to_kv(noproj.embedding, sp))
    # gradients reach the MLP through the transformers cache; the model stays frozen
    out = b.hf_model(
        input_ids=torch.tensor([[1, 2, 3], [4, 5, 6]]),
        past_key_values=kv_to_past_key_values(params.kv(), batch=2),
        attention_mask=torch.ones(2, 9, dtype=torch.long),
    )
    out.logits.sum().backward()
    assert params.mlp[0].weight.grad is not None and params.mlp[0].weight.grad.abs().sum() > 0
    assert params.embedding.grad.abs().sum() > 0
    assert all(q.grad is None for q in b.hf_model.parameters())


def test_kv_to_past_key_values_batch_dtype(tiny_llama_bundle):
    sp = tiny_llama_bundle.spec
    kv = torch.randn(sp.kv_shape(3))
    cache = kv_to_past_key_values(kv, batch=3, dtype=torch.bfloat16, device="cpu")
    assert cache.get_seq_length() == 3
    assert cache.layers[0].keys.shape == (3, sp.num_kv_heads, 3, sp.head_dim)
    assert cache.layers[0].keys.dtype == torch.bfloat16
    assert torch.equal(cache_to_kv(cache, sp.num_layers, row=2), kv.bfloat16().float())
    with pytest.raises(InvalidPrefix):
        kv_to_past_key_values(kv[:, 0])


def test_validate_and_compile_refuse_mismatches(tiny_llama_bundle):
    b = tiny_llama_bundle
    sp = b.spec
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
    for value, why in ((float("-inf"), "infinite"), (-2e4, "in magnitude"), (1e300, "in magnitude")):
        bad = good.double() if value == 1e300 else good.clone()
        bad[1, 1, 0, 2, 3] = value
        with pytest.raises(InvalidPrefix, match=why):
            validate_kv(bad, sp, 4)
    near = good.clone()
    near[0, 1, 0, 0, 0] = -9999.0  # large, and still accepted
    validate_kv(near, sp, 4)
    with pytest.raises(InvalidPrefix, match="floating"):
        validate_kv(good.long(), sp, 4)
    with pytest.raises(InvalidPrefix, match="do not fit"):
        compile_propagation(b, torch.zeros(sp.num_layers + 1, 2, sp.hidden_size))
    with pytest.raises(InvalidPrefix, match="do not fit"):
        compile_propagation(b, torch.zeros(sp.num_layers, 2, sp.hidden_size + 1))
    with pytest.raises(InvalidPrefix, match="does not fit"):
        compile_prompt_tuning(b, torch.zeros(2, sp.hidden_size - 1))
    with pytest.raises(InvalidPrefix, match="NaN"):
        compile_prompt_tuning(b, torch.full((2, sp.hidden_size), float("inf")))
    other = PrefixTuningParams(spec_from_config(make_tiny_llama(layers=3).config), 2, hidden=8)
    with pytest.raises(InvalidPrefix, match="do not fit"):
        compile_prefix_tuning(dict(other.state_dict()), sp)
    with pytest.raises(ValueError, match="unknown prefix kind"):
        compile_record(b, "lora", {})


def test_prefix_tuning_shapes_are_checked_before_anything_is_allocated(tiny_llama_bundle):
    """A record's MLP shapes decide what the module allocates: zero-width tensors (no bytes in the file) declaring a
    1e9-wide MLP made it allocate gigabytes, or fail with a 500 (`DefaultCPUAllocator: can't allocate memory`),
    before `load_state_dict` refused them; a 0-D weight was an IndexError (a 500). Each is an InvalidPrefix at
    once, from the shapes alone."""
    import time

    from server.prefixes.kinds import prefix_tuning_params

    sp = tiny_llama_bundle.spec
    out = sp.num_layers * 2 * sp.num_kv_heads * sp.head_dim
    n = 10**9
    bombs = [
        {"embedding": torch.zeros(1, 0), "mlp.0.weight": torch.zeros(n, 0), "mlp.0.bias": torch.zeros(0),
         "mlp.2.weight": torch.zeros(out, 0), "mlp.2.bias": torch.zeros(out)},
        {"embedding": torch.zeros(1, 4), "mlp.0.weight": torch.zeros(n, 0), "mlp.0.bias": torch.zeros(n // 10**6),
         "mlp.2.weight": torch.zeros(out, 0), "mlp.2.bias": torch.zeros(out)},
        {"embedding": torch.zeros(1, 4), "mlp.0.weight": torch.zeros(()), "mlp.0.bias": torch.zeros(8),
         "mlp.2.weight": torch.zeros(out, 8), "mlp.2.bias": torch.zeros(out)},
        {"embedding": torch.zeros(1, 4), "mlp.0.weight": torch.zeros(8, 4), "mlp.0.bias": torch.zeros(8),
         "mlp.2.weight": torch.zeros(out, 8)},  # no mlp.2.bias
        {"embedding": torch.zeros(2, out + 1)},  # no MLP: the prefix itself, of another model's width
        {"embedding": torch.zeros(2, out), "mlp.0.bias": torch.zeros(8)},  # part of an MLP
    ]  # fmt: skip
    for tensors in bombs:
        t0 = time.perf_counter()
        with pytest.raises(InvalidPrefix, match=r"do not fit this base model|must be \[P, E\]|an MLP needs"):
            prefix_tuning_params(tensors, sp)
        assert time.perf_counter() - t0 < 0.5, {k: list(v.shape) for k, v in tensors.items()}
    fine = PrefixTuningParams(sp, 2, hidden=8, embed_dim=4)
    prefix_tuning_params(dict(fine.state_dict()), sp)  # (what fits still loads)
