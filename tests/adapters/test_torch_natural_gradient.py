"""NaturalGradient against dense references built with ``torch.func``.

The dense reference works in the optimizer's coordinates: per captured layer the block
``[W.reshape(d_out, -1) | b]`` flattened row-major, layers concatenated in capture order. With
``J_i`` the ``(C, D)`` Jacobian of example ``i``'s logits and ``p_i`` its softmax:

* per-example cross-entropy gradient for label ``y``: ``g_i = J_iᵀ (p_i − onehot(y))``;
* empirical / MC Fisher ``F = (1/B) Σ g_i g_iᵀ`` (data / sampled labels);
* exact Fisher ``F = (1/B) Σ J_iᵀ (diag p_i − p_i p_iᵀ) J_i``;
* the step direction ``(λI + F)⁻¹ ∇``, ``∇ = (1/B) Σ g_i`` (data labels), by a dense solve;
  layer-wise: the same with ``F`` masked to its diagonal blocks.

The tiny model has a ``Conv2d`` with bias (``T = 9`` positions) and a ``Linear`` with bias, in
float64.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from curvlinalg_torch.capture import find_layers
from curvlinalg_torch.natural_gradient import NaturalGradient
from torch import nn
from torch.func import functional_call, jacrev, vmap

from curvlinalg import fisher as core_fisher
from tests.adapters.test_torch_laplace import TinyMLP

DTYPE = torch.float64
LAMBDA = 0.05
LR = 0.5
CLASSES = 3


class TinyNet(nn.Module):
    """Conv2d(1→2, 3×3, bias) on 5×5 inputs (T = 9), tanh, Linear(18→3, bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.head = nn.Linear(18, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(x)).flatten(1))


