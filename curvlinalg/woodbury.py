r"""Exact subsampled natural gradients through the Woodbury identity.

``G`` is the implicit matrix whose ``i``-th column is ``vec(g_i)``, the per-example gradient
of all layers stacked, ``g_i = Σ_t e_itᵀ a_it`` per layer (captures as in DESIGN.md). The
subsampled Fisher of a batch is ``F = (1/B)·G Gᵀ``; its damped inverse applied to a
gradient ``u`` needs only ``B×B`` work:

    (λI + s·G Gᵀ)⁻¹ u = u/λ − (s/λ²)·G (I + (s/λ)·GᵀG)⁻¹ Gᵀ u

(Benzing 2022, App. E). ``G`` is never formed: the Gram ``GᵀG`` and the products ``Gᵀu`` and
``Gw`` are contracted directly from the captures, exactly also for captures with positions
``(B, T, ·)`` (convolutions, sequences).

Masks (padding): every function that takes captures takes ``mask=`` — ``None``, one array
for every layer, or a sequence of per-layer arrays (``None`` = unmasked) of the layers'
leading shapes ``(B,)`` or ``(B, T)``, boolean or weights ``w ≥ 0``. The per-example
gradients are then ``g_i = Σ_t w_it e_itᵀ a_it``: positions of weight zero contribute nothing
to ``G`` (their captures may hold anything, even NaN), and an example with no kept position
is a zero column of ``G``. Products stay unnormalised; the masked subsampled Fisher is
``F = (1/B_eff)·G Gᵀ`` with ``B_eff`` from :func:`curvlinalg.kron.example_count`, i.e.
``scale = 1/B_eff``. :func:`factorize` keeps the mask in :attr:`Woodbury.mask`, so that
:func:`solve` and :func:`solve_span` use the same masked ``G``.

Fisher types are a matter of what ``e`` holds (see :mod:`curvlinalg.fisher`): gradients for
labels sampled from the model (MC Fisher), for the data labels (empirical Fisher), or for
every class weighted by ``√p`` (exact Fisher: ``B·C`` rows, inputs repeated per class, and
still ``scale = 1/B``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

from . import _backend, _checks, _masks

Array = Any
Captures = Sequence[tuple[Array, Array]]

__all__ = [
    "Woodbury",
    "per_example",
    "gram",
    "cross_gram",
    "rmatvec",
    "matvec",
    "factorize",
    "solve",
    "solve_span",
    "logdet",
    "factorize_layers",
    "solve_layers",
]


class Woodbury(NamedTuple):
    """``damping·I + scale·G Gᵀ``, held as the captures and a Cholesky factorisation.

    ``lower`` is the lower Cholesky factor of the ``B×B`` matrix
    ``I + (scale/damping)·GᵀG``; a pytree, so it passes through ``jax.jit``.
    ``explicit`` holds, per layer, the per-example gradients ``(B, d_out·d_in)`` (row-major
    flattening) when :func:`factorize` formed them for the Gram because that was cheaper (layers
    with many positions ``T``), else ``None``; :func:`solve` then contracts with them instead
    of with the ``B·T`` capture rows.
    ``mask`` holds the per-layer masks given to :func:`factorize` (``None`` for an unmasked
    layer), or ``()`` when no layer was masked; every solve applies them to ``captures``.
    """

    captures: tuple[tuple[Array, Array], ...]
    damping: Array | float
    scale: Array | float
    lower: Array
    explicit: tuple[Array | None, ...] = ()
    mask: tuple[Array | None, ...] = ()


def _layers(
    captures: Captures,
    *,
    check_finite: bool,
    name: str = "captures",
    mask: Any = None,
    mask_name: str = "mask",
) -> tuple[Any, list, int]:
    """Validate captures; return the namespace, ``[(a2, e2, T)]`` flattened to rows, and B.

    With ``mask`` (``None``, one array, or one entry per layer; see :mod:`curvlinalg._masks`)
    the rows are masked: ``a`` zeroed and ``e`` multiplied by the weights (zeroed where the
    weight is 0), so that every contraction sees ``g_i = Σ_t w_it e_itᵀ a_it``. ``name`` and
    ``mask_name`` are the user's arguments, for the error messages."""
    if not isinstance(captures, (list, tuple)) or len(captures) == 0:
        raise ValueError(f"{name} must be a non-empty sequence of (a, e) pairs, one per layer")
    named: list[tuple[str, Array]] = []
    for index, pair in enumerate(captures):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(f"{name}[{index}] must be an (a, e) pair")
        named += [(f"{name}[{index}][0] (a)", pair[0]), (f"{name}[{index}][1] (e)", pair[1])]
    layer_masks = _masks.per_layer(mask, len(captures), mask_name)
    xp = _backend.namespace(*named)
    _checks.same_dtype(named)
    flat = []
    batch = None
    for index, ((a, e), (where_mask, layer_mask)) in enumerate(zip(captures, layer_masks)):
        where = f"{name}[{index}]"
        _checks.floating(xp, f"{where} (a)", a)
        if a.ndim not in (2, 3) or e.ndim != a.ndim:
            raise ValueError(
                f"{where}: a and e must both be (B, d) or both (B, T, d); "
                f"got a {tuple(a.shape)} and e {tuple(e.shape)}"
            )
        if tuple(a.shape[:-1]) != tuple(e.shape[:-1]):
            raise ValueError(
                f"{where}: shape mismatch: a has leading shape {tuple(a.shape[:-1])} "
                f"but e has {tuple(e.shape[:-1])}"
            )
        if batch is None:
            batch = int(a.shape[0])
        elif int(a.shape[0]) != batch:
            raise ValueError(
                f"{where}: batch size {int(a.shape[0])} differs from {name}[0]'s {batch}"
            )
        if layer_mask is not None:
            weights = _masks.weights(xp, where_mask, layer_mask, tuple(a.shape[:-1]), a, where)
            a = _masks.apply(xp, a, weights, scale=False)
            e = _masks.apply(xp, e, weights, scale=True)
        if check_finite:
            _checks.finite(xp, f"{where} (a)", a)
            _checks.finite(xp, f"{where} (e)", e)
        positions = 1 if a.ndim == 2 else int(a.shape[1])
        rows = batch * positions
        flat.append(
            (
                xp.reshape(a, (rows, int(a.shape[-1]))),
                xp.reshape(e, (rows, int(e.shape[-1]))),
                positions,
            )
        )
    if batch == 0:
        raise ValueError(f"{name} have an empty batch")
    return xp, flat, int(batch)


