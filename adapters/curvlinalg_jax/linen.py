r"""Drop-in Flax linen layers whose inputs and output gradients can be captured.

:class:`Dense` and :class:`Conv` subclass ``flax.linen.Dense`` and ``flax.linen.Conv``: same
fields, same parameters (``kernel`` in Flax layout, ``bias``), same initialisation and the same
output. In a plain ``model.apply`` they behave exactly like the Flax layers. Under
:func:`curvlinalg_jax.capture_linen` they also

* sow their input into the collection ``"curvlinalg_inputs"`` (``Module.sow``) — for a
  convolution its patches ``(B, *out_spatial, C_in·kh·kw)`` (:func:`conv_patches`), computed
  only while that collection is mutable;
* add a zero perturbation from ``"curvlinalg_perturbations"`` to their output
  (``Module.perturb``), whose gradient is the output gradient.

Neither happens during ``model.init``, so the initial variables hold only ``params``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from .capture import INPUTS_COLLECTION, PERTURBATIONS_COLLECTION, conv_patches

Array = Any

__all__ = ["Dense", "Conv"]


def _tap(module: nn.Module, layer_input: Any, output: Array) -> Array:
    if module.is_initializing():
        return output
    if module.is_mutable_collection(INPUTS_COLLECTION):
        module.sow(INPUTS_COLLECTION, "inputs", layer_input())
    return module.perturb("outputs", output, collection=PERTURBATIONS_COLLECTION)


class Dense(nn.Dense):
    """``flax.linen.Dense`` whose input and output gradient :func:`capture_linen` captures.

    Kernel ``(d_in, d_out)``; the core's weight matrix is its transpose ``(d_out, d_in)`` with
    the bias as a last column. Inputs ``(B, d_in)`` give captures ``(B, d_in)``; inputs with
    more axes ``(B, ..., d_in)`` (sequences, images) give ``(B, T, d_in)``, the positions
    summed within an example.
    """

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        return _tap(self, lambda: inputs, super().__call__(inputs))


class Conv(nn.Conv):
    """``flax.linen.Conv`` whose patches and output gradient :func:`capture_linen` captures.

    Kernel ``(*kernel_size, C_in, C_out)``; the core's weight matrix is ``(C_out,
    C_in·prod(kernel_size))`` (channel-major, :func:`curvlinalg_jax.kernel_to_matrix`) with the
    bias as a last column. Inputs must have one batch axis, ``(B, *spatial, C_in)``.
    Supported for capturing: ``strides``, ``kernel_dilation``, padding ``"SAME"``,
    ``"VALID"`` or explicit; not ``feature_group_count > 1``, ``input_dilation``, ``mask``,
    circular/reflect/causal padding (a ``ValueError`` says which).
    """

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        output = super().__call__(inputs)
        kernel_size = (
            (self.kernel_size,) if isinstance(self.kernel_size, int) else tuple(self.kernel_size)
        )

        def patches() -> Array:
            self._check_capturable(inputs, len(kernel_size))
            return conv_patches(
                inputs, kernel_size, self.strides, self.padding, self.kernel_dilation
            )

        return _tap(self, patches, output)

    def _check_capturable(self, inputs: Array, rank: int) -> None:
        unsupported = []
        if self.feature_group_count != 1:
            unsupported.append(f"feature_group_count={self.feature_group_count}")
        dilation = self.input_dilation
        if dilation is not None and any(d != 1 for d in _entries(dilation)):
            unsupported.append(f"input_dilation={dilation}")
        if self.mask is not None:
            unsupported.append("mask")
        if isinstance(self.padding, str) and self.padding.upper() not in ("SAME", "VALID"):
            unsupported.append(f"padding={self.padding!r}")
        if unsupported:
            raise ValueError(
                f"{type(self).__name__} {self.name!r}: capturing does not support "
                + ", ".join(unsupported)
            )
        if inputs.ndim != rank + 2:
            raise ValueError(
                f"{type(self).__name__} {self.name!r}: capturing needs inputs with one batch "
                f"axis (B, *spatial, C_in); got shape {tuple(inputs.shape)}"
            )


def _entries(value: int | Any) -> tuple[int, ...]:
    return (value,) if isinstance(value, int) else tuple(value)
