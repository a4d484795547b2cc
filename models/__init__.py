"""Model loading: the embedded GGUF, local HF folders, hub names; TransformerLens for the references."""
