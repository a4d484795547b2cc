"""API keys and the profiles each may use.

A keys file (`obliviate serve --keys FILE`):

    keys:
      - name: lab                 # the label in /metrics (never the secret); default key1, key2, …
        key: sk-lab               # or sha256: <hex of the key>, so the file need not hold the secret
        profiles: ["*"]
      - name: public
        sha256: 3f9a…
        profiles: [hp_unlearn]
        default_profile: hp_unlearn   # what a request without a profile gets
      - name: ops
        key: sk-ops
        profiles: ["*"]
        admin: true               # may add and remove profiles (POST/DELETE /v1/profiles)
        inline: true              # may send a profile spec in a request's `profile` field

Presented keys are hashed and compared with every entry's digest in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from protocol.openai import first_error

ALL = "*"


class KeysError(ValueError):
    """A keys file that cannot be used (one line, for the CLI)."""


class KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    key: str | None = Field(default=None, min_length=8)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")
    profiles: list[str] = Field(min_length=1)
    default_profile: str | None = None
    admin: bool = False
    inline: bool = False

    @field_validator("key", "sha256", mode="before")
    @classmethod
    def _text(cls, v):
        if v is not None and not isinstance(v, str):
            raise ValueError("must be text: quote it in the YAML (digits alone read as a number)")
        return v

    @model_validator(mode="after")
    def _one_secret(self):
        if (self.key is None) == (self.sha256 is None):
            raise ValueError("give exactly one of key and sha256")
        return self


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[KeyEntry] = Field(min_length=1)


@dataclass(frozen=True)
class Access:
    """What one client may do: the key's name and profiles (None = all), and whether it may change them."""

    name: str
    allowed: frozenset[str] | None = None
    default_profile: str = "baseline"
    admin: bool = False
    inline: bool = False  # may send a whole profile spec in a request (its SAEs: ones the server has)

    def allows(self, profile: str) -> bool:
        return self.allowed is None or profile in self.allowed

    def visible(self, names) -> list[str]:
        return [n for n in names if self.allows(n)]


OPEN = Access("none", inline=True)  # no keys configured: every profile, inline ones too


@dataclass(frozen=True)
class Keyring:
    entries: tuple[tuple[bytes, Access], ...]  # (sha256 digest, access)

    @classmethod
    def build(cls, keys_file: Path | None, api_key: str | None, profiles: list[str]) -> "Keyring | None":
        """The keys of a keys file and/or a single --api-key (every profile); None when neither is set."""
        entries = list(_read(keys_file, profiles)) if keys_file else []
        if api_key:
            entries.append((_digest(api_key), Access("api-key")))
        if len({d for d, _ in entries}) < len(entries):
            raise KeysError(f"{keys_file}: the same key appears twice")
        return cls(tuple(entries)) if entries else None

    def lookup(self, presented: str) -> Access | None:
        """The access of the key presented, or None. Compares with every entry (no early exit)."""
        digest, found = _digest(presented), None
        for d, access in self.entries:
            if hmac.compare_digest(d, digest) and found is None:
                found = access
        return found


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def _read(path: Path, profiles: list[str]):
    try:
        data = yaml.safe_load(Path(path).read_text())
        spec = KeysFile.model_validate(data)
    except OSError as e:
        raise KeysError(f"{path}: cannot read the keys file ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise KeysError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except ValidationError as e:
        where, msg = first_error(e, "the file")
        raise KeysError(f"{path}: {where}: {msg} (expected keys: [{{name, key | sha256, profiles, "
                        f"default_profile, admin, inline}}])") from None
    names = set()
    for i, e in enumerate(spec.keys, 1):
        name = e.name or f"key{i}"
        if name in names:
            raise KeysError(f"{path}: two keys are named {name!r}")
        names.add(name)
        allowed = None if ALL in e.profiles else frozenset(e.profiles)
        unknown = sorted((allowed or set()) - set(profiles))
        if unknown:
            raise KeysError(f"{path}: key {name!r} names unknown profiles {', '.join(unknown)} "
                            f"(served: {', '.join(sorted(profiles))})")
        default = e.default_profile or _default(allowed)
        if default is None:
            raise KeysError(f"{path}: key {name!r}: set default_profile (baseline is not among its profiles)")
        if default not in profiles or (allowed is not None and default not in allowed):
            raise KeysError(f"{path}: key {name!r}: default_profile {default!r} is not one of its profiles")
        digest = bytes.fromhex(e.sha256) if e.sha256 else _digest(e.key)
        yield digest, Access(name, allowed, default, e.admin, e.inline)


def _default(allowed: frozenset[str] | None) -> str | None:
    if allowed is None or "baseline" in allowed:
        return "baseline"
    return next(iter(allowed)) if len(allowed) == 1 else None
