"""The knobs of `obliviate unlearn`'s recipe: which candidates it tries, the retain side, the held-out loss
text, and the goals a profile must meet. Defaults of the command and of unlearn.run; nothing heavy
imported, so the command line reads them without loading the model stack."""

from dataclasses import dataclass

KS = (2, 3, 5, 8, 12, 16)
# retain texts each feature may peak above its threshold in (discover.rank's `outliers`): 0 = its highest activation
OUTLIERS = (0,)
# Wikipedia summaries on the retain side. A feature's `fires_above` is its highest activation there, so each
# feature fires on about 1 in N unseen generic texts and switches the clamp on. Measured on the loss report's
# documents: with 300, hp_sw_unlearn at k = 12 added 2.7 % loss (k = 8: 0.5 %); with 1500 the one chosen
# added 0.3 %. 1500 cost about 80 s more.
GENERIC_RETAIN = 1500
# held-out documents the loss is read from when choosing (never the loss report's: evals.scoring.heldout_docs)
DEV_DOCS = 40
# the edit each candidate makes (ablation/spec.py): clamp for the rest of the sequence once a feature fires,
# zero the features (instead of clamping) at generated tokens, and ban tag tokens once the edit is on. On the
# Star Wars dev prompts (sw_unlearn's 16 features) this kept 4 of baseline's 30 answers at fluency -1.59
# (baseline -1.39), stray markup 0 %; clamping generated tokens too: 3 at -2.31, markup 36 %
CONDITION, GENERATED, MARKUP_GUARD = "sequence", "zero", True


@dataclass(frozen=True)
class Goals:
    """What a candidate must keep: shares of baseline's generic and nearby dev answers, at most this much
    loss added (%), and forget completions at most `fluency_drop` nats/token less fluent than baseline's."""
    generic: float = 0.95
    nearby: float = 0.80
    loss_pct: float = 2.0
    fluency_drop: float = 0.3

    def __str__(self) -> str:
        return (f"generic >= {self.generic:.0%}, nearby >= {self.nearby:.0%} of baseline, loss <= +{self.loss_pct:g}%, "
                f"forget fluency >= baseline's - {self.fluency_drop:g} nats/token")


# the fine-tuned comparators (`obliviate unlearn --method rmu|graddiff|npo`, workshop/finetune.py)
METHODS = ("rmu", "graddiff", "npo")
# the strengths of a trained adapter's update tried on the dev prompts (its lora_alpha scaled)
ADAPTER_SCALES = (0.5, 1.0, 1.5)


@dataclass(frozen=True)
class AdapterConfig:
    method: str = "rmu"
    layer: int = 6  # rmu: the layer whose output the forget text is misdirected at (the shipped SAE's, L6)
    rank: int = 8
    steps: int = 80
    batch: int = 4  # windows of forget and of retain text per step
    window: int = 64  # tokens per window (BOS + 63)
    lr: float = 1e-3
    steer: float = 2.0  # rmu: the target's norm, in mean activation norms at `layer`
    retain_weight: float = 4.0  # rmu: weight of keeping retain activations; graddiff, npo: of the retain loss
    beta: float = 0.1  # npo: the inverse temperature of its preference loss (the paper's default)
    seed: int = 0


