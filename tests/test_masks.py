r"""Masks (padding, position weights) of captures, against references with the masked rows deleted.

The spec is :mod:`curvlinalg._masks`: a mask has the captures' leading shape (``(B,)`` or
``(B, T)``), is boolean (``True`` = keep) or real floating weights ``w ≥ 0``; a position of
weight ``w`` contributes ``w`` times its term (``g_i = Σ_t w_it e_itᵀ a_it``, factor rows
``w_n x_n x_nᵀ``), one of weight zero contributes nothing whatever it holds, and means over
examples divide by ``B_eff = Σ_i max_t w_it`` (0 replaced by 1).

References never call curvlinalg: NumPy in float64 that *deletes* the masked positions
(``x[w > 0]``, a ragged sum per example) and multiplies the kept ones by their weights — the
explicit weighted formula, which for boolean masks is the unweighted formula of the deleted
batch. Every masked-out position of the captures passed to the library holds NaN or
infinity, so each comparison also checks that padding does not leak (with ``check_finite``
on). Boolean ``(B,)`` masks are also compared with the library on the batch with the
examples deleted.

Tolerances: :func:`tests.conftest.assert_close`, ``32·κ·eps(dtype)``. Contractions (factors,
Grams, products, scores) state ``κ = n·‖bound‖/‖value‖`` with ``bound`` the same contraction of
absolute values and ``n`` the number of products summed (their rounding bound); solves
multiply that cancellation by the system's condition ``1 + s‖G‖₂²/λ`` (the damping is drawn
relative to ``s‖G‖₂²``). "All ones = unmasked" is checked bit for bit.

Shapes are small and fixed per layout on JAX (its eager mode compiles once per shape), which
runs the property tests in one case (``(B, T)`` weights, float64; the fixed-problem tests and
the ``jax.jit`` test cover both dtypes there); seeds are drawn by hypothesis, one or two per case.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from curvlinalg import influence, kron, laplace, testing, woodbury
from tests.conftest import assert_backend_array, assert_close
from tests.references import f64, to_np, unvec_layers, with_positions

LAYOUTS = ["B", "BT"]
KINDS = ["bool", "weights"]
TAU, N_DATA = 0.7, 50.0
#: The layout × kind cases of :func:`mask_property` that run on JAX.
JAX_CASES = {("BT", "weights")}


def _examples(backend_name: str) -> int:
    return 2 if backend_name == "numpy" else 1


def _skip_jax_dense_layout(backend: testing.Backend, layout: str) -> None:
    if backend.name == "jax" and layout == "B":
        pytest.skip("JAX runs the (B, T) layout of this fixed problem (eager compile cost)")


def mask_property(check: Callable) -> Callable:
    """``check(backend, dtype, layout, kind, seed)`` as a test over the backend and dtype
    fixtures and every layout × kind, with a few hypothesis-drawn seeds (the pattern of
    :func:`tests.references.property_tests`, with the layout and kind parametrised so that
    every combination runs)."""

    @pytest.mark.parametrize("kind", KINDS)
    @pytest.mark.parametrize("layout", LAYOUTS)
    def test(backend: testing.Backend, dtype: np.dtype, layout: str, kind: str) -> None:
        if backend.name == "jax" and ((layout, kind) not in JAX_CASES or dtype != np.float64):
            pytest.skip("JAX runs one case in float64 (its eager mode compiles per shape)")
        run = given(
            backend=st.just(backend),
            dtype=st.just(dtype),
            layout=st.just(layout),
            kind=st.just(kind),
            seed=st.integers(0, 2**32 - 1),
        )(check)
        settings(max_examples=_examples(backend.name))(run)()

    test.__name__, test.__qualname__ = check.__name__, check.__qualname__
    test.__doc__ = check.__doc__
    return test


# --------------------------------------------------------------------------------------
# Problems and references (none of them calls curvlinalg)
# --------------------------------------------------------------------------------------


def _lead(rng: np.random.Generator, backend: testing.Backend, layout: str, batch: int):
    if layout == "B":
        return (batch,)
    return (batch, 3 if backend.name == "jax" else int(rng.integers(2, 4)))


def _keep(rng: np.random.Generator, lead: tuple[int, ...]) -> np.ndarray:
    """Random kept positions; example 0 keeps its first position, the last example is fully
    masked, and with positions example 1 keeps some and loses some."""
    keep = rng.random(lead) < 0.6
    flat = keep.reshape(lead[0], -1)  # a view
    flat[0, 0] = True
    flat[-1] = False
    if len(lead) == 2:
        flat[1, 0], flat[1, -1] = True, False
    return keep


def _mask(rng: np.random.Generator, keep: np.ndarray, kind: str, dtype: np.dtype) -> np.ndarray:
    if kind == "bool":
        return keep
    return (keep * rng.uniform(0.25, 2.0, keep.shape)).astype(dtype)


def _weights(mask: np.ndarray) -> np.ndarray:
    return f64(mask)


def _poisoned(x: np.ndarray, keep: np.ndarray, value: float) -> np.ndarray:
    """``x`` with every masked-out position set to ``value`` (NaN, ±inf)."""
    x = np.array(x)
    x[~keep] = value
    return x


def _layer(rng, lead, d_in, d_out, kind, dtype):
    """One masked layer: poisoned ``a``, ``e`` (cast to dtype), its mask and f64 weights."""
    keep = _keep(rng, lead)
    mask = _mask(rng, keep, kind, dtype)
    weight = _weights(mask)
    keep = weight > 0
    a = _poisoned(rng.standard_normal(lead + (d_in,)).astype(dtype), keep, np.nan)
    e = _poisoned(rng.standard_normal(lead + (d_out,)).astype(dtype), keep, np.inf)
    return a, e, mask, weight


def _widths(rng, backend, count: int) -> list[tuple[int, int]]:
    if backend.name == "jax":
        return [(3, 2), (2, 3)][:count]
    return [(int(rng.integers(1, 5)), int(rng.integers(1, 5))) for _ in range(count)]


def _problem(rng, backend, layout, kind, dtype, *, layers: int = 2, batch: int | None = None):
    """``layers`` masked layers of one batch (each with its own number of positions)."""
    if batch is None:
        batch = 4 if backend.name == "jax" else int(rng.integers(3, 6))
    return [
        _layer(rng, _lead(rng, backend, layout, batch), d_in, d_out, kind, dtype)
        for d_in, d_out in _widths(rng, backend, layers)
    ]


def _gradients(a, e, weight, absolute: bool = False) -> np.ndarray:
    """``g_i = Σ_{t kept} w_it e_itᵀ a_it`` with the masked positions deleted (``|·|`` of the
    captures when ``absolute``), ``(B, d_out, d_in)``."""
    a3, e3 = with_positions(a), with_positions(e)
    w2 = f64(weight).reshape(a3.shape[:2])
    out = np.zeros((a3.shape[0], e3.shape[-1], a3.shape[-1]))
    for i in range(out.shape[0]):
        kept = w2[i] > 0
        rows_a, rows_e = a3[i][kept], e3[i][kept]
        if absolute:
            rows_a, rows_e = np.abs(rows_a), np.abs(rows_e)
        out[i] = np.einsum("t,to,ti->oi", w2[i][kept], rows_e, rows_a)
    return out


def _kept(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``x`` in float64 with the masked positions (which :func:`_gradients` deletes) set to 0,
    so that products of whole arrays do not meet the poison."""
    return np.where(f64(weight)[..., None] > 0, f64(x), 0.0)


