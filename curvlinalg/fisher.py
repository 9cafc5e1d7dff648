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
    if logits.ndim != 2:
        raise ValueError(f"{name} must be (B, C); got shape {tuple(logits.shape)}")
    return xp


def softmax(logits: Array) -> Array:
    """Row-wise softmax ``p_ic = exp(z_ic) / Σ_c exp(z_ic)`` of ``(B, C)`` logits (stable)."""
    xp = _logits("logits", logits)
    _checks.finite(xp, "logits", logits)
    shifted = logits - xp.max(logits, axis=1, keepdims=True)
    exponentials = xp.exp(shifted)
    return exponentials / xp.sum(exponentials, axis=1, keepdims=True)


def sample_labels(logits: Array, uniform: Array) -> Array:
    r"""Labels ``ỹ_i ~ Categorical(softmax(z_i))`` by inverse-CDF sampling.

    ``uniform``: ``(B,)`` draws from ``U[0, 1)`` made by the caller's RNG (the core owns no
    RNG). Returns integer labels ``(B,)`` in the namespace's default integer dtype (int64;
    int32 on JAX without x64): the first class whose cumulative probability exceeds ``u_i``.
    """
    xp = _logits("logits", logits)
    _backend.namespace(("logits", logits), ("uniform", uniform))
    _checks.floating(xp, "uniform", uniform)
    if uniform.ndim != 1 or int(uniform.shape[0]) != int(logits.shape[0]):
        raise ValueError(
            f"shape mismatch: uniform has shape {tuple(uniform.shape)} but logits has "
            f"{int(logits.shape[0])} rows"
        )
    if not _backend.is_traced(uniform) and not bool(xp.all((uniform >= 0) & (uniform <= 1))):
        raise ValueError("uniform must hold draws from [0, 1) (no NaN)")
    cumulative = xp.cumulative_sum(softmax(logits), axis=1)
    classes = int(logits.shape[1])
    below = xp.astype(
        cumulative <= xp.astype(uniform, cumulative.dtype)[:, None],
        _backend.default_integer(xp, logits),
    )
    # Rounding can leave the last cumulative sum a hair below 1; clamp to a valid class.
    return xp.clip(xp.sum(below, axis=1), max=classes - 1)


def _one_hot(xp: Any, labels: Array, classes: int, like: Array) -> Array:
    grid = xp.arange(classes, device=_backend.device(like))
    return xp.astype(labels[:, None] == grid[None, :], like.dtype)


def softmax_errors(logits: Array, labels: Array) -> Array:
    r"""Per-example logit gradients of the cross-entropy: ``e_i = softmax(z_i) − onehot(y_i)``.

    ``logits``: ``(B, C)``; ``labels``: integer ``(B,)`` — data labels for the empirical
    Fisher, sampled labels (:func:`sample_labels`) for the MC Fisher. Returns ``(B, C)``.
    """
    xp = _logits("logits", logits)
    _backend.namespace(("logits", logits), ("labels", labels))
    if not xp.isdtype(labels.dtype, "integral"):
        raise ValueError(f"labels must have an integer dtype; got {labels.dtype}")
    if labels.ndim != 1 or int(labels.shape[0]) != int(logits.shape[0]):
        raise ValueError(
            f"shape mismatch: labels has shape {tuple(labels.shape)} but logits has "
            f"{int(logits.shape[0])} rows"
        )
    classes = int(logits.shape[1])
    if not _backend.is_traced(labels) and not bool(xp.all((labels >= 0) & (labels < classes))):
        raise ValueError(f"labels must lie in [0, {classes})")
    return softmax(logits) - _one_hot(xp, labels, classes, logits)


def softmax_exact_errors(logits: Array) -> Array:
    r"""Rows of the exact Fisher at the logits: ``[i, c, :] = √p_ic (p_i − e_c)``.

    Returns ``(B, C, C)``: for each example ``C`` rows, one per class. Reshaped to
    ``(B·C, C)`` (with each layer's inputs repeated ``C`` times,
    ``xp.repeat(a, C, axis=0)``) they are captures whose Gram gives the exact Fisher
    ``(1/B) Σ_i Σ_c g_ic g_icᵀ`` — still with ``scale = 1/B``, not ``1/(B·C)``.
    """
    xp = _logits("logits", logits)
    probabilities = softmax(logits)
    classes = int(logits.shape[1])
    identity = _backend.eye_like(xp, classes, logits)
    difference = probabilities[:, None, :] - identity[None, :, :]  # [i, c, :] = p_i − e_c
    return xp.sqrt(probabilities)[:, :, None] * difference
