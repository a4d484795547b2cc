"""Prometheus metrics, prefixed `obliviate_` and labelled by profile. One registry per app; several
processes' metrics (Ray Serve replicas) are shown in one scrape by `merged`, each sample labelled with
the process it came from."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from server.engine.base import Engine

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)


class Metrics:
    def __init__(self, scrape: Callable[[Metrics], Awaitable[bytes]] | None = None) -> None:
        """`scrape`: what /metrics answers (default: this registry alone; Ray Serve: every replica's)."""
        self.scrape = scrape or own_exposition
        self.registry = r = CollectorRegistry()
        self.requests = Counter("obliviate_requests", "Completion requests served, by profile, HTTP status and "
                                "key name (`none` without keys)", ["profile", "status", "key"], registry=r)
        self.rejected = Counter("obliviate_requests_rejected", "Requests refused before generating, by reason "
                                "(the error code or type) and HTTP status", ["reason", "status"], registry=r)
        self.aborted = Counter("obliviate_requests_aborted", "Requests stopped while generating: the client "
                               "left (or the server stopped), or the request timed out", ["profile", "reason"],
                               registry=r)
        self.prompt_tokens = Counter("obliviate_prompt_tokens", "Prompt tokens processed",
                                     ["profile"], registry=r)
        self.generation_tokens = Counter("obliviate_generation_tokens", "Tokens generated",
                                         ["profile"], registry=r)
        self.ttft = Histogram("obliviate_time_to_first_token_seconds", "Time to first token",
                              ["profile"], buckets=LATENCY_BUCKETS, registry=r)
        self.per_token = Histogram("obliviate_time_per_output_token_seconds", "Time per generated token after "
                                   "the first, per request", ["profile"], buckets=TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("obliviate_e2e_request_latency_seconds", "End-to-end request latency",
                             ["profile"], buckets=LATENCY_BUCKETS, registry=r)
        self.audited = Counter("obliviate_choices_audited", "Finished choices of profiles that edit the model "
                               "(the trigger audit's denominator)", ["profile"], registry=r)
        self.triggered = Counter("obliviate_choices_triggered", "Finished choices in which the profile's edit "
                                 "fired (the unlearning switched on)", ["profile"], registry=r)
        self.running = Gauge("obliviate_requests_running", "Sequences in the running batch", registry=r)
        self.waiting = Gauge("obliviate_requests_waiting", "Sequences waiting to join the batch (the queue depth)",
                             registry=r)
        self.in_flight = Gauge("obliviate_sequences_in_flight", "Sequences admitted and not finished (running + "
                               "waiting, as the admission limit counts them)", registry=r)
        self.steps = Gauge("obliviate_engine_steps", "Engine steps since start", registry=r)
        self.prefix_hits = Gauge("obliviate_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache",
                                 registry=r)

    def watch(self, engine: Engine) -> None:
        self.running.set_function(lambda: engine.stats().running)
        self.waiting.set_function(lambda: engine.stats().waiting)
        self.steps.set_function(lambda: engine.stats().steps)
        self.prefix_hits.set_function(lambda: engine.stats().prefix_cache_hits)


async def own_exposition(metrics: Metrics) -> bytes:
    return generate_latest(metrics.registry)


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def merged(expositions: dict[str, str], label: str = "replica") -> bytes:
    """One exposition of several processes' (text format, keyed by process name): each family once, its
    samples from every process with `label` naming the process."""
    families: dict[str, Metric] = {}
    for name, text in expositions.items():
        for fam in text_string_to_metric_families(text):
            into = families.setdefault(fam.name, Metric(fam.name, fam.documentation, fam.type, fam.unit))
            into.samples += [s._replace(labels={**s.labels, label: name}) for s in fam.samples]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)
