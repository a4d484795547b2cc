"""Eval reports against the real server on a loopback port (small limits), and report arithmetic."""

import asyncio
import json
import subprocess
import sys

import httpx
import pytest

from clients.http import AsyncClient, Client
from evals import generation, scoring
from evals.common import EvalContext, EvalError, Topics, load_jsonl, server_info
from workshop.recipe import DEV_DOCS

PROFILES = ["baseline", "t_sae_only", "prompted"]


def run_report(server, fn, tmp_path, profiles=PROFILES, limit=3, client=None, topics="hp"):
    async def main():
        c = client or AsyncClient(server.url, concurrency=6)
        try:
            ctx = EvalContext(c, profiles, tmp_path, limit=limit, topics=Topics.of(topics))
            ctx.server_info = await server_info(c, profiles)
            return await fn(ctx)
        finally:
            await c.aclose()
    return asyncio.run(main())


def test_familiarity_counts_equal_direct_completions(server, tmp_path):
    res = run_report(server, generation.familiarity, tmp_path)
    items = load_jsonl("hp_prompts.jsonl", "test", 3)
    direct = Client(server.url)
    for p in PROFILES:
        texts = [direct.complete(it["prompt"], p, max_tokens=10, temperature=0).choices[0].text for it in items]
        n_correct = sum(any(a.lower() in t.lower() for a in it["answers"]) for t, it in zip(texts, items))
        assert res["summary"]["hp"][p]["correct"] == n_correct
        assert [r["completion"] for r in res["records"]["hp"][p]] == texts
    assert all(0 < r["answer_prob"] <= 1 for r in res["records"]["hp"]["baseline"])
    for r in res["records"]["hp"]["t_sae_only"]:  # fluency: baseline's logprobs of the completion after its first token
        lp = direct.logprobs_of(r["prompt"] + r["completion"], "baseline")[0]
        mine = [v for v, off in zip(lp.logprobs, lp.offsets) if off >= len(r["prompt"])][1:]
        assert r["fluency"] == pytest.approx(sum(mine) / len(mine), abs=1e-4) and r["fluency"] < 0
    fam = res["summary"]["hp"]["baseline"]
    assert fam["mean_fluency"] == pytest.approx(sum(r["fluency"] for r in res["records"]["hp"]["baseline"]) / 3)
    assert " hp fluency " in (tmp_path / "familiarity.md").read_text()
    for p in PROFILES:  # the markup and repetition shares are of the very completions scored
        recs, s = res["records"]["hp"][p], res["summary"]["hp"][p]
        assert s["markup_rate"] == sum(generation.has_markup(r["completion"]) for r in recs) / len(recs)
        assert s["repeat_rate"] == sum(generation.repeats(r["completion"]) for r in recs) / len(recs)
    header = "| profile | prompts | fluency (nats/token) | stray markup | repeats |"
    assert header in (tmp_path / "familiarity.md").read_text()
    assert (tmp_path / "familiarity.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "familiarity.json").read_text())
    assert saved["provenance"]["profiles"]["t_sae_only"]["interventions"][0]["hookpoint"] == "blocks.6.hook_resid_post"


def test_markup_and_repetition_detectors():
    assert generation.has_markup(' the heart of the art of the <em><strong>"art')
    assert generation.has_markup("the end</strong>") and generation.has_markup('<div class="x">')
    assert not generation.has_markup("x < y and y > z, a <- b") and not generation.has_markup("the University")
    assert generation.repeats("a French-Italian-Italian-Italian-Italian-Italian-Italian")
    assert generation.repeats("the cat sat. the cat sat. the cat sat.")
    assert not generation.repeats("the cat sat on the mat and the cat ran")


def test_topics_keep_what_is_about_a_forgotten_topic_out_of_nearby():
    hp, sw, both = Topics.of("hp"), Topics.of("sw"), Topics.of("hp,sw")
    hp_ids = {it["id"] for it in load_jsonl("hp_prompts.jsonl", "test")}
    near = {it["id"]: it for it in sw.nearby("test", None)}
    assert hp_ids <= set(near)  # Harry Potter counts as nearby for Star Wars
    assert not any(it.get("about") == "sw" for it in near.values())
    assert any(it.get("about") == "sw" for it in hp.nearby("test", None))  # hp's nearby set is as it was
    assert not hp_ids & {it["id"] for it in both.nearby("test", None)}
    assert set(both.forget_sets("test", None)) == {"hp", "sw"} and set(both.trivia(2)) == {"hp", "sw"}
    assert not any(it.get("about") in ("hp", "sw") for it in both.robustness())
    lex = both.lexicon()
    assert lex.search("the Dark Lord Darth Vader") and lex.search("off to Hogwarts") and not lex.search("Frodo")


def test_familiarity_on_another_topic(server, tmp_path):
    res = run_report(server, generation.familiarity, tmp_path, profiles=["baseline"], limit=2, topics="sw")
    assert list(res["summary"]) == ["sw", "generic", "nearby"]
    recs = res["records"]["sw"]["baseline"]
    assert [r["id"] for r in recs] == [it["id"] for it in load_jsonl("sw_prompts.jsonl", "test", 2)]
    lex = Topics.of("sw").lexicon()
    assert all(r["mentions_topic"] == bool(lex.search(r["completion"])) for r in recs)
    assert "mention Star Wars" in (tmp_path / "familiarity.md").read_text()


def test_trivia_is_computed_from_the_returned_logits(server, tmp_path):
    res = run_report(server, scoring.trivia, tmp_path, profiles=["baseline"], limit=2)
    item = load_jsonl("hp_trivia.jsonl", "all", 1)[0]
    c = Client(server.url)
    prompt = scoring.trivia_prompt(item["question"], item["true"], item["false"])
    la, lb = (c.logprobs_of(prompt + s, "baseline")[0].logprobs[-1] for s in (" A", " B"))
    rec = res["hp"]["baseline"]["records"][0]
    # the report's requests were batched together, these ran alone: fp32 rows differ by up to ~1e-4 with the
    # batch's make-up (seen 6.9e-5 here); a wrong computation would be off by far more
    assert rec["true_as_A"] == pytest.approx([la, lb], abs=2e-4)
    assert rec["right_as_A"] == (la > lb)
    s = res["hp"]["baseline"]
    assert s["accuracy"] == (sum(r["right_as_A"] + r["right_as_B"] for r in s["records"]) / 4)
    # the continuation score: the answer's logprobs after the question, per byte
    q = scoring.answer_prompt(item["question"])
    lp = c.logprobs_of(q + " " + item["true"], "baseline")[0]
    start = next(i for i, off in enumerate(lp.offsets) if off >= len(q))
    expected = sum(lp.logprobs[start:]) / len((" " + item["true"]).encode())
    rec = s["continuation_records"][0]
    assert rec["true"] == pytest.approx(expected, abs=2e-4) and rec["right"] == (rec["true"] > rec["false"])
    assert s["continuation_accuracy"] == sum(r["right"] for r in s["continuation_records"]) / 2


class AlwaysA:
    """A stand-in server that always prefers ' A': what the 2024 study's models did."""
    base_url = "fake://always-a"

    async def logprobs_of(self, prompt, profile=None, top=0):
        from clients.http import TokenLogprobs
        last = -0.1 if prompt.endswith(" A") else -4.0
        return [TokenLogprobs([prompt[:-2], prompt[-2:]], [None, last], [0, len(prompt) - 2], None)]

    async def aclose(self):
        pass


def test_position_bias_measure_catches_a_model_that_always_answers_a(tmp_path):
    async def main():
        ctx = EvalContext(AlwaysA(), ["baseline"], tmp_path, limit=10)
        return await scoring.trivia(ctx)
    res = asyncio.run(main())["hp"]["baseline"]
    assert res["share_a"] == 1.0 and res["accuracy"] == 0.5 and res["both_orders_accuracy"] == 0.0


def test_loss_report_baseline_zero_and_sae_costs_loss(server, tmp_path):
    res = run_report(server, scoring.loss, tmp_path, profiles=["baseline", "t_sae_only"], limit=2)
    s = res["summary"]
    assert s["baseline"]["loss_added"] == 0 and s["baseline"]["ce"] > 0
    assert s["t_sae_only"]["ce"] > s["baseline"]["ce"] and s["baseline"]["tokens"] == s["t_sae_only"]["tokens"]


def test_choosing_a_profile_never_reads_the_loss_reports_documents():
    report, dev = scoring.heldout_docs(None), scoring.heldout_docs(None, split="dev")
    assert len(report) == scoring.REPORT_DOCS and len(dev) >= DEV_DOCS  # `obliviate unlearn --docs`'s default
    assert not set(report) & set(dev)
    assert scoring.heldout_docs(5, split="dev") == dev[:5] and scoring.heldout_docs(5) == report[:5]
    with pytest.raises(ValueError, match="use test or dev"):
        scoring.heldout_docs(5, split="train")  # a typo must not silently read the report's documents


def test_tokens_report_compares_each_unlearning_profile_with_its_own_reference(server, tmp_path):
    res = run_report(server, scoring.tokens, tmp_path, profiles=["baseline", "t_zero", "t_keep_error"], limit=3)
    # zeroing inside the reconstruction vs the reconstruction; error-preserving vs baseline
    assert res["pairs"] == [{"reference": "t_sae_only", "profile": "t_zero"},
                            {"reference": "baseline", "profile": "t_keep_error"}]
    for p in ("t_zero", "t_keep_error"):
        drops = [r["drop"] for r in res["hp"][p]["drops"]]
        assert drops == sorted(drops, reverse=True) and drops[0] > 0
    md = (tmp_path / "tokens.md").read_text()
    assert md.splitlines()[2].startswith("Under `t_zero` (against `t_sae_only`)")


def test_shipped_profiles_references():
    from ablation.spec import default_profiles_dir, load_profiles

    specs = {n: s.model_dump() for n, s in load_profiles([default_profiles_dir()], "gemma-3-270m").items()}
    assert scoring.reference_of("hp_unlearn", specs) == "baseline"  # keeps the SAE error
    assert scoring.reference_of("hp_unlearn_zero", specs) == "sae_only"  # zeroes inside the reconstruction
    assert scoring.reference_of("sae_only", specs) is None and scoring.reference_of("prompted", specs) is None
    assert scoring.reference_of("hp_rmu", specs) == "baseline"  # an adapter profile edits the weights


def test_server_without_prompt_logprobs_gets_a_clear_message(tmp_path):
    def handler(request):
        body = json.loads(request.content)
        if body.get("echo"):
            return httpx.Response(400, json={"error": {"message": "echo is not supported", "type": "x"}})
        return httpx.Response(500, json={})
    c = AsyncClient("http://fake", retries=0)
    c.http = httpx.AsyncClient(base_url="http://fake", transport=httpx.MockTransport(handler))

    async def main():
        ctx = EvalContext(c, ["baseline"], tmp_path, limit=1)
        await scoring.loss(ctx)
    with pytest.raises(EvalError, match="the loss report needs prompt logprobs.*echo is not supported"):
        asyncio.run(main())


def test_eval_all_cli_writes_every_report(server, tmp_path):
    r = subprocess.run([sys.executable, "-m", "cli", "eval", "all", "--server", server.url, "--profiles",
                        "baseline,t_clamp", "--limit", "1", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ["completions", "familiarity", "tokens", "loss", "trivia", "robustness", "attacks"]:
        assert (tmp_path / f"{name}.json").exists() and (tmp_path / f"{name}.md").exists()
    for png in ["familiarity", "tokens_hp_t_clamp", "loss", "trivia", "robustness", "attacks"]:
        assert (tmp_path / f"{png}.png").stat().st_size > 1000
    index = (tmp_path / "index.md").read_text()
    assert "| baseline |" in index and "| t_clamp |" in index and "hp answers kept under attack" in index
    for name in ["completions", "familiarity", "tokens", "loss", "trivia", "robustness", "attacks"]:  # a reading first
        first = (tmp_path / f"{name}.md").read_text().split("\n\n")[1]
        assert "`baseline`" in first or "`t_clamp`" in first, (name, first)


def test_one_report_into_a_new_directory(server, tmp_path):
    out = tmp_path / "new" / "dir"
    r = subprocess.run([sys.executable, "-m", "cli", "eval", "familiarity", "--server", server.url,
                        "--profiles", "baseline", "--limit", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "familiarity.png").stat().st_size > 1000 and (out / "familiarity.json").exists()


def test_eval_cli_unknown_profile_is_one_line(server, tmp_path):
    r = subprocess.run([sys.executable, "-m", "cli", "eval", "loss", "--server", server.url, "--profiles",
                        "baseline,nope", "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("obliviate: error: the server does not serve")
