"""Trainer on tiny random models: the loss falls for every method, only the prefix learns (base weights
bit-identical), runs are reproducible, cancel stops within one step, bad input is refused with the field named, and
what is trained is what is served (teacher-forced loss the training way == with the compiled kv as
past_key_values == the literal per-row forward of the method)."""

from __future__ import annotations

import itertools
import math
import threading

import pytest
import torch

from server.engine import DictPrefixProvider, EngineConfig, LLMEngine, PrefixKey, Request, SamplingParams
from server.model import render_prompt
from server.prefixes import compile_record, kv_to_past_key_values
from server.training import (
    TrainingCancelled,
    TrainingLimits,
    TrainingValidationError,
    default_hyperparameters,
    load_examples,
    train_prefix,
)
from server.training.config import resolve_hyperparameters
from server.training.data import IGNORE, collate, encode_examples, pad_token_id
from server.training.trainer import build_method, lr_factor, trainable_parameter_count
from tests.engine_utils import hf_greedy

pytestmark = pytest.mark.usefixtures("torch_single_thread")

METHODS = ["prefix_tuning", "prefix_propagation", "prompt_tuning"]
BUNDLES = ["tiny_llama_bundle", "tiny_gpt2_bundle"]
# The tiny models have huge random weights (initializer_range 0.5): they need larger steps than SmolLM2.
FAST = {
    "prefix_tuning": {"learning_rate": 3e-3},
    "prefix_propagation": {"learning_rate": 1e-1},
    "prompt_tuning": {"learning_rate": 3e-1},
}


def examples(n: int = 8, completion: str = "zebra") -> list[dict[str, str]]:
    return [{"prompt": f"question {i}?", "completion": completion} for i in range(n)]


def _state(bundle) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in bundle.hf_model.state_dict().items()}


