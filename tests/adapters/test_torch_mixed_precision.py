"""Mixed precision for the curvature optimizers and Laplace (:mod:`curvlinalg_torch.amp`).

The reference of every comparison is a float32 run of the same optimizer on the same model,
batches and seed (the float32 steps themselves are checked against NumPy / ``torch.func``
references in the per-class test modules). Tolerances:

* ``torch.autocast("cpu", dtype=torch.bfloat16)`` and a bfloat16 model: bfloat16 has an 8-bit
  significand (``eps = 2⁻⁷``), so captures, logits and errors carry relative errors of a few
  ``2⁻⁹``; the factors and solves are float32. The total update ``Δθ`` of :data:`STEPS` steps
  of each captured weight must agree with float32's to ``‖Δ − Δ₃₂‖ ≤ 3e-2·‖Δ₃₂‖`` (measured
  under autocast: at most 1.6e-2). A bfloat16 model's parameters are also rounded after every
  update, so there the bound on ``Δ`` adds the rounding of each step (``STEPS·2⁻⁸·‖θ‖``), and
  the float32 momentum buffers — the steps before rounding — must agree with float32's to
  ``3e-2`` relative (measured: at most 1.5e-2).
* ``GradScaler`` with a power-of-two scale (2¹⁰): the scaled backward is the unscaled one
  times ``S`` operation by operation (multiplying by a power of two commutes with rounding
  unless something overflows or underflows), and the unscaling multiplies by ``1/S`` exactly,
  so the parameters, factors and buffers must be **bit-identical** to the unscaled run's.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from curvlinalg_torch import EKFAC, FOOF, KFAC, KLDWRM, Laplace, NaturalGradient
from torch import Tensor, nn

pytestmark = pytest.mark.filterwarnings(
    # GradScaler's own notice that handing itself to step(grad_scaler=...) is deprecated.
    "ignore:GradScaler is going to stop passing itself:FutureWarning"
)

STEPS = 2
SCALE = 2.0**10
CLASSES = 3

# Deterministic Fisher types (the MC Fisher's sampled labels may flip between the float32 and
# bfloat16 logits, which is not a precision question); momentum and weight decay on, so that
# the buffers are exercised.
OPTIMIZERS: dict[str, Callable[[nn.Module], Any]] = {
    "foof": lambda m: FOOF(m, lr=0.1, damping=0.1, momentum=0.9, weight_decay=1e-3),
    "kfac": lambda m: KFAC(
        m, lr=0.1, damping=0.1, fisher="empirical", momentum=0.9, weight_decay=1e-3
    ),
    "ekfac": lambda m: EKFAC(m, lr=0.1, damping=0.1, fisher="empirical", momentum=0.9),
    "natural_gradient": lambda m: NaturalGradient(
        m, lr=0.1, damping=0.1, fisher="exact", momentum=0.9, weight_decay=1e-3
    ),
    "natural_gradient_plain": lambda m: NaturalGradient(
        m, lr=0.1, damping=0.1, fisher="empirical", structure="layerwise"
    ),
    "kldwrm_so": lambda m: KLDWRM(m, lr=0.1, variant="so", fisher="empirical", momentum=0.9),
    "kldwrm_qe": lambda m: KLDWRM(m, lr=0.1, variant="qe", fisher="empirical", inner_steps=2),
}
FACTOR_STATES = {"foof", "kfac", "ekfac", "kldwrm_so", "kldwrm_qe"}


class SequenceNet(nn.Module):
    """A transformer-ish toy: a position-wise ``Linear`` on ``(B, T, d)`` (captures with a
    ``T`` axis), mean pooling, a ``LayerNorm`` (a fallback parameter) and two ``Linear``."""

    def __init__(self, norm: bool = True) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 8)
        self.norm = nn.LayerNorm(8) if norm else nn.Identity()
        self.hidden = nn.Linear(8, 8)
        self.head = nn.Linear(8, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.embed(x)).mean(1)
        return self.head(torch.tanh(self.hidden(self.norm(h))))


def make_model(norm: bool = True, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = SequenceNet(norm)
    # Start every run from bfloat16-representable parameters, so that a bfloat16 model and
    # its float32 reference begin at the same point.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return model.to(dtype)


def make_batches(dtype: torch.dtype = torch.float32) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        x = torch.randn(12, 4, 5, generator=generator).to(torch.bfloat16).float()
        out.append((x.to(dtype), torch.randint(0, CLASSES, (12,), generator=generator)))
    return out


def train(
    name: str,
    model: nn.Module,
    batches: list[tuple[Tensor, Tensor]],
    *,
    autocast: bool = False,
    scaler: torch.amp.GradScaler | None = None,
    loss_factor: float = 1.0,
) -> Any:
    """``len(batches)`` steps of optimizer ``name``; returns the optimizer. ``loss_factor``
    multiplies the (scaled) loss of the last batch (``2¹²⁰`` makes its gradients overflow)."""
    opt = OPTIMIZERS[name](model)
    for index, (x, y) in enumerate(batches):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(x), y)
        args = (lambda x=x: model(x),) if name == "kldwrm_qe" else ()
        if scaler is None:
            loss.backward()
            opt.step(*args)
        else:
            scaled = scaler.scale(loss)
            if index == len(batches) - 1:
                scaled = scaled * loss_factor
            scaled.backward()
            scaler.step(opt, *args)
            scaler.update()
    return opt


def weights(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def assert_same(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    assert got.keys() == want.keys()
    for key in got:
        assert torch.equal(got[key], want[key]), key


def captured_weights(opt: Any) -> list[str]:
    names = {id(p): n for n, p in opt.model.named_parameters()}
    return [names[id(layer.module.weight)] for layer in opt.layers]


def assert_update_close(
    name: str, start: dict[str, Tensor], got: dict[str, Tensor], want: dict[str, Tensor], ulps=0
) -> None:
    """``‖Δ − Δ₃₂‖ ≤ 3e-2·‖Δ₃₂‖ + ulps·2⁻⁸·‖θ‖`` for the total update of ``name``."""
    delta, delta32 = got[name] - start[name], want[name] - start[name]
    assert float(delta32.norm()) > 0
    error = float((delta - delta32).norm())
    bound = 3e-2 * float(delta32.norm()) + ulps * 2.0**-8 * float(want[name].norm())
    assert error <= bound, (name, error, bound)


def momentum(state: dict[str, Tensor]) -> Tensor | None:
    """A layer's momentum buffer(s), flattened into one vector (``None`` without momentum)."""
    keys = ("momentum_buffer", "momentum_weight", "momentum_bias")
    parts = [state[key].reshape(-1) for key in keys if key in state]
    return torch.cat(parts) if parts else None


