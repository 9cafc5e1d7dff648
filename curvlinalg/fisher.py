r"""Fisher types for a softmax output: what the output-layer captures ``e`` hold.

For a classifier with logits ``z`` and cross-entropy loss ``ℓ = −log p_y``, the gradient of
an example's own loss with respect to the logits is ``∂ℓ/∂z = p − onehot(y)``. The three
Fisher types differ only in which labels enter (DESIGN.md; same ``1/B`` scale for all three):

* ``"empirical"``: the data labels — :func:`softmax_errors` with ``labels = y``.
* ``"mc"``: labels sampled from the model, ``ỹ ~ p`` — :func:`sample_labels` (the caller's
  uniform draws), then :func:`softmax_errors`.
* ``"exact"``: every class ``c``, weighted by ``√p_c`` — :func:`softmax_exact_errors`,
  ``B·C`` rows whose Gram summed over classes gives ``diag(p) − ppᵀ`` at the logits:
  ``Σ_c p_c (p − e_c)(p − e_c)ᵀ = diag(p) − ppᵀ``.

Sequences. Every function also takes language-model logits ``(B, T, C)`` (``B`` sequences of
``T`` positions; labels and uniform draws ``(B, T)``), treated as ``B·T`` independent
softmax outputs with a per-token cross-entropy: the exact Fisher of the summed token losses
is ``F = (1/B) Σ_i Σ_t J_itᵀ (diag p_it − p_it p_itᵀ) J_it``, so the rows are reshaped to
``(B·T, C)`` (exact: ``(B·T·C, C)``) and keep ``scale = 1/B``. ``mask`` (boolean, the
logits' leading shape ``(B,)`` or ``(B, T)``, ``True`` = the position counts, as an
attention mask) drops positions (padding, ``ignore_index``): their errors are exactly zero,
so they contribute nothing to any Gram, factor or gradient built from them, and their
labels are not validated (any value, e.g. ``-100``).

Hidden layers receive these rows back-propagated (an adapter's job); the core functions in
:mod:`curvlinalg.woodbury` and :mod:`curvlinalg.kron` take the resulting captures.
"""

from __future__ import annotations

from typing import Any

from . import _backend, _checks

Array = Any

__all__ = ["softmax", "sample_labels", "softmax_errors", "softmax_exact_errors"]


def _logits(name: str, logits: Array) -> Any:
    xp = _backend.namespace((name, logits))
    _checks.floating(xp, name, logits)
    if logits.ndim not in (2, 3):
        raise ValueError(
            f"{name} must be (B, C) or (B, T, C); got shape {tuple(logits.shape)}"
        )
    return xp


def _leading(name: str, x: Array, logits: Array, what: str) -> None:
    """``x`` has the logits' leading shape ``(B,)`` or ``(B, T)``."""
    if tuple(x.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"shape mismatch: {name} has shape {tuple(x.shape)} but logits of shape "
            f"{tuple(logits.shape)} need {what} of shape {tuple(logits.shape[:-1])}"
        )


def _mask(xp: Any, mask: Array | None, logits: Array) -> Array | None:
    """Validated boolean mask of the logits' leading shape (``None`` stays ``None``)."""
    if mask is None:
        return None
    _backend.namespace(("logits", logits), ("mask", mask))
    if mask.dtype != xp.bool:
        raise ValueError(
            f"mask must be boolean (True = the position counts); got dtype {mask.dtype}"
        )
    _leading("mask", mask, logits, "one entry per position")
    return mask


def softmax(logits: Array) -> Array:
    """Softmax over the last axis, ``p_ic = exp(z_ic) / Σ_c exp(z_ic)`` (stable), of
    ``(B, C)`` or ``(B, T, C)`` logits; same shape out."""
    xp = _logits("logits", logits)
    _checks.finite(xp, "logits", logits)
    shifted = logits - xp.max(logits, axis=-1, keepdims=True)
    exponentials = xp.exp(shifted)
    return exponentials / xp.sum(exponentials, axis=-1, keepdims=True)


