"""Tests of :mod:`curvlinalg_torch.capture` against brute-force references.

References never use the capture's own machinery: per-example gradients come from
``torch.func`` (``vmap`` of ``grad`` of the single-example loss), convolution patches from
explicit slicing of the padded input (not ``F.unfold``), output errors from ``autograd.grad``
of the summed loss with respect to the layer outputs.

The helpers at the top (``reference_*``) are shared with the optimizer tests.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from curvlinalg_torch import Capture, capture
from torch import nn
from torch.func import functional_call, grad, vmap

from curvlinalg import kron, woodbury

TOL = {torch.float32: 2e-5, torch.float64: 1e-11}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """Norm-wise relative error ``‖actual − expected‖ / ‖expected‖ ≤ tol``."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    error = (actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)
    assert error <= tol, f"relative error {float(error):.3g} > {tol:.3g}"


# --------------------------------------------------------------------------------------
# Shared brute-force references
# --------------------------------------------------------------------------------------


def reference_patches(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``(B, T, C_in·kh·kw)`` patches by explicit slicing (independent of ``F.unfold``)."""
    if isinstance(module.padding, str) or module.padding_mode != "zeros":
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
    else:
        ph, pw = module.padding
        x = F.pad(x, (pw, pw, ph, ph))
    kh, kw = module.kernel_size
    sh, sw = module.stride
    dh, dw = module.dilation
    height = (x.shape[2] - dh * (kh - 1) - 1) // sh + 1
    width = (x.shape[3] - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for i in range(height):
        for j in range(width):
            window = x[
                :,
                :,
                i * sh : i * sh + dh * (kh - 1) + 1 : dh,
                j * sw : j * sw + dw * (kw - 1) + 1 : dw,
            ]
            rows.append(window.reshape(x.shape[0], -1))
    return torch.stack(rows, dim=1)


def reference_a(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The core-convention ``a`` of a layer for its input ``x``, built by hand."""
    if isinstance(module, nn.Conv2d):
        a = reference_patches(module, x)
    else:
        a = x if x.ndim <= 3 else x.reshape(x.shape[0], -1, x.shape[-1])
    if module.bias is not None:
        a = torch.cat([a, torch.ones(*a.shape[:-1], 1, dtype=a.dtype)], dim=-1)
    return a


def per_example_reference(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, layers: list[nn.Module]
) -> list[torch.Tensor]:
    """``(B, d_out, d_in[+1])`` per-example gradients ``∇ℓ(f(x_i), y_i)`` by ``torch.func``."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    names = {id(p): name for name, p in model.named_parameters()}
    result = []
    for module in layers:
        weight = grads[names[id(module.weight)]]
        block = weight.reshape(weight.shape[0], weight.shape[1], -1)
        if module.bias is not None:
            block = torch.cat([block, grads[names[id(module.bias)]][:, :, None]], dim=2)
        result.append(block)
    return result


def layer_io(
    model: nn.Module, x: torch.Tensor, layers: list[nn.Module]
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Run ``model(x)`` recording each layer's input and (graph-connected) output."""
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []

    def record(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        inputs.append(args[0])
        outputs.append(out)

    handles = [m.register_forward_hook(record) for m in layers]
    try:
        logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return logits, inputs, outputs


def reference_errors(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, layers: list[nn.Module]
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """``(a, e, logits)``: hand-built ``a`` and the per-example errors ``e`` (gradient of the
    *summed* loss w.r.t. each layer output, i.e. of each example's own loss) in the core
    layout."""
    logits, inputs, outputs = layer_io(model, x, layers)
    loss = F.cross_entropy(logits, y, reduction="sum")
    grads = torch.autograd.grad(loss, outputs)
    a_list, e_list = [], []
    for module, xin, g in zip(layers, inputs, grads):
        a_list.append(reference_a(module, xin.detach()))
        if isinstance(module, nn.Conv2d):
            g = g.flatten(2).transpose(1, 2)
        elif g.ndim > 3:
            g = g.reshape(g.shape[0], -1, g.shape[-1])
        e_list.append(g)
    return a_list, e_list, logits.detach()


def tiny_net(dtype: torch.dtype = torch.float64, bias: bool = True, seed: int = 0) -> nn.Module:
    """Conv2d(2→3, 3×3, stride 1, pad 1) → ReLU → Flatten → Linear(48→4): the optimizers'
    test network (inputs ``(B, 2, 4, 4)``)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, bias=bias),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(48, 4, bias=bias),
    ).to(dtype)


# --------------------------------------------------------------------------------------
# Per-example gradients and captures
# --------------------------------------------------------------------------------------

CONV_VARIANTS = {
    "plain": {},
    "stride2-pad1": {"stride": 2, "padding": 1},
    "dilation2-pad2": {"dilation": 2, "padding": 2},
    "stride-dilation-rect": {"stride": (2, 1), "dilation": (1, 2), "padding": (1, 0)},
    "same": {"padding": "same"},
    "reflect": {"padding": 1, "padding_mode": "reflect"},
}


def conv_model(variant: str, bias: bool, dtype: torch.dtype) -> nn.Module:
    """1×1 conv → Tanh → conv ``variant`` → Tanh → Flatten → Linear: the variant's input
    requires grad, so its input-gradient path is checked through the first layer's ``e``."""
    torch.manual_seed(1)
    kernel = (3, 2) if variant == "same" else 3
    conv = nn.Conv2d(2, 3, kernel, bias=bias, **CONV_VARIANTS[variant])
    with torch.no_grad():
        out = conv(torch.zeros(1, 2, 7, 6))
    return nn.Sequential(
        nn.Conv2d(2, 2, 1, bias=bias),
        nn.Tanh(),
        conv,
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(math.prod(out.shape[1:]), 5, bias=bias),
    ).to(dtype)


@pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("variant", list(CONV_VARIANTS))
def test_per_example_gradients_conv_and_linear(variant: str, bias: bool, dtype: torch.dtype):
    model = conv_model(variant, bias, dtype)
    x = torch.randn(5, 2, 7, 6, dtype=dtype)
    y = torch.randint(0, 5, (5,))
    layers = [model[0], model[2], model[5]]
    expected = per_example_reference(model, x, y, layers)
    a_ref, e_ref, _ = reference_errors(model, x, y, layers)
    with Capture(model) as cap:
        F.cross_entropy(model(x), y).backward()
        actual = woodbury.per_example(cap.captures())
        for layer, a, e in zip(cap.layers, a_ref, e_ref):
            assert_close(layer.a, a, TOL[dtype])
            assert_close(layer.e, e, TOL[dtype])
            assert layer.a.dtype == dtype and layer.e.dtype == dtype
            # A convolution's gradient block comes from the native backward, not from a, e.
            rows_a, rows_e = a.reshape(-1, a.shape[-1]), e.reshape(-1, e.shape[-1])
            assert_close(layer.gradient(), rows_e.T @ rows_a / len(x), TOL[dtype])
            assert layer.rows == rows_a.shape[0]
    for got, want in zip(actual, expected):
        assert_close(got, want, 10 * TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_linear_with_positions(dtype: torch.dtype):
    """A Linear on (B, T, d) inputs: a is (B, T, d+1), g_i sums the positions."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Flatten(), nn.Linear(20, 3)).to(dtype)
    x = torch.randn(6, 5, 3, dtype=dtype)
    y = torch.randint(0, 3, (6,))
    expected = per_example_reference(model, x, y, [model[0], model[3]])
    with Capture(model) as cap:
        F.cross_entropy(model(x), y).backward()
        assert cap.layers[0].a.shape == (6, 5, 4) and cap.layers[0].e.shape == (6, 5, 4)
        actual = woodbury.per_example(cap.captures())
    for got, want in zip(actual, expected):
        assert_close(got, want, 10 * TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_factors_equal_dense_references(dtype: torch.dtype):
    """kron.factor of the captures equals Σ_{i,t} a aᵀ / (B·T) built from explicit patches."""
    model = conv_model("stride2-pad1", True, dtype)
    x = torch.randn(4, 2, 7, 6, dtype=dtype)
    y = torch.randint(0, 5, (4,))
    a_ref, e_ref, _ = reference_errors(model, x, y, [model[0], model[2], model[5]])
    with Capture(model) as cap:
        F.cross_entropy(model(x), y).backward()
        for layer, a, e in zip(cap.layers, a_ref, e_ref):
            rows_a = a.reshape(-1, a.shape[-1])
            rows_e = e.reshape(-1, e.shape[-1])
            dense_a = sum(torch.outer(r, r) for r in rows_a) / rows_a.shape[0]
            dense_g = sum(torch.outer(r, r) for r in rows_e) / rows_e.shape[0]
            assert_close(kron.factor(layer.a), dense_a, TOL[dtype])
            assert_close(kron.factor(layer.e), dense_g, TOL[dtype])


def test_mean_and_sum_reductions_give_the_same_errors():
    model = tiny_net()
    x = torch.randn(6, 2, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 4, (6,))
    results = {}
    for reduction in ("mean", "sum"):
        with Capture(model, loss_reduction=reduction) as cap:
            F.cross_entropy(model(x), y, reduction=reduction).backward()
            results[reduction] = [(layer.e, layer.gradient()) for layer in cap]
    _, e_ref, _ = reference_errors(model, x, y, [model[0], model[3]])
    for (e_mean, g_mean), (e_sum, g_sum), e in zip(results["mean"], results["sum"], e_ref):
        assert_close(e_mean, e, 1e-12)
        assert_close(e_sum, e, 1e-12)
        assert_close(g_sum, 6 * g_mean, 1e-12)
    with pytest.raises(ValueError, match="loss_reduction"):
        Capture(model, loss_reduction="batchmean")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# Gradients in .grad, the sampled backward, helpers
# --------------------------------------------------------------------------------------


def test_gradient_sums_over_calls_and_converts_dtype():
    model = tiny_net()
    x1, x2 = (
        torch.randn(3, 2, 4, 4, dtype=torch.float64),
        torch.randn(4, 2, 4, 4, dtype=torch.float64),
    )
    y1, y2 = torch.randint(0, 4, (3,)), torch.randint(0, 4, (4,))
    with Capture(model, loss_reduction="sum") as cap:
        (
            F.cross_entropy(model(x1), y1, reduction="sum")
            + F.cross_entropy(model(x2), y2, reduction="sum")
        ).backward()
        for layer in cap:
            assert layer.calls == 2 and layer.has_errors and not layer.has_sampled_errors
            rows_a = layer.a.reshape(-1, layer.d_in)
            rows_e = layer.e.reshape(-1, layer.d_out)
            assert_close(layer.gradient(), rows_e.T @ rows_a, 1e-12)
            assert layer.gradient(torch.float32).dtype == torch.float32
            assert torch.isfinite(layer.finite_sum())


def test_finite_sum_sees_non_finite_inputs_and_errors():
    model = tiny_net()
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    with Capture(model) as cap:
        logits = model(x)
        F.cross_entropy(logits, torch.randint(0, 4, (3,))).backward()
        assert all(torch.isfinite(layer.finite_sum()) for layer in cap)
        cap.layers[1]._calls[0].errors[0, 0] = float("nan")
        assert not torch.isfinite(cap.layers[1].finite_sum())
        assert torch.isfinite(cap.layers[0].finite_sum())
    x[0, 0, 0, 0] = float("inf")
    with Capture(model) as cap:
        F.cross_entropy(model(x), torch.randint(0, 4, (3,))).backward()
        assert not torch.isfinite(cap.layers[0].finite_sum())


def test_weight_grads_skipped_by_default_and_restored_on_request():
    model = tiny_net()
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 4, (5,))
    F.cross_entropy(model(x), y).backward()
    native = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with Capture(model) as cap:
        F.cross_entropy(model(x), y).backward()
        assert all(p.grad is None for p in model.parameters())
        for layer in cap:  # the gradient block, formed on demand, is what .grad would be
            weight, bias = native[f"{layer.name}.weight"], native[f"{layer.name}.bias"]
            expected = torch.cat([weight.reshape(weight.shape[0], -1), bias[:, None]], 1)
            assert_close(layer.gradient(), expected, 1e-12)
    with Capture(model, weight_grads=True):
        F.cross_entropy(model(x), y).backward()
    for name, p in model.named_parameters():
        assert_close(p.grad, native[name], 1e-12)


def test_other_parameters_keep_their_gradients():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    F.cross_entropy(model(x), y).backward()
    native = model[1].weight.grad.clone()
    model.zero_grad(set_to_none=True)
    with Capture(model):
        F.cross_entropy(model(x), y).backward()
    assert model[0].weight.grad is None
    assert_close(model[1].weight.grad, native, 1e-12)


def test_backward_sampled_fills_e_sampled_without_touching_grad():
    model = tiny_net()
    x = torch.randn(7, 2, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 4, (7,))
    with Capture(model, weight_grads=True) as cap:
        logits = model(x)
        labels = cap.backward_sampled(logits, torch.Generator().manual_seed(5))
        assert all(p.grad is None for p in model.parameters())
        assert all(layer.e is None for layer in cap)
        sampled = [layer.e_sampled for layer in cap]
        F.cross_entropy(logits, y).backward()  # the graph was retained for the data pass
        data = [layer.e for layer in cap]
    uniform = torch.rand(7, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    cumulative = torch.softmax(logits.detach(), 1).cumsum(1)
    assert torch.equal(labels, (cumulative <= uniform[:, None]).sum(1).clamp(max=3))
    _, e_mc, _ = reference_errors(model, x, labels, [model[0], model[3]])
    _, e_data, _ = reference_errors(model, x, y, [model[0], model[3]])
    for got, want in zip(sampled, e_mc):
        assert_close(got, want, 1e-12)
    for got, want in zip(data, e_data):
        assert_close(got, want, 1e-12)


def test_backward_errors_validates_shapes():
    model = tiny_net()
    with Capture(model) as cap:
        logits = model(torch.randn(3, 2, 4, 4, dtype=torch.float64))
        with pytest.raises(ValueError, match="output_errors"):
            cap.backward_errors(logits, torch.zeros(3, 5, dtype=torch.float64))


def test_matrix_helpers_round_trip():
    for module in (nn.Linear(3, 2), nn.Conv2d(2, 3, 2), nn.Linear(3, 2, bias=False)):
        matrix = capture.parameters_to_matrix(module)
        assert matrix.shape == capture.gradient_shape(module)
        weight, bias = capture.matrix_to_parameters(matrix, module)
        assert torch.equal(weight, module.weight.detach())
        assert (bias is None) == (module.bias is None)
        before = matrix.clone()
        capture.add_matrix_(module, torch.ones_like(matrix), alpha=-2.0)
        assert torch.equal(capture.parameters_to_matrix(module), before - 2)
        capture.write_grad(module, matrix)
        capture.write_grad(module, matrix, accumulate=True)
        assert torch.equal(module.weight.grad, 2 * weight)
        with pytest.raises(ValueError, match="shape mismatch"):
            capture.matrix_to_parameters(matrix[:, :-1], module)


def test_layer_selection_and_unsupported_layers():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 2, 1), nn.Flatten())
    assert [name for name, _ in capture.find_layers(model)] == ["1"]
    with pytest.raises(ValueError, match="groups=1"):
        Capture(model, layers=[model[0]])
    with pytest.raises(ValueError, match="not part of model"):
        Capture(model, layers=[nn.Linear(2, 2)])
    with Capture(model):
        with pytest.raises(ValueError, match="already captured"):
            Capture(model)


def test_inplace_activation_after_layer_and_inplace_input_detection():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    expected = per_example_reference(model, x, y, [model[0], model[2]])
    with Capture(model) as cap:
        F.cross_entropy(model(x), y).backward()
        for got, want in zip(woodbury.per_example(cap.captures()), expected):
            assert_close(got, want, 1e-12)
        cap.clear()
        inputs = torch.randn(5, 3, dtype=torch.float64)
        model(inputs)
        inputs.mul_(2)  # modifies the recorded input of layer 0
        with pytest.raises(RuntimeError, match="modified in place"):
            _ = cap.layers[0].a
    # A convolution's gradient does not read a, and checks the same.
    conv = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 2)).double()
    inputs = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    with Capture(conv) as cap:
        F.cross_entropy(conv(inputs), torch.randint(0, 2, (4,))).backward()
        inputs.add_(1)
        with pytest.raises(RuntimeError, match="modified in place"):
            cap.layers[0].gradient()


def test_no_recording_without_grad_or_when_disabled():
    model = tiny_net()
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    with Capture(model) as cap:
        with torch.no_grad():
            model(x)
        assert all(layer.calls == 0 for layer in cap)
        cap.enabled = False
        model(x)
        assert all(layer.calls == 0 for layer in cap)
        cap.enabled = True
        model(x)
        model(x)
        assert all(layer.calls == 2 for layer in cap)
        assert cap.layers[0].a.shape[0] == 4  # calls are concatenated along the batch
        with pytest.raises(RuntimeError, match="no data errors"):
            cap.captures()
    assert all(not m._forward_hooks for m in model.modules())
