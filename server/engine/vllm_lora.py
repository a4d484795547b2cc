"""vLLM's CPU LoRA ops, grouped by adapter: one matmul per adapter in the batch instead of one per token.

vLLM's CPU punica wrapper (`PunicaWrapperCPU`, torch ops) applies LoRA by gathering every token's
adapter weights (`weights[slot_of_token]`, a [tokens, out, rank] copy) and a batched einsum, at every
LoRA-wrapped linear layer of every forward in which any row has an adapter — also for the rows that have
none, which it gives slot −1 and so the *last* slot's weights. `group_lora` replaces the wrapper's six
op methods on one wrapper instance: per forward the tokens are grouped by slot once (when vLLM updates
the wrapper's mapping), each group is one dense `x[rows] @ W[slot].T`, and rows with slot −1 get no
LoRA at all, as on vLLM's GPU kernels. Anything of another shape goes to vLLM's own method.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("obliviate.vllm_lora")

Groups = list[tuple[int, torch.Tensor | None]]  # (slot, its token rows; None = every token)


def slot_groups(slots: torch.Tensor) -> Groups:
    """Per-token adapter slots -> one (slot, rows) per adapter in use; slot −1 (no adapter) left out."""
    used = torch.unique(slots).tolist()
    if used == [-1]:
        return []
    if len(used) == 1:
        return [(used[0], None)]
    return [(s, (slots == s).nonzero().squeeze(1)) for s in used if s >= 0]


def _lora_out(x: torch.Tensor, weights: torch.Tensor, slot: int, rows: torch.Tensor | None,
              dtype: torch.dtype) -> torch.Tensor:
    w = weights[slot]
    if w.dim() == 3:  # [1, out, in]: vLLM's stacked weights carry a layer axis of one
        w = w[0]
    xs = x if rows is None else x.index_select(0, rows)
    return xs.to(dtype) @ w.to(dtype).T


def _write(y: torch.Tensor, out: torch.Tensor, rows: torch.Tensor | None, add: bool) -> None:
    """y[rows] += out (add) or y[rows] = out; y is a column slice of the wrapper's buffer."""
    if rows is None:
        y.add_(out) if add else y.copy_(out)
    elif add:
        y.index_add_(0, rows, out)
    else:
        y.index_copy_(0, rows, out)


def group_lora(wrapper) -> None:
    """Replaces a PunicaWrapperCPU instance's op methods with the grouped ones (in place)."""
    state: dict[str, object] = {"groups": [], "tokens": 0}
    update = wrapper.update_metadata

    def update_metadata(*args, **kwargs):
        update(*args, **kwargs)
        slots = wrapper.token_lora_indices
        state["groups"], state["tokens"] = slot_groups(slots), slots.shape[0]

    def fits(x: torch.Tensor) -> bool:
        return x.shape[0] == state["tokens"]

    def shrink(original):
        def op(y, x, w_t_all, scale):
            if not fits(x):
                return original(y, x, w_t_all, scale)
            cols = y[:, :w_t_all.shape[-2]]
            if len(state["groups"]) != 1 or state["groups"][0][1] is not None:
                cols.zero_()
            for slot, rows in state["groups"]:
                _write(cols, scale * _lora_out(x, w_t_all, slot, rows, y.dtype), rows, add=False)
        return op

    def expand(original):
        def op(y, x, w_t_all, add_inputs):
            if not fits(x):
                return original(y, x, w_t_all, add_inputs)
            cols = y[:, :min(w_t_all.shape[-2], y.shape[1])]
            if not add_inputs:
                cols.zero_()
            for slot, rows in state["groups"]:
                _write(cols, _lora_out(x, w_t_all, slot, rows, y.dtype)[:, :cols.shape[1]], rows, add=True)
        return op

    def expand_slice(original):
        def op(y, x, w_t_all, y_offset, y_slice_size, add_inputs):
            if not fits(x):
                return original(y, x, w_t_all, y_offset, y_slice_size, add_inputs)
            cols = y[:, y_offset:y_offset + y_slice_size]
            if not add_inputs:
                cols.zero_()
            for slot, rows in state["groups"]:
                _write(cols, _lora_out(x, w_t_all, slot, rows, y.dtype), rows, add=True)
        return op

    wrapper.update_metadata = update_metadata
    for stage in ("prefill", "decode"):
        for name, make in (("shrink", shrink), ("expand", expand), ("expand_slice", expand_slice)):
            attr = f"_{name}_{stage}"
            setattr(wrapper, attr, make(getattr(wrapper, attr)))


def group_runner_lora(runner) -> int:
    """Groups the LoRA ops of every CPU punica wrapper of a vLLM model runner; -> how many."""
    manager = getattr(getattr(runner, "lora_manager", None), "_adapter_manager", None)
    wrappers = getattr(manager, "punica_wrapper_mapping", {}) if manager is not None else {}
    grouped = 0
    for wrapper in wrappers.values():
        if type(wrapper).__name__ == "PunicaWrapperCPU":
            group_lora(wrapper)
            grouped += 1
    if grouped:
        log.info("vLLM's CPU LoRA ops grouped by adapter (%d wrapper(s))", grouped)
    return grouped
