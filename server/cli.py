"""The `obliviate` command: serve, eval, sae, features. Each subcommand imports what it needs."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from server.errors import CLIError


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve a model with ablation profiles over an OpenAI-compatible API")
    p.add_argument("--model", help="gemma-3-270m (embedded, default), a local HF folder or a hub name")
    p.add_argument("--profiles", type=Path, action="append",
                   help="a directory of profile YAML files (repeatable; default: the shipped profiles)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda if available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--engine", choices=["builtin", "vllm"], help="builtin (default) or vllm")
    p.add_argument("--max-batch-size", type=int, help="most sequences decoded together (default 32)")
    p.add_argument("--tensor-parallel-size", type=int, help="vllm engine: GPUs per model replica")
    p.add_argument("--data-parallel-size", type=int, help="vllm engine: model replicas")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--cache-dir", type=Path, help="where the embedded model is prepared once")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' for every profile (a flag shows in "
                   "`ps`: prefer OBLIVIATE_API_KEY or --keys)")
    p.add_argument("--keys", type=Path, help="a YAML keys file: which profiles each key may use (README: Keys)")
    p.add_argument("--allow-unauthenticated", action="store_true", default=None,
                   help="serve on a non-loopback --host without --keys or --api-key")
    p.add_argument("--max-body-bytes", type=int, help="largest request body (default 4 MiB)")
    p.add_argument("--max-choices", type=int, help="most completions one request may ask for: prompts x n (default 64)")
    p.add_argument("--max-queue", type=int,
                   help="sequences that may wait beyond the running batch; more get 429 (default 128)")
    p.add_argument("--request-timeout", type=float, help="seconds a request may take in all (default 600)")
    p.add_argument("--drain-timeout", type=int, help="seconds in-flight requests get to finish on SIGTERM (default 30)")
    p.set_defaults(func=cmd_serve)


def settings_from(args: argparse.Namespace):
    from pydantic import ValidationError

    from server.settings import Settings

    fields = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    try:
        return Settings(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        raise CLIError(f"bad setting {'.'.join(map(str, err['loc']))}: {err['msg']}") from None


def check_serve(settings, api_key_flag: bool) -> None:
    """What can be told from the settings alone, before anything loads."""
    if settings.max_batch_size < 1 or settings.max_model_len < 2:
        raise CLIError("--max-batch-size must be ≥ 1 and --max-model-len ≥ 2")
    if min(settings.max_body_bytes, settings.max_choices, settings.request_timeout, settings.drain_timeout) <= 0 \
            or settings.max_queue < 0:
        raise CLIError("--max-body-bytes, --max-choices, --request-timeout and --drain-timeout must be > 0, "
                       "--max-queue ≥ 0")
    if settings.engine == "builtin" and (settings.tensor_parallel_size > 1 or settings.data_parallel_size > 1):
        raise CLIError("--tensor-parallel-size and --data-parallel-size need --engine vllm")
    loopback = settings.host in ("127.0.0.1", "localhost", "::1")
    if not loopback and not (settings.keys or settings.api_key or settings.allow_unauthenticated):
        raise CLIError(f"refusing to serve on {settings.host} without keys: every client could use every profile. "
                       f"Give --keys FILE (or OBLIVIATE_API_KEY), or --allow-unauthenticated")
    if api_key_flag:
        logging.getLogger("obliviate").warning("--api-key is visible to every user of this machine in `ps`; "
                                               "prefer OBLIVIATE_API_KEY or a --keys file with sha256 entries")


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ablation.sae_io import SAELoadError
    from ablation.spec import ProfileError, load_profiles
    from server.app import build_app, load_model_for, profile_table
    from server.keys import Keyring, KeysError
    from server.models import ModelLoadError

    settings = settings_from(args)
    check_serve(settings, args.api_key is not None)
    try:
        # fail fast, before serving: profiles and keys first, they need no model
        names = list(load_profiles(settings.profiles, settings.model))
        keyring = Keyring.build(settings.keys, settings.api_key, names)
        model = load_model_for(settings)
        table = profile_table(settings, model)
    except (ProfileError, SAELoadError, ModelLoadError, KeysError, ValueError) as e:
        raise CLIError(str(e)) from None
    app = build_app(settings, model, table, keyring)
    # on SIGTERM: stop accepting, give in-flight requests drain_timeout s, cancel the rest, stop the engine
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                timeout_graceful_shutdown=settings.drain_timeout)
    return 0


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + message
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="obliviate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    add_serve(sub)
    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands():
    from ablation.offline.cli import add_features, add_sae, add_unlearn
    from evals.bench import add_bench
    from evals.cli import add_eval

    return [add_sae, add_features, add_unlearn, add_eval, add_bench]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except CLIError as e:
        print(f"obliviate: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
