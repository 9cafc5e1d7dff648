r"""Training-data attribution with (EK-)FAC influence functions, from layer captures.

:class:`Influence` is the torch front end of :mod:`curvlinalg.influence`. For the captured
layers ``l`` (``nn.Linear``, ``nn.Conv2d``) it fits a Kronecker-factored curvature
``P_l`` over a training loader and scores

    s_qt = Σ_l ⟨P_l⁻¹ g^q_l, g^t_l⟩ = g_qᵀ P⁻¹ g_t

between the per-example gradients ``g_q`` of query examples and ``g_t`` of training examples
(``g_i = Σ_t e_itᵀ a_it``: the gradient of example ``i``'s own loss, whatever the loss's batch
reduction). No per-example gradient is ever formed or stored: every pass keeps only the
layers' captures ``(a, e)`` of one batch (and of the query), and the scores come from the
core's contractions of those captures.

Fitting (:meth:`Influence.fit`) streams the training loader once for the factors and, for
EK-FAC, once more for the eigenvalue correction:

1. ``A = Σ_{i,t} a_it a_itᵀ / N`` and ``G = Σ_{i,t} ẽ_it ẽ_itᵀ / (N·T)`` over all ``N``
   training examples (exact means, not moving averages; the same scales as :class:`KFAC`:
   positions ``t`` of a convolution/sequence summed in ``A``, averaged in ``G``; ``a`` carries
   a column of ones for the bias). ``ẽ`` are the errors of the Fisher's labels: data labels
   (``fisher="empirical"``) or labels sampled from the model's softmax (``fisher="mc"``,
   classifiers with ``(B, C)`` logits).
2. ``A = U_A diag(s_A) U_Aᵀ``, ``G = U_G diag(s_G) U_Gᵀ`` (``kron.eigh``, in float64).
3. EK-FAC only: ``S = (1/N) Σ_i (U_Gᵀ g̃_i U_A)²`` over the loader (``kron.eigen_correction``
   per batch, weighted by its size), ``g̃_i`` the Fisher-label gradients.

Curvature per layer, with damping ``λ_l`` (``damping``, or ``0.1 × mean eigenvalue`` of the
layer when ``damping=None``):

* ``strategy="ekfac"``: ``P = Q diag(S) Qᵀ + λI`` with ``Q = U_A⊗U_G``
  (``influence.ekfac_scores``);
* ``strategy="kfac"``, ``damping_rule="exact"``: ``P = A⊗G + λI`` — the same code path with
  ``S = s_G s_Aᵀ``, the K-FAC eigenvalues;
* ``strategy="kfac"``, ``damping_rule="factored"``: ``P = (A + λ_A I)⊗(G + λ_G I)`` with
  ``λ_A λ_G = λ`` split by the π rule (``kron.split_damping``, ``kron.inverse``,
  ``influence.kfac_scores``).

The model is put in ``eval()`` mode for every pass (dropout off, norm statistics fixed) and
returned to its previous mode afterwards; no ``.grad`` is written. Batches are ``(inputs,
targets, ...)`` sequences: the loss of a batch is ``loss_fn(model(inputs), targets)``.
Training examples are numbered in the loader's order, so use a loader without shuffling for
the train side of :meth:`pairwise_scores` and :meth:`top_k`.

Padding (sequence models, ``(B, T, C)`` logits): ``mask_fn(batch)`` gives the positions that
count, e.g. ``lambda batch: batch[1] != -100`` for labels with ``ignore_index=-100``
(:meth:`Capture.set_mask` on every pass). The factors are then means over the kept positions
only — ``A = Σ_kept a aᵀ / N_eff`` with ``N_eff`` the examples with a kept position,
``G = Σ_kept ẽ ẽᵀ / (kept positions)``, ``S = (1/N_eff) Σ_i (U_Gᵀ g̃_i U_A)²`` — the MC
labels are drawn at kept positions only, and the scores use ``g_i = Σ_kept e_itᵀ a_it``
(``query_mask``/``train_mask`` of the core): a padded loader gives the factors and scores
of the loader with the padding deleted, and a fully padded example scores 0. Without
``mask_fn`` every position counts, padded ones included (their inputs are not zero in a
transformer, so ``A`` would be wrong even when the loss ignores them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlinalg import influence, kron

from .capture import Capture, LossReduction

__all__ = ["Influence", "LayerFactors"]

Strategy = Literal["ekfac", "kfac"]
FisherType = Literal["empirical", "mc"]
DampingRule = Literal["exact", "factored"]

_HEURISTIC_DAMPING = 0.1  # × the layer's mean eigenvalue when damping=None


class LayerFactors(NamedTuple):
    """The fitted curvature of one layer (tensors in ``factor_dtype``)."""

    name: str
    a: Tensor  #: ``A``, ``(d_in[+1], d_in[+1])``
    g: Tensor  #: ``G``, ``(d_out, d_out)``
    a_eigh: kron.Eigh  #: eigendecomposition of ``A``
    g_eigh: kron.Eigh  #: eigendecomposition of ``G``
    correction: Tensor  #: ``S`` (EK-FAC) or ``s_G s_Aᵀ`` (K-FAC), ``(d_out, d_in[+1])``
    damping: float  #: ``λ_l`` actually used


class Influence:
    r"""Influence scores ``g_qᵀ P⁻¹ g_t`` with a K-FAC or EK-FAC curvature (module doc).

    Args:
        model: the trained network.
        loss_fn: ``loss_fn(model(inputs), targets)`` → the batch loss, reduced over the batch
            as ``loss_reduction`` says (default ``F.cross_entropy``, a mean). Per-example
            gradients are those of each example's own loss either way.
        strategy: ``"ekfac"`` (eigenvalue-corrected, the default as in kronfluence) or
            ``"kfac"``.
        damping: ``λ > 0`` added to the curvature of every layer, or ``None`` (default) for
            ``0.1 × the layer's mean eigenvalue`` (mean of ``S``; for K-FAC of ``s_G s_Aᵀ``).
        fisher: ``"empirical"`` (data labels; default) or ``"mc"`` (labels sampled from the
            softmax of ``(B, C)`` logits, one draw per example and pass).
        modules: the layers to score (modules or their names in ``model.named_modules()``);
            default every supported layer whose weight requires grad.
        damping_rule: K-FAC only: ``"exact"`` (``A⊗G + λI``, default) or ``"factored"``
            (π-split ``(A + λ_A)⊗(G + λ_G)``).
        loss_reduction: ``"mean"`` or ``"sum"``: how ``loss_fn`` reduces over the batch.
        factor_dtype: dtype of the factors, eigenbases, captures and scores.
        generator, seed: the ``torch.Generator`` of the MC labels (default: one seeded with
            ``seed`` on the model's device).
        mask_fn: ``mask_fn(batch)`` → a boolean tensor of the model output's leading shape
            (``(B, T)`` for sequence logits), ``True`` where the position counts, or ``None``
            (default: everything counts). Applied to every batch of every pass, query
            included (module docstring, "Padding").

    After :meth:`fit`, :attr:`factors` holds one :class:`LayerFactors` per layer.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], Tensor] = F.cross_entropy,
        *,
        strategy: Strategy = "ekfac",
        damping: float | None = None,
        fisher: FisherType = "empirical",
        modules: Iterable[nn.Module | str] | None = None,
        damping_rule: DampingRule = "exact",
        loss_reduction: LossReduction = "mean",
        factor_dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        mask_fn: Callable[[Any], Tensor | None] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
        if strategy not in ("ekfac", "kfac"):
            raise ValueError(f"strategy must be 'ekfac' or 'kfac'; got {strategy!r}")
        if fisher not in ("empirical", "mc"):
            raise ValueError(f"fisher must be 'empirical' or 'mc'; got {fisher!r}")
        if damping_rule not in ("exact", "factored"):
            raise ValueError(f"damping_rule must be 'exact' or 'factored'; got {damping_rule!r}")
        if damping_rule == "factored" and strategy != "kfac":
            raise ValueError("damping_rule='factored' needs strategy='kfac'")
        if damping is not None and (
            isinstance(damping, bool)
            or not isinstance(damping, (int, float))
            or not damping > 0
            or damping == float("inf")
        ):
            raise ValueError(f"damping must be a positive number or None; got {damping!r}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum'; got {loss_reduction!r}")
        if factor_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"factor_dtype must be torch.float32 or float64; got {factor_dtype}")
        if mask_fn is not None and not callable(mask_fn):
            raise TypeError(f"mask_fn must be callable or None; got {type(mask_fn).__name__}")
        self.mask_fn = mask_fn
        self.model = model
        self.loss_fn = loss_fn
        self.strategy: Strategy = strategy
        self.damping = None if damping is None else float(damping)
        self.fisher: FisherType = fisher
        self.damping_rule: DampingRule = damping_rule
        self.loss_reduction: LossReduction = loss_reduction
        self.factor_dtype = factor_dtype
        self.modules = _resolve_modules(model, modules)
        if fisher == "mc" and generator is None:
            generator = torch.Generator(device=next(model.parameters()).device)
            generator.manual_seed(
                int(torch.randint(0, 2**62, (), dtype=torch.int64)) if seed is None else seed
            )
        self.generator = generator
        self.factors: list[LayerFactors] | None = None
        self.num_examples = 0  #: training examples seen by :meth:`fit` (padded ones included)

    # ------------------------------------------------------------------ fitting

    def fit(self, train_loader: Iterable[Any]) -> Influence:
        """Fit ``A``, ``G``, their eigenbases and (EK-FAC) the correction over the loader.

        Streams the loader once (K-FAC) or twice (EK-FAC); returns ``self``."""
        which = "sampled" if self.fisher == "mc" else "data"
        with self._session() as capture:
            names = [layer.name for layer in capture.layers]
            sums_a: list[Tensor | None] = [None] * len(names)
            sums_g: list[Tensor | None] = [None] * len(names)
            # Per layer: the examples (with a kept position) and the rows (kept positions)
            # seen so far, the denominators of the exact means over the loader.
            examples = [0.0] * len(names)
            rows = [0.0] * len(names)
            total = 0
            for batch in train_loader:
                pairs, size, masks = self._batch_captures(capture, batch, which)
                for index, ((a, e), mask) in enumerate(zip(pairs, masks)):
                    # Batch means weighted by their counts: exact means over the loader.
                    count_a, count_g = _counts(a, mask)
                    part_a = kron.input_factor(a, check_finite=False, mask=mask) * count_a
                    part_g = kron.factor(e, check_finite=False, mask=mask) * count_g
                    sums_a[index] = part_a if sums_a[index] is None else sums_a[index] + part_a
                    sums_g[index] = part_g if sums_g[index] is None else sums_g[index] + part_g
                    examples[index] += count_a
                    rows[index] += count_g
                total += size
            if total == 0:
                raise ValueError("train_loader yielded no batch")
            # An all-padded loader gives zero factors (0 / 1), as the core's masked means.
            factors_a = [s / max(n, 1.0) for s, n in zip(sums_a, examples)]  # type: ignore[operator]
            factors_g = [s / max(n, 1.0) for s, n in zip(sums_g, rows)]  # type: ignore[operator]
            eighs = [(_eigh(a), _eigh(g)) for a, g in zip(factors_a, factors_g)]
            if self.strategy == "ekfac":
                sums_s: list[Tensor | None] = [None] * len(names)
                for batch in train_loader:
                    pairs, _, masks = self._batch_captures(capture, batch, which)
                    for index, ((a, e), mask, (a_eigh, g_eigh)) in enumerate(
                        zip(pairs, masks, eighs)
                    ):
                        count_a, _ = _counts(a, mask)
                        part = (
                            kron.eigen_correction(
                                a, e, a_eigh, g_eigh, check_finite=False, mask=mask
                            )
                            * count_a
                        )
                        sums_s[index] = part if sums_s[index] is None else sums_s[index] + part
                corrections = [
                    s / max(n, 1.0)  # type: ignore[operator]
                    for s, n in zip(sums_s, examples)
                ]
            else:
                # K-FAC's eigenvalues s_G s_Aᵀ: P = A⊗G + λI in the same eigenbasis.
                corrections = [
                    g_eigh.values[:, None] * a_eigh.values[None, :] for a_eigh, g_eigh in eighs
                ]
        self.factors = [
            LayerFactors(
                name,
                a,
                g,
                a_eigh,
                g_eigh,
                correction,
                self.damping
                if self.damping is not None
                else _HEURISTIC_DAMPING * float(correction.mean()),
            )
            for name, a, g, (a_eigh, g_eigh), correction in zip(
                names, factors_a, factors_g, eighs, corrections
            )
        ]
        for layer in self.factors:
            if not layer.damping > 0:
                raise ValueError(
                    f"layer {layer.name!r}: the curvature is zero, so damping=None gives no "
                    "positive damping; pass damping=λ > 0"
                )
        self._preconditioner = self._build_preconditioner()
        self.num_examples = total
        return self

    def _build_preconditioner(self) -> list[tuple[Any, ...]]:
        assert self.factors is not None
        if self.damping_rule == "factored":
            inverses = []
            for layer in self.factors:
                damping_a, damping_g = kron.split_damping(layer.a, layer.g, layer.damping)
                inverses.append(
                    (
                        kron.inverse(layer.a, damping_a, check_finite=False),
                        kron.inverse(layer.g, damping_g, check_finite=False),
                    )
                )
            return inverses
        return [
            (layer.a_eigh, layer.g_eigh, layer.correction, layer.damping) for layer in self.factors
        ]

    # ------------------------------------------------------------------ scores

    def pairwise_scores(self, query: Any, train_loader: Iterable[Any]) -> Tensor:
        """``(B_q, N_train)`` scores ``g_qᵀ P⁻¹ g_t`` of every query example against every
        training example, in the loader's order.

        ``query``: one batch ``(inputs, targets)`` or an iterable of batches (their examples
        concatenated). The query's captures are computed once; the training loader is
        streamed batch by batch (only one batch's captures in memory)."""
        self._require_fit()
        columns = []
        with self._session() as capture:
            query_pairs = self._query_captures(capture, query)
            for batch in train_loader:
                pairs, _, masks = self._batch_captures(capture, batch, "data")
                columns.append(self._scores(query_pairs, (pairs, masks)))
        if not columns:
            raise ValueError("train_loader yielded no batch")
        return torch.cat(columns, dim=1)

    def self_scores(self, loader: Iterable[Any]) -> Tensor:
        """``(N,)`` self-influence ``g_iᵀ P⁻¹ g_i`` of every example of the loader (the
        diagonal of :meth:`pairwise_scores` of the loader against itself, without the
        matrix)."""
        self._require_fit()
        parts = []
        with self._session() as capture:
            for batch in loader:
                pairs, _, masks = self._batch_captures(capture, batch, "data")
                self_scores = (
                    influence.kfac_self_scores
                    if self.damping_rule == "factored"
                    else influence.ekfac_self_scores
                )
                scores = self_scores(
                    pairs, self._preconditioner, check_finite=False, mask=_core_mask(masks)
                )
                parts.append(scores)
        if not parts:
            raise ValueError("loader yielded no batch")
        return torch.cat(parts)

    def top_k(self, *args: Any, k: int | None = None) -> tuple[Tensor, Tensor]:
        """The ``k`` largest scores per query and the training indices that have them.

        ``top_k(scores, k)`` on a ``(B_q, N)`` score matrix, or ``top_k(query,
        train_loader, k)``, which streams the loader keeping only the running top ``k``
        (never the whole matrix). Returns ``(values, indices)``, both ``(B_q, k)``, in
        decreasing order of score (``torch.topk``)."""
        usage = "use top_k(scores, k) or top_k(query, train_loader, k)"
        if args and isinstance(args[0], Tensor):
            if len(args) == 2 and k is None:
                scores, k = args
            elif len(args) == 1 and k is not None:
                scores = args[0]
            else:
                raise TypeError(usage)
            if scores.ndim != 2:
                raise ValueError(f"scores must be (B_q, N); got shape {tuple(scores.shape)}")
            _check_k(k, int(scores.shape[1]))
            return torch.topk(scores, k, dim=1)
        if len(args) == 3 and k is None:
            query, train_loader, k = args
        elif len(args) == 2 and k is not None:
            query, train_loader = args
        else:
            raise TypeError(usage)
        self._require_fit()
        _check_k(k, None)
        best_values: Tensor | None = None
        best_indices: Tensor | None = None
        offset = 0
        with self._session() as capture:
            query_pairs = self._query_captures(capture, query)
            for batch in train_loader:
                pairs, size, masks = self._batch_captures(capture, batch, "data")
                scores = self._scores(query_pairs, (pairs, masks))
                indices = torch.arange(offset, offset + size, device=scores.device)
                indices = indices.expand(scores.shape[0], size)
                if best_values is not None:
                    scores = torch.cat([best_values, scores], dim=1)
                    indices = torch.cat([best_indices, indices], dim=1)  # type: ignore[list-item]
                keep = min(k, int(scores.shape[1]))
                best_values, position = torch.topk(scores, keep, dim=1)
                best_indices = torch.gather(indices, 1, position)
                offset += size
        if best_values is None:
            raise ValueError("train_loader yielded no batch")
        _check_k(k, offset)
        return best_values, best_indices  # type: ignore[return-value]

    def _scores(self, query: _Masked, train: _Masked) -> Tensor:
        # Captures were checked finite per batch (_batch_captures).
        scores = (
            influence.kfac_scores if self.damping_rule == "factored" else influence.ekfac_scores
        )
        return scores(
            query[0],
            train[0],
            self._preconditioner,
            check_finite=False,
            query_mask=_core_mask(query[1]),
            train_mask=_core_mask(train[1]),
        )

    # ------------------------------------------------------------------ captures

    def _session(self) -> _Session:
        return _Session(self)

    def _require_fit(self) -> None:
        if self.factors is None:
            raise RuntimeError("Influence: call fit(train_loader) before computing scores")

    def _query_captures(self, capture: Capture, query: Any) -> _Masked:
        batches = [query] if _is_batch(query) else list(query)
        if not batches:
            raise ValueError("query holds no batch")
        parts = [self._batch_captures(capture, batch, "data") for batch in batches]
        if len(parts) == 1:
            return parts[0][0], parts[0][2]
        layers = range(len(parts[0][0]))
        pairs = [
            (torch.cat([p[0][i][0] for p in parts]), torch.cat([p[0][i][1] for p in parts]))
            for i in layers
        ]
        if all(mask is None for p in parts for mask in p[2]):
            return pairs, [None] * len(pairs)
        masks = [torch.cat([_kept(p[2][i], p[0][i][0]) for p in parts]) for i in layers]
        return pairs, masks

    def _batch_captures(
        self, capture: Capture, batch: Any, which: Literal["data", "sampled"]
    ) -> tuple[list[tuple[Tensor, Tensor]], int, list[Tensor | None]]:
        """``([(a, e), ...], B, masks)`` of one batch: per-example errors of the data loss
        (``which="data"``) or of sampled labels (``"sampled"``), in ``factor_dtype``, and each
        layer's mask (``LayerCapture.mask``; ``None`` without ``mask_fn``)."""
        if not _is_batch(batch):
            raise ValueError(
                f"a batch must be a sequence (inputs, targets, ...); got {type(batch).__name__}"
            )
        inputs, targets = batch[0], batch[1]
        capture.clear()
        try:
            if self.mask_fn is not None:
                capture.set_mask(self.mask_fn(batch))
            with torch.enable_grad():
                output = self.model(inputs)
                if which == "sampled":
                    capture.backward_sampled(output, self.generator)
                else:
                    loss = self.loss_fn(output, targets)
                    if not isinstance(loss, Tensor) or loss.ndim != 0:
                        raise ValueError(
                            "loss_fn must return a scalar tensor (the batch loss, reduced as "
                            "loss_reduction says)"
                        )
                    # Autograd runs every captured node (which records e) but forms no weight
                    # gradient and writes no .grad.
                    torch.autograd.grad(
                        loss, [layer.module.weight for layer in capture.layers], allow_unused=True
                    )
            pairs = []
            for layer in capture.layers:
                if layer.calls != 1:
                    raise ValueError(
                        f"layer {layer.name!r} ran {layer.calls} times in one forward; "
                        "Influence needs each scored layer to run exactly once per batch "
                        "(restrict modules=...)"
                    )
            for a, e in capture.captures(which):
                pairs.append((a.to(self.factor_dtype), e.to(self.factor_dtype)))
            size = int(pairs[0][0].shape[0])
            masks = [layer.mask for layer in capture.layers]
            for (a, e), layer, mask in zip(pairs, capture.layers, masks):
                # The kept positions only: padding may hold anything.
                if mask is not None:
                    a = a[mask]
                if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(e).all())):
                    raise ValueError(
                        f"layer {layer.name!r}: non-finite inputs or output gradients in a batch"
                    )
            return pairs, size, masks
        finally:
            capture.clear()


