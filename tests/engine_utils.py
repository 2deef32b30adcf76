"""Helpers for engine tests: random prefixes and a plain transformers reference fed the prefix as past_key_values."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from server.engine import DictPrefixProvider, EngineConfig, LLMEngine, PrefixKey, Request, SamplingParams
from server.engine.kv_cache import KVPool


def random_kv(spec, prefix_len: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (spec.num_layers, 2, spec.num_kv_heads, prefix_len, spec.head_dim)
    return torch.randn(shape, generator=g) * scale


def random_prompt(vocab: int, n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(10_000 + seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


@torch.no_grad()
def hf_greedy(
    model,
    kv: torch.Tensor | None,
    prompt: list[int],
    max_new_tokens: int,
    processor=None,
    logprobs_out: list[torch.Tensor] | None = None,
) -> list[int]:
    """Token-by-token greedy decoding with plain transformers, the prefix fed as `past_key_values`, on the model's
    own device and dtype.

    The prompt's first token has position P (the PEFT / transformers convention). `processor(input_ids, scores)` (a
    transformers LogitsProcessor) changes the scores before the argmax; `logprobs_out` receives each step's
    log-softmax of the raw logits.
    """
    out, p, dev = _hf_forward(model, kv, prompt)
    n = len(prompt)
    toks: list[int] = []
    total = p + n
    for _ in range(max_new_tokens):
        scores = out.logits[0, -1].float()[None]
        if logprobs_out is not None:
            logprobs_out.append(torch.log_softmax(scores[0], -1).cpu())
        if processor is not None:
            scores = processor(torch.tensor([prompt + toks], device=dev), scores)
        t = int(scores[0].argmax())
        toks.append(t)
        total += 1
        out = model(
            input_ids=torch.tensor([[t]], device=dev),
            past_key_values=out.past_key_values,
            attention_mask=torch.ones(1, total, dtype=torch.long, device=dev),
            position_ids=torch.tensor([[total - 1]], device=dev),
            use_cache=True,
        )
    return toks


def pool_bytes(bundle, blocks: int, block_size: int = 16) -> int:
    """kv_cache_bytes for a pool of `blocks` KV blocks of the bundle's model."""
    sp = bundle.spec
    return blocks * KVPool.bytes_per_block(
        sp.num_layers, sp.num_kv_heads, sp.head_dim, block_size, bundle.dtype
    )


def make_engine(bundle, prefixes: dict[PrefixKey, torch.Tensor], **cfg) -> LLMEngine:
    cfg.setdefault("kv_cache_bytes", 8 * 2**20)
    return LLMEngine(bundle, DictPrefixProvider(prefixes), EngineConfig(**cfg))


def mixed_workload(
    spec, prefix_lens: tuple[int, ...], n: int, new_tokens: int, no_prefix: int | None = None
) -> tuple[dict[PrefixKey, torch.Tensor], list[Request]]:
    """One tenant per prefix length (random kv) and `n` greedy requests cycling over the tenants and over prompt
    lengths 5/17/33/1; request `no_prefix` (if given) runs without any prefix."""
    keys = {PrefixKey(f"t{i}", "default", 1): random_kv(spec, p, seed=i) for i, p in enumerate(prefix_lens)}
    kl = list(keys)
    reqs = [
        Request(
            f"r{i}",
            random_prompt(spec.vocab_size, (5, 17, 33, 1)[i % 4], seed=i),
            SamplingParams(max_tokens=new_tokens, ignore_eos=True),
            kl[i % len(kl)] if i != no_prefix else None,
        )
        for i in range(n)
    ]
    return keys, reqs


@torch.no_grad()
def hf_prompt_logprobs(model, kv, prompt):
    """log_softmax (float32, on the CPU) of a transformers forward over the prompt with the prefix as
    past_key_values, on the model's own device and dtype: row t predicts prompt[t + 1]."""
    out, _, _ = _hf_forward(model, kv, prompt)
    return torch.log_softmax(out.logits[0].float(), -1).cpu()


def _hf_forward(model, kv: torch.Tensor | None, prompt: list[int]):
    """A transformers forward over `prompt` with the prefix `kv` as past_key_values, on the model's own device and
    dtype (the prompt's first position is the prefix length P): (output, P, device)."""
    param = next(model.parameters())
    dev, dtype = param.device, param.dtype
    cache = DynamicCache()
    p = 0
    if kv is not None:
        p = kv.shape[3]
        for layer in range(kv.shape[0]):
            cache.update(
                kv[layer, 0][None].to(dev, dtype).clone(), kv[layer, 1][None].to(dev, dtype).clone(), layer
            )
    n = len(prompt)
    out = model(
        input_ids=torch.tensor([prompt], device=dev),
        past_key_values=cache,
        attention_mask=torch.ones(1, p + n, dtype=torch.long, device=dev),
        position_ids=torch.arange(p, p + n, device=dev)[None],
        use_cache=True,
    )
    return out, p, dev


def greedy_gaps(model, keys, reqs, outs) -> torch.Tensor:
    """Teacher-forced check of greedy outputs that need not be bit-exact (bf16): for every generated token, how far
    (in log-probability) it falls below the most likely token of a transformers forward over the same prompt and
    the tokens generated before it. 0 where the engine picked transformers' argmax."""
    gaps = []
    for r, o in zip(reqs, outs, strict=True):
        kv = keys[r.prefix] if r.prefix is not None else None
        n, toks = len(r.prompt_token_ids), o.token_ids
        rows = hf_prompt_logprobs(model, kv, r.prompt_token_ids + toks)[n - 1 : n - 1 + len(toks)]
        gaps.append(rows.max(-1).values - rows.gather(1, torch.tensor(toks)[:, None])[:, 0])
    return torch.cat(gaps)


def computed_tokens(eng: LLMEngine) -> list[int]:
    """Spy on `eng`: the number of tokens each step computes, appended as steps run."""
    seen: list[int] = []
    prepare = eng.runner.prepare

    def spy(rows):
        seen.append(sum(len(r.tokens) for r in rows))
        return prepare(rows)

    eng.runner.prepare = spy  # type: ignore[method-assign]
    return seen
