"""The torch optimizers on the models people train today: frozen and tied parameters,
attention, weight sharing, the first-order fallback, failure-safe steps and lifetimes.

Numbers are compared with dense references: gradients and per-example gradients from
``torch.func`` on a copy of the model, factors and Fishers written out as explicit sums,
explicit inverses.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from curvlinalg_torch import FOOF, KFAC, KLDWRM, NaturalGradient, capture
from torch import nn
from torch.func import functional_call, grad, vmap

from curvlinalg import NotPositiveDefiniteError, kron, wake

DTYPE = torch.float64
LR = 0.05

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "foof": lambda model, **kw: FOOF(model, lr=LR, damping=0.5, factor_dtype=DTYPE, **kw),
    "kfac-mc": lambda model, **kw: KFAC(
        model, lr=LR, damping=0.5, fisher="mc", seed=0, factor_dtype=DTYPE, **kw
    ),
    "kfac-empirical-exact": lambda model, **kw: KFAC(
        model,
        lr=LR,
        damping=0.5,
        fisher="empirical",
        damping_rule="exact",
        factor_dtype=DTYPE,
        **kw,
    ),
    "ng-mc": lambda model, **kw: NaturalGradient(
        model, lr=LR, damping=0.5, fisher="mc", seed=0, **kw
    ),
    "ng-exact-layerwise": lambda model, **kw: NaturalGradient(
        model, lr=LR, damping=0.5, fisher="exact", structure="layerwise", **kw
    ),
    "ng-empirical-independent": lambda model, **kw: NaturalGradient(
        model,
        lr=LR,
        damping=0.5,
        fisher="empirical",
        fisher_batch="independent",
        refresh_every=2,
        **kw,
    ),
    "kldwrm-so-mc": lambda model, **kw: KLDWRM(
        model, lr=LR, variant="so", damping=0.5, fisher="mc", seed=0, factor_dtype=DTYPE, **kw
    ),
    "kldwrm-q": lambda model, **kw: KLDWRM(
        model, lr=LR, variant="q", damping=0.5, fisher="empirical", factor_dtype=DTYPE, **kw
    ),
}


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3)
    ).to(DTYPE)


def data(batch: int = 8, seed: int = 1, width: int = 4, classes: int = 3):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, width, generator=generator, dtype=DTYPE)
    return x, torch.randint(0, classes, (batch,), generator=generator)


def train_step(optimizer, model, x, y) -> None:
    optimizer.zero_grad()
    F.cross_entropy(model(*x) if isinstance(x, tuple) else model(x), y).backward()
    optimizer.step()


def reference_grads(model: nn.Module, x, y) -> dict[str, torch.Tensor]:
    """``∂L/∂θ`` of the mean cross-entropy by ``torch.func.grad`` on the named parameters."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    inputs = x if isinstance(x, tuple) else (x,)

    def loss(values):
        return F.cross_entropy(functional_call(model, values, inputs), y)

    with paused(model):
        return grad(loss)(params)


@contextmanager
def paused(model: nn.Module) -> Iterator[None]:
    """No optimizer records (or runs its Fisher hook) during a reference computation."""
    owners = {id(c): c for m in model.modules() if (c := capture._owner(m)) is not None}
    for owner in owners.values():
        owner.enabled = False
    try:
        yield
    finally:
        for owner in owners.values():
            owner.enabled = True


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# --------------------------------------------------------------------------------------
# 1. Frozen parameters
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_frozen_parameters_stay_bit_identical(name: str):
    """Layer 0 frozen before construction (not captured), layer 2's weight frozen after
    (its trainable bias falls back to SGD with its exact gradient), layer 4's bias frozen
    before (its weight is preconditioned, the bias stays)."""
    model = mlp()
    for p in model[0].parameters():
        p.requires_grad_(False)
    model[4].bias.requires_grad_(False)
    optimizer = OPTIMIZERS[name](model)
    assert [layer.name for layer in optimizer.layers] == ["2", "4"]
    model[2].weight.requires_grad_(False)
    frozen = ["0.weight", "0.bias", "2.weight", "4.bias"]
    start = snapshot(model)
    for seed in (1, 2, 3):
        x, y = data(seed=seed)
        before = snapshot(model)
        expected_bias = before["2.bias"] - LR * reference_grads(model, x, y)["2.bias"]
        train_step(optimizer, model, x, y)
        torch.testing.assert_close(model[2].bias.detach(), expected_bias, rtol=1e-12, atol=1e-14)
        assert not torch.equal(model[4].weight.detach(), before["4.weight"])
    for key in frozen:
        assert torch.equal(dict(model.named_parameters())[key].detach(), start[key]), key


