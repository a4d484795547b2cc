"""The second embedded model, SmolLM2-135M-Instruct (Llama architecture, a chat assistant), through the
same loading, hooks and servers as Gemma: chat with its own template on both engines, every edit mode
greedy-equal between the engines, and mixed-profile rows equal to solo rows. Its vLLM server runs two
data-parallel engines (`--data-parallel-size 2`): the hooks, profiles and trigger audit work in both."""

import asyncio
import concurrent.futures as cf
import json

import httpx
import pytest

from ablation.spec import default_profiles_dir
from evals.cli import run_reports
from models.loading import CHAT_MODEL, hooked_transformer
from server.live import LiveServer, ServerProcess
from server.settings import Settings
from tests.helpers import TEST_PROFILES, build_sae, save_sae, transformer_lens_gap, write_profile

HOOKPOINT = "blocks.15.hook_resid_post"
MODES = ["t_zero", "t_keep_error", "t_clamp", "t_sequence", "t_seq_active", "t_gen_zero", "t_steer"]
QUESTIONS = ["Who wrote the Harry Potter books?", "What is the name of Harry Potter's school?",
             "What is the capital of Italy?"]
LOGPROB_ATOL = 2e-3  # as for Gemma (tests/server/test_vllm_engine.py)


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """A built-in server and a vLLM server for the chat model: its shipped profiles, and test profiles on a
    random SAE."""
    d = tmp_path_factory.mktemp("smol")
    sae = save_sae(build_sae("standard", 576, seed=1), d / "sae", hookpoint=HOOKPOINT)
    pdir = d / "profiles"
    pdir.mkdir()
    for name in MODES:
        write_profile(pdir, name, sae, hookpoint=HOOKPOINT, model=CHAT_MODEL, **TEST_PROFILES[name])
    log = open(d / "vllm.log", "w")
    settings = Settings(model=CHAT_MODEL, profiles=[default_profiles_dir(), pdir], max_model_len=512)
    args = ["--engine", "vllm", "--model", CHAT_MODEL, "--profiles", str(default_profiles_dir()),
            "--profiles", str(pdir), "--max-model-len", "512",
            "--data-parallel-size", "2"]
    try:
        with LiveServer(settings) as builtin, \
                ServerProcess(*args, env={"VLLM_CPU_KVCACHE_SPACE": "1"}, log=log) as vllm:
            vllm.log_path = log.name
            yield builtin, vllm
    except RuntimeError as e:
        raise RuntimeError(f"{e}; the vLLM log ends:\n{open(log.name).read()[-3000:]}") from None
    finally:
        log.close()


def chat(url: str, question: str, profile: str, **kw) -> dict:
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": 16, "temperature": 0,
            "logprobs": True, "profile": profile, **kw}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def test_the_assistant_answers_with_its_own_template(smol):
    builtin, _ = smol
    answer = chat(builtin.url, QUESTIONS[0], "baseline", max_tokens=30)
    assert "Rowling" in answer["message"]["content"]
    info = httpx.get(builtin.url + "/tokenizer_info").json()
    assert "<|im_start|>" in info["chat_template"]


def test_every_edit_mode_is_greedy_equal_on_both_engines(smol):
    """Every (profile, question) sent to both servers at once: each engine batches them."""
    builtin, vllm = smol
    jobs = [(q, p) for p in ["baseline", *MODES] for q in QUESTIONS[:2]]
    with cf.ThreadPoolExecutor(2 * len(jobs)) as pool:
        ours, theirs = ([pool.submit(chat, srv.url, q, p) for q, p in jobs] for srv in (builtin, vllm))
        ours, theirs = [f.result() for f in ours], [f.result() for f in theirs]
    worst, changed, base = 0.0, set(), {}
    tokens = lambda c: [t["token"] for t in c["logprobs"]["content"]]  # noqa: E731
    for (q, profile), a, b in zip(jobs, ours, theirs):
        assert tokens(b) == tokens(a), (profile, q, a["message"], b["message"])
        assert b.get("unlearning") == a.get("unlearning"), (profile, q)  # the audit, from either DP engine
        worst = max([worst] + [abs(x["logprob"] - y["logprob"])
                               for x, y in zip(a["logprobs"]["content"], b["logprobs"]["content"])])
        base.setdefault(q, a["message"])  # baseline comes first
        if a["message"] != base[q]:
            changed.add(profile)
    print(f"{CHAT_MODEL}: max|Δlogprob| builtin vs vllm = {worst:.1e}; modes that changed an answer: "
          f"{sorted(changed)}")
    assert worst < LOGPROB_ATOL and len(changed) >= 3  # the edits act on this architecture
    assert sum((c.get("unlearning") or {}).get("triggered", False) for c in theirs) >= 4  # rows that fired
    started = open(vllm.log_path).read()
    assert "EngineCore_DP1" in started and started.count("Injected <class 'server.engine.vllm_worker") >= 2
    cores = {ln.split("core ids=")[1].strip() for ln in started.splitlines() if "local_rank=0, core ids=" in ln}
    assert len(cores) == 2, cores  # each engine on its own cores (vLLM alone would put both on the same)


def test_logprobs_match_transformer_lens_for_every_mode(smol):
    """The built-in engine's logprobs on this architecture equal TransformerLens's Llama (the reference SAE
    training reads) run with the same hook, under every edit mode; the vLLM engine's equal the built-in
    one's (above)."""
    engine = smol[0].app.state.serving.engine
    tl = hooked_transformer(engine.lm)
    for profile in ["baseline", *MODES]:
        diff = max(transformer_lens_gap(engine, tl, engine.table, q, profile) for q in QUESTIONS[:2])
        print(f"{CHAT_MODEL} {profile:14s} max|Δlogprob| vs TransformerLens = {diff:.2e}")
        assert diff < LOGPROB_ATOL, profile


