"""`obliviate unlearn`: inputs checked before the model loads, a clear error when no feature separates the
texts, and the whole command on small inputs (the real model, SAE and a served sweep)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ablation.offline import corpus
from ablation.offline.unlearn import Inputs, UnlearnError, read_inputs, run
from ablation.sae_io import shipped_sae
from ablation.spec import load_profile

DATA = Path(__file__).parents[2] / "ablation" / "offline" / "data"
HP = [t for t in (DATA / "hp_topic.txt").read_text().splitlines() if t.strip() and not t.startswith("#")]


def write(path: Path, lines) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def dev_file(path: Path, per_set: dict[str, int]) -> Path:
    rows = [json.loads(ln) for ln in (DATA / "hp_dev_prompts.jsonl").read_text().splitlines()]
    keep = [r for s, n in per_set.items() for r in [r for r in rows if r["set"] == s][:n]]
    return write(path, [json.dumps(r) for r in keep])


@pytest.mark.parametrize("forget,needle", [([], "too little forget text"), (HP[:3], "too little forget text"),
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
    assert len(inputs.forget) == 12 and set(inputs.dev) == {"forget", "generic"}


def test_no_separating_feature_says_what_to_try(lm, tmp_path):
    """Forget text the retain side already holds (its Wikipedia summaries): nothing fires above its ceiling."""
    wiki = [t for _, t in corpus.wiki_summaries("train")[:20]]
    with pytest.raises(UnlearnError, match="no feature of .* fires on the forget text above its highest activation"):
        run(lm, "x", Inputs(wiki, [], None), shipped_sae(), tmp_path, n_wiki=20)


def test_unlearn_command_on_small_inputs_writes_a_profile_that_serves(tmp_path):
    forget = write(tmp_path / "forget.txt", HP[:12])
    dev = dev_file(tmp_path / "dev.jsonl", {"forget": 6, "generic": 4, "nearby": 4})
    r = subprocess.run([sys.executable, "-m", "server.cli", "unlearn", "hp_small", "--forget", str(forget),
                        "--retain", str(DATA / "fiction_retain.txt"), "--dev-prompts", str(dev), "--generic-retain",
                        "20", "--docs", "2", "--out", str(tmp_path / "profiles")],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    table = [ln for ln in r.stdout.splitlines() if ln.startswith("| ")]
    rows = {ln.split(" | ")[0][2:]: ln for ln in table[1:]}
    assert "baseline" in rows and any(ln.rstrip().endswith("chosen |") for ln in table)
    spec = load_profile(tmp_path / "profiles" / "hp_small.yaml")
    assert spec.name == "hp_small" and spec.interventions[0].edits and spec.interventions[0].keep_error
    assert "Chosen from k in" in spec.metadata.notes and "Dev answers: forget" in spec.metadata.notes