def test_frozen_parameters_stay_in_the_qe_inner_loop():
    model = mlp()
    model[4].bias.requires_grad_(False)
    optimizer = KLDWRM(
        model,
        lr=LR,
        variant="qe",
        fisher="empirical",
        inner_steps=2,
        capacity=2,
        factor_dtype=DTYPE,
    )
    model[2].weight.requires_grad_(False)
    start = snapshot(model)
    for seed in (1, 2):
        x, y = data(seed=seed)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step(lambda x=x: model(x))
    after = snapshot(model)
    for key in ("2.weight", "4.bias"):
        assert torch.equal(after[key], start[key]), key
    for key in ("0.weight", "2.bias", "4.weight"):
        assert not torch.equal(after[key], start[key]), key


# --------------------------------------------------------------------------------------
# 2./3. Every parameter with a gradient is updated by exactly one rule (attention included)
# --------------------------------------------------------------------------------------


class Mixed(nn.Module):
    """Embedding → TransformerEncoderLayer (attention, LayerNorms, Linear on (B, T, d)),
    a Conv2d branch, a LayerNorm and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 8)
        self.encoder = nn.TransformerEncoderLayer(
            8, 2, dim_feedforward=6, dropout=0.0, batch_first=True
        )
        self.conv = nn.Conv2d(1, 2, 3)
        self.norm = nn.LayerNorm(8 + 8)
        self.head = nn.Linear(16, 3)

    def forward(self, tokens: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        text = self.encoder(self.embed(tokens)).mean(1)
        picture = torch.tanh(self.conv(image)).flatten(1)
        return self.head(self.norm(torch.cat([text, picture], 1)))


def mixed_batch(seed: int, batch: int = 6):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 7, (batch, 5), generator=generator)
    image = torch.randn(batch, 1, 4, 4, generator=generator, dtype=DTYPE)
    return (tokens, image), torch.randint(0, 3, (batch,), generator=generator)


def layer_inputs(model: nn.Module, modules: list[nn.Module], x) -> list[torch.Tensor]:
    """Each module's input rows ``(B, T, d_in[+1])`` (conv: unfolded patches), by hooks on a
    plain forward."""
    seen: list[torch.Tensor] = [None] * len(modules)  # type: ignore[list-item]
    handles = []
    for position, module in enumerate(modules):

        def hook(module, args, output, position=position):
            inputs = args[0].detach()
            if isinstance(module, nn.Conv2d):
                rows = F.unfold(inputs, module.kernel_size).mT
            else:
                rows = inputs if inputs.ndim == 3 else inputs[:, None]
            ones = torch.ones(*rows.shape[:-1], 1, dtype=rows.dtype)
            seen[position] = torch.cat([rows, ones], -1) if module.bias is not None else rows

        handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(*x)
    for handle in handles:
        handle.remove()
    return seen


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_parameter_with_a_gradient_is_updated_by_exactly_one_rule(name: str):
    torch.manual_seed(0)
    model = Mixed().to(DTYPE)
    optimizer = OPTIMIZERS[name](model)
    captured = {layer.name for layer in optimizer.layers}
    # out_proj is read, not called, by the attention: not captured.
    assert captured == {"encoder.linear1", "encoder.linear2", "conv", "head"}
    modules = dict(model.named_modules())
    for seed in (1, 2):
        x, y = mixed_batch(seed)
        before = snapshot(model)
        grads = reference_grads(model, x, y)
        inputs = layer_inputs(model, [modules[n] for n in sorted(captured)], x)
        train_step(optimizer, model, x, y)
        after = snapshot(model)
        for key, g in grads.items():
            owner = key.rsplit(".", 1)[0]
            if owner in captured:
                assert not torch.equal(after[key], before[key]), key
                sgd = before[key] - LR * g
                assert not torch.allclose(after[key], sgd, rtol=1e-6, atol=1e-9), key
            else:
                # The fallback (momentum SGD, μ = 0): exactly −lr·∂L/∂θ, applied once.
                torch.testing.assert_close(
                    after[key], before[key] - LR * g, rtol=1e-12, atol=1e-14, msg=key
                )
        if name == "foof":
            # The preconditioned rule, densely: ∇W (A + λI)⁻¹ with A = Σ_{i,t} a aᵀ / B.
            for layer_name, a in zip(sorted(captured), inputs):
                module = modules[layer_name]
                rows = a.reshape(-1, a.shape[-1])
                factor = rows.T @ rows / a.shape[0]
                gradient = grads[f"{layer_name}.weight"].reshape(module.weight.shape[0], -1)
                gradient = torch.cat([gradient, grads[f"{layer_name}.bias"][:, None]], 1)
                if seed == 2:
                    factor = 0.95 * previous[layer_name] + 0.05 * factor
                eye = torch.eye(len(factor), dtype=DTYPE)
                step = gradient @ torch.linalg.inv(factor + 0.5 * eye)
                got = torch.cat(
                    [
                        (before[f"{layer_name}.weight"] - after[f"{layer_name}.weight"]).reshape(
                            step.shape[0], -1
                        ),
                        (before[f"{layer_name}.bias"] - after[f"{layer_name}.bias"])[:, None],
                    ],
                    1,
                )
                torch.testing.assert_close(got, LR * step, rtol=1e-10, atol=1e-13)
            previous = {n: optimizer.factor(n, "A") for n in captured}


def test_a_captured_layer_whose_hook_never_fires_falls_back():
    """Naming ``out_proj`` explicitly: its hook never fires, its autograd gradient is used."""
    torch.manual_seed(0)
    model = Mixed().to(DTYPE)
    out_proj = model.encoder.self_attn.out_proj
    optimizer = FOOF(model, lr=LR, damping=0.5, layers=[out_proj, model.head])
    x, y = mixed_batch(3)
    before = snapshot(model)
    grads = reference_grads(model, x, y)
    train_step(optimizer, model, x, y)
    for key in ("encoder.self_attn.out_proj.weight", "encoder.self_attn.out_proj.bias"):
        expected = before[key] - LR * grads[key]
        torch.testing.assert_close(dict(model.named_parameters())[key].detach(), expected)


# --------------------------------------------------------------------------------------
# 4. Tied weights
# --------------------------------------------------------------------------------------


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(6, 4)
        self.hidden = nn.Linear(4, 4)
        self.head = nn.Linear(4, 6, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(self.embed(tokens))))


@pytest.mark.parametrize("name", ["foof", "kfac-mc", "ng-exact-layerwise", "kldwrm-q"])
def test_tied_weight_gets_the_gradient_of_every_use(name: str):
    torch.manual_seed(0)
    model = TiedLM().to(DTYPE)
    optimizer = OPTIMIZERS[name](model)
    assert [layer.name for layer in optimizer.layers] == ["hidden"]
    tokens = torch.randint(0, 6, (8,))
    y = torch.randint(0, 6, (8,))
    before = model.embed.weight.detach().clone()
    total = reference_grads(model, tokens, y)["embed.weight"]  # both uses
    train_step(optimizer, model, tokens, y)
    torch.testing.assert_close(model.embed.weight.detach(), before - LR * total)


def test_tied_layer_named_in_layers_is_refused():
    model = TiedLM()
    with pytest.raises(ValueError, match=r"embed\.weight and head\.weight.*tied"):
        FOOF(model, lr=LR, damping=0.5, layers=[model.head])


# --------------------------------------------------------------------------------------
# 5. Weight sharing
# --------------------------------------------------------------------------------------


class Shared(nn.Module):
    """One Linear applied twice per forward (its calls are positions of the same examples)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


