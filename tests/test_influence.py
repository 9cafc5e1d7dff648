r"""Tests of :mod:`curvlinalg.influence` against explicit per-example gradients.

Scores are ``s_qt = Σ_l vec(g^q_l)ᵀ P_l⁻¹ vec(g^t_l)`` (column-major ``vec``, per-example
gradients ``g = Σ_t e_tᵀ a_t`` by ``np.einsum``) with the dense ``P_l⁻¹``: ``np.kron(a_inv,
g_inv)`` for K-FAC (``(A⊗G) vec(V) = vec(G V A)``) and ``np.linalg.inv(Q diag(vec S) Qᵀ + λI)``
with ``Q = np.kron(U_A, U_G)`` for EK-FAC. References never call curvlinalg and are computed
in float64 from the cast inputs.

Tolerances (:func:`tests.conftest.assert_close`): the scores are contractions, so the stated
condition is ``n·‖s_abs‖/‖s‖`` with ``s_abs`` the same contraction on absolute values (the
entrywise rounding bound) and ``n`` a generous count of accumulated products; for EK-FAC it is
multiplied by ``κ(P)``, which bounds the effect of the float32 eigenbases being orthonormal
only to rounding (the library uses ``Q diag(1/(S+λ)) Qᵀ``, the reference ``P⁻¹``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import strategies as st

import curvlinalg
from curvlinalg import influence, kron, testing, woodbury
from tests import references
from tests.conftest import assert_backend_array, assert_close
from tests.references import f64, to_np, with_positions

property_test = references.property_tests(references.half_three_on_jax)


# --------------------------------------------------------------------------------------
# Dense references (none of them calls curvlinalg)
# --------------------------------------------------------------------------------------


def vec_rows(g: np.ndarray) -> np.ndarray:
    """``(B, d_out, d_in)`` → ``(B, d_out·d_in)`` with column-major ``vec`` per example."""
    return np.swapaxes(g, -1, -2).reshape(g.shape[0], -1)


def per_example(a: np.ndarray, e: np.ndarray, absolute: bool = False) -> np.ndarray:
    a3, e3 = with_positions(a), with_positions(e)
    if absolute:
        a3, e3 = np.abs(a3), np.abs(e3)
    return np.einsum("bto,bti->boi", e3, a3)


def reference_scores(query, train, inverses: list[np.ndarray], absolute: bool = False):
    """``Σ_l G_q,lᵀ P_l⁻¹ G_t,l`` with dense per-layer ``P_l⁻¹`` (of ``|·|`` when absolute)."""
    total = 0.0
    for (q_a, q_e), (t_a, t_e), dense in zip(query, train, inverses):
        g_q = vec_rows(per_example(q_a, q_e, absolute))
        g_t = vec_rows(per_example(t_a, t_e, absolute))
        total = total + g_q @ (np.abs(dense) if absolute else dense) @ g_t.T
    return total


def kfac_dense(a_inv: np.ndarray, g_inv: np.ndarray) -> np.ndarray:
    return np.kron(f64(a_inv), f64(g_inv))


def ekfac_dense(u_a, u_g, correction, damping) -> np.ndarray:
    q = np.kron(f64(u_a), f64(u_g))
    values = f64(correction).reshape(-1, order="F")
    return np.linalg.inv(q @ np.diag(values) @ q.T + damping * np.eye(q.shape[0]))


def ekfac_absolute(query, train, eigens_np) -> np.ndarray:
    """``Σ_l Σ_oj W_oj R^q_abs R^t_abs``, ``R_abs = Σ_t (|e_t||U_G|)ᵀ(|a_t||U_A|)``: the
    entrywise bound on the rotated contraction the library evaluates."""

    def rotated(a, e, u_a, u_g):
        a3 = np.abs(with_positions(a)) @ np.abs(f64(u_a))
        e3 = np.abs(with_positions(e)) @ np.abs(f64(u_g))
        return np.einsum("bto,bti->boi", e3, a3)

    total = 0.0
    for (q_a, q_e), (t_a, t_e), (u_a, u_g, correction, damping) in zip(query, train, eigens_np):
        weights = 1.0 / (f64(correction) + damping)
        r_q, r_t = rotated(q_a, q_e, u_a, u_g), rotated(t_a, t_e, u_a, u_g)
        total = total + np.einsum("qoi,oi,toi->qt", r_q, weights, r_t)
    return total


def condition_of(absolute: np.ndarray, value: np.ndarray, terms: int) -> float:
    norm = np.linalg.norm(value)
    return float(terms) if norm == 0 else float(terms * np.linalg.norm(absolute) / norm)


def terms_of(query, train) -> int:
    counts = []
    for (q_a, q_e), (t_a, _) in zip(query, train):
        t_q, t_t = with_positions(q_a).shape[1], with_positions(t_a).shape[1]
        width = q_a.shape[-1] + q_e.shape[-1]
        counts.append((t_q * t_t + t_q + t_t) * width + q_a.shape[-1] * q_e.shape[-1])
    return max(counts) * len(counts)


# --------------------------------------------------------------------------------------
# Drawing problems
# --------------------------------------------------------------------------------------


def draw_problem(data: st.DataObject, backend: testing.Backend, dtype: np.dtype):
    """Query and train captures of the same layers (each layer dense or with positions, the
    numbers of positions drawn independently for query and train)."""
    if backend.name == "jax":
        widths, batch_q, batch_t = [4, 2, 1], 2, 3
        positions = [(None, None), (2, 1)]
    else:
        layers = data.draw(st.integers(1, 2))
        widths = [data.draw(st.integers(1, 4)) for _ in range(layers + 1)]
        batch_q, batch_t = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 4))
        positions = []
        for _ in range(layers):
            dense = data.draw(st.booleans())
            positions.append(
                (None, None)
                if dense
                else (data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3)))
            )

    def captures(batch: int, which: int) -> list[tuple[np.ndarray, np.ndarray]]:
        result = []
        for layer, pair in enumerate(positions):
            lead = (batch,) if pair[which] is None else (batch, pair[which])
            a = data.draw(testing.arrays(lead + (widths[layer],), dtype=dtype))
            e = data.draw(testing.arrays(lead + (widths[layer + 1],), dtype=dtype))
            result.append((a, e))
        return result

    return captures(batch_q, 0), captures(batch_t, 1)


def to_backend(backend: testing.Backend, captures):
    return [(backend.asarray(a), backend.asarray(e)) for a, e in captures]


def basis(data: st.DataObject, n: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    values, vectors = np.linalg.eigh(data.draw(testing.spd_matrices(n, max_condition=10.0)))
    return values.astype(dtype), vectors.astype(dtype)


def draw_eigens(data: st.DataObject, query, dtype: np.dtype):
    """Per layer ``(s_A, U_A, s_G, U_G, S, λ)``: orthonormal bases and a non-negative
    correction with exact zeros, ``λ > 0``."""
    result = []
    for a, e in query:
        d_in, d_out = a.shape[-1], e.shape[-1]
        s_a, u_a = basis(data, d_in, dtype)
        s_g, u_g = basis(data, d_out, dtype)
        raw = data.draw(testing.arrays((d_out, d_in)))
        correction = np.where(raw > 1.0, 0.0, raw**2).astype(dtype)
        damping = data.draw(st.sampled_from([0.1, 1.0]))
        result.append((s_a, u_a, s_g, u_g, correction, damping))
    return result


def backend_eigens(backend: testing.Backend, drawn) -> list[tuple]:
    cast = backend.asarray
    return [
        (kron.Eigh(cast(s_a), cast(u_a)), kron.Eigh(cast(s_g), cast(u_g)), cast(s), damping)
        for s_a, u_a, s_g, u_g, s, damping in drawn
    ]


def draw_inverses(data: st.DataObject, query, dtype: np.dtype) -> list[tuple]:
    return [
        tuple(
            data.draw(testing.spd_matrices(n, max_condition=10.0, scales=(0.1, 1.0))).astype(dtype)
            for n in (a.shape[-1], e.shape[-1])
        )
        for a, e in query
    ]


METHODS = st.sampled_from(["auto", "pairs", "explicit"])


def compiled(backend: testing.Backend, function: Callable) -> Callable:
    """``function`` under ``jax.jit`` on JAX — one compilation per layout instead of one per
    eager operation and shape, which would dominate the run time — and as is elsewhere.
    JAX's eager path is covered by the end-to-end and error tests."""
    return function if backend.jit is None else backend.jit(function)


