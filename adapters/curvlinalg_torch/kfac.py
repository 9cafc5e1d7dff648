r"""K-FAC (Martens & Grosse 2015; Grosse & Martens 2016 for convolutions) as a ``torch.optim``
optimizer.

Per captured layer the Fisher block is approximated by ``Ā ⊗ Ḡ`` (curvlinalg's Kronecker
order: ``(A⊗G) vec(V) = vec(G V A)``) with exponentially averaged factors
(``curvlinalg.kron.ema``, first estimate taken as is):

* ``A = Σ_{i,t} a_it a_itᵀ / B`` — layer inputs with the bias column; positions ``t`` of a
  convolution or sequence are summed (``T·kron.factor(a)``);
* ``G = Σ_{i,t} ẽ_it ẽ_itᵀ / (B·T)`` — ``kron.factor(ẽ)``, the mean over examples and
  positions of the output errors ``ẽ`` of the Fisher's labels,

so that ``A⊗G = T·kron.factor(a)⊗kron.factor(ẽ)`` is KFC's approximation of
``E[g_i g_iᵀ]`` for ``g_i = Σ_t ẽ_itᵀ a_it``, and a plain ``Linear`` gets the usual mean
factors. ``fisher`` picks the labels:

* ``"mc"`` — labels sampled from the model, ``ỹ ~ softmax(z)``: at every forward whose step
  refreshes the factors, the optimizer back-propagates ``softmax(z) − onehot(ỹ)`` from the
  model's output once more (:meth:`Capture.backward_sampled`; ``.grad`` untouched). The model
  must return the ``(B, C)`` logits of a softmax classifier, or the ``(B, T, C)`` logits of a
  language model (one label per token; a sequence's loss is the sum of its token losses).
  Labels come from the optimizer's ``torch.Generator`` (``generator``/``seed``), saved in the
  state dict.

* ``"empirical"`` — the data labels: ``ẽ`` are the errors of the training loss itself, no
  extra backward.

Padding: ``opt.set_mask(labels != -100)`` (after ``zero_grad()``, before the forward; see
:meth:`CurvatureOptimizer.set_mask`) drops positions: they get no sampled label, zero errors
in every layer, and the factors are ``A = Σ_kept a aᵀ / B_eff`` (``kron.input_factor(a,
mask=…)``, ``B_eff`` the examples with a kept position) and ``G = kron.factor(ẽ, mask=…)``
(the mean over the kept positions) — the factors of the batch with the padding deleted.

``damping_rule`` picks the damped inverse:

* ``"factored"`` — ``(Ā + λ_A I)⁻¹ ⊗ (Ḡ + λ_G I)⁻¹`` with Martens & Grosse's π rule
  (``kron.split_damping``: ``λ_A λ_G = λ``, ``λ_A/λ_G = (tr Ā/d_in)/(tr Ḡ/d_out)``) and
  ``kron.inverse``; or explicit ``damping=(λ_A, λ_G)``. The step ``Ḡ⁻¹ ∇W Ā⁻¹`` is computed
  from the captures (``ẽ Ḡ⁻¹``, ``a Ā⁻¹``; ``kron.precondition_captures``) when that is
  cheaper than forming ``∇W``.
* ``"exact"`` — ``(Ā⊗Ḡ + λI)⁻¹`` in the Kronecker eigenbasis (``kron.eigh`` at each refresh,
  ``kron.eigen_solve`` each step: four ``d³``-type products; slower).

Everything else (schedule, momentum in preconditioned space, weight decay, skipping of
non-finite steps, state dicts, the SGD group) is :class:`CurvatureOptimizer`'s.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from curvlinalg import kron

from ._optimizer import CurvatureOptimizer, label_generator
from .capture import LayerCapture, LossReduction

__all__ = ["KFAC"]

FisherType = Literal["mc", "empirical"]
DampingRule = Literal["factored", "exact"]


class KFAC(CurvatureOptimizer):
    r"""K-FAC: ``θ ← θ − lr·(μ-momentum of (Ā⊗Ḡ + damping)⁻¹ ∇W + wd·θ)`` per captured layer.

    Args:
        model: the network (see :class:`FOOF`); for ``fisher="mc"`` its output must be
            ``(B, C)`` or ``(B, T, C)`` logits.
        lr: learning rate.
        damping: ``λ > 0``; with ``damping_rule="factored"`` also a pair ``(λ_A, λ_G)`` of
            explicit factor dampings (no π rule).
        fisher: ``"mc"`` (sampled labels, one extra backward per factor refresh) or
            ``"empirical"`` (data labels).
        damping_rule: ``"factored"`` (π rule, Cholesky inverses) or ``"exact"`` (eigenbasis).
        generator: ``torch.Generator`` for the MC labels (default: a new one on the model's
            device seeded with ``seed``, or from torch's global RNG when ``seed`` is None).
        seed: seed of the default generator.
        momentum, weight_decay, ema_decay, update_every, inverse_every: as for :class:`FOOF`.
        factor_dtype, loss_reduction, other_lr, layers, distributed, other_optimizer,
        other_optimizer_kwargs: as for :class:`FOOF`.

    Per-layer state: ``"A"``, ``"G"`` (averages, stored as upper triangles: read them with
    ``optimizer.factor(layer, key)``), ``"A_inv"``, ``"G_inv"`` (factored) or
    ``"A_values"``, ``"A_vectors"``, ``"G_values"``, ``"G_vectors"`` (exact),
    ``"momentum_buffer"``.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        damping: float | tuple[float, float],
        *,
        fisher: FisherType = "mc",
        damping_rule: DampingRule = "factored",
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
        other_optimizer: type[torch.optim.Optimizer] | None = None,
        other_optimizer_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if fisher not in ("mc", "empirical"):
            raise ValueError(f"fisher must be 'mc' or 'empirical'; got {fisher!r}")
        if damping_rule not in ("factored", "exact"):
            raise ValueError(f"damping_rule must be 'factored' or 'exact'; got {damping_rule!r}")
        damping = _check_damping(damping, damping_rule)
        super().__init__(
            model,
            lr,
            damping,  # type: ignore[arg-type]
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
        self.fisher: FisherType = fisher
        self.damping_rule: DampingRule = damping_rule
        self._needs_sampled_errors = fisher == "mc"
        self._rng_before: Tensor | None = None
        self._sample_handle = None
        if fisher == "mc":
            self.generator: torch.Generator | None = label_generator(self.model, generator, seed)
            self._sample_handle = self._register_model_hook(self._sample_hook)
        else:
            self.generator = None

    # ------------------------------------------------------------------ MC Fisher

    def _sample_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        """After the model's forward: back-propagate sampled-label errors when this step
        refreshes the factors (the data backward then runs on the retained graph)."""
        self._rng_before = None  # only draws of this forward may be undone by a skip
        if not (torch.is_grad_enabled() and self.capture.enabled and module.training):
            return
        if not any(layer.calls for layer in self.capture.layers):
            return
        if not any(self._factor_due(index) for index in range(len(self.capture.layers))):
            return
        if not isinstance(output, Tensor) or output.ndim not in (2, 3):
            shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise ValueError(
                f"{type(self).__name__}(fisher='mc') needs the model to return (B, C) or "
                f"(B, T, C) logits; got {shape} (use fisher='empirical', or restrict the model)"
            )
        if not bool(torch.isfinite(output.detach().sum())):
            return  # no labels from non-finite logits; the step will be skipped
        assert self.generator is not None
        self._rng_before = self.generator.get_state()
        self.capture.backward_sampled(output, self.generator)

    def _check_damping(self, damping: Any) -> Any:
        if isinstance(damping, tuple) and self.damping_rule == "factored":
            if len(damping) == 2 and all(
                not isinstance(v, bool)
                and isinstance(v, (int, float))
                and math.isfinite(v)
                and v > 0
                for v in damping
            ):
                return damping
            raise ValueError(
                "param_groups[0]['damping'] must be a positive finite number or a pair of them; "
                f"got {damping!r}"
            )
        return super()._check_damping(damping)

    def _on_skip(self) -> None:
        # A skipped step leaves every state untouched, the label RNG included.
        if self._rng_before is not None and self.generator is not None:
            self.generator.set_state(self._rng_before)
        self._rng_before = None

    def remove_hooks(self) -> None:
        """Detach the optimizer from the model (capture and sampling hooks)."""
        super().remove_hooks()
        if self._sample_handle is not None:
            self._sample_handle.remove()
            self._sample_handle = None

    # ------------------------------------------------------------------ factors and inverses

    def _accumulate(self, layer: LayerCapture, state: dict[str, Tensor]) -> None:
        self._accumulate_input(layer, state)
        # G = kron.factor(ẽ): mean over examples and positions (over the kept positions with a
        # mask: ẽ is zero at the masked ones, kron.factor(ẽ, mask=…)).
        count = layer.mask_counts()[0] if layer.mask is not None else None
        self._fold_factor(
            state,
            "G",
            self._captured(layer, "e_sampled" if self.fisher == "mc" else "e"),
            1.0,
            count=count,
        )

    def _has_preconditioner(self, state: dict[str, Tensor]) -> bool:
        return "A_inv" in state or "A_vectors" in state

    def _preconditioner_shapes(
        self, layer: LayerCapture, state: dict[str, Tensor]
    ) -> dict[str, tuple[int, ...]]:
        d_a, d_g = layer.d_in, state["G"].shape[0]
        if self.damping_rule == "exact":
            return {
                "A_values": (d_a,),
                "A_vectors": (d_a, d_a),
                "G_values": (d_g,),
                "G_vectors": (d_g, d_g),
            }
        return {"A_inv": tuple(state["A"].shape), "G_inv": (d_g, d_g)}

    def _refresh(self, layer: LayerCapture, state: dict[str, Tensor], damping: Any) -> None:
        a, g = self._symmetric_factor(state, "A"), self._symmetric_factor(state, "G")
        # A may carry zero padding (see _padded_a); the π rule's traces and the eigenbasis
        # use the layer's own width.
        a_own = a[: layer.d_in, : layer.d_in]
        if self.damping_rule == "exact":
            # Eigenvalues of a PSD factor can come out slightly negative by rounding; clamp
            # them so that s_G s_A + λ > 0 holds for every λ > 0.
            for key, matrix in (("A", a_own), ("G", g)):
                values, vectors = kron.eigh(matrix, check_finite=False)
                state[f"{key}_values"] = values.clamp_min(0)
                state[f"{key}_vectors"] = vectors
            return
        if isinstance(damping, tuple):
            damping_a, damping_g = damping
        else:
            damping_a, damping_g = kron.split_damping(a_own, g, damping)
        state["A_inv"] = self._inverse(layer, a, damping_a, "input (A)")
        state["G_inv"] = self._inverse(layer, g, damping_g, "output (G)")

    def _direction(
        self, layer: LayerCapture, state: dict[str, Tensor], damping: Any
    ) -> Tensor | tuple[Tensor, Tensor, float]:
        if self.damping_rule == "factored":
            return self._kronecker_direction(layer, state["A_inv"], state["G_inv"])
        return kron.eigen_solve(
            self._gradient(layer),
            kron.Eigh(state["A_values"], state["A_vectors"]),
            kron.Eigh(state["G_values"], state["G_vectors"]),
            damping,
            check_finite=False,
        )

    # ------------------------------------------------------------------ state dicts

    def _extra_state(self) -> dict[str, Any]:
        if self.generator is None:
            return {}
        return {"generator": self.generator.get_state()}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        if self.generator is not None and "generator" in extra:
            self.generator.set_state(extra["generator"])


def _check_damping(damping: Any, damping_rule: str) -> float | tuple[float, float]:
    def positive(value: Any) -> bool:
        return not isinstance(value, bool) and isinstance(value, (int, float)) and value > 0

    if isinstance(damping, tuple):
        if damping_rule != "factored":
            raise ValueError("damping=(λ_A, λ_G) is only meaningful with damping_rule='factored'")
        if len(damping) != 2 or not all(positive(v) for v in damping):
            raise ValueError(f"damping must be a positive number or a pair; got {damping!r}")
        return float(damping[0]), float(damping[1])
    if not positive(damping):
        raise ValueError(f"damping must be a positive number; got {damping!r}")
    return float(damping)