def _example_weights(weight: np.ndarray) -> np.ndarray:
    """``max_t w_it`` per example."""
    return f64(weight).reshape(weight.shape[0], -1).max(axis=1)


def _b_eff(*weights: np.ndarray) -> float:
    """``Σ_i max_{l,t} w_lit``."""
    return float(np.max([_example_weights(w) for w in weights], axis=0).sum())


def _vec(m: np.ndarray) -> np.ndarray:
    """Column-major vec of the last two axes: ``(..., d_out, d_in)`` → ``(..., D)``."""
    m = f64(m)
    return np.swapaxes(m, -1, -2).reshape(m.shape[:-2] + (-1,))


def _dense_g(grads: list[np.ndarray]) -> np.ndarray:
    """``D×B``: column ``i`` is ``vec(g_i)``, layers stacked."""
    return np.concatenate([_vec(g) for g in grads], axis=1).T


def _ratio(bound: np.ndarray, value: np.ndarray, terms: int) -> float:
    """``terms·‖bound‖/‖value‖``: the stated condition of a contraction."""
    norm = np.linalg.norm(value)
    return float(terms) if norm == 0 else float(terms * np.linalg.norm(bound) / norm)


def _positions(a: np.ndarray) -> int:
    return 1 if a.ndim == 2 else int(a.shape[1])


def _spd(rng: np.random.Generator, size: int, dtype: np.dtype) -> np.ndarray:
    """SPD with eigenvalues in [1, 2] (condition ≤ 2)."""
    basis, _ = np.linalg.qr(rng.standard_normal((size, size)))
    matrix = (basis * rng.uniform(1.0, 2.0, size)) @ basis.T
    return ((matrix + matrix.T) / 2).astype(dtype)


def _on(backend: testing.Backend, layers) -> tuple[list, list]:
    """Backend captures and per-layer masks of ``_problem`` layers."""
    captures = [(backend.asarray(a), backend.asarray(e)) for a, e, _, _ in layers]
    return captures, [backend.asarray(mask) for _, _, mask, _ in layers]


def _unchanged(backend: testing.Backend, layers, copies) -> None:
    """On NumPy (where the backend arrays are the inputs): nothing was written into them."""
    if backend.name != "numpy":
        return
    for (a, e, mask, _), (a0, e0, mask0) in zip(layers, copies):
        assert np.array_equal(a, a0, equal_nan=True) and np.array_equal(e, e0, equal_nan=True)
        assert np.array_equal(mask, mask0)


def _copies(layers):
    return [(np.copy(a), np.copy(e), np.copy(mask)) for a, e, mask, _ in layers]


# --------------------------------------------------------------------------------------
# kron: factor, input_factor, example_count, eigen_correction, corrected_solve_captures
# --------------------------------------------------------------------------------------


@mask_property
def test_kron_factors_are_weighted_means_over_the_kept_rows(
    backend: testing.Backend, dtype: np.dtype, layout: str, kind: str, seed: int
) -> None:
    """``factor = Σ w x xᵀ / Σ w`` and ``input_factor = Σ w a aᵀ / B_eff`` over the kept rows
    (bias column included); ``example_count = Σ_i max_t w_it``."""
    rng = np.random.default_rng(seed)
    layers = _problem(rng, backend, layout, kind, dtype, layers=1)
    copies = _copies(layers)
    a, _, mask, weight = layers[0]
    x, m = backend.asarray(a), backend.asarray(mask)
    kept = weight > 0
    rows, row_weights = f64(a)[kept], weight[kept]
    b_eff = _b_eff(weight)
    for bias in (False, True):
        full = np.concatenate([rows, np.ones((rows.shape[0], 1))], axis=1) if bias else rows
        moment = (full.T * row_weights) @ full
        bound = (np.abs(full).T * row_weights) @ np.abs(full)
        condition = _ratio(bound, moment, rows.shape[0])

        result = kron.factor(x, bias=bias, mask=m)
        assert_backend_array(result, backend, dtype)
        assert_close(to_np(backend, result), moment / row_weights.sum(), dtype, condition)

        result = kron.input_factor(x, bias=bias, mask=m)
        assert_backend_array(result, backend, dtype)
        assert_close(to_np(backend, result), moment / b_eff, dtype, condition)
        if kind == "bool":  # the library on the rows deleted
            deleted = kron.factor(backend.asarray(a[kept]), bias=bias)
            assert_close(
                to_np(backend, kron.factor(x, bias=bias, mask=m)),
                to_np(backend, deleted),
                dtype,
                2 * condition,
            )
    count = kron.example_count(m, dtype=x.dtype)
    assert_backend_array(count, backend, dtype)
    assert tuple(count.shape) == ()
    assert_close(to_np(backend, count), np.asarray(b_eff), dtype, rows.shape[0])
    if kind == "bool":
        assert float(to_np(backend, count)) == b_eff  # a count of whole examples, exact
    _unchanged(backend, layers, copies)