# --------------------------------------------------------------------------------------
# Scores equal explicit g_qᵀ P⁻¹ g_t; self-scores equal the diagonal
# --------------------------------------------------------------------------------------


@property_test(data=st.data(), method=METHODS)
def test_kfac_scores_are_explicit_preconditioned_inner_products(
    backend: testing.Backend, dtype: np.dtype, data: st.DataObject, method: str
) -> None:
    query, train = draw_problem(data, backend, dtype)
    inverses = draw_inverses(data, query, dtype)
    dense = [kfac_dense(a_inv, g_inv) for a_inv, g_inv in inverses]
    expected = reference_scores(query, train, dense)
    condition = condition_of(
        reference_scores(query, train, dense, absolute=True), expected, terms_of(query, train)
    )
    query_b, train_b = to_backend(backend, query), to_backend(backend, train)
    inverses_b = [(backend.asarray(x), backend.asarray(y)) for x, y in inverses]
    result = compiled(backend, lambda q, t, i: influence.kfac_scores(q, t, i, method=method))(
        query_b, train_b, inverses_b
    )
    assert_backend_array(result, backend, dtype)
    assert_close(to_np(backend, result), expected, dtype, condition)
    for (a, e), (a_b, e_b) in zip(query + train, query_b + train_b):  # inputs untouched
        np.testing.assert_array_equal(backend.to_numpy(a_b), a)
        np.testing.assert_array_equal(backend.to_numpy(e_b), e)

    self_expected = np.diag(reference_scores(train, train, dense))
    self_condition = condition_of(
        np.diag(reference_scores(train, train, dense, absolute=True)),
        self_expected,
        terms_of(train, train),
    )
    self_scores = compiled(backend, lambda t, i: influence.kfac_self_scores(t, i, method=method))(
        train_b, inverses_b
    )
    assert_backend_array(self_scores, backend, dtype)
    assert_close(to_np(backend, self_scores), self_expected, dtype, self_condition)


