r"""Exponentially averaged curvature as a wake of quadratic models (Puiu 2022).

Puiu, *Rethinking exponential averaging of the Fisher* (ECML-PKDD 2022): the exponential
average ``F̄_k = Σ_i κ(i) ρ^{k−i} F_i`` (``κ(0) = 1``, ``κ(i>0) = 1−ρ``) arises from keeping
all previous quadratic models (WoQM) or KL-divergence regularisers to all previous networks
(KLD-WRM). The steps are ``θ_{k+1} = θ_k + s_k``; ``λ`` is the inverse step size
(``lr = 1/λ``) and may change from step to step.

* EA-NG / WoQM (Prop. 3.1): ``s_k = −λ⁻¹ F̄_k⁻¹ g_k``.
* SO-KLD-WRM (Prop. 4.1): ``s_k = −λ_k⁻¹ F̄_k⁻¹ (g_k − ρ (λ_k/λ_{k−1}) g_{k−1})``
  (:func:`so_gradient`).
* Q-KLD-WRM (Prop. 4.2): ``s_k = −λ_k⁻¹ (F̄_k + B_k/λ_k)⁻¹ ĝ_k`` with the ``ĝ`` recursion
  of :func:`q_gradient`; per Kronecker-factored layer :func:`kron_q_step` solves the sum of
  Kronecker products exactly.

Every function accepts a single array or a sequence (list/tuple) of per-layer arrays and
returns the same kind of container.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from . import _backend, _checks, kron

Array = Any

__all__ = [
    "QStep",
    "weights",
    "average",
    "so_gradient",
    "q_gradient",
    "kron_q_step",
]


def _is_sequence(value: Any) -> bool:
    return isinstance(value, (list, tuple))


def _per_layer(function: Callable[..., Array], first: Any, *others: Any) -> Any:
    """Apply ``function(where, *arrays)`` to arrays (``where = ""``), or layer by layer to
    sequences of arrays (``where = "[i]"``, for the error messages)."""
    if not _is_sequence(first):
        for other in others:
            if _is_sequence(other):
                raise ValueError(
                    "per-layer arguments must all be arrays or all be sequences; got an array "
                    f"and a {type(other).__name__}"
                )
        return function("", first, *others)
    count = len(first)
    for other in others:
        if other is not None and (not _is_sequence(other) or len(other) != count):
            raise ValueError(
                f"per-layer sequences must have the same length; got {count} and "
                f"{len(other) if _is_sequence(other) else type(other).__name__}"
            )
    results = [
        function(f"[{i}]", first[i], *(None if other is None else other[i] for other in others))
        for i in range(count)
    ]
    return type(first)(results) if isinstance(first, tuple) else results


def _ratio(lam: float | Array, lam_prev: float | Array) -> Any:
    _checks.scalar("lam", lam, minimum=0.0, strict=True)
    _checks.scalar("lam_prev", lam_prev, minimum=0.0, strict=True)
    return lam / lam_prev


def weights(count: int, rho: float) -> tuple[float, ...]:
    r"""The wake weights ``κ(i) ρ^{k−i}`` of ``F̄_k`` for ``i = 0..k`` (``k = count − 1``).

    Oldest first: ``(ρ^k, (1−ρ)ρ^{k−1}, …, (1−ρ)ρ, 1−ρ)``; they sum to one. Read as the
    weights of a window of ``count`` stored networks (QE-KLD-WRM's capacity), the oldest
    carries the mass of everything older.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive integer; got {count!r}")
    _checks.scalar("rho", rho, minimum=0.0, maximum=1.0)
    newest = count - 1
    return (rho**newest,) + tuple((1 - rho) * rho ** (newest - i) for i in range(1, count))


def average(previous: Any, new: Any, rho: float | Array, *, check_finite: bool = True) -> Any:
    r"""Wake average ``F̄_k = ρ·F̄_{k−1} + (1−ρ)·F_k``; ``previous=None`` returns ``new``.

    The κ convention ``F̄_0 = F_0`` makes ``F̄_k = Σ_i κ(i) ρ^{k−i} F_i`` (:func:`weights`).
    ``new`` and ``previous``: arrays or per-layer sequences (e.g. of Kronecker factors), of
    one floating dtype; ``check_finite`` scans them for NaN and infinity.
    """
    _checks.scalar("rho", rho, minimum=0.0, maximum=1.0)
    if previous is None:
        _per_layer(lambda where, n: _layer_inputs(where, [("new", n)], check_finite), new)
        return new

    def one(where: str, old: Array, current: Array) -> Array:
        _layer_inputs(where, [("new", current), ("previous", old)], check_finite)
        return kron.ema(old, current, rho, check_finite=False)

    return _per_layer(one, previous, new)


def _layer_inputs(where: str, named: list[tuple[str, Array]], check_finite: bool) -> Any:
    """Validate one layer's arrays ``named`` (the first is the reference) against each other:
    one namespace, one floating dtype, one shape, finite values. Returns the namespace."""
    named = [(name + where, value) for name, value in named]
    xp = _backend.namespace(*named)
    reference_name, reference = named[0]
    for name, value in named:
        _checks.floating(xp, name, value)
        if tuple(value.shape) != tuple(reference.shape):
            raise ValueError(
                f"shape mismatch: {reference_name} has shape {tuple(reference.shape)} "
                f"but {name} has shape {tuple(value.shape)}"
            )
    _checks.same_dtype(named)
    if check_finite:
        for name, value in named:
            _checks.finite(xp, name, value)
    return xp


def so_gradient(
    g: Any,
    g_prev: Any,
    rho: float | Array,
    lam: float | Array = 1.0,
    lam_prev: float | Array = 1.0,
    *,
    check_finite: bool = True,
) -> Any:
    r"""SO-KLD-WRM's modified gradient ``g_k − ρ·(λ_k/λ_{k−1})·g_{k−1}`` (Prop. 4.1).

    ``g_prev=None`` (the first step, ``g_{−1} = 0``) returns ``g``. The step is then
    ``s_k = −λ_k⁻¹ F̄_k⁻¹ · so_gradient(...)``. ``g`` and ``g_prev`` share one floating dtype
    (no silent promotion); ``check_finite`` scans them for NaN and infinity.
    """
    _checks.scalar("rho", rho, minimum=0.0, maximum=1.0)
    coefficient = rho * _ratio(lam, lam_prev)
    if g_prev is None:
        _per_layer(lambda where, current: _layer_inputs(where, [("g", current)], check_finite), g)
        return g

    def one(where: str, current: Array, previous: Array) -> Array:
        xp = _layer_inputs(where, [("g", current), ("g_prev", previous)], check_finite)
        _backend.namespace(("g", current), ("rho", rho), ("lam", lam), ("lam_prev", lam_prev))
        return current - _backend.scalar_like(xp, coefficient, current) * previous

    return _per_layer(one, g, g_prev)


def q_gradient(
    g: Any,
    ghat_prev: Any,
    g_prev: Any,
    m_ghat_prev: Any,
    rho: float | Array,
    lam: float | Array = 1.0,
    lam_prev: float | Array = 1.0,
    *,
    check_finite: bool = True,
) -> Any:
    r"""Q-KLD-WRM's gradient recursion (Prop. 4.2, variable λ)

    ``ĝ_k = g_k + ρ·(λ_k/λ_{k−1})·(ĝ_{k−1} − g_{k−1} − M̂_{k−1} ĝ_{k−1})``

    with ``M̂ ĝ = F̄ (F̄ + B/λ)⁻¹ ĝ`` from :func:`kron_q_step` of the previous step.
    ``ghat_prev=None`` (the first step, ``ĝ_0 = g_0``) returns ``g``. With ``B ≡ 0``,
    ``M̂ = I`` and this reduces to :func:`so_gradient`. All arrays share one floating dtype
    (no silent promotion); ``check_finite`` scans them for NaN and infinity.
    """
    _checks.scalar("rho", rho, minimum=0.0, maximum=1.0)
    coefficient = rho * _ratio(lam, lam_prev)
    if ghat_prev is None:
        _per_layer(lambda where, current: _layer_inputs(where, [("g", current)], check_finite), g)
        return g
    if g_prev is None or m_ghat_prev is None:
        raise ValueError("g_prev and m_ghat_prev are required when ghat_prev is given")

    def one(where: str, current: Array, ghat: Array, previous: Array, m_ghat: Array) -> Array:
        named = [("g", current), ("ghat_prev", ghat), ("g_prev", previous), ("m_ghat_prev", m_ghat)]
        xp = _layer_inputs(where, named, check_finite)
        _backend.namespace(("g", current), ("rho", rho), ("lam", lam), ("lam_prev", lam_prev))
        return current + _backend.scalar_like(xp, coefficient, current) * (ghat - previous - m_ghat)

    return _per_layer(one, g, ghat_prev, g_prev, m_ghat_prev)


class QStep(NamedTuple):
    """Result of :func:`kron_q_step`: the step ``s`` and ``M̂ĝ`` for the next recursion."""

    step: Array
    m_ghat: Array


def kron_q_step(
    ghat: Array,
    fbar_a: Array,
    fbar_g: Array,
    b_a: Array,
    b_g: Array,
    lam: float | Array,
    *,
    solver: str = "exact",
    check_finite: bool = True,
) -> QStep:
    r"""Q-KLD-WRM step of one Kronecker-factored layer (Prop. 4.2).

    ``s = −(1/λ)(F̄ + B/λ)⁻¹ ĝ`` with ``F̄ = fbar_a ⊗ fbar_g`` (the wake average, positive
    definite: include any damping in its factors) and ``B = b_a ⊗ b_g`` (the local curvature,
    positive semidefinite), and ``M̂ĝ = F̄ (F̄ + B/λ)⁻¹ ĝ = −λ·F̄ s`` for the next
    :func:`q_gradient`.

    ``solver="exact"`` solves the sum of Kronecker products exactly
    (:func:`curvlinalg.kron.sum_solve`). ``solver="summed_factors"`` reproduces Puiu's public
    code, which replaces the matrix by ``(fbar_a + b_a/λ) ⊗ (fbar_g + b_g/λ)``; that differs
    from the exact matrix by ``(Ā⊗B_G + B_A⊗Ḡ)/λ + (1/λ² − 1/λ)B_A⊗B_G`` and is offered only
    to compare with published results.

    ``ghat``: ``(..., d_out, d_in)``; ``fbar_a``, ``b_a``: ``(d_in, d_in)``; ``fbar_g``,
    ``b_g``: ``(d_out, d_out)``, all of one dtype, float32 or float64; ``lam > 0``. The
    factors are read as symmetric matrices: each is replaced by its symmetric part
    ``(M + Mᵀ)/2``, for the solve and for ``m_ghat`` alike. Raises
    :class:`curvlinalg.NotPositiveDefiniteError` naming ``fbar_a``/``fbar_g`` when one is not
    positive definite, or when the solved matrix is not. Returns :class:`QStep`
    ``(step, m_ghat)``.
    """
    if solver not in ("exact", "summed_factors"):
        raise ValueError(f"solver must be 'exact' or 'summed_factors'; got {solver!r}")
    _checks.scalar("lam", lam, minimum=0.0, strict=True)
    named = [("ghat", ghat), ("fbar_a", fbar_a), ("fbar_g", fbar_g), ("b_a", b_a), ("b_g", b_g)]
    xp = _backend.namespace(*named, ("lam", lam))
    _checks.floating(xp, "ghat", ghat)
    _checks.ndim_at_least("ghat", ghat, 2)
    _checks.linalg_dtype(xp, "fbar_a", fbar_a)
    _checks.same_dtype(named)
    d_out, d_in = int(ghat.shape[-2]), int(ghat.shape[-1])
    for name, matrix, size, role in (
        ("fbar_a", fbar_a, d_in, "ghat's d_in"),
        ("b_a", b_a, d_in, "ghat's d_in"),
        ("fbar_g", fbar_g, d_out, "ghat's d_out"),
        ("b_g", b_g, d_out, "ghat's d_out"),
    ):
        _checks.matching(name, _checks.square(name, matrix), role, size, "size")
    if check_finite:
        for name, value in named:
            _checks.finite(xp, name, value)
    lam = _backend.scalar_like(xp, lam, ghat)
    fbar_a, fbar_g = kron._symmetric(xp, fbar_a), kron._symmetric(xp, fbar_g)
    if solver == "exact":
        direction = kron._sum_solve(
            ghat,
            fbar_a,
            fbar_g,
            b_a / lam,
            b_g,
            check_finite=False,
            names=("ghat", "fbar_a", "fbar_g", "b_a", "b_g"),
            what="F̄ + B/λ = fbar_a⊗fbar_g + (b_a⊗b_g)/lam",
        )
    else:
        inverses = [
            kron._inverse(
                fbar + local / lam,
                0.0,
                check_finite=False,
                name=f"{fbar_name} + {local_name}/lam",
                what=f"{fbar_name} + {local_name}/lam",
            )
            for fbar, local, fbar_name, local_name in (
                (fbar_a, b_a, "fbar_a", "b_a"),
                (fbar_g, b_g, "fbar_g", "b_g"),
            )
        ]
        direction = kron.precondition(ghat, inverses[0], inverses[1], check_finite=False)
    m_ghat = fbar_g @ direction @ fbar_a
    return QStep(step=-direction / lam, m_ghat=m_ghat)
