"""Tests of :class:`curvlinalg_torch.Influence` against explicit scores ``g_qᵀ P⁻¹ g_t``:
per-example gradients from ``torch.func`` for the query and training examples, ``P`` the
dense damped K-FAC / EK-FAC matrix (``np.kron``, explicit inverse) built from the fitted
factors, and the correction ``S = diag(Qᵀ F Q)`` from the training set's per-example
gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from curvlinalg import fisher as core_fisher
from curvlinalg_torch import Influence, capture
from torch import nn

from tests.adapters.test_torch_capture import tiny_net
from tests.adapters.test_torch_ekfac import (
    dense_correction,
    mlp_batches,
    per_example_blocks,
    tiny_mlp,
    vec,
)
from tests.adapters.test_torch_foof import batches

DAMPING = 0.1


def concatenated(loader):
    return torch.cat([x for x, _ in loader]), torch.cat([y for _, y in loader])


def dense_inverses(fitted: Influence) -> list[np.ndarray]:
    """``P_l⁻¹`` of every layer as a dense matrix, from the fitted factors."""
    inverses = []
    for layer in fitted.factors:
        a, g = layer.a.numpy(), layer.g.numpy()
        if fitted.damping_rule == "factored":
            # π rule: λ_A/λ_G = (tr A/d_A)/(tr G/d_G), λ_A·λ_G = λ.
            pi = np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / g.shape[0]))
            damping_a, damping_g = pi * np.sqrt(layer.damping), np.sqrt(layer.damping) / pi
            inverses.append(
                np.kron(
                    np.linalg.inv(a + damping_a * np.eye(a.shape[0])),
                    np.linalg.inv(g + damping_g * np.eye(g.shape[0])),
                )
            )
            continue
        if fitted.strategy == "kfac":
            matrix = np.kron(a, g)
        else:
            q = np.kron(layer.a_eigh.vectors.numpy(), layer.g_eigh.vectors.numpy())
            matrix = q @ np.diag(vec(layer.correction.numpy())) @ q.T
        inverses.append(np.linalg.inv(matrix + layer.damping * np.eye(matrix.shape[0])))
    return inverses


def explicit_scores(fitted: Influence, plain: nn.Module, query, train) -> np.ndarray:
    query_blocks = per_example_blocks(fitted.model, *query, plain)
    train_blocks = per_example_blocks(fitted.model, *train, plain)
    return sum(
        vec(q) @ inverse @ vec(t).T
        for q, t, inverse in zip(query_blocks, train_blocks, dense_inverses(fitted))
    )


CASES = {
    "mlp-ekfac": (tiny_mlp, mlp_batches, {"strategy": "ekfac"}),
    "conv-ekfac": (tiny_net, batches, {"strategy": "ekfac"}),
    "conv-kfac-exact": (tiny_net, batches, {"strategy": "kfac"}),
    "mlp-kfac-factored": (tiny_mlp, mlp_batches, {"strategy": "kfac", "damping_rule": "factored"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pairwise_scores_equal_explicit_inverse_products(case):
    net, data, options = CASES[case]
    model, plain = net(), net()
    train = data(3, batch=5, seed=1)
    query = data(1, batch=4, seed=2)[0]
    fitted = Influence(model, damping=DAMPING, factor_dtype=torch.float64, **options).fit(train)
    assert fitted.num_examples == 15
    scores = fitted.pairwise_scores(query, train)
    assert scores.shape == (4, 15) and scores.dtype == torch.float64
    expected = explicit_scores(fitted, plain, query, concatenated(train))
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-9, atol=1e-12)
    if options["strategy"] == "ekfac":
        # The fitted correction is diag(Qᵀ F Q) of the whole training set's Fisher.
        train_blocks = per_example_blocks(model, *concatenated(train), plain)
        for layer, blocks in zip(fitted.factors, train_blocks):
            q = np.kron(layer.a_eigh.vectors.numpy(), layer.g_eigh.vectors.numpy())
            np.testing.assert_allclose(
                layer.correction.numpy(), dense_correction(blocks, q), rtol=1e-9, atol=1e-14
            )


def test_factors_are_exact_means_over_the_loader():
    """A = Σ_i [x_i, 1][x_i, 1]ᵀ / N of the first Linear; the eigenbases diagonalise A, G."""
    model = tiny_mlp()
    train = mlp_batches(3, batch=5, seed=1)
    fitted = Influence(model, damping=DAMPING, factor_dtype=torch.float64).fit(train)
    x, _ = concatenated(train)
    homogeneous = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    torch.testing.assert_close(fitted.factors[0].a, homogeneous.T @ homogeneous / len(x))
    for layer in fitted.factors:
        for matrix, eigh in ((layer.a, layer.a_eigh), (layer.g, layer.g_eigh)):
            rebuilt = eigh.vectors @ torch.diag(eigh.values) @ eigh.vectors.T
            torch.testing.assert_close(rebuilt, matrix, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
def test_streaming_in_batches_equals_one_batch(strategy):
    model = tiny_net()
    train = batches(3, batch=4, seed=1)
    whole = [concatenated(train)]
    query = batches(2, batch=3, seed=2)
    options = dict(strategy=strategy, damping=DAMPING, factor_dtype=torch.float64)
    streamed = Influence(model, **options).fit(train)
    at_once = Influence(model, **options).fit(whole)
    for got, want in zip(streamed.factors, at_once.factors):
        torch.testing.assert_close(got.a, want.a, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(got.g, want.g, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(got.correction, want.correction, rtol=1e-9, atol=1e-13)
    # A query given as several batches is their concatenation.
    scores = streamed.pairwise_scores(query, train)
    torch.testing.assert_close(
        scores, at_once.pairwise_scores(concatenated(query), whole), rtol=1e-9, atol=1e-12
    )


@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
def test_self_scores_are_the_diagonal(strategy):
    model = tiny_net()
    train = batches(2, batch=4, seed=1)
    fitted = Influence(model, strategy=strategy, damping=DAMPING, factor_dtype=torch.float64)
    fitted.fit(train)
    full = fitted.pairwise_scores(train, train)
    torch.testing.assert_close(fitted.self_scores(train), torch.diagonal(full), rtol=1e-9, atol=0)


def test_factored_self_scores_are_the_diagonal():
    model = tiny_mlp()
    train = mlp_batches(2, batch=4, seed=1)
    fitted = Influence(
        model, strategy="kfac", damping_rule="factored", damping=DAMPING, factor_dtype=torch.float64
    ).fit(train)
    full = fitted.pairwise_scores(train, train)
    torch.testing.assert_close(fitted.self_scores(train), torch.diagonal(full), rtol=1e-9, atol=0)


def test_top_k_picks_the_largest_scores():
    model = tiny_mlp()
    train = mlp_batches(4, batch=5, seed=1)
    query = mlp_batches(1, batch=3, seed=2)[0]
    fitted = Influence(model, damping=DAMPING, factor_dtype=torch.float64).fit(train)
    scores = fitted.pairwise_scores(query, train)
    values, indices = fitted.top_k(query, train, 4)  # streamed, running top 4
    assert values.shape == indices.shape == (3, 4)
    order = np.argsort(-scores.numpy(), axis=1)[:, :4]
    np.testing.assert_array_equal(indices.numpy(), order)
    torch.testing.assert_close(values, torch.gather(scores, 1, indices), rtol=1e-12, atol=0)
    assert torch.equal(indices[:, 0], scores.argmax(1))
    for from_matrix in (fitted.top_k(scores, 4), fitted.top_k(scores, k=4)):
        assert torch.equal(from_matrix[1], indices)
    assert torch.equal(fitted.top_k(query, train, k=4)[1], indices)
    with pytest.raises(TypeError, match="top_k"):
        fitted.top_k(query, train)
    with pytest.raises(ValueError, match="k=21 exceeds"):
        fitted.top_k(scores, 21)


def test_mc_fisher_uses_labels_sampled_as_documented():
    """fisher="mc": each pass over the loader draws ``ỹ ~ softmax(z)`` per example with
    ``torch.rand(B, generator)`` (``fisher.sample_labels``); the correction is diag(Qᵀ F Q)
    of the sampled-label gradients of the second pass."""
    model, plain = tiny_mlp(), tiny_mlp()
    train = mlp_batches(2, batch=6, seed=1)
    fitted = Influence(
        model, fisher="mc", damping=DAMPING, factor_dtype=torch.float64, seed=11
    ).fit(train)
    twin = torch.Generator().manual_seed(11)

    def draw(x):
        with torch.no_grad():
            logits = model(x)
        uniform = torch.rand(len(x), generator=twin, dtype=logits.dtype)
        return core_fisher.sample_labels(logits, uniform)

    for x, _ in train:  # the factor pass
        draw(x)
    x = torch.cat([xb for xb, _ in train])
    labels = torch.cat([draw(xb) for xb, _ in train])  # the correction pass
    sampled_blocks = per_example_blocks(model, x, labels, plain)
    for layer, blocks in zip(fitted.factors, sampled_blocks):
        q = np.kron(layer.a_eigh.vectors.numpy(), layer.g_eigh.vectors.numpy())
        np.testing.assert_allclose(
            layer.correction.numpy(), dense_correction(blocks, q), rtol=1e-9, atol=1e-14
        )


def test_default_damping_model_state_and_no_grad_written():
    model = tiny_net()
    model.train()
    train = batches(2, batch=4, seed=1)
    fitted = Influence(model, factor_dtype=torch.float64).fit(train)
    for layer in fitted.factors:
        assert layer.damping == pytest.approx(0.1 * float(layer.correction.mean()), rel=1e-12)
    fitted.pairwise_scores(train[0], train)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())  # captures removed after use


def test_argument_validation():
    model = tiny_mlp()
    for kwargs, name in (
        ({"strategy": "lissa"}, "strategy"),
        ({"fisher": "exact"}, "fisher"),
        ({"damping": 0.0}, "damping"),
        ({"damping_rule": "factored"}, "damping_rule"),
        ({"modules": ["nope"]}, "modules"),
        ({"loss_reduction": "none"}, "loss_reduction"),
    ):
        with pytest.raises(ValueError, match=name):
            Influence(model, **kwargs)
    fitted = Influence(model, damping=DAMPING)
    with pytest.raises(RuntimeError, match="call fit"):
        fitted.pairwise_scores(mlp_batches(1)[0], mlp_batches(1))
    with pytest.raises(ValueError, match="no batch"):
        fitted.fit([])
    only_first = Influence(model, modules=["0"], damping=DAMPING).fit(mlp_batches(1))
    assert [layer.name for layer in only_first.factors] == ["0"]
    assert capture.find_layers(model)[0][0] == "0"


def test_float32_factors_agree_with_float64():
    """A float32 model and factors (eigendecompositions in float64) give the float64 scores
    to float32 accuracy."""
    train = batches(2, batch=4, seed=1)
    query = batches(1, batch=3, seed=2)[0]
    wide = Influence(tiny_net(), damping=DAMPING, factor_dtype=torch.float64).fit(train)
    expected = wide.pairwise_scores(query, train)
    to32 = [(x.float(), y) for x, y in train]
    narrow = Influence(tiny_net(torch.float32), damping=DAMPING).fit(to32)
    scores = narrow.pairwise_scores((query[0].float(), query[1]), to32)
    assert scores.dtype == torch.float32
    error = (scores.double() - expected).norm() / expected.norm()
    assert error <= 1e-4, error


# --------------------------------------------------------------------------------------
# Padding (mask_fn)
# --------------------------------------------------------------------------------------

VOCAB, WIDTH, KEPT, STEPS = 7, 4, 3, 5


class PrefixMeanLM(nn.Module):
    """A causal sequence model: position ``t`` sees the mean of the embeddings up to ``t``,
    so the kept positions of right-padded sequences compute what the short ones do."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.proj = nn.Linear(WIDTH, 6)
        self.head = nn.Linear(6, VOCAB)

    def forward(self, tokens):
        x = self.embed(tokens)
        counts = torch.arange(1, tokens.shape[1] + 1, dtype=x.dtype)[:, None]
        return self.head(torch.tanh(self.proj(x.cumsum(1) / counts)))


