"""Paged attention plugged into transformers' own modeling code: the engine's path for model families it has no
native forward for.

The frozen model is switched to the attention implementation registered here. In the engine thread, while a step
runs (`step_context`), every attention layer of the transformers model hands its queries, keys and values to the
engine: keys/values are written into the paged KV pool and each row attends to its prefix blocks and its own blocks,
exactly as in the native path. In every other thread (training, prefix compilation, reference computations) and
outside a step, the registered functions delegate to the attention and mask the model was loaded with (`FALLBACK`
on its config: SDPA, or the family's own eager attention), so the shared model behaves exactly as it was loaded.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from typing import Any

import torch

NAME = "prefixserve_paged"
# the config attribute naming the implementation the model was loaded with ("sdpa" or "eager"): what other threads
# and code outside a step get
FALLBACK = "_prefixserve_fallback"
# attention arguments the engine's attention does not compute; a model that passes one is refused at start-up
UNSUPPORTED = {"s_aux": "attention sinks", "softcap": "attention logit soft-capping"}

_local = threading.local()
_registered = False
_lock = threading.Lock()


def _attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
               dropout: float = 0.0, scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:  # fmt: skip
    ctx = getattr(_local, "ctx", None)
    if ctx is None:
        if _fallback(getattr(module, "config", None)) == "eager":
            eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
            if eager is not None:
                return eager(
                    module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
                )
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    for arg, what in UNSUPPORTED.items():
        if kwargs.get(arg) is not None:
            raise ValueError(f"its attention uses {what} ({arg}), which the engine does not compute")
    runner, inp = ctx
    # query [1, Hq, N, D], key/value [1, K, N, D] for the step's flattened tokens (RoPE etc. already applied)
    layer = module.layer_idx
    _, hq, n, d = query.shape
    q = query[0].transpose(0, 1)
    runner._write_kv(layer, key[0].transpose(0, 1), value[0].transpose(0, 1), inp.write_slots)
    out = runner._attention(layer, q.contiguous(), inp, scaling)  # [N, Hq*D]
    return out.view(1, n, hq, d), None


def _fallback(config: Any) -> str:
    return getattr(config, FALLBACK, "sdpa") if config is not None else "sdpa"


def _mask(*args: Any, **kwargs: Any) -> Any:
    if getattr(_local, "ctx", None) is not None:
        return None  # the engine builds its own masks from block tables and positions
    from transformers.masking_utils import eager_mask, sdpa_mask

    mask = eager_mask if _fallback(kwargs.get("config")) == "eager" else sdpa_mask
    return mask(*args, **kwargs)


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
