r"""Shared machinery of the Kronecker-factored optimizers (:class:`FOOF`, :class:`KFAC`).

:class:`CurvatureOptimizer` is a ``torch.optim.Optimizer`` that owns a
:class:`~curvlinalg_torch.capture.Capture` of the model and, per captured layer, a dict of
state tensors (factor averages, inverses or eigendecompositions, the momentum buffer). Each
:meth:`~CurvatureOptimizer.step` (step counter ``k``, counted from 0):

1. checks that every capture (and every other gradient) is finite — otherwise the step is
   skipped, no state changes, ``skipped_steps`` grows and a warning is issued once;
2. if ``curvlinalg.schedule.refresh_due(k, update_every)``: folds the batch into the factor
   averages — ``kron.ema(avg, kron.factor(x), ρ)``, first estimate taken as is, computed in
   place as one block-triangular rank-k update (:meth:`CurvatureOptimizer._fold_factor`);
3. if ``refresh_due(k, inverse_every)``: recomputes inverses / eigenbases from the averages
   (``kron.inverse`` after ``kron.split_damping``, or ``kron.eigh``); a factor whose Cholesky
   fails is retried with 10× the damping up to 4 times, then a
   ``curvlinalg.NotPositiveDefiniteError`` names the layer;
4. applies the preconditioned step ``s`` (computed by the subclass from the captures, never by
   forming ``∇W`` when the factored order is cheaper) with momentum and weight decay:
   ``buf ← μ·buf + s + wd·θ`` (``buf = s + wd·θ`` at the first step), ``θ ← θ − lr·buf``.

Momentum lives in *preconditioned* space: ``buf`` accumulates steps already multiplied by the
preconditioner current at their own step. At an inverse refresh the buffer is kept as it is
(re-preconditioning it would cost a ``d³`` product per layer and is not what heavy-ball on the
preconditioned direction means); older directions fade geometrically with ``μ``.

Weight decay is added to the preconditioned step (decoupled from the curvature); for plain SGD
this is the same as L2 on the gradient. Parameters outside the captured layers (norm layers,
embeddings, grouped convolutions, …) get plain momentum SGD with the same rule
(``torch.optim.SGD`` semantics, dampening 0, no Nesterov) in ``param_groups[1]``, whose
learning rate is ``other_lr`` (default ``lr``).

``param_groups[0]`` holds the captured layers' parameters and the hyperparameters
``lr, damping, momentum, weight_decay`` (LR schedulers act on ``lr`` of both groups).

Which rule moves which parameter (every trainable parameter with a gradient is moved by
exactly one rule at each step; a parameter with ``requires_grad=False`` never moves):

* *preconditioned*: the parameters of a captured layer whose hook recorded this step's
  forward and backward, whose weight requires grad and that no other module reached (their
  ``.grad`` is empty: the capture does not form ``eᵀa``). A frozen bias of such a layer keeps
  its column of ones in the factors and is not moved.
* *first-order fallback* (``other_optimizer``, default the built-in momentum SGD above, with
  the hyperparameters of ``param_groups[1]``): every other trainable parameter with a
  gradient — norm layers, embeddings, grouped convolutions, the ``nn.Linear`` children of an
  ``nn.MultiheadAttention`` (not captured: the attention reads their weights instead of
  calling them), tied layers (a weight held by several modules, e.g. an output head tied to
  an embedding: not captured, the fallback gets autograd's sum over the uses), any captured
  layer whose hook did not fire although its parameters got gradients, and a captured layer
  whose weight was frozen after construction or whose parameters got gradients from outside
  its calls (its captured gradient is added to their ``.grad`` for the step).

``other_optimizer=torch.optim.AdamW`` (any ``torch.optim.Optimizer`` class) with
``other_optimizer_kwargs`` replaces the built-in SGD: it is built on every parameter, steps
only those of the fallback (the others' gradients are hidden from it for the call), follows
``param_groups[1]["lr"]`` (so ``other_lr`` and LR schedulers set its learning rate) and its
state is saved in :meth:`state_dict`.

A layer called several times in one forward (weight sharing) is captured with
``repeated_calls="positions"``: its calls are positions of the same examples (the
K-FAC-expand convention), ``A = Σ_{i,calls,t} a aᵀ / B``, and its gradient sums all uses.

Failure rule: a step either completes or leaves the optimizer exactly as it was
(:meth:`CurvatureOptimizer.step`). ``step()`` without a new backward since the last step
raises. A deleted optimizer releases its hooks (they hold it weakly, and a finalizer
removes them); :meth:`CurvatureOptimizer.remove_hooks` does it at once.

Distributed training (``torch.distributed``, any backend): pass ``distributed=True`` with an
initialised process group, every rank running the same model on its own share of the batch —
or pass the ``DistributedDataParallel`` wrapper itself as ``model`` (then ``distributed`` is
implied and the wrapped module is captured). Factor averages are averaged over the ranks after
each fold (``ρ·Ā + (1−ρ)·mean_r A_r``, since ``Ā`` is the same everywhere); the inversions of
a refresh are spread over the ranks (layer ``j`` of the step is inverted on rank
``j mod N``, and the results are shared by one summed all-reduce in which the other ranks
contribute zeros); each layer's preconditioned step and the other parameters' gradients are
averaged before the update (DDP has already averaged the latter; they are not reduced twice),
and the finiteness decision is shared. ``N`` ranks with ``B/N`` examples each then take the
step of one process with ``B`` examples, up to rounding (the MC Fisher's sampled labels
differ: each rank draws from its own generator).

Under DDP, the captured layers' weights receive no ``.grad`` (the capture does not form
``eᵀa``), so DDP all-reduces zero-filled buckets for them; :func:`ddp_ignore_captured`, called
on the module *before* wrapping it, tells DDP to leave them out.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from curvlinalg import NotPositiveDefiniteError, kron, schedule

from .amp import refuse_attribute_protocol, unscale_for_step
from .capture import Capture, LayerCapture, LossReduction, find_layers, matrix_to_parameters

__all__ = ["CurvatureOptimizer", "ddp_ignore_captured"]

_DAMPING_RETRIES = 4  # retries of a failed Cholesky, each with 10× the damping


def _unwrap(model: nn.Module) -> tuple[nn.Module, bool]:
    """``(module, wrapped)``: the module inside a ``DistributedDataParallel`` wrapper."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module, True
    return model, False


