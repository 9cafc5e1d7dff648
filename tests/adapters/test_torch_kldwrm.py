r"""Tests of :class:`curvlinalg_torch.kldwrm.KLDWRM` (Puiu 2022: SO-, Q-, QE-KLD-WRM).

Every reference is dense NumPy written from the paper's formulas, independent of curvlinalg
and of the capture hooks: a ``Linear → tanh → Linear`` network's forward and backward by hand
(``dense_layers``), Kronecker matrices with ``np.kron`` (column-major ``vec``, so
``(A⊗G) vec V = vec(G V A)``), explicit solves, and the *direct* minimisers of the
objectives (26) and (28) with every previous model kept (NOTES.md identities 18–21). The
per-step Fisher matrices of those objectives are the ones the factor averages imply,
``F_0 = F̄_0``, ``F_i = (F̄_i − ρF̄_{i−1})/(1−ρ)`` (identity 18), because a K-FAC optimizer
averages Kronecker *factors*, not their products. Variable λ = 1/lr comes from a
``torch.optim.lr_scheduler`` and enters as in the variable-step statement of Prop. 4.1/4.2
(every wake term of step k weighted by the current λ_k).

float64 throughout (model, factors, references); the checks are norm-wise relative with
tolerances far above the rounding of these well-conditioned, tiny problems.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from curvlinalg_torch import KFAC
from curvlinalg_torch.kldwrm import KLDWRM, symmetric_kl
from torch import nn

RTOL = 1e-9


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """These problems are tiny: intra-op threads only contend on a shared machine (10× slower
    under load); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float = RTOL) -> None:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert np.all(np.isfinite(actual))
    error = np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-300)
    assert error <= rtol, f"relative error {error:.3e} > {rtol:.1e}"


# ----------------------------------------------------------------------------------------
# Dense references (NumPy, written from the formulas; no curvlinalg, no capture hooks)
# ----------------------------------------------------------------------------------------


def kappa(i: int, rho: float) -> float:
    """κ(0) = 1, κ(i>0) = 1 − ρ (Puiu eq. 17)."""
    return 1.0 if i == 0 else 1.0 - rho


def wake_sum(items: Sequence[np.ndarray], rho: float) -> np.ndarray:
    """``Σ_{i=0}^k κ(i) ρ^{k−i} items_i`` written out (Puiu eq. 18)."""
    k = len(items) - 1
    return sum(kappa(i, rho) * rho ** (k - i) * items[i] for i in range(k + 1))


def vec(m: np.ndarray) -> np.ndarray:
    """Column-major vec, so that ``np.kron(A, G) @ vec(V) == vec(G V A)``."""
    return m.reshape(-1, order="F")


def mat(v: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return v.reshape(shape, order="F")


class Layer(NamedTuple):
    """One layer's quantities on one batch, by hand: inputs with the ones column ``a``
    ``(B, d_in+1)``, per-example output gradients ``e`` ``(B, d_out)``, the mean gradient
    ``(d_out, d_in+1)`` and the factors ``A = aᵀa/B``, ``G = eᵀe/B``."""

    a: np.ndarray
    e: np.ndarray
    grad: np.ndarray
    A: np.ndarray
    G: np.ndarray


def dense_layers(params: Sequence[np.ndarray], x: np.ndarray, y: np.ndarray) -> list[Layer]:
    """Forward and backward of ``Linear → tanh → Linear`` with cross-entropy, written out.

    ``params = (W1, b1, W2, b2)``. The output error of example ``i`` is
    ``e2_i = softmax(z_i) − onehot(y_i)`` (the gradient of its own loss), back-propagated as
    ``e1_i = (e2_i W2) ⊙ (1 − tanh²(h1_i))``.
    """
    w1, b1, w2, b2 = params
    batch = x.shape[0]
    ones = np.ones((batch, 1))
    h1 = x @ w1.T + b1
    z1 = np.tanh(h1)
    logits = z1 @ w2.T + b2
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    e2 = p - np.eye(logits.shape[1])[y]
    e1 = (e2 @ w2) * (1 - z1**2)
    layers = []
    for a, e in ((np.hstack([x, ones]), e1), (np.hstack([z1, ones]), e2)):
        layers.append(Layer(a, e, e.T @ a / batch, a.T @ a / batch, e.T @ e / batch))
    return layers


def pi_damping(a: np.ndarray, g: np.ndarray, damping: float) -> tuple[float, float]:
    """Martens–Grosse π rule: λ_A·λ_G = λ, λ_A/λ_G = (tr A/d_A)/(tr G/d_G)."""
    pi = np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / g.shape[0]))
    return pi * np.sqrt(damping), np.sqrt(damping) / pi


