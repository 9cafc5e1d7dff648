"""Helpers shared by the training scripts (``train_demo.py``, ``reproduce_benzing.py``,
``reproduce_puiu.py``): threads, Benzing's MLP, batch orders, the timed training loop,
evaluation, JSON output and matplotlib figures.

Only the standard library is imported at module level, so that a script can call
:func:`limit_threads` before NumPy and PyTorch are loaded; every function imports what it
needs.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from curvlinalg import NotPositiveDefiniteError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def limit_threads(threads: int) -> None:
    """Use ``threads`` BLAS/OpenMP threads (call before importing NumPy or PyTorch)."""
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[variable] = str(threads)
    import torch

    torch.set_num_threads(threads)


def sum_to_mean(lr: float, damping: float, batch: int) -> tuple[float, float]:
    """A published sum-over-batch ``(lr, λ)`` in curvlinalg's mean-factor convention.

    Benzing's code sums the input factor ``A = Σ_i a_i a_iᵀ`` of a linear layer over the batch
    (NOTES.md §1, §2.4); curvlinalg averages it. ``(A_sum + λI)⁻¹ = (1/B)(A_mean + (λ/B)I)⁻¹``
    (and likewise for K-FAC's π-damped pair, whose π scales by √B), so the same steps are
    taken at ``(lr/B, λ/B)`` (NOTES.md §6 identity 8).
    """
    if batch < 1:
        raise ValueError(f"batch must be a positive integer; got {batch!r}")
    return lr / batch, damping / batch


def benzing_mlp(seed: int, widths: Sequence[int] = (784, 1000, 1000, 1000, 10)) -> nn.Module:
    """Benzing's MLP: ReLU between layers, no biases, Kaiming-normal (fan-in, ReLU gain, also
    on the output layer), initialised from ``torch.manual_seed(seed)``."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for index, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
        linear = nn.Linear(d_in, d_out, bias=False)
        nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        layers.append(linear)
        if index < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def batch_order(
    n_train: int, batch: int, total_steps: int, seed: int, *, drop_last: bool = True
) -> list[torch.Tensor]:
    """Index tensors of ``total_steps`` mini-batches: one seeded permutation of the training
    set per epoch, cut into batches (the last, partial batch dropped when ``drop_last``)."""
    import torch

    order = torch.Generator().manual_seed(seed)
    steps_per_epoch = n_train // batch if drop_last else math.ceil(n_train / batch)
    if steps_per_epoch < 1:
        raise ValueError(f"{n_train} training examples make no batch of {batch}")
    batches: list[torch.Tensor] = []
    while len(batches) < total_steps:
        permutation = torch.randperm(n_train, generator=order)
        if drop_last:
            permutation = permutation[: steps_per_epoch * batch]
        batches.extend(permutation.split(batch))
    return batches[:total_steps]


def progress(iterable: Iterable[Any], description: str, enabled: bool) -> Iterable[Any]:
    """``iterable`` wrapped in a tqdm bar when ``enabled`` and tqdm is installed."""
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:  # progress bars are optional
        return iterable
    return tqdm(iterable, desc=description, unit="step", leave=True)


