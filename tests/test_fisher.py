r"""Property-based tests of :mod:`curvlinalg.fisher`: the three Fisher types of a softmax
output, as captures for :mod:`curvlinalg.woodbury` (NOTES.md §2.6 and §6, identity 15).

For a classifier with logits ``z`` and cross-entropy ``ℓ = −log p_y``, ``∂ℓ/∂z = p − e_y``.

* empirical Fisher: errors for the data labels;
* MC Fisher: errors for labels ``ỹ ~ p`` (inverse-CDF sampling of the caller's uniform draws);
* exact Fisher: ``C`` rows ``√p_c (p − e_c)`` per example, inputs repeated ``C`` times, still
  with ``scale = 1/B``; ``Σ_c p_c (p − e_c)(p − e_c)ᵀ = diag(p) − ppᵀ``.

The model of the end-to-end checks is softmax regression ``z_i = W a_i`` with ``W`` of shape
``(C, d_in)``: its mean cross-entropy has Hessian ``(1/B) Σ_i (a_i a_iᵀ)⊗(diag p_i − p_i p_iᵀ)``
(column-major ``vec``: ``(A⊗M) vec(V) = vec(M V A)``), which is also its exact Fisher and GGN.
References are dense NumPy, or PyTorch autograd (``torch.func``) in float64; they never call
curvlinalg. The Fisher "as the library sees it" is read off column by column as
``F e_k = (1/B)·G(Gᵀ e_k)`` with ``woodbury.rmatvec``/``matvec`` on all ``D`` basis vectors at
once (the ``K`` right-hand-side form).

Tolerances (``assert_close``, ``32·κ·eps``): the library computes ``p`` from logits rounded to
the tested dtype; the rounding of ``exp`` of a shifted logit is relative ``≈ |z|·eps``, so
conditions carry a factor ``1 + max|z|``, times the cancellation factor
``n·‖|·|‖/‖·‖`` of the contraction (see tests/test_woodbury.py) and, for solves,
``1 + ‖F‖/λ``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from curvlinalg import fisher, testing, woodbury
from tests import references
from tests.conftest import assert_backend_array, assert_close, rtol
from tests.references import f64, to_np, vec

property_test = references.property_tests(references.quarter_on_jax)

F32 = np.dtype(np.float32)
F64 = np.dtype(np.float64)
I64 = np.dtype(np.int64)


# --------------------------------------------------------------------------------------
# References (no curvlinalg)
# --------------------------------------------------------------------------------------


def reference_softmax(logits: np.ndarray) -> np.ndarray:
    z = f64(logits)
    shifted = np.exp(z - z.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def one_hot(labels: np.ndarray, classes: int) -> np.ndarray:
    return np.eye(classes)[np.asarray(labels)]


def basis(classes: int, d_in: int) -> np.ndarray:
    """``(D, C, d_in)``: ``mat(e_k)`` for every column-major basis vector ``e_k``."""
    size = classes * d_in
    return np.eye(size).reshape(size, d_in, classes).transpose(0, 2, 1)


def kron_fisher(a: np.ndarray, p: np.ndarray) -> np.ndarray:
    """``(1/B) Σ_i (a_i a_iᵀ)⊗(diag p_i − p_i p_iᵀ)``: Hessian of the mean cross-entropy of
    softmax regression, and its exact Fisher."""
    a, p = f64(a), f64(p)
    return sum(np.kron(np.outer(x, x), np.diag(q) - np.outer(q, q)) for x, q in zip(a, p)) / len(a)


def kron_fisher_abs(a: np.ndarray, p: np.ndarray) -> np.ndarray:
    """The same sum with every difference replaced by a sum of absolute values:
    ``(1/B) Σ_i (|a_i||a_i|ᵀ)⊗(Σ_c p_c (p + e_c)(p + e_c)ᵀ) = ⊗(diag p + 3ppᵀ)``. Its ratio to
    the Fisher is the cancellation factor: large when p is nearly one-hot, where
    ``p_c(1 − p_c)`` is formed from a rounded ``p_c ≈ 1`` (in the library, in
    ``diag p − ppᵀ`` of the reference and in autograd's Hessian alike)."""
    a, p = np.abs(f64(a)), f64(p)
    total = sum(np.kron(np.outer(x, x), np.diag(q) + 3 * np.outer(q, q)) for x, q in zip(a, p))
    return total / len(a)


def logit_condition(logits: np.ndarray) -> float:
    return 1.0 + float(np.abs(f64(logits)).max())


def cancellation(absolute: np.ndarray, value: np.ndarray, terms: int) -> float:
    norm = np.linalg.norm(value)
    return float(terms) if norm == 0 else float(terms * np.linalg.norm(absolute) / norm)


def woodbury_fisher(backend: testing.Backend, captures, classes: int, d_in: int, batch: int):
    """``(1/B)·G Gᵀ`` read off through rmatvec/matvec on all basis vectors at once."""
    vectors = backend.asarray(basis(classes, d_in).astype(backend.to_numpy(captures[0][0]).dtype))
    weights = woodbury.rmatvec(captures, [vectors])  # (D, rows)
    (columns,) = woodbury.matvec(captures, weights)  # (D, C, d_in)
    assert_backend_array(columns, backend, backend.to_numpy(captures[0][0]).dtype)
    out = to_np(backend, columns)
    return np.stack([vec(m) for m in out], axis=1) / batch


# --------------------------------------------------------------------------------------
# Drawing a softmax-regression problem
# --------------------------------------------------------------------------------------


def draw_model(data: st.DataObject, backend: testing.Backend, dtype: np.dtype, logit_scale=None):
    """``(a, W, logits)`` with ``logits = a Wᵀ`` (float64 product, cast to ``dtype``)."""
    if backend.name == "jax":  # fixed shapes: fewer eager compilations
        batch, classes, d_in = 3, 3, 2
    else:
        batch = data.draw(st.integers(1, 5))
        classes = data.draw(st.integers(2, 4))
        d_in = data.draw(st.integers(1, 4))
    # Moderate logits: nearly one-hot p makes the Fisher ill-conditioned to compute (see
    # kron_fisher_abs), which the tolerances allow for but which weakens the checks.
    scale = data.draw(st.sampled_from([0.3, 1.0, 2.0])) if logit_scale is None else logit_scale
    a = data.draw(testing.arrays((batch, d_in), dtype=dtype))
    w = data.draw(testing.arrays((classes, d_in), dtype=dtype, scale=scale))
    logits = (f64(a) @ f64(w).T).astype(dtype)
    return a, w, logits


# --------------------------------------------------------------------------------------
# softmax, softmax_errors, softmax_exact_errors
# --------------------------------------------------------------------------------------


@property_test(data=st.data(), scale=st.sampled_from([1.0, 30.0, 300.0]))
def test_softmax_is_the_stable_reference(
    backend: testing.Backend, dtype: np.dtype, data: st.DataObject, scale: float
) -> None:
    shape = (
        (3, 4)
        if backend.name == "jax"
        else (data.draw(st.integers(1, 6)), data.draw(st.integers(1, 5)))
    )
    logits = data.draw(testing.arrays(shape, dtype=dtype, scale=scale))
    result = fisher.softmax(backend.asarray(logits))
    assert_backend_array(result, backend, dtype)
    out = to_np(backend, result)
    expected = reference_softmax(logits)
    assert_close(out, expected, dtype, logit_condition(logits))
    assert np.all(out >= 0)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=0, atol=rtol(dtype, shape[1]))


