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
from conftest import OPTIONS, assert_bitwise_equal, assert_states_equal, copy_state, option_id
from fastadam import QuantizedState, dynamic_map
from fastadam.reference import quantize_blockwise

HYPER = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-8)
SIGNED, UNSIGNED = dynamic_map(signed=True), dynamic_map(signed=False)
SIZES = [0, 1, 255, 256, 257, 4095, 4096, 4097, (1 << 20) + 3]


def quantized(x: np.ndarray, qmap: np.ndarray) -> QuantizedState:
    state = QuantizedState(np.zeros(x.shape, np.uint8), np.zeros(-(-x.size // 256), np.float32), qmap)
    quantize_blockwise(x, state)
    return state


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


def codes_of_every_float_in(first: int, stop: int, sign: int, qmap: np.ndarray) -> np.ndarray:
    """fastadam.quantize_blockwise's codes of the floats whose bits are sign | [first, stop), in blocks of
    255 led by 1.0 (the block's absmax, so that x / absmax is x itself)."""
    count = stop - first
    blocks = -(-count // 255)
    bits = np.zeros((blocks, 256), np.uint32)
    bits[:, 0] = np.float32(1.0).view(np.uint32)
    body = np.zeros(blocks * 255, np.uint32)
    body[:count] = np.arange(first, stop, dtype=np.uint32) | np.uint32(sign)
    bits[:, 1:] = body.reshape(blocks, 255)
    state = QuantizedState(np.empty((blocks, 256), np.uint8), np.empty(blocks, np.float32), qmap)
    fastadam.quantize_blockwise(bits.view(np.float32), state)
    assert np.all(state.absmax == 1.0)
    return state.codes[:, 1:].reshape(-1)[:count]


def largest_float_bits_at_or_below(x: np.ndarray) -> np.ndarray:
    """For float64 x >= 0: the bits of the largest float32 <= x (comparisons in float64, exact)."""
    f = x.astype(np.float32)
    f = np.where(f.astype(np.float64) > x, np.nextafter(f, np.float32(-np.inf)), f)
    return f.view(np.uint32)


@pytest.mark.slow
@pytest.mark.parametrize("qmap, side", [(SIGNED, "positive"), (SIGNED, "negative"), (UNSIGNED, "positive")],
                         ids=["signed-positive", "signed-negative", "unsigned"])
def test_every_float32_of_the_maps_range_gets_the_nearest_code(qmap, side):
    # All 1,065,353,217 float32 magnitudes of [0, 1] on each side the map serves, through the kernel's
    # table (no search).  The exact answer is the number of midpoints (float64, exact) below y.  Walking
    # the magnitudes upwards, that count is a step function of the bits: it moves by one at the bits just
    # above each midpoint.  The codes agree with it everywhere when they move monotonically and agree on
    # both sides of every step and at each chunk's ends.
    negative = side == "negative"
    midpoints = (qmap[:-1].astype(np.float64) + qmap[1:].astype(np.float64)) / 2
    on_side = midpoints < 0 if negative else midpoints >= 0
    # Magnitude bits of the last float on the low-|y| side of each midpoint of this side.
    edge = largest_float_bits_at_or_below(np.abs(midpoints[on_side])).astype(np.int64)
    if negative:  # |y| < |mid| is y > mid: a negative midpoint's float itself lies above it only if inexact
        exact = largest_float_bits_at_or_below(np.abs(midpoints[on_side])).view(np.float32).astype(np.float64) \
            == np.abs(midpoints[on_side])
        edge = edge - exact  # the last magnitude strictly below |mid|
    ks = np.flatnonzero(on_side)
    one = int(np.float32(1.0).view(np.uint32))
    chunk = 255 << 15
    for first in range(0, one + 1, chunk):
        stop = min(first + chunk, one + 1)
        codes = codes_of_every_float_in(first, stop, 0x80000000 if negative else 0, qmap).astype(np.int16)
        expected_ends = np.searchsorted(midpoints, np.array([first, stop - 1], np.uint32).view(np.float32)
                                        .astype(np.float64) * (-1 if negative else 1), side="left")
        assert codes[0] == expected_ends[0] and codes[-1] == expected_ends[1], (first, stop)
        moves = np.diff(codes)
        assert np.all(moves <= 0) if negative else np.all(moves >= 0), (first, stop)
        inside = (edge >= first) & (edge + 1 < stop)
        below, above = codes[edge[inside] - first], codes[edge[inside] + 1 - first]
        k = ks[inside]
        if negative:  # magnitude at or below the edge: y above midpoint k; one step further: below it
            np.testing.assert_array_equal(below, k + 1)
            np.testing.assert_array_equal(above, k)
        else:
            np.testing.assert_array_equal(below, k)
            np.testing.assert_array_equal(above, k + 1)


# A map whose top values lie one float apart: no table of buckets can separate its midpoints, so the
# kernels search it (the same answers, slower).
CROWDED = np.concatenate([np.float32([-1.0, 0.0]),
                          np.frombuffer((np.float32(1.0).view(np.uint32) - np.arange(253, -1, -1, dtype=np.uint32))
                                        .tobytes(), np.float32)]).astype(np.float32)


def values_around_the_midpoints_and_anywhere(qmap: np.ndarray, rng) -> np.ndarray:
    midpoints = ((qmap[:-1].astype(np.float64) + qmap[1:].astype(np.float64)) / 2).astype(np.float32)
    near = (midpoints.view(np.int32)[:, None] + np.arange(-3, 4, dtype=np.int32)).reshape(-1).view(np.float32)
    anywhere = (rng.standard_normal(5000) * np.exp(3 * rng.standard_normal(5000))).astype(np.float32)
    special = np.float32([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, -1e-45, 3e38, -3e38])
    values = np.concatenate([near, anywhere, special, np.zeros(256, np.float32)])  # a block of zeros too
    return values[rng.permutation(values.size)]


def test_the_dynamic_maps_get_a_table_that_stays_in_l1_and_a_crowded_map_is_searched():
    for qmap in (SIGNED, UNSIGNED):
        layout = fastadam._core.codebook_layout(qmap)
        assert layout["buckets"] > 0 and layout["table_bytes"] <= 24 * 1024, layout
    assert fastadam._core.codebook_layout(CROWDED)["buckets"] == 0


@pytest.mark.parametrize("qmap", [SIGNED, UNSIGNED, CROWDED], ids=["signed", "unsigned", "crowded"])
@pytest.mark.parametrize("size", [1, 7, 8, 9, 255, 256, 257, 4097, 1 << 16])
def test_quantize_and_dequantize_blockwise_are_bitwise_the_reference(qmap, size, rng):
    x = np.resize(values_around_the_midpoints_and_anywhere(qmap, rng), size).astype(np.float32)
    blocks = -(-size // 256)
    ours = QuantizedState(np.full(size, 7, np.uint8), np.full(blocks, -1, np.float32), qmap)
    expected = QuantizedState(np.zeros(size, np.uint8), np.zeros(blocks, np.float32), qmap)
    fastadam.quantize_blockwise(x, ours, num_threads=2)
    quantize_blockwise(x, expected)
    assert_states_equal(ours, expected, "state")
    assert_bitwise_equal(fastadam.dequantize_blockwise(ours), fastadam.reference.dequantize_blockwise(expected))
    out = np.full(size, np.nan, np.float32)
    assert fastadam.dequantize_blockwise(ours, out, num_threads=1) is out
    assert_bitwise_equal(out, fastadam.reference.dequantize_blockwise(expected))


def random_map(kind: str, rng) -> np.ndarray:
    """256 strictly ascending float32 values holding 0, of several shapes the table builder must handle."""
    if kind == "uniform":
        values = rng.uniform(-1, 1, 600)
    elif kind == "log":  # spread over many binades, both signs
        values = np.exp(rng.uniform(-40, 0, 600)) * rng.choice([-1, 1], 600)
    elif kind == "beyond one":  # values outside [-1, 1] are allowed (never the nearest of much)
        values = rng.uniform(-3, 3, 600)
    elif kind == "subnormal":  # a cluster of subnormals near zero: the table must floor below them or search
        values = np.concatenate([np.arange(1, 40) * 1e-45, rng.uniform(-1, 1, 600)])
    else:
        raise ValueError(kind)
    values = np.unique(np.float32(values))
    values = values[values != 0]
    chosen = np.sort(rng.choice(values, 255, replace=False))
    return np.unique(np.concatenate([chosen, np.float32([0.0])])).astype(np.float32)


@pytest.mark.parametrize("kind", ["uniform", "log", "beyond one", "subnormal"])
def test_any_valid_map_quantizes_bitwise_like_the_reference(kind, rng):
    qmap = random_map(kind, rng)
    assert qmap.size == 256 and np.all(np.diff(qmap) > 0)
    x = np.resize(values_around_the_midpoints_and_anywhere(qmap, rng), 1 << 15).astype(np.float32)
    x[::256] = 1.0  # absmax 1 in every block: the values near the midpoints are quantized as they are
    ours = QuantizedState(np.zeros(x.size, np.uint8), np.zeros(x.size // 256, np.float32), qmap)
    expected = QuantizedState(np.zeros(x.size, np.uint8), np.zeros(x.size // 256, np.float32), qmap)
    fastadam.quantize_blockwise(x, ours)
    quantize_blockwise(x, expected)
    assert_states_equal(ours, expected, f"{kind} map")


def test_a_crowded_map_steps_bitwise_like_the_reference(rng):
    p = rng.standard_normal(3000).astype(np.float32)
    g = rng.standard_normal(3000).astype(np.float32)
    m = quantized((0.1 * rng.standard_normal(3000)).astype(np.float32), CROWDED)
    v = quantized(np.abs(0.01 * rng.standard_normal(3000)).astype(np.float32), UNSIGNED)
    expected = [p.copy(), copy_state(m), copy_state(v)]
    for step in (1, 2, 3):
        fastadam.adam_step(p, g, m, v, step=step, **HYPER)
        fastadam.reference.adam_step(expected[0], g, expected[1], expected[2], step=step, **HYPER)
    assert_bitwise_equal(p, expected[0])
    assert_states_equal(m, expected[1], "exp_avg")


@pytest.mark.parametrize("call, match", [
    (lambda x, s: fastadam.quantize_blockwise(x.astype(np.float64), s), r"values: dtype must be float32"),
    (lambda x, s: fastadam.quantize_blockwise(x[:-1], s), r"state\.codes: shape"),
    (lambda x, s: fastadam.quantize_blockwise(x, s._replace(map=s.map[::-1].copy())),
     r"state\.map: must hold 256 finite values in strictly ascending order"),
    (lambda x, s: fastadam.quantize_blockwise(x, s._replace(absmax=s.absmax[:2])), r"state\.absmax: expected 3"),
    (lambda x, s: fastadam.quantize_blockwise(x, (s.codes, s.absmax)), r"state: expected a fastadam.QuantizedState"),
    (lambda x, s: fastadam.quantize_blockwise(s.absmax, s._replace(codes=s.codes[:3], absmax=s.absmax[:1])),
     r"state shares memory with values|values shares memory with state"),
    (lambda x, s: fastadam.dequantize_blockwise(s, np.empty(600)), r"out: dtype must be float32"),
    (lambda x, s: fastadam.dequantize_blockwise(s, s.absmax[:0]), r"state\.codes: shape"),
    (lambda x, s: fastadam.dequantize_blockwise(s, s.codes.view(np.float32)), r"state\.codes: shape"),
    (lambda x, s: fastadam.dequantize_blockwise(s._replace(codes=s.codes[:3], absmax=s.absmax[:1]), s.absmax),
     r"shares memory with"),
    (lambda x, s: fastadam.dequantize_blockwise(s.codes), r"state: expected a fastadam.QuantizedState"),
])
def test_bad_arguments_to_the_quantizer_are_refused_and_nothing_changes(call, match, rng):
    x = rng.standard_normal(600).astype(np.float32)
    state = quantized(rng.standard_normal(600).astype(np.float32), SIGNED)
    before = copy_state(state)
    with pytest.raises((TypeError, ValueError), match=match):
        call(x, state)
    assert_states_equal(state, before, "state")


def test_a_map_changed_in_place_between_steps_is_checked_again_and_used(rng):
    p = rng.standard_normal(4096).astype(np.float32)
    opt = fastadam.Adam([p], state_dtype="int8")
    g = rng.standard_normal(4096).astype(np.float32)
    opt.step([g])
    signed_map = opt.state[0]["exp_avg_map"]
    # A valid change: the next step uses the new values, as the reference does.
    m = QuantizedState(opt.state[0]["exp_avg_codes"].copy(), opt.state[0]["exp_avg_absmax"].copy(),
                       signed_map.copy())
    v = QuantizedState(opt.state[0]["exp_avg_sq_codes"].copy(), opt.state[0]["exp_avg_sq_absmax"].copy(),
                       opt.state[0]["exp_avg_sq_map"])
    signed_map[200] = np.nextafter(signed_map[200], np.float32(0))
    m = m._replace(map=signed_map.copy())
    expected = p.copy()
    opt.step([g])
    fastadam.reference.adam_step(expected, g, m, v, step=2)
    assert_bitwise_equal(p, expected)
    np.testing.assert_array_equal(opt.state[0]["exp_avg_codes"], m.codes)
    # An invalid change: a clear error, and nothing is written.
    signed_map[10] = signed_map[11]
    before = p.copy(), opt.state[0]["exp_avg_codes"].copy()
    with pytest.raises(ValueError, match=r"the exp_avg map of params\[0\] \(changed since the last step\): must "
                                         r"hold 256 finite values in strictly ascending order \(at 11\)"):
        opt.step([g])
    assert_bitwise_equal(p, before[0])
    np.testing.assert_array_equal(opt.state[0]["exp_avg_codes"], before[1])


def test_a_map_shared_by_params_and_changed_in_place_is_used_for_all_of_them(rng):
    # The optimizer's params share one map of each kind: the step checks a changed map once and every param
    # that holds it steps with the new values.
    params = [rng.standard_normal(n).astype(np.float32) for n in (4096, 5000, 4500)]
    opt = fastadam.Adam(params, state_dtype="int8")
    grads = [rng.standard_normal(p.size).astype(np.float32) for p in params]
    opt.step(grads)
    signed_map = opt.state[0]["exp_avg_map"]
    assert all(s["exp_avg_map"] is signed_map for s in opt.state)
    signed_map *= np.float32(0.999)  # every value but 0 moves: every param's decoding shows which map it used
    expected = []
    for i, p in enumerate(params):
        s = opt.state[i]
        m, v = (QuantizedState(s[key + "_codes"].copy(), s[key + "_absmax"].copy(), s[key + "_map"].copy())
                for key in ("exp_avg", "exp_avg_sq"))
        expected.append((p.copy(), m, v))
    opt.step(grads)
    for i, ((p_expected, m, v), p, g) in enumerate(zip(expected, params, grads)):
        fastadam.reference.adam_step(p_expected, g, m, v, step=2)
        assert_bitwise_equal(p, p_expected, f"params[{i}]")
        np.testing.assert_array_equal(opt.state[i]["exp_avg_codes"], m.codes)


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
    expected = [p.copy(), copy_state(m), copy_state(v), copy_state(vmax)]
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
    expected = [p.copy(), copy_state(m), copy_state(v)]
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


@pytest.mark.parametrize("source, target", [("float32", "int8"), ("bfloat16", "int8"), ("int8", "float32"),
                                            ("int8", "bfloat16"), (("int8", "bfloat16"), ("float32", "int8"))])
def test_a_live_optimizers_state_converts_into_and_out_of_8_bits(source, target, rng):
    pytest.importorskip("ml_dtypes")
    p = rng.standard_normal((64, 100)).astype(np.float32)
    grads = [rng.standard_normal(p.shape).astype(np.float32) for _ in range(3)]
    old = fastadam.AdamW([p.copy()], state_dtype=source, amsgrad=True)
    old.step([grads[0]])
    param = p.copy()
    new = fastadam.AdamW([param], state_dtype=target, amsgrad=True)
    new.load_state_dict(old.state_dict())
    assert new.steps == [1]
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        values = (fastadam.dequantize_blockwise(fastadam._optim._moment(old.state[0], key))
                  if key + "_codes" in old.state[0] else old.state[0][key].astype(np.float32))
        if key + "_codes" in new.state[0]:  # quantized as a step would store those values
            expected = quantized(values, new.state[0][key + "_map"])
            assert_states_equal(fastadam._optim._moment(new.state[0], key), expected, key)
        else:  # widened exactly, or rounded to nearest-even into bfloat16
            assert_bitwise_equal(new.state[0][key], values.astype(new.state[0][key].dtype))
    # and the converted optimizer steps on from there as the reference does
    expected_p = param.copy()
    states = [copy_state(fastadam._optim._moment(new.state[0], key)) if key + "_codes" in new.state[0]
              else new.state[0][key].copy() for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")]
    new.step([grads[1]])
    fastadam.reference.adam_step(expected_p, grads[1], states[0], states[1], max_exp_avg_sqs=states[2],
                                 amsgrad=True, step=2, weight_decay=1e-2, decoupled_weight_decay=True)
    assert_bitwise_equal(param, expected_p)


def test_8_bit_state_with_a_bad_map_is_refused_on_loading_and_nothing_changes(rng):
    p = rng.standard_normal(5000).astype(np.float32)
    old = fastadam.Adam([p.copy()], state_dtype="int8")
    old.step([np.ones(5000, np.float32)])
    sd = old.state_dict()
    sd["state"][0]["exp_avg_map"] = sd["state"][0]["exp_avg_map"][::-1].copy()
    new = fastadam.Adam([p.copy()])
    new.step([np.ones(5000, np.float32)])
    before = {key: a.copy() for key, a in new.state[0].items()}
    with pytest.raises(ValueError, match=r"state\[0\]\['exp_avg_map'\]: map: must hold 256 finite values"):
        new.load_state_dict(sd)
    for key, a in new.state[0].items():
        assert_bitwise_equal(a, before[key])
    assert new.steps == [1]


def custom_signed_map() -> np.ndarray:
    """A valid map other than the dynamic one: 256 ascending values over three decades, 0 included."""
    magnitudes = np.geomspace(1e-3, 1.0, 128)
    return np.concatenate([-magnitudes[:0:-1], [0.0], magnitudes]).astype(np.float32)


def test_saved_maps_that_differ_between_params_are_refused_not_mixed_up(rng):
    # The optimizer keeps one exp_avg map for all params: loading two different ones would decode one
    # param's codes with the other's map.  Refused, nothing changed.
    params = [rng.standard_normal(5000).astype(np.float32) for _ in range(2)]
    old = fastadam.Adam([p.copy() for p in params], state_dtype="int8")
    old.step([np.ones(5000, np.float32)] * 2)
    sd = old.state_dict()
    sd["state"][1]["exp_avg_map"] = custom_signed_map()
    new = fastadam.Adam([p.copy() for p in params], state_dtype="int8")
    new.step([np.full(5000, 0.5, np.float32)] * 2)
    before = [{key: a.copy() for key, a in s.items()} for s in new.state]
    with pytest.raises(ValueError, match=r"state\[1\]\['exp_avg_map'\] differs from state\[0\]\['exp_avg_map'\]"):
        new.load_state_dict(sd)
    for s, b in zip(new.state, before):
        for key, a in s.items():
            assert_bitwise_equal(a, b[key])


def test_a_moment_quantized_on_loading_takes_the_map_that_is_loaded_with_it(rng):
    # params[0] was saved with float32 moments, params[1] with 8-bit ones under another map: after loading,
    # params[0]'s moment is quantized with that map, the one both params then decode with.
    params = [rng.standard_normal(5000).astype(np.float32) for _ in range(2)]
    source = fastadam.Adam([p.copy() for p in params], state_dtype="int8")
    source.step([rng.standard_normal(5000).astype(np.float32) for _ in range(2)])
    sd = source.state_dict()
    qmap = custom_signed_map()
    values = fastadam.dequantize_blockwise(fastadam.QuantizedState(
        *(sd["state"][0]["exp_avg" + part] for part in ("_codes", "_absmax", "_map"))))
    for part in ("_codes", "_absmax", "_map"):
        del sd["state"][0]["exp_avg" + part]
    sd["state"][0]["exp_avg"] = values
    reencoded = fastadam.QuantizedState(np.empty(5000, np.uint8), np.empty(20, np.float32), qmap)
    fastadam.quantize_blockwise(fastadam.dequantize_blockwise(fastadam.QuantizedState(
        *(sd["state"][1]["exp_avg" + part] for part in ("_codes", "_absmax", "_map")))), reencoded)
    sd["state"][1].update(exp_avg_codes=reencoded.codes, exp_avg_absmax=reencoded.absmax, exp_avg_map=qmap)
    new = fastadam.Adam([p.copy() for p in params], state_dtype="int8")
    new.load_state_dict(sd)
    expected = fastadam.QuantizedState(np.empty(5000, np.uint8), np.empty(20, np.float32), qmap)
    fastadam.reference.quantize_blockwise(values, expected)
    assert_bitwise_equal(new.state[0]["exp_avg_map"], qmap)
    assert_bitwise_equal(new.state[0]["exp_avg_codes"], expected.codes)
    assert_bitwise_equal(new.state[0]["exp_avg_absmax"], expected.absmax)
    assert_bitwise_equal(new.state[1]["exp_avg_codes"], reencoded.codes)


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
    before = [p.copy(), copy_state(bad), copy_state(v)]
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

