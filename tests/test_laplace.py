r"""Property-based tests of :mod:`curvlinalg.laplace` against dense NumPy references.

Conventions (API.md, DESIGN.md): ``captures`` is a list of ``(a, e)`` per layer, ``a`` of shape
``(B, d_in)`` or ``(B, T, d_in)``, ``e`` of shape ``(B, d_out)`` or ``(B, T, d_out)``; the
per-example gradient is ``g_i = Σ_t e_itᵀ a_it`` (``d_out×d_in``); ``G`` is the ``D×B`` matrix
with columns ``vec(g_i)``, all layers stacked, ``vec`` column-major
(``M.reshape(-1, order="F")``), so ``(A⊗G) vec(V) = vec(G V A)``. The posterior precision is
``Λ = τI + n·(1/B)·G Gᵀ`` (``τ`` = prior_precision, ``n`` = n_data).

References never call curvlinalg: ``G`` is built with ``np.einsum`` from the captures, ``Λ``,
``Λ⁻¹``, ``log det Λ`` and ``n·A⊗G + τI`` densely, and the exact log evidence of a
linear-Gaussian model as the log density of ``N(0, I + XXᵀ/τ)``.

Covariances are checked *exactly*: both samplers are linear in their noise, so feeding the
rows of an identity matrix as noise gives the matrix ``M`` of the sampler (``X = Mᵀ``) and
``XᵀX = M Mᵀ`` is the covariance (NOTES.md §6 identity 17, Benzing 2022 App. C.1). Seeded
Monte-Carlo checks with many samples (NumPy only) complement them.

Tolerances: :func:`tests.conftest.assert_close` (``32·condition·eps``). For the subsampled
sampler the condition is ``(λ_max(Λ)/τ)·sqrt(λ_min(Λ)/τ)``: the sampler solves with
``U = I + VᵀV`` (``κ(U) ≤ λ_max(Λ)/τ``), so its map ``M`` has absolute error ``≲ κ(U)·eps/√τ``,
and ``‖δ(MMᵀ)‖/‖MMᵀ‖ ≲ 2‖δM‖/‖M‖`` with ``‖M‖ = λ_min(Λ)^{-1/2}``. This bound is ``≥ κ(Λ)``
(it equals ``κ(Λ)`` when ``B < D``) and covers the cancellation in ``y − V U⁻¹Vᵀy`` when
``B > D`` and ``n`` is large. Eigenbasis (Kronecker) results are exact for backward-perturbed
factors: condition ``κ(n·A⊗G + τI)``. Log-determinants are compared absolutely:
``|δ log det Λ| = |Σ δλ_i/λ_i| ≤ rtol·(D + Σ|log λ_i|)`` (eigenvalue perturbations plus the
rounding of the sum). float32 draws use moderate ``τ`` and ``n`` so that these stay small.

Every property test runs over the ``backend`` and ``dtype`` fixtures of ``conftest.py``; on JAX
the functions are called under ``jax.jit`` (τ and n traced) with few distinct shapes, and eager
JAX is covered by the cross-cutting tests at the end.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import strategies as st

import curvlinalg
from curvlinalg import laplace, testing
from tests import references
from tests.conftest import assert_backend_array, assert_close, rtol
from tests.references import f64, to_np

property_test = references.property_tests(references.quarter_on_jax)

F32 = np.dtype(np.float32)
F64 = np.dtype(np.float64)


_JITTED: dict[Callable, Callable] = {}


def evaluate(backend: testing.Backend, function: Callable, *args: Any) -> Any:
    """``function(*args)``; on JAX through ``jax.jit`` with every argument traced (Python
    scalars τ and n become weakly typed tracers). Eager JAX compiles each operation once per new
    shape (seconds per example here), a jitted function once per shape; eager JAX is covered by
    the cross-cutting tests, which use fixed shapes."""
    if backend.jit is None:
        return function(*args)
    if function not in _JITTED:
        _JITTED[function] = backend.jit(function)
    return _JITTED[function](*args)


def sizes(backend: testing.Backend, low: int = 1, high: int = 4) -> st.SearchStrategy[int]:
    """Matrix sizes; two values only on JAX, so that compiled shapes repeat."""
    return st.sampled_from([low, high]) if backend.name == "jax" else st.integers(low, high)


# --------------------------------------------------------------------------------------
# Dense references (none of them calls curvlinalg)
# --------------------------------------------------------------------------------------

Captures = Sequence[tuple[np.ndarray, np.ndarray]]


def shapes(captures: Captures) -> list[tuple[int, int]]:
    """``(d_out, d_in)`` per layer."""
    return [(int(e.shape[-1]), int(a.shape[-1])) for a, e in captures]


def num_params(captures: Captures) -> int:
    return sum(d_out * d_in for d_out, d_in in shapes(captures))


def vec_rows(x: np.ndarray) -> np.ndarray:
    """Column-major vec of each matrix of a stack ``(S, r, c)`` → ``(S, r·c)``."""
    x = f64(x)
    return np.swapaxes(x, -1, -2).reshape(x.shape[0], -1)


def mat_rows(rows: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`vec_rows`: ``(S, r·c)`` → ``(S, r, c)``."""
    r, c = shape
    return np.swapaxes(np.asarray(rows).reshape(rows.shape[0], c, r), -1, -2)


def flatten(samples: Sequence[np.ndarray]) -> np.ndarray:
    """Per-layer ``(S, d_out, d_in)`` samples → the ``(S, D)`` matrix of stacked vecs."""
    return np.concatenate([vec_rows(x) for x in samples], axis=1)


def dense_g(captures: Captures) -> np.ndarray:
    """``G`` (``D×B``): column ``i`` is ``vec(g_i)``, ``g_i = Σ_t e_itᵀ a_it``, layers stacked."""
    columns = []
    for a, e in captures:
        a3, e3 = (f64(a), f64(e)) if np.ndim(a) == 3 else (f64(a)[:, None], f64(e)[:, None])
        columns.append(vec_rows(np.einsum("bto,bti->boi", e3, a3)))
    return np.concatenate(columns, axis=1).T


def dense_precision(captures: Captures, tau: float, n: float) -> np.ndarray:
    g = dense_g(captures)
    batch = g.shape[1]
    return tau * np.eye(g.shape[0]) + (n / batch) * g @ g.T


def posterior_condition(precision: np.ndarray, tau: float) -> float:
    """``(λ_max(Λ)/τ)·sqrt(λ_min(Λ)/τ)`` — see the module docstring."""
    values = np.linalg.eigvalsh(precision)
    return float(values[-1] / tau * math.sqrt(values[0] / tau))


