"""Row-sparse ("lazy") Adam for embedding tables: only the rows present in the gradient change."""

from __future__ import annotations

import numpy as np
import pytest

import fastadam
from conftest import assert_bitwise_equal

HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6)


def make_table(rows, row_shape, dtype, rng):
    shape = (rows, *row_shape)
    p = np.asarray(rng.standard_normal(shape), dtype)
    m = np.asarray(0.1 * rng.standard_normal(shape), dtype)
    v = np.asarray(np.abs(0.01 * rng.standard_normal(shape)), dtype)
    return p, m, v


def make_grad(rows, row_shape, dtype, rng, nnz):
    indices = rng.integers(0, rows, nnz)  # drawn with replacement: repeats
    values = np.asarray(rng.standard_normal((nnz, *row_shape)), dtype)
    return indices, values


@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("row_shape", [(), (7,), (64,), (3, 33)], ids=["1-D", "7", "64", "3x33"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_sparse_step_is_bitwise_equal_to_the_reference(dtype, row_shape, maximize, num_threads, rng):
    rows = 5000
    p, m, v = make_table(rows, row_shape, dtype, rng)
    indices, values = make_grad(rows, row_shape, dtype, rng, nnz=3000)
    expected = [a.copy() for a in (p, m, v)]

    fastadam.sparse_adam_step(p, indices, values, m, v, step=3, maximize=maximize, num_threads=num_threads,
                              **HYPER)
    fastadam.reference.sparse_adam_step(expected[0], indices, values, expected[1], expected[2], step=3,
                                        maximize=maximize, **HYPER)

    for actual, wanted in zip((p, m, v), expected):
        assert_bitwise_equal(actual, wanted)


def test_rows_not_in_the_gradient_are_not_touched_at_all(rng):
    p, m, v = make_table(1000, (16,), np.float32, rng)
    before = [a.copy() for a in (p, m, v)]
    indices = np.array([10, 500, 10, 999, 0])
    fastadam.sparse_adam_step(p, indices, np.ones((5, 16), np.float32), m, v, step=1)

    untouched = np.setdiff1d(np.arange(1000), indices)
    for actual, original in zip((p, m, v), before):
        assert_bitwise_equal(actual[untouched], original[untouched])  # not even m, v decay
        assert (actual[np.unique(indices)] != original[np.unique(indices)]).all()


def test_repeated_indices_are_summed_before_the_update(rng):
    p, m, v = make_table(10, (4,), np.float64, rng)
    twin = [a.copy() for a in (p, m, v)]
    g = np.asarray(rng.standard_normal((3, 4)))
    fastadam.sparse_adam_step(p, np.array([2, 2, 2]), g, m, v, step=1)
    fastadam.sparse_adam_step(twin[0], np.array([2]), (g[0] + g[1] + g[2])[None], twin[1], twin[2], step=1)
    for a, b in zip((p, m, v), twin):
        assert_bitwise_equal(a, b)


def test_a_100_step_trajectory_of_sparse_adam_matches_the_reference(rng):
    p, _, _ = make_table(2000, (32,), np.float32, rng)
    expected = [p.copy(), np.zeros_like(p), np.zeros_like(p)]  # the optimizer's state starts at zero
    opt = fastadam.SparseAdam([p], **HYPER)
    for step in range(1, 101):
        indices, values = make_grad(2000, (32,), np.float32, rng, nnz=200)
        opt.step([fastadam.RowSparseGrad(indices, values)])
        fastadam.reference.sparse_adam_step(expected[0], indices, values, expected[1], expected[2], step=step,
                                            **HYPER)
    for actual, wanted in zip((p, opt.state[0]["exp_avg"], opt.state[0]["exp_avg_sq"]), expected):
        assert_bitwise_equal(actual, wanted)


@pytest.mark.parametrize("options", [dict(), dict(amsgrad=True, weight_decay=0.1),
                                     dict(decoupled_weight_decay=True, weight_decay=0.1, maximize=True)],
                         ids=["adam", "amsgrad-l2", "adamw-maximize"])
def test_adam_step_with_a_row_sparse_gradient_updates_those_rows_with_adams_formula(options, rng):
    # A dense and a sparse parameter stepped together in one call.
    table, m_t, v_t = make_table(3000, (8,), np.float32, rng)
    dense = np.asarray(rng.standard_normal(100), np.float32)
    expected_table, expected_dense = table.copy(), dense.copy()
    opt = fastadam.Adam([table, dense], **HYPER, **options)
    state = {k: np.zeros_like(table) for k in ("m", "v", "vmax")}
    dense_state = {k: np.zeros_like(dense) for k in ("m", "v", "vmax")}

    for step in range(1, 6):
        indices, values = make_grad(3000, (8,), np.float32, rng, nnz=500)
        dense_grad = np.asarray(rng.standard_normal(100), np.float32)
        opt.step([fastadam.RowSparseGrad(indices, values), dense_grad])

        rows, summed = fastadam.reference.coalesce_rows(indices, values)
        sub = {k: a[rows] for k, a in state.items()}
        p_rows = expected_table[rows]
        fastadam.reference.adam_step(p_rows, summed, sub["m"], sub["v"], max_exp_avg_sqs=sub["vmax"], step=step,
                                     **HYPER, **options)
        expected_table[rows] = p_rows
        for k in state:
            state[k][rows] = sub[k]
        fastadam.reference.adam_step(expected_dense, dense_grad, dense_state["m"], dense_state["v"],
                                     max_exp_avg_sqs=dense_state["vmax"], step=step, **HYPER, **options)

    assert_bitwise_equal(table, expected_table)
    assert_bitwise_equal(opt.state[0]["exp_avg"], state["m"])
    assert_bitwise_equal(dense, expected_dense)


def test_an_empty_gradient_is_a_no_op(rng):
    p, m, v = make_table(100, (4,), np.float32, rng)
    before = p.copy()
    fastadam.sparse_adam_step(p, np.zeros(0, np.int64), np.zeros((0, 4), np.float32), m, v, step=1)
    assert_bitwise_equal(p, before)


@pytest.mark.parametrize("index_dtype", [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
                                         np.uint64])
def test_any_integer_dtype_and_stride_of_indices_works(index_dtype, rng):
    p, m, v = make_table(100, (4,), np.float32, rng)
    twin = [a.copy() for a in (p, m, v)]
    indices = np.array([5, 99, 5, 0, 42, 7], index_dtype)[::2]  # a strided view: [5, 5, 42]
    values = np.asarray(rng.standard_normal((3, 4)), np.float32)
    fastadam.sparse_adam_step(p, indices, values, m, v, step=1)
    fastadam.reference.sparse_adam_step(twin[0], indices.astype(np.int64), values, twin[1], twin[2], step=1)
    for a, b in zip((p, m, v), twin):
        assert_bitwise_equal(a, b)


# -- bad input ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("indices,values_rows,error,match", [
    ([3, 100, 7], 3, ValueError, r"indices\[1\] = 100 is out of range for a table of 100 rows"),
    ([3, 7, -1], 3, ValueError, r"indices\[2\] = -1 is out of range"),
    (np.array([1 << 40]), 1, ValueError, r"indices\[0\] = 1099511627776 is out of range"),
    (np.array([2**64 - 1], np.uint64), 1, ValueError, r"indices\[0\] = 18446744073709551615 is out of range"),
    (np.array([1.0, 2.0]), 2, TypeError, r"indices: expected a 1-D array of integer row numbers"),
    (np.array([True, False]), 2, TypeError, r"indices: expected a 1-D array of integer row numbers"),
    (np.array([[1, 2]]), 2, ValueError, r"values: shape must be \(len\(indices\),\) \+ param.shape\[1:\]"),
    ([1, 2, 3], 2, ValueError, r"values: shape must be"),
])
def test_bad_indices_are_refused_and_nothing_changes(indices, values_rows, error, match, rng):
    p, m, v = make_table(100, (4,), np.float32, rng)
    before = [a.copy() for a in (p, m, v)]
    values = np.ones((values_rows, 4), np.float32)
    with pytest.raises(error, match=match):
        fastadam.sparse_adam_step(p, np.asarray(indices), values, m, v, step=1)
    for a, b in zip((p, m, v), before):
        assert_bitwise_equal(a, b)