class DenseKLDWRM:
    """SO-/Q-KLD-WRM for one layer with explicit ``np.kron`` matrices and dense solves.

    Factors: ``Ā_k``, ``Ḡ_k`` the κ-wake sums (eq. 18) of the batch factors of the steps whose
    batch updates them (every ``update_every``-th). ``F̄`` (recomputed every
    ``inverse_every``-th step, held in between): ``Ā⊗Ḡ + δI`` (``damping_rule="exact"``) or
    ``(Ā + δ_A I)⊗(Ḡ + δ_G I)`` with the π rule (``"factored"``).

    * ``mode="so"``: ``s_k = −λ_k⁻¹ F̄⁻¹ vec(g_k − ρ(λ_k/λ_{k−1}) g_{k−1})`` (Prop. 4.1).
    * ``mode="q"``: ``B_k = b_scale·A_k⊗G_k`` at update steps, ``b_scale·Ā⊗Ḡ`` otherwise
      (rule 20); ``s_k = −λ_k⁻¹(F̄ + B_k/λ_k)⁻¹ ĝ_k``,
      ``ĝ_k = g_k + ρ(λ_k/λ_{k−1})(ĝ_{k−1} − g_{k−1} − M̂_{k−1}ĝ_{k−1})``,
      ``M̂_kĝ_k = F̄(F̄ + B_k/λ_k)⁻¹ĝ_k`` (Prop. 4.2). ``summed=True``: the paper code's matrix
      ``(Ā_δ + b_A/λ)⊗(Ḡ_δ + b_G/λ)`` instead of ``F̄ + B/λ``.

    Keeps ``F̄`` and ``B`` of every step for the direct minimisers.
    """

    def __init__(
        self,
        mode: str,
        rho: float,
        damping: float,
        *,
        damping_rule: str = "exact",
        b_scale: float = 1.0,
        summed: bool = False,
        update_every: int = 1,
        inverse_every: int = 1,
    ) -> None:
        self.mode, self.rho, self.damping, self.rule = mode, rho, damping, damping_rule
        self.b_scale, self.summed = b_scale, summed
        self.update_every, self.inverse_every = update_every, inverse_every
        self.a_history: list[np.ndarray] = []
        self.g_history: list[np.ndarray] = []
        self.fbars: list[np.ndarray] = []
        self.bs: list[np.ndarray] = []
        self.g_prev = self.ghat_prev = self.m_prev = None
        self.lam_prev = 1.0
        self.k = 0
        self.factors: tuple[np.ndarray, np.ndarray] | None = None  # damped, at the last refresh

    def step(self, layer: Layer, lam: float) -> np.ndarray:
        update = self.k % self.update_every == 0
        if update:
            self.a_history.append(layer.A)
            self.g_history.append(layer.G)
        a_bar = wake_sum(self.a_history, self.rho)
        g_bar = wake_sum(self.g_history, self.rho)
        if self.k % self.inverse_every == 0:
            if self.rule == "exact":
                self.factors = (a_bar, g_bar)
            else:
                damping_a, damping_g = pi_damping(a_bar, g_bar, self.damping)
                self.factors = (
                    a_bar + damping_a * np.eye(a_bar.shape[0]),
                    g_bar + damping_g * np.eye(g_bar.shape[0]),
                )
        assert self.factors is not None
        fa, fg = self.factors
        fbar = np.kron(fa, fg)
        if self.rule == "exact":
            fbar = fbar + self.damping * np.eye(fbar.shape[0])
        g = vec(layer.grad)
        ratio = lam / self.lam_prev
        if self.mode == "so":
            b = np.zeros_like(fbar)
            rhs = g if self.g_prev is None else g - self.rho * ratio * self.g_prev
            matrix = fbar
        else:
            b_a, b_g = (layer.A, layer.G) if update else (a_bar, g_bar)
            b = self.b_scale * np.kron(b_a, b_g)
            rhs = g
            if self.ghat_prev is not None:
                rhs = g + self.rho * ratio * (self.ghat_prev - self.g_prev - self.m_prev)
            matrix = fbar + b / lam
            if self.summed:
                matrix = np.kron(fa + self.b_scale * b_a / lam, fg + b_g / lam)
        direction = np.linalg.solve(matrix, rhs)
        self.fbars.append(fbar)
        self.bs.append(b)
        self.g_prev, self.ghat_prev, self.m_prev = g, rhs, fbar @ direction
        self.lam_prev = lam
        self.k += 1
        return mat(-direction / lam, layer.grad.shape)


