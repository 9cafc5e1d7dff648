r"""Tests of EK-FAC's eigenvalue correction (:func:`kron.eigen_correction`,
:func:`kron.corrected_solve`) against dense NumPy references.

Conventions (DESIGN.md, API.md): captures ``a`` ``(B, d_in)`` or ``(B, T, d_in)``, ``e``
``(B, d_out)`` or ``(B, T, d_out)``; per-example gradients ``g_i = Σ_t e_itᵀ a_it``; ``vec`` is
column-major, so ``(A⊗G) vec(V) = vec(G V A)`` and the Kronecker eigenbasis is
``Q = U_A ⊗ U_G`` (``np.kron``), whose column ``j·d_out + o`` is ``U_A[:, j] ⊗ U_G[:, o]`` —
the entry ``S[o, j]`` of the ``(d_out, d_in)`` correction.

References never call curvlinalg: per-example gradients by ``np.einsum``, the Fisher
``F = (1/B) Σ_i vec(g_i) vec(g_i)ᵀ`` densely, ``S = diag(Qᵀ F Q)``, and the dense solve
``(Q diag(vec S) Qᵀ + λI)⁻¹ vec(grad)`` with ``np.linalg.solve``, in float64 from the cast
inputs. Tolerances: :func:`tests.conftest.assert_close`; for ``S`` (a contraction, no system)
the stated condition is ``n·‖S_abs‖/‖S‖`` with ``S_abs`` the same computation on absolute
values (the entrywise rounding bound) and ``n`` the number of accumulated products; for the
solve it is ``κ(Q diag(S) Qᵀ + λI)`` times the rotation length ``d_in + d_out``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import strategies as st

import curvlinalg
from curvlinalg import kron, testing
from tests import references
from tests.conftest import assert_backend_array, assert_close
from tests.references import f64, mat, to_np, vec, with_positions

property_test = references.property_tests(references.half_three_on_jax)

F32 = np.dtype(np.float32)


def reference_per_example(a: np.ndarray, e: np.ndarray) -> np.ndarray:
    return np.einsum("bto,bti->boi", with_positions(e), with_positions(a))


def reference_correction(a, e, u_a, u_g) -> np.ndarray:
    """``diag(Qᵀ F Q)`` as ``(d_out, d_in)``, with ``F`` from explicit per-example gradients."""
    g = reference_per_example(a, e)
    columns = np.stack([vec(gi) for gi in g], axis=1)  # (D, B)
    fisher = columns @ columns.T / g.shape[0]
    q = np.kron(f64(u_a), f64(u_g))
    return mat(np.diag(q.T @ fisher @ q), (e.shape[-1], a.shape[-1]))


def correction_condition(a, e, u_a, u_g, expected: np.ndarray) -> float:
    """``n·‖S_abs‖/‖S‖``: ``S_abs`` squares ``Σ_t (|e_t||U_G|)ᵀ(|a_t||U_A|)``, the entrywise
    bound on the terms of each rotated gradient; ``n`` counts products per rotated entry."""
    rotated_a = np.abs(with_positions(a)) @ np.abs(f64(u_a))
    rotated_e = np.abs(with_positions(e)) @ np.abs(f64(u_g))
    bound = np.einsum("bto,bti->boi", rotated_e, rotated_a)
    absolute = np.mean(bound * bound, axis=0)
    terms = with_positions(a).shape[1] * (a.shape[-1] + e.shape[-1]) + 4
    norm = np.linalg.norm(expected)
    return float(terms) if norm == 0 else float(terms * np.linalg.norm(absolute) / norm)


def orthonormal_basis(data: st.DataObject, n: int, dtype: np.dtype) -> tuple[np.ndarray, ...]:
    """Eigenvalues and eigenvectors of a drawn SPD matrix (any orthonormal basis works)."""
    values, vectors = np.linalg.eigh(data.draw(testing.spd_matrices(n, max_condition=10.0)))
    return values.astype(dtype), vectors.astype(dtype)


def compiled(backend: testing.Backend, function: Callable) -> Callable:
    """``function`` under ``jax.jit`` on JAX — one compilation per layout instead of one per
    eager operation and shape, which would dominate the run time — and as is elsewhere.
    JAX's eager path is covered by the method-agreement and error tests."""
    return function if backend.jit is None else backend.jit(function)


