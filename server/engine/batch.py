"""The built-in engine's running batch: what belongs to a row, kept in one place.

Row r is a sequence, its next position, its newest token, its profile, its `sequence`-condition
state per hook point, and KV slot r. New rows are appended; a finished row leaves by moving the
last row (all of the above, KV slot included) into its place, so rows stay 0..B-1.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import torch

from ablation.residual import Hookpoint
from server.engine.base import Prompt, SamplingParams, TokenLogprob
from server.engine.kv import SlotCache
from server.engine.textstream import TextStream


@dataclass(eq=False)  # identity: two equal-looking choices are different sequences
class Sequence:
    """One choice in flight."""

    request_id: str
    index: int
    prompt: Prompt
    params: SamplingParams
    profile: int
    outbox: asyncio.Queue  # the request's queue, filled on its event loop
    loop: asyncio.AbstractEventLoop
    text: TextStream
    generator: torch.Generator | None
    generated: int = 0
    output_ids: list[int] = field(default_factory=list)  # the tokens generated (penalties read them)
    finished: bool = False
    aborted: bool = False  # set by abort() from another thread; read at step boundaries
    prompt_logprobs: list[TokenLogprob] | None = None  # computed by the prefill, sent with the first output
    trigger: int | None = None  # the first position where the profile's edit fired (the trigger audit)

    def fired_at(self, position: int | None) -> None:
        if self.trigger is None:
            self.trigger = position

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt.input_ids)


class RunningBatch:
    def __init__(self, cache: SlotCache, hookpoints: list[Hookpoint]):
        self.cache = cache
        self.seqs: list[Sequence] = []
        n = cache.slots
        self.pos = torch.zeros(n, dtype=torch.long)  # [slots] tokens in the cache = next position
        self.last = torch.zeros(n, dtype=torch.long)  # [slots] the newest token: the next decode input
        self.profile = torch.zeros(n, dtype=torch.long)  # [slots]
        self.fired = {hp: torch.zeros(n, dtype=torch.bool, device=cache.device) for hp in hookpoints}

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def free(self) -> int:
        return self.cache.slots - len(self.seqs)

    def add(self, seq: Sequence) -> int:
        r = len(self.seqs)
        self.seqs.append(seq)
        self.pos[r] = self.last[r] = 0
        self.profile[r] = seq.profile
        for f in self.fired.values():
            f[r] = False
        return r

    def remove(self, rows: list[int]) -> None:
        for r in sorted(rows, reverse=True):  # the last row is never one still to be removed
            last = len(self.seqs) - 1
            if r != last:
                self.cache.move(last, r, int(self.pos[last]))
                self.seqs[r] = self.seqs[last]
                for t in (self.pos, self.last, self.profile, *self.fired.values()):
                    t[r] = t[last]
            self.seqs.pop()
