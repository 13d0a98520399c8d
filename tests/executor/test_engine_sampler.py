"""The batched sampler: its filters against a per-row reading of the semantics, the draw's
distribution, seeded rows independent of the batch, greedy and min_tokens rows."""

from __future__ import annotations

import pytest
import torch

from executor_svc.engine.sampler import filter_logits, make_generator, sample
from executor_svc.engine.sequence import Sequence
from executor_svc.engine.types import SamplingOptions


def _filter_one(x: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """One row, as the semantics read (the sampler's previous per-row code)."""
    if 0 < top_k < x.shape[-1]:
        kth = torch.topk(x, top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = sorted_x.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p
        x = x.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return x


def test_filters_equal_the_per_row_semantics():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 50, generator=g) * 3
    x[3, :10] = x[3, 10]  # ties at the k-th value are kept
    x[4, 7] = float("-inf")  # a banned token stays banned
    top_k = [0, 1, 5, 12, 3, 50, 70, 0, 2]
    top_p = [1.0, 1.0, 0.9, 1.0, 0.5, 0.3, 0.99, 0.05, 1.0]
    # the sampler's encoding: k - 1 (V - 1 and p = inf keep every token)
    k_arg = torch.tensor([(k if 0 < k < 50 else 50) - 1 for k in top_k])
    p_arg = torch.tensor([p if p < 1 else float("inf") for p in top_p])
    for ks, ps in ((k_arg, p_arg), (k_arg, None), (None, p_arg)):
        got = filter_logits(x, ks, ps)
        for i in range(x.shape[0]):
            want = _filter_one(x[i], top_k[i] if ks is not None else 0,
                               top_p[i] if ps is not None else 1.0)  # fmt: skip
            assert torch.equal(got[i] == float("-inf"), want == float("-inf")), f"row {i}"
            kept = want != float("-inf")
            assert torch.equal(got[i][kept], x[i][kept])
    assert filter_logits(x, None, None) is x


def _seq(temperature=0.0, top_k=0, top_p=1.0, seed=None, min_tokens=0, done=0) -> Sequence:
    opts = SamplingOptions(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                           min_tokens=min_tokens)  # fmt: skip
    gen = make_generator(seed, torch.device("cpu")) if seed is not None else None
    seq = Sequence("r", [1, 2], 2, opts, [], max_tokens=100, generator=gen)
    seq.token_ids += [5] * done
    return seq


def test_draws_follow_the_filtered_distribution():
    """20,000 rows of one distribution (temperature 0.5, top-p 0.95): token frequencies within
    4 standard errors of the softmax of the filtered logits; filtered tokens never drawn."""
    torch.manual_seed(1)
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -4.0])
    n = 20_000
    seqs = [_seq(temperature=0.5, top_p=0.95) for _ in range(n)]
    tokens = torch.tensor(sample(base.repeat(n, 1), seqs, eos_ids=[]))
    p = filter_logits(base[None] / 0.5, None, torch.tensor([0.95]))[0].softmax(-1)
    freq = torch.bincount(tokens, minlength=6).double() / n
    se = (p * (1 - p) / n).sqrt().double()
    assert p[-1] == 0 and freq[-1] == 0
    assert ((freq - p.double()).abs() <= 4 * se + 1e-12).all(), (freq, p)


def test_seeded_rows_draw_the_same_alone_and_in_any_batch():
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(2))
    alone = sample(logits[2:3].clone(), [_seq(temperature=1.0, seed=7)], eos_ids=[])[0]
    batch = [_seq(temperature=0.8), _seq(), _seq(temperature=1.0, seed=7),
             _seq(temperature=1.2, top_k=3), _seq(temperature=1.0, seed=9)]  # fmt: skip
    assert sample(logits.clone(), batch, eos_ids=[])[2] == alone
    again = [_seq(temperature=1.0, seed=7) for _ in range(5)]
    draws = sample(logits[2:3].repeat(5, 1), again, eos_ids=[])
    assert draws == [alone] * 5  # five generators of one seed: five equal draws


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_greedy_rows_and_min_tokens(temperature):
    logits = torch.tensor([[0.0, 9.0, 1.0, 0.5], [3.0, 0.0, 0.0, 0.0]])
    seqs = [_seq(min_tokens=3, done=1), _seq(temperature=temperature, top_k=1)]
    tokens = sample(logits.clone(), seqs, eos_ids=[1])
    assert tokens[0] == 2  # EOS (1) banned until min_tokens; the next best is greedy's pick
    assert tokens[1] == 0  # greedy, or top-1 whatever the temperature
