"""Per-step index buffers for the LoRA kernels: :class:`LoraBatchMeta` and its builder.

The builder runs once per engine step on the host (numpy), moves everything to the device in
two copies, and every LoRA layer of the step reuses the result; the kernels themselves never
look at host data, so ``add_lora`` needs no host synchronisation and can be captured in a CUDA
graph.

The kernels walk *tiles*: runs of at most ``block_m`` tokens that carry the same plan (the same
tuple of slots; weights may differ per token). Tokens are sorted so that equal plans are
adjacent (the SGMV idea of Punica, Chen et al. 2023, and S-LoRA's segments, Sheng et al.
2023), so a tile loads each of its adapters' weights once and feeds them to the tensor cores,
and a token with several adapters is handled by a single program: y is written once per token,
without atomics, whatever K is. With all tokens on different adapters a tile is one token
(the BGMV case); with one adapter per request a tile is ``block_m`` tokens (the SGMV case).
Tokens without an adapter are sorted last and belong to no tile: they cost nothing.

Running example (``block_m=2`` to keep it short; the kernels use 16 or more), T=6, K=2, 4 slots::

    plan per token (slot, weight):  t0 [(2, 1.0)]   t1 []   t2 [(0, .5), (2, .5)]
                                    t3 [(2, 1.0)]   t4 [(2, 1.0)]   t5 [(2, .3), (0, .7)]
    input token_slots   = [[2,-1], [-1,-1], [0,2], [2,-1], [2,-1], [2,0]]
    input token_weights = [[1, 0], [ 0, 0], [.5,.5], [1, 0], [1, 0], [.3,.7]]

    token_slots    = [[2,-1], [-1,-1], [0,2], [2,-1], [2,-1], [0,2]]   # per token: slots
    token_weights  = [[1, 0], [ 0, 0], [.5,.5], [1, 0], [1, 0], [.7,.3]]  # ascending, -1 last
    sorted_tokens  = [2, 5, 0, 3, 4, 1]          # plan (0,2) first, then (2,-1); t1 is base-only
    sorted_weights = [[.5,.5], [.7,.3], [1,0], [1,0], [1,0], [0,0]]   # token_weights[sorted_tokens]
    tile_start     = [0, 2, 4]                   # rows of sorted_tokens
    tile_len       = [2, 2, 1]                   # plan (2,-1) has 3 tokens: split 2 + 1
    tile_slots     = [[0,2], [2,-1], [2,-1]]     # the plan shared by the tile's tokens
    num_active = 5, num_tiles = 3, grid_tiles = 3 (or pad_tiles_to, padded tiles have len 0)

Duplicated slots in one token are merged (weights summed); zero weights are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

MAX_K = 4  # adapters per token; MeteoRA uses top-2, LoraRetriever mixtures up to 3 or 4.


@dataclass(slots=True)
class LoraBatchMeta:
    """Index buffers of one engine step, shared by every LoRA layer (see the module example).

    All tensors live on ``device``; the ints are host values known when the step is built.
    """

    token_slots: torch.Tensor  # [T, K] int32, slot per (token, adapter), -1 = none
    token_weights: torch.Tensor  # [T, K] float32 mixture weights, 0 where slot == -1
    sorted_tokens: torch.Tensor  # [T] int32, tokens grouped by plan, base-only tokens last
    sorted_weights: torch.Tensor  # [T, K] float32, token_weights[sorted_tokens]
    tile_start: torch.Tensor  # [G] int32, first row (index into sorted_tokens) of each tile
    tile_len: torch.Tensor  # [G] int32, rows in the tile (0 for padding tiles)
    tile_slots: torch.Tensor  # [G, K] int32, slots shared by all tokens of the tile
    num_tokens: int
    max_k: int
    num_slots: int
    num_active: int  # tokens with at least one adapter
    num_tiles: int  # real tiles; the first num_tiles rows of the tile buffers
    grid_tiles: int  # G, the programs launched along the tile axis
    block_m: int  # most tokens per tile, the kernels' BLOCK_M

    @property
    def device(self) -> torch.device:
        return self.token_slots.device


def _normalize(slots: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge duplicated slots, drop zero weights, sort each token's slots ascending (-1 last)."""
    s, w = slots.copy(), weights.copy()
    s[s < 0] = -1
    w[s < 0] = 0.0
    k = s.shape[1]
    for i in range(k):
        for j in range(i + 1, k):
            dup = (s[:, j] == s[:, i]) & (s[:, i] >= 0)
            w[dup, i] += w[dup, j]
            s[dup, j], w[dup, j] = -1, 0.0
    s[w == 0.0] = -1
    w[s < 0] = 0.0
    key = np.where(s < 0, np.iinfo(np.int32).max, s)
    order = np.argsort(key, axis=1, kind="stable")
    return np.take_along_axis(s, order, 1), np.take_along_axis(w, order, 1)