def _vectors(xp: Any, flat: list, vectors: Sequence[Array], name: str) -> list[Array]:
    if not isinstance(vectors, (list, tuple)) or len(vectors) != len(flat):
        count = len(vectors) if isinstance(vectors, (list, tuple)) else type(vectors).__name__
        raise ValueError(f"{name} must be a sequence of {len(flat)} per-layer arrays; got {count}")
    for index, ((rows_a, rows_e, _), vector) in enumerate(zip(flat, vectors)):
        _backend.namespace(("captures", rows_a), (f"{name}[{index}]", vector))
        expected = (int(rows_e.shape[1]), int(rows_a.shape[1]))
        if vector.ndim < 2 or tuple(vector.shape[-2:]) != expected:
            raise ValueError(
                f"shape mismatch: {name}[{index}] has shape {tuple(vector.shape)} but the layer's "
                f"captures need (..., d_out, d_in) = (..., {expected[0]}, {expected[1]})"
            )
        if tuple(vector.shape[:-2]) != tuple(vectors[0].shape[:-2]):
            raise ValueError(
                f"shape mismatch: {name}[{index}] has leading shape {tuple(vector.shape[:-2])} "
                f"but {name}[0] has {tuple(vectors[0].shape[:-2])}"
            )
    return list(vectors)


def per_example(captures: Captures, *, check_finite: bool = True, mask: Any = None) -> list[Array]:
    r"""The explicit per-example gradients ``g_i = Σ_t e_itᵀ a_it``, one ``(B, d_out, d_in)``
    array per layer.

    Costs ``B·d_out·d_in`` memory per layer; :func:`gram`, :func:`rmatvec` and :func:`matvec`
    avoid it. With ``mask`` (module docstring) ``g_i = Σ_t w_it e_itᵀ a_it``; a fully masked
    example gives a zero gradient.
    """
    xp, flat, batch = _layers(captures, check_finite=check_finite, mask=mask)
    result = []
    for rows_a, rows_e, positions in flat:
        a3 = xp.reshape(rows_a, (batch, positions, int(rows_a.shape[1])))
        e3 = xp.reshape(rows_e, (batch, positions, int(rows_e.shape[1])))
        result.append(xp.matrix_transpose(e3) @ a3)
    return result