def all_state(opt: Any) -> list[Tensor]:
    """Every tensor of the optimizer's state (layer states, SGD buffers, KLD-WRM's ring)."""
    tensors = []

    def walk(value: Any) -> None:
        if isinstance(value, Tensor):
            tensors.append(value.clone())
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                walk(value[key])
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    walk(opt.state_dict())
    return tensors


# ------------------------------------------------------------------ autocast, bf16 models


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_autocast_bfloat16_matches_float32(name: str) -> None:
    # Under autocast the first layer's a is the float32 input while every e (and the later
    # a) is bfloat16: NaturalGradient raised "dtype mismatch" here before the captures were
    # cast to factor_dtype.
    batches = make_batches()
    model, reference = make_model(), make_model()
    start = weights(model)
    opt = train(name, model, batches, autocast=True)
    train(name, reference, batches)
    assert opt.steps == STEPS and opt.skipped_steps == 0
    got, want = weights(model), weights(reference)
    for weight in captured_weights(opt):
        assert_update_close(weight, start, got, want)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    if name in FACTOR_STATES:
        for index in range(len(opt.layers)):
            assert opt.factor(index).dtype == torch.float32


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_bfloat16_model_float32_factors(name: str) -> None:
    # model.to(bfloat16): the captures are cast up (the core's Cholesky has no bfloat16
    # kernel), the update is cast down to the parameters' dtype.
    model, reference = make_model(dtype=torch.bfloat16), make_model()
    start = weights(model)
    assert_same(start, weights(reference))
    opt = train(name, model, make_batches(torch.bfloat16))
    ref = train(name, reference, make_batches())
    assert opt.steps == STEPS and opt.skipped_steps == 0
    assert opt.factor_dtype == torch.float32
    got, want = weights(model), weights(reference)
    for weight in captured_weights(opt):
        assert_update_close(weight, start, got, want, ulps=STEPS)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    for index, layer in enumerate(opt.layers):
        state = opt.layer_state(index)
        buffer, buffer32 = momentum(state), momentum(ref.layer_state(index))
        assert (buffer is None) == (buffer32 is None)
        if buffer is not None:
            error = float((buffer - buffer32).norm())
            assert error <= 3e-2 * float(buffer32.norm()), (layer.name, error)
        for key in ("A", "G", "momentum_buffer", "momentum_weight", "momentum_bias"):
            if key in state:
                assert state[key].dtype == torch.float32, (layer.name, key)
        if name in FACTOR_STATES:
            assert opt.factor(index).dtype == torch.float32


def test_factor_dtype_float64_for_bfloat16_model() -> None:
    model = make_model(dtype=torch.bfloat16)
    opt = KFAC(model, lr=0.1, damping=0.1, fisher="empirical", factor_dtype=torch.float64)
    x, y = make_batches(torch.bfloat16)[0]
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert all(opt.factor(i).dtype == torch.float64 for i in range(len(opt.layers)))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


