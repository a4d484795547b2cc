"""Reading and checking `obliviate unlearn`'s inputs (forget and retain text, dev prompts) before any model
loads: each problem is one message that says what to give instead."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from workshop.corpus import read_texts

MIN_TEXTS, MIN_CHARS = 8, 2000
SETS = ("forget", "generic", "nearby")


class UnlearnError(ValueError):
    """Inputs or results that cannot make a profile; the message says what to try."""


@dataclass
class Inputs:
    forget: list[list[str]]  # one list per forget file: a topic each
    retain: list[list[str]]  # one list per retain file
    dev: dict[str, list[dict]] | None  # set -> [{prompt, answers}]
    chat: bool = False  # the dev prompts are a user's chat messages (asked through the chat template)


def read_files(paths: list[Path], what: str) -> list[list[str]]:
    out = []
    for p in paths:
        if not Path(p).is_file():
            raise UnlearnError(f"{p}: {what} file not found")
        try:
            out.append(read_texts(p))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError) as e:
            raise UnlearnError(f"{p}: cannot read {what} texts ({type(e).__name__}: {e})") from None
        if not out[-1]:
            raise UnlearnError(f"{p}: no {what} text in it (one text a line; lines starting with # are comments)")
    return out


def read_dev(path: Path) -> dict[str, list[dict]]:
    if not Path(path).is_file():
        raise UnlearnError(f"{path}: dev prompts file not found")
    sets: dict[str, list[dict]] = {s: [] for s in SETS}
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            item = {"id": row.get("id", f"{path.stem}{i}"), "prompt": row["prompt"], "answers": list(row["answers"])}
            sets[row["set"]].append(item)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UnlearnError(f"{path}:{i}: each line must be JSON with prompt, answers (a list) and set "
                               f"({', '.join(SETS)}); {type(e).__name__}: {e}") from None
    if not sets["forget"] or not sets["generic"]:
        raise UnlearnError(f"{path}: need dev prompts in the sets 'forget' and 'generic' (found "
                           f"{', '.join(f'{k} {len(v)}' for k, v in sets.items())})")
    return {k: v for k, v in sets.items() if v}


def read_inputs(forget: list[Path], retain: list[Path], dev: Path | None, chat: bool = False) -> Inputs:
    topics = read_files(forget, "forget")
    for p, texts in zip(forget, topics):
        chars = sum(map(len, texts))
        if len(texts) < MIN_TEXTS or chars < MIN_CHARS:
            raise UnlearnError(f"{p}: too little forget text ({len(texts)} texts, {chars} characters): give at least "
                               f"{MIN_TEXTS} texts and {MIN_CHARS} characters about the topic, one text a line")
    forget_texts = [t for texts in topics for t in texts]
    retain_sets = read_files(retain, "retain")
    for p, texts in zip(retain, retain_sets):
        if len(texts) < 2:
            raise UnlearnError(f"{p}: {len(texts)} retain texts; give text on what must be kept, one text a line")
    norm = lambda t: " ".join(t.lower().split())  # noqa: E731
    shared = {norm(t) for t in forget_texts} & {norm(t) for texts in retain_sets for t in texts}
    if len(shared) > 0.1 * len(forget_texts):
        raise UnlearnError(f"{len(shared)} of the {len(forget_texts)} forget texts are also in the retain files: "
                           f"the retain text must be about other things")
    return Inputs(topics, retain_sets, read_dev(dev) if dev else None, chat)


