"""The benchmarks' speed limits compute exactly what ``_core.probe_step`` says.

The probe moves the Adam step's bytes (read a, b, c, d; write a, c, d) with
trivial arithmetic: a = a/2 + b, c = c/2 + b, d = d/2 + b*b (d, a second moment, stays
non-negative, so that a step sharing the buffers never runs on NaNs).  The exact probe
moves the same bytes with the step's one division and square root an element:
c' = c/2 + b, d' = d/2 + b*b, a = a - c' / (sqrt(d') + 1e-8).  Beside a float32
a, b may be bfloat16 (the mixed-precision step's gradient, with e receiving a
rounded to bfloat16), and c and d may be bfloat16 (the bfloat16 moments: read
exactly, computed in float32, stored rounded to nearest-even; a uses c' and d'
before that rounding, as the step uses its moments), or both 8-bit state
(codes and one float per block of 256, read and written as the 8-bit step
does: each code is read as a float, and replaced by the second byte of its new
value's bits; each block's float x becomes x/2 + 1/2).  The benchmarks check
each probe against these formulas before timing it; here they are pinned bit
for bit (the build has -ffp-contract=off, so NumPy's float32 operations in the
same order give the same bits).
"""

from __future__ import annotations

import numpy as np
import pytest

import fastadam
from conftest import assert_bitwise_equal
from fastadam import QuantizedState, _core

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
# Around the register widths (4, 8, 16 float32), and a multi-threaded size with an odd tail.
SIZES = [1, 7, 8, 9, 17, 1003, (1 << 17) + 5]
#: The storages of (c, d) beside a float32 a.
MOMENT_PAIRS = [(np.float32, np.float32), (BF16, BF16), (BF16, np.float32), (np.float32, BF16)]


def expected_probe(a, b, c, d, exact):
    """(a, c, d) after one probe, in float32 with the kernel's order of operations, c and d in their storage."""
    a, b, c, d = (np.asarray(x, np.float32) for x in (a, b, c, d))
    half = np.float32(0.5)
    if exact:
        c_new = c * half + b
        d_new = d * half + b * b
        a_new = a - c_new / (np.sqrt(d_new) + np.float32(1e-8))
    else:
        a_new, c_new, d_new = a * half + b, c * half + b, d * half + b * b
    return a_new, c_new, d_new


def inputs(size, c_dtype, d_dtype, rng):
    a = rng.standard_normal(size, dtype=np.float32)
    b = rng.standard_normal(size, dtype=np.float32)
    c = rng.standard_normal(size, dtype=np.float32).astype(c_dtype)
    d = rng.uniform(0.0, 2.0, size).astype(np.float32).astype(d_dtype)  # d is a second moment: never negative
    return a, b, c, d


@pytest.mark.parametrize("exact", [False, True], ids=["probe", "exact"])
@pytest.mark.parametrize("pair", MOMENT_PAIRS, ids=lambda p: "c-{}_d-{}".format(*(np.dtype(x).name for x in p)))
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("threads", [1, 2])
def test_the_probe_with_float32_or_bfloat16_moments_follows_its_formula(size, pair, exact, threads):
    a, b, c, d = inputs(size, *pair, np.random.default_rng(size))
    ea, ec, ed = expected_probe(a, b, c, d, exact)
    _core.probe_step(a, b, c, d, threads, exact=exact)
    assert_bitwise_equal(a, ea, "a")
    assert_bitwise_equal(c, ec.astype(pair[0]), "c")  # astype rounds to nearest-even, as the probe must
    assert_bitwise_equal(d, ed.astype(pair[1]), "d")


def test_bfloat16_moments_round_to_nearest_even_not_by_truncation():
    # c = 1, so c/2 + b = 0.5 + b, where bfloat16's spacing is 2^-8: b = 2^-9 is a tie
    # between 0.5 (even) and 0.5 + 2^-8 (odd), b = 3 * 2^-9 one between 0.5 + 2^-8 (odd)
    # and 0.5 + 2^-7 (even); 0.6 * 2^-8 is above the midpoint, rounded up where truncation
    # would go down.
    b = np.array([2.0**-9, 3 * 2.0**-9, 0.6 * 2.0**-8], np.float32)
    a = np.zeros(3, np.float32)
    c, d = np.ones(3, BF16), np.ones(3, BF16)
    _core.probe_step(a, b, c, d, 1)
    np.testing.assert_array_equal(c.astype(np.float32), [0.5, 0.5 + 2.0**-7, 0.5 + 2.0**-8])
    np.testing.assert_array_equal(a, b)  # a = 0/2 + b, in float32


def test_the_exact_probe_updates_a_with_the_moments_before_they_are_rounded():
    # c' = 1/2 + 2^-9 needs more than bfloat16's 8 significant bits: c keeps 1/2, a sees c' itself.
    a = np.zeros(1, np.float32)
    b = np.array([2.0**-9], np.float32)
    c, d = np.ones(1, BF16), np.ones(1, BF16)
    _core.probe_step(a, b, c, d, 1, exact=True)
    c_new = np.float32(0.5 + 2.0**-9)
    d_new = np.float32(0.5) + b[0] * b[0]
    assert a[0] == -(c_new / (np.sqrt(d_new) + np.float32(1e-8)))
    assert c[0] == 0.5  # the tie, rounded to even


