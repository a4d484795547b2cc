"""The fine-tuned comparators' training (workshop/finetune.py) on a few steps of the real model: the
losses start where their definitions put them for an untrained (zero) LoRA update, and the saved adapter
makes the forget text less likely (peft's own model with and without it); it loads and fits the model; the
model trained on (the session's, as `obliviate unlearn` serves it afterwards) gives the same logits after."""

import math

import pytest
import torch
from peft import PeftModel

from ablation.adapters import load_adapter
from workshop.corpus import DATA
from workshop.finetune import train
from workshop.recipe import AdapterConfig
from workshop.train import token_chunks

FORGET = [t for t in (DATA / "hp_topic.txt").read_text().splitlines() if t.strip() and not t.startswith("#")][:12]
RETAIN = [t for t in (DATA / "fiction_retain.txt").read_text().splitlines() if t.strip() and not t.startswith("#")]


@pytest.mark.parametrize("method", ["npo", "graddiff"])
def test_a_few_steps_move_the_forget_loss_the_methods_way(method, lm, tmp_path):
    cfg = AdapterConfig(method, rank=4, steps=4, batch=2, window=32, lr=3e-3, retain_weight=1.0)
    ids = torch.tensor(token_chunks(lm.tokenizer, FORGET, cfg.window))
    with torch.no_grad():
        logits = lm.model(input_ids=ids[:2]).logits
    trained = train(lm, FORGET, RETAIN, tmp_path / "adapter", cfg, log=lambda _: None)
    with torch.no_grad():
        assert torch.equal(lm.model(input_ids=ids[:2]).logits, logits)  # the LoRA layers are out again
    assert not lm.model.training and not any(type(m).__module__.startswith("peft") for m in lm.model.modules())
    first = trained.first["forget"]
    if method == "npo":  # log p = log p_frozen at the start: -(2/beta)·log sigmoid(0)
        assert first == pytest.approx(2 / cfg.beta * math.log(2), rel=1e-4)
    else:  # minus the forget windows' next-token loss
        assert -6 < first < -0.5
    model = PeftModel.from_pretrained(lm.model, trained.path).eval()  # in place: taken out again below
    try:
        with torch.no_grad():
            after = model(input_ids=ids, labels=ids).loss.item()
            with model.disable_adapter():
                before = model(input_ids=ids, labels=ids).loss.item()
    finally:
        model.unload()
    assert after > before + 0.01, (before, after)  # the forget text's next-token loss went up
    adapter = load_adapter(trained.path)
    assert adapter.rank == 4 and len(adapter.modules) == 3 * 18  # gate, up, down of every layer
    assert f"{method}: MLP LoRA rank 4 on every layer" in trained.notes()
