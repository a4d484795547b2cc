"""One request in flight, apart from its response format: admission (429 when full), the deadline, the
engine call and its outputs, and counting the request in the metrics once, however it ends."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import contextmanager

from protocol.openai import Usage
from server.engine.base import ChoiceOutput, Engine, EngineError, Prompt, SamplingParams
from server.errors import EngineFailure, ObliviateError, RequestTimeout
from server.limits import Admission
from server.metrics import Metrics


class EngineCall:
    def __init__(self, engine: Engine, admission: Admission, metrics: Metrics, timeout: float, profile: str,
                 params: SamplingParams, prompts: list[Prompt], n: int, key: str, prefix: str = "cmpl",
                 label: str | None = None, audited: bool = False):
        self.engine, self.admission, self.metrics, self.timeout = engine, admission, metrics, timeout
        self.profile, self.params, self.prompts, self.n, self.key = profile, params, prompts, n, key
        self.label = label or profile  # the profile's name in responses and metrics ("inline" for inline ones)
        self.audited = audited  # the profile edits the model: each choice says whether the edit fired
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.t0 = time.perf_counter()
        self.deadline = asyncio.get_running_loop().time() + timeout
        self.first_token_at: float | None = None
        self.prompt_tokens = sum(len(p.input_ids) for p in prompts) * n
        self.generated: dict[int, int] = {}
        self.ended = False

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.n

    @contextmanager
    def admitted(self):
        """Holds the request's choices in the admission count (429 when full) until it ends."""
        self.admission.acquire(self.choices)
        try:
            yield
        finally:
            self.admission.release(self.choices)

    async def outputs(self) -> AsyncIterator[ChoiceOutput]:
        """The engine's outputs until the request's deadline; leaving early aborts the engine request."""
        it = self.engine.generate(self.id, self.prompts, self.params, self.profile, self.n)
        try:
            while True:
                try:
                    async with asyncio.timeout_at(self.deadline):
                        out = await anext(it)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise RequestTimeout(self.timeout) from None
                if out.tokens and self.first_token_at is None:
                    self.first_token_at = time.perf_counter()
                    self.metrics.ttft.labels(self.label).observe(self.first_token_at - self.t0)
                self.generated[out.index] = out.num_generated_tokens
                if out.finish_reason and self.audited:
                    self.metrics.audited.labels(self.label).inc()
                    if out.trigger is not None:
                        self.metrics.triggered.labels(self.label).inc()
                yield out
        except EngineError as e:
            raise EngineFailure(str(e)) from None
        finally:
            await it.aclose()

    def end(self, status: int, aborted: str | None = None) -> Usage:
        """Counts the request once, however it ended."""
        m = self.metrics
        gen = sum(self.generated.values())
        usage = Usage(prompt_tokens=self.prompt_tokens, completion_tokens=gen, total_tokens=self.prompt_tokens + gen)
        if self.ended:
            return usage
        self.ended = True
        m.requests.labels(self.label, str(status), self.key).inc()
        if aborted:
            m.aborted.labels(self.label, aborted).inc()
        m.prompt_tokens.labels(self.label).inc(self.prompt_tokens)
        m.generation_tokens.labels(self.label).inc(gen)
        now = time.perf_counter()
        m.e2e.labels(self.label).observe(now - self.t0)
        per_choice = max(self.generated.values(), default=0)
        if self.first_token_at is not None and per_choice > 1:
            m.per_token.labels(self.label).observe((now - self.first_token_at) / (per_choice - 1))
        return usage

    def ended_by(self, e: BaseException) -> None:
        if isinstance(e, ObliviateError):
            self.end(e.status_code, "timeout" if isinstance(e, RequestTimeout) else None)
        else:  # the client left (the server cancels on disconnect), or the server is stopping
            self.end(499, "cancelled")
