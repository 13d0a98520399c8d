"""Base models: module dims derived from a transformers ``config.json`` (no network, no weights).

Validation checks every LoRA tensor against these dims. Llama, Mistral and Qwen2 share one
decoder layout (with grouped-query attention)::

    q_proj    hidden -> heads * head_dim          gate_proj  hidden       -> intermediate
    k_proj    hidden -> kv_heads * head_dim       up_proj    hidden       -> intermediate
    v_proj    hidden -> kv_heads * head_dim       down_proj  intermediate -> hidden
    o_proj    heads * head_dim -> hidden
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from loraserve.errors import AlreadyExists, InvalidArgument
from registry_svc.db import Database
from registry_svc.models import BaseModelRow

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
MAX_CONFIG_JSON_BYTES = 1 << 20


@dataclass(slots=True)
class BaseModelInfo:
    base_model_id: str
    architecture: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    # short module name -> (in_features, out_features)
    modules: dict[str, tuple[int, int]]
    config_json: str = ""
    create_time: float = 0.0


def parse_config(base_model_id: str, config_json: str) -> BaseModelInfo:
    """Module dims of a Llama / Mistral / Qwen2 config; InvalidArgument when it is not one."""
    if len(config_json.encode()) > MAX_CONFIG_JSON_BYTES:
        raise InvalidArgument.field("config_json", "is larger than 1 MiB")
    try:
        cfg = json.loads(config_json)
    except json.JSONDecodeError as exc:
        raise InvalidArgument.field("config_json", f"is not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise InvalidArgument.field("config_json", "must be a JSON object")
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InvalidArgument.field(
            "config_json",
            f"model_type {model_type!r} is not supported; expected one of "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}",
        )

    def need(key: str) -> int:
        value = cfg.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise InvalidArgument.field("config_json", f"{key} must be a positive integer")
        return value

    hidden = need("hidden_size")
    heads = need("num_attention_heads")
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    if not isinstance(kv_heads, int) or heads % kv_heads:
        raise InvalidArgument.field(
            "config_json", "num_key_value_heads must divide num_attention_heads"
        )
    intermediate = need("intermediate_size")
    modules = {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, intermediate),
        "up_proj": (hidden, intermediate),
        "down_proj": (intermediate, hidden),
    }
    architectures = cfg.get("architectures") or []
    architecture = architectures[0] if architectures else f"{model_type}ForCausalLM"
    return BaseModelInfo(
        base_model_id=base_model_id,
        architecture=str(architecture),
        num_layers=need("num_hidden_layers"),
        hidden_size=hidden,
        vocab_size=need("vocab_size"),
        modules=modules,
        config_json=config_json,
    )


def _info(row: BaseModelRow) -> BaseModelInfo:
    return BaseModelInfo(
        base_model_id=row.base_model_id,
        architecture=row.architecture,
        num_layers=row.num_layers,
        hidden_size=row.hidden_size,
        vocab_size=row.vocab_size,
        modules={k: (int(v[0]), int(v[1])) for k, v in row.modules.items()},
        config_json=row.config_json,
        create_time=row.create_time,
    )


def register_base_model(db: Database, info: BaseModelInfo) -> BaseModelInfo:
    """Insert the base model; re-registering the same dims is a no-op, other dims conflict."""
    with db.write() as session:
        row = session.get(BaseModelRow, info.base_model_id)
        if row is not None:
            existing = _info(row)
            if (existing.modules, existing.num_layers) != (info.modules, info.num_layers):
                raise AlreadyExists(
                    f"base model {info.base_model_id!r} is already registered with other dims"
                )
            return existing
        row = BaseModelRow(
            base_model_id=info.base_model_id,
            architecture=info.architecture,
            num_layers=info.num_layers,
            hidden_size=info.hidden_size,
            vocab_size=info.vocab_size,
            modules={k: list(v) for k, v in info.modules.items()},
            config_json=info.config_json,
            create_time=time.time(),
        )
        session.add(row)
        session.flush()
        return _info(row)


def get_base_model(db: Database, base_model_id: str) -> BaseModelInfo | None:
    with db.read() as session:
        row = session.get(BaseModelRow, base_model_id)
        return _info(row) if row is not None else None
