r"""Where a layer's parameters sit in a pytree and how they map to the core's weight matrix.

The core (``curvlinalg``) works on one weight matrix per layer, shape ``(d_out, d_in)``, with a
bias folded in as a last column (the captures' ``a`` then ends in a column of ones). Flax
stores the transpose: a ``Dense`` kernel is ``(d_in, d_out)``, a ``Conv`` kernel
``(*window, C_in, C_out)`` (e.g. ``(kh, kw, C_in, C_out)``), and the bias ``(d_out,)``
separately. This module is the one place where the two layouts meet:

    matrix = [kernel reshaped to (C_in·kh·kw, C_out), transposed | bias as a column]

The flattening of a convolution kernel is channel-major — input channel first, then the
window positions — the order in which ``jax.lax.conv_general_dilated_patches`` lays out the
features of a patch (``capture.conv_patches``), so that ``matrix @ patch`` is the layer's
output at that position.

A kernel with several output axes (``flax.linen.DenseGeneral``, e.g. an attention query
``(d, heads, head_dim)`` or output ``(heads, head_dim, d)``) is read the same way:
``output_axes`` trailing axes are outputs, flattened row-major into ``d_out``; the other axes
are inputs, flattened like a convolution's — the last input axis first, then the others
row-major — into ``d_in``. So one rule serves every kernel: ``(*in_rest, in_last, *out)`` ↦
``(d_out, d_in)`` with columns ordered ``(in_last, *in_rest)``; a layer input ``(..., *in)`` is
flattened the same way (:func:`flatten_inputs`). ``output_axes`` is ``bias.ndim`` for a layer
with a bias and 1 otherwise, unless declared (``layers={path: output_axes}`` in
:func:`find_layers`): a bias-free kernel ``(d, heads, head_dim)`` cannot be told from a 1-D
convolution's by its shape.

A *layer* is a subtree of the parameters holding a leaf ``kernel`` (``ndim ≥ 2``) and
optionally a leaf ``bias``; it is named by its path, the keys joined with ``/``
(``"Dense_0"``, ``"Block_0/Conv_1"``), which is also the key of its captures.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Array = Any

__all__ = [
    "LayerInfo",
    "kernel_to_matrix",
    "matrix_to_kernel",
    "find_layers",
    "flatten_inputs",
    "path_name",
]

KERNEL = "kernel"
BIAS = "bias"


def path_name(key_path: Iterable[Any]) -> str:
    """``"a/b/c"`` for a JAX key path (dict keys, attribute names, sequence indices)."""
    parts = []
    for entry in key_path:
        for attribute in ("key", "name", "idx"):
            if hasattr(entry, attribute):
                parts.append(str(getattr(entry, attribute)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


class LayerInfo(NamedTuple):
    """Static description of one layer: path, kernel shape, whether it has a bias, dtype, and
    how many trailing kernel axes are outputs (``output_axes``; 1 for ``Dense`` and ``Conv``).

    ``d_in`` counts the bias column: ``prod(input axes) + has_bias`` (``C_in·prod(window) +
    has_bias`` for a convolution); ``d_out = prod(output axes)``.
    """

    path: str
    kernel_shape: tuple[int, ...]
    has_bias: bool
    dtype: Any
    output_axes: int = 1

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The kernel's input axes ``kernel_shape[:-output_axes]``."""
        return self.kernel_shape[: -self.output_axes]

    @property
    def output_shape(self) -> tuple[int, ...]:
        """The kernel's output axes ``kernel_shape[-output_axes:]`` (the bias's shape)."""
        return self.kernel_shape[-self.output_axes :]

    @property
    def d_out(self) -> int:
        return math.prod(self.output_shape)

    @property
    def d_in(self) -> int:
        return math.prod(self.input_shape) + int(self.has_bias)


