"""The vLLM engine: vLLM's AsyncLLM (paged KV cache, continuous batching, chunked prefill, prefix
caching, tensor/data parallelism) in its compiled mode (or eager), with the project's profile edit in
its worker (vllm_edit.py: how the edit lives inside the compiled graph).

Each choice is one vLLM request whose SamplingParams.extra_args name its profile; the worker
extension (vllm_worker.py) installs the hooks and builds each forward's HookContext from the batch.
Prefix caching stays on but cannot mix profiles: every request's cache salt is its profile, and a
profile whose edit depends on earlier tokens (condition `sequence`) gets a salt of its own per
request, since its state at a cached prefix is not stored.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator

from vllm import AsyncEngineArgs
from vllm import SamplingParams as VSamplingParams
from vllm.config import CompilationConfig
from vllm.lora.request import LoRARequest
from vllm.platforms import current_platform
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.metrics.loggers import StatLoggerBase

from ablation.guard import markup_token_ids
from ablation.spec import ProfileSpec
from models.loading import ModelInfo
from server.engine.base import (ChoiceOutput, Engine, EngineError, EngineStats, Prompt, SamplingParams, TokenLogprob,
                                LoraOptions, choices, drain)
from server.engine.vllm_edit import EDIT_VERSION, LOAD_FORMAT, OP
from server.engine.vllm_worker import AUDIT_KEY, PROFILE_KEY

log = logging.getLogger("obliviate.vllm")


def cpu_shares(n: int) -> str:
    """This process's cores in n shares, as vLLM's VLLM_CPU_OMP_THREADS_BIND takes them ("0,1|2,3"); with
    fewer cores than shares, shares reuse cores."""
    cores = sorted(os.sched_getaffinity(0))
    per = max(1, len(cores) // n)
    shares = [cores[i * per:(i + 1) * per] or [cores[i % len(cores)]] for i in range(n)]
    return "|".join(",".join(map(str, share)) for share in shares)


class VLLMEngine(Engine):
    name = "vllm"

    def __init__(self, model: ModelInfo, profiles: dict[str, ProfileSpec], *, dtype: str | None = None,
                 max_batch_size: int = 32, max_model_len: int = 2048, tensor_parallel_size: int = 1,
                 data_parallel_size: int = 1, kv_cache_gib: int = 4, audit: bool = True, eager: bool = False,
                 lora: LoraOptions = LoraOptions()):
        self.model, self.specs = model, dict(profiles)
        self.options = dict(dtype=dtype, max_batch_size=max_batch_size, max_model_len=max_model_len,
                            tensor_parallel_size=tensor_parallel_size, data_parallel_size=data_parallel_size,
                            eager=eager)
        self.kv_cache_gib = kv_cache_gib
        self.lora = lora  # vLLM's per-request LoRA serves the adapter profiles
        self._lora_ids: dict[str, int] = {}  # adapter folder -> its LoRARequest id (one per folder, from 1)
        self.audit = audit  # the trigger audit: the workers keep where each request's edit fired; read at its end
        self.llm = None
        self._stats = _Stats()
        self._live: dict[str, list[str]] = {}  # our request id -> its vLLM request ids
        self.served: set[str] = set()  # what every worker holds (what they said), less profiles being removed
        self._index: dict[str, int] = {}  # profile -> its install index in the workers
        self._users: dict[str, int] = {}  # profile -> requests in flight with it
        self._removals: set[asyncio.Task] = set()
        self._asked: dict[str, asyncio.Future] = {}  # vLLM request id -> its trigger audit, not yet read
        self._reader: asyncio.Task | None = None

    async def start(self) -> None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.kv_cache_gib))  # GiB, CPU backend only
        o = self.options
        if o["data_parallel_size"] > 1 and current_platform.is_cpu():
            # vLLM's automatic binding puts every data-parallel engine's threads on the same cores of a
            # one-socket machine: give each engine its own share of this process's cores instead
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_shares(o["data_parallel_size"]))
        args = AsyncEngineArgs(
            model=self.model.path, tokenizer=self.model.path, served_model_name=[self.model.name],
            dtype=o["dtype"] or "auto", max_model_len=o["max_model_len"], max_num_seqs=o["max_batch_size"],
            tensor_parallel_size=o["tensor_parallel_size"], data_parallel_size=o["data_parallel_size"],
            enforce_eager=o["eager"], load_format=LOAD_FORMAT,  # the edit's boundaries are placed as it loads
            additional_config={"obliviate_edit": EDIT_VERSION},  # vLLM's compile cache: never a graph without them
            **({} if o["eager"] or current_platform.is_cpu() else
               dict(compilation_config={"splitting_ops": [*CompilationConfig._attention_ops, OP]})),
            enable_prefix_caching=True, worker_extension_cls="server.engine.vllm_worker.VLLMWorkerExtension",
            disable_log_stats=False, enable_lora=self.lora.enabled,
            **(dict(max_loras=self.lora.max_loras, max_lora_rank=self.lora.max_rank) if self.lora.enabled else {}))
        self.llm = AsyncLLM.from_engine_args(args, stat_loggers=[self._stats.factory])
        payload = {n: s.model_dump() for n, s in self.specs.items()}
        banned = markup_token_ids(self.model.tokenizer)
        names = await self._rpc("obliviate_install", payload, banned, self.audit)
        self.served = set.intersection(*map(set, names))
        self._index = {n: i for i, n in enumerate(self.specs)}
        log.info("vLLM workers serve profiles %s", sorted(self.served))

    async def add_profile(self, name: str, spec: ProfileSpec) -> None:
        await asyncio.to_thread(self.lora.check, [spec], self.model, {s.adapter for s in self.specs.values() if s.adapter})
        got = await self._rpc("obliviate_add", name, spec.model_dump())
        errors = [g for g in got if isinstance(g, str)]
        if errors or len(set(got)) != 1:
            for index in {g for g in got if not isinstance(g, str)}:  # undo where it went in
                await self._rpc("obliviate_remove", name, index)
            raise ValueError(errors[0] if errors else f"the workers disagree on profile {name!r}: {got}")
        self.specs[name], self._index[name] = spec, got[0]
        self.served.add(name)

    async def remove_profile(self, name: str) -> None:
        """New requests are refused at once; the workers drop the profile once its last request ends."""
        self.served.discard(name)
        index = self._index.pop(name)
        task = asyncio.create_task(self._remove_when_unused(name, index))
        self._removals.add(task)
        task.add_done_callback(self._removals.discard)

    async def _remove_when_unused(self, name: str, index: int) -> None:
        while self._users.get(name):
            await asyncio.sleep(0.05)
        await self._rpc("obliviate_remove", name, index)

    async def _trigger(self, rid: str) -> int | None:
        """The first position where a finished request's edit fired (None: never), from the workers. Requests
        finishing together share one call: while one is out, the next ones wait for the following."""
        fut = asyncio.get_running_loop().create_future()
        self._asked[rid] = fut
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read_triggers())
        return await fut

    async def _rpc(self, method: str, *args) -> list:
        """`method` on every worker of every data-parallel engine, one result a worker (vLLM's own
        collective_rpc answers with the first engine's workers only when there are several)."""
        per_engine = await self.llm.engine_core.call_utility_all_async("collective_rpc", method, None, args, None)
        return [result for workers in per_engine for result in workers]

    async def _read_triggers(self) -> None:
        while self._asked:
            asked, self._asked = self._asked, {}
            try:
                got = await self._rpc("obliviate_triggers", list(asked))
            except Exception as e:
                for f in asked.values():
                    f.done() or f.set_exception(EngineError(f"the trigger audit failed: {e}"))
                continue
            first: dict[str, int] = {}
            for worker in got:  # tensor parallel workers see the same requests; data parallel ones their own
                for r, at in worker.items():
                    first[r] = min(at, first.get(r, at))
            for r, f in asked.items():
                f.done() or f.set_result(first.get(r))

    async def shutdown(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()

    def health(self) -> bool:
        return self.llm is not None and not self.llm.errored

    def stats(self) -> EngineStats:
        st = self._stats
        return EngineStats(running=st.running, waiting=st.waiting, steps=st.steps, prefix_cache_hits=st.hits)

    async def abort(self, request_id: str) -> None:
        if self.llm is not None:
            await self.llm.abort(self._live.pop(request_id, []))

    async def generate(self, request_id: str, prompts: list[Prompt], params: SamplingParams, profile: str,
                       n: int = 1) -> AsyncIterator[ChoiceOutput]:
        if not self.health():
            raise EngineError("the engine is not running")
        if profile not in self.served:  # never the plain model for a profile the workers do not hold
            raise EngineError(f"profile {profile!r} is not installed in the vLLM workers")
        queue: asyncio.Queue = asyncio.Queue()
        jobs = choices(prompts, params, n)
        ids = [f"{request_id}-{i}" for i, _, _ in jobs]
        self._live[request_id] = ids
        # the cache salt: the profile and its install index (one added again is another), and the request
        # where the edit's state at a cached prefix is not stored
        salt = f"{profile}#{self._index[profile]}"
        stateful = any(iv.stateful for iv in self.specs[profile].interventions)
        salts = [f"{salt}:{rid}" if stateful else salt for rid in ids]
        tasks = [asyncio.create_task(self._choice(rid, i, p, q, profile, s, queue))
                 for rid, s, (i, p, q) in zip(ids, salts, jobs)]
        self._users[profile] = self._users.get(profile, 0) + 1  # a removal waits for it
        try:
            async for out in drain(queue, len(tasks)):
                yield out
        finally:
            for t in tasks:
                t.cancel()
            await self.abort(request_id)
            self._users[profile] -= 1

    async def _choice(self, rid: str, index: int, prompt: Prompt, params: SamplingParams, profile: str, salt: str,
                      queue: asyncio.Queue) -> None:
        """One vLLM request; its outputs, converted, go to the request's queue."""

        sp = VSamplingParams(
            # greedy below GREEDY_BELOW as on the built-in engine: vLLM sampled at temperature 1e-300
            n=1, max_tokens=max(params.max_tokens, 1), temperature=0.0 if params.greedy else params.temperature,
            top_p=params.top_p, top_k=params.top_k, min_p=params.min_p, presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty, repetition_penalty=params.repetition_penalty,
            logit_bias=dict(params.logit_bias) or None, min_tokens=params.min_tokens,
            stop_token_ids=list(params.stop_token_ids) or None,
            seed=params.seed, stop=list(params.stop) or None, ignore_eos=params.ignore_eos, logprobs=params.logprobs,
            prompt_logprobs=(params.logprobs or 0) if params.prompt_logprobs else None,
            output_kind=RequestOutputKind.DELTA, extra_args={PROFILE_KEY: profile, AUDIT_KEY: rid})
        adapter = self.specs[profile].adapter
        lora = LoRARequest(adapter, self._lora_ids.setdefault(adapter, len(self._lora_ids) + 1), adapter) \
            if adapter else None
        n_ctx, n_prompt = len(prompt.context_ids), len(prompt.input_ids)
        audited = self.audit and bool(self.specs[profile].interventions)
        generated, first = 0, True
        try:
            async for ro in self.llm.generate({"prompt_token_ids": prompt.input_ids, "cache_salt": salt}, sp, rid,
                                              lora_request=lora):
                c = ro.outputs[0]
                if c.finish_reason == "abort":
                    raise EngineError("vLLM aborted the request")
                tokens = _tokens(c.token_ids, c.logprobs, params.logprobs)
                text, finish = c.text, c.finish_reason
                if params.max_tokens == 0:  # vLLM takes at least one token: drop it
                    tokens, text, finish = [], "", "length" if ro.finished else None
                generated += len(tokens)
                prompt_lp = None
                if first and params.prompt_logprobs:
                    prompt_lp = _tokens(prompt.input_ids[n_ctx:], (ro.prompt_logprobs or [])[n_ctx:], params.logprobs)
                first = False
                trigger = await self._trigger(rid) if finish and audited else None
                if text or tokens or finish or prompt_lp is not None:
                    queue.put_nowait(ChoiceOutput(index, text, tokens, n_prompt, generated, finish, prompt_lp,
                                                  trigger))
        except Exception as e:  # cancellation (a BaseException) passes through
            queue.put_nowait(e)


def _tokens(ids, logprobs, k: int | None) -> list[TokenLogprob]:
    """vLLM's token ids and per-position {token id: Logprob} -> TokenLogprobs with the top-k by rank."""
    out = []
    for i, t in enumerate(ids):
        d = logprobs[i] if logprobs is not None and i < len(logprobs) else None
        if d is None or k is None:
            out.append(TokenLogprob(int(t)))
            continue
        top = {int(a): float(lp.logprob) for a, lp in d.items() if lp.rank is not None and lp.rank <= k} if k else None
        out.append(TokenLogprob(int(t), float(d[t].logprob), top))
    return out


class _Stats:
    """Scheduler figures from vLLM's stat-logger hook (running and waiting requests, steps)."""

    def __init__(self):
        self.running = self.waiting = self.steps = self.hits = 0

    def factory(self, vllm_config, engine_index: int = 0):
        stats = self

        class Logger(StatLoggerBase):
            def __init__(self, vllm_config, engine_index=0):
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
                if scheduler_stats is not None:
                    stats.running, stats.waiting = scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs
                    stats.steps += 1
                    stats.hits += scheduler_stats.prefix_cache_stats.hits

            def log_engine_initialized(self):
                pass

        return Logger(vllm_config, engine_index)
