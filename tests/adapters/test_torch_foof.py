"""Tests of :class:`curvlinalg_torch.FOOF` (and of the shared optimizer machinery).

The reference (:func:`reference_run`, shared with the K-FAC tests) is a NumPy loop over the
formulas written out by hand: factors as explicit sums of outer products of hand-built patches
(positions summed, examples averaged; K-FAC's G averaged over both), exponential averages with
the first estimate taken as is, explicit ``np.linalg.inv`` inverses, ``np.kron`` for the exactly
damped K-FAC, the π rule from traces, gradients from plain autograd on a separate copy of the
model, and heavy-ball momentum on the preconditioned step with decoupled weight decay.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from curvlinalg_torch import FOOF, capture
from torch import nn

from curvlinalg import NotPositiveDefiniteError, kron
from tests.adapters.test_torch_capture import reference_errors, tiny_net


def batches(count: int, batch: int = 6, seed: int = 10, dtype: torch.dtype = torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch, 2, 4, 4, generator=generator, dtype=dtype),
            torch.randint(0, 4, (batch,), generator=generator),
        )
        for _ in range(count)
    ]


def sampled_labels(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Inverse-CDF labels with the optimizer's draws (torch.rand in the logits' dtype)."""
    uniform = torch.rand(logits.shape[0], generator=generator, dtype=logits.dtype)
    cumulative = torch.softmax(logits, 1).cumsum(1)
    return (cumulative <= uniform[:, None]).sum(1).clamp(max=logits.shape[1] - 1)


def reference_run(
    model: nn.Module,
    data: list,
    *,
    method: str = "foof",
    lr: float,
    damping: Any,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    ema_decay: float = 0.95,
    update_every: int = 1,
    inverse_every: int = 1,
    fisher: str = "empirical",
    damping_rule: str = "factored",
    seed: int = 0,
) -> list[list[np.ndarray]]:
    """Parameters ``[W | b]`` of every captured layer after each step, by hand (NumPy)."""
    layers = [m for _, m in capture.find_layers(model)]
    state: list[dict[str, Any]] = [{} for _ in layers]
    generator = torch.Generator().manual_seed(seed)
    history = []
    for step, (x, y) in enumerate(data):
        model.zero_grad(set_to_none=True)
        a_list, e_list, logits = reference_errors(model, x, y, layers)
        if method == "kfac" and fisher == "mc" and step % update_every == 0:
            _, e_fisher, _ = reference_errors(model, x, sampled_labels(logits, generator), layers)
        else:
            e_fisher = e_list
        F.cross_entropy(model(x), y).backward()
        for index, module in enumerate(layers):
            st = state[index]
            a = a_list[index].detach().numpy()
            e = e_fisher[index].detach().numpy()
            batch = a.shape[0]
            rows_a, rows_e = a.reshape(-1, a.shape[-1]), e.reshape(-1, e.shape[-1])
            factor_a = sum(np.outer(r, r) for r in rows_a) / batch  # Σ_t summed, B averaged
            factor_g = sum(np.outer(r, r) for r in rows_e) / rows_e.shape[0]
            if step % update_every == 0 or "A" not in st:
                for key, new in (("A", factor_a), ("G", factor_g)):
                    st[key] = new if key not in st else ema_decay * st[key] + (1 - ema_decay) * new
            if step % inverse_every == 0 or "P" not in st:
                A, G = st["A"], st["G"]
                eye_a, eye_g = np.eye(A.shape[0]), np.eye(G.shape[0])
                if method == "foof":
                    st["P"] = (np.linalg.inv(A + damping * eye_a),)
                elif damping_rule == "exact":
                    st["P"] = (
                        np.linalg.inv(np.kron(A, G) + damping * np.eye(A.shape[0] * G.shape[0])),
                    )
                else:
                    if isinstance(damping, tuple):
                        damping_a, damping_g = damping
                    else:
                        pi = np.sqrt((np.trace(A) / A.shape[0]) / (np.trace(G) / G.shape[0]))
                        damping_a, damping_g = pi * np.sqrt(damping), np.sqrt(damping) / pi
                    st["P"] = (
                        np.linalg.inv(A + damping_a * eye_a),
                        np.linalg.inv(G + damping_g * eye_g),
                    )
            gradient = torch.cat(
                [module.weight.grad.reshape(module.weight.shape[0], -1)]
                + ([module.bias.grad[:, None]] if module.bias is not None else []),
                dim=1,
            ).numpy()
            if method == "foof":
                s = gradient @ st["P"][0]
            elif damping_rule == "exact":
                vec = gradient.reshape(-1, order="F")  # column-major vec
                s = (st["P"][0] @ vec).reshape(gradient.shape, order="F")
            else:
                s = st["P"][1] @ gradient @ st["P"][0]
            theta = capture.parameters_to_matrix(module).numpy()
            direction = s + weight_decay * theta
            if momentum:
                st["buf"] = direction if "buf" not in st else momentum * st["buf"] + direction
                direction = st["buf"]
            new = torch.from_numpy(theta - lr * direction)
            with torch.no_grad():
                weight, bias = capture.matrix_to_parameters(new, module)
                module.weight.copy_(weight)
                if bias is not None:
                    module.bias.copy_(bias)
        history.append([capture.parameters_to_matrix(m).numpy().copy() for m in layers])
    return history


