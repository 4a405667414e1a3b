"""Refuse (or bound) model configs whose math rillet's decoder does not implement.

`models/llama.py` is one decoder for the Llama family: causal full attention over every earlier
token, SiLU-gated MLP without biases, q/k/v biases only where the family has them (Qwen2, or
`attention_bias`), Qwen3's q/k norms, rotary tables computed once by transformers'
`LlamaRotaryEmbedding`. A config field that asks for anything else would load (the weights
have the same names) and then answer wrongly, so it is checked here, before the weights are read:

- a sliding window (Mistral's `sliding_window`; Qwen2/Qwen3 `layer_types` with
  "sliding_attention") is implemented by no attention path, but attention over at most
  `sliding_window` tokens is the same as full attention: max_model_len is capped to the window,
  with a logged warning (Mistral-7B-v0.1: 4096);
- rotary scaling: "default", "linear", "yarn", "llama3" and "proportional" give fixed frequencies,
  which the tables hold exactly; "dynamic" and "longrope" change the frequencies once a sequence
  outgrows the original length, so max_model_len is capped to it; any other type is refused;
- refused outright (ValueError naming the field): `mlp_bias`, `attention_bias` on families whose
  output projection would need a bias too, `hidden_act` other than SiLU, partial rotary
  embeddings, an odd `head_dim`, query heads not a multiple of key/value heads, and checkpoints
  quantized by another library (`quantization_config`).

`tie_word_embeddings` (the output head is the embedding matrix) and a `head_dim` other than
hidden_size / num_attention_heads (Qwen3) are implemented.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["check_supported"]

logger = logging.getLogger(__name__)

# Rotary types whose inverse frequencies transformers computes once, at init (exact at every position).
STATIC_ROPE_TYPES = ("default", "linear", "yarn", "llama3", "proportional")
# Rotary types that recompute the frequencies when a sequence grows past an original length.
LENGTH_DEPENDENT_ROPE_TYPES = ("dynamic", "longrope")
SILU_ACTIVATIONS = ("silu", "swish")


def _family(config: Any) -> str:
    from rillet.models.llama import family_of

    return family_of(config)


def _rope_parameters(config: Any) -> dict:
    for name in ("rope_parameters", "rope_scaling"):
        value = getattr(config, name, None)
        if isinstance(value, dict) and value:
            return value
    return {}


def _cap(max_model_len: int, limit: int, why: str) -> int:
    if max_model_len <= limit:
        return max_model_len
    logger.warning("%s: rillet serves at most %d tokens of this model (max_model_len %d -> %d)", why, limit,
                   max_model_len, limit)
    return limit


def _sliding_window(config: Any, family: str) -> int | None:
    """The window of the model's sliding-window layers, or None if every layer attends in full."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    if family == "mistral":  # every layer (transformers' MistralAttention)
        return int(window)
    if family in ("qwen2", "qwen3"):
        layer_types = getattr(config, "layer_types", None)
        if layer_types is None:  # configs from before layer_types
            if not getattr(config, "use_sliding_window", False):
                return None
            first = int(getattr(config, "max_window_layers", 0) or 0)
            layer_types = ["sliding_attention" if i >= first else "full_attention"
                           for i in range(int(config.num_hidden_layers))]
        return int(window) if "sliding_attention" in layer_types else None
    return None  # Llama: transformers ignores the field


def check_supported(config: Any, max_model_len: int) -> int:
    """Raise ValueError (naming the config field) for a config whose math rillet does not
    implement; return max_model_len, capped (with a warning) where the model is exact only up
    to a length: a sliding window, or a rotary scaling that changes with the sequence length."""
    family = _family(config)
    max_model_len = int(max_model_len)

    def refuse(field: str, value: Any, why: str) -> ValueError:
        return ValueError(f"unsupported model config: {field}={value!r} ({why}); rillet cannot run this model")

    # ---- layers
    act = getattr(config, "hidden_act", "silu")
    if act not in SILU_ACTIVATIONS:
        raise refuse("hidden_act", act, "rillet's MLP is SiLU-gated")
    if getattr(config, "mlp_bias", False):
        raise refuse("mlp_bias", True, "rillet's MLP projections have no biases")
    if getattr(config, "attention_bias", False) and family != "qwen2":
        # Llama and Qwen3 put the bias on o_proj too; Mistral's transformers code has none at all.
        raise refuse("attention_bias", True, "rillet's attention output projection has no bias")
    quant = getattr(config, "quantization_config", None)
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else type(quant).__name__
        raise refuse("quantization_config", method, "checkpoints quantized by another library cannot be "
                     "loaded; use the float checkpoint (and --quantization) or a .gguf file")

    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    if kv_heads <= 0 or heads % kv_heads:
        raise refuse("num_key_value_heads", kv_heads, f"num_attention_heads ({heads}) must be a multiple of it")
    head_dim = getattr(config, "head_dim", None)
    if not head_dim:
        if config.hidden_size % heads:
            raise refuse("num_attention_heads", heads, f"hidden_size ({config.hidden_size}) is not a multiple "
                         "of it and the config sets no head_dim")
        head_dim = config.hidden_size // heads
    if int(head_dim) % 2:
        raise refuse("head_dim", head_dim, "rotary embeddings need an even head size")

    # ---- rotary embedding
    rope = _rope_parameters(config)
    if rope and "rope_type" not in rope and "type" not in rope and all(isinstance(v, dict) for v in rope.values()):
        raise refuse("rope_parameters", sorted(rope), "per-layer-type rotary parameters are not supported")
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    partial = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    if partial not in (None, 1, 1.0):
        raise refuse("partial_rotary_factor", partial, "rillet rotates the whole head")
    if rope_type in LENGTH_DEPENDENT_ROPE_TYPES:
        original = rope.get("original_max_position_embeddings")
        if rope_type == "dynamic":  # transformers rescales past max_position_embeddings
            original = getattr(config, "max_position_embeddings", None)
        if original:
            max_model_len = _cap(max_model_len, int(original),
                                 f"rope_type {rope_type!r} changes the rotary frequencies past {int(original)} "
                                 "tokens and rillet's rotary tables are fixed")
    elif rope_type not in STATIC_ROPE_TYPES:
        raise refuse("rope_type", rope_type, "known rotary types: "
                     + ", ".join(STATIC_ROPE_TYPES + LENGTH_DEPENDENT_ROPE_TYPES))

    # ---- attention span
    window = _sliding_window(config, family)
    if window is not None:
        if window < 1:
            raise refuse("sliding_window", window, "must be >= 1")
        max_model_len = _cap(max_model_len, window,
                             f"sliding_window={window}: rillet has no sliding-window attention, which equals "
                             f"full attention only up to {window} tokens")
    return max_model_len
