"""curvlinalg_jax.ekfac against dense references.

The reference builds, per layer, the Fisher ``F = (1/B) Σ_i vec(g_i) vec(g_i)ᵀ`` from
per-example gradients ``g_i`` of ``jax.vmap(jax.grad(own loss))`` (never from the captures),
the eigenbasis ``Q = U_A ⊗ U_G`` (``np.kron``, column-major ``vec``) of the averaged K-FAC
factors, ``S = diag(Qᵀ F Q)`` and the direction ``(Q diag(S̄) Qᵀ + λI)⁻¹ vec(∇W)`` with an
explicit inverse. The model has a convolution (``T = 4`` positions, bias) and two dense
layers.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
nn = pytest.importorskip("flax.linen")
optax = pytest.importorskip("optax")

import curvlinalg_jax as cj  # noqa: E402
import jax.numpy as jnp  # noqa: E402

CE = optax.softmax_cross_entropy_with_integer_labels
BATCH, STEPS = 10, 3  # B ≥ d_in of every layer: no degenerate (null-space) eigenbasis
LAYERS = ("Conv_0", "Dense_0", "Dense_1")


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = cj.Conv(2, (2, 2), strides=2, param_dtype=jnp.float64)(x)
        x = jnp.tanh(x).reshape(x.shape[0], -1)
        x = jnp.tanh(cj.Dense(4, param_dtype=jnp.float64)(x))
        return cj.Dense(3, use_bias=False, param_dtype=jnp.float64)(x)


def vec(m):
    return m.reshape(-1, order="F")


def matrices(tree, leading_axes=0):
    return {
        path: np.asarray(
            cj.kernel_to_matrix(
                tree[path]["kernel"], tree[path].get("bias"), leading_axes=leading_axes
            )
        )
        for path in LAYERS
    }


@pytest.fixture(scope="module")
def problem():
    model = Net()
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))["params"]

    @jax.jit
    def one(key, batch=BATCH):
        key_x, key_y = jax.random.split(key)
        x = jax.random.normal(key_x, (batch, 4, 4, 1), jnp.float64)
        y = jax.random.randint(key_y, (batch,), 0, 3)
        _, grads, captures = cj.capture_linen(model, params, x, y, CE)

        def own_loss(p, xi, yi):
            return CE(model.apply({"params": p}, xi[None]), yi[None])[0]

        per_example = jax.vmap(jax.grad(own_loss), in_axes=(None, 0, 0))(params, x, y)
        return grads, captures, per_example

    return model, params, one


def reference_directions(batches, damping, decay, inverse_every):
    """EK-FAC from per-example gradients; factors from the captures' inputs and errors."""
    a_avg, g_avg, bases, s_avg, result = {}, {}, {}, {}, []
    for step, (grads, captures, per_example) in enumerate(batches):
        wanted = {}
        gradient, examples = matrices(grads), matrices(per_example, leading_axes=1)
        for path in LAYERS:
            a, e = (np.asarray(v) for v in captures.loss[path])
            a3, e3 = a.reshape(BATCH, -1, a.shape[-1]), e.reshape(BATCH, -1, e.shape[-1])
            new_a = np.einsum("bti,btj->ij", a3, a3) / BATCH
            new_g = np.einsum("bti,btj->ij", e3, e3) / (BATCH * e3.shape[1])
            a_avg[path] = new_a if step == 0 else decay * a_avg[path] + (1 - decay) * new_a
            g_avg[path] = new_g if step == 0 else decay * g_avg[path] + (1 - decay) * new_g
            refresh = step % inverse_every == 0
            if refresh:
                u_a, u_g = np.linalg.eigh(a_avg[path])[1], np.linalg.eigh(g_avg[path])[1]
                bases[path] = np.kron(u_a, u_g)
            q = bases[path]
            flat = np.stack([vec(g) for g in examples[path]])  # (B, D)
            fisher = flat.T @ flat / BATCH
            s_batch = np.diag(q.T @ fisher @ q)
            s_avg[path] = s_batch if refresh else decay * s_avg[path] + (1 - decay) * s_batch
            precision = q @ np.diag(s_avg[path]) @ q.T + damping * np.eye(len(q))
            solved = np.linalg.solve(precision, vec(gradient[path]))
            wanted[path] = solved.reshape(gradient[path].shape, order="F")
        result.append(wanted)
    return result


