"""The functional API takes any object with ``__dlpack__`` (a PyTorch CPU tensor, bfloat16 included).

Such an argument is read and updated where it lies, zero-copy, with the same
arithmetic as an ndarray (so bitwise equal to the reference); what cannot be
updated in place -- memory on another device, memory the exporter says is
read-only, an exporter that copies -- is an error naming the argument, raised
before anything is written.  The first tests use NumPy arrays behind a bare
``__dlpack__`` object, so they run without PyTorch; the torch tests skip
without it.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastadam
from conftest import assert_bitwise_equal, make_problem


class Exported:
    """Only the DLPack protocol of an array: what fastadam sees of a tensor of another library."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __dlpack__(self, **kwargs):
        return self.array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.array.__dlpack_device__()


def step_both(arrays: list[np.ndarray], wrap, **hyper) -> list[np.ndarray]:
    """Step ``arrays`` (p, g, m, v) through ``wrap`` and a copy through the reference; the reference's result."""
    expected = [a.copy() for a in arrays]
    fastadam.reference.adam_step(*expected, step=3, **hyper)
    assert fastadam.adam_step(*[wrap(a) for a in arrays], step=3, **hyper) is True
    return expected


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", [0, 1, 17, (1 << 16) + 3])
def test_exported_arrays_are_updated_in_place_bitwise_like_ndarrays(dtype, size, rng):
    pr = make_problem((size,), dtype, rng)
    arrays = [pr.param, pr.grad, pr.exp_avg, pr.exp_avg_sq]
    expected = step_both(arrays, Exported, lr=1e-2, weight_decay=0.1)
    for name, a, e in zip(("param", "grad", "exp_avg", "exp_avg_sq"), arrays, expected):
        assert_bitwise_equal(a, e, name)


def test_lists_may_mix_ndarrays_and_exported_arrays(rng):
    problems = [make_problem((100,), np.float32, rng) for _ in range(3)]
    lists = [[pr.param, pr.grad, pr.exp_avg, pr.exp_avg_sq] for pr in problems]
    expected = [[a.copy() for a in arrays] for arrays in lists]
    for arrays in expected:
        fastadam.reference.adam_step(*arrays, step=1)
    columns = [[Exported(arrays[k]) if (i + k) % 2 else arrays[k] for i, arrays in enumerate(lists)]
               for k in range(4)]
    as_tuple = tuple(columns[0])  # the caller's tuple is not changed by the conversion
    fastadam.adam_step(as_tuple, *columns[1:], step=1)
    assert all(isinstance(x, (np.ndarray, Exported)) for x in as_tuple)
    for arrays, exp in zip(lists, expected):
        for a, e in zip(arrays, exp):
            assert_bitwise_equal(a, e)


def test_sparse_adam_step_takes_exported_arrays(rng):
    table = rng.standard_normal((50, 4)).astype(np.float32)
    m, v = np.zeros_like(table), np.zeros_like(table)
    indices, values = np.array([3, 7, 3]), rng.standard_normal((3, 4)).astype(np.float32)
    expected = [table.copy(), m.copy(), v.copy()]
    fastadam.reference.sparse_adam_step(expected[0], indices, values, expected[1], expected[2], step=1, lr=0.1)
    fastadam.sparse_adam_step(*map(Exported, (table, indices, values, m, v)), step=1, lr=0.1)
    for a, e in zip((table, m, v), expected):
        assert_bitwise_equal(a, e)


def test_memory_the_exporter_marks_read_only_is_refused_where_it_would_be_written(rng):
    pr = make_problem((64,), np.float32, rng)
    pr.exp_avg.flags.writeable = False
    pr.grad.flags.writeable = False  # a gradient is only read: read-only is fine there
    before = [a.copy() for a in (pr.param, pr.exp_avg, pr.exp_avg_sq)]
    with pytest.raises(ValueError, match=r"exp_avgs: array is read-only, but it is updated in place"):
        fastadam.adam_step(*[Exported(a) for a in (pr.param, pr.grad, pr.exp_avg, pr.exp_avg_sq)], step=1)
    for a, b in zip((pr.param, pr.exp_avg, pr.exp_avg_sq), before):
        assert_bitwise_equal(a, b)


class OnDevice(Exported):
    """An exporter that says its memory is on a GPU (CUDA is DLPack device type 2)."""

    def __dlpack_device__(self):
        return (2, 0)

    def __dlpack__(self, **kwargs):
        raise AssertionError("a tensor on another device must be refused before it is exported")


def test_a_tensor_on_another_device_is_refused_before_anything_is_written(rng):
    pr = make_problem((64,), np.float32, rng)
    before = pr.copy()
    with pytest.raises(ValueError, match=r"exp_avg_sqs\[1\]: the tensor is on DLPack device type 2 \(CUDA\), "
                                         r"not the CPU"):
        fastadam.adam_step([pr.param, pr.param.copy()], [pr.grad, pr.grad],
                           [pr.exp_avg, pr.exp_avg.copy()], [pr.exp_avg_sq, OnDevice(pr.exp_avg_sq.copy())], step=1)
    assert_bitwise_equal(pr.param, before.param)
    assert_bitwise_equal(pr.exp_avg, before.exp_avg)