def _layer_gram(
    xp: Any, rows_a: Array, rows_e: Array, positions: int, batch: int, method: str
) -> tuple[Array, Array | None]:
    """The layer's Gram, and its per-example gradients ``(B, d_out·d_in)`` when formed."""
    d_in, d_out = int(rows_a.shape[1]), int(rows_e.shape[1])
    if method == "auto":
        # Per pair of examples: T²(d_in + d_out) implicitly vs d_in·d_out through explicit g_i.
        implicit = positions * positions * (d_in + d_out)
        method = "implicit" if implicit <= d_in * d_out else "materialize"
    if method == "implicit":
        product = (rows_a @ xp.matrix_transpose(rows_a)) * (rows_e @ xp.matrix_transpose(rows_e))
        if positions == 1:
            return product, None
        blocks = xp.reshape(product, (batch, positions, batch, positions))
        return xp.sum(blocks, axis=(1, 3)), None
    if method == "materialize":
        a3 = xp.reshape(rows_a, (batch, positions, d_in))
        e3 = xp.reshape(rows_e, (batch, positions, d_out))
        explicit = xp.reshape(xp.matrix_transpose(e3) @ a3, (batch, d_out * d_in))
        return explicit @ xp.matrix_transpose(explicit), explicit
    raise ValueError(f"method must be 'auto', 'implicit' or 'materialize'; got {method!r}")


def _gram_and_explicit(
    xp: Any, flat: list, batch: int, method: str
) -> tuple[Array, tuple[Array | None, ...]]:
    total, explicit = None, []
    for rows_a, rows_e, positions in flat:
        layer, per_example_rows = _layer_gram(xp, rows_a, rows_e, positions, batch, method)
        explicit.append(per_example_rows)
        total = layer if total is None else total + layer
    return (total + xp.matrix_transpose(total)) / 2, tuple(explicit)


def gram(
    captures: Captures, *, method: str = "auto", check_finite: bool = True, mask: Any = None
) -> Array:
    r"""The ``B×B`` Gram matrix ``GᵀG``: entries ``Σ_layers ⟨g_i, g_j⟩``.

    For captures ``(B, d)`` it is ``Σ_layers (a aᵀ) ⊙ (e eᵀ)``. With positions ``(B, T, d)``
    it is ``Σ_layers Σ_{t,s} (a_it·a_js)(e_it·e_js)``, exact. Per layer, ``method="auto"``
    picks the cheaper of the implicit contraction (``T²(d_in + d_out)`` per pair of examples)
    and materialising the per-example gradients (``d_in·d_out`` per pair); ``"implicit"`` and
    ``"materialize"`` force one. With ``mask`` (module docstring) the entries are
    ``Σ_layers Σ_{t,s} w_it w_js (a_it·a_js)(e_it·e_js)``: fully masked examples give zero
    rows and columns.
    """
    xp, flat, batch = _layers(captures, check_finite=check_finite, mask=mask)
    return _gram_and_explicit(xp, flat, batch, method)[0]


