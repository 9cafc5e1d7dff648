"""The private backend module: namespace resolution and the operations the standard lacks.

Each fast path (SciPy, torch, JAX; CuPy on a GPU) and the portable fallback (array-api-strict)
is compared with NumPy/SciPy references. float64 tolerances: 32·κ·eps (see conftest).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
from hypothesis import given
from hypothesis import strategies as st

from curvlinalg import _backend, testing
from tests.conftest import assert_close


def test_namespace_of_each_backend(backend: testing.Backend) -> None:
    x = backend.asarray(np.ones((2, 2)))
    assert _backend.namespace(("x", x), ("unused", None), ("scale", 2.0)) is backend.xp


def test_mixed_namespaces_are_a_value_error(backend: testing.Backend) -> None:
    if backend.name == "numpy":
        pytest.skip("needs a second library")
    with pytest.raises(ValueError, match=r"different libraries.*left is numpy"):
        _backend.namespace(("left", np.ones(2)), ("right", backend.asarray(np.ones(2))))


def test_no_array_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="at least one array"):
        _backend.namespace(("x", 1.0), ("y", None))


def test_unsupported_type_names_the_argument() -> None:
    with pytest.raises(ValueError, match="weights"):
        _backend.namespace(("weights", [1.0, 2.0]), ("x", np.ones(2)))


@given(m=testing.spd_matrices(st.integers(1, 6), max_condition=100.0))
def test_cholesky_matches_numpy(backend: testing.Backend, m: np.ndarray) -> None:
    lower, ok = _backend.cholesky(backend.xp, backend.asarray(m))
    assert ok is True
    assert_close(backend.to_numpy(lower), np.linalg.cholesky(m), np.float64, condition=100.0)


def test_cholesky_reports_failure(backend: testing.Backend) -> None:
    indefinite = backend.asarray(np.diag([1.0, -1.0, 2.0]))
    _, ok = _backend.cholesky(backend.xp, indefinite)
    assert ok is False


@given(
    m=testing.spd_matrices(st.integers(1, 6), max_condition=50.0),
    columns=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    lower=st.booleans(),
    transpose=st.booleans(),
)
def test_solve_triangular_matches_scipy(
    backend: testing.Backend, m: np.ndarray, columns: int, seed: int, lower: bool, transpose: bool
) -> None:
    triangle = np.linalg.cholesky(m)
    if not lower:
        triangle = triangle.T
    rhs = np.random.default_rng(seed).standard_normal((m.shape[0], columns))
    expected = scipy.linalg.solve_triangular(triangle, rhs, lower=lower, trans=int(transpose))
    result = _backend.solve_triangular(
        backend.xp,
        backend.asarray(triangle),
        backend.asarray(rhs),
        lower=lower,
        transpose=transpose,
    )
    # κ(L) = sqrt(κ(m)) ≤ 7.1
    assert_close(backend.to_numpy(result), expected, np.float64, condition=8.0)


@given(m=testing.spd_matrices(st.integers(1, 6), max_condition=100.0))
def test_cholesky_inverse(backend: testing.Backend, m: np.ndarray) -> None:
    lower = backend.asarray(np.linalg.cholesky(m))
    result = backend.to_numpy(_backend.cholesky_inverse(backend.xp, lower))
    assert_close(result, np.linalg.inv(m), np.float64, condition=100.0)
    np.testing.assert_array_equal(result, result.T)


@given(m=testing.spd_matrices(st.integers(1, 6), max_condition=100.0))
def test_eigh_reconstructs(backend: testing.Backend, m: np.ndarray) -> None:
    values, vectors = (backend.to_numpy(x) for x in _backend.eigh(backend.xp, backend.asarray(m)))
    assert np.all(np.diff(values) >= 0)
    assert_close(values, np.linalg.eigvalsh(m), np.float64, condition=100.0)
    assert_close(vectors.T @ vectors, np.eye(m.shape[0]), np.float64)
    assert_close((vectors * values) @ vectors.T, m, np.float64, condition=100.0)


def test_is_traced_only_inside_jit() -> None:
    jax = pytest.importorskip("jax")
    seen = []

    @jax.jit
    def probe(x):  # noqa: ANN001, ANN202
        seen.append(_backend.is_traced(x))
        return x

    probe(jax.numpy.ones(2))
    assert seen == [True]
    assert not _backend.is_traced(jax.numpy.ones(2))
    assert not _backend.is_traced(np.ones(2))
