"""Load a Llama-family GGUF file straight into rillet's parameter names, keeping its quantized
blocks quantized (gguf_blocks), with no float32 safetensors round trip.

    config, tokenizer, weights = read_gguf_weights(path)

- config: the transformers config (AutoConfig.from_pretrained(dir, gguf_file=name), offline);
- tokenizer: the transformers tokenizer (AutoTokenizer, the same way); None if tokenizer=False;
- weights: {rillet CausalLM parameter name: torch.Tensor | QuantizedWeight}:
    embed_tokens.weight, norm.weight, lm_head.weight (only when the file has `output.weight` and
    the config does not tie it to the embedding), and per layer N:
    layers.N.input_layernorm.weight, layers.N.post_attention_layernorm.weight,
    layers.N.self_attn.qkv_proj.weight (q, k, v rows fused; .bias too where the file has them),
    layers.N.self_attn.o_proj.weight, layers.N.self_attn.q_norm.weight / k_norm.weight (qwen3),
    layers.N.mlp.gate_up_proj.weight (gate rows, then up), layers.N.mlp.down_proj.weight.
  A quantized tensor of a type gguf_blocks maps directly (Q4_0/Q4_1/Q4_K -> "q4", Q8_0/Q6_K ->
  "q8") is a QuantizedWeight — the embedding too (Q8_0 in the default model); F32/F16/BF16 stay
  float tensors of their dtype; any other type arrives as float32 (logged) for the caller to
  quantize or keep.

For general.architecture "llama" (which llama.cpp also uses for Mistral) llama.cpp's converter
permuted the rows of attn_q / attn_k (weights and biases) for its rotary layout; those rows are put
back in Hugging Face order here, as transformers' GGUF loader does. The permutation moves whole
rows, so it applies to quantized values, scales and mins alike.

When q, k and v (or gate and up) come in different forms they are fused in the majority form
(ties: the more precise, float > q8 > q4): a quantized odd one is dequantized and requantized
(quantize.quantize), a float one quantized; if the majority is float, all are dequantized.

The tensor table is read by a small GGUF header parser here (gguf.GGUFReader spends seconds
building Python objects for a vocabulary's strings); tensor data is memory-mapped and converted
from its blocks.
"""

from __future__ import annotations

import logging
import re
import struct
from collections import Counter
from dataclasses import dataclass
from math import prod
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from rillet.models.gguf_blocks import convert_blocks
from rillet.models.quantize import QuantizedWeight, quantize

logger = logging.getLogger(__name__)

Weight = torch.Tensor | QuantizedWeight

# GGUF tensor name (after "blk.N.") -> rillet parameter (after "layers.N."); fused parts separately
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}
_FUSED_PARTS = {  # GGUF part -> (rillet fused module, index, parts)
    "attn_q": ("self_attn.qkv_proj", 0, 3),
    "attn_k": ("self_attn.qkv_proj", 1, 3),
    "attn_v": ("self_attn.qkv_proj", 2, 3),
    "ffn_gate": ("mlp.gate_up_proj", 0, 2),
    "ffn_up": ("mlp.gate_up_proj", 1, 2),
}
_GLOBAL_NAMES = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
                 "output.weight": "lm_head.weight"}
_IGNORED = {"rope_freqs.weight"}  # llama3 rope scaling: transformers' config carries it
_LAYER = re.compile(r"blk\.(\d+)\.(.+)$")
_PRECISION = {"float": 2, "q8": 1, "q4": 0}


def read_gguf_weights(path: str | Path, *, tokenizer: bool = True, cache_dir: str | Path | None = None
                      ) -> tuple[object, object, dict[str, Weight]]:
    """(config, tokenizer, {rillet parameter name: weight}) of a Llama-family GGUF file; see the
    module docstring. Offline only: nothing is fetched from the hub.

    transformers needs seconds to build the config and the tokenizer from GGUF metadata (it walks
    the whole vocabulary in Python, twice). With `cache_dir` the first call saves them there as a
    small Hugging Face directory (config.json, generation_config.json, tokenizer files) and later
    calls read that instead; it is rebuilt when the GGUF file's size or mtime changes. The weights
    are always read from the GGUF file itself.
    """
    path = Path(path)
    config, tok = gguf_config_and_tokenizer(path, tokenizer=tokenizer, cache_dir=cache_dir)
    from rillet.models.llama import family_of

    family_of(config)  # a clear error for an architecture rillet does not run (gemma, phi, ...)
    return config, tok, gguf_weights(read_gguf_header(path), config)


