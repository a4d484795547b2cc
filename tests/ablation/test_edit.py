"""The SAE edit math on synthetic residuals, for every SAE architecture."""

import pytest
import torch

from ablation.edit import EditTensors, apply_edits, edit_columns, encode
from ablation.spec import FeatureEdit, Intervention, Steer
from tests.helpers import ALL_ARCHITECTURES, DEAD, build_sae, identity_sae

D = 32


def edit(keep_error=False, condition="always", **features):
    iv = Intervention(hookpoint="blocks.0.hook_resid_post", sae="x:y", keep_error=keep_error, condition=condition,
                      edits=[FeatureEdit(feature=int(f[1:]), value=v) for f, v in features.items()])
    return EditTensors.from_intervention(iv)


@pytest.fixture
def x():
    return torch.randn(3, 7, D, generator=torch.Generator().manual_seed(1)) * 5


@pytest.mark.parametrize("arch", ALL_ARCHITECTURES)
def test_empty_error_preserving_profile_returns_x_unchanged(arch, x):
    out, _, _ = apply_edits(x, build_sae(arch, D, 64), edit(keep_error=True))
    assert out is x


def test_identity_sae_reconstruction_is_exact(x):
    out, _, _ = apply_edits(x, identity_sae(D), edit())
    torch.testing.assert_close(out, x, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ALL_ARCHITECTURES)
def test_sae_only_is_the_reconstruction(arch, x):
    sae = build_sae(arch, D, 64)
    out, _, _ = apply_edits(x, sae, edit())
    torch.testing.assert_close(out, sae.decode(sae.encode(x)))
    assert not torch.allclose(out, x)


