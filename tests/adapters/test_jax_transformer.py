"""curvlinalg_jax on a small Flax transformer: multi-axis projections, (B, T, d) captures,
pass-through of LayerNorm/embedding parameters, bf16 parameters with float32 factors, the
failure rule.

References are independent: per-example gradients from ``jax.vmap(jax.grad)`` of one
sequence's summed token losses, and a K-FAC step computed in NumPy float64 with an explicit
``np.kron`` Fisher block and ``np.linalg.solve``. Tolerances: float64 model 1e-9 (rounding
of a few hundred flops); bf16 parameters 5e-2 against the float32 model (all updates
together) (bf16 has an 8-bit
mantissa: its activations carry relative errors ~4e-3 that the damped solve amplifies).
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
nn = pytest.importorskip("flax.linen")
optax = pytest.importorskip("optax")

import curvlinalg_jax as cj  # noqa: E402
import jax.numpy as jnp  # noqa: E402

B, T, D, V, HEADS = 3, 5, 6, 7, 2
DAMPING = 0.1
CE = optax.softmax_cross_entropy_with_integer_labels
ATTENTION = ("Block/attention/query", "Block/attention/key", "Block/attention/value")
CAPTURED = ATTENTION + ("Block/attention/out", "Block/Dense_0", "Block/Dense_1", "head")


class Block(nn.Module):
    dtype: jnp.dtype = jnp.float64

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.dtype)
        h = nn.LayerNorm(**kw)(x)
        causal = nn.make_causal_mask(jnp.ones(x.shape[:2]))
        x = x + cj.MultiHeadDotProductAttention(HEADS, qkv_features=4, name="attention", **kw)(
            h, mask=causal
        )
        h = nn.LayerNorm(**kw)(x)
        return x + cj.Dense(D, **kw)(jnp.tanh(cj.Dense(8, **kw)(h)))


class Lm(nn.Module):
    dtype: jnp.dtype = jnp.float64

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(V, D, dtype=self.dtype, param_dtype=self.dtype)(tokens)
        x = Block(self.dtype, name="Block")(x)
        return cj.Dense(V, dtype=self.dtype, param_dtype=self.dtype, name="head")(x)


def token_losses(logits, labels):
    """Per-sequence losses ``(B,)``: the sum of the token cross-entropies."""
    return jnp.sum(CE(logits, labels), axis=-1)


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-300))


def lookup(tree, path):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def layer_infos(params):
    return {info.path: info for info in cj.layout.find_layers(params)}


def as_matrix(tree, info, leading_axes=0):
    node = lookup(tree, info.path)
    return cj.kernel_to_matrix(
        node["kernel"], node.get("bias"), leading_axes=leading_axes, output_axes=info.output_axes
    )


@pytest.fixture(scope="module")
def problem():
    model = Lm()
    key_x, key_y = jax.random.split(jax.random.key(3))
    tokens = jax.random.randint(key_x, (B, T), 0, V)
    labels = jax.random.randint(key_y, (B, T), 0, V)
    params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
    loss, grads, captures = jax.jit(lambda p, x, y: cj.capture_linen(model, p, x, y, token_losses))(
        params, tokens, labels
    )
    return model, params, tokens, labels, loss, grads, captures


# --------------------------------------------------------------------------------------
# Layout of multi-axis kernels
# --------------------------------------------------------------------------------------


def test_multi_axis_kernel_matrix_reproduces_dense_general():
    """``matrix @ flatten_inputs(x)`` (+ bias) is a ``DenseGeneral``'s output
    ``tensordot(x, kernel, n_in) + bias``, flattened; the inverse map gives back kernel and
    bias. NumPy float64 references."""
    rng = np.random.default_rng(0)
    for kernel_shape, output_axes in [((4, 2, 3), 2), ((2, 3, 4), 1), ((3, 2, 2, 5), 2)]:
        n_in = len(kernel_shape) - output_axes
        kernel = rng.standard_normal(kernel_shape)
        bias = rng.standard_normal(kernel_shape[n_in:])
        x = rng.standard_normal((2, 3) + kernel_shape[:n_in])
        expected = (np.tensordot(x, kernel, n_in) + bias).reshape(2, 3, -1)
        matrix = cj.kernel_to_matrix(jnp.asarray(kernel), jnp.asarray(bias))  # axes of the bias
        flat = cj.layout.flatten_inputs(jnp.asarray(x), n_in)
        actual = np.asarray(flat) @ np.asarray(matrix[:, :-1]).T + np.asarray(matrix[:, -1])
        assert relative_error(actual, expected) < 1e-12, kernel_shape
        back_kernel, back_bias = cj.matrix_to_kernel(matrix, kernel_shape, True, output_axes)
        np.testing.assert_array_equal(back_kernel, kernel)
        np.testing.assert_array_equal(back_bias, bias)
        without = cj.kernel_to_matrix(jnp.asarray(kernel), output_axes=output_axes)
        np.testing.assert_array_equal(without, matrix[:, :-1])
    with pytest.raises(ValueError, match=r"output_axes=3 must lie in \[1, 2\]"):
        cj.kernel_to_matrix(jnp.ones((2, 3, 4)), output_axes=3)


def test_layers_read_their_output_axes_from_the_bias(problem):
    _, params, *_ = problem
    infos = layer_infos(params)
    assert set(infos) == set(CAPTURED)  # LayerNorm and Embed hold no kernel
    for path in ATTENTION:
        assert infos[path].output_axes == 2
        assert (infos[path].d_out, infos[path].d_in) == (4, D + 1)
    out = infos["Block/attention/out"]
    assert (out.output_axes, out.d_out, out.d_in) == (1, D, 4 + 1)


def test_bias_free_projections_need_declared_output_axes():
    model = cj.MultiHeadDotProductAttention(HEADS, qkv_features=4, use_bias=False)
    x = jax.random.normal(jax.random.key(0), (2, 3, D))
    params = model.init(jax.random.key(1), x)["params"]

    def loss_fn(y, _):
        return jnp.sum(y**2, axis=(1, 2))

    with pytest.raises(ValueError, match=r"declare them: layers=\{'key': 2"):
        jax.eval_shape(lambda p: cj.capture_linen(model, p, x, None, loss_fn), params)
    declared = {"query": 2, "key": 2, "value": 2, "out": 1}
    tx = cj.foof(DAMPING, layers=declared)

    @jax.jit
    def step(params):
        _, grads, captures = cj.capture_linen(model, params, x, None, loss_fn, layers=declared)
        return grads, tx.update(grads, tx.init(params), params, captures=captures)[0]

    grads, updates = step(params)
    assert updates["query"]["kernel"].shape == (D, HEADS, 2)
    for path in ("query", "out"):
        assert relative_error(updates[path]["kernel"], grads[path]["kernel"]) > 1e-3


def test_capture_refuses_what_it_cannot_capture():
    x = jnp.ones((2, 3, 4))
    layer = cj.DenseGeneral(5, axis=1)
    params = layer.init(jax.random.key(0), x)["params"]
    with pytest.raises(ValueError, match="axis to be the trailing input axes"):
        jax.eval_shape(
            lambda p: cj.capture_linen(layer, p, x, None, lambda y, _: jnp.sum(y, axis=(1, 2))),
            params,
        )
    attention = cj.MultiHeadDotProductAttention(HEADS, decode=True)
    with pytest.raises(ValueError, match="decode=True"):
        attention.init(jax.random.key(0), jnp.ones((2, 3, 4)))


# --------------------------------------------------------------------------------------
# Captures against vmap(grad)
# --------------------------------------------------------------------------------------


def test_captured_per_example_gradients_match_vmap_grad(problem):
    """``g_i = Σ_t e_itᵀ a_it`` of every projection equals the gradient of sequence ``i``'s
    summed token losses (``vmap(grad)``); the returned grads are their mean."""
    model, params, tokens, labels, loss, grads, captures = problem

    def one(p, x, y):
        return token_losses(model.apply({"params": p}, x[None]), y[None])[0]

    per_example = jax.jit(jax.vmap(jax.grad(one), in_axes=(None, 0, 0)))(params, tokens, labels)
    expected_loss = jnp.mean(token_losses(model.apply({"params": params}, tokens), labels))
    assert relative_error(loss, expected_loss) < 1e-12
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(per_example)):
        # (the key bias's gradient is zero up to rounding: softmax ignores a shift)
        np.testing.assert_allclose(a, jnp.mean(b, axis=0), rtol=1e-10, atol=1e-14)
    for path, info in layer_infos(params).items():
        a, e = captures.loss[path]
        assert a.shape == (B, T, info.d_in) and e.shape == (B, T, info.d_out)
        captured = np.einsum("bto,bti->boi", e, a)
        expected = as_matrix(per_example, info, leading_axes=1)
        np.testing.assert_allclose(captured, expected, rtol=1e-10, atol=1e-14, err_msg=path)


# --------------------------------------------------------------------------------------
# K-FAC step against a dense reference; optax chains; jit
# --------------------------------------------------------------------------------------


def dense_kfac_direction(a, e, gradient, damping):
    """``mat((A⊗G + λI)⁻¹ vec ∇W)`` with ``A = Σ_{i,t} a aᵀ / B`` (K-FAC-expand: positions
    summed) and ``G = Σ_{i,t} e eᵀ / (B·T)``, in NumPy float64 with an explicit Kronecker
    product (column-major vec: ``(A⊗G) vec(V) = vec(G V A)``)."""
    a, e, gradient = (np.asarray(v, np.float64) for v in (a, e, gradient))
    factor_a = np.einsum("bti,btj->ij", a, a) / a.shape[0]
    factor_g = np.einsum("bti,btj->ij", e, e) / (e.shape[0] * e.shape[1])
    fisher = np.kron(factor_a, factor_g) + damping * np.eye(a.shape[-1] * e.shape[-1])
    solved = np.linalg.solve(fisher, gradient.ravel(order="F"))
    return solved.reshape(gradient.shape, order="F")


def test_kfac_step_matches_dense_reference(problem):
    _, params, _, _, _, grads, captures = problem
    tx = cj.kfac(DAMPING, damping_mode="exact")
    updates, state = jax.jit(lambda g, c: tx.update(g, tx.init(params), params, captures=c))(
        grads, captures
    )
    for path, info in layer_infos(params).items():
        a, e = captures.loss[path]
        expected = dense_kfac_direction(a, e, as_matrix(grads, info), DAMPING)
        assert relative_error(as_matrix(updates, info), expected) < 1e-9, path
        assert int(state.count) == 1
    # Parameters outside captured layers (LayerNorm, Embed) come out unchanged.
    for name in ("Embed_0", "Block/LayerNorm_0", "Block/LayerNorm_1"):
        unchanged = zip(
            jax.tree.leaves(lookup(updates, name)), jax.tree.leaves(lookup(grads, name))
        )
        for a, b in unchanged:
            np.testing.assert_array_equal(a, b)


def is_captured(path: str) -> bool:
    return any(path.startswith(layer + "/") for layer in CAPTURED)


def labels_of(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "kfac" if is_captured(cj.layout.path_name(path)) else "adam", params
    )


def test_chain_and_multi_transform_pass_other_parameters_to_adamw(problem):
    """``chain(kfac, adamw)``: adamw sees the K-FAC directions of captured layers and the raw
    gradients of the rest; ``multi_transform``: K-FAC + SGD on the projections, AdamW on the
    LayerNorm and embedding parameters. Both equal the transformations applied separately."""
    _, params, _, _, _, grads, captures = problem
    adamw = optax.adamw(1e-2, weight_decay=0.1)
    chained = optax.chain(cj.kfac(DAMPING), adamw)
    split = optax.multi_transform(
        {"kfac": optax.chain(cj.kfac(DAMPING), optax.sgd(0.5)), "adam": adamw},
        labels_of(params),
    )

    @jax.jit
    def steps(grads, captures):
        alone = cj.kfac(DAMPING)
        direction, _ = alone.update(grads, alone.init(params), params, captures=captures)
        after_adamw, _ = adamw.update(direction, adamw.init(params), params)
        chain_updates, _ = chained.update(grads, chained.init(params), params, captures=captures)
        split_updates, _ = split.update(grads, split.init(params), params, captures=captures)
        return direction, after_adamw, chain_updates, split_updates

    direction, after_adamw, chain_updates, split_updates = steps(grads, captures)
    adam_only, _ = adamw.update(grads, adamw.init(params), params)
    flat = jax.tree_util.tree_flatten_with_path
    for (path, chain_leaf), expected, split_leaf, raw, adam_leaf, kfac_leaf in zip(
        flat(chain_updates)[0],
        jax.tree.leaves(after_adamw),
        jax.tree.leaves(split_updates),
        jax.tree.leaves(grads),
        jax.tree.leaves(adam_only),
        jax.tree.leaves(direction),
    ):
        name = cj.layout.path_name(path)
        assert relative_error(chain_leaf, expected) < 1e-12, name
        if is_captured(name):
            assert relative_error(split_leaf, -0.5 * kfac_leaf) < 1e-12, name
            assert relative_error(kfac_leaf, raw) > 1e-3, name
        else:
            np.testing.assert_array_equal(kfac_leaf, raw)
            assert relative_error(split_leaf, adam_leaf) < 1e-12, name


def test_training_step_traces_once(problem):
    model, params, tokens, labels, *_ = problem
    tx = optax.chain(cj.kfac(DAMPING, period=2), optax.adamw(1e-2))
    traces = []

    @jax.jit
    def step(params, state):
        traces.append(1)  # runs only while tracing
        loss, grads, captures = cj.capture_linen(model, params, tokens, labels, token_losses)
        updates, state = tx.update(grads, state, params, captures=captures)
        return optax.apply_updates(params, updates), state, loss

    state = tx.init(params)
    losses = []
    for _ in range(3):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert len(traces) == 1
    assert int(state[0].count) == 3
    assert np.all(np.isfinite(losses))


# --------------------------------------------------------------------------------------
# Mixed precision
# --------------------------------------------------------------------------------------


def test_bf16_parameters_keep_float32_factors_under_jit(problem):
    _, params64, tokens, labels, *_ = problem
    results = {}
    for dtype in (jnp.bfloat16, jnp.float32):
        model = Lm(dtype)
        params = jax.tree.map(lambda p, dtype=dtype: p.astype(dtype), params64)
        tx = cj.kfac(DAMPING)

        @jax.jit
        def step(params, model=model, tx=tx):
            _, grads, captures = cj.capture_linen(model, params, tokens, labels, token_losses)
            return tx.update(grads, tx.init(params), params, captures=captures)

        results[dtype] = step(params)
    updates, state = results[jnp.bfloat16]
    reference, _ = results[jnp.float32]
    for path in CAPTURED:
        assert state.a_factors[path].dtype == jnp.float32
        assert state.g_preconditioners[path].dtype == jnp.float32
    for leaf in jax.tree.leaves(updates):
        assert leaf.dtype == jnp.bfloat16
    flat = [
        jnp.concatenate([x.ravel().astype(jnp.float32) for x in jax.tree.leaves(t)])
        for t in (updates, reference)
    ]
    assert relative_error(*flat) < 5e-2
    with pytest.raises(ValueError, match="factor_dtype must be float32 or float64"):
        cj.kfac(DAMPING, factor_dtype=jnp.bfloat16)


def test_factor_dtype_overrides_the_parameters_dtype(problem):
    _, params, _, _, _, grads, captures = problem
    params32 = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    grads32 = jax.tree.map(lambda p: p.astype(jnp.float32), grads)
    tx = cj.foof(DAMPING, factor_dtype=jnp.float64)
    updates, state = tx.update(grads32, tx.init(params32), params32, captures=captures)
    # The same solve in float64 on the float32 gradients: only the result is rounded.
    rounded = jax.tree.map(lambda g: g.astype(jnp.float64), grads32)
    plain = cj.foof(DAMPING)
    reference, _ = plain.update(rounded, plain.init(params), params, captures=captures)
    assert state.a_inverses["head"].dtype == jnp.float64
    for leaf, expected in zip(jax.tree.leaves(updates), jax.tree.leaves(reference)):
        assert leaf.dtype == jnp.float32
        assert relative_error(leaf, expected) < 1e-6


# --------------------------------------------------------------------------------------
# Failure rule
# --------------------------------------------------------------------------------------


def poisoned(captures, path="Block/Dense_0"):
    a, e = captures.loss[path]
    loss = dict(captures.loss, **{path: (a.at[0, 1, 0].set(jnp.nan), e)})
    return captures._replace(loss=loss, fisher=loss)


@pytest.mark.parametrize("make", [cj.foof, cj.kfac, cj.ekfac], ids=["foof", "kfac", "ekfac"])
def test_non_finite_step_leaves_state_untouched_and_updates_zero(problem, make):
    _, params, _, _, _, grads, captures = problem
    tx = optax.chain(make(DAMPING), optax.sgd(0.1))
    update = jax.jit(lambda g, s, c: tx.update(g, s, params, captures=c))
    state = tx.init(params)
    _, state = update(grads, state, captures)  # one good step: nonzero factors
    bad_grads = jax.tree.map(lambda g: g, grads)
    bad_grads["head"]["bias"] = grads["head"]["bias"].at[0].set(jnp.inf)
    for bad in ((grads, poisoned(captures)), (bad_grads, captures)):
        updates, after = update(*bad[:1], state, bad[1])
        for leaf in jax.tree.leaves(updates):
            np.testing.assert_array_equal(leaf, np.zeros_like(leaf))
        for old, new in zip(jax.tree.leaves(state), jax.tree.leaves(after)):
            np.testing.assert_array_equal(old, new)
    # A finite step afterwards is the second step of an undisturbed run.
    updates, after = update(grads, state, captures)
    _, fresh = update(grads, tx.init(params), captures)
    expected, _ = update(grads, fresh, captures)
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(a, b)
    assert int(after[0].count) == 2


# --------------------------------------------------------------------------------------
# Sequence Fisher and position masks
# --------------------------------------------------------------------------------------

KEPT = 3


def masked_losses(logits, targets):
    """Per-sequence losses: the token cross-entropies of the kept positions, summed."""
    labels, mask = targets
    return jnp.sum(jnp.where(mask, CE(logits, labels), 0.0), axis=-1)


@pytest.mark.parametrize("fisher", ["empirical", "exact"])
def test_masked_positions_count_as_deleted(problem, fisher):
    """Trailing padding behind the causal mask: the K-FAC step (factors and direction) on
    the masked (B, T) batch equals that on the batch with the padded positions deleted,
    for the empirical and the exact sequence Fisher."""
    model, params, tokens, labels, *_ = problem
    mask = jnp.broadcast_to(jnp.arange(T) < KEPT, (B, T))
    padded = jnp.where(mask, tokens, V - 1)  # padding holds some other token
    tx = cj.kfac(DAMPING, damping_mode="exact")

    @jax.jit
    def both(params):
        _, grads, captures = cj.capture_linen(
            model,
            params,
            padded,
            (labels, mask),
            masked_losses,
            fisher=fisher,
            position_mask=mask,
        )
        masked = tx.update(grads, tx.init(params), params, captures=captures)
        _, short_grads, short = cj.capture_linen(
            model, params, tokens[:, :KEPT], labels[:, :KEPT], token_losses, fisher=fisher
        )
        deleted = tx.update(short_grads, tx.init(params), params, captures=short)
        return grads, short_grads, masked, deleted

    grads, short_grads, (updates, state), (expected, expected_state) = both(params)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(short_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
        assert relative_error(a, b) < 1e-9
    for field in ("a_factors", "g_factors"):
        for path in CAPTURED:
            actual, wanted = getattr(state, field)[path], getattr(expected_state, field)[path]
            assert relative_error(actual, wanted) < 1e-10, (field, path)


@pytest.mark.parametrize("fisher", ["empirical", "exact"])
def test_fully_padded_sequence_changes_nothing(problem, fisher):
    """A batch with one more, fully padded sequence (``B = 4``, ``B_eff = 3``) takes the
    EK-FAC and natural-gradient step of the batch without it, for the same incoming
    gradient: the sequence's captures are zero, and the correction ``S`` and the Fisher
    ``(1/B_eff)·G Gᵀ`` are means over the ``B_eff`` examples with a kept position (with
    ``1/B`` both would shrink by 3/4 — the step of a smaller damping — and this fails)."""
    model, params, tokens, labels, *_ = problem
    padded_tokens = jnp.concatenate([tokens, jnp.full((1, T), V - 1)], axis=0)
    padded_labels = jnp.concatenate([labels, jnp.zeros((1, T), labels.dtype)], axis=0)
    mask = jnp.concatenate([jnp.ones((B, T), bool), jnp.zeros((1, T), bool)], axis=0)
    transforms = {"ekfac": cj.ekfac(DAMPING), "natural_gradient": cj.natural_gradient(DAMPING)}

    @jax.jit
    def both(params):
        # One trace of each capture for both transformations (compile time dominates).
        _, grads, short = cj.capture_linen(
            model, params, tokens, labels, token_losses, fisher=fisher
        )
        _, _, captures = cj.capture_linen(
            model,
            params,
            padded_tokens,
            (padded_labels, mask),
            masked_losses,
            fisher=fisher,
            position_mask=mask,
        )
        return {
            name: (
                tx.update(grads, tx.init(params), params, captures=captures),
                tx.update(grads, tx.init(params), params, captures=short),
            )
            for name, tx in transforms.items()
        }

    def flat(tree):
        return np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(tree)])

    for name, ((updates, state), (expected, expected_state)) in both(params).items():
        # Over all leaves at once: some (the key projection's bias) are zero up to rounding.
        assert relative_error(flat(updates), flat(expected)) < 1e-9, name
        assert relative_error(flat(state), flat(expected_state)) < 1e-9, name


def test_mc_labels_skip_masked_positions(problem):
    model, params, tokens, labels, *_ = problem
    mask = jnp.arange(T)[None, :] < jnp.array([[5], [3], [1]])
    _, _, captures = jax.jit(
        lambda p: cj.capture_linen(
            model,
            p,
            tokens,
            (labels, mask),
            masked_losses,
            fisher="mc",
            key=jax.random.key(0),
            position_mask=mask,
        )
    )(params)
    a, e = captures.fisher["head"]
    np.testing.assert_array_equal(np.asarray(e)[~np.asarray(mask)], 0)
    np.testing.assert_array_equal(np.asarray(a)[~np.asarray(mask)], 0)
    assert np.all(np.linalg.norm(np.asarray(e)[np.asarray(mask)], axis=-1) > 0)
    assert captures.mask is not None and captures.mask.shape == (B, T)


def test_exact_sequence_fisher_matches_jacrev(problem):
    """``(1/B) Σ_rows g gᵀ`` of the exact Fisher's ``B·T·C`` rows of a projection equals
    ``(1/B) Σ_i Σ_t J_itᵀ (diag p_it − p_it p_itᵀ) J_it`` with ``J_it`` the ``jacrev`` of
    position ``t``'s logits with respect to the projection's weight matrix."""
    model, params, tokens, labels, *_ = problem
    path = "Block/attention/value"
    info = layer_infos(params)[path]

    @jax.jit
    def both(params):
        _, _, captures = cj.capture_linen(
            model, params, tokens, labels, token_losses, fisher="exact"
        )
        a, e = captures.fisher[path]
        rows = jnp.einsum("nto,nti->noi", e, a).reshape(a.shape[0], -1)

        def logits_of(matrix, x):
            kernel, bias = cj.matrix_to_kernel(matrix, info.kernel_shape, True, 2)
            inner = dict(params["Block"]["attention"], value={"kernel": kernel, "bias": bias})
            block = dict(params["Block"], attention=inner)
            return model.apply({"params": dict(params, Block=block)}, x[None])[0]

        matrix = as_matrix(params, info)
        jac = jax.vmap(jax.jacrev(logits_of), in_axes=(None, 0))(matrix, tokens)  # (B,T,C,o,i)
        jac = jac.reshape(B, T, V, -1)
        p = jax.nn.softmax(model.apply({"params": params}, tokens), axis=-1)
        hessian = jax.vmap(jax.vmap(lambda q: jnp.diag(q) - jnp.outer(q, q)))(p)
        expected = jnp.einsum("btcx,btcd,btdy->xy", jac, hessian, jac) / B
        return rows.T @ rows / B, expected

    actual, expected = both(params)
    assert relative_error(actual, expected) < 1e-9
