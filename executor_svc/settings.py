"""Executor settings: ``LORASERVE_EXECUTOR_*`` plus the shared ``LORASERVE_*`` ones."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from loraserve.settings import DEFAULT_EXECUTOR_PORT, CommonSettings


class ExecutorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORASERVE_EXECUTOR_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = DEFAULT_EXECUTOR_PORT
    common: CommonSettings = Field(default_factory=CommonSettings)
