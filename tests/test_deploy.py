"""deploy/ never exposes the server without keys, and its example keys file is one the server accepts."""

from pathlib import Path

import yaml

from ablation.spec import default_profiles_dir, load_profiles
from server.keys import Keyring

DEPLOY = Path(__file__).parent.parent / "deploy"


def test_every_deploy_file_that_listens_publicly_requires_keys():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    svc = compose["services"]["obliviate"]
    assert svc["environment"]["OBLIVIATE_KEYS"] == "/run/secrets/obliviate-keys"
    assert "obliviate-keys" in svc["secrets"] and compose["secrets"]["obliviate-keys"]["file"] == "./keys.yaml"
    assert "OBLIVIATE_KEYS=/run/secrets/obliviate-keys" in (DEPLOY / "Dockerfile").read_text()
    assert "OBLIVIATE_KEYS=/etc/obliviate/keys.yaml" in (DEPLOY / "obliviate.service").read_text()
    for text in ((DEPLOY / "Dockerfile").read_text(), (DEPLOY / "obliviate.service").read_text(), str(compose)):
        assert "ALLOW_UNAUTHENTICATED" not in text.upper().replace("-", "_")


def test_the_example_keys_file_is_valid_for_the_shipped_profiles():
    names = list(load_profiles([default_profiles_dir()], "gemma-3-270m"))
    ring = Keyring.build(DEPLOY / "keys.example.yaml", None, names)
    public = next(a for _, a in ring.entries if a.name == "public")
    assert public.default_profile == "hp_unlearn" and not public.allows("baseline")


def test_the_docker_image_holds_every_package_and_ray_configs_are_valid_settings():
    import tomllib

    from server.ray_serve import build
    from server.settings import Settings

    packages = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    for pkg in packages["include"]:
        assert f"COPY {pkg.rstrip('*')} " in dockerfile, pkg
    serve_config = yaml.safe_load((DEPLOY / "ray" / "serve.yaml").read_text())
    service = yaml.safe_load((DEPLOY / "ray" / "rayservice.yaml").read_text())
    for app in serve_config["applications"] + yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]:
        assert app["import_path"] == "server.ray_serve:build" and callable(build)
        settings = Settings(**app["args"])  # every arg is a setting
        assert settings.keys and settings.replicas >= 1 and settings.max_replicas > settings.replicas
