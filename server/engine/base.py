"""The engine interface: what the HTTP layer, the tests and the benchmark use, whatever engine runs.

    async for out in engine.generate(request_id, prompts, params, profile, n):
        ...  # ChoiceOutput: text delta, new tokens with logprobs, finish reason, token counts
    await engine.abort(request_id)
    engine.health(); engine.stats()

Prompts arrive as token ids (the serving layer tokenizes and checks them); each prompt keeps its
context (BOS and the profile's prefix, never echoed) apart from the user's tokens.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from ablation.adapters import check_adapter, load_adapter
from ablation.spec import ProfileSpec
from models.loading import ModelInfo

@dataclass(frozen=True)
class LoraOptions:
    """An engine's own per-request LoRA (vLLM's): on or off, adapters in one batch, the largest rank."""
    enabled: bool = False
    max_loras: int = 4
    max_rank: int = 16

    def check(self, specs: list[ProfileSpec], model: ModelInfo, served: set[str] = frozenset()) -> None:
        """Each adapter the specs name against these limits and the model's shapes (a ValueError that says
        which), before the engine gets it; `served`: the adapters already served beside them. One slot stays
        free: vLLM's own CPU LoRA ops index the slot stack with -1 for rows without an adapter, which takes
        the last slot, so with every slot in use those rows would get the last adapter (seen: an SAE
        profile's row answered in hp_rmu's gibberish). The worker's grouped ops (vllm_lora.py) give such rows
        none, but hand shapes they do not expect back to vLLM's."""
        paths = sorted({s.adapter for s in specs if s.adapter})
        if paths and not self.enabled:
            raise ValueError(f"adapter profiles need LoRA: start the server with --enable-lora ({paths[0]})")
        skeleton = model.skeleton() if paths else None
        for path in paths:
            check_adapter(load_adapter(path, max_rank=self.max_rank), skeleton, model.name)
        total = len(set(paths) | set(served))
        if paths and total >= self.max_loras:
            raise ValueError(f"serving {total} adapter(s) needs --max-loras {total + 1} or more (one LoRA slot stays free for "
                             f"the rows without an adapter)")


# below this a temperature is greedy (as in vLLM): dividing logits by it would overflow
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # top-k alternatives per token; None = no logprobs
    prompt_logprobs: bool = False  # echo + logprobs
    ignore_eos: bool = False  # end-of-sequence tokens do not end the choice (they add no text)
    # the rest as vLLM applies them: bias, min_tokens and penalties before the choice (greedy or
    # not), then temperature, min_p, top_k and top_p; logprobs are the model's, before any of them
    top_k: int = 0  # 0: every token
    min_p: float = 0.0
    presence_penalty: float = 0.0  # on the tokens generated so far
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # on the prompt's and the generated tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    min_tokens: int = 0  # end-of-sequence and stop_token_ids are barred before this many tokens
    stop_token_ids: tuple[int, ...] = ()  # end the choice as end-of-sequence does (no text)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


@dataclass(frozen=True)
class Prompt:
    context_ids: list[int]  # BOS + the profile's prefix: seen by the model, not echoed
    prompt_ids: list[int]  # the user's tokens

    @property
    def input_ids(self) -> list[int]:
        return self.context_ids + self.prompt_ids


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float | None = None
    top: dict[int, float] | None = None  # the top-k alternatives, when asked


@dataclass(frozen=True)
class ChoiceOutput:
    """What one choice produced since its last output."""

    index: int  # prompt i, sample j -> i * n + j (OpenAI's order)
    text: str  # new text
    tokens: list[TokenLogprob]  # new tokens (logprob filled when asked)
    num_prompt_tokens: int
    num_generated_tokens: int  # so far
    finish_reason: str | None = None  # "stop" | "length" once finished
    prompt_logprobs: list[TokenLogprob] | None = None  # the user's prompt tokens, on the first output
    # the trigger audit: the first position (in Prompt.input_ids, then the generated tokens) at which the
    # profile's edit fired, once known (None: not so far); the finishing output has the final word
    trigger: int | None = None


@dataclass(frozen=True)
class EngineStats:
    running: int  # sequences in the running batch
    waiting: int  # sequences not yet admitted
    steps: int = 0  # engine steps since start
    prefix_cache_hits: int = 0  # prompt tokens whose KV came from the prefix cache, since start


class EngineError(RuntimeError):
    """Generation failed for this request (the engine goes on serving others)."""


class Engine(ABC):
    name: str

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def shutdown(self) -> None: ...

    @abstractmethod
    def generate(self, request_id: str, prompts: list[Prompt], params: SamplingParams, profile: str,
                 n: int = 1) -> AsyncIterator[ChoiceOutput]:
        """Outputs of every choice of the request, interleaved, until all have finished. Raises
        EngineError if generation fails. Leaving the iterator early aborts the request."""

    @abstractmethod
    async def abort(self, request_id: str) -> None: ...

    @abstractmethod
    async def add_profile(self, name: str, spec: ProfileSpec) -> None:
        """Serves `name` from now on, without stopping requests in flight (SAEs load first: a bad one
        raises SAELoadError or ValueError and changes nothing)."""

    @abstractmethod
    async def remove_profile(self, name: str) -> None:
        """New requests can no longer use `name`; requests that have it finish with it."""

    @abstractmethod
    def health(self) -> bool:
        """False once the engine can no longer serve."""

    @abstractmethod
    def stats(self) -> EngineStats: ...


def choices(prompts: list[Prompt], params: SamplingParams, n: int) -> list[tuple[int, Prompt, SamplingParams]]:
    """(index, prompt, params) per choice; sample j of a seeded request uses seed + j."""
    out = []
    for i, p in enumerate(prompts):
        for j in range(n):
            q = params if params.seed is None else replace(params, seed=params.seed + j)
            out.append((i * n + j, p, q))
    return out


async def drain(queue: asyncio.Queue, n_choices: int) -> AsyncIterator[ChoiceOutput]:
    """The outputs a request's choices put on its queue, until every choice has finished; an
    exception put there ends the request with EngineError."""
    remaining = n_choices
    while remaining:
        out = await queue.get()
        if isinstance(out, BaseException):
            raise EngineError(f"generation failed: {type(out).__name__}: {out}") from out
        remaining -= out.finish_reason is not None
        yield out
