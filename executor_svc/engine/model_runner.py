"""Runs one scheduled step on the device: builds the inputs, runs the model, samples.

Pure-decode steps on CUDA replay a captured CUDA graph, one per padded batch size, LoRA mode
(none / 1 adapter per token / up to 4) and, with adapters, tile bucket: the LoRA kernels
launch one program per tile (run of tokens sharing a plan), and a graph's grid is fixed at
capture, so graphs are captured for tile counts 1, 4, 16, ... up to the batch size and a step
replays the smallest that holds its tiles (with one grid padded to the batch size, one
adapter over 64 requests launched as many programs as 64 distinct adapters; the buckets took
0.1-0.7 ms of GPU time off a 7B decode step on the H100, docs/benchmarks.md). Inputs are
copied into static buffers (the LoRA metadata in two copies from pinned memory); padding rows
write to the scratch KV block 0 and carry no adapter, so nothing is allocated on the device
per step. A small step with prompt chunks (no more tokens than the largest graph, and chunks
with little history) replays the same graphs: each prompt token is a decode row attending to
its own prefix (see :class:`DecodeRows`), so a short prompt joining a running batch, or the
last chunk of a long one, costs a graph replay instead of an eager step (on the H100 a 47-token
mixed 7B step queued its kernels in 17 ms of host time eagerly, 32 ms with 8 adapters). Other
steps with prefill chunks run eagerly; on CUDA their attention is one kernel a layer for every
chunk, whatever its length and history (executor_svc.model.layers.paged_prefill).

Before each step the merge controller (executor_svc.engine.merging, dLoRA's merged mode) may
fold one adapter into the base weights or take it out, and rewrites the step's plans to match:
every plan below is the *effective* one.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from executor_svc.engine.block_manager import SCRATCH_BLOCK
from executor_svc.engine.merging import MergeController, MergePolicy, Plan
from executor_svc.engine.sampler import sample, seeded_exponential
from executor_svc.engine.scheduler import ScheduledBatch
from executor_svc.model.context import PrefillChunk, StepContext
from executor_svc.model.layers.paged_attention import MAX_SPLITS, paged_decode_triton
from executor_svc.model.layers.paged_prefill import (
    LONG_HISTORY_TOKENS,
    build_prefill_meta,
    paged_prefill_triton,
)
from executor_svc.model.llama import CausalLM
from kernels import LoraBatchMeta, build_lora_meta, overlapped
from kernels._launch import compile_only
from kernels.config import token_buckets
from kernels.fused_linear_lora_op import fused_preferred
from kernels.metadata import MAX_K

log = logging.getLogger(__name__)

GRAPH_META_MODE = "plan"  # fixed for capture and replay: buffer shapes must not change
# A step's prompt rows run as decode rows (in a graph) only while the context they attend to,
# summed over those rows, stays under this many tokens: a row reads its whole prefix, so a
# chunk of n tokens after h tokens of history reads n * h + n (n + 1) / 2 tokens of K/V where
# the prefill kernel reads each about once. 65,536 admits every fresh prompt that fits the
# largest row graph (256 tokens: 32,896 reads; a chunk's rows share its prefix, mostly from
# L2) and keeps out long histories. Under open-loop arrivals on the H100, 16,384 left 70-80
# steps of 190-260 prompt tokens eager, each 30-120 ms of host time to queue: 65,536 left
# 6-26 of them and took ITL p99 at 16 requests/s from 43-50 to 14-16 ms (docs/benchmarks.md,
# twelfth pass).
ROWS_MAX_PROMPT_CONTEXT = 65536
# Graph sizes an engine captures past its batch limit by default, for steps with prompt rows
# (on the H100 a 157-token mixed 7B step took 20-40 ms eagerly, docs/benchmarks.md). A row
# past the step's tokens is padding: it costs the GEMMs little at these sizes, which read
# the weights once whatever the rows.
ROW_GRAPH_SIZES = (128, 256)


@dataclass(slots=True)
class DecodeRows:
    """A step laid out as decode rows: one row per new token, attending to its sequence's
    KV cache up to and including itself.

    A decode entry is one row. A prompt chunk of n tokens at positions c..c+n-1 is n rows with
    context lengths c+1..c+n and the sequence's block table: every layer writes the step's
    K/V for all rows before its attention reads any, so row i sees the chunk's earlier rows
    (and its history), and its context length hides the later ones: causal attention over
    the prompt, as a prefill computes it. Running example (block_size 4)::

        A decoding its 6th token (blocks [3, 7]), B prefilling tokens 0..2 (block [5])
        ids = [a5, b0, b1, b2]   pos = [5, 0, 1, 2]   context_lens = [6, 1, 2, 3]
        tables = [[3, 7], [5], [5], [5]]   plans = [plan_A, plan_B, plan_B, plan_B]
        logits_rows = [0, 3]     # A samples; B's prompt ends with this chunk
    """

    ids: np.ndarray  # [R] int64 token ids
    pos: np.ndarray  # [R] int64 positions (context length - 1)
    tables: list[list[int]]  # [R] each row's block table (a chunk's rows share one list)
    plans: list[Plan]  # [R] each row's effective LoRA plan
    logits_rows: list[int]  # rows whose logits are sampled, in the order of the entries

    @property
    def all_sample(self) -> bool:
        return len(self.logits_rows) == len(self.ids)


def decode_rows(
    entries,
    tables: list[list[int]],
    plans: list[Plan],
    max_rows: int,
    prompts: bool = True,
    max_reads: int = ROWS_MAX_PROMPT_CONTEXT,
) -> DecodeRows | None:
    """The step as :class:`DecodeRows`, or None if it has more than ``max_rows`` tokens, its
    prompt rows would read more than ``max_reads`` tokens of context, or it has prompt rows
    and ``prompts`` is False."""
    if sum(n for _, n in entries) > max_rows:
        return None
    if not prompts and any(n > 1 for _, n in entries):
        return None
    reads = sum(n * s.num_computed + n * (n + 1) // 2 for s, n in entries if n > 1)
    if reads > max_reads:
        return None
    ids: list[int] = []
    pos: list[int] = []
    row_tables: list[list[int]] = []
    row_plans: list[Plan] = []
    logits_rows: list[int] = []
    for (seq, n), table, plan in zip(entries, tables, plans, strict=True):
        c = seq.num_computed
        ids.extend(seq.token_ids[c : c + n])
        pos.extend(range(c, c + n))
        row_tables.extend([table] * n)
        row_plans.extend([plan] * n)
        if c + n == seq.num_tokens:
            logits_rows.append(len(ids) - 1)
    return DecodeRows(
        np.asarray(ids, np.int64), np.asarray(pos, np.int64), row_tables, row_plans, logits_rows
    )


def tile_pads(batch: int) -> list[int]:
    """Tile counts that decode graphs of ``batch`` rows are captured for (ascending)."""
    return [p for p in (1, 4, 16, 64, 256) if p < batch] + [batch]


def graph_capture_meta(
    b: int, k: int, pad: int, num_slots: int, device: torch.device
) -> LoraBatchMeta:
    """The LoRA metadata a decode graph of ``b`` rows, ``k`` adapters a token and ``pad``
    tiles is captured with: one active token (one tile, whatever the pad; replays copy their
    own plans in), but planned for the most distinct adapters a replay can carry, k a tile
    (plan mode). Host-side choices made at capture stay in the graph: the fused kernel picks
    where its shrink runs from ``num_used``, and a graph captured for one adapter would
    replay steps of many through its slow late shrink."""
    slots = torch.full((b, k), -1, dtype=torch.int32)
    slots[0, 0] = 0
    meta = build_lora_meta(
        slots, (slots >= 0).float(), num_slots, device, pad_tiles_to=pad, mode=GRAPH_META_MODE
    )
    meta.num_used = min(pad * k, num_slots)
    return meta


class _MetaStager:
    """Pinned host copies of a step's LoRA metadata, sent to a graph's buffers in two copies.

    The step loop waits for each step's sampled tokens before building the next step, so the
    previous asynchronous copy out of these buffers has finished when they are rewritten."""

    def __init__(self, max_ints: int, max_floats: int):
        self.ints = torch.empty(max_ints, dtype=torch.int32).pin_memory()
        self.floats = torch.empty(max_floats, dtype=torch.float32).pin_memory()

    def copy(self, dst: LoraBatchMeta, src: LoraBatchMeta) -> None:
        """Copy host-built ``src`` into the device buffers of ``dst`` (a captured graph's)."""
        layout = ("grid_tiles", "mode", "block_m", "max_k", "num_tokens")
        if any(getattr(src, f) != getattr(dst, f) for f in layout):
            raise RuntimeError("LoRA metadata layout differs from the captured graph's")
        for host, staged, dev in (
            (src.int_buf, self.ints, dst.int_buf),
            (src.float_buf, self.floats, dst.float_buf),
        ):
            n = host.numel()
            staged[:n].copy_(host)
            dev.copy_(staged[:n], non_blocking=True)


def kv_bytes_per_block(model: CausalLM, block_size: int) -> int:
    c = model.config
    el = torch.empty((), dtype=model.dtype).element_size()
    return 2 * c.num_layers * block_size * c.num_kv_heads * c.head_dim * el


class _Graph:
    __slots__ = ("graph", "batch", "meta", "sent")

    def __init__(self, graph, batch: int, meta: LoraBatchMeta | None):
        self.graph, self.batch, self.meta = graph, batch, meta
        self.sent: LoraBatchMeta | None = None  # host metadata last copied into ``meta``


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        *,
        num_blocks: int,
        block_size: int,
        max_model_len: int,
        graph_batch_sizes: list[int],
        lora_warm_up_tokens: int = 0,
        merge_policy: MergePolicy | None = None,
    ):
        self.model, self.device, self.block_size = model, model.device, block_size
        # Prefill attention on CUDA: one kernel a layer for every chunk of the step, reading the
        # paged cache (paged_prefill); False: SDPA per run of equal prompts and per chunk with
        # history, over gathered rows (the CPU path; kept on CUDA for benchmark comparisons).
        self.paged_prefill = self.device.type == "cuda"
        self.merging = MergeController(model, merge_policy)
        c = model.config
        self.eos_ids = c.eos_token_ids
        self.kv = torch.zeros(
            c.num_layers,
            2,
            num_blocks * block_size,
            c.num_kv_heads,
            c.head_dim,
            dtype=model.dtype,
            device=self.device,
        )
        self.kv_caches = [(self.kv[i, 0], self.kv[i, 1]) for i in range(c.num_layers)]
        self.max_blocks = -(-max_model_len // block_size)
        # (batch, LoRA mode, tile pad) -> graph; pad 0 without adapters.
        self.graphs: dict[tuple[int, int, int], _Graph] = {}
        # Tile pads captured per batch size; a benchmark may restrict them ({b: [b]} is the
        # single padded grid) to compare.
        self.tile_pads: dict[int, list[int]] = {}
        # (batch, LoRA mode) -> (plans, host metadata) of the last decode step: see _decode_meta
        self._last_meta: dict[tuple[int, int], tuple[tuple, LoraBatchMeta]] = {}
        self.graph_sizes = sorted(graph_batch_sizes) if self.device.type == "cuda" else []
        # Steps of up to this many tokens run as decode rows (DecodeRows): in the captured
        # graphs on CUDA; eagerly where there are none (set on the CPU by tests, to check the
        # layout against the prefill path).
        self.decode_rows_max_tokens = self.graph_sizes[-1] if self.graph_sizes else 0
        # False: only pure decode steps replay graphs (the earlier behaviour; for benchmarks)
        self.prompt_rows = True
        self.rows_max_prompt_context = ROWS_MAX_PROMPT_CONTEXT  # see decode_rows
        if self.device.type == "cuda":
            self.warm_up_kernels()
        if lora_warm_up_tokens and self.device.type == "cuda":
            self.warm_up_lora(lora_warm_up_tokens)  # first: it compiles the graphs' kernels too
        if self.graph_sizes:
            self._capture_all()

    # -- eager path ----------------------------------------------------------------------

    def execute(
        self,
        batch: ScheduledBatch,
        on_launched: Callable[[], None] | None = None,
        lock: contextlib.AbstractContextManager = contextlib.nullcontext(),
    ) -> list[int]:
        """Run the step; returns a token for every entry that reaches the end of its tokens.

        ``lock`` is held while the step's device work is queued (the model's step lock: slot
        writes, queued on the same stream, then run on the device after this step's kernels),
        not while waiting for the sampled tokens; ``on_launched`` runs once the work is queued.
        """
        entries = batch.entries
        samplers = [s for s, n in entries if s.num_computed + n == s.num_tokens]
        with lock:
            logits = self._launch(batch)
        if on_launched is not None:
            on_launched()
        return sample(logits, samplers, self.eos_ids) if samplers else []

    def _launch(self, batch: ScheduledBatch) -> torch.Tensor:
        entries = batch.entries
        # The scheduler's copies: a live seq.block_table can be emptied by abort() (another
        # thread) mid-step, which made a decode row read past its block table on the device.
        tables = (
            batch.block_tables
            if len(batch.block_tables) == len(entries)
            else [list(s.block_table) for s, _ in entries]
        )
        plans = self.merging.plans_for_step([s.adapters for s, _ in entries])
        rows = decode_rows(
            entries,
            tables,
            plans,
            self.decode_rows_max_tokens,
            prompts=self.prompt_rows,
            max_reads=self.rows_max_prompt_context,
        )
        if rows is not None:
            return self._replay(rows) if self.graph_sizes else self._run_rows(rows)
        num_decode = sum(1 for _, n in entries if n == 1)
        ids, ctx, logits_idx = self._prepare(entries, num_decode, tables, plans)
        hidden = self.model(ids, ctx, self.kv_caches)
        return self.model.compute_logits(hidden[logits_idx])

    def _lora_plan(self, plans: list[Plan], counts: list[int], k: int | None = None):
        """Per-token (slot, weight) arrays [T, K] (K = most adapters of any plan)."""
        k = k or max((len(p) for p in plans), default=0)
        if k == 0:
            return None
        t = sum(counts)
        slots = np.full((t, k), -1, np.int32)
        weights = np.zeros((t, k), np.float32)
        row = 0
        for plan, n in zip(plans, counts, strict=True):
            for j, (slot, w) in enumerate(plan):
                slots[row : row + n, j] = slot
                weights[row : row + n, j] = w
            row += n
        return slots, weights

    def _prepare(self, entries, num_decode: int, tables: list[list[int]], plans: list[Plan]):
        bs = self.block_size
        ids, pos, rows, logits_idx, prefills, paged = [], [], [], [], [], []
        start = 0
        for (seq, n), block_table in zip(entries, tables, strict=True):
            p = np.arange(seq.num_computed, seq.num_computed + n)
            table = np.asarray(block_table, dtype=np.int64)
            ids.extend(seq.token_ids[seq.num_computed : seq.num_computed + n])
            pos.append(p)
            rows.append(table[p // bs] * bs + p % bs)
            if n > 1:
                chunk = PrefillChunk(start=start, length=n)
                if self.paged_prefill:
                    paged.append((start, n, seq.num_computed, block_table))
                elif seq.num_computed > 0:
                    ctx_pos = np.arange(seq.num_computed + n)
                    chunk.kv_rows = self._t(table[ctx_pos // bs] * bs + ctx_pos % bs)
                    chunk.mask = self._t(ctx_pos[None, :] <= p[:, None])
                prefills.append(chunk)
            if seq.num_computed + n == seq.num_tokens:
                logits_idx.append(start + n - 1)
            start += n
        ctx = StepContext(
            positions=self._t(np.concatenate(pos)),
            slot_mapping=self._t(np.concatenate(rows)),
            num_decode=num_decode,
            prefills=prefills,
            block_size=bs,
        )
        # One run of equal fresh prompts (a single prompt, or a batch of one length) is one
        # SDPA call, whose kernels beat ours there (on the H100, a layer's 1 x 2,048 tokens 87
        # against 191 us, 16 x 128 tokens 33 against 37); anything else is one paged kernel
        # instead of an SDPA call per prompt (16 prompts of 64-184 tokens: 97 against 889 us a
        # layer, docs/benchmarks.md, tenth pass).
        one_run = all(h == 0 and n == paged[0][1] for _, n, h, _ in paged)
        if paged and not one_run:
            ctx.prefill_meta = build_prefill_meta(paged, self.device)
        if num_decode:
            dec = [s for s, _ in entries[:num_decode]]
            width = max(len(t) for t in tables[:num_decode])
            block_tables = np.zeros((num_decode, width), np.int32)
            for i, t in enumerate(tables[:num_decode]):
                block_tables[i, : len(t)] = t
            ctx.block_tables = self._t(block_tables)
            ctx.context_lens = self._t(np.array([s.num_computed + 1 for s in dec], np.int32))
        ctx.lora = self._step_lora_meta(plans, [n for _, n in entries])
        return self._t(np.asarray(ids, np.int64)), ctx, self._t(np.asarray(logits_idx, np.int64))

    def _step_lora_meta(self, plans: list[Plan], counts: list[int]) -> LoraBatchMeta | None:
        """An eager step's LoRA metadata on the device (None: no token has an adapter)."""
        plan = self._lora_plan(plans, counts)
        if plan is None:
            return None
        slots, weights = (torch.from_numpy(a) for a in plan)
        return build_lora_meta(slots, weights, self.model.num_slots, self.device)

    def _t(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    def warm_up_kernels(self) -> int:
        """Compile the attention and sampling kernels' variants that eager steps and requests
        can launch, before serving; returns the number of launches. The decode kernel takes a
        split count from the batch and the block tables' width (every power of two up to
        ``MAX_SPLITS``, each with its combine), the prefill kernel one of two configs by the
        longest history, the seeded sampler one variant. The captured graphs compile only the
        decode variants they hold; the rest, compiled by the first step that needed them,
        stalled every running request for 0.4-0.6 s on the H100 (docs/benchmarks.md, eleventh
        pass). On zeros, reading the scratch KV block; nothing is kept."""
        c, dev, bs = self.model.config, self.device, self.block_size
        k_cache, v_cache = self.kv_caches[0]
        q = torch.zeros(1, c.num_heads, c.head_dim, dtype=self.model.dtype, device=dev)
        lens = torch.ones(1, dtype=torch.int32, device=dev)
        scale, launches = c.head_dim**-0.5, 0
        table = torch.full((1, 1), SCRATCH_BLOCK, dtype=torch.int32, device=dev)
        for i in range(MAX_SPLITS.bit_length()):
            paged_decode_triton(q, k_cache, v_cache, table, lens, scale, bs, splits=1 << i)
            launches += 1
        for history in (0, LONG_HISTORY_TOKENS):  # the short- and the long-history config
            blocks = [SCRATCH_BLOCK] * -(-(history + 1) // bs)
            meta = build_prefill_meta([(0, 1, history, blocks)], dev)
            paged_prefill_triton(q, k_cache, v_cache, meta, scale, bs, torch.empty_like(q))
            launches += 1
        seeded_exponential(torch.zeros(1, c.vocab_size, device=dev), [0], [0])
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return launches + 1

    def warm_up_lora(self, max_tokens: int) -> int:
        """Compile the LoRA kernels eager (prefill and mixed) steps launch, before serving.

        Triton compiles a kernel variant per launch configuration (token bucket), adapters per
        token (1-4) and metadata mode; left to the first requests, the compiles land in their
        time to first token (seen on a fresh H100: 8.6 s TTFT p50). Runs each LoRA projection
        of layer 0 once per variant, on zeros, for each token bucket and decode-graph batch
        size: first compiling only, on a thread pool where Triton can (one after another, the
        ~150 variants of a 7B model took 3 minutes on the H100 host), then launching each once.
        Returns the number of projection calls. (On CUDA the runner calls it before capturing
        its graphs; the CPU's torch path compiles nothing.)"""
        if not (self.model.num_slots and self.model.max_rank):
            return 0
        sizes = {t for t in token_buckets(self.device) if t < max_tokens} | {max_tokens}
        sizes = sorted(sizes | set(self.graph_sizes))  # decode graphs: plan mode, K = 1 and 4
        try:
            with compile_only():
                self._run_lora_variants(sizes)
                with overlapped():  # what the captured decode graphs launch
                    self._run_lora_variants(self.graph_sizes)
        except Exception:  # the launching pass below compiles whatever is missing, in turn
            log.exception("parallel compile of the LoRA kernels failed; compiling in turn")
        calls = self._run_lora_variants(sizes)
        with overlapped():
            calls += self._run_lora_variants(self.graph_sizes)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return calls

    def _run_lora_variants(self, sizes: list[int]) -> int:
        layer, calls = self.model.layers[0], 0
        projections = (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj)
        for t in sizes:
            xs = [
                torch.zeros(t, p.in_features, dtype=self.model.dtype, device=self.device)
                for p in projections
            ]
            for k in range(1, min(MAX_K, self.model.num_slots) + 1):
                weights = torch.full((t, k), 1.0 / k)
                for used in self._warm_up_adapter_counts(xs[0], t, k):
                    slots = (torch.arange(t * k) % used).view(t, k).int()
                    for mode in ("plan", "column") if k > 1 else ("plan",):
                        meta = build_lora_meta(
                            slots, weights, self.model.num_slots, self.device, mode=mode
                        )
                        for proj, x in zip(projections, xs, strict=True):
                            proj.forward_beside(x, meta)  # as DecoderLayer.forward calls them
                            calls += 1
        return calls

    def _warm_up_adapter_counts(self, x: torch.Tensor, t: int, k: int) -> list[int]:
        """Distinct adapters the warm-up's steps of ``t`` tokens, ``k`` a token, use: as many
        as the tokens and slots allow; and where the fused kernel runs with adapters (on the
        H100 only when LORASERVE_KERNELS_FUSED_MAX_TOKENS forces it), also 1 and 2, whose
        shrink rides its main loop in kernel variants of their own."""
        most = min(t * k, self.model.num_slots)
        counts = {most}
        if fused_preferred(x, None, lora=True):
            counts |= {c for c in (1, 2) if k <= c <= most}
        return sorted(counts)

    # -- CUDA graphs for decode steps ----------------------------------------------------------

    def _capture_all(self) -> None:
        n, dev = self.graph_sizes[-1], self.device
        self.s_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.s_pos = torch.zeros(n, dtype=torch.int64, device=dev)
        self.s_rows = torch.zeros(n, dtype=torch.int64, device=dev)
        self.s_tables = torch.zeros(n, self.max_blocks, dtype=torch.int32, device=dev)
        self.s_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.s_logits = torch.zeros(
            n, self.model.config.vocab_size, dtype=torch.float32, device=dev
        )
        lora = bool(self.model.num_slots and self.model.max_rank)
        self._stager = _MetaStager(16 * MAX_K * n, 4 * MAX_K * n)  # ints 13 n, floats 8 n
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.graph_sizes):
            self.tile_pads[b] = tile_pads(b) if lora else []
            modes = [(0, 0)] + [(k, pad) for k in (1, MAX_K) for pad in self.tile_pads[b]]
            for k, pad in modes:
                self.graphs[(b, k, pad)] = self.capture_decode(b, k, pad, pool)
        torch.cuda.synchronize()

    def capture_decode(self, b: int, k: int, pad: int, pool=None) -> _Graph:
        """Capture the decode step of ``b`` rows with LoRA metadata for ``k`` adapters a token
        over ``pad`` tiles (k = 0: no adapter), into memory pool ``pool`` (None: a new one).
        The graph reads the runner's static input buffers and its own metadata buffers."""
        meta = graph_capture_meta(b, k, pad, self.model.num_slots, self.device) if k else None
        ctx = self._graph_ctx(b, meta)
        with overlapped():  # compile the Triton kernels outside the capture
            for _ in range(2):
                self._graph_body(b, ctx)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            self._graph_body(b, ctx)
        return _Graph(graph, b, meta)

    def _decode_meta(self, plans: list[Plan], b: int, mode: int) -> _Graph:
        """The graph for this decode batch's plans, its LoRA metadata buffers holding them.

        Decode batches keep their requests and plans from step to step, so the metadata of the
        last plans of each batch size is kept (host-built, with its graph) and re-sent to the
        graph only if another plan list was sent there since: building and staging it took
        0.2-0.35 ms of host time per 7B decode step on the H100 host (docs/benchmarks.md)."""
        key = (tuple(self.tile_pads[b]), *plans)
        hit = self._last_meta.get((b, mode))
        if hit is None or hit[0] != key:
            slots, weights = self._lora_plan(plans, [1] * len(plans), mode)
            slots = np.pad(slots, ((0, b - len(plans)), (0, 0)), constant_values=-1)
            weights = np.pad(weights, ((0, b - len(plans)), (0, 0)))
            host = build_lora_meta(
                torch.from_numpy(slots),
                torch.from_numpy(weights),
                self.model.num_slots,
                torch.device("cpu"),
                block_m=self.graphs[(b, mode, b)].meta.block_m,
                pad_tiles_to=self.tile_pads[b],
                mode=GRAPH_META_MODE,
            )
            hit = self._last_meta[(b, mode)] = (key, host)
        g = self.graphs[(b, mode, hit[1].grid_tiles)]
        self.send_meta(g, hit[1])
        return g

    def send_meta(self, g: _Graph, host: LoraBatchMeta) -> None:
        """Copy host-built metadata into graph ``g``'s buffers, unless they hold it already."""
        if g.sent is not host:
            self._stager.copy(g.meta, host)
            g.sent = host

    def _graph_ctx(self, b: int, meta: LoraBatchMeta | None) -> StepContext:
        return StepContext(
            positions=self.s_pos[:b],
            slot_mapping=self.s_rows[:b],
            num_decode=b,
            block_tables=self.s_tables[:b],
            context_lens=self.s_lens[:b],
            lora=meta,
            block_size=self.block_size,
        )

    def _graph_body(self, b: int, ctx: StepContext) -> None:
        hidden = self.model(self.s_ids[:b], ctx, self.kv_caches)
        self.s_logits[:b].copy_(self.model.compute_logits(hidden))

    def _row_inputs(self, rows: DecodeRows, b: int):
        """Host arrays of ``rows`` padded to ``b`` rows: ids, positions, KV rows written, block
        tables, context lengths. Padding rows write the scratch KV block and attend to 1 token."""
        nr, bs = len(rows.ids), self.block_size
        ids = np.zeros(b, np.int64)
        pos = np.zeros(b, np.int64)
        ids[:nr], pos[:nr] = rows.ids, rows.pos
        tables = np.full((b, self.max_blocks), SCRATCH_BLOCK, np.int32)
        for i, t in enumerate(rows.tables):
            tables[i, : len(t)] = t
        kv_rows = tables[np.arange(b), pos // bs].astype(np.int64) * bs + pos % bs
        kv_rows[nr:] = SCRATCH_BLOCK * bs
        lens = (pos + 1).astype(np.int32)
        lens[nr:] = 1
        return ids, pos, kv_rows, tables, lens

    def _run_rows(self, rows: DecodeRows) -> torch.Tensor:
        """``rows`` in one eager step (where no graphs are captured: the CPU's check)."""
        nr = len(rows.ids)
        ids, pos, kv_rows, tables, lens = self._row_inputs(rows, nr)
        width = max(len(t) for t in rows.tables)
        ctx = StepContext(
            positions=self._t(pos),
            slot_mapping=self._t(kv_rows),
            num_decode=nr,
            block_tables=self._t(tables[:, :width]),
            context_lens=self._t(lens),
            block_size=self.block_size,
            lora=self._step_lora_meta(rows.plans, [1] * nr),
        )
        hidden = self.model(self._t(ids), ctx, self.kv_caches)
        return self.model.compute_logits(hidden[self._t(np.asarray(rows.logits_rows, np.int64))])

    def _replay(self, rows: DecodeRows) -> torch.Tensor:
        nr = len(rows.ids)
        b = next(s for s in self.graph_sizes if s >= nr)
        for dst, src in zip(
            (self.s_ids, self.s_pos, self.s_rows, self.s_tables, self.s_lens),
            self._row_inputs(rows, b),
            strict=True,
        ):
            dst[:b].copy_(torch.from_numpy(src), non_blocking=True)
        k = max((len(p) for p in rows.plans), default=0)
        mode = 0 if k == 0 else (1 if k == 1 else MAX_K)
        g = self._decode_meta(rows.plans, b, mode) if mode else self.graphs[(b, 0, 0)]
        g.graph.replay()
        if rows.all_sample or not rows.logits_rows:
            return self.s_logits[: len(rows.logits_rows)]
        # A few rows (the chunks' last tokens and the decodes): views joined on the device, so
        # that no index goes to the device (a pageable copy would wait for the replay).
        return torch.cat([self.s_logits[i : i + 1] for i in rows.logits_rows])
