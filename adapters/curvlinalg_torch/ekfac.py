r"""EK-FAC — eigenvalue-corrected K-FAC (George et al. 2018) as a ``torch.optim`` optimizer.

K-FAC approximates a layer's Fisher block by ``Ā⊗Ḡ = (U_A⊗U_G) diag(s_A⊗s_G) (U_A⊗U_G)ᵀ``.
EK-FAC keeps that eigenbasis ``Q = U_A⊗U_G`` and replaces the eigenvalue products ``s_G s_Aᵀ``
by the Fisher's own second moments in it,

    S = (1/B) Σ_i (U_Gᵀ g_i U_A)∘(U_Gᵀ g_i U_A)          (``kron.eigen_correction``)

with ``g_i = Σ_t ẽ_itᵀ a_it`` the per-example gradient of the Fisher's labels (``ẽ = e`` for the
empirical Fisher, sampled-label errors for the MC Fisher, as in :class:`KFAC`). ``S`` is the
diagonal of ``Qᵀ F Q`` for the batch's Fisher ``F = (1/B) Σ_i vec(g_i) vec(g_i)ᵀ`` — the best
diagonal approximation of ``F`` in that basis (in Frobenius norm) — computed from the captures
without forming any ``g_i``. The step of one layer is

    s = (Q diag(S̄) Qᵀ + λI)⁻¹ ∇W = U_G ((U_Gᵀ ∇W U_A) / (S̄ + λ)) U_Aᵀ   (``kron.corrected_solve``)

For a ``Linear`` the rotated gradient is formed from the captures, ``U_Gᵀ ∇W U_A = (e U_G)ᵀ(a
U_A)/B`` (``kron.corrected_solve_captures``), when that costs less than forming ``∇W`` and
rotating it: at ``d_in = d_out = 1000``, ``B = 100`` it saves two of the four
``d_out·d_in·(d_in + d_out)`` products of the step (the back-rotation stays). A convolution's
``∇W`` comes from its native backward (``kron.corrected_solve``).

Schedule (step counter ``k`` from 0, ``curvlinalg.schedule.refresh_due``):

* every ``update_every`` steps the batch is folded into the factor averages ``Ā``, ``Ḡ``
  (exactly :class:`KFAC`'s factors: ``A = Σ_{i,t} a aᵀ/B``, ``G = Σ_{i,t} ẽ ẽᵀ/(B·T)``, EMA
  with ``ema_decay``, first estimate taken as is);
* every ``inverse_every`` steps the eigenbases ``U_A``, ``U_G`` are recomputed from the
  averages (``kron.eigh``), and **the correction is re-estimated from scratch** on that step's
  batch in the new basis: ``S̄ = S_batch`` (George et al. re-estimate ``S`` after each basis
  refresh; an average of second moments measured in another basis is not a diagonal of ``F``
  in this one, and there is no cheap way to rotate it);
* between refreshes, every ``update_every`` steps, ``S̄ ← kron.ema(S̄, S_batch, ema_decay)`` in
  the current basis.

With ``update_every = inverse_every = 1`` (the defaults), ``S̄`` is the current batch's
correction. The MC Fisher's sampled backward runs on every step that folds factors *or*
refreshes the basis (both need the Fisher's errors). With one example (``B = 1``, ``T = 1``)
the Fisher is exactly ``Ā⊗Ḡ`` on the first step, ``S = s_G s_Aᵀ`` and the step equals
``KFAC(damping_rule="exact")``'s.

Under ``distributed=True`` the factors and the EMA-updated ``S̄`` are averaged over the ranks
with the factors (one all-reduce), the eigendecompositions are spread over the ranks as for
:class:`KFAC`, and the fresh correction of a refresh step is computed on every rank in the
shared new basis and averaged (one more all-reduce on those steps): ``S`` is a mean over
examples, so ``N`` ranks with ``B/N`` examples each get the correction of the whole batch.

Momentum, weight decay, the SGD group, the non-finite skip and state dicts are
:class:`CurvatureOptimizer`'s; the MC label generator is :class:`KFAC`'s.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from curvlinalg import kron

from .capture import LayerCapture, LossReduction
from .kfac import KFAC, FisherType

__all__ = ["EKFAC"]


class EKFAC(KFAC):
    r"""EK-FAC: ``θ ← θ − lr·(μ-momentum of (Q diag(S̄) Qᵀ + λI)⁻¹ ∇W + wd·θ)`` per captured
    layer, ``Q = U_A⊗U_G`` the eigenbasis of K-FAC's factors and ``S̄`` the averaged
    eigenvalue correction (see the module docstring for the schedule).

    Args:
        model: the network (see :class:`FOOF`); for ``fisher="mc"`` its output must be
            ``(B, C)`` or ``(B, T, C)`` logits; ``set_mask`` as for :class:`KFAC` (the
            correction is ``kron.eigen_correction(…, mask=…)``).
        lr: learning rate.
        damping: ``λ > 0``, added to every corrected eigenvalue (exact damping of
            ``Q diag(S̄) Qᵀ``; there is no factored split).
        fisher: ``"mc"`` (sampled labels) or ``"empirical"`` (data labels), for the factors
            and the correction alike.
        update_every: fold the batch into ``Ā``, ``Ḡ`` and into ``S̄`` every this many steps.
        inverse_every: recompute the eigenbases every this many steps (and restart ``S̄``
            from that step's batch).
        generator, seed, momentum, weight_decay, ema_decay: as for :class:`KFAC`.
        factor_dtype, loss_reduction, other_lr, layers, distributed: as for :class:`KFAC`.
        options: any further keyword argument of :class:`KFAC` (e.g. its fallback optimizer
            for the parameters outside the captured layers).

    Per-layer state (:meth:`layer_state`): ``"A"``, ``"G"`` (averages, upper triangles: read
    them with :meth:`factor`), ``"A_values"``, ``"A_vectors"``, ``"G_values"``,
    ``"G_vectors"`` (eigendecompositions of the last refresh), ``"S"`` (the ``(d_out,
    d_in[+1])`` averaged correction), ``"momentum_buffer"``.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        damping: float,
        *,
        fisher: FisherType = "mc",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        ema_decay: float = 0.95,
        update_every: int = 1,
        inverse_every: int = 1,
        factor_dtype: torch.dtype = torch.float32,
        loss_reduction: LossReduction = "mean",
        other_lr: float | None = None,
        layers: Iterable[nn.Module] | None = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        distributed: bool = False,
        **options: Any,
    ) -> None:
        if isinstance(damping, tuple):
            raise ValueError(
                "EKFAC's damping is one positive number λ added to the corrected eigenvalues; "
                f"got the pair {damping!r}"
            )
        super().__init__(
            model,
            lr,
            damping,
            fisher=fisher,
            damping_rule="exact",
            momentum=momentum,
            weight_decay=weight_decay,
            ema_decay=ema_decay,
            update_every=update_every,
            inverse_every=inverse_every,
            factor_dtype=factor_dtype,
            loss_reduction=loss_reduction,
            other_lr=other_lr,
            layers=layers,
            generator=generator,
            seed=seed,
            distributed=distributed,
            **options,
        )
        # Corrections folded on this step, averaged over the ranks with the factors.
        self._folded_corrections: list[Tensor] = []
        # Set while the base class spreads the eigendecompositions over the ranks: the fresh
        # correction then waits until every rank has the new basis.
        self._spreading = False
        # Fresh corrections of this step's refreshes: a non-finite one skips the step (an
        # infinite S divides the step to zero, which the check of the steps cannot see).
        self._fresh_corrections: list[Tensor] = []

    # ------------------------------------------------------------------ schedule

    def _basis_due(self, state: dict[str, Tensor]) -> bool:
        return self._period_due(self.inverse_every) or not self._has_preconditioner(state)

    def _factor_due(self, index: int) -> bool:
        # A basis refresh re-estimates S from the batch: it needs the Fisher's errors too.
        return super()._factor_due(index) or self._basis_due(self._layer_state[index])

    def _has_preconditioner(self, state: dict[str, Tensor]) -> bool:
        return "A_vectors" in state and "S" in state

    # ------------------------------------------------------------------ correction

    def _batch_correction(self, layer: LayerCapture, state: dict[str, Tensor]) -> Tensor:
        """``S_batch = (1/B) Σ_i (U_Gᵀ g_i U_A)²`` of this step's captures in the stored basis."""
        a = self._captured(layer, "a")
        e = self._captured(layer, "e_sampled" if self.fisher == "mc" else "e")
        return kron.eigen_correction(
            a,
            e,
            kron.Eigh(state["A_values"], state["A_vectors"]),
            kron.Eigh(state["G_values"], state["G_vectors"]),
            check_finite=False,
            # set_mask: kept positions only, mean over the B_eff examples with one.
            **({} if layer.mask is None else {"mask": layer.mask}),
        )

    def _accumulate(self, layer: LayerCapture, state: dict[str, Tensor]) -> None:
        super()._accumulate(layer, state)
        if "S" in state and not self._basis_due(state):
            # On a refresh step the correction is re-estimated after the new basis instead.
            # An overflowing correction (a diverging run: captures still finite) is one more
            # new factor: the base class skips the step on it, with every state untouched.
            state["S"] = kron.ema(
                state["S"], self._batch_correction(layer, state), self.ema_decay, check_finite=False
            )
            self._new_factors.append(state["S"])
            if self.distributed:
                self._folded_corrections.append(state["S"])

    def _reduced_with_factors(self) -> list[Tensor]:
        # ρ·S̄ + (1−ρ)·mean_r S_r: S̄ is the same on every rank, so averaging the folded
        # averages is averaging the batch corrections.
        folded, self._folded_corrections = self._folded_corrections, []
        return super()._reduced_with_factors() + folded

    def _on_skip(self) -> None:
        super()._on_skip()
        self._folded_corrections = []
        self._fresh_corrections = []

    def _refreshed_state(self) -> list[Tensor]:
        fresh, self._fresh_corrections = self._fresh_corrections, []
        return super()._refreshed_state() + fresh

    def _refresh(self, layer: LayerCapture, state: dict[str, Tensor], damping: Any) -> None:
        super()._refresh(layer, state, damping)  # eigenbases (KFAC's exact rule)
        if not self._spreading:
            state["S"] = self._batch_correction(layer, state)
            self._fresh_corrections.append(state["S"])

    def _refresh_spread(self, stale: list[tuple[int, LayerCapture]], damping: Any) -> None:
        self._spreading = True
        try:
            super()._refresh_spread(stale, damping)
        finally:
            self._spreading = False
        corrections = [
            self._batch_correction(layer, self._layer_state[index]) for index, layer in stale
        ]
        averaged = self._reduce_over_ranks(corrections, mean=True)
        for (index, _), correction in zip(stale, averaged):
            self._layer_state[index]["S"] = correction
        self._fresh_corrections += list(averaged)

    # ------------------------------------------------------------------ the step

    def _direction(
        self, layer: LayerCapture, state: dict[str, Tensor], damping: Any
    ) -> Tensor | tuple[Tensor, Tensor, float]:
        a_eigh = kron.Eigh(state["A_values"], state["A_vectors"])
        g_eigh = kron.Eigh(state["G_values"], state["G_vectors"])
        if layer.kind != "linear":
            # A convolution's ∇W comes from its native backward: its unfolded a costs more.
            return kron.corrected_solve(
                self._gradient(layer), a_eigh, g_eigh, state["S"], damping, check_finite=False
            )
        # U_Gᵀ ∇W U_A from the rotated captures, (e U_G)ᵀ(a U_A)/B, when that is cheaper than
        # forming ∇W and rotating it (two d_out·d_in·(d_in + d_out) products saved at
        # d = 1000, B = 100; the back-rotation is the same in both orders).
        # corrected_solve_captures takes ∇W = Σ eᵀa / a.shape[0]; the loss's gradient
        # (:meth:`_gradient`) is Σ eᵀa / B for a mean loss and Σ eᵀa for a summed one.
        a, e = self._captured(layer, "a"), self._captured(layer, "e")
        batch = 1 if self.capture.loss_reduction == "sum" else layer.batch_size
        if int(a.shape[0]) != batch:
            e = e * (int(a.shape[0]) / batch)
        return kron.corrected_solve_captures(
            a, e, a_eigh, g_eigh, state["S"], damping, check_finite=False
        )