class WideNet(nn.Module):
    """Layers wide enough (for B ≤ 2) that ``G_Fᵀ∇`` is contracted through the cross Gram:
    Conv2d(6→12, 3×3) on 4×4 inputs (T = 4), Linear(48→20), Linear(20→3)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(6, 12, 3)
        self.hidden = nn.Linear(48, 20)
        self.head = nn.Linear(20, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x)).flatten(1)
        return self.head(torch.tanh(self.hidden(h)))


def make_model(seed: int = 0, kind: type[nn.Module] = TinyNet) -> nn.Module:
    torch.manual_seed(seed)
    model = kind().to(DTYPE)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)  # larger weights: a Fisher well above λ, and non-uniform softmax
    return model


def make_batch(
    seed: int, batch: int = 5, shape: tuple[int, ...] = (1, 5, 5)
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *shape, generator=g, dtype=DTYPE)
    y = torch.randint(0, CLASSES, (batch,), generator=g)
    return x, y


# ------------------------------------------------------------------------- dense reference


def _layer_names(model: nn.Module) -> list[str]:
    return [name for name, _ in find_layers(model)]


def to_blocks(tree: dict[str, torch.Tensor], model: nn.Module, lead: int) -> torch.Tensor:
    """Parameter-shaped tensors (with ``lead`` leading axes) → block coordinates ``(..., D)``."""
    parts = []
    for name in _layer_names(model):
        w = tree[f"{name}.weight"]
        shape = w.shape[:lead]
        block = w.reshape(*shape, w.shape[lead], -1)
        bias = tree.get(f"{name}.bias")
        if bias is not None:
            block = torch.cat([block, bias[..., None]], dim=-1)
        parts.append(block.reshape(*shape, -1))
    return torch.cat(parts, dim=-1)


def block_sizes(model: nn.Module) -> list[int]:
    sizes = []
    for _, module in find_layers(model):
        sizes.append(
            module.weight.numel() + (module.bias.numel() if module.bias is not None else 0)
        )
    return sizes


def parameters_vector(model: nn.Module) -> torch.Tensor:
    return to_blocks({n: p.detach().clone() for n, p in model.named_parameters()}, model, 0)


def jacobians(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``J`` ``(B, C, D)`` and ``p`` ``(B, C)`` at the model's parameters (a hook-free copy)."""
    # A hook-free twin: the optimizer's capture hooks do not support torch.func transforms.
    clean = type(model)().to(DTYPE)
    clean.load_state_dict(model.state_dict())
    params = {n: p.detach() for n, p in clean.named_parameters()}

    def logits(params: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return functional_call(clean, params, (xi[None],))[0]

    jac = vmap(jacrev(logits), in_dims=(None, 0))(params, x)
    with torch.no_grad():
        p = torch.softmax(functional_call(clean, params, (x,)), dim=-1)
    return to_blocks(jac, clean, 2), p


def per_example(jac: torch.Tensor, p: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(B, D)`` per-example cross-entropy gradients ``J_iᵀ (p_i − onehot(y_i))``."""
    errors = p - F.one_hot(labels, p.shape[1]).to(p.dtype)
    return torch.einsum("bcd,bc->bd", jac, errors)


def dense_fisher(
    jac: torch.Tensor, p: torch.Tensor, kind: str, labels: torch.Tensor | None = None
) -> torch.Tensor:
    batch = jac.shape[0]
    if kind == "exact":
        middle = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        return torch.einsum("bcd,bce,bef->df", jac, middle, jac) / batch
    assert labels is not None
    g = per_example(jac, p, labels)
    return g.T @ g / batch


def mask_blocks(matrix: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    out = torch.zeros_like(matrix)
    start = 0
    for size in sizes:
        out[start : start + size, start : start + size] = matrix[
            start : start + size, start : start + size
        ]
        start += size
    return out


def dense_direction(
    fisher_matrix: torch.Tensor, gradient: torch.Tensor, structure: str, sizes: list[int]
) -> torch.Tensor:
    if structure == "layerwise":
        fisher_matrix = mask_blocks(fisher_matrix, sizes)
    system = LAMBDA * torch.eye(fisher_matrix.shape[0], dtype=DTYPE) + fisher_matrix
    return torch.linalg.solve(system, gradient)


def mc_labels(seed: int, logits: torch.Tensor) -> torch.Tensor:
    """The labels the optimizer draws with ``torch.Generator().manual_seed(seed)``
    (``Capture.backward_sampled``: ``torch.rand(B)`` in the logits' dtype, inverse CDF)."""
    g = torch.Generator().manual_seed(seed)
    uniform = torch.rand(logits.shape[0], generator=g, dtype=logits.dtype)
    return core_fisher.sample_labels(logits, uniform)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.detach()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-9) -> None:
    error = float(torch.linalg.vector_norm(actual - expected))
    scale = float(torch.linalg.vector_norm(expected))
    assert error <= rtol * scale, f"relative error {error / scale:.3e} > {rtol:.1e}"


# ------------------------------------------------------------------------- first step


@pytest.mark.parametrize("structure", ["full", "layerwise"])
@pytest.mark.parametrize("kind", ["empirical", "mc", "exact"])
def test_first_step_equals_dense_solve(kind: str, structure: str) -> None:
    model = make_model()
    x, y = make_batch(1)
    jac, p = jacobians(model, x)
    gradient = per_example(jac, p, y).mean(0)
    labels = y
    if kind == "mc":
        with torch.no_grad():
            labels = mc_labels(7, model(x))
        assert not torch.equal(labels, y)  # the MC Fisher really differs from the empirical
    expected = dense_direction(
        dense_fisher(jac, p, kind, labels), gradient, structure, block_sizes(model)
    )
    before = parameters_vector(model)
    opt = NaturalGradient(
        model,
        lr=LR,
        damping=LAMBDA,
        fisher=kind,
        structure=structure,
        generator=torch.Generator().manual_seed(7),
    )
    train_step(model, opt, x, y)
    assert_close((before - parameters_vector(model)) / LR, expected)
    # The Fisher is not negligible at this damping: the step is far from gradient / λ.
    assert float(torch.linalg.vector_norm(expected - gradient / LAMBDA)) > 0.1 * float(
        torch.linalg.vector_norm(expected)
    )


def test_layerwise_differs_from_full_and_single_layer_agrees() -> None:
    model = make_model()
    x, y = make_batch(1)
    steps = {}
    for structure in ("full", "layerwise"):
        clone = copy.deepcopy(model)
        opt = NaturalGradient(clone, lr=LR, damping=LAMBDA, fisher="exact", structure=structure)
        before = parameters_vector(clone)
        train_step(clone, opt, x, y)
        steps[structure] = before - parameters_vector(clone)
    assert float(torch.linalg.vector_norm(steps["full"] - steps["layerwise"])) > 1e-3
    # One captured layer: layer-wise is the full Fisher (NOTES §6 item 14).
    for structure in ("full", "layerwise"):
        clone = copy.deepcopy(model)
        opt = NaturalGradient(
            clone,
            lr=LR,
            damping=LAMBDA,
            fisher="exact",
            structure=structure,
            layers=[clone.head],
        )
        before = clone.head.weight.detach().clone()
        train_step(clone, opt, x, y)
        steps[structure + "-head"] = before - clone.head.weight.detach()
    assert_close(steps["layerwise-head"], steps["full-head"], 1e-12)


# ------------------------------------------------------------------------- independent batch


@pytest.mark.parametrize("kind", ["empirical", "mc", "exact"])
def test_independent_batch_reuses_previous_factorisation(kind: str) -> None:
    model = make_model()
    (x0, y0), (x1, y1) = make_batch(1), make_batch(2, batch=3)
    opt = NaturalGradient(
        model,
        lr=LR,
        damping=LAMBDA,
        fisher=kind,
        structure="full",
        fisher_batch="independent",
        refresh_every=1,
        generator=torch.Generator().manual_seed(3),
    )
    jac0, p0 = jacobians(model, x0)
    labels0 = y0
    if kind == "mc":
        with torch.no_grad():
            labels0 = mc_labels(3, model(x0))
    fisher0 = dense_fisher(jac0, p0, kind, labels0)
    # Step 0: nothing earlier exists, the batch's own Fisher preconditions it.
    before = parameters_vector(model)
    train_step(model, opt, x0, y0)
    expected0 = dense_direction(
        fisher0, per_example(jac0, p0, y0).mean(0), "full", block_sizes(model)
    )
    assert_close((before - parameters_vector(model)) / LR, expected0)
    # Step 1: batch 1's gradient (at θ1) preconditioned by batch 0's Fisher (at θ0).
    jac1, p1 = jacobians(model, x1)
    expected1 = dense_direction(
        fisher0, per_example(jac1, p1, y1).mean(0), "full", block_sizes(model)
    )
    before = parameters_vector(model)
    train_step(model, opt, x1, y1)
    assert_close((before - parameters_vector(model)) / LR, expected1)


def test_kept_fisher_preconditions_a_weight_sharing_step() -> None:
    """The kept Fisher of a plain batch (one call per layer) preconditions the gradient of a
    later step whose forward calls every layer twice (weight sharing: two positions per
    example). Its rows and the batch's have different position counts; the step is
    ``(λI + F_0)⁻¹ ∇_1`` with ``∇_1`` autograd's gradient of the shared loss."""
    model = make_model(kind=TinyMLP)
    x0, y0 = make_batch(1, batch=5, shape=(4,))
    x1, y1 = make_batch(2, batch=6, shape=(4,))
    opt = NaturalGradient(
        model,
        lr=LR,
        damping=LAMBDA,
        fisher="empirical",
        fisher_batch="independent",
        refresh_every=2,
    )
    jac0, p0 = jacobians(model, x0)
    fisher0 = dense_fisher(jac0, p0, "empirical", y0)
    train_step(model, opt, x0, y0)

    def shared_loss(net: nn.Module) -> torch.Tensor:
        return F.cross_entropy(net(x1[:3]) + net(x1[3:]), y1[:3])

    clean = TinyMLP().to(DTYPE)
    clean.load_state_dict(model.state_dict())
    names = [n for n, _ in clean.named_parameters()]
    grads = torch.autograd.grad(shared_loss(clean), list(clean.parameters()))
    gradient = to_blocks(dict(zip(names, grads)), clean, 0)
    expected = dense_direction(fisher0, gradient, "full", block_sizes(model))
    before = parameters_vector(model)
    opt.zero_grad()
    shared_loss(model).backward()
    opt.step()
    assert_close((before - parameters_vector(model)) / LR, expected)


@pytest.mark.parametrize("structure", ["full", "layerwise"])
@pytest.mark.parametrize(("kind", "fisher_batch"), [("mc", "independent"), ("exact", "same")])
def test_cross_gram_path_equals_dense_solve(kind: str, fisher_batch: str, structure: str) -> None:
    """Wide layers: ``G_Fᵀ∇`` through the cross Gram (also with positions, T = 4)."""
    model = make_model(kind=WideNet)
    batches = [make_batch(50, 2, (6, 4, 4)), make_batch(51, 2, (6, 4, 4))]
    opt = NaturalGradient(
        model,
        lr=LR,
        damping=LAMBDA,
        fisher=kind,
        structure=structure,
        fisher_batch=fisher_batch,
        generator=torch.Generator().manual_seed(4),
    )
    for layer in opt.layers:  # the fast path is the one taken for every layer here
        a_rows = 2 * (4 if layer.kind == "conv2d" else 1)
        assert a_rows * (layer.d_in + layer.d_out) < layer.d_in * layer.d_out
    sizes = block_sizes(model)
    jac0, p0 = jacobians(model, batches[0][0])
    labels0 = None
    if kind == "mc":
        with torch.no_grad():
            labels0 = mc_labels(4, model(batches[0][0]))
    fisher0 = dense_fisher(jac0, p0, kind, labels0)
    for _k, (x, y) in enumerate(batches):
        jac, p = jacobians(model, x)
        fisher_k = fisher0 if fisher_batch == "independent" else dense_fisher(jac, p, kind)
        expected = dense_direction(fisher_k, per_example(jac, p, y).mean(0), structure, sizes)
        before = parameters_vector(model)
        train_step(model, opt, x, y)
        assert_close((before - parameters_vector(model)) / LR, expected)


@pytest.mark.parametrize("structure", ["full", "layerwise"])
def test_refresh_every_schedule(structure: str) -> None:
    """T = 3: steps 0–2 use batch 0's Fisher, step 2 takes new captures for steps 3–5."""
    model = make_model()
    batches = [make_batch(10 + k, batch=4) for k in range(5)]
    opt = NaturalGradient(
        model,
        lr=LR,
        damping=LAMBDA,
        fisher="exact",
        structure=structure,
        fisher_batch="independent",
        refresh_every=3,
    )
    sizes = block_sizes(model)
    fisher_of = {}
    for k, (x, y) in enumerate(batches):
        jac, p = jacobians(model, x)
        fisher_of[k] = dense_fisher(jac, p, "exact")
        source = 0 if k <= 2 else 2
        expected = dense_direction(
            fisher_of[source], per_example(jac, p, y).mean(0), structure, sizes
        )
        before = parameters_vector(model)
        train_step(model, opt, x, y)
        assert_close((before - parameters_vector(model)) / LR, expected)


# ------------------------------------------------------------------------- momentum, decay, SGD


@pytest.mark.parametrize(("kind", "mu"), [("empirical", 0.9), ("exact", 0.9), ("exact", 0.0)])
def test_momentum_and_weight_decay(kind: str, mu: float) -> None:
    """``buf ← μ·buf + s + wd·θ``, ``θ ← θ − lr·buf`` with ``s`` the dense natural gradient
    (``"empirical"``: the step comes as a matrix from ``solve_span``; ``"exact"``: factored,
    fused into the buffer or, without momentum, into the weights)."""
    wd = 0.01
    model = make_model()
    opt = NaturalGradient(model, lr=LR, damping=LAMBDA, fisher=kind, momentum=mu, weight_decay=wd)
    sizes = block_sizes(model)
    buf = None
    for k in range(3):
        x, y = make_batch(20 + k)
        jac, p = jacobians(model, x)
        s = dense_direction(
            dense_fisher(jac, p, kind, y), per_example(jac, p, y).mean(0), "full", sizes
        )
        theta = parameters_vector(model)
        buf = s + wd * theta if buf is None else mu * buf + s + wd * theta
        train_step(model, opt, x, y)
        assert_close(parameters_vector(model), theta - LR * buf, 1e-12)


def _norm_model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).to(DTYPE)


def test_other_parameters_get_momentum_sgd() -> None:
    """The LayerNorm parameters follow ``torch.optim.SGD`` with ``other_lr`` and momentum."""
    mu, other_lr = 0.5, 0.2
    torch.manual_seed(0)
    model = _norm_model()
    opt = NaturalGradient(
        model, lr=0.1, damping=0.1, fisher="mc", momentum=mu, other_lr=other_lr, seed=0
    )
    assert opt.param_groups[1]["lr"] == other_lr
    assert {id(p) for p in opt.param_groups[1]["params"]} == {id(p) for p in model[1].parameters()}
    buffers = None
    for _k in range(3):
        x = torch.randn(8, 4, dtype=DTYPE)
        y = torch.randint(0, 3, (8,))
        probe = _norm_model()  # hook-free twin at the same parameters
        probe.load_state_dict(model.state_dict())
        F.cross_entropy(probe(x), y).backward()
        grads = [p.grad for p in probe[1].parameters()]
        buffers = grads if buffers is None else [mu * b + g for b, g in zip(buffers, grads)]
        expected = [p.detach() - other_lr * b for p, b in zip(probe[1].parameters(), buffers)]
        train_step(model, opt, x, y)
        for p, e in zip(model[1].parameters(), expected):
            assert_close(p.detach(), e, 1e-12)


# ------------------------------------------------------------------------- reliability


@pytest.mark.parametrize("fisher_batch", ["same", "independent"])
def test_non_finite_step_is_skipped(fisher_batch: str) -> None:
    model = make_model()
    opt = NaturalGradient(
        model, lr=LR, damping=LAMBDA, fisher="mc", momentum=0.9, fisher_batch=fisher_batch, seed=5
    )
    train_step(model, opt, *make_batch(1))
    params = parameters_vector(model)
    state = copy.deepcopy(opt.state_dict())
    x, y = make_batch(2)
    x[0, 0, 2, 2] = float("nan")
    with pytest.warns(RuntimeWarning, match="skipped"):
        train_step(model, opt, x, y)
    assert torch.equal(parameters_vector(model), params)
    assert opt.skipped_steps == 1 and opt.steps == 1
    after = opt.state_dict()
    assert torch.equal(
        after["curvlinalg"]["extra"]["generator"], state["curvlinalg"]["extra"]["generator"]
    )
    for old, new in zip(state["curvlinalg"]["layers"], after["curvlinalg"]["layers"]):
        assert old.keys() == new.keys() == {"momentum_weight", "momentum_bias"}
        assert all(torch.equal(old[key], new[key]) for key in old)
    if fisher_batch == "independent":
        for (a0, e0), (a1, e1) in zip(
            state["curvlinalg"]["extra"]["fisher"]["pairs"],
            after["curvlinalg"]["extra"]["fisher"]["pairs"],
        ):
            assert torch.equal(a0, a1) and torch.equal(e0, e1)
    # A finite step afterwards works.
    train_step(model, opt, *make_batch(3))
    assert opt.steps == 2 and torch.isfinite(parameters_vector(model)).all()


@pytest.mark.parametrize("kind", ["mc", "exact"])
def test_state_dict_round_trip(kind: str) -> None:
    model = make_model()
    opt = NaturalGradient(
        model,
        lr=LR,
        damping=LAMBDA,
        fisher=kind,
        momentum=0.9,
        weight_decay=1e-3,
        fisher_batch="independent",
        refresh_every=2,
        seed=11,
    )
    for k in range(3):
        train_step(model, opt, *make_batch(30 + k))
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    twin = make_model(seed=99)
    twin.load_state_dict(saved_model)
    twin_opt = NaturalGradient(
        twin,
        lr=1.0,
        damping=1.0,
        fisher=kind,
        momentum=0.9,
        weight_decay=1e-3,
        fisher_batch="independent",
        refresh_every=2,
        seed=0,
    )
    twin_opt.load_state_dict(saved_opt)
    assert twin_opt.steps == 3 and twin_opt.param_groups[0]["damping"] == LAMBDA
    for k in range(3):
        batch = make_batch(40 + k)
        train_step(model, opt, *batch)
        train_step(twin, twin_opt, *batch)
        assert torch.equal(parameters_vector(model), parameters_vector(twin))


def test_damping_change_refactorises() -> None:
    model = make_model()
    opt = NaturalGradient(
        model, lr=LR, damping=LAMBDA, fisher="exact", fisher_batch="independent", refresh_every=10
    )
    x0, y0 = make_batch(1)
    jac0, p0 = jacobians(model, x0)
    fisher0 = dense_fisher(jac0, p0, "exact")
    train_step(model, opt, x0, y0)
    opt.param_groups[0]["damping"] = 2 * LAMBDA
    x1, y1 = make_batch(2)
    jac1, p1 = jacobians(model, x1)
    gradient = per_example(jac1, p1, y1).mean(0)
    expected = torch.linalg.solve(
        2 * LAMBDA * torch.eye(len(gradient), dtype=DTYPE) + fisher0, gradient
    )
    before = parameters_vector(model)
    train_step(model, opt, x1, y1)
    assert_close((before - parameters_vector(model)) / LR, expected)


def test_invalid_arguments() -> None:
    model = make_model()
    with pytest.raises(ValueError, match="damping"):
        NaturalGradient(model, lr=0.1, damping=0.0)
    with pytest.raises(ValueError, match="fisher"):
        NaturalGradient(model, lr=0.1, damping=0.1, fisher="gauss")
    with pytest.raises(ValueError, match="structure"):
        NaturalGradient(model, lr=0.1, damping=0.1, structure="diag")
    with pytest.raises(ValueError, match="fisher_batch"):
        NaturalGradient(model, lr=0.1, damping=0.1, fisher_batch="other")
    with pytest.raises(ValueError, match="refresh_every"):
        NaturalGradient(model, lr=0.1, damping=0.1, fisher_batch="same", refresh_every=5)
    with pytest.raises(ValueError, match="refresh_every"):
        NaturalGradient(model, lr=0.1, damping=0.1, fisher_batch="independent", refresh_every=0)


def test_missing_fisher_pass_raises() -> None:
    model = make_model()
    opt = NaturalGradient(model, lr=LR, damping=LAMBDA, fisher="mc", seed=0)
    x, y = make_batch(1)
    model.eval()  # the Fisher hook runs in training mode only
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="no Fisher captures"):
        opt.step()


