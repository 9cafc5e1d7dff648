"""Bad input to the core raises a ``ValueError`` naming the user's argument, never a silent NaN.

Cross-cutting checks of issue 13 on every backend (``backend`` fixture): NaN and infinity in
every array argument, mixed float32/float64 (refused, never promoted), non-floating dtypes,
the half-precision policy (functions that factorise refuse float16/bfloat16; products keep
them), the user's names in ``wake.kron_q_step``'s errors, malformed ``Eigh`` arguments and
numerically singular matrices, which count as not positive definite on every backend.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import curvlinalg
from curvlinalg import kron, laplace, testing, wake, woodbury
from tests.conftest import assert_close

E, NPD = ValueError, curvlinalg.NotPositiveDefiniteError

RNG = np.random.default_rng(13)
GRAD = RNG.standard_normal((2, 3))  # (d_out, d_in)
A_CAP, E_CAP = RNG.standard_normal((4, 3)), RNG.standard_normal((4, 2))  # captures, B = 4
SPD3 = np.array([[2.0, 0.3, 0.1], [0.3, 1.5, 0.2], [0.1, 0.2, 1.0]])
SPD2 = np.array([[1.2, 0.4], [0.4, 0.9]])


def _with(base: np.ndarray, value: float) -> np.ndarray:
    bad = np.array(base, dtype=np.float64)
    bad.flat[0] = value
    return bad


NAN3, INF2, NAN_GRAD = _with(SPD3, np.nan), _with(SPD2, np.inf), _with(GRAD, np.nan)


def _eigh(c: Callable, m: np.ndarray) -> kron.Eigh:
    return kron.eigh(c(m))


def _eigh_with(c: Callable, m: np.ndarray, *, values: Any = None, vectors: Any = None) -> kron.Eigh:
    decomposition = kron.eigh(c(m))
    return kron.Eigh(
        decomposition.values if values is None else values,
        decomposition.vectors if vectors is None else vectors,
    )


def _q_step(c: Callable, solver: str, **overrides: np.ndarray) -> wake.QStep:
    arguments = {"ghat": GRAD, "fbar_a": SPD3, "fbar_g": SPD2, "b_a": SPD3, "b_g": SPD2}
    arguments.update(overrides)
    return wake.kron_q_step(**{k: c(v) for k, v in arguments.items()}, lam=2.0, solver=solver)


def _non_finite_cases() -> list[tuple[str, Callable, str]]:
    """(id, call(asarray), pattern): each passed silently before."""
    return [
        ("ema-new", lambda c: kron.ema(c(SPD3), c(NAN3), 0.5), r"\bnew\b.*NaN"),
        ("ema-average", lambda c: kron.ema(c(NAN3), c(SPD3), 0.5), r"\baverage\b.*NaN"),
        ("ema-first", lambda c: kron.ema(None, c(NAN3), 0.5), r"\bnew\b.*NaN"),
        ("debiased-first", lambda c: kron.debiased_ema(None, c(NAN3), 0.5), r"\bnew\b.*NaN"),
        (
            "debiased-total",
            lambda c: kron.debiased_ema(kron.DebiasedAverage(c(NAN3), 0.5), c(SPD3), 0.5),
            r"state\.total.*NaN",
        ),
        (
            "debiased-weight",
            lambda c: kron.debiased_ema(kron.DebiasedAverage(c(SPD3), np.nan), c(SPD3), 0.5),
            r"state\.weight.*finite",
        ),
        ("average-first", lambda c: wake.average(None, [c(SPD3), c(NAN3)], 0.5), r"new\[1\].*NaN"),
        ("average-new", lambda c: wake.average(c(SPD2), c(INF2), 0.5), r"\bnew\b.*NaN"),
        (
            "average-previous",
            lambda c: wake.average([c(SPD3), c(INF2)], [c(SPD3), c(SPD2)], 0.5),
            r"previous\[1\].*NaN",
        ),
        (
            "so_gradient-g_prev",
            lambda c: wake.so_gradient(c(GRAD), c(NAN_GRAD), 0.5),
            "g_prev.*NaN",
        ),
        ("so_gradient-first", lambda c: wake.so_gradient([c(NAN_GRAD)], None, 0.5), r"g\[0\].*NaN"),
        (
            "q_gradient-m_ghat_prev",
            lambda c: wake.q_gradient(c(GRAD), c(GRAD), c(GRAD), c(NAN_GRAD), 0.5),
            "m_ghat_prev.*NaN",
        ),
        (
            "q_gradient-ghat_prev",
            lambda c: wake.q_gradient(c(GRAD), c(NAN_GRAD), c(GRAD), c(GRAD), 0.5),
            "ghat_prev.*NaN",
        ),
        (
            "q_gradient-first",
            lambda c: wake.q_gradient(c(NAN_GRAD), None, None, None, 0.5),
            "g.*NaN",
        ),
        ("precondition-a_inv", lambda c: kron.precondition(c(GRAD), c(NAN3)), "a_inv.*NaN"),
        (
            "precondition-g_inv",
            lambda c: kron.precondition(c(GRAD), c(SPD3), c(INF2)),
            "g_inv.*NaN",
        ),
        (
            "factored-a_inv",
            lambda c: kron.precondition_factored(c(A_CAP), c(E_CAP), c(NAN3)),
            "a_inv.*NaN",
        ),
        (
            "factored-g_inv",
            lambda c: kron.precondition_factored(c(A_CAP), c(E_CAP), c(SPD3), c(INF2)),
            "g_inv.*NaN",
        ),
        (
            "captures-a_inv",
            lambda c: kron.precondition_captures(c(A_CAP), c(E_CAP), c(NAN3)),
            "a_inv.*NaN",
        ),
        (
            "captures-g_inv",
            lambda c: kron.precondition_captures(c(A_CAP), c(E_CAP), c(SPD3), c(INF2)),
            "g_inv.*NaN",
        ),
        (
            "eigen_solve-a-values",
            lambda c: kron.eigen_solve(
                c(GRAD),
                _eigh_with(c, SPD3, values=c(np.array([1.0, np.nan, 2.0]))),
                _eigh(c, SPD2),
                0.1,
            ),
            r"a_eigh\.values.*NaN",
        ),
        (
            "eigen_solve-g-vectors",
            lambda c: kron.eigen_solve(
                c(GRAD), _eigh(c, SPD3), _eigh_with(c, SPD2, vectors=c(INF2)), 0.1
            ),
            r"g_eigh\.vectors.*NaN",
        ),
        (
            "sum_eigen_solve-values",
            lambda c: kron.sum_eigen_solve(
                c(GRAD),
                _eigh_with(c, SPD3, values=c(np.array([np.inf, 1.0, 2.0]))),
                _eigh(c, SPD2),
            ),
            r"a_eigh\.values.*NaN",
        ),
        (
            "lml-log_likelihood",
            lambda c: laplace.log_marginal_likelihood(c(np.array(np.nan)), [c(GRAD)], 1.0, 1.0),
            "log_likelihood.*NaN",
        ),
        (
            "lml-python-log_det",
            lambda c: laplace.log_marginal_likelihood(-1.0, [c(GRAD)], float("inf"), 1.0),
            "log_det_precision.*finite",
        ),
        (
            "lml-params",
            lambda c: laplace.log_marginal_likelihood(-1.0, [c(GRAD), c(NAN3)], 1.0, 1.0),
            r"params\[1\].*NaN",
        ),
        ("kron_q_step-b_a", lambda c: _q_step(c, "exact", b_a=NAN3), r"\bb_a\b.*NaN"),
        (
            "kron_q_step-summed-ghat",
            lambda c: _q_step(c, "summed_factors", ghat=NAN_GRAD),
            "ghat.*NaN",
        ),
    ]


NON_FINITE = _non_finite_cases()


@pytest.mark.parametrize(
    "call, pattern", [case[1:] for case in NON_FINITE], ids=[case[0] for case in NON_FINITE]
)
def test_non_finite_input_raises_naming_the_argument(
    backend: testing.Backend, call: Callable, pattern: str
) -> None:
    with pytest.raises(ValueError, match=pattern) as caught:
        call(backend.asarray)
    # NaN eigenvalues used to surface as a misleading NotPositiveDefiniteError.
    assert type(caught.value) is ValueError


def test_check_finite_false_skips_the_new_scans(backend: testing.Backend) -> None:
    c = backend.asarray
    assert np.isnan(backend.to_numpy(kron.ema(c(SPD3), c(NAN3), 0.5, check_finite=False))).any()
    result = kron.precondition(c(GRAD), c(NAN3), check_finite=False)
    assert np.isnan(backend.to_numpy(result)).any()
    result = wake.so_gradient(c(GRAD), c(NAN_GRAD), 0.5, check_finite=False)
    assert np.isnan(backend.to_numpy(result)).any()
    value = laplace.log_marginal_likelihood(-1.0, [c(NAN3)], 1.0, 1.0, check_finite=False)
    assert np.isnan(backend.to_numpy(value))


def _mixed_dtype_cases() -> list[tuple[str, Callable]]:
    """(id, call(asarray64, asarray32)): float32 mixed into float64 work."""
    return [
        ("so_gradient", lambda c, h: wake.so_gradient(c(GRAD), h(GRAD), 0.5)),
        ("so_gradient-layers", lambda c, h: wake.so_gradient([c(GRAD)], [h(GRAD)], 0.5)),
        (
            "q_gradient-g_prev",
            lambda c, h: wake.q_gradient(c(GRAD), c(GRAD), h(GRAD), c(GRAD), 0.5),
        ),
        (
            "q_gradient-m_ghat",
            lambda c, h: wake.q_gradient(c(GRAD), c(GRAD), c(GRAD), h(GRAD), 0.5),
        ),
        ("average", lambda c, h: wake.average([c(SPD3)], [h(SPD3)], 0.5)),
        (
            "lml-log_det",
            lambda c, h: laplace.log_marginal_likelihood(-1.0, [c(GRAD)], h(np.array(2.0)), 1.0),
        ),
        (
            "lml-log_likelihood",
            lambda c, h: laplace.log_marginal_likelihood(h(np.array(-1.0)), [c(GRAD)], 2.0, 1.0),
        ),
        (
            "lml-params",
            lambda c, h: laplace.log_marginal_likelihood(-1.0, [c(GRAD), h(SPD3)], 2.0, 1.0),
        ),
        (
            "eigen_solve-values",
            lambda c, h: kron.eigen_solve(
                c(GRAD), _eigh_with(c, SPD3, values=h(np.ones(3))), _eigh(c, SPD2), 0.1
            ),
        ),
        (
            "eigen_solve-g-values",
            lambda c, h: kron.eigen_solve(
                c(GRAD), _eigh(c, SPD3), _eigh_with(c, SPD2, values=h(np.ones(2))), 0.1
            ),
        ),
        (
            "kron_q_step-b_g",
            lambda c, h: wake.kron_q_step(
                c(GRAD), c(SPD3), c(SPD2), c(SPD3), h(SPD2), 2.0, solver="summed_factors"
            ),
        ),
    ]


MIXED = _mixed_dtype_cases()


@pytest.mark.parametrize("call", [case[1] for case in MIXED], ids=[case[0] for case in MIXED])
def test_mixed_float32_float64_is_refused(backend: testing.Backend, call: Callable) -> None:
    def as32(x: np.ndarray) -> Any:
        return backend.asarray(np.asarray(x, dtype=np.float32))

    with pytest.raises(ValueError, match="dtype mismatch"):
        call(backend.asarray, as32)


@pytest.mark.parametrize("kind", ["int", "bool", "complex", "none", "vector"])
def test_log_marginal_likelihood_refuses_non_real_terms(
    backend: testing.Backend, kind: str
) -> None:
    c = backend.asarray
    term = {
        "int": lambda: c(np.array(3)),
        "bool": lambda: c(np.array(True)),
        "complex": lambda: c(np.array(1.0 + 0j)),
        "none": lambda: None,
        "vector": lambda: c(np.ones(3)),
    }[kind]()
    with pytest.raises(ValueError, match="log_likelihood"):
        laplace.log_marginal_likelihood(term, [c(GRAD)], 1.0, 1.0)
    for params in ([c(np.ones((2, 2), dtype=np.int64))], [c(np.ones((2, 2), dtype=bool))]):
        with pytest.raises(ValueError, match=r"params\[0\].*floating"):
            laplace.log_marginal_likelihood(-1.0, params, 1.0, 1.0)
    with pytest.raises(ValueError, match="log_det_precision"):
        laplace.log_marginal_likelihood(-1.0, [c(GRAD)], True, 1.0)


# --------------------------------------------------------------------------------------
# Half precision: one policy. Whatever factorises (Cholesky, eigh, triangular solves) needs
# float32 or float64 and refuses half precision naming the argument; products keep the dtype.
# --------------------------------------------------------------------------------------


def _half_factorising_calls() -> list[tuple[str, Callable, str]]:
    captures = lambda c: [(c(A_CAP), c(E_CAP))]  # noqa: E731
    return [
        ("inverse", lambda c: kron.inverse(c(SPD3), 0.1), r"\bm\b"),
        ("eigh", lambda c: kron.eigh(c(SPD3)), r"\bm\b"),
        ("generalized_eigh", lambda c: kron.generalized_eigh(c(SPD3), c(SPD3)), r"\bm\b"),
        ("sum_solve", lambda c: kron.sum_solve(c(GRAD), c(SPD3), c(SPD2), c(SPD3), c(SPD2)), "a2"),
        ("kron_q_step", lambda c: _q_step(c, "exact"), "fbar_a"),
        ("kron_q_step-summed", lambda c: _q_step(c, "summed_factors"), "fbar_a"),
        ("factorize", lambda c: woodbury.factorize(captures(c), 0.1), r"captures\[0\]"),
        ("factorize_layers", lambda c: woodbury.factorize_layers(captures(c), 0.1), r"captures"),
        ("laplace.logdet", lambda c: laplace.logdet(captures(c), 1.0, 10), r"captures\[0\]"),
        (
            "laplace.sample",
            lambda c: laplace.sample(
                captures(c), 1.0, 10, [c(np.ones((1, 2, 3)))], c(np.ones((1, 4)))
            ),
            r"captures\[0\]",
        ),
        ("kron_logdet", lambda c: laplace.kron_logdet(c(SPD3), c(SPD2), 1.0, 10), r"\ba\b"),
        (
            "kron_sample",
            lambda c: laplace.kron_sample(c(SPD3), c(SPD2), 1.0, 10, c(np.ones((1, 2, 3)))),
            r"\ba\b",
        ),
    ]


HALF_CALLS = _half_factorising_calls()


def _half_dtypes(backend: testing.Backend) -> list[Callable[[np.ndarray], Any]]:
    """Converters to the backend's half-precision dtypes (none on array-api-strict)."""
    if backend.name == "array_api_strict":
        pytest.skip("array-api-strict has no half-precision dtype")
    converters = [lambda x: backend.asarray(np.asarray(x, dtype=np.float16))]
    if backend.name == "torch":
        import torch

        converters.append(lambda x: torch.asarray(np.asarray(x)).to(torch.bfloat16))
    return converters


