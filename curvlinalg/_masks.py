r"""Masks (padding, position weights) of captures: validation, application, example counts.

One place for what every ``mask=`` keyword of the core means (``kron.factor``,
``kron.input_factor``, ``kron.eigen_correction``, the :mod:`curvlinalg.woodbury`,
:mod:`curvlinalg.laplace` and :mod:`curvlinalg.influence` functions):

* A mask is an array of the captures' namespace whose shape is the capture's *leading*
  shape: ``(B,)`` for ``(B, d)`` captures, ``(B, T)`` for ``(B, T, d)``. Its dtype is boolean
  (``True`` = keep) or real floating (weights ``w ≥ 0``, cast to the captures' dtype).
  Negative or non-finite weights are refused with a ``ValueError`` naming the argument,
  whenever the values are available (not under ``jax.jit``, where a negative or NaN weight
  acts as zero).
* A position of weight ``w`` contributes ``w`` times its term: per-example gradients are
  ``g_i = Σ_t w_it e_itᵀ a_it``, factor rows enter as ``w_n x_n x_nᵀ``. A position of weight
  zero contributes *nothing*, whatever its values: its rows of ``a`` and ``e`` are replaced
  by zeros (``xp.where``, so padding may even hold NaN), and the finiteness checks look at
  the masked captures only.
* The *effective example count* is ``B_eff = Σ_i max_t w_it``: the number of examples with
  at least one kept position for boolean masks, the total example weight for ``(B,)``
  weights or for example weights repeated over an example's kept positions. Means over
  examples divide by it; where it is zero (everything masked) the result is zero, not NaN
  (the denominator is replaced by 1 where it is 0 — a jit-friendly ``xp.where``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import array_api_compat

from . import _backend, _checks

Array = Any


def is_array(value: Any) -> bool:
    return value is not None and array_api_compat.is_array_api_obj(value)


def weights(
    xp: Any, name: str, mask: Array, leading: tuple[int, ...], like: Array, what: str
) -> Array:
    """Validated weights of ``mask`` in ``like``'s dtype, shape ``leading``.

    ``name`` is the user's argument, ``what`` the capture it belongs to (for the errors)."""
    if not is_array(mask):
        raise ValueError(f"{name} must be an array or None; got {type(mask).__name__}")
    _backend.namespace((what, like), (name, mask))
    if tuple(int(size) for size in mask.shape) != tuple(leading):
        raise ValueError(
            f"shape mismatch: {name} has shape {tuple(mask.shape)} but {what} has leading "
            f"shape {tuple(leading)} (a mask has one entry per example and position)"
        )
    if xp.isdtype(mask.dtype, "bool"):
        return xp.astype(mask, like.dtype)
    if not xp.isdtype(mask.dtype, "real floating"):
        raise ValueError(
            f"{name} must have a boolean or real floating dtype (weights ≥ 0); got {mask.dtype}"
        )
    if not _backend.is_traced(mask):
        _checks.finite(xp, name, mask)
        if not bool(xp.all(mask >= 0)):
            raise ValueError(f"{name} has negative weights; weights must be ≥ 0")
    weight = mask if mask.dtype == like.dtype else xp.astype(mask, like.dtype)
    # The identity for valid weights; under jax.jit (no value check) it makes a negative or
    # NaN weight act as zero everywhere, also in the sums of weights that divide.
    return xp.where(weight > 0, weight, xp.zeros_like(weight))


def apply(xp: Any, x: Array, weight: Array | None, *, scale: bool) -> Array:
    """``x`` (``(..., d)``) with the rows of weight 0 set to zero, and multiplied by the
    weights when ``scale`` (weights of shape ``x.shape[:-1]``)."""
    if weight is None:
        return x
    column = weight[..., None]
    # Select before multiplying: NaN or inf padding never meets an arithmetic operation
    # (no NaN from inf·0, no floating-point warnings).
    kept = xp.where(column > 0, x, xp.zeros_like(x))
    return kept * column if scale else kept


def example_count(xp: Any, weight: Array) -> Array:
    """``B_eff = Σ_i max_t w_it`` (``Σ_i w_i`` for a ``(B,)`` mask), a 0-d array."""
    per_example = weight if weight.ndim == 1 else xp.max(weight, axis=tuple(range(1, weight.ndim)))
    return xp.sum(per_example)


def nonzero(xp: Any, count: Array) -> Array:
    """``count`` with 0 replaced by 1: an all-masked mean is ``0 / 1 = 0``, never NaN."""
    return xp.where(count > 0, count, xp.ones_like(count))


def per_layer(mask: Any, count: int, name: str) -> list[tuple[str, Array | None]]:
    """A layer-list ``mask`` argument as ``[(name for errors, mask or None)]`` per layer.

    ``mask`` is ``None``, one array applied to every layer, or a sequence with one entry
    (array or ``None``) per layer."""
    if mask is None:
        return [(name, None)] * count
    if is_array(mask):
        return [(f"{name} (applied to layer {index})", mask) for index in range(count)]
    if isinstance(mask, (list, tuple)):
        if len(mask) != count:
            raise ValueError(
                f"{name} must be one array for every layer or a sequence of {count} per-layer "
                f"masks (None = unmasked); got a sequence of {len(mask)}"
            )
        return [(f"{name}[{index}]", entry) for index, entry in enumerate(mask)]
    raise ValueError(
        f"{name} must be None, an array or a sequence of per-layer masks; got {type(mask).__name__}"
    )


def stored(masks: Sequence[tuple[str, Array | None]]) -> tuple[Array | None, ...]:
    """The per-layer masks as kept in a result (``()`` when no layer is masked)."""
    values = tuple(value for _, value in masks)
    return () if all(value is None for value in values) else values
