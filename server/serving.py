"""Turns a completion request into an engine call and the engine's outputs into a response.

Engine-independent: everything here talks to the engine through server.engine.base.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ablation.spec import ProfileSpec
from server.engine.base import ChoiceOutput, Engine, EngineError, Prompt, SamplingParams, TokenLogprob
from server.errors import EngineFailure, InvalidRequest, ObliviateError, UnknownModel, UnknownProfile
from server.metrics import Metrics
from server.models import ModelInfo
from server.protocol import (
    CompletionChoice, CompletionRequest, CompletionResponse, ErrorInfo, ErrorResponse, Logprobs,
    ModelCard, ModelList, ProfileCard, ProfileList, Usage,
)


class CompletionServing:
    def __init__(self, engine: Engine, model: ModelInfo, profiles: dict[str, ProfileSpec], metrics: Metrics,
                 max_model_len: int):
        self.engine, self.model, self.specs, self.metrics = engine, model, profiles, metrics
        self.tok = model.tokenizer
        self.max_model_len = min(max_model_len, model.max_len)
        self._prefix_ids = {n: self._tokens(s.prefix) for n, s in profiles.items()}

    # ---- listing -----------------------------------------------------------------------------
    def models(self) -> ModelList:
        cards = [ModelCard(id=self.model.name, root=self.model.hf_name, max_model_len=self.max_model_len)]
        for p in self.specs:
            for alias in (f"{self.model.name}:{p}", p):
                cards.append(ModelCard(id=alias, root=self.model.name, profile=p, max_model_len=self.max_model_len))
        return ModelList(data=cards)

    def profiles(self) -> ProfileList:
        return ProfileList(data=[
            ProfileCard(name=n, description=s.description, model=s.model, prefix=s.prefix,
                        interventions=[iv.model_dump() for iv in s.interventions], version=s.metadata.version)
            for n, s in self.specs.items()])

    # ---- request -> engine call --------------------------------------------------------------
    def resolve_profile(self, req: CompletionRequest) -> str:
        """The profile comes from the `profile` field or the model name (`name:profile` or `profile`)."""
        model = req.model or self.model.name
        served = {self.model.name, self.model.hf_name}
        from_model = None
        if model not in served:
            base, _, suffix = model.rpartition(":")
            if base in served and suffix:
                from_model = suffix
            elif model in self.specs:
                from_model = model
            else:
                raise UnknownModel(model, [c.id for c in self.models().data])
        if from_model and req.profile and from_model != req.profile:
            raise InvalidRequest(f"model {model!r} selects profile {from_model!r} but the request's "
                                 f"profile field says {req.profile!r}", param="profile")
        name = req.profile or from_model or "baseline"
        if name not in self.specs:
            raise UnknownProfile(name, list(self.specs))
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

    def build(self, req: CompletionRequest, profile: str) -> list[Prompt]:
        """The request's prompts as token ids, checked against the vocabulary and the context length."""
        bos = [self.tok.bos_token_id] if self.tok.bos_token_id is not None else []
        vocab = self.model.vocab_size
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
            out.append(Prompt(ctx, ids))
        if not out:
            raise InvalidRequest("prompt must not be empty", param="prompt")
        return out

    async def create(self, req: CompletionRequest) -> CompletionResponse | AsyncIterator[str]:
        profile = self.resolve_profile(req)
        try:
            params = self.sampling_params(req)
            prompts = await asyncio.to_thread(self.build, req, profile)  # tokenizing: off the event loop
        except ObliviateError:
            self.metrics.requests.labels(profile, "400").inc()
            raise
        run = _Run(self, req, profile, params, prompts)
        return run.stream() if req.stream else await run.collect()


@dataclass
class _Choice:
    text: str = ""
    tokens: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None