def shared_blocks(grads: dict[str, torch.Tensor], lead: int) -> list[torch.Tensor]:
    """``[W | b]`` of inner and head, flattened, from (per-example) gradients."""
    return [
        torch.cat([grads[f"{n}.weight"], grads[f"{n}.bias"][..., None]], -1).reshape(lead, -1)
        for n in ("inner", "head")
    ]


def test_weight_sharing_foof_and_natural_gradient_equal_dense_references():
    torch.manual_seed(0)
    x, y = data(batch=6, seed=4)
    model = Shared().to(DTYPE)
    # FOOF: A = Σ_i Σ_calls a aᵀ / B (the calls are positions), ∇W from torch.func.
    foof_model = copy.deepcopy(model)
    foof = FOOF(foof_model, lr=LR, damping=0.5, factor_dtype=DTYPE)
    first = torch.cat([x, torch.ones(6, 1, dtype=DTYPE)], 1)
    with torch.no_grad():
        second = torch.cat([torch.tanh(model.inner(x)), torch.ones(6, 1, dtype=DTYPE)], 1)
    factor = (first.T @ first + second.T @ second) / 6
    gradient = shared_blocks(reference_grads(model, x, y), 1)[0].reshape(4, 5)
    expected = gradient @ torch.linalg.inv(factor + 0.5 * torch.eye(5, dtype=DTYPE))
    before = torch.cat([model.inner.weight, model.inner.bias[:, None]], 1).detach()
    train_step(foof, foof_model, x, y)
    after = torch.cat([foof_model.inner.weight, foof_model.inner.bias[:, None]], 1).detach()
    torch.testing.assert_close(before - after, LR * expected, rtol=1e-10, atol=1e-13)
    # Natural gradient, empirical Fisher: per-example gradients through both calls.
    ng_model = copy.deepcopy(model)
    ng = NaturalGradient(ng_model, lr=LR, damping=0.5, fisher="empirical")
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(values, xi, yi):
        return F.cross_entropy(functional_call(model, values, (xi[None],)), yi[None])

    with paused(ng_model):
        per_example = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    g = torch.cat(shared_blocks(per_example, 6), 1)  # (B, D)
    fisher = g.T @ g / 6
    mean = g.mean(0)
    step = torch.linalg.solve(fisher + 0.5 * torch.eye(len(fisher), dtype=DTYPE), mean)
    start = torch.cat(shared_blocks(params, 1), 1)[0]
    train_step(ng, ng_model, x, y)
    end = torch.cat(shared_blocks(snapshot(ng_model), 1), 1)[0]
    torch.testing.assert_close(start - end, LR * step, rtol=1e-10, atol=1e-13)


