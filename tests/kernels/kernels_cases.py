"""Random LoRA batches for the kernel tests: shapes, ranks, K and adapter popularity."""

from __future__ import annotations

from dataclasses import dataclass

import torch

POPULARITY = ("all_distinct", "uniform", "zipf", "identical", "one_hot")

# (dtype, atol, rtol) for y (values of order 1). The GPU rounds the rank-r intermediate to the
# weights' dtype before the up-projection (as PEFT does) and y once at the end.
DTYPES = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (6e-2, 2e-2),
}


@dataclass
class Batch:
    x: torch.Tensor
    y: torch.Tensor
    lora_a: list[torch.Tensor]
    lora_b: list[torch.Tensor]
    ranks: torch.Tensor
    scales: torch.Tensor
    token_slots: torch.Tensor  # [T, K] int32 (CPU), raw plan as an executor would pass it
    token_weights: torch.Tensor
    num_slots: int


def _draw_slots(gen: torch.Generator, t: int, k: int, num_slots: int, pop: str) -> torch.Tensor:
    if t * k == 0:
        return torch.zeros(t, k, dtype=torch.long)
    if pop == "all_distinct":
        base = (
            torch.randperm(num_slots, generator=gen)[: t * k]
            if t * k <= num_slots
            else torch.arange(t * k) % num_slots
        )
        return base.view(t, k)
    if pop == "identical":
        return torch.full((t, k), int(torch.randint(num_slots, (1,), generator=gen)))
    if pop == "uniform":
        p = torch.ones(num_slots)
    elif pop == "zipf":
        p = 1.0 / torch.arange(1, num_slots + 1).double() ** 1.2
    elif pop == "one_hot":  # one hot adapter, 10% noise
        p = torch.full((num_slots,), 0.1 / max(1, num_slots - 1)).double()
        p[0] = 0.9
    else:
        raise ValueError(pop)
    return torch.multinomial(p.float(), t * k, replacement=True, generator=gen).view(t, k)


def make_batch(
    *,
    tokens: int,
    in_features: int,
    outs: list[int],
    r_max: int,
    num_slots: int,
    k: int = 1,
    popularity: str = "uniform",
    dtype: torch.dtype = torch.float32,
    mixed_ranks: tuple[int, ...] | None = None,
    base_only_frac: float = 0.1,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> Batch:
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(dtype).to(device)

    n = len(outs)
    slots = _draw_slots(gen, tokens, k, num_slots, popularity).to(torch.int32)
    weights = torch.rand(tokens, k, generator=gen) + 0.1
    if k > 1:  # some tokens carry fewer adapters
        drop = torch.rand(tokens, k, generator=gen) < 0.25
        drop[:, 0] = False
        slots[drop] = -1
    base_only = torch.rand(tokens, generator=gen) < base_only_frac
    slots[base_only] = -1
    if mixed_ranks is None:
        ranks = torch.full((n, num_slots), r_max, dtype=torch.int32)
    else:
        choice = torch.randint(len(mixed_ranks), (n, num_slots), generator=gen)
        ranks = torch.tensor(mixed_ranks, dtype=torch.int32)[choice]
    return Batch(
        x=rnd(tokens, in_features),
        y=rnd(tokens, sum(outs)),
        lora_a=[rnd(num_slots, r_max, in_features, std=in_features**-0.5) for _ in outs],
        lora_b=[rnd(num_slots, o, r_max, std=r_max**-0.5) for o in outs],
        ranks=ranks.to(device),
        scales=(torch.rand(n, num_slots, generator=gen) + 0.5).to(device),
        token_slots=slots,
        token_weights=weights,
        num_slots=num_slots,
    )


def linear_weights(
    n_out: int, in_features: int, dtype: torch.dtype, device, seed: int = 5
) -> tuple[torch.Tensor, torch.Tensor]:
    """A base projection's random weight [n_out, in] (std 1/8) and bias [n_out]."""
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(n_out, in_features, generator=gen) / 8).to(dtype).to(device)
    bias = torch.randn(n_out, generator=gen).to(dtype).to(device)
    return weight, bias
