r"""Property-based tests of :mod:`curvlinalg.woodbury` against dense NumPy references.

Conventions (DESIGN.md, API.md): captures are ``[(a, e), ...]`` per layer with ``a`` of shape
``(B, d_in)`` or ``(B, T, d_in)`` and ``e`` of shape ``(B, d_out)`` or ``(B, T, d_out)``; the
per-example gradient is ``g_i = Σ_t e_itᵀ a_it`` (``d_out×d_in``); ``G`` is the ``D×B`` matrix
whose column ``i`` is ``vec(g_i)`` with all layers stacked (column-major ``vec``); the
subsampled Fisher is ``F = (1/B)·G Gᵀ``. Identities are numbered as in ``papers/NOTES.md`` §6
(11–14, 16).

The references never call curvlinalg: per-example gradients come from ``np.einsum`` on the
captures, ``G`` is materialised densely and the damped systems are solved with
``np.linalg.solve`` / ``slogdet`` in float64 *from the cast inputs*, so a float32 test measures
only the library's rounding.

Tolerances: :func:`tests.conftest.assert_close`, a norm-wise ``32·κ·eps(dtype)``.

* Solves: ``κ = 1 + s‖G‖₂²/λ`` computed from the dense ``G``, the condition of the ``B×B``
  system the Woodbury formula solves; it bounds ``np.linalg.cond(λI + s·GGᵀ)`` from above,
  and it is what the formula attains: for B > D (``tall`` draws) ``κ(λI + sGGᵀ)`` can be
  ≈ 1 while ``u/λ`` and the correction cancel to ``≈ κ·eps`` (seen with D = 1,
  λ = 10⁻³s‖G‖²). With positions it is multiplied by the cancellation in forming
  ``g_i = Σ_t e_itᵀ a_it`` (:func:`solve_condition`; 1 for ``(B, d)`` captures).
* Contractions (Gram, ``Gᵀu``, ``Gw``, per-example gradients) have no system to solve; their
  rounding is bounded entrywise by ``n·eps`` times the same contraction of absolute values
  (``n`` the number of accumulated products), so the stated "condition" is
  ``n·‖|contraction|‖/‖contraction‖`` (the cancellation factor).

Damping is drawn *relative* to ``s‖G‖₂²`` so that both well and badly conditioned systems occur
and float32 stays meaningful (``rel ≥ 0.1`` for float32, i.e. ``κ ≤ 11``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import strategies as st

import curvlinalg
from curvlinalg import testing, woodbury
from tests import references
from tests.conftest import assert_backend_array, assert_close, rtol
from tests.references import f64, to_np, unvec_layers, with_positions

property_test = references.property_tests(references.quarter_on_jax)

F32 = np.dtype(np.float32)
F64 = np.dtype(np.float64)


# --------------------------------------------------------------------------------------
# Dense references (none of them calls curvlinalg)
# --------------------------------------------------------------------------------------


def reference_per_example(
    captures: Sequence[tuple[np.ndarray, np.ndarray]], absolute: bool = False
):
    """``g_i = Σ_t e_itᵀ a_it`` per layer, ``(B, d_out, d_in)``, by einsum (of ``|a|, |e|``
    when ``absolute``: an entrywise bound on the terms summed)."""
    result = []
    for a, e in captures:
        a3, e3 = with_positions(a), with_positions(e)
        if absolute:
            a3, e3 = np.abs(a3), np.abs(e3)
        result.append(np.einsum("bto,bti->boi", e3, a3))
    return result


def vec_layers(mats: Sequence[np.ndarray]) -> np.ndarray:
    """Stack of per-layer ``(..., d_out, d_in)`` → ``(..., D)``, column-major vec per layer."""
    return np.concatenate(
        [np.swapaxes(f64(m), -1, -2).reshape(m.shape[:-2] + (-1,)) for m in mats], axis=-1
    )


def shapes_of(captures) -> list[tuple[int, int]]:
    return [(int(e.shape[-1]), int(a.shape[-1])) for a, e in captures]


def dense_g(captures, absolute: bool = False) -> np.ndarray:
    """The ``D×B`` matrix ``G`` with columns ``vec(g_i)``, all layers stacked."""
    return vec_layers(reference_per_example(captures, absolute)).T


def layer_slices(captures) -> list[slice]:
    out, start = [], 0
    for d_out, d_in in shapes_of(captures):
        out.append(slice(start, start + d_out * d_in))
        start += d_out * d_in
    return out


def dense_system(captures, damping: float, scale: float, block_diagonal: bool = False):
    """``λI + s·GGᵀ`` (with its cross-layer blocks zeroed when ``block_diagonal``)."""
    g = dense_g(captures)
    fisher = scale * g @ g.T
    if block_diagonal:
        mask = np.zeros_like(fisher)
        for part in layer_slices(captures):
            mask[part, part] = 1.0
        fisher = fisher * mask
    return damping * np.eye(g.shape[0]) + fisher


def dense_solve(matrix: np.ndarray, vectors: Sequence[np.ndarray], shapes) -> list[np.ndarray]:
    rhs = vec_layers(vectors)  # (..., D)
    solved = np.linalg.solve(matrix, rhs.reshape(-1, rhs.shape[-1]).T).T.reshape(rhs.shape)
    return unvec_layers(solved, shapes)


def cond(m: np.ndarray) -> float:
    return float(np.linalg.cond(f64(m)))


def woodbury_condition(captures, damping: float, scale: float) -> float:
    """``1 + s‖G‖₂²/λ``: the condition of the ``B×B`` system ``I + (s/λ)GᵀG`` and the bound
    that governs the Woodbury formula ``u/λ − (s/λ²)G(I + (s/λ)GᵀG)⁻¹Gᵀu``. It is ≥
    ``κ(λI + sGGᵀ)`` and can exceed it greatly when B > D (then ``GGᵀ`` may have full rank and
    the formula still cancels ``u/λ`` against a correction of size ``s‖G‖²/λ²·‖u‖``)."""
    return 1.0 + scale * float(np.linalg.norm(dense_g(captures), 2)) ** 2 / damping


def solve_condition(captures, damping: float, scale: float) -> float:
    """:func:`woodbury_condition` times the cancellation in forming the per-example gradients
    ``g_i = Σ_t e_itᵀ a_it`` over positions, ``(‖Σ_t |e_it||a_it|ᵀ‖/‖g_i‖)²`` summed over the
    batch (exactly 1 for ``(B, d)`` captures): the Gram, ``Gᵀu`` and ``Gw`` carry relative
    errors of that size, which the solve amplifies by its condition. (Found with B = 1,
    T = 3: ``g = −0.712 + 0.532 + 0.184 = 0.004``, and λ = 10⁻³·s·g².)"""
    g, g_abs = dense_g(captures), dense_g(captures, absolute=True)
    norm = np.linalg.norm(g)
    ratio = 1.0 if norm == 0 else float(np.linalg.norm(g_abs) / norm) ** 2
    return woodbury_condition(captures, damping, scale) * ratio


def cancellation(absolute: np.ndarray, value: np.ndarray, terms: int) -> float:
    """``terms·‖|·|‖/‖·‖``: the condition stated for a contraction (see module docstring)."""
    norm = np.linalg.norm(value)
    if norm == 0.0:
        return float(terms)
    return float(terms * np.linalg.norm(absolute) / norm)


def terms(captures) -> int:
    """Number of products accumulated into one Gram entry (a generous count)."""
    return max(
        (with_positions(a).shape[1] ** 2) * (a.shape[-1] + e.shape[-1]) + a.shape[-1] * e.shape[-1]
        for a, e in captures
    ) * len(captures)


# --------------------------------------------------------------------------------------
# Drawing problems
# --------------------------------------------------------------------------------------


def draw_captures(
    data: st.DataObject,
    backend: testing.Backend,
    dtype: np.dtype,
    *,
    regime: str = "any",
    positions: Sequence[int | None] = (None, 1, 2, 3),
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Captures with layers drawn independently (each dense or with its own T), cast to dtype.

    ``regime="tall"``: one layer of width ≤ 2 and B ∈ {5, 6}, so B > D (more examples than
    parameters: GGᵀ can have full rank); ``"wide"``: widths ≥ 2 and B ≤ 3, so B < D.

    On JAX the shapes are fixed per regime (values still drawn): its eager mode compiles
    every operation once per new shape, which would dominate the run time. JAX's layout is
    a dense layer followed by a ``(B, 2, ·)`` layer; the other backends vary everything.
    """
    if backend.name == "jax":
        if regime == "tall":
            layers, batch, width, layer_positions = 1, 5, 2, [None]
        else:
            layers, batch, width, layer_positions = 2, 3, 3, [None, 2]
    else:
        if regime == "tall":
            layers, batch = 1, data.draw(st.integers(5, 6))
            width = st.integers(1, 2)
        elif regime == "wide":
            layers, batch = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
            width = st.integers(2, 5)
        else:
            layers, batch = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 6))
            width = st.integers(1, 5)
        layer_positions = [data.draw(st.sampled_from(list(positions))) for _ in range(layers)]
    result = []
    for count in layer_positions:
        ((a, e),) = data.draw(
            testing.captures(num_layers=1, batch_size=batch, width=width, positions=count)
        )
        result.append((a.astype(dtype), e.astype(dtype)))
    parameters = sum(d_out * d_in for d_out, d_in in shapes_of(result))
    if regime == "tall":
        assert batch > parameters
    if regime == "wide":
        assert batch < parameters
    return result


