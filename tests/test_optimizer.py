"""fastadam.Adam / AdamW: the stateful optimizer, its param groups, and saving and resuming."""

from __future__ import annotations

import numpy as np
import pytest

import fastadam
from conftest import assert_bitwise_equal

SHAPES = [(3, 4), (17,), (), (2, 0), (300, 70)]


class ReferenceAdam:
    """The optimizer written with fastadam.reference, for comparison."""

    def __init__(self, groups: list[dict]):
        self.groups = groups
        self.state = [[{"m": np.zeros_like(p), "v": np.zeros_like(p), "vmax": np.zeros_like(p)}
                       for p in g["params"]] for g in groups]
        self.t = 0

    def step(self, grads: list[np.ndarray]) -> None:
        self.t += 1
        it = iter(grads)
        for g, states in zip(self.groups, self.state):
            opts = {k: v for k, v in g.items() if k != "params"}
            for p, s in zip(g["params"], states):
                fastadam.reference.adam_step(p, next(it), s["m"], s["v"], step=self.t,
                                             max_exp_avg_sqs=s["vmax"], **opts)


def make_params(rng, dtype=np.float32, shapes=SHAPES) -> list[np.ndarray]:
    return [np.asarray(rng.standard_normal(s), dtype) for s in shapes]


def grads_for(params, rng) -> list[np.ndarray]:
    return [np.asarray(rng.standard_normal(p.shape), p.dtype) for p in params]


GROUP_OPTIONS = [
    dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False, amsgrad=False,
         maximize=False),
    dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, decoupled_weight_decay=True, amsgrad=True,
         maximize=False),
    dict(lr=1e-3, betas=(0.5, 0.9), eps=0.0, weight_decay=0.01, decoupled_weight_decay=False, amsgrad=False,
         maximize=True),
]


def make_groups(rng) -> list[dict]:
    return [{"params": make_params(rng, dtype), **opts}
            for opts, dtype in zip(GROUP_OPTIONS, [np.float32, np.float64, np.float32])]


def copy_groups(groups):
    return [{**g, "params": [p.copy() for p in g["params"]]} for g in groups]


def all_params(groups):
    return [p for g in groups for p in g["params"]]


def test_param_groups_follow_the_reference_bitwise_for_100_steps(rng):
    groups = make_groups(rng)
    expected = ReferenceAdam(copy_groups(groups))
    opt = fastadam.Adam(groups)

    for _ in range(100):
        grads = grads_for(all_params(groups), rng)
        opt.step(grads)
        expected.step(grads)

    for actual, wanted in zip(all_params(groups), all_params(expected.groups)):
        assert_bitwise_equal(actual, wanted)
    assert opt.steps == [100] * len(all_params(groups))


def test_a_learning_rate_schedule_takes_effect_at_the_next_step(rng):
    params = make_params(rng)
    expected = ReferenceAdam([{"params": [p.copy() for p in params], "lr": 1e-2}])
    opt = fastadam.Adam(params, lr=1e-2)
    for step in range(1, 21):
        lr = 1e-2 * 0.9 ** step
        opt.param_groups[0]["lr"] = expected.groups[0]["lr"] = lr
        grads = grads_for(params, rng)
        opt.step(grads)
        expected.step(grads)
    for actual, wanted in zip(params, expected.groups[0]["params"]):
        assert_bitwise_equal(actual, wanted)


def test_adamw_is_adam_with_decoupled_weight_decay(rng):
    params = make_params(rng)
    twin = [p.copy() for p in params]
    opt_w = fastadam.AdamW(params)
    opt = fastadam.Adam(twin, weight_decay=1e-2, decoupled_weight_decay=True)
    assert opt_w.param_groups[0]["weight_decay"] == 1e-2
    for _ in range(5):
        grads = grads_for(params, rng)
        opt_w.step(grads)
        opt.step(grads)
    for a, b in zip(params, twin):
        assert_bitwise_equal(a, b)


