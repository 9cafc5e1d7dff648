"""Diagonal input factors of embedding layers (``kron.embedding_factor``, ``diagonal_*``).

References are dense and built without the functions under test: the explicit one-hot
inputs ``a_it = onehot(token_it)`` (``(B, T, V)``), ``np.kron`` of the diagonal input factor
with ``G`` and ``np.linalg.solve``, with ``vec`` column-major (``(A⊗G) vec(V) = vec(G V A)``).
The same one-hot captures through the existing ``kron`` functions (``input_factor``,
``eigen_solve``, ``split_damping``, ``inverse``, ``precondition``) must give the same results.

Tolerances: :func:`tests.conftest.assert_close`, ``32·κ·eps(dtype)`` with ``κ`` the condition
number of the dense matrix solved (``np.linalg.cond``); counts are exact sums of 0/1 weights
and are compared at ``κ = 1``. Every test runs on every backend and both dtypes.
"""

from __future__ import annotations

import numpy as np
import pytest

from curvlinalg import kron, testing
from tests.conftest import assert_backend_array, assert_close

VOCAB, WIDTH = 7, 3


def _to_np(backend: testing.Backend, x: object) -> np.ndarray:
    return np.asarray(backend.to_numpy(x), dtype=np.float64)


def _one_hot(tokens: np.ndarray, vocab: int, dtype: np.dtype) -> np.ndarray:
    return (tokens[..., None] == np.arange(vocab)).astype(dtype)


def _vec(m: np.ndarray) -> np.ndarray:
    return m.reshape(-1, order="F")


def _dense_solve(matrix: np.ndarray, grad: np.ndarray) -> np.ndarray:
    return np.linalg.solve(matrix, _vec(grad)).reshape(grad.shape, order="F")