@pytest.mark.parametrize(
    "call, pattern", [case[1:] for case in HALF_CALLS], ids=[case[0] for case in HALF_CALLS]
)
def test_factorisations_refuse_half_precision(
    backend: testing.Backend, call: Callable, pattern: str
) -> None:
    for convert in _half_dtypes(backend):
        with pytest.raises(ValueError, match=rf"{pattern}.*float32 or float64") as caught:
            call(convert)
        assert "cast" in str(caught.value)


def test_woodbury_solves_refuse_a_half_precision_factorisation(backend: testing.Backend) -> None:
    for convert in _half_dtypes(backend):
        built = woodbury.Woodbury(
            ((convert(A_CAP), convert(E_CAP)),), 0.1, 1.0, convert(np.eye(4)), (None,)
        )
        for function, arguments in (
            (woodbury.solve, (built, [convert(GRAD)])),
            (woodbury.solve_span, (built, convert(np.full(4, 0.25)))),
            (woodbury.logdet, (built,)),
            (woodbury.solve_layers, ([built], [convert(GRAD)])),
        ):
            with pytest.raises(ValueError, match=r"woodbury\.captures.*float32 or float64"):
                function(*arguments)


def test_products_keep_half_precision(backend: testing.Backend) -> None:
    for convert in _half_dtypes(backend):
        half = convert(GRAD).dtype
        for result in (
            kron.factor(convert(A_CAP)),
            kron.precondition(convert(GRAD), convert(SPD3)),
            kron.ema(convert(SPD3), convert(SPD3), 0.5),
            woodbury.gram([(convert(A_CAP), convert(E_CAP))]),
        ):
            assert result.dtype == half