def as_eigh(backend: testing.Backend, values: np.ndarray, vectors: np.ndarray) -> kron.Eigh:
    return kron.Eigh(backend.asarray(values), backend.asarray(vectors))


def dims(data: st.DataObject, backend: testing.Backend) -> tuple[int, int]:
    """``(d_in, d_out)``: drawn from 1..4, fixed on JAX, whose eager mode compiles every
    operation once per new shape (which would dominate the run time); 4 and 2 are among
    test_kron.py's JAX sizes, so a full run reuses those compiles."""
    if backend.name == "jax":
        return 4, 2
    return data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))


# --------------------------------------------------------------------------------------
# eigen_correction = diag(Qᵀ F Q), both methods, any batch and positions
# --------------------------------------------------------------------------------------


@property_test(
    data=st.data(),
    positions=st.sampled_from([None, 1, 3]),
    method=st.sampled_from(["auto", "pairs", "explicit"]),
)
def test_eigen_correction_is_the_diagonal_of_the_fisher_in_the_kronecker_eigenbasis(
    backend: testing.Backend,
    dtype: np.dtype,
    data: st.DataObject,
    positions: int | None,
    method: str,
) -> None:
    d_in, d_out = dims(data, backend)
    batch = 3 if backend.name == "jax" else data.draw(st.integers(1, 5))
    lead = (batch,) if positions is None else (batch, positions)
    a = data.draw(testing.arrays(lead + (d_in,), dtype=dtype))
    e = data.draw(testing.arrays(lead + (d_out,), dtype=dtype))
    s_a, u_a = orthonormal_basis(data, d_in, dtype)
    s_g, u_g = orthonormal_basis(data, d_out, dtype)
    a_backend, e_backend = backend.asarray(a), backend.asarray(e)

    def correct(a, e, a_eigh, g_eigh):
        return kron.eigen_correction(a, e, a_eigh, g_eigh, method=method)

    result = compiled(backend, correct)(
        a_backend, e_backend, as_eigh(backend, s_a, u_a), as_eigh(backend, s_g, u_g)
    )
    assert_backend_array(result, backend, dtype)
    expected = reference_correction(a, e, u_a, u_g)
    out = to_np(backend, result)
    assert np.all(out >= 0), "a correction is a mean of squares"
    assert_close(out, expected, dtype, correction_condition(a, e, u_a, u_g, expected))
    np.testing.assert_array_equal(backend.to_numpy(a_backend), a)  # inputs untouched
    np.testing.assert_array_equal(backend.to_numpy(e_backend), e)


@pytest.mark.parametrize(
    "positions, d_in, d_out, expected",
    [
        (1, 4, 4, "pairs"),
        (2, 8, 8, "pairs"),
        (8, 4, 4, "explicit"),
        (128, 256, 256, "explicit"),
        # The measured crossover (bench/README.md, bench_ekfac.py T sweep): pairs is faster up
        # to T ≈ 6 at d = 256, 512 and 1024 and slower from T ≈ 7–10.
        (4, 256, 256, "pairs"),
        (6, 256, 256, "pairs"),
        (7, 256, 256, "explicit"),
        (6, 128, 512, "pairs"),
        (8, 512, 512, "explicit"),
    ],
)
def test_auto_picks_pairs_for_few_positions_and_explicit_for_many(
    positions: int, d_in: int, d_out: int, expected: str
) -> None:
    assert kron._correction_method("auto", positions, d_in, d_out) == expected


