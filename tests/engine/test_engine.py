"""The engine on the real default model: scheduling, sampling, stops, aborts, limits."""

import pytest

from rillet.engine.detokenizer import Detokenizer
from rillet.engine.errors import PromptTooLongError
from rillet.engine.llm_engine import LLMEngine
from rillet.engine.sequence import Sequence
from rillet.sampling_params import SamplingParams


def run_to_completion(engine, requests):
    """requests: list of (request_id, prompt, params). Returns {request_id: [outputs...]}."""
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
    outputs = {}
    while engine.has_unfinished():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    return outputs


def chat(text):
    return [{"role": "user", "content": text}]


def texts_and_tokens(outputs):
    return "".join(o.text for o in outputs), [t for o in outputs for t in o.token_ids]


def test_seeded_sampling_does_not_depend_on_batch_mates(engine_fp32):
    """Each seeded sequence draws from its own generator, one draw per step. In float32 the logits
    of a row do not change with the batch size here, so the sampled tokens are identical."""
    params = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, seed=1234)
    alone = run_to_completion(engine_fp32, [("alone", chat("Name a colour."), params)])
    mates = [(f"mate{i}", chat(f"Count to {i}."), SamplingParams(max_tokens=30, temperature=0.9, seed=i))
             for i in range(5)]
    together = run_to_completion(engine_fp32, mates + [("with", chat("Name a colour."), params)])
    assert texts_and_tokens(alone["alone"])[1] == texts_and_tokens(together["with"])[1]
    other_seed = run_to_completion(engine_fp32, [("other", chat("Name a colour."),
                                                  SamplingParams(max_tokens=24, temperature=1.0, seed=99))])
    assert texts_and_tokens(other_seed["other"])[1] != texts_and_tokens(alone["alone"])[1]


def test_stop_string_spanning_tokens_is_cut_exactly_and_never_streamed(engine_fp32):
    prompt = chat("Write two sentences about the sea.")
    full = run_to_completion(engine_fp32, [("full", prompt, SamplingParams(max_tokens=40, temperature=0))])["full"]
    text, tokens = texts_and_tokens(full)
    tok = engine_fp32.tokenizer
    # A stop string made of the end of token 5 and the start of token 6.
    a, b = tok.decode(tokens[:6]), tok.decode(tokens[:7])
    stop = a[-2:] + b[len(a):len(a) + 2]
    assert len(stop) >= 3 and stop in text
    expected = text[:text.index(stop)]
    cut = run_to_completion(engine_fp32, [("cut", prompt, SamplingParams(max_tokens=40, temperature=0,
                                                                      stop=[stop]))])["cut"]
    streamed = "".join(o.text for o in cut)
    assert streamed == expected
    assert cut[-1].finish_reason == "stop" and cut[-1].stop_reason == stop
    assert all(stop not in o.text for o in cut)


def test_chinese_and_emoji_stream_without_replacement_characters(engine_fp32):
    # A raw completion prompt keeps this small model writing Chinese.
    outs = run_to_completion(engine_fp32, [("zh", "北京是中国的首都，", SamplingParams(max_tokens=64, temperature=0))])["zh"]
    text, tokens = texts_and_tokens(outs)
    assert all("\ufffd" not in o.text for o in outs)
    assert any("\u4e00" <= ch <= "\u9fff" for ch in text)
    decoded = engine_fp32.tokenizer.decode(tokens, skip_special_tokens=True)
    assert decoded.rstrip("\ufffd") == text or decoded.startswith(text)


def test_detokenizer_holds_split_characters_back(engine_fp32):
    tok = engine_fp32.tokenizer
    sample = "你好，世界 🌍🎉 naïve café 😀!"
    ids = tok.encode(sample, add_special_tokens=False)
    assert len(ids) > len(sample) // 2  # byte-level pieces: characters span several tokens
    seq = Sequence("d", 0, tok.encode("x"), SamplingParams())
    detok = Detokenizer(tok)
    detok.start(seq)
    deltas = []
    for t in ids:
        detok.append(seq, t)
        deltas.append(detok.take_delta(seq, finished=False))
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids)


