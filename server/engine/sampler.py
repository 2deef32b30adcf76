"""Per-request sampling: greedy rows vectorized, sampled rows with their own seeded generator.

A request's generator is seeded from its `seed` (or a random one), so the same seed gives the same tokens whatever
else shares the batch. Penalties (presence, frequency, repetition) change the scores a row samples from; reported
log-probabilities are the model's own (before penalties, temperature and top-k/top-p), like vLLM's default.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import torch

from server.engine.structured import apply_masks
from server.engine.types import SamplingParams, TokenLogprob

NON_FINITE = "the model produced non-finite logits for this request"
INVALID_DISTRIBUTION = "sampling failed: the distribution is not valid"
# a row whose request leaves it no token (the request's fault, not the server's)
NO_TOKEN_IN_GRAMMAR = "no token can continue the output within its structured-output constraint"
# ... where the request's own token masks take part (they may be what left the grammar nothing)
NO_TOKEN_IN_GRAMMAR_MASKED = NO_TOKEN_IN_GRAMMAR + " and its allowed_token_ids / bad_words"
NO_TOKEN_ALLOWED = "no token can be sampled: allowed_token_ids, bad_words and min_tokens exclude every token"


def finite_rows(logits: torch.Tensor) -> torch.Tensor:
    """`[R]` bool: rows of `logits` whose every value is finite. `x * 0` is 0 for a finite x and NaN for an
    infinite or NaN one, so a row sums to exactly 0 iff it is all finite: two cheap passes, where `isfinite().all()`
    takes several (5 ms for 64 rows of a 49k vocabulary on this CPU, against 0.8 ms)."""
    return (logits * 0).sum(-1) == 0


def greedy_tokens(scores: torch.Tensor) -> torch.Tensor:
    """`[R]` argmax of each row (the first of equal maxima, as `argmax`). On a CPU `max(-1)` finds the same index
    several times faster (64 x 49k fp32: 0.8 ms against 2-11 ms for `argmax` on this machine)."""
    return scores.max(-1).indices if scores.device.type == "cpu" else scores.argmax(-1)


_U64 = 0xFFFF_FFFF_FFFF_FFFF


def _splitmix64(x: int) -> int:
    x = (x + 0x9E37_79B9_7F4A_7C15) & _U64
    x = ((x ^ (x >> 30)) * 0xBF58_476D_1CE4_E5B9) & _U64
    x = ((x ^ (x >> 27)) * 0x94D0_49BB_1331_11EB) & _U64
    return x ^ (x >> 31)


def generator_seed(seed: int, device: torch.device) -> int:
    """The seed given to torch for a request's `seed` (any integer, negatives as two's complement). A CPU generator
    (mt19937) keeps only the low 32 bits of its seed, so 7 and 7 + 2**32 (or -1 and 2**32 - 1) would draw the same
    tokens: on a CPU a seed of 2**32 or more is mixed (splitmix64) into 32 bits, so seeds that differ only above
    bit 31 draw differently; seeds below 2**32 are used as they are. CUDA's Philox keeps all 64 bits."""
    s = int(seed) & _U64
    if device.type == "cpu" and s >> 32:
        s = _splitmix64(s) & 0xFFFF_FFFF
    return s


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(generator_seed(seed, device))
    return g


