"""obliviate's OpenAI-compatible server: protocol, serving, routes, engine."""
