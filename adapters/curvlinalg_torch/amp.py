r"""Mixed precision for the curvature optimizers: ``torch.autocast``, half-precision models and
``torch.amp.GradScaler`` loss scaling.

Policy (the core refuses float16/bfloat16 wherever it factorises, README "Errors"):

* **Factors and solves in** ``factor_dtype`` (float32 or float64; default float32;
  :class:`~curvlinalg_torch.NaturalGradient` uses the parameters' dtype, float32 for a
  half-precision model, and :class:`~curvlinalg_torch.Laplace` :func:`working_dtype`). Every
  capture ``a``, ``e`` is cast to it before it reaches the core. Under ``torch.autocast`` the
  captures are a mix — the first layer's ``a`` is the float32 input, later ones and every
  ``e`` are the autocast dtype — and all end up in ``factor_dtype``; with a bfloat16 model
  (``model.to(torch.bfloat16)``) all captures are bfloat16 and are cast up.
* **Updates in the parameters' dtype**: the preconditioned step (and the momentum buffer) is
  computed in ``factor_dtype`` and cast to the parameter dtype only when it is added.
* **Loss scaling** (``scaler.scale(loss).backward(); scaler.step(opt); scaler.update()``). The
  data backward of a scaled loss ``S·L`` leaves ``S·e`` in the captures and ``S·∇`` in the
  ``.grad`` of the fallback parameters; the MC/exact Fisher's errors are back-propagated by the
  optimizer itself from the logits and are not scaled. ``torch.amp.GradScaler.step(opt,
  *args, **kwargs)`` (torch 2.13, ``torch/amp/grad_scaler.py``) treats an optimizer whose
  ``_step_supports_amp_scaling`` is true as one that handles scaling itself: it neither
  unscales nor checks nor skips, and when ``opt.step``'s signature has a ``grad_scaler``
  parameter it calls ``opt.step(*args, **kwargs, grad_scaler=scaler)`` (with a
  ``FutureWarning`` that this hand-over is deprecated; without the parameter it would set
  ``opt.grad_scale`` / ``opt.found_inf`` instead, which cannot carry the captures' overflow
  to ``scaler.update()``: :func:`refuse_attribute_protocol`). The curvature optimizers declare
  the attribute and the parameter; their step then (:func:`unscale_for_step`)

  1. unscales the ``.grad`` of every parameter with ``scaler.unscale_(opt)`` (skipped when the
     caller did it already, e.g. to clip the fallback parameters' gradients) — GradScaler's
     own check records non-finite gradients for ``scaler.update()``;
  2. unscales the recorded data errors the same way: ``e ← e·(1/S)`` with ``1/S`` rounded to
     float32 as GradScaler does, computed in float32 at least (a float16 ``e/S`` could
     underflow: that is what the scale prevents), into new tensors (autograd's buffers are not
     written);
  3. reports the captures' finiteness to the scaler as one more inf check, through
     ``scaler.unscale_`` on a one-probe holder (so ``scaler.update()`` backs the scale off on
     an overflow inside the captured layers, and has a check to consume when every parameter
     is captured and none has a ``.grad``);

  then takes the ordinary step, whose failure rule skips it on any non-finite capture or
  gradient with every state exactly untouched (``skipped_steps`` counts it; no warning, since
  overflow skips are how dynamic loss scaling finds its scale). With a power-of-two scale and
  no overflow or underflow the unscaled captures and gradients are bit-identical to those of
  the unscaled loss, and so is the step. ``opt.step()`` called directly after a scaled
  backward sees scaled captures: step through ``scaler.step(opt)`` (or
  ``opt.step(grad_scaler=scaler)``, which is the same), then ``scaler.update()``.

A float16 model's gradients cannot go through a GradScaler (``scaler.unscale_`` refuses them,
as for every torch optimizer); bfloat16 ones can, though bfloat16's float32 range makes
scaling unnecessary.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .capture import Capture

__all__ = ["refuse_attribute_protocol", "unscale_errors_", "unscale_for_step", "working_dtype"]


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """``dtype`` if it is float32/float64, else float32: the dtype of factors and solves for
    parameters (or captures) of ``dtype``."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def unscale_errors_(capture: Capture, inv_scale: float, dtype: torch.dtype) -> None:
    """Replace the recorded data errors ``e`` of every captured call by ``e·inv_scale``.

    Computed in ``e``'s dtype when it is float32/float64, else in ``dtype`` (the optimizer's
    ``factor_dtype``: a half-precision ``e`` divided by the loss scale could underflow). New
    tensors: the records may alias autograd buffers (or a ``.grad`` that autograd stole from
    them), which must not be written. Sampled/explicit Fisher errors are not touched.
    """
    for layer in capture.layers:
        changed = False
        for call in layer._calls:
            errors = call.errors
            if errors is None:
                continue
            work = errors.dtype if errors.dtype in (torch.float32, torch.float64) else dtype
            call.errors = errors.to(work) * inv_scale
            changed = True
        if changed:
            layer._cache.pop("e", None)


