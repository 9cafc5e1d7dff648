"""Property-based tests of :mod:`curvlinalg.kron` against dense, textbook NumPy references.

Conventions (DESIGN.md): a weight is ``(d_out, d_in)``; ``vec`` is column-major,
``vec(M) = M.reshape(-1, order="F")``, so ``vec(E X A) = (Aᵀ⊗E) vec(X)`` and the block
``A⊗G`` acts as ``V ↦ G V A``. Identities are numbered as in ``papers/NOTES.md`` §6.

Tolerances: :func:`tests.conftest.assert_close`, a norm-wise ``32·κ·eps(dtype)``, with ``κ``
the condition number of the problem solved — ``np.linalg.cond`` of the dense matrix where it
is cheap, otherwise the bound ``κ(A)·κ(G)`` for ``A⊗G``. Inputs are drawn in float64, cast
to the tested dtype, and the references are computed in float64 *from the cast inputs*, so a
float32 test measures only the library's own rounding. float32 draws use ``κ ≤ 10`` per
factor (``κ ≤ 100`` for float64) so that the float32 tolerances stay meaningful.

Every test is parametrised over the ``backend`` (NumPy, array-api-strict, PyTorch, JAX) and
``dtype`` (float32, float64) fixtures of ``conftest.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import scipy.linalg
from hypothesis import given
from hypothesis import strategies as st

import curvlinalg
from curvlinalg import kron, testing
from tests import references
from tests.conftest import assert_backend_array, assert_close, rtol
from tests.references import f64, mat, to_np, vec

property_test = references.property_tests(references.quarter_on_jax)

# Matrix sizes. JAX's eager mode compiles every operation once per new shape and dtype
# (≈20–40 ms each on CPU, ~800 compilations for this file), which would dominate the run time.
# So on JAX a property test runs a quarter of the profile's examples (as tests/test_wake.py
# does) with sizes from {1, 2, 4} (1×1, square and non-square cases; compiled shapes get reused
# across tests). Every other backend runs the full profile with sizes 1..5.
SIZES = st.integers(1, 5)
JAX_SIZES = st.sampled_from([1, 2, 4])


def sizes(backend: testing.Backend) -> st.SearchStrategy[int]:
    return JAX_SIZES if backend.name == "jax" else SIZES


# --------------------------------------------------------------------------------------
# Helpers: references and conversions (none of them calls curvlinalg)
# --------------------------------------------------------------------------------------


def kappa(dtype: np.dtype) -> float:
    """Condition-number bound of drawn factors: smaller for float32 (see module docstring)."""
    return 10.0 if np.dtype(dtype) == np.float32 else 100.0


def kron_apply(matrix: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """``mat(matrix @ vec(grad))`` for each matrix in a stack ``grad`` of shape ``(..., r, c)``."""
    slices = grad.reshape((-1,) + grad.shape[-2:])
    return np.stack([mat(matrix @ vec(x), x.shape) for x in slices]).reshape(grad.shape)


def kron_solve(matrix: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """``mat(matrix⁻¹ vec(grad))`` for each matrix in a stack ``grad``."""
    slices = grad.reshape((-1,) + grad.shape[-2:])
    solved = [mat(np.linalg.solve(matrix, vec(x)), x.shape) for x in slices]
    return np.stack(solved).reshape(grad.shape)


def cond(m: np.ndarray) -> float:
    return float(np.linalg.cond(f64(m)))


def spd(data: st.DataObject, n: int, dtype: np.dtype, scales=(1e-2, 1.0, 1e2)) -> np.ndarray:
    """An SPD ``n×n`` matrix in ``dtype`` with condition number ≤ :func:`kappa`."""
    drawn = data.draw(testing.spd_matrices(n, max_condition=kappa(dtype), scales=scales))
    return drawn.astype(dtype)


def normal(data: st.DataObject, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    return data.draw(testing.arrays(shape, dtype=dtype))


def eye(n: int) -> np.ndarray:
    return np.eye(n)


# --------------------------------------------------------------------------------------
# Identity 1: vec(E X A) = (Aᵀ⊗E) vec X and (A⊗E)⁻¹ = A⁻¹⊗E⁻¹, through precondition
# --------------------------------------------------------------------------------------


@property_test(data=st.data(), lead=st.sampled_from([(), (2,)]))
def test_precondition_is_the_kronecker_matvec(
    backend: testing.Backend, dtype: np.dtype, data: st.DataObject, lead: tuple[int, ...]
) -> None:
    d_out, d_in = data.draw(sizes(backend)), data.draw(sizes(backend))
    grad = normal(data, lead + (d_out, d_in), dtype)
    a, g = spd(data, d_in, dtype), spd(data, d_out, dtype)
    # For SPD a, g the products lose at most ~n·eps·κ(a)κ(g) relative to ‖g X a‖.
    condition = cond(a) * cond(g)

    # As a preconditioner pair (a_inv, g_inv): vec(g X a) = (aᵀ⊗g) vec X.
    result = kron.precondition(backend.asarray(grad), backend.asarray(a), backend.asarray(g))
    assert_backend_array(result, backend, dtype)
    expected = kron_apply(np.kron(f64(a).T, f64(g)), f64(grad))
    assert_close(to_np(backend, result), expected, dtype, condition)

    # FOOF (g_inv=None) is the preconditioner aᵀ⊗I.
    foof = kron.precondition(backend.asarray(grad), backend.asarray(a))
    expected = kron_apply(np.kron(f64(a).T, eye(d_out)), f64(grad))
    assert_close(to_np(backend, foof), expected, dtype, cond(a))

    # (A⊗G)⁻¹ = A⁻¹⊗G⁻¹: the K-FAC step with undamped inverses is the dense Kronecker solve.
    step = kron.precondition(
        backend.asarray(grad), kron.inverse(backend.asarray(a)), kron.inverse(backend.asarray(g))
    )
    expected = kron_solve(np.kron(f64(a), f64(g)), f64(grad))
    assert_close(to_np(backend, step), expected, dtype, condition)
    # ... equal to g_inv @ grad @ a_inv with NumPy's inverses
    expected = np.linalg.inv(f64(g)) @ f64(grad) @ np.linalg.inv(f64(a))
    assert_close(to_np(backend, step), expected, dtype, condition)


# --------------------------------------------------------------------------------------
# Identity 2: one datapoint g gᵀ = (a aᵀ)⊗(e eᵀ); factor = xᵀx / N
# --------------------------------------------------------------------------------------


@property_test(data=st.data())
def test_one_datapoint_fisher_is_a_kronecker_product(
    backend: testing.Backend, dtype: np.dtype, data: st.DataObject
) -> None:
    d_in, d_out = data.draw(sizes(backend)), data.draw(sizes(backend))
    a, e = normal(data, (d_in,), dtype), normal(data, (d_out,), dtype)
    factor_a = kron.factor(backend.asarray(a[None]))
    factor_e = kron.factor(backend.asarray(e[None]))
    for result in (factor_a, factor_e):
        assert_backend_array(result, backend, dtype)
    per_example = vec(np.outer(f64(e), f64(a)))  # vec of the gradient ẽ aᵀ, (d_out, d_in)
    # Entries are products of four inputs: a few roundings each, no cancellation.
    assert_close(
        np.kron(to_np(backend, factor_a), to_np(backend, factor_e)),
        np.outer(per_example, per_example),
        dtype,
    )


@property_test(
    data=st.data(),
    batch=st.integers(1, 5),
    positions=st.sampled_from([None, 1, 3]),
    bias=st.booleans(),
)
def test_factor_is_the_mean_outer_product(
    backend: testing.Backend,
    dtype: np.dtype,
    data: st.DataObject,
    batch: int,
    positions: int | None,
    bias: bool,
) -> None:
    width = data.draw(sizes(backend))
    shape = (batch, width) if positions is None else (batch, positions, width)
    x = normal(data, shape, dtype)
    x_backend = backend.asarray(x)
    result = kron.factor(x_backend, bias=bias)
    assert_backend_array(result, backend, dtype)
    rows = f64(x).reshape(-1, width)
    if bias:
        rows = np.concatenate([rows, np.ones((rows.shape[0], 1))], axis=1)
    expected = rows.T @ rows / rows.shape[0]
    out = backend.to_numpy(result)
    assert out.shape == (width + bias,) * 2
    assert np.array_equal(out, out.T), "factor must be exactly symmetric"
    # Gram rounding: |δ| ≤ N·eps·|x|ᵀ|x| entrywise and ‖|x|ᵀ|x|‖ ≤ √d·‖xᵀx‖ (norm-wise).
    count = rows.shape[0]
    assert_close(out, expected, dtype, condition=count * math.sqrt(width + bias) / 8)
    np.testing.assert_array_equal(backend.to_numpy(x_backend), x)  # input untouched


# --------------------------------------------------------------------------------------
# Identity 3: eigen_solve = mat((A⊗G + λI)⁻¹ vec grad); eigh
# --------------------------------------------------------------------------------------


@property_test(
    data=st.data(),
    damping=st.sampled_from([0.0, 1e-3, 0.1, 1.0, 10.0]),
    lead=st.sampled_from([(), (3,), (2, 1)]),
)
def test_eigen_solve_is_the_exactly_damped_kronecker_solve(
    backend: testing.Backend,
    dtype: np.dtype,
    data: st.DataObject,
    damping: float,
    lead: tuple[int, ...],
) -> None:
    d_out, d_in = data.draw(sizes(backend)), data.draw(sizes(backend))
    a, g = spd(data, d_in, dtype), spd(data, d_out, dtype)
    grad = normal(data, lead + (d_out, d_in), dtype)
    dense = np.kron(f64(a), f64(g)) + damping * eye(d_in * d_out)
    expected = kron_solve(dense, f64(grad))
    # The eigenbasis solve is exact for a backward-perturbed A, G: error ≲ κ(A⊗G + λI)·eps.
    condition = cond(dense)

    a_eigh, g_eigh = kron.eigh(backend.asarray(a)), kron.eigh(backend.asarray(g))
    result = kron.eigen_solve(backend.asarray(grad), a_eigh, g_eigh, damping)
    assert_backend_array(result, backend, dtype)
    assert_close(to_np(backend, result), expected, dtype, condition)

    # The same with decompositions from NumPy (any orthonormal eigenbasis must work: the
    # eigenvector matrices of these random SPD matrices are not symmetric, so a solve that
    # swaps U_G and U_Gᵀ fails here).
    values_a, vectors_a = np.linalg.eigh(f64(a))
    values_g, vectors_g = np.linalg.eigh(f64(g))
    as_eigh = lambda s, u: kron.Eigh(  # noqa: E731
        backend.asarray(s.astype(dtype)), backend.asarray(u.astype(dtype))
    )
    result = kron.eigen_solve(
        backend.asarray(grad), as_eigh(values_a, vectors_a), as_eigh(values_g, vectors_g), damping
    )
    assert_close(to_np(backend, result), expected, dtype, condition)


def _swapped_eigen_solve(grad, s_a, u_a, s_g, u_g, damping):
    """The published bug (NOTES §2.5): U_Gᵀ[(U_G X U_A) ⊘ D]U_Aᵀ instead of the correct
    U_G[(U_Gᵀ X U_A) ⊘ D]U_Aᵀ."""
    return u_g.T @ ((u_g @ grad @ u_a) / (np.outer(s_g, s_a) + damping)) @ u_a.T


def test_eigen_solve_catches_swapped_output_eigenbasis(
    backend: testing.Backend, dtype: np.dtype
) -> None:
    # G = U_G diag(s_G) U_Gᵀ with a non-symmetric U_G (a rotation), passed explicitly so the
    # backend's eigh sign conventions cannot make U_G symmetric.
    angle = 0.7
    c, s = math.cos(angle), math.sin(angle)
    u_g = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ np.array(
        [[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]]
    )
    s_g = np.array([0.5, 2.0, 5.0])
    u_a, s_a = (
        np.linalg.qr(np.arange(1.0, 5.0)[:, None] ** np.arange(4.0))[0],
        np.array([0.25, 1.0, 3.0, 4.0]),
    )
    g = (u_g * s_g) @ u_g.T
    a = (u_a * s_a) @ u_a.T
    grad = np.arange(12.0).reshape(3, 4) / 7 - 0.8
    damping = 0.1
    dense = np.kron(a, g) + damping * eye(12)
    expected = kron_solve(dense, grad)
    condition = cond(dense)
    # The check has power: the swapped formula is far outside the tolerance.
    swapped = _swapped_eigen_solve(grad, s_a, u_a, s_g, u_g, damping)
    assert np.linalg.norm(swapped - expected) > 0.1 * np.linalg.norm(expected)

    cast = lambda x: backend.asarray(x.astype(dtype))  # noqa: E731
    result = kron.eigen_solve(
        cast(grad), kron.Eigh(cast(s_a), cast(u_a)), kron.Eigh(cast(s_g), cast(u_g)), damping
    )
    assert_close(to_np(backend, result), expected, dtype, condition)


@property_test(data=st.data(), definite=st.booleans())
def test_eigh_reconstructs_with_ascending_values(
    backend: testing.Backend, dtype: np.dtype, data: st.DataObject, definite: bool
) -> None:
    n = data.draw(sizes(backend))
    if definite:
        m = spd(data, n, dtype)
    else:  # symmetric indefinite
        x = normal(data, (n, n), dtype)
        m = ((f64(x) + f64(x).T) / 2).astype(dtype)
    result = kron.eigh(backend.asarray(m))
    assert isinstance(result, kron.Eigh)
    assert_backend_array(result.values, backend, dtype)
    assert_backend_array(result.vectors, backend, dtype)
    values, vectors = to_np(backend, result.values), to_np(backend, result.vectors)
    assert values.shape == (n,) and vectors.shape == (n, n)
    assert np.all(np.diff(values) >= 0), values
    # eigh is backward stable and eigenvalues are perfectly conditioned (|δs| ≤ ‖δm‖₂).
    assert_close(values, np.linalg.eigvalsh(f64(m)), dtype, condition=n)
    assert_close((vectors * values) @ vectors.T, f64(m), dtype, condition=n)
    assert_close(vectors.T @ vectors, eye(n), dtype, condition=n)


# --------------------------------------------------------------------------------------
# Identity 4: factored (π) damping
# --------------------------------------------------------------------------------------


@property_test(
    data=st.data(),
    damping=st.sampled_from([1e-4, 0.3, 1.0, 50.0, 1e4]),
    scale=st.sampled_from([1e-3, 0.5, 7.0, 1e3]),
)
def test_split_damping_product_ratio_invariance_and_expansion(
    backend: testing.Backend, dtype: np.dtype, data: st.DataObject, damping: float, scale: float
) -> None:
    d_in, d_out = data.draw(sizes(backend)), data.draw(sizes(backend))
    a, g = spd(data, d_in, dtype), spd(data, d_out, dtype)
    damping_a, damping_g = kron.split_damping(backend.asarray(a), backend.asarray(g), damping)
    for value in (damping_a, damping_g):
        assert_backend_array(value, backend, dtype)
        assert tuple(value.shape) == ()
    lam_a, lam_g = float(damping_a), float(damping_g)
    # traces, one ratio, a square root: a few roundings, no cancellation.
    tol = rtol(dtype)
    assert lam_a > 0 and lam_g > 0
    assert abs(lam_a * lam_g - damping) <= tol * damping
    ratio = (np.trace(f64(a)) / d_in) / (np.trace(f64(g)) / d_out)
    assert abs(lam_a / lam_g - ratio) <= tol * ratio

    # Invariant to scaling both factors by the same c > 0.
    scaled_a, scaled_g = kron.split_damping(
        backend.asarray((f64(a) * scale).astype(dtype)),
        backend.asarray((f64(g) * scale).astype(dtype)),
        damping,
    )
    assert abs(float(scaled_a) - lam_a) <= tol * lam_a
    assert abs(float(scaled_g) - lam_g) <= tol * lam_g

    # (A + λ_A I)⊗(G + λ_G I) = A⊗G + λ_G A⊗I + λ_A I⊗G + λ I, and the factored K-FAC step
    # with these dampings solves exactly that matrix (with λ = λ_A λ_G as requested).
    a64, g64 = f64(a), f64(g)
    expanded = (
        np.kron(a64, g64)
        + lam_g * np.kron(a64, eye(d_out))
        + lam_a * np.kron(eye(d_in), g64)
        + damping * eye(d_in * d_out)
    )
    product = np.kron(a64 + lam_a * eye(d_in), g64 + lam_g * eye(d_out))
    np.testing.assert_allclose(product, expanded, rtol=tol, atol=tol * np.abs(expanded).max())
    grad = normal(data, (d_out, d_in), dtype)
    step = kron.precondition(
        backend.asarray(grad),
        kron.inverse(backend.asarray(a), damping_a),
        kron.inverse(backend.asarray(g), damping_g),
    )
    assert_close(to_np(backend, step), kron_solve(expanded, f64(grad)), dtype, cond(expanded))


def test_split_damping_of_a_zero_factor_is_even(backend: testing.Backend, dtype: np.dtype) -> None:
    spd_factor = np.array([[2.0, 0.5], [0.5, 1.0]], dtype=dtype)
    zero3, zero2 = np.zeros((3, 3), dtype=dtype), np.zeros((2, 2), dtype=dtype)
    root = math.sqrt(0.25)
    for a, g in ((zero3, spd_factor), (spd_factor, zero3), (zero3, zero2)):
        damping_a, damping_g = kron.split_damping(backend.asarray(a), backend.asarray(g), 0.25)
        assert_backend_array(damping_a, backend, dtype)
        assert float(damping_a) == pytest.approx(root, rel=rtol(dtype))
        assert float(damping_g) == pytest.approx(root, rel=rtol(dtype))
    # No damping splits into zeros, not NaN.
    damping_a, damping_g = kron.split_damping(
        backend.asarray(spd_factor), backend.asarray(zero2), 0.0
    )
    assert (float(damping_a), float(damping_g)) == (0.0, 0.0)


# --------------------------------------------------------------------------------------
# Identity 5: λ_G·KFAC(λ_A, λ_G) → FOOF(λ_A) as λ_G → ∞, error O(‖G‖/λ_G)
# --------------------------------------------------------------------------------------


@property_test(data=st.data(), damping_a=st.sampled_from([0.01, 1.0, 100.0]))
def test_kfac_tends_to_foof_as_the_output_damping_grows(
    backend: testing.Backend, dtype: np.dtype, data: st.DataObject, damping_a: float
) -> None:
    d_out, d_in = data.draw(sizes(backend)), data.draw(sizes(backend))
    a, g = spd(data, d_in, dtype), spd(data, d_out, dtype)
    grad = backend.asarray(normal(data, (d_out, d_in), dtype))
    a_inv = kron.inverse(backend.asarray(a), damping_a)
    foof = to_np(backend, kron.precondition(grad, a_inv))
    rounding = 4 * rtol(dtype, cond(f64(a) + damping_a * eye(d_in)))
    norm_g = np.linalg.norm(f64(g), 2)
    # λ_G (G + λ_G I)⁻¹ − I = −G (G + λ_G I)⁻¹, of norm ‖G‖/(‖G‖ + λ_G) < 1/t for λ_G = t‖G‖.
    # The leading term is −G·FOOF/λ_G, so the error is Θ(1/t): it shrinks in proportion to t.
    # float32 uses smaller t so that the error stays far above its rounding (≈1e-6).
    ts = (10.0, 1e3) if np.dtype(dtype) == np.float32 else (1e3, 1e6)
    errors = []
    for t in ts:
        damping_g = t * norm_g
        kfac = to_np(
            backend, kron.precondition(grad, a_inv, kron.inverse(backend.asarray(g), damping_g))
        )
        error = np.linalg.norm(damping_g * kfac - foof) / np.linalg.norm(foof)
        assert error <= 1 / t + rounding, (t, error)
        errors.append(error)
    # Exact ratio (t₂/t₁)·(1 + O(1/t₁)) with 1/t₁ ≤ 0.1; κ(G) ≤ 100 keeps the smaller error
    # ≥ 1/(κ(G)·t₂) ≥ 1e-8 (float64) / 1e-5 (float32), far above rounding.
    assert 0.85 * ts[1] / ts[0] <= errors[0] / errors[1] <= 1.15 * ts[1] / ts[0], errors


# --------------------------------------------------------------------------------------
# Identity 6: FOOF is ridge regression on the layer's outputs
# --------------------------------------------------------------------------------------


@property_test(data=st.data(), relative_damping=st.sampled_from([0.1, 1.0, 10.0]))
def test_foof_step_is_the_ridge_regression_minimiser(
    backend: testing.Backend, dtype: np.dtype, data: st.DataObject, relative_damping: float
) -> None:
    n_in, n_out, batch = (data.draw(sizes(backend)) for _ in range(3))
    # Column-sample matrices (Benzing's layout): A_c is n_in×B, E_c is n_out×B.
    a_c = f64(normal(data, (n_in, batch), dtype))
    e_c = f64(normal(data, (n_out, batch), dtype))
    damping = relative_damping * np.linalg.norm(a_c, 2) ** 2  # κ(A_cA_cᵀ + λI) ≤ 1 + 1/rel
    gram, rhs = a_c @ a_c.T, e_c @ a_c.T
    step = kron.precondition(
        backend.asarray(rhs.astype(dtype)),
        kron.inverse(backend.asarray(gram.astype(dtype)), float(damping)),
    )
    result = to_np(backend, step)
    system = gram + damping * eye(n_in)
    condition = cond(system)

    # min ½‖ΔW A_c − E_c‖² + (λ/2)‖ΔW‖² as one stacked least-squares problem for ΔWᵀ:
    # ‖[A_cᵀ; √λ I] ΔWᵀ − [E_cᵀ; 0]‖².
    stacked = np.vstack([a_c.T, math.sqrt(damping) * eye(n_in)])
    target = np.vstack([e_c.T, np.zeros((n_in, n_out))])
    expected = np.linalg.lstsq(stacked, target, rcond=None)[0].T
    assert_close(result, expected, dtype, condition)

    # First-order optimality: (ΔW A_c − E_c) A_cᵀ + λ ΔW = ΔW (A_cA_cᵀ + λI) − E_cA_cᵀ = 0.
    # A relative error δ in ΔW leaves a residual ≤ ‖δ‖‖system‖ ≤ rtol·κ·‖rhs‖.
    gradient = (result @ a_c - e_c) @ a_c.T + damping * result
    assert np.linalg.norm(gradient) <= rtol(dtype, condition) * condition * np.linalg.norm(rhs)


# --------------------------------------------------------------------------------------
# Identity 7: the FOOF toy example of the notes; labels do not enter the preconditioner
# --------------------------------------------------------------------------------------


def test_foof_toy_example_fits_both_points(backend: testing.Backend, dtype: np.dtype) -> None:
    # Inputs x₁ = (3, 1), x₂ = (1, 0); targets y = (1, −1); W = 0 (1×2); squared loss
    # L = ½ Σᵢ (W xᵢ − yᵢ)². Per-example errors eᵢ = ∂ℓᵢ/∂(W xᵢ) = W xᵢ − yᵢ = −yᵢ = (−1, 1).
    # Summed gradient Σᵢ eᵢ xᵢᵀ = −(3, 1) + (1, 0) = (−2, −1): SGD direction (2, 1).
    # Summed factor Σᵢ xᵢxᵢᵀ = [[10, 3], [3, 1]] (det 1), inverse [[1, −3], [−3, 10]];
    # FOOF at λ = 0: step = −(Σ e xᵀ)(Σ x xᵀ)⁻¹ = (2, 1)[[1, −3], [−3, 10]] = (−1, 4), and
    # W + step = (−1, 4) fits both points: (−1, 4)·(3, 1) = 1, (−1, 4)·(1, 0) = −1.
    # curvlinalg's mean convention divides the factor *and* the gradient by B = 2; at λ = 0
    # the two factors of 1/B cancel: −(∇/B)(Σ x xᵀ/B)⁻¹ = −∇(Σ x xᵀ)⁻¹ — no rescaling needed.
    a = np.array([[3.0, 1.0], [1.0, 0.0]], dtype=dtype)
    cast = lambda x: backend.asarray(np.asarray(x, dtype=dtype))  # noqa: E731
    mean_factor = kron.factor(cast(a))
    np.testing.assert_array_equal(backend.to_numpy(mean_factor), [[5.0, 1.5], [1.5, 0.5]])
    preconditioner = kron.inverse(mean_factor, 0.0)
    condition = cond([[10.0, 3.0], [3.0, 1.0]])  # ≈ 119

    for targets in ([1.0, -1.0], [5.0, 2.0], [0.0, -3.0]):
        e = -np.asarray(targets, dtype=dtype)[:, None]  # (B, d_out) with W = 0
        mean_grad = kron.precondition_factored(cast(a), cast(e), cast(np.eye(2)))
        assert_close(to_np(backend, mean_grad), f64(e).T @ f64(a) / 2, dtype)
        step = -to_np(backend, kron.precondition(mean_grad, preconditioner))
        # The same preconditioner (built from the inputs only) interpolates any targets.
        assert_close(step @ f64(a).T, np.asarray([targets]), dtype, condition)
        if targets == [1.0, -1.0]:
            assert_close(step, np.array([[-1.0, 4.0]]), dtype, condition)
            sgd_direction = -2 * to_np(backend, mean_grad)  # summed gradient = B × mean
            np.testing.assert_array_equal(sgd_direction, [[2.0, 1.0]])


# --------------------------------------------------------------------------------------
# Identity 8: sum factors at (lr, λ) = mean factors at (lr/B, λ/B)
# --------------------------------------------------------------------------------------


@property_test(
    data=st.data(),
    batch=st.integers(1, 6),
    lr=st.sampled_from([0.1, 1.0, 30.0]),
    damping=st.sampled_from([0.3, 3.0, 30.0]),
)
def test_sum_factors_equal_mean_factors_at_scaled_lr_and_damping(
    backend: testing.Backend,
    dtype: np.dtype,
    data: st.DataObject,
    batch: int,
    lr: float,
    damping: float,
) -> None:
    d_in, d_out = data.draw(sizes(backend)), data.draw(sizes(backend))
    x = normal(data, (batch, d_in), dtype)
    e = normal(data, (batch, d_out), dtype)
    x64, e64 = f64(x), f64(e)
    grad = (e64.T @ x64 / batch).astype(dtype)  # mean-loss gradient
    a_sum = (x64.T @ x64).astype(dtype)  # Benzing's code: Σᵢ aᵢaᵢᵀ, no 1/B
    a_mean = kron.factor(backend.asarray(x))
    e_factor = kron.factor(backend.asarray(e))
    g_b, a_sum_b = backend.asarray(grad), backend.asarray(a_sum)

    # FOOF: lr·∇(Σaaᵀ + λI)⁻¹ = (lr/B)·∇(Σaaᵀ/B + (λ/B)I)⁻¹.
    foof_sum = lr * to_np(backend, kron.precondition(g_b, kron.inverse(a_sum_b, damping)))
    foof_mean = (lr / batch) * to_np(
        backend, kron.precondition(g_b, kron.inverse(a_mean, damping / batch))
    )
    system = f64(a_sum) + damping * eye(d_in)
    expected = lr * f64(grad) @ np.linalg.inv(system)
    assert_close(foof_sum, expected, dtype, cond(system))
    assert_close(foof_mean, expected, dtype, 2 * cond(system))

    # K-FAC with factored damping: π² scales by B, so λ_A scales by B and λ_G is unchanged.
    la_sum, lg_sum = kron.split_damping(a_sum_b, e_factor, damping)
    la_mean, lg_mean = kron.split_damping(a_mean, e_factor, damping / batch)
    assert float(la_sum) == pytest.approx(batch * float(la_mean), rel=2 * rtol(dtype))
    assert float(lg_sum) == pytest.approx(float(lg_mean), rel=2 * rtol(dtype))
    kfac_sum = lr * to_np(
        backend,
        kron.precondition(g_b, kron.inverse(a_sum_b, la_sum), kron.inverse(e_factor, lg_sum)),
    )
    kfac_mean = (lr / batch) * to_np(
        backend,
        kron.precondition(g_b, kron.inverse(a_mean, la_mean), kron.inverse(e_factor, lg_mean)),
    )
    e_ref = e64.T @ e64 / batch
    left = f64(a_sum) + float(la_sum) * eye(d_in)
    right = e_ref + float(lg_sum) * eye(d_out)
    expected = lr * np.linalg.solve(right, f64(grad)) @ np.linalg.inv(left)
    condition = cond(left) * cond(right)
    assert_close(kfac_sum, expected, dtype, condition)
    assert_close(kfac_mean, expected, dtype, 2 * condition)


# --------------------------------------------------------------------------------------
# Identity 9: exponential averages
# --------------------------------------------------------------------------------------


@property_test(decay=st.floats(0.0, 0.99), steps=st.integers(1, 6))
def test_debiased_ema_is_a_convex_combination(
    backend: testing.Backend, dtype: np.dtype, decay: float, steps: int
) -> None:
    # Input j is the j-th unit vector of R^steps, so the average *is* the weight vector.
    inputs = np.eye(steps, dtype=dtype)
    state = None
    for j in range(steps):
        state = kron.debiased_ema(state, backend.asarray(inputs[j]), decay)
    assert isinstance(state, kron.DebiasedAverage)
    assert_backend_array(state.value, backend, dtype)
    weights = to_np(backend, state.value)
    expected = (1 - decay) * decay ** (steps - 1 - np.arange(steps)) / (1 - decay**steps)
    assert_close(weights, expected, dtype, condition=steps)
    assert np.all(weights >= 0)
    assert abs(weights.sum() - 1) <= rtol(dtype, steps)
    weight = float(state.weight)  # a Python number for a Python decay
    assert weight == pytest.approx(1 - decay**steps, rel=rtol(dtype, steps))


@property_test(data=st.data(), decay=st.floats(0.0, 0.99), steps=st.integers(1, 6))
def test_debiased_ema_of_constant_and_random_inputs(
    backend: testing.Backend, dtype: np.dtype, data: st.DataObject, decay: float, steps: int
) -> None:
    n = data.draw(sizes(backend))
    constant = spd(data, n, dtype)
    inputs = [normal(data, (n, n), dtype) for _ in range(steps)]
    state_constant, state = None, None
    for x in inputs:
        state_constant = kron.debiased_ema(state_constant, backend.asarray(constant), decay)
        state = kron.debiased_ema(state, backend.asarray(x), decay)
    # total and weight are two separately rounded recursions, so total/weight equals the
    # constant up to ~2·steps roundings (not bitwise).
    assert_close(to_np(backend, state_constant.value), f64(constant), dtype, condition=steps)
    weights = (1 - decay) * decay ** (steps - 1 - np.arange(steps)) / (1 - decay**steps)
    expected = sum(w * f64(x) for w, x in zip(weights, inputs))
    # Convex combination of normal inputs: cancellation bounded by Σw|x| / |Σwx|.
    spread = np.linalg.norm(sum(w * np.abs(f64(x)) for w, x in zip(weights, inputs)))
    condition = steps * spread / max(np.linalg.norm(expected), 1e-300)
    assert_close(to_np(backend, state.value), expected, dtype, condition)


@property_test(data=st.data(), decay=st.floats(0.0, 1.0))
def test_ema_is_puius_average(
    backend: testing.Backend, dtype: np.dtype, data: st.DataObject, decay: float
) -> None:
    n = data.draw(sizes(backend))
    average, new = normal(data, (n, n), dtype), normal(data, (n, n), dtype)
    new_backend = backend.asarray(new)
    first = kron.ema(None, new_backend, decay)
    assert first is new_backend  # κ convention: the first estimate is taken as is
    result = kron.ema(backend.asarray(average), new_backend, decay)
    assert_backend_array(result, backend, dtype)
    expected = decay * f64(average) + (1 - decay) * f64(new)
    spread = np.linalg.norm(decay * np.abs(f64(average)) + (1 - decay) * np.abs(f64(new)))
    condition = spread / max(np.linalg.norm(expected), 1e-300)
    assert_close(to_np(backend, result), expected, dtype, condition)

    # A constant input gives that constant (the κ convention, DESIGN.md): exactly in
    # arithmetic; in floating point ρ·c + (1−ρ)·c rounds by ≤ 2 ulps per step, so 3 steps
    # stay far inside 32·eps.
    constant = spd(data, n, dtype)
    state = kron.ema(None, backend.asarray(constant), decay)
    for _ in range(3):
        state = kron.ema(state, backend.asarray(constant), decay)
    assert_close(to_np(backend, state), f64(constant), dtype)
    # decay = 0 means no averaging: exactly the new value.
    np.testing.assert_array_equal(
        backend.to_numpy(kron.ema(backend.asarray(average), new_backend, 0.0)), new
    )


# --------------------------------------------------------------------------------------
# inverse, precondition_factored, precondition_captures
# --------------------------------------------------------------------------------------


@property_test(
    data=st.data(),
    semidefinite=st.booleans(),
    relative_damping=st.sampled_from([0.0, 0.01, 1.0, 100.0]),
)
def test_inverse_is_the_damped_inverse(
    backend: testing.Backend,
    dtype: np.dtype,
    data: st.DataObject,
    semidefinite: bool,
    relative_damping: float,
) -> None:
    n = data.draw(sizes(backend))
    if semidefinite:  # a factor of a batch smaller than the width; damping makes it definite
        m = data.draw(testing.psd_matrices(n)).astype(dtype)
        relative_damping = max(relative_damping, 1.0 / kappa(dtype))
    else:
        m = spd(data, n, dtype)
    damping = relative_damping * max(float(np.linalg.norm(f64(m), 2)), 1.0)
    result = kron.inverse(backend.asarray(m), damping)
    assert_backend_array(result, backend, dtype)
    out = backend.to_numpy(result)
    assert np.array_equal(out, out.T), "inverse must be exactly symmetric"
    damped = f64(m) + damping * eye(n)
    assert_close(f64(out), np.linalg.inv(damped), dtype, cond(damped))


def _capture_shapes(draw: Callable[[Any], Any], order: str) -> tuple[tuple, tuple]:
    """Capture shapes ``(a, e)`` that make precondition_factored take each order of its cost
    model: few rows (N = B·T ≤ 2) and wide layers (≥ 4) → precondition the captures; many rows
    (N ≥ 4) and narrow layers (≤ 2) → form ∇W first (checked in the next test)."""
    positions = draw(st.sampled_from([None, 1, 2]))
    if order == "captures":
        batch = 1 if positions == 2 else draw(st.integers(1, 2))
        d_in, d_out = draw(st.integers(4, 6)), draw(st.integers(4, 6))
    else:
        batch = draw(st.integers(4, 8))
        d_in, d_out = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    lead = (batch,) if positions is None else (batch, positions)
    return lead + (d_in,), lead + (d_out,)


@property_test(
    data=st.data(),
    order=st.sampled_from(["captures", "gradient"]),
    output_factor=st.booleans(),
)
def test_precondition_factored_and_captures_match_precondition_of_the_mean_gradient(
    backend: testing.Backend,
    dtype: np.dtype,
    data: st.DataObject,
    order: str,
    output_factor: bool,
) -> None:
    shape_a, shape_e = _capture_shapes(data.draw, order)
    a, e = normal(data, shape_a, dtype), normal(data, shape_e, dtype)
    d_in, d_out, batch = shape_a[-1], shape_e[-1], shape_a[0]
    a_inv = spd(data, d_in, dtype)
    g_inv = spd(data, d_out, dtype) if output_factor else None
    args = [backend.asarray(v) for v in (a, e, a_inv)] + (
        [backend.asarray(g_inv)] if output_factor else []
    )
    # Reference: ∇W = (1/B) Σ_{i,t} e_itᵀ a_it, then g_inv ∇W a_inv.
    rows_a, rows_e = f64(a).reshape(-1, d_in), f64(e).reshape(-1, d_out)
    mean_grad = rows_e.T @ rows_a / batch
    g_ref = eye(d_out) if g_inv is None else f64(g_inv)
    expected = g_ref @ mean_grad @ f64(a_inv)
    # Sum over N rows (cancellation measured by ‖|E|ᵀ|A|‖/‖EᵀA‖), then SPD products.
    summation = np.linalg.norm(np.abs(rows_e).T @ np.abs(rows_a)) / np.linalg.norm(
        rows_e.T @ rows_a
    )
    condition = rows_a.shape[0] * summation * cond(a_inv) * cond(g_ref)

    result = kron.precondition_factored(*args)
    assert_backend_array(result, backend, dtype)
    assert_close(to_np(backend, result), expected, dtype, condition)
    via_gradient = kron.precondition(backend.asarray(mean_grad.astype(dtype)), *args[2:])
    assert_close(to_np(backend, via_gradient), expected, dtype, condition)

    tilde_a, tilde_e = kron.precondition_captures(*args)
    for value, shape in ((tilde_a, shape_a), (tilde_e, shape_e)):
        assert_backend_array(value, backend, dtype)
        assert tuple(value.shape) == shape
    assert_close(to_np(backend, tilde_a), f64(a) @ f64(a_inv), dtype, cond(a_inv))
    assert_close(to_np(backend, tilde_e), f64(e) @ g_ref, dtype, cond(g_ref))
    product = (
        to_np(backend, tilde_e).reshape(-1, d_out).T @ to_np(backend, tilde_a).reshape(-1, d_in)
    ) / batch
    assert_close(product, expected, dtype, condition)


@pytest.mark.parametrize("order", ["captures", "gradient"])
@given(data=st.data())
def test_capture_shapes_reach_both_orders_of_the_cost_model(
    order: str, data: st.DataObject
) -> None:
    # The multiplication counts documented in precondition_factored's docstring.
    shape_a, shape_e = _capture_shapes(data.draw, order)
    rows = math.prod(shape_a[:-1])
    d_in, d_out = shape_a[-1], shape_e[-1]
    for output in (0, 1):  # FOOF, K-FAC
        factored = rows * (d_in**2 + output * d_out**2 + d_out * d_in)
        dense = rows * d_out * d_in + d_out * d_in**2 + output * d_out**2 * d_in
        assert (factored < dense) == (order == "captures"), (shape_a, shape_e, output)


# --------------------------------------------------------------------------------------
# Identity 11: generalised eigenproblem and sums of Kronecker products
# --------------------------------------------------------------------------------------


@property_test(data=st.data(), kind=st.sampled_from(["semidefinite", "indefinite"]))
def test_generalized_eigh_diagonalises_both_matrices(
    backend: testing.Backend, dtype: np.dtype, data: st.DataObject, kind: str
) -> None:
    n = data.draw(sizes(backend))
    b = spd(data, n, dtype)
    if kind == "semidefinite":
        m = data.draw(testing.psd_matrices(n)).astype(dtype)
    else:
        x = f64(normal(data, (n, n), dtype))
        m = ((x + x.T) / 2).astype(dtype)
    result = kron.generalized_eigh(backend.asarray(m), backend.asarray(b))
    assert isinstance(result, kron.Eigh)
    assert_backend_array(result.values, backend, dtype)
    assert_backend_array(result.vectors, backend, dtype)
    values, vectors = to_np(backend, result.values), to_np(backend, result.vectors)
    assert np.all(np.diff(values) >= 0), values
    # Whitening by the Cholesky factor of b amplifies rounding by ≤ κ(b); the values are
    # bounded by ‖m‖‖b⁻¹‖, the natural scale of the errors in Vᵀ m V.
    condition = n * cond(b)
    assert_close(vectors.T @ f64(b) @ vectors, eye(n), dtype, condition)
    scale = np.linalg.norm(f64(m), 2) * np.linalg.norm(np.linalg.inv(f64(b)), 2)
    limit = rtol(dtype, condition) * max(scale, np.finfo(dtype).tiny)
    assert np.linalg.norm(vectors.T @ f64(m) @ vectors - np.diag(values)) <= limit
    reference = scipy.linalg.eigh(f64(m), f64(b), eigvals_only=True)
    assert np.linalg.norm(values - reference) <= limit


@property_test(
    data=st.data(),
    second=st.sampled_from(["definite", "semidefinite", "zero"]),
    lead=st.sampled_from([(), (2,)]),
)
def test_sum_solve_is_the_exact_solve_with_a_sum_of_kronecker_products(
    backend: testing.Backend,
    dtype: np.dtype,
    data: st.DataObject,
    second: str,
    lead: tuple[int, ...],
) -> None:
    d_in, d_out = data.draw(sizes(backend)), data.draw(sizes(backend))
    a1, g1 = spd(data, d_in, dtype, scales=(1.0,)), spd(data, d_out, dtype, scales=(1.0,))
    if second == "definite":
        a2, g2 = spd(data, d_in, dtype, scales=(1.0,)), spd(data, d_out, dtype, scales=(1.0,))
    elif second == "semidefinite":  # rank 0..n, as factors of a small batch
        a2 = data.draw(testing.psd_matrices(d_in)).astype(dtype)
        g2 = data.draw(testing.psd_matrices(d_out)).astype(dtype)
    else:
        a2, g2 = np.zeros((d_in, d_in), dtype=dtype), np.zeros((d_out, d_out), dtype=dtype)
    grad = normal(data, lead + (d_out, d_in), dtype)
    dense = np.kron(f64(a1), f64(g1)) + np.kron(f64(a2), f64(g2))
    expected = kron_solve(dense, f64(grad))
    # The generalised eigenbasis whitens by A1 and G1: error ≲ max(κ(sum), κ(A1)κ(G1))·eps.
    condition = max(cond(dense), cond(a1) * cond(g1))

    inputs = [backend.asarray(v) for v in (grad, a1, g1, a2, g2)]
    result = kron.sum_solve(*inputs)
    assert_backend_array(result, backend, dtype)
    assert_close(to_np(backend, result), expected, dtype, condition)

    a_eigh = kron.generalized_eigh(inputs[3], inputs[1])
    g_eigh = kron.generalized_eigh(inputs[4], inputs[2])
    reused = kron.sum_eigen_solve(inputs[0], a_eigh, g_eigh)
    assert_backend_array(reused, backend, dtype)
    assert_close(to_np(backend, reused), expected, dtype, condition)
    assert_close(to_np(backend, reused), to_np(backend, result), dtype, condition)

    if second == "zero":  # A1⊗G1 alone: G1⁻¹ grad A1⁻¹
        plain = np.linalg.solve(f64(g1), f64(grad)) @ np.linalg.inv(f64(a1))
        assert_close(to_np(backend, result), plain, dtype, condition)
    if second == "definite":
        # The single product of summed factors (A1 + A2)⊗(G1 + G2) adds A1⊗G2 + A2⊗G1
        # (λ_min ≥ 2 here, against ‖·‖ ≤ (2κ)²): its solve is outside the tolerance, so
        # this test fails for an implementation that uses it.
        approximate = kron_solve(np.kron(f64(a1 + a2), f64(g1 + g2)), f64(grad))
        error = np.linalg.norm(approximate - expected) / np.linalg.norm(expected)
        assert error > 2 * rtol(dtype, condition), error


def test_sum_solve_is_not_the_product_of_summed_factors(
    backend: testing.Backend, dtype: np.dtype
) -> None:
    # A1 = G1 = I, A2 = G2 = diag(1, 2): the sum is diag(2, 3, 3, 5) but the product of summed
    # factors is diag(2, 3)⊗diag(2, 3) = diag(4, 6, 6, 9).
    identity, diagonal = np.eye(2, dtype=dtype), np.diag([1.0, 2.0]).astype(dtype)
    grad = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=dtype)
    cast = backend.asarray
    result = to_np(
        backend,
        kron.sum_solve(cast(grad), cast(identity), cast(identity), cast(diagonal), cast(diagonal)),
    )
    exact = mat(vec(grad) / np.array([2.0, 3.0, 3.0, 5.0]), (2, 2))
    approximate = mat(vec(grad) / np.array([4.0, 6.0, 6.0, 9.0]), (2, 2))
    assert_close(result, exact, dtype, condition=2.5)
    assert np.linalg.norm(result - approximate) > 0.3 * np.linalg.norm(exact)


# --------------------------------------------------------------------------------------
# Cross-cutting: namespace and dtype kept, inputs untouched, jax.jit, errors
# --------------------------------------------------------------------------------------

D_OUT, D_IN = 3, 4


def _fixed_spd(rng: np.random.Generator, n: int, condition: float = 4.0) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    m = (q * np.geomspace(1.0, condition, n)) @ q.T
    return (m + m.T) / 2


def _fixed_psd(rng: np.random.Generator, n: int, rank: int = 2) -> np.ndarray:
    rows = rng.standard_normal((rank, n))
    m = rows.T @ rows / rank
    return (m + m.T) / 2


def _cases() -> dict[str, tuple[tuple[np.ndarray, ...], Callable[..., Any]]]:
    """One call of every public function: NumPy inputs (cast per test) and the call."""
    rng = np.random.default_rng(7)
    a1, g1 = _fixed_spd(rng, D_IN), _fixed_spd(rng, D_OUT)
    a2, g2 = _fixed_psd(rng, D_IN), _fixed_psd(rng, D_OUT)
    grad = rng.standard_normal((D_OUT, D_IN))
    grads = rng.standard_normal((2, D_OUT, D_IN))
    a, e = rng.standard_normal((5, 2, D_IN)), rng.standard_normal((5, 2, D_OUT))
    x = rng.standard_normal((6, D_IN))
    return {
        "factor": ((x,), lambda x: kron.factor(x, bias=True)),
        "ema": ((a1, a2), lambda old, new: kron.ema(old, new, 0.9)),
        "ema_first": ((a1,), lambda new: kron.ema(None, new, 0.9)),
        "debiased_ema": (
            (a1, a2),
            lambda total, new: kron.debiased_ema(kron.DebiasedAverage(total, 0.19), new, 0.9),
        ),
        "debiased_ema_first": ((a1,), lambda new: kron.debiased_ema(None, new, 0.9)),
        "split_damping": ((a1, g1), lambda a, g: kron.split_damping(a, g, 0.3)),
        "inverse": ((a2,), lambda m: kron.inverse(m, 0.1)),
        "inverse_array_damping": ((a2, np.asarray(0.1)), kron.inverse),
        "precondition": ((grads, a1, g1), kron.precondition),
        "precondition_foof": ((grads, a1), kron.precondition),
        "precondition_factored": ((a, e, a1, g1), kron.precondition_factored),
        "precondition_factored_foof": ((a, e, a1), kron.precondition_factored),
        "precondition_captures": ((a, e, a1, g1), kron.precondition_captures),
        "eigh": ((a1,), kron.eigh),
        "generalized_eigh": ((a2, a1), kron.generalized_eigh),
        "eigen_solve": (
            (grads, a1, g1),
            lambda grad, a, g: kron.eigen_solve(grad, kron.eigh(a), kron.eigh(g), 0.1),
        ),
        "eigen_solve_array_damping": (
            (grad, a1, g1, np.asarray(0.1)),
            lambda grad, a, g, damping: kron.eigen_solve(grad, kron.eigh(a), kron.eigh(g), damping),
        ),
        "sum_eigen_solve": (
            (grads, a1, g1, a2, g2),
            lambda grad, a1, g1, a2, g2: kron.sum_eigen_solve(
                grad, kron.generalized_eigh(a2, a1), kron.generalized_eigh(g2, g1)
            ),
        ),
        "sum_solve": ((grad, a1, g1, a2, g2), kron.sum_solve),
    }


CASES = _cases()


def _leaves(output: Any) -> list[Any]:
    """Arrays (and Python numbers) of an output: arrays, tuples, Eigh, DebiasedAverage."""
    if isinstance(output, tuple):
        leaves = [leaf for item in output for leaf in _leaves(item)]
        if isinstance(output, kron.DebiasedAverage):
            leaves += _leaves(output.value)
        return leaves
    return [output]


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_function_keeps_namespace_and_dtype_is_pure_and_jits(
    backend: testing.Backend, dtype: np.dtype, name: str
) -> None:
    inputs, call = CASES[name]
    arrays = [backend.asarray(x.astype(dtype)) for x in inputs]
    before = [np.array(backend.to_numpy(x), copy=True) for x in arrays]
    output = call(*arrays)
    leaves = _leaves(output)
    for leaf in leaves:
        if isinstance(leaf, float):  # DebiasedAverage.weight for a Python decay
            continue
        assert_backend_array(leaf, backend, dtype)
    for x, copy in zip(arrays, before):
        np.testing.assert_array_equal(backend.to_numpy(x), copy)  # inputs never modified
    if backend.jit is None:
        return
    jitted = _leaves(backend.jit(call)(*arrays))
    assert len(jitted) == len(leaves)
    for eager, traced in zip(leaves, jitted):
        if isinstance(eager, float):  # becomes a weakly typed array under jit
            assert float(traced) == pytest.approx(eager, rel=rtol(dtype))
            continue
        assert_backend_array(traced, backend, dtype)
        # Same algorithm, possibly fused differently by XLA: rounding of these small problems
        # (κ ≤ 16 for the solves; the PSD inverse has κ ≤ 1 + ‖a2‖/0.1).
        assert_close(to_np(backend, traced), to_np(backend, eager), dtype, condition=100.0)


# Scalar parameters (damping, decay) given as a NumPy float64 scalar — e.g. the result of
# np.linalg.norm — or as a float64 0-d array must not promote float32 work to float64.
@pytest.mark.parametrize("kind", ["numpy_scalar", "array"])
@pytest.mark.parametrize("name", ["inverse", "eigen_solve", "ema", "debiased_ema", "split_damping"])
def test_scalar_parameters_do_not_change_the_dtype(
    backend: testing.Backend, name: str, kind: str
) -> None:
    m_np = _fixed_spd(np.random.default_rng(3), 3)
    m = backend.asarray(m_np.astype(np.float32))
    if kind == "array":
        scalar = backend.asarray(np.asarray(0.25, dtype=np.float64))
    else:
        scalar = np.float64(0.25)
    output = {
        "inverse": lambda: kron.inverse(m, scalar),
        "eigen_solve": lambda: kron.eigen_solve(m, kron.eigh(m), kron.eigh(m), scalar),
        "ema": lambda: kron.ema(m, m, scalar),
        "debiased_ema": lambda: kron.debiased_ema(None, m, scalar).value,
        "split_damping": lambda: kron.split_damping(m, m, scalar),
    }[name]()
    for leaf in _leaves(output):
        assert_backend_array(leaf, backend, np.dtype(np.float32))
    if name == "inverse":  # and the value is that of the damping
        expected = np.linalg.inv(m_np.astype(np.float32).astype(np.float64) + 0.25 * np.eye(3))
        assert_close(to_np(backend, output), expected, np.dtype(np.float32), condition=4.0)


def _error_cases() -> list[tuple[str, Callable[[Callable], Any], type, str]]:
    """(id, call given a converter to the backend, exception, message pattern naming the
    offending argument)."""
    spd3 = _fixed_spd(np.random.default_rng(1), 3)
    spd2 = _fixed_spd(np.random.default_rng(2), 2)
    grad = np.ones((2, 3))
    square = np.ones((3, 3))
    a, e = np.ones((4, 3)), np.ones((4, 2))
    indefinite = np.diag([1.0, -1.0, 2.0])
    nan3 = spd3.copy()
    nan3[0, 1] = nan3[1, 0] = np.nan
    nan_diagonal = np.diag([1.0, np.nan, 2.0])
    nan_grad = grad.copy()
    nan_grad[1, 2] = np.nan
    inf_a = a.copy()
    inf_a[0, 0] = np.inf
    ints = np.arange(9).reshape(3, 3)
    int_grad = np.ones((3, 3), dtype=np.int64)
    eig = lambda c, m: kron.eigh(c(m))  # noqa: E731
    gen = lambda c, m, b: kron.generalized_eigh(c(m), c(b))  # noqa: E731
    debiased = kron.DebiasedAverage
    E, NPD = ValueError, curvlinalg.NotPositiveDefiniteError
    return [
        # shape mismatches
        ("factor-1d", lambda c: kron.factor(c(np.ones(3))), E, r"\bx\b"),
        ("ema-shapes", lambda c: kron.ema(c(spd3), c(spd2), 0.5), E, r"average.*new"),
        (
            "debiased-shapes",
            lambda c: kron.debiased_ema(debiased(c(spd3), 0.5), c(spd2), 0.5),
            E,
            r"state\.total",
        ),
        ("split-not-square", lambda c: kron.split_damping(c(grad), c(spd2), 1.0), E, r"\ba\b"),
        ("inverse-not-square", lambda c: kron.inverse(c(grad)), E, r"\bm\b"),
        ("precondition-a_inv", lambda c: kron.precondition(c(grad), c(spd2)), E, "a_inv"),
        ("precondition-g_inv", lambda c: kron.precondition(c(grad), c(spd3), c(spd3)), E, "g_inv"),
        (
            "factored-batch",
            lambda c: kron.precondition_factored(c(a), c(np.ones((5, 2))), c(spd3)),
            E,
            r"\ba\b.*\be\b",
        ),
        (
            "factored-a_inv",
            lambda c: kron.precondition_factored(c(a), c(e), c(spd2)),
            E,
            "a_inv",
        ),
        (
            "captures-ndim",
            lambda c: kron.precondition_captures(c(np.ones((4, 2, 3))), c(e), c(spd3)),
            E,
            r"\ba\b.*\be\b",
        ),
        (
            "captures-g_inv",
            lambda c: kron.precondition_captures(c(a), c(e), c(spd3), c(spd3)),
            E,
            "g_inv",
        ),
        ("eigh-not-square", lambda c: kron.eigh(c(grad)), E, r"\bm\b"),
        ("generalized-b", lambda c: gen(c, spd2, spd3), E, r"\bb\b"),
        (
            "eigen_solve-a",
            lambda c: kron.eigen_solve(c(grad), eig(c, spd2), eig(c, spd2), 0.1),
            E,
            "a_eigh",
        ),
        (
            "eigen_solve-g",
            lambda c: kron.eigen_solve(c(grad), eig(c, spd3), eig(c, spd3), 0.1),
            E,
            "g_eigh",
        ),
        (
            "sum_eigen_solve-a",
            lambda c: kron.sum_eigen_solve(c(grad), gen(c, spd2, spd2), gen(c, spd2, spd2)),
            E,
            "a_eigh",
        ),
        (
            "sum_solve-a2",
            lambda c: kron.sum_solve(c(grad), c(spd3), c(spd2), c(spd2), c(spd2)),
            E,
            "a2",
        ),
        (
            "sum_solve-g1",
            lambda c: kron.sum_solve(c(grad), c(spd3), c(spd3), c(spd3), c(spd2)),
            E,
            "g1",
        ),
        # non-floating dtypes
        ("factor-int", lambda c: kron.factor(c(ints)), E, r"\bx\b.*floating"),
        ("inverse-int", lambda c: kron.inverse(c(ints)), E, r"\bm\b.*floating"),
        ("eigh-int", lambda c: kron.eigh(c(ints)), E, r"\bm\b.*floating"),
        ("ema-int", lambda c: kron.ema(c(ints), c(ints), 0.5), E, "floating"),
        ("ema-first-int", lambda c: kron.ema(None, c(ints), 0.5), E, r"new.*floating"),
        ("debiased-int", lambda c: kron.debiased_ema(None, c(ints), 0.5), E, r"new.*floating"),
        ("split-int", lambda c: kron.split_damping(c(ints), c(ints), 1.0), E, r"\ba\b.*floating"),
        ("precondition-int", lambda c: kron.precondition(c(int_grad), c(spd3)), E, r"grad.*float"),
        (
            "factored-int",
            lambda c: kron.precondition_factored(c(a.astype(np.int64)), c(e), c(spd3)),
            E,
            r"\ba\b.*floating",
        ),
        ("generalized-int", lambda c: gen(c, ints, spd3), E, r"\bm\b.*floating"),
        (
            "eigen_solve-int",
            lambda c: kron.eigen_solve(c(int_grad), eig(c, spd3), eig(c, spd3), 0.1),
            E,
            r"grad.*floating",
        ),
        (
            "sum_solve-int",
            lambda c: kron.sum_solve(c(int_grad), *(c(spd3),) * 4),
            E,
            r"grad.*floating",
        ),
        # negative damping, decay out of range
        ("inverse-negative", lambda c: kron.inverse(c(spd3), -0.1), E, "damping"),
        ("split-negative", lambda c: kron.split_damping(c(spd3), c(spd2), -1.0), E, "damping"),
        (
            "eigen_solve-negative",
            lambda c: kron.eigen_solve(c(grad), eig(c, spd3), eig(c, spd2), -1.0),
            E,
            "damping",
        ),
        ("ema-decay", lambda c: kron.ema(c(spd3), c(spd3), 1.5), E, "decay"),
        ("debiased-decay", lambda c: kron.debiased_ema(None, c(spd3), -0.1), E, "decay"),
        # decay = 1 on the first update would give weight 0 and a 0/0 average
        ("debiased-decay-one", lambda c: kron.debiased_ema(None, c(spd3), 1.0), E, "decay"),
        # not positive definite
        ("inverse-indefinite", lambda c: kron.inverse(c(indefinite)), NPD, "positive definite"),
        (
            "inverse-singular",
            lambda c: kron.inverse(c(np.diag([1.0, 0.0, 2.0]))),
            NPD,
            "positive definite",
        ),
        (
            "eigen_solve-indefinite",
            lambda c: kron.eigen_solve(c(square), eig(c, indefinite), eig(c, spd3), 0.0),
            NPD,
            "positive definite",
        ),
        ("generalized-indefinite", lambda c: gen(c, spd3, indefinite), NPD, r"\bb\b"),
        (
            "sum_solve-a1",
            lambda c: kron.sum_solve(c(square), c(indefinite), c(spd3), c(spd3), c(spd3)),
            NPD,
            "a1",
        ),
        (
            "sum_solve-g1",
            lambda c: kron.sum_solve(c(square), c(spd3), c(indefinite), c(spd3), c(spd3)),
            NPD,
            "g1",
        ),
        (
            "sum_solve-sum",
            lambda c: kron.sum_solve(
                c(square), c(np.eye(3)), c(np.eye(3)), c(-2 * np.eye(3)), c(np.eye(3))
            ),
            NPD,
            "positive definite",
        ),
        # NaN or infinite input
        ("factor-nan", lambda c: kron.factor(c(nan3)), E, r"\bx\b.*NaN"),
        ("inverse-nan", lambda c: kron.inverse(c(nan3)), E, r"\bm\b.*NaN"),
        ("eigh-nan", lambda c: kron.eigh(c(nan3)), E, r"\bm\b.*NaN"),
        (
            "split-nan",
            lambda c: kron.split_damping(c(nan_diagonal), c(spd2), 1.0),
            E,
            r"\ba\b.*NaN",
        ),
        ("precondition-nan", lambda c: kron.precondition(c(nan_grad), c(spd3)), E, r"grad.*NaN"),
        (
            "factored-inf",
            lambda c: kron.precondition_factored(c(inf_a), c(e), c(spd3)),
            E,
            r"\ba\b.*NaN",
        ),
        (
            "captures-nan",
            lambda c: kron.precondition_captures(c(a), c(np.full((4, 2), np.nan)), c(spd3)),
            E,
            r"\be\b.*NaN",
        ),
        ("generalized-nan", lambda c: gen(c, spd3, nan3), E, r"\bb\b.*NaN"),
        (
            "eigen_solve-nan",
            lambda c: kron.eigen_solve(c(nan_grad), eig(c, spd3), eig(c, spd2), 0.1),
            E,
            r"grad.*NaN",
        ),
        (
            "sum_eigen_solve-nan",
            lambda c: kron.sum_eigen_solve(c(nan_grad), gen(c, spd3, spd3), gen(c, spd2, spd2)),
            E,
            r"grad.*NaN",
        ),
        (
            "sum_solve-nan",
            lambda c: kron.sum_solve(c(grad), c(spd3), c(spd2), c(nan3), c(spd2)),
            E,
            r"a2.*NaN",
        ),
    ]


ERROR_CASES = _error_cases()


@pytest.mark.parametrize(
    "call, error, pattern",
    [case[1:] for case in ERROR_CASES],
    ids=[case[0] for case in ERROR_CASES],
)
def test_bad_input_raises_a_value_error_naming_the_argument(
    backend: testing.Backend, call: Callable, error: type, pattern: str
) -> None:
    with pytest.raises(error, match=pattern):
        call(backend.asarray)


def test_not_positive_definite_error_is_a_value_error() -> None:
    assert issubclass(curvlinalg.NotPositiveDefiniteError, ValueError)
    assert kron.NotPositiveDefiniteError is curvlinalg.NotPositiveDefiniteError


def test_check_finite_false_skips_the_scan(backend: testing.Backend) -> None:
    grad = np.ones((2, 3))
    grad[0, 0] = np.nan
    result = backend.to_numpy(
        kron.precondition(backend.asarray(grad), backend.asarray(np.eye(3)), check_finite=False)
    )
    assert np.isnan(result[0, 0]) and np.isfinite(result[1]).all()


# Functions with two or more array inputs: mixed namespaces and mixed dtypes.
MULTI_INPUT = {
    "ema": lambda arr: kron.ema(arr[0], arr[1], 0.5),
    "debiased_ema": lambda arr: kron.debiased_ema(kron.DebiasedAverage(arr[0], 0.5), arr[1], 0.5),
    "split_damping": lambda arr: kron.split_damping(arr[0], arr[1], 1.0),
    "precondition": lambda arr: kron.precondition(arr[0], arr[1], arr[2]),
    "precondition_factored": lambda arr: kron.precondition_factored(arr[3], arr[4], arr[1], arr[2]),
    "precondition_captures": lambda arr: kron.precondition_captures(arr[3], arr[4], arr[1], arr[2]),
    "generalized_eigh": lambda arr: kron.generalized_eigh(arr[1], arr[2]),
    "eigen_solve": lambda arr: kron.eigen_solve(arr[0], kron.eigh(arr[1]), kron.eigh(arr[2]), 0.1),
    "sum_eigen_solve": lambda arr: kron.sum_eigen_solve(
        arr[0], kron.generalized_eigh(arr[1], arr[2]), kron.generalized_eigh(arr[2], arr[1])
    ),
    "sum_solve": lambda arr: kron.sum_solve(arr[0], arr[1], arr[2], arr[1], arr[2]),
}


def _multi_inputs() -> list[np.ndarray]:
    """[grad (3, 3), spd, spd, a (4, 3), e (4, 3)] — every square size is 3."""
    rng = np.random.default_rng(5)
    return [
        rng.standard_normal((3, 3)),
        _fixed_spd(rng, 3),
        _fixed_spd(rng, 3),
        rng.standard_normal((4, 3)),
        rng.standard_normal((4, 3)),
    ]


def _positions(name: str) -> list[int]:
    return {
        "ema": [0, 1],
        "debiased_ema": [0, 1],
        "split_damping": [0, 1],
        "precondition": [0, 1, 2],
        "precondition_factored": [3, 4, 1, 2],
        "precondition_captures": [3, 4, 1, 2],
        "generalized_eigh": [1, 2],
        "eigen_solve": [0, 1, 2],
        "sum_eigen_solve": [0, 1, 2],
        "sum_solve": [0, 1, 2],
    }[name]


@pytest.mark.parametrize("name", sorted(MULTI_INPUT))
def test_mixed_namespaces_raise(name: str) -> None:
    torch = pytest.importorskip("torch")
    inputs = _multi_inputs()
    call = MULTI_INPUT[name]
    assert call([torch.asarray(x) for x in inputs]) is not None  # valid when not mixed
    for odd in _positions(name):
        arrays = [np.asarray(x) if i == odd else torch.asarray(x) for i, x in enumerate(inputs)]
        with pytest.raises(ValueError, match="different libraries"):
            call(arrays)


@pytest.mark.parametrize("name", sorted(MULTI_INPUT))
def test_mixed_dtypes_raise(backend: testing.Backend, name: str) -> None:
    inputs = _multi_inputs()
    call = MULTI_INPUT[name]
    for odd in _positions(name):
        arrays = [
            backend.asarray(x.astype(np.float32 if i == odd else np.float64))
            for i, x in enumerate(inputs)
        ]
        with pytest.raises(ValueError, match="dtype mismatch"):
            call(arrays)


# --------------------------------------------------------------------------------------
# input_factor: K-FAC's A with positions summed (KFC's scale)
# --------------------------------------------------------------------------------------


@property_test(
    data=st.data(),
    batch=st.integers(1, 4),
    positions=st.sampled_from([None, 1, 3]),
    bias=st.booleans(),
)
def test_input_factor_sums_positions_and_averages_examples(
    backend: testing.Backend,
    dtype: np.dtype,
    data: st.DataObject,
    batch: int,
    positions: int | None,
    bias: bool,
) -> None:
    width = data.draw(sizes(backend))
    shape = (batch, width) if positions is None else (batch, positions, width)
    x = normal(data, shape, dtype)
    x_backend = backend.asarray(x)
    result = kron.input_factor(x_backend, bias=bias)
    assert_backend_array(result, backend, dtype)
    rows = f64(x).reshape(batch, -1, width)
    if bias:
        rows = np.concatenate([rows, np.ones(rows.shape[:2] + (1,))], axis=2)
    # A = Σ_{i,t} a_it a_itᵀ / B, written as the mean over examples of each example's sum.
    expected = sum(rows[i].T @ rows[i] for i in range(batch)) / batch
    out = backend.to_numpy(result)
    assert np.array_equal(out, out.T)
    count = rows.shape[0] * rows.shape[1]
    assert_close(out, expected, dtype, condition=count * math.sqrt(width + bias) / 8)
    if backend.jit is not None:
        traced = backend.jit(lambda a: kron.input_factor(a, bias=bias))(x_backend)
        assert_close(to_np(backend, traced), out, dtype, condition=count)
    np.testing.assert_array_equal(backend.to_numpy(x_backend), x)  # input untouched


def test_input_factor_bad_input_names_a(backend: testing.Backend) -> None:
    nan = np.ones((2, 3, 2))
    nan[1, 2, 0] = np.nan
    for bad, pattern in (
        (np.ones(3), r"\ba\b.*\(B, d\)"),
        (np.ones((2, 2, 2, 2)), r"\ba\b.*\(B, d\)"),
        (np.ones((0, 3, 2)), r"\ba\b has no examples"),
        (nan, r"\ba\b.*NaN"),
        (np.ones((2, 2), dtype=np.int64), r"\ba\b.*floating"),
    ):
        with pytest.raises(ValueError, match=pattern):
            kron.input_factor(backend.asarray(bad))