def _check_output_axes(output_axes: Any, kernel_ndim: int, what: str) -> int:
    if isinstance(output_axes, bool) or not isinstance(output_axes, int):
        raise ValueError(f"{what}: output_axes must be an int; got {output_axes!r}")
    if not 1 <= output_axes <= kernel_ndim - 1:
        raise ValueError(
            f"{what}: output_axes={output_axes} must lie in [1, {kernel_ndim - 1}] for a "
            f"kernel with {kernel_ndim} axes (at least one input and one output axis)"
        )
    return output_axes


def flatten_inputs(x: Array, input_axes: int) -> Array:
    r"""A layer input ``(..., *in)`` with ``input_axes`` trailing feature axes flattened to
    ``(..., d_in)`` in the column order of :func:`kernel_to_matrix`: the last axis first, then
    the others row-major (a convolution's channel-major patch order).

    For one input axis (``Dense``, a query projection) it returns ``x``; for an attention
    output projection's input ``(B, T, heads, head_dim)`` it gives ``(B, T, head_dim·heads)``.
    """
    if isinstance(input_axes, bool) or not isinstance(input_axes, int) or input_axes < 1:
        raise ValueError(f"input_axes must be a positive int; got {input_axes!r}")
    if x.ndim < input_axes:
        raise ValueError(f"x of shape {tuple(x.shape)} has fewer than {input_axes} axes")
    if input_axes == 1:
        return x
    moved = jnp.moveaxis(x, -1, x.ndim - input_axes)
    return jnp.reshape(moved, x.shape[: x.ndim - input_axes] + (-1,))


def kernel_to_matrix(
    kernel: Array,
    bias: Array | None = None,
    *,
    leading_axes: int = 0,
    output_axes: int | None = None,
) -> Array:
    r"""The core's weight matrix ``(d_out, d_in)`` of a Flax kernel (and bias).

    ``kernel``: ``(*lead, *in, *out)`` with ``leading_axes`` leading axes (e.g. per-example
    gradients or samples), kept in the result, and ``output_axes`` output axes (default:
    ``bias``'s feature axes, ``bias.ndim − leading_axes``, or 1 without a bias). For a
    ``Dense`` kernel ``(d_in, d_out)`` the result is ``kernelᵀ``; for a convolution kernel
    ``(kh, kw, C_in, C_out)`` it is ``(C_out, C_in·kh·kw)`` flattened channel-major; for a
    ``DenseGeneral`` kernel ``(d, heads, head_dim)`` with ``output_axes=2`` it is
    ``(heads·head_dim, d)``, for ``(heads, head_dim, d)`` it is ``(d, head_dim·heads)`` (the
    last input axis first, see the module docstring). ``bias`` ``(*lead, *out)`` becomes the
    last column. Use the same call on gradients: the map is linear.
    """
    if isinstance(leading_axes, bool) or not isinstance(leading_axes, int):
        raise ValueError(f"leading_axes must be an int; got {leading_axes!r}")
    if not 0 <= leading_axes <= kernel.ndim - 2:
        raise ValueError(
            f"kernel of shape {tuple(kernel.shape)} with leading_axes={leading_axes} leaves no "
            "(..., C_in, C_out) kernel"
        )
    kernel_ndim = kernel.ndim - leading_axes
    if output_axes is None:
        output_axes = 1 if bias is None else max(bias.ndim - leading_axes, 1)
    output_axes = _check_output_axes(output_axes, kernel_ndim, "kernel_to_matrix")
    needed = tuple(kernel.shape[:leading_axes]) + tuple(kernel.shape[kernel.ndim - output_axes :])
    if bias is not None and tuple(bias.shape) != needed:
        raise ValueError(
            f"bias has shape {tuple(bias.shape)} but a kernel {tuple(kernel.shape)} with "
            f"leading_axes={leading_axes}, output_axes={output_axes} needs {needed}"
        )
    return _kernel_to_matrix(kernel, bias, kernel_ndim, output_axes)


