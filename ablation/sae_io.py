"""Loading SAEs through sae_lens (a release + id, or a directory saved with `save_model`), and the
steering vectors profiles add beside them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

if TYPE_CHECKING:  # deferred: the type only; load_sae imports sae_lens (13 s with transformer_lens)
    from sae_lens import SAE


class SAELoadError(ValueError):
    pass


def shipped_saes_dir() -> Path:
    return Path(__file__).parent / "saes"


# each embedded model's default SAE (trained with Harry Potter text; gemma's -hp-sw: Harry Potter and Star Wars)
DEFAULT_SAES = {"gemma-3-270m": "gemma-3-270m-res-L6", "smollm2-135m-instruct": "smollm2-135m-instruct-res-L12"}


def shipped_sae(model: str = "gemma-3-270m") -> str:
    """The default SAE shipped for `model` (a directory)."""
    if model not in DEFAULT_SAES:
        raise SAELoadError(f"no SAE is shipped for the model {model!r}: give one with --sae (a directory or "
                           f"release:sae_id), or train one with `obliviate sae train --model {model}`")
    path = shipped_saes_dir() / DEFAULT_SAES[model]
    if not (path / "cfg.json").exists():
        raise SAELoadError(f"give an SAE: the default {path} is missing")
    return str(path)


def load_sae(ref: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> SAE:
    """`ref` is a directory (cfg.json + sae_weights.safetensors) or `release:sae_id`.

    Releases load by name so sae_lens folds their norm scaling factor into the weights
    (gemma-2b-res-jb needs ≈0.2138; the raw folder without it reconstructs wrongly).
    """
    # deferred: a process that loads no SAE (vLLM's front end, the command line) never imports sae_lens
    from sae_lens import SAE

    dtype_name = str(dtype).removeprefix("torch.")
    path = Path(ref)
    if path.is_dir():
        if not (path / "cfg.json").exists():
            raise SAELoadError(f"{ref}: not an SAE directory (no cfg.json)")
        try:
            sae = SAE.load_from_disk(path, device=device, dtype=dtype_name)
        except Exception as e:  # missing or truncated weights, a damaged cfg.json: sae_lens raises many kinds
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise SAELoadError(f"cannot load the SAE in {ref}: {type(e).__name__}: {first} (copy it again, or "
                               f"retrain it with `obliviate sae train`)") from e
    elif ":" in ref and not path.is_absolute():
        release, sae_id = ref.split(":", 1)
        try:
            sae = SAE.from_pretrained(release, sae_id, device=device, dtype=dtype_name)
        except Exception as e:  # hub errors, unknown release/id
            raise SAELoadError(f"cannot load SAE {ref!r}: {e}") from e
    else:
        raise SAELoadError(f"SAE {ref!r} not found: give a directory or release:sae_id")
    sae.eval()
    for p in sae.parameters():
        p.requires_grad_(False)
    if sae.cfg.normalize_activations not in ("none",):
        raise SAELoadError(
            f"SAE {ref!r} uses run-time activation normalisation "
            f"({sae.cfg.normalize_activations}); fold it into the weights before serving"
        )
    return sae


def sae_dims(ref: str) -> tuple[int, int] | None:
    """(d_in, d_sae) from an SAE directory's cfg.json without loading its weights (a process that does
    not run the model checks profiles with this); None for a release (its config is on the hub)."""
    cfg = Path(ref) / "cfg.json"
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text())
        return int(data["d_in"]), int(data["d_sae"])
    except (ValueError, KeyError, TypeError) as e:
        raise SAELoadError(f"{cfg}: not an SAE config ({type(e).__name__}: {e})") from None


def load_direction(path: str, d_in: int, device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A steering vector file's "direction" ([d_in], made unit length)."""
    try:
        v = load_file(path)["direction"].float().reshape(-1)
    except (OSError, KeyError, SafetensorError) as e:
        raise SAELoadError(f"{path}: not a steering vector file (one tensor named 'direction'; {type(e).__name__})") from None
    if v.numel() != d_in or not bool(torch.isfinite(v).all()) or float(v.norm()) == 0:
        raise SAELoadError(f"{path}: the steering direction has {v.numel()} finite nonzero values: need {d_in} "
                           f"(the SAE's d_in)")
    return (v / v.norm()).to(device=device, dtype=dtype)


def save_direction(v: torch.Tensor, path: Path) -> None:
    save_file({"direction": (v.float() / v.float().norm()).contiguous()}, str(path))
