r"""Capture each layer's inputs ``a`` and per-example output gradients ``e`` in JAX.

Only public JAX/Flax API: a layer's output gradient is the gradient with respect to a zero
*perturbation* added to the output (``y + 0``), and its input is returned alongside the
model's output. One forward pass and one backward pass give the loss, the mean gradient and
the captures of every layer; a Fisher other than the empirical one costs one more backward
pass (MC) or ``C`` more (exact, vectorised with ``jax.vmap``) through the same forward.

Conventions (those of ``curvlinalg``, see its README):

* per layer ``a``: ``(B, d_in)`` or ``(B, T, d_in)`` — dense inputs, sequence positions, or the
  convolution patches of :func:`conv_patches` (``T`` output positions, ``d_in =
  C_in·kh·kw``) — with a column of ones appended when the layer has a bias;
* ``e``: ``(B, d_out)`` or ``(B, T, d_out)``, the gradient of **each example's own loss**
  with respect to the layer's output (not of the batch mean, which would be ``e / B``);
* per-example gradient ``g_i = Σ_t e_itᵀ a_it`` of the weight matrix ``(d_out, d_in)``, which
  relates to the Flax kernel through :func:`curvlinalg_jax.layout.kernel_to_matrix`.

Two ways to mark layers:

* Flax linen: use :class:`curvlinalg_jax.Dense` / :class:`curvlinalg_jax.Conv` (drop-in
  subclasses of ``nn.Dense`` / ``nn.Conv``) and call :func:`capture_linen`;
* plain functions: write the forward pass as ``forward(params, inputs, tap)`` and wrap each
  layer's output as ``y = tap(name, layer_input, y)`` (:func:`identity_tap` outside
  capturing), then call :func:`capture`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from curvlinalg import fisher as core_fisher

from . import layout

Array = Any
LayerCaptures = dict[str, tuple[Array, Array]]

__all__ = [
    "Captures",
    "capture",
    "capture_linen",
    "conv_patches",
    "identity_tap",
    "INPUTS_COLLECTION",
    "PERTURBATIONS_COLLECTION",
]

#: Flax collection into which :class:`curvlinalg_jax.Dense`/``Conv`` sow their inputs.
INPUTS_COLLECTION = "curvlinalg_inputs"
#: Flax collection of the zero perturbations added to their outputs.
PERTURBATIONS_COLLECTION = "curvlinalg_perturbations"

FISHER_TYPES = ("empirical", "mc", "exact")


class Captures(NamedTuple):
    r"""Per-layer captures of one batch, keyed by layer path (``"Dense_0"``).

    ``loss``: ``{path: (a, e)}`` with ``e`` the per-example gradients of the training loss
    (data labels); its mean gradient is the one :func:`capture` returns.
    ``fisher``: ``{path: (a, ẽ)}``, the rows that define the Fisher ``F = (1/B)·G Gᵀ``:
    the same as ``loss`` for the empirical Fisher, ``ẽ`` for labels sampled from the model
    (MC), or ``B·C`` rows — every class ``c`` weighted by ``√p_c``, inputs repeated ``C``
    times — for the exact Fisher. ``B`` is always ``loss``'s batch size, so the Fisher's
    scale is ``1/B`` also when ``fisher`` has ``B·C`` rows. For sequence logits ``(B, T, C)``
    the exact Fisher has ``B·T·C`` rows (one per target position and class, inputs repeated
    ``T·C`` times).

    ``mask``: ``None`` or the boolean ``(B, T)`` position mask given to the capture
    (``position_mask``; ``True`` = the position counts). The rows of masked positions are
    zero in ``loss`` and ``fisher`` for every layer whose captures are ``(B, T, d)`` with
    that ``T``; the transformations then form ``A = Σ_{i,t} m_it a_it a_itᵀ / B_eff``
    (``B_eff`` the sequences with a kept position) and ``G`` as the mean over kept positions,
    so masked positions contribute nothing, as if deleted from the batch.

    A pytree: pass it through ``jax.jit`` and to a transformation's ``update``.
    """

    loss: LayerCaptures
    fisher: LayerCaptures
    mask: Array | None = None

    @property
    def batch_size(self) -> int:
        """``B``, the number of examples (static)."""
        first = next(iter(self.loss.values()))
        return int(first[0].shape[0])


def validated_captures(captures: Any, infos: Sequence[layout.LayerInfo], who: str) -> Captures:
    """``captures`` as :class:`Captures`, checked to hold every layer of ``infos``.

    A plain dict ``{path: (a, e)}`` serves as both loss and Fisher captures (empirical
    Fisher). ``who`` names the caller in error messages.
    """
    if captures is None:
        raise ValueError(
            f"{who}.update needs the batch's layer captures: "
            "update(updates, state, params, captures=captures) with captures from "
            "curvlinalg_jax.capture / capture_linen"
        )
    if isinstance(captures, Captures):
        result = captures
    elif isinstance(captures, Mapping):
        result = Captures(loss=dict(captures), fisher=dict(captures))
    else:
        raise ValueError(
            f"captures must be a curvlinalg_jax.Captures or a dict {{path: (a, e)}}; "
            f"got {type(captures).__name__}"
        )
    batch = None
    for field in ("loss", "fisher"):
        table = getattr(result, field)
        rows = None
        for info in infos:
            if info.path not in table:
                raise ValueError(
                    f"captures.{field} has no entry for layer {info.path!r} (it has "
                    f"{sorted(table)}); capture every preconditioned layer or pass layers=..."
                )
            a, e = table[info.path]
            where = f"{who}: captures.{field}[{info.path!r}]"
            if a.ndim not in (2, 3) or e.ndim != a.ndim:
                raise ValueError(
                    f"{where} must be (a, e) both (B, d) or both (B, T, d); got a "
                    f"{tuple(a.shape)} and e {tuple(e.shape)}"
                )
            if tuple(a.shape[:-1]) != tuple(e.shape[:-1]):
                raise ValueError(
                    f"{where}: a has shape {tuple(a.shape)} but e has {tuple(e.shape)}; their "
                    "batch (and position) axes must agree"
                )
            # Every layer of one table holds the same examples; the Fisher's rows are the
            # loss batch's B examples (empirical, MC) or C rows for each of them (exact).
            rows = int(a.shape[0]) if rows is None else rows
            if rows == 0:
                raise ValueError(f"{where} has an empty batch (a {tuple(a.shape)})")
            if int(a.shape[0]) != rows:
                raise ValueError(
                    f"{where} has {int(a.shape[0])} rows but other layers of captures.{field} "
                    f"have {rows}; all layers must hold the same batch"
                )
            if batch is not None and rows % batch:
                raise ValueError(
                    f"{where} has {rows} rows, not a multiple of the batch size {batch} of "
                    "captures.loss (the Fisher has B rows, or B·C for the exact Fisher)"
                )
            if (int(e.shape[-1]), int(a.shape[-1])) != (info.d_out, info.d_in):
                raise ValueError(
                    f"captures.{field}[{info.path!r}] give a weight matrix "
                    f"({int(e.shape[-1])}, {int(a.shape[-1])}) but the layer's kernel "
                    f"{info.kernel_shape}{' with bias' if info.has_bias else ''} is "
                    f"(d_out, d_in) = ({info.d_out}, {info.d_in})"
                )
        if field == "loss":
            batch = rows
    mask = result.mask
    if mask is not None:
        if (
            getattr(mask, "dtype", None) != jnp.bool_
            or mask.ndim != 2
            or int(mask.shape[0]) != batch
        ):
            raise ValueError(
                f"{who}: captures.mask must be a boolean (B={batch}, T) position mask; got "
                f"{getattr(mask, 'dtype', type(mask).__name__)} "
                f"{tuple(getattr(mask, 'shape', ()))}"
            )
    return result


def layer_mask(captures: Captures, rows: Array) -> Array | None:
    """The mask of one layer's capture ``rows`` (``a`` or ``e``, ``(N, T, d)``): ``None``
    without a mask or for captures without those positions, else ``captures.mask``
    ``(B, T)`` repeated ``N/B`` times along the rows (the exact Fisher's ``B·T·C`` rows)."""
    mask = captures.mask
    if mask is None or rows.ndim != 3 or int(rows.shape[1]) != int(mask.shape[1]):
        return None
    repeat = int(rows.shape[0]) // int(mask.shape[0])
    return mask if repeat == 1 else jnp.repeat(mask, repeat, axis=0)


def identity_tap(name: str, layer_input: Array, layer_output: Array) -> Array:
    """The ``tap`` of a plain forward pass run without capturing: returns ``layer_output``."""
    del name, layer_input
    return layer_output


def _canonical_padding(padding: Any, rank: int) -> str | list[tuple[int, int]]:
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID", "SAME_LOWER"):
            raise ValueError(
                f"padding {padding!r} is not supported for capturing; use 'SAME', 'VALID' or "
                "explicit (low, high) pairs"
            )
        return padding.upper()
    if isinstance(padding, int):
        return [(padding, padding)] * rank
    pads = list(padding)
    if len(pads) != rank:
        raise ValueError(f"padding must have one entry per spatial axis ({rank}); got {padding!r}")
    return [(p, p) if isinstance(p, int) else (int(p[0]), int(p[1])) for p in pads]


def _tuple(value: int | Sequence[int] | None, rank: int, name: str) -> tuple[int, ...]:
    if value is None:
        return (1,) * rank
    if isinstance(value, int):
        return (value,) * rank
    value = tuple(int(v) for v in value)
    if len(value) != rank:
        raise ValueError(f"{name} must have {rank} entries (one per spatial axis); got {value}")
    return value


def conv_patches(
    inputs: Array,
    kernel_size: Sequence[int],
    strides: int | Sequence[int] | None = 1,
    padding: str | int | Sequence[Any] = "SAME",
    kernel_dilation: int | Sequence[int] | None = 1,
) -> Array:
    r"""Convolution patches ``(B, *out_spatial, C_in·prod(kernel_size))`` of channels-last
    ``inputs`` ``(B, *spatial, C_in)``, via ``jax.lax.conv_general_dilated_patches``.

    Each patch is flattened channel-major (``C_in`` first, then the window), the layout of
    :func:`curvlinalg_jax.layout.kernel_to_matrix`, so a Flax convolution with kernel
    ``(*kernel_size, C_in, C_out)`` is ``patches @ kernel_to_matrix(kernel)ᵀ`` (plus bias).
    ``strides``, ``padding`` (``"SAME"``, ``"VALID"``, an int or ``(low, high)`` pairs) and
    ``kernel_dilation`` mean what they mean for ``flax.linen.Conv``.
    """
    kernel_size = tuple(int(k) for k in kernel_size)
    rank = len(kernel_size)
    if inputs.ndim != rank + 2:
        raise ValueError(
            f"inputs must be (B, *spatial, C_in) with {rank} spatial axes for kernel_size "
            f"{kernel_size}; got shape {tuple(inputs.shape)}"
        )
    spatial = "DHW"[-rank:] if rank <= 3 else None
    if spatial is None:
        raise ValueError(f"conv_patches supports 1 to 3 spatial axes; got {rank}")
    lhs = "N" + spatial + "C"
    return jax.lax.conv_general_dilated_patches(
        inputs,
        filter_shape=kernel_size,
        window_strides=_tuple(strides, rank, "strides"),
        padding=_canonical_padding(padding, rank),
        rhs_dilation=_tuple(kernel_dilation, rank, "kernel_dilation"),
        dimension_numbers=(lhs, "OI" + spatial, lhs),
    )


# --------------------------------------------------------------------------------------
# From raw layer inputs and output gradients to the core's captures
# --------------------------------------------------------------------------------------


def _as_rows(name: str, what: str, value: Array, batch: int) -> Array:
    """``(B, d)`` stays; ``(B, ..., d)`` becomes ``(B, T, d)`` with ``T`` the positions."""
    if value.ndim < 2 or int(value.shape[0]) != batch:
        raise ValueError(
            f"layer {name!r}: {what} has shape {tuple(value.shape)}; expected (B={batch}, ..., d)"
        )
    if value.ndim == 2:
        return value
    return jnp.reshape(value, (batch, -1, value.shape[-1]))


def _feature_rows(info: layout.LayerInfo, layer_input: Array, output_grad: Array) -> tuple:
    """Input ``(B, ..., *in)`` (or already flat ``(B, ..., d_in)``: dense inputs, patches) and
    output gradient ``(B, ..., *out)`` with their feature axes flattened in the order of
    :func:`layout.kernel_to_matrix`."""
    inputs, outputs = info.input_shape, info.output_shape
    n_in, n_out = len(inputs), len(outputs)
    if output_grad.ndim <= n_out or tuple(output_grad.shape[-n_out:]) != outputs:
        raise ValueError(
            f"layer {info.path!r}: its output has shape {tuple(output_grad.shape)}, which does "
            f"not end in the kernel {info.kernel_shape}'s {n_out} output axes {outputs} "
            "(B, ..., *outputs)"
        )
    if n_out > 1:
        output_grad = jnp.reshape(output_grad, output_grad.shape[:-n_out] + (-1,))
    flat = math.prod(inputs)
    if n_in > 1 and layer_input.ndim > n_in and tuple(layer_input.shape[-n_in:]) == inputs:
        layer_input = layout.flatten_inputs(layer_input, n_in)
    elif int(layer_input.shape[-1]) != flat:
        hint = ""
        for more in range(n_out + 1, len(info.kernel_shape)):
            # A bias-free kernel (d, heads, head_dim) reads as one output axis by default.
            kernel_in = info.kernel_shape[:-more]
            if tuple(layer_input.shape[-len(kernel_in) :]) == kernel_in:
                hint = (
                    f"; if its kernel has {more} output axes (a DenseGeneral without bias), "
                    f"declare them: layers={{{info.path!r}: {more}, ...}} here and in the "
                    "transformations"
                )
                break
        raise ValueError(
            f"layer {info.path!r}: its input has shape {tuple(layer_input.shape)} but the "
            f"kernel {info.kernel_shape} with {n_out} output axes needs inputs "
            f"(B, ..., *{inputs}) or flattened (B, ..., {flat}){hint}"
        )
    return layer_input, output_grad


def _layer_capture(
    info: layout.LayerInfo, layer_input: Array, output_grad: Array, dtype: Any
) -> tuple[Array, Array]:
    batch = int(layer_input.shape[0])
    layer_input, output_grad = _feature_rows(info, layer_input, output_grad)
    a = _as_rows(info.path, "its input", layer_input, batch).astype(dtype)
    e = _as_rows(info.path, "its output gradient", output_grad, batch).astype(dtype)
    if a.shape[:-1] != e.shape[:-1]:
        raise ValueError(
            f"layer {info.path!r}: input positions {tuple(a.shape[:-1])} and output positions "
            f"{tuple(e.shape[:-1])} differ; a convolution's input must be its patches "
            "(conv_patches), not the image"
        )
    if info.has_bias:
        # The homogeneous coordinate: the bias is the weight of a constant input 1.
        a = jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,), dtype)], axis=-1)
    expected = (info.d_out, info.d_in)
    if (int(e.shape[-1]), int(a.shape[-1])) != expected:
        raise ValueError(
            f"layer {info.path!r}: captures give a weight matrix "
            f"({int(e.shape[-1])}, {int(a.shape[-1])}) but its kernel {info.kernel_shape}"
            f"{' with bias' if info.has_bias else ''} is (d_out, d_in) = {expected}"
        )
    return a, e


