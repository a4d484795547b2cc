"""Server settings: CLI flags with OBLIVIATE_* environment fallbacks, built in main() or tests."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic_settings import BaseSettings, SettingsConfigDict

from ablation.spec import default_profiles_dir
from server.models import DEFAULT_MODEL, default_cache_dir


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OBLIVIATE_", extra="forbid")

    model: str = DEFAULT_MODEL
    profiles: list[Path] = [default_profiles_dir()]
    host: str = "127.0.0.1"
    port: int = 8000
    device: str | None = None
    dtype: str | None = None
    engine: Literal["builtin", "vllm"] = "builtin"
    max_batch_size: int = 32
    tensor_parallel_size: int = 1  # vllm engine only
    data_parallel_size: int = 1  # vllm engine only
    max_model_len: int = 2048
    cache_dir: Path = default_cache_dir()
    api_key: str | None = None
    log_level: str = "info"
