"""The sampler on hand-made logits: the right distribution, nuclei respected, seeds honoured."""

import math

import torch

from rillet.engine.sampler import Sampler
from rillet.engine.sequence import Sequence
from rillet.sampling_params import SamplingParams


def seqs(n, **params):
    return [Sequence(f"r{i}", 0, [1, 2, 3], SamplingParams(**params)) for i in range(n)]


def test_samples_follow_the_softmax_and_never_pick_a_masked_token():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0, 0.0, 0.0, 0.0])
    logits = probs.clamp(min=1e-30).log().expand(20000, -1).clone()
    logits[:, 4:] = -float("inf")
    tokens = Sampler(8, torch.device("cpu"), seed=1)(logits, seqs(20000, temperature=1.0)).token_ids
    counts = torch.bincount(torch.tensor(tokens), minlength=8).double() / len(tokens)
    assert counts[4:].sum() == 0
    for p, f in zip(probs[:4].tolist(), counts[:4].tolist()):
        assert abs(p - f) < 4 * math.sqrt(p * (1 - p) / 20000) + 1e-3, (p, f)


def test_top_p_keeps_the_nucleus_in_the_candidate_and_the_full_sort_paths():
    # Row 0: peaked, its nucleus found among the first candidates. Row 1: flat over 10,000 tokens,
    # its nucleus (90% of them) wider than every candidate width, so the full sort decides.
    V = 10_000
    logits = torch.full((2, V), -50.0)
    logits[0, :3] = torch.tensor([3.0, 2.0, 1.0])  # p = 0.665, 0.245, 0.090 (rest ~0)
    logits[1] = 0.0
    sampler = Sampler(V, torch.device("cpu"), seed=2)
    seen0, seen1 = set(), []
    for _ in range(300):
        out = sampler(logits, seqs(2, temperature=1.0, top_p=0.8)).token_ids
        seen0.add(out[0])
        seen1.append(out[1])
    assert seen0 == {0, 1}  # 0.665 < 0.8 <= 0.665 + 0.245: the third token is outside
    # Flat row: every token is tied, so all stay (ties with the least likely kept token are kept).
    assert len(set(seen1)) > 250
    probs = torch.softmax(torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]), dim=-1)
    kept = Sampler._top_p(probs, torch.tensor([0.9]))
    assert (kept[0] > 0).tolist() == [True, True, True, False, False]  # 0.64 + 0.24 < 0.9 <= + 0.09


def test_a_seeded_row_draws_the_same_tokens_whatever_its_batch_mates():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0))

    def run(mates):
        sampler = Sampler(50, torch.device("cpu"), seed=123)
        seq = Sequence("s", 0, [1], SamplingParams(temperature=1.0, seed=7), seed=7)  # as the engine seeds it
        others = seqs(mates, temperature=1.0)
        return [sampler(logits.expand(1 + mates, -1), [seq] + others).token_ids[0] for _ in range(30)]

    alone = run(0)
    assert run(5) == alone and run(17) == alone
    assert len(set(alone)) > 3  # it does sample


# ---- behaviour of top_k, min_p and the penalties (not only their plumbing)

N_DRAWS = 20000


def draw(logits_row, n=N_DRAWS, seed=3, make=None, **params):
    """Token counts of n seeded draws from one row of logits (one row per draw, one step)."""
    V = logits_row.shape[-1]
    if make is None:
        shared = SamplingParams(**params)  # one object for the batch: building 20,000 costs seconds
        batch = [Sequence(f"r{i}", 0, [1, 2, 3], shared) for i in range(n)]
    else:
        batch = make(n)
    tokens = Sampler(V, torch.device("cpu"), seed=seed)(logits_row.expand(n, -1).clone(), batch).token_ids
    return torch.bincount(torch.tensor(tokens), minlength=V).double()


def assert_frequencies(counts, expected):
    """Each token's frequency within 4.5 binomial standard deviations of its expected probability."""
    n = counts.sum().item()
    for token, p in enumerate(expected.tolist()):
        f = counts[token].item() / n
        if p == 0.0:
            assert counts[token] == 0, f"token {token} (probability 0) drawn {int(counts[token])} times"
        else:
            assert abs(f - p) < 4.5 * math.sqrt(p * (1 - p) / n) + 1e-9, (token, p, f)


LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0])


def test_top_k_draws_only_the_k_most_likely_at_their_renormalised_probabilities():
    for k, temperature in ((1, 1.0), (2, 1.0), (3, 0.7), (5, 1.3)):
        probs = torch.softmax(LOGITS / temperature, dim=-1)
        expected = torch.zeros_like(probs)
        expected[:k] = probs[:k] / probs[:k].sum()  # LOGITS are sorted: the first k are the most likely
        counts = draw(LOGITS, top_k=k, temperature=temperature)
        assert set(counts.nonzero().flatten().tolist()) == set(range(k)), k
        assert_frequencies(counts, expected)
    # a shuffled vocabulary: the k most likely wherever they are
    order = torch.randperm(8, generator=torch.Generator().manual_seed(1))
    counts = draw(LOGITS[order], top_k=2)
    assert set(counts.nonzero().flatten().tolist()) == {int((order == 0).nonzero()), int((order == 1).nonzero())}


def test_min_p_cuts_tokens_below_min_p_times_the_top_probability():
    probs = torch.softmax(LOGITS, dim=-1)
    for min_p in (0.1, 0.3, 0.5):
        kept = probs >= min_p * probs.max()  # vLLM: p < min_p * p_max is removed
        expected = torch.where(kept, probs, 0.0)
        expected /= expected.sum()
        counts = draw(LOGITS, min_p=min_p)
        assert set(counts.nonzero().flatten().tolist()) == set(kept.nonzero().flatten().tolist()), min_p
        assert_frequencies(counts, expected)
    # with temperature the cut is on the tempered distribution (temperature first, as vLLM)
    tempered = torch.softmax(LOGITS / 2.0, dim=-1)
    kept = tempered >= 0.5 * tempered.max()
    counts = draw(LOGITS, min_p=0.5, temperature=2.0)
    assert set(counts.nonzero().flatten().tolist()) == set(kept.nonzero().flatten().tolist())


def _seq(prompt, output, **params):
    seq = Sequence("r", 0, list(prompt), SamplingParams(**params))
    seq.output_token_ids = list(output)
    return seq


def test_penalties_change_the_logits_as_vllm_defines_them():
    V = 8
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0, 0.0, 3.0, -2.0, 1.5]])
    sampler = Sampler(V, torch.device("cpu"))

    def apply(seq):
        return sampler._apply_biases_and_penalties(logits.clone(), [seq])[0]

    # repetition: every token of the prompt and the output; positive logits divided, negative multiplied
    out = apply(_seq([0, 1], [2, 2], repetition_penalty=2.0))
    assert out.tolist() == [1.0, -2.0, 0.25, 1.0, 0.0, 3.0, -2.0, 1.5]
    # frequency: minus penalty x count, presence: minus penalty once; output tokens only, not the prompt
    out = apply(_seq([0, 5], [2, 2, 2, 3], frequency_penalty=0.5))
    assert out.tolist() == [2.0, -1.0, 0.5 - 1.5, 1.0 - 0.5, 0.0, 3.0, -2.0, 1.5]
    out = apply(_seq([0, 5], [2, 2, 2, 3], presence_penalty=0.75))
    assert out.tolist() == [2.0, -1.0, 0.5 - 0.75, 1.0 - 0.75, 0.0, 3.0, -2.0, 1.5]
    # negative penalties reward instead (OpenAI allows [-2, 2])
    out = apply(_seq([0], [3], frequency_penalty=-1.0, presence_penalty=-0.5))
    assert out[3].item() == 1.0 + 1.5


