"""Sequence models in curvlinalg_torch: ``(B, T, C)`` logits and padding masks.

A tiny language model (Embedding → Linear → tanh → [causal cumulative mix] → Linear over the
positions) with right padding, for the empirical, MC and exact Fisher: captures, factors and
steps against dense ``torch.func`` references (per-example gradients of the summed token
loss with the masked tokens removed; the exact Fisher ``Σ_t J_itᵀ(diag p − ppᵀ)J_it`` per
token from ``torch.func.jacrev``), and the padded batch against the batch with the padding
deleted. float64 throughout: tolerances 1e-10 relative unless stated.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from curvlinalg_torch import EKFAC, FOOF, KFAC, KLDWRM, Capture, Laplace, NaturalGradient
from curvlinalg_torch.natural_gradient import fisher_captures
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

from curvlinalg import fisher, kron

VOCAB, WIDTH, HIDDEN, CLASSES = 7, 4, 5, 3
TOL = {"rtol": 1e-10, "atol": 1e-12}


class TinyLM(nn.Module):
    def __init__(self, mix: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.lin1 = nn.Linear(WIDTH, HIDDEN)
        self.lin2 = nn.Linear(HIDDEN, CLASSES)
        self.mix = mix

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.lin1(self.embed(tokens)))
        if self.mix:  # causal: position t sees positions ≤ t (padding is on the right)
            h = torch.cumsum(h, dim=1) * 0.5
        return self.lin2(h)


def make(mix: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    model = TinyLM(mix).double()
    # 4 sequences of 5 tokens; kept lengths 3, 3, 3 and 0 (fully padded): right padding.
    tokens = torch.randint(0, VOCAB, (4, 5))
    labels = torch.randint(0, CLASSES, (4, 5))
    mask = torch.zeros(4, 5, dtype=torch.bool)
    mask[:3, :3] = True
    labels = labels.masked_fill(~mask, -100)
    return model, tokens, labels, mask


def token_loss(logits, labels, batch):
    """Summed token cross-entropy per sequence, mean over the batch (ignore_index=-100)."""
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / batch


NAMES = ("lin1", "lin2")


def params_of(model):
    return {n: p.detach() for n, p in model.named_parameters() if n.split(".")[0] in NAMES}


def flat(grads, names=NAMES):
    """Gradient dict → ``[vec([W | b]) of each layer]`` concatenated (row-major blocks)."""
    parts = []
    for name in names:
        w, b = grads[f"{name}.weight"], grads[f"{name}.bias"]
        parts.append(torch.cat([w, b[..., None]], dim=-1).flatten(-2))
    return torch.cat(parts, dim=-1)


def per_example_grads(model, tokens, labels):
    """``(B, P)``: gradients of each sequence's summed token loss (labels -100 ignored)."""
    params = params_of(model)

    def loss(p, tok, lab):
        logits = functional_call(model, p, (tok[None],))[0]
        return F.cross_entropy(logits, lab, reduction="sum", ignore_index=-100)

    return flat(vmap(grad(loss), in_dims=(None, 0, 0))(params, tokens, labels))


def exact_fisher(model, tokens, mask, examples):
    """``(1/B_eff) Σ_i Σ_{t kept} J_itᵀ (diag p_it − p_it p_itᵀ) J_it`` (P×P)."""
    params = params_of(model)
    total = 0
    for i in range(tokens.shape[0]):

        def logits_of(p, i=i):
            return functional_call(model, p, (tokens[i : i + 1],))[0]  # (T, C)

        jac = flat(jacrev(logits_of)(params))  # (T, C, P)
        p = torch.softmax(logits_of(params).detach(), -1)
        for t in range(tokens.shape[1]):
            if mask[i, t]:
                h = torch.diag(p[t]) - p[t][:, None] * p[t][None, :]
                total = total + jac[t].T @ h @ jac[t]
    return total / examples


