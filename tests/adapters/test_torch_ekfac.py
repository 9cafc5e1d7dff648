"""Tests of :class:`curvlinalg_torch.EKFAC` against dense references: the correction
``S = diag(Qᵀ F Q)`` with ``F`` from explicit ``torch.func`` per-example gradients and
``Q = U_A ⊗ U_G`` (``np.kron``) from the optimizer's eigenbases, and the step
``(Q diag(S̄) Qᵀ + λI)⁻¹ ∇`` as an explicit inverse, step by step through the schedule."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from curvlinalg_torch import EKFAC, KFAC, capture
from torch import nn
from torch.func import functional_call, grad, vmap

from curvlinalg import kron
from tests.adapters.test_torch_capture import tiny_net
from tests.adapters.test_torch_foof import batches, run, sampled_labels


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def mlp_batches(count: int, batch: int = 7, seed: int = 3):
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch, 5, generator=generator, dtype=torch.float64),
            torch.randint(0, 3, (batch,), generator=generator),
        )
        for _ in range(count)
    ]


def per_example_blocks(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, plain: nn.Module
) -> list[np.ndarray]:
    """Per-example gradients of each example's own cross-entropy as ``(B, d_out, d_in[+1])``
    blocks ``[W | b]`` of every supported layer (``torch.func.vmap(grad)``) at ``model``'s
    parameters, evaluated through ``plain``, a hook-free module of the same architecture
    (torch.func cannot run through a capture's autograd node)."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss_one(p, xi, yi):
        return F.cross_entropy(functional_call(plain, p, (xi[None],)), yi[None])

    grads = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    blocks = []
    for name, module in capture.find_layers(plain):
        prefix = f"{name}." if name else ""
        weight = grads[prefix + "weight"].reshape(x.shape[0], module.weight.shape[0], -1)
        if module.bias is not None:
            weight = torch.cat([weight, grads[prefix + "bias"][..., None]], dim=2)
        blocks.append(weight.numpy())
    return blocks


def vec(m: np.ndarray) -> np.ndarray:
    """Column-stacking ``vec`` (curvlinalg's Kronecker order: ``(A⊗G) vec(V) = vec(G V A)``)."""
    return m.reshape(*m.shape[:-2], -1, order="F") if m.ndim == 2 else np.stack([vec(b) for b in m])


def unvec(v: np.ndarray, d_out: int, d_in: int) -> np.ndarray:
    return v.reshape(d_out, d_in, order="F")


def dense_correction(blocks: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``diag(Qᵀ F Q)`` with ``F = (1/B) Σ_i vec(g_i) vec(g_i)ᵀ``, as a ``(d_out, d_in)`` array."""
    flat = vec(blocks)
    fisher = flat.T @ flat / blocks.shape[0]
    return unvec(np.diag(q.T @ fisher @ q), blocks.shape[1], blocks.shape[2])


def basis(optimizer: EKFAC, index: int) -> np.ndarray:
    state = optimizer.layer_state(index)
    return np.kron(state["A_vectors"].numpy(), state["G_vectors"].numpy())


def mc_blocks(model, x, generator, plain):
    """Per-example gradients for labels sampled as the optimizer samples them."""
    with torch.no_grad():
        labels = sampled_labels(model(x), generator)
    return per_example_blocks(model, x, labels, plain)


@pytest.mark.parametrize(
    "net, data, fisher, update_every, inverse_every",
    [
        (tiny_mlp, mlp_batches(6), "empirical", 2, 3),
        (tiny_net, batches(6), "empirical", 2, 3),
        (tiny_net, batches(4), "mc", 1, 2),
    ],
    ids=["mlp-update2-T3", "conv-update2-T3", "conv-mc-T2"],
)
def test_steps_equal_the_dense_reference(net, data, fisher, update_every, inverse_every):
    """Each step moves the parameters by ``lr·(Q diag(S̄) Qᵀ + λI)⁻¹ vec(∇)`` (dense inverse),
    with ``S̄`` re-estimated from the batch at each basis refresh and averaged every
    ``update_every`` steps in between — from explicit per-example gradients."""
    lr, damping, decay = 0.3, 0.05, 0.7
    model = net()
    optimizer = EKFAC(
        model,
        lr=lr,
        damping=damping,
        fisher=fisher,
        ema_decay=decay,
        update_every=update_every,
        inverse_every=inverse_every,
        factor_dtype=torch.float64,
        seed=5,
    )
    twin_generator = torch.Generator().manual_seed(5)
    plain = net()
    layers = [m for _, m in capture.find_layers(model)]
    corrections: list[np.ndarray | None] = [None] * len(layers)
    previous_bases = None
    for step, (x, y) in enumerate(data):
        refresh, update = step % inverse_every == 0, step % update_every == 0
        data_blocks = per_example_blocks(model, x, y, plain)
        if fisher == "mc":
            # The optimizer samples on every step that folds factors or refreshes the basis.
            sampled = refresh or update
            fisher_blocks = mc_blocks(model, x, twin_generator, plain) if sampled else None
        else:
            fisher_blocks = data_blocks
        before = [capture.parameters_to_matrix(m).numpy() for m in layers]
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        bases = [basis(optimizer, index) for index in range(len(layers))]
        for index, module in enumerate(layers):
            state = optimizer.layer_state(index)
            q = bases[index]
            if refresh:
                # The bases are eigenvectors of the optimizer's current factors.
                for key in ("A", "G"):
                    vectors = state[f"{key}_vectors"].numpy()
                    rotated = vectors.T @ optimizer.factor(index, key).numpy() @ vectors
                    off = rotated - np.diag(np.diag(rotated))
                    assert np.linalg.norm(off) <= 1e-10 * np.linalg.norm(rotated)
                corrections[index] = dense_correction(fisher_blocks[index], q)
            else:
                np.testing.assert_array_equal(q, previous_bases[index])  # basis kept
                if update:
                    fresh = dense_correction(fisher_blocks[index], q)
                    corrections[index] = decay * corrections[index] + (1 - decay) * fresh
            np.testing.assert_allclose(
                state["S"].numpy(), corrections[index], rtol=1e-10, atol=1e-14
            )
            gradient = data_blocks[index].mean(0)
            d_out, d_in = gradient.shape
            matrix = q @ np.diag(vec(corrections[index])) @ q.T + damping * np.eye(q.shape[0])
            expected = unvec(np.linalg.solve(matrix, vec(gradient)), d_out, d_in)
            moved = (before[index] - capture.parameters_to_matrix(module).numpy()) / lr
            error = np.linalg.norm(moved - expected) / np.linalg.norm(expected)
            assert error <= 1e-9, f"step {step}, layer {index}: relative error {error:.3g}"
        previous_bases = bases


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_one_example_equals_exactly_damped_kfac(fisher):
    """B = 1, T = 1: the Fisher is exactly Ā⊗Ḡ, so S = s_G s_Aᵀ and EK-FAC = K-FAC (exact)."""
    x, y = mlp_batches(1, batch=1)[0]
    ekfac_model, kfac_model = tiny_mlp(), tiny_mlp()
    options = dict(lr=0.5, damping=1e-3, fisher=fisher, factor_dtype=torch.float64, seed=9)
    ekfac = EKFAC(ekfac_model, **options)
    kfac = KFAC(kfac_model, damping_rule="exact", **options)
    starts = [capture.parameters_to_matrix(m).numpy() for _, m in capture.find_layers(kfac_model)]
    got, want = run(ekfac, ekfac_model, [(x, y)]), run(kfac, kfac_model, [(x, y)])
    for index, (g, w, start) in enumerate(zip(got[0], want[0], starts)):
        error = np.linalg.norm(g - w) / np.linalg.norm(w - start)  # relative to the step
        assert error <= 1e-8, (index, error)
        state = ekfac.layer_state(index)
        products = state["G_values"][:, None] * state["A_values"][None, :]
        torch.testing.assert_close(state["S"], products, rtol=1e-8, atol=1e-12)


def test_state_dict_round_trip_is_bit_identical():
    data = batches(7)
    model = tiny_net()
    options = dict(momentum=0.9, weight_decay=1e-3, update_every=2, inverse_every=3)
    optimizer = EKFAC(model, lr=0.2, damping=0.1, seed=3, **options)
    run(optimizer, model, data[:4])
    saved_model = copy.deepcopy(model.state_dict())
    saved = copy.deepcopy(optimizer.state_dict())
    continued = run(optimizer, model, data[4:])
    resumed_model = tiny_net(seed=5)
    resumed_model.load_state_dict(saved_model)
    resumed = EKFAC(resumed_model, lr=1.0, damping=1.0, seed=12345)
    resumed.load_state_dict(saved)
    again = run(resumed, resumed_model, data[4:])
    for got_layers, want_layers in zip(again, continued):
        for got, want in zip(got_layers, want_layers):
            assert np.array_equal(got, want)
    for index in range(2):
        for key, value in optimizer.layer_state(index).items():
            assert torch.equal(resumed.layer_state(index)[key], value), key
    assert set(resumed.layer_state(1)) == {
        "A", "G", "A_values", "A_vectors", "G_values", "G_vectors", "S", "momentum_buffer"
    }  # fmt: skip


def test_non_finite_step_is_skipped_and_leaves_every_state_untouched():
    data = batches(4)
    model, twin = tiny_net(), tiny_net()
    options = dict(lr=0.3, damping=0.1, momentum=0.9, seed=4, update_every=1, inverse_every=2)
    optimizer, reference = EKFAC(model, **options), EKFAC(twin, **options)
    bad = data[1][0].clone()
    bad[0, 0, 0, 0] = float("nan")
    run(optimizer, model, data[:1])
    before = [{k: v.clone() for k, v in optimizer.layer_state(i).items()} for i in range(2)]
    with pytest.warns(RuntimeWarning, match="non-finite"):
        run(optimizer, model, [(bad, data[1][1])])
    for index in range(2):
        state = optimizer.layer_state(index)
        assert set(state) == set(before[index])
        for key, value in before[index].items():
            assert torch.equal(state[key], value), key
    assert optimizer.skipped_steps == 1 and optimizer.steps == 1
    run(optimizer, model, data[2:])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(reference, twin, [data[0], *data[2:]])
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("inverse_every", [1, 10], ids=["refresh-step", "fold-step"])
def test_overflowing_correction_is_skipped_and_leaves_every_state_untouched(
    monkeypatch, inverse_every
):
    """A diverging run can overflow the eigenvalue correction while the captures and factors
    are still finite: the step is skipped (failure rule) on a refresh step (fresh ``S``) and
    on a fold step (``kron.ema`` of ``S``), instead of raising from the average."""
    import curvlinalg_torch.ekfac as ekfac_module

    model = tiny_mlp()
    data = mlp_batches(3)
    optimizer = EKFAC(model, lr=0.1, damping=0.1, momentum=0.9, inverse_every=inverse_every)
    run(optimizer, model, data[:1])
    before = [{k: v.clone() for k, v in optimizer.layer_state(i).items()} for i in range(2)]
    params = [p.detach().clone() for p in model.parameters()]
    real = kron.eigen_correction

    def overflowing(*args, **kwargs):
        return real(*args, **kwargs) * float("inf")

    monkeypatch.setattr(ekfac_module.kron, "eigen_correction", overflowing)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        run(optimizer, model, data[1:2])
    assert optimizer.skipped_steps == 1 and optimizer.steps == 1
    for index in range(2):
        state = optimizer.layer_state(index)
        assert set(state) == set(before[index])
        for key, value in before[index].items():
            assert torch.equal(state[key], value), key
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    monkeypatch.setattr(ekfac_module.kron, "eigen_correction", real)
    run(optimizer, model, data[2:])
    assert optimizer.steps == 2


def test_training_lowers_the_loss():
    torch.manual_seed(0)
    x = torch.randn(256, 2, 4, 4, dtype=torch.float64)
    y = (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1, 0, 0] > 0).long()
    model = tiny_net()
    optimizer = EKFAC(model, lr=0.05, damping=0.1, momentum=0.9, inverse_every=5, seed=0)
    with torch.no_grad():
        initial = F.cross_entropy(model(x), y).item()
    for step in range(40):
        index = torch.arange(step * 32, (step + 1) * 32) % 256
        optimizer.zero_grad()
        F.cross_entropy(model(x[index]), y[index]).backward()
        optimizer.step()
    with torch.no_grad():
        assert F.cross_entropy(model(x), y).item() < 0.5 * initial


class DenseGradientEKFAC(EKFAC):
    """EK-FAC whose step is ``kron.corrected_solve`` of the formed gradient ``∇W`` (the path
    that convolutions take), the reference for the captures' order of linear layers."""

    def _direction(self, layer, state, damping):
        return kron.corrected_solve(
            self._gradient(layer),
            kron.Eigh(state["A_values"], state["A_vectors"]),
            kron.Eigh(state["G_values"], state["G_vectors"]),
            state["S"],
            damping,
            check_finite=False,
        )


@pytest.mark.parametrize("loss_reduction", ["mean", "sum"])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_linear_steps_from_captures_equal_the_formed_gradient_solve(loss_reduction, masked):
    """Linear layers rotate ``∇W`` from the captures, ``(e U_G)ᵀ(a U_A)/B``: the steps equal
    ``corrected_solve(∇W)`` over (B, T, d) sequences, a summed or mean loss, with padding
    (set_mask), momentum and weight decay, through folds and refreshes (float64, 1e-12)."""
    generator = torch.Generator().manual_seed(11)
    data = []
    for _ in range(5):
        x = torch.randn(4, 3, 5, generator=generator, dtype=torch.float64)
        y = torch.randint(0, 3, (4, 3), generator=generator)
        if masked:
            y[0, 1:] = -100
            y[2, 2] = -100
        data.append((x, y))
    options = dict(
        lr=0.2,
        damping=0.05,
        momentum=0.9,
        weight_decay=1e-2,
        update_every=2,
        inverse_every=3,
        factor_dtype=torch.float64,
        loss_reduction=loss_reduction,
        seed=2,
    )
    histories = []
    for kind in (EKFAC, DenseGradientEKFAC):
        model = tiny_mlp()
        optimizer = kind(model, **options)
        history = []
        for x, y in data:
            optimizer.zero_grad()
            if masked:
                optimizer.set_mask(y != -100)
            logits = model(x)
            loss = F.cross_entropy(logits.reshape(-1, 3), y.reshape(-1), reduction="sum")
            (loss if loss_reduction == "sum" else loss / x.shape[0]).backward()
            optimizer.step()
            history.append([p.detach().clone() for p in model.parameters()])
        histories.append(history)
    for step, (got, want) in enumerate(zip(*histories)):
        for p, q in zip(got, want):
            error = torch.linalg.norm(p - q) / torch.linalg.norm(q)
            assert error <= 1e-12, f"step {step}: relative error {error:.3g}"


def test_argument_validation():
    with pytest.raises(ValueError, match="one positive number"):
        EKFAC(tiny_net(), lr=0.1, damping=(1.0, 1.0))
    with pytest.raises(ValueError, match="damping"):
        EKFAC(tiny_net(), lr=0.1, damping=0.0)
    with pytest.raises(ValueError, match="fisher"):
        EKFAC(tiny_net(), lr=0.1, damping=1.0, fisher="exact")


# --------------------------------------------------------------------------------------
# torch.distributed: run by test_torch_distributed.py inside its one 2-rank gloo spawn
# (a spawn of its own cost ~20–50 s on the shared 2-core machine)
# --------------------------------------------------------------------------------------


def distributed_run(rank: int, world: int) -> list[torch.Tensor]:
    """EK-FAC on rank ``rank`` of ``world`` with its share of 8 examples per step (empirical
    Fisher, bases every 2 steps so that both the fresh and the averaged correction are
    reduced): the final parameters, then every layer's ``S``."""
    # An MLP whose factors are positive definite from the first batch on (d_in + 1 ≤ B):
    # EK-FAC, unlike K-FAC, depends on the basis chosen inside a repeated eigenvalue (a null
    # space), which rounding decides differently in one process and on two ranks.
    model = tiny_mlp()
    optimizer = EKFAC(
        model,
        lr=0.3,
        damping=0.05,
        fisher="empirical",
        momentum=0.9,
        inverse_every=2,
        factor_dtype=torch.float64,
        distributed=world > 1,
    )
    share = 8 // world
    for x, y in mlp_batches(5, batch=8):
        optimizer.zero_grad()
        rows = slice(rank * share, (rank + 1) * share)
        F.cross_entropy(model(x[rows]), y[rows]).backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()] + [
        optimizer.layer_state(i)["S"].clone() for i in range(len(optimizer.layers))
    ]
