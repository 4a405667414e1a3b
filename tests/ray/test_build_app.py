"""The Ray Serve application builder's arguments (needs Ray installed, not a cluster)."""

import dataclasses

import pytest

pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install 'rillet[ray]')")

from rillet.config import EngineConfig, ServerConfig  # noqa: E402
from rillet.deploy.ray import _coerce, app, build_app  # noqa: E402


def _field(cls, name):
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def test_serve_run_strings_are_converted_by_field_type():
    assert _coerce(_field(EngineConfig, "max_num_seqs"), "8") == 8
    assert _coerce(_field(EngineConfig, "kv_cache_gib"), "0.5") == 0.5
    assert _coerce(_field(EngineConfig, "enable_prefix_caching"), "false") is False
    assert _coerce(_field(EngineConfig, "model"), "HuggingFaceTB/SmolLM2-135M-Instruct").endswith("Instruct")
    assert _coerce(_field(EngineConfig, "max_model_len"), "none") is None
    assert _coerce(_field(ServerConfig, "allowed_origins"), "a, b") == ["a", "b"]


def test_the_builder_is_the_app_and_checks_its_arguments():
    assert app is build_app
    assert build_app({"num_replicas": "2", "max_num_seqs": "8", "min_replicas": "1", "max_replicas": "4"})
    with pytest.raises(ValueError, match="unknown argument 'num_replica'"):
        build_app({"num_replica": "2"})
    with pytest.raises(ValueError, match="max_num_seqs"):
        build_app({"max_num_seqs": "0"})  # fails at build time, not in every replica
