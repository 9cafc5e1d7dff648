"""Data parallelism: two devices with half batches equal one device with the whole batch.

Runs in a subprocess because the number of host (CPU) devices is fixed when JAX starts
(``XLA_FLAGS=--xla_force_host_platform_device_count=2``) and this process has JAX loaded
already. The script trains FOOF, K-FAC, EK-FAC, the natural gradient and Q-KLD-WRM for three
steps inside ``jax.shard_map`` with ``axis_name="data"`` and compares updates and state with
the single-device run. For the MC Fisher it checks that the devices draw different labels from
one key and that K-FAC on two devices equals one device given the devices' draws. The mesh
has ``Auto`` axes (``jax.make_mesh`` defaults to ``Explicit`` ones in JAX 0.10, under which
``shard_map`` refuses unsharded inputs), as the README shows.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("jax")
pytest.importorskip("flax")
pytest.importorskip("optax")

SCRIPT = textwrap.dedent(
    """
    import time
    import jax, jax.numpy as jnp, numpy as np, optax
    import flax.linen as nn
    from jax.sharding import PartitionSpec as P
    import curvlinalg_jax as cj

    assert jax.device_count() == 2, jax.devices()
    CE = optax.softmax_cross_entropy_with_integer_labels

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = cj.Conv(2, (2, 2), strides=2, param_dtype=jnp.float64)(x)
            x = jnp.tanh(x).reshape(x.shape[0], -1)
            return cj.Dense(3, param_dtype=jnp.float64)(x)

    model = Net()
    B = 8
    x = jax.random.normal(jax.random.key(1), (3, B, 4, 4, 1), jnp.float64)  # 3 steps
    y = jax.random.randint(jax.random.key(2), (3, B), 0, 3)
    params = jax.jit(model.init)(jax.random.key(0), x[0])["params"]
    _, _, whole_exact = jax.jit(
        lambda p, x, y: cj.capture_linen(model, p, x, y, CE, fisher="exact")
    )(params, x[0], y[0])

    def transforms(axis_name):
        return {
            "foof_factored": cj.foof(
                0.3, decay=0.5, period=2, factored_gradient=True, axis_name=axis_name
            ),
            "kfac": cj.kfac(0.05, decay=0.5, axis_name=axis_name),
            "ekfac": cj.ekfac(0.05, decay=0.5, inverse_every=2, axis_name=axis_name),
            "natural_period2": cj.natural_gradient(
                0.01, period=2, fisher_like=whole_exact, axis_name=axis_name
            ),
            "q": cj.kldwrm(0.1, 0.02, variant="q", axis_name=axis_name),
        }

    def train(tx, x, y, params, state, axis_name=None):
        # The exact Fisher is deterministic (an MC draw would differ per device) and checks
        # that gathered B·C rows keep the whole batch's 1/B scale.
        def step(state, batch):
            _, grads, captures = cj.capture_linen(
                model, params, batch[0], batch[1], CE, fisher="exact", axis_name=axis_name
            )
            updates, state = tx.update(grads, state, params, captures=captures)
            return state, updates

        state, updates = jax.lax.scan(step, state, (x, y))
        return updates, state

    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    by_example = jax.sharding.NamedSharding(mesh, P(None, "data"))
    x_sharded, y_sharded = jax.device_put(x, by_example), jax.device_put(y, by_example)
    worst = 0.0
    for name in transforms(None):
        start = time.time()
        single = transforms(None)[name]
        multi = transforms("data")[name]
        expected = jax.jit(lambda x, y, p, s: train(single, x, y, p, s))(
            x, y, params, single.init(params)
        )
        sharded = jax.shard_map(
            lambda x, y, p, s: train(multi, x, y, p, s, "data"),
            mesh=mesh,
            in_specs=(P(None, "data"), P(None, "data"), P(), P()),
            out_specs=P(),
        )
        actual = jax.jit(sharded)(x_sharded, y_sharded, params, multi.init(params))
        for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
            a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
            error = np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-300)
            worst = max(worst, error)
            assert error < 1e-9, (name, error)
        print(name, "ok", round(time.time() - start, 2))

    # MC Fisher: one key for both devices, different draws per device.
    keys = jax.random.split(jax.random.key(5), 3)

    def mc_rows(x, key):
        _, _, captures = cj.capture_linen(
            model, params, x, y[0][: B // 2], CE, fisher="mc", key=key, axis_name="data"
        )
        return captures.fisher["Dense_0"][1]

    same_inputs = jnp.concatenate([x[0][: B // 2]] * 2)  # both devices see the same examples
    rows = jax.jit(
        jax.shard_map(mc_rows, mesh=mesh, in_specs=(P("data"), P()), out_specs=P("data"))
    )(same_inputs, keys[0])
    assert not np.allclose(rows[: B // 2], rows[B // 2 :]), "devices drew the same labels"

    # ... and two devices equal one device given those per-device draws.
    kfac_single, kfac_multi = cj.kfac(0.05, decay=0.5), cj.kfac(0.05, decay=0.5, axis_name="data")

    def mc_train(x, y, keys, state, axis_name=None):
        def step(state, batch):
            x, y, key = batch
            if axis_name is None:  # one device: the devices' halves with their own keys
                _, grads, whole = cj.capture_linen(model, params, x, y, CE)
                halves = [
                    cj.capture_linen(
                        model,
                        params,
                        x[i * B // 2 : (i + 1) * B // 2],
                        y[i * B // 2 : (i + 1) * B // 2],
                        CE,
                        fisher="mc",
                        key=jax.random.fold_in(key, i),
                    )[2].fisher
                    for i in range(2)
                ]
                fisher = jax.tree.map(lambda *h: jnp.concatenate(h), *halves)
                captures = cj.Captures(loss=whole.loss, fisher=fisher)
                tx = kfac_single
            else:
                _, grads, captures = cj.capture_linen(
                    model, params, x, y, CE, fisher="mc", key=key, axis_name=axis_name
                )
                tx = kfac_multi
            updates, state = tx.update(grads, state, params, captures=captures)
            return state, updates

        state, updates = jax.lax.scan(step, state, (x, y, keys))
        return updates, state

    expected = jax.jit(mc_train)(x, y, keys, kfac_single.init(params))
    actual = jax.jit(
        jax.shard_map(
            lambda x, y, k, s: mc_train(x, y, k, s, "data"),
            mesh=mesh,
            in_specs=(P(None, "data"), P(None, "data"), P(), P()),
            out_specs=P(),
        )
    )(x, y, keys, kfac_multi.init(params))  # unsharded inputs: fine on an Auto mesh
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        error = np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-300)
        worst = max(worst, error)
        assert error < 1e-9, ("kfac mc", error)
    print("kfac_mc ok")
    print("worst relative error", worst)
    """
)


def test_two_devices_equal_one_device_on_the_whole_batch(tmp_path):
    script = tmp_path / "two_devices.py"
    script.write_text(SCRIPT)
    env = dict(os.environ)
    env.update(
        # Two host devices; cheaper XLA compilation (the graphs are tiny).
        XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"
        " --xla_llvm_disable_expensive_passes=true",
        JAX_PLATFORMS="cpu",
        JAX_ENABLE_X64="1",
    )
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "worst relative error" in result.stdout
    print(result.stdout)