# --------------------------------------------------------------------------------------
# wake.kron_q_step: the user's names, shapes in both solvers, symmetric parts
# --------------------------------------------------------------------------------------

INTERNAL_NAMES = ("a1", "g1", "a2", "g2", "g_inv", "a_inv", r"\bm\b")


@pytest.mark.parametrize("solver", ["exact", "summed_factors"])
@pytest.mark.parametrize(
    "overrides, error, pattern",
    [
        ({"fbar_a": SPD2}, E, r"fbar_a.*2.*ghat's d_in.*3"),
        ({"b_a": SPD2}, E, r"b_a.*2.*ghat's d_in.*3"),
        ({"fbar_g": SPD3}, E, r"fbar_g.*3.*ghat's d_out.*2"),
        ({"b_g": SPD3}, E, r"b_g.*3.*ghat's d_out.*2"),
        ({"fbar_a": np.ones(3)}, E, r"fbar_a.*square"),
        ({"b_g": np.ones(2)}, E, r"b_g.*square"),
        ({"fbar_g": np.array(1.0)}, E, r"fbar_g.*square"),
        ({"b_a": np.array(1.0)}, E, r"b_a.*square"),
        ({"ghat": np.ones(3)}, E, r"ghat.*2 dimensions"),
        ({"fbar_a": -SPD3}, NPD, r"fbar_a.*positive definite"),
        ({"fbar_g": -SPD2}, NPD, r"fbar_g.*positive definite"),
        ({"fbar_a": np.eye(3, dtype=np.int64)}, E, r"fbar_a.*floating"),
    ],
    ids=[
        "fbar_a-size",
        "b_a-size",
        "fbar_g-size",
        "b_g-size",
        "fbar_a-1d",
        "b_g-1d",
        "fbar_g-0d",
        "b_a-0d",
        "ghat-1d",
        "fbar_a-indefinite",
        "fbar_g-indefinite",
        "fbar_a-int",
    ],
)
def test_kron_q_step_errors_name_the_users_arguments(
    backend: testing.Backend, solver: str, overrides: dict, error: type, pattern: str
) -> None:
    with pytest.raises(error, match=pattern) as caught:
        _q_step(backend.asarray, solver, **overrides)
    message = str(caught.value)
    for internal in INTERNAL_NAMES:
        assert not re.search(internal, message.split(";")[0]), message


