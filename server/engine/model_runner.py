"""Native forward pass over a flattened batch of tokens with paged attention.

The frozen transformers model provides the weights (shared, never copied: the fused QKV and gate/up matrices are
built once and the transformers modules are re-pointed at views of them). Every row of a batch attends to its own
block table: its tenant's shared prefix blocks followed by its own blocks. Linear layers run on the flattened tokens
(no padding; decode rows' tokens first). Attention runs in two groups, one query token per row (decode) and padded
multi-token rows (prefill chunks), each with an additive mask built once per step from the logical position of every
gathered key slot. A group's keys are gathered padded to its longest row, so where one row is much longer than the
others (a tenant's 4,096-position prefix, a long chat) the group is cut into at most three length buckets
(`length_buckets`: rows sorted by key slots, the cuts that least padded work plus a fixed cost per bucket), each
gathered, masked and attended on its own and the outputs put back in row order; equal-length rows stay one group.
Steps replayed as CUDA graphs (and their eager stand-in, `graphs="eager"`) keep one group at their bucket's shape.
With `kernels="triton"` (CUDA) both groups instead go through Triton paged kernels that read the block tables directly
(no gathered keys, no mask, no padding), and Llama's norms, rotary + KV write and activation are fused kernels
(triton_kernels.py).
All index tensors are built on the host in `prepare` and reach the device through pinned memory, so the forward never
syncs with the device and the host can prepare a step while the previous one runs.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from server.engine import triton_ops
from server.engine.kv_cache import KVPool, upload_ints
from server.model.spec import ModelBundle

_BIG = 1 << 30

log = logging.getLogger("prefixserve.engine")


@dataclass
class RowInput:
    """One row of a step: `tokens` fed at logical positions `start..start+len-1` (prefix offset included)."""

    tokens: list[int]
    start_pos: int  # logical position of tokens[0] (prefix length + own tokens already cached)
    prefix_len: int
    prefix_blocks: list[int]
    own_blocks: list[int]
    own_cached: int  # own tokens already in the cache before this step
    sample: bool  # whether the last token's logits are needed
    all_logits: bool = False  # logits of every token of the row (prompt logprobs), in order
    # a decoding row's last token and drafts (all_logits too): on the CPU each attends as a decode row
    verify: bool = False


@dataclass
class _Group:
    """Rows attended together: `g` rows of `q` query slots over `s` gathered key slots each."""

    g: int
    q: int
    s: int
    gather: torch.Tensor | None  # [g * s] pool slot of each key (slots past the row's keys -> the zero slot)
    mask: torch.Tensor | None  # [g, 1, q, s] additive float mask (0 attend, -inf not)
    # paged decode (Triton kernel) instead of gather + mask: block tables [g, W] and, per row, prefix length, prefix
    # slots and key slots to read ([3, g]); padding rows read the scratch block's first slot
    tables: torch.Tensor | None = None
    meta: torch.Tensor | None = None
    # [g * q] flat token of each query slot (padding -> 0): prefill groups, and the parts of a split decode group
    tok_idx: torch.Tensor | None = None
    # [n] query slot of each flat token of the group, in order: prefill (padded slots), split groups (the parts'
    # outputs concatenated)
    out_idx: torch.Tensor | None = None
    # length buckets: the group's rows attended as sub-groups, each padded to its own longest row
    # (`length_buckets`); the group itself then has no gathered keys or mask of its own
    parts: list[_Group] | None = None


@dataclass
class StepInputs:
    """A step's tensors. Flat token order: every decode row's token first, then the prefill rows' tokens."""

    input_ids: torch.Tensor  # [N]
    positions: torch.Tensor  # [N]
    write_slots: torch.Tensor  # [N]
    sample_idx: torch.Tensor  # flat index of the tokens whose logits are needed, in row order
    decode: _Group | None  # one query token per row: rows 0..g-1 of the flat order
    prefill: _Group | None  # padded multi-token rows
    num_tokens: int  # flat tokens, padding rows included
    num_rows: int = 0  # rows of the step (sampled logits returned)
    graph_key: tuple[int, int] | None = None  # (batch, key slots) bucket: a padded decode step for a graph


class _Linear:
    """`y = x @ W.T + b`; on CPU optionally through oneDNN with the weight reordered once (prepacked).

    MKL's sgemm repacks the weight on every call, which dominates decode-sized GEMMs (few rows, weights not cache
    resident): measured on a 2-core AVX2 EPYC, one SmolLM2 decode step's GEMMs at 8 rows took 113 ms through
    `F.linear` and 81 ms prepacked (benchmarks/results/cpu-profile-2026-11-23.md). The packed copy costs the
    weight's bytes once more; the transformers module keeps the original (training and prefix compilation use it).
    """

    __slots__ = ("b", "packed", "w")

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None, pack: bool) -> None:
        self.w = w
        self.b = b
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), 8) if pack else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            m = x.shape[0]
            rows = _row_bucket(m)
            if rows != m:  # oneDNN keeps a primitive per input shape: a few shapes, not one per token count
                x = F.pad(x, (0, 0, 0, rows - m))
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.b, "none", [], "")
            return y[:m] if rows != m else y
        return F.linear(x, self.w, self.b)


