"""AsyncEngine's side of detokenizing (the core sends token ids): hand-made core outputs through
AsyncEngine._dispatch, with the default model's tokenizer and a core that records what it is
told. A stop string ends its choice there and tells the core once; what the core sends for that
choice afterwards is dropped, its last output still counted; stop tokens' and EOS's text is not
output; the other choice is untouched."""

from rillet import AsyncEngine, SamplingParams
from rillet.engine.async_engine import RequestStream
from rillet.engine.core import AbortRequest
from rillet.engine.detokenizer import ChoiceText, Detokenizer
from rillet.engine.outputs import RequestOutput


class RecordingCore:
    def __init__(self):
        self.sent = []

    def send(self, command):
        self.sent.append(command)


def front_end(tokenizer, eos):
    engine = AsyncEngine(dtype="float32")
    engine._detokenizer, engine._eos, engine._core = Detokenizer(tokenizer), frozenset(eos), RecordingCore()
    return engine


def stream_for(engine, request_id, prompt_ids, params):
    texts = [ChoiceText(params, prompt_ids) for _ in range(params.n)]
    for text in texts:
        engine._detokenizer.start(text)
    stream = RequestStream(engine, request_id, len(prompt_ids), params.n, texts)
    engine._streams[request_id] = stream
    return stream


def output(index, token, num, finish=None):
    return RequestOutput("r", index, "", [token], 4, num, finish_reason=finish)


def test_a_stop_string_ends_its_choice_here_and_tells_the_core_once(engine_fp32):
    tok = engine_fp32.tokenizer
    eos = sorted(engine_fp32.eos_token_ids)
    ids = tok.encode(" the sea is calm and the sky is grey", add_special_tokens=False)
    other = tok.encode(" the sea is grey and the sky is wide", add_special_tokens=False)
    engine = front_end(tok, eos)
    stream = stream_for(engine, "r", tok.encode("hi"), SamplingParams(n=2, stop=["calm"]))
    for n, (token, token1) in enumerate(zip(ids, other), start=1):
        engine._dispatch([output(0, token, n), output(1, token1, n)])
    engine._dispatch([output(0, 11, len(ids) + 1, finish="stop"), output(1, eos[0], len(ids) + 1, finish="stop")])
    sent = list(stream._pending)
    choice0 = [o for o in sent if o.index == 0]
    choice1 = [o for o in sent if o.index == 1]
    assert "".join(o.text for o in choice0) == " the sea is "
    assert choice0[-1].finish_reason == "stop" and choice0[-1].stop_reason == "calm"
    stop_at = next(n for n in range(1, len(ids) + 1) if "calm" in tok.decode(ids[:n]))
    assert choice0[-1].num_output_tokens == stop_at and len(choice0) == stop_at  # the rest dropped
    assert engine._core.sent == [AbortRequest("r", index=0, stop="calm")]
    # the other choice: the whole text, the EOS it ended on adds none
    assert "".join(o.text for o in choice1) == tok.decode(other)
    assert choice1[-1].finish_reason == "stop" and choice1[-1].stop_reason is None
    assert "r" not in engine._streams  # both choices' last outputs from the core arrived


def test_a_stop_string_on_the_cores_last_token_ends_as_stop_without_telling_the_core(engine_fp32):
    tok = engine_fp32.tokenizer
    ids = tok.encode(" one two three", add_special_tokens=False)
    engine = front_end(tok, sorted(engine_fp32.eos_token_ids))
    stream = stream_for(engine, "r", tok.encode("hi"), SamplingParams(stop=["three"], max_tokens=len(ids)))
    for n, token in enumerate(ids, start=1):
        engine._dispatch([output(0, token, n, finish="length" if n == len(ids) else None)])
    outs = list(stream._pending)
    assert "".join(o.text for o in outs) == " one two "
    assert (outs[-1].finish_reason, outs[-1].stop_reason) == ("stop", "three")  # as LLMEngine: the stop first
    assert engine._core.sent == [] and "r" not in engine._streams