def run(optimizer: torch.optim.Optimizer, model: nn.Module, data: list) -> list[list[np.ndarray]]:
    layers = [m for _, m in capture.find_layers(model)]
    history = []
    for x, y in data:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        history.append([capture.parameters_to_matrix(m).double().numpy() for m in layers])
    return history


def assert_histories_close(actual, expected, tol: float = 1e-10) -> None:
    for step, (got_layers, want_layers) in enumerate(zip(actual, expected)):
        for index, (got, want) in enumerate(zip(got_layers, want_layers)):
            error = np.linalg.norm(got - want) / np.linalg.norm(want)
            assert error <= tol, f"step {step}, layer {index}: relative error {error:.3g}"


# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "momentum, weight_decay, update_every, inverse_every",
    [(0.0, 0.0, 1, 1), (0.9, 1e-2, 1, 2), (0.5, 0.0, 2, 3)],
    ids=["plain", "momentum-wd-T2", "update2-T3"],
)
def test_steps_equal_hand_formulas(momentum, weight_decay, update_every, inverse_every):
    data = batches(4)
    model, reference = tiny_net(), tiny_net()
    options = dict(
        lr=0.5,
        damping=0.3,
        momentum=momentum,
        weight_decay=weight_decay,
        ema_decay=0.8,
        update_every=update_every,
        inverse_every=inverse_every,
    )
    optimizer = FOOF(model, factor_dtype=torch.float64, **options)
    expected = reference_run(reference, data, method="foof", **options)
    assert_histories_close(run(optimizer, model, data), expected)
    assert optimizer.steps == 4
    assert set(optimizer.layer_state(0)) >= {"A", "A_inv"}


def test_float32_factors_of_a_float64_model():
    data = batches(3)
    model, reference = tiny_net(), tiny_net()
    options = dict(lr=0.5, damping=0.3, momentum=0.9, weight_decay=1e-2, ema_decay=0.8)
    optimizer = FOOF(model, **options)
    expected = reference_run(reference, data, method="foof", **options)
    assert_histories_close(run(optimizer, model, data), expected, tol=1e-5)
    assert optimizer.layer_state(0)["A"].dtype == torch.float32  # the default factor_dtype


def test_float64_factors_and_sum_reduction():
    """``loss_reduction="sum"`` with a summed loss and ``lr/B`` takes the mean-loss step."""
    data = batches(2)
    model_mean, model_sum = tiny_net(), tiny_net()
    mean = FOOF(model_mean, lr=0.5, damping=0.3, factor_dtype=torch.float64)
    summed = FOOF(
        model_sum, lr=0.5 / 6, damping=0.3, factor_dtype=torch.float64, loss_reduction="sum"
    )
    for x, y in data:
        for model, optimizer, reduction in ((model_mean, mean, "mean"), (model_sum, summed, "sum")):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y, reduction=reduction).backward()
            optimizer.step()
    for p, q in zip(model_mean.parameters(), model_sum.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_other_parameters_get_momentum_sgd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5), nn.Linear(5, 2)).double()
    twin = copy.deepcopy(model)
    optimizer = FOOF(model, lr=0.1, damping=1.0, momentum=0.9, weight_decay=0.01, other_lr=0.05)
    sgd = torch.optim.SGD(twin[1].parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    assert [g["name"] for g in optimizer.param_groups] == ["curvature", "other"]
    for _ in range(3):
        x, y = torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,))
        for m, opt in ((model, optimizer), (twin, sgd)):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
        twin[0].load_state_dict(model[0].state_dict())  # keep the inputs of the norm equal
        twin[2].load_state_dict(model[2].state_dict())
        torch.testing.assert_close(model[1].weight, twin[1].weight, rtol=1e-12, atol=1e-14)


def test_non_finite_step_is_skipped_without_touching_state():
    model = tiny_net()
    optimizer = FOOF(model, lr=0.5, damping=0.3, momentum=0.9)
    data = batches(2)
    run(optimizer, model, data[:1])
    before = copy.deepcopy(optimizer.state_dict())
    params = [p.detach().clone() for p in model.parameters()]
    bad = data[1][0].clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        optimizer.zero_grad()
        F.cross_entropy(model(bad), data[1][1]).backward()
        optimizer.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        optimizer.zero_grad()
        F.cross_entropy(model(bad), data[1][1]).backward()
        optimizer.step()
    assert optimizer.skipped_steps == 2 and optimizer.steps == 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    after = optimizer.state_dict()
    for old, new in zip(before["curvlinalg"]["layers"], after["curvlinalg"]["layers"]):
        assert old.keys() == new.keys()
        assert all(torch.equal(old[key], new[key]) for key in old)


