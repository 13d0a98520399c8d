"""The engine core: continuous batching over a paged KV cache with multi-LoRA batches.

``engine.py`` (async API) -> ``scheduler.py`` (what runs each step) -> ``block_manager.py``
(KV blocks) -> ``model_runner.py`` (inputs, CUDA graphs, forward; ``merging.py`` picks
merged or unmerged mode per step) -> ``sampler.py``;
``detokenizer.py`` streams text; ``types.py`` is the interface to the serving layer.
``Engine`` is imported lazily: the model package imports ``types`` from here.
"""

from executor_svc.engine.types import (
    AdapterWeights,
    EngineRequest,
    EngineStats,
    LoraModuleWeights,
    SamplingOptions,
    TokenEvent,
)

__all__ = [
    "AdapterWeights",
    "Engine",
    "EngineRequest",
    "EngineStats",
    "LoraModuleWeights",
    "SamplingOptions",
    "TokenEvent",
    "running_engine",
]


def __getattr__(name: str):
    if name in ("Engine", "running_engine"):
        from executor_svc.engine import engine

        return getattr(engine, name)
    raise AttributeError(name)