def direct_minimiser(
    g: np.ndarray,
    fbars: Sequence[np.ndarray],
    steps: Sequence[np.ndarray],
    lam: float,
    rho: float,
    local: np.ndarray | None,
) -> np.ndarray:
    """Minimiser of Puiu's (26) (``local=None``) or (28) (``local = B_k``) at step ``k``:

    ``g_kᵀs [+ ½sᵀB_k s] + λ_k Σ_{i≤k} κ(i)ρ^{k−i} ½(s + S_i)ᵀF_i(s + S_i)``,
    ``S_i = Σ_{j=i}^{k−1} s_j``, with every previous model kept. The per-step matrices
    ``F_i`` are the ones the factor averages imply, ``F_0 = F̄_0``,
    ``F_i = (F̄_i − ρF̄_{i−1})/(1−ρ)`` (identity 18), so that ``Σ κ(i)ρ^{k−i}F_i = F̄_k``.
    Solved from the normal equations ``(λ_k F̄_k + B_k) s = −g_k − λ_k Σ κρ F_i S_i``.
    """
    k = len(fbars) - 1
    fishers = [fbars[0]] + [(fbars[i] - rho * fbars[i - 1]) / (1 - rho) for i in range(1, k + 1)]
    hessian = np.zeros_like(fbars[0]) if local is None else local.copy()
    rhs = g.copy()
    for i in range(k + 1):
        weight = lam * kappa(i, rho) * rho ** (k - i)
        shift = sum((vec(s) for s in steps[i:k]), np.zeros_like(g))
        hessian += weight * fishers[i]
        rhs += weight * fishers[i] @ shift
    return -np.linalg.solve(hessian, rhs)


def dense_logits(params: Sequence[np.ndarray], x: np.ndarray) -> np.ndarray:
    w1, b1, w2, b2 = params
    return np.tanh(x @ w1.T + b1) @ w2.T + b2


def dense_skl(logits: np.ndarray, reference: np.ndarray) -> float:
    """Batch mean of ½Σ_c (p_c − q_c)(log p_c − log q_c)."""

    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    log_p, log_q = log_softmax(logits), log_softmax(reference)
    return float(np.mean(0.5 * ((np.exp(log_p) - np.exp(log_q)) * (log_p - log_q)).sum(axis=1)))


def window_weights(count: int, rho: float) -> list[float]:
    """κ weights of a window of ``count`` networks, oldest first, oldest lumping the rest."""
    return [rho ** (count - 1)] + [(1 - rho) * rho ** (count - 1 - j) for j in range(1, count)]


def qe_objective(
    position: Sequence[np.ndarray],
    theta: Sequence[np.ndarray],
    layers: Sequence[Layer],
    ring: Sequence[Sequence[np.ndarray]],
    rho: float,
    lam: float,
    x: np.ndarray,
) -> float:
    """Φ (31) by hand at the blocks ``position`` (ζ = κ): ``Σ_l [⟨g_l, s_l⟩ + ½⟨s_l, G_l s_l A_l⟩]
    + λ Σ_i w_i SKL(h(θ_i), h(θ_k + s))`` with ``s = position − θ_k``, ``B_l = A_l⊗G_l``."""
    params = [position[0][:, :-1], position[0][:, -1], position[1][:, :-1], position[1][:, -1]]
    logits = dense_logits(params, x)
    weights = window_weights(len(ring), rho)
    value = lam * sum(w * dense_skl(logits, dense_logits(r, x)) for w, r in zip(weights, ring))
    for layer, p, t in zip(layers, position, theta):
        s = p - t
        value += float(np.sum(layer.grad * s) + 0.5 * np.sum(s * (layer.G @ s @ layer.A)))
    return value


