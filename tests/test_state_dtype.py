"""bfloat16 moments: half the optimizer state, bitwise equal to fastadam.reference.

A float32 param's exp_avg and exp_avg_sq (and amsgrad's max_exp_avg_sq, stored
as exp_avg_sq is) may be bfloat16 arrays.  Each step widens them exactly to
float32, runs the float32 update, and rounds them back to nearest-even -- per
element, so tile boundaries, thread counts and ISA levels cannot change a
bit (test_isa_levels.py runs this file under every level the CPU has).
"""

from __future__ import annotations

import numpy as np
import pytest

import fastadam
from conftest import OPTIONS, assert_bitwise_equal, make_problem, option_id

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
HYPER = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-8)
# Around the vector widths, the 512-element tiles and the 4096 default of min_compressed_size.
SIZES = [0, 1, 7, 255, 256, 257, 511, 513, 4095, 4096, 4097, (1 << 20) + 3]
#: (exp_avg's storage, exp_avg_sq's storage)
PAIRS = [(BF16, BF16), (BF16, np.float32), (np.float32, BF16)]


def pair_id(pair) -> str:
    return "m-{}_v-{}".format(*(np.dtype(d).name for d in pair))


def compressed_problem(size, pair, rng, amsgrad=False, special=False):
    pr = make_problem(size, np.float32, rng, amsgrad=amsgrad)
    if special and size:  # NaN, inf and subnormal gradients where there is room
        pr.grad.flat[::7] = np.nan
        pr.grad.flat[3::11] = np.inf
        pr.grad.flat[5::13] = np.float32(1e-41)
    pr.exp_avg = pr.exp_avg.astype(pair[0])
    pr.exp_avg_sq = pr.exp_avg_sq.astype(pair[1])
    if amsgrad:
        pr.max_exp_avg_sq = pr.max_exp_avg_sq.astype(pair[1])
    return pr


def step_both(actual, expected, step, num_threads, **options):
    fastadam.adam_step(actual.param, actual.grad, actual.exp_avg, actual.exp_avg_sq,
                       max_exp_avg_sqs=actual.max_exp_avg_sq, step=step, num_threads=num_threads, **HYPER, **options)
    fastadam.reference.adam_step(expected.param, expected.grad, expected.exp_avg, expected.exp_avg_sq,
                                 max_exp_avg_sqs=expected.max_exp_avg_sq, step=step, **HYPER, **options)


def assert_same(actual, expected):
    for name in ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        a = getattr(actual, name)
        if a is not None:
            assert a.dtype == getattr(expected, name).dtype
            assert_bitwise_equal(a, getattr(expected, name), name)


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
@pytest.mark.parametrize("options", OPTIONS, ids=option_id)
@pytest.mark.parametrize("size", SIZES)
def test_every_step_is_bitwise_the_reference_at_1_2_and_3_threads(size, options, pair, rng):
    expected = compressed_problem(size, pair, rng, amsgrad=options["amsgrad"])
    for step, threads in zip((1, 2, 3), (1, 2, 3)):
        actual = expected.copy()
        step_both(actual, expected, step, threads, **options)
        assert_same(actual, expected)


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
@pytest.mark.parametrize("options", OPTIONS[::3], ids=option_id)
def test_nan_inf_and_subnormal_gradients_match_the_reference(options, pair, rng):
    expected = compressed_problem(5000, pair, rng, amsgrad=options["amsgrad"], special=True)
    actual = expected.copy()
    step_both(actual, expected, 4, 2, **options)
    assert_same(actual, expected)
    # A NaN gradient spoils only its own element: bfloat16 moments are per element, never per block.
    finite = np.isfinite(expected.grad)
    assert np.isfinite(actual.exp_avg.astype(np.float32)[finite]).all()


def test_a_list_mixing_storages_is_one_call_and_still_bitwise(rng):
    problems = [compressed_problem(n, pair, rng) for n, pair in zip((70_001, 3, 9000), PAIRS)]
    problems.append(make_problem(40_000, np.float64, rng))
    expected = [pr.copy() for pr in problems]
    fastadam.adam_step(*[[getattr(pr, f) for pr in problems] for f in ("param", "grad", "exp_avg", "exp_avg_sq")],
                       step=5, num_threads=3, **HYPER)
    for e in expected:
        fastadam.reference.adam_step(e.param, e.grad, e.exp_avg, e.exp_avg_sq, step=5, **HYPER)
    for a, e in zip(problems, expected):
        assert_same(a, e)


