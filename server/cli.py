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
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY'")
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


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ablation.sae_io import SAELoadError
    from ablation.spec import ProfileError, load_profiles
    from server.app import build_app, load_model_for, profile_table
    from server.models import ModelLoadError

    settings = settings_from(args)
    if settings.max_batch_size < 1 or settings.max_model_len < 2:
        raise CLIError("--max-batch-size must be ≥ 1 and --max-model-len ≥ 2")
    if settings.engine == "builtin" and (settings.tensor_parallel_size > 1 or settings.data_parallel_size > 1):
        raise CLIError("--tensor-parallel-size and --data-parallel-size need --engine vllm")
    try:
        # fail fast, before serving: profiles first, they need no model
        load_profiles(settings.profiles, settings.model)
        model = load_model_for(settings)
        table = profile_table(settings, model)
    except (ProfileError, SAELoadError, ModelLoadError, ValueError) as e:
        raise CLIError(str(e)) from None
    app = build_app(settings, model, table)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level)
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
    from ablation.offline.cli import add_features, add_sae
    from evals.bench import add_bench
    from evals.cli import add_eval

    return [add_sae, add_features, add_eval, add_bench]


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