def sequence_loss(logits, labels):
    """Mean over the sequences of their summed token losses (padding: label -100)."""
    summed = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
    return summed / labels.shape[0]


def padded_and_deleted(seed: int, sizes: tuple[int, ...], fully_padded: bool):
    """Batches of right-padded sequences (``KEPT`` real tokens of ``STEPS``; the padding
    holds random tokens and label -100), optionally with one fully padded sequence added to
    the last batch, and the same batches with the padding deleted."""
    generator = torch.Generator().manual_seed(seed)
    padded, deleted = [], []
    for index, size in enumerate(sizes):
        tokens = torch.randint(0, VOCAB, (size, STEPS), generator=generator)
        labels = torch.randint(0, VOCAB, (size, STEPS), generator=generator)
        deleted.append((tokens[:, :KEPT], labels[:, :KEPT]))
        labels = labels.clone()
        labels[:, KEPT:] = -100
        if fully_padded and index == len(sizes) - 1:
            tokens = torch.cat([tokens, torch.randint(0, VOCAB, (1, STEPS), generator=generator)])
            labels = torch.cat([labels, torch.full((1, STEPS), -100)])
        padded.append((tokens, labels))
    return padded, deleted


@pytest.mark.parametrize(
    "options",
    [dict(strategy="ekfac"), dict(strategy="kfac"), dict(strategy="kfac", damping_rule="factored")],
    ids=["ekfac", "kfac", "kfac-factored"],
)
def test_padded_loader_scores_as_with_the_padding_deleted(options):
    """With ``mask_fn``, a right-padded loader (one fully padded sequence included) gives the
    factors, correction and scores of the loader with the padding deleted; the fully padded
    sequence scores 0. Without the mask the padded positions' inputs enter ``A`` (they are
    not zero) and this fails."""
    torch.manual_seed(0)
    model = PrefixMeanLM().double()
    train, train_deleted = padded_and_deleted(1, (3, 2), fully_padded=True)
    query, query_deleted = padded_and_deleted(2, (2,), fully_padded=False)
    common = dict(loss_fn=sequence_loss, damping=DAMPING, factor_dtype=torch.float64, **options)
    masked = Influence(model, mask_fn=lambda batch: batch[1] != -100, **common).fit(train)
    plain = Influence(model, **common).fit(train_deleted)
    assert [layer.name for layer in masked.factors] == ["proj", "head"]
    for got, want in zip(masked.factors, plain.factors):
        torch.testing.assert_close(got.a, want.a, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(got.g, want.g, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(got.correction, want.correction, rtol=1e-8, atol=1e-12)
        assert got.damping == pytest.approx(want.damping, rel=1e-12)
    scores = masked.pairwise_scores(query[0], train)
    expected = plain.pairwise_scores(query_deleted[0], train_deleted)
    assert scores.shape == (2, 6) and expected.shape == (2, 5)
    torch.testing.assert_close(scores[:, :5], expected, rtol=1e-8, atol=1e-12)
    assert torch.all(scores[:, 5] == 0)
    self_scores = masked.self_scores(train)
    torch.testing.assert_close(
        self_scores[:5], plain.self_scores(train_deleted), rtol=1e-8, atol=1e-12
    )
    assert self_scores[5] == 0
    # A query of several batches (a fully padded sequence in the last) is their concatenation.
    several, several_deleted = padded_and_deleted(3, (2, 1), fully_padded=True)
    scores = masked.pairwise_scores(several, train)
    expected_several = plain.pairwise_scores(several_deleted, train_deleted)
    torch.testing.assert_close(scores[:3, :5], expected_several, rtol=1e-8, atol=1e-12)
    assert torch.all(scores[3] == 0) and torch.all(scores[:, 5] == 0)
    values, indices = masked.top_k(query, train, k=2)
    torch.testing.assert_close(values, torch.topk(expected, 2, dim=1).values, rtol=1e-8, atol=1e-12)


def test_mask_fn_must_be_callable():
    with pytest.raises(TypeError, match="mask_fn"):
        Influence(tiny_mlp(), mask_fn="labels != -100")