def test_master_weights_with_a_bfloat16_model_and_bfloat16_moments(rng):
    # master 4 + model 2 + moments 2 + 2 bytes per parameter
    expected = compressed_problem(10_000, (BF16, BF16), rng)
    expected.grad = expected.grad.astype(BF16)
    model_e = expected.param.astype(BF16)
    actual, model_a = expected.copy(), model_e.copy()
    fastadam.adam_step(actual.param, actual.grad, actual.exp_avg, actual.exp_avg_sq, model_params=model_a,
                       step=2, grad_scale=1024.0, **HYPER)
    fastadam.reference.adam_step(expected.param, expected.grad, expected.exp_avg, expected.exp_avg_sq,
                                 model_params=model_e, step=2, grad_scale=1024.0, **HYPER)
    assert_same(actual, expected)
    assert_bitwise_equal(model_a, model_e, "model")


def test_row_sparse_steps_update_only_their_rows_of_bfloat16_moments(rng):
    table = rng.standard_normal((3000, 48)).astype(np.float32)
    opt = fastadam.SparseAdam([table], state_dtype="bfloat16")
    m_before = opt.state[0]["exp_avg"].copy()
    rows = np.array([5, 2999, 5, 17])
    values = rng.standard_normal((4, 48)).astype(np.float32)
    expected = [table.copy(), m_before.copy(), opt.state[0]["exp_avg_sq"].copy()]

    opt.step([fastadam.RowSparseGrad(rows, values)])
    fastadam.reference.sparse_adam_step(*expected[:1], rows, values, *expected[1:], step=1)

    assert_bitwise_equal(table, expected[0], "param")
    assert_bitwise_equal(opt.state[0]["exp_avg"], expected[1], "exp_avg")
    untouched = np.setdiff1d(np.arange(3000), rows)
    assert_bitwise_equal(opt.state[0]["exp_avg"][untouched], m_before[untouched], "rows not named")


# -- the optimizers ------------------------------------------------------------------------------------------

def test_state_dtype_compresses_float32_params_of_at_least_min_compressed_size(rng):
    params = [np.zeros(4096, np.float32), np.zeros(4095, np.float32), np.zeros(10_000, np.float64)]
    opt = fastadam.Adam(params, state_dtype=("bfloat16", "float32"), amsgrad=True)
    dtypes = [{key: a.dtype.name for key, a in s.items()} for s in opt.state]
    assert dtypes == [{"exp_avg": "bfloat16", "exp_avg_sq": "float32", "max_exp_avg_sq": "float32"},
                      {"exp_avg": "float32", "exp_avg_sq": "float32", "max_exp_avg_sq": "float32"},
                      {"exp_avg": "float64", "exp_avg_sq": "float64", "max_exp_avg_sq": "float64"}]
    assert fastadam.Adam([params[1]], state_dtype="bfloat16", min_compressed_size=0).state[0]["exp_avg"].dtype == BF16


def test_bfloat16_state_takes_half_the_bytes(rng):
    p = np.zeros(1 << 16, np.float32)
    full = sum(a.nbytes for a in fastadam.Adam([p]).state[0].values())
    half = sum(a.nbytes for a in fastadam.Adam([p], state_dtype="bfloat16").state[0].values())
    assert (full, half) == (8 * p.size, 4 * p.size)


