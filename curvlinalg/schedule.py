r"""When to refresh curvature: the amortisation schedule shared by every optimizer.

Second-order optimizers amortise their cost by inverting (or eigendecomposing) the curvature
only every ``period`` steps (Benzing's ``T``), and optionally by updating the factor averages
only during the ``window`` steps that end at each refresh (Benzing's ``S``; ICML 2022,
Algorithm 1). Steps are counted from 0 (the number of updates already taken), so the first
step refreshes.

Both functions are pure and work on Python integers and on integer arrays (``jax.jit`` with a
traced step counter), returning a bool or a boolean array.
"""

from __future__ import annotations

from typing import Any

__all__ = ["refresh_due", "accumulate_due"]


_NO_WINDOW: Any = object()


def _check(period: int, window: int | None = _NO_WINDOW) -> None:
    if isinstance(period, bool) or not isinstance(period, int) or period < 1:
        raise ValueError(f"period must be a positive integer; got {period!r}")
    if window is not _NO_WINDOW:  # accumulate_due's window=None is invalid, not absent
        if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= period:
            raise ValueError(f"window must be an integer in [1, period={period}]; got {window!r}")


def refresh_due(step: Any, period: int) -> Any:
    """True at the steps where the inverse/eigenbasis is recomputed: ``step % period == 0``.

    Between refreshes the preconditioner is constant; ``period=1`` refreshes every step.
    """
    _check(period)
    return step % period == 0


def accumulate_due(step: Any, period: int, window: int) -> Any:
    """True at the steps whose batch enters the factor averages.

    These are the ``window`` steps ending at (and including) each refresh step:
    ``step % period ∈ {period − window + 1, …, period − 1, 0}``, i.e.
    ``(step + window − 1) % period < window``. ``window = period`` accumulates every step;
    ``window = 1`` only at refresh steps.
    """
    _check(period, window)
    return (step + window - 1) % period < window
