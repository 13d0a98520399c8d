"""Small random-weight models and PEFT adapters, built locally (no hub downloads).

Used by the test fixtures, by ``loraserve up`` (the CPU executor's default model) and by the
demo. The tokenizer is a byte-level BPE trained on a few paragraphs, so any text round-trips.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Literal

import torch

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# peft touches an attribute that transformers deprecates; not ours to fix, and noise in the demo.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


Architecture = Literal["llama", "mistral", "qwen2"]

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

_CORPUS = """
loraserve serves one base language model with a large pool of LoRA adapters and picks the
adapters for every prompt. Translate the sentence to French. Summarise the article in one line.
Answer the question about the passage. Is the sentiment of this review positive or negative?
Solve the arithmetic problem: 12 plus 7 equals 19. Write a short poem about the sea.
The quick brown fox jumps over the lazy dog. Premise: a man is walking. Hypothesis: he moves.
def add(a, b): return a + b  # python code. SELECT name FROM users WHERE id = 1;
0123456789 !?.,;:'"()[]{}<>-_=+*/\\|@#$%^&~` newline tab
"""


def build_tokenizer(out_dir: Path, vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_model(
    out_dir: str | Path,
    *,
    architecture: Architecture = "llama",
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_position_embeddings: int = 512,
    seed: int = 0,
) -> Path:
    """Write a random-weight causal LM (fp32) and its tokenizer to ``out_dir``; return it."""
    import transformers

    _quiet_transformers()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out)
    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[architecture]
    config = cfg_cls(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = model_cls(config)
    model.save_pretrained(out, safe_serialization=True)
    return out


def write_lora_adapter(
    out_dir: str | Path,
    base_model_dir: str | Path,
    *,
    rank: int = 8,
    alpha: float = 16.0,
    target_modules: list[str] | None = None,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    use_rslora: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    base_model_id: str | None = None,
    init_scale: float = 0.05,
) -> Path:
    """Write a PEFT LoRA adapter (config + safetensors) with random non-zero A and B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    out = Path(out_dir)
    base = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=target_modules or ALL_PROJECTIONS,
        rank_pattern=rank_pattern or {},
        alpha_pattern=alpha_pattern or {},
        use_rslora=use_rslora,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * init_scale)
    if dtype != torch.float32:
        model = model.to(dtype)
    model.save_pretrained(out, safe_serialization=True)
    if base_model_id is not None:
        cfg_path = out / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = base_model_id
        cfg_path.write_text(json.dumps(cfg, indent=2))
    return out
