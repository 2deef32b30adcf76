"""Launchers of the Triton kernels (server/engine/triton_kernels.py) for the CUDA fast path.

Triton is imported on first use, so the server runs without it (CPU machines, `kernels="torch"`). On a CPU the
kernels run only under Triton's interpreter (`TRITON_INTERPRET=1`, set before the first launch), which is how the
test suite checks them against the torch reference on a machine without a GPU. No launcher syncs with the device:
each one is safe inside a captured CUDA graph.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType
from typing import Any

import torch

# key slots per tile of the decode attention (any block size works: each slot finds its block)
_BN = 64


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _kernels() -> ModuleType | None:
    try:
        from server.engine import triton_kernels
    except Exception:  # triton missing or broken: the torch path serves
        return None
    return triton_kernels


def available(device: torch.device) -> bool:
    """Whether the Triton kernels can run on `device`: CUDA with triton installed, or any device when interpreted."""
    if device.type != "cuda" and not interpreted():
        return False
    return _kernels() is not None


def unsupported_reason(num_heads: int, num_kv_heads: int, head_dim: int) -> str | None:
    """Why a model's shape cannot use the kernels (None: it can)."""
    if head_dim < 16 or head_dim & (head_dim - 1):
        return f"head_dim {head_dim} is not a power of two >= 16"
    if num_heads % num_kv_heads:
        return f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads"
    return None


def device_reason(device: torch.device) -> str | None:
    """Why `device` cannot run the kernels well (None: it can): Triton on CUDA needs compute capability 8.0+ for
    bf16 matrix products (A100, H100, L4, RTX 30xx and later)."""
    if device.type != "cuda":
        return None if interpreted() else "not a CUDA device"
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 0):
        return f"compute capability {cap[0]}.{cap[1]} (needs 8.0 or later)"
    return None


def smoke_test(
    device: torch.device, dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int
) -> None:
    """Compile and run every kernel once at the model's head shape (raises what a launch would: a missing C
    compiler, an unsupported GPU, not enough shared memory), before the engine relies on them."""
    kw: dict[str, Any] = {"device": device, "dtype": dtype}
    hq, hk, d = num_heads, num_kv_heads, head_dim
    x = torch.ones(2, 32, **kw)
    rms_norm(x, torch.ones(32, **kw), 1e-6, residual=torch.zeros(2, 32, **kw))
    silu_mul(torch.ones(2, 64, **kw))
    kc = torch.zeros(33, hk, d, **kw)
    vc = torch.zeros_like(kc)
    pos = torch.zeros(2, dtype=torch.long, device=device)
    cs = torch.ones(4, d, **kw)
    q = rope_write(torch.ones(2, (hq + 2 * hk) * d, **kw), pos, pos + 1, cs, cs, kc, vc, hq, hk, d)
    meta = torch.tensor([[0, 0], [0, 0], [1, 2]], dtype=torch.long, device=device)
    out = paged_decode(q, kc, vc, torch.zeros(2, 1, dtype=torch.long, device=device), meta, 16, None)
    if not bool(torch.isfinite(out).all()):
        raise RuntimeError("the paged decode kernel returned non-finite values")


def smoke_test_prefill(
    device: torch.device, dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int
) -> None:
    """`smoke_test` for the paged prefill kernel, both of its query-block variants (a row of 2 tokens, one of 17).
    Separate: where only this kernel cannot run (its tiles want more shared memory than a GPU has, say), decode
    keeps its kernels."""
    kw: dict[str, Any] = {"device": device, "dtype": dtype}
    kc = torch.zeros(33, num_kv_heads, head_dim, **kw)
    for n in (2, 17):
        meta = torch.tensor([[0], [n], [0], [0], [0]], dtype=torch.long, device=device)
        tables = torch.zeros(1, 2, dtype=torch.long, device=device)
        q = torch.ones(n, num_heads, head_dim, **kw)
        out = paged_prefill(q, kc, torch.zeros_like(kc), tables, meta, 16, None, n)
        if not bool(torch.isfinite(out).all()):
            raise RuntimeError("the paged prefill kernel returned non-finite values")


def _k() -> ModuleType:
    k = _kernels()
    if k is None:  # pragma: no cover - callers check available() first
        raise RuntimeError("triton is not installed")
    return k


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.cache  # asked by every layer's decode attention
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # the interpreter: small, so that tests exercise the split path
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_splits(batch: int, num_kv_heads: int, device: torch.device) -> int:
    """How many parts the key axis is split into (flash-decoding): enough programs for about two per SM when rows
    x KV heads alone would leave most of the GPU idle, at most 16; 1 for full batches. Depends on the batch size
    only, so a CUDA graph captured at a batch bucket keeps its split."""
    programs = batch * num_kv_heads
    splits = 1
    while splits < 16 and programs * splits * 2 <= 2 * _num_sms(device):
        splits *= 2
    return splits


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,
    meta: torch.Tensor,
    block_size: int,
    scale: float | None,
    splits: int | None = None,
) -> torch.Tensor:
    """q: [B, Hq, D]; k/v_cache: [slots, K, D]; tables: [B, W] integer block ids; meta: [3, >=B] integer rows
    (prefix length, prefix slots, key slots to read). Returns [B, Hq, D]: each row's query attending to its valid
    prefix slots and its own slots. `splits` (a power of two; default `decode_splits`) parts of the key axis run in
    parallel and are merged."""
    b, hq, d = q.shape
    kh = k_cache.shape[1]
    rep = hq // kh
    out = torch.empty_like(q)
    if b == 0:
        return out
    assert q.stride(2) == 1 and k_cache.stride(2) == 1 and tables.stride(1) == 1 and meta.stride(1) == 1
    assert k_cache.stride() == v_cache.stride()
    splits = splits or decode_splits(b, kh, q.device)
    assert splits & (splits - 1) == 0, splits
    dp = _pow2(max(d, 16))
    if splits > 1:
        part = torch.empty(b, hq, splits, d, dtype=torch.float32, device=q.device)
        lse = torch.empty(b, hq, splits, dtype=torch.float32, device=q.device)
    else:
        part, lse = out, out  # lse unused
    _k().paged_decode_kernel[(b, kh, splits)](
        q,
        k_cache,
        v_cache,
        tables,
        meta,
        part,
        lse,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        tables.stride(0),
        meta.stride(0),
        out.stride(0),
        out.stride(1),
        float(scale if scale is not None else d**-0.5),
        BS=block_size,
        D=d,
        DP=dp,
        REP=rep,
        RP=max(16, _pow2(rep)),
        BN=_BN,
        SPLITS=splits,
        IEEE=q.dtype == torch.float32,
        # fp32 at head_dim 128+ would want more shared memory than GPUs with ~100 KB per block have
        num_stages=2 if dp * q.element_size() > 256 else 3,
        enable_fp_fusion=True,
    )
    if splits > 1:
        _k().merge_splits_kernel[(b, hq)](
            part, lse, out, out.stride(0), out.stride(1), D=d, DP=dp, SPLITS=splits, enable_fp_fusion=True
        )
    return out


