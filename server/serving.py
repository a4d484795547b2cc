"""Turns a completion request into an engine call and the engine's outputs into a response.

Engine-independent: everything here talks to the engine through server.engine.base.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path

from pydantic import ValidationError

from ablation.spec import ProfileSpec, model_matches
from models.loading import ModelInfo
from models.names import chat_template
from protocol.openai import (ChatCompletionRequest, CompletionRequest, CompletionResponse, DetokenizeRequest,
    DetokenizeResponse, ModelCard, ModelList, ProfileCard, ProfileList, SamplingFields, TokenizeRequest,
    TokenizeResponse, TokenizerInfo, first_error)
from server.engine.base import Engine, Prompt, SamplingParams
from server.errors import Forbidden, InvalidRequest, Unavailable, UnknownModel, UnknownProfile, shown
from server.inflight import EngineCall
from server.keys import OPEN, Access
from server.limits import Admission
from server.metrics import Metrics
from server.responses import ChatResponder, CompletionResponder, Responder
from server.settings import Settings


INLINE = "inline"  # an inline profile's name in responses and metrics
MAX_INLINE = 16  # inline profiles kept installed (least recently used first out)


class CompletionServing:
    def __init__(self, engine: Engine, model: ModelInfo, profiles: dict[str, ProfileSpec], metrics: Metrics,
                 settings: Settings):
        self.engine, self.model, self.specs, self.metrics = engine, model, dict(profiles), metrics
        self.tok = model.tokenizer
        self.max_model_len = min(settings.max_model_len, model.max_len)
        self.max_choices, self.request_timeout = settings.max_choices, settings.request_timeout
        self.trigger_audit = settings.trigger_audit
        self.admission = Admission(settings.max_batch_size, settings.max_queue)
        metrics.in_flight.set_function(lambda: self.admission.in_flight)
        self._prefix_ids = {n: self._tokens(s.prefix) for n, s in profiles.items()}
        # every prompt starts with BOS where the tokenizer puts one (Gemma), not where it does not (SmolLM2)
        b = self.tok.bos_token_id
        self._bos = [b] if b is not None and self.tok("a").input_ids[:1] == [b] else []
        self.chat_template = chat_template(settings.chat_template, self.tok)
        self._inline: OrderedDict[str, ProfileSpec] = OrderedDict()  # installed inline profiles, by spec hash
        self._inline_lock = asyncio.Lock()

    # ---- listing (what the key may use) ------------------------------------------------------
    def models(self, access: Access = OPEN) -> ModelList:
        cards = [ModelCard(id=self.model.name, root=self.model.hf_name, max_model_len=self.max_model_len)]
        for p in access.visible(self.specs):
            for alias in (f"{self.model.name}:{p}", p):
                cards.append(ModelCard(id=alias, root=self.model.name, profile=p, max_model_len=self.max_model_len))
        return ModelList(data=cards)

    def profiles(self, access: Access = OPEN) -> ProfileList:
        return ProfileList(data=[self.card(n) for n in self.specs if access.allows(n)])

    def card(self, name: str) -> ProfileCard:
        s = self.specs[name]
        return ProfileCard(name=name, description=s.description, model=s.model, prefix=s.prefix, adapter=s.adapter,
                           interventions=[iv.model_dump() for iv in s.interventions], version=s.metadata.version)

    # ---- runtime profiles (server/admin.py changes the engine first, then these) ----------------
    def profile_added(self, spec: ProfileSpec) -> None:
        self._prefix_ids[spec.name] = self._tokens(spec.prefix)
        self.specs[spec.name] = spec

    def profile_removed(self, name: str) -> None:
        del self.specs[name]  # requests in flight hold their own prefix ids and engine index

    # ---- the tokenizer (vLLM's /tokenize, /detokenize, /tokenizer_info) ----------------------
    def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        if req.messages is not None:  # as a chat completion's prompt (without a profile's prefix)
            ids = self._tokens(self.render(req))
            ids = self._bos + (ids[1:] if self._bos and ids[:1] == self._bos else ids)
        else:
            ids = self.tok(req.prompt, add_special_tokens=req.add_special_tokens).input_ids
        strs = self.tok.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.max_model_len, tokens=ids, token_strs=strs)

    def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        self._check_ids(req.tokens, "tokens")
        return DetokenizeResponse(prompt=self.tok.decode(req.tokens))

    def tokenizer_info(self) -> TokenizerInfo:
        tok = self.tok
        return TokenizerInfo(tokenizer_class=type(tok).__name__, model_max_length=self.max_model_len,
                             vocab_size=self.model.vocab_size, chat_template=getattr(tok, "chat_template", None),
                             **{name: getattr(tok, name, None) for name in ("bos_token", "eos_token", "pad_token",
                                                                              "unk_token")})

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
        if isinstance(req.profile, dict):
            if from_model:
                raise InvalidRequest(f"model {shown(model)} selects profile {shown(from_model)} but the request "
                                     f"sends an inline profile", param="profile")
            return INLINE
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

    async def engine_profile(self, req: CompletionRequest | ChatCompletionRequest, access: Access) -> tuple[str, str]:
        """-> (the profile the engine serves, its name in responses and metrics)."""
        name = self.resolve_profile(req, access)
        if name != INLINE:
            return name, name
        if not access.inline:
            raise Forbidden(f"the key {access.name!r} may not send inline profiles (needs `inline: true` in the "
                            f"keys file)", param="profile", code="inline_not_allowed")
        spec = self._inline_spec(req.profile)
        key = f"inline-{hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:16]}"
        async with self._inline_lock:
            if key in self._inline:
                self._inline.move_to_end(key)
            else:
                await self.engine.add_profile(key, spec)
                self._prefix_ids[key] = self._tokens(spec.prefix)
                self._inline[key] = spec
                while len(self._inline) > MAX_INLINE:  # the least recently used goes (its requests finish with it)
                    old, _ = self._inline.popitem(last=False)
                    await self.engine.remove_profile(old)
        return key, INLINE

    def spec_from(self, data: dict, param: str | None = None) -> ProfileSpec:
        """A profile spec sent in a request, validated as a profile file is and against the served model.
        param: where the request carried it (an inline `profile`); None: a whole body (the spec's field)."""
        try:
            spec = ProfileSpec.model_validate(data)
        except ValidationError as e:
            where, msg = first_error(e, "profile")
            raise InvalidRequest(f"{param + ': ' if param else ''}{where}: {msg}",
                                 param=param or where.split(".")[0]) from None
        if spec.model is not None and not model_matches(spec.model, self.model.name):
            raise InvalidRequest(f"profile {shown(spec.name)} is for model {shown(spec.model)}, this server serves "
                                 f"{self.model.name!r}", param=param or "model")
        return spec

    def _inline_spec(self, data: dict) -> ProfileSpec:
        """An inline profile spec, checked as a profile file is; its SAEs, steering vectors and adapter must be ones served
        profiles use (by their reference, or by the folder's name): a request never makes the server read
        a file of its choosing."""
        spec = self.spec_from({"name": INLINE, **data}, param="profile")
        known = {iv.sae: iv.sae for s in self.specs.values() for iv in s.interventions}
        known |= {Path(ref).name: ref for ref in list(known) if Path(ref).is_absolute()}
        vectors = {iv.steer.vector for s in self.specs.values() for iv in s.interventions if iv.steer}
        vectors = {v: v for v in vectors} | {Path(v).name: v for v in vectors}
        fixed = []
        for iv in spec.interventions:
            if iv.sae not in known:
                raise InvalidRequest(f"inline profile: SAE {shown(iv.sae)} is not one this server has; its SAEs: "
                                     f"{', '.join(sorted(k for k in known if not Path(k).is_absolute()))}",
                                     param="profile", code="unknown_sae")
            steer = iv.steer
            if steer is not None:
                if steer.vector not in vectors:
                    raise InvalidRequest(f"inline profile: steering vector {shown(steer.vector)} is not one this "
                                         f"server has; its vectors: "
                                         f"{', '.join(sorted(k for k in vectors if not Path(k).is_absolute())) or 'none'}",
                                         param="profile", code="unknown_steering_vector")
                steer = steer.model_copy(update={"vector": vectors[steer.vector]})
            fixed.append(iv.model_copy(update={"sae": known[iv.sae], "steer": steer}))
        adapters = {s.adapter for s in self.specs.values() if s.adapter}
        adapters = {a: a for a in adapters} | {Path(a).name: a for a in adapters}
        if spec.adapter is not None and spec.adapter not in adapters:
            raise InvalidRequest(f"inline profile: adapter {shown(spec.adapter)} is not one this server has; its "
                                 f"adapters: {', '.join(sorted(k for k in adapters if not Path(k).is_absolute())) or 'none'}",
                                 param="profile", code="unknown_adapter")
        return spec.model_copy(update={"interventions": fixed, "adapter": adapters.get(spec.adapter)})

    def _tokens(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids if text else []

    def sampling_params(self, req: SamplingFields, max_tokens: int, logprobs: int | None = None,
                        prompt_logprobs: bool = False) -> SamplingParams:
        """The request's sampling fields, checked with vLLM's rules and messages."""
        def check(ok: bool, param: str, message: str) -> None:
            if not ok:
                raise InvalidRequest(message, param=param)

        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(req, name)
            check(math.isfinite(value) and -2.0 <= value <= 2.0, name, f"{name} must be in [-2, 2], got {value}.")
        rep = req.repetition_penalty
        check(math.isfinite(rep) and rep > 0, "repetition_penalty",
              f"repetition_penalty must be a finite number greater than zero, got {rep}.")
        top_k = req.top_k or 0
        check(top_k >= -1, "top_k", f"top_k must be 0 (disable), or at least 1, got {top_k}.")
        check(0.0 <= req.min_p <= 1.0, "min_p", f"min_p must be in [0, 1], got {req.min_p}.")
        check(req.min_tokens >= 0, "min_tokens",
              f"min_tokens must be greater than or equal to 0, got {req.min_tokens}.")
        check(req.min_tokens <= max_tokens, "min_tokens",
              f"min_tokens must be less than or equal to max_tokens={max_tokens}, got {req.min_tokens}.")
        check(len(req.stop_list()) <= 4, "stop", "at most 4 stop sequences")
        bias = []
        for token, value in (req.logit_bias or {}).items():
            check(token.strip().lstrip("-").isdigit(), "logit_bias",
                  f"logit_bias contains a key that is not an integer token id: {shown(token)}")
            check(math.isfinite(value), "logit_bias", f"logit_bias values must be finite numbers, got {value}")
            bias.append((int(token), min(100.0, max(-100.0, value))))  # clamped, as vLLM and OpenAI do
        self._check_ids([t for t, _ in bias], "logit_bias", "logit_bias: ")
        self._check_ids(req.stop_token_ids or [], "stop_token_ids", "stop_token_ids: ")
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                              stop=req.stop_list(), seed=req.seed, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                              ignore_eos=req.ignore_eos, top_k=max(top_k, 0), min_p=req.min_p,
                              presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                              repetition_penalty=rep, logit_bias=tuple(bias), min_tokens=req.min_tokens,
                              stop_token_ids=tuple(req.stop_token_ids or ()))

    def completion_params(self, req: CompletionRequest) -> SamplingParams:
        if req.best_of not in (None, req.n):
            raise InvalidRequest("best_of is not supported (leave it unset or equal to n)", param="best_of")
        if req.suffix:
            raise InvalidRequest("suffix is not supported", param="suffix")
        return self.sampling_params(req, req.max_tokens, req.logprobs, req.echo and req.logprobs is not None)

    def build(self, prompts: list[str] | list[list[int]], max_tokens: int | None, profile: str) -> list[Prompt]:
        """Prompts as token ids (a BOS of their own dropped: the context has it), checked against the
        vocabulary and the context length; max_tokens None: the rest of the context."""
        bos = self._bos
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                ids = self._tokens(p)
            else:
                self._check_ids(p, "prompt", f"prompt {i}: ")
                ids = list(p)
            ids = ids[1:] if bos and ids[:1] == bos else ids
            ctx = bos + self._prefix_ids[profile]
            wanted = 1 if max_tokens is None else max_tokens
            total = len(ctx) + len(ids) + wanted
            if total > self.max_model_len:
                raise InvalidRequest(
                    f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                    f"requested {total} tokens ({len(ctx) + len(ids)} in the prompt, {wanted} for "
                    f"the completion). Please reduce the prompt or max_tokens.",
                    param="prompt" if max_tokens is not None else "messages", code="context_length_exceeded")
            out.append(Prompt(ctx, ids))
        if not out:
            raise InvalidRequest("prompt must not be empty", param="prompt")
        return out

    def check_fan_out(self, n_prompts: int, n: int) -> None:
        """A request larger than the server could ever take is a 400, not a 429 to retry forever."""
        most = min(self.max_choices, self.admission.capacity)
        if n_prompts * n > most:
            raise InvalidRequest(
                f"this request asks for {n_prompts * n} completions ({n_prompts} prompts x n={n}); at most "
                f"{most} a request (the server's --max-choices, or --max-batch-size + --max-queue): split it",
                code="too_many_choices", param="prompt" if n_prompts > 1 else "n")

    def _check_health(self) -> None:
        if not self.engine.health():
            raise Unavailable(f"the {self.engine.name} engine is not running (see the server log)")

    def edits(self, profile: str) -> bool:
        """Whether the engine's profile edits the model (its choices carry the trigger audit)."""
        spec = self._inline.get(profile) or self.specs.get(profile)
        return self.trigger_audit and bool(spec and spec.interventions)

    async def create(self, req: CompletionRequest, access: Access = OPEN) -> CompletionResponse | AsyncIterator[str]:
        self._check_health()
        profile, label = await self.engine_profile(req, access)
        params = self.completion_params(req)
        self.check_fan_out(len(req.prompts()), req.n)
        prompts = await asyncio.to_thread(self.build, req.prompts(), req.max_tokens, profile)  # off the event loop
        call = EngineCall(self.engine, self.admission, self.metrics, self.request_timeout, profile, params, prompts,
                          req.n, access.name, label=label, audited=self.edits(profile))
        return await _respond(CompletionResponder(call, req, self.tok, self.model.name), req.stream)

    # ---- chat: messages rendered with the chat template, then served as a completion ----------
    def render(self, req: ChatCompletionRequest | TokenizeRequest) -> str:
        if self.chat_template is None:
            raise InvalidRequest(f"the model {self.model.name!r} has no chat template: start the server with "
                                 f"--chat-template FILE (a Jinja template, as vLLM's flag) or use /v1/completions",
                                 param="messages", code="no_chat_template")
        if req.continue_final_message and (req.add_generation_prompt or req.messages[-1].role != "assistant"):
            raise InvalidRequest("continue_final_message needs add_generation_prompt false and an assistant "
                                 "message last", param="continue_final_message")
        messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in req.messages]
        try:
            return self.tok.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                add_generation_prompt=req.add_generation_prompt,
                                                continue_final_message=req.continue_final_message)
        except Exception as e:  # a template may raise anything (jinja2's errors, its own raise_exception)
            raise InvalidRequest(f"the chat template cannot render these messages: {e}", param="messages") from None

    def _chat_prompt(self, req: ChatCompletionRequest, profile: str) -> tuple[Prompt, SamplingParams]:
        if req.top_logprobs and not req.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        [prompt] = self.build([self.render(req)], max_tokens, profile)
        if max_tokens is None:  # as vLLM: the rest of the context
            max_tokens = self.max_model_len - len(prompt.input_ids)
        return prompt, self.sampling_params(req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None)

    async def create_chat(self, req: ChatCompletionRequest, access: Access = OPEN):
        self._check_health()
        profile, label = await self.engine_profile(req, access)
        self.check_fan_out(1, req.n)
        prompt, params = await asyncio.to_thread(self._chat_prompt, req, profile)  # rendering, tokenizing
        call = EngineCall(self.engine, self.admission, self.metrics, self.request_timeout, profile, params, [prompt],
                          req.n, access.name, prefix="chatcmpl", label=label, audited=self.edits(profile))
        return await _respond(ChatResponder(call, req, self.tok, self.model.name), req.stream)


async def _respond(run: Responder, stream: bool):
    """The whole response, or its stream: admission and errors before the first chunk are answered as
    HTTP errors."""
    if not stream:
        return await run.collect()
    chunks = run.stream()
    first = await anext(chunks)
    return _prepend(first, chunks)


async def _prepend(first: str, rest: AsyncIterator[str]) -> AsyncIterator[str]:
    yield first
    async for x in rest:
        yield x