def run(tx, params, batches):
    traces = []

    def update(grads, state, captures):
        traces.append(1)  # runs only while tracing
        updates, state = tx.update(grads, state, params, captures=captures)
        return updates, state

    update = jax.jit(update)
    state = tx.init(params)
    outputs = []
    for grads, captures, _ in batches:
        updates, state = update(grads, state, captures)
        outputs.append(matrices(updates))
    return outputs, len(traces)


def test_ekfac_is_the_dense_corrected_solve_with_per_example_gradients(problem):
    _, params, one = problem
    batches = [one(jax.random.key(10 + k)) for k in range(STEPS)]
    damping, decay = 0.03, 0.5
    # Bases at steps 0 and 2; at step 1 the correction is averaged in the old basis.
    tx = cj.ekfac(damping, decay=decay, inverse_every=2)
    outputs, traces = run(tx, params, batches)
    assert traces == 1  # one trace serves refresh and non-refresh steps
    expected = reference_directions(batches, damping, decay, inverse_every=2)
    for step, (actual, wanted) in enumerate(zip(outputs, expected)):
        for path in LAYERS:
            error = np.linalg.norm(actual[path] - wanted[path]) / np.linalg.norm(wanted[path])
            assert error < 1e-9, f"step {step}, layer {path}: relative error {error:.2e}"


def test_one_example_dense_network_is_exactly_damped_kfac():
    # B = 1, T = 1: the Fisher is exactly A⊗G, S = s_G s_Aᵀ, EK-FAC = damped K-FAC.
    class Mlp(nn.Module):
        @nn.compact
        def __call__(self, x):
            return cj.Dense(3, param_dtype=jnp.float64)(jnp.tanh(cj.Dense(4)(x)))

    model = Mlp()
    x = jax.random.normal(jax.random.key(1), (1, 5), jnp.float64)
    y = jnp.array([2])
    params = jax.jit(model.init)(jax.random.key(0), x)["params"]
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)

    @jax.jit
    def both(params):
        _, grads, captures = cj.capture_linen(model, params, x, y, CE)
        out = []
        for tx in (cj.ekfac(0.1), cj.kfac(0.1, damping_mode="exact")):
            out.append(tx.update(grads, tx.init(params), params, captures=captures)[0])
        return out

    ekfac_step, kfac_step = both(params)
    for actual, expected in zip(jax.tree.leaves(ekfac_step), jax.tree.leaves(kfac_step)):
        np.testing.assert_allclose(actual, expected, rtol=1e-10, atol=1e-13)
    # ... and not for a batch: the correction changes the step.
    assert not np.allclose(np.asarray(ekfac_step["Dense_0"]["kernel"]), 0)


def test_ekfac_errors_name_the_argument(problem):
    _, params, one = problem
    with pytest.raises(ValueError, match="damping must be > 0"):
        cj.ekfac(0.0)
    with pytest.raises(ValueError, match="decay must lie in"):
        cj.ekfac(1.0, decay=2.0)
    with pytest.raises(ValueError, match="inverse_every must be a positive integer"):
        cj.ekfac(1.0, inverse_every=0)
    with pytest.raises(ValueError, match="update_every must be a positive integer"):
        cj.ekfac(1.0, update_every=1.5)
    tx = cj.ekfac(1.0)
    grads, captures, _ = one(jax.random.key(3))
    with pytest.raises(ValueError, match="needs the batch's layer captures"):
        tx.update(grads, tx.init(params), params)
    a, e = captures.loss["Dense_0"]
    bad = {**captures.loss, "Dense_0": (a, e[:-1])}
    with pytest.raises(ValueError, match=r"ekfac: captures.loss\['Dense_0'\]"):
        tx.update(grads, tx.init(params), params, captures=bad)