def sample_labels(logits: Array, uniform: Array, mask: Array | None = None) -> Array:
    r"""Labels ``ỹ_i ~ Categorical(softmax(z_i))`` by inverse-CDF sampling.

    ``logits``: ``(B, C)`` or ``(B, T, C)``; ``uniform``: ``(B,)`` or ``(B, T)`` (the
    logits' leading shape) draws from ``U[0, 1)`` made by the caller's RNG (the core owns no
    RNG). Returns integer labels of the leading shape in the namespace's default integer
    dtype (int64; int32 on JAX without x64): the first class whose cumulative probability
    exceeds ``u``. ``mask`` (boolean, leading shape, ``True`` = counts): masked positions
    get label ``0`` and their draws are not validated; pass the same mask to
    :func:`softmax_errors`, which zeroes them.
    """
    xp = _logits("logits", logits)
    _backend.namespace(("logits", logits), ("uniform", uniform))
    _checks.floating(xp, "uniform", uniform)
    _leading("uniform", uniform, logits, "one draw per position")
    mask = _mask(xp, mask, logits)
    if not _backend.is_traced(uniform):
        valid = (uniform >= 0) & (uniform <= 1)
        if mask is not None:
            valid = valid | ~mask
        if not bool(xp.all(valid)):
            raise ValueError("uniform must hold draws from [0, 1) (no NaN)")
    cumulative = xp.cumulative_sum(softmax(logits), axis=logits.ndim - 1)
    classes = int(logits.shape[-1])
    integer = _backend.default_integer(xp, logits)
    below = xp.astype(cumulative <= xp.astype(uniform, cumulative.dtype)[..., None], integer)
    # Rounding can leave the last cumulative sum a hair below 1; clamp to a valid class.
    labels = xp.clip(xp.sum(below, axis=-1), max=classes - 1)
    if mask is None:
        return labels
    return xp.where(mask, labels, xp.zeros_like(labels))


def _one_hot(xp: Any, labels: Array, classes: int, like: Array) -> Array:
    grid = xp.arange(classes, device=_backend.device(like))
    return xp.astype(labels[..., None] == grid, like.dtype)


def softmax_errors(logits: Array, labels: Array, mask: Array | None = None) -> Array:
    r"""Per-position logit gradients of the cross-entropy: ``e = softmax(z) − onehot(y)``.

    ``logits``: ``(B, C)`` or ``(B, T, C)``; ``labels``: integer, the leading shape
    ``(B,)`` or ``(B, T)`` — data labels for the empirical Fisher, sampled labels
    (:func:`sample_labels`) for the MC Fisher. ``mask`` (boolean, leading shape, ``True`` =
    counts): ``e = 0`` at masked positions, whose labels may hold anything (e.g. the
    ``ignore_index`` ``-100``) and are not validated. Returns the logits' shape.
    """
    xp = _logits("logits", logits)
    _backend.namespace(("logits", logits), ("labels", labels))
    if not xp.isdtype(labels.dtype, "integral"):
        raise ValueError(f"labels must have an integer dtype; got {labels.dtype}")
    _leading("labels", labels, logits, "one label per position")
    mask = _mask(xp, mask, logits)
    classes = int(logits.shape[-1])
    if not _backend.is_traced(labels):
        valid = (labels >= 0) & (labels < classes)
        if mask is not None:
            valid = valid | ~mask
        if not bool(xp.all(valid)):
            where = "at unmasked positions " if mask is not None else ""
            raise ValueError(f"labels {where}must lie in [0, {classes})")
    errors = softmax(logits) - _one_hot(xp, labels, classes, logits)
    if mask is None:
        return errors
    return xp.where(mask[..., None], errors, xp.zeros_like(errors))


def softmax_exact_errors(logits: Array, mask: Array | None = None) -> Array:
    r"""Rows of the exact Fisher at the logits: ``[..., c, :] = √p_c (p − e_c)``.

    ``(B, C)`` logits give ``(B, C, C)``: for each example ``C`` rows, one per class.
    Reshaped to ``(B·C, C)`` (with each layer's inputs repeated ``C`` times,
    ``xp.repeat(a, C, axis=0)``) they are captures whose Gram gives the exact Fisher
    ``(1/B) Σ_i Σ_c g_ic g_icᵀ`` — still with ``scale = 1/B``, not ``1/(B·C)``.

    ``(B, T, C)`` logits give ``(B, T, C, C)`` with ``[i, t, c, :] = √p_itc (p_it − e_c)``;
    reshaped to ``(B·T·C, C)`` they give ``(1/B) Σ_i Σ_t J_itᵀ (diag p_it − p_it p_itᵀ)
    J_it``, again with ``scale = 1/B``. ``mask`` (boolean, leading shape, ``True`` =
    counts): all ``C`` rows of a masked position are zero.
    """
    xp = _logits("logits", logits)
    mask = _mask(xp, mask, logits)
    probabilities = softmax(logits)
    classes = int(logits.shape[-1])
    identity = _backend.eye_like(xp, classes, logits)
    difference = probabilities[..., None, :] - identity  # [..., c, :] = p − e_c
    rows = xp.sqrt(probabilities)[..., None] * difference
    if mask is None:
        return rows
    return xp.where(mask[..., None, None], rows, xp.zeros_like(rows))
