r"""Benchmark of EK-FAC from captures: ``kron.eigen_correction`` and
``influence.ekfac_scores`` against materialising per-example gradients (the kronfluence
approach: ``einsum("b...i,b...o->bio")``, then rotate each gradient into the eigenbasis and
square, or precondition each query gradient and take inner products with the training
gradients).

NumPy, float32, synthetic standard-normal captures (the cost of every operation timed here
does not depend on the values). Layers: an MLP layer ``(B, d)`` at ``B = 100``, ``d = 1000``,
and transformer-like ``(B, T, d)`` layers at ``T = 128``, ``d = 256, 512, 1024``; a ``T``
sweep at ``d = 256`` times both exact evaluations (``method="pairs"`` and
``"explicit"``) to show where the position-pair contraction stops paying (the crossover that
``method="auto"`` models).

Damping of the scores: ``λ = 0.1·mean(S)`` per layer (the default of
``curvlinalg_torch.Influence`` and kronfluence's ``damping_factor=None``). An absolute
``λ = 10⁻³`` is below the float32 rounding of ``S`` here (``eps·max S`` ≈ 10⁻³ for these
captures: ``B < d`` makes the factors singular, so most of ``S`` is zero up to rounding), and
then ``S + λ`` in those directions — and the scores — are rounding noise in *any* float32
evaluation, materialised or not; that is what stopped an earlier version of this script.

Accuracy: every entry (float32) is compared with the float64 definition (per-example
gradients materialised a few examples at a time, in the same eigenbasis cast to float64).
The check asks that evaluating from the captures loses no more than materialising does in the
same precision: ``error(ours) ≤ max(3·error(materialised), 10⁻⁴)``.

Timing: medians and interquartile ranges over rounds; in every round each entry of a case
runs once, in a shuffled order (seeded), so load from neighbours hits all entries alike.
On a machine whose cores are shared with other jobs, prefer ``--threads 1``: with two
OpenBLAS threads on two busy cores, single calls here stalled for ~1.6 s (most likely a
thread waiting on a descheduled peer), which swamps millisecond timings.
Memory: ``tracemalloc`` peak above the baseline during one call (NumPy reports its data
buffers to it; BLAS work buffers are not included), inputs excluded, result included.

Usage::

    python bench/bench_ekfac.py                 # full run (3-4 minutes, 1 thread)
    python bench/bench_ekfac.py --quick         # smoke run (seconds)
    python bench/bench_ekfac.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
import tracemalloc
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5)")
    parser.add_argument("--threads", type=int, default=2, help="BLAS/OpenMP threads")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 2 if args.quick else 5
    return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = str(ARGS.threads)

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from curvlinalg import influence, kron  # noqa: E402

# Relative damping of the scores: λ = DAMPING_SCALE · mean(S) (see the module docstring).
DAMPING_SCALE = 0.1
# Accuracy check: ours may lose at most this factor more than the materialised evaluation,
# or reach this absolute floor (float32: 10⁴·eps covers κ ~ 10³ problems).
ERROR_FACTOR, ERROR_FLOOR = 3.0, 1e-4
# Elements of float64 per-example gradients held at once by the reference.
_REFERENCE_ELEMENTS = 2**24


# --------------------------------------------------------------------------------------
# The materialising references (kronfluence's approach, written with NumPy)
# --------------------------------------------------------------------------------------


def per_example(a: np.ndarray, e: np.ndarray) -> np.ndarray:
    """``einsum("b...i,b...o->bio")``, returned as ``(B, d_out, d_in)``."""
    a3 = a[:, None, :] if a.ndim == 2 else a
    e3 = e[:, None, :] if e.ndim == 2 else e
    return np.matmul(np.swapaxes(e3, 1, 2), a3)


def correction_materialised(a, e, a_eigh, g_eigh) -> np.ndarray:
    rotated = g_eigh.vectors.T @ per_example(a, e) @ a_eigh.vectors
    return np.mean(rotated * rotated, axis=0)


def scores_materialised(query, train, eigens) -> np.ndarray:
    total = 0.0
    for (q_a, q_e), (t_a, t_e), (a_eigh, g_eigh, correction, damping) in zip(query, train, eigens):
        rotated = g_eigh.vectors.T @ per_example(q_a, q_e) @ a_eigh.vectors
        preconditioned = g_eigh.vectors @ (rotated / (correction + damping)) @ a_eigh.vectors.T
        gradients = per_example(t_a, t_e)
        count_q, count_t = preconditioned.shape[0], gradients.shape[0]
        total = total + preconditioned.reshape(count_q, -1) @ gradients.reshape(count_t, -1).T
    return total


# --------------------------------------------------------------------------------------
# Float64 references: the same definitions, a few examples at a time
# --------------------------------------------------------------------------------------


def _f64(x):
    return np.asarray(x, dtype=np.float64)


def _blocks(batch: int, size: int) -> list[tuple[int, int]]:
    step = max(1, _REFERENCE_ELEMENTS // size)
    return [(start, min(start + step, batch)) for start in range(0, batch, step)]


def correction_reference(a, e, a_eigh, g_eigh) -> np.ndarray:
    """``(1/B) Σ_i (U_Gᵀ g_i U_A)²`` in float64 (basis: the given one, cast)."""
    u_a, u_g = _f64(a_eigh.vectors), _f64(g_eigh.vectors)
    total = np.zeros((u_g.shape[0], u_a.shape[0]))
    for start, stop in _blocks(a.shape[0], u_a.shape[0] * u_g.shape[0]):
        rotated = u_g.T @ per_example(_f64(a[start:stop]), _f64(e[start:stop])) @ u_a
        total += np.sum(rotated * rotated, axis=0)
    return total / a.shape[0]


def scores_reference(query, train, eigens) -> np.ndarray:
    """``Σ_l ⟨U_G ((U_Gᵀ g^q U_A) / (S + λ)) U_Aᵀ, g^t⟩`` in float64."""
    total = 0.0
    for (q_a, q_e), (t_a, t_e), (a_eigh, g_eigh, correction, damping) in zip(query, train, eigens):
        u_a, u_g = _f64(a_eigh.vectors), _f64(g_eigh.vectors)
        weights = 1.0 / (_f64(correction) + float(damping))
        size = u_a.shape[0] * u_g.shape[0]
        rotated = u_g.T @ per_example(_f64(q_a), _f64(q_e)) @ u_a
        preconditioned = (u_g @ (rotated * weights) @ u_a.T).reshape(q_a.shape[0], -1)
        layer = np.zeros((q_a.shape[0], t_a.shape[0]))
        for start, stop in _blocks(t_a.shape[0], size):
            gradients = per_example(_f64(t_a[start:stop]), _f64(t_e[start:stop]))
            layer[:, start:stop] = preconditioned @ gradients.reshape(stop - start, -1).T
        total = total + layer
    return total


def relative_error(x, reference) -> float:
    return float(np.linalg.norm(_f64(x) - reference) / np.linalg.norm(reference))


# --------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------


def peak_bytes(call) -> int:
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    result = call()
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    del result
    return int(peak)


def run_case(name: str, entries: dict, rounds: int, rng: random.Random, reference) -> dict:
    """Errors against ``reference`` (float64); time every entry over ``rounds`` rounds in
    shuffled order; memory once each."""
    result = {"case": name, "entries": {}}
    errors = {key: relative_error(call(), reference) for key, call in entries.items()}  # + warm-up
    times = {key: [] for key in entries}
    for _ in range(rounds):
        order = list(entries)
        rng.shuffle(order)
        for key in order:
            start = time.perf_counter()
            entries[key]()
            times[key].append(time.perf_counter() - start)
    for key, values in times.items():
        q1, _, q3 = (
            statistics.quantiles(values, n=4, method="inclusive")
            if len(values) > 1
            else (values[0],) * 3
        )
        result["entries"][key] = {
            "median_ms": 1e3 * statistics.median(values),
            "q1_ms": 1e3 * q1,
            "q3_ms": 1e3 * q3,
            "peak_mib": peak_bytes(entries[key]) / 2**20,
            "relative_error_vs_float64": errors[key],
        }
    return result


def check_accuracy(result: dict) -> None:
    entries = result["entries"]
    allowed = max(ERROR_FACTOR * entries["materialised"]["relative_error_vs_float64"], ERROR_FLOOR)
    for key, entry in entries.items():
        if entry["relative_error_vs_float64"] > allowed:
            raise AssertionError(
                f"{result['case']}: {key} has relative error "
                f"{entry['relative_error_vs_float64']:.2e} against the float64 definition, "
                f"more than {allowed:.2e} (materialised float32: "
                f"{entries['materialised']['relative_error_vs_float64']:.2e})"
            )


def captures(rng: np.random.Generator, batch: int, positions: int | None, d_in: int, d_out: int):
    lead = (batch,) if positions is None else (batch, positions)
    a = rng.standard_normal(lead + (d_in,)).astype(np.float32)
    e = rng.standard_normal(lead + (d_out,)).astype(np.float32)
    return a, e


def eigens_of(a, e):
    a_eigh = kron.eigh(kron.input_factor(a))
    g_eigh = kron.eigh(kron.factor(e))
    return a_eigh, g_eigh


def _label(positions: int | None) -> str:
    return "" if positions is None else f", T={positions}"


def correction_case(rng, batch, positions, d_in, d_out, rounds, shuffle, methods):
    a, e = captures(rng, batch, positions, d_in, d_out)
    a_eigh, g_eigh = eigens_of(a, e)
    entries = {
        "materialised": lambda: correction_materialised(a, e, a_eigh, g_eigh),
        "auto": lambda: kron.eigen_correction(a, e, a_eigh, g_eigh),
    }
    for method in methods:
        entries[method] = lambda m=method: kron.eigen_correction(a, e, a_eigh, g_eigh, method=m)
    name = f"eigen_correction B={batch}{_label(positions)}, d_in={d_in}, d_out={d_out}"
    reference = correction_reference(a, e, a_eigh, g_eigh)
    result = run_case(name, entries, rounds, shuffle, reference)
    result["auto_method"] = kron._correction_method("auto", positions or 1, d_in, d_out)
    result["positions"] = positions or 1
    return result


def scores_case(rng, batch_q, batch_t, positions, d_in, d_out, rounds, shuffle, methods):
    query = [captures(rng, batch_q, positions, d_in, d_out)]
    train = [captures(rng, batch_t, positions, d_in, d_out)]
    a_eigh, g_eigh = eigens_of(*train[0])
    correction = kron.eigen_correction(*train[0], a_eigh, g_eigh)
    damping = DAMPING_SCALE * float(np.mean(correction))
    eigens = [(a_eigh, g_eigh, correction, damping)]
    entries = {
        "materialised": lambda: scores_materialised(query, train, eigens),
        "auto": lambda: influence.ekfac_scores(query, train, eigens),
    }
    for method in methods:
        entries[method] = lambda m=method: influence.ekfac_scores(query, train, eigens, method=m)
    name = f"ekfac_scores B_q={batch_q}, B_t={batch_t}{_label(positions)}, d={d_in}"
    result = run_case(name, entries, rounds, shuffle, scores_reference(query, train, eigens))
    result["damping"] = damping
    result["float32_rounding_of_S_over_damping"] = float(
        np.finfo(np.float32).eps * np.max(correction) / damping
    )
    result["positions"] = positions or 1
    # auto's choice: the cost model reads only the widths and the positions of a layer.
    layer = (np.empty((0, d_in)), np.empty((0, d_out)), positions or 1)
    layer_q = layer_t = layer
    pair_cost = d_in * d_out + 2 * d_in + d_out  # as in influence.ekfac_scores
    result["auto_method"] = influence._cross_method(
        "auto", layer_q, layer_t, batch_q, batch_t, pair_cost
    )
    return result


def table(results: list[dict]) -> str:
    lines = [
        "| case | entry | median ms [IQR] | peak MiB | speed-up vs materialised | memory ratio "
        "| error vs float64 |",
        "|---|---|---|---|---|---|---|",
    ]
    for result in results:
        base = result["entries"]["materialised"]
        for key, entry in result["entries"].items():
            speedup = base["median_ms"] / entry["median_ms"]
            memory = entry["peak_mib"] / base["peak_mib"] if base["peak_mib"] else float("nan")
            label = key
            if key == "auto" and "auto_method" in result:
                label = f"auto ({result['auto_method']})"
            lines.append(
                f"| {result['case']} | {label} | {entry['median_ms']:.1f} "
                f"[{entry['q1_ms']:.1f}, {entry['q3_ms']:.1f}] | {entry['peak_mib']:.1f} | "
                f"{speedup:.1f}× | {100 * memory:.1f} % | "
                f"{entry['relative_error_vs_float64']:.1e} |"
            )
    return "\n".join(lines)


def crossover(results: list[dict], prefix: str) -> str:
    """The sweep's ``pairs``/``explicit`` time ratio per ``T``."""
    rows = [r for r in results if r["case"].startswith(prefix) and "pairs" in r["entries"]]
    parts = []
    for r in rows:
        ratio = r["entries"]["pairs"]["median_ms"] / r["entries"]["explicit"]["median_ms"]
        parts.append(f"T={r['positions']}: pairs/explicit = {ratio:.2f}")
    return f"{prefix}: " + "; ".join(parts)