def _per_device(tree: Any, axis_name: Any) -> Any:
    """``tree`` marked as varying over ``axis_name`` (inside ``shard_map`` with ``check_vma``).

    Autodiff inside ``shard_map`` sums the cotangent of a device-invariant input over the
    devices; marking parameters and perturbations as per-device keeps gradients (and every
    example's ``e``) local, to be averaged explicitly. Already varying values, ``pmap`` and
    ``check_vma=False`` need nothing.
    """
    cast = getattr(jax.lax, "pcast", None)
    if axis_name is None or cast is None:
        return tree
    try:
        return cast(tree, axis_name, to="varying")
    except ValueError:  # already varying over axis_name
        return tree


def _device_key(key: Array, axis_name: Any) -> Array:
    """The MC labels' key of this device: ``key`` itself on one device, else
    ``jax.random.fold_in(key, i)`` with ``i`` the device's index along ``axis_name`` (row-major
    over a tuple of axes), so that devices given one key draw independent labels."""
    if axis_name is None:
        return key
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    index = jnp.zeros([], jnp.int32)
    for name in names:
        index = index * jax.lax.axis_size(name) + jax.lax.axis_index(name)
    return jax.random.fold_in(key, index)


def _capture_core(
    run: Callable[[Any, dict[str, Array]], tuple[Array, dict[str, Array]]],
    params: Any,
    perturbation_shapes: Mapping[str, jax.ShapeDtypeStruct],
    loss_fn: Callable[[Array, Any], Array],
    targets: Any,
    fisher: str,
    key: Array | None,
    layers: Sequence[str] | None,
    axis_name: Any,
    position_mask: Array | None = None,
) -> tuple[Array, Any, Captures]:
    if fisher not in FISHER_TYPES:
        raise ValueError(f"fisher must be one of {FISHER_TYPES}; got {fisher!r}")
    if position_mask is not None and (
        getattr(position_mask, "dtype", None) != jnp.bool_ or position_mask.ndim != 2
    ):
        raise ValueError(
            "position_mask must be a boolean (B, T) array (True = the position counts); got "
            f"{getattr(position_mask, 'dtype', type(position_mask).__name__)} "
            f"{tuple(getattr(position_mask, 'shape', ()))}"
        )
    if fisher == "mc" and key is None:
        raise ValueError("fisher='mc' samples labels and needs key (a jax.random key)")
    every_layer = {info.path: info for info in layout.find_layers(params)}
    unknown = sorted(set(perturbation_shapes) - set(every_layer))
    if unknown:
        raise ValueError(
            f"tapped names {unknown} are not layers of params (paths of subtrees with a "
            f"'kernel' leaf); the layers of params are {sorted(every_layer)}"
        )
    if layers is None:
        infos = tuple(info for path, info in every_layer.items() if path in perturbation_shapes)
    else:
        infos = layout.find_layers(params, layers)
    missing = [info.path for info in infos if info.path not in perturbation_shapes]
    if missing:
        raise ValueError(f"layers {missing} were not tapped during the forward pass")
    if not infos:
        raise ValueError(
            "no layer was tapped during the forward pass (use curvlinalg_jax.Dense/Conv, or "
            "tap(name, input, output) with names that are paths of params' layers)"
        )
    zeros = {
        name: jnp.zeros(shape.shape, shape.dtype) for name, shape in perturbation_shapes.items()
    }
    outputs, backward, layer_inputs = jax.vjp(
        run, _per_device(params, axis_name), _per_device(zeros, axis_name), has_aux=True
    )
    losses, loss_backward = jax.vjp(lambda out: loss_fn(out, targets), outputs)
    if losses.ndim != 1:
        raise ValueError(
            f"loss_fn must return the per-example losses, shape (B,); got shape {losses.shape}"
        )
    batch = int(losses.shape[0])
    # Backpropagating the *sum* of the losses gives each example's own output gradient e_i
    # (example i's loss depends on its own outputs only); the mean gradient is that over B.
    (output_cotangent,) = loss_backward(jnp.ones_like(losses))
    summed_grads, output_grads = backward(output_cotangent)
    grads = jax.tree_util.tree_map(lambda g: g / batch, summed_grads)

    if position_mask is not None and tuple(position_mask.shape[:1]) != (batch,):
        raise ValueError(
            f"position_mask has shape {tuple(position_mask.shape)} but the batch has B={batch} "
            "examples; it must be (B, T)"
        )

    def captures_of(grads_by_layer: Mapping[str, Array], repeat: int = 1) -> LayerCaptures:
        result = {}
        for info in infos:
            layer_input = layer_inputs[info.path]
            if repeat > 1:
                layer_input = jnp.repeat(layer_input, repeat, axis=0)
            a, e = _layer_capture(info, layer_input, grads_by_layer[info.path], info.dtype)
            if position_mask is not None and a.ndim == 3 and a.shape[1] == position_mask.shape[1]:
                keep = jnp.repeat(position_mask, repeat, axis=0)[..., None]
                # Masked positions contribute nothing, whatever they hold (padding).
                a, e = jnp.where(keep, a, 0), jnp.where(keep, e, 0)
            result[info.path] = (a, e)
        return result

    loss_captures = captures_of(output_grads)
    if fisher == "empirical":
        fisher_captures = loss_captures
    else:
        logits = outputs
        if not hasattr(logits, "ndim") or logits.ndim not in (2, 3):
            raise ValueError(
                f"fisher={fisher!r} needs the model output to be logits (B, C) or sequence "
                f"logits (B, T, C); got {getattr(logits, 'shape', type(logits))}"
            )
        fisher_mask = None
        if position_mask is not None:
            if logits.ndim != 3 or tuple(position_mask.shape) != tuple(logits.shape[:2]):
                raise ValueError(
                    f"position_mask has shape {tuple(position_mask.shape)} but fisher="
                    f"{fisher!r} needs it to match the sequence logits' (B, T) = "
                    f"{tuple(logits.shape[:2])}"
                )
            fisher_mask = position_mask
        if fisher == "mc":
            uniform = jax.random.uniform(
                _device_key(key, axis_name), logits.shape[:-1], dtype=logits.dtype
            )
            labels = core_fisher.sample_labels(logits, uniform, fisher_mask)
            errors = core_fisher.softmax_errors(logits, labels, fisher_mask)
            fisher_captures = captures_of(backward(errors)[1])
        else:
            # (B, C, C) [i, c] = √p_ic (p_i − e_c); (B, T, C, C) for sequences.
            rows = core_fisher.softmax_exact_errors(logits, fisher_mask)
            if logits.ndim == 3:
                # One cotangent per target position s and class c, zero at the other
                # positions: [s, c, i, t] = δ_st rows[i, t, c] (the positions' Fishers add
                # up, without cross terms between positions).
                steps = int(logits.shape[1])
                delta = jnp.eye(steps, dtype=rows.dtype)
                cotangents = jnp.einsum("st,itcd->scitd", delta, rows)
                rows = jnp.reshape(cotangents, (-1,) + logits.shape)
                per_row = jax.vmap(lambda cotangent: backward(cotangent)[1])(rows)
            else:
                per_row = jax.vmap(lambda cotangent: backward(cotangent)[1], in_axes=1)(rows)
            repeat = int(next(iter(per_row.values())).shape[0])
            # (R, B, ...) → (B, R, ...) → (B·R, ...): example i's R rows are contiguous,
            # matching jnp.repeat of its inputs.
            stacked = {
                name: jnp.reshape(jnp.moveaxis(value, 0, 1), (batch * repeat,) + value.shape[2:])
                for name, value in per_row.items()
            }
            fisher_captures = captures_of(stacked, repeat=repeat)
    loss = jnp.mean(losses)
    if axis_name is not None:
        # Equal per-device batches: the mean over devices is the whole batch's mean.
        loss, grads = jax.lax.pmean((loss, grads), axis_name)
    return loss, grads, Captures(loss_captures, fisher_captures, position_mask)


