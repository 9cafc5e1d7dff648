"""Every speed benchmark in one command: run them in sequence, then write their tables and a
figure.

Runs, as subprocesses with the same pinned threads (``--threads N`` to each script and
``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS`` = N in its environment):

* ``bench_torch_step.py``: FOOF and K-FAC step time vs ``torch.optim.SGD``, plus the
  kfac-pytorch / ASDL / BackPACK peers of ``bench/peers.py`` when they import;
* ``bench_torch_natural_gradient.py``: ``NaturalGradient`` step time vs ``torch.optim.SGD``;
* ``bench_torch_conv_step.py``: K-FAC / FOOF / KLD-WRM step time on Puiu's CNN vs SGD;
* ``bench_kron.py``: the Kronecker-factored solves against a plain GEMM;
* ``bench_woodbury.py``: the implicit Woodbury natural gradient / Gram against materialised
  per-example gradients.

Each writes its JSON (``--json``) and its printed table (``<name>.log``) into the output folder;
``race.md`` (markdown tables: every torch entry's time per step [IQR] and ratio to SGD,
peers included, and the headline kron / Woodbury ratios) and ``race.png`` (step time / SGD of
every torch entry, whiskers = IQR of the per-round ratios, the issue's targets marked) are built
from those JSON files only. The three torch step benchmarks share one timing protocol
(``bench/timing.py``: blocks of consecutive steps per optimizer, rounds in shuffled order) and
one JSON format (``{"meta", "entries"}``, each entry as ``timing.summarise`` makes it).

Usage::

    python bench/race.py                # full runs -> bench/results/race/ (tens of minutes)
    python bench/race.py --quick        # smoke runs -> bench/results/tmp/race/ (CI)
    python bench/race.py --report-only --out DIR   # rebuild race.md / race.png from DIR's JSON
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

# name -> (script, JSON file in the output folder)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "torch_step": ("bench_torch_step.py", "torch_step.json"),
    "torch_natural_gradient": ("bench_torch_natural_gradient.py", "torch_natural_gradient.json"),
    "torch_conv_step": ("bench_torch_conv_step.py", "torch_conv_step.json"),
    "kron": ("bench_kron.py", "kron.json"),
    "woodbury": ("bench_woodbury.py", "woodbury.json"),
}

# The goals (issue 13, consecutive-step protocol, 2 threads): time per step / SGD's
# (ratio of the block medians), per entry.
TARGETS: dict[str, float] = {
    "foof u=1": 1.7,
    "kfac-mc u=1": 2.7,
    "kfac-mc u=10": 1.8,
    "NG mc/independent/T=10": 1.55,
}
# The torch step benchmarks in the figure (the CNN's ratios are of another model).
FIGURE_SOURCES = ("torch_step", "torch_natural_gradient")
BASELINES = ("sgd", "SGD")
KRON_GOAL = 0.85  # bench_kron.py: an op reaches ≥ 85 % of the plain GEMM rate


# --------------------------------------------------------------------------------------
# Running the benchmarks
# --------------------------------------------------------------------------------------


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    return env


def command_for(name: str, out: Path, threads: int, quick: bool) -> list[str]:
    script, json_name = BENCHMARKS[name]
    command = [sys.executable, str(BENCH / script), "--threads", str(threads)]
    if quick:
        command.append("--quick")
    return [*command, "--json", str(out / json_name)]


def readable(command: list[str]) -> list[str]:
    """``command`` as a reader re-types it from the project root: ``python`` for this
    interpreter, paths under the root made relative."""
    shown = ["python" if part == sys.executable else part for part in command]
    prefix = f"{ROOT}{os.sep}"
    return [part.removeprefix(prefix) for part in shown]


def run_all(names: list[str], out: Path, threads: int, quick: bool) -> dict[str, dict[str, Any]]:
    """Run each benchmark (stdout and stderr to ``out/<name>.log``); return their run records."""
    env = child_env(threads)
    runs: dict[str, dict[str, Any]] = {}
    for name in names:
        command = command_for(name, out, threads, quick)
        pinned = " ".join(
            f"{k}={env[k]}" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
        )
        shown = f"{pinned} {shlex.join(readable(command))}"
        print(f"$ {shown}", flush=True)
        log = out / f"{name}.log"
        started = time.perf_counter()
        with open(log, "w") as file:
            rc = subprocess.run(
                command, env=env, cwd=ROOT, stdout=file, stderr=subprocess.STDOUT
            ).returncode
        wall = time.perf_counter() - started
        print(f"  -> exit {rc} in {wall:.1f} s, log {log}", flush=True)
        runs[name] = {"command": shown, "returncode": rc, "wall_s": wall, "log": log.name}
    return runs


# --------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------


def load_results(out: Path) -> dict[str, Any]:
    """The JSON each benchmark wrote into ``out`` (missing ones are left out)."""
    found = {}
    for name, (_, json_name) in BENCHMARKS.items():
        path = out / json_name
        if path.exists():
            found[name] = json.loads(path.read_text())
    return found


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]


def torch_entries(
    results: dict[str, Any], sources: tuple[str, ...] = FIGURE_SOURCES
) -> list[dict[str, Any]]:
    """One row per entry of the torch step benchmarks in ``sources``: the tables' and the bar
    chart's data, straight from their JSON (``timing.summarise``'s keys).

    ``ratio``: median time per step (blocks of consecutive steps) / SGD's; ``round``: (q1,
    median, q3) of the per-round ratios to SGD's block of the same round."""
    rows: list[dict[str, Any]] = []
    for source in sources:
        for entry in results.get(source, {}).get("entries", []):
            row = {"source": source, "name": entry["name"], "peer": entry.get("peer", False)}
            if "failed" in entry:
                row["failed"] = entry["failed"]
            else:
                rr = entry["round_ratio"]
                row.update(
                    median_ms=entry["median_ms"],
                    q1_ms=entry["q1_ms"],
                    q3_ms=entry["q3_ms"],
                    ratio=entry["ratio"],
                    round=(rr["q1"], rr["median"], rr["q3"]),
                    mean_ratio=entry["mean_ratio"],
                    p10_ratio=entry["p10_ratio"],
                    step_median_ms=entry["step_median_ms"],
                    step_ratio=entry["step_ratio"],
                )
            rows.append(row)
    return rows


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return f"{value:.{digits}f}"