def test_state_dict_round_trip_is_bit_identical():
    data = batches(6)
    model = tiny_net()
    optimizer = FOOF(model, lr=0.5, damping=0.3, momentum=0.9, inverse_every=4, weight_decay=1e-3)
    run(optimizer, model, data[:3])
    saved_model = copy.deepcopy(model.state_dict())
    saved = copy.deepcopy(optimizer.state_dict())
    continued = run(optimizer, model, data[3:])

    resumed_model = tiny_net(seed=99)
    resumed_model.load_state_dict(saved_model)
    resumed = FOOF(resumed_model, lr=1.0, damping=1.0)
    resumed.load_state_dict(saved)
    assert resumed.steps == 3 and resumed.param_groups[0]["momentum"] == 0.9
    assert resumed.inverse_every == 4
    again = run(resumed, resumed_model, data[3:])
    for got_layers, want_layers in zip(again, continued):
        for got, want in zip(got_layers, want_layers):
            assert np.array_equal(got, want)


def test_lr_scheduler_changes_the_step():
    model = tiny_net()
    optimizer = FOOF(model, lr=1.0, damping=0.3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    run(optimizer, model, batches(1))
    scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == [0.5, 0.5]


def test_half_precision_model_keeps_float32_factors():
    model = tiny_net(dtype=torch.bfloat16)
    optimizer = FOOF(model, lr=0.1, damping=1.0, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    run(optimizer, model, batches(2, dtype=torch.bfloat16))
    state = optimizer.layer_state("3")
    assert state["A"].dtype == state["A_inv"].dtype == state["momentum_buffer"].dtype
    assert state["A"].dtype == torch.float32
    assert model[0].weight.dtype == torch.bfloat16
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_cholesky_failure_is_retried_then_raises_naming_the_layer():
    model = tiny_net()
    optimizer = FOOF(model, lr=0.1, damping=1.0)
    run(optimizer, model, batches(1))
    state = optimizer.layer_state(0)
    size = state["A"].shape[0]
    state["A"] = -5.0 * torch.eye(size, dtype=torch.float32)  # needs 10× the damping
    run(optimizer, model, batches(1))  # inverse_every=1: refreshed, retried, succeeded
    assert torch.isfinite(state["A_inv"]).all()
    state = optimizer.layer_state(0)
    state["A"] = -1e9 * torch.eye(size, dtype=torch.float32)
    with pytest.raises(NotPositiveDefiniteError, match="layer '0'"):
        run(optimizer, model, batches(1))


def test_training_lowers_the_loss():
    torch.manual_seed(0)
    x = torch.randn(256, 2, 4, 4, dtype=torch.float64)
    y = (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1, 0, 0] > 0).long()
    model = tiny_net()
    optimizer = FOOF(model, lr=0.2, damping=0.1, momentum=0.9, inverse_every=5)
    initial = F.cross_entropy(model(x), y).item()
    for step in range(60):
        index = torch.arange(step * 32, (step + 1) * 32) % 256
        optimizer.zero_grad()
        F.cross_entropy(model(x[index]), y[index]).backward()
        optimizer.step()
    with torch.no_grad():
        assert F.cross_entropy(model(x), y).item() < 0.5 * initial


def test_argument_validation():
    model = tiny_net()
    for kwargs, name in (
        ({"damping": 0.0}, "damping"),
        ({"damping": 1.0, "momentum": 1.0}, "momentum"),
        ({"damping": 1.0, "inverse_every": 0}, "inverse_every"),
        ({"damping": 1.0, "ema_decay": 1.5}, "ema_decay"),
        ({"damping": 1.0, "factor_dtype": torch.float16}, "factor_dtype"),
    ):
        with pytest.raises(ValueError, match=name):
            FOOF(tiny_net(), lr=0.1, **kwargs)
    with pytest.raises(ValueError, match="no supported layer"):
        FOOF(nn.Sequential(nn.ReLU()), lr=0.1, damping=1.0)
    optimizer = FOOF(model, lr=0.1, damping=1.0)
    x, y = batches(1)[0]
    optimizer.zero_grad()
    model(x)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="run 2 times"):
        optimizer.step()


@pytest.mark.parametrize("width", [40, 300, 600], ids=["one-panel", "two-panels", "four-panels"])
def test_fused_factor_average_equals_the_core(width: int):
    """The in-place block-triangular fold equals ``kron.ema(avg, kron.factor(a), ρ)``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, 3)).double()
    optimizer = FOOF(model, lr=0.1, damping=1.0, ema_decay=0.7, factor_dtype=torch.float64)
    expected = None
    for _ in range(3):
        x, y = torch.randn(20, width, dtype=torch.float64), torch.randint(0, 3, (20,))
        expected = kron.ema(expected, kron.factor(x, bias=True), 0.7)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    torch.testing.assert_close(optimizer.factor(0, "A"), expected, rtol=1e-12, atol=1e-14)
