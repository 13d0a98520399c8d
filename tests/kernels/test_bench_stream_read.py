"""The streaming read that kernels_bench.py times as the adapters' read floor."""

from __future__ import annotations

import pytest
import torch

from kernels._bench import _STREAM_CONFIGS, stream_read


@pytest.mark.parametrize("block,iters,warps", [(64, 4, 4), _STREAM_CONFIGS[0]])
def test_stream_read_sums_every_element_once(device, block: int, iters: int, warps: int) -> None:
    """Each program sums its own consecutive chunk, a ragged last chunk included: the read
    the floor times covers every byte once (not fewer, which would flatter the floor)."""
    n = 3 * block * iters + 37
    src = torch.randn(n, generator=torch.Generator().manual_seed(3)).to(device)
    got = stream_read(src, block, iters, warps)
    chunks = torch.nn.functional.pad(src.cpu(), (0, got.numel() * block * iters - n))
    want = chunks.view(got.numel(), -1).sum(dim=1)
    assert got.numel() == 4
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-4)
