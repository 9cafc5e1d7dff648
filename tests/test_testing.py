"""The hypothesis strategies of curvlinalg.testing produce what they promise."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from curvlinalg import testing


@given(m=testing.spd_matrices(st.integers(1, 8), max_condition=50.0))
def test_spd_matrices_are_symmetric_with_bounded_condition(m: np.ndarray) -> None:
    np.testing.assert_array_equal(m, m.T)
    values = np.linalg.eigvalsh(m)
    assert values[0] > 0
    assert values[-1] / values[0] <= 50.0 * (1 + 1e-8)


@given(m=testing.spd_matrices(3, dtype=np.float32))
def test_spd_matrices_dtype(m: np.ndarray) -> None:
    assert m.dtype == np.float32 and m.shape == (3, 3)


@given(m=testing.psd_matrices(5, rank=2))
def test_psd_matrices_have_the_rank(m: np.ndarray) -> None:
    values = np.linalg.eigvalsh(m)
    assert values[0] >= -1e-12
    assert np.linalg.matrix_rank(m, tol=1e-10) == 2


@given(
    layers=testing.captures(
        num_layers=st.integers(1, 3), batch_size=3, width=st.integers(1, 4), positions=2, bias=True
    )
)
def test_captures_chain_and_shapes(layers: list[tuple[np.ndarray, np.ndarray]]) -> None:
    for index, (a, e) in enumerate(layers):
        assert a.shape[:2] == e.shape[:2] == (3, 2)
        np.testing.assert_array_equal(a[..., -1], 1.0)
        if index + 1 < len(layers):
            assert e.shape[-1] == layers[index + 1][0].shape[-1] - 1


@given(x=testing.arrays((2, st.integers(1, 3)), dtype=np.float32, scale=3.0))
def test_arrays(x: np.ndarray) -> None:
    assert x.dtype == np.float32 and x.shape[0] == 2 and np.all(np.isfinite(x))


def test_backends_round_trip(backend: testing.Backend, dtype: np.dtype) -> None:
    value = np.arange(6, dtype=dtype).reshape(2, 3)
    converted = backend.asarray(value)
    np.testing.assert_array_equal(backend.to_numpy(converted), value)
    assert backend.to_numpy(converted).dtype == dtype


def test_numpy_is_always_first() -> None:
    assert testing.available_backends()[0].name == "numpy"


def test_jax_without_x64_is_reported() -> None:
    jax = pytest.importorskip("jax")
    backend = next(b for b in testing.available_backends() if b.name == "jax")
    jax.config.update("jax_enable_x64", False)
    try:
        with pytest.raises(ValueError, match="jax_enable_x64"):
            backend.asarray(np.ones(2))
    finally:
        jax.config.update("jax_enable_x64", True)