def draw_vectors(data: st.DataObject, captures, lead: tuple[int, ...], dtype: np.dtype):
    return [data.draw(testing.arrays(lead + shape, dtype=dtype)) for shape in shapes_of(captures)]


def to_backend(backend: testing.Backend, captures):
    return [(backend.asarray(a), backend.asarray(e)) for a, e in captures]


def relative_dampings(dtype: np.dtype) -> list[float]:
    return [0.1, 1.0, 10.0] if np.dtype(dtype) == F32 else [1e-3, 0.1, 1.0, 10.0]


def damping_for(captures, scale: float, relative: float) -> float:
    """``relative·s‖G‖₂²`` (``relative`` when that is zero): ``κ ≤ 1 + 1/relative``."""
    top = scale * np.linalg.norm(dense_g(captures), 2) ** 2
    return float(relative * top) if top > 0 else float(relative)


# --------------------------------------------------------------------------------------
# per_example
# --------------------------------------------------------------------------------------


@property_test(data=st.data())
def test_per_example_is_the_einsum_of_the_captures(
    backend: testing.Backend, dtype: np.dtype, data: st.DataObject
) -> None:
    captures = draw_captures(data, backend, dtype)
    result = woodbury.per_example(to_backend(backend, captures))
    expected = reference_per_example(captures)
    bound = reference_per_example(captures, absolute=True)
    assert isinstance(result, list) and len(result) == len(captures)
    for out, ref, absolute, (a, _) in zip(result, expected, bound, captures):
        assert_backend_array(out, backend, dtype)
        count = with_positions(a).shape[1]
        assert_close(to_np(backend, out), ref, dtype, cancellation(absolute, ref, count))


# --------------------------------------------------------------------------------------
# Identity 12: gram == GᵀG (dense and (B, T, ·) captures; implicit, materialize, auto)
# --------------------------------------------------------------------------------------


@property_test(data=st.data(), method=st.sampled_from(["auto", "implicit", "materialize"]))
def test_gram_is_gt_g(
    backend: testing.Backend, dtype: np.dtype, data: st.DataObject, method: str
) -> None:
    captures = draw_captures(data, backend, dtype)
    result = woodbury.gram(to_backend(backend, captures), method=method)
    assert_backend_array(result, backend, dtype)
    g, g_abs = dense_g(captures), dense_g(captures, absolute=True)
    expected = g.T @ g
    out = to_np(backend, result)
    assert out.shape == (g.shape[1],) * 2
    assert np.array_equal(out, out.T), "gram must be exactly symmetric"
    assert_close(out, expected, dtype, cancellation(g_abs.T @ g_abs, expected, terms(captures)))