class _Recorder:
    """The ``tap`` handed to a plain forward pass: records inputs, adds perturbations."""

    def __init__(self, perturbations: Mapping[str, Array] | None) -> None:
        self.perturbations = perturbations
        self.inputs: dict[str, Array] = {}
        self.outputs: dict[str, jax.ShapeDtypeStruct] = {}

    def __call__(self, name: str, layer_input: Array, layer_output: Array) -> Array:
        if not isinstance(name, str):
            raise ValueError(f"tap's name must be the layer's path (a str); got {name!r}")
        if name in self.inputs:
            raise ValueError(
                f"layer {name!r} was tapped twice; a layer applied several times (weight "
                "sharing) must be tapped once with its inputs stacked along a position axis"
            )
        self.inputs[name] = layer_input
        self.outputs[name] = jax.ShapeDtypeStruct(jnp.shape(layer_output), layer_output.dtype)
        if self.perturbations is None:
            return layer_output
        return layer_output + self.perturbations[name]


def capture(
    forward: Callable[[Any, Any, Callable[[str, Array, Array], Array]], Array],
    params: Any,
    inputs: Any,
    targets: Any,
    loss_fn: Callable[[Array, Any], Array],
    *,
    fisher: str = "empirical",
    key: Array | None = None,
    layers: Sequence[str] | None = None,
    axis_name: Any = None,
    position_mask: Array | None = None,
) -> tuple[Array, Any, Captures]:
    r"""``(loss, grads, captures)`` of a plain functional model.

    ``forward(params, inputs, tap)`` computes the model's output (logits for ``fisher``
    ``"mc"``/``"exact"``); for every layer to capture it wraps the layer's output ``y`` as
    ``y = tap(path, layer_input, y)``, where ``path`` names the layer's parameters
    (``params[path]`` holds ``kernel`` in Flax layout ``(..., d_in, d_out)`` and optionally
    ``bias``; nested paths with ``/``) and ``layer_input`` is what the kernel multiplies
    (for a convolution, its :func:`conv_patches`). ``tap`` adds a zero perturbation to ``y``,
    whose gradient is the layer's output gradient. Outside capturing pass
    :func:`identity_tap`.

    ``loss_fn(outputs, targets)`` returns the per-example losses ``(B,)``; ``loss`` is their
    mean and ``grads`` its gradient with respect to ``params``. ``fisher`` selects the rows of
    ``captures.fisher`` (:class:`Captures`): ``"empirical"`` (data labels), ``"mc"`` (labels
    sampled from the softmax of the outputs with ``key``, ``curvlinalg.fisher.sample_labels``)
    or ``"exact"`` (``curvlinalg.fisher.softmax_exact_errors``). ``layers`` restricts the
    captured layers (default: all tapped ones).

    ``axis_name``: inside ``shard_map``/``pmap`` over that axis with the batch split evenly,
    ``loss`` and ``grads`` are the whole batch's (``jax.lax.pmean`` of the local means), while
    ``captures`` stay the device's own examples (the transformations combine them). With
    ``fisher="mc"`` every device draws its labels from ``jax.random.fold_in(key, i)``, ``i``
    its index along ``axis_name`` (pass the same ``key`` to every device): the devices' draws
    are independent, and one device on the whole batch computes the same Fisher when given
    the devices' labels.

    Sequence models: the output may be logits ``(B, T, C)`` with per-token losses; the
    per-example loss is then the sum of the sequence's token losses
    (``curvlinalg.fisher``'s convention, ``scale = 1/B``). ``"mc"`` samples a label per
    position; ``"exact"`` gives ``B·T·C`` Fisher rows (``T·C`` backward passes, vectorised:
    memory ``T·C`` times that of one — for small models and tests; use ``"mc"`` at scale).
    ``position_mask``: a boolean ``(B, T)`` mask (``True`` = the position counts; padding,
    ``ignore_index``). Its masked positions get no sampled label and no exact-Fisher rows,
    their rows of every ``(B, T, d)`` capture are zeroed, and ``captures.mask`` carries it to
    the transformations (:class:`Captures`). ``loss_fn`` must ignore those positions itself
    (e.g. ``jnp.sum(mask * token_losses, axis=1)``), and they must not influence the kept
    positions (trailing padding behind a causal mask, or masked attention keys), so that
    the captures agree with ``grads``.

    Works under ``jax.jit`` (``forward``, ``loss_fn``, ``fisher`` and ``layers`` static).
    """
    shapes = _Recorder(None)
    jax.eval_shape(lambda p, x: forward(p, x, shapes), params, inputs)

    def run(params: Any, perturbations: dict[str, Array]) -> tuple[Array, dict[str, Array]]:
        recorder = _Recorder(perturbations)
        outputs = forward(params, inputs, recorder)
        return outputs, recorder.inputs

    return _capture_core(
        run,
        params,
        shapes.outputs,
        loss_fn,
        targets,
        fisher,
        key,
        layers,
        axis_name,
        position_mask,
    )


