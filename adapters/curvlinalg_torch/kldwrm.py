r"""KLD-WRM — KL-divergence wake-regularised models (Puiu 2022) as a ``torch.optim`` optimizer.

Puiu, *Rethinking exponential averaging of the Fisher* (ECML-PKDD 2022). An exponentially
averaged Fisher ``F̄_k = Σ_i κ(i) ρ^{k−i} F_i`` (``κ(0) = 1``, ``κ(i>0) = 1−ρ``) is what a step
gets when it is regularised by a *wake* of KL divergences to every previous network,
``λ Σ_i κ(i) ρ^{k−i} D(θ_i, θ_k + s)``. Three instantiations, one per ``variant``
(``θ_{k+1} = θ_k + s_k``, ``λ_k = 1/lr_k``):

* ``"so"`` — SO-KLD-WRM (eq. 26, Prop. 4.1): linear model, quadratic KL wake,
  ``s_k = −λ_k⁻¹ F̄_k⁻¹ (g_k − ρ (λ_k/λ_{k−1}) g_{k−1})`` (``curvlinalg.wake.so_gradient``).
* ``"q"`` — Q-KLD-WRM (eq. 28, Prop. 4.2): quadratic model ``g_kᵀs + ½sᵀB_k s``,
  ``s_k = −λ_k⁻¹ (F̄_k + B_k/λ_k)⁻¹ ĝ_k`` with the recursion
  ``ĝ_k = g_k + ρ (λ_k/λ_{k−1}) (ĝ_{k−1} − g_{k−1} − M̂_{k−1}ĝ_{k−1})``
  (``wake.q_gradient``) and the sum of Kronecker products solved exactly per layer
  (``wake.kron_q_step``).
* ``"qe"`` — QE-KLD-WRM (eq. 31): the same quadratic model with the *exact* symmetric KL to
  the last ``capacity`` stored networks, minimised by ``inner_steps`` SGD steps started from
  the Q step. Needs the model's outputs: see "The QE step contract" below.

Curvature per captured layer (``nn.Linear``, ``nn.Conv2d``; bias folded in as a column of ones)
is K-FAC's, as in the paper: ``F_k ≈ A_k ⊗ G_k`` with ``A = Σ_{i,t} a_it a_itᵀ/B`` and
``G = Σ_{i,t} ẽ_it ẽ_itᵀ/(B·T)`` of the MC-Fisher errors ``ẽ`` (labels sampled from the model,
``fisher="mc"``, one extra backward per factor update) or of the data labels
(``fisher="empirical"``, what Puiu's public code does). ``F̄`` is the product of the factor
averages ``Ā ⊗ Ḡ`` (``curvlinalg.kron.ema`` with decay ``ρ``, first estimate taken as is —
the κ convention); the *same* ρ decays the factors and enters the gradient recursions, as the
propositions require. (An average of the factors is not the average of their Kronecker
products; Puiu §3.2 calls this the usual, coarse, K-FAC approximation. It is the wake of the
matrices ``F_i = (F̄_i − ρF̄_{i−1})/(1−ρ)`` that the averages imply, and the tests check the
propositions for exactly those.)

Damping ``δ`` (``damping``):

* SO with ``damping_rule="exact"``: ``(Ā⊗Ḡ + δI)⁻¹`` in the Kronecker eigenbasis
  (``kron.eigh`` at refreshes, ``kron.eigen_solve`` each step).
* ``damping_rule="factored"`` (all variants; the only rule for Q and QE, whose matrix
  ``F̄ + B/λ`` is already a sum of two Kronecker products): ``F̄ = (Ā + δ_A I)⊗(Ḡ + δ_G I)`` with
  the π rule (``kron.split_damping``: ``δ_Aδ_G = δ``, ``δ_A/δ_G = (tr Ā/d_in)/(tr Ḡ/d_out)``),
  or an explicit pair ``damping=(δ_A, δ_G)``.

Local curvature of Q/QE: ``B_k = b_scale·A_k⊗G_k`` (the batch's own K-FAC matrix, undamped:
``B`` models the Hessian through the Fisher/GGN equivalence, Puiu §4.3) at steps whose batch
updates the factors; at other steps ``B_k = b_scale·Ā⊗Ḡ`` — Puiu's rule (20) for infrequent
updates ("pretend the new matrix is the average"). ``b_scale = 0`` gives ``B ≡ 0``, for which
Q-KLD-WRM *is* SO-KLD-WRM (Prop. 4.2). ``solver="exact"`` solves ``(F̄ + B/λ)`` exactly
(``kron.sum_solve`` through ``wake.kron_q_step``); ``solver="summed_factors"`` reproduces the
paper's public code, which replaces it by the single product
``(Ā_δ + b_A/λ)⊗(Ḡ_δ + b_G/λ)`` (over-weights B; offered only to compare with published runs).

Variable step size. ``λ_k = 1/lr_k`` is read from ``param_groups[0]["lr"]`` at every step, so
``torch.optim.lr_scheduler`` schedules work, and ``λ_{k−1}`` is the value of the previous
step; both enter the recursions (Puiu §4.4). ``lr`` must be positive.

Schedule (:class:`~curvlinalg_torch._optimizer.CurvatureOptimizer`): the factors take the
batch every ``update_every`` steps; the preconditioner (inverses or eigenbases for SO, the
damped factors ``Ā_δ, Ḡ_δ`` of F̄ for Q/QE) is recomputed every ``inverse_every`` steps. The
Q/QE solve itself (``wake.kron_q_step``: two Cholesky factorisations and two ``eigh`` per
layer) runs every step, because its matrix changes with ``B_k`` and ``λ_k``.

Everything else — momentum (in preconditioned space), decoupled weight decay
(``buf ← μ·buf + d + wd·θ``, ``θ ← θ − lr·buf`` with the direction ``d = −λ_k s_k``), plain
momentum SGD for parameters outside the captured layers, skipping of steps with non-finite
gradients or captures (no state changes), state dicts — is the base class's. Puiu's runs use
no momentum and no extra stabilisers (the public code adds KL clipping and RMS clipping,
NOTES.md §5; not reproduced here).

The QE step contract
--------------------
For ``variant="qe"``, ``step(closure)`` needs ``closure``: a function of no arguments that
runs the **forward pass of the current mini-batch** through ``model`` and returns its
outputs — ``(B, C)`` logits for ``divergence="categorical"`` (class axis 1, as
``F.cross_entropy``), the means of ``N(h, I)`` for ``divergence="gaussian"``. It must not call
``backward`` or ``zero_grad`` and should be deterministic (dropout makes the divergences
noisy; Puiu's code keeps it on). The ordinary loop is::

    optimizer.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step(lambda: model(x))

Inside the step, after the Q step ``θ = θ_k + s_Q`` has been applied:

1. ``θ_k`` joins a ring of the last ``capacity`` networks (all parameters of both groups);
   the closure is evaluated once at each stored network (``no_grad``, captures paused) to
   give the reference outputs ``h_i``.
2. ``inner_steps`` times: ``h = closure()`` at the current parameters, and the captured
   layers' parameters take one SGD step (momentum ``inner_momentum``, step size
   ``inner_lr·lr_k = inner_lr/λ_k``, Puiu's ``ω/λ``) on the objective (31)

   ``Φ(s) = g_kᵀs + ½ sᵀB_k s + λ_k ζ Σ_i w_i D(h_i, h(θ_k + s))``

   with ``s = θ − θ_k`` (captured layers only; other parameters keep their SGD step),
   ``w_i = curvlinalg.wake.weights(n, ρ)`` — the κ weights of the window, the oldest
   carrying the mass of everything older, so while the ring is not yet full the sum is the
   exact wake ``Σ_{i≤k} κ(i)ρ^{k−i}`` of (31) — and ``D`` the symmetric KL
   ``½[KL(p‖q) + KL(q‖p)]`` averaged over the batch: ``½ Σ_c (p_c − q_c)(log p_c − log q_c)``
   (categorical) or ``½‖h − h_i‖²`` (Gaussian, eq. 33). ``zeta`` is ``ζ/κ``: ``1`` is the
   objective whose second-order expansion gives the Q step (so the inner loop starts from
   its quadratic minimiser); Puiu's runs used ``1/330``.
3. :attr:`KLDWRM.inner_objective` holds ``Φ`` at the ``inner_steps`` iterates where a
   gradient was taken — the Q step first, the final point excluded (a tensor, no host
   synchronisation). If the final parameters are not finite the Q step is kept instead and a
   warning is issued. Model buffers (BatchNorm running statistics) are restored after the
   extra forwards, so only the user's own forward moves them.

Weight decay is not part of Φ (as in Puiu's code): it enters through the Q starting point.

Hyperparameters of the paper (NOTES.md §4.2, MNIST CNN): ``lr = 0.01`` (λ = 100),
``damping = 0.01``, ``ρ = 0.33`` (SO) / ``0.5`` (Q, QE), factors every 30 steps; QE:
``capacity = 4``, ``inner_steps = 10``, inner step ``ω/λ = 7·10⁻⁴`` (``inner_lr = 0.07`` at
``lr = 0.01``), ``ζ = κ/330``. Factors there are batch means, as here.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlinalg import kron, wake

from .capture import LayerCapture, LossReduction, matrix_to_parameters, parameters_to_matrix
from .kfac import KFAC, FisherType

__all__ = ["KLDWRM", "symmetric_kl"]

Variant = Literal["so", "q", "qe"]
Divergence = Literal["categorical", "gaussian"]
DivergenceFn = Callable[[Tensor, Tensor], Tensor]

#: Puiu's ρ per variant (NOTES.md §4.2): SO 0.33, Q and QE 0.5.
PAPER_RHO = {"so": 0.33, "q": 0.5, "qe": 0.5}


def symmetric_kl(
    outputs: Tensor, reference: Tensor, divergence: Divergence | DivergenceFn = "categorical"
) -> Tensor:
    r"""Batch mean of the symmetric KL ``D = ½[KL(p‖q) + KL(q‖p)]`` between two predictions.

    ``divergence="categorical"``: ``outputs`` and ``reference`` are logits with the classes on
    axis 1 (``(B, C)`` or ``(B, C, …)``); ``D = ½ Σ_c (p_c − q_c)(log p_c − log q_c)`` with
    ``p = softmax(outputs)``, ``q = softmax(reference)`` (log-softmax for stability), averaged
    over every other axis. ``"gaussian"``: means of ``N(h, I)``; ``D = ½‖h − h_ref‖²`` summed
    over all but the batch axis and averaged over the batch (Puiu eq. 33–34). A callable
    ``divergence(outputs, reference)`` is returned as is. Returns a 0-d tensor.
    """
    if callable(divergence):
        return divergence(outputs, reference)
    if outputs.shape != reference.shape:
        raise ValueError(
            f"shape mismatch: outputs have shape {tuple(outputs.shape)} but the reference "
            f"outputs have {tuple(reference.shape)}"
        )
    if divergence == "categorical":
        if outputs.ndim < 2:
            raise ValueError(f"categorical outputs must be (B, C, …); got {tuple(outputs.shape)}")
        log_p = F.log_softmax(outputs, dim=1)
        log_q = F.log_softmax(reference, dim=1)
        return 0.5 * ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(dim=1).mean()
    if divergence == "gaussian":
        difference = (outputs - reference).reshape(outputs.shape[0], -1)
        return 0.5 * difference.square().sum(dim=1).mean()
    raise ValueError(
        f"divergence must be 'categorical', 'gaussian' or a callable; got {divergence!r}"
    )


class KLDWRM(KFAC):
    r"""SO-, Q- and QE-KLD-WRM with Kronecker-factored Fisher blocks (see the module docstring).

    Args:
        model: the network. Its ``nn.Linear`` and ``nn.Conv2d`` (groups=1) layers get the
            KLD-WRM step; every other trainable parameter gets momentum SGD (``other_lr``).
            With ``fisher="mc"`` (or QE's ``"categorical"`` divergence) its output must be
            ``(B, C)`` logits.
        lr: learning rate ``1/λ`` (> 0), read at every step (LR schedulers change λ_k).
        variant: ``"so"``, ``"q"`` or ``"qe"``.
        rho: wake decay ``ρ ∈ [0, 1)`` of both the factor averages and the gradient
            recursion; default Puiu's value for the variant (0.33 SO, 0.5 Q/QE).
        damping: ``δ > 0`` (or ``(δ_A, δ_G)`` with ``damping_rule="factored"``).
        fisher: ``"mc"`` (sampled labels, the paper's Fisher) or ``"empirical"`` (data
            labels, Puiu's code).
        damping_rule: ``"factored"`` (π rule; all variants) or ``"exact"`` (SO only).
        solver: Q/QE solve of ``F̄ + B/λ``: ``"exact"`` or ``"summed_factors"`` (paper code).
        b_scale: ``B_k = b_scale·A_k⊗G_k`` (Q/QE); ``0`` makes Q equal SO.
        capacity, inner_steps, inner_lr, inner_momentum, zeta, divergence: QE's number of
            stored networks ``N_CAP`` (≥ 1), inner SGD steps ``N_IS`` (≥ 0), inner step size
            factor ``ω`` (inner step ``ω·lr``), inner momentum, weight ``ζ/κ`` of the exact KL
            wake and the divergence (``"categorical"``, ``"gaussian"`` or a callable
            ``(outputs, reference) → 0-d tensor``).
        momentum, weight_decay, update_every, inverse_every, factor_dtype: as for
            :class:`~curvlinalg_torch.KFAC`.
        loss_reduction, other_lr, layers, generator, seed, other_optimizer,
        other_optimizer_kwargs: as for :class:`~curvlinalg_torch.KFAC`.
        distributed: as for :class:`~curvlinalg_torch.FOOF` (SO and Q; the batch's own
            factors ``B_k`` are averaged over the ranks with the factor averages).

    Per-layer state (:meth:`layer_state`): ``"A"``, ``"G"`` (averages); SO: ``"A_inv"``,
    ``"G_inv"`` or the eigenbases ``"A_values"``, ``"A_vectors"``, ``"G_values"``,
    ``"G_vectors"``; Q/QE: ``"A_damped"``, ``"G_damped"`` (factors of F̄), ``"ghat_prev"``,
    ``"m_ghat_prev"`` (``ĝ_{k−1}``, ``M̂_{k−1}ĝ_{k−1}``); all: ``"grad_prev"`` (``g_{k−1}``),
    ``"momentum_buffer"``.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        variant: Variant = "so",
        rho: float | None = None,
        damping: float | tuple[float, float] = 1e-2,
        *,
        fisher: FisherType = "mc",
        damping_rule: Literal["factored", "exact"] = "factored",
        solver: Literal["exact", "summed_factors"] = "exact",
        b_scale: float = 1.0,
        capacity: int = 4,
        inner_steps: int = 10,
        inner_lr: float = 0.07,
        inner_momentum: float = 0.0,
        zeta: float = 1.0,
        divergence: Divergence | DivergenceFn = "categorical",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
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
        if variant not in ("so", "q", "qe"):
            raise ValueError(f"variant must be 'so', 'q' or 'qe'; got {variant!r}")
        if variant == "qe" and (
            distributed or isinstance(model, nn.parallel.DistributedDataParallel)
        ):
            raise ValueError(
                "variant='qe' does not support distributed training: its inner loop "
                "differentiates the KL to the stored networks on the local batch only"
            )
        if rho is None:
            rho = PAPER_RHO[variant]
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0 <= rho < 1:
            raise ValueError(f"rho must be a number in [0, 1); got {rho!r}")
        if variant != "so" and damping_rule != "factored":
            raise ValueError(
                f"damping_rule must be 'factored' for variant={variant!r}: F̄ + B/λ with an "
                f"exactly damped F̄ is a sum of three Kronecker products; got {damping_rule!r}"
            )
        if solver not in ("exact", "summed_factors"):
            raise ValueError(f"solver must be 'exact' or 'summed_factors'; got {solver!r}")
        _nonnegative("b_scale", b_scale)
        _count("capacity", capacity, minimum=1)
        _count("inner_steps", inner_steps, minimum=0)
        _nonnegative("inner_lr", inner_lr)
        _nonnegative("zeta", zeta)
        _nonnegative("inner_momentum", inner_momentum)
        if inner_momentum >= 1:
            raise ValueError(f"inner_momentum must be in [0, 1); got {inner_momentum!r}")
        if not callable(divergence) and divergence not in ("categorical", "gaussian"):
            raise ValueError(
                f"divergence must be 'categorical', 'gaussian' or a callable; got {divergence!r}"
            )
        if isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr <= 0:
            raise ValueError(f"lr must be > 0 (λ = 1/lr); got {lr!r}")
        super().__init__(
            model,
            lr,
            damping,
            fisher=fisher,
            damping_rule=damping_rule,
            momentum=momentum,
            weight_decay=weight_decay,
            ema_decay=float(rho),
            update_every=update_every,
            inverse_every=inverse_every,
            factor_dtype=factor_dtype,
            loss_reduction=loss_reduction,
            other_lr=other_lr,
            layers=layers,
            generator=generator,
            seed=seed,
            distributed=distributed,
            other_optimizer=other_optimizer,
            other_optimizer_kwargs=other_optimizer_kwargs,
        )
        self.variant: Variant = variant
        self.rho = float(rho)
        self.solver = solver
        self.b_scale = float(b_scale)
        self.capacity = capacity
        self.inner_steps = inner_steps
        self.inner_lr = float(inner_lr)
        self.inner_momentum = float(inner_momentum)
        self.zeta = float(zeta)
        self.divergence = divergence
        #: ``Φ`` at the inner iterates of the last QE step (``inner_steps`` values).
        self.inner_objective: Tensor | None = None
        self._lam_prev: float | None = None
        self._lam = 1.0
        # Transient, per step: the local factors of layers whose factors took this batch,
        # and what QE's inner loop needs from the outer step (θ_k, g_k, B_k factors).
        self._local: dict[int, tuple[Tensor, Tensor]] = {}
        self._taken: list[tuple[LayerCapture, dict[str, Tensor]]] = []
        # QE: the ring of stored networks θ_{k−n+1..k}, each a list over all parameters.
        self._ring: list[list[Tensor]] = []

    # ------------------------------------------------------------------ MC Fisher

    def _sample_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        """KFAC's label sampling, except on non-finite logits: labels cannot be sampled from
        them (``curvlinalg.fisher`` raises), so NaN errors are back-propagated instead and the
        step's finiteness check skips the step as it does for any non-finite capture.

        The RNG state saved for a skip is reset at every forward: a forward that draws no
        labels must not make a later skip rewind the generator to an older draw."""
        self._rng_before = None
        if (
            isinstance(output, Tensor)
            and torch.is_grad_enabled()
            and self.capture.enabled
            and module.training
            and any(layer.calls for layer in self.capture.layers)
            and any(self._factor_due(index) for index in range(len(self.capture.layers)))
            and not bool(torch.isfinite(output.detach()).all())
        ):
            self.capture.backward_errors(output, torch.full_like(output.detach(), math.nan))
            return
        super()._sample_hook(module, args, output)

    # ------------------------------------------------------------------ factors

    def _accumulate(self, layer: LayerCapture, state: dict[str, Tensor]) -> None:
        """``Ā ← ρĀ + (1−ρ)A_k``, ``Ḡ ← ρḠ + (1−ρ)G_k`` (``wake.average``, ``F̄_0 = F_0``) with
        ``A_k = Σ_{i,t} a_it a_itᵀ/B`` (``T·kron.factor(a)``, positions summed as in KFC) and
        ``G_k = kron.factor(ẽ)``; the local pair is kept for this step's ``B_k``. With a
        padding mask (:meth:`set_mask`) both leave the masked positions out, as in
        :class:`KFAC`: ``A_k = Σ_kept a aᵀ / B_eff``, ``G_k`` the mean over kept positions."""
        a = self._captured(layer, "a")
        mask = layer.mask
        a_new = kron.input_factor(a, check_finite=False, mask=mask)
        errors = self._captured(layer, "e_sampled" if self.fisher == "mc" else "e")
        g_new = kron.factor(errors, check_finite=False, mask=mask)
        self._local[id(state)] = (a_new, g_new)
        # Unchecked here: a non-finite new factor skips the step (the base class checks
        # _new_factors before anything is committed).
        state["A"] = wake.average(state.get("A"), a_new, self.rho, check_finite=False)
        state["G"] = wake.average(state.get("G"), g_new, self.rho, check_finite=False)
        self._new_factors += [state["A"], state["G"]]

    def _has_preconditioner(self, state: dict[str, Tensor]) -> bool:
        if self.variant == "so":
            return super()._has_preconditioner(state)
        return "A_damped" in state

    def _preconditioner_shapes(
        self, layer: LayerCapture, state: dict[str, Tensor]
    ) -> dict[str, tuple[int, ...]]:
        if self.variant == "so":
            return super()._preconditioner_shapes(layer, state)
        return {"A_damped": tuple(state["A"].shape), "G_damped": tuple(state["G"].shape)}

    def _reduced_with_factors(self) -> list[Tensor]:
        # B_k of Q/QE is the whole batch's factor pair: average the ranks' local ones.
        return [tensor for pair in self._local.values() for tensor in pair]

    def _refresh(self, layer: LayerCapture, state: dict[str, Tensor], damping: Any) -> None:
        if self.variant == "so":
            super()._refresh(layer, state, damping)
            return
        # Q/QE: keep the damped factors of F̄ = (Ā + δ_A I)⊗(Ḡ + δ_G I); kron_q_step needs
        # the matrices, not their inverses.
        a, g = state["A"], state["G"]
        if isinstance(damping, tuple):
            damping_a, damping_g = damping
        else:
            damping_a, damping_g = kron.split_damping(a, g, damping)
        eye_a = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
        eye_g = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
        state["A_damped"] = a + damping_a * eye_a
        state["G_damped"] = g + damping_g * eye_g

    # ------------------------------------------------------------------ directions

    def _direction(self, layer: LayerCapture, state: dict[str, Tensor], damping: Any) -> Tensor:
        """``d = −λ_k s_k`` (the base class applies ``θ ← θ − lr·d``, i.e. ``θ + s_k``)."""
        g = self._gradient(layer)
        lam, lam_prev = self._lam, self._lam_prev or self._lam
        if self.variant == "so":
            modified = wake.so_gradient(g, state.get("grad_prev"), self.rho, lam, lam_prev)
            state["grad_prev"] = g
            if self.damping_rule == "exact":
                return kron.eigen_solve(
                    modified,
                    kron.Eigh(state["A_values"], state["A_vectors"]),
                    kron.Eigh(state["G_values"], state["G_vectors"]),
                    damping,
                    check_finite=False,
                )
            return kron.precondition(modified, state["A_inv"], state["G_inv"], check_finite=False)
        ghat = wake.q_gradient(
            g,
            state.get("ghat_prev"),
            state.get("grad_prev"),
            state.get("m_ghat_prev"),
            self.rho,
            lam,
            lam_prev,
        )
        # B_k: the batch's own factors when they entered the averages this step, else the
        # averages (Puiu's rule (20)); b_scale scales the product through one factor.
        b_a, b_g = self._local.get(id(state), (state["A"], state["G"]))
        b_a = b_a * self.b_scale
        step, m_ghat = wake.kron_q_step(
            ghat,
            state["A_damped"],
            state["G_damped"],
            b_a,
            b_g,
            lam,
            solver=self.solver,
            check_finite=False,
        )
        state["grad_prev"], state["ghat_prev"], state["m_ghat_prev"] = g, ghat, m_ghat
        if self.variant == "qe":
            self._taken.append((layer, {"g": g, "b_a": b_a, "b_g": b_g}))
        return step * (-lam)

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Callable[[], Any] | None = None, grad_scaler: Any = None
    ) -> Any:
        """One KLD-WRM step from the captures of the last forward/backward.

        SO and Q: ``closure`` (optional) follows ``torch.optim``: it runs the forward and the
        backward and returns the loss, which is returned. QE: ``closure`` is required and is
        the *forward function* of the current mini-batch (module docstring, "The QE step
        contract"); returns ``None`` (under a ``GradScaler``: ``scaler.step(opt, closure)``).
        ``grad_scaler``: passed by ``torch.amp.GradScaler.step`` (:mod:`curvlinalg_torch.amp`).
        """
        lr = self.param_groups[0]["lr"]
        if not lr > 0:
            raise ValueError(f"lr must be > 0 for KLD-WRM (λ = 1/lr); got {lr!r}")
        if self.variant == "qe" and closure is None:
            raise ValueError(
                "variant='qe' needs step(closure) with closure() returning the model's outputs "
                "on the current mini-batch (see the KLDWRM docstring)"
            )
        self._lam = 1.0 / float(lr)
        self._local = {}
        self._taken = []
        steps = self._steps
        start = self._snapshot() if self.variant == "qe" else None
        try:
            result = super().step(None if self.variant == "qe" else closure, grad_scaler)
            if self._steps == steps:  # skipped: no state may change
                return result
            self._lam_prev = self._lam
            if self.variant != "qe":
                return result
            assert start is not None and closure is not None
            self._ring.append(start)
            del self._ring[: -self.capacity]
            self._inner_loop(closure)
            return None
        finally:
            self._local = {}
            self._taken = []

    def _parameters(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _snapshot(self) -> list[Tensor]:
        return [p.detach().clone() for p in self._parameters()]

    def _load(self, values: list[Tensor]) -> None:
        for p, value in zip(self._parameters(), values):
            p.copy_(value)

    def _outputs(self, closure: Callable[[], Any]) -> Tensor:
        outputs = closure()
        if not isinstance(outputs, Tensor) or outputs.ndim == 0:
            raise ValueError(
                "variant='qe': closure() must return the model's outputs on the current "
                f"mini-batch (a (B, …) tensor), not a loss; got {type(outputs).__name__}"
                + (f" of shape {tuple(outputs.shape)}" if isinstance(outputs, Tensor) else "")
            )
        return outputs

    def _inner_loop(self, closure: Callable[[], Any]) -> None:
        """QE: minimise Φ(s) (module docstring, eq. 31) by SGD from the Q step."""
        taken = self._taken
        self.inner_objective = None
        if self.inner_steps == 0 or not taken:
            return
        capture_enabled = self.capture.enabled
        self.capture.enabled = False  # the inner passes are not batches of the curvature
        # The extra forwards must not move running statistics (BatchNorm) either.
        model_buffers = [(b, b.clone()) for b in self.model.buffers()]
        try:
            after_q = self._snapshot()
            references = []
            for stored in self._ring:
                self._load(stored)
                references.append(self._outputs(closure).detach())
            self._load(after_q)
            weights = wake.weights(len(references), self.rho)
            scale = self._lam * self.zeta
            start = self._ring[-1]  # θ_k
            index = {id(p): i for i, p in enumerate(self._parameters())}
            thetas = [self._block(layer, start, index) for layer, _ in taken]
            # Frozen parameters (a bias with requires_grad=False) are not differentiated or moved.
            params = [p for layer, _ in taken for p in _trainable(layer)]
            step_size = self.inner_lr / self._lam
            velocities: list[Tensor | None] = [None] * len(taken)
            values = []
            for _ in range(self.inner_steps):
                with torch.enable_grad():
                    outputs = self._outputs(closure)
                    divergence = sum(
                        w * symmetric_kl(outputs, reference, self.divergence)
                        for w, reference in zip(weights, references)
                    )
                    grads = torch.autograd.grad(scale * divergence, params, allow_unused=True)
                value = scale * divergence.detach()
                position = 0
                for j, (layer, saved) in enumerate(taken):
                    count = len(_trainable(layer))
                    grad_kl = _block_from(layer, grads[position : position + count])
                    position += count
                    s = parameters_to_matrix(layer.module).to(saved["g"].dtype) - thetas[j]
                    b_s = saved["b_g"] @ s @ saved["b_a"]  # mat(B_k vec s)
                    value = value + (saved["g"] * s).sum() + 0.5 * (s * b_s).sum()
                    grad = saved["g"] + b_s + grad_kl.to(s.dtype)
                    velocity = velocities[j]
                    if self.inner_momentum and velocity is not None:
                        grad = velocity.mul_(self.inner_momentum).add_(grad)
                    velocities[j] = grad
                    _add_trainable(layer, grad, -step_size)
                values.append(value)
            self.inner_objective = torch.stack(values)
            if not all(bool(torch.isfinite(p).all()) for p in params):
                self._load(after_q)
                warnings.warn(
                    "KLDWRM(variant='qe'): the inner loop produced non-finite parameters; the "
                    "Q step was kept (reduce inner_lr)",
                    RuntimeWarning,
                    stacklevel=3,
                )
        finally:
            self.capture.enabled = capture_enabled
            for buffer, saved in model_buffers:
                buffer.copy_(saved)

    def _block(self, layer: LayerCapture, values: list[Tensor], index: dict[int, int]) -> Tensor:
        """The ``(d_out, d_in[+1])`` block of ``layer`` from a snapshot of all parameters."""
        module = layer.module
        weight = values[index[id(module.weight)]]
        block = weight.reshape(weight.shape[0], -1)
        if layer.has_bias:
            block = torch.cat([block, values[index[id(module.bias)]][:, None]], dim=1)
        return block.to(self.factor_dtype)

    # ------------------------------------------------------------------ state dicts

    def _extra_state(self) -> dict[str, Any]:
        extra = super()._extra_state()
        extra["lam_prev"] = self._lam_prev
        extra["ring"] = [[t.clone() for t in stored] for stored in self._ring]
        return extra

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        super()._load_extra_state(extra)
        self._lam_prev = extra.get("lam_prev")
        params = self._parameters()
        self._ring = [
            [t.detach().clone().to(p.device) for t, p in zip(stored, params)]
            for stored in extra.get("ring", [])
        ]


def _trainable(layer: LayerCapture) -> list[Tensor]:
    """The weight and, unless frozen, the bias of a layer whose step was taken."""
    module = layer.module
    bias = [module.bias] if layer.has_bias and module.bias.requires_grad else []
    return [module.weight, *bias]


def _add_trainable(layer: LayerCapture, matrix: Tensor, alpha: float) -> None:
    """``[W | b] += alpha·matrix`` on the trainable parameters only (a frozen bias stays)."""
    weight_part, bias_part = matrix_to_parameters(matrix, layer.module)
    with torch.no_grad():
        weight = layer.module.weight
        weight.add_(weight_part.to(weight.dtype), alpha=alpha)
        if bias_part is not None and layer.module.bias.requires_grad:
            layer.module.bias.add_(bias_part.to(layer.module.bias.dtype), alpha=alpha)


def _block_from(layer: LayerCapture, grads: tuple[Tensor | None, ...]) -> Tensor:
    """``[∂W.reshape(d_out, −1) | ∂b]`` from autograd's gradients of :func:`_trainable`
    (zeros where unused or frozen)."""
    module = layer.module
    weight = module.weight
    grad_w = grads[0] if grads[0] is not None else torch.zeros_like(weight)
    block = grad_w.reshape(weight.shape[0], -1)
    if layer.has_bias:
        grad_b = grads[1] if len(grads) > 1 and grads[1] is not None else None
        if grad_b is None:
            grad_b = torch.zeros_like(module.bias)
        block = torch.cat([block, grad_b[:, None]], dim=1)
    return block


def _nonnegative(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a number ≥ 0; got {value!r}")
    if value == float("inf"):
        raise ValueError(f"{name} must be finite; got {value!r}")


def _count(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer ≥ {minimum}; got {value!r}")
