"""PEFT adapter directory -> :data:`AdapterWeights` (safetensors only), scales as PEFT computes them.

Per module (PEFT ``LoraModel._create_and_replace`` / ``LoraLayer.update_layer``):
    r     = rank_pattern[key]  if a pattern key matches the module name, else r
    alpha = alpha_pattern[key] if a pattern key matches, else lora_alpha
    scale = alpha / sqrt(r) with use_rslora, else alpha / r
A pattern key matches a module name ``n`` when ``re.match(rf"(.*\\.)?({key})$", n)`` (the first
matching key in the pattern's order wins), exactly as ``peft.utils.other.get_pattern_key``.
The rank is also read off the tensors, and the two must agree.

Used by the engine's tests and by the serving layer (registry download -> host cache). The
serving layer reads with ``packed=True``: the safetensors header is parsed here and every
tensor is read from the file straight into its place in one buffer laid out like a GPU slot
(the host cache's format, :func:`executor_svc.adapters.host_cache.pack_weights`), one
``readinto`` per tensor with the GIL released during each read, instead of 448 tensors built
by safetensors under the GIL and then copied into the buffer: what a burst of cold adapters
spent its time on (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from executor_svc.engine.types import AdapterWeights, LoraModuleWeights
from executor_svc.model.lora_slots import module_rank

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
    adapter_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    packed: bool = False,
    pin: bool = False,
) -> AdapterWeights:
    """Read ``adapter_config.json`` + ``adapter_model.safetensors`` into AdapterWeights.

    ``packed``: every tensor a view into one host buffer in slot order (page-locked if
    ``pin``), read straight from the file; see the module docstring."""
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    path = adapter_dir / "adapter_model.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{path} missing (only safetensors adapters are accepted)")
    if packed:
        return _read_packed(path, config, dtype, pin)
    tensors = load_file(str(path), device=str(device))
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    modules: dict[tuple[int, str], str] = {}
    for key, t in tensors.items():
        k, module, ab = _parse_key(key, path)
        pairs.setdefault(k, {})[ab] = t if dtype is None else t.to(dtype)
        modules[k] = module
    out: AdapterWeights = {}
    for (layer, proj), ab in sorted(pairs.items()):
        a, b = _pair(ab, layer, proj)
        scale = _scale(config, modules[(layer, proj)], layer, proj, a.shape, b.shape)
        out.setdefault(layer, {})[proj] = LoraModuleWeights(
            a=a.contiguous(), b=b.contiguous(), scale=scale
        )
    return out


def _parse_key(key: str, path: Path) -> tuple[tuple[int, str], str, str]:
    """((layer, projection), module name, "A" | "B") of a tensor name, or ValueError."""
    m = _KEY.match(key)
    if m is None:
        raise ValueError(f"unexpected tensor {key!r} in {path.name}")
    if m["proj"] not in PROJECTIONS:
        raise ValueError(f"LoRA on {m['proj']!r} is not supported; use {sorted(PROJECTIONS)}")
    return (int(m["layer"]), m["proj"]), m["module"], m["ab"]


def _pair(ab: dict, layer: int, proj: str):
    if set(ab) != {"A", "B"}:
        raise ValueError(f"layer {layer} {proj}: lora_A and lora_B must both be present")
    return ab["A"], ab["B"]


def _scale(config: dict, module: str, layer: int, proj: str, a_shape, b_shape) -> float:
    r, scale = module_scale(config, module)
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != r or b_shape[1] != r:
        raise ValueError(
            f"layer {layer} {proj}: tensors A {list(a_shape)} / B {list(b_shape)}, config "
            f"says rank {r}"
        )
    return scale


# safetensors dtype names -> torch dtypes (the ones an adapter for our models may hold)
_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
_MAX_HEADER = 100 << 20


def _read_packed(path: Path, config: dict, dtype: torch.dtype | None, pin: bool) -> AdapterWeights:
    size = path.stat().st_size
    with open(path, "rb", buffering=0) as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= min(_MAX_HEADER, size - 8):
            raise ValueError(f"{path.name}: not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except ValueError as exc:
            raise ValueError(f"{path.name}: unreadable safetensors header: {exc}") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path.name}: unreadable safetensors header")
        header.pop("__metadata__", None)
        pairs: dict[tuple[int, str], dict[str, tuple[torch.dtype, list[int], int]]] = {}
        modules: dict[tuple[int, str], str] = {}
        for key, info in header.items():
            k, module, ab = _parse_key(key, path)
            pairs.setdefault(k, {})[ab] = _tensor_info(key, info, 8 + n, size)
            modules[k] = module
        order = sorted(pairs, key=lambda k: (k[0], module_rank(k[1])))
        entries = []
        for layer, proj in order:
            (a_dt, a_shape, a_at), (b_dt, b_shape, b_at) = _pair(pairs[(layer, proj)], layer, proj)
            scale = _scale(config, modules[(layer, proj)], layer, proj, a_shape, b_shape)
            entries.append((layer, proj, scale, (a_dt, a_shape, a_at), (b_dt, b_shape, b_at)))
        dtypes = {t[0] for e in entries for t in e[3:]}
        out_dtype = dtype or (dtypes.pop() if len(dtypes) == 1 else torch.float32)
        numel = [math.prod(t[1]) for e in entries for t in e[3:]]
        flat = torch.empty(sum(numel), dtype=out_dtype, pin_memory=pin)
        views = iter(torch.split(flat, numel))
        out: AdapterWeights = {}
        for layer, proj, scale, *tensors in entries:
            ab = []
            for file_dtype, shape, at in tensors:
                view = next(views)
                _read_into(f, at, view, file_dtype)
                ab.append(view.view(shape))
            out.setdefault(layer, {})[proj] = LoraModuleWeights(ab[0], ab[1], scale)
    return out


def _tensor_info(key: str, info, data_start: int, size: int) -> tuple[torch.dtype, list[int], int]:
    """(dtype, shape, absolute file offset) of one header entry, checked against the file."""
    try:
        dt, shape, (begin, end) = _DTYPES[info["dtype"]], list(info["shape"]), info["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{key}: unsupported or malformed header entry {info!r}") from None
    if not all(isinstance(v, int) and v >= 0 for v in (*shape, begin, end)):
        raise ValueError(f"{key}: shape and offsets must be non-negative integers: {info!r}")
    nbytes = math.prod(shape) * dt.itemsize
    if end - begin != nbytes:
        raise ValueError(f"{key}: shape {shape} does not match {end - begin} bytes")
    if not 0 <= begin <= end <= size - data_start:
        raise ValueError(f"{key}: data offsets {begin}..{end} outside the file")
    return dt, shape, data_start + begin


def _read_into(f, at: int, view: torch.Tensor, file_dtype: torch.dtype) -> None:
    """Fill ``view`` from the file at ``at``; the read itself runs without the GIL."""
    target = view if view.dtype == file_dtype else torch.empty(view.shape, dtype=file_dtype)
    buf = memoryview(target.view(torch.uint8).numpy())
    done = 0
    while done < len(buf):
        got = os.preadv(f.fileno(), [buf[done:]], at + done)
        if got <= 0:
            raise ValueError(f"{f.name}: file ends inside a tensor")
        done += got
    if target is not view:
        view.copy_(target)
