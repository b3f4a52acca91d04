"""Shared helpers: building Adam problems and comparing results bit for bit."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pytest

import fastadam

#: Sizes that cover an empty array, sub-register tails, exact registers (16
#: float32 = one AVX-512 register), one-past, odd in-cache sizes and a
#: multi-threaded size whose tail is not a multiple of any register width.
SIZES = [0, 1, 7, 15, 16, 17, 1023, (1 << 20) + 3]
DTYPES = [np.float32, np.float64]

#: Every combination of the kernel's compile-time options.
OPTIONS = [
    dict(maximize=maximize, weight_decay=wd, decoupled_weight_decay=decoupled, amsgrad=amsgrad)
    for maximize, (wd, decoupled), amsgrad in itertools.product(
        [False, True], [(0.0, False), (0.05, False), (0.05, True)], [False, True])
]


def option_id(opts: dict) -> str:
    parts = []
    if opts["weight_decay"]:
        parts.append("adamw" if opts["decoupled_weight_decay"] else "l2")
    if opts["amsgrad"]:
        parts.append("amsgrad")
    if opts["maximize"]:
        parts.append("maximize")
    return "-".join(parts) or "plain"


@dataclass
class Problem:
    """One parameter array with its gradient and optimizer state."""

    param: np.ndarray
    grad: np.ndarray
    exp_avg: np.ndarray
    exp_avg_sq: np.ndarray
    max_exp_avg_sq: Optional[np.ndarray] = field(default=None)

    def arrays(self) -> list[np.ndarray]:
        return [a for a in (self.param, self.grad, self.exp_avg, self.exp_avg_sq, self.max_exp_avg_sq)
                if a is not None]

    def copy(self) -> "Problem":
        return Problem(*[None if a is None else a.copy() for a in
                         (self.param, self.grad, self.exp_avg, self.exp_avg_sq, self.max_exp_avg_sq)])


def make_problem(shape, dtype, rng: np.random.Generator, amsgrad: bool = False) -> Problem:
    """Random parameters and a mid-training state (non-zero moments) of ``shape``."""
    dtype = np.dtype(dtype)

    def draw(scale: float = 1.0) -> np.ndarray:
        return np.asarray(scale * rng.standard_normal(shape), dtype=dtype)  # an array even for shape ()

    exp_avg_sq = np.asarray(np.abs(draw(0.01)))
    return Problem(param=draw(), grad=np.asarray(draw() * np.exp(draw()), dtype), exp_avg=draw(0.1),
                   exp_avg_sq=exp_avg_sq,
                   max_exp_avg_sq=np.asarray(exp_avg_sq * dtype.type(1.5)) if amsgrad else None)


def fastadam_step(pr: Problem, **kwargs) -> None:
    fastadam.adam_step(pr.param, pr.grad, pr.exp_avg, pr.exp_avg_sq, max_exp_avg_sqs=pr.max_exp_avg_sq, **kwargs)


def reference_step(pr: Problem, **kwargs) -> None:
    kwargs.pop("num_threads", None)
    fastadam.reference.adam_step(pr.param, pr.grad, pr.exp_avg, pr.exp_avg_sq,
                                 max_exp_avg_sqs=pr.max_exp_avg_sq, **kwargs)


def assert_bitwise_equal(actual: np.ndarray, expected: np.ndarray, what: str = "") -> None:
    """Equal bit for bit, with NaN payloads (not part of the contract) ignored."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    uint = np.dtype(f"u{actual.dtype.itemsize}")
    nan_a, nan_e = np.isnan(actual), np.isnan(expected)
    np.testing.assert_array_equal(nan_a, nan_e, err_msg=f"{what}: NaNs differ")
    a_bits = np.where(nan_a, 0, actual.view(uint))
    e_bits = np.where(nan_e, 0, expected.view(uint))
    mismatch = np.flatnonzero(a_bits != e_bits)
    assert mismatch.size == 0, (f"{what}: {mismatch.size} elements differ, first at {mismatch[0]}: "
                                f"{actual.flat[mismatch[0]]!r} != {expected.flat[mismatch[0]]!r}")


def copy_state(state: Optional[fastadam.QuantizedState]) -> Optional[fastadam.QuantizedState]:
    """A quantized moment with its own codes and absmax (the map, never written, shared); None stays None."""
    return None if state is None else fastadam.QuantizedState(state.codes.copy(), state.absmax.copy(), state.map)


def assert_states_equal(a: fastadam.QuantizedState, b: fastadam.QuantizedState, what: str) -> None:
    """Two quantized moments hold the same codes and, bit for bit, the same absmax."""
    np.testing.assert_array_equal(a.codes, b.codes, err_msg=f"{what}.codes")
    assert_bitwise_equal(a.absmax, b.absmax, f"{what}.absmax")


def assert_problems_equal(actual: Problem, expected: Problem) -> None:
    for name in ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        a, e = getattr(actual, name), getattr(expected, name)
        if a is not None:
            assert_bitwise_equal(a, e, name)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261125)


@pytest.fixture
def gloo_group(tmp_path):
    """A one-rank torch.distributed gloo group for the test (ZeroRedundancyOptimizer), skipped without gloo."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
