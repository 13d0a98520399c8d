"""Rotary position embedding with the config's rope type (default, linear, llama3, yarn, ...).

The inverse frequencies come from transformers' own ``ROPE_INIT_FUNCTIONS`` so every scaling
variant matches the reference implementation; ``dynamic`` NTK scaling depends on the running
sequence length and is refused rather than silently approximated.
"""

from __future__ import annotations

import torch
from torch import nn

from executor_svc.model.config import ModelConfig
from executor_svc.model.layers.fused_ops import rope_qkv


def _inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    rope = cfg.rope_parameters
    rope_type = rope.get("rope_type", "default")
    if rope_type == "default":
        theta = float(rope.get("rope_theta", 10000.0))
        exps = torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim
        return 1.0 / (theta**exps), 1.0
    if rope_type == "dynamic":
        raise NotImplementedError("dynamic NTK rope scaling is not supported")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](cfg.hf_config, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


class RotaryEmbedding(nn.Module):
    """Applies rotate-half RoPE to q and k at absolute ``positions`` (cos/sin table cached)."""

    def __init__(self, cfg: ModelConfig, max_positions: int):
        super().__init__()
        inv_freq, scaling = _inv_freq(cfg)
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * scaling, persistent=False)

    def forward(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        dq: torch.Tensor | None = None,
        dk: torch.Tensor | None = None,
        dv: torch.Tensor | None = None,
        kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        slots: torch.Tensor | None = None,
    ):
        """q: [T, Hq, D], k and v: [T, Hkv, D]; positions: [T] int64. Returns rotated (q, k)
        and v, of q + dq, k + dk and v + dv where given (a qkv LoRA delta kept apart: the
        CUDA path adds it inside its one launch); with ``kv_cache`` ([rows, Hkv, D] each)
        also writes the returned k and v to rows ``slots`` ([T] int64) of the cache (on CUDA
        in the same launch)."""
        if q.is_cuda:
            return rope_qkv(q, k, v, positions, self.cos, self.sin, dq, dk, dv, kv_cache, slots)
        q = q if dq is None else q + dq
        k = k if dk is None else k + dk
        v = v if dv is None else v + dv
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if kv_cache is not None:
            kv_cache[0].index_copy_(0, slots, k)
            kv_cache[1].index_copy_(0, slots, v)
        return q, k, v


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    half = x.shape[-1] // 2
    rot = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rot * sin).to(x.dtype)
