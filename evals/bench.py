"""`obliviate bench`: serving speed over HTTP, as users get it, with ratios measured in one run.

For each engine it starts `obliviate serve` in a subprocess (or uses --server URL), then runs a fixed
workload (the prompts below, greedy or --temperature/--top-p, --tokens new tokens each) at each concurrency for each profile
(`mix` cycles request by request through --mix, by default the other profiles). In the same run, with no server running, it
times plain HF `generate` at batch --hf-batch on the same prompts: the reference the ratios use.
It also sends a 4-token request while a 200-token one runs and records how far the long one got.
Writes bench.json, bench.md and bench.png under --out.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import httpx
from tqdm import tqdm

from evals.charts import grouped_bars
from server.cli import comma_list
from server.errors import CLIError

PROMPTS = [
    "The history of the Roman Empire", "Harry Potter walked into the Great Hall and",
    "Photosynthesis is the process by which", "In 1969 the first people to land on the Moon",
    "The recipe calls for two cups of flour,", "Hermione opened the book about",
    "The stock market fell sharply after", "A good night's sleep helps",
    "The largest ocean on Earth is", "Quidditch is played with",
    "Volcanoes form when", "The first computers were built",
    "My favourite way to spend a Sunday is", "The headmaster of Hogwarts",
    "Bees make honey by", "The theory of relativity says",
]


NO_AUDIT = "-noaudit"
REPLICAS = " x"  # "builtin x2": the engine as 2 Ray Serve replicas (--replicas)
PLAIN = ("vllm-plain", "vllm-defaults")  # vLLM's own server: in our dtype and eager mode / as its defaults start it
ENGINES = ("builtin", "vllm", *PLAIN, "builtin" + NO_AUDIT, "vllm" + NO_AUDIT)


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="serving speed over HTTP: engines x concurrency x profiles, with ratios")
    p.add_argument("--server", help="benchmark a running server instead of starting one")
    p.add_argument("--model", default="gemma-3-270m", help="the model name requests carry")
    p.add_argument("--engines", type=comma_list(), default=["builtin"], help="comma-separated: builtin, vllm, vllm-plain "
                   "(vLLM's own OpenAI server, no hooks, in the same dtype and eager mode), vllm-defaults (vLLM's own "
                   "server as its defaults start it: its dtype, compiled), builtin-noaudit, vllm-noaudit (without the trigger audit)")
    p.add_argument("--concurrency", type=comma_list(int), default=[1, 8, 32])
    p.add_argument("--profiles", type=comma_list(),
                   default=["baseline", "hp_unlearn", "sae_only", "mix"])
    p.add_argument("--mix", type=comma_list(), help="the profiles the `mix` row cycles through, request by request "
                   "(default: the other --profiles)")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="the workload's sampling (default greedy)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--requests", type=int, default=2, help="requests per client (at least 4 in all)")
    p.add_argument("--hf-batch", type=int, default=8, help="plain HF generate at this batch (0: skip)")
    p.add_argument("--dtype", help="model dtype for every engine but vllm-defaults, and HF generate "
                   "(default: the server's own rule, the hardware's native precision)")
    p.add_argument("--replicas", type=int, default=0, help="also serve each engine as N Ray Serve replicas of "
                   "1/N of the CPU threads each (`obliviate serve --replicas N --replica-threads`): the scaling ratio "
                   "'ENGINE xN / ENGINE' against one process with every thread")
    p.add_argument("--serve-args", default="", help="extra arguments for `obliviate serve`")
    p.add_argument("--out", type=Path, default=Path("reports/bench"))
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    engines, levels, profiles = args.engines, args.concurrency, args.profiles
    if bad := [e for e in engines if e not in ENGINES]:
        raise CLIError(f"unknown engine {bad[0]!r}: use {', '.join(ENGINES)}")
    if not levels or min(levels) < 1 or args.tokens < 1 or args.requests < 1:
        raise CLIError("--concurrency, --tokens and --requests must be ≥ 1")
    if not (0 <= args.temperature <= 2 and 0 < args.top_p <= 1):
        raise CLIError("--temperature must be in [0, 2] and --top-p in (0, 1], as the API takes them")
    if args.replicas and (args.replicas < 2 or args.server or any(e in PLAIN for e in engines)):
        raise CLIError("--replicas N needs N ≥ 2 and engines started here (not --server, vllm-plain or vllm-defaults)")
    if args.replicas:
        engines = [e for engine in engines for e in (engine, f"{engine}{REPLICAS}{args.replicas}")]
    results = {"config": {k: str(v) for k, v in vars(args).items() if k != "func"}, "runs": [], "machine": _machine(),
               "dtype": _dtype(args)}
    for engine in ([args.server] if args.server else engines):
        with (nullcontext(args.server) if args.server else _server(engine, args)) as srv:
            url = srv if args.server else srv.url
            if REPLICAS in engine:
                _wait_for_replicas(url, args.replicas)
            name = "server" if args.server else engine
            plist = ["baseline"] if engine in PLAIN else profiles
            results["runs"] += asyncio.run(_workload(url, name, levels, plist, args))
            if name == "builtin" or args.server:
                results["short_during_long"] = asyncio.run(_short_during_long(url, args.model))
    if args.hf_batch:
        results["hf_generate"] = _hf_generate(args.model, args.hf_batch, args.tokens, _dtype(args))
    results["ratios"] = ratios(results)
    _write(results, args.out)
    return 0


def _dtype(args) -> str:
    # deferred: the command line answers --help and bad arguments before torch and the model stack load
    from models.loading import dtype_name

    return dtype_name(args.dtype)


def _server(engine: str, args):
    """A started server for `engine` (`obliviate serve`, or vLLM's own OpenAI server for PLAIN), all in
    the same dtype but vllm-defaults (vLLM's own choice)."""
    # deferred: the command line answers --help and bad arguments before torch and the model stack load
    from models.loading import default_cache_dir, prepare_embedded
    from server.live import ServerProcess

    if engine in PLAIN:
        path = prepare_embedded(default_cache_dir())
        ours = ["--enforce-eager", "--dtype", _dtype(args)] if engine == "vllm-plain" else []
        return ServerProcess("--model", str(path), "--served-model-name", args.model, *ours,
                             "--max-model-len", "2048", "--disable-log-stats",
                             cmd=[sys.executable, "-m", "vllm.entrypoints.openai.api_server"],
                             env={"VLLM_CPU_KVCACHE_SPACE": "4"})  # GiB, as the vllm engine takes
    engine, _, n = engine.partition(REPLICAS)
    ray = ["--replicas", n, "--replica-threads", str(max(1, (os.cpu_count() or 1) // int(n)))] if n else []
    audit = ["--no-trigger-audit"] if engine.endswith(NO_AUDIT) else []
    return ServerProcess("--engine", engine.removesuffix(NO_AUDIT), "--dtype", _dtype(args), *audit, *ray,
                         *args.serve_args.split(), env={"RAY_USAGE_STATS_ENABLED": "0"} if ray else None)


def _wait_for_replicas(url: str, n: int, timeout: float = 600) -> None:
    """Until n replicas have answered (Serve's proxy answers once the first is up)."""
    seen, deadline = set(), time.time() + timeout
    while len(seen) < n:
        if time.time() > deadline:
            raise CLIError(f"only {len(seen)} of {n} replicas answered in {timeout:.0f} s")
        seen.add(httpx.get(url + "/health", timeout=30).headers.get("obliviate-replica"))
        seen.discard(None)
        time.sleep(0.2)


async def _complete(http: httpx.AsyncClient, model: str, prompt: str, profile: str, tokens: int,
                    temperature: float = 0.0, top_p: float = 1.0) -> tuple[float, int]:
    # ignore_eos (vLLM's too): every request of the workload generates exactly `tokens`
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "ignore_eos": True, "temperature": temperature,
            "top_p": top_p}
    if profile != "baseline":
        body["profile"] = profile
    t0 = time.perf_counter()
    r = await http.post("/v1/completions", json=body)
    r.raise_for_status()
    return time.perf_counter() - t0, r.json()["usage"]["completion_tokens"]


async def _workload(url: str, engine: str, levels: list[int], profiles: list[str], args) -> list[dict]:
    mix = args.mix or [p for p in profiles if p != "mix"] or ["baseline"]
    out = []
    bar = tqdm(total=sum(max(4, c * args.requests) for c in levels) * len(profiles), desc=f"bench {engine}",
               unit="req")
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        for c in levels:
            # warm-up at this batch size, every profile: the first steps at a new shape are slower (a GPU
            # ran them 7x slower), which would count against whichever profile came first
            await asyncio.gather(*(_complete(http, args.model, PROMPTS[i % len(PROMPTS)], mix[i % len(mix)], 4)
                                   for i in range(max(c, len(mix)))))
            n = max(4, c * args.requests)
            for profile in profiles:
                jobs = [(PROMPTS[i % len(PROMPTS)], mix[i % len(mix)] if profile == "mix" else profile)
                        for i in range(n)]
                queue = list(reversed(jobs))
                lat, toks = [], 0

                async def client():
                    nonlocal toks
                    while queue:
                        prompt, prof = queue.pop()
                        dt, k = await _complete(http, args.model, prompt, prof, args.tokens, args.temperature,
                                                args.top_p)
                        lat.append(dt)
                        toks += k
                        bar.update()

                t0 = time.perf_counter()
                await asyncio.gather(*(client() for _ in range(c)))
                wall = time.perf_counter() - t0
                row = {"engine": engine, "concurrency": c, "profile": profile, "requests": n, "tokens": toks,
                       "seconds": round(wall, 2), "tok_s": round(toks / wall, 2),
                       "p50_s": round(statistics.median(lat), 2), "p95_s": round(_pct(lat, 0.95), 2)}
                tqdm.write(json.dumps(row), file=sys.stderr)
                out.append(row)
    bar.close()
    return out


async def _short_during_long(url: str, model: str) -> dict:
    """How many tokens a 200-token request had when a 4-token one sent after it finished."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        got = {"long": 0}
        started = asyncio.Event()

        async def long():
            body = {"model": model, "prompt": "Once upon a time", "max_tokens": 200, "temperature": 1.0,
                    "seed": 3, "stream": True, "ignore_eos": True}
            async with http.stream("POST", "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                        got["long"] += 1
                        if got["long"] >= 2:
                            started.set()

        async def short():
            await started.wait()
            await _complete(http, model, "The capital of France is", "baseline", 4)
            return got["long"]

        _, at = await asyncio.gather(long(), short())
    return {"long_chunks_when_short_done": at, "long_chunks_total": got["long"]}


def _hf_generate(model: str, batch: int, tokens: int, dtype: str) -> dict:
    """Plain transformers generate on the same prompts, in this process (no server running)."""
    # deferred: the command line answers --help and bad arguments before torch and the model stack load
    import torch

    from models.loading import load_model

    lm = load_model(model, dtype=dtype)
    tok = lm.tokenizer
    tok.padding_side = "left"
    rounds = [PROMPTS[i:i + batch] for i in range(0, len(PROMPTS), batch)]
    with torch.inference_mode():
        enc = tok(rounds[0], return_tensors="pt", padding=True)
        lm.model.generate(**enc, max_new_tokens=4, do_sample=False)  # warm-up
        n, t0 = 0, time.perf_counter()
        for prompts in rounds:
            enc = tok(prompts, return_tensors="pt", padding=True)
            out = lm.model.generate(**enc, max_new_tokens=tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            new = out[:, enc.input_ids.shape[1]:]
            n += int((new != tok.pad_token_id).sum())
        wall = time.perf_counter() - t0
    row = {"batch": batch, "tokens": n, "seconds": round(wall, 2), "tok_s": round(n / wall, 2)}
    print(json.dumps({"hf_generate": row}), file=sys.stderr)
    return row


def ratios(results: dict) -> dict:
    """Every ratio the issues ask for that this run can give."""
    tps = {(r["engine"], r["concurrency"], r["profile"]): r["tok_s"] for r in results["runs"]}
    out = {}
    top = max((c for _, c, _ in tps), default=None)
    hf = results.get("hf_generate", {}).get("tok_s")
    for (engine, c, profile), v in tps.items():
        base = tps.get((engine, c, "baseline"))
        if profile != "baseline" and base:
            out[f"{engine} c{c} {profile} / baseline"] = round(v / base, 3)
        if (plain := tps.get((engine + NO_AUDIT, c, profile))) is not None:  # what the trigger audit costs
            out[f"{engine} c{c} {profile} / {engine}{NO_AUDIT}"] = round(v / plain, 3)
        if hf and profile == "baseline" and c == top:
            out[f"{engine} c{c} baseline / HF generate b{results['hf_generate']['batch']}"] = round(v / hf, 3)
        one, _, n = engine.partition(REPLICAS)
        if n and (single := tps.get((one, c, profile))):
            out[f"{engine} / {one} c{c} {profile}"] = round(v / single, 3)
    for engine in ("vllm", "builtin"):
        for ref in [r for r in ("builtin", *PLAIN) if r != engine]:
            for c in sorted({c for _, c, _ in tps}):
                for profile in ("baseline", "mix", "sae_only", "hp_unlearn"):
                    a, b = tps.get((engine, c, profile)), tps.get((ref, c, "baseline"))
                    if a and b and (ref in PLAIN or profile == "baseline"):
                        out[f"{engine} c{c} {profile} / {ref} c{c} baseline"] = round(a / b, 3)
    return out


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def _machine() -> str:
    # deferred: the command line answers --help and bad arguments before torch and the model stack load
    import platform

    import torch

    return f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}"


def _write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2))
    lines = [f"# obliviate bench ({results['machine']})", "",
             "| engine | concurrency | profile | requests | tokens | tok/s | p50 s | p95 s |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['engine']} | {r['concurrency']} | {r['profile']} | {r['requests']} | {r['tokens']} | "
              f"{r['tok_s']} | {r['p50_s']} | {r['p95_s']} |" for r in results["runs"]]
    if hf := results.get("hf_generate"):
        lines += ["", f"Plain HF generate, batch {hf['batch']}: {hf['tok_s']} tok/s ({hf['tokens']} tokens)."]
    if sl := results.get("short_during_long"):
        lines += ["", f"A 4-token request sent while a 200-token one streamed finished when the long one had "
                      f"{sl['long_chunks_when_short_done']} of {sl['long_chunks_total']} chunks."]
    lines += ["", "| ratio | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in results["ratios"].items()]
    (out / "bench.md").write_text("\n".join(lines) + "\n")
    groups = sorted({f"{r['engine']} c{r['concurrency']}" for r in results["runs"]},
                    key=lambda g: (g.split()[0], int(g.split()[1][1:])))
    profiles = list(dict.fromkeys(r["profile"] for r in results["runs"]))
    tps = {(f"{r['engine']} c{r['concurrency']}", r["profile"]): r["tok_s"] for r in results["runs"]}
    grouped_bars(out / "bench.png", "tokens/s over HTTP", groups,
                 {p: [tps.get((g, p)) for g in groups] for p in profiles}, "tok/s")
    print("\n".join(lines))