_META_MARKER = "rillet-gguf-meta.json"


def gguf_config_and_tokenizer(path: str | Path, *, tokenizer: bool = True, cache_dir: str | Path | None = None):
    """(config, tokenizer or None) of a GGUF file, through transformers; see read_gguf_weights."""
    import json
    import shutil
    import tempfile

    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    path = Path(path)
    stat = path.stat()
    source = {"source": str(path.resolve()), "size": stat.st_size, "mtime": int(stat.st_mtime)}
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        marker = cache_dir / _META_MARKER
        try:
            cached = json.loads(marker.read_text()) == source
        except (OSError, ValueError):
            cached = False
        if cached:
            config = AutoConfig.from_pretrained(cache_dir, local_files_only=True)
            tok = AutoTokenizer.from_pretrained(cache_dir, local_files_only=True) if tokenizer else None
            return config, tok
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    tok = None
    if tokenizer or cache_dir is not None:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    if cache_dir is not None:
        cache_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache_dir.parent, prefix=".gguf-meta-"))
        try:
            config.save_pretrained(tmp)
            GenerationConfig.from_model_config(config).save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / _META_MARKER).write_text(json.dumps(source))
            shutil.rmtree(cache_dir, ignore_errors=True)  # a stale one
            try:
                tmp.rename(cache_dir)
            except OSError:  # another process wrote it first
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return config, (tok if tokenizer else None)


def gguf_weights(header: "GgufHeader", config) -> dict[str, Weight]:
    """Every tensor of the file under its rillet name (see read_gguf_weights)."""
    permute = header.architecture == "llama"
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out: dict[str, Weight] = {}
    pending: dict[str, dict[int, Weight]] = {}
    for info in header.tensors:
        name = info.name
        if name in _IGNORED:
            logger.debug("GGUF tensor %s not used by rillet", name)
            continue
        if name in _GLOBAL_NAMES:
            if name == "output.weight" and tied:
                logger.debug("GGUF has output.weight but the config ties it to the embedding; skipped")
                continue
            out[_GLOBAL_NAMES[name]] = header.convert(info)
            continue
        match = _LAYER.match(name)
        if match is None:
            raise ValueError(f"{header.path}: unexpected GGUF tensor {name!r} for a Llama-family model")
        layer, rest = match.groups()
        if rest in _LAYER_NAMES:
            out[f"layers.{layer}.{_LAYER_NAMES[rest]}"] = header.convert(info)
            continue
        part, _, kind = rest.partition(".")
        if part not in _FUSED_PARTS or kind not in ("weight", "bias"):
            raise ValueError(f"{header.path}: unexpected GGUF tensor {name!r} for a Llama-family model")
        tensor = header.convert(info)
        if permute and part in ("attn_q", "attn_k"):
            tensor = unpermute_rows(tensor, heads if part == "attn_q" else kv_heads)
        fused, index, count = _FUSED_PARTS[part]
        target = f"layers.{layer}.{fused}.{kind}"
        group = pending.setdefault(target, {})
        group[index] = tensor
        if len(group) == count:
            out[target] = fuse([group[i] for i in range(count)], target)
            del pending[target]
    if pending:
        raise ValueError(f"{header.path}: incomplete fused weights {sorted(pending)[:3]}")
    return out


