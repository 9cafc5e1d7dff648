"""curvlinalg_jax transformations equal the NumPy core applied to the same captures.

Each transformation runs jitted for several steps (refresh period 2, so both branches of its
``lax.cond`` schedule are taken) on the captures of a small conv + dense model; a reference
loop calls ``curvlinalg`` on NumPy copies of the same captures and gradients. The jitted
``update`` is traced once for all steps.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
nn = pytest.importorskip("flax.linen")
optax = pytest.importorskip("optax")

import curvlinalg_jax as cj  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from curvlinalg import kron, schedule, wake, woodbury  # noqa: E402

CE = optax.softmax_cross_entropy_with_integer_labels
STEPS = 4
BATCH = 6
LAYERS = ("Conv_0", "Dense_0", "Dense_1")


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = cj.Conv(2, (2, 2), strides=2, param_dtype=jnp.float64)(x)
        x = jnp.tanh(x).reshape(x.shape[0], -1)
        x = jnp.tanh(cj.Dense(5, param_dtype=jnp.float64)(x))
        return cj.Dense(3, use_bias=False, param_dtype=jnp.float64)(x)


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-300))


def to_numpy(layer_captures):
    return {path: tuple(np.asarray(v) for v in pair) for path, pair in layer_captures.items()}


def matrices(tree):
    """The layers' (d_out, d_in) matrices of a params-shaped tree (call under jit)."""
    return {
        path: cj.kernel_to_matrix(tree[path]["kernel"], tree[path].get("bias")) for path in LAYERS
    }


@pytest.fixture(scope="module")
def problem():
    """Params and ``STEPS`` batches: grads, MC and exact captures, gradient matrices."""
    model = Net()
    x0 = jnp.zeros((BATCH, 4, 4, 1), jnp.float64)
    params = jax.jit(model.init)(jax.random.key(0), x0)["params"]

    @jax.jit
    def one(params, key):
        key_x, key_y, key_f = jax.random.split(key, 3)
        x = jax.random.normal(key_x, (BATCH, 4, 4, 1), jnp.float64)
        y = jax.random.randint(key_y, (BATCH,), 0, 3)
        _, grads, mc = cj.capture_linen(model, params, x, y, CE, fisher="mc", key=key_f)
        _, _, exact = cj.capture_linen(model, params, x, y, CE, fisher="exact")
        return grads, mc, exact, matrices(grads)

    batches = [one(params, jax.random.key(10 + k)) for k in range(STEPS)]
    return params, batches


def run(tx, params, batches, which="mc"):
    """Jitted ``update`` over the batches; its outputs as matrices; the number of traces."""
    traces = []

    def update(grads, state, params, captures):
        traces.append(1)  # runs only while tracing
        updates, state = tx.update(grads, state, params, captures=captures)
        return matrices(updates), state

    update = jax.jit(update)
    state = jax.jit(tx.init)(params)
    outputs = []
    for grads, mc, exact, _ in batches:
        updates, state = update(grads, state, params, mc if which == "mc" else exact)
        outputs.append({path: np.asarray(m) for path, m in updates.items()})
    return outputs, len(traces), state


def numpy_batches(batches, which="mc"):
    result = []
    for _, mc, exact, grads in batches:
        captures = mc if which == "mc" else exact
        grads = {path: np.asarray(m) for path, m in grads.items()}
        result.append((grads, to_numpy(captures.loss), to_numpy(captures.fisher)))
    return result


def input_factor(a):
    """``A = Σ_{i,t} a_it a_itᵀ / B``: positions summed, examples averaged (KFC's scale, the
    convention of both adapters)."""
    rows = a.reshape(a.shape[0], -1, a.shape[-1])
    return np.einsum("bti,btj->ij", rows, rows) / a.shape[0]


def output_factor(e, batch=BATCH):
    # The exact Fisher has C rows per example on the same 1/B scale.
    return kron.factor(e) * (e.shape[0] / batch)


def check(outputs, expected, tolerance=1e-9):
    for step, (actual, wanted) in enumerate(zip(outputs, expected)):
        for path in LAYERS:
            error = relative_error(actual[path], wanted[path])
            assert error < tolerance, f"step {step}, layer {path}: relative error {error:.2e}"


def test_foof_matches_core(problem):
    params, batches = problem
    damping, decay, period, window = 0.3, 0.5, 2, 1
    outputs, traces, _ = run(
        cj.foof(damping, decay=decay, period=period, window=window), params, batches
    )
    assert traces == 1
    factors, inverses, expected = {}, {}, []
    for step, (grads, loss, _) in enumerate(numpy_batches(batches)):
        wanted = {}
        for path in LAYERS:
            if schedule.accumulate_due(step, period, window):
                factors[path] = kron.ema(factors.get(path), input_factor(loss[path][0]), decay)
            if schedule.refresh_due(step, period):
                inverses[path] = kron.inverse(factors[path], damping)
            wanted[path] = kron.precondition(grads[path], inverses[path])
        expected.append(wanted)
    check(outputs, expected)


