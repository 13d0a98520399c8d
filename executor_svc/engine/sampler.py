"""Per-request sampling: greedy, temperature, top-k, top-p, seeded generators, min_tokens.

Greedy rows share one argmax over the batch; other rows are sampled one by one with the
request's own ``torch.Generator``, so a seeded request draws the same tokens whether it runs
alone or in any batch.
"""

from __future__ import annotations

import torch

from executor_svc.engine.sequence import Sequence


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits: [V] (already divided by the temperature); masks outside top-k / top-p."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (keeps at least one)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, seqs: list[Sequence], eos_ids: list[int]) -> list[int]:
    """logits: [S, V] float32, one row per sampling sequence -> one token id per row."""
    if eos_ids:
        ban = [i for i, s in enumerate(seqs) if s.num_completion_tokens < s.sampling.min_tokens]
        if ban:
            rows = torch.tensor(ban, device=logits.device)
            logits[rows.unsqueeze(1), torch.tensor(eos_ids, device=logits.device)] = float("-inf")
    tokens = logits.argmax(-1)
    for i, s in enumerate(seqs):
        if s.sampling.temperature > 0:
            row = _filter(logits[i] / s.sampling.temperature, s.sampling.top_k, s.sampling.top_p)
            tokens[i] = torch.multinomial(row.softmax(-1), 1, generator=s.generator)[0]
    return tokens.tolist()
