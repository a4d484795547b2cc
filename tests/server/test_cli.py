"""`obliviate serve` input errors: one line on stderr, exit status 2, before any model loads (or, for
damaged SAE and model files, once they are read: no traceback, one error line)."""

import copy
import shutil
import subprocess
import sys

import pytest
import yaml


def obliviate(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, timeout=timeout)


def one_line_error(r):
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_bad_flag():
    assert "unrecognized arguments: --bogus" in one_line_error(obliviate("serve", "--bogus"))
    assert "invalid int value" in one_line_error(obliviate("serve", "--port", "eighty"))


def test_missing_profiles_dir(tmp_path):
    assert "profiles directory not found" in one_line_error(obliviate("serve", "--profiles", str(tmp_path / "nope")))


@pytest.mark.parametrize("text,needle", [
    ("name: x\nedits: []\n", "edits: Extra inputs are not permitted"),
    ("name: [x\n", "not valid YAML"),
    ("name: x\ninterventions:\n- {hookpoint: blocks.2.hook_resid_post, sae: missing_dir}\n", None),
])
def test_malformed_profile(tmp_path, text, needle):
    (tmp_path / "bad.yaml").write_text(text)
    line = one_line_error(obliviate("serve", "--profiles", str(tmp_path)))
    assert "bad.yaml" in line or "missing_dir" in line
    if needle:
        assert needle in line


def test_unknown_model_name(tmp_path):
    assert "unknown model" in one_line_error(obliviate("serve", "--model", "no-such-model", "--profiles", str(tmp_path)))


def test_sae_train_and_eval_bad_numbers_fail_before_any_work():
    assert "--ship-layer 9 is not one of --layers [6]" in one_line_error(obliviate("sae", "train", "--layers", "6", "--ship-layer", "9"))
    assert "expected comma-separated int values" in one_line_error(obliviate("sae", "train", "--layers", "six"))
    assert "--limit ≥ 1" in one_line_error(obliviate("eval", "loss", "--limit", "0"))


def test_topic_files_and_topics_are_checked_before_any_work(tmp_path):
    missing, empty = tmp_path / "nope.txt", tmp_path / "empty.txt"
    empty.write_text("# a comment and nothing else\n")
    assert f"{missing}: topic file not found" in one_line_error(obliviate("sae", "train", "--topic", str(missing)))
    assert f"{empty}: no prompt text in it" in one_line_error(obliviate("sae", "train", "--sample-prompts", str(empty)))
    assert "--name 'a/b': use letters" in one_line_error(obliviate("sae", "train", "--name", "a/b"))
    assert "unknown topic 'startrek': use one of hp, hp_chat, sw" in one_line_error(
        obliviate("eval", "familiarity", "--topic", "startrek", "--server", "http://127.0.0.1:9"))
    forget = ["--forget", str(empty), "--retain", str(empty)]
    assert "--report needs --topic" in one_line_error(obliviate("unlearn", "x", *forget, "--report", str(tmp_path)))
    assert "--topic: unknown topic 'hpx'" in one_line_error(obliviate("unlearn", "x", *forget, "--topic", "hpx"))
    assert "argument --ks: expected comma-separated int values" in one_line_error(
        obliviate("unlearn", "x", *forget, "--ks", "2,many"))
    assert "--ks ≥ 1" in one_line_error(obliviate("unlearn", "x", *forget, "--ks", "0,3"))
    assert "--outliers ≥ 0" in one_line_error(obliviate("unlearn", "x", *forget, "--outliers", "0,-1"))
    assert "--beta > 0" in one_line_error(obliviate("unlearn", "x", *forget, "--method", "npo", "--beta", "0"))
    bad = tmp_path / "t.yaml"
    bad.write_text("name: mine\nprompts: mine.jsonl\nlexicon: mine.txt\n")
    assert "mine.jsonl" in one_line_error(obliviate("eval", "loss", "--topic", str(bad), "--server", "http://127.0.0.1:9"))


