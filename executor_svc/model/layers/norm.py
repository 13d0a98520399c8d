"""RMSNorm computed in float32, as transformers' Llama/Mistral/Qwen2 do."""

from __future__ import annotations

import torch
from torch import nn

from executor_svc.model.layers.fused_ops import add_rms_norm, rms_norm


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.weight = nn.Parameter(
            torch.ones(hidden_size, dtype=dtype, device=device), requires_grad=False
        )
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); with ``residual``, the pair (x + residual, norm(x + residual)): a decoder
        layer's residual add and the next norm, in one launch on CUDA."""
        if residual is not None:
            if x.is_cuda:
                return add_rms_norm(x, residual, self.weight, self.eps)
            x = x + residual
            return x, self._norm(x)
        if x.is_cuda:
            return rms_norm(x, self.weight, self.eps)
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)
