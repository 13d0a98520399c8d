"""Registry settings: ``LORASERVE_REGISTRY_*`` plus the shared ``LORASERVE_*`` ones."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from loraserve.settings import DEFAULT_REGISTRY_PORT, CommonSettings


class RegistrySettings(BaseSettings):
    """Limits, storage and Celery knobs of the registry and of its ingestion worker."""

    model_config = SettingsConfigDict(env_prefix="LORASERVE_REGISTRY_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = DEFAULT_REGISTRY_PORT
    common: CommonSettings = Field(default_factory=CommonSettings)

    # Storage. Empty blob_dir = common.data_dir / "blobs".
    blob_dir: Path | None = None

    # Validation limits.
    max_rank: int = Field(128, description="Largest LoRA rank accepted (any module).")
    max_file_bytes: int = Field(4 << 30, description="Cap on adapter_model.safetensors.")
    max_config_bytes: int = Field(1 << 20, description="Cap on adapter_config.json.")
    max_header_bytes: int = Field(4 << 20, description="Cap on the safetensors JSON header.")
    max_sample_inputs: int = 1000
    max_sample_input_chars: int = 8192
    max_tags: int = 32

    # Celery. broker_key_prefix isolates several deployments (or tests) on one Redis.
    broker_key_prefix: str = ""
    broker_poll_interval_s: float = Field(
        0.1, description="Polling period of the embedded (SQLite) broker."
    )
    visibility_timeout_s: float = Field(
        3600.0, description="Redis: an unacknowledged task is redelivered after this long."
    )
    ingest_max_retries: int = 5
    ingest_retry_backoff_max_s: int = 60
    # Test-only: sleep this long inside the ingestion task (to kill a worker mid-task).
    test_ingest_delay_s: float = 0.0

    # Maintenance loop of the registry process: re-send stalled ingestions, prune, collect.
    maintenance_interval_s: float = 30.0
    ingest_stall_s: float = Field(
        300.0, description="Re-send ingestion of a record that has not moved for this long."
    )
    blob_gc_grace_s: float = Field(
        3600.0, description="Orphan blobs younger than this are kept (a push may be mid-commit)."
    )

    # Watch streams poll the change log this often (the writer may be another process).
    watch_poll_interval_s: float = 0.15
    # Change-log rows older than this are pruned.
    event_retention_s: float = 3600.0

    @property
    def resolved_blob_dir(self) -> Path:
        return self.blob_dir or self.common.data_dir / "blobs"
