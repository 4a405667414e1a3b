"""Structured output through the real engine (the default model, float32): every schema of
rillet/bench/schemas.py in one sampled batch, regex / choice / grammar / json_object,
constrained and free requests sharing a batch, n=2, preemption, a matcher failure, and
AsyncEngine refusing a spec that does not compile."""

import asyncio
import json
import re

import jsonschema
import pytest

from rillet import AsyncEngine
from rillet.sampling_params import SamplingParams
from rillet.structured import StructuredOutputs


from rillet.bench.schemas import SCHEMAS

SCHEMA = dict(SCHEMAS)
FREE_PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):"]


def chat_ids(engine, text):
    return engine.encode_chat([{"role": "user", "content": text}])


def schema_prompt(name, schema):
    return f"Reply with a JSON example of '{name}' for this schema: {json.dumps(schema)}"


def run(engine, requests):
    """requests: {request_id: (token ids, SamplingParams)} added together, run to the end.
    Returns {(request_id, index): (text, token ids, finish_reason, error)}."""
    for request_id, (ids, params) in requests.items():
        engine.add_request(request_id, None, params, prompt_token_ids=ids)
    texts, tokens, ends = {}, {}, {}
    while engine.has_unfinished():
        for out in engine.step():
            key = (out.request_id, out.index)
            texts[key] = texts.get(key, "") + out.text
            tokens.setdefault(key, []).extend(out.token_ids)
            if out.finish_reason is not None:
                ends[key] = (out.finish_reason, out.error)
    return {key: (texts.get(key, ""), tokens.get(key, []), *ends[key]) for key in ends}


def json_params(schema, **options):
    return SamplingParams(structured=StructuredOutputs.from_schema(schema), **options)


def test_every_schema_sampled_in_one_batch_parses_and_validates(engine_fp32):
    requests = {name: (chat_ids(engine_fp32, schema_prompt(name, schema)),
                       json_params(schema, temperature=0.7, seed=i, max_tokens=150))
                for i, (name, schema) in enumerate(SCHEMAS)}
    results = run(engine_fp32, requests)
    assert len(results) == len(SCHEMAS) >= 30
    for (name, _), (text, _, reason, error) in results.items():
        assert (reason, error) == ("stop", None), (name, text)
        jsonschema.validate(json.loads(text), SCHEMA[name])


def test_constrained_and_free_requests_share_a_batch_each_as_it_is_alone(engine_fp32):
    # float32 greedy text is batch-independent in practice on this engine (README, Batch invariance).
    constrained = {name: (chat_ids(engine_fp32, schema_prompt(name, SCHEMA[name])),
                          json_params(SCHEMA[name], temperature=0.0, max_tokens=60))
                   for name in ("person", "array_of_objects")}
    free = {f"free{i}": (engine_fp32.encode_prompt(p), SamplingParams(temperature=0.0, max_tokens=24))
            for i, p in enumerate(FREE_PROMPTS[:2])}
    alone = {}
    for request_id, request in {**constrained, **free}.items():
        alone.update(run(engine_fp32, {request_id: request}))
    together = run(engine_fp32, {**constrained, **free})
    assert together == alone
    for name in constrained:
        text, _, reason, _ = together[(name, 0)]
        assert reason == "stop"
        jsonschema.validate(json.loads(text), SCHEMA[name])
    assert all(not together[(f, 0)][0].startswith("{") for f in free)  # free requests were not constrained