class _InfCheck:
    """An optimizer-shaped holder (``param_groups``) of one 0-d probe per device whose
    ``.grad`` is finite only if the captures are: ``GradScaler.unscale_`` on it records the
    captures' inf check for ``scaler.update()`` through GradScaler's public method."""

    def __init__(self) -> None:
        self.param_groups: list[dict[str, Any]] = [{"params": []}]

    def load(self, sums: dict[torch.device, Tensor]) -> None:
        probes = []
        for device, total in sums.items():
            probe = torch.zeros((), dtype=torch.float32, device=device)
            probe.grad = total.reshape(()).to(torch.float32)
            probes.append(probe)
        self.param_groups[0]["params"] = probes


def unscale_for_step(optimizer: Any, grad_scaler: Any) -> None:
    """Steps 1–3 of the module docstring for ``optimizer`` (a curvature optimizer with
    ``capture``, ``factor_dtype`` and ``param_groups``) and an enabled ``grad_scaler``."""
    try:
        grad_scaler.unscale_(optimizer)
    except RuntimeError as exc:
        # The caller unscaled the .grad already (to clip them); the captures still are scaled.
        if "already been called" not in str(exc):
            raise
    scale = float(grad_scaler.get_scale())
    # GradScaler's reciprocal: in float64, rounded to float32.
    inv_scale = float(torch.tensor(scale, dtype=torch.float64).reciprocal().float())
    capture: Capture = optimizer.capture
    unscale_errors_(capture, inv_scale, optimizer.factor_dtype)
    sums: dict[torch.device, list[Tensor]] = {}
    for layer in capture.layers:
        if layer.calls and layer.has_errors:
            total = layer.finite_sum()
            sums.setdefault(total.device, []).append(total)
    if not sums:
        device = next(iter(optimizer.param_groups[0]["params"])).device
        sums[device] = [torch.zeros((), dtype=torch.float32, device=device)]
    probe = optimizer.__dict__.setdefault("_amp_inf_check", _InfCheck())
    probe.load({device: torch.stack(parts).sum() for device, parts in sums.items()})
    grad_scaler.unscale_(probe)


def refuse_attribute_protocol(optimizer: Any) -> None:
    """Raise if a ``GradScaler`` set ``optimizer.grad_scale`` / ``found_inf`` (its protocol for
    a ``step`` without a ``grad_scaler`` parameter): the captures would be stepped on scaled,
    and their overflow could not reach ``scaler.update()``."""
    attributes = [name for name in ("grad_scale", "found_inf") if name in vars(optimizer)]
    if attributes:
        raise RuntimeError(
            f"{type(optimizer).__name__}.step() found {attributes} set by a torch.amp.GradScaler "
            "that did not pass itself as grad_scaler=: the captured errors are still scaled. "
            "Call opt.step(grad_scaler=scaler) and then scaler.update() instead of "
            "scaler.step(opt)"
        )