@pytest.mark.parametrize("skip_special", [True, False])
def test_the_decode_stream_gives_the_window_decodes_text(engine_fp32, skip_special):
    """The fast path (tokenizers' DecodeStream) against the window decodes, delta by delta, on
    random token runs: split characters, special tokens, ids past the tokenizer's vocabulary,
    stop strings cut and held back."""
    import random

    tok = engine_fp32.tokenizer
    assert engine_fp32.detokenizer._streams  # the default model's tokenizer takes the fast path
    rng = random.Random(7)
    pieces = tok.encode("你好，世界 🌍🎉 naïve café 😀! {\"a\": [1, 2]}\n\tdef f(x):", add_special_tokens=False)
    specials = sorted(tok.all_special_ids)
    for trial in range(40):
        ids = [rng.choice(pieces) if rng.random() < 0.6 else rng.choice(specials) if rng.random() < 0.1
               else rng.randrange(len(tok) + 64) for _ in range(rng.randint(1, 60))]
        params = SamplingParams(stop=["是", " the", "!\n"] if trial % 2 else [], skip_special_tokens=skip_special)
        deltas = []
        for use_stream in (True, False):
            detok = Detokenizer(tok, use_stream=use_stream)
            seq = Sequence("d", 0, tok.encode(f"prompt {trial} 日"), params)
            detok.start(seq)
            got, stop = [], None
            for t in ids:
                stop = detok.append(seq, t)
                got.append(detok.take_delta(seq, finished=stop is not None))
                if stop is not None:
                    break
            deltas.append((got, stop))
        assert deltas[0] == deltas[1], (trial, ids)


def test_abort_frees_the_slot_within_one_step(engine_fp32):
    engine_fp32.add_request("victim", chat("Tell me a long story."), SamplingParams(max_tokens=200))
    engine_fp32.add_request("bystander", chat("Say hi."), SamplingParams(max_tokens=20, temperature=0))
    engine_fp32.step()
    engine_fp32.step()
    used_before = engine_fp32.block_manager.num_used_blocks
    final = engine_fp32.abort("victim")
    assert [o.finish_reason for o in final] == ["abort"]
    assert "victim" not in engine_fp32.requests
    assert engine_fp32.block_manager.num_used_blocks < used_before
    assert all(o.request_id == "bystander" for o in engine_fp32.step())
    while engine_fp32.has_unfinished():
        engine_fp32.step()
    assert engine_fp32.block_manager.num_used_blocks == 0


def test_64_requests_of_mixed_lengths_all_finish(engine_fp32):
    requests = []
    for i in range(64):
        prompt = chat("Tell me about the number %d. " % i + "Please be detailed. " * (i % 7))
        requests.append((f"m{i}", prompt, SamplingParams(max_tokens=4 + (i % 5) * 3, temperature=0.8, seed=i)))
    outputs = run_to_completion(engine_fp32, requests)
    assert len(outputs) == 64
    for i in range(64):
        final = outputs[f"m{i}"][-1]
        assert final.finish_reason in ("stop", "length")
        assert final.num_output_tokens <= 4 + (i % 5) * 3
    assert engine_fp32.block_manager.num_used_blocks == 0


def test_over_long_prompt_is_rejected_before_it_takes_a_slot(engine_fp32):
    with pytest.raises(PromptTooLongError, match="4096"):
        engine_fp32.add_request("long", "word " * 5000, SamplingParams())
    assert not engine_fp32.has_unfinished() and engine_fp32.scheduler.num_waiting == 0


def test_output_stops_at_max_model_len():
    engine = LLMEngine(dtype="float32", max_model_len=64, kv_cache_gib=0.01)
    prompt = [1] * 60
    out = run_to_completion(engine, [("r", prompt, SamplingParams(max_tokens=100, ignore_eos=True))])["r"]
    assert out[-1].finish_reason == "length" and out[-1].num_output_tokens == 4


