"""How far AdamW's float32 trajectory drifts from the float64 one: fastadam against torch.optim.AdamW.

PyTorch decays with ``p * (1 - lr * weight_decay)``, the factor rounded to
float32: off by up to 2**-25, the same way every step, so the parameters drift
by ``steps * |fl(1 - c) - (1 - c)|`` relative.  fastadam adds
``(lr * weight_decay) * p`` to the update, which keeps float32's relative
accuracy for any ``c = lr * weight_decay``.  For each ``c`` this runs the same
100 steps (same start, same heavy-tailed gradients) three ways -- fastadam
float32, torch float32, and fastadam.reference in float64 -- and prints the
float32 runs' distance from the float64 one, in float32 ulps of the float64
value (over the elements with |p| >= 0.25): the mean |error| and the mean error towards zero (the bias of a decay
that is too strong; negative when it is too weak).

    python benchmarks/accuracy_adamw_decay.py [--steps 100] [--size 100000]
"""

from __future__ import annotations

import argparse

import numpy as np

import fastadam


def trajectories(c: float, steps: int, size: int, lr: float = 1e-3, seed: int = 0):
    import torch

    rng = np.random.default_rng(seed)
    start = rng.standard_normal(size).astype(np.float32)
    grads = [(rng.standard_normal(size) * np.exp(rng.standard_normal(size))).astype(np.float32)
             for _ in range(steps)]
    wd = c / lr

    ours = start.copy()
    opt = fastadam.AdamW([ours], lr=lr, weight_decay=wd)
    exact, m64, v64 = start.astype(np.float64), np.zeros(size), np.zeros(size)
    theirs = torch.tensor(start.copy(), requires_grad=True)
    torch_opt = torch.optim.AdamW([theirs], lr=lr, weight_decay=wd)
    for t, g in enumerate(grads, start=1):
        opt.step([g])
        fastadam.reference.adam_step(exact, g.astype(np.float64), m64, v64, step=t, lr=lr, weight_decay=wd,
                                     decoupled_weight_decay=True)
        theirs.grad = torch.from_numpy(g.copy())
        torch_opt.step()
    return ours, theirs.detach().numpy(), exact


def drift_in_ulps(p32: np.ndarray, p64: np.ndarray) -> tuple[float, float]:
    """(mean |error|, mean error towards zero) in float32 ulps of the float64 value."""
    away = np.abs(p64) >= 0.25  # near zero, an ulp of the value says nothing about the error's size
    p32, p64 = p32[away], p64[away]
    ulp = np.spacing(np.abs(p64).astype(np.float32)).astype(np.float64)
    err = (p32.astype(np.float64) - p64) / ulp
    return float(np.abs(err).mean()), float(-(err * np.sign(p64)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--size", type=int, default=100_000)
    args = parser.parse_args()
    print(f"AdamW, lr=1e-3, {args.steps} steps, {args.size} float32 params; error against the float64 run,"
          " in float32 ulps (mean |error| / mean error towards zero)")
    print(f"{'lr*weight_decay':>16} | {'fastadam':>17} | {'torch.optim.AdamW':>17} | torch/fastadam")
    for c in [1e-4, 1e-5, 1e-6, 1e-7, 3e-8, 1e-8, 1e-9]:
        ours, theirs, exact = trajectories(c, args.steps, args.size)
        (a, a_bias), (b, b_bias) = drift_in_ulps(ours, exact), drift_in_ulps(theirs, exact)
        print(f"{c:>16.0e} | {a:7.2f} / {a_bias:+6.2f} | {b:7.2f} / {b_bias:+6.2f} | {b / a:6.1f}x")


if __name__ == "__main__":
    main()
