"""LoRA adapter profiles over HTTP: on the built-in engine (ablation/adapters.py) an adapter's logprobs equal
peft's own model with the adapter merged into the weights (`merge_and_unload`); the vLLM engine (its own
per-request LoRA) gives the same greedy tokens; adapter, SAE and plain rows mixed in one batch equal each
row alone on both engines; an adapter that does not fit is refused with a clear error at start-up."""

import json

import httpx
import pytest
import torch

from ablation.adapters import AdapterError, load_adapter
from ablation.spec import ProfileError, load_profile
from models.loading import load_info, load_model
from server.app import lora_options, profile_table
from server.engine.base import LoraOptions
from server.errors import CLIError
from server.settings import Settings, check_serve
from tests.helpers import staggered_texts

PROMPTS = ["Harry Potter and Ron Weasley took the train to", "The capital of France is",
           "Water boils at a temperature of"]
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """A random rank-4 LoRA on layers 3-5 made and saved by peft; -> (its folder, peft's merged model)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, layers_to_transform=[3, 4, 5],
                     init_lora_weights=False)
    peft_model = get_peft_model(load_model("gemma-3-270m", device="cpu", dtype="float32").model, cfg)  # a copy
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)  # a change that moves answers without wrecking the model
    path = tmp_path_factory.mktemp("lora") / "rand"
    peft_model.save_pretrained(path)
    merged = peft_model.merge_and_unload().eval()
    yield path, merged
    del merged


def add(url, name, **spec):
    r = httpx.post(url + "/v1/profiles", json={"name": name, "model": "gemma-3-270m", **spec}, timeout=300)
    assert r.status_code == 201, r.text


def complete(url, prompt, profile, **kw):
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "profile": profile, **kw}
    r = httpx.post(url + "/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def test_adapter_logprobs_equal_the_merged_model(server, lm, lora):
    path, merged = lora
    add(server.url, "t_lora", adapter=str(path))
    tok = lm.tokenizer
    worst, changed = 0.0, 0
    for prompt in PROMPTS:
        got = complete(server.url, prompt, "t_lora", echo=True, max_tokens=1, logprobs=0)["logprobs"]
        ids = [tok.bos_token_id] + tok(prompt, add_special_tokens=False).input_ids
        with torch.no_grad():
            logits = merged(torch.tensor([ids])).logits[0].float()
        want = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist()
        served = got["token_logprobs"][1:len(ids) - 1]  # the echoed prompt (its first token has none), then one more
        assert len(served) == len(want) - 1
        worst = max([worst] + [abs(a - b) for a, b in zip(served, want[1:])])
        changed += complete(server.url, prompt, "t_lora")["text"] != complete(server.url, prompt, "baseline")["text"]
    print(f"max |Δlogprob| served adapter vs peft merge_and_unload = {worst:.1e}; {changed}/{len(PROMPTS)} answers changed")
    assert worst < 1e-3 and changed >= 1
    # inline, by a served adapter's folder name; never a folder the server does not already serve
    assert complete(server.url, PROMPTS[0], {"adapter": path.name})["text"] == complete(server.url, PROMPTS[0], "t_lora")["text"]
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "profile": {"adapter": str(path.parent)}})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_adapter", r.text


@pytest.fixture(scope="module")
def adapter_servers(server, vllm_server, lora, test_profiles_dir):
    """Both engines with the adapter profiles added at run time: the adapter alone, and with an SAE edit."""
    path, _ = lora
    spec = load_profile(test_profiles_dir / "t_sequence.yaml").model_dump(mode="json")
    for s in (server, vllm_server):
        add(s.url, "t_lora_seq", adapter=str(path), interventions=spec["interventions"])
        add(s.url, "t_lora2", adapter=str(path))
        cards = {c["name"]: c for c in httpx.get(s.url + "/v1/profiles", timeout=60).json()["data"]}
        assert cards["t_lora2"]["adapter"] == str(path) and cards["hp_unlearn"]["adapter"] is None
    return server, vllm_server


def test_vllm_lora_gives_the_builtin_engines_greedy_tokens(adapter_servers):
    ours, theirs = adapter_servers
    worst = 0.0
    for profile in ("t_lora2", "t_lora_seq"):
        for prompt in PROMPTS:
            a, b = (complete(s.url, prompt, profile, logprobs=0, max_tokens=10) for s in (ours, theirs))
            assert b["logprobs"]["tokens"] == a["logprobs"]["tokens"], (profile, prompt, a["text"], b["text"])
            worst = max([worst] + [abs(x - y) for x, y in zip(a["logprobs"]["token_logprobs"],
                                                              b["logprobs"]["token_logprobs"])])
    print(f"adapter profiles: max |Δlogprob| builtin vs vLLM LoRA = {worst:.1e}")
    assert worst < 2e-3


@pytest.mark.parametrize("engine", ["builtin", "vllm"])
def test_adapter_sae_and_plain_rows_in_one_batch_equal_solo(adapter_servers, engine):
    server = adapter_servers[engine == "vllm"]
    profiles = ["baseline", "t_lora2", "hp_unlearn", "t_lora_seq", "t_sequence", "t_lora2"]
    jobs = [(p, PROMPTS[j % len(PROMPTS)]) for j, p in enumerate(profiles * 2)]
    solo = {job: complete(server.url, job[1], job[0])["text"] for job in set(jobs)}

    for job, text in zip(jobs, staggered_texts(server.url, jobs, 8)):
        assert text == solo[job], job
    both = [complete(server.url, p, "t_lora_seq")["text"] for p in PROMPTS]  # the adapter and the SAE edit apply
    assert both != [complete(server.url, p, "t_lora2")["text"] for p in PROMPTS]
    assert both != [complete(server.url, p, "t_sequence")["text"] for p in PROMPTS]


def test_an_adapter_that_does_not_fit_is_refused_at_start_up(lm, lora, tmp_path, vllm_server):
    path, _ = lora
    cfg = json.loads((path / "adapter_config.json").read_text())

    def variant(name, **changes):
        d = tmp_path / name
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps({**cfg, **changes}))
        (d / "adapter_model.safetensors").write_bytes((path / "adapter_model.safetensors").read_bytes())
        return d

    with pytest.raises(AdapterError, match="rank 4 is over the limit 2"):
        load_adapter(path, max_rank=2)
    with pytest.raises(AdapterError, match="use_dora not supported"):
        load_adapter(variant("dora", use_dora=True))
    with pytest.raises(AdapterError, match="adapter_model.safetensors not found"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "adapter_config.json").write_text(json.dumps(cfg))
        load_adapter(tmp_path / "empty")

    # an adapter for another model: its module shapes are not the served model's
    from peft import LoraConfig, get_peft_model
    small = torch.nn.Module()
    small.model = torch.nn.Module()
    small.model.layers = torch.nn.ModuleList([torch.nn.Module()])
    small.model.layers[0].self_attn = torch.nn.Module()
    small.model.layers[0].self_attn.q_proj = torch.nn.Linear(32, 32)
    get_peft_model(small, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "other")
    pdir = tmp_path / "profiles"
    pdir.mkdir()
    (pdir / "other.yaml").write_text("name: t_other\nadapter: ../other\n")
    with pytest.raises(AdapterError, match=r"model.layers.0.self_attn.q_proj is \[32, 32\] but the model's is"):
        profile_table(Settings(profiles=[pdir]), lm)
    (pdir / "other.yaml").write_text("name: t_other\nadapter: ../nowhere\n")
    with pytest.raises(ProfileError, match="adapter directory .*nowhere not found"):
        profile_table(Settings(profiles=[pdir]), lm)

    # the vLLM engine's checks (its server process holds no weights: the shapes come from the meta device)
    info = load_info("gemma-3-270m")
    (pdir / "other.yaml").write_text("name: t_other\nadapter: ../other\n")
    with pytest.raises(AdapterError, match=r"q_proj is \[32, 32\] but the model's is"):
        profile_table(Settings(profiles=[pdir], engine="vllm"), info)
    (pdir / "other.yaml").write_text(f"name: t_lora\nadapter: {path}\n")
    with pytest.raises(AdapterError, match="rank 4 is over the limit 2"):
        profile_table(Settings(profiles=[pdir], engine="vllm", max_lora_rank=2), info)
    specs = profile_table(Settings(profiles=[pdir], engine="vllm"), info).specs
    assert "t_lora" in specs
    # vLLM's limits default to what the served adapters need: their number, their largest rank (4 -> vLLM's 8)
    assert lora_options(Settings(), specs) == LoraOptions(True, 2, 8)  # a slot for it and a free one
    assert lora_options(Settings(max_loras=3, max_lora_rank=32), specs) == LoraOptions(True, 3, 32)
    assert lora_options(Settings(enable_lora=True), {}) == LoraOptions(True, 4, 16)
    with pytest.raises(ValueError, match=r"serving 1 adapter\(s\) needs --max-loras 2 or more \(one LoRA slot stays free"):
        profile_table(Settings(profiles=[pdir], engine="vllm", max_loras=1), info)
    with pytest.raises(CLIError, match="--max-lora-rank one of 1, 8, 16"):
        check_serve(Settings(engine="vllm", max_lora_rank=4), False)
    # a running vLLM server: an adapter over its --max-lora-rank is a 400 naming the limit
    big = tmp_path / "big"
    get_peft_model(load_model("gemma-3-270m", device="cpu", dtype="float32").model,
                   LoraConfig(r=16, target_modules=["q_proj"], layers_to_transform=[0])).save_pretrained(big)
    r = httpx.post(vllm_server.url + "/v1/profiles", json={"name": "t_big", "adapter": str(big)}, timeout=300)
    assert r.status_code == 400 and "rank 16 is over the limit 8" in r.json()["error"]["message"], r.text
