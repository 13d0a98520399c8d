"""Settings shared by every process, read from ``LORASERVE_*`` environment variables.

Each service has its own class in ``<service>/settings.py`` (env prefix
``LORASERVE_<SERVICE>_``) that embeds these shared settings as ``common``.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_REGISTRY_PORT = 50151
DEFAULT_RETRIEVER_PORT = 50152
DEFAULT_EXECUTOR_PORT = 50153


class CommonSettings(BaseSettings):
    """What every loraserve process needs to know about the deployment."""

    model_config = SettingsConfigDict(env_prefix="LORASERVE_", extra="ignore")

    data_dir: Path = Field(
        Path(".loraserve"), description="Root of blobs, Qdrant local files, SQLite, caches."
    )
    log_level: str = "INFO"
    log_json: bool = False

    # Infrastructure. Empty broker_url = embedded broker (no server); empty qdrant_url = local mode.
    broker_url: str = ""
    qdrant_url: str = ""
    qdrant_api_key: str = ""
    database_url: str = Field(
        "", description="SQLAlchemy URL of the registry's metadata; empty = SQLite in data_dir."
    )

    embedding_model: str = Field(
        "", description="sentence-transformers model dir; empty = bundled all-MiniLM-L6-v2."
    )

    # Where the services are, for clients and for service-to-service calls.
    registry_address: str = f"127.0.0.1:{DEFAULT_REGISTRY_PORT}"
    retriever_address: str = f"127.0.0.1:{DEFAULT_RETRIEVER_PORT}"
    executor_addresses: list[str] = Field(
        default_factory=lambda: [f"127.0.0.1:{DEFAULT_EXECUTOR_PORT}"]
    )

    # Bearer tokens. Empty = auth off. admin ⊇ write ⊇ read.
    read_token: str = ""
    write_token: str = ""
    admin_token: str = ""
    # Token this process presents when it calls another service (e.g. executor -> registry).
    client_token: str = ""

    @property
    def qdrant_path(self) -> Path:
        return self.data_dir / "qdrant"

    def resolved_broker_url(self) -> str:
        """Redis (or any kombu URL) when configured, else the embedded SQLite broker."""
        if self.broker_url:
            return self.broker_url
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return f"sqla+sqlite:///{(self.data_dir / 'broker.sqlite').resolve()}"
