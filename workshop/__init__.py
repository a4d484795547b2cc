"""The unlearning workshop: SAE training, feature discovery, `obliviate unlearn` (an app that starts servers)."""
