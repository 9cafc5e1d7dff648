"""EK-FAC influence scores: curvlinalg against kronfluence (PyPI ``kronfluence``), same model and data.

Setting. An MLP ``784-H-10`` (ReLU, with biases; ``--hidden`` H = 256) is trained with SGD for
``--pretrain-steps`` steps on Fashion-MNIST (``bench/data.py``), seed 0. EK-FAC factors are
fitted on ``--train`` (1000) training images; the pairwise scores
``s_qt = Σ_layers ⟨P_l⁻¹ g_q, g_t⟩`` of ``--queries`` (20) test images against those 1000
training images are then computed by

* ``kronfluence``: ``Analyzer.fit_all_factors`` with ``FactorArguments(strategy="ekfac")`` and
  ``Analyzer.compute_pairwise_scores`` (its public API; installed in a separate venv, see
  below);
* ``ours``: ``curvlinalg_torch.Influence(strategy="ekfac")`` (``fit``, ``pairwise_scores``:
  captures, ``kron.eigen_correction``, ``influence.ekfac_scores``; no per-example gradient);
* ``reference`` (not timed): the definition, in float64, from explicit per-example gradients
  (``torch.func.vmap(grad)``), dense eigenbasis rotations and an explicit diagonal solve —
  empirical Fisher only (the MC Fisher is random, so it has no deterministic reference).

Both libraries are set to the same conventions where their APIs allow it (see the table the
script prints and ``bench/README.md``): per-example loss gradients (kronfluence's task sums
the losses; our capture rescales the mean loss), factors averaged over the ``N`` examples,
``A`` with the bias column, the same damping ``λ`` added to the corrected eigenvalues ``S``,
the same sign (a positive score: the training example's gradient step lowers the query's
loss). Fisher: ``--fisher empirical`` (true labels, deterministic: the like-for-like run) and
``mc`` (one label per example sampled from the model, kronfluence's default "true Fisher";
the two libraries draw different labels, so ``ours`` is also run with a second seed to show
the sampling noise floor). Damping: each value of ``--dampings``; ``heuristic`` is
kronfluence's ``damping_factor=None`` (``0.1·mean(S_l)`` per layer), reproduced per layer on
our side.

Reported: Pearson and Spearman correlation over all ``queries × train`` scores, the mean
per-query Spearman, the top-10 overlap per query, the relative difference ``‖x − y‖/‖y‖`` and
the least-squares scale ``⟨x, y⟩/⟨y, y⟩`` (a convention mismatch shows as a scale ≠ 1); and
per library the time to fit the factors and to compute the scores (median of ``--repeats``)
and the peak resident memory above the process's baseline (each library runs in its own
subprocess, threads pinned to ``--threads``).

kronfluence is never a project dependency. Install it into its own venv (torch pinned to the
project's version; ``--no-deps`` so that pip never replaces torch)::

    python3 -m venv /work/peers-venv
    /work/peers-venv/bin/pip install torch==2.13.0
    /work/peers-venv/bin/pip install --no-deps kronfluence==1.0.1 accelerate einops einconv \\
        opt-einsum safetensors tqdm
    /work/peers-venv/bin/pip install numpy scipy array-api-compat psutil pyyaml packaging huggingface_hub
    /work/peers-venv/bin/pip install --no-deps -e .
    taskset -c 0,1 /work/peers-venv/bin/python bench/peer_kronfluence.py

Without kronfluence the script prints why and exits 0. ``--quick``: a 784-32-10 model on 200
images of the shipped MNIST subset, 5 queries, empirical Fisher and the heuristic damping only,
one round (a smoke test).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "ekfac"


def _pin_threads(threads: int) -> None:
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = str(threads)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist", "mnist"])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--train", type=int, default=1000, help="training examples (fit, scores)")
    parser.add_argument("--queries", type=int, default=20, help="query (test) examples")
    parser.add_argument("--batch", type=int, default=100, help="batch of every pass")
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--fisher", default="empirical,mc", help="comma-separated: empirical, mc")
    parser.add_argument(
        "--dampings", default="heuristic,1e-8", help="comma-separated λ values or 'heuristic'"
    )
    parser.add_argument("--repeats", type=int, default=2, help="rounds (one process per job each)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=str(RESULTS / "peer_kronfluence.json"))
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    parser.add_argument("--worker", choices=["kronfluence", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--setup", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.train, args.queries, args.pretrain_steps = 32, 200, 5, 20
        args.repeats, args.batch, args.fisher, args.dampings = 1, 50, "empirical", "heuristic"
        if args.json == str(RESULTS / "peer_kronfluence.json"):
            args.json = str(HERE / "results" / "tmp" / "peer_kronfluence_quick.json")
    return args


def _dampings(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


# ------------------------------------------------------------------------------ setup


def _mlp(widths: list[int]) -> Any:
    from torch import nn

    layers: list[nn.Module] = []
    for index, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if index < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def prepare(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    """Train the model and save it with the fit/score and query examples to ``path``."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(HERE))
    import data

    name = "mnist-subset" if args.quick else args.dataset
    x_train, y_train, x_test, y_test = (torch.from_numpy(a) for a in data.load(name))
    widths = [784, args.hidden, 10]
    torch.manual_seed(0)
    model = _mlp(widths)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    order = torch.Generator().manual_seed(0)
    permutation = torch.randperm(len(x_train), generator=order)
    for step in range(args.pretrain_steps):
        start = (step * args.batch) % (len(x_train) - args.batch)
        index = permutation[start : start + args.batch]
        optimizer.zero_grad()
        F.cross_entropy(model(x_train[index]), y_train[index]).backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    setup = {
        "widths": widths,
        "state": model.state_dict(),
        "x_fit": x_train[: args.train].clone(),
        "y_fit": y_train[: args.train].clone(),
        "x_query": x_test[: args.queries].clone(),
        "y_query": y_test[: args.queries].clone(),
        "batch": args.batch,
        "dataset": name,
        "test_accuracy": accuracy,
    }
    torch.save(setup, path)
    return setup


