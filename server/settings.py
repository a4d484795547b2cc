"""Server settings: CLI flags with OBLIVIATE_* environment fallbacks, built in main() or tests."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic_settings import BaseSettings, SettingsConfigDict

from ablation.spec import default_profiles_dir
from models.loading import DEFAULT_MODEL, default_cache_dir


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OBLIVIATE_", extra="forbid")

    model: str = DEFAULT_MODEL
    profiles: list[Path] = [default_profiles_dir()]
    profiles_dir: Path | None = None  # where POST /v1/profiles writes (and a restart reads) runtime profiles
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
    chat_template: str | None = None  # a Jinja file or a shipped name (models/templates); default: the model's
    api_key: str | None = None  # one key for every profile; prefer OBLIVIATE_API_KEY to the flag (ps shows flags)
    keys: Path | None = None  # a keys file: which profiles each key may use (server/keys.py)
    allow_unauthenticated: bool = False  # serve on a non-loopback host without keys
    # limits (see README "Limits"): body size checked before parsing; choices = prompts x n
    max_body_bytes: int = 4 * 2**20
    max_choices: int = 64  # per request
    max_queue: int = 128  # choices waiting beyond the running batch; more -> 429
    request_timeout: float = 600.0  # seconds from arrival to the last token
    drain_timeout: int = 30  # seconds in-flight requests get to finish on SIGTERM
    log_level: str = "info"
    # Ray Serve (server/ray_serve.py): replicas > 0 serves through Ray; autoscaled up to max_replicas
    replicas: int = 0
    max_replicas: int | None = None
    target_ongoing_requests: float = 16.0  # per replica, for autoscaling
    replica_cpus: float = 1.0  # Ray's CPU reservation per replica
    replica_threads: int | None = None  # torch threads per replica (default: torch's)

    def profile_dirs(self) -> list[Path]:
        """The directories profiles load from: --profiles, then --profiles-dir (made if missing; its
        profiles override the others)."""
        if self.profiles_dir is None:
            return list(self.profiles)
        self.profiles_dir.mkdir(parents=True, exist_ok=True)
        return [*self.profiles, self.profiles_dir]
