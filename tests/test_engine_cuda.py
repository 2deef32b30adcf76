"""CUDA path: decode steps as CUDA graphs, bf16, no host sync inside a step. Skipped without a CUDA device.

Self-contained (no conftest fixtures) so that it also runs on the GPU machine's image, which has torch, transformers
and pytest but not the service's dependencies: `benchmarks/gpu_check.sh` runs it with `pytest --noconftest`.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from server.engine.model_runner import RowInput
from server.model import bundle_from_model
from tests.engine_utils import greedy_gaps, hf_greedy, make_engine, mixed_workload
from tests.fixtures.models import make_tiny_gpt2, make_tiny_llama, make_tiny_tokenizer

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (on the GPU machine: benchmarks/gpu_check.sh)"
)

NEW = 12


def _bundle(family: str, dtype: torch.dtype = torch.float32):
    tok = make_tiny_tokenizer()
    model = (make_tiny_llama if family == "llama" else make_tiny_gpt2)(tok, seed=0)
    return bundle_from_model(model.to("cuda", dtype), tok, name=f"tiny-{family}-cuda")


def _mixed(bundle):
    return mixed_workload(bundle.spec, (8, 20, 64), 10, NEW, no_prefix=9)


def _kernels_available() -> bool:
    from server.engine import triton_ops

    return torch.cuda.is_available() and triton_ops.available(torch.device("cuda"))


KERNELS = [
    "torch",
    pytest.param(
        "triton", marks=pytest.mark.skipif(not _kernels_available(), reason="no CUDA device with triton")
    ),
]


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cuda_graph_decode_is_exact_fp32(family, kernels):
    """Graphed decode (torch ops, or the Triton paged attention and fused kernels) equals the eager torch-op engine
    and transformers' greedy decoding, token for token."""
    bundle = _bundle(family)
    keys, reqs = _mixed(bundle)
    graphed = make_engine(bundle, keys, graphs="cuda", max_num_seqs=16, kernels=kernels)
    assert graphed.runner.kernels == kernels
    eager = make_engine(bundle, keys, graphs="off", kernels="torch")
    got = [o.token_ids for o in graphed.generate(reqs)]
    assert got == [o.token_ids for o in eager.generate(reqs)]
    g = graphed.runner.graphs
    # every batch bucket captured at start-up, largest first
    assert g is not None and g.num_captured >= len(g.batches) and g.num_replays >= NEW - 1
    for r, toks in zip(reqs, got, strict=True):
        kv = keys[r.prefix] if r.prefix is not None else None
        assert toks == hf_greedy(bundle.hf_model, kv, r.prompt_token_ids, NEW), r.request_id


@pytest.mark.parametrize("kernels", KERNELS)
def test_decode_step_launches_no_host_sync(kernels):
    """With CUDA's sync debug mode set to error, a prepared decode step (graphed and eager) runs through."""
    bundle = _bundle("llama")
    for mode in ("cuda", "off"):
        eng = make_engine(bundle, {}, graphs=mode, kernels=kernels)
        blocks = eng.pool.allocate(2)
        rows = [RowInput([5], 7, 0, [], blocks[:1], 7, True), RowInput([9], 3, 0, [], blocks[1:], 3, True)]
        for check in (
            False,
            True,
        ):  # the first call may capture the graph (allowed to sync); the second replays
            inp = eng.runner.prepare(rows)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error" if check else "default")
            try:
                logits = eng.runner.forward(inp)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            assert logits.shape == (2, bundle.spec.vocab_size)
        eng.pool.free(blocks)


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bf16_graphed_decode_follows_transformers_bf16(family, kernels):
    """bf16 serving (CUDA graphs; torch ops or the Triton kernels): its greedy tokens agree with fp32 on the first
    step, and every token of every step is, teacher-forced, the argmax of transformers' bf16 forward over the same
    prompt and tokens (within bf16 rounding of near-ties): the whole decode, not only its first token."""
    b32, b16 = _bundle(family), _bundle(family, torch.bfloat16)
    keys, reqs = _mixed(b32)
    t32 = [o.token_ids for o in make_engine(b32, keys).generate(reqs)]
    eng = make_engine(b16, keys, graphs="cuda", max_num_seqs=16, kernels=kernels)
    assert eng.runner.kernels == kernels
    outs = eng.generate(reqs)
    assert eng.runner.graphs is not None and eng.runner.graphs.num_replays >= NEW - 1
    t16 = [o.token_ids for o in outs]
    first_agree = sum(a[0] == b[0] for a, b in zip(t32, t16, strict=True))
    assert first_agree >= 8, (t32, t16)
    gaps = greedy_gaps(b16.hf_model, keys, reqs, outs)
    assert len(gaps) == len(reqs) * NEW
    # (on a CPU: at most 1/8, 98% exactly 0; a row attending to another tenant's prefix falls 15+ below)
    assert float(gaps.max()) <= 0.25, gaps
    assert int((gaps == 0).sum()) >= 0.9 * len(gaps), gaps


