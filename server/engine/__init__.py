"""Inference engine: continuous batching of mixed-tenant requests over a paged KV cache."""

from server.engine.engine import AsyncEngine, EngineConfig, LLMEngine, StepStats
from server.engine.prefix_cache import DictPrefixProvider, PrefixCache, PrefixProvider
from server.engine.structured import GrammarError
from server.engine.types import (
    EngineError,
    Output,
    PrefixKey,
    QueueFull,
    Request,
    RequestTooLarge,
    SamplingParams,
    StructuredOutputs,
    TokenEvent,
    TokenLogprob,
)

__all__ = [
    "AsyncEngine",
    "DictPrefixProvider",
    "EngineConfig",
    "EngineError",
    "GrammarError",
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
    "StructuredOutputs",
    "TokenEvent",
    "TokenLogprob",
]
