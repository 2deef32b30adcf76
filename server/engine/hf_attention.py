"""Paged attention plugged into transformers' own modeling code: the engine's path for model families it has no
native forward for.

The frozen model is switched to the attention implementation registered here. In the engine thread, while a step
runs (`step_context`), every attention layer of the transformers model hands its queries, keys and values to the
engine: keys/values are written into the paged KV pool and each row attends to its prefix blocks and its own blocks,
exactly as in the native path. In every other thread (training, prefix compilation, reference computations) and
outside a step, the registered functions delegate to transformers' SDPA attention and mask, so the shared model
behaves exactly as with `attn_implementation="sdpa"`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch

NAME = "prefixserve_paged"

_local = threading.local()
_registered = False
_lock = threading.Lock()


def _attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
               dropout: float = 0.0, scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:  # fmt: skip
    ctx = getattr(_local, "ctx", None)
    if ctx is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    runner, inp = ctx
    # query [1, Hq, N, D], key/value [1, K, N, D] for the step's flattened tokens (RoPE etc. already applied)
    layer = module.layer_idx
    _, hq, n, d = query.shape
    q = query[0].transpose(0, 1)
    runner._write_kv(layer, key[0].transpose(0, 1), value[0].transpose(0, 1), inp.write_slots)
    out = runner._attention(layer, q.contiguous(), inp, scaling)  # [N, Hq*D]
    return out.view(1, n, hq, d), None


def _mask(*args: Any, **kwargs: Any) -> Any:
    if getattr(_local, "ctx", None) is not None:
        return None  # the engine builds its own masks from block tables and positions
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def register() -> None:
    """Register the attention and mask functions with transformers (once per process)."""
    global _registered
    with _lock:
        if _registered:
            return
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(NAME, _attention)
        AttentionMaskInterface.register(NAME, _mask)
        _registered = True


@contextlib.contextmanager
def step_context(runner: Any, inp: Any) -> Iterator[None]:
    """Route this thread's attention calls to the engine's paged KV for one step."""
    _local.ctx = (runner, inp)
    try:
        yield
    finally:
        _local.ctx = None