def unpermute_rows(weight: Weight, n_head: int) -> Weight:
    """Undo llama.cpp's rotary row permutation of attn_q / attn_k (n_head: heads of that tensor)."""
    rows = weight.shape[0]

    def rows_back(t: torch.Tensor) -> torch.Tensor:
        # transformers' reverse permute: w.reshape(n_head, dim, 2, ...).swapaxes(2, 1), so HF row
        # h*2*dim + j*dim + i is GGUF row h*2*dim + 2*i + j
        return t.reshape(n_head, rows // n_head // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)

    if isinstance(weight, QuantizedWeight):
        return QuantizedWeight(weight.format, rows_back(weight.values), rows_back(weight.scales),
                               None if weight.mins is None else rows_back(weight.mins))
    return rows_back(weight)


def _form(weight: Weight) -> str:
    return weight.format if isinstance(weight, QuantizedWeight) else "float"


def fuse(parts: list[Weight], name: str = "?") -> Weight:
    """Concatenate along the output rows, bringing odd forms to the majority one."""
    forms = [_form(p) for p in parts]
    counts = Counter(forms)
    form = max(counts, key=lambda f: (counts[f], _PRECISION[f]))
    if len(counts) > 1:
        logger.info("%s: parts in forms %s; fusing them as %s", name, forms, form)
    if form == "float":
        floats = [p.dequantize() if isinstance(p, QuantizedWeight) else p for p in parts]
        dtype = torch.float32 if any(f.dtype == torch.float32 for f in floats) else floats[0].dtype
        return torch.cat([f.to(dtype) for f in floats])
    converted = []
    for p in parts:
        if _form(p) != form:
            p = quantize(p.dequantize() if isinstance(p, QuantizedWeight) else p, form)
        converted.append(p)
    return QuantizedWeight.cat(converted)


# ---- GGUF header ---------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy/torch order: [n, k] for a linear weight
    tensor_type: GGMLQuantizationType
    offset: int  # absolute, in the file
    nbytes: int


@dataclass
class GgufHeader:
    path: Path
    architecture: str
    metadata: dict  # scalar values; string arrays are kept as their lengths
    tensors: list[TensorInfo]
    blob: np.ndarray  # the file, memory-mapped

    def data(self, info: TensorInfo) -> np.ndarray:
        return self.blob[info.offset:info.offset + info.nbytes]

    def convert(self, info: TensorInfo) -> Weight:
        return convert_blocks(self.data(info), info.tensor_type, info.shape, name=info.name)


_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def read_gguf_header(path: str | Path) -> GgufHeader:
    """Parse a GGUF (v2/v3, little-endian) file's metadata and tensor table; the data stays mapped."""
    path = Path(path)
    blob = np.memmap(path, mode="r", dtype=np.uint8)
    buf = memoryview(blob)
    if bytes(buf[:4]) != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} is not supported (2 or 3, little-endian)")
    pos = 24

    def string(pos: int) -> tuple[str, int]:
        (length,) = struct.unpack_from("<Q", buf, pos)
        return bytes(buf[pos + 8:pos + 8 + length]).decode("utf-8", "replace"), pos + 8 + length

    def value(pos: int, vtype: int):
        if vtype in _SCALAR:
            fmt = _SCALAR[vtype]
            return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
        if vtype == _STRING:
            return string(pos)
        if vtype == _ARRAY:
            etype, count = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if etype in _SCALAR:
                size = struct.calcsize(_SCALAR[etype])
                if count <= 64:
                    return list(struct.unpack_from(f"<{count}{_SCALAR[etype][1]}", buf, pos)), pos + count * size
                return count, pos + count * size
            for _ in range(count):  # strings (a vocabulary) or nested arrays: walk, keep the count
                pos = value(pos, etype)[1]
            return count, pos
        raise ValueError(f"{path}: unknown GGUF metadata value type {vtype}")

    metadata = {}
    for _ in range(n_kv):
        key, pos = string(pos)
        (vtype,) = struct.unpack_from("<I", buf, pos)
        metadata[key], pos = value(pos + 4, vtype)
    entries = []
    for _ in range(n_tensors):
        name, pos = string(pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        ttype, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        entries.append((name, tuple(int(d) for d in reversed(dims)), GGMLQuantizationType(ttype), offset))
    alignment = int(metadata.get("general.alignment", 32))
    data_start = (pos + alignment - 1) // alignment * alignment
    tensors = []
    for name, shape, ttype, offset in entries:
        block_size, type_size = GGML_QUANT_SIZES[ttype]
        nbytes = prod(shape) // block_size * type_size
        tensors.append(TensorInfo(name, shape, ttype, data_start + offset, nbytes))
        if data_start + offset + nbytes > len(blob):
            raise ValueError(f"{path}: tensor {name} runs past the end of the file (truncated?)")
    return GgufHeader(path, str(metadata.get("general.architecture", "")), metadata, tensors, blob)
