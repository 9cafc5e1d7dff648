"""A tour of curvlinalg's primitives on NumPy arrays (the README's first Quick start command).

1. The exactly damped K-FAC solve through the Kronecker eigenbases, checked against the dense
   ``(A⊗G + λI)⁻¹``, and the cost saved by preconditioning a gradient in factored form.
2. The exact solve with a *sum* of Kronecker products (Q-KLD-WRM) against the dense matrix,
   next to the single-product approximation used by the paper's public code.
3. FOOF ("gradient descent on neurons") against gradient descent on an ill-conditioned
   least-squares problem: the FOOF preconditioner makes the layer's inputs isotropic.
4. The Q-KLD-WRM recursion for a few steps on a Kronecker-factored quadratic.

Runs in a few seconds with NumPy only: ``python bench/demo.py``.
"""

from __future__ import annotations

import time

import numpy as np

from curvlinalg import kron, wake


def vec(matrix: np.ndarray) -> np.ndarray:
    """Column-major vectorisation: (A⊗G) vec(V) = vec(G V A)."""
    return matrix.reshape(-1, order="F")


def spd(rng: np.random.Generator, size: int, condition: float) -> np.ndarray:
    basis, _ = np.linalg.qr(rng.standard_normal((size, size)))
    return (basis * np.geomspace(1.0, condition, size)) @ basis.T


def kfac_solve(rng: np.random.Generator) -> None:
    print("1. Exactly damped K-FAC solve   (A⊗G + λI)⁻¹ vec(grad)")
    d_in, d_out, damping = 30, 20, 1e-2
    a, g = spd(rng, d_in, 1e3), spd(rng, d_out, 1e3)
    grad = rng.standard_normal((d_out, d_in))
    step = kron.eigen_solve(grad, kron.eigh(a), kron.eigh(g), damping)
    dense = np.linalg.solve(np.kron(a, g) + damping * np.eye(d_in * d_out), vec(grad))
    print(
        f"   eigenbasis vs dense {d_in * d_out}×{d_in * d_out} solve: "
        f"max |difference| = {np.abs(vec(step) - dense).max():.1e}"
    )

    width, batch = 1000, 100
    inputs = rng.standard_normal((batch, width)).astype(np.float32)
    errors = rng.standard_normal((batch, width)).astype(np.float32)
    a_inv = kron.inverse(kron.factor(inputs), 1.0)
    g_inv = kron.inverse(kron.factor(errors), 1.0)
    timings = {}
    for name, run in {
        "dense (form eᵀa/B, then G⁻¹·∇W·A⁻¹)": lambda: kron.precondition(
            errors.T @ inputs / batch, a_inv, g_inv
        ),
        "factored (precondition a and e first)": lambda: kron.precondition_factored(
            inputs, errors, a_inv, g_inv
        ),
    }.items():
        run()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            result = run()
            times.append(time.perf_counter() - start)
        timings[name] = (float(np.median(times)), result)
    (dense_time, dense_result), (factored_time, factored_result) = timings.values()
    for name, (seconds, _) in timings.items():
        print(f"   {name:<40} {seconds * 1e3:7.1f} ms")
    relative = np.linalg.norm(dense_result - factored_result) / np.linalg.norm(dense_result)
    print(
        f"   same step (relative difference {relative:.1e}), "
        f"{dense_time / factored_time:.1f}× faster at width {width}, batch {batch}\n"
    )


def sum_solve(rng: np.random.Generator) -> None:
    print("2. Sum of Kronecker products   (A1⊗G1 + A2⊗G2)⁻¹ vec(grad)")
    d_in, d_out = 12, 8
    a1, g1 = spd(rng, d_in, 10.0), spd(rng, d_out, 10.0)
    a2, g2 = spd(rng, d_in, 100.0), spd(rng, d_out, 100.0)
    grad = rng.standard_normal((d_out, d_in))
    dense = np.linalg.solve(np.kron(a1, g1) + np.kron(a2, g2), vec(grad))
    exact = vec(kron.sum_solve(grad, a1, g1, a2, g2))
    approximate = vec(kron.precondition(grad, np.linalg.inv(a1 + a2), np.linalg.inv(g1 + g2)))
    scale = np.linalg.norm(dense)
    print(
        f"   exact generalised-eigenbasis solve: relative error "
        f"{np.linalg.norm(exact - dense) / scale:.1e}"
    )
    print(
        f"   single product (A1+A2)⊗(G1+G2):     relative error "
        f"{np.linalg.norm(approximate - dense) / scale:.1e}\n"
    )


def foof_regression(rng: np.random.Generator) -> None:
    print("3. FOOF vs gradient descent, linear layer, correlated inputs (κ(A) = 1e4)")
    batch, d_in, d_out, damping = 512, 20, 5, 1e-6
    inputs = rng.standard_normal((batch, d_in)) @ np.linalg.cholesky(spd(rng, d_in, 1e4)).T
    targets = inputs @ rng.standard_normal((d_in, d_out)) + 0.01 * rng.standard_normal(
        (batch, d_out)
    )
    input_factor = kron.factor(inputs)
    a_inv = kron.inverse(input_factor, damping)
    # The largest stable gradient-descent rate is 2/λ_max(A); take 1/λ_max.
    lr_sgd = 1.0 / np.linalg.eigvalsh(input_factor)[-1]
    weights = {"gradient descent": np.zeros((d_out, d_in)), "FOOF": np.zeros((d_out, d_in))}
    print(f"   {'step':>4}  {'gradient descent':>17}  {'FOOF':>10}")
    for step in range(6):
        losses = []
        for name, w in weights.items():
            residual = inputs @ w.T - targets  # e = ∂ℓ_i/∂(W a_i) for ℓ = ½‖Wa − y‖²
            losses.append(0.5 * np.mean(np.sum(residual**2, axis=1)))
            gradient = residual.T @ inputs / batch
            if name == "FOOF":
                weights[name] = w - 0.9 * kron.precondition(gradient, a_inv)
            else:
                weights[name] = w - lr_sgd * gradient
        print(f"   {step:>4}  {losses[0]:>17.3e}  {losses[1]:>10.3e}")
    print()


def q_kldwrm(rng: np.random.Generator) -> None:
    print("4. Q-KLD-WRM on a Kronecker-factored quadratic ½θᵀ(A⊗G)θ, noisy gradients")
    d_in, d_out, rho, lam = 6, 4, 0.5, 2.0
    a, g = spd(rng, d_in, 50.0), spd(rng, d_out, 50.0)
    theta = rng.standard_normal((d_out, d_in))
    fbar_a = fbar_g = ghat = g_prev = m_ghat = None
    for step in range(8):
        gradient = g @ theta @ a + 0.05 * rng.standard_normal(theta.shape)
        noise = 0.05 * np.eye(d_in)
        fbar_a = wake.average(fbar_a, a + noise, rho)
        fbar_g = wake.average(fbar_g, g, rho)
        ghat = wake.q_gradient(gradient, ghat, g_prev, m_ghat, rho, lam, lam)
        result = wake.kron_q_step(ghat, fbar_a, fbar_g, a, g, lam)
        theta, g_prev, m_ghat = theta + result.step, gradient, result.m_ghat
        loss = 0.5 * np.sum(theta * (g @ theta @ a))
        print(f"   step {step}: loss {loss:.3e}")


def main() -> None:
    rng = np.random.default_rng(0)
    kfac_solve(rng)
    sum_solve(rng)
    foof_regression(rng)
    q_kldwrm(rng)


if __name__ == "__main__":
    main()
