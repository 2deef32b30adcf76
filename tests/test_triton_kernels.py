"""The Triton kernels of the CUDA path against the torch ops they replace, and the engine through them.

On a machine without a GPU they run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before
triton loads); on a GPU machine, on the GPU. Exactness: greedy tokens through the kernels equal transformers' own
decoding fed the same prefix KV (fp32), with mixed tenants, prefixes whose last block is partly filled and a row
without a prefix.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from server.engine import triton_ops
from server.engine.model_runner import _rotate_half
from server.model import bundle_from_model
from tests.engine_utils import hf_greedy, make_engine, mixed_workload
from tests.fixtures.models import make_tiny_gpt2, make_tiny_llama, make_tiny_tokenizer

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")

if not triton_ops.available(DEV):  # pragma: no cover - depends on the machine
    pytest.skip(
        "triton is not installed (it comes with the dev extras on Linux x86-64), or this CPU-only process imported "
        "it before TRITON_INTERPRET=1 was set",
        allow_module_level=True,
    )

# Triton's interpreter converts float32 to bfloat16 by truncation (a GPU rounds to nearest) and computes on bf16 bits
# as integers: bf16 runs on a GPU only; float16 (native in numpy) covers the half-precision code paths everywhere
DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(
        torch.bfloat16,
        marks=pytest.mark.skipif(
            triton_ops.interpreted(), reason="bf16 rounding differs under Triton's interpreter"
        ),
    ),
]


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    elif dtype == torch.float16:
        torch.testing.assert_close(got.float(), want.float(), rtol=2**-9, atol=1e-3)
    else:
        # the kernels round where torch rounds; a reduction in another order can move a value across one rounding
        # boundary, then the next product's: two bf16 ulps at most
        torch.testing.assert_close(got.float(), want.float(), rtol=2**-6, atol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_with_and_without_residual(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 96, generator=g).to(DEV, dtype)
    res = torch.randn(7, 96, generator=g).to(DEV, dtype)
    w = (1 + 0.1 * torch.randn(96, generator=g)).to(DEV, dtype)

    def ref(h):
        hf = h.float()
        return w * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)

    _close(triton_ops.rms_norm(x, w, 1e-5), ref(x), dtype)
    want_res = res + x
    r = res.clone()
    out = triton_ops.rms_norm(x, w, 1e-5, residual=r)
    assert torch.equal(r, want_res)  # the residual is updated in place, rounded as `res + x`
    _close(out, ref(want_res), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(dtype):
    gu = torch.randn(5, 2 * 80, generator=torch.Generator().manual_seed(1)).to(DEV, dtype)
    gate, up = gu.chunk(2, dim=-1)
    _close(triton_ops.silu_mul(gu), F.silu(gate) * up, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hk,d", [(6, 2, 16), (9, 3, 64)])
def test_rope_write_rotates_and_writes_the_cache(dtype, hq, hk, d):
    n, slots = 5, 40
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(n, (hq + 2 * hk) * d, generator=g).to(DEV, dtype)
    pos = torch.tensor([0, 3, 9, 4, 31], device=DEV)
    write = torch.tensor([5, 17, 0, 39, 22], device=DEV)
    ang = torch.arange(32.0)[:, None] * torch.rand(d // 2, generator=g).repeat(2)[None]
    cos, sin = ang.cos().to(DEV, dtype), ang.sin().to(DEV, dtype)
    kc = torch.zeros(slots, hk, d, device=DEV, dtype=dtype)
    vc = torch.zeros_like(kc)
    q = triton_ops.rope_write(qkv, pos, write, cos, sin, kc, vc, hq, hk, d)
    rq, rk, rv = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    c, s = cos[pos][:, None], sin[pos][:, None]
    rq, rk, rv = rq.view(n, hq, d), rk.view(n, hk, d), rv.view(n, hk, d)
    _close(q, rq * c + _rotate_half(rq) * s, dtype)
    _close(kc[write], rk * c + _rotate_half(rk) * s, dtype)
    assert torch.equal(vc[write], rv)
    untouched = torch.ones(slots, dtype=torch.bool)
    untouched[write.cpu()] = False
    assert not kc[untouched.to(DEV)].any() and not vc[untouched.to(DEV)].any()


@pytest.mark.parametrize("dtype", DTYPES)
# (query heads, KV heads, head_dim): GQA 2 and 3, plain multi-head, and SmolLM2-135M's 9/3 x 64
@pytest.mark.parametrize("hq,hk,d", [(4, 2, 16), (6, 2, 16), (3, 3, 16), (9, 3, 64)])
def test_paged_decode_matches_masked_sdpa(dtype, hq, hk, d):
    """Rows with a partly filled last prefix block, a whole-block prefix, no prefix, and shared prefix blocks; the
    key axis whole or split in up to 16 parts (some of them empty for the short rows)."""
    bs = 16
    g = torch.Generator().manual_seed(3)
    num_blocks = 24
    kc = torch.randn(num_blocks * bs, hk, d, generator=g).to(DEV, dtype)
    vc = torch.randn(num_blocks * bs, hk, d, generator=g).to(DEV, dtype)
    # (prefix_len, prefix blocks, own tokens cached + this one, own blocks)
    rows = [
        (20, [3, 7], 1, [0]),
        (20, [3, 7], 37, [1, 9, 2]),
        (16, [4], 70, [5, 6, 8, 10, 11]),
        (0, [], 5, [12]),
    ]
    b = len(rows)
    q = torch.randn(b, hq, d, generator=g).to(DEV, dtype)
    w = max(len(p) + len(o) for _, p, _, o in rows)
    tables = torch.tensor(
        [p + o + [num_blocks] * (w - len(p) - len(o)) for _, p, _, o in rows], dtype=torch.int32
    )
    meta = torch.tensor(
        [[r[0] for r in rows], [len(r[1]) * bs for r in rows], [len(r[1]) * bs + r[2] for r in rows]],
        dtype=torch.int32,
    )
    outs = {
        n: triton_ops.paged_decode(q, kc, vc, tables.to(DEV), meta.to(DEV), bs, None, n)
        for n in (1, 2, 4, 16)
    }
    for i, (plen, pb, own, ob) in enumerate(rows):
        slots = [blk * bs + j for blk in pb for j in range(bs)][:plen] + [
            blk * bs + j for blk in ob for j in range(bs)
        ][:own]
        idx = torch.tensor(slots, device=DEV)
        k = kc[idx].transpose(0, 1).repeat_interleave(hq // hk, 0).float()  # [Hq, S, D]
        v = vc[idx].transpose(0, 1).repeat_interleave(hq // hk, 0).float()
        want = F.scaled_dot_product_attention(q[i].float()[:, None], k, v)[:, 0]
        tol = {torch.float32: 1e-5, torch.float16: 2e-3}.get(dtype, 2e-2)
        for n, out in outs.items():  # the key axis in 1..16 parts (flash-decoding), merged
            torch.testing.assert_close(out[i].float(), want, rtol=tol, atol=tol, msg=f"splits {n}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hk,d", [(6, 2, 16), (3, 3, 16), (9, 3, 64)])
def test_paged_prefill_matches_masked_sdpa(dtype, hq, hk, d):
    """Multi-token rows (prompt chunks, drafts): a first chunk after a partly filled prefix block, a later chunk of
    a row with own keys cached (two query blocks of 64), a row without a prefix, and a short row (the 16-token query
    block); each token sees its row's valid prefix slots and its own keys up to itself, nothing of other rows."""
    bs = 16
    g = torch.Generator().manual_seed(4)
    num_blocks = 40
    kc = torch.randn(num_blocks * bs, hk, d, generator=g).to(DEV, dtype)
    vc = torch.randn(num_blocks * bs, hk, d, generator=g).to(DEV, dtype)
    # (prefix_len, prefix blocks, own keys cached before the step, query tokens, own blocks)
    rows = [
        (20, [3, 7], 0, 23, [0, 1]),
        (16, [4], 37, 90, [5, 6, 8, 10, 11, 12, 13, 14]),
        (0, [], 0, 9, [15]),
        (20, [3, 7], 5, 3, [16]),
    ]
    for max_q in (max(r[3] for r in rows), 16):  # both query-block variants
        sel = [r for r in rows if r[3] <= max_q]
        t = sum(r[3] for r in sel)
        q = torch.randn(t, hq, d, generator=g).to(DEV, dtype)
        w = max(len(r[1]) + len(r[4]) for r in sel)
        tables = torch.tensor(
            [p + o + [num_blocks] * (w - len(p) - len(o)) for _, p, _, _, o in sel], dtype=torch.long
        )
        starts = [sum(r[3] for r in sel[:i]) for i in range(len(sel))]
        meta = torch.tensor(
            [
                starts,
                [r[3] for r in sel],
                [r[0] for r in sel],
                [len(r[1]) * bs for r in sel],
                [r[2] for r in sel],
            ],
            dtype=torch.long,
        )
        out = triton_ops.paged_prefill(q, kc, vc, tables.to(DEV), meta.to(DEV), bs, None, max_q)
        for i, (plen, pb, cached, nq, ob) in enumerate(sel):
            pre = [blk * bs + j for blk in pb for j in range(bs)][:plen]
            own = [blk * bs + j for blk in ob for j in range(bs)][: cached + nq]
            idx = torch.tensor(pre + own, device=DEV)
            k = kc[idx].transpose(0, 1).repeat_interleave(hq // hk, 0).float()  # [Hq, S, D]
            v = vc[idx].transpose(0, 1).repeat_interleave(hq // hk, 0).float()
            # query j (own index cached + j) sees the prefix and own keys 0..cached + j
            seen = torch.arange(plen + cached + nq)[None] <= (plen + cached + torch.arange(nq))[:, None]
            qi = q[starts[i] : starts[i] + nq].transpose(0, 1).float()  # [Hq, nq, D]
            want = F.scaled_dot_product_attention(qi, k, v, attn_mask=seen.to(DEV)).transpose(0, 1)
            tol = {torch.float32: 1e-5, torch.float16: 2e-3}.get(dtype, 2e-2)
            got = out[starts[i] : starts[i] + nq].float()
            torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=f"row {i}, max_q {max_q}")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_engine_through_kernels_equals_transformers_fp32(family):
    """Mixed tenants through the padded graph buffers ("eager" graphs on a CPU, captured on CUDA) and the paged
    kernels give transformers' greedy tokens; a request joining mid-flight included (max_num_seqs < requests)."""
    tok = make_tiny_tokenizer()
    model = (make_tiny_llama if family == "llama" else make_tiny_gpt2)(tok, seed=0).to(DEV)
    bundle = bundle_from_model(model, tok, name=f"tiny-{family}")
    new = 5
    keys, reqs = mixed_workload(bundle.spec, (8, 20, 64), 6, new, no_prefix=5)
    graphs = "cuda" if DEV.type == "cuda" else "eager"
    eng = make_engine(bundle, keys, kernels="triton", graphs=graphs, max_num_seqs=4)
    assert (
        eng.runner.kernels == "triton"
        and eng.runner.fused == (family == "llama")
        and eng.runner.paged_prefill
    )
    got = [o.token_ids for o in eng.generate(reqs)]
    assert eng.runner.graphs is not None and eng.runner.graphs.num_replays >= new - 1
    for r, toks in zip(reqs, got, strict=True):
        kv = keys[r.prefix] if r.prefix is not None else None
        assert toks == hf_greedy(bundle.hf_model, kv, r.prompt_token_ids, new), r.request_id


def test_stale_nan_in_reused_kv_blocks_is_never_read_by_the_kernels():
    """The paged kernels load only a row's valid key slots (`other=0` elsewhere) and drop unseen scores before the
    softmax: NaN left in reused blocks (an overflowed forward's, see test_engine_exactness) changes no token."""
    tok = make_tiny_tokenizer()
    bundle = bundle_from_model(make_tiny_llama(tok, seed=0).to(DEV), tok, name="tiny")
    keys, reqs = mixed_workload(
        bundle.spec, (5, 9), 4, 4, no_prefix=3
    )  # prefixes and prompts ending mid-block
    graphs = "cuda" if DEV.type == "cuda" else "eager"
    cfg = dict(kernels="triton", graphs=graphs, block_size=4, max_num_batched_tokens=16, max_num_seqs=4)
    ref = make_engine(bundle, keys, **cfg).generate(reqs)
    eng = make_engine(bundle, keys, **cfg)
    assert eng.runner.paged_prefill
    pool = eng.pool
    pool.data[:, :, : pool.num_blocks * pool.block_size] = float("nan")
    got = eng.generate(reqs)
    assert [(o.finish_reason, o.token_ids) for o in got] == [(o.finish_reason, o.token_ids) for o in ref]


def test_multi_token_rows_through_the_prefill_kernel_equal_the_torch_path():
    """Every kind of multi-token row goes through the paged prefill kernel: prompts cut into chunks (own keys
    cached before the chunk), prompt-cache hits (a chunk starting after reused blocks), prompt logprobs (logits of
    every position) and speculative drafts being verified. Tokens and log-probabilities equal the torch path's."""
    from server.engine import Request, SamplingParams

    tok = make_tiny_tokenizer()
    bundle = bundle_from_model(make_tiny_llama(tok, seed=0).to(DEV), tok, name="tiny")
    keys, plain = mixed_workload(bundle.spec, (8, 20), 4, 6)
    kl = list(keys)
    system = list(
        range(3, 40)
    )  # a shared leading part of one tenant's prompts: cached blocks for the later ones
    reqs = [
        *plain,
        Request("sys0", [*system, 50, 51], SamplingParams(max_tokens=4, ignore_eos=True), kl[0]),
        Request("sys1", [*system, 60, 61, 62], SamplingParams(max_tokens=4, ignore_eos=True), kl[0]),
        Request(
            "plp",
            list(range(70, 100)),
            SamplingParams(max_tokens=3, ignore_eos=True, prompt_logprobs=2),
            kl[1],
        ),
        # repeated n-grams: prompt lookup drafts from them
        Request("rep", [7, 8, 9, 10, 11] * 6, SamplingParams(max_tokens=30, ignore_eos=True), None),
    ]
    cfg = dict(max_num_batched_tokens=24, speculative_tokens=3, spec_ngram=(1, 3))
    eng = make_engine(bundle, keys, kernels="triton", **cfg)
    assert eng.runner.paged_prefill
    ref = make_engine(bundle, keys, kernels="torch", **cfg)
    got, want = eng.generate(reqs), ref.generate(reqs)
    # how many tokens are drafted depends on when prefixes finish loading (threads); the outputs do not
    assert eng.scheduler.spec_draft_tokens > 0
    for a, b in zip(got, want, strict=True):
        assert a.token_ids == b.token_ids, a.request_id
    plp, plp_ref = got[-2].prompt_logprobs, want[-2].prompt_logprobs
    assert plp is not None and plp_ref is not None and len(plp) == 30
    assert [x.logprob for x in plp[1:]] == pytest.approx([x.logprob for x in plp_ref[1:]], abs=1e-4)


def test_generic_family_and_qwen3_through_the_paged_kernel():
    """A family served through transformers' modeling code (Phi-3, GQA; its start-up probe runs through the kernel)
    and Qwen3 (native path, per-head q/k norms: paged attention without the fused elementwise kernels) give
    transformers' greedy tokens with mixed tenants."""
    from tests.fixtures.models import make_tiny_causal_lm

    tok = make_tiny_tokenizer()
    for model_type, extra in (("phi3", {"num_key_value_heads": 2}), ("qwen3", {"num_key_value_heads": 2})):
        model = make_tiny_causal_lm(model_type, tok, 0, **extra).to(DEV)
        bundle = bundle_from_model(model, tok, name=model_type)
        keys, reqs = mixed_workload(bundle.spec, (8, 20), 4, 4, no_prefix=3)
        eng = make_engine(bundle, keys, kernels="triton")
        assert eng.runner.kernels == "triton" and not eng.runner.fused
        for r, o in zip(reqs, eng.generate(reqs), strict=True):
            kv = keys[r.prefix] if r.prefix is not None else None
            assert o.token_ids == hf_greedy(bundle.hf_model, kv, r.prompt_token_ids, 4), (
                model_type,
                r.request_id,
            )


def test_step_inputs_are_aligned_for_the_kernels():
    """Every integer input of a paged step starts at a 16-byte boundary whatever the token and row counts, so
    Triton never compiles another alignment variant in the middle of serving."""
    tok = make_tiny_tokenizer()
    bundle = bundle_from_model(make_tiny_llama(tok, seed=0).to(DEV), tok, name="tiny")
    eng = make_engine(bundle, {}, kernels="triton", graphs="off")
    from server.engine.model_runner import RowInput

    blocks = eng.pool.allocate(3)
    for n_rows in (1, 2, 3):
        rows = [RowInput([5], 4 + i, 0, [], [blocks[i]], 4 + i, True) for i in range(n_rows)]
        rows.append(RowInput([1, 2, 3], 0, 0, [], [blocks[2]], 0, True))  # a prefill row: odd token counts
        inp = eng.runner.prepare(rows)
        assert inp.decode is not None and inp.decode.tables is not None and inp.decode.meta is not None
        pre = inp.prefill
        assert pre is not None and pre.tables is not None and pre.meta is not None and pre.mask is None
        for t in (
            inp.input_ids,
            inp.positions,
            inp.write_slots,
            inp.sample_idx,
            inp.decode.tables,
            inp.decode.meta,
            pre.tables,
            pre.meta,
        ):
            assert t.data_ptr() % 16 == 0, n_rows


def test_a_prefill_kernel_that_cannot_start_leaves_decode_on_its_kernel(monkeypatch, caplog):
    """Where only the prefill kernel fails its start-up launch, multi-token rows attend through torch ops and the
    rest keeps its kernels; tokens stay transformers' own."""

    def fail(*args, **kwargs):
        raise RuntimeError("out of resources: shared memory")

    monkeypatch.setattr(triton_ops, "smoke_test_prefill", fail)
    tok = make_tiny_tokenizer()
    bundle = bundle_from_model(make_tiny_llama(tok, seed=0).to(DEV), tok, name="tiny")
    keys, reqs = mixed_workload(bundle.spec, (8, 20), 4, 4, no_prefix=3)
    eng = make_engine(bundle, keys, kernels="triton")
    assert eng.runner.kernels == "triton" and eng.runner.fused and not eng.runner.paged_prefill
    assert "Triton prefill kernel off (RuntimeError: out of resources: shared memory)" in caplog.text
    from server.engine.model_runner import RowInput

    blocks = eng.pool.allocate(2)
    inp = eng.runner.prepare(
        [RowInput([5], 4, 0, [], [blocks[0]], 4, True), RowInput([1, 2], 0, 0, [], [blocks[1]], 0, True)]
    )
    assert inp.decode is not None and inp.decode.tables is not None  # decode: the paged kernel
    assert inp.prefill is not None and inp.prefill.tables is None and inp.prefill.mask is not None
    eng.pool.free(blocks)
    for r, o in zip(reqs, eng.generate(reqs), strict=True):
        kv = keys[r.prefix] if r.prefix is not None else None
        assert o.token_ids == hf_greedy(bundle.hf_model, kv, r.prompt_token_ids, 4), r.request_id


def test_kernels_option_is_checked():
    tok = make_tiny_tokenizer()
    bundle = bundle_from_model(
        make_tiny_llama(tok, seed=0, hidden=48, heads=4, kv_heads=2).to(DEV), tok, name="odd"
    )
    with pytest.raises(ValueError, match="head_dim 12"):
        make_engine(bundle, {}, kernels="triton")
    # head_dim 12 does not suit the kernels: "auto" falls back to torch ops on any device
    assert make_engine(bundle, {}, kernels="auto").runner.kernels == "torch"
    assert make_engine(bundle, {}, kernels="auto").runner.fused is False
    with pytest.raises(ValueError, match="kernels must be"):
        make_engine(bundle, {}, kernels="cuda")


_COMPILE = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from server.engine import triton_kernels as K

seen = set()

def build(fn, sig, cex, cap, **options):
    # the same kernel at the same constants for another model is compiled once (the norm, SiLU and merge kernels
    # of Llama-3.2-1B and Llama-3-8B share theirs)
    key = (fn.__name__, *(tuple(sorted(d.items())) for d in (sig, cex, options)), cap)
    if key in seen:
        return
    seen.add(key)
    names = fn.arg_names
    full = {n: ("constexpr" if n in cex else sig[n]) for n in names}
    src = ASTSource(fn=fn, signature=full, constexprs={(names.index(k),): v for k, v in cex.items()})
    k = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=options)
    # shared memory per block: A100 163 KB, H100/H200 227 KB (opt-in maximums)
    limit = {80: 166912, 90: 232448}[cap]
    assert k.metadata.shared <= limit, (fn.__name__, cex, cap, k.metadata.shared)