def sampled_labels(model, tokens, mask, seed):
    """The labels the optimizer's generator (seeded with ``seed``) draws at the forward."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        logits = model(tokens)
    uniform = torch.rand(tuple(logits.shape[:-1]), generator=generator, dtype=logits.dtype)
    labels = fisher.sample_labels(logits, uniform, mask)
    return labels.masked_fill(~mask, -100)


def layer_errors(model, tokens, labels):
    """Per-example errors ``∂ℓ_i/∂(layer output)`` of lin1 and lin2 (ℓ_i the summed token
    loss) and the layers' inputs with the ones column, from a plain autograd pass."""
    outputs, inputs = {}, {}

    def hook(name):
        def keep(module, args, out):
            out.retain_grad()
            outputs[name] = out
            x = args[0].detach()
            inputs[name] = torch.cat([x, torch.ones_like(x[..., :1])], -1)

        return keep

    handles = [getattr(model, n).register_forward_hook(hook(n)) for n in NAMES]
    try:
        logits = model(tokens)
        F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").backward()
    finally:
        for handle in handles:
            handle.remove()
    model.zero_grad()
    return {n: (inputs[n], outputs[n].grad.detach()) for n in NAMES}


# --------------------------------------------------------------------------------------
# Capture
# --------------------------------------------------------------------------------------


def test_backward_sampled_sequence_logits_and_mask():
    model, tokens, _, mask = make()
    generator = torch.Generator().manual_seed(3)
    with Capture(model) as capture:
        logits = model(tokens)
        capture.set_mask(mask)
        labels = capture.backward_sampled(logits, generator)
        captured = {layer.name: (layer.a, layer.e_sampled, layer.mask) for layer in capture}
    assert labels.shape == (4, 5)
    expected = sampled_labels(model, tokens, mask, 3)
    assert torch.equal(labels.masked_fill(~mask, -100), expected)
    reference = layer_errors(model, tokens, expected)
    for name, (a, e, layer_mask) in captured.items():
        # Masked rows are exactly zero; kept rows are the per-example errors.
        assert torch.equal(e[~mask], torch.zeros_like(e[~mask]))
        torch.testing.assert_close(e, reference[name][1], **TOL)
        torch.testing.assert_close(a, reference[name][0], **TOL)
        assert torch.equal(layer_mask, mask)
    # Per-example gradients Σ_t e_itᵀ a_it of the captures == torch.func's.
    g = torch.cat(
        [torch.einsum("bto,bti->boi", e, a).flatten(1) for a, e, _ in captured.values()], 1
    )
    torch.testing.assert_close(g, per_example_grads(model, tokens, expected), **TOL)


def test_set_mask_validation_and_layouts():
    model, tokens, _, mask = make()
    with Capture(model) as capture:
        with pytest.raises(ValueError, match="boolean"):
            capture.set_mask(mask.double())
        with pytest.raises(ValueError, match=r"\(B,\) or \(B, T\)"):
            capture.set_mask(mask[None])
        logits = model(tokens)
        capture.set_mask(mask[:, :4])
        with pytest.raises(ValueError, match="shape mismatch: the mask"):
            capture.backward_sampled(logits)
        with pytest.raises(ValueError, match="layer 'lin1'"):
            _ = capture.layers[0].mask
        # A (B,) mask repeats over the positions.
        capture.set_mask(mask.any(-1))
        assert torch.equal(capture.layers[0].mask, mask.any(-1)[:, None].expand(4, 5))
        capture.clear()
        assert capture.mask is None


def test_exact_fisher_of_sequence_logits_per_token():
    """The exact Fisher's rows are back-propagated per token and class: with causal mixing
    a sum over tokens would add cross-token terms."""
    model, tokens, _, mask = make(mix=True)
    with Capture(model) as capture:
        logits = model(tokens)
        capture.set_mask(mask)
        pairs, rows = fisher_captures(capture, logits, "exact")
    assert rows == 5 * CLASSES
    g = torch.cat([torch.einsum("bto,bti->boi", e, a).flatten(1) for a, e in pairs], 1)
    torch.testing.assert_close(g.T @ g / 3, exact_fisher(model, tokens, mask, 3), **TOL)


