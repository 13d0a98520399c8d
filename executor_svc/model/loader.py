"""Build a :class:`CausalLM` from a local transformers checkpoint, or from a config with
random weights (benchmarks: a 7B-shaped model initialised on the GPU, nothing on disk)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from executor_svc.model.config import ModelConfig
from executor_svc.model.llama import FUSED, CausalLM


def load_hf_config(model_dir: str | Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(model_dir))


def build_model(
    hf_config,
    *,
    device: torch.device,
    dtype: torch.dtype,
    num_slots: int,
    max_rank: int,
    max_positions: int | None = None,
) -> CausalLM:
    cfg = ModelConfig.from_hf(hf_config)
    return CausalLM(
        cfg,
        num_slots=num_slots,
        max_rank=max_rank,
        dtype=dtype,
        device=device,
        max_positions=max_positions or cfg.max_position_embeddings,
    )


def _checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {model_dir} (.bin is refused)")
    return files


def load_weights(model: CausalLM, tensors) -> None:
    """Copy (name, tensor) pairs in transformers naming into the model's (fused) params."""
    seen: set[str] = set()
    for name, t in tensors:
        seen.add(name)
        if name == "model.embed_tokens.weight":
            model.embed_tokens.weight.data.copy_(t)
        elif name == "lm_head.weight":
            if not model.config.tie_word_embeddings:
                model.lm_head.data.copy_(t)
        elif name == "model.norm.weight":
            model.norm.weight.data.copy_(t)
        elif name.startswith("model.layers."):
            _, _, idx, *rest = name.split(".")
            layer = model.layers[int(idx)]
            if rest[-2] in ("input_layernorm", "post_attention_layernorm"):
                getattr(layer, rest[-2]).weight.data.copy_(t)
            elif rest[-2] in FUSED:
                fused, slice_name = FUSED[rest[-2]]
                getattr(layer, fused).load_slice(slice_name, t, kind=rest[-1])
            elif "rotary_emb" not in name:
                raise ValueError(f"unexpected checkpoint tensor {name}")
        elif "rotary_emb" not in name:
            raise ValueError(f"unexpected checkpoint tensor {name}")
    need = {"model.embed_tokens.weight", "model.norm.weight"}
    if not model.config.tie_word_embeddings:
        need.add("lm_head.weight")
    if missing := need - seen:
        raise ValueError(f"checkpoint lacks {sorted(missing)}")


def load_model(
    model_dir: str | Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    num_slots: int,
    max_rank: int,
    max_positions: int | None = None,
) -> CausalLM:
    model_dir = Path(model_dir)
    model = build_model(
        load_hf_config(model_dir),
        device=device,
        dtype=dtype,
        num_slots=num_slots,
        max_rank=max_rank,
        max_positions=max_positions,
    )

    def tensors():
        for f in _checkpoint_files(model_dir):
            with safe_open(str(f), framework="pt", device="cpu") as fh:
                for key in fh.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    yield key, fh.get_tensor(key)

    load_weights(model, tensors())
    return model


@torch.no_grad()
def init_random(model: CausalLM, *, std: float = 0.02, seed: int = 0) -> CausalLM:
    """Random weights drawn on the model's device (norm weights stay 1, biases 0)."""
    gen = torch.Generator(device=model.device).manual_seed(seed)
    for name, p in model.named_parameters():
        if "layernorm" in name or name.startswith("norm") or name.endswith("bias"):
            continue
        p.normal_(0.0, std, generator=gen)
    return model
