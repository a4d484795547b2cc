"""Discovery ranks a planted feature first on synthetic activations, under both scores."""

import torch

from workshop.discover import FeatureActs, clamp_profile, rank


def synthetic(n_tokens, d_sae, planted=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    acts = torch.relu(torch.randn(n_tokens, d_sae, generator=g) - 1.5)  # every feature fires sometimes
    acts[:, 7] = torch.relu(torch.randn(n_tokens, generator=g)) * 3  # busy everywhere: not specific
    if planted is not None:
        acts[:, planted] = 0
        acts[::3, planted] = 2.0 + torch.rand(len(acts[::3]), generator=g)  # fires on a third of the tokens
    return FeatureActs(acts, [0] * n_tokens, [0] * n_tokens, list(range(n_tokens)))


def test_planted_feature_ranks_first():
    forget, retain = synthetic(600, 64, planted=42), synthetic(3000, 64, planted=None, seed=1)
    retain.acts[:, 42] = 0
    retain.acts[5, 42] = 0.5  # fires on one retain token: still specific
    for method in ("dsg", "firing"):
        ranking = rank(forget, retain, method, top=5)
        assert ranking[0].feature == 42, method
        assert 7 not in [r.feature for r in ranking]
    r = rank(forget, retain, "firing")[0]
    assert abs(r.rate_forget - 1 / 3) < 0.01 and r.rate_retain < 0.001


def test_features_busy_on_retain_are_excluded():
    forget, retain = synthetic(600, 64, planted=42), synthetic(600, 64, planted=42, seed=1)
    assert all(r.feature != 42 for r in rank(forget, retain, "firing"))
    assert all(r.feature != 42 for r in rank(forget, retain, "dsg"))


def test_a_small_retain_set_is_not_diluted_by_a_large_one():
    # feature 42 fires on the forget side and on a small same-genre retain set as often; a large generic
    # set where it never fires would let it pass if the two were pooled
    forget, genre = synthetic(600, 64, planted=42), synthetic(300, 64, planted=42, seed=1)
    generic = synthetic(30000, 64, seed=2)
    generic.acts[:, 42] = 0
    pooled = FeatureActs(torch.cat([genre.acts, generic.acts]), [], [], [])
    for method in ("dsg", "firing"):
        assert rank(forget, pooled, method, top=3)[0].feature == 42, method
        assert all(r.feature != 42 for r in rank(forget, [genre, generic], method)), method
    assert rank(forget, [generic], "dsg", top=1)[0].feature == 42


def test_ceiling_keeps_a_feature_that_fires_weakly_on_retain_and_strongly_on_forget():
    forget, retain = synthetic(600, 64, planted=42), synthetic(3000, 64, seed=1)
    retain.acts[:, 42] = 0
    retain.acts[::2, 42] = 1.0  # a weak firing on half the retain tokens: dsg and firing drop it
    assert all(r.feature != 42 for r in rank(forget, retain, "firing"))
    top = rank(forget, retain, "ceiling", top=3)[0]
    assert top.feature == 42 and top.fires_above == 1.0 and abs(top.score - 1 / 3) < 0.01


def test_outliers_leave_out_the_retain_texts_a_feature_peaks_highest_in():
    """One odd token in one retain text sets the plain ceiling; with outliers=1 that text is left out."""
    forget = synthetic(600, 64, planted=42)
    acts = torch.zeros(300, 64)
    acts[::10, 42] = 1.0  # weak on every retain text (30 texts, 10 tokens each) …
    acts[7, 42] = 9.0  # … and far above the topic once, in text 0
    retain = FeatureActs(acts, [0] * 300, [i // 10 for i in range(300)], [i % 10 for i in range(300)])
    f42 = lambda **kw: [r for r in rank(forget, retain, "ceiling", top=64, **kw) if r.feature == 42]  # noqa: E731
    assert f42() == []
    assert f42(outliers=1)[0].fires_above == 1.0 and abs(f42(outliers=1)[0].score - 1 / 3) < 0.01
    acts[17, 42] = 8.0  # a second text above the topic: one outlier is not enough, two are
    assert f42(outliers=1) == [] and f42(outliers=2)[0].fires_above == 1.0


def test_written_profile_clamps_to_minus_mean_activation(tmp_path):
    import yaml

    from ablation.spec import load_profile
    from tests.helpers import build_sae, save_sae

    forget, retain = synthetic(600, 64, planted=42), synthetic(3000, 64, seed=1)
    retain.acts[:, 42] = 0
    ranking = rank(forget, retain, "dsg", top=2)
    sae = save_sae(build_sae("standard", 16, 64), tmp_path / "sae")
    path = tmp_path / "p.yaml"
    path.write_text(clamp_profile("p", "gemma-3-270m", str(sae), "blocks.6.hook_resid_post", ranking[:1], True,
                                  "token", 1.0, "test").to_yaml())
    spec = load_profile(path)
    edit = spec.interventions[0].edits[0]
    assert edit.feature == 42 and abs(edit.value + ranking[0].mean_when_active) < 1e-3
    assert yaml.safe_load(path.read_text())["interventions"][0]["condition"] == "token"
    assert edit.fires_above == 0.0
    path.write_text(clamp_profile("p", "gemma-3-270m", str(sae), "blocks.6.hook_resid_post",
                                  rank(forget, retain, "ceiling", top=1), True, "sequence", 2.0, "test").to_yaml())
    edit = load_profile(path).interventions[0].edits[0]
    assert edit.fires_above == round(float(retain.acts[:, 42].max()), 3) and edit.value < 0


def test_discover_and_show_cli_on_the_real_model(tmp_path, test_profiles_dir):
    import subprocess
    import sys

    from ablation.spec import load_profile

    sae = test_profiles_dir.parent / "random"
    (tmp_path / "forget.txt").write_text("Hermione cast a spell in the Gryffindor common room.\nSnape glared at Harry.\n")
    (tmp_path / "retain.jsonl").write_text('{"text": "The bakery opened early on Sunday."}\n{"prompt": "Rain fell."}\n')
    out = tmp_path / "p.yaml"
    r = subprocess.run([sys.executable, "-m", "cli", "features", "discover", "--sae", str(sae),
                        "--forget", str(tmp_path / "forget.txt"), "--retain", str(tmp_path / "retain.jsonl"),
                        "--generic-retain", "0", "--method", "firing", "--max-retain-rate", "0.2", "--top", "4",
                        "--k", "2", "--write-profile", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-1500:]
    assert "2 forget texts" in r.stdout and "[[" in r.stdout  # a ranking with highlighted contexts
    spec = load_profile(out)
    assert spec.interventions[0].hookpoint == "blocks.6.hook_resid_post" and len(spec.interventions[0].edits) == 2
    r = subprocess.run([sys.executable, "-m", "cli", "features", "show", "--sae", str(sae), "--texts",
                        str(tmp_path / "forget.txt"), "1", "99999"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "feature ids must be in [0, 256)" in r.stderr
