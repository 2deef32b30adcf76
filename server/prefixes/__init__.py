"""Prefix kinds (prefix-tuning, prefix-propagation, prompt tuning) and their compilation to serving KV."""

from server.prefixes.kinds import (
    KINDS,
    PREFIX_TUNING_KEYS,
    TRAINED_KEYS,
    PrefixTuningParams,
    cache_to_kv,
    compile_prefix_tuning,
    compile_prompt_tuning,
    compile_propagation,
    compile_record,
    decoder_layers,
    flat_to_kv,
    kv_to_cache,
    kv_to_flat,
    kv_to_past_key_values,
    prefix_forward,
    prefix_tuning_params,
    propagation_hooks,
    validate_kv,
)
from server.prefixes.peft_import import PeftAdapter, read_peft_adapter
from server.prefixes.transfer import import_peft

__all__ = [
    "KINDS",
    "PREFIX_TUNING_KEYS",
    "TRAINED_KEYS",
    "PeftAdapter",
    "PrefixTuningParams",
    "cache_to_kv",
    "compile_prefix_tuning",
    "compile_prompt_tuning",
    "compile_propagation",
    "compile_record",
    "decoder_layers",
    "flat_to_kv",
    "import_peft",
    "kv_to_cache",
    "kv_to_flat",
    "kv_to_past_key_values",
    "prefix_forward",
    "prefix_tuning_params",
    "propagation_hooks",
    "read_peft_adapter",
    "validate_kv",
]