@property_test(data=st.data())
def test_gram_methods_agree_in_both_regimes_of_auto(
    backend: testing.Backend, dtype: np.dtype, data: st.DataObject
) -> None:
    # One layer whose shape puts "auto" on a chosen side of T²(d_in+d_out) ≤ d_in·d_out.
    implicit_side = data.draw(st.booleans())
    batch = 3 if backend.name == "jax" else data.draw(st.integers(1, 5))
    if implicit_side:  # T = 1, d_in = d_out = 4: 1·8 ≤ 16
        count, width = (None if backend.name == "jax" else data.draw(st.sampled_from([None, 1]))), 4
    else:  # T ≥ 2, d ≤ 5: 4(d_in + d_out) > d_in·d_out since (d_in − 4)(d_out − 4) < 16
        count = 2 if backend.name == "jax" else data.draw(st.sampled_from([2, 3]))
        width = 2 if backend.name == "jax" else data.draw(st.integers(1, 5))
    ((a, e),) = data.draw(
        testing.captures(num_layers=1, batch_size=batch, width=width, positions=count)
    )
    captures = [(a.astype(dtype), e.astype(dtype))]
    positions = 1 if count is None else count
    d_in, d_out = a.shape[-1], e.shape[-1]
    chooses_implicit = positions**2 * (d_in + d_out) <= d_in * d_out
    assert chooses_implicit == implicit_side

    backend_caps = to_backend(backend, captures)
    results = {
        m: woodbury.gram(backend_caps, method=m) for m in ("auto", "implicit", "materialize")
    }
    g, g_abs = dense_g(captures), dense_g(captures, absolute=True)
    expected = g.T @ g
    condition = cancellation(g_abs.T @ g_abs, expected, terms(captures))
    for result in results.values():
        assert_backend_array(result, backend, dtype)
        assert_close(to_np(backend, result), expected, dtype, condition)
    # The two methods agree with each other (both within the tolerance of the reference).
    assert_close(
        to_np(backend, results["implicit"]),
        to_np(backend, results["materialize"]),
        dtype,
        2 * condition,
    )
    # "auto" runs exactly the chosen method: identical operations give identical bits.
    chosen = "implicit" if chooses_implicit else "materialize"
    np.testing.assert_array_equal(
        backend.to_numpy(results["auto"]), backend.to_numpy(results[chosen])
    )


# --------------------------------------------------------------------------------------
# Identity 13: rmatvec == Gᵀu and matvec == Gw (also with a leading K axis)
# --------------------------------------------------------------------------------------


@property_test(data=st.data(), lead=st.sampled_from([(), (1,), (3,)]))
def test_rmatvec_and_matvec_are_products_with_g(
    backend: testing.Backend, dtype: np.dtype, data: st.DataObject, lead: tuple[int, ...]
) -> None:
    captures = draw_captures(data, backend, dtype)
    batch = captures[0][0].shape[0]
    vectors = draw_vectors(data, captures, lead, dtype)
    w = data.draw(testing.arrays(lead + (batch,), dtype=dtype))
    caps_b = to_backend(backend, captures)
    g, g_abs = dense_g(captures), dense_g(captures, absolute=True)
    count = terms(captures)

    result = woodbury.rmatvec(caps_b, [backend.asarray(v) for v in vectors])
    assert_backend_array(result, backend, dtype)
    u = vec_layers(vectors)  # (..., D)
    expected = u @ g  # (..., B) = (Gᵀu)ᵀ
    bound = np.abs(u) @ g_abs
    assert_close(to_np(backend, result), expected, dtype, cancellation(bound, expected, count))

    products = woodbury.matvec(caps_b, backend.asarray(w))
    assert isinstance(products, list) and len(products) == len(captures)
    expected = unvec_layers(f64(w) @ g.T, shapes_of(captures))  # G w per layer
    bound = unvec_layers(np.abs(f64(w)) @ g_abs.T, shapes_of(captures))
    for out, ref, absolute in zip(products, expected, bound):
        assert_backend_array(out, backend, dtype)
        assert_close(to_np(backend, out), ref, dtype, cancellation(absolute, ref, count))


# --------------------------------------------------------------------------------------
# Identity 11: solve == dense (λI + s·GGᵀ)⁻¹ u
# --------------------------------------------------------------------------------------


@property_test(
    data=st.data(),
    regime=st.sampled_from(["tall", "wide"]),
    lead=st.sampled_from([(), (3,)]),
    scale=st.sampled_from(["1/B", 1.0, 2.5, 0.0]),
)
def test_solve_is_the_dense_damped_solve(
    backend: testing.Backend,
    dtype: np.dtype,
    data: st.DataObject,
    regime: str,
    lead: tuple[int, ...],
    scale: Any,
) -> None:
    captures = draw_captures(data, backend, dtype, regime=regime)
    batch = captures[0][0].shape[0]
    s = 1.0 / batch if scale == "1/B" else float(scale)  # "1/B": the natural gradient
    damping = damping_for(captures, s, data.draw(st.sampled_from(relative_dampings(dtype))))
    vectors = draw_vectors(data, captures, lead, dtype)
    matrix = dense_system(captures, damping, s)
    expected = dense_solve(matrix, vectors, shapes_of(captures))
    assert cond(matrix) <= woodbury_condition(captures, damping, s) * (1 + 1e-8)
    condition = solve_condition(captures, damping, s)

    factors = woodbury.factorize(to_backend(backend, captures), damping, s)
    assert isinstance(factors, woodbury.Woodbury)
    assert_backend_array(factors.lower, backend, dtype)
    result = woodbury.solve(factors, [backend.asarray(v) for v in vectors])
    assert isinstance(result, list) and len(result) == len(captures)
    for out, ref in zip(result, expected):
        assert_backend_array(out, backend, dtype)
        assert_close(to_np(backend, out), ref, dtype, condition)
    # The stacked solution as a whole (a relative error spread over the layers).
    assert_close(
        vec_layers([to_np(backend, r) for r in result]), vec_layers(expected), dtype, condition
    )


@property_test(
    data=st.data(),
    regime=st.sampled_from(["tall", "wide"]),
    lead=st.sampled_from([(), (2,)]),
)
def test_solve_span_is_the_dense_solve_of_g_c(
    backend: testing.Backend,
    dtype: np.dtype,
    data: st.DataObject,
    regime: str,
    lead: tuple[int, ...],
) -> None:
    """Push-through: (λI + sGGᵀ)⁻¹ G c == dense solve of the explicit G c; with c = 1/B it is
    the natural gradient of the batch's own mean gradient."""
    captures = draw_captures(data, backend, dtype, regime=regime)
    batch = captures[0][0].shape[0]
    s = 1.0 / batch
    damping = damping_for(captures, s, data.draw(st.sampled_from(relative_dampings(dtype))))
    coefficients = data.draw(testing.arrays(lead + (batch,))).astype(dtype)
    g = dense_g(captures)
    rhs = (g @ coefficients.astype(np.float64).T).T  # (..., D)
    matrix = dense_system(captures, damping, s)
    expected = dense_solve(matrix, unvec_layers(rhs, shapes_of(captures)), shapes_of(captures))
    factors = woodbury.factorize(to_backend(backend, captures), damping, s)
    result = woodbury.solve_span(factors, backend.asarray(coefficients))
    assert isinstance(result, list) and len(result) == len(captures)
    # w = (λI + sGᵀG)⁻¹c carries the solve's error; G w then cancels over the batch.
    weights = np.linalg.solve(damping * np.eye(batch) + s * g.T @ g, coefficients.T.astype(float))
    combination = cancellation(np.abs(g) @ np.abs(weights), g @ weights, batch)
    condition = solve_condition(captures, damping, s) * combination
    for out, ref in zip(result, expected):
        assert_backend_array(out, backend, dtype)
        assert tuple(out.shape) == ref.shape
    assert_close(
        vec_layers([to_np(backend, r) for r in result]), vec_layers(expected), dtype, condition
    )


