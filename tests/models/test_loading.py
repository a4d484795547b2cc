"""Models other than the embedded one go through the same loading, profile and serving code:
a locally saved Gemma-architecture checkpoint (as a user with hub files would have for gemma-2b)."""

import httpx
import pytest
import torch
from transformers import GemmaConfig, GemmaForCausalLM

from ablation.sae_io import SAELoadError, load_sae
from ablation.spec import load_profiles
from models.loading import ModelLoadError, load_info, load_model, resolve
from server.live import LiveServer
from server.settings import Settings
from tests.helpers import build_sae, save_sae, write_profile


@pytest.fixture(scope="module")
def tiny_gemma_dir(tmp_path_factory, lm):
    d = tmp_path_factory.mktemp("gemma-tiny")
    torch.manual_seed(0)
    cfg = GemmaConfig(vocab_size=lm.tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=256)
    GemmaForCausalLM(cfg).save_pretrained(d)
    lm.tokenizer.save_pretrained(d)
    (d / "chat_template.jinja").unlink(missing_ok=True)  # a base model's tokenizer, without a chat template
    return d


def test_local_folder_serves_its_own_profiles(tiny_gemma_dir, tmp_path):
    sae = save_sae(build_sae("standard", 64, 128), tmp_path / "sae", hookpoint="blocks.1.hook_resid_post")
    pdir = tmp_path / "profiles"
    pdir.mkdir()
    write_profile(pdir, "tiny_sae_only", sae, hookpoint="blocks.1.hook_resid_post")
    (pdir / "tiny_sae_only.yaml").write_text((pdir / "tiny_sae_only.yaml").read_text().replace(
        "model: gemma-3-270m", f"model: {tiny_gemma_dir.name}"))
    model = load_model(str(tiny_gemma_dir), device="cpu")
    assert model.name == str(tiny_gemma_dir) and model.n_layers == 3
    assert "tiny_sae_only" in load_profiles([pdir], model.name)
    settings = Settings(model=str(tiny_gemma_dir), profiles=[pdir])
    with LiveServer(settings, model, None) as s:
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 3, "temperature": 0,
                                                        "profile": "tiny_sae_only"})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 3
        # a model without a chat template (and no --chat-template) refuses chat clearly
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "no_chat_template", r.text
        assert "--chat-template" in r.json()["error"]["message"]


def test_unknown_and_unreachable_models_and_saes_fail_clearly(monkeypatch, tmp_path):
    with pytest.raises(ModelLoadError, match="unknown model"):
        resolve("not a model", tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SAELoadError, match="cannot load SAE 'gemma-2b-res-jb:blocks.12.hook_resid_post'"):
        load_sae("gemma-2b-res-jb:blocks.12.hook_resid_post")
    with pytest.raises(SAELoadError, match="not found"):
        load_sae(str(tmp_path / "nothing"))


def test_embedded_tokenizer_starts_with_bos_and_a_cache_without_it_is_fixed(lm, tmp_path):
    """The GGUF's tokenizer, as transformers 5 converts it, does not add <bos> and has no chat template,
    and <end_of_turn> does not end generation; the cached folder must have all three."""
    from transformers import AutoTokenizer

    from models.loading import DEFAULT_MODEL, prepare_embedded

    assert lm.tokenizer("Hello world").input_ids[0] == lm.tokenizer.bos_token_id
    old = tmp_path / "models" / DEFAULT_MODEL  # a cache converted before the fix: same files, no <bos>
    old.mkdir(parents=True)
    (old / "config.json").write_text(lm.config.to_json_string())
    tok = AutoTokenizer.from_pretrained(lm.path)
    tok.add_bos_token = False
    tok.chat_template = None
    tok.save_pretrained(old)
    (old / "chat_template.jinja").unlink(missing_ok=True)
    assert AutoTokenizer.from_pretrained(old)("Hello world").input_ids[0] != tok.bos_token_id
    assert prepare_embedded(tmp_path) == old
    fixed = AutoTokenizer.from_pretrained(old)
    assert fixed("Hello world").input_ids == [tok.bos_token_id] + tok("Hello world", add_special_tokens=False).input_ids
    chat = fixed.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert load_info(str(old)).eos_ids == {tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")}
