"""bench/bench_ekfac.py: the --quick mode end to end (seconds), and its references."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from .conftest import BENCH


@pytest.mark.smoke
def test_bench_ekfac_quick(tmp_path):
    out = tmp_path / "ekfac.json"
    command = [sys.executable, str(BENCH / "bench_ekfac.py"), "--quick", "--threads", "1"]
    subprocess.run([*command, "--json", str(out)], check=True, capture_output=True, timeout=240)
    payload = json.loads(out.read_text())
    assert len(payload["environment"]["load_average_start"]) == 3
    results = payload["results"]
    assert any(r["case"].startswith("eigen_correction") for r in results)
    assert any(r["case"].startswith("ekfac_scores") for r in results)
    for result in results:
        assert "materialised" in result["entries"] and "auto" in result["entries"]
        assert result["auto_method"] in ("pairs", "explicit")
        for entry in result["entries"].values():
            assert entry["median_ms"] > 0 and entry["peak_mib"] >= 0
            assert 0 <= entry["relative_error_vs_float64"] < 1e-3  # float32 against float64
    # The T sweep times both exact evaluations.
    assert any({"pairs", "explicit"} <= set(r["entries"]) for r in results)


def test_materialised_references_match_the_library():
    import bench_ekfac  # bench/ is on sys.path (tests/bench/conftest.py)

    from curvlinalg import influence, kron

    rng = np.random.default_rng(0)
    a, e = rng.standard_normal((5, 3, 4)), rng.standard_normal((5, 3, 2))
    a_eigh, g_eigh = kron.eigh(kron.input_factor(a)), kron.eigh(kron.factor(e))
    correction = kron.eigen_correction(a, e, a_eigh, g_eigh)
    np.testing.assert_allclose(
        bench_ekfac.correction_materialised(a, e, a_eigh, g_eigh), correction, rtol=1e-10
    )
    query = [(rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3, 2)))]
    eigens = [(a_eigh, g_eigh, correction, 0.1)]
    np.testing.assert_allclose(
        bench_ekfac.scores_materialised(query, [(a, e)], eigens),
        influence.ekfac_scores(query, [(a, e)], eigens),
        rtol=1e-10,
    )


def test_float64_references_match_the_library():
    import bench_ekfac

    from curvlinalg import influence, kron

    rng = np.random.default_rng(1)
    a, e = rng.standard_normal((6, 3, 5)), rng.standard_normal((6, 3, 4))
    a_eigh, g_eigh = kron.eigh(kron.input_factor(a)), kron.eigh(kron.factor(e))
    correction = kron.eigen_correction(a, e, a_eigh, g_eigh)
    # A tiny block size forces the reference through several blocks of examples.
    original = bench_ekfac._REFERENCE_ELEMENTS
    bench_ekfac._REFERENCE_ELEMENTS = 2 * 5 * 4
    try:
        np.testing.assert_allclose(
            bench_ekfac.correction_reference(a, e, a_eigh, g_eigh), correction, rtol=1e-10
        )
        query = [(rng.standard_normal((2, 3, 5)), rng.standard_normal((2, 3, 4)))]
        eigens = [(a_eigh, g_eigh, correction, 0.05)]
        np.testing.assert_allclose(
            bench_ekfac.scores_reference(query, [(a, e)], eigens),
            influence.ekfac_scores(query, [(a, e)], eigens),
            rtol=1e-10,
        )
    finally:
        bench_ekfac._REFERENCE_ELEMENTS = original


def test_accuracy_check_compares_with_the_materialised_error():
    import bench_ekfac

    def result(ours):
        entries = {"materialised": 1e-3, "auto": ours}
        return {
            "case": "c",
            "entries": {k: {"relative_error_vs_float64": v} for k, v in entries.items()},
        }

    bench_ekfac.check_accuracy(result(2.9e-3))
    with pytest.raises(AssertionError, match="auto"):
        bench_ekfac.check_accuracy(result(3.1e-3))
