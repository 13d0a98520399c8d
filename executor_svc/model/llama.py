"""Llama-family decoder (Llama, Mistral, Qwen2) over the paged KV cache, with LoRA slots.

The three families share one graph: RMSNorm -> attention (fused qkv, RoPE, GQA) -> RMSNorm ->
SwiGLU MLP (fused gate/up); Qwen2 adds a qkv bias. The seven projections are LoRA-aware
(:class:`LoRALinear`), so one step can run every token under its own adapter mixture.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from executor_svc.engine.types import AdapterWeights
from executor_svc.model.config import ModelConfig
from executor_svc.model.context import StepContext
from executor_svc.model.layers.attention import PagedAttention
from executor_svc.model.layers.fused_ops import silu_and_mul
from executor_svc.model.layers.lora_linear import LoRALinear
from executor_svc.model.layers.norm import RMSNorm
from executor_svc.model.layers.rotary import RotaryEmbedding
from executor_svc.model.lora_merge import fold_slot
from executor_svc.model.lora_slots import LoraSite, LoraSlotStore

# checkpoint module name -> (our fused module, slice name)
FUSED = {
    "q_proj": ("qkv_proj", "q_proj"),
    "k_proj": ("qkv_proj", "k_proj"),
    "v_proj": ("qkv_proj", "v_proj"),
    "o_proj": ("o_proj", "o_proj"),
    "gate_proj": ("gate_up_proj", "gate_proj"),
    "up_proj": ("gate_up_proj", "up_proj"),
    "down_proj": ("down_proj", "down_proj"),
}


def _pageable(weights: AdapterWeights) -> bool:
    """Whether some tensor of ``weights`` is in pageable host memory."""
    return any(
        t.device.type == "cpu" and not t.is_pinned()
        for mods in weights.values()
        for m in mods.values()
        for t in (m.a, m.b)
    )


def lora_sites(cfg: ModelConfig, layer: int) -> list[LoraSite]:
    """The layer's LoRA-aware projections, in checkpoint order: qkv, o, gate/up, down."""
    h, q, kv, i = (
        cfg.hidden_size,
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
        cfg.intermediate_size,
    )
    return [
        LoraSite(layer, h, ("q_proj", "k_proj", "v_proj"), (q, kv, kv)),
        LoraSite(layer, q, ("o_proj",), (h,)),
        LoraSite(layer, h, ("gate_proj", "up_proj"), (i, i)),
        LoraSite(layer, i, ("down_proj",), (h,)),
    ]


