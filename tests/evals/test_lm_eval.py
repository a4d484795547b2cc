"""lm-evaluation-harness's `local-completions` model against a live server, with the project's own
tasks (evals/lm_eval_tasks): the README's command, run per profile through the model name."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def lm_eval(url: str, profiles: list[str], out: Path) -> dict:
    """-> {profile: {task: {"acc": …, "acc_norm": …}}} from the command the README shows, one run per
    profile (the runs at once)."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    out.mkdir(parents=True, exist_ok=True)
    runs = {p: subprocess.Popen(
        [str(Path(sys.executable).parent / "lm_eval"), "--model", "local-completions", "--model_args",
         f"model={p},base_url={url}/v1/completions,tokenizer_backend=remote,num_concurrent=4",
         "--include_path", "evals/lm_eval_tasks", "--tasks", "obliviate_hp_mc,obliviate_control_mc",
         "--output_path", str(out / p)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
        stderr=(out / f"{p}.log").open("w")) for p in profiles}
    scores = {}
    for p, run in runs.items():
        assert run.wait(timeout=600) == 0, (out / f"{p}.log").read_text()[-3000:]
        results = json.loads(next((out / p).rglob("results_*.json")).read_text())["results"]
        scores[p] = {task: {m: v for m, v in res.items() if m in ("acc,none", "acc_norm,none")}
                     for task, res in results.items()}
    return scores


def test_lm_eval_local_completions_per_profile(server, tmp_path):
    scores = lm_eval(server.url, ["baseline", "hp_unlearn"], tmp_path)
    print(json.dumps(scores, indent=1))
    hp, control = "obliviate_hp_mc", "obliviate_control_mc"
    assert scores["baseline"][hp]["acc,none"] >= 0.5  # the model knows the HP answers
    assert scores["hp_unlearn"][hp]["acc,none"] < scores["baseline"][hp]["acc,none"] - 0.3
    # 12 control questions: within one question of baseline
    assert abs(scores["hp_unlearn"][control]["acc,none"] - scores["baseline"][control]["acc,none"]) <= 1 / 12 + 1e-9
