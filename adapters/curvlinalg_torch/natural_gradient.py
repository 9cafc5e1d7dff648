r"""Exact subsampled natural gradient (Benzing 2022, App. E) as a ``torch.optim`` optimizer.

The step preconditions the mini-batch gradient ``∇ = G_d c`` (``c = 1/B`` for a mean loss) by
the damped subsampled Fisher of a batch ``X_F`` of ``B_F`` examples,

    s = (λI + F)⁻¹ ∇,      F = (1/B_F)·G_F G_Fᵀ,

where ``G_F`` holds the per-example gradients of ``X_F`` as columns (all captured layers
stacked: ``structure="full"``; or one layer at a time, i.e. ``F`` masked to its diagonal
blocks: ``structure="layerwise"``). ``G`` is never formed: the curvlinalg core works on the
per-layer captures ``(a, e)`` (:mod:`curvlinalg_torch.capture`) with ``B_F×B_F`` systems only
(:mod:`curvlinalg.woodbury`):

    (λI + sG_F G_Fᵀ)⁻¹ u = u/λ − (s/λ²)·G_F (I + (s/λ)·K)⁻¹ G_Fᵀu,    K = G_FᵀG_F,  s = 1/B_F.

Which per-example gradients form ``G_F`` (``fisher``):

* ``"empirical"`` — those of the training loss itself (the errors ``e`` of the data backward;
  no extra pass);
* ``"mc"`` — those of the cross-entropy for labels sampled from the model,
  ``ỹ ~ softmax(z)`` (one extra backward from the logits, ``Capture.backward_sampled``, drawn
  with the optimizer's ``torch.Generator``);
* ``"exact"`` — every class ``c`` weighted by ``√p_c`` (``curvlinalg.fisher.softmax_exact_errors``,
  ``C`` extra backwards; ``B_F·C`` rows, each example's inputs repeated per class, still
  ``s = 1/B_F``).

The MC and exact passes run from a forward hook on the model, right after its forward and
before the data backward (which frees the graph), only at the steps that need new Fisher
captures; the model must then return ``(B, C)`` logits, or the ``(B, T, C)`` logits of a
language model (per-token cross-entropy, a sequence's loss the sum of its token losses:
``"mc"`` draws one label per token; ``"exact"`` back-propagates every token's ``C`` class
rows separately, ``T·C`` backwards, so that
``F = (1/B) Σ_i Σ_t J_itᵀ(diag p_it − p_it p_itᵀ)J_it`` has no cross-token terms; see
:func:`fisher_errors`).

Padding: ``opt.set_mask(labels != -100)`` after ``zero_grad()`` and before the forward
(:meth:`~curvlinalg_torch.CurvatureOptimizer.set_mask`): masked positions get zero Fisher
errors and zero data errors in every layer, so they add nothing to ``G_F``, the Gram or the
gradient, and ``B_F`` is ``B_eff``, the number of examples with a kept position (the Fisher
of the batch with the fully masked examples deleted).

Which batch (``fisher_batch``):

* ``"same"`` — the Fisher of the gradient's own batch, at every step. For ``"empirical"`` the
  gradient lies in the span of ``G_F`` and the step is computed by the push-through identity
  ``(λI + sGGᵀ)⁻¹Gc = G(λI + sGᵀG)⁻¹c`` (``woodbury.solve_span``: no cancellation, no ``Gᵀu``
  pass). For ``"mc"``/``"exact"`` the Fisher captures differ from the gradient's, so the
  Woodbury formula above is used.
* ``"independent"`` — Benzing's App. E.5: the factorisation of one batch is kept and used as
  the preconditioner of the next ``refresh_every`` steps' gradients. At step ``k`` (counted from
  0) new Fisher captures are taken when ``(k + 1) % refresh_every == 0`` and factorised after
  that step's update, so the preconditioner of steps ``k+1 … k+refresh_every`` comes from
  batch ``k``; the very first step factorises its own batch (nothing earlier exists). The
  Fisher is taken at the parameters of that batch's forward (no extra forward).

How ``G_Fᵀ∇`` is contracted (why it is cheap): the gradient is itself given by captures,
``∇ = G_d c``, so per layer ``G_Fᵀ∇ = K_Fd c`` with the cross Gram
``K_Fd = Σ_{t,t'} (a_F a_dᵀ) ⊙ (e_F e_dᵀ)`` (``woodbury.cross_gram``; ``B_F×B`` work, no
parameter-sized product) when that costs fewer multiplications than forming the layer's
gradient (``B·T·(d_in + d_out) < d_in·d_out``), else ``curvlinalg.woodbury.rmatvec`` on the
formed gradient. The step
``G_d (c/λ) − (s/λ²)·G_F (I + (s/λ)K)⁻¹ G_Fᵀ∇`` is then ``woodbury.matvec``'s contraction
``Σ_rows w_r e_rᵀ a_r`` over the data and Fisher captures side by side, kept factored so
that it becomes a single ``addmm`` into the momentum buffer (or the weights). Per step: two
``B·D`` products beyond the forward and the (weight-gradient-free) backward — SGD's weight
gradient plus one — and ``B×B`` work (``bench/bench_torch_natural_gradient.py``: about 1.45×
an SGD step on the MLP 784-1000-1000-1000-10 at ``B = 100``).

Momentum, weight decay, the SGD group of the other parameters, the skipping of non-finite
steps and the state dicts follow :class:`~curvlinalg_torch.CurvatureOptimizer`: momentum acts
on the preconditioned step, ``buf ← μ·buf + s + wd·θ``, ``θ ← θ − lr·buf`` (the buffer is held
split into weight and bias parts, see :meth:`NaturalGradient._update`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from curvlinalg import fisher as core_fisher
from curvlinalg import woodbury

from ._optimizer import CurvatureOptimizer, label_generator
from .capture import Capture, LayerCapture, LossReduction

__all__ = ["NaturalGradient", "fisher_errors", "fisher_captures"]

FisherType = Literal["mc", "empirical", "exact"]
Structure = Literal["full", "layerwise"]
FisherBatch = Literal["same", "independent"]


# --------------------------------------------------------------------------------------
# Fisher captures from a capture and the logits
# --------------------------------------------------------------------------------------


def _probability_dtype(logits: Tensor) -> Tensor:
    detached = logits.detach()
    # Softmax and sampling in float32 at least (as Capture.backward_sampled does).
    return detached if detached.dtype in (torch.float32, torch.float64) else detached.float()


def fisher_errors(
    capture: Capture,
    logits: Tensor,
    fisher: FisherType,
    *,
    labels: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[list[Tensor | None], int]:
    r"""Back-propagate a Fisher's output errors from ``(B, C)`` or ``(B, T, C)`` logits; no
    ``.grad`` written.

    Returns the per-layer errors (``None`` for a captured layer without a recorded forward)
    and the number of rows per example: for ``"mc"`` (labels ``ỹ ~ softmax(z)`` drawn with
    ``generator`` by ``Capture.backward_sampled``) and ``"empirical"`` (``labels`` required,
    ``(B,)`` or ``(B, T)``) the errors ``softmax(z) − onehot(y)`` back-propagated,
    ``(B, [T,] d_out)``, 1 row; for ``"exact"`` the ``C`` back-propagated rows
    ``√p_c (p − e_c)`` of every example (of every token of a sequence, class ``c`` of all
    tokens back-propagated together: the rows of one class sum the token terms, whose
    cross terms vanish in the Gram only per token — see below), stacked example-major as
    ``(B·C, [T,] d_out)`` (row ``i·C + c``), ``C`` rows. Call it after the forward and
    before any backward that frees the graph.

    Sequences (``(B, T, C)`` logits, per-token cross-entropy summed over a sequence): for
    ``"mc"`` and ``"empirical"`` the back-propagated errors of all tokens of a sequence
    together are the per-example errors of the summed token loss. For ``"exact"`` a token's
    ``C`` rows must not be summed with another token's (``Σ_c (Σ_t r_tc)(Σ_t r_tc)ᵀ`` has
    cross-token terms), so the class rows are back-propagated per token and class: ``T·C``
    backwards, rows ``(B·T·C, [T',] d_out)`` stacked as row ``(i·T + t)·C + c``, and
    ``T·C`` rows per example (``F = (1/B) Σ_i Σ_t J_itᵀ(diag p_it − p_it p_itᵀ)J_it``, still
    ``scale = 1/B``).

    The capture's mask (:meth:`Capture.set_mask`) applies: masked positions give exactly
    zero errors (for ``"exact"`` their seeds, hence their rows, are zero).
    """
    if logits.ndim not in (2, 3):
        raise ValueError(f"logits must be (B, C) or (B, T, C); got shape {tuple(logits.shape)}")
    mask = capture._output_mask(logits, None)
    layers = capture.layers

    def collect() -> list[Tensor | None]:
        return [layer.e_sampled if layer.calls else None for layer in layers]

    if fisher == "mc":
        capture.backward_sampled(logits, generator)
        return collect(), 1
    probabilities_of = _probability_dtype(logits)
    if fisher == "empirical":
        if labels is None:
            raise ValueError("labels are required for fisher='empirical'")
        errors = core_fisher.softmax_errors(probabilities_of, labels, mask)
        capture.backward_errors(logits, errors)
        return collect(), 1
    if fisher != "exact":
        raise ValueError(f"fisher must be 'mc', 'empirical' or 'exact'; got {fisher!r}")
    rows = core_fisher.softmax_exact_errors(probabilities_of, mask)  # (B, [T,] C, C)
    classes = int(rows.shape[-2])
    if logits.ndim == 2:
        # One backward per class (row [i, c, :] of every example at once); batching them
        # (vmap over grad_outputs) is not supported by the capture's autograd node.
        seeds = [rows[:, c, :] for c in range(classes)]
    else:
        # One backward per token and class: only token t's rows are non-zero in the seed.
        positions = int(rows.shape[1])
        seeds = []
        for t in range(positions):
            for c in range(classes):
                seed = torch.zeros_like(rows[:, :, c, :])
                seed[:, t, :] = rows[:, t, c, :]
                seeds.append(seed)
    per_seed: list[list[Tensor | None]] = []
    for seed in seeds:
        capture.backward_errors(logits, seed)
        per_seed.append(collect())
    stacked: list[Tensor | None] = []
    for index in range(len(layers)):
        parts = [errors[index] for errors in per_seed]
        if parts[0] is None:
            stacked.append(None)
            continue
        joined = torch.stack(parts, dim=1)  # (B, seeds, [T',] d_out)
        stacked.append(joined.reshape(-1, *joined.shape[2:]))
    return stacked, len(seeds)


def _per_position(weights: Tensor, a: Tensor) -> Tensor:
    """``weights`` (one per row of the ``(N, [T,] d)`` captures ``a``) repeated over ``a``'s
    positions, in the order of ``a.reshape(-1, d)``'s rows."""
    return weights if a.ndim == 2 else weights.repeat_interleave(int(a.shape[1]))


def _repeat_rows(a: Tensor, rows: int) -> Tensor:
    """Each example's inputs repeated ``rows`` times, example-major (row ``i·rows + c``)."""
    return a if rows == 1 else a.repeat_interleave(rows, dim=0)


def fisher_captures(
    capture: Capture,
    logits: Tensor,
    fisher: FisherType,
    *,
    labels: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[list[tuple[Tensor, Tensor]], int]:
    r"""``[(a, e), ...]`` of the layers used in the forward, for the Fisher type ``fisher``
    (see :func:`fisher_errors`), and the rows per example (``C`` for ``"exact"``, whose
    inputs are repeated per class). ``curvlinalg.woodbury.factorize(pairs, λ, rows/len(a))``
    then represents ``λI + F`` with ``F = (1/B) Σ_i Σ_rows g gᵀ``."""
    errors, rows = fisher_errors(capture, logits, fisher, labels=labels, generator=generator)
    pairs = [
        (_repeat_rows(layer.a, rows), e)
        for layer, e in zip(capture.layers, errors)
        if e is not None
    ]
    return pairs, rows


def _gather_pairs(pairs: Sequence[tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]]:
    """The ranks' ``(a, e)`` captures concatenated along the batch in rank order (one
    ``all_gather`` per dtype of the flattened tensors; the shapes must agree over ranks)."""
    world = dist.get_world_size()
    tensors = [t.contiguous() for pair in pairs for t in pair]
    by_dtype: dict[torch.dtype, list[int]] = {}
    for position, tensor in enumerate(tensors):
        by_dtype.setdefault(tensor.dtype, []).append(position)
    gathered: list[Tensor] = list(tensors)
    for positions in by_dtype.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in positions])
        parts = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(parts, flat)
        offset = 0
        for i in positions:
            size = tensors[i].numel()
            shape = tensors[i].shape
            gathered[i] = torch.cat([part[offset : offset + size].view(shape) for part in parts])
            offset += size
    return [(gathered[2 * j], gathered[2 * j + 1]) for j in range(len(pairs))]


# --------------------------------------------------------------------------------------
# The optimizer
# --------------------------------------------------------------------------------------


class _Step(NamedTuple):
    """A step ``[S_w | s_b] = leftᵀ [right_w | right_b]`` kept factored: ``left`` ``(R, d_out)``,
    ``right_w`` ``(R, d_in)`` (contiguous), ``right_b`` ``(R,)`` or ``None`` without bias."""

    left: Tensor
    right_w: Tensor
    right_b: Tensor | None


# Marks Fisher errors that could not be formed because the logits were not finite.
_NON_FINITE: Any = ([], 0)


class _Factor:
    """A kept Fisher: its captures, the layers they belong to, and their factorisation(s)."""

    def __init__(
        self,
        indices: tuple[int, ...],
        pairs: list[tuple[Tensor, Tensor]],
        rows: int,
        damping: float,
        structure: Structure,
        from_data: bool,
        examples: float | None = None,
    ) -> None:
        self.indices = indices
        self.pairs = pairs
        self.rows = rows
        # B_F; with a mask the examples with a kept position (B_eff, at least 1): the masked
        # examples' per-example gradients are zero, F is the Fisher of the others.
        self.examples = int(pairs[0][0].shape[0]) // rows if examples is None else examples
        self.scale = 1.0 / self.examples  # F = (1/B_F)·G Gᵀ, also for the exact Fisher's B·C rows
        self.damping = damping
        self.structure = structure
        # Whether the captures are the data captures of the batch being stepped on now
        # ("empirical" Fisher of the same batch): then solve_span applies.
        self.from_data = from_data
        if structure == "full":
            self.woodbury: Any = woodbury.factorize(pairs, damping, self.scale, check_finite=False)
        else:
            self.woodbury = woodbury.factorize_layers(
                pairs, damping, self.scale, check_finite=False
            )


class NaturalGradient(CurvatureOptimizer):
    r"""Exact subsampled natural gradient ``θ ← θ − lr·(μ-momentum of (λI + F)⁻¹∇ + wd·θ)``.

    Args:
        model: the network. Its ``nn.Linear`` and ``nn.Conv2d`` (groups=1) layers are
            preconditioned jointly (``structure="full"``) or layer by layer; every other
            trainable parameter (norm layers, …) gets momentum SGD with ``other_lr``.
        lr: learning rate (``param_groups[*]["lr"]``; LR schedulers work).
        damping: ``λ > 0`` (``param_groups[0]["damping"]``; changing it refactorises).
        fisher: ``"mc"`` (default), ``"empirical"`` or ``"exact"`` (see the module docstring).
        structure: ``"full"`` (the whole network's Fisher, cross-layer blocks included) or
            ``"layerwise"`` (block-diagonal: one ``B×B`` system per layer).
        fisher_batch: ``"same"`` (the Fisher of the gradient's own batch) or
            ``"independent"`` (a kept factorisation of an earlier batch, Benzing App. E.5).
        refresh_every: with ``"independent"``, new Fisher captures every this many steps
            (``1`` with ``"same"``).
        momentum: heavy-ball ``μ`` on the preconditioned step (``torch.optim.SGD``
            semantics: dampening 0, no Nesterov).
        weight_decay: ``wd``, added to the preconditioned step.
        loss_reduction: ``"mean"`` (default; the gradient is ``G_d·(1/B)``) or ``"sum"``
            (``G_d·1``); the Fisher is ``(1/B_F)·G_F G_Fᵀ`` either way.
        other_lr: learning rate of the non-captured parameters (default ``lr``).
        layers: restrict the preconditioned layers to these modules.
        generator: ``torch.Generator`` for the MC labels (default: a new one seeded with
            ``seed``, or from torch's global RNG); saved in the state dict.
        seed: seed of the default generator.
        other_optimizer, other_optimizer_kwargs: the first-order fallback, as for
            :class:`~curvlinalg_torch.FOOF` (e.g. ``torch.optim.AdamW``).
        distributed: under ``torch.distributed`` (or pass the ``DistributedDataParallel``
            wrapper as ``model``): the data and Fisher captures of the ranks are gathered
            (one ``all_gather`` per dtype, ``B·(d_in + d_out)`` numbers per layer), so every
            rank builds the Gram of the whole batch — its cross-rank blocks need both ranks'
            captures, a sum of per-rank Grams would miss them — and takes the whole batch's
            step; the other parameters' gradients are averaged. Every rank must use the same
            batch size. With ``"mc"`` each rank samples its own examples' labels.

    Usage — as ``torch.optim.SGD``::

        opt = NaturalGradient(model, lr=0.1, damping=1e-3, fisher="mc",
                              fisher_batch="independent", refresh_every=10, momentum=0.9)
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

    One forward (in training mode, for ``"mc"``/``"exact"``) and one backward per step;
    evaluate under ``torch.no_grad()`` (a training-mode forward with grad enabled would run
    the Fisher backward). The kept Fisher captures (``"independent"``) are
    ``B_F·(d_in + d_out)`` numbers per layer (``B_F·C`` rows for ``"exact"``), saved in the
    state dict; the factorisation is rebuilt from them on load. A skipped (non-finite) step
    takes no Fisher captures: the kept factorisation then serves until the next refresh.
    Per-layer state (:meth:`layer_state`): ``"momentum_weight"`` ``(d_out, d_in)`` and
    ``"momentum_bias"`` ``(d_out,)`` (the buffer of the ``[W | b]`` block, split; see
    :meth:`_update`). :meth:`remove_hooks`
    detaches the optimizer from the model (needed before another capture of the same layers,
    e.g. :class:`~curvlinalg_torch.Laplace`).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        damping: float,
        *,
        fisher: FisherType = "mc",
        structure: Structure = "full",
        fisher_batch: FisherBatch = "same",
        refresh_every: int = 1,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        loss_reduction: LossReduction = "mean",
        other_lr: float | None = None,
        layers: Iterable[nn.Module] | None = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        distributed: bool = False,
        other_optimizer: type[torch.optim.Optimizer] | None = None,
        other_optimizer_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                "NaturalGradient takes the model (an nn.Module), not parameters or param "
                f"groups; got {type(model).__name__}"
            )
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not damping > 0:
            raise ValueError(f"damping must be a positive number; got {damping!r}")
        if fisher not in ("mc", "empirical", "exact"):
            raise ValueError(f"fisher must be 'mc', 'empirical' or 'exact'; got {fisher!r}")
        if structure not in ("full", "layerwise"):
            raise ValueError(f"structure must be 'full' or 'layerwise'; got {structure!r}")
        if fisher_batch not in ("same", "independent"):
            raise ValueError(f"fisher_batch must be 'same' or 'independent'; got {fisher_batch!r}")
        if isinstance(refresh_every, bool) or not isinstance(refresh_every, int):
            raise ValueError(f"refresh_every must be a positive integer; got {refresh_every!r}")
        if refresh_every < 1:
            raise ValueError(f"refresh_every must be a positive integer; got {refresh_every!r}")
        if fisher_batch == "same" and refresh_every != 1:
            raise ValueError(
                "refresh_every applies to fisher_batch='independent' only (with 'same' the "
                f"Fisher is the current batch's at every step); got {refresh_every}"
            )
        weights = [p for p in model.parameters() if p.is_floating_point()]
        dtype = weights[0].dtype if weights else torch.float32
        super().__init__(
            model,
            lr,
            float(damping),
            momentum=momentum,
            weight_decay=weight_decay,
            # The base class's factors, inverses and EMA are unused here; its factor dtype is
            # set to the parameters' so that its helpers see no cast.
            factor_dtype=dtype if dtype in (torch.float32, torch.float64) else torch.float32,
            loss_reduction=loss_reduction,
            other_lr=other_lr,
            layers=layers,
            distributed=distributed,
            other_optimizer=other_optimizer,
            other_optimizer_kwargs=other_optimizer_kwargs,
        )
        self.fisher: FisherType = fisher
        self.structure: Structure = structure
        self.fisher_batch: FisherBatch = fisher_batch
        self.refresh_every = refresh_every
        self._factor: _Factor | None = None
        # Fisher errors back-propagated by the forward hook for the current step.
        self._pending: tuple[list[Tensor | None], int] | None = None  # or _NON_FINITE
        self._rng_before: Tensor | None = None
        self._sample_handle = None
        self.generator: torch.Generator | None = None
        if fisher == "mc":
            self.generator = label_generator(self.model, generator, seed)
        if fisher in ("mc", "exact"):
            self._sample_handle = self._register_model_hook(self._fisher_hook)

    # ------------------------------------------------------------------ schedule

    def _fisher_due(self) -> bool:
        """Whether this step (``k = self.steps``) takes new Fisher captures."""
        if self.fisher_batch == "same" or self._factor is None:
            return True
        return (self._steps + 1) % self.refresh_every == 0

    # ------------------------------------------------------------------ MC / exact Fisher

    def _fisher_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        """After the model's forward: back-propagate the Fisher's errors when this step takes
        new Fisher captures (the data backward then runs on the retained graph)."""
        if not (torch.is_grad_enabled() and self.capture.enabled and module.training):
            return
        if not any(layer.calls for layer in self.capture.layers) or not self._fisher_due():
            return
        if not isinstance(output, Tensor) or output.ndim not in (2, 3):
            shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise ValueError(
                f"NaturalGradient(fisher={self.fisher!r}) needs the model to return (B, C) or "
                f"(B, T, C) logits; got {shape} (use fisher='empirical', or restrict the model)"
            )
        if not bool(torch.isfinite(output.detach()).all()):
            # Non-finite logits cannot be sampled from (curvlinalg.fisher raises); the step
            # will be skipped, so leave the RNG untouched and mark the Fisher as unusable.
            self._pending = _NON_FINITE
            return
        if self.generator is not None:
            self._rng_before = self.generator.get_state()
        self._pending = fisher_errors(self.capture, output, self.fisher, generator=self.generator)

    def _on_skip(self) -> None:
        # A skipped step leaves every state untouched, the label RNG included.
        if self._rng_before is not None and self.generator is not None:
            self.generator.set_state(self._rng_before)
        self._rng_before = None
        self._pending = None

    def remove_hooks(self) -> None:
        """Detach the optimizer from the model (capture and Fisher hooks)."""
        super().remove_hooks()
        if self._sample_handle is not None:
            self._sample_handle.remove()
            self._sample_handle = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients and forget the captures of earlier forward passes."""
        super().zero_grad(set_to_none=set_to_none)
        self._pending = None

    # ------------------------------------------------------------------ the step

    def _has_preconditioner(self, state: dict[str, Tensor]) -> bool:  # base-class interface
        return self._factor is not None

    def _fisher_pairs(
        self, active: list[tuple[int, LayerCapture]]
    ) -> tuple[list[tuple[Tensor, Tensor]], int]:
        if self.fisher == "empirical":
            pairs = [
                (self._captured(layer, "a"), self._captured(layer, "e")) for _, layer in active
            ]
            return pairs, 1
        if self._pending is None:
            raise RuntimeError(
                f"NaturalGradient(fisher={self.fisher!r}) has no Fisher captures for this step: "
                "run the model's forward in training mode with grad enabled between "
                "zero_grad() and step() (the Fisher backward runs from a forward hook)"
            )
        if self._pending is _NON_FINITE:
            return [], 0
        errors, rows = self._pending
        pairs = []
        for index, layer in active:
            e = errors[index]
            if e is None:
                raise RuntimeError(f"layer {layer.name!r} has no Fisher errors for this step")
            a = _repeat_rows(self._captured(layer, "a"), rows)
            pairs.append((a, e if e.dtype == a.dtype else e.to(a.dtype)))
        return pairs, rows

    @staticmethod
    def _finite_pairs(pairs: Sequence[tuple[Tensor, Tensor]]) -> bool:
        # One reduction per tensor and one host sync (as the base class checks).
        sums = [e.sum(dtype=torch.float32) for _, e in pairs]
        return not sums or bool(torch.isfinite(torch.stack(sums).sum()))

    @torch.no_grad()
    def step(self, closure: Any = None, grad_scaler: Any = None) -> Any:  # type: ignore[override]
        """Take one natural-gradient step from the captures of the last forward/backward.

        ``grad_scaler``: passed by ``torch.amp.GradScaler.step`` (:mod:`curvlinalg_torch.amp`).
        The failure rule of :meth:`CurvatureOptimizer.step` holds: an error (bad damping,
        a Gram matrix that is not positive definite) is raised naming the layers before any
        parameter or state changed; a non-finite step is skipped."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_single_pass()
        self._unscale(grad_scaler)
        try:
            self._check_damping(self.param_groups[0]["damping"])
            active = self._active_layers()
            self._check_fresh(active)
            with self._naming([layer for _, layer in active]):
                return self._step(active, loss)
        except BaseException:
            self._on_skip()
            raise

    def _step(self, active: list[tuple[int, LayerCapture]], loss: Any) -> Any:
        due = self._fisher_due()
        fisher_pairs: list[tuple[Tensor, Tensor]] | None = None
        rows = 1
        examples: float | None = None
        if active and due:
            fisher_pairs, rows = self._fisher_pairs(active)
            examples = self._kept_examples()
        finite = (
            self._pending is not _NON_FINITE
            and self._finite(active, shared=False)
            and (
                fisher_pairs is None
                or self.fisher == "empirical"
                or self._finite_pairs(fisher_pairs)
            )
        )
        # In factor_dtype (float32 for a half-precision model; under autocast a and e differ).
        data = [(self._captured(layer, "a"), self._captured(layer, "e")) for _, layer in active]
        if self.distributed:
            finite = self._agree(finite, int(data[0][0].shape[0]) if data else 0)
            if finite and data:
                data = _gather_pairs(data)  # type: ignore[arg-type]
                if fisher_pairs is not None:
                    fisher_pairs = (
                        data if self.fisher == "empirical" else _gather_pairs(fisher_pairs)
                    )
        if not finite:
            return self._skipped(loss, "non-finite gradients or captures")
        group = self.param_groups[0]
        damping = float(group["damping"])
        indices = tuple(index for index, _ in active)
        built_now = False
        kept = self._factor
        if active:
            factor = self._factor
            if self.fisher_batch == "same" or factor is None:
                assert fisher_pairs is not None
                factor = self._build(
                    indices, fisher_pairs, rows, damping, from_data=True, examples=examples
                )
                built_now = True
            elif factor.indices != indices:
                names = [self.capture.layers[i].name for i in factor.indices]
                raise RuntimeError(
                    f"the kept Fisher covers layers {names} but this step used "
                    f"{[layer.name for _, layer in active]}; NaturalGradient needs the same "
                    "layers at every step"
                )
            elif factor.damping != damping:
                factor = self._build(
                    factor.indices,
                    factor.pairs,
                    factor.rows,
                    damping,
                    from_data=False,
                    examples=factor.examples,
                )
            directions = self._directions(factor, active, data, damping)  # type: ignore[arg-type]
            parts = [
                t
                for d in directions
                for t in (d if isinstance(d, _Step) else (d,))
                if t is not None
            ]
            if parts and not bool(
                torch.isfinite(torch.stack([t.sum(dtype=torch.float32) for t in parts]).sum())
            ):
                self._factor = kept
                return self._skipped(loss, "non-finite preconditioned steps")
            next_factor = factor
            if self.fisher_batch == "independent" and due and not built_now:
                assert fisher_pairs is not None
                # Built before any update: a Gram that fails raises with nothing changed.
                next_factor = self._build(
                    indices, fisher_pairs, rows, damping, from_data=False, examples=examples
                )
            for (index, layer), direction in zip(active, directions):
                self._update(layer, self._layer_state[index], direction, group)
            if self.fisher_batch == "independent":
                self._factor = next_factor
        if self.distributed:
            self._average_over_ranks(self._other_grads_to_average())
        self._fallback_step(active)
        if (
            self.fisher_batch == "independent"
            and self._factor is not None
            and not (active and due and not built_now)
        ):
            # Captures of this step are no longer "the data captures" at the next step.
            self._factor.from_data = False
        self._steps += 1
        self._pending = None
        self._rng_before = None
        self._remember_grads()
        self.capture.clear()
        return loss

    def _build(
        self,
        indices: tuple[int, ...],
        pairs: list[tuple[Tensor, Tensor]],
        rows: int,
        damping: float,
        *,
        from_data: bool,
        examples: float | None = None,
    ) -> _Factor:
        if self.fisher_batch == "independent":
            # Kept across steps: own the tensors (a may alias a layer input that the caller
            # reuses; e aliases autograd buffers).
            pairs = [(a.detach().clone(), e.detach().clone()) for a, e in pairs]
        return _Factor(
            indices,
            pairs,
            rows,
            damping,
            self.structure,
            from_data=from_data and self.fisher == "empirical",
            examples=examples,
        )

    def _kept_examples(self) -> float | None:
        """``B_eff`` of the mask of :meth:`set_mask` (examples with a kept position, at least
        1; summed over the ranks under ``distributed``), ``None`` without a mask."""
        mask = self.capture.mask
        if self.distributed:
            # Every rank takes part (a rank without a mask counts all its examples).
            batch = next((layer.batch_size for layer in self.capture.layers if layer.calls), 0)
            kept = (
                torch.tensor(float(batch), dtype=torch.float64)
                if mask is None
                else mask.reshape(mask.shape[0], -1).any(-1).sum().to(torch.float64).cpu()
            )
            flags = torch.stack([kept, torch.tensor(float(mask is not None), dtype=torch.float64)])
            dist.all_reduce(flags)
            return max(float(flags[0]), 1.0) if float(flags[1]) > 0 else None
        if mask is None:
            return None
        return max(float(mask.reshape(mask.shape[0], -1).any(-1).sum()), 1.0)

    @staticmethod
    def _agree(finite: bool, batch: int) -> bool:
        """Share the finiteness decision over the ranks (every rank must skip together, or the
        collectives deadlock) and check that every rank has the same batch size."""
        flags = torch.tensor([float(finite), batch, -batch], dtype=torch.float64)
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        smallest, largest = int(flags[1]), int(-flags[2])
        if smallest != largest:
            raise ValueError(
                "NaturalGradient(distributed=True) needs the same batch size on every rank; "
                f"got sizes from {smallest} to {largest}"
            )
        return bool(flags[0] == 1)

    def _directions(
        self,
        factor: _Factor,
        active: list[tuple[int, LayerCapture]],
        data: list[tuple[Tensor, Tensor]],
        damping: float,
    ) -> list[Tensor | _Step]:
        """``(λI + F)⁻¹ ∇`` per active layer from the data captures ``data`` (of the whole
        batch): a ``(d_out, d_in[+1])`` matrix, or factored (:class:`_Step`)."""
        batch = int(data[0][0].shape[0])
        like = data[0][0]
        coefficient = 1.0 if self.capture.loss_reduction == "sum" else 1.0 / batch
        c = torch.full((batch,), coefficient, dtype=like.dtype, device=like.device)
        if factor.from_data:
            # Empirical Fisher of this very batch: ∇ = G c lies in the span of G.
            if self.structure == "full":
                return woodbury.solve_span(factor.woodbury, c, check_finite=False)
            return [woodbury.solve_span(w, c, check_finite=False)[0] for w in factor.woodbury]
        # Gᵀ_F ∇ per layer (B_F·rows entries), from the captures of both batches.
        projections = [
            self._project(fisher_pair, data_pair, c)
            for fisher_pair, data_pair in zip(factor.pairs, data)
        ]
        if self.structure == "full":
            total = projections[0]
            for extra in projections[1:]:
                total = total + extra
            solved = [self._cholesky_solve(factor.woodbury.lower, total)] * len(data)
        else:
            solved = [
                self._cholesky_solve(w.lower, r) for w, r in zip(factor.woodbury, projections)
            ]
        directions: list[Tensor | _Step] = []
        correction_scale = -factor.scale / damping**2
        for (_, layer), fisher_pair, data_pair, q in zip(active, factor.pairs, data, solved):
            # s = G_d (c/λ) − (s/λ²)·G_F q = Σ_rows w_r e_rᵀ a_r over both capture sets side by
            # side (woodbury.matvec's contraction), kept factored as (w ⊙ e, a): _update fuses
            # it into one addmm on the momentum buffer or the weights, with no (d_out, d_in)
            # temporary. The weight and bias columns of a are split here, each copied once
            # into a contiguous array (the GEMM's fast path).
            (a_d, e_d), (a_f, e_f) = data_pair, fisher_pair
            d_in, d_out = int(a_d.shape[-1]), int(e_d.shape[-1])
            d_w = d_in - int(layer.has_bias)
            # One weight per example (data) or Fisher row, repeated over its positions; the
            # kept Fisher may have other positions than this batch (weight sharing).
            weights = torch.cat(
                [_per_position(c / damping, a_d), _per_position(q * correction_scale, a_f)]
            )
            left = torch.cat([e_d.reshape(-1, d_out), e_f.reshape(-1, d_out)]) * weights[:, None]
            rows_d, rows_f = a_d.reshape(-1, d_in), a_f.reshape(-1, d_in)
            right_w = torch.cat([rows_d[:, :d_w], rows_f[:, :d_w]])
            right_b = torch.cat([rows_d[:, d_w], rows_f[:, d_w]]) if layer.has_bias else None
            directions.append(_Step(left, right_w, right_b))
        return directions

    def _update(
        self,
        layer: LayerCapture,
        state: dict[str, Tensor],
        direction: Tensor | _Step,
        group: dict[str, Any],
    ) -> None:
        """``buf ← μ·buf + s + wd·θ``; ``θ ← θ − lr·buf`` (no buffer when ``μ = 0``).

        The base class's rule, with the momentum buffer held as two tensors shaped like the
        weight block ``(d_out, d_in)`` (``"momentum_weight"``) and the bias
        (``"momentum_bias"``) rather than one ``(d_out, d_in + 1)`` block: a GEMM that writes
        into a block whose rows are ``d_in + 1`` long (an odd leading dimension) ran at half
        speed on the project's CPU (torch 2.13, float32, one thread: 11.3 ms instead of 5.6 ms
        for a ``(1000, 200) @ (200, 1001)`` product). A factored step ``leftᵀ right``
        (:class:`_Step`) becomes one ``addmm`` into the buffer (or the weights) and one
        ``addmv`` for the bias column.
        """
        lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
        module = layer.module
        weight = module.weight
        # A frozen bias keeps its column in the captures but is not moved.
        bias = module.bias if layer.has_bias and module.bias.requires_grad else None
        d_w = layer.d_in - int(layer.has_bias)
        contiguous = weight.is_contiguous()
        # A non-contiguous weight (channels_last) is updated through a reshaped copy.
        weight2 = weight.view(layer.d_out, d_w) if contiguous else weight.reshape(layer.d_out, d_w)
        factored = isinstance(direction, _Step)
        if factored and momentum == 0 and direction.left.dtype != weight2.dtype:
            # Half-precision parameters: the step is formed in the captures' dtype, then cast.
            left, right_w, right_b = direction
            direction = left.mT @ right_w
            if right_b is not None:
                direction = torch.cat([direction, (left.mT @ right_b)[:, None]], dim=1)
            factored = False
        if factored:
            left, right_w, right_b = direction
        else:
            dense_w = direction[:, :d_w]
            dense_b = direction[:, d_w] if bias is not None else None
        if momentum == 0:
            if factored:
                weight2.addmm_(left.mT, right_w.to(weight2.dtype), beta=1 - lr * decay, alpha=-lr)
                if bias is not None:
                    bias.addmv_(left.mT, right_b.to(bias.dtype), beta=1 - lr * decay, alpha=-lr)
            else:
                if decay:
                    weight2.mul_(1 - lr * decay)
                    if bias is not None:
                        bias.mul_(1 - lr * decay)
                weight2.add_(dense_w.to(weight2.dtype), alpha=-lr)
                if bias is not None:
                    bias.add_(dense_b.to(bias.dtype), alpha=-lr)
        else:
            buf_w = state.get("momentum_weight")
            buf_b = state.get("momentum_bias")
            if factored:
                if buf_w is None:
                    buf_w = torch.mm(left.mT, right_w)
                else:
                    buf_w.addmm_(left.mT, right_w, beta=momentum)
                if bias is not None:
                    if buf_b is None:
                        buf_b = torch.mv(left.mT, right_b)
                    else:
                        buf_b.addmv_(left.mT, right_b, beta=momentum)
            else:
                buf_w = dense_w.clone() if buf_w is None else buf_w.mul_(momentum).add_(dense_w)
                if bias is not None:
                    buf_b = dense_b.clone() if buf_b is None else buf_b.mul_(momentum).add_(dense_b)
            if decay:
                buf_w.add_(weight2, alpha=decay)
                if bias is not None:
                    buf_b.add_(bias, alpha=decay)
            state["momentum_weight"] = buf_w
            weight2.add_(buf_w.to(weight2.dtype), alpha=-lr)
            if bias is not None:
                state["momentum_bias"] = buf_b
                bias.add_(buf_b.to(bias.dtype), alpha=-lr)
        if not contiguous:
            weight.copy_(weight2.view(weight.shape))

    def _project(
        self, fisher_pair: tuple[Tensor, Tensor], data_pair: tuple[Tensor, Tensor], c: Tensor
    ) -> Tensor:
        """``G_F,lᵀ ∇_l`` with ``∇_l = G_d,l c``: by the cross Gram when cheaper than forming
        ``∇_l`` (``B·T·(d_in + d_out) < d_in·d_out``), else ``woodbury.rmatvec``."""
        a_d, e_d = data_pair
        positions = 1 if a_d.ndim == 2 else int(a_d.shape[1])
        d_in, d_out = int(a_d.shape[-1]), int(e_d.shape[-1])
        batch = int(a_d.shape[0])
        if batch * positions * (d_in + d_out) < d_in * d_out:
            return woodbury.cross_gram([fisher_pair], [data_pair], check_finite=False) @ c
        gradient = woodbury.matvec([data_pair], c, check_finite=False)
        return woodbury.rmatvec([fisher_pair], gradient, check_finite=False)

    @staticmethod
    def _cholesky_solve(lower: Tensor, rhs: Tensor) -> Tensor:
        """``(L Lᵀ)⁻¹ r`` with the Cholesky factor kept by ``woodbury.factorize``."""
        return torch.cholesky_solve(rhs[:, None], lower)[:, 0]

    # ------------------------------------------------------------------ state dicts

    def _extra_state(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.generator is not None:
            extra["generator"] = self.generator.get_state()
        if self._factor is not None and self.fisher_batch == "independent":
            extra["fisher"] = {
                "indices": list(self._factor.indices),
                "pairs": [(a.clone(), e.clone()) for a, e in self._factor.pairs],
                "rows": self._factor.rows,
                "damping": self._factor.damping,
                "examples": self._factor.examples,
            }
        return extra

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        if self.generator is not None and "generator" in extra:
            self.generator.set_state(extra["generator"])
        saved = extra.get("fisher")
        self._factor = None
        if saved is not None:
            device = self.capture.layers[0].module.weight.device
            pairs = [(a.to(device), e.to(device)) for a, e in saved["pairs"]]
            self._factor = _Factor(
                tuple(int(i) for i in saved["indices"]),
                pairs,
                int(saved["rows"]),
                float(saved["damping"]),
                self.structure,
                from_data=False,
                examples=saved.get("examples"),
            )