def test_softmax_does_not_overflow(backend: testing.Backend, dtype: np.dtype) -> None:
    logits = np.array([[1000.0, 0.0, -1000.0], [-800.0, -800.0, -800.0]], dtype=dtype)
    out = backend.to_numpy(fisher.softmax(backend.asarray(logits)))
    np.testing.assert_allclose(out, [[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]], rtol=rtol(dtype))


@property_test(data=st.data())
def test_softmax_errors_are_p_minus_one_hot(
    backend: testing.Backend, dtype: np.dtype, data: st.DataObject
) -> None:
    _, _, logits = draw_model(
        data, backend, dtype, logit_scale=data.draw(st.sampled_from([1.0, 3.0]))
    )
    batch, classes = logits.shape
    labels = np.asarray(
        data.draw(st.lists(st.integers(0, classes - 1), min_size=batch, max_size=batch))
    )
    result = fisher.softmax_errors(backend.asarray(logits), backend.asarray(labels))
    assert_backend_array(result, backend, dtype)
    p, target = reference_softmax(logits), one_hot(labels, classes)
    expected = p - target
    # 1 − p_y cancels when p_y ≈ 1: the cancellation factor ‖p + e_y‖/‖p − e_y‖ enters.
    condition = logit_condition(logits) * cancellation(p + target, expected, 2)
    assert_close(to_np(backend, result), expected, dtype, condition)


@property_test(data=st.data())
def test_exact_errors_rows_sum_to_diag_p_minus_ppt(
    backend: testing.Backend, dtype: np.dtype, data: st.DataObject
) -> None:
    """Identity 15 at the logits: ``Σ_c p_c (p − e_c)(p − e_c)ᵀ = diag(p) − ppᵀ``."""
    _, _, logits = draw_model(data, backend, dtype)
    batch, classes = logits.shape
    result = fisher.softmax_exact_errors(backend.asarray(logits))
    assert_backend_array(result, backend, dtype)
    out = to_np(backend, result)
    assert out.shape == (batch, classes, classes)
    p = reference_softmax(logits)
    rows = np.sqrt(p)[:, :, None] * (p[:, None, :] - np.eye(classes)[None])
    rows_abs = np.sqrt(p)[:, :, None] * (p[:, None, :] + np.eye(classes)[None])
    condition = logit_condition(logits) * cancellation(rows_abs, rows, 2)
    assert_close(out, rows, dtype, condition)
    expected = np.stack([np.diag(q) - np.outer(q, q) for q in p])
    gram = np.einsum("bci,bcj->bij", out, out)
    bound = np.einsum("bci,bcj->bij", rows_abs, rows_abs)
    assert_close(
        gram, expected, dtype, logit_condition(logits) * cancellation(bound, expected, classes + 2)
    )


# --------------------------------------------------------------------------------------
# The exact Fisher of softmax regression through Woodbury
# --------------------------------------------------------------------------------------


def exact_captures(backend: testing.Backend, a: np.ndarray, logits: np.ndarray):
    """Captures of the exact Fisher: inputs repeated C times, ``(B·C, C)`` rows."""
    batch, classes = logits.shape
    rows = fisher.softmax_exact_errors(backend.asarray(logits))
    e = backend.xp.reshape(rows, (batch * classes, classes))
    return [(backend.asarray(np.repeat(a, classes, axis=0)), e)]


