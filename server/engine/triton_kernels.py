"""Triton kernels of the CUDA fast path (imported only through `server.engine.triton_ops`, which checks for triton).

- `paged_decode_kernel`: one query token per row against the row's keys/values read straight from the paged pool
  through its block table (prefix blocks, then own blocks): no gathered copy of the keys, no additive mask. One
  program per (row, KV head, split) computes the query heads of that KV head together (grouped-query attention) with
  an online softmax over tiles of BN key slots. With few rows the key axis is split (flash-decoding) so that a long
  context keeps the GPU busy, and `merge_splits_kernel` combines the splits by their log-sum-exp.
- `paged_prefill_kernel`: the multi-token rows of a step (prompt chunks, verified drafts), causal over their own
  tokens, through the same block tables: blocks of query tokens of one head per program, flash-attention's online
  softmax over tiles of key slots, and no key beyond the block's last query read.
- `rms_norm_kernel`: RMSNorm of a row, optionally adding a residual first (`res += x`, then the norm of `res`).
- `rope_write_kernel`: rotary embedding of a token's query and key heads; writes the rotated key and the value into
  the KV pool at the token's slot and the rotated query to its own buffer.
- `silu_mul_kernel`: `silu(gate) * up` of a fused gate/up projection.

The elementwise kernels round where the torch reference rounds (after each product in the model's dtype) and are
compiled without fused multiply-adds (`triton_ops` launches them with `enable_fp_fusion=False`), so results match the
eager path's up to the order of a reduction and the precision of `exp`/`rsqrt`, in bf16 and in fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _attend_tile(
    q,
    k_ptr,
    v_ptr,
    table_ptr,
    start,
    hi,
    p_len,
    p_slots,
    own_q,
    kh,
    stride_ks,
    stride_kh,
    d,
    dmask,
    scale,
    m,
    lse,
    acc,
    BS: tl.constexpr,
    BN: tl.constexpr,
    IEEE: tl.constexpr,
):
    """One online-softmax step of the paged kernels: key slots `start..start+BN` (below `hi`) of a row whose block
    table starts at `table_ptr`, for query rows `q` that see every valid prefix slot and own keys up to `own_q`
    (each query row's own index). Returns the updated running max, sum of exponentials and output accumulator."""
    j = start + tl.arange(0, BN)
    inb = j < hi
    in_prefix = j < p_slots
    # the prefix's last block may be partly filled: its unused slots are skipped
    valid = inb & (~in_prefix | (j < p_len))
    blk = tl.load(table_ptr + j // BS, mask=inb, other=0)
    slot = blk.to(tl.int64) * BS + j % BS
    off = slot[:, None] * stride_ks + kh * stride_kh + d[None, :]
    lm = valid[:, None] & dmask[None, :]
    k = tl.load(k_ptr + off, mask=lm, other=0.0)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    seen = valid[None, :] & (in_prefix[None, :] | ((j - p_slots)[None, :] <= own_q[:, None]))
    s = tl.where(seen, s * scale, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_safe)
    p = tl.where(seen, tl.exp(s - m_safe[:, None]), 0.0)
    lse = lse * alpha + tl.sum(p, axis=1)
    v = tl.load(v_ptr + off, mask=lm, other=0.0)
    if IEEE:
        pv = tl.dot(p, v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return m_new, lse, acc * alpha[:, None] + pv


# the row count and table width change from step to step: not specialized (an int equal to 1 or divisible by 16
# would otherwise compile another variant, in the middle of serving)
@triton.jit(do_not_specialize=["stride_tb", "stride_meta"])
def paged_decode_kernel(
    q_ptr,  # [B, Hq, D]
    k_ptr,  # [slots, K, D] (one layer's key plane of the pool)
    v_ptr,  # [slots, K, D]
    tables_ptr,  # [B, W] int64: block ids, prefix blocks then own blocks
    meta_ptr,  # [3, >=B] int64: prefix length, prefix slots (whole prefix blocks), key slots to read
    out_ptr,  # SPLITS == 1: [B, Hq, D] in q's dtype; else float32 partials [B, Hq, SPLITS, D]
    lse_ptr,  # SPLITS > 1: float32 [B, Hq, SPLITS] log-sum-exp of each split's scores
    stride_qb,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_tb,
    stride_meta,
    stride_ob,
    stride_oh,
    scale,
    BS: tl.constexpr,
    D: tl.constexpr,
    DP: tl.constexpr,
    REP: tl.constexpr,
    RP: tl.constexpr,
    BN: tl.constexpr,
    SPLITS: tl.constexpr,
    IEEE: tl.constexpr,
):
    b = tl.program_id(0)
    kh = tl.program_id(1)
    sp = tl.program_id(2)
    p_len = tl.load(meta_ptr + b)
    p_slots = tl.load(meta_ptr + stride_meta + b)
    total = tl.load(meta_ptr + 2 * stride_meta + b)
    # flash-decoding: split `sp` of SPLITS takes an equal share of the row's tiles (few rows, long contexts)
    tiles = tl.cdiv(total, BN)
    per = tl.cdiv(tiles, SPLITS)
    lo = sp * per * BN
    hi = tl.minimum(total, (sp + 1) * per * BN)
    r = tl.arange(0, RP)
    d = tl.arange(0, DP)
    rmask = r < REP
    dmask = d < D
    heads = kh * REP + r
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
        mask=rmask[:, None] & dmask[None, :],
        other=0.0,
    )
    m = tl.full([RP], float("-inf"), tl.float32)
    lse = tl.zeros([RP], tl.float32)
    acc = tl.zeros([RP, DP], tl.float32)
    own_q = r * 0 + total  # a decode row's one query sees every key slot of its range
    for start in range(lo, hi, BN):
        m, lse, acc = _attend_tile(
            q, k_ptr, v_ptr, tables_ptr + b * stride_tb, start, hi, p_len, p_slots, own_q, kh, stride_ks,
            stride_kh, d, dmask, scale, m, lse, acc, BS, BN, IEEE,
        )  # fmt: skip
    out = acc / tl.where(lse == 0.0, 1.0, lse)[:, None]
    omask = rmask[:, None] & dmask[None, :]
    if SPLITS == 1:
        tl.store(
            out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=omask,
        )
    else:
        # an empty split (a row shorter than the others' share) reports -inf: it weighs nothing in the merge
        row_lse = tl.where(lse == 0.0, float("-inf"), m + tl.log(tl.where(lse == 0.0, 1.0, lse)))
        base = (b * (REP * tl.num_programs(1)) + heads) * SPLITS + sp
        tl.store(lse_ptr + base, row_lse, mask=rmask)
        tl.store(out_ptr + base[:, None] * D + d[None, :], out, mask=omask)


# the token and row counts and the table width change from step to step: not specialized
@triton.jit(do_not_specialize=["stride_qt", "stride_tb", "stride_meta", "stride_ot"])
def paged_prefill_kernel(
    q_ptr,  # [T, Hq, D]: the tokens of the multi-token rows, row after row
    k_ptr,  # [slots, K, D] (one layer's key plane of the pool; this step's keys already written)
    v_ptr,  # [slots, K, D]
    tables_ptr,  # [G, W] int64: block ids, prefix blocks then own blocks
    meta_ptr,  # [5, >=G] int64: first token (row of q), query tokens, prefix length, prefix slots, own keys before
    out_ptr,  # [T, Hq, D] in q's dtype
    stride_qt,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_tb,
    stride_meta,
    stride_ot,
    stride_oh,
    scale,
    BS: tl.constexpr,
    D: tl.constexpr,
    DP: tl.constexpr,
    REP: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Causal attention of a row's BM query tokens (one query head) over its prefix and its own keys, read from the
    pool through its block table: query i (own index `cached + i`) sees every valid prefix slot and own keys up to
    its own index. Grid (rows, query blocks, query heads); blocks past a row's tokens do nothing."""
    row = tl.program_id(0)
    qb = tl.program_id(1)
    h = tl.program_id(2)
    nq = tl.load(meta_ptr + stride_meta + row)
    if qb * BM < nq:
        t0 = tl.load(meta_ptr + row)
        p_len = tl.load(meta_ptr + 2 * stride_meta + row)
        p_slots = tl.load(meta_ptr + 3 * stride_meta + row)
        cached = tl.load(meta_ptr + 4 * stride_meta + row)
        kh = h // REP
        i = qb * BM + tl.arange(0, BM)
        qmask = i < nq
        d = tl.arange(0, DP)
        dmask = d < D
        tok = (t0 + i).to(tl.int64)
        io = qmask[:, None] & dmask[None, :]
        q = tl.load(q_ptr + tok[:, None] * stride_qt + h * stride_qh + d[None, :], mask=io, other=0.0)
        own_q = cached + i  # each query's own index: it sees own keys up to it
        # the block's last query sees the most keys: nothing beyond is read
        hi = p_slots + cached + tl.minimum(nq, qb * BM + BM)
        m = tl.full([BM], float("-inf"), tl.float32)
        lse = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, DP], tl.float32)
        for start in range(0, hi, BN):
            m, lse, acc = _attend_tile(
                q, k_ptr, v_ptr, tables_ptr + row * stride_tb, start, hi, p_len, p_slots, own_q, kh, stride_ks,
                stride_kh, d, dmask, scale, m, lse, acc, BS, BN, IEEE,
            )  # fmt: skip
        out = acc / tl.where(lse == 0.0, 1.0, lse)[:, None]
        tl.store(
            out_ptr + tok[:, None] * stride_ot + h * stride_oh + d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=io,
        )


@triton.jit
def merge_splits_kernel(
    part_ptr, lse_ptr, out_ptr, stride_ob, stride_oh, D: tl.constexpr, DP: tl.constexpr, SPLITS: tl.constexpr
):
    """out[b, h] = the splits' partial outputs weighted by their share of the softmax mass. Grid (B, Hq)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    row = b * tl.num_programs(1) + h
    sidx = tl.arange(0, SPLITS)
    d = tl.arange(0, DP)
    lse = tl.load(lse_ptr + row * SPLITS + sidx)
    m = tl.max(lse, axis=0)
    w = tl.where(lse == float("-inf"), 0.0, tl.exp(lse - m))
    part = tl.load(
        part_ptr + (row * SPLITS + sidx)[:, None] * D + d[None, :], mask=(d < D)[None, :], other=0.0
    )
    out = tl.sum(w[:, None] * part, axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < D)


@triton.jit
def rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    stride_x,
    stride_r,
    stride_o,
    H,
    eps,
    HAS_RES: tl.constexpr,
    BH: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BH)
    cm = c < H
    x = tl.load(x_ptr + row * stride_x + c, mask=cm, other=0.0)
    if HAS_RES:
        res = tl.load(res_ptr + row * stride_r + c, mask=cm, other=0.0)
        x = (res.to(tl.float32) + x.to(tl.float32)).to(res_ptr.dtype.element_ty)
        tl.store(res_ptr + row * stride_r + c, x, mask=cm)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / H
    n = (xf * tl.rsqrt(var + eps)).to(out_ptr.dtype.element_ty)
    w = tl.load(w_ptr + c, mask=cm, other=0.0)
    y = n.to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * stride_o + c, y.to(out_ptr.dtype.element_ty), mask=cm)


@triton.jit
def rope_write_kernel(
    qkv_ptr,  # [N, (HQ + 2 HK) * D]
    pos_ptr,  # [N]
    slot_ptr,  # [N]
    cos_ptr,  # [P, D]
    sin_ptr,
    q_out_ptr,  # [N, HQ, D]
    k_cache_ptr,  # [slots, HK, D]
    v_cache_ptr,
    stride_qkv,
    stride_cos,
    stride_qo,
    stride_cs,
    HQ: tl.constexpr,
    HK: tl.constexpr,
    D: tl.constexpr,
    HP: tl.constexpr,
    KP: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    h = tl.arange(0, HP)
    d = tl.arange(0, D)
    hm = h < HQ + HK
    half = D // 2
    rot = tl.where(d < half, d + half, d - half)
    base = qkv_ptr + t * stride_qkv
    x = tl.load(base + h[:, None] * D + d[None, :], mask=hm[:, None], other=0.0)
    xr = tl.load(base + h[:, None] * D + rot[None, :], mask=hm[:, None], other=0.0)
    xr = xr.to(tl.float32)
    xr = tl.where((d < half)[None, :], -xr, xr)  # rotate_half: (-x2, x1)
    c = tl.load(cos_ptr + pos * stride_cos + d)
    s = tl.load(sin_ptr + pos * stride_cos + d)
    dt = q_out_ptr.dtype.element_ty
    a = (x.to(tl.float32) * c.to(tl.float32)[None, :]).to(dt)
    bb = (xr * s.to(tl.float32)[None, :]).to(dt)
    y = (a.to(tl.float32) + bb.to(tl.float32)).to(dt)
    is_q = h < HQ
    tl.store(q_out_ptr + t * stride_qo + h[:, None] * D + d[None, :], y, mask=is_q[:, None])
    kh = tl.where(is_q, 0, h - HQ)
    tl.store(k_cache_ptr + slot * stride_cs + kh[:, None] * D + d[None, :], y, mask=(hm & ~is_q)[:, None])
    vh = tl.arange(0, KP)
    vm = vh < HK
    v = tl.load(base + (HQ + HK) * D + vh[:, None] * D + d[None, :], mask=vm[:, None], other=0.0)
    tl.store(v_cache_ptr + slot * stride_cs + vh[:, None] * D + d[None, :], v, mask=vm[:, None])


@triton.jit
def silu_mul_kernel(gu_ptr, out_ptr, stride_gu, stride_o, inter, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    im = i < inter
    g = tl.load(gu_ptr + t * stride_gu + i, mask=im, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + t * stride_gu + inter + i, mask=im, other=0.0).to(tl.float32)
    dt = out_ptr.dtype.element_ty
    act = (g * tl.sigmoid(g)).to(dt)
    tl.store(out_ptr + t * stride_o + i, (act.to(tl.float32) * u).to(dt), mask=im)