def cross_gram(
    captures: Captures,
    other: Captures,
    *,
    check_finite: bool = True,
    mask: Any = None,
    other_mask: Any = None,
) -> Array:
    r"""``GᵀH``: the ``(B, B')`` Gram between the per-example gradients of two capture sets of
    the same layers, entries ``Σ_layers ⟨g_i, h_j⟩ = Σ_layers Σ_{t,s} (a_it·a'_js)(e_it·e'_js)``.

    :func:`gram` is its ``other = captures`` case. With ``other`` the captures of a batch whose
    mean gradient is ``u = H c``, ``Gᵀu = cross_gram(captures, other) @ c`` costs
    ``B·B'·T²·(d_in + d_out)`` per layer instead of the ``B·T·d_in·d_out`` of forming ``u`` and
    calling :func:`rmatvec` — the cheaper choice whenever ``B'·T·(d_in + d_out) < d_in·d_out``
    (a Fisher from an independent batch, Benzing 2022, App. E.5).

    ``mask`` masks ``captures`` and ``other_mask`` masks ``other`` (module docstring):
    ``Σ_layers Σ_{t,s} w_it w'_js (a_it·a'_js)(e_it·e'_js)``.
    """
    xp, flat, batch = _layers(captures, check_finite=check_finite, mask=mask)
    xp_other, flat_other, batch_other = _layers(
        other, check_finite=check_finite, name="other", mask=other_mask, mask_name="other_mask"
    )
    _backend.namespace(("captures", flat[0][0]), ("other", flat_other[0][0]))
    _checks.same_dtype([("captures", flat[0][0]), ("other", flat_other[0][0])])
    if len(flat) != len(flat_other):
        raise ValueError(
            f"other must hold the same layers as captures ({len(flat)}); got {len(flat_other)}"
        )
    total = None
    for index, ((rows_a, rows_e, positions), (other_a, other_e, other_positions)) in enumerate(
        zip(flat, flat_other)
    ):
        if (rows_a.shape[1], rows_e.shape[1]) != (other_a.shape[1], other_e.shape[1]):
            raise ValueError(
                f"shape mismatch: layer {index} has (d_in, d_out) = "
                f"{(int(rows_a.shape[1]), int(rows_e.shape[1]))} in captures but "
                f"{(int(other_a.shape[1]), int(other_e.shape[1]))} in other"
            )
        product = _layer_cross_gram(
            xp, (rows_a, rows_e, positions), (other_a, other_e, other_positions)
        )
        total = product if total is None else total + product
    return total


def _layer_cross_gram(xp: Any, layer: tuple, other: tuple) -> Array:
    """One layer's ``Σ_{t,s} (a_it·a'_js)(e_it·e'_js)`` from flattened rows ``(a2, e2, T)``
    (``B·T`` rows each), without per-example gradients: ``(B, B')``."""
    rows_a, rows_e, positions = layer
    other_a, other_e, other_positions = other
    product = (rows_a @ xp.matrix_transpose(other_a)) * (rows_e @ xp.matrix_transpose(other_e))
    if positions > 1 or other_positions > 1:
        batch = int(rows_a.shape[0]) // positions
        batch_other = int(other_a.shape[0]) // other_positions
        blocks = xp.reshape(product, (batch, positions, batch_other, other_positions))
        product = xp.sum(blocks, axis=(1, 3))
    return product


def rmatvec(
    captures: Captures, vectors: Sequence[Array], *, check_finite: bool = True, mask: Any = None
) -> Array:
    r"""``Gᵀu``: entries ``Σ_layers ⟨g_i, u_layer⟩ = Σ_layers Σ_t e_itᵀ u_layer a_it``.

    ``vectors``: one ``(d_out, d_in)`` array per layer, or ``(K, d_out, d_in)`` for ``K``
    right-hand sides at once. Returns ``(B,)`` (or ``(K, B)``). Costs ``B·T·d_out·d_in`` per
    layer and right-hand side; no per-example gradient is formed. With ``mask`` (module
    docstring) the entries are ``Σ_layers Σ_t w_it e_itᵀ u_layer a_it``.
    """
    xp, flat, batch = _layers(captures, check_finite=check_finite, mask=mask)
    vectors = _vectors(xp, flat, vectors, "vectors")
    if check_finite:
        for index, vector in enumerate(vectors):
            _checks.finite(xp, f"vectors[{index}]", vector)
    for vector in vectors:
        _checks.same_dtype([("captures", flat[0][0]), ("vectors", vector)])
    return _rmatvec(xp, flat, batch, vectors, ())


def _rmatvec(xp: Any, flat: list, batch: int, vectors: Sequence[Array], explicit: tuple) -> Array:
    total = None
    for index, ((rows_a, rows_e, positions), vector) in enumerate(zip(flat, vectors)):
        per_example_rows = explicit[index] if explicit else None
        if per_example_rows is not None:
            lead = tuple(vector.shape[:-2])
            flat_vector = xp.reshape(vector, lead + (int(per_example_rows.shape[1]),))
            per_example_sum = flat_vector @ xp.matrix_transpose(per_example_rows)  # (..., B)
        else:
            per_row = xp.sum((rows_e @ vector) * rows_a, axis=-1)  # (..., B·T)
            lead = tuple(per_row.shape[:-1])
            per_example_sum = xp.sum(xp.reshape(per_row, lead + (batch, positions)), axis=-1)
        total = per_example_sum if total is None else total + per_example_sum
    return total


