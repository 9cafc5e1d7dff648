"""The torch and JAX optimizers take the same steps on the same convolutional network.

One network (a strided 2×2 convolution with bias, ``tanh``, a dense layer), written once in
``torch.nn`` and once in Flax with ``curvlinalg_jax`` layers; the same weights (torch's
``(d_out, d_in)`` matrices mapped to Flax kernels with ``curvlinalg_jax.layout``) and the
same batches; the empirical Fisher, so that no random draw differs between the libraries.
Optimizers: FOOF, K-FAC (π-damped), EK-FAC (a basis refresh and a correction average in the
old basis) and SO-KLD-WRM (exactly damped in the eigenbasis).
After each of three steps (two factor refreshes, an exponential average in between) the
parameters of both must agree to float64 rounding. The convolution's ``T = 4`` positions make
the factor convention visible: a ``1/T`` difference in ``A⊗G`` changes the steps by far more
than the tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
nn = pytest.importorskip("flax.linen")
optax = pytest.importorskip("optax")

import curvlinalg_jax as cj  # noqa: E402
import curvlinalg_torch as ct  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch.nn.functional as F  # noqa: E402

BATCH, STEPS, LR = 10, 3, 0.2  # B ≥ every d_in: no null-space eigenvectors (EK-FAC)
CE = optax.softmax_cross_entropy_with_integer_labels


class TorchNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 2, stride=2)
        self.dense = torch.nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(x))  # (B, 2, 2, 2)
        # Flatten channels-last, as the Flax network does.
        return self.dense(h.permute(0, 2, 3, 1).flatten(1))


class FlaxNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(cj.Conv(2, (2, 2), strides=2, padding="VALID", param_dtype=jnp.float64)(x))
        return cj.Dense(3, param_dtype=jnp.float64)(h.reshape(h.shape[0], -1))


def torch_matrices(model: TorchNet) -> dict[str, np.ndarray]:
    """Each layer's ``[W | b]`` ``(d_out, d_in + 1)``; a convolution's ``W`` flattened
    channel-major (``F.unfold``'s patch order), as ``curvlinalg_jax.layout`` expects."""
    result = {}
    for path, layer in (("Conv_0", model.conv), ("Dense_0", model.dense)):
        weight = layer.weight.detach().reshape(layer.weight.shape[0], -1)
        result[path] = torch.cat([weight, layer.bias.detach()[:, None]], 1).numpy()
    return result


def flax_params(matrices: dict[str, np.ndarray]) -> dict:
    shapes = {"Conv_0": (2, 2, 1, 2), "Dense_0": (8, 3)}
    params = {}
    for path, matrix in matrices.items():
        kernel, bias = cj.layout.matrix_to_kernel(jnp.asarray(matrix), shapes[path], True)
        params[path] = {"kernel": kernel, "bias": bias}
    return params


def flax_matrices(params: dict) -> dict[str, np.ndarray]:
    return {
        path: np.asarray(cj.layout.kernel_to_matrix(layer["kernel"], layer["bias"]))
        for path, layer in params.items()
    }


@pytest.fixture(scope="module")
def data():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS, BATCH, 1, 4, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (STEPS, BATCH), generator=generator)
    return x, y


CASES = {
    "foof": (
        lambda m: ct.FOOF(m, lr=LR, damping=0.3, ema_decay=0.6, factor_dtype=torch.float64),
        lambda: cj.foof(0.3, decay=0.6),
    ),
    "kfac-factored": (
        lambda m: ct.KFAC(
            m, lr=LR, damping=0.05, fisher="empirical", ema_decay=0.6, factor_dtype=torch.float64
        ),
        lambda: cj.kfac(0.05, decay=0.6),
    ),
    "ekfac": (
        lambda m: ct.EKFAC(
            m,
            lr=LR,
            damping=0.05,
            fisher="empirical",
            ema_decay=0.6,
            inverse_every=2,
            factor_dtype=torch.float64,
        ),
        lambda: cj.ekfac(0.05, decay=0.6, inverse_every=2),
    ),
    "so-kldwrm": (
        lambda m: ct.KLDWRM(
            m,
            lr=LR,
            variant="so",
            rho=0.5,
            damping=0.05,
            fisher="empirical",
            damping_rule="exact",
            factor_dtype=torch.float64,
        ),
        lambda: cj.kldwrm(LR, 0.05, decay=0.5, variant="so"),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_torch_and_jax_take_the_same_steps_on_a_convolutional_network(data, case):
    make_torch, make_jax = CASES[case]
    x, y = data
    torch.manual_seed(1)
    model = TorchNet().double()
    params = flax_params(torch_matrices(model))
    np.testing.assert_allclose(  # same network: same logits
        np.asarray(FlaxNet().apply({"params": params}, jnp.asarray(x[0].permute(0, 2, 3, 1)))),
        model(x[0]).detach().numpy(),
        rtol=1e-12,
        atol=1e-12,
    )

    optimizer = make_torch(model)
    tx = optax.chain(make_jax(), optax.sgd(LR))
    state = tx.init(params)

    @jax.jit
    def step(params, state, x, y):
        _, grads, captures = cj.capture_linen(FlaxNet(), params, x, y, CE, fisher="empirical")
        updates, state = tx.update(grads, state, params, captures=captures)
        return optax.apply_updates(params, updates), state

    for k in range(STEPS):
        optimizer.zero_grad()
        F.cross_entropy(model(x[k]), y[k]).backward()
        optimizer.step()
        params, state = step(params, state, jnp.asarray(x[k].permute(0, 2, 3, 1)), y[k].numpy())
        expected, actual = torch_matrices(model), flax_matrices(params)
        for path in expected:
            np.testing.assert_allclose(
                actual[path], expected[path], rtol=1e-10, atol=1e-12, err_msg=f"step {k} {path}"
            )
