"""`obliviate eval <report> --server URL --profiles a,b,c --out DIR` and `obliviate eval all`."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from clients.http import APIError, AsyncClient
from evals import attacks, generation, scoring
from evals.common import EvalContext, EvalError, Topics, server_info
from evals.summary import write_index
from server.cli import comma_list
from server.errors import CLIError

REPORT_FNS = {"completions": generation.completions, "familiarity": generation.familiarity,
              "tokens": scoring.tokens, "loss": scoring.loss, "trivia": scoring.trivia,
              "robustness": generation.robustness, "attacks": attacks.attacks}
REPORTS = list(REPORT_FNS)


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="run an eval report against a server (over HTTP only)")
    p.add_argument("report", choices=REPORTS + ["all"])
    p.add_argument("--server", default="http://127.0.0.1:8000", help="base URL of the server")
    p.add_argument("--profiles", type=comma_list(), default=["baseline", "sae_only", "hp_unlearn", "prompted"],
                   help="comma-separated profiles to compare")
    p.add_argument("--baseline", default="baseline",
                   help="the profile the others are compared with (loss added, fluency, answers kept)")
    p.add_argument("--out", type=Path, default=Path("reports"))
    p.add_argument("--limit", type=int, help="at most N items per data set (a quick pass)")
    p.add_argument("--split", choices=["test", "dev", "all"], default="test")
    p.add_argument("--topic", default="hp", help="what is being forgotten: a shipped topic (hp, sw), several "
                   "(hp,sw: a profile that forgets them all), or a topic YAML (see evals/data/topics)")
    p.add_argument("--chat", action="store_true", help="ask each prompt as a user's chat message "
                   "(/v1/chat/completions with the server's chat template; e.g. --topic hp_chat)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--model", help="model name to send (default: the server's default)")
    p.add_argument("--profile-via", choices=["field", "model"], default="field",
                   help="send the profile as a request field or as the model name ('model:profile')")
    p.add_argument("--api-key")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    profiles = args.profiles
    if not profiles or (args.limit is not None and args.limit < 1) or args.concurrency < 1:
        raise CLIError("need at least one profile, --limit ≥ 1 and --concurrency ≥ 1")
    try:
        asyncio.run(run_reports(args.server, profiles, args.out, report=args.report, topic=args.topic,
                                baseline=args.baseline, split=args.split, limit=args.limit,
                                concurrency=args.concurrency, model=args.model, api_key=args.api_key,
                                profile_via=args.profile_via, chat=args.chat))
    except (EvalError, APIError) as e:
        raise CLIError(str(e)) from None
    return 0


async def run_reports(server: str, profiles: list[str], out: Path, *, report: str = "all", topic: str = "hp",
                      baseline: str = "baseline", split: str = "test", limit: int | None = None,
                      concurrency: int = 8, model: str | None = None, api_key: str | None = None,
                      profile_via: str = "field", chat: bool = False) -> dict:
    """Runs one report (or `all` the topic has data for) against `server`, each profile compared with
    `baseline`; writes REPORT.md/.json (and index.md for `all`) under `out`; -> {report: result}."""
    client = AsyncClient(server, model=model, api_key=api_key, profile_via=profile_via, concurrency=concurrency)
    try:
        out.mkdir(parents=True, exist_ok=True)  # charts are written before the report files
        ctx = EvalContext(client, profiles, out, limit, split, Topics.of(topic), baseline=baseline, chat=chat)
        ctx.server_info = await server_info(client, ctx.profiles)
        names = [report] if report != "all" else [n for n in REPORTS if available(n, ctx.topics)]
        results, timings = {}, {}
        for name in names:
            t0 = time.perf_counter()
            results[name] = await REPORT_FNS[name](ctx)
            timings[name] = time.perf_counter() - t0
            print(f"{name}: {out / (name + '.md')} ({timings[name]:.0f} s)")
        if report == "all":
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
    if report == "attacks":
        return any(t.attacks for t in topics.topics)
    return True