def _cached_logprobs_penalties(bundle, graphs: str) -> None:
    """A shared system prompt (prompt cache), logprobs, prompt logprobs and penalties next to plain rows, graphed
    decode: tokens equal the uncached eager engine and transformers; logprobs match to fp32 rounding."""
    from server.engine import PrefixKey, Request, SamplingParams
    from tests.engine_utils import random_kv, random_prompt

    keys = {PrefixKey("t", "p", 1): random_kv(bundle.spec, 11, seed=1)}
    k = next(iter(keys))
    system = random_prompt(bundle.spec.vocab_size, 40, 2)

    def reqs(tag: str) -> list:
        out = []
        for i in range(6):
            sp = SamplingParams(
                max_tokens=NEW,
                ignore_eos=True,
                logprobs=2 if i % 2 else None,
                prompt_logprobs=1 if i == 3 else None,
                repetition_penalty=1.3 if i == 4 else 1.0,
            )
            out.append(
                Request(f"{tag}{i}", system + random_prompt(bundle.spec.vocab_size, 3 + i, 10 + i), sp, k)
            )
        return out

    graphed = make_engine(bundle, keys, graphs=graphs, max_num_seqs=16)
    graphed.generate(reqs("warm"))  # caches the system prompt's blocks
    got = graphed.generate(reqs("run"))
    assert graphed.scheduler.cache_hit_tokens > 0
    plain = make_engine(bundle, keys, graphs="off", prompt_cache=False).generate(reqs("run"))
    for a, b in zip(got, plain, strict=True):
        assert a.token_ids == b.token_ids, a.request_id
        if b.logprobs is not None:
            assert [x.token_id for x in a.logprobs] == [x.token_id for x in b.logprobs]
            assert [x.logprob for x in a.logprobs] == pytest.approx([x.logprob for x in b.logprobs], abs=1e-3)
    r = reqs("ref")[0]
    assert got[0].token_ids == hf_greedy(bundle.hf_model, keys[k], r.prompt_token_ids, NEW)


def test_cuda_graphs_with_prompt_cache_logprobs_and_penalties():
    _cached_logprobs_penalties(_bundle("llama"), "cuda")