@mask_property
def test_eigen_correction_and_its_captures_step_use_the_masked_gradients(
    backend: testing.Backend, dtype: np.dtype, layout: str, kind: str, seed: int
) -> None:
    """``S = Σ_i (U_Gᵀ g_i U_A)∘² / B_eff`` (both methods) and
    ``corrected_solve_captures = U_G [(U_Gᵀ ∇W U_A) ⊘ (S + λ)] U_Aᵀ`` with
    ``∇W = Σ_i g_i / B_eff``, ``g_i = Σ_{t kept} w_it e_itᵀ a_it``."""
    rng = np.random.default_rng(seed)
    layers = _problem(rng, backend, layout, kind, dtype, layers=1)
    copies = _copies(layers)
    a, e, mask, weight = layers[0]
    d_in, d_out = a.shape[-1], e.shape[-1]
    a_eigh = kron.eigh(backend.asarray(_spd(rng, d_in, dtype)))
    g_eigh = kron.eigh(backend.asarray(_spd(rng, d_out, dtype)))
    ua, ug = to_np(backend, a_eigh.vectors), to_np(backend, g_eigh.vectors)
    b_eff = _b_eff(weight)
    grads = _gradients(a, e, weight)
    rotated = np.swapaxes(ug, 0, 1) @ grads @ ua
    expected = (rotated**2).sum(axis=0) / b_eff
    # |δr_i| ≤ n·eps·R_i, R_i the rotated gradient of |Ã|, |Ẽ|; δS ≤ 2 Σ_i |r_i| δr_i / B_eff.
    spread = _gradients(_kept(a, weight) @ ua, _kept(e, weight) @ ug, weight, absolute=True)
    terms = _positions(a) + d_in + d_out
    condition = _ratio(2 * (np.abs(rotated) * spread).sum(axis=0) / b_eff, expected, terms)
    arrays = (backend.asarray(a), backend.asarray(e))
    m = backend.asarray(mask)
    for method in ("pairs", "explicit"):
        result = kron.eigen_correction(*arrays, a_eigh, g_eigh, method=method, mask=m)
        assert_backend_array(result, backend, dtype)
        assert_close(to_np(backend, result), expected, dtype, condition)

    correction = rng.uniform(0.5, 1.5, (d_out, d_in)).astype(dtype)
    damping = 0.1  # S + λ in [0.6, 1.6]: condition ≤ 3
    grad = grads.sum(axis=0) / b_eff
    step = ug @ ((ug.T @ grad @ ua) / (f64(correction) + damping)) @ ua.T
    grad_condition = _ratio(
        _gradients(a, e, weight, absolute=True).sum(axis=0), grad, grads.shape[0] * _positions(a)
    )
    result = kron.corrected_solve_captures(
        *arrays, a_eigh, g_eigh, backend.asarray(correction), damping, mask=m
    )
    assert_backend_array(result, backend, dtype)
    assert_close(to_np(backend, result), step, dtype, 3 * (grad_condition + d_in + d_out))
    _unchanged(backend, layers, copies)


# --------------------------------------------------------------------------------------
# woodbury: per_example, gram, cross_gram, rmatvec, matvec, factorize / solve / solve_span
# --------------------------------------------------------------------------------------


@mask_property
def test_woodbury_contractions_and_solves_use_the_masked_g(
    backend: testing.Backend, dtype: np.dtype, layout: str, kind: str, seed: int
) -> None:
    """Every function of :mod:`curvlinalg.woodbury` with per-layer masks equals the dense
    ``G`` of ``g_i = Σ_{t kept} w_it e_itᵀ a_it``; a fully masked example is a zero column."""
    rng = np.random.default_rng(seed)
    layers = _problem(rng, backend, layout, kind, dtype)
    copies = _copies(layers)
    captures, masks = _on(backend, layers)
    shapes = [(e.shape[-1], a.shape[-1]) for a, e, _, _ in layers]
    grads = [_gradients(a, e, w) for a, e, _, w in layers]
    grads_abs = [_gradients(a, e, w, absolute=True) for a, e, _, w in layers]
    g, g_abs = _dense_g(grads), _dense_g(grads_abs)
    batch = g.shape[1]
    positions = max(_positions(a) for a, _, _, _ in layers)
    width = max(d_out + d_in for d_out, d_in in shapes)

    for out, ref, bound in zip(woodbury.per_example(captures, mask=masks), grads, grads_abs):
        assert_backend_array(out, backend, dtype)
        assert_close(to_np(backend, out), ref, dtype, _ratio(bound, ref, positions))

    gram_terms = len(layers) * (positions**2 * width + width**2)
    for method in ("auto", "implicit", "materialize"):
        out = to_np(backend, woodbury.gram(captures, method=method, mask=masks))
        assert_close(out, g.T @ g, dtype, _ratio(g_abs.T @ g_abs, g.T @ g, gram_terms))
        assert np.all(out[-1] == 0) and np.all(out[:, -1] == 0)  # the fully masked example

    other = [  # the same layers' widths, another batch and other positions
        _layer(rng, _lead(rng, backend, layout, 3), a.shape[-1], e.shape[-1], kind, dtype)
        for a, e, _, _ in layers
    ]
    other_captures, other_masks = _on(backend, other)
    h = _dense_g([_gradients(a, e, w) for a, e, _, w in other])
    h_abs = _dense_g([_gradients(a, e, w, absolute=True) for a, e, _, w in other])
    out = woodbury.cross_gram(captures, other_captures, mask=masks, other_mask=other_masks)
    assert_backend_array(out, backend, dtype)
    assert_close(to_np(backend, out), g.T @ h, dtype, _ratio(g_abs.T @ h_abs, g.T @ h, gram_terms))

    vectors = [rng.standard_normal((2,) + shape).astype(dtype) for shape in shapes]
    u = np.concatenate([_vec(v) for v in vectors], axis=1)  # (K, D)
    out = woodbury.rmatvec(captures, [backend.asarray(v) for v in vectors], mask=masks)
    product_terms = positions * max(d_out * d_in for d_out, d_in in shapes) * len(layers)
    assert_close(to_np(backend, out), u @ g, dtype, _ratio(np.abs(u) @ g_abs, u @ g, product_terms))

    w = rng.standard_normal((2, batch)).astype(dtype)
    outs = woodbury.matvec(captures, backend.asarray(w), mask=masks)
    for out, ref, bound in zip(
        outs, unvec_layers((f64(w) @ g.T), shapes), unvec_layers(np.abs(f64(w)) @ g_abs.T, shapes)
    ):
        assert_close(to_np(backend, out), ref, dtype, _ratio(bound, ref, batch * positions))

    scale = 1.0 / _b_eff(*(wt for _, _, _, wt in layers))
    top = scale * np.linalg.norm(g, 2) ** 2
    damping = float(top) if top > 0 else 1.0
    cancel = (np.linalg.norm(g_abs) / np.linalg.norm(g)) ** 2 if np.linalg.norm(g) > 0 else 1.0
    solve_condition = (1 + top / damping) * cancel * gram_terms
    system = damping * np.eye(g.shape[0]) + scale * g @ g.T
    factors = woodbury.factorize(captures, damping, scale, mask=masks)
    solved = woodbury.solve(factors, [backend.asarray(v) for v in vectors])
    expected = unvec_layers(np.linalg.solve(system, u.T).T, shapes)
    for out, ref in zip(solved, expected):
        assert_backend_array(out, backend, dtype)
        assert_close(to_np(backend, out), ref, dtype, solve_condition)
    coefficients = np.full((batch,), scale).astype(dtype)
    spanned = woodbury.solve_span(factors, backend.asarray(coefficients))
    expected = unvec_layers(np.linalg.solve(system, g @ f64(coefficients)), shapes)
    for out, ref in zip(spanned, expected):
        assert_close(to_np(backend, out), ref, dtype, solve_condition)

    per_layer = woodbury.factorize_layers(captures, damping, scale, mask=masks)
    solved = woodbury.solve_layers(per_layer, [backend.asarray(v[0]) for v in vectors])
    for out, layer_g, v in zip(solved, [_dense_g([gl]) for gl in grads], vectors):
        block = damping * np.eye(layer_g.shape[0]) + scale * layer_g @ layer_g.T
        ref = unvec_layers(np.linalg.solve(block, _vec(v[0])), [v.shape[1:]])[0]
        assert_close(to_np(backend, out), ref, dtype, solve_condition)
    _unchanged(backend, layers, copies)


