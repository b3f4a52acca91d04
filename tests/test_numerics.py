"""The numerics contract: fastadam is bitwise equal to fastadam.reference in the same dtype.

These tests run at the instruction-set level chosen at import; test_isa_levels.py
runs this whole file again under every other level the CPU has.  NaN payloads
are not compared (see conftest.assert_bitwise_equal); everything else is.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastadam
from conftest import (DTYPES, OPTIONS, SIZES, Problem, assert_bitwise_equal, assert_problems_equal, fastadam_step,
                      make_problem, option_id, reference_step)

HYPER = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-8)


@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize("options", OPTIONS, ids=option_id)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_one_step_is_bitwise_equal_to_the_reference(dtype, size, options, num_threads, rng):
    expected = make_problem(size, dtype, rng, amsgrad=options["amsgrad"])
    actual = expected.copy()

    fastadam_step(actual, step=7, num_threads=num_threads, **HYPER, **options)
    reference_step(expected, step=7, **HYPER, **options)

    assert_problems_equal(actual, expected)


@pytest.mark.parametrize("options", OPTIONS, ids=option_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_hundred_step_trajectory_over_a_list_stays_bitwise_equal(dtype, options, rng):
    # A list of odd sizes in one call: chunk boundaries fall inside arrays and
    # between them, and the split changes as the thread count does.
    sizes = [1, 17, 1000, 40_000, 3, 70_001]
    actual = [make_problem(n, dtype, rng, amsgrad=options["amsgrad"]) for n in sizes]
    expected = [pr.copy() for pr in actual]

    for step in range(1, 101):
        for a, e in zip(actual, expected):
            a.grad[...] = e.grad[...] = rng.standard_normal(a.grad.shape).astype(dtype)
        fastadam.adam_step([a.param for a in actual], [a.grad for a in actual], [a.exp_avg for a in actual],
                           [a.exp_avg_sq for a in actual],
                           max_exp_avg_sqs=[a.max_exp_avg_sq for a in actual] if options["amsgrad"] else None,
                           step=step, num_threads=1 + step % 2, **HYPER, **options)
        for e in expected:
            reference_step(e, step=step, **HYPER, **options)

    for a, e in zip(actual, expected):
        assert_problems_equal(a, e)


@pytest.mark.parametrize("num_threads", [1, 2, 3, 5, 8])
def test_thread_count_and_list_split_do_not_change_the_bits(num_threads, rng):
    sizes = [33_333, 1, 0, 65_536, 100_003, 5]
    base = [make_problem(n, np.float32, rng) for n in sizes]

    one_call = [pr.copy() for pr in base]
    fastadam.adam_step(*[[getattr(pr, f) for pr in one_call] for f in ("param", "grad", "exp_avg", "exp_avg_sq")],
                       step=3, num_threads=num_threads, **HYPER)
    one_at_a_time = [pr.copy() for pr in base]
    for pr in one_at_a_time:
        fastadam_step(pr, step=3, num_threads=1, **HYPER)

    for a, e in zip(one_call, one_at_a_time):
        assert_problems_equal(a, e)


def test_a_list_may_mix_float32_and_float64_parameters(rng):
    actual = [make_problem(n, dt, rng) for n, dt in [(100, np.float32), (50_001, np.float64), (7, np.float32)]]
    expected = [pr.copy() for pr in actual]

    fastadam.adam_step(*[[getattr(pr, f) for pr in actual] for f in ("param", "grad", "exp_avg", "exp_avg_sq")],
                       step=1, **HYPER)
    for e in expected:
        reference_step(e, step=1, **HYPER)

    for a, e in zip(actual, expected):
        assert_problems_equal(a, e)


@pytest.mark.parametrize("shape", [(), (3, 5, 7), (2, 1, 0), (64, 65)])
def test_any_shape_is_updated_elementwise(shape, rng):
    expected = make_problem(shape, np.float32, rng)
    actual = expected.copy()
    fastadam_step(actual, step=2, **HYPER)
    reference_step(expected, step=2, **HYPER)
    assert_problems_equal(actual, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_unaligned_views_are_updated_in_place(dtype, rng):
    # a[1:] starts 4 or 8 bytes past an allocation: never 64-byte aligned.
    n = 1000
    buffers = make_problem(n + 1, dtype, rng)
    expected = Problem(*[a[1:].copy() for a in buffers.arrays()])
    views = Problem(*[a[1:] for a in buffers.arrays()])
    assert not any(v.ctypes.data % 64 == 0 for v in views.arrays())

    fastadam_step(views, step=4, **HYPER)
    reference_step(expected, step=4, **HYPER)

    assert_problems_equal(views, expected)


def test_arrays_not_aligned_to_their_element_size_work(rng):
    # A float32 array starting at an odd byte address (NumPy's ALIGNED flag off).
    n = 257
    expected = make_problem(n, np.float32, rng)
    raw = [np.zeros(4 * n + 1, np.uint8) for _ in range(4)]
    actual = Problem(*[np.frombuffer(r.data, np.float32, n, offset=1) for r in raw])
    for dst, src in zip(actual.arrays(), expected.arrays()):
        assert not dst.flags.aligned
        dst[...] = src

    fastadam_step(actual, step=1, **HYPER)
    reference_step(expected, step=1, **HYPER)

    assert_problems_equal(actual, expected)


@pytest.mark.parametrize("options", OPTIONS, ids=option_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_nan_and_inf_gradients_propagate_like_the_reference(dtype, options, rng):
    n = 100
    expected = make_problem(n, dtype, rng, amsgrad=options["amsgrad"])
    expected.grad[[3, 50, 99]] = [np.nan, np.inf, -np.inf]
    if options["amsgrad"]:
        expected.max_exp_avg_sq[10] = np.nan  # a NaN already in the running max stays
    actual = expected.copy()

    fastadam_step(actual, step=5, **HYPER, **options)
    reference_step(expected, step=5, **HYPER, **options)

    assert_problems_equal(actual, expected)
    assert np.isnan(actual.param[[3, 50, 99]]).all()  # as in PyTorch: inf/inf and inf-inf are NaN
    if options["amsgrad"]:
        assert np.isnan(actual.max_exp_avg_sq[10]) and np.isnan(actual.param[10])


def test_subnormal_numbers_are_not_flushed_to_zero(rng):
    # Subnormal gradients whose moments (0.1 * g, 0.01 * g * g) stay non-zero
    # only if nothing flushes subnormals to zero (as -ffast-math would).
    tiny = np.finfo(np.float32).smallest_subnormal
    expected = make_problem(64, np.float32, rng)
    expected.grad[:] = tiny * np.float32(1 << 16) * np.arange(64, dtype=np.float32)
    expected.exp_avg[:] = 0
    actual = expected.copy()

    fastadam_step(actual, step=1, **HYPER)
    reference_step(expected, step=1, **HYPER)

    assert_problems_equal(actual, expected)
    assert (actual.exp_avg[1:] != 0).all()


@pytest.mark.parametrize("hyper", [
    dict(lr=0.0), dict(eps=0.0), dict(betas=(0.0, 0.0)), dict(betas=(0.0, 0.999999)), dict(lr=10.0, eps=1.0),
], ids=["lr=0", "eps=0", "betas=0", "beta1=0", "large-lr-eps"])
@pytest.mark.parametrize("step", [1, 2, 1_000_000])
def test_edge_hyperparameters_match_the_reference(hyper, step, rng):
    expected = make_problem(1000, np.float32, rng)
    actual = expected.copy()
    fastadam_step(actual, step=step, **{**HYPER, **hyper})
    reference_step(expected, step=step, **{**HYPER, **hyper})
    assert_problems_equal(actual, expected)


def test_lr_zero_leaves_parameters_unchanged(rng):
    pr = make_problem(1000, np.float64, rng)
    before = pr.param.copy()
    fastadam_step(pr, step=1, lr=0.0)
    assert_bitwise_equal(pr.param, before)


def test_zero_size_arrays_are_a_no_op():
    empty = [np.zeros(0, np.float32) for _ in range(4)]
    fastadam.adam_step(*empty, step=1)
    fastadam.adam_step([], [], [], [], step=1)


def test_first_step_moves_each_parameter_by_about_lr_against_the_gradient_sign(rng):
    # The defining property of Adam's first step: m_hat / sqrt(v_hat) = sign(g).
    pr = make_problem(10_000, np.float64, rng)
    pr.exp_avg[:] = 0
    pr.exp_avg_sq[:] = 0
    before = pr.param.copy()
    fastadam_step(pr, step=1, lr=1e-3, eps=0.0)
    np.testing.assert_allclose(before - pr.param, 1e-3 * np.sign(pr.grad), rtol=1e-12)


def nan_patterns(dtype) -> np.ndarray:
    """Quiet and signalling NaNs of both signs, with payloads, as `dtype` values."""
    if np.dtype(dtype) == np.float32:
        bits = np.array([0x7FC00000, 0xFFC00000, 0x7FC12345, 0xFFC54321, 0x7F812345, 0xFF854321], np.uint32)
    else:
        bits = np.array([0x7FF8000000000000, 0xFFF8000000000000, 0x7FF8000123456789, 0xFFF8000987654321,
                         0x7FF0000123456789, 0xFFF0000987654321], np.uint64)
    return bits.view(dtype)


@pytest.mark.parametrize("options", OPTIONS, ids=option_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_nan_gradients_give_the_references_nan_bits_sign_included(dtype, options, rng):
    # assert_bitwise_equal ignores NaN payloads.  Here each NaN of the result
    # comes from one gradient NaN and no other NaN meets it, so its bits are
    # defined: quieted, with the sign `-g` gives under maximize (a
    # multiplication by -1 would keep the sign) and the payload kept.  The
    # NaNs sit in the body, the head and the tail of the register loop.
    n = 1000
    expected = make_problem(n + 1, dtype, rng, amsgrad=options["amsgrad"])
    expected = Problem(*[None if a is None else a[1:] for a in
                         (expected.param, expected.grad, expected.exp_avg, expected.exp_avg_sq,
                          expected.max_exp_avg_sq)])
    nans = nan_patterns(dtype)
    for at in (0, 1, 2, 500, n - 1, n - 2):
        expected.grad[at:at + len(nans)][:n - at] = nans[:n - at]
    actual = expected.copy()

    fastadam_step(actual, step=5, **HYPER, **options)
    reference_step(expected, step=5, **HYPER, **options)

    uint = np.dtype(f"u{np.dtype(dtype).itemsize}")
    assert np.isnan(actual.param).sum() >= len(nans)
    for name in ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        a, e = getattr(actual, name), getattr(expected, name)
        if a is not None:
            np.testing.assert_array_equal(a.view(uint), e.view(uint), err_msg=name)


#: Offsets and sizes that give every head and tail length on every level: the
#: elements before the first register-aligned address (0..15 of them for a
#: 64-byte register of float32) and after the last whole register are
#: handled apart (a masked register, half a register or single elements,
#: whichever the level uses), and ranges under a few hundred elements are not
#: aligned at all.  Sizes 0..35 and 500..531 cover every remainder modulo 16
#: on both sides of that limit.
EDGE_OFFSETS = range(16)
EDGE_SIZES = [*range(36), *range(500, 532)]


@pytest.mark.parametrize("options", OPTIONS, ids=option_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_every_head_and_tail_length_is_bitwise_equal(dtype, options, rng):
    base = make_problem(EDGE_OFFSETS[-1] + EDGE_SIZES[-1], dtype, rng, amsgrad=options["amsgrad"])
    for offset in EDGE_OFFSETS:
        for n in EDGE_SIZES:
            expected = Problem(*[None if a is None else a[offset:offset + n].copy() for a in
                                 (base.param, base.grad, base.exp_avg, base.exp_avg_sq, base.max_exp_avg_sq)])
            buffers = Problem(*[None if a is None else a.copy() for a in
                                (base.param, base.grad, base.exp_avg, base.exp_avg_sq, base.max_exp_avg_sq)])
            views = Problem(*[None if a is None else a[offset:offset + n] for a in
                              (buffers.param, buffers.grad, buffers.exp_avg, buffers.exp_avg_sq,
                               buffers.max_exp_avg_sq)])
            fastadam_step(views, step=3, num_threads=1, **HYPER, **options)
            reference_step(expected, step=3, **HYPER, **options)
            assert_problems_equal(views, expected)
            # Nothing around the view was written.
            for whole, original in zip(buffers.arrays(), base.arrays()):
                assert_bitwise_equal(whole[:offset], original[:offset])
                assert_bitwise_equal(whole[offset + n:], original[offset + n:])
