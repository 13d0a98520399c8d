"""dLoRA's merged mode: an adapter folded into the base weights gives the same outputs as the
unmerged batch (and PEFT), other plans subtract it, unmerging restores the weights, and the
engine switches by its policy without changing any request's tokens."""

from __future__ import annotations

import asyncio

import pytest
import torch

from executor_svc.engine import Engine, EngineRequest, SamplingOptions
from executor_svc.engine.merging import MergeController, MergePolicy, effective_plan
from executor_svc.model.forward import batch_logits
from executor_svc.model.loader import load_model
from executor_svc.model.lora_loader import load_adapter
from loraserve.devmodels import write_lora_adapter

PROMPTS = [[5, 17, 99, 3, 250, 42, 7, 300], [1, 2, 3], [400, 401, 12, 9, 9, 9, 77, 88, 13]]


def _model(model_dir, dtype=torch.float32, num_slots=4):
    return load_model(
        model_dir, device=torch.device("cpu"), dtype=dtype, num_slots=num_slots, max_rank=16
    )


def _weights(model) -> list[torch.Tensor]:
    return [m.weight.detach().clone() for _, m in model.lora_layers()]


def test_effective_plan_running_example():
    assert effective_plan([(2, 1.0)], 2) == ()
    assert effective_plan([], 2) == ((2, -1.0),)
    assert effective_plan([(0, 1.0)], 2) == ((0, 1.0), (2, -1.0))
    assert effective_plan([(2, 0.5), (0, 0.5)], 2) == ((2, -0.5), (0, 0.5))
    assert effective_plan([(2, 0.5), (2, 0.5)], 2) == ((2, -0.5), (2, 0.5))  # sums to 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_restores_the_weights(dtype, tiny_model_dir, adapter_factory):
    """Merge then unmerge: each element back within one unit in the last place of the larger
    of W and W + d (exact unless the merge crossed a power of two), and a fixed point after
    that: more round trips change no bit."""
    model = _model(tiny_model_dir, dtype)
    model.set_lora(1, load_adapter(adapter_factory("big", rank=8, alpha=16), dtype=dtype))
    before = _weights(model)
    model.merge_lora(1)
    merged = _weights(model)
    model.unmerge_lora()
    once = _weights(model)
    same = total = 0
    for b, m, o in zip(before, merged, once, strict=True):
        assert not torch.equal(b, m)  # the merge changed every projection
        bound = torch.finfo(dtype).eps * torch.maximum(b.abs(), m.abs()).float()
        err = (o.float() - b.float()).abs()
        assert (err <= bound).all(), f"max error {err.max():.3g} over one ulp"
        same += int((o == b).sum())
        total += b.numel()
    assert same / total > 0.6  # bit-identical where no power of two was crossed
    for _ in range(20):
        model.merge_lora(1)
        model.unmerge_lora()
    for o, after in zip(once, _weights(model), strict=True):
        assert torch.equal(o, after)
    assert model.merged_slot is None and model.merge_switches == 42