# --------------------------------------------------------------------------------------
# laplace: sample, logdet
# --------------------------------------------------------------------------------------


@mask_property
def test_laplace_sample_and_logdet_use_the_masked_fisher(
    backend: testing.Backend, dtype: np.dtype, layout: str, kind: str, seed: int
) -> None:
    """``Λ = τI + (n/B_eff)·G Gᵀ`` with the masked ``G`` and ``B_eff = Σ_i max_{l,t} w_lit``:
    ``logdet`` is ``slogdet(Λ)`` and ``sample`` is ``τ^{-1/2}(y − V U⁻¹(Vᵀy + z))`` with
    ``V = sqrt(n/(B_eff τ))·G``, ``U = I + VᵀV`` (dense)."""
    rng = np.random.default_rng(seed)
    layers = _problem(rng, backend, layout, kind, dtype)
    captures, masks = _on(backend, layers)
    shapes = [(e.shape[-1], a.shape[-1]) for a, e, _, _ in layers]
    g = _dense_g([_gradients(a, e, w) for a, e, _, w in layers])
    g_abs = _dense_g([_gradients(a, e, w, absolute=True) for a, e, _, w in layers])
    b_eff = _b_eff(*(w for _, _, _, w in layers))
    scale = N_DATA / b_eff
    positions = max(_positions(a) for a, _, _, _ in layers)
    cancel = (np.linalg.norm(g_abs) / np.linalg.norm(g)) ** 2 if np.linalg.norm(g) > 0 else 1.0
    condition = (1 + scale * np.linalg.norm(g, 2) ** 2 / TAU) * cancel * positions**2 * 8

    precision = TAU * np.eye(g.shape[0]) + scale * g @ g.T
    result = laplace.logdet(captures, TAU, N_DATA, mask=masks)
    assert_backend_array(result, backend, dtype)
    assert_close(
        to_np(backend, result), np.asarray(np.linalg.slogdet(precision)[1]), dtype, condition
    )

    samples = 2
    y = [rng.standard_normal((samples,) + shape).astype(dtype) for shape in shapes]
    z = rng.standard_normal((samples, g.shape[1])).astype(dtype)
    v = math.sqrt(scale / TAU) * g
    y_vec = np.concatenate([_vec(part) for part in y], axis=1).T  # (D, S)
    inner = np.linalg.solve(np.eye(g.shape[1]) + v.T @ v, v.T @ y_vec + f64(z).T)
    expected = unvec_layers(((y_vec - v @ inner) / math.sqrt(TAU)).T, shapes)
    drawn = laplace.sample(
        captures, TAU, N_DATA, [backend.asarray(p) for p in y], backend.asarray(z), mask=masks
    )
    for out, ref in zip(drawn, expected):
        assert_backend_array(out, backend, dtype)
        assert_close(to_np(backend, out), ref, dtype, condition)


# --------------------------------------------------------------------------------------
# influence: kfac/ekfac scores and self-scores
# --------------------------------------------------------------------------------------


@mask_property
def test_influence_scores_use_the_masked_gradients(
    backend: testing.Backend, dtype: np.dtype, layout: str, kind: str, seed: int
) -> None:
    """``s_qt = Σ_l ⟨P_l⁻¹ g^q_l, g^t_l⟩`` with masked query and training gradients (both
    methods); self-scores are its diagonal for the training batch with its mask."""
    rng = np.random.default_rng(seed)
    train = _problem(rng, backend, layout, kind, dtype)
    query = [
        _layer(rng, _lead(rng, backend, layout, 3), a.shape[-1], e.shape[-1], kind, dtype)
        for a, e, _, _ in train
    ]
    train_caps, train_masks = _on(backend, train)
    query_caps, query_masks = _on(backend, query)
    inverses, eigens, kfac_ref, ekfac_ref, kfac_bound, ekfac_bound = [], [], 0.0, 0.0, 0.0, 0.0
    for (aq, eq, _, wq), (at, et, _, wt) in zip(query, train):
        d_in, d_out = at.shape[-1], et.shape[-1]
        gq, gt = _gradients(aq, eq, wq), _gradients(at, et, wt)
        gq_abs, gt_abs = _gradients(aq, eq, wq, True), _gradients(at, et, wt, True)
        a_inv, g_inv = _spd(rng, d_in, dtype), _spd(rng, d_out, dtype)
        inverses.append((backend.asarray(a_inv), backend.asarray(g_inv)))
        kfac_ref = kfac_ref + np.einsum("qoi,toi->qt", f64(g_inv) @ gq @ f64(a_inv), gt)
        kfac_bound = kfac_bound + np.einsum(
            "qoi,toi->qt", np.abs(f64(g_inv)) @ gq_abs @ np.abs(f64(a_inv)), gt_abs
        )
        a_eigh = kron.eigh(backend.asarray(_spd(rng, d_in, dtype)))
        g_eigh = kron.eigh(backend.asarray(_spd(rng, d_out, dtype)))
        correction = rng.uniform(0.5, 1.5, (d_out, d_in)).astype(dtype)
        eigens.append((a_eigh, g_eigh, backend.asarray(correction), 0.1))
        ua, ug = to_np(backend, a_eigh.vectors), to_np(backend, g_eigh.vectors)
        weights = 1 / (f64(correction) + 0.1)
        ekfac_ref = ekfac_ref + np.einsum("qoi,toi,oi->qt", ug.T @ gq @ ua, ug.T @ gt @ ua, weights)
        ekfac_bound = ekfac_bound + np.einsum(
            "qoi,toi,oi->qt",
            np.abs(ug.T) @ gq_abs @ np.abs(ua),
            np.abs(ug.T) @ gt_abs @ np.abs(ua),
            weights,
        )
    positions = max(_positions(a) for a, _, _, _ in train + query)
    width = max(a.shape[-1] + e.shape[-1] for a, e, _, _ in train)
    terms = len(train) * (positions**2 + 2) * width * 4
    masked = {"query_mask": query_masks, "train_mask": train_masks}
    for method in ("pairs", "explicit"):
        out = influence.kfac_scores(query_caps, train_caps, inverses, method=method, **masked)
        assert_backend_array(out, backend, dtype)
        assert_close(to_np(backend, out), kfac_ref, dtype, 2 * _ratio(kfac_bound, kfac_ref, terms))
        out = influence.ekfac_scores(query_caps, train_caps, eigens, method=method, **masked)
        assert_close(
            to_np(backend, out), ekfac_ref, dtype, 3 * _ratio(ekfac_bound, ekfac_ref, terms)
        )
    # Self-scores: the same references for the training batch against itself.
    kfac_self = influence.kfac_self_scores(train_caps, inverses, mask=train_masks)
    ekfac_self = influence.ekfac_self_scores(train_caps, eigens, mask=train_masks)
    full_k = influence.kfac_scores(
        train_caps, train_caps, inverses, query_mask=train_masks, train_mask=train_masks
    )
    full_e = influence.ekfac_scores(
        train_caps, train_caps, eigens, query_mask=train_masks, train_mask=train_masks
    )
    for self_scores, full in ((kfac_self, full_k), (ekfac_self, full_e)):
        assert_backend_array(self_scores, backend, dtype)
        diagonal = np.diag(to_np(backend, full))
        assert_close(to_np(backend, self_scores), diagonal, dtype, 3 * terms)
        assert to_np(backend, self_scores)[-1] == 0  # the fully masked example