@pytest.mark.parametrize("positions", [1, 3])
def test_methods_agree_and_chunking_does_not_change_the_result(
    backend: testing.Backend, dtype: np.dtype, positions: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    if backend.name == "jax" and (positions == 1 or dtype == np.float32):
        # JAX's eager path once; the (jitted) property tests cover the rest there.
        pytest.skip("eager JAX compiles every operation per shape and dtype: run once")
    rng = np.random.default_rng(positions)
    a = rng.standard_normal((7, positions, 3)).astype(dtype)
    e = rng.standard_normal((7, positions, 2)).astype(dtype)
    a_b, e_b = backend.asarray(a), backend.asarray(e)
    a_eigh = kron.eigh(kron.input_factor(a_b))
    g_eigh = kron.eigh(kron.factor(e_b))
    whole = {
        m: to_np(backend, kron.eigen_correction(a_b, e_b, a_eigh, g_eigh, method=m))
        for m in ("pairs", "explicit")
    }
    assert_close(whole["pairs"], whole["explicit"], dtype, condition=positions * 5.0)
    if backend.name == "jax":
        return  # chunking is backend-independent Python; spare JAX the per-shape compiles
    # Budgets of one example (explicit: 6 elements) and of fewer than one example's pairs.
    monkeypatch.setattr(kron, "_CHUNK_ELEMENTS", 6)
    for m in ("pairs", "explicit"):
        chunked = to_np(backend, kron.eigen_correction(a_b, e_b, a_eigh, g_eigh, method=m))
        assert_close(chunked, whole[m], dtype, condition=8.0)


# --------------------------------------------------------------------------------------
# Reduction identity: one example, T = 1 → S = s_G s_Aᵀ and EK-FAC = exactly damped K-FAC
# --------------------------------------------------------------------------------------


@property_test(data=st.data(), damping=st.sampled_from([1e-2, 0.1, 1.0]))
def test_one_example_gives_eigenvalue_products_and_the_exactly_damped_kfac_solve(
    backend: testing.Backend, dtype: np.dtype, data: st.DataObject, damping: float
) -> None:
    d_in, d_out = dims(data, backend)
    a = data.draw(testing.arrays((1, d_in), dtype=dtype))
    e = data.draw(testing.arrays((1, d_out), dtype=dtype))
    grad = data.draw(testing.arrays((2, d_out, d_in), dtype=dtype))
    a_b, e_b, grad_b = backend.asarray(a), backend.asarray(e), backend.asarray(grad)

    def both(a, e, grad):
        # The Fisher of one example is exactly (a aᵀ)⊗(e eᵀ) = A⊗G: its own factors.
        a_eigh, g_eigh = kron.eigh(kron.factor(a)), kron.eigh(kron.factor(e))
        correction = kron.eigen_correction(a, e, a_eigh, g_eigh)
        ekfac = kron.corrected_solve(grad, a_eigh, g_eigh, correction, damping)
        kfac = kron.eigen_solve(grad, a_eigh, g_eigh, damping)
        return a_eigh.values, g_eigh.values, correction, ekfac, kfac

    values_a, values_g, correction, ekfac, kfac = compiled(backend, both)(a_b, e_b, grad_b)
    products = np.outer(to_np(backend, values_g), to_np(backend, values_a))
    # Entries are |e|²|a|² at one position and rounding (eps·|e|²|a|²) elsewhere.
    assert_close(to_np(backend, correction), products, dtype, condition=2.0 * (d_in + d_out))
    top = float(np.sum(f64(a) ** 2) * np.sum(f64(e) ** 2))
    assert_close(to_np(backend, ekfac), to_np(backend, kfac), dtype, 4.0 * (1 + top / damping))


# --------------------------------------------------------------------------------------
# corrected_solve = dense (Q diag(S) Qᵀ + λI)⁻¹ vec(grad)
# --------------------------------------------------------------------------------------


@property_test(
    data=st.data(),
    damping=st.sampled_from([0.0, 1e-2, 0.1, 1.0]),
    lead=st.sampled_from([(), (2,), (2, 1)]),
)
def test_corrected_solve_is_the_dense_solve_in_the_kronecker_eigenbasis(
    backend: testing.Backend,
    dtype: np.dtype,
    data: st.DataObject,
    damping: float,
    lead: tuple[int, ...],
) -> None:
    d_in, d_out = dims(data, backend)
    _, u_a = orthonormal_basis(data, d_in, dtype)
    _, u_g = orthonormal_basis(data, d_out, dtype)
    # Positive for damping 0; spread over a decade so the solve is nontrivially conditioned.
    correction = (0.1 + data.draw(testing.arrays((d_out, d_in))) ** 2).astype(dtype)
    grad = data.draw(testing.arrays(lead + (d_out, d_in), dtype=dtype))
    q = np.kron(f64(u_a), f64(u_g))
    dense = q @ np.diag(vec(f64(correction))) @ q.T + damping * np.eye(d_in * d_out)
    slices = f64(grad).reshape((-1, d_out, d_in))
    expected = np.stack(
        [mat(np.linalg.solve(dense, vec(x)), (d_out, d_in)) for x in slices]
    ).reshape(grad.shape)
    cast = backend.asarray
    grad_b, correction_b = cast(grad), cast(correction)
    result = compiled(backend, lambda *arrays: kron.corrected_solve(*arrays, damping))(
        grad_b,
        kron.Eigh(cast(np.ones(d_in, dtype)), cast(u_a)),
        kron.Eigh(cast(np.ones(d_out, dtype)), cast(u_g)),
        correction_b,
    )
    assert_backend_array(result, backend, dtype)
    condition = float(np.linalg.cond(dense)) * (d_in + d_out)
    assert_close(to_np(backend, result), expected, dtype, condition)
    np.testing.assert_array_equal(backend.to_numpy(grad_b), grad)
    np.testing.assert_array_equal(backend.to_numpy(correction_b), correction)


def test_corrected_solve_with_kfac_eigenvalues_is_eigen_solve(
    backend: testing.Backend, dtype: np.dtype
) -> None:
    rng = np.random.default_rng(11)
    x_a, x_g = rng.standard_normal((6, 3)), rng.standard_normal((6, 2))
    a_eigh = kron.eigh(backend.asarray((x_a.T @ x_a / 6).astype(dtype)))
    g_eigh = kron.eigh(backend.asarray((x_g.T @ x_g / 6).astype(dtype)))
    grad = backend.asarray(rng.standard_normal((4, 2, 3)).astype(dtype))

    def both(grad, a_eigh, g_eigh):
        products = g_eigh.values[:, None] * a_eigh.values[None, :]
        expected = kron.eigen_solve(grad, a_eigh, g_eigh, 0.05)
        return expected, kron.corrected_solve(grad, a_eigh, g_eigh, products, 0.05)

    expected, result = compiled(backend, both)(grad, a_eigh, g_eigh)
    assert_close(to_np(backend, result), to_np(backend, expected), dtype, condition=4.0)


# --------------------------------------------------------------------------------------
# jax.jit, errors
# --------------------------------------------------------------------------------------


def test_eigen_correction_and_corrected_solve_work_under_jit(dtype: np.dtype) -> None:
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    rng = np.random.default_rng(3)
    inputs = [rng.standard_normal(shape).astype(dtype) for shape in ((5, 2, 3), (5, 2, 2), (2, 3))]

    def step(a, e, grad, damping):
        a_eigh, g_eigh = kron.eigh(kron.input_factor(a)), kron.eigh(kron.factor(e))
        pairs = kron.eigen_correction(a, e, a_eigh, g_eigh, method="pairs")
        explicit = kron.eigen_correction(a, e, a_eigh, g_eigh, method="explicit")
        return pairs, explicit, kron.corrected_solve(grad, a_eigh, g_eigh, pairs, damping)

    # The reference is the same computation on NumPy (eager JAX would compile every operation).
    eager = step(*inputs, np.asarray(0.1, dtype=dtype))
    traced = jax.jit(step)(*(jnp.asarray(x) for x in inputs), jnp.asarray(0.1, dtype=dtype))
    for x, y in zip(eager, traced):
        assert y.dtype == dtype
        assert_close(np.asarray(y), np.asarray(x), dtype, condition=100.0)


def _error_cases() -> list[tuple[str, Callable[[Callable], Any], type, str]]:
    rng = np.random.default_rng(1)
    a, e = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    u3 = np.linalg.qr(rng.standard_normal((3, 3)))[0]
    u2 = np.linalg.qr(rng.standard_normal((2, 2)))[0]
    grad, correction = rng.standard_normal((2, 3)), np.ones((2, 3))
    nan_a = a.copy()
    nan_a[1, 2] = np.nan
    nan_grad = grad.copy()
    nan_grad[0, 0] = np.nan
    inf_correction = correction.copy()
    inf_correction[1, 1] = np.inf
    negative = correction.copy()
    negative[0, 2] = -1.0

    def eig(c, vectors):
        return kron.Eigh(c(np.ones(vectors.shape[0])), c(vectors))

    def correct(c, a=a, e=e, ua=u3, ug=u2, **kw):
        return kron.eigen_correction(c(a), c(e), eig(c, ua), eig(c, ug), **kw)

    def solve(c, grad=grad, ua=u3, ug=u2, correction=correction, damping=0.1):
        return kron.corrected_solve(c(grad), eig(c, ua), eig(c, ug), c(correction), damping)

    error = ValueError
    return [
        (
            "correction_int_a",
            lambda c: correct(c, a=np.ones((4, 3), dtype=np.int64)),
            error,
            "a must have a real floating",
        ),
        (
            "correction_leading_shapes",
            lambda c: correct(c, e=np.ones((5, 2))),
            error,
            "leading shape",
        ),
        ("correction_ndim", lambda c: correct(c, a=np.ones((4, 1, 1, 3))), error, "a and e"),
        ("correction_a_eigh_size", lambda c: correct(c, ua=u2), error, "a_eigh"),
        ("correction_g_eigh_size", lambda c: correct(c, ug=u3), error, "g_eigh"),
        (
            "correction_not_eigh",
            lambda c: kron.eigen_correction(c(a), c(e), (c(u3),), eig(c, u2)),
            error,
            "a_eigh",
        ),
        ("correction_nan_a", lambda c: correct(c, a=nan_a), error, "a contains NaN"),
        ("correction_method", lambda c: correct(c, method="dense"), error, "method"),
        (
            "solve_correction_shape",
            lambda c: solve(c, correction=np.ones((3, 2))),
            error,
            "correction has shape",
        ),
        ("solve_negative_damping", lambda c: solve(c, damping=-0.1), error, "damping"),
        (
            "solve_not_positive",
            lambda c: solve(c, correction=negative, damping=0.5),
            curvlinalg.NotPositiveDefiniteError,
            "correction \\+ damping",
        ),
        (
            "solve_zero_correction_undamped",
            lambda c: solve(c, correction=0 * correction, damping=0.0),
            curvlinalg.NotPositiveDefiniteError,
            "correction",
        ),
        ("solve_nan_grad", lambda c: solve(c, grad=nan_grad), error, "grad contains NaN"),
        (
            "solve_inf_correction",
            lambda c: solve(c, correction=inf_correction),
            error,
            "correction contains NaN",
        ),
        ("solve_a_eigh_size", lambda c: solve(c, ua=u2), error, "a_eigh"),
        ("solve_g_eigh_size", lambda c: solve(c, ug=u3), error, "g_eigh"),
        ("solve_grad_1d", lambda c: solve(c, grad=np.ones(3)), error, "grad"),
        (
            "solve_correction_dtype",
            lambda c: kron.corrected_solve(
                c(grad), eig(c, u3), eig(c, u2), c(correction.astype(np.float32)), 0.1
            ),
            error,
            "dtype mismatch.*correction",
        ),
    ]


ERROR_CASES = _error_cases()


@pytest.mark.parametrize(
    "call, error, pattern", [case[1:] for case in ERROR_CASES], ids=[c[0] for c in ERROR_CASES]
)
def test_bad_input_raises_a_value_error_naming_the_argument(
    backend: testing.Backend, call: Callable, error: type, pattern: str
) -> None:
    with pytest.raises(error, match=pattern):
        call(backend.asarray)


def test_mixed_namespaces_raise() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    a, e = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    eigh_a = kron.eigh(torch.asarray(a.T @ a))
    eigh_g = kron.eigh(torch.asarray(e.T @ e))
    with pytest.raises(ValueError, match="different libraries"):
        kron.eigen_correction(a, torch.asarray(e), eigh_a, eigh_g)
    correction = kron.eigen_correction(torch.asarray(a), torch.asarray(e), eigh_a, eigh_g)
    with pytest.raises(ValueError, match="different libraries"):
        kron.corrected_solve(
            torch.ones(2, 3, dtype=torch.float64), eigh_a, eigh_g, np.asarray(correction), 0.1
        )


def test_check_finite_false_skips_the_scan() -> None:
    a = np.ones((3, 2))
    a[0, 0] = np.nan
    identity = kron.Eigh(np.ones(2), np.eye(2))
    result = kron.eigen_correction(a, np.ones((3, 2)), identity, identity, check_finite=False)
    assert np.isnan(result).any()


# --------------------------------------------------------------------------------------
# corrected_solve_captures = corrected_solve of the mean gradient, without forming it
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lead, d_in, d_out, from_captures",
    [
        ((2,), 4, 3, True),  # N = 2 rows: rotate the captures
        ((1, 2), 3, 4, True),  # (B, T, d): positions summed within the example
        ((6, 3), 4, 3, False),  # N = 18 ≥ d: form ∇W first
    ],
)
def test_corrected_solve_captures_is_the_dense_solve_of_the_mean_gradient(
    backend: testing.Backend,
    dtype: np.dtype,
    lead: tuple[int, ...],
    d_in: int,
    d_out: int,
    from_captures: bool,
) -> None:
    if backend.name == "jax" and len(lead) == 2 and from_captures:
        pytest.skip("JAX compiles per shape: one case per order suffices there")
    rows = int(np.prod(lead))
    assert kron._rotate_from_captures(rows, d_in, d_out) == from_captures  # both orders run
    rng = np.random.default_rng(rows * 10 + d_in)
    a = rng.standard_normal(lead + (d_in,)).astype(dtype)
    e = rng.standard_normal(lead + (d_out,)).astype(dtype)
    u_a = np.linalg.qr(rng.standard_normal((d_in, d_in)))[0].astype(dtype)
    u_g = np.linalg.qr(rng.standard_normal((d_out, d_out)))[0].astype(dtype)
    correction = (0.1 + rng.standard_normal((d_out, d_in)) ** 2).astype(dtype)
    damping = 0.05
    # Reference: ∇W from explicit per-example gradients, then the dense system.
    grad = reference_per_example(a, e).mean(axis=0)
    q = np.kron(f64(u_a), f64(u_g))
    dense = q @ np.diag(vec(f64(correction))) @ q.T + damping * np.eye(d_in * d_out)
    expected = mat(np.linalg.solve(dense, vec(grad)), (d_out, d_in))
    cast = backend.asarray
    a_b, e_b = cast(a), cast(e)
    result = compiled(
        backend, lambda *arrays: kron.corrected_solve_captures(*arrays, damping)
    )(
        a_b,
        e_b,
        kron.Eigh(cast(np.ones(d_in, dtype)), cast(u_a)),
        kron.Eigh(cast(np.ones(d_out, dtype)), cast(u_g)),
        cast(correction),
    )
    assert_backend_array(result, backend, dtype)
    # κ of the system times the accumulation length (rows of ∇W, then two rotations).
    condition = float(np.linalg.cond(dense)) * (rows + d_in + d_out)
    assert_close(to_np(backend, result), expected, dtype, condition)
    np.testing.assert_array_equal(backend.to_numpy(a_b), a)
    np.testing.assert_array_equal(backend.to_numpy(e_b), e)