# (query heads, KV heads, head_dim, hidden, intermediate): SmolLM2-135M, Llama-3.2-1B, Llama-3-8B (the tests' tiny
# Llama is left out: its kernels compile for real whenever the suite runs on a GPU)
shapes = [(9, 3, 64, 576, 1536), (32, 8, 64, 2048, 8192), (32, 8, 128, 4096, 14336)]
n = 0
for cap in map(int, sys.argv[1:]):
    for dt in ("bf16", "fp16", "fp32"):
        for hq, hk, d, h, inter in shapes:
            p, i32 = f"*{dt}", "i32"
            rep = hq // hk
            wide = max(d, 16) * (4 if dt == "fp32" else 2) > 256  # as the launchers decide (triton_ops)
            for splits in (1, 8):
                build(K.paged_decode_kernel,
                      dict(q_ptr=p, k_ptr=p, v_ptr=p, tables_ptr="*i64", meta_ptr="*i64",
                           out_ptr=p if splits == 1 else "*fp32", lse_ptr="*fp32", stride_qb=i32, stride_qh=i32,
                           stride_ks=i32, stride_kh=i32, stride_tb=i32, stride_meta=i32, stride_ob=i32,
                           stride_oh=i32, scale="fp32"),
                      dict(BS=16, D=d, DP=max(d, 16), REP=rep, RP=max(16, 1 << (rep - 1).bit_length()), BN=64,
                           SPLITS=splits, IEEE=dt == "fp32"), cap, num_stages=2 if wide else 3)
            for bm in (16, 64):
                build(K.paged_prefill_kernel,
                      dict(q_ptr=p, k_ptr=p, v_ptr=p, tables_ptr="*i64", meta_ptr="*i64", out_ptr=p,
                           stride_qt=i32, stride_qh=i32, stride_ks=i32, stride_kh=i32, stride_tb=i32,
                           stride_meta=i32, stride_ot=i32, stride_oh=i32, scale="fp32"),
                      dict(BS=16, D=d, DP=max(d, 16), REP=rep, BM=bm, BN=32 if wide else 64,
                           IEEE=dt == "fp32"), cap, num_stages=2)
            build(K.merge_splits_kernel,
                  dict(part_ptr="*fp32", lse_ptr="*fp32", out_ptr=p, stride_ob=i32, stride_oh=i32),
                  dict(D=d, DP=max(d, 16), SPLITS=8), cap)
            build(K.rms_norm_kernel,
                  dict(x_ptr=p, res_ptr=p, w_ptr=p, out_ptr=p, stride_x=i32, stride_r=i32, stride_o=i32, H=i32,
                       eps="fp32"),
                  dict(HAS_RES=True, BH=1 << (h - 1).bit_length()), cap)
            build(K.rope_write_kernel,
                  dict(qkv_ptr=p, pos_ptr="*i64", slot_ptr="*i64", cos_ptr=p, sin_ptr=p, q_out_ptr=p, k_cache_ptr=p,
                       v_cache_ptr=p, stride_qkv=i32, stride_cos=i32, stride_qo=i32, stride_cs=i32),
                  dict(HQ=hq, HK=hk, D=d, HP=1 << (hq + hk - 1).bit_length(), KP=1 << (hk - 1).bit_length()), cap)
            build(K.silu_mul_kernel, dict(gu_ptr=p, out_ptr=p, stride_gu=i32, stride_o=i32, inter=i32),
                  dict(BLOCK=min(1024, 1 << (inter - 1).bit_length())), cap)
            n += 8
print(n, "compiled", len(seen))
"""


@pytest.mark.skipif(
    DEV.type == "cuda", reason="on a GPU the kernels compile and run for real (the other tests)"
)
def test_kernels_compile_for_ampere_and_hopper():
    """Triton's interpreter checks what the kernels compute, not that they lower to GPU code: compile each one ahead
    of time for sm_80 (A100) and sm_90 (H100/H200) with Triton's bundled ptxas, in bf16, fp16 and fp32, at the shapes
    of SmolLM2-135M, Llama-3.2-1B and Llama-3-8B, with the launchers' pipeline depths,
    within the GPUs' shared memory per block. Needs no GPU."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    # one process per GPU generation, side by side: the suite itself runs on one core, compiling is CPU-bound
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _COMPILE, str(cap)],
            env=env,
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for cap in (80, 90)
    ]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        assert out.split()[0] == str(3 * 3 * 8), out