def matvec(
    captures: Captures, w: Array, *, check_finite: bool = True, mask: Any = None
) -> list[Array]:
    r"""``Gw = Σ_i w_i g_i`` per layer: ``Σ_{i,t} w_i e_itᵀ a_it``.

    ``w``: ``(B,)`` or ``(K, B)``. Returns one ``(d_out, d_in)`` (or ``(K, d_out, d_in)``)
    array per layer, without forming per-example gradients. With ``mask`` (module
    docstring, weights ``m_it``) it is ``Σ_{i,t} w_i m_it e_itᵀ a_it``.
    """
    xp, flat, batch = _layers(captures, check_finite=check_finite, mask=mask)
    _backend.namespace(("captures", flat[0][0]), ("w", w))
    _checks.same_dtype([("captures", flat[0][0]), ("w", w)])
    if w.ndim not in (1, 2) or int(w.shape[-1]) != batch:
        raise ValueError(f"shape mismatch: w has shape {tuple(w.shape)} but the batch is {batch}")
    if check_finite:
        _checks.finite(xp, "w", w)
    return _matvec(xp, flat, batch, w, ())


def _matvec(xp: Any, flat: list, batch: int, w: Array, explicit: tuple) -> list[Array]:
    result = []
    lead = tuple(w.shape[:-1])
    for index, (rows_a, rows_e, positions) in enumerate(flat):
        per_example_rows = explicit[index] if explicit else None
        if per_example_rows is not None:
            shape = lead + (int(rows_e.shape[1]), int(rows_a.shape[1]))
            result.append(xp.reshape(w @ per_example_rows, shape))
            continue
        row_weights = xp.reshape(
            xp.broadcast_to(w[..., None], lead + (batch, positions)), lead + (batch * positions,)
        )
        weighted = rows_e * row_weights[..., None]  # (..., B·T, d_out)
        result.append(xp.matrix_transpose(weighted) @ rows_a)
    return result


def _cholesky_solve(xp: Any, lower: Array, rhs: Array) -> Array:
    """``(L Lᵀ)⁻¹ r`` for ``rhs`` of shape ``(B,)`` or ``(K, B)``."""
    columns = rhs[:, None] if rhs.ndim == 1 else xp.matrix_transpose(rhs)
    half = _backend.solve_triangular(xp, lower, columns, lower=True)
    solved = _backend.solve_triangular(xp, lower, half, lower=True, transpose=True)
    return solved[:, 0] if rhs.ndim == 1 else xp.matrix_transpose(solved)


def factorize(
    captures: Captures,
    damping: float | Array,
    scale: float | Array = 1.0,
    *,
    check_finite: bool = True,
    mask: Any = None,
) -> Woodbury:
    r"""Factorise ``damping·I + scale·G Gᵀ`` for repeated solves (:func:`solve`).

    Forms the Gram ``GᵀG`` and the Cholesky factor of ``I + (scale/damping)·GᵀG`` (``B×B``,
    symmetric positive definite for ``damping > 0``, ``scale ≥ 0``). For the damped
    subsampled Fisher ``λI + F`` of a batch, ``scale = 1/B``. The captures must be float32 or
    float64 (the factorisation has no half-precision kernels; cast them up first).

    ``mask`` (module docstring): ``G`` is the masked one, and the mask is kept in the result
    (:attr:`Woodbury.mask`) for :func:`solve` and :func:`solve_span`. For the masked Fisher
    use ``scale = 1/B_eff`` (:func:`curvlinalg.kron.example_count`); fully masked examples
    are zero columns of ``G`` and change nothing.
    """
    _checks.scalar("damping", damping, minimum=0.0, strict=True)
    _checks.scalar("scale", scale, minimum=0.0)
    xp, flat, batch = _layers(captures, check_finite=check_finite, mask=mask)
    like = flat[0][0]
    _checks.linalg_dtype(xp, "captures[0][0] (a)", like)
    _backend.namespace(("captures", like), ("damping", damping), ("scale", scale))
    damping, scale = _backend.scalar_like(xp, damping, like), _backend.scalar_like(xp, scale, like)
    kernel, explicit = _gram_and_explicit(xp, flat, batch, "auto")
    system = _backend.eye_like(xp, batch, kernel) + kernel * (scale / damping)
    lower, ok = _backend.cholesky(xp, system)
    if ok is False:
        raise _checks.NotPositiveDefiniteError(
            "I + (scale/damping)·GᵀG is not positive definite; check the captures' scale"
        )
    stored_mask = _masks.stored(_masks.per_layer(mask, len(captures), "mask"))
    return Woodbury(
        tuple((a, e) for a, e in captures), damping, scale, lower, explicit, stored_mask
    )


