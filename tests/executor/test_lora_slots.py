"""The slot store: both ways of writing a slot give the same bytes; bad adapters change nothing."""

from __future__ import annotations

import pytest
import torch

from executor_svc.adapters.host_cache import pack_weights
from executor_svc.engine.types import LoraModuleWeights
from executor_svc.model.loader import load_model
from executor_svc.model.lora_loader import load_adapter


@pytest.fixture
def model(tiny_model_dir):
    return load_model(
        tiny_model_dir, device=torch.device("cpu"), dtype=torch.float32, num_slots=3, max_rank=16
    )


def _slot(model, slot: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    s = model.lora_store
    return s.data[slot].clone(), s.ranks[:, :, slot].clone(), s.scales[:, :, slot].clone()


def test_packed_full_rank_adapter_is_written_from_one_buffer(model, adapter_factory):
    store = model.lora_store
    full = load_adapter(adapter_factory("full16", rank=16))
    low = load_adapter(adapter_factory("low8", rank=8))
    modules = store.check  # (site, slice) -> weights, in slot order
    assert store._flat_source(modules(pack_weights(full, pin=False))) is not None
    assert store._flat_source(modules(full)) is None  # one tensor per module: not one buffer
    assert store._flat_source(modules(pack_weights(low, pin=False))) is None  # rank < r_max

    model.set_lora(0, pack_weights(full, pin=False))  # one copy
    model.set_lora(1, full)  # memset + one copy per A and B
    for a, b in zip(_slot(model, 0), _slot(model, 1), strict=True):
        assert torch.equal(a, b)
    assert int(model.lora_store.ranks[:, :, 0].max()) == 16


def test_lower_rank_overwrites_and_zeroes_the_padding(model, adapter_factory):
    model.set_lora(2, pack_weights(load_adapter(adapter_factory("full16", rank=16)), pin=False))
    model.set_lora(2, load_adapter(adapter_factory("q4", rank=4, target_modules=["q_proj"])))
    qkv = model.layers[0].qkv_proj.slots
    assert qkv.ranks[:, 2].tolist() == [4, 0, 0]
    assert float(qkv.lora_a[0][2, 4:].abs().sum()) == 0.0
    assert float(qkv.lora_b[1][2].abs().sum()) == 0.0  # k: absent now, zeroed
    assert float(model.layers[1].down_proj.slots.lora_a[0][2].abs().sum()) == 0.0


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda w: w[0].__setitem__("q_proj", _rank(w[0]["q_proj"], 17)), "exceeds max_lora_rank"),
        (
            lambda w: w[1].__setitem__(
                "o_proj", LoraModuleWeights(w[1]["o_proj"].a[:, :-1], w[1]["o_proj"].b, 1.0)
            ),
            "do not fit",
        ),
        (lambda w: w.__setitem__(99, w[0]), "layers the model lacks"),
    ],
    ids=["rank-over-cap", "wrong-shape", "unknown-layer"],
)
def test_bad_adapter_leaves_the_slot_as_it_was(model, adapter_factory, corrupt, message):
    good = load_adapter(adapter_factory("good", rank=8))
    model.set_lora(1, good)
    before = _slot(model, 1)
    bad = load_adapter(adapter_factory("bad", rank=8, seed=3))
    corrupt(bad)
    with pytest.raises(ValueError, match=message):
        model.set_lora(1, bad)
    for a, b in zip(before, _slot(model, 1), strict=True):
        assert torch.equal(a, b)


def _rank(m: LoraModuleWeights, r: int) -> LoraModuleWeights:
    return LoraModuleWeights(torch.randn(r, m.a.shape[1]), torch.randn(m.b.shape[0], r), m.scale)


def test_triton_kernels_read_the_slot_views(adapter_factory):
    """The slot-major views (slot stride = a whole slot's region) are what the Triton kernels
    get on the GPU: here they run in Triton's interpreter against the torch path."""
    from executor_svc.model.layers.lora_ops import add_lora_torch
    from executor_svc.model.lora_slots import LoraSite, LoraSlotStore
    from kernels import add_lora, build_lora_meta

    g = torch.Generator().manual_seed(0)
    sites = [
        LoraSite(0, 40, ("q_proj", "k_proj", "v_proj"), (40, 24, 24)),
        LoraSite(0, 72, ("down_proj",), (40,)),
    ]
    store = LoraSlotStore(
        sites, num_slots=3, max_rank=16, dtype=torch.float32, device=torch.device("cpu")
    )
    for slot, rank in enumerate((16, 5, 8)):
        store.write(
            slot,
            {
                0: {
                    name: LoraModuleWeights(
                        torch.randn(rank, s.in_features, generator=g),
                        torch.randn(out, rank, generator=g),
                        0.5 + slot,
                    )
                    for s in sites
                    for name, out in zip(s.names, s.out_sizes, strict=True)
                }
            },
        )
    slots = torch.tensor([[0, 1], [2, -1], [1, 2], [-1, -1], [0, 2], [1, 0]], dtype=torch.int32)
    weights = torch.rand(slots.shape, generator=g)
    meta = build_lora_meta(slots, weights, 3, torch.device("cpu"))
    for i, site in enumerate(sites):
        v = store.views(i)
        x = torch.randn(slots.shape[0], site.in_features, generator=g)
        y0 = torch.randn(slots.shape[0], sum(site.out_sizes), generator=g)
        ours, ref = y0.clone(), y0.clone()
        add_lora(ours, x, v.lora_a, v.lora_b, v.ranks, v.scales, meta)
        add_lora_torch(ref, x, v.lora_a, v.lora_b, v.scales, meta)
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
