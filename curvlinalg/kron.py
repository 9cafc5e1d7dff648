r"""Kronecker-factored curvature: factors, damping rules, damped inverses and solves.

Conventions (the whole package uses them):

* A layer's weight ``W`` has shape ``(d_out, d_in)``.
* The Kronecker block ``A ⊗ G`` — ``A`` the *input factor* (``d_in×d_in``), ``G`` the
  *output factor* (``d_out×d_out``) — acts on a gradient matrix ``V`` (``d_out×d_in``) as
  ``(A ⊗ G) vec(V) = vec(G V A)`` with column-major ``vec``.
* Factors are *means* over examples (and positions): ``A = aᵀa / N``. Summing instead of
  averaging rescales the meaning of the damping and learning rate by the batch size.

References: Martens & Grosse (2015), *Optimizing neural networks with Kronecker-factored
approximate curvature*; Benzing (2022), *Gradient descent on neurons and its link to
approximate second-order optimization*.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from . import _backend, _checks, _masks
from ._checks import NotPositiveDefiniteError

Array = Any

__all__ = [
    "Eigh",
    "DebiasedAverage",
    "NotPositiveDefiniteError",
    "factor",
    "input_factor",
    "example_count",
    "ema",
    "debiased_ema",
    "split_damping",
    "inverse",
    "precondition",
    "precondition_factored",
    "precondition_captures",
    "eigh",
    "generalized_eigh",
    "eigen_solve",
    "eigen_correction",
    "corrected_solve",
    "corrected_solve_captures",
    "sum_eigen_solve",
    "sum_solve",
    "embedding_factor",
    "diagonal_split_damping",
    "diagonal_inverse",
    "diagonal_precondition",
    "diagonal_input_solve",
]


class Eigh(NamedTuple):
    """Symmetric eigendecomposition ``m = vectors · diag(values) · vectorsᵀ``.

    ``values``: ``(n,)``, ascending. ``vectors``: ``(n, n)``, eigenvectors in columns.
    For :func:`generalized_eigh` the columns are ``b``-orthonormal instead.
    """

    values: Array
    vectors: Array


class DebiasedAverage(NamedTuple):
    """State of a zero-initialised exponential average with bias correction.

    ``total = Σ_j (1−m) m^{t−j} x_j`` and ``weight = 1 − m^t`` after ``t`` updates; the
    average is ``value = total / weight``, a convex combination of the inputs.
    """

    total: Array
    weight: Array | float

    @property
    def value(self) -> Array:
        """The bias-corrected average ``total / weight``."""
        return self.total / self.weight


def _symmetric(xp: Any, m: Array) -> Array:
    # Factorisations read one triangle; averaging both makes the result independent of
    # which one a backend reads and removes rounding asymmetry of products like xᵀx.
    return (m + xp.matrix_transpose(m)) / 2


# --------------------------------------------------------------------------------------
# Factors and their averages
# --------------------------------------------------------------------------------------


def factor(
    x: Array, *, bias: bool = False, check_finite: bool = True, mask: Array | None = None
) -> Array:
    r"""Kronecker factor ``xᵀx / N`` of activations or output gradients.

    ``x`` has shape ``(..., d)``; every leading axis counts as an example (batch, spatial
    position, sequence position) and ``N`` is the product of the leading sizes, so the result
    is the *mean* outer product. With ``bias=True`` a column of ones is appended first (the
    homogeneous coordinate of a layer with bias), giving a ``(d+1)×(d+1)`` factor.

    ``mask``: ``None`` or an array of shape ``x.shape[:-1]``, boolean (``True`` = keep) or
    real floating weights ``w ≥ 0``. The factor is then the weighted mean over rows,
    ``Σ_n w_n x_n x_nᵀ / Σ_n w_n`` (bias column included in ``x_n``): rows of weight zero
    contribute nothing whatever they hold (padding may be NaN), and an all-zero mask gives
    the zero matrix (the denominator 0 is replaced by 1), never NaN. An all-ones mask gives
    exactly the unmasked factor. Negative or non-finite weights raise ``ValueError``
    (unchecked under ``jax.jit``). See :func:`example_count` for the per-example count.

    Returns a symmetric ``(d, d)`` array (``(d+1, d+1)`` with bias) of ``x``'s dtype.
    """
    xp = _backend.namespace(("x", x), ("mask", mask))
    _checks.floating(xp, "x", x)
    _checks.ndim_at_least("x", x, 2)
    width = int(x.shape[-1])
    count = math.prod(int(size) for size in x.shape[:-1])
    if count == 0:
        raise ValueError(f"x has no examples; got shape {tuple(x.shape)}")
    weight = None
    if mask is not None:
        weight = xp.reshape(_masks.weights(xp, "mask", mask, tuple(x.shape[:-1]), x, "x"), (count,))
    rows = _masks.apply(xp, xp.reshape(x, (count, width)), weight, scale=False)
    if check_finite:
        _checks.finite(xp, "x", rows)
    denominator = count if weight is None else _masks.nonzero(xp, xp.sum(weight))
    return _outer_mean(xp, rows, weight, denominator, bias)


def _outer_mean(xp: Any, rows: Array, weight: Array | None, denominator: Any, bias: bool) -> Array:
    """``Σ_n w_n x_n x_nᵀ / denominator`` over ``rows`` ``(N, d)`` (a column of ones appended
    with ``bias``), ``w = 1`` when ``weight`` is ``None``."""
    if bias:
        ones = xp.ones((int(rows.shape[0]), 1), dtype=rows.dtype, device=_backend.device(rows))
        rows = xp.concat([rows, ones], axis=1)
    weighted = rows if weight is None else rows * weight[:, None]
    return _symmetric(xp, xp.matrix_transpose(weighted) @ rows) / denominator


def _weight_dtype(xp: Any, dtype: Any, mask: Any, device: Any, owner: str) -> Any:
    """``dtype``, else a floating ``mask``'s, else the namespace's default real floating dtype;
    refused unless real floating (``owner`` names the argument whose namespace it is)."""
    if dtype is None:
        if _masks.is_array(mask) and xp.isdtype(mask.dtype, "real floating"):
            dtype = mask.dtype
        else:
            dtype = xp.__array_namespace_info__().default_dtypes(device=device)["real floating"]
    try:
        floating_dtype = xp.isdtype(dtype, "real floating")
    except (TypeError, ValueError):
        floating_dtype = False
    if not floating_dtype:
        raise ValueError(
            f"dtype must be a real floating dtype of {owner}'s namespace; got {dtype!r}"
        )
    return dtype


def example_count(mask: Array, *, dtype: Any = None) -> Array:
    r"""Effective number of examples of a mask, ``B_eff = Σ_i max_t w_it``.

    ``mask``: ``(B,)`` or ``(B, T)`` (more trailing position axes are maximised over too),
    boolean or real floating weights ``≥ 0``. For a boolean mask ``B_eff`` is the number of
    examples with at least one kept position; for ``(B,)`` weights it is ``Σ_i w_i``; for
    example weights repeated over an example's kept positions it is the total example
    weight. It is the denominator of :func:`input_factor` and :func:`eigen_correction` with
    ``mask=`` (there 0 is replaced by 1), and the ``B`` of the masked subsampled Fisher
    ``F = (1/B_eff)·G Gᵀ`` (:mod:`curvlinalg.woodbury`, ``scale = 1/B_eff``).

    Returns a 0-d array of ``dtype`` (a real floating dtype of the mask's namespace; default
    the mask's dtype for a floating mask, else the namespace's default floating dtype — pass
    the captures' dtype). Not clamped: an all-masked batch gives 0. Raises ``ValueError``
    naming ``mask`` (not an array, 0-d, a dtype other than boolean or real floating, negative
    or non-finite weights) or ``dtype``.
    """
    if not _masks.is_array(mask):
        raise ValueError(f"mask must be an array; got {type(mask).__name__}")
    xp = _backend.namespace(("mask", mask))
    if mask.ndim < 1:
        raise ValueError(f"mask must be (B,) or (B, T); got shape {tuple(mask.shape)}")
    device = _backend.device(mask)
    dtype = _weight_dtype(xp, dtype, mask, device, "mask")
    like = xp.zeros((), dtype=dtype, device=device)
    weight = _masks.weights(xp, "mask", mask, tuple(mask.shape), like, "mask")
    return _masks.example_count(xp, weight)


def input_factor(
    a: Array, *, bias: bool = False, check_finite: bool = True, mask: Array | None = None
) -> Array:
    r"""K-FAC's input factor ``A = Σ_{i,t} a_it a_itᵀ / B``: positions summed, examples averaged.

    ``a``: ``(B, d)`` or ``(B, T, d)`` layer inputs (convolution patches, sequence positions).
    ``B`` is the batch axis (axis 0); the ``T`` positions of an example are *summed*, so that
    ``A⊗G`` with ``G = factor(e)`` (mean over examples and positions) is Grosse & Martens'
    KFC approximation of ``(1/B) Σ_i vec(g_i) vec(g_i)ᵀ`` for ``g_i = Σ_t e_itᵀ a_it`` — the
    scale of the Fisher. It is ``T·factor(a)``, and ``factor(a)`` for ``(B, d)`` inputs.
    ``bias=True`` appends the column of ones first, as for :func:`factor`.

    ``mask``: ``None`` or an array of shape ``a.shape[:-1]`` (``(B,)`` or ``(B, T)``),
    boolean or real floating weights ``w ≥ 0``:
    ``A = Σ_{i,t} w_it a_it a_itᵀ / B_eff`` with ``B_eff = Σ_i max_t w_it``
    (:func:`example_count`): the number of examples with a kept position for boolean masks,
    so that ``A⊗factor(e, mask=mask)`` is KFC of the padded batch with the padding deleted
    (for equal-length kept examples); for ``(B,)`` masks it equals ``factor(a, mask=mask)``.
    Positions of weight zero contribute nothing (padding may hold NaN); an all-zero mask
    gives the zero matrix; an all-ones mask gives the unmasked factor exactly.

    Returns a symmetric ``(d, d)`` array (``(d+1, d+1)`` with bias) of ``a``'s dtype.
    """
    xp = _backend.namespace(("a", a), ("mask", mask))
    _checks.floating(xp, "a", a)
    if a.ndim not in (2, 3):
        raise ValueError(f"a must be (B, d) or (B, T, d); got shape {tuple(a.shape)}")
    count = math.prod(int(size) for size in a.shape[:-1])
    if count == 0:
        raise ValueError(f"a has no examples; got shape {tuple(a.shape)}")
    weights = None
    if mask is not None:
        weights = _masks.weights(xp, "mask", mask, tuple(a.shape[:-1]), a, "a")
    rows = _masks.apply(xp, a, weights, scale=False)
    if check_finite:
        _checks.finite(xp, "a", rows)
    rows = xp.reshape(rows, (count, int(a.shape[-1])))
    if weights is None:
        return _outer_mean(xp, rows, None, int(a.shape[0]), bias)
    denominator = _masks.nonzero(xp, _masks.example_count(xp, weights))
    return _outer_mean(xp, rows, xp.reshape(weights, (count,)), denominator, bias)


def ema(
    average: Array | None, new: Array, decay: float | Array, *, check_finite: bool = True
) -> Array:
    r"""Exponential moving average ``decay·average + (1−decay)·new``.

    ``average=None`` returns ``new`` unchanged: the first estimate is taken as is (Puiu's κ
    convention, ``F̄_0 = F_0``), so a constant input gives exactly that constant.
    ``decay`` is in ``[0, 1]``; a Python number or a 0-d array.
    """
    _checks.scalar("decay", decay, minimum=0.0, maximum=1.0)
    if average is None:
        xp = _backend.namespace(("new", new), ("decay", decay))
        _checks.floating(xp, "new", new)
        if check_finite:
            _checks.finite(xp, "new", new)
        return new
    xp = _backend.namespace(("average", average), ("new", new), ("decay", decay))
    _checks.floating(xp, "new", new)
    _checks.same_dtype([("average", average), ("new", new)])
    if tuple(average.shape) != tuple(new.shape):
        raise ValueError(
            f"shape mismatch: average has shape {tuple(average.shape)} "
            f"but new has shape {tuple(new.shape)}"
        )
    if check_finite:
        _checks.finite(xp, "average", average)
        _checks.finite(xp, "new", new)
    decay = _backend.scalar_like(xp, decay, new)
    return decay * average + (1 - decay) * new


def debiased_ema(
    state: DebiasedAverage | None, new: Array, decay: float | Array, *, check_finite: bool = True
) -> DebiasedAverage:
    r"""Zero-initialised exponential average with Adam-style bias correction.

    ``total ← m·total + (1−m)·new`` and ``weight ← m·weight + (1−m)`` (so ``weight = 1−m^t``
    after ``t`` updates); ``state.value = total / weight`` weighs input ``j`` by
    ``(1−m) m^{t−j} / (1−m^t)``, weights summing to one. ``state=None`` starts from zero.
    This is Benzing's factor average; :func:`ema` is Puiu's (first estimate taken as is).
    """
    _checks.scalar("decay", decay, minimum=0.0, maximum=1.0)
    if state is None:
        xp = _backend.namespace(("new", new), ("decay", decay))
        _checks.floating(xp, "new", new)
        if not _backend.is_traced(decay) and float(decay) >= 1:
            # weight = 1 − decay = 0 would make the average 0/0.
            raise ValueError(f"decay must be < 1 for the first update; got {float(decay)}")
        if check_finite:
            _checks.finite(xp, "new", new)
        decay = _backend.scalar_like(xp, decay, new)
        return DebiasedAverage(total=(1 - decay) * new, weight=1 - decay)
    if not (isinstance(state, tuple) and len(state) == 2):
        raise ValueError(
            f"state must be a DebiasedAverage(total, weight) or None; got {type(state)}"
        )
    xp = _backend.namespace(
        ("state.total", state.total), ("state.weight", state.weight), ("new", new), ("decay", decay)
    )
    _checks.floating(xp, "new", new)
    _checks.same_dtype([("state.total", state.total), ("new", new)])
    if tuple(state.total.shape) != tuple(new.shape):
        raise ValueError(
            f"shape mismatch: state.total has shape {tuple(state.total.shape)} "
            f"but new has shape {tuple(new.shape)}"
        )
    # weight = 1 − m^t lies in (0, 1] once one update was made; 0 would make value 0/0.
    _checks.scalar("state.weight", state.weight, minimum=0.0, maximum=1.0, strict=True)
    if check_finite:
        _checks.finite(xp, "state.total", state.total)
        _checks.finite(xp, "new", new)
    decay = _backend.scalar_like(xp, decay, new)
    return DebiasedAverage(
        total=decay * state.total + (1 - decay) * new,
        weight=decay * state.weight + (1 - decay),
    )


# --------------------------------------------------------------------------------------
# Damping
# --------------------------------------------------------------------------------------


def split_damping(a: Array, g: Array, damping: float | Array) -> tuple[Array, Array]:
    r"""Factored (π) damping of Martens & Grosse: ``(damping_a, damping_g)``.

    ``damping_a · damping_g = damping`` and
    ``damping_a / damping_g = (tr a / d_in) / (tr g / d_out)``, i.e. ``damping_a = π√λ``,
    ``damping_g = √λ/π`` with ``π = sqrt((tr a / d_in)/(tr g / d_out))``. The rule is
    invariant to scaling both factors by the same number. Used as
    ``(a + damping_a·I)⁻¹ ⊗ (g + damping_g·I)⁻¹``.

    When either trace is not positive (an all-zero factor) the ratio is undefined and the
    damping is split evenly (π = 1) instead of producing NaN.

    Returns two 0-d arrays of ``a``'s dtype.
    """
    xp = _backend.namespace(("a", a), ("g", g), ("damping", damping))
    _checks.floating(xp, "a", a)
    _checks.same_dtype([("a", a), ("g", g)])
    dim_a = _checks.square("a", a)
    dim_g = _checks.square("g", g)
    _checks.scalar("damping", damping, minimum=0.0)
    mean_a = xp.sum(xp.linalg.diagonal(a)) / dim_a
    mean_g = xp.sum(xp.linalg.diagonal(g)) / dim_g
    # Only the diagonals enter; a NaN there would otherwise fall back to the even split.
    _checks.finite(xp, "a", mean_a)
    _checks.finite(xp, "g", mean_g)
    return _pi_split(xp, mean_a, mean_g, damping, a)


def _pi_split(
    xp: Any, mean_a: Array, mean_g: Array, damping: Any, like: Array
) -> tuple[Array, Array]:
    """``(π√λ, √λ/π)`` with ``π² = mean_a / mean_g`` (``π = 1`` unless both are positive)."""
    valid = (mean_a > 0) & (mean_g > 0)
    one = xp.ones_like(mean_a)
    ratio = xp.where(valid, mean_a / xp.where(valid, mean_g, one), one)
    pi = xp.sqrt(ratio)
    root = xp.sqrt(xp.asarray(damping, dtype=like.dtype, device=_backend.device(like)))
    return pi * root, root / pi


# --------------------------------------------------------------------------------------
# Inverses and preconditioning
# --------------------------------------------------------------------------------------


def inverse(m: Array, damping: float | Array = 0.0, *, check_finite: bool = True) -> Array:
    r"""Damped inverse ``(m + damping·I)⁻¹`` of a symmetric positive (semi)definite ``m``.

    Computed through a Cholesky factorisation of the symmetrised ``m + damping·I``. Raises
    :class:`curvlinalg.NotPositiveDefiniteError` (a ``ValueError``) when that matrix is not
    positive definite. Under ``jax.jit`` the check cannot run; the result is then NaN.

    ``m``: ``(n, n)``, float32 or float64. ``damping``: ``≥ 0``. Returns ``(n, n)``.
    A matrix that is singular to working precision (a Cholesky pivot ``L_ii²`` at most
    ``4·eps·m_ii``, i.e. the damping is lost in the rounding of the diagonal) counts as not
    positive definite on every backend, whatever sign the rounding gave the pivot.
    """
    return _inverse(m, damping, check_finite=check_finite, name="m", what="m + damping·I")


def _inverse(m: Array, damping: Any, *, check_finite: bool, name: str, what: str) -> Array:
    """:func:`inverse`, naming the user's argument ``name`` and the factorised matrix ``what``."""
    xp = _backend.namespace((name, m), ("damping", damping))
    _checks.linalg_dtype(xp, name, m)
    size = _checks.square(name, m)
    _checks.scalar("damping", damping, minimum=0.0)
    if check_finite:
        _checks.finite(xp, name, m)
    damped = _symmetric(xp, m) + _backend.scalar_like(xp, damping, m) * _backend.eye_like(
        xp, size, m
    )
    lower = _cholesky(xp, damped, what)
    return _symmetric(xp, _backend.cholesky_inverse(xp, lower))


# A pivot L_ii² ≤ _PIVOT_ROUNDING·eps·m_ii is within the rounding error of forming m_ii
# (products, symmetrisation, the damping's addition) and of the elimination itself: the
# matrix is then indistinguishable from a singular one in its precision, and whether LAPACK
# reports it as failed or returns a ~1/eps inverse depends on the build's rounding (NumPy
# and PyTorch disagreed on such matrices). Any damping above that level passes, since every
# pivot² of m + λI is ≥ λ.
_PIVOT_ROUNDING = 4


def _cholesky(xp: Any, m: Array, what: str) -> Array:
    lower, ok = _backend.cholesky(xp, m)
    if ok and not _backend.is_traced(lower):
        pivots = xp.linalg.diagonal(lower)
        floor = _PIVOT_ROUNDING * xp.finfo(m.dtype).eps * xp.linalg.diagonal(m)
        # Written so that a NaN pivot (NaN input with check_finite=False) fails too.
        ok = bool(xp.all(pivots * pivots > floor))
    if ok is False:
        raise NotPositiveDefiniteError(
            f"{what} is not positive definite (Cholesky failed, or a pivot fell to rounding "
            "level: singular to working precision); increase the damping or check the "
            "matrix for negative eigenvalues"
        )
    return lower


def _check_preconditioners(
    xp: Any, d_out: int, d_in: int, a_inv: Array, g_inv: Array | None
) -> None:
    _checks.matching("a_inv", _checks.square("a_inv", a_inv), "the gradient's d_in", d_in, "size")
    if g_inv is not None:
        _checks.matching(
            "g_inv", _checks.square("g_inv", g_inv), "the gradient's d_out", d_out, "size"
        )


def _finite_preconditioners(xp: Any, a_inv: Array, g_inv: Array | None) -> None:
    _checks.finite(xp, "a_inv", a_inv)
    if g_inv is not None:
        _checks.finite(xp, "g_inv", g_inv)


def precondition(
    grad: Array, a_inv: Array, g_inv: Array | None = None, *, check_finite: bool = True
) -> Array:
    r"""Kronecker-preconditioned gradient ``g_inv @ grad @ a_inv``.

    This is ``mat((a_inv ⊗ g_inv) vec(grad))`` for symmetric ``a_inv`` and ``g_inv``: the
    K-FAC step with ``a_inv = (A + λ_A I)⁻¹``, ``g_inv = (G + λ_G I)⁻¹``. With
    ``g_inv=None`` it is the FOOF step ``grad @ a_inv`` (Benzing 2022, eq. 6), whose
    preconditioner ``(A + λI)⁻¹ ⊗ I`` does not depend on the loss.

    ``grad``: ``(..., d_out, d_in)`` (leading batch axes allowed); ``a_inv``:
    ``(d_in, d_in)``; ``g_inv``: ``(d_out, d_out)`` or ``None``. Returns ``grad``'s shape.
    When the gradient is a mean of outer products ``eᵀa / B`` with ``B`` smaller than the
    layer's width, :func:`precondition_factored` is several times cheaper.
    """
    xp = _backend.namespace(("grad", grad), ("a_inv", a_inv), ("g_inv", g_inv))
    _checks.floating(xp, "grad", grad)
    _checks.ndim_at_least("grad", grad, 2)
    _checks.same_dtype([("grad", grad), ("a_inv", a_inv), ("g_inv", g_inv)])
    _check_preconditioners(xp, int(grad.shape[-2]), int(grad.shape[-1]), a_inv, g_inv)
    if check_finite:
        _checks.finite(xp, "grad", grad)
        _finite_preconditioners(xp, a_inv, g_inv)
    result = grad @ a_inv
    return result if g_inv is None else g_inv @ result


def _flatten_captures(xp: Any, a: Array, e: Array) -> tuple[Array, Array, int]:
    """Validate a layer's captures and flatten them to ``(N, d_in)``, ``(N, d_out)``."""
    _checks.floating(xp, "a", a)
    _checks.same_dtype([("a", a), ("e", e)])
    if a.ndim not in (2, 3) or e.ndim != a.ndim:
        raise ValueError(
            "a and e must both be (B, d) or both (B, T, d); "
            f"got a {tuple(a.shape)} and e {tuple(e.shape)}"
        )
    if tuple(a.shape[:-1]) != tuple(e.shape[:-1]):
        raise ValueError(
            f"shape mismatch: a has leading shape {tuple(a.shape[:-1])} but e has "
            f"{tuple(e.shape[:-1])} (batch and position axes must agree)"
        )
    batch = int(a.shape[0])
    if batch == 0:
        raise ValueError("a and e have an empty batch")
    count = math.prod(int(size) for size in a.shape[:-1])
    return (
        xp.reshape(a, (count, int(a.shape[-1]))),
        xp.reshape(e, (count, int(e.shape[-1]))),
        batch,
    )


def precondition_captures(
    a: Array, e: Array, a_inv: Array, g_inv: Array | None = None, *, check_finite: bool = True
) -> tuple[Array, Array]:
    r"""Precondition a layer's gradient in factored form: ``(a @ a_inv, e @ g_inv)``.

    The mean gradient of a batch is ``∇W = (1/B) Σ_{i,t} e_itᵀ a_it``; its preconditioned
    version ``g_inv ∇W a_inv`` equals ``(1/B) Σ_{i,t} ẽ_itᵀ ã_it`` with the returned
    ``ã = a @ a_inv`` and ``ẽ = e @ g_inv`` (``e`` unchanged when ``g_inv`` is ``None``,
    FOOF). An optimizer can fuse that product into the parameter update
    (``W ← W − (lr/B)·ẽᵀã``) and never form ``∇W``.

    ``a``: ``(B, d_in)`` or ``(B, T, d_in)``; ``e``: ``(B, d_out)`` or ``(B, T, d_out)``.
    Returns arrays of the same shapes as ``a`` and ``e``.
    """
    xp = _backend.namespace(("a", a), ("e", e), ("a_inv", a_inv), ("g_inv", g_inv))
    _flatten_captures(xp, a, e)
    _checks.same_dtype([("a", a), ("a_inv", a_inv), ("g_inv", g_inv)])
    _check_preconditioners(xp, int(e.shape[-1]), int(a.shape[-1]), a_inv, g_inv)
    if check_finite:
        _checks.finite(xp, "a", a)
        _checks.finite(xp, "e", e)
        _finite_preconditioners(xp, a_inv, g_inv)
    return a @ a_inv, (e if g_inv is None else e @ g_inv)


def precondition_factored(
    a: Array, e: Array, a_inv: Array, g_inv: Array | None = None, *, check_finite: bool = True
) -> Array:
    r"""``precondition(∇W, a_inv, g_inv)`` for the mean gradient ``∇W = (1/B) Σ_{i,t} e_itᵀ a_it``.

    The same result as ``precondition(eᵀa / B, a_inv, g_inv)`` (``B = a.shape[0]``; positions
    are summed within an example, as for a convolution), computed in whichever order costs
    fewer multiplications for the static shapes: preconditioning the captures
    (``N·(d_in² + d_out² + d_out·d_in)`` with ``N = B·T``) or forming ``∇W`` first
    (``N·d_out·d_in + d_out·d_in² + d_out²·d_in``). At ``d_in = d_out = 1000`` and ``B = 100``
    the factored order needs about 6.7× fewer (K-FAC) or 5.5× (FOOF).

    ``a``: ``(B, d_in)`` or ``(B, T, d_in)``; ``e``: ``(B, d_out)`` or ``(B, T, d_out)``.
    Returns ``(d_out, d_in)``.
    """
    xp = _backend.namespace(("a", a), ("e", e), ("a_inv", a_inv), ("g_inv", g_inv))
    rows_a, rows_e, batch = _flatten_captures(xp, a, e)
    _checks.same_dtype([("a", a), ("a_inv", a_inv), ("g_inv", g_inv)])
    count, d_in = (int(size) for size in rows_a.shape)
    d_out = int(rows_e.shape[1])
    _check_preconditioners(xp, d_out, d_in, a_inv, g_inv)
    if check_finite:
        _checks.finite(xp, "a", a)
        _checks.finite(xp, "e", e)
        _finite_preconditioners(xp, a_inv, g_inv)
    output_cost = 0 if g_inv is None else 1
    factored_cost = count * (d_in * d_in + output_cost * d_out * d_out + d_out * d_in)
    dense_cost = count * d_out * d_in + d_out * d_in * d_in + output_cost * d_out * d_out * d_in
    scaled_e = rows_e / batch
    if factored_cost < dense_cost:
        if g_inv is not None:
            scaled_e = scaled_e @ g_inv
        return xp.matrix_transpose(scaled_e) @ (rows_a @ a_inv)
    result = (xp.matrix_transpose(scaled_e) @ rows_a) @ a_inv
    return result if g_inv is None else g_inv @ result


# --------------------------------------------------------------------------------------
# Eigenbasis solves
# --------------------------------------------------------------------------------------


def eigh(m: Array, *, check_finite: bool = True) -> Eigh:
    r"""Eigendecomposition ``m = V diag(s) Vᵀ`` of a symmetric ``m`` (symmetrised first).

    ``m``: ``(n, n)`` float32/float64. Returns :class:`Eigh` with ``values`` ascending.
    Uses the divide-and-conquer driver where the backend offers it.
    """
    xp = _backend.namespace(("m", m))
    _checks.linalg_dtype(xp, "m", m)
    _checks.square("m", m)
    if check_finite:
        _checks.finite(xp, "m", m)
    values, vectors = _backend.eigh(xp, _symmetric(xp, m))
    return Eigh(values, vectors)


def generalized_eigh(m: Array, b: Array, *, check_finite: bool = True) -> Eigh:
    r"""Generalised symmetric eigenproblem ``m v = s b v`` with ``b`` positive definite.

    Returns :class:`Eigh` whose ``vectors`` ``V`` satisfy ``Vᵀ b V = I`` and
    ``Vᵀ m V = diag(values)`` (values ascending). Computed as ``V = L⁻ᵀ Q`` where
    ``b = L Lᵀ`` (Cholesky) and ``Q diag(s) Qᵀ = L⁻¹ m L⁻ᵀ``. Raises
    :class:`NotPositiveDefiniteError` when ``b`` is not positive definite.
    """
    return _generalized_eigh(m, b, "m", "b", check_finite=check_finite)


def _generalized_eigh(m: Array, b: Array, m_name: str, b_name: str, *, check_finite: bool) -> Eigh:
    xp = _backend.namespace((m_name, m), (b_name, b))
    _checks.linalg_dtype(xp, m_name, m)
    _checks.same_dtype([(m_name, m), (b_name, b)])
    size = _checks.square(m_name, m)
    _checks.matching(b_name, _checks.square(b_name, b), m_name, size, "size")
    if check_finite:
        _checks.finite(xp, m_name, m)
        _checks.finite(xp, b_name, b)
    lower = _cholesky(xp, _symmetric(xp, b), b_name)
    half = _backend.solve_triangular(xp, lower, _symmetric(xp, m), lower=True)  # L⁻¹ m
    whitened = _backend.solve_triangular(xp, lower, xp.matrix_transpose(half), lower=True)
    values, rotation = _backend.eigh(xp, _symmetric(xp, whitened))
    vectors = _backend.solve_triangular(xp, lower, rotation, lower=True, transpose=True)
    return Eigh(values, vectors)


def _check_eigh(name: str, decomposition: Any, size: int, size_name: str) -> None:
    if not (isinstance(decomposition, tuple) and len(decomposition) == 2):
        raise ValueError(f"{name} must be an Eigh(values, vectors); got {type(decomposition)}")
    values, vectors = decomposition
    for field, value in (("values", values), ("vectors", vectors)):
        if not (hasattr(value, "ndim") and hasattr(value, "shape")):
            raise ValueError(f"{name}.{field} must be an array; got {type(value).__name__}")
    if values.ndim != 1 or vectors.ndim != 2 or tuple(vectors.shape) != (values.shape[0],) * 2:
        raise ValueError(
            f"{name} must hold values (n,) and vectors (n, n); got "
            f"{tuple(values.shape)} and {tuple(vectors.shape)}"
        )
    _checks.matching(name, int(values.shape[0]), size_name, size, "size")


def _diagonal_solve(
    xp: Any, grad: Array, a_vectors: Array, g_vectors: Array, denominator: Array
) -> Array:
    """``U_G [(U_Gᵀ grad U_A) ⊘ denominator] U_Aᵀ`` (transforms need not be orthogonal)."""
    rotated = xp.matrix_transpose(g_vectors) @ grad @ a_vectors
    return g_vectors @ (rotated / denominator) @ xp.matrix_transpose(a_vectors)


def _positive_denominator(xp: Any, denominator: Array, what: str) -> None:
    if _backend.is_traced(denominator):
        return
    if not bool(xp.all(denominator > 0)):
        raise NotPositiveDefiniteError(f"{what} is not positive definite")


def _eigh_fields(name: str, decomposition: Any) -> list[tuple[str, Array]]:
    """``[(name.values, values), (name.vectors, vectors)]`` of an :class:`Eigh` argument."""
    if not (isinstance(decomposition, tuple) and len(decomposition) == 2):
        raise ValueError(f"{name} must be an Eigh(values, vectors); got {type(decomposition)}")
    return [(f"{name}.values", decomposition[0]), (f"{name}.vectors", decomposition[1])]


def _eigen_inputs(
    grad: Array, a_eigh: Any, g_eigh: Any, damping: Any, *, check_finite: bool
) -> Any:
    """Validate the arguments of an eigenbasis solve; return their namespace.

    Every field of both decompositions takes part in the namespace, dtype and finiteness
    checks: a NumPy ``values`` in a torch call, or a float32 one in float64 work, would
    otherwise be silently converted or promoted."""
    fields = _eigh_fields("a_eigh", a_eigh) + _eigh_fields("g_eigh", g_eigh)
    xp = _backend.namespace(("grad", grad), *fields, ("damping", damping))
    _checks.floating(xp, "grad", grad)
    _checks.ndim_at_least("grad", grad, 2)
    _check_eigh("a_eigh", a_eigh, int(grad.shape[-1]), "the gradient's d_in")
    _check_eigh("g_eigh", g_eigh, int(grad.shape[-2]), "the gradient's d_out")
    _checks.same_dtype([("grad", grad), *fields])
    if check_finite:
        _checks.finite(xp, "grad", grad)
        for name, value in fields:
            _checks.finite(xp, name, value)
    return xp


# A backward-stable eigh returns eigenvalues accurate to a few eps·max|s| in absolute terms,
# so an eigenvalue that close to zero is indistinguishable from zero or from a negative one
# (a singular A with damping 0 gave ±1e-17 and, depending on the backend's rounding, an
# error or a 1e16-sized step). s_G,i·s_A,j + damping counts as positive only above the
# rounding it inherits from both factors.
_EIGEN_ROUNDING = 4


def _kronecker_denominator(
    xp: Any, denominator: Array, g_values: Array, a_values: Array, what: str
) -> None:
    if _backend.is_traced(denominator) or math.prod(int(s) for s in denominator.shape) == 0:
        return
    abs_a, abs_g = xp.abs(a_values), xp.abs(g_values)
    rounding = (_EIGEN_ROUNDING * xp.finfo(denominator.dtype).eps) * (
        abs_g[:, None] * xp.max(abs_a) + xp.max(abs_g) * abs_a[None, :]
    )
    if not bool(xp.all(denominator > rounding)):
        raise NotPositiveDefiniteError(
            f"{what} is not positive definite: some s_G,i·s_A,j + damping is ≤ 0 or at the "
            "rounding level of the eigenvalues (singular to working precision); increase "
            "the damping"
        )


def eigen_solve(
    grad: Array, a_eigh: Eigh, g_eigh: Eigh, damping: float | Array, *, check_finite: bool = True
) -> Array:
    r"""Exactly damped Kronecker solve ``mat((A⊗G + damping·I)⁻¹ vec(grad))``.

    With ``A = U_A diag(s_A) U_Aᵀ`` and ``G = U_G diag(s_G) U_Gᵀ`` (from :func:`eigh`):
    ``U_G [(U_Gᵀ grad U_A) ⊘ (s_G s_Aᵀ + damping)] U_Aᵀ``. Costs two multiplications by each
    eigenbasis; reuse the decompositions across steps.

    ``grad``: ``(..., d_out, d_in)``; ``a_eigh`` of ``A`` (``d_in×d_in``); ``g_eigh`` of ``G``
    (``d_out×d_out``); ``damping ≥ 0``. Raises :class:`NotPositiveDefiniteError` when some
    ``s_G,i s_A,j + damping ≤ 0``, or is within the eigenvalues' rounding
    (``4·eps·(|s_G,i|·max|s_A| + max|s_G|·|s_A,j|)``) of zero: a singular factor with
    ``damping = 0`` is refused on every backend. With ``check_finite`` the gradient and all
    four fields of the decompositions are checked for NaN and infinity.
    """
    xp = _eigen_inputs(grad, a_eigh, g_eigh, damping, check_finite=check_finite)
    _checks.scalar("damping", damping, minimum=0.0)
    denominator = g_eigh.values[:, None] * a_eigh.values[None, :] + _backend.scalar_like(
        xp, damping, grad
    )
    _kronecker_denominator(xp, denominator, g_eigh.values, a_eigh.values, "A⊗G + damping·I")
    return _diagonal_solve(xp, grad, a_eigh.vectors, g_eigh.vectors, denominator)


# --------------------------------------------------------------------------------------
# Eigenvalue correction (EK-FAC)
# --------------------------------------------------------------------------------------

# Per-example quantities (rotated gradients, position-pair products) are formed in chunks of
# examples holding at most this many elements, so memory stays bounded for any batch.
_CHUNK_ELEMENTS = 2**22

# Cost, in multiply-adds, of writing and re-reading one element of a materialised
# per-example gradient: its rank-T product runs at memory speed, not at matmul speed, so
# the position-pair contraction (one large matmul, T² more multiply-adds) wins for small T.
# Calibrated by bench/bench_ekfac.py (the T > 1 crossover).
_MATERIALIZE_WEIGHT = 8

# How many times cheaper one multiply-add of eigen_correction's position-pair contraction (one
# large, well-shaped matmul) is than one of the explicit path's cost above (rank-T batched
# products and the squaring, at memory speed). Measured with bench/bench_ekfac.py's T sweep
# (B = 32, d = 256, NumPy/OpenBLAS, 1 thread): pairs faster up to T = 4, equal at T = 6, slower
# at T = 8, and by a targeted sweep (T = 3…10; d = 256, 512, 128×512 at B = 32, 1024 at B = 8;
# bench/README.md "EKFAC step time vs SGD", results/ekfac/ekfac_step_auto_sweep.json): NumPy
# crossover T ≈ 6.5–8.5, torch (CPU) T ≈ 7.5–11. With 1 (the unweighted count) "auto"
# switched to explicit at T = 4, where pairs was 1.4–6× faster; with 3, T² ≤ 3(T + 8) puts
# the switch between T = 6 and 7 (for d_in·d_out ≫ d_in + d_out), at NumPy's crossover and on
# the safe side of torch's.
_PAIRS_SPEEDUP = 3


def _correction_method(method: str, positions: int, d_in: int, d_out: int) -> str:
    """Resolve ``method`` for per-example squared rotated gradients of one layer."""
    if method == "auto":
        # Per example: T² position pairs, each a d_out×d_in rank-one term, against forming
        # the rotated gradient (T rank-one terms) and touching it; the pairs' multiply-adds
        # are _PAIRS_SPEEDUP times cheaper.
        pairs = positions * positions * (d_in * d_out + d_in + d_out)
        explicit = (positions + _MATERIALIZE_WEIGHT) * d_in * d_out
        return "pairs" if pairs <= _PAIRS_SPEEDUP * explicit else "explicit"
    if method in ("explicit", "pairs"):
        return method
    raise ValueError(f"method must be 'auto', 'explicit' or 'pairs'; got {method!r}")


def _chunks(batch: int, per_example: int) -> list[tuple[int, int]]:
    """``(start, stop)`` ranges of examples whose per-example data fit in the budget."""
    size = max(1, _CHUNK_ELEMENTS // max(per_example, 1))
    return [(start, min(start + size, batch)) for start in range(0, batch, size)]


def _position_pairs(xp: Any, x: Array) -> Array:
    """``(b, T, d)`` → ``(b·T², d)``: the rows ``x_it ∘ x_is`` for every pair ``(t, s)``."""
    count, positions, width = (int(size) for size in x.shape)
    products = x[:, :, None, :] * x[:, None, :, :]
    return xp.reshape(products, (count * positions * positions, width))


def _eigh_vectors(name: str, decomposition: Any) -> Array:
    """The eigenvectors of an :class:`Eigh`, after checking that it is one."""
    if not (isinstance(decomposition, tuple) and len(decomposition) == 2):
        raise ValueError(f"{name} must be an Eigh(values, vectors); got {type(decomposition)}")
    return decomposition[1]


def _with_positions(x: Array) -> Array:
    return x[:, None, :] if x.ndim == 2 else x


def eigen_correction(
    a: Array,
    e: Array,
    a_eigh: Eigh,
    g_eigh: Eigh,
    *,
    method: str = "auto",
    check_finite: bool = True,
    mask: Array | None = None,
) -> Array:
    r"""EK-FAC's corrected eigenvalues: the Fisher's diagonal in the Kronecker eigenbasis.

    ``S = (1/B) Σ_i (U_Gᵀ g_i U_A) ∘ (U_Gᵀ g_i U_A)`` with ``g_i = Σ_t e_itᵀ a_it``, i.e. the
    diagonal of ``Qᵀ F Q`` for ``F = (1/B) Σ_i vec(g_i) vec(g_i)ᵀ`` and ``Q = U_A ⊗ U_G``
    (George et al. 2018), ``S[o, j]`` belonging to the eigenvector ``U_A[:, j] ⊗ U_G[:, o]``.

    No per-example gradient of the batch is formed. The captures are rotated once,
    ``Ã = a U_A`` and ``Ẽ = e U_G``; for ``(B, d)`` captures ``S = (1/B)·(Ẽ∘Ẽ)ᵀ(Ã∘Ã)``, cost
    ``B(d_in² + d_out² + d_in·d_out)``. For ``(B, T, d)`` captures ``S`` is exact, from
    either

    * ``"pairs"``: ``S = (1/B) Σ_i Σ_{t,s} (Ẽ_it∘Ẽ_is)ᵀ (Ã_it∘Ã_is)``, one matmul over
      position pairs (``B·T²·d_in·d_out``), or
    * ``"explicit"``: the rotated per-example gradients ``Ẽ_iᵀ Ã_i`` squared and summed,
      formed a chunk of examples at a time (``B·T·d_in·d_out`` plus the memory traffic).

    ``method="auto"`` picks by that cost model (``"pairs"`` for ``(B, d)`` captures and
    small ``T``); both give the same ``S`` up to rounding.

    ``a``: ``(B, d_in)`` or ``(B, T, d_in)`` (bias column included by the caller, as for
    :func:`factor`); ``e``: ``(B, d_out)`` or ``(B, T, d_out)``; ``a_eigh``, ``g_eigh``: the
    :class:`Eigh` of the input and output factors (any orthonormal eigenbases). Returns
    ``(d_out, d_in)``, non-negative.

    ``mask``: ``None`` or an array of shape ``a.shape[:-1]`` (``(B,)`` or ``(B, T)``),
    boolean or real floating weights ``w ≥ 0``. The per-example gradients become
    ``g_i = Σ_t w_it e_itᵀ a_it`` and ``S = Σ_i (U_Gᵀ g_i U_A)∘² / B_eff`` with
    ``B_eff = Σ_i max_t w_it`` (:func:`example_count`; the number of examples with a kept
    position for boolean masks). Positions of weight zero contribute nothing (padding may
    hold NaN); an all-zero mask gives zeros; an all-ones mask gives the unmasked ``S``.
    """
    xp = _backend.namespace(
        ("a", a),
        ("e", e),
        ("a_eigh", _eigh_vectors("a_eigh", a_eigh)),
        ("g_eigh", _eigh_vectors("g_eigh", g_eigh)),
        ("mask", mask),
    )
    _flatten_captures(xp, a, e)
    d_in, d_out = int(a.shape[-1]), int(e.shape[-1])
    _check_eigh("a_eigh", a_eigh, d_in, "a's d_in")
    _check_eigh("g_eigh", g_eigh, d_out, "e's d_out")
    _checks.same_dtype([("a", a), ("a_eigh", a_eigh[1]), ("g_eigh", g_eigh[1])])
    denominator: Any = int(a.shape[0])
    if mask is not None:
        weights = _masks.weights(xp, "mask", mask, tuple(a.shape[:-1]), a, "a")
        a = _masks.apply(xp, a, weights, scale=False)
        e = _masks.apply(xp, e, weights, scale=True)
        denominator = _masks.nonzero(xp, _masks.example_count(xp, weights))
    if check_finite:
        _checks.finite(xp, "a", a)
        _checks.finite(xp, "e", e)
    batch = int(a.shape[0])
    positions = 1 if a.ndim == 2 else int(a.shape[1])
    method = _correction_method(method, positions, d_in, d_out)
    rotated_a = _with_positions(a @ a_eigh.vectors)
    rotated_e = _with_positions(e @ g_eigh.vectors)
    total = None
    if method == "pairs":
        for start, stop in _chunks(batch, positions * positions * (d_in + d_out)):
            part = xp.matrix_transpose(
                _position_pairs(xp, rotated_e[start:stop, ...])
            ) @ _position_pairs(xp, rotated_a[start:stop, ...])
            total = part if total is None else total + part
        # Σ_{t,s} x_t x_s = (Σ_t x_t)² ≥ 0 exactly; rounding can leave tiny negatives.
        total = xp.where(total < 0, xp.zeros_like(total), total)
    else:
        for start, stop in _chunks(batch, d_in * d_out):
            rotated = xp.matrix_transpose(rotated_e[start:stop, ...]) @ rotated_a[start:stop, ...]
            part = xp.sum(rotated * rotated, axis=0)
            total = part if total is None else total + part
    return total / denominator


def _check_correction(
    correction: Array,
    damping: Any,
    d_out: int,
    d_in: int,
    operand: tuple[str, Array],
    a_eigh: Any,
    g_eigh: Any,
) -> None:
    """``correction`` is ``(d_out, d_in)`` of the operand's dtype and ``damping ≥ 0``."""
    name, value = operand
    if tuple(correction.shape) != (d_out, d_in):
        what = "the gradient needs" if name == "grad" else "the captures need"
        raise ValueError(
            f"shape mismatch: correction has shape {tuple(correction.shape)} but {what} "
            f"(d_out, d_in) = {(d_out, d_in)}"
        )
    _checks.same_dtype(
        [(name, value), ("a_eigh", a_eigh[1]), ("g_eigh", g_eigh[1]), ("correction", correction)]
    )
    _checks.scalar("damping", damping, minimum=0.0)


def corrected_solve(
    grad: Array,
    a_eigh: Eigh,
    g_eigh: Eigh,
    correction: Array,
    damping: float | Array,
    *,
    check_finite: bool = True,
) -> Array:
    r"""EK-FAC solve ``mat((Q diag(S) Qᵀ + damping·I)⁻¹ vec(grad))`` with ``Q = U_A ⊗ U_G``.

    ``= U_G [(U_Gᵀ grad U_A) ⊘ (S + damping)] U_Aᵀ`` with ``S = correction`` from
    :func:`eigen_correction` (``S[o, j]`` the eigenvalue of ``U_A[:, j] ⊗ U_G[:, o]``). With
    ``S = s_G s_Aᵀ``, the factors' own eigenvalues, it is :func:`eigen_solve`.

    ``grad``: ``(..., d_out, d_in)`` (leading batch axes allowed); ``a_eigh``, ``g_eigh``:
    :class:`Eigh` of the input (``d_in``) and output (``d_out``) factors; ``correction``:
    ``(d_out, d_in)``; ``damping ≥ 0``. Raises :class:`NotPositiveDefiniteError` when some
    ``correction + damping ≤ 0``. Returns ``grad``'s shape.
    """
    xp = _backend.namespace(
        ("grad", grad),
        ("a_eigh", _eigh_vectors("a_eigh", a_eigh)),
        ("g_eigh", _eigh_vectors("g_eigh", g_eigh)),
        ("correction", correction),
        ("damping", damping),
    )
    _checks.floating(xp, "grad", grad)
    _checks.ndim_at_least("grad", grad, 2)
    d_out, d_in = int(grad.shape[-2]), int(grad.shape[-1])
    _check_eigh("a_eigh", a_eigh, d_in, "the gradient's d_in")
    _check_eigh("g_eigh", g_eigh, d_out, "the gradient's d_out")
    _check_correction(correction, damping, d_out, d_in, ("grad", grad), a_eigh, g_eigh)
    if check_finite:
        _checks.finite(xp, "grad", grad)
        _checks.finite(xp, "correction", correction)
    denominator = correction + _backend.scalar_like(xp, damping, grad)
    _positive_denominator(
        xp, denominator, "Q diag(correction) Qᵀ + damping·I (some correction + damping ≤ 0)"
    )
    return _diagonal_solve(xp, grad, a_eigh.vectors, g_eigh.vectors, denominator)


def _rotate_from_captures(rows: int, d_in: int, d_out: int) -> bool:
    """Whether rotating the captures (``rows·(d_in² + d_out² + d_out·d_in)`` multiply-adds)
    is cheaper than forming ``∇W`` and rotating it (``rows·d_out·d_in + d_out·d_in·(d_in +
    d_out)``) for ``U_Gᵀ ∇W U_A``."""
    return rows * (d_in * d_in + d_out * d_out) < d_out * d_in * (d_in + d_out)


def corrected_solve_captures(
    a: Array,
    e: Array,
    a_eigh: Eigh,
    g_eigh: Eigh,
    correction: Array,
    damping: float | Array,
    *,
    check_finite: bool = True,
    mask: Array | None = None,
) -> Array:
    r"""``corrected_solve(∇W, a_eigh, g_eigh, correction, damping)`` for the mean gradient
    ``∇W = (1/B) Σ_{i,t} e_itᵀ a_it`` of a layer's captures, without forming ``∇W`` when
    that is cheaper.

    The rotated gradient is ``U_Gᵀ ∇W U_A = (1/B)·(e U_G)ᵀ(a U_A)`` (``a``, ``e`` flattened to
    ``N = B·T`` rows): ``N·(d_in² + d_out² + d_out·d_in)`` multiply-adds, against
    ``N·d_out·d_in + d_out·d_in·(d_in + d_out)`` for forming ``∇W`` first and rotating it;
    the cheaper order is taken for the static shapes (at ``d_in = d_out = 1000``, ``B = 100``
    the captures' order needs 7× fewer for this half). The result is then
    ``U_G [(U_Gᵀ ∇W U_A) ⊘ (S + damping)] U_Aᵀ``: the back-rotation (``d_out·d_in·(d_in +
    d_out)``) is the same in both orders, because ``⊘ (S + damping)`` does not keep the rank
    of the rotated gradient.

    ``a``: ``(B, d_in)`` or ``(B, T, d_in)`` (bias column included by the caller);
    ``e``: ``(B, d_out)`` or ``(B, T, d_out)``; ``a_eigh``, ``g_eigh``, ``correction``,
    ``damping``: as for :func:`corrected_solve`. For a summed loss (``∇W = Σ eᵀa``) multiply
    the result by ``B``. Returns ``(d_out, d_in)``. Raises :class:`NotPositiveDefiniteError`
    when some ``correction + damping ≤ 0``.

    ``mask``: ``None`` or an array of shape ``a.shape[:-1]`` (``(B,)`` or ``(B, T)``),
    boolean or real floating weights ``w ≥ 0``, as for :func:`eigen_correction`: then
    ``∇W = (1/B_eff) Σ_{i,t} w_it e_itᵀ a_it`` with ``B_eff = Σ_i max_t w_it``
    (:func:`example_count`; 0 replaced by 1, so an all-masked batch gives zeros). Positions
    of weight zero contribute nothing (padding may hold NaN).
    """
    xp = _backend.namespace(
        ("a", a),
        ("e", e),
        ("a_eigh", _eigh_vectors("a_eigh", a_eigh)),
        ("g_eigh", _eigh_vectors("g_eigh", g_eigh)),
        ("correction", correction),
        ("damping", damping),
        ("mask", mask),
    )
    rows_a, rows_e, batch = _flatten_captures(xp, a, e)
    d_in, d_out = int(a.shape[-1]), int(e.shape[-1])
    _check_eigh("a_eigh", a_eigh, d_in, "a's d_in")
    _check_eigh("g_eigh", g_eigh, d_out, "e's d_out")
    _check_correction(correction, damping, d_out, d_in, ("a", a), a_eigh, g_eigh)
    count: Any = batch
    if mask is not None:
        weights = _masks.weights(xp, "mask", mask, tuple(a.shape[:-1]), a, "a")
        a = _masks.apply(xp, a, weights, scale=False)
        e = _masks.apply(xp, e, weights, scale=True)
        rows_a, rows_e, _ = _flatten_captures(xp, a, e)
        count = _masks.nonzero(xp, _masks.example_count(xp, weights))
    if check_finite:
        _checks.finite(xp, "a", a)
        _checks.finite(xp, "e", e)
        _checks.finite(xp, "correction", correction)
    denominator = correction + _backend.scalar_like(xp, damping, a)
    _positive_denominator(
        xp, denominator, "Q diag(correction) Qᵀ + damping·I (some correction + damping ≤ 0)"
    )
    a_vectors, g_vectors = a_eigh[1], g_eigh[1]
    scaled_e = rows_e / count
    if _rotate_from_captures(int(rows_a.shape[0]), d_in, d_out):
        rotated = xp.matrix_transpose(scaled_e @ g_vectors) @ (rows_a @ a_vectors)
    else:
        grad = xp.matrix_transpose(scaled_e) @ rows_a
        rotated = xp.matrix_transpose(g_vectors) @ grad @ a_vectors
    return g_vectors @ (rotated / denominator) @ xp.matrix_transpose(a_vectors)


def sum_eigen_solve(grad: Array, a_eigh: Eigh, g_eigh: Eigh, *, check_finite: bool = True) -> Array:
    r"""``mat((A1⊗G1 + A2⊗G2)⁻¹ vec(grad))`` from generalised eigendecompositions.

    ``a_eigh = generalized_eigh(A2, A1)`` and ``g_eigh = generalized_eigh(G2, G1)``: with
    ``M_Aᵀ A1 M_A = I``, ``M_Aᵀ A2 M_A = diag(d_A)`` (and likewise for G) the sum is
    congruent to ``I + diag(d_A)⊗diag(d_G)``, so the solve is
    ``M_G [(M_Gᵀ grad M_A) ⊘ (1 + d_G d_Aᵀ)] M_Aᵀ``. Reuse the decompositions while the
    factors are unchanged. Raises :class:`NotPositiveDefiniteError` when the sum is not
    positive definite.
    """
    xp = _eigen_inputs(grad, a_eigh, g_eigh, None, check_finite=check_finite)
    return _sum_eigen_solve(xp, grad, a_eigh, g_eigh, "A1⊗G1 + A2⊗G2")


def _sum_eigen_solve(xp: Any, grad: Array, a_eigh: Eigh, g_eigh: Eigh, what: str) -> Array:
    denominator = 1 + g_eigh.values[:, None] * a_eigh.values[None, :]
    _positive_denominator(xp, denominator, what)
    return _diagonal_solve(xp, grad, a_eigh.vectors, g_eigh.vectors, denominator)


def sum_solve(
    grad: Array,
    a1: Array,
    g1: Array,
    a2: Array,
    g2: Array,
    *,
    check_finite: bool = True,
) -> Array:
    r"""Exact solve with a sum of two Kronecker products: ``mat((A1⊗G1 + A2⊗G2)⁻¹ vec(grad))``.

    ``A1`` (``d_in×d_in``) and ``G1`` (``d_out×d_out``) positive definite, ``A2`` and ``G2``
    positive semidefinite. Solved exactly through the generalised eigenbases (Cholesky of
    ``A1`` and ``G1``, ``eigh`` of the whitened ``A2`` and ``G2``; see
    :func:`sum_eigen_solve`) — *not* by the single product of summed factors
    ``(A1 + A2)⊗(G1 + G2)`` that some implementations use. Cost: ``O(d_in³ + d_out³)``.

    Raises :class:`NotPositiveDefiniteError` naming ``a1``/``g1`` when one is not positive
    definite, or when the sum is not.
    """
    return _sum_solve(
        grad, a1, g1, a2, g2, check_finite=check_finite, names=("grad", "a1", "g1", "a2", "g2")
    )


def _sum_solve(
    grad: Array,
    a1: Array,
    g1: Array,
    a2: Array,
    g2: Array,
    *,
    check_finite: bool,
    names: tuple[str, str, str, str, str],
    what: str = "A1⊗G1 + A2⊗G2",
) -> Array:
    """:func:`sum_solve`, naming the user's arguments ``names`` (for ``grad, a1, g1, a2, g2``)
    and the summed matrix ``what`` in its errors."""
    grad_name, a1_name, g1_name, a2_name, g2_name = names
    xp = _backend.namespace(
        (grad_name, grad), (a1_name, a1), (g1_name, g1), (a2_name, a2), (g2_name, g2)
    )
    _checks.floating(xp, grad_name, grad)
    _checks.ndim_at_least(grad_name, grad, 2)
    d_out, d_in = int(grad.shape[-2]), int(grad.shape[-1])
    for name, matrix, size, role in (
        (a1_name, a1, d_in, f"{grad_name}'s d_in"),
        (a2_name, a2, d_in, f"{grad_name}'s d_in"),
        (g1_name, g1, d_out, f"{grad_name}'s d_out"),
        (g2_name, g2, d_out, f"{grad_name}'s d_out"),
    ):
        _checks.matching(name, _checks.square(name, matrix), role, size, "size")
    _checks.same_dtype(
        [(grad_name, grad), (a1_name, a1), (g1_name, g1), (a2_name, a2), (g2_name, g2)]
    )
    if check_finite:
        _checks.finite(xp, grad_name, grad)
    a_eigh = _generalized_eigh(a2, a1, a2_name, a1_name, check_finite=check_finite)
    g_eigh = _generalized_eigh(g2, g1, g2_name, g1_name, check_finite=check_finite)
    return _sum_eigen_solve(xp, grad, a_eigh, g_eigh, what)


# --------------------------------------------------------------------------------------
# Diagonal input factors (embedding layers)
# --------------------------------------------------------------------------------------


def embedding_factor(
    tokens: Array, vocab_size: int, *, mask: Array | None = None, dtype: Any = None
) -> Array:
    r"""Input factor of an embedding layer: the diagonal ``count / B_eff`` of ``A``.

    An embedding ``y_it = W[:, token_it]`` is a linear layer on one-hot inputs
    ``a_it = onehot(token_it)``; in the core's layout its weight ``W`` is ``(d_out, d_in) =
    (d, V)``, the *transpose* of ``torch.nn.Embedding.weight`` and of Flax ``nn.Embed``'s
    ``embedding`` (both ``(V, d)``). Its :func:`input_factor` is therefore diagonal,
    ``A = Σ_{i,t} a_it a_itᵀ / B = diag(count) / B`` with ``count_v = Σ_{i,t} [token_it = v]``
    (positions summed, examples averaged, as in :func:`input_factor`), and this function
    returns that diagonal without forming the ``(B, T, V)`` one-hot inputs. The output factor
    is :func:`factor` of the output gradients ``e`` (``(B, T, d)``), as for a linear layer.

    ``tokens``: ``(B,)`` or ``(B, T)`` integers in ``[0, vocab_size)``. ``mask``: ``None`` or
    an array of ``tokens``' shape, boolean (``True`` = keep) or real floating weights
    ``w ≥ 0``: then ``count_v = Σ_{i,t} w_it [token_it = v]`` and ``B`` becomes
    ``B_eff = Σ_i max_t w_it`` (:func:`example_count`: the examples with a kept position,
    for a boolean mask). A masked position contributes nothing (its token may even be out of
    range, e.g. a ``-1`` padding id); an all-masked batch gives zeros, never NaN. This is
    ``diag(input_factor(onehot(tokens), mask=mask))``. ``dtype``: the result's real floating
    dtype; default the mask's dtype for a floating mask, else the namespace's default
    floating dtype.

    Returns a ``(vocab_size,)`` array ``≥ 0`` on ``tokens``' device. Raises ``ValueError``
    naming ``tokens`` when they are not integers, not ``(B,)``/``(B, T)``, empty, or (at a kept
    position) outside ``[0, vocab_size)`` — a value check, skipped under ``jax.jit``, where
    out-of-range tokens count nowhere — and naming ``vocab_size`` or ``dtype`` when those
    are invalid.
    """
    xp = _backend.namespace(("tokens", tokens), ("mask", mask))
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive integer; got {vocab_size!r}")
    if not xp.isdtype(tokens.dtype, "integral"):
        raise ValueError(f"tokens must have an integer dtype (token ids); got {tokens.dtype}")
    if tokens.ndim not in (1, 2):
        raise ValueError(f"tokens must be (B,) or (B, T); got shape {tuple(tokens.shape)}")
    count = math.prod(int(size) for size in tokens.shape)
    if count == 0:
        raise ValueError(f"tokens has no examples; got shape {tuple(tokens.shape)}")
    device = _backend.device(tokens)
    dtype = _weight_dtype(xp, dtype, mask, device, "tokens")
    like = xp.zeros((), dtype=dtype, device=device)
    flat = xp.reshape(tokens, (count,))
    if mask is None:
        weight = xp.ones((count,), dtype=dtype, device=device)
        denominator: Any = int(tokens.shape[0])
    else:
        weights = _masks.weights(xp, "mask", mask, tuple(tokens.shape), like, "tokens")
        denominator = _masks.nonzero(xp, _masks.example_count(xp, weights))
        weight = xp.reshape(weights, (count,))
    valid = (flat >= 0) & (flat < vocab_size)
    if not _backend.is_traced(flat) and not _backend.is_traced(weight):
        if not bool(xp.all(valid | (weight == 0))):
            kept = flat[weight != 0]
            raise ValueError(
                f"tokens must lie in [0, vocab_size) = [0, {vocab_size}) at every kept "
                f"position; got values from {int(xp.min(kept))} to {int(xp.max(kept))}"
            )
    # Under jit the check above cannot run: invalid ids then count nowhere (JAX would wrap
    # negative indices and drop large ones).
    weight = xp.where(valid, weight, xp.zeros_like(weight))
    index = xp.where(valid, flat, xp.zeros_like(flat))
    return _backend.bincount(xp, index, weight, vocab_size) / denominator


def _diagonal_factor(xp: Any, name: str, diagonal: Array, check_finite: bool) -> int:
    """Validate the diagonal of a diagonal factor (``(n,)``, ``≥ 0``); return ``n``."""
    _checks.floating(xp, name, diagonal)
    if diagonal.ndim != 1:
        raise ValueError(
            f"{name} must be the (d_in,) diagonal of the input factor; got shape "
            f"{tuple(diagonal.shape)}"
        )
    if check_finite:
        _checks.finite(xp, name, diagonal)
    if not _backend.is_traced(diagonal) and not bool(xp.all(diagonal >= 0)):
        raise ValueError(f"{name} has negative entries; a factor's diagonal is ≥ 0")
    return int(diagonal.shape[0])


def diagonal_split_damping(
    a_diagonal: Array, g: Array, damping: float | Array
) -> tuple[Array, Array]:
    r""":func:`split_damping` (the π rule) for a diagonal input factor ``A = diag(a_diagonal)``.

    ``damping_a · damping_g = damping`` and
    ``damping_a / damping_g = mean(a_diagonal) / (tr g / d_out)`` — what
    ``split_damping(diag(a_diagonal), g, damping)`` returns, without the ``d_in×d_in``
    matrix. Used as ``(A + damping_a·I)⁻¹ ⊗ (g + damping_g·I)⁻¹``
    (:func:`diagonal_inverse`, :func:`inverse`, :func:`diagonal_precondition`). A zero
    factor splits the damping evenly. ``a_diagonal``: ``(d_in,)`` ``≥ 0``; ``g``:
    ``(d_out, d_out)``; ``damping > 0``. Returns two 0-d arrays of ``a_diagonal``'s dtype.
    """
    xp = _backend.namespace(("a_diagonal", a_diagonal), ("g", g), ("damping", damping))
    dim_a = _diagonal_factor(xp, "a_diagonal", a_diagonal, check_finite=True)
    _checks.same_dtype([("a_diagonal", a_diagonal), ("g", g)])
    dim_g = _checks.square("g", g)
    _checks.scalar("damping", damping, minimum=0.0, strict=True)
    mean_g = xp.sum(xp.linalg.diagonal(g)) / dim_g
    _checks.finite(xp, "g", mean_g)
    return _pi_split(xp, xp.sum(a_diagonal) / dim_a, mean_g, damping, a_diagonal)


def diagonal_inverse(
    a_diagonal: Array, damping: float | Array, *, check_finite: bool = True
) -> Array:
    r"""``(diag(a_diagonal) + damping·I)⁻¹`` as its diagonal, ``1 / (a_diagonal + damping)``.

    ``a_diagonal``: ``(d_in,)``, ``≥ 0`` (e.g. :func:`embedding_factor`); ``damping > 0``
    (strictly: the tokens a batch does not contain have ``a_v = 0``, so an undamped
    embedding factor is singular). Returns ``(d_in,)`` of ``a_diagonal``'s dtype.
    """
    xp = _backend.namespace(("a_diagonal", a_diagonal), ("damping", damping))
    _diagonal_factor(xp, "a_diagonal", a_diagonal, check_finite)
    _checks.scalar("damping", damping, minimum=0.0, strict=True)
    return 1 / (a_diagonal + _backend.scalar_like(xp, damping, a_diagonal))


def diagonal_precondition(
    grad: Array, a_inv_diagonal: Array, g_inv: Array | None = None, *, check_finite: bool = True
) -> Array:
    r"""``g_inv @ grad @ diag(a_inv_diagonal)``: :func:`precondition` with a diagonal ``a_inv``.

    ``= mat((diag(a_inv_diagonal) ⊗ g_inv) vec(grad))``, column ``v`` of ``grad`` scaled by
    ``a_inv_diagonal[v]``, then multiplied by ``g_inv``. With
    ``a_inv_diagonal = diagonal_inverse(a, damping_a)`` and ``g_inv = inverse(g, damping_g)``
    (dampings from :func:`diagonal_split_damping`) it is K-FAC's factored step for an
    embedding; with ``g_inv=None`` it is FOOF's ``grad (diag(a) + λI)⁻¹``.

    ``grad``: ``(..., d_out, d_in)`` in the core's layout — for an embedding ``(d, V)``, the
    transpose of the torch/Flax ``(V, d)`` weight gradient; ``a_inv_diagonal``: ``(d_in,)``;
    ``g_inv``: ``(d_out, d_out)`` or ``None``. Returns ``grad``'s shape.
    """
    xp = _backend.namespace(("grad", grad), ("a_inv_diagonal", a_inv_diagonal), ("g_inv", g_inv))
    _checks.floating(xp, "grad", grad)
    _checks.ndim_at_least("grad", grad, 2)
    _checks.same_dtype([("grad", grad), ("a_inv_diagonal", a_inv_diagonal), ("g_inv", g_inv)])
    d_out, d_in = int(grad.shape[-2]), int(grad.shape[-1])
    if a_inv_diagonal.ndim != 1:
        raise ValueError(f"a_inv_diagonal must be (d_in,); got shape {tuple(a_inv_diagonal.shape)}")
    _checks.matching(
        "a_inv_diagonal", int(a_inv_diagonal.shape[0]), "the gradient's d_in", d_in, "size"
    )
    if g_inv is not None:
        _checks.matching(
            "g_inv", _checks.square("g_inv", g_inv), "the gradient's d_out", d_out, "size"
        )
    if check_finite:
        _checks.finite(xp, "grad", grad)
        _checks.finite(xp, "a_inv_diagonal", a_inv_diagonal)
        if g_inv is not None:
            _checks.finite(xp, "g_inv", g_inv)
    result = grad * a_inv_diagonal
    return result if g_inv is None else g_inv @ result


def diagonal_input_solve(
    grad: Array,
    a_diagonal: Array,
    g_eigh: Eigh,
    damping: float | Array,
    *,
    check_finite: bool = True,
) -> Array:
    r"""Exactly damped solve ``mat((diag(a)⊗G + damping·I)⁻¹ vec(grad))`` for a diagonal ``A``.

    :func:`eigen_solve` with ``A = diag(a_diagonal)``, whose eigenbasis is the identity:
    with ``G = U_G diag(s_G) U_Gᵀ`` (from :func:`eigh`) the solve is
    ``U_G [(U_Gᵀ grad) ⊘ (s_G a_diagonalᵀ + damping)]``, two multiplications by ``U_G`` and
    no ``d_in×d_in`` work (for an embedding ``d_in = V``, the vocabulary).

    ``grad``: ``(..., d_out, d_in)`` in the core's layout (an embedding's ``(d, V)``, the
    transpose of the torch/Flax ``(V, d)`` gradient); ``a_diagonal``: ``(d_in,)`` ``≥ 0``
    (:func:`embedding_factor`); ``g_eigh``: :class:`Eigh` of ``G`` (``d_out``);
    ``damping > 0`` (strictly, see :func:`diagonal_inverse`). Raises
    :class:`NotPositiveDefiniteError` when some ``s_G,i·a_j + damping`` is within the
    eigenvalues' rounding of zero or below (as :func:`eigen_solve`). Returns ``grad``'s shape.
    """
    fields = _eigh_fields("g_eigh", g_eigh)
    xp = _backend.namespace(
        ("grad", grad), ("a_diagonal", a_diagonal), *fields, ("damping", damping)
    )
    _checks.floating(xp, "grad", grad)
    _checks.ndim_at_least("grad", grad, 2)
    d_in = _diagonal_factor(xp, "a_diagonal", a_diagonal, check_finite)
    _checks.matching("a_diagonal", d_in, "the gradient's d_in", int(grad.shape[-1]), "size")
    _check_eigh("g_eigh", g_eigh, int(grad.shape[-2]), "the gradient's d_out")
    _checks.same_dtype([("grad", grad), ("a_diagonal", a_diagonal), *fields])
    _checks.scalar("damping", damping, minimum=0.0, strict=True)
    if check_finite:
        _checks.finite(xp, "grad", grad)
        for name, value in fields:
            _checks.finite(xp, name, value)
    values, vectors = g_eigh
    denominator = values[:, None] * a_diagonal[None, :] + _backend.scalar_like(xp, damping, grad)
    _kronecker_denominator(xp, denominator, values, a_diagonal, "diag(a)⊗G + damping·I")
    rotated = xp.matrix_transpose(vectors) @ grad
    return vectors @ (rotated / denominator)