@pytest.mark.parametrize("solver", ["exact", "summed_factors"])
def test_kron_q_step_reads_each_factor_as_its_symmetric_part(
    backend: testing.Backend, solver: str
) -> None:
    skew3 = np.array([[0.0, 0.5, -0.2], [-0.5, 0.0, 0.3], [0.2, -0.3, 0.0]])
    skew2 = np.array([[0.0, 0.4], [-0.4, 0.0]])
    c = backend.asarray
    symmetric = _q_step(c, solver)
    skewed = _q_step(c, solver, fbar_a=SPD3 + skew3, fbar_g=SPD2 + skew2, b_a=SPD3 - skew3)
    for ours, reference in zip(skewed, symmetric):
        assert_close(backend.to_numpy(ours), backend.to_numpy(reference), np.dtype(np.float64), 100)
    # And the step is the dense solve with the symmetric parts: s = −(1/λ)(F̄ + B/λ)⁻¹ ĝ.
    lam = 2.0
    vec = lambda m: m.reshape(-1, order="F")  # noqa: E731
    if solver == "exact":
        matrix = np.kron(SPD3, SPD2) + np.kron(SPD3, SPD2) / lam
    else:
        matrix = np.kron(SPD3 + SPD3 / lam, SPD2 + SPD2 / lam)
    direction = np.linalg.solve(matrix, vec(GRAD)).reshape(GRAD.shape, order="F")
    assert_close(backend.to_numpy(skewed.step), -direction / lam, np.dtype(np.float64), 100)
    assert_close(
        backend.to_numpy(skewed.m_ghat), SPD2 @ direction @ SPD3, np.dtype(np.float64), 100
    )