def _tiles(plans: np.ndarray, block_m: int) -> tuple[np.ndarray, np.ndarray]:
    """Split runs of equal plans (rows of ``plans``, already grouped) into tiles of <= block_m."""
    n = plans.shape[0]
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    change = np.ones(n, dtype=bool)
    change[1:] = (plans[1:] != plans[:-1]).any(axis=1)
    g_start = np.flatnonzero(change)
    g_len = np.diff(np.append(g_start, n))
    per_group = -(-g_len // block_m)
    first_tile = np.repeat(np.cumsum(per_group) - per_group, per_group)
    within = np.arange(per_group.sum()) - first_tile
    start = np.repeat(g_start, per_group) + within * block_m
    end = np.repeat(g_start + g_len, per_group)
    return start, np.minimum(block_m, end - start)


def build_lora_meta(
    token_slots: torch.Tensor,
    token_weights: torch.Tensor,
    num_slots: int,
    device: torch.device | None = None,
    *,
    block_m: int | None = None,
    pad_tiles_to: int | None = None,
) -> LoraBatchMeta:
    """Turn per-token plans into the kernels' index buffers (host work, once per step).

    Args:
        token_slots: [T, K] integer slot per (token, adapter), -1 = none; CPU or device.
        token_weights: [T, K] float mixture weights.
        num_slots: slots of the adapter buffers (every slot must be < num_slots).
        device: where the buffers go; default: token_slots' device if CUDA, else CUDA if
            available, else CPU.
        block_m: most tokens per tile, a power of two (>= 16 for the kernels, which feed
            tiles to the tensor cores); default from the GPU's tuned config (by T).
        pad_tiles_to: launch this many programs along the tile axis (extra tiles are empty), so
            that a CUDA graph captured with this meta can be replayed with another meta of the
            same T, K and pad; must be >= the tiles needed (T is always enough).
    """
    if token_slots.dim() != 2 or token_slots.shape != token_weights.shape:
        raise ValueError(
            f"token_slots {tuple(token_slots.shape)} and token_weights "
            f"{tuple(token_weights.shape)} must both be [T, K]"
        )
    t, k = token_slots.shape
    if not 1 <= k <= MAX_K:
        raise ValueError(f"K={k} adapters per token; supported: 1..{MAX_K}")
    if device is None:
        device = (
            token_slots.device
            if token_slots.is_cuda
            else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        )
    slots = token_slots.detach().cpu().numpy().astype(np.int32)
    weights = token_weights.detach().cpu().numpy().astype(np.float32)
    if slots.size and (slots.max() >= num_slots or slots.min() < -1):
        raise ValueError(f"slot indices must lie in [-1, {num_slots})")
    if block_m is None:
        from kernels.config import block_m_for

        block_m = block_m_for(t, device)
    if block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"block_m={block_m} must be a power of two (the kernels need >= 16)")

    slots, weights = _normalize(slots, weights)
    active = slots[:, 0] >= 0
    keys = [slots[:, j] for j in range(k - 1, -1, -1)] + [~active]
    order = np.lexsort(keys) if t else np.zeros(0, np.int64)  # stable: plan order, then token
    num_active = int(active.sum())
    start, length = _tiles(slots[order[:num_active]], block_m)
    num_tiles = len(start)
    grid = num_tiles if pad_tiles_to is None else pad_tiles_to
    if grid < num_tiles:
        raise ValueError(f"pad_tiles_to={pad_tiles_to} < {num_tiles} tiles needed")
    tile_slots = np.full((grid, k), -1, np.int32)
    tile_slots[:num_tiles] = slots[order[start]] if num_tiles else tile_slots[:0]

    ints = np.concatenate(
        [
            slots.ravel(),
            order.astype(np.int32),
            np.pad(start, (0, grid - num_tiles)).astype(np.int32),
            np.pad(length, (0, grid - num_tiles)).astype(np.int32),
            tile_slots.ravel(),
        ]
    )
    floats = np.concatenate([weights.ravel(), weights[order].ravel()])
    ib = torch.from_numpy(ints).to(device)
    fb = torch.from_numpy(floats).to(device)
    cuts = np.cumsum([0, t * k, t, grid, grid, grid * k])
    iv = [ib[cuts[i] : cuts[i + 1]] for i in range(5)]
    return LoraBatchMeta(
        token_slots=iv[0].view(t, k),
        token_weights=fb[: t * k].view(t, k),
        sorted_tokens=iv[1],
        sorted_weights=fb[t * k :].view(t, k),
        tile_start=iv[2],
        tile_len=iv[3],
        tile_slots=iv[4].view(grid, k),
        num_tokens=t,
        max_k=k,
        num_slots=num_slots,
        num_active=num_active,
        num_tiles=num_tiles,
        grid_tiles=grid,
        block_m=block_m,
    )