@property_test(data=st.data(), relative=st.sampled_from([0.1, 1.0, 10.0]))
def test_exact_fisher_captures_give_the_kronecker_fisher(
    backend: testing.Backend, dtype: np.dtype, data: st.DataObject, relative: float
) -> None:
    a, _, logits = draw_model(data, backend, dtype)
    batch, classes = logits.shape
    d_in = a.shape[1]
    p = reference_softmax(logits)
    expected = kron_fisher(a, p)
    base = logit_condition(logits) * cancellation(
        kron_fisher_abs(a, p), expected, batch * classes + classes + d_in
    )
    captures = exact_captures(backend, a, logits)

    # The Fisher itself, (1/B) G Gᵀ with scale 1/B (not 1/(B·C)).
    assert_close(woodbury_fisher(backend, captures, classes, d_in, batch), expected, dtype, base)

    # The (B·C)×(B·C) Gram/B has the nonzero spectrum of F.
    kernel = to_np(backend, woodbury.gram(captures)) / batch
    count = min(batch * classes, classes * d_in)
    top = lambda m: np.sort(np.linalg.eigvalsh(m))[::-1][:count]  # noqa: E731
    # Sorted eigenvalues move by at most the Frobenius norm of the perturbation.
    assert_close(top(kernel), top(expected), dtype, 2 * base)

    # The damped natural gradient of the exact Fisher.
    norm = np.linalg.norm(expected, 2)
    damping = relative * norm if norm > 0 else relative
    u = data.draw(testing.arrays((classes, d_in), dtype=dtype))
    system = expected + damping * np.eye(classes * d_in)
    reference = np.linalg.solve(system, vec(f64(u))).reshape((classes, d_in), order="F")
    (out,) = woodbury.solve(
        woodbury.factorize(captures, damping, 1.0 / batch), [backend.asarray(u)]
    )
    assert_backend_array(out, backend, dtype)
    assert_close(to_np(backend, out), reference, dtype, base * (1 + norm / damping))


def test_exact_fisher_is_the_hessian_of_softmax_regression() -> None:
    """The Kronecker formula above and the library's exact Fisher are the Hessian of the mean
    cross-entropy (torch.func.hessian), for softmax regression (where Fisher = GGN = Hessian)."""
    torch = pytest.importorskip("torch")
    numpy_backend = testing.available_backends()[0]

    @settings(max_examples=10)
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        a, w, logits = draw_model(data, numpy_backend, F64)
        batch, classes = logits.shape
        d_in = a.shape[1]
        labels = torch.asarray(
            data.draw(st.lists(st.integers(0, classes - 1), min_size=batch, max_size=batch))
        )
        inputs = torch.asarray(a)

        def loss(weight):
            return torch.nn.functional.cross_entropy(inputs @ weight.T, labels)

        hessian = torch.func.hessian(loss)(torch.asarray(w))  # (C, d_in, C, d_in)
        dense = hessian.permute(1, 0, 3, 2).reshape(classes * d_in, classes * d_in).numpy()
        p = reference_softmax(logits)
        condition = cancellation(kron_fisher_abs(a, p), kron_fisher(a, p), batch * classes + 8)
        assert_close(kron_fisher(a, p), dense, F64, condition)
        library = woodbury_fisher(
            numpy_backend, exact_captures(numpy_backend, a, logits), classes, d_in, batch
        )
        assert_close(library, dense, F64, logit_condition(logits) * condition)

    check()


# --------------------------------------------------------------------------------------
# Empirical Fisher: per-example gradients of the data labels' losses
# --------------------------------------------------------------------------------------


@property_test(data=st.data())
def test_empirical_fisher_is_the_mean_outer_product_of_per_example_gradients(
    backend: testing.Backend, dtype: np.dtype, data: st.DataObject
) -> None:
    torch = pytest.importorskip("torch")
    a, w, logits = draw_model(data, backend, dtype)
    batch, classes = logits.shape
    d_in = a.shape[1]
    labels = np.asarray(
        data.draw(st.lists(st.integers(0, classes - 1), min_size=batch, max_size=batch))
    )

    # Reference: ∇_W of each example's own loss, by torch.func (vmap of grad), float64.
    def example_loss(weight, x, y):
        return torch.nn.functional.cross_entropy((weight @ x)[None], y[None])

    grads = torch.func.vmap(torch.func.grad(example_loss), in_dims=(None, 0, 0))(
        torch.asarray(f64(w)), torch.asarray(f64(a)), torch.asarray(labels)
    ).numpy()  # (B, C, d_in)
    flat = np.stack([vec(g) for g in grads], axis=1)  # D×B
    expected = flat @ flat.T / batch

    errors = fisher.softmax_errors(backend.asarray(logits), backend.asarray(labels))
    captures = [(backend.asarray(a), errors)]
    p, target = reference_softmax(logits), one_hot(labels, classes)
    # Both sides get the logits rounded to dtype (torch recomputes W a in float64 from the
    # rounded a, W: a few ulps, inside the 1 + max|z| factor).
    error_condition = logit_condition(logits) * cancellation(p + target, p - target, 2)

    (per_example,) = woodbury.per_example(captures)
    assert_backend_array(per_example, backend, dtype)
    bound = np.einsum("bo,bi->boi", p + target, np.abs(f64(a)))
    assert_close(
        to_np(backend, per_example), grads, dtype, error_condition * cancellation(bound, grads, 2)
    )

    bound_flat = np.stack([vec(g) for g in bound], axis=1)
    condition = error_condition * cancellation(
        bound_flat @ bound_flat.T, expected, batch + classes + d_in
    )
    assert_close(
        woodbury_fisher(backend, captures, classes, d_in, batch), expected, dtype, condition
    )


# --------------------------------------------------------------------------------------
# MC Fisher: sampled labels
# --------------------------------------------------------------------------------------


@property_test(data=st.data())
def test_sample_labels_is_the_inverse_cdf(
    backend: testing.Backend, dtype: np.dtype, data: st.DataObject
) -> None:
    _, _, logits = draw_model(data, backend, dtype)
    batch, classes = logits.shape
    uniform = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1))).uniform(size=batch)
    uniform = uniform.astype(dtype)
    uniform[0] = data.draw(
        st.sampled_from([uniform[0], 0.0, np.nextafter(dtype.type(1), dtype.type(0))])
    )
    result = fisher.sample_labels(backend.asarray(logits), backend.asarray(uniform))
    assert_backend_array(result, backend, I64)
    labels = backend.to_numpy(result)
    assert labels.shape == (batch,)
    assert np.all((labels >= 0) & (labels < classes))
    cumulative = np.cumsum(reference_softmax(logits), axis=1)
    expected = np.minimum((cumulative <= f64(uniform)[:, None]).sum(axis=1), classes - 1)
    # Compare away from the class boundaries, where rounding of the CDF may decide.
    margin = 8 * rtol(dtype, logit_condition(logits) * classes)
    clear = np.abs(cumulative - f64(uniform)[:, None]).min(axis=1) > margin
    np.testing.assert_array_equal(labels[clear], expected[clear])


