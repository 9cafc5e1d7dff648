"""Cheap properties of the reproduction scripts (bench/reproduce_benzing.py,
bench/reproduce_puiu.py): the model and hyperparameters match NOTES.md §4, and the --quick
runs complete and write valid JSON."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from .conftest import BENCH

torch = pytest.importorskip("torch")
pytest.importorskip("curvlinalg_torch")

import reproduce_benzing  # noqa: E402
import reproduce_puiu  # noqa: E402
import training  # noqa: E402


def test_puiu_cnn_has_4712_parameters():
    model = reproduce_puiu.puiu_cnn(0)
    assert sum(p.numel() for p in model.parameters()) == 4712
    assert model(torch.zeros(3, 784)).shape == (3, 10)


def test_benzing_mlp_has_no_biases():
    model = training.benzing_mlp(0)
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert shapes == [(1000, 784), (1000, 1000), (1000, 1000), (10, 1000)]


def test_sum_to_mean_translation_matches_notes():
    # NOTES.md §1/§2.4: sum-over-batch factors at (lr, λ) = mean factors at (lr/B, λ/B).
    assert training.sum_to_mean(30.0, 100.0, 100) == pytest.approx((0.3, 1.0))
    hp = reproduce_benzing.hyperparameters()
    mini, full = hp["minibatch"], hp["full_batch"]
    assert mini["KFAC"] == pytest.approx({"lr": 0.003, "damping": 0.01})  # Fig 1A (0.3, 1)
    assert mini["FOOF"] == pytest.approx({"lr": 0.3, "damping": 1.0})  # Fig 4B (30, 100)
    assert full["KFAC"] == pytest.approx({"lr": 1e-4, "damping": 1e-7})  # Fig 1D, B = 1000
    # The natural gradient's Fisher is already a batch mean in Benzing's code: unchanged.
    assert mini["Natural (MC)"] == pytest.approx({"lr": 1e-5, "damping": 1e-4})
    assert full["Natural (MC)"] == pytest.approx({"lr": 0.1, "damping": 1.0})
    assert full["Natural (exact)"] == pytest.approx({"lr": 100.0, "damping": 100.0})
    assert mini["SGD+momentum"] == {"lr": 0.01} and mini["Adam"] == {"lr": 1e-4}
    assert full["SGD+momentum"] == {"lr": 0.03}
    with pytest.raises(ValueError):
        training.sum_to_mean(1.0, 1.0, 0)


def test_puiu_table_counts():
    row = reproduce_puiu.table_row([0.98, 0.985, 0.97], [0.25, 0.19, 0.3])
    assert (row["N(acc>=98%)"], row["N(acc>98%)"], row["N(acc>=98.5%)"]) == (2, 1, 1)
    assert (row["N(loss<=0.25)"], row["N(loss<=0.2)"]) == (2, 1)
    assert row["acc_mean"] == pytest.approx(97.833333)


def _run(script: str, out, *extra: str) -> None:
    # One thread: on a busy machine two OpenMP threads can spin at barriers for seconds.
    command = [sys.executable, str(BENCH / script), "--quick", "--no-progress", "--threads", "1"]
    command += ["--out", str(out)]
    subprocess.run([*command, *extra], check=True, capture_output=True, text=True, timeout=240)


def _finite_curve(values):
    return len(values) > 0 and all(isinstance(v, float) and math.isfinite(v) for v in values)


@pytest.mark.smoke
def test_reproduce_benzing_quick(tmp_path):
    _run("reproduce_benzing.py", tmp_path, "--all")
    for stem in ("benzing_mnist", "benzing_timing_mnist", "benzing_fullbatch_mnist"):
        payload = json.loads((tmp_path / f"{stem}.json").read_text())
        assert payload["runs"], stem
        for runs in payload["runs"].values():
            for run in runs:
                assert run["losses"] and run["epoch_seconds"]
                assert 0.0 <= run["test_accuracy"] <= 1.0
    main = json.loads((tmp_path / "benzing_mnist.json").read_text())
    assert set(main["runs"]) == {
        "SGD+momentum",
        "Adam",
        "KFAC T=1",
        "FOOF T=1",
        "FOOF T=100",
        "Natural (MC)",
    }
    assert all(_finite_curve(runs[0]["losses"]) for runs in main["runs"].values())
    assert (tmp_path / "benzing_mnist_loss.png").stat().st_size > 0


@pytest.mark.smoke
def test_reproduce_puiu_quick(tmp_path):
    _run("reproduce_puiu.py", tmp_path)
    payload = json.loads((tmp_path / "puiu_table1.json").read_text())
    assert payload["parameters"] == 4712
    assert set(payload["runs"]) == {"K-FAC", "SO-KLD-WRM", "Q-KLD-WRM", "QE-KLD-WRM"}
    for runs in payload["runs"].values():
        (run,) = runs
        assert _finite_curve(run["losses"]) and len(run["test_accuracy_per_epoch"]) == 2
        # Also measured as Puiu's code did, on test images left unnormalised.
        assert len(run["unnormalised_test_accuracy_per_epoch"]) == 2
        assert 0.0 <= run["unnormalised_test_accuracy"] <= 1.0
        assert run["unnormalised_test_loss"] != run["test_loss"]
    assert set(payload["table_unnormalised_test"]) == set(payload["runs"])
    assert set(payload["table"]) == set(payload["runs"])
    assert (tmp_path / "puiu_table1.png").stat().st_size > 0


def test_seed_range():
    assert training.seed_range(0, 3) == [0, 1, 2]
    assert training.seed_range(5, 1) == [5]
    for first, count in ((-1, 2), (0, 0)):
        with pytest.raises(ValueError, match="seed"):
            training.seed_range(first, count)


def test_merge_runs_orders_seeds_and_refuses_repeats():
    part_a = {"A": [{"seed": 2, "x": 20}], "B": [{"seed": 2, "x": 21}]}
    part_b = {"A": [{"seed": 0, "x": 0}, {"seed": 1, "x": 10}], "C": [{"seed": 0, "x": 3}]}
    merged = training.merge_runs([part_a, part_b])
    assert list(merged) == ["A", "B", "C"]
    assert [run["x"] for run in merged["A"]] == [0, 10, 20]
    assert [run["seed"] for run in merged["B"]] == [2]
    with pytest.raises(ValueError, match=r"A: seed\(s\) \[2\]"):
        training.merge_runs([part_a, {"A": [{"seed": 2, "x": 0}]}])


def test_read_parts_checks_the_experiment(tmp_path):
    path = tmp_path / "part.json"
    path.write_text(json.dumps({"experiment": "something else", "runs": {}}))
    with pytest.raises(ValueError, match="cannot merge"):
        training.read_parts([str(path)], reproduce_puiu.EXPERIMENT)


@pytest.mark.smoke
def test_reproduce_puiu_seed_parts_merge_into_one_table(tmp_path):
    # Two single-seed processes and their merge equal one two-seed table (same seeds, so the
    # same batches, labels and initialisations).
    only = ("--only", "K-FAC,SO-KLD-WRM")
    for seed in (0, 1):
        _run("reproduce_puiu.py", tmp_path / f"s{seed}", *only, "--first-seed", str(seed))
    parts = [str(tmp_path / f"s{seed}" / "puiu_table1.json") for seed in (0, 1)]
    _run("reproduce_puiu.py", tmp_path / "merged", "--merge", *parts[::-1])
    merged = json.loads((tmp_path / "merged" / "puiu_table1.json").read_text())
    assert merged["seeds"] == [0, 1] and set(merged["runs"]) == {"K-FAC", "SO-KLD-WRM"}
    single = [json.loads(open(part).read()) for part in parts]
    for name, runs in merged["runs"].items():
        assert [run["seed"] for run in runs] == [0, 1]
        for run, part in zip(runs, single):
            assert run["losses"] == part["runs"][name][0]["losses"]
        accuracies = [100 * run["test_accuracy"] for run in runs]
        assert merged["table"][name]["acc_mean"] == pytest.approx(sum(accuracies) / 2)
    assert (tmp_path / "merged" / "puiu_table1.png").stat().st_size > 0


@pytest.mark.smoke
def test_reproduce_benzing_seed_parts_merge(tmp_path):
    for seed in (0, 1):
        _run(
            "reproduce_benzing.py",
            tmp_path / f"s{seed}",
            *("--only", "SGD+momentum,FOOF T=1", "--first-seed", str(seed)),
        )
    parts = [str(tmp_path / f"s{seed}" / "benzing_mnist.json") for seed in (0, 1)]
    _run("reproduce_benzing.py", tmp_path / "merged", "--merge", *parts)
    merged = json.loads((tmp_path / "merged" / "benzing_mnist.json").read_text())
    assert merged["seeds"] == [0, 1] and len(merged["merged_from"]) == 2
    for name, runs in merged["runs"].items():
        assert [run["seed"] for run in runs] == [0, 1]
        losses = [run["train_loss"] for run in runs]
        assert merged["summary"][name]["train_loss_mean"] == pytest.approx(sum(losses) / 2)
    # A file of another experiment is refused rather than silently mixed in.
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"experiment": reproduce_puiu.EXPERIMENT, "runs": {}}))
    with pytest.raises(subprocess.CalledProcessError):
        _run("reproduce_benzing.py", tmp_path / "bad", "--merge", parts[0], str(other))


def test_benzing_plot_only_redraws_from_json(tmp_path):
    pytest.importorskip("matplotlib")
    runs = {
        "SGD+momentum": [
            {"seed": seed, "losses": [2.0, 1.5, 1.0 + seed / 10]} for seed in (0, 1, 2)
        ],
        "FOOF T=1": [{"seed": seed, "losses": [2.0, 1.0, 0.5]} for seed in (0, 2)],
    }
    assert reproduce_benzing.seed_count(runs) == 3
    assert reproduce_benzing._seeds_text({"m": runs["SGD+momentum"][:1]}) == "1 seed"
    payloads = {
        "main.json": {"experiment": reproduce_benzing.MAIN_EXPERIMENT, "dataset": "mnist"},
        "full.json": {"experiment": "Benzing ICML 2022 Fig 1D", "dataset": "mnist", "batch": 9},
        "timing.json": {
            "experiment": "Benzing ICML 2022 Fig 4A",
            "dataset": "mnist",
            "threads": 2,
            "seconds_per_epoch": {"SGD+momentum": 1.0, "FOOF T=1": 3.0, "KFAC T=10": 2.0},
        },
    }
    paths = []
    for name, payload in payloads.items():
        (tmp_path / name).write_text(json.dumps({**payload, "runs": runs}))
        paths.append(str(tmp_path / name))
    assert reproduce_benzing.main(["--plot-only", *paths, "--out", str(tmp_path / "f")]) == 0
    for figure in (
        "benzing_mnist_loss.png",
        "benzing_fullbatch_mnist_loss.png",
        "benzing_timing_mnist.png",
    ):
        assert (tmp_path / "f" / figure).read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "other.json").write_text(json.dumps({"experiment": "Puiu Table 1"}))
    with pytest.raises(SystemExit, match="not a run of this script"):
        reproduce_benzing.main(["--plot-only", str(tmp_path / "other.json")])
