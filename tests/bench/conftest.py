"""The bench scripts live in ``bench/`` (not a package): make them importable."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "smoke: runs a bench script's --quick mode end to end (seconds; subprocess)"
    )
