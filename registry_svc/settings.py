"""Registry settings: ``LORASERVE_REGISTRY_*`` plus the shared ``LORASERVE_*`` ones."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from loraserve.settings import DEFAULT_REGISTRY_PORT, CommonSettings


class RegistrySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORASERVE_REGISTRY_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = DEFAULT_REGISTRY_PORT
    common: CommonSettings = Field(default_factory=CommonSettings)
