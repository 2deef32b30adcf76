"""Inference engine: continuous batching of mixed-tenant requests over a paged KV cache."""

from server.engine.engine import AsyncEngine, EngineConfig, LLMEngine, StepStats
from server.engine.prefix_cache import DictPrefixProvider, PrefixCache, PrefixProvider
from server.engine.types import (
    EngineError,
    Output,
    PrefixKey,
    QueueFull,
    Request,
    RequestTooLarge,
    SamplingParams,
    TokenEvent,
    TokenLogprob,
)

__all__ = [
    "AsyncEngine",
    "DictPrefixProvider",
    "EngineConfig",
    "EngineError",
    "LLMEngine",
    "Output",
    "PrefixCache",
    "PrefixKey",
    "PrefixProvider",
    "QueueFull",
    "Request",
    "RequestTooLarge",
    "SamplingParams",
    "StepStats",
    "TokenEvent",
    "TokenLogprob",
]
