"""The `obliviate` command: one parser over the floors below (serve, eval, bench, sae, features, unlearn)."""

from __future__ import annotations

import argparse
import logging
import sys

from evals.bench import add_bench
from evals.cli import add_eval
from server.cli import add_serve
from server.errors import CLIError
from workshop.cli import add_attack, add_features, add_sae, add_unlearn


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + message
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="obliviate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for register in (add_serve, add_sae, add_features, add_unlearn, add_attack, add_eval, add_bench):
        register(sub)
    return parser


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
