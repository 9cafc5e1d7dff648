"""The EK-FAC benchmark scripts: bench/ekfac_fashion_mnist.py (--quick end to end, the method
parser) and bench/peer_kronfluence.py (its agreement measures; a clean skip without
kronfluence)."""

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
        ("KFAC T=1", "KFAC", 1),
        ("EKFAC T=100", "EKFAC", 100),
    ]
    for bad in ("EKFAC", "KFAC T=0", "SGD T=1", "EKFAC T=x"):
        with pytest.raises(SystemExit):
            ekfac_fashion_mnist.methods(bad)


def test_both_methods_use_reproduce_benzings_kfac_hyperparameters():
    assert ekfac_fashion_mnist.hyperparameters() == pytest.approx({"lr": 0.003, "damping": 0.01})


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
