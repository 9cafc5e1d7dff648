"""bench/transformer_lm_jax.py: the Flax model (size, causality, tied head, init), the loss
scaling for ``cj.capture_linen``, the routing of the non-captured parameters to AdamW, and the
--quick run end to end (adamw + kfac; tens of seconds, mostly compilation).

References: NumPy float64 cross-entropies over the real tokens; the torch model's parameter
count written out (``transformer_lm.build_model``: 12·w² + 13·w per block); an ``optax.adamw``
alone on the raw gradients. Tolerances: float32 model, 1e-5 relative on losses, 1e-6 on the
AdamW updates (the same float32 operations in a different tree)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from .conftest import BENCH
from .test_transformer_lm import check_quick_result

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
pytest.importorskip("flax")
cj = pytest.importorskip("curvlinalg_jax")

import jax.numpy as jnp  # noqa: E402
import transformer_lm_jax as lmj  # noqa: E402

LAYERS, WIDTH, HEADS, CONTEXT = 1, 16, 2, 8


@pytest.fixture(scope="module")
def model_and_params():
    model = lmj.build_model(LAYERS, WIDTH, HEADS, CONTEXT)
    tokens = jax.random.randint(jax.random.key(0), (3, CONTEXT), 1, 256)
    params = jax.jit(model.init)(jax.random.key(1), tokens)["params"]
    return model, params, tokens


def test_model_size_tied_head_causality_and_init(model_and_params):
    model, params, tokens = model_and_params
    n = sum(int(p.size) for p in jax.tree.leaves(params))
    per_block = 12 * WIDTH**2 + 13 * WIDTH  # qkv, proj, fc, fc2 with biases; two LayerNorms
    assert n == 256 * WIDTH + CONTEXT * WIDTH + LAYERS * per_block + 2 * WIDTH
    assert set(params) == {"embed", "position", "blocks_0", "ln_f"}  # no head
    assert lmj.captured_paths(params) == sorted(
        f"blocks_{i}/{name}" for i in range(LAYERS) for name in lmj.BLOCK_LAYERS
    )
    logits = model.apply({"params": params}, tokens)
    assert logits.shape == (3, CONTEXT, 256)
    # the head is the token embedding: moving the row of a byte that no input holds moves
    # that logit column, and only it
    absent = next(v for v in range(1, 256) if v not in set(np.asarray(tokens).ravel()))
    direction = jnp.linspace(-1.0, 1.0, WIDTH, dtype=jnp.float32) ** 2  # not ⊥ LayerNorm output
    shifted = dict(
        params, embed={"embedding": params["embed"]["embedding"].at[absent].add(direction)}
    )
    changed = np.asarray(model.apply({"params": shifted}, tokens) - logits)
    assert np.all(np.abs(changed[..., absent]) > 1e-3)
    np.testing.assert_allclose(np.delete(changed, absent, axis=-1), 0, atol=1e-6)
    # causal: later inputs do not change earlier logits
    later = tokens.at[:, 5:].set(0)
    np.testing.assert_allclose(
        model.apply({"params": params}, later)[:, :5], logits[:, :5], rtol=1e-5, atol=1e-6
    )
    # GPT-2 init: residual projections N(0, 0.02/√(2·layers)), the others N(0, 0.02)
    stds = {name: float(jnp.std(params["blocks_0"][name]["kernel"])) for name in lmj.BLOCK_LAYERS}
    for name, std in stds.items():
        expected = 0.02 / math.sqrt(2 * LAYERS) if name in ("proj", "fc2") else 0.02
        assert abs(std / expected - 1) < 0.15, (name, std)
        assert not np.any(np.asarray(params["blocks_0"][name]["bias"]))


def test_sequence_losses_average_to_the_real_token_mean(model_and_params):
    model, params, tokens = model_and_params
    labels = jax.random.randint(jax.random.key(2), tokens.shape, 0, 256)
    labels = labels.at[1, 3:].set(lmj.lm.IGNORE).at[2, 6:].set(lmj.lm.IGNORE)
    logits = np.asarray(model.apply({"params": params}, tokens), np.float64)
    real = np.asarray(labels) != lmj.lm.IGNORE
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_p, np.where(real, labels, 0)[..., None], -1)[..., 0]
    expected = -picked[real].mean()  # F.cross_entropy(ignore_index=-100)'s mean
    loss = float(lmj.lm_loss(jnp.asarray(logits, jnp.float32), labels))
    per_sequence = lmj.sequence_losses(jnp.asarray(logits, jnp.float32), labels)
    assert per_sequence.shape == (3,)
    assert abs(loss / expected - 1) < 1e-5
    assert abs(float(jnp.mean(per_sequence)) / expected - 1) < 1e-5
    # capture_linen's mean loss and gradient are those of the token mean
    m_loss, grads, captures = jax.jit(
        lambda p: cj.capture_linen(
            model, p, tokens, labels, lmj.sequence_losses, position_mask=labels != -100
        )
    )(params)
    direct = jax.jit(jax.grad(lambda p: lmj.lm_loss(model.apply({"params": p}, tokens), labels)))(
        params
    )
    assert abs(float(m_loss) / expected - 1) < 1e-5
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(direct)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    a, e = captures.loss["blocks_0/fc"]
    assert not np.any(np.asarray(a)[~real]) and not np.any(np.asarray(e)[~real])


def test_non_captured_parameters_get_the_fallback_adamw(model_and_params):
    """One K-FAC step: embeddings and LayerNorms get exactly the update of
    ``optax.adamw(lr, b1=0.9, b2=0.95, weight_decay=0)`` on their raw gradients; the block
    projections get a preconditioned step, different from it (FOOF and the natural gradient
    are routed by the same ``multi_transform``; the smoke run covers K-FAC end to end)."""
    name = "kfac"
    model, params, tokens = model_and_params
    labels = jnp.roll(tokens, -1, axis=1).at[:, -1].set(lmj.lm.IGNORE)
    args = SimpleNamespace(
        kfac_lr=0.1, kfac_damping=0.3, foof_lr=0.1, foof_damping=0.3, ng_lr=0.03,
        ng_damping=0.1, update_every=2, inverse_every=4,
    )  # fmt: skip
    tx = lmj.make_optimizer(name, params, args, adamw_lr=3e-3)
    step = lmj.make_step(name, model, tx, batch=2)
    order = jnp.arange(3, dtype=jnp.int32)
    new, _, _ = jax.jit(step)(params, tx.init(params), 0, 1.0, tokens, labels, order)
    grads = jax.jit(
        jax.grad(lambda p: lmj.lm_loss(model.apply({"params": p}, tokens[:2]), labels[:2]))
    )(params)
    adamw = optax.adamw(3e-3, b1=0.9, b2=0.95, weight_decay=0.0)
    fallback, _ = adamw.update(grads, adamw.init(params), params)
    plain = optax.apply_updates(params, fallback)
    flat = jax.tree_util.tree_flatten_with_path
    for (path, leaf), expected in zip(flat(new)[0], jax.tree.leaves(plain)):
        label = cj.layout.path_name(path)
        if any(label.startswith(layer + "/") for layer in lmj.captured_paths(params)):
            assert not np.allclose(leaf, expected, rtol=1e-3, atol=0), label
        else:
            np.testing.assert_allclose(leaf, expected, rtol=1e-6, atol=1e-7, err_msg=label)


@pytest.mark.smoke
def test_transformer_lm_jax_quick(tmp_path):
    out, fig = tmp_path / "transformer_jax.json", tmp_path / "transformer_jax_loss.png"
    command = [sys.executable, str(BENCH / "transformer_lm_jax.py"), "--quick", "--threads", "1"]
    command += ["--only", "kfac", "--json", str(out), "--figure", str(fig)]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert fig.stat().st_size > 0
    assert set(result) == {"meta", "summary", "curves", "step_time", "compile_seconds"}
    assert result["meta"]["xla_flags"].endswith(lmj.SINGLE_THREAD_XLA_FLAGS)
    assert result["meta"]["corpus"]["licence"].startswith("Python Software Foundation")
    names = ["adamw lr=0.003", "kfac"]
    assert list(result["curves"]) == names and list(result["summary"]) == names
    assert set(result["compile_seconds"]) == set(names)
    check_quick_result(result, names)
    kfac = result["curves"]["kfac"]
    assert kfac["captured_layers"] == [f"blocks_0/{n}" for n in ("fc", "fc2", "proj", "qkv")]
    assert kfac["skipped_steps"] == 0