@pytest.mark.parametrize("arch", ALL_ARCHITECTURES)
def test_keep_error_moves_x_only_along_edited_decoder_rows(arch, x):
    sae = build_sae(arch, D, 64)
    acts = encode(sae, x)
    f = int(acts.sum((0, 1)).argmax())  # a feature that fires
    out, _, _ = apply_edits(x, sae, edit(keep_error=True, **{f"f{f}": -2.0}))
    expected = x + (-2.0 - acts[..., f:f + 1]) * sae.W_dec[f]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)
    # the same as x + decode(a') - decode(a), the error term kept
    edited = acts.clone()
    edited[..., f] = -2.0
    torch.testing.assert_close(out, x + sae.decode(edited) - sae.decode(acts), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("arch", ALL_ARCHITECTURES)
def test_zero_ablation_inside_reconstruction(arch, x):
    sae = build_sae(arch, D, 64)
    acts = encode(sae, x)
    f = int(acts.sum((0, 1)).argmax())
    out, _, _ = apply_edits(x, sae, edit(**{f"f{f}": 0.0}))
    acts[..., f] = 0
    torch.testing.assert_close(out, sae.decode(acts))


@pytest.mark.parametrize("arch", ALL_ARCHITECTURES)
def test_edits_of_features_that_never_fire_change_nothing(arch, x):
    sae = build_sae(arch, D, 64)
    assert (encode(sae, x)[..., DEAD] == 0).all()
    zero, _, _ = apply_edits(x, sae, edit(keep_error=True, **{f"f{f}": 0.0 for f in DEAD}))
    clamp, _, _ = apply_edits(x, sae, edit(keep_error=True, condition="token", **{f"f{f}": -9.0 for f in DEAD}))
    assert torch.equal(zero, x) and torch.equal(clamp, x)


def test_token_condition_clamps_only_where_the_feature_fires():
    acts = torch.tensor([[[0.0, 1.0], [2.0, 0.0], [0.0, 0.0]]])  # [1, 3, 2]
    old, new, _, _, _ = edit_columns(acts, edit(condition="token", f0=-5.0))
    assert new[0, :, 0].tolist() == [0.0, -5.0, 0.0]
    assert torch.equal(old, acts[..., :1])


def test_fires_above_ignores_weak_activations_for_token_and_sequence():
    acts = torch.tensor([[[1.5], [4.0], [0.5], [0.0]],
                         [[1.0], [2.5], [0.0], [0.0]]])  # [2, 4, 1]
    iv = Intervention(hookpoint="blocks.0.hook_resid_post", sae="x:y", condition="token",
                      edits=[FeatureEdit(feature=0, value=-7.0, fires_above=2.0)])
    _, new, _, _, _ = edit_columns(acts, EditTensors.from_intervention(iv))
    assert new[..., 0].tolist() == [[1.5, -7.0, 0.5, 0.0], [1.0, -7.0, 0.0, 0.0]]
    seq = EditTensors.from_intervention(iv.model_copy(update={"condition": "sequence"}))
    _, new, fired, _, _ = edit_columns(acts[:, [0, 2, 1]], seq)  # the weak firings come first
    assert new[..., 0].tolist() == [[1.5, 0.5, -7.0], [1.0, 0.0, -7.0]] and fired.tolist() == [True, True]
    _, new, fired, _, _ = edit_columns(acts[:, [0, 2]], seq)  # only weak firings: nothing starts
    assert torch.equal(new, acts[:, [0, 2]]) and fired.tolist() == [False, False]
    with pytest.raises(ValueError):
        FeatureEdit(feature=0, value=-1.0, fires_above=-1.0)


def test_sequence_condition_starts_at_first_firing_and_respects_padding():
    acts = torch.tensor([[[0.0], [0.0], [3.0], [0.0]],
                         [[4.0], [0.0], [0.0], [0.0]]])  # [2, 4, 1]
    valid = torch.tensor([[True] * 4, [False, True, True, True]])  # row 1: position 0 is padding
    _, new, fired, hit, on = edit_columns(acts, edit(condition="sequence", f0=-1.0), valid)
    assert new[0, :, 0].tolist() == [0.0, 0.0, -1.0, -1.0]
    assert new[1, :, 0].tolist() == [4.0, 0.0, 0.0, 0.0]  # a feature firing on padding does not count
    assert fired.tolist() == [True, False]
    assert hit.tolist() == [[False, False, True, False], [False] * 4]  # where it fired (the trigger audit)
    assert on.tolist() == [[False, False, True, True], [False] * 4]  # where it is on (a steer is added)


def test_the_context_keeps_each_sequences_first_firing_position_over_hook_points():
    from ablation.hooks import HookContext
    seq, pos = torch.tensor([0, 0, 0, 1, 1, 2]), torch.tensor([0, 1, 2, 0, 1, 7])
    ctx = HookContext.build(torch.zeros(6, dtype=torch.long), seq, pos, {}, "cpu")
    ctx.note_fired(torch.tensor([1, 2, 3, 4]), torch.tensor([False, True, False, False]))
    ctx.note_fired(torch.tensor([0, 1, 2, 5]), torch.tensor([False, True, True, True]))  # a second hook point
    assert ctx.triggers(3) == [1, None, 7]


def test_sequence_active_clamps_only_where_each_feature_is_active_after_the_first_firing():
    acts = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [5.0, 0.0], [0.0, 0.0]],
                         [[0.0, 3.0], [0.0, 0.0], [1.0, 2.0], [0.0, 0.0]]])  # [2, 4, 2]
    _, new, fired, _, _ = edit_columns(acts, edit(condition="sequence_active", f0=-1.0, f1=-1.0))
    assert new[0].tolist() == [[-1.0, 0.0], [0.0, -1.0], [-1.0, 0.0], [0.0, 0.0]]  # zeros stay zeros
    assert new[1].tolist() == [[0.0, -1.0], [0.0, 0.0], [-1.0, -1.0], [0.0, 0.0]]
    strict = edit(condition="sequence_active", f0=-1.0, f1=-1.0)  # before the first firing: untouched
    strict = EditTensors(strict.features, strict.values, strict.keep_error, strict.condition,
                         thresholds=torch.tensor([4.0, 4.0]))
    _, new, fired, _, _ = edit_columns(acts, strict)
    assert new[0].tolist() == [[2.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, 0.0]] and fired.tolist() == [True, False]
    assert torch.equal(new[1], acts[1])


