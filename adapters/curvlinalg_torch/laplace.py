r"""Post-hoc Laplace approximation of a trained classifier, on the curvlinalg core.

The posterior over the parameters ``θ`` of the captured layers (``nn.Linear``,
``nn.Conv2d``; see :mod:`curvlinalg_torch.capture`) is approximated by

    p(θ | D) ≈ N(θ*, Λ⁻¹),      Λ = τ·I + n·F,

with ``θ*`` the trained (MAP) parameters, ``τ`` the prior precision (prior ``N(0, τ⁻¹I)``),
``n`` the number of training examples and ``F`` a Fisher of the categorical likelihood
``p(y | x, θ) = softmax(f(x; θ))_y`` (the model returns logits). Every other parameter (norm
layers, embeddings, …) stays at its trained value: the Laplace approximation covers the
captured layers only, and ``D`` below counts only their parameters.

Two structures of ``F``:

* ``"woodbury"`` — the subsampled Fisher of **one batch** ``X_B`` (the first batch that
  :meth:`Laplace.fit` sees): ``F = (1/B)·G Gᵀ`` with ``G`` the per-example gradients of that
  batch, all layers jointly (cross-layer blocks included). Its captures are kept; samples
  and ``log det Λ`` cost ``B×B`` work (``curvlinalg.laplace.sample`` / ``logdet``, Benzing
  2022, App. C.1). ``fisher`` selects which per-example gradients: ``"exact"`` (default; every
  class ``c`` weighted by ``√p_c``, i.e. the generalised Gauss–Newton of the cross-entropy,
  ``B·C`` rows), ``"mc"`` (one label sampled from the model per example) or ``"empirical"``
  (the data labels).
* ``"kron"`` — per layer ``F_l ≈ A_l ⊗ G_l`` (K-FAC; cross-layer blocks zero), with the
  factors **averaged over every batch** of the loader, weighted by batch size:
  ``A_l = Σ_{i,t} a_it a_itᵀ / (N·T)`` (``curvlinalg.kron.factor`` of the captures, bias
  column included) and ``G_l = Σ_{i,t} e_it e_itᵀ / N`` (positions summed, examples averaged —
  Grosse & Martens' KFC scaling; :class:`curvlinalg_torch.KFAC` puts the ``T`` on ``A``
  instead, the product ``A⊗G`` is the same), where for the exact Fisher the ``C`` class rows
  of an example are summed. Samples and ``log det Λ`` come from
  each layer's eigendecompositions (``curvlinalg.laplace.kron_sample`` / ``kron_logdet``).

The log likelihood ``log p(D | θ*) = −Σ_{(x,y)∈D} CE(f(x; θ*), y)`` is summed over **every**
batch that :meth:`Laplace.fit` sees, and ``n`` defaults to the number of those examples.

Layout of samples: one ``(S, *param.shape)`` tensor per parameter name of the captured layers
(``model.named_parameters()`` names), i.e. ``S`` stacked state-dict entries, ready for
``torch.func.functional_call``. Noise is drawn with the caller's ``torch.Generator``
(DESIGN.md rule 4): per layer, in capture order, ``y_l = randn(S, d_out, d_in[+1])``, then (for
``"woodbury"``) ``z = randn(S, rows)`` with ``rows = B`` (``B·C`` for the exact Fisher). The
maps from noise to samples are linear and public (:meth:`Laplace.deviations`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from curvlinalg import kron
from curvlinalg import laplace as core

from .amp import working_dtype
from .capture import Capture, LayerCapture, gradient_shape
from .capture import parameters_to_matrix as _to_matrix
from .natural_gradient import FisherType, fisher_captures

__all__ = ["Laplace"]

Structure = Literal["woodbury", "kron"]


def _positive_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a positive number; got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number; got {value!r}")
    return float(value)


def _batches(data: Any) -> Iterable[tuple[Tensor, Tensor]]:
    """A single ``(x, y)`` batch or an iterable of them (a ``DataLoader``)."""
    if (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[0], Tensor)
        and isinstance(data[1], Tensor)
    ):
        return [(data[0], data[1])]
    return data


class Laplace:
    r"""Laplace posterior ``N(θ*, (τI + n·F)⁻¹)`` over the captured layers of a classifier.

    Args:
        model: a trained network returning logits ``(B, C)``; its ``nn.Linear`` / ``nn.Conv2d``
            layers (or ``layers``) get the posterior, all other parameters stay fixed.
        structure: ``"woodbury"`` (subsampled Fisher of one batch, joint over layers) or
            ``"kron"`` (per-layer Kronecker factors averaged over the loader); see the module
            docstring.
        prior_precision: ``τ > 0``.
        n_data: ``n``, the number of training examples the Fisher stands for; default the
            number of examples :meth:`fit` sees.
        fisher: ``"exact"`` (default, the GGN of the cross-entropy), ``"mc"`` or
            ``"empirical"``.
        layers: restrict the posterior to these modules (e.g. ``[model.head]`` for a
            last-layer Laplace).
        generator: ``torch.Generator`` for the MC Fisher's label sampling in :meth:`fit`.
        ignore_index: labels equal to it are padding (as ``F.cross_entropy``'s): their
            positions are masked out of the Fisher and the log likelihood.

    Language models: the model may return ``(B, T, C)`` logits with ``(B, T)`` labels
    (per-token cross-entropy; an example is a sequence, its loss the sum of its token
    losses, ``n`` counts sequences). Positions whose label is ``ignore_index`` are masked
    (:meth:`curvlinalg_torch.capture.Capture.set_mask`): they add nothing to the Fisher's
    captures, factors or the log likelihood. With ``"kron"`` and a mask the factors are
    ``A = Σ_kept a aᵀ / N_kept`` per batch (``kron.factor(a, mask=…)``), weighted by the
    batch's ``B_eff`` (examples with a kept position), and ``G = Σ_kept e eᵀ / Σ B_eff``.

    Usage::

        la = Laplace(model, "kron", prior_precision=1.0).fit(train_loader)
        la.optimize_prior_precision()                 # grid search on the log evidence
        probs = la.predict(x_test, n_samples=32, generator=torch.Generator().manual_seed(0))

    :meth:`fit` runs the model in eval mode (dropout off, norm statistics frozen) and
    restores the previous mode; it writes no ``.grad``. It captures the layers itself, so an
    optimizer still attached to them must be detached first (``opt.remove_hooks()``).
    """

    def __init__(
        self,
        model: nn.Module,
        structure: Structure = "woodbury",
        *,
        prior_precision: float = 1.0,
        n_data: float | None = None,
        fisher: FisherType = "exact",
        layers: Iterable[nn.Module] | None = None,
        generator: torch.Generator | None = None,
        ignore_index: int = -100,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
        if structure not in ("woodbury", "kron"):
            raise ValueError(f"structure must be 'woodbury' or 'kron'; got {structure!r}")
        if fisher not in ("exact", "mc", "empirical"):
            raise ValueError(f"fisher must be 'exact', 'mc' or 'empirical'; got {fisher!r}")
        self.model = model
        self.structure: Structure = structure
        self.fisher: FisherType = fisher
        self.prior_precision = _positive_number("prior_precision", prior_precision)
        self._n_data_arg = None if n_data is None else _positive_number("n_data", n_data)
        self._layers_arg = None if layers is None else list(layers)
        self.generator = generator
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise ValueError(f"ignore_index must be an int; got {ignore_index!r}")
        self.ignore_index = ignore_index
        # Filled by fit().
        self._names: list[tuple[str, str | None]] = []  # (weight name, bias name) per layer
        self._modules: list[nn.Module] = []
        self._map: list[Tensor] = []  # (d_out, d_in[+1]) MAP blocks
        self._captures: list[tuple[Tensor, Tensor]] | None = None  # "woodbury"
        self._rows_per_example = 1
        self._factors: list[tuple[Tensor, Tensor]] | None = None  # "kron": (A, G) per layer
        self.log_likelihood: Tensor | None = None
        self.n_seen = 0

    # ------------------------------------------------------------------ fitting

    @property
    def fitted(self) -> bool:
        return bool(self._map)

    @property
    def n_data(self) -> float:
        """``n``: the ``n_data`` argument, else the number of examples :meth:`fit` saw."""
        if self._n_data_arg is not None:
            return self._n_data_arg
        self._require_fit()
        return float(self.n_seen)

    def _require_fit(self) -> None:
        if not self.fitted:
            raise RuntimeError("Laplace is not fitted: call fit(loader) first")

    def fit(self, data: Any, *, generator: torch.Generator | None = None) -> Laplace:
        """Capture the curvature at the current (MAP) parameters.

        ``data``: one ``(x, y)`` batch or an iterable of them (a ``DataLoader``). ``"woodbury"``
        keeps the Fisher captures of the **first** batch (use a loader with the batch size you
        want, or pass one batch); ``"kron"`` averages the factors over **all** batches. Both sum
        the log likelihood over all batches. ``generator`` overrides the one given at
        construction (MC Fisher only). Returns ``self``.
        """
        generator = self.generator if generator is None else generator
        was_training = self.model.training
        self.model.eval()
        capture = Capture(self.model, layers=self._layers_arg)
        try:
            if not capture.layers:
                raise ValueError("model has no supported layer (nn.Linear / nn.Conv2d) to fit")
            self._record_layers(capture.layers)
            # Captures, MAP blocks and the log likelihood in float32 for a half-precision
            # model or under torch.autocast (the core factorises in float32/float64 only).
            work = self._map[0].dtype
            log_likelihood: Tensor | None = None
            seen = 0
            weights = 0.0  # Σ B_eff over the "kron" batches (Σ B without masks)
            sums: list[list[Tensor]] = []
            self._captures = None
            for batch_index, (x, y) in enumerate(_batches(data)):
                capture.clear()
                # "woodbury" keeps the first batch's Fisher only: later batches add to the log
                # likelihood and need no graph (nor labels drawn from the generator).
                curvature = self.structure == "kron" or batch_index == 0
                with torch.set_grad_enabled(curvature):
                    logits = self.model(x)
                if logits.ndim not in (2, 3):
                    raise ValueError(
                        "the model must return logits (B, C) or (B, T, C); got shape "
                        f"{tuple(logits.shape)}"
                    )
                batch = int(logits.shape[0])
                mask = self._mask(logits, y)
                capture.set_mask(mask)
                loss = F.cross_entropy(
                    logits.detach().to(work).flatten(0, -2),
                    y.flatten(0, -2) if y.is_floating_point() else y.flatten(),
                    ignore_index=self.ignore_index,
                    reduction="sum",
                )
                log_likelihood = -loss if log_likelihood is None else log_likelihood - loss
                # A sequence without a kept position is no example: n and the Fisher's 1/B
                # count the batch with it deleted (B_eff), as the core's masks do.
                effective = batch if mask is None else int(mask.reshape(batch, -1).any(dim=1).sum())
                seen += effective
                if not curvature:
                    continue
                pairs, rows = fisher_captures(
                    capture, logits, self.fisher, labels=y, generator=generator
                )
                pairs = [(a.to(work), e.to(work)) for a, e in pairs]
                if self.structure == "woodbury":
                    if effective == 0:
                        raise ValueError(
                            "the first batch of data has no position whose label is not "
                            f"ignore_index={self.ignore_index}: structure='woodbury' takes "
                            "its Fisher from that batch"
                        )
                    self._captures = [(a.detach(), e.detach()) for a, e in pairs]
                    # The core's scale n'/B counts every row; padded sequences are no rows of
                    # the Fisher: n' = n·rows·B/B_eff gives n/B_eff.
                    self._rows_per_example = rows * batch / effective
                else:
                    used = [layer for layer in capture.layers if layer.calls]
                    masks = [layer.mask for layer in used if layer.e_sampled is not None]
                    weight = float(batch) if mask is None else used[0].mask_counts()[1]
                    weights += weight
                    for index, ((a, e), layer_mask) in enumerate(zip(pairs, masks)):
                        # Not under the caller's torch.autocast (its matmuls would be bfloat16).
                        with torch.autocast(a.device.type, enabled=False):
                            a_sum, g_sum = self._kron_sums(a, e, rows, weight, layer_mask)
                        if len(sums) <= index:
                            sums.append([a_sum, g_sum])
                        else:
                            sums[index][0] += a_sum
                            sums[index][1] += g_sum
            if seen == 0:
                raise ValueError("data holds no batch")
        finally:
            capture.remove()
            self.model.train(was_training)
        if self.structure == "kron":
            self._factors = [(a_sum / weights, g_sum / weights) for a_sum, g_sum in sums]
        self.log_likelihood = log_likelihood
        self.n_seen = seen
        return self

    def _mask(self, logits: Tensor, y: Tensor) -> Tensor | None:
        """The positions that count: ``y != ignore_index`` for class labels of the logits'
        leading shape (``None`` when every position counts, or for soft labels)."""
        if y.is_floating_point() or tuple(y.shape) != tuple(logits.shape[:-1]):
            return None
        mask = y != self.ignore_index
        if logits.ndim == 2 and bool(mask.all()):
            return None
        return mask

    @staticmethod
    def _kron_sums(
        a: Tensor, e: Tensor, rows: int, batch: float, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Batch sums ``N·A_batch`` and ``N·G_batch`` of the factors (see module docstring):
        ``kron.factor`` is the mean over all leading axes, so multiply back by the count.
        With a mask (in ``a``'s layout; ``e`` is zero at masked positions) ``batch`` is
        ``B_eff`` and ``A_batch = kron.factor(a, mask=mask)``, the mean over kept rows."""
        if rows > 1:
            # Exact Fisher: the inputs are repeated per class; take each example once.
            a = a[::rows]
        masked = {} if mask is None else {"mask": mask}
        a_sum = kron.factor(a, check_finite=False, **masked) * batch
        # Σ over examples, class rows and positions of e eᵀ: the mean over the leading axes of
        # e (B·rows·T of them) times their count.
        g_sum = kron.factor(e, check_finite=False) * math.prod(int(size) for size in e.shape[:-1])
        # A is the mean over positions (T·factor for FOOF/KFC would put T on A instead; the
        # product A⊗G is the same).
        return a_sum, g_sum

    def _record_layers(self, layers: Sequence[LayerCapture]) -> None:
        names = {id(p): n for n, p in self.model.named_parameters()}
        self._modules = [layer.module for layer in layers]
        self._names = [
            (
                names[id(layer.module.weight)],
                names[id(layer.module.bias)] if layer.has_bias else None,
            )
            for layer in layers
        ]
        self._map = [
            _to_matrix(layer.module).to(working_dtype(layer.module.weight.dtype), copy=True)
            for layer in layers
        ]

    # ------------------------------------------------------------------ sampling

    def draw_noise(
        self, n_samples: int, generator: torch.Generator | None = None
    ) -> tuple[list[Tensor], Tensor | None]:
        """Standard-normal noise ``(y, z)`` for :meth:`deviations`, in the documented order
        (per layer ``y_l``: ``(S, d_out, d_in[+1])``; then ``z``: ``(S, rows)`` for
        ``"woodbury"``, ``None`` for ``"kron"``)."""
        self._require_fit()
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive integer; got {n_samples!r}")
        like = self._map[0]
        y = [
            torch.randn(
                (n_samples, *m.shape), generator=generator, dtype=like.dtype, device=like.device
            )
            for m in self._map
        ]
        z = None
        if self.structure == "woodbury":
            assert self._captures is not None
            rows = int(self._captures[0][0].shape[0])
            z = torch.randn(
                (n_samples, rows), generator=generator, dtype=like.dtype, device=like.device
            )
        return y, z

    def deviations(
        self,
        y: Sequence[Tensor],
        z: Tensor | None = None,
        prior_precision: float | None = None,
    ) -> list[Tensor]:
        r"""``θ − θ*`` per layer for the given noise: draws of ``N(0, Λ⁻¹)`` as
        ``(S, d_out, d_in[+1])`` blocks; linear in ``(y, z)``.

        ``"woodbury"``: ``curvlinalg.laplace.sample(captures, τ, n', y, z)`` with
        ``n' = n·rows_per_example`` so that the core's ``scale = n'/rows`` is ``n/B`` also for
        the exact Fisher's ``B·C`` rows. ``"kron"``: ``laplace.kron_sample`` per layer.
        """
        self._require_fit()
        tau = self.prior_precision if prior_precision is None else prior_precision
        tau = _positive_number("prior_precision", tau)
        if not isinstance(y, (list, tuple)) or len(y) != len(self._map):
            raise ValueError(
                f"y must hold one (S, d_out, d_in) tensor per layer ({len(self._map)})"
            )
        if self.structure == "woodbury":
            if z is None:
                raise ValueError("z is required for structure='woodbury'")
            assert self._captures is not None
            return core.sample(self._captures, tau, self._core_n_data(), list(y), z)
        assert self._factors is not None
        return [
            core.kron_sample(a, g, tau, self.n_data, noise)
            for (a, g), noise in zip(self._factors, y)
        ]

    def _core_n_data(self) -> float:
        # The core scales the Gram by n_data / (rows of the captures); the exact Fisher has
        # B·C rows but F = (1/B) Σ_i Σ_c g_ic g_icᵀ, so pass n·C.
        return self.n_data * self._rows_per_example

    def sample(
        self,
        n_samples: int,
        generator: torch.Generator | None = None,
        *,
        prior_precision: float | None = None,
    ) -> dict[str, Tensor]:
        """``n_samples`` draws of the captured layers' parameters from ``N(θ*, Λ⁻¹)``.

        Returns ``{parameter name: (S, *param.shape)}`` (stacked state-dict entries; other
        parameters are not included: they stay at the model's values).
        """
        y, z = self.draw_noise(n_samples, generator)
        deviations = self.deviations(y, z, prior_precision)
        samples: dict[str, Tensor] = {}
        for module, (w_name, b_name), theta, dev in zip(
            self._modules, self._names, self._map, deviations
        ):
            blocks = theta + dev  # (S, d_out, d_in[+1])
            weight, bias = self._split(blocks, module)
            samples[w_name] = weight
            if b_name is not None:
                samples[b_name] = bias
        return samples

    @staticmethod
    def _split(blocks: Tensor, module: nn.Module) -> tuple[Tensor, Tensor | None]:
        count = int(blocks.shape[0])
        d_out, d_in = gradient_shape(module)
        d_w = d_in - int(module.bias is not None)
        weight = blocks[:, :, :d_w].reshape(count, *module.weight.shape)
        bias = blocks[:, :, d_w] if module.bias is not None else None
        return weight.to(module.weight.dtype), None if bias is None else bias.to(module.bias.dtype)

    @torch.no_grad()
    def predict(
        self,
        x: Tensor,
        n_samples: int = 32,
        generator: torch.Generator | None = None,
        *,
        prior_precision: float | None = None,
    ) -> Tensor:
        r"""Posterior predictive by sampling: ``(1/S) Σ_s softmax(f(x; θ_s))``, ``(B, C)``.

        Each sample is evaluated with ``torch.func.functional_call`` (the model's own
        parameters are untouched); the model runs in whatever mode it is in (call
        ``model.eval()`` first for dropout / batch norm).
        """
        samples = self.sample(n_samples, generator, prior_precision=prior_precision)
        total: Tensor | None = None
        for s in range(n_samples):
            params = {name: value[s] for name, value in samples.items()}
            probabilities = torch.softmax(functional_call(self.model, params, (x,)), dim=-1)
            total = probabilities if total is None else total + probabilities
        assert total is not None
        return total / n_samples

    # ------------------------------------------------------------------ evidence

    def log_det_precision(self, prior_precision: float | None = None) -> Tensor:
        """``log det Λ`` at ``τ`` (default the current ``prior_precision``)."""
        self._require_fit()
        tau = _positive_number(
            "prior_precision", self.prior_precision if prior_precision is None else prior_precision
        )
        if self.structure == "woodbury":
            assert self._captures is not None
            return core.logdet(self._captures, tau, self._core_n_data())
        assert self._factors is not None
        return sum(core.kron_logdet(a, g, tau, self.n_data) for a, g in self._factors)

    def log_marginal_likelihood(self, prior_precision: float | None = None) -> Tensor:
        r"""Laplace log evidence at ``τ`` (default the current ``prior_precision``):

        ``log p(D|θ*) − (τ/2)‖θ*‖² + (D/2)·log τ − ½·log det Λ``
        (``curvlinalg.laplace.log_marginal_likelihood``; ``D`` and ``‖θ*‖²`` over the captured
        layers). Returns a 0-d tensor.
        """
        self._require_fit()
        tau = _positive_number(
            "prior_precision", self.prior_precision if prior_precision is None else prior_precision
        )
        assert self.log_likelihood is not None
        log_det = self.log_det_precision(tau)
        return core.log_marginal_likelihood(
            self.log_likelihood.to(log_det.dtype), self._map, log_det, tau
        )

    def optimize_prior_precision(self, grid: Sequence[float] | Tensor | None = None) -> float:
        """Set ``prior_precision`` to the grid value with the largest log evidence.

        ``grid``: candidate ``τ`` values (default 41 log-spaced values in ``[1e-4, 1e4]``).
        Returns the chosen ``τ``. Each candidate costs one ``log det`` (``B×B`` Cholesky for
        ``"woodbury"``, eigendecompositions per layer for ``"kron"``).
        """
        self._require_fit()
        values = torch.logspace(-4, 4, 41).tolist() if grid is None else [float(t) for t in grid]
        if not values:
            raise ValueError("grid must hold at least one prior precision")
        scores = [float(self.log_marginal_likelihood(tau)) for tau in values]
        best = max(range(len(values)), key=lambda index: scores[index])
        self.prior_precision = _positive_number("grid value", values[best])
        return self.prior_precision

    # ------------------------------------------------------------------ introspection

    @property
    def map_blocks(self) -> list[Tensor]:
        """The MAP parameters as ``(d_out, d_in[+1])`` blocks ``[W | b]`` per layer."""
        self._require_fit()
        return list(self._map)

    @property
    def captures(self) -> list[tuple[Tensor, Tensor]]:
        """``"woodbury"``: the kept Fisher captures ``[(a, e)]`` (``B·C`` rows for the exact
        Fisher, each example's input repeated per class)."""
        self._require_fit()
        if self._captures is None:
            raise AttributeError("captures are kept only with structure='woodbury'")
        return list(self._captures)

    @property
    def factors(self) -> list[tuple[Tensor, Tensor]]:
        """``"kron"``: the averaged ``(A, G)`` per layer."""
        self._require_fit()
        if self._factors is None:
            raise AttributeError("factors are kept only with structure='kron'")
        return list(self._factors)