# --------------------------------------------------------------------------------------
# Boolean example masks = deleting the examples (the library on the smaller batch)
# --------------------------------------------------------------------------------------


def _masked_and_deleted(full, deleted, mask, vectors, y, z, z_kept, inverses) -> dict:
    """``{name: (masked call on the full batch, unmasked call on the deleted batch)}``."""
    b_eff = 3  # the kept examples of the test below
    return {
        "gram": (woodbury.gram(full, mask=mask), woodbury.gram(deleted)),
        "solve": (
            woodbury.solve(woodbury.factorize(full, 0.5, 1 / b_eff, mask=mask), vectors),
            woodbury.solve(woodbury.factorize(deleted, 0.5, 1 / b_eff), vectors),
        ),
        "sample": (
            laplace.sample(full, TAU, N_DATA, y, z, mask=mask),
            laplace.sample(deleted, TAU, N_DATA, y, z_kept),
        ),
        "logdet": (
            laplace.logdet(full, TAU, N_DATA, mask=mask),
            laplace.logdet(deleted, TAU, N_DATA),
        ),
        "scores": (
            influence.kfac_scores(full, full, inverses, query_mask=mask, train_mask=mask),
            influence.kfac_scores(deleted, deleted, inverses),
        ),
    }


def test_a_boolean_example_mask_equals_deleting_the_examples(
    backend: testing.Backend, dtype: np.dtype
) -> None:
    """One ``(B,)`` mask for every ``(B, d)`` layer: the Gram restricted to the kept examples,
    solves, Laplace samples (``z`` of the kept examples) and log-determinants, and influence
    scores equal the unmasked library calls on the batch with the masked examples deleted
    (on JAX all under one ``jax.jit``, where the poison is not scanned for)."""
    rng = np.random.default_rng(7)
    keep = np.array([True, False, True, True, False])
    widths = [(3, 2), (2, 3)]
    captures_np = []
    for d_in, d_out in widths:
        a = rng.standard_normal((5, d_in)).astype(dtype)
        e = rng.standard_normal((5, d_out)).astype(dtype)
        captures_np.append((_poisoned(a, keep, np.nan), _poisoned(e, keep, -np.inf)))
    c = backend.asarray
    full = [(c(a), c(e)) for a, e in captures_np]
    deleted = [(c(a[keep]), c(e[keep])) for a, e in captures_np]
    vectors = [c(rng.standard_normal((d_out, d_in)).astype(dtype)) for d_in, d_out in widths]
    y = [c(rng.standard_normal((2, d_out, d_in)).astype(dtype)) for d_in, d_out in widths]
    z = rng.standard_normal((2, 5)).astype(dtype)
    inverses = [(c(_spd(rng, d_in, dtype)), c(_spd(rng, d_out, dtype))) for d_in, d_out in widths]
    compute = _masked_and_deleted if backend.jit is None else backend.jit(_masked_and_deleted)
    results = compute(full, deleted, c(keep), vectors, y, c(z), c(z[:, keep]), inverses)
    condition = 1e3  # fixed, well-conditioned problems: cancellation and κ stay small
    for name in ("solve", "sample", "logdet"):
        masked, plain = results[name]
        for out, ref in zip(_flat(masked), _flat(plain), strict=True):
            assert_backend_array(out, backend, dtype)
            assert_close(to_np(backend, out), to_np(backend, ref), dtype, condition)
    for name in ("gram", "scores"):
        masked, plain = (to_np(backend, value) for value in results[name])
        assert_close(masked[np.ix_(keep, keep)], plain, dtype, condition)
        assert np.all(masked[~keep] == 0) and np.all(masked[:, ~keep] == 0), name


# --------------------------------------------------------------------------------------
# All ones = unmasked (bit for bit); all masked = zeros (never NaN)
# --------------------------------------------------------------------------------------


