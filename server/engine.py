"""The serving engine: a queue of sequences, batches of them, one model step at a time.

Each sequence carries its own profile; the profile hooks (installed once) read the batch's
per-row profile ids from `BatchState`. Requests that arrive while a batch runs join the next one.
The loop: sample -> prefill -> decode_one_token -> generate.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from ablation.hooks import BatchState, ProfileTable, install_hf_hooks
from server.models import LoadedModel
from server.textstream import TextStream

log = logging.getLogger("obliviate.engine")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # top-k alternatives per token; None = no logprobs
    prompt_logprobs: bool = False  # echo + logprobs


@dataclass
class TokenInfo:
    token_id: int
    logprob: float | None = None
    top: dict[int, float] | None = None


@dataclass(eq=False)  # identity: two equal-looking choices are different sequences
class Sequence:
    """One completion choice in flight. `prompt_ids` are the user's tokens (echoed); the model sees
    `context_ids + prompt_ids` (BOS and the profile's prefix)."""

    context_ids: list[int]
    prompt_ids: list[int]
    profile: int
    params: SamplingParams
    emit: callable  # emit(event: dict); called from the engine thread
    out: list[TokenInfo] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_info: list[TokenInfo] | None = None
    text: TextStream | None = None
    generator: torch.Generator | None = None
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def input_ids(self) -> list[int]:
        return self.context_ids + self.prompt_ids


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """logits: [B, V] -> next tokens [B]; greedy rows take the argmax, others their own generator."""
    tokens = logits.argmax(-1)
    for i, s in enumerate(seqs):
        p = s.params
        if p.temperature <= 0:
            continue
        probs = torch.softmax(logits[i].float() / p.temperature, -1)
        if p.top_p < 1.0:
            sp, idx = probs.sort(descending=True)
            drop = sp.cumsum(-1) - sp > p.top_p
            sp[drop] = 0
            probs = torch.zeros_like(probs).scatter(0, idx, sp)
        tokens[i] = torch.multinomial(probs.cpu(), 1, generator=s.generator).to(tokens.device)[0]
    return tokens


def token_infos(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> list[TokenInfo]:
    """logits: [N, V], tokens: [N] -> each token's logprob and the top-k alternatives."""
    lp = torch.log_softmax(logits.float(), -1)
    chosen = lp.gather(-1, tokens[:, None])[:, 0].tolist()
    top_v, top_i = lp.topk(k, -1) if k > 0 else (None, None)
    out = []
    for j, t in enumerate(tokens.tolist()):
        top = dict(zip(top_i[j].tolist(), top_v[j].tolist())) if k > 0 else None
        out.append(TokenInfo(t, chosen[j], top))
    return out


class Engine:
    def __init__(self, lm: LoadedModel, table: ProfileTable, max_batch_size: int = 8):
        self.lm, self.table, self.max_batch_size = lm, table, max_batch_size
        self.model = lm.model
        self.tok = lm.tokenizer
        self.state = BatchState()
        table.check_model(lm.n_layers, lm.model.config.hidden_size)
        self._hooks = install_hf_hooks(self.model, table, self.state)
        self.eos_ids = self._eos_ids()
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        self.waiting: deque[Sequence] = deque()
        self.running = 0
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.on_batch = lambda size: None  # metrics callback

    def _eos_ids(self) -> set[int]:
        ids = set()
        gen = getattr(self.model, "generation_config", None)
        for v in (self.tok.eos_token_id, getattr(gen, "eos_token_id", None)):
            ids.update(v if isinstance(v, list) else [v] if v is not None else [])
        return ids

    # ---- queue -------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="obliviate-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread:
            self._thread.join(timeout=30)
        for h in self._hooks:
            h.remove()

    def submit(self, seqs: list[Sequence]) -> None:
        for s in seqs:
            s.text = TextStream(self.tok, s.params.stop)
            s.generator = torch.Generator().manual_seed(
                s.params.seed if s.params.seed is not None else random.getrandbits(63))
        with self._cv:
            self.waiting.extend(seqs)
            self._cv.notify()

    def cancel(self, seqs: list[Sequence]) -> None:
        with self._cv:
            for s in seqs:
                if s in self.waiting:
                    self.waiting.remove(s)
                s.finish_reason = s.finish_reason or "abort"

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self.waiting and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                batch = [self.waiting.popleft() for _ in range(min(self.max_batch_size, len(self.waiting)))]
                self.running = len(batch)
            try:
                self.on_batch(len(batch))
                self.run_isolated(batch)
            finally:
                self.running = 0

    def run_isolated(self, batch: list[Sequence]) -> None:
        """Runs a batch; if it fails before any token, each sequence is retried alone so that only
        the one at fault fails. Errors reach the requests, never the server."""
        try:
            self.generate(batch)
            return
        except Exception as e:
            log.exception("batch of %d failed", len(batch))
            error = e
        retry = len(batch) > 1 and not any(s.out for s in batch)
        for s in batch:
            if s.finish_reason is not None:
                continue
            if retry:
                self.run_isolated([s])
            else:
                s.emit({"type": "error", "error": error})

    # ---- model steps -------------------------------------------------------------------------
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [..., d_model] after the final norm -> logits [..., V]."""
        logits = self.model.lm_head(hidden)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache) -> torch.Tensor:
        """ids/pos: [B, S]; mask: [B, past + S] -> final hidden states [B, S, d_model]."""
        self.state.valid = mask[:, -ids.shape[1]:].bool()
        self.state.first = pos == 0
        out = self.model.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                               past_key_values=cache, use_cache=True)
        return out.last_hidden_state

    def prefill(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor, DynamicCache, torch.Tensor]:
        dev = self.lm.device
        lens = [len(s.input_ids) for s in seqs]
        S = max(lens)
        ids = torch.full((len(seqs), S), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), S), dtype=torch.long)
        for i, s in enumerate(seqs):  # left padding
            ids[i, S - lens[i]:] = torch.tensor(s.input_ids)
            mask[i, S - lens[i]:] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, S]
        cache = DynamicCache(config=self.model.config)
        hidden = self.forward(ids, mask, pos, cache)  # [B, S, d]
        for i, s in enumerate(seqs):
            if s.params.prompt_logprobs:
                s.prompt_info = self.prompt_logprobs(s, hidden[i, S - lens[i]:], ids[i, S - lens[i]:])
        return hidden[:, -1], mask, cache, pos[:, -1]

    def prompt_logprobs(self, s: Sequence, hidden: torch.Tensor, ids: torch.Tensor, chunk: int = 256):
        """hidden: [L, d], ids: [L] of one row -> a TokenInfo per prompt token (the echo)."""
        n_ctx = len(s.context_ids)
        k = s.params.logprobs or 0
        infos: list[TokenInfo] = [] if n_ctx else [TokenInfo(int(ids[0]))]
        start = max(n_ctx - 1, 0)  # position whose logits predict the first prompt token
        for a in range(start, ids.shape[0] - 1, chunk):
            b = min(a + chunk, ids.shape[0] - 1)
            infos += token_infos(self.logits(hidden[a:b]), ids[a + 1:b + 1], k)
        return infos

    def decode_one_token(self, tokens: torch.Tensor, mask, pos, cache):
        """tokens/pos: [B] -> (final hidden [B, d], mask [B, past + 1])."""
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        hidden = self.forward(tokens[:, None], mask, pos[:, None], cache)
        return hidden[:, -1], mask

    @torch.inference_mode()
    def generate(self, seqs: list[Sequence]) -> None:
        self.state.begin([s.profile for s in seqs], self.lm.device)
        try:
            self._generate(seqs)
        finally:
            self.state.end()  # idle hooks are no-ops

    def _generate(self, seqs: list[Sequence]) -> None:
        hidden, mask, cache, pos = self.prefill(seqs)
        live = [s for s in seqs if not self._finish_without_tokens(s)]
        if len(live) < len(seqs):
            hidden, mask, pos = self._keep(seqs, live, hidden, mask, pos, cache)
        while live:
            logits = self.logits(hidden)  # [B, V]
            tokens = sample(logits, live)
            k = max((s.params.logprobs or 0) for s in live)
            infos = (token_infos(logits, tokens, k) if any(s.params.logprobs is not None for s in live)
                     else [TokenInfo(t) for t in tokens.tolist()])
            done = [self._append(s, info) for s, info in zip(live, infos)]
            if any(done):
                kept = [s for s, d in zip(live, done) if not d]
                hidden, mask, pos = self._keep(live, kept, hidden, mask, pos, cache)
                tokens = tokens[[i for i, d in enumerate(done) if not d]]
                live = kept
                if not live:
                    break
            pos = pos + 1
            hidden, mask = self.decode_one_token(tokens, mask, pos, cache)

    def _keep(self, old, new, hidden, mask, pos, cache):
        rows = torch.tensor([i for i, s in enumerate(old) if s in new], dtype=torch.long, device=hidden.device)
        cache.batch_select_indices(rows)
        self.state.keep(rows)
        return hidden[rows], mask[rows], pos[rows]

    def _finish_without_tokens(self, s: Sequence) -> bool:
        if s.finish_reason == "abort":
            return True
        if s.params.max_tokens == 0:
            s.finish_reason = "length"
            s.emit({"type": "done", "seq": s})
            return True
        return False

    def _append(self, s: Sequence, info: TokenInfo) -> bool:
        """Records one sampled token, streams its text, and says whether the sequence is done."""
        if s.finish_reason == "abort":
            return True
        is_eos = info.token_id in self.eos_ids
        if not is_eos:
            s.out.append(info)
        delta, hit_stop = s.text.push(info.token_id if not is_eos else None)
        if is_eos or hit_stop:
            s.finish_reason = "stop"
        elif len(s.out) >= s.params.max_tokens:
            s.finish_reason = "length"
        if s.finish_reason:
            delta += s.text.flush()
        s.emit({"type": "token", "seq": s, "text": delta, "info": info if not is_eos else None})
        if s.finish_reason:
            s.emit({"type": "done", "seq": s})
        return s.finish_reason is not None