def test_foof_factored_gradient_matches_core(problem):
    params, batches = problem
    outputs, traces, _ = run(cj.foof(0.3, decay=0.0, factored_gradient=True), params, batches)
    assert traces == 1
    expected = []
    for _, loss, _ in numpy_batches(batches):
        wanted = {}
        for path in LAYERS:
            a, e = loss[path]
            wanted[path] = kron.precondition_factored(a, e, kron.inverse(input_factor(a), 0.3))
        expected.append(wanted)
    check(outputs, expected)
    # The same as preconditioning the gradient itself.
    plain, _, _ = run(cj.foof(0.3, decay=0.0), params, batches)
    check(outputs, plain, 1e-10)


@pytest.mark.parametrize(
    "mode, which, period",
    [("factored", "mc", 2), ("exact", "exact", 1)],
    ids=["factored-mc", "exact-exactfisher"],
)
def test_kfac_matches_core(problem, mode, which, period):
    params, batches = problem
    damping, decay = 0.05, 0.7
    outputs, traces, _ = run(
        cj.kfac(damping, decay=decay, period=period, damping_mode=mode), params, batches, which
    )
    assert traces == 1
    a_avg, g_avg, solvers, expected = {}, {}, {}, []
    for step, (grads, loss, fisher_rows) in enumerate(numpy_batches(batches, which)):
        wanted = {}
        for path in LAYERS:
            a_avg[path] = kron.ema(a_avg.get(path), input_factor(loss[path][0]), decay)
            g_avg[path] = kron.ema(g_avg.get(path), output_factor(fisher_rows[path][1]), decay)
            if schedule.refresh_due(step, period):
                if mode == "exact":
                    solvers[path] = (kron.eigh(a_avg[path]), kron.eigh(g_avg[path]))
                else:
                    da, dg = kron.split_damping(a_avg[path], g_avg[path], damping)
                    solvers[path] = (
                        kron.inverse(a_avg[path], da),
                        kron.inverse(g_avg[path], dg),
                    )
            if mode == "exact":
                wanted[path] = kron.eigen_solve(grads[path], *solvers[path], damping)
            else:
                wanted[path] = kron.precondition(grads[path], *solvers[path])
        expected.append(wanted)
    check(outputs, expected, 1e-8)


@pytest.mark.parametrize(
    "which, period, block",
    [("mc", 1, False), ("exact", 2, True)],
    ids=["mc", "exact-period2-blocks"],
)
def test_natural_gradient_matches_core(problem, which, period, block):
    params, batches = problem
    damping = 0.01
    like = batches[0][1] if which == "mc" else batches[0][2]
    tx = cj.natural_gradient(damping, period=period, block_diagonal=block, fisher_like=like)
    outputs, traces, _ = run(tx, params, batches, which)
    assert traces == 1
    expected, fisher = [], None
    for step, (grads, _, fisher_rows) in enumerate(numpy_batches(batches, which)):
        rows = [fisher_rows[path] for path in LAYERS]
        vectors = [grads[path] for path in LAYERS]
        if schedule.refresh_due(step, period):
            # scale 1/B with B the number of examples, also for the exact Fisher's B·C rows
            if block:
                fisher = woodbury.factorize_layers(rows, damping, 1 / BATCH)
            else:
                fisher = woodbury.factorize(rows, damping, 1 / BATCH)
        solved = (
            woodbury.solve_layers(fisher, vectors) if block else woodbury.solve(fisher, vectors)
        )
        expected.append(dict(zip(LAYERS, solved)))
    check(outputs, expected, 1e-8)


def learning_rate(step):
    return 0.2 / (1 + 0.5 * step)  # a varying λ_k = 1/lr_k exercises the λ ratios


@pytest.mark.parametrize("variant", ["so", "q"])
def test_kldwrm_matches_core(problem, variant):
    params, batches = problem
    damping, rho, period = 0.02, 0.6, 2
    tx = cj.kldwrm(learning_rate, damping, decay=rho, variant=variant, period=period)
    outputs, traces, _ = run(tx, params, batches)
    assert traces == 1
    fbar_a, fbar_g, solvers, expected = {}, {}, {}, []
    g_prev, ghat_prev, m_prev = {}, {}, {}
    lam_prev = None
    for step, (grads, loss, fisher_rows) in enumerate(numpy_batches(batches)):
        lam = 1 / learning_rate(step)
        wanted = {}
        for path in LAYERS:
            local_a = input_factor(loss[path][0])
            local_g = output_factor(fisher_rows[path][1])
            fbar_a[path] = wake.average(fbar_a.get(path), local_a, rho)
            fbar_g[path] = wake.average(fbar_g.get(path), local_g, rho)
            g = grads[path]
            if variant == "so":
                if schedule.refresh_due(step, period):
                    solvers[path] = (kron.eigh(fbar_a[path]), kron.eigh(fbar_g[path]))
                modified = wake.so_gradient(g, g_prev.get(path), rho, lam, lam_prev or lam)
                wanted[path] = kron.eigen_solve(modified, *solvers[path], damping)
            else:
                if schedule.refresh_due(step, period):
                    da, dg = kron.split_damping(fbar_a[path], fbar_g[path], damping)
                    solvers[path] = (
                        fbar_a[path] + da * np.eye(len(local_a)),
                        fbar_g[path] + dg * np.eye(len(local_g)),
                        local_a,
                        local_g,
                    )
                ghat = wake.q_gradient(
                    g,
                    ghat_prev.get(path),
                    g_prev.get(path),
                    m_prev.get(path),
                    rho,
                    lam,
                    lam_prev or lam,
                )
                step_s, m_prev[path] = wake.kron_q_step(ghat, *solvers[path], lam)
                ghat_prev[path] = ghat
                wanted[path] = -lam * step_s
            g_prev[path] = g
        lam_prev = lam
        expected.append(wanted)
    check(outputs, expected, 1e-8)


