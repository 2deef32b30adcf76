"""Native forward pass over a flattened batch of tokens with paged attention.

The frozen transformers model provides the weights (shared, never copied: the fused QKV and gate/up matrices are
built once and the transformers modules are re-pointed at views of them). Every row of a batch attends to its own
block table: its tenant's shared prefix blocks followed by its own blocks. Linear layers run on the flattened tokens
(no padding); attention runs in two groups, one query token per row (decode) and padded multi-token rows
(prefill chunks), each with a boolean mask built from the logical position of every gathered key slot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from server.engine.kv_cache import KVPool
from server.model.spec import ModelBundle

_BIG = 1 << 30


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


@dataclass
class _Group:
    rows: torch.Tensor  # [G] row indices
    tok_idx: torch.Tensor  # [G, Q] flat token index (padding -> N, a zero row)
    valid_q: torch.Tensor  # [G, Q] bool
    gather: torch.Tensor  # [G, S] pool slot of each key (padding -> scratch slot)
    mask: torch.Tensor  # [G, 1, Q, S] bool, True = attend


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [N]
    positions: torch.Tensor  # [N]
    write_slots: torch.Tensor  # [N]
    sample_idx: torch.Tensor  # [R] flat index of tokens whose logits are needed
    groups: list[_Group]
    num_tokens: int


def _fuse(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the weights of `linears` once and re-point each module at a view (no extra memory)."""
    w = torch.cat([m.weight.detach() for m in linears], dim=0).contiguous()
    has_bias = all(m.bias is not None for m in linears)
    b = torch.cat([m.bias.detach() for m in linears], dim=0).contiguous() if has_bias else None
    o = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight = nn.Parameter(w[o : o + n], requires_grad=False)
        if has_bias:
            m.bias = nn.Parameter(b[o : o + n], requires_grad=False)
        o += n
    return w, b


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class ModelRunner:
    def __init__(self, bundle: ModelBundle, pool: KVPool, max_model_len: int) -> None:
        self.bundle = bundle
        self.spec = bundle.spec
        self.pool = pool
        self.device = bundle.device
        self.dtype = bundle.dtype
        self.max_model_len = max_model_len
        m = bundle.hf_model
        cfg = m.config
        self.family = self.spec.family
        if self.family == "llama":
            self._init_llama(m, cfg)
        elif self.family == "gpt2":
            self._init_gpt2(m, cfg)
        else:  # pragma: no cover - spec_from_config already refuses
            raise ValueError(self.family)

    # ------------------------------------------------------------------ weights
    def _init_llama(self, m, cfg) -> None:
        base = m.model
        self.embed = base.embed_tokens.weight
        self.eps = cfg.rms_norm_eps
        self.layers = []
        for layer in base.layers:
            a, mlp = layer.self_attn, layer.mlp
            qkv_w, qkv_b = _fuse([a.q_proj, a.k_proj, a.v_proj])
            gu_w, _ = _fuse([mlp.gate_proj, mlp.up_proj])
            self.layers.append(
                dict(
                    ln1=layer.input_layernorm.weight,
                    qkv_w=qkv_w,
                    qkv_b=qkv_b,
                    o_w=a.o_proj.weight,
                    o_b=a.o_proj.bias,
                    ln2=layer.post_attention_layernorm.weight,
                    gu_w=gu_w,
                    down_w=mlp.down_proj.weight,
                )
            )
        self.norm = base.norm.weight
        self.lm_head = m.lm_head.weight
        act = getattr(cfg, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r} for the native llama path")
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

        t = m.transformer
        if getattr(cfg, "scale_attn_by_inverse_layer_idx", False) or getattr(
            cfg, "reorder_and_upcast_attn", False
        ):
            raise ValueError(
                "gpt2 variants with scale_attn_by_inverse_layer_idx/reorder_and_upcast_attn unsupported"
            )
        self.scale = (1.0 / self.spec.head_dim**0.5) if getattr(cfg, "scale_attn_weights", True) else 1.0
        self.wte = t.wte.weight
        self.wpe = t.wpe.weight
        self.eps = cfg.layer_norm_epsilon
        self.act = ACT2FN[cfg.activation_function]
        self.layers = [
            dict(
                ln1=(b.ln_1.weight, b.ln_1.bias),
                attn_w=b.attn.c_attn.weight,
                attn_b=b.attn.c_attn.bias,
                proj_w=b.attn.c_proj.weight,
                proj_b=b.attn.c_proj.bias,
                ln2=(b.ln_2.weight, b.ln_2.bias),
                fc_w=b.mlp.c_fc.weight,
                fc_b=b.mlp.c_fc.bias,
                fc2_w=b.mlp.c_proj.weight,
                fc2_b=b.mlp.c_proj.bias,
            )
            for b in t.h
        ]
        self.ln_f = (t.ln_f.weight, t.ln_f.bias)
        self.lm_head = m.lm_head.weight

    # ------------------------------------------------------------------ inputs
    def prepare(self, rows: list[RowInput]) -> StepInputs:
        pool = self.pool
        bs = pool.block_size
        ids: list[int] = []
        positions: list[int] = []
        write_slots: list[int] = []
        sample_idx: list[int] = []
        starts: list[int] = []
        for r in rows:
            starts.append(len(ids))
            n = len(r.tokens)
            ids.extend(r.tokens)
            positions.extend(range(r.start_pos, r.start_pos + n))
            for j in range(r.own_cached, r.own_cached + n):
                write_slots.append(r.own_blocks[j // bs] * bs + j % bs)
            if r.sample:
                sample_idx.append(len(ids) - 1)
        n_tok = len(ids)
        dev = self.device
        groups = []
        decode = [i for i, r in enumerate(rows) if len(r.tokens) == 1]
        prefill = [i for i, r in enumerate(rows) if len(r.tokens) > 1]
        for members in (decode, prefill):
            if members:
                groups.append(self._group(rows, members, starts, n_tok))
        return StepInputs(
            input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            write_slots=torch.tensor(write_slots, dtype=torch.long, device=dev),
            sample_idx=torch.tensor(sample_idx, dtype=torch.long, device=dev),
            groups=groups,
            num_tokens=n_tok,
        )

    def _group(self, rows: list[RowInput], members: list[int], starts: list[int], n_tok: int) -> _Group:
        bs = self.pool.block_size
        dev = self.device
        q_max = max(len(rows[i].tokens) for i in members)
        nb_max = max(len(rows[i].prefix_blocks) + len(rows[i].own_blocks) for i in members)
        g = len(members)
        tables = torch.full((g, nb_max), self.pool.num_blocks, dtype=torch.long)  # pad -> scratch block
        tok_idx = torch.full((g, q_max), n_tok, dtype=torch.long)
        q_pos = torch.full((g, q_max), _BIG - 1, dtype=torch.long)
        prefix_len = torch.empty(g, dtype=torch.long)
        prefix_slots = torch.empty(g, dtype=torch.long)
        own_valid = torch.empty(g, dtype=torch.long)
        for gi, i in enumerate(members):
            r = rows[i]
            table = r.prefix_blocks + r.own_blocks
            tables[gi, : len(table)] = torch.tensor(table, dtype=torch.long)
            n = len(r.tokens)
            tok_idx[gi, :n] = torch.arange(starts[i], starts[i] + n)
            q_pos[gi, :n] = torch.arange(r.start_pos, r.start_pos + n)
            prefix_len[gi] = r.prefix_len
            prefix_slots[gi] = len(r.prefix_blocks) * bs
            own_valid[gi] = r.own_cached + n
        s = nb_max * bs
        j = torch.arange(s)[None]
        gather = (tables[:, :, None] * bs + torch.arange(bs)[None, None]).reshape(g, s)
        in_prefix = j < prefix_slots[:, None]
        own_j = j - prefix_slots[:, None]
        valid = torch.where(in_prefix, j < prefix_len[:, None], own_j < own_valid[:, None])
        k_pos = torch.where(in_prefix, j, prefix_len[:, None] + own_j)
        k_pos = torch.where(valid, k_pos, torch.full_like(k_pos, _BIG))
        mask = (k_pos[:, None, :] <= q_pos[:, :, None])[:, None]
        return _Group(
            rows=torch.tensor(members, dtype=torch.long, device=dev),
            tok_idx=tok_idx.to(dev),
            valid_q=(tok_idx < n_tok).to(dev),
            gather=gather.to(dev),
            mask=mask.to(dev),
        )

    # ------------------------------------------------------------------ forward
    def _attention(self, layer: int, q: torch.Tensor, inp: StepInputs, scale: float | None) -> torch.Tensor:
        """q: [N, Hq, D] (keys/values of this step already written) -> [N, Hq*D]."""
        n, hq, d = q.shape
        kv = self.pool.data[layer]
        out = q.new_zeros(n + 1, hq, d)
        q_ext = torch.cat([q, q.new_zeros(1, hq, d)], dim=0)
        for g in inp.groups:
            qg = q_ext[g.tok_idx].transpose(1, 2)  # [G, Hq, Q, D]
            kg = kv[0][g.gather].transpose(1, 2)  # [G, K, S, D]
            vg = kv[1][g.gather].transpose(1, 2)
            o = F.scaled_dot_product_attention(
                qg, kg, vg, attn_mask=g.mask, scale=scale, enable_gqa=kg.shape[1] != hq
            )  # [G, Hq, Q, D]
            o = o.transpose(1, 2)  # [G, Q, Hq, D]
            out[g.tok_idx[g.valid_q]] = o[g.valid_q]
        return out[:n].reshape(n, hq * d)

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
        if self.family == "llama":
            h = self._llama(inp)
        else:
            h = self._gpt2(inp)
        return F.linear(h, self.lm_head).float()

    def _llama(self, inp: StepInputs) -> torch.Tensor:
        sp = self.spec
        hq, hk, d = sp.num_heads, sp.num_kv_heads, sp.head_dim
        n = inp.num_tokens
        h = F.embedding(inp.input_ids, self.embed)
        cos = self.cos[inp.positions][:, None]
        sin = self.sin[inp.positions][:, None]
        for li, L in enumerate(self.layers):
            x = self._rms(h, L["ln1"], self.eps)
            qkv = F.linear(x, L["qkv_w"], L["qkv_b"])
            q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
            q = q.view(n, hq, d)
            k = k.view(n, hk, d)
            v = v.view(n, hk, d)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            self._write_kv(li, k, v, inp.write_slots)
            o = self._attention(li, q, inp, None)
            h = h + F.linear(o, L["o_w"], L["o_b"])
            x = self._rms(h, L["ln2"], self.eps)
            gate, up = F.linear(x, L["gu_w"]).chunk(2, dim=-1)
            h = h + F.linear(F.silu(gate) * up, L["down_w"])
        h = h[inp.sample_idx]
        return self._rms(h, self.norm, self.eps)

    def _gpt2(self, inp: StepInputs) -> torch.Tensor:
        sp = self.spec
        hq, d = sp.num_heads, sp.head_dim
        n = inp.num_tokens
        h = F.embedding(inp.input_ids, self.wte) + F.embedding(inp.positions, self.wpe)
        for li, L in enumerate(self.layers):
            x = F.layer_norm(h, (sp.hidden_size,), *L["ln1"], self.eps)
            qkv = torch.addmm(L["attn_b"], x, L["attn_w"])
            q, k, v = qkv.view(n, 3, hq, d).unbind(1)
            self._write_kv(li, k, v, inp.write_slots)
            o = self._attention(li, q, inp, self.scale)
            h = h + torch.addmm(L["proj_b"], o, L["proj_w"])
            x = F.layer_norm(h, (sp.hidden_size,), *L["ln2"], self.eps)
            h = h + torch.addmm(L["fc2_b"], self.act(torch.addmm(L["fc_b"], x, L["fc_w"])), L["fc2_w"])
        h = h[inp.sample_idx]
        return F.layer_norm(h, (sp.hidden_size,), *self.ln_f, self.eps)