def ddp_ignore_captured(model: nn.Module, layers: Iterable[nn.Module] | None = None) -> list[str]:
    """Tell ``DistributedDataParallel`` not to all-reduce the captured layers' parameters.

    Call it on the module before ``DistributedDataParallel(model)``: curvature optimizers
    reduce those layers' factors and steps themselves and their weights get no ``.grad``, so
    DDP would otherwise all-reduce zero-filled buckets every step. The other parameters (norm
    layers, …) are still averaged by DDP. ``layers`` as for the optimizers. Returns the
    ignored parameter names. Uses DDP's ``_set_params_and_buffers_to_ignore_for_model``
    (the hook FSDP and TorchRec use; private in PyTorch, stable since 1.8).
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError("call ddp_ignore_captured on the module before wrapping it in DDP")
    capture = Capture(model, layers=select_layers(model, layers))
    try:
        modules = {id(layer.module) for layer in capture}
    finally:
        capture.remove()
    names = [
        f"{module_name}.{param_name}" if module_name else param_name
        for module_name, module in model.named_modules()
        if id(module) in modules
        for param_name, _ in module.named_parameters(recurse=False)
    ]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    return names


def _owners(model: nn.Module) -> dict[int, list[str]]:
    """``id(parameter) → ["module.param", …]``: every module that holds each parameter."""
    owners: dict[int, list[str]] = {}
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            qualified = f"{module_name}.{param_name}" if module_name else param_name
            owners.setdefault(id(param), []).append(qualified)
    return owners


def select_layers(model: nn.Module, layers: Iterable[nn.Module] | None) -> list[nn.Module]:
    """The layers an optimizer captures: ``layers``, or every supported layer of ``model``
    (:func:`~curvlinalg_torch.capture.find_layers`) whose parameters no other module holds.

    A *tied* parameter (an ``nn.Linear`` head sharing its weight with an ``nn.Embedding``, or
    two layers sharing one weight) gets gradients from several modules, and the layer's
    captures see only its own use: such a layer is left to the first-order fallback, which
    receives autograd's sum over every use. Naming a tied layer in ``layers`` is refused.
    """
    owners = _owners(model)

    def tied(module: nn.Module) -> str | None:
        for param in module.parameters(recurse=False):
            if len(owners.get(id(param), [])) > 1:
                return " and ".join(owners[id(param)])
        return None

    if layers is None:
        return [module for _, module in find_layers(model) if tied(module) is None]
    chosen = list(layers)
    for module in chosen:
        shared = tied(module)
        if shared is not None:
            raise ValueError(
                f"the parameter {shared} is tied (one tensor held by several modules): a "
                "captured layer would see only its own use of it. Leave that layer out of "
                "layers= (the fallback optimizer then updates it with the gradient of every use)"
            )
    return chosen


def _register_weak_hook(model: nn.Module, method: Callable[..., Any]) -> Any:
    """``model.register_forward_hook`` of a bound method, holding its object weakly (a model
    hook must not keep a deleted optimizer alive)."""
    reference = weakref.WeakMethod(method)

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        bound = reference()
        if bound is None or module is not model:  # dead, or a deepcopy of the model
            return None
        return bound(module, args, output)

    return model.register_forward_hook(hook)


def _release(capture: Capture, handles: list[Any]) -> None:
    """Finalizer of an optimizer: remove its capture's and its model hooks."""
    capture.remove()
    for handle in handles:
        handle.remove()
    handles.clear()


def label_generator(
    model: nn.Module, generator: torch.Generator | None, seed: int | None
) -> torch.Generator:
    """The ``torch.Generator`` for sampled labels: ``generator`` itself, else a new one on the
    model's device seeded with ``seed`` (or with a draw from torch's global RNG)."""
    if generator is not None:
        return generator
    made = torch.Generator(device=next(model.parameters()).device)
    if seed is None:
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    made.manual_seed(seed)
    return made


def _positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number; got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'≥ 0' if allow_zero else '> 0'}; got {value!r}")
    return float(value)


