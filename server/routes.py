"""HTTP routes: thin handlers that take the serving object from app.state."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.errors import Unauthorized
from server.protocol import CompletionRequest, ModelList, ProfileList
from server.serving import CompletionServing


def serving(request: Request) -> CompletionServing:
    return request.app.state.serving


def check_key(request: Request) -> None:
    key = request.app.state.settings.api_key
    if key and request.headers.get("authorization") != f"Bearer {key}":
        raise Unauthorized("missing or wrong API key (send 'Authorization: Bearer <key>')")


Serving = Annotated[CompletionServing, Depends(serving)]
api = APIRouter(dependencies=[Depends(check_key)])
ops = APIRouter()


@api.post("/v1/completions")
async def create_completion(req: CompletionRequest, s: Serving):
    result = await s.create(req)
    if req.stream:
        return StreamingResponse(result, media_type="text/event-stream")
    return JSONResponse(result.model_dump(exclude_none=True))


@api.get("/v1/models")
async def list_models(s: Serving) -> ModelList:
    return s.models()


@api.get("/v1/profiles")
async def list_profiles(s: Serving) -> ProfileList:
    return s.profiles()


@ops.get("/health")
async def health(s: Serving) -> JSONResponse:
    ok = s.engine.health()
    body = {"status": "ok" if ok else "unavailable", "engine": s.engine.name, "model": s.model.name,
            "profiles": list(s.specs)}
    return JSONResponse(body, status_code=200 if ok else 503)


@ops.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
