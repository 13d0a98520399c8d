"""Per-step index buffers for the LoRA kernels: :class:`LoraBatchMeta` and its builder.

The builder runs once per engine step on the host (numpy), moves everything to the device in
two copies, and every LoRA layer of the step reuses the result; the kernels never look at host
data, so ``add_lora`` needs no host synchronisation and can be captured in a CUDA graph.

The kernels walk *tiles*: runs of at most ``block_m`` rows that share their adapters, so a
tile loads each adapter's weights once and feeds them to the tensor cores (the SGMV idea of
Punica, Chen et al. 2023, and S-LoRA's segments, Sheng et al. 2023); all tokens on different
adapters give one-row tiles (the BGMV case). Tokens without an adapter belong to no tile and
cost nothing. Two ways to form rows and tiles:

- ``plan`` mode (default when it is cheaper): a row is a token, a tile a run of tokens with
  the same *plan* (tuple of slots; weights may differ per token). One program handles a
  token's K adapters together, so x is read and y written once per token, without atomics.
- ``column`` mode (when plans are mostly distinct, e.g. a per-token top-2 gate over many
  adapters): a row is one (token, k) pair, a tile a run of pairs of column k on one slot. The
  shrink covers all columns in one launch; the expand makes one pass per column k (a token
  appears once per pass, so y is still updated without atomics), reading and writing y K times
  instead of reloading every adapter for every token.

Running example (``block_m=2`` to keep it short; the kernels use 16 or more), T=6, K=2, 4 slots::

    plan per token (slot, weight):  t0 [(2, 1.0)]   t1 []   t2 [(0, .5), (2, .5)]
                                    t3 [(2, 1.0)]   t4 [(2, 1.0)]   t5 [(2, .3), (0, .7)]
    input token_slots   = [[2,-1], [-1,-1], [0,2], [2,-1], [2,-1], [2,0]]
    input token_weights = [[1, 0], [ 0, 0], [.5,.5], [1, 0], [1, 0], [.3,.7]]

    token_slots   = [[2,-1], [-1,-1], [0,2], [2,-1], [2,-1], [0,2]]  # per token: slots
    token_weights = [[1, 0], [ 0, 0], [.5,.5], [1, 0], [1, 0], [.7,.3]]  # ascending, -1 last

  plan mode (tile_k = 2)::

    row_tokens  = [2, 5, 0, 3, 4, 0]       # plan (0,2) first, then (2,-1); t1 is base-only;
    row_weights = [[.5,.5], [.7,.3], [1,0], [1,0], [1,0], [0,0]]   # rows padded to T
    tile_start  = [0, 2, 4]                # first row of each tile
    tile_len    = [2, 2, 1]                # plan (2,-1) has 3 tokens: split 2 + 1
    tile_col    = [0, 0, 0]                # first k column of h the tile fills
    tile_slots  = [[0,2], [2,-1], [2,-1]]  # the plan shared by the tile's rows
    pass_tiles  = (3,)                     # one expand pass over all tiles
    slot_list   = [2, 0, 2, 0, 0]          # 2 slots in use, 0 and 2; 1 + min(T*K, slots) long

  column mode (tile_k = 1)::

    row_tokens  = [2, 5, 0, 3, 4, 2, 5, 0, 0, 0, 0, 0]  # column 0: slot 0 {t2,t5}, slot 2
                                           # {t0,t3,t4}; column 1: slot 2 {t2,t5}; pad to T*K
    row_weights = [[.5], [.7], [1], [1], [1], [.5], [.3], [0], [0], [0], [0], [0]]
    tile_start  = [0, 2, 4, 5]
    tile_len    = [2, 2, 1, 2]
    tile_col    = [0, 0, 0, 1]
    tile_slots  = [[0], [2], [2], [2]]
    pass_tiles  = (3, 1)                   # expand: tiles 0-2 (column 0), then tile 3

Duplicated slots in one token are merged (weights summed); zero weights are dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

MAX_K = 4  # adapters per token; MeteoRA uses top-2, LoraRetriever mixtures up to 3 or 4.
MODES = ("plan", "column")


@dataclass(slots=True)
class LoraBatchMeta:
    """Index buffers of one engine step, shared by every LoRA layer (see the module example).

    All tensors live on ``device``; the ints are host values known when the step is built.
    """

    token_slots: torch.Tensor  # [T, K] int32, slot per (token, adapter), -1 = none
    token_weights: torch.Tensor  # [T, K] float32 mixture weights, 0 where slot == -1
    row_tokens: torch.Tensor  # [R] int32, token of each row; rows are grouped into tiles
    row_weights: torch.Tensor  # [R, tile_k] float32, the row's weight for each tile column
    # (R = T in plan mode, T*K in column mode: rows past the tiles' are padding, so that
    # buffers keep their shapes from step to step, for CUDA graphs)
    tile_start: torch.Tensor  # [G] int32, first row of each tile
    tile_len: torch.Tensor  # [G] int32, rows in the tile (0 for padding tiles)
    tile_col: torch.Tensor  # [G] int32, first of the tile_k columns of h the tile fills
    tile_slots: torch.Tensor  # [G, tile_k] int32, slots shared by all rows of the tile
    # [1 + min(T*K, num_slots)] int32: how many distinct slots the step uses, then those slots
    # ascending (the fused GEMM's epilogue walks them; kernels.fused_linear_lora)
    slot_list: torch.Tensor
    # Every tensor above is a view of one of these two, so a captured graph's meta is refreshed
    # with two copies: int_buf = token_slots, row_tokens, tile_start, tile_len, tile_col,
    # tile_slots, slot_list; float_buf = token_weights, row_weights (in that order, each view
    # 16-byte aligned: see _packed).
    int_buf: torch.Tensor
    float_buf: torch.Tensor
    num_tokens: int
    max_k: int  # K
    num_slots: int
    num_active: int  # tokens with at least one adapter
    # distinct slots the step uses (slot_list[0], as a host value); a captured graph's meta
    # may raise it to the most its replays carry, as host-side choices made at capture stay in
    # the graph (executor_svc.engine.model_runner.graph_capture_meta)
    num_used: int
    num_tiles: int  # real tiles
    grid_tiles: int  # G = sum(pass_tiles), tiles with padding
    block_m: int  # most rows per tile, the kernels' BLOCK_M
    mode: str  # "plan" or "column"
    tile_k: int  # adapters per tile: K in plan mode, 1 in column mode
    pass_tiles: tuple[int, ...]  # tiles of each expand pass, in order
    # Launch plans of the kernels for this meta, per operand layout (validated, configured
    # once per step and projection shape; the other layers of the step reuse them).
    plans: dict = field(default_factory=dict, repr=False, compare=False)

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


def _tiles(groups: np.ndarray, block_m: int) -> tuple[np.ndarray, np.ndarray]:
    """Split runs of equal rows of ``groups`` (already adjacent) into tiles of <= block_m."""
    n = groups.shape[0]
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    change = np.ones(n, dtype=bool)
    change[1:] = (groups[1:] != groups[:-1]).any(axis=1)
    g_start = np.flatnonzero(change)
    g_len = np.diff(np.append(g_start, n))
    per_group = -(-g_len // block_m)
    first_tile = np.repeat(np.cumsum(per_group) - per_group, per_group)
    within = np.arange(per_group.sum()) - first_tile
    start = np.repeat(g_start, per_group) + within * block_m
    end = np.repeat(g_start + g_len, per_group)
    return start, np.minimum(block_m, end - start)


@dataclass
class _Layout:
    rows: np.ndarray  # token of each row
    weights: np.ndarray  # [R, tile_k]
    start: np.ndarray
    length: np.ndarray
    col: np.ndarray
    slots: np.ndarray  # [tiles, tile_k]
    passes: list[int]  # tiles per expand pass (unpadded)


def _plan_layout(slots: np.ndarray, weights: np.ndarray, block_m: int) -> _Layout:
    k = slots.shape[1]
    active = np.flatnonzero(slots[:, 0] >= 0)
    keys = [slots[active, j] for j in range(k - 1, -1, -1)]
    rows = active[np.lexsort(keys)] if len(active) else active  # stable: plan, then token
    start, length = _tiles(slots[rows], block_m)
    return _Layout(
        rows,
        weights[rows],
        start,
        length,
        np.zeros(len(start), np.int64),
        slots[rows[start]] if len(start) else np.zeros((0, k), np.int32),
        [len(start)],
    )


def _column_layout(slots: np.ndarray, weights: np.ndarray, block_m: int) -> _Layout:
    k = slots.shape[1]
    tok, col = np.nonzero(slots >= 0)
    order = np.lexsort((tok, slots[tok, col], col))  # by column, then slot, then token
    tok, col = tok[order], col[order]
    pair_slot = slots[tok, col]
    start, length = _tiles(np.stack([col, pair_slot], axis=1), block_m)
    tile_col = col[start] if len(start) else np.zeros(0, np.int64)
    return _Layout(
        tok,
        weights[tok, col][:, None],
        start,
        length,
        tile_col,
        pair_slot[start][:, None],
        [int((tile_col == j).sum()) for j in range(k)],
    )


def _column_is_cheaper(plan: _Layout, column: _Layout, num_tokens: int, k: int) -> bool:
    """Column mode when plan mode's adapter loads (every plan tile loads each adapter of its
    plan) outnumber column mode's tiles plus its extra passes over y, (k - 1) per token,
    weighted 1/8 (a token's y row is small beside an adapter's weights, but it is read and
    written again in every pass).

    Measured on the H100 (docs/benchmarks.md, fourteenth pass), both modes forced, K=2 over 8
    or 64 adapters: column mode was as fast or faster at every size up to 64 tokens (plan
    tiles there hold two or three tokens, so plan mode runs many small programs that each
    reload two adapters), by up to 2.7 us; plan mode was faster at 1,024 tokens over 8
    adapters (by 2.6 us of 18 at 4096 out) and the two split 256 tokens over 8 adapters (plan
    0.8 us faster at 4096 out, column 1.3 us at 11008); over 64 adapters from 256 tokens on
    column mode won by 2.5-11x."""
    plan_loads = int((plan.slots >= 0).sum())
    return 8 * plan_loads > 8 * len(column.start) + (k - 1) * num_tokens


def _pick_pad(pad_tiles_to: int | Sequence[int] | None, needed: int) -> int | None:
    if pad_tiles_to is None:
        return None
    pads = [pad_tiles_to] if isinstance(pad_tiles_to, int) else sorted(pad_tiles_to)
    fits = [p for p in pads if p >= needed]
    if not fits:
        raise ValueError(f"pad_tiles_to={pad_tiles_to} < {needed} tiles needed")
    return fits[0]


_ALIGN = 4  # elements of 4 bytes: 16-byte alignment of every view of a packed buffer


def _packed(
    parts: list[np.ndarray], dtype, device: torch.device
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One device buffer holding ``parts`` (4-byte elements), each starting 16-byte aligned.

    Triton specialises a kernel on the 16-byte alignment of every pointer it gets; unaligned
    views, at offsets that move with T and the tile count, compiled new kernel variants in the
    middle of serving (and multiplied the variants to warm up). Returns the buffer and views."""
    starts = np.cumsum([0] + [-(-len(p) // _ALIGN) * _ALIGN for p in parts])
    host = np.zeros(starts[-1], dtype)
    for p, s0 in zip(parts, starts, strict=False):
        host[s0 : s0 + len(p)] = p
    buf = torch.from_numpy(host).to(device)
    return buf, [buf[s0 : s0 + len(p)] for p, s0 in zip(parts, starts, strict=False)]


def build_lora_meta(
    token_slots: torch.Tensor,
    token_weights: torch.Tensor,
    num_slots: int,
    device: torch.device | None = None,
    *,
    block_m: int | None = None,
    pad_tiles_to: int | Sequence[int] | None = None,
    mode: str | None = None,
) -> LoraBatchMeta:
    """Turn per-token plans into the kernels' index buffers (host work, once per step).

    Args:
        token_slots: [T, K] integer slot per (token, adapter), -1 = none; CPU or device.
        token_weights: [T, K] float mixture weights.
        num_slots: slots of the adapter buffers (every slot must be < num_slots).
        device: where the buffers go; default: token_slots' device if CUDA, else CUDA if
            available, else CPU.
        block_m: most rows per tile, a power of two (>= 16 for the kernels, which feed tiles
            to the tensor cores); default from the GPU's tuned config (by T, and for plan
            tiles of K > 1 adapters by its ``block_m_multi`` table where it has one).
        pad_tiles_to: launch this many programs per expand pass along the tile axis (extra
            tiles are empty), so that a CUDA graph captured with this meta can be replayed
            with another meta of the same T, K, mode and pad; must be >= the tiles needed (T
            is always enough). A sequence of pads picks the smallest that fits (graphs
            captured per tile bucket: the grids grow with the tiles in use, not with T).
        mode: "plan" or "column" (see the module docstring); default: the cheaper by a
            simple cost model. Fix it when capturing CUDA graphs.
    """
    if token_slots.dim() != 2 or token_slots.shape != token_weights.shape:
        raise ValueError(
            f"token_slots {tuple(token_slots.shape)} and token_weights "
            f"{tuple(token_weights.shape)} must both be [T, K]"
        )
    t, k = token_slots.shape
    if not 1 <= k <= MAX_K:
        raise ValueError(f"K={k} adapters per token; supported: 1..{MAX_K}")
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode={mode!r}; expected one of {MODES}")
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
    plan_block_m = block_m
    if block_m is None:
        from kernels.config import block_m_for

        block_m, plan_block_m = block_m_for(t, device), block_m_for(t, device, k)
    if block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"block_m={block_m} must be a power of two (the kernels need >= 16)")

    slots, weights = _normalize(slots, weights)
    lay = _plan_layout(slots, weights, plan_block_m)  # tiles of k adapters
    if k > 1 and mode != "plan":
        col = _column_layout(slots, weights, block_m)  # tiles of one adapter
        if mode == "column" or _column_is_cheaper(lay, col, t, k):
            lay, mode = col, "column"
    mode = mode or "plan"
    block_m = block_m if mode == "column" else plan_block_m
    tile_k = lay.slots.shape[1]
    num_tiles = len(lay.start)
    pad = _pick_pad(pad_tiles_to, max(lay.passes))
    passes = lay.passes if pad is None else [pad] * len(lay.passes)
    grid = sum(passes)
    # Tile arrays, each pass padded to its grid share with empty tiles (len 0, slots -1).
    dest = np.concatenate([np.arange(n) + sum(passes[:i]) for i, n in enumerate(lay.passes)])
    start, length, tcol = np.zeros(grid, np.int64), np.zeros(grid, np.int64), np.zeros(grid)
    tslots = np.full((grid, tile_k), -1, np.int32)
    start[dest], length[dest], tcol[dest], tslots[dest] = lay.start, lay.length, lay.col, lay.slots

    r = t * k if mode == "column" else t
    rows = np.zeros(r, np.int64)
    rows[: len(lay.rows)] = lay.rows
    row_w = np.zeros((r, tile_k), np.float32)
    row_w[: len(lay.rows)] = lay.weights
    used = np.unique(slots[slots >= 0])
    slot_list = np.zeros(1 + min(t * k, num_slots), np.int64)
    slot_list[0], slot_list[1 : 1 + len(used)] = len(used), used
    ib, iv = _packed(
        [slots.ravel(), rows, start, length, tcol, tslots.ravel(), slot_list], np.int32, device
    )
    fb, fv = _packed([weights.ravel(), row_w.ravel()], np.float32, device)
    return LoraBatchMeta(
        token_slots=iv[0].view(t, k),
        token_weights=fv[0].view(t, k),
        row_tokens=iv[1],
        row_weights=fv[1].view(r, tile_k),
        tile_start=iv[2],
        tile_len=iv[3],
        tile_col=iv[4],
        tile_slots=iv[5].view(grid, tile_k),
        slot_list=iv[6],
        int_buf=ib,
        float_buf=fb,
        num_tokens=t,
        max_k=k,
        num_slots=num_slots,
        num_active=int((slots[:, 0] >= 0).sum()),
        num_used=len(used),
        num_tiles=num_tiles,
        grid_tiles=grid,
        block_m=block_m,
        mode=mode,
        tile_k=tile_k,
        pass_tiles=tuple(passes),
    )
