"""obliviate on Ray Serve: the same FastAPI app (routes, profiles, keys, limits, either engine) as the
ingress of a Serve deployment, one app and one engine per replica behind Ray's HTTP proxy.

    obliviate serve --replicas 2                      # one machine: starts Ray and Serve, blocks
    serve run deploy/ray/serve.yaml                   # a Serve config (import path: server.ray_serve:build)
    kubectl apply -f deploy/ray/rayservice.yaml       # KubeRay

Each replica builds the app from the same settings (the same profile folders and keys file), limits
its torch threads, and names itself in every response's `obliviate-replica` header. Ray Serve
restarts a replica whose process dies; requests sent meanwhile go to the live ones. /metrics on any
replica shows every live replica's metrics, each sample labelled `replica` (each replica serves its own
registry on a port of its node and lists it with a named actor, the board; a scrape reads them all).
"""

from __future__ import annotations

import asyncio
import os

import httpx
import ray
import torch
from fastapi import FastAPI, Request
from prometheus_client import start_wsgi_server
from ray import serve
from ray.serve.config import AutoscalingConfig

from server.app import build_app
from server.metrics import Metrics, merged
from server.settings import Settings, check_serve

REPLICA_HEADER = "obliviate-replica"
BOARD = "obliviate-metrics"  # the named actor in the `obliviate` namespace


@ray.remote(num_cpus=0)
class MetricsBoard:
    """Each live replica's metrics address, by replica name."""

    def __init__(self) -> None:
        self.targets: dict[str, str] = {}

    def put(self, name: str, url: str) -> None:
        self.targets[name] = url

    def drop(self, name: str) -> None:
        self.targets.pop(name, None)

    def all(self) -> dict[str, str]:
        return dict(self.targets)


def replica_metrics(name: str) -> Metrics:
    """This replica's metrics: its registry served on a free port of its node and put on the board; its
    /metrics answers with every replica's on the board (a replica that no longer answers is taken off)."""
    board = MetricsBoard.options(name=BOARD, namespace="obliviate", get_if_exists=True,
                                 lifetime="detached").remote()

    async def scrape(_: Metrics) -> bytes:
        targets = await board.all.remote()
        async with httpx.AsyncClient(timeout=10) as client:
            got = await asyncio.gather(*(client.get(url) for url in targets.values()), return_exceptions=True)
        texts = {}
        for replica, r in zip(targets, got):
            if isinstance(r, httpx.Response) and r.status_code == 200:
                texts[replica] = r.text
            elif isinstance(r, httpx.ConnectError):  # its process is gone
                board.drop.remote(replica)
        return merged(texts)

    metrics = Metrics(scrape)
    ip = ray.util.get_node_ip_address()
    httpd, _ = start_wsgi_server(0, addr=ip, registry=metrics.registry)
    board.put.remote(name, f"http://{ip}:{httpd.server_port}/metrics")
    return metrics


def replica_app(settings: Settings) -> FastAPI:
    """The app one replica serves (built on the replica, where its model loads)."""
    if settings.replica_threads:
        torch.set_num_threads(settings.replica_threads)
        # the vLLM engine's worker is a process of its own that reads its thread count from the environment;
        # unbound, as vLLM's automatic binding would put every replica's worker on the same cores
        os.environ["OMP_NUM_THREADS"] = str(settings.replica_threads)
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # an operator's own binding wins
    name = f"{serve.get_replica_context().replica_id.unique_id}@{os.getpid()}"
    app = build_app(settings, metrics=replica_metrics(name))
    app.state.replica = name

    @app.middleware("http")
    async def _name_the_replica(request: Request, call_next):
        response = await call_next(request)
        response.headers[REPLICA_HEADER] = name
        return response

    return app


def application(settings: Settings) -> serve.Application:
    """The Serve application: fixed replicas (--replicas N), or autoscaled between --replicas and
    --max-replicas on ongoing requests per replica."""
    options = dict(
        name="obliviate",
        ray_actor_options={"num_cpus": settings.replica_cpus, **({"num_gpus": 1} if settings.device == "cuda" else {})},
        # requests a replica takes before the proxy holds them back: its own admission answers 429 beyond
        max_ongoing_requests=settings.max_batch_size + settings.max_queue + 1,
        graceful_shutdown_timeout_s=settings.drain_timeout,
        health_check_period_s=5, health_check_timeout_s=30)
    if settings.max_replicas and settings.max_replicas > settings.replicas:
        options["autoscaling_config"] = AutoscalingConfig(
            min_replicas=settings.replicas, max_replicas=settings.max_replicas,
            target_ongoing_requests=settings.target_ongoing_requests)
    else:
        options["num_replicas"] = settings.replicas

    @serve.deployment(**options)
    @serve.ingress(lambda: replica_app(settings))
    class Obliviate:
        def check_health(self) -> None:
            """Serve restarts a replica whose health check raises: here, once its engine has stopped."""
            serving = getattr(self.app.state, "serving", None)  # self.app: the ASGI app (Serve's wrapper)
            if serving is not None and not serving.engine.health():
                raise RuntimeError(f"the {serving.engine.name} engine of this replica has stopped")

    return Obliviate.bind()


def build(args: dict) -> serve.Application:
    """The builder a Serve config names (`import_path: server.ray_serve:build`): `args` are the
    settings, as `obliviate serve` flags in snake case, checked as that command checks them."""
    settings = Settings(**args)
    check_serve(settings, api_key_flag=False)
    return application(settings)


def run(settings: Settings) -> None:
    """`obliviate serve --replicas N`: a local Ray with Serve's proxy on --host/--port; blocks."""
    ray.init(include_dashboard=False, log_to_driver=True)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(application(settings), name="obliviate", route_prefix="/", blocking=True)