@property_test(data=st.data())
def test_solve_with_k_right_hand_sides_equals_k_single_solves(
    backend: testing.Backend, dtype: np.dtype, data: st.DataObject
) -> None:
    if backend.name == "jax":  # shapes covered by the test above; spare the compilations
        return
    captures = draw_captures(data, backend, dtype)
    batch = captures[0][0].shape[0]
    damping = damping_for(
        captures, 1.0 / batch, data.draw(st.sampled_from(relative_dampings(dtype)))
    )
    vectors = draw_vectors(data, captures, (2,), dtype)
    factors = woodbury.factorize(to_backend(backend, captures), damping, 1.0 / batch)
    together = woodbury.solve(factors, [backend.asarray(v) for v in vectors])
    condition = solve_condition(captures, damping, 1.0 / batch)
    for k in range(2):
        single = woodbury.solve(factors, [backend.asarray(v[k]) for v in vectors])
        for out_k, out in zip(together, single):
            assert tuple(out.shape) == tuple(out_k.shape[1:])
            assert_close(to_np(backend, out_k)[k], to_np(backend, out), dtype, condition)


# --------------------------------------------------------------------------------------
# logdet == slogdet of the dense λI + s·GGᵀ
# --------------------------------------------------------------------------------------


@property_test(
    data=st.data(),
    regime=st.sampled_from(["tall", "wide"]),
    scale=st.sampled_from(["1/B", 1.0, 0.0]),
)
def test_logdet_is_the_dense_log_determinant(
    backend: testing.Backend, dtype: np.dtype, data: st.DataObject, regime: str, scale: Any
) -> None:
    captures = draw_captures(data, backend, dtype, regime=regime)
    batch = captures[0][0].shape[0]
    s = 1.0 / batch if scale == "1/B" else float(scale)
    damping = damping_for(captures, s, data.draw(st.sampled_from(relative_dampings(dtype))))
    damping *= data.draw(st.sampled_from([1.0, 1e-2, 1e2]))  # log λ of either sign
    matrix = dense_system(captures, damping, s)
    sign, expected = np.linalg.slogdet(matrix)
    assert sign == 1.0
    result = woodbury.logdet(woodbury.factorize(to_backend(backend, captures), damping, s))
    assert_backend_array(result, backend, dtype)
    assert tuple(result.shape) == ()
    # A relative perturbation δ of the B×B system moves log det by ≤ B·κ·δ; D·log λ is
    # rounded relatively.
    parameters = matrix.shape[0]
    tolerance = rtol(dtype, solve_condition(captures, damping, s)) * (
        batch * terms(captures) + abs(parameters * math.log(damping))
    )
    assert abs(float(to_np(backend, result)) - expected) <= tolerance, (float(result), expected)


# --------------------------------------------------------------------------------------
# Identity 16: the Gram is PSD; I + (s/λ)·Gram is SPD and factorize holds its Cholesky factor
# --------------------------------------------------------------------------------------


@property_test(data=st.data(), relative=st.sampled_from([1e-2, 1.0, 100.0]))
def test_gram_is_psd_and_the_damped_system_is_spd(
    backend: testing.Backend, dtype: np.dtype, data: st.DataObject, relative: float
) -> None:
    captures = draw_captures(data, backend, dtype)
    batch = captures[0][0].shape[0]
    caps_b = to_backend(backend, captures)
    kernel = to_np(backend, woodbury.gram(caps_b))
    g, g_abs = dense_g(captures), dense_g(captures, absolute=True)
    size = np.linalg.norm(g_abs.T @ g_abs)
    slack = rtol(dtype, terms(captures)) * size
    values = np.linalg.eigvalsh(kernel)
    assert values.min() >= -slack, (values, slack)
    # Rank ≤ min(B, D): with B > D the surplus eigenvalues are (numerically) zero.
    parameters = g.shape[0]
    if batch > parameters:
        assert np.all(np.abs(values[: batch - parameters]) <= slack), values

    damping = damping_for(captures, 1.0, relative)
    system = np.eye(batch) + kernel / damping
    assert np.linalg.eigvalsh(system).min() > 0.0
    factors = woodbury.factorize(caps_b, damping, 1.0)
    lower = to_np(backend, factors.lower)
    assert np.array_equal(lower, np.tril(lower)) and np.all(np.diag(lower) > 0)
    expected = np.eye(batch) + g.T @ g / damping
    # L Lᵀ = I + Gram/λ up to the rounding of the Gram (scaled by 1/λ) and of the factorisation.
    assert_close(lower @ lower.T, expected, dtype, cond(expected) * terms(captures))


# --------------------------------------------------------------------------------------
# Identity 14: block-diagonal (layer-wise) solves
# --------------------------------------------------------------------------------------


@property_test(data=st.data(), lead=st.sampled_from([(), (2,)]))
def test_solve_layers_is_the_solve_with_the_block_diagonal_fisher(
    backend: testing.Backend, dtype: np.dtype, data: st.DataObject, lead: tuple[int, ...]
) -> None:
    captures = draw_captures(data, backend, dtype)
    batch = captures[0][0].shape[0]
    s = 1.0 / batch
    damping = damping_for(captures, s, data.draw(st.sampled_from(relative_dampings(dtype))))
    vectors = draw_vectors(data, captures, lead, dtype)
    matrix = dense_system(captures, damping, s, block_diagonal=True)
    expected = dense_solve(matrix, vectors, shapes_of(captures))
    caps_b = to_backend(backend, captures)
    factors = woodbury.factorize_layers(caps_b, damping, s)
    assert isinstance(factors, list) and len(factors) == len(captures)
    assert all(isinstance(f, woodbury.Woodbury) for f in factors)
    result = woodbury.solve_layers(factors, [backend.asarray(v) for v in vectors])
    assert len(result) == len(captures)
    for out in result:
        assert_backend_array(out, backend, dtype)
    condition = solve_condition(captures, damping, s)  # ≥ every layer's own
    assert_close(
        vec_layers([to_np(backend, r) for r in result]), vec_layers(expected), dtype, condition
    )
    if len(captures) == 1:  # one layer: block-diagonal = full, the same computation
        full = woodbury.solve(woodbury.factorize(caps_b, damping, s), [backend.asarray(vectors[0])])
        np.testing.assert_array_equal(backend.to_numpy(result[0]), backend.to_numpy(full[0]))