def test_regex_choice_grammar_and_json_object(engine_fp32):
    arithmetic = 'start: expr\nexpr: NUMBER | expr " + " NUMBER\nNUMBER: /[1-9][0-9]?/'
    cases = {
        "regex": ("Give a US phone number.", StructuredOutputs(regex=r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}")),
        "choice": ("Is the sky blue? Answer.", StructuredOutputs(choice=("yes", "no", "it depends"))),
        "grammar": ("Write a sum of three small numbers.", StructuredOutputs(grammar=arithmetic)),
        "json_object": ("Reply with a small JSON object with the name and age of a cat.",
                        StructuredOutputs(json_object=True)),
    }
    requests = {kind: (chat_ids(engine_fp32, prompt), SamplingParams(temperature=0.7, seed=3, max_tokens=60,
                                                                     structured=spec))
                for kind, (prompt, spec) in cases.items()}
    results = {rid: result for (rid, _), result in run(engine_fp32, requests).items()}
    assert re.fullmatch(r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}", results["regex"][0])
    assert results["choice"][0] in ("yes", "no", "it depends")
    assert re.fullmatch(r"[1-9][0-9]?( \+ [1-9][0-9]?)*", results["grammar"][0])
    assert results["regex"][2] == results["choice"][2] == "stop"
    text, _, reason, _ = results["json_object"]
    assert reason == "stop" and isinstance(json.loads(text), dict), text


def test_n2_gives_each_choice_its_own_matcher_and_max_tokens_still_ends_with_length(engine_fp32):
    schema = SCHEMA["tool_call_args"]
    ids = chat_ids(engine_fp32, schema_prompt("tool_call_args", schema))
    results = run(engine_fp32, {"two": (ids, json_params(schema, temperature=1.0, seed=11, n=2, max_tokens=100)),
                                "short": (ids, json_params(schema, temperature=0.0, max_tokens=3))})
    first, second = results[("two", 0)], results[("two", 1)]
    assert first[0] != second[0]
    for text, _, reason, _ in (first, second):
        assert reason == "stop"
        jsonschema.validate(json.loads(text), schema)
    text, tokens, reason, _ = results[("short", 0)]
    assert reason == "length" and len(tokens) == 3 and text.startswith("{")


def test_a_preempted_sequence_keeps_its_grammar_state(engine_fp32):
    schema = SCHEMA["nested_object"]
    request = (chat_ids(engine_fp32, schema_prompt("nested_object", schema)),
               json_params(schema, temperature=0.0, max_tokens=80))
    expected = run(engine_fp32, {"p": request})[("p", 0)]
    engine_fp32.add_request("p", None, request[1], prompt_token_ids=request[0])
    texts = []
    for _ in range(8):
        texts += [out.text for out in engine_fp32.step()]
    [seq] = engine_fp32.requests["p"]
    engine_fp32.scheduler.running.remove(seq)
    engine_fp32.scheduler._preempt(seq)  # recomputed from its tokens; its matcher is kept
    while engine_fp32.has_unfinished():
        texts += [out.text for out in engine_fp32.step()]
    assert seq.num_preemptions == 1 and seq.guide is None  # freed once finished
    assert "".join(texts) == expected[0]


def test_greedy_picks_without_masks_equal_greedy_outputs_with_masks(engine_fp32, monkeypatch):
    # On the CPU a greedy constrained row is picked by checking its best tokens against the
    # grammar (Sampler._grammar_picks), not masked: the tokens must be those a mask gives.
    from rillet.engine.sampler import Sampler

    names = [name for name, _ in SCHEMAS][:12]
    def requests():
        return {name: (chat_ids(engine_fp32, schema_prompt(name, SCHEMA[name])),
                       json_params(SCHEMA[name], temperature=0.0, max_tokens=80)) for name in names}
    picked = run(engine_fp32, requests())
    monkeypatch.setattr(Sampler, "picks_by_grammar", lambda self, seq: False)  # every row masked
    masked = run(engine_fp32, requests())
    assert {k: v[1] for k, v in picked.items()} == {k: v[1] for k, v in masked.items()}
    assert sum(reason == "stop" for _, _, reason, _ in picked.values()) >= len(names) - 1


def test_a_failing_matcher_ends_only_its_request(engine_fp32):
    schema = SCHEMA["person"]
    engine_fp32.add_request("bad", None, json_params(schema, temperature=0.0, max_tokens=40),
                            prompt_token_ids=chat_ids(engine_fp32, schema_prompt("person", schema)))
    engine_fp32.add_request("free", None, SamplingParams(temperature=0.0, max_tokens=20),
                            prompt_token_ids=engine_fp32.encode_prompt(FREE_PROMPTS[0]))
    engine_fp32.step()
    [seq] = engine_fp32.requests["bad"]
    seq.guide.matcher.consume_token(engine_fp32.tokenizer.encode("zzz")[0])  # not JSON: an error state
    ends = {}
    while engine_fp32.has_unfinished():
        ends.update({out.request_id: (out.finish_reason, out.error) for out in engine_fp32.step() if out.finish_reason})
    assert ends["bad"][0] == "error" and "structured output failed" in ends["bad"][1]
    assert ends["free"] == ("length", None)


@pytest.mark.parametrize("engine_process", [True, False], ids=["process", "thread"])
def test_async_engine_refuses_a_spec_that_does_not_compile_and_keeps_serving(engine_process):
    async def main():
        engine = AsyncEngine(dtype="float32", max_model_len=1024, kv_cache_gib=0.05, engine_process=engine_process)
        await engine.start()
        try:
            for spec, words in ((StructuredOutputs.from_schema({"$ref": "#/$defs/nope"}), "JSON schema"),
                                (StructuredOutputs(regex="[0-9"), "regex"),
                                (StructuredOutputs(grammar="start: nothing_here"), "grammar")):
                with pytest.raises(ValueError, match=words):
                    await engine.add_request("Hi", SamplingParams(structured=spec))
            params = SamplingParams(temperature=0.0, max_tokens=60, structured=StructuredOutputs.from_schema(
                SCHEMA["sentiment"]))
            text, reason = "", None
            async for out in engine.generate([{"role": "user", "content": "I love this phone. Sentiment?"}], params):
                text, reason = text + out.text, out.finish_reason
            assert reason == "stop"
            jsonschema.validate(json.loads(text), SCHEMA["sentiment"])
        finally:
            await engine.shutdown()

    asyncio.run(main())
