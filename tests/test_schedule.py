r"""Property tests of :mod:`curvlinalg.schedule` — NOTES.md §6, identity 10 (amortisation).

Benzing's Algorithm 1 (ICML 2022): invert every T = ``period`` steps, and update the factor
average only during the S = ``window`` steps ending at each inversion. Steps count from 0; within
a step the batch is accumulated first, then the inverse refreshed, then the step taken, so step 0
always accumulates and refreshes and each inversion sees the S batches ending with its own.
(Algorithm 1's pseudocode inverts before accumulating and writes the predicate as
``(t + S) mod T < S``; that is the same schedule one step earlier. Benzing's public code, which
inverts after the step at ``c % T == 0`` with the factors of that step included, matches ours.)

The references do not call the schedule: the refresh steps are ``range(0, n, T)`` and the
accumulation steps are the union of ``range(r − S + 1, r + 1)`` over the refresh steps r. A small
FOOF optimizer on a least-squares problem (curvlinalg.kron for factor, average, inverse and
precondition, driven by the schedule) is compared with a dense NumPy loop driven by those sets.
Least squares keeps the FOOF factor ``A = xᵀx/B`` independent of the weights, so runs with
different preconditioners still see the same factors and their averages can be compared exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from curvlinalg import kron, schedule, testing
from tests.conftest import assert_backend_array, assert_close

F64 = np.dtype(np.float64)


def refresh_steps(count: int, period: int) -> set[int]:
    return set(range(0, count, period))


def accumulate_steps(count: int, period: int, window: int) -> set[int]:
    """The ``window`` steps ending at (and including) every refresh step."""
    steps: set[int] = set()
    for refresh in range(0, count + period, period):
        steps.update(range(max(refresh - window + 1, 0), refresh + 1))
    return {step for step in steps if step < count}


# ----------------------------------------------------------------------------------------
# The predicates themselves
# ----------------------------------------------------------------------------------------


@given(period=st.integers(1, 9), count=st.integers(1, 60))
def test_refresh_due_is_every_period_th_step(period: int, count: int) -> None:
    due = [schedule.refresh_due(step, period) for step in range(count)]
    assert all(isinstance(flag, bool) for flag in due)
    assert {step for step, flag in enumerate(due) if flag} == refresh_steps(count, period)
    assert due[0] is True  # the first step refreshes


@given(data=st.data(), count=st.integers(1, 60))
def test_accumulate_due_is_the_window_ending_at_each_refresh(
    data: st.DataObject, count: int
) -> None:
    period = data.draw(st.integers(1, 9))
    window = data.draw(st.integers(1, period))
    due = [schedule.accumulate_due(step, period, window) for step in range(count)]
    assert all(isinstance(flag, bool) for flag in due)
    accumulated = {step for step, flag in enumerate(due) if flag}
    assert accumulated == accumulate_steps(count, period, window)
    # Exactly `window` consecutive steps end at every refresh step r ≥ window − 1.
    for refresh in refresh_steps(count, period):
        if refresh >= window - 1:
            assert set(range(refresh - window + 1, refresh + 1)) <= accumulated
            assert refresh - window not in accumulated or period == window
    if window == period:
        assert accumulated == set(range(count))
    if window == 1:
        assert accumulated == refresh_steps(count, period)


def test_predicates_on_integer_arrays(backend: testing.Backend) -> None:
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        period = data.draw(st.integers(1, 7))
        window = data.draw(st.integers(1, period))
        steps = backend.asarray(np.arange(30, dtype=np.int32))
        refresh = schedule.refresh_due(steps, period)
        accumulate = schedule.accumulate_due(steps, period, window)
        for result, expected in (
            (refresh, refresh_steps(30, period)),
            (accumulate, accumulate_steps(30, period, window)),
        ):
            assert_backend_array(result, backend, np.dtype(bool))
            assert set(np.flatnonzero(backend.to_numpy(result)).tolist()) == expected

    check()


def test_predicates_under_jit() -> None:
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    period, window, count = 5, 2, 23
    refresh = jax.jit(lambda step: schedule.refresh_due(step, period))
    accumulate = jax.jit(lambda step: schedule.accumulate_due(step, period, window))
    for step in range(count):
        traced = jnp.asarray(step, dtype=jnp.int32)
        flag = refresh(traced)
        assert flag.dtype == jnp.bool_ and flag.shape == ()
        assert bool(flag) == (step in refresh_steps(count, period))
        assert bool(accumulate(traced)) == (step in accumulate_steps(count, period, window))
    steps = jnp.arange(count, dtype=jnp.int32)
    assert refresh(steps).dtype == jnp.bool_
    assert set(np.flatnonzero(np.asarray(accumulate(steps))).tolist()) == accumulate_steps(
        count, period, window
    )

    # A traced step counter inside a compiled loop, as an optax-style transformation has it.
    def body(step: Any, counts: Any) -> Any:
        return counts + jnp.stack(
            [schedule.refresh_due(step, period), schedule.accumulate_due(step, period, window)]
        ).astype(jnp.int32)

    counts = jax.jit(lambda: jax.lax.fori_loop(0, count, body, jnp.zeros(2, jnp.int32)))()
    assert np.asarray(counts).tolist() == [
        len(refresh_steps(count, period)),
        len(accumulate_steps(count, period, window)),
    ]


@pytest.mark.parametrize("period", [0, -1, 2.0, True, "3", None, np.float64(2.0)])
def test_bad_period_is_a_value_error(period: Any) -> None:
    with pytest.raises(ValueError, match="period"):
        schedule.refresh_due(0, period)
    with pytest.raises(ValueError, match="period"):
        schedule.accumulate_due(0, period, 1)


@pytest.mark.parametrize("window", [0, -1, 5, 1.0, True, None])
def test_bad_window_is_a_value_error(window: Any) -> None:
    with pytest.raises(ValueError, match="window"):
        schedule.accumulate_due(0, 4, window)


# ----------------------------------------------------------------------------------------
# A FOOF optimizer driven by the schedule (identity 10)
# ----------------------------------------------------------------------------------------


class Problem(NamedTuple):
    inputs: np.ndarray  # (steps, B, d_in): one batch per step
    targets: np.ndarray  # (steps, B, d_out)
    w0: np.ndarray  # (d_out, d_in)
    lr: float
    damping: float
    decay: float


@st.composite
def problems(draw: Any, *, steps: int = 12) -> Problem:
    d_in, d_out, batch = draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 5))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    # Inputs with a different scale per batch, so that every factor average is distinct.
    inputs = rng.standard_normal((steps, batch, d_in)) * rng.uniform(0.5, 2.0, (steps, 1, 1))
    truth = rng.standard_normal((d_out, d_in))
    targets = inputs @ truth.T + 0.1 * rng.standard_normal((steps, batch, d_out))
    return Problem(
        inputs,
        targets,
        rng.standard_normal((d_out, d_in)),
        lr=draw(st.floats(0.1, 0.9)),
        damping=draw(st.floats(0.1, 2.0)),
        decay=draw(st.floats(0.0, 0.95)),
    )


class Run(NamedTuple):
    weights: list[np.ndarray]  # W after each step
    factors: list[np.ndarray]  # the averaged factor in use at each step
    preconditioners: list[np.ndarray]  # (A + λI)⁻¹ in use at each step


def foof(
    problem: Problem,
    averaging: str,
    accumulate: Callable[[int], bool],
    refresh: Callable[[int], bool],
) -> Run:
    """FOOF (Benzing eq. 6) with curvlinalg.kron: W ← W − lr·∇W·(Ā + λI)⁻¹."""
    state: Any = None
    preconditioner = None
    weights = problem.w0
    run = Run([], [], [])
    for step, (x, y) in enumerate(zip(problem.inputs, problem.targets)):
        if accumulate(step):
            if averaging == "ema":  # Puiu's: the first estimate taken as is
                state = kron.ema(state, kron.factor(x), problem.decay)
            else:  # Benzing's: zero-initialised with bias correction
                state = kron.debiased_ema(state, kron.factor(x), problem.decay)
        average = state if averaging == "ema" else state.value
        if refresh(step):
            preconditioner = kron.inverse(average, problem.damping)
        errors = x @ weights.T - y  # ∂ℓ_b/∂(W x_b) for ℓ_b = ½‖W x_b − y_b‖²
        gradient = errors.T @ x / x.shape[0]
        weights = weights - problem.lr * kron.precondition(gradient, preconditioner)
        run.weights.append(weights)
        run.factors.append(average)
        run.preconditioners.append(preconditioner)
    return run


def scheduled(problem: Problem, averaging: str, period: int, window: int) -> Run:
    return foof(
        problem,
        averaging,
        accumulate=lambda step: schedule.accumulate_due(step, period, window),
        refresh=lambda step: schedule.refresh_due(step, period),
    )


def unamortised(problem: Problem, averaging: str) -> Run:
    return foof(problem, averaging, accumulate=lambda step: True, refresh=lambda step: True)


def dense_reference(
    problem: Problem, averaging: str, period: int, window: int
) -> tuple[Run, float, list[float]]:
    """The same algorithm in plain NumPy, driven by the explicit step sets. Also returns the
    largest condition number of the damped factors it inverted and, per step, the largest
    ‖W‖ + ‖lr·ΔW‖ so far (the size of what the weight updates added up)."""
    count = problem.inputs.shape[0]
    accumulate, refresh = accumulate_steps(count, period, window), refresh_steps(count, period)
    total, weight = None, 0.0
    inverse = None
    weights = problem.w0
    worst, magnitude, magnitudes = 1.0, 0.0, []
    run = Run([], [], [])
    for step, (x, y) in enumerate(zip(problem.inputs, problem.targets)):
        if step in accumulate:
            new = x.T @ x / x.shape[0]
            if averaging == "ema":
                total = new if total is None else problem.decay * total + (1 - problem.decay) * new
                weight = 1.0
            else:
                total = (1 - problem.decay) * new + (0 if total is None else problem.decay * total)
                weight = problem.decay * weight + (1 - problem.decay)
        average = total / weight
        if step in refresh:
            damped = average + problem.damping * np.eye(average.shape[0])
            worst = max(worst, float(np.linalg.cond(damped)))
            inverse = np.linalg.inv(damped)
        errors = x @ weights.T - y
        update = problem.lr * (errors.T @ x / x.shape[0]) @ inverse
        magnitude = max(magnitude, float(np.linalg.norm(weights) + np.linalg.norm(update)))
        weights = weights - update
        magnitudes.append(magnitude)
        run.weights.append(weights)
        run.factors.append(average)
        run.preconditioners.append(inverse)
    return run, worst, magnitudes


AVERAGING = pytest.mark.parametrize("averaging", ["ema", "debiased_ema"])


@AVERAGING
@given(problem=problems(), data=st.data())
def test_scheduled_foof_matches_the_dense_algorithm(
    problem: Problem, data: st.DataObject, averaging: str
) -> None:
    period = data.draw(st.integers(1, 5))
    window = data.draw(st.integers(1, period))
    run = scheduled(problem, averaging, period, window)
    reference, worst, magnitudes = dense_reference(problem, averaging, period, window)
    count = len(run.weights)
    for step in range(count):
        # Averages: step + 1 rounded updates. Inverses: κ(A + λI) (Cholesky vs LU). Weights:
        # every earlier step adds an error of κ·eps relative to the sizes of W and lr·ΔW,
        # which can exceed the final ‖W‖ (cancellation), hence magnitude / ‖W‖.
        condition = (step + 1) * worst
        assert_close(run.factors[step], reference.factors[step], F64, step + 1)
        assert_close(run.preconditioners[step], reference.preconditioners[step], F64, condition)
        cancellation = magnitudes[step] / max(
            float(np.linalg.norm(reference.weights[step])), 1e-300
        )
        assert_close(
            run.weights[step], reference.weights[step], F64, condition * (step + 1) * cancellation
        )
    # Between refreshes the preconditioner is the very same array; at a refresh it is new.
    # The factor average changes exactly on the accumulation steps.
    accumulated = accumulate_steps(count, period, window)
    for step in range(1, count):
        if step % period:
            assert run.preconditioners[step] is run.preconditioners[step - 1]
        else:
            assert not np.array_equal(run.preconditioners[step], run.preconditioners[step - 1])
        unchanged = np.array_equal(run.factors[step], run.factors[step - 1])
        assert unchanged != (step in accumulated)


@AVERAGING
@given(problem=problems())
def test_period_one_reproduces_the_unamortised_run_exactly(
    problem: Problem, averaging: str
) -> None:
    run = scheduled(problem, averaging, period=1, window=1)
    reference = unamortised(problem, averaging)
    for field in Run._fields:
        for ours, theirs in zip(getattr(run, field), getattr(reference, field)):
            np.testing.assert_array_equal(ours, theirs)


@AVERAGING
@given(problem=problems(), period=st.integers(2, 5))
def test_window_equal_to_period_averages_every_step(
    problem: Problem, period: int, averaging: str
) -> None:
    """S = T: the factor averages are the unamortised run's at every step, and so are the
    preconditioners at the refresh steps; in between the amortised run keeps the old one."""
    run = scheduled(problem, averaging, period=period, window=period)
    reference = unamortised(problem, averaging)
    for step, (ours, theirs) in enumerate(zip(run.factors, reference.factors)):
        np.testing.assert_array_equal(ours, theirs)
        last_refresh = step - step % period
        np.testing.assert_array_equal(
            run.preconditioners[step], reference.preconditioners[last_refresh]
        )
        if step % period:
            assert not np.array_equal(run.preconditioners[step], reference.preconditioners[step])