def _every_masked_call(
    backend: testing.Backend,
    dtype: np.dtype,
    layout: str,
    masked: bool,
    mask_of: Callable[[tuple[int, ...]], Any],
    poison: bool = False,
):
    """Every masked function of the core on one fixed problem, as ``{name: result}``;
    ``mask_of(lead)`` gives the mask (or ``None`` when not ``masked``)."""
    rng = np.random.default_rng(3)
    batch, widths = 4, [(3, 2), (2, 3)]
    lead = (batch,) if layout == "B" else (batch, 3)
    layers = []
    for d_in, d_out in widths:
        a = rng.standard_normal(lead + (d_in,)).astype(dtype)
        e = rng.standard_normal(lead + (d_out,)).astype(dtype)
        if poison:
            a, e = np.full_like(a, np.nan), np.full_like(e, np.inf)
        layers.append((backend.asarray(a), backend.asarray(e)))
    other = [
        (
            backend.asarray(np.array(backend.to_numpy(a))),
            backend.asarray(np.array(backend.to_numpy(e))),
        )
        for a, e in layers
    ]
    m = mask_of(lead) if masked else None
    kw = {"mask": m}
    a, e = layers[0]
    a_eigh = kron.eigh(backend.asarray(_spd(rng, 3, dtype)))
    g_eigh = kron.eigh(backend.asarray(_spd(rng, 2, dtype)))
    correction = backend.asarray(rng.uniform(0.5, 1.5, (2, 3)).astype(dtype))
    vectors = [
        backend.asarray(rng.standard_normal((2,) + (d_out, d_in)).astype(dtype))
        for d_in, d_out in widths
    ]
    w = backend.asarray(rng.standard_normal((2, batch)).astype(dtype))
    y = [
        backend.asarray(rng.standard_normal((2, d_out, d_in)).astype(dtype))
        for d_in, d_out in widths
    ]
    z = backend.asarray(rng.standard_normal((2, batch)).astype(dtype))
    inverses = [
        (backend.asarray(_spd(rng, d_in, dtype)), backend.asarray(_spd(rng, d_out, dtype)))
        for d_in, d_out in widths
    ]
    eigens = [
        (
            kron.eigh(backend.asarray(_spd(rng, d_in, dtype))),
            kron.eigh(backend.asarray(_spd(rng, d_out, dtype))),
            backend.asarray(rng.uniform(0.5, 1.5, (d_out, d_in)).astype(dtype)),
            0.1,
        )
        for d_in, d_out in widths
    ]
    factors = woodbury.factorize(layers, 0.5, 0.25, **kw)
    scores = {"query_mask": m, "train_mask": m}
    return {
        "factor": kron.factor(a, **kw),
        "factor bias": kron.factor(a, bias=True, **kw),
        "input_factor": kron.input_factor(a, **kw),
        "input_factor bias": kron.input_factor(a, bias=True, **kw),
        "eigen_correction pairs": kron.eigen_correction(a, e, a_eigh, g_eigh, method="pairs", **kw),
        "eigen_correction explicit": kron.eigen_correction(
            a, e, a_eigh, g_eigh, method="explicit", **kw
        ),
        "corrected_solve_captures": kron.corrected_solve_captures(
            a, e, a_eigh, g_eigh, correction, 0.1, **kw
        ),
        "per_example": woodbury.per_example(layers, **kw),
        "gram": woodbury.gram(layers, **kw),
        "gram implicit": woodbury.gram(layers, method="implicit", **kw),
        "gram materialize": woodbury.gram(layers, method="materialize", **kw),
        # other: copies (NumPy's matmul takes a symmetric kernel when x @ x.T shares a buffer)
        "cross_gram": woodbury.cross_gram(layers, other, mask=m, other_mask=m),
        "rmatvec": woodbury.rmatvec(layers, vectors, **kw),
        "matvec": woodbury.matvec(layers, w, **kw),
        "solve": woodbury.solve(factors, vectors),
        "solve_span": woodbury.solve_span(factors, w),
        "logdet woodbury": woodbury.logdet(factors),
        "solve_layers": woodbury.solve_layers(
            woodbury.factorize_layers(layers, 0.5, 0.25, **kw), [v[0, ...] for v in vectors]
        ),
        # n_data a multiple of B, so that n/B is exact for the Python and the array count.
        "sample": laplace.sample(layers, TAU, 3.0 * batch, y, z, **kw),
        "logdet": laplace.logdet(layers, TAU, 3.0 * batch, **kw),
        "kfac_scores": influence.kfac_scores(layers, layers, inverses, **scores),
        "ekfac_scores": influence.ekfac_scores(layers, layers, eigens, **scores),
        "kfac_self_scores": influence.kfac_self_scores(layers, inverses, **kw),
        "ekfac_self_scores": influence.ekfac_self_scores(layers, eigens, **kw),
    }, (vectors, y)


def _flat(result: Any) -> list:
    return list(result) if isinstance(result, list) else [result]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_an_all_ones_mask_is_exactly_the_unmasked_call(
    backend: testing.Backend, dtype: np.dtype, layout: str, kind: str
) -> None:
    _skip_jax_dense_layout(backend, layout)

    def ones(lead: tuple[int, ...]) -> Any:
        return backend.asarray(np.ones(lead, dtype=bool if kind == "bool" else dtype))

    masked, _ = _every_masked_call(backend, dtype, layout, True, ones)
    plain, _ = _every_masked_call(backend, dtype, layout, False, ones)
    for name in plain:
        for out, ref in zip(_flat(masked[name]), _flat(plain[name]), strict=True):
            assert_backend_array(out, backend, dtype)
            np.testing.assert_array_equal(
                backend.to_numpy(out), backend.to_numpy(ref), err_msg=name
            )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_an_all_masked_batch_gives_zeros_even_when_it_holds_nan(
    backend: testing.Backend, dtype: np.dtype, layout: str, kind: str
) -> None:
    """Every position masked and holding NaN/inf: zero factors, Grams, products and scores;
    the solves see ``G = 0`` (``u/λ``, ``τ^{-1/2} y``, ``D·log τ``)."""

    _skip_jax_dense_layout(backend, layout)

    def zeros(lead: tuple[int, ...]) -> Any:
        return backend.asarray(np.zeros(lead, dtype=bool if kind == "bool" else dtype))

    results, (vectors, y) = _every_masked_call(backend, dtype, layout, True, zeros, poison=True)
    special = {"solve", "solve_layers", "sample", "logdet", "logdet woodbury"}
    for name, result in results.items():
        for out in _flat(result):
            assert_backend_array(out, backend, dtype)
            value = backend.to_numpy(out)
            assert np.all(np.isfinite(value)), name
            if name not in special:
                assert np.all(value == 0), name
    for out, v in zip(results["solve"], vectors):
        assert_close(to_np(backend, out), to_np(backend, v) / 0.5, dtype)
    assert_close(
        to_np(backend, results["solve_layers"][0]), to_np(backend, vectors[0][0, ...]) / 0.5, dtype
    )
    for out, noise in zip(results["sample"], y):
        assert_close(to_np(backend, out), to_np(backend, noise) / math.sqrt(TAU), dtype)
    parameters = 3 * 2 + 2 * 3
    assert_close(to_np(backend, results["logdet"]), np.asarray(parameters * math.log(TAU)), dtype)
    assert_close(
        to_np(backend, results["logdet woodbury"]), np.asarray(parameters * math.log(0.5)), dtype
    )
    count = kron.example_count(zeros((4, 3)), dtype=results["factor"].dtype)
    assert float(backend.to_numpy(count)) == 0.0


