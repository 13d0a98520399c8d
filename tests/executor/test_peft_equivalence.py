"""Our model's logits equal transformers' (base) and PEFT's (every adapter variant), in fp32;
a mixture equals the weighted sum of single-adapter deltas."""

from __future__ import annotations

import pytest
import torch

from executor_svc.adapters.host_cache import pack_weights
from executor_svc.model.forward import batch_logits
from executor_svc.model.loader import load_model
from executor_svc.model.lora_loader import load_adapter
from loraserve.devmodels import write_lora_adapter

ATOL = 1e-4
PROMPTS = [[5, 17, 99, 3, 250, 42, 7, 300], [1, 2, 3], [400, 401, 12, 9, 9, 9, 77, 88, 13, 2, 6]]

ADAPTERS = {  # name -> write_lora_adapter kwargs
    "r8_all": {"rank": 8, "alpha": 16},
    "r4_attn_rslora": {
        "rank": 4,
        "alpha": 8,
        "use_rslora": True,
        "target_modules": ["q_proj", "v_proj", "o_proj"],
    },
    "r2_mlp": {"rank": 2, "alpha": 3, "target_modules": ["gate_proj", "down_proj"]},
    "patterns": {
        "rank": 4,
        "alpha": 8,
        "rank_pattern": {"q_proj": 8, "layers.1.mlp.up_proj": 2},
        "alpha_pattern": {"down_proj": 32, "k_proj": 2},
    },
    "r16_kv": {"rank": 16, "alpha": 4, "target_modules": ["k_proj", "v_proj", "up_proj"]},
    # Every module at the slots' full rank: packed by the host cache, it goes in one copy.
    "r16_all_packed": {"rank": 16, "alpha": 32},
}


def _ours(model_dir, num_slots=4, max_rank=16):
    return load_model(
        model_dir,
        device=torch.device("cpu"),
        dtype=torch.float32,
        num_slots=num_slots,
        max_rank=max_rank,
    )