def _load_setup(path: str) -> tuple[Any, dict[str, Any]]:
    import torch

    setup = torch.load(path, weights_only=False)
    model = _mlp(setup["widths"])
    model.load_state_dict(setup["state"])
    return model, setup


def _memory_mb(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (its high-water mark) of this process, MiB."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    # Linux: writing 5 to clear_refs resets VmHWM to the current RSS.
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def _measured(passes: Any, dampings: list[str]) -> dict[str, Any]:
    """Run ``passes(record)`` once untimed (imports, kernel set-up, allocator pools), reset
    the memory high-water mark, then once measured; ``record(phase, seconds, scores)``."""
    passes(lambda *_: None)
    _reset_peak()
    baseline = _memory_mb("VmRSS")
    seconds: dict[str, list[float]] = {}
    scores: dict[str, Any] = {}

    def record(phase: str, elapsed: float, result: Any = None) -> None:
        seconds.setdefault(phase, []).append(elapsed)
        if result is not None:
            scores[phase.removeprefix("scores ")] = result.detach().double().clone()

    passes(record)
    return {
        "scores": {d: scores[d] for d in dampings},
        "seconds": seconds,
        "baseline_rss_mb": baseline,
        "peak_rss_mb": _memory_mb("VmHWM"),
    }


# ------------------------------------------------------------------------- kronfluence


def run_kronfluence(args: argparse.Namespace) -> dict[str, Any]:
    """kronfluence's public API: ``fit_all_factors`` once (the damping is a score argument),
    then ``compute_pairwise_scores`` + ``load_pairwise_scores`` per damping."""
    import torch
    import torch.nn.functional as F
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from torch.utils.data import TensorDataset

    torch.set_num_threads(args.threads)
    model, setup = _load_setup(args.setup)
    dampings = _dampings(args.dampings)

    class Classification(Task):
        """Cross-entropy summed over the batch: kronfluence's per-example loss convention."""

        def compute_train_loss(self, batch: Any, model: Any, sample: bool = False) -> Any:
            inputs, labels = batch
            logits = model(inputs)
            if sample:  # "true Fisher": one label per example from the model's softmax
                with torch.no_grad():
                    labels = torch.multinomial(F.softmax(logits.detach(), dim=-1), 1).flatten()
            return F.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch: Any, model: Any) -> Any:
            inputs, labels = batch
            return F.cross_entropy(model(inputs), labels, reduction="sum")

    task = Classification()
    model = prepare_model(model, task)
    fit_set = TensorDataset(setup["x_fit"], setup["y_fit"])
    query_set = TensorDataset(setup["x_query"], setup["y_query"])
    batch = setup["batch"]
    factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=args.fisher == "empirical")
    with tempfile.TemporaryDirectory() as output:
        analyzer = Analyzer(
            "peer", model, task, cpu=True, disable_tqdm=True, output_dir=output, log_level=40
        )

        def passes(record: Any) -> None:
            torch.manual_seed(args.seed)  # the sampled labels of the MC Fisher
            start = time.perf_counter()
            analyzer.fit_all_factors(
                "factors",
                dataset=fit_set,
                per_device_batch_size=batch,
                factor_args=factor_args,
                overwrite_output_dir=True,
            )
            record("fit", time.perf_counter() - start)
            for damping in dampings:
                score_args = ScoreArguments(
                    damping_factor=None if damping == "heuristic" else float(damping)
                )
                start = time.perf_counter()
                analyzer.compute_pairwise_scores(
                    scores_name=f"scores_{damping}",
                    factors_name="factors",
                    query_dataset=query_set,
                    train_dataset=fit_set,
                    per_device_query_batch_size=len(query_set),
                    per_device_train_batch_size=batch,
                    score_args=score_args,
                    overwrite_output_dir=True,
                )
                result = analyzer.load_pairwise_scores(f"scores_{damping}")  # (it returns None)
                record(f"scores {damping}", time.perf_counter() - start, result["all_modules"])

        measured = _measured(passes, dampings)
    measured["path"] = "kronfluence.Analyzer: fit_all_factors, compute_pairwise_scores"
    return measured