def _factorized(woodbury: Any) -> tuple[Any, list, int]:
    """Validate a :class:`Woodbury` argument; return its namespace, flattened captures and B."""
    if not isinstance(woodbury, Woodbury):
        raise ValueError(f"woodbury must be a Woodbury from factorize(); got {type(woodbury)}")
    stored_mask = woodbury.mask if len(woodbury.mask) else None
    xp, flat, batch = _layers(
        woodbury.captures,
        check_finite=False,
        name="woodbury.captures",
        mask=stored_mask,
        mask_name="woodbury.mask",
    )
    _checks.linalg_dtype(xp, "woodbury.captures[0][0] (a)", flat[0][0])
    lower = woodbury.lower
    if not hasattr(lower, "shape") or tuple(lower.shape) != (batch, batch):
        shape = tuple(lower.shape) if hasattr(lower, "shape") else type(lower).__name__
        raise ValueError(f"woodbury.lower must be ({batch}, {batch}) (B×B); got {shape}")
    return xp, flat, batch


def solve(
    woodbury: Woodbury, vectors: Sequence[Array], *, check_finite: bool = True
) -> list[Array]:
    r"""``(damping·I + scale·G Gᵀ)⁻¹ u`` for ``u`` given per layer.

    ``= u/λ − (s/λ²)·G (I + (s/λ)GᵀG)⁻¹ Gᵀu``. ``vectors``: one ``(d_out, d_in)`` array per
    layer (or ``(K, d_out, d_in)`` for ``K`` right-hand sides). Returns the same shapes.
    The natural gradient of a batch is ``solve(factorize(captures, λ, 1/B), gradients)``.

    Accuracy: the formula cancels ``u/λ`` against a correction of size up to
    ``(s‖G‖²/λ)·‖u‖/λ``; where ``u`` lies (nearly) in the span of the per-example gradients
    and ``s‖G‖²/λ`` is large, digits are lost (2 % relative error in float32 at
    ``s‖G‖²/λ ≈ 10⁵``). For the batch's own gradient, ``u = G·(1/B)``, use
    :func:`solve_span`, which has no such cancellation; ``solve`` is for gradients of an
    independent batch. A masked factorisation (``factorize(..., mask=)``) solves with its
    masked ``G``.
    """
    xp, flat, batch = _factorized(woodbury)
    vectors = _vectors(xp, flat, vectors, "vectors")
    if vectors[0].ndim > 3:
        raise ValueError(
            f"vectors[0] has shape {tuple(vectors[0].shape)}; solve takes (d_out, d_in) or "
            "(K, d_out, d_in) per layer"
        )
    if check_finite:
        for index, vector in enumerate(vectors):
            _checks.finite(xp, f"vectors[{index}]", vector)
    damping, scale = woodbury.damping, woodbury.scale
    for vector in vectors:
        _checks.same_dtype([("captures", flat[0][0]), ("vectors", vector)])
    projected = _rmatvec(xp, flat, batch, vectors, woodbury.explicit)
    # The scalar −s/λ² goes into the B-vector, not into the D-sized correction: one full-size
    # pass (and temporary) fewer.
    weights = _cholesky_solve(xp, woodbury.lower, projected) * (-scale / damping**2)
    correction = _matvec(xp, flat, batch, weights, woodbury.explicit)
    return [u / damping + c for u, c in zip(vectors, correction)]


