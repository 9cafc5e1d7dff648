r"""Per-layer captures of ``nn.Linear`` and ``nn.Conv2d``: layer inputs ``a`` and errors ``e``.

This module turns a PyTorch forward/backward pass into the ``(a, e)`` pairs of the curvlinalg
core (DESIGN.md, "Conventions"), so every formula can be called directly on torch tensors.

Conventions
-----------
For a captured layer with weight ``W`` and a batch of ``B`` examples:

* ``a`` (:attr:`LayerCapture.a`): the layer's inputs, ``(B, d_in)`` for a ``Linear`` on
  ``(B, d_in)`` inputs, ``(B, T, d_in)`` for a ``Linear`` on ``(B, *, d_in)`` inputs (the middle
  axes flattened into ``T`` positions) and for a ``Conv2d``, whose inputs are unfolded into
  patches (``F.unfold``: ``T`` = number of output positions, ``d_in = C_in·kh·kw`` in the
  channel-major order of ``W.reshape(C_out, -1)``). When the layer has a bias a column of
  ones is appended, so ``a`` has ``d_in + 1`` columns.
* ``e`` (:attr:`LayerCapture.e`): ``(B, d_out)`` or ``(B, T, d_out)``, the gradient of **each
  example's own loss** with respect to the layer's output. Autograd on a batch-*mean* loss
  delivers ``e / B``; the capture multiplies by ``B`` (``loss_reduction="mean"``, the default)
  or keeps it as is (``loss_reduction="sum"``, for a loss summed over examples).
* Gradient block: ``(d_out, d_in[+1])`` = ``[W.reshape(d_out, -1) | b]``
  (:func:`parameters_to_matrix`, :func:`matrix_to_parameters`, :func:`add_matrix_`). The
  per-example gradient is ``g_i = Σ_t e_itᵀ a_it`` (``curvlinalg.woodbury.per_example``) and
  the gradient of the backpropagated loss is :meth:`LayerCapture.gradient`
  (``Σ_i g_i / B`` for a mean loss).

Supported layers: ``nn.Linear`` and ``nn.Conv2d`` with ``groups=1`` (any stride, padding —
also ``"same"`` and non-zero ``padding_mode`` — and dilation), with or without bias, whose
weight requires grad. :func:`find_layers` lists them; other modules are not captured, and
neither are the ``nn.Linear`` children of an ``nn.MultiheadAttention`` (its ``out_proj`` is
never *called*: the attention reads ``out_proj.weight`` directly, so a hook would never fire
and the parameters keep their ordinary autograd gradients instead).

The training-loop pattern
-------------------------
::

    capture = Capture(model)                      # hooks every supported layer
    logits = model(x)                             # forward hooks keep each layer's input
    capture.backward_sampled(logits, generator)   # optional: MC-Fisher errors → e_sampled,
                                                  # .grad untouched (needs the graph: before
    loss = F.cross_entropy(logits, y)             #  the data backward, which frees it)
    loss.backward()                               # errors of the data loss → e
    pairs = capture.captures()                    # [(a, e), ...] for curvlinalg
    fisher_pairs = capture.captures("sampled")    # [(a, e_sampled), ...]
    capture.clear()                               # drop the references before the next step
    capture.remove()                              # (or use ``with Capture(model) as capture:``)

:meth:`Capture.backward_errors` is the general form of ``backward_sampled``: it back-propagates
any per-example output gradients (e.g. each class of the exact Fisher, one call per class,
``curvlinalg.fisher.softmax_exact_errors``) into ``e_sampled`` without touching any ``.grad``
and without computing any weight gradient.

Cost model (why the capture is built this way)
----------------------------------------------
* The forward hook keeps a reference to the layer input (no copy); ``a`` is built lazily — the
  unfold of a convolution and the ones column are paid only when ``a`` is read, once per step.
* The layer's output is re-rooted in a small autograd node whose backward stores ``e`` and
  computes only the gradient with respect to the layer *input*. With ``weight_grads=False``
  (the default) autograd does **not** form ``W.grad = eᵀa``: curvature optimizers
  precondition ``e`` and ``a`` (``curvlinalg.kron.precondition_factored``) and would throw
  that product away. ``weight_grads=True`` restores ordinary ``.grad`` accumulation (for
  gradient clipping, logging, or plain SGD on the same model). The parameters of other
  modules (norm layers, embeddings) get their ``.grad`` as usual.
* ``errors=False`` skips the storage of ``e`` entirely (a capture of inputs only).
* For a convolution, :meth:`LayerCapture.gradient` is the native weight backward of the
  recorded input and output gradient, and :meth:`LayerCapture.finite_sum`,
  :attr:`LayerCapture.has_errors` and :attr:`LayerCapture.rows` read the raw records: the
  optimizers build the unfolded ``a`` (an im2col plus copies, on a CPU dearer than the
  convolution itself) only on the steps that fold it into a factor. On Puiu's MNIST CNN
  (batch 512, factors every 30 steps) that made a K-FAC step about as cheap as an SGD step,
  from 2.4× before (one thread, ``bench/README.md``).

Sequences and padding masks
---------------------------
:meth:`Capture.backward_sampled` and :meth:`Capture.backward_errors` take language-model
outputs too: ``(B, T, C)`` logits (per-token cross-entropy, ``B·T`` softmax outputs, labels
drawn as ``(B, T)``; ``curvlinalg.fisher``'s sequence convention: the per-example loss of a
sequence is the **sum** of its token losses). :meth:`Capture.set_mask` gives the positions
that count: a boolean tensor of the model output's leading shape (``(B,)`` or ``(B, T)``,
``True`` = counts; e.g. ``labels != -100`` for a loss with ``ignore_index=-100``), kept until
:meth:`Capture.clear`. With a mask:

* the sampled/explicit errors of :meth:`Capture.backward_sampled` are exactly zero at masked
  output positions (``curvlinalg.fisher``'s ``mask=``);
* every layer's :attr:`LayerCapture.e` and :attr:`LayerCapture.e_sampled` are zero at masked
  positions, so masked positions add nothing to gradients (:meth:`LayerCapture.gradient`) or
  Grams built from the captures; in the usual setups (the masked tokens are ignored by the
  loss and not attended by kept positions: a key padding mask, or causal attention with
  right padding) these errors are zero anyway and the gradient is the loss's;
* :attr:`LayerCapture.mask` is the mask in the layer's own layout (the leading shape of
  :attr:`LayerCapture.a`), for the core's ``mask=`` (``kron.input_factor``, ``kron.factor``,
  ``kron.eigen_correction``): the layer's inputs ``a`` are *not* zeroed (in a transformer the
  inputs at padded positions are not zero), the factors must be given the mask.

Layer layouts: a layer whose captures have the output's leading shape ``(B, T)`` gets the
mask itself; a ``(B, d)`` layer (one row per example, e.g. a head after pooling) gets
``mask.any(-1)`` (an example with no kept position is dropped); a ``(B,)`` mask is repeated
over a layer's positions; a convolution gets its example's entry at every output position; a
weight-shared layer (``repeated_calls="positions"``) gets one copy per call. Any other layout
(positions that are not the output's) is refused, naming the layer.

Limits: one capture per module at a time (a capture that is garbage collected releases its
hooks; :meth:`Capture.remove` does it at once); no double backward through a captured layer
(``create_graph=True``); ``torch.func`` transforms are not supported inside a capture. A layer
applied several times in one recorded pass (weight sharing, several forwards before a
``clear``) keeps one record per call, in call order; :attr:`LayerCapture.calls` tells how many
there were. How :attr:`LayerCapture.a` and :attr:`LayerCapture.e` join them is
``repeated_calls``: ``"examples"`` (default) concatenates the calls along the batch axis (each
call is separate examples); ``"positions"`` — what the optimizers use, the K-FAC-expand
convention of weight sharing — joins them along the position axis, ``(B, Σ_c T_c, d)``: the
calls are positions of the *same* ``B`` examples (every call must have the same batch size),
so ``Σ_t e_itᵀ a_it`` is example ``i``'s gradient through all its uses of the layer.
Inputs modified in place after the forward are detected when ``a`` is read.
"""