# --------------------------------------------------------------------------------------
# Malformed or mixed Eigh arguments, captures, other
# --------------------------------------------------------------------------------------


def _foreign(backend: testing.Backend) -> Callable[[np.ndarray], Any]:
    """Arrays of another library than ``backend``'s."""
    if backend.name != "numpy":
        return np.asarray
    import array_api_strict

    return array_api_strict.asarray


@pytest.mark.parametrize("field", ["a.values", "a.vectors", "g.values", "g.vectors"])
def test_eigen_solve_resolves_the_namespace_from_every_field(
    backend: testing.Backend, field: str
) -> None:
    c, other = backend.asarray, _foreign(backend)
    which, part = field.split(".")
    pieces = {
        "a": {"values": c(np.linalg.eigh(SPD3)[0]), "vectors": c(np.linalg.eigh(SPD3)[1])},
        "g": {"values": c(np.linalg.eigh(SPD2)[0]), "vectors": c(np.linalg.eigh(SPD2)[1])},
    }
    raw = np.linalg.eigh(SPD3 if which == "a" else SPD2)[0 if part == "values" else 1]
    for odd, pattern in ((other(raw), "different libraries"), (raw.tolist(), "must be an array")):
        pieces[which][part] = odd
        a_eigh = kron.Eigh(pieces["a"]["values"], pieces["a"]["vectors"])
        g_eigh = kron.Eigh(pieces["g"]["values"], pieces["g"]["vectors"])
        with pytest.raises(ValueError, match=pattern):
            kron.eigen_solve(c(GRAD), a_eigh, g_eigh, 0.1)
        with pytest.raises(ValueError, match=pattern):
            kron.sum_eigen_solve(c(GRAD), a_eigh, g_eigh)
    with pytest.raises(ValueError, match=r"a_eigh\.values must be an array"):
        kron.eigen_solve(c(GRAD), kron.Eigh(1.0, c(np.eye(3))), _eigh(c, SPD2), 0.1)


