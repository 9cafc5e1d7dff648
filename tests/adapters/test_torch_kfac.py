"""Tests of :class:`curvlinalg_torch.KFAC` against the hand-written reference of
``test_torch_foof.reference_run`` (explicit inverses, ``np.kron`` for exact damping, the π rule
from traces, MC labels drawn with the same ``torch.Generator`` draws)."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from curvlinalg_torch import FOOF, KFAC, capture
from torch import nn

from tests.adapters.test_torch_capture import tiny_net
from tests.adapters.test_torch_foof import assert_histories_close, batches, reference_run, run

CASES = {
    "empirical-factored": {"fisher": "empirical", "damping_rule": "factored"},
    "mc-factored": {"fisher": "mc", "damping_rule": "factored"},
    "empirical-exact": {"fisher": "empirical", "damping_rule": "exact"},
    "mc-exact-update2": {"fisher": "mc", "damping_rule": "exact", "update_every": 2},
}


@pytest.mark.parametrize("case", list(CASES))
def test_steps_equal_hand_formulas(case: str):
    data = batches(4)
    model, reference = tiny_net(), tiny_net()
    options = dict(
        lr=0.3, damping=0.05, momentum=0.9, weight_decay=1e-2, ema_decay=0.8, inverse_every=2
    )
    options.update(CASES[case])
    optimizer = KFAC(model, factor_dtype=torch.float64, seed=7, **options)
    expected = reference_run(reference, data, method="kfac", seed=7, **options)
    assert_histories_close(run(optimizer, model, data), expected)


def test_huge_output_damping_approaches_foof():
    """λ_G·(G + λ_G I)⁻¹ ∇W (A + λ_A I)⁻¹ → ∇W (A + λ_A I)⁻¹ as λ_G → ∞ (error O(‖G‖/λ_G))."""
    data = batches(2)
    damping_g = 1e7
    kfac_model, foof_model = tiny_net(), tiny_net()
    kfac = KFAC(
        kfac_model,
        lr=0.4 * damping_g,
        damping=(0.3, damping_g),
        fisher="empirical",
        factor_dtype=torch.float64,
    )
    foof = FOOF(foof_model, lr=0.4, damping=0.3, factor_dtype=torch.float64)
    assert_histories_close(run(kfac, kfac_model, data), run(foof, foof_model, data), tol=1e-6)


def test_exact_and_factored_damping_agree_as_damping_vanishes_and_differ_otherwise():
    """Both tend to ``G⁻¹ ∇W A⁻¹`` for positive definite factors (a hidden layer, B ≫ d)."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 3, dtype=torch.float64), torch.randint(0, 4, (64,))

    def first_step(rule: str, damping: float) -> torch.Tensor:
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 4)).double()
        start = capture.parameters_to_matrix(model[0])
        optimizer = KFAC(
            model,
            lr=1.0,
            damping=damping,
            fisher="empirical",
            damping_rule=rule,
            factor_dtype=torch.float64,
            layers=[model[0]],
        )
        run(optimizer, model, [(x, y)])
        return start - capture.parameters_to_matrix(model[0])

    exact, factored = first_step("exact", 1e-13), first_step("factored", 1e-13)
    assert (exact - factored).norm() <= 1e-4 * exact.norm()
    exact, factored = first_step("exact", 1e-1), first_step("factored", 1e-1)
    assert (exact - factored).norm() > 1e-3 * exact.norm()


def test_mc_state_dict_round_trip_includes_the_label_generator():
    data = batches(6)
    model = tiny_net()
    optimizer = KFAC(model, lr=0.3, damping=0.1, momentum=0.9, inverse_every=3, seed=3)
    run(optimizer, model, data[:3])
    saved_model = copy.deepcopy(model.state_dict())
    saved = copy.deepcopy(optimizer.state_dict())
    continued = run(optimizer, model, data[3:])
    resumed_model = tiny_net(seed=5)
    resumed_model.load_state_dict(saved_model)
    resumed = KFAC(resumed_model, lr=1.0, damping=1.0, seed=12345)
    resumed.load_state_dict(saved)
    again = run(resumed, resumed_model, data[3:])
    for got_layers, want_layers in zip(again, continued):
        for got, want in zip(got_layers, want_layers):
            assert np.array_equal(got, want)
    assert set(resumed.layer_state(1)) == {"A", "G", "A_inv", "G_inv", "momentum_buffer"}