def test_sample_labels_have_the_model_class_frequencies(backend: testing.Backend) -> None:
    rng = np.random.default_rng(2024)
    logits = np.array([[0.0, 1.0, -1.0, 2.0], [3.0, 0.0, 0.0, -2.0], [0.0, 0.0, 0.0, 0.0]])
    draws = 20_000
    repeated = np.repeat(logits, draws, axis=0)
    uniform = rng.uniform(size=repeated.shape[0])
    labels = backend.to_numpy(
        fisher.sample_labels(backend.asarray(repeated), backend.asarray(uniform))
    )
    p = reference_softmax(logits)
    for row in range(len(logits)):
        counts = np.bincount(labels[row * draws : (row + 1) * draws], minlength=4)
        expected = draws * p[row]
        sd = np.sqrt(draws * p[row] * (1 - p[row]))
        assert np.all(np.abs(counts - expected) <= 5 * sd), (row, counts, expected, sd)
    # Power: reversing the class order (a wrong CDF) would be far outside 5 SD.
    wrong = draws * p[0][::-1]
    assert np.any(np.abs(wrong - draws * p[0]) > 5 * np.sqrt(draws * p[0] * (1 - p[0])))


@property_test(data=st.data())
def test_mc_fisher_expectation_is_the_exact_fisher(
    backend: testing.Backend, dtype: np.dtype, data: st.DataObject
) -> None:
    """``E_{ỹ~p}[MC Fisher] = exact Fisher``, exactly: enumerating ỹ_i = c for every class
    and weighting by p_ic, ``Σ_c (1/B) G_c diag(p_{:,c}) G_cᵀ`` with MC captures
    ``(a, softmax_errors(logits, c))``."""
    a, _, logits = draw_model(data, backend, dtype)
    batch, classes = logits.shape
    d_in = a.shape[1]
    p = reference_softmax(logits)
    probabilities = fisher.softmax(backend.asarray(logits))
    vectors = backend.asarray(basis(classes, d_in).astype(dtype))
    total = 0.0
    for c in range(classes):
        labels = backend.asarray(np.full(batch, c, dtype=np.int64))
        captures = [(backend.asarray(a), fisher.softmax_errors(backend.asarray(logits), labels))]
        weights = woodbury.rmatvec(captures, [vectors]) * probabilities[:, c]  # (D, B)
        (columns,) = woodbury.matvec(captures, weights)
        total = total + np.stack([vec(m) for m in to_np(backend, columns)], axis=1) / batch
    expected = kron_fisher(a, p)
    condition = logit_condition(logits) * cancellation(
        kron_fisher_abs(a, p), expected, batch * classes + d_in + classes
    )
    assert_close(total, expected, dtype, condition)
    exact = woodbury_fisher(backend, exact_captures(backend, a, logits), classes, d_in, batch)
    assert_close(total, exact, dtype, 2 * condition)


def test_mc_fisher_of_many_draws_converges_to_the_exact_fisher(backend: testing.Backend) -> None:
    """Statistical: with N sampled labels per example the MC Fisher is within 5 standard errors
    of the exact Fisher, entry by entry (fixed seed)."""
    rng = np.random.default_rng(7)
    batch, classes, d_in, draws = 2, 3, 2, 4000
    a = rng.standard_normal((batch, d_in))
    logits = a @ rng.standard_normal((classes, d_in)).T
    exact = kron_fisher(a, reference_softmax(logits))

    repeated_a, repeated_logits = np.repeat(a, draws, axis=0), np.repeat(logits, draws, axis=0)
    uniform = rng.uniform(size=batch * draws)
    labels = fisher.sample_labels(backend.asarray(repeated_logits), backend.asarray(uniform))
    errors = fisher.softmax_errors(backend.asarray(repeated_logits), labels)
    captures = [(backend.asarray(repeated_a), errors)]
    estimate = woodbury_fisher(backend, captures, classes, d_in, batch * draws)

    # Standard error of the mean of the per-draw outer products, example by example.
    sampled = backend.to_numpy(labels)
    p = reference_softmax(repeated_logits)
    grads = np.einsum("bo,bi->boi", p - one_hot(sampled, classes), repeated_a)
    outer = np.stack([np.outer(vec(g), vec(g)) for g in grads]).reshape(batch, draws, -1)
    variance = outer.var(axis=1, ddof=1).sum(axis=0) * draws / (batch * draws) ** 2
    standard_error = np.sqrt(variance).reshape(exact.shape)
    assert np.all(np.abs(estimate - exact) <= 5 * standard_error + 1e-12), (
        estimate - exact
    ) / standard_error
    # Power: labels drawn uniformly (not from p) give an MC "Fisher" that fails the check.
    uniform_labels = rng.integers(0, classes, size=batch * draws)
    wrong = np.einsum("bo,bi->boi", p - one_hot(uniform_labels, classes), repeated_a)
    wrong_fisher = sum(np.outer(vec(g), vec(g)) for g in wrong) / (batch * draws)
    assert np.any(np.abs(wrong_fisher - exact) > 5 * standard_error)


# --------------------------------------------------------------------------------------
# Cross-cutting: namespace and dtype kept, inputs untouched, jax.jit, errors
# --------------------------------------------------------------------------------------


def _fixed() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {
        "logits": rng.standard_normal((4, 3)) * 2,
        "uniform": rng.uniform(size=4),
        "labels": np.array([0, 2, 1, 2], dtype=np.int64),
    }


CASES: dict[str, Callable[[dict], Any]] = {
    "softmax": lambda x: fisher.softmax(x["logits"]),
    "sample_labels": lambda x: fisher.sample_labels(x["logits"], x["uniform"]),
    "softmax_errors": lambda x: fisher.softmax_errors(x["logits"], x["labels"]),
    "softmax_exact_errors": lambda x: fisher.softmax_exact_errors(x["logits"]),
}