def test_state_is_zero_initialised_in_the_parameter_dtype(rng):
    params = make_params(rng, np.float64)
    opt = fastadam.Adam(params, amsgrad=True)
    for p, s in zip(params, opt.state):
        assert set(s) == {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
        for a in s.values():
            assert a.dtype == np.float64 and a.shape == p.shape and not a.any()


def run(opt, params, grads_seq):
    for grads in grads_seq:
        opt.step(grads)
    return params


@pytest.mark.parametrize("how", ["state_dict", "npz"])
def test_resuming_from_a_saved_state_gives_the_uninterrupted_trajectory(how, rng, tmp_path):
    groups = make_groups(rng)
    grads_seq = [grads_for(all_params(groups), rng) for _ in range(60)]

    uninterrupted = copy_groups(groups)
    run(fastadam.Adam(uninterrupted), all_params(uninterrupted), grads_seq)

    first = fastadam.Adam(groups)
    run(first, all_params(groups), grads_seq[:25])
    if how == "npz":
        first.save(tmp_path / "opt.npz")
        with np.load(tmp_path / "opt.npz", allow_pickle=False) as f:  # nothing in it needs pickle
            assert "param_groups" in f.files
    else:
        saved = first.state_dict()
    # A new process would rebuild the model from its own checkpoint and a fresh optimizer.
    resumed_groups = copy_groups(groups)
    for g in resumed_groups:
        g.update(lr=123.0)  # overwritten by the saved hyperparameters
    second = fastadam.Adam(resumed_groups)
    if how == "npz":
        second.load(tmp_path / "opt.npz")
    else:
        second.load_state_dict(saved)
    assert second.steps == [25] * len(all_params(groups))
    assert [g["lr"] for g in second.param_groups] == [o["lr"] for o in GROUP_OPTIONS]
    run(second, all_params(resumed_groups), grads_seq[25:])

    for a, b in zip(all_params(resumed_groups), all_params(uninterrupted)):
        assert_bitwise_equal(a, b)


def test_state_dict_is_a_snapshot_in_pytorch_layout(rng):
    params = make_params(rng)
    opt = fastadam.Adam(params, lr=0.5)
    opt.step(grads_for(params, rng))
    sd = opt.state_dict()
    assert sorted(sd["state"]) == list(range(len(params)))
    assert sd["state"][0]["step"] == 1 and set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert sd["param_groups"][0]["params"] == list(range(len(params)))
    assert sd["param_groups"][0]["lr"] == 0.5
    before = sd["state"][0]["exp_avg"].copy()
    opt.step(grads_for(params, rng))
    assert_bitwise_equal(sd["state"][0]["exp_avg"], before)  # a copy, not a live view


def test_loading_a_mismatched_state_changes_nothing(rng):
    params = make_params(rng)
    opt = fastadam.Adam(params)
    opt.step(grads_for(params, rng))
    sd = opt.state_dict()
    sd["state"][0]["exp_avg"] += 1  # valid, and would be copied first ...
    sd["state"][0]["step"] = 99
    sd["state"][len(params) - 1]["exp_avg"] = np.zeros(5, np.float32)  # ... but the last entry is wrong
    before = [s["exp_avg"].copy() for s in opt.state]
    with pytest.raises(ValueError, match=r"state\[4\]\['exp_avg'\]: expected float32\(300, 70\)"):
        opt.load_state_dict(sd)
    assert opt.steps == [1] * len(params)
    for a, b in zip(opt.state, before):
        assert_bitwise_equal(a["exp_avg"], b)


def test_loading_a_state_with_a_bad_hyperparameter_is_refused(rng):
    params = make_params(rng)
    opt = fastadam.Adam(params)
    sd = opt.state_dict()
    sd["param_groups"][0]["lr"] = -1.0
    with pytest.raises(ValueError, match=r"param_groups\[0\]: lr must be >= 0"):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 1e-3


# -- bad gradients and parameters --------------------------------------------------------------------------

@pytest.mark.parametrize("mutate,error,match", [
    (lambda gs: gs.pop(), ValueError, r"grads has 4 arrays but the optimizer has 5 params"),
    (lambda gs: gs.append(gs[0]), ValueError, r"grads has 6 arrays but the optimizer has 5 params"),
    (lambda gs: gs.__setitem__(4, gs[4].T.copy()), ValueError, r"grads\[4\]: shape \(70, 300\) does not match"),
    (lambda gs: gs.__setitem__(4, gs[4].astype(np.float64)), TypeError, r"grads\[4\]: dtype float64 does not"),
    (lambda gs: gs.__setitem__(4, gs[4].T), ValueError, r"grads\[4\]: must be C-contiguous"),
    (lambda gs: gs.__setitem__(4, None), TypeError, r"grads\[4\]: expected a numpy.ndarray, got NoneType"),
], ids=["too-few", "too-many", "shape", "dtype", "non-contiguous", "none"])
def test_gradients_that_do_not_match_the_params_change_nothing(mutate, error, match, rng):
    params = make_params(rng)
    opt = fastadam.Adam(params)
    opt.step(grads_for(params, rng))
    before = [p.copy() for p in params] + [a.copy() for s in opt.state for a in s.values()]
    grads = grads_for(params, rng)
    mutate(grads)
    with pytest.raises(error, match=match):
        opt.step(grads)
    after = list(params) + [a for s in opt.state for a in s.values()]
    for a, b in zip(after, before):
        assert_bitwise_equal(a, b)
    assert opt.steps == [1] * len(params)


def test_a_gradient_that_aliases_a_parameter_is_refused(rng):
    params = make_params(rng)
    opt = fastadam.Adam(params)
    grads = grads_for(params, rng)
    grads[2] = params[4].reshape(-1)[7:8].reshape(())  # shape () like params[2], inside params[4]'s buffer
    with pytest.raises(ValueError, match=r"grads\[2\] shares memory with the parameter or state of params\[4\]"):
        opt.step(grads)


def test_grads_must_be_a_list_not_an_array(rng):
    params = make_params(rng, shapes=[(4,)])
    opt = fastadam.Adam(params)
    with pytest.raises(TypeError, match="grads: expected a list of arrays"):
        opt.step(np.zeros(4, np.float32))


def test_a_hyperparameter_made_invalid_between_steps_is_caught(rng):
    params = make_params(rng)
    opt = fastadam.Adam(params)
    opt.param_groups[0]["betas"] = (0.9, 1.5)
    before = [p.copy() for p in params]
    with pytest.raises(ValueError, match=r"param_groups\[0\]: betas\[1\] must be in \[0, 1\)"):
        opt.step(grads_for(params, rng))
    for a, b in zip(params, before):
        assert_bitwise_equal(a, b)


def test_a_parameter_made_read_only_after_construction_is_caught(rng):
    params = make_params(rng)
    opt = fastadam.Adam(params)
    params[1].flags.writeable = False
    with pytest.raises(ValueError, match="became read-only"):
        opt.step(grads_for(params, rng))


@pytest.mark.parametrize("build,error,match", [
    (lambda ps: fastadam.Adam([]), ValueError, "empty parameter list"),
    (lambda ps: fastadam.Adam([ps[0], ps[0]]), ValueError, r"params\[(0|1)\] shares memory with params\[(0|1)\]"),
    (lambda ps: fastadam.Adam([ps[0].T]), ValueError, r"params\[0\]: must be C-contiguous"),
    (lambda ps: fastadam.Adam([ps[0].astype(np.int64)]), TypeError, r"params\[0\]: dtype must be float32 or"),
    (lambda ps: fastadam.Adam([[1.0, 2.0]]), TypeError, r"params\[0\]: expected a numpy.ndarray, got list"),
    (lambda ps: fastadam.Adam(ps, lr=-1), ValueError, r"param_groups\[0\]: lr must be >= 0"),
    (lambda ps: fastadam.Adam([{"params": ps, "momentum": 0.9}]), ValueError, r"unknown option\(s\) \['momentum'\]"),
    (lambda ps: fastadam.Adam([{"params": ps, "betas": (0.9,)}]), TypeError, r"betas must be a pair"),
], ids=["empty", "duplicate", "non-contiguous", "int-dtype", "list", "negative-lr", "unknown-option", "betas"])
def test_bad_optimizer_construction_is_named(build, error, match, rng):
    with pytest.raises(error, match=match):
        build(make_params(rng))


def test_repr_lists_the_groups(rng):
    text = repr(fastadam.AdamW(make_params(rng)))
    assert text.startswith("AdamW (") and "5 arrays" in text and "decoupled_weight_decay=True" in text
