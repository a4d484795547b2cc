"""What every report shares: the data files, the topics being forgotten, scoring rules, the run context
and report writing.

A topic is a YAML file naming its prompt set, lexicon, trivia and robustness sets, and the nearby prompts
that must be kept (evals/data/topics/*.yaml ship hp and sw). Several topics at once (`--topic hp,sw`)
measure a profile that forgets them all: one forget set per topic, and a nearby set without anything
about any of them."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from tqdm import tqdm

from clients.http import APIError, AsyncClient

DATA = Path(__file__).parent / "data"
TOPICS = DATA / "topics"


class EvalError(RuntimeError):
    """A report that cannot run against this server; the message names the report and why."""


def load_jsonl(name: str | Path, split: str = "all", limit: int | None = None) -> list[dict]:
    rows = [json.loads(ln) for ln in (DATA / name).read_text().splitlines() if ln.strip()]
    if split != "all":
        rows = [r for r in rows if r.get("split", split) == split]
    return rows[:limit] if limit else rows


@dataclass(frozen=True)
class Topic:
    name: str
    title: str
    prompts: Path
    lexicon: Path
    nearby: tuple[Path, ...]
    trivia: Path | None = None
    robustness: Path | None = None
    attacks: Path | None = None
    generic: Path = DATA / "generic_prompts.jsonl"  # general-knowledge prompts that must keep their answers
    attack_controls: Path = DATA / "attacks" / "controls.jsonl"  # generic prompts attacked the same ways


def read_topic(ref: str) -> Topic:
    """A shipped topic's name (hp, sw) or a path to a topic YAML."""
    path = Path(ref) if ref.endswith((".yaml", ".yml")) else TOPICS / f"{ref}.yaml"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in TOPICS.glob("*.yaml")))
        raise EvalError(f"unknown topic {ref!r}: use one of {shipped} or a topic YAML file")
    try:
        spec = yaml.safe_load(path.read_text())
        files = {k: (path.parent / spec[k]).resolve() if spec.get(k) else None
                 for k in ("prompts", "lexicon", "trivia", "robustness", "attacks", "generic", "attack_controls")}
        nearby = tuple((path.parent / f).resolve() for f in spec.get("nearby") or [])
        topic = Topic(str(spec["name"]), str(spec.get("title") or spec["name"]), files["prompts"], files["lexicon"],
                      nearby, files["trivia"], files["robustness"], files["attacks"],
                      files["generic"] or Topic.generic, files["attack_controls"] or Topic.attack_controls)
    except (yaml.YAMLError, KeyError, TypeError, AttributeError) as e:
        raise EvalError(f"{path}: a topic needs name, prompts and lexicon ({type(e).__name__}: {e})") from None
    missing = [str(f) for f in (topic.prompts, topic.lexicon, topic.trivia, topic.robustness, topic.attacks,
                                topic.generic, topic.attack_controls, *topic.nearby)
               if f is not None and not f.is_file()]
    if missing:
        raise EvalError(f"{path}: file(s) not found: {', '.join(missing)}")
    return topic


@dataclass(frozen=True)
class Topics:
    """The topics being forgotten, together."""
    topics: tuple[Topic, ...]

    @classmethod
    def of(cls, refs: str) -> "Topics":
        topics = tuple(read_topic(r.strip()) for r in refs.split(",") if r.strip())
        if not topics:
            raise EvalError("need at least one topic")
        return cls(topics)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.topics]

    @property
    def title(self) -> str:
        return " + ".join(t.title for t in self.topics)

    def forget_sets(self, split: str, limit: int | None) -> dict[str, list[dict]]:
        return {t.name: load_jsonl(t.prompts, split, limit) for t in self.topics}

    def generic(self, split: str, limit: int | None) -> list[dict]:
        """The general-knowledge prompts (the first topic's set: topics measured together share one)."""
        return load_jsonl(self.topics[0].generic, split, limit)

    def _kept(self, items: list[dict]) -> list[dict]:
        return [it for it in items if it.get("about") not in self.names]

    def nearby(self, split: str, limit: int | None) -> list[dict]:
        """Every topic's nearby prompts, without the files and items about a topic being forgotten."""
        own = {t.prompts for t in self.topics}
        files = list(dict.fromkeys(f for t in self.topics for f in t.nearby if f not in own))
        items = self._kept([it for f in files for it in load_jsonl(f, split)])
        return items[:limit] if limit else items

    def lexicon(self) -> re.Pattern:
        words = [w.strip() for t in self.topics for w in t.lexicon.read_text().splitlines()
                 if w.strip() and not w.startswith("#")]
        return re.compile(r"\b(" + "|".join(map(re.escape, sorted(set(words), key=len, reverse=True))) + r")\b", re.I)

    def trivia(self, limit: int | None) -> dict[str, list[dict]]:
        return {t.name: load_jsonl(t.trivia, "all", limit) for t in self.topics if t.trivia}

    def robustness(self) -> list[dict]:
        return self._kept([it for t in self.topics if t.robustness for it in load_jsonl(t.robustness)])


