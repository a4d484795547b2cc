"""`obliviate unlearn`: inputs checked before the model loads, a clear error when no feature separates the
texts, and the whole command on small inputs (the real model, SAE and a served sweep)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ablation.residual import Hookpoint, residual_hooks
from ablation.sae_io import load_direction, shipped_sae
from ablation.spec import ProfileSpec, load_profile
from evals.common import Topics, load_jsonl
from models.loading import prepare_embedded
from models.names import default_cache_dir
from workshop import corpus
from workshop.discover import FeatureScore
from workshop.inputs import Inputs, UnlearnError, read_inputs
from workshop.recipe import Goals
from workshop.scoring import Scores
from workshop.steer import direction, prompt_ids
from workshop.unlearn import Candidate, Outcome, choose, run, top_of_each

DATA = corpus.DATA
HP, SW = ([t for t in (DATA / f).read_text().splitlines() if t.strip() and not t.startswith("#")]
          for f in ("hp_topic.txt", "sw_topic.txt"))
HP_SW_SAE = Path(__file__).parents[2] / "ablation" / "saes" / "gemma-3-270m-res-L12-hp-sw"


def write(path: Path, lines) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def dev_file(path: Path, per_set: dict[str, int], source: str = "hp_dev_prompts.jsonl") -> Path:
    rows = [json.loads(ln) for ln in (DATA / source).read_text().splitlines()]
    keep = [r for s, n in per_set.items() for r in [r for r in rows if r["set"] == s][:n]]
    return write(path, [json.dumps(r) for r in keep])


@pytest.mark.parametrize("forget,needle", [([], "no forget text in it"), (HP[:3], "too little forget text"),
                                           (HP[:12], "are also in the retain files")])
def test_bad_forget_and_retain_text_is_refused_before_the_model_loads(tmp_path, forget, needle):
    f = write(tmp_path / "forget.txt", forget)
    r = write(tmp_path / "retain.txt", HP[:6] + ["The Eiffel Tower is in Paris.", "Water boils at 100 degrees."])
    with pytest.raises(UnlearnError, match=needle):
        read_inputs([f], [r], None)


def test_bad_dev_prompts_and_missing_files(tmp_path):
    f, r = write(tmp_path / "f.txt", HP[:12]), DATA / "fiction_retain.txt"
    with pytest.raises(UnlearnError, match="need dev prompts in the sets 'forget' and 'generic'"):
        read_inputs([f], [r], dev_file(tmp_path / "dev.jsonl", {"forget": 3}))
    with pytest.raises(UnlearnError, match=r"dev.jsonl:1: each line must be JSON"):
        read_inputs([f], [r], write(tmp_path / "dev.jsonl", ['{"prompt": "x"}']))
    with pytest.raises(UnlearnError, match="nope.txt: retain file not found"):
        read_inputs([f], [tmp_path / "nope.txt"], None)
    inputs = read_inputs([f], [r], dev_file(tmp_path / "dev.jsonl", {"forget": 2, "generic": 2}))
    assert [len(t) for t in inputs.forget] == [12] and set(inputs.dev) == {"forget", "generic"}
    with pytest.raises(UnlearnError, match="short.txt: too little forget text"):  # each topic needs enough
        read_inputs([f, write(tmp_path / "short.txt", HP[12:14])], [r], None)
    with pytest.raises(UnlearnError, match="empty.txt: no retain text in it"):
        read_inputs([f], [write(tmp_path / "empty.txt", ["# only a comment"])], None)


def test_the_rule_keeps_the_goals_then_forgets_most_and_breaks_ties_with_fewer_features():
    def row(k, forget, generic, nearby, loss, outliers=0, fluency=None):
        return Outcome(Scores({"forget": forget, "generic": generic, "nearby": nearby}, fluency), loss,
                       Candidate("c", ProfileSpec(name="c"), k, outliers))
    rows = {"baseline": row(0, 20, 20, 20, 0.0), "a": row(2, 5, 20, 20, 0.0), "b": row(3, 2, 20, 19, 0.5),
            "c": row(5, 2, 20, 17, 1.0), "d": row(8, 0, 18, 20, 0.1), "e": row(8, 0, 20, 20, 2.5)}
    chosen, why = choose(rows, ["a", "b", "c", "d", "e"])
    assert chosen == "b"  # b and c tie on forget: fewer features
    assert why == {"d": "generic 18/20", "e": "loss +2.50%"}
    assert choose(rows, ["d", "e"])[0] is None
    rows["b2"] = row(3, 2, 20, 19, 0.5, outliers=2)  # the same answers with a looser threshold: the stricter wins
    assert choose(rows, ["b2", "b"])[0] == "b"
    rows["b"], rows["b_half"] = row(3, 2, 20, 19, 0.5, fluency=-3.5), row(3, 2, 20, 19, 0.5, fluency=-2.5)
    assert choose(rows, ["b", "b_half", "b2"])[0] == "b_half"  # a weaker clamp, as forgetful
    # the fluency floor: forget completions at most 0.3 nats/token below baseline's
    rows = {"baseline": row(0, 20, 20, 20, 0.0, fluency=-1.2), "broken": row(3, 0, 20, 20, 0.0, fluency=-1.6),
            "fluent": row(3, 1, 20, 20, 0.0, fluency=-1.4)}
    assert choose(rows, ["broken", "fluent"]) == ("fluent", {"broken": "fluency -1.60 vs -1.20"})
    assert choose(rows, ["broken", "fluent"], Goals(fluency_drop=0.5))[0] == "broken"


@pytest.mark.parametrize("name,topics", [("hp_dev_prompts.jsonl", "hp"), ("sw_dev_prompts.jsonl", "sw"),
                                         ("hp_sw_dev_prompts.jsonl", "hp,sw")])
def test_shipped_dev_prompt_files_are_the_eval_dev_splits(name, topics):
    """The --dev-prompts files are the eval topics' dev split, so choosing never sees a test prompt."""
    t = Topics.of(topics)
    sets = {"forget": [i for items in t.forget_sets("dev", None).values() for i in items],
            "generic": load_jsonl("generic_prompts.jsonl", "dev"), "nearby": t.nearby("dev", None)}
    want = sorted((s, i["id"], i["prompt"], tuple(i["answers"])) for s, items in sets.items() for i in items)
    rows = [json.loads(ln) for ln in (DATA / name).read_text().splitlines() if ln.strip()]
    assert sorted((r["set"], r["id"], r["prompt"], tuple(r["answers"])) for r in rows) == want


