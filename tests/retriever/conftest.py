"""Fixtures of the retriever tests: a few tiny PEFT adapters, written once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraserve.devmodels import write_lora_adapter


@pytest.fixture(scope="session")
def tiny_adapters(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> list[Path]:
    """Eight distinct rank-2 adapters (q_proj, v_proj) for the tiny Llama."""
    root = tmp_path_factory.mktemp("retriever-adapters")
    return [
        write_lora_adapter(
            root / f"a{i}",
            tiny_model_dir,
            rank=2,
            alpha=4.0,
            target_modules=["q_proj", "v_proj"],
            seed=i,
            base_model_id="tiny-llama",
        )
        for i in range(8)
    ]