def test_long_prompt_prefill_is_chunked_and_other_streams_keep_flowing(engine_fp32):
    engine_fp32.add_request("stream", chat("Count slowly."), SamplingParams(max_tokens=60, ignore_eos=True))
    engine_fp32.step()
    long_prompt = list(range(1000, 3000))  # 2,000 tokens
    engine_fp32.add_request("long", long_prompt, SamplingParams(max_tokens=2))
    steps_until_long_starts = 0
    while True:
        outs = engine_fp32.step()
        assert any(o.request_id == "stream" for o in outs)  # a token every step
        if any(o.request_id == "long" for o in outs):
            break
        steps_until_long_starts += 1
    budget = engine_fp32.config.max_num_batched_tokens
    assert steps_until_long_starts >= 2000 // budget - 1
    engine_fp32.abort("stream")
    while engine_fp32.has_unfinished():
        engine_fp32.step()


def test_preemption_recomputes_and_gives_the_same_greedy_text():
    small = LLMEngine(dtype="float32", max_model_len=256, kv_cache_gib=1.3 * 256 * 46080 / (1 << 30),  # room for 1.3 full sequences (float32)
                      block_size=16)
    prompts = [(f"p{i}", chat(f"Describe the colour number {i} in detail."),
                SamplingParams(max_tokens=70, temperature=0, ignore_eos=True)) for i in range(4)]
    together = run_to_completion(small, prompts)  # 4 x ~95 tokens > the 320-token cache
    assert small.scheduler.num_preemptions_total > 0
    for rid, prompt, params in prompts[-1:]:  # one of them again, alone
        alone = run_to_completion(small, [(rid, prompt, params)])
        assert texts_and_tokens(alone[rid])[1] == texts_and_tokens(together[rid])[1]
    assert small.block_manager.num_used_blocks == 0


def test_float32_preempted_requests_give_the_greedy_tokens_of_an_unpressured_engine():
    """A preempted request is recomputed through the prompt path (its generated tokens included).
    In float32 that gives the tokens it would have given without memory pressure: every request
    of a batch that preempts matches the same batch on an engine with room for all of them."""
    prompts = [(f"p{i}", chat(f"Name the colour number {i}."),
                SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)) for i in range(4)]
    roomy = LLMEngine(dtype="float32", max_model_len=128, kv_cache_gib=0.05, block_size=16)
    reference = run_to_completion(roomy, prompts)
    assert roomy.stats().num_preemptions_total == 0
    del roomy
    # room for 1.3 sequences of 128 tokens (46,080 bytes of float32 K and V a token): 4 x ~75 do not fit
    tiny = LLMEngine(dtype="float32", max_model_len=128, kv_cache_gib=1.3 * 128 * 46080 / (1 << 30), block_size=16)
    for rid, prompt, params in prompts:
        tiny.add_request(rid, prompt, params)
    seqs = {rid: tiny.requests[rid][0] for rid, _, _ in prompts}
    together = run_to_completion(tiny, [])
    assert tiny.stats().num_preemptions_total > 0
    preempted = [rid for rid, seq in seqs.items() if seq.num_preemptions]
    assert preempted, "no request was preempted"
    for rid, _, _ in prompts:
        assert texts_and_tokens(together[rid])[1] == texts_and_tokens(reference[rid])[1], (rid, preempted)
    assert tiny.block_manager.num_used_blocks == 0


def test_n_choices_logprobs_and_logit_bias(engine_fp32):
    outs = run_to_completion(engine_fp32, [("n", chat("Pick a fruit."),
                                            SamplingParams(max_tokens=8, temperature=1.0, n=3, seed=7,
                                                           logprobs=2))])["n"]
    by_choice = {}
    for o in outs:
        by_choice.setdefault(o.index, []).append(o)
    assert sorted(by_choice) == [0, 1, 2]
    for choice in by_choice.values():
        assert choice[-1].finish_reason in ("stop", "length")
        for o in choice:
            assert len(o.logprobs) == 1 and len(o.logprobs[0].top) == 2
            assert o.logprobs[0].logprob <= 0.0
    # A strong bias forces the token.
    target = engine_fp32.tokenizer.encode(" banana", add_special_tokens=False)[0]
    forced = run_to_completion(engine_fp32, [("b", chat("Say something."),
                                              SamplingParams(max_tokens=3, temperature=0, logit_bias={target: 100}))])
    assert texts_and_tokens(forced["b"])[1] == [target] * 3