# ------------------------------------------------------------------------- training


@pytest.mark.parametrize(
    ("kind", "structure", "fisher_batch"),
    [("mc", "full", "independent"), ("empirical", "layerwise", "same"), ("exact", "full", "same")],
)
def test_short_training_run_lowers_the_loss(kind: str, structure: str, fisher_batch: str) -> None:
    torch.manual_seed(0)
    centers = torch.randn(4, 10) * 2
    labels = torch.randint(0, 4, (256,))
    inputs = centers[labels] + torch.randn(256, 10)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = NaturalGradient(
        model,
        lr=0.3,
        damping=1.0,
        fisher=kind,
        structure=structure,
        momentum=0.5,
        fisher_batch=fisher_batch,
        refresh_every=5 if fisher_batch == "independent" else 1,
        seed=0,
    )
    with torch.no_grad():
        start = float(F.cross_entropy(model(inputs), labels))
    for _epoch in range(3):
        for index in range(0, 256, 32):
            train_step(model, opt, inputs[index : index + 32], labels[index : index + 32])
    with torch.no_grad():
        end = float(F.cross_entropy(model(inputs), labels))
    assert math.isfinite(end) and end < 0.3 * start, (start, end)
    assert opt.skipped_steps == 0


@pytest.mark.parametrize("kind", ["empirical", "exact"])
def test_summed_loss_preconditions_the_summed_gradient(kind: str) -> None:
    """``loss_reduction="sum"``: the gradient is ``Σ_i g_i`` (B times the mean), the Fisher
    stays ``(1/B) Σ g gᵀ``, so the step is B times the mean-loss step."""
    x, y = make_batch(60)
    steps = []
    for reduction in ("mean", "sum"):
        model = make_model()
        opt = NaturalGradient(model, lr=LR, damping=LAMBDA, fisher=kind, loss_reduction=reduction)
        before = parameters_vector(model)
        opt.zero_grad()
        F.cross_entropy(model(x), y, reduction=reduction).backward()
        opt.step()
        steps.append(before - parameters_vector(model))
    assert_close(steps[1], len(x) * steps[0], 1e-10)
