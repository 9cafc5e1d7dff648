r"""Drop-in Flax linen layers whose inputs and output gradients can be captured.

:class:`Dense`, :class:`DenseGeneral` and :class:`Conv` subclass ``flax.linen.Dense``,
``flax.linen.DenseGeneral`` and ``flax.linen.Conv``: same fields, same parameters (``kernel``
in Flax layout, ``bias``), same initialisation and the same output.
:class:`MultiHeadDotProductAttention` subclasses ``flax.linen.MultiHeadDotProductAttention``
with its query/key/value/out projections made of :class:`DenseGeneral`: the same parameters
(so a checkpoint of either loads into the other) and the same output. In a plain
``model.apply`` they behave exactly like the Flax layers. Under
:func:`curvlinalg_jax.capture_linen` they also

* sow their input into the collection ``"curvlinalg_inputs"`` (``Module.sow``) — for a
  convolution its patches ``(B, *out_spatial, C_in·kh·kw)`` (:func:`conv_patches`), computed
  only while that collection is mutable;
* add a zero perturbation from ``"curvlinalg_perturbations"`` to their output
  (``Module.perturb``), whose gradient is the output gradient.

Neither happens during ``model.init``, so the initial variables hold only ``params``.
"""

from __future__ import annotations

import inspect
from typing import Any

import flax.linen as nn

from .capture import INPUTS_COLLECTION, PERTURBATIONS_COLLECTION, conv_patches

Array = Any

__all__ = ["Dense", "DenseGeneral", "Conv", "MultiHeadDotProductAttention"]


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


class DenseGeneral(nn.DenseGeneral):
    """``flax.linen.DenseGeneral`` whose input and output gradient :func:`capture_linen`
    captures.

    Kernel ``(*in, *features)`` (an attention query ``(d, heads, head_dim)``, an output
    projection ``(heads, head_dim, d)``), bias ``features``; the core's weight matrix is
    ``(prod(features), prod(in))`` (:func:`curvlinalg_jax.kernel_to_matrix`, the last input
    axis first) with the bias as a last column. ``axis`` must be the trailing axes of the
    input, in order (``-1`` or ``(-2, -1)``), and ``batch_dims`` empty; inputs
    ``(B, ..., *in)`` give captures ``(B, T, d_in)`` over the positions ``...``.

    Without a bias, a kernel with several feature axes cannot be told from a 1-D convolution's
    by its shape: declare its feature axes to the capture and the transformations,
    ``layers={path: len(features), ...}`` (with a bias they are the bias's axes).
    """

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        output = super().__call__(inputs)
        axes = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
        trailing = tuple(range(inputs.ndim - len(axes), inputs.ndim))
        if not self.is_initializing():
            if tuple(axis % inputs.ndim for axis in axes) != trailing:
                raise ValueError(
                    f"DenseGeneral {self.name!r}: capturing needs axis to be the trailing input "
                    f"axes in order ({trailing} or negative); got axis={self.axis!r} for inputs "
                    f"of shape {tuple(inputs.shape)}"
                )
            if tuple(self.batch_dims):
                raise ValueError(
                    f"DenseGeneral {self.name!r}: capturing does not support "
                    f"batch_dims={self.batch_dims!r} (one kernel per batch entry)"
                )
            if inputs.ndim == len(axes):
                raise ValueError(
                    f"DenseGeneral {self.name!r}: capturing needs a batch axis before the "
                    f"contracted axes; got inputs of shape {tuple(inputs.shape)}"
                )
        return _tap(self, lambda: inputs, output)