# ----------------------------------------------------------------------------------------
# The tiny problem and a driver that records every step
# ----------------------------------------------------------------------------------------


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def batches(count: int, size: int = 6, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, 3, generator=generator, dtype=torch.float64),
            torch.randint(0, 3, (size,), generator=generator),
        )
        for _ in range(count)
    ]


def numpy_params(model: nn.Module) -> list[np.ndarray]:
    return [p.detach().numpy().copy() for p in model.parameters()]


def blocks(params: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``[W | b]`` per layer."""
    return [np.hstack([params[0], params[1][:, None]]), np.hstack([params[2], params[3][:, None]])]


class Record(NamedTuple):
    params: list[np.ndarray]  # θ_k
    lam: float  # λ_k = 1/lr_k
    x: np.ndarray
    y: np.ndarray


def run(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Sequence[tuple[torch.Tensor, torch.Tensor]],
    lrs: Sequence[float] | None = None,
    qe: bool = False,
) -> list[Record]:
    """Train on ``data`` (cross-entropy); ``lrs`` multiplies the lr through ``LambdaLR``."""
    scheduler = None
    if lrs is not None:
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda k: lrs[min(k, len(lrs) - 1)]
        )
    records = []
    for x, y in data:
        lam = 1.0 / optimizer.param_groups[0]["lr"]
        records.append(Record(numpy_params(model), lam, x.numpy(), y.numpy()))
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step((lambda x=x: model(x)) if qe else None)
        if scheduler is not None:
            scheduler.step()
    records.append(Record(numpy_params(model), math.nan, records[-1].x, records[-1].y))
    return records


LRS = [1.0, 0.5, 0.8, 0.3, 0.6]  # multipliers of the base lr: λ_k changes every step


# ----------------------------------------------------------------------------------------
# SO-KLD-WRM
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("damping_rule", ["exact", "factored"])
def test_so_steps_are_the_dense_formula_and_the_direct_minimiser_of_26(damping_rule: str) -> None:
    """Each step is ``−λ_k⁻¹ F̄_k⁻¹ (g_k − ρ(λ_k/λ_{k−1})g_{k−1})`` with ``F̄`` built by hand, and
    the minimiser of (26) over the whole trajectory (variable λ from an LR scheduler)."""
    rho, damping, lr = 0.4, 0.05, 0.5
    model = tiny_model()
    optimizer = KLDWRM(
        model,
        lr,
        "so",
        rho,
        damping,
        fisher="empirical",
        damping_rule=damping_rule,
        factor_dtype=torch.float64,
    )
    records = run(model, optimizer, batches(5), LRS)
    refs = [DenseKLDWRM("so", rho, damping, damping_rule=damping_rule) for _ in range(2)]
    taken: list[list[np.ndarray]] = [[], []]
    for k, record in enumerate(records[:-1]):
        layers = dense_layers(record.params, record.x, record.y)
        before, after = blocks(record.params), blocks(records[k + 1].params)
        for l, layer in enumerate(layers):
            expected = refs[l].step(layer, record.lam)
            assert_close(after[l] - before[l], expected)
            direct = direct_minimiser(
                vec(layer.grad), refs[l].fbars, taken[l], record.lam, rho, None
            )
            assert_close(vec(after[l] - before[l]), direct, 1e-7)
            taken[l].append(after[l] - before[l])


def test_so_with_rho_zero_is_exactly_damped_kfac() -> None:
    """ρ = 0: no wake, ``F̄_k = A_k⊗G_k`` and ``s = −lr (A_k⊗G_k + δI)⁻¹ g_k`` — the same
    trajectory as K-FAC without averaging (MC Fisher, same label seed), and the first step is
    the dense natural gradient by hand (empirical Fisher)."""
    data = batches(4)
    runs = []
    for make in (
        lambda m: KLDWRM(
            m, 0.3, "so", 0.0, 0.1, damping_rule="exact", seed=5, factor_dtype=torch.float64
        ),
        lambda m: KFAC(
            m, 0.3, 0.1, damping_rule="exact", ema_decay=0.0, seed=5, factor_dtype=torch.float64
        ),
    ):
        model = tiny_model()
        runs.append(run(model, make(model), data))
    for mine, theirs in zip(runs[0], runs[1]):
        for p, q in zip(mine.params, theirs.params):
            assert_close(p, q, 1e-12)

    model = tiny_model()
    optimizer = KLDWRM(
        model,
        0.3,
        "so",
        0.0,
        0.1,
        fisher="empirical",
        damping_rule="exact",
        factor_dtype=torch.float64,
    )
    records = run(model, optimizer, data[:1])
    for layer, before, after in zip(
        dense_layers(records[0].params, records[0].x, records[0].y),
        blocks(records[0].params),
        blocks(records[1].params),
    ):
        natural = np.linalg.inv(np.kron(layer.A, layer.G) + 0.1 * np.eye(layer.grad.size))
        assert_close(after - before, mat(-0.3 * natural @ vec(layer.grad), layer.grad.shape))


# ----------------------------------------------------------------------------------------
# Q-KLD-WRM
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("solver", "update_every", "inverse_every"),
    [("exact", 1, 1), ("exact", 2, 3), ("summed_factors", 1, 1)],
)
def test_q_steps_are_the_dense_formula_and_the_direct_minimiser_of_28(
    solver: str, update_every: int, inverse_every: int
) -> None:
    """Each step is ``−λ_k⁻¹(F̄_k + B_k/λ_k)⁻¹ĝ_k`` with the ĝ recursion, ``F̄`` and ``B`` by
    hand (``np.kron``, dense solve; rule (20) between factor updates; ``F̄`` held between
    refreshes). With the exact solver it is also the minimiser of (28) over the trajectory;
    the paper code's summed factors are a different matrix (checked against its formula)."""
    rho, damping, lr = 0.5, 0.05, 0.5
    model = tiny_model()
    optimizer = KLDWRM(
        model,
        lr,
        "q",
        rho,
        damping,
        fisher="empirical",
        solver=solver,
        update_every=update_every,
        inverse_every=inverse_every,
        factor_dtype=torch.float64,
    )
    records = run(model, optimizer, batches(5), LRS)
    refs = [
        DenseKLDWRM(
            "q",
            rho,
            damping,
            damping_rule="factored",
            summed=solver != "exact",
            update_every=update_every,
            inverse_every=inverse_every,
        )
        for _ in range(2)
    ]
    taken: list[list[np.ndarray]] = [[], []]
    for k, record in enumerate(records[:-1]):
        layers = dense_layers(record.params, record.x, record.y)
        before, after = blocks(record.params), blocks(records[k + 1].params)
        for l, layer in enumerate(layers):
            step = after[l] - before[l]
            assert_close(step, refs[l].step(layer, record.lam))
            if solver == "exact":
                direct = direct_minimiser(
                    vec(layer.grad), refs[l].fbars, taken[l], record.lam, rho, refs[l].bs[-1]
                )
                assert_close(vec(step), direct, 1e-7)
            taken[l].append(step)


def test_q_with_b_zero_is_so() -> None:
    """``B ≡ 0`` (``b_scale=0``): ``M̂ = I``, the ĝ recursion becomes ``g_k − ρ(λ_k/λ_{k−1})g_{k−1}``
    and Q-KLD-WRM takes SO-KLD-WRM's steps (same factored damping, MC Fisher, variable λ)."""
    data = batches(5)
    runs = []
    for variant, b_scale in (("q", 0.0), ("so", 1.0)):
        model = tiny_model()
        optimizer = KLDWRM(
            model, 0.4, variant, 0.5, 0.05, b_scale=b_scale, seed=3, factor_dtype=torch.float64
        )
        runs.append(run(model, optimizer, data, LRS))
    for q, so in zip(*runs):
        for p, r in zip(q.params, so.params):
            assert_close(p, r, 1e-10)


# ----------------------------------------------------------------------------------------
# QE-KLD-WRM
# ----------------------------------------------------------------------------------------


def test_symmetric_kl_matches_the_dense_formulas() -> None:
    generator = torch.Generator().manual_seed(0)
    z1, z2 = (torch.randn(5, 4, generator=generator, dtype=torch.float64) for _ in range(2))
    value = symmetric_kl(z1, z2)
    assert math.isclose(float(value), dense_skl(z1.numpy(), z2.numpy()), rel_tol=1e-12)
    assert math.isclose(float(value), float(symmetric_kl(z2, z1)), rel_tol=1e-12)
    assert float(symmetric_kl(z1, z1)) == 0.0
    gaussian = 0.5 * float(((z1 - z2) ** 2).sum(dim=1).mean())
    assert math.isclose(float(symmetric_kl(z1, z2, "gaussian")), gaussian, rel_tol=1e-12)
    # Second order: SKL(z, z+ε) ≈ ½εᵀ(diag p − ppᵀ)ε at the logits (identity 24).
    eps = 1e-4 * torch.randn(1, 4, generator=generator, dtype=torch.float64)
    p = torch.softmax(z1[:1], dim=1)[0]
    quadratic = 0.5 * float(eps[0] @ (torch.diag(p) - torch.outer(p, p)) @ eps[0])
    assert math.isclose(float(symmetric_kl(z1[:1], z1[:1] + eps)), quadratic, rel_tol=1e-3)
    with pytest.raises(ValueError, match="divergence"):
        symmetric_kl(z1, z2, "poisson")  # type: ignore[arg-type]


def test_qe_inner_steps_are_sgd_on_the_exact_objective_gaussian() -> None:
    """A linear model with Gaussian outputs, where ``D = ½‖h − h_i‖²`` and Φ (31) is an exact
    quadratic: the QE step is the dense Q step followed by ``inner_steps`` heavy-ball steps
    ``v ← μv + ∇Φ``, ``Θ ← Θ − (ω/λ)v`` with
    ``∇Φ(Θ) = g_k + G_k(Θ−Θ_k)A_k + λζ Σ_i w_i (Θ − Θ_i) A_k`` over the ring of stored networks
    (window weights ``w``), by hand."""
    rho, damping, lr, omega, mu, zeta, capacity, inner = 0.5, 0.05, 0.5, 0.3, 0.5, 0.7, 2, 3
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    optimizer = KLDWRM(
        model,
        lr,
        "qe",
        rho,
        damping,
        fisher="empirical",
        capacity=capacity,
        inner_steps=inner,
        inner_lr=omega,
        inner_momentum=mu,
        zeta=zeta,
        divergence="gaussian",
        factor_dtype=torch.float64,
    )
    reference = DenseKLDWRM("q", rho, damping, damping_rule="factored")
    generator = torch.Generator().manual_seed(2)
    ring: list[np.ndarray] = []
    for _ in range(4):
        x = torch.randn(7, 3, generator=generator, dtype=torch.float64)
        y = torch.randn(7, 2, generator=generator, dtype=torch.float64)
        theta = np.hstack([model.weight.detach().numpy(), model.bias.detach().numpy()[:, None]])
        optimizer.zero_grad()
        (0.5 * ((model(x) - y) ** 2).sum(dim=1).mean()).backward()
        optimizer.step(lambda x=x: model(x))
        after = np.hstack([model.weight.detach().numpy(), model.bias.detach().numpy()[:, None]])

        a = np.hstack([x.numpy(), np.ones((7, 1))])
        e = a @ theta.T - y.numpy()
        layer = Layer(a, e, e.T @ a / 7, a.T @ a / 7, e.T @ e / 7)
        lam = 1 / lr
        expected = theta + reference.step(layer, lam)
        ring = (ring + [theta])[-capacity:]
        weights = window_weights(len(ring), rho)
        velocity = None
        for _ in range(inner):
            s = expected - theta
            grad = layer.grad + layer.G @ s @ layer.A
            grad = grad + lam * zeta * sum(
                w * (expected - t) @ layer.A for w, t in zip(weights, ring)
            )
            velocity = grad if velocity is None else mu * velocity + grad
            expected = expected - omega / lam * velocity
        assert_close(after, expected, 1e-10)


def test_qe_inner_loop_lowers_the_exact_kl_objective() -> None:
    """Categorical outputs: Φ(s) = g_kᵀs + ½sᵀB_k s + λ_kζ Σ_i w_i D(θ_i, θ_k + s), evaluated by
    hand (dense forward, dense SKL, the test's own copies of the stored networks), is lower
    after the inner loop than at its start, the Q step; ``inner_objective[0]`` is Φ there."""
    rho, damping, lr, capacity = 0.5, 0.05, 0.5, 3
    model = tiny_model()
    optimizer = KLDWRM(
        model,
        lr,
        "qe",
        rho,
        damping,
        fisher="empirical",
        capacity=capacity,
        inner_steps=5,
        inner_lr=0.5,
        zeta=1.0,
        factor_dtype=torch.float64,
    )
    records = run(model, optimizer, batches(5), qe=True)
    refs = [DenseKLDWRM("q", rho, damping, damping_rule="factored") for _ in range(2)]
    for k, record in enumerate(records[:-1]):
        layers = dense_layers(record.params, record.x, record.y)
        theta = blocks(record.params)
        start = [t + ref.step(layer, record.lam) for t, ref, layer in zip(theta, refs, layers)]
        end = blocks(records[k + 1].params)
        ring = [r.params for r in records[max(0, k - capacity + 1) : k + 1]]

        assert optimizer.inner_objective is not None
        phi_start = qe_objective(start, theta, layers, ring, rho, record.lam, record.x)
        phi_end = qe_objective(end, theta, layers, ring, rho, record.lam, record.x)
        assert phi_end < phi_start
        if k == len(records) - 2:
            assert math.isclose(float(optimizer.inner_objective[0]), phi_start, rel_tol=1e-9)


def test_qe_without_inner_steps_is_q() -> None:
    data = batches(4)
    runs = []
    for variant in ("qe", "q"):
        model = tiny_model()
        optimizer = KLDWRM(
            model, 0.4, variant, 0.5, 0.05, inner_steps=0, seed=1, factor_dtype=torch.float64
        )
        runs.append(run(model, optimizer, data, LRS, qe=variant == "qe"))
    for qe, q in zip(*runs):
        for p, r in zip(qe.params, q.params):
            assert_close(p, r, 1e-12)


def test_qe_step_contract_errors() -> None:
    model = tiny_model()
    optimizer = KLDWRM(model, 0.1, "qe")
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="closure"):
        optimizer.step()
    with pytest.raises(ValueError, match="not a loss"):
        optimizer.step(lambda: F.cross_entropy(model(x), y))


