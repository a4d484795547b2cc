"""Inside vLLM's worker process: the profile hooks on vLLM's model, and each forward's HookContext.

vLLM loads `VLLMWorkerExtension` by its qualified name into the worker class; the engine calls
`obliviate_install` through collective_rpc once the model is loaded. From then on every forward of
the model runner is wrapped: the runner's batch (its requests in order, the token range of each,
their sampling params' extra_args) becomes a HookContext handed to the hooks through the model's
keyword arguments, and after the forward the `sequence` condition's state is kept per request.
"""

from __future__ import annotations

import logging

import torch

from ablation.guard import guard_logits
from ablation.hooks import CONTEXT_KWARG, HookContext, ProfileTable
from ablation.residual import residual_hooks
from ablation.spec import ProfileSpec

log = logging.getLogger("obliviate.vllm_worker")

PROFILE_KEY = "obliviate_profile"  # in SamplingParams.extra_args


class ForwardContexts:
    """Builds HookContexts from a vLLM model runner's batch and keeps per-request hook state."""

    def __init__(self, runner, table: ProfileTable, device: torch.device):
        self.runner, self.table, self.device = runner, table, device
        self.hookpoints = list(table.by_hook)
        self.stateful = [hp for hp, entries in table.by_hook.items() if any(e.edit.stateful
                                                                             for e in entries)]
        self.profile_of: dict[str, int] = {}  # request id -> profile index
        self.fired: dict[str, torch.Tensor] = {}  # request id -> [len(stateful)] bool, after its last forward
        self._last: list[str] | None = None  # the requests of the last forward, until the guard reads them

    def _profile(self, rid: str) -> int:
        if rid not in self.profile_of:
            extra = getattr(self.runner.requests[rid].sampling_params, "extra_args", None) or {}
            self.profile_of[rid] = self.table.index.get(extra.get(PROFILE_KEY, "baseline"), -1)
        return self.profile_of[rid]

    def build(self, positions: torch.Tensor) -> tuple[HookContext, list[str]] | None:
        """positions: [T] of this forward -> (context, the requests in batch order)."""
        batch = self.runner.input_batch
        n = batch.num_reqs
        if n == 0:
            return None
        rids = list(batch.req_ids[:n])
        qsl = self.runner.query_start_loc.cpu[:n + 1].long()
        counts = qsl[1:] - qsl[:-1]  # [n] tokens of each request in this forward
        pad = positions.shape[0] - int(qsl[-1])  # tokens after the last request's (padding)
        profiles = torch.tensor([self._profile(r) for r in rids] + [-1])
        seq = torch.arange(n + 1).repeat_interleave(torch.cat([counts, torch.tensor([pad])]))
        fresh = torch.from_numpy(batch.num_computed_tokens_cpu[:n] == 0)  # chunk starts at position 0
        fired = {}
        for j, hp in enumerate(self.stateful):
            f = torch.tensor([bool(self.fired[r][j]) if r in self.fired and not fresh[i] else False
                              for i, r in enumerate(rids)] + [False])
            fired[hp] = f.to(self.device)
        n_prompt = torch.tensor([self.runner.requests[r].num_prompt_tokens for r in rids] + [0])
        prompt = positions.cpu() < n_prompt[seq]  # a token the model generated sits past its prompt
        ctx = HookContext.build(profiles[seq], seq, positions, fired, self.device, prompt)
        return ctx, rids

    def guarded_rows(self, guarded: torch.Tensor) -> torch.Tensor | None:
        """[n] bool for the requests of the last forward, in batch order: their profile guards markup and
        their edit is on; None once read (prompt logprobs and later calls are left alone)."""
        rids, self._last = self._last, None
        if rids is None:
            return None
        on = [bool(self.fired[r].any()) if r in self.fired else False for r in rids]
        return guarded[[self._profile(r) for r in rids]] & torch.tensor(on, dtype=torch.bool)

    def commit(self, ctx: HookContext, rids: list[str]) -> None:
        """Keeps each request's `sequence` state after the forward; forgets finished requests."""
        if self.stateful:
            rows = torch.stack([ctx.fired[hp][:len(rids)].cpu() for hp in self.stateful], -1)  # [n, s]
            for i, r in enumerate(rids):
                self.fired[r] = rows[i]
        self._last = rids
        live = self.runner.requests
        for d in (self.fired, self.profile_of):
            for r in [r for r in d if r not in live]:
                del d[r]


class VLLMWorkerExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`); methods are called by collective_rpc."""

    def obliviate_install(self, profiles: dict[str, dict], banned: list[int] = ()) -> list[str]:
        runner = self.model_runner
        model = runner.get_model()
        weight = next(model.parameters())
        specs = {name: ProfileSpec.model_validate(spec) for name, spec in profiles.items()}
        table = ProfileTable(specs, weight.device, weight.dtype)
        config = model.config
        table.check_model(config.num_hidden_layers, config.hidden_size)
        self._obliviate_hooks = residual_hooks(model, table.layer_hooks(), paired=True)
        self._obliviate_hooks.__enter__()
        contexts = ForwardContexts(runner, table, weight.device)
        forward = runner._model_forward

        def model_forward(*args, **kwargs):
            built = contexts.build(kwargs["positions"]) if table.by_hook else None
            if built is None:
                return forward(*args, **kwargs)
            out = forward(*args, **{CONTEXT_KWARG: built[0]}, **kwargs)
            contexts.commit(*built)
            return out

        runner._model_forward = model_forward
        if banned:  # the markup guard: the first logits after a forward are the ones sampled from
            guarded = torch.tensor([s.markup_guard for s in specs.values()] + [False])
            banned_ids = torch.tensor(banned, dtype=torch.long)
            compute_logits = runner.model.compute_logits  # what execute_model calls

            def guarded_logits(hidden_states, *args, **kwargs):
                logits = compute_logits(hidden_states, *args, **kwargs)
                rows = contexts.guarded_rows(guarded)
                if rows is not None and logits is not None and logits.shape[0] == rows.shape[0]:
                    guard_logits(logits, rows, banned_ids)
                return logits

            runner.model.compute_logits = guarded_logits
        log.info("obliviate hooks installed at %s for %s", [str(h) for h in table.by_hook], table.names)
        return table.names
