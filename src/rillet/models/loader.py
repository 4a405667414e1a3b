"""Load a Hugging Face directory (config.json + safetensors + tokenizer) into `CausalLM`."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from rillet.models.config_check import check_supported
from rillet.models.llama import CausalLM, family_of
from rillet.parallel.shard import Shard, ShardPlan, check_shardable

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: CausalLM
    tokenizer: PreTrainedTokenizerBase
    config: PretrainedConfig
    eos_token_ids: list[int]
    max_position_embeddings: int


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return tokenizer


def eos_ids_of(path: Path, config, tokenizer) -> list[int]:
    ids: list[int] = []

    def add(value):
        if isinstance(value, int):
            ids.append(value)
        elif isinstance(value, (list, tuple)):
            ids.extend(v for v in value if isinstance(v, int))

    gen_config = path / "generation_config.json"
    if gen_config.is_file():
        add(json.loads(gen_config.read_text()).get("eos_token_id"))
    add(getattr(config, "eos_token_id", None))
    add(getattr(tokenizer, "eos_token_id", None))
    return sorted(set(ids))


def _weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path} has no .safetensors weights (only safetensors checkpoints are supported)")
    return files


def load_model(path: Path, dtype: torch.dtype, device: torch.device, max_positions: int,
               shard: Shard = Shard()) -> LoadedModel:
    """The model in `path`, or one tensor-parallel rank's shard of it: each checkpoint tensor is
    cut to the shard as it is read (parallel/shard.py)."""
    from safetensors import safe_open
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    family = family_of(config)
    max_pos = int(getattr(config, "max_position_embeddings", 0) or max_positions)
    max_pos = check_supported(config, max_pos)  # refuses unimplemented math; caps for a sliding window
    check_shardable(config, shard.size)
    plan = ShardPlan.of(config, shard)
    with torch.device("meta"):
        model = CausalLM(config, family, shard)
    model = model.to_empty(device=device).to(dtype)
    model.set_rope_positions(max_positions)

    params = dict(model.named_parameters())
    pending: dict[str, dict[str, torch.Tensor]] = {}
    loaded: set[str] = set()

    def put(name: str, tensor: torch.Tensor) -> None:
        target = params[name]
        if target.shape != tensor.shape:
            raise ValueError(f"weight {name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(tensor.to(dtype))
        loaded.add(name)

    fused = {  # checkpoint part -> (fused parameter, its position among the parts)
        "self_attn.q_proj": ("self_attn.qkv_proj", 0, 3),
        "self_attn.k_proj": ("self_attn.qkv_proj", 1, 3),
        "self_attn.v_proj": ("self_attn.qkv_proj", 2, 3),
        "mlp.gate_proj": ("mlp.gate_up_proj", 0, 2),
        "mlp.up_proj": ("mlp.gate_up_proj", 1, 2),
    }
    for file in _weight_files(path):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                name = key.removeprefix("model.")
                if "rotary_emb" in name:
                    continue
                # a tensor-parallel rank reads only its piece of each tensor
                tensor = f.get_tensor(key) if shard.size == 1 else plan.take(name, f.get_slice(key))
                for part, (fused_name, index, count) in fused.items():
                    if f".{part}." in name:
                        prefix, suffix = name.split(f".{part}.")
                        target = f"{prefix}.{fused_name}.{suffix}"
                        group = pending.setdefault(target, {})
                        group[index] = tensor
                        if len(group) == count:
                            put(target, torch.cat([group[i] for i in range(count)], dim=0))
                            del pending[target]
                        break
                else:
                    if name == "lm_head.weight" and model.lm_head is None:
                        continue
                    if name not in params:
                        logger.debug("ignoring checkpoint tensor %s", key)
                        continue
                    put(name, tensor)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"checkpoint in {path} lacks weights: {', '.join(missing[:5])}"
                         + (" ..." if len(missing) > 5 else ""))
    model.eval()
    tokenizer = load_tokenizer(path)
    return LoadedModel(model, tokenizer, config, eos_ids_of(path, config, tokenizer), max_pos)

