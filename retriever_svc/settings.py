"""Retriever settings: ``LORASERVE_RETRIEVER_*`` plus the shared ``LORASERVE_*`` ones."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from loraserve.settings import DEFAULT_RETRIEVER_PORT, CommonSettings


class RetrieverSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORASERVE_RETRIEVER_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = DEFAULT_RETRIEVER_PORT
    common: CommonSettings = Field(default_factory=CommonSettings)