def test_features_discover_bad_input_fails_before_the_model_loads(tmp_path):
    assert "--fires-above ≥ 0" in one_line_error(obliviate("features", "discover", "--fires-above", "-1"))
    missing = tmp_path / "nope.txt"
    assert f"{missing}: file not found" in one_line_error(obliviate("features", "discover", "--retain", str(missing),
                                                                    "--generic-retain", "0"))


def test_bench_bad_arguments_fail_before_any_server_starts():
    assert "unknown engine 'nope'" in one_line_error(obliviate("bench", "--engines", "nope"))
    assert "must be ≥ 1" in one_line_error(obliviate("bench", "--concurrency", "0"))
    assert "expected comma-separated int values" in one_line_error(obliviate("bench", "--concurrency", "eight"))
    assert "--replicas N needs N ≥ 2" in one_line_error(obliviate("bench", "--replicas", "1"))
    assert "--top-p in (0, 1]" in one_line_error(obliviate("bench", "--top-p", "0"))
    assert "--temperature must be in [0, 2]" in one_line_error(obliviate("bench", "--temperature", "-1"))
    assert "not --server, vllm-plain or vllm-defaults" in one_line_error(obliviate("bench", "--replicas", "2", "--engines", "vllm-plain"))


def test_parallel_flags_need_the_vllm_engine():
    assert "need --engine vllm" in one_line_error(obliviate("serve", "--tensor-parallel-size", "2"))
    assert "invalid choice: 'tgi'" in one_line_error(obliviate("serve", "--engine", "tgi"))
    assert "--enforce-eager needs --engine vllm" in one_line_error(obliviate("serve", "--enforce-eager"))


def final_error(r):
    """A start-up that got as far as loading files: logs may precede it, but it ends in one error line."""
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("obliviate: error: "), r.stderr[-2000:]
    return last


def shipped_sae_copy(tmp_path, damage):
    from ablation.sae_io import shipped_sae

    sae = tmp_path / "sae"
    shutil.copytree(shipped_sae(), sae)
    damage(sae / "sae_weights.safetensors")
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "x.yaml").write_text(yaml.safe_dump({"name": "x", "interventions": [
        {"hookpoint": "blocks.6.hook_resid_post", "sae": str(sae), "edits": [{"feature": 1}]}]}))
    return tmp_path / "p"


@pytest.mark.parametrize("damage,needle", [
    (lambda f: f.unlink(), "No such file"),
    (lambda f: f.write_bytes(f.read_bytes()[:5000]), "SafetensorError"),
])
def test_a_damaged_sae_copy_is_one_line(tmp_path, damage, needle):
    line = final_error(obliviate("serve", "--profiles", str(shipped_sae_copy(tmp_path, damage)), timeout=300))
    assert "cannot load the SAE" in line and needle in line


@pytest.mark.parametrize("include,needle", [("..", "no such profile file"), (5, "must be the name of a sibling")])
def test_an_include_that_is_not_a_profile_file_is_one_line(tmp_path, include, needle):
    (tmp_path / "x.yaml").write_text(yaml.safe_dump({"name": "x", "include": include}))
    assert needle in one_line_error(obliviate("serve", "--profiles", str(tmp_path)))


def test_a_truncated_model_cache_is_one_line_that_says_what_to_delete(tmp_path):
    from models.loading import DEFAULT_MODEL, ModelLoadError, default_cache_dir, load_info, prepare_embedded

    good = prepare_embedded(default_cache_dir())
    bad = tmp_path / "models" / DEFAULT_MODEL
    bad.mkdir(parents=True)
    for f in good.iterdir():
        if f.suffix == ".safetensors":
            (bad / f.name).write_bytes(f.open("rb").read(1_000_000))
        else:
            shutil.copy(f, bad / f.name)
    line = final_error(obliviate("serve", "--cache-dir", str(tmp_path), timeout=300))
    assert "SafetensorError" in line and f"delete {bad}" in line
    with pytest.raises(ModelLoadError, match=f"SafetensorError.*delete {bad}"):  # the vLLM engine's loading path
        load_info(DEFAULT_MODEL, tmp_path)  # (the serve command prints the same error as the line above)


