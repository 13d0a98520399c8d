"""The model shape the engine needs, read from a transformers config (Llama, Mistral, Qwen2)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


@dataclass(slots=True)
class ModelConfig:
    family: str  # "llama" | "mistral" | "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    rope_parameters: dict[str, Any] = field(default_factory=dict)
    sliding_window: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    hf_config: Any = None  # the transformers config, for rope helpers

    @classmethod
    def from_hf(cls, hf: Any) -> ModelConfig:
        archs = getattr(hf, "architectures", None) or []
        family = (
            next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
            or hf.model_type
        )
        if family not in SUPPORTED_ARCHITECTURES.values():
            raise ValueError(
                f"unsupported architecture {archs or hf.model_type!r}; "
                f"supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
        rope = dict(getattr(hf, "rope_parameters", None) or {})
        if not rope:  # transformers 4 style
            rope = dict(getattr(hf, "rope_scaling", None) or {})
            rope.setdefault("rope_theta", getattr(hf, "rope_theta", 10000.0))
        rope.setdefault("rope_type", rope.pop("type", "default"))
        window = getattr(hf, "sliding_window", None)
        if family == "qwen2" and not getattr(hf, "use_sliding_window", False):
            window = None
        eos = hf.eos_token_id
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        return cls(
            family=family,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=family == "qwen2" or bool(getattr(hf, "attention_bias", False)),
            o_bias=family != "qwen2" and bool(getattr(hf, "attention_bias", False)),
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            rope_parameters=rope,
            sliding_window=window,
            eos_token_ids=eos_ids,
            hf_config=hf,
        )