def test_the_mixed_precision_probe_still_reads_a_bfloat16_b_and_writes_e_beside_bfloat16_moments():
    rng = np.random.default_rng(3)
    a, b32, c, d = inputs(1003, BF16, BF16, rng)
    b = b32.astype(BF16)
    e = np.zeros(1003, BF16)
    ea, ec, ed = expected_probe(a, b, c, d, exact=False)
    _core.probe_step(a, b, c, d, 2, e)
    assert_bitwise_equal(a, ea, "a")
    assert_bitwise_equal(c, ec.astype(BF16), "c")
    assert_bitwise_equal(d, ed.astype(BF16), "d")
    assert_bitwise_equal(e, ea.astype(BF16), "e")


def test_the_float64_probe_follows_its_formula():
    rng = np.random.default_rng(4)
    a, b, c, d = (rng.standard_normal(1003) for _ in range(4))
    ea, eb, ec, ed = a.copy(), b.copy(), c.copy(), d.copy()
    _core.probe_step(a, b, c, d, 2)
    for actual, expected in ((a, ea * 0.5 + eb), (c, ec * 0.5 + eb), (d, ed * 0.5 + eb * eb)):
        assert_bitwise_equal(actual, expected)


@pytest.mark.parametrize("bad, message", [
    (lambda: np.zeros(4, np.float16), "c: a moment may be float32, float64 or bfloat16, not float16"),
    (lambda: np.zeros(5, BF16), "c: shape (5,) does not match a's shape (4,)"),
    (lambda: np.zeros(8, BF16)[::2], "c: must be C-contiguous"),
])
def test_a_bad_moment_is_refused_naming_it(bad, message):
    a, b, d = np.zeros(4, np.float32), np.ones(4, np.float32), np.zeros(4, np.float32)
    with pytest.raises((TypeError, ValueError)) as error:
        _core.probe_step(a, b, bad(), d)
    assert message in str(error.value)
    assert not a.any()  # refused before anything was written


def test_bfloat16_moments_need_a_float32_a():
    with pytest.raises(TypeError, match="c: a bfloat16 moment needs a float32 param, and a is float64"):
        _core.probe_step(np.zeros(4), np.zeros(4), np.zeros(4, BF16), np.zeros(4))


def quantized_inputs(size, rng):
    """a, b and two 8-bit states with random codes and block floats."""
    blocks = -(-size // 256)
    a = rng.standard_normal(size, dtype=np.float32)
    b = rng.standard_normal(size, dtype=np.float32)
    c, d = (QuantizedState(rng.integers(0, 256, size).astype(np.uint8), rng.random(blocks, dtype=np.float32),
                           fastadam.dynamic_map(signed)) for signed in (True, False))
    return a, b, c, d


def second_byte(x):
    return ((x.view(np.uint32) >> 8) & 0xFF).astype(np.uint8)


@pytest.mark.parametrize("exact", [False, True], ids=["probe", "exact"])
@pytest.mark.parametrize("size", [1, 7, 8, 9, 255, 256, 257, 1003, (1 << 17) + 5])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_the_probe_with_8_bit_state_moves_codes_and_block_floats(size, exact, threads):
    a, b, c, d = quantized_inputs(size, np.random.default_rng(size))
    ea, ec, ed = expected_probe(a, b, c.codes, d.codes, exact)  # the codes read as floats
    half = np.float32(0.5)
    c_absmax, d_absmax = c.absmax * half + half, d.absmax * half + half
    _core.probe_step(a, b, c, d, threads, exact=exact)
    assert_bitwise_equal(a, ea, "a")
    np.testing.assert_array_equal(c.codes, second_byte(ec))
    np.testing.assert_array_equal(d.codes, second_byte(ed))
    assert_bitwise_equal(c.absmax, c_absmax, "c.absmax")  # every block's, once, whatever the threads
    assert_bitwise_equal(d.absmax, d_absmax, "d.absmax")


@pytest.mark.parametrize("where", ["c only", "beside a bfloat16 b"])
def test_8_bit_state_goes_in_both_c_and_d_beside_a_float32_b(where):
    a, b, c, d = quantized_inputs(300, np.random.default_rng(5))
    before = [x.copy() for x in (a, c.codes, c.absmax)]
    if where == "c only":
        d = np.zeros(300, np.float32)
    else:
        b = b.astype(BF16)
    with pytest.raises(TypeError, match="8-bit state goes in both c and d, beside a float32 b"):
        _core.probe_step(a, b, c, d)
    for x, y in zip((a, c.codes, c.absmax), before):
        np.testing.assert_array_equal(x, y)  # refused before anything was written