def test_block_diagonal_and_full_solves_differ_for_two_layers() -> None:
    """Power check: the cross-layer blocks matter, so the two tests above can tell them apart."""
    rng = np.random.default_rng(11)
    captures = [(rng.standard_normal((3, 2)), rng.standard_normal((3, 2))) for _ in range(2)]
    vectors = [rng.standard_normal((2, 2)) for _ in range(2)]
    full = woodbury.solve(woodbury.factorize(captures, 0.1, 1 / 3), vectors)
    layered = woodbury.solve_layers(woodbury.factorize_layers(captures, 0.1, 1 / 3), vectors)
    difference = np.linalg.norm(vec_layers(full) - vec_layers(layered))
    assert difference > 0.1 * np.linalg.norm(vec_layers(full))
    expected = dense_solve(dense_system(captures, 0.1, 1 / 3, True), vectors, shapes_of(captures))
    assert_close(vec_layers(layered), vec_layers(expected), F64, 1e3)


# --------------------------------------------------------------------------------------
# Fixed examples: a hand-computed Gram with positions; the Woodbury formula's catch
# --------------------------------------------------------------------------------------


def test_gram_with_positions_is_exact_not_spatially_factorised(backend: testing.Backend) -> None:
    # One example, T = 2: g = e_1ᵀa_1 + e_2ᵀa_2 with a_t, e_t unit vectors chosen so that
    # the exact ‖g‖² = 2 (orthogonal terms) while the factorised approximation
    # (Σ_t a_t a_tᵀ)·(Σ_t e_t e_tᵀ) summed gives (1+1)·(1+1) = 4 (cross terms (a_1·a_2)(e_1·e_2)
    # are 0 here but the factorised form adds ‖a_1‖²‖e_2‖² + ‖a_2‖²‖e_1‖²).
    a = np.array([[[1.0, 0.0], [0.0, 1.0]]])
    e = np.array([[[1.0, 0.0], [0.0, 1.0]]])
    for method in ("auto", "implicit", "materialize"):
        result = backend.to_numpy(
            woodbury.gram([(backend.asarray(a), backend.asarray(e))], method=method)
        )
        np.testing.assert_array_equal(result, [[2.0]])
    # Two examples, T = 2: the (i, j) entry is Σ_{t,s} (a_it·a_js)(e_it·e_js).
    a = np.array([[[1.0, 2.0], [0.0, 1.0]], [[1.0, -1.0], [2.0, 0.0]]])
    e = np.array([[[1.0], [3.0]], [[-2.0], [1.0]]])
    # g_0 = 1·(1, 2) + 3·(0, 1) = (1, 5); g_1 = −2·(1, −1) + 1·(2, 0) = (0, 2).
    expected = np.array([[26.0, 10.0], [10.0, 4.0]])
    for method in ("auto", "implicit", "materialize"):
        result = backend.to_numpy(
            woodbury.gram([(backend.asarray(a), backend.asarray(e))], method=method)
        )
        np.testing.assert_array_equal(result, expected)


def test_solve_keeps_the_u_over_lambda_term(backend: testing.Backend) -> None:
    # G = e_1 (one example, one parameter of two): (λI + GGᵀ)⁻¹u for u = (0, 1) is u/λ,
    # which a solve that drops the (I − P)u/λ term would return as 0.
    a = np.array([[1.0, 0.0]])
    e = np.array([[1.0]])
    u = np.array([[0.0, 1.0]])
    out = woodbury.solve(
        woodbury.factorize([(backend.asarray(a), backend.asarray(e))], 0.5), [backend.asarray(u)]
    )
    np.testing.assert_allclose(backend.to_numpy(out[0]), [[0.0, 2.0]], rtol=1e-15)
    u = np.array([[1.0, 0.0]])  # along G: 1/(λ + 1)
    out = woodbury.solve(
        woodbury.factorize([(backend.asarray(a), backend.asarray(e))], 0.5), [backend.asarray(u)]
    )
    np.testing.assert_allclose(backend.to_numpy(out[0]), [[1 / 1.5, 0.0]], rtol=1e-13)


# --------------------------------------------------------------------------------------
# Cross-cutting: namespace and dtype kept, inputs untouched, jax.jit
# --------------------------------------------------------------------------------------


def _fixed() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "a0": rng.standard_normal((4, 3)),
        "e0": rng.standard_normal((4, 2)),
        "a1": rng.standard_normal((4, 2, 2)),  # a conv-like layer with T = 2
        "e1": rng.standard_normal((4, 2, 3)),
        "u0": rng.standard_normal((2, 3)),
        "u1": rng.standard_normal((3, 2)),
        "uk0": rng.standard_normal((2, 2, 3)),
        "uk1": rng.standard_normal((2, 3, 2)),
        "w": rng.standard_normal((4,)),
        "wk": rng.standard_normal((2, 4)),
    }


def _caps(x):
    return [(x["a0"], x["e0"]), (x["a1"], x["e1"])]


CASES: dict[str, Callable[[dict], Any]] = {
    "per_example": lambda x: woodbury.per_example(_caps(x)),
    "gram": lambda x: woodbury.gram(_caps(x)),
    "gram_implicit": lambda x: woodbury.gram(_caps(x), method="implicit"),
    "gram_materialize": lambda x: woodbury.gram(_caps(x), method="materialize"),
    "rmatvec": lambda x: woodbury.rmatvec(_caps(x), [x["u0"], x["u1"]]),
    "rmatvec_k": lambda x: woodbury.rmatvec(_caps(x), [x["uk0"], x["uk1"]]),
    "matvec": lambda x: woodbury.matvec(_caps(x), x["w"]),
    "matvec_k": lambda x: woodbury.matvec(_caps(x), x["wk"]),
    "factorize": lambda x: woodbury.factorize(_caps(x), 0.3, 0.25),
    "solve": lambda x: woodbury.solve(woodbury.factorize(_caps(x), 0.3, 0.25), [x["u0"], x["u1"]]),
    "solve_k": lambda x: woodbury.solve(woodbury.factorize(_caps(x), 0.3), [x["uk0"], x["uk1"]]),
    "solve_span": lambda x: woodbury.solve_span(woodbury.factorize(_caps(x), 0.3, 0.25), x["w"]),
    "solve_span_k": lambda x: woodbury.solve_span(woodbury.factorize(_caps(x), 0.3), x["wk"]),
    "logdet": lambda x: woodbury.logdet(woodbury.factorize(_caps(x), 0.3, 0.25)),
    "factorize_layers": lambda x: woodbury.factorize_layers(_caps(x), 0.3, 0.25),
    "solve_layers": lambda x: woodbury.solve_layers(
        woodbury.factorize_layers(_caps(x), 0.3, 0.25), [x["uk0"], x["uk1"]]
    ),
}