class DecoderLayer(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        rotary: RotaryEmbedding,
        layer: int,
        store: LoraSlotStore | None,
        dtype: torch.dtype,
        device: torch.device,
    ):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_size, self.kv_size = cfg.num_heads * d, cfg.num_kv_heads * d
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps, dtype, device)
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps, dtype, device)
        bias = (cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias, cfg.mlp_bias)
        proj = []
        for j, site in enumerate(lora_sites(cfg, layer)):
            views = store.views(4 * layer + j) if store is not None else None
            proj.append(
                LoRALinear(
                    site.in_features,
                    list(site.out_sizes),
                    list(site.names),
                    bias=bias[j],
                    slots=views,
                    dtype=dtype,
                    device=device,
                )
            )
        self.qkv_proj, self.o_proj, self.gate_up_proj, self.down_proj = proj
        self.attn = PagedAttention(cfg.num_heads, cfg.num_kv_heads, d)
        self.rotary = rotary

    def forward(
        self, x: torch.Tensor, kv_cache, ctx: StepContext, down: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the residual stream [T, hidden]; down: the previous layer's down projection, not
        yet added (None before the first layer). Returns (x, this layer's down projection):
        each residual add is done by the norm that follows it (one launch on CUDA)."""
        t = x.shape[0]
        # In a captured step each projection's LoRA delta is added by the ops that consume
        # the projection (the RoPE launch, v's delta too; the residual adds; the SiLU-and-mul),
        # so that the delta's kernels run beside the GEMMs (kernels.linear_beside_lora); in
        # eager steps the qkv and gate/up deltas come back inside the projections. x, this
        # layer's own residual stream, takes the o and down deltas in place, in both.
        if down is None:
            h = self.input_layernorm(x)
        else:
            x, h = self.input_layernorm(x, down)
        qkv, delta = self.qkv_proj.forward_beside(h, ctx.lora)
        sizes = [self.q_size, self.kv_size, self.kv_size]
        q, k, v = qkv.split(sizes, dim=-1)
        dq = dk = dv = None
        if delta is not None:
            dq, dk, dv = delta.split(sizes, dim=-1)
            dq = dq.view(t, self.num_heads, self.head_dim)
            dk = dk.view(t, self.num_kv_heads, self.head_dim)
            dv = dv.view(t, self.num_kv_heads, self.head_dim)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        # RoPE writes k and v to the cache too (one launch on CUDA, not three)
        q, k, v = self.rotary(ctx.positions, q, k, v, dq, dk, dv, kv_cache, ctx.slot_mapping)
        a = self.attn(q, k, v, kv_cache, ctx, write_kv=False).reshape(t, self.q_size)
        o, x = self.o_proj.forward_beside(a, ctx.lora, into=x)
        x, h = self.post_attention_layernorm(x, o)
        gate_up, delta = self.gate_up_proj.forward_beside(h, ctx.lora)
        if gate_up.is_cuda:
            act = silu_and_mul(gate_up, delta)
        else:
            gate, up = (gate_up if delta is None else gate_up + delta).chunk(2, dim=-1)
            act = F.silu(gate) * up
        down, x = self.down_proj.forward_beside(act, ctx.lora, into=x)
        return x, down


class CausalLM(nn.Module):
    """The served model. ``num_slots`` adapters of rank <= ``max_rank`` live on the device."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
        max_positions: int,
    ):
        super().__init__()
        self.config, self.num_slots, self.max_rank = cfg, num_slots, max_rank
        self.dtype, self.device = dtype, device
        # Held by the engine while a step's device work is queued; slot writes take it, so their
        # copies are queued between steps' kernels (one stream) and never run under a batch.
        self.step_lock = threading.RLock()
        self.lora_store = None
        # dLoRA's merged mode: the slot whose adapter is folded into the base weights (its
        # requests then need no LoRA work; the others subtract it), and how often the mode
        # changed. See merge_lora and executor_svc.engine.merging.
        self._merged_slot: int | None = None
        self.merge_switches = 0
        # Slot writes from pageable host memory go through their own stream (see set_lora).
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        if num_slots > 0 and max_rank > 0:
            sites = [site for i in range(cfg.num_layers) for site in lora_sites(cfg, i)]
            self.lora_store = LoraSlotStore(
                sites, num_slots=num_slots, max_rank=max_rank, dtype=dtype, device=device
            )
        self.rotary = RotaryEmbedding(cfg, max_positions).to(device)
        self.embed_tokens = nn.Embedding(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device
        )
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, self.rotary, i, self.lora_store, dtype, device)
            for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        if cfg.tie_word_embeddings:
            self.lm_head_weight = self.embed_tokens.weight
        else:
            self.lm_head = nn.Parameter(
                torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device),
                requires_grad=False,
            )
            self.lm_head_weight = self.lm_head

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        ctx: StepContext,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """input_ids: [T] -> final hidden states [T, hidden] (normed)."""
        x, down = self.embed_tokens(input_ids), None
        for layer, kv in zip(self.layers, kv_caches, strict=True):
            x, down = layer(x, kv, ctx, down)
        return self.norm(x, down)[1]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head_weight).float()

    # -- adapter slots (called by the serving layer, between steps; see Engine) --------------

    def lora_layers(self) -> list[tuple[int, LoRALinear]]:
        return [
            (i, m)
            for i, layer in enumerate(self.layers)
            for m in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj)
        ]

    def set_lora(self, slot: int, weights: AdapterWeights) -> None:
        """Write every layer's A/B/scale/rank of ``slot``; modules absent get rank 0.

        Raises ValueError, leaving the slot untouched, for modules the model lacks, a rank
        over ``max_rank`` or shapes that do not fit. See :mod:`executor_svc.model.lora_slots`
        for the copies this makes. The merged slot is unmerged first (its weights are what
        the unmerge subtracts).

        The caller guarantees that no running request names ``slot`` (the slot manager only
        writes slots nobody holds). On CUDA, weights in page-locked or device memory are copied
        on the step stream between two steps (queued in microseconds under the step lock); weights
        in pageable memory (a cold adapter, not worth pinning: a new 80 MB page-locked buffer
        took 100-350 ms on the H100 host, the copy 5-16 ms) are copied on a stream of their
        own while steps run, and the step stream waits for that copy before its next step."""
        self._check_slot(slot)
        staged = self._copy_stream is not None and _pageable(weights)
        with self.step_lock:
            if slot == self._merged_slot:
                self.lora_store.check(weights)  # a bad adapter must not unmerge either
                self.unmerge_lora()
                if staged:  # the unmerge reads the slot: the copy waits for it
                    self._copy_stream.wait_event(
                        torch.cuda.current_stream(self.device).record_event()
                    )
            if not staged:
                self.lora_store.write(slot, weights)
                return
        # No wait for the steps queued so far: none of them reads the slot (a request cancelled
        # mid-step may, and its output is dropped).
        with torch.cuda.stream(self._copy_stream):
            self.lora_store.write(slot, weights)
            written = self._copy_stream.record_event()
        with self.step_lock:
            torch.cuda.current_stream(self.device).wait_event(written)

    def reset_lora(self, slot: int) -> None:
        self._check_slot(slot)
        with self.step_lock:
            if slot == self._merged_slot:
                self.unmerge_lora()
            self.lora_store.clear(slot)

    @property
    def merged_slot(self) -> int | None:
        """The slot folded into the base weights (merged mode), or None."""
        return self._merged_slot

    def merge_lora(self, slot: int) -> None:
        """Fold ``slot``'s adapter (weight 1) into the base projections: from the next step a
        token whose plan is that adapter alone needs no LoRA work, and every other token must
        carry the adapter at weight -1 (executor_svc.engine.merging does both). Another merged
        slot is unmerged first. Queued on the device stream like the steps (step lock)."""
        self._check_slot(slot)
        with self.step_lock:
            if slot == self._merged_slot:
                return
            if self._merged_slot is not None:
                self.unmerge_lora()
            fold_slot(self.lora_store, self._lora_projections(), slot, 1)
            self._merged_slot = slot
            self.merge_switches += 1

    def unmerge_lora(self) -> None:
        """Take the merged adapter back out of the base weights (no-op when none is merged)."""
        with self.step_lock:
            if self._merged_slot is None:
                return
            fold_slot(self.lora_store, self._lora_projections(), self._merged_slot, -1)
            self._merged_slot = None
            self.merge_switches += 1

    def _lora_projections(self) -> list[LoRALinear]:
        """The LoRA-aware projections in the slot store's site order."""
        return [m for _, m in self.lora_layers()]

    def lora_bytes_per_slot(self) -> int:
        return self.lora_store.bytes_per_slot if self.lora_store is not None else 0

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots or self.lora_store is None:
            raise IndexError(
                f"slot {slot} outside [0, {self.num_slots}) (max_rank {self.max_rank})"
            )