def _kernel_to_matrix(
    kernel: Array, bias: Array | None, kernel_ndim: int, output_axes: int = 1
) -> Array:
    lead = kernel.ndim - kernel_ndim
    first_output = kernel.ndim - output_axes
    # (..., *in_rest, in_last, *out) → (..., *out, in_last, *in_rest): outputs row-major, the
    # inputs channel-major (for a convolution, C_in then the window).
    order = (
        tuple(range(lead))
        + tuple(range(first_output, kernel.ndim))
        + (first_output - 1,)
        + tuple(range(lead, first_output - 1))
    )
    moved = jnp.transpose(kernel, order)
    d_out = math.prod(kernel.shape[first_output:])
    matrix = jnp.reshape(moved, kernel.shape[:lead] + (d_out, -1))
    if bias is None:
        return matrix
    column = jnp.reshape(bias, kernel.shape[:lead] + (d_out, 1))
    return jnp.concatenate([matrix, column], axis=-1)


def matrix_to_kernel(
    matrix: Array, kernel_shape: Sequence[int], has_bias: bool, output_axes: int = 1
) -> tuple[Array, Array | None]:
    r"""Inverse of :func:`kernel_to_matrix`: ``(kernel, bias)`` from ``(..., d_out, d_in)``.

    ``kernel_shape``: the Flax kernel's shape ``(*in, *out)`` (without leading axes), whose
    last ``output_axes`` axes are outputs; leading axes of ``matrix`` (e.g. posterior samples)
    are kept. ``bias`` (shape ``(..., *out)``) is ``None`` when ``has_bias`` is false.
    """
    kernel_shape = tuple(int(size) for size in kernel_shape)
    output_axes = _check_output_axes(output_axes, len(kernel_shape), "matrix_to_kernel")
    inputs, outputs = kernel_shape[:-output_axes], kernel_shape[-output_axes:]
    lead = matrix.shape[:-2]
    expected = (math.prod(outputs), math.prod(inputs) + int(has_bias))
    if tuple(matrix.shape[-2:]) != expected:
        raise ValueError(
            f"matrix has shape {tuple(matrix.shape)} but a kernel {kernel_shape} "
            f"{'with' if has_bias else 'without'} bias and {output_axes} output "
            f"axes needs (..., {expected[0]}, {expected[1]})"
        )
    bias = jnp.reshape(matrix[..., -1], lead + outputs) if has_bias else None
    weights = matrix[..., :-1] if has_bias else matrix
    moved = jnp.reshape(weights, lead + outputs + (inputs[-1],) + inputs[:-1])
    n, n_out, n_in = len(lead), len(outputs), len(inputs)
    # (..., *out, in_last, *in_rest) → (..., *in_rest, in_last, *out)
    order = (
        tuple(range(n))
        + tuple(range(n + n_out + 1, n + n_out + n_in))
        + (n + n_out,)
        + tuple(range(n, n + n_out))
    )
    return jnp.transpose(moved, order), bias


def _leaves(tree: Any) -> tuple[dict[str, Array], list[str], Any]:
    """Leaves of ``tree`` by path name, their order, and the tree structure."""
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [path_name(path) for path, _ in with_paths]
    return dict(zip(names, (leaf for _, leaf in with_paths))), names, treedef


def _split(name: str) -> tuple[str, str]:
    head, _, tail = name.rpartition("/")
    return head, tail