def test_several_topics_take_the_top_k_of_each_once():
    def scores(features, score):
        return [FeatureScore(f, score, 1, 1, 1, 1, 1, 1, 1) for f in features]
    a, b = scores((5, 7, 9), 0.5), scores((7, 3, 1), 0.25)
    assert [(r.feature, r.score) for r in top_of_each([a, b], 2)] == [(5, 0.5), (7, 0.5), (3, 0.25)]
    assert [r.feature for r in top_of_each([a], 5)] == [5, 7, 9]


def test_no_separating_feature_says_what_to_try(lm, tmp_path):
    """Forget text the retain side already holds (its Wikipedia summaries): nothing fires above its ceiling."""
    wiki = [t for _, t in corpus.wiki_summaries("train")[:20]]
    with pytest.raises(UnlearnError, match="no feature of .* fires on the forget text above its highest activation"):
        run(lm, "x", Inputs([wiki], [], None), shipped_sae(), tmp_path, n_wiki=20)


def test_the_steering_direction_points_from_the_models_answers_to_the_replies(lm):
    """workshop/steer.py: added at its layer, the direction makes the replacement replies likelier after
    each prompt (prompts and replies here not the ones it was measured on)."""
    d = direction(lm, 6, ["Harry Potter's best friend is called", "Harry Potter goes to a school called"],
                  ["something I have never heard of.", "a name I do not know."], chat=False)
    assert d.vector.shape == (lm.config.hidden_size,) and d.gap > 0 and (d.prompts, d.replies) == (2, 2)

    def reply_logprob(prompt: str, reply: str, add: torch.Tensor) -> float:
        ids = prompt_ids(lm, prompt, chat=False)
        rest = lm.tokenizer(" " + reply, add_special_tokens=False).input_ids
        with torch.inference_mode(), residual_hooks(lm.model, {Hookpoint(6, "post"): lambda x, kw: x + add}):
            lp = torch.log_softmax(lm.model(torch.tensor([ids + rest])).logits[0].float(), -1)
        return sum(lp[len(ids) - 1 + i, t].item() for i, t in enumerate(rest)) / len(rest)

    for prompt, reply in [("Hermione Granger's cat is called", "something I have not heard of."),
                          ("The Hogwarts house of Draco Malfoy is", "not something I know.")]:
        plain, steered = (reply_logprob(prompt, reply, a * d.vector) for a in (0.0, 0.5))
        assert steered > plain + 0.1, (prompt, plain, steered)