def _on_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a tensor on `device` without a host sync (pinned memory, non-blocking copy)."""
    t = torch.tensor(values, dtype=dtype)
    return t if device.type == "cpu" else t.pin_memory().to(device, non_blocking=True)


def draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """One token from each row of `probs` (`[n, vocab]`, each row's weights; row i with its own generator), without
    a host sync: (`[n]` int64 tokens, `[n]` bool: the row's weights were valid, finite with a positive sum).

    Inverse-CDF sampling: one uniform number per row (its generator's) located in the row's cumulative sums.
    `torch.multinomial` reads two validity checks back to the host (an async decode step waited on the GPU at
    every sampled row), and its exponential race draws a random number per vocabulary entry (~1 ms a row on a
    CPU, against ~0.05 ms for the sums). A token of weight 0 is never drawn (the first index whose cumulative sum
    passes the point; and should the sums on either side of a weight-0 token come out apart, as a parallel scan's
    rounding may leave them on a GPU, a draw landing on it takes the row's most likely token instead: a ~1e-7
    event, not a token a grammar or top-k excluded). Each row's draw depends only on its own weights and generator,
    so a seed gives the same tokens whatever shares the batch. A row that is not valid gets an arbitrary token in
    range."""
    dev = probs.device
    u = torch.stack([torch.rand((), generator=g, device=dev) for g in generators])
    cdf = probs.cumsum(-1)
    total = cdf[:, -1]  # NaN or inf if any weight is
    ok = torch.isfinite(total) & (total > 0)
    tokens = torch.searchsorted(cdf, (u * total).unsqueeze(1), right=True).squeeze(1)
    tokens = tokens.clamp_(0, probs.shape[-1] - 1)
    zero = probs.gather(1, tokens.unsqueeze(1)).squeeze(1) <= 0
    if dev.type != "cpu" or bool(zero.any()):  # (a host sync costs nothing on a CPU; a GPU step never waits)
        tokens = torch.where(zero, probs.argmax(-1), tokens)
    return tokens, ok


def filter_batch(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p (nucleus), min-p then typical-p (transformers' order) on every row of `logits` (`[n, vocab]`
    float32; row i with `params[i]`) in batched ops: each row gets exactly what it would get alone (each op
    computes a row as it would alone; tested against a row-by-row reference), in a few ops for all rows instead
    of ~30 per row. A row without top-k, top-p, min-p or typical-p is left as its temperature made it."""
    dev, dtype, vocab = logits.device, logits.dtype, logits.shape[-1]
    neg = float("-inf")
    logits = logits / _on_device([p.temperature for p in params], dtype, dev).unsqueeze(1)
    ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    if any(ks):
        values = torch.topk(logits, max(ks), dim=-1).values
        kth = values.gather(1, _on_device([max(k, 1) - 1 for k in ks], torch.long, dev).unsqueeze(1))
        kth = kth.masked_fill(_on_device([k == 0 for k in ks], torch.bool, dev).unsqueeze(1), neg)
        logits = logits.masked_fill(logits < kth, neg)
    if any(p.top_p < 1.0 for p in params):
        if dev.type == "cpu":
            logits = _top_p_cpu(logits, params)
        else:
            drop = _top_p_sorted(logits, _on_device([p.top_p for p in params], dtype, dev).unsqueeze(1))
            drop &= _on_device([p.top_p < 1.0 for p in params], torch.bool, dev).unsqueeze(1)
            logits = logits.masked_fill(drop, neg)
    if any(p.min_p > 0.0 for p in params):
        probs = logits.softmax(-1)
        floor = (
            _on_device([p.min_p for p in params], dtype, dev).unsqueeze(1)
            * probs.max(-1, keepdim=True).values
        )
        logits = logits.masked_fill(probs < floor, neg)
    if any(p.typical_p < 1.0 for p in params):
        rows = [i for i, p in enumerate(params) if p.typical_p < 1.0]
        index = _on_device(rows, torch.long, dev)
        mass = _on_device([params[i].typical_p for i in rows], dtype, dev).unsqueeze(1)
        logits = logits.index_copy(0, index, _typical(logits.index_select(0, index), mass))
    return logits


def _typical(logits: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Locally typical sampling (transformers' TypicalLogitsWarper, TGI's typical_p): each row of `logits` keeps
    the tokens whose surprisal (-log p) is closest to the row's entropy, the fewest in that order whose
    probability mass reaches the row's `mass` (`[n, 1]`), and at least one."""
    logp = logits.log_softmax(-1)
    p = logp.exp()
    entropy = -(logp * p).nansum(-1, keepdim=True)  # -inf * 0 (filtered tokens) is NaN: they add nothing
    shifted = (-logp - entropy).abs()  # +inf for filtered tokens: they sort last and stay out
    shifted_sorted, order = shifted.sort(-1)
    cum = (
        logits.gather(-1, order).softmax(-1).cumsum(-1)
    )  # (transformers' sums, to the bit: not p's, reordered)
    last = (cum < mass).sum(-1, keepdim=True).clamp_(max=logits.shape[-1] - 1)
    remove_sorted = shifted_sorted > shifted_sorted.gather(-1, last)
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


TOP_P_CANDIDATES = 1024  # on a CPU, top-p looks among this many most likely tokens before sorting a whole row


def _top_p_cpu(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Top-p (nucleus) on a CPU, where sorting a 49k vocabulary takes ~4 ms a row: the most likely
    `TOP_P_CANDIDATES` tokens (a partial sort, ~0.4 ms) hold the nucleus of almost every row of a language model,
    and a row whose nucleus they do not hold is sorted whole. The kept set is the one a full sort keeps (the
    smallest prefix of the tokens by probability whose mass reaches top_p) but for rounding: the candidates'
    probabilities are normalized by the row's sum in its own order, so a token whose cumulative mass is within a
    rounding error of top_p may fall the other way (1 row in 400 of random 49k rows). Which path a row takes
    depends only on the row, so its result does not depend on the batch."""
    rows = [i for i, p in enumerate(params) if p.top_p < 1.0]
    vocab, neg = logits.shape[-1], float("-inf")
    sub = logits[rows]
    top = torch.tensor([params[i].top_p for i in rows], dtype=logits.dtype).unsqueeze(1)
    k = min(vocab, TOP_P_CANDIDATES)
    values, order = sub.topk(k, dim=-1)
    peak = values[:, :1]
    probs = (values - peak).exp() / (sub - peak).exp().sum(-1, keepdim=True)
    cum = probs.cumsum(-1)
    remove = cum - probs >= top  # keep the smallest set whose mass reaches top_p (transformers, vLLM)
    remove[:, 0] = False
    # beyond the candidates, every token is removed iff the candidates' mass already passes top_p
    held = (cum[:, -1:] > top).squeeze(1) | (k == vocab)
    drop = torch.ones_like(sub, dtype=torch.bool).scatter_(1, order, remove)
    flat = (~held).nonzero().flatten()
    if len(flat):  # rows whose nucleus the candidates do not hold: sorted whole
        drop[flat] = _top_p_sorted(sub[flat], top[flat])
    out = logits.clone()
    out[rows] = sub.masked_fill(drop, neg)
    return out


def _top_p_sorted(logits: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """`[n, vocab]` bool, the tokens top-p removes from each row (`top`: `[n, 1]`), by sorting the whole rows:
    all but the smallest set of most likely tokens whose mass reaches top_p (transformers' TopPLogitsWarper)."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = sorted_logits.softmax(-1)
    cum = probs.cumsum(-1)
    remove = cum - probs >= top
    remove[:, 0] = False
    return torch.zeros_like(remove).scatter(1, order, remove)


def sample_rows(
    scores: torch.Tensor,
    rows: list[int],
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sampled `rows` of `scores`: (`[len(rows)]` the rows' indices, their tokens, and bool: the distribution
    was valid), on the scores' device, without a host sync. A row whose distribution is not valid (a device-side
    error would end every request) is reported by its flag instead."""
    index = _on_device(rows, torch.long, scores.device)
    if rows != list(range(scores.shape[0])):
        scores = scores.index_select(0, index)
    probs = filter_batch(scores, [params[i] for i in rows]).softmax(-1)
    return (index, *draw(probs, [generators[i] for i in rows]))


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p (nucleus), min-p then typical-p on one row of float32 logits (transformers'
    order)."""
    return filter_batch(logits.unsqueeze(0), [p])[0]


def sample_on_device(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> torch.Tensor:
    """`sample` for rows whose scores are the raw logits (no penalties, bias, masks or logprobs), without a host
    sync: `[3, R]` int64 on the logits' device, rows (token, logits finite, sampling possible). A sampled row runs
    the same ops with its own generator as in `sample`, so a seed gives the same tokens either way. A row whose
    distribution is not valid draws from placeholder weights (a device-side error would end every request) and is
    reported by its flags instead."""
    tokens = greedy_tokens(logits)
    finite = finite_rows(logits)
    valid = torch.ones_like(finite)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        index, drawn, ok = sample_rows(logits, rows, params, generators)
        tokens.index_copy_(0, index, drawn)
        valid.index_copy_(0, index, ok)
    return torch.stack([tokens, finite.long(), valid.long()])


def process_scores(
    row: torch.Tensor,
    p: SamplingParams,
    prompt: list[int],
    output: list[int],
    eos_ids: Collection[int] = (),
) -> torch.Tensor:
    """One row of float32 logits -> the scores it samples from: TGI's watermark first (as TGI), then in vLLM's
    order: allowed_token_ids (every other
    token at -inf), bad words (the last token of a bad word whose other tokens end the output at -inf), min_tokens
    (end-of-sequence and
    stop_token_ids at -inf until `min_tokens` are generated), logit_bias, repetition penalty over prompt + output
    (transformers' RepetitionPenaltyLogitsProcessor), then OpenAI's frequency and presence penalties over the
    generated tokens. Token ids past the vocabulary are ignored."""
    vocab = row.shape[-1]
    row = row.clone()
    if p.watermark:
        prev = (prompt + output)[-1] if (prompt or output) else 0
        green = watermark_greenlist(prev, vocab, p.watermark_gamma).to(row.device)
        row[green] += p.watermark_delta
    if p.allowed_token_ids:
        ids = torch.tensor([t for t in p.allowed_token_ids if t < vocab], dtype=torch.long, device=row.device)
        keep = row.index_select(0, ids)
        row.fill_(float("-inf")).index_copy_(0, ids, keep)
    if p.bad_words_token_ids:
        banned = bad_word_tokens(p.bad_words_token_ids, output, vocab)
        if banned:
            row[torch.tensor(banned, device=row.device)] = float("-inf")
    if len(output) < p.min_tokens:
        banned = [t for t in {*eos_ids, *p.stop_token_ids} if 0 <= t < vocab]
        if banned:
            row[torch.tensor(banned, device=row.device)] = float("-inf")
    bias = [(t, b) for t, b in p.logit_bias if t < vocab]
    if bias:
        ids = torch.tensor([t for t, _ in bias], device=row.device)
        row.index_add_(0, ids, torch.tensor([b for _, b in bias], dtype=row.dtype, device=row.device))
    if p.repetition_penalty != 1.0:
        # (long: an empty history is an empty index, not a float tensor)
        seen = (
            torch.tensor(prompt + output, dtype=torch.long, device=row.device).clamp_(0, vocab - 1).unique()
        )
        vals = row[seen]
        row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.frequency_penalty or p.presence_penalty) and output:
        counts = torch.bincount(torch.tensor(output, device=row.device), minlength=vocab)[:vocab].to(
            row.dtype
        )
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
    return row


WATERMARK_HASH_KEY = 15485863  # TGI's (a prime): the green list's seed is it times the previous token


def watermark_greenlist(prev_token: int, vocab: int, gamma: float) -> torch.Tensor:
    """The watermark's green list after `prev_token`, as TGI draws it (its WatermarkLogitsProcessor): the first
    `int(vocab * gamma)` of a random permutation of the vocabulary seeded with the hash key times the token, on a
    CPU generator (the same list whatever device serves)."""
    g = torch.Generator(device="cpu")
    g.manual_seed(WATERMARK_HASH_KEY * prev_token)
    return torch.randperm(vocab, generator=g)[: int(vocab * gamma)]


def bad_word_tokens(bad_words: Collection[tuple[int, ...]], output: list[int], vocab: int) -> list[int]:
    """The tokens vLLM's bad_words ban next: each bad word's last token where the output ends with its other
    tokens (a one-token word: always)."""
    banned = set()
    for seq in bad_words:
        n = len(seq) - 1
        if seq[-1] < vocab and (n == 0 or (len(output) >= n and tuple(output[-n:]) == seq[:-1])):
            banned.add(seq[-1])
    return sorted(banned)


@dataclass
class SampleOutput:
    tokens: list[int]  # one per row
    failed: dict[int, str] = field(default_factory=dict)  # row -> why it could not be sampled
    logprobs: dict[int, TokenLogprob] = field(default_factory=dict)  # rows that asked for them


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    histories: list[tuple[list[int], list[int]]] | None = None,
    eos_ids: Collection[int] = (),
    masks: tuple[list[int], torch.Tensor] | None = None,
    forced: dict[int, int] | None = None,
) -> SampleOutput:
    """logits: float32 `[R, vocab]`; one token per row, the rows that could not be sampled with the reason, and the
    log-probabilities of the rows that asked for them.

    `masks` = (rows, int32 bitmasks) of structured-output rows: their disallowed tokens are set to -inf after every
    other processing, so nothing (a +100 logit_bias included) can bring a token outside the grammar back.

    `forced` = {row: token} of rows whose next token is decided (a spent thinking budget's closing tag): they take it
    whatever their scores, unless their logits are not finite; their log-probability is the model's.

    `histories[i]` is row i's (prompt, output) tokens, needed only for rows whose scores are processed (penalties,
    logit_bias, min_tokens with `eos_ids`). Greedy rows without processing cost one vectorized argmax and one device
    sync for the whole batch. A row whose logits are not finite (a prefix or input that overflows) or whose sampling
    fails is reported on its own: the other rows of the batch are unaffected, so one tenant's request can never fail
    its neighbours'.
    """
    scores = logits
    processed = [i for i, p in enumerate(params) if p.processed]
    if processed or masks is not None:
        if processed and histories is None:
            raise ValueError("rows with processed scores need their token histories")
        scores = logits.clone()
        for i in processed:
            assert histories is not None  # (checked above)
            scores[i] = process_scores(logits[i], params[i], *histories[i], eos_ids)
        if masks is not None:
            apply_masks(scores, *masks)
    checks = [greedy_tokens(scores), finite_rows(logits).long()]
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:  # sampled rows: their token, or -1 where the distribution is not valid
        index, drawn, ok = sample_rows(scores, rows, params, generators)
        checks.append(checks[0].clone().index_copy_(0, index, torch.where(ok, drawn, -1)))
    restricted = masks is not None or any(
        params[i].allowed_token_ids or params[i].bad_words_token_ids for i in processed
    )
    if restricted:  # a row whose every token is excluded has nothing to sample (argmax would say token 0)
        checks.append(torch.isfinite(scores).any(-1).long())
    host = torch.stack(checks).tolist()  # one device sync
    out, finite = host[0], host[1]
    failed = {i: NON_FINITE for i, ok in enumerate(finite) if not ok}
    if restricted:
        for i, live in enumerate(host[-1]):
            if not live and i not in failed:
                p = params[i]
                if p.structured is None:
                    failed[i] = NO_TOKEN_ALLOWED
                elif p.allowed_token_ids or p.bad_words_token_ids:
                    failed[i] = NO_TOKEN_IN_GRAMMAR_MASKED
                else:
                    failed[i] = NO_TOKEN_IN_GRAMMAR
    for i in rows:
        if i in failed:
            continue
        if host[2][i] < 0:
            failed[i] = INVALID_DISTRIBUTION
        else:
            out[i] = host[2][i]
    for i, tok in (forced or {}).items():
        if failed.get(i) != NON_FINITE:
            failed.pop(i, None)
            out[i] = tok
    res = SampleOutput(out, failed)
    want = [i for i, p in enumerate(params) if p.logprobs is not None and i not in failed]
    if want:
        res.logprobs = token_logprobs(
            logits, want, [out[i] for i in want], [params[i].logprobs or 0 for i in want]
        )
    return res


def token_logprobs(
    logits: torch.Tensor, rows: list[int], tokens: list[int], tops: list[int]
) -> dict[int, TokenLogprob]:
    """The model's log-probabilities (raw logits, as vLLM reports by default) of the sampled tokens and the top-k
    alternatives of each row, read back in one transfer."""
    idx = torch.tensor(tokens, device=logits.device)
    return logprobs_from_host(logprobs_on_device(logits, rows, idx, tops).tolist(), rows, tokens, tops)


def logprobs_width(k: int) -> int:
    """Columns of a `logprobs_on_device` line with k alternatives."""
    return 2 + 2 * k


def logprobs_on_device(
    logits: torch.Tensor, rows: list[int] | None, tokens: torch.Tensor, tops: list[int]
) -> torch.Tensor:
    """`[len(rows), logprobs_width(k)]` float32 on the logits' device, one line per row (`rows` None: every row, without
    indexing from the host): the log-probability of its token (`tokens[j]` for `rows[j]`), then the top
    k = max(tops) values and their ids (exact in float32 below 2**24), then the token's rank (vLLM's: how many
    tokens are at least as likely, itself included)."""
    lp = torch.log_softmax((logits if rows is None else logits[rows]).float(), dim=-1)
    k = max(tops)
    values, ids = lp.topk(k, dim=-1)
    own = lp.gather(1, tokens.reshape(-1, 1))
    rank = (lp >= own).sum(dim=1, keepdim=True).float()
    return torch.cat([own, values, ids.float(), rank], dim=1)


def logprobs_from_host(
    host: list[list[float]], rows: list[int], tokens: list[int], tops: list[int]
) -> dict[int, TokenLogprob]:
    """`logprobs_on_device`'s lines, read back, as each row's `TokenLogprob` (its own top-n of the k)."""
    k = max(tops)
    out = {}
    for h, r, tok, n in zip(host, rows, tokens, tops, strict=True):
        top = tuple((int(t), v) for t, v in zip(h[1 + k : 1 + k + n], h[1 : 1 + n], strict=True))
        out[r] = TokenLogprob(tok, h[0], top, int(h[1 + 2 * k]))
    return out