from __future__ import annotations

import gc
import math
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlinalg import fisher

__all__ = [
    "Capture",
    "LayerCapture",
    "supported",
    "find_layers",
    "gradient_shape",
    "parameters_to_matrix",
    "matrix_to_parameters",
    "add_matrix_",
    "write_grad",
]

LossReduction = Literal["mean", "sum"]
RepeatedCalls = Literal["examples", "positions"]


# --------------------------------------------------------------------------------------
# Layers and the parameter ↔ gradient-matrix map
# --------------------------------------------------------------------------------------


def supported(module: nn.Module) -> bool:
    """Whether ``module`` can be captured: an ``nn.Linear``, or an ``nn.Conv2d`` with
    ``groups=1``, whose weight requires grad."""
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and module.weight.requires_grad
    return isinstance(module, nn.Linear) and module.weight.requires_grad


def find_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every supported layer of ``model``, in ``named_modules`` order,
    except the ``nn.Linear`` children of an ``nn.MultiheadAttention`` (never called: the
    attention reads their weights directly)."""
    inside_attention = {
        id(child)
        for module in model.modules()
        if isinstance(module, nn.MultiheadAttention)
        for child in module.children()
    }
    return [
        (name, module)
        for name, module in model.named_modules()
        if supported(module) and id(module) not in inside_attention
    ]


def _has_bias(module: nn.Module) -> bool:
    return getattr(module, "bias", None) is not None


def gradient_shape(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in + has_bias)``: the shape of the layer's gradient block.

    ``d_in`` is ``in_features`` for a ``Linear`` and ``C_in·kh·kw`` for a ``Conv2d``.
    """
    weight = module.weight
    d_out = int(weight.shape[0])
    d_in = math.prod(int(size) for size in weight.shape[1:])
    return d_out, d_in + int(_has_bias(module))


def parameters_to_matrix(module: nn.Module) -> Tensor:
    """The layer's parameters as one ``(d_out, d_in[+1])`` matrix ``[W.reshape(d_out, -1) | b]``
    (a new tensor)."""
    weight = module.weight.detach()
    flat = weight.reshape(weight.shape[0], -1)
    if not _has_bias(module):
        return flat.clone()
    return torch.cat([flat, module.bias.detach()[:, None]], dim=1)


