"""The EK-FAC benchmark scripts: bench/ekfac_fashion_mnist.py (--quick end to end, the method
parser, per-method (lr, λ) and --max-updates) and bench/peer_kronfluence.py (its agreement
measures; a clean skip without kronfluence)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest

from .conftest import BENCH

np = pytest.importorskip("numpy")
pytest.importorskip("torch")
pytest.importorskip("curvlinalg_torch")
pytest.importorskip("scipy")

import ekfac_fashion_mnist  # noqa: E402
import peer_kronfluence  # noqa: E402


def test_methods_parse_names_and_periods():
    assert ekfac_fashion_mnist.methods("KFAC T=1, EKFAC T=100") == [
        ("KFAC T=1", "KFAC", 1, {}),
        ("EKFAC T=100", "EKFAC", 100, {}),
    ]
    assert ekfac_fashion_mnist.methods(
        "EKFAC T=10 lr=0.01 damping=3e-1,EKFAC T=10 damping=1,KFAC T=5 lr=.002"
    ) == [
        ("EKFAC T=10 lr=0.01 damping=3e-1", "EKFAC", 10, {"lr": 0.01, "damping": 0.3}),
        ("EKFAC T=10 damping=1", "EKFAC", 10, {"damping": 1.0}),
        ("KFAC T=5 lr=.002", "KFAC", 5, {"lr": 0.002}),
    ]
    bad_names = ("EKFAC", "KFAC T=0", "SGD T=1", "EKFAC T=x", "EKFAC T=2 lr=x")
    bad_names += ("EKFAC T=2 damping=1 lr=1", "EKFAC T=2 lr=0", "EKFAC T=2,EKFAC T=2")
    for bad in bad_names:
        with pytest.raises(SystemExit):
            ekfac_fashion_mnist.methods(bad)


def test_hyperparameters_name_over_flag_over_kfac_default():
    default = {"lr": 0.003, "damping": 0.01}
    args = ekfac_fashion_mnist.parse(["--ekfac-lr", "0.02", "--kfac-damping", "0.05"])
    pick = ekfac_fashion_mnist.method_hyperparameters
    assert pick("EKFAC", {}, args, default) == {"lr": 0.02, "damping": 0.01}
    assert pick("KFAC", {}, args, default) == {"lr": 0.003, "damping": 0.05}
    assert pick("EKFAC", {"damping": 0.3}, args, default) == {"lr": 0.02, "damping": 0.3}
    assert pick("KFAC", {"lr": 0.1, "damping": 1.0}, args, default) == {"lr": 0.1, "damping": 1.0}
    unset = ekfac_fashion_mnist.parse([])
    assert pick("EKFAC", {}, unset, default) == default
    assert unset.max_updates is None
    for bad in (["--ekfac-damping", "0"], ["--kfac-lr", "-1"], ["--max-updates", "0"]):
        with pytest.raises(SystemExit):
            ekfac_fashion_mnist.parse(bad)


def test_both_methods_use_reproduce_benzings_kfac_hyperparameters():
    assert ekfac_fashion_mnist.hyperparameters() == pytest.approx({"lr": 0.003, "damping": 0.01})


def test_stop_on_overflow_turns_only_the_non_finite_refusal_into_a_divergence():
    from curvlinalg import NotPositiveDefiniteError

    class Raising:
        def __init__(self, error):
            self.error, self.zeroed = error, []

        def zero_grad(self, set_to_none=True):
            self.zeroed.append(set_to_none)

        def step(self, *args):
            if self.error is not None:
                raise self.error
            return args

    overflow = ValueError("layer '6': new contains NaN or infinite values")
    with pytest.raises(NotPositiveDefiniteError, match="non-finite curvature") as caught:
        ekfac_fashion_mnist.StopOnOverflow(Raising(overflow)).step()
    assert caught.value.__cause__ is overflow
    for other in (ValueError("lr must be positive"), NotPositiveDefiniteError("G"), KeyError(1)):
        with pytest.raises(type(other)) as caught:
            ekfac_fashion_mnist.StopOnOverflow(Raising(other)).step()
        assert caught.value is other
    fine = Raising(None)
    wrapped = ekfac_fashion_mnist.StopOnOverflow(fine)
    wrapped.zero_grad(set_to_none=False)
    assert fine.zeroed == [False] and wrapped.step("closure") == ("closure",)


@pytest.mark.smoke
def test_ekfac_fashion_mnist_quick(tmp_path):
    command = [
        sys.executable,
        str(BENCH / "ekfac_fashion_mnist.py"),
        "--quick",
        "--no-progress",
        "--threads",
        "1",
        "--out",
        str(tmp_path),
    ]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=240)
    payload = json.loads((tmp_path / "ekfac_mnist-subset.json").read_text())
    assert set(payload["runs"]) == {"KFAC T=2", "EKFAC T=2"}
    assert payload["runs"]["EKFAC T=2"]["optimizer"]["kind"] == "EKFAC"
    for run in payload["runs"].values():
        assert len(run["losses"]) == payload["steps"] == 4
        assert all(math.isfinite(v) for v in run["losses"])
        assert math.isfinite(run["test_loss"]) and 0.0 <= run["test_accuracy"] <= 1.0
    # Same initial weights and first batch: the first mini-batch losses coincide.
    first = [run["losses"][0] for run in payload["runs"].values()]
    assert first[0] == pytest.approx(first[1])
    # Defaults: both methods at K-FAC's (lr, λ), recorded per method.
    assert payload["hyperparameters"] == {
        name: {"lr": 0.003, "damping": 0.01} for name in ("KFAC T=2", "EKFAC T=2")
    }
    assert (tmp_path / "ekfac_mnist-subset_loss.png").exists() == (
        importlib.util.find_spec("matplotlib") is not None
    )


@pytest.mark.smoke
def test_ekfac_fashion_mnist_per_method_hyperparameters_and_max_updates(tmp_path):
    methods = "EKFAC T=2,EKFAC T=2 lr=0.001 damping=2,KFAC T=2"
    command = [sys.executable, str(BENCH / "ekfac_fashion_mnist.py"), "--quick"]
    command += ["--no-progress", "--threads", "1", "--out", str(tmp_path), "--no-plot"]
    command += ["--max-updates", "2", "--stem", "tune", "--ekfac-lr", "0.002"]
    command += ["--ekfac-damping", "0.5", "--kfac-damping", "0.02"]
    command += ["--methods", methods]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=240)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tune.json"]
    payload = json.loads((tmp_path / "tune.json").read_text())
    expected = {
        "EKFAC T=2": {"lr": 0.002, "damping": 0.5},
        "EKFAC T=2 lr=0.001 damping=2": {"lr": 0.001, "damping": 2.0},
        "KFAC T=2": {"lr": 0.003, "damping": 0.02},
    }
    assert payload["hyperparameters"] == expected
    assert payload["steps"] == 2
    for name, hp in expected.items():
        run = payload["runs"][name]
        assert len(run["losses"]) == 2
        assert {k: run["optimizer"][k] for k in hp} == hp
        assert {k: payload["summary"][name][k] for k in hp} == hp
    # Same start and batch; the second update sees the first step, which differs with (lr, λ).
    losses = [payload["runs"][name]["losses"] for name in expected]
    assert losses[0][0] == pytest.approx(losses[1][0]) == pytest.approx(losses[2][0])
    assert losses[0][1] != losses[1][1]


def test_collect_picks_each_kinds_lowest_train_loss_among_stable_runs(tmp_path):
    def part(path, seed, entries):
        runs = {name: {"optimizer": {"kind": name.split()[0]}} for name in entries}
        summary = {
            name: {"lr": lr, "damping": d, "train_loss": loss, "diverged_at": at}
            | {"last100_minibatch_loss": loss, "test_accuracy": 0.5}
            for name, (lr, d, loss, at) in entries.items()
        }
        payload = {"dataset": "fashion-mnist", "seed": seed, "steps": 150}
        path.write_text(json.dumps(payload | {"runs": runs, "summary": summary}))
        return str(path)

    first = part(
        tmp_path / "a.json",
        1,
        {
            "EKFAC T=100 lr=0.01 damping=0.1": (0.01, 0.1, 0.40, None),
            "EKFAC T=100 lr=0.003 damping=0.01": (0.003, 0.01, None, 7),  # NaN: diverged
            "EKFAC T=100 lr=0.03 damping=0.03": (0.03, 0.03, 0.01, 4),  # stopped: diverged
            "KFAC T=100 lr=0.003 damping=0.001": (0.003, 0.001, 1e25, None),  # blew up
            "KFAC T=100 lr=0.003 damping=0.01": (0.003, 0.01, 0.36, None),
        },
    )
    second = part(
        tmp_path / "b.json", 1, {"EKFAC T=100 lr=0.003 damping=0.03": (3e-3, 0.03, 0.39, None)}
    )
    table = ekfac_fashion_mnist.collect([first, second])
    assert len(table["rows"]) == 6
    assert [row["diverged"] for row in table["rows"]] == [False, True, True, True, False, False]
    assert table["best"]["EKFAC"]["name"] == "EKFAC T=100 lr=0.003 damping=0.03"
    assert table["best"]["KFAC"]["damping"] == 0.01
    ekfac_fashion_mnist.main(["--collect", first, second, "--out", str(tmp_path), "--stem", "t"])
    written = json.loads((tmp_path / "t.json").read_text())
    assert written["best"]["EKFAC"]["lr"] == 0.003 and written["rows"] == table["rows"]
    other_seed = part(tmp_path / "c.json", 2, {"KFAC T=100": (0.003, 0.01, 0.3, None)})
    with pytest.raises(SystemExit, match="mix"):
        ekfac_fashion_mnist.collect([first, other_seed])


def test_peer_compare_measures():
    rng = np.random.default_rng(0)
    y = rng.standard_normal((3, 40))
    same = peer_kronfluence.compare(2.0 * y, y)
    assert same["scale"] == pytest.approx(2.0)
    assert same["relative_difference"] == pytest.approx(1.0)
    assert same["pearson"] == pytest.approx(1.0)
    assert same["spearman"] == pytest.approx(1.0)
    assert same["top10_overlap_mean"] == 1.0
    flipped = peer_kronfluence.compare(-y, y)
    assert flipped["spearman_per_query_mean"] == pytest.approx(-1.0)
    assert flipped["top10_overlap_mean"] == 0.0


@pytest.mark.skipif(
    importlib.util.find_spec("kronfluence") is not None, reason="kronfluence is installed here"
)
def test_peer_kronfluence_skips_cleanly_without_kronfluence(tmp_path):
    command = [sys.executable, str(BENCH / "peer_kronfluence.py"), "--quick"]
    command += ["--json", str(tmp_path / "out.json")]
    done = subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)
    assert "skipped, kronfluence is not importable" in done.stdout
    assert not (tmp_path / "out.json").exists()
