"""PEFT adapter directory -> :data:`AdapterWeights` (safetensors only), scales as PEFT computes them.

Per module (PEFT ``LoraModel._create_and_replace`` / ``LoraLayer.update_layer``):
    r     = rank_pattern[key]  if a pattern key matches the module name, else r
    alpha = alpha_pattern[key] if a pattern key matches, else lora_alpha
    scale = alpha / sqrt(r) with use_rslora, else alpha / r
A pattern key matches a module name ``n`` when ``re.match(rf"(.*\\.)?({key})$", n)`` (the first
matching key in the pattern's order wins), exactly as ``peft.utils.other.get_pattern_key``.
The rank is also read off the tensors, and the two must agree.

Used by the engine's tests and by the serving layer (registry download -> host cache).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from executor_svc.engine.types import AdapterWeights, LoraModuleWeights

PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.*\.layers\.(?P<layer>\d+)\.\w+\."
    r"(?P<proj>\w+))\.lora_(?P<ab>[AB])(?:\.\w+)?\.weight$"
)


def _pattern_value(pattern: dict, module: str, default):
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", module):
            return pattern[key]
    return default


def module_scale(config: dict, module: str) -> tuple[int, float]:
    """(rank, scale) PEFT gives ``module`` (e.g. "model.layers.0.self_attn.q_proj")."""
    r = int(_pattern_value(config.get("rank_pattern") or {}, module, config["r"]))
    alpha = float(
        _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    )
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return r, scale


def read_adapter_config(adapter_dir: str | Path) -> dict:
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"not a LoRA adapter: peft_type={config.get('peft_type')}")
    for flag in ("use_dora", "lora_bias"):
        if config.get(flag):
            raise ValueError(f"{flag}=true is not supported")
    if config.get("modules_to_save"):
        raise ValueError("modules_to_save is not supported (full module copies)")
    return config


def load_adapter(
    adapter_dir: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> AdapterWeights:
    """Read ``adapter_config.json`` + ``adapter_model.safetensors`` into AdapterWeights."""
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    path = adapter_dir / "adapter_model.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{path} missing (only safetensors adapters are accepted)")
    tensors = load_file(str(path), device=str(device))
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    modules: dict[tuple[int, str], str] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise ValueError(f"unexpected tensor {key!r} in {path.name}")
        if m["proj"] not in PROJECTIONS:
            raise ValueError(f"LoRA on {m['proj']!r} is not supported; use {sorted(PROJECTIONS)}")
        k = (int(m["layer"]), m["proj"])
        pairs.setdefault(k, {})[m["ab"]] = t if dtype is None else t.to(dtype)
        modules[k] = m["module"]
    out: AdapterWeights = {}
    for (layer, proj), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"layer {layer} {proj}: lora_A and lora_B must both be present")
        a, b = ab["A"], ab["B"]
        r, scale = module_scale(config, modules[(layer, proj)])
        if a.shape[0] != r or b.shape[1] != r:
            raise ValueError(
                f"layer {layer} {proj}: tensors have rank {a.shape[0]}, config says {r}"
            )
        out.setdefault(layer, {})[proj] = LoraModuleWeights(
            a=a.contiguous(), b=b.contiguous(), scale=scale
        )
    return out
