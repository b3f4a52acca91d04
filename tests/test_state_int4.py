"""4-bit block-wise state (Li et al., NeurIPS 2023): an eighth of float32's state, bitwise equal to the reference.

A moment in 4-bit state is a ``fastadam.QuantizedState(codes, absmax, map)`` whose map has 16 values:
``codes`` is a flat uint8 array holding two codes per byte (element ``2k`` in the low four bits of byte ``k``,
``2k + 1`` in the high four), ``absmax`` one float32 per block of 128 elements.  The first moment uses the
signed dynamic map at 4 bits, the second the linear map without zero, ``(k + 1) / 16``.  Codes are the
nearest map value to ``x / absmax``, ties to the lower code, as for 8-bit state.  test_isa_levels.py runs
this file under every level the CPU has.
"""

from __future__ import annotations

import io

import numpy as np
import pytest

import fastadam
from conftest import assert_bitwise_equal, assert_states_equal, copy_state
from fastadam import QuantizedState, dynamic_map, linear_map
from fastadam import reference

HYPER = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-8)
SIGNED4, LINEAR4 = dynamic_map(signed=True, bits=4), linear_map(4)
SIZES = [0, 1, 2, 127, 128, 129, 255, 256, 257, 4095, 4096, 4097, (1 << 20) + 3]


