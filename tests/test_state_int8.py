"""8-bit block-wise state: a quarter of the memory, bitwise equal to fastadam.reference.

A moment in 8-bit state is a ``fastadam.QuantizedState(codes, absmax, map)``:
element j stands for ``map[codes[j]] * absmax[j // 256]``.  Each step widens a
block of 256 elements, runs the float32 update, and stores it back: absmax the
largest finite ``|x|`` of the block, each code the nearest map value to
``x / absmax`` (ties to the lower code).  test_isa_levels.py runs this file
under every level the CPU has.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastadam
from conftest import OPTIONS, assert_bitwise_equal, option_id
from fastadam import QuantizedState, dynamic_map
from fastadam.reference import quantize_blockwise

HYPER = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-8)
SIGNED, UNSIGNED = dynamic_map(signed=True), dynamic_map(signed=False)
SIZES = [0, 1, 255, 256, 257, 4095, 4096, 4097, (1 << 20) + 3]


def quantized(x: np.ndarray, qmap: np.ndarray) -> QuantizedState:
    state = QuantizedState(np.zeros(x.shape, np.uint8), np.zeros(-(-x.size // 256), np.float32), qmap)
    quantize_blockwise(x, state)
    return state


def copy(state):
    return None if state is None else QuantizedState(state.codes.copy(), state.absmax.copy(), state.map)


def assert_states_equal(a: QuantizedState, b: QuantizedState, what: str) -> None:
    np.testing.assert_array_equal(a.codes, b.codes, err_msg=f"{what}.codes")
    assert_bitwise_equal(a.absmax, b.absmax, f"{what}.absmax")


# -- the maps and the quantizer ------------------------------------------------------------------------------

def test_the_dynamic_maps_hold_256_ascending_values_over_seven_decades():
    for qmap, signed in ((SIGNED, True), (UNSIGNED, False)):
        assert qmap.dtype == np.float32 and qmap.shape == (256,)
        assert np.all(np.diff(qmap) > 0)
        assert 0.0 in qmap and qmap[-1] == 1.0
        positive = qmap[qmap > 0]
        assert 1e-7 < positive.min() < 1e-6
        assert (qmap < 0).sum() == (127 if signed else 0)


def nearest_code_by_brute_force(y: np.ndarray, qmap: np.ndarray) -> np.ndarray:
    """argmin |map - y| in float64 (exact for float32 inputs), ties to the lower code."""
    distance = np.abs(qmap.astype(np.float64)[None, :] - y.astype(np.float64)[:, None])
    return np.argmin(distance, axis=1)  # the first minimum: the lower code


def kernel_codes(y: np.ndarray, qmap: np.ndarray) -> np.ndarray:
    """The kernel's codes of y (in [-1, 1]): a step that stores exactly y as exp_avg, in blocks whose absmax
    is 1 (the first element of every block), so that x / absmax is y itself."""
    blocks = -(-y.size // 255)
    values = np.zeros((blocks, 256), np.float32)
    values[:, 0] = 1.0
    padded = np.zeros(blocks * 255, np.float32)
    padded[:y.size] = y
    values[:, 1:] = padded.reshape(blocks, 255)
    g = values.reshape(-1)
    p = np.zeros_like(g)
    m = QuantizedState(np.zeros(g.size, np.uint8), np.zeros(blocks, np.float32), qmap)
    v = np.zeros_like(g)
    # beta1 = 0: the new exp_avg is 0 * m + 1 * g, exactly g.
    fastadam.adam_step(p, g, m, v, step=1, betas=(0.0, 0.999), num_threads=2)
    assert np.all(m.absmax == 1.0)
    return m.codes.reshape(blocks, 256)[:, 1:].reshape(-1)[:y.size]


@pytest.mark.parametrize("qmap", [SIGNED, UNSIGNED], ids=["signed", "unsigned"])
def test_the_kernels_code_is_the_nearest_map_value_around_every_midpoint(qmap):
    # Every float32 within 40 ulps of each midpoint between consecutive codes, where a wrong search would show.
    midpoints = ((qmap[:-1].astype(np.float64) + qmap[1:].astype(np.float64)) / 2).astype(np.float32)
    bits = midpoints.view(np.int32)[:, None] + np.arange(-40, 41, dtype=np.int32)[None, :]
    y = bits.reshape(-1).view(np.float32)
    y = y[(y >= qmap[0]) & (y <= 1.0)]
    np.testing.assert_array_equal(kernel_codes(y, qmap), nearest_code_by_brute_force(y, qmap))


@pytest.mark.slow
@pytest.mark.parametrize("qmap", [SIGNED, UNSIGNED], ids=["signed", "unsigned"])
def test_the_kernels_code_matches_the_references_search_over_the_whole_range(qmap):
    # Every 61st float32 of the map's range (about 35 million values), against the reference's search.
    lo, hi = np.float32(qmap[0]), np.float32(1.0)
    pieces = []
    if lo < 0:
        pieces.append(np.arange(np.float32(-0.0).view(np.int32) & 0x7FFFFFFF, (-lo).view(np.int32) + 1, 61,
                                dtype=np.int32).view(np.float32) * np.float32(-1))
    pieces.append(np.arange(0, hi.view(np.int32) + 1, 61, dtype=np.int32).view(np.float32))
    y = np.concatenate(pieces)
    for chunk in np.array_split(y, 16):
        expected = np.searchsorted((qmap[:-1].astype(np.float64) + qmap[1:].astype(np.float64)) / 2,
                                   chunk.astype(np.float64), side="left")
        np.testing.assert_array_equal(kernel_codes(chunk, qmap), expected)


# -- the step ------------------------------------------------------------------------------------------------

def problem(size, rng, amsgrad=False):
    p = rng.standard_normal(size).astype(np.float32)
    g = (rng.standard_normal(size) * np.exp(rng.standard_normal(size))).astype(np.float32)
    m = quantized((0.1 * rng.standard_normal(size)).astype(np.float32), SIGNED)
    v = quantized(np.abs(0.01 * rng.standard_normal(size)).astype(np.float32), UNSIGNED)
    vmax = quantized(np.abs(0.02 * rng.standard_normal(size)).astype(np.float32), UNSIGNED) if amsgrad else None
    return p, g, m, v, vmax


@pytest.mark.parametrize("options", OPTIONS, ids=option_id)
@pytest.mark.parametrize("size", SIZES)
def test_every_step_is_bitwise_the_reference_at_1_2_and_3_threads(size, options, rng):
    p, g, m, v, vmax = problem(size, rng, options["amsgrad"])
    expected = [p.copy(), copy(m), copy(v), copy(vmax)]
    for step, threads in ((1, 1), (2, 2), (3, 3)):
        fastadam.adam_step(p, g, m, v, max_exp_avg_sqs=vmax, step=step, num_threads=threads, **HYPER, **options)
        fastadam.reference.adam_step(expected[0], g, expected[1], expected[2], max_exp_avg_sqs=expected[3],
                                     step=step, **HYPER, **options)
    assert_bitwise_equal(p, expected[0], "param")
    for name, a, e in zip(("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), (m, v, vmax), expected[1:]):
        if a is not None:
            assert_states_equal(a, e, name)


def test_a_nan_or_inf_gradient_spoils_its_own_element_not_its_block(rng):
    p, g, m, v, _ = problem(1024, rng)
    g[[5, 300]] = [np.nan, np.inf]
    expected = [p.copy(), copy(m), copy(v)]
    fastadam.adam_step(p, g, m, v, step=2, **HYPER)
    fastadam.reference.adam_step(expected[0], g, expected[1], expected[2], step=2, **HYPER)
    assert_bitwise_equal(p, expected[0])
    assert_states_equal(m, expected[1], "exp_avg")
    assert np.isnan(p[5]) and np.isnan(p[300])  # the param shows it ...
    zero = np.flatnonzero(SIGNED == 0)[0]
    assert m.codes[5] == m.codes[300] == zero  # ... its moments are stored as 0 ...
    assert np.all(np.isfinite(m.absmax)) and np.all(np.isfinite(v.absmax))  # ... and its block keeps a scale
    others = np.delete(np.arange(1024), [5, 300])
    assert np.all(np.isfinite(p[others]))


# -- the optimizers ------------------------------------------------------------------------------------------

def test_int8_state_takes_about_a_quarter_of_the_bytes():
    p = np.zeros(1 << 16, np.float32)
    full = sum(a.nbytes for a in fastadam.Adam([p]).state[0].values())
    small = fastadam.Adam([p], state_dtype="int8").state[0]
    assert set(small) == {"exp_avg_codes", "exp_avg_absmax", "exp_avg_map",
                          "exp_avg_sq_codes", "exp_avg_sq_absmax", "exp_avg_sq_map"}
    per_element = sum(a.nbytes for key, a in small.items() if not key.endswith("_map")) / p.size
    assert full / p.size == 8 and per_element == 2 + 2 * 4 / 256  # codes, and a float32 absmax per 256
    assert small["exp_avg_map"].nbytes == 1024  # one map of each kind, shared by every param of the optimizer
    two = fastadam.Adam([p, p.copy()], state_dtype="int8").state
    assert two[0]["exp_avg_map"] is two[1]["exp_avg_map"]


def test_the_optimizer_is_the_functional_step_and_resumes_bitwise(rng, tmp_path):
    start = [rng.standard_normal((30, 300)).astype(np.float32), rng.standard_normal(5000).astype(np.float32)]
    grads = [[rng.standard_normal(p.shape).astype(np.float32) for p in start] for _ in range(6)]
    straight = [p.copy() for p in start]
    opt = fastadam.AdamW(straight, state_dtype="int8", amsgrad=True)
    for g in grads:
        opt.step(g)

    # The functional reference, with the optimizer's zero state
    expected = [p.copy() for p in start]
    states = [[quantized(np.zeros(p.size, np.float32), q) for q in (SIGNED, UNSIGNED, UNSIGNED)] for p in start]
    for step, g in enumerate(grads, 1):
        for p, gi, (m, v, vmax) in zip(expected, g, states):
            fastadam.reference.adam_step(p.reshape(-1), gi.reshape(-1), m, v, max_exp_avg_sqs=vmax, amsgrad=True,
                                         step=step, weight_decay=1e-2, decoupled_weight_decay=True)
    for a, e in zip(straight, expected):
        assert_bitwise_equal(a, e)

    resumed = [p.copy() for p in start]
    first = fastadam.AdamW(resumed, state_dtype="int8", amsgrad=True)
    for g in grads[:3]:
        first.step(g)
    first.save(tmp_path / "ckpt")
    second = fastadam.AdamW(resumed, state_dtype="int8", amsgrad=True)
    second.load(tmp_path / "ckpt")
    for g in grads[3:]:
        second.step(g)
    for a, b in zip(resumed, straight):
        assert_bitwise_equal(a, b)


def test_row_sparse_steps_need_rows_of_whole_blocks_and_change_nothing_otherwise(rng):
    table = rng.standard_normal((50, 512)).astype(np.float32)
    opt = fastadam.SparseAdam([table], state_dtype="int8")
    rows, values = np.array([3, 49, 3]), rng.standard_normal((3, 512)).astype(np.float32)
    untouched = table[np.setdiff1d(np.arange(50), rows)].copy()
    opt.step([fastadam.RowSparseGrad(rows, values)])
    assert_bitwise_equal(table[np.setdiff1d(np.arange(50), rows)], untouched)

    narrow = rng.standard_normal((100, 64)).astype(np.float32)
    opt = fastadam.SparseAdam([narrow], state_dtype="int8", min_compressed_size=0)
    before = narrow.copy()
    with pytest.raises(ValueError, match=r"rows of a multiple of 256 elements with 8-bit state"):
        opt.step([fastadam.RowSparseGrad(np.array([1]), np.ones((1, 64), np.float32))])
    assert_bitwise_equal(narrow, before)


# -- bad input: a clear error, nothing changed ---------------------------------------------------------------

@pytest.mark.parametrize("mutate,error,match", [
    (lambda m: m._replace(map=m.map[::-1].copy()), ValueError, r"exp_avgs\.map: must hold 256 finite values in "
                                                                r"strictly ascending order"),
    (lambda m: m._replace(map=np.linspace(0.1, 1, 256, dtype=np.float32)), ValueError, r"must hold 0\.0"),
    (lambda m: m._replace(absmax=m.absmax[:-1]), ValueError, r"exp_avgs\.absmax: expected 4 values"),
    (lambda m: m._replace(codes=m.codes.astype(np.int16)), TypeError, r"exp_avgs\.codes: dtype must be uint8"),
    (lambda m: m._replace(codes=m.codes[:-1]), ValueError, r"exp_avgs\.codes: shape"),
])
def test_a_malformed_8_bit_state_is_refused_and_nothing_changes(mutate, error, match, rng):
    p, g, m, v, _ = problem(1000, rng)
    bad = mutate(m)
    before = [p.copy(), copy(bad), copy(v)]
    with pytest.raises(error, match=match):
        fastadam.adam_step(p, g, bad, v, step=1)
    assert_bitwise_equal(p, before[0])
    np.testing.assert_array_equal(bad.codes, before[1].codes)
    assert_states_equal(v, before[2], "exp_avg_sq")


def test_8_bit_state_needs_a_float32_param():
    p = np.zeros(300)
    m = quantized(np.zeros(300, np.float32), SIGNED)
    with pytest.raises(TypeError, match=r"exp_avgs: 8-bit state needs a float32 param"):
        fastadam.adam_step(p, p.copy(), m, p.copy(), step=1)


def test_fastadam_torch_refuses_int8_state_for_now():
    torch = pytest.importorskip("torch")
    import fastadam.torch as fatorch

    with pytest.raises(ValueError, match=r"state_dtype='int8' is not supported by fastadam.torch yet"):
        fatorch.Adam([torch.nn.Parameter(torch.zeros(3))], state_dtype="int8")
