"""Inside vLLM's worker process: the profile hooks on vLLM's model, and each forward's HookContext.

vLLM loads `VLLMWorkerExtension` by its qualified name into the worker class; the model is loaded by
the `obliviate` loader (vllm_edit.py), which places the edit's boundaries before vLLM compiles it; the
engine calls `obliviate_install` through collective_rpc once the model is loaded, which sets the
hook functions at those boundaries. From then on every forward of
the model runner is wrapped: the runner's batch (its requests in order, the token range of each,
their sampling params' extra_args) becomes a HookContext that the hooks read for the length of that
forward, and after the forward the `sequence` condition's state is kept per request, as is the
trigger audit's first firing position, until the engine process reads it (`obliviate_triggers`).
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch

from ablation.guard import guard_logits
from ablation.hooks import HookContext, ProfileTable
from ablation.spec import ProfileSpec
from server.engine.vllm_edit import boundaries_of, install
from server.engine.vllm_lora import group_runner_lora

log = logging.getLogger("obliviate.vllm_worker")

PROFILE_KEY = "obliviate_profile"  # in SamplingParams.extra_args
AUDIT_KEY = "obliviate_request"  # in extra_args: the engine process's id of the request (vLLM adds a suffix to its own)
KEEP_TRIGGERS = 65536


class ForwardContexts:
    """Builds HookContexts from a vLLM model runner's batch and keeps per-request hook state."""

    def __init__(self, runner, table: ProfileTable, device: torch.device, audit: bool = True):
        self.runner, self.table, self.device, self.audit = runner, table, device, audit
        self.profile_of: dict[str, int] = {}  # request id -> profile index
        self.audit_id: dict[str, str] = {}  # request id -> the id the engine process reads its trigger by
        self.fired: dict[str, dict] = {}  # request id -> {stateful hook point: fired}, after its last forward
        self._last: list[str] | None = None  # the requests of the last forward, until the guard reads them
        # request id -> the first position where its profile's edit fired; kept past the request's end
        # until the engine process reads it (the oldest go beyond KEEP_TRIGGERS: requests nobody asked for)
        self.triggers: OrderedDict[str, int] = OrderedDict()
        self.current: HookContext | None = None  # the context of the forward running now (the hooks read it)

    def running(self) -> HookContext | None:
        return self.current

    @property
    def stateful(self) -> list:
        return [hp for hp, entries in self.table.by_hook.items() if any(e.edit.stateful for e in entries)]

    def _profile(self, rid: str) -> int:
        if rid not in self.profile_of:
            extra = getattr(self.runner.requests[rid].sampling_params, "extra_args", None) or {}
            name = extra.get(PROFILE_KEY, "baseline")
            self.audit_id[rid] = extra.get(AUDIT_KEY, rid)
            if name not in self.table.index:  # fail closed: never the plain model for a profile not held
                raise UnknownProfileError(f"request {rid}: profile {name!r} is not installed in this worker "
                                          f"(it holds {self.table.names})")
            self.profile_of[rid] = self.table.index[name]
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
        for hp in self.stateful:
            f = torch.tensor([bool(self.fired.get(r, {}).get(hp, False)) and not fresh[i]
                              for i, r in enumerate(rids)] + [False])
            fired[hp] = f.to(self.device)
        n_prompt = torch.tensor([self.runner.requests[r].num_prompt_tokens for r in rids] + [0])
        prompt = positions.cpu() < n_prompt[seq]  # a token the model generated sits past its prompt
        ctx = HookContext.build(profiles[seq], seq, positions, fired, self.device, prompt, self.audit)
        return ctx, rids

    def guarded_rows(self, guarded: torch.Tensor) -> torch.Tensor | None:
        """[n] bool for the requests of the last forward, in batch order: their profile guards markup and
        their edit is on; None once read (prompt logprobs and later calls are left alone)."""
        rids, self._last = self._last, None
        if rids is None:
            return None
        on = [any(self.fired.get(r, {}).values()) for r in rids]
        return guarded[[self._profile(r) for r in rids]] & torch.tensor(on, dtype=torch.bool)

    def commit(self, ctx: HookContext, rids: list[str]) -> None:
        """Keeps each request's `sequence` state after the forward; forgets finished requests and frees
        removed profiles no request has any more."""
        if ctx.fired:
            hps = list(ctx.fired)
            rows = torch.stack([ctx.fired[hp][:len(rids)].cpu() for hp in hps], -1).tolist()  # [n, s]
            for i, r in enumerate(rids):
                self.fired[r] = dict(zip(hps, rows[i]))
        for r, at in zip(rids, ctx.triggers(len(rids))):
            key = self.audit_id[r]
            if at is not None and key not in self.triggers:
                self.triggers[key] = at
        while len(self.triggers) > KEEP_TRIGGERS:
            self.triggers.popitem(last=False)
        self._last = rids
        live = self.runner.requests
        for d in (self.fired, self.profile_of, self.audit_id):
            for r in [r for r in d if r not in live]:
                del d[r]
        if self.table.retired:  # removed profiles that requests may still have
            self.table.prune(set(self.profile_of.values()))