KEYS = {"keys": [{"name": "lab", "key": "sk-lab-0123", "profiles": ["*"]}]}


@pytest.mark.parametrize("edit,needle", [
    (lambda k: k["keys"][0].pop("key"), "give exactly one of key and sha256"),
    (lambda k: k["keys"][0].update(profiles=["nope"]), "unknown profiles nope"),
    (lambda k: k["keys"][0].update(profiles=["sae_only", "prompted"]), "set default_profile"),
    (lambda k: k["keys"][0].update(profiles=["sae_only"], default_profile="baseline"), "is not one of its profiles"),
    (lambda k: k["keys"].append(dict(k["keys"][0], name="twin")), "the same key appears twice"),
    (lambda k: k["keys"][0].update(sha256="abc"), "sha256"),
])
def test_bad_keys_files_are_refused_with_what_is_wrong(tmp_path, edit, needle):
    from server.keys import Keyring, KeysError

    keys = copy.deepcopy(KEYS)
    edit(keys)
    (tmp_path / "keys.yaml").write_text(yaml.safe_dump(keys))
    with pytest.raises(KeysError, match=needle):
        Keyring.build(tmp_path / "keys.yaml", None, ["baseline", "sae_only", "prompted"])


def test_a_port_in_use_is_one_line_before_the_model_loads():
    """The port is taken first (the engine's own ports can never be the one served on)."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = one_line_error(obliviate("serve", "--port", str(port)))
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in line


def test_a_bad_keys_file_fails_before_the_model_loads(tmp_path):
    assert "cannot read the keys file" in one_line_error(obliviate("serve", "--keys", str(tmp_path / "nope.yaml")))
    (tmp_path / "k.yaml").write_text("keys: [\n")
    assert "not valid YAML" in one_line_error(obliviate("serve", "--keys", str(tmp_path / "k.yaml")))


def test_no_open_server_on_a_public_address_without_keys():
    line = one_line_error(obliviate("serve", "--host", "0.0.0.0"))
    assert "without keys" in line and "--allow-unauthenticated" in line
    assert "--max-queue ≥ 0" in one_line_error(obliviate("serve", "--max-queue", "-1"))


def test_bench_ratios_give_the_trigger_audits_cost():
    from evals.bench import ratios
    runs = [{"engine": e, "concurrency": 8, "profile": p, "tok_s": v} for e, p, v in (
        ("builtin", "baseline", 100.0), ("builtin", "hp_unlearn", 90.0), ("builtin-noaudit", "hp_unlearn", 91.0),
        ("builtin-noaudit", "baseline", 100.0))]
    r = ratios({"runs": runs})
    assert r["builtin c8 hp_unlearn / builtin-noaudit"] == round(90 / 91, 3)
    assert r["builtin c8 baseline / builtin-noaudit"] == 1.0 and r["builtin c8 hp_unlearn / baseline"] == 0.9


def test_bench_ratios_against_vllms_own_server_as_its_defaults_start_it():
    from evals.bench import ratios
    runs = [{"engine": e, "concurrency": 32, "profile": p, "tok_s": v} for e, p, v in (
        ("builtin", "baseline", 120.0), ("builtin", "mix", 100.0), ("vllm", "baseline", 180.0),
        ("vllm", "hp_unlearn", 160.0), ("vllm-defaults", "baseline", 200.0))]
    r = ratios({"runs": runs})
    assert r["vllm c32 baseline / vllm-defaults c32 baseline"] == 0.9
    assert r["vllm c32 hp_unlearn / vllm-defaults c32 baseline"] == 0.8
    assert r["builtin c32 baseline / vllm-defaults c32 baseline"] == 0.6
    assert r["builtin c32 mix / vllm-defaults c32 baseline"] == 0.5
    assert r["vllm c32 baseline / builtin c32 baseline"] == 1.5
    assert not any(k.startswith("vllm-defaults") for k in r)
