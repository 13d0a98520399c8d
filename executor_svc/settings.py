"""Executor settings: ``LORASERVE_EXECUTOR_*`` plus the shared ``LORASERVE_*`` ones.

Every knob of the serving layer lives here (no ``os.environ`` reads elsewhere). Zero values
mean "derive": ``num_lora_slots=0`` sizes the slot pool from ``adapter_memory_bytes`` and the
model's bytes per slot; ``model_dir=""`` builds the tiny random Llama under
``data_dir/models/tiny-llama`` on first start (the CPU default of ``loraserve up``).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from loraserve.settings import DEFAULT_EXECUTOR_PORT, CommonSettings


class ExecutorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORASERVE_EXECUTOR_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = DEFAULT_EXECUTOR_PORT
    common: CommonSettings = Field(default_factory=CommonSettings)
    replica_id: str = Field("", description="Name in GetStats; empty = executor-<host>:<port>.")

    # Model and engine.
    model_dir: str = Field("", description="transformers checkpoint; empty = tiny random Llama.")
    device: str = Field("auto", description='"auto" (cuda when available), "cuda", "cpu".')
    dtype: str = Field("auto", description='"auto" (bf16 on cuda, fp32 on cpu) or a torch dtype.')
    max_model_len: int = Field(2048, description="Prompt + generated tokens per request.")
    max_num_seqs: int = Field(64, description="Requests decoded together in one batch.")
    max_num_batched_tokens: int = Field(
        2048,
        ge=16,
        description="Tokens per engine step (prefill chunks + decodes): larger steps prefill "
        "faster, and longer steps delay the decodes batched with them.",
    )
    kv_memory_bytes: int = Field(0, description="KV cache size; 0 = engine default.")

    # Adapters.
    num_lora_slots: int = Field(8, description="GPU adapter slots; 0 = adapter_memory_bytes.")
    adapter_memory_bytes: int = Field(0, description="GPU bytes for slots when num_lora_slots=0.")
    max_lora_rank: int = 64
    host_cache_bytes: int = Field(2 << 30, description="Host LRU of parsed adapters.")
    pin_host_cache: bool = Field(
        False,
        description="Keep cached adapters in page-locked memory: a GPU swap-in is then one "
        "asynchronous copy, but every cold adapter waits for a new page-locked buffer (100-350 "
        "ms for 80 MB on the H100 host, against 5-16 ms for the copy from pageable memory).",
    )
    adapter_load_concurrency: int = Field(
        64, ge=1, description="Adapters parsed and packed at once; lower it on hosts of few cores."
    )
    disk_cache_bytes: int = Field(
        50 << 30,
        description="Disk budget of adapters downloaded from the registry, least recently "
        "used evicted first; 0 = unbounded.",
    )
    adapter_dir: str = Field("", description="Local PEFT dirs <dir>/<id>[/<version>], tried first.")
    use_registry: bool = Field(True, description="Fetch unknown adapters from the registry.")
    slot_wait_s: float = Field(10.0, description="Longest wait for a free slot before 429.")
    latest_version_ttl_s: float = Field(5.0, description="Cache of version 0 -> latest READY.")

    # dLoRA merged mode (executor_svc/engine/merging.py).
    merge_adapters: bool = Field(
        True,
        description="Fold an adapter that every running request uses alone into the base "
        "weights: its tokens then need no LoRA work. In bf16 the merged weights carry one more "
        "rounding (as PEFT's merge does), so a request's tokens can differ from an unmerged "
        "run's; false keeps outputs independent of what else is running.",
    )
    merge_patience_steps: int = Field(
        8, ge=1, description="Engine steps a merge or unmerge condition must hold first."
    )
    merge_at_share: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="Merge an adapter once this share of a step's requests run it alone.",
    )
    unmerge_below_share: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Unmerge once fewer than this share of a step's requests run the merged "
        "adapter alone (the others subtract it meanwhile).",
    )

    # Admission and request limits.
    max_queue: int = Field(1024, description="Requests waiting (for slots or a batch seat).")
    default_max_tokens: int = 128
    max_tokens: int = Field(4096, description="Cap on SamplingParams.max_tokens.")
    max_stop_strings: int = 8
    max_stop_length: int = 128
    warmup_wait_s: float = Field(120.0, description="How long a request waits for warm-up.")

    @model_validator(mode="after")
    def _merge_shares_ordered(self) -> ExecutorSettings:
        if self.unmerge_below_share > self.merge_at_share:
            raise ValueError(
                f"unmerge_below_share {self.unmerge_below_share} exceeds merge_at_share "
                f"{self.merge_at_share}: an adapter would be unmerged as soon as it is merged"
            )
        return self

    @property
    def resolved_replica_id(self) -> str:
        return self.replica_id or f"executor-{self.host}:{self.port}"

    @property
    def cache_dir(self) -> Path:
        return self.common.data_dir / "executor-cache"

    @property
    def tiny_model_dir(self) -> Path:
        return self.common.data_dir / "models" / "tiny-llama"
