"""The batched sampler: its filters against a per-row reading of the semantics, the draw's
distribution (unseeded and seeded), seeded rows independent of the batch, greedy and
min_tokens rows."""

from __future__ import annotations

import pytest
import torch

from executor_svc.engine.sampler import (
    draw_key,
    filter_logits,
    sample,
    seeded_exponential_triton,
)
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
    seq = Sequence("r", [1, 2], 2, opts, [], max_tokens=100)
    seq.token_ids += [5] * done
    return seq


@pytest.mark.parametrize("seeded", [False, True])
def test_draws_follow_the_filtered_distribution(seeded):
    """20,000 rows of one distribution (temperature 0.5, top-p 0.95): token frequencies within
    4 standard errors of the softmax of the filtered logits; filtered tokens never drawn.
    Seeded: every row its own seed (the Philox draws of the seeded rows' kernel)."""
    torch.manual_seed(1)
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -4.0])
    n = 20_000
    seqs = [_seq(temperature=0.5, top_p=0.95, seed=i if seeded else None) for i in range(n)]
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
    assert draws == [alone] * 5  # five requests of one seed at one token: five equal draws


def test_seeded_draws_are_keyed_by_seed_and_token_index():
    """A request's n-th token is drawn from (seed, n) alone: another index or seed draws
    otherwise (flat logits: each row a uniform pick of 1,000 tokens)."""
    flat = torch.zeros(1, 1000)
    first = [sample(flat.clone(), [_seq(temperature=1.0, seed=s)], [])[0] for s in range(8)]
    later = [sample(flat.clone(), [_seq(temperature=1.0, seed=s, done=3)], [])[0] for s in range(8)]
    again = [sample(flat.clone(), [_seq(temperature=1.0, seed=s, done=3)], [])[0] for s in range(8)]
    assert later == again
    assert first != later and len(set(first)) > 4
    keys = {draw_key(seed, n) for seed in (0, 1, 2**32, -1, 2**40 + 5) for n in (0, 1, 2**31 - 1)}
    assert len(keys) == 15 and all(0 <= k < 2**63 for k in keys)


def test_seeded_exponential_kernel_draws_exp1_by_key():
    """The CUDA path's Philox kernel (interpreted here): Exp(1) draws (mean and variance 1
    within ~8 standard errors over 160,000), a row's draws fixed by its key alone, the rows
    it is not given left untouched."""
    race = torch.full((10, 20_000), -1.0)
    seeded_exponential_triton(race, [0, 2, 3, 4, 5, 6, 7, 9], [11, 12, 13, 14, 15, 16, 17, 11])
    drawn = race[[0, 2, 3, 4, 5, 6, 7]]
    assert (drawn >= 0).all() and torch.isfinite(drawn).all()
    assert abs(drawn.mean().item() - 1) < 0.02 and abs(drawn.var().item() - 1) < 0.05
    assert torch.equal(race[0], race[9])  # one key, one draw, in any row
    assert not torch.equal(race[2], race[3])
    assert (race[[1, 8]] == -1).all()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_greedy_rows_and_min_tokens(temperature):
    logits = torch.tensor([[0.0, 9.0, 1.0, 0.5], [3.0, 0.0, 0.0, 0.0]])
    seqs = [_seq(min_tokens=3, done=1), _seq(temperature=temperature, top_k=1)]
    tokens = sample(logits.clone(), seqs, eos_ids=[1])
    assert tokens[0] == 2  # EOS (1) banned until min_tokens; the next best is greedy's pick
    assert tokens[1] == 0  # greedy, or top-1 whatever the temperature
