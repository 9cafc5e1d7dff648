"""The torch and JAX optimizers take the same steps on the same small transformer block.

One causal self-attention block over ``(B, T, d)`` inputs — LayerNorm (no parameters), a
fused ``qkv`` projection, single-head causal attention, an output projection with a residual,
a per-token head — written once with ``torch.nn.Linear`` and once in Flax with ``cj.Dense``;
the same weights (torch's ``[W | b]`` mapped to Flax kernels with ``curvlinalg_jax.layout``),
the same batches, right padding (label ``-100`` / ``position_mask``), the empirical Fisher (no
random draw differs between the libraries) and a sequence's loss the sum of its token losses.
Every projection sees ``T`` positions per example, so the K-FAC-expand convention
(``A = Σ_{i,t} a aᵀ / B_eff``, ``G`` the mean over kept positions) and the masks of both
adapters are compared: after each of three steps (two factor refreshes, an exponential average
in between) the parameters agree to float64 rounding.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
nn = pytest.importorskip("flax.linen")
optax = pytest.importorskip("optax")

import curvlinalg_jax as cj  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tests.adapters.test_torch_jax_agreement import CASES as AGREEMENT_CASES  # noqa: E402

BATCH, LENGTH, WIDTH, CLASSES, STEPS, LR = 6, 4, 4, 3, 3, 0.2
CE = optax.softmax_cross_entropy_with_integer_labels
PATHS = ("Dense_0", "Dense_1", "Dense_2")  # qkv, proj, head: Flax's creation order


def causal_attention(q, k, v, softmax, where, allowed):
    """Single-head attention of position ``t`` to positions ``≤ t`` (``allowed``: (T, T)),
    written once for both libraries (their ``softmax``/``where`` passed in)."""
    scores = q @ k.swapaxes(-1, -2) / math.sqrt(WIDTH)
    return softmax(where(allowed, scores, -1e30)) @ v


class TorchBlock(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(WIDTH, 3 * WIDTH)
        self.proj = torch.nn.Linear(WIDTH, WIDTH)
        self.head = torch.nn.Linear(WIDTH, CLASSES)

    def forward(self, x):
        h = F.layer_norm(x, (WIDTH,))
        q, k, v = self.qkv(h).split(WIDTH, dim=-1)
        allowed = torch.tril(torch.ones(LENGTH, LENGTH, dtype=torch.bool))
        attended = causal_attention(q, k, v, lambda s: torch.softmax(s, -1), torch.where, allowed)
        return self.head(torch.tanh(x + self.proj(attended)))


class FlaxBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        mean = jnp.mean(x, -1, keepdims=True)
        h = (x - mean) / jnp.sqrt(jnp.var(x, -1, keepdims=True) + 1e-5)
        qkv = cj.Dense(3 * WIDTH, param_dtype=jnp.float64)(h)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        allowed = jnp.tril(jnp.ones((LENGTH, LENGTH), bool))
        attended = causal_attention(q, k, v, lambda s: jax.nn.softmax(s, -1), jnp.where, allowed)
        h = jnp.tanh(x + cj.Dense(WIDTH, param_dtype=jnp.float64)(attended))
        return cj.Dense(CLASSES, param_dtype=jnp.float64)(h)


def torch_matrices(model: TorchBlock) -> dict[str, np.ndarray]:
    layers = (model.qkv, model.proj, model.head)
    return {
        path: torch.cat([layer.weight.detach(), layer.bias.detach()[:, None]], 1).numpy()
        for path, layer in zip(PATHS, layers)
    }


def flax_params(matrices: dict[str, np.ndarray]) -> dict:
    params = {}
    for path, matrix in matrices.items():
        shape = (matrix.shape[1] - 1, matrix.shape[0])
        kernel, bias = cj.layout.matrix_to_kernel(jnp.asarray(matrix), shape, True)
        params[path] = {"kernel": kernel, "bias": bias}
    return params


def flax_matrices(params: dict) -> dict[str, np.ndarray]:
    return {
        path: np.asarray(cj.layout.kernel_to_matrix(layer["kernel"], layer["bias"]))
        for path, layer in params.items()
    }


def batches(padded: bool):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS, BATCH, LENGTH, WIDTH, generator=generator, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (STEPS, BATCH, LENGTH), generator=generator)
    mask = torch.ones(STEPS, BATCH, LENGTH, dtype=torch.bool)
    if padded:  # right padding, kept lengths 4, 3, 2, 1, 4, 2 (the same in every batch)
        for row, kept in enumerate((4, 3, 2, 1, 4, 2)):
            mask[:, row, kept:] = False
    return x, y.masked_fill(~mask, -100), mask


# The agreement test's FOOF and (π-damped) K-FAC, same LR and hyperparameters.
CASES = {"foof": AGREEMENT_CASES["foof"], "kfac": AGREEMENT_CASES["kfac-factored"]}


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("case", list(CASES))
def test_torch_and_jax_take_the_same_kfac_steps_on_a_transformer_block(case, padded):
    make_torch, make_jax = CASES[case]
    x, y, mask = batches(padded)
    torch.manual_seed(1)
    model = TorchBlock().double()
    params = flax_params(torch_matrices(model))
    np.testing.assert_allclose(  # same network: same logits
        np.asarray(FlaxBlock().apply({"params": params}, jnp.asarray(x[0].numpy()))),
        model(x[0]).detach().numpy(),
        rtol=1e-12,
        atol=1e-12,
    )
    optimizer = make_torch(model)
    assert sorted(layer.name for layer in optimizer.layers) == ["head", "proj", "qkv"]
    tx = optax.chain(make_jax(), optax.sgd(LR))
    state = tx.init(params)

    def token_losses(logits, targets):
        labels, keep = targets
        losses = CE(logits, jnp.where(keep, labels, 0))
        return jnp.sum(jnp.where(keep, losses, 0.0), axis=1)

    @jax.jit
    def step(params, state, x, y, keep):
        _, grads, captures = cj.capture_linen(
            FlaxBlock(),
            params,
            x,
            (y, keep),
            token_losses,
            fisher="empirical",
            position_mask=keep if padded else None,
        )
        updates, state = tx.update(grads, state, params, captures=captures)
        return optax.apply_updates(params, updates), state

    for k in range(STEPS):
        optimizer.zero_grad()
        if padded:
            optimizer.set_mask(mask[k])
        logits = model(x[k])
        loss = F.cross_entropy(logits.flatten(0, 1), y[k].flatten(), reduction="sum") / BATCH
        loss.backward()
        optimizer.step()
        params, state = step(
            params,
            state,
            jnp.asarray(x[k].numpy()),
            jnp.asarray(y[k].numpy()),
            jnp.asarray(mask[k].numpy()),
        )
        expected, actual = torch_matrices(model), flax_matrices(params)
        for path in expected:
            np.testing.assert_allclose(
                actual[path], expected[path], rtol=1e-10, atol=1e-12, err_msg=f"step {k} {path}"
            )
