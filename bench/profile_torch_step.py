"""Where the step time of the curvlinalg_torch optimizers goes, on ``bench_torch_step.py``'s MLP.

Model: MLP 784-1000-1000-1000-10 (ReLU, biases), batch 100, float32, CPU, threads pinned
(``--threads``, default 2); the same optimizer settings as ``bench_torch_step.py`` (momentum
0.9, λ = 1, inverses/eigenbases every 100 steps; FOOF at ``update_every`` 1, K-FAC and EK-FAC
(MC Fisher) at 1 and 10) and ``bench_torch_natural_gradient.py``'s target
(``NaturalGradient`` MC Fisher of an independent batch, refresh every 10). Each configuration
runs ``--warmup`` untimed steps, then ``--steps`` consecutive steps (a multiple of 10: whole
factor periods) under ``torch.profiler`` (CPU activities, shapes recorded). Reported per step:

* the wall time of the profiled steps (``perf_counter`` around them, profiler on: its own
  overhead is a few µs per op, included) and of the same number of unprofiled steps;
* ATen self time by category: ``gemm`` (``mm``, ``addmm``, ``addmv``, ``bmm``, ``baddbmm``),
  ``factorisation`` (Cholesky, inverses, triangular solves, eigh), ``copy`` (``copy_``,
  ``clone``, ``cat``, ``stack``, padding, ``contiguous``), ``reduction`` (``sum``,
  ``isfinite``, ``all``, ``item``: the finiteness checks), ``elementwise`` (everything else:
  ReLU, its backward, ``add``, ``mul``, the optimizer's updates, softmax/cross-entropy);
* ``python + dispatch``: wall time minus the ATen self time (the Python of the optimizer, the
  hooks and autograd, and the dispatcher's per-op cost);
* the GEMM rate: counted GEMM FLOPs (from the recorded shapes) / GEMM self time, and the
  GEMMs whose shapes run slowest.

Usage::

    python bench/profile_torch_step.py                 # all configurations, 2 threads
    python bench/profile_torch_step.py --only foof,kfac-mc-u1 --steps 20
    python bench/profile_torch_step.py --threads 1 --only ekfac-mc-u1,ekfac-mc-u10
    python bench/profile_torch_step.py --json PATH     # also the numbers as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import timing  # noqa: E402

GEMM = {"aten::mm", "aten::addmm", "aten::addmv", "aten::bmm", "aten::baddbmm", "aten::addmm_"}
FACTORISATION_WORDS = ("cholesky", "inverse", "triangular", "eigh", "linalg_inv", "lu")
COPY = {
    "aten::copy_",
    "aten::clone",
    "aten::cat",
    "aten::stack",
    "aten::constant_pad_nd",
    "aten::pad",
    "aten::contiguous",
    "aten::_to_copy",
    "aten::fill_",
    "aten::zero_",
    "aten::zeros",
    "aten::empty",
    "aten::empty_strided",
    "aten::new_zeros",
}
REDUCTION = {
    "aten::sum",
    "aten::isfinite",
    "aten::all",
    "aten::any",
    "aten::item",
    "aten::_local_scalar_dense",
    "aten::is_nonzero",
    "aten::eq",
    "aten::ne",
    "aten::abs",
}


def category(name: str) -> str:
    if name in GEMM:
        return "gemm"
    if any(word in name for word in FACTORISATION_WORDS):
        return "factorisation"
    if name in COPY:
        return "copy"
    if name in REDUCTION:
        return "reduction"
    return "elementwise"


def gemm_flops(name: str, shapes: list[Any]) -> float:
    """FLOPs of one GEMM call from its recorded input shapes (0 when they are unknown)."""
    try:
        if name == "aten::mm":
            (m, k), (_, n) = shapes[0], shapes[1]
            return 2.0 * m * k * n
        if name in ("aten::addmm", "aten::addmm_"):
            (m, k), (_, n) = shapes[1], shapes[2]
            return 2.0 * m * k * n
        if name == "aten::addmv":
            m, k = shapes[1]
            return 2.0 * m * k
        if name in ("aten::bmm", "aten::baddbmm"):
            offset = 0 if name == "aten::bmm" else 1
            (b, m, k), (_, _, n) = shapes[offset], shapes[offset + 1]
            return 2.0 * b * m * k * n
    except (ValueError, IndexError, TypeError):
        return 0.0
    return 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40, help="profiled steps (×10)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--only", default="", help="comma-separated configurations")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    timing.pin_threads(args.threads)
    import torch
    import torch.nn.functional as F
    from curvlinalg_torch import EKFAC, FOOF, KFAC
    from curvlinalg_torch.natural_gradient import NaturalGradient
    from torch import nn
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    widths = [784, 1000, 1000, 1000, 10]

    def mlp() -> nn.Module:
        layers: list[nn.Module] = []
        for index, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(d_in, d_out))
            if index < len(widths) - 2:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)

    initial = mlp().state_dict()
    pool = [(torch.randn(100, 784), torch.randint(0, 10, (100,))) for _ in range(8)]
    common = {"momentum": 0.9, "inverse_every": 100}
    makers = {
        "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9),
        "foof-u1": lambda m: FOOF(m, lr=0.1, damping=1.0, update_every=1, **common),
        "kfac-mc-u1": lambda m: KFAC(
            m, lr=0.1, damping=1.0, fisher="mc", update_every=1, seed=0, **common
        ),
        "kfac-mc-u10": lambda m: KFAC(
            m, lr=0.1, damping=1.0, fisher="mc", update_every=10, seed=0, **common
        ),
        "ekfac-mc-u1": lambda m: EKFAC(
            m, lr=0.1, damping=1.0, fisher="mc", update_every=1, seed=0, **common
        ),
        "ekfac-mc-u10": lambda m: EKFAC(
            m, lr=0.1, damping=1.0, fisher="mc", update_every=10, seed=0, **common
        ),
        "ng-mc-independent-T10": lambda m: NaturalGradient(
            m,
            lr=0.01,
            damping=1.0,
            momentum=0.9,
            seed=0,
            fisher="mc",
            fisher_batch="independent",
            refresh_every=10,
        ),
    }
    if args.only:
        wanted = [name.strip() for name in args.only.split(",")]
        makers = {name: makers[name] for name in ["sgd", *wanted] if name in makers}
    report: dict[str, Any] = {}
    print(
        f"# profile_torch_step: MLP {'-'.join(map(str, widths))}, batch 100, float32, threads "
        f"{args.threads}, torch {torch.__version__}; {args.steps} profiled consecutive steps "
        f"after {args.warmup} warm-up; load average {timing.load_average()}"
    )
    for name, make in makers.items():
        model = mlp()
        model.load_state_dict(initial)
        optimizer = make(model)
        counter = [0]

        def step(
            model: nn.Module = model, optimizer: Any = optimizer, counter: list[int] = counter
        ) -> None:
            x, y = pool[counter[0] % len(pool)]
            counter[0] += 1
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()

        for _ in range(args.warmup):
            step()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        plain = (time.perf_counter() - start) / args.steps
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            wall = (time.perf_counter() - start) / args.steps
        by_category: dict[str, float] = defaultdict(float)
        by_op: dict[str, float] = defaultdict(float)
        gemm_time, flops = 0.0, 0.0
        by_shape: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
        for event in prof.key_averages(group_by_input_shape=True):
            seconds = event.self_cpu_time_total * 1e-6 / args.steps
            if not event.key.startswith("aten::"):
                continue
            by_category[category(event.key)] += seconds
            by_op[event.key] += seconds
            if event.key in GEMM:
                gemm_time += seconds
                count_flops = gemm_flops(event.key, event.input_shapes) * event.count / args.steps
                flops += count_flops
                entry = by_shape[f"{event.key} {event.input_shapes}"]
                entry[0] += seconds
                entry[1] += count_flops
                entry[2] += event.count / args.steps
        aten = sum(by_category.values())
        result = {
            "wall_ms": 1e3 * wall,
            "unprofiled_ms": 1e3 * plain,
            "aten_ms": 1e3 * aten,
            "python_dispatch_ms": 1e3 * (wall - aten),
            "categories_ms": {k: 1e3 * v for k, v in sorted(by_category.items())},
            "gemm_gflop": flops * 1e-9,
            "gemm_gflops_per_s": flops / gemm_time * 1e-9 if gemm_time else None,
            "top_ops_ms": {
                k: 1e3 * v for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])[:12]
            },
            "slowest_gemms": [
                {
                    "op": key,
                    "ms": 1e3 * t,
                    "calls_per_step": calls,
                    "gflops_per_s": f / t * 1e-9 if t else None,
                }
                for key, (t, f, calls) in sorted(by_shape.items(), key=lambda kv: -kv[1][0])[:8]
            ],
        }
        report[name] = result
        cats = "  ".join(f"{k} {v:.2f}" for k, v in result["categories_ms"].items())
        print(
            f"\n== {name}: {result['wall_ms']:.2f} ms/step profiled ({result['unprofiled_ms']:.2f}"
            f" unprofiled); ATen {result['aten_ms']:.2f} ms ({cats}); python + dispatch "
            f"{result['python_dispatch_ms']:.2f} ms; GEMMs {result['gemm_gflop']:.3f} GFLOP at "
            f"{result['gemm_gflops_per_s'] or 0:.1f} GFLOP/s"
        )
        for op, ms in result["top_ops_ms"].items():
            print(f"   {op:<40}{ms:8.3f} ms")
        print("   GEMMs by shape (ms/step, calls/step, GFLOP/s):")
        for g in result["slowest_gemms"]:
            print(
                f"   {g['op'][:90]:<90}{g['ms']:8.3f}{g['calls_per_step']:6.1f}"
                f"{g['gflops_per_s'] or 0:8.1f}"
            )
    if args.json:
        meta = {"args": vars(args), "torch": torch.__version__, "load": timing.load_average()}
        with open(args.json, "w") as file:
            json.dump({"meta": meta, "configurations": report}, file, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