def test_nan_at_a_kept_position_is_still_refused(backend: testing.Backend) -> None:
    keep = np.array([[True, False], [True, True]])
    a = _poisoned(np.ones((2, 2, 3)), keep, np.nan)
    a[1, 1, 0] = np.nan  # kept
    e = np.ones((2, 2, 2))
    with pytest.raises(ValueError, match=re.escape("x contains NaN")):
        kron.factor(backend.asarray(a), mask=backend.asarray(keep))
    with pytest.raises(ValueError, match=re.escape("captures[0] (a) contains NaN")):
        woodbury.gram([(backend.asarray(a), backend.asarray(e))], mask=backend.asarray(keep))


# --------------------------------------------------------------------------------------
# Per-layer masks: one array for every layer, a sequence with None
# --------------------------------------------------------------------------------------


def test_one_array_masks_every_layer_and_none_leaves_a_layer_unmasked(
    backend: testing.Backend,
) -> None:
    dtype = np.dtype(np.float64)
    rng = np.random.default_rng(11)
    keep = _keep(rng, (4, 3))
    layers_np = [
        (rng.standard_normal((4, 3, d_in)), rng.standard_normal((4, 3, d_out)))
        for d_in, d_out in [(2, 3), (3, 1)]
    ]
    layers = [(backend.asarray(a), backend.asarray(e)) for a, e in layers_np]
    mask = backend.asarray(keep)
    one = woodbury.per_example(layers, mask=mask)
    both = woodbury.per_example(layers, mask=(mask, mask))
    first = woodbury.per_example(layers, mask=[mask, None])
    plain = woodbury.per_example(layers)
    for index in range(2):
        np.testing.assert_array_equal(backend.to_numpy(one[index]), backend.to_numpy(both[index]))
    np.testing.assert_array_equal(backend.to_numpy(first[0]), backend.to_numpy(one[0]))
    np.testing.assert_array_equal(backend.to_numpy(first[1]), backend.to_numpy(plain[1]))
    # Laplace: B_eff = Σ_i max over the layers; an unmasked layer keeps every example.
    weight = keep.astype(np.float64)
    g = _dense_g([_gradients(a, e, w) for (a, e), w in zip(layers_np, [weight, np.ones((4, 3))])])
    precision = TAU * np.eye(g.shape[0]) + N_DATA / 4 * g @ g.T
    assert_close(
        to_np(backend, laplace.logdet(layers, TAU, N_DATA, mask=[mask, None])),
        np.asarray(np.linalg.slogdet(precision)[1]),
        dtype,
        1e3,
    )
    weights = [weight, np.zeros((4, 3))]
    weights[1][0, 2] = 1.0  # example 0 only: B_eff = max over the layers per example
    g = _dense_g([_gradients(a, e, w) for (a, e), w in zip(layers_np, weights)])
    b_eff = _b_eff(*weights)
    assert b_eff == _b_eff(weight)
    precision = TAU * np.eye(g.shape[0]) + N_DATA / b_eff * g @ g.T
    result = laplace.logdet(layers, TAU, N_DATA, mask=[backend.asarray(w) for w in weights])
    assert_close(to_np(backend, result), np.asarray(np.linalg.slogdet(precision)[1]), dtype, 1e3)


# --------------------------------------------------------------------------------------
# Bad masks raise ValueError naming the argument
# --------------------------------------------------------------------------------------

BATCH, POSITIONS = 3, 2


def _bad_mask_calls() -> list[tuple[str, Callable[[dict, Any], Any], str]]:
    """``(id, call(inputs, mask), the mask's argument name)``."""
    return [
        ("factor", lambda x, m: kron.factor(x["a"], mask=m), "mask"),
        ("input_factor", lambda x, m: kron.input_factor(x["a"], mask=m), "mask"),
        ("example_count", lambda x, m: kron.example_count(m, dtype=x["a"].dtype), "mask"),
        (
            "eigen_correction",
            lambda x, m: kron.eigen_correction(x["a"], x["e"], x["ae"], x["ge"], mask=m),
            "mask",
        ),
        (
            "corrected_solve_captures",
            lambda x, m: kron.corrected_solve_captures(
                x["a"], x["e"], x["ae"], x["ge"], x["corr"], 0.1, mask=m
            ),
            "mask",
        ),
        ("embedding_factor", lambda x, m: kron.embedding_factor(x["tokens"], 4, mask=m), "mask"),
        ("per_example", lambda x, m: woodbury.per_example(x["caps"], mask=m), "mask"),
        ("gram", lambda x, m: woodbury.gram(x["caps"], mask=m), "mask"),
        ("cross_gram mask", lambda x, m: woodbury.cross_gram(x["caps"], x["caps"], mask=m), "mask"),
        (
            "cross_gram other_mask",
            lambda x, m: woodbury.cross_gram(x["caps"], x["caps"], other_mask=m),
            "other_mask",
        ),
        ("rmatvec", lambda x, m: woodbury.rmatvec(x["caps"], [x["u"]], mask=m), "mask"),
        ("matvec", lambda x, m: woodbury.matvec(x["caps"], x["w"], mask=m), "mask"),
        ("factorize", lambda x, m: woodbury.factorize(x["caps"], 0.5, mask=m), "mask"),
        (
            "factorize_layers",
            lambda x, m: woodbury.factorize_layers(x["caps"], 0.5, mask=m),
            "mask",
        ),
        (
            "sample",
            lambda x, m: laplace.sample(x["caps"], TAU, N_DATA, [x["y"]], x["z"], mask=m),
            "mask",
        ),
        ("logdet", lambda x, m: laplace.logdet(x["caps"], TAU, N_DATA, mask=m), "mask"),
        (
            "kfac_scores query_mask",
            lambda x, m: influence.kfac_scores(x["caps"], x["caps"], x["inv"], query_mask=m),
            "query_mask",
        ),
        (
            "kfac_scores train_mask",
            lambda x, m: influence.kfac_scores(x["caps"], x["caps"], x["inv"], train_mask=m),
            "train_mask",
        ),
        (
            "ekfac_scores query_mask",
            lambda x, m: influence.ekfac_scores(x["caps"], x["caps"], x["eig"], query_mask=m),
            "query_mask",
        ),
        (
            "ekfac_scores train_mask",
            lambda x, m: influence.ekfac_scores(x["caps"], x["caps"], x["eig"], train_mask=m),
            "train_mask",
        ),
        (
            "kfac_self_scores",
            lambda x, m: influence.kfac_self_scores(x["caps"], x["inv"], mask=m),
            "mask",
        ),
        (
            "ekfac_self_scores",
            lambda x, m: influence.ekfac_self_scores(x["caps"], x["eig"], mask=m),
            "mask",
        ),
    ]


