"""The built-in engine: continuous batching over a transformers model, on one thread.

Each step admits waiting sequences (their prompts packed into one prefill forward), then decodes one
token for every running row; finished rows leave at once, and new ones join at the next step.
Every row carries its own profile: the profile hooks, installed once, get a HookContext per forward
through the model's keyword arguments, as the attention gets its KVStep (kv.py).
The loop: sample -> prefill -> decode -> step.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import ExitStack

import torch

from ablation.guard import guard_logits, markup_token_ids
from ablation.adapters import ForwardContext, adapter_hooks
from ablation.hooks import CONTEXT_KWARG, HookContext, ProfileTable
from ablation.residual import decoder_layers, residual_hooks
from ablation.spec import ProfileSpec
from models.loading import LoadedModel
from server.engine.base import (ChoiceOutput, Engine, EngineError, EngineStats, Prompt, SamplingParams, TokenLogprob,
    choices, drain)
from server.engine.batch import RunningBatch, Sequence
from server.engine.kv import ATTENTION, KVStep, SlotCache
from server.engine.sampling import sample, token_logprobs
from server.engine.textstream import TextStream

log = logging.getLogger("obliviate.engine")


class BuiltinEngine(Engine):
    name = "builtin"

    def __init__(self, lm: LoadedModel, table: ProfileTable, max_batch_size: int = 32,
                 max_prefill_tokens: int = 4096, audit: bool = True):
        self.lm, self.table = lm, table
        self.audit = audit  # the trigger audit: where each row's edit first fired
        self.model, self.tok = lm.model, lm.tokenizer
        table.check_model(lm.n_layers, lm.model.config.hidden_size)
        table.check_adapters(lm.model, lm.name)
        self.eos_ids = lm.eos_ids
        self.windows = {getattr(layer.self_attn, "sliding_window", None) for layer in decoder_layers(self.model)}
        self.max_prefill_tokens = max_prefill_tokens
        self.unembed = _unembedding(self.model, lm.device, lm.dtype)
        cache = SlotCache(self.model.config, max_batch_size, lm.dtype, lm.device)
        self.batch = RunningBatch(cache, list(table.by_hook))
        # the markup guard (ablation/guard.py): which profiles ask for it, and the tag tokens it bans
        self.guarded = table.guarded()
        self.banned = self._banned()
        self._controls: deque[Callable[[], None]] = deque()  # profile changes, run between steps
        self._waiting: deque[Sequence] = deque()
        self._live: dict[str, list[Sequence]] = {}
        self._cv = threading.Condition()
        self._stop = False
        self._failure: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._installed = ExitStack()
        self.running = ForwardContext(CONTEXT_KWARG)  # the forward's context, for the adapters' linear layers
        self._steps = 0

    # ---- interface ---------------------------------------------------------------------------
    async def start(self) -> None:
        if getattr(self.model, "_obliviate_engine", None) is not None:
            raise RuntimeError("this model is already served by an engine (its hooks are installed once per model)")
        self.model._obliviate_engine = self
        self._installed.callback(setattr, self.model, "_obliviate_engine", None)
        previous = self.model.config._attn_implementation
        self.model.set_attn_implementation(ATTENTION)
        self._installed.callback(self.model.set_attn_implementation, previous)
        self._installed.enter_context(residual_hooks(self.model, self.table.layer_hooks()))
        self._installed.enter_context(self.running.installed(self.model.model))
        self._installed.enter_context(adapter_hooks(self.model, self.table.by_module, self.running))
        self._thread = threading.Thread(target=self._loop, name="obliviate-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread:
            await asyncio.to_thread(self._thread.join, 60)
        self._installed.close()

    async def generate(self, request_id: str, prompts: list[Prompt], params: SamplingParams, profile: str,
                       n: int = 1) -> AsyncIterator[ChoiceOutput]:
        if not self.health():
            raise EngineError("the engine is not running")
        loop, outbox = asyncio.get_running_loop(), asyncio.Queue()
        idx = self.table.index.get(profile)
        if idx is None:  # never the plain model for a profile the engine does not hold
            raise EngineError(f"profile {profile!r} is not installed in the engine")
        seqs = [self._sequence(request_id, i, p, q, idx, outbox, loop) for i, p, q in choices(prompts, params, n)]
        with self._cv:
            self._live[request_id] = seqs
            self._waiting.extend(seqs)
            self._cv.notify()
        try:
            async for out in drain(outbox, len(seqs)):
                yield out
        finally:
            self._abort(request_id)

    async def abort(self, request_id: str) -> None:
        self._abort(request_id)

    async def add_profile(self, name: str, spec: ProfileSpec) -> None:
        compiled = await asyncio.to_thread(self.table.compile, spec)  # loads SAEs off the engine thread

        def install() -> None:
            hookpoints, modules = self.table.install(name, spec, compiled)
            for hp in hookpoints:
                self.batch.fired[hp] = torch.zeros(self.batch.cache.slots, dtype=torch.bool, device=self.lm.device)
                self._installed.enter_context(residual_hooks(self.model, self.table.layer_hooks([hp])))
            if modules:
                self._installed.enter_context(adapter_hooks(self.model, self.table.by_module, self.running, modules))
            self.guarded = self.table.guarded()
            self.banned = self._banned()

        await self._between_steps(install)

    async def remove_profile(self, name: str) -> None:
        await self._between_steps(lambda: self.table.remove(name))

    async def _between_steps(self, change: Callable[[], None]) -> None:
        """Runs `change` on the engine thread between two steps (at once if the loop is idle)."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def run() -> None:
            try:
                change()
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))
            except Exception as e:
                loop.call_soon_threadsafe(lambda err=e: done.done() or done.set_exception(err))

        with self._cv:
            if self._thread is None or not self._thread.is_alive():
                change()
                return
            self._controls.append(run)
            self._cv.notify()
        await done

    def _banned(self) -> torch.Tensor:
        ids = markup_token_ids(self.tok) if self.guarded.any() else []
        return torch.tensor(ids, dtype=torch.long, device=self.lm.device)

    def health(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._failure is None

    def stats(self) -> EngineStats:
        running = sum(not (s.finished or s.aborted) for s in list(self.batch.seqs))  # finished rows leave at step end
        return EngineStats(running=running, waiting=len(self._waiting), steps=self._steps)

    # ---- requests ----------------------------------------------------------------------------
    def _sequence(self, request_id, index, prompt, params, profile, outbox, loop) -> Sequence:
        gen = None
        if not params.greedy:
            gen = torch.Generator().manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
        return Sequence(request_id, index, prompt, params, profile, outbox, loop,
                        TextStream(self.tok, params.stop), gen)

    def _abort(self, request_id: str) -> None:
        with self._cv:
            for s in self._live.pop(request_id, []):
                s.aborted = True
            self._waiting = deque(s for s in self._waiting if not s.aborted)

    @staticmethod
    def _deliver(items: list[tuple[Sequence, object]]) -> None:
        """Hands outputs to their requests: one wake-up per event loop per step."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for s, item in items:
            by_loop.setdefault(s.loop, []).append((s.outbox, item))
        for loop, batch in by_loop.items():
            loop.call_soon_threadsafe(_put_all, batch)

    # ---- the loop ----------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._waiting and not self.batch.seqs and not self._controls and not self._stop:
                        self._cv.wait()
                    if self._stop:
                        break
                    controls, self._controls = list(self._controls), deque()
                    new = self._admit()
                for change in controls:
                    change()
                if self.table.retired:
                    self._prune()
                self.step(new)
        except BaseException as e:  # a fault outside any one row: nothing more can be served
            log.exception("engine loop failed")
            self._failure = e
        finally:
            with self._cv:
                left = [s for seqs in self._live.values() for s in seqs if not s.finished]
            self._deliver([(s, EngineError("the engine stopped")) for s in left])

    def _prune(self) -> None:
        """Frees removed profiles that no running or waiting sequence has any more."""
        with self._cv:
            in_use = {s.profile for s in self._waiting} | {s.profile for s in self.batch.seqs}
        self.table.prune(in_use)

    def _admit(self) -> list[Sequence]:
        """Waiting sequences that fit: free rows, and a prefill of at most max_prefill_tokens (or one prompt)."""
        new, tokens = [], 0
        while self._waiting and len(new) < self.batch.free:
            n = self._waiting[0].num_prompt_tokens
            if new and tokens + n > self.max_prefill_tokens:
                break
            new.append(self._waiting.popleft())
            tokens += n
        return new

    @torch.inference_mode()
    def step(self, new: list[Sequence]) -> None:
        if new:
            self._isolated(self.prefill, [self.batch.add(s) for s in new])
            self._drop_finished()
        if self.batch.seqs:
            self._isolated(self.decode, list(range(len(self.batch))))
            self._drop_finished()
        self._steps += 1

    def _isolated(self, forward: Callable[[list[int]], None], rows: list[int]) -> None:
        """Runs a forward over rows; if it fails, each row runs alone, so only the one at fault fails."""
        try:
            forward(rows)
            return
        except Exception as e:
            if len(rows) > 1:
                log.warning("a forward over %d rows failed (%s); running them one by one", len(rows), e)
                for r in rows:
                    self._isolated(forward, [r])
                return
            log.exception("request %s failed", self.batch.seqs[rows[0]].request_id)
            s = self.batch.seqs[rows[0]]
            s.finished = True
            self._deliver([(s, e)])

    def _drop_finished(self) -> None:
        self.batch.remove([r for r, s in enumerate(self.batch.seqs) if s.finished or s.aborted])

    # ---- model steps -------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, pos: torch.Tensor, kv: KVStep, ctx: HookContext) -> torch.Tensor:
        """ids/pos: [B, S] -> final hidden states [B, S, d_model]."""
        dev = self.lm.device
        # no attention mask: the attention builds its own from `kv`
        out = self.model.model(input_ids=ids.to(dev), position_ids=pos.to(dev), use_cache=False, kv=kv,
                               **{CONTEXT_KWARG: ctx})
        return out.last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [..., d_model] after the final norm -> logits [..., V]."""
        logits = self.unembed(hidden)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    def prefill(self, rows: list[int]) -> None:
        """New rows' prompts packed into one sequence [1, T]; each row attends only to itself."""
        seqs = [self.batch.seqs[r] for r in rows]
        ids = [s.prompt.input_ids for s in seqs]
        lengths = torch.tensor([len(i) for i in ids])
        self.batch.cache.reserve(int(lengths.max()) + 1)
        seq = torch.arange(len(rows)).repeat_interleave(lengths)  # [T]
        pos = torch.cat([torch.arange(n) for n in lengths.tolist()])  # [T]
        ctx = HookContext.build(self.batch.profile[rows][seq], seq, pos, self._fresh_state(len(rows)), self.lm.device,
                                audit=self.audit)
        hidden = self.forward(torch.tensor(sum(ids, []))[None], pos[None],
                              KVStep.prefill(self.batch.cache, rows, lengths.tolist()), ctx)[0]  # [T, d]
        ends = lengths.cumsum(0)
        for i, (r, s, at) in enumerate(zip(rows, seqs, ctx.triggers(len(rows)))):
            s.fired_at(at)
            self.batch.pos[r] = lengths[i]
            for hp, f in ctx.fired.items():
                self.batch.fired[hp][r] = f[i]
            if s.params.prompt_logprobs:
                a = int(ends[i] - lengths[i])
                s.prompt_logprobs = self.prompt_logprobs(s, hidden[a:int(ends[i])], torch.tensor(ids[i]))
        self._emit(rows, self.logits(hidden[ends - 1]))

    def decode(self, rows: list[int]) -> None:
        """One token for each of `rows` (all rows, or one alone when isolating a failure)."""
        b = torch.tensor(rows)
        pos = self.batch.pos[b]  # [b]
        self.batch.cache.reserve(int(pos.max()) + 1)
        fired = {hp: f[b.to(f.device)] for hp, f in self.batch.fired.items()}
        ctx = HookContext.build(self.batch.profile[b], torch.arange(len(rows)), pos, fired, self.lm.device,
                                prompt=torch.zeros(len(rows), dtype=torch.bool), audit=self.audit)  # newest tokens
        kv = KVStep.decode(self.batch.cache, pos, self.windows, None if len(rows) == len(self.batch) else b)
        hidden = self.forward(self.batch.last[b][:, None], pos[:, None], kv, ctx)  # [b, 1, d]
        for hp, f in ctx.fired.items():
            self.batch.fired[hp][b.to(f.device)] = f
        for r, at in zip(rows, ctx.triggers(len(rows))):
            self.batch.seqs[r].fired_at(at)
        self.batch.pos[b] += 1
        self._emit(rows, self.logits(hidden[:, -1]))

    def _fresh_state(self, n: int) -> dict:
        return {hp: torch.zeros(n, dtype=torch.bool, device=self.lm.device) for hp in self.batch.fired}

    def prompt_logprobs(self, s: Sequence, hidden: torch.Tensor, ids: torch.Tensor, chunk: int = 256):
        """hidden: [L, d], ids: [L] of one row -> a TokenLogprob per user prompt token (the echo)."""
        n_ctx = len(s.prompt.context_ids)
        k = s.params.logprobs or 0
        out: list[TokenLogprob] = [] if n_ctx else [TokenLogprob(int(ids[0]))]
        for a in range(max(n_ctx - 1, 0), ids.shape[0] - 1, chunk):  # position a predicts token a + 1
            b = min(a + chunk, ids.shape[0] - 1)
            out += token_logprobs(self.logits(hidden[a:b]), ids[a + 1:b + 1], k)
        return out

    def _emit(self, rows: list[int], logits: torch.Tensor) -> None:
        """logits: [b, V] for `rows` -> each row's next token, appended and delivered."""
        seqs = [self.batch.seqs[r] for r in rows]
        if self.banned.numel():  # the markup guard: only rows whose profile asks for it, once their edit is on
            b = torch.tensor(rows)
            guarded = self.guarded[self.batch.profile[b]]
            if guarded.any():
                on = torch.stack([f[b.to(f.device)] for f in self.batch.fired.values()]).any(0).cpu()
                guard_logits(logits, guarded & on, self.banned)
        params = [s.params for s in seqs]
        # penalties and min_tokens read what each row has seen; rows without them build nothing
        history = [(s.prompt.input_ids, s.output_ids) for s in seqs] \
            if any(p.penalized or p.min_tokens for p in params) else ()
        tokens = sample(logits, params, [s.generator for s in seqs], history, self.eos_ids)
        want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        infos: list[TokenLogprob | None] = [None] * len(seqs)
        if want:
            k = max(seqs[i].params.logprobs for i in want)
            for i, info in zip(want, token_logprobs(logits[want], tokens[want], k)):
                infos[i] = info
        out = []
        for i, (r, s) in enumerate(zip(rows, seqs)):
            self.batch.last[r] = tokens[i]
            if not s.aborted:
                out.append((s, self._append(s, infos[i] or TokenLogprob(int(tokens[i])))))
        self._deliver(out)

    def _append(self, s: Sequence, info: TokenLogprob) -> ChoiceOutput:
        """Records one sampled token and says what the choice gained; a max_tokens of 0 takes none. An
        end-of-sequence token (unless `ignore_eos`) or one of stop_token_ids ends the choice: it is counted
        and listed (with its logprob, as vLLM does: lm-eval reads the last token as the generated one) but
        adds no text."""
        if s.params.max_tokens == 0:
            s.finished = True
            out = ChoiceOutput(s.index, s.text.flush(), [], s.num_prompt_tokens, 0, "length", s.prompt_logprobs,
                               s.trigger)
            s.prompt_logprobs = None
            return out
        stops = info.token_id in s.params.stop_token_ids
        is_eos = info.token_id in self.eos_ids
        ends = stops or (is_eos and not s.params.ignore_eos)
        s.generated += 1
        s.output_ids.append(info.token_id)
        delta, hit_stop = s.text.push(None if is_eos or stops else info.token_id)
        reason = "stop" if ends or hit_stop else None
        if reason is None and s.generated >= s.params.max_tokens:
            reason = "length"
        if reason:
            delta += s.text.flush()
            s.finished = True
        out = ChoiceOutput(s.index, delta, [info], s.num_prompt_tokens, s.generated, reason, s.prompt_logprobs,
                           s.trigger)
        s.prompt_logprobs = None
        return out


def _unembedding(model, device: torch.device, dtype: torch.dtype):
    """hidden [..., d] -> logits [..., V]. On CPUs in fp32 a oneDNN-packed copy of the weight: the
    largest matmul of a decode step runs ~2x faster than through MKL, which takes a slow path on
    these AMD cores (same fp32 values, another summation order; costs a second V x d weight)."""
    head = model.lm_head
    if device.type != "cpu" or dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return head
    try:
        w = head.weight.detach().to_mkldnn()

        def unembed(h: torch.Tensor) -> torch.Tensor:
            flat = h.reshape(-1, h.shape[-1]).contiguous()
            return torch.ops.mkldnn._linear_pointwise(flat, w, None, "none", [], "").view(*h.shape[:-1], -1)

        probe = torch.randn(2, head.in_features)
        if torch.allclose(unembed(probe), head(probe), rtol=1e-4, atol=1e-4):
            return unembed
    except (RuntimeError, AttributeError) as e:
        log.info("oneDNN unembedding unavailable (%s); using the model's lm_head", e)
    return head


def _put_all(batch: list[tuple[asyncio.Queue, object]]) -> None:
    for q, item in batch:
        q.put_nowait(item)