def test_generated_tokens_take_zero_or_no_edit_the_prompt_keeps_the_values():
    acts = torch.tensor([[[0.0], [3.0], [2.0], [1.0]]])  # [1, 4, 1]: fires at 1; positions 2, 3 generated
    prompt = torch.tensor([[True, True, False, False]])
    _, new, _, _, _ = edit_columns(acts, edit(condition="sequence", f0=-5.0), prompt=prompt)
    assert new[0, :, 0].tolist() == [0.0, -5.0, -5.0, -5.0]  # generated "same"
    zero = EditTensors.from_intervention(Intervention(hookpoint="blocks.0.hook_resid_post", sae="x:y",
                                                      condition="sequence", generated="zero",
                                                      edits=[FeatureEdit(feature=0, value=-5.0)]))
    _, new, _, _, _ = edit_columns(acts, zero, prompt=prompt)
    assert new[0, :, 0].tolist() == [0.0, -5.0, 0.0, 0.0]
    assert edit_columns(acts, zero)[1][0, :, 0].tolist() == [0.0, -5.0, -5.0, -5.0]  # no mask: all prompt


@pytest.mark.parametrize("arch", ALL_ARCHITECTURES)
def test_generated_off_leaves_generated_tokens_untouched(arch, x):
    sae = build_sae(arch, D)
    iv = Intervention(hookpoint="blocks.0.hook_resid_post", sae="x:y", keep_error=True, generated="off",
                      edits=[FeatureEdit(feature=f, value=-3.0) for f in range(4)])
    prompt = torch.zeros(x.shape[:2], dtype=torch.bool)
    prompt[:, :4] = True
    out, _, _ = apply_edits(x, sae, EditTensors.from_intervention(iv), prompt=prompt)
    assert torch.equal(out[:, 4:], x[:, 4:]) and not torch.allclose(out[:, :4], x[:, :4])


@pytest.mark.parametrize("arch", ALL_ARCHITECTURES)
def test_sequence_condition_carried_across_steps_equals_one_pass(arch, x):
    sae = build_sae(arch, D, 64)
    acts = encode(sae, x)
    f = int(acts.sum((0, 1)).argmax())
    e = edit(keep_error=True, condition="sequence", **{f"f{f}": -3.0})
    whole, _, _ = apply_edits(x, sae, e)
    first, fired, _ = apply_edits(x[:, :4], sae, e)
    rest = []
    for t in range(4, x.shape[1]):  # one token at a time, as decoding does
        y, fired, _ = apply_edits(x[:, t:t + 1], sae, e, fired=fired)
        rest.append(y)
    torch.testing.assert_close(torch.cat([first, *rest], 1), whole)


@pytest.mark.parametrize("arch", ALL_ARCHITECTURES)
def test_positions_outside_valid_are_left_untouched(arch, x):
    sae = build_sae(arch, D, 64)
    valid = torch.ones(x.shape[:2], dtype=torch.bool)
    valid[:, 0] = False  # BOS
    valid[1, :3] = False  # padding
    out, _, _ = apply_edits(x, sae, edit(), valid)
    assert torch.equal(out[~valid], x[~valid])
    torch.testing.assert_close(out[valid], sae.decode(sae.encode(x))[valid])


@pytest.mark.parametrize("arch", ALL_ARCHITECTURES)
def test_flat_tokens_with_sequence_ids_equal_the_rows_layout(arch, x):
    """Packed prefills and vLLM batches hand the hook flat tokens [N, d] of several sequences."""
    sae = build_sae(arch, D, 64)
    f = int(encode(sae, x).sum((0, 1)).argmax())
    e = edit(keep_error=True, condition="sequence", **{f"f{f}": -3.0})
    rows, fired_rows, _ = apply_edits(x, sae, e)
    lengths = [7, 3, 5]  # rows of different lengths, packed
    flat = torch.cat([x[i, :n] for i, n in enumerate(lengths)])
    seq = torch.arange(3).repeat_interleave(torch.tensor(lengths))
    out, fired, _ = apply_edits(flat, sae, e, seq=seq, fired=torch.zeros(3, dtype=torch.bool))
    torch.testing.assert_close(out, torch.cat([rows[i, :n] for i, n in enumerate(lengths)]))
    # a later forward sees only some sequences, one token each: the others' state is kept
    step, fired2, _ = apply_edits(x[[2, 0], :1].reshape(2, D), sae, e, seq=torch.tensor([2, 0]), fired=fired)
    assert fired2[1] == fired[1] and fired2[0] == (fired[0] | fired_rows[0] | fired2[0])


