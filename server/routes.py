"""HTTP routes: thin handlers that take the serving object from app.state."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from contextlib import suppress
from typing import Annotated, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from protocol.openai import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, DetokenizeResponse,
    ModelList, ProfileCard, ProfileList, TokenizeRequest, TokenizeResponse, TokenizerInfo)
from server.errors import Unauthorized
from server.keys import OPEN, Access
from server.serving import CompletionServing

T = TypeVar("T")


def serving(request: Request) -> CompletionServing:
    return request.app.state.serving


def access(request: Request) -> Access:
    """The caller's key and what it may use (everything when the server has no keys)."""
    keyring = request.app.state.keyring
    if keyring is None:
        return OPEN
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("missing API key (send 'Authorization: Bearer <key>')", code="missing_api_key")
    found = keyring.lookup(token.strip())
    if found is None:
        raise Unauthorized("invalid API key", code="invalid_api_key")
    return found


async def until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """`work`, cancelled (so the engine stops generating for it) if the client leaves first; then None."""
    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(until_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the server is stopping
        task.cancel()
        raise
    finally:
        watch.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with suppress(asyncio.CancelledError):
        await task
    return None


Serving = Annotated[CompletionServing, Depends(serving)]
Key = Annotated[Access, Depends(access)]
api = APIRouter()
ops = APIRouter()


@api.post("/v1/completions")
async def create_completion(req: CompletionRequest, s: Serving, key: Key, request: Request):
    result = await unless_disconnected(request, s.create(req, key))
    return _answer(result, req.stream)


def _answer(result, stream: bool) -> Response:
    if result is None:
        return Response(status_code=499)  # the client has gone; nobody reads this
    if stream:
        return StreamingResponse(result, media_type="text/event-stream")
    return JSONResponse(result.model_dump(exclude_none=True))


@api.post("/v1/chat/completions")
async def create_chat_completion(req: ChatCompletionRequest, s: Serving, key: Key, request: Request):
    result = await unless_disconnected(request, s.create_chat(req, key))
    return _answer(result, req.stream)


@api.get("/v1/models")
async def list_models(s: Serving, key: Key) -> ModelList:
    return s.models(key)


@api.get("/v1/profiles")
async def list_profiles(s: Serving, key: Key) -> ProfileList:
    return s.profiles(key)


@api.post("/v1/profiles", status_code=201, openapi_extra={"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object"}}, "application/yaml": {"schema": {"type": "string"}}}}})
async def add_profile(request: Request, key: Key) -> ProfileCard:
    """A profile spec as JSON or YAML text (as a profile file); admin keys only."""
    return await request.app.state.admin.add(await request.body(), key, _host(request))


@api.delete("/v1/profiles/{name}")
async def remove_profile(name: str, request: Request, key: Key) -> dict:
    return await request.app.state.admin.remove(name, key, _host(request))


def _host(request: Request) -> str | None:
    return request.client.host if request.client else None


@api.post("/tokenize")
async def tokenize(req: TokenizeRequest, s: Serving, key: Key) -> TokenizeResponse:
    return await asyncio.to_thread(s.tokenize, req)  # off the event loop, as completions


@api.post("/detokenize")
async def detokenize(req: DetokenizeRequest, s: Serving, key: Key) -> DetokenizeResponse:
    return await asyncio.to_thread(s.detokenize, req)


@api.get("/tokenizer_info")
async def tokenizer_info(s: Serving, key: Key) -> TokenizerInfo:
    return s.tokenizer_info()


@ops.get("/health")
async def health(s: Serving) -> JSONResponse:
    ok = s.engine.health()
    body = {"status": "ok" if ok else "unavailable", "engine": s.engine.name, "model": s.model.name}
    return JSONResponse(body, status_code=200 if ok else 503)


@ops.get("/metrics")
async def metrics(request: Request) -> Response:
    metrics = request.app.state.metrics
    return Response(await metrics.scrape(metrics), media_type=CONTENT_TYPE_LATEST)
