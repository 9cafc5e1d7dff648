"""curvlinalg_jax Laplace samples: the core's samplers on the same noise, laid out as params."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
nn = pytest.importorskip("flax.linen")
optax = pytest.importorskip("optax")

import curvlinalg_jax as cj  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from curvlinalg import kron, laplace, woodbury  # noqa: E402

CE = optax.softmax_cross_entropy_with_integer_labels
BATCH, SAMPLES, PRIOR, N_DATA = 4, 3, 2.0, 50.0


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(cj.Dense(3, param_dtype=jnp.float64)(x))
        x = nn.LayerNorm(param_dtype=jnp.float64)(x)  # not a captured layer
        return cj.Dense(3, use_bias=False, param_dtype=jnp.float64)(x)


LAYERS = ("Dense_0", "Dense_1")


@pytest.fixture(scope="module")
def problem():
    model = Net()
    x = jax.random.normal(jax.random.key(0), (BATCH, 2), jnp.float64)
    y = jnp.arange(BATCH) % 3
    params = jax.jit(model.init)(jax.random.key(1), x)["params"]
    _, _, captures = jax.jit(lambda p: cj.capture_linen(model, p, x, y, CE, fisher="exact"))(params)
    return params, captures


def noise_matrices(samples, params):
    return {
        path: np.asarray(
            cj.kernel_to_matrix(samples[path]["kernel"], samples[path].get("bias"), leading_axes=1)
            - cj.kernel_to_matrix(params[path]["kernel"], params[path].get("bias"))
        )
        for path in LAYERS
    }


def test_laplace_samples_are_the_core_sampler_around_the_map(problem):
    params, captures = problem
    key = jax.random.key(7)
    samples = jax.jit(
        lambda k, p, c: cj.laplace_samples(
            k, p, c, prior_precision=PRIOR, n_data=N_DATA, num_samples=SAMPLES
        )
    )(key, params, captures)
    # Parameters outside captured layers are repeated unchanged.
    for name in ("scale", "bias"):
        expected = np.broadcast_to(params["LayerNorm_0"][name], (SAMPLES, 3))
        np.testing.assert_array_equal(samples["LayerNorm_0"][name], expected)
    rows = [tuple(np.asarray(v) for v in captures.fisher[p]) for p in LAYERS]
    row_count = rows[0][0].shape[0]
    assert row_count == 3 * BATCH  # exact Fisher: C rows per example
    keys = jax.random.split(key, len(LAYERS) + 1)
    y = [
        np.asarray(jax.random.normal(k, (SAMPLES, e.shape[1], a.shape[1]), jnp.float64))
        for k, (a, e) in zip(keys[1:], rows)
    ]
    z = np.asarray(jax.random.normal(keys[0], (SAMPLES, row_count), jnp.float64))
    expected = laplace.sample(rows, PRIOR, N_DATA * row_count / BATCH, y, z)
    actual = noise_matrices(samples, params)
    for path, wanted in zip(LAYERS, expected):
        np.testing.assert_allclose(actual[path], wanted, rtol=1e-10, atol=1e-12)

    # That rescaled n gives Cov = (τI + (n/B)·G Gᵀ)⁻¹ with the exact Fisher's 1/B scale:
    # the sampler is linear in (y, z), so unit noise vectors give its matrix M, M Mᵀ = Λ⁻¹.
    sizes = [e.shape[1] * a.shape[1] for a, e in rows]
    total = sum(sizes) + row_count
    basis = np.eye(total)
    unit_y = [
        basis[:, start : start + size].reshape(total, e.shape[1], a.shape[1])
        for start, size, (a, e) in zip(np.cumsum([0] + sizes[:-1]), sizes, rows)
    ]
    unit_z = basis[:, sum(sizes) :]
    columns = laplace.sample(rows, PRIOR, N_DATA * row_count / BATCH, unit_y, unit_z)
    sampler = np.concatenate([c.reshape(total, -1) for c in columns], axis=1).T  # (D, D + rows)
    gradients = np.concatenate(
        [g.reshape(row_count, -1) for g in woodbury.per_example(rows)], axis=1
    )  # per-(example, class) rows, row-major flattening as above
    precision = PRIOR * np.eye(sum(sizes)) + N_DATA / BATCH * gradients.T @ gradients
    np.testing.assert_allclose(sampler @ sampler.T, np.linalg.inv(precision), atol=1e-10)


def test_kron_laplace_samples_are_the_core_sampler(problem):
    params, captures = problem
    key = jax.random.key(8)
    samples = cj.kron_laplace_samples(
        key, params, captures, prior_precision=PRIOR, n_data=N_DATA, num_samples=SAMPLES
    )
    keys = jax.random.split(key, len(LAYERS))
    actual = noise_matrices(samples, params)
    for k, path in zip(keys, LAYERS):
        a, e = (np.asarray(v) for v in captures.fisher[path])
        input_factor = kron.factor(np.asarray(captures.loss[path][0]))
        output_factor = kron.factor(e) * 3  # C = 3 rows per example on the 1/B scale
        y = np.asarray(jax.random.normal(k, (SAMPLES, e.shape[1], a.shape[1]), jnp.float64))
        expected = laplace.kron_sample(input_factor, output_factor, PRIOR, N_DATA, y)
        np.testing.assert_allclose(actual[path], expected, rtol=1e-10, atol=1e-12)


def test_kron_laplace_of_a_convolution_sums_positions_on_a():
    # A convolution's (B, T, d) captures: the block is Σ_{i,t} a aᵀ / B ⊗ mean_{i,t} e eᵀ,
    # the K-FAC factors of both adapters (curvlinalg_torch.Laplace's A⊗G too).
    rng = np.random.default_rng(3)
    batch, positions = 3, 4
    a = rng.standard_normal((batch, positions, 5))  # 1 channel · 2×2 window + bias column
    a[..., -1] = 1.0
    e = rng.standard_normal((batch, positions, 2))
    params = {"Conv": {"kernel": jnp.zeros((2, 2, 1, 2)), "bias": jnp.zeros(2)}}
    key = jax.random.key(4)
    samples = jax.jit(
        lambda k, p, c: cj.kron_laplace_samples(
            k, p, c, prior_precision=PRIOR, n_data=N_DATA, num_samples=SAMPLES
        )
    )(key, params, {"Conv": (jnp.asarray(a), jnp.asarray(e))})
    actual = np.asarray(
        cj.kernel_to_matrix(samples["Conv"]["kernel"], samples["Conv"]["bias"], leading_axes=1)
    )
    input_factor = np.einsum("bti,btj->ij", a, a) / batch
    output_factor = np.einsum("bti,btj->ij", e, e) / (batch * positions)
    y = np.asarray(jax.random.normal(jax.random.split(key, 1)[0], (SAMPLES, 2, 5), jnp.float64))
    expected = laplace.kron_sample(input_factor, output_factor, PRIOR, N_DATA, y)
    np.testing.assert_allclose(actual, expected, rtol=1e-10, atol=1e-12)


def test_laplace_argument_errors(problem):
    params, captures = problem
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="prior_precision must be > 0"):
        cj.laplace_samples(key, params, captures, prior_precision=0.0, n_data=1, num_samples=1)
    with pytest.raises(ValueError, match="num_samples"):
        cj.kron_laplace_samples(key, params, captures, prior_precision=1, n_data=1, num_samples=0)
