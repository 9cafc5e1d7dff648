r"""Optax transformations: FOOF, K-FAC, the exact subsampled natural gradient, KLD-WRM.

Convention (all four): a transformation is a **preconditioner**. It maps the gradient ``g``
of each captured layer to a direction ``P⁻¹ g`` with the sign of the gradient and leaves the
step size to the rest of the chain::

    tx = optax.chain(curvlinalg_jax.foof(damping=1.0), optax.sgd(learning_rate))
    state = tx.init(params)
    loss, grads, captures = curvlinalg_jax.capture_linen(model, params, x, y, loss_fn)
    updates, state = tx.update(grads, state, params, captures=captures)
    params = optax.apply_updates(params, updates)

``update`` takes the :class:`curvlinalg_jax.Captures` of the batch as the keyword argument
``captures`` (``optax.chain`` forwards it; transformations that do not know it ignore it).
A plain dict ``{path: (a, e)}`` is accepted too and then serves as loss and Fisher captures
(empirical Fisher). Parameters outside captured layers (and any leaf of a layer other than
``kernel``/``bias``) pass through unchanged, so the chained ``optax.sgd`` applies plain SGD to
them. That holds for LayerNorm scales, ``nn.Embed`` tables and, without ``layers=``, for
layers with a ``kernel`` that are not captured this step (a plain ``nn.Dense``: it keeps its
zero state). Transformers therefore train with either of (``labels`` marks the leaves of
captured layers)::

    optax.chain(curvlinalg_jax.kfac(damping), optax.adamw(learning_rate))  # AdamW after
    optax.multi_transform(                                # or K-FAC + SGD / AdamW by label
        {"kfac": optax.chain(curvlinalg_jax.kfac(damping), optax.sgd(lr)),
         "adam": optax.adamw(lr_adam)}, labels)

``multi_transform`` hands the K-FAC branch only its leaves; ``captures`` reach it through
``optax.chain``/``multi_transform``'s extra arguments. Everything before the preconditioner
in the chain (``optax.trace`` for heavy-ball momentum on the raw gradient, as in Benzing's
code; weight decay) acts on the gradient it preconditions — except with
``factored_gradient=True``, see :func:`foof`.

Factors (those of ``curvlinalg_torch`` too): ``A = Σ_{i,t} a_it a_itᵀ / B``
(``kron.input_factor``: the ``T`` positions of a convolution or sequence summed, the ``B``
examples averaged) and ``G`` the mean of ``e_it e_itᵀ`` over examples and positions, so that
``A⊗G`` is Grosse & Martens' KFC approximation of the Fisher ``(1/B) Σ_i vec(g_i) vec(g_i)ᵀ``;
for a dense layer both are plain means over the batch.

Layers are the subtrees of the parameters holding a ``kernel`` (Flax layout) and optionally a
``bias``; by default all of them, or those named in ``layers``. Their weight matrices
``(d_out, d_in)`` are mapped explicitly (:func:`curvlinalg_jax.kernel_to_matrix`).

State is a NamedTuple of arrays. Every step runs the same traced code: which steps update the
factor averages (``curvlinalg.schedule.accumulate_due``: the ``window`` steps ending at each
refresh) and which refresh the inverses (``curvlinalg.schedule.refresh_due``: every
``period`` steps, starting with step 0) is decided by ``jax.lax.cond`` on the step counter,
so one ``jax.jit`` of ``update`` serves every step. A refresh at step ``k`` happens *before*
step ``k``'s preconditioning and includes step ``k``'s batch. Factor averages follow
``avg ← ρ·avg + (1−ρ)·new`` with the first estimate taken as is (``curvlinalg.kron.ema``).

Distributed data parallelism: with ``axis_name`` (inside ``shard_map``/``pmap`` over that
axis, equal per-device batches) the incoming gradient is averaged with ``jax.lax.pmean``,
Kronecker factors with ``pmean`` and, for the natural gradient, the Fisher captures are
gathered with ``jax.lax.all_gather`` so that the Gram is that of the whole batch. ``N``
devices with ``B`` examples each then compute what one device computes on all ``N·B``.

Mixed precision: ``factor_dtype`` (float32 or float64) is the dtype of the factors, their
inverses or eigendecompositions and the solves; by default the parameters' dtype, promoted to
float32 for bfloat16/float16 parameters (the core factorises in single precision at least).
Captures and gradients are cast to it, the directions back to the incoming updates' dtype.

Failure rule (as in ``curvlinalg_torch``): a step either completes or changes nothing. If the
incoming updates, the captures, the new state (a factor that overflows, a Cholesky or
``eigh`` that gives NaN under ``jit``) or the directions hold a NaN or an infinity, the
transformation returns its old state bit for bit (``count`` included) and **zero** updates for
every leaf (a skipped step, not an error: under ``jit`` there is nothing to raise). A
following ``optax.sgd`` then moves nothing; a following ``optax.adamw`` still applies its
weight decay and decays its moments by the zero step. An ``optax.apply_if_finite`` around
the chain does not see these steps (the updates are finite zeros): count skipped steps with
the preconditioner's ``state.count``, which does not advance. One trace serves both
outcomes (``jnp.where``).

All formulas are ``curvlinalg``'s, called on JAX arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from curvlinalg import kron, schedule, wake, woodbury

from . import layout
from .capture import Captures, layer_mask, validated_captures

Array = Any

__all__ = [
    "FoofState",
    "KfacState",
    "NaturalGradientState",
    "KldwrmState",
    "foof",
    "kfac",
    "natural_gradient",
    "kldwrm",
]


# --------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------


def _check_positive(name: str, value: Any, *, allow_zero: bool = False) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a real number; got {value!r}") from exc
    if not (number >= 0 if allow_zero else number > 0) or number != number:
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}; got {value!r}")
    return number


def _check_decay(name: str, value: Any) -> float:
    number = _check_positive(name, value, allow_zero=True)
    if number > 1:
        raise ValueError(f"{name} must lie in [0, 1]; got {value!r}")
    return number


def _check_schedule(period: int, window: int | None) -> int:
    window = period if window is None else window
    # The core validates both (positive integer period, 1 ≤ window ≤ period).
    schedule.accumulate_due(0, period, window)
    return window


def _check_axis_name(axis_name: Any) -> None:
    if axis_name is not None and not isinstance(axis_name, (str, tuple)):
        raise ValueError(f"axis_name must be a str (or tuple of str) or None; got {axis_name!r}")


def _pmean(tree: Any, axis_name: Any) -> Any:
    return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


def _gather(tree: Any, axis_name: Any) -> Any:
    """Concatenate the devices' arrays along axis 0 (the same result on every device)."""
    if axis_name is None:
        return tree

    def gather(x: Array) -> Array:
        try:
            # Typed as device-invariant under shard_map's check_vma, so that the gathered
            # Fisher may be kept in a replicated state.
            return jax.lax.all_gather(x, axis_name, tiled=True, to="invarying")
        except (TypeError, ValueError):  # JAX versions without the ``to`` argument
            return jax.lax.all_gather(x, axis_name, tiled=True)

    return jax.tree_util.tree_map(gather, tree)


