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
token j with probability p_j, like a multinomial draw. The unseeded rows share one draw from
the device's default generator. A seeded request's E for its n-th completion token comes from
a generator keyed by (seed, n) (on CUDA Philox in ``_seeded_exponential_kernel``, one launch
for every seeded row of the step), so it gets the same tokens alone or in any batch, after a
preemption too. With a ``torch.Generator`` per seeded request, each seeded row was a launch of
its own: 64 seeded rows took 2.2 ms a step on the H100 against 0.8 ms unseeded
(docs/benchmarks.md, tenth pass). The previous per-row loop (topk, sort, softmax, multinomial
per row) issued ~18 ATen ops a sampled row (1,156 for 64 rows; bench/sampler_bench.py), each a
launch on CUDA: at 64 sampled requests, more host time a decode step than the GPU's.
"""

from __future__ import annotations

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from executor_svc.engine.sequence import Sequence  # noqa: E402
from kernels._launch import Launcher  # noqa: E402

_DRAW_BLOCK = 1024


@triton.jit
def _seeded_exponential_kernel(out, keys, rows, stride, vocab, BLOCK: tl.constexpr):
    """out[rows[i], j] = -log(1 - u), u = Philox uniform of key keys[i] and counter j."""
    i = tl.program_id(0)
    key = tl.load(keys + i)
    row = tl.load(rows + i).to(tl.int64)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        u = tl.rand(key, cols)
        tl.store(out + row * stride + cols, -tl.log(1.0 - u), mask=cols < vocab)


_launch_seeded_exponential = Launcher(_seeded_exponential_kernel)


def _mix32(x: int) -> int:
    """splitmix64's finaliser, low 32 bits: nearby inputs give unrelated outputs."""
    z = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0xFFFFFFFF


def draw_key(seed: int, draw: int) -> int:
    """Philox key of a seeded request's ``draw``-th token: the seed mixed down to 32 bits in
    the low half (seeds near each other do not share a key), the draw's index in the high half
    (int64, non-negative)."""
    return ((draw & 0x7FFFFFFF) << 32) | _mix32(seed)


def seeded_exponential(race: torch.Tensor, rows: list[int], keys: list[int]) -> None:
    """Fill ``race[rows[i]]`` (a [S, V] float32 tensor) with Exp(1) draws keyed by ``keys[i]``;
    the other rows are left as they are. On CUDA one launch (Philox in the kernel); on the CPU,
    which has no launches to save, a ``torch.Generator`` per row seeded with its key (other
    numbers than the GPU's, the same independence of the batch)."""
    if not rows:
        return
    if not race.is_cuda:
        for row, key in zip(rows, keys, strict=True):
            # the CPU generator (mt19937) keeps 32 bits of its seed: the key's both halves
            race[row].exponential_(generator=torch.Generator().manual_seed(_mix32(key)))
        return
    seeded_exponential_triton(race, rows, keys)


def seeded_exponential_triton(race: torch.Tensor, rows: list[int], keys: list[int]) -> None:
    """``seeded_exponential``'s kernel path (the tests also run it interpreted on the CPU)."""
    # keys and rows in one copy, each row of the pair an even length so that both start
    # 16-byte aligned (one compiled variant whatever the count)
    pad = [0] * (len(rows) % 2)
    meta = torch.tensor([keys + pad, rows + pad], dtype=torch.int64)
    meta = meta.to(race.device, non_blocking=True)
    _launch_seeded_exponential(
        (len(rows),),
        (race, meta[0], meta[1], race.stride(0), race.shape[1]),
        {"BLOCK": _DRAW_BLOCK},
        {"num_warps": 4},
    )


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
    seeded = [j for j, o in enumerate(opts) if o.seed is not None]
    if len(seeded) < len(drawn):
        race.exponential_()
    keys = [draw_key(opts[j].seed, seqs[drawn[j]].num_completion_tokens) for j in seeded]
    seeded_exponential(race, seeded, keys)
    picked = (probs / race.clamp_min(1e-20)).argmax(-1)
    if everyone:
        return picked.tolist()
    tokens = logits.argmax(-1)
    tokens[rows] = picked
    return tokens.tolist()
