"""The CPU LoRA path equals the kernels' reference; the Triton paged-decode kernel (under the
interpreter here) equals the torch path."""

from __future__ import annotations

import pytest
import torch

from executor_svc.model.layers.lora_ops import add_lora_torch
from executor_svc.model.layers.paged_attention import paged_decode_torch, paged_decode_triton
from kernels import add_lora_ref, build_lora_meta


@pytest.mark.parametrize("k", [1, 3])
def test_torch_lora_path_equals_reference(k):
    g = torch.Generator().manual_seed(k)
    t, d_in, outs, slots, r = 11, 24, [16, 8, 8], 5, 8
    x = torch.randn(t, d_in, generator=g)
    a = [torch.randn(slots, r, d_in, generator=g) for _ in outs]
    b = [torch.randn(slots, o, r, generator=g) for o in outs]
    ranks = torch.randint(0, r + 1, (len(outs), slots), generator=g, dtype=torch.int32)
    for s, (aa, bb) in enumerate(zip(a, b, strict=True)):  # zero padding beyond each rank
        for slot in range(slots):
            aa[slot, ranks[s, slot] :] = 0
            bb[slot, :, ranks[s, slot] :] = 0
    scales = torch.rand(len(outs), slots, generator=g)
    tok_slots = torch.randint(-1, slots, (t, k), generator=g, dtype=torch.int32)
    tok_w = torch.rand(t, k, generator=g)
    meta = build_lora_meta(tok_slots, tok_w, slots, torch.device("cpu"))
    y0 = torch.randn(t, sum(outs), generator=g)
    y_ref, y = y0.clone(), y0.clone()
    add_lora_ref(y_ref, x, a, b, ranks, scales, meta)
    add_lora_torch(y, x, a, b, scales, meta)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("hq", "hkv"), [(4, 2), (2, 2)])
def test_paged_decode_triton_equals_torch(hq, hkv):
    g = torch.Generator().manual_seed(hq)
    bs, nblocks, d = 16, 12, 32
    k_cache = torch.randn(nblocks * bs, hkv, d, generator=g)
    v_cache = torch.randn(nblocks * bs, hkv, d, generator=g)
    lens = torch.tensor([1, 17, 70, 33], dtype=torch.int32)
    tables = torch.tensor(
        [[3, 0, 0, 0, 0], [5, 1, 0, 0, 0], [2, 4, 6, 7, 8], [9, 10, 11, 0, 0]], dtype=torch.int32
    )
    q = torch.randn(4, hq, d, generator=g)
    ref = paged_decode_torch(q, k_cache, v_cache, tables, lens, d**-0.5, bs)
    out = paged_decode_triton(q, k_cache, v_cache, tables, lens, d**-0.5, bs)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_fused_ops_equal_torch():
    """The CUDA-path Triton ops (interpreted here) equal the torch ops the CPU path uses."""
    import torch.nn.functional as F

    from executor_svc.model.layers import fused_ops
    from executor_svc.model.layers.rotary import _rotate

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 40, generator=g)
    w = torch.randn(40, generator=g)
    ref = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(fused_ops.rms_norm(x, w, 1e-6), ref, atol=1e-5, rtol=1e-5)
    gu = torch.randn(5, 2 * 37, generator=g)
    torch.testing.assert_close(fused_ops.silu_and_mul(gu), F.silu(gu[:, :37]) * gu[:, 37:])
    d = torch.randn(5, 2 * 37, generator=g)  # a gate/up LoRA delta kept apart
    both = gu + d
    torch.testing.assert_close(
        fused_ops.silu_and_mul(gu, d), F.silu(both[:, :37]) * both[:, 37:], atol=1e-5, rtol=1e-5
    )
    with pytest.raises(ValueError, match="d must match"):
        fused_ops.silu_and_mul(gu, d[:, :37])
    # rope_qkv: q (3 heads), k and v (2 heads each) as strided views of one fused qkv row
    qkv = torch.randn(5, 7 * 16, generator=g)
    q, k, v = (x.view(5, -1, 16) for x in qkv.split([48, 32, 32], dim=-1))
    pos = torch.tensor([0, 4, 9, 2, 7])
    ang = torch.rand(12, 8, generator=g) * 6
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    c, s = cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)
    qo, ko, vo = fused_ops.rope_qkv(q, k, v, pos, cos, sin)
    torch.testing.assert_close(qo, _rotate(q, c, s), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ko, _rotate(k, c, s), atol=1e-5, rtol=1e-5)
    assert vo is v
    delta = torch.randn(5, 7 * 16, generator=g)  # the qkv LoRA delta, kept apart
    dq, dk, dv = (x.view(5, -1, 16) for x in delta.split([48, 32, 32], dim=-1))
    qo, ko, vo = fused_ops.rope_qkv(q, k, v, pos, cos, sin, dq, dk, dv)
    torch.testing.assert_close(qo, _rotate(q + dq, c, s), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ko, _rotate(k + dk, c, s), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vo, v + dv, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="each delta must match"):
        fused_ops.rope_qkv(q, k, v, pos, cos, sin, dq[:, :2], dk, dv)
    with pytest.raises(ValueError, match="together"):
        fused_ops.rope_qkv(q, k, v, pos, cos, sin, dq, dk)
