"""Per-request sampling: greedy, temperature, top-k, top-p, seeds, min_tokens, in batch.

Semantics, per sampling row i (one per sequence that samples this step):
    logits[i, eos] = -inf                     while the request is short of min_tokens
    temperature == 0: token = argmax(logits[i])
    else:
        x = logits[i] / temperature
        top_k > 0:  x[x < (k-th largest of x)] = -inf           (ties with it are kept)
        top_p < 1:  in descending order, drop every token whose preceding mass already
                    reaches top_p (the first always stays)
        token ~ softmax(x)

The sampled rows are filtered together (one sort of the step's sampled rows, per-row k and
p as tensors) and drawn by the exponential race: argmax(p / E) with E ~ Exp(1) i.i.d. picks
token j with probability p_j, like a multinomial draw. A seeded request draws its E from its
own ``torch.Generator`` (one small launch per seeded row), so it gets the same tokens alone or
in any batch; the other rows share one draw from the device's default generator. The
previous per-row loop (topk, sort, softmax, multinomial per row) issued ~18 ATen ops a sampled
row (1,156 for 64 rows; bench/sampler_bench.py), each a launch on CUDA: at 64 sampled
requests, more host time a decode step than the GPU's.
"""

from __future__ import annotations

import torch

from executor_svc.engine.sequence import Sequence


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """A seeded request's own generator (its draws do not depend on the batch)."""
    return torch.Generator(device=device).manual_seed(seed)


def filter_logits(
    x: torch.Tensor, kth: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """x: [S, V] logits already divided by each row's temperature. kth: [S] int64, each row's
    k - 1 for top-k (V - 1 keeps every token), or None when no row cuts; top_p: [S] float32
    (inf keeps every token), or None when no row cuts. Returns x with the tokens outside each
    row's top-k and top-p set to -inf (see the module docstring). One sort serves both."""
    if kth is None and top_p is None:
        return x
    sorted_x, order = x.sort(-1, descending=True)
    if kth is not None:  # below the k-th largest value (ties with it stay)
        least = sorted_x.gather(1, kth[:, None])
        if top_p is None:
            return x.masked_fill(x < least, float("-inf"))
        sorted_x = sorted_x.masked_fill(sorted_x < least, float("-inf"))
    probs = sorted_x.softmax(-1)
    drop = (probs.cumsum(-1) - probs >= top_p[:, None]) | (sorted_x == float("-inf"))
    return x.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def sample(logits: torch.Tensor, seqs: list[Sequence], eos_ids: list[int]) -> list[int]:
    """logits: [S, V] float32, one row per sampling sequence -> one token id per row."""
    dev, vocab = logits.device, logits.shape[-1]
    if eos_ids:
        ban = [i for i, s in enumerate(seqs) if s.num_completion_tokens < s.sampling.min_tokens]
        if ban:
            rows = torch.tensor(ban, device=dev)
            logits[rows.unsqueeze(1), torch.tensor(eos_ids, device=dev)] = float("-inf")
    drawn = [i for i, s in enumerate(seqs) if s.sampling.temperature > 0]
    if not drawn:
        return logits.argmax(-1).tolist()
    opts = [seqs[i].sampling for i in drawn]
    everyone = len(drawn) == len(seqs)
    rows = None if everyone else torch.tensor(drawn, device=dev)
    x = logits if everyone else logits[rows]
    ks = [o.top_k if 0 < o.top_k < vocab else vocab for o in opts]  # vocab: no cut
    ps = [o.top_p if o.top_p < 1.0 else float("inf") for o in opts]  # inf: no cut
    # per row: temperature, k - 1, p; one copy to the device
    params = torch.tensor(
        [(o.temperature, k - 1, p) for o, k, p in zip(opts, ks, ps, strict=True)], device=dev
    )
    cut_k = any(k < vocab for k in ks)
    cut_p = any(p != float("inf") for p in ps)
    x = filter_logits(
        x / params[:, :1],
        params[:, 1].long() if cut_k else None,
        params[:, 2] if cut_p else None,
    )
    probs = x.softmax(-1)
    race = torch.empty_like(probs)
    seeded = [(j, seqs[i].generator) for j, i in enumerate(drawn) if seqs[i].generator is not None]
    if len(seeded) < len(drawn):
        race.exponential_()
    for j, gen in seeded:
        race[j].exponential_(generator=gen)
    picked = (probs / race.clamp_min(1e-20)).argmax(-1)
    if everyone:
        return picked.tolist()
    tokens = logits.argmax(-1)
    tokens[rows] = picked
    return tokens.tolist()
