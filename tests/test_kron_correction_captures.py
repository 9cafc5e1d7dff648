r"""``kron.corrected_solve_captures``: the EK-FAC step of a layer's mean gradient from captures.

Reference (NumPy, float64, no curvlinalg): the dense EK-FAC matrix
``P = Q diag(vec(S)) Qᵀ + λI`` with ``Q = U_A ⊗ U_G`` (``np.kron``, column-major ``vec``) and
``mat(P⁻¹ vec(∇W))`` by ``np.linalg.solve``, ``∇W = (1/B) Σ_{i,t} e_itᵀ a_it``. Both orders
of the contraction (rotating the captures, forming ``∇W`` first) are exercised by the shapes.

Tolerance: ``32·κ·eps(dtype)`` with ``κ = cond(P) · n·‖Σ|e||a|‖/‖∇W‖`` (the solve's condition
times the cancellation in summing ``∇W`` over ``n = B·T`` rows, plus the widths for the
rotations). Masks of this function are tested in tests/test_masks.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from curvlinalg import NotPositiveDefiniteError, kron, testing
from tests.conftest import assert_backend_array, assert_close
from tests.references import f64, mat, to_np, vec, with_positions


def _orthonormal_spd(rng: np.random.Generator, size: int, dtype: np.dtype) -> np.ndarray:
    basis, _ = np.linalg.qr(rng.standard_normal((size, size)))
    matrix = (basis * rng.uniform(1.0, 2.0, size)) @ basis.T
    return ((matrix + matrix.T) / 2).astype(dtype)


# (B, T, d_in, d_out): the first rotates the captures (few rows, wide layer), the second forms
# ∇W first (many rows, narrow layer); the third has no positions.
SHAPES = [(2, None, 6, 5), (6, 4, 2, 2), (5, 3, 3, 2)]


@pytest.mark.parametrize("shape", SHAPES, ids=["captures-order", "gradient-order", "T=3"])
def test_corrected_solve_captures_is_the_dense_ekfac_solve_of_the_mean_gradient(
    backend: testing.Backend, dtype: np.dtype, shape: tuple
) -> None:
    batch, positions, d_in, d_out = shape
    rng = np.random.default_rng(batch * 10 + d_in)
    lead = (batch,) if positions is None else (batch, positions)
    a = rng.standard_normal(lead + (d_in,)).astype(dtype)
    e = rng.standard_normal(lead + (d_out,)).astype(dtype)
    a_eigh = kron.eigh(backend.asarray(_orthonormal_spd(rng, d_in, dtype)))
    g_eigh = kron.eigh(backend.asarray(_orthonormal_spd(rng, d_out, dtype)))
    correction = rng.uniform(0.0, 2.0, (d_out, d_in)).astype(dtype)
    damping = 0.25
    ua, ug = to_np(backend, a_eigh.vectors), to_np(backend, g_eigh.vectors)
    q = np.kron(ua, ug)
    system = q @ np.diag(vec(f64(correction))) @ q.T + damping * np.eye(d_in * d_out)
    a3, e3 = with_positions(a), with_positions(e)
    grad = np.einsum("bto,bti->oi", e3, a3) / batch
    spread = np.einsum("bto,bti->oi", np.abs(e3), np.abs(a3)) / batch
    expected = mat(np.linalg.solve(system, vec(grad)), (d_out, d_in))
    rows = batch * a3.shape[1]
    condition = np.linalg.cond(system) * (
        rows * np.linalg.norm(spread) / np.linalg.norm(grad) + d_in + d_out
    )
    result = kron.corrected_solve_captures(
        backend.asarray(a),
        backend.asarray(e),
        a_eigh,
        g_eigh,
        backend.asarray(correction),
        damping,
    )
    assert_backend_array(result, backend, dtype)
    assert_close(to_np(backend, result), expected, dtype, condition)
    # The same as corrected_solve of the formed mean gradient.
    formed = kron.corrected_solve(
        backend.asarray(grad.astype(dtype)), a_eigh, g_eigh, backend.asarray(correction), damping
    )
    assert_close(to_np(backend, result), to_np(backend, formed), dtype, 2 * condition)
    # Which order the static shapes pick (the cost model of the docstring).
    d_rows = rows * (d_in * d_in + d_out * d_out) < d_out * d_in * (d_in + d_out)
    assert kron._rotate_from_captures(rows, d_in, d_out) == d_rows
    assert d_rows == (shape == SHAPES[0])


def test_corrected_solve_captures_refuses_bad_input(backend: testing.Backend) -> None:
    rng = np.random.default_rng(1)
    c = backend.asarray
    a, e = c(rng.standard_normal((3, 2))), c(rng.standard_normal((3, 2)))
    a_eigh = kron.eigh(c(np.eye(2)))
    with pytest.raises(ValueError, match="correction has shape"):
        kron.corrected_solve_captures(a, e, a_eigh, a_eigh, c(np.ones((2, 3))), 0.1)
    with pytest.raises(ValueError, match="a has leading shape"):
        kron.corrected_solve_captures(
            a, c(np.ones((2, 2))), a_eigh, a_eigh, c(np.ones((2, 2))), 0.1
        )
    with pytest.raises(ValueError, match="damping"):
        kron.corrected_solve_captures(a, e, a_eigh, a_eigh, c(np.ones((2, 2))), -1.0)
    with pytest.raises(NotPositiveDefiniteError):
        kron.corrected_solve_captures(a, e, a_eigh, a_eigh, c(np.zeros((2, 2))), 0.0)
    with pytest.raises(ValueError, match="e contains NaN"):
        kron.corrected_solve_captures(
            a, c(np.full((3, 2), np.nan)), a_eigh, a_eigh, c(np.ones((2, 2))), 0.1
        )
