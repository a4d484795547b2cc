"""Engines behind one interface (base.py): the built-in engine (builtin.py) and vLLM (vllm.py)."""