def is_correct(text: str, answers: list[str]) -> bool:
    return any(re.search(r"\b" + re.escape(a) + r"\b", text, re.I) for a in answers)


@dataclass
class EvalContext:
    client: AsyncClient
    profiles: list[str]
    out: Path
    limit: int | None = None
    split: str = "test"
    topics: Topics = field(default_factory=lambda: Topics.of("hp"))
    server_info: dict = field(default_factory=dict)
    # what every other profile is compared with (loss added, fluency, answers kept); joins `profiles` first if absent
    baseline: str = "baseline"
    # prompts asked as a user's chat message (/v1/chat/completions, the server's chat template), not completed
    chat: bool = False

    def __post_init__(self):
        self.profiles = [self.baseline, *(p for p in self.profiles if p != self.baseline)]

    @property
    def others(self) -> list[str]:
        return self.profiles[1:]

    def prompt_sets(self, nearby: bool = False) -> dict[str, list[dict]]:
        """The completion prompt sets of this run's split: one per topic being forgotten, generic, and
        (if asked) the nearby prompts that must be kept."""
        sets = {**self.topics.forget_sets(self.split, self.limit),
                "generic": self.topics.generic(self.split, self.limit)}
        return {**sets, "nearby": self.topics.nearby(self.split, self.limit)} if nearby else sets

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

    def max_tokens(self, completion: int) -> int:
        """New tokens per answer: an assistant says a sentence before its answer (chat: 32)."""
        return max(completion, 32) if self.chat else completion

    async def greedy(self, prompt: str, profile: str, max_tokens: int = 10) -> str:
        return (await self.greedy_audited(prompt, profile, max_tokens))[0]

    async def greedy_audited(self, prompt: str, profile: str, max_tokens: int = 10) -> tuple[str, bool | None]:
        """The greedy completion (chat: the reply) and whether the profile's edit fired in the prompt, before
        the answer could start (None: the profile edits nothing). A firing at a generated token comes too
        late to withhold the answer: it counts as not fired."""
        if self.chat:
            r = await self.client.chat([{"role": "user", "content": prompt}], profile, max_tokens=max_tokens,
                                       temperature=0)
            text = r.choices[0].message.content or ""
        else:
            r = await self.client.complete(prompt, profile, max_tokens=max_tokens, temperature=0)
            text = r.choices[0].text
        audit = r.choices[0].unlearning
        if audit is None:
            return text, None
        return text, audit.triggered and audit.first_token < r.usage.prompt_tokens

    async def continuation_logprobs(self, prompt: str, continuation: str, profile: str, report: str) -> list[float]:
        """Logprobs of the tokens of `continuation` after `prompt` (echo + logprobs); in chat mode, of the
        assistant's reply `continuation` to the user message `prompt` (an empty prompt: plain text)."""
        chat = self.chat and bool(prompt)
        if chat and not continuation.strip():
            return []  # an empty reply (the assistant ended at once) has no tokens to score
        try:
            if chat:  # the server renders both; the reply's tokens follow the rendered question's
                user = [{"role": "user", "content": prompt}]
                asked = await self.client.tokenize(messages=user)
                full = await self.client.tokenize(messages=user + [{"role": "assistant", "content": continuation}],
                                                  add_generation_prompt=False, continue_final_message=True)
                lp = (await self.client.logprobs_of(full, profile))[0]
                start = next((i for i, (a, b) in enumerate(zip(asked, full)) if a != b), len(asked))
                start -= len(full) - len(lp.logprobs)  # a BOS the server's context has is not echoed
            else:
                lp = (await self.client.logprobs_of(prompt + continuation, profile))[0]
                start = next((i for i, off in enumerate(lp.offsets) if off >= len(prompt)), len(lp.offsets))
        except APIError as e:
            if e.status in (400, 404, 501) and "profile" not in (e.param or ""):
                raise EvalError(f"the {report} report needs prompt logprobs (echo + logprobs with max_tokens=0)"
                                + (" and chat tokenization (/tokenize with messages)" if chat else "")
                                + f"; the server said: {e.message}") from e
            raise
        return [v for v in lp.logprobs[start:] if v is not None]

    def settings(self, **sampling) -> dict:
        return {"profiles": self.profiles, "limit": self.limit, "split": self.split, "chat": self.chat,
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