def _inputs(backend: testing.Backend, dtype: np.dtype) -> dict[str, Any]:
    return {
        k: backend.asarray(v if v.dtype == np.int64 else v.astype(dtype))
        for k, v in _fixed().items()
    }


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_function_keeps_namespace_and_dtype_and_is_pure(
    backend: testing.Backend, dtype: np.dtype, name: str
) -> None:
    inputs = _inputs(backend, dtype)
    before = {k: np.array(backend.to_numpy(v), copy=True) for k, v in inputs.items()}
    result = CASES[name](inputs)
    assert_backend_array(result, backend, I64 if name == "sample_labels" else dtype)
    for key, copy in before.items():
        np.testing.assert_array_equal(backend.to_numpy(inputs[key]), copy)


def test_every_function_works_under_jit(backend: testing.Backend, dtype: np.dtype) -> None:
    if backend.jit is None:
        pytest.skip("jit is JAX's")
    inputs = _inputs(backend, dtype)
    everything = lambda x: {name: call(x) for name, call in CASES.items()}  # noqa: E731
    eager, jitted = everything(inputs), backend.jit(everything)(inputs)
    for name in CASES:
        expected_dtype = I64 if name == "sample_labels" else dtype
        assert_backend_array(jitted[name], backend, expected_dtype)
        if name == "sample_labels":
            np.testing.assert_array_equal(
                backend.to_numpy(jitted[name]), backend.to_numpy(eager[name])
            )
        else:
            assert_close(to_np(backend, jitted[name]), to_np(backend, eager[name]), dtype, 10.0)


def _error_cases() -> list[tuple[str, Callable[[Callable], Any], str]]:
    x = _fixed()
    logits, uniform, labels = x["logits"], x["uniform"], x["labels"]
    nan_logits = logits.copy()
    nan_logits[1, 2] = np.nan
    nan_uniform = uniform.copy()
    nan_uniform[0] = np.nan
    return [
        ("softmax-1d", lambda c: fisher.softmax(c(logits[0])), "logits"),
        (
            "softmax-int",
            lambda c: fisher.softmax(c(labels[:, None] * np.ones((1, 3), np.int64))),
            r"logits.*floating",
        ),
        ("softmax-nan", lambda c: fisher.softmax(c(nan_logits)), r"logits.*NaN"),
        ("exact-nan", lambda c: fisher.softmax_exact_errors(c(nan_logits)), r"logits.*NaN"),
        ("exact-4d", lambda c: fisher.softmax_exact_errors(c(logits[None, None])), "logits"),
        (
            "errors-float-labels",
            lambda c: fisher.softmax_errors(c(logits), c(labels.astype(np.float64))),
            r"labels.*integer",
        ),
        (
            "errors-negative-label",
            lambda c: fisher.softmax_errors(c(logits), c(np.array([0, -1, 1, 2]))),
            "labels",
        ),
        (
            "errors-label-too-large",
            lambda c: fisher.softmax_errors(c(logits), c(np.array([0, 3, 1, 2]))),
            "labels",
        ),
        (
            "errors-labels-length",
            lambda c: fisher.softmax_errors(c(logits), c(labels[:3])),
            "labels",
        ),
        (
            "errors-labels-2d",
            lambda c: fisher.softmax_errors(c(logits), c(labels[:, None])),
            "labels",
        ),
        (
            "errors-nan-logits",
            lambda c: fisher.softmax_errors(c(nan_logits), c(labels)),
            r"logits.*NaN",
        ),
        (
            "sample-uniform-length",
            lambda c: fisher.sample_labels(c(logits), c(uniform[:3])),
            "uniform",
        ),
        (
            "sample-uniform-2d",
            lambda c: fisher.sample_labels(c(logits), c(uniform[:, None])),
            "uniform",
        ),
        (
            "sample-uniform-int",
            lambda c: fisher.sample_labels(c(logits), c(labels)),
            r"uniform.*floating",
        ),
        (
            "sample-uniform-nan",
            lambda c: fisher.sample_labels(c(logits), c(nan_uniform)),
            "uniform",
        ),
        (
            "sample-uniform-range",
            lambda c: fisher.sample_labels(c(logits), c(uniform + 1.5)),
            "uniform",
        ),
        (
            "sample-nan-logits",
            lambda c: fisher.sample_labels(c(nan_logits), c(uniform)),
            r"logits.*NaN",
        ),
        (
            "sample-int-logits",
            lambda c: fisher.sample_labels(
                c(labels[:, None] * np.ones((1, 3), np.int64)), c(uniform)
            ),
            r"logits.*floating",
        ),
    ]


ERROR_CASES = _error_cases()


@pytest.mark.parametrize(
    "call, pattern", [case[1:] for case in ERROR_CASES], ids=[case[0] for case in ERROR_CASES]
)
def test_bad_input_raises_a_value_error_naming_the_argument(
    backend: testing.Backend, call: Callable, pattern: str
) -> None:
    with pytest.raises(ValueError, match=pattern):
        call(backend.asarray)


@pytest.mark.parametrize("name", ["sample_labels", "softmax_errors"])
def test_mixed_namespaces_raise(name: str) -> None:
    torch = pytest.importorskip("torch")
    x = _fixed()
    second = "uniform" if name == "sample_labels" else "labels"
    call = getattr(fisher, name)
    assert call(torch.asarray(x["logits"]), torch.asarray(x[second])) is not None
    with pytest.raises(ValueError, match="different libraries"):
        call(np.asarray(x["logits"]), torch.asarray(x[second]))
    with pytest.raises(ValueError, match="different libraries"):
        call(torch.asarray(x["logits"]), np.asarray(x[second]))


# --------------------------------------------------------------------------------------
# Sequences: (B, T, C) logits, (B, T) labels, padding masks
# --------------------------------------------------------------------------------------