def basis_noise(captures: Captures, extra: np.ndarray | None = None):
    """Noise ``(y, z)`` whose ``S = D + B`` stacked rows ``[vec(y_1) … vec(y_L), z]`` are the rows
    of the identity, followed by the rows of ``extra`` (``(K, D + B)``) if given."""
    size = num_params(captures) + int(captures[0][0].shape[0])
    rows = np.eye(size) if extra is None else np.concatenate([np.eye(size), extra])
    y, offset = [], 0
    for shape in shapes(captures):
        width = shape[0] * shape[1]
        y.append(mat_rows(rows[:, offset : offset + width], shape))
        offset += width
    return y, rows[:, offset:]


def logdet_tolerance(dtype: np.dtype, condition: float, values: np.ndarray) -> float:
    """Absolute tolerance for a log-determinant with eigenvalues ``values``."""
    return rtol(dtype, condition) * (len(values) + float(np.sum(np.abs(np.log(values)))))


def kron_dense(a: np.ndarray, g: np.ndarray, tau: float, n: float) -> np.ndarray:
    """``n·A⊗G + τI`` in the column-major convention ``(A⊗G) vec(V) = vec(G V A)``."""
    return n * np.kron(f64(a), f64(g)) + tau * np.eye(a.shape[0] * g.shape[0])


def test_references_follow_the_conventions() -> None:
    """The dense helpers themselves: vec convention, G from the captures, basis noise."""
    rng = np.random.default_rng(0)
    a, g, v = rng.standard_normal((3, 3)), rng.standard_normal((2, 2)), rng.standard_normal((2, 3))
    a = a + a.T
    assert np.allclose(np.kron(a, g) @ vec_rows(v[None])[0], vec_rows((g @ v @ a)[None])[0])
    assert np.allclose(mat_rows(vec_rows(v[None]), (2, 3))[0], v)
    captures = [(rng.standard_normal((4, 2, 3)), rng.standard_normal((4, 2, 2)))]
    big_g = dense_g(captures)
    explicit = sum(np.outer(captures[0][1][0, t], captures[0][0][0, t]) for t in range(2))
    assert np.allclose(big_g[:, 0], explicit.reshape(-1, order="F"))
    y, z = basis_noise(captures)
    assert np.array_equal(np.concatenate([flatten(y), z], axis=1), np.eye(6 + 4))


# --------------------------------------------------------------------------------------
# Drawing problems
# --------------------------------------------------------------------------------------

MAX_BATCH = 3 * 3 * 3 + 3  # three layers of width ≤ 3 hold ≤ 27 parameters
TAUS = {F32: [0.5, 1.0, 4.0], F64: [0.1, 0.5, 1.0, 4.0]}


def n_choices(dtype: np.dtype, batch: int) -> list[float]:
    """``n_data``: zero (the prior), ints and a float, up to 50 (float64) or 2·B (float32)."""
    if np.dtype(dtype) == F32:
        return [0, 1, batch, 2.5]
    return [0, 1, batch, 2.5, 50]


@st.composite
def problems(
    draw: Callable, dtype: np.dtype, regime: str, positions: int | None, small: bool = False
):
    """``(captures, τ, n)`` in ``dtype``: ``B < D`` (``B ≤ D`` when ``D = 1``) or ``B > D``.
    ``small`` (JAX): one shape per regime, two layers of width 2 (D = 8, B = 3 or 10)."""
    full = draw(
        testing.captures(
            num_layers=st.just(2) if small else st.integers(1, 3 if regime == "B<D" else 2),
            batch_size=MAX_BATCH,
            width=st.just(2) if small else st.integers(1, 3),
            positions=positions,
        )
    )
    params = num_params(full)
    if small:
        batch = 3 if regime == "B<D" else params + 2
    elif regime == "B<D":
        batch = draw(st.integers(1, max(1, params - 1)))
    else:
        batch = draw(st.integers(params + 1, params + 3))
    captures = [(a[:batch].astype(dtype), e[:batch].astype(dtype)) for a, e in full]
    tau = draw(st.sampled_from(TAUS[np.dtype(dtype)]))
    n = draw(st.sampled_from(n_choices(dtype, batch)))
    return captures, tau, n


def to_backend(backend: testing.Backend, captures: Captures) -> list[tuple[Any, Any]]:
    return [(backend.asarray(a), backend.asarray(e)) for a, e in captures]


REGIMES = st.sampled_from(["B<D", "B>D"])
POSITIONS = st.sampled_from([None, 1, 3])


# --------------------------------------------------------------------------------------
# sample: exact covariance Λ⁻¹ (identity 17), linearity
# --------------------------------------------------------------------------------------


@property_test(data=st.data(), regime=REGIMES, positions=POSITIONS)
def test_sample_covariance_is_the_inverse_posterior_precision(
    backend: testing.Backend,
    dtype: np.dtype,
    data: st.DataObject,
    regime: str,
    positions: int | None,
) -> None:
    small = backend.name == "jax"
    captures, tau, n = data.draw(problems(dtype, regime, positions if not small else 3, small))
    batch, params = int(captures[0][0].shape[0]), num_params(captures)
    precision = dense_precision(captures, tau, n)
    condition = posterior_condition(precision, tau)
    # Two random noise rows after the basis rows: the sampler must be linear in (y, z).
    extra = data.draw(testing.arrays((2, params + batch)))
    y, z = basis_noise(captures, extra)

    result = evaluate(
        backend,
        laplace.sample,
        to_backend(backend, captures),
        tau,
        n,
        [backend.asarray(v.astype(dtype)) for v in y],
        backend.asarray(z.astype(dtype)),
    )
    assert isinstance(result, (list, tuple)) and len(result) == len(captures)
    for x, shape in zip(result, shapes(captures)):
        assert_backend_array(x, backend, dtype)
        assert tuple(x.shape) == (params + batch + 2, *shape)
    samples = flatten([to_np(backend, x) for x in result])
    basis, random = samples[: params + batch], samples[params + batch :]

    # Cov = M Mᵀ = XᵀX with X the samples of the basis rows.
    covariance = np.linalg.inv(precision)
    assert_close(basis.T @ basis, covariance, dtype, condition)
    # Linearity: sample(r) = M r = Xᵀ r for the random rows r (no offset, no nonlinearity).
    assert_close(random, extra @ basis, dtype, condition * math.sqrt(params + batch))

    # Identity 17: the unscaled x = √τ·sample has Cov(x) = I − V U⁻¹ Vᵀ with
    # V = sqrt(n/(Bτ))·G, U = I + VᵀV (Benzing App. C.1 with Λ_p = τI, F = GGᵀ/B).
    v = math.sqrt(n / (batch * tau)) * dense_g(captures)
    u = np.eye(batch) + v.T @ v
    identity_17 = np.eye(params) - v @ np.linalg.solve(u, v.T)
    assert_close(tau * basis.T @ basis, identity_17, dtype, condition)


