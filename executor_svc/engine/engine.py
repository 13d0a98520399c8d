"""The async engine the serving layer drives: submit requests, stream tokens, manage slots.

One worker thread runs the step loop (schedule -> model step -> postprocess) so the asyncio
loop serving gRPC stays responsive. Shared state (scheduler, blocks) is guarded by ``_lock``,
held only while scheduling and postprocessing, never during the forward; ``model.step_lock``
is held while a step's device work is queued, so ``model.set_lora``/``reset_lora`` (which take
it) are queued between steps, on the same stream, and run on the device after the step's
kernels: never under a running batch. The lock is not held while the step thread waits for the
sampled tokens, so adapters loading for waiting requests are queued during that wait instead
of waiting out the step's GPU time.

Results cross back through one ordered outbox, sent with one ``call_soon_threadsafe``: a
step's tokens are sent once the *next* step's GPU work is queued (or at once when the loop
goes idle), so the event loop turns them into stream messages while the GPU computes and the
step thread waits for it with the GIL released. Sent straight after postprocessing, the event
loop's per-request Python competed for the GIL with the step thread building the next step;
the new order gave +3 to +13% decode tokens/s on the H100 (docs/benchmarks.md, 2026-11-25).

Sizing: the KV cache gets ``kv_memory_bytes`` (or, if not given, enough blocks for
``max_num_seqs`` full-length sequences), split into blocks of ``block_size`` tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import torch

from executor_svc.engine.block_manager import BlockManager
from executor_svc.engine.detokenizer import IncrementalDetokenizer
from executor_svc.engine.merging import MergePolicy
from executor_svc.engine.model_runner import ROW_GRAPH_SIZES, ModelRunner, kv_bytes_per_block
from executor_svc.engine.scheduler import Scheduler
from executor_svc.engine.sequence import SeqStatus, Sequence
from executor_svc.engine.types import EngineRequest, EngineStats, TokenEvent
from executor_svc.model.llama import CausalLM
from executor_svc.model.loader import build_model, init_random, load_model


class Engine:
    def __init__(
        self,
        model_dir: str | Path | None,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        num_lora_slots: int = 8,
        max_lora_rank: int = 16,
        kv_memory_bytes: int | None = None,
        max_num_seqs: int = 64,
        max_model_len: int | None = None,
        max_num_batched_tokens: int | None = None,
        block_size: int = 16,
        cuda_graph_batch_sizes: list[int] | None = None,
        hf_config=None,
        tokenizer=None,
        seed: int = 0,
        merge_policy: MergePolicy | None = None,
    ):
        """``model_dir``: a local checkpoint; or None with ``hf_config`` for random weights."""
        self.device = torch.device(device)
        if isinstance(dtype, str):
            dtype = None if dtype == "auto" else getattr(torch, dtype.removeprefix("torch."))
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.model_dir, self.hf_config, self._tokenizer = model_dir, hf_config, tokenizer
        self.num_lora_slots, self.max_lora_rank = num_lora_slots, max_lora_rank
        self.kv_memory_bytes, self.max_num_seqs = kv_memory_bytes, max_num_seqs
        self.max_model_len, self.block_size, self.seed = max_model_len, block_size, seed
        self.max_num_batched_tokens = max_num_batched_tokens or 512
        self.cuda_graph_batch_sizes = cuda_graph_batch_sizes
        self.merge_policy = merge_policy or MergePolicy()
        self._model: CausalLM | None = None
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._seqs: dict[str, Sequence] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._completed = 0
        self._generated = 0
        self.error: BaseException | None = None
        # (queue, item) deliveries in order, and whether the step loop is idle (waiting for
        # work, or not running): then nothing else would send them, so they go at once.
        self._outbox: list = []
        self._idle = True
        # False sends each step's tokens as soon as they are postprocessed (the earlier order;
        # kept for benchmark comparisons).
        self.send_after_launch = True

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the model, allocate the KV cache, capture graphs; then start the step loop."""
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._load)
        # The model, graphs and compiled kernels live as long as the engine: moved out of the
        # collector's generations, they are not traversed again by every full collection (a
        # pause in whichever step it lands in).
        gc.collect()
        gc.freeze()
        self._thread = threading.Thread(target=self._run, name="engine-step-loop", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        kw = {
            "device": self.device,
            "dtype": self.dtype,
            "num_slots": self.num_lora_slots,
            "max_rank": self.max_lora_rank,
        }
        if self.model_dir is not None:
            model = load_model(self.model_dir, **kw)
            if self._tokenizer is None:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        else:
            torch.manual_seed(self.seed)
            model = init_random(build_model(self.hf_config, **kw), seed=self.seed)
        cfg = model.config
        limit = min(cfg.max_position_embeddings, cfg.sliding_window or 1 << 30)
        self.max_model_len = min(self.max_model_len or limit, limit)
        per_block = kv_bytes_per_block(model, self.block_size)
        if self.kv_memory_bytes is not None:
            num_blocks = self.kv_memory_bytes // per_block
        else:
            num_blocks = self.max_num_seqs * -(-self.max_model_len // self.block_size) + 1
        sizes = self.cuda_graph_batch_sizes
        if sizes is None:
            sizes = [
                b
                for b in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
                if b < self.max_num_seqs
            ] + [self.max_num_seqs]
            # Graphs past the batch limit serve steps with prompt rows only (model_runner's
            # DecodeRows): the decodes plus a short prompt or the last chunk of a long one.
            sizes += [
                b for b in ROW_GRAPH_SIZES if self.max_num_seqs < b <= self.max_num_batched_tokens
            ]
        self.blocks = BlockManager(num_blocks, self.block_size)
        self.scheduler = Scheduler(
            self.blocks,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
        )
        self.runner = ModelRunner(
            model,
            num_blocks=num_blocks,
            block_size=self.block_size,
            max_model_len=self.max_model_len,
            graph_batch_sizes=sizes,
            lora_warm_up_tokens=self.max_num_batched_tokens,
            merge_policy=self.merge_policy,
        )
        self._model = model

    async def stop(self) -> None:
        with self._lock:
            self._stopping = True
            for seq in list(self._seqs.values()):
                self._finish(seq, "cancelled", [])
            self._wake.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    @property
    def model(self) -> CausalLM:
        if self._model is None:
            raise RuntimeError("Engine.start() has not completed")
        return self._model

    @property
    def tokenizer(self):
        return self._tokenizer

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(
                queue_depth=len(self.scheduler.waiting),
                running_requests=len(self.scheduler.running),
                kv_blocks_total=self.blocks.num_usable,
                kv_blocks_free=self.blocks.num_free,
                requests_completed=self._completed,
                tokens_generated=self._generated,
                device=str(self.device),
                merged_slot=self.model.merged_slot,
                merge_switches=self.model.merge_switches,
            )

    # -- requests ----------------------------------------------------------------------------

    async def generate(self, request: EngineRequest) -> AsyncIterator[TokenEvent]:
        """Stream a request's tokens. Leaving the iteration early (break + aclose, or task
        cancellation) aborts the request and frees its KV blocks in the ``finally``."""
        seq = self._make_sequence(request)
        queue: asyncio.Queue = asyncio.Queue()
        seq.sink = queue
        t0 = time.monotonic()
        ttft = None
        detok = IncrementalDetokenizer(
            self._tokenizer, request.sampling.stop, request.sampling.min_tokens
        )
        with self._lock:
            if self._stopping:
                raise RuntimeError("engine is stopping")
            if request.request_id in self._seqs:
                raise ValueError(f"duplicate request_id {request.request_id!r}")
            self._seqs[request.request_id] = seq
            self.scheduler.add(seq)
            self._wake.notify()
        done = False
        try:
            while not done:
                token_ids, finish = await queue.get()
                if isinstance(finish, BaseException):
                    raise finish
                if ttft is None and token_ids:
                    ttft = (time.monotonic() - t0) * 1000.0
                text, stopped = detok.push(token_ids, final=finish is not None)
                if stopped:
                    finish = "stop"
                    self.abort(request.request_id, reason="stop", notify=False)
                done = finish is not None
                yield TokenEvent(
                    request_id=request.request_id,
                    token_ids=token_ids,
                    text=text,
                    finish_reason=finish,
                    prompt_tokens=seq.num_prompt_tokens,
                    completion_tokens=len(detok.ids),
                    time_to_first_token_ms=ttft,
                )
        finally:
            if not done:
                self.abort(request.request_id, notify=False)

    def abort(self, request_id: str, *, reason: str = "cancelled", notify: bool = True) -> bool:
        """Finish a request now (its blocks are freed before this returns)."""
        with self._lock:
            seq = self._seqs.get(request_id)
            if seq is None:
                return False
            self._finish(seq, reason, [] if notify else None)
            return True

    def _make_sequence(self, request: EngineRequest) -> Sequence:
        ids = request.prompt_token_ids
        if ids is None:
            if self._tokenizer is None:
                raise ValueError("no tokenizer: pass prompt_token_ids")
            ids = self._tokenizer(request.prompt)["input_ids"]
        ids = list(ids)
        if not ids:
            raise ValueError("empty prompt")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt of {len(ids)} tokens leaves no room under max_model_len "
                f"{self.max_model_len}"
            )
        need = self.blocks.blocks_for(
            min(len(ids) + request.sampling.max_tokens, self.max_model_len)
        )
        if need > self.blocks.num_usable:
            raise ValueError(
                f"request needs {need} KV blocks; the cache has {self.blocks.num_usable}"
            )
        if len(request.adapters) > 4:
            raise ValueError("at most 4 adapters per request")
        for slot, _ in request.adapters:
            if not 0 <= slot < self.num_lora_slots:
                raise ValueError(f"adapter slot {slot} outside [0, {self.num_lora_slots})")
        sp = request.sampling
        if sp.max_tokens < 1 or sp.temperature < 0 or not 0 < sp.top_p <= 1 or sp.top_k < 0:
            raise ValueError("invalid sampling options")
        return Sequence(
            request_id=request.request_id,
            token_ids=ids,
            num_prompt_tokens=len(ids),
            sampling=sp,
            adapters=[(int(s), float(w)) for s, w in request.adapters],
            max_tokens=min(sp.max_tokens, self.max_model_len - len(ids)),
        )

    # -- the step loop (worker thread) -------------------------------------------------------

    def _finish(self, seq: Sequence, reason: str, last: list[int] | None) -> None:
        """Under ``_lock``: free the sequence; if ``last`` is given, send the final event."""
        if seq.status is SeqStatus.FINISHED:
            return
        self.scheduler.finish(seq, reason)
        self._seqs.pop(seq.request_id, None)
        self._completed += 1
        if last is not None:
            self._outbox.append((seq.sink, (last, reason)))
            if self._idle:
                self._send_outbox()

    def _send_outbox(self) -> None:
        """Under ``_lock``: hand every pending delivery to the event loop, in order."""
        if not self._outbox:
            return
        items, self._outbox = self._outbox, []

        def deliver():
            for q, item in items:
                q.put_nowait(item)

        self._loop.call_soon_threadsafe(deliver)

    def _step_launched(self) -> None:
        """Called by the runner once the step's GPU work is queued, before it waits."""
        with self._lock:
            self._send_outbox()

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._stopping and not self.scheduler.has_work():
                        self._idle = True
                        self._send_outbox()
                        self._wake.wait()
                    self._idle = False
                    if self._stopping:
                        return
                    batch = self.scheduler.schedule()
                if not batch.entries:
                    self._step_launched()
                    time.sleep(0.001)
                    continue
                tokens = self.runner.execute(
                    batch, on_launched=self._step_launched, lock=self.model.step_lock
                )
                with self._lock:
                    self._postprocess(batch, tokens)
        except BaseException as exc:  # surface to every waiting consumer
            self.error = exc
            with self._lock:
                for seq in list(self._seqs.values()):
                    self.scheduler.finish(seq, "error")
                    self._outbox.append((seq.sink, ([], exc)))
                self._seqs.clear()
        finally:
            with self._lock:
                self._idle = True
                self._send_outbox()

    def _postprocess(self, batch, tokens: list[int]) -> None:
        it = iter(tokens)
        eos = set(self.model.config.eos_token_ids)
        for seq, n in batch.entries:
            samples = seq.num_computed + n == seq.num_tokens
            token = next(it) if samples else None
            if seq.status is not SeqStatus.RUNNING:
                continue  # aborted or preempted while the step ran
            seq.num_computed += n
            if token is None:
                continue
            seq.token_ids.append(token)
            self._generated += 1
            reason = None
            if (
                token in eos
                and not seq.sampling.ignore_eos
                and seq.num_completion_tokens > seq.sampling.min_tokens - 1
            ):
                reason = "eos"
            elif seq.num_completion_tokens >= seq.max_tokens:
                reason = "length"
            if reason:
                self.scheduler.finish(seq, reason)
                self._seqs.pop(seq.request_id, None)
                self._completed += 1
            self._outbox.append((seq.sink, ([token], reason)))
        if not self.send_after_launch:
            self._send_outbox()


@contextlib.asynccontextmanager
async def running_engine(*args, **kwargs) -> AsyncIterator[Engine]:
    """``async with running_engine(model_dir, device="cpu") as engine: ...``"""
    engine = Engine(*args, **kwargs)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()