class MultiHeadDotProductAttention(nn.MultiHeadDotProductAttention):
    r"""``flax.linen.MultiHeadDotProductAttention`` with captured projections.

    The same fields, parameters and output as Flax's: projections ``query``, ``key``,
    ``value`` (kernels ``(d, heads, head_dim)``, biases ``(heads, head_dim)``) and ``out``
    (kernel ``(heads, head_dim, d_out)``), each a :class:`DenseGeneral` whose input and output
    gradient :func:`capture_linen` captures (paths ``".../query"`` etc.); with
    ``use_bias=False`` declare them as ``layers={".../query": 2, ".../key": 2,
    ".../value": 2, ".../out": 1, ...}``. The attention itself (``attention_fn``, ``mask``,
    dropout, ``normalize_qk``) is Flax's. The per-position captures follow the
    K-FAC-expand convention: a projection is a dense layer applied at every position, and
    its input factor sums the positions, ``A = Σ_{i,t} a_it a_itᵀ / B``.

    Not supported: ``decode=True`` (the autoregressive cache; decode with
    ``flax.linen.MultiHeadDotProductAttention`` and the same parameters) and the deprecated
    ``*_dot_general*`` and ``*_einsum_cls`` fields. ``sow_weights`` is accepted.
    """

    @nn.compact
    def __call__(
        self,
        inputs_q: Array,
        inputs_k: Array | None = None,
        inputs_v: Array | None = None,
        *,
        inputs_kv: Array | None = None,
        mask: Array | None = None,
        deterministic: bool | None = None,
        dropout_rng: Any = None,
        sow_weights: bool = False,
    ) -> Array:
        unsupported = [
            name
            for name in (
                "qkv_dot_general",
                "out_dot_general",
                "qkv_dot_general_cls",
                "out_dot_general_cls",
                "qk_attn_weights_einsum_cls",
                "attn_weights_value_einsum_cls",
            )
            if getattr(self, name) is not None
        ]
        if self.decode:
            unsupported.insert(0, "decode=True")
        if unsupported:
            raise ValueError(
                f"{type(self).__name__} {self.name!r} does not support "
                + ", ".join(unsupported)
                + " (use flax.linen.MultiHeadDotProductAttention with the same parameters)"
            )
        if inputs_kv is not None:
            if inputs_k is not None or inputs_v is not None:
                raise ValueError("pass either inputs_kv or inputs_k/inputs_v, not both")
            inputs_k = inputs_v = inputs_kv
        if inputs_k is None:
            if inputs_v is not None:
                raise ValueError("inputs_k cannot be None if inputs_v is not None")
            inputs_k = inputs_q
        if inputs_v is None:
            inputs_v = inputs_k
        features = self.out_features or inputs_q.shape[-1]
        qkv_features = self.qkv_features or inputs_q.shape[-1]
        if qkv_features % self.num_heads:
            raise ValueError(
                f"qkv_features={qkv_features} must be divisible by num_heads={self.num_heads}"
            )
        head_dim = qkv_features // self.num_heads

        def dense(name: str) -> DenseGeneral:
            return DenseGeneral(
                features=(self.num_heads, head_dim),
                axis=-1,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=self.kernel_init,
                bias_init=self.bias_init,
                use_bias=self.use_bias,
                precision=self.precision,
                name=name,
            )

        query = dense("query")(inputs_q)
        key = dense("key")(inputs_k)
        value = dense("value")(inputs_v)
        if self.normalize_qk:
            query = nn.LayerNorm(
                name="query_ln", use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype
            )(query)
            key = nn.LayerNorm(
                name="key_ln", use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype
            )(key)
        if self.dropout_rate > 0.0:
            deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
            if not deterministic and dropout_rng is None:
                dropout_rng = self.make_rng("dropout")
        else:
            deterministic = True
        kwargs = dict(
            mask=mask,
            dropout_rng=dropout_rng,
            dropout_rate=self.dropout_rate,
            broadcast_dropout=self.broadcast_dropout,
            deterministic=deterministic,
            dtype=self.dtype,
            precision=self.precision,
            force_fp32_for_softmax=self.force_fp32_for_softmax,
        )
        accepted = inspect.signature(self.attention_fn).parameters
        kwargs = {name: value for name, value in kwargs.items() if name in accepted}
        if sow_weights:
            kwargs["module"] = self
        x = self.attention_fn(query, key, value, **kwargs)
        return DenseGeneral(
            features=features,
            axis=(-2, -1),
            kernel_init=self.out_kernel_init or self.kernel_init,
            bias_init=self.out_bias_init or self.bias_init,
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            name="out",
        )(x)


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