def capture_linen(
    model: Any,
    params: Any,
    inputs: Any,
    targets: Any,
    loss_fn: Callable[[Array, Any], Array],
    *,
    fisher: str = "empirical",
    key: Array | None = None,
    layers: Sequence[str] | None = None,
    axis_name: Any = None,
    position_mask: Array | None = None,
    variables: Mapping[str, Any] | None = None,
    **apply_kwargs: Any,
) -> tuple[Array, Any, Captures]:
    r"""``(loss, grads, captures)`` of a Flax linen model built from
    :class:`curvlinalg_jax.Dense` / :class:`curvlinalg_jax.Conv` layers.

    Runs ``model.apply({"params": params, **variables}, inputs, **apply_kwargs)`` with zero
    perturbations on those layers' outputs (``Module.perturb``) and their inputs sown
    (``Module.sow``), then backpropagates the per-example losses
    ``loss_fn(outputs, targets)`` ``(B,)``. ``params`` is the ``"params"`` collection;
    ``grads`` has its structure and is the gradient of the mean loss. Captures are keyed by
    the layer's path in ``params`` (``"Dense_0"``, ``"Block_0/Conv_0"``). ``fisher``,
    ``key``, ``layers``, ``axis_name`` and ``position_mask`` as in :func:`capture`.
    ``variables``: other, non-mutated collections (e.g. ``batch_stats`` in evaluation
    mode); ``apply_kwargs`` go to ``model.apply`` (e.g. ``rngs``). Works under ``jax.jit``.
    """
    others = dict(variables or {})
    for reserved in ("params", INPUTS_COLLECTION, PERTURBATIONS_COLLECTION):
        if reserved in others:
            raise ValueError(f"variables must not contain the collection {reserved!r}")

    def apply(params: Any, perturbations: Any | None) -> tuple[Array, Any]:
        collections = {"params": params, **others}
        mutable = [INPUTS_COLLECTION]
        if perturbations is None:
            mutable.append(PERTURBATIONS_COLLECTION)
        else:
            collections[PERTURBATIONS_COLLECTION] = perturbations
        return model.apply(collections, inputs, mutable=mutable, **apply_kwargs)

    _, state = jax.eval_shape(lambda p: apply(p, None), params)
    nested_shapes = state.get(PERTURBATIONS_COLLECTION, {})
    shapes = _by_layer(nested_shapes, "outputs")

    def run(params: Any, perturbations: dict[str, Array]) -> tuple[Array, dict[str, Array]]:
        nested = _nest(perturbations, "outputs", nested_shapes)
        outputs, state = apply(params, nested)
        sown = _by_layer(state.get(INPUTS_COLLECTION, {}), "inputs")
        layer_inputs = {}
        for name, values in sown.items():
            if len(values) != 1:
                raise ValueError(
                    f"layer {name!r} was called {len(values)} times in one forward pass; "
                    "capturing needs each curvlinalg_jax layer to be called once"
                )
            layer_inputs[name] = values[0]
        return outputs, layer_inputs

    return _capture_core(
        run, params, shapes, loss_fn, targets, fisher, key, layers, axis_name, position_mask
    )


def _by_layer(tree: Any, leaf_name: str) -> dict[str, Any]:
    """``{"Block_0/Dense_0": value}`` from ``{"Block_0": {"Dense_0": {leaf_name: value}}}``."""
    result: dict[str, Any] = {}

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, Mapping):
            if leaf_name in node:
                result["/".join(path)] = node[leaf_name]
                return
            for k, v in node.items():
                walk(v, path + (str(k),))

    walk(tree, ())
    return result


def _nest(flat: Mapping[str, Array], leaf_name: str, template: Any) -> Any:
    """Inverse of :func:`_by_layer` for a tree shaped like ``template``."""

    def build(node: Any, path: tuple[str, ...]) -> Any:
        if isinstance(node, Mapping):
            if leaf_name in node:
                return {leaf_name: flat["/".join(path)]}
            return {k: build(v, path + (str(k),)) for k, v in node.items()}
        raise ValueError(f"unexpected perturbation entry at {'/'.join(path)!r}")

    return build(template, ())