class _Run:
    """One request in flight: the engine's outputs, assembled into a response or a stream."""

    def __init__(self, serving: CompletionServing, req: CompletionRequest, profile: str, params: SamplingParams,
                 prompts: list[Prompt]):
        self.s, self.req, self.profile, self.params, self.prompts = serving, req, profile, params, prompts
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.t0 = time.perf_counter()
        self.first_token_at: float | None = None
        self.prompt_tokens = sum(len(p.input_ids) for p in prompts) * req.n
        self.generated: dict[int, int] = {}

    async def outputs(self) -> AsyncIterator[ChoiceOutput]:
        try:
            async for out in self.s.engine.generate(self.id, self.prompts, self.params, self.profile, self.req.n):
                if out.tokens and self.first_token_at is None:
                    self.first_token_at = time.perf_counter()
                    self.s.metrics.ttft.labels(self.profile).observe(self.first_token_at - self.t0)
                self.generated[out.index] = out.num_generated_tokens
                yield out
        except EngineError as e:
            raise EngineFailure(str(e)) from None

    def finish(self, status: str) -> Usage:
        m = self.s.metrics
        gen = sum(self.generated.values())
        m.requests.labels(self.profile, status).inc()
        m.prompt_tokens.labels(self.profile).inc(self.prompt_tokens)
        m.generation_tokens.labels(self.profile).inc(gen)
        m.e2e.labels(self.profile).observe(time.perf_counter() - self.t0)
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=gen, total_tokens=self.prompt_tokens + gen)

    def _prompt_text(self, index: int) -> str:
        p = self.req.prompts()[index // self.req.n]
        return p if isinstance(p, str) else self.s.tok.decode(self.prompts[index // self.req.n].prompt_ids)

    async def collect(self) -> CompletionResponse:
        got = [_Choice() for _ in range(len(self.prompts) * self.req.n)]
        try:
            async for out in self.outputs():
                c = got[out.index]
                c.text += out.text
                c.tokens += out.tokens
                c.prompt_logprobs = out.prompt_logprobs if out.prompt_logprobs is not None else c.prompt_logprobs
                c.finish_reason = out.finish_reason or c.finish_reason
        except ObliviateError:
            self.finish("500")
            raise
        choices = []
        for i, c in enumerate(got):
            echo = self._prompt_text(i) if self.req.echo else ""
            infos = (c.prompt_logprobs or []) + c.tokens if self.req.echo else c.tokens
            lp = self.logprobs(infos, 0) if self.req.logprobs is not None else None
            choices.append(CompletionChoice(index=i, text=echo + c.text, logprobs=lp, finish_reason=c.finish_reason))
        usage = self.finish("200")
        return CompletionResponse(id=self.id, model=self.req.model or self.s.model.name, choices=choices, usage=usage,
                                  profile=self.profile)

    def logprobs(self, infos: list[TokenLogprob], offset: int) -> Logprobs:
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
        base = dict(id=self.id, model=self.req.model or self.s.model.name, profile=self.profile)
        chunk = lambda **c: "data: " + CompletionResponse(  # noqa: E731
            choices=[CompletionChoice(**c)], **base).model_dump_json(exclude_none=True) + "\n\n"
        offsets = [0] * (len(self.prompts) * self.req.n)
        try:
            if self.req.echo:
                for i in range(len(offsets)):
                    text = self._prompt_text(i)
                    offsets[i] = len(text)
                    yield chunk(index=i, text=text)
            async for out in self.outputs():
                i = out.index
                if out.text or out.tokens:
                    lp = self.logprobs(out.tokens, offsets[i]) if self.req.logprobs is not None else None
                    offsets[i] += len(out.text)
                    yield chunk(index=i, text=out.text, logprobs=lp)
                if out.finish_reason:
                    yield chunk(index=i, text="", finish_reason=out.finish_reason)
            usage = self.finish("200")
            if self.req.stream_options and self.req.stream_options.include_usage:
                yield "data: " + json.dumps({**base, "object": "text_completion", "choices": [],
                                             "usage": usage.model_dump()}) + "\n\n"
        except ObliviateError as e:
            self.finish("500")
            err = ErrorResponse(error=ErrorInfo(message=e.message, type=e.type, param=e.param, code=e.code))
            yield "data: " + err.model_dump_json() + "\n\n"
        yield "data: [DONE]\n\n"