def find_layers(
    params: Any, layers: Sequence[str] | Mapping[str, int] | None = None
) -> tuple[LayerInfo, ...]:
    """The layers of ``params``: every subtree with a ``kernel`` leaf of ``ndim ≥ 2``.

    A layer's ``output_axes`` (trailing kernel axes that are outputs) is its bias's ``ndim``
    (``(heads, head_dim)`` for an attention query), or 1 without a bias. ``layers`` restricts
    (and orders) the result to those paths; each must name such a subtree. A mapping
    ``{path: output_axes}`` also declares the output axes, which a bias-free
    ``DenseGeneral`` kernel with several of them needs (``{"attn/query": 2, "attn/out": 1,
    ...}``). Without ``layers`` the layers come in the order of the flattened pytree (sorted
    keys). Raises ``ValueError`` naming a path that is not a layer or a bias that does not fit.
    """
    leaves, names, _ = _leaves(params)
    declared = dict(layers) if isinstance(layers, Mapping) else {}
    found: dict[str, LayerInfo] = {}
    for name in names:
        path, leaf_name = _split(name)
        if leaf_name != KERNEL or jnp.ndim(leaves[name]) < 2:
            continue
        bias = leaves.get(f"{path}/{BIAS}" if path else BIAS)
        kernel = leaves[name]
        shape = tuple(int(size) for size in jnp.shape(kernel))
        if path in declared:
            output_axes = _check_output_axes(declared[path], len(shape), f"layers[{path!r}]")
        else:
            output_axes = 1 if bias is None else min(max(jnp.ndim(bias), 1), len(shape) - 1)
        if bias is not None and tuple(jnp.shape(bias)) != shape[len(shape) - output_axes :]:
            raise ValueError(
                f"layer {path!r}: bias has shape {tuple(jnp.shape(bias))} but the kernel "
                f"{shape} with {output_axes} output axes needs "
                f"{shape[len(shape) - output_axes :]}"
            )
        found[path] = LayerInfo(path, shape, bias is not None, jnp.result_type(kernel), output_axes)
    if layers is None:
        if not found:
            raise ValueError("params has no layer (no subtree with a 'kernel' leaf of ndim ≥ 2)")
        return tuple(found.values())
    if isinstance(layers, str) or len(layers) == 0:
        raise ValueError(
            "layers must be a non-empty sequence of layer paths or a mapping "
            f"{{path: output_axes}}; got {layers!r}"
        )
    missing = [path for path in layers if path not in found]
    if missing:
        raise ValueError(
            f"layers names {missing} that are not layers of params (subtrees with a 'kernel' "
            f"leaf); the layers of params are {sorted(found)}"
        )
    return tuple(found[path] for path in layers)


def layer_matrices(tree: Any, infos: Sequence[LayerInfo], what: str) -> list[Array]:
    """Each layer's ``(d_out, d_in)`` matrix taken from a params-shaped ``tree``."""
    leaves, _, _ = _leaves(tree)
    result = []
    for info in infos:
        prefix = f"{info.path}/" if info.path else ""
        kernel = leaves.get(prefix + KERNEL)
        if kernel is None:
            raise ValueError(f"{what} has no leaf {prefix + KERNEL!r} for layer {info.path!r}")
        if tuple(kernel.shape) != info.kernel_shape:
            raise ValueError(
                f"{what}[{prefix + KERNEL!r}] has shape {tuple(kernel.shape)} but the layer was "
                f"initialised with {info.kernel_shape}"
            )
        bias = leaves.get(prefix + BIAS) if info.has_bias else None
        result.append(_kernel_to_matrix(kernel, bias, len(info.kernel_shape), info.output_axes))
    return result


def replace_layers(tree: Any, infos: Sequence[LayerInfo], matrices: Sequence[Array]) -> Any:
    """``tree`` with each layer's kernel (and bias) replaced by the given matrices."""
    leaves, names, treedef = _leaves(tree)
    for info, matrix in zip(infos, matrices):
        prefix = f"{info.path}/" if info.path else ""
        kernel, bias = matrix_to_kernel(matrix, info.kernel_shape, info.has_bias, info.output_axes)
        leaves[prefix + KERNEL] = kernel.astype(leaves[prefix + KERNEL].dtype)
        if bias is not None:
            leaves[prefix + BIAS] = bias.astype(leaves[prefix + BIAS].dtype)
    return jax.tree_util.tree_unflatten(treedef, [leaves[name] for name in names])