# --------------------------------------------------------------------------------------
# 6. step() without a fresh backward
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_step_without_a_new_backward_is_refused(name: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3)).to(DTYPE)
    optimizer = OPTIMIZERS[name](model)
    with pytest.raises(RuntimeError, match="without a new forward and backward"):
        optimizer.step()
    x, y = data()
    train_step(optimizer, model, x, y)
    before, steps = snapshot(model), optimizer.steps
    with pytest.raises(RuntimeError, match="without a new forward and backward"):
        optimizer.step()
    assert optimizer.steps == steps
    for key, value in snapshot(model).items():
        assert torch.equal(value, before[key])
    train_step(optimizer, model, x, y)
    assert optimizer.steps == steps + 1


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_gradient_accumulation_over_micro_batches_is_refused(name: str):
    """Two forward/backward passes before one step (gradient accumulation) would make the
    second micro-batch's calls positions of the first's examples: refused loudly, with the
    model, the layer states and every .grad untouched; one forward with weight sharing
    (several calls before the backward) and the next ordinary step still work."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3)).to(DTYPE)
    optimizer = OPTIMIZERS[name](model)
    x, y = data()
    train_step(optimizer, model, x, y)
    before, steps, saved = snapshot(model), optimizer.steps, state_copy(optimizer)
    optimizer.zero_grad()
    for part in (slice(0, 4), slice(4, 8)):
        (F.cross_entropy(model(x[part]), y[part]) / 2).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    with pytest.raises(RuntimeError, match="gradient accumulation over micro-batches"):
        optimizer.step()
    assert optimizer.steps == steps
    assert_same_state(optimizer, saved)
    for key, value in snapshot(model).items():
        assert torch.equal(value, before[key])
    for n, p in model.named_parameters():
        if n in grads:
            assert torch.equal(p.grad, grads[n]), n
    # Two calls in one forward, one backward: not accumulation.
    optimizer.zero_grad()
    F.cross_entropy(model(x[:4]) + model(x[4:]), y[:4]).backward()
    optimizer.step()
    train_step(optimizer, model, x, y)
    assert optimizer.steps == steps + 2


# --------------------------------------------------------------------------------------
# 7. Failure-safe steps
# --------------------------------------------------------------------------------------


def state_copy(optimizer) -> list[dict[str, torch.Tensor]]:
    return [
        {k: v.clone() for k, v in optimizer.layer_state(i).items()}
        for i in range(len(optimizer.layers))
    ]


def assert_same_state(optimizer, saved) -> None:
    for index, entries in enumerate(saved):
        live = optimizer.layer_state(index)
        assert live.keys() == entries.keys()
        for key, value in entries.items():
            assert torch.equal(live[key], value), (index, key)


@pytest.mark.parametrize(
    "options",
    [
        {"cls": FOOF},
        {"cls": KFAC, "fisher": "empirical"},
        {"cls": KFAC, "fisher": "mc", "damping_rule": "exact", "seed": 0},
        {"cls": KLDWRM, "variant": "q", "fisher": "empirical"},
    ],
    ids=["foof", "kfac", "kfac-mc-exact", "kldwrm-q"],
)
def test_overflowing_factor_skips_the_step_and_keeps_the_state(options):
    options = dict(options)
    cls = options.pop("cls")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))  # float32
    optimizer = cls(model, lr=0.01, damping=0.5, momentum=0.5, **options)
    x, y = data()
    x = x.float()
    train_step(optimizer, model, x, y)
    saved, params = state_copy(optimizer), snapshot(model)
    # Finite inputs whose Gram aᵀa overflows float32.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_step(optimizer, model, x * 1e20, y)
    assert optimizer.skipped_steps == 1 and optimizer.steps == 1
    assert any("skipped" in str(w.message) for w in caught)
    assert_same_state(optimizer, saved)
    for key, value in snapshot(model).items():
        assert torch.equal(value, params[key])
    train_step(optimizer, model, x, y)  # and the optimizer lives on
    assert optimizer.steps == 2
    assert all(torch.isfinite(v).all() for v in optimizer.layer_state(0).values())


@pytest.mark.parametrize("name", ["foof", "kfac-mc", "ng-mc", "kldwrm-so-mc"])
def test_bad_damping_is_refused_before_anything_changes(name: str):
    model = mlp()
    optimizer = OPTIMIZERS[name](model)
    x, y = data()
    train_step(optimizer, model, x, y)
    saved, params = state_copy(optimizer), snapshot(model)
    generator = getattr(optimizer, "generator", None)
    rng = generator.get_state() if generator is not None else None
    for bad in (-1.0, 0.0, float("nan")):
        optimizer.param_groups[0]["damping"] = bad
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with pytest.raises(ValueError, match=r"param_groups\[0\]\['damping'\]"):
            optimizer.step()
        assert_same_state(optimizer, saved)
        for key, value in snapshot(model).items():
            assert torch.equal(value, params[key])
        if rng is not None:
            assert torch.equal(generator.get_state(), rng)
    optimizer.param_groups[0]["damping"] = 0.5
    train_step(optimizer, model, x, y)
    assert optimizer.steps == 2


def test_core_errors_are_reraised_with_the_layer_name(monkeypatch):
    def indefinite(*args, **kwargs):
        raise NotPositiveDefiniteError("A⊗G + damping·I is not positive definite")

    def indefinite_q(*args, **kwargs):
        raise NotPositiveDefiniteError("a1 is not positive definite")

    x, y = data()
    model = mlp()
    optimizer = KFAC(model, lr=LR, damping=0.5, fisher="empirical", damping_rule="exact")
    monkeypatch.setattr(kron, "eigen_solve", indefinite)
    with pytest.raises(NotPositiveDefiniteError, match=r"layer '0': A⊗G \+ damping"):
        train_step(optimizer, model, x, y)
    assert optimizer.steps == 0 and all(not optimizer.layer_state(i) for i in range(3))
    model = mlp()
    optimizer = KLDWRM(model, lr=LR, variant="q", fisher="empirical")
    monkeypatch.setattr(wake, "kron_q_step", indefinite_q)
    with pytest.raises(NotPositiveDefiniteError, match=r"layer '0': a1 is not positive"):
        train_step(optimizer, model, x, y)


def test_load_state_dict_of_other_shapes_is_refused_naming_the_layer():
    x, y = data()
    model = mlp()
    optimizer = KFAC(model, lr=LR, damping=0.5, fisher="empirical", momentum=0.9)
    train_step(optimizer, model, x, y)
    torch.manual_seed(0)
    other = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    with pytest.raises(ValueError, match="layer '0'"):
        KFAC(other, lr=LR, damping=0.5, fisher="empirical").load_state_dict(optimizer.state_dict())
    scaled = nn.Sequential(nn.Linear(4, 5), Scale((5,)), nn.Linear(5, 3)).to(DTYPE)
    saved = FOOF(scaled, lr=LR, damping=0.5, momentum=0.9)
    train_step(saved, scaled, x, y)
    broadcast = nn.Sequential(nn.Linear(4, 5), Scale((1, 5)), nn.Linear(5, 3)).to(DTYPE)
    with pytest.raises(ValueError, match="parameter '1.scale'"):
        FOOF(broadcast, lr=LR, damping=0.5, momentum=0.9).load_state_dict(saved.state_dict())


class Scale(nn.Module):
    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def test_natural_gradient_refuses_parameters():
    with pytest.raises(TypeError, match="takes the model"):
        NaturalGradient(list(mlp().parameters()), lr=LR, damping=0.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="takes the model"):
        FOOF([{"params": list(mlp().parameters())}], lr=LR, damping=0.5)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# 8. Lifetime
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["kfac-mc", "ng-exact-layerwise"])
def test_a_deleted_optimizer_releases_its_hooks(name: str):
    model = mlp()
    optimizer = OPTIMIZERS[name](model)
    x, y = data()
    train_step(optimizer, model, x, y)
    with pytest.raises(ValueError, match=r"remove_hooks\(\)"):
        OPTIMIZERS[name](model)
    del optimizer  # released at once (no reference cycle holds it), no gc.collect() needed
    assert all(not m._forward_hooks for m in model.modules())
    again = OPTIMIZERS[name](model)
    train_step(again, model, x, y)
    assert again.steps == 1


# --------------------------------------------------------------------------------------
# 9. The fallback optimizer
# --------------------------------------------------------------------------------------


def test_other_optimizer_is_adamw_with_its_state_in_the_state_dict():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3)).to(DTYPE)
    kwargs = {"betas": (0.8, 0.9), "weight_decay": 0.1}
    make = lambda m: KFAC(  # noqa: E731
        m,
        lr=LR,
        damping=0.5,
        fisher="empirical",
        other_lr=0.01,
        other_optimizer=torch.optim.AdamW,
        other_optimizer_kwargs=kwargs,
    )
    optimizer = make(model)
    shadow = [p.detach().clone().requires_grad_(True) for p in model[1].parameters()]
    reference = torch.optim.AdamW(shadow, lr=0.01, **kwargs)
    for seed in (1, 2):
        x, y = data(seed=seed)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for s, p in zip(shadow, model[1].parameters()):
            s.grad = p.grad.clone()
        optimizer.step()
        reference.step()
        for s, p in zip(shadow, model[1].parameters()):
            torch.testing.assert_close(p.detach(), s.detach(), rtol=1e-14, atol=0)
    # Round trip: a resumed copy takes the same next step, AdamW moments included.
    resumed_model = copy.deepcopy(model)
    resumed = make(resumed_model)
    resumed.load_state_dict(optimizer.state_dict())
    assert resumed.other_optimizer.state_dict()["state"]  # moments were restored
    x, y = data(seed=3)
    train_step(optimizer, model, x, y)
    train_step(resumed, resumed_model, x, y)
    for (key, a), b in zip(snapshot(model).items(), snapshot(resumed_model).values()):
        assert torch.equal(a, b), key
    with pytest.raises(TypeError, match="torch.optim.Optimizer class"):
        FOOF(mlp(), lr=LR, damping=0.5, other_optimizer=torch.optim.AdamW(shadow))
