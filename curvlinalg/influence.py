r"""Influence scores between examples with K-FAC and EK-FAC curvature, from layer captures.

The influence of a training example ``t`` on a query example ``q`` (Koh & Liang 2017, with
the Kronecker-factored curvature of Grosse et al. 2023) is

    s_qt = Σ_layers ⟨P_l⁻¹ g^q_l, g^t_l⟩,

``g^q_l = Σ_t e_qtᵀ a_qt`` and ``g^t_l`` the per-example gradients of layer ``l``
(``d_out×d_in``, captures as in DESIGN.md) and ``P_l`` that layer's damped curvature:

* K-FAC: ``P_l⁻¹ = A_l⁻¹ ⊗ G_l⁻¹`` from damped factor inverses ``(a_inv, g_inv)``
  (:func:`curvlinalg.kron.split_damping` and :func:`curvlinalg.kron.inverse`), so
  ``⟨P⁻¹ g^q, g^t⟩ = Σ_{t,s} (a_q,t A⁻¹ a_t,sᵀ)(e_q,t G⁻¹ e_t,sᵀ)`` — a cross-Gram of the
  preconditioned query captures with the training captures.
* EK-FAC: ``P_l⁻¹ = (Q diag(S) Qᵀ + λI)⁻¹`` with ``Q = U_A ⊗ U_G`` and ``S`` from
  :func:`curvlinalg.kron.eigen_correction`; with the rotated captures ``Ã = a U_A``,
  ``Ẽ = e U_G`` and ``W = 1/(S + λ)`` (elementwise),
  ``⟨P⁻¹ g^q, g^t⟩ = Σ_{o,j} W_oj R^q_oj R^t_oj`` where ``R = Ẽᵀ Ã`` is the rotated
  per-example gradient, ``= Σ_{t,s} (Ẽ_q,t ∘ Ẽ_t,s) W (Ã_q,t ∘ Ã_t,s)ᵀ``.

Per layer, ``method="auto"`` picks the cheaper of two exact evaluations by a static cost
model (multiply-adds, plus the memory traffic of materialised gradients):

* ``"pairs"``: contract over pairs of positions without forming a per-example gradient
  (``T_q·T_t·(d_in + d_out)`` per pair of examples for K-FAC, ``T_q·T_t·d_in·d_out`` for
  EK-FAC) — always chosen for ``(B, d)`` captures of wide layers;
* ``"explicit"``: form the (preconditioned) per-example gradients of a tile of examples and
  multiply them (``(B_q·T_q + B_t·T_t + B_q·B_t)·d_in·d_out``), for many positions.

Work proceeds in tiles of examples whose temporaries are bounded, so memory does not grow
with the batch sizes beyond the ``(B_q, B_t)`` result. The self-influence ``s_ii``
(:func:`kfac_self_scores`, :func:`ekfac_self_scores`) is the diagonal for ``query is train``,
computed without the full matrix.

Conventions: captures hold each example's own loss gradient (no ``1/B``); the bias column
is part of ``a`` (as for :func:`curvlinalg.kron.factor`); scores are plain inner products
(no sign flip, no learning-rate factor).

Masks (padding): ``query_mask=`` and ``train_mask=`` (``mask=`` for the self-scores) mask
the captures as in :mod:`curvlinalg.woodbury` — ``None``, one array for every layer, or one
entry per layer, of the layers' leading shapes ``(B,)`` or ``(B, T)``, boolean or weights
``w ≥ 0`` — so that ``g_l = Σ_t w_lt e_ltᵀ a_lt``: positions of weight zero contribute
nothing, and a fully masked example scores 0 against everything.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from . import _backend, _checks, woodbury
from .kron import (
    _CHUNK_ELEMENTS,
    _MATERIALIZE_WEIGHT,
    _PAIRS_SPEEDUP,
    _check_eigh,
    _chunks,
    _position_pairs,
    _positive_denominator,
)

Array = Any
Captures = Sequence[tuple[Array, Array]]

__all__ = ["kfac_scores", "ekfac_scores", "kfac_self_scores", "ekfac_self_scores"]


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


def _query_and_train(
    query: Captures,
    train: Captures,
    check_finite: bool,
    query_mask: Any = None,
    train_mask: Any = None,
) -> tuple:
    xp, flat_q, batch_q = woodbury._layers(
        query, check_finite=check_finite, name="query", mask=query_mask, mask_name="query_mask"
    )
    _, flat_t, batch_t = woodbury._layers(
        train, check_finite=check_finite, name="train", mask=train_mask, mask_name="train_mask"
    )
    _backend.namespace(("query", flat_q[0][0]), ("train", flat_t[0][0]))
    _checks.same_dtype([("query", flat_q[0][0]), ("train", flat_t[0][0])])
    if len(flat_t) != len(flat_q):
        raise ValueError(
            f"train must hold the same layers as query ({len(flat_q)}); got {len(flat_t)}"
        )
    for index, ((q_a, q_e, _), (t_a, t_e, _)) in enumerate(zip(flat_q, flat_t)):
        q_widths = (int(q_a.shape[1]), int(q_e.shape[1]))
        t_widths = (int(t_a.shape[1]), int(t_e.shape[1]))
        if q_widths != t_widths:
            raise ValueError(
                f"shape mismatch: layer {index} has (d_in, d_out) = {q_widths} in query but "
                f"{t_widths} in train"
            )
    return xp, flat_q, batch_q, flat_t, batch_t


def _layer_count(name: str, values: Any, count: int, what: str) -> None:
    if not isinstance(values, (list, tuple)) or len(values) != count:
        got = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
        raise ValueError(
            f"{name} must be a sequence of {count} {what}, one per layer of the captures; got {got}"
        )


def _inverses(
    xp: Any, flat: list, inverses: Any, check_finite: bool, captures_name: str
) -> list[tuple[Array, Array]]:
    """Validated per-layer ``(a_inv, g_inv)``."""
    _layer_count("inverses", inverses, len(flat), "(a_inv, g_inv) pairs")
    like = flat[0][0]
    result = []
    for index, (pair, (rows_a, rows_e, _)) in enumerate(zip(inverses, flat)):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(f"inverses[{index}] must be an (a_inv, g_inv) pair")
        a_inv, g_inv = pair
        name_a, name_g = f"inverses[{index}][0] (a_inv)", f"inverses[{index}][1] (g_inv)"
        _backend.namespace((captures_name, like), (name_a, a_inv), (name_g, g_inv))
        _checks.matching(
            name_a, _checks.square(name_a, a_inv), "the layer's d_in", int(rows_a.shape[1]), "size"
        )
        _checks.matching(
            name_g, _checks.square(name_g, g_inv), "the layer's d_out", int(rows_e.shape[1]), "size"
        )
        _checks.same_dtype([(captures_name, like), (name_a, a_inv), (name_g, g_inv)])
        if check_finite:
            _checks.finite(xp, name_a, a_inv)
            _checks.finite(xp, name_g, g_inv)
        result.append((a_inv, g_inv))
    return result


def _eigens(
    xp: Any, flat: list, eigens: Any, check_finite: bool, captures_name: str
) -> list[tuple[Array, Array, Array]]:
    """Validated per-layer ``(U_A, U_G, W = 1/(S + λ))``."""
    _layer_count("eigens", eigens, len(flat), "(a_eigh, g_eigh, correction, damping) tuples")
    like = flat[0][0]
    result = []
    for index, (item, (rows_a, rows_e, _)) in enumerate(zip(eigens, flat)):
        where = f"eigens[{index}]"
        if not isinstance(item, (list, tuple)) or len(item) != 4:
            raise ValueError(f"{where} must be an (a_eigh, g_eigh, correction, damping) tuple")
        a_eigh, g_eigh, correction, damping = item
        d_in, d_out = int(rows_a.shape[1]), int(rows_e.shape[1])
        _check_eigh(f"{where} (a_eigh)", a_eigh, d_in, "the layer's d_in")
        _check_eigh(f"{where} (g_eigh)", g_eigh, d_out, "the layer's d_out")
        named = [
            (captures_name, like),
            (f"{where} (a_eigh)", a_eigh[1]),
            (f"{where} (g_eigh)", g_eigh[1]),
            (f"{where} (correction)", correction),
        ]
        _backend.namespace(*named, (f"{where} (damping)", damping))
        if tuple(correction.shape) != (d_out, d_in):
            raise ValueError(
                f"shape mismatch: {where} (correction) has shape {tuple(correction.shape)} but "
                f"the layer needs (d_out, d_in) = {(d_out, d_in)}"
            )
        _checks.same_dtype(named)
        _checks.scalar(f"{where} (damping)", damping, minimum=0.0)
        if check_finite:
            _checks.finite(xp, f"{where} (correction)", correction)
        denominator = correction + _backend.scalar_like(xp, damping, correction)
        _positive_denominator(
            xp,
            denominator,
            f"{where}: Q diag(correction) Qᵀ + damping·I (some correction + damping ≤ 0)",
        )
        result.append((a_eigh[1], g_eigh[1], 1 / denominator))
    return result


# --------------------------------------------------------------------------------------
# Cost model and tiling
# --------------------------------------------------------------------------------------


def _method(method: str, pairs: int, explicit: int) -> str:
    if method == "auto":
        return "pairs" if pairs <= explicit else "explicit"
    if method in ("pairs", "explicit"):
        return method
    raise ValueError(f"method must be 'auto', 'pairs' or 'explicit'; got {method!r}")


def _cross_method(
    method: str,
    layer_q: tuple,
    layer_t: tuple,
    batch_q: int,
    batch_t: int,
    pair_cost: int,
    speedup: int = 1,
) -> str:
    """Per layer: ``pair_cost`` multiply-adds per pair of positions, each ``speedup`` times
    cheaper, against forming the per-example gradients (``T`` rank-one terms each, plus their
    memory traffic) and multiplying them."""
    positions_q, positions_t = layer_q[2], layer_t[2]
    size = int(layer_q[0].shape[1]) * int(layer_q[1].shape[1])
    pairs = batch_q * batch_t * positions_q * positions_t * pair_cost
    explicit = size * (
        batch_q * (positions_q + _MATERIALIZE_WEIGHT)
        + batch_t * (positions_t + _MATERIALIZE_WEIGHT)
        + batch_q * batch_t
    )
    return _method(method, pairs, speedup * explicit)


def _tiled(
    xp: Any,
    batch_q: int,
    batch_t: int,
    per_query: int,
    per_train: int,
    per_pair: int,
    prepare_query: Callable[[int, int], Any],
    prepare_train: Callable[[int, int], Any],
    combine: Callable[[Any, Any], Array],
) -> Array:
    """The ``(B_q, B_t)`` block matrix ``combine(prepare_query(q), prepare_train(t))`` over
    tiles of examples whose temporaries (``per_query``, ``per_train`` elements per example,
    ``per_pair`` per pair) fit in the chunk budget."""
    budget = _CHUNK_ELEMENTS
    tile_q = min(batch_q, max(1, (budget // 2) // max(per_query + per_pair, 1)))
    room = max(budget - tile_q * per_query, 0)
    tile_t = min(batch_t, max(1, room // max(per_train + tile_q * per_pair, 1)))
    rows = []
    for q_start in range(0, batch_q, tile_q):
        prepared = prepare_query(q_start, min(q_start + tile_q, batch_q))
        blocks = [
            combine(prepared, prepare_train(t_start, min(t_start + tile_t, batch_t)))
            for t_start in range(0, batch_t, tile_t)
        ]
        rows.append(blocks[0] if len(blocks) == 1 else xp.concat(blocks, axis=1))
    return rows[0] if len(rows) == 1 else xp.concat(rows, axis=0)


def _examples(xp: Any, layer: tuple, batch: int) -> tuple[Array, Array]:
    """Flattened rows ``(a2, e2, T)`` back to ``(B, T, d_in)``, ``(B, T, d_out)``."""
    rows_a, rows_e, positions = layer
    return (
        xp.reshape(rows_a, (batch, positions, int(rows_a.shape[1]))),
        xp.reshape(rows_e, (batch, positions, int(rows_e.shape[1]))),
    )


def _slicer(pair3: tuple[Array, Array]) -> Callable[[int, int], tuple[Array, Array]]:
    """``(start, stop) ↦`` the examples ``start:stop`` of ``(a3, e3)``."""
    return lambda start, stop: (pair3[0][start:stop, ...], pair3[1][start:stop, ...])


def _rows(xp: Any, pair3: tuple[Array, Array]) -> tuple[Array, Array, int]:
    """``(b, T, d_in)``, ``(b, T, d_out)`` → flattened rows ``(a2, e2, T)``."""
    a3, e3 = pair3
    rows, positions = int(a3.shape[0]) * int(a3.shape[1]), int(a3.shape[1])
    return (
        xp.reshape(a3, (rows, int(a3.shape[2]))),
        xp.reshape(e3, (rows, int(e3.shape[2]))),
        positions,
    )


def _ekfac_pair_block(
    xp: Any, weights: Array, query3: tuple[Array, Array], train3: tuple[Array, Array]
) -> Array:
    """``Σ_{t,s} (Ẽ_q,t ∘ Ẽ_t,s) W (Ã_q,t ∘ Ã_t,s)ᵀ`` for rotated examples, ``(b_q, b_t)``."""
    q_a, q_e, positions_q = _rows(xp, query3)
    t_a, t_e, positions_t = _rows(xp, train3)
    pairs = int(q_a.shape[0]) * int(t_a.shape[0])
    products_e = xp.reshape(q_e[:, None, :] * t_e[None, :, :], (pairs, int(q_e.shape[1])))
    products_a = xp.reshape(q_a[:, None, :] * t_a[None, :, :], (pairs, int(q_a.shape[1])))
    per_pair = xp.sum((products_e @ weights) * products_a, axis=-1)
    count_q, count_t = int(query3[0].shape[0]), int(train3[0].shape[0])
    blocks = xp.reshape(per_pair, (count_q, positions_q, count_t, positions_t))
    return xp.sum(blocks, axis=(1, 3))


def _flat_gradients(
    xp: Any,
    a3: Array,
    e3: Array,
    weights: Array | None = None,
    basis: tuple[Array, Array] | None = None,
) -> Array:
    """Per-example gradients ``R_i = Σ_t e_itᵀ a_it`` (``W ∘ R_i`` with ``weights``, then
    ``U_G (W ∘ R_i) U_Aᵀ`` with ``basis = (U_A, U_G)``), flattened to ``(b, d_out·d_in)``."""
    gradients = xp.matrix_transpose(e3) @ a3
    if weights is not None:
        gradients = gradients * weights
    if basis is not None:
        gradients = basis[1] @ gradients @ xp.matrix_transpose(basis[0])
    count = int(gradients.shape[0])
    return xp.reshape(gradients, (count, int(gradients.shape[1]) * int(gradients.shape[2])))


def _explicit_scores(
    xp: Any,
    query3: tuple[Array, Array],
    train3: tuple[Array, Array],
    batch_q: int,
    batch_t: int,
    weights: Array | None,
    basis: tuple[Array, Array] | None = None,
) -> Array:
    """``Σ_{o,j} (W ∘ R^q)_oj R^t_oj`` with ``R = Σ_t e_tᵀ a_t`` formed tile by tile (the
    query side rotated back by ``basis`` first, when given)."""
    size = int(query3[0].shape[2]) * int(query3[1].shape[2])

    def prepare_query(start: int, stop: int) -> Array:
        return _flat_gradients(
            xp, query3[0][start:stop, ...], query3[1][start:stop, ...], weights, basis
        )

    def prepare_train(start: int, stop: int) -> Array:
        return _flat_gradients(xp, train3[0][start:stop, ...], train3[1][start:stop, ...])

    return _tiled(
        xp,
        batch_q,
        batch_t,
        size,
        size,
        1,
        prepare_query,
        prepare_train,
        lambda q, t: q @ xp.matrix_transpose(t),
    )


# --------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------


def kfac_scores(
    query: Captures,
    train: Captures,
    inverses: Sequence[tuple[Array, Array]],
    *,
    method: str = "auto",
    check_finite: bool = True,
    query_mask: Any = None,
    train_mask: Any = None,
) -> Array:
    r"""K-FAC influence scores ``s_qt = Σ_l ⟨(A_l⁻¹ ⊗ G_l⁻¹) g^q_l, g^t_l⟩``, ``(B_q, B_t)``.

    Per layer ``⟨G⁻¹ g^q A⁻¹, g^t⟩ = Σ_{t,s} (a_q,t A⁻¹ a_t,sᵀ)(e_q,t G⁻¹ e_t,sᵀ)``: the
    query captures are preconditioned once (``a_q A⁻¹``, ``e_q G⁻¹``) and contracted with the
    training captures as in :func:`curvlinalg.woodbury.cross_gram` — for ``(B, d)`` captures
    the elementwise product of two cross-Grams, ``B_q·B_t·(d_in + d_out)`` multiply-adds and
    no per-example gradient. For ``(B, T, d)`` captures ``method="auto"`` picks per layer
    between that position-pair contraction (``"pairs"``) and forming the preconditioned
    per-example gradients in tiles (``"explicit"``), see the module docstring.

    ``query``, ``train``: sequences of per-layer ``(a, e)`` captures of the same layers
    (``B_q`` and ``B_t`` examples; the numbers of positions may differ). ``inverses``: per
    layer ``(a_inv, g_inv)``, symmetric ``(d_in, d_in)`` and ``(d_out, d_out)`` damped
    inverses. With identity inverses the scores are ``woodbury.cross_gram(query, train)``.
    ``query_mask``, ``train_mask``: masks of ``query`` and ``train`` (module docstring).
    """
    xp, flat_q, batch_q, flat_t, batch_t = _query_and_train(
        query, train, check_finite, query_mask, train_mask
    )
    preconditioners = _inverses(xp, flat_q, inverses, check_finite, "query")
    total = None
    for layer_q, layer_t, (a_inv, g_inv) in zip(flat_q, flat_t, preconditioners):
        rows_a, rows_e, positions_q = layer_q
        d_in, d_out = int(rows_a.shape[1]), int(rows_e.shape[1])
        preconditioned = (rows_a @ a_inv, rows_e @ g_inv, positions_q)
        chosen = _cross_method(method, layer_q, layer_t, batch_q, batch_t, d_in + d_out)
        if chosen == "pairs":
            positions_t = layer_t[2]
            query3 = _examples(xp, preconditioned, batch_q)
            train3 = _examples(xp, layer_t, batch_t)

            part = _tiled(
                xp,
                batch_q,
                batch_t,
                positions_q * (d_in + d_out),
                positions_t * (d_in + d_out),
                2 * positions_q * positions_t,
                _slicer(query3),
                _slicer(train3),
                lambda q, t: woodbury._layer_cross_gram(xp, _rows(xp, q), _rows(xp, t)),
            )
        else:
            part = _explicit_scores(
                xp,
                _examples(xp, preconditioned, batch_q),
                _examples(xp, layer_t, batch_t),
                batch_q,
                batch_t,
                None,
            )
        total = part if total is None else total + part
    return total


def _rotated(xp: Any, layer: tuple, batch: int, a_vectors: Array, g_vectors: Array) -> tuple:
    a3, e3 = _examples(xp, layer, batch)
    return a3 @ a_vectors, e3 @ g_vectors


def ekfac_scores(
    query: Captures,
    train: Captures,
    eigens: Sequence[tuple[Any, Any, Array, float | Array]],
    *,
    method: str = "auto",
    check_finite: bool = True,
    query_mask: Any = None,
    train_mask: Any = None,
) -> Array:
    r"""EK-FAC influence scores ``s_qt = Σ_l ⟨(Q_l diag(S_l) Q_lᵀ + λ_l I)⁻¹ g^q_l, g^t_l⟩``,
    ``(B_q, B_t)``, with ``Q_l = U_A ⊗ U_G``.

    Both capture sets are rotated once into the eigenbasis (``Ã = a U_A``, ``Ẽ = e U_G``);
    with ``W = 1/(S + λ)`` the layer's score is ``Σ_{o,j} W_oj R^q_oj R^t_oj`` for the
    rotated per-example gradients ``R = Ẽᵀ Ã``, evaluated either over position pairs,
    ``Σ_{t,s} (Ẽ_q,t ∘ Ẽ_t,s) W (Ã_q,t ∘ Ã_t,s)ᵀ`` (``"pairs"``, ``T_q·T_t·d_in·d_out`` per
    pair of examples, no per-example gradient; chosen for ``(B, d)`` captures), or by forming
    ``W ∘ R^q`` and ``R^t`` in tiles (``"explicit"``; when the training side has many more
    capture rows than the query side, ``U_G (W ∘ R^q) U_Aᵀ`` is formed instead and met with
    the unrotated training gradients). ``method="auto"`` picks per layer. Unlike rotating
    each per-example gradient (``d_in·d_out·(d_in + d_out)`` each), rotating the captures
    costs ``T·(d_in² + d_out²)`` per example.

    ``eigens``: per layer ``(a_eigh, g_eigh, correction, damping)`` — the
    :class:`~curvlinalg.kron.Eigh` of the input and output factors, ``S`` from
    :func:`curvlinalg.kron.eigen_correction` (``(d_out, d_in)``) and ``λ ≥ 0``. Raises
    :class:`curvlinalg.NotPositiveDefiniteError` when some ``S + λ ≤ 0``.
    ``query_mask``, ``train_mask``: masks of ``query`` and ``train`` (module docstring).
    """
    xp, flat_q, batch_q, flat_t, batch_t = _query_and_train(
        query, train, check_finite, query_mask, train_mask
    )
    layers = _eigens(xp, flat_q, eigens, check_finite, "query")
    total = None
    for layer_q, layer_t, (a_vectors, g_vectors, weights) in zip(flat_q, flat_t, layers):
        d_in, d_out = int(layer_q[0].shape[1]), int(layer_q[1].shape[1])
        positions_q, positions_t = layer_q[2], layer_t[2]
        query3 = _rotated(xp, layer_q, batch_q, a_vectors, g_vectors)
        pair_cost = d_in * d_out + 2 * d_in + d_out
        # The pair contraction is one large matmul, like eigen_correction's: the same weight
        # fits bench_ekfac.py's T sweep (B_q = 8, B_t = 32, d = 256: pairs/explicit time 0.63
        # at T = 2, 1.37 at T = 3, where the unweighted count predicted 1.56 and 3.3).
        chosen = _cross_method(
            method, layer_q, layer_t, batch_q, batch_t, pair_cost, _PAIRS_SPEEDUP
        )
        if chosen == "pairs":
            train3 = _rotated(xp, layer_t, batch_t, a_vectors, g_vectors)
            part = _tiled(
                xp,
                batch_q,
                batch_t,
                positions_q * (d_in + d_out),
                positions_t * (d_in + d_out),
                positions_q * positions_t * (2 * d_in + d_out),
                _slicer(query3),
                _slicer(train3),
                functools.partial(_ekfac_pair_block, xp, weights),
            )
        else:
            # Either rotate the training captures too, or rotate the preconditioned query
            # gradients back (U_G (W ∘ R^q) U_Aᵀ) and use the training gradients as they are.
            rotate_back = batch_q * d_in * d_out * (d_in + d_out)
            rotate_train = batch_t * positions_t * (d_in * d_in + d_out * d_out)
            if rotate_back < rotate_train:
                train3 = _examples(xp, layer_t, batch_t)
                basis = (a_vectors, g_vectors)
            else:
                train3 = _rotated(xp, layer_t, batch_t, a_vectors, g_vectors)
                basis = None
            part = _explicit_scores(xp, query3, train3, batch_q, batch_t, weights, basis)
        total = part if total is None else total + part
    return total


# --------------------------------------------------------------------------------------
# Self-influence
# --------------------------------------------------------------------------------------


def _self_method(method: str, layer: tuple, pair_cost: int, gradients: int) -> str:
    """Per example: ``T²`` position pairs against forming ``gradients`` per-example
    gradients (``T`` rank-one terms each) and touching them."""
    positions = layer[2]
    size = int(layer[0].shape[1]) * int(layer[1].shape[1])
    pairs = positions * positions * pair_cost
    explicit = size * (gradients * positions + _MATERIALIZE_WEIGHT)
    return _method(method, pairs, explicit)


def _concat(xp: Any, parts: list[Array]) -> Array:
    return parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)


def kfac_self_scores(
    captures: Captures,
    inverses: Sequence[tuple[Array, Array]],
    *,
    method: str = "auto",
    check_finite: bool = True,
    mask: Any = None,
) -> Array:
    r"""K-FAC self-influence ``s_i = Σ_l ⟨(A_l⁻¹ ⊗ G_l⁻¹) g_il, g_il⟩``, ``(B,)``.

    The diagonal of ``kfac_scores(captures, captures, inverses)`` without the ``B×B``
    matrix: per example ``Σ_{t,s} (a_it A⁻¹ a_isᵀ)(e_it G⁻¹ e_isᵀ)`` (``"pairs"``,
    ``T²·(d_in + d_out)``) or ``⟨G⁻¹ g_i A⁻¹, g_i⟩`` from per-example gradients formed a
    chunk at a time (``"explicit"``); ``method="auto"`` picks per layer. Arguments as for
    :func:`kfac_scores`; ``mask`` masks ``captures`` (module docstring).
    """
    xp, flat, batch = woodbury._layers(captures, check_finite=check_finite, mask=mask)
    preconditioners = _inverses(xp, flat, inverses, check_finite, "captures")
    total = None
    for layer, (a_inv, g_inv) in zip(flat, preconditioners):
        rows_a, rows_e, positions = layer
        d_in, d_out = int(rows_a.shape[1]), int(rows_e.shape[1])
        a3, e3 = _examples(xp, layer, batch)
        pre_a3, pre_e3 = _examples(xp, (rows_a @ a_inv, rows_e @ g_inv, positions), batch)
        chosen = _self_method(method, layer, d_in + d_out, 2)
        parts = []
        if chosen == "pairs":
            for start, stop in _chunks(batch, positions * (2 * positions + d_in + d_out)):
                gram_a = pre_a3[start:stop, ...] @ xp.matrix_transpose(a3[start:stop, ...])
                gram_e = pre_e3[start:stop, ...] @ xp.matrix_transpose(e3[start:stop, ...])
                parts.append(xp.sum(gram_a * gram_e, axis=(1, 2)))
        else:
            for start, stop in _chunks(batch, 2 * d_in * d_out):
                preconditioned = _flat_gradients(
                    xp, pre_a3[start:stop, ...], pre_e3[start:stop, ...]
                )
                plain = _flat_gradients(xp, a3[start:stop, ...], e3[start:stop, ...])
                parts.append(xp.sum(preconditioned * plain, axis=-1))
        part = _concat(xp, parts)
        total = part if total is None else total + part
    return total


def ekfac_self_scores(
    captures: Captures,
    eigens: Sequence[tuple[Any, Any, Array, float | Array]],
    *,
    method: str = "auto",
    check_finite: bool = True,
    mask: Any = None,
) -> Array:
    r"""EK-FAC self-influence ``s_i = Σ_l Σ_{o,j} W_oj (R_i)_oj²``, ``(B,)``, with
    ``W = 1/(S + λ)`` and ``R_i = Ẽ_iᵀ Ã_i`` the rotated per-example gradient.

    The diagonal of ``ekfac_scores(captures, captures, eigens)`` without the ``B×B``
    matrix — the same contraction as :func:`curvlinalg.kron.eigen_correction`, weighted by
    ``W`` and kept per example: ``Σ_{t,s} (Ẽ_it∘Ẽ_is) W (Ã_it∘Ã_is)ᵀ`` (``"pairs"``) or
    ``R_i`` formed a chunk at a time (``"explicit"``). Arguments as for :func:`ekfac_scores`;
    ``mask`` masks ``captures`` (module docstring).
    """
    xp, flat, batch = woodbury._layers(captures, check_finite=check_finite, mask=mask)
    layers = _eigens(xp, flat, eigens, check_finite, "captures")
    total = None
    for layer, (a_vectors, g_vectors, weights) in zip(flat, layers):
        d_in, d_out = int(layer[0].shape[1]), int(layer[1].shape[1])
        positions = layer[2]
        rotated_a, rotated_e = _rotated(xp, layer, batch, a_vectors, g_vectors)
        chosen = _self_method(method, layer, d_in * d_out + 2 * d_in + d_out, 1)
        parts = []
        if chosen == "pairs":
            for start, stop in _chunks(batch, positions * positions * (2 * d_in + d_out)):
                products_e = _position_pairs(xp, rotated_e[start:stop, ...])
                products_a = _position_pairs(xp, rotated_a[start:stop, ...])
                per_pair = xp.sum((products_e @ weights) * products_a, axis=-1)
                count = stop - start
                parts.append(xp.sum(xp.reshape(per_pair, (count, positions * positions)), axis=-1))
        else:
            for start, stop in _chunks(batch, 2 * d_in * d_out):
                rotated = (
                    xp.matrix_transpose(rotated_e[start:stop, ...]) @ rotated_a[start:stop, ...]
                )
                parts.append(xp.sum(rotated * rotated * weights, axis=(1, 2)))
        part = _concat(xp, parts)
        total = part if total is None else total + part
    return total