def _row_bucket(m: int) -> int:
    """Rows a prepacked linear runs with: at least 2, m itself up to 4, then multiples of 8 up to 64, then of 64.

    At least 2: oneDNN computes a lone row with other kernels than a row among several (SmolLM2's 1536 -> 576 down
    projection: 3.7e-6 apart), and at every other row count gives each row the same bits. So a request's logits are
    the same whatever shares its step (a seeded draw, a near-tie: the same token alone, in a batch, or after a
    prompt-cache hit left one token to compute), at the cost of one padding row when a request decodes alone.

    oneDNN (through ideep) caches a primitive, with its buffers, per input shape; with one shape per step's token
    count the cache grew the server's RSS by ~200 MB over a few thousand mixed requests (up to its 1,024 entries).
    With these buckets a model has a few hundred shapes at most, for at most 1/8 (decode) or 64 rows (prefill) of
    padding, which small-M GEMMs barely notice (they are bound by reading the weights)."""
    if m <= 4:
        return max(m, 2)
    step = 8 if m <= 64 else 64
    return -(-m // step) * step


KEY_CHUNK = 64


def _chunked_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Decode rows' attention on the CPU, each row the same bits whatever shares its call: q `[g, K, r, D]` over
    keys/values `[g, K, S, D]` (views welcome) with an additive mask `[g, 1, 1 or r, S]`.

    The CPU's SDPA kernel shares its work among the threads by the call's batch: with 2+ threads a row's bits moved
    with the number of rows beside it. Plain matmuls did too, by the key count a longer row pads a row to (MKL
    picks kernels by shape: a small product, 4+ query heads a KV head at 192-368 keys) and for one query row a head.
    So every GEMM here has one shape whatever the call: the keys in chunks of KEY_CHUNK slots (padding chunks are
    masked and add exact zeros), one query row a head padded to two; the softmax's max is exact in any order, and the
    chunks' sums are added in chunk order."""
    g, kh, r, d = q.shape
    rows = r
    if r == 1:
        q, r = q.expand(g, kh, 2, d), 2
    s = keys.shape[2]
    pad = -s % KEY_CHUNK
    if pad:
        keys, values = F.pad(keys, (0, 0, 0, pad)), F.pad(values, (0, 0, 0, pad))
        mask = F.pad(mask, (0, pad), value=float("-inf"))
    else:  # one memory layout, whatever view came in: MKL's batched GEMM picks its path by the operands' strides
        keys, values = keys.contiguous(), values.contiguous()
    n = (s + pad) // KEY_CHUNK
    kc = keys.reshape(g, kh, n, KEY_CHUNK, d)
    vc = values.reshape(g, kh, n, KEY_CHUNK, d)
    scores = torch.matmul(q.unsqueeze(2), kc.transpose(-1, -2)) * scale  # [g, K, n, r, C]
    mr = mask.shape[2]
    scores = scores + mask.reshape(g, 1, mr, n, KEY_CHUNK).transpose(2, 3)
    top = scores.amax(dim=(2, 4), keepdim=True)
    p = torch.exp(scores - top)
    # the chunks added one after another (a sum's order moved with the chunk count; cumsum is sequential, in double
    # on the CPU): trailing padding chunks add exact zeros
    total = p.sum(-1).cumsum(2)[:, :, -1]  # [g, K, r]
    out = torch.matmul(p, vc).cumsum(2)[:, :, -1] / total.unsqueeze(-1)  # [g, K, r, D]
    return out[:, :, :rows]


def length_buckets(sizes: list[tuple[int, int]], max_parts: int, part_cost: int) -> list[list[int]] | None:
    """Length buckets for rows of (query tokens, key slots): the row indices sorted by key slots and cut into at
    most `max_parts` runs so that the padded attention work, the sum over runs of rows x their most query tokens x
    their most key slots, plus `part_cost` per run past the first, is least among such cuts of the key-slot order;
    None where one group is best. Only key lengths are sorted and cut: prefill rows of a similar key length but very
    different query lengths (a 512-token chunk beside a 3-token one) stay in one run, padded to the longer chunk.

    The gathered attention's cost grows with that padded work: with one row's 4,096-slot prefix beside three
    short rows, one group gathers (and masks) 4 x 4,096 key slots a layer, the buckets 4,096 + 3 x ~64. Rows of
    a similar length (at most a quarter apart: grouped before cutting, which bounds the search to a few dozen
    candidate cuts) are never cut apart, and a step whose padding could not pay for one more part is not searched
    at all (equal rows cost one pass over them)."""
    n = len(sizes)
    if n < 2:
        return None
    q_all = max(q for q, _ in sizes)
    s_all = max(s for _, s in sizes)
    waste = n * q_all * s_all - sum(q * s for q, s in sizes)
    if waste <= part_cost:
        return None
    order = sorted(range(n), key=lambda i: sizes[i][1])
    # units: runs of rows with at most a quarter more key slots than the run's first, kept together
    unit_rows: list[list[int]] = []
    unit_q: list[int] = []
    unit_s: list[int] = []
    first = -1
    for i in order:
        q, s = sizes[i]
        if first < 0 or 4 * s > 5 * first:
            unit_rows.append([])
            unit_q.append(0)
            unit_s.append(0)
            first = s
        unit_rows[-1].append(i)
        unit_q[-1] = max(unit_q[-1], q)
        unit_s[-1] = max(unit_s[-1], s)
    m = len(unit_rows)
    if m < 2:
        return None
    count = [0]
    for rows in unit_rows:
        count.append(count[-1] + len(rows))
    # cost[i][j]: units i..j-1 as one run
    cost = [[0] * (m + 1) for _ in range(m + 1)]
    for i in range(m):
        qm = 0
        for j in range(i + 1, m + 1):
            qm = max(qm, unit_q[j - 1])
            cost[i][j] = (count[j] - count[i]) * qm * unit_s[j - 1]
    # best[j], cut[k][j]: the cheapest way to cover units 0..j-1 with k + 1 runs, and where its last run starts
    best = cost[0][:]
    cuts_at: list[list[int]] = [[0] * (m + 1)]
    total, parts = best[m], 1
    for k in range(1, min(max_parts, m)):
        nxt = [_BIG * _BIG] * (m + 1)
        at = [0] * (m + 1)
        for j in range(k + 1, m + 1):
            for i in range(k, j):
                c = best[i] + cost[i][j]
                if c < nxt[j]:
                    nxt[j], at[j] = c, i
        best = nxt
        cuts_at.append(at)
        if best[m] + k * part_cost < total:
            total, parts = best[m] + k * part_cost, k + 1
    if parts == 1:
        return None
    bounds = [m]
    for k in range(parts - 1, 0, -1):
        bounds.append(cuts_at[k][bounds[-1]])
    bounds.append(0)
    bounds.reverse()
    return [[i for u in range(a, b) for i in unit_rows[u]] for a, b in itertools.pairwise(bounds)]


def cpu_packing_available(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN prepacked linears: CPU, a torch built with oneDNN, the private ops present, and float32 or bfloat16 on
    a CPU with native bf16 instructions (AVX512-BF16 / AMX; elsewhere bf16 GEMMs are emulated and slower)."""
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        w = torch.ones(4, 4, dtype=dtype)
        p = torch.ops.mkldnn._reorder_linear_weight(w, 8)
        y = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 4, dtype=dtype), p, None, "none", [], "")
    except (AttributeError, RuntimeError):
        return False
    return bool(torch.equal(y.float(), torch.full((2, 4), 4.0)))


def _fuse(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the weights of `linears` once and re-point each module at a view (no extra memory)."""
    w = torch.cat([m.weight.detach() for m in linears], dim=0).contiguous()
    has_bias = all(m.bias is not None for m in linears)
    b = torch.cat([m.bias.detach() for m in linears], dim=0).contiguous() if has_bias else None
    o = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight = nn.Parameter(w[o : o + n], requires_grad=False)
        if b is not None:  # (has_bias)
            m.bias = nn.Parameter(b[o : o + n], requires_grad=False)
        o += n
    return w, b


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class ModelRunner:
    # length buckets (`length_buckets`): at most this many sub-groups per eager attention group (1: never split)
    max_parts = 3
    # a bucket is worth its fixed cost where it saves gathering (and attending over) this many bytes of keys and
    # values a layer. CPU: in a 1-thread microbenchmark of SmolLM2's shapes (2-core EPYC) a short rows' SDPA call
    # with its gathers took ~30-40 us, one row's 4,128 fp32 key slots (1.5 KB each) ~0.9 ms, ~0.2 us a slot: 1 MiB
    # (~680 slots, ~140 us) is ~4x a part's cost. CUDA: a part's ~5 kernel launches against HBM bandwidth
    PART_BYTES: ClassVar[dict[str, int]] = {"cpu": 1 << 20, "cuda": 64 << 20}

    def __init__(
        self,
        bundle: ModelBundle,
        pool: KVPool,
        max_model_len: int,
        packed_weights: bool | None = None,
        graphs: str = "auto",
        max_graph_batch: int = 64,
        kernels: str = "auto",
    ) -> None:
        """`packed_weights`: oneDNN-prepacked linears on CPU (None: whenever available, see `_Linear`).

        `graphs`: decode steps as CUDA graphs at bucketed (batch, key slots) shapes: "auto" (on CUDA), "cuda",
        "off", or "eager" (the same padded static-buffer path run without capture: tests it on any device).

        `kernels`: "triton" runs decode attention as a paged kernel reading the block tables (no gathered keys, no
        mask) and, for Llama-family models, fuses RMSNorm (+ residual), rotary + KV write and SiLU-and-mul into one
        kernel each (server/engine/triton_kernels.py); "torch" uses torch ops only; "auto" picks "triton" on CUDA
        when triton is installed and the model's shape suits the kernels. On a CPU "triton" needs Triton's
        interpreter (`TRITON_INTERPRET=1`): for tests, not speed.
        """
        self.bundle = bundle
        self.spec = bundle.spec
        self.pool = pool
        self.device = bundle.device
        self.dtype = bundle.dtype
        self.max_model_len = max_model_len
        self.family = self.spec.family
        # set at the end; the hf path's start-up probe runs before them, without graphs
        self.graph_mode: str = "off"
        self.graphs: _DecodeGraphs | None = None
        self.kernels = "torch"
        self.paged_prefill = (
            False  # multi-token rows through the Triton prefill kernel (with kernels="triton")
        )
        self.fused = False
        # the CUDA device's index (None on other devices): kernels launch on the calling thread's current device
        self.cuda_index: int | None = None
        if self.device.type == "cuda":
            self.cuda_index = (
                self.device.index if self.device.index is not None else torch.cuda.current_device()
            )
        avail = cpu_packing_available(self.device, self.dtype) and self.family != "hf"
        if packed_weights and not avail:
            raise ValueError(
                "packed_weights needs a CPU model in float32 (or bfloat16 on a CPU with native bf16), a native family "
                "and oneDNN"
            )
        self.packed = avail if packed_weights is None else bool(packed_weights)
        # before the family's set-up: the hf path's start-up probe runs through the chosen attention
        self._init_kernels(kernels)
        # what one more length bucket costs (its attention call, its mask, its rows' queries and outputs gathered),
        # in query x key slots of attention work: the slots whose keys and values fill PART_BYTES[device type]
        sp = self.spec
        slot_bytes = 2 * sp.num_kv_heads * sp.head_dim * torch.finfo(self.dtype).bits // 8
        self.part_cost = max(self.PART_BYTES.get(self.device.type, self.PART_BYTES["cuda"]) // slot_bytes, 1)
        m = bundle.hf_model
        cfg = m.config
        if self.family == "llama":
            self._init_llama(m, cfg)
        elif self.family == "gpt2":
            self._init_gpt2(m, cfg)
        elif self.family == "hf":
            self._init_hf(m)
        else:  # pragma: no cover - spec_from_config already refuses
            raise ValueError(self.family)
        # fused elementwise kernels: the native Llama path without per-head query/key norms (Qwen3)
        self.fused = (
            self.kernels == "triton"
            and self.family == "llama"
            and all(L["q_norm"] is None for L in self.layers)
        )
        if graphs == "auto":
            graphs = "cuda" if self.device.type == "cuda" and self.family != "hf" else "off"
        if graphs not in ("cuda", "eager", "off"):
            raise ValueError(f"graphs must be auto, cuda, eager or off, not {graphs!r}")
        if graphs == "cuda" and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.graph_mode = graphs
        self.graphs = _DecodeGraphs(self, max_graph_batch) if graphs != "off" else None

    def _init_kernels(self, kernels: str) -> None:
        if kernels not in ("auto", "triton", "torch"):
            raise ValueError(f"kernels must be auto, triton or torch, not {kernels!r}")
        sp = self.spec
        if kernels == "auto":
            if self.device.type != "cuda" or not triton_ops.available(self.device):
                return
            why = triton_ops.unsupported_reason(sp.num_heads, sp.num_kv_heads, sp.head_dim)
            why = why or triton_ops.device_reason(self.device)
            if why is None:
                try:
                    triton_ops.smoke_test(self.device, self.dtype, sp.num_heads, sp.num_kv_heads, sp.head_dim)
                except Exception as e:  # no C compiler for Triton's launcher, a GPU it cannot target, ...
                    why = f"{type(e).__name__}: {e}"
            if why is not None:
                log.warning("Triton kernels off (%s): attention and elementwise ops run on torch ops", why)
                return
            kernels = "triton"
        elif kernels == "triton":
            if not triton_ops.available(self.device):
                raise ValueError(
                    "kernels='triton' needs triton and a CUDA device (or TRITON_INTERPRET=1 on a CPU, for tests)"
                )
            why = triton_ops.unsupported_reason(sp.num_heads, sp.num_kv_heads, sp.head_dim)
            why = why or triton_ops.device_reason(self.device)
            if why is not None:
                raise ValueError(f"kernels='triton' cannot serve this model here: {why}")
            triton_ops.smoke_test(self.device, self.dtype, sp.num_heads, sp.num_kv_heads, sp.head_dim)
        self.kernels = kernels
        if kernels == "triton":
            try:
                triton_ops.smoke_test_prefill(
                    self.device, self.dtype, sp.num_heads, sp.num_kv_heads, sp.head_dim
                )
                self.paged_prefill = True
            except Exception as e:
                log.warning(
                    "Triton prefill kernel off (%s: %s): multi-token rows attend through torch ops",
                    type(e).__name__,
                    e,
                )

    def _lin(self, w: torch.Tensor, b: torch.Tensor | None = None) -> _Linear:
        return _Linear(w, b, self.packed)

    # ------------------------------------------------------------------ weights
    def _init_llama(self, m, cfg) -> None:
        base = m.model
        self.embed = base.embed_tokens.weight
        self.eps = cfg.rms_norm_eps
        # each layer's weights and linears by name (the families' forwards read their own)
        self.layers: list[dict[str, Any]] = []
        for layer in base.layers:
            a, mlp = layer.self_attn, layer.mlp
            qkv_w, qkv_b = _fuse([a.q_proj, a.k_proj, a.v_proj])
            gu_w, gu_b = _fuse([mlp.gate_proj, mlp.up_proj])  # biases: Llama's `mlp_bias`
            self.layers.append(
                dict(
                    ln1=layer.input_layernorm.weight,
                    # Qwen3: RMSNorm over each head's query/key before RoPE (None elsewhere)
                    q_norm=a.q_norm.weight if getattr(a, "q_norm", None) is not None else None,
                    k_norm=a.k_norm.weight if getattr(a, "k_norm", None) is not None else None,
                    qkv=self._lin(qkv_w, qkv_b),
                    o=self._lin(a.o_proj.weight, a.o_proj.bias),
                    ln2=layer.post_attention_layernorm.weight,
                    gu=self._lin(gu_w, gu_b),
                    down=self._lin(mlp.down_proj.weight, mlp.down_proj.bias),
                )
            )
        self.norm = base.norm.weight
        self.lm_head = self._lin(m.lm_head.weight)
        # cos/sin tables from the model's own rotary module (covers rope scaling variants), computed in fp32.
        n = min(self.max_model_len, self.spec.max_positions)
        pos = torch.arange(n, device=self.device)[None]
        probe = torch.zeros(1, dtype=torch.float32, device=self.device)
        with torch.no_grad():
            cos, sin = base.rotary_emb(probe, pos)
        self.cos = cos[0].to(self.dtype)
        self.sin = sin[0].to(self.dtype)

    def _init_gpt2(self, m, cfg) -> None:
        from transformers.activations import ACT2FN

        t = m.transformer  # (variants this forward does not compute are the generic path's: `spec._native`)
        self.scale = (1.0 / self.spec.head_dim**0.5) if getattr(cfg, "scale_attn_weights", True) else 1.0
        self.wte = t.wte.weight
        self.wpe = t.wpe.weight
        self.eps = cfg.layer_norm_epsilon
        self.act = ACT2FN[cfg.activation_function]
        # Conv1D keeps weights as [in, out]: F.linear takes the transposed view without a copy.
        self.layers = [
            dict(
                ln1=(b.ln_1.weight, b.ln_1.bias),
                qkv=self._lin(b.attn.c_attn.weight.t(), b.attn.c_attn.bias),
                o=self._lin(b.attn.c_proj.weight.t(), b.attn.c_proj.bias),
                ln2=(b.ln_2.weight, b.ln_2.bias),
                fc=self._lin(b.mlp.c_fc.weight.t(), b.mlp.c_fc.bias),
                fc2=self._lin(b.mlp.c_proj.weight.t(), b.mlp.c_proj.bias),
            )
            for b in t.h
        ]
        self.ln_f = (t.ln_f.weight, t.ln_f.bias)
        self.lm_head = self._lin(m.lm_head.weight)

    def _init_hf(self, m) -> None:
        """Any other decoder-only model: transformers' modeling code with the engine's paged attention plugged in
        (server/engine/hf_attention.py), checked against the model's own forward before serving."""
        from server.engine import hf_attention

        if not getattr(m, "_supports_attention_backend", False):
            raise ValueError(
                f"{type(m).__name__} does not route attention through transformers' AttentionInterface; "
                "it cannot be served"
            )
        hf_attention.register()
        loaded = m.config._attn_implementation or "sdpa"
        if loaded != hf_attention.NAME:  # (a second engine on the same model keeps the first one's record)
            setattr(m.config, hf_attention.FALLBACK, loaded)
        # other threads, and this one outside a step, still get the attention it was loaded with (see hf_attention)
        m.config._attn_implementation = hf_attention.NAME
        try:
            self._probe_hf()
        except Exception as e:
            m.config._attn_implementation = getattr(m.config, hf_attention.FALLBACK, "sdpa")
            if isinstance(e, ValueError) and str(e).startswith(type(m).__name__):
                raise
            why = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
            raise ValueError(
                f"{type(m).__name__} cannot be served through the engine's attention path: {why}"
            ) from e

    @torch.inference_mode()
    def _probe_hf(self) -> None:
        """A prefix, a 5-token prompt and one decode step through the engine's path must give the logits of the
        model's own forward fed the prefix as past_key_values; otherwise the model is refused."""
        from server.prefixes.kinds import kv_to_past_key_values

        sp, pool = self.spec, self.pool
        g = torch.Generator().manual_seed(0)
        p, prompt, nxt = 3, [1, 2, 3, 4, 5], 6
        n = len(prompt)
        kv = torch.randn(sp.kv_shape(p), generator=g)
        pre = pool.allocate(pool.blocks_for(p))
        own = pool.allocate(pool.blocks_for(n + 1))
        try:
            pool.write_prefix(pre, kv)
            first = self.forward(self.prepare([RowInput(prompt, p, p, pre, own, 0, True)]))[0]
            second = self.forward(self.prepare([RowInput([nxt], p + n, p, pre, own, n, True)]))[0]
        finally:
            pool.free(pre)
            pool.free(own)
        dev = self.device
        cache = kv_to_past_key_values(kv, dtype=self.dtype, device=dev)
        ids = torch.tensor([[*prompt, nxt]], device=dev)
        ref = (
            self.bundle.hf_model(
                input_ids=ids,
                past_key_values=cache,
                attention_mask=torch.ones(1, p + n + 1, dtype=torch.long, device=dev),
                position_ids=torch.arange(p, p + n + 1, device=dev)[None],
                use_cache=True,
            )
            .logits[0, -2:]
            .float()
        )
        scale = ref.abs().max().clamp_min(1.0)
        tol = 1e-3 if self.dtype == torch.float32 else 5e-2
        err = max((first - ref[0]).abs().max(), (second - ref[1]).abs().max()) / scale
        if not err <= tol:
            raise ValueError(
                f"{type(self.bundle.hf_model).__name__}: the engine's attention path does not reproduce the model's own "
                f"forward (relative logit error {float(err):.2e}); this model family cannot be served"
            )

    # ------------------------------------------------------------------ inputs
    def prepare(self, rows: list[RowInput]) -> StepInputs:
        """Host-side step tensors: everything the forward needs, so it never syncs with the device.

        A decode-only step that fits a graph bucket is padded to the bucket's batch and key-slot sizes: padding
        rows read token 0 at position 0, write the scratch slot and attend only to it; their logits are dropped.
        """
        bs = self.pool.block_size
        decode = [r for r in rows if len(r.tokens) == 1]
        prefill = [r for r in rows if len(r.tokens) > 1]
        # each token of a verify row (a greedy decoding row + its drafts) attends as a decode row of its own on the
        # CPU, so that its logits are the bits a plain decode step gives that position (a multi-token call's differ
        # by ~1e-5): drafting, which depends on the rest of the batch, then never changes a greedy row's tokens.
        # It costs: each query reads the row's keys (a multi-token call reads them once), ~10% of a batch's
        # drafting speed-up
        units: dict[int, list[RowInput]] = {}
        if self.device.type == "cpu":
            for r in prefill:
                if r.verify:
                    units[id(r)] = [
                        RowInput(
                            [t],
                            r.start_pos + j,
                            r.prefix_len,
                            r.prefix_blocks,
                            r.own_blocks,
                            r.own_cached + j,
                            r.sample,
                        )
                        for j, t in enumerate(r.tokens)
                    ]
            if units:
                decode += [u for r in prefill if id(r) in units for u in units[id(r)]]
                prefill = [r for r in prefill if id(r) not in units]
        key = None
        # graphs return one logit row per batch row: only for steps where every row samples its one token (a
        # 1-token prefill chunk that is not the prompt's last token samples nothing)
        if (
            self.graphs is not None
            and not prefill
            and not units
            and all(r.sample and not r.all_logits for r in decode)
        ):
            slots = max(len(r.prefix_blocks) + len(r.own_blocks) for r in decode) * bs
            key = self.graphs.bucket(len(decode), slots)
        ids: list[int] = []
        positions: list[int] = []
        write_slots: list[int] = []
        flat_start: dict[int, int] = {}
        for r in decode + prefill:
            flat_start[id(r)] = len(ids)
            n = len(r.tokens)
            ids.extend(r.tokens)
            positions.extend(range(r.start_pos, r.start_pos + n))
            for j in range(r.own_cached, r.own_cached + n):
                write_slots.append(r.own_blocks[j // bs] * bs + j % bs)
        for rid, us in units.items():  # a verify row's tokens: its units', one after another
            flat_start[rid] = flat_start[id(us[0])]
        sample_idx: list[int] = []
        for r in rows:
            end = flat_start[id(r)] + len(r.tokens)
            if r.all_logits:
                sample_idx.extend(range(flat_start[id(r)], end))
            elif r.sample:
                sample_idx.append(end - 1)
        n_dec = len(decode)
        if key is not None:
            pad = key[0] - len(ids)
            ids.extend([0] * pad)
            positions.extend([0] * pad)
            write_slots.extend([self.pool.scratch_slot] * pad)
            n_dec = key[0]
        # one host-to-device copy for the step's integer inputs (and, for the paged kernels, their tables)
        parts = [ids, positions, write_slots, sample_idx]
        paged = self.kernels == "triton"
        if paged and decode:
            parts.extend(self._paged_tables(decode, n_dec))
        paged_pre = paged and self.paged_prefill and bool(prefill)
        if paged_pre:
            parts.extend(self._prefill_tables(prefill))
        views = self._upload_parts(parts)
        dec: _Group | None = None
        pre: _Group | None = None
        if paged and decode:
            dec = self._paged_group(views[4], views[5], n_dec, 1)
        elif decode and key is not None:
            # a graph's padded step: one group at the bucket's shape (its buffers)
            dec = self._group(decode, n_dec, None, key[1])
        elif decode:
            dec = self._split_group(decode, flat_start)
        if paged_pre:
            pre = self._paged_group(views[-2], views[-1], len(prefill), max(len(r.tokens) for r in prefill))
        elif prefill:
            pre = self._split_group(prefill, flat_start)
        return StepInputs(
            input_ids=views[0],
            positions=views[1],
            write_slots=views[2],
            sample_idx=views[3],
            decode=dec,
            prefill=pre,
            num_tokens=len(ids),
            num_rows=len(rows),
            graph_key=key,
        )

    def _paged_group(self, meta: torch.Tensor, tables: torch.Tensor, g: int, q: int) -> _Group:
        """A group for the paged kernels from its uploaded views: `g` rows of at most `q` query tokens, their block
        tables (flat, row-major) and per-row numbers (flat, one line of `g` per kind)."""
        w = tables.shape[0] // g
        return _Group(
            g=g,
            q=q,
            s=w * self.pool.block_size,
            gather=None,
            mask=None,
            tables=tables.view(g, w),
            meta=meta.view(-1, g),
        )

    def upload(self, values: list[int]) -> torch.Tensor:
        """Host integers on the runner's device without a host sync (`kv_cache.upload_ints`)."""
        return upload_ints(values, self.device)

    def _upload_parts(self, parts: list[list[int]]) -> list[torch.Tensor]:
        """Int64 lists on the device in one copy, as views. Each part starts at an even element (16 bytes): Triton
        specializes a kernel on its pointers' alignment, and a part's alignment must not change from step to step."""
        flat: list[int] = []
        starts = []
        for p in parts:
            starts.append(len(flat))
            flat += p
            if len(flat) % 2:
                flat.append(0)
        dev = self.upload(flat)
        return [dev[o : o + len(p)] for o, p in zip(starts, parts, strict=True)]

    def _flat_tables(self, members: list[RowInput], g: int, width: int) -> list[int]:
        """The rows' block tables (prefix blocks, then own blocks) cut or padded to `width` blocks, padded to `g`
        rows, row-major; padding names the scratch block."""
        scratch = self.pool.num_blocks
        tables: list[int] = []
        for r in members:
            tables += (r.prefix_blocks + r.own_blocks + [scratch] * width)[:width]
        tables += [scratch] * (width * (g - len(members)))
        return tables

    def _paged_tables(self, members: list[RowInput], g: int) -> tuple[list[int], list[int]]:
        """Decode rows for the paged kernel, padded to `g` rows: their block tables `[g, W]` (row-major; padding
        rows and slots name the scratch block) and three numbers per row `[3, g]`: prefix length, prefix slots and
        key slots to read (padding rows read the scratch block's first slot). Returned as (meta, tables)."""
        bs = self.pool.block_size
        tables = self._flat_tables(members, g, max(len(r.prefix_blocks) + len(r.own_blocks) for r in members))
        pad = g - len(members)
        p_slots = [len(r.prefix_blocks) * bs for r in members]
        meta = [r.prefix_len for r in members] + [0] * pad
        meta += p_slots + [0] * pad
        meta += [ps + r.own_cached + 1 for ps, r in zip(p_slots, members, strict=True)] + [1] * pad
        return meta, tables

    def _prefill_tables(self, members: list[RowInput]) -> tuple[list[int], list[int]]:
        """Multi-token rows for the paged prefill kernel, which is handed their part of the flat tokens (one row
        after another, after the decode rows'): five numbers per row `[5, g]` (its first token in that part, query
        tokens, prefix length, prefix slots, own keys cached before the step) and their block tables `[g, W]`."""
        bs = self.pool.block_size
        starts = []
        t = 0
        for r in members:
            starts.append(t)
            t += len(r.tokens)
        meta = starts + [len(r.tokens) for r in members]
        meta += [r.prefix_len for r in members]
        meta += [len(r.prefix_blocks) * bs for r in members]
        meta += [r.own_cached for r in members]
        width = max(len(r.prefix_blocks) + len(r.own_blocks) for r in members)
        return meta, self._flat_tables(members, len(members), width)

    def _split_group(self, members: list[RowInput], flat_start: dict[int, int]) -> _Group:
        """The eager gathered-attention group of `members` (all decode rows, or all multi-token rows), cut into
        length buckets where one long row would pad every other row's keys (and mask) to its length."""
        starts = [flat_start[id(r)] for r in members]
        q_max = max(len(r.tokens) for r in members)
        cuts = self._cuts(members)
        if cuts is None:
            return self._group(members, len(members), starts if q_max > 1 else None)
        return self._parts(members, starts, cuts)

    def _cuts(self, members: list[RowInput]) -> list[list[int]] | None:
        """How `_split_group` cuts `members` into parts (indices into it; None: one group)."""
        bs = self.pool.block_size
        sizes = [(len(r.tokens), (len(r.prefix_blocks) + len(r.own_blocks)) * bs) for r in members]
        if max(q for q, _ in sizes) > 1 and self.device.type == "cpu":
            # multi-token rows attend one row a call: the CPU's SDPA blocks a call's queries by their count (GQA
            # folds the heads into that axis too) and shares its work among the threads by the call's batch, so a
            # row padded to a longer row's chunk (~3e-6 in the logits), or beside rows of its own length with 2+
            # threads, got other bits than alone. The calls cost a few ms a step.
            return [[i] for i in range(len(sizes))] if len(sizes) > 1 else None
        return length_buckets(sizes, self.max_parts, self.part_cost)

    def _parts(self, members: list[RowInput], starts: list[int], cuts: list[list[int]]) -> _Group:
        """`members` attended as the parts `cuts`, their outputs put back in the members' order."""
        parts = [self._group([members[i] for i in c], len(c), [starts[i] for i in c]) for c in cuts]
        # where each flat token of the group lands in the parts' padded outputs, concatenated
        where: dict[int, int] = {}
        o = 0
        for c, p in zip(cuts, parts, strict=True):
            for k, i in enumerate(c):
                where[i] = o + k * p.q
            o += p.g * p.q
        out_idx = [where[i] + j for i, r in enumerate(members) for j in range(len(r.tokens))]
        return _Group(
            g=len(members),
            q=max(len(r.tokens) for r in members),
            s=max(p.s for p in parts),
            gather=None,
            mask=None,
            out_idx=self._upload_parts([out_idx])[0],
            parts=parts,
        )

    def _group(
        self, members: list[RowInput], g: int, starts: list[int] | None, slots: int | None = None
    ) -> _Group:
        """Key slots and masks for `members` padded to `g` rows (padding rows see only the scratch slot) and, if
        given, to `slots` key slots per row (padding slots point at the scratch block, masked). `starts`: each
        member's first flat token (prefill groups and the parts of a split group: the group gathers its queries);
        without it the members are the step's first `g` flat tokens.

        The host uploads a few numbers per row (block tables, lengths, positions); the gathered slot indices and
        the additive mask, `g x q x s` values, are built where they are used, on the device."""
        bs = self.pool.block_size
        q_max = max(len(r.tokens) for r in members)
        nb_max = max(len(r.prefix_blocks) + len(r.own_blocks) for r in members)
        if slots is not None:
            nb_max = slots // bs
        # per-row facts as plain lists, turned into tensors once (a per-row torch op costs more than the row)
        pad = g - len(members)
        tables = self._flat_tables(members, g, nb_max)
        q_lens = [len(r.tokens) for r in members] + [0] * pad
        info = q_lens + [r.start_pos for r in members] + [0] * pad
        info += [r.prefix_len for r in members] + [0] * pad
        info += [len(r.prefix_blocks) * bs for r in members] + [0] * pad
        # a padding row attends to its first (scratch) slot
        info += [r.own_cached + len(r.tokens) for r in members] + [1] * pad
        prefill = q_max > 1
        gathers = starts is not None
        info += (starts or [0] * len(members)) + [0] * pad
        parts = [tables, info]
        if prefill:  # flat query slot of each real token, in order (host lists: no device sync)
            parts.append([i * q_max + j for i, n in enumerate(q_lens) for j in range(n)])
        views = self._upload_parts(parts)
        dev = self.device
        q_len, start_pos, prefix_len, prefix_slots, own_valid, flat = views[1].view(6, g)
        qj = torch.arange(q_max, device=dev)[None]
        valid_q = qj < q_len[:, None]
        q_pos = torch.where(valid_q, start_pos[:, None] + qj, _BIG - 1)
        tok_idx = torch.where(valid_q, flat[:, None] + qj, 0)
        s = nb_max * bs
        j = torch.arange(s, device=dev)[None]
        gather = (
            views[0].view(g, nb_max)[:, :, None] * bs + torch.arange(bs, device=dev)[None, None]
        ).reshape(g * s)
        in_prefix = j < prefix_slots[:, None]
        own_j = j - prefix_slots[:, None]
        valid = torch.where(in_prefix, j < prefix_len[:, None], own_j < own_valid[:, None])
        # slots past a row's keys (the tail of a prefix's or its own last block, padding) read the pool's zero slot,
        # not what they hold: stale NaN there would survive the -inf mask (NaN score, 0 x NaN value)
        gather = torch.where(valid.reshape(g * s), gather, self.pool.zero_slot)
        k_pos = torch.where(in_prefix, j, prefix_len[:, None] + own_j)
        k_pos = torch.where(valid, k_pos, torch.full_like(k_pos, _BIG))
        allowed = (k_pos[:, None, :] <= q_pos[:, :, None])[:, None]  # [g, 1, q, s]
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=dev).masked_fill_(~allowed, float("-inf"))
        rep = self.spec.num_heads // self.spec.num_kv_heads
        if prefill and rep > 1:  # query heads of a KV head are folded into the query axis (see `_attend`)
            mask = mask.repeat(1, 1, rep, 1)
        return _Group(
            g=g,
            q=q_max,
            s=s,
            gather=gather,
            mask=mask,
            tok_idx=tok_idx.reshape(-1) if gathers else None,
            out_idx=views[2] if prefill else None,
        )

    # ------------------------------------------------------------------ forward
    def _attend(self, kv: torch.Tensor, q: torch.Tensor, grp: _Group, scale: float | None) -> torch.Tensor:
        """q: [g, Hq, Q, D] -> [g, Hq, Q, D] over the group's gathered key slots.

        Grouped-query attention without repeating K/V: the Hq/K query heads that share a KV head (transformers'
        `repeat_kv` order) are folded into the query axis, `[g, K, rep*Q, D]`, against `[g, K, S, D]` keys; the
        mask was repeated to match in `_group`. A plain SDPA call then serves every backend (no `enable_gqa`).
        """
        g, hq, nq, d = q.shape
        k_heads = kv.shape[2]
        assert grp.gather is not None and grp.mask is not None
        kvg = kv.index_select(1, grp.gather).view(2, grp.g, grp.s, k_heads, d).transpose(2, 3)  # [2,g,K,S,D]
        qf = q.reshape(g, k_heads, hq // k_heads * nq, d)
        if nq == 1 and self.device.type == "cpu":
            o = _chunked_attention(qf, kvg[0], kvg[1], grp.mask, d**-0.5 if scale is None else scale)
        else:
            o = F.scaled_dot_product_attention(qf, kvg[0], kvg[1], attn_mask=grp.mask, scale=scale)
        # CUDA's fused kernels may return a non-contiguous layout (the CPU's math kernel does not): reshape, not view
        return o.reshape(g, hq, nq, d)

    def _attention(self, layer: int, q: torch.Tensor, inp: StepInputs, scale: float | None) -> torch.Tensor:
        """q: [N, Hq, D] (keys/values of this step already written) -> [N, Hq*D], no host sync."""
        _, hq, d = q.shape
        kv = self.pool.data[layer]  # [2, slots, K, D]
        outs = []
        dec = inp.decode
        if dec is not None and dec.tables is not None:
            assert dec.meta is not None
            o = triton_ops.paged_decode(
                q[: dec.g], kv[0], kv[1], dec.tables, dec.meta, self.pool.block_size, scale
            )
            outs.append(o.reshape(dec.g, hq * d))
        elif dec is not None and dec.parts is not None:  # length buckets, the rows put back in order
            assert dec.out_idx is not None
            parts = []
            for part in dec.parts:
                assert part.tok_idx is not None
                o = self._attend(
                    kv, q.index_select(0, part.tok_idx).unsqueeze(2), part, scale
                )  # [g, Hq, 1, D]
                parts.append(o.reshape(part.g, hq * d))
            outs.append(torch.cat(parts).index_select(0, dec.out_idx))
        elif dec is not None:
            o = self._attend(kv, q[: dec.g].unsqueeze(2), dec, scale)  # [g, Hq, 1, D]
            outs.append(o.reshape(dec.g, hq * d))
        p = inp.prefill
        if p is not None and p.tables is not None:
            assert p.meta is not None
            # the multi-token rows' tokens follow the decode rows' (one each)
            qp = q[dec.g :] if dec is not None else q
            o = triton_ops.paged_prefill(qp, kv[0], kv[1], p.tables, p.meta, self.pool.block_size, scale, p.q)
            outs.append(o.reshape(qp.shape[0], hq * d))
        elif p is not None:
            parts = []
            for sp in p.parts if p.parts is not None else [p]:
                assert sp.tok_idx is not None
                qp = q.index_select(0, sp.tok_idx).view(sp.g, sp.q, hq, d).transpose(1, 2)
                parts.append(self._attend(kv, qp, sp, scale).transpose(1, 2).reshape(sp.g * sp.q, hq * d))
            assert p.out_idx is not None
            outs.append((parts[0] if len(parts) == 1 else torch.cat(parts)).index_select(0, p.out_idx))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        kv = self.pool.data[layer]
        kv[0].index_copy_(0, slots, k)
        kv[1].index_copy_(0, slots, v)

    @staticmethod
    def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return w * xf.to(x.dtype)

    @torch.inference_mode()
    def forward(self, inp: StepInputs) -> torch.Tensor:
        """Run one step; returns float32 logits `[R, vocab]` for `inp.sample_idx`."""
        if inp.graph_key is not None and self.graphs is not None:
            return self.graphs.run(inp)
        return self._forward(inp)

    def _forward(self, inp: StepInputs) -> torch.Tensor:
        if self.family == "hf":
            return self._hf(inp)
        if self.family == "llama":
            h = self._llama(inp)
        else:
            h = self._gpt2(inp)
        return self.lm_head(h).float()

    def _hf(self, inp: StepInputs) -> torch.Tensor:
        from server.engine.hf_attention import step_context

        with step_context(self, inp):
            out = self.bundle.hf_model(
                input_ids=inp.input_ids[None],
                position_ids=inp.positions[None],
                use_cache=False,
                logits_to_keep=inp.sample_idx,
            )
        return out.logits[0].float()

    def _llama(self, inp: StepInputs) -> torch.Tensor:
        if self.fused:
            return self._llama_fused(inp)
        sp = self.spec
        hq, hk, d = sp.num_heads, sp.num_kv_heads, sp.head_dim
        n = inp.num_tokens
        h = F.embedding(inp.input_ids, self.embed)
        cos = self.cos.index_select(0, inp.positions)[:, None]
        sin = self.sin.index_select(0, inp.positions)[:, None]
        for li, L in enumerate(self.layers):
            x = self._rms(h, L["ln1"], self.eps)
            q, k, v = L["qkv"](x).split([hq * d, hk * d, hk * d], dim=-1)
            q = q.view(n, hq, d)
            k = k.view(n, hk, d)
            v = v.view(n, hk, d)
            if L["q_norm"] is not None:
                q = self._rms(q, L["q_norm"], self.eps)
                k = self._rms(k, L["k_norm"], self.eps)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            self._write_kv(li, k, v, inp.write_slots)
            o = self._attention(li, q, inp, None)
            h = h + L["o"](o)
            x = self._rms(h, L["ln2"], self.eps)
            gate, up = L["gu"](x).chunk(2, dim=-1)
            h = h + L["down"](F.silu(gate) * up)
        h = h.index_select(0, inp.sample_idx)
        return self._rms(h, self.norm, self.eps)

    def _llama_fused(self, inp: StepInputs) -> torch.Tensor:
        """`_llama` with the Triton kernels: the residual add rides on the next norm, rotary on the KV write."""
        sp, ops, eps = self.spec, triton_ops, self.eps
        h = F.embedding(inp.input_ids, self.embed)  # the residual stream, updated in place by the norms
        x = ops.rms_norm(h, self.layers[0]["ln1"], eps)
        last = len(self.layers) - 1
        for li, L in enumerate(self.layers):
            kv = self.pool.data[li]
            q = ops.rope_write(
                L["qkv"](x), inp.positions, inp.write_slots, self.cos, self.sin, kv[0], kv[1],
                sp.num_heads, sp.num_kv_heads, sp.head_dim,
            )  # fmt: skip
            o = self._attention(li, q, inp, None)
            x = ops.rms_norm(L["o"](o), L["ln2"], eps, residual=h)
            down = L["down"](ops.silu_mul(L["gu"](x)))
            if li < last:
                x = ops.rms_norm(down, self.layers[li + 1]["ln1"], eps, residual=h)
        # the last residual add rides on the final norm, for the sampled tokens only
        idx = inp.sample_idx
        return ops.rms_norm(down.index_select(0, idx), self.norm, eps, residual=h.index_select(0, idx))

    def _gpt2(self, inp: StepInputs) -> torch.Tensor:
        sp = self.spec
        hq, d = sp.num_heads, sp.head_dim
        n = inp.num_tokens
        h = F.embedding(inp.input_ids, self.wte) + F.embedding(inp.positions, self.wpe)
        for li, L in enumerate(self.layers):
            ln_w, ln_b = L["ln1"]
            x = F.layer_norm(h, (sp.hidden_size,), ln_w, ln_b, self.eps)
            q, k, v = L["qkv"](x).view(n, 3, hq, d).unbind(1)
            self._write_kv(li, k, v, inp.write_slots)
            o = self._attention(li, q, inp, self.scale)
            h = h + L["o"](o)
            ln_w, ln_b = L["ln2"]
            x = F.layer_norm(h, (sp.hidden_size,), ln_w, ln_b, self.eps)
            h = h + L["fc2"](self.act(L["fc"](x)))
        h = h.index_select(0, inp.sample_idx)
        return F.layer_norm(h, (sp.hidden_size,), *self.ln_f, self.eps)


class _DecodeGraphs:
    """Decode steps replayed as CUDA graphs, one per (batch, key slots) bucket, captured on first use.

    The graphs read static device buffers (token ids, positions, KV write slots, gathered key slots, additive mask)
    that `run` fills from a prepared, padded step: the step itself launches no host sync. Batch buckets follow
    vLLM (1, 2, 4, 8, then multiples of 8 up to `max_batch`); key-slot buckets start at 256 rounded up to whole KV
    blocks and double, so the gathered attention of a short sequence never pays for the longest context. Steps that fit no bucket (prefill
    chunks, a longer context) run eagerly. All graphs share one memory pool; a graph's logits are copied out
    before the next replay. In "eager" mode the same static buffers run without capture (any device).
    """

    MIN_SLOTS = 256

    def __init__(self, runner: ModelRunner, max_batch: int) -> None:
        self.runner = runner
        self.capture = runner.graph_mode == "cuda"
        self.batches = sorted({b for b in (1, 2, 4) if b <= max_batch} | set(range(8, max_batch + 1, 8)))
        if self.batches[-1] < max_batch:
            self.batches.append(max_batch)
        bs = runner.pool.block_size
        self.min_slots = -(-self.MIN_SLOTS // bs) * bs  # every bucket is a whole number of blocks
        need = runner.max_model_len + 1024  # the context plus room for a prefix
        self.max_slots = self.min_slots
        while self.max_slots < need:
            self.max_slots *= 2
        b, s, dev = self.batches[-1], self.max_slots, runner.device
        self.ids = torch.zeros(b, dtype=torch.long, device=dev)
        self.pos = torch.zeros(b, dtype=torch.long, device=dev)
        self.write = torch.full((b,), runner.pool.scratch_slot, dtype=torch.long, device=dev)
        self.sample = torch.arange(b, device=dev)
        # paged kernel: one graph per batch bucket (the kernel reads each row's length from `meta`); otherwise
        # gathered key slots and an additive mask, bucketed by key slots too
        self.paged = runner.kernels == "triton"
        if self.paged:
            self.tables = torch.full((b, s // bs), runner.pool.num_blocks, dtype=torch.long, device=dev)
            self.meta = torch.zeros(3, b, dtype=torch.long, device=dev)
        else:
            self.gather = torch.full((b * s,), runner.pool.scratch_slot, dtype=torch.long, device=dev)
            self.mask = torch.zeros(b * s, dtype=runner.dtype, device=dev)
        self.entries: dict[
            tuple[int, int], tuple[torch.cuda.CUDAGraph | None, StepInputs, torch.Tensor | None]
        ] = {}
        # the graphs' shared memory pool (set at the first capture)
        self.pool: torch.cuda._POOL_HANDLE | None = None
        self.logits: torch.Tensor | None = None  # the captured graphs' output (set at the first capture)
        self.num_captured = 0
        self.num_replays = 0
        self.used: set[tuple[int, int]] = set()  # the buckets steps have run at

    def bucket(self, batch: int, slots: int) -> tuple[int, int] | None:
        if batch > self.batches[-1] or slots > self.max_slots:
            return None
        b = next(x for x in self.batches if x >= batch)
        if self.paged:
            return b, self.max_slots
        s = self.min_slots
        while s < slots:
            s *= 2
        return b, s

    def _views(self, b: int, s: int) -> StepInputs:
        if self.paged:
            grp = _Group(g=b, q=1, s=s, gather=None, mask=None, tables=self.tables[:b], meta=self.meta[:, :b])
        else:
            grp = _Group(g=b, q=1, s=s, gather=self.gather[: b * s], mask=self.mask[: b * s].view(b, 1, 1, s))
        return StepInputs(
            input_ids=self.ids[:b],
            positions=self.pos[:b],
            write_slots=self.write[:b],
            sample_idx=self.sample[:b],
            decode=grp,
            prefill=None,
            num_tokens=b,
            num_rows=b,
            graph_key=(b, s),
        )

    def _fill(self, st: StepInputs, inp: StepInputs | None) -> None:
        grp = st.decode
        assert grp is not None
        if inp is None:
            # harmless contents for warm-up and capture: every row reads and writes the scratch slot
            st.input_ids.zero_()
            st.positions.zero_()
            st.write_slots.fill_(self.runner.pool.scratch_slot)
            if grp.tables is not None and grp.meta is not None:
                grp.tables.fill_(self.runner.pool.num_blocks)
                grp.meta.zero_()
                grp.meta[2] = 1
            else:
                assert grp.gather is not None and grp.mask is not None
                grp.gather.fill_(self.runner.pool.scratch_slot)
                grp.mask.fill_(float("-inf"))
                grp.mask[..., 0] = 0
            return
        src = inp.decode
        assert src is not None
        st.input_ids.copy_(inp.input_ids)
        st.positions.copy_(inp.positions)
        st.write_slots.copy_(inp.write_slots)
        if grp.tables is not None and grp.meta is not None:
            assert src.tables is not None and src.meta is not None
            grp.tables[:, : src.tables.shape[1]].copy_(src.tables)
            grp.meta.copy_(src.meta)
        else:
            assert grp.gather is not None and grp.mask is not None
            assert src.gather is not None and src.mask is not None
            grp.gather.copy_(src.gather)
            grp.mask.copy_(src.mask)

    def _capture(
        self, key: tuple[int, int]
    ) -> tuple[torch.cuda.CUDAGraph | None, StepInputs, torch.Tensor | None]:
        st = self._views(*key)
        self._fill(st, None)
        graph: torch.cuda.CUDAGraph | None = None
        out = None
        if self.capture:
            side = torch.cuda.Stream(device=self.runner.device)
            side.wait_stream(torch.cuda.current_stream(self.runner.device))
            with torch.cuda.stream(side):  # warm-up outside the graph (allocator, library handles)
                warm = self.runner._forward(st)
            torch.cuda.current_stream(self.runner.device).wait_stream(side)
            # every graph's logits land in one buffer (each is read before the next replay)
            if self.logits is None:
                self.logits = torch.empty(
                    (self.batches[-1], *warm.shape[1:]), dtype=warm.dtype, device=self.runner.device
                )
            del warm
            graph = torch.cuda.CUDAGraph()
            # thread_local: a prefix-loader thread pinning host memory during the capture does not invalidate it
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                self.logits[: key[0]].copy_(self.runner._forward(st))
            # the forward's own output goes back to the shared pool (later captures reuse it): a logits tensor
            # per graph, kept alive, came to gigabytes at 256 rows and a 128k vocabulary
            out = self.logits[: key[0]]
            self.pool = graph.pool()
            self.num_captured += 1
        entry = (graph, st, out)
        self.entries[key] = entry
        return entry

    def capture_all(self) -> float:
        """Capture every batch bucket now (at the smallest key-slot bucket; the paged kernel has only one), largest
        first so that smaller graphs reuse the larger ones' pool memory (as vLLM does): no request waits on a capture
        or on a kernel compile mid-serving. Returns the seconds it took."""
        t0 = time.perf_counter()
        slots = self.max_slots if self.paged else self.min_slots
        for b in sorted(self.batches, reverse=True):
            if (b, slots) not in self.entries:
                self._capture((b, slots))
        return time.perf_counter() - t0

    def run(self, inp: StepInputs) -> torch.Tensor:
        key = inp.graph_key
        assert key is not None
        graph, st, out = self.entries.get(key) or self._capture(key)
        self._fill(st, inp)
        if graph is None:
            out = self.runner._forward(st)
        else:
            graph.replay()
        self.num_replays += 1
        self.used.add(key)
        assert out is not None
        return out[: inp.num_rows].clone()
