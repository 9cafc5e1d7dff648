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
    results = json.loads(out.read_text())["results"]
    assert any(r["case"].startswith("eigen_correction") for r in results)
    assert any(r["case"].startswith("ekfac_scores") for r in results)
    for result in results:
        assert "materialised" in result["entries"] and "auto" in result["entries"]
        for entry in result["entries"].values():
            assert entry["median_ms"] > 0 and entry["peak_mib"] >= 0


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
