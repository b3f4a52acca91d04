"""The optimizer under misuse: atomic loading, hostile checkpoint files, and containers that cannot drift.

The rule throughout: bad input gets a TypeError or ValueError that names what
is wrong, and the optimizer is left exactly as it was -- state arrays, step
counts, hyperparameters and groups.  The optimizer never keeps working on
arrays the user can no longer see, and never ignores arrays the user thinks
it updates.
"""

from __future__ import annotations

import io
import tracemalloc
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

import fastadam
from conftest import assert_bitwise_equal
from test_optimizer import all_params, copy_groups, grads_for, make_groups, make_params

# -- helpers -----------------------------------------------------------------------------------------------


def step_alike(params: list[np.ndarray], *optimizers: Any, rng, steps: int = 1) -> None:
    """Step every optimizer ``steps`` times, each time with the same random gradients for ``params``."""
    for _ in range(steps):
        grads = grads_for(params, rng)
        for opt in optimizers:
            opt.step(grads)


def assert_all_bitwise_equal(actual: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(actual) == len(expected)
    for a, b in zip(actual, expected):
        assert_bitwise_equal(a, b)


def snapshot(opt: fastadam.Adam) -> dict[str, Any]:
    """Everything a load could change: step counts, groups, state arrays, params."""
    return {
        "steps": opt.steps,
        "groups": [{k: v for k, v in g.items()} for g in opt.param_groups],
        "state": [{k: a.copy() for k, a in s.items()} for s in opt.state],
        "params": [p.copy() for g in opt.param_groups for p in g["params"]],
    }


def assert_unchanged(opt: fastadam.Adam, before: dict[str, Any]) -> None:
    after = snapshot(opt)
    assert after["steps"] == before["steps"]
    assert after["groups"] == before["groups"]
    assert [sorted(s) for s in after["state"]] == [sorted(s) for s in before["state"]]
    for a, b in zip(after["state"], before["state"]):
        for key in a:
            assert_bitwise_equal(a[key], b[key], key)
    for a, b in zip(after["params"], before["params"]):
        assert_bitwise_equal(a, b)


class GroupReference:
    """fastadam.reference with one step count per group, so that groups can be added mid-run."""

    def __init__(self, groups: list[dict]):
        self.groups: list[dict] = []
        for g in groups:
            self.add(g)

    def add(self, group: dict) -> None:
        opts = {k: v for k, v in group.items() if k != "params"}
        self.groups.append({"params": [p.copy() for p in group["params"]], "opts": opts, "t": 0,
                            "state": [{"m": np.zeros_like(p), "v": np.zeros_like(p), "vmax": np.zeros_like(p)}
                                      for p in group["params"]]})

    def step(self, grads: list[np.ndarray]) -> None:
        it = iter(grads)
        for g in self.groups:
            g["t"] += 1
            for p, s in zip(g["params"], g["state"]):
                fastadam.reference.adam_step(p, next(it), s["m"], s["v"], step=g["t"], max_exp_avg_sqs=s["vmax"],
                                             **g["opts"])

    def params(self) -> list[np.ndarray]:
        return [p for g in self.groups for p in g["params"]]


@pytest.fixture
def trained(rng) -> fastadam.Adam:
    """An optimizer over three groups (one with amsgrad) after three steps."""
    groups = make_groups(rng)
    opt = fastadam.Adam(groups)
    for _ in range(3):
        opt.step(grads_for(all_params(groups), rng))
    return opt


# -- 1. loading is atomic ----------------------------------------------------------------------------------

def test_a_step_count_the_core_cannot_hold_is_refused_before_anything_changes(trained):
    sd = trained.state_dict()
    sd["param_groups"][0]["lr"] = 0.5                       # valid, and would be applied first ...
    sd["state"][0]["exp_avg"] += 1                          # ... as would this ...
    sd["state"][len(sd["state"]) - 1]["step"] = 2**64 - 1   # ... but the last step count does not fit int64
    before = snapshot(trained)
    with pytest.raises(ValueError, match=r"state\[14\]\['step'\] must be in \[0, 2\*\*63 - 1\), got 18446744073709551615"):
        trained.load_state_dict(sd)
    assert_unchanged(trained, before)


@pytest.mark.parametrize("step,match", [
    (2**63 - 1, r"must be in \[0, 2\*\*63 - 1\)"),   # one more step would overflow the core's int64
    (-1, r"must be in \[0, 2\*\*63 - 1\), got -1"),
    (True, "expected an integer step count, got bool"),
    (np.bool_(True), "expected an integer step count, got bool"),
    (3.0, "expected an integer step count, got float"),
    (np.float64(3.0), "expected an integer step count, got float64"),
    ("3", "expected an integer step count, got str"),
    (None, "expected an integer step count, got NoneType"),
], ids=["2**63-1", "negative", "bool", "numpy-bool", "float", "numpy-float", "str", "none"])
def test_step_counts_must_be_integers_in_range(step, match, trained):
    sd = trained.state_dict()
    sd["state"][0]["exp_avg"] += 1
    sd["state"][3]["step"] = step
    before = snapshot(trained)
    with pytest.raises(ValueError, match=r"state\[3\]\['step'\]: " + match if "expected" in match
                       else r"state\[3\]\['step'\] " + match):
        trained.load_state_dict(sd)
    assert_unchanged(trained, before)


def test_numpy_integer_step_counts_are_accepted(trained):
    sd = trained.state_dict()
    sd["state"][0]["step"] = np.int64(7)
    sd["state"][1]["step"] = np.uint8(9)
    trained.load_state_dict(sd)
    assert trained.steps[:3] == [7, 9, 3]


def _set(path: tuple, value: Any) -> Callable[[dict], None]:
    def mutate(sd: dict) -> None:
        target = sd
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return mutate


@pytest.mark.parametrize("mutate,match", [
    (_set(("state",), []), r"state_dict\['state'\]: expected a dict of per-parameter dicts, got list"),
    (_set(("param_groups",), {}), r"state_dict\['param_groups'\]: expected a list of dicts, got dict"),
    (_set(("param_groups", 2), "lr"), r"state_dict\['param_groups'\]\[2\]: expected a dict, got str"),
    (_set(("param_groups", 2, "params"), 5), r"\['params'\]: expected a list of parameter ids, got int"),
    (_set(("param_groups", 2, "params", 0), "x"), r"\['params'\]\[0\]: expected an integer id, got str"),
    (_set(("param_groups", 2, "momentum"), 0.9), r"\[2\]: unknown option\(s\) \['momentum'\]"),
    (_set(("state", 14), [1, 2]), r"state\[14\]: expected a dict, got list"),
    (_set(("state", 14, "exp_avg"), [0.0]), r"state\[14\]\['exp_avg'\]: expected a numpy.ndarray, got list"),
    (_set(("state", 99), {}), r"entries for ids \[99\] that no group lists"),
    (_set(("state", (1, 2)), {}), r"expected integer parameter ids as keys, got \(1, 2\)"),
    (_set(("extra",), 1), r"state_dict: expected the keys \['param_groups', 'state'\]"),
], ids=["state-list", "groups-dict", "group-str", "ids-int", "id-str", "unknown-option",
        "entry-list", "array-list", "extra-id", "tuple-key", "extra-key"])
def test_a_malformed_state_dict_is_a_value_error_that_changes_nothing(mutate, match, trained):
    sd = trained.state_dict()
    sd["param_groups"][0]["lr"] = 0.5
    sd["state"][0]["exp_avg"] += 1
    mutate(sd)
    before = snapshot(trained)
    with pytest.raises(ValueError, match=match):
        trained.load_state_dict(sd)
    assert_unchanged(trained, before)


@pytest.mark.parametrize("not_a_dict", [None, [], "state", np.zeros(3)])
def test_a_state_dict_that_is_not_a_dict_is_a_type_error(not_a_dict, trained):
    with pytest.raises(TypeError, match="state_dict: expected a dict"):
        trained.load_state_dict(not_a_dict)


# -- 2. loading hostile files ------------------------------------------------------------------------------

def _npy_bytes(header: dict, payload: bytes) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + payload


def _rewrite(src: Path, dst: Path, replace: dict[str, bytes | None]) -> None:
    """Copy the archive ``src`` to ``dst`` with some members replaced (or, for None, dropped)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            if name not in replace:
                zout.writestr(name, zin.read(name))
        for name, data in replace.items():
            if data is not None:
                zout.writestr(name, data)


@pytest.fixture
def saved(trained, tmp_path) -> Path:
    trained.save(tmp_path / "good.npz")
    return tmp_path / "good.npz"


def test_a_small_file_declaring_a_huge_array_is_refused_before_its_data_is_read(trained, saved, tmp_path):
    header = {"descr": "<f4", "fortran_order": False, "shape": (2**28,)}  # 1 GiB declared ...
    _rewrite(saved, tmp_path / "bomb.npz", {"state/0/exp_avg.npy": _npy_bytes(header, bytes(2**20))})  # 1 MiB there
    before = snapshot(trained)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"member 'state/0/exp_avg.npy': expected float32\(3, 4\), "
                                             r"the file declares float32\(268435456,\)"):
            trained.load(tmp_path / "bomb.npz")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**24  # nothing near the declared size was allocated
    assert_unchanged(trained, before)


@pytest.mark.parametrize("member,header", [
    ("state/1/exp_avg_sq.npy", {"descr": "<f8", "fortran_order": False, "shape": (17,)}),
    ("steps.npy", {"descr": "<i8", "fortran_order": False, "shape": (10**9,)}),
    ("steps.npy", {"descr": "<f8", "fortran_order": False, "shape": (15,)}),
    ("param_groups.npy", {"descr": "<U100000000", "fortran_order": False, "shape": ()}),
    ("param_groups.npy", {"descr": "|O", "fortran_order": False, "shape": ()}),
], ids=["state-dtype", "steps-shape", "steps-float", "huge-json-string", "object"])
def test_declared_shapes_and_dtypes_are_checked_against_the_optimizer(member, header, trained, saved, tmp_path):
    _rewrite(saved, tmp_path / "bad.npz", {member: _npy_bytes(header, b"")})
    before = snapshot(trained)
    with pytest.raises(ValueError, match=rf"member '{member}': expected .*, the file declares"):
        trained.load(tmp_path / "bad.npz")
    assert_unchanged(trained, before)


@pytest.mark.parametrize("replace,match", [
    ({"steps.npy": None}, r"missing \['steps.npy'\]"),
    ({"state/14/exp_avg.npy": None}, r"missing \['state/14/exp_avg.npy'\]"),
    ({"evil.npy": b"whatever"}, r"unexpected \['evil.npy'\]"),
    ({"state/0/max_exp_avg_sq.npy": b""}, r"unexpected \['state/0/max_exp_avg_sq.npy'\]"),  # group 0 has no amsgrad
], ids=["no-steps", "no-state", "extra-member", "extra-state-key"])
def test_members_must_be_exactly_those_save_writes(replace, match, trained, saved, tmp_path):
    _rewrite(saved, tmp_path / "bad.npz", replace)
    before = snapshot(trained)
    with pytest.raises(ValueError, match=r"not a save\(\) of this optimizer: .*" + match):
        trained.load(tmp_path / "bad.npz")
    assert_unchanged(trained, before)


def _with_param_groups_json(saved: Path, dst: Path, text: str) -> None:
    buf = io.BytesIO()
    np.save(buf, np.array(text))
    _rewrite(saved, dst, {"param_groups.npy": buf.getvalue()})


@pytest.mark.parametrize("text,match", [
    ("[" * 3000 + "]" * 3000, "'param_groups' is JSON nested too deeply"),
    ("[" * 100_000 + "]" * 100_000, "param_groups.npy': expected a string of at most"),  # too long to read at all
    ("{not json", "'param_groups' is not valid JSON"),
    ('{"lr": 1}', r"state_dict\['param_groups'\]: expected a list of dicts, got dict"),
    ("[1, 2, 3]", r"state_dict\['param_groups'\]\[0\]: expected a dict, got int"),
], ids=["deep", "deep-and-long", "not-json", "dict", "ints"])
def test_a_malformed_param_groups_json_is_a_value_error(text, match, trained, saved, tmp_path):
    _with_param_groups_json(saved, tmp_path / "bad.npz", text)
    before = snapshot(trained)
    with pytest.raises(ValueError, match=match):
        trained.load(tmp_path / "bad.npz")
    assert_unchanged(trained, before)


def test_a_file_that_is_not_an_npz_is_a_value_error(trained, tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match="not an .npz file"):
        trained.load(tmp_path / "junk.npz")


def test_a_pickled_array_in_a_checkpoint_is_never_unpickled(trained, saved, tmp_path):
    buf = io.BytesIO()
    np.save(buf, np.array([{"boom": 1}], dtype=object), allow_pickle=True)
    _rewrite(saved, tmp_path / "pickled.npz", {"param_groups.npy": buf.getvalue()})
    with pytest.raises(ValueError, match="param_groups.npy': expected a string"):
        trained.load(tmp_path / "pickled.npz")


# -- 3. save and load agree on the file name ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["ckpt", "ckpt.npz"])
@pytest.mark.parametrize("as_path", [False, True], ids=["str", "Path"])
def test_load_reads_the_file_save_wrote_with_or_without_the_suffix(name, as_path, trained, rng, tmp_path):
    target = tmp_path / name if as_path else str(tmp_path / name)
    trained.save(target)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.npz"]  # .npz appended when missing, as numpy does
    fresh = fastadam.Adam(make_groups(rng))
    fresh.load(target)
    assert fresh.steps == trained.steps


# -- 4. the optimizer's view cannot diverge from the user's ------------------------------------------------

def test_state_arrays_cannot_be_replaced_only_written_into(rng):
    params = make_params(rng)
    opt = fastadam.Adam(params)
    with pytest.raises(TypeError):
        opt.state[0]["exp_avg"] = np.zeros((3, 4), np.float32)   # the kernel would keep the old array
    with pytest.raises(TypeError):
        opt.state[0] = {}
    with pytest.raises(AttributeError):
        opt.state = ()
    # Writing into the arrays is how state is changed by hand; the kernel and state_dict see it.
    opt.state[0]["exp_avg"][...] = 7.0
    assert (opt.state_dict()["state"][0]["exp_avg"] == 7.0).all()
    opt.step(grads_for(params, rng))
    assert (opt.state[0]["exp_avg"] != 7.0).all()


def test_a_groups_params_cannot_be_appended_to(rng):
    params = make_params(rng)
    opt = fastadam.Adam(params)
    assert isinstance(opt.param_groups[0]["params"], tuple)
    with pytest.raises(AttributeError):
        opt.param_groups[0]["params"].append(np.zeros(3, np.float32))  # would never be updated


def test_a_replaced_params_list_or_an_appended_group_is_caught_at_the_next_step(rng):
    params = make_params(rng)
    opt = fastadam.Adam(params)
    before = snapshot(opt)
    opt.param_groups[0]["params"] = [*params, np.zeros(3, np.float32)]
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\] was replaced .*add_param_group"):
        opt.step(grads_for(params, rng))
    opt.param_groups[0]["params"] = before["groups"][0]["params"]  # putting it back is fine
    opt.param_groups.append({"params": [np.zeros(3, np.float32)], **fastadam.Adam(params[:1]).defaults})
    with pytest.raises(ValueError, match=r"param_groups has 2 groups but the optimizer has 1; .*add_param_group"):
        opt.step(grads_for(params, rng))
    opt.param_groups.pop()
    assert_unchanged(opt, before)
    opt.step(grads_for(params, rng))


def test_keys_other_than_hyperparameters_are_refused_at_construction_and_at_step(rng):
    params = make_params(rng)
    with pytest.raises(ValueError, match=r"param_groups\[0\]: unknown option\(s\) \['initial_lr'\]"):
        fastadam.Adam([{"params": params, "initial_lr": 0.1}])
    opt = fastadam.Adam(params)
    opt.param_groups[0]["initial_lr"] = 0.1
    with pytest.raises(ValueError, match=r"param_groups\[0\]: unknown option\(s\) \['initial_lr'\]"):
        opt.step(grads_for(params, rng))
    del opt.param_groups[0]["initial_lr"], opt.param_groups[0]["eps"]
    with pytest.raises(ValueError, match=r"param_groups\[0\]: missing option\(s\) \['eps'\]"):
        opt.step(grads_for(params, rng))


def test_hyperparameters_still_change_between_steps(rng):
    params = make_params(rng)
    opt = fastadam.Adam(params)
    opt.param_groups[0].update(lr=0.5, betas=(0.5, 0.6), weight_decay=0.1, maximize=True)
    expected = GroupReference([{"params": params, **opt.param_groups[0]}])
    step_alike(params, opt, expected, rng=rng)
    assert_all_bitwise_equal(params, expected.params())


@pytest.mark.parametrize("cls", [fastadam.Adam, fastadam.AdamW, fastadam.SparseAdam])
@pytest.mark.parametrize("shape", [(5, 3), (7,)], ids=["2-D", "1-D"])
def test_a_bare_array_is_refused_with_a_hint_to_wrap_it(cls, shape):
    W = np.zeros(shape, np.float32)
    with pytest.raises(TypeError, match=rf"params: expected a list of arrays, got a single numpy.ndarray .* "
                                        rf"wrap it in a list: {cls.__name__}\(\[W\]\)"):
        cls(W)
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]: expected a list of arrays, got a single "
                                        r"numpy.ndarray .* wrap it in a list: \{'params': \[W\]\}"):
        cls([{"params": W}])


def test_a_single_group_dict_is_refused_with_a_hint_to_wrap_it(rng):
    with pytest.raises(TypeError, match=r"params: expected a list of arrays, got a single dict; wrap it in a list"):
        fastadam.Adam({"params": make_params(rng)})


def test_generators_of_arrays_and_of_groups_keep_working(rng):
    params = make_params(rng)
    assert len(fastadam.Adam(p for p in params).state) == len(params)
    opt = fastadam.Adam({"params": (p for p in ps), "lr": lr} for ps, lr in [(params[:2], 0.1), (params[2:], 0.2)])
    assert [len(g["params"]) for g in opt.param_groups] == [2, 3]


@pytest.mark.parametrize("build", [
    lambda ps: [ps[0], ps[1], ps[0]],
    lambda ps: [{"params": [ps[0], ps[1]]}, {"params": [ps[0]]}],
], ids=["one-group", "two-groups"])
def test_the_same_array_twice_is_refused_naming_both_positions(build, rng):
    params = make_params(rng)
    with pytest.raises(ValueError, match=r"params\[2\] shares memory with params\[0\]: the same array is given twice"):
        fastadam.Adam(build(params))


# -- add_param_group ---------------------------------------------------------------------------------------

def test_a_group_added_before_the_first_step_equals_building_with_it(rng):
    groups = make_groups(rng)
    twin = copy_groups(groups)
    opt = fastadam.Adam(groups[:2])
    opt.add_param_group(groups[2])
    together = fastadam.Adam(twin)
    assert opt.state_dict()["param_groups"] == together.state_dict()["param_groups"]
    step_alike(all_params(groups), opt, together, rng=rng, steps=20)
    assert_all_bitwise_equal(all_params(groups), all_params(twin))


def test_a_group_added_mid_run_starts_at_step_zero_and_follows_the_reference(rng):
    groups = make_groups(rng)
    expected = GroupReference(groups[:2])
    opt = fastadam.Adam(groups[:2])
    step_alike(all_params(groups[:2]), opt, expected, rng=rng, steps=10)
    state_before = [s["exp_avg"] for s in opt.state]
    opt.add_param_group(groups[2])
    expected.add(groups[2])
    assert all(s["exp_avg"] is a for s, a in zip(opt.state, state_before))  # existing state kept, not copied
    n_old = len(all_params(groups[:2]))
    assert opt.steps == [10] * n_old + [0] * len(groups[2]["params"])
    step_alike(all_params(groups), opt, expected, rng=rng, steps=10)
    assert_all_bitwise_equal(all_params(groups), expected.params())
    assert opt.steps == [20] * n_old + [10] * len(groups[2]["params"])


def test_an_added_group_takes_the_defaults_and_its_own_options(rng):
    opt = fastadam.Adam(make_params(rng, shapes=[(3,)]), lr=0.25, amsgrad=False)
    opt.add_param_group({"params": make_params(rng, shapes=[(4,)]), "amsgrad": True})
    assert opt.param_groups[1]["lr"] == 0.25 and opt.param_groups[1]["amsgrad"] is True
    assert set(opt.state[1]) == {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}


@pytest.mark.parametrize("how", ["state_dict", "npz"])
def test_an_added_group_is_saved_and_restored(how, rng, tmp_path):
    groups = make_groups(rng)
    opt = fastadam.Adam(groups[:2])
    for _ in range(5):
        opt.step(grads_for(all_params(groups[:2]), rng))
    opt.add_param_group(groups[2])
    for _ in range(5):
        opt.step(grads_for(all_params(groups), rng))
    resumed_groups = copy_groups(groups)
    resumed = fastadam.Adam(resumed_groups)
    if how == "npz":
        opt.save(tmp_path / "opt")
        resumed.load(tmp_path / "opt")
    else:
        resumed.load_state_dict(opt.state_dict())
    assert resumed.steps == opt.steps
    step_alike(all_params(groups), opt, resumed, rng=rng, steps=5)
    assert_all_bitwise_equal(all_params(groups), all_params(resumed_groups))


@pytest.mark.parametrize("group,error,match", [
    (lambda ps, new: {"params": [new, ps[1]]}, ValueError,
     r"params\[6\] shares memory with params\[1\]: the same array is given twice"),
    (lambda ps, new: {"params": [new, ps[4][1:]]}, ValueError, r"params\[(4|6)\] shares memory with params\[(4|6)\]"),
    (lambda ps, new: {"params": new}, TypeError, r"param_groups\[1\]\['params'\]: .* wrap it in a list"),
    (lambda ps, new: {"params": []}, ValueError, r"param_groups\[1\]: empty parameter list"),
    (lambda ps, new: [new], TypeError, r"params\[1\]: expected a param-group dict"),
    (lambda ps, new: {"params": [new], "momentum": 0.9}, ValueError, r"param_groups\[1\]: unknown option"),
    (lambda ps, new: {"params": [new], "lr": -1.0}, ValueError, r"param_groups\[1\]: lr must be >= 0"),
    (lambda ps, new: {"params": [new, new.astype(np.float16)]}, TypeError,
     r"params\[6\]: dtype float16 needs master_weights=True"),
    (lambda ps, new: {"params": [new, [1.0]]}, TypeError, r"params\[6\]: expected a numpy.ndarray, got list"),
], ids=["same-array", "shared-memory", "bare-array", "empty", "not-a-dict", "unknown-option", "bad-lr", "float16",
        "list"])
def test_a_bad_added_group_is_refused_and_changes_nothing(group, error, match, rng):
    params = make_params(rng)
    opt = fastadam.Adam(params)
    opt.step(grads_for(params, rng))
    before = snapshot(opt)
    with pytest.raises(error, match=match):
        opt.add_param_group(group(params, np.zeros(3, np.float32)))
    assert_unchanged(opt, before)
    assert len(opt.param_groups) == 1 and len(opt.state) == len(params)
    opt.step(grads_for(params, rng))  # the optimizer still works over its own params
    assert opt.steps == [2] * len(params)



def test_numpy_scalar_hyperparameters_are_saved_as_numbers(rng, tmp_path):
    params = make_params(rng)
    twin = [p.copy() for p in params]
    opt = fastadam.Adam(params)
    opt.param_groups[0].update(lr=np.float32(1e-3), betas=(np.float64(0.8), 0.99), maximize=np.bool_(True))
    opt.save(tmp_path / "opt")  # json could not write NumPy scalars
    resumed = fastadam.Adam(twin)
    resumed.load(tmp_path / "opt")
    assert resumed.param_groups[0]["lr"] == np.float32(1e-3) and resumed.param_groups[0]["maximize"] is True
    step_alike(params, opt, resumed, rng=rng)
    assert_all_bitwise_equal(params, twin)
