"""What the Ollama API reports about the served model (/api/show, /api/tags, /api/ps): its family
from the Hugging Face config (`model_type`, `architectures`), its parameter count from the
safetensors headers, its weight format from the engine's backend, and its context length."""

from __future__ import annotations

import json
import logging
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rillet.engine.engine_client import EngineClient
from rillet.protocol import ollama as ol

__all__ = ["ModelInfo", "parameter_size", "read_model_info"]

logger = logging.getLogger("rillet.server")

# Backend.weights -> Ollama's quantization_level spelling
_QUANTIZATION = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "q8": "Q8_0", "q4": "Q4_1"}
# HF config key -> Ollama model_info key (after "<family>.")
_INFO_KEYS = {"hidden_size": "embedding_length", "num_hidden_layers": "block_count",
              "intermediate_size": "feed_forward_length", "num_attention_heads": "attention.head_count",
              "num_key_value_heads": "attention.head_count_kv", "rope_theta": "rope.freq_base",
              "vocab_size": "vocab_size"}


@dataclass(frozen=True)
class ModelInfo:
    family: str = ""  # the HF config's model_type ("llama", "qwen2", "gemma3_text", ...)
    architectures: tuple[str, ...] = ()
    format: str = ""  # "gguf" or "safetensors"
    parameter_count: int | None = None
    quantization: str = ""
    context_length: int | None = None
    config: dict[str, Any] = field(default_factory=dict)

    def details(self) -> ol.ModelDetails:
        return ol.ModelDetails(parent_model="", format=self.format, family=self.family,
                               families=[self.family] if self.family else None,
                               parameter_size=parameter_size(self.parameter_count),
                               quantization_level=self.quantization)

    def model_info(self) -> dict[str, Any]:
        """Ollama's `model_info`: general.* and "<family>.*" keys."""
        info: dict[str, Any] = {"general.architecture": self.family}
        if self.architectures:
            info["general.basename"] = self.architectures[0]
        if self.parameter_count is not None:
            info["general.parameter_count"] = self.parameter_count
        prefix = self.family or "model"
        info[f"{prefix}.context_length"] = self.context_length
        for key, name in _INFO_KEYS.items():
            if key in self.config:
                info[f"{prefix}.{name}"] = self.config[key]
        return info


def parameter_size(count: int | None) -> str:
    """135000000 -> "135M", 1236000000 -> "1.2B" (as Ollama writes it)."""
    if not count:
        return ""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            value = count / scale
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
    return str(count)


def _safetensors_parameters(path: Path) -> int | None:
    """Sum of the tensor sizes in the safetensors headers (the header only is read)."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        with file.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        total += sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    return total


def read_model_info(engine: EngineClient) -> ModelInfo:
    """The served model's info; what cannot be read (a model dir gone, a fake engine) stays empty.
    Reads files: call it off the event loop, once."""
    from rillet.models.resolve import resolve_model  # the engine resolved it already: a cache hit

    context_length = engine.max_model_len
    try:
        weights = engine.stats().backend.get("weights", "")
    except Exception:
        weights = ""
    try:
        resolved = resolve_model(engine.config.model)
        config = json.loads((resolved.path / "config.json").read_text())
        count = _safetensors_parameters(resolved.path)
    except Exception as exc:
        logger.warning("model info unavailable: %s", exc)
        return ModelInfo(context_length=context_length, quantization=_QUANTIZATION.get(weights, weights.upper()))
    quantization = _QUANTIZATION.get(weights, "")
    if weights == "gguf" and resolved.gguf is not None:  # the file's own type: "...Q4_K_M.gguf" -> Q4_K_M
        quantization = resolved.gguf.stem.rsplit(".", 1)[-1].upper() if "." in resolved.gguf.stem else "GGUF"
    elif not quantization:
        quantization = _QUANTIZATION.get(str(config.get("torch_dtype", "")), "")
    return ModelInfo(family=str(config.get("model_type", "")), architectures=tuple(config.get("architectures") or ()),
                     format="gguf" if resolved.gguf is not None else "safetensors", parameter_count=count,
                     quantization=quantization, context_length=context_length, config=config)