# -------------------------------------------------------------------------------- ours


def _batches(x: Any, y: Any, batch: int) -> list[tuple[Any, Any]]:
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(x), batch)]


def run_ours(args: argparse.Namespace) -> dict[str, Any]:
    """``curvlinalg_torch.Influence(strategy="ekfac")``: the damping is a constructor
    argument, so one ``fit`` per damping (each timed as "fit"), then ``pairwise_scores``."""
    import torch
    from curvlinalg_torch import Influence

    torch.set_num_threads(args.threads)
    model, setup = _load_setup(args.setup)
    dampings = _dampings(args.dampings)
    loader = _batches(setup["x_fit"], setup["y_fit"], setup["batch"])
    query = (setup["x_query"], setup["y_query"])
    dtype = getattr(torch, args.dtype)

    def passes(record: Any) -> None:
        for damping in dampings:
            start = time.perf_counter()
            attribution = Influence(
                model,
                strategy="ekfac",
                damping=None if damping == "heuristic" else float(damping),
                fisher=args.fisher,
                seed=args.seed,
                factor_dtype=dtype,
            ).fit(loader)
            record("fit", time.perf_counter() - start)
            start = time.perf_counter()
            result = attribution.pairwise_scores(query, loader)
            record(f"scores {damping}", time.perf_counter() - start, result)

    measured = _measured(passes, dampings)
    measured["path"] = f"curvlinalg_torch.Influence(strategy='ekfac', factor_dtype={args.dtype})"
    return measured


# --------------------------------------------------------------------------- reference


