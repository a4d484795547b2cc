"""`obliviate serve`: settings from flags, checks that need no model, then uvicorn."""

from __future__ import annotations

import argparse
import socket
from pathlib import Path

from pydantic import ValidationError

from protocol.openai import first_error
from server.errors import CLIError


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve a model with ablation profiles over an OpenAI-compatible API")
    p.add_argument("--model", help="gemma-3-270m (embedded, default), a local HF folder or a hub name")
    p.add_argument("--profiles", type=Path, action="append",
                   help="a directory of profile YAML files (repeatable; default: the shipped profiles)")
    p.add_argument("--profiles-dir", type=Path, help="where profiles added at runtime (POST /v1/profiles) are "
                   "written; read at start after --profiles. Without it, POST /v1/profiles is refused")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda if available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the hardware's native "
                   "precision, bfloat16 on GPUs and on CPUs with AVX512-BF16 or AMX, else float32")
    p.add_argument("--engine", choices=["builtin", "vllm"], help="builtin (default) or vllm")
    p.add_argument("--max-batch-size", type=int, help="most sequences decoded together (default 32)")
    p.add_argument("--tensor-parallel-size", type=int, help="vllm engine: GPUs per model replica")
    p.add_argument("--data-parallel-size", type=int, help="vllm engine: model replicas")
    p.add_argument("--enforce-eager", action="store_true", default=None,
                   help="vllm engine: run the model eagerly, not in vLLM's compiled mode (the edit runs in both)")
    p.add_argument("--enable-lora", action="store_true", default=None,
                   help="vllm engine: serve LoRA adapter profiles added at run time (on by itself when a served "
                        "profile names an adapter)")
    p.add_argument("--max-loras", type=int,
                   help="vllm engine: adapters in one batch (default: one more than the served profiles name, else 4; one slot stays free)")
    p.add_argument("--max-lora-rank", type=int,
                   help="vllm engine: the largest adapter rank, one of vLLM's 1, 8, 16, 32 … 512 (default: the "
                        "served adapters' largest, else 16)")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--cache-dir", type=Path, help="where the embedded model is prepared once")
    p.add_argument("--chat-template", help="for /v1/chat/completions: a Jinja file or a shipped template (gemma); "
                   "default: the model's own (the embedded model has Gemma's)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' for every profile (a flag shows in "
                   "`ps`: prefer OBLIVIATE_API_KEY or --keys)")
    p.add_argument("--keys", type=Path, help="a YAML keys file: which profiles each key may use (README: Keys)")
    p.add_argument("--allow-unauthenticated", action="store_true", default=None,
                   help="serve on a non-loopback --host without --keys or --api-key")
    p.add_argument("--max-body-bytes", type=int, help="largest request body (default 4 MiB)")
    p.add_argument("--max-choices", type=int, help="most completions one request may ask for: prompts x n (default 64)")
    p.add_argument("--trigger-audit", action=argparse.BooleanOptionalAction, default=None,
                   help="say in each choice of a profile that edits the model whether its edit fired and at which "
                        "token (the `unlearning` field; counted in /metrics; default on)")
    p.add_argument("--max-queue", type=int,
                   help="sequences that may wait beyond the running batch; more get 429 (default 128)")
    p.add_argument("--request-timeout", type=float, help="seconds a request may take in all (default 600)")
    p.add_argument("--drain-timeout", type=int, help="seconds in-flight requests get to finish on SIGTERM (default 30)")
    p.add_argument("--replicas", type=int, help="serve through Ray Serve with N replicas of the app and engine "
                   "behind one endpoint (default: one process, no Ray)")
    p.add_argument("--max-replicas", type=int, help="Ray Serve: autoscale between --replicas and this")
    p.add_argument("--target-ongoing-requests", type=float, help="Ray Serve autoscaling: ongoing requests per "
                   "replica to aim for (default 16)")
    p.add_argument("--replica-cpus", type=float, help="Ray Serve: CPUs reserved per replica (default 1)")
    p.add_argument("--replica-threads", type=int, help="Ray Serve: torch threads per replica")
    p.set_defaults(func=cmd_serve)


def comma_list(kind=str):
    """An argparse type: 'a,b,c' -> [kind(a), kind(b), kind(c)] (empty items dropped), or a one-line error."""
    def parse(s: str) -> list:
        try:
            return [kind(x.strip()) for x in s.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {s!r}") from None
    return parse


def settings_from(args: argparse.Namespace):
    # deferred: the command line answers --help and bad arguments before torch and the model stack load
    from server.settings import Settings

    fields = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    try:
        return Settings(**fields)
    except ValidationError as e:
        where, msg = first_error(e, "settings")
        raise CLIError(f"bad setting {where}: {msg}") from None


def cmd_serve(args: argparse.Namespace) -> int:
    # deferred: the command line answers --help and bad arguments before torch and the model stack load
    from ablation.spec import ProfileError, load_profiles
    from models.names import ModelLoadError, chat_template
    from server.keys import Keyring, KeysError
    from server.settings import check_serve

    settings = settings_from(args)
    check_serve(settings, args.api_key is not None)
    try:
        # fail fast, before the model stack loads: profiles, keys and a --chat-template file need no model
        names = list(load_profiles(settings.profile_dirs(), settings.model))
        keyring = Keyring.build(settings.keys, settings.api_key, names)
        chat_template(settings.chat_template, None)
    except (ProfileError, ModelLoadError, KeysError) as e:
        raise CLIError(str(e)) from None
    if settings.replicas:
        return serve_on_ray(settings)
    # the port is taken before the model loads: a port in use is a one-line error at once, and no port
    # another process picks meanwhile (vLLM's engine opens ports of its own) can be the one we serve on
    sock = listen(settings.host, settings.port)
    # deferred: the model stack, once the input is known to be good
    import uvicorn

    from ablation.sae_io import SAELoadError
    from server.app import build_app, load_model_for, profile_table

    try:
        model = load_model_for(settings)
        table = profile_table(settings, model)
    except (ProfileError, SAELoadError, ModelLoadError, ValueError) as e:
        raise CLIError(str(e)) from None
    app = build_app(settings, model, table, keyring)
    # on SIGTERM: stop accepting, give in-flight requests drain_timeout s, cancel the rest, stop the engine
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=settings.drain_timeout)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def listen(host: str, port: int):
    """A bound socket for HOST:PORT (uvicorn listens on it once the app has started)."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)  # connections wait in the backlog until the app has started
    except OSError as e:
        raise CLIError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def serve_on_ray(settings) -> int:
    """`serve --replicas N` (its profiles and keys checked by cmd_serve): each replica loads the model."""
    # deferred: Ray only for this way of serving
    from server.ray_serve import run

    run(settings)
    return 0
