"""Whole-sequence forward passes outside the engine (equivalence tests, scoring).

Each sequence gets a private scratch KV cache; the paged layout is the same as the engine's.
"""

from __future__ import annotations

import torch

from executor_svc.model.context import PrefillChunk, StepContext
from executor_svc.model.llama import CausalLM
from kernels import build_lora_meta


@torch.inference_mode()
def batch_logits(
    model: CausalLM, sequences: list[list[int]], plans: list[list[tuple[int, float]]] | None = None
) -> list[torch.Tensor]:
    """Logits [len(seq), vocab] (fp32) of every position of every sequence, run as ONE step
    with one prefill chunk per sequence and each sequence under its own LoRA plan."""
    plans = plans or [[] for _ in sequences]
    c, dev = model.config, model.device
    total = sum(len(s) for s in sequences)
    kv = torch.zeros(
        c.num_layers, 2, total, c.num_kv_heads, c.head_dim, dtype=model.dtype, device=dev
    )
    ids = torch.tensor([t for s in sequences for t in s], device=dev)
    positions = torch.cat([torch.arange(len(s)) for s in sequences]).to(dev)
    chunks, start = [], 0
    for s in sequences:
        chunks.append(PrefillChunk(start=start, length=len(s)))
        start += len(s)
    ctx = StepContext(
        positions=positions, slot_mapping=torch.arange(total, device=dev), prefills=chunks
    )
    k = max(len(p) for p in plans)
    if k:
        slots = torch.full((total, k), -1, dtype=torch.int32)
        weights = torch.zeros(total, k)
        for ch, plan in zip(chunks, plans, strict=True):
            for j, (slot, w) in enumerate(plan):
                slots[ch.start : ch.start + ch.length, j] = slot
                weights[ch.start : ch.start + ch.length, j] = w
        ctx.lora = build_lora_meta(slots, weights, model.num_slots, dev)
    hidden = model(ids, ctx, [(kv[i, 0], kv[i, 1]) for i in range(c.num_layers)])
    logits = model.compute_logits(hidden)
    return [logits[ch.start : ch.start + ch.length] for ch in chunks]