def structured_rows_graphed(bundle, graphs: str) -> None:
    """Constrained rows (regex, choice, compact JSON) among free rows of several tenants, decode steps on the graphed
    (or padded) path: tokens equal the eager engine's, and the constrained outputs match their specs."""
    import json
    import re
    from dataclasses import replace

    from server.engine import StructuredOutputs

    keys, reqs = _mixed(bundle)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    specs = [
        StructuredOutputs("regex", "[a-z]{3,8}( [a-z]{2,8}){2,}"),
        StructuredOutputs("choice", json.dumps(["alpha", "beta"])),
        StructuredOutputs("json", json.dumps(schema), any_whitespace=False),
    ]
    reqs = [
        replace(r, sampling=replace(r.sampling, structured=specs[i // 2 % 3])) if i % 2 == 0 else r
        for i, r in enumerate(reqs)
    ]
    graphed = make_engine(bundle, keys, graphs=graphs, max_num_seqs=16)
    got = graphed.generate(reqs)
    plain = make_engine(bundle, keys, graphs="off").generate(reqs)
    assert [o.token_ids for o in got] == [o.token_ids for o in plain]
    for r, o in zip(reqs, got, strict=True):
        so = r.sampling.structured
        assert o.error is None, o.error
        if so is not None and so.kind == "regex":
            assert re.fullmatch(r"[a-z]{3,8}( [a-z]{2,8})*( [a-z]{0,8})?", o.text), (
                o.text
            )  # cut at NEW tokens
        elif so is not None and so.kind == "choice":
            assert o.text in ("alpha", "beta") and o.finish_reason == "stop"
        elif so is not None:
            assert o.finish_reason == "length" or isinstance(json.loads(o.text)["n"], int), o.text
    g = graphed.runner.graphs  # decode steps went through the graphed / padded buffers
    assert g is not None and g.num_replays > 0


def test_cuda_graphs_with_structured_outputs():
    pytest.importorskip(
        "llguidance", reason="structured outputs need llguidance (gpu_check.sh installs .whl/)"
    )
    structured_rows_graphed(_bundle("llama"), "cuda")


def test_speculative_drafts_beside_cuda_graph_steps():
    """Prompt lookup on CUDA: steps with drafts run eagerly, the others replay graphs; fp32 greedy outputs equal
    the plain graphed engine's, and repetitive prompts get drafts verified."""
    bundle = _bundle("llama")
    keys, reqs = _mixed(bundle)
    vocab = bundle.spec.vocab_size
    reqs = [r for r in reqs if r.sampling.greedy]
    for r in reqs:  # repeat each prompt's head so that its n-grams recur
        r.prompt_token_ids = (r.prompt_token_ids[:6] * 3)[: max(len(r.prompt_token_ids), 6)]
        assert all(t < vocab for t in r.prompt_token_ids)
    spec = make_engine(bundle, keys, graphs="cuda", max_num_seqs=16, speculative_tokens=4, spec_ngram=(1, 3))
    plain = make_engine(bundle, keys, graphs="cuda", max_num_seqs=16)
    assert [o.token_ids for o in spec.generate(reqs)] == [o.token_ids for o in plain.generate(reqs)]
    assert spec.scheduler.spec_draft_tokens > 0
    g = spec.runner.graphs
    assert g is not None and g.num_replays > 0


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("slots", [16, 4])
def test_async_decode_follow_ups_launch_without_host_sync(kernels, slots):
    """Async decode on CUDA: every follow-up step (prepared on the host, fed the previous step's tokens on the
    device, launched, its tokens and logprobs copied back behind it) runs under CUDA's sync debug mode "error", with
    seeded sampled rows and logprobs rows beside greedy ones; with 4 slots for 10 requests the follow-ups also admit
    newcomers and run their prompts. Outputs equal the synchronous engine's, and the greedy rows transformers'."""
    bundle = _bundle("llama")
    keys, reqs = _mixed(bundle)
    reqs = [
        replace(r, sampling=replace(r.sampling, temperature=0.8, top_p=0.9, seed=i))
        if i % 3 == 1
        else replace(r, sampling=replace(r.sampling, logprobs=2))
        if i % 3 == 2
        else r
        for i, r in enumerate(reqs)
    ]
    eng = make_engine(bundle, keys, max_num_seqs=slots, kernels=kernels)
    assert eng.async_decode  # auto on CUDA
    eng.generate(reqs)  # captures the graphs, warms the pinned-memory cache
    follow_up = eng._follow_up
    failures: list[BaseException] = []

    def checked(fl):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return follow_up(fl)
        except BaseException as e:
            failures.append(e)
            raise
        finally:
            torch.cuda.set_sync_debug_mode("default")

    eng._follow_up = checked  # type: ignore[method-assign]
    before = eng.num_async_steps
    got = [o.token_ids for o in eng.generate([replace(r, request_id=r.request_id + "b") for r in reqs])]
    assert not failures, failures
    assert eng.num_async_steps - before >= NEW - 2
    sync = make_engine(bundle, keys, max_num_seqs=slots, kernels=kernels, async_decode="off")
    assert got == [o.token_ids for o in sync.generate(reqs)]
    for r, toks in zip(reqs, got, strict=True):
        if r.sampling.greedy:
            kv = keys[r.prefix] if r.prefix is not None else None
            assert toks == hf_greedy(bundle.hf_model, kv, r.prompt_token_ids, NEW), r.request_id


def test_async_engine_thread_on_cuda():
    """The server's engine thread (AsyncEngine) on CUDA, with the defaults a CUDA server runs (Triton kernels where
    available, async decode, graphs): streamed tokens equal the synchronous, eager engine's."""
    import asyncio

    from server.engine.engine import AsyncEngine

    bundle = _bundle("llama")
    keys, reqs = _mixed(bundle)
    want = [o.token_ids for o in make_engine(bundle, keys, async_decode="off", graphs="off").generate(reqs)]
    llm = make_engine(bundle, keys, max_num_seqs=16)
    assert llm.async_decode and llm.runner.graph_mode == "cuda"
    ae = AsyncEngine(llm)
    ae.start()

    async def one(r):
        return [t async for ev in ae.generate(r) for t in ev.token_ids]

    async def main():
        return await asyncio.gather(*(one(r) for r in reqs))

    try:
        got = asyncio.run(main())
    finally:
        ae.shutdown()
    assert got == want
    assert llm.num_async_steps > 0


def test_a_staged_prefix_is_installed_without_a_host_sync():
    """The prefix cache's loader threads stage a fetched prefix in pinned memory in the pool's dtype: installing it
    (in the engine thread, maybe while a chained step runs) copies it without waiting for the device's queue."""
    from tests.engine_utils import random_kv

    bundle = _bundle("llama", torch.bfloat16)
    eng = make_engine(bundle, {})
    kv = random_kv(bundle.spec, 20, seed=1)
    staged = eng.pool.stage(kv)
    assert staged.is_pinned() and staged.dtype == torch.bfloat16
    blocks = eng.pool.allocate(eng.pool.blocks_for(20))
    torch.cuda.set_sync_debug_mode("error")
    try:
        eng.pool.write_prefix(blocks, staged)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(eng.pool.read(blocks, 20).cpu(), kv.to(torch.bfloat16))
