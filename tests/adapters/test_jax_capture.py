"""curvlinalg_jax captures: per-example gradients, Fisher rows, layouts, errors.

References are brute force: ``jax.vmap(jax.grad(...))`` of each example's own loss for the
per-example gradients, ``jax.jacobian`` of the logits for the exact Fisher.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
nn = pytest.importorskip("flax.linen")
optax = pytest.importorskip("optax")

import curvlinalg_jax as cj  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from curvlinalg import fisher, woodbury  # noqa: E402

CE = optax.softmax_cross_entropy_with_integer_labels
DTYPES = [jnp.float32, jnp.float64]
CONVS = [
    dict(strides=(2, 1), padding="SAME", kernel_dilation=1),
    dict(strides=1, padding="VALID", kernel_dilation=(1, 2)),
]


def tolerance(dtype) -> float:
    return 2e-4 if dtype == jnp.float32 else 1e-10


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-300))


class ConvNet(nn.Module):
    """Conv (with bias) → tanh → Dense (with bias) → tanh → Dense (no bias)."""

    conv: dict
    dtype: object

    @nn.compact
    def __call__(self, x):
        x = cj.Conv(3, (3, 2), param_dtype=self.dtype, **self.conv)(x)
        x = jnp.tanh(x).reshape(x.shape[0], -1)
        x = jnp.tanh(cj.Dense(5, param_dtype=self.dtype)(x))
        return cj.Dense(4, use_bias=False, param_dtype=self.dtype)(x)


def batch(dtype, size=5, seed=0):
    # NumPy draws: eager JAX ops would each be compiled on their own.
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((size, 6, 5, 2)).astype(dtype)
    return x, rng.integers(0, 4, size).astype(np.int32)


def init(model, x, seed):
    # Everything runs jitted: eager JAX compiles every primitive on its own, which is what
    # makes small tests slow.
    return jax.jit(model.init)(jax.random.key(seed), x)["params"]


def per_example_grads(model, params, x, labels):
    """Reference: per-example gradients by ``vmap(grad)`` of each example's own loss."""

    def own_loss(p, xi, yi):
        return CE(model.apply({"params": p}, xi[None]), yi[None])[0]

    return jax.vmap(jax.grad(own_loss), in_axes=(None, 0, 0))(params, x, labels)


def as_matrices(grads):
    """Per-example gradients mapped to the core's (B, d_out, d_in)."""
    return {
        path: cj.kernel_to_matrix(layer["kernel"], layer.get("bias"), leading_axes=1)
        for path, layer in grads.items()
    }


def captured_matrices(layer_captures):
    """Per-example gradients of the captures through the NumPy core."""
    names = sorted(layer_captures)
    pairs = [tuple(np.asarray(v) for v in layer_captures[name]) for name in names]
    return dict(zip(names, woodbury.per_example(pairs)))


@pytest.mark.parametrize(
    "conv, dtype",
    [(CONVS[0], jnp.float32), (CONVS[1], jnp.float64)],
    ids=["strided_same-float32", "dilated_valid-float64"],
)
def test_linen_per_example_gradients_match_vmap_grad(dtype, conv):
    model = ConvNet(conv, dtype)
    x, y = batch(dtype)
    variables = jax.jit(model.init)(jax.random.key(1), x)
    assert set(variables) == {"params"}  # nothing else at init
    params = variables["params"]

    @jax.jit  # one compilation for the captures and both references
    def everything(params):
        captured = cj.capture_linen(model, params, x, y, CE)
        mean = jax.value_and_grad(lambda p: CE(model.apply({"params": p}, x), y).mean())(params)
        return captured, mean, as_matrices(per_example_grads(model, params, x, y))

    (loss, grads, captures), (expected_loss, expected_grads), per_example = everything(params)
    assert relative_error(loss, expected_loss) < tolerance(dtype)
    for actual, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
        assert actual.dtype == dtype
        assert relative_error(actual, expected) < tolerance(dtype)

    a, e = captures.loss["Conv_0"]
    assert a.dtype == e.dtype == dtype
    assert a.ndim == 3 and a.shape[-1] == 2 * 3 * 2 + 1  # C_in·kh·kw + bias column
    assert captures.batch_size == 5
    reference = per_example
    actual = captured_matrices(captures.loss)
    assert set(actual) == {"Conv_0", "Dense_0", "Dense_1"}
    for path in actual:
        assert actual[path].shape == reference[path].shape
        assert relative_error(actual[path], reference[path]) < tolerance(dtype), path


