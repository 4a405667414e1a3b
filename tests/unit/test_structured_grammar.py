"""Structured-output grammars without a model: compiling and caching specs for the default
model's tokenizer, the errors bad specs get, and masks applied to hand-made logits."""

import json

import pytest
import torch

from rillet.engine.sampler import GRAMMAR_CANDIDATES, Sampler
from rillet.engine.sequence import Sequence
from rillet.models.loader import load_tokenizer
from rillet.models.resolve import resolve_model
from rillet.sampling_params import SamplingParams
from rillet.structured import StructuredOutputs
from rillet.structured.grammar import GrammarCompiler, grammar_compiler, is_compiled
from rillet.structured.matcher import Guide, MaskFiller, apply_token_bitmask_


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model(None).path)


@pytest.fixture(scope="module")
def compiler(tokenizer) -> GrammarCompiler:
    return grammar_compiler(tokenizer, [tokenizer.eos_token_id])


def test_one_compiler_per_tokenizer_and_a_cache_hit_for_an_equal_spec(tokenizer, compiler):
    assert grammar_compiler(tokenizer, [tokenizer.eos_token_id]) is compiler
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
    spec = StructuredOutputs.from_schema(schema)
    assert not is_compiled(tokenizer, [tokenizer.eos_token_id], spec)
    before = compiler.cache_info()
    first = compiler.compile(spec)
    # A spec built again from an equal schema (another dict) is the same cache entry.
    again = compiler.compile(StructuredOutputs.from_schema(json.loads(json.dumps(schema))))
    after = compiler.cache_info()
    assert again is first
    assert (after["misses"] - before["misses"], after["hits"] - before["hits"]) == (1, 1)
    assert is_compiled(tokenizer, [tokenizer.eos_token_id], spec)
    assert first.compile_s > 0


def test_the_cache_is_bounded(tokenizer):
    small = GrammarCompiler(tokenizer, cache_size=2)
    specs = [StructuredOutputs(regex=f"[a-z]{{{i}}}") for i in range(1, 4)]
    for spec in specs:
        small.compile(spec)
    assert small.cache_info()["size"] == 2
    assert not small.contains(specs[0]) and small.contains(specs[2])


@pytest.mark.parametrize("spec, words", [
    (StructuredOutputs(json=json.dumps({"$ref": "#/$defs/missing"})), ["JSON schema", "missing"]),
    (StructuredOutputs(json=json.dumps({"type": "strng"})), ["JSON schema", "strng"]),
    (StructuredOutputs(json="{not json"), ["JSON"]),
    (StructuredOutputs(regex="a(b"), ["regex", "unclosed group"]),
    (StructuredOutputs(grammar="start: undefined_rule"), ["grammar", "undefined_rule"]),
    (StructuredOutputs(grammar="start: ("), ["grammar"]),
    (StructuredOutputs(choice=()), ["choice"]),
    (StructuredOutputs(choice=("a", "")), ["choice"]),
    (StructuredOutputs(regex="a", grammar="start: \"a\""), ["exactly one"]),
])
def test_a_spec_that_does_not_compile_is_a_value_error_naming_the_problem(compiler, spec, words):
    with pytest.raises(ValueError) as info:
        compiler.compile(spec)
    message = str(info.value)
    for word in words:
        assert word in message, message
    assert not compiler.contains(spec)


def guide_for(compiler, spec) -> Guide:
    return Guide(compiler.compile(spec))


def allowed_ids(compiler, guide) -> set[int]:
    filler = MaskFiller(compiler.vocab_size)
    bitmask = filler.start([guide]).result()
    filler.close()
    masked = apply_token_bitmask_(torch.zeros((1, compiler.vocab_size)), [0], bitmask)
    return set(torch.isfinite(masked[0]).nonzero().flatten().tolist())


def test_choice_masks_all_but_the_literals_and_stops_once_one_is_complete(tokenizer, compiler):
    spec = StructuredOutputs(choice=("yes", "no (really)"))
    guide = guide_for(compiler, spec)
    allowed = allowed_ids(compiler, guide)
    assert tokenizer.encode("yes")[0] in allowed and tokenizer.encode("no")[0] in allowed
    assert tokenizer.encode("maybe")[0] not in allowed
    assert 10 < compiler.vocab_size - len(allowed)
    for token in tokenizer.encode("no (really)"):
        assert not guide.is_stopped
        assert guide.accept(token)
    assert guide.is_stopped
    assert not guide_for(compiler, spec).accept(tokenizer.encode("maybe")[0])