def draw_sequence_model(data: st.DataObject, backend: testing.Backend, dtype: np.dtype):
    """``(a, W, logits, mask, labels)`` of sequence softmax regression ``z_it = W a_it``:
    ``a`` ``(B, T, d_in)``, ``logits`` ``(B, T, C)``, ``mask`` ``(B, T)`` boolean with every
    sequence's tail padded (at least one kept position overall), ``labels`` ``(B, T)`` data
    labels with ``-100`` (``ignore_index``) at padded positions."""
    if backend.name == "jax":  # fixed shapes: fewer eager compilations
        batch, length, classes, d_in = 2, 3, 3, 2
    else:
        batch, length = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 4))
        classes, d_in = data.draw(st.integers(2, 4)), data.draw(st.integers(1, 3))
    scale = data.draw(st.sampled_from([0.3, 1.0, 2.0]))
    a = data.draw(testing.arrays((batch, length, d_in), dtype=dtype))
    w = data.draw(testing.arrays((classes, d_in), dtype=dtype, scale=scale))
    logits = (f64(a) @ f64(w).T).astype(dtype)
    lengths = np.asarray(
        data.draw(st.lists(st.integers(0, length), min_size=batch, max_size=batch))
    )
    lengths[0] = max(lengths[0], 1)
    mask = np.arange(length)[None, :] < lengths[:, None]
    labels = np.asarray(
        data.draw(
            st.lists(st.integers(0, classes - 1), min_size=batch * length, max_size=batch * length)
        )
    ).reshape(batch, length)
    labels = np.where(mask, labels, -100)
    return a, w, logits, mask, labels