# ----------------------------------------------------------------------------------------
# Reliability: state dicts, non-finite steps, arguments; a short training run
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["so", "q", "qe"])
def test_state_dict_round_trip_continues_the_same_trajectory(variant: str) -> None:
    """Save after three steps (factors, ĝ/g history, λ_{k−1}, the QE ring, the MC label RNG,
    momentum), load into a fresh model and optimizer: the next steps are identical."""
    data = batches(6)
    kwargs = dict(
        momentum=0.5,
        weight_decay=1e-3,
        seed=7,
        inner_steps=2,
        capacity=2,
        factor_dtype=torch.float64,
    )
    model = tiny_model()
    optimizer = KLDWRM(model, 0.3, variant, None, 0.05, **kwargs)  # type: ignore[arg-type]
    run(model, optimizer, data[:3], qe=variant == "qe")
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    optimizer.param_groups[0]["lr"] = 0.2  # λ changes after the save: λ_{k−1} must be saved
    continued = run(model, optimizer, data[3:], qe=variant == "qe")

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    fresh = tiny_model(seed=123)
    fresh.load_state_dict(saved["model"])
    restored = KLDWRM(fresh, 0.3, variant, None, 0.05, **kwargs)  # type: ignore[arg-type]
    restored.load_state_dict(saved["optimizer"])
    restored.param_groups[0]["lr"] = 0.2
    again = run(fresh, restored, data[3:], qe=variant == "qe")
    for first, second in zip(continued, again):
        for p, q in zip(first.params, second.params):
            np.testing.assert_array_equal(p, q)


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_non_finite_step_is_skipped_without_state_change(fisher: str) -> None:
    """A batch with NaN inputs: the step is skipped (warning, counter), parameters and every
    layer state (factors, ĝ, g, λ_{k−1}, the label RNG) are unchanged, and the run goes on
    exactly as if that batch had never been seen. With the MC Fisher the NaN logits cannot be
    sampled from; the optimizer skips instead of raising."""
    data = batches(4)
    bad = (torch.full_like(data[0][0], math.nan), data[0][1])

    def make(model: nn.Module) -> KLDWRM:
        return KLDWRM(
            model,
            0.3,
            "q",
            0.5,
            0.05,
            fisher=fisher,
            seed=4,  # type: ignore[arg-type]
            factor_dtype=torch.float64,
        )

    model = tiny_model()
    optimizer = make(model)
    run(model, optimizer, data[:2], [1.0, 0.5, 0.7])
    params = numpy_params(model)
    state = {key: value.clone() for key, value in optimizer.layer_state(0).items()}
    with pytest.warns(RuntimeWarning, match="skipped"):
        run(model, optimizer, [bad])
    assert optimizer.skipped_steps == 1 and optimizer.steps == 2
    for p, q in zip(numpy_params(model), params):
        np.testing.assert_array_equal(p, q)
    for key, value in optimizer.layer_state(0).items():
        assert torch.equal(value, state[key]), key
    after_skip = run(model, optimizer, data[2:])

    clean = tiny_model()
    reference = make(clean)
    run(clean, reference, data[:2], [1.0, 0.5, 0.7])
    for first, second in zip(after_skip, run(clean, reference, data[2:])):
        for p, q in zip(first.params, second.params):
            np.testing.assert_array_equal(p, q)