class Copying(Exported):
    """An exporter that ignores copy=False and says it copied (DLPack 1.0's IS_COPIED flag)."""

    def __dlpack__(self, **kwargs):
        return self.array.copy().__dlpack__(max_version=(1, 0), copy=True)


def test_an_exporter_that_copies_is_refused():
    p = np.ones(8, np.float32)
    with pytest.raises(ValueError, match=r"params: the exporter made a copy .* never works on a copy"):
        fastadam.adam_step(Copying(p), np.ones(8, np.float32), np.zeros(8, np.float32), np.zeros(8, np.float32),
                           step=1)
    assert (p == 1).all()


class Refusing(Exported):
    def __init__(self, array: np.ndarray, error: BaseException) -> None:
        super().__init__(array)
        self.error = error

    def __dlpack__(self, **kwargs):
        raise self.error


def test_an_exporters_refusal_keeps_its_type_and_gains_the_arguments_name():
    p = np.ones(8, np.float32)
    with pytest.raises(BufferError, match=r"^grads: __dlpack__\(\) failed: no export today$"):
        fastadam.adam_step(p, Refusing(p.copy(), BufferError("no export today")), np.zeros(8, np.float32),
                           np.zeros(8, np.float32), step=1)
    with pytest.raises(KeyboardInterrupt):  # not an ordinary error: propagates as it is
        fastadam.adam_step(p, Refusing(p.copy(), KeyboardInterrupt()), np.zeros(8, np.float32),
                           np.zeros(8, np.float32), step=1)
    assert (p == 1).all()


class Legacy(Exported):
    """An exporter from before DLPack 1.0: __dlpack__() takes no keywords and gives an unversioned capsule."""

    def __dlpack__(self):
        return self.array.__dlpack__()


def test_an_exporter_without_the_dlpack_1_keywords_is_asked_again_without_them(rng):
    pr = make_problem((33,), np.float64, rng)
    arrays = [pr.param, pr.grad, pr.exp_avg, pr.exp_avg_sq]
    expected = step_both(arrays, Legacy)
    for a, e in zip(arrays, expected):
        assert_bitwise_equal(a, e)


# -- PyTorch tensors --------------------------------------------------------------------------------------

@pytest.mark.torch
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torch_cpu_tensors_are_stepped_in_place_without_numpy(dtype, rng):
    torch = pytest.importorskip("torch")
    pr = make_problem((5, 7), dtype, rng)
    tensors = [torch.from_numpy(a.copy()) for a in (pr.param, pr.grad, pr.exp_avg, pr.exp_avg_sq)]
    pointers = [t.data_ptr() for t in tensors]
    expected = pr.copy()
    fastadam.reference.adam_step(expected.param, expected.grad, expected.exp_avg, expected.exp_avg_sq, step=1)
    fastadam.adam_step(*tensors, step=1)
    assert [t.data_ptr() for t in tensors] == pointers
    for t, e in zip(tensors, (expected.param, expected.grad, expected.exp_avg, expected.exp_avg_sq)):
        assert_bitwise_equal(t.numpy(), e)


@pytest.mark.torch
def test_bfloat16_tensors_have_no_numpy_but_are_read_and_written_through_dlpack(rng):
    torch = pytest.importorskip("torch")
    ml_dtypes = pytest.importorskip("ml_dtypes")
    master = rng.standard_normal(1000).astype(np.float32)
    grad = rng.standard_normal(1000).astype(ml_dtypes.bfloat16)
    model = torch.from_numpy(master.copy()).bfloat16()
    m, v = np.zeros_like(master), np.zeros_like(master)
    expected = [master.copy(), m.copy(), v.copy(), master.astype(ml_dtypes.bfloat16)]
    fastadam.reference.adam_step(expected[0], grad, expected[1], expected[2], step=1, lr=0.01,
                                 model_params=expected[3])
    grad_tensor = torch.from_numpy(grad.view(np.int16)).view(torch.bfloat16)
    fastadam.adam_step([master], [grad_tensor], [m], [v], step=1, lr=0.01, model_params=[model])
    assert_bitwise_equal(master, expected[0])
    np.testing.assert_array_equal(model.view(torch.int16).numpy(), expected[3].view(np.int16))


@pytest.mark.torch
def test_a_tensor_that_requires_grad_is_refused_with_torchs_reason_and_the_arguments_name():
    torch = pytest.importorskip("torch")
    w = torch.nn.Parameter(torch.ones(4))
    z = torch.zeros(4)
    with pytest.raises(BufferError, match=r"params\[0\]: __dlpack__\(\) failed: .*require gradient.*detach"):
        fastadam.adam_step([w], [z.clone()], [z.clone()], [z.clone()], step=1)
    assert (w.detach() == 1).all()


@pytest.mark.torch
def test_a_non_contiguous_tensor_is_refused_rather_than_updated_as_a_copy():
    torch = pytest.importorskip("torch")
    weight = torch.zeros(4, 6)
    with pytest.raises(ValueError, match=r"params: must be C-contiguous"):
        fastadam.adam_step(weight.t(), torch.ones(6, 4), torch.zeros(6, 4), torch.zeros(6, 4), step=1)
    assert not weight.any()