def reference_scores(setup: dict[str, Any], dampings: list[str]) -> dict[str, Any]:
    """The definition in float64 from explicit per-example gradients (empirical Fisher)."""
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call, grad, vmap

    model = _mlp(setup["widths"]).double()
    model.load_state_dict({k: v.double() for k, v in setup["state"].items()})
    params = {k: v.detach() for k, v in model.named_parameters()}
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    names = [(f"{i}.weight", f"{i}.bias") for i, m in enumerate(model) if m in linears]

    def example_loss(p: Any, x: Any, y: Any) -> Any:
        return F.cross_entropy(functional_call(model, p, (x[None],)), y[None])

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))

    def blocks(x: Any, y: Any) -> list[Any]:  # per layer (B, d_out, d_in + 1) = [∇W | ∇b]
        g = per_example(params, x.double(), y)
        return [torch.cat([g[w], g[b][..., None]], dim=-1) for w, b in names]

    chunks = _batches(setup["x_fit"], setup["y_fit"], setup["batch"])
    n = len(setup["y_fit"])
    # Factors: A = (1/N) Σ a aᵀ with the bias column, G = (1/N) Σ e eᵀ, from the layer inputs
    # and output gradients of each example's own loss (recomputed with autograd here).
    a_sum = [0.0] * len(linears)
    g_sum = [0.0] * len(linears)
    for x, y in chunks:
        inputs: list[Any] = []
        outputs: list[Any] = []
        def keep(module: Any, args: Any, output: Any) -> None:
            inputs.append(args[0])
            outputs.append(output)

        hooks = [m.register_forward_hook(keep) for m in linears]
        logits = model(x.double())
        for h in hooks:
            h.remove()
        for o in outputs:
            o.retain_grad()
        F.cross_entropy(logits, y, reduction="sum").backward()
        for index, (i, o) in enumerate(zip(inputs, outputs)):
            a = torch.cat([i.detach(), torch.ones(len(i), 1, dtype=i.dtype)], dim=1)
            a_sum[index] = a_sum[index] + a.T @ a / n
            g_sum[index] = g_sum[index] + o.grad.T @ o.grad / n
    bases = [(torch.linalg.eigh(a)[1], torch.linalg.eigh(g)[1]) for a, g in zip(a_sum, g_sum)]
    s_sum = [0.0] * len(linears)
    for x, y in chunks:
        for index, g in enumerate(blocks(x, y)):
            u_a, u_g = bases[index]
            s_sum[index] = s_sum[index] + ((u_g.T @ g @ u_a) ** 2).sum(0) / n
    query = blocks(setup["x_query"], setup["y_query"])
    out = {}
    for damping in dampings:
        preconditioned = []
        for index, g in enumerate(query):
            u_a, u_g = bases[index]
            lam = 0.1 * float(s_sum[index].mean()) if damping == "heuristic" else float(damping)
            rotated = (u_g.T @ g @ u_a) / (s_sum[index] + lam)
            preconditioned.append(u_g @ rotated @ u_a.T)
        columns = []
        for x, y in chunks:
            train = blocks(x, y)
            columns.append(sum(torch.einsum("qoi,toi->qt", p, t) for p, t in zip(preconditioned, train)))
        out[damping] = torch.cat(columns, dim=1)
    return out


# ---------------------------------------------------------------------------- compare


def compare(x: Any, y: Any) -> dict[str, float]:
    """Agreement of two score matrices ``(B_q, N)``: correlations over all entries and per
    query, top-10 overlap, relative difference and the scale of ``x`` in units of ``y``."""
    import numpy as np
    from scipy import stats

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    per_query = [stats.spearmanr(a, b).statistic for a, b in zip(x, y)]
    k = min(10, x.shape[1])
    overlap = [
        len(set(np.argsort(-a)[:k]) & set(np.argsort(-b)[:k])) / k for a, b in zip(x, y)
    ]
    return {
        "pearson": float(stats.pearsonr(x.ravel(), y.ravel()).statistic),
        "spearman": float(stats.spearmanr(x.ravel(), y.ravel()).statistic),
        "spearman_per_query_mean": float(np.mean(per_query)),
        "spearman_per_query_min": float(np.min(per_query)),
        "top10_overlap_mean": float(np.mean(overlap)),
        "relative_difference": float(np.linalg.norm(x - y) / np.linalg.norm(y)),
        "scale": float((x * y).sum() / (y * y).sum()),
    }