def test_a_failed_step_ends_its_requests_and_the_engine_carries_on(engine_fp32):
    calls = {"n": 0}

    def explode_once(batch):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected fault")

    engine_fp32.before_forward = explode_once
    try:
        outs = run_to_completion(engine_fp32, [("doomed", chat("Hello"), SamplingParams(max_tokens=5))])
        assert outs["doomed"][-1].finish_reason == "error" and "RuntimeError" in outs["doomed"][-1].error
        assert engine_fp32.block_manager.num_used_blocks == 0
        ok = run_to_completion(engine_fp32, [("fine", chat("Hello"), SamplingParams(max_tokens=5))])
        assert ok["fine"][-1].finish_reason in ("stop", "length")
    finally:
        engine_fp32.before_forward = None


def test_unsupported_architecture_is_named(tmp_path):
    import json
    from rillet.models.llama import family_of

    class Config:
        architectures = ["GPT2LMHeadModel"]
        model_type = "gpt2"

    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        family_of(Config())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="unsupported model architecture"):
        LLMEngine(model=str(tmp_path))


def test_multi_turn_chat_reuses_the_cached_history_and_answers_the_same(engine_fp32):
    cached = LLMEngine(dtype="float32", max_model_len=1024, kv_cache_gib=0.05, enable_prefix_caching=True)
    system = {"role": "system", "content": "You are a concise assistant who knows geography well. " * 6}
    turn1 = [system, {"role": "user", "content": "Name three rivers."}]
    params = SamplingParams(max_tokens=16, temperature=0)
    first = run_to_completion(cached, [("t1", turn1, params)])["t1"]
    turn2 = turn1 + [{"role": "assistant", "content": texts_and_tokens(first)[0]},
                     {"role": "user", "content": "And three mountains?"}]
    second = run_to_completion(cached, [("t2", turn2, params)])["t2"]
    block = cached.block_manager.block_size
    assert cached.block_manager.num_cached_tokens_total >= (len(cached.encode_prompt(turn1)) // block - 1) * block > 0
    assert cached.block_manager.num_used_blocks == 0
    # engine_fp32 runs without prefix caching: the same answer, all of it computed afresh.
    fresh = run_to_completion(engine_fp32, [("t2", turn2, params)])["t2"]
    assert texts_and_tokens(second)[1] == texts_and_tokens(fresh)[1]
    assert engine_fp32.block_manager.num_cached_tokens_total == 0


def test_min_tokens_holds_ends_back_and_include_stop_str_in_output_keeps_them(engine_fp32):
    """vLLM's two extras. min_tokens: no EOS or stop token is drawn and no stop string ends the
    answer before that many tokens. include_stop_str_in_output: the stop string, or the stop
    token's text, stays at the end of the text."""
    def run(prompt, **params):
        outs = run_to_completion(engine_fp32, [("r", chat(prompt), SamplingParams(temperature=0, **params))])["r"]
        text, tokens = texts_and_tokens(outs)
        return text, tokens, outs[-1]

    eos = engine_fp32.eos_token_ids
    text, tokens, last = run("Reply with one word: yes or no?", max_tokens=40)
    assert last.finish_reason == "stop" and tokens[-1] in eos and len(tokens) < 12  # a short answer ends early
    held, held_tokens, held_last = run("Reply with one word: yes or no?", max_tokens=40, min_tokens=12)
    assert len(held_tokens) >= 12 and not set(held_tokens[:12]) & eos
    assert held_tokens[:len(tokens) - 1] == tokens[:-1] and held.startswith(text)  # the same answer, then more
    # a stop token: its text is left out, unless asked for
    stop_token = tokens[-2]
    cut, _, cut_last = run("Reply with one word: yes or no?", max_tokens=40, stop_token_ids=[stop_token])
    kept, _, _ = run("Reply with one word: yes or no?", max_tokens=40, stop_token_ids=[stop_token],
                     include_stop_str_in_output=True)
    assert cut_last.stop_reason == stop_token and kept == text and cut == text[:len(text) - len(
        engine_fp32.tokenizer.decode([stop_token]))]

    full, full_tokens, _ = run("Say hello.", max_tokens=60)
    assert "!" in full
    at = full.index("!")
    stopped, _, stopped_last = run("Say hello.", max_tokens=60, stop=["!"])
    with_stop, _, _ = run("Say hello.", max_tokens=60, stop=["!"], include_stop_str_in_output=True)
    assert stopped == full[:at] and with_stop == full[:at + 1] and stopped_last.stop_reason == "!"
    # the "!" comes before min_tokens: it does not stop the answer, which runs on past it
    before = next(n for n in range(1, len(full_tokens)) if "!" in engine_fp32.tokenizer.decode(full_tokens[:n]))
    past, past_tokens, _ = run("Say hello.", max_tokens=60, stop=["!"], min_tokens=before + 1)
    assert past.startswith(full[:at + 1]) and len(past_tokens) > before + 1


def test_chat_template_fields_continue_a_prefilled_answer_and_reach_the_template(engine_fp32):
    """vLLM's chat fields: continue_final_message leaves the assistant's last message open (the
    answer goes on from it), add_generation_prompt false opens no new turn, chat_template_kwargs
    are variables of the template; combinations that cannot render are refused naming the field."""
    import copy

    from rillet.engine.prompts import ChatPrompt, PromptEncoder

    prompts, tok = engine_fp32.prompts, engine_fp32.tokenizer
    question = [{"role": "user", "content": "Say hello."}]
    prefilled = question + [{"role": "assistant", "content": "Hello, my name"}]
    opened = tok.decode(prompts.encode_prompt(question))
    closed = tok.decode(prompts.encode_prompt(ChatPrompt(prefilled, add_generation_prompt=False)))
    open_answer = tok.decode(prompts.encode_prompt(ChatPrompt(prefilled, False, True)))
    assert closed.startswith(opened) and open_answer.endswith("Hello, my name") and closed.startswith(open_answer)
    assert closed[len(open_answer):].strip()  # the end of the assistant's turn, left out when continuing

    # the model goes on from the prefilled words: greedy, the same tokens as after the same text as a prompt
    goes_on = run_to_completion(engine_fp32, [("c", ChatPrompt(prefilled, False, True),
                                               SamplingParams(max_tokens=8, temperature=0))])["c"]
    as_text = run_to_completion(engine_fp32, [("t", prompts.encode_prompt(ChatPrompt(prefilled, False, True)),
                                               SamplingParams(max_tokens=8, temperature=0))])["t"]
    assert texts_and_tokens(goes_on) == texts_and_tokens(as_text) and texts_and_tokens(goes_on)[0]

    custom = copy.copy(tok)
    custom.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}|{{ mood | default('plain') }}|"
    encoder = PromptEncoder(custom, engine_fp32.vocab_size, 1024)
    assert tok.decode(encoder.encode_prompt(question)).endswith("|plain|")
    assert tok.decode(encoder.encode_prompt(ChatPrompt(question, template_kwargs={"mood": "sunny"}))).endswith("|sunny|")
    # with tools too (Qwen3's enable_thinking beside a function list): both reach the template
    custom.chat_template = ("{% for m in messages %}{{ m.content }}{{ m.tool_calls or '' }}{% endfor %}"
                            "|{{ mood }}|{{ tools | length }}|")
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert tok.decode(encoder.encode_prompt(ChatPrompt(question, template_kwargs={"mood": "sunny"}), tools)
                      ).endswith("|sunny|1|")

    for fields, refused in [(dict(continue_final_message=True), "set add_generation_prompt to false"),
                            (dict(add_generation_prompt=False, continue_final_message=True, messages=question),
                             "needs the last message to be the assistant's"),
                            (dict(template_kwargs={"tokenize": True}), "may not set tokenize"),
                            (dict(template_kwargs=["x"]), "must be an object")]:
        messages = fields.pop("messages", prefilled)
        with pytest.raises(ValueError, match=refused):
            ChatPrompt(messages, **fields)