def target_cell(row: dict[str, Any]) -> str:
    target = TARGETS.get(row["name"])
    if target is None or "ratio" not in row:
        return ""
    return f"≤ {target:g}: {'met' if row['ratio'] <= target else 'missed'}"


def protocol_line(meta: dict[str, Any]) -> str:
    """The timing protocol of a step benchmark's run, from its JSON ``meta``."""
    if "block" not in meta:
        return "timing protocol not recorded"
    return (
        f"{meta['rounds']} rounds (+{meta['warmup_rounds']} warm-up) of one block of "
        f"{meta['block']} consecutive steps per entry, order shuffled per round, "
        f"{meta.get('clock')} clock"
    )


COLUMNS = (
    "`ms/step` = block time / block length, median [IQR] over the blocks; `ratio` = that "
    "median / SGD's; `round ratio` = median [IQR] of the per-round block ratios; `mean` = "
    "total-time ratio (every refresh included); `step ms` / `step ratio` = median single step."
)


def timed_table(results: dict[str, Any], source: str, preamble: str) -> list[str]:
    """The markdown table of one torch step benchmark (``source``)."""
    rows = torch_entries(results, (source,))
    if not rows:
        script = BENCHMARKS[source][0]
        return [f"_no result ({script} did not write its JSON)_"]
    meta = results[source]["meta"]
    lines = [
        f"{preamble} Threads {meta.get('args', {}).get('threads')}, torch {meta.get('torch')}; "
        f"{protocol_line(meta)}. {COLUMNS}",
        "",
        "| entry | ms/step [IQR] | ratio to SGD | round ratio [IQR] | mean | p10 | step ms "
        "| step ratio | target |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = f"{r['name']} (peer)" if r["peer"] else r["name"]
        if "failed" in r:
            reason = r["failed"].replace("|", "\\|")
            lines.append(f"| {name} | failed, dropped: {reason} | | | | | | | |")
            continue
        q1, rm, q3 = r["round"]
        lines.append(
            f"| {name} | {fmt(r['median_ms'])} [{fmt(r['q1_ms'])}, {fmt(r['q3_ms'])}] "
            f"| {fmt(r['ratio'])} | {fmt(rm)} [{fmt(q1)}, {fmt(q3)}] | {fmt(r['mean_ratio'])} "
            f"| {fmt(r['p10_ratio'])} | {fmt(r['step_median_ms'])} | {fmt(r['step_ratio'])} "
            f"| {target_cell(r)} |"
        )
    if meta.get("peers"):
        lines += ["", "Peers:", ""] + [f"* {line}" for line in meta["peers"]]
    return lines


def step_table(results: dict[str, Any]) -> list[str]:
    meta = results.get("torch_step", {}).get("meta", {})
    args = meta.get("args", {})
    return timed_table(
        results,
        "torch_step",
        f"{meta.get('model', '')}, batch {args.get('batch')}, {meta.get('dtype', '')}, inverse "
        f"every {args.get('inverse_every')}, damping {args.get('damping')}.",
    )


def natural_gradient_table(results: dict[str, Any]) -> list[str]:
    meta = results.get("torch_natural_gradient", {}).get("meta", {})
    return timed_table(
        results,
        "torch_natural_gradient",
        f"{meta.get('model', '')}, batch {meta.get('args', {}).get('batch')}, "
        f"{meta.get('dtype', '')}, refresh period {meta.get('period')}, data: {meta.get('data')}.",
    )


def conv_step_table(results: dict[str, Any]) -> list[str]:
    meta = results.get("torch_conv_step", {}).get("meta", {})
    return timed_table(
        results,
        "torch_conv_step",
        f"{meta.get('model', '')}, batch {meta.get('args', {}).get('batch')}, "
        f"{meta.get('dtype', '')}; no momentum, empirical Fisher, factors and inverses every "
        "`u` steps.",
    )


def kron_table(results: dict[str, Any]) -> list[str]:
    data = results.get("kron")
    if not data:
        return ["_no result (bench_kron.py did not write its JSON)_"]
    args = data["meta"]["args"]
    lines = [
        f"d_in = d_out = {args['size']}, B = {args['batch']}, {args['dtype']}, threads "
        f"{args['threads']}, {args['repeats']} repeats. `/GEMM`: achieved GFLOP/s over a plain "
        f"GEMM's in the same run (goal ≥ {KRON_GOAL:.0%}); `/chain`: time over the same GEMMs as "
        "raw backend ops; `speed-up`: factored over dense (forming the gradient included).",
        "",
        "| backend | op | median ms | /GEMM | /chain | speed-up over dense |",
        "|---|---|---|---|---|---|",
    ]
    for r in data["results"]:
        if r.get("kind") == "op":
            ratio = r["ratio_to_gemm"]
            flag = "" if ratio >= KRON_GOAL else " (< goal)"
            lines.append(
                f"| {r['backend']} | {r['name']} | {fmt(r['median_s'] * 1e3)} "
                f"| {ratio:.0%}{flag} | {fmt(r.get('time_over_chain'))} | |"
            )
        elif r.get("kind") == "factored-vs-dense" and "speedup_over_dense" in r:
            lines.append(
                f"| {r['backend']} | {r['name']} | {fmt(r['median_s'] * 1e3)} | "
                f"| {fmt(r.get('time_over_chain'))} | {fmt(r['speedup_over_dense'])}× |"
            )
    return lines


def woodbury_table(results: dict[str, Any]) -> list[str]:
    data = results.get("woodbury")
    if not data:
        return ["_no result (bench_woodbury.py did not write its JSON)_"]
    meta = data["meta"]
    args = meta["args"]
    goals = meta.get("goals", {})
    dims = "-".join(str(d) for d in args["mlp_dims"])
    quick = bool(args.get("quick"))
    lines = [
        f"MLP {dims}, B = {args['batch']}, float32, threads {args['threads']}, "
        f"{args['repeats']} repeats (slow {args['slow_repeats']}). `speed-up`: materialised "
        "per-example-gradient path's median time over the implicit one's; `memory`: implicit "
        "peak memory / materialised. Goals (issue, full-size MLP only): speed-up ≥ "
        f"{goals.get('speedup', float('nan')):g}×, memory ≤ "
        f"{goals.get('memory_ratio', float('nan')):.0%}"
        + (" — not applicable to this --quick run." if quick else "."),
        "",
        "| backend | entry | median ms | speed-up | FLOP ratio | memory |",
        "|---|---|---|---|---|---|",
    ]
    for r in data["results"]:
        if r.get("part") != "mlp" or "speedup" not in r:
            continue
        memory = f"{r['memory_ratio']:.2%}" if "memory_ratio" in r else ""
        lines.append(
            f"| {r['backend']} | {r['name']} | {fmt(r['median_s'] * 1e3, 3)} "
            f"| {r['speedup']:.0f}× | {r['flop_ratio']:.0f}× | {memory} |"
        )
    return lines


def build_markdown(
    results: dict[str, Any], runs: dict[str, dict[str, Any]], quick: bool, figure: str | None
) -> str:
    mode = "--quick (smoke run: few rounds, small shapes; indicative only)" if quick else "full"
    lines = [
        "# Speed race (`bench/race.py`)",
        "",
        f"Mode: {mode}. Every number below comes from the JSON the benchmarks wrote in this "
        "folder; their printed tables are in the `*.log` files beside it.",
        "",
    ]
    if runs:
        lines += ["Commands run (in this order):", "", "```"]
        lines += [f"{run['command']}" for run in runs.values()]
        lines += ["```", "", "| benchmark | exit code | wall s |", "|---|---|---|"]
        lines += [
            f"| {name} | {run['returncode']} | {run['wall_s']:.1f} |" for name, run in runs.items()
        ]
        lines.append("")
    sections = (
        ("Optimizer step time vs SGD (`bench_torch_step.py`)", step_table),
        (
            "NaturalGradient step time vs SGD (`bench_torch_natural_gradient.py`)",
            natural_gradient_table,
        ),
        ("Curvature steps on a small CNN vs SGD (`bench_torch_conv_step.py`)", conv_step_table),
        ("Kronecker-factored solves vs GEMM (`bench_kron.py`)", kron_table),
        ("Woodbury natural gradient vs materialised (`bench_woodbury.py`)", woodbury_table),
    )
    for title, table in sections:
        lines += [f"## {title}", "", *table(results), ""]
    if figure:
        lines += [
            "## Figure",
            "",
            f"![step time / SGD]({figure})",
            "",
            "Bars: median time per step (blocks of consecutive steps) / SGD's. Whiskers: "
            "median and IQR of the per-round ratios. Red ticks: the issue's goals.",
            "",
        ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Figure
# --------------------------------------------------------------------------------------


def build_figure(results: dict[str, Any], path: Path) -> bool:
    """Bar chart of step time / SGD for every torch entry; False when there is none."""
    rows = [
        r
        for r in torch_entries(results)
        if r["name"] not in BASELINES and "failed" not in r and "ratio" in r
    ]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['name']} (peer)" if r["peer"] else r["name"] for r in rows]  # top to bottom
    y = list(range(len(rows)))[::-1]
    colors = [
        "tab:gray"
        if r["peer"]
        else "tab:green"
        if r["source"] == "torch_natural_gradient"
        else "tab:blue"
        for r in rows
    ]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.6))
    ratios = [r["ratio"] for r in rows]
    ax.barh(y, ratios, color=colors, alpha=0.75, height=0.6)
    for yy, r in zip(y, rows):
        target = TARGETS.get(r["name"])
        note = f"{r['ratio']:.2f}" + (f"  (target ≤ {target:g})" if target else "")
        ax.annotate(note, (r["ratio"], yy), xytext=(4, 6), textcoords="offset points", fontsize=7)
    whiskered = [(yy, r["round"]) for yy, r in zip(y, rows) if r.get("round")]
    if whiskered:
        ax.errorbar(
            [m for _, (_, m, _) in whiskered],
            [yy for yy, _ in whiskered],
            xerr=[[m - lo for _, (lo, m, _) in whiskered], [hi - m for _, (_, m, hi) in whiskered]],
            fmt="o",
            color="black",
            markersize=3,
            capsize=3,
            label="per-round ratio: median [IQR]",
        )
    targeted = [(yy, TARGETS[r["name"]]) for yy, r in zip(y, rows) if r["name"] in TARGETS]
    if targeted:
        ax.scatter(
            [t for _, t in targeted],
            [yy for yy, _ in targeted],
            marker="|",
            s=400,
            linewidths=2.5,
            color="red",
            zorder=3,
            label="issue goal",
        )
    ax.axvline(1.0, color="black", linewidth=1)
    highest = max(ratios + [hi for _, (_, _, hi) in whiskered])
    if highest > 4:  # peers several times slower: a log axis keeps the targets readable
        from matplotlib.ticker import FuncFormatter

        ax.set_xscale("log")
        lowest = min(ratios + [lo for _, (lo, _, _) in whiskered] + [1.0])
        ax.set_xlim(0.8 * lowest, 1.5 * highest)

        def label(value: float, _: object) -> str:
            leading = value / 10 ** math.floor(math.log10(value))
            return f"{value:g}" if round(leading, 6) in (1, 2, 3, 5) else ""

        ax.xaxis.set_major_formatter(FuncFormatter(label))
        ax.xaxis.set_minor_formatter(FuncFormatter(label))
        ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_yticks(y)
    ax.set_yticklabels(labels)
    ax.set_xlabel("time per step / SGD's (median over blocks of consecutive steps)")
    meta = results.get("torch_step", results.get("torch_natural_gradient", {})).get("meta", {})
    args = meta.get("args", {})
    ax.set_title(
        "curvlinalg_torch step time relative to torch.optim.SGD\n"
        f"threads {args.get('threads')}, torch {meta.get('torch')}"
        + (", --quick (indicative only)" if args.get("quick") else "")
    )
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def is_quick(results: dict[str, Any]) -> bool:
    """Whether the benchmarks behind ``results`` ran in their --quick mode."""
    return any(data.get("meta", {}).get("args", {}).get("quick") for data in results.values())


