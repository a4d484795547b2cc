"""Engine outputs as a response (a completion or a chat completion): whole, or server-sent events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from pydantic import BaseModel

from protocol.openai import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionResponse,
    ChatDelta, ChatLogprob, ChatLogprobs, ChatTokenLogprob, CompletionChoice, CompletionRequest, CompletionResponse,
    ErrorInfo, ErrorResponse, Logprobs, Unlearning, Usage)
from server.engine.base import ChoiceOutput, TokenLogprob
from server.errors import ObliviateError
from server.inflight import EngineCall


@dataclass
class _Choice:
    text: str = ""
    tokens: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    trigger: int | None = None


class Responder:
    """One request's response, built from its engine call: collected whole, or streamed as server-sent
    events. Subclasses give the format: response(), opening() and chunks()."""

    def __init__(self, call: EngineCall, req, tok, model_name: str):
        self.call, self.req, self.tok = call, req, tok
        self.model_name = req.model or model_name
        self.output_ids = [[] for _ in range(call.choices)] if call.audited else None  # what the audit may name

    def track(self, out: ChoiceOutput) -> None:
        if self.output_ids is not None:
            self.output_ids[out.index] += [t.token_id for t in out.tokens]

    def unlearning(self, index: int, trigger: int | None) -> Unlearning | None:
        """The trigger audit of a finished choice (None for a profile that does not edit the model)."""
        if not self.call.audited:
            return None
        if trigger is None:
            return Unlearning(triggered=False)
        ids = self.call.prompts[index // self.call.n].input_ids + self.output_ids[index]
        return Unlearning(triggered=True, first_token=trigger,
                          token=self.tok.decode([ids[trigger]]) if trigger < len(ids) else None)

    @property
    def include_usage(self) -> bool:
        return bool(self.req.stream_options and self.req.stream_options.include_usage)

    async def collect(self):
        got = [_Choice() for _ in range(self.call.choices)]
        with self.call.admitted():
            try:
                async for out in self.call.outputs():
                    self.track(out)
                    c = got[out.index]
                    c.text += out.text
                    c.tokens += out.tokens
                    c.prompt_logprobs = out.prompt_logprobs if out.prompt_logprobs is not None else c.prompt_logprobs
                    c.finish_reason = out.finish_reason or c.finish_reason
                    c.trigger = out.trigger if out.trigger is not None else c.trigger
            except (ObliviateError, asyncio.CancelledError) as e:
                self.call.ended_by(e)
                raise
        return self.response(got, self.call.end(200))

    async def stream(self) -> AsyncIterator[str]:
        """Server-sent events. An error before the first chunk propagates (the route answers it with its
        status); after it, an error chunk follows, then [DONE]."""
        sent = False
        with self.call.admitted():
            try:
                for c in self.opening():
                    sent = True
                    yield c
                async for out in self.call.outputs():
                    self.track(out)
                    for c in self.chunks(out):
                        sent = True
                        yield c
                usage = self.call.end(200)
                if self.include_usage:
                    yield self.usage_chunk(usage)
            except ObliviateError as e:
                self.call.ended_by(e)
                if not sent:
                    raise
                err = ErrorResponse(error=ErrorInfo(message=e.message, type=e.type, param=e.param, code=e.code))
                yield "data: " + err.model_dump_json() + "\n\n"
            except (asyncio.CancelledError, GeneratorExit) as e:
                self.call.ended_by(e)
                raise
        yield "data: [DONE]\n\n"

    def response(self, got: list[_Choice], usage: Usage): ...

    def opening(self) -> list[str]:
        return []

    def chunks(self, out: ChoiceOutput) -> list[str]: ...

    def usage_chunk(self, usage: Usage) -> str: ...


def _event(model: BaseModel) -> str:
    return "data: " + model.model_dump_json(exclude_none=True) + "\n\n"


class CompletionResponder(Responder):
    """A /v1/completions response."""

    def __init__(self, call: EngineCall, req: CompletionRequest, tok, model_name: str):
        super().__init__(call, req, tok, model_name)
        self.offsets = [0] * call.choices  # text offsets of streamed logprobs

    def _prompt_text(self, index: int) -> str:
        p = self.req.prompts()[index // self.req.n]
        return p if isinstance(p, str) else self.tok.decode(p)  # token ids echo as sent (a BOS included)

    def _echoed(self, index: int, prompt_logprobs: list[TokenLogprob] | None) -> list[TokenLogprob]:
        """The prompt's tokens as the client sent them; the first has no logprob (as in OpenAI and vLLM)."""
        p = self.req.prompts()[index // self.req.n]
        lps = list(prompt_logprobs or [])
        if not isinstance(p, str) and len(p) > len(self.call.prompts[index // self.req.n].prompt_ids):
            lps.insert(0, TokenLogprob(p[0]))  # the BOS the client sent (the engine saw it as context)
        return [TokenLogprob(lps[0].token_id), *lps[1:]] if lps else lps

    def response(self, got: list[_Choice], usage: Usage) -> CompletionResponse:
        choices = []
        for i, c in enumerate(got):
            echo = self._prompt_text(i) if self.req.echo else ""
            infos = self._echoed(i, c.prompt_logprobs) + c.tokens if self.req.echo else c.tokens
            lp = self.logprobs(infos, 0) if self.req.logprobs is not None else None
            choices.append(CompletionChoice(index=i, text=echo + c.text, logprobs=lp, finish_reason=c.finish_reason,
                                            unlearning=self.unlearning(i, c.trigger)))
        return CompletionResponse(id=self.call.id, model=self.model_name, choices=choices, usage=usage,
                                  profile=self.call.label)

    def logprobs(self, infos: list[TokenLogprob], offset: int) -> Logprobs:
        dec = lambda t: self.tok.decode([t])  # noqa: E731
        out = Logprobs(top_logprobs=[] if self.req.logprobs else None)
        for info in infos:
            out.tokens.append(dec(info.token_id))
            out.token_logprobs.append(info.logprob)
            out.text_offset.append(offset)
            offset += len(out.tokens[-1])
            if self.req.logprobs:
                out.top_logprobs.append({dec(t): v for t, v in info.top.items()} if info.top else None)
        return out

    def _chunk(self, **choice) -> str:
        return _event(CompletionResponse(id=self.call.id, model=self.model_name, profile=self.call.label,
                                         choices=[CompletionChoice(**choice)]))

    def opening(self) -> list[str]:
        if not self.req.echo:
            return []
        texts = [self._prompt_text(i) for i in range(self.call.choices)]
        self.offsets = [len(t) for t in texts]
        return [self._chunk(index=i, text=t) for i, t in enumerate(texts)]

    def chunks(self, out: ChoiceOutput) -> list[str]:
        i, got = out.index, []
        if out.text or out.tokens:
            lp = self.logprobs(out.tokens, self.offsets[i]) if self.req.logprobs is not None else None
            self.offsets[i] += len(out.text)
            got.append(self._chunk(index=i, text=out.text, logprobs=lp))
        if out.finish_reason:
            got.append(self._chunk(index=i, text="", finish_reason=out.finish_reason,
                                   unlearning=self.unlearning(i, out.trigger)))
        return got

    def usage_chunk(self, usage: Usage) -> str:
        return "data: " + json.dumps({"id": self.call.id, "model": self.model_name, "profile": self.call.label,
                                      "object": "text_completion", "choices": [], "usage": usage.model_dump()}) + "\n\n"


class ChatResponder(Responder):
    """A /v1/chat/completions response: the assistant's message, logprobs in chat's per-token form."""

    def logprobs(self, infos: list[TokenLogprob]) -> ChatLogprobs | None:
        if not self.req.logprobs:
            return None

        def one(t: int, lp: float) -> ChatLogprob:
            text = self.tok.decode([t])
            return ChatLogprob(token=text, logprob=lp, bytes=list(text.encode()))

        return ChatLogprobs(content=[
            ChatTokenLogprob(**one(i.token_id, i.logprob).model_dump(),
                             top_logprobs=[one(t, v) for t, v in sorted((i.top or {}).items(), key=lambda x: -x[1])])
            for i in infos])

    def response(self, got: list[_Choice], usage: Usage) -> ChatCompletionResponse:
        choices = [ChatChoice(index=i, message=AssistantMessage(content=c.text), logprobs=self.logprobs(c.tokens),
                              finish_reason=c.finish_reason, unlearning=self.unlearning(i, c.trigger))
                   for i, c in enumerate(got)]
        return ChatCompletionResponse(id=self.call.id, model=self.model_name, choices=choices, usage=usage,
                                      profile=self.call.label)

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        return _event(ChatCompletionChunk(id=self.call.id, model=self.model_name, profile=self.call.label,
                                          choices=choices, usage=usage))

    def opening(self) -> list[str]:
        """As OpenAI: each choice's first chunk says the role."""
        return [self._chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
                for i in range(self.call.choices)]

    def chunks(self, out: ChoiceOutput) -> list[str]:
        got = []
        if out.text or out.tokens:
            got.append(self._chunk([ChatChunkChoice(index=out.index, delta=ChatDelta(content=out.text),
                                                    logprobs=self.logprobs(out.tokens))]))
        if out.finish_reason:
            got.append(self._chunk([ChatChunkChoice(index=out.index, delta=ChatDelta(), finish_reason=out.finish_reason,
                                                    unlearning=self.unlearning(out.index, out.trigger))]))
        return got

    def usage_chunk(self, usage: Usage) -> str:
        return self._chunk([], usage)
