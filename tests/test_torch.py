"""Agreement with torch.optim.Adam / AdamW, and PyTorch tensors updated through zero-copy NumPy views.

PyTorch evaluates the same formula with other roundings (``lerp`` for the
first moment, FMA in its vectorized kernels, a division by
``sqrt(1 - beta2^t)`` where fastadam multiplies by its reciprocal), so the two
agree to a tolerance, not bit for bit.  The tolerance, after 100 steps:

* ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq`` and ``param``: within
  ``ULPS`` units in the last place of the array's largest magnitude;
* ``exp_avg_sq`` (never negative, so no cancellation) also within ``ULPS``
  units of each element's own magnitude.

Why it holds: each step computes m and v with at most three roundings in
either library, so they differ by a couple of ulps per step; the recurrences
``m = beta1 m + ...`` and ``v = beta2 v + ...`` are contractions, so old
differences shrink instead of adding up.  The update inherits a few ulps of
relative difference, but it is ``lr``-sized, far below one ulp of the
parameter, so the parameters differ only where ``p - update`` happens to round
the other way.  Measured over 100 steps with heavy-tailed gradients, all
options, fused/foreach/single-tensor PyTorch: at most 2 ulps (param) and 4
ulps (moments); ``ULPS = 8`` leaves a factor of two.  An element that is
near zero after cancellation (m, or p crossing zero) is compared at the
array's scale, since its own ulp says nothing about the rounding of the terms
that produced it.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import fastadam

torch = pytest.importorskip("torch", reason="PyTorch is not installed (CI installs torch==2.13.0 CPU)")
pytestmark = pytest.mark.torch

ULPS = 8
STEPS = 100


def assert_within_ulps(actual: np.ndarray, expected: np.ndarray, what: str, elementwise: bool = False) -> None:
    scale = np.abs(expected) if elementwise else np.max(np.abs(expected), initial=0)
    tolerance = ULPS * np.spacing(np.asarray(scale, expected.dtype)).astype(np.float64)
    diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    worst = np.argmax(diff - tolerance) if diff.size else 0
    assert (diff <= tolerance).all(), (f"{what}: differs by {diff.flat[worst]:.3g} > {ULPS} ulp "
                                       f"({np.asarray(tolerance).flat[worst if elementwise else 0]:.3g})")


OPTIONS = [dict(maximize=maximize, weight_decay=wd, amsgrad=amsgrad, decoupled=decoupled)
           for maximize, amsgrad, (wd, decoupled) in itertools.product(
               [False, True], [False, True], [(0.0, False), (0.1, False), (0.1, True)])]


@pytest.mark.parametrize("implementation", ["fused", "foreach", "single-tensor"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_100_steps_agree_with_torch_within_the_stated_ulps(dtype, options, implementation):
    rng = np.random.default_rng(7)
    shapes = [(64, 33), (1000,), (5,)]
    params = [np.asarray(rng.standard_normal(s), dtype) for s in shapes]
    tensors = [torch.tensor(p.copy(), requires_grad=True) for p in params]
    hyper = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=options["weight_decay"],
                 amsgrad=options["amsgrad"], maximize=options["maximize"])
    kind = {"fused": dict(fused=True), "foreach": dict(foreach=True), "single-tensor": dict(foreach=False)}
    torch_cls = torch.optim.AdamW if options["decoupled"] else torch.optim.Adam
    reference = torch_cls(tensors, **hyper, **kind[implementation])
    opt = fastadam.Adam(params, **hyper, decoupled_weight_decay=options["decoupled"])

    for _ in range(STEPS):
        # Heavy-tailed gradients exercise a wide range of v.
        grads = [np.asarray(rng.standard_normal(p.shape) * np.exp(rng.standard_normal(p.shape)), dtype)
                 for p in params]
        for t, g in zip(tensors, grads):
            t.grad = torch.from_numpy(g.copy())
        reference.step()
        opt.step(grads)

    for i, (p, t) in enumerate(zip(params, tensors)):
        state = reference.state[t]
        assert_within_ulps(p, t.detach().numpy(), f"params[{i}]")
        assert_within_ulps(opt.state[i]["exp_avg"], state["exp_avg"].numpy(), f"exp_avg[{i}]")
        assert_within_ulps(opt.state[i]["exp_avg_sq"], state["exp_avg_sq"].numpy(), f"exp_avg_sq[{i}]")
        assert_within_ulps(opt.state[i]["exp_avg_sq"], state["exp_avg_sq"].numpy(), f"exp_avg_sq[{i}]",
                           elementwise=True)
        if options["amsgrad"]:
            assert_within_ulps(opt.state[i]["max_exp_avg_sq"], state["max_exp_avg_sq"].numpy(),
                               f"max_exp_avg_sq[{i}]", elementwise=True)
        assert int(state["step"]) == opt.steps[i] == STEPS


def test_nan_gradients_poison_the_same_elements_as_in_torch():
    p = np.linspace(-1, 1, 32, dtype=np.float32)
    t = torch.tensor(p.copy(), requires_grad=True)
    g = np.ones(32, np.float32)
    g[[1, 7]] = [np.nan, np.inf]
    t.grad = torch.from_numpy(g.copy())
    torch.optim.Adam([t], lr=0.1).step()
    fastadam.Adam([p], lr=0.1).step([g])
    np.testing.assert_array_equal(np.isnan(p), np.isnan(t.detach().numpy()))


def test_pytorch_module_parameters_are_updated_in_place_through_numpy_views():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    views = [p.detach().numpy() for p in model.parameters()]  # share memory with the tensors
    assert all(v.ctypes.data == p.data_ptr() for v, p in zip(views, model.parameters()))
    opt = fastadam.Adam(views, lr=1e-2)
    x, y = torch.randn(64, 8), torch.randn(64, 1)

    losses = []
    for _ in range(50):
        model.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step([p.grad.numpy() for p in model.parameters()])
        losses.append(loss.item())

    assert losses[-1] < 0.8 * losses[0]  # the torch model itself learned: the update reached it
    assert all(v.ctypes.data == p.data_ptr() for v, p in zip(views, model.parameters()))


def test_a_non_contiguous_tensor_view_is_refused_rather_than_updated_as_a_copy():
    weight = torch.zeros(4, 6)
    view = weight.t().numpy()  # a transposed view: not C-contiguous
    with pytest.raises(ValueError, match=r"params: must be C-contiguous"):
        fastadam.adam_step(view, np.ones((6, 4), np.float32), np.zeros((6, 4), np.float32),
                           np.zeros((6, 4), np.float32), step=1)
    assert not weight.any()