def _hf(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    err = (ours - ref).abs()
    assert err.max() < ATOL, (
        f"{what}: max |diff| {err.max():.3g} at {divmod(int(err.argmax()), err.shape[-1])}"
    )


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_base_model_equals_transformers(family, tiny_model_factory):
    model_dir = tiny_model_factory(family)
    ours, hf = _ours(model_dir), _hf(model_dir)
    outs = batch_logits(ours, PROMPTS)
    with torch.no_grad():
        for p, out in zip(PROMPTS, outs, strict=True):
            _assert_close(out, hf(torch.tensor([p])).logits[0], f"{family} base")


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_adapters_equal_peft(family, tiny_model_factory, tmp_path):
    from peft import PeftModel

    model_dir = tiny_model_factory(family)
    ours = _ours(model_dir, num_slots=len(ADAPTERS))
    names = list(ADAPTERS)
    for slot, name in enumerate(names):
        path = write_lora_adapter(tmp_path / name, model_dir, seed=slot + 1, **ADAPTERS[name])
        ours.set_lora(slot, pack_weights(load_adapter(path), pin=False))
        if slot == 0:
            peft = PeftModel.from_pretrained(_hf(model_dir), path, adapter_name=name).eval()
        else:
            peft.load_adapter(path, adapter_name=name)
    # All adapters in ONE batch: sequence i runs under adapter i % n.
    seqs = [PROMPTS[i % len(PROMPTS)] for i in range(len(names))]
    outs = batch_logits(ours, seqs, [[(i, 1.0)] for i in range(len(names))])
    with torch.no_grad():
        for i, name in enumerate(names):
            peft.set_adapter(name)
            _assert_close(outs[i], peft(torch.tensor([seqs[i]])).logits[0], f"{family} {name}")


def test_scales_follow_peft(tiny_model_dir, adapter_factory):
    path = adapter_factory(
        "pat",
        rank=4,
        alpha=8,
        rank_pattern={"q_proj": 8},
        alpha_pattern={"layers.1.self_attn.o_proj": 2},
    )
    w = load_adapter(path)
    assert w[0]["q_proj"].scale == pytest.approx(1.0) and w[0]["q_proj"].a.shape[0] == 8
    assert w[1]["o_proj"].scale == pytest.approx(0.5) and w[0]["o_proj"].scale == 2.0
    rs = load_adapter(adapter_factory("rs", rank=16, alpha=8, use_rslora=True))
    assert rs[0]["v_proj"].scale == pytest.approx(2.0)


def test_mixture_is_weighted_sum_of_deltas(tiny_model_dir, adapter_factory):
    """Per projection: delta(mix) == sum_i w_i * delta(adapter_i). End to end: a mixture plan
    gives the logits of one adapter built by stacking the ranks, B_i scaled by w_i * s_i."""
    from executor_svc.engine.types import LoraModuleWeights

    model = _ours(tiny_model_dir, num_slots=4, max_rank=16)
    adapters = [
        load_adapter(adapter_factory(f"m{i}", rank=2 + 2 * i, seed=10 + i)) for i in range(3)
    ]
    for slot, w in enumerate(adapters):
        model.set_lora(slot, w)
    _check_projection_linearity(model)
    mix = [(0, 0.2), (1, 0.5), (2, 0.3)]
    stacked = {
        layer: {
            name: LoraModuleWeights(
                a=torch.cat([adapters[s][layer][name].a for s, _ in mix]),
                b=torch.cat(
                    [
                        adapters[s][layer][name].b * w * adapters[s][layer][name].scale
                        for s, w in mix
                    ],
                    dim=1,
                ),
                scale=1.0,
            )
            for name in adapters[0][layer]
        }
        for layer in adapters[0]
    }
    model.set_lora(3, stacked)
    out_mix, out_stacked = batch_logits(model, [PROMPTS[0]] * 2, [mix, [(3, 1.0)]])
    _assert_close(out_mix, out_stacked, "mixture vs stacked adapter")


def _check_projection_linearity(model):
    from kernels import build_lora_meta

    layer = model.layers[0].qkv_proj
    x = torch.randn(5, layer.in_features)

    def run(plan):
        slots = torch.tensor([[s for s, _ in plan]] * 5, dtype=torch.int32)
        weights = torch.tensor([[w for _, w in plan]] * 5)
        return layer(x, build_lora_meta(slots, weights, model.num_slots, torch.device("cpu")))

    base = layer(x, None)
    deltas = [run([(s, 1.0)]) - base for s in range(3)]
    mix = run([(0, 0.2), (1, 0.5), (2, 0.3)]) - base
    torch.testing.assert_close(
        mix, 0.2 * deltas[0] + 0.5 * deltas[1] + 0.3 * deltas[2], atol=1e-5, rtol=1e-5
    )


def test_unset_modules_and_reset(tiny_model_dir, adapter_factory):
    model = _ours(tiny_model_dir, num_slots=2, max_rank=8)
    base = batch_logits(model, [PROMPTS[1]])[0]
    model.set_lora(1, load_adapter(adapter_factory("full", rank=8)))
    model.set_lora(1, load_adapter(adapter_factory("attn", rank=2, target_modules=["q_proj"])))
    qkv = model.layers[0].qkv_proj
    assert (
        qkv.slots.ranks[:, 1].tolist() == [2, 0, 0]
        and model.layers[0].down_proj.slots.ranks[0, 1] == 0
    )
    assert float(qkv.slots.lora_a[0][1, 2:].abs().sum()) == 0.0  # rank padding zeroed
    model.reset_lora(1)
    torch.testing.assert_close(batch_logits(model, [PROMPTS[1]], [[(1, 1.0)]])[0], base)
    assert model.lora_bytes_per_slot() == 4 * 8 * sum(
        len(m.names) * m.in_features + sum(m.out_sizes) for _, m in model.lora_layers()
    )
