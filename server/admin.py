"""Runtime profiles: POST /v1/profiles adds one to the running engine and writes it to --profiles-dir
(a restart reads it back), DELETE /v1/profiles/{name} removes it. Requests in flight keep the profile
they started with. Admin keys only (`admin: true` in the keys file; without keys, loopback clients)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import yaml
from ablation.sae_io import SAELoadError
from ablation.spec import ProfileError, ProfileSpec, load_profiles, resolve_sae_paths
from protocol.openai import ProfileCard
from server.errors import Conflict, Forbidden, InvalidRequest, NotFound, shown
from server.keys import Access, Keyring
from server.serving import CompletionServing

LOOPBACK = {"127.0.0.1", "::1", "localhost"}


class ProfileAdmin:
    def __init__(self, serving: CompletionServing, keyring: Keyring | None, profiles_dir: Path | None):
        self.serving, self.keyring, self.dir = serving, keyring, profiles_dir
        model = serving.model.name
        # what DELETE may remove: the profiles of --profiles-dir (the others come from read-only folders)
        if profiles_dir:
            profiles_dir.mkdir(parents=True, exist_ok=True)
        self.runtime = (set(load_profiles([profiles_dir], model)) - {"baseline"}) if profiles_dir else set()
        self._lock = asyncio.Lock()

    def check_admin(self, access: Access, client_host: str | None) -> None:
        if self.keyring is None:
            if client_host not in LOOPBACK:
                raise Forbidden("changing profiles without keys is allowed only from this machine (loopback); "
                                "start the server with --keys and an `admin: true` key", code="admin_only")
        elif not access.admin:
            raise Forbidden(f"the key {access.name!r} may not change profiles (needs `admin: true` in the keys file)",
                            code="admin_only")

    def parse(self, body: bytes) -> ProfileSpec:
        """A profile spec as JSON or YAML text, validated as a profile file is; relative SAE paths are
        resolved against --profiles-dir."""
        try:
            data = json.loads(body)
        except ValueError:
            try:
                data = yaml.safe_load(body)
            except yaml.YAMLError as e:
                raise InvalidRequest(f"the body is neither JSON nor YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise InvalidRequest("the body must be a profile spec: a JSON object or YAML mapping with name, "
                                 "interventions, …")
        spec = self.serving.spec_from(data)
        try:
            return resolve_sae_paths(spec, (self.dir or Path.cwd()) / f"{spec.name}.yaml")
        except ProfileError as e:
            raise InvalidRequest(str(e), param="interventions") from None

    async def add(self, body: bytes, access: Access, client_host: str | None) -> ProfileCard:
        self.check_admin(access, client_host)
        spec = self.parse(body)
        if self.dir is None:
            raise InvalidRequest("this server keeps no runtime profiles: start it with --profiles-dir DIR",
                                 code="no_profiles_dir")
        async with self._lock:
            if spec.name in self.serving.specs:
                raise Conflict(f"profile {shown(spec.name)} exists: DELETE it first to replace it",
                               param="name", code="profile_exists")
            try:
                await self.serving.engine.add_profile(spec.name, spec)
            except (SAELoadError, ValueError) as e:
                raise InvalidRequest(f"profile {shown(spec.name)}: {e}", param="interventions") from None
            path = self.dir / f"{spec.name}.yaml"
            partial = path.with_suffix(".partial")
            partial.write_text(spec.to_yaml())
            partial.replace(path)
            self.runtime.add(spec.name)
            self.serving.profile_added(spec)
        return self.serving.card(spec.name)

    async def remove(self, name: str, access: Access, client_host: str | None) -> dict:
        self.check_admin(access, client_host)
        async with self._lock:
            if name not in self.serving.specs:
                raise NotFound(f"unknown profile {shown(name)}", param="name", code="profile_not_found")
            keys = self.keyring.entries if self.keyring else ()
            users = sorted(a.name for _, a in keys if a.default_profile == name)
            if users:
                raise Conflict(f"profile {shown(name)} is the default of keys {', '.join(users)}: change the keys "
                               f"file first", code="profile_in_use")
            if name not in self.runtime:
                raise Conflict(f"profile {shown(name)} comes from a read-only profiles folder, not --profiles-dir: "
                               f"remove its file and restart to drop it", code="profile_read_only")
            await self.serving.engine.remove_profile(name)
            self.serving.profile_removed(name)
            self.runtime.discard(name)
            (self.dir / f"{name}.yaml").unlink(missing_ok=True)
        return {"id": name, "object": "profile", "deleted": True}
