r"""Laplace posterior samples of a model's parameters, as parameter pytrees.

The posterior is ``N(θ*, Λ⁻¹)`` around the trained parameters ``θ*`` with precision
``Λ = τ·I + n·F`` (``τ`` the prior precision, ``n`` the number of training examples, ``F``
the Fisher of a batch's captures). Two Fishers:

* :func:`laplace_samples` — the subsampled Fisher ``F = (1/B)·G Gᵀ`` of all captured layers
  jointly (``curvlinalg.laplace.sample``, ``B×B`` work only);
* :func:`kron_laplace_samples` — one Kronecker block ``A⊗G`` per layer
  (``curvlinalg.laplace.kron_sample``), layers independent.

The noise is drawn with ``jax.random`` from the given key. Samples are returned as a pytree
shaped like ``params`` with a leading axis of ``num_samples`` on every leaf; parameters
outside the captured layers are not part of the posterior and are repeated unchanged.
Evaluate a model on them with ``jax.vmap(lambda p: model.apply({"params": p}, x))(samples)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from curvlinalg import kron
from curvlinalg import laplace as core_laplace

from . import layout
from .capture import Captures, validated_captures

Array = Any

__all__ = ["laplace_samples", "kron_laplace_samples"]


def _check(prior_precision: float, n_data: float, num_samples: int) -> None:
    if not float(prior_precision) > 0:
        raise ValueError(f"prior_precision must be > 0; got {prior_precision!r}")
    if not float(n_data) >= 0:
        raise ValueError(f"n_data must be >= 0; got {n_data!r}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer; got {num_samples!r}")


def _around(params: Any, infos: Sequence[layout.LayerInfo], noise: Sequence[Array]) -> Any:
    """``θ* + noise`` per layer, every other leaf repeated along the sample axis."""
    count = int(noise[0].shape[0])
    repeated = jax.tree_util.tree_map(
        lambda x: jnp.broadcast_to(x, (count,) + jnp.shape(x)), params
    )
    centres = layout.layer_matrices(params, infos, "params")
    return layout.replace_layers(
        repeated, infos, [centre + n.astype(centre.dtype) for centre, n in zip(centres, noise)]
    )


def laplace_samples(
    key: Array,
    params: Any,
    captures: Captures,
    *,
    prior_precision: float,
    n_data: float,
    num_samples: int,
    layers: Sequence[str] | None = None,
) -> Any:
    r"""Samples of ``N(θ*, (τI + n·F)⁻¹)`` with the subsampled Fisher ``F = (1/B)·G Gᵀ``.

    ``G`` holds the per-example gradients of ``captures.fisher`` (MC, empirical or exact
    Fisher; ``B`` the number of examples) of the layers of ``params`` (all, or ``layers``).
    Draws ``y`` ``(S, d_out, d_in)`` per layer and ``z`` ``(S, rows)`` standard normal and calls
    ``curvlinalg.laplace.sample``. Returns ``params``' pytree with a leading axis ``S``.
    """
    _check(prior_precision, n_data, num_samples)
    infos = layout.find_layers(params, layers)
    batch = validated_captures(captures, infos, "laplace_samples")
    rows = [tuple(batch.fisher[info.path]) for info in infos]
    row_count = int(rows[0][0].shape[0])
    # laplace.sample scales the Gram by n/rows; the exact Fisher has C rows per example but
    # the scale n/B, so n is rescaled by rows/B (1 for the MC and empirical Fisher).
    n_scaled = float(n_data) * row_count / batch.batch_size
    dtype = rows[0][0].dtype
    keys = jax.random.split(key, len(infos) + 1)
    y = [
        jax.random.normal(k, (num_samples, info.d_out, info.d_in), dtype)
        for k, info in zip(keys[1:], infos)
    ]
    z = jax.random.normal(keys[0], (num_samples, row_count), dtype)
    noise = core_laplace.sample(rows, float(prior_precision), n_scaled, y, z, check_finite=False)
    return _around(params, infos, noise)


def kron_laplace_samples(
    key: Array,
    params: Any,
    captures: Captures,
    *,
    prior_precision: float,
    n_data: float,
    num_samples: int,
    layers: Sequence[str] | None = None,
) -> Any:
    r"""Samples of ``N(θ*, Λ⁻¹)`` with one Kronecker block ``n·A⊗G + τI`` per layer.

    ``A = Σ_{i,t} a_it a_itᵀ / B`` of the layer's inputs (``curvlinalg.kron.input_factor``,
    positions summed) and ``G`` the output factor of ``captures.fisher`` (``kron.factor``, the
    mean over examples and positions; for the exact Fisher's ``C`` rows per example rescaled
    to the common ``1/B`` scale), the factors of :func:`curvlinalg_jax.kfac` and the same
    ``A⊗G`` as ``curvlinalg_torch.Laplace(structure="kron")``; each layer's noise comes from
    ``curvlinalg.laplace.kron_sample``.
    Returns ``params``' pytree with a leading axis ``S``.
    """
    _check(prior_precision, n_data, num_samples)
    infos = layout.find_layers(params, layers)
    batch = validated_captures(captures, infos, "kron_laplace_samples")
    keys = jax.random.split(key, len(infos))
    noise = []
    for k, info in zip(keys, infos):
        a = batch.loss[info.path][0]
        e = batch.fisher[info.path][1]
        input_factor = kron.input_factor(a, check_finite=False)
        output_factor = kron.factor(e, check_finite=False)
        if int(e.shape[0]) != batch.batch_size:
            output_factor = output_factor * (int(e.shape[0]) / batch.batch_size)
        y = jax.random.normal(k, (num_samples, info.d_out, info.d_in), a.dtype)
        noise.append(
            core_laplace.kron_sample(
                input_factor,
                output_factor,
                float(prior_precision),
                float(n_data),
                y,
                check_finite=False,
            )
        )
    return _around(params, infos, noise)
