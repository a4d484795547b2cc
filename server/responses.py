"""Engine outputs as a completion response: the whole response, or server-sent events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from protocol.openai import CompletionChoice, CompletionRequest, CompletionResponse, ErrorInfo, ErrorResponse, Logprobs
from server.engine.base import TokenLogprob
from server.errors import ObliviateError
from server.inflight import EngineCall


@dataclass
class _Choice:
    text: str = ""
    tokens: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None


class CompletionResponder:
    """One /v1/completions request's response, built from its engine call."""

    def __init__(self, call: EngineCall, req: CompletionRequest, tok, model_name: str):
        self.call, self.req, self.tok = call, req, tok
        self.model_name = req.model or model_name

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

    async def collect(self) -> CompletionResponse:
        got = [_Choice() for _ in range(len(self.call.prompts) * self.req.n)]
        with self.call.admitted():
            try:
                async for out in self.call.outputs():
                    c = got[out.index]
                    c.text += out.text
                    c.tokens += out.tokens
                    c.prompt_logprobs = out.prompt_logprobs if out.prompt_logprobs is not None else c.prompt_logprobs
                    c.finish_reason = out.finish_reason or c.finish_reason
            except (ObliviateError, asyncio.CancelledError) as e:
                self.call.ended_by(e)
                raise
        choices = []
        for i, c in enumerate(got):
            echo = self._prompt_text(i) if self.req.echo else ""
            infos = self._echoed(i, c.prompt_logprobs) + c.tokens if self.req.echo else c.tokens
            lp = self.logprobs(infos, 0) if self.req.logprobs is not None else None
            choices.append(CompletionChoice(index=i, text=echo + c.text, logprobs=lp, finish_reason=c.finish_reason))
        usage = self.call.end(200)
        return CompletionResponse(id=self.call.id, model=self.model_name, choices=choices, usage=usage,
                                  profile=self.call.profile)

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

    async def stream(self) -> AsyncIterator[str]:
        """Server-sent events. An error before the first chunk propagates (the route answers it with its
        status); after it, an error chunk follows, then [DONE]."""
        base = dict(id=self.call.id, model=self.model_name, profile=self.call.profile)
        chunk = lambda **c: "data: " + CompletionResponse(  # noqa: E731
            choices=[CompletionChoice(**c)], **base).model_dump_json(exclude_none=True) + "\n\n"
        offsets = [0] * (len(self.call.prompts) * self.req.n)
        sent = False
        with self.call.admitted():
            try:
                if self.req.echo:
                    for i in range(len(offsets)):
                        text = self._prompt_text(i)
                        offsets[i] = len(text)
                        sent = True
                        yield chunk(index=i, text=text)
                async for out in self.call.outputs():
                    i = out.index
                    if out.text or out.tokens:
                        lp = self.logprobs(out.tokens, offsets[i]) if self.req.logprobs is not None else None
                        offsets[i] += len(out.text)
                        sent = True
                        yield chunk(index=i, text=out.text, logprobs=lp)
                    if out.finish_reason:
                        sent = True
                        yield chunk(index=i, text="", finish_reason=out.finish_reason)
                usage = self.call.end(200)
                if self.req.stream_options and self.req.stream_options.include_usage:
                    yield "data: " + json.dumps({**base, "object": "text_completion", "choices": [],
                                                 "usage": usage.model_dump()}) + "\n\n"
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


