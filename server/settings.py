"""Server settings: CLI flags with OBLIVIATE_* environment fallbacks, built in main() or tests."""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

from ablation.profiles import default_profiles_dir
from server.models import DEFAULT_MODEL, default_cache_dir


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OBLIVIATE_", extra="forbid")

    model: str = DEFAULT_MODEL
    profiles: list[Path] = [default_profiles_dir()]
    host: str = "127.0.0.1"
    port: int = 8000
    device: str | None = None
    dtype: str | None = None
    max_batch_size: int = 8
    max_model_len: int = 2048
    cache_dir: Path = default_cache_dir()
    api_key: str | None = None
    log_level: str = "info"
