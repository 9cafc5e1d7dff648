r"""Benchmark of EK-FAC from captures: ``kron.eigen_correction`` and
``influence.ekfac_scores`` against materialising per-example gradients (the kronfluence
approach: ``einsum("b...i,b...o->bio")``, then rotate each gradient into the eigenbasis and
square, or precondition each query gradient and take inner products with the training
gradients).

NumPy, float32, synthetic standard-normal captures (the cost of every operation timed here
does not depend on the values). Layers: an MLP layer ``(B, d)`` at ``B = 100``, ``d = 1000``,
and transformer-like ``(B, T, d)`` layers at ``T = 128``; a ``T`` sweep at ``d = 256`` shows
where the position-pair contraction stops paying (the crossover that ``method="auto"``
models).

Timing: medians and interquartile ranges over rounds; in every round each entry of a case
runs once, in a shuffled order (seeded), so load from neighbours hits all entries alike.
Memory: ``tracemalloc`` peak above the baseline during one call (NumPy reports its data
buffers to it; BLAS work buffers are not included), inputs excluded, result included.

Usage::

    python bench/bench_ekfac.py                 # full run (minutes)
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

DAMPING = 1e-3


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


def run_case(name: str, entries: dict, rounds: int, rng: random.Random) -> dict:
    """Time every entry over ``rounds`` rounds in shuffled order; memory once each."""
    times = {key: [] for key in entries}
    for call in entries.values():  # warm-up
        call()
    for _ in range(rounds):
        order = list(entries)
        rng.shuffle(order)
        for key in order:
            start = time.perf_counter()
            entries[key]()
            times[key].append(time.perf_counter() - start)
    result = {"case": name, "entries": {}}
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
        }
    return result


def captures(rng: np.random.Generator, batch: int, positions: int | None, d_in: int, d_out: int):
    lead = (batch,) if positions is None else (batch, positions)
    a = rng.standard_normal(lead + (d_in,)).astype(np.float32)
    e = rng.standard_normal(lead + (d_out,)).astype(np.float32)
    return a, e


def eigens_of(a, e):
    a_eigh = kron.eigh(kron.input_factor(a))
    g_eigh = kron.eigh(kron.factor(e))
    return a_eigh, g_eigh


def correction_case(rng, batch, positions, d_in, d_out, rounds, shuffle, methods):
    a, e = captures(rng, batch, positions, d_in, d_out)
    a_eigh, g_eigh = eigens_of(a, e)
    entries = {
        "materialised": lambda: correction_materialised(a, e, a_eigh, g_eigh),
        "auto": lambda: kron.eigen_correction(a, e, a_eigh, g_eigh),
    }
    for method in methods:
        entries[method] = lambda m=method: kron.eigen_correction(a, e, a_eigh, g_eigh, method=m)
    check = kron.eigen_correction(a, e, a_eigh, g_eigh)
    reference = correction_materialised(a, e, a_eigh, g_eigh)
    error = float(np.linalg.norm(check - reference) / np.linalg.norm(reference))
    t = "" if positions is None else f", T={positions}"
    result = run_case(
        f"eigen_correction B={batch}{t}, d_in={d_in}, d_out={d_out}", entries, rounds, shuffle
    )
    result["auto_method"] = kron._correction_method("auto", positions or 1, d_in, d_out)
    result["relative_error"] = error
    return result


def scores_case(rng, batch_q, batch_t, positions, d_in, d_out, rounds, shuffle):
    query = [captures(rng, batch_q, positions, d_in, d_out)]
    train = [captures(rng, batch_t, positions, d_in, d_out)]
    a_eigh, g_eigh = eigens_of(*train[0])
    correction = kron.eigen_correction(*train[0], a_eigh, g_eigh)
    eigens = [(a_eigh, g_eigh, correction, DAMPING)]
    entries = {
        "materialised": lambda: scores_materialised(query, train, eigens),
        "auto": lambda: influence.ekfac_scores(query, train, eigens),
    }
    reference = scores_materialised(query, train, eigens)
    check = influence.ekfac_scores(query, train, eigens)
    error = float(np.linalg.norm(check - reference) / np.linalg.norm(reference))
    t = "" if positions is None else f", T={positions}"
    result = run_case(
        f"ekfac_scores B_q={batch_q}, B_t={batch_t}{t}, d={d_in}", entries, rounds, shuffle
    )
    result["relative_error"] = error
    return result


def table(results: list[dict]) -> str:
    lines = [
        "| case | entry | median ms [IQR] | peak MiB | speed-up vs materialised | memory ratio |",
        "|---|---|---|---|---|---|",
    ]
    for result in results:
        base = result["entries"]["materialised"]
        for key, entry in result["entries"].items():
            speedup = base["median_ms"] / entry["median_ms"]
            memory = entry["peak_mib"] / base["peak_mib"] if base["peak_mib"] else float("nan")
            lines.append(
                f"| {result['case']} | {key} | {entry['median_ms']:.1f} "
                f"[{entry['q1_ms']:.1f}, {entry['q3_ms']:.1f}] | {entry['peak_mib']:.1f} | "
                f"{speedup:.1f}× | {100 * memory:.1f} % |"
            )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(0)
    shuffle = random.Random(0)
    results = []
    if args.quick:
        mlp, width, positions, sweep, sweep_width = (16, 64), (64,), 8, (1, 2, 4), 16
        batch_seq, batch_q = 4, 2
    else:
        mlp, width, positions, sweep, sweep_width = (
            (100, 1000),
            (256, 512, 1024),
            128,
            (
                1,
                2,
                4,
                8,
                16,
            ),
            256,
        )
        batch_seq, batch_q = 16, 4
    batch, d = mlp
    results.append(correction_case(rng, batch, None, d, d, args.rounds, shuffle, ()))
    results.append(
        scores_case(rng, 10 if not args.quick else 2, batch, None, d, d, args.rounds, shuffle)
    )
    for count in sweep:
        results.append(
            correction_case(
                rng,
                batch_seq,
                count,
                sweep_width,
                sweep_width,
                args.rounds,
                shuffle,
                ("pairs", "explicit"),
            )
        )
    for d in width:
        results.append(correction_case(rng, batch_seq, positions, d, d, args.rounds, shuffle, ()))
        results.append(scores_case(rng, batch_q, batch_seq, positions, d, d, args.rounds, shuffle))
    for result in results:
        assert result["relative_error"] < 2e-2, result  # float32, κ(S + λ) up to ~10³
    return {"args": vars(args), "results": results}


if __name__ == "__main__":
    output = main(ARGS)
    print(f"threads={ARGS.threads}, rounds={ARGS.rounds}, float32, NumPy {np.__version__}")
    print(table(output["results"]))
    for result in output["results"]:
        if "auto_method" in result:
            print(f"{result['case']}: auto = {result['auto_method']}")
    if ARGS.json:
        Path(ARGS.json).write_text(json.dumps(output, indent=2))