def matrix_to_parameters(matrix: Tensor, module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """Split a ``(d_out, d_in[+1])`` gradient-block matrix into ``(weight_like, bias_like)``.

    ``weight_like`` has ``module.weight``'s shape, ``bias_like`` ``module.bias``'s shape (or is
    ``None`` without bias). Both are *views* of ``matrix`` where possible (no copy).
    """
    expected = gradient_shape(module)
    if tuple(matrix.shape) != expected:
        raise ValueError(
            f"shape mismatch: matrix has shape {tuple(matrix.shape)} but the layer's gradient "
            f"block is {expected}"
        )
    weight = module.weight
    d_in = math.prod(int(size) for size in weight.shape[1:])
    weight_part = matrix[:, :d_in].reshape(weight.shape)
    bias_part = matrix[:, d_in] if _has_bias(module) else None
    return weight_part, bias_part


def add_matrix_(module: nn.Module, matrix: Tensor, alpha: float = 1.0) -> None:
    """In place: ``[W | b] += alpha · matrix`` (``matrix`` cast to the parameters' dtype)."""
    weight_part, bias_part = matrix_to_parameters(matrix, module)
    with torch.no_grad():
        module.weight.add_(weight_part.to(module.weight.dtype), alpha=alpha)
        if bias_part is not None:
            module.bias.add_(bias_part.to(module.bias.dtype), alpha=alpha)


def write_grad(module: nn.Module, matrix: Tensor, *, accumulate: bool = False) -> None:
    """Write a ``(d_out, d_in[+1])`` matrix into ``module.weight.grad`` (and ``bias.grad``).

    ``accumulate=True`` adds to existing gradients as autograd would; otherwise they are
    replaced.
    """
    weight_part, bias_part = matrix_to_parameters(matrix, module)
    pairs = [(module.weight, weight_part)]
    if bias_part is not None:
        pairs.append((module.bias, bias_part))
    for parameter, part in pairs:
        part = part.to(parameter.dtype)
        if accumulate and parameter.grad is not None:
            parameter.grad.add_(part)
        else:
            parameter.grad = part.contiguous().clone()


# --------------------------------------------------------------------------------------
# Records and the autograd node that re-roots a captured layer's output
# --------------------------------------------------------------------------------------


@dataclass
class _Call:
    """One forward call of a captured layer (and what its backward passes left)."""

    inputs: Tensor  # detached layer input, shares the version counter of the original
    version: int  # inputs._version at the forward, to detect later in-place edits
    output: Tensor | None = None  # the native output (detached) until the node takes it
    errors: Tensor | None = None  # scaled grad_output of the data backward (output layout)
    sampled_errors: Tensor | None = None  # grad_output of backward_errors (output layout)


class _Tap(torch.autograd.Function):
    """Identity on the layer's (detached) output, with the layer's own backward.

    Its inputs are ``(x, weight, bias)`` so that the output keeps the autograd edges of the
    layer; its backward stores the output gradient and returns the input gradient — and the
    parameter gradients only when the capture asks for them — so ``W.grad = eᵀa`` is not
    formed twice when an optimizer uses the factored captures instead.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, layer: LayerCapture, call: _Call
    ) -> Tensor:
        ctx.layer = layer
        ctx.call = call
        ctx.save_for_backward(x, weight)
        output = call.output
        call.output = None
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        layer: LayerCapture = ctx.layer
        call: _Call = ctx.call
        capture = layer.capture
        sampled = capture._sampled_pass
        if sampled:
            call.sampled_errors = grad_output
        else:
            capture._backward_seen = True
            if capture.errors:
                call.errors = grad_output if capture._scale_is_one else grad_output * _batch(call)
        x, weight = ctx.saved_tensors
        want_x = ctx.needs_input_grad[0]
        want_params = capture.weight_grads and not sampled
        want_weight = want_params and ctx.needs_input_grad[1]
        want_bias = want_params and ctx.needs_input_grad[2]
        if not (want_x or want_weight or want_bias):
            return None, None, None, None, None
        grads = layer._backward(grad_output, x, weight, (want_x, want_weight, want_bias))
        return (*grads, None, None)


def _batch(call: _Call) -> int:
    inputs = call.inputs
    return 1 if inputs.ndim == 1 else int(inputs.shape[0])


# --------------------------------------------------------------------------------------
# Per-layer capture
# --------------------------------------------------------------------------------------


class LayerCapture:
    """The captures of one layer (a ``Linear`` or a ``Conv2d``).

    Attributes: ``name`` (from ``model.named_modules``), ``module``, ``kind`` (``"linear"`` or
    ``"conv2d"``), ``has_bias``, ``d_in`` (columns of the gradient block, bias column
    included), ``d_out``, ``capture`` (the owning :class:`Capture`).

    The tensors below describe the calls recorded since the last :meth:`Capture.clear` and
    are built on first access, then cached until the next clear.
    """

    def __init__(self, capture: Capture, name: str, module: nn.Module) -> None:
        if not supported(module):
            raise ValueError(
                f"layer {name!r} ({type(module).__name__}) cannot be captured: only nn.Linear "
                "and nn.Conv2d with groups=1 whose weight requires grad are supported"
            )
        self.capture = capture
        self.name = name
        self.module = module
        self.kind: Literal["linear", "conv2d"] = (
            "conv2d" if isinstance(module, nn.Conv2d) else "linear"
        )
        self.has_bias = _has_bias(module)
        self.d_out, self.d_in = gradient_shape(module)
        self._calls: list[_Call] = []
        self._cache: dict[str, Tensor] = {}
        # The hook holds the layer weakly: a capture nobody references can be collected
        # (and its finalizer removes the hooks) although the module outlives it.
        self._handle = module.register_forward_hook(_weak_hook(self))

    def __repr__(self) -> str:
        return (
            f"LayerCapture({self.name!r}, {self.kind}, d_out={self.d_out}, d_in={self.d_in}, "
            f"calls={len(self._calls)})"
        )

    # ----------------------------------------------------------------------------- hooks

    def _forward_hook(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Any:
        capture = self.capture
        if not capture.enabled or not torch.is_grad_enabled() or not output.requires_grad:
            return None
        x = args[0]
        if capture._backward_seen and capture.forward_after_backward is None:
            capture.forward_after_backward = self.name
        call = _Call(inputs=x.detach(), version=x._version, output=output.detach())
        self._calls.append(call)
        self._cache.clear()
        return _Tap.apply(x, module.weight, module.bias, self, call)

    def _backward(
        self, grad_output: Tensor, x: Tensor, weight: Tensor, mask: tuple[bool, bool, bool]
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """``(∂/∂x, ∂/∂W, ∂/∂b)`` of the layer for ``grad_output``, only where ``mask`` says."""
        # Under autocast the output (and its gradient) can be half precision while x and W are
        # float32; the layer's backward works in the gradient's dtype, as autocast's would.
        dtype = grad_output.dtype
        weight_c = weight if weight.dtype == dtype else weight.to(dtype)
        x_c = x if x.dtype == dtype else x.to(dtype)
        module = self.module
        if self.kind == "linear":
            grad_x = grad_w = grad_b = None
            if mask[0]:
                grad_x = (grad_output @ weight_c).to(x.dtype)
            if mask[1] or mask[2]:
                rows_g = grad_output.reshape(-1, grad_output.shape[-1])
                if mask[1]:
                    grad_w = (rows_g.mT @ x_c.reshape(-1, x.shape[-1])).to(weight.dtype)
                if mask[2]:
                    grad_b = rows_g.sum(0).to(module.bias.dtype)
            return grad_x, grad_w, grad_b
        unbatched = x_c.ndim == 3
        if unbatched:
            x_c, grad_output = x_c[None], grad_output[None]
        explicit = _explicit_padding(module)
        if explicit is None:
            grad_x, grad_w, grad_b = _conv_backward(
                module, grad_output, x_c, weight_c, list(module.padding), mask, self.has_bias
            )
        else:
            # Padding the conv op cannot express (a mode other than zeros, or an asymmetric
            # "same"): pad explicitly and let autograd map the gradient back through F.pad.
            with torch.enable_grad():
                leaf = x_c.detach().requires_grad_(mask[0])
                padded = F.pad(leaf, explicit[0], mode=explicit[1])
            grad_padded, grad_w, grad_b = _conv_backward(
                module, grad_output, padded.detach(), weight_c, [0, 0], mask, self.has_bias
            )
            grad_x = None
            if mask[0]:
                (grad_x,) = torch.autograd.grad(padded, leaf, grad_padded)
        if grad_x is not None:
            grad_x = (grad_x[0] if unbatched else grad_x).to(x.dtype)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(module.bias.dtype)
        return grad_x, grad_w, grad_b

    # ----------------------------------------------------------------------------- data

    @property
    def calls(self) -> int:
        """Number of recorded forward calls since the last clear."""
        return len(self._calls)

    @property
    def batch_size(self) -> int:
        """``B``: examples in the recorded calls (summed over calls; with
        ``repeated_calls="positions"`` the batch of one call, which every call shares)."""
        if self.capture.repeated_calls == "positions" and self._calls:
            return _batch(self._same_batch())
        return sum(_batch(call) for call in self._calls)

    def _same_batch(self) -> _Call:
        """The first call, after checking that every call has its batch size."""
        calls = self._calls
        sizes = {_batch(call) for call in calls}
        if len(sizes) > 1:
            raise RuntimeError(
                f"layer {self.name!r} was called {len(calls)} times with batch sizes "
                f"{[_batch(call) for call in calls]}: its calls are positions of the same "
                "examples (weight sharing), which needs one batch size; call zero_grad() "
                "between the forward passes of different batches"
            )
        return calls[0]

    def _join(self, parts: list[Tensor]) -> Tensor:
        """The per-call tensors joined as ``repeated_calls`` says (each is (B, [T,] d))."""
        if len(parts) == 1:
            return parts[0]
        if self.capture.repeated_calls == "examples":
            return torch.cat(parts, dim=0)
        self._same_batch()
        return torch.cat([part if part.ndim == 3 else part[:, None] for part in parts], dim=1)

    def _require_calls(self) -> list[_Call]:
        if not self._calls:
            raise RuntimeError(
                f"layer {self.name!r} has no recorded forward pass: run the model with grad "
                "enabled while the capture is enabled (and not cleared) before reading captures"
            )
        return self._calls

    @property
    def inputs(self) -> Tensor:
        """The raw layer input of the (single) recorded call, detached: ``(B, d_in)``,
        ``(B, *, d_in)`` or ``(B, C_in, H, W)``."""
        calls = self._require_calls()
        if len(calls) != 1:
            raise RuntimeError(f"layer {self.name!r} recorded {len(calls)} calls; use .a")
        return calls[0].inputs

    @property
    def a(self) -> Tensor:
        """Layer inputs in the core convention: ``(B, d_in[+1])`` or ``(B, T, d_in[+1])``,
        contiguous, with a column of ones appended when the layer has a bias."""
        cached = self._cache.get("a")
        if cached is None:
            parts = []
            for call in self._require_calls():
                self._check_unmodified(call)
                parts.append(self._unfold(call.inputs))
            cached = self._join(parts)
            self._cache["a"] = cached
        return cached

    def _check_unmodified(self, call: _Call) -> None:
        if call.inputs._version != call.version:
            raise RuntimeError(
                f"the input of layer {self.name!r} was modified in place after the forward "
                "pass; its captured a (and gradient) would be wrong"
            )

    def _unfold(self, x: Tensor) -> Tensor:
        module = self.module
        if self.kind == "linear":
            rows = x[None] if x.ndim == 1 else x
            if rows.ndim > 3:
                rows = rows.reshape(rows.shape[0], -1, rows.shape[-1])
            if not self.has_bias:
                return rows.contiguous()
            # One allocation and one copy: x into the leading columns, ones into the last.
            out = rows.new_empty((*rows.shape[:-1], self.d_in))
            out[..., :-1].copy_(rows)
            out[..., -1] = 1
            return out
        if x.ndim == 3:
            x = x[None]
        explicit = _explicit_padding(module)
        if explicit is not None:
            x = F.pad(x, explicit[0], mode=explicit[1])
        patches = F.unfold(
            x,
            module.kernel_size,
            dilation=module.dilation,
            padding=0 if explicit is not None else module.padding,
            stride=module.stride,
        )  # (B, C_in·kh·kw, T)
        out = patches.new_empty((patches.shape[0], patches.shape[2], self.d_in))
        if self.has_bias:
            out[..., :-1].copy_(patches.mT)
            out[..., -1] = 1
        else:
            out.copy_(patches.mT)
        return out

    def _errors(self, key: str, attribute: str) -> Tensor | None:
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        raw = [getattr(call, attribute) for call in self._require_calls()]
        if any(part is None for part in raw):
            return None
        parts = []
        mask = self.capture.mask
        for call, grad in zip(self._calls, raw):
            if self.kind == "linear":
                rows = grad[None] if grad.ndim == 1 else grad
                if rows.ndim > 3:
                    rows = rows.reshape(rows.shape[0], -1, rows.shape[-1])
            else:
                grad = grad[None] if grad.ndim == 3 else grad
                rows = grad.flatten(2).mT  # (B, T, C_out)
            if mask is not None:
                # Masked positions contribute nothing (zero rows, whatever autograd gave).
                keep = self._call_mask(call, mask)
                rows = torch.where(keep[..., None], rows, rows.new_zeros(()))
            parts.append(rows.contiguous())
        result = self._join(parts)
        self._cache[key] = result
        return result

    @property
    def e(self) -> Tensor | None:
        """Per-example errors of the data backward: ``(B, d_out)`` or ``(B, T, d_out)``, the
        gradient of each example's own loss w.r.t. the layer output (``None`` before the
        backward, or with ``errors=False``); zero at positions masked by
        :meth:`Capture.set_mask`."""
        return self._errors("e", "errors")

    @property
    def e_sampled(self) -> Tensor | None:
        """Per-example errors of the last :meth:`Capture.backward_errors` /
        :meth:`Capture.backward_sampled` (same layout as :attr:`e`; ``None`` if none ran)."""
        return self._errors("e_sampled", "sampled_errors")

    @property
    def has_errors(self) -> bool:
        """Whether every recorded call has its data-backward errors (no tensor is built)."""
        calls = self._calls
        return bool(calls) and all(call.errors is not None for call in calls)

    @property
    def has_sampled_errors(self) -> bool:
        """Whether every recorded call has errors of a sampled / explicit-error backward."""
        calls = self._calls
        return bool(calls) and all(call.sampled_errors is not None for call in calls)

    @property
    def mask(self) -> Tensor | None:
        """The mask of :meth:`Capture.set_mask` in this layer's layout: a boolean tensor of
        the leading shape of :attr:`a` (``(B,)`` or ``(B, T)``), or ``None`` without a mask
        (see the module docstring, "Sequences and padding masks")."""
        mask = self.capture.mask
        if mask is None:
            return None
        cached = self._cache.get("mask")
        if cached is None:
            parts = [self._call_mask(call, mask) for call in self._require_calls()]
            if len(parts) == 1:
                cached = parts[0]
            elif self.capture.repeated_calls == "examples":
                cached = torch.cat(parts, dim=0)
            else:
                self._same_batch()
                cached = torch.cat([part if part.ndim == 2 else part[:, None] for part in parts], 1)
            self._cache["mask"] = cached
        return cached

    def mask_counts(self) -> tuple[float, float]:
        """``(N_kept, B_eff)``: the kept rows of :attr:`a` and the examples with a kept row
        (``B_eff`` as in ``curvlinalg.kron.example_count``), each at least 1 (an all-masked
        batch divides zeros by 1, the core's convention); ``(B·T, B)`` without a mask. One
        host sync."""
        mask = self.mask
        if mask is None:
            return float(self.rows), float(self.batch_size)
        counts = torch.stack([mask.sum(), mask.reshape(mask.shape[0], -1).any(-1).sum()])
        kept, examples = (max(float(value), 1.0) for value in counts.tolist())
        return kept, examples

    def _leading(self, call: _Call) -> tuple[int, ...]:
        """The leading shape of one call's rows of :attr:`a` / :attr:`e`."""
        if self.kind == "linear":
            shape = call.inputs.shape
            if len(shape) == 1:
                return (1,)
            if len(shape) == 2:
                return (int(shape[0]),)
            return (int(shape[0]), math.prod(int(size) for size in shape[1:-1]))
        errors = call.errors if call.errors is not None else call.sampled_errors
        if errors is not None:
            batch = int(errors.shape[0]) if errors.ndim == 4 else 1
            return (batch, int(errors.shape[-2]) * int(errors.shape[-1]))
        return tuple(int(size) for size in self._unfold(call.inputs).shape[:-1])

    def _call_mask(self, call: _Call, mask: Tensor) -> Tensor:
        """The capture's mask in the layout of one call's rows (module docstring rules)."""
        leading = self._leading(call)
        mask = mask.to(call.inputs.device)  # no copy when it is there already
        examples = mask if mask.ndim == 1 else mask.any(-1)
        if self.kind == "conv2d" or (mask.ndim == 1 and len(leading) == 2):
            if int(examples.shape[0]) == leading[0]:
                return examples[:, None].expand(leading)
        elif tuple(mask.shape) == leading:
            return mask
        elif len(leading) == 1 and int(mask.shape[0]) == leading[0]:
            return examples
        raise ValueError(
            f"the mask has shape {tuple(mask.shape)} (the model output's positions) but layer "
            f"{self.name!r} has captures of leading shape {leading}: a mask applies to layers "
            "with the output's positions (B, T) or one row per example (B,); restrict layers= "
            "or give no mask"
        )

    @property
    def rows(self) -> int:
        """``B·T``: the rows of :attr:`a` and :attr:`e` (``T`` = output positions of a
        convolution, the flattened middle axes of a ``Linear``), from the recorded shapes —
        without unfolding anything. Needs the data backward for a convolution."""
        total = 0
        for call in self._require_calls():
            if self.kind == "linear":
                shape = call.inputs.shape
                total += math.prod(shape[:-1]) if len(shape) > 1 else 1
            else:
                if call.errors is None:
                    raise RuntimeError(f"layer {self.name!r} has no errors: run the backward")
                shape = call.errors.shape
                total += (shape[0] if len(shape) == 4 else 1) * shape[-2] * shape[-1]
        return total

    def finite_sum(self, sampled: bool = False) -> Tensor:
        """A float32 scalar that is finite only if the recorded inputs and the errors (of the
        data backward, and of the sampled one with ``sampled=True``) all are — the finiteness
        of :attr:`a` and :attr:`e` without building them (unfolding, padding with zeros and
        the ones column change no finiteness)."""
        parts = []
        for call in self._require_calls():
            parts.append(call.inputs.sum(dtype=torch.float32))
            for errors in (call.errors, call.sampled_errors if sampled else None):
                if errors is not None:
                    parts.append(errors.sum(dtype=torch.float32))
        return torch.stack(parts).sum()

    def gradient(self, dtype: torch.dtype | None = None) -> Tensor:
        """The gradient of the back-propagated loss as a ``(d_out, d_in[+1])`` matrix:
        ``Σ_{i,t} e_itᵀ a_it / B`` for ``loss_reduction="mean"``, without the ``1/B`` for
        ``"sum"`` — what ``[W.grad | b.grad]`` would hold.

        For a convolution the product is the native weight (and bias) backward of the
        recorded input and output gradient: the same sum, without the unfolded ``a`` (whose
        im2col and copies cost more than the convolution itself on a CPU). ``dtype``: the
        result's (a ``Linear``'s captures are converted before the product); default the
        captures' own."""
        if not self.has_errors:
            raise RuntimeError(f"layer {self.name!r} has no errors: run the backward first")
        scale = 1.0 if self.capture.loss_reduction == "sum" else 1.0 / self.batch_size
        if self.kind == "linear":
            e, a = self.e, self.a
            if dtype is not None:
                e, a = e.to(dtype), a.to(dtype)  # type: ignore[union-attr]
            return (e.reshape(-1, self.d_out).mT @ a.reshape(-1, self.d_in)) * scale  # type: ignore[union-attr]
        weight = self.module.weight.detach()
        total = None
        mask = self.capture.mask
        for call in self._calls:
            self._check_unmodified(call)
            errors = call.errors
            if mask is not None:
                keep = self._call_mask(call, mask)[:, 0]  # one entry per example
                errors = torch.where(
                    keep.reshape(-1, 1, 1, 1) if errors.ndim == 4 else keep.reshape(1, 1, 1),
                    errors,
                    errors.new_zeros(()),
                )
            _, grad_w, grad_b = self._backward(
                errors, call.inputs, weight, (False, True, self.has_bias)
            )
            columns = grad_w.reshape(self.d_out, -1)
            if grad_b is not None:
                columns = torch.cat([columns, grad_b[:, None]], dim=1)
            total = columns if total is None else total + columns
        total = total * scale  # type: ignore[operator]
        return total if dtype is None else total.to(dtype)

    def _clear(self) -> None:
        self._calls = []
        self._cache = {}

    def _remove(self) -> None:
        self._handle.remove()
        self._clear()


def _weak_hook(layer: LayerCapture) -> Any:
    """A forward hook that calls ``layer._forward_hook`` while ``layer`` is alive."""
    reference = weakref.ref(layer)

    def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Any:
        target = reference()
        if target is None or target.module is not module:  # dead, or a deepcopy's hook
            return None
        return target._forward_hook(module, args, output)

    return hook


def _owner(module: nn.Module) -> Capture | None:
    """The live :class:`Capture` hooking ``module``, if any."""
    reference = getattr(module, "_curvlinalg_capture", None)
    owner = reference() if isinstance(reference, weakref.ref) else None
    # A deepcopy of a captured module copies the attribute, not the capture.
    if owner is None or not any(layer.module is module for layer in owner.layers):
        return None
    return owner


def _release(handles: list[Any]) -> None:
    for handle in handles:
        handle.remove()


def _explicit_padding(module: nn.Conv2d) -> tuple[tuple[int, ...], str] | None:
    """``(F.pad widths, F.pad mode)`` when the module's padding must be applied explicitly (a
    non-zero ``padding_mode`` or a string padding, whose ``"same"`` may be asymmetric);
    ``None`` when the conv op's symmetric zero padding does it."""
    if module.padding_mode == "zeros" and not isinstance(module.padding, str):
        return None
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return tuple(module._reversed_padding_repeated_twice), mode


def _conv_backward(
    module: nn.Conv2d,
    grad_output: Tensor,
    x: Tensor,
    weight: Tensor,
    padding: list[int],
    mask: tuple[bool, bool, bool],
    has_bias: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The native convolution backward, computing only the gradients that ``mask`` asks for."""
    return torch.ops.aten.convolution_backward(
        grad_output,
        x,
        weight,
        [int(weight.shape[0])] if has_bias else None,
        list(module.stride),
        padding,
        list(module.dilation),
        False,
        [0, 0],
        1,
        [mask[0], mask[1], mask[2] and has_bias],
    )


# --------------------------------------------------------------------------------------
# The capture of a model
# --------------------------------------------------------------------------------------


class Capture:
    r"""Capture ``a`` and ``e`` of every supported layer of a model (see the module docstring).

    Args:
        model: the network; its supported layers (:func:`find_layers`) are captured, unless
            ``layers`` restricts them.
        layers: the modules to capture (each must be a supported layer of ``model``); default
            all supported layers.
        loss_reduction: how the back-propagated loss combines examples: ``"mean"`` (autograd
            delivers ``e / B``; the capture multiplies by ``B``) or ``"sum"``.
        errors: store ``e`` on the data backward (``False``: inputs only).
        weight_grads: also accumulate ``W.grad``/``b.grad`` of captured layers, as plain
            autograd would (``False``: skip that product, which factored optimizers discard).
        repeated_calls: how the records of a layer called several times are joined:
            ``"examples"`` (along the batch) or ``"positions"`` (the calls are positions of
            the same examples; see the module docstring).

    Hooks are registered at construction and removed by :meth:`remove` (or on leaving a
    ``with`` block). ``enabled = False`` pauses recording. Records accumulate until
    :meth:`clear`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        layers: Iterable[nn.Module] | None = None,
        loss_reduction: LossReduction = "mean",
        errors: bool = True,
        weight_grads: bool = False,
        repeated_calls: RepeatedCalls = "examples",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum'; got {loss_reduction!r}")
        if repeated_calls not in ("examples", "positions"):
            raise ValueError(
                f"repeated_calls must be 'examples' or 'positions'; got {repeated_calls!r}"
            )
        names = {id(module): name for name, module in model.named_modules()}
        if layers is None:
            chosen = find_layers(model)
        else:
            chosen = []
            for module in layers:
                if id(module) not in names:
                    raise ValueError(
                        f"layers contains a {type(module).__name__} that is not part of model"
                    )
                chosen.append((names[id(module)], module))
        if any(_owner(module) is not None for _, module in chosen):
            # An optimizer or capture that nobody references any more may be waiting for the
            # cycle collector; its finalizer releases the hooks.
            gc.collect()
        for _, module in chosen:
            if _owner(module) is not None:
                raise ValueError(
                    f"layer {names[id(module)]!r} is already captured by another Capture (an "
                    "optimizer's or a Laplace's): call that optimizer's remove_hooks() (or the "
                    "Capture's remove()) first, or delete it"
                )
        self.model = model
        self.loss_reduction: LossReduction = loss_reduction
        self._scale_is_one = loss_reduction == "sum"
        self.errors = errors
        self.weight_grads = weight_grads
        self.repeated_calls: RepeatedCalls = repeated_calls
        self.enabled = True
        #: The positions that count (:meth:`set_mask`), or ``None``.
        self.mask: Tensor | None = None
        self._sampled_pass = False
        # A data backward has run through a captured layer since the last clear().
        self._backward_seen = False
        #: The first layer recorded in a forward pass that came after a backward pass since
        #: the last :meth:`clear` (``None`` if none): the sign of gradient accumulation over
        #: micro-batches, whose calls the captures cannot tell from repeated calls of one
        #: forward (the optimizers refuse to step on it).
        self.forward_after_backward: str | None = None
        self.layers: list[LayerCapture] = []
        for name, module in chosen:
            self.layers.append(LayerCapture(self, name, module))
            module._curvlinalg_capture = weakref.ref(self)  # type: ignore[assignment]
        # Garbage collection of the capture removes its hooks (no reference to self here).
        self._finalizer = weakref.finalize(self, _release, [layer._handle for layer in self.layers])

    def __repr__(self) -> str:
        return f"Capture({len(self.layers)} layers, loss_reduction={self.loss_reduction!r})"

    def __iter__(self) -> Iterator[LayerCapture]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def clear(self) -> None:
        """Forget every recorded call (and the tensors it references) and the mask."""
        self.mask = None
        self._backward_seen = False
        self.forward_after_backward = None
        for layer in self.layers:
            layer._clear()

    def set_mask(self, mask: Tensor | None) -> None:
        r"""The positions that count for the captures of this pass (until :meth:`clear`).

        ``mask``: a boolean tensor of the model output's leading shape — ``(B, T)`` for
        ``(B, T, C)`` language-model logits, ``(B,)`` for ``(B, C)`` — ``True`` where the
        position counts (e.g. ``labels != -100`` for a loss with ``ignore_index=-100``), or
        ``None`` (everything counts). Masked positions contribute nothing to the errors of
        :meth:`backward_sampled`, to any layer's :attr:`LayerCapture.e` /
        :attr:`LayerCapture.e_sampled` (zero rows) and, through :attr:`LayerCapture.mask`,
        to factors (see the module docstring). Set it before :meth:`backward_sampled` /
        :meth:`backward_errors` and before reading captures; it may be set before or after
        the forward.
        """
        if mask is not None:
            if not isinstance(mask, Tensor):
                raise TypeError(f"mask must be a torch.Tensor or None; got {type(mask).__name__}")
            if mask.dtype != torch.bool:
                raise ValueError(
                    "mask must be a boolean tensor (True = the position counts; for labels "
                    f"with ignore_index use labels != ignore_index); got dtype {mask.dtype}"
                )
            if mask.ndim not in (1, 2):
                raise ValueError(
                    "mask must have the model output's leading shape, (B,) or (B, T); got "
                    f"shape {tuple(mask.shape)}"
                )
        self.mask = mask
        for layer in self.layers:
            for key in ("e", "e_sampled", "mask"):
                layer._cache.pop(key, None)

    def remove(self) -> None:
        """Remove the hooks (the capture cannot record afterwards) and clear."""
        for layer in self.layers:
            layer._remove()
            if _owner(layer.module) is self:
                layer.module._curvlinalg_capture = None  # type: ignore[assignment]
        self._finalizer.detach()

    def captures(self, which: Literal["data", "sampled"] = "data") -> list[tuple[Tensor, Tensor]]:
        """``[(a, e), ...]`` per layer for the curvlinalg core: ``which="data"`` uses
        :attr:`LayerCapture.e`, ``"sampled"`` :attr:`LayerCapture.e_sampled`."""
        if which not in ("data", "sampled"):
            raise ValueError(f"which must be 'data' or 'sampled'; got {which!r}")
        pairs = []
        for layer in self.layers:
            e = layer.e if which == "data" else layer.e_sampled
            if e is None:
                raise RuntimeError(
                    f"layer {layer.name!r} has no {which} errors: run the "
                    + ("backward" if which == "data" else "backward_errors/backward_sampled")
                    + " first"
                )
            pairs.append((layer.a, e))
        return pairs

    def backward_errors(self, output: Tensor, output_errors: Tensor) -> None:
        r"""Back-propagate per-example output gradients into :attr:`LayerCapture.e_sampled`.

        ``output_errors`` has ``output``'s shape: row ``i`` is the gradient of example ``i``'s
        own loss w.r.t. ``output`` (e.g. ``softmax(z_i) − onehot(ỹ_i)``), so the stored errors
        need no batch rescaling whatever ``loss_reduction`` is. No ``.grad`` is written and
        no weight gradient is computed. The graph is kept (``retain_graph=True``) so that the
        data backward can follow; call this before it.
        """
        if output.shape != output_errors.shape:
            raise ValueError(
                f"shape mismatch: output has shape {tuple(output.shape)} but output_errors "
                f"has {tuple(output_errors.shape)}"
            )
        # Only trainable parameters can be requested (frozen ones raise in autograd).
        weights = [
            p
            for layer in self.layers
            if layer._calls
            for p in layer.module.parameters(recurse=False)
            if p.requires_grad
        ]
        if not weights:
            raise RuntimeError(
                "no captured layer has a recorded forward pass (with a trainable parameter) "
                "to back-propagate"
            )
        self._sampled_pass = True
        try:
            # Gradients w.r.t. the captured weights are *requested* so that autograd runs
            # every captured node, but the nodes return None for them: nothing is formed or
            # accumulated, and other parameters are not on the requested paths.
            torch.autograd.grad(
                output,
                weights,
                grad_outputs=output_errors.to(output.dtype),
                retain_graph=True,
                allow_unused=True,
            )
        finally:
            self._sampled_pass = False
        for layer in self.layers:
            layer._cache.pop("e_sampled", None)

    def backward_sampled(
        self,
        logits: Tensor,
        generator: torch.Generator | None = None,
        *,
        mask: Tensor | None = None,
    ) -> Tensor:
        r"""MC-Fisher errors: sample ``ỹ ~ softmax(z)`` and back-propagate
        ``∂ℓ(z, ỹ)/∂z = softmax(z) − onehot(ỹ)`` (cross-entropy) with :meth:`backward_errors`.

        ``logits``: ``(B, C)``, or ``(B, T, C)`` language-model logits (one label per token:
        the per-example loss is the sum of the token losses). Labels come from
        ``curvlinalg.fisher.sample_labels`` with uniform draws of
        ``torch.rand(B, generator=generator)`` (``torch.rand(B, T, …)`` for sequences;
        drawn at masked positions too, so the stream does not depend on the mask; computed
        in float32 at least). ``mask``: the positions that count (default the capture's,
        :meth:`set_mask`), of the logits' leading shape; masked positions get label 0 and
        exactly zero errors. Returns the sampled labels ``(B,)`` or ``(B, T)``.
        """
        if logits.ndim not in (2, 3):
            raise ValueError(f"logits must be (B, C) or (B, T, C); got shape {tuple(logits.shape)}")
        mask = self._output_mask(logits, mask)
        detached = logits.detach()
        if detached.dtype not in (torch.float32, torch.float64):
            detached = detached.float()
        uniform = torch.rand(
            tuple(detached.shape[:-1]),
            generator=generator,
            dtype=detached.dtype,
            device=detached.device,
        )
        labels = fisher.sample_labels(detached, uniform, mask)
        self.backward_errors(logits, fisher.softmax_errors(detached, labels, mask))
        return labels

    def _output_mask(self, logits: Tensor, mask: Tensor | None) -> Tensor | None:
        """``mask`` (default the capture's), checked against the logits' leading shape."""
        if mask is None:
            mask = self.mask
        if mask is None:
            return None
        if tuple(mask.shape) != tuple(logits.shape[:-1]):
            raise ValueError(
                f"shape mismatch: the mask has shape {tuple(mask.shape)} but the logits "
                f"{tuple(logits.shape)} need one entry per position, {tuple(logits.shape[:-1])}"
            )
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a boolean tensor; got dtype {mask.dtype}")
        return mask.to(logits.device)
