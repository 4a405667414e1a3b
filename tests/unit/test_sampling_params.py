import pytest

from rillet.sampling_params import SamplingParams


@pytest.mark.parametrize("field,value", [
    ("max_tokens", 0), ("max_tokens", -5), ("temperature", -1.0), ("temperature", float("nan")),
    ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("min_p", 2.0), ("repetition_penalty", 0.0),
    ("frequency_penalty", 3.0), ("presence_penalty", -3.0), ("n", 0), ("n", 1000), ("logprobs", 50),
    ("seed", "x"), ("seed", 1 << 70),
])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_stop_string_becomes_a_list_and_bad_stops_are_rejected():
    assert SamplingParams(stop="###").stop == ["###"]
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop=[""])
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop=["x"] * 10_000)


def test_logit_bias_keys_are_token_ids():
    assert SamplingParams(logit_bias={"5": 1}).logit_bias == {5: 1.0}
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={3: 1000})


def test_top_k_minus_one_means_off_and_greedy_is_temperature_zero():
    p = SamplingParams(top_k=-1, temperature=0)
    assert p.top_k == 0 and p.is_greedy


def test_min_tokens_is_a_count_up_to_max_tokens_and_not_with_structured_output():
    from rillet.structured.spec import StructuredOutputs

    assert SamplingParams(min_tokens=5, max_tokens=5).holds_ends(4)
    assert not SamplingParams(min_tokens=5, max_tokens=5).holds_ends(5)
    assert not SamplingParams().holds_ends(0)
    for value in (-1, 2.5, True):
        with pytest.raises(ValueError, match="^min_tokens must be an integer >= 0"):
            SamplingParams(min_tokens=value)
    with pytest.raises(ValueError, match=r"^min_tokens must be at most max_tokens \(3\)"):
        SamplingParams(min_tokens=4, max_tokens=3)
    assert SamplingParams(min_tokens=4000, max_tokens=None).min_tokens == 4000  # up to the context
    with pytest.raises(ValueError, match="^min_tokens cannot be combined with structured output"):
        SamplingParams(min_tokens=2, structured=StructuredOutputs(regex="[a-z]+"))
