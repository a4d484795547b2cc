"""A small typed client for obliviate (or any OpenAI-compatible completions server), sync and async.

Retries on 429, 5xx and connection errors (after the server's Retry-After, else with exponential
backoff); raises `APIError` carrying the
server's OpenAI-style error message. The profile travels as the `profile` field, or, for servers
that only understand model names, as `model="<model>:<profile>"` (`profile_via="model"`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Literal

import httpx

from protocol.openai import ChatCompletionResponse, CompletionResponse, ModelList, ProfileList, TokenizeResponse

RETRY_STATUS = {429, 500, 502, 503, 504}


class APIError(RuntimeError):
    def __init__(self, status: int, message: str, param: str | None = None, code=None):
        super().__init__(f"{status}: {message}")
        self.status, self.message, self.param, self.code = status, message, param, code


@dataclass
class TokenLogprobs:
    tokens: list[str]
    logprobs: list[float | None]
    offsets: list[int]
    top: list[dict[str, float] | None] | None


class _Base:
    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None,
                 profile_via: Literal["field", "model"] = "field", retries: int = 4, backoff: float = 0.5,
                 timeout: float = 600.0):
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.model, self.profile_via = model, profile_via
        self.retries, self.backoff, self.timeout = retries, backoff, timeout
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def body(self, profile: str | None, **params) -> dict:
        """A request body: `params` (prompt or messages, sampling fields) with the model and profile."""
        body = {k: v for k, v in params.items() if v is not None}
        model = self.model
        if profile and self.profile_via == "model":
            model = f"{model}:{profile}" if model else profile
        elif profile:
            body["profile"] = profile
        if model:
            body["model"] = model
        return body

    @staticmethod
    def raise_for(r: httpx.Response) -> None:
        if r.status_code < 400:
            return
        try:
            err = r.json()["error"]
            raise APIError(r.status_code, err.get("message", r.text), err.get("param"), err.get("code"))
        except (ValueError, KeyError, TypeError):
            raise APIError(r.status_code, r.text[:500]) from None

    def _settle(self, exc: Exception | None, r: httpx.Response | None, attempt: int) -> httpx.Response | None:
        """The response to return, None to retry, or APIError once retrying cannot help."""
        if attempt < self.retries and (exc is not None or r.status_code in RETRY_STATUS):
            return None
        if exc is not None:
            raise APIError(0, f"cannot reach {self.base_url}: {exc}") from exc
        self.raise_for(r)
        return r

    def delay(self, r: httpx.Response | None, attempt: int) -> float:
        """Seconds before retry `attempt + 1`: the server's Retry-After (seconds) if it sent one, as the
        openai client does, else the exponential backoff; at most 60."""
        wait = self.backoff * 2**attempt
        try:
            wait = float(r.headers["retry-after"]) if r is not None and "retry-after" in r.headers else wait
        except ValueError:  # an HTTP date: keep the backoff
            pass
        return min(wait, 60.0)

    @staticmethod
    def prompt_logprobs(resp: CompletionResponse) -> list[TokenLogprobs]:
        out = []
        for c in resp.choices:
            lp = c.logprobs
            if lp is None:
                raise APIError(200, "the server returned no logprobs (it may not support echo + logprobs)")
            out.append(TokenLogprobs(lp.tokens, lp.token_logprobs, lp.text_offset, lp.top_logprobs))
        return out


class Client(_Base):
    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.http = httpx.Client(base_url=self.base_url, headers=self.headers, timeout=self.timeout)

    def request(self, method: str, path: str, **kw) -> httpx.Response:
        for attempt in range(self.retries + 1):
            try:
                r, exc = self.http.request(method, path, **kw), None
            except httpx.TransportError as e:
                r, exc = None, e
            if (done := self._settle(exc, r, attempt)) is not None:
                return done
            time.sleep(self.delay(r, attempt))
        raise AssertionError("unreachable")

    def complete(self, prompt, profile: str | None = None, **params) -> CompletionResponse:
        r = self.request("POST", "/v1/completions", json=self.body(profile, prompt=prompt, **params))
        return CompletionResponse.model_validate(r.json())

    def stream(self, prompt, profile: str | None = None, **params) -> Iterator[CompletionResponse]:
        with self.http.stream("POST", "/v1/completions", json=self.body(profile, prompt=prompt, stream=True, **params)) as r:
            if r.status_code >= 400:
                r.read()
                self.raise_for(r)
            for line in r.iter_lines():
                chunk = _sse(line)
                if chunk is not None:
                    yield chunk

    def logprobs_of(self, prompt, profile: str | None = None, top: int = 0) -> list[TokenLogprobs]:
        """Per-token logprobs of the prompt itself (echo + logprobs, no new tokens)."""
        resp = self.complete(prompt, profile, echo=True, logprobs=top, max_tokens=0, temperature=0)
        return self.prompt_logprobs(resp)

    def models(self) -> ModelList:
        return ModelList.model_validate(self.request("GET", "/v1/models").json())

    def profiles(self) -> ProfileList:
        return ProfileList.model_validate(self.request("GET", "/v1/profiles").json())

    def close(self) -> None:
        self.http.close()


class AsyncClient(_Base):
    def __init__(self, *args, concurrency: int = 8, **kw):
        super().__init__(*args, **kw)
        self.http = httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=self.timeout)
        self.limit = asyncio.Semaphore(concurrency)

    async def request(self, method: str, path: str, **kw) -> httpx.Response:
        async with self.limit:
            for attempt in range(self.retries + 1):
                try:
                    r, exc = await self.http.request(method, path, **kw), None
                except httpx.TransportError as e:
                    r, exc = None, e
                if (done := self._settle(exc, r, attempt)) is not None:
                    return done
                await asyncio.sleep(self.delay(r, attempt))
        raise AssertionError("unreachable")

    async def complete(self, prompt, profile: str | None = None, **params) -> CompletionResponse:
        r = await self.request("POST", "/v1/completions", json=self.body(profile, prompt=prompt, **params))
        return CompletionResponse.model_validate(r.json())

    async def chat(self, messages: list[dict], profile: str | None = None, **params) -> ChatCompletionResponse:
        r = await self.request("POST", "/v1/chat/completions", json=self.body(profile, messages=messages, **params))
        return ChatCompletionResponse.model_validate(r.json())

    async def tokenize(self, **params) -> list[int]:
        """Token ids of a prompt, or of chat messages as the server renders them (vLLM's /tokenize)."""
        body = {**({"model": self.model} if self.model else {}), **{k: v for k, v in params.items() if v is not None}}
        return TokenizeResponse.model_validate((await self.request("POST", "/tokenize", json=body)).json()).tokens

    async def stream(self, prompt, profile: str | None = None, **params) -> AsyncIterator[CompletionResponse]:
        body = self.body(profile, prompt=prompt, stream=True, **params)
        async with self.limit, self.http.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code >= 400:
                await r.aread()
                self.raise_for(r)
            async for line in r.aiter_lines():
                chunk = _sse(line)
                if chunk is not None:
                    yield chunk

    async def logprobs_of(self, prompt, profile: str | None = None, top: int = 0) -> list[TokenLogprobs]:
        resp = await self.complete(prompt, profile, echo=True, logprobs=top, max_tokens=0, temperature=0)
        return self.prompt_logprobs(resp)

    async def models(self) -> ModelList:
        return ModelList.model_validate((await self.request("GET", "/v1/models")).json())

    async def profiles(self) -> ProfileList:
        return ProfileList.model_validate((await self.request("GET", "/v1/profiles")).json())

    async def aclose(self) -> None:
        await self.http.aclose()


def _sse(line: str) -> CompletionResponse | None:
    if not line.startswith("data: ") or line == "data: [DONE]":
        return None
    data = json.loads(line[6:])
    if "error" in data:
        e = data["error"]
        raise APIError(500, e.get("message", "stream failed"), e.get("param"), e.get("code"))
    if not data.get("choices"):
        return None
    return CompletionResponse.model_validate(data)
