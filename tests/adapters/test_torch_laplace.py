"""Laplace against dense references built with ``torch.func``.

Coordinates as in ``test_torch_natural_gradient.py``: per captured layer the block
``[W.reshape(d_out, -1) | b]`` flattened row-major, layers in capture order. The posterior
precision is ``Λ = τI + n·F``; the samplers are linear in their noise, so feeding every basis
vector of the noise space gives the matrix ``M`` with ``Cov = M Mᵀ`` exactly (no statistics).
Row-major flattening sees the Kronecker block ``A⊗G`` (``V ↦ G V A``) as ``torch.kron(G, A)``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from curvlinalg_torch.capture import find_layers
from curvlinalg_torch.laplace import Laplace
from torch import nn
from torch.func import functional_call, jacrev, vmap

from curvlinalg import fisher as core_fisher

DTYPE = torch.float64
CLASSES = 3
TAU = 0.7
N_DATA = 50.0


class TinyNet(nn.Module):
    """Conv2d(1→2, 3×3, bias) on 5×5 inputs (T = 9), tanh, Linear(18→3, bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.head = nn.Linear(18, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(x)).flatten(1))


class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(4, 5)
        self.head = nn.Linear(5, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(x)))


def make_model(kind: type[nn.Module] = TinyNet, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = kind().to(DTYPE)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    return model


def make_batch(
    seed: int, batch: int = 4, shape: tuple[int, ...] = (1, 5, 5)
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, *shape, generator=g, dtype=DTYPE),
        torch.randint(0, CLASSES, (batch,), generator=g),
    )


# ------------------------------------------------------------------------- dense reference


def to_blocks(tree: dict[str, torch.Tensor], model: nn.Module, lead: int) -> torch.Tensor:
    parts = []
    for name, _ in find_layers(model):
        w = tree[f"{name}.weight"]
        shape = w.shape[:lead]
        block = w.reshape(*shape, w.shape[lead], -1)
        bias = tree.get(f"{name}.bias")
        if bias is not None:
            block = torch.cat([block, bias[..., None]], dim=-1)
        parts.append(block.reshape(*shape, -1))
    return torch.cat(parts, dim=-1)


def parameters_vector(model: nn.Module) -> torch.Tensor:
    return to_blocks({n: p.detach() for n, p in model.named_parameters()}, model, 0)