# ------------------------------------------------------------------------------------------------ learning
@pytest.mark.parametrize("bundle_name", BUNDLES)
@pytest.mark.parametrize("method", METHODS)
def test_loss_falls_and_base_weights_bit_identical(request, bundle_name, method):
    bundle = request.getfixturevalue(bundle_name)
    before = _state(bundle)
    seen: list[tuple[int, int, float, int]] = []
    res = train_prefix(
        bundle, method, examples(), 4, {**FAST[method], "epochs": 15, "batch_size": 4},
        progress_cb=lambda *a: seen.append(a),
    )  # fmt: skip
    s = res.summary
    assert s["steps"] == s["total_steps"] == 30 and len(seen) == 30
    assert [a[0] for a in seen] == list(range(1, 31)) and all(a[1] == 30 for a in seen)
    assert seen[-1][3] == 15
    first, last = s["epoch_losses"][0], s["final_loss"]
    assert last < 0.5 * first, s["epoch_losses"]
    # only the prefix learned: every base weight is bit-identical, none requires grad
    after = bundle.hf_model.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    assert not any(p.requires_grad for p in bundle.hf_model.parameters())
    # what comes back: the serving kv + the method's trained tensors, summary fields
    sp = bundle.spec
    assert res.tensors["kv"].shape == (sp.num_layers, 2, sp.num_kv_heads, 4, sp.head_dim)
    assert res.tensors["kv"].dtype == torch.float32 and torch.isfinite(res.tensors["kv"]).all()
    want = {
        "prefix_tuning": {"kv", "embedding", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"},
        "prefix_propagation": {"kv", "additions"},
        "prompt_tuning": {"kv", "soft_prompt"},
    }[method]
    assert set(res.tensors) == want
    assert torch.allclose(compile_record(bundle, method, res.tensors), res.tensors["kv"], atol=1e-5)
    assert s["trainable_parameters"] == trainable_parameter_count(method, sp, 4)
    assert res.prompt_format == s["prompt_format"] == "chat"
    assert s["heldout_examples"] == 0 and s["heldout_loss"] is None
    for key in ("final_loss", "best_loss", "loss_curve", "wall_time_s", "hyperparameters", "epochs"):
        assert s[key] is not None, key


@pytest.mark.parametrize("method", METHODS)
def test_warm_start_continues_from_a_stored_version(tiny_llama_bundle, method):
    """init_tensors (a finished run's tensors) start training where that run ended: with a vanishing learning rate
    the result is that run's prefix again, and a real continuation starts at the loss the first run reached."""
    b = tiny_llama_bundle
    first = train_prefix(b, method, examples(), 4, {**FAST[method], "epochs": 10, "batch_size": 4})
    still = train_prefix(
        b, method, examples(), 4, {"learning_rate": 1e-12, "epochs": 1}, init_tensors=first.tensors
    )
    torch.testing.assert_close(still.tensors["kv"], first.tensors["kv"], atol=1e-5, rtol=1e-5)
    more = train_prefix(
        b, method, examples(), 4, {**FAST[method], "epochs": 2, "batch_size": 4}, init_tensors=first.tensors
    )
    fresh_start = first.summary["loss_curve"][0][1]
    assert more.summary["loss_curve"][0][1] < 0.5 * fresh_start
    assert more.summary["loss_curve"][0][1] == pytest.approx(first.summary["final_loss"], rel=0.5, abs=0.05)
    # tensors of another size or kind are refused before any compute
    with pytest.raises(TrainingValidationError) as e:
        train_prefix(b, method, examples(), 5, {"epochs": 1}, init_tensors=first.tensors)
    assert e.value.param == "init_from"
    with pytest.raises(TrainingValidationError, match="init_from"):
        train_prefix(b, method, examples(), 4, {"epochs": 1}, init_tensors={"kv": first.tensors["kv"]})


def test_parameter_counts(tiny_llama_bundle):
    sp = tiny_llama_bundle.spec  # L=2, H=64, K=2, D=16
    assert trainable_parameter_count("prefix_propagation", sp, 8) == 2 * 8 * 64
    assert trainable_parameter_count("prompt_tuning", sp, 8) == 8 * 64
    out = 2 * 2 * 2 * 16
    assert trainable_parameter_count("prefix_tuning", sp, 8, 32) == 8 * 64 + 64 * 32 + 32 + 32 * out + out


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_tensors(tiny_llama_bundle, method):
    hp = {**FAST[method], "epochs": 3, "batch_size": 3, "seed": 7}
    ex = examples(20)  # >= 16: a held-out split, also drawn from the seed
    a = train_prefix(tiny_llama_bundle, method, ex, 3, hp)
    b = train_prefix(tiny_llama_bundle, method, ex, 3, hp)
    c = train_prefix(tiny_llama_bundle, method, ex, 3, {**hp, "seed": 8})
    assert a.tensors.keys() == b.tensors.keys()
    for k in a.tensors:
        assert torch.equal(a.tensors[k], b.tensors[k]), k
    assert a.summary["loss_curve"] == b.summary["loss_curve"]
    assert not torch.equal(a.tensors["kv"], c.tensors["kv"])


def test_heldout_split_reported(tiny_llama_bundle):
    res = train_prefix(
        tiny_llama_bundle, "prefix_tuning", examples(20), 2, {"epochs": 2, "eval_fraction": 0.2}
    )
    s = res.summary
    assert s["heldout_examples"] == 4 and s["train_examples"] == 16
    assert s["initial_heldout_loss"] > 0 and len(s["heldout_curve"]) == 2 and s["heldout_loss"] > 0
    small = train_prefix(tiny_llama_bundle, "prefix_tuning", examples(15), 2, {"epochs": 1})
    assert small.summary["heldout_examples"] == 0 and small.summary["heldout_loss"] is None


def test_max_steps_caps_the_schedule(tiny_llama_bundle):
    res = train_prefix(tiny_llama_bundle, "prompt_tuning", examples(8), 2, {"epochs": 50, "max_steps": 5})
    assert res.summary["steps"] == res.summary["total_steps"] == 5


def test_a_few_examples_still_get_the_methods_minimum_of_steps_unless_epochs_are_given(tiny_llama_bundle):
    """8 examples at batch 8 are one step an epoch: the method's default epochs would be 8 steps (prompt tuning on
    SmolLM2 learns nothing in 16); its min_steps (30) run instead. Epochs given are what runs."""
    assert resolve_hyperparameters("prompt_tuning", {}).min_steps == 30
    assert resolve_hyperparameters("prompt_tuning", {"epochs": 2}).min_steps == 0
    assert resolve_hyperparameters("prompt_tuning", {"epochs": 2, "min_steps": 5}).min_steps == 5
    res = train_prefix(tiny_llama_bundle, "prompt_tuning", examples(8), 2)
    assert res.summary["steps"] == res.summary["total_steps"] == 30 and res.summary["epochs"] == 30
    res = train_prefix(tiny_llama_bundle, "prompt_tuning", examples(8), 2, {"epochs": 2})
    assert res.summary["steps"] == 2
    res = train_prefix(tiny_llama_bundle, "prompt_tuning", examples(8), 2, {"min_steps": 40, "max_steps": 35})
    assert res.summary["steps"] == 35  # max_steps still caps


def test_a_time_limit_ends_training_with_the_prefix_trained_so_far(tiny_llama_bundle):
    assert (
        train_prefix(tiny_llama_bundle, "prompt_tuning", examples(8), 2, {"epochs": 2}).summary["stopped"]
        is None
    )
    # a limit reached during the first step: that step completes, then training ends (no error, a usable prefix)
    res = train_prefix(
        tiny_llama_bundle,
        "prompt_tuning",
        examples(8),
        2,
        {"epochs": 50},
        limits=TrainingLimits(max_seconds=1e-9),
    )
    assert res.summary["stopped"] == "time_limit"
    assert res.summary["steps"] == 1 < res.summary["total_steps"]
    assert torch.isfinite(res.tensors["kv"]).all()


def test_lr_schedule_warmup_then_linear_decay():
    f = [lr_factor(s, 10, 2) for s in range(10)]
    assert f[0] == 0.5 and f[1] == 1.0
    assert f[2] == 1.0 and all(a > b for a, b in itertools.pairwise(f[2:])) and f[-1] > 0
    assert [lr_factor(s, 4, 0) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]


def test_num_threads_only_bounds_the_training_thread(tiny_llama_bundle):
    torch.set_num_threads(2)
    seen = {}

    def job():
        train_prefix(
            tiny_llama_bundle, "prompt_tuning", examples(4), 2, {"epochs": 1},
            num_threads=1, progress_cb=lambda *a: seen.setdefault("threads", torch.get_num_threads()),
        )  # fmt: skip
        seen["after"] = torch.get_num_threads()

    t = threading.Thread(target=job)
    t.start()
    t.join()
    assert seen["threads"] == 1
    assert torch.get_num_threads() == 2  # the calling (serving) thread keeps its setting


# ------------------------------------------------------------------------------------------------ cancel
@pytest.mark.parametrize("method", METHODS)
def test_cancel_within_one_step(tiny_llama_bundle, method):
    steps: list[int] = []
    calls = {"n": 0}

    def should_stop() -> bool:
        calls["n"] += 1
        return len(steps) >= 3  # cancel requested right after step 3

    with pytest.raises(TrainingCancelled):
        train_prefix(
            tiny_llama_bundle, method, examples(8), 2, {"epochs": 20, "batch_size": 2},
            progress_cb=lambda s, *_: steps.append(s), should_stop=should_stop,
        )  # fmt: skip
    assert steps == [1, 2, 3]  # no optimizer step after the request
    assert calls["n"] == 4  # checked before every step


def test_cancel_while_the_held_out_examples_are_evaluated(tiny_llama_bundle, monkeypatch):
    """The held-out loss (before step 1, after every epoch) runs over up to half of 1,000 examples: tens of seconds
    on SmolLM2 during which a cancel waited (24-36 s measured). It is checked before each held-out batch."""
    from server.training import trainer

    evaluated: list[int] = []
    loss_sum = trainer._Method.loss_sum
    asked = {"stop": False}

    def should_stop() -> bool:
        return asked["stop"]

    def counting(self, batch):  # the cancel arrives during the initial evaluation's second batch
        evaluated.append(1)
        if len(evaluated) == 2:
            asked["stop"] = True
        return loss_sum(self, batch)

    monkeypatch.setattr(trainer._Method, "loss_sum", counting)
    steps: list[int] = []
    with pytest.raises(TrainingCancelled, match="evaluating"):
        train_prefix(
            tiny_llama_bundle, "prefix_tuning", examples(40), 2, {"epochs": 2, "batch_size": 2, "eval_fraction": 0.5},
            progress_cb=lambda s, *_: steps.append(s), should_stop=should_stop,
        )  # fmt: skip
    assert steps == [] and len(evaluated) == 2  # stopped after the batch it was asked in, before any step


# ------------------------------------------------------------------------------------------------ data
def test_prompt_rendered_like_serving_and_completion_ends_with_eos(tiny_llama_bundle):
    b = tiny_llama_bundle
    tok = b.tokenizer
    data = encode_examples(b, [{"prompt": "hi there", "completion": " ok"}], "chat", 4)
    ids = list(data[0].input_ids)
    prompt = render_prompt(tok, "hi there", "chat")
    assert ids[: len(prompt)] == prompt and data[0].prompt_len == len(prompt)
    assert ids[len(prompt) : -1] == tok(" ok", add_special_tokens=False)["input_ids"]
    assert ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    raw = encode_examples(b, [{"prompt": "hi", "completion": "x"}], "raw", 4, append_eos=False)
    assert (
        list(raw[0].input_ids)
        == render_prompt(tok, "hi", "raw") + tok("x", add_special_tokens=False)["input_ids"]
    )


def test_batch_masks_prompt_and_padding(tiny_llama_bundle):
    b = tiny_llama_bundle
    data = encode_examples(
        b, [{"prompt": "a", "completion": "xyz"}, {"prompt": "bbbb", "completion": "q"}], "chat", 2
    )
    batch = collate(data, pad_token_id(b))
    for i, e in enumerate(data):
        n = len(e.input_ids)
        assert (batch.labels[i, : e.prompt_len] == IGNORE).all()
        assert batch.labels[i, e.prompt_len : n].tolist() == list(e.input_ids[e.prompt_len :])
        assert (batch.labels[i, n:] == IGNORE).all() and (batch.attention_mask[i, n:] == 0).all()
    # both rows start with the same template tokens: shared once, never past the last prompt token
    assert 0 < batch.common < min(e.prompt_len for e in data)
    assert batch.input_ids[0, : batch.common].tolist() == batch.input_ids[1, : batch.common].tolist()


def test_load_examples_jsonl(tmp_path):
    p = tmp_path / "ex.jsonl"
    p.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", "completion": "d"}\n')
    assert load_examples(p) == [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    p.write_text('{"prompt": "a", "completion": "b"}\nnot json\n')
    with pytest.raises(TrainingValidationError, match="line 2"):
        load_examples(p)


# ------------------------------------------------------------------------------------------------ validation
LIMITS = TrainingLimits(max_examples=5, max_total_tokens=400)


@pytest.mark.parametrize(
    ("method", "examples_", "plen", "hp", "param"),
    [
        ("nope", examples(2), 2, {}, "method"),
        ("prefix_tuning", [], 2, {}, "examples"),
        ("prefix_tuning", examples(6), 2, {}, "examples"),  # > max_examples
        ("prefix_tuning", "not a list", 2, {}, "examples"),
        ("prefix_tuning", [{"prompt": "a", "completion": "  "}], 2, {}, "examples[0].completion"),
        ("prefix_tuning", [{"prompt": "a"}], 2, {}, "examples[0].completion"),
        ("prefix_tuning", [{"prompt": 3, "completion": "x"}], 2, {}, "examples[0].prompt"),
        ("prefix_tuning", [{"prompt": "a", "completion": "b", "x": 1}], 2, {}, "examples[0]"),
        ("prefix_tuning", [{"prompt": "a" * 300, "completion": "b"}] * 2, 2, {}, "examples"),  # total tokens
        ("prefix_tuning", examples(2), 0, {}, "prefix_length"),
        ("prefix_tuning", examples(2), 257, {}, "prefix_length"),
        ("prefix_tuning", examples(2), 2.5, {}, "prefix_length"),
        ("prefix_tuning", examples(2), 2, {"epochs": 0}, "hyperparameters.epochs"),
        ("prefix_tuning", examples(2), 2, {"epochs": 101}, "hyperparameters.epochs"),
        ("prefix_tuning", examples(2), 2, {"learning_rate": 0}, "hyperparameters.learning_rate"),
        ("prefix_tuning", examples(2), 2, {"lr": -1e-3}, "hyperparameters.lr"),
        ("prefix_tuning", examples(2), 2, {"learning_rate": float("nan")}, "hyperparameters.learning_rate"),
        ("prefix_tuning", examples(2), 2, {"learning_rate": float("inf")}, "hyperparameters.learning_rate"),
        ("prefix_tuning", examples(2), 2, {"learning_rate": "fast"}, "hyperparameters.learning_rate"),
        ("prefix_tuning", examples(2), 2, {"batch_size": 0}, "hyperparameters.batch_size"),
        ("prefix_tuning", examples(2), 2, {"batch_size": 65}, "hyperparameters.batch_size"),
        ("prefix_tuning", examples(2), 2, {"warmup_ratio": 2}, "hyperparameters.warmup_ratio"),
        ("prefix_tuning", examples(2), 2, {"prompt_format": "xml"}, "hyperparameters.prompt_format"),
        ("prefix_tuning", examples(2), 2, {"bogus": 1}, "hyperparameters.bogus"),
    ],
)
def test_validation_errors_name_the_field(tiny_llama_bundle, method, examples_, plen, hp, param):
    with pytest.raises(TrainingValidationError) as ei:
        train_prefix(tiny_llama_bundle, method, examples_, plen, hp, limits=LIMITS)
    assert ei.value.param == param, str(ei.value)
    assert isinstance(ei.value, ValueError) and str(ei.value)


def test_example_longer_than_the_model_is_refused(tiny_llama_bundle):
    with pytest.raises(TrainingValidationError, match="tokens long") as ei:
        train_prefix(tiny_llama_bundle, "prefix_tuning", [{"prompt": "x" * 1100, "completion": "y"}], 8)
    assert ei.value.param == "examples[0]"


def test_method_defaults_are_distinct_and_sane():
    for m in METHODS:
        hp = default_hyperparameters(m)
        assert math.isfinite(hp.learning_rate) and hp.learning_rate > 0 and 1 <= hp.epochs <= 100
    assert resolve_hyperparameters("prefix_tuning", {"lr": 0.5}).learning_rate == 0.5


# ------------------------------------------------------------------------------------------------ train == serve
@torch.no_grad()
def _served_loss(bundle, kv: torch.Tensor, batch) -> float:
    """Teacher-forced completion loss with the compiled kv as plain past_key_values (the prompt at position P)."""
    b, t = batch.input_ids.shape
    p = kv.shape[3]
    out = bundle.hf_model(
        input_ids=batch.input_ids,
        attention_mask=torch.cat([torch.ones(b, p, dtype=torch.long), batch.attention_mask], dim=1),
        position_ids=torch.arange(p, p + t)[None].expand(b, -1),
        past_key_values=kv_to_past_key_values(kv, batch=b),
    )
    tgt = batch.labels[:, 1:]
    sel = tgt != IGNORE
    return float(torch.nn.functional.cross_entropy(out.logits[:, :-1][sel].float(), tgt[sel]))


@pytest.mark.parametrize("bundle_name", BUNDLES)
@pytest.mark.parametrize("method", METHODS)
def test_training_loss_equals_serving_loss(request, bundle_name, method):
    bundle = request.getfixturevalue(bundle_name)
    ex = [{"prompt": f"tell me about {w}", "completion": f"{w} is fine."} for w in ("cats", "a dog", "rain")]
    res = train_prefix(bundle, method, ex, 5, {**FAST[method], "epochs": 4, "batch_size": 3})
    # rebuild the trained parameters into a method object (the training forward) from the stored tensors
    hp = resolve_hyperparameters(method, {})
    m = build_method(bundle, method, 5, hp, ex, torch.Generator().manual_seed(0))
    with torch.no_grad():
        if method == "prefix_tuning":
            m.mod.load_state_dict({k: v for k, v in res.tensors.items() if k != "kv"})
        elif method == "prefix_propagation":
            m.raw.copy_(res.tensors["additions"] / m.scale)
        else:
            m.raw.copy_(res.tensors["soft_prompt"] / m.scale)
    data = encode_examples(bundle, ex, res.prompt_format, 5)
    shared = collate(data, pad_token_id(bundle))
    plain = collate(data, pad_token_id(bundle), share_common=False)
    assert shared.common > 0 and plain.common == 0
    with torch.no_grad():
        s, n = m.loss_sum(shared)
        fast = float(s) / n
        s2, n2 = m.loss_sum(plain)
        literal_s, literal_n = m.literal_loss_sum(plain)
    served = _served_loss(bundle, res.tensors["kv"], plain)
    assert n == n2 == literal_n == int((plain.labels[:, 1:] != IGNORE).sum())
    assert fast == pytest.approx(served, rel=1e-4, abs=1e-4)
    assert float(s2) / n2 == pytest.approx(served, rel=1e-4, abs=1e-4)
    assert float(literal_s) / literal_n == pytest.approx(served, rel=1e-4, abs=1e-4)


def test_gradients_reach_only_prefix_parameters(tiny_llama_bundle):
    b = tiny_llama_bundle
    ex = examples(3)
    for method in METHODS:
        m = build_method(
            b, method, 3, resolve_hyperparameters(method, {}), ex, torch.Generator().manual_seed(0)
        )
        batch = collate(encode_examples(b, ex, "chat", 3), pad_token_id(b))
        s, n = m.loss_sum(batch)
        (s / n).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
        assert all(p.grad is None for p in b.hf_model.parameters())


# ------------------------------------------------------------------------------------------------ engine
def test_engine_generates_the_trained_completion(tiny_llama_bundle):
    """A prefix trained to answer 'zebra' is served by the engine: its greedy output is what transformers gives
    with the kv as past_key_values, and is the trained completion (+ eos) on prompts it was trained on."""
    b = tiny_llama_bundle
    ex = examples(4, completion="zebra")
    res = train_prefix(b, "prefix_tuning", ex, 4, {"epochs": 60, "batch_size": 4, "learning_rate": 3e-3})
    assert res.summary["final_loss"] < 0.05, res.summary["epoch_losses"][-5:]
    kv = res.tensors["kv"]
    key = PrefixKey("acme", "zebra", 1)
    engine = LLMEngine(b, DictPrefixProvider({key: kv}), EngineConfig(kv_cache_bytes=8 * 2**20))
    prompts = [render_prompt(b.tokenizer, e["prompt"], "chat") for e in ex]
    outs = engine.generate(
        [Request(f"r{i}", p, SamplingParams(max_tokens=8), key) for i, p in enumerate(prompts)]
        + [Request("base", prompts[0], SamplingParams(max_tokens=8), None)]
    )
    for i, p in enumerate(prompts):
        ref = hf_greedy(b.hf_model, kv, p, 8)
        eos = b.tokenizer.convert_tokens_to_ids("<|im_end|>")
        ref = ref[: ref.index(eos) + 1] if eos in ref else ref
        assert outs[i].token_ids == ref
        assert outs[i].text == "zebra" and outs[i].finish_reason == "stop"
    assert outs[-1].text != "zebra"  # the base model alone does not say it


def test_completions_are_trained_as_the_model_writes_them_after_a_prompt():
    """SentencePiece vocabularies (Llama 2, Mistral, Gemma) put a "▁" in front of any text tokenized alone: trained
    on such tokens, " Paris" carried an extra "▁" (its prefix then wrote two spaces) and "Paris" a space it never had.
    The completion's tokens are now those that follow a prompt; a byte-level vocabulary's are the same as alone."""
    from types import SimpleNamespace

    from server.training.data import completion_ids
    from tests.fixtures.models import make_sentencepiece_tokenizer, make_tiny_tokenizer

    sp = make_sentencepiece_tokenizer()
    assert sp.convert_ids_to_tokens(sp(" Paris", add_special_tokens=False)["input_ids"]) == ["▁", "▁Paris"]
    assert sp.convert_ids_to_tokens(completion_ids(sp, " Paris")) == ["▁Paris"]
    assert sp.convert_ids_to_tokens(completion_ids(sp, "Paris")) == [
        "P",
        "a",
        "r",
        "i",
        "s",
    ]  # no "▁": no space
    assert sp.decode(completion_ids(sp, "日本")) == "日本"
    # the tokens after a prompt, as one text tokenizes them
    prompt = sp("The capital is", add_special_tokens=False)["input_ids"]
    joint = sp("The capital is Paris.", add_special_tokens=False)["input_ids"]
    assert prompt + completion_ids(sp, " Paris.") == joint
    spec = SimpleNamespace(max_positions=512, eos_token_ids=[sp.eos_token_id])
    (ex,) = encode_examples(
        SimpleNamespace(tokenizer=sp, spec=spec), [{"prompt": "x", "completion": " Paris"}], "raw", 4
    )
    assert sp.convert_ids_to_tokens(list(ex.input_ids[ex.prompt_len :])) == ["▁Paris", "</s>"]
    tiny = make_tiny_tokenizer()
    for text in (" ZEBRA", "ZEBRA: HI", "\nHello", " 日本語", "  two"):
        assert completion_ids(tiny, text) == tiny(text, add_special_tokens=False)["input_ids"], text


def test_a_run_whose_values_ran_away_fails_as_diverged_with_advice(tiny_llama_bundle):
    """A learning rate at the top of the accepted range (10) on a few examples trains every step, and the prefix
    compiles to KV over what the store holds (1e4): the run says so as a diverged training with what to change,
    not as the store's refusal after it (`InvalidPrefix` at the put, a failed job that read like a store fault)."""
    from server.training import TrainingDiverged

    ex = [{"prompt": f"q{i}", "completion": " A"} for i in range(4)]
    with pytest.raises(
        TrainingDiverged, match=r"prefix kv holds values up to .*lower the learning_rate \(was 10\)"
    ):
        train_prefix(tiny_llama_bundle, "prefix_tuning", ex, 16, {"learning_rate": 10.0})
