"""Turns a completion request into engine sequences and the engine's events into a response."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace

from ablation.hooks import ProfileTable
from server.engine import Engine, SamplingParams, Sequence, TokenInfo
from server.errors import EngineFailure, InvalidRequest, ObliviateError, UnknownModel, UnknownProfile
from server.metrics import Metrics
from server.models import LoadedModel
from server.protocol import (
    CompletionChoice, CompletionRequest, CompletionResponse, ErrorInfo, ErrorResponse, Logprobs,
    ModelCard, ModelList, ProfileCard, ProfileList, Usage,
)


class CompletionServing:
    def __init__(self, engine: Engine, lm: LoadedModel, table: ProfileTable, metrics: Metrics,
                 max_model_len: int):
        self.engine, self.lm, self.table, self.metrics = engine, lm, table, metrics
        self.tok = lm.tokenizer
        self.max_model_len = min(max_model_len, lm.max_len)
        self._prefix_ids = {n: self._tokens(s.prefix) for n, s in table.specs.items()}

    # ---- listing -----------------------------------------------------------------------------
    def models(self) -> ModelList:
        cards = [ModelCard(id=self.lm.name, root=self.lm.hf_name, max_model_len=self.max_model_len)]
        for p in self.table.names:
            for alias in (f"{self.lm.name}:{p}", p):
                cards.append(ModelCard(id=alias, root=self.lm.name, profile=p, max_model_len=self.max_model_len))
        return ModelList(data=cards)

    def profiles(self) -> ProfileList:
        return ProfileList(data=[
            ProfileCard(name=n, description=s.description, model=s.model, prefix=s.prefix,
                        interventions=[iv.model_dump() for iv in s.interventions], version=s.metadata.version)
            for n, s in self.table.specs.items()])

    # ---- request -> sequences ----------------------------------------------------------------
    def resolve_profile(self, req: CompletionRequest) -> str:
        """The profile comes from the `profile` field or the model name (`name:profile` or `profile`)."""
        names, model = self.table.names, req.model or self.lm.name
        served = {self.lm.name, self.lm.hf_name}
        from_model = None
        if model not in served:
            base, _, suffix = model.rpartition(":")
            if base in served and suffix:
                from_model = suffix
            elif model in names:
                from_model = model
            else:
                raise UnknownModel(model, [c.id for c in self.models().data])
        if from_model and req.profile and from_model != req.profile:
            raise InvalidRequest(f"model {model!r} selects profile {from_model!r} but the request's "
                                 f"profile field says {req.profile!r}", param="profile")
        name = req.profile or from_model or "baseline"
        if name not in self.table.index:
            raise UnknownProfile(name, names)
        return name

    def _tokens(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids if text else []

    def sampling_params(self, req: CompletionRequest) -> SamplingParams:
        if req.best_of not in (None, req.n):
            raise InvalidRequest("best_of is not supported (leave it unset or equal to n)", param="best_of")
        for name in ("logit_bias", "suffix"):
            if getattr(req, name):
                raise InvalidRequest(f"{name} is not supported", param=name)
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(req, name):
                raise InvalidRequest(f"{name} is not supported (use 0)", param=name)
        if len(req.stop_list()) > 4:
            raise InvalidRequest("at most 4 stop sequences", param="stop")
        return SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                              stop=req.stop_list(), seed=req.seed, logprobs=req.logprobs,
                              prompt_logprobs=req.echo and req.logprobs is not None)

    def build(self, req: CompletionRequest, profile: str) -> list[tuple[list[int], list[int]]]:
        """-> (context ids, prompt ids) per prompt, checked against the vocabulary and context."""
        bos = [self.tok.bos_token_id] if self.tok.bos_token_id is not None else []
        vocab = self.lm.model.config.vocab_size
        out = []
        for i, p in enumerate(req.prompts()):
            if isinstance(p, str):
                ids = self._tokens(p)
            else:
                if any(not 0 <= t < vocab for t in p):
                    raise InvalidRequest(f"prompt {i}: token ids must be in [0, {vocab})", param="prompt")
                ids = list(p[1:] if bos and p[:1] == bos else p)
            ctx = bos + self._prefix_ids[profile]
            total = len(ctx) + len(ids) + req.max_tokens
            if total > self.max_model_len:
                raise InvalidRequest(
                    f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                    f"requested {total} tokens ({len(ctx) + len(ids)} in the prompt, {req.max_tokens} for "
                    f"the completion). Please reduce the prompt or max_tokens.",
                    param="prompt", code="context_length_exceeded")
            out.append((ctx, ids))
        if not out:
            raise InvalidRequest("prompt must not be empty", param="prompt")
        return out

    # ---- run ---------------------------------------------------------------------------------
    async def create(self, req: CompletionRequest) -> CompletionResponse | AsyncIterator[str]:
        profile = self.resolve_profile(req)
        try:
            params = self.sampling_params(req)
            prompts = self.build(req, profile)
        except ObliviateError:
            self.metrics.requests.labels(profile, "400").inc()
            raise
        run = _Run(self, req, profile, params, prompts)
        if req.stream:
            return run.stream()
        return await run.collect()


class _Run:
    """One request in flight: its sequences, the queue their events arrive on, its metrics."""

    def __init__(self, serving: CompletionServing, req, profile, params, prompts):
        self.s, self.req, self.profile = serving, req, profile
        self.t0 = time.perf_counter()
        self.first_token_at: float | None = None
        self.queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        emit = lambda ev: loop.call_soon_threadsafe(self.queue.put_nowait, ev)  # noqa: E731
        idx = serving.table.index[profile]
        self.seqs: list[Sequence] = []
        for ctx, ids in prompts:
            for j in range(req.n):
                p = params if params.seed is None else replace(params, seed=params.seed + j)
                self.seqs.append(Sequence(ctx, ids, idx, p, emit))
        self.prompt_tokens = sum(len(s.input_ids) for s in self.seqs)

    async def events(self) -> AsyncIterator[dict]:
        self.s.engine.submit(self.seqs)
        done = 0
        try:
            while done < len(self.seqs):
                ev = await self.queue.get()
                if ev["type"] == "error":
                    raise EngineFailure(f"generation failed: {ev['error']}")
                if ev["type"] == "token" and self.first_token_at is None:
                    self.first_token_at = time.perf_counter()
                    self.s.metrics.ttft.labels(self.profile).observe(self.first_token_at - self.t0)
                done += ev["type"] == "done"
                yield ev
        finally:
            self.s.engine.cancel([q for q in self.seqs if q.finish_reason is None])

    def finish(self, status: str) -> Usage:
        m = self.s.metrics
        gen = sum(len(q.out) for q in self.seqs)
        m.requests.labels(self.profile, status).inc()
        m.prompt_tokens.labels(self.profile).inc(self.prompt_tokens)
        m.generation_tokens.labels(self.profile).inc(gen)
        m.e2e.labels(self.profile).observe(time.perf_counter() - self.t0)
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=gen, total_tokens=self.prompt_tokens + gen)

    def _prompt_text(self, q: Sequence) -> str:
        p = self.req.prompts()[self.seqs.index(q) // self.req.n]
        return p if isinstance(p, str) else self.s.tok.decode(q.prompt_ids)

    async def collect(self) -> CompletionResponse:
        try:
            async for _ in self.events():
                pass
        except ObliviateError:
            self.finish("500")
            raise
        choices = []
        for i, q in enumerate(self.seqs):
            echo = self._prompt_text(q) if self.req.echo else ""
            infos = (q.prompt_info or []) + q.out if self.req.echo else q.out
            lp = self.logprobs(infos, 0) if self.req.logprobs is not None else None
            choices.append(CompletionChoice(index=i, text=echo + q.text.text, logprobs=lp,
                                            finish_reason=q.finish_reason))
        usage = self.finish("200")
        return CompletionResponse(model=self.req.model or self.s.lm.name, choices=choices, usage=usage,
                                  profile=self.profile)

    def logprobs(self, infos: list[TokenInfo], offset: int) -> Logprobs:
        dec = lambda t: self.s.tok.decode([t])  # noqa: E731
        out = Logprobs(top_logprobs=[] if self.req.logprobs else None)
        for info in infos:
            out.tokens.append(dec(info.token_id))
            out.token_logprobs.append(info.logprob)
            out.text_offset.append(offset)
            offset += len(out.tokens[-1])
            if self.req.logprobs:
                out.top_logprobs.append({dec(t): v for t, v in info.top.items()} if info.top else None)
        return out

    async def stream(self) -> AsyncIterator[str]:
        base = dict(id=f"cmpl-{id(self):x}{int(self.t0 * 1e6):x}", model=self.req.model or self.s.lm.name,
                    profile=self.profile)
        chunk = lambda **c: "data: " + CompletionResponse(  # noqa: E731
            choices=[CompletionChoice(**c)], **base).model_dump_json(exclude_none=True) + "\n\n"
        offsets = [0] * len(self.seqs)
        try:
            if self.req.echo:
                for i, q in enumerate(self.seqs):
                    text = self._prompt_text(q)
                    offsets[i] = len(text)
                    yield chunk(index=i, text=text)
            async for ev in self.events():
                q = ev["seq"]
                i = self.seqs.index(q)
                if ev["type"] == "token" and (ev["text"] or ev["info"] is not None):
                    lp = None
                    if self.req.logprobs is not None and ev["info"] is not None:
                        lp = self.logprobs([ev["info"]], offsets[i])
                    offsets[i] += len(ev["text"])
                    yield chunk(index=i, text=ev["text"], logprobs=lp)
                elif ev["type"] == "done":
                    yield chunk(index=i, text="", finish_reason=q.finish_reason)
            usage = self.finish("200")
            if self.req.stream_options and self.req.stream_options.include_usage:
                yield "data: " + json.dumps({**base, "object": "text_completion", "choices": [],
                                             "usage": usage.model_dump()}) + "\n\n"
        except ObliviateError as e:
            self.finish("500")
            err = ErrorResponse(error=ErrorInfo(message=e.message, type=e.type, param=e.param, code=e.code))
            yield "data: " + err.model_dump_json() + "\n\n"
        yield "data: [DONE]\n\n"
