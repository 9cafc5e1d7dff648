r"""Property tests of :mod:`curvlinalg.wake` against Puiu (2022) — NOTES.md §6, identities 18–25.

Every reference here is dense NumPy that does not call curvlinalg:

* the wake average is the explicit sum ``F̄_k = Σ_i κ(i) ρ^{k−i} F_i`` (κ(0)=1, κ(i>0)=1−ρ);
* the propositions are checked against the *direct* minimiser of the paper's objective with all
  previous models kept: WoQM (15)–(16), SO-KLD-WRM (26), Q-KLD-WRM (28). Each objective is a sum
  of terms ``ℓᵀ(s+S) + ½(s+S)ᵀC(s+S)`` with ``S_i = Σ_{j=i}^{k−1} s_j`` (the displacement from
  θ_i to θ_k), so its minimiser solves the normal equations ``(Σ C) s = −Σ (C S + ℓ)``.
  ``test_reference_builder_matches_the_literal_objectives`` checks that construction against the
  objectives written out literally (Hessian and gradient read off by central differences, which
  are exact for quadratics) and against ``scipy.optimize.minimize``.

The trajectories are real: θ_{k+1} = θ_k + s_k, and g_k is the gradient of a fixed logistic loss
at θ_k (the g_i in the models are the gradients at θ_i), so an error in one step changes every
later gradient.

Variable λ. The paper (§4.4, "Extension to Variable Stepsize") keeps the objectives and replaces λ
by the current λ_k: (26) and (28) at step k read ``… + λ_k Σ_i κ(i)ρ^{k−i} D̃(θ_i, θ_k+s)``, with
*every* wake term weighted by the current λ_k, while the earlier steps s_i were each taken with
their own λ_i. Then, writing R_k = Σ_{i<k} κ(i)ρ^{k−i} F_i S_i, R_k = ρ(R_{k−1} + F̄_{k−1}s_{k−1})
and the optimality condition of step k−1 gives R_{k−1} + F̄_{k−1}s_{k−1}
= −(g_{k−1} + B_{k−1}s_{k−1})/λ_{k−1}, so the stationarity condition of step k is
``(λ_k F̄_k + B_k) s = −g_k + ρ(λ_k/λ_{k−1})(g_{k−1} + B_{k−1}s_{k−1})``. With
``B s = −ĝ + M̂ĝ`` (all at k−1, M̂ with λ_{k−1}) this is Prop. 4.2 with
``ĝ_k = g_k + ρ(λ_k/λ_{k−1})(ĝ_{k−1} − g_{k−1} − M̂_{k−1}ĝ_{k−1})``; B ≡ 0 gives Prop. 4.1.
Prop. 3.1 (WoQM) is stated for constant λ only and is tested that way.

Tolerances: ``assert_close`` with ``condition = κ(H)·c``, where H is the Hessian of the objective
and ``c = Σ‖terms of the right-hand side‖ / ‖right-hand side‖`` measures the cancellation in
forming it (float64 only: the direct minimisation is a NumPy reference). Cross-backend checks of
the functions themselves run on every backend and dtype, with max_condition 10 for float32 and
100 for float64 (32·κ·eps is then 4e-4 and 7e-13).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import pytest
import scipy.optimize
from hypothesis import given, settings
from hypothesis import strategies as st

from curvlinalg import NotPositiveDefiniteError, schedule, testing, wake
from tests.conftest import assert_backend_array, assert_close, rtol
from tests.references import mat, vec

F64 = np.dtype(np.float64)
F32 = np.dtype(np.float32)


# ----------------------------------------------------------------------------------------
# Dense NumPy references (no curvlinalg)
# ----------------------------------------------------------------------------------------


def kappa(i: int, rho: float) -> float:
    """κ(0) = 1, κ(i>0) = 1 − ρ."""
    return 1.0 if i == 0 else 1.0 - rho


def wake_sum(items: Sequence[np.ndarray], rho: float) -> np.ndarray:
    """``Σ_{i=0}^k κ(i) ρ^{k−i} items_i`` written out (eq. 18)."""
    k = len(items) - 1
    return sum(
        kappa(i, rho) * rho ** (k - i) * np.asarray(items[i], np.float64) for i in range(k + 1)
    )


def cond(m: np.ndarray) -> float:
    return float(np.linalg.cond(m))


def sum_condition(*terms: np.ndarray) -> float:
    """``Σ‖t_i‖ / ‖Σ t_i‖``: how much rounding a sum of terms can amplify (≥ 1)."""
    total = sum(terms)
    scale = sum(float(np.linalg.norm(t)) for t in terms)
    return max(1.0, scale / max(float(np.linalg.norm(total)), 1e-300))


def assert_sum_close(
    actual: np.ndarray,
    terms: Sequence[np.ndarray],
    dtype: np.dtype,
    factor: float = 1.0,
    extra: Sequence[np.ndarray] = (),
) -> None:
    """``actual ≈ Σ terms`` for a computed sum of (signed) terms: rounding is relative to
    ``Σ‖t_i‖`` (plus the ``extra`` magnitudes that enter the computation but cancel exactly),
    not to the result, which may cancel to (almost) zero."""
    actual = np.asarray(actual, np.float64)
    expected = sum(np.asarray(t, np.float64) for t in terms)
    assert actual.shape == np.shape(expected), (actual.shape, np.shape(expected))
    scale = sum(float(np.linalg.norm(t)) for t in (*terms, *extra))
    error = float(np.linalg.norm(actual - expected))
    limit = rtol(dtype, factor) * max(scale, float(np.finfo(dtype).tiny))
    assert error <= limit, f"error {error:.3e} > {limit:.3e} (scale {scale:.3e})"


class Term(NamedTuple):
    """``ℓᵀ(s+S) + ½(s+S)ᵀC(s+S)`` (either part may be absent)."""

    curvature: np.ndarray | None
    linear: np.ndarray | None
    shift: np.ndarray


def shifts(steps: Sequence[np.ndarray], k: int, n: int) -> list[np.ndarray]:
    """``S_i = Σ_{j=i}^{k−1} s_j`` for i = 0..k (S_k = 0 by the paper's convention)."""
    return [sum((np.asarray(s) for s in steps[i:k]), np.zeros(n)) for i in range(k + 1)]


def minimiser(terms: Sequence[Term]) -> tuple[np.ndarray, float]:
    """Minimiser of Σ terms from the normal equations, and the condition for its tolerance."""
    n = terms[0].shift.shape[0]
    hessian = np.zeros((n, n))
    parts = []
    for term in terms:
        if term.curvature is not None:
            hessian = hessian + term.curvature
            parts.append(term.curvature @ term.shift)
        if term.linear is not None:
            parts.append(term.linear)
    rhs = sum(parts)
    return -np.linalg.solve(hessian, rhs), cond(hessian) * sum_condition(*parts)


def woqm_terms(
    gradients: Sequence[np.ndarray],
    curvatures: Sequence[np.ndarray],
    steps: Sequence[np.ndarray],
    lam: float,
    rho: float,
) -> list[Term]:
    """(15)–(16): Σ_i ρ^{k−i} M_i(s + S_i), M_i(x) = g_iᵀx + (λ_i/2)xᵀB_i x, λ_0 = λ,
    λ_{i>0} = (1−ρ)λ."""
    k = len(gradients) - 1
    n = gradients[0].shape[0]
    displacement = shifts(steps, k, n)
    terms = []
    for i in range(k + 1):
        lam_i = lam if i == 0 else (1 - rho) * lam
        weight = rho ** (k - i)
        terms.append(Term(weight * lam_i * curvatures[i], weight * gradients[i], displacement[i]))
    return terms


def kld_terms(
    g: np.ndarray,
    fishers: Sequence[np.ndarray],
    steps: Sequence[np.ndarray],
    lam: float,
    rho: float,
    local: np.ndarray | None = None,
) -> list[Term]:
    """(26), or (28) with ``local = B_k``: g_kᵀs [+ ½sᵀB_k s] + λ_k Σ_i κ(i)ρ^{k−i} D̃(θ_i, θ_k+s),
    D̃ = ½(s + S_i)ᵀF_i(s + S_i) (21)."""
    k = len(fishers) - 1
    n = g.shape[0]
    displacement = shifts(steps, k, n)
    terms = [Term(None, g, np.zeros(n))]
    terms += [
        Term(lam * kappa(i, rho) * rho ** (k - i) * fishers[i], None, displacement[i])
        for i in range(k + 1)
    ]
    if local is not None:
        terms.append(Term(local, None, np.zeros(n)))
    return terms


# The same objectives written out literally, for checking the term construction above.


def woqm_objective(s, gradients, curvatures, steps, lam, rho):  # type: ignore[no-untyped-def]
    k = len(gradients) - 1

    def model(i: int, x: np.ndarray) -> float:
        lam_i = lam if i == 0 else (1 - rho) * lam
        return gradients[i] @ x + lam_i / 2 * x @ curvatures[i] @ x

    return sum(
        rho ** (k - i) * model(i, s + sum(steps[i:k], np.zeros_like(s))) for i in range(k + 1)
    )


def q_objective(s, g, fishers, steps, lam, rho, local=None):  # type: ignore[no-untyped-def]
    k = len(fishers) - 1

    def skl(i: int) -> float:
        x = s + sum(steps[i:k], np.zeros_like(s))
        return 0.5 * x @ fishers[i] @ x

    value = g @ s + lam * sum(kappa(i, rho) * rho ** (k - i) * skl(i) for i in range(k + 1))
    return value if local is None else value + 0.5 * s @ local @ s


def quadratic_from(
    function: Callable[[np.ndarray], float], n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Hessian and gradient at 0 of a quadratic, by central differences with h = 1 (exact for
    quadratics up to rounding)."""
    eye = np.eye(n)

    def gradient(x: np.ndarray) -> np.ndarray:
        return np.array([(function(x + e) - function(x - e)) / 2 for e in eye])

    hessian = np.column_stack([(gradient(e) - gradient(-e)) / 2 for e in eye])
    return hessian, gradient(np.zeros(n))


# ----------------------------------------------------------------------------------------
# Problems: a logistic loss gives the gradients along the trajectory
# ----------------------------------------------------------------------------------------


class Logistic(NamedTuple):
    inputs: np.ndarray  # (m, n)
    labels: np.ndarray  # (m,) in {0, 1}

    def gradient(self, theta: np.ndarray) -> np.ndarray:
        """∇ of mean_j softplus(x_jᵀθ) − y_j x_jᵀθ: Xᵀ(σ(Xθ) − y)/m (bounded by max‖x_j‖)."""
        sigmoid = 0.5 * (1.0 + np.tanh(0.5 * (self.inputs @ theta)))
        return self.inputs.T @ (sigmoid - self.labels) / self.inputs.shape[0]


class Trajectory(NamedTuple):
    rho: float
    lams: list[float]
    fishers: list[np.ndarray]  # F_i (or B_i for WoQM)
    locals_: list[np.ndarray]  # B_k of Q-KLD-WRM
    loss: Logistic
    theta0: np.ndarray


@st.composite
def trajectories(
    draw: Any,
    *,
    max_dim: int = 5,
    max_steps: int = 5,
    variable_lam: bool | None = False,
    max_condition: float = 50.0,
) -> Trajectory:
    """n ≤ 5 parameters, k ≤ 5 steps; ``variable_lam=None`` draws constant or variable λ."""
    n = draw(st.integers(1, max_dim))
    count = draw(st.integers(1, max_steps))
    rho = draw(st.floats(0.0, 0.95))
    if variable_lam is None:
        variable_lam = draw(st.booleans())
    if variable_lam:
        lams = [draw(st.floats(0.2, 5.0)) for _ in range(count)]
    else:
        lams = [draw(st.floats(0.2, 5.0))] * count
    fishers = [draw(testing.spd_matrices(n, max_condition=max_condition)) for _ in range(count)]
    locals_ = [draw(st.floats(0.0, 3.0)) * draw(testing.psd_matrices(n)) for _ in range(count)]
    inputs = draw(testing.arrays((6, n)))
    labels = (draw(testing.arrays((6,))) > 0).astype(np.float64)
    theta0 = draw(testing.arrays((n,)))
    return Trajectory(rho, lams, fishers, locals_, Logistic(inputs, labels), theta0)


# ----------------------------------------------------------------------------------------
# Identity 18: the wake average
# ----------------------------------------------------------------------------------------


@st.composite
def sequences(draw: Any, *, max_len: int = 6) -> tuple[list[np.ndarray], float]:
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    count = draw(st.integers(1, max_len))
    items = [draw(testing.arrays(shape)) for _ in range(count)]
    return items, draw(st.floats(0.0, 1.0))


def test_average_recursion_is_the_wake_sum(backend: testing.Backend, dtype: np.dtype) -> None:
    @_examples(backend)
    @given(data=sequences())
    def check(data: tuple[list[np.ndarray], float]) -> None:
        _check_average(backend, dtype, data)

    check()


def _check_average(
    backend: testing.Backend, dtype: np.dtype, data: tuple[list[np.ndarray], float]
) -> None:
    items, rho = data
    items = [x.astype(dtype) for x in items]
    originals = [x.copy() for x in items]
    average = None
    for k, item in enumerate(items):
        new = backend.asarray(item)
        average = wake.average(average, new, rho)
        assert_backend_array(average, backend, dtype)
        # Against wake_sum's terms: k+1 rounded multiply-adds, error ≲ (k+1)·eps·Σ‖κρF_i‖.
        terms = [kappa(i, rho) * rho ** (k - i) * items[i].astype(np.float64) for i in range(k + 1)]
        assert_sum_close(backend.to_numpy(average), terms, dtype, k + 1)
    for item, original in zip(items, originals):
        np.testing.assert_array_equal(item, original)


@given(data=sequences())
def test_average_of_none_returns_new(
    backend: testing.Backend, data: tuple[list[np.ndarray], float]
) -> None:
    items, rho = data
    new = backend.asarray(items[0])
    assert wake.average(None, new, rho) is new
    layers = [new, backend.asarray(items[-1])]
    assert wake.average(None, layers, rho) is layers


@given(data=sequences(max_len=8))
def test_average_inverts_to_the_newest_estimate(data: tuple[list[np.ndarray], float]) -> None:
    items, rho = data
    rho = min(rho, 0.9)
    previous = None
    for item in items:
        current = wake.average(previous, item, rho)
        if previous is not None:
            recovered = (current - rho * previous) / (1 - rho)
            # Subtracting ρF̄_{k−1} from F̄_k amplifies rounding by
            # (ρ‖F̄_{k−1}‖ + ‖F̄_k‖)/((1−ρ)‖F_k‖).
            amplification = (rho * np.linalg.norm(previous) + np.linalg.norm(current)) / (
                (1 - rho) * max(np.linalg.norm(item), 1e-300)
            )
            assert_close(recovered, item, F64, 2 * amplification)
        previous = current


@given(count=st.integers(1, 12), rho=st.floats(0.0, 1.0))
def test_weights_are_the_kappa_weights_and_sum_to_one(count: int, rho: float) -> None:
    weights = wake.weights(count, rho)
    k = count - 1
    assert isinstance(weights, tuple) and len(weights) == count
    expected = [kappa(i, rho) * rho ** (k - i) for i in range(count)]
    np.testing.assert_allclose(weights, expected, rtol=1e-14, atol=0)
    assert math.isclose(math.fsum(weights), 1.0, rel_tol=0, abs_tol=1e-14 * count)
    assert all(w >= 0 for w in weights)


@given(data=sequences(max_len=8))
def test_weights_reproduce_the_recursion(data: tuple[list[np.ndarray], float]) -> None:
    items, rho = data
    average = None
    for item in items:
        average = wake.average(average, item, rho)
    terms = [w * x for w, x in zip(wake.weights(len(items), rho), items)]
    assert_sum_close(average, terms, F64, len(items))


@given(data=sequences(max_len=4), container=st.sampled_from([list, tuple]))
def test_average_per_layer_keeps_the_container(
    backend: testing.Backend, data: tuple[list[np.ndarray], float], container: type
) -> None:
    items, rho = data
    layers = [(x, 2 * x[:, :1]) for x in items]  # two layers of different shapes
    average = None
    for first, second in layers:
        new = container([backend.asarray(first), backend.asarray(second)])
        previous = average
        average = wake.average(previous, new, rho)
        assert type(average) is container and len(average) == 2
        if previous is not None:
            for index in range(2):
                single = wake.average(previous[index], new[index], rho)
                np.testing.assert_array_equal(
                    backend.to_numpy(average[index]), backend.to_numpy(single)
                )
    k = len(layers) - 1
    for index in range(2):
        terms = [kappa(i, rho) * rho ** (k - i) * layers[i][index] for i in range(k + 1)]
        assert_sum_close(backend.to_numpy(average[index]), terms, F64, k + 1)


def test_average_of_a_constant_is_that_constant(backend: testing.Backend, dtype: np.dtype) -> None:
    constant = backend.asarray(np.full((2, 3), 0.7, dtype=dtype))
    average = None
    for rho in (0.0, 0.3, 0.95, 1.0):
        average = wake.average(average, constant, rho)
        assert_close(backend.to_numpy(average), np.full((2, 3), 0.7), dtype, 2.0)


# ----------------------------------------------------------------------------------------
# Identity 19: Prop. 3.1 — WoQM is EA curvature (constant λ)
# ----------------------------------------------------------------------------------------


@given(problem=trajectories())
def test_prop31_woqm_step_is_the_direct_minimiser(problem: Trajectory) -> None:
    lam, rho = problem.lams[0], problem.rho
    theta, bbar = problem.theta0, None
    gradients: list[np.ndarray] = []
    steps: list[np.ndarray] = []
    for k, curvature in enumerate(problem.fishers):
        gradients.append(problem.loss.gradient(theta))  # g_k at θ_k
        bbar = wake.average(bbar, curvature, rho)
        step = -np.linalg.solve(bbar, gradients[-1]) / lam  # (19): s_k = −λ⁻¹ B̄_k⁻¹ g_k
        expected, condition = minimiser(
            woqm_terms(gradients, problem.fishers[: k + 1], steps, lam, rho)
        )
        # Steps earlier in the trajectory carry their own rounding into S_i: factor k+1.
        assert_close(step, expected, F64, (k + 1) * condition)
        steps.append(step)
        theta = theta + step


@given(problem=trajectories(max_dim=3, max_steps=4, max_condition=10.0))
@settings(max_examples=10)
def test_reference_builder_matches_the_literal_objectives(problem: Trajectory) -> None:
    """The normal equations built from Terms are those of the objectives as the paper writes
    them: compare with central differences of the literal objectives and with scipy."""
    rho, lam = problem.rho, problem.lams[-1]
    n = problem.theta0.shape[0]
    rng = np.random.default_rng(0)
    steps = [rng.standard_normal(n) for _ in problem.fishers[:-1]]
    gradients = [rng.standard_normal(n) for _ in problem.fishers]
    cases = [
        (
            woqm_terms(gradients, problem.fishers, steps, lam, rho),
            lambda s: woqm_objective(s, gradients, problem.fishers, steps, lam, rho),
        ),
        (
            kld_terms(gradients[-1], problem.fishers, steps, lam, rho),
            lambda s: q_objective(s, gradients[-1], problem.fishers, steps, lam, rho),
        ),
        (
            kld_terms(gradients[-1], problem.fishers, steps, lam, rho, local=problem.locals_[-1]),
            lambda s: q_objective(
                s, gradients[-1], problem.fishers, steps, lam, rho, local=problem.locals_[-1]
            ),
        ),
    ]
    for terms, objective in cases:
        expected, condition = minimiser(terms)
        hessian, gradient = quadratic_from(objective, n)
        # Differences of objective values of size |f| lose about |f|·eps per entry.
        scale = 1.0 + max(abs(objective(np.zeros(n))), abs(objective(expected)))
        assert (
            np.abs(hessian - sum(t.curvature for t in terms if t.curvature is not None)).max()
            <= 1e-9 * scale
        )
        literal = -np.linalg.solve(hessian, gradient)
        assert_close(literal, expected, F64, 1e3 * scale * condition)
        found = scipy.optimize.minimize(
            objective,
            np.zeros(n),
            jac=lambda s, h=hessian, g=gradient: h @ s + g,
            method="BFGS",
            options={"gtol": 1e-12, "maxiter": 200},
        )
        np.testing.assert_allclose(
            found.x, expected, rtol=1e-6, atol=1e-6 * np.linalg.norm(expected)
        )
        assert objective(expected) <= objective(expected + 1e-3 * rng.standard_normal(n))


# ----------------------------------------------------------------------------------------
# Identity 20: Prop. 4.1 — SO-KLD-WRM (constant and variable λ)
# ----------------------------------------------------------------------------------------


@given(problem=trajectories(variable_lam=None))
def test_prop41_so_step_is_the_direct_minimiser(problem: Trajectory) -> None:
    rho = problem.rho
    theta, fbar = problem.theta0, None
    g_prev, lam_prev = None, 1.0
    steps: list[np.ndarray] = []
    for k, (fisher, lam) in enumerate(zip(problem.fishers, problem.lams)):
        g = problem.loss.gradient(theta)
        fbar = wake.average(fbar, fisher, rho)
        modified = wake.so_gradient(g, g_prev, rho, lam, lam_prev)
        step = -np.linalg.solve(fbar, modified) / lam  # (27), variable λ
        expected, condition = minimiser(kld_terms(g, problem.fishers[: k + 1], steps, lam, rho))
        assert_close(step, expected, F64, (k + 1) * condition)
        steps.append(step)
        theta, g_prev, lam_prev = theta + step, g, lam


@given(g=testing.arrays((2, 3)), g_prev=testing.arrays((2, 3)), rho=st.floats(0.0, 1.0))
def test_prop41_constant_lambda_is_g_minus_rho_g_prev(
    g: np.ndarray, g_prev: np.ndarray, rho: float
) -> None:
    """With λ_k = λ_{k−1} the modified gradient is the paper's g_k − ρg_{k−1} (27)."""
    for lam in (0.3, 1.0, 7.0):
        result = wake.so_gradient(g, g_prev, rho, lam, lam)
        assert_sum_close(result, [g, -rho * g_prev], F64, 2)
    assert wake.so_gradient(g, None, rho, 2.0, 3.0) is g  # g_{−1} = 0


def test_variable_lambda_needs_the_current_lambda_on_the_whole_wake() -> None:
    """Where the variable-λ statement needs care: Prop. 4.1/4.2 with λ_k hold when the whole
    wake of (26)/(28) at step k is weighted by the *current* λ_k (tested above). Were each
    D̃(θ_i, ·) to keep the λ_i of the step that created it (as WoQM's M_i keep λ_i), the
    minimiser would be a different step."""
    rng = np.random.default_rng(3)
    n, rho, lams = 3, 0.6, [0.5, 2.0, 1.0, 3.0]
    fishers = [_spd(rng, n, F64) for _ in lams]
    gradients = [rng.standard_normal(n) for _ in lams]
    fbar, g_prev, lam_prev = None, None, 1.0
    steps: list[np.ndarray] = []
    for k, lam in enumerate(lams):
        fbar = wake.average(fbar, fishers[k], rho)
        step = -np.linalg.solve(fbar, wake.so_gradient(gradients[k], g_prev, rho, lam, lam_prev))
        step /= lam
        current, condition = minimiser(kld_terms(gradients[k], fishers[: k + 1], steps, lam, rho))
        assert_close(step, current, F64, (k + 1) * condition)
        displacement = shifts(steps, k, n)
        own = [Term(None, gradients[k], np.zeros(n))] + [
            Term(lams[i] * kappa(i, rho) * rho ** (k - i) * fishers[i], None, displacement[i])
            for i in range(k + 1)
        ]
        if k > 0:
            other, _ = minimiser(own)
            assert np.linalg.norm(other - step) > 0.1 * np.linalg.norm(step)
        steps.append(step)
        g_prev, lam_prev = gradients[k], lam


# ----------------------------------------------------------------------------------------
# Identity 21: Prop. 4.2 — Q-KLD-WRM (constant and variable λ)
# ----------------------------------------------------------------------------------------


@given(problem=trajectories(variable_lam=None))
def test_prop42_q_step_is_the_direct_minimiser_dense(problem: Trajectory) -> None:
    """Dense F_i and B_k: q_gradient's recursion, the step −λ_k⁻¹(F̄_k + B_k/λ_k)⁻¹ĝ_k and
    M̂_kĝ_k = −λ_kF̄_k s_k reproduce the minimiser of (28)."""
    rho = problem.rho
    theta, fbar = problem.theta0, None
    g_prev = ghat = m_ghat = None
    lam_prev = 1.0
    steps: list[np.ndarray] = []
    for k, (fisher, local, lam) in enumerate(zip(problem.fishers, problem.locals_, problem.lams)):
        g = problem.loss.gradient(theta)
        fbar = wake.average(fbar, fisher, rho)
        ghat = wake.q_gradient(g, ghat, g_prev, m_ghat, rho, lam, lam_prev)
        step = -np.linalg.solve(fbar + local / lam, ghat) / lam
        m_ghat = fbar @ np.linalg.solve(fbar + local / lam, ghat)  # M̂ĝ = F̄(F̄ + B/λ)⁻¹ĝ
        assert_close(m_ghat, -lam * fbar @ step, F64, 4 * cond(fbar + local / lam))
        expected, condition = minimiser(
            kld_terms(g, problem.fishers[: k + 1], steps, lam, rho, local=local)
        )
        assert_close(step, expected, F64, (k + 1) * condition)
        steps.append(step)
        theta, g_prev, lam_prev = theta + step, g, lam


class KronTrajectory(NamedTuple):
    rho: float
    lams: list[float]
    factors_a: list[np.ndarray]  # A_i
    factors_g: list[np.ndarray]  # G_i
    local_a: list[np.ndarray]
    local_g: list[np.ndarray]
    loss: Logistic  # on vec(Θ)
    theta0: np.ndarray  # (d_out, d_in)


@st.composite
def kron_trajectories(
    draw: Any, *, max_steps: int = 4, max_condition: float = 10.0
) -> KronTrajectory:
    """F_i = A_i ⊗ G_i with one factor shared by all i, so F̄_k = Ā_k ⊗ Ḡ_k *exactly*
    (the wake average of general Kronecker products is not a Kronecker product; EA-KFAC's
    Ā⊗Ḡ is only the paper's "coarse approximation" of it)."""
    d_in, d_out = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    count = draw(st.integers(1, max_steps))
    rho = draw(st.floats(0.0, 0.95))
    if draw(st.booleans()):
        lams = [draw(st.floats(0.2, 5.0)) for _ in range(count)]
    else:
        lams = [draw(st.floats(0.2, 5.0))] * count

    def spd(size: int) -> st.SearchStrategy[np.ndarray]:
        return testing.spd_matrices(size, max_condition=max_condition, scales=(0.1, 1.0, 10.0))

    if draw(st.booleans()):
        factors_a = [draw(spd(d_in)) for _ in range(count)]
        factors_g = [draw(spd(d_out))] * count
    else:
        factors_a = [draw(spd(d_in))] * count
        factors_g = [draw(spd(d_out)) for _ in range(count)]
    local_a = [draw(testing.psd_matrices(d_in)) for _ in range(count)]
    local_g = [draw(st.floats(0.0, 3.0)) * draw(testing.psd_matrices(d_out)) for _ in range(count)]
    inputs = draw(testing.arrays((6, d_in * d_out)))
    labels = (draw(testing.arrays((6,))) > 0).astype(np.float64)
    theta0 = draw(testing.arrays((d_out, d_in)))
    return KronTrajectory(
        rho, lams, factors_a, factors_g, local_a, local_g, Logistic(inputs, labels), theta0
    )


@pytest.mark.parametrize("zero_local", [False, True], ids=["B", "B=0"])
@given(problem=kron_trajectories())
def test_prop42_kron_q_step_is_the_direct_minimiser(
    problem: KronTrajectory, zero_local: bool
) -> None:
    """Kronecker F_i and B_k = BA_k⊗BG_k through kron_q_step (exact solver) and q_gradient,
    against the dense minimiser of (28) built with np.kron. With B ≡ 0 the steps must also be
    the SO-KLD-WRM steps (Prop. 4.1 as the special case)."""
    rho = problem.rho
    shape = problem.theta0.shape
    theta, factors = problem.theta0, None
    g_prev = ghat = m_ghat = None
    lam_prev = previous_condition = 1.0
    fishers: list[np.ndarray] = []
    steps: list[np.ndarray] = []
    for k, lam in enumerate(problem.lams):
        g = mat(problem.loss.gradient(vec(theta)), shape)
        fishers.append(np.kron(problem.factors_a[k], problem.factors_g[k]))
        factors = wake.average(factors, [problem.factors_a[k], problem.factors_g[k]], rho)
        abar, gbar = factors
        b_a, b_g = problem.local_a[k], problem.local_g[k]
        if zero_local:
            b_a, b_g = 0 * b_a, 0 * b_g
        local = np.kron(b_a, b_g)
        ghat_prev, m_ghat_prev = ghat, m_ghat
        ghat = wake.q_gradient(g, ghat, g_prev, m_ghat, rho, lam, lam_prev)
        step, m_ghat = wake.kron_q_step(ghat, abar, gbar, b_a, b_g, lam)
        fbar = np.kron(abar, gbar)
        expected, condition = minimiser(
            kld_terms(vec(g), fishers, [vec(s) for s in steps], lam, rho, local=local)
        )
        # The exact solver whitens with Cholesky factors of Ā, Ḡ: add κ(Ā)κ(Ḡ) = κ(F̄).
        tolerance = (k + 1) * (condition + cond(fbar) * cond(fbar + local / lam))
        assert_close(vec(step), expected, F64, tolerance)
        assert_close(vec(m_ghat), -lam * fbar @ vec(step), F64, tolerance)
        if zero_local:
            so = wake.so_gradient(g, g_prev, rho, lam, lam_prev)
            so_step = -mat(np.linalg.solve(fbar, vec(so)), shape) / lam
            assert_close(step, so_step, F64, tolerance)
            if k > 0:
                # B ≡ 0: M̂ = I, so M̂ĝ = ĝ and ĝ is the SO gradient, up to the κ(F̄_{k−1})·eps
                # of M̂ĝ, amplified by the cancellation in g + c(ĝ − g_prev − M̂ĝ).
                c = rho * lam / lam_prev
                assert_sum_close(
                    ghat,
                    [g, -c * g_prev],
                    F64,
                    4 * previous_condition,
                    extra=[c * ghat_prev, c * m_ghat_prev],
                )
            else:
                assert ghat is g  # ĝ_0 = g_0
        steps.append(step)
        theta, g_prev, lam_prev = theta + step, g, lam
        previous_condition = cond(fbar)


@st.composite
def kron_layers(
    draw: Any, *, max_condition: float = 100.0, psd_local: bool = True, fixed_shape: bool = False
) -> dict[str, Any]:
    d_in, d_out = (3, 2) if fixed_shape else (draw(st.integers(1, 4)), draw(st.integers(1, 4)))

    def spd(size: int) -> st.SearchStrategy[np.ndarray]:
        return testing.spd_matrices(size, max_condition=max_condition, scales=(0.1, 1.0, 10.0))

    local = testing.psd_matrices if psd_local else spd
    return {
        "ghat": draw(testing.arrays((d_out, d_in))),
        "fbar_a": draw(spd(d_in)),
        "fbar_g": draw(spd(d_out)),
        "b_a": draw(local(d_in)),
        "b_g": draw(local(d_out)),
        "lam": draw(st.floats(0.2, 10.0)),
    }


def _condition(dtype: np.dtype) -> float:
    return 10.0 if dtype == F32 else 100.0


def _examples(backend: testing.Backend) -> settings:
    """A quarter of the profile's examples on JAX, whose eager mode compiles every new shape
    (the Kronecker tests also keep one shape there; the shapes are covered on the others)."""
    count = settings.default.max_examples
    return settings(max_examples=max(3, count // 4) if backend.name == "jax" else count)


def _dense_q(layer: dict[str, Any], summed: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
    """Reference (step, M̂ĝ, condition) of kron_q_step with the dense matrices."""
    abar, gbar, b_a, b_g, lam = (
        np.asarray(layer[key], np.float64) for key in ("fbar_a", "fbar_g", "b_a", "b_g", "lam")
    )
    ghat = np.asarray(layer["ghat"], np.float64)
    fbar = np.kron(abar, gbar)
    if summed:
        # (25) expanded: (Ā + B_A/λ)⊗(Ḡ + B_G/λ)
        #   = Ā⊗Ḡ + B_A⊗B_G/λ + (Ā⊗B_G + B_A⊗Ḡ)/λ + (1/λ² − 1/λ)B_A⊗B_G.
        system = (
            fbar
            + np.kron(b_a, b_g) / lam
            + (np.kron(abar, b_g) + np.kron(b_a, gbar)) / lam
            + (1 / lam**2 - 1 / lam) * np.kron(b_a, b_g)
        )
    else:
        system = fbar + np.kron(b_a, b_g) / lam
    direction = np.linalg.solve(system, vec(ghat))
    step = -mat(direction, ghat.shape) / lam
    m_ghat = mat(fbar @ direction, ghat.shape)
    return step, m_ghat, cond(system) * cond(fbar)


@pytest.mark.parametrize("solver", ["exact", "summed_factors"])
def test_kron_q_step_matches_dense_on_every_backend(
    backend: testing.Backend, dtype: np.dtype, solver: str
) -> None:
    @_examples(backend)
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        layer = data.draw(
            kron_layers(max_condition=_condition(dtype), fixed_shape=backend.name == "jax")
        )
        layer = {k: (v.astype(dtype) if isinstance(v, np.ndarray) else v) for k, v in layer.items()}
        originals = {k: v.copy() for k, v in layer.items() if isinstance(v, np.ndarray)}
        arrays = {k: backend.asarray(v) for k, v in originals.items()}
        step, m_ghat = wake.kron_q_step(**arrays, lam=layer["lam"], solver=solver)
        assert_backend_array(step, backend, dtype)
        assert_backend_array(m_ghat, backend, dtype)
        expected_step, expected_m, condition = _dense_q(layer, summed=solver == "summed_factors")
        assert_close(backend.to_numpy(step), expected_step, dtype, condition)
        assert_close(backend.to_numpy(m_ghat), expected_m, dtype, condition)
        for key, original in originals.items():
            np.testing.assert_array_equal(backend.to_numpy(arrays[key]), original)

    check()


@given(layer=kron_layers())
def test_m_hat_forms_agree(layer: dict[str, Any]) -> None:
    """M̂ = F̄(F̄ + B/λ)⁻¹ = [I + B F̄⁻¹/λ]⁻¹ and M̂ĝ = −λF̄s (identity 21)."""
    step, m_ghat = wake.kron_q_step(**layer)
    fbar = np.kron(layer["fbar_a"], layer["fbar_g"])
    local = np.kron(layer["b_a"], layer["b_g"])
    lam = layer["lam"]
    n = fbar.shape[0]
    m_hat = np.linalg.inv(np.eye(n) + local @ np.linalg.inv(fbar) / lam)
    condition = cond(fbar) * cond(fbar + local / lam)
    assert_close(vec(m_ghat), m_hat @ vec(layer["ghat"]), F64, condition)
    assert_close(vec(m_ghat), -lam * fbar @ vec(step), F64, condition)


def test_local_equal_to_the_average_gives_m_hat_lambda_over_lambda_plus_one(
    backend: testing.Backend, dtype: np.dtype
) -> None:
    """B = F̄ ⇒ M̂ = λ/(λ+1)·I and s = −F̄⁻¹ĝ/(λ+1) (exact solver); the summed-factor solver
    instead uses (1+1/λ)²F̄ (identity 25)."""

    @_examples(backend)
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        layer = data.draw(
            kron_layers(max_condition=_condition(dtype), fixed_shape=backend.name == "jax")
        )
        abar, gbar = layer["fbar_a"].astype(dtype), layer["fbar_g"].astype(dtype)
        ghat, lam = layer["ghat"].astype(dtype), layer["lam"]
        args = [backend.asarray(x) for x in (ghat, abar, gbar, abar, gbar)]
        fbar = np.kron(abar.astype(np.float64), gbar.astype(np.float64))
        newton = mat(np.linalg.solve(fbar, vec(ghat)), ghat.shape)
        condition = cond(fbar) ** 2
        step, m_ghat = wake.kron_q_step(*args, lam)
        assert_close(backend.to_numpy(m_ghat), lam / (lam + 1) * ghat, dtype, condition)
        assert_close(backend.to_numpy(step), -newton / (lam + 1), dtype, condition)
        step, m_ghat = wake.kron_q_step(*args, lam, solver="summed_factors")
        factor = (1 + 1 / lam) ** 2
        assert_close(backend.to_numpy(m_ghat), ghat / factor, dtype, condition)
        assert_close(backend.to_numpy(step), -newton / (lam * factor), dtype, condition)

    check()


@given(
    data=st.data(), rho=st.floats(0.0, 1.0), lam=st.floats(0.1, 10.0), lam_prev=st.floats(0.1, 10.0)
)
def test_q_gradient_with_m_hat_identity_is_so_gradient(
    data: st.DataObject, rho: float, lam: float, lam_prev: float
) -> None:
    """B ≡ 0 ⇒ M̂ = I: q_gradient(g, ĝ, g_prev, m_ghat=ĝ) = so_gradient(g, g_prev) for any ĝ."""
    shape = (data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3)))
    g, ghat, g_prev = (data.draw(testing.arrays(shape)) for _ in range(3))
    q = wake.q_gradient(g, ghat, g_prev, ghat, rho, lam, lam_prev)
    so = wake.so_gradient(g, g_prev, rho, lam, lam_prev)
    c = rho * lam / lam_prev
    assert_sum_close(q, [g, -c * g_prev], F64, 4, extra=[c * ghat, c * ghat])
    assert_sum_close(so, [g, -c * g_prev], F64, 2)
    assert wake.q_gradient(g, None, None, None, rho, lam, lam_prev) is g  # ĝ_0 = g_0


# ----------------------------------------------------------------------------------------
# Identity 22: boundedness of ĝ
# ----------------------------------------------------------------------------------------


@given(
    n=st.integers(1, 4),
    rho=st.floats(0.05, 0.95),
    lam=st.floats(0.5, 20.0),
    bound=st.floats(0.1, 10.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_ghat_stays_bounded(n: int, rho: float, lam: float, bound: float, seed: int) -> None:
    """If ρ‖I − M̂_k‖₂ ≤ δ < 1 and ‖g_k‖ ≤ K then ‖ĝ_k‖ ≤ (1+ρ)K/(1−δ) (≤ 2K/(1−δ), the
    paper's statement): ĝ_k = (g_k − ρg_{k−1}) + ρ(I − M̂_{k−1})ĝ_{k−1}."""
    rng = np.random.default_rng(seed)
    steps = 60
    fishers = []
    for _ in range(steps):
        basis = np.linalg.qr(rng.standard_normal((n, n)))[0]
        fishers.append((basis * rng.uniform(0.5, 2.0, n)) @ basis.T)
    fbar = ghat = g_prev = m_ghat = None
    norms, deltas = [], []
    for k in range(steps):
        g = rng.standard_normal(n)
        g *= bound * rng.uniform(0.0, 1.0) ** 0.25 / np.linalg.norm(g)  # ‖g‖ ≤ K, often near K
        if k % 2:
            g = -g  # alternating signs make g_k − ρg_{k−1} as large as it gets
        fbar = wake.average(fbar, fishers[k], rho)
        rows = rng.standard_normal((n, n))
        local = rng.uniform(0.0, 3.0) * rows.T @ rows / n
        ghat = wake.q_gradient(g, ghat, g_prev, m_ghat, rho, lam, lam)
        m_hat = fbar @ np.linalg.inv(fbar + local / lam)
        m_ghat = m_hat @ ghat
        deltas.append(rho * np.linalg.norm(np.eye(n) - m_hat, 2))
        norms.append(np.linalg.norm(ghat))
        g_prev = g
    delta = max(deltas[:-1]) if steps > 1 else 0.0
    if delta >= 0.999:
        return  # the sufficient condition does not hold; nothing is claimed
    limit = (1 + rho) * bound / (1 - delta)
    assert max(norms) <= limit * (1 + 1e-12), (max(norms), limit, delta)
    assert limit <= 2 * bound / (1 - delta)


# ----------------------------------------------------------------------------------------
# Identity 23: infrequent curvature updates (20)
# ----------------------------------------------------------------------------------------


@given(
    problem=trajectories(max_dim=3, max_steps=1),
    period=st.integers(1, 4),
    updates=st.integers(1, 4),
    data=st.data(),
)
def test_infrequent_updates_keep_the_wake_on_the_update_steps(
    problem: Trajectory, period: int, updates: int, data: st.DataObject
) -> None:
    """B_k = F̂_k if k mod N_u = 0 else B̄_q: B̄ is constant between updates,
    B̄_{qN_u} = Σ_j κ(j)ρ^{q−j} F̂_{jN_u}, and Prop. 3.1 still holds with these B_k."""
    rho, lam = problem.rho, problem.lams[0]
    n = problem.theta0.shape[0]
    total = period * updates
    estimates = [data.draw(testing.spd_matrices(n, max_condition=20.0)) for _ in range(total)]
    theta, bbar, bbar_q = problem.theta0, None, None
    curvatures: list[np.ndarray] = []
    gradients: list[np.ndarray] = []
    steps: list[np.ndarray] = []
    fresh: list[np.ndarray] = []
    for k in range(total):
        if schedule.refresh_due(k, period):
            curvature = estimates[k]
            fresh.append(curvature)
        else:
            curvature = bbar_q
        curvatures.append(curvature)
        previous = bbar
        bbar = wake.average(bbar, curvature, rho)
        if schedule.refresh_due(k, period):
            bbar_q = bbar
            assert_close(bbar, wake_sum(fresh, rho), F64, 4 * len(fresh))
        else:
            assert_close(bbar, previous, F64, 2.0)
        gradients.append(problem.loss.gradient(theta))
        step = -np.linalg.solve(bbar, gradients[-1]) / lam
        expected, condition = minimiser(woqm_terms(gradients, curvatures, steps, lam, rho))
        assert_close(step, expected, F64, (k + 1) * condition)
        steps.append(step)
        theta = theta + step
    assert len(fresh) == updates


# ----------------------------------------------------------------------------------------
# Identity 25: Puiu's summed-factor approximation is a different matrix
# ----------------------------------------------------------------------------------------


@given(layer=kron_layers(max_condition=20.0, psd_local=False))
def test_summed_factors_expansion_and_difference(layer: dict[str, Any]) -> None:
    abar, gbar, b_a, b_g, lam = (layer[k] for k in ("fbar_a", "fbar_g", "b_a", "b_g", "lam"))
    summed = np.kron(abar + b_a / lam, gbar + b_g / lam)
    expansion = (
        np.kron(abar, gbar)
        + np.kron(b_a, b_g) / lam
        + (np.kron(abar, b_g) + np.kron(b_a, gbar)) / lam
        + (1 / lam**2 - 1 / lam) * np.kron(b_a, b_g)
    )
    assert_close(summed, expansion, F64, 16.0)
    exact = wake.kron_q_step(**layer, solver="exact")
    approximate = wake.kron_q_step(**layer, solver="summed_factors")
    # Each matches its own dense matrix (checked on every backend above) ...
    expected, _, condition = _dense_q(layer, summed=True)
    assert_close(approximate.step, expected, F64, condition)
    direct = -mat(np.linalg.solve(summed, vec(layer["ghat"])), layer["ghat"].shape) / lam
    assert_close(approximate.step, direct, F64, condition)
    # ... and they differ, far beyond rounding (≤ 1e-10 here): the extra cross terms
    # (Ā⊗B_G + B_A⊗Ḡ)/λ are of the size of B/λ itself.
    difference = np.linalg.norm(exact.step - approximate.step) / np.linalg.norm(exact.step)
    assert difference > 1e-6


# ----------------------------------------------------------------------------------------
# Cross-cutting: every backend and dtype, purity, jax.jit, errors
# ----------------------------------------------------------------------------------------


def test_so_and_q_gradient_on_every_backend(backend: testing.Backend, dtype: np.dtype) -> None:
    @_examples(backend)
    @given(
        data=st.data(),
        rho=st.floats(0.0, 1.0),
        lam=st.floats(0.1, 10.0),
        lam_prev=st.floats(0.1, 10.0),
        scalars_as_arrays=st.booleans(),
        container=st.sampled_from([None, list, tuple]),
    )
    def check(  # type: ignore[no-untyped-def]
        data, rho, lam, lam_prev, scalars_as_arrays, container
    ):
        shapes = [(data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))) for _ in range(2)]
        if container is None:
            shapes = shapes[:1]
        names = ("g", "g_prev", "ghat_prev", "m_ghat_prev")
        layers = [
            {name: data.draw(testing.arrays(shape, dtype=dtype)) for name in names}
            for shape in shapes
        ]
        originals = [{k: v.copy() for k, v in layer.items()} for layer in layers]
        converted = [{k: backend.asarray(v) for k, v in layer.items()} for layer in layers]

        def arg(name: str) -> Any:
            values = [layer[name] for layer in converted]
            return values[0] if container is None else container(values)

        def scalar(value: float) -> Any:
            return backend.asarray(np.asarray(value, dtype=dtype)) if scalars_as_arrays else value

        so = wake.so_gradient(arg("g"), arg("g_prev"), scalar(rho), scalar(lam), scalar(lam_prev))
        q = wake.q_gradient(
            arg("g"),
            arg("ghat_prev"),
            arg("g_prev"),
            arg("m_ghat_prev"),
            scalar(rho),
            scalar(lam),
            scalar(lam_prev),
        )
        c = rho * lam / lam_prev
        for result in (so, q):
            if container is not None:
                assert type(result) is container and len(result) == len(layers)
        for index, layer in enumerate(originals):
            g, g_prev, ghat, m_ghat = (layer[name].astype(np.float64) for name in names)
            so_i = so if container is None else so[index]
            q_i = q if container is None else q[index]
            assert_backend_array(so_i, backend, dtype)
            assert_backend_array(q_i, backend, dtype)
            # c is rounded to the dtype (relative eps), then c·x and the sums: factors 2, 4.
            assert_sum_close(backend.to_numpy(so_i), [g, -c * g_prev], dtype, 2)
            terms = [g, c * ghat, -c * g_prev, -c * m_ghat]
            assert_sum_close(backend.to_numpy(q_i), terms, dtype, 4)
        for layer, original in zip(converted, originals):
            for name in names:
                np.testing.assert_array_equal(backend.to_numpy(layer[name]), original[name])

    check()


@pytest.fixture(scope="module")
def jax_backend() -> testing.Backend:
    pytest.importorskip("jax")
    return next(b for b in testing.available_backends() if b.name == "jax")


def test_wake_functions_under_jit(jax_backend: testing.Backend, dtype: np.dtype) -> None:
    """λ and ρ traced as 0-d arrays; one compilation per function, several inputs."""
    import jax
    import jax.numpy as jnp

    so = jax.jit(lambda g, gp, r, l, lp: wake.so_gradient(g, gp, r, l, lp))
    q = jax.jit(lambda g, gh, gp, m, r, l, lp: wake.q_gradient(g, gh, gp, m, r, l, lp))
    average = jax.jit(lambda p, n, r: wake.average(p, n, r))
    steps = {
        solver: jax.jit(lambda *a, solver=solver: wake.kron_q_step(*a, solver=solver))
        for solver in ("exact", "summed_factors")
    }
    rng = np.random.default_rng(7)
    d_out, d_in = 2, 3
    for _ in range(3):
        g, gp, gh, m = (rng.standard_normal((d_out, d_in)).astype(dtype) for _ in range(4))
        rho, lam, lam_prev = (
            np.asarray(v, dtype) for v in (rng.uniform(), rng.uniform(0.5, 3), rng.uniform(0.5, 3))
        )
        traced = [jnp.asarray(x) for x in (g, gp, gh, m, rho, lam, lam_prev)]
        jg, jgp, jgh, jm, jr, jl, jlp = traced
        result = so(jg, jgp, jr, jl, jlp)
        assert_backend_array(result, jax_backend, dtype)
        c = float(rho) * float(lam) / float(lam_prev)
        g64, gp64, gh64, m64 = (x.astype(np.float64) for x in (g, gp, gh, m))
        assert_sum_close(np.asarray(result), [g64, -c * gp64], dtype, 2)
        result = q(jg, jgh, jgp, jm, jr, jl, jlp)
        assert_backend_array(result, jax_backend, dtype)
        assert_sum_close(np.asarray(result), [g64, c * gh64, -c * gp64, -c * m64], dtype, 4)
        layers = average([jg, jgp], [jgh, jm], jr)
        assert isinstance(layers, list)
        for result, p, n in zip(layers, (g64, gp64), (gh64, m64)):
            assert_backend_array(result, jax_backend, dtype)
            assert_sum_close(np.asarray(result), [float(rho) * p, (1 - float(rho)) * n], dtype, 2)
        layer = {
            "ghat": g,
            "fbar_a": _spd(rng, d_in, dtype),
            "fbar_g": _spd(rng, d_out, dtype),
            "b_a": _spd(rng, d_in, dtype),
            "b_g": _spd(rng, d_out, dtype),
            "lam": lam,
        }
        for solver, function in steps.items():
            step, m_ghat = function(
                *(jnp.asarray(layer[k]) for k in ("ghat", "fbar_a", "fbar_g", "b_a", "b_g", "lam"))
            )
            assert_backend_array(step, jax_backend, dtype)
            assert_backend_array(m_ghat, jax_backend, dtype)
            expected_step, expected_m, condition = _dense_q(
                layer, summed=solver == "summed_factors"
            )
            assert_close(np.asarray(step), expected_step, dtype, condition)
            assert_close(np.asarray(m_ghat), expected_m, dtype, condition)


def _spd(rng: np.random.Generator, n: int, dtype: np.dtype) -> np.ndarray:
    basis = np.linalg.qr(rng.standard_normal((n, n)))[0]
    return ((basis * rng.uniform(0.5, 2.0, n)) @ basis.T).astype(dtype)


def test_bad_scalars_are_value_errors_naming_the_argument(backend: testing.Backend) -> None:
    g = backend.asarray(np.ones((2, 3)))
    a, gg = backend.asarray(np.eye(3)), backend.asarray(np.eye(2))
    for rho in (-0.1, 1.5, float("nan")):  # each message starts with the argument's name
        with pytest.raises(ValueError, match=r"^rho must"):
            wake.average(None, g, rho)
        with pytest.raises(ValueError, match=r"^rho must"):
            wake.average(g, g, rho)
        with pytest.raises(ValueError, match=r"^rho must"):
            wake.average([g], [g], rho)
        with pytest.raises(ValueError, match=r"^rho must"):
            wake.so_gradient(g, g, rho)
        with pytest.raises(ValueError, match=r"^rho must"):
            wake.so_gradient(g, None, rho)
        with pytest.raises(ValueError, match=r"^rho must"):
            wake.q_gradient(g, g, g, g, rho)
        with pytest.raises(ValueError, match=r"^rho must"):
            wake.weights(3, rho)
    for lam in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match=r"^lam must"):
            wake.so_gradient(g, g, 0.5, lam=lam)
        with pytest.raises(ValueError, match=r"^lam_prev must"):
            wake.so_gradient(g, g, 0.5, lam_prev=lam)
        with pytest.raises(ValueError, match=r"^lam must"):
            wake.q_gradient(g, g, g, g, 0.5, lam=lam)
        with pytest.raises(ValueError, match=r"^lam_prev must"):
            wake.q_gradient(g, None, None, None, 0.5, lam_prev=lam)
        with pytest.raises(ValueError, match=r"^lam must"):
            wake.kron_q_step(g, a, gg, a, gg, lam)
    with pytest.raises(ValueError, match=r"^lam must"):
        wake.so_gradient(g, g, 0.5, lam=backend.asarray(np.asarray(-2.0)))
    for count in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="count"):
            wake.weights(count, 0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="solver"):
        wake.kron_q_step(g, a, gg, a, gg, 1.0, solver="cholesky")


def test_bad_arrays_are_value_errors_naming_the_argument(backend: testing.Backend) -> None:
    g = backend.asarray(np.ones((2, 3)))
    other = backend.asarray(np.ones((3, 2)))
    with pytest.raises(ValueError, match=r"g_prev.*\(3, 2\)|\(2, 3\).*g_prev"):
        wake.so_gradient(g, other, 0.5)
    for name, args in (
        ("ghat_prev", (g, other, g, g)),
        ("g_prev", (g, g, other, g)),
        ("m_ghat_prev", (g, g, g, other)),
    ):
        with pytest.raises(ValueError, match=name):
            wake.q_gradient(*args, 0.5)
    with pytest.raises(ValueError, match="g_prev"):
        wake.q_gradient(g, g, None, g, 0.5)
    with pytest.raises(ValueError, match="m_ghat_prev"):
        wake.q_gradient(g, g, g, None, 0.5)
    with pytest.raises(ValueError, match="same length"):
        wake.so_gradient([g, g], [g], 0.5)
    with pytest.raises(ValueError, match="same length"):
        wake.q_gradient([g], [g, g], [g], [g], 0.5)
    with pytest.raises(ValueError, match="same length"):
        wake.average([g, g], (g,), 0.5)
    with pytest.raises(ValueError):
        wake.so_gradient([g], g, 0.5)  # a sequence and a single array
    integers = backend.asarray(np.ones((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match=r"^g must have a real floating dtype"):
        wake.so_gradient(integers, integers, 0.5)
    if backend.name != "numpy":
        with pytest.raises(ValueError, match="different libraries"):
            wake.so_gradient(g, np.ones((2, 3)), 0.5)


@pytest.mark.parametrize("solver", ["exact", "summed_factors"])
@pytest.mark.parametrize("which", ["fbar_a", "fbar_g"])
def test_indefinite_average_factor_is_not_positive_definite(
    backend: testing.Backend, solver: str, which: str
) -> None:
    layer = {
        "ghat": np.ones((2, 3)),
        "fbar_a": np.eye(3),
        "fbar_g": np.eye(2),
        "b_a": np.zeros((3, 3)),
        "b_g": np.zeros((2, 2)),
    }
    layer[which] = np.diag([1.0, -1.0, 2.0][: layer[which].shape[0]])
    with pytest.raises(NotPositiveDefiniteError):
        wake.kron_q_step(
            **{k: backend.asarray(v) for k, v in layer.items()}, lam=1.0, solver=solver
        )


def test_float64_scalars_keep_float32_results(backend: testing.Backend) -> None:
    """ρ and λ given as NumPy float64 scalars or float64 0-d arrays of the same library must
    not promote float32 work to float64 (NumPy 2 and JAX would) or fail (array-api-strict)."""
    rng = np.random.default_rng(11)
    g, g_prev, ghat, m_ghat = (rng.standard_normal((2, 3)).astype(np.float32) for _ in range(4))
    fbar_a, b_a = _spd(rng, 3, F32), _spd(rng, 3, F32)
    fbar_g, b_g = _spd(rng, 2, F32), _spd(rng, 2, F32)
    arrays = [backend.asarray(x) for x in (g, g_prev, ghat, m_ghat, fbar_a, fbar_g, b_a, b_g)]
    bg, bgp, bgh, bm, ba, bgg, bba, bbg = arrays
    rho, lam, lam_prev = 0.4, 2.0, 1.25
    g64, gp64, gh64, m64 = (x.astype(np.float64) for x in (g, g_prev, ghat, m_ghat))
    c = rho * lam / lam_prev
    for convert in (np.float64, lambda x: backend.asarray(np.asarray(x, np.float64))):
        r, l, lp = convert(rho), convert(lam), convert(lam_prev)
        result = wake.so_gradient(bg, bgp, r, l, lp)
        assert_backend_array(result, backend, F32)
        assert_sum_close(backend.to_numpy(result), [g64, -c * gp64], F32, 2)
        result = wake.q_gradient(bg, bgh, bgp, bm, r, l, lp)
        assert_backend_array(result, backend, F32)
        assert_sum_close(backend.to_numpy(result), [g64, c * gh64, -c * gp64, -c * m64], F32, 4)
        result = wake.average(bg, bgp, r)
        assert_backend_array(result, backend, F32)
        assert_sum_close(backend.to_numpy(result), [rho * g64, (1 - rho) * gp64], F32, 2)
        for solver in ("exact", "summed_factors"):
            step, m_hat_g = wake.kron_q_step(bg, ba, bgg, bba, bbg, l, solver=solver)
            assert_backend_array(step, backend, F32)
            assert_backend_array(m_hat_g, backend, F32)
            layer = {"ghat": g, "fbar_a": fbar_a, "fbar_g": fbar_g, "b_a": b_a, "b_g": b_g}
            expected, _, condition = _dense_q({**layer, "lam": lam}, solver == "summed_factors")
            assert_close(backend.to_numpy(step), expected, F32, condition)
