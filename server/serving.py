"""Turns a completion request into an engine call and the engine's outputs into a response.

Engine-independent: everything here talks to the engine through server.engine.base.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from ablation.spec import ProfileSpec
from models.loading import ModelInfo
from protocol.openai import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorInfo,
    ErrorResponse,
    Logprobs,
    ModelCard,
    ModelList,
    ProfileCard,
    ProfileList,
    TokenizeRequest,
    TokenizeResponse,
    Usage,
)
from server.engine.base import ChoiceOutput, Engine, EngineError, Prompt, SamplingParams, TokenLogprob
from server.errors import (
    EngineFailure,
    Forbidden,
    InvalidRequest,
    ObliviateError,
    RequestTimeout,
    Unavailable,
    UnknownModel,
    UnknownProfile,
    shown,
)
from server.keys import OPEN, Access
from server.limits import Admission
from server.metrics import Metrics
from server.settings import Settings


class CompletionServing:
    def __init__(self, engine: Engine, model: ModelInfo, profiles: dict[str, ProfileSpec], metrics: Metrics,
                 settings: Settings):
        self.engine, self.model, self.specs, self.metrics = engine, model, profiles, metrics
        self.tok = model.tokenizer
        self.max_model_len = min(settings.max_model_len, model.max_len)
        self.max_choices, self.request_timeout = settings.max_choices, settings.request_timeout
        self.admission = Admission(settings.max_batch_size, settings.max_queue)
        metrics.in_flight.set_function(lambda: self.admission.in_flight)
        self._prefix_ids = {n: self._tokens(s.prefix) for n, s in profiles.items()}

    # ---- listing (what the key may use) ------------------------------------------------------
    def models(self, access: Access = OPEN) -> ModelList:
        cards = [ModelCard(id=self.model.name, root=self.model.hf_name, max_model_len=self.max_model_len)]
        for p in access.visible(self.specs):
            for alias in (f"{self.model.name}:{p}", p):
                cards.append(ModelCard(id=alias, root=self.model.name, profile=p, max_model_len=self.max_model_len))
        return ModelList(data=cards)

    def profiles(self, access: Access = OPEN) -> ProfileList:
        return ProfileList(data=[
            ProfileCard(name=n, description=s.description, model=s.model, prefix=s.prefix,
                        interventions=[iv.model_dump() for iv in s.interventions], version=s.metadata.version)
            for n, s in self.specs.items() if access.allows(n)])

    # ---- the tokenizer (vLLM's /tokenize, /detokenize, /tokenizer_info) ----------------------
    def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        ids = self.tok(req.prompt, add_special_tokens=req.add_special_tokens).input_ids
        strs = self.tok.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.max_model_len, tokens=ids, token_strs=strs)

    def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        self._check_ids(req.tokens, "tokens")
        return DetokenizeResponse(prompt=self.tok.decode(req.tokens))

    def tokenizer_info(self) -> dict:
        tok = self.tok
        info = {"tokenizer_class": type(tok).__name__, "model_max_length": self.max_model_len,
                "vocab_size": self.model.vocab_size, "chat_template": getattr(tok, "chat_template", None)}
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            info[name] = getattr(tok, name, None)
        return info

    def _check_ids(self, ids: list[int], param: str, what: str = "") -> None:
        vocab = self.model.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise InvalidRequest(f"{what}token ids must be in [0, {vocab})", param=param)

    # ---- request -> engine call --------------------------------------------------------------
    def resolve_profile(self, req: CompletionRequest, access: Access = OPEN) -> str:
        """The profile comes from the `profile` field or the model name (`name:profile` or `profile`);
        without either, the key's default. A key may use only its own profiles."""
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
                raise UnknownModel(model, [c.id for c in self.models(access).data])
        if from_model and req.profile and from_model != req.profile:
            raise InvalidRequest(f"model {shown(model)} selects profile {shown(from_model)} but the request's "
                                 f"profile field says {shown(req.profile)}", param="profile")
        name = req.profile or from_model or access.default_profile
        if name not in self.specs:
            raise UnknownProfile(name, access.visible(self.specs))
        if not access.allows(name):
            raise Forbidden(f"the key {access.name!r} may not use profile {shown(name)}; its profiles: "
                            f"{', '.join(access.visible(self.specs))}", param="profile", code="profile_not_allowed")
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
                              prompt_logprobs=req.echo and req.logprobs is not None, ignore_eos=req.ignore_eos)

    def build(self, req: CompletionRequest, profile: str) -> list[Prompt]:
        """The request's prompts as token ids, checked against the vocabulary and the context length."""
        bos = [self.tok.bos_token_id] if self.tok.bos_token_id is not None else []
        out = []
        for i, p in enumerate(req.prompts()):
            if isinstance(p, str):
                ids = self._tokens(p)
            else:
                self._check_ids(p, "prompt", f"prompt {i}: ")
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

    def check_fan_out(self, req: CompletionRequest) -> None:
        """A request larger than the server could ever take is a 400, not a 429 to retry forever."""
        n_prompts, most = len(req.prompts()), min(self.max_choices, self.admission.capacity)
        if n_prompts * req.n > most:
            raise InvalidRequest(
                f"this request asks for {n_prompts * req.n} completions ({n_prompts} prompts x n={req.n}); at most "
                f"{most} a request (the server's --max-choices, or --max-batch-size + --max-queue): split it",
                code="too_many_choices", param="prompt" if n_prompts > 1 else "n")

    async def create(self, req: CompletionRequest, access: Access = OPEN) -> CompletionResponse | AsyncIterator[str]:
        if not self.engine.health():
            raise Unavailable(f"the {self.engine.name} engine is not running (see the server log)")
        profile = self.resolve_profile(req, access)
        params = self.sampling_params(req)
        self.check_fan_out(req)
        prompts = await asyncio.to_thread(self.build, req, profile)  # tokenizing: off the event loop
        run = _Run(self, req, profile, params, prompts, access.name)
        if not req.stream:
            return await run.collect()
        chunks = run.stream()
        first = await anext(chunks)  # admission and errors before the first chunk are answered as HTTP errors
        return _prepend(first, chunks)


