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