def functional_forward(params, x, tap):
    """A plain function: conv (patches tapped) → tanh → dense, Flax kernel layout."""
    conv = params["conv"]
    patches = cj.conv_patches(x, (3, 2), strides=(2, 1), padding="SAME")
    kernel = cj.kernel_to_matrix(conv["kernel"], conv["bias"])  # (C_out, C_in·kh·kw + 1)
    ones = jnp.ones(patches.shape[:-1] + (1,), x.dtype)
    h = jnp.concatenate([patches, ones], -1) @ kernel.T
    h = jnp.tanh(tap("conv", patches, h)).reshape(x.shape[0], -1)
    dense = params["head"]["dense"]
    return tap("head/dense", h, h @ dense["kernel"] + dense["bias"])


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_functional_per_example_gradients_match_vmap_grad(dtype):
    x, y = batch(dtype, size=4)
    rng = np.random.default_rng(2)
    params = {
        "conv": {
            "kernel": (rng.standard_normal((3, 2, 2, 3)) / 3).astype(dtype),
            "bias": np.full((3,), 0.1, dtype),
        },
        "head": {
            "dense": {
                "kernel": (rng.standard_normal((3 * 3 * 5, 4)) / 7).astype(dtype),
                "bias": np.zeros((4,), dtype),
            }
        },
    }
    loss, grads, captures = jax.jit(lambda p, x, y: cj.capture(functional_forward, p, x, y, CE))(
        params, x, y
    )
    assert set(captures.loss) == {"conv", "head/dense"}

    def own_loss(p, xi, yi):
        return CE(functional_forward(p, xi[None], cj.identity_tap), yi[None])[0]

    per_example = jax.jit(jax.vmap(jax.grad(own_loss), in_axes=(None, 0, 0)))(params, x, y)
    actual = captured_matrices(captures.loss)
    for path, layer in (
        ("conv", per_example["conv"]),
        ("head/dense", per_example["head"]["dense"]),
    ):
        expected = cj.kernel_to_matrix(layer["kernel"], layer["bias"], leading_axes=1)
        assert relative_error(actual[path], expected) < tolerance(dtype), path
    mean = jax.tree.map(lambda g: g.mean(0), per_example)
    for actual_leaf, expected_leaf in zip(jax.tree.leaves(grads), jax.tree.leaves(mean)):
        assert relative_error(actual_leaf, expected_leaf) < tolerance(dtype)


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(cj.Dense(6, param_dtype=jnp.float64)(x))
        return cj.Dense(3, param_dtype=jnp.float64)(x)


def test_mc_fisher_captures_are_gradients_for_sampled_labels():
    model = Mlp()
    x = np.random.default_rng(3).standard_normal((7, 4))
    y = np.zeros((7,), np.int32)
    params = init(model, x, 4)
    key = jax.random.key(5)

    @jax.jit
    def everything(params):
        _, _, captures = cj.capture_linen(model, params, x, y, CE, fisher="mc", key=key)
        logits = model.apply({"params": params}, x)
        # The documented draw: jax.random.uniform(key, (B,)) through curvlinalg.fisher.
        labels = fisher.sample_labels(logits, jax.random.uniform(key, (7,), jnp.float64))
        return captures, logits, labels, as_matrices(per_example_grads(model, params, x, labels))

    captures, logits, labels, per_example = everything(params)
    output_e = captures.fisher["Dense_1"][1]
    assert relative_error(output_e, fisher.softmax_errors(logits, labels)) < 1e-12
    reference = per_example
    actual = captured_matrices(captures.fisher)
    for path in reference:
        assert relative_error(actual[path], reference[path]) < 1e-10
    # The loss captures keep the data labels.
    assert (
        relative_error(captures.loss["Dense_1"][1], fisher.softmax_errors(logits, jnp.asarray(y)))
        < 1e-12
    )


def test_exact_fisher_captures_give_the_per_example_fisher():
    model = Mlp()
    x = np.random.default_rng(6).standard_normal((3, 4))
    y = np.zeros((3,), np.int32)
    params = init(model, x, 7)
    _, _, captures = jax.jit(lambda p, x, y: cj.capture_linen(model, p, x, y, CE, fisher="exact"))(
        params, x, y
    )
    a, e = captures.fisher["Dense_0"]
    assert a.shape == (9, 5) and e.shape == (9, 6)  # B·C rows, bias column
    rows = captured_matrices(captures.fisher)
    flat = np.concatenate([rows[p].reshape(3, 3, -1) for p in sorted(rows)], axis=-1)
    actual = np.einsum("icd,ice->ide", flat, flat)  # Σ_c g_ic g_icᵀ per example

    def logits_of(flat_matrices, xi):
        sizes = [int(np.prod(rows[p].shape[1:])) for p in sorted(rows)]
        pieces = jnp.split(flat_matrices, np.cumsum(sizes)[:-1])
        p = {}
        for path, piece in zip(sorted(rows), pieces):
            kernel, bias = cj.matrix_to_kernel(
                piece.reshape(rows[path].shape[1:]), params[path]["kernel"].shape, True
            )
            p[path] = {"kernel": kernel, "bias": bias}
        return model.apply({"params": p}, xi[None])[0]

    @jax.jit
    def reference(params, x):
        theta = jnp.concatenate(
            [
                cj.kernel_to_matrix(params[p]["kernel"], params[p]["bias"]).reshape(-1)
                for p in sorted(rows)
            ]
        )
        return jax.vmap(
            lambda xi: (jax.jacobian(logits_of)(theta, xi), jax.nn.softmax(logits_of(theta, xi)))
        )(x)

    jacobians, probabilities = reference(params, x)
    for i in range(3):
        jac = np.asarray(jacobians[i])  # (C, D)
        prob = np.asarray(probabilities[i])
        expected = jac.T @ (np.diag(prob) - np.outer(prob, prob)) @ jac
        assert relative_error(actual[i], expected) < 1e-10