class _Session:
    """A :class:`Capture` of the scored layers with the model in eval mode, for one pass."""

    def __init__(self, owner: Influence) -> None:
        self.owner = owner

    def __enter__(self) -> Capture:
        owner = self.owner
        self.training = owner.model.training
        owner.model.eval()
        try:
            self.capture = Capture(
                owner.model, layers=owner.modules, loss_reduction=owner.loss_reduction
            )
        except BaseException:
            owner.model.train(self.training)
            raise
        return self.capture

    def __exit__(self, *exc: object) -> None:
        self.capture.remove()
        self.owner.model.train(self.training)


_Masked = tuple[list[tuple[Tensor, Tensor]], list[Tensor | None]]  # captures and their masks


def _counts(a: Tensor, mask: Tensor | None) -> tuple[float, float]:
    """``(examples, rows)`` of one layer's captures: the denominators of its ``A`` (and
    ``S``) and of its ``G``. Without a mask ``(B, B·T)``; with one, the examples with a kept
    position (``B_eff``) and the kept positions."""
    if mask is None:
        return float(a.shape[0]), float(a.shape[:-1].numel())
    return float(kron.example_count(mask, dtype=a.dtype)), float(mask.sum())


def _kept(mask: Tensor | None, a: Tensor) -> Tensor:
    """``mask``, or all-True of ``a``'s leading shape (a query batch without a mask)."""
    if mask is not None:
        return mask
    return torch.ones(a.shape[:-1], dtype=torch.bool, device=a.device)


