"""Server settings: CLI flags with OBLIVIATE_* environment fallbacks, built in main() or tests."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pydantic_settings import BaseSettings, SettingsConfigDict

from ablation.spec import default_profiles_dir
from models.names import DEFAULT_MODEL, default_cache_dir
from server.errors import CLIError

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the --max-lora-rank values vLLM takes


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
    trigger_audit: bool = True  # each choice of an editing profile says whether its edit fired (and /metrics counts it)
    tensor_parallel_size: int = 1  # vllm engine only
    data_parallel_size: int = 1  # vllm engine only
    enforce_eager: bool = False  # vllm engine only: eager mode instead of vLLM's compiled mode
    # LoRA adapter profiles on the vLLM engine (its per-request LoRA): on when a served profile names an adapter,
    # or with enable_lora for adapter profiles added at run time; adapters in one batch, the largest rank
    # (None: what the served adapters need, their number and largest rank; 4 and 16 when none is served)
    enable_lora: bool = False
    max_loras: int | None = None
    max_lora_rank: int | None = None
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


def check_serve(settings: Settings, api_key_flag: bool) -> None:
    """What can be told from the settings alone, before anything loads."""
    if settings.max_batch_size < 1 or settings.max_model_len < 2:
        raise CLIError("--max-batch-size must be ≥ 1 and --max-model-len ≥ 2")
    if min(settings.max_body_bytes, settings.max_choices, settings.request_timeout, settings.drain_timeout) <= 0 \
            or settings.max_queue < 0:
        raise CLIError("--max-body-bytes, --max-choices, --request-timeout and --drain-timeout must be > 0, "
                       "--max-queue ≥ 0")
    if settings.replicas < 0 or (settings.max_replicas is not None and settings.max_replicas < max(settings.replicas, 1)):
        raise CLIError("--replicas must be ≥ 0 and --max-replicas ≥ --replicas")
    if settings.max_replicas and not settings.replicas:
        raise CLIError("--max-replicas needs --replicas (the least number of replicas)")
    if (settings.max_loras is not None and settings.max_loras < 1) or settings.max_lora_rank not in (None, *VLLM_LORA_RANKS):
        raise CLIError(f"--max-loras must be ≥ 1 and --max-lora-rank one of {', '.join(map(str, VLLM_LORA_RANKS))}")
    if settings.engine == "builtin" and (settings.tensor_parallel_size > 1 or settings.data_parallel_size > 1):
        raise CLIError("--tensor-parallel-size and --data-parallel-size need --engine vllm")
    if settings.engine == "builtin" and settings.enforce_eager:
        raise CLIError("--enforce-eager needs --engine vllm (the built-in engine is always eager)")
    loopback = settings.host in ("127.0.0.1", "localhost", "::1")
    if not loopback and not (settings.keys or settings.api_key or settings.allow_unauthenticated):
        raise CLIError(f"refusing to serve on {settings.host} without keys: every client could use every profile. "
                       f"Give --keys FILE (or OBLIVIATE_API_KEY), or --allow-unauthenticated")
    if api_key_flag:
        logging.getLogger("obliviate").warning("--api-key is visible to every user of this machine in `ps`; "
                                               "prefer OBLIVIATE_API_KEY or a --keys file with sha256 entries")