@pytest.mark.parametrize("engine", [0, 1])
def test_mixed_profile_rows_equal_solo_rows(smol, engine):
    url = smol[engine].url
    jobs = [(q, p) for q in QUESTIONS[1:] for p in ("baseline", "t_clamp", "t_sequence")]
    solo = [chat(url, q, p)["message"]["content"] for q, p in jobs]
    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        mixed = list(pool.map(lambda job: chat(url, *job)["message"]["content"], jobs))
    assert mixed == solo


def test_tokenize_renders_messages_as_the_chat_route_does(smol):
    """/tokenize with messages (vLLM's chat form) gives the prompt a chat completion is served with; the
    same ids sent back as a completion prompt get the same greedy reply."""
    for srv in smol:
        user = [{"role": "user", "content": QUESTIONS[2]}]
        ids = httpx.post(srv.url + "/tokenize", json={"messages": user}).json()["tokens"]
        r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": user, "max_tokens": 8, "temperature": 0},
                       timeout=300).json()
        assert r["usage"]["prompt_tokens"] == len(ids)
        again = httpx.post(srv.url + "/v1/completions", json={"prompt": ids, "max_tokens": 8, "temperature": 0},
                           timeout=300).json()
        assert again["choices"][0]["text"] == r["choices"][0]["message"]["content"]
        bad = httpx.post(srv.url + "/tokenize", json={"prompt": "x", "messages": user})
        assert bad.status_code == 400 and "either prompt or messages" in bad.json()["error"]["message"]


def test_eval_asks_a_chat_model_through_chat_completions(smol, tmp_path):
    """`obliviate eval --chat`: the familiarity report's answers are the assistant's replies, and its fluency
    is the logprob of the reply after the rendered question."""
    url = smol[0].url
    res = asyncio.run(run_reports(url, ["t_zero"], tmp_path, report="familiarity", topic="hp_chat", limit=2,
                                  chat=True))["familiarity"]
    rec = res["records"]["hp"]["baseline"][0]
    assert res["settings"]["chat"] and res["settings"]["sampling"]["max_tokens"] == 32
    reply = chat(url, rec["prompt"], "baseline", max_tokens=32)["message"]["content"]
    assert rec["completion"] == reply and rec["answer_prob"] is None
    assert -3 < rec["fluency"] < 0  # the model's own greedy reply is likely under it
    assert set(res["records"]) == {"hp", "generic", "nearby"}
    assert any(r["correct"] for r in res["records"]["hp"]["baseline"]), json.dumps(res["records"]["hp"])


def test_attacks_and_trivia_ask_a_chat_model_in_chat(smol, tmp_path):
    """`obliviate eval attacks --chat --topic hp_chat`: each attacked question is a user's message, its controls
    are the chat topic's own, the gcg family (searched on completion prompts) is left out, and the trigger
    audit comes from the chat route; the likelihood family and the trivia report score each answer as the
    assistant's reply."""
    url = smol[0].url
    res = asyncio.run(run_reports(url, ["baseline", "hp_unlearn"], tmp_path, report="attacks", topic="hp_chat",
                                  split="dev", limit=1, chat=True))["attacks"]
    assert res["families"] == ["prefix", "language", "spelling", "relearning", "long_context", "likelihood"]
    recs = res["records"]["hp_unlearn"]
    assert {r["id"][:3] for r in recs if r["topic"] == "control" and r["family"] != "prefix"} == {"cca"}
    lang = next(r for r in recs if r["topic"] == "hp" and r["family"] == "language")
    reply = chat(url, lang["prompt"], "hp_unlearn", max_tokens=32)
    assert lang["completion"] == reply["message"]["content"] and lang["triggered"] is True  # "Harry Potter" in it
    assert not any(r["triggered"] for r in recs if r["topic"] == "control")
    assert res["summary"]["likelihood"]["hp"]["baseline"]["n"] == 1
    trivia = asyncio.run(run_reports(url, ["baseline", "hp_unlearn"], tmp_path, report="trivia", topic="hp_chat",
                                     limit=2, chat=True))["trivia"]
    assert "assistant's reply" in (tmp_path / "trivia.md").read_text()
    hp, generic = ({p: trivia[k][p]["continuation_records"] for p in ("baseline", "hp_unlearn")} for k in ("hp", "generic"))
    assert hp["hp_unlearn"][0]["true"] < hp["baseline"][0]["true"] - 0.05, hp  # "Hogwarts", after a question naming HP
    for a, b in zip(generic["baseline"], generic["hp_unlearn"]):  # nothing in them trips the edit
        assert (b["true"], b["false"]) == pytest.approx((a["true"], a["false"]), abs=1e-4), generic


def test_the_shipped_hp_unlearn_forgets_in_chat_on_both_engines(smol):
    """The chat model's own `hp_unlearn` (its SAE, chosen by `obliviate unlearn --chat`): the author is gone
    from the reply, the trigger audit says why, and a question about something else is answered as before
    (its features may still fire on a generated token: " Paris" trips one, and the zeroing there changes nothing)."""
    for srv in smol:
        base, gone = (chat(srv.url, QUESTIONS[0], p, max_tokens=24) for p in ("baseline", "hp_unlearn"))
        assert "Rowling" in base["message"]["content"] and "Rowling" not in gone["message"]["content"], gone
        assert gone["unlearning"]["triggered"]
        other = [chat(srv.url, "What is the capital of France?", p, max_tokens=24) for p in ("baseline", "hp_unlearn")]
        assert other[0]["message"] == other[1]["message"] and "Paris" in other[0]["message"]["content"]