def _leaves(output: Any) -> list[Any]:
    if isinstance(output, (list, tuple)):
        return [leaf for item in output for leaf in _leaves(item)]
    return [] if output is None else [output]  # Woodbury.explicit: None for implicit layers


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_function_keeps_namespace_and_dtype_and_is_pure(
    backend: testing.Backend, dtype: np.dtype, name: str
) -> None:
    call = CASES[name]
    inputs = {k: backend.asarray(v.astype(dtype)) for k, v in _fixed().items()}
    before = {k: np.array(backend.to_numpy(v), copy=True) for k, v in inputs.items()}
    for leaf in _leaves(call(inputs)):
        if isinstance(leaf, float):  # Woodbury.damping / scale given as Python numbers
            continue
        assert_backend_array(leaf, backend, dtype)
    for key, copy in before.items():
        np.testing.assert_array_equal(backend.to_numpy(inputs[key]), copy)  # inputs untouched


def test_every_function_works_under_jit(backend: testing.Backend, dtype: np.dtype) -> None:
    """All of CASES in one jitted function (one compilation per dtype), against eager."""
    if backend.jit is None:
        pytest.skip("jit is JAX's")
    inputs = {k: backend.asarray(v.astype(dtype)) for k, v in _fixed().items()}
    everything = lambda x: {name: call(x) for name, call in CASES.items()}  # noqa: E731
    eager, jitted = everything(inputs), backend.jit(everything)(inputs)
    for name in CASES:
        leaves, traced_leaves = _leaves(eager[name]), _leaves(jitted[name])
        assert len(traced_leaves) == len(leaves), name
        for value, traced in zip(leaves, traced_leaves):
            if isinstance(value, float):  # a weakly typed array under jit
                assert float(traced) == pytest.approx(value, rel=rtol(dtype)), name
                continue
            assert_backend_array(traced, backend, dtype)
            # Same algorithm, possibly fused differently by XLA; the systems here have κ < 100.
            assert_close(to_np(backend, traced), to_np(backend, value), dtype, condition=100.0)


def test_a_woodbury_passes_through_jit_as_an_argument(dtype: np.dtype) -> None:
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    x = {k: jnp.asarray(v.astype(dtype)) for k, v in _fixed().items()}
    factors = woodbury.factorize(_caps(x), 0.3, 0.25)
    solved = jax.jit(woodbury.solve)(factors, [x["u0"], x["u1"]])
    eager = woodbury.solve(factors, [x["u0"], x["u1"]])
    for out, ref in zip(solved, eager):
        assert out.dtype == dtype
        assert_close(np.asarray(out), np.asarray(ref), dtype, 100.0)
    value = jax.jit(woodbury.logdet)(factors)
    assert value.dtype == dtype
    assert float(value) == pytest.approx(float(woodbury.logdet(factors)), rel=rtol(dtype, 100.0))
    # Damping and scale traced as well (value checks are skipped under jit).
    traced = jax.jit(lambda caps, lam, s: woodbury.factorize(caps, lam, s))(
        _caps(x), jnp.asarray(0.3, dtype=dtype), jnp.asarray(0.25, dtype=dtype)
    )
    assert traced.lower.dtype == dtype
    assert_close(np.asarray(traced.lower), np.asarray(factors.lower), dtype, 100.0)


def test_scalar_array_parameters_do_not_change_the_dtype(backend: testing.Backend) -> None:
    x = {k: backend.asarray(v.astype(np.float32)) for k, v in _fixed().items()}
    # A float64 damping/scale (NumPy scalar, or a 0-d array of the backend) must not promote
    # float32 work to float64.
    for damping, scale in (
        (np.float64(0.3), np.float64(0.25)),
        (backend.asarray(np.asarray(0.3)), backend.asarray(np.asarray(0.25))),
    ):
        factors = woodbury.factorize(_caps(x), damping, scale)
        assert_backend_array(factors.lower, backend, np.dtype(np.float32))
        for out in woodbury.solve(factors, [x["u0"], x["u1"]]):
            assert_backend_array(out, backend, np.dtype(np.float32))
        assert_backend_array(woodbury.logdet(factors), backend, np.dtype(np.float32))


def test_check_finite_false_skips_the_scan(backend: testing.Backend) -> None:
    x = _fixed()
    a = x["a0"].copy()
    a[0, 0] = np.nan
    kernel = backend.to_numpy(
        woodbury.gram([(backend.asarray(a), backend.asarray(x["e0"]))], check_finite=False)
    )
    assert np.isnan(kernel[0, 0]) and np.isfinite(kernel[1:, 1:]).all()


# --------------------------------------------------------------------------------------
# Errors: a ValueError naming the argument
# --------------------------------------------------------------------------------------


