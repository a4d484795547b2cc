"""SAE math, profile specs, SAE loading, SAE training and feature discovery."""