@property_test(data=st.data(), method=METHODS)
def test_ekfac_scores_are_explicit_preconditioned_inner_products(
    backend: testing.Backend, dtype: np.dtype, data: st.DataObject, method: str
) -> None:
    query, train = draw_problem(data, backend, dtype)
    drawn = draw_eigens(data, query, dtype)
    dense = [ekfac_dense(u_a, u_g, s, lam) for _, u_a, _, u_g, s, lam in drawn]
    kappa = max(float(np.linalg.cond(np.linalg.inv(p))) for p in dense)
    eigens_np = [(u_a, u_g, s, lam) for _, u_a, _, u_g, s, lam in drawn]
    expected = reference_scores(query, train, dense)
    condition = kappa * condition_of(
        ekfac_absolute(query, train, eigens_np), expected, terms_of(query, train)
    )
    eigens = backend_eigens(backend, drawn)
    train_b = to_backend(backend, train)
    result = compiled(backend, lambda q, t, i: influence.ekfac_scores(q, t, i, method=method))(
        to_backend(backend, query), train_b, eigens
    )
    assert_backend_array(result, backend, dtype)
    assert_close(to_np(backend, result), expected, dtype, condition)

    self_expected = np.diag(reference_scores(train, train, dense))
    self_condition = kappa * condition_of(
        np.diag(ekfac_absolute(train, train, eigens_np)), self_expected, terms_of(train, train)
    )
    self_scores = compiled(backend, lambda t, i: influence.ekfac_self_scores(t, i, method=method))(
        train_b, eigens
    )
    assert_backend_array(self_scores, backend, dtype)
    assert_close(to_np(backend, self_scores), self_expected, dtype, self_condition)