def _devices(axis_name: Any) -> int:
    return 1 if axis_name is None else int(jax.lax.axis_size(axis_name))


def _first_average(count: Array, decay: float, dtype: Any) -> Array:
    """The decay to use now: 0 at step 0 (first estimate taken as is), else ``decay``."""
    return jnp.where(count == 0, jnp.zeros([], dtype), jnp.asarray(decay, dtype))


def _example_count(captures: Captures, dtype: Any, axis_name: Any) -> Array:
    """The ``B`` of the subsampled Fisher ``F = (1/B)·G Gᵀ`` of the whole batch (over the
    devices too): the number of examples, or with ``captures.mask`` the examples with a kept
    position (``B_eff``, ``kron.example_count``; at least 1). A fully masked example has
    zero captures, so it is a zero column of ``G`` and must not count in ``1/B`` either: the
    step is then the one of the batch without it."""
    if captures.mask is None:
        return jnp.asarray(captures.batch_size * _devices(axis_name), dtype)
    count = kron.example_count(captures.mask, dtype=dtype)
    if axis_name is not None:
        count = jax.lax.psum(count, axis_name)
    return jnp.maximum(count, jnp.ones([], dtype))


def _input_factor(a: Array, axis_name: Any, captures: Any = None) -> Array:
    """``A = Σ_{i,t} a_it a_itᵀ / B`` of the whole batch (over devices too): positions summed,
    examples averaged (``kron.input_factor``, KFC's scale, as in ``curvlinalg_torch``); with
    ``captures.mask``, the kept positions over ``B_eff``, the sequences with a kept position
    (``kron.input_factor(mask=)``; 0 kept gives 0, not NaN)."""
    mask = None if captures is None else layer_mask(captures, a)
    return _pmean(kron.input_factor(a, check_finite=False, mask=mask), axis_name)


def _output_factor(e: Array, batch: int, axis_name: Any, captures: Any = None) -> Array:
    """``G`` of the Fisher rows: ``kron.factor`` averages over the ``rows`` of ``e`` (the kept
    positions with ``captures.mask``); the exact Fisher has ``C`` (``T·C``) rows per example
    and the same ``1/B`` scale as the others, so the mean over rows is rescaled by
    ``rows / B`` (1 for the empirical and MC Fisher)."""
    rows = int(e.shape[0])
    mask = None if captures is None else layer_mask(captures, e)
    factor = kron.factor(e, check_finite=False, mask=mask)
    if rows != batch:
        factor = factor * (rows / batch)
    return _pmean(factor, axis_name)


class _StepStart(NamedTuple):
    infos: list[layout.LayerInfo]
    batch: Any
    updates: Any
    count: Array
    accumulate: Array
    refresh: Array


def _begin_step(
    name: str,
    updates: Any,
    count: Array,
    captures: Any,
    layers: Any,
    axis_name: Any,
    period: int,
    window: int,
    factor_dtype: Any = None,
) -> _StepStart:
    """What the update of every factor-averaging transformation starts with: the captured
    layers of ``updates``, their validated ``captures``, the updates averaged over
    ``axis_name``, the step count, and whether this step folds its captures into the factor
    averages (``accumulate``) and refreshes the preconditioners (``refresh``). Layers and
    captures are in the factor dtype (:func:`_captured_layers`)."""
    infos, batch = _captured_layers(updates, layers, captures, name, factor_dtype)

    return _StepStart(
        infos,
        batch,
        _pmean(updates, axis_name),
        count,
        schedule.accumulate_due(count, period, window),
        schedule.refresh_due(count, period),
    )


def _check_factor_dtype(factor_dtype: Any) -> Any:
    """``None`` (resolved from the parameters, :func:`_with_factor_dtype`) or float32/float64:
    the factors are factorised (Cholesky, ``eigh``), which the core refuses in half precision."""
    if factor_dtype is None:
        return None
    try:
        dtype = jnp.dtype(factor_dtype)
    except TypeError as exc:
        raise ValueError(f"factor_dtype must be a dtype or None; got {factor_dtype!r}") from exc
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
        raise ValueError(
            f"factor_dtype must be float32 or float64 (the factors are factorised, which needs "
            f"at least single precision) or None; got {factor_dtype!r}"
        )
    return dtype