def test_sample_covariance_catches_a_missing_batch_scale() -> None:
    """The exact check has power: Λ⁻¹ with ``n·GGᵀ`` instead of ``(n/B)·GGᵀ`` is far off."""
    rng = np.random.default_rng(11)
    captures = [(rng.standard_normal((4, 3)), rng.standard_normal((4, 2)))]
    y, z = basis_noise(captures)
    samples = flatten(laplace.sample(captures, 1.0, 10, y, z))
    exact = np.linalg.inv(dense_precision(captures, 1.0, 10))
    wrong = np.linalg.inv(dense_precision(captures, 1.0, 40))
    assert_close(samples.T @ samples, exact, F64, posterior_condition(exact, 1.0))
    assert np.linalg.norm(samples.T @ samples - wrong) > 0.1 * np.linalg.norm(exact)


@property_test(data=st.data())
def test_sample_without_data_is_the_prior(
    backend: testing.Backend, dtype: np.dtype, data: st.DataObject
) -> None:
    """``n_data = 0``: ``Λ = τI`` and the sample is ``y/√τ`` whatever ``z`` is."""
    small = backend.name == "jax"
    captures, tau, _ = data.draw(problems(dtype, "B<D", None, small))
    count = data.draw(st.just(2) if small else st.integers(1, 3))
    y = [data.draw(testing.arrays((count, *shape), dtype=dtype)) for shape in shapes(captures)]
    z = data.draw(testing.arrays((count, int(captures[0][0].shape[0])), dtype=dtype))
    result = evaluate(
        backend,
        laplace.sample,
        to_backend(backend, captures),
        tau,
        0,
        [backend.asarray(v) for v in y],
        backend.asarray(z),
    )
    for x, noise in zip(result, y):
        assert_close(to_np(backend, x), f64(noise) / math.sqrt(tau), dtype)


# --------------------------------------------------------------------------------------
# kron_sample: exact covariance (n·A⊗G + τI)⁻¹
# --------------------------------------------------------------------------------------


@property_test(
    data=st.data(),
    kind=st.sampled_from(["spd", "psd"]),
    tau=st.sampled_from([0.1, 1.0, 4.0]),
    n=st.sampled_from([0, 1, 3.5, 20]),
)
def test_kron_sample_covariance_is_the_inverse_kronecker_precision(
    backend: testing.Backend,
    dtype: np.dtype,
    data: st.DataObject,
    kind: str,
    tau: float,
    n: float,
) -> None:
    d_out, d_in = data.draw(sizes(backend)), data.draw(sizes(backend))
    if kind == "spd":
        bound = 10.0 if dtype == F32 else 100.0
        a = data.draw(testing.spd_matrices(d_in, max_condition=bound, scales=(0.1, 1.0)))
        g = data.draw(testing.spd_matrices(d_out, max_condition=bound, scales=(0.1, 1.0)))
    else:  # Kronecker factors of a batch smaller than the widths
        a, g = data.draw(testing.psd_matrices(d_in)), data.draw(testing.psd_matrices(d_out))
    a, g = a.astype(dtype), g.astype(dtype)
    precision = kron_dense(a, g, tau, n)
    condition = float(np.linalg.cond(precision))
    params = d_in * d_out
    extra = data.draw(testing.arrays((2, params)))
    rows = np.concatenate([np.eye(params), extra])

    result = evaluate(
        backend,
        laplace.kron_sample,
        backend.asarray(a),
        backend.asarray(g),
        tau,
        n,
        backend.asarray(mat_rows(rows, (d_out, d_in)).astype(dtype)),
    )
    assert_backend_array(result, backend, dtype)
    assert tuple(result.shape) == (params + 2, d_out, d_in)
    samples = vec_rows(to_np(backend, result))
    basis, random = samples[:params], samples[params:]
    assert_close(basis.T @ basis, np.linalg.inv(precision), dtype, condition)
    assert_close(random, extra @ basis, dtype, condition * math.sqrt(params))


def test_kron_sample_catches_the_transposed_kronecker_convention() -> None:
    """With ``d_in ≠ d_out`` the row-major reading ``G⊗A`` gives another covariance."""
    rng = np.random.default_rng(3)
    a = (lambda m: m @ m.T + np.eye(3))(rng.standard_normal((3, 3)))
    g = (lambda m: m @ m.T + np.eye(2))(rng.standard_normal((2, 2)))
    samples = vec_rows(laplace.kron_sample(a, g, 0.5, 2, mat_rows(np.eye(6), (2, 3))))
    exact = np.linalg.inv(kron_dense(a, g, 0.5, 2))
    swapped = np.linalg.inv(2 * np.kron(g, a) + 0.5 * np.eye(6))
    assert_close(samples.T @ samples, exact, F64, float(np.linalg.cond(exact)))
    assert np.linalg.norm(samples.T @ samples - swapped) > 0.1 * np.linalg.norm(exact)


@property_test(data=st.data(), tau=st.sampled_from([0.5, 2.0]), n=st.sampled_from([1, 7]))
def test_one_example_sample_and_kron_sample_agree(
    backend: testing.Backend, dtype: np.dtype, data: st.DataObject, tau: float, n: float
) -> None:
    """Identity 2: for ``B = 1``, ``GGᵀ = (aaᵀ)⊗(eeᵀ)``, so both samplers have one covariance
    (the maps differ — ``sample`` also draws ``z`` — so compare covariances)."""
    d_out, d_in = data.draw(sizes(backend, 1, 3)), data.draw(sizes(backend, 1, 3))
    a = data.draw(testing.arrays((1, d_in), dtype=dtype))
    e = data.draw(testing.arrays((1, d_out), dtype=dtype))
    captures = [(a, e)]
    y, z = basis_noise(captures)
    subsampled = evaluate(
        backend,
        laplace.sample,
        to_backend(backend, captures),
        tau,
        n,
        [backend.asarray(v.astype(dtype)) for v in y],
        backend.asarray(z.astype(dtype)),
    )
    factor_a, factor_g = f64(a).T @ f64(a), f64(e).T @ f64(e)
    kronecker = evaluate(
        backend,
        laplace.kron_sample,
        backend.asarray(factor_a.astype(dtype)),
        backend.asarray(factor_g.astype(dtype)),
        tau,
        n,
        backend.asarray(mat_rows(np.eye(d_in * d_out), (d_out, d_in)).astype(dtype)),
    )
    x_sub = flatten([to_np(backend, x) for x in subsampled])
    x_kron = vec_rows(to_np(backend, kronecker))
    precision = kron_dense(factor_a, factor_g, tau, n)
    assert_close(x_sub.T @ x_sub, x_kron.T @ x_kron, dtype, posterior_condition(precision, tau))