def prefill_block(max_q: int) -> int:
    """Query tokens per program of the prefill kernel: 16 for short rows (drafts, small chunks), else 64; two
    compiled variants in all."""
    return 16 if max_q <= 16 else 64


def paged_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,
    meta: torch.Tensor,
    block_size: int,
    scale: float | None,
    max_q: int,
) -> torch.Tensor:
    """q: [T, Hq, D], the multi-token rows' tokens one row after another; k/v_cache: [slots, K, D] with this step's
    keys already written; tables: [G, W] integer block ids; meta: [5, >=G] integer rows (first token in q, query
    tokens, prefix length, prefix slots, own keys cached before the step); `max_q`: the most query tokens of a row.
    Returns [T, Hq, D]: each token attending to its row's valid prefix slots and its own keys up to itself."""
    t, hq, d = q.shape
    kh = k_cache.shape[1]
    out = torch.empty_like(q)
    g = tables.shape[0]
    if t == 0 or g == 0:
        return out
    assert q.stride(2) == 1 and k_cache.stride(2) == 1 and tables.stride(1) == 1 and meta.stride(1) == 1
    assert k_cache.stride() == v_cache.stride()
    dp = _pow2(max(d, 16))
    bm = prefill_block(max_q)
    # fp32 tiles at head_dim 128+ would want more shared memory than GPUs with ~100 KB per block have
    bn = 32 if dp * q.element_size() > 256 else 64
    _k().paged_prefill_kernel[(g, -(-max_q // bm), hq)](
        q,
        k_cache,
        v_cache,
        tables,
        meta,
        out,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        tables.stride(0),
        meta.stride(0),
        out.stride(0),
        out.stride(1),
        float(scale if scale is not None else d**-0.5),
        BS=block_size,
        D=d,
        DP=dp,
        REP=hq // kh,
        BM=bm,
        BN=bn,
        IEEE=q.dtype == torch.float32,
        num_stages=2,
        enable_fp_fusion=True,
    )
    return out


def rms_norm(
    x: torch.Tensor, w: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """`w * norm(x)` per row, with the model's rounding. With `residual`: `residual += x` in place first, then the
    norm of `residual`. x: [N, H]."""
    n, h = x.shape
    out = torch.empty_like(x)
    if n == 0:
        return out
    res = residual if residual is not None else x
    assert x.stride(1) == 1 and res.stride(1) == 1
    _k().rms_norm_kernel[(n,)](
        x,
        res,
        w,
        out,
        x.stride(0),
        res.stride(0),
        out.stride(0),
        h,
        float(eps),
        HAS_RES=residual is not None,
        BH=_pow2(h),
        enable_fp_fusion=False,
    )
    return out


def rope_write(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> torch.Tensor:
    """qkv: [N, (Hq + 2K) * D] from the fused projection. Writes the rotated keys and the values at `slots` of
    k/v_cache ([slots, K, D]) and returns the rotated queries [N, Hq, D]."""
    n = qkv.shape[0]
    q = torch.empty(n, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if n == 0:
        return q
    assert qkv.stride(1) == 1 and cos.stride() == sin.stride() and cos.stride(1) == 1
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    _k().rope_write_kernel[(n,)](
        qkv,
        positions,
        slots,
        cos,
        sin,
        q,
        k_cache,
        v_cache,
        qkv.stride(0),
        cos.stride(0),
        q.stride(0),
        k_cache.stride(0),
        HQ=num_heads,
        HK=num_kv_heads,
        D=head_dim,
        HP=_pow2(num_heads + num_kv_heads),
        KP=_pow2(num_kv_heads),
        enable_fp_fusion=False,
    )
    return q


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """gu: [N, 2I] (gate, then up) -> silu(gate) * up, [N, I]."""
    n, two = gu.shape
    inter = two // 2
    out = torch.empty(n, inter, dtype=gu.dtype, device=gu.device)
    if n == 0:
        return out
    assert gu.stride(1) == 1
    block = min(1024, _pow2(inter))
    _k().silu_mul_kernel[(n, -(-inter // block))](
        gu, out, gu.stride(0), out.stride(0), inter, BLOCK=block, enable_fp_fusion=False
    )
    return out