def test_ekfac_from_fitted_factors_and_correction_end_to_end(
    backend: testing.Backend, dtype: np.dtype
) -> None:
    """The workflow: factors and their eigenbases from the training captures, the correction
    from the same captures, then scores — against the dense EK-FAC inverse."""
    rng = np.random.default_rng(4)
    train = [(rng.standard_normal((6, 2, 3)), rng.standard_normal((6, 2, 2)))]
    query = [(rng.standard_normal((2, 2, 3)), rng.standard_normal((2, 2, 2)))]
    train = [(a.astype(dtype), e.astype(dtype)) for a, e in train]
    query = [(a.astype(dtype), e.astype(dtype)) for a, e in query]
    ((a_b, e_b),) = to_backend(backend, train)
    a_eigh, g_eigh = kron.eigh(kron.input_factor(a_b)), kron.eigh(kron.factor(e_b))
    correction = kron.eigen_correction(a_b, e_b, a_eigh, g_eigh)
    eigens = [(a_eigh, g_eigh, correction, 0.1)]
    dense = [
        ekfac_dense(
            to_np(backend, a_eigh.vectors),
            to_np(backend, g_eigh.vectors),
            to_np(backend, correction),
            0.1,
        )
    ]
    expected = reference_scores(query, train, dense)
    kappa = float(np.linalg.cond(np.linalg.inv(dense[0])))
    # JAX's eager path once (float64); elsewhere on JAX under jit, as the property tests.
    run = influence.ekfac_scores
    if dtype != np.float64:
        run = compiled(backend, run)
    result = run(to_backend(backend, query), [(a_b, e_b)], eigens)
    assert_close(to_np(backend, result), expected, dtype, 40.0 * kappa)


# --------------------------------------------------------------------------------------
# Reduction: P = I gives the cross-Gram of woodbury
# --------------------------------------------------------------------------------------


def test_scores_with_identity_curvature_are_the_cross_gram(
    backend: testing.Backend, dtype: np.dtype
) -> None:
    rng = np.random.default_rng(9)
    query = [
        (rng.standard_normal((3, 4)), rng.standard_normal((3, 2))),
        (rng.standard_normal((3, 2, 2)), rng.standard_normal((3, 2, 3))),
    ]
    train = [
        (rng.standard_normal((5, 4)), rng.standard_normal((5, 2))),
        (rng.standard_normal((5, 3, 2)), rng.standard_normal((5, 3, 3))),
    ]
    cast = lambda captures: [  # noqa: E731
        (backend.asarray(a.astype(dtype)), backend.asarray(e.astype(dtype))) for a, e in captures
    ]
    query_b, train_b = cast(query), cast(train)
    eye = lambda n: backend.asarray(np.eye(n, dtype=dtype))  # noqa: E731
    identity = [(eye(a.shape[-1]), eye(e.shape[-1])) for a, e in query]
    eigens = [
        (
            kron.Eigh(backend.asarray(np.ones(a.shape[-1], dtype)), eye(a.shape[-1])),
            kron.Eigh(backend.asarray(np.ones(e.shape[-1], dtype)), eye(e.shape[-1])),
            backend.asarray(np.zeros((e.shape[-1], a.shape[-1]), dtype)),
            1.0,
        )
        for a, e in query
    ]

    def all_scores(query, train, identity, eigens):
        return [woodbury.cross_gram(query, train)] + [
            scores
            for method in ("pairs", "explicit")
            for scores in (
                influence.kfac_scores(query, train, identity, method=method),
                influence.ekfac_scores(query, train, eigens, method=method),
            )
        ]

    expected, *results = compiled(backend, all_scores)(query_b, train_b, identity, eigens)
    for result in results:
        assert_close(to_np(backend, result), to_np(backend, expected), dtype, condition=40.0)