@pytest.mark.parametrize("variant", ["so", "q", "qe"])
def test_conv_batchnorm_momentum_weight_decay_and_amortisation(variant: str) -> None:
    """A small CNN (strided Conv2d with bias, BatchNorm2d — plain SGD group —, Conv2d without
    bias, Linear) with momentum, weight decay and refreshes every other step: the steps run,
    stay finite and lower the loss on a fixed batch; QE's extra forwards leave BatchNorm's
    running statistics to the user's own forwards."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1),
        nn.BatchNorm2d(3),
        nn.Tanh(),
        nn.Conv2d(3, 4, 3, bias=False),
        nn.Flatten(),
        nn.Tanh(),
        nn.Linear(4, 3),
    )
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 2, 6, 6, generator=generator)
    y = torch.randint(0, 3, (8,), generator=generator)
    optimizer = KLDWRM(
        model,
        0.05,
        variant,
        None,
        0.1,
        momentum=0.3,
        weight_decay=1e-3,
        update_every=2,
        inverse_every=2,
        seed=0,
        inner_steps=2,
    )
    assert [len(group["params"]) for group in optimizer.param_groups] == [5, 2]
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        losses.append(loss.item())
        optimizer.step(lambda: model(x)) if variant == "qe" else optimizer.step()
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert losses[-1] < losses[0]
    assert optimizer.skipped_steps == 0 and optimizer.steps == 6
    assert int(model[1].num_batches_tracked) == 6


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(variant="adam"), "variant"),
        (dict(rho=1.0), "rho"),
        (dict(variant="q", damping_rule="exact"), "damping_rule"),
        (dict(solver="cholesky"), "solver"),
        (dict(b_scale=-1.0), "b_scale"),
        (dict(capacity=0), "capacity"),
        (dict(inner_steps=-1), "inner_steps"),
        (dict(inner_momentum=1.0), "inner_momentum"),
        (dict(divergence="poisson"), "divergence"),
        (dict(lr=0.0), "lr"),
        (dict(damping=-1.0), "damping"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, name: str) -> None:
    arguments = dict(lr=0.1) | kwargs
    with pytest.raises(ValueError, match=name):
        KLDWRM(tiny_model(), **arguments)


@pytest.mark.parametrize("variant", ["so", "q", "qe"])
def test_short_training_run_lowers_the_loss(variant: str) -> None:
    """MC Fisher, float32, a small MLP on a synthetic 4-class problem: 30 steps lower the
    training loss well below its starting value."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 10, generator=generator)
    y = (x @ torch.randn(10, 4, generator=generator)).argmax(dim=1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 4))
    optimizer = KLDWRM(model, 0.2, variant, None, 0.03, seed=0, inner_steps=3, inner_lr=0.1)
    with torch.no_grad():
        initial = float(F.cross_entropy(model(x), y))
    for k in range(30):
        xb, yb = x[(k % 4) * 64 : (k % 4 + 1) * 64], y[(k % 4) * 64 : (k % 4 + 1) * 64]
        optimizer.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        optimizer.step(lambda xb=xb: model(xb)) if variant == "qe" else optimizer.step()
    with torch.no_grad():
        final = float(F.cross_entropy(model(x), y))
    assert final < 0.5 * initial, (initial, final)