# --------------------------------------------------------------------------------------
# Monte-Carlo checks (NumPy only): empirical covariance within Wishart error bars, mean ≈ 0
# --------------------------------------------------------------------------------------

MC_SAMPLES = 20000


def assert_gaussian_moments(
    samples: np.ndarray, covariance: np.ndarray, sigmas: float = 5.0
) -> float:
    """Entry-wise: ``|mean_i| ≤ k·sqrt(Σ_ii/S)`` and
    ``|Ĉ_ij − Σ_ij| ≤ k·sqrt((Σ_iiΣ_jj + Σ_ij²)/S)``
    for the empirical second moment ``Ĉ = XᵀX/S`` about the known mean 0 (its standard
    deviation). Returns the largest z-score of the covariance."""
    mean_sd = np.sqrt(np.diag(covariance) / samples.shape[0])
    assert np.all(np.abs(samples.mean(axis=0)) <= sigmas * mean_sd), "mean is not 0"
    score = max_z_score(samples, covariance)
    assert score <= sigmas, f"covariance z-score {score:.2f} > {sigmas}"
    return score


def max_z_score(samples: np.ndarray, covariance: np.ndarray) -> float:
    """Largest ``|Ĉ_ij − Σ_ij| / sd(Ĉ_ij)`` (Wishart standard deviation, known mean 0)."""
    count = samples.shape[0]
    diagonal = np.diag(covariance)
    sd = np.sqrt((np.outer(diagonal, diagonal) + covariance**2) / count)
    return float((np.abs(samples.T @ samples / count - covariance) / sd).max())


@pytest.mark.parametrize(
    "batch, widths, positions, tau, n",
    [
        (3, (3, 2, 2), None, 1.0, 30),  # B = 3 < D = 10, two layers
        (12, (2, 2), None, 0.5, 12),  # B = 12 > D = 4
        (4, (3, 2), 2, 2.0, 100),  # (B, T, ·) captures, B = 4 < D = 6
    ],
)
def test_sample_monte_carlo_moments(
    batch: int, widths: tuple[int, ...], positions: int | None, tau: float, n: float
) -> None:
    rng = np.random.default_rng(2024 + batch)
    lead = (batch,) if positions is None else (batch, positions)
    captures = [
        (
            rng.standard_normal(lead + (d_in,)),
            rng.standard_normal(lead + (d_out,)) / math.sqrt(d_out),
        )
        for d_in, d_out in zip(widths[:-1], widths[1:])
    ]
    y = [rng.standard_normal((MC_SAMPLES, *shape)) for shape in shapes(captures)]
    z = rng.standard_normal((MC_SAMPLES, batch))
    samples = flatten(laplace.sample(captures, tau, n, y, z))
    precision = dense_precision(captures, tau, n)
    assert_gaussian_moments(samples, np.linalg.inv(precision))
    # Identity 17 as a Monte-Carlo statement about the unscaled x = √τ·sample.
    v = math.sqrt(n / (batch * tau)) * dense_g(captures)
    covariance_x = np.eye(v.shape[0]) - v @ np.linalg.solve(np.eye(batch) + v.T @ v, v.T)
    assert_gaussian_moments(math.sqrt(tau) * samples, covariance_x)
    # Power: the prior covariance I/τ and the covariance without the 1/B are rejected.
    assert max_z_score(samples, np.eye(v.shape[0]) / tau) > 10
    if batch > 1:
        assert max_z_score(samples, np.linalg.inv(dense_precision(captures, tau, n * batch))) > 10


@pytest.mark.parametrize("psd", [False, True])
def test_kron_sample_monte_carlo_moments(psd: bool) -> None:
    rng = np.random.default_rng(7 + psd)
    d_out, d_in = 2, 3
    rows_a, rows_g = rng.standard_normal((2 if psd else 6, d_in)), rng.standard_normal((4, d_out))
    a, g = rows_a.T @ rows_a / len(rows_a), rows_g.T @ rows_g / len(rows_g)
    tau, n = 0.5, 10
    y = rng.standard_normal((MC_SAMPLES, d_out, d_in))
    samples = vec_rows(laplace.kron_sample(a, g, tau, n, y))
    covariance = np.linalg.inv(kron_dense(a, g, tau, n))
    assert_gaussian_moments(samples, covariance)
    assert max_z_score(samples, np.linalg.inv(n * np.kron(g, a) + tau * np.eye(6))) > 10


# --------------------------------------------------------------------------------------
# logdet, kron_logdet
# --------------------------------------------------------------------------------------


@property_test(data=st.data(), regime=REGIMES, positions=POSITIONS)
def test_logdet_is_the_dense_log_determinant(
    backend: testing.Backend,
    dtype: np.dtype,
    data: st.DataObject,
    regime: str,
    positions: int | None,
) -> None:
    small = backend.name == "jax"
    captures, tau, n = data.draw(problems(dtype, regime, positions if not small else 3, small))
    precision = dense_precision(captures, tau, n)
    sign, expected = np.linalg.slogdet(precision)
    assert sign > 0
    result = evaluate(backend, laplace.logdet, to_backend(backend, captures), tau, n)
    assert_backend_array(result, backend, dtype)
    assert tuple(result.shape) == ()
    values = np.linalg.eigvalsh(precision)
    limit = logdet_tolerance(dtype, posterior_condition(precision, tau), values)
    assert abs(float(to_np(backend, result)) - expected) <= limit, (float(result), expected, limit)


@property_test(
    data=st.data(),
    kind=st.sampled_from(["spd", "psd"]),
    tau=st.sampled_from([0.1, 1.0, 4.0]),
    n=st.sampled_from([0, 1, 3.5, 20]),
)
def test_kron_logdet_is_the_dense_log_determinant(
    backend: testing.Backend,
    dtype: np.dtype,
    data: st.DataObject,
    kind: str,
    tau: float,
    n: float,
) -> None:
    d_out, d_in = data.draw(sizes(backend)), data.draw(sizes(backend))
    if kind == "spd":
        a = data.draw(testing.spd_matrices(d_in, max_condition=100.0, scales=(0.1, 1.0)))
        g = data.draw(testing.spd_matrices(d_out, max_condition=100.0, scales=(0.1, 1.0)))
    else:
        a, g = data.draw(testing.psd_matrices(d_in)), data.draw(testing.psd_matrices(d_out))
    a, g = a.astype(dtype), g.astype(dtype)
    precision = kron_dense(a, g, tau, n)
    sign, expected = np.linalg.slogdet(precision)
    assert sign > 0
    result = evaluate(backend, laplace.kron_logdet, backend.asarray(a), backend.asarray(g), tau, n)
    assert_backend_array(result, backend, dtype)
    assert tuple(result.shape) == ()
    values = np.linalg.eigvalsh(precision)
    limit = logdet_tolerance(dtype, float(np.linalg.cond(precision)), values)
    assert abs(float(to_np(backend, result)) - expected) <= limit, (float(result), expected, limit)