def test_the_optimizers_bfloat16_moments_start_apart_modulo_4_kib():
    # NumPy places large arrays alike modulo 4 KiB; moments walked in lockstep at the same offset halved the
    # bfloat16 step's speed at 2^26 params (README: "Optimizer state in bfloat16").  Each starts 256 bytes on.
    p = np.zeros((300, 70), np.float32)
    s = fastadam.Adam([p], state_dtype="bfloat16", amsgrad=True).state[0]
    offsets = [s[key].ctypes.data % 4096 for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")]
    assert len(set(offsets)) == 3, offsets
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        a = s[key]
        assert a.shape == p.shape and a.dtype == BF16 and a.flags.c_contiguous and a.flags.writeable
        assert not np.any(a.view(np.uint16))  # zeros


@pytest.mark.parametrize("cls", [fastadam.Adam, fastadam.AdamW])
def test_the_optimizer_steps_exactly_as_the_functional_reference(cls, rng):
    params = [rng.standard_normal((70, 90)).astype(np.float32), rng.standard_normal(5000).astype(np.float32)]
    expected = [p.copy() for p in params]
    opt = cls(params, state_dtype="bfloat16", amsgrad=True)
    state = [[np.zeros(p.shape, BF16) for _ in range(3)] for p in params]
    decay = dict(weight_decay=1e-2, decoupled_weight_decay=True) if cls is fastadam.AdamW else {}
    for step in range(1, 6):
        grads = [rng.standard_normal(p.shape).astype(np.float32) for p in params]
        opt.step(grads)
        for e, g, (m, v, mx) in zip(expected, grads, state):
            fastadam.reference.adam_step(e, g, m, v, max_exp_avg_sqs=mx, amsgrad=True, step=step, **decay)
    for p, e, s, (m, v, mx) in zip(params, expected, opt.state, state):
        assert_bitwise_equal(p, e)
        for key, ref in zip(("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), (m, v, mx)):
            assert_bitwise_equal(s[key], ref, key)


@pytest.mark.parametrize("how", ["state_dict", "npz"])
def test_resuming_gives_the_bitwise_trajectory_of_an_uninterrupted_run(how, rng, tmp_path):
    start = [rng.standard_normal(6000).astype(np.float32), rng.standard_normal((3, 4)).astype(np.float32)]
    grads = [[rng.standard_normal(p.shape).astype(np.float32) for p in start] for _ in range(8)]
    straight = [p.copy() for p in start]
    opt = fastadam.Adam(straight, state_dtype="bfloat16")
    for g in grads:
        opt.step(g)

    resumed = [p.copy() for p in start]
    first = fastadam.Adam(resumed, state_dtype="bfloat16")
    for g in grads[:4]:
        first.step(g)
    second = fastadam.Adam(resumed, state_dtype="bfloat16")
    if how == "npz":
        first.save(tmp_path / "ckpt")
        second.load(tmp_path / "ckpt")
    else:
        second.load_state_dict(first.state_dict())
    for g in grads[4:]:
        second.step(g)

    for a, b in zip(resumed, straight):
        assert_bitwise_equal(a, b)
    assert_bitwise_equal(second.state[0]["exp_avg_sq"], opt.state[0]["exp_avg_sq"])


def test_the_npz_holds_bfloat16_state_as_its_uint16_bits(rng, tmp_path):
    opt = fastadam.Adam([rng.standard_normal(5000).astype(np.float32)], state_dtype="bfloat16")
    opt.step([np.ones(5000, np.float32)])
    opt.save(tmp_path / "ckpt")
    with np.load(tmp_path / "ckpt.npz", allow_pickle=False) as f:
        assert f["state/0/exp_avg"].dtype == np.uint16
        np.testing.assert_array_equal(f["state/0/exp_avg"], opt.state[0]["exp_avg"].view(np.uint16))


def test_a_live_optimizers_state_converts_between_float32_and_bfloat16(rng):
    p = rng.standard_normal(8192).astype(np.float32)
    full = fastadam.Adam([p.copy()])
    full.step([rng.standard_normal(8192).astype(np.float32)])

    compressed = fastadam.Adam([p.copy()], state_dtype="bfloat16")
    compressed.load_state_dict(full.state_dict())  # float32 -> bfloat16: rounded to nearest-even
    assert_bitwise_equal(compressed.state[0]["exp_avg"], full.state[0]["exp_avg"].astype(BF16))
    back = fastadam.Adam([p.copy()])
    back.load_state_dict(compressed.state_dict())  # bfloat16 -> float32: exact
    assert_bitwise_equal(back.state[0]["exp_avg"], compressed.state[0]["exp_avg"].astype(np.float32))
    assert back.steps == [1]


@pytest.mark.parametrize("state_dtype", ["int2", "float16", ("bfloat16",), None])
def test_an_unsupported_state_dtype_is_refused(state_dtype):
    with pytest.raises(ValueError, match=r"state_dtype must be one of \('float32', 'bfloat16', 'int8', 'int4'\)"):
        fastadam.Adam([np.zeros(5, np.float32)], state_dtype=state_dtype)


# -- bad input: a clear error, nothing changed ---------------------------------------------------------------

@pytest.mark.parametrize("mutate,match", [
    (lambda pr: setattr(pr, "exp_avg", pr.exp_avg.astype(np.float16)),
     r"exp_avgs\[0\]: a moment may be float32, float64 or bfloat16, not float16"),
    (lambda pr: setattr(pr, "max_exp_avg_sq", pr.max_exp_avg_sq.astype(np.float32)),
     r"max_exp_avg_sqs\[0\]: must be stored as exp_avg_sqs\[0\] is \(bfloat16\), got float32"),
    (lambda pr: setattr(pr, "exp_avg_sq", pr.exp_avg_sq[:-1]),
     r"exp_avg_sqs\[0\]: shape"),
])
def test_a_state_of_the_wrong_storage_or_shape_is_refused_and_nothing_changes(mutate, match, rng):
    pr = compressed_problem(300, (BF16, BF16), rng, amsgrad=True)
    mutate(pr)
    before = pr.copy()
    with pytest.raises((TypeError, ValueError), match=match):
        fastadam.adam_step([pr.param], [pr.grad], [pr.exp_avg], [pr.exp_avg_sq], max_exp_avg_sqs=[pr.max_exp_avg_sq],
                           amsgrad=True, step=1)
    assert_same(pr, before)


def test_bfloat16_moments_need_a_float32_param(rng):
    p = np.zeros(10)
    with pytest.raises(TypeError, match=r"exp_avgs: a bfloat16 moment needs a float32 param, and params is float64"):
        fastadam.adam_step(p, p.copy(), np.zeros(10, BF16), p.copy(), step=1)


# -- stochastic rounding -------------------------------------------------------------------------------------

@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
@pytest.mark.parametrize("options", OPTIONS[::2], ids=option_id)
@pytest.mark.parametrize("size", [1, 7, 513, 4097, (1 << 20) + 3])
def test_stochastic_rounding_is_bitwise_the_reference_at_any_thread_count(size, options, pair, rng):
    expected = compressed_problem(size, pair, rng, amsgrad=options["amsgrad"])
    for step, threads in zip((1, 2, 3), (1, 3, 2)):
        actual = expected.copy()
        rounding = dict(stochastic_rounding=True, rounding_seed=1234)
        fastadam.adam_step(actual.param, actual.grad, actual.exp_avg, actual.exp_avg_sq,
                           max_exp_avg_sqs=actual.max_exp_avg_sq, step=step, num_threads=threads, **rounding,
                           **HYPER, **options)
        fastadam.reference.adam_step(expected.param, expected.grad, expected.exp_avg, expected.exp_avg_sq,
                                     max_exp_avg_sqs=expected.max_exp_avg_sq, step=step, **rounding, **HYPER,
                                     **options)
        assert_same(actual, expected)


def test_stochastic_rounding_rounds_up_in_proportion_to_the_distance_and_nearest_even_never_does():
    # With beta1 = 0 the new exp_avg is the gradient, 1 + 2**-10: an eighth of the way from the bfloat16
    # 1.0 to the next, 1 + 2**-7.  Stochastic rounding makes it 1 + 2**-7 with probability 1/8.
    n = 1 << 17
    g = np.full(n, 1 + 2.0**-10, np.float32)
    stored = {}
    for rounding in (False, True):
        p, m, v = np.zeros(n, np.float32), np.zeros(n, BF16), np.zeros(n, BF16)
        fastadam.adam_step(p, g, m, v, step=1, betas=(0.0, 0.999), stochastic_rounding=rounding, rounding_seed=7)
        stored[rounding] = m.astype(np.float64)
    assert set(np.unique(stored[False])) == {1.0}
    assert set(np.unique(stored[True])) == {1.0, 1 + 2.0**-7}
    up = np.mean(stored[True] > 1.0)
    assert abs(up - 1 / 8) < 5 * np.sqrt(1 / 8 * 7 / 8 / n)  # within 5 standard deviations
    assert abs(stored[True].mean() - (1 + 2.0**-10)) < 2.0**-12  # unbiased, where nearest-even is 2**-10 off


def test_stochastic_rounding_depends_on_the_seed_and_the_step_only(rng):
    start = compressed_problem(5000, (BF16, BF16), rng)
    results = {}
    for seed, step in [(1, 3), (1, 3), (2, 3), (1, 4)]:
        pr = start.copy()
        fastadam.adam_step(pr.param, pr.grad, pr.exp_avg, pr.exp_avg_sq, step=step, stochastic_rounding=True,
                           rounding_seed=seed, num_threads=1 + seed % 2, **HYPER)
        results.setdefault((seed, step), []).append(pr.exp_avg.view(np.uint16).copy())
    np.testing.assert_array_equal(*results[(1, 3)])
    assert not np.array_equal(results[(1, 3)][0], results[(2, 3)][0])
    assert not np.array_equal(results[(1, 3)][0], results[(1, 4)][0])


def test_the_optimizer_with_stochastic_rounding_resumes_bitwise(rng, tmp_path):
    start = [rng.standard_normal(6000).astype(np.float32), rng.standard_normal(9000).astype(np.float32)]
    grads = [[rng.standard_normal(p.shape).astype(np.float32) for p in start] for _ in range(6)]
    options = dict(state_dtype="bfloat16", stochastic_rounding=True, rounding_seed=99)
    straight = [p.copy() for p in start]
    opt = fastadam.AdamW(straight, **options)
    for g in grads:
        opt.step(g)
    resumed = [p.copy() for p in start]
    first = fastadam.AdamW(resumed, **options)
    for g in grads[:3]:
        first.step(g)
    first.save(tmp_path / "ckpt")
    second = fastadam.AdamW(resumed, **options)
    second.load(tmp_path / "ckpt")
    for g in grads[3:]:
        second.step(g)
    for a, b in zip(resumed, straight):
        assert_bitwise_equal(a, b)
    # and it is the functional step keyed by each param's position
    expected = [p.copy() for p in start]
    state = [[np.zeros(p.shape, BF16) for _ in range(2)] for p in start]
    for step, g in enumerate(grads, 1):
        for i, (p, gi, (m, v)) in enumerate(zip(expected, g, state)):
            fastadam.reference.adam_step([np.zeros(0, np.float32)] * i + [p], [np.zeros(0, np.float32)] * i + [gi],
                                         [np.zeros(0, BF16)] * i + [m], [np.zeros(0, BF16)] * i + [v], step=step,
                                         weight_decay=1e-2, decoupled_weight_decay=True, stochastic_rounding=True,
                                         rounding_seed=99)
    for a, e in zip(straight, expected):
        assert_bitwise_equal(a, e)


@pytest.mark.parametrize("seed,error", [(-1, ValueError), (1.5, TypeError), (2**64, (ValueError, OverflowError))])
def test_a_bad_rounding_seed_is_refused(seed, error):
    p = np.zeros(4, np.float32)
    with pytest.raises(error, match="rounding_seed"):
        fastadam.adam_step(p, p.copy(), p.copy(), p.copy(), step=1, stochastic_rounding=True, rounding_seed=seed)


def test_the_reference_carries_the_element_index_past_2_to_the_32():
    # The kernel builds a 64-bit element index from two 32-bit words; the reference states the same rule.
    x = np.full(4, 1 + 2.0**-10, np.float32)
    first = 2**32 - 2
    key = fastadam.reference.rounding_key(5, 1, 0)
    whole = fastadam.reference.stochastic_round_bfloat16(x, key, first)
    parts = [fastadam.reference.stochastic_round_bfloat16(x[i:i + 1], key, first + i) for i in range(4)]
    np.testing.assert_array_equal(whole.view(np.uint16), np.concatenate(parts).view(np.uint16))


@pytest.mark.slow
def test_every_float32_rounds_into_a_bfloat16_moment_as_the_scalar_definition_says():
    # With beta1 = 0 and exp_avg = -0.0 the new exp_avg is (1 - 0) * g + 0 * -0.0 = g exactly (signed zeros
    # included; a NaN comes out quiet), so the bfloat16 moment the step stores is g rounded: all 2^32 float32
    # bit patterns go through the step's own store (AVX2: shuffles, no shifts; a NaN found by a branch), in
    # chunks, against the definition: round to nearest-even, NaN kept as a quiet NaN of the same sign.
    chunk = 1 << 24
    param, v = np.zeros(chunk, np.float32), np.zeros(chunk, BF16)
    m = np.empty(chunk, BF16)
    offsets = np.arange(chunk, dtype=np.uint32)
    bits, high, expected = (np.empty(chunk, np.uint32) for _ in range(3))
    for start in range(0, 1 << 32, chunk):
        np.add(offsets, np.uint32(start), out=bits)
        m.view(np.uint16)[...] = 0x8000
        fastadam.adam_step(param, bits.view(np.float32), m, v, step=1, lr=0.0, betas=(0.0, 0.999), eps=1e-8)
        np.right_shift(bits, 16, out=high)
        np.bitwise_and(high, 1, out=expected)
        expected += bits
        expected += 0x7FFF
        expected >>= 16  # to nearest, ties to even
        nan = (bits & 0x7FFFFFFF) > 0x7F800000
        high |= 0x40
        np.copyto(expected, high, where=nan)  # a NaN: its top 16 bits, made quiet
        mismatch = np.flatnonzero(m.view(np.uint16) != expected)
        assert mismatch.size == 0, (f"{mismatch.size} differ; first: float bits {bits[mismatch[0]]:#010x} -> "
                                    f"{m.view(np.uint16)[mismatch[0]]:#06x}, expected {expected[mismatch[0]]:#06x}")