def test_corrected_solve_captures_errors_name_the_argument() -> None:
    rng = np.random.default_rng(5)
    a, e = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    identity3, identity2 = kron.Eigh(np.ones(3), np.eye(3)), kron.Eigh(np.ones(2), np.eye(2))
    ones = np.ones((2, 3))
    solve = kron.corrected_solve_captures
    with pytest.raises(ValueError, match="correction has shape"):
        solve(a, e, identity3, identity2, np.ones((3, 2)), 0.1)
    with pytest.raises(ValueError, match="a_eigh"):
        solve(a, e, identity2, identity2, ones, 0.1)
    with pytest.raises(ValueError, match="shape mismatch: a has leading shape"):
        solve(a, e[:3], identity3, identity2, ones, 0.1)
    with pytest.raises(curvlinalg.NotPositiveDefiniteError, match="correction"):
        solve(a, e, identity3, identity2, -ones, 0.1)
    with pytest.raises(ValueError, match="damping"):
        solve(a, e, identity3, identity2, ones, -1.0)
    bad = a.copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="a"):
        solve(bad, e, identity3, identity2, ones, 0.1)


@pytest.mark.parametrize("bad", ["matrix", "list", "single"])
def test_a_non_eigh_decomposition_is_a_value_error_naming_the_argument(bad: str) -> None:
    """A bare matrix (the factor itself, a common slip), a list, or a 1-tuple for ``a_eigh``
    is refused with a ValueError naming ``a_eigh`` — not an IndexError from inside."""
    rng = np.random.default_rng(6)
    a, e = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    g_eigh = kron.Eigh(np.ones(2), np.eye(2))
    decomposition = {
        "matrix": np.eye(3),
        "list": [np.ones(3), np.eye(3)],
        "single": (np.eye(3),),
    }[bad]
    calls = [
        lambda: kron.eigen_solve(np.ones((2, 3)), decomposition, g_eigh, 0.1),
        lambda: kron.corrected_solve(np.ones((2, 3)), decomposition, g_eigh, np.ones((2, 3)), 0.1),
        lambda: kron.corrected_solve_captures(a, e, decomposition, g_eigh, np.ones((2, 3)), 0.1),
        lambda: kron.eigen_correction(a, e, decomposition, g_eigh),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="a_eigh must be an Eigh"):
            call()