def main(args: argparse.Namespace) -> dict:
    load_start = os.getloadavg()
    rng = np.random.default_rng(0)
    shuffle = random.Random(0)
    results = []
    if args.quick:
        mlp, mlp_queries = (16, 64), 2
        widths, positions, batch_seq, batch_q = (64,), 8, 4, 2
        sweep, sweep_width, sweep_batch, sweep_queries = (1, 2, 4), 16, 4, 2
    else:
        mlp, mlp_queries = (100, 1000), 10
        widths, positions, batch_seq, batch_q = (256, 512, 1024), 128, 32, 8
        sweep, sweep_width, sweep_batch, sweep_queries = (1, 2, 3, 4, 6, 8, 16, 32), 256, 32, 8
    both = ("pairs", "explicit")
    batch, d = mlp
    results.append(correction_case(rng, batch, None, d, d, args.rounds, shuffle, ()))
    results.append(scores_case(rng, mlp_queries, batch, None, d, d, args.rounds, shuffle, ()))
    for count in sweep:
        w = sweep_width
        results.append(correction_case(rng, sweep_batch, count, w, w, args.rounds, shuffle, both))
        results.append(
            scores_case(rng, sweep_queries, sweep_batch, count, w, w, args.rounds, shuffle, both)
        )
    for d in widths:
        results.append(correction_case(rng, batch_seq, positions, d, d, args.rounds, shuffle, ()))
        results.append(
            scores_case(rng, batch_q, batch_seq, positions, d, d, args.rounds, shuffle, ())
        )
        print(f"done d={d}", file=sys.stderr, flush=True)
    for result in results:
        check_accuracy(result)
    environment = {
        "numpy": np.__version__,
        "cpus": os.cpu_count(),
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
    }
    return {"args": vars(args), "environment": environment, "results": results}


if __name__ == "__main__":
    output = main(ARGS)
    print(f"threads={ARGS.threads}, rounds={ARGS.rounds}, float32, NumPy {np.__version__}")
    environment = output["environment"]
    print(
        f"load average (1, 5, 15 min) at the start: {environment['load_average_start']}, "
        f"at the end: {environment['load_average_end']}"
    )
    print(table(output["results"]))
    for result in output["results"]:
        if "auto_method" in result:
            print(f"{result['case']}: auto = {result['auto_method']}")
        if "damping" in result:
            print(
                f"{result['case']}: λ = {result['damping']:.3g}, "
                f"eps32·max S / λ = {result['float32_rounding_of_S_over_damping']:.1e}"
            )
    print(crossover(output["results"], "eigen_correction"))
    print(crossover(output["results"], "ekfac_scores"))
    if ARGS.json:
        Path(ARGS.json).write_text(json.dumps(output, indent=2))
