"""The attack report against the real server (small limits), its data, and the GCG search on the real model."""

import json
import re
import subprocess
import sys

import httpx
import pytest
import torch

from ablation.spec import default_profiles_dir, load_profiles
from clients.http import Client
from evals import attacks
from evals.common import Topics, is_correct, load_jsonl
from tests.evals.test_evals import run_report
from workshop.gcg import ProfiledModel, Target, _rows, search


def test_attack_data_has_both_splits_and_never_gives_the_answer_away():
    files = [t.attacks for t in Topics.of("hp,sw").topics] + [attacks.ATTACKS / "controls.jsonl"]
    for f in files:
        rows = load_jsonl(f)
        for fam in {r["family"] for r in rows}:
            assert {r["split"] for r in rows if r["family"] == fam} == {"dev", "test"}, (f, fam)
        for r in rows:
            prompt = r["prompt"].replace("{filler}", attacks.filler())
            assert not is_correct(prompt, r["answers"]), r  # the answer itself is never in the prompt
            if r["family"] == "long_context":
                head, tail = r["prompt"].split("{filler}")  # the topic named once, far back
                assert len(head) < 120 and len(attacks.filler().split()) > 150 and not re.search(
                    "Potter|Star Wars", tail)
    assert {w["split"] for w in load_jsonl(attacks.ATTACKS / "wrappers.jsonl")} == {"dev", "test"}


def test_attack_report_tallies_the_servers_own_completions_and_audits(server, tmp_path):
    profiles = ["baseline", "hp_unlearn"]
    res = run_report(server, attacks.attacks, tmp_path, profiles=profiles, limit=2)
    recs = res["records"]
    assert {r["family"] for r in recs["baseline"]} >= {"prefix", "language", "spelling", "relearning", "long_context"}
    direct = Client(server.url)
    for p in profiles:
        for r in recs[p][::5]:  # the record is what the server answers, with its audit
            got = direct.complete(r["prompt"], p, max_tokens=10, temperature=0)
            c = got.choices[0]
            assert c.text == r["completion"]
            assert r["triggered"] == (c.unlearning.triggered and c.unlearning.first_token < got.usage.prompt_tokens
                                      if c.unlearning else None)
    assert all(r["triggered"] is None for r in recs["baseline"])  # baseline edits nothing: no audit
    fam = res["summary"]["prefix"]["hp"]
    answered = [i for i, r in enumerate(recs["baseline"]) if r["family"] == "prefix" and r["topic"] == "hp"
                and r["correct"]]
    assert fam["baseline"]["baseline_correct"] == len(answered) and fam["baseline"]["kept_rate"] in (1.0, None)
    assert fam["hp_unlearn"]["kept"] == sum(recs["hp_unlearn"][i]["correct"] for i in answered)
    fired = [r["triggered"] for r in recs["hp_unlearn"] if r["family"] == "prefix" and r["topic"] == "hp"]
    assert fam["hp_unlearn"]["trigger_rate"] == sum(fired) / len(fired) == 1.0  # the prompts name Harry Potter
    assert "likelihood" in res["families"] and res["summary"]["likelihood"]["control"]["baseline"]["n"] == 2
    md = (tmp_path / "attacks.md").read_text()
    assert md.split("\n\n")[1].startswith("On attacked hp prompts") and "| long_context |" in md
    assert (tmp_path / "attacks.png").stat().st_size > 1000


@pytest.fixture(scope="module")
def hp_unlearn():
    return load_profiles([default_profiles_dir()], "gemma-3-270m")["hp_unlearn"]


def test_the_searchs_loss_is_the_servers_and_the_search_lowers_it(server, lm, hp_unlearn):
    tok, t = lm.tokenizer, Target("Harry Potter goes to school at", "Hogwarts")
    pm = ProfiledModel(lm, hp_unlearn)
    adv = tok("! ! !", add_special_tokens=False).input_ids
    ids, ans, at = _rows(tok, adv, t)
    with torch.no_grad():
        mine = float(pm.losses(pm.embed.weight[torch.tensor([ids])], torch.tensor([ans]), at)[0])
    text = tok.decode(adv) + "\n" + t.prompt + " " + t.answer  # what the report replays, answer appended
    body = {"prompt": text, "max_tokens": 0, "echo": True, "logprobs": 0, "profile": "hp_unlearn"}
    lps = httpx.post(server.url + "/v1/completions", json=body, timeout=120).json()["choices"][0]["logprobs"]
    assert mine == pytest.approx(-sum(lps["token_logprobs"][-len(ans):]) / len(ans), abs=1e-3)
    res = search(lm, hp_unlearn, [t], n_tokens=3, steps=2, batch=4, log=lambda _: None)
    assert res.history[0] == pytest.approx(mine, abs=1e-4)
    assert all(a >= b for a, b in zip(res.history, res.history[1:])) and res.loss == res.history[-1]
    assert tok(res.text, add_special_tokens=False).input_ids == res.ids  # replayed as text, searched as ids
    # an adapter profile (the fine-tuned comparator) is searched through its adapter too
    rmu = ProfiledModel(lm, load_profiles([default_profiles_dir()], "gemma-3-270m")["hp_rmu"])
    with torch.no_grad():
        theirs = float(rmu.losses(rmu.embed.weight[torch.tensor([ids])], torch.tensor([ans]), at)[0])
    lps = httpx.post(server.url + "/v1/completions", json={**body, "profile": "hp_rmu"},
                     timeout=120).json()["choices"][0]["logprobs"]
    assert theirs == pytest.approx(-sum(lps["token_logprobs"][-len(ans):]) / len(ans), abs=1e-3)


def test_attack_cli_errors_are_one_line(tmp_path):
    for args, msg in ((["--profile", "nope", "--topic", "hp"], "unknown profile 'nope'"),
                      (["--profile", "hp_unlearn", "--topic", "hp", "--steps", "0"], "need --prompts"),
                      (["--profile", "hp_unlearn", "--topic", "hp,sw"], "one topic at a time")):
        r = subprocess.run([sys.executable, "-m", "cli", "attack", "gcg", *args, "--out", str(tmp_path / "g.json")],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and msg in r.stderr.strip().splitlines()[-1], r.stderr[-800:]


def test_shipped_gcg_tokens_are_replayed_before_the_topics_prompts():
    found = json.loads(attacks.GCG_FILE.read_text())
    assert set(found) == {"hp", "sw"}
    for topic, entry in found.items():
        assert entry["loss"] <= entry["start_loss"] and entry["text"] and re.search(r"\S", entry["text"])
        assert attacks.gcg_tokens(topic) == entry["text"]
