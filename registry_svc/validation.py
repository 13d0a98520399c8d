"""Validate a PEFT LoRA adapter against a registered base model, before it becomes visible.

Order (cheapest first, so a bad upload fails fast): adapter_config.json → safetensors header
(cap, consistency with the file size) → every tensor key parses to ``(module, lora_A|lora_B)``
→ each module targeted by the config, of the base model, with both halves → shapes
``A: [r_m, in]``, ``B: [out, r_m]`` with ``r_m`` the config's rank for that module (rank_pattern)
and under the cap → dtype fp16/bf16/fp32, one dtype → values finite (NaN/Inf refused).
The per-module scale (alpha_pattern, rsLoRA) is computed here, once, and stored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loraserve.errors import InvalidArgument
from registry_svc.basemodels import BaseModelInfo
from registry_svc.names import WEIGHTS_FILE
from registry_svc.peft_config import LoraSpec, parse_adapter_config
from registry_svc.safetensors_header import (
    ALLOWED_DTYPES,
    SafetensorsHeader,
    TensorInfo,
    read_header,
)

_KEY = re.compile(r"base_model\.model\.(?P<module>[A-Za-z0-9_.]+)\.lora_(?P<half>[AB])\.weight")
_MODULE = re.compile(r"model\.layers\.(?P<layer>\d+)\.(?:self_attn|mlp)\.(?P<short>[a-z_]+)")
# A float is NaN or Inf exactly when its exponent bits are all ones.
_EXPONENT_BITS = {
    "F16": (np.uint16, np.uint16(0x7C00)),
    "BF16": (np.uint16, np.uint16(0x7F80)),
    "F32": (np.uint32, np.uint32(0x7F800000)),
}
_KNOWN_UNSUPPORTED = {
    "lora_magnitude_vector": "DoRA weights (lora_magnitude_vector) are not supported",
    "lora_embedding_": "LoRA on embeddings is not supported",
    "modules_to_save": "modules_to_save weights are not supported",
}


@dataclass(slots=True, frozen=True)
class ModuleScaleInfo:
    module: str  # full name, e.g. "model.layers.0.self_attn.q_proj"
    rank: int
    alpha: float
    scale: float


@dataclass(slots=True)
class ValidatedAdapter:
    spec: LoraSpec
    dtype: str  # "float16" | "bfloat16" | "float32"
    module_scales: list[ModuleScaleInfo]
    target_modules: list[str]  # short names found in the weights, sorted


def _bad(why: str, field: str = WEIGHTS_FILE) -> InvalidArgument:
    return InvalidArgument.field(field, why)


def validate_adapter(
    config_bytes: bytes,
    weights_path: Path,
    base: BaseModelInfo,
    *,
    max_rank: int,
    max_header_bytes: int,
    check_values: bool = True,
) -> ValidatedAdapter:
    """Everything the registry checks; InvalidArgument (with field violations) on the first
    failing stage. ``check_values`` reads every tensor to refuse NaN/Inf."""
    spec = parse_adapter_config(config_bytes, max_rank=max_rank)
    header = read_header(weights_path, max_header_bytes=max_header_bytes)
    tensors = header.tensors
    if not tensors:
        raise _bad("contains no tensors")
    halves = _split_keys(tensors)
    scales: list[ModuleScaleInfo] = []
    for module, parts in sorted(halves.items()):
        scales.append(_check_module(module, parts, spec, base, max_rank))
    dtypes = {t.dtype for t in tensors.values()}
    if not dtypes <= ALLOWED_DTYPES.keys():
        raise _bad(f"dtype {sorted(dtypes - ALLOWED_DTYPES.keys())} is not fp16, bf16 or fp32")
    if len(dtypes) > 1:
        raise _bad(f"mixes dtypes {sorted(dtypes)}; save every tensor in one dtype")
    if check_values:
        _check_finite(weights_path, header)
    shorts = sorted({_MODULE.fullmatch(s.module)["short"] for s in scales})  # type: ignore[index]
    return ValidatedAdapter(
        spec=spec,
        dtype=ALLOWED_DTYPES[dtypes.pop()],
        module_scales=scales,
        target_modules=shorts,
    )


def _split_keys(tensors: dict[str, TensorInfo]) -> dict[str, dict[str, TensorInfo]]:
    """``{module: {"A": info, "B": info}}``; any key that is not a LoRA half is refused."""
    out: dict[str, dict[str, TensorInfo]] = {}
    for key, info in tensors.items():
        m = _KEY.fullmatch(key)
        if m is None:
            for marker, why in _KNOWN_UNSUPPORTED.items():
                if marker in key:
                    raise _bad(f"{why} (tensor {key[:128]!r})")
            raise _bad(
                f"tensor {key[:128]!r} is not a LoRA weight "
                "(expected base_model.model.<module>.lora_A.weight / lora_B.weight)"
            )
        out.setdefault(m["module"], {})[m["half"]] = info
    return out


def _check_module(
    module: str,
    parts: dict[str, TensorInfo],
    spec: LoraSpec,
    base: BaseModelInfo,
    max_rank: int,
) -> ModuleScaleInfo:
    m = _MODULE.fullmatch(module)
    if m is None or m["short"] not in base.modules:
        raise _bad(
            f"module {module[:128]!r} is not a projection of {base.architecture} "
            f"({', '.join(base.modules)})"
        )
    if int(m["layer"]) >= base.num_layers:
        raise _bad(f"module {module!r}: layer {m['layer']} >= the base model's {base.num_layers}")
    if not spec.targets(module):
        raise _bad(f"module {module!r} has weights but is not in target_modules")
    missing = {"A", "B"} - parts.keys()
    if missing:
        raise _bad(f"module {module!r} lacks lora_{missing.pop()}")
    rank, alpha = spec.rank_alpha(module)
    in_f, out_f = base.modules[m["short"]]
    a, b = parts["A"].shape, parts["B"].shape
    if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
        raise _bad(f"module {module!r}: lora_A {list(a)} and lora_B {list(b)} do not chain")
    r_found = a[0]
    if r_found > max_rank:
        raise _bad(f"module {module!r}: rank {r_found} is over the maximum of {max_rank}")
    if (a[1], b[0]) != (in_f, out_f):
        raise _bad(
            f"module {module!r}: shapes lora_A {list(a)}, lora_B {list(b)} do not fit "
            f"{base.base_model_id!r} ({m['short']} is {in_f} -> {out_f}); "
            f"expected lora_A [{rank}, {in_f}], lora_B [{out_f}, {rank}]"
        )
    if r_found != rank:
        raise _bad(
            f"module {module!r}: rank {r_found} in the weights but {rank} in adapter_config.json"
            " (r / rank_pattern)"
        )
    return ModuleScaleInfo(module=module, rank=rank, alpha=alpha, scale=spec.scale(rank, alpha))


def _check_finite(weights_path: Path, header: SafetensorsHeader) -> None:
    """Refuse NaN/Inf by their bit pattern (exponent all ones), on a memory map of the file:
    no tensor library, no copy of the file; ~40 MB/50 ms on one core."""
    if not any(t.end > t.begin for t in header.tensors.values()):
        return
    raw = np.memmap(weights_path, dtype=np.uint8, mode="r", offset=header.data_offset)
    try:
        for key, info in sorted(header.tensors.items(), key=lambda kv: kv[1].begin):
            int_type, exponent = _EXPONENT_BITS[info.dtype]
            bits = raw[info.begin : info.end].view(int_type)
            bad = int(np.count_nonzero((bits & exponent) == exponent))
            if bad:
                raise _bad(f"tensor {key!r} has {bad} NaN/Inf values")
    finally:
        del raw