def sequence_property(**strategies: st.SearchStrategy) -> Callable[[Callable], Callable]:
    """:func:`property_test` for methods of :class:`TestSequences`."""

    def decorate(check: Callable) -> Callable:
        def test(self, backend: testing.Backend, dtype: np.dtype) -> None:
            count = max(3, settings.default.max_examples // 2)
            examples = max(3, count // 4) if backend.name == "jax" else count
            run = given(backend=st.just(backend), dtype=st.just(dtype), **strategies)(
                lambda **kw: check(self, **kw)
            )
            settings(max_examples=examples)(run)()

        test.__name__, test.__qualname__ = check.__name__, check.__qualname__
        test.__doc__ = check.__doc__
        return test

    return decorate


class TestSequences:
    """Language-model outputs: ``B·T`` independent softmax outputs, masked positions deleted.

    References work on the kept positions only (``logits[mask]``, ``a[mask]``: padded
    positions DELETED), with the ``(B, C)`` textbook formulas above; the library's rows at
    padded positions must be exactly zero."""

    @sequence_property(data=st.data())
    def test_softmax_and_errors_per_position(
        self, backend: testing.Backend, dtype: np.dtype, data: st.DataObject
    ) -> None:
        _, _, logits, mask, labels = draw_sequence_model(data, backend, dtype)
        classes = logits.shape[-1]
        p = to_np(backend, fisher.softmax(backend.asarray(logits)))
        assert p.shape == logits.shape
        flat = logits.reshape(-1, classes)
        assert_close(
            p.reshape(-1, classes), reference_softmax(flat), dtype, logit_condition(logits)
        )

        result = fisher.softmax_errors(
            backend.asarray(logits), backend.asarray(labels), mask=backend.asarray(mask)
        )
        assert_backend_array(result, backend, dtype)
        out = to_np(backend, result)
        assert out.shape == logits.shape
        np.testing.assert_array_equal(out[~mask], 0.0)
        kept_p, target = reference_softmax(logits[mask]), one_hot(labels[mask], classes)
        condition = logit_condition(logits) * cancellation(kept_p + target, kept_p - target, 2)
        assert_close(out[mask], kept_p - target, dtype, condition)

        # Without a mask, (B, T) labels in range give the unmasked per-position errors.
        filled = np.where(mask, labels, 0)
        unmasked = to_np(
            backend, fisher.softmax_errors(backend.asarray(logits), backend.asarray(filled))
        )
        expected = reference_softmax(flat) - one_hot(filled.reshape(-1), classes)
        bound = reference_softmax(flat) + one_hot(filled.reshape(-1), classes)
        assert_close(
            unmasked.reshape(-1, classes),
            expected,
            dtype,
            logit_condition(logits) * cancellation(bound, expected, 2),
        )

    @sequence_property(data=st.data())
    def test_exact_rows_per_position_and_zero_where_masked(
        self, backend: testing.Backend, dtype: np.dtype, data: st.DataObject
    ) -> None:
        """``[i, t, c, :] = √p_itc (p_it − e_c)``; ``Σ_c`` of their outer products is
        ``diag p_it − p_it p_itᵀ`` at kept positions and 0 at padded ones."""
        _, _, logits, mask, _ = draw_sequence_model(data, backend, dtype)
        batch, length, classes = logits.shape
        result = fisher.softmax_exact_errors(backend.asarray(logits), mask=backend.asarray(mask))
        assert_backend_array(result, backend, dtype)
        out = to_np(backend, result)
        assert out.shape == (batch, length, classes, classes)
        np.testing.assert_array_equal(out[~mask], 0.0)
        p = reference_softmax(logits[mask])
        rows = np.sqrt(p)[:, :, None] * (p[:, None, :] - np.eye(classes)[None])
        rows_abs = np.sqrt(p)[:, :, None] * (p[:, None, :] + np.eye(classes)[None])
        assert_close(
            out[mask], rows, dtype, logit_condition(logits) * cancellation(rows_abs, rows, 2)
        )
        gram = np.einsum("nci,ncj->nij", out[mask], out[mask])
        expected = np.stack([np.diag(q) - np.outer(q, q) for q in p])
        bound = np.einsum("nci,ncj->nij", rows_abs, rows_abs)
        assert_close(
            gram,
            expected,
            dtype,
            logit_condition(logits) * cancellation(bound, expected, classes + 2),
        )
        # Unmasked: every position's rows.
        full = to_np(backend, fisher.softmax_exact_errors(backend.asarray(logits)))
        p_all = reference_softmax(logits.reshape(-1, classes))
        rows_all = np.sqrt(p_all)[:, :, None] * (p_all[:, None, :] - np.eye(classes)[None])
        abs_all = np.sqrt(p_all)[:, :, None] * (p_all[:, None, :] + np.eye(classes)[None])
        assert_close(
            full.reshape(-1, classes, classes),
            rows_all,
            dtype,
            logit_condition(logits) * cancellation(abs_all, rows_all, 2),
        )

    @sequence_property(data=st.data())
    def test_sample_labels_per_position(
        self, backend: testing.Backend, dtype: np.dtype, data: st.DataObject
    ) -> None:
        _, _, logits, mask, _ = draw_sequence_model(data, backend, dtype)
        batch, length, classes = logits.shape
        seed = data.draw(st.integers(0, 2**32 - 1))
        uniform = np.random.default_rng(seed).uniform(size=(batch, length)).astype(dtype)
        # Draws at padded positions are not validated: NaN or out of range is fine there.
        uniform_padded = np.where(mask, uniform, np.nan if dtype == F64 else 7.0).astype(dtype)
        result = fisher.sample_labels(
            backend.asarray(logits), backend.asarray(uniform_padded), mask=backend.asarray(mask)
        )
        assert_backend_array(result, backend, I64)
        labels = backend.to_numpy(result)
        assert labels.shape == (batch, length)
        np.testing.assert_array_equal(labels[~mask], 0)
        cumulative = np.cumsum(reference_softmax(logits.reshape(-1, classes)), axis=1)
        flat_u = f64(uniform).reshape(-1)
        expected = np.minimum((cumulative <= flat_u[:, None]).sum(axis=1), classes - 1)
        margin = 8 * rtol(dtype, logit_condition(logits) * classes)
        clear = (np.abs(cumulative - flat_u[:, None]).min(axis=1) > margin) & mask.reshape(-1)
        np.testing.assert_array_equal(labels.reshape(-1)[clear], expected[clear])
        unmasked = backend.to_numpy(
            fisher.sample_labels(backend.asarray(logits), backend.asarray(uniform))
        )
        clear_all = np.abs(cumulative - flat_u[:, None]).min(axis=1) > margin
        np.testing.assert_array_equal(unmasked.reshape(-1)[clear_all], expected[clear_all])

    @sequence_property(data=st.data())
    def test_masked_sequence_captures_give_the_fisher_of_the_kept_tokens(
        self, backend: testing.Backend, dtype: np.dtype, data: st.DataObject
    ) -> None:
        """Sequence softmax regression ``z_it = W a_it``: captures ``(a, e)`` reshaped to
        ``B·T`` rows (exact: ``B·T·C``) with ``scale = 1/B`` give
        ``(1/B) Σ_{kept (i,t)} (a aᵀ)⊗M_it``, ``M = (p − e_y)(p − e_y)ᵀ`` (empirical) or
        ``diag p − ppᵀ`` (exact); the reference uses the kept positions only, and padded
        inputs changed arbitrarily change nothing."""
        a, _, logits, mask, labels = draw_sequence_model(data, backend, dtype)
        batch, length, classes = logits.shape
        d_in = a.shape[-1]
        # Arbitrary inputs at padded positions (the errors there are zero).
        a_padded = np.where(mask[..., None], a, 1e3 * np.ones_like(a)).astype(dtype)
        kept_a, kept_p = f64(a[mask]), reference_softmax(logits[mask])
        inputs = backend.asarray(a_padded.reshape(-1, d_in))
        xp_mask = backend.asarray(mask)

        errors = fisher.softmax_errors(
            backend.asarray(logits), backend.asarray(labels), mask=xp_mask
        )
        captures = [(inputs, backend.xp.reshape(errors, (batch * length, classes)))]
        kept_e = kept_p - one_hot(labels[mask], classes)
        expected = sum(np.kron(np.outer(x, x), np.outer(e, e)) for x, e in zip(kept_a, kept_e))
        expected = expected / batch
        bound_e = kept_p + one_hot(labels[mask], classes)
        bound = sum(
            np.kron(np.outer(x, x), np.outer(e, e)) for x, e in zip(np.abs(kept_a), bound_e)
        )
        condition = logit_condition(logits) * cancellation(
            bound / batch, expected, batch * length + classes + d_in
        )
        assert_close(
            woodbury_fisher(backend, captures, classes, d_in, batch), expected, dtype, condition
        )

        rows = fisher.softmax_exact_errors(backend.asarray(logits), mask=xp_mask)
        exact = [
            (
                backend.asarray(np.repeat(a_padded.reshape(-1, d_in), classes, axis=0)),
                backend.xp.reshape(rows, (batch * length * classes, classes)),
            )
        ]
        expected = kron_fisher(kept_a, kept_p) * len(kept_a) / batch
        condition = logit_condition(logits) * cancellation(
            kron_fisher_abs(kept_a, kept_p) * len(kept_a) / batch,
            expected,
            batch * length * classes + classes + d_in,
        )
        assert_close(
            woodbury_fisher(backend, exact, classes, d_in, batch), expected, dtype, condition
        )

    def test_exact_fisher_is_the_hessian_of_the_per_token_loss(self) -> None:
        """``(1/B) Σ_{kept (i,t)}`` of the exact rows' Fisher is the Hessian of the summed
        per-token cross-entropy with ``ignore_index=-100``, divided by ``B``
        (``torch.func.hessian``, float64; softmax regression, where Fisher = Hessian)."""
        torch = pytest.importorskip("torch")
        numpy_backend = testing.available_backends()[0]

        @settings(max_examples=6)
        @given(data=st.data())
        def check(data: st.DataObject) -> None:
            a, w, logits, mask, labels = draw_sequence_model(data, numpy_backend, F64)
            batch, length, classes = logits.shape
            d_in = a.shape[-1]
            inputs, targets = torch.asarray(a), torch.asarray(labels)

            def loss(weight):
                z = (inputs @ weight.T).reshape(-1, classes)
                ce = torch.nn.functional.cross_entropy(
                    z, targets.reshape(-1), ignore_index=-100, reduction="sum"
                )
                return ce / batch

            hessian = torch.func.hessian(loss)(torch.asarray(w))
            dense = hessian.permute(1, 0, 3, 2).reshape(classes * d_in, classes * d_in).numpy()
            rows = fisher.softmax_exact_errors(logits, mask=mask)
            captures = [
                (
                    np.repeat(a.reshape(-1, d_in), classes, axis=0),
                    rows.reshape(batch * length * classes, classes),
                )
            ]
            library = woodbury_fisher(numpy_backend, captures, classes, d_in, batch)
            kept_a, kept_p = a[mask], reference_softmax(logits[mask])
            condition = logit_condition(logits) * cancellation(
                kron_fisher_abs(kept_a, kept_p),
                kron_fisher(kept_a, kept_p),
                batch * length * classes + 8,
            )
            assert_close(library, dense, F64, condition)

        check()

    def test_everything_works_under_jit_with_a_mask(
        self, backend: testing.Backend, dtype: np.dtype
    ) -> None:
        if backend.jit is None:
            pytest.skip("jit is JAX's")
        rng = np.random.default_rng(5)
        logits = backend.asarray((2 * rng.standard_normal((2, 3, 4))).astype(dtype))
        mask = backend.asarray(np.array([[True, True, False], [True, False, False]]))
        labels = backend.asarray(np.array([[1, 3, -100], [0, -100, -100]], dtype=np.int64))
        uniform = backend.asarray(rng.uniform(size=(2, 3)).astype(dtype))

        def everything(z, y, u, m):
            return {
                "softmax": fisher.softmax(z),
                "sample_labels": fisher.sample_labels(z, u, mask=m),
                "softmax_errors": fisher.softmax_errors(z, y, mask=m),
                "softmax_exact_errors": fisher.softmax_exact_errors(z, mask=m),
            }

        eager = everything(logits, labels, uniform, mask)
        jitted = backend.jit(everything)(logits, labels, uniform, mask)
        for name in eager:
            expected_dtype = I64 if name == "sample_labels" else dtype
            assert_backend_array(jitted[name], backend, expected_dtype)
            assert_close(to_np(backend, jitted[name]), to_np(backend, eager[name]), dtype, 10.0)
        np.testing.assert_array_equal(backend.to_numpy(jitted["softmax_errors"])[0, 2], 0.0)

    def test_inputs_are_untouched(self, backend: testing.Backend, dtype: np.dtype) -> None:
        rng = np.random.default_rng(6)
        arrays = {
            "logits": rng.standard_normal((2, 3, 4)).astype(dtype),
            "mask": np.array([[True, False, True], [False, False, True]]),
            "labels": np.array([[1, -100, 2], [-100, -100, 0]], dtype=np.int64),
            "uniform": rng.uniform(size=(2, 3)).astype(dtype),
        }
        inputs = {k: backend.asarray(v) for k, v in arrays.items()}
        fisher.softmax_errors(inputs["logits"], inputs["labels"], mask=inputs["mask"])
        fisher.softmax_exact_errors(inputs["logits"], mask=inputs["mask"])
        fisher.sample_labels(inputs["logits"], inputs["uniform"], mask=inputs["mask"])
        for key, value in arrays.items():
            np.testing.assert_array_equal(backend.to_numpy(inputs[key]), value)

    @pytest.mark.parametrize(
        "case, pattern",
        [
            ("labels-b-for-btc", "labels"),
            ("labels-out-of-range-unmasked", r"labels at unmasked positions"),
            ("ignore-index-without-mask", r"labels must lie"),
            ("mask-float", r"mask.*boolean"),
            ("mask-shape", r"mask"),
            ("mask-shape-exact", r"mask"),
            ("uniform-b-for-btc", "uniform"),
            ("uniform-nan-unmasked", "uniform"),
        ],
    )
    def test_bad_sequence_input_raises_naming_the_argument(
        self, backend: testing.Backend, case: str, pattern: str
    ) -> None:
        c = backend.asarray
        rng = np.random.default_rng(8)
        logits = rng.standard_normal((2, 3, 4))
        mask = np.array([[True, True, False], [True, False, False]])
        labels = np.array([[1, 3, -100], [0, -100, -100]], dtype=np.int64)
        uniform = rng.uniform(size=(2, 3))
        nan_uniform = uniform.copy()
        nan_uniform[0, 0] = np.nan
        calls = {
            "labels-b-for-btc": lambda: fisher.softmax_errors(c(logits), c(labels[:, 0])),
            "labels-out-of-range-unmasked": lambda: fisher.softmax_errors(
                c(logits), c(np.where(mask, 4, -100)), mask=c(mask)
            ),
            "ignore-index-without-mask": lambda: fisher.softmax_errors(c(logits), c(labels)),
            "mask-float": lambda: fisher.softmax_errors(
                c(logits), c(labels), mask=c(mask.astype(np.float64))
            ),
            "mask-shape": lambda: fisher.softmax_errors(c(logits), c(labels), mask=c(mask[:, :2])),
            "mask-shape-exact": lambda: fisher.softmax_exact_errors(c(logits), mask=c(mask[0])),
            "uniform-b-for-btc": lambda: fisher.sample_labels(c(logits), c(uniform[:, 0])),
            "uniform-nan-unmasked": lambda: fisher.sample_labels(
                c(logits), c(nan_uniform), mask=c(mask)
            ),
        }
        with pytest.raises(ValueError, match=pattern):
            calls[case]()
