"""`obliviate serve` input errors: one line on stderr, exit status 2, before any model loads."""

import subprocess
import sys

import pytest


def obliviate(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "server.cli", *args], capture_output=True, text=True, timeout=timeout)


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


def test_unknown_model_name():
    assert "unknown model" in one_line_error(obliviate("serve", "--model", "no-such-model", "--profiles", "/tmp"))


def test_sae_train_and_eval_bad_numbers_fail_before_any_work():
    assert "--ship-layer 9 is not one of --layers [6]" in one_line_error(obliviate("sae", "train", "--layers", "6", "--ship-layer", "9"))
    assert "expected comma-separated integers" in one_line_error(obliviate("sae", "train", "--layers", "six"))
    assert "--limit ≥ 1" in one_line_error(obliviate("eval", "loss", "--limit", "0"))


def test_features_discover_bad_input_fails_before_the_model_loads(tmp_path):
    assert "--fires-above ≥ 0" in one_line_error(obliviate("features", "discover", "--fires-above", "-1"))
    missing = tmp_path / "nope.txt"
    assert f"{missing}: file not found" in one_line_error(obliviate("features", "discover", "--retain", str(missing),
                                                                    "--generic-retain", "0"))


def test_bench_bad_arguments_fail_before_any_server_starts():
    assert "unknown engine 'nope'" in one_line_error(obliviate("bench", "--engines", "nope"))
    assert "must be ≥ 1" in one_line_error(obliviate("bench", "--concurrency", "0"))
    assert "comma-separated list of int" in one_line_error(obliviate("bench", "--concurrency", "eight"))


def test_parallel_flags_need_the_vllm_engine():
    assert "need --engine vllm" in one_line_error(obliviate("serve", "--tensor-parallel-size", "2"))
    assert "invalid choice: 'tgi'" in one_line_error(obliviate("serve", "--engine", "tgi"))
