"""SQL tables of the registry: adapters (+ tags), the change log, base models, jobs.

Times are UNIX seconds (float). Lists and small maps are JSON columns; tags also get their own
table so that "carries every tag" filters are plain indexed SQL on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class AdapterRow(Base):
    """One adapter version. ``status`` follows PENDING → VALIDATING → EMBEDDING → READY | FAILED."""

    __tablename__ = "adapters"
    __table_args__ = (
        UniqueConstraint("adapter_id", "version", name="uq_adapter_version"),
        Index("ix_adapters_filter", "base_model", "status"),
    )

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    adapter_id: Mapped[str] = mapped_column(String(128), index=True)
    version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    failure_reason: Mapped[str] = mapped_column(Text, default="")
    base_model: Mapped[str] = mapped_column(String(256))
    domain: Mapped[str] = mapped_column(String(128), default="", index=True)
    description: Mapped[str] = mapped_column(Text, default="")
    tags: Mapped[list[str]] = mapped_column(JSON, default=list)
    sample_inputs: Mapped[list[str]] = mapped_column(JSON, default=list)
    rank: Mapped[int] = mapped_column(Integer, default=0)
    lora_alpha: Mapped[float] = mapped_column(Float, default=0.0)
    use_rslora: Mapped[bool] = mapped_column(default=False)
    target_modules: Mapped[list[str]] = mapped_column(JSON, default=list)
    # [[module, rank, alpha, scale], ...] one per full module name.
    module_scales: Mapped[list[list[Any]]] = mapped_column(JSON, default=list)
    dtype: Mapped[str] = mapped_column(String(16), default="")
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    sha256: Mapped[str] = mapped_column(String(64), default="")
    # [{"name": ..., "size": ..., "sha256": ...}, ...]; blobs are addressed by sha256.
    files: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    ingest_runs: Mapped[int] = mapped_column(Integer, default=0)
    create_time: Mapped[float] = mapped_column(Float)
    update_time: Mapped[float] = mapped_column(Float)


class TagRow(Base):
    __tablename__ = "adapter_tags"

    adapter_pk: Mapped[int] = mapped_column(
        ForeignKey("adapters.pk", ondelete="CASCADE"), primary_key=True
    )
    tag: Mapped[str] = mapped_column(String(128), primary_key=True, index=True)


class EventRow(Base):
    """The change log that watchers in any process poll: one row per adapter change.

    ``seq`` only grows (AUTOINCREMENT: never reused); ``payload`` is the serialized ``Adapter``
    as it was right after the change, so a watcher replays every state, not just the latest.
    """

    __tablename__ = "adapter_events"
    __table_args__ = {"sqlite_autoincrement": True}

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    time: Mapped[float] = mapped_column(Float, index=True)
    event_type: Mapped[str] = mapped_column(String(16))
    payload: Mapped[bytes] = mapped_column(LargeBinary)


class BaseModelRow(Base):
    __tablename__ = "base_models"

    base_model_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    architecture: Mapped[str] = mapped_column(String(128))
    num_layers: Mapped[int] = mapped_column(Integer)
    hidden_size: Mapped[int] = mapped_column(Integer)
    vocab_size: Mapped[int] = mapped_column(Integer)
    # {"q_proj": [in_features, out_features], ...}
    modules: Mapped[dict[str, list[int]]] = mapped_column(JSON)
    config_json: Mapped[str] = mapped_column(Text)
    create_time: Mapped[float] = mapped_column(Float)


class JobRow(Base):
    __tablename__ = "jobs"

    job_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16))
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str] = mapped_column(Text, default="")
    metrics: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    result: Mapped[str] = mapped_column(Text, default="")
    adapter_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Bumped on every update; WatchJob polls it.
    revision: Mapped[int] = mapped_column(Integer, default=0)
    create_time: Mapped[float] = mapped_column(Float)
    update_time: Mapped[float] = mapped_column(Float)
