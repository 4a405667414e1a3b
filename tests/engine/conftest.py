import pytest

from rillet.engine.llm_engine import LLMEngine


@pytest.fixture(scope="session")
def engine_fp32():
    """The embedded default model in float32 (the dtype the transformers reference uses), every
    prompt computed afresh (no prefix caching)."""
    engine = LLMEngine(dtype="float32", max_num_seqs=64, max_model_len=4096, kv_cache_gib=0.5,
                       enable_prefix_caching=False)
    yield engine
    assert not engine.has_unfinished()


@pytest.fixture(autouse=True)
def _engine_left_clean(request):
    yield
    if "engine_fp32" in request.fixturenames:
        engine = request.getfixturevalue("engine_fp32")
        for rid in list(engine.requests):
            engine.abort(rid)
        assert engine.block_manager.num_used_blocks == 0