def test_chain_with_sgd_takes_minus_learning_rate_times_direction(problem):
    params, batches = problem
    grads, captures, _, _ = batches[0]
    tx = optax.chain(cj.foof(0.3), optax.sgd(0.1))

    @jax.jit
    def both(grads, params, captures):
        alone = cj.foof(0.3)
        direction, _ = alone.update(grads, alone.init(params), params, captures=captures)
        step, _ = tx.update(grads, tx.init(params), params, captures=captures)
        return direction, step

    direction, step = both(grads, params, captures)
    for a, b in zip(jax.tree.leaves(step), jax.tree.leaves(direction)):
        assert relative_error(a, -0.1 * b) < 1e-12


def test_uncaptured_parameters_pass_through(problem):
    params, batches = problem
    grads, captures, _, _ = batches[0]
    tx = cj.kfac(0.1, layers=["Dense_0"])
    updates, state = tx.update(grads, tx.init(params), params, captures=captures)
    assert set(state.a_factors) == {"Dense_0"}
    for path in ("Conv_0", "Dense_1"):
        for name in grads[path]:
            np.testing.assert_array_equal(updates[path][name], grads[path][name])
    assert relative_error(updates["Dense_0"]["kernel"], grads["Dense_0"]["kernel"]) > 1e-3


def test_errors_name_the_argument(problem):
    params, batches = problem
    grads, captures, _, _ = batches[0]
    with pytest.raises(ValueError, match="damping must be > 0"):
        cj.foof(0.0)
    with pytest.raises(ValueError, match="decay must lie in"):
        cj.kfac(1.0, decay=1.5)
    with pytest.raises(ValueError, match="window"):
        cj.foof(1.0, period=2, window=3)
    with pytest.raises(ValueError, match="damping_mode"):
        cj.kfac(1.0, damping_mode="heuristic")
    with pytest.raises(ValueError, match="variant"):
        cj.kldwrm(0.1, 1.0, variant="qe")
    with pytest.raises(ValueError, match="fisher_like"):
        cj.natural_gradient(1.0, period=3)
    with pytest.raises(ValueError, match="not layers of params"):
        cj.foof(1.0, layers=["Dense_7"]).init(params)
    tx = cj.foof(1.0)
    state = tx.init(params)
    with pytest.raises(ValueError, match="needs the batch's layer captures"):
        tx.update(grads, state, params)
    partial = cj.Captures(
        loss={"Dense_0": captures.loss["Dense_0"]}, fisher={"Dense_0": captures.fisher["Dense_0"]}
    )
    # Named layers must all be captured (without layers=, uncaptured ones pass through).
    tx = cj.foof(1.0, layers=LAYERS)
    with pytest.raises(ValueError, match="no entry for layer 'Conv_0'"):
        tx.update(grads, tx.init(params), params, captures=partial)


@pytest.mark.parametrize(
    "make",
    [lambda: cj.foof(1.0), lambda: cj.kfac(1.0), lambda: cj.kldwrm(0.1, 1.0)],
    ids=["foof", "kfac", "kldwrm"],
)
def test_captures_with_different_batch_sizes_are_refused_at_trace_time(problem, make):
    params, batches = problem
    grads, captures, _, _ = batches[0]
    tx = make()
    state = tx.init(params)
    update = jax.jit(lambda g, s, c: tx.update(g, s, params, captures=c))
    a, e = captures.loss["Dense_0"]
    cases = {
        # e of one example fewer than a, in one pair
        "a has shape": {**captures.loss, "Dense_0": (a, e[:-1])},
        # a layer whose (consistent) pair holds another batch than the other layers
        "other layers": {**captures.loss, "Dense_0": (a[:-1], e[:-1])},
    }
    for message, loss in cases.items():
        with pytest.raises(ValueError, match=f"captures.loss\\['Dense_0'\\].*{message}"):
            update(grads, state, cj.Captures(loss=loss, fisher=loss))
    # Fisher rows that are not B (or B·C) rows of the loss batch's examples.
    fisher = {path: (pair[0][:-1], pair[1][:-1]) for path, pair in captures.fisher.items()}
    with pytest.raises(ValueError, match="not a multiple of the batch size"):
        update(grads, state, cj.Captures(loss=captures.loss, fisher=fisher))
