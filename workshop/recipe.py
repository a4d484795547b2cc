"""The knobs of `obliviate unlearn`'s recipe: which candidates it tries, the retain side, the held-out loss
text, and the goals a profile must meet. Defaults of the command and of unlearn.run; no imports, so the
command line reads them without loading the model stack."""

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
# a candidate must keep these shares of baseline's dev answers and add at most this much loss
GOALS = {"generic": 0.95, "nearby": 0.80, "loss_pct": 2.0}
