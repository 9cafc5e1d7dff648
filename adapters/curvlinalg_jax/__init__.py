r"""curvlinalg_jax: optax transformations and Flax capture helpers for curvlinalg.

A thin adapter: it captures each layer's inputs ``a`` and per-example output gradients ``e``
(:func:`capture_linen` with :class:`Dense`/:class:`DenseGeneral`/:class:`Conv` and the
attention :class:`MultiHeadDotProductAttention`, or :func:`capture` for plain functions;
sequence logits ``(B, T, C)`` with a ``position_mask``), holds optimizer state as
NamedTuples, schedules refreshes with ``jax.lax.cond``, and calls ``curvlinalg``'s formulas
on JAX arrays.

* :func:`foof`, :func:`kfac`, :func:`ekfac`, :func:`natural_gradient`, :func:`kldwrm` — optax
  ``GradientTransformationExtraArgs`` preconditioners; ``update(grads, state, params,
  captures=captures)``; chain with ``optax.sgd(learning_rate)``.
* :func:`laplace_samples`, :func:`kron_laplace_samples` — Laplace posterior samples as
  parameter pytrees.
* :func:`kernel_to_matrix`, :func:`matrix_to_kernel` — Flax kernel ``(…, d_in, d_out)`` ↔
  the core's weight matrix ``(d_out, d_in)`` (bias as a last column).
"""

from . import layout
from .capture import (
    INPUTS_COLLECTION,
    PERTURBATIONS_COLLECTION,
    Captures,
    capture,
    capture_linen,
    conv_patches,
    identity_tap,
)
from .ekfac import EkfacState, ekfac
from .laplace import kron_laplace_samples, laplace_samples
from .layout import kernel_to_matrix, matrix_to_kernel
from .linen import Conv, Dense, DenseGeneral, MultiHeadDotProductAttention
from .transforms import (
    FoofState,
    KfacState,
    KldwrmState,
    NaturalGradientState,
    foof,
    kfac,
    kldwrm,
    natural_gradient,
)

__all__ = [
    "Captures",
    "Conv",
    "Dense",
    "DenseGeneral",
    "EkfacState",
    "FoofState",
    "INPUTS_COLLECTION",
    "KfacState",
    "KldwrmState",
    "NaturalGradientState",
    "MultiHeadDotProductAttention",
    "PERTURBATIONS_COLLECTION",
    "capture",
    "capture_linen",
    "conv_patches",
    "ekfac",
    "foof",
    "identity_tap",
    "kernel_to_matrix",
    "kfac",
    "kldwrm",
    "kron_laplace_samples",
    "laplace_samples",
    "layout",
    "matrix_to_kernel",
    "natural_gradient",
]
