"""The CPU LoRA path equals the kernels' reference; the Triton paged-decode kernel (under the
interpreter here) equals the torch path."""

from __future__ import annotations

import pytest
import torch

from executor_svc.model.context import PrefillChunk, StepContext
from executor_svc.model.layers.attention import PagedAttention
from executor_svc.model.layers.lora_ops import add_lora_torch
from executor_svc.model.layers.paged_attention import (
    MAX_SPLITS,
    decode_splits,
    paged_decode_torch,
    paged_decode_triton,
)
from executor_svc.model.layers.paged_prefill import build_prefill_meta, paged_prefill_triton
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


@pytest.mark.parametrize(("hq", "hkv", "d"), [(4, 2, 32), (2, 2, 32), (4, 2, 24)])
@pytest.mark.parametrize("splits", [None, 1, 2, 4])
def test_paged_decode_triton_equals_torch(hq, hkv, d, splits):
    """Lengths of 1 (every split but the first empty), under, at and over a tile (tile 16:
    4 blocks of 4 tokens), and a table whose blocks are out of order; a head_dim that is not
    a power of two (24: padded to 32 in the kernel)."""
    g = torch.Generator().manual_seed(hq)
    bs, nblocks = 4, 24
    k_cache = torch.randn(nblocks * bs, hkv, d, generator=g)
    v_cache = torch.randn(nblocks * bs, hkv, d, generator=g)
    lens = torch.tensor([1, 15, 16, 33, 36], dtype=torch.int32)
    tables = torch.stack([torch.randperm(nblocks - 1, generator=g)[:9] + 1 for _ in lens])
    tables = tables.to(torch.int32)
    q = torch.randn(len(lens), hq, d, generator=g)
    ref = paged_decode_torch(q, k_cache, v_cache, tables, lens, d**-0.5, bs)
    out = paged_decode_triton(
        q, k_cache, v_cache, tables, lens, d**-0.5, bs, splits=splits, tile=16
    )
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_decode_splits_fill_the_gpu_within_the_context():
    assert decode_splits(1, 32, 4096) == 8  # 32 programs x 8 = TARGET_PROGRAMS
    assert decode_splits(1, 8, 4096) == MAX_SPLITS  # 8 programs: split as far as allowed
    assert decode_splits(8, 32, 4096) == 1  # 256 programs already
    assert decode_splits(1, 32, 128) == 2  # a 128-token table has 2 tiles of 64
    assert decode_splits(1, 8, 16) == 1
    assert decode_splits(3, 8, 4096) & (decode_splits(3, 8, 4096) - 1) == 0  # a power of two


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
    # the residual add and the norm in one launch, fp16 so that the sum's rounding shows
    xh, rh, wh = x.half(), torch.randn(5, 40, generator=g).half(), w.half()
    total, normed = fused_ops.add_rms_norm(xh, rh, wh, 1e-6)
    assert torch.equal(total, xh + rh)
    tf = (xh + rh).float()
    ref = wh * (tf * torch.rsqrt(tf.pow(2).mean(-1, keepdim=True) + 1e-6)).half()
    torch.testing.assert_close(normed, ref, atol=2e-3, rtol=2e-3)
    with pytest.raises(ValueError, match="residual must match"):
        fused_ops.add_rms_norm(xh, rh[:, :39], wh, 1e-6)
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
    # ... and the KV cache write in the same launch: rows `slots` get k' and v', others keep
    # what they held
    slots = torch.tensor([6, 0, 3, 9, 4])
    for deltas in ((None, None, None), (dq, dk, dv)):
        cache = (torch.full((11, 2, 16), 7.0), torch.full((11, 2, 16), 7.0))
        qo, ko, vo = fused_ops.rope_qkv(q, k, v, pos, cos, sin, *deltas, cache, slots)
        k_want = torch.full((11, 2, 16), 7.0).index_copy_(0, slots, ko)
        v_want = torch.full((11, 2, 16), 7.0).index_copy_(0, slots, vo)
        assert torch.equal(cache[0], k_want) and torch.equal(cache[1], v_want)
    with pytest.raises(ValueError, match="kv_cache must be"):
        fused_ops.rope_qkv(q, k, v, pos, cos, sin, kv_cache=cache, slots=slots[:4])
    with pytest.raises(ValueError, match="kv_cache must be"):
        fused_ops.rope_qkv(q, k, v, pos, cos, sin, kv_cache=(cache[0], cache[1][:, :1]),
                           slots=slots)  # fmt: skip