@property_test(
    data=st.data(), tau=st.sampled_from([0.5, 2.0]), positions=st.sampled_from([None, 2])
)
def test_logdet_of_one_output_layer_equals_kron_logdet(
    backend: testing.Backend,
    dtype: np.dtype,
    data: st.DataObject,
    tau: float,
    positions: int | None,
) -> None:
    """A linear layer with ``d_out = 1`` and ``e = 1`` (without positions): ``GGᵀ/B = (aᵀa/B)⊗[1]``,
    so the subsampled and the Kronecker log-determinants coincide. With positions
    ``g_i = Σ_t a_it`` and the Kronecker factor is that of the position sums."""
    batch, d_in = data.draw(sizes(backend, 1, 6)), data.draw(sizes(backend, 1, 5))
    lead = (batch,) if positions is None else (batch, positions)
    a = data.draw(testing.arrays(lead + (d_in,), dtype=dtype))
    e = np.ones(lead + (1,), dtype=dtype)
    rows = f64(a) if positions is None else f64(a).sum(axis=1)
    factor_a = rows.T @ rows / batch
    n = float(batch)
    subsampled = evaluate(backend, laplace.logdet, to_backend(backend, [(a, e)]), tau, n)
    kronecker = evaluate(
        backend,
        laplace.kron_logdet,
        backend.asarray(factor_a.astype(dtype)),
        backend.asarray(np.ones((1, 1), dtype=dtype)),
        tau,
        n,
    )
    precision = kron_dense(factor_a, np.ones((1, 1)), tau, n)
    values = np.linalg.eigvalsh(precision)
    limit = 2 * logdet_tolerance(dtype, posterior_condition(precision, tau), values)
    assert abs(float(to_np(backend, subsampled)) - float(to_np(backend, kronecker))) <= limit


# --------------------------------------------------------------------------------------
# log_marginal_likelihood
# --------------------------------------------------------------------------------------


@property_test(
    data=st.data(),
    tau=st.sampled_from([0.1, 1.0, 3.0]),
    scalar_kind=st.sampled_from(["python", "array"]),
)
def test_log_marginal_likelihood_is_the_laplace_formula(
    backend: testing.Backend,
    dtype: np.dtype,
    data: st.DataObject,
    tau: float,
    scalar_kind: str,
) -> None:
    """``log p(D|θ*) − (τ/2)‖θ*‖² + (D/2)·log τ − ½·log det Λ``, D = all parameters."""
    side = sizes(backend, 1, 3)
    layer_shapes = data.draw(
        st.lists(st.tuples(side, side), min_size=1, max_size=2 if backend.name == "jax" else 3)
    )
    params = [data.draw(testing.arrays(shape, dtype=dtype)) for shape in layer_shapes]
    log_likelihood = data.draw(st.floats(-100.0, 0.0))
    log_det = data.draw(st.floats(-20.0, 50.0))
    count = sum(p.size for p in params)
    squared = sum(float(np.sum(f64(p) ** 2)) for p in params)
    expected = log_likelihood - tau / 2 * squared + count / 2 * math.log(tau) - log_det / 2
    as_scalar = (
        (lambda x: x)
        if scalar_kind == "python"
        else (lambda x: backend.asarray(np.asarray(x, dtype=dtype)))
    )
    result = evaluate(
        backend,
        laplace.log_marginal_likelihood,
        as_scalar(log_likelihood),
        [backend.asarray(p) for p in params],
        as_scalar(log_det),
        tau,
    )
    assert_backend_array(result, backend, dtype)
    magnitude = (
        abs(log_likelihood) + tau / 2 * squared + count / 2 * abs(math.log(tau)) + abs(log_det) / 2
    )
    # Rounding of a sum of `count` squares and four terms.
    assert abs(float(to_np(backend, result)) - expected) <= rtol(dtype, count + 4) * magnitude


def linear_gaussian_evidence(x: np.ndarray, targets: np.ndarray, tau: float) -> float:
    """Exact ``log p(y) = log N(y; 0, I + XXᵀ/τ)`` of ``y = Xθ + ε``, ``θ ~ N(0, I/τ)``,
    ``ε ~ N(0, I)``."""
    count = x.shape[0]
    covariance = np.eye(count) + x @ x.T / tau
    sign, logdet = np.linalg.slogdet(covariance)
    assert sign > 0
    quadratic = targets @ np.linalg.solve(covariance, targets)
    return float(-count / 2 * math.log(2 * math.pi) - logdet / 2 - quadratic / 2)


@property_test(
    data=st.data(),
    regime=st.sampled_from(["N>D", "N<D"]),
    tau=st.sampled_from([0.3, 1.0, 5.0]),
)
def test_log_marginal_likelihood_is_exact_for_linear_gaussian_regression(
    backend: testing.Backend, dtype: np.dtype, data: st.DataObject, regime: str, tau: float
) -> None:
    """For ``y = Xθ + ε`` with unit noise the log-posterior is quadratic, the Laplace
    approximation is exact, and its Hessian is the Fisher ``XᵀX``. As captures of a linear layer
    ``θᵀx`` (``d_out = 1``) the per-example output gradient of the Gaussian Fisher is ``e = 1``,
    so ``g_i = x_i`` and, with ``n_data = B = N``, ``n·(1/B)·GGᵀ = XᵀX``; the same precision is
    ``n·A⊗[1]`` with ``A = XᵀX/N`` for :func:`kron_logdet`."""
    params = data.draw(sizes(backend, 1, 5))
    if backend.name == "jax":
        count = params + 3 if regime == "N>D" else max(1, params - 2)
    else:
        count = data.draw(
            st.integers(params + 1, params + 8) if regime == "N>D" else st.integers(1, params)
        )
    x = data.draw(testing.arrays((count, params))).astype(dtype)
    theta = data.draw(testing.arrays((params,)))
    targets = f64(x) @ theta + data.draw(testing.arrays((count,)))
    hessian = f64(x).T @ f64(x) + tau * np.eye(params)
    mode = np.linalg.solve(hessian, f64(x).T @ targets)
    residual = targets - f64(x) @ mode
    log_likelihood = float(-count / 2 * math.log(2 * math.pi) - residual @ residual / 2)
    expected = linear_gaussian_evidence(f64(x), targets, tau)

    captures = [(backend.asarray(x), backend.asarray(np.ones((count, 1), dtype=dtype)))]
    map_params = [backend.asarray(mode.reshape(1, params).astype(dtype))]
    log_det = evaluate(backend, laplace.logdet, captures, tau, count)
    result = evaluate(
        backend, laplace.log_marginal_likelihood, log_likelihood, map_params, log_det, tau
    )
    assert_backend_array(result, backend, dtype)

    factor = f64(x).T @ f64(x) / count
    kron_log_det = evaluate(
        backend,
        laplace.kron_logdet,
        backend.asarray(factor.astype(dtype)),
        backend.asarray(np.ones((1, 1), dtype=dtype)),
        tau,
        count,
    )
    via_kron = evaluate(
        backend, laplace.log_marginal_likelihood, log_likelihood, map_params, kron_log_det, tau
    )
    assert_backend_array(via_kron, backend, dtype)

    values = np.linalg.eigvalsh(hessian)
    condition = posterior_condition(hessian, tau)
    magnitude = abs(log_likelihood) + tau / 2 * float(mode @ mode) + params / 2 * abs(math.log(tau))
    limit = rtol(dtype, condition) * magnitude + logdet_tolerance(dtype, condition, values)
    for value in (result, via_kron):
        assert abs(float(to_np(backend, value)) - expected) <= limit, (
            float(value),
            expected,
            limit,
        )


