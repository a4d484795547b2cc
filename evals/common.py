"""What every report shares: the data files, scoring rules, the run context and report writing."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from clients.http import APIError, AsyncClient

DATA = Path(__file__).parent / "data"


class EvalError(RuntimeError):
    """A report that cannot run against this server; the message names the report and why."""


def load_jsonl(name: str, split: str = "all", limit: int | None = None) -> list[dict]:
    rows = [json.loads(ln) for ln in (DATA / name).read_text().splitlines() if ln.strip()]
    if split != "all":
        rows = [r for r in rows if r.get("split", split) == split]
    return rows[:limit] if limit else rows


def lexicon() -> re.Pattern:
    words = [w.strip() for w in (DATA / "hp_lexicon.txt").read_text().splitlines()
             if w.strip() and not w.startswith("#")]
    return re.compile(r"\b(" + "|".join(map(re.escape, sorted(words, key=len, reverse=True))) + r")\b", re.I)


def is_correct(text: str, answers: list[str]) -> bool:
    return any(re.search(r"\b" + re.escape(a) + r"\b", text, re.I) for a in answers)


@dataclass
class EvalContext:
    client: AsyncClient
    profiles: list[str]
    out: Path
    limit: int | None = None
    split: str = "test"
    server_info: dict = field(default_factory=dict)

    async def gather(self, desc: str, coros: list) -> list:
        """Runs coroutines concurrently (the client bounds concurrency) with a progress bar."""
        bar = tqdm(total=len(coros), desc=desc, leave=False)

        async def one(c):
            try:
                return await c
            finally:
                bar.update()
        try:
            return await asyncio.gather(*(one(c) for c in coros))
        finally:
            bar.close()

    async def greedy(self, prompt: str, profile: str, max_tokens: int = 10) -> str:
        r = await self.client.complete(prompt, profile, max_tokens=max_tokens, temperature=0)
        return r.choices[0].text

    async def continuation_logprobs(self, prompt: str, continuation: str, profile: str, report: str) -> list[float]:
        """Logprobs of the tokens of `continuation` after `prompt` (echo + logprobs)."""
        try:
            lp = (await self.client.logprobs_of(prompt + continuation, profile))[0]
        except APIError as e:
            if e.status in (400, 404, 501) and "profile" not in (e.param or ""):
                raise EvalError(f"the {report} report needs prompt logprobs (echo + logprobs with "
                                f"max_tokens=0); the server said: {e.message}") from e
            raise
        start = next((i for i, off in enumerate(lp.offsets) if off >= len(prompt)), len(lp.offsets))
        return [v for v in lp.logprobs[start:] if v is not None]

    def settings(self, **sampling) -> dict:
        return {"profiles": self.profiles, "limit": self.limit, "split": self.split,
                "server": self.client.base_url, "sampling": sampling}


def provenance(server_info: dict) -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True,
                                  text=True, timeout=5).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None
    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "git_hash": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain")),
            **server_info}


async def server_info(client: AsyncClient, profiles: list[str]) -> dict:
    """The served model and the requested profiles' specs (fails early on unknown profiles)."""
    models = await client.models()
    info = {"models": [m.id for m in models.data if not m.profile]}
    try:
        specs = {p.name: p.model_dump() for p in (await client.profiles()).data}
    except APIError:
        specs = {}  # an OpenAI server without /v1/profiles: profiles are model names
    aliases = {m.profile or m.id for m in models.data}
    missing = [p for p in profiles if p not in specs and p not in aliases]
    if missing:
        raise EvalError(f"the server does not serve profile(s) {', '.join(missing)}; it has: "
                        f"{', '.join(sorted(specs) or sorted(aliases))}")
    info["profiles"] = {p: specs.get(p) for p in profiles}
    return info


def write_report(ctx: EvalContext, name: str, result: dict, markdown: str) -> Path:
    ctx.out.mkdir(parents=True, exist_ok=True)
    result = {"report": name, "provenance": provenance(ctx.server_info), **result}
    (ctx.out / f"{name}.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    (ctx.out / f"{name}.md").write_text(markdown)
    return ctx.out / f"{name}.md"


def md_table(header: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v).replace("|", "\\|").replace("\n", "⏎")  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"