def empty_state(size: int, qmap: np.ndarray) -> QuantizedState:
    return QuantizedState(np.zeros(-(-size // 2), np.uint8), np.zeros(-(-size // 128), np.float32), qmap)


def quantized(x: np.ndarray, qmap: np.ndarray) -> QuantizedState:
    state = empty_state(x.size, qmap)
    reference.quantize_blockwise(x, state)
    return state


def unpacked(codes: np.ndarray) -> np.ndarray:
    return np.stack([codes & 0xF, codes >> 4], axis=1).reshape(-1)


# -- the maps --------------------------------------------------------------------------------------------------

def test_the_4_bit_maps_are_li_et_als():
    # The signed dynamic map keeps the top three decades of the 8-bit one's rule: 1, 2 and 4 values.
    expected = [0.0055, 0.0325, 0.0775, 0.2125, 0.4375, 0.6625, 0.8875]
    np.testing.assert_array_equal(SIGNED4, np.array([-x for x in expected[::-1]] + [0.0] + expected + [1.0],
                                                     np.float32))
    np.testing.assert_array_equal(LINEAR4, np.arange(1, 17, dtype=np.float32) / 16)
    assert 0.0 not in LINEAR4  # a small v reads back as absmax / 16, never 0
    assert reference.null_code(SIGNED4) == 7 and reference.null_code(LINEAR4) == 0


def test_maps_of_other_sizes_are_refused():
    with pytest.raises(ValueError, match="bits must be 8, or 4 with signed=True"):
        dynamic_map(signed=False, bits=4)
    with pytest.raises(ValueError, match="bits must be 4"):
        linear_map(8)


# -- the quantizer -----------------------------------------------------------------------------------------------

def hostile_values(size: int, rng: np.random.Generator, nonnegative: bool = False) -> np.ndarray:
    x = (rng.standard_normal(size) * np.exp(rng.uniform(-30, 5, size))).astype(np.float32)
    special = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-40, -1e-45, 3e38]
    x[:min(size, len(special))] = special[:size]
    return np.abs(x) if nonnegative else x


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("qmap", [SIGNED4, LINEAR4], ids=["signed", "linear"])
def test_quantize_and_dequantize_are_bitwise_the_reference(size, qmap, rng):
    x = hostile_values(size, rng)
    expected = quantized(x, qmap)
    for threads in (1, 2, 3):
        ours = QuantizedState(np.full(-(-size // 2), 0xA5, np.uint8), np.full(-(-size // 128), -1, np.float32), qmap)
        fastadam.quantize_blockwise(x, ours, num_threads=threads)
        assert_states_equal(ours, expected, f"{threads} threads")
        out = np.full(size, np.nan, np.float32)
        fastadam.dequantize_blockwise(ours, out, num_threads=threads)
        assert_bitwise_equal(out, reference.dequantize_blockwise(expected, (size,)))


def test_the_linear_map_is_coded_by_arithmetic_and_a_nudged_one_by_compares(rng):
    assert fastadam._core.codebook_layout(LINEAR4)["linear"]
    assert not fastadam._core.codebook_layout(SIGNED4)["linear"]
    nudged = LINEAR4.copy()
    nudged[5] = np.nextafter(nudged[5], np.float32(1))
    assert not fastadam._core.codebook_layout(nudged)["linear"]
    x = hostile_values(4097, rng)
    ours = empty_state(x.size, nudged)
    fastadam.quantize_blockwise(x, ours)
    assert_states_equal(ours, quantized(x, nudged), "nudged map")


def test_codes_pack_two_to_a_byte_and_an_odd_size_leaves_the_last_high_nibble_zero():
    x = np.array([0.0, 1.0, -1.0], np.float32)  # codes 7, 15, 0 of the signed map
    state = empty_state(3, SIGNED4)
    fastadam.quantize_blockwise(x, state)
    assert state.codes.tolist() == [7 | 15 << 4, 0]
    assert state.absmax.tolist() == [1.0]


def test_a_nan_or_inf_element_takes_the_code_nearest_zero_and_leaves_its_block_scaled():
    x = np.linspace(-2, 2, 128, dtype=np.float32)
    x[[3, 90]] = [np.nan, np.inf]
    for qmap, nearest_zero in ((SIGNED4, 0.0), (LINEAR4, 1 / 16)):
        state = empty_state(128, qmap)
        fastadam.quantize_blockwise(x, state)
        assert state.absmax[0] == 2.0
        values = np.empty(128, np.float32)
        fastadam.dequantize_blockwise(state, values)
        assert values[3] == values[90] == nearest_zero * 2.0


def test_the_kernels_code_is_the_nearest_map_value_around_every_midpoint():
    for qmap in (SIGNED4, LINEAR4):
        midpoints = ((qmap[:-1].astype(np.float64) + qmap[1:].astype(np.float64)) / 2).astype(np.float32)
        y = (midpoints.view(np.int32)[:, None] + np.arange(-40, 41, dtype=np.int32)).reshape(-1).view(np.float32)
        y = np.concatenate([[np.float32(1.0)], y[np.abs(y) <= 1.0]])  # led by 1.0: absmax 1, x / absmax = x
        codes = np.empty(y.size, np.int64)
        for start in range(0, y.size, 127):  # each block led by 1.0
            block = np.concatenate([[np.float32(1.0)], y[start:start + 127]])
            s = empty_state(block.size, qmap)
            fastadam.quantize_blockwise(block, s)
            codes[start:start + 127] = unpacked(s.codes)[1:block.size]
        distance = np.abs(qmap.astype(np.float64)[None, :] - y.astype(np.float64)[:, None])
        np.testing.assert_array_equal(codes, np.argmin(distance, axis=1))  # the first minimum: the lower code


@pytest.mark.slow
@pytest.mark.parametrize("qmap", [SIGNED4, LINEAR4], ids=["signed", "linear"])
def test_every_float32_in_minus_1_to_1_gets_the_nearest_code(qmap):
    # All 2,130,706,434 float32 of [-1, 1], in blocks whose absmax is 1.0 (so that x / absmax is x), against
    # the number of (float64, exact) midpoints below each: walking the bit patterns of one sign upwards, the
    # codes must agree at every chunk's ends and move by exactly one at the bits just past each midpoint.
    midpoints = (qmap[:-1].astype(np.float64) + qmap[1:].astype(np.float64)) / 2
    one = int(np.float32(1.0).view(np.uint32))
    chunk = 127 << 17
    for sign in (0, 0x80000000):
        # Codes fall as the magnitude of a negative y grows, and rise for a positive one.
        direction = -1 if sign else 1
        for first in range(0, one + 1, chunk):
            stop = min(first + chunk, one + 1)
            count = stop - first
            blocks = -(-count // 127)
            bits = np.zeros((blocks, 128), np.uint32)
            bits[:, 0] = one
            body = np.zeros(blocks * 127, np.uint32)
            body[:count] = np.arange(first, stop, dtype=np.uint32) | np.uint32(sign)
            bits[:, 1:] = body.reshape(blocks, 127)
            state = empty_state(bits.size, qmap)
            fastadam.quantize_blockwise(bits.view(np.float32).reshape(-1), state)
            assert np.all(state.absmax == 1.0)
            codes = unpacked(state.codes).reshape(blocks, 128)[:, 1:].reshape(-1)[:count].astype(np.int16)
            ys = body[[0, count - 1]].view(np.float32).astype(np.float64)
            assert codes[[0, -1]].tolist() == np.searchsorted(midpoints, ys, side="left").tolist(), (sign, first)
            moves = np.diff(codes) * direction
            assert np.all(moves >= 0), (sign, first)
            where = np.flatnonzero(moves)
            # Each move: the exact count of midpoints between the two neighbouring floats.
            lo = body[where].view(np.float32).astype(np.float64)
            hi = body[where + 1].view(np.float32).astype(np.float64)
            crossed = np.abs(np.searchsorted(midpoints, hi, side="left") - np.searchsorted(midpoints, lo, side="left"))
            np.testing.assert_array_equal(moves[where], crossed)
            assert moves.sum() == abs(int(codes[-1]) - int(codes[0]))


# -- the step ------------------------------------------------------------------------------------------------------

def problem(size, rng, amsgrad=False, first=SIGNED4, second=LINEAR4):
    p = rng.standard_normal(size).astype(np.float32)
    g = hostile_values(size, rng)
    m = quantized(rng.standard_normal(size).astype(np.float32) * 0.1, first)
    v = quantized(rng.random(size).astype(np.float32) * 0.01, second)
    vmax = quantized(rng.random(size).astype(np.float32) * 0.02, second) if amsgrad else None
    return p, g, m, v, vmax


OPTIONS = [dict(amsgrad=False), dict(amsgrad=True), dict(amsgrad=False, maximize=True),
           dict(amsgrad=False, weight_decay=0.1), dict(amsgrad=True, weight_decay=0.1, decoupled_weight_decay=True),
           dict(amsgrad=False, eps_before_bias_correction=True), dict(amsgrad=False, grad_scale=1024.0)]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_every_step_is_bitwise_the_reference_at_1_2_and_3_threads(size, options, rng):
    p, g, m, v, vmax = problem(size, rng, options["amsgrad"])
    expected = [p.copy(), copy_state(m), copy_state(v), copy_state(vmax)]
    for step, threads in ((1, 1), (2, 2), (3, 3)):
        fastadam.adam_step(p, g, m, v, max_exp_avg_sqs=vmax, step=step, num_threads=threads, **HYPER, **options)
        reference.adam_step(expected[0], g, expected[1], expected[2], max_exp_avg_sqs=expected[3], step=step,
                            **HYPER, **options)
    assert_bitwise_equal(p, expected[0], "param")
    for name, a, e in zip(("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), (m, v, vmax), expected[1:]):
        if a is not None:
            assert_states_equal(a, e, name)


@pytest.mark.parametrize("storages", [("int4", "int8"), ("int8", "int4"), ("int4", "float32"), ("float32", "int4")])
def test_4_bit_state_pairs_with_8_bit_and_float32_moments(storages, rng):
    size = 5000
    maps = {"int4": (SIGNED4, LINEAR4), "int8": (dynamic_map(True), dynamic_map(False))}

    def moment(kind, k, x):
        if kind == "float32":
            return x.copy()
        qmap = maps[kind][k]
        state = (empty_state(size, qmap) if kind == "int4" else
                 QuantizedState(np.zeros(size, np.uint8), np.zeros(-(-size // 256), np.float32), qmap))
        reference.quantize_blockwise(x, state)
        return state

    p = rng.standard_normal(size).astype(np.float32)
    m = moment(storages[0], 0, rng.standard_normal(size).astype(np.float32) * 0.1)
    v = moment(storages[1], 1, rng.random(size).astype(np.float32) * 0.01)
    expected = [p.copy(), copy_state(m) if isinstance(m, tuple) else m.copy(),
                copy_state(v) if isinstance(v, tuple) else v.copy()]
    for step in (1, 2, 3):
        g = rng.standard_normal(size).astype(np.float32)
        fastadam.adam_step(p, g, m, v, step=step, num_threads=2, **HYPER)
        reference.adam_step(expected[0], g, expected[1], expected[2], step=step, **HYPER)
    assert_bitwise_equal(p, expected[0])
    for a, e in zip((m, v), expected[1:]):
        if isinstance(a, tuple):
            assert_states_equal(a, e, "moment")
        else:
            assert_bitwise_equal(a, e)


def test_a_nan_gradient_spoils_its_own_element_not_its_block(rng):
    p, g, m, v, _ = problem(1024, rng)
    g = rng.standard_normal(1024).astype(np.float32)
    g[[5, 300]] = [np.nan, np.inf]
    expected = [p.copy(), copy_state(m), copy_state(v)]
    fastadam.adam_step(p, g, m, v, step=2, **HYPER)
    reference.adam_step(expected[0], g, expected[1], expected[2], step=2, **HYPER)
    assert_bitwise_equal(p, expected[0])
    assert_states_equal(m, expected[1], "exp_avg")
    assert np.isnan(p[5]) and np.isnan(p[300])  # the param shows it ...
    assert unpacked(m.codes)[5] == unpacked(m.codes)[300] == 7  # ... exp_avg stores 0 ...
    assert np.all(np.isfinite(m.absmax)) and np.all(np.isfinite(v.absmax))  # ... and the blocks keep a scale
    assert np.all(np.isfinite(np.delete(p, [5, 300])))


# -- the optimizer ---------------------------------------------------------------------------------------------

def test_adam_keeps_int4_state_in_about_one_byte_per_param(rng):
    big, small = rng.standard_normal((300, 70)).astype(np.float32), np.zeros(100, np.float32)
    opt = fastadam.AdamW([big, small], state_dtype="int4")
    s = opt.state[0]
    assert sorted(s) == sorted(f"{k}_{part}" for k in ("exp_avg", "exp_avg_sq") for part in ("codes", "absmax", "map"))
    assert s["exp_avg_codes"].shape == (10500,) and s["exp_avg_absmax"].shape == (165,)
    np.testing.assert_array_equal(s["exp_avg_map"], SIGNED4)
    np.testing.assert_array_equal(s["exp_avg_sq_map"], LINEAR4)
    assert sum(a.nbytes for a in s.values() if a.size != 16) / big.size < 1.07
    assert sorted(opt.state[1]) == ["exp_avg", "exp_avg_sq"]  # below min_compressed_size: float32


def test_the_optimizer_steps_as_the_functional_call_and_resumes_bitwise(rng):
    p0 = rng.standard_normal(9001).astype(np.float32)
    grads = [rng.standard_normal(9001).astype(np.float32) for _ in range(6)]
    whole = p0.copy()
    straight = fastadam.AdamW([whole], lr=1e-2, state_dtype="int4", amsgrad=True)
    for g in grads:
        straight.step([g])
    first_param = p0.copy()
    first = fastadam.AdamW([first_param], lr=1e-2, state_dtype="int4", amsgrad=True)
    for g in grads[:3]:
        first.step([g])
    buf = io.BytesIO()
    first.save(buf)
    buf.seek(0)
    param = first_param.copy()
    resumed = fastadam.AdamW([param], lr=1e-2, state_dtype="int4", amsgrad=True)
    resumed.load(buf)
    for g in grads[3:]:
        resumed.step([g])
    assert_bitwise_equal(param, whole)
    for key, a in straight.state[0].items():
        assert_bitwise_equal(resumed.state[0][key], a, key)


@pytest.mark.parametrize("into", ["float32", "int8", "int4", ("int4", "float32")])
def test_a_live_optimizer_converts_int4_state_to_and_from_other_storages(into, rng):
    p = rng.standard_normal(5000).astype(np.float32)
    src = fastadam.Adam([p.copy()], state_dtype="int4")
    for _ in range(2):
        src.step([rng.standard_normal(5000).astype(np.float32)])
    dst = fastadam.Adam([p.copy()], state_dtype=into)
    dst.load_state_dict(src.state_dict())
    for k, key in enumerate(("exp_avg", "exp_avg_sq")):
        saved = QuantizedState(*(src.state[0][key + part] for part in ("_codes", "_absmax", "_map")))
        values = reference.dequantize_blockwise(saved, (5000,))
        kind = into if isinstance(into, str) else into[k]
        if kind == "float32":
            assert_bitwise_equal(dst.state[0][key], values, key)
            continue
        mine = QuantizedState(*(dst.state[0][key + part] for part in ("_codes", "_absmax", "_map")))
        if kind == "int4":  # the same storage: loaded bitwise
            assert_states_equal(mine, saved, key)
            continue
        expected = copy_state(mine)
        reference.quantize_blockwise(values, expected)
        assert_states_equal(mine, expected, key)
    # ... and back: float32 moments into int4 state are quantized as a step stores them.
    back = fastadam.Adam([p.copy()], state_dtype="int4")
    back.load_state_dict(dst.state_dict())
    assert back.state[0]["exp_avg_codes"].shape == (2500,)


def test_sparse_adam_steps_rows_of_whole_4_bit_blocks(rng):
    table = rng.standard_normal((40, 256)).astype(np.float32)
    expected = table.copy()
    opt = fastadam.SparseAdam([table], state_dtype="int4", min_compressed_size=0)
    rows = np.array([3, 17, 3, 39])
    values = rng.standard_normal((4, 256)).astype(np.float32)
    opt.step([fastadam.RowSparseGrad(rows, values)])
    untouched = np.setdiff1d(np.arange(40), rows)
    assert_bitwise_equal(table[untouched], expected[untouched])  # the other rows' blocks are left be
    assert not np.array_equal(table[3], expected[3])
    narrow = fastadam.SparseAdam([np.zeros((40, 64), np.float32)], state_dtype="int4", min_compressed_size=0)
    with pytest.raises(ValueError, match="rows of a multiple of 128 elements with 4-bit state"):
        narrow.step([fastadam.RowSparseGrad(rows, np.ones((4, 64), np.float32))])


# -- bad input: a clear error, nothing changed -------------------------------------------------------------------

BAD_STATES = [
    (lambda s: s._replace(codes=np.zeros(4097, np.uint8)), ValueError,
     r"exp_avgs\[0\]\.codes: expected shape \(2049,\) \(4-bit codes, two per byte"),
    (lambda s: s._replace(absmax=np.zeros(17, np.float32)), ValueError,
     r"exp_avgs\[0\]\.absmax: expected 33 values \(one per block of 128 elements"),
    (lambda s: s._replace(map=SIGNED4[:15].copy()), ValueError,
     r"exp_avgs\[0\]\.map: expected 256 values \(8-bit codes\) or 16"),
    (lambda s: s._replace(map=SIGNED4[::-1].copy()), ValueError, r"exp_avgs\[0\]\.map: must hold 16 finite values in strictly"),
]


@pytest.mark.parametrize("spoil, error, message", BAD_STATES)
def test_a_bad_4_bit_state_is_refused_and_nothing_changes(spoil, error, message, rng):
    p, g, m, v, _ = problem(4097, rng)
    bad = spoil(m)
    before = [p.copy(), bad.codes.copy(), bad.absmax.copy(), v.codes.copy(), v.absmax.copy()]
    with pytest.raises(error, match=message):
        fastadam.adam_step([p], [g], [bad], [v], step=1)
    for a, b in zip([p, bad.codes, bad.absmax, v.codes, v.absmax], before):
        assert_bitwise_equal(a, b)


def test_front_ends_without_4_bit_state_say_so():
    with pytest.raises(TypeError, match="4-bit state has no probe"):
        fastadam._core.probe_step([np.zeros(256, np.float32)], [np.zeros(256, np.float32)],
                                  [empty_state(256, SIGNED4)], [empty_state(256, LINEAR4)])
    with pytest.raises(ValueError, match="4-bit state needs out"):
        fastadam.dequantize_blockwise(empty_state(10, SIGNED4))