def jacobians(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    params = {n: p.detach() for n, p in model.named_parameters()}

    def logits(params: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return functional_call(model, params, (xi[None],))[0]

    jac = vmap(jacrev(logits), in_dims=(None, 0))(params, x)
    with torch.no_grad():
        p = torch.softmax(model(x), dim=-1)
    return to_blocks(jac, model, 2), p


def dense_fisher(model: nn.Module, x: torch.Tensor, kind: str, labels: torch.Tensor | None):
    jac, p = jacobians(model, x)
    batch = jac.shape[0]
    if kind == "exact":
        middle = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        return torch.einsum("bcd,bce,bef->df", jac, middle, jac) / batch
    errors = p - F.one_hot(labels, CLASSES).to(DTYPE)
    g = torch.einsum("bcd,bc->bd", jac, errors)
    return g.T @ g / batch


def mc_labels(seed: int, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        logits = model(x)
    return core_fisher.sample_labels(logits, torch.rand(len(x), generator=g, dtype=DTYPE))


def basis_covariance(laplace: Laplace) -> torch.Tensor:
    """``M Mᵀ`` from the deviations of every basis vector of the noise ``(y, z)``."""
    y0, z0 = laplace.draw_noise(1)
    sizes = [noise[0].numel() for noise in y0]
    count = sum(sizes) + (0 if z0 is None else z0.shape[1])
    eye = torch.eye(count, dtype=DTYPE)
    y, start = [], 0
    for noise, size in zip(y0, sizes):
        y.append(eye[:, start : start + size].reshape(count, *noise.shape[1:]))
        start += size
    z = None if z0 is None else eye[:, start:]
    deviations = laplace.deviations(y, z)
    m = torch.cat([d.reshape(count, -1) for d in deviations], dim=1)  # (noise, D)
    return m.T @ m


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-9) -> None:
    error = float(torch.linalg.norm((actual - expected).detach()))
    scale = float(torch.linalg.norm(expected.detach()))
    assert error <= rtol * scale, f"relative error {error / scale:.3e} > {rtol:.1e}"


# ------------------------------------------------------------------------- covariance


@pytest.mark.parametrize("kind", ["exact", "mc", "empirical"])
def test_woodbury_covariance_equals_dense_inverse(kind: str) -> None:
    model = make_model()
    x, y = make_batch(1)
    labels = mc_labels(3, model, x) if kind == "mc" else y
    precision = TAU * torch.eye(parameters_vector(model).numel(), dtype=DTYPE) + N_DATA * (
        dense_fisher(model, x, kind, labels)
    )
    la = Laplace(
        model,
        "woodbury",
        prior_precision=TAU,
        n_data=N_DATA,
        fisher=kind,
        generator=torch.Generator().manual_seed(3),
    ).fit((x, y))
    assert la.captures[0][0].shape[0] == (4 * CLASSES if kind == "exact" else 4)
    assert_close(basis_covariance(la), torch.linalg.inv(precision))


def _dense_kron_precision(la: Laplace) -> torch.Tensor:
    blocks = [
        TAU * torch.eye(a.shape[0] * g.shape[0], dtype=DTYPE) + la.n_data * torch.kron(g, a)
        for a, g in la.factors
    ]
    return torch.block_diag(*blocks)


@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_kron_single_example_is_the_exact_layer_block(kind: str) -> None:
    """One example, Linear layers: ``F_l = (a aᵀ)⊗(Σ_c e_c e_cᵀ)`` exactly, so the Kronecker
    factors reproduce the diagonal blocks of the dense Fisher."""
    model = make_model(TinyMLP)
    x, y = make_batch(2, batch=1, shape=(4,))
    dense = dense_fisher(model, x, kind, y)
    la = Laplace(model, "kron", prior_precision=TAU, n_data=N_DATA, fisher=kind).fit((x, y))
    start = 0
    for a, g in la.factors:
        size = a.shape[0] * g.shape[0]
        assert_close(torch.kron(g, a), dense[start : start + size, start : start + size])
        start += size


def test_kron_factors_average_over_the_loader_and_covariance() -> None:
    model = make_model()
    batches = [make_batch(5, batch=3), make_batch(6, batch=5)]
    single = [Laplace(model, "kron").fit(batch).factors for batch in batches]
    la = Laplace(model, "kron", prior_precision=TAU).fit(batches)
    assert la.n_data == 8 and la.n_seen == 8
    for index, (a, g) in enumerate(la.factors):
        a_mean = (3 * single[0][index][0] + 5 * single[1][index][0]) / 8
        g_mean = (3 * single[0][index][1] + 5 * single[1][index][1]) / 8
        assert_close(a, a_mean, 1e-12)
        assert_close(g, g_mean, 1e-12)
    assert_close(basis_covariance(la), torch.linalg.inv(_dense_kron_precision(la)))


def test_conv_kron_factors_follow_the_definition() -> None:
    """Conv layer with T = 4 positions, exact Fisher: ``A = Σ_{i,t} a aᵀ / (B·T)`` over the
    unfolded patches with the ones column, ``G = Σ_{i,c,t} e eᵀ / B`` with ``e_ic`` the
    back-propagated ``√p_c (p − e_c)`` (built here by ``torch.func`` Jacobians)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3).to(DTYPE)
    rest = nn.Sequential(nn.Tanh(), nn.Flatten(), nn.Linear(12, CLASSES)).to(DTYPE)
    model = nn.Sequential(conv, rest)
    x, y = make_batch(7, batch=3, shape=(2, 4, 4))
    la = Laplace(model, "kron", fisher="exact", layers=[conv]).fit((x, y))
    ((a_factor, g_factor),) = la.factors
    patches = F.unfold(x, 3).mT  # (B, T, 18)
    patches = torch.cat([patches, torch.ones(3, 4, 1, dtype=DTYPE)], dim=-1)
    assert_close(a_factor, torch.einsum("btk,btl->kl", patches, patches) / 12)
    with torch.no_grad():
        outputs = conv(x)  # (B, 3, 2, 2)
        rows = core_fisher.softmax_exact_errors(rest(outputs))  # (B, C, C)
    jac = vmap(jacrev(lambda o: rest(o[None])[0]))(outputs)  # (B, C, 3, 2, 2)
    errors = torch.einsum("bck,bkohw->bcohw", rows, jac).flatten(3)  # (B, C, 3, T)
    assert_close(g_factor, torch.einsum("bcot,bcpt->op", errors, errors) / 3)


# ------------------------------------------------------------------------- evidence


@pytest.mark.parametrize("structure", ["woodbury", "kron"])
def test_log_marginal_likelihood_equals_dense_formula(structure: str) -> None:
    model = make_model()
    batches = [make_batch(8), make_batch(9)]
    la = Laplace(model, structure, prior_precision=TAU, fisher="exact").fit(batches)
    theta = parameters_vector(model)
    count = theta.numel()
    with torch.no_grad():
        log_likelihood = -sum(F.cross_entropy(model(x), y, reduction="sum") for x, y in batches)
    for tau in (TAU, 3.0):
        if structure == "woodbury":
            precision = tau * torch.eye(count, dtype=DTYPE) + la.n_data * dense_fisher(
                model, batches[0][0], "exact", None
            )
        else:
            la.prior_precision = tau
            precision = _dense_kron_precision_tau(la, tau)
        expected = (
            log_likelihood
            - tau / 2 * theta @ theta
            + count / 2 * math.log(tau)
            - torch.linalg.slogdet(precision)[1] / 2
        )
        assert_close(la.log_marginal_likelihood(tau), expected, 1e-10)


def _dense_kron_precision_tau(la: Laplace, tau: float) -> torch.Tensor:
    blocks = [
        tau * torch.eye(a.shape[0] * g.shape[0], dtype=DTYPE) + la.n_data * torch.kron(g, a)
        for a, g in la.factors
    ]
    return torch.block_diag(*blocks)


def test_optimize_prior_precision_picks_the_grid_maximum() -> None:
    model = make_model()
    la = Laplace(model, "woodbury").fit(make_batch(10))
    grid = [0.01, 0.1, 1.0, 10.0, 100.0]
    scores = [float(la.log_marginal_likelihood(t)) for t in grid]
    chosen = la.optimize_prior_precision(grid)
    assert chosen == grid[max(range(len(grid)), key=scores.__getitem__)]
    assert la.prior_precision == chosen


# ------------------------------------------------------------------------- sampling, predictive


def test_samples_are_map_plus_deviations_and_reproducible() -> None:
    model = make_model()
    la = Laplace(model, "woodbury", prior_precision=TAU).fit(make_batch(11))
    samples = la.sample(6, torch.Generator().manual_seed(1))
    assert set(samples) == {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        assert samples[name].shape == (6, *p.shape)
    y, z = la.draw_noise(6, torch.Generator().manual_seed(1))
    deviations = la.deviations(y, z)
    stacked = to_blocks(samples, model, 1)
    expected = parameters_vector(model) + torch.cat([d.reshape(6, -1) for d in deviations], 1)
    assert_close(stacked, expected, 1e-14)
    again = la.sample(6, torch.Generator().manual_seed(1))
    assert all(torch.equal(samples[k], again[k]) for k in samples)


@pytest.mark.parametrize("structure", ["woodbury", "kron"])
def test_predictive_shape_and_normalisation(structure: str) -> None:
    model = make_model()
    la = Laplace(model, structure, prior_precision=TAU).fit([make_batch(12), make_batch(13)])
    x, _ = make_batch(14, batch=7)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    probabilities = la.predict(x, n_samples=5, generator=torch.Generator().manual_seed(0))
    assert probabilities.shape == (7, CLASSES)
    assert (probabilities >= 0).all()
    assert_close(probabilities.sum(-1), torch.ones(7, dtype=DTYPE), 1e-12)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # A prior that pins the parameters gives the MAP prediction.
    pinned = la.predict(
        x, n_samples=3, generator=torch.Generator().manual_seed(0), prior_precision=1e12
    )
    with torch.no_grad():
        assert_close(pinned, torch.softmax(model(x), -1), 1e-5)


def test_only_captured_layers_are_sampled_and_no_grad_is_written() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).to(DTYPE)
    model.train()
    x, y = make_batch(15, batch=6, shape=(4,))
    la = Laplace(model, "kron", layers=[model[3]]).fit((x, y))
    assert model.training  # mode restored
    assert all(p.grad is None for p in model.parameters())
    samples = la.sample(2, torch.Generator().manual_seed(0))
    assert set(samples) == {"3.weight", "3.bias"}
    assert la.predict(x, 2, torch.Generator().manual_seed(0)).shape == (6, 3)


def test_errors() -> None:
    model = make_model()
    with pytest.raises(ValueError, match="structure"):
        Laplace(model, "diag")
    with pytest.raises(ValueError, match="prior_precision"):
        Laplace(model, prior_precision=0.0)
    with pytest.raises(ValueError, match="fisher"):
        Laplace(model, fisher="ggn")
    la = Laplace(model)
    with pytest.raises(RuntimeError, match="not fitted"):
        la.sample(2)
    la.fit(make_batch(16))
    with pytest.raises(ValueError, match="n_samples"):
        la.sample(0)
    with pytest.raises(ValueError, match="prior_precision"):
        la.log_marginal_likelihood(-1.0)
