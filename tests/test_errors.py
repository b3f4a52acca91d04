"""Bad input gets a clear error naming the argument (and list index), and nothing is changed.

Each case builds a list call whose *last* item is the bad one, so a kernel
that started writing before checking would already have updated the first
items; every array in the call is compared bit for bit before and after.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import fastadam
from conftest import assert_bitwise_equal

N = 10
FIELDS = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")


def make_lists(count: int = 3, dtype=np.float32, seed: int = 0) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {f: [np.asarray(rng.random(N), dtype) for _ in range(count)] for f in FIELDS}


def arrays_of(lists: dict) -> list[np.ndarray]:
    items = [[x] if isinstance(x, np.ndarray) else (x or []) for x in (lists[f] for f in FIELDS)]
    return [a for group in items for a in group if isinstance(a, np.ndarray)]


def snapshot(lists: dict) -> list[np.ndarray]:
    return [a.copy() for a in arrays_of(lists)]


def assert_unchanged(lists: dict, before: list[np.ndarray]) -> None:
    after = arrays_of(lists)
    assert len(after) == len(before)
    for b, a in zip(before, after):
        if a.dtype.kind == "f":
            assert_bitwise_equal(a, b)
        else:
            np.testing.assert_array_equal(a, b)


def call(lists: dict, amsgrad: bool = True, **kwargs) -> None:
    fastadam.adam_step(lists["params"], lists["grads"], lists["exp_avgs"], lists["exp_avg_sqs"],
                       max_exp_avg_sqs=lists["max_exp_avg_sqs"] if amsgrad else None, amsgrad=amsgrad,
                       **{"step": 1, **kwargs})


def expect_error(lists: dict, error: type, match: str, **kwargs) -> None:
    before = snapshot(lists)
    with pytest.raises(error, match=match):
        call(lists, **kwargs)
    assert_unchanged(lists, before)


# -- the arrays --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field", FIELDS)
def test_wrong_dtype_names_the_array(field):
    lists = make_lists()
    lists[field][-1] = lists[field][-1].astype(np.int32)
    expect_error(lists, TypeError, re.escape(f"{field}[2]: dtype must be float32 or float64, got int32"))


@pytest.mark.parametrize("field", FIELDS[1:])
def test_state_dtype_must_match_the_parameter(field):
    lists = make_lists()
    lists[field][-1] = lists[field][-1].astype(np.float64)
    expect_error(lists, TypeError, re.escape(f"{field}[2]: dtype float64 does not match params[2]'s dtype float32"))


@pytest.mark.parametrize("dtype", [np.float16, np.complex64, ">f4", object])
def test_unsupported_dtypes_are_rejected(dtype):
    lists = make_lists()
    lists["params"][-1] = np.zeros(N, dtype)
    expect_error(lists, TypeError, r"params\[2\]: dtype must be float32 or float64")


@pytest.mark.parametrize("field", FIELDS[1:])
def test_shape_mismatch_names_both_shapes(field):
    lists = make_lists()
    lists[field][-1] = lists[field][-1].reshape(2, 5)
    expect_error(lists, ValueError, re.escape(f"{field}[2]: shape (2, 5) does not match params[2]'s shape (10,)"))


@pytest.mark.parametrize("field", FIELDS)
def test_non_contiguous_arrays_are_refused_not_copied(field):
    lists = make_lists()
    lists[field][-1] = np.zeros(2 * N, np.float32)[::2]
    expect_error(lists, ValueError, rf"{field}\[2\]: must be C-contiguous .*(never works on|without) a copy")


def test_fortran_ordered_2d_arrays_are_refused():
    lists = make_lists()
    for f in FIELDS:
        lists[f][-1] = np.asfortranarray(np.zeros((2, 5), np.float32))
    expect_error(lists, ValueError, r"params\[2\]: must be C-contiguous")


@pytest.mark.parametrize("field", ["params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"])
def test_read_only_param_or_state_is_refused(field):
    lists = make_lists()
    lists[field][-1].flags.writeable = False
    expect_error(lists, ValueError, rf"{field}\[2\]: array is read-only")


def test_read_only_gradients_are_fine():
    lists = make_lists()
    for g in lists["grads"]:
        g.flags.writeable = False
    call(lists)


@pytest.mark.parametrize("field", FIELDS)
def test_non_arrays_are_refused(field):
    lists = make_lists()
    lists[field][-1] = list(lists[field][-1])
    expect_error(lists, TypeError, rf"{field}\[2\]: expected a numpy.ndarray, got list")


@pytest.mark.parametrize("first,second", [("params", "grads"), ("exp_avgs", "exp_avg_sqs"),
                                          ("grads", "max_exp_avg_sqs"), ("params", "exp_avg_sqs")])
def test_arrays_sharing_memory_within_a_parameter_are_refused(first, second):
    lists = make_lists()
    lists[second][-1] = lists[first][-1]
    expect_error(lists, ValueError, "shares memory with")


def test_partially_overlapping_views_are_refused():
    lists = make_lists()
    base = np.zeros(N + 5, np.float32)
    lists["params"][-1], lists["exp_avgs"][-1] = base[:N], base[5:]
    expect_error(lists, ValueError, r"(params|exp_avgs)\[2\] shares memory with (params|exp_avgs)\[2\]")


def test_the_same_parameter_twice_in_a_list_is_refused():
    lists = make_lists()
    lists["params"][-1] = lists["params"][0]
    expect_error(lists, ValueError, r"params\[(0|2)\] shares memory with params\[(0|2)\]")


def test_one_gradient_may_be_shared_by_several_parameters():
    lists = make_lists()
    lists["grads"][-1] = lists["grads"][0]  # read twice, written never: fine
    call(lists)


@pytest.mark.parametrize("field", FIELDS[1:])
def test_sequences_of_different_lengths_are_refused(field):
    lists = make_lists()
    lists[field].pop()
    expect_error(lists, ValueError, rf"{field} has 2 arrays but params has 3")


def test_a_single_array_with_lists_is_refused():
    lists = make_lists()
    lists["params"] = lists["params"][0]
    with pytest.raises(TypeError, match="grads: expected a numpy.ndarray .as params is one., got list"):
        call(lists)


def test_a_list_of_params_with_a_single_array_is_refused():
    lists = make_lists()
    lists["grads"] = lists["grads"][0]
    expect_error(lists, TypeError, "grads: expected a list or tuple of numpy arrays")


def test_amsgrad_needs_max_exp_avg_sqs_and_only_then():
    lists = make_lists()
    lists["max_exp_avg_sqs"] = None
    expect_error(lists, ValueError, "max_exp_avg_sqs is required when amsgrad=True")
    lists = make_lists()
    before = snapshot(lists)
    with pytest.raises(ValueError, match="max_exp_avg_sqs is given but amsgrad=False"):
        fastadam.adam_step(*[lists[f] for f in FIELDS[:4]], max_exp_avg_sqs=lists["max_exp_avg_sqs"], step=1)
    assert_unchanged(lists, before)


# -- the hyperparameters -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,error,match", [
    (dict(lr=-1e-3), ValueError, r"lr must be >= 0, got -0.001"),
    (dict(lr=float("nan")), ValueError, r"lr must be finite"),
    (dict(lr=float("inf")), ValueError, r"lr must be finite"),
    (dict(eps=-1e-8), ValueError, r"eps must be >= 0"),
    (dict(eps=float("nan")), ValueError, r"eps must be finite"),
    (dict(betas=(1.0, 0.999)), ValueError, r"betas\[0\] must be in \[0, 1\), got 1.0"),
    (dict(betas=(0.9, -0.1)), ValueError, r"betas\[1\] must be in \[0, 1\), got -0.1"),
    (dict(betas=(0.9, float("nan"))), ValueError, r"betas\[1\] must be finite"),
    (dict(betas=(0.9,)), TypeError, r"betas: expected a pair"),
    (dict(betas=0.9), TypeError, r"betas: expected a pair"),
    (dict(weight_decay=-0.1), ValueError, r"weight_decay must be >= 0"),
    (dict(weight_decay=float("inf")), ValueError, r"weight_decay must be finite"),
    (dict(step=0), ValueError, r"step must be >= 1"),
    (dict(step=-3), ValueError, r"step must be >= 1"),
    (dict(step=1.5), TypeError, r"step: expected an integer, got float"),
    (dict(step=True), TypeError, r"step: expected an integer, got bool"),
    (dict(lr="0.1"), TypeError, r"lr: expected a real number, got str"),
    (dict(lr=None), TypeError, r"lr: expected a real number, got NoneType"),
    (dict(maximize="yes"), TypeError, r"maximize: expected a bool, got str"),
    (dict(num_threads=0), ValueError, r"num_threads must be None or >= 1, got 0"),
    (dict(num_threads=2.0), TypeError, r"num_threads: expected an integer"),
])
def test_bad_hyperparameters_are_named(kwargs, error, match):
    expect_error(make_lists(), error, match, **kwargs)


def test_numpy_scalars_are_accepted_as_hyperparameters():
    lists = make_lists()
    call(lists, step=np.int64(3), lr=np.float32(1e-3), betas=(np.float64(0.9), 0.999), maximize=np.bool_(False))


def test_nan_in_a_gradient_is_not_an_input_error():
    lists = make_lists()
    lists["grads"][1][4] = np.nan
    call(lists)
    assert np.isnan(lists["params"][1][4]) and not np.isnan(lists["params"][1][3])