def test_cross_gram_blames_other_for_a_malformed_other(backend: testing.Backend) -> None:
    c = backend.asarray
    captures = [(c(A_CAP), c(E_CAP))]
    for other, pattern in (
        ([(c(A_CAP), c(np.ones((3, 2))))], r"other\[0\].*leading shape"),
        ([(c(A_CAP[0]), c(E_CAP[0]))], r"other\[0\].*\(B, d\)"),
        ([(c(A_CAP), c(E_CAP)), (c(A_CAP[:3]), c(E_CAP[:3]))], r"other\[1\].*batch"),
        ([c(A_CAP)], r"other\[0\].*pair"),
    ):
        with pytest.raises(ValueError, match=pattern) as caught:
            woodbury.cross_gram(captures, other)
        assert "captures[" not in str(caught.value)


@pytest.mark.parametrize("function", ["sample", "logdet"])
def test_laplace_refuses_zero_dimensional_captures(backend: testing.Backend, function: str) -> None:
    c = backend.asarray
    for captures in ([(c(np.array(1.0)), c(np.array(1.0)))], [(c(np.ones(3)), c(np.ones(2)))]):
        with pytest.raises(ValueError, match=r"captures\[0\].*\(B, d\)"):
            if function == "sample":
                laplace.sample(captures, 1.0, 10, [c(np.ones((1, 1, 1)))], c(np.ones((1, 1))))
            else:
                laplace.logdet(captures, 1.0, 10)


def test_empty_matrix_inverse_is_empty(backend: testing.Backend) -> None:
    result = kron.inverse(backend.asarray(np.ones((0, 0))))
    assert tuple(result.shape) == (0, 0)


# --------------------------------------------------------------------------------------
# Numerically singular matrices: not positive definite on every backend
# --------------------------------------------------------------------------------------