@pytest.mark.parametrize(
    "kernel_shape, has_bias", [((3, 2, 4, 5), True), ((2, 3, 6), False)], ids=["conv2d", "conv1d"]
)
def test_kernel_matrix_round_trip(kernel_shape, has_bias):
    kernel = np.random.default_rng(8).standard_normal((2,) + kernel_shape)  # a sample axis
    bias = np.arange(2.0 * kernel_shape[-1]).reshape(2, -1)

    @jax.jit
    def round_trip(kernel, bias):
        matrix = cj.kernel_to_matrix(kernel, bias if has_bias else None, leading_axes=1)
        return matrix, cj.matrix_to_kernel(matrix, kernel_shape, has_bias)

    matrix, (back_kernel, back_bias) = round_trip(kernel, bias)
    d_in = int(np.prod(kernel_shape[:-1])) + has_bias
    assert matrix.shape == (2, kernel_shape[-1], d_in)
    np.testing.assert_array_equal(back_kernel, kernel)
    if has_bias:
        np.testing.assert_array_equal(back_bias, bias)
    else:
        assert back_bias is None


def test_dense_kernel_maps_to_its_transpose():
    kernel = jnp.arange(6.0).reshape(2, 3)  # Flax (d_in, d_out)
    np.testing.assert_array_equal(
        cj.kernel_to_matrix(kernel, jnp.ones(3)), [[0, 3, 1], [1, 4, 1], [2, 5, 1]]
    )


def test_conv_patches_times_matrix_is_the_flax_convolution():
    x = np.random.default_rng(9).standard_normal((2, 7, 6, 3))
    layer = nn.Conv(4, (3, 2), strides=(2, 1), padding=((1, 0), (2, 1)), kernel_dilation=(1, 2))
    params = init(layer, x, 10)

    def both(params, x):
        patches = cj.conv_patches(x, (3, 2), (2, 1), ((1, 0), (2, 1)), (1, 2))
        matrix = cj.kernel_to_matrix(params["kernel"])
        return patches @ matrix.T + params["bias"], layer.apply({"params": params}, x)

    actual, expected = jax.jit(both)(params, x)
    assert relative_error(actual, expected) < 1e-12


def test_capture_errors_name_the_problem():
    model = Mlp()
    x = np.ones((2, 4))
    y = np.zeros((2,), np.int32)
    params = init(model, x, 0)

    def traced(function, *args, **kwargs):
        # Errors are raised while tracing: nothing is compiled or run.
        return jax.jit(lambda p: function(*args[:1], p, *args[1:], **kwargs))(params)

    with pytest.raises(ValueError, match="per-example losses"):
        traced(cj.capture_linen, model, x, y, lambda out, t: CE(out, t).mean())
    with pytest.raises(ValueError, match="needs key"):
        traced(cj.capture_linen, model, x, y, CE, fisher="mc")
    with pytest.raises(ValueError, match="fisher must be one of"):
        traced(cj.capture_linen, model, x, y, CE, fisher="full")

    def forward(p, x, tap):
        return tap("nope", x, x @ p["Dense_0"]["kernel"])

    with pytest.raises(ValueError, match="not layers of params"):
        traced(cj.capture, forward, x, y, CE)

    class Shared(nn.Module):
        @nn.compact
        def __call__(self, x):
            layer = cj.Dense(4, param_dtype=jnp.float64)
            return layer(jnp.tanh(layer(x)))

    shared = Shared()
    shared_params = init(shared, x, 0)
    with pytest.raises(ValueError, match="called 2 times"):
        jax.jit(lambda p: cj.capture_linen(shared, p, x, y, CE))(shared_params)

    grouped = nn.Sequential([cj.Conv(2, (1, 1), feature_group_count=2), lambda h: h.reshape(2, -1)])
    image = np.ones((2, 3, 3, 2), np.float32)
    grouped_params = init(grouped, image, 0)
    with pytest.raises(ValueError, match="feature_group_count=2"):
        jax.jit(lambda p: cj.capture_linen(grouped, p, image, y, CE))(grouped_params)