def test_a_penalised_token_is_drawn_less_often_as_its_probability_falls():
    logits = torch.tensor([1.0, 1.0, 1.0, 1.0])  # uniform before penalties
    cases = [
        (dict(repetition_penalty=3.0), [1.0 / 3.0, 1.0, 1.0, 1.0]),  # token 0 seen (in the output)
        (dict(frequency_penalty=0.4), [1.0 - 3 * 0.4, 1.0, 1.0, 1.0]),  # token 0 three times
        (dict(presence_penalty=1.0), [0.0, 1.0, 1.0, 1.0]),
    ]
    for params, penalised in cases:
        expected = torch.softmax(torch.tensor(penalised), dim=-1)
        assert expected[0] < 0.25 - 0.05  # it does fall, from 1/4
        # 4,000 draws: the penalties are applied row by row, a 20,000-row batch takes seconds
        counts = draw(logits, n=4000, make=lambda n: [_seq([2], [0, 0, 0], temperature=1.0, **params)
                                                      for _ in range(n)])
        assert counts[0] / counts.sum() < 0.25 - 0.04, params
        # prompt token 2 is not penalised by frequency/presence; repetition penalises it too
        if "repetition_penalty" in params:
            expected = torch.softmax(torch.tensor([1 / 3, 1.0, 1 / 3, 1.0]), dim=-1)
        assert_frequencies(counts, expected)


def test_sample_ids_takes_the_forward_pass_argmax_for_greedy_rows_only():
    # A decode graph takes each row's argmax with its logits (ModelRunner.greedy_ids). Given one,
    # greedy rows use it and launch nothing; sampled rows still sample; a wider row than the
    # sampler's vocabulary (its argmax could be past it) is not trusted.
    V = 8
    logits = torch.full((3, V), -50.0)
    logits[:, 2] = 5.0  # the true argmax of every row
    taken = torch.tensor([6, 6, 6])  # stands for the graph's argmax: a token the logits do not pick
    sampler = Sampler(V, torch.device("cpu"), seed=3)
    assert sampler.sample_ids(logits, seqs(3, temperature=0.0), taken).tolist() == [6, 6, 6]
    assert sampler.sample_ids(logits, seqs(3, temperature=0.0)).tolist() == [2, 2, 2]
    rows = seqs(1, temperature=0.0) + seqs(2, temperature=1.0)
    assert sampler.sample_ids(logits, rows, taken).tolist() == [6, 2, 2]  # the sampled rows: p(2) ~ 1
    wider = torch.cat([logits, torch.full((3, 4), -50.0)], dim=1)
    assert sampler.sample_ids(wider, seqs(3, temperature=0.0), taken).tolist() == [2, 2, 2]


def test_min_tokens_masks_eos_and_stop_tokens_until_reached_and_keeps_the_row_step_by_step():
    # vLLM's rule: while a row has fewer output tokens than min_tokens, EOS (unless ignore_eos)
    # and its stop_token_ids cannot be drawn; other rows and other tokens are untouched.
    V = 8
    logits = torch.zeros((4, V))
    logits[:, 1] = 9.0  # EOS, every row's argmax
    logits[:, 5] = 8.0  # a stop token
    logits[:, 3] = 7.0
    sampler = Sampler(V, torch.device("cpu"), eos_token_ids=[1])
    rows = [_seq([0], [4], temperature=0.0, min_tokens=3, stop_token_ids=[5]),      # 1 of 3: held
            _seq([0], [4, 4, 4], temperature=0.0, min_tokens=3, stop_token_ids=[5]),  # reached
            _seq([0], [], temperature=0.0, min_tokens=3, ignore_eos=True),             # EOS not an end
            _seq([0], [], temperature=0.0)]
    assert sampler(logits, rows).token_ids == [3, 1, 1, 1]
    masked = sampler._apply_biases_and_penalties(logits, rows)
    assert masked[0, 1] == masked[0, 5] == -math.inf and masked[0, 3] == 7.0
    assert masked[1:].tolist() == logits[1:].tolist()
    assert not Sampler.defers(rows[0]) and Sampler.defers(rows[1]) and Sampler.defers(rows[3])
    # sampled rows never draw a masked token
    hot = [_seq([0], [], temperature=1.0, min_tokens=2, stop_token_ids=[5]) for _ in range(500)]
    drawn = sampler(torch.zeros((500, V)), hot).token_ids
    assert 1 not in drawn and 5 not in drawn and len(set(drawn)) == V - 2
