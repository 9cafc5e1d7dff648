r"""FOOF — first-order optimisation on neurons (Benzing 2022), as a ``torch.optim`` optimizer.

For each captured layer the step is the gradient times the inverse of the damped,
exponentially averaged input factor (Benzing, ICML 2022, eq. 6):

    s = ∇W · (Ā + λI)⁻¹,      Ā ← ρ·Ā + (1−ρ)·A_batch   (Ā₀ = A₀, ``curvlinalg.kron.ema``)

with ``∇W`` the ``(d_out, d_in[+1])`` gradient block ``[W | b]`` (bias folded in as a column of
ones in ``a``), ``A_batch = Σ_{i,t} a_it a_itᵀ / B`` (``= kron.factor(a)`` for ``(B, d_in)``
captures; for convolutions and sequences the positions ``t`` are *summed* and the examples
averaged, ``T·kron.factor(a)``, as in Benzing's code and Grosse & Martens' KFC) and
``λ`` = ``damping``. The preconditioner does not depend on the loss, so FOOF needs no extra
backward pass and no output factor.

The gradient ``∇W = Σ_{i,t} e_itᵀ a_it / B`` has rank ≤ B·T, so the step is computed from the
captures (``kron.precondition_captures``: ``ã = a (Ā + λI)⁻¹``, then ``s = eᵀã / B`` fused into
the parameter or momentum update) whenever that costs fewer multiplications than forming
``∇W`` (``B·T < d_out``), else as ``kron.precondition_factored``. Autograd never forms
``W.grad`` for captured layers (see :mod:`curvlinalg_torch.capture`).

Hyperparameters use the mean-factor convention of curvlinalg: Benzing's sum-over-batch
``(lr, λ)`` for linear layers correspond to ``(lr/B, λ/B)`` here (NOTES.md); his suggested
``lr/λ`` ratio (the SGD-like step size) is unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ._optimizer import CurvatureOptimizer
from .capture import LayerCapture, LossReduction

__all__ = ["FOOF"]


class FOOF(CurvatureOptimizer):
    r"""FOOF: ``θ ← θ − lr·(μ-momentum of ∇W (Ā + λI)⁻¹ + wd·θ)`` per captured layer.

    Args:
        model: the network. Its ``nn.Linear`` and ``nn.Conv2d`` (groups=1) layers are
            preconditioned; every other trainable parameter gets momentum SGD with
            ``other_lr`` (default ``lr``).
        lr: learning rate (``param_groups[*]["lr"]``, so LR schedulers work).
        damping: ``λ > 0`` added to the averaged input factor before inverting.
        momentum: heavy-ball ``μ`` on the preconditioned step (``torch.optim.SGD`` semantics).
        weight_decay: ``wd``, added to the preconditioned step (decoupled from curvature).
        ema_decay: ``ρ`` of the factor average (first estimate taken as is).
        update_every: fold a batch into ``Ā`` every this many steps (``≥ 1``).
        inverse_every: recompute ``(Ā + λI)⁻¹`` every this many steps (Benzing's ``T``).
        factor_dtype: dtype of factors, inverses, momentum (float32 also for bf16/fp16
            models).
        loss_reduction: ``"mean"`` (the loss averages over the batch) or ``"sum"``.
        other_lr: learning rate of the non-captured parameters.
        layers: restrict the preconditioned layers to these modules.
        distributed: average factors, steps and other gradients over the ranks of the
            initialised ``torch.distributed`` group (see :class:`CurvatureOptimizer`).
        other_optimizer: a ``torch.optim.Optimizer`` class (e.g. ``torch.optim.AdamW``) for
            the first-order fallback instead of the built-in momentum SGD; its learning rate
            is ``other_lr`` (``param_groups[1]["lr"]``), its other arguments
            ``other_optimizer_kwargs``; its state is part of :meth:`state_dict`.
        other_optimizer_kwargs: keyword arguments of ``other_optimizer`` (``lr`` allowed
            instead of ``other_lr``).

    Usage — exactly as ``torch.optim.SGD``::

        opt = FOOF(model, lr=0.3, damping=1.0, momentum=0.9, inverse_every=100)
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

    The forward must run between ``zero_grad()`` and ``step()`` (one forward per step).
    Per-layer state (:meth:`layer_state`): ``"A"`` (averaged factor, stored as its upper
    triangle: read it with ``optimizer.factor(layer, "A")``), ``"A_inv"``, ``"momentum_buffer"``.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        damping: float,
        *,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        ema_decay: float = 0.95,
        update_every: int = 1,
        inverse_every: int = 1,
        factor_dtype: torch.dtype = torch.float32,
        loss_reduction: LossReduction = "mean",
        other_lr: float | None = None,
        layers: Iterable[nn.Module] | None = None,
        distributed: bool = False,
        other_optimizer: type[torch.optim.Optimizer] | None = None,
        other_optimizer_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or damping <= 0:
            raise ValueError(f"damping must be a positive number; got {damping!r}")
        super().__init__(
            model,
            lr,
            float(damping),
            momentum=momentum,
            weight_decay=weight_decay,
            ema_decay=ema_decay,
            update_every=update_every,
            inverse_every=inverse_every,
            factor_dtype=factor_dtype,
            loss_reduction=loss_reduction,
            other_lr=other_lr,
            layers=layers,
            distributed=distributed,
            other_optimizer=other_optimizer,
            other_optimizer_kwargs=other_optimizer_kwargs,
        )

    def _accumulate(self, layer: LayerCapture, state: dict[str, Tensor]) -> None:
        self._accumulate_input(layer, state)

    def _has_preconditioner(self, state: dict[str, Tensor]) -> bool:
        return "A_inv" in state

    def _preconditioner_shapes(
        self, layer: LayerCapture, state: dict[str, Tensor]
    ) -> dict[str, tuple[int, ...]]:
        return {"A_inv": tuple(state["A"].shape)}

    def _refresh(self, layer: LayerCapture, state: dict[str, Tensor], damping: Any) -> None:
        state["A_inv"] = self._inverse(layer, self._symmetric_factor(state, "A"), damping, "input")

    def _direction(
        self, layer: LayerCapture, state: dict[str, Tensor], damping: Any
    ) -> Tensor | tuple[Tensor, Tensor, float]:
        return self._kronecker_direction(layer, state["A_inv"], None)