# --------------------------------------------------------------------------------------
# Cost model, tiling, jax.jit
# --------------------------------------------------------------------------------------


def _layer(batch: int, positions: int, d_in: int, d_out: int) -> tuple:
    return (np.zeros((batch * positions, d_in)), np.zeros((batch * positions, d_out)), positions)


@pytest.mark.parametrize(
    "positions, width, pair_cost, expected",
    [
        (1, 64, 128, "pairs"),  # K-FAC, (B, d) captures
        (1, 64, 64 * 64 + 192, "pairs"),  # EK-FAC, (B, d) captures
        (8, 64, 128, "pairs"),  # K-FAC: T²(d_in + d_out) < d_in·d_out
        (16, 16, 16 * 16 + 48, "explicit"),  # EK-FAC with many positions
        (64, 16, 32, "explicit"),
    ],
)
def test_auto_picks_pairs_for_few_positions_and_explicit_for_many(
    positions: int, width: int, pair_cost: int, expected: str
) -> None:
    layer = _layer(8, positions, width, width)
    assert influence._cross_method("auto", layer, layer, 8, 8, pair_cost) == expected


@pytest.mark.parametrize("positions, expected", [(2, "pairs"), (3, "explicit")])
def test_ekfac_scores_auto_switches_at_the_measured_crossover(positions: int, expected: str):
    """bench_ekfac.py's T sweep (B_q = 8, B_t = 32, d = 256): the pairs path was faster at
    T = 2 (0.63× the explicit path's time) and slower at T = 3 (1.37×)."""
    query, train = _layer(8, positions, 256, 256), _layer(32, positions, 256, 256)
    pair_cost = 256 * 256 + 3 * 256
    chosen = influence._cross_method(
        "auto", query, train, 8, 32, pair_cost, influence._PAIRS_SPEEDUP
    )
    assert chosen == expected