def test_sequence_state_of_each_sequence_is_its_own():
    hit = torch.tensor([False, True, False, False, False, True, False])
    seq = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    from ablation.edit import sequence_on
    on, fired = sequence_on(hit, seq, torch.tensor([False, True, False]))
    assert on.tolist() == [False, True, True, True, True, True, True]
    assert fired.tolist() == [True, True, True]
    on, fired = sequence_on(torch.tensor([False, False]), torch.tensor([3, 1]), torch.tensor([False, False, True, True]))
    assert on.tolist() == [True, False] and fired.tolist() == [False, False, True, True]


@pytest.mark.parametrize("arch", ALL_ARCHITECTURES)
def test_a_steer_is_added_exactly_where_the_sequence_edit_is_on(arch, x):
    """steer: scale x the unit direction, from the first firing on (generated tokens too), nowhere before
    and never at an invalid position; the feature edit is the same as without it."""
    sae = build_sae(arch, D, 64)
    acts = encode(sae, x).detach()
    f = int((acts[0, 3] - acts[0, 1:3].max(0).values).argmax())  # row 0: first above its earlier peak at 3
    iv = Intervention(hookpoint="blocks.0.hook_resid_post", sae="x:y", keep_error=True, condition="sequence",
                      edits=[FeatureEdit(feature=f, value=-2.0, fires_above=float(acts[0, 1:3, f].max()))])
    plain = EditTensors.from_intervention(iv)
    direction = torch.randn(D)
    direction /= direction.norm()
    steered = EditTensors.from_intervention(iv.model_copy(update={"steer": Steer(vector="v", scale=3.0)}),
                                            direction=direction)
    valid = torch.ones(x.shape[:2], dtype=torch.bool)
    valid[:, 0] = False
    a, fired_a, _ = apply_edits(x, sae, plain, valid)
    b, fired_b, _ = apply_edits(x, sae, steered, valid)
    _, _, _, _, on = edit_columns(acts, plain, valid)
    assert torch.equal(fired_a, fired_b) and on[0, 3] and not on[0, :3].any() and not on[:, 0].any()
    expected = a + on[..., None] * 3.0 * direction
    assert torch.allclose(b, expected, atol=1e-5)
    assert EditTensors.from_intervention(iv.model_copy(update={"keep_error": True, "edits": [],
                                                               "steer": Steer(vector="v", scale=1.0)}),
                                         direction=direction).is_noop is False


def test_the_hook_encodes_profiles_sharing_an_sae_together_and_applies_a_profiles_interventions_in_turn():
    """ResidualHook groups the profiles at a hook point by SAE (one encode for all their tokens); a profile
    with two interventions there applies the second to what the first left. Each token must come out as
    its own profile's interventions applied one after the other to it alone."""
    from ablation.hooks import HookContext, HookEntry, ResidualHook
    from ablation.residual import Hookpoint

    a, b = build_sae("topk", D, 64, seed=3), build_sae("standard", D, 64, seed=4)
    top = a.encode(torch.randn(64, D, generator=torch.Generator().manual_seed(5)) * 5).abs().sum(0).topk(6).indices
    f = [int(i) for i in top]
    entries = [HookEntry(0, a, edit(keep_error=True, **{f"f{f[0]}": -30.0, f"f{f[1]}": -30.0})),
               HookEntry(1, a, edit(**{f"f{f[2]}": 0.0})),
               HookEntry(0, a, edit(keep_error=True, condition="token", **{f"f{f[3]}": 50.0})),
               HookEntry(2, b, edit(keep_error=True, **{"f1": 20.0})),
               HookEntry(1, b, edit(keep_error=True, **{"f2": -20.0}))]
    N = 12
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(6)) * 5
    profiles = torch.tensor([0, 1, 2, 3, 0, 0, 1, 2, 3, 1, 0, 2])  # 3: a profile with nothing here
    ctx = HookContext.build(profiles, torch.arange(N), torch.full((N,), 4), {}, "cpu")
    out = ResidualHook(Hookpoint(0, "post"), entries)(x, ctx)
    for t in range(N):
        want = x[t:t + 1]
        for e in entries:
            if e.profile == int(profiles[t]):
                want = apply_edits(want, e.sae, e.edit)[0]
        torch.testing.assert_close(out[t:t + 1], want, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(out, x)