def train(
    model: nn.Module,
    optimizer: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    batches: Sequence[torch.Tensor],
    loss_function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    name: str = "",
    label_width: int = 22,
    show_progress: bool = True,
    step_closure: bool = False,
    steps_per_epoch: int | None = None,
    after_epoch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train ``model`` on ``x[batches[k]]`` for every step ``k``; time each step.

    A step is ``zero_grad``, forward, ``loss.backward()``, ``step()`` (``step(closure)`` with a
    closure that re-runs the batch's forward when ``step_closure``, as QE-KLD-WRM needs). Stops
    at the first non-finite loss, or when the optimizer raises
    ``curvlinalg.NotPositiveDefiniteError`` (its curvature overflowed; that step has no loss).
    ``after_epoch(epoch)`` runs (untimed) after every ``steps_per_epoch`` steps. Returns
    ``losses`` (mini-batch loss per update), ``step_seconds`` and ``epoch_seconds`` (sum of the
    step times of each epoch; evaluation excluded) and ``diverged_at`` (step index or None).
    """
    model.train()
    losses: list[float] = []
    times: list[float] = []
    epoch_seconds: list[float] = []
    diverged_at = None
    per_epoch = steps_per_epoch or len(batches)
    elapsed = 0.0
    for step in progress(range(len(batches)), name.rjust(label_width), show_progress):
        index = batches[step]
        inputs, targets = x[index], y[index]
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_function(model(inputs), targets)
        loss.backward()
        try:
            if step_closure:
                optimizer.step(lambda inputs=inputs: model(inputs))
            else:
                optimizer.step()
        except NotPositiveDefiniteError as error:
            # A diverged run: its curvature overflowed (finite but huge captures). Record it
            # like a non-finite loss and go on with the other methods.
            print(f"{name}: {error} at step {step}; stopping it")
            diverged_at = step
            break
        seconds = time.perf_counter() - start
        times.append(seconds)
        elapsed += seconds
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            print(f"{name}: loss became {losses[-1]} at step {step}; stopping it")
            diverged_at = step
            break
        if (step + 1) % per_epoch == 0 or step + 1 == len(batches):
            epoch_seconds.append(elapsed)
            elapsed = 0.0
            if after_epoch is not None:
                after_epoch(len(epoch_seconds))
                model.train()
    return {
        "losses": losses,
        "step_seconds": times,
        "step_seconds_median": statistics.median(times[1:] or times) if times else math.nan,
        "epoch_seconds": epoch_seconds,
        "diverged_at": diverged_at,
    }


def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    chunk: int = 1000,
) -> tuple[float, float]:
    """``(mean loss, accuracy)`` of ``model`` in eval mode on ``(x, y)``, ``chunk`` at a time
    (``loss_function`` must average over its batch)."""
    import torch

    model.eval()
    total_loss = 0.0
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), chunk):
            outputs = model(x[i : i + chunk])
            targets = y[i : i + chunk]
            total_loss += float(loss_function(outputs, targets)) * len(targets)
            correct += int((outputs.argmax(1) == targets).sum())
    return total_loss / len(x), correct / len(x)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); NaN for both when a value is not
    finite (a diverged run has no meaningful spread)."""
    values = [float(v) for v in values]
    if not all(math.isfinite(v) for v in values):
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def add_seed_arguments(parser: Any, default_seeds: int, merged: str) -> None:
    """``--seeds N``, ``--first-seed F`` (seeds F … F+N−1) and ``--merge JSON…`` (join the
    ``merged`` files of runs over other seed ranges, running nothing)."""
    parser.add_argument("--seeds", type=int, default=default_seeds, help="seeds F … F+N−1")
    parser.add_argument("--first-seed", type=int, default=0, help="F (default 0)")
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help=f"run nothing: join {merged} files (one per seed range or method) into --out",
    )


def seed_range(first: int, count: int) -> list[int]:
    """Seeds ``first … first + count − 1``: a long reproduction split over processes (one
    seed each, ``--first-seed s --seeds 1``) runs exactly the seeds of one long run."""
    if first < 0 or count < 1:
        raise ValueError(f"first seed {first} must be ≥ 0 and the seed count {count} ≥ 1")
    return list(range(first, first + count))


def merge_runs(parts: Sequence[dict[str, list[dict[str, Any]]]]) -> dict[str, list[dict[str, Any]]]:
    """Join the ``runs`` (method → one dict per seed, each with a ``"seed"``) of partial
    reproduction runs into one, methods in first-seen order and each method's runs in seed
    order. A seed that two parts both ran for one method is an error (it would be counted
    twice in the mean ± std)."""
    merged: dict[str, list[dict[str, Any]]] = {}
    for runs in parts:
        for method, per_seed in runs.items():
            merged.setdefault(method, []).extend(per_seed)
    for method, per_seed in merged.items():
        seeds = [run["seed"] for run in per_seed]
        repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1})
        if repeated:
            raise ValueError(f"{method}: seed(s) {repeated} appear in more than one part")
        per_seed.sort(key=lambda run: run["seed"])
    return merged


def read_parts(paths: Sequence[str], experiment: str) -> list[dict[str, Any]]:
    """The JSON payloads at ``paths``, each checked to be a run of ``experiment``."""
    payloads = []
    for path in paths:
        payload = json.loads(Path(path).read_text())
        if payload.get("experiment") != experiment:
            raise ValueError(
                f"{path} holds {payload.get('experiment')!r}, not {experiment!r}: cannot merge"
            )
        payloads.append(payload)
    return payloads


def write_json(path: Path, payload: Any) -> None:
    """Write ``payload`` as JSON (non-finite floats as null), creating the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(payload), indent=1))


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or None (with a message) if not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figure (pip install matplotlib)")
        return None
    return plt


def smooth(values: Sequence[float], window: int) -> Any:
    """Moving mean over ``window`` values (``valid`` part), as a NumPy array."""
    import numpy as np

    values = np.asarray(values, dtype=float)
    window = max(1, min(window, len(values)))
    return np.convolve(values, np.ones(window) / window, mode="valid")


def plot_mean_std(
    axis: Any, curves: Sequence[Sequence[float]], label: str, window: int = 1, **style: Any
) -> None:
    """Mean ± standard deviation over ``curves`` (seeds) of their ``window``-moving means,
    against the (1-based) update index; curves are cut to the shortest (a diverged seed)."""
    import numpy as np

    length = min(len(curve) for curve in curves)
    if length == 0:
        return
    window = max(1, min(window, length))
    smoothed = np.stack([smooth(curve[:length], window) for curve in curves])
    steps = np.arange(window, length + 1)
    mean = smoothed.mean(axis=0)
    (line,) = axis.plot(steps, mean, label=label, **style)
    if len(curves) > 1:
        std = smoothed.std(axis=0, ddof=1)
        lower = np.clip(mean - std, mean * 1e-3, None)  # keep the band on a log axis
        axis.fill_between(steps, lower, mean + std, color=line.get_color(), alpha=0.2)
