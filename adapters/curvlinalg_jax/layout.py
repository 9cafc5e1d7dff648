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

A *layer* is a subtree of the parameters holding a leaf ``kernel`` (``ndim ≥ 2``) and
optionally a leaf ``bias``; it is named by its path, the keys joined with ``/``
(``"Dense_0"``, ``"Block_0/Conv_1"``), which is also the key of its captures.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Array = Any

__all__ = [
    "LayerInfo",
    "kernel_to_matrix",
    "matrix_to_kernel",
    "find_layers",
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
    """Static description of one layer: path, kernel shape, whether it has a bias, dtype.

    ``d_in`` counts the bias column: ``C_in·prod(window) + has_bias``; ``d_out = C_out``.
    """

    path: str
    kernel_shape: tuple[int, ...]
    has_bias: bool
    dtype: Any

    @property
    def d_out(self) -> int:
        return self.kernel_shape[-1]

    @property
    def d_in(self) -> int:
        return math.prod(self.kernel_shape[:-1]) + int(self.has_bias)


def kernel_to_matrix(kernel: Array, bias: Array | None = None, *, leading_axes: int = 0) -> Array:
    r"""The core's weight matrix ``(d_out, d_in)`` of a Flax kernel (and bias).

    ``kernel``: ``(*lead, *window, C_in, C_out)`` with ``leading_axes`` leading axes (e.g.
    per-example gradients or samples), kept in the result. For a ``Dense`` kernel
    ``(d_in, d_out)`` the result is ``kernelᵀ``; for a convolution kernel
    ``(kh, kw, C_in, C_out)`` it is ``(C_out, C_in·kh·kw)`` flattened channel-major.
    ``bias`` ``(*lead, C_out)`` becomes the last column. Use the same call on gradients: the
    map is linear.
    """
    if isinstance(leading_axes, bool) or not isinstance(leading_axes, int):
        raise ValueError(f"leading_axes must be an int; got {leading_axes!r}")
    if not 0 <= leading_axes <= kernel.ndim - 2:
        raise ValueError(
            f"kernel of shape {tuple(kernel.shape)} with leading_axes={leading_axes} leaves no "
            "(..., C_in, C_out) kernel"
        )
    return _kernel_to_matrix(kernel, bias, kernel.ndim - leading_axes)


def _kernel_to_matrix(kernel: Array, bias: Array | None, kernel_ndim: int) -> Array:
    lead = kernel.ndim - kernel_ndim
    # (..., *window, C_in, C_out) → (..., C_out, C_in, *window): channel-major flattening.
    order = (
        tuple(range(lead))
        + (kernel.ndim - 1, kernel.ndim - 2)
        + tuple(range(lead, kernel.ndim - 2))
    )
    moved = jnp.transpose(kernel, order)
    matrix = jnp.reshape(moved, kernel.shape[:lead] + (kernel.shape[-1], -1))
    if bias is None:
        return matrix
    return jnp.concatenate([matrix, bias[..., :, None]], axis=-1)


def matrix_to_kernel(
    matrix: Array, kernel_shape: Sequence[int], has_bias: bool
) -> tuple[Array, Array | None]:
    r"""Inverse of :func:`kernel_to_matrix`: ``(kernel, bias)`` from ``(..., d_out, d_in)``.

    ``kernel_shape``: the Flax kernel's shape ``(*window, C_in, C_out)`` (without leading
    axes); leading axes of ``matrix`` (e.g. posterior samples) are kept. ``bias`` is ``None``
    when ``has_bias`` is false.
    """
    kernel_shape = tuple(int(size) for size in kernel_shape)
    lead = matrix.shape[:-2]
    expected = (kernel_shape[-1], math.prod(kernel_shape[:-1]) + int(has_bias))
    if tuple(matrix.shape[-2:]) != expected:
        raise ValueError(
            f"matrix has shape {tuple(matrix.shape)} but a kernel {kernel_shape} "
            f"{'with' if has_bias else 'without'} bias needs (..., {expected[0]}, {expected[1]})"
        )
    bias = matrix[..., -1] if has_bias else None
    weights = matrix[..., :-1] if has_bias else matrix
    window = kernel_shape[:-2]
    moved = jnp.reshape(weights, lead + (kernel_shape[-1], kernel_shape[-2]) + window)
    n = len(lead)
    # (..., C_out, C_in, *window) → (..., *window, C_in, C_out)
    order = tuple(range(n)) + tuple(range(n + 2, moved.ndim)) + (n + 1, n)
    return jnp.transpose(moved, order), bias


def _leaves(tree: Any) -> tuple[dict[str, Array], list[str], Any]:
    """Leaves of ``tree`` by path name, their order, and the tree structure."""
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [path_name(path) for path, _ in with_paths]
    return dict(zip(names, (leaf for _, leaf in with_paths))), names, treedef


def _split(name: str) -> tuple[str, str]:
    head, _, tail = name.rpartition("/")
    return head, tail


def find_layers(params: Any, layers: Sequence[str] | None = None) -> tuple[LayerInfo, ...]:
    """The layers of ``params``: every subtree with a ``kernel`` leaf of ``ndim ≥ 2``.

    ``layers`` restricts (and orders) the result to those paths; each must name such a
    subtree. Without it the layers come in the order of the flattened pytree (sorted keys).
    Raises ``ValueError`` naming a path that is not a layer.
    """
    leaves, names, _ = _leaves(params)
    found: dict[str, LayerInfo] = {}
    for name in names:
        path, leaf_name = _split(name)
        if leaf_name != KERNEL or jnp.ndim(leaves[name]) < 2:
            continue
        bias = leaves.get(f"{path}/{BIAS}" if path else BIAS)
        if bias is not None and tuple(jnp.shape(bias)) != (jnp.shape(leaves[name])[-1],):
            raise ValueError(
                f"layer {path!r}: bias has shape {tuple(jnp.shape(bias))} but the kernel "
                f"{tuple(jnp.shape(leaves[name]))} needs ({jnp.shape(leaves[name])[-1]},)"
            )
        kernel = leaves[name]
        shape = tuple(int(size) for size in jnp.shape(kernel))
        found[path] = LayerInfo(path, shape, bias is not None, jnp.result_type(kernel))
    if layers is None:
        if not found:
            raise ValueError("params has no layer (no subtree with a 'kernel' leaf of ndim ≥ 2)")
        return tuple(found.values())
    if isinstance(layers, str) or len(layers) == 0:
        raise ValueError(f"layers must be a non-empty sequence of layer paths; got {layers!r}")
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
        result.append(_kernel_to_matrix(kernel, bias, len(info.kernel_shape)))
    return result


def replace_layers(tree: Any, infos: Sequence[LayerInfo], matrices: Sequence[Array]) -> Any:
    """``tree`` with each layer's kernel (and bias) replaced by the given matrices."""
    leaves, names, treedef = _leaves(tree)
    for info, matrix in zip(infos, matrices):
        prefix = f"{info.path}/" if info.path else ""
        kernel, bias = matrix_to_kernel(matrix, info.kernel_shape, info.has_bias)
        leaves[prefix + KERNEL] = kernel.astype(leaves[prefix + KERNEL].dtype)
        if bias is not None:
            leaves[prefix + BIAS] = bias.astype(leaves[prefix + BIAS].dtype)
    return jax.tree_util.tree_unflatten(treedef, [leaves[name] for name in names])