# ------------------------------------------------------------------ GradScaler


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_step_takes_the_grad_scaler(name: str) -> None:
    # GradScaler.step hands itself over (and does not unscale or skip by itself) exactly when
    # the optimizer says _step_supports_amp_scaling and its step has a grad_scaler parameter.
    opt = OPTIMIZERS[name](make_model())
    assert opt._step_supports_amp_scaling is True
    assert "grad_scaler" in inspect.signature(opt.step).parameters


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "autocast"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_grad_scaler_step_is_the_unscaled_step(name: str, autocast: bool) -> None:
    batches = make_batches()
    model, reference = make_model(), make_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    with pytest.warns(FutureWarning, match="stop passing itself"):
        opt = train(name, model, batches, autocast=autocast, scaler=scaler)
    ref = train(name, reference, batches, autocast=autocast)
    assert opt.steps == STEPS and opt.skipped_steps == 0
    assert scaler.get_scale() == SCALE  # no overflow, growth_interval not reached
    for (key, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), key
    for got, want in zip(all_state(opt), all_state(ref)):
        assert torch.equal(got, want)


@pytest.mark.parametrize(
    ("name", "norm"),
    [(name, True) for name in sorted(OPTIMIZERS)]
    # Every parameter captured (no .grad anywhere): the base class's and NaturalGradient's step.
    + [("foof", False), ("natural_gradient", False), ("kldwrm_qe", False)],
)
def test_grad_scaler_overflow_skips_with_state_untouched(name: str, norm: bool) -> None:
    # The last backward overflows (its scaled loss times 2¹²⁰ is finite, its gradient 2¹³⁰
    # is not): the step is skipped with every state bit-identical, without a warning, and
    # scaler.update() halves the scale — also when every parameter is captured and no .grad
    # exists (the captures' inf check is reported to the scaler by the optimizer).
    batches = make_batches()
    model, reference = make_model(norm), make_model(norm)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    reference_scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        opt = train(name, model, batches, scaler=scaler, loss_factor=2.0**120)
    ref = train(name, reference, batches[:-1], scaler=reference_scaler)
    assert opt.skipped_steps == 1 and opt.steps == STEPS - 1
    assert scaler.get_scale() == SCALE / 2
    for (key, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), key
    got, want = all_state(opt), all_state(ref)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    # The next scaled step goes through at the reduced scale.
    x, y = batches[0]
    opt.zero_grad()
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    scaler.step(opt, *((lambda: model(x)),) if name == "kldwrm_qe" else ())
    scaler.update()
    assert opt.steps == STEPS


def test_grad_scaler_after_explicit_unscale() -> None:
    # scaler.unscale_(opt) first (e.g. to clip the fallback parameters' gradients): the step
    # still unscales the captured errors, once.
    batches = make_batches()[:1]
    model, reference = make_model(), make_model()
    opt = OPTIMIZERS["kfac"](model)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    x, y = batches[0]
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    scaler.unscale_(opt)
    with pytest.warns(FutureWarning):
        scaler.step(opt)
    scaler.update()
    train("kfac", reference, batches)
    for (key, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), key


def test_direct_step_with_grad_scaler_and_attribute_protocol() -> None:
    batches = make_batches()[:1]
    x, y = batches[0]
    # opt.step(grad_scaler=scaler) then scaler.update() is scaler.step's hand-over itself.
    model, reference = make_model(False), make_model(False)
    opt = OPTIMIZERS["foof"](model)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    opt.step(grad_scaler=scaler)
    scaler.update()
    train("foof", reference, batches)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)
    # The attribute protocol (grad_scale / found_inf set, no grad_scaler passed) would step on
    # scaled captures: refused.
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.grad_scale = torch.tensor(SCALE)
    opt.found_inf = torch.tensor(0.0)
    before = weights(model)
    with pytest.raises(RuntimeError, match="grad_scaler="):
        opt.step()
    assert_same(weights(model), before)


# ------------------------------------------------------------------ Laplace


@pytest.mark.parametrize("structure", ["woodbury", "kron"])
@pytest.mark.parametrize("mode", ["autocast", "bfloat16"])
def test_laplace_mixed_precision(structure: str, mode: str) -> None:
    x, y = make_batches()[0]
    reference = make_model()
    la32 = Laplace(reference, structure, prior_precision=1.0).fit((x, y))
    model = make_model(dtype=torch.bfloat16 if mode == "bfloat16" else torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
        la = Laplace(model, structure, prior_precision=1.0).fit(
            (x.to(torch.bfloat16), y) if mode == "bfloat16" else (x, y)
        )
    held = la.captures if structure == "woodbury" else la.factors
    assert all(t.dtype == torch.float32 for pair in held for t in pair)
    assert all(m.dtype == torch.float32 for m in la.map_blocks)
    # log evidence: bfloat16 logits and captures, float32 log det.
    got, want = float(la.log_marginal_likelihood()), float(la32.log_marginal_likelihood())
    assert abs(got - want) <= 2e-2 * abs(want), (got, want)
    samples = la.sample(2, torch.Generator().manual_seed(0))
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert all(value.dtype == dtypes[key] for key, value in samples.items())