def _with_factor_dtype(
    infos: Sequence[layout.LayerInfo], factor_dtype: Any
) -> tuple[layout.LayerInfo, ...]:
    """``infos`` with ``dtype`` the dtype of the factors, state and solves: ``factor_dtype``,
    or by default the parameters' common dtype, promoted to float32 when it is half precision
    (bfloat16/float16 parameters keep float32 factors; the directions are cast back to the
    dtype of the incoming updates by ``layout.replace_layers``)."""
    if factor_dtype is None:
        common = jnp.dtype(jnp.result_type(*(info.dtype for info in infos)))
        if not jnp.issubdtype(common, jnp.floating) or jnp.finfo(common).bits < 32:
            common = jnp.dtype(jnp.float32)
        factor_dtype = common
    return tuple(info._replace(dtype=jnp.dtype(factor_dtype)) for info in infos)


def _init_layers(params: Any, layers: Any, factor_dtype: Any) -> tuple[layout.LayerInfo, ...]:
    """The layers that get state at ``init``: every layer of ``params`` (or ``layers``)."""
    return _with_factor_dtype(layout.find_layers(params, layers), factor_dtype)


def _captured_layers(
    tree: Any, layers: Any, captures: Any, who: str, factor_dtype: Any
) -> tuple[tuple[layout.LayerInfo, ...], Captures]:
    """The layers of ``tree`` preconditioned this step and their validated captures, cast to
    the factor dtype.

    Without ``layers``: the layers of ``tree`` that ``captures`` hold; the others (a plain
    ``nn.Dense`` among ``curvlinalg_jax.Dense`` layers) pass through untouched and keep their
    state. With ``layers``: all of them, each must be captured. The factor dtype is resolved
    from every layer of ``tree`` (as at ``init``), not only the captured ones.
    """
    every = _with_factor_dtype(layout.find_layers(tree, layers), factor_dtype)
    infos = every
    if layers is None and isinstance(captures, (Captures, Mapping)):
        table = captures.loss if isinstance(captures, Captures) else captures
        infos = tuple(info for info in every if info.path in table)
        if not infos:
            raise ValueError(
                f"{who}: captures hold none of the layers of updates (captures have "
                f"{sorted(table)}, updates' layers are {[info.path for info in every]}); "
                "capture the preconditioned layers (curvlinalg_jax.Dense/Conv) or pass layers=..."
            )
    batch = validated_captures(captures, infos, who)
    dtype = infos[0].dtype
    paths = {info.path for info in infos}

    def cast(table: Mapping[str, Any]) -> dict[str, Any]:
        return {
            path: tuple(
                value.astype(dtype)
                if path in paths and jnp.issubdtype(value.dtype, jnp.floating)
                else value
                for value in pair
            )
            for path, pair in table.items()
        }

    return infos, batch._replace(loss=cast(batch.loss), fisher=cast(batch.fisher))


def _gradient_matrices(updates: Any, infos: Sequence[layout.LayerInfo]) -> list[Array]:
    """Each layer's ``(d_out, d_in)`` gradient matrix in the factor dtype."""
    return [
        matrix.astype(info.dtype)
        for matrix, info in zip(layout.layer_matrices(updates, infos, "updates"), infos)
    ]


def _all_finite(tree: Any) -> Array:
    """One boolean: every floating leaf of ``tree`` is finite (other leaves are ignored)."""
    checks = [
        jnp.all(jnp.isfinite(leaf))
        for leaf in jax.tree_util.tree_leaves(tree)
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
    ]
    return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def _skip_non_finite(
    transformation: optax.GradientTransformationExtraArgs, axis_name: Any = None
) -> optax.GradientTransformationExtraArgs:
    """The failure rule of every transformation here, as in ``curvlinalg_torch``: a step
    either completes or leaves the state exactly as it was.

    If anything the step reads or makes is not finite — the incoming ``updates``, the
    ``captures``, the new state (factors, inverses, eigendecompositions: a factor whose
    ``aᵀa`` overflows, a Cholesky that fails under ``jit``) or the directions — the old state
    is returned bit for bit (``count`` included, so ``state.count`` counts completed steps and
    the refresh schedule resumes where it stopped) and every update leaf is zero, so the
    step moves nothing through ``optax.sgd`` (a momentum buffer after the preconditioner
    still decays). Selected with ``jnp.where``, one trace serves both outcomes. Under
    ``axis_name`` the devices agree: one device's non-finite capture skips the step on all
    of them (otherwise their states would drift apart, and the flag would not be replicated).
    """

    def update(
        updates: Any, state: Any, params: Any = None, *, captures: Any = None, **extra_args: Any
    ) -> tuple[Any, Any]:
        new_updates, new_state = transformation.update(
            updates, state, params, captures=captures, **extra_args
        )
        ok = (
            _all_finite(updates)
            & _all_finite(captures)
            & _all_finite(new_state)
            & _all_finite(new_updates)
        )
        if axis_name is not None:
            ok = jax.lax.psum(jnp.where(ok, 0, 1), axis_name) == 0
        kept = jax.tree_util.tree_map(lambda new, old: jnp.where(ok, new, old), new_state, state)
        zeroed = jax.tree_util.tree_map(
            lambda new: jnp.where(ok, new, jnp.zeros_like(new)), new_updates
        )
        return zeroed, kept

    return optax.GradientTransformationExtraArgs(transformation.init, update)


def _zeros_like_info(info: layout.LayerInfo, size: int) -> Array:
    return jnp.zeros((size, size), info.dtype)


