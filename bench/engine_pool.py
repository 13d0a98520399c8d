"""The "64 distinct adapters out of 1,000 registered" case of bench/engine_bench.py.

The pool is a local adapter directory (``LocalDirSource``, what ``LORASERVE_EXECUTOR_ADAPTER_DIR``
serves) of 1,000 PEFT adapters, rank 16 on all 7 projections of the 7B shape, 80 MB each. To fit
the disk, the 1,000 directories share ``--pool-files`` distinct weight files by hard link; each
is a separate adapter to the executor (its own id, host-cache entry and slot). Every request
takes a lease on its adapter through the serving layer's path (``SlotManager`` ->
``AdapterStore``: resolve, read and parse safetensors, pack into pinned memory, ``set_lora``),
then decodes on the slot it got, as ``ExecutorRuntime.generate`` does (without gRPC).

Timed twice: *cold* (the 64 adapters are on disk only: every swap-in is inside the timed run)
and *warm* (the same 64 requests again, adapters resident); with the host cache in pageable
memory (the default) and page-locked (``pin_host_cache``), per ``--pool-pin``, and with the
serving layer's packed read of safetensors or safetensors' own loader, per ``--pool-read``.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from executor_svc.adapters.host_cache import HostCache, pack_weights
from executor_svc.adapters.local_source import LocalDirSource
from executor_svc.adapters.refs import AdapterKey
from executor_svc.adapters.slot_manager import SlotManager
from executor_svc.adapters.store import AdapterStore
from executor_svc.engine.types import LoraModuleWeights
from executor_svc.model.lora_loader import load_adapter

MODULE_PATHS = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}


def write_pool(model, root: Path, *, pool: int, files: int, rank: int) -> None:
    """``pool`` adapter dirs p0..p{pool-1} over ``files`` distinct random weight files."""
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": sorted(MODULE_PATHS),
        "base_model_name_or_path": "llama-2-7b-shaped",
    }
    dev = model.device
    gen = torch.Generator(device=dev).manual_seed(7)
    blobs = []
    for f in range(files):
        tensors = {}
        for i, layer in enumerate(model.layers):
            for m in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj):
                for name, out in zip(m.names, m.out_sizes, strict=True):
                    key = f"base_model.model.model.layers.{i}.{MODULE_PATHS[name]}.{name}"
                    a = torch.randn(rank, m.in_features, device=dev, generator=gen)
                    b = torch.randn(out, rank, device=dev, generator=gen) * 0.01
                    tensors[f"{key}.lora_A.weight"] = (a / m.in_features**0.5).bfloat16().cpu()
                    tensors[f"{key}.lora_B.weight"] = b.bfloat16().cpu()
        blob = root / f"blob{f}.safetensors"
        save_file(tensors, blob)
        blobs.append(blob)
    for i in range(pool):
        out = root / f"p{i}"
        out.mkdir(parents=True, exist_ok=True)
        (out / "adapter_config.json").write_text(json.dumps(config))
        os.link(blobs[i % files], out / "adapter_model.safetensors")


async def pool_case(engine, batch: int, prompts, run_case, *, root: Path, args) -> list[dict]:
    """Cold and warm runs of ``batch`` requests on ``batch`` distinct adapters of the pool."""
    model = engine.model
    t = time.perf_counter()
    write_pool(model, root, pool=args.pool, files=args.pool_files, rank=model.max_rank)
    written_s = time.perf_counter() - t
    spent, timed = _stage_timer()
    host = HostCache(args.pool_host_cache_gib << 30, pin_memory=args.pool_pin)
    read = (
        (lambda path: load_adapter(path, dtype=model.dtype, packed=True, pin=host.pin))
        if args.pool_read == "packed"
        else (lambda path: load_adapter(path, dtype=model.dtype))
    )
    store = AdapterStore(
        LocalDirSource(root),
        host,
        timed("parse", read),
        max_rank=model.max_rank,
        max_concurrent_builds=args.pool_load_concurrency,
    )
    slots = SlotManager(
        model, store, model.num_slots, slot_bytes=model.lora_bytes_per_slot(), wait_timeout_s=600
    )
    chosen = random.Random(0).sample(range(args.pool), batch)
    store.host_cache.prepare = timed("pack", store.host_cache.prepare)
    model.set_lora = timed("set_lora", model.set_lora)  # undone below: the engine outlives us
    rows = []
    try:
        for phase in ("cold", "warm"):
            loads0 = slots.loads
            t0 = time.perf_counter()
            leases = [None] * batch

            async def plan(i: int, leases=leases) -> list[tuple[int, float]]:
                leases[i] = await slots.acquire([AdapterKey(f"p{chosen[i]}", 1)])
                return [(leases[i].indices[0], 1.0)]

            r = await run_case(engine, batch, plan, prompts, t0=t0)
            for lease in leases:
                lease.release()
            rows.append(
                {
                    "case": f"{batch}_of_{args.pool}_registered_{phase}",
                    "pool": args.pool,
                    "pool_weight_files": args.pool_files,
                    "load_concurrency": args.pool_load_concurrency,
                    "pinned_host_cache": args.pool_pin,
                    "read": args.pool_read,
                    "pool_written_s": round(written_s, 1),
                    "swap_ins": slots.loads - loads0,
                    **r,
                    # summed over the loads (they overlap): parse, pack + pin, slot write (with
                    # its wait for the step lock)
                    **{f"{k}_s_sum": round(v, 2) for k, v in spent.items()},
                }
            )
            spent.update(dict.fromkeys(spent, 0.0))
    finally:
        del model.set_lora
    rows.append(swap_cost(model, store, AdapterKey(f"p{chosen[0]}", 1)))
    return rows


def _stage_timer():
    """(sums, wrap): ``wrap(name, fn)`` adds each call's wall time to ``sums[name]``."""
    spent = {"parse": 0.0, "pack": 0.0, "set_lora": 0.0}

    def timed(name, fn):
        def run(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[name] += time.perf_counter() - t

        return run

    return spent, timed


def swap_cost(model, store: AdapterStore, key: AdapterKey, reps: int = 10) -> dict:
    """set_lora time of one cached adapter: one buffer (one copy) vs one tensor per module."""
    packed = store.host_cache.get(key)
    pin = model.device.type == "cuda"
    sync = torch.cuda.synchronize if pin else (lambda: None)
    per_module = {
        layer: {
            n: LoraModuleWeights(_copy(m.a, pin), _copy(m.b, pin), m.scale) for n, m in mods.items()
        }
        for layer, mods in packed.items()
    }
    slot = model.num_slots - 1
    out = {"case": "swap_cost_7b", "adapter_bytes": model.lora_bytes_per_slot()}
    pageable = pack_weights(packed, pin=False)
    pinned = pack_weights(packed, pin=pin)
    for name, weights in (
        ("one_copy", pinned),
        ("one_copy_pageable", pageable),
        ("per_module", per_module),
    ):
        times = []
        for _ in range(reps):
            sync()
            t = time.perf_counter()
            model.set_lora(slot, weights)
            sync()
            times.append(time.perf_counter() - t)
        ms = sorted(times)[reps // 2] * 1e3
        out[f"{name}_ms_p50"] = round(ms, 3)
        out[f"{name}_gb_s"] = round(out["adapter_bytes"] / ms / 1e6, 2)
    return out


def _copy(t: torch.Tensor, pin: bool) -> torch.Tensor:
    return t.clone().pin_memory() if pin else t.clone()