def test_unlearn_command_on_two_small_topics_writes_a_profile_that_serves(tmp_path):
    """Two forget files (a topic each) with the SAE trained on both topics; --ks × --outliers give the
    candidates. (`--report` runs evals.cli.run_reports, which test_evals runs for every report.)"""
    forget = [write(tmp_path / "hp.txt", HP[:12]), write(tmp_path / "sw.txt", SW[:12])]
    rows = [json.loads(ln) for ln in (DATA / "hp_sw_dev_prompts.jsonl").read_text().splitlines()]
    pick = [r for r in rows if r["id"] in ("hp01", "hp03", "sw01", "sw03")] + \
        [r for r in rows if r["set"] == "generic"][:3] + [r for r in rows if r["set"] == "nearby"][:3]
    dev = write(tmp_path / "dev.jsonl", [json.dumps(r) for r in pick])
    sae = os.path.relpath(HP_SW_SAE)  # relative to the cwd, not to where the profiles are written
    r = subprocess.run([sys.executable, "-m", "cli", "unlearn", "two_small", "--sae", sae,
                        "--forget", str(forget[0]), "--forget", str(forget[1]), "--retain", str(DATA / "sw_retain.txt"),
                        "--retain", str(DATA / "fiction_retain.txt"),
                        "--dev-prompts", str(dev), "--generic-retain", "20", "--docs", "2", "--ks", "2",
                        "--outliers", "0,2", "--out", str(tmp_path / "profiles"),
                        "--steer-replies", str(write(tmp_path / "dont_know.txt", [" a place I do not know."])),
                        "--steer-scales", "0.25"],
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    table = [ln for ln in r.stdout.splitlines() if ln.startswith("| ")]
    assert table[0].startswith("| profile | k | forget | generic | nearby | forget fluency | CE |")
    rows = {ln.split(" | ")[0][2:]: ln for ln in table[1:]}
    assert "baseline" in rows and any(ln.rstrip().endswith("chosen |") for ln in table)
    assert sorted(p for p in rows if p != "baseline") == ["two_small__k2_o0", "two_small__k2_o2"]  # only these
    spec = load_profile(tmp_path / "profiles" / "two_small.yaml")
    edits = spec.interventions[0].edits
    k = int(spec.description.split("the top ", 1)[1].split()[0])
    assert len(spec.interventions) == 1 and k < len(edits) <= 2 * k  # the top k of each topic, in one intervention
    assert spec.name == "two_small" and spec.interventions[0].keep_error
    assert "of each of the 2 forget topics" in spec.description and "forget: 12 + 12 texts" in spec.metadata.notes
    assert "Chosen from k in [2] and outliers in [0, 2]" in spec.metadata.notes
    assert "Dev answers: forget" in spec.metadata.notes and "forget completions' fluency" in spec.metadata.notes
    steer = spec.interventions[0].steer  # one steering strength: every candidate steered, the vector copied
    assert steer.vector == str((tmp_path / "profiles" / "two_small.steer.safetensors").resolve())
    assert "vector: two_small.steer.safetensors" in (tmp_path / "profiles" / "two_small.yaml").read_text()
    assert steer.scale > 0 and load_direction(steer.vector, 640).shape == (640,)
    assert "steered 0.25x the gap from its own answers towards 1 replies" in spec.description


def test_unlearn_method_rmu_trains_an_adapter_that_serves(tmp_path):
    """The fine-tuned comparator on small inputs: a few RMU steps, two strengths served and scored, the
    chosen adapter written next to its profile (named relatively, so the folder can move)."""
    forget = write(tmp_path / "forget.txt", HP[:12])
    dev = dev_file(tmp_path / "dev.jsonl", {"forget": 4, "generic": 3, "nearby": 3})
    out = tmp_path / "profiles"
    r = subprocess.run([sys.executable, "-m", "cli", "unlearn", "hp_tiny", "--method", "rmu", "--forget", str(forget),
                        "--retain", str(DATA / "fiction_retain.txt"), "--dev-prompts", str(dev), "--generic-retain",
                        "20", "--docs", "2", "--steps", "6", "--scales", "0.5,1", "--max-fluency-drop", "10",
                        "--max-loss", "100", "--min-generic", "0", "--min-nearby", "0", "--out", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    table = [ln for ln in r.stdout.splitlines() if ln.startswith("| ")]
    assert table[0].startswith("| profile | scale | forget | generic | nearby |")
    assert sorted(ln.split(" | ")[0][2:] for ln in table[1:]) == ["baseline", "hp_tiny__s0.5", "hp_tiny__s1"]
    spec = load_profile(out / "hp_tiny.yaml")
    assert spec.adapter == str((out / "hp_tiny.adapter").resolve()) and not spec.interventions
    assert "hp_tiny.adapter" in (out / "hp_tiny.yaml").read_text()  # relative in the file
    training = json.loads((out / "hp_tiny.adapter" / "training.json").read_text())
    assert training["config"]["method"] == "rmu" and len(training["history"]) == 6
    assert "rmu: MLP LoRA rank 8 on layers 4-6" in spec.metadata.notes and "Dev answers: forget" in spec.metadata.notes
    bad = subprocess.run([sys.executable, "-m", "cli", "unlearn", "x", "--method", "rmu", "--forget", str(forget),
                          "--retain", str(DATA / "fiction_retain.txt"), "--rank", "100"], capture_output=True, text=True)
    assert bad.returncode != 0 and "--rank in [1, 64]" in bad.stderr and "Traceback" not in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "cli", "unlearn", "x", "--forget", str(forget), "--retain",
                          str(DATA / "fiction_retain.txt"), "--steer-replies", str(forget)], capture_output=True, text=True)
    assert bad.returncode != 0 and "--steer-replies goes with --method sae and --dev-prompts" in bad.stderr
    plain = tmp_path / "no-template"  # the embedded model's files without its chat template
    plain.mkdir()
    for f in prepare_embedded(default_cache_dir()).iterdir():
        if f.suffix != ".jinja":
            (plain / f.name).symlink_to(f)
    bad = subprocess.run([sys.executable, "-m", "cli", "unlearn", "x", "--chat", "--model", str(plain), "--forget",
                          str(forget), "--retain", str(DATA / "fiction_retain.txt"), "--dev-prompts", str(dev)],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and f"--chat: {plain} has no chat template" in bad.stderr, bad.stderr[-2000:]
    assert "Traceback" not in bad.stderr