def _core_mask(masks: list[Tensor | None]) -> list[Tensor | None] | None:
    """Per-layer masks for the core's ``mask=`` keywords (``None`` when nothing is masked)."""
    return None if all(mask is None for mask in masks) else list(masks)


def _eigh(m: Tensor) -> kron.Eigh:
    """``kron.eigh`` in float64 (small eigenvalues of a float32 factor are otherwise lost to
    rounding; once per fit), returned in ``m``'s dtype. Eigenvalues of a PSD factor can come
    out slightly negative by rounding: they are clamped at 0."""
    values, vectors = kron.eigh(m.to(torch.float64), check_finite=False)
    return kron.Eigh(values.clamp_min(0).to(m.dtype), vectors.to(m.dtype))


def _is_batch(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and len(value) >= 2 and not _is_batch_list(value)


def _is_batch_list(value: Sequence[Any]) -> bool:
    # A list of batches (each itself an (inputs, targets) pair) is a loader, not a batch.
    return all(isinstance(item, (tuple, list)) for item in value)


def _resolve_modules(
    model: nn.Module, modules: Iterable[nn.Module | str] | None
) -> list[nn.Module] | None:
    if modules is None:
        return None
    named = dict(model.named_modules())
    resolved = []
    for module in modules:
        if isinstance(module, str):
            if module not in named:
                raise ValueError(f"modules names {module!r}, which is not a module of model")
            module = named[module]
        resolved.append(module)
    if not resolved:
        raise ValueError("modules is empty")
    return resolved


def _check_k(k: Any, available: int | None) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer; got {k!r}")
    if available is not None and k > available:
        raise ValueError(f"k={k} exceeds the {available} training examples scored")
