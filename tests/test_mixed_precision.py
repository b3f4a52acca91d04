"""Low-precision models with float32 master weights, loss scaling and skipped steps.

The master update is the float32 step, bitwise; the model copy is the master
rounded to nearest-even, bit for bit equal to NumPy's float16 ``astype`` and
ml_dtypes' bfloat16 ``astype`` -- on every ISA level (test_isa_levels.py
reruns test_numerics.py; the conversion checks here also run in its
subprocesses through ``FASTADAM_ISA``-independent reference values).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import fastadam
from conftest import assert_bitwise_equal

try:
    import ml_dtypes
    LOW_DTYPES = [np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)]
except ImportError:  # bfloat16 comes from ml_dtypes, an optional dependency
    ml_dtypes = None
    LOW_DTYPES = [np.dtype(np.float16)]

HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8)


def assert_same_16bit(actual: np.ndarray, expected: np.ndarray) -> None:
    a, e = actual.view(np.uint16), expected.view(np.uint16)
    nan_a = np.isnan(actual.astype(np.float32))
    np.testing.assert_array_equal(nan_a, np.isnan(expected.astype(np.float32)))
    mismatch = np.flatnonzero((a != e) & ~nan_a)
    assert mismatch.size == 0, (f"{mismatch.size} differ; first at {mismatch[0]}: {a[mismatch[0]]:#06x} != "
                                f"{e[mismatch[0]]:#06x}")


def interesting_floats(rng) -> np.ndarray:
    """Random bit patterns (every exponent), ties, subnormals, overflow edges, inf and NaN."""
    random_bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    f16 = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
    f16 = f16[np.isfinite(f16)]
    halfway = (f16[:-1] + f16[1:]) / 2  # ties between neighbouring float16 values (exact in float32)
    bf16_ties = (rng.integers(0, 2**16, 10_000, dtype=np.uint32) << 16 | 0x8000).view(np.float32)
    edges = np.array([65504, 65519.996, 65520, 65536, 6e-8, 5.96e-8, 2.98e-8, 1e-45, -0.0, np.inf, -np.inf, np.nan,
                      np.finfo(np.float32).max], np.float32)
    return np.concatenate([random_bits, f16, halfway, -halfway, bf16_ties, edges])


@pytest.mark.parametrize("model_dtype", LOW_DTYPES, ids=str)
def test_the_model_copy_is_the_master_rounded_to_nearest_even(model_dtype, rng):
    master = interesting_floats(rng)
    # With lr = 0 and g = m = 0 the master does not move, so the copy shows
    # the rounding alone, for every kind of float32 value.
    zeros = np.zeros_like(master)
    model = np.zeros(master.shape, model_dtype)
    with np.errstate(over="ignore", invalid="ignore"):  # NaN and overflow are part of the test
        expected = master.astype(model_dtype)
    fastadam.adam_step(master, zeros, zeros.copy(), np.ones_like(master), model_params=model, step=1, lr=0.0)
    assert_same_16bit(model, expected)


@pytest.mark.parametrize("grad_dtype", LOW_DTYPES, ids=str)
def test_16_bit_gradients_are_widened_exactly(grad_dtype):
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)  # every 16-bit pattern
    g16 = bits.view(grad_dtype)
    p, m, v = (np.zeros(len(bits), np.float32) for _ in range(3))
    expected = [p.copy(), m.copy(), v.copy()]
    fastadam.adam_step(p, g16, m, v, step=1, **HYPER)
    with np.errstate(invalid="ignore", over="ignore"):
        fastadam.reference.adam_step(expected[0], g16.astype(np.float32), expected[1], expected[2], step=1, **HYPER)
    for a, e in zip((p, m, v), expected):
        assert_bitwise_equal(a, e)


OPTIONS = [dict(maximize=mx, weight_decay=wd, decoupled_weight_decay=dec, amsgrad=ams)
           for mx, (wd, dec), ams in itertools.product([False, True], [(0.0, False), (0.1, False), (0.1, True)],
                                                       [False, True])]


@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize("size", [0, 1, 17, 1023, (1 << 20) + 3])
@pytest.mark.parametrize("grad_scale", [None, 1024.0, 3.0])
@pytest.mark.parametrize("grad_dtype", [np.dtype(np.float32), *LOW_DTYPES], ids=str)
@pytest.mark.parametrize("model_dtype", LOW_DTYPES, ids=str)
def test_mixed_step_is_bitwise_equal_to_the_reference(model_dtype, grad_dtype, grad_scale, size, num_threads, rng):
    options = OPTIONS[(size + int(grad_scale or 0)) % len(OPTIONS)]  # spread the options over the cases
    master = rng.standard_normal(size).astype(np.float32)
    grad = (rng.standard_normal(size) * (grad_scale or 1.0)).astype(grad_dtype)
    state = [np.abs(rng.standard_normal(size)).astype(np.float32) * 0.01 for _ in range(3)]
    model = master.astype(model_dtype)
    actual = [master, *state, model]
    expected = [a.copy() for a in actual]

    applied = fastadam.adam_step(actual[0], grad, actual[1], actual[2], max_exp_avg_sqs=actual[3] if options[
        "amsgrad"] else None, model_params=actual[4], grad_scale=grad_scale, step=3, num_threads=num_threads,
                                 **HYPER, **options)
    fastadam.reference.adam_step(expected[0], grad, expected[1], expected[2], max_exp_avg_sqs=expected[3] if
                                 options["amsgrad"] else None, model_params=expected[4], grad_scale=grad_scale,
                                 step=3, **HYPER, **options)

    assert applied is True
    for a, e in zip(actual[:4], expected[:4]):
        assert_bitwise_equal(a, e)
    assert_same_16bit(actual[4], expected[4])
    assert_same_16bit(actual[4], actual[0].astype(model_dtype))  # the copy is exactly the rounded master


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_a_nonfinite_gradient_skips_the_whole_step(bad, rng):
    params = [rng.standard_normal(n).astype(np.float32) for n in (100, 70_000, 5)]
    grads = [rng.standard_normal(n).astype(np.float16) for n in (100, 70_000, 5)]
    grads[-1][4] = bad  # the very last element of the last gradient
    models = [p.astype(np.float16) for p in params]
    ms, vs = [np.zeros_like(p) for p in params], [np.zeros_like(p) for p in params]
    before = [a.copy() for a in (*params, *ms, *vs)]

    applied = fastadam.adam_step(params, grads, ms, vs, model_params=models, step=1, grad_scale=8.0,
                                 skip_if_nonfinite=True)

    assert applied is False
    for a, b in zip((*params, *ms, *vs), before):
        assert_bitwise_equal(a, b)
    assert fastadam.reference.adam_step([p.copy() for p in params], grads, ms, vs, step=1, grad_scale=8.0,
                                        skip_if_nonfinite=True) is False


def test_scaling_can_overflow_a_finite_gradient_and_that_counts_as_nonfinite():
    p, m, v = (np.zeros(3, np.float32) for _ in range(3))
    g = np.array([1.0, 3e38, 2.0], np.float32)
    assert fastadam.adam_step(p, g, m, v, step=1, grad_scale=0.5, skip_if_nonfinite=True) is False
    assert fastadam.adam_step(p, g, m, v, step=1, grad_scale=2.0, skip_if_nonfinite=True) is True


def test_a_power_of_two_grad_scale_is_the_same_as_unscaled_gradients(rng):
    p = rng.standard_normal(1000).astype(np.float32)
    g = rng.standard_normal(1000).astype(np.float32)
    twin = p.copy()
    fastadam.adam_step(p, g * np.float32(65536), np.zeros_like(p), np.zeros_like(p), step=1, grad_scale=65536.0)
    fastadam.adam_step(twin, g, np.zeros_like(p), np.zeros_like(p), step=1)
    assert_bitwise_equal(p, twin)


@pytest.mark.parametrize("model_dtype", LOW_DTYPES, ids=str)
def test_adam_with_master_weights_trains_the_low_precision_model(model_dtype, rng, tmp_path):
    model = [rng.standard_normal(s).astype(model_dtype) for s in [(30, 20), (20,), (7,)]]
    ref_master = [p.astype(np.float32) for p in model]
    ref_state = [(np.zeros_like(p), np.zeros_like(p)) for p in ref_master]
    opt = fastadam.AdamW(model, lr=1e-2, master_weights=True)
    grads_seq = [[(rng.standard_normal(p.shape) * 256).astype(model_dtype) for p in model] for _ in range(40)]

    for step, grads in enumerate(grads_seq[:20], start=1):
        assert opt.step(grads, grad_scale=256.0, skip_if_nonfinite=True)
        for p, g, (m, v) in zip(ref_master, grads, ref_state):
            fastadam.reference.adam_step(p, g, m, v, step=step, lr=1e-2, weight_decay=1e-2,
                                         decoupled_weight_decay=True, grad_scale=256.0)
    for p, master, expected in zip(model, (s["master_param"] for s in opt.state), ref_master):
        assert_bitwise_equal(master, expected)
        assert_same_16bit(p, expected.astype(model_dtype))

    # Saved and resumed (the master is part of the state), the trajectory is the uninterrupted one.
    opt.save(tmp_path / "opt.npz")
    resumed_model = [p.copy() for p in model]
    resumed = fastadam.AdamW(resumed_model, lr=1e-2, master_weights=True)
    resumed.load(tmp_path / "opt.npz")
    for grads in grads_seq[20:]:
        opt.step(grads, grad_scale=256.0)
        resumed.step(grads, grad_scale=256.0)
    for a, b in zip(model, resumed_model):
        assert_same_16bit(a, b)


def test_a_skipped_step_does_not_count(rng):
    model = [rng.standard_normal(10).astype(np.float16)]
    opt = fastadam.Adam(model, master_weights=True)
    bad = np.full(10, np.inf, np.float16)
    assert opt.step([bad], skip_if_nonfinite=True) is False
    assert opt.steps == [0]
    assert opt.step([np.ones(10, np.float16)], skip_if_nonfinite=True) is True
    assert opt.steps == [1]


def test_low_precision_params_need_master_weights(rng):
    with pytest.raises(TypeError, match=r"params\[0\]: dtype float16 needs master_weights=True"):
        fastadam.Adam([np.zeros(3, np.float16)])


@pytest.mark.parametrize("call,error,match", [
    (lambda p, g, m, v: fastadam.adam_step(p, g, m, v, model_params=np.zeros(4, np.float32), step=1),
     TypeError, r"model_params: dtype must be float16 or bfloat16, got float32"),
    (lambda p, g, m, v: fastadam.adam_step(p.astype(np.float64), g.astype(np.float16), m.astype(np.float64),
                                           v.astype(np.float64), step=1),
     TypeError, r"grads: dtype must be float32 or float64, got float16"),
    (lambda p, g, m, v: fastadam.adam_step(p, g, m, v, model_params=np.zeros(5, np.float16), step=1),
     ValueError, r"model_params: shape \(5,\) does not match params's shape \(4,\)"),
    (lambda p, g, m, v: fastadam.adam_step(p, g, m, v, grad_scale=0.0, step=1),
     ValueError, r"grad_scale must be None or > 0"),
    (lambda p, g, m, v: fastadam.adam_step(p, g, m, v, grad_scale=float("inf"), step=1),
     ValueError, r"grad_scale must be finite"),
])
def test_bad_mixed_precision_arguments_change_nothing(call, error, match):
    p, g, m, v = (np.ones(4, np.float32) for _ in range(4))
    with pytest.raises(error, match=match):
        call(p, g, m, v)
    assert (p == 1).all() and (m == 1).all() and (v == 1).all()


@pytest.mark.parametrize("grad_scale", [None, 4.0])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("grad_dtype", [np.dtype(np.float32), *LOW_DTYPES], ids=str)
def test_nan_gradients_give_the_references_nan_bits_sign_included(grad_dtype, maximize, grad_scale, rng):
    # Raw bits, NaNs included (assert_bitwise_equal ignores payloads): each
    # NaN comes from one gradient NaN, so widening, unscaling and maximize
    # decide its sign and payload alone.
    n = 203
    grad = rng.standard_normal(n).astype(grad_dtype)
    width = grad_dtype.itemsize * 8
    quiet, signalling = (0x7E01, 0x7C01) if grad_dtype == np.float16 else (0x7FC1, 0x7F81)
    if width == 32:
        quiet, signalling = 0x7FC12345, 0x7F812345
    sign = 1 << (width - 1)
    bits = np.array([quiet, quiet | sign, signalling, signalling | sign], f"u{width // 8}")
    for at in (0, 100, n - 4):
        grad[at:at + 4] = bits.view(grad_dtype)
    actual = [rng.standard_normal(n).astype(np.float32), np.zeros(n, np.float32), np.ones(n, np.float32)]
    expected = [a.copy() for a in actual]

    fastadam.adam_step(*actual[:1], grad, *actual[1:], grad_scale=grad_scale, maximize=maximize, step=2, **HYPER)
    fastadam.reference.adam_step(*expected[:1], grad, *expected[1:], grad_scale=grad_scale, maximize=maximize,
                                 step=2, **HYPER)

    assert np.isnan(actual[0]).sum() == 12
    for a, e in zip(actual, expected):
        np.testing.assert_array_equal(a.view(np.uint32), e.view(np.uint32))


@pytest.mark.parametrize("grad_dtype", [np.dtype(np.float32), *LOW_DTYPES], ids=str)
@pytest.mark.parametrize("model_dtype", LOW_DTYPES, ids=str)
def test_every_head_and_tail_length_is_bitwise_equal(model_dtype, grad_dtype, rng):
    # 16-bit loads and stores in the short stretches before the first aligned
    # register and after the last whole one (see test_numerics.EDGE_SIZES).
    total = 15 + 531
    base = [rng.standard_normal(total).astype(np.float32), (rng.standard_normal(total) * 4).astype(grad_dtype),
            (0.1 * rng.standard_normal(total)).astype(np.float32),
            np.abs(0.01 * rng.standard_normal(total)).astype(np.float32)]
    for offset in (0, 1, 5, 8, 15):
        for n in [*range(36), *range(500, 532)]:
            master, grad, m, v = (a[offset:offset + n].copy() for a in base)
            model_buffer = np.zeros(total, model_dtype)
            model = model_buffer[offset:offset + n]
            expected = [master.copy(), m.copy(), v.copy(), model.copy()]
            fastadam.adam_step(master, grad, m, v, model_params=model, grad_scale=4.0, step=2, num_threads=1,
                               **HYPER)
            fastadam.reference.adam_step(expected[0], grad, expected[1], expected[2], model_params=expected[3],
                                         grad_scale=4.0, step=2, **HYPER)
            for a, e in zip((master, m, v), expected):
                assert_bitwise_equal(a, e)
            assert_same_16bit(model, expected[3])
            assert not model_buffer[:offset].any() and not model_buffer[offset + n:].any()