def solve_span(
    woodbury: Woodbury, coefficients: Array, *, check_finite: bool = True
) -> list[Array]:
    r"""``(damping·I + scale·G Gᵀ)⁻¹ G c`` for a right-hand side in the span of the
    per-example gradients, ``u = G c``, by the push-through identity

        (λI + s·G Gᵀ)⁻¹ G c = G (λI + s·GᵀG)⁻¹ c = G [(I + (s/λ)·GᵀG)⁻¹ c / λ].

    The batch's own mean gradient is ``G c`` with ``c = 1/B`` (``coefficients`` filled with
    ``1/B``), so the natural gradient of the batch that built the Fisher costs the Gram, a
    ``B×B`` Cholesky solve and one :func:`matvec`: no ``Gᵀu`` pass over the parameters and no
    parameter-sized temporaries. ``coefficients``: ``(B,)`` or ``(K, B)``; returns one
    ``(d_out, d_in)`` (or ``(K, d_out, d_in)``) array per layer, like :func:`solve`. ``G`` is
    the factorisation's masked one when it has a mask; the masked batch's mean gradient is
    ``G c`` with ``c = 1/B_eff``.
    """
    xp, flat, batch = _factorized(woodbury)
    _backend.namespace(("captures", flat[0][0]), ("coefficients", coefficients))
    _checks.floating(xp, "coefficients", coefficients)
    _checks.same_dtype([("captures", flat[0][0]), ("coefficients", coefficients)])
    if coefficients.ndim not in (1, 2) or int(coefficients.shape[-1]) != batch:
        raise ValueError(
            f"shape mismatch: coefficients has shape {tuple(coefficients.shape)} but the "
            f"batch is {batch} (expected (B,) or (K, B))"
        )
    if check_finite:
        _checks.finite(xp, "coefficients", coefficients)
    weights = _cholesky_solve(xp, woodbury.lower, coefficients) / woodbury.damping
    return _matvec(xp, flat, batch, weights, woodbury.explicit)


def logdet(woodbury: Woodbury) -> Array:
    r"""``log det(damping·I + scale·G Gᵀ)`` by the matrix determinant lemma:
    ``D·log(damping) + log det(I + (scale/damping)·GᵀG)``, ``D`` the number of parameters."""
    xp, flat, _ = _factorized(woodbury)
    count = sum(int(a.shape[1]) * int(e.shape[1]) for a, e, _ in flat)
    diagonal = xp.linalg.diagonal(woodbury.lower)
    damping = woodbury.damping
    log_damping = math.log(damping) if isinstance(damping, (int, float)) else xp.log(damping)
    return count * log_damping + 2 * xp.sum(xp.log(diagonal))


def factorize_layers(
    captures: Captures,
    damping: float | Array,
    scale: float | Array = 1.0,
    *,
    check_finite: bool = True,
    mask: Any = None,
) -> list[Woodbury]:
    r"""Layer-wise (block-diagonal) version of :func:`factorize`: one :class:`Woodbury` per
    layer, representing ``damping·I + scale·G_l G_lᵀ`` — the matrix with the cross-layer
    blocks of ``G Gᵀ`` set to zero. ``mask`` as for :func:`factorize` (one array for every
    layer, or one entry per layer); each result keeps its layer's mask."""
    xp, flat, _ = _layers(captures, check_finite=check_finite, mask=mask)
    _checks.linalg_dtype(xp, "captures[0][0] (a)", flat[0][0])
    layer_masks = _masks.per_layer(mask, len(captures), "mask")
    return [
        factorize([pair], damping, scale, check_finite=False, mask=[layer_mask])
        for pair, (_, layer_mask) in zip(captures, layer_masks)
    ]


def solve_layers(
    woodburys: Sequence[Woodbury], vectors: Sequence[Array], *, check_finite: bool = True
) -> list[Array]:
    """Solve with the block-diagonal matrix of :func:`factorize_layers`, layer by layer
    (each with the mask its :class:`Woodbury` keeps)."""
    if not isinstance(vectors, (list, tuple)) or len(vectors) != len(woodburys):
        raise ValueError(f"vectors must hold one array per layer ({len(woodburys)})")
    return [solve(w, [u], check_finite=check_finite)[0] for w, u in zip(woodburys, vectors)]