def test_a_rejected_token_sets_the_error_and_fills_an_all_allowed_row(compiler):
    guide = guide_for(compiler, StructuredOutputs(regex="[0-9]+"))
    assert not guide.accept(compiler.ll_tokenizer.tokenize_str("x")[0])
    assert guide.error
    assert len(allowed_ids(compiler, guide)) == compiler.vocab_size  # logits stay finite until it is ended


def test_bitmask_on_toy_logits_masks_only_its_rows_and_ids_past_the_mask():
    # 40 logits, a mask one word (32 ids) wide: ids 32..39 are past the tokenizer's vocabulary.
    logits = torch.arange(3 * 40, dtype=torch.float32).view(3, 40)
    bitmask = torch.tensor([[(1 << 3) - (1 << 31)]], dtype=torch.int32)  # allows ids 3 and 31 (the sign bit)
    before = logits.clone()
    masked = apply_token_bitmask_(logits, [1], bitmask)
    assert masked is logits  # in place: the free rows cost nothing
    assert torch.equal(masked[0], before[0]) and torch.equal(masked[2], before[2])
    assert torch.isfinite(masked[1]).nonzero().flatten().tolist() == [3, 31]
    assert masked[1, 3] == before[1, 3]


@pytest.mark.parametrize("vocab", [1000, 1024, 1100])  # the mask (32 words = 1024 ids) wider, equal, narrower
def test_host_bitmask_path_equals_the_torch_path(vocab):
    # Both shapes of mask the host path tells apart: nearly all allowed (inside a string) and
    # nearly all forbidden (between JSON tokens), plus all-allowed and all-forbidden rows.
    from rillet.structured.matcher import _apply_bitmask_numpy, _apply_bitmask_torch

    gen = torch.Generator().manual_seed(0)
    words = 32
    loose = torch.full((3, words), -1, dtype=torch.int32)
    loose.view(-1)[torch.randint(0, 3 * words, (12,), generator=gen)] = torch.randint(
        -2**31, 2**31 - 1, (12,), generator=gen, dtype=torch.int64).to(torch.int32)
    tight = torch.zeros((3, words), dtype=torch.int32)
    tight.view(-1)[torch.randint(0, 3 * words, (5,), generator=gen)] = torch.tensor([1, -2**31, 6, 1 << 20, -1],
                                                                                       dtype=torch.int32)
    edge = torch.stack([torch.full((words,), -1, dtype=torch.int32), torch.zeros(words, dtype=torch.int32)])
    bitmask = torch.cat([loose, tight, edge])
    rows = [0, 2, 3, 5, 6, 8, 9, 10]
    logits = torch.randn((12, vocab), generator=gen)
    expected = _apply_bitmask_torch(logits.clone(), rows, bitmask)
    got = _apply_bitmask_numpy(logits.clone(), rows, bitmask)
    assert torch.equal(got, expected)
    assert apply_token_bitmask_(logits.clone(), rows, bitmask).equal(expected)  # float32 on the host: this path
    # a strided view (the sampler passes logits[:, :vocab_size] of a wider head)
    wide = torch.randn((12, vocab + 7), generator=gen)
    expected = _apply_bitmask_torch(wide.clone()[:, :vocab], rows, bitmask)
    assert _apply_bitmask_numpy(wide.clone()[:, :vocab], rows, bitmask).equal(expected)


def test_sampler_applies_the_mask_after_the_bias_and_before_temperature():
    V = 64
    logits = torch.zeros((2, V))
    logits[:, 5] = 10.0  # the free favourite
    bitmask = torch.zeros((1, 2), dtype=torch.int32)
    bitmask[0, 0] = (1 << 7) | (1 << 9)
    seqs = [Sequence("c", 0, [1], SamplingParams(temperature=0.0, logit_bias={9: 5.0})),
            Sequence("f", 0, [1], SamplingParams(temperature=0.0))]
    tokens = Sampler(V, torch.device("cpu"))(logits, seqs, ([0], bitmask)).token_ids
    assert tokens == [9, 5]  # the bias picks among the allowed; the free row is unchanged
    hot = [Sequence("h", 0, [1], SamplingParams(temperature=50.0, seed=s)) for s in range(200)]
    sampled = Sampler(V, torch.device("cpu"))(logits[:1].expand(200, -1).clone(), hot,
                                               (list(range(200)), bitmask.expand(200, -1).clone())).token_ids
    assert set(sampled) == {7, 9}  # a high temperature flattens only what the mask allowed


