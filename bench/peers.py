"""Optional peer entries for ``bench_torch_step.py``: kfac-pytorch, ASDL and BackPACK.

Each peer is used only through its public API and only if it imports; nothing here is part of
curvlinalg. The peers live in a **separate virtualenv**, never in the project's (pip must not
touch torch; ``--no-deps`` everywhere, the peers' dependencies by hand)::

    python3 -m venv /work/bench-venv && V=/work/bench-venv/bin     # from /work/main
    $V/pip install torch==2.13.0                        # the same CPU build as .venv
    $V/pip install --no-deps -e .                       # curvlinalg + curvlinalg_torch
    $V/pip install numpy scipy array-api-compat matplotlib
    $V/pip install --no-deps ../shared/peers/kfac_pytorch-0.4.2-py3-none-any.whl  # kfac-pytorch
    $V/pip install --no-deps asdfghjkl==0.1a4           # ASDL (``import asdl``)
    $V/pip install --no-deps backpack-for-pytorch einops unfoldNd   # BackPACK
    $V/python bench/bench_torch_step.py                 # peers included

Entries (SGD with momentum 0.9 applies every preconditioned gradient; damping ``λ`` = the
benchmark's ``--damping`` = 1.0, split between the Kronecker factors by the π rule of
Martens & Grosse, as in curvlinalg_torch.KFAC):

* ``asdl-kfac u=1 i=1`` (only with ``every_step_inverses``, ``--every-step-peers``; not at
  our periods) — ``asdl.KfacGradientMaker`` with ``fisher_type=FISHER_MC`` (one
  sampled label per example, one extra backward) and ASDL's default schedule: factors of the
  current batch only (no running average) and their damped Cholesky inverses, *every step*.
* ``asdl-kfac-ema u=1 i=1`` (only with ``every_step_inverses``) — the same maker with ASDL's
  EMA of the factors (``ema_decay`` =
  0.05, i.e. our 0.95), factors and inverses every step (added because the batch-only factors
  of ``asdl-kfac u=1 i=1`` once gave a non-positive-definite Cholesky mid-run).
* ``asdl-kfac u=1 i=100`` — the same maker with ASDL's EMA of the factors (``ema_decay`` =
  0.05, i.e. our 0.95) updated every step and the inverses refreshed every ``--inverse-every``
  steps (``preconditioner_upd_interval``): the refresh periods of our ``kfac-mc u=1``.
* ``asdl-smw-ng u=1`` — ``asdl.SmwEmpNaturalGradientMaker``: natural gradient with the
  **empirical** Fisher of the batch over all parameters, ``(F_emp + λI)⁻¹∇``, via the
  Sherman–Morrison–Woodbury identity on the ``B×B`` Gram matrix (computed with ASDL's
  ``OP_GRAM_HADAMARD``), every step. lr 0.01 like ``bench_torch_natural_gradient.py``.
* ``asdl-kfac u=10 i=100`` — the same with the factors refreshed every 10 steps
  (``curvature_upd_interval=10``): the periods of our ``kfac-mc u=10``.
* ``kfac-pytorch u=1 i=100`` / ``kfac-pytorch u=10 i=100`` — kfac-pytorch 0.4.2 (KAISA,
  gpauloski/kfac-pytorch; a wheel in ``/work/shared/peers/``), ``kfac.preconditioner.
  KFACPreconditioner`` with ``factor_update_steps`` = 1 / 10 and ``inv_update_steps`` =
  ``--inverse-every`` (our periods), ``factor_decay=0.95`` (our EMA), ``damping`` = λ,
  ``compute_method="inverse"`` (explicit damped inverses, as ours; its default is an
  eigendecomposition) and no KL clipping (``kl_clip`` given as a callable that returns None,
  which its ``step`` documents as "no scaling"; ours has none). Differences that remain:
  kfac-pytorch's factors are the **empirical** Fisher of the batch (its hooks read the
  gradients of the loss itself, no sampled labels; compare with our ``kfac-emp`` entries), its
  ``G`` is built from the gradients of the *mean* loss (``1/B²`` of ours) and λ is added to both
  factors whole (``(A + λI)``, ``(G + λI)``; ours splits ``√λ`` by the π rule). Equal work per
  step; different steps. ``preconditioner.step()`` rewrites ``.grad``, then
  ``torch.optim.SGD(lr=0.1, momentum=0.9)`` applies it.
* ``backpack-kfac u=1 i=100`` — BackPACK's ``KFAC(mc_samples=1)`` extension (MC Fisher: one
  sampled square root of the loss Hessian back-propagated by BackPACK alongside the gradient)
  gives the factors every step; the *minimal* K-FAC update on top of them is written below
  (BackPACK ships curvature, not an optimizer): EMA 0.95 of the factors, π-damped Cholesky
  inverses every ``--inverse-every`` steps (same period as ours), ``G⁻¹ ∇W A⁻¹`` for the
  weight and ``G⁻¹ ∇b`` for the bias (BackPACK's ``A`` has no bias column).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: one full training step (zero_grad, forward, loss, backward, step) on ``(x, y)``; returns the loss
Step = Callable[[Tensor, Tensor], Tensor]
#: builds a :data:`Step` for a fresh copy of the benchmark model
Builder = Callable[[nn.Module], Step]


class _NoNvtx:
    """Stand-in for ``torch.cuda.nvtx`` in ASDL's natural_gradient module on CPU-only torch.

    ASDL 0.1a4 wraps each inverse refresh of its accumulating (EMA) path in
    ``torch.cuda.nvtx.range(...)``, a CUDA profiler annotation that raises
    "NVTX functions not installed" on a CPU build of torch. The annotation does no computation,
    so the benchmark replaces it by a no-op context in that ASDL module only.
    """

    @staticmethod
    def range(message: str) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


def _asdl_builders(
    batch: int, damping: float, inverse_every: int, every_step_inverses: bool
) -> dict[str, Builder]:
    import asdl  # asdfghjkl==0.1a4 installs the package ``asdl``
    import asdl.precondition.natural_gradient as asdl_natural_gradient

    if not torch.cuda.is_available():
        asdl_natural_gradient.nvtx = _NoNvtx  # see _NoNvtx
    # ASDL registers plain module backward hooks, which torch 2.13 flags as deprecated.
    warnings.filterwarnings(
        "ignore", message="Using a non-full backward hook", category=FutureWarning
    )

    def kfac(inverse_every_: int | None, factor_every: int = 1) -> Builder:
        def build(model: nn.Module) -> Step:
            if inverse_every_ is None:  # ASDL default: no accumulation, inverses with factors
                config = asdl.PreconditioningConfig(data_size=batch, damping=damping)
            else:
                config = asdl.PreconditioningConfig(
                    data_size=batch,
                    damping=damping,
                    ema_decay=0.05,  # ASDL: avg·(1 − d) + new·d, i.e. our ema_decay 0.95
                    curvature_upd_interval=factor_every,
                    preconditioner_upd_interval=inverse_every_,
                )
            maker = asdl.KfacGradientMaker(model, config, fisher_type=asdl.FISHER_MC)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

            def step(x: Tensor, y: Tensor) -> Tensor:
                optimizer.zero_grad()
                dummy_y = maker.setup_model_call(model, x)
                maker.setup_loss_call(F.cross_entropy, dummy_y, y)
                _, loss = maker.forward_and_backward()
                optimizer.step()
                return loss

            return step

        return build

    def smw(model: nn.Module) -> Step:
        config = asdl.SmwEmpNaturalGradientConfig(data_size=batch, damping=damping)
        maker = asdl.SmwEmpNaturalGradientMaker(model, config)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(x: Tensor, y: Tensor) -> Tensor:
            optimizer.zero_grad()
            dummy_y = maker.setup_model_call(model, x)
            maker.setup_loss_call(F.cross_entropy, dummy_y, y)
            _, loss = maker.forward_and_backward()
            optimizer.step()
            return loss

        return step

    every_step = {"asdl-kfac u=1 i=1": kfac(None), "asdl-kfac-ema u=1 i=1": kfac(1)}
    return {
        **(every_step if every_step_inverses else {}),
        f"asdl-kfac u=1 i={inverse_every}": kfac(inverse_every),
        f"asdl-kfac u=10 i={inverse_every}": kfac(inverse_every, 10),
        "asdl-smw-ng u=1": smw,
    }


def _kfac_pytorch_builders(damping: float, inverse_every: int) -> dict[str, Builder]:
    import logging

    with warnings.catch_warnings():  # "NVIDIA Apex is not installed": a GPU-only fast path
        warnings.simplefilter("ignore", UserWarning)
        from kfac.preconditioner import KFACPreconditioner

    def kfac(factor_every: int) -> Builder:
        def build(model: nn.Module) -> Step:
            preconditioner = KFACPreconditioner(
                model,
                factor_update_steps=factor_every,
                inv_update_steps=inverse_every,
                damping=damping,
                factor_decay=0.95,
                kl_clip=lambda _step: None,  # no KL clipping (ours has none)
                lr=0.1,  # only read by the KL clipping
                compute_method="inverse",
                loglevel=logging.DEBUG,
            )
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

            def step(x: Tensor, y: Tensor) -> Tensor:
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                preconditioner.step()
                optimizer.step()
                return loss

            return step

        return build

    return {
        f"kfac-pytorch u=1 i={inverse_every}": kfac(1),
        f"kfac-pytorch u=10 i={inverse_every}": kfac(10),
    }


def _backpack_builders(damping: float, inverse_every: int) -> dict[str, Builder]:
    from backpack import backpack, extend
    from backpack.extensions import KFAC as BackpackKFAC

    # The model's input does not require grad: torch notes that the first layer's full backward
    # hook then fires with respect to module outputs only, which is all BackPACK needs here.
    warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)

    def build(model: nn.Module) -> Step:
        model = extend(model)
        loss_fn = extend(nn.CrossEntropyLoss())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
        state: dict[nn.Linear, dict[str, Tensor]] = {layer: {} for layer in layers}
        count = [0]

        # Minimal K-FAC update on top of BackPACK's Kronecker factors (BackPACK computes the
        # curvature only): running averages of its factors, π-damped inverses at the same period
        # as ours, then the usual SGD-with-momentum step on the preconditioned gradients.
        def step(x: Tensor, y: Tensor) -> Tensor:
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            with backpack(BackpackKFAC(mc_samples=1)):
                loss.backward()
            refresh = count[0] % inverse_every == 0
            count[0] += 1
            with torch.no_grad():
                for layer in layers:
                    g_new, a_new = layer.weight.kfac  # (d_out, d_out), (d_in, d_in)
                    s = state[layer]
                    if "A" not in s:
                        s["A"], s["G"] = a_new.clone(), g_new.clone()
                    else:
                        s["A"].mul_(0.95).add_(a_new, alpha=0.05)
                        s["G"].mul_(0.95).add_(g_new, alpha=0.05)
                    if refresh:
                        a, g = s["A"], s["G"]
                        pi = ((a.trace() / a.shape[0]) / (g.trace() / g.shape[0])).sqrt()
                        pi = pi.clamp(min=1e-8) if torch.isfinite(pi) else pi.new_ones(())
                        root = damping**0.5
                        s["A_inv"] = _damped_inverse(a, float(root * pi))
                        s["G_inv"] = _damped_inverse(g, float(root / pi))
                    layer.weight.grad = s["G_inv"] @ layer.weight.grad @ s["A_inv"]
                    if layer.bias is not None:
                        layer.bias.grad = s["G_inv"] @ layer.bias.grad
            optimizer.step()
            return loss

        return step

    return {f"backpack-kfac u=1 i={inverse_every}": build}


def _damped_inverse(m: Tensor, damping: float) -> Tensor:
    shifted = m + damping * torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
    return torch.cholesky_inverse(torch.linalg.cholesky(shifted))


def peer_builders(
    batch: int, damping: float, inverse_every: int, every_step_inverses: bool = False
) -> tuple[dict[str, Builder], list[str]]:
    """The peers that import here, and one printable reason per peer that does not (ASDL's
    every-step-inverse entries only with ``every_step_inverses``)."""
    builders: dict[str, Builder] = {}
    skipped: list[str] = []
    for label, make in (
        (
            "kfac-pytorch (pip install --no-deps "
            "/work/shared/peers/kfac_pytorch-0.4.2-py3-none-any.whl, in the bench venv)",
            lambda: _kfac_pytorch_builders(damping, inverse_every),
        ),
        (
            "ASDL (pip install --no-deps asdfghjkl==0.1a4)",
            lambda: _asdl_builders(batch, damping, inverse_every, every_step_inverses),
        ),
        (
            "BackPACK (pip install --no-deps backpack-for-pytorch einops unfoldNd)",
            lambda: _backpack_builders(damping, inverse_every),
        ),
    ):
        try:
            builders.update(make())
        except Exception as error:  # ImportError, or an incompatibility with this torch
            skipped.append(f"{label}: skipped ({type(error).__name__}: {error})")
    return builders, skipped


def check_decreases(
    name: str, build: Builder, model: nn.Module, pool: list[tuple[Tensor, Tensor]], steps: int = 20
) -> tuple[float, float]:
    """Train ``model`` ``steps`` steps on the benchmark batches; the pool loss must drop."""

    def pool_loss() -> float:
        with torch.no_grad():
            return sum(float(F.cross_entropy(model(x), y)) for x, y in pool) / len(pool)

    before = pool_loss()
    step = build(model)
    for index in range(steps):
        x, y = pool[index % len(pool)]
        loss = step(x, y)
        if not torch.isfinite(loss):
            raise AssertionError(f"{name}: non-finite loss at step {index}")
    after = pool_loss()
    if not after < before:
        raise AssertionError(
            f"{name}: loss did not decrease in {steps} steps ({before} -> {after})"
        )
    return before, after
