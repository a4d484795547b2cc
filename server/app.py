"""build_app(settings): routers, error handlers, and a lifespan that loads the model and SAEs once."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ablation.adapters import adapter_rank
from ablation.hooks import ProfileTable
from ablation.spec import ProfileSpec, load_profiles
from models.loading import LoadedModel, ModelInfo, dtype_name, load_info, load_model
from protocol.openai import ErrorInfo, ErrorResponse, first_error
from server.engine.base import Engine, LoraOptions
from server.engine.builtin import BuiltinEngine
from server.errors import InvalidRequest, ObliviateError
from server.keys import Keyring
from server.limits import BodyLimit
from server.metrics import Metrics
from server.routes import api, ops
from server.admin import ProfileAdmin
from server.serving import CompletionServing
from server.settings import VLLM_LORA_RANKS, Settings

log = logging.getLogger("obliviate.app")


def error_response(status: int, message: str, type_: str, param=None, code=None, headers=None) -> JSONResponse:
    message = message.encode("utf-8", "backslashreplace").decode()  # whatever text an exception carried
    body = ErrorResponse(error=ErrorInfo(message=message, type=type_, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def obliviate_error(request_app, e: ObliviateError) -> JSONResponse:
    """The one place an ObliviateError becomes a response (and, if it refused a request, a count)."""
    metrics = getattr(request_app.state, "metrics", None)
    if e.rejection and metrics is not None:
        metrics.rejected.labels(e.reason, str(e.status_code)).inc()
    return error_response(e.status_code, e.message, e.type, e.param, e.code, e.headers or None)


async def reject(scope, receive, send, e: ObliviateError) -> None:
    """An ObliviateError answered outside the routes (the body-size middleware)."""
    await obliviate_error(scope["app"], e)(scope, receive, send)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    err = exc.errors()[0]
    if err.get("type") == "json_invalid":
        return f"malformed JSON body: {err.get('ctx', {}).get('error', err['msg'])}", None
    where, msg = first_error(exc, skip=("body",))
    return f"{where}: {msg}", (where.split(".")[0] if where != "body" else None)


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ObliviateError)
    async def _obliviate(request: Request, e: ObliviateError):
        return obliviate_error(request.app, e)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        msg, param = validation_message(e)
        return obliviate_error(request.app, InvalidRequest(msg, param))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException):
        err = InvalidRequest(str(e.detail), code=f"http_{e.status_code}")
        err.status_code = e.status_code
        return obliviate_error(request.app, err)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception):
        log.exception("unexpected error")
        return error_response(500, f"internal error: {type(e).__name__}: {e}", "server_error")


def make_engine(settings: Settings, model, table: ProfileTable) -> Engine:
    """The engine settings.engine names, over a loaded model (builtin) or its folder (vllm)."""
    if settings.engine == "vllm":
        from server.engine.vllm import VLLMEngine  # deferred: vLLM (optional, slow to import) only for this engine

        return VLLMEngine(model, table.specs, dtype=dtype_name(settings.dtype, settings.device), max_batch_size=settings.max_batch_size,
                          max_model_len=min(settings.max_model_len, model.max_len),
                          tensor_parallel_size=settings.tensor_parallel_size,
                          data_parallel_size=settings.data_parallel_size, audit=settings.trigger_audit,
                          eager=settings.enforce_eager, lora=lora_options(settings, table.specs))
    return BuiltinEngine(model, table, settings.max_batch_size, audit=settings.trigger_audit)


def load_model_for(settings: Settings) -> ModelInfo:
    """The built-in engine needs the weights; vLLM only the folder and tokenizer (its worker loads them)."""
    if settings.engine == "vllm":
        return load_info(settings.model, settings.cache_dir)
    return load_model(settings.model, settings.cache_dir, settings.device, settings.dtype)


def profile_table(settings: Settings, model: ModelInfo) -> ProfileTable:
    """The profiles for `model`, checked against it: SAEs loaded where this process runs the model (the
    built-in engine); for vLLM, whose workers load their own, from the SAEs' configs."""
    specs = load_profiles(settings.profile_dirs(), model.name)
    table = (ProfileTable(specs, model.device, model.dtype) if isinstance(model, LoadedModel)
             else ProfileTable(specs, load=False))
    table.check_model(model.n_layers, model.config.hidden_size)
    if isinstance(model, LoadedModel):
        table.check_adapters(model.model, model.name)
    else:  # vLLM loads the adapters itself: each is checked here against the model's shapes (on the meta device)
        lora_options(settings, specs).check(list(specs.values()), model)
    return table


def lora_options(settings: Settings, specs: dict[str, ProfileSpec]) -> LoraOptions:
    """vLLM's LoRA: on with --enable-lora or when a served profile names an adapter. Its limits default to
    what the served adapters need (one slot each and a free one, see LoraOptions.check; their largest rank):
    vLLM pads every adapter to the largest rank and keeps a stack of weights for each of max_loras slots."""
    adapters = sorted({s.adapter for s in specs.values() if s.adapter})
    need = max((adapter_rank(a) for a in adapters), default=0)
    rank = next((r for r in VLLM_LORA_RANKS if r >= need), VLLM_LORA_RANKS[-1]) if adapters else 16
    slots = len(adapters) + 1 if adapters else 4
    return LoraOptions(settings.enable_lora or bool(adapters), settings.max_loras or slots, settings.max_lora_rank or rank)


def build_app(settings: Settings, model: ModelInfo | None = None, table: ProfileTable | None = None,
              keyring: Keyring | None = None, metrics: Metrics | None = None) -> FastAPI:
    """`model`/`table`/`keyring` may be loaded by the caller (the CLI, to report errors before serving;
    tests, to share one model); otherwise the lifespan loads them. `metrics`: a replica's own (Ray Serve,
    whose /metrics shows every replica's)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        info = model or load_model_for(settings)
        tbl = table or profile_table(settings, info)
        app.state.keyring = keyring or Keyring.build(settings.keys, settings.api_key, tbl.names)
        engine = make_engine(settings, info, tbl)
        await engine.start()
        app.state.metrics = m = metrics or Metrics()
        m.watch(engine)
        app.state.serving = CompletionServing(engine, info, tbl.specs, m, settings)
        app.state.admin = ProfileAdmin(app.state.serving, app.state.keyring, settings.profiles_dir)
        log.info("serving %s on the %s engine with profiles: %s", info.name, engine.name, ", ".join(tbl.names))
        try:
            yield
        finally:
            await engine.shutdown()

    app = FastAPI(title="obliviate", lifespan=lifespan)
    app.state.settings = settings
    add_error_handlers(app)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, reject=reject)
    app.include_router(api)
    app.include_router(ops)
    return app