def test_greedy_constrained_rows_pick_the_masked_argmax_without_a_mask(compiler, tokenizer, monkeypatch):
    # Greedy rows on the host are picked by checking their best tokens against the grammar
    # (Sampler._grammar_picks). Each case must pick what masking the row would: the top token
    # allowed; the second; none of the candidates (the whole mask decides); the top past the
    # tokenizer's vocabulary; a tie (lowest id); a tie at the candidates' edge (the mask).
    V = compiler.vocab_size + 10  # a head wider than the tokenizer, as many models have
    digit = {d: tokenizer.convert_tokens_to_ids(d) for d in "0123456789"}
    letters = [tokenizer.convert_tokens_to_ids(c) for c in "abcdefghijk"]
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn((7, V), generator=gen)
    k = GRAMMAR_CANDIDATES
    others = list(range(1000, 1000 + k + 4))  # none of them a digit
    logits[0, digit["5"]] = 30.0
    logits[1, letters[0]], logits[1, digit["7"]] = 30.0, 29.0
    for j, t in enumerate(others[:k + 1]):  # more than the candidates above the digit
        logits[2, t] = 30.0 - j / 100
    logits[2, digit["3"]] = 20.0
    logits[3, compiler.vocab_size + 3], logits[3, digit["1"]] = 30.0, 29.0
    logits[4, digit["8"]] = logits[4, digit["2"]] = 30.0
    logits[5, others[:k - 1]] = 31.0  # the k-th candidate and more tie at 30 with two digits:
    logits[5, others[k - 1:]] = 30.0  # a token outside the candidates could tie too
    logits[5, [digit["9"], digit["4"]]] = 30.0
    seqs = []
    for i in range(6):
        seq = Sequence(f"s{i}", 0, [1], SamplingParams(temperature=0.0))
        seq.guide = guide_for(compiler, StructuredOutputs(regex="[0-9]+"))
        seqs.append(seq)
    seqs.append(Sequence("free", 0, [1], SamplingParams(temperature=0.0)))
    assert not any(seqs[0].guide.allows(t) for t in others) and not seqs[0].guide.forced()
    whole_masks = []
    original = Guide.allowed_ids
    monkeypatch.setattr(Guide, "allowed_ids", lambda self: whole_masks.append(1) or original(self))
    picks = Sampler(V, torch.device("cpu"))(logits.clone(), seqs).token_ids
    masked = logits.clone()
    for i in range(6):
        keep = torch.from_numpy(original(seqs[i].guide))
        row = torch.full((V,), -float("inf"))
        row[keep] = logits[i, keep]
        masked[i] = row
    assert picks == masked.argmax(dim=-1).tolist()
    assert picks[:5] == [digit["5"], digit["7"], digit["3"], digit["1"], min(digit["8"], digit["2"])]
    assert len(whole_masks) == 2  # rows 2 and 5 only


def test_where_bytes_are_forced_the_greedy_pick_is_the_masks_canonical_token(compiler, tokenizer):
    # An object with a required key forces `{"` first: the mask allows the token `{"` only, while
    # the matcher would accept `{` too. A greedy row that prefers `{` must still get `{"`.
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    guide = guide_for(compiler, StructuredOutputs.from_schema(schema))
    brace, brace_quote = tokenizer.convert_tokens_to_ids("{"), tokenizer.encode('{"')[0]
    assert guide.forced() and guide.allows(brace) and brace_quote != brace
    assert brace not in set(guide.allowed_ids().tolist())
    logits = torch.zeros((1, compiler.vocab_size))
    logits[0, brace], logits[0, brace_quote] = 5.0, 4.0
    seq = Sequence("j", 0, [1], SamplingParams(temperature=0.0))
    seq.guide = guide
    assert Sampler(compiler.vocab_size, torch.device("cpu"))(logits, [seq]).token_ids == [brace_quote]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_bitmask_on_cuda_logits():
    logits = torch.zeros((2, 40), device="cuda")
    bitmask = torch.tensor([[1 << 4, 0]], dtype=torch.int32)
    masked = apply_token_bitmask_(logits, [0], bitmask)
    assert torch.isfinite(masked[0]).nonzero().flatten().tolist() == [4]
    assert torch.isfinite(masked[1]).all()
