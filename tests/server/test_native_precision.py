"""The default precision is the hardware's native one, and the profiles forget in bf16 as in fp32."""

import httpx
import torch

from models.loading import cpu_has_bf16, pick_dtype
from server.live import LiveServer
from server.settings import Settings


def test_the_default_dtype_is_the_hardwares_native_precision():
    assert pick_dtype(None, torch.device("cpu")) == (torch.bfloat16 if cpu_has_bf16() else torch.float32)
    assert pick_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert pick_dtype("float32", torch.device("cuda")) == torch.float32


def test_a_bf16_server_forgets_and_keeps_what_fp32_does():
    def complete(url, prompt, profile):
        r = httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 8, "temperature": 0,
                                                       "profile": profile, "logprobs": 1}, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]

    hp = "Harry Potter and his friends study magic at the school called"
    generic = "The Statue of Liberty is in the city of New"
    with LiveServer(Settings(dtype="bfloat16", max_model_len=256)) as s:  # the server loads the model in bf16
        assert s.app.state.serving.model.dtype == torch.bfloat16
        assert "Hogwarts" in complete(s.url, hp, "baseline")["text"]
        forgot = complete(s.url, hp, "hp_unlearn")
        assert "Hogwarts" not in forgot["text"] and "<" not in forgot["text"]
        assert "York" in complete(s.url, generic, "hp_unlearn")["text"]
        assert complete(s.url, generic, "hp_unlearn")["text"] == complete(s.url, generic, "baseline")["text"]
