"""The grouped CPU LoRA ops give what vLLM's own torch ops give, on vLLM's real punica wrapper."""

import pytest
import torch
from vllm.lora.layers.utils import LoRAMapping
from vllm.lora.punica_wrapper import punica_cpu

from server.engine.vllm_lora import group_lora, slot_groups

SLOTS, RANK, D_IN = 4, 8, 24
OUT = (40, 40)  # two output slices, as a fused gate/up projection has


def _wrapper(ids: list[int], grouped: bool):
    wrapper = punica_cpu.PunicaWrapperCPU(64, 8, "cpu")
    if grouped:
        group_lora(wrapper)
    # lora ids per token (0: none); slots 0-2 hold ids 1-3, the last slot is free (all zeros)
    wrapper.update_metadata(LoRAMapping(tuple(ids), tuple(ids), is_prefill=True), [1, 2, 3, None], SLOTS, 1000)
    return wrapper


def _apply(wrapper, x, a, b):
    y = torch.randn(x.shape[0], sum(OUT), generator=torch.Generator().manual_seed(1))
    wrapper.add_lora_linear(y, x, a, b, 0.5, OUT)
    return y


@pytest.mark.parametrize("ids", [
    [1, 1, 2, 2, 2, 0, 0, 3, 1],  # three adapters and rows without one, interleaved
    [2] * 7,  # one adapter for every token
    [0] * 5,  # no adapter in use
    [0, 0, 3, 3],
])
def test_grouped_ops_equal_vllms_torch_ops(ids):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(len(ids), D_IN, generator=g)
    a = tuple(torch.randn(SLOTS, 1, RANK, D_IN, generator=g) for _ in OUT)
    b = tuple(torch.randn(SLOTS, 1, o, RANK, generator=g) for o in OUT)
    for stacked in (*a, *b):
        stacked[-1].zero_()  # the free slot, which vLLM's ops give the rows without an adapter
    ref = _apply(_wrapper(ids, grouped=False), x, a, b)
    got = _apply(_wrapper(ids, grouped=True), x, a, b)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    base = _apply(_wrapper([0] * len(ids), grouped=True), x, a, b)
    changed = (got - base).abs().sum(1) > 0  # exactly the rows with an adapter get a LoRA update
    assert changed.tolist() == [i != 0 for i in ids]


def test_rows_without_an_adapter_get_none_even_when_every_slot_is_used():
    # vLLM's torch ops give slot -1 rows the last slot's adapter; the grouped ops give them nothing
    ids = [4, 4, 0, 0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(len(ids), D_IN, generator=g)
    a = tuple(torch.randn(SLOTS, 1, RANK, D_IN, generator=g) for _ in OUT)
    b = tuple(torch.randn(SLOTS, 1, o, RANK, generator=g) for o in OUT)
    wrapper = punica_cpu.PunicaWrapperCPU(64, 8, "cpu")
    group_lora(wrapper)
    wrapper.update_metadata(LoRAMapping(tuple(ids), tuple(ids), is_prefill=True), [1, 2, 3, 4], SLOTS, 1000)
    y = torch.zeros(len(ids), sum(OUT))
    wrapper.add_lora_linear(y, x, a, b, 1.0, OUT)
    assert y[2:].abs().sum() == 0 and y[:2].abs().sum() > 0
    expected = torch.cat([x[:2] @ a[i][3, 0].T @ b[i][3, 0].T for i in range(len(OUT))], dim=1)
    torch.testing.assert_close(y[:2], expected, rtol=1e-5, atol=1e-5)


def test_slot_groups():
    assert slot_groups(torch.tensor([-1, -1])) == []
    assert slot_groups(torch.tensor([2, 2, 2])) == [(2, None)]
    groups = slot_groups(torch.tensor([0, -1, 1, 0]))
    assert [(s, r.tolist()) for s, r in groups] == [(0, [0, 3]), (1, [2])]
