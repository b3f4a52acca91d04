"""eps_before_bias_correction: the epsilon of Keras, TensorFlow and scikit-learn.

PyTorch (and fastadam by default) divide by sqrt(v) / sqrt(1 - beta2**t) + eps;
Keras, TensorFlow, scikit-learn and torch.optim.SparseAdam divide by
sqrt(v) + eps and fold sqrt(1 - beta2**t) into the step size.  The option is
the second form, bitwise equal to fastadam.reference like everything else.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

import fastadam
from conftest import DTYPES, OPTIONS, SIZES, assert_problems_equal, fastadam_step, make_problem, option_id, reference_step

HYPER = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-3)  # an eps large enough for its placement to matter
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sklearn_mlp_adam.py"


@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize("options", OPTIONS, ids=option_id)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_each_step_is_bitwise_equal_to_the_reference(dtype, size, options, num_threads, rng):
    expected = make_problem(size, dtype, rng, amsgrad=options["amsgrad"])
    actual = expected.copy()

    for step in (1, 2, 50):
        fastadam_step(actual, step=step, num_threads=num_threads, eps_before_bias_correction=True, **HYPER, **options)
        reference_step(expected, step=step, eps_before_bias_correction=True, **HYPER, **options)

    assert_problems_equal(actual, expected)


def test_it_is_the_textbook_keras_formula_and_not_the_default(rng):
    p0 = rng.standard_normal(1000)
    g = rng.standard_normal(1000) * 1e-3  # sqrt(v) near eps: the placements differ
    m, v = rng.standard_normal(1000) * 1e-4, rng.random(1000) * 1e-8
    lr, (b1, b2), eps, t = 1e-2, (0.9, 0.999), 1e-4, 3
    m_new = b1 * m + (1 - b1) * g
    v_new = b2 * v + (1 - b2) * g * g
    keras = p0 - lr * math.sqrt(1 - b2**t) / (1 - b1**t) * m_new / (np.sqrt(v_new) + eps)

    results = {}
    for before in (True, False):
        p, mm, vv = p0.copy(), m.copy(), v.copy()
        fastadam.adam_step(p, g, mm, vv, step=t, lr=lr, betas=(b1, b2), eps=eps, eps_before_bias_correction=before)
        results[before] = p
    np.testing.assert_allclose(results[True], keras, rtol=1e-14, atol=0)
    assert np.abs(results[False] - keras).max() > 1e-6


@pytest.mark.parametrize("cls", [fastadam.Adam, fastadam.AdamW])
def test_optimizers_take_it_as_a_per_group_option(cls, rng):
    params = [rng.standard_normal(300).astype(np.float32), rng.standard_normal(7).astype(np.float32)]
    expected = [p.copy() for p in params]
    opt = cls([{"params": [params[0]], "eps_before_bias_correction": True}, {"params": [params[1]]}], eps=1e-3)
    states = [dict(exp_avg=np.zeros_like(p), exp_avg_sq=np.zeros_like(p)) for p in params]
    decay = dict(weight_decay=1e-2, decoupled_weight_decay=True) if cls is fastadam.AdamW else {}

    for step in range(1, 6):
        grads = [rng.standard_normal(p.shape).astype(np.float32) for p in params]
        opt.step(grads)
        for k, (e, g, s) in enumerate(zip(expected, grads, states)):
            fastadam.reference.adam_step(e, g, s["exp_avg"], s["exp_avg_sq"], step=step, eps=1e-3,
                                         eps_before_bias_correction=k == 0, **decay)

    for p, e in zip(params, expected):
        np.testing.assert_array_equal(p, e)
    assert [g["eps_before_bias_correction"] for g in opt.state_dict()["param_groups"]] == [True, False]


def test_a_state_dict_saved_before_the_option_existed_loads_with_the_groups_setting(rng):
    params = [rng.standard_normal(10)]
    opt = fastadam.Adam(params, eps_before_bias_correction=True)
    opt.step([rng.standard_normal(10)])
    sd = opt.state_dict()
    del sd["param_groups"][0]["eps_before_bias_correction"]

    opt.load_state_dict(sd)

    assert opt.param_groups[0]["eps_before_bias_correction"] is True


def test_sparse_adam_defaults_to_it_as_torch_does(rng):
    assert fastadam.SparseAdam([np.zeros((4, 3))]).param_groups[0]["eps_before_bias_correction"] is True
    assert fastadam.Adam([np.zeros((4, 3))]).param_groups[0]["eps_before_bias_correction"] is False


def test_a_non_boolean_value_is_refused_with_its_name(rng):
    p = np.zeros(3)
    with pytest.raises(TypeError, match="eps_before_bias_correction"):
        fastadam.adam_step(p, p.copy(), p.copy(), p.copy(), step=1, eps_before_bias_correction="yes")


def _example():
    spec = importlib.util.spec_from_file_location("sklearn_mlp_adam", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_sklearn_mlp_with_fastadam_follows_stock_sklearns_loss_curve():
    pytest.importorskip("sklearn")
    stock, ours = _example().loss_curves(max_iter=15)

    assert len(stock) == len(ours) == 15
    # Not bitwise: scikit-learn squares the gradient first, (1 - beta2) * g**2; fastadam, like
    # PyTorch, computes ((1 - beta2) * g) * g.  Measured: <= 4e-16 over 40 epochs.
    np.testing.assert_allclose(ours, stock, rtol=1e-14, atol=0)