@dataclass
class _Choice:
    text: str = ""
    tokens: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None


class _Run:
    """One request in flight: the engine's outputs, assembled into a response or a stream."""

    def __init__(self, serving: CompletionServing, req: CompletionRequest, profile: str, params: SamplingParams,
                 prompts: list[Prompt], key: str):
        self.s, self.req, self.profile, self.params, self.prompts = serving, req, profile, params, prompts
        self.key = key
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.t0 = time.perf_counter()
        self.deadline = asyncio.get_running_loop().time() + serving.request_timeout
        self.first_token_at: float | None = None
        self.prompt_tokens = sum(len(p.input_ids) for p in prompts) * req.n
        self.generated: dict[int, int] = {}
        self.ended = False

    @contextmanager
    def admitted(self):
        """Holds the request's choices in the admission count (429 when full) until it ends."""
        n = len(self.prompts) * self.req.n
        self.s.admission.acquire(n)
        try:
            yield
        finally:
            self.s.admission.release(n)

    async def outputs(self) -> AsyncIterator[ChoiceOutput]:
        """The engine's outputs until the request's deadline; leaving early aborts the engine request."""
        it = self.s.engine.generate(self.id, self.prompts, self.params, self.profile, self.req.n)
        try:
            while True:
                try:
                    async with asyncio.timeout_at(self.deadline):
                        out = await anext(it)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise RequestTimeout(self.s.request_timeout) from None
                if out.tokens and self.first_token_at is None:
                    self.first_token_at = time.perf_counter()
                    self.s.metrics.ttft.labels(self.profile).observe(self.first_token_at - self.t0)
                self.generated[out.index] = out.num_generated_tokens
                yield out
        except EngineError as e:
            raise EngineFailure(str(e)) from None
        finally:
            await it.aclose()

    def end(self, status: int, aborted: str | None = None) -> Usage:
        """Counts the request once, however it ended."""
        m = self.s.metrics
        gen = sum(self.generated.values())
        usage = Usage(prompt_tokens=self.prompt_tokens, completion_tokens=gen, total_tokens=self.prompt_tokens + gen)
        if self.ended:
            return usage
        self.ended = True
        m.requests.labels(self.profile, str(status), self.key).inc()
        if aborted:
            m.aborted.labels(self.profile, aborted).inc()
        m.prompt_tokens.labels(self.profile).inc(self.prompt_tokens)
        m.generation_tokens.labels(self.profile).inc(gen)
        now = time.perf_counter()
        m.e2e.labels(self.profile).observe(now - self.t0)
        per_choice = max(self.generated.values(), default=0)
        if self.first_token_at is not None and per_choice > 1:
            m.per_token.labels(self.profile).observe((now - self.first_token_at) / (per_choice - 1))
        return usage

    def ended_by(self, e: BaseException) -> None:
        if isinstance(e, ObliviateError):
            self.end(e.status_code, "timeout" if isinstance(e, RequestTimeout) else None)
        else:  # the client left (the server cancels on disconnect), or the server is stopping
            self.end(499, "cancelled")

    def _prompt_text(self, index: int) -> str:
        p = self.req.prompts()[index // self.req.n]
        return p if isinstance(p, str) else self.s.tok.decode(p)  # token ids echo as sent (a BOS included)

    def _echoed(self, index: int, prompt_logprobs: list[TokenLogprob] | None) -> list[TokenLogprob]:
        """The prompt's tokens as the client sent them; the first has no logprob (as in OpenAI and vLLM)."""
        p = self.req.prompts()[index // self.req.n]
        lps = list(prompt_logprobs or [])
        if not isinstance(p, str) and len(p) > len(self.prompts[index // self.req.n].prompt_ids):
            lps.insert(0, TokenLogprob(p[0]))  # the BOS the client sent (the engine saw it as context)
        return [TokenLogprob(lps[0].token_id), *lps[1:]] if lps else lps

    async def collect(self) -> CompletionResponse:
        got = [_Choice() for _ in range(len(self.prompts) * self.req.n)]
        with self.admitted():
            try:
                async for out in self.outputs():
                    c = got[out.index]
                    c.text += out.text
                    c.tokens += out.tokens
                    c.prompt_logprobs = out.prompt_logprobs if out.prompt_logprobs is not None else c.prompt_logprobs
                    c.finish_reason = out.finish_reason or c.finish_reason
            except (ObliviateError, asyncio.CancelledError) as e:
                self.ended_by(e)
                raise
        choices = []
        for i, c in enumerate(got):
            echo = self._prompt_text(i) if self.req.echo else ""
            infos = self._echoed(i, c.prompt_logprobs) + c.tokens if self.req.echo else c.tokens
            lp = self.logprobs(infos, 0) if self.req.logprobs is not None else None
            choices.append(CompletionChoice(index=i, text=echo + c.text, logprobs=lp, finish_reason=c.finish_reason))
        usage = self.end(200)
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
        """Server-sent events. An error before the first chunk propagates (the route answers it with its
        status); after it, an error chunk follows, then [DONE]."""
        base = dict(id=self.id, model=self.req.model or self.s.model.name, profile=self.profile)
        chunk = lambda **c: "data: " + CompletionResponse(  # noqa: E731
            choices=[CompletionChoice(**c)], **base).model_dump_json(exclude_none=True) + "\n\n"
        offsets = [0] * (len(self.prompts) * self.req.n)
        sent = False
        with self.admitted():
            try:
                if self.req.echo:
                    for i in range(len(offsets)):
                        text = self._prompt_text(i)
                        offsets[i] = len(text)
                        sent = True
                        yield chunk(index=i, text=text)
                async for out in self.outputs():
                    i = out.index
                    if out.text or out.tokens:
                        lp = self.logprobs(out.tokens, offsets[i]) if self.req.logprobs is not None else None
                        offsets[i] += len(out.text)
                        sent = True
                        yield chunk(index=i, text=out.text, logprobs=lp)
                    if out.finish_reason:
                        sent = True
                        yield chunk(index=i, text="", finish_reason=out.finish_reason)
                usage = self.end(200)
                if self.req.stream_options and self.req.stream_options.include_usage:
                    yield "data: " + json.dumps({**base, "object": "text_completion", "choices": [],
                                                 "usage": usage.model_dump()}) + "\n\n"
            except ObliviateError as e:
                self.ended_by(e)
                if not sent:
                    raise
                err = ErrorResponse(error=ErrorInfo(message=e.message, type=e.type, param=e.param, code=e.code))
                yield "data: " + err.model_dump_json() + "\n\n"
            except (asyncio.CancelledError, GeneratorExit) as e:
                self.ended_by(e)
                raise
        yield "data: [DONE]\n\n"


async def _prepend(first: str, rest: AsyncIterator[str]) -> AsyncIterator[str]:
    yield first
    async for x in rest:
        yield x
