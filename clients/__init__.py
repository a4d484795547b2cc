"""HTTP clients for obliviate (and any OpenAI-compatible server that accepts a profile)."""
