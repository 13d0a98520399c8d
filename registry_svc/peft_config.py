"""Parse and check ``adapter_config.json``; per-module rank, alpha and scale as PEFT computes them.

Matching follows PEFT (``peft.tuners.tuners_utils.check_target_module_exists`` and
``peft.utils.other.get_pattern_key``), for a full module name such as
``model.layers.0.self_attn.q_proj``:

- ``target_modules`` as a string is a regex that must match the whole name; as a list, an entry
  matches the whole name or its dotted suffix (``q_proj`` matches ``...self_attn.q_proj``).
- ``rank_pattern`` / ``alpha_pattern`` keys are regexes matched against a dotted suffix of the
  name (``(.*\\.)?(key)$``), first key in file order wins; no match means ``r`` / ``lora_alpha``.
- scale = alpha / r, or alpha / sqrt(r) with ``use_rslora``.

Patterns come from the client, so they run on the ``regex`` engine with a timeout: a
catastrophically backtracking pattern fails validation instead of hanging the registry.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import regex

from loraserve.errors import FieldViolation, InvalidArgument
from registry_svc.names import CONFIG_FILE

PATTERN_TIMEOUT_S = 0.05
MAX_PATTERN_CHARS = 512
ALL_LINEAR = "all-linear"

# Options whose adapters our kernels cannot serve exactly: refused with a clear message.
_UNSUPPORTED: list[tuple[str, Any, str]] = [
    ("use_dora", lambda v: bool(v), "DoRA (use_dora=true) is not supported"),
    ("modules_to_save", lambda v: bool(v), "modules_to_save is not supported (full modules)"),
    ("bias", lambda v: v not in (None, "none"), "only bias='none' is supported"),
    ("lora_bias", lambda v: bool(v), "lora_bias is not supported"),
    ("fan_in_fan_out", lambda v: bool(v), "fan_in_fan_out (Conv1D layout) is not supported"),
    ("layer_replication", lambda v: bool(v), "layer_replication is not supported"),
    ("target_parameters", lambda v: bool(v), "target_parameters is not supported"),
    ("trainable_token_indices", lambda v: bool(v), "trainable_token_indices is not supported"),
    ("alora_invocation_tokens", lambda v: bool(v), "activated LoRA (aLoRA) is not supported"),
]


@dataclass(slots=True)
class LoraSpec:
    """The fields of adapter_config.json that decide shapes and scales."""

    r: int
    lora_alpha: float
    target_modules: list[str] | str
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    exclude_modules: list[str] | str | None = None
    base_model_name_or_path: str = ""

    def targets(self, module: str) -> bool:
        """Does PEFT put a LoRA on this full module name?"""
        if self.exclude_modules and _matches_list_or_regex(self.exclude_modules, module):
            return False
        if self.target_modules == ALL_LINEAR:
            return True
        return _matches_list_or_regex(self.target_modules, module)

    def rank_alpha(self, module: str) -> tuple[int, float]:
        r = _pattern_value(self.rank_pattern, module, self.r)
        alpha = _pattern_value(self.alpha_pattern, module, self.lora_alpha)
        return int(r), float(alpha)

    def scale(self, rank: int, alpha: float) -> float:
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def short_target_names(self) -> list[str]:
        if isinstance(self.target_modules, str):
            return [self.target_modules]
        return sorted(self.target_modules)


def parse_adapter_config(data: bytes, *, max_rank: int) -> LoraSpec:
    """Parse and check adapter_config.json; every problem found is one field violation."""
    try:
        cfg = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument.field(CONFIG_FILE, f"is not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise InvalidArgument.field(CONFIG_FILE, "must be a JSON object")
    bad: list[FieldViolation] = []

    def fail(key: str, why: str) -> None:
        bad.append(FieldViolation(f"{CONFIG_FILE}.{key}", why))

    if cfg.get("peft_type") != "LORA":
        fail("peft_type", f"must be 'LORA', got {cfg.get('peft_type')!r}")
    for key, is_bad, why in _UNSUPPORTED:
        if is_bad(cfg.get(key)):
            fail(key, why)
    r = cfg.get("r")
    if not _is_int(r) or r <= 0:
        fail("r", "is required and must be a positive integer")
    elif r > max_rank:
        fail("r", f"rank {r} is over this registry's maximum of {max_rank}")
    alpha = cfg.get("lora_alpha")
    if not _is_number(alpha) or alpha <= 0:
        fail("lora_alpha", "is required and must be a positive number")
    targets = cfg.get("target_modules")
    if isinstance(targets, str):
        _check_regex(targets, "target_modules", fail)
    elif not (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)):
        fail("target_modules", "is required: a non-empty list of module names or a regex")
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    for name, pattern, valid in (
        ("rank_pattern", rank_pattern, lambda v: _is_int(v) and 0 < v <= max_rank),
        ("alpha_pattern", alpha_pattern, lambda v: _is_number(v) and v > 0),
    ):
        if not isinstance(pattern, dict):
            fail(name, "must be an object of pattern -> value")
            continue
        for key, value in pattern.items():
            _check_regex(key, f"{name}[{key!r}]", fail)
            if not valid(value):
                limit = f" (maximum rank {max_rank})" if name == "rank_pattern" else ""
                fail(f"{name}[{key!r}]", f"value {value!r} is not valid{limit}")
    if bad:
        raise InvalidArgument(
            "invalid adapter_config.json: " + "; ".join(f"{v.field}: {v.description}" for v in bad),
            bad,
        )
    return LoraSpec(
        r=int(r),
        lora_alpha=float(alpha),
        target_modules=targets if isinstance(targets, str) else list(targets),
        rank_pattern={str(k): int(v) for k, v in rank_pattern.items()},
        alpha_pattern={str(k): float(v) for k, v in alpha_pattern.items()},
        use_rslora=bool(cfg.get("use_rslora", False)),
        exclude_modules=cfg.get("exclude_modules"),
        base_model_name_or_path=str(cfg.get("base_model_name_or_path") or ""),
    )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _check_regex(pattern: str, where: str, fail) -> None:  # noqa: ANN001 - local callback
    if len(pattern) > MAX_PATTERN_CHARS:
        fail(where, f"pattern longer than {MAX_PATTERN_CHARS} characters")
        return
    try:
        regex.compile(pattern)
    except regex.error as exc:
        fail(where, f"is not a valid regex ({exc})")


def _search(pattern: str, text: str, *, full: bool) -> bool:
    try:
        fn = regex.fullmatch if full else regex.match
        return fn(pattern, text, timeout=PATTERN_TIMEOUT_S) is not None
    except TimeoutError:
        raise InvalidArgument.field(
            CONFIG_FILE, f"pattern {pattern[:64]!r} takes too long to match (catastrophic regex)"
        ) from None


def _matches_list_or_regex(spec: list[str] | str, module: str) -> bool:
    if isinstance(spec, str):
        return _search(spec, module, full=True)
    return module in spec or any(module.endswith(f".{t}") for t in spec)


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    for key, value in patterns.items():
        if _search(rf"(.*\.)?({key})$", module, full=False):
            return value
    return default