class UnknownProfileError(RuntimeError):
    """A request names a profile the worker does not hold (the engine process checks first: this is
    the last line, and it stops the engine rather than serve such a request unedited)."""


class VLLMWorkerExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`); methods are called by collective_rpc."""

    def obliviate_install(self, profiles: dict[str, dict], banned: list[int] = (), audit: bool = True) -> list[str]:
        runner = self.model_runner
        group_runner_lora(runner)  # vLLM's own LoRA (adapter profiles): one matmul per adapter, not per token
        model = runner.get_model()
        weight = next(model.parameters())
        specs = {name: _hooked(spec) for name, spec in profiles.items()}
        table = ProfileTable(specs, weight.device, weight.dtype)
        config = model.config
        table.check_model(config.num_hidden_layers, config.hidden_size)
        self._obliviate = table
        contexts = ForwardContexts(runner, table, weight.device, audit)
        self._obliviate_contexts = contexts
        # the hooks read the context of the running forward from `contexts`, set around that forward only
        self._obliviate_boundaries = boundaries_of(model)
        install(self._obliviate_boundaries, table.layer_hooks(context=contexts.running))
        forward = runner._model_forward

        def model_forward(*args, **kwargs):
            built = contexts.build(kwargs["positions"]) if table.by_hook else None
            if built is None:
                return forward(*args, **kwargs)
            contexts.current = built[0]
            try:
                out = forward(*args, **kwargs)
            finally:
                contexts.current = None
            contexts.commit(*built)
            return out

        runner._model_forward = model_forward
        banned_ids = torch.tensor(banned, dtype=torch.long)
        compute_logits = runner.model.compute_logits  # what execute_model calls

        def guarded_logits(hidden_states, *args, **kwargs):  # the markup guard: the first logits after a forward
            logits = compute_logits(hidden_states, *args, **kwargs)
            guarded = self._obliviate_guarded
            rows = contexts.guarded_rows(guarded) if guarded.any() else None
            if rows is not None and logits is not None and logits.shape[0] == rows.shape[0]:
                guard_logits(logits, rows, banned_ids)
            return logits

        self._obliviate_guarded = table.guarded()
        runner.model.compute_logits = guarded_logits
        log.info("obliviate hooks installed at %s for %s", [str(h) for h in table.by_hook], table.names)
        return table.names

    def obliviate_add(self, name: str, spec: dict) -> int | str:
        """Installs a profile between two steps (collective_rpc runs between them); -> its index, or an
        error message (returned, not raised: the engine goes on serving)."""
        table = self._obliviate
        try:
            parsed = _hooked(spec)
            compiled = table.compile(parsed)
        except Exception as e:  # a bad SAE or a spec that does not fit the model: one line for the client
            return f"{type(e).__name__}: {e}"
        index, (new, _) = len(table.installed), table.install(name, parsed, compiled)
        if new:
            install(self._obliviate_boundaries, table.layer_hooks(new, context=self._obliviate_contexts.running))
        self._obliviate_guarded = table.guarded()
        return index

    def obliviate_triggers(self, rids: list[str]) -> dict[str, int]:
        """The trigger audit of finished requests: request id -> the first position where its edit fired
        (requests whose edit never fired are absent); each is handed over once."""
        triggers = self._obliviate_contexts.triggers
        return {r: triggers.pop(r) for r in rids if r in triggers}

    def obliviate_remove(self, name: str, index: int) -> list[str]:
        """Removes `name` if it is still the install `index` (the engine process calls this once no request
        of it is left); -> the profiles the worker holds."""
        table = self._obliviate
        if table.index.get(name) == index:
            table.remove(name)
        return table.names


def _hooked(spec: dict) -> ProfileSpec:
    """What the hooks apply of a profile: all but its adapter (vLLM's own LoRA applies that)."""
    return ProfileSpec.model_validate({**spec, "adapter": None})
