"""SAE training end to end on a tiny budget, through the same code as `obliviate sae train`."""

import json

import pytest
import torch

from ablation.sae_io import load_sae
from workshop.corpus import DATA
from workshop.train import TrainConfig, mix_key, run, train_sae

TOPICS = [str(DATA / "hp_topic.txt"), str(DATA / "sw_topic.txt")]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    cfg = TrainConfig(layers=[2, 3], width=128, k=8, generic_tokens=12_000, topic_repeat=1, samples_per_prompt=0,
                      epochs=3, batch_size=1024, eval_docs=6, topic_files=TOPICS)
    card = run(cfg, "gemma-3-270m", root / "out", root / "work")
    return cfg, card, root


def test_tiny_training_writes_a_loadable_sae_and_card(tiny_run):
    cfg, card, root = tiny_run
    path = root / "out" / f"gemma-3-270m-res-L{card['layer']}"
    sae = load_sae(str(path))  # the same loading path as any sae_lens SAE
    assert sae.cfg.d_sae == 128 and sae.cfg.k == 8 and sae.cfg.normalize_activations == "none"
    assert sae.cfg.metadata.hook_name == f"blocks.{card['layer']}.hook_resid_post"
    saved = json.loads((path / "card.json").read_text())
    for key in ("l0", "explained_variance", "dead_fraction", "ce_clean", "ce_with_sae", "ce_zero_ablation",
                "ce_loss_recovered", "tokens_seen", "text_mix", "timings_s"):
        assert key in saved, key
    assert saved["l0"] == pytest.approx(8, abs=0.01)  # TopK: exactly k per token
    assert saved["ce_zero_ablation"] > saved["ce_clean"]
    assert {c["layer"] for c in saved["compared"]} == {2, 3}
    assert saved["text_mix"]["topic_tokens"] > 0 and saved["text_mix"]["generic_tokens"] >= 11_000
    assert saved["text_mix"]["topic_files"] == ["hp_topic.txt", "sw_topic.txt"]
    assert "`hp_topic.txt`, `sw_topic.txt`" in (path / "card.md").read_text()
    # the card's command line carries every setting that differs from the defaults
    assert ("`obliviate sae train --layers 2,3 --topic workshop/data/hp_topic.txt --topic "
            "workshop/data/sw_topic.txt --sample-prompts workshop/data/hp_sampling_prompts.txt "
            "--width 128 --k 8 --generic-tokens 12000 --topic-repeat 1 --samples-per-prompt 0 --epochs 3 "
            "--eval-docs 6` (seed 0)") in (path / "card.md").read_text()


def test_the_mix_is_cached_by_what_goes_into_it(tmp_path):
    base = TrainConfig()
    assert mix_key(base, "gemma-3-270m") == mix_key(TrainConfig(), "gemma-3-270m")
    assert mix_key(TrainConfig(topic_files=TOPICS), "gemma-3-270m") != mix_key(base, "gemma-3-270m")
    edited = tmp_path / "hp_topic.txt"
    edited.write_text((DATA / "hp_topic.txt").read_text() + "One more line about Hogwarts.\n")
    assert mix_key(TrainConfig(topic_files=[str(edited)]), "gemma-3-270m") != mix_key(base, "gemma-3-270m")


def test_rerun_with_other_training_settings_reuses_the_shards_and_trains_anew(tiny_run):
    cfg, card, root = tiny_run
    shards = sorted((root / "work" / "L2").glob("shard_*.pt"))
    stamps = [p.stat().st_mtime_ns for p in shards]
    before = sorted(p.name for p in (root / "work" / "candidates").iterdir())
    assert before == ["L2-w128-k8-e3-b1024-lr0.001-seed0", "L3-w128-k8-e3-b1024-lr0.001-seed0"]
    other = TrainConfig(**{**cfg.__dict__, "layers": [2], "epochs": 1})
    again = run(other, "gemma-3-270m", root / "out3", root / "work")  # the same mix and shards, not the same SAE
    assert shards and [p.stat().st_mtime_ns for p in shards] == stamps
    assert sorted(p.name for p in (root / "work" / "candidates").iterdir()) == sorted(
        before + ["L2-w128-k8-e1-b1024-lr0.001-seed0"])
    assert again["train_s"] > 0 and "--epochs 1" in (root / "out3" / "gemma-3-270m-res-L2" / "card.md").read_text()


def test_training_is_deterministic_with_a_seed():
    acts = torch.randn(4096, 32) * 50
    cfg = TrainConfig(width=64, k=4, epochs=2, batch_size=512)
    a, b = (train_sae(acts, 0, cfg, "m") for _ in range(2))
    assert torch.equal(a.W_dec, b.W_dec) and torch.equal(a.b_enc, b.b_enc)