def _bad_masks(backend: testing.Backend) -> list[tuple[str, Any, str]]:
    """``(id, mask, pattern)`` for a ``(B, T)`` layer."""
    lead = (BATCH, POSITIONS)
    negative, nan = np.ones(lead), np.ones(lead)
    negative[1, 0], nan[0, 1] = -1.0, np.nan
    cases = [
        (
            "shape",
            backend.asarray(np.ones((BATCH, POSITIONS + 1), dtype=bool)),
            "shape mismatch: {name}",
        ),
        ("negative", backend.asarray(negative), "{name}.* has negative weights"),
        ("nan", backend.asarray(nan), "{name}.* contains NaN"),
        (
            "integer",
            backend.asarray(np.ones(lead, dtype=np.int64)),
            "{name}.* must have a boolean or real floating dtype",
        ),
        ("list", [[True] * POSITIONS] * BATCH, "{name}"),
    ]
    if backend.name != "numpy":
        cases.append(("other library", np.ones(lead, dtype=bool), "{name}.* is numpy"))
    return cases


@pytest.mark.parametrize(
    "call_id, call, name", _bad_mask_calls(), ids=[c[0] for c in _bad_mask_calls()]
)
def test_bad_masks_raise_naming_the_argument(
    backend: testing.Backend, call_id: str, call: Callable, name: str
) -> None:
    rng = np.random.default_rng(5)
    lead = (BATCH, POSITIONS)
    c = backend.asarray
    a, e = c(rng.standard_normal(lead + (3,))), c(rng.standard_normal(lead + (2,)))
    inputs = {
        "a": a,
        "e": e,
        "ae": kron.eigh(c(_spd(rng, 3, np.dtype(np.float64)))),
        "ge": kron.eigh(c(_spd(rng, 2, np.dtype(np.float64)))),
        "corr": c(np.ones((2, 3))),
        "tokens": c(rng.integers(0, 4, lead)),
        "caps": [(a, e)],
        "u": c(rng.standard_normal((2, 3))),
        "w": c(rng.standard_normal(BATCH)),
        "y": c(rng.standard_normal((1, 2, 3))),
        "z": c(rng.standard_normal((1, BATCH))),
        "inv": [(c(np.eye(3)), c(np.eye(2)))],
        "eig": [(kron.eigh(c(np.eye(3))), kron.eigh(c(np.eye(2))), c(np.ones((2, 3))), 0.1)],
    }
    for case, mask, pattern in _bad_masks(backend):
        if call_id == "example_count" and case in ("shape", "other library"):
            continue  # the mask is its only array: any (B, ...) shape is valid
        with pytest.raises(ValueError, match=pattern.format(name=re.escape(name))) as raised:
            call(inputs, mask)
        other = {"query_mask": "train_mask", "train_mask": "query_mask"}.get(name)
        assert other is None or other not in str(raised.value), (case, str(raised.value))


# --------------------------------------------------------------------------------------
# jax.jit: traced once for new mask values; negative weights act as zero there
# --------------------------------------------------------------------------------------


def test_masked_functions_jit_and_trace_once(dtype: np.dtype) -> None:
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    rng = np.random.default_rng(17)
    lead = (4, 3)
    layers = [
        (
            jnp.asarray(rng.standard_normal(lead + (d_in,)).astype(dtype)),
            jnp.asarray(rng.standard_normal(lead + (d_out,)).astype(dtype)),
        )
        for d_in, d_out in [(3, 2), (2, 3)]
    ]
    a_eigh = kron.eigh(jnp.asarray(_spd(rng, 3, dtype)))
    g_eigh = kron.eigh(jnp.asarray(_spd(rng, 2, dtype)))
    y = [
        jnp.asarray(rng.standard_normal((2, d_out, d_in)).astype(dtype))
        for d_in, d_out in [(3, 2), (2, 3)]
    ]
    z = jnp.asarray(rng.standard_normal((2, 4)).astype(dtype))
    inverses = [
        (jnp.eye(3, dtype=dtype), jnp.eye(2, dtype=dtype)),
        (jnp.eye(2, dtype=dtype), jnp.eye(3, dtype=dtype)),
    ]
    traces = []

    def everything(layers, mask):
        traces.append(None)
        a, e = layers[0]
        count = kron.example_count(mask)
        factors = woodbury.factorize(layers, 0.5, 1 / count, mask=mask)
        return {
            "factor": kron.factor(a, bias=True, mask=mask),
            "input_factor": kron.input_factor(a, mask=mask),
            "count": count,
            "eigen_correction": kron.eigen_correction(a, e, a_eigh, g_eigh, mask=mask),
            "gram": woodbury.gram(layers, mask=mask),
            "solve_span": woodbury.solve_span(factors, jnp.full((4,), 1.0, dtype=dtype) / count),
            "sample": laplace.sample(layers, TAU, N_DATA, y, z, mask=mask),
            "logdet": laplace.logdet(layers, TAU, N_DATA, mask=mask),
            "scores": influence.kfac_scores(
                layers, layers, inverses, query_mask=mask, train_mask=mask
            ),
        }

    jitted = jax.jit(everything)
    weights = [(_keep(rng, lead) * rng.uniform(0.5, 2.0, lead)).astype(dtype) for _ in range(2)]
    for weight in weights:
        traced = jitted(layers, jnp.asarray(weight))
        eager = everything(layers, jnp.asarray(weight))
        for name in eager:
            for out, ref in zip(
                jax.tree_util.tree_leaves(traced[name]),
                jax.tree_util.tree_leaves(eager[name]),
                strict=True,
            ):
                assert out.dtype == ref.dtype, name
                assert_close(np.asarray(out), np.asarray(ref), dtype, 1e3)
    assert len(traces) == 1 + len(weights)  # one trace, then one eager call per mask

    negative = np.array(weights[0])
    negative[0, 1] = -1.0
    zeroed = np.where(negative > 0, negative, 0).astype(dtype)
    traced = jitted(layers, jnp.asarray(negative))
    eager = everything(layers, jnp.asarray(zeroed))
    assert len(traces) == 2 + len(weights)
    for name in eager:
        for out, ref in zip(
            jax.tree_util.tree_leaves(traced[name]), jax.tree_util.tree_leaves(eager[name])
        ):
            assert_close(np.asarray(out), np.asarray(ref), dtype, 1e3)

    # A masked Woodbury passes through jit as an argument and keeps its mask.
    mask = jnp.asarray(weights[1])
    factors = woodbury.factorize(layers, 0.5, 0.25, mask=mask)
    vectors = [jnp.ones((2, 3), dtype=dtype), jnp.ones((3, 2), dtype=dtype)]
    for out, ref in zip(
        jax.jit(woodbury.solve)(factors, vectors), woodbury.solve(factors, vectors)
    ):
        assert_close(np.asarray(out), np.asarray(ref), dtype, 1e3)