def _fresh(start: int, length: int) -> PrefillChunk:
    return PrefillChunk(start=start, length=length)


def test_prefill_runs_group_adjacent_fresh_chunks_of_one_length():
    """Back-to-back prompts of one length share an attention call; a chunk with history, a
    new length or a gap starts another."""
    hist = PrefillChunk(start=11, length=2, kv_rows=torch.arange(6), mask=torch.ones(2, 6) > 0)
    chunks = [_fresh(0, 4), _fresh(4, 4), _fresh(8, 3), hist, _fresh(13, 3), _fresh(16, 3)]
    chunks.append(_fresh(20, 3))  # not adjacent: 16 + 3 = 19
    ctx = StepContext(positions=torch.zeros(23), slot_mapping=torch.zeros(23), prefills=chunks)
    runs = [(r.start, r.length, r.count, r.chunk is not None) for r in ctx.prefill_runs()]
    assert runs == [(0, 4, 2, False), (8, 3, 1, False), (11, 2, 1, True), (13, 3, 2, False),
                    (20, 3, 1, False)]  # fmt: skip
    assert ctx.prefill_runs() is ctx.prefill_runs()  # worked out once per step


def test_batched_prefill_attention_equals_one_call_per_prompt():
    """Prompts batched into one attention call give what one call per prompt gives (GQA,
    decodes and a chunk with history in the same step)."""
    g = torch.Generator().manual_seed(0)
    hq, hkv, d, rows = 4, 2, 8, 64
    attn = PagedAttention(hq, hkv, d)
    nd = 2  # decode tokens first, then prompts of 5, 5, 5 and 3 tokens, then a chunk of 2
    lens = [5, 5, 5, 3]
    t = nd + sum(lens) + 2
    q, k, v = (torch.randn(t, h, d, generator=g) for h in (hq, hkv, hkv))
    k_cache, v_cache = (
        torch.randn(rows, hkv, d, generator=g),
        torch.randn(rows, hkv, d, generator=g),
    )
    slot_mapping = torch.randperm(rows, generator=g)[:t]
    starts = [nd + sum(lens[:i]) for i in range(len(lens))]
    chunks = [_fresh(s, n) for s, n in zip(starts, lens, strict=True)]
    # the history chunk: 4 cached tokens at rows 0..3 (not written this step), then its 2
    hist_rows = torch.cat([torch.arange(4) + rows - 8, slot_mapping[t - 2 :]])
    mask = torch.arange(6)[None, :] <= (torch.arange(2) + 4)[:, None]
    chunks.append(PrefillChunk(start=t - 2, length=2, kv_rows=hist_rows, mask=mask))
    ctx = StepContext(
        positions=torch.zeros(t, dtype=torch.long),
        slot_mapping=slot_mapping,
        num_decode=nd,
        block_tables=torch.tensor([[0], [1]], dtype=torch.int32),
        context_lens=torch.tensor([3, 5], dtype=torch.int32),
        prefills=chunks,
        block_size=16,
    )
    kc, vc = k_cache.clone(), v_cache.clone()
    out = attn(q, k, v, (kc, vc), ctx)
    assert len(ctx.prefill_runs()) == 3  # three prompts of 5 in one call
    for p in chunks:  # one call per prompt, as before
        sl = slice(p.start, p.start + p.length)
        if p.kv_rows is None:
            ks, vs, m, causal = k[sl], v[sl], None, True
        else:
            ks, vs, m, causal = kc[p.kv_rows], vc[p.kv_rows], p.mask, False
        want = torch.nn.functional.scaled_dot_product_attention(
            q[sl].transpose(0, 1)[None], ks.transpose(0, 1)[None], vs.transpose(0, 1)[None],
            attn_mask=m, is_causal=causal, scale=d**-0.5, enable_gqa=True,
        )[0].transpose(0, 1)  # fmt: skip
        torch.testing.assert_close(out[sl], want, atol=1e-5, rtol=1e-5)