def test_skipped_step_restores_the_label_generator():
    data = batches(3)
    model, twin = tiny_net(), tiny_net()
    optimizer = KFAC(model, lr=0.3, damping=0.1, seed=4)
    reference = KFAC(twin, lr=0.3, damping=0.1, seed=4)
    bad = data[1][0].clone()
    bad[0, 0, 0, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        run(optimizer, model, [data[0], (bad, data[1][1]), data[2]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(reference, twin, [data[0], data[2]])
    assert optimizer.skipped_steps == 1
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_training_lowers_the_loss_for_every_variant():
    torch.manual_seed(0)
    x = torch.randn(256, 2, 4, 4, dtype=torch.float64)
    y = (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1, 0, 0] > 0).long()
    for rule in ("factored", "exact"):
        model = tiny_net()
        optimizer = KFAC(model, lr=0.05, damping=0.1, momentum=0.9, damping_rule=rule, seed=0)
        with torch.no_grad():
            initial = F.cross_entropy(model(x), y).item()
        for step in range(40):
            index = torch.arange(step * 32, (step + 1) * 32) % 256
            optimizer.zero_grad()
            F.cross_entropy(model(x[index]), y[index]).backward()
            optimizer.step()
        with torch.no_grad():
            assert F.cross_entropy(model(x), y).item() < 0.5 * initial, rule


def test_argument_validation_and_output_shape():
    for kwargs, name in (
        ({"damping": 1.0, "fisher": "exact"}, "fisher"),
        ({"damping": 1.0, "damping_rule": "pi"}, "damping_rule"),
        ({"damping": (1.0, 1.0), "damping_rule": "exact"}, "damping"),
        ({"damping": (1.0, -1.0)}, "damping"),
    ):
        with pytest.raises(ValueError, match=name):
            KFAC(tiny_net(), lr=0.1, **kwargs)
    # (B, C) and (B, T, C) logits are accepted (tests/adapters/test_torch_sequence.py); a
    # 4-d output is not.
    model = nn.Sequential(nn.Linear(3, 4), nn.Unflatten(1, (2, 1, 2))).double()
    optimizer = KFAC(model, lr=0.1, damping=1.0)  # noqa: F841 (alive: a deleted one unhooks)
    with pytest.raises(ValueError, match=r"\(B, C\) or \(B, T, C\) logits"):
        model(torch.randn(2, 3, dtype=torch.float64))


def _optimizer_and_reference(method: str, model: nn.Module, reference: nn.Module, data, options):
    """``method`` ("foof", "kfac-factored", "kfac-exact") on ``model`` (float64 factors), and
    the hand-formula history of the same run on ``reference`` (an identical copy)."""
    if method == "foof":
        optimizer = FOOF(model, factor_dtype=torch.float64, **options)
        return optimizer, reference_run(reference, data, method="foof", **options)
    rule = method.split("-")[1]
    optimizer = KFAC(model, factor_dtype=torch.float64, damping_rule=rule, seed=2, **options)
    expected = reference_run(
        reference, data, method="kfac", fisher="mc", damping_rule=rule, seed=2, **options
    )
    return optimizer, expected


@pytest.mark.parametrize("method", ["foof", "kfac-factored", "kfac-exact"])
def test_wide_layers_with_internal_padding_equal_hand_formulas(method: str):
    """Widths ≥ 128 are zero-padded to a multiple of 16 inside the optimizer (131 → 144);
    the steps must not change."""

    def net() -> nn.Module:
        torch.manual_seed(3)
        return nn.Sequential(nn.Linear(130, 6), nn.Tanh(), nn.Linear(6, 4)).double()

    generator = torch.Generator().manual_seed(8)
    data = [
        (torch.randn(6, 130, generator=generator, dtype=torch.float64), torch.randint(0, 4, (6,)))
        for _ in range(3)
    ]
    options = dict(lr=0.3, damping=0.05, momentum=0.9, weight_decay=1e-2, ema_decay=0.8)
    model = net()
    optimizer, expected = _optimizer_and_reference(method, model, net(), data, options)
    assert_histories_close(run(optimizer, model, data), expected)
    assert optimizer.factor(0, "A").shape == (131, 131)


@pytest.mark.parametrize("method", ["foof", "kfac-factored", "kfac-exact"])
def test_convolution_steps_equal_hand_formulas_without_unfolding_between_refreshes(method: str):
    """A convolution's gradient comes from the native backward on steps that fold no factor
    (its unfolded input is not built then); its d_in = 15·3·3 + 1 = 136 is padded to 144."""

    def net() -> nn.Module:
        torch.manual_seed(4)
        return nn.Sequential(
            nn.Conv2d(15, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 16, 3)
        ).double()

    generator = torch.Generator().manual_seed(9)
    data = [
        (
            torch.randn(5, 15, 4, 4, generator=generator, dtype=torch.float64),
            torch.randint(0, 3, (5,), generator=generator),
        )
        for _ in range(4)
    ]
    options = dict(lr=0.2, damping=0.1, momentum=0.5, ema_decay=0.7, update_every=2)
    model = net()
    optimizer, expected = _optimizer_and_reference(method, model, net(), data, options)
    layers = [m for _, m in capture.find_layers(model)]
    conv_capture = optimizer.capture.layers[0]
    unfold, unfolded, history = conv_capture._unfold, [], []

    def counting_unfold(x):
        unfolded[-1] = True
        return unfold(x)

    conv_capture._unfold = counting_unfold
    for x, y in data:
        unfolded.append(False)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        history.append([capture.parameters_to_matrix(m).numpy().copy() for m in layers])
    assert unfolded == [True, False, True, False]
    assert optimizer.factor(0, "A").shape == (136, 136)
    assert_histories_close(history, expected)


def test_remove_hooks_detaches_the_optimizer():
    model = tiny_net()
    optimizer = KFAC(model, lr=0.1, damping=1.0)
    optimizer.remove_hooks()
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(KeyError, match="not captured"):
        optimizer.layer_state("nope")
