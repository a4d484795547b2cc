"""build_app(settings): routers, error handlers, and a lifespan that loads the model and SAEs once."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ablation.hooks import ProfileTable
from ablation.profiles import load_profiles
from server.engine import Engine
from server.errors import ObliviateError
from server.metrics import Metrics
from server.models import load_model
from server.protocol import ErrorInfo, ErrorResponse
from server.routes import api, ops
from server.serving import CompletionServing
from server.settings import Settings

log = logging.getLogger("obliviate.app")


def error_response(status: int, message: str, type_: str, param=None, code=None) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type=type_, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid":
        return f"malformed JSON body: {err.get('ctx', {}).get('error', err['msg'])}", None
    param = loc[0] if loc else None
    where = ".".join(loc) or "body"
    return f"{where}: {err['msg']}", param


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ObliviateError)
    async def _obliviate(_: Request, e: ObliviateError):
        return error_response(e.status_code, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError):
        msg, param = validation_message(e)
        return error_response(400, msg, "invalid_request_error", param)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, e: HTTPException):
        return error_response(e.status_code, str(e.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception):
        log.exception("unexpected error")
        return error_response(500, f"internal error: {type(e).__name__}: {e}", "server_error")


def build_app(settings: Settings, lm=None, table: ProfileTable | None = None) -> FastAPI:
    """`lm`/`table` may be loaded by the caller (the CLI, to report errors before serving; tests,
    to share one model); otherwise the lifespan loads them."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        model = lm or load_model(settings.model, settings.cache_dir, settings.device, settings.dtype)
        tbl = table or ProfileTable(load_profiles(settings.profiles, model.name), model.device, model.dtype)
        engine = Engine(model, tbl, settings.max_batch_size)
        metrics = Metrics()
        metrics.watch(engine)
        engine.start()
        app.state.metrics = metrics
        app.state.serving = CompletionServing(engine, model, tbl, metrics, settings.max_model_len)
        log.info("serving %s with profiles: %s", model.name, ", ".join(tbl.names))
        try:
            yield
        finally:
            engine.shutdown()

    app = FastAPI(title="obliviate", lifespan=lifespan)
    app.state.settings = settings
    add_error_handlers(app)
    app.include_router(api)
    app.include_router(ops)
    return app