def test_values_of_the_wrong_dtype_or_row_shape_are_refused(rng):
    p, m, v = make_table(100, (4,), np.float32, rng)
    with pytest.raises(TypeError, match=r"values: dtype float64 does not match param's dtype float32"):
        fastadam.sparse_adam_step(p, np.array([1]), np.ones((1, 4)), m, v, step=1)
    with pytest.raises(ValueError, match=r"values: shape must be"):
        fastadam.sparse_adam_step(p, np.array([1]), np.ones((1, 5), np.float32), m, v, step=1)
    with pytest.raises(ValueError, match=r"param: a row-sparse gradient needs a parameter with at least one axis"):
        fastadam.sparse_adam_step(np.ones((), np.float32), np.array([0]), np.ones(1, np.float32),
                                  np.zeros((), np.float32), np.zeros((), np.float32), step=1)


def test_values_sharing_memory_with_the_table_are_refused(rng):
    p, m, v = make_table(100, (4,), np.float32, rng)
    with pytest.raises(ValueError, match=r"values shares memory with param|param shares memory with values"):
        fastadam.sparse_adam_step(p, np.array([1, 2]), p[10:12], m, v, step=1)


def test_a_bad_sparse_gradient_in_an_optimizer_step_changes_nothing(rng):
    table, _, _ = make_table(100, (4,), np.float32, rng)
    dense = np.ones(10, np.float32)
    opt = fastadam.Adam([dense, table])
    before = [dense.copy(), table.copy()]
    with pytest.raises(ValueError, match=r"grads\[1\].indices\[1\] = 100 is out of range"):
        opt.step([np.ones(10, np.float32), fastadam.RowSparseGrad(np.array([0, 100]), np.ones((2, 4), np.float32))])
    assert_bitwise_equal(dense, before[0])
    assert_bitwise_equal(table, before[1])
    assert opt.steps == [0, 0]


