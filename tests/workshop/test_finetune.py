"""The fine-tuned comparators' training (workshop/finetune.py) on a few steps of the real model: the
losses start where their definitions put them for an untrained (zero) LoRA update, and the saved adapter
makes the forget text less likely (peft's own model with and without it); it loads and fits the model."""

import math

import pytest
import torch
from peft import PeftModel

from ablation.adapters import load_adapter
from models.loading import load_model
from workshop.corpus import DATA
from workshop.finetune import train
from workshop.recipe import AdapterConfig
from workshop.train import token_chunks

FORGET = [t for t in (DATA / "hp_topic.txt").read_text().splitlines() if t.strip() and not t.startswith("#")][:12]
RETAIN = [t for t in (DATA / "fiction_retain.txt").read_text().splitlines() if t.strip() and not t.startswith("#")]


@pytest.mark.parametrize("method", ["npo", "graddiff"])
def test_a_few_steps_move_the_forget_loss_the_methods_way(method, tmp_path):
    cfg = AdapterConfig(method, rank=4, steps=4, batch=2, window=32, lr=3e-3, retain_weight=1.0)
    trained = train("gemma-3-270m", FORGET, RETAIN, tmp_path / "adapter", cfg, log=lambda _: None)
    first = trained.first["forget"]
    if method == "npo":  # log p = log p_frozen at the start: -(2/beta)·log sigmoid(0)
        assert first == pytest.approx(2 / cfg.beta * math.log(2), rel=1e-4)
    else:  # minus the forget windows' next-token loss
        assert -6 < first < -0.5
    lm = load_model("gemma-3-270m", device="cpu", dtype="float32")
    ids = torch.tensor(token_chunks(lm.tokenizer, FORGET, cfg.window))
    model = PeftModel.from_pretrained(lm.model, trained.path).eval()
    with torch.no_grad():
        after = model(input_ids=ids, labels=ids).loss.item()
        with model.disable_adapter():
            before = model(input_ids=ids, labels=ids).loss.item()
    assert after > before + 0.01, (before, after)  # the forget text's next-token loss went up
    adapter = load_adapter(trained.path)
    assert adapter.rank == 4 and len(adapter.modules) == 3 * 18  # gate, up, down of every layer
    assert f"{method}: MLP LoRA rank 4 on every layer" in trained.notes()