# Rank-deficient vᵀv/(7k): their Cholesky pivots and eigenvalues are rounding noise of either
# sign, so which backend "succeeds" (with a ~1e16 result) depended on its LAPACK's rounding:
# NumPy raised for the last one while PyTorch returned an inverse, and the reverse for others.
SINGULAR = [
    np.array(v, dtype=np.float64)
    for v in ([[-7, -4]], [[7, 3]], [[-6, -5]], [[1, -2]], [[5, -9, 8], [-9, 7, 6]])
]


def _singular(v: np.ndarray) -> np.ndarray:
    m = v.T @ v / (7.0 * v.shape[0])
    return (m + m.T) / 2


@pytest.mark.parametrize("index", range(len(SINGULAR)))
def test_singular_matrices_are_not_positive_definite_on_every_backend(
    backend: testing.Backend, index: int
) -> None:
    c = backend.asarray
    m = _singular(SINGULAR[index])
    n = m.shape[0]
    grad = np.ones((2, n))
    with pytest.raises(NPD, match="m \\+ damping·I"):
        kron.inverse(c(m))
    with pytest.raises(NPD, match="A⊗G"):
        kron.eigen_solve(c(grad), kron.eigh(c(m)), kron.eigh(c(np.eye(2))), 0.0)
    with pytest.raises(NPD, match=r"\bb\b"):
        kron.generalized_eigh(c(np.eye(n)), c(m))
    with pytest.raises(NPD, match="a1"):
        kron.sum_solve(c(grad), c(m), c(np.eye(2)), c(np.eye(n)), c(np.eye(2)))
    with pytest.raises(NPD, match="fbar_a"):
        wake.kron_q_step(c(grad), c(m), c(np.eye(2)), c(np.eye(n)), c(np.eye(2)), 1.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_damping_above_rounding_makes_a_singular_factor_invertible(
    backend: testing.Backend, dtype: type
) -> None:
    c = backend.asarray
    eps = float(np.finfo(dtype).eps)
    m = _singular(SINGULAR[-1]).astype(dtype)
    damping = 1e3 * eps * float(np.max(np.diag(m)))
    damped = m.astype(np.float64) + damping * np.eye(3)
    inverse = backend.to_numpy(kron.inverse(c(m), damping))
    condition = float(np.linalg.cond(damped))
    assert_close(inverse, np.linalg.inv(damped), np.dtype(dtype), condition)
    grad = np.ones((2, 3), dtype=dtype)
    solved = kron.eigen_solve(
        c(grad), kron.eigh(c(m)), kron.eigh(c(np.eye(2, dtype=dtype))), damping
    )
    assert np.all(np.isfinite(backend.to_numpy(solved)))


def test_new_checks_are_skipped_under_jit(backend: testing.Backend) -> None:
    if backend.jit is None:
        pytest.skip("jax.jit only")
    c, jit = backend.asarray, backend.jit
    assert np.isnan(backend.to_numpy(jit(kron.ema)(c(SPD3), c(NAN3), 0.5))).any()
    assert np.isnan(backend.to_numpy(jit(kron.precondition)(c(GRAD), c(NAN3)))).any()
    so = jit(lambda g, p: wake.so_gradient(g, p, 0.5))(c(GRAD), c(NAN_GRAD))
    assert np.isnan(backend.to_numpy(so)).any()
    lml = jit(laplace.log_marginal_likelihood)(-1.0, [c(NAN3)], 1.0, 1.0)
    assert np.isnan(backend.to_numpy(lml))
    solve = jit(lambda g, a, b: kron.eigen_solve(g, a, b, 0.0))
    result = solve(c(GRAD), kron.eigh(c(SPD3)), kron.eigh(c(SPD2)))
    reference = kron.eigen_solve(c(GRAD), kron.eigh(c(SPD3)), kron.eigh(c(SPD2)), 0.0)
    assert_close(backend.to_numpy(result), backend.to_numpy(reference), np.dtype(np.float64), 100)
    step = jit(lambda *args: wake.kron_q_step(*args, 2.0))(
        c(GRAD), c(SPD3), c(SPD2), c(SPD3), c(SPD2)
    )
    assert np.all(np.isfinite(backend.to_numpy(step.step)))