# --------------------------------------------------------------------------------------
# Factors
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fisher_type", ["empirical", "mc"])
def test_kfac_factors_exclude_padding(fisher_type):
    model, tokens, labels, mask = make()
    opt = KFAC(
        model,
        lr=0.0,
        damping=1.0,
        fisher=fisher_type,
        seed=5,
        other_lr=0.0,
        factor_dtype=torch.float64,
    )
    opt.zero_grad()
    opt.set_mask(mask)
    token_loss(model(tokens), labels, 4).backward()
    opt.step()
    opt.remove_hooks()  # the reference's forward must not run the optimizer's hooks
    fisher_labels = labels if fisher_type == "empirical" else sampled_labels(model, tokens, mask, 5)
    reference = layer_errors(model, tokens, fisher_labels)
    for name in NAMES:
        a, e = reference[name]
        kept_a, kept_e = a[mask], e[mask]  # the padded rows deleted
        # A = Σ_kept a aᵀ / B_eff (B_eff = 3 sequences with a kept token), G = mean over kept.
        torch.testing.assert_close(opt.factor(name, "A"), kept_a.T @ kept_a / 3, **TOL)
        torch.testing.assert_close(opt.factor(name, "G"), kept_e.T @ kept_e / 9, **TOL)
        # ... which is what the core's mask= gives.
        torch.testing.assert_close(opt.factor(name, "A"), kron.input_factor(a, mask=mask), **TOL)
        torch.testing.assert_close(opt.factor(name, "G"), kron.factor(e, mask=mask), **TOL)
        # The padded inputs are not zero: without the mask A would differ.
        assert not torch.allclose(kron.input_factor(a), kron.input_factor(a, mask=mask))


def run_step(cls, model, tokens, labels, mask, **options):
    """One step with ``loss_reduction="sum"``; returns the change of lin1/lin2."""
    before = flat(params_of(model))
    opt = cls(model, lr=0.5, damping=0.3, other_lr=0.0, loss_reduction="sum", **options)
    opt.zero_grad()
    opt.set_mask(mask)
    token_loss(model(tokens), labels, 1).backward()
    opt.step()
    opt.remove_hooks()
    return flat(params_of(model)) - before


@pytest.mark.parametrize(
    "cls, options",
    [
        (FOOF, {"factor_dtype": torch.float64}),
        (KFAC, {"fisher": "empirical", "factor_dtype": torch.float64}),
        (KFAC, {"fisher": "empirical", "damping_rule": "exact", "factor_dtype": torch.float64}),
        (EKFAC, {"fisher": "empirical", "factor_dtype": torch.float64}),
        (KLDWRM, {"variant": "so", "fisher": "empirical", "factor_dtype": torch.float64}),
        (KLDWRM, {"variant": "q", "fisher": "empirical", "factor_dtype": torch.float64}),
        (NaturalGradient, {"fisher": "empirical"}),
        (NaturalGradient, {"fisher": "exact"}),
        (NaturalGradient, {"fisher": "exact", "structure": "layerwise"}),
    ],
)
def test_padded_batch_steps_like_the_batch_with_padding_deleted(cls, options):
    model, tokens, labels, mask = make(mix=False)
    copy = TinyLM(False).double()
    copy.load_state_dict(model.state_dict())
    padded_step = run_step(cls, model, tokens, labels, mask, **options)
    # The deleted batch: the fully padded sequence removed, the 3 kept tokens of the others.
    deleted_step = run_step(cls, copy, tokens[:3, :3], labels[:3, :3], None, **options)
    assert padded_step.abs().max() > 1e-3
    torch.testing.assert_close(padded_step, deleted_step, **TOL)


