"""`obliviate eval <report> --server URL --profiles a,b,c --out DIR` and `obliviate eval all`."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

REPORTS = ["completions", "familiarity", "tokens", "loss", "trivia", "robustness"]


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="run an eval report against a server (over HTTP only)")
    p.add_argument("report", choices=REPORTS + ["all"])
    p.add_argument("--server", default="http://127.0.0.1:8000", help="base URL of the server")
    p.add_argument("--profiles", default="baseline,sae_only,hp_unlearn,prompted",
                   help="comma-separated profiles (baseline first: loss added is relative to it)")
    p.add_argument("--out", type=Path, default=Path("reports"))
    p.add_argument("--limit", type=int, help="at most N items per data set (a quick pass)")
    p.add_argument("--split", choices=["test", "dev", "all"], default="test")
    p.add_argument("--topic", default="hp", help="what is being forgotten: a shipped topic (hp, sw), several "
                   "(hp,sw: a profile that forgets them all), or a topic YAML (see evals/data/topics)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--model", help="model name to send (default: the server's default)")
    p.add_argument("--profile-via", choices=["field", "model"], default="field",
                   help="send the profile as a request field or as the model name ('model:profile')")
    p.add_argument("--api-key")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from clients.http import APIError
    from evals.common import EvalError
    from server.errors import CLIError

    profiles = [p for p in args.profiles.split(",") if p]
    if not profiles or (args.limit is not None and args.limit < 1) or args.concurrency < 1:
        raise CLIError("need at least one profile, --limit ≥ 1 and --concurrency ≥ 1")
    try:
        asyncio.run(run_reports(args, profiles))
    except (EvalError, APIError) as e:
        raise CLIError(str(e)) from None
    return 0


async def run_reports(args, profiles: list[str]) -> dict:
    from clients.http import AsyncClient
    from evals.common import EvalContext, Topics, server_info
    from evals.summary import write_index

    client = AsyncClient(args.server, model=args.model, api_key=args.api_key, profile_via=args.profile_via,
                         concurrency=args.concurrency)
    try:
        args.out.mkdir(parents=True, exist_ok=True)  # charts are written before the report files
        ctx = EvalContext(client, profiles, args.out, args.limit, args.split, Topics.of(args.topic))
        ctx.server_info = await server_info(client, profiles)
        names = [args.report] if args.report != "all" else [n for n in REPORTS if available(n, ctx.topics)]
        results, timings = {}, {}
        for name in names:
            t0 = time.perf_counter()
            results[name] = await report_fn(name)(ctx)
            timings[name] = time.perf_counter() - t0
            print(f"{name}: {args.out / (name + '.md')} ({timings[name]:.0f} s)")
        if args.report == "all":
            print(write_index(ctx, results, timings).read_text())
        return results
    finally:
        await client.aclose()


def available(report: str, topics) -> bool:
    """Whether the topics have the data a report needs (`all` skips the others)."""
    if report == "trivia":
        return any(t.trivia for t in topics.topics)
    if report == "robustness":
        return any(t.robustness for t in topics.topics)
    return True


def report_fn(name: str):
    from evals import generation, scoring

    return {"completions": generation.completions, "familiarity": generation.familiarity,
            "robustness": generation.robustness, "tokens": scoring.tokens, "loss": scoring.loss,
            "trivia": scoring.trivia}[name]