def _error_cases() -> list[tuple[str, Callable[[Callable], Any], type, str]]:
    x = _fixed()
    a, e, u = x["a0"], x["e0"], x["u0"]
    caps = lambda c: [(c(a), c(e))]  # noqa: E731
    two = lambda c: [(c(a), c(e)), (c(x["a1"]), c(x["e1"]))]  # noqa: E731
    nan_a, nan_e, nan_u, nan_w = a.copy(), e.copy(), u.copy(), x["w"].copy()
    nan_a[1, 1] = np.nan
    nan_e[0, 1] = np.inf
    nan_u[0, 0] = np.nan
    nan_w[2] = np.nan
    fac = lambda c: woodbury.factorize(caps(c), 0.5)  # noqa: E731
    ints = lambda m: m.astype(np.int64)  # noqa: E731
    return [
        # structure of captures
        ("captures-empty", lambda c: woodbury.gram([]), ValueError, "captures"),
        ("captures-not-pairs", lambda c: woodbury.gram((c(a), c(e))), ValueError, r"captures\[0\]"),
        (
            "batch-between-layers",
            lambda c: woodbury.gram([(c(a), c(e)), (c(np.ones((5, 2))), c(np.ones((5, 2))))]),
            ValueError,
            r"captures\[1\].*batch size 5.*4",
        ),
        (
            "batch-a-e",
            lambda c: woodbury.gram([(c(a), c(np.ones((5, 2))))]),
            ValueError,
            r"captures\[0\].*shape mismatch",
        ),
        (
            "positions-a-e",
            lambda c: woodbury.rmatvec([(c(np.ones((4, 2, 3))), c(np.ones((4, 3, 2))))], [c(u)]),
            ValueError,
            r"captures\[0\].*shape mismatch",
        ),
        (
            "ndim-a-e",
            lambda c: woodbury.factorize([(c(np.ones((4, 2, 3))), c(e))], 0.5),
            ValueError,
            r"captures\[0\].*\(B, T, d\)",
        ),
        (
            "a-1d",
            lambda c: woodbury.per_example([(c(np.ones(4)), c(np.ones(4)))]),
            ValueError,
            r"captures\[0\]",
        ),
        # vectors and w
        (
            "rmatvec-shape",
            lambda c: woodbury.rmatvec(caps(c), [c(u.T)]),
            ValueError,
            r"vectors\[0\]",
        ),
        ("rmatvec-count", lambda c: woodbury.rmatvec(caps(c), [c(u), c(u)]), ValueError, "vectors"),
        ("rmatvec-not-a-list", lambda c: woodbury.rmatvec(caps(c), c(u)), ValueError, "vectors"),
        (
            "solve-shape",
            lambda c: woodbury.solve(fac(c), [c(np.ones((2, 4)))]),
            ValueError,
            r"vectors\[0\]",
        ),
        (
            "solve-1d",
            lambda c: woodbury.solve(fac(c), [c(np.ones(6))]),
            ValueError,
            r"vectors\[0\]",
        ),
        ("solve-count", lambda c: woodbury.solve(fac(c), []), ValueError, "vectors"),
        (
            "solve-two-leading-axes",
            lambda c: woodbury.solve(fac(c), [c(np.ones((2, 2, 2, 3)))]),
            ValueError,
            "vectors",
        ),
        (
            "solve-leading-axes-differ",
            lambda c: woodbury.solve(
                woodbury.factorize(two(c), 0.5), [c(np.ones((2, 2, 3))), c(np.ones((3, 3, 2)))]
            ),
            ValueError,
            "vectors",
        ),
        (
            "solve-not-woodbury",
            lambda c: woodbury.solve((1, 2, 3, 4), [c(u)]),
            ValueError,
            "woodbury",
        ),
        ("logdet-not-woodbury", lambda c: woodbury.logdet(None), ValueError, "woodbury"),
        ("matvec-shape", lambda c: woodbury.matvec(caps(c), c(np.ones(5))), ValueError, r"\bw\b"),
        (
            "matvec-3d",
            lambda c: woodbury.matvec(caps(c), c(np.ones((2, 2, 4)))),
            ValueError,
            r"\bw\b",
        ),
        (
            "solve_layers-count",
            lambda c: woodbury.solve_layers(woodbury.factorize_layers(two(c), 0.5), [c(u)]),
            ValueError,
            "vectors",
        ),
        # damping and scale
        ("damping-zero", lambda c: woodbury.factorize(caps(c), 0.0), ValueError, "damping"),
        ("damping-negative", lambda c: woodbury.factorize(caps(c), -1.0), ValueError, "damping"),
        ("damping-nan", lambda c: woodbury.factorize(caps(c), float("nan")), ValueError, "damping"),
        (
            "damping-array-negative",
            lambda c: woodbury.factorize(caps(c), c(np.asarray(-1.0))),
            ValueError,
            "damping",
        ),
        ("scale-negative", lambda c: woodbury.factorize(caps(c), 1.0, -0.5), ValueError, "scale"),
        (
            "layers-damping",
            lambda c: woodbury.factorize_layers(caps(c), -1.0),
            ValueError,
            "damping",
        ),
        (
            "layers-scale",
            lambda c: woodbury.factorize_layers(caps(c), 1.0, -1.0),
            ValueError,
            "scale",
        ),
        # dtypes
        (
            "a-int",
            lambda c: woodbury.gram([(c(ints(a)), c(ints(e)))]),
            ValueError,
            r"captures\[0\] \(a\).*floating",
        ),
        (
            "e-int",
            lambda c: woodbury.gram([(c(a), c(ints(e)))]),
            ValueError,
            r"captures\[0\]\[1\] \(e\)",
        ),
        ("vectors-int", lambda c: woodbury.rmatvec(caps(c), [c(ints(u))]), ValueError, "vectors"),
        (
            "solve-vectors-int",
            lambda c: woodbury.solve(fac(c), [c(ints(u))]),
            ValueError,
            "vectors",
        ),
        ("w-int", lambda c: woodbury.matvec(caps(c), c(ints(x["w"]))), ValueError, r"\bw\b"),
        # NaN / infinity
        (
            "gram-nan-a",
            lambda c: woodbury.gram([(c(nan_a), c(e))]),
            ValueError,
            r"captures\[0\] \(a\).*NaN",
        ),
        (
            "factorize-inf-e",
            lambda c: woodbury.factorize([(c(a), c(nan_e))], 0.5),
            ValueError,
            r"captures\[0\] \(e\).*NaN",
        ),
        ("per_example-nan", lambda c: woodbury.per_example([(c(nan_a), c(e))]), ValueError, "NaN"),
        (
            "layers-nan",
            lambda c: woodbury.factorize_layers([(c(nan_a), c(e))], 0.5),
            ValueError,
            "NaN",
        ),
        (
            "rmatvec-nan-vectors",
            lambda c: woodbury.rmatvec(caps(c), [c(nan_u)]),
            ValueError,
            r"vectors\[0\].*NaN",
        ),
        (
            "solve-nan-vectors",
            lambda c: woodbury.solve(fac(c), [c(nan_u)]),
            ValueError,
            r"vectors\[0\].*NaN",
        ),
        ("matvec-nan-w", lambda c: woodbury.matvec(caps(c), c(nan_w)), ValueError, r"\bw\b.*NaN"),
        (
            "solve_span-nan",
            lambda c: woodbury.solve_span(fac(c), c(nan_w)),
            ValueError,
            r"coefficients.*NaN",
        ),
        (
            "solve_span-shape",
            lambda c: woodbury.solve_span(fac(c), c(x["w"][:-1])),
            ValueError,
            r"shape mismatch: coefficients",
        ),
        (
            "solve_span-int",
            lambda c: woodbury.solve_span(fac(c), c(ints(x["w"]))),
            ValueError,
            "coefficients",
        ),
        # options
        ("gram-method", lambda c: woodbury.gram(caps(c), method="fast"), ValueError, "method"),
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


# Every array argument in the position of the odd one out: mixed namespaces and dtypes.
MULTI_INPUT: dict[str, tuple[Callable[[list], Any], list[int]]] = {
    "gram": (lambda v: woodbury.gram([(v[0], v[1]), (v[2], v[3])]), [0, 1, 2, 3]),
    "per_example": (lambda v: woodbury.per_example([(v[0], v[1]), (v[2], v[3])]), [1, 3]),
    "rmatvec": (lambda v: woodbury.rmatvec([(v[0], v[1]), (v[2], v[3])], [v[4], v[5]]), [1, 4, 5]),
    "matvec": (lambda v: woodbury.matvec([(v[0], v[1]), (v[2], v[3])], v[6]), [2, 6]),
    "factorize": (lambda v: woodbury.factorize([(v[0], v[1]), (v[2], v[3])], 0.5), [0, 3]),
    "solve": (
        lambda v: woodbury.solve(
            woodbury.factorize([(v[0], v[1]), (v[2], v[3])], 0.5), [v[4], v[5]]
        ),
        [4, 5],
    ),
    "solve_layers": (
        lambda v: woodbury.solve_layers(
            woodbury.factorize_layers([(v[0], v[1]), (v[2], v[3])], 0.5), [v[4], v[5]]
        ),
        [5],
    ),
}


def _multi_inputs() -> list[np.ndarray]:
    x = _fixed()
    return [x["a0"], x["e0"], x["a1"], x["e1"], x["u0"], x["u1"], x["w"]]


@pytest.mark.parametrize("name", sorted(MULTI_INPUT))
def test_mixed_namespaces_raise(name: str) -> None:
    torch = pytest.importorskip("torch")
    call, positions = MULTI_INPUT[name]
    inputs = _multi_inputs()
    assert call([torch.asarray(v) for v in inputs]) is not None  # valid when not mixed
    for odd in positions:
        arrays = [np.asarray(v) if i == odd else torch.asarray(v) for i, v in enumerate(inputs)]
        with pytest.raises(ValueError, match="different libraries"):
            call(arrays)
        arrays = [torch.asarray(v) if i == odd else np.asarray(v) for i, v in enumerate(inputs)]
        with pytest.raises(ValueError, match="different libraries"):
            call(arrays)


@pytest.mark.parametrize("name", sorted(MULTI_INPUT))
def test_mixed_dtypes_raise(backend: testing.Backend, name: str) -> None:
    call, positions = MULTI_INPUT[name]
    inputs = _multi_inputs()
    for odd in positions:
        arrays = [
            backend.asarray(v.astype(np.float32 if i == odd else np.float64))
            for i, v in enumerate(inputs)
        ]
        with pytest.raises(ValueError, match="dtype mismatch"):
            call(arrays)


def test_not_positive_definite_error_is_a_value_error() -> None:
    assert issubclass(curvlinalg.NotPositiveDefiniteError, ValueError)


def test_solve_with_stored_per_example_gradients_equals_the_capture_contraction(
    backend: testing.Backend, dtype: np.dtype
) -> None:
    """A layer with many positions has its per-example gradients formed by ``factorize``
    (``explicit``); ``solve``/``solve_span`` then contract with them. The result must equal the
    contraction over the ``B·T`` capture rows (the same Woodbury without ``explicit``)."""
    rng = np.random.default_rng(11)
    captures = [
        (rng.standard_normal((5, 6, 2)), rng.standard_normal((5, 6, 3))),  # T²·5 > 6: explicit
        (rng.standard_normal((5, 4)), rng.standard_normal((5, 3))),  # (B, d): implicit
    ]
    caps_b = [
        (backend.asarray(a.astype(dtype)), backend.asarray(e.astype(dtype))) for a, e in captures
    ]
    factors = woodbury.factorize(caps_b, 0.5, 0.2)
    assert factors.explicit[0] is not None and factors.explicit[1] is None
    assert tuple(factors.explicit[0].shape) == (5, 3 * 2)
    without = factors._replace(explicit=())
    vectors = [
        backend.asarray(rng.standard_normal((2, 3, 2)).astype(dtype)),
        backend.asarray(rng.standard_normal((2, 3, 4)).astype(dtype)),
    ]
    coefficients = backend.asarray(rng.standard_normal((2, 5)).astype(dtype))
    for stored, rows in (
        (woodbury.solve(factors, vectors), woodbury.solve(without, vectors)),
        (woodbury.solve_span(factors, coefficients), woodbury.solve_span(without, coefficients)),
    ):
        for x, y in zip(stored, rows):
            assert_backend_array(x, backend, dtype)
            assert_close(to_np(backend, x), to_np(backend, y), dtype, condition=100.0)


@property_test(data=st.data())
def test_cross_gram_is_gt_h_and_gives_gt_u_of_a_mean_gradient(
    backend: testing.Backend, dtype: np.dtype, data: st.DataObject
) -> None:
    """``cross_gram(F, d) = G_Fᵀ G_d`` (dense reference), ``cross_gram(c, c) = gram(c)``, and
    ``cross_gram(F, d) @ c = rmatvec(F, matvec(d, c))`` (the projection of a mean gradient)."""
    captures = draw_captures(data, backend, dtype)
    other = [
        (
            data.draw(testing.arrays((3,) + a.shape[1:])).astype(dtype),
            data.draw(testing.arrays((3,) + e.shape[1:])).astype(dtype),
        )
        for a, e in captures
    ]
    g, h = dense_g(captures), dense_g(other)
    expected = g.T @ h
    condition = cancellation(
        dense_g(captures, absolute=True).T @ dense_g(other, absolute=True),
        expected,
        terms(captures),
    )
    result = woodbury.cross_gram(to_backend(backend, captures), to_backend(backend, other))
    assert_backend_array(result, backend, dtype)
    assert_close(to_np(backend, result), expected, dtype, condition)
    same = woodbury.cross_gram(to_backend(backend, captures), to_backend(backend, captures))
    assert_close(
        to_np(backend, same),
        to_np(backend, woodbury.gram(to_backend(backend, captures))),
        dtype,
        condition,
    )
    c = np.full(3, 1 / 3, dtype=dtype)
    via_gradient = woodbury.rmatvec(
        to_backend(backend, captures),
        woodbury.matvec(to_backend(backend, other), backend.asarray(c)),
    )
    assert_close(
        to_np(backend, result) @ c.astype(np.float64),
        to_np(backend, via_gradient),
        dtype,
        condition * 4,
    )


def test_cross_gram_rejects_mismatched_layers() -> None:
    rng = np.random.default_rng(0)
    caps = [(rng.standard_normal((4, 3)), rng.standard_normal((4, 2)))]
    with pytest.raises(ValueError, match="shape mismatch: layer 0"):
        woodbury.cross_gram(caps, [(rng.standard_normal((2, 5)), rng.standard_normal((2, 2)))])
    with pytest.raises(ValueError, match="same layers"):
        woodbury.cross_gram(caps, caps + caps)