def test_log_marginal_likelihood_prefers_the_true_prior_scale() -> None:
    """Sanity of the use case (tuning τ): with θ ~ N(0, I/τ₀) and many parameters, the Laplace
    evidence (exact here) is larger at τ₀ than at τ₀/100 and 100·τ₀."""
    rng = np.random.default_rng(5)
    count, params, tau0 = 40, 30, 4.0
    x = rng.standard_normal((count, params))
    targets = x @ (rng.standard_normal(params) / math.sqrt(tau0)) + rng.standard_normal(count)
    captures = [(x, np.ones((count, 1)))]

    def evidence(tau: float) -> float:
        mode = np.linalg.solve(x.T @ x + tau * np.eye(params), x.T @ targets)
        residual = targets - x @ mode
        log_likelihood = -count / 2 * math.log(2 * math.pi) - residual @ residual / 2
        log_det = laplace.logdet(captures, tau, count)
        return float(laplace.log_marginal_likelihood(log_likelihood, [mode[None]], log_det, tau))

    assert evidence(tau0) > evidence(tau0 / 100) and evidence(tau0) > evidence(100 * tau0)


# --------------------------------------------------------------------------------------
# Cross-cutting: namespace and dtype kept, inputs untouched, jax.jit, errors
# --------------------------------------------------------------------------------------

TAU, N_DATA = 0.7, 20


def _cases() -> dict[str, tuple[tuple[np.ndarray, ...], Callable[..., Any]]]:
    """One call per public function: NumPy inputs (cast per test) and ``call(*arrays, τ, n)``."""
    rng = np.random.default_rng(7)
    a1, e1 = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    a2, e2 = rng.standard_normal((4, 2)), rng.standard_normal((4, 1))
    at, et = rng.standard_normal((4, 3, 3)), rng.standard_normal((4, 3, 2))
    y1, y2, z = (
        rng.standard_normal((5, 2, 3)),
        rng.standard_normal((5, 1, 2)),
        rng.standard_normal((5, 4)),
    )
    m = rng.standard_normal((3, 3))
    a_factor = m @ m.T / 3
    g_factor = np.array([[1.0, 0.3], [0.3, 0.5]])
    theta = rng.standard_normal((2, 3))
    return {
        "sample": (
            (a1, e1, a2, e2, y1, y2, z),
            lambda a1, e1, a2, e2, y1, y2, z, tau, n: laplace.sample(
                [(a1, e1), (a2, e2)], tau, n, [y1, y2], z
            ),
        ),
        "sample_positions": (
            (at, et, y1, z),
            lambda at, et, y1, z, tau, n: laplace.sample([(at, et)], tau, n, [y1], z),
        ),
        "logdet": (
            (a1, e1, a2, e2),
            lambda a1, e1, a2, e2, tau, n: laplace.logdet([(a1, e1), (a2, e2)], tau, n),
        ),
        "kron_sample": (
            (a_factor, g_factor, y1),
            lambda a, g, y, tau, n: laplace.kron_sample(a, g, tau, n, y),
        ),
        "kron_logdet": ((a_factor, g_factor), laplace.kron_logdet),
        "log_marginal_likelihood": (
            (theta, np.asarray(-3.5), np.asarray(4.0)),
            lambda theta, ll, log_det, tau, n: laplace.log_marginal_likelihood(
                ll, [theta], log_det, tau
            ),
        ),
    }


CASES = _cases()


def _leaves(output: Any) -> list[Any]:
    if isinstance(output, (list, tuple)):
        return [leaf for item in output for leaf in _leaves(item)]
    return [output]


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_function_keeps_namespace_and_dtype_is_pure_and_jits(
    backend: testing.Backend, dtype: np.dtype, name: str
) -> None:
    inputs, call = CASES[name]
    arrays = [backend.asarray(x.astype(dtype)) for x in inputs]
    before = [np.array(backend.to_numpy(x), copy=True) for x in arrays]
    output = call(*arrays, TAU, N_DATA)
    leaves = _leaves(output)
    for leaf in leaves:
        assert_backend_array(leaf, backend, dtype)
    for x, copy in zip(arrays, before):
        np.testing.assert_array_equal(backend.to_numpy(x), copy)  # inputs never modified
    if backend.jit is None:
        return
    # τ and n static (closed over) and traced (jit arguments: weakly typed scalars).
    static = backend.jit(lambda *arrs: call(*arrs, TAU, N_DATA))(*arrays)
    traced = backend.jit(call)(*arrays, TAU, N_DATA)
    for jitted in (static, traced):
        jitted_leaves = _leaves(jitted)
        assert len(jitted_leaves) == len(leaves)
        for eager, value in zip(leaves, jitted_leaves):
            assert_backend_array(value, backend, dtype)
            # Same algorithm, fused differently by XLA; these problems have λ_max(Λ)/τ ≲ 1e3.
            assert_close(to_np(backend, value), to_np(backend, eager), dtype, condition=1e3)


@pytest.mark.parametrize("name", sorted(CASES))
def test_scalar_array_parameters_do_not_change_the_dtype(
    backend: testing.Backend, name: str
) -> None:
    """τ and n as float64 0-d arrays with float32 data: float32 results, equal to the results
    with Python scalars."""
    inputs, call = CASES[name]
    arrays = [backend.asarray(x.astype(np.float32)) for x in inputs]
    scalar = lambda v: backend.asarray(np.asarray(v, dtype=np.float64))  # noqa: E731
    output = call(*arrays, scalar(TAU), scalar(N_DATA))
    reference = call(*arrays, TAU, N_DATA)
    for leaf, expected in zip(_leaves(output), _leaves(reference)):
        assert_backend_array(leaf, backend, F32)
        assert_close(to_np(backend, leaf), to_np(backend, expected), F32, condition=1e3)