def _keep(value: Any) -> Any:
    return value


# --------------------------------------------------------------------------------------
# FOOF
# --------------------------------------------------------------------------------------


class FoofState(NamedTuple):
    """State of :func:`foof`.

    ``count``: steps taken (int32). ``a_factors[path]``: the average of
    ``A = Σ_{i,t} a_it a_itᵀ / B`` (``kron.input_factor``), ``(d_in, d_in)``. ``a_inverses[path]``:
    ``(A + λI)⁻¹`` from the last refresh.
    """

    count: Array
    a_factors: dict[str, Array]
    a_inverses: dict[str, Array]


def foof(
    damping: float,
    *,
    decay: float = 0.95,
    period: int = 1,
    window: int | None = None,
    factored_gradient: bool = False,
    layers: Sequence[str] | None = None,
    axis_name: Any = None,
    factor_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""FOOF, gradient descent on neurons (Benzing 2022): ``∇W ↦ ∇W (A + λI)⁻¹`` per layer.

    ``A`` is the average (decay ``decay``) of the layer's input factor
    ``Σ_{i,t} a_it a_itᵀ / B`` (``kron.input_factor``: positions of a convolution summed,
    examples averaged; a ones column for a bias) and ``λ = damping``; the preconditioner
    ``(A + λI)⁻¹ ⊗ I`` depends on the inputs only (``curvlinalg.kron.inverse`` and
    ``kron.precondition``). For large ``λ`` the direction tends to ``∇W/λ``: think of
    ``learning_rate/λ`` as SGD's learning rate. Benzing's sum-over-batch factors at
    ``(lr, λ)`` are these mean factors at ``(lr/B, λ/B)``.

    ``period``/``window``: refresh the inverse every ``period`` steps, averaging the factors
    over the ``window`` steps that end at each refresh (default: every step).

    ``factored_gradient=True`` computes the direction from ``captures.loss`` instead of the
    incoming ``updates``, as ``(1/B) Σ_{i,t} e_itᵀ (a_it (A + λI)⁻¹)``
    (``kron.precondition_factored``, cheaper when ``B·T`` is below the layer's width). It is
    the same only when the incoming updates of captured layers are the plain mean gradient of
    that loss — put the transformation first in the chain; what came before it is ignored
    for those layers.

    ``layers``: the layer paths to precondition, each must be captured; by default every
    layer of ``params`` gets state and those present in ``captures`` are preconditioned, the
    others pass through untouched (see the module docstring for ``optax.multi_transform``).
    ``factor_dtype``: dtype of the factors, inverses and solves, float32 or float64; by
    default the parameters' dtype, float32 for bfloat16/float16 parameters. Captures and
    gradients are cast to it and the directions back to the dtype of the incoming updates.
    A step with anything non-finite is skipped: state untouched, zero updates (module
    docstring, "Failure rule").

    ``update(updates, state, params=None, *, captures)``; returns a gradient-signed
    direction, to chain with ``optax.sgd(learning_rate)``.
    """
    damping = _check_positive("damping", damping)
    decay = _check_decay("decay", decay)
    window = _check_schedule(period, window)
    _check_axis_name(axis_name)
    factor_dtype = _check_factor_dtype(factor_dtype)

    def init(params: Any) -> FoofState:
        infos = _init_layers(params, layers, factor_dtype)
        zeros = {info.path: _zeros_like_info(info, info.d_in) for info in infos}
        return FoofState(jnp.zeros([], jnp.int32), zeros, dict(zeros))

    def update(
        updates: Any,
        state: FoofState,
        params: Any = None,
        *,
        captures: Any = None,
        **extra_args: Any,
    ) -> tuple[Any, FoofState]:
        del params, extra_args
        infos, batch, updates, count, accumulate, refresh = _begin_step(
            "foof", updates, state.count, captures, layers, axis_name, period, window, factor_dtype
        )
        gradients = None if factored_gradient else _gradient_matrices(updates, infos)
        # Layers without captures this step keep their state.
        factors, inverses, directions = dict(state.a_factors), dict(state.a_inverses), []
        for index, info in enumerate(infos):
            a, e = batch.loss[info.path]
            rate = _first_average(count, decay, info.dtype)

            def average(old: Array, a: Array = a, rate: Array = rate) -> Array:
                return kron.ema(old, _input_factor(a, axis_name, batch), rate)

            factor = jax.lax.cond(accumulate, average, _keep, state.a_factors[info.path])
            inverse = jax.lax.cond(
                refresh,
                lambda f: kron.inverse(f, damping, check_finite=False),
                lambda f, old=state.a_inverses[info.path]: old,
                factor,
            )
            factors[info.path], inverses[info.path] = factor, inverse
            if factored_gradient:
                direction = _pmean(
                    kron.precondition_factored(a, e, inverse, check_finite=False), axis_name
                )
            else:
                direction = kron.precondition(gradients[index], inverse, check_finite=False)
            directions.append(direction)
        new_state = FoofState(optax.safe_int32_increment(count), factors, inverses)
        return layout.replace_layers(updates, infos, directions), new_state

    return _skip_non_finite(optax.GradientTransformationExtraArgs(init, update), axis_name)


# --------------------------------------------------------------------------------------
# K-FAC
# --------------------------------------------------------------------------------------

DAMPING_MODES = ("factored", "exact")


class KfacState(NamedTuple):
    """State of :func:`kfac`.

    ``a_factors``/``g_factors``: averages of ``A = Σ_{i,t} a_it a_itᵀ / B`` and of the
    Fisher's output factor ``G`` (mean over examples and positions).
    ``a_preconditioners``/``g_preconditioners``: from the last refresh, the damped
    inverses ``(A + λ_A I)⁻¹``, ``(G + λ_G I)⁻¹`` (``damping_mode="factored"``) or the
    eigendecompositions :class:`curvlinalg.Eigh` of ``A`` and ``G`` (``"exact"``).
    """

    count: Array
    a_factors: dict[str, Array]
    g_factors: dict[str, Array]
    a_preconditioners: dict[str, Any]
    g_preconditioners: dict[str, Any]


def kfac(
    damping: float,
    *,
    decay: float = 0.95,
    period: int = 1,
    window: int | None = None,
    damping_mode: str = "factored",
    factored_gradient: bool = False,
    layers: Sequence[str] | None = None,
    axis_name: Any = None,
    factor_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""K-FAC (Martens & Grosse 2015): ``∇W ↦ (A⊗G + damping)⁻¹ ∇W`` per layer.

    ``A`` averages the input factor ``Σ_{i,t} a_it a_itᵀ / B`` (of ``captures.loss``;
    positions summed, ``kron.input_factor``), ``G`` the output factor (mean over examples and
    positions) of ``captures.fisher`` (labels sampled from the model for ``fisher="mc"`` — K-FAC
    proper —, data labels for ``"empirical"``, every class for ``"exact"``, all on the same
    ``1/B`` scale). ``damping_mode="factored"``: ``G⁻¹_λ ∇W A⁻¹_λ`` with
    ``(A + λ_A I)⁻¹``, ``(G + λ_G I)⁻¹`` and ``λ_A·λ_G = λ`` split by the π rule
    (``kron.split_damping``; Benzing's "heuristic damping"). ``"exact"``: ``mat((A⊗G +
    λI)⁻¹ vec ∇W)`` in the Kronecker eigenbasis (``kron.eigh``, ``kron.eigen_solve``).

    ``decay``, ``period``, ``window``, ``layers``, ``axis_name``, ``factor_dtype`` and the
    failure rule as in :func:`foof`; ``factored_gradient`` too (``"factored"`` damping only): then
    ``kron.precondition_factored(a, e, A⁻¹_λ, G⁻¹_λ)`` on ``captures.loss``. Returns a
    gradient-signed direction; chain with ``optax.sgd(learning_rate)``.
    """
    damping = _check_positive("damping", damping)
    decay = _check_decay("decay", decay)
    window = _check_schedule(period, window)
    _check_axis_name(axis_name)
    factor_dtype = _check_factor_dtype(factor_dtype)
    if damping_mode not in DAMPING_MODES:
        raise ValueError(f"damping_mode must be one of {DAMPING_MODES}; got {damping_mode!r}")
    if factored_gradient and damping_mode != "factored":
        raise ValueError("factored_gradient=True needs damping_mode='factored'")

    def empty_preconditioner(info: layout.LayerInfo, size: int) -> Any:
        if damping_mode == "exact":
            return kron.Eigh(jnp.zeros((size,), info.dtype), _zeros_like_info(info, size))
        return _zeros_like_info(info, size)

    def init(params: Any) -> KfacState:
        infos = _init_layers(params, layers, factor_dtype)
        return KfacState(
            jnp.zeros([], jnp.int32),
            {info.path: _zeros_like_info(info, info.d_in) for info in infos},
            {info.path: _zeros_like_info(info, info.d_out) for info in infos},
            {info.path: empty_preconditioner(info, info.d_in) for info in infos},
            {info.path: empty_preconditioner(info, info.d_out) for info in infos},
        )

    def refreshed(factors: tuple[Array, Array]) -> tuple[Any, Any]:
        a_factor, g_factor = factors
        if damping_mode == "exact":
            return kron.eigh(a_factor, check_finite=False), kron.eigh(g_factor, check_finite=False)
        damping_a, damping_g = kron.split_damping(a_factor, g_factor, damping)
        return (
            kron.inverse(a_factor, damping_a, check_finite=False),
            kron.inverse(g_factor, damping_g, check_finite=False),
        )

    def update(
        updates: Any,
        state: KfacState,
        params: Any = None,
        *,
        captures: Any = None,
        **extra_args: Any,
    ) -> tuple[Any, KfacState]:
        del params, extra_args
        infos, batch, updates, count, accumulate, refresh = _begin_step(
            "kfac", updates, state.count, captures, layers, axis_name, period, window, factor_dtype
        )
        gradients = None if factored_gradient else _gradient_matrices(updates, infos)
        # Layers without captures this step keep their state.
        a_factors, g_factors = dict(state.a_factors), dict(state.g_factors)
        a_pre, g_pre = dict(state.a_preconditioners), dict(state.g_preconditioners)
        directions = []
        for index, info in enumerate(infos):
            a, e = batch.loss[info.path]
            e_fisher = batch.fisher[info.path][1]
            rate = _first_average(count, decay, info.dtype)

            def average(
                old: tuple[Array, Array], a: Array = a, e_fisher: Array = e_fisher, rate=rate
            ) -> tuple[Array, Array]:
                new_a = _input_factor(a, axis_name, batch)
                new_g = _output_factor(e_fisher, batch.batch_size, axis_name, batch)
                return kron.ema(old[0], new_a, rate), kron.ema(old[1], new_g, rate)

            factors = jax.lax.cond(
                accumulate,
                average,
                _keep,
                (state.a_factors[info.path], state.g_factors[info.path]),
            )
            old = (state.a_preconditioners[info.path], state.g_preconditioners[info.path])
            a_solver, g_solver = jax.lax.cond(refresh, refreshed, lambda _, old=old: old, factors)
            a_factors[info.path], g_factors[info.path] = factors
            a_pre[info.path], g_pre[info.path] = a_solver, g_solver
            if factored_gradient:
                direction = _pmean(
                    kron.precondition_factored(a, e, a_solver, g_solver, check_finite=False),
                    axis_name,
                )
            elif damping_mode == "exact":
                direction = kron.eigen_solve(
                    gradients[index], a_solver, g_solver, damping, check_finite=False
                )
            else:
                direction = kron.precondition(
                    gradients[index], a_solver, g_solver, check_finite=False
                )
            directions.append(direction)
        new_state = KfacState(optax.safe_int32_increment(count), a_factors, g_factors, a_pre, g_pre)
        return layout.replace_layers(updates, infos, directions), new_state

    return _skip_non_finite(optax.GradientTransformationExtraArgs(init, update), axis_name)


# --------------------------------------------------------------------------------------
# Exact subsampled natural gradient (Woodbury)
# --------------------------------------------------------------------------------------


class NaturalGradientState(NamedTuple):
    """State of :func:`natural_gradient`.

    ``fisher``: the factorised ``λI + (1/B)·G Gᵀ`` (:class:`curvlinalg.Woodbury`, or one per
    layer when block-diagonal) from the last refresh; ``None`` when ``period == 1`` (it is
    rebuilt every step and nothing needs keeping).
    """

    count: Array
    fisher: Any


def natural_gradient(
    damping: float,
    *,
    period: int = 1,
    block_diagonal: bool = False,
    fisher_like: Captures | None = None,
    layers: Sequence[str] | None = None,
    axis_name: Any = None,
    factor_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Exact damped natural gradient with the subsampled Fisher (Benzing 2022, App. E):
    ``u ↦ (λI + F)⁻¹ u`` with ``F = (1/B)·G Gᵀ`` over all captured layers jointly.

    ``G``'s columns are the per-example gradients of ``captures.fisher`` (MC, empirical or
    exact Fisher; ``B`` = the number of examples, also when the exact Fisher has ``B·C``
    rows; with ``captures.mask`` the examples with a kept position, ``B_eff``, so that a
    fully padded sequence changes nothing). Solved through the Woodbury identity with ``B×B`` work
    (``curvlinalg.woodbury.factorize(captures, λ, scale=1/B)`` and ``woodbury.solve``);
    ``block_diagonal=True`` uses one Fisher block per layer (``factorize_layers``,
    ``solve_layers``).

    ``period > 1`` refactorises only every ``period`` steps and keeps the last Fisher in the
    state (its captures included), which needs their shapes when the state is created:
    ``fisher_like`` = captures of one step (values unused; with ``axis_name``, captures of the
    whole batch over all devices). ``u`` is the incoming update: a gradient of an independent
    batch is the intended use (the solve loses digits in float32 when ``u`` lies in the span
    of ``G`` and ``‖G‖²/(Bλ)`` is large, see ``woodbury.solve``). Chain with
    ``optax.sgd(learning_rate)``. ``layers``, ``axis_name``, ``factor_dtype`` and the failure
    rule as in :func:`foof` (without ``layers``, the layers of ``fisher_like`` are kept).
    """
    damping = _check_positive("damping", damping)
    _check_schedule(period, None)
    _check_axis_name(axis_name)
    factor_dtype = _check_factor_dtype(factor_dtype)
    if period > 1 and fisher_like is None:
        raise ValueError(
            "natural_gradient with period > 1 keeps the Fisher of the last refresh in its state "
            "and needs fisher_like (captures of one step, e.g. of the first batch) for its shapes"
        )

    def factorize(captures_list: list, dtype: Any, batch: Any) -> Any:
        damping_array = jnp.asarray(damping, dtype)
        scale = 1.0 / jnp.asarray(batch, dtype)
        if block_diagonal:
            return woodbury.factorize_layers(
                captures_list, damping_array, scale, check_finite=False
            )
        return woodbury.factorize(captures_list, damping_array, scale, check_finite=False)

    def fisher_list(batch: Captures, infos: Sequence[layout.LayerInfo]) -> list:
        return [tuple(batch.fisher[info.path]) for info in infos]

    def init(params: Any) -> NaturalGradientState:
        count = jnp.zeros([], jnp.int32)
        if period == 1:
            return NaturalGradientState(count, None)
        infos, like = _captured_layers(
            params, layers, fisher_like, "natural_gradient (fisher_like)", factor_dtype
        )
        shapes = jax.eval_shape(
            lambda c: factorize(fisher_list(c, infos), infos[0].dtype, c.batch_size), like
        )
        zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        return NaturalGradientState(count, zeros)

    def update(
        updates: Any,
        state: NaturalGradientState,
        params: Any = None,
        *,
        captures: Any = None,
        **extra_args: Any,
    ) -> tuple[Any, NaturalGradientState]:
        del params, extra_args
        infos, batch = _captured_layers(updates, layers, captures, "natural_gradient", factor_dtype)
        updates = _pmean(updates, axis_name)
        whole_batch = _example_count(batch, infos[0].dtype, axis_name)
        rows = _gather(fisher_list(batch, infos), axis_name)

        def build() -> Any:
            return factorize(rows, infos[0].dtype, whole_batch)

        if period == 1:
            fisher, kept = build(), None
        else:
            refresh = schedule.refresh_due(state.count, period)
            fisher = jax.lax.cond(refresh, build, lambda: state.fisher)
            kept = fisher
        gradients = _gradient_matrices(updates, infos)
        if block_diagonal:
            directions = woodbury.solve_layers(fisher, gradients, check_finite=False)
        else:
            directions = woodbury.solve(fisher, gradients, check_finite=False)
        new_state = NaturalGradientState(optax.safe_int32_increment(state.count), kept)
        return layout.replace_layers(updates, infos, directions), new_state

    return _skip_non_finite(optax.GradientTransformationExtraArgs(init, update), axis_name)


# --------------------------------------------------------------------------------------
# KLD-WRM (Puiu 2022)
# --------------------------------------------------------------------------------------

KLDWRM_VARIANTS = ("so", "q")


class KldwrmState(NamedTuple):
    """State of :func:`kldwrm`, per layer (dicts keyed by path) unless said otherwise.

    ``fbar_a``/``fbar_g``: the wake averages ``F̄ = Ā⊗Ḡ`` of the Fisher factors.
    ``local_a``/``local_g``: the factors of the last accumulated batch (``B_k``, Q only).
    ``solver_a``/``solver_g``: from the last refresh — SO: :class:`curvlinalg.Eigh` of
    ``Ā``, ``Ḡ``; Q: the π-damped factors ``Ā + λ_A I``, ``Ḡ + λ_G I``.
    ``b_a``/``b_g``: Q: ``B``'s factors at the last refresh. ``g_prev``, ``ghat_prev``,
    ``m_ghat_prev``: ``g_{k−1}``, ``ĝ_{k−1}``, ``M̂_{k−1}ĝ_{k−1}`` (zeros before the first
    step, which makes the first step plain). ``lam_prev``: ``λ_{k−1}`` (scalar).
    """

    count: Array
    fbar_a: dict[str, Array]
    fbar_g: dict[str, Array]
    local_a: dict[str, Array]
    local_g: dict[str, Array]
    solver_a: dict[str, Any]
    solver_g: dict[str, Any]
    b_a: dict[str, Array]
    b_g: dict[str, Array]
    g_prev: dict[str, Array]
    ghat_prev: dict[str, Array]
    m_ghat_prev: dict[str, Array]
    lam_prev: Array


def kldwrm(
    learning_rate: float | Callable[[Array], Array],
    damping: float,
    *,
    decay: float = 0.5,
    variant: str = "so",
    period: int = 1,
    window: int | None = None,
    q_solver: str = "exact",
    layers: Sequence[str] | None = None,
    axis_name: Any = None,
    factor_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""SO- and Q-KLD-WRM (Puiu 2022) with Kronecker-factored Fisher blocks.

    ``λ_k = 1 / learning_rate(k)`` (a float or an optax schedule of the step count) enters the
    recursions, so the transformation needs it; it returns ``−λ_k·s_k``, so that chaining
    ``optax.sgd(learning_rate)`` **with the same learning rate** takes Puiu's step
    ``θ_{k+1} = θ_k + s_k``:

    * ``variant="so"`` (Prop. 4.1): ``s_k = −λ_k⁻¹ (F̄_k + μI)⁻¹ (g_k − ρ(λ_k/λ_{k−1}) g_{k−1})``
      (``wake.so_gradient``; ``(Ā⊗Ḡ + μI)⁻¹`` exactly in the eigenbasis, ``kron.eigen_solve``,
      as Puiu's code);
    * ``variant="q"`` (Prop. 4.2): ``s_k = −λ_k⁻¹ (F̄_k + B_k/λ_k)⁻¹ ĝ_k`` with the ``ĝ``
      recursion (``wake.q_gradient``) and the sum of Kronecker products solved exactly
      (``wake.kron_q_step``, ``q_solver="summed_factors"`` for Puiu's approximation). ``F̄``
      is damped through its factors, ``(Ā + λ_A I)⊗(Ḡ + λ_G I)`` with ``λ_A·λ_G = μ``
      (π rule), because the solve needs a Kronecker product; ``B_k = A_k⊗G_k`` are the factors
      of the latest batch.

    ``F̄ = Ā⊗Ḡ`` are wake averages ``F̄_k = ρF̄_{k−1} + (1−ρ)F_k`` (``wake.average``, ``ρ =
    decay``, the same ρ as in the recursions) of ``captures.loss`` inputs and
    ``captures.fisher`` output factors; ``μ = damping``. ``period``/``window`` amortise as in
    :func:`foof` (``F̄``, ``B`` and their decompositions are refreshed every ``period`` steps;
    the Q solve itself runs every step, as ``λ`` may change). QE-KLD-WRM is not provided.
    ``layers``, ``axis_name``, ``factor_dtype`` and the failure rule as in :func:`foof`.
    """
    if not callable(learning_rate):
        _check_positive("learning_rate", learning_rate)
    damping = _check_positive("damping", damping)
    decay = _check_decay("decay", decay)
    window = _check_schedule(period, window)
    _check_axis_name(axis_name)
    factor_dtype = _check_factor_dtype(factor_dtype)
    if variant not in KLDWRM_VARIANTS:
        raise ValueError(
            f"variant must be one of {KLDWRM_VARIANTS} (QE-KLD-WRM is not provided); "
            f"got {variant!r}"
        )
    if q_solver not in ("exact", "summed_factors"):
        raise ValueError(f"q_solver must be 'exact' or 'summed_factors'; got {q_solver!r}")

    def rate_at(count: Array, dtype: Any) -> Array:
        value = learning_rate(count) if callable(learning_rate) else learning_rate
        return jnp.asarray(value, dtype)

    def init(params: Any) -> KldwrmState:
        infos = _init_layers(params, layers, factor_dtype)

        def square(which: str) -> dict[str, Array]:
            return {
                info.path: _zeros_like_info(info, info.d_in if which == "a" else info.d_out)
                for info in infos
            }

        def solver(which: str) -> dict[str, Any]:
            if variant == "q":
                return square(which)
            return {
                path: kron.Eigh(jnp.zeros(m.shape[:1], m.dtype), m)
                for path, m in square(which).items()
            }

        matrices = {info.path: jnp.zeros((info.d_out, info.d_in), info.dtype) for info in infos}
        q = variant == "q"  # the fields only Q-KLD-WRM uses stay empty for SO
        return KldwrmState(
            count=jnp.zeros([], jnp.int32),
            fbar_a=square("a"),
            fbar_g=square("g"),
            local_a=square("a") if q else {},
            local_g=square("g") if q else {},
            solver_a=solver("a"),
            solver_g=solver("g"),
            b_a=square("a") if q else {},
            b_g=square("g") if q else {},
            g_prev=dict(matrices),
            ghat_prev=dict(matrices) if q else {},
            m_ghat_prev=dict(matrices) if q else {},
            lam_prev=jnp.ones([], infos[0].dtype),
        )

    def update(
        updates: Any,
        state: KldwrmState,
        params: Any = None,
        *,
        captures: Any = None,
        **extra_args: Any,
    ) -> tuple[Any, KldwrmState]:
        del params, extra_args
        infos, batch, updates, count, accumulate, refresh = _begin_step(
            "kldwrm",
            updates,
            state.count,
            captures,
            layers,
            axis_name,
            period,
            window,
            factor_dtype,
        )
        dtype = infos[0].dtype
        lam = 1 / rate_at(count, dtype)
        # At step 0 the previous gradients are zero, so λ_{−1} only needs to be positive.
        lam_prev = jnp.where(count == 0, lam, state.lam_prev.astype(dtype))
        gradients = _gradient_matrices(updates, infos)
        # Layers without captures this step keep their state.
        new = {
            name: dict(getattr(state, name))
            for name in KldwrmState._fields
            if name not in ("count", "lam_prev")
        }
        directions = []
        for index, info in enumerate(infos):
            path = info.path
            a = batch.loss[path][0]
            e_fisher = batch.fisher[path][1]
            rho_now = _first_average(count, decay, info.dtype)

            def average(old: tuple, a: Array = a, e_fisher: Array = e_fisher, rho=rho_now):
                local = (
                    _input_factor(a, axis_name, batch),
                    _output_factor(e_fisher, batch.batch_size, axis_name, batch),
                )
                return wake.average(list(old[:2]), list(local), rho) + list(local)

            if variant == "q":
                kept = (state.fbar_a[path], state.fbar_g[path])
                kept += (state.local_a[path], state.local_g[path])
            else:
                # SO keeps no local factors; carry placeholders of the right shapes.
                kept = (state.fbar_a[path], state.fbar_g[path])
                kept += (state.fbar_a[path], state.fbar_g[path])
            fbar_a, fbar_g, local_a, local_g = jax.lax.cond(
                accumulate, lambda old, f=average: tuple(f(old)), _keep, kept
            )
            new["fbar_a"][path], new["fbar_g"][path] = fbar_a, fbar_g
            gradient = gradients[index]
            if variant == "so":

                def decompose(factors: tuple[Array, Array]) -> tuple[Any, Any]:
                    return (
                        kron.eigh(factors[0], check_finite=False),
                        kron.eigh(factors[1], check_finite=False),
                    )

                old = (state.solver_a[path], state.solver_g[path])
                solver_a, solver_g = jax.lax.cond(
                    refresh, decompose, lambda _, old=old: old, (fbar_a, fbar_g)
                )
                modified = wake.so_gradient(gradient, state.g_prev[path], decay, lam, lam_prev)
                direction = kron.eigen_solve(
                    modified, solver_a, solver_g, damping, check_finite=False
                )
            else:
                new["local_a"][path], new["local_g"][path] = local_a, local_g

                def snapshot(factors: tuple[Array, ...]) -> tuple[Array, ...]:
                    average_a, average_g, batch_a, batch_g = factors
                    damping_a, damping_g = kron.split_damping(average_a, average_g, damping)
                    eye_a = jnp.eye(average_a.shape[0], dtype=average_a.dtype)
                    eye_g = jnp.eye(average_g.shape[0], dtype=average_g.dtype)
                    return (
                        average_a + damping_a * eye_a,
                        average_g + damping_g * eye_g,
                        batch_a,
                        batch_g,
                    )

                old = (state.solver_a[path], state.solver_g[path], state.b_a[path], state.b_g[path])
                solver_a, solver_g, b_a, b_g = jax.lax.cond(
                    refresh,
                    snapshot,
                    lambda _, old=old: old,
                    (fbar_a, fbar_g, local_a, local_g),
                )
                new["b_a"][path], new["b_g"][path] = b_a, b_g
                ghat = wake.q_gradient(
                    gradient,
                    state.ghat_prev[path],
                    state.g_prev[path],
                    state.m_ghat_prev[path],
                    decay,
                    lam,
                    lam_prev,
                )
                step, m_ghat = wake.kron_q_step(
                    ghat, solver_a, solver_g, b_a, b_g, lam, solver=q_solver, check_finite=False
                )
                new["ghat_prev"][path], new["m_ghat_prev"][path] = ghat, m_ghat
                direction = -lam * step
            new["solver_a"][path], new["solver_g"][path] = solver_a, solver_g
            new["g_prev"][path] = gradient
            directions.append(direction)
        new_state = KldwrmState(count=optax.safe_int32_increment(count), lam_prev=lam, **new)
        return layout.replace_layers(updates, infos, directions), new_state

    return _skip_non_finite(optax.GradientTransformationExtraArgs(init, update), axis_name)