CONVENTIONS = [
    ("loss per example", "sum over the batch in the task (`reduction='sum'`)",
     "batch-mean loss; the capture multiplies `e` by B (per-example gradients)"),
    ("factors A, G", "(1/N) Σ a aᵀ, (1/N) Σ e eᵀ over all examples", "same (batch factors weighted by B/N)"),
    ("bias", "column of ones appended to a", "column of ones appended to a (capture)"),
    ("Fisher", "default 'true Fisher' (sampled labels, torch.multinomial); "
     "use_empirical_fisher=True: data labels", "fisher='mc' (sampled) / 'empirical'"),
    ("eigendecomposition", "float64 (eigendecomposition_dtype), then float32",
     "float64 (since b62c714), cast back to factor_dtype (float32); eigenvalues clamped at 0"),
    ("S (Lambda)", "(1/N) Σ (U_Gᵀ g_i U_A)², per-example gradients materialised", "same value, no per-example gradient"),
    ("damping", "damping_factor added to S; default 1e-8; None → 0.1·mean(S) per layer",
     "λ added to S; 'heuristic' = 0.1·mean(S) per layer"),
    ("score sign", "g_qᵀ P⁻¹ g_t (positive: helpful)", "same"),
    ("storage", "factors and scores written to disk (safetensors) and read back", "in memory"),
]


# (label, library, fisher, MC seed, factor dtype of ours)
JOBS = [
    ("kronfluence/empirical", "kronfluence", "empirical", 0, "float32"),
    ("ours/empirical", "ours", "empirical", 0, "float32"),
    ("kronfluence/mc", "kronfluence", "mc", 0, "float32"),
    ("ours/mc", "ours", "mc", 0, "float32"),
    ("ours/mc/seed1", "ours", "mc", 1, "float32"),  # a second MC draw: the noise floor
]