def test_tiling_does_not_change_the_scores(
    backend: testing.Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    if backend.name == "jax":
        pytest.skip("tiling is backend-independent Python; spare JAX the per-shape compiles")
    rng = np.random.default_rng(6)
    query = [(rng.standard_normal((3, 2, 3)), rng.standard_normal((3, 2, 2)))]
    train = [(rng.standard_normal((5, 3, 3)), rng.standard_normal((5, 3, 2)))]
    query_b, train_b = to_backend(backend, query), to_backend(backend, train)
    inverses = [(backend.asarray(np.eye(3) * 2.0), backend.asarray(np.eye(2) * 0.5))]
    a_eigh = kron.eigh(kron.input_factor(train_b[0][0]))
    g_eigh = kron.eigh(kron.factor(train_b[0][1]))
    correction = kron.eigen_correction(*train_b[0], a_eigh, g_eigh)
    eigens = [(a_eigh, g_eigh, correction, 0.1)]

    def everything() -> list[np.ndarray]:
        return [
            to_np(backend, call(method))
            for method in ("pairs", "explicit")
            for call in (
                lambda m: influence.kfac_scores(query_b, train_b, inverses, method=m),
                lambda m: influence.ekfac_scores(query_b, train_b, eigens, method=m),
                lambda m: influence.kfac_self_scores(train_b, inverses, method=m),
                lambda m: influence.ekfac_self_scores(train_b, eigens, method=m),
            )
        ]

    whole = everything()
    # One example per tile and per chunk (budgets below a single example's data).
    monkeypatch.setattr(influence, "_CHUNK_ELEMENTS", 4)
    monkeypatch.setattr(kron, "_CHUNK_ELEMENTS", 4)
    for tiled, reference in zip(everything(), whole):
        assert_close(tiled, reference, np.dtype(np.float64), condition=8.0)


def test_scores_work_under_jit(dtype: np.dtype) -> None:
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    rng = np.random.default_rng(8)
    draw = lambda *shape: rng.standard_normal(shape).astype(dtype)  # noqa: E731
    query_np = [(draw(2, 4), draw(2, 2))]
    train_np = [(draw(3, 2, 4), draw(3, 2, 2))]
    query = [(jnp.asarray(a), jnp.asarray(e)) for a, e in query_np]
    train = [(jnp.asarray(a), jnp.asarray(e)) for a, e in train_np]

    def scores(query, train, damping):
        a, e = train[0]
        a_eigh, g_eigh = kron.eigh(kron.input_factor(a)), kron.eigh(kron.factor(e))
        correction = kron.eigen_correction(a, e, a_eigh, g_eigh)
        eigens = [(a_eigh, g_eigh, correction, damping)]
        damping_a, damping_g = kron.split_damping(kron.input_factor(a), kron.factor(e), damping)
        inverses = [
            (kron.inverse(kron.input_factor(a), damping_a), kron.inverse(kron.factor(e), damping_g))
        ]
        return tuple(
            out
            for method in ("pairs", "explicit")
            for out in (
                influence.kfac_scores(query, train, inverses, method=method),
                influence.ekfac_scores(query, train, eigens, method=method),
                influence.kfac_self_scores(train, inverses, method=method),
                influence.ekfac_self_scores(train, eigens, method=method),
            )
        )

    # The reference is the same computation on NumPy (eager JAX would compile every operation).
    eager = scores(query_np, train_np, np.asarray(0.1, dtype=dtype))
    traced = jax.jit(scores)(query, train, jnp.asarray(0.1, dtype=dtype))
    for x, y in zip(eager, traced):
        assert y.dtype == dtype
        assert_close(np.asarray(y), np.asarray(x), dtype, condition=100.0)


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


def _error_cases() -> list[tuple[str, Callable[[Callable], Any], type, str]]:
    rng = np.random.default_rng(1)
    a, e = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    inv = (np.eye(3), np.eye(2))
    eig = (np.ones(3), np.eye(3)), (np.ones(2), np.eye(2))
    nan_a = a.copy()
    nan_a[0, 1] = np.nan

    def caps(c, *pairs):
        return [(c(x), c(y)) for x, y in pairs]

    def eigens(c, correction=None, damping=0.1, a_size=3):
        correction = np.ones((2, 3)) if correction is None else correction
        return [
            (
                kron.Eigh(c(np.ones(a_size)), c(np.eye(a_size))),
                kron.Eigh(c(eig[1][0]), c(eig[1][1])),
                c(correction),
                damping,
            )
        ]

    def kfac(c, query=None, train=None, inverses=None, **kw):
        query = caps(c, (a, e)) if query is None else query
        train = caps(c, (a, e)) if train is None else train
        inverses = [(c(inv[0]), c(inv[1]))] if inverses is None else inverses
        return influence.kfac_scores(query, train, inverses, **kw)

    def ekfac(c, **kw):
        return influence.ekfac_scores(caps(c, (a, e)), caps(c, (a, e)), eigens(c, **kw))

    error = ValueError
    return [
        (
            "layer_counts",
            lambda c: kfac(c, train=caps(c, (a, e), (e, a))),
            error,
            "train must hold the same layers as query",
        ),
        ("inverse_count", lambda c: kfac(c, inverses=[]), error, "inverses must be a sequence"),
        (
            "widths",
            lambda c: kfac(c, train=caps(c, (e, a))),
            error,
            "layer 0 has \\(d_in, d_out\\)",
        ),
        ("query_empty", lambda c: kfac(c, query=[]), error, "query must be a non-empty"),
        (
            "query_batch",
            lambda c: kfac(
                c, query=caps(c, (a, e), (a[:2], e[:2])), inverses=[(c(inv[0]), c(inv[1]))] * 2
            ),
            error,
            "query\\[1\\]",
        ),
        (
            "train_nan",
            lambda c: kfac(c, train=caps(c, (nan_a, e))),
            error,
            "train\\[0\\]\\[0\\] \\(a\\) contains NaN|train\\[0\\] \\(a\\) contains NaN",
        ),
        (
            "a_inv_size",
            lambda c: kfac(c, inverses=[(c(np.eye(2)), c(inv[1]))]),
            error,
            "inverses\\[0\\]\\[0\\] \\(a_inv\\)",
        ),
        (
            "g_inv_square",
            lambda c: kfac(c, inverses=[(c(inv[0]), c(np.ones((2, 3))))]),
            error,
            "inverses\\[0\\]\\[1\\] \\(g_inv\\)",
        ),
        (
            "a_inv_nan",
            lambda c: kfac(c, inverses=[(c(np.full((3, 3), np.nan)), c(inv[1]))]),
            error,
            "a_inv\\) contains NaN",
        ),
        (
            "inverse_dtype",
            lambda c: kfac(c, inverses=[(c(inv[0].astype(np.float32)), c(inv[1]))]),
            error,
            "dtype mismatch",
        ),
        (
            "query_train_dtype",
            lambda c: kfac(c, train=caps(c, (a.astype(np.float32), e.astype(np.float32)))),
            error,
            "dtype mismatch",
        ),
        ("method", lambda c: kfac(c, method="dense"), error, "method"),
        (
            "eigens_tuple",
            lambda c: influence.ekfac_scores(caps(c, (a, e)), caps(c, (a, e)), [eigens(c)[0][:3]]),
            error,
            "eigens\\[0\\] must be",
        ),
        (
            "eigens_count",
            lambda c: influence.ekfac_scores(caps(c, (a, e)), caps(c, (a, e)), eigens(c) * 2),
            error,
            "eigens must be a sequence",
        ),
        (
            "correction_shape",
            lambda c: ekfac(c, correction=np.ones((3, 2))),
            error,
            "eigens\\[0\\] \\(correction\\) has shape",
        ),
        ("a_eigh_size", lambda c: ekfac(c, a_size=2), error, "eigens\\[0\\] \\(a_eigh\\)"),
        (
            "negative_damping",
            lambda c: ekfac(c, damping=-1.0),
            error,
            "eigens\\[0\\] \\(damping\\)",
        ),
        (
            "not_positive",
            lambda c: ekfac(c, correction=np.zeros((2, 3)), damping=0.0),
            curvlinalg.NotPositiveDefiniteError,
            "eigens\\[0\\]",
        ),
        (
            "correction_nan",
            lambda c: ekfac(c, correction=np.full((2, 3), np.nan)),
            error,
            "correction\\) contains NaN",
        ),
        (
            "self_inverses",
            lambda c: influence.kfac_self_scores(caps(c, (a, e)), []),
            error,
            "inverses must be a sequence",
        ),
        (
            "self_eigens_nan",
            lambda c: influence.ekfac_self_scores(caps(c, (nan_a, e)), eigens(c)),
            error,
            "captures\\[0\\]",
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
    query = [(torch.asarray(a), torch.asarray(e))]
    with pytest.raises(ValueError, match="different libraries"):
        influence.kfac_scores(query, [(a, e)], [(np.eye(3), np.eye(2))])
    with pytest.raises(ValueError, match="different libraries"):
        influence.kfac_scores(query, query, [(np.eye(3), torch.eye(2, dtype=torch.float64))])
    eigens = [
        (kron.Eigh(np.ones(3), np.eye(3)), kron.Eigh(np.ones(2), np.eye(2)), np.ones((2, 3)), 0.1)
    ]
    with pytest.raises(ValueError, match="different libraries"):
        influence.ekfac_self_scores(query, eigens)
