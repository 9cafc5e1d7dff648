r"""EK-FAC — eigenvalue-corrected K-FAC (George et al. 2018) as an optax preconditioner.

K-FAC's block ``A⊗G = (U_A⊗U_G) diag(s_A⊗s_G) (U_A⊗U_G)ᵀ`` keeps its eigenbasis
``Q = U_A⊗U_G`` and trades the eigenvalue products for the Fisher's own second moments in it,

    S = (1/B) Σ_i (U_Gᵀ g_i U_A)∘(U_Gᵀ g_i U_A)            (``curvlinalg.kron.eigen_correction``)

with ``g_i = Σ_t ẽ_itᵀ a_it`` the per-example gradients of ``captures.fisher`` — computed
from the captures, without forming any ``g_i``. The direction of one layer is

    (Q diag(S̄) Qᵀ + λI)⁻¹ ∇W = U_G ((U_Gᵀ ∇W U_A) / (S̄ + λ)) U_Aᵀ   (``kron.corrected_solve``)

Schedule (step ``k`` from 0, ``curvlinalg.schedule.refresh_due``), as
``curvlinalg_torch.EKFAC``:

* every ``update_every`` steps the batch is folded into the factor averages ``Ā``, ``Ḡ``
  (:func:`curvlinalg_jax.kfac`'s factors: ``A = Σ_{i,t} a aᵀ / B`` with ``kron.input_factor``,
  ``G`` the mean of ``ẽ ẽᵀ`` over examples and positions; ``kron.ema`` with ``decay``, first
  estimate taken as is) and into ``S̄ ← kron.ema(S̄, S_batch, decay)`` in the current basis;
* every ``inverse_every`` steps the factors take that step's batch too, the eigenbases are
  recomputed from them (``kron.eigh``) and ``S̄`` restarts from that batch's correction in
  the new basis (a second moment measured in another basis is not a diagonal of ``F`` in
  this one).

All refreshes go through ``jax.lax.cond`` on the step counter, so one ``jax.jit`` of
``update`` serves every step. With ``axis_name`` the factors and ``S_batch`` (means over
examples) are ``pmean``ed, so ``N`` devices with equal batches compute what one device
computes on the whole batch.

Padding (``captures.mask``, ``capture_linen(position_mask=)``): the factors and ``S`` are
means over the kept positions of the ``B_eff`` examples with one (``kron.input_factor``,
``kron.eigen_correction`` with ``mask=``), so a padded batch — fully padded sequences
included — gives the state and step of the batch with the padding deleted. Under
``axis_name`` each device's means are averaged with equal weights (exact when the devices
keep equally many examples).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from curvlinalg import kron, schedule

from . import layout
from .capture import layer_mask
from .transforms import (
    _captured_layers,
    _check_axis_name,
    _check_decay,
    _check_factor_dtype,
    _check_positive,
    _first_average,
    _gradient_matrices,
    _init_layers,
    _input_factor,
    _keep,
    _output_factor,
    _pmean,
    _skip_non_finite,
    _zeros_like_info,
)

Array = Any

__all__ = ["EkfacState", "ekfac"]


class EkfacState(NamedTuple):
    """State of :func:`ekfac`, per layer (dicts keyed by path).

    ``count``: steps taken (int32). ``a_factors``/``g_factors``: the averages ``Ā``
    ``(d_in, d_in)`` and ``Ḡ`` ``(d_out, d_out)``. ``a_eighs``/``g_eighs``: their
    :class:`curvlinalg.Eigh` from the last basis refresh. ``corrections``: ``S̄``
    ``(d_out, d_in)``, the averaged eigenvalue correction in that basis.
    """

    count: Array
    a_factors: dict[str, Array]
    g_factors: dict[str, Array]
    a_eighs: dict[str, Any]
    g_eighs: dict[str, Any]
    corrections: dict[str, Array]


def _check_every(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
    return value


def ekfac(
    damping: float,
    *,
    decay: float = 0.95,
    update_every: int = 1,
    inverse_every: int = 1,
    layers: Sequence[str] | None = None,
    axis_name: Any = None,
    factor_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""EK-FAC: ``∇W ↦ (Q diag(S̄) Qᵀ + λI)⁻¹ ∇W`` per layer (see the module docstring).

    ``damping``: ``λ > 0``, added to every corrected eigenvalue (exact damping; no factored
    split). ``decay``: ``ρ`` of the factor and correction averages. ``update_every``: fold
    the batch into ``Ā``, ``Ḡ`` and ``S̄`` every this many steps. ``inverse_every``:
    recompute the eigenbases every this many steps (and restart ``S̄`` from that step's
    batch). The Fisher is that of ``captures.fisher`` (MC, empirical, or exact with ``B·C``
    rows on the ``1/B`` scale); ``A`` comes from ``captures.loss``. ``layers``,
    ``axis_name``, ``factor_dtype`` and the failure rule (a non-finite step leaves the state
    untouched and returns zeros) as in :func:`curvlinalg_jax.foof`.

    ``update(updates, state, params=None, *, captures)``; returns a gradient-signed
    direction, to chain with ``optax.sgd(learning_rate)``.
    """
    damping = _check_positive("damping", damping)
    decay = _check_decay("decay", decay)
    update_every = _check_every("update_every", update_every)
    inverse_every = _check_every("inverse_every", inverse_every)
    _check_axis_name(axis_name)
    factor_dtype = _check_factor_dtype(factor_dtype)

    def empty_eigh(info: layout.LayerInfo, size: int) -> kron.Eigh:
        return kron.Eigh(jnp.zeros((size,), info.dtype), _zeros_like_info(info, size))

    def init(params: Any) -> EkfacState:
        infos = _init_layers(params, layers, factor_dtype)
        return EkfacState(
            count=jnp.zeros([], jnp.int32),
            a_factors={info.path: _zeros_like_info(info, info.d_in) for info in infos},
            g_factors={info.path: _zeros_like_info(info, info.d_out) for info in infos},
            a_eighs={info.path: empty_eigh(info, info.d_in) for info in infos},
            g_eighs={info.path: empty_eigh(info, info.d_out) for info in infos},
            corrections={
                info.path: jnp.zeros((info.d_out, info.d_in), info.dtype) for info in infos
            },
        )

    def decompose(factors: tuple[Array, Array]) -> tuple[kron.Eigh, kron.Eigh]:
        return (
            kron.eigh(factors[0], check_finite=False),
            kron.eigh(factors[1], check_finite=False),
        )

    def update(
        updates: Any,
        state: EkfacState,
        params: Any = None,
        *,
        captures: Any = None,
        **extra_args: Any,
    ) -> tuple[Any, EkfacState]:
        del params, extra_args
        infos, batch = _captured_layers(updates, layers, captures, "ekfac", factor_dtype)
        updates = _pmean(updates, axis_name)
        count = state.count
        basis_due = schedule.refresh_due(count, inverse_every)
        fold_due = schedule.refresh_due(count, update_every) | basis_due
        gradients = _gradient_matrices(updates, infos)
        # Layers without captures this step keep their state.
        new = {name: dict(getattr(state, name)) for name in EkfacState._fields if name != "count"}
        directions = []
        for index, info in enumerate(infos):
            path = info.path
            a = batch.loss[path][0]
            a_fisher, e_fisher = batch.fisher[path]
            rate = _first_average(count, decay, info.dtype)

            def average(
                old: tuple[Array, Array], a: Array = a, e_fisher: Array = e_fisher, rate=rate
            ) -> tuple[Array, Array]:
                new_a = _input_factor(a, axis_name, batch)
                new_g = _output_factor(e_fisher, batch.batch_size, axis_name, batch)
                return kron.ema(old[0], new_a, rate), kron.ema(old[1], new_g, rate)

            factors = jax.lax.cond(
                fold_due, average, _keep, (state.a_factors[path], state.g_factors[path])
            )
            old_bases = (state.a_eighs[path], state.g_eighs[path])
            a_eigh, g_eigh = jax.lax.cond(
                basis_due, decompose, lambda _, old=old_bases: old, factors
            )

            def corrected(
                old: Array,
                a_fisher: Array = a_fisher,
                e_fisher: Array = e_fisher,
                a_eigh: kron.Eigh = a_eigh,
                g_eigh: kron.Eigh = g_eigh,
            ) -> Array:
                # With a position mask: a mean over the B_eff examples with a kept position
                # (a fully padded sequence changes nothing), as for the factors.
                fresh = kron.eigen_correction(
                    a_fisher,
                    e_fisher,
                    a_eigh,
                    g_eigh,
                    check_finite=False,
                    mask=layer_mask(batch, e_fisher),
                )
                rows = int(e_fisher.shape[0])
                if rows != batch.batch_size:
                    # The exact Fisher's C rows per example (each with the example's mask):
                    # S is a mean over the examples, not over the rows.
                    fresh = fresh * (rows / batch.batch_size)
                fresh = _pmean(fresh, axis_name)
                # A new basis restarts the average from this batch's correction.
                zero, rho = jnp.zeros([], old.dtype), jnp.asarray(decay, old.dtype)
                restart = jnp.where(basis_due, zero, rho)
                return kron.ema(old, fresh, restart)

            correction = jax.lax.cond(fold_due, corrected, _keep, state.corrections[path])
            new["a_factors"][path], new["g_factors"][path] = factors
            new["a_eighs"][path], new["g_eighs"][path] = a_eigh, g_eigh
            new["corrections"][path] = correction
            directions.append(
                kron.corrected_solve(
                    gradients[index], a_eigh, g_eigh, correction, damping, check_finite=False
                )
            )
        new_state = EkfacState(count=optax.safe_int32_increment(count), **new)
        return layout.replace_layers(updates, infos, directions), new_state

    return _skip_non_finite(optax.GradientTransformationExtraArgs(init, update), axis_name)