def _paged_step(g, lens_hist, hq, hkv, d, bs, nd=2):
    """A step of ``nd`` decode tokens then prefill chunks (length, history) of sequences whose
    blocks are scattered over the cache; the chunks' own K/V written to their rows. Returns
    (q, k_cache, v_cache, chunks as build_prefill_meta takes them, per chunk its KV rows)."""
    nblocks = 1 + sum(-(-(n + h) // bs) for n, h in lens_hist) + 3
    k_cache = torch.randn(nblocks * bs, hkv, d, generator=g)
    v_cache = torch.randn(nblocks * bs, hkv, d, generator=g)
    free = (torch.randperm(nblocks - 1, generator=g) + 1).tolist()
    t = nd + sum(n for n, _ in lens_hist)
    q = torch.randn(t, hq, d, generator=g)
    chunks, kv_rows, start = [], [], nd
    for n, h in lens_hist:
        table = [free.pop() for _ in range(-(-(n + h) // bs))]
        pos = torch.arange(n + h)
        rows = torch.tensor(table)[pos // bs] * bs + pos % bs
        chunks.append((start, n, h, table))
        kv_rows.append(rows)
        start += n
    return q, k_cache, v_cache, chunks, kv_rows


def _prefill_reference(q, k_cache, v_cache, chunks, kv_rows, scale):
    """The module docstring's semantics, one query token at a time."""
    out = {}
    group = q.shape[1] // k_cache.shape[1]
    for (start, n, h, _), rows in zip(chunks, kv_rows, strict=True):
        for i in range(n):
            ks = k_cache[rows[: h + i + 1]].repeat_interleave(group, dim=1)  # [L, Hq, D]
            vs = v_cache[rows[: h + i + 1]].repeat_interleave(group, dim=1)
            w = torch.softmax(scale * torch.einsum("hd,lhd->hl", q[start + i], ks), -1)
            out[start + i] = torch.einsum("hl,lhd->hd", w, vs)
    return out


@pytest.mark.parametrize(("hq", "hkv", "d"), [(4, 2, 16), (2, 2, 16), (4, 2, 40)])
def test_paged_prefill_triton_equals_reference(hq, hkv, d):
    """Fresh prompts shorter than, equal to and longer than a query tile (16), chunks with
    histories inside and across blocks and longer than the chunk; decode rows untouched; a
    head_dim that is not a power of two (40)."""
    g = torch.Generator().manual_seed(hq)
    bs = 4
    lens_hist = [(5, 0), (16, 0), (37, 0), (2, 3), (20, 9), (7, 40)]
    q, kc, vc, chunks, kv_rows = _paged_step(g, lens_hist, hq, hkv, d, bs)
    meta = build_prefill_meta(chunks, "cpu", block_m=16)
    assert meta.tiles.shape[0] == 1 + 1 + 3 + 1 + 2 + 1
    out = torch.full_like(q, 7.0)
    paged_prefill_triton(q, kc, vc, meta, d**-0.5, bs, out, block_n=16)
    ref = _prefill_reference(q, kc, vc, chunks, kv_rows, d**-0.5)
    for tok, want in ref.items():
        torch.testing.assert_close(out[tok], want, atol=1e-4, rtol=1e-4, msg=f"token {tok}")
    assert (out[:2] == 7.0).all()  # the decode rows are not the kernel's


def test_attention_layer_takes_the_paged_prefill_path():
    """PagedAttention with prefill_meta (the CUDA path, here interpreted) equals the SDPA
    path with gathered rows and masks (the CPU path), in one step with decodes."""
    g = torch.Generator().manual_seed(5)
    hq, hkv, d, bs, nd = 4, 2, 16, 4, 2
    lens_hist = [(6, 0), (6, 0), (3, 0), (5, 7)]
    q, kc, vc, chunks, kv_rows = _paged_step(g, lens_hist, hq, hkv, d, bs, nd)
    t = q.shape[0]
    k, v = torch.randn(t, hkv, d, generator=g), torch.randn(t, hkv, d, generator=g)
    # decode rows: blocks 1 and 2 hold their 3 and 5 tokens; new tokens in the chunk rows
    dec_rows = torch.tensor([1 * bs + 2, 3 * bs + 0])
    news = [r[h:] for (_, _, h, _), r in zip(chunks, kv_rows, strict=True)]
    slot_mapping = torch.cat([dec_rows, *news])
    prefills = []
    for (start, n, h, _), rows in zip(chunks, kv_rows, strict=True):
        c = PrefillChunk(start=start, length=n)
        if h:
            c.kv_rows = rows
            c.mask = torch.arange(n + h)[None, :] <= (torch.arange(n) + h)[:, None]
        prefills.append(c)
    base = dict(
        positions=torch.zeros(t, dtype=torch.long),
        slot_mapping=slot_mapping,
        num_decode=nd,
        block_tables=torch.tensor([[1, 0], [2, 3]], dtype=torch.int32),
        context_lens=torch.tensor([3, 5], dtype=torch.int32),
        prefills=prefills,
        block_size=bs,
    )
    attn = PagedAttention(hq, hkv, d)
    sdpa = attn(q, k, v, (kc.clone(), vc.clone()), StepContext(**base))
    paged_ctx = StepContext(**base, prefill_meta=build_prefill_meta(chunks, "cpu"))
    paged = attn(q, k, v, (kc.clone(), vc.clone()), paged_ctx)
    torch.testing.assert_close(paged, sdpa, atol=1e-4, rtol=1e-4)


def test_prefill_meta_rejects_empty_chunks():
    with pytest.raises(ValueError, match="length 0"):
        build_prefill_meta([(0, 0, 0, [1])], "cpu")
    with pytest.raises(ValueError, match="no prefill chunks"):
        build_prefill_meta([], "cpu")


@pytest.mark.parametrize("tiles", [1, 2, 3, 4, 5, 7])
def test_prefill_meta_tables_start_aligned(tiles):
    """Triton compiles a variant per pointer alignment: the block tables must start 16-byte
    aligned whatever the tile count, or a step with an odd one compiles while serving."""
    meta = build_prefill_meta([(0, 64 * tiles, 3, [1, 2, 3])], "cpu")
    assert meta.tiles.shape[0] == tiles
    assert meta.tables.data_ptr() % 16 == 0 and meta.tiles.data_ptr() % 16 == 0
    assert meta.tables.tolist() == [[1, 2, 3]]
    assert meta.tiles[:, 1].tolist() == [64 * i for i in range(tiles)]


def test_prefill_sdpa_leaves_out_cudnn(monkeypatch):
    """The prefill path's SDPA calls run with cuDNN's backend off (it builds a plan on the host
    for every new shape: 35-44 ms on the H100) and the flags come back afterwards."""
    import torch.nn.functional as F

    seen, sdpa = [], F.scaled_dot_product_attention

    def observed(*args, **kwargs):  # calls through; records the backend flags at the call
        seen.append(
            (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled())
        )
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", observed)
    g = torch.Generator().manual_seed(0)
    attn, t = PagedAttention(4, 2, 8), 7
    q, k, v = (torch.randn(t, h, 8, generator=g) for h in (4, 2, 2))
    ctx = StepContext(
        positions=torch.arange(t),
        slot_mapping=torch.arange(t),
        prefills=[_fresh(0, t)],
        block_size=16,
    )
    before = torch.backends.cuda.cudnn_sdp_enabled()
    attn(q, k, v, (torch.zeros(16, 2, 8), torch.zeros(16, 2, 8)), ctx)
    assert seen == [(False, True)]
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
