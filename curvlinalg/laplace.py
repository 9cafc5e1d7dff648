r"""Laplace posteriors with a subsampled-Fisher or Kronecker-factored precision.

The posterior precision is ``Λ = τ·I + n·F`` with ``τ`` the prior precision, ``n`` the
number of training examples and ``F`` the Fisher: the subsampled ``F = (1/B)·G Gᵀ`` of a
batch (:func:`sample`, :func:`logdet`; ``G`` as in :mod:`curvlinalg.woodbury`) or one layer's
Kronecker factor ``F = A⊗G`` (:func:`kron_sample`, :func:`kron_logdet`). Noise comes in as
standard-normal arrays drawn by the caller's RNG.

Sampling with the subsampled Fisher needs only ``B×B`` work (Benzing 2022, App. A/C.1,
after Hoffman & Ribak and Doucet): with ``V = sqrt(n/(Bτ))·G`` and ``U = I + VᵀV``,

    x = y − V U⁻¹ (Vᵀy + z),   y ~ N(0, I_D), z ~ N(0, I_B)

has ``Cov(x) = I − V U⁻¹ Vᵀ = τ·Λ⁻¹`` (Woodbury), so ``τ^{-1/2}·x ~ N(0, Λ⁻¹)``. The sample
is linear in ``(y, z)``; add it to the MAP parameters.

Masks (padding): :func:`sample` and :func:`logdet` take ``mask=`` as the
:mod:`curvlinalg.woodbury` functions do (one array for every layer or one entry per layer;
``g_i = Σ_t w_it e_itᵀ a_it``). The Fisher is then ``F = (1/B_eff)·G Gᵀ`` with
``B_eff = Σ_i max_{l,t} w_lit`` — the number of examples with a kept position in some layer
for boolean masks (see :func:`curvlinalg.kron.example_count`); fully masked examples count
for nothing. ``z`` keeps its ``(S, B)`` shape; the entries of masked examples drop out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from . import _backend, _checks, _masks, kron, woodbury

Array = Any

__all__ = ["sample", "logdet", "kron_sample", "kron_logdet", "log_marginal_likelihood"]


def _check_prior(prior_precision: Any, n_data: Any) -> None:
    _checks.scalar("prior_precision", prior_precision, minimum=0.0, strict=True)
    _checks.scalar("n_data", n_data, minimum=0.0)


def _cast(value: Any, like: Any) -> Any:
    """A scalar parameter ready to combine with ``like`` (see ``_backend.scalar_like``): Python
    numbers stay weakly typed, 0-d arrays take ``like``'s floating dtype, so that a float64
    ``τ`` neither promotes float32 work nor fails to combine (array-api-strict)."""
    if type(value) in (int, float) or not hasattr(like, "dtype"):
        return value
    xp = _backend.namespace(("like", like))
    if not xp.isdtype(like.dtype, "real floating"):
        return value
    return _backend.scalar_like(xp, value, like)


def _precision(
    captures: Sequence[tuple[Array, Array]],
    prior_precision: Any,
    n_data: Any,
    check_finite: bool,
    mask: Any = None,
) -> woodbury.Woodbury:
    """``Λ = τI + (n/B) GGᵀ`` as a Woodbury factorisation (``damping = τ``); with ``mask``
    the masked ``G`` and ``B = B_eff`` (module docstring)."""
    _check_prior(prior_precision, n_data)
    # Shapes, dtypes and namespaces first (no value scan yet): the batch size below needs them.
    xp, flat, batch = woodbury._layers(captures, check_finite=False, mask=mask)
    like = flat[0][0]
    prior_precision, n_data = _cast(prior_precision, like), _cast(n_data, like)
    count: Any = max(batch, 1)
    if mask is not None:
        count = _masks.nonzero(xp, _example_count(xp, captures, mask, like))
    return woodbury.factorize(
        captures, prior_precision, n_data / count, check_finite=check_finite, mask=mask
    )


def _example_count(xp: Any, captures: Any, mask: Any, like: Array) -> Array:
    """``B_eff = Σ_i max_{l,t} w_lit`` over the masked layers (an unmasked layer keeps all)."""
    per_example = None
    for index, (name, layer_mask) in enumerate(_masks.per_layer(mask, len(captures), "mask")):
        a = captures[index][0]
        if layer_mask is None:
            weights = xp.ones((int(a.shape[0]),), dtype=like.dtype, device=_backend.device(like))
        else:
            weights = _masks.weights(xp, name, layer_mask, tuple(a.shape[:-1]), like, "captures")
            if weights.ndim > 1:
                weights = xp.max(weights, axis=tuple(range(1, weights.ndim)))
        per_example = weights if per_example is None else xp.maximum(per_example, weights)
    return xp.sum(per_example)


def sample(
    captures: Sequence[tuple[Array, Array]],
    prior_precision: float | Array,
    n_data: float | Array,
    y: Sequence[Array],
    z: Array,
    *,
    check_finite: bool = True,
    mask: Any = None,
) -> list[Array]:
    r"""Samples of ``N(0, Λ⁻¹)``, ``Λ = τI + (n/B)·G Gᵀ``, with ``B×B`` work only.

    ``y``: one ``(S, d_out, d_in)`` standard-normal array per layer; ``z``: ``(S, B)``
    standard normal. Returns one ``(S, d_out, d_in)`` array per layer:
    ``τ^{-1/2} (y − V U⁻¹(Vᵀy + z))`` with ``V = sqrt(n/(Bτ))·G``, ``U = I + VᵀV``.
    With ``mask`` (module docstring) ``G`` is masked and ``B = B_eff``.
    """
    precision = _precision(captures, prior_precision, n_data, check_finite, mask)
    batch = int(precision.lower.shape[0])
    if not isinstance(y, (list, tuple)):
        raise ValueError("y must be a sequence of per-layer (S, d_out, d_in) arrays")
    if len(y) != len(precision.captures):
        raise ValueError(
            f"y must hold one (S, d_out, d_in) array per layer ({len(precision.captures)}); "
            f"got {len(y)}"
        )
    named_y = [(f"y[{index}]", noise) for index, noise in enumerate(y)]
    xp = _backend.namespace(("z", z), ("captures", precision.lower), *named_y)
    if z.ndim != 2 or int(z.shape[1]) != batch:
        raise ValueError(f"shape mismatch: z has shape {tuple(z.shape)} but needs (S, B={batch})")
    count = int(z.shape[0])
    for index, (noise, (a, e)) in enumerate(zip(y, precision.captures)):
        expected = (count, int(e.shape[-1]), int(a.shape[-1]))
        if noise.ndim != 3 or tuple(int(s) for s in noise.shape) != expected:
            raise ValueError(
                f"shape mismatch: y[{index}] has shape {tuple(noise.shape)} but needs "
                f"(S, d_out, d_in) = {expected}"
            )
    _checks.same_dtype([("captures", precision.captures[0][0]), ("z", z)] + named_y)
    if check_finite:
        _checks.finite(xp, "z", z)
        for index, noise in enumerate(y):
            _checks.finite(xp, f"y[{index}]", noise)
    # U = I + c·GᵀG with c = n/(Bτ) is the factorised matrix of precision (scale/damping = c).
    root = (precision.scale / precision.damping) ** 0.5
    _, flat, _ = woodbury._layers(
        precision.captures, check_finite=False, mask=precision.mask or None
    )
    projected = root * woodbury._rmatvec(xp, flat, batch, y, precision.explicit) + z  # (S, B)
    weights = woodbury._cholesky_solve(xp, precision.lower, projected)
    correction = woodbury._matvec(xp, flat, batch, weights, precision.explicit)
    inverse_root_prior = precision.damping**-0.5
    return [inverse_root_prior * (noise - root * c) for noise, c in zip(y, correction)]


def logdet(
    captures: Sequence[tuple[Array, Array]],
    prior_precision: float | Array,
    n_data: float | Array,
    *,
    check_finite: bool = True,
    mask: Any = None,
) -> Array:
    r"""``log det Λ = D·log τ + log det(I_B + (n/(Bτ))·GᵀG)`` (matrix determinant lemma),
    ``D`` the number of parameters. Returns a 0-d array. With ``mask`` (module docstring)
    ``G`` is masked and ``B = B_eff``; fully masked examples add ``log 1 = 0``."""
    return woodbury.logdet(_precision(captures, prior_precision, n_data, check_finite, mask))


def _kron_spectrum(a: Array, g: Array, prior_precision: Any, n_data: Any, check_finite: bool):
    _check_prior(prior_precision, n_data)
    xp = _backend.namespace(("a", a), ("g", g))
    for name, factor in (("a", a), ("g", g)):
        _checks.linalg_dtype(xp, name, factor)
        _checks.square(name, factor)
        if check_finite:
            _checks.finite(xp, name, factor)
    _checks.same_dtype([("a", a), ("g", g)])
    prior_precision, n_data = _cast(prior_precision, a), _cast(n_data, a)
    a_eigh = kron.eigh(a, check_finite=False)
    g_eigh = kron.eigh(g, check_finite=False)
    precision = n_data * (g_eigh.values[:, None] * a_eigh.values[None, :]) + prior_precision
    if not _backend.is_traced(precision) and not bool(xp.all(precision > 0)):
        raise _checks.NotPositiveDefiniteError(
            "n_data·A⊗G + prior_precision·I is not positive definite"
        )
    return xp, a_eigh, g_eigh, precision


def kron_sample(
    a: Array,
    g: Array,
    prior_precision: float | Array,
    n_data: float | Array,
    y: Array,
    *,
    check_finite: bool = True,
) -> Array:
    r"""Samples of ``N(0, (n·A⊗G + τI)⁻¹)`` for one layer (a matrix-normal-like draw).

    With ``A = U_A diag(s_A) U_Aᵀ``, ``G = U_G diag(s_G) U_Gᵀ``:
    ``U_G [Y ⊘ sqrt(n·s_G s_Aᵀ + τ)] U_Aᵀ``.
    ``a``: ``(d_in, d_in)``, ``g``: ``(d_out, d_out)``, ``y``: ``(S, d_out, d_in)`` standard
    normal. Returns ``(S, d_out, d_in)``.
    """
    xp, a_eigh, g_eigh, precision = _kron_spectrum(a, g, prior_precision, n_data, check_finite)
    _backend.namespace(("a", a), ("y", y))
    _checks.same_dtype([("a", a), ("y", y)])
    expected = (int(g.shape[0]), int(a.shape[0]))
    if y.ndim != 3 or tuple(y.shape[1:]) != expected:
        raise ValueError(
            f"shape mismatch: y has shape {tuple(y.shape)} "
            f"but needs (S, {expected[0]}, {expected[1]})"
        )
    if check_finite:
        _checks.finite(xp, "y", y)
    return g_eigh.vectors @ (y / xp.sqrt(precision)) @ xp.matrix_transpose(a_eigh.vectors)


def kron_logdet(
    a: Array,
    g: Array,
    prior_precision: float | Array,
    n_data: float | Array,
    *,
    check_finite: bool = True,
) -> Array:
    r"""``log det(n·A⊗G + τI) = Σ_{i,j} log(n·s_G,i·s_A,j + τ)`` for one layer."""
    xp, _, _, precision = _kron_spectrum(a, g, prior_precision, n_data, check_finite)
    return xp.sum(xp.log(precision))


def log_marginal_likelihood(
    log_likelihood: float | Array,
    params: Sequence[Array],
    log_det_precision: float | Array,
    prior_precision: float | Array,
    *,
    check_finite: bool = True,
) -> Array | float:
    r"""Laplace approximation of the log evidence, the quantity one tunes ``τ`` with:

    ``log p(D) ≈ log p(D|θ*) − (τ/2)‖θ*‖² + (D/2)·log τ − ½·log det Λ``

    (the Gaussian prior ``N(0, τ⁻¹I)`` on all ``D`` parameters; the ``2π`` factors cancel).
    ``log_likelihood``: ``log p(D|θ*)`` summed over the training set at the MAP ``θ*``;
    ``params``: the MAP parameters per layer; ``log_det_precision``: :func:`logdet` or the
    sum of :func:`kron_logdet` over layers, computed with the same ``τ``. The arrays share one
    real floating dtype (``log_likelihood`` and ``log_det_precision`` may also be Python
    numbers); ``check_finite`` scans them for NaN and infinity.
    """
    _checks.scalar("prior_precision", prior_precision, minimum=0.0, strict=True)
    if not isinstance(params, (list, tuple)) or len(params) == 0:
        raise ValueError("params must be a non-empty sequence of per-layer arrays")
    named = [(f"params[{i}]", p) for i, p in enumerate(params)]
    terms = [("log_likelihood", log_likelihood), ("log_det_precision", log_det_precision)]
    xp = _backend.namespace(*named, *terms)
    for name, value in terms:
        if value is None or isinstance(value, (bool, complex)):
            raise ValueError(f"{name} must be a real number or array; got {value!r}")
        if tuple(getattr(value, "shape", ())) != ():
            raise ValueError(f"{name} must be a scalar; got shape {tuple(value.shape)}")
        if isinstance(value, (int, float)):
            if check_finite and not math.isfinite(value):
                raise ValueError(f"{name} must be finite; got {value}")
        elif _backend.is_weakly_typed(value):
            # A Python number traced by jax.jit: it promotes nothing, like the number itself.
            if not xp.isdtype(value.dtype, ("real floating", "integral")):
                raise ValueError(f"{name} must be a real number or array; got {value.dtype}")
            if check_finite:
                _checks.finite(xp, name, value)
        else:
            named.append((name, value))
    for name, value in named:
        _checks.floating(xp, name, value)
    _checks.same_dtype(named)
    if check_finite:
        for name, value in named:
            _checks.finite(xp, name, value)
    prior_precision = _cast(prior_precision, params[0])
    count = sum(math.prod(int(s) for s in p.shape) for p in params)
    squared_norm = sum(xp.sum(p * p) for p in params)
    log_prior = (
        math.log(prior_precision)
        if isinstance(prior_precision, (int, float))
        else xp.log(prior_precision)
    )
    return (
        log_likelihood
        - prior_precision / 2 * squared_norm
        + count / 2 * log_prior
        - log_det_precision / 2
    )