def _tokens(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    # Token 0 never drawn, so the vocabulary always has an unseen row (a_v = 0).
    return rng.integers(1, VOCAB, size=shape)


def _mask(rng: np.random.Generator, shape: tuple[int, ...], kind: str, dtype: np.dtype):
    if kind == "none":
        return None
    keep = rng.random(shape) < 0.7
    keep.reshape(shape[0], -1)[0, 0] = True  # at least one kept position
    if len(shape) == 2:
        keep[-1] = False  # an example with every position masked
    if kind == "bool":
        return keep
    return (keep * rng.uniform(0.5, 2.0, size=shape)).astype(dtype)


@pytest.mark.parametrize("shape", [(5,), (4, 3)], ids=["B", "BT"])
@pytest.mark.parametrize("kind", ["none", "bool", "weights"])
def test_embedding_factor_is_the_diagonal_of_the_one_hot_input_factor(
    backend: testing.Backend, dtype: np.dtype, shape: tuple[int, ...], kind: str
) -> None:
    rng = np.random.default_rng(0)
    tokens = _tokens(rng, shape)
    mask = _mask(rng, shape, kind, dtype)
    one_hot = _one_hot(tokens, VOCAB, dtype)
    weights = np.ones(shape) if mask is None else mask.astype(np.float64)
    # Textbook: Σ_{i,t} w_it onehotᵀ onehot / B_eff, B_eff = Σ_i max_t w_it.
    flat_w = weights.reshape(shape[0], -1)
    b_eff = flat_w.max(axis=1).sum()
    dense = (
        np.einsum(
            "n,nv,nw->vw",
            weights.reshape(-1),
            one_hot.reshape(-1, VOCAB),
            one_hot.reshape(-1, VOCAB),
        )
        / b_eff
    )
    assert np.count_nonzero(dense - np.diag(np.diag(dense))) == 0
    as_mask = None if mask is None else backend.asarray(mask)
    result = kron.embedding_factor(
        backend.asarray(tokens), VOCAB, mask=as_mask, dtype=backend.asarray(one_hot).dtype
    )
    assert_backend_array(result, backend, dtype)
    assert_close(_to_np(backend, result), np.diag(dense), dtype)
    # The same captures through the existing input_factor.
    through_core = kron.input_factor(
        backend.asarray(one_hot if len(shape) == 2 else one_hot), mask=as_mask
    )
    assert_close(_to_np(backend, through_core), np.diag(_to_np(backend, result)), dtype)
    if backend.jit is not None:
        traced = backend.jit(
            lambda t, m: kron.embedding_factor(t, VOCAB, mask=m, dtype=result.dtype)
        )(backend.asarray(tokens), as_mask)
        assert_close(_to_np(backend, traced), np.diag(dense), dtype)


def test_embedding_factor_all_masked_is_zero_and_masked_ids_may_be_out_of_range(
    backend: testing.Backend,
) -> None:
    tokens = np.array([[3, -1, 9], [-1, -1, -1]])  # -1 and 9 only at masked positions
    keep = tokens == 3
    result = kron.embedding_factor(backend.asarray(tokens), 5, mask=backend.asarray(keep))
    np.testing.assert_array_equal(_to_np(backend, result), [0, 0, 0, 1, 0])
    zero = kron.embedding_factor(
        backend.asarray(tokens), 5, mask=backend.asarray(np.zeros_like(keep))
    )
    np.testing.assert_array_equal(_to_np(backend, zero), np.zeros(5))
    # Default dtype: the namespace's default floating dtype for a boolean or absent mask.
    info = backend.xp.__array_namespace_info__().default_dtypes()
    assert zero.dtype == info["real floating"]


def _problem(dtype: np.dtype, tokens_shape: tuple[int, ...] = (4, 3)):
    """Tokens, one-hot inputs, output errors e, the diagonal a, G and the mean gradient."""
    rng = np.random.default_rng(1)
    tokens = _tokens(rng, tokens_shape)
    one_hot = _one_hot(tokens, VOCAB, np.float64)
    e = rng.standard_normal((*tokens_shape, WIDTH))
    batch = tokens_shape[0]
    a_diagonal = np.diag(np.einsum("btv,btw->vw", one_hot, one_hot) / batch)
    g = np.einsum("btd,bte->de", e, e) / e[..., 0].size
    grad = np.einsum("btd,btv->dv", e, one_hot) / batch  # (d, V): the core's layout
    cast = lambda x: x.astype(dtype)  # noqa: E731
    return tokens, cast(one_hot), cast(e), cast(a_diagonal), cast(g), cast(grad)


@pytest.mark.parametrize("damping", [1e-2, 0.5])
def test_diagonal_input_solve_is_the_exactly_damped_kronecker_solve(
    backend: testing.Backend, dtype: np.dtype, damping: float
) -> None:
    tokens, one_hot, e, a_diagonal, g, grad = _problem(dtype)
    dense = np.kron(np.diag(a_diagonal.astype(np.float64)), g.astype(np.float64))
    dense += damping * np.eye(dense.shape[0])
    expected = _dense_solve(dense, grad.astype(np.float64))
    condition = float(np.linalg.cond(dense))
    g_eigh = kron.eigh(backend.asarray(g))
    result = kron.diagonal_input_solve(
        backend.asarray(grad), backend.asarray(a_diagonal), g_eigh, damping
    )
    assert_backend_array(result, backend, dtype)
    assert_close(_to_np(backend, result), expected, dtype, condition)
    # One-hot captures through the existing functions: input_factor and eigen_solve.
    a_full = kron.input_factor(backend.asarray(one_hot))
    through_core = kron.eigen_solve(backend.asarray(grad), kron.eigh(a_full), g_eigh, damping)
    assert_close(_to_np(backend, result), _to_np(backend, through_core), dtype, condition)
    if backend.jit is not None:
        traced = backend.jit(kron.diagonal_input_solve)(
            backend.asarray(grad), backend.asarray(a_diagonal), g_eigh, damping
        )
        assert_close(_to_np(backend, traced), expected, dtype, condition)


@pytest.mark.parametrize("with_g", [True, False], ids=["kfac", "foof"])
def test_diagonal_factored_step_is_the_pi_damped_kronecker_inverse(
    backend: testing.Backend, dtype: np.dtype, with_g: bool
) -> None:
    tokens, one_hot, e, a_diagonal, g, grad = _problem(dtype)
    damping = 0.1
    a64, g64 = np.diag(a_diagonal.astype(np.float64)), g.astype(np.float64)
    # π rule, textbook: π² = (tr A / V) / (tr G / d).
    pi = np.sqrt((np.trace(a64) / VOCAB) / (np.trace(g64) / WIDTH))
    damping_a, damping_g = pi * np.sqrt(damping), np.sqrt(damping) / pi
    a_b, g_b = backend.asarray(a_diagonal), backend.asarray(g)
    split = kron.diagonal_split_damping(a_b, g_b, damping)
    assert_close(np.array([_to_np(backend, v) for v in split]), [damping_a, damping_g], dtype)
    a_full = kron.input_factor(backend.asarray(one_hot))
    core_split = kron.split_damping(a_full, g_b, damping)
    assert_close(
        np.array([_to_np(backend, v) for v in split]),
        np.array([_to_np(backend, v) for v in core_split]),
        dtype,
    )
    if with_g:
        dense = np.kron(a64 + damping_a * np.eye(VOCAB), g64 + damping_g * np.eye(WIDTH))
        a_inv = kron.diagonal_inverse(a_b, split[0])
        g_inv = kron.inverse(g_b, split[1])
        core_a_inv, core_g_inv = (
            kron.inverse(a_full, core_split[0]),
            kron.inverse(g_b, core_split[1]),
        )
    else:
        dense = np.kron(a64 + damping * np.eye(VOCAB), np.eye(WIDTH))
        a_inv, g_inv = kron.diagonal_inverse(a_b, damping), None
        core_a_inv, core_g_inv = kron.inverse(a_full, damping), None
    expected = _dense_solve(dense, grad.astype(np.float64))
    condition = float(np.linalg.cond(dense))
    result = kron.diagonal_precondition(backend.asarray(grad), a_inv, g_inv)
    assert_backend_array(result, backend, dtype)
    assert_close(_to_np(backend, result), expected, dtype, condition)
    through_core = kron.precondition(backend.asarray(grad), core_a_inv, core_g_inv)
    assert_close(_to_np(backend, result), _to_np(backend, through_core), dtype, condition)
    if backend.jit is not None:

        def step(grad, a_diagonal, g):
            if not with_g:
                return kron.diagonal_precondition(grad, kron.diagonal_inverse(a_diagonal, damping))
            d_a, d_g = kron.diagonal_split_damping(a_diagonal, g, damping)
            return kron.diagonal_precondition(
                grad, kron.diagonal_inverse(a_diagonal, d_a), kron.inverse(g, d_g)
            )

        traced = backend.jit(step)(backend.asarray(grad), a_b, g_b)
        assert_close(_to_np(backend, traced), expected, dtype, condition)


def test_diagonal_precondition_takes_leading_batch_axes(backend: testing.Backend) -> None:
    _, _, _, a_diagonal, g, grad = _problem(np.dtype(np.float64))
    stacked = np.stack([grad, 2 * grad])
    a_inv = kron.diagonal_inverse(backend.asarray(a_diagonal), 0.3)
    g_inv = kron.inverse(backend.asarray(g), 0.2)
    both = _to_np(backend, kron.diagonal_precondition(backend.asarray(stacked), a_inv, g_inv))
    one = _to_np(backend, kron.diagonal_precondition(backend.asarray(grad), a_inv, g_inv))
    assert_close(both, np.stack([one, 2 * one]), np.dtype(np.float64))


def test_bad_input_raises_naming_the_argument(backend: testing.Backend) -> None:
    a = backend.asarray
    tokens = np.array([[1, 2], [3, 4]])
    for call, pattern in (
        (lambda: kron.embedding_factor(a(tokens.astype(np.float64)), 5), r"tokens.*integer"),
        (lambda: kron.embedding_factor(a(tokens), 4), r"tokens.*\[0, 4\).*4"),
        (lambda: kron.embedding_factor(a(-tokens), 5), r"tokens.*\[0, 5\).*-4"),
        (lambda: kron.embedding_factor(a(tokens[None]), 5), r"tokens.*\(B, T\)"),
        (lambda: kron.embedding_factor(a(tokens[:0]), 5), r"tokens has no examples"),
        (lambda: kron.embedding_factor(a(tokens), 0), r"vocab_size.*positive"),
        (lambda: kron.embedding_factor(a(tokens), 5.0), r"vocab_size.*positive"),
        (lambda: kron.embedding_factor(a(tokens), 5, mask=a(np.ones(2, bool))), r"mask.*shape"),
        (lambda: kron.embedding_factor(a(tokens), 5, mask=a(-np.ones((2, 2)))), r"mask.*negative"),
        (lambda: kron.embedding_factor(a(tokens), 5, dtype=a(tokens).dtype), r"dtype.*floating"),
    ):
        with pytest.raises(ValueError, match=pattern):
            call()
    _, _, _, a_diagonal, g, grad = _problem(np.dtype(np.float64))
    g_eigh = kron.eigh(a(g))
    for call, pattern in (
        (lambda: kron.diagonal_inverse(a(a_diagonal), 0.0), r"damping must be > 0"),
        (lambda: kron.diagonal_inverse(a(a_diagonal), -1.0), r"damping must be > 0"),
        (lambda: kron.diagonal_inverse(a(-a_diagonal - 1), 1.0), r"a_diagonal.*negative"),
        (lambda: kron.diagonal_inverse(a(np.diag(a_diagonal)), 1.0), r"a_diagonal.*\(d_in,\)"),
        (lambda: kron.diagonal_input_solve(a(grad), a(a_diagonal), g_eigh, 0.0), r"damping"),
        (lambda: kron.diagonal_input_solve(a(grad.T), a(a_diagonal), g_eigh, 1.0), r"a_diagonal"),
        (
            lambda: kron.diagonal_input_solve(a(grad), a(a_diagonal[:-1]), g_eigh, 1.0),
            r"a_diagonal.*d_in",
        ),
        (lambda: kron.diagonal_input_solve(a(grad), a(a_diagonal), (g_eigh[0],), 1.0), r"g_eigh"),
        (lambda: kron.diagonal_split_damping(a(a_diagonal), a(g), 0.0), r"damping must be > 0"),
        (lambda: kron.diagonal_split_damping(a(a_diagonal), a(g[:2]), 1.0), r"\bg\b.*square"),
        (lambda: kron.diagonal_precondition(a(grad), a(a_diagonal[:-1])), r"a_inv_diagonal.*d_in"),
        (lambda: kron.diagonal_precondition(a(grad), a(a_diagonal), a(g[:2, :2])), r"g_inv"),
        (lambda: kron.diagonal_precondition(a(grad), a(a_diagonal.astype(np.float32))), r"dtype"),
    ):
        with pytest.raises(ValueError, match=pattern):
            call()
    nan = grad.copy()
    nan[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"grad.*NaN"):
        kron.diagonal_input_solve(a(nan), a(a_diagonal), g_eigh, 1.0)
    with pytest.raises(ValueError, match=r"grad.*NaN"):
        kron.diagonal_precondition(a(nan), a(a_diagonal))


def test_diagonal_input_solve_refuses_a_singular_product(backend: testing.Backend) -> None:
    # G with a negative eigenvalue: s_G·a + damping < 0 for a large count.
    a_diagonal = np.array([0.0, 10.0])
    grad = np.ones((2, 2))
    g_eigh = kron.Eigh(backend.asarray(np.array([-1.0, 1.0])), backend.asarray(np.eye(2)))
    with pytest.raises(kron.NotPositiveDefiniteError, match=r"diag\(a\)⊗G"):
        kron.diagonal_input_solve(backend.asarray(grad), backend.asarray(a_diagonal), g_eigh, 1.0)
