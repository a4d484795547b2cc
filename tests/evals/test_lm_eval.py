"""lm-evaluation-harness's `local-completions` model against a live server, with the project's own
tasks (evals/lm_eval_tasks): the README's command, run per profile through the model name."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def lm_eval(url: str, profile: str, out: Path) -> dict:
    """-> {task: {"acc": …, "acc_norm": …}} from the command the README shows."""
    cmd = [str(Path(sys.executable).parent / "lm_eval"), "--model", "local-completions", "--model_args",
           f"model={profile},base_url={url}/v1/completions,tokenizer_backend=remote,num_concurrent=4",
           "--include_path", "evals/lm_eval_tasks", "--tasks", "obliviate_hp_mc,obliviate_control_mc",
           "--output_path", str(out / profile)]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(next((out / profile).rglob("results_*.json")).read_text())["results"]
    return {task: {m: v for m, v in res.items() if m in ("acc,none", "acc_norm,none")} for task, res in results.items()}


def test_lm_eval_local_completions_per_profile(server, tmp_path):
    scores = {p: lm_eval(server.url, p, tmp_path) for p in ("baseline", "hp_unlearn")}
    print(json.dumps(scores, indent=1))
    hp, control = "obliviate_hp_mc", "obliviate_control_mc"
    assert scores["baseline"][hp]["acc,none"] >= 0.5  # the model knows the HP answers
    assert scores["hp_unlearn"][hp]["acc,none"] < scores["baseline"][hp]["acc,none"] - 0.3
    # 12 control questions: within one question of baseline
    assert abs(scores["hp_unlearn"][control]["acc,none"] - scores["baseline"][control]["acc,none"]) <= 1 / 12 + 1e-9