def _error_cases() -> list[tuple[str, Callable[[Callable], Any], type, str]]:
    """(id, call given a converter to the backend, exception, message pattern)."""
    rng = np.random.default_rng(1)
    a1, e1 = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    a2, e2 = rng.standard_normal((4, 2)), rng.standard_normal((4, 1))
    y1, y2, z = (
        rng.standard_normal((5, 2, 3)),
        rng.standard_normal((5, 1, 2)),
        rng.standard_normal((5, 4)),
    )
    spd3, spd2 = np.diag([1.0, 2.0, 3.0]), np.array([[2.0, 0.5], [0.5, 1.0]])
    indefinite = np.diag([1.0, -1.0, 2.0])
    nan_y = y1.copy()
    nan_y[0, 1, 2] = np.nan
    nan_z = z.copy()
    nan_z[2, 1] = np.nan
    nan_a = a1.copy()
    nan_a[1, 1] = np.inf
    nan_factor = spd3.copy()
    nan_factor[0, 2] = nan_factor[2, 0] = np.nan
    NPD = curvlinalg.NotPositiveDefiniteError

    def sample(c, tau=1.0, n=10, y=None, z_=None, captures=None):
        caps = captures if captures is not None else [(a1, e1), (a2, e2)]
        ys = [y1, y2] if y is None else y
        return laplace.sample(
            [(c(a), c(e)) for a, e in caps],
            tau,
            n,
            [c(v) for v in ys] if isinstance(ys, list) else c(ys),
            c(z if z_ is None else z_),
        )

    kron_y = rng.standard_normal((5, 2, 3))
    return [
        # scalars
        ("sample-prior-zero", lambda c: sample(c, tau=0.0), ValueError, "prior_precision"),
        ("sample-prior-negative", lambda c: sample(c, tau=-1.0), ValueError, "prior_precision"),
        ("sample-prior-nan", lambda c: sample(c, tau=float("nan")), ValueError, "prior_precision"),
        ("sample-n-negative", lambda c: sample(c, n=-1), ValueError, "n_data"),
        (
            "logdet-prior-zero",
            lambda c: laplace.logdet([(c(a1), c(e1))], 0.0, 1),
            ValueError,
            "prior_precision",
        ),
        (
            "logdet-n-negative",
            lambda c: laplace.logdet([(c(a1), c(e1))], 1.0, -2.0),
            ValueError,
            "n_data",
        ),
        (
            "kron_sample-prior-zero",
            lambda c: laplace.kron_sample(c(spd3), c(spd2), 0.0, 1, c(kron_y)),
            ValueError,
            "prior_precision",
        ),
        (
            "kron_sample-n-negative",
            lambda c: laplace.kron_sample(c(spd3), c(spd2), 1.0, -1, c(kron_y)),
            ValueError,
            "n_data",
        ),
        (
            "kron_logdet-prior-negative",
            lambda c: laplace.kron_logdet(c(spd3), c(spd2), -0.5, 1),
            ValueError,
            "prior_precision",
        ),
        (
            "kron_logdet-n-negative",
            lambda c: laplace.kron_logdet(c(spd3), c(spd2), 1.0, -1),
            ValueError,
            "n_data",
        ),
        (
            "lml-prior-zero",
            lambda c: laplace.log_marginal_likelihood(-1.0, [c(y1)], c(np.asarray(1.0)), 0.0),
            ValueError,
            "prior_precision",
        ),
        (
            "lml-params-empty",
            lambda c: laplace.log_marginal_likelihood(-1.0, [], 1.0, 1.0),
            ValueError,
            "params",
        ),
        # shapes of the noise
        ("sample-z-batch", lambda c: sample(c, z_=z[:, :3]), ValueError, r"\bz\b"),
        ("sample-z-1d", lambda c: sample(c, z_=z[0]), ValueError, r"\bz\b"),
        ("sample-y-samples", lambda c: sample(c, y=[y1[:4], y2]), ValueError, r"y\[0\]"),
        ("sample-y-layers", lambda c: sample(c, y=[y1]), ValueError, r"\by\b"),
        ("sample-y-shape", lambda c: sample(c, y=[y1, y2[:, :, :1]]), ValueError, r"y\[1\]"),
        (
            "sample-y-swapped",
            lambda c: sample(c, y=[np.swapaxes(y1, 1, 2), y2]),
            ValueError,
            r"y\[0\]",
        ),
        ("sample-y-2d", lambda c: sample(c, y=[y1[:, 0], y2]), ValueError, r"y\[0\]"),
        ("sample-y-array", lambda c: sample(c, y=y1), ValueError, r"\by\b"),
        (
            "kron_sample-y-shape",
            lambda c: laplace.kron_sample(c(spd3), c(spd2), 1.0, 1, c(np.swapaxes(kron_y, 1, 2))),
            ValueError,
            r"\by\b",
        ),
        (
            "kron_sample-y-2d",
            lambda c: laplace.kron_sample(c(spd3), c(spd2), 1.0, 1, c(kron_y[0])),
            ValueError,
            r"\by\b",
        ),
        # captures and factors
        ("sample-captures-empty", lambda c: sample(c, captures=[]), ValueError, "captures"),
        (
            "sample-captures-batch",
            lambda c: sample(c, captures=[(a1, e1), (a2[:3], e2[:3])]),
            ValueError,
            r"captures\[1\]",
        ),
        (
            "kron_sample-a-not-square",
            lambda c: laplace.kron_sample(c(a1), c(spd2), 1.0, 1, c(kron_y)),
            ValueError,
            r"\ba\b",
        ),
        (
            "kron_sample-g-not-square",
            lambda c: laplace.kron_sample(c(spd3), c(e1), 1.0, 1, c(kron_y)),
            ValueError,
            r"\bg\b",
        ),
        (
            "kron_logdet-g-not-square",
            lambda c: laplace.kron_logdet(c(spd3), c(e1), 1.0, 1),
            ValueError,
            r"\bg\b",
        ),
        # not positive definite: n·A⊗G + τI with an indefinite A and a small τ
        (
            "kron_sample-indefinite-a",
            lambda c: laplace.kron_sample(c(indefinite), c(spd2), 0.1, 5, c(kron_y)),
            NPD,
            "positive definite",
        ),
        (
            "kron_sample-indefinite-g",
            lambda c: laplace.kron_sample(c(spd3), c(-spd2), 0.1, 5, c(kron_y)),
            NPD,
            "positive definite",
        ),
        (
            "kron_logdet-indefinite-a",
            lambda c: laplace.kron_logdet(c(indefinite), c(spd2), 0.1, 5),
            NPD,
            "positive definite",
        ),
        # NaN / infinite input
        ("sample-y-nan", lambda c: sample(c, y=[nan_y, y2]), ValueError, r"y\[0\].*NaN"),
        ("sample-z-nan", lambda c: sample(c, z_=nan_z), ValueError, r"\bz\b.*NaN"),
        (
            "sample-captures-inf",
            lambda c: sample(c, captures=[(nan_a, e1), (a2, e2)]),
            ValueError,
            r"captures\[0\].*NaN",
        ),
        (
            "logdet-captures-inf",
            lambda c: laplace.logdet([(c(nan_a), c(e1))], 1.0, 1),
            ValueError,
            r"captures\[0\].*NaN",
        ),
        (
            "kron_sample-y-nan",
            lambda c: laplace.kron_sample(c(spd3), c(spd2), 1.0, 1, c(nan_y)),
            ValueError,
            r"\by\b.*NaN",
        ),
        (
            "kron_sample-a-nan",
            lambda c: laplace.kron_sample(c(nan_factor), c(spd2), 1.0, 1, c(kron_y)),
            ValueError,
            r"\ba\b.*NaN",
        ),
        (
            "kron_logdet-a-nan",
            lambda c: laplace.kron_logdet(c(nan_factor), c(spd2), 1.0, 1),
            ValueError,
            r"\ba\b.*NaN",
        ),
        # dtypes
        (
            "sample-y-dtype",
            lambda c: sample(c, y=[y1.astype(np.float32), y2]),
            ValueError,
            r"dtype.*\by\b",
        ),
        (
            "sample-z-dtype",
            lambda c: sample(c, z_=z.astype(np.float32)),
            ValueError,
            r"dtype.*\bz\b",
        ),
        ("sample-y-int", lambda c: sample(c, y=[y1.astype(np.int64), y2]), ValueError, r"\by\b"),
        (
            "kron_sample-y-dtype",
            lambda c: laplace.kron_sample(c(spd3), c(spd2), 1.0, 1, c(kron_y.astype(np.float32))),
            ValueError,
            r"dtype.*\by\b",
        ),
        (
            "kron_sample-g-dtype",
            lambda c: laplace.kron_sample(c(spd3), c(spd2.astype(np.float32)), 1.0, 1, c(kron_y)),
            ValueError,
            r"dtype.*\bg\b",
        ),
        (
            "kron_sample-int",
            lambda c: laplace.kron_sample(
                c(np.eye(3, dtype=np.int64)), c(np.eye(2, dtype=np.int64)), 1.0, 1, c(kron_y)
            ),
            ValueError,
            r"\ba\b",
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


def test_indefinite_factor_with_a_positive_definite_total_is_accepted() -> None:
    """Only ``n·A⊗G + τI`` must be positive definite: A = diag(1, −0.1) with τ = 1 is fine."""
    a, g = np.diag([1.0, -0.1]), np.eye(2)
    samples = vec_rows(laplace.kron_sample(a, g, 1.0, 2, mat_rows(np.eye(4), (2, 2))))
    exact = np.linalg.inv(kron_dense(a, g, 1.0, 2))
    assert_close(samples.T @ samples, exact, F64, float(np.linalg.cond(exact)))
    assert np.isclose(float(laplace.kron_logdet(a, g, 1.0, 2)), np.linalg.slogdet(exact)[1] * -1)


def test_not_positive_definite_error_is_a_value_error() -> None:
    assert issubclass(curvlinalg.NotPositiveDefiniteError, ValueError)


def test_check_finite_false_skips_the_scan(backend: testing.Backend) -> None:
    rng = np.random.default_rng(2)
    a, e = rng.standard_normal((3, 2)), rng.standard_normal((3, 2))
    y, z = rng.standard_normal((2, 2, 2)), rng.standard_normal((2, 3))
    z[0, 0] = np.nan
    c = backend.asarray
    result = to_np(
        backend, laplace.sample([(c(a), c(e))], 1.0, 3, [c(y)], c(z), check_finite=False)[0]
    )
    assert np.isnan(result[0]).any() and np.isfinite(result[1]).all()


# Functions with several array inputs: (call on the list of inputs, positions to swap in turn
# for a NumPy array while the others are PyTorch tensors).
MULTI_INPUT = {
    "sample": (
        lambda arr: laplace.sample(
            [(arr[0], arr[1]), (arr[2], arr[3])], 1.0, 4, [arr[4], arr[5]], arr[6]
        ),
        [0, 3, 4, 5, 6],
    ),
    "logdet": (lambda arr: laplace.logdet([(arr[0], arr[1]), (arr[2], arr[3])], 1.0, 4), [0, 3]),
    "kron_sample": (lambda arr: laplace.kron_sample(arr[7], arr[8], 1.0, 4, arr[9]), [7, 8, 9]),
    "kron_logdet": (lambda arr: laplace.kron_logdet(arr[7], arr[8], 1.0, 4), [7, 8]),
    "log_marginal_likelihood": (
        lambda arr: laplace.log_marginal_likelihood(arr[10], [arr[4], arr[5]], arr[11], 1.0),
        [4, 10, 11],
    ),
}


def _multi_inputs() -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    return [
        rng.standard_normal((4, 3)),  # 0 a1
        rng.standard_normal((4, 2)),  # 1 e1
        rng.standard_normal((4, 2)),  # 2 a2
        rng.standard_normal((4, 1)),  # 3 e2
        rng.standard_normal((5, 2, 3)),  # 4 y1 / params[0]
        rng.standard_normal((5, 1, 2)),  # 5 y2 / params[1]
        rng.standard_normal((5, 4)),  # 6 z
        np.diag([1.0, 2.0, 3.0]),  # 7 a factor
        np.array([[2.0, 0.5], [0.5, 1.0]]),  # 8 g factor
        rng.standard_normal((5, 2, 3)),  # 9 kron y
        np.asarray(-2.0),  # 10 log-likelihood
        np.asarray(3.0),  # 11 log det
    ]


@pytest.mark.parametrize("name", sorted(MULTI_INPUT))
def test_mixed_namespaces_raise(name: str) -> None:
    torch = pytest.importorskip("torch")
    inputs = _multi_inputs()
    call, positions = MULTI_INPUT[name]
    assert call([torch.asarray(x) for x in inputs]) is not None  # valid when not mixed
    for odd in positions:
        arrays = [np.asarray(x) if i == odd else torch.asarray(x) for i, x in enumerate(inputs)]
        with pytest.raises(ValueError, match="different libraries"):
            call(arrays)
