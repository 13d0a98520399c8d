"""Engine behaviour on CPU with the tiny models: continuous batching equals running alone,
cancellation frees KV at once, preemption and chunked prefill keep outputs exact."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from executor_svc.engine import Engine, EngineRequest, SamplingOptions, running_engine
from executor_svc.engine.block_manager import BlockManager
from executor_svc.engine.scheduler import Scheduler
from executor_svc.engine.sequence import SeqStatus, Sequence
from executor_svc.model.lora_loader import load_adapter
from loraserve.devmodels import write_lora_adapter

PROMPTS = [
    "Translate the sentence to French.",
    "Solve the arithmetic problem: 12 plus 7",
    "hello",
    "The quick brown fox jumps over the lazy dog. Premise: a man is walking.",
    "def add(a, b):",
    "Is the sentiment of this review positive or negative?",
    "SELECT name",
    "Write a short poem about the sea.",
]
PLANS = [
    [],
    [(0, 1.0)],
    [(1, 1.0)],
    [(0, 0.5), (1, 0.5)],
    [(2, 1.0)],
    [(2, 0.3), (0, 0.7)],
    [(1, 0.2), (2, 0.3), (0, 0.5)],
    [(0, 1.0)],
]


def req(i: int, max_tokens: int = 12, **kw) -> EngineRequest:
    return EngineRequest(
        f"r{i}",
        PROMPTS[i % len(PROMPTS)],
        PLANS[i % len(PLANS)],
        SamplingOptions(max_tokens=max_tokens, ignore_eos=True, **kw),
    )


async def collect(engine: Engine, request: EngineRequest, delay: float = 0.0):
    await asyncio.sleep(delay)
    ids, text, last = [], "", None
    async for ev in engine.generate(request):
        ids += ev.token_ids
        text += ev.text
        last = ev
    return ids, text, last


async def load_adapters(engine: Engine, model_dir, tmp_path, n: int = 3) -> None:
    for slot in range(n):
        path = write_lora_adapter(
            tmp_path / f"a{slot}", model_dir, rank=4 + 2 * slot, seed=slot + 1, init_scale=0.2
        )
        engine.model.set_lora(slot, load_adapter(path))


def assert_idle(engine: Engine) -> None:
    st = engine.stats()
    assert (st.queue_depth, st.running_requests) == (0, 0)
    assert st.kv_blocks_free == st.kv_blocks_total


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
async def test_mixed_batch_equals_alone(family, tiny_model_factory, tmp_path):
    model_dir = tiny_model_factory(family)
    async with running_engine(
        model_dir, num_lora_slots=4, max_lora_rank=8, max_num_batched_tokens=24
    ) as engine:
        await load_adapters(engine, model_dir, tmp_path)
        alone = [await collect(engine, req(i)) for i in range(8)]
        # all at once, and staggered so requests join while others are mid-generation
        together = await asyncio.gather(*(collect(engine, req(i)) for i in range(8)))
        staggered = await asyncio.gather(
            *(collect(engine, req(i), delay=0.005 * i) for i in range(8))
        )
        for i in range(8):
            assert together[i][0] == alone[i][0], f"request {i} (plan {PLANS[i]}) differs"
            assert staggered[i][0] == alone[i][0]
            ids, text, last = alone[i]
            assert len(ids) == 12 and last.finish_reason == "length"
            assert text == engine.tokenizer.decode(ids, skip_special_tokens=True)
        assert len({tuple(a[0]) for a in alone}) > 4  # the plans really differ
        assert_idle(engine)
        assert engine.stats().requests_completed == 24


@pytest.mark.parametrize("path", ["sdpa", "paged", "rows"])
async def test_preemption_and_chunked_prefill_keep_outputs(tiny_model_dir, tmp_path, path):
    """The prompt chunks' attention by each path: SDPA over gathered rows (the CPU's);
    "paged", the CUDA path's one Triton kernel for every chunk (interpreted here); "rows",
    every step as decode rows, a row per prompt token (the CUDA graphs' layout for small
    steps, run eagerly here)."""
    async with running_engine(tiny_model_dir, num_lora_slots=4, max_lora_rank=8) as ref:
        await load_adapters(ref, tiny_model_dir, tmp_path)
        expected = [(await collect(ref, req(i, max_tokens=40)))[0] for i in range(6)]
    # 19 usable blocks of 4 tokens: 6 requests of ~50 tokens cannot all fit -> preemption;
    # a 5-token budget chunks every prompt.
    block_bytes = 2 * 2 * 4 * 2 * 16 * 4  # (k, v) x layers x block x kv heads x head dim x fp32
    engine = Engine(
        tiny_model_dir,
        num_lora_slots=4,
        max_lora_rank=8,
        block_size=4,
        kv_memory_bytes=20 * block_bytes,
        max_num_batched_tokens=5,
    )
    await engine.start()
    runner = engine.runner
    runner.paged_prefill = path == "paged"
    runner.decode_rows_max_tokens = 5 if path == "rows" else 0
    prepare, run_rows, paged_steps, prompt_row_steps = runner._prepare, runner._run_rows, [], []

    def counting_prepare(*args):
        ids, ctx, logits_idx = prepare(*args)
        paged_steps.append(ctx.prefill_meta is not None)
        return ids, ctx, logits_idx

    def counting_run_rows(rows):
        prompt_row_steps.append(not rows.all_sample)
        return run_rows(rows)

    runner._prepare, runner._run_rows = counting_prepare, counting_run_rows
    try:
        await load_adapters(engine, tiny_model_dir, tmp_path)
        got = await asyncio.gather(*(collect(engine, req(i, max_tokens=40)) for i in range(6)))
        assert [g[0] for g in got] == expected
        assert engine.scheduler.num_preemptions > 0
        assert any(paged_steps) == (path == "paged")
        # rows: every step (its budget is 5 tokens), prompt chunks with history included
        assert (not paged_steps and any(prompt_row_steps)) == (path == "rows")
        assert_idle(engine)
    finally:
        await engine.stop()


async def test_cancellation_frees_kv_at_once(tiny_model_dir):
    async with running_engine(tiny_model_dir, num_lora_slots=4, max_lora_rank=8) as engine:
        # 1. consumer stops iterating
        stream = engine.generate(req(0, max_tokens=500))
        async with contextlib.aclosing(stream):
            async for _ in stream:
                assert engine.stats().kv_blocks_free < engine.stats().kv_blocks_total
                break
        assert_idle(engine)
        # 2. the consuming task is cancelled
        task = asyncio.create_task(collect(engine, req(1, max_tokens=500)))
        while engine.stats().running_requests == 0:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert_idle(engine)
        # 3. abort by id: the stream ends with finish_reason "cancelled"
        task = asyncio.create_task(collect(engine, req(2, max_tokens=500)))
        while engine.stats().running_requests == 0:
            await asyncio.sleep(0.001)
        assert engine.abort("r2") and not engine.abort("nope")
        _, _, last = await task
        assert last.finish_reason == "cancelled"
        assert_idle(engine)
        # a waiting request cancelled before it ever ran
        many = [asyncio.create_task(collect(engine, req(10 + i, max_tokens=30))) for i in range(5)]
        await asyncio.sleep(0)
        for t in many:
            t.cancel()
        await asyncio.gather(*many, return_exceptions=True)
        assert_idle(engine)


async def test_sampling_seeded_and_options(tiny_model_dir):
    async with running_engine(tiny_model_dir, num_lora_slots=4, max_lora_rank=8) as engine:
        greedy = (await collect(engine, req(0)))[0]
        top1 = (await collect(engine, req(0, temperature=0.8, top_k=1)))[0]
        assert top1 == greedy
        seeded = [req(i, temperature=1.0, top_p=0.9, seed=7) for i in range(4)]
        alone = [(await collect(engine, r))[0] for r in seeded]
        batch = await asyncio.gather(*(collect(engine, r) for r in seeded))
        assert [b[0] for b in batch] == alone
        other = (await collect(engine, req(0, temperature=1.0, seed=8)))[0]
        assert other != alone[0]


async def test_stop_strings_and_min_tokens(tiny_model_dir):
    async with running_engine(tiny_model_dir, num_lora_slots=4, max_lora_rank=8) as engine:
        ids, text, _ = await collect(engine, req(3, max_tokens=30))
        stop = text[len(text) // 2 : len(text) // 2 + 3]
        cut = text.index(stop)
        _, stopped_text, last = await collect(engine, req(3, max_tokens=30, stop=[stop]))
        assert last.finish_reason == "stop" and stopped_text == text[:cut]
        assert_idle(engine)
        eos = engine.tokenizer.eos_token_id
        r = EngineRequest("m", PROMPTS[0], [], SamplingOptions(max_tokens=5, min_tokens=5))
        ids, _, last = await collect(engine, r)
        assert eos not in ids[:4] and last.completion_tokens == len(ids)


async def test_rejects_bad_requests(tiny_model_dir):
    async with running_engine(
        tiny_model_dir, num_lora_slots=2, max_lora_rank=4, max_model_len=64
    ) as engine:
        bad = [
            EngineRequest("a", "x " * 80, [], SamplingOptions()),
            EngineRequest("b", "hi", [(5, 1.0)], SamplingOptions()),
            EngineRequest("c", "hi", [], SamplingOptions(top_p=0.0)),
        ]
        for r in bad:
            with pytest.raises(ValueError):
                await collect(engine, r)
        assert_idle(engine)


async def test_set_lora_while_running(tiny_model_dir, tmp_path):
    """Slot writes land between steps; requests on other slots are unaffected."""
    async with running_engine(tiny_model_dir, num_lora_slots=4, max_lora_rank=8) as engine:
        await load_adapters(engine, tiny_model_dir, tmp_path)
        expected = (await collect(engine, req(1, max_tokens=40)))[0]  # plan [(0, 1.0)]
        other = load_adapter(write_lora_adapter(tmp_path / "o", tiny_model_dir, rank=8, seed=9))
        task = asyncio.create_task(collect(engine, req(1, max_tokens=40)))
        for _ in range(20):
            await asyncio.to_thread(engine.model.set_lora, 3, other)
            await asyncio.to_thread(engine.model.reset_lora, 3)
        assert (await task)[0] == expected


def test_schedule_orders_decodes_then_fresh_prompts_by_length():
    """Decode-shaped entries first, fresh prompt chunks by length (equal lengths side by side:
    one attention call each run), then a chunk that continues its prompt."""
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=64)
    opts = SamplingOptions(max_tokens=4)

    def seq(name: str, prompt: int, computed: int = 0) -> Sequence:
        s = Sequence(name, list(range(3, 3 + prompt)), prompt, opts, [], max_tokens=4)
        s.num_computed = computed
        return s

    running = [seq("dec", 6, computed=6), seq("cont", 12, computed=4)]
    running[0].token_ids.append(9)  # sampled last step: one token to decode
    for s in running:
        sched.blocks.allocate(s, s.num_computed)
        s.status = SeqStatus.RUNNING
        sched.running.append(s)
    for name, n in (("a5", 5), ("b3", 3), ("c5", 5), ("d3", 3)):
        sched.add(seq(name, n))
    order = [(s.request_id, n) for s, n in sched.schedule().entries]
    assert order == [("dec", 1), ("b3", 3), ("d3", 3), ("a5", 5), ("c5", 5), ("cont", 8)]


def test_decode_rows_lay_out_prompt_tokens_and_refuse_costly_steps():
    """A decode entry is one row, a prompt chunk a row per token (context length = position
    + 1, the sequence's block table and plan); only entries that finish their tokens sample.
    Steps with more tokens than the graphs hold, or whose prompt rows would read too much
    context, stay eager (None)."""
    from executor_svc.engine.model_runner import ROWS_MAX_PROMPT_CONTEXT, decode_rows

    opts = SamplingOptions(max_tokens=4)

    def seq(prompt: int, computed: int) -> Sequence:
        s = Sequence("s", list(range(10, 10 + prompt)), prompt, opts, [], max_tokens=4)
        s.num_computed = computed
        return s

    dec, fresh, part = seq(6, 5), seq(3, 0), seq(9, 2)  # part: tokens 2..5 of 9 this step
    entries = [(dec, 1), (fresh, 3), (part, 4)]
    plans = [((0, 1.0),), (), ((1, 0.5), (2, 0.5))]
    rows = decode_rows(entries, [[3, 7], [5], [6, 8]], plans, max_rows=8)
    assert rows.ids.tolist() == [15, 10, 11, 12, 12, 13, 14, 15]
    assert rows.pos.tolist() == [5, 0, 1, 2, 2, 3, 4, 5]
    assert rows.tables == [[3, 7], [5], [5], [5], [6, 8], [6, 8], [6, 8], [6, 8]]
    assert rows.plans == [plans[0]] + [plans[1]] * 3 + [plans[2]] * 4
    assert rows.logits_rows == [0, 3] and not rows.all_sample
    assert decode_rows(entries, [[3, 7], [5], [6, 8]], plans, max_rows=7) is None
    n = 64
    history = (ROWS_MAX_PROMPT_CONTEXT - n * (n + 1) // 2) // n  # exactly at the limit
    long = seq(history + n + 1, history)
    assert decode_rows([(long, n)], [[0]], [()], max_rows=n) is not None
    long.num_computed += 1
    assert decode_rows([(long, n)], [[0]], [()], max_rows=n) is None


def test_decode_graphs_are_captured_for_the_most_adapters_a_replay_carries():
    """A decode graph is captured with one active token, but its metadata counts the most
    distinct adapters a replay of it can carry (k a tile, plan mode), since host-side choices
    made at capture, such as where the fused kernel's shrink runs, stay in the graph. Every
    step routed to the graph (its tiles padded to the graph's) uses no more."""
    import torch

    from executor_svc.engine.model_runner import GRAPH_META_MODE, graph_capture_meta, tile_pads
    from kernels import build_lora_meta

    cpu, slots_total, checked = torch.device("cpu"), 24, 0
    for b, k in ((1, 1), (8, 1), (8, 4), (64, 1), (64, 4)):
        for pad in tile_pads(b):
            captured = graph_capture_meta(b, k, pad, slots_total, cpu)
            assert captured.num_active == 1 and captured.grid_tiles == pad
            assert captured.num_used == min(pad * k, slots_total)
            # a step of `pad` distinct plans of k distinct adapters each, as a replay sends it
            plans = (torch.arange(b * k, dtype=torch.int32).view(b, k) % (pad * k)) % slots_total
            step = build_lora_meta(plans, torch.ones(b, k), slots_total, cpu,
                                   pad_tiles_to=tile_pads(b), mode=GRAPH_META_MODE)  # fmt: skip
            if step.grid_tiles == pad:
                assert step.num_used <= captured.num_used
                checked += 1
    assert checked >= 10


async def test_kernel_warm_up_launches_every_attention_and_sampling_variant(tiny_model_dir):
    """The warm-up that CUDA engines run before serving (here interpreted): the decode kernel
    at split counts 1-16, the prefill kernel's two configs, the seeded sampler."""
    async with running_engine(tiny_model_dir, num_lora_slots=2, max_lora_rank=8) as engine:
        assert engine.runner.warm_up_kernels() == 5 + 2 + 1
        assert_idle(engine)


def test_abort_between_schedule_and_step_keeps_the_step_consistent(tiny_model_dir):
    """abort() (event-loop thread) frees a sequence's blocks while the worker thread is between
    schedule() and the end of the step: the step must use the block tables it was scheduled
    with. Reading the live, emptied ``seq.block_table`` raised IndexError on CPU; on CUDA the
    decode block table lost its width and the paged-attention kernel read past it."""
    engine = Engine(tiny_model_dir, num_lora_slots=4, max_lora_rank=8, max_num_seqs=8)
    engine._load()  # no worker thread: this test plays its role, step by step
    sched, runner = engine.scheduler, engine.runner
    seqs = [engine._make_sequence(req(i, max_tokens=20)) for i in range(3)]
    for s in seqs[:2]:
        sched.add(s)
    batch = sched.schedule()  # both prompts
    runner.execute(batch)
    for s, n in batch.entries:
        s.num_computed += n
        s.token_ids.append(1)
    sched.add(seqs[2])
    batch = sched.schedule()  # two decodes + one prefill: the eager path
    assert [n for _, n in batch.entries][:2] == [1, 1] and len(batch.entries) == 3
    for s in seqs[:2]:  # what abort() does under the engine lock, racing the step
        sched.finish(s, "cancelled")
        assert s.block_table == []
    tokens = runner.execute(batch)
    assert len(tokens) == 3
    assert engine.blocks.num_free == engine.blocks.num_usable - len(seqs[2].block_table)


def test_lora_warm_up_covers_each_bucket_and_adapter_count(tiny_model_dir):
    """The start-up warm-up (run on CUDA, where Triton compiles per variant; its GPU test checks
    that serving then compiles nothing) visits every token bucket up to the step budget, 1-4
    adapters per token, both metadata modes above one adapter, the 4 projections each."""
    from kernels.config import token_buckets

    engine = Engine(tiny_model_dir, num_lora_slots=4, max_lora_rank=8, max_num_seqs=8)
    engine._load()
    sizes = [t for t in token_buckets("cpu") if t < 100] + [100]
    assert engine.runner.warm_up_lora(100) == len(sizes) * (1 + 2 + 2 + 2) * 4
    no_slots = Engine(tiny_model_dir, num_lora_slots=0, max_lora_rank=8, max_num_seqs=8)
    no_slots._load()
    assert no_slots.runner.warm_up_lora(100) == 0