def _worker(args: argparse.Namespace, job: tuple[Any, ...], setup: Path, result: Path) -> Any:
    _, library, fisher, seed, dtype = job
    command = [
        sys.executable, "-W", "ignore", __file__, "--worker", library, "--setup", str(setup),
        "--result", str(result), "--fisher", fisher, "--dampings", args.dampings,
        "--threads", str(args.threads), "--seed", str(seed), "--dtype", dtype,
    ]
    return subprocess.run(command, capture_output=True, text=True)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    _pin_threads(args.threads)
    if args.worker:
        import torch

        run = run_kronfluence if args.worker == "kronfluence" else run_ours
        torch.save(run(args), args.result)
        return 0
    if importlib.util.find_spec("kronfluence") is None:
        print(
            "peer_kronfluence: skipped, kronfluence is not importable by "
            f"{sys.executable} (install it in a separate venv, see the module docstring)"
        )
        return 0
    import random

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    fishers = [f.strip() for f in args.fisher.split(",") if f.strip()]
    dampings = _dampings(args.dampings)
    jobs = [job for job in JOBS if job[2] in fishers]
    runs: dict[str, list[dict[str, Any]]] = {job[0]: [] for job in jobs}
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as work:
        work_path = Path(work)
        setup_path = work_path / "setup.pt"
        setup = prepare(args, setup_path)
        print(
            f"# model MLP {'-'.join(map(str, setup['widths']))} (biases), {setup['dataset']}, "
            f"{args.pretrain_steps} SGD steps, test accuracy {100 * setup['test_accuracy']:.1f} %; "
            f"{args.queries} queries × {args.train} training examples, batch {args.batch}, "
            f"threads {args.threads}, {args.repeats} round(s) of one process per job"
        )
        # Rounds: every job once per round in a shuffled order (each in a fresh process, one
        # untimed warm-up pass then one measured pass), so a slow stretch of the shared
        # machine is spread over the libraries.
        for round_index in range(args.repeats):
            order = list(jobs)
            random.Random(round_index).shuffle(order)
            for job in order:
                key = job[0]
                if key in failed:
                    continue
                result_path = work_path / f"{key.replace('/', '_')}_{round_index}.pt"
                completed = _worker(args, job, setup_path, result_path)
                if completed.returncode != 0:
                    failed[key] = completed.stderr[-3000:]
                    print(f"# {key}: failed (exit {completed.returncode})\n{failed[key]}")
                    continue
                runs[key].append(torch.load(result_path, weights_only=False))
            print(f"# round {round_index + 1}/{args.repeats} done, load average {os.getloadavg()[0]:.1f}")
        reference = reference_scores(setup, dampings) if "empirical" in fishers else {}

    comparisons: list[dict[str, Any]] = []

    def scores(key: str, damping: str) -> Any:
        return runs[key][0]["scores"][damping] if runs.get(key) else None

    def add(fisher: str, damping: str, left: str, right: str) -> None:
        x = scores(left, damping)
        y = reference[damping] if right == "reference" else scores(right, damping)
        if x is not None and y is not None:
            comparisons.append(
                {"fisher": fisher, "damping": damping, "x": left, "y": right, **compare(x, y)}
            )

    for damping in dampings:
        if "empirical" in fishers:
            add("empirical", damping, "ours/empirical", "kronfluence/empirical")
            add("empirical", damping, "ours/empirical", "reference")
            add("empirical", damping, "kronfluence/empirical", "reference")
        if "mc" in fishers:
            add("mc", damping, "ours/mc", "kronfluence/mc")
            add("mc", damping, "ours/mc/seed1", "ours/mc")
    print(
        f"\n{'damping':>10}  {'x vs y':<46}{'pearson':>9}{'spearman':>9}"
        f"{'sp/query':>9}{'top10':>7}{'rel diff':>10}{'scale':>8}"
    )
    for c in comparisons:
        print(
            f"{c['damping']:>10}  {c['x'] + ' vs ' + c['y']:<46}{c['pearson']:>9.5f}"
            f"{c['spearman']:>9.5f}{c['spearman_per_query_mean']:>9.4f}"
            f"{c['top10_overlap_mean']:>7.2f}{c['relative_difference']:>10.2e}{c['scale']:>8.4f}"
        )

    timings = []
    print(
        f"\n{'job':<26}{'fit s':>8}{'fit IQR':>16}"
        + "".join(f"{'scores ' + d:>18}" for d in dampings)
        + f"{'peak +MiB':>11}"
    )
    for key, per_round in runs.items():
        if not per_round:
            continue
        fit = [t for r in per_round for t in r["seconds"]["fit"]]
        score = {d: [t for r in per_round for t in r["seconds"][f"scores {d}"]] for d in dampings}
        peak = [r["peak_rss_mb"] - r["baseline_rss_mb"] for r in per_round]
        q1, median, q3 = np.percentile(fit, [25, 50, 75])
        entry = {
            "job": key,
            "path": per_round[0]["path"],
            "fit_seconds": {"median": float(median), "q1": float(q1), "q3": float(q3), "all": fit},
            "score_seconds": {
                d: {"median": float(np.median(v)), "q1": float(np.percentile(v, 25)),
                    "q3": float(np.percentile(v, 75)), "all": v}
                for d, v in score.items()
            },
            "peak_rss_above_baseline_mib": {"median": float(np.median(peak)), "all": peak},
            "baseline_rss_mib": [r["baseline_rss_mb"] for r in per_round],
        }
        timings.append(entry)
        print(
            f"{key:<26}{median:>8.3f}{f'[{q1:.3f}, {q3:.3f}]':>16}"
            + "".join(f"{entry['score_seconds'][d]['median']:>18.3f}" for d in dampings)
            + f"{np.median(peak):>11.1f}"
        )
    print("\nconventions (kronfluence | ours):")
    for what, theirs, mine in CONVENTIONS:
        print(f"  {what}: {theirs} | {mine}")

    import curvlinalg
    import kronfluence

    payload = {
        "script": "bench/peer_kronfluence.py",
        "command": sys.argv,
        "args": {k: v for k, v in vars(args).items() if k not in ("worker", "setup", "result")},
        "model": f"MLP {'-'.join(map(str, setup['widths']))} with biases",
        "dataset": setup["dataset"],
        "test_accuracy": setup["test_accuracy"],
        "torch": torch.__version__,
        "kronfluence": getattr(kronfluence, "__version__", "?"),
        "python": sys.version.split()[0],
        "curvlinalg_path": curvlinalg.__file__,
        "curvlinalg_commit": os.environ.get("CURVLINALG_COMMIT"),
        "loadavg_end": list(os.getloadavg()),
        "comparisons": comparisons,
        "timings": timings,
        "failed": failed,
        "conventions": [{"what": w, "kronfluence": t, "ours": m} for w, t, m in CONVENTIONS],
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(payload, indent=1))
    print(f"# wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
