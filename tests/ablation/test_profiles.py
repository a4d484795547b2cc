"""Profile files: strict parsing, includes, SAE path resolution, the shipped profiles."""

import pytest
import torch

from ablation.sae_io import SAELoadError, load_direction, save_direction
from ablation.spec import ProfileError, default_profiles_dir, load_profile, load_profiles


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_shipped_profiles_load_and_seed_profiles_are_for_gemma_2b():
    served = load_profiles([default_profiles_dir()], "gemma-3-270m")
    assert {"baseline", "prompted"} <= set(served)
    assert "Harry Potter" in served["prompted"].prefix
    seed = load_profiles([default_profiles_dir()], "google/gemma-2b")
    iv = seed["hp_unlearn"].interventions[0]
    assert (iv.hookpoint, iv.sae) == ("blocks.12.hook_resid_post", "gemma-2b-res-jb:blocks.12.hook_resid_post")
    assert [e.feature for e in iv.edits] == [10130, 776] and not iv.keep_error
    assert seed["sae_only"].interventions[0].edits == []


def test_unknown_key_is_rejected_with_file_and_field(tmp_path):
    p = write(tmp_path, "bad.yaml", "name: x\ninterventions:\n- {hookpoint: blocks.1.hook_resid_post, sae: a:b, mode: zero}\n")
    with pytest.raises(ProfileError, match=r"bad.yaml: interventions.0.mode: Extra inputs are not permitted"):
        load_profile(p)


def test_bad_hookpoint_and_yaml(tmp_path):
    p = write(tmp_path, "hp.yaml", "name: x\ninterventions:\n- {hookpoint: blocks.1.attn, sae: a:b}\n")
    with pytest.raises(ProfileError, match="hook_resid_pre or"):
        load_profile(p)
    with pytest.raises(ProfileError, match="not valid YAML"):
        load_profile(write(tmp_path, "y.yaml", "name: [x\n"))
    with pytest.raises(ProfileError, match="file not found"):
        load_profile(tmp_path / "missing.yaml")


def test_include_and_relative_sae_path(tmp_path):
    (tmp_path / "saes/s1").mkdir(parents=True)
    (tmp_path / "saes/s1/cfg.json").write_text("{}")
    write(tmp_path, "base.yaml", "name: base\nmodel: m\ninterventions:\n- {hookpoint: blocks.2.hook_resid_post, sae: saes/s1}\n")
    p = write(tmp_path, "child.yaml", "include: base.yaml\nname: child\ndescription: more\n")
    spec = load_profile(p)
    assert spec.name == "child" and spec.model == "m"
    assert spec.interventions[0].sae == str((tmp_path / "saes/s1").resolve())
    (tmp_path / "saes/s1/cfg.json").unlink()
    with pytest.raises(ProfileError, match=r"child.yaml: SAE directory .*saes/s1 not found"):
        load_profile(p)


def test_a_steering_vector_is_resolved_next_to_its_profile(tmp_path):
    (tmp_path / "saes/s1").mkdir(parents=True)
    (tmp_path / "saes/s1/cfg.json").write_text("{}")
    iv = "{hookpoint: blocks.2.hook_resid_post, sae: saes/s1, steer: {vector: v.safetensors, scale: 4}}"
    p = write(tmp_path, "a.yaml", f"name: a\ninterventions:\n- {iv}\n")
    with pytest.raises(ProfileError, match=r"a.yaml: steering vector .*v.safetensors not found"):
        load_profile(p)
    save_direction(torch.ones(8), tmp_path / "v.safetensors")
    steer = load_profile(p).interventions[0].steer
    assert steer.vector == str(tmp_path / "v.safetensors") and steer.scale == 4.0
    assert torch.allclose(load_direction(steer.vector, 8), torch.full((8,), 8 ** -0.5))
    with pytest.raises(SAELoadError, match="need 16"):
        load_direction(steer.vector, 16)
    bad = write(tmp_path, "b.yaml", f"name: b\ninterventions:\n- {iv.replace('scale: 4', 'scale: .nan')}\n")
    with pytest.raises(ProfileError, match="steer.scale"):
        load_profile(bad)
    alone = write(tmp_path, "c.yaml", f"name: c\ninterventions:\n- {iv[:-1]}, condition: sequence}}\n")
    with pytest.raises(ProfileError, match="a steer without edits has no feature to trigger it"):
        load_profile(alone)


def test_profiles_for_other_models_are_not_served(tmp_path):
    write(tmp_path, "a.yaml", "name: a\nmodel: google/gemma-2b\n")
    write(tmp_path, "b.yaml", "name: b\n")
    assert set(load_profiles([tmp_path], "gemma-3-270m")) == {"b", "baseline"}
    assert set(load_profiles([tmp_path], "/models/gemma-2b")) == {"a", "b", "baseline"}


def test_markup_guard_needs_a_sequence_edit_and_the_edit_fields_are_checked(tmp_path):
    p = write(tmp_path, "g.yaml", "name: g\nmarkup_guard: true\ninterventions:\n"
                                  "- {hookpoint: blocks.1.hook_resid_post, sae: a:b, condition: token}\n")
    with pytest.raises(ProfileError, match=r"g.yaml: profile: markup_guard needs an intervention with condition "
                                           r"sequence or sequence_active"):
        load_profile(p)
    p = write(tmp_path, "h.yaml", "name: h\ninterventions:\n"
                                  "- {hookpoint: blocks.1.hook_resid_post, sae: a:b, generated: maybe}\n")
    with pytest.raises(ProfileError, match=r"h.yaml: interventions.0.generated: Input should be 'same', 'zero' or"):
        load_profile(p)