def write_report(out: Path, runs: dict[str, dict[str, Any]]) -> tuple[Path, Path]:
    results = load_results(out)
    quick = is_quick(results)
    png = out / "race.png"
    png.unlink(missing_ok=True)
    has_figure = build_figure(results, png)
    md = out / "race.md"
    md.write_text(build_markdown(results, runs, quick, png.name if has_figure else None))
    return md, png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="every benchmark's --quick (CI)")
    parser.add_argument("--threads", type=int, default=2, help="pinned threads (default 2)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default bench/results/race/, with --quick bench/results/tmp/race/)",
    )
    parser.add_argument(
        "--skip", default="", help=f"comma-separated benchmarks to skip: {', '.join(BENCHMARKS)}"
    )
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated benchmarks to (re-)run, keeping the other benchmarks' results "
        "and run records already in --out (to add or redo one benchmark of a full run)",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: rebuild race.md / race.png from the JSON already in --out",
    )
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be positive")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    for option, names in (("--skip", skip), ("--only", only)):
        if names - set(BENCHMARKS):
            parser.error(
                f"unknown benchmark(s) in {option}: {', '.join(sorted(names - set(BENCHMARKS)))}"
            )
    if skip and only:
        parser.error("--skip and --only exclude each other")
    out = args.out or (BENCH / "results" / ("tmp/race" if args.quick else "race"))
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runs: dict[str, dict[str, Any]] = {}
    records = out / "race_runs.json"
    if not args.report_only:
        chosen = [n for n in BENCHMARKS if (n in only if only else n not in skip)]
        kept = {}
        if only and records.exists():
            kept = {k: v for k, v in json.loads(records.read_text()).items() if k not in only}
        for name, (_, json_name) in BENCHMARKS.items():
            # Skipped ones too (nothing stale is reported), except what --only keeps.
            if name in chosen or not only:
                (out / json_name).unlink(missing_ok=True)
        fresh = run_all(chosen, out, args.threads, args.quick)
        merged = {**kept, **fresh}
        runs = {name: merged[name] for name in BENCHMARKS if name in merged}
        records.write_text(json.dumps(runs, indent=2))
    elif records.exists():
        runs = json.loads(records.read_text())
    md, png = write_report(out, runs)
    print(f"wrote {md}" + (f" and {png}" if png.exists() else " (no torch entry: no figure)"))
    print(f"total {time.perf_counter() - started:.1f} s")
    failed = [name for name, run in runs.items() if run["returncode"] != 0]
    if failed:
        print(f"failed: {', '.join(failed)} (see their .log files in {out})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