def test_merged_logits_equal_unmerged_and_peft(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = _model(tiny_model_dir)
    paths = [
        write_lora_adapter(tmp_path / f"a{i}", tiny_model_dir, rank=4 + 4 * i, seed=i + 1)
        for i in range(3)
    ]
    for slot, path in enumerate(paths):
        model.set_lora(slot, load_adapter(path))
    plans = [[(0, 1.0)], [], [(1, 1.0)], [(0, 0.5), (1, 0.5)], [(1, 0.3), (2, 0.3), (0, 0.4)]]
    seqs = [PROMPTS[i % len(PROMPTS)] for i in range(len(plans))]
    unmerged = batch_logits(model, seqs, plans)
    model.merge_lora(0)
    merged = batch_logits(model, seqs, [list(effective_plan(p, 0)) for p in plans])
    for i, (u, m) in enumerate(zip(unmerged, merged, strict=True)):
        err = (u - m).abs().max()
        assert err < 1e-4, f"plan {plans[i]}: merged differs from unmerged by {err:.3g}"
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(hf, paths[0]).eval()
    with torch.no_grad():
        ref = peft(torch.tensor([seqs[0]])).logits[0]
    assert (merged[0] - ref).abs().max() < 1e-4
    model.unmerge_lora()
    assert (batch_logits(model, [seqs[1]])[0] - unmerged[1]).abs().max() < 1e-4


def test_writing_the_merged_slot_unmerges_it_first(tiny_model_dir, adapter_factory):
    model = _model(tiny_model_dir)
    before = _weights(model)
    model.set_lora(0, load_adapter(adapter_factory("a", rank=4)))
    model.merge_lora(0)
    bad = load_adapter(adapter_factory("wide", rank=32))  # over max_rank 16
    with pytest.raises(ValueError, match="rank 32"):
        model.set_lora(0, bad)
    assert model.merged_slot == 0  # a refused write changes nothing
    model.set_lora(0, load_adapter(adapter_factory("b", rank=8, seed=7)))
    assert model.merged_slot is None and model.merge_switches == 2
    for b, a in zip(before, _weights(model), strict=True):
        assert (a - b).abs().max() <= 1e-6
    model.merge_lora(0)
    model.reset_lora(0)
    assert model.merged_slot is None


def test_policy_merges_keeps_and_unmerges(tiny_model_dir, adapter_factory):
    model = _model(tiny_model_dir, num_slots=5)
    for slot in range(5):
        model.set_lora(slot, load_adapter(adapter_factory(f"s{slot}", rank=4, seed=slot + 1)))
    ctl = MergeController(model, MergePolicy(patience=3, unmerge_below=0.5))
    on0, on1 = [(0, 1.0)], [(1, 1.0)]
    for _ in range(2):
        assert ctl.plans_for_step([on0, on0]) == [((0, 1.0),)] * 2
    ctl.plans_for_step([on0, on1])  # one other plan restarts the count
    for _ in range(2):
        ctl.plans_for_step([on0, on0])
    assert model.merged_slot is None
    assert ctl.plans_for_step([on0, on0]) == [(), ()]  # the third step in a row: merged
    assert model.merged_slot == 0
    # Other plans are served with the compensation while half the batch is on slot 0 ...
    for _ in range(5):
        got = ctl.plans_for_step([on0, on0, on1, []])
        assert got == [(), (), ((1, 1.0), (0, -1.0)), ((0, -1.0),)]
    three = [(1, 0.4), (2, 0.3), (3, 0.3)]
    assert ctl.plans_for_step([on0, three])[1] == (*three, (0, -1.0))
    # ... and unmerged after three steps below half.
    for _ in range(2):
        ctl.plans_for_step([on0, on1, on1])
    assert model.merged_slot == 0
    assert ctl.plans_for_step([on0, on1, on1]) == [((0, 1.0),), ((1, 1.0),), ((1, 1.0),)]
    assert model.merged_slot is None
    # Four adapters without slot 0 leave no room for (0, -1): unmerged before that step.
    for _ in range(3):
        ctl.plans_for_step([on0])
    assert model.merged_slot == 0
    four = [(1, 0.25), (2, 0.25), (3, 0.25), (4, 0.25)]
    assert ctl.plans_for_step([on0, four]) == [((0, 1.0),), tuple(four)]
    assert model.merged_slot is None
    # Switched off: unmerged at once, never merged again.
    for _ in range(3):
        ctl.plans_for_step([on0])
    assert model.merged_slot == 0
    off = MergeController(model, MergePolicy(enabled=False))
    for _ in range(5):
        assert off.plans_for_step([on0]) == [((0, 1.0),)]
    assert model.merged_slot is None


async def _generate(engine: Engine, rid: str, plan, delay: float, n: int) -> list[int]:
    await asyncio.sleep(delay)
    request = EngineRequest(
        rid, f"prompt {rid}", plan, SamplingOptions(max_tokens=n, ignore_eos=True)
    )
    return [t async for ev in engine.generate(request) for t in ev.token_ids]


async def test_engine_switches_without_changing_tokens(tiny_model_dir, tmp_path):
    """Four requests on one adapter (merged after 2 steps), then a base request, one on
    another adapter and 4-adapter mixtures with and without the merged one arrive mid-way:
    every request's greedy tokens equal those of an engine that never merges."""
    paths = [
        write_lora_adapter(tmp_path / f"a{i}", tiny_model_dir, rank=4, seed=i + 1, init_scale=0.2)
        for i in range(5)
    ]
    quarter = [(1, 0.25), (2, 0.25), (3, 0.25)]
    work = [(f"x{i}", [(0, 1.0)], 0.0, 64) for i in range(4)] + [
        ("base", [], 0.03, 16),
        ("other", [(1, 1.0)], 0.03, 16),
        ("with0", [*quarter, (0, 0.25)], 0.04, 16),
        ("without0", [*quarter, (4, 0.25)], 0.2, 8),
    ]
    outputs, switches, compensated = [], [], []
    for policy in (MergePolicy(enabled=False), MergePolicy(patience=2)):
        engine = Engine(tiny_model_dir, num_lora_slots=5, max_lora_rank=8, merge_policy=policy)
        await engine.start()
        try:
            for slot, path in enumerate(paths):
                engine.model.set_lora(slot, load_adapter(path))
            outputs.append(
                await asyncio.gather(*(_generate(engine, rid, p, d, n) for rid, p, d, n in work))
            )
            switches.append(engine.stats().merge_switches)
            compensated.append(engine.runner.merging.compensated_steps)
        finally:
            await engine.stop()
    assert switches[0] == 0 and switches[1] >= 1 and compensated[1] > 0
    for (rid, plan, _, _), ref, got in zip(work, *outputs, strict=True):
        assert got == ref, f"{rid} (plan {plan}) changed under merging"


def test_policy_merges_a_dominant_adapter_when_told(tiny_model_dir, adapter_factory):
    model = _model(tiny_model_dir)
    for slot in range(2):
        model.set_lora(slot, load_adapter(adapter_factory(f"s{slot}", rank=4, seed=slot + 1)))
    ctl = MergeController(model, MergePolicy(patience=2, merge_at=0.75, unmerge_below=0.5))
    batch = [[(0, 1.0)]] * 3 + [[(1, 1.0)]]
    assert ctl.plans_for_step(batch)[3] == ((1, 1.0),)
    assert ctl.plans_for_step(batch)[2:] == [(), ((1, 1.0), (0, -1.0))]
    assert model.merged_slot == 0
    with pytest.raises(ValueError, match="unmerge_below <= merge_at"):
        MergePolicy(merge_at=0.4, unmerge_below=0.5)
    from pydantic import ValidationError

    from executor_svc.settings import ExecutorSettings

    with pytest.raises(ValidationError, match="exceeds merge_at_share"):
        ExecutorSettings(merge_at_share=0.3, unmerge_below_share=0.5)