# -- PyTorch -----------------------------------------------------------------------------------------------

def test_sparse_adam_agrees_with_torch_sparse_adam_within_8_ulp(rng):
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    # Same tolerance and reasoning as tests/test_torch.py.
    rows, dim = 500, 16
    p, _, _ = make_table(rows, (dim,), np.float32, rng)
    emb = torch.nn.Embedding(rows, dim, sparse=True)
    with torch.no_grad():
        emb.weight.copy_(torch.from_numpy(p))
    reference = torch.optim.SparseAdam(emb.parameters(), lr=1e-2)
    opt = fastadam.SparseAdam([p], lr=1e-2)
    for _ in range(100):
        indices, values = make_grad(rows, (dim,), np.float32, rng, nnz=100)
        emb.weight.grad = torch.sparse_coo_tensor(torch.from_numpy(indices)[None], torch.from_numpy(values),
                                                  (rows, dim), check_invariants=True)
        reference.step()
        opt.step([fastadam.RowSparseGrad(indices, values)])
    wanted = emb.weight.detach().numpy()
    diff = np.abs(p.astype(np.float64) - wanted)
    assert diff.max() <= 8 * np.spacing(np.abs(wanted).max())
    torch_m = reference.state[emb.weight]["exp_avg"].numpy()
    assert np.abs(opt.state[0]["exp_avg"] - torch_m).max() <= 8 * np.spacing(np.abs(torch_m).max())


@pytest.mark.parametrize("optimizer", [False, True], ids=["sparse_adam_step", "Adam.step"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_rows_of_every_length_and_alignment_are_bitwise_equal(dtype, optimizer, rng):
    # Each row of a gather is its own stretch of elements, with its own head
    # and tail.  Tables that start 0..15 elements past an allocation, with rows
    # of 1..35 elements and long ones (which are aligned first), give rows at
    # every alignment and every tail length.
    for offset in (0, 1, 3, 4, 7, 8, 15):
        for row_size in [*range(1, 36), 250, 257, 515]:
            rows = 12
            flat = [np.ascontiguousarray(a.reshape(-1)) for a in make_table(rows * row_size + offset, (), dtype, rng)]
            p, m, v = (a[offset:].reshape(rows, row_size) for a in flat)
            indices = np.array([5, 0, 11, 5, 3, 10, 1])
            values = np.asarray(rng.standard_normal((len(indices), row_size)), dtype)
            expected = [a.copy() for a in (p, m, v)]
            if optimizer:
                opt = fastadam.Adam([p], **HYPER, num_threads=1)
                opt.state[0]["exp_avg"][...] = m
                opt.state[0]["exp_avg_sq"][...] = v
                opt.step([fastadam.RowSparseGrad(indices, values)])
                actual = (p, opt.state[0]["exp_avg"], opt.state[0]["exp_avg_sq"])
                rows_, summed = fastadam.reference.coalesce_rows(indices, values)
                sub = [e[rows_] for e in expected]
                fastadam.reference.adam_step(sub[0], summed, sub[1], sub[2], step=1, **HYPER)
                for e, s in zip(expected, sub):
                    e[rows_] = s
            else:
                fastadam.sparse_adam_step(p, indices, values, m, v, step=3, num_threads=1, **HYPER)
                actual = (p, m, v)
                fastadam.reference.sparse_adam_step(expected[0], indices, values, expected[1], expected[2], step=3,
                                                    **HYPER)
            for a, e in zip(actual, expected):
                assert_bitwise_equal(a, e, f"offset {offset}, rows of {row_size}")
