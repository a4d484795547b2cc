"""Profile specs: what a request's residual-stream intervention is, as data.

A profile is a YAML file. It names the model it is for (or none: any model), an optional prompt
prefix (the prompted baseline) and a list of interventions, each at one TransformerLens hook point
with one SAE. See `ablation/profiles/*.yaml` for the shipped ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ablation.residual import Hookpoint
from protocol.openai import first_error


class ProfileError(ValueError):
    """A profile file that cannot be used; the message names the file and the problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FeatureEdit(_Strict):
    feature: int = Field(ge=0)
    # the activation the feature is set to: 0 = the seed's ablation, negative = clamping
    value: float = 0.0
    # for conditions token/sequence: the feature counts as firing only above this activation
    # (a name feature that fires weakly on every first name and strongly on the topic's one)
    fires_above: float = Field(default=0.0, ge=0)


class Steer(_Strict):
    # a direction added to the residual wherever the intervention's edit is on (for the sequence conditions:
    # every position from the first firing on, generated tokens included): `scale` times the unit vector saved
    # in `vector` (a safetensors file with one [d_model] tensor "direction", as `obliviate unlearn
    # --steer-replies` writes it; a relative path is resolved against the profile file's directory). Towards what the model
    # says when it does not know, the forgotten answer is replaced by text the model would write anyway.
    vector: str
    scale: float = Field(allow_inf_nan=False)


class Intervention(_Strict):
    hookpoint: str
    # "release:sae_id" for a sae_lens release, or a directory saved with `save_model`
    # (relative paths are resolved against the profile file's directory)
    sae: str
    # false: the residual becomes the SAE's (edited) reconstruction, as in the seed.
    # true: x + decode(edited) - decode(acts), so only the edited features change the residual.
    keep_error: bool = False
    # where an edit applies: every position; only positions where that feature fires;
    # every position from the first one in the sequence where any edited feature fired ("sequence");
    # or, from that first firing on, only where each feature is active (above 0: "sequence_active"), so the
    # edit removes what the features carry instead of adding a fixed vector to every later token.
    condition: Literal["always", "token", "sequence", "sequence_active"] = "always"
    edits: list[FeatureEdit] = []
    # at the tokens the model generated (the prompt's always take `edits` as written): "same"; "zero": the
    # edited features set to 0 instead of their (negative) values, so the text that replaces a forgotten
    # answer is not pushed off-distribution; "off": not edited
    generated: Literal["same", "zero", "off"] = "same"
    steer: Steer | None = None
    # leave position 0 (BOS, an attention sink with a residual norm ~10x the rest that SAEs are
    # not trained on) untouched; false reproduces hooks that edit every position
    skip_bos: bool = True

    @property
    def stateful(self) -> bool:
        """Whether the edit depends on earlier tokens (state carried across decode steps)."""
        return self.condition.startswith("sequence")

    @model_validator(mode="after")
    def _a_steer_needs_a_trigger(self) -> "Intervention":
        if self.steer is not None and not self.edits and self.condition != "always":
            raise ValueError(f"a steer without edits has no feature to trigger it: condition {self.condition!r} "
                             f"needs edits, or use condition always (steer every token)")
        return self

    @field_validator("hookpoint")
    @classmethod
    def _known_hookpoint(cls, v: str) -> str:
        Hookpoint.parse(v)  # raises ValueError with the supported forms
        return v


class ProfileMetadata(_Strict):
    version: int = 1
    notes: str = ""


class ProfileSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str = ""
    # model name this profile is for; None = any model
    model: str | None = None
    prefix: str = ""
    # a LoRA adapter folder (peft format: ablation/adapters.py) applied to this profile's rows, alone or
    # with the interventions (relative paths are resolved against the profile file's directory)
    adapter: str | None = None
    interventions: list[Intervention] = []
    # once an edit with a `sequence` condition has switched on, tokens that open or close an HTML tag are
    # not sampled (ablation/guard.py): the replacement text cannot show `</strong>`-style debris
    markup_guard: bool = False
    metadata: ProfileMetadata = ProfileMetadata()

    def to_yaml(self) -> str:
        """The profile file for this spec (defaults left out; `load_profile` reads it back equal)."""
        return yaml.safe_dump(self.model_dump(exclude_defaults=True), sort_keys=False, width=100)

    @model_validator(mode="after")
    def _guard_needs_a_sequence_edit(self) -> "ProfileSpec":
        if self.markup_guard and not any(iv.stateful for iv in self.interventions):
            raise ValueError("markup_guard needs an intervention with condition sequence or sequence_active "
                             "(it switches on with the edit)")
        return self

    @field_validator("interventions")
    @classmethod
    def _one_per_hookpoint(cls, v: list[Intervention]) -> list[Intervention]:
        points = [i.hookpoint for i in v]
        if len(points) != len(set(points)):
            raise ValueError("at most one intervention per hookpoint")
        return v


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Reads one profile file, merging `include:` (a sibling file) under its own keys."""
    if path in seen:
        raise ProfileError(f"{path}: include cycle")
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ProfileError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:  # a directory, no permission, not text
        raise ProfileError(f"{path}: cannot read a profile file ({getattr(e, 'strerror', None) or e})") from None
    except yaml.YAMLError as e:
        raise ProfileError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: a profile must be a YAML mapping")
    include = data.pop("include", None)
    if include is None:
        return data
    if not isinstance(include, str) or not include.strip():
        raise ProfileError(f"{path}: include must be the name of a sibling profile file, not {include!r}")
    if not (path.parent / include).is_file():
        raise ProfileError(f"{path}: include {include!r}: no such profile file next to it")
    base = _read_yaml((path.parent / include).resolve(), seen + (path,))
    base.pop("name", None)
    return {**base, **data}


def resolve_sae_paths(spec: ProfileSpec, path: Path) -> ProfileSpec:
    """SAE and adapter folders and steering vectors given relative to the profile file at `path`, made absolute (and checked to
    exist)."""
    base = path.parent
    adapter = spec.adapter
    if adapter is not None:
        adapter = str((base / adapter).resolve())
        if not (Path(adapter) / "adapter_config.json").exists():
            raise ProfileError(f"{path}: adapter directory {adapter} not found (no adapter_config.json)")
    fixed = []
    for iv in spec.interventions:
        sae = iv.sae
        if ":" not in sae or Path(sae).is_absolute():
            sae = str((base / sae).resolve())
            if not (Path(sae) / "cfg.json").exists():
                raise ProfileError(f"{path}: SAE directory {sae} not found (no cfg.json)")
        steer = iv.steer
        if steer is not None:
            steer = steer.model_copy(update={"vector": str((base / steer.vector).resolve())})
            if not Path(steer.vector).is_file():
                raise ProfileError(f"{path}: steering vector {steer.vector} not found")
        fixed.append(iv.model_copy(update={"sae": sae, "steer": steer}))
    return spec.model_copy(update={"interventions": fixed, "adapter": adapter})


def load_profile(path: str | Path) -> ProfileSpec:
    path = Path(path).resolve()
    data = _read_yaml(path)
    try:
        spec = ProfileSpec.model_validate(data)
    except ValidationError as e:
        where, msg = first_error(e, "profile")
        raise ProfileError(f"{path}: {where}: {msg}") from None
    return resolve_sae_paths(spec, path)


def default_profiles_dir() -> Path:
    return Path(__file__).parent / "profiles"


def load_profiles(dirs: list[str | Path], model: str) -> dict[str, ProfileSpec]:
    """All profiles in `dirs` that apply to `model` (later directories override earlier ones)."""
    found: dict[str, ProfileSpec] = {}
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            raise ProfileError(f"{d}: profiles directory not found")
        for path in sorted(d.glob("*.yaml")):
            spec = load_profile(path)
            if spec.model is None or model_matches(spec.model, model):
                found[spec.name] = spec
    if "baseline" not in found:
        found["baseline"] = ProfileSpec(name="baseline", description="no intervention")
    return found


def model_matches(wanted: str, served: str) -> bool:
    """`google/gemma-2b` matches a served `gemma-2b`, a local path ending in it, and itself."""
    tail = lambda s: s.rstrip("/").split("/")[-1].lower()  # noqa: E731
    return wanted == served or tail(wanted) == tail(served)