# --------------------------------------------------------------------------------------
# NaturalGradient against the dense reference
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fisher_type", ["empirical", "mc", "exact"])
def test_natural_gradient_sequence_step_matches_dense(fisher_type):
    model, tokens, labels, mask = make(mix=True)
    lr, damping = 0.5, 0.3
    before = flat(params_of(model))
    gradient = per_example_grads(model, tokens, labels).sum(0) / 4  # mean over B = 4
    if fisher_type == "exact":
        fisher_matrix = exact_fisher(model, tokens, mask, 3)
    else:
        fisher_labels = (
            labels if fisher_type == "empirical" else sampled_labels(model, tokens, mask, 11)
        )
        g = per_example_grads(model, tokens, fisher_labels)
        fisher_matrix = g.T @ g / 3  # B_eff = 3: the fully padded sequence does not count
    eye = torch.eye(fisher_matrix.shape[0], dtype=torch.float64)
    expected = -lr * torch.linalg.solve(damping * eye + fisher_matrix, gradient)
    opt = NaturalGradient(model, lr=lr, damping=damping, fisher=fisher_type, seed=11, other_lr=0.0)
    opt.zero_grad()
    opt.set_mask(mask)
    token_loss(model(tokens), labels, 4).backward()
    opt.step()
    torch.testing.assert_close(flat(params_of(model)) - before, expected, **TOL)


def test_mc_fisher_sequence_without_mask_was_refused_on_main():
    """Committed main refused (B, T, C) logits ("needs the model to return (B, C) logits")."""
    model, tokens, _, _ = make()
    labels = torch.randint(0, CLASSES, (4, 5))
    for cls in (KFAC, NaturalGradient):
        opt = cls(model, lr=0.1, damping=1.0, fisher="mc", seed=0)
        opt.zero_grad()
        token_loss(model(tokens), labels, 4).backward()
        opt.step()
        assert opt.steps == 1
        opt.remove_hooks()


# --------------------------------------------------------------------------------------
# Laplace
# --------------------------------------------------------------------------------------


def test_laplace_sequence_labels_with_ignore_index():
    model, tokens, labels, mask = make(mix=True)
    la = Laplace(model, "kron", fisher="empirical", layers=[model.lin1, model.lin2])
    la.fit((tokens, labels))
    expected_ll = -F.cross_entropy(
        model(tokens).detach().flatten(0, 1), labels.flatten(), reduction="sum"
    )
    torch.testing.assert_close(la.log_likelihood, expected_ll, **TOL)
    reference = layer_errors(model, tokens, labels)
    for (a_factor, g_factor), name in zip(la.factors, NAMES):
        a, e = reference[name]
        # A = Σ_kept a aᵀ / N_kept, G = Σ_kept e eᵀ / B_eff (KFC of the deleted batch).
        torch.testing.assert_close(a_factor, a[mask].T @ a[mask] / 9, **TOL)
        torch.testing.assert_close(g_factor, e[mask].T @ e[mask] / 3, **TOL)
    woodbury = Laplace(model, "woodbury", fisher="exact", layers=[model.lin1, model.lin2])
    woodbury.fit((tokens, labels))
    g = torch.cat([torch.einsum("bto,bti->boi", e, a).flatten(1) for a, e in woodbury.captures], 1)
    # The kept Fisher rows: every token's class rows, zero at the padding (scale 1/B).
    torch.testing.assert_close(g.T @ g / 4, exact_fisher(model, tokens, mask, 4), **TOL)


@pytest.mark.parametrize("structure, fisher_type", [("kron", "empirical"), ("woodbury", "exact")])
def test_laplace_padded_data_is_the_data_with_the_padding_deleted(structure, fisher_type):
    # A fully padded sequence is no example: n, the Fisher and the evidence are those of the
    # batch without it (before, "woodbury" scaled its Fisher by 1/B with B counting it, and n
    # counted it for both structures).
    model, tokens, labels, _ = make(mix=False)
    copy = TinyLM(False).double()
    copy.load_state_dict(model.state_dict())
    layers = lambda m: [m.lin1, m.lin2]  # noqa: E731
    padded = Laplace(model, structure, fisher=fisher_type, layers=layers(model))
    padded.fit((tokens, labels))
    deleted = Laplace(copy, structure, fisher=fisher_type, layers=layers(copy))
    deleted.fit((tokens[:3, :3], labels[:3, :3]))
    assert padded.n_data == deleted.n_data == 3
    for tau in (0.5, 2.0):
        torch.testing.assert_close(
            padded.log_marginal_likelihood(tau), deleted.log_marginal_likelihood(tau), **TOL
        )