def _period(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
    return value


def _symmetric_rank_k(average: Tensor, rows: Tensor, beta: float, alpha: float) -> None:
    r"""``average ← β·average + α·rowsᵀrows`` on the block-upper triangle only (in place).

    The columns are cut into ``k`` panels; panel ``i`` updates the rows of block ``i`` from its
    diagonal block to the right edge (``k`` GEMMs writing strided views of ``average``), so
    ``(k+1)/2k`` of the full product is computed and the diagonal blocks are complete. Blocks
    below the diagonal are left untouched. ``k`` grows with the width (1 below 256 columns,
    where one GEMM is faster than several smaller ones).
    """
    size = rows.shape[1]
    panels = 1 if size < 256 else (2 if size < 512 else 4)
    edges = [round(i * size / panels) for i in range(panels + 1)]
    for start, stop in zip(edges[:-1], edges[1:]):
        average[start:stop, start:].addmm_(
            rows[:, start:stop].mT, rows[:, start:], beta=beta, alpha=alpha
        )


def _padded_width(width: int) -> int:
    """``width`` rounded up to a multiple of 16 (unchanged below 128)."""
    return width if width < 128 else -(-width // 16) * 16


def _add_columns(weight2: Tensor, bias: Tensor | None, matrix: Tensor, alpha: float) -> None:
    """``[W | b] += alpha·matrix`` for a ``(d_out, d_w[+1])`` matrix (cast only if needed)."""
    d_w = weight2.shape[1]
    part = matrix[:, :d_w]
    weight2.add_(part if part.dtype == weight2.dtype else part.to(weight2.dtype), alpha=alpha)
    if bias is not None:
        column = matrix[:, d_w]
        bias.add_(column if column.dtype == bias.dtype else column.to(bias.dtype), alpha=alpha)


class CurvatureOptimizer(torch.optim.Optimizer):
    """Base class: capture, schedule, state, momentum, weight decay, skip logic, state dicts.

    Subclasses implement :meth:`_accumulate` (fold a batch into the factor averages),
    :meth:`_refresh` (inverses from the averages) and :meth:`_direction` (the preconditioned
    step of one layer). See the module docstring for the step and the groups.
    """

    #: whether the optimizer needs the errors ``e`` of the data backward (it always does for
    #: the step itself; subclasses may need sampled errors too).
    _needs_sampled_errors = False
    #: ``torch.amp.GradScaler.step`` hands itself to ``step(grad_scaler=...)`` instead of
    #: unscaling ``.grad`` and skipping by itself: the captured errors are scaled too
    #: (:mod:`curvlinalg_torch.amp`).
    _step_supports_amp_scaling = True
    #: whether the current step was handed a ``GradScaler`` (its overflow skips do not warn).
    _scaled_step = False

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
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{type(self).__name__} takes the model (an nn.Module), not parameters or "
                f"param groups; got {type(model).__name__}"
            )
        model, self._ddp = _unwrap(model)
        distributed = distributed or self._ddp
        if distributed and not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                "distributed=True needs an initialised torch.distributed process group "
                "(torch.distributed.init_process_group)"
            )
        self.distributed = bool(distributed)
        lr = _positive("lr", lr, allow_zero=True)
        momentum = _positive("momentum", momentum, allow_zero=True)
        if momentum >= 1:
            raise ValueError(f"momentum must be in [0, 1); got {momentum!r}")
        weight_decay = _positive("weight_decay", weight_decay, allow_zero=True)
        ema_decay = _positive("ema_decay", ema_decay, allow_zero=True)
        if ema_decay > 1:
            raise ValueError(f"ema_decay must be in [0, 1]; got {ema_decay!r}")
        if factor_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"factor_dtype must be torch.float32 or float64; got {factor_dtype}")
        self.update_every = _period("update_every", update_every)
        self.inverse_every = _period("inverse_every", inverse_every)
        self.ema_decay = ema_decay
        self.factor_dtype = factor_dtype
        if other_optimizer is not None and not (
            isinstance(other_optimizer, type) and issubclass(other_optimizer, torch.optim.Optimizer)
        ):
            raise TypeError(
                "other_optimizer must be a torch.optim.Optimizer class (e.g. torch.optim.AdamW); "
                f"got {other_optimizer!r}"
            )
        if other_optimizer_kwargs is not None and other_optimizer is None:
            raise ValueError("other_optimizer_kwargs needs other_optimizer")
        other_kwargs = dict(other_optimizer_kwargs or {})
        if "lr" in other_kwargs:
            if other_lr is not None:
                raise ValueError(
                    "give the fallback's learning rate once: other_lr or lr= in kwargs"
                )
            other_lr = other_kwargs.pop("lr")
        self.capture = Capture(
            model,
            layers=select_layers(model, layers),
            loss_reduction=loss_reduction,
            repeated_calls="positions",
        )
        if not self.capture.layers:
            raise ValueError(
                "model has no supported layer (nn.Linear / nn.Conv2d with groups=1) to precondition"
            )
        self.model = model
        captured = {id(p) for layer in self.capture for p in layer.module.parameters()}
        curvature_params = [p for layer in self.capture for p in layer.module.parameters()]
        # Frozen parameters are kept in the groups (they may be unfrozen later); no rule
        # moves a parameter while its requires_grad is False.
        other_params = [p for p in model.parameters() if id(p) not in captured]
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        groups: list[dict[str, Any]] = [
            {"params": curvature_params, "damping": damping, "name": "curvature"},
            {
                "params": other_params,
                "lr": lr if other_lr is None else _positive("other_lr", other_lr, allow_zero=True),
                "name": "other",
            },
        ]
        super().__init__(groups, defaults)
        #: The first-order fallback (``other_optimizer`` instance), or ``None`` for the built-in
        #: momentum SGD. It holds every parameter: a captured layer whose hook did not fire
        #: (or whose weight is frozen) is handed to it for that step.
        self.other_optimizer: torch.optim.Optimizer | None = None
        if other_optimizer is not None:
            self.other_optimizer = other_optimizer(
                curvature_params + other_params, lr=groups[1]["lr"], **other_kwargs
            )
        self._layer_state: list[dict[str, Tensor]] = [{} for _ in self.capture.layers]
        self._steps = 0
        self.skipped_steps = 0
        self._warned_skip = False
        self._handed: list[LayerCapture] = []
        self._new_factors: list[Tensor] = []
        # (grad tensor, its version) of every parameter at the end of the last step: a step
        # with no new forward/backward since is refused.
        self._seen_grads: dict[int, tuple[Any, int]] = {}
        self._hook_handles: list[Any] = []
        self._finalizer = weakref.finalize(self, _release, self.capture, self._hook_handles)

    # ------------------------------------------------------------------ public counters

    @property
    def steps(self) -> int:
        """Steps taken (skipped steps excluded): the ``k`` of the next step's schedule."""
        return self._steps

    @property
    def layers(self) -> list[LayerCapture]:
        """The captured layers, in order (``self.capture.layers``)."""
        return self.capture.layers

    def _layer_index(self, layer: int | str | nn.Module) -> int:
        for index, captured in enumerate(self.capture.layers):
            if layer is captured.module or layer == captured.name or layer == index:
                return index
        raise KeyError(f"layer {layer!r} is not captured by this optimizer")

    def layer_state(self, layer: int | str | nn.Module) -> dict[str, Tensor]:
        """The state dict of one captured layer (by index, name or module); live tensors."""
        return self._layer_state[self._layer_index(layer)]

    def remove_hooks(self) -> None:
        """Detach the optimizer from the model (its capture and model hooks); it cannot step
        afterwards. (A deleted optimizer releases them by itself when collected.)"""
        self.capture.remove()
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()

    def _register_model_hook(self, method: Callable[..., Any]) -> Any:
        """A forward hook on the model that calls ``method`` while the optimizer lives."""
        handle = _register_weak_hook(self.model, method)
        self._hook_handles.append(handle)
        return handle

    # ------------------------------------------------------------------ subclass interface

    def _accumulate(self, layer: LayerCapture, state: dict[str, Tensor]) -> None:
        raise NotImplementedError

    def _refresh(self, layer: LayerCapture, state: dict[str, Tensor], damping: Any) -> None:
        raise NotImplementedError

    def _direction(
        self, layer: LayerCapture, state: dict[str, Tensor], damping: Any
    ) -> Tensor | tuple[Tensor, Tensor, float]:
        """The preconditioned step of one layer, either as a ``(d_out, d_in[+1])`` matrix or
        factored as ``(left, right, alpha)`` meaning ``alpha · leftᵀ @ right``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers for subclasses

    def _captured(self, layer: LayerCapture, which: str = "a") -> Tensor:
        """``a``, ``e`` or ``e_sampled`` of a layer in ``factor_dtype`` (shape kept)."""
        x = layer.a if which == "a" else (layer.e if which == "e" else layer.e_sampled)
        if x is None:
            raise RuntimeError(f"layer {layer.name!r} has no captured {which}")
        return x if x.dtype == self.factor_dtype else x.to(self.factor_dtype)

    def _fold_factor(
        self,
        state: dict[str, Tensor],
        key: str,
        x: Tensor,
        scale: float,
        count: float | None = None,
    ) -> None:
        r"""In place: ``state[key] ← kron.ema(state[key], scale·kron.factor(x), ema_decay)``.

        ``x`` is ``(B, d)`` or ``(B, T, d)``; ``kron.factor(x) = xᵀx/(B·T)``. The product and
        the average are fused into ``addmm_`` calls (``β = ρ``, ``α = (1−ρ)·scale/(B·T)``) on
        the stored average, so a fold makes no ``d×d`` temporary — what the core's pure,
        allocating ``kron.ema(avg, kron.factor(x))`` computes, up to rounding. The first
        estimate is taken as is (``kron.ema``'s κ convention).

        Only the block-upper-triangular part is computed (:func:`_symmetric_rank_k`, about
        ``(k+1)/2k`` of the GEMM's work with ``k`` row panels: PyTorch has no ``syrk``); the
        stored matrix is valid in its upper triangle, and :meth:`factor` mirrors it.

        ``count`` replaces the number of rows ``B·T`` in ``α`` (a masked batch: its masked
        rows are zero and the mean is over the kept ones, ``kron.factor(x, mask=…)``).
        """
        rows = x.reshape(-1, x.shape[-1])
        alpha = scale / (rows.shape[0] if count is None else count)
        average = state.get(key)
        if average is None:
            size = rows.shape[1]
            average = state[key] = rows.new_zeros((size, size))
            _symmetric_rank_k(average, rows, 0.0, alpha)
        else:
            # Into a copy: the step commits its state only once everything succeeded (a
            # fold that overflows must leave the stored average as it was).
            average = state[key] = average.clone()
            _symmetric_rank_k(average, rows, self.ema_decay, (1 - self.ema_decay) * alpha)
        self._new_factors.append(average)

    def factor(self, layer: int | str | nn.Module, key: str = "A") -> Tensor:
        """The averaged factor ``key`` (``"A"``, or K-FAC's ``"G"``) of one layer (by index,
        name or module) as a full symmetric ``(d_in[+1])²`` / ``d_out²`` matrix (a new
        tensor; the stored one may be zero-padded, see :meth:`_padded_a`)."""
        index = self._layer_index(layer)
        captured = self.capture.layers[index]
        size = captured.d_in if key == "A" else captured.d_out
        return self._symmetric_factor(self._layer_state[index], key)[:size, :size]

    @staticmethod
    def _symmetric_factor(state: dict[str, Tensor], key: str) -> Tensor:
        """``triu(m) + triu(m, 1)ᵀ`` of the stored ``state[key]``, whose upper triangle is the
        factor (see :meth:`_fold_factor`)."""
        stored = state[key]
        return torch.triu(stored) + torch.triu(stored, 1).mT

    def _accumulate_input(self, layer: LayerCapture, state: dict[str, Tensor]) -> None:
        """Fold ``A = Σ_{i,t} a_it a_itᵀ / B = T·kron.factor(a)`` into ``state["A"]``
        (positions summed, examples averaged; KFC's scale for convolutions), at the padded
        width of :meth:`_padded_a`."""
        a = self._padded_a(layer)
        mask = layer.mask
        if mask is not None:
            # kron.input_factor(a, mask=…): Σ over kept positions / B_eff (the examples with a
            # kept position); the inputs at padded positions are not zero, so zero them here.
            _, examples = layer.mask_counts()
            a = torch.where(mask[..., None], a, a.new_zeros(()))
            self._fold_factor(state, "A", a, 1.0, count=examples)
            return
        self._fold_factor(state, "A", a, 1.0 if a.ndim == 2 else float(a.shape[1]))

    def _padded_a(self, layer: LayerCapture) -> Tensor:
        """``a`` in ``factor_dtype`` with zero columns appended up to a multiple of 16.

        A bias column makes widths like 1001; MKL's GEMMs with such a leading dimension ran
        1.5× slower than at 1000 or 1008 (bench/README.md, ``bench_torch_step.py``). Zero
        columns change nothing: the padded block of ``A`` is zero, so ``(A + λI)⁻¹`` is
        block diagonal with ``I/λ`` there, ``a (A + λI)⁻¹`` is zero in the padding and so are
        the padded columns of the step, which :meth:`_apply` ignores. Widths below 128 are
        not padded. Cached for the step in the layer's capture cache.
        """
        cached = layer._cache.get("a_padded")
        if cached is not None:
            return cached
        a = self._captured(layer, "a")
        width = _padded_width(a.shape[-1])
        if width != a.shape[-1]:
            padded = a.new_zeros((*a.shape[:-1], width))
            padded[..., : a.shape[-1]] = a
            a = padded
        layer._cache["a_padded"] = a
        return a

    def _kronecker_direction(
        self, layer: LayerCapture, a_inv: Tensor, g_inv: Tensor | None
    ) -> Tensor | tuple[Tensor, Tensor, float]:
        """``g_inv ∇W a_inv`` (``∇W a_inv`` without ``g_inv``) from the captures.

        Factored as ``(ẽ, ã, 1/B)`` (``kron.precondition_captures``; the optimizer fuses
        ``ẽᵀã/B`` into its update) when that order needs fewer multiplications — the same
        count as ``kron.precondition_factored`` — else ``kron.precondition`` of the layer's
        gradient matrix (:meth:`_gradient`; a convolution's needs no unfolded ``a``).
        """
        # a_inv may be at the padded width of _padded_a (FOOF, K-FAC) or not (subclasses).
        rows, d_in, d_out = layer.rows, int(a_inv.shape[0]), layer.d_out
        output = 0 if g_inv is None else 1
        factored_cost = rows * (d_in * d_in + output * d_out * d_out + d_out * d_in)
        dense_cost = rows * d_out * d_in + d_out * d_in * d_in + output * d_out * d_out * d_in
        if factored_cost >= dense_cost:
            # ∇W first (a convolution's from its native backward: no unfolded a this step).
            grad = self._gradient(layer)
            if d_in != layer.d_in:
                grad = torch.nn.functional.pad(grad, (0, d_in - layer.d_in))
            return kron.precondition(grad, a_inv, g_inv, check_finite=False)
        a = self._padded_a(layer) if d_in != layer.d_in else self._captured(layer, "a")
        e = self._captured(layer, "e")
        # The loss's gradient is Σ eᵀa / B for a mean loss and Σ eᵀa for a summed one.
        alpha = 1.0 if self.capture.loss_reduction == "sum" else 1.0 / int(a.shape[0])
        a_hat, e_hat = kron.precondition_captures(a, e, a_inv, g_inv, check_finite=False)
        return e_hat.reshape(rows, d_out), a_hat.reshape(rows, d_in), alpha

    def _gradient(self, layer: LayerCapture) -> Tensor:
        """``∇W = Σ_{i,t} e_itᵀ a_it / B`` (no ``1/B`` for a summed loss) of the layer in
        ``factor_dtype``: ``(d_out, d_in[+1])`` (:meth:`LayerCapture.gradient`)."""
        return layer.gradient(self.factor_dtype)

    def _inverse(self, layer: LayerCapture, matrix: Tensor, damping: Any, which: str) -> Tensor:
        """``kron.inverse(matrix, damping)``, retried with 10× more damping when the Cholesky
        fails; raises naming the layer when every retry fails."""
        value = damping
        for _ in range(_DAMPING_RETRIES + 1):
            try:
                return kron.inverse(matrix, value, check_finite=False)
            except NotPositiveDefiniteError:
                value = value * 10 if float(value) > 0 else torch.finfo(matrix.dtype).eps
        raise NotPositiveDefiniteError(
            f"layer {layer.name!r}: the {which} factor is not positive definite even with "
            f"damping {float(value):.3g} ({_DAMPING_RETRIES} retries at 10× each); the "
            "captures are probably degenerate — increase the damping"
        )

    # ------------------------------------------------------------------ the step

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients and forget the captures of earlier forward passes (and the
        mask of :meth:`set_mask`)."""
        super().zero_grad(set_to_none=set_to_none)
        self.capture.clear()

    def set_mask(self, mask: Tensor | None) -> None:
        """The positions that count for the next step: a boolean tensor of the model
        output's leading shape (``(B, T)`` for ``(B, T, C)`` logits; ``True`` = counts, e.g.
        ``labels != -100``), or ``None``. Call it after ``zero_grad()`` and before the
        forward (the MC/exact Fisher's backward runs in the forward hook); the step uses it
        and forgets it. Masked positions add nothing to the factors, the Fisher's errors or
        the captured gradients (:meth:`curvlinalg_torch.capture.Capture.set_mask`)."""
        self.capture.set_mask(mask)

    def _active_layers(self) -> list[tuple[int, LayerCapture]]:
        """The layers preconditioned at this step: recorded calls (a layer called several
        times is weight sharing: its calls are positions of the same examples) with errors
        of the data backward, a trainable weight, and no gradient reaching their parameters
        from outside their calls. Sets :attr:`_handed`: the layers with captures that fail
        the last two conditions, handed to the first-order fallback for this step."""
        active = []
        self._handed = []
        for index, layer in enumerate(self.capture.layers):
            if layer.calls == 0:
                continue  # not used: its parameters' .grad (if any) fall back
            if not layer.has_errors:
                done = sum(call.errors is not None for call in layer._calls)
                if done == 0:
                    continue  # forward without backward through this layer
                raise RuntimeError(
                    f"layer {layer.name!r} was run {layer.calls} times since the last step but "
                    f"only {done} of the calls were back-propagated: a forward since zero_grad() "
                    "did not enter the loss (evaluate under torch.no_grad(), or call zero_grad() "
                    "before the training forward)"
                )
            module = layer.module
            # Under DDP the captured parameters' .grad are DDP's (zero-filled) buckets, not
            # gradients from another use.
            outside = not self._ddp and (
                module.weight.grad is not None
                or (layer.has_bias and module.bias.requires_grad and module.bias.grad is not None)
            )
            if module.weight.requires_grad and not outside:
                active.append((index, layer))
            else:
                self._handed.append(layer)
        return active

    @staticmethod
    def _trainable(layer: LayerCapture) -> Iterator[Tensor]:
        """The parameters of a layer that a preconditioned step moves (frozen ones stay)."""
        for p in layer.module.parameters(recurse=False):
            if p.requires_grad:
                yield p

    def _fallback_params(self, active: list[tuple[int, LayerCapture]]) -> list[Tensor]:
        """Every trainable parameter with a gradient that no preconditioned step moves."""
        preconditioned = {id(p) for _, layer in active for p in self._trainable(layer)}
        chosen = [
            p
            for p in self.param_groups[1]["params"]
            if p.requires_grad and p.grad is not None and id(p) not in preconditioned
        ]
        # Captured layers' parameters: under DDP only those of handed layers (their other
        # .grad are DDP's zero-filled buckets).
        handed = {id(p) for layer in self._handed for p in self._trainable(layer)}
        chosen += [
            p
            for p in self.param_groups[0]["params"]
            if p.requires_grad
            and p.grad is not None
            and id(p) not in preconditioned
            and (not self._ddp or id(p) in handed)
        ]
        return chosen

    def _check_single_pass(self) -> None:
        """Refuse a step after gradient accumulation over several forward/backward passes,
        before anything (gradients included) has been touched."""
        late = self.capture.forward_after_backward
        if late is not None:
            # The calls of later forwards would count as positions of the first batch's
            # examples (repeated calls), and each micro-batch's errors are those of its own
            # share of the loss: factors and steps of neither the micro-batches nor their
            # union. Refused rather than stepped on silently.
            raise RuntimeError(
                f"{type(self).__name__}.step(): layer {late!r} ran a forward pass after a "
                "backward pass since zero_grad() — gradient accumulation over micro-batches "
                "is not supported by the curvature optimizers. Step after every backward "
                "(one micro-batch per step), or run the micro-batches as one batch"
            )

    def _check_fresh(self, active: list[tuple[int, LayerCapture]]) -> None:
        """Refuse a step without a new backward since the last one (it would re-apply stale
        gradients of the fallback parameters and advance the schedule)."""
        if active or self._handed:
            return
        for group in self.param_groups:
            for p in group["params"]:
                grad = p.grad
                if grad is None or not p.requires_grad:
                    continue
                seen = self._seen_grads.get(id(p))
                if seen is None or seen[0]() is not grad or seen[1] != grad._version:
                    return
        raise RuntimeError(
            f"{type(self).__name__}.step() without a new forward and backward since the last "
            "step (or since construction): nothing to step on. Run zero_grad(), the forward, "
            "loss.backward(), then step()"
        )

    def _remember_grads(self) -> None:
        seen = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    seen[id(p)] = (weakref.ref(p.grad), p.grad._version)
        self._seen_grads = seen

    def _check_damping(self, damping: Any) -> Any:
        """``param_groups[0]["damping"]`` must be a positive finite number (subclasses may
        accept more); checked before anything is updated."""
        if (
            isinstance(damping, bool)
            or not isinstance(damping, (int, float))
            or not math.isfinite(damping)
            or damping <= 0
        ):
            raise ValueError(
                f"param_groups[0]['damping'] must be a positive finite number; got {damping!r}"
            )
        return damping

    @contextmanager
    def _naming(self, layer: LayerCapture | list[LayerCapture] | None) -> Iterator[None]:
        """Re-raise a numerical error of one layer's (or several layers') computation with
        the name(s)."""
        try:
            yield
        except (ValueError, torch.linalg.LinAlgError) as exc:
            layers = [] if layer is None else (layer if isinstance(layer, list) else [layer])
            if not layers or any(repr(one.name) in str(exc) for one in layers):
                raise
            where = (
                f"layer {layers[0].name!r}"
                if len(layers) == 1
                else f"layers {[one.name for one in layers]}"
            )
            raise type(exc)(f"{where}: {exc}") from exc

    def _check_ready(self, active: list[tuple[int, LayerCapture]]) -> None:
        if not self._needs_sampled_errors:
            return
        for index, layer in active:
            if not layer.has_sampled_errors and self._factor_due(index):
                raise RuntimeError(
                    f"layer {layer.name!r} has no sampled errors for its Fisher factor: the "
                    "sampled backward runs in the model's forward hook, so run the forward "
                    "in training mode with grad enabled between zero_grad() and step()"
                )

    def _factor_due(self, index: int) -> bool:
        return self._period_due(self.update_every) or not self._has_factors(
            self._layer_state[index]
        )

    def _finite(self, active: list[tuple[int, LayerCapture]], *, shared: bool = True) -> bool:
        # One reduction per tensor and a single host sync: a NaN/inf anywhere makes its sum
        # non-finite (so does an overflowing sum of huge finite values, which a step would not
        # survive either).
        sums = []
        for _, layer in active:
            # On the raw records: a convolution's unfolded a is not built for a sum.
            sums.append(layer.finite_sum(sampled=self._needs_sampled_errors))
        for layer in self._handed:
            sums.append(layer.finite_sum())
        for p in self._fallback_params(active):
            sums.append(p.grad.sum(dtype=torch.float32))
        total = torch.stack(sums).sum() if sums else torch.zeros((), dtype=torch.float32)
        if self.distributed and shared:
            # Every rank must take the same decision, or the collectives below deadlock.
            flag = torch.isfinite(total).to(torch.float32).reshape(1)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            return bool(flag.item() == 1)
        return bool(torch.isfinite(total))

    def _skip(self, why: str) -> None:
        self.skipped_steps += 1
        # Under a GradScaler an overflow skip is how the scale is found (torch skips silently).
        if not self._warned_skip and not self._scaled_step:
            warnings.warn(
                f"{type(self).__name__}: {why}; the step was skipped and no state changed "
                "(further skips are counted in .skipped_steps without warning)",
                RuntimeWarning,
                stacklevel=3,
            )
            self._warned_skip = True

    def _on_skip(self) -> None:
        """Hook for subclasses to undo side effects of the forward (e.g. RNG draws)."""

    def _unscale(self, grad_scaler: Any) -> None:
        """Unscale ``.grad`` and the captured errors of a ``GradScaler``-scaled backward
        (:func:`curvlinalg_torch.amp.unscale_for_step`); nothing without an enabled scaler."""
        if grad_scaler is None:
            refuse_attribute_protocol(self)
        self._scaled_step = grad_scaler is not None and grad_scaler.is_enabled()
        if self._scaled_step:
            unscale_for_step(self, grad_scaler)

    @torch.no_grad()
    def step(self, closure: Any = None, grad_scaler: Any = None) -> Any:  # type: ignore[override]
        """Take one step from the captures of the last forward/backward (see module doc).

        ``closure`` (optional) is called with grad enabled before the step, as in
        ``torch.optim``; it must run the forward and backward itself. ``grad_scaler`` is
        passed by ``torch.amp.GradScaler.step(optimizer)``: the gradients and captured errors
        of the scaled loss are unscaled first (:mod:`curvlinalg_torch.amp`); an overflow
        skips the step under the failure rule below.

        Failure rule: the step either completes or leaves the optimizer exactly as it was.
        New factors, inverses and steps are computed into a staged copy of the layer states
        and committed at the end; non-finite captures, gradients, new factors or steps skip
        the step (``skipped_steps``); an error (a bad ``param_groups[0]["damping"]``, a
        factor that stays indefinite, …) is raised naming the layer, before any parameter or
        state has changed. A step with no new backward since the last one is refused.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_single_pass()
        self._unscale(grad_scaler)
        committed = self._layer_state
        try:
            damping = self._check_damping(self.param_groups[0]["damping"])
            active = self._active_layers()
            self._check_fresh(active)
            if not self._finite(active):
                return self._skipped(loss, "non-finite gradients or captures")
            self._check_ready(active)
            # Shallow copies: the subclass hooks write new tensors into them (a fold
            # copies before its in-place update), the live dicts are updated at the end.
            self._layer_state = [dict(state) for state in committed]
            self._new_factors: list[Tensor] = []
            applied = self._precondition(active, damping)
            if applied is None:
                self._layer_state = committed
                return self._skipped(loss, "non-finite factors or preconditioned steps")
        except BaseException:
            self._layer_state = committed
            self._new_factors = []
            self._on_skip()  # e.g. rewind the label RNG: nothing of this step remains
            raise
        group = self.param_groups[0]
        for (index, layer), direction in zip(active, applied):
            self._apply(layer, self._layer_state[index], direction, group)
        for live, staged in zip(committed, self._layer_state):
            if live is not staged:
                live.clear()
                live.update(staged)
        self._layer_state = committed
        self._new_factors = []
        self._fallback_step(active)
        self._steps += 1
        self._remember_grads()
        self.capture.clear()
        return loss

    def _skipped(self, loss: Any, why: str) -> Any:
        self._skip(why)
        self._on_skip()
        self._new_factors = []
        self._remember_grads()
        self.capture.clear()
        return loss

    def _precondition(
        self, active: list[tuple[int, LayerCapture]], damping: Any
    ) -> list[Tensor | tuple[Tensor, Tensor, float]] | None:
        """Fold, refresh and the preconditioned steps of the active layers, on the staged
        states; ``None`` when a new factor or a step is not finite (the step is skipped)."""
        accumulate = self._period_due(self.update_every)
        folded = []
        for index, layer in active:
            state = self._layer_state[index]
            if accumulate or not self._has_factors(state):
                with self._naming(layer):
                    self._accumulate(layer, state)
                folded.append(state)
        if self.distributed and folded:
            self._average_over_ranks(
                [s[k] for s in folded for k in ("A", "G") if k in s] + self._reduced_with_factors()
            )
        if folded and not self._all_finite(
            self._new_factors or [s[k] for s in folded for k in ("A", "G") if k in s]
        ):
            return None
        refresh = self._period_due(self.inverse_every)
        stale = [
            (index, layer)
            for index, layer in active
            if refresh or not self._has_preconditioner(self._layer_state[index])
        ]
        if self.distributed and stale:
            with self._naming(stale[0][1] if len(stale) == 1 else None):
                self._refresh_spread(stale, damping)
        else:
            for index, layer in stale:
                with self._naming(layer):
                    self._refresh(layer, self._layer_state[index], damping)
        directions = []
        for index, layer in active:
            with self._naming(layer):
                directions.append(self._direction(layer, self._layer_state[index], damping))
        if self.distributed:
            # The preconditioner is the same on every rank (averaged factors), so the mean of
            # the ranks' steps is the step of the whole batch; other gradients are averaged.
            directions = [self._dense(direction) for direction in directions]
            self._average_over_ranks(directions + self._other_grads_to_average())
        parts = [t for d in directions for t in (d[:2] if isinstance(d, tuple) else (d,))]
        parts += self._refreshed_state()
        if parts and not self._all_finite(parts):
            return None
        return directions

    def _refreshed_state(self) -> list[Tensor]:
        """Tensors of this step's refreshes that the steps may not reveal when non-finite
        (e.g. an overflowing EK-FAC correction, which divides the step to zero), checked with
        the steps; the subclass forgets them."""
        return []

    def _all_finite(self, tensors: list[Tensor]) -> bool:
        """Whether every tensor is finite (one reduction each, one host sync; shared over the
        ranks so that they skip together)."""
        total = torch.stack([t.sum(dtype=torch.float32) for t in tensors]).sum()
        if self.distributed:
            flag = torch.isfinite(total).to(torch.float32).reshape(1)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            return bool(flag.item() == 1)
        return bool(torch.isfinite(total))

    def _fallback_step(self, active: list[tuple[int, LayerCapture]]) -> None:
        """The first-order rule on every trainable parameter with a gradient that the
        preconditioned step did not move: the other parameters, captured layers whose hook
        did not fire (their autograd ``.grad``), and the handed layers (:attr:`_handed`:
        frozen weight, or gradient from outside their calls), whose captured gradient is
        added to their ``.grad`` for the step."""
        created = []
        gradients = [layer.gradient() for layer in self._handed]
        if self.distributed and gradients:
            self._average_over_ranks(gradients)  # the handed set is the same on every rank
        for layer, gradient in zip(self._handed, gradients):
            weight_part, bias_part = matrix_to_parameters(gradient, layer.module)
            for p, part in ((layer.module.weight, weight_part), (layer.module.bias, bias_part)):
                if p is None or part is None or not p.requires_grad:
                    continue
                if p.grad is None:
                    p.grad = part.to(p.dtype).contiguous()
                    created.append(p)
                else:
                    p.grad.add_(part.to(p.grad.dtype))
        try:
            params = self._fallback_params(active)
            if self.other_optimizer is None:
                self._sgd(self.param_groups[1], params)
            else:
                self._other_step(params)
        finally:
            for p in created:
                p.grad = None

    def _other_step(self, params: list[Tensor]) -> None:
        """``other_optimizer.step()`` on ``params`` only (the other gradients are hidden for
        the call), at the learning rate of ``param_groups[1]`` (LR schedulers act on it)."""
        assert self.other_optimizer is not None
        chosen = {id(p) for p in params}
        hidden = []
        for group in self.other_optimizer.param_groups:
            group["lr"] = self.param_groups[1]["lr"]
            for p in group["params"]:
                if p.grad is not None and id(p) not in chosen:
                    hidden.append((p, p.grad))
                    p.grad = None
        try:
            self.other_optimizer.step()
        finally:
            for p, grad in hidden:
                p.grad = grad

    def _other_grads_to_average(self) -> list[Tensor]:
        """The other parameters' gradients, unless DDP has averaged them already."""
        if self._ddp:
            return []
        return [
            p.grad for p in self.param_groups[1]["params"] if p.grad is not None and p.requires_grad
        ]

    def _reduced_with_factors(self) -> list[Tensor]:
        """Extra tensors averaged over the ranks together with the folded factors."""
        return []

    def _preconditioner_shapes(
        self, layer: LayerCapture, state: dict[str, Tensor]
    ) -> dict[str, tuple[int, ...]]:
        """The state keys :meth:`_refresh` writes, with their shapes (in the factors' dtype)."""
        raise NotImplementedError

    def _refresh_spread(self, stale: list[tuple[int, LayerCapture]], damping: Any) -> None:
        """:meth:`_refresh` of the ``j``-th stale layer on rank ``j mod N`` only; the results
        reach every rank through one summed all-reduce (per dtype) in which the other ranks
        contribute zeros — exact, since ``x + 0 = x``."""
        rank, world = dist.get_rank(), dist.get_world_size()
        shared: list[tuple[dict[str, Tensor], str, Tensor]] = []
        for position, (index, layer) in enumerate(stale):
            state = self._layer_state[index]
            mine = position % world == rank
            if mine:
                self._refresh(layer, state, damping)
            like = state["A"]
            for key, shape in self._preconditioner_shapes(layer, state).items():
                tensor = state[key] if mine else like.new_zeros(shape)
                shared.append((state, key, tensor))
        summed = self._reduce_over_ranks([tensor for _, _, tensor in shared], mean=False)
        for (state, key, _), tensor in zip(shared, summed):
            state[key] = tensor

    @staticmethod
    def _reduce_over_ranks(tensors: list[Tensor], *, mean: bool) -> list[Tensor]:
        """The sums (or means) of the tensors over the ranks, as new tensors: one all-reduce
        per dtype on a flattened copy (gloo has no AVG)."""
        world = dist.get_world_size()
        by_dtype: dict[torch.dtype, list[int]] = {}
        for position, tensor in enumerate(tensors):
            by_dtype.setdefault(tensor.dtype, []).append(position)
        out: list[Tensor] = list(tensors)
        for positions in by_dtype.values():
            flat = torch.cat([tensors[i].reshape(-1) for i in positions])
            dist.all_reduce(flat)
            if mean:
                flat.div_(world)
            offset = 0
            for i in positions:
                size = tensors[i].numel()
                out[i] = flat[offset : offset + size].view(tensors[i].shape)
                offset += size
        return out

    @classmethod
    def _average_over_ranks(cls, tensors: list[Tensor]) -> None:
        """In place: each tensor ← its mean over the ranks."""
        for tensor, mean in zip(tensors, cls._reduce_over_ranks(tensors, mean=True)):
            tensor.copy_(mean)

    def _period_due(self, period: int) -> bool:
        return bool(schedule.refresh_due(self._steps, period))

    def _has_factors(self, state: dict[str, Tensor]) -> bool:
        return "A" in state

    def _has_preconditioner(self, state: dict[str, Tensor]) -> bool:
        raise NotImplementedError

    def _apply(
        self,
        layer: LayerCapture,
        state: dict[str, Tensor],
        direction: Tensor | tuple[Tensor, Tensor, float],
        group: dict[str, Any],
    ) -> None:
        """``buf ← μ·buf + s + wd·θ``; ``θ ← θ − lr·buf`` (no buffer when ``μ = 0``).

        A factored ``s = alpha·leftᵀ right`` is fused into one ``addmm`` on the buffer (or on
        the parameters directly without momentum), so no ``(d_out, d_in)`` temporary is made.
        """
        weight = layer.module.weight
        d_w = layer.d_in - int(layer.has_bias)
        # A frozen bias keeps its column in the factors but is not moved.
        bias = layer.module.bias if layer.has_bias and layer.module.bias.requires_grad else None
        if weight.is_contiguous():
            self._apply_to(weight.view(layer.d_out, d_w), bias, state, direction, group)
        else:  # e.g. channels_last: update a reshaped copy and write it back
            weight2 = weight.reshape(layer.d_out, d_w).clone()
            self._apply_to(weight2, bias, state, direction, group)
            weight.copy_(weight2.view(weight.shape))

    def _apply_to(
        self,
        weight2: Tensor,
        bias: Tensor | None,
        state: dict[str, Tensor],
        direction: Tensor | tuple[Tensor, Tensor, float],
        group: dict[str, Any],
    ) -> None:
        lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
        d_w = int(weight2.shape[1])
        fused = isinstance(direction, tuple) and weight2.dtype == direction[0].dtype
        if momentum == 0:
            if fused:
                left, right, alpha = direction  # type: ignore[misc]
                # θ ← (1 − lr·wd)·θ − lr·alpha·leftᵀ right, one GEMM into the weights.
                weight2.addmm_(left.mT, right[:, :d_w], beta=1 - lr * decay, alpha=-lr * alpha)
                if bias is not None:
                    bias.addmv_(left.mT, right[:, d_w], beta=1 - lr * decay, alpha=-lr * alpha)
                return
            s = self._dense(direction)
            if decay:
                weight2.mul_(1 - lr * decay)
                if bias is not None:
                    bias.mul_(1 - lr * decay)
            _add_columns(weight2, bias, s, -lr)
            return
        buf = state.get("momentum_buffer")
        if isinstance(direction, tuple):
            left, right, alpha = direction
            if buf is None:
                buf = torch.mm(left.mT, right).mul_(alpha)
            else:
                buf.addmm_(left.mT, right, beta=momentum, alpha=alpha)
        elif buf is None:
            buf = direction.clone()
        else:
            buf.mul_(momentum).add_(direction)
        if decay:
            buf[:, :d_w].add_(weight2, alpha=decay)
            if bias is not None:
                buf[:, d_w].add_(bias, alpha=decay)
        state["momentum_buffer"] = buf
        _add_columns(weight2, bias, buf, -lr)

    @staticmethod
    def _dense(direction: Tensor | tuple[Tensor, Tensor, float]) -> Tensor:
        if isinstance(direction, tuple):
            left, right, alpha = direction
            return (left.mT @ right) * alpha
        return direction

    def _sgd(self, group: dict[str, Any], params: list[Tensor] | None = None) -> None:
        """``torch.optim.SGD`` (dampening 0, no Nesterov) with the hyperparameters of
        ``group`` on ``params`` (default: the group's trainable parameters)."""
        lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
        for p in group["params"] if params is None else params:
            if p.grad is None or not p.requires_grad:
                continue
            d = p.grad if not decay else p.grad.add(p, alpha=decay)
            if momentum:
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = d.detach().clone()
                else:
                    buf.mul_(momentum).add_(d)
                d = buf
            p.add_(d, alpha=-lr)

    # ------------------------------------------------------------------ state dicts

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim`` state (groups, SGD buffers of other parameters) plus, under
        ``"curvlinalg"``, every layer's tensors (copied, in their own dtype: not cast to the
        parameters' dtype as ``torch.optim`` would), the step counters, the schedule
        (``update_every``, ``inverse_every``, ``ema_decay``, restored by
        :meth:`load_state_dict` like the hyperparameters in ``param_groups``) and subclass
        state (K-FAC's label RNG)."""
        base = super().state_dict()
        base["curvlinalg"] = {
            "layers": [
                {key: value.clone() for key, value in state.items()} for state in self._layer_state
            ],
            "layer_names": [layer.name for layer in self.capture.layers],
            "layer_shapes": [(layer.d_out, layer.d_in) for layer in self.capture.layers],
            "steps": self._steps,
            "skipped_steps": self.skipped_steps,
            "schedule": {
                "update_every": self.update_every,
                "inverse_every": self.inverse_every,
                "ema_decay": self.ema_decay,
            },
            "extra": self._extra_state(),
        }
        if self.other_optimizer is not None:
            # Copied: torch.optim's state_dict references the live moments, and a
            # load_state_dict in the same process would share them with this optimizer.
            other = self.other_optimizer.state_dict()
            other["state"] = {
                key: {
                    name: value.clone() if isinstance(value, Tensor) else value
                    for name, value in entry.items()
                }
                for key, entry in other["state"].items()
            }
            base["curvlinalg"]["other_optimizer"] = other
        return base

    def _check_loadable(self, ours: dict[str, Any], state_dict: dict[str, Any]) -> None:
        """Refuse, naming the layer or parameter, a state dict of a model of other shapes."""
        names = [layer.name for layer in self.capture.layers]
        if list(ours["layer_names"]) != names:
            raise ValueError(
                f"state_dict holds layers {ours['layer_names']} but this optimizer captures {names}"
            )
        shapes = ours.get("layer_shapes")
        for position, (layer, saved) in enumerate(zip(self.capture.layers, ours["layers"])):
            d_in_ok = {layer.d_in, _padded_width(layer.d_in)}
            wrong = shapes is not None and tuple(shapes[position]) != (layer.d_out, layer.d_in)
            for key, value in saved.items():
                if not isinstance(value, Tensor) or value.ndim == 0:
                    continue
                if key.startswith("A") and value.ndim == 2 and value.shape[-1] not in d_in_ok:
                    wrong = True
                if key.startswith("G") and value.shape[0] != layer.d_out:
                    wrong = True
                if key.startswith("momentum") and value.shape[0] != layer.d_out:
                    wrong = True
            if wrong:
                got = tuple(shapes[position]) if shapes is not None else "other shapes"
                raise ValueError(
                    f"state_dict does not fit layer {layer.name!r}: its gradient block is "
                    f"{(layer.d_out, layer.d_in)} here, the saved state has {got}"
                )
        params = [p for group in self.param_groups for p in group["params"]]
        self._check_param_states(state_dict.get("state", {}), params, "state_dict")
        other = ours.get("other_optimizer")
        if (other is None) != (self.other_optimizer is None):
            raise ValueError(
                "state_dict was saved "
                + ("with" if other is not None else "without")
                + " an other_optimizer, this optimizer has "
                + ("none" if self.other_optimizer is None else "one")
            )
        if other is not None and self.other_optimizer is not None:
            others = [p for group in self.other_optimizer.param_groups for p in group["params"]]
            self._check_param_states(other.get("state", {}), others, "other_optimizer state")

    def _check_param_states(self, states: dict[Any, Any], params: list[Tensor], what: str) -> None:
        names = {id(p): name for name, p in self.model.named_parameters()}
        for key, entry in states.items():
            if not isinstance(key, int) or not 0 <= key < len(params):
                continue
            p = params[key]
            for field, value in entry.items():
                if isinstance(value, Tensor) and value.ndim > 0 and value.shape != p.shape:
                    raise ValueError(
                        f"{what} does not fit parameter {names.get(id(p), key)!r}: its "
                        f"{field!r} has shape {tuple(value.shape)}, the parameter "
                        f"{tuple(p.shape)}"
                    )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        ours = state_dict.pop("curvlinalg", None)
        if ours is None:
            raise ValueError("state_dict has no 'curvlinalg' entry: not from this optimizer")
        self._check_loadable(ours, state_dict)
        super().load_state_dict(state_dict)
        if self.other_optimizer is not None:
            self.other_optimizer.load_state_dict(ours["other_optimizer"])
        self._layer_state = []
        for layer, saved in zip(self.capture.layers, ours["layers"]):
            device = layer.module.weight.device
            self._layer_state.append(
                {key: value.detach().clone().to(device) for key, value in saved.items()}
            )
        self._steps = int(ours["steps"])
        self.skipped_steps = int(ours["skipped_steps"])
        for key, value in ours.get("schedule", {}).items():
            setattr(self, key, value)
        self._load_extra_state(ours.get("extra", {}))

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        pass
