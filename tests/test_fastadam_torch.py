"""fastadam.torch: Adam, AdamW and SparseAdam as torch.optim optimizers, stepped by fastadam's kernel.

Against fastadam's own NumPy optimizers, which run the same kernel, the results
are bitwise equal; so fastadam.torch agrees with ``torch.optim`` exactly as
fastadam does, and the tolerance is the one stated and justified in
tests/test_torch.py, checked with its helper: after ``STEPS`` steps, ``ULPS``
units in the last place of each array's largest magnitude (``exp_avg_sq`` and
``max_exp_avg_sq`` also of each element), for AdamW plus PyTorch's own
decay-factor bias and extra rounding.  Two refinements, each derived below
where it is used, not widened to pass:

* ``exp_avg`` is compared at the scale of what enters it, the larger of its
  largest magnitude and ``(1 - beta1)`` times the largest gradient: each step
  rounds ``(1 - beta1) * g`` (PyTorch ``(g - m) * (1 - beta1)``), so the two
  differ by ulps of that term, and in a small tensor whose gradients cancel,
  ``|m|`` can be far below it (seen: 17 ulp of ``max|m|`` but 2.1 ulp of
  ``0.1 * max|g|`` for a 5-element tensor, the same with fastadam.Adam on
  NumPy arrays);
* torch.optim.SparseAdam decays ``exp_avg_sq`` by ``1 - fl(1 - beta2)``
  (``v + (g * g - v) * (1 - beta2)``), fastadam by ``fl(beta2)``, as dense
  torch.optim.Adam does: a relative drift of
  ``|fl(beta2) - (1 - fl(1 - beta2))|`` per step, which ``beta2``'s slow
  contraction lets build up (11 ulp after 100 steps in float32).  The rest checks that the
torch.optim machinery works: state dicts both ways, every LR scheduler,
GradScaler, params without grads, hooks, version counters, sparse embeddings,
bfloat16 params with float32 master weights, ZeroRedundancyOptimizer.
"""

from __future__ import annotations

import doctest
import importlib.util
import json
import re
import subprocess
import sys
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed (CI installs torch==2.13.0 CPU)")
pytestmark = pytest.mark.torch

import fastadam  # noqa: E402
import fastadam.torch  # noqa: E402
from conftest import assert_bitwise_equal  # noqa: E402
from test_torch import STEPS, ULPS, assert_within_ulps, torch_decay_factor_error  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

#: The CPU configurations of torch.testing._internal.common_optimizers.optim_inputs_func_adam (which
#: optim_inputs_func_adamw returns too) in torch 2.13, by their descriptions: what torch's own test suite
#: runs Adam and AdamW with.  Copied, because that module cannot be imported without the expecttest
#: package; test_the_configurations_are_torchs_own compares them with torch's where it can be imported.
TORCH_CPU_CONFIGS = {
    "default": {},
    "non-default lr": {"lr": 0.01},
    "nonzero weight_decay": {"weight_decay": 0.1},
    "maximize": {"weight_decay": 0.1, "maximize": True},
    "amsgrad": {"weight_decay": 0.1, "amsgrad": True},
}
#: torch's lists for MPS/CUDA and for SparseAdam add a one-element tensor lr, which the CPU runs too.
#: It is made in the params' dtype: torch computes its step size in the lr tensor's dtype (a float32 lr
#: makes torch's float64 trajectory float32-accurate; fastadam reads the lr's value as a double).
CONFIGS = {**TORCH_CPU_CONFIGS, "Tensor lr": {"lr": "tensor(0.01)"}}

#: torch.optim's three implementations of the same algorithm.
IMPLEMENTATIONS = {"fused": dict(fused=True), "foreach": dict(foreach=True), "single-tensor": dict(foreach=False)}


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)  # the modules' initial weights: every test sees the same numbers on every run


@pytest.fixture(autouse=True, scope="module")
def torch_on_one_thread():
    # torch's intra-op threads wait for each other on a busy machine: a 100-step trajectory of small tensors
    # took 20x as long on two threads.  Element-wise results do not depend on the thread count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def options(config: dict, dtype=torch.float32) -> dict:
    """A config with its tensor lr made (a fresh tensor for each optimizer)."""
    return {k: torch.tensor(0.01, dtype=dtype) if v == "tensor(0.01)" else v for k, v in config.items()}


def heavy_tailed(shape, dtype, gen: torch.Generator) -> torch.Tensor:
    """Gradients over a wide range of magnitudes, as in tests/test_torch.py."""
    return torch.randn(shape, dtype=dtype, generator=gen) * torch.exp(torch.randn(shape, dtype=dtype, generator=gen))


def twin_params(shapes, dtype, seed: int = 7, channels_last: bool = True) -> tuple[list, list]:
    """Two lists of equal Parameters; a 4-D one is channels_last, as a convolution's often is."""
    gen = torch.Generator().manual_seed(seed)
    start = [torch.randn(s, dtype=dtype, generator=gen) for s in shapes]

    def make(t: torch.Tensor) -> torch.nn.Parameter:
        t = t.clone()
        if t.dim() == 4 and channels_last:
            t = t.to(memory_format=torch.channels_last)
        return torch.nn.Parameter(t)

    return [make(t) for t in start], [make(t) for t in start]


def set_grads(params_lists, grads) -> None:
    """New grad tensors for every list (as after zero_grad() and backward), the same values for all.

    Each is laid out as its param, as autograd lays gradients out.  (torch.optim.Adam(fused=True) on the
    CPU misreads a gradient laid out otherwise, a channels_last param's contiguous one, in torch 2.13.)
    """
    for params in params_lists:
        for p, g in zip(params, grads):
            p.grad = None if g is None else torch.empty_like(p, dtype=g.dtype).copy_(g)


def assert_exp_avg_within_ulps(actual: np.ndarray, expected: np.ndarray, largest_grad: float, what: str,
                               beta1: float = 0.9) -> None:
    """ULPS ulps of the larger of max|m| and (1 - beta1) * max|g|, the largest term a step adds into m."""
    scale = max(float(np.max(np.abs(expected), initial=0)), (1 - beta1) * largest_grad)
    tolerance = ULPS * float(np.spacing(expected.dtype.type(scale)))
    diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    assert (diff <= tolerance).all(), f"{what}: differs by {diff.max():.3g} > {ULPS} ulp of {scale:.3g}"


class LargestGrads:
    """The largest |gradient| each param has stepped with: the scale of its exp_avg."""

    def __init__(self, count: int) -> None:
        self.values = [0.0] * count

    def see(self, grads, scale: float = 1.0) -> None:
        for i, g in enumerate(grads):
            if isinstance(g, torch.nn.Parameter):
                g = g.grad
            if g is None:
                continue
            values = g.coalesce()._values() if g.is_sparse else g
            if values.numel():
                self.values[i] = max(self.values[i], float(values.abs().max()) / scale)


def assert_agree_with_torch(ours, opt, theirs, reference, steps: int, adamw: bool, lr: float = 1e-3,
                            weight_decay: float = 0.0, amsgrad: bool = False, dtype=torch.float32,
                            largest_grads=()) -> None:
    """The stated tolerance (module docstring) between two optimizers after ``steps`` steps.

    ``largest_grads``: the largest |gradient| each param stepped with (LargestGrads), the scale of its
    exp_avg.
    """
    assert len(largest_grads) == len(ours)
    bias = steps * torch_decay_factor_error(lr, weight_decay, np.dtype(str(dtype).split(".")[1])) if adamw else 0
    for i, (p, q) in enumerate(zip(ours, theirs)):
        mine, other = opt.state[p], reference.state[q]
        assert_within_ulps(p.detach().numpy(), q.detach().numpy(), f"params[{i}]", relative_bias=bias,
                           extra_ulps=steps / 2 if adamw else 0)
        assert_exp_avg_within_ulps(mine["exp_avg"].numpy(), other["exp_avg"].numpy(),
                                   largest_grads[i], f"exp_avg[{i}]")
        for elementwise in (False, True):
            assert_within_ulps(mine["exp_avg_sq"].numpy(), other["exp_avg_sq"].numpy(), f"exp_avg_sq[{i}]",
                               elementwise=elementwise)
        if amsgrad:
            assert_within_ulps(mine["max_exp_avg_sq"].numpy(), other["max_exp_avg_sq"].numpy(),
                               f"max_exp_avg_sq[{i}]", elementwise=True)
        assert float(mine["step"]) == float(other["step"])


# -- trajectories ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_100_steps_agree_with_torch_optim_within_the_stated_ulps(dtype, name, config, implementation):
    if config == "Tensor lr" and implementation == "foreach":
        pytest.skip("torch.optim refuses a tensor lr with foreach=True (and capturable=False)")
    shapes = [(64, 33), (1000,), (5,), (4, 3, 5, 6)]
    ours, theirs = twin_params(shapes, dtype)
    reference = getattr(torch.optim, name)(theirs, **options(CONFIGS[config], dtype),
                                           **IMPLEMENTATIONS[implementation])
    opt = getattr(fastadam.torch, name)(ours, **options(CONFIGS[config], dtype))
    gen = torch.Generator().manual_seed(11)
    largest = [0.0] * len(shapes)
    for _ in range(STEPS):
        grads = [heavy_tailed(s, dtype, gen) for s in shapes]
        largest = [max(m, float(g.abs().max())) for m, g in zip(largest, grads)]
        set_grads([ours, theirs], grads)
        reference.step()
        opt.step()
    group = opt.param_groups[0]
    assert_agree_with_torch(ours, opt, theirs, reference, STEPS, adamw=name == "AdamW", lr=float(group["lr"]),
                            weight_decay=group["weight_decay"], amsgrad=group["amsgrad"], dtype=dtype,
                            largest_grads=largest)


@pytest.mark.skipif(importlib.util.find_spec("expecttest") is None,
                    reason="torch.testing._internal.common_optimizers needs the expecttest package")
def test_the_configurations_are_torchs_own():
    # In a child interpreter: torch's test utilities change global settings when imported.
    code = ("import json\nfrom torch.testing._internal.common_optimizers import optim_inputs_func_adam\n"
            "print(json.dumps({i.desc: i.kwargs for i in optim_inputs_func_adam('cpu')}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == TORCH_CPU_CONFIGS


def test_one_kernel_call_steps_every_group_with_its_own_options():
    shapes = [(50,), (7, 3), (20,)]
    ours, theirs = twin_params(shapes, torch.float32)
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": 1e-2, "amsgrad": True, "weight_decay": 0.1}]
    reference = torch.optim.Adam(groups(theirs), lr=3e-3, foreach=False)
    opt = fastadam.torch.Adam(groups(ours), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    largest = LargestGrads(3)
    for _ in range(STEPS):
        grads = [heavy_tailed(s, torch.float32, gen) for s in shapes]
        largest.see(grads)
        set_grads([ours, theirs], grads)
        reference.step()
        opt.step()
    assert len(opt._prepared_step.entries) == 3  # all three params of both groups in the one plan
    assert_agree_with_torch(ours[:2], opt, theirs[:2], reference, STEPS, adamw=False,
                            largest_grads=largest.values[:2])
    assert_agree_with_torch(ours[2:], opt, theirs[2:], reference, STEPS, adamw=False, amsgrad=True,
                            largest_grads=largest.values[2:])


def test_the_numpy_optimizer_and_the_torch_one_are_bitwise_equal():
    # Same kernel, same formula: no tolerance between fastadam.AdamW on arrays and fastadam.torch.AdamW.
    ours, _ = twin_params([(300,), (6, 5)], torch.float64, channels_last=False)
    arrays = [p.detach().numpy().copy() for p in ours]
    opt = fastadam.torch.AdamW(ours, lr=1e-2, amsgrad=True)
    numpy_opt = fastadam.AdamW(arrays, lr=1e-2, amsgrad=True)
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        grads = [heavy_tailed(p.shape, torch.float64, gen) for p in ours]
        set_grads([ours], grads)
        opt.step()
        numpy_opt.step([g.numpy() for g in grads])
    for i, (p, a) in enumerate(zip(ours, arrays)):
        assert_bitwise_equal(p.detach().numpy(), a, f"params[{i}]")
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert_bitwise_equal(opt.state[p][key].numpy(), numpy_opt.state[i][key], f"{key}[{i}]")


@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
def test_eps_before_bias_correction_is_bitwise_the_numpy_optimizers(cls):
    # The epsilon of Keras and scikit-learn (see tests/test_eps_placement.py), a group key like the others.
    ours, _ = twin_params([(300,), (6, 5)], torch.float64, channels_last=False)
    arrays = [p.detach().numpy().copy() for p in ours]
    opt = getattr(fastadam.torch, cls)(ours, lr=1e-2, eps=1e-3, eps_before_bias_correction=True)
    numpy_opt = getattr(fastadam, cls)(arrays, lr=1e-2, eps=1e-3, eps_before_bias_correction=True)
    gen = torch.Generator().manual_seed(2)
    for _ in range(10):
        grads = [heavy_tailed(p.shape, torch.float64, gen) * 1e-3 for p in ours]
        set_grads([ours], grads)
        opt.step()
        numpy_opt.step([g.numpy() for g in grads])
    for i, (p, a) in enumerate(zip(ours, arrays)):
        assert_bitwise_equal(p.detach().numpy(), a, f"params[{i}]")
    assert opt.state_dict()["param_groups"][0]["eps_before_bias_correction"] is True


def test_fresh_bfloat16_moments_start_apart_modulo_4_kib_as_fastadam_adams():
    # (README: "Optimizer state in bfloat16": equal offsets halved the step's speed at 2^26 params.)
    w = torch.nn.Parameter(torch.randn(300, 70))
    w.grad = torch.randn(300, 70)
    opt = fastadam.torch.Adam([w], state_dtype="bfloat16", amsgrad=True)
    opt.step()
    s = opt.state[w]
    keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    assert len({s[key].data_ptr() % 4096 for key in keys}) == 3
    for key in keys:
        assert s[key].dtype is torch.bfloat16 and s[key].shape == w.shape and s[key].stride() == w.stride()


def test_bfloat16_state_is_bitwise_the_numpy_optimizers_and_loads_torchs_float32_checkpoints():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(100, 80), torch.nn.ReLU(), torch.nn.Linear(80, 10))
    arrays = [p.detach().numpy().copy() for p in model.parameters()]
    opt = fastadam.torch.AdamW(model.parameters(), lr=1e-2, amsgrad=True, state_dtype="bfloat16")
    numpy_opt = fastadam.AdamW(arrays, lr=1e-2, amsgrad=True, state_dtype="bfloat16")
    x = torch.randn(32, 100)
    for _ in range(5):
        opt.zero_grad()
        model(x).square().mean().backward()
        grads = [p.grad.numpy().copy() for p in model.parameters()]
        opt.step()
        numpy_opt.step(grads)
    for i, (p, a) in enumerate(zip(model.parameters(), arrays)):
        assert_bitwise_equal(p.detach().numpy(), a, f"params[{i}]")
    weight, bias = list(model.parameters())[:2]  # 8000 elements, and 80 (below min_compressed_size)
    assert {k: v.dtype for k, v in opt.state[weight].items() if k != "step"} == dict.fromkeys(
        ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), torch.bfloat16)
    assert opt.state[bias]["exp_avg"].dtype is torch.float32

    # torch.optim.AdamW's float32 moments load into bfloat16 state, rounded to nearest-even.
    theirs = torch.optim.AdamW(model.parameters(), lr=1e-2, amsgrad=True)
    model(x).square().mean().backward()
    theirs.step()
    ours = fastadam.torch.AdamW(model.parameters(), lr=1e-2, amsgrad=True, state_dtype="bfloat16")
    ours.load_state_dict(theirs.state_dict())
    ours._prepare()  # what the next step does first: adopt (here: convert) the loaded state
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        converted = ours.state[weight][key]
        assert converted.dtype is torch.bfloat16
        assert torch.equal(converted.view(torch.int16), theirs.state[weight][key].to(torch.bfloat16).view(torch.int16))


# -- params without grads ----------------------------------------------------------------------------------

def test_params_without_grads_are_skipped_and_their_step_count_stays_as_in_torch():
    shapes = [(10,), (10,), (10,)]
    ours, theirs = twin_params(shapes, torch.float32)
    reference = torch.optim.Adam(theirs, lr=1e-2, foreach=False)
    opt = fastadam.torch.Adam(ours, lr=1e-2)
    gen = torch.Generator().manual_seed(3)
    largest = LargestGrads(3)
    # params[2] gets no grad until step 5; params[1] has none at steps 3 and 4.
    for step in range(1, 9):
        grads = [torch.randn(10, generator=gen) for _ in shapes]
        grads[1] = None if step in (3, 4) else grads[1]
        grads[2] = None if step < 5 else grads[2]
        largest.see(grads)
        set_grads([ours, theirs], grads)
        frozen = ours[2].detach().clone()
        reference.step()
        opt.step()
        if step < 5:
            assert ours[2] not in opt.state or not opt.state[ours[2]]
            assert_bitwise_equal(ours[2].detach().numpy(), frozen.numpy())
        assert sorted(opt.state_dict()["state"]) == sorted(reference.state_dict()["state"])
    assert [float(opt.state[p]["step"]) for p in ours] == [8.0, 6.0, 4.0]
    assert_agree_with_torch(ours, opt, theirs, reference, 8, adamw=False, lr=1e-2, largest_grads=largest.values)


def test_a_step_with_no_grads_at_all_changes_nothing():
    p = torch.nn.Parameter(torch.ones(3))
    opt = fastadam.torch.Adam([p])
    opt.step()
    assert (p.detach() == 1).all() and not opt.state[p]


# -- state dicts ---------------------------------------------------------------------------------------------

def run_steps(opts_and_params, shapes, steps: int, seed: int, largest: LargestGrads | None = None) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        grads = [heavy_tailed(s, torch.float32, gen) for s in shapes]
        if largest is not None:
            largest.see(grads)
        for opt, params in opts_and_params:
            set_grads([params], grads)
            opt.step()


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
@pytest.mark.parametrize("direction", ["torch-to-fastadam", "fastadam-to-torch"])
def test_a_checkpoint_continues_in_the_other_library_within_the_stated_ulps(direction, amsgrad, tmp_path):
    shapes = [(40, 3), (17,)]
    first, uninterrupted = twin_params(shapes, torch.float32)
    source_cls, target_cls = (torch.optim.Adam, fastadam.torch.Adam) if direction == "torch-to-fastadam" \
        else (fastadam.torch.Adam, torch.optim.Adam)
    source = source_cls(first, lr=1e-2, amsgrad=amsgrad)
    whole = torch.optim.Adam(uninterrupted, lr=1e-2, amsgrad=amsgrad, foreach=False)
    largest = LargestGrads(len(shapes))
    run_steps([(source, first), (whole, uninterrupted)], shapes, 40, seed=5, largest=largest)

    torch.save({"params": [p.detach() for p in first], "optim": source.state_dict()}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)  # plain tensors and dicts only
    resumed = [torch.nn.Parameter(t.clone()) for t in ckpt["params"]]
    target = target_cls(resumed, lr=0.5, amsgrad=amsgrad)
    target.load_state_dict(ckpt["optim"])
    assert target.param_groups[0]["lr"] == 1e-2  # the checkpoint's, as in torch
    run_steps([(target, resumed), (whole, uninterrupted)], shapes, STEPS - 40, seed=6, largest=largest)
    # 40 steps of one library, 60 of the other, against 100 of torch alone.
    assert_agree_with_torch(resumed, target, uninterrupted, whole, STEPS, adamw=False, lr=1e-2, amsgrad=amsgrad,
                            largest_grads=largest.values)


def test_resuming_from_a_state_dict_gives_the_bitwise_trajectory_of_an_uninterrupted_run(tmp_path):
    shapes = [(33,), (8, 8)]
    a, b = twin_params(shapes, torch.float32)
    whole = fastadam.torch.AdamW(a, lr=1e-2, amsgrad=True)
    part = fastadam.torch.AdamW(b, lr=1e-2, amsgrad=True)
    run_steps([(whole, a), (part, b)], shapes, 10, seed=1)
    torch.save(part.state_dict(), tmp_path / "opt.pt")
    fresh = fastadam.torch.AdamW(b, lr=1e-2, amsgrad=True)
    fresh.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    run_steps([(whole, a), (fresh, b)], shapes, 10, seed=2)
    for p, q in zip(a, b):
        assert_bitwise_equal(q.detach().numpy(), p.detach().numpy())
        assert_bitwise_equal(fresh.state[q]["exp_avg_sq"].numpy(), whole.state[p]["exp_avg_sq"].numpy())


def test_the_state_dict_has_torchs_format():
    ours, theirs = twin_params([(6,)], torch.float32)
    opt, reference = fastadam.torch.Adam(ours, amsgrad=True), torch.optim.Adam(theirs, amsgrad=True)
    run_steps([(opt, ours), (reference, theirs)], [(6,)], 3, seed=0)
    mine, other = opt.state_dict(), reference.state_dict()
    assert mine["param_groups"] == other["param_groups"]
    assert type(mine["state"][0]) is dict and mine["state"][0].keys() == other["state"][0].keys()
    assert mine["state"][0]["step"].dtype == other["state"][0]["step"].dtype and mine["state"][0]["step"] == 3


def test_a_loaded_state_is_copied_in_and_never_shared_with_the_state_dict():
    ours, _ = twin_params([(6,)], torch.float32)
    opt = fastadam.torch.Adam(ours)
    run_steps([(opt, ours)], [(6,)], 2, seed=0)
    sd = opt.state_dict()
    other_params, _ = twin_params([(6,)], torch.float32)
    other = fastadam.torch.Adam(other_params)
    other.load_state_dict(sd)
    saved = sd["state"][0]["exp_avg"].clone()
    run_steps([(other, other_params)], [(6,)], 1, seed=1)
    assert torch.equal(sd["state"][0]["exp_avg"], saved)  # stepping `other` left opt's state alone


@pytest.mark.parametrize("corrupt, match", [
    (lambda sd: sd["state"][1].__setitem__("exp_avg", torch.zeros(3)),
     r"state_dict\['state'\]\[1\] \(for param_groups\[0\]\['params'\]\[1\]\)\['exp_avg'\]: expected a "
     r"floating-point tensor of shape \(17,\), got torch.float32 tensor of shape \(3,\)"),
    (lambda sd: sd["state"][0].pop("exp_avg_sq"), r"state_dict\['state'\]\[0\] .*: no 'exp_avg_sq'"),
    (lambda sd: sd["state"][0].__setitem__("step", torch.tensor(-1.0)), r"a step count must be a whole number"),
    (lambda sd: sd["param_groups"][0].__setitem__("capturable", True), r"capturable=True is not supported"),
    (lambda sd: sd["param_groups"][0].__setitem__("lr", -1.0), r"Invalid learning rate: -1.0"),
    (lambda sd: sd["param_groups"][0]["params"].pop(), r"state_dict has 1 params, this optimizer 2"),
], ids=["shape", "missing", "step", "capturable", "lr", "group-size"])
def test_a_bad_state_dict_is_refused_and_changes_nothing(corrupt, match):
    shapes = [(40, 3), (17,)]
    ours, _ = twin_params(shapes, torch.float32)
    opt = fastadam.torch.Adam(ours, lr=1e-2)
    run_steps([(opt, ours)], shapes, 2, seed=0)
    sd = opt.state_dict()
    sd = {"state": {k: {key: (v.clone() if isinstance(v, torch.Tensor) else v) for key, v in s.items()}
                    for k, s in sd["state"].items()},
          "param_groups": [{**g, "params": list(g["params"])} for g in sd["param_groups"]]}
    before = {id(t): (t, t.clone()) for s in opt.state.values() for t in s.values()}
    corrupt(sd)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 1e-2 and not opt.param_groups[0]["capturable"]
    now = [t for s in opt.state.values() for t in s.values()]
    assert {id(t) for t in now} == set(before) and all(torch.equal(t, c) for t, c in before.values())
    run_steps([(opt, ours)], shapes, 1, seed=0)  # and still steps


# -- LR schedulers -----------------------------------------------------------------------------------------

def _schedulers():
    L = torch.optim.lr_scheduler
    return {
        "LambdaLR": lambda o: L.LambdaLR(o, lambda epoch: 0.9 ** epoch),
        "MultiplicativeLR": lambda o: L.MultiplicativeLR(o, lambda epoch: 0.9),
        "StepLR": lambda o: L.StepLR(o, step_size=3, gamma=0.5),
        "MultiStepLR": lambda o: L.MultiStepLR(o, milestones=[2, 5], gamma=0.5),
        "ConstantLR": lambda o: L.ConstantLR(o, factor=0.5, total_iters=4),
        "LinearLR": lambda o: L.LinearLR(o, start_factor=0.2, total_iters=5),
        "ExponentialLR": lambda o: L.ExponentialLR(o, gamma=0.8),
        "SequentialLR": lambda o: L.SequentialLR(o, [L.LinearLR(o, start_factor=0.2, total_iters=3),
                                                     L.ExponentialLR(o, gamma=0.8)], milestones=[3]),
        "PolynomialLR": lambda o: L.PolynomialLR(o, total_iters=8, power=2.0),
        "CosineAnnealingLR": lambda o: L.CosineAnnealingLR(o, T_max=6),
        "ChainedScheduler": lambda o: L.ChainedScheduler([L.ConstantLR(o, factor=0.5, total_iters=3),
                                                          L.ExponentialLR(o, gamma=0.8)], optimizer=o),
        "ReduceLROnPlateau": lambda o: L.ReduceLROnPlateau(o, patience=0, factor=0.5),
        "CyclicLR": lambda o: L.CyclicLR(o, base_lr=1e-3, max_lr=1e-2, step_size_up=3),  # cycles beta1 too
        "CosineAnnealingWarmRestarts": lambda o: L.CosineAnnealingWarmRestarts(o, T_0=3),
        "OneCycleLR": lambda o: L.OneCycleLR(o, max_lr=1e-2, total_steps=12),  # cycles beta1 too
    }


SCHEDULERS = _schedulers()


def test_every_scheduler_of_torch_optim_lr_scheduler_is_tested():
    L = torch.optim.lr_scheduler
    classes = {name for name, obj in vars(L).items() if isinstance(obj, type) and issubclass(obj, L.LRScheduler)
               and obj.__module__ == L.__name__ and not name.startswith("_") and obj is not L.LRScheduler}
    assert classes == set(SCHEDULERS)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_lr_schedulers_drive_it_as_they_drive_torch_optim_adam(scheduler):
    shapes = [(30,), (4, 5)]
    ours, theirs = twin_params(shapes, torch.float32)
    opt = fastadam.torch.Adam(ours, lr=1e-2)
    reference = torch.optim.Adam(theirs, lr=1e-2, foreach=False)
    ours_sched, their_sched = SCHEDULERS[scheduler](opt), SCHEDULERS[scheduler](reference)
    gen = torch.Generator().manual_seed(0)
    largest = LargestGrads(len(shapes))
    for step in range(12):
        grads = [heavy_tailed(s, torch.float32, gen) for s in shapes]
        largest.see(grads)
        set_grads([ours, theirs], grads)
        opt.step()
        reference.step()
        args = (1.0,) if scheduler == "ReduceLROnPlateau" else ()  # a loss that never improves
        ours_sched.step(*args)
        their_sched.step(*args)
        assert opt.param_groups[0]["lr"] == reference.param_groups[0]["lr"]
        assert opt.param_groups[0]["betas"] == reference.param_groups[0]["betas"]
    assert_agree_with_torch(ours, opt, theirs, reference, 12, adamw=False, lr=1e-2, largest_grads=largest.values)


# -- GradScaler ----------------------------------------------------------------------------------------------

def copy_grads(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """The same gradient values for ``target``: a comparison of trajectories feeds both the same gradients
    (gradients computed from each model's own params would carry their ulp differences back in)."""
    for p, q in zip(source.parameters(), target.parameters()):
        q.grad = p.grad.clone()


@pytest.mark.parametrize("unscale_first", [False, True], ids=["scaled", "unscale_-then-step"])
def test_grad_scaler_unscales_in_the_kernel_and_skips_a_step_with_an_inf(unscale_first):
    # Loss scaling by a power of two is exact, so the scaled run must equal, bit for bit, a run stepped with
    # the unscaled gradients that leaves out the step with the inf; torch.optim.Adam(fused=True), torch's
    # amp-aware optimizer, under its own GradScaler, must see the same scales and the same skip.
    model, unscaled_model, reference_model = (
        torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)) for _ in range(3))
    unscaled_model.load_state_dict(model.state_dict())
    reference_model.load_state_dict(model.state_dict())
    opt = fastadam.torch.Adam(model.parameters(), lr=1e-2)
    unscaled = fastadam.torch.Adam(unscaled_model.parameters(), lr=1e-2)
    reference = torch.optim.Adam(reference_model.parameters(), lr=1e-2, fused=True)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**12) for _ in range(2)]
    gen = torch.Generator().manual_seed(0)
    for step in range(1, 21):
        x, y = torch.randn(16, 6, generator=gen), torch.randn(16, 1, generator=gen)
        before = [p.detach().clone() for p in model.parameters()]
        scale = scalers[0].get_scale()
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        scalers[0].scale(loss).backward()
        scalers[1].scale(loss.detach())  # the reference's scaler scales the same loss; its grads are copied
        if step == 7:
            model[0].weight.grad[2, 3] = float("inf")
        else:
            for p, q in zip(model.parameters(), unscaled_model.parameters()):
                q.grad = p.grad / scale
            unscaled.step()
        copy_grads(model, reference_model)
        for o, scaler in ((opt, scalers[0]), (reference, scalers[1])):
            if unscale_first:  # as for clipping the gradients before the step
                scaler.unscale_(o)
            scaler.step(o)
            scaler.update()
        if step == 7:  # skipped: nothing changed, no step counted, the scale backed off
            for p, b in zip(model.parameters(), before):
                assert_bitwise_equal(p.detach().numpy(), b.numpy())
            assert scalers[0].get_scale() == 2.0**11
        assert scalers[0].get_scale() == scalers[1].get_scale()
        assert [float(opt.state[p]["step"]) for p in model.parameters()] == \
            [float(reference.state[p]["step"]) for p in reference_model.parameters()] == [step - (step >= 7)] * 4
    for p, q in zip(model.parameters(), unscaled_model.parameters()):
        assert_bitwise_equal(p.detach().numpy(), q.detach().numpy())


# -- hooks, version counters ---------------------------------------------------------------------------------

def test_the_step_and_state_dict_hooks_of_torch_optim_run():
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    p = torch.nn.Parameter(torch.ones(4))
    opt = fastadam.torch.Adam([p])
    calls = []
    handles = [
        opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o))),
        opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o))),
        register_optimizer_step_pre_hook(lambda o, a, k: calls.append(("global pre", o))),
        opt.register_state_dict_pre_hook(lambda o: calls.append(("sd pre", o))),
        opt.register_state_dict_post_hook(lambda o, sd: calls.append(("sd post", o))),
        opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append(("load pre", o))),
        opt.register_load_state_dict_post_hook(lambda o: calls.append(("load post", o))),
    ]
    p.grad = torch.ones(4)
    opt.step()
    opt.load_state_dict(opt.state_dict())
    assert calls == [(name, opt) for name in ("global pre", "pre", "post", "sd pre", "sd post", "load pre",
                                              "load post")]
    assert float(opt.state[p]["step"]) == 1 and (p.detach() < 1).all()
    for h in handles:
        h.remove()
    calls.clear()
    opt.step()
    assert calls == [] and float(opt.state[p]["step"]) == 2


def test_a_pre_hook_may_replace_the_steps_arguments():
    p = torch.nn.Parameter(torch.ones(4))
    opt = fastadam.torch.Adam([p])

    def closure():
        p.grad = torch.ones(4)
        return "loss"

    opt.register_step_pre_hook(lambda o, args, kwargs: ((args[0], closure), {}))
    assert opt.step() == "loss" and float(opt.state[p]["step"]) == 1


def test_the_profiler_sees_the_step_under_torchs_name():
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.ones(4)
    opt = fastadam.torch.AdamW([p])
    with torch.profiler.profile() as prof:
        opt.step()
    assert "Optimizer.step#AdamW.step" in {e.name for e in prof.events()}


def test_a_step_bumps_the_version_counters_so_autograd_sees_the_update():
    w = torch.nn.Parameter(torch.randn(5))
    opt = fastadam.torch.Adam([w])
    w.grad = torch.ones(5)
    opt.step()
    versions = [w._version, opt.state[w]["exp_avg"]._version, opt.state[w]["step"]._version]
    loss = (w * w).sum()  # saves w for its backward pass
    w.grad = torch.ones(5)
    opt.step()
    assert all(a > b for a, b in zip([w._version, opt.state[w]["exp_avg"]._version,
                                      opt.state[w]["step"]._version], versions))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# -- sparse gradients ----------------------------------------------------------------------------------------

def embedding_batches(rows: int, steps: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        # Repeated indices, most rows never present: the lazy update's cases.
        yield torch.randint(0, rows // 4, (60,), generator=gen), torch.randn(60, 8, generator=gen)


@pytest.mark.parametrize("maximize", [False, True])
def test_sparse_adam_on_an_embedding_agrees_with_torch_sparse_adam(maximize):
    ours, theirs = (torch.nn.Embedding(200, 8, sparse=True) for _ in range(2))
    theirs.load_state_dict(ours.state_dict())
    start = ours.weight.detach().clone()
    opt = fastadam.torch.SparseAdam(ours.parameters(), lr=1e-2, maximize=maximize)
    reference = torch.optim.SparseAdam(theirs.parameters(), lr=1e-2, maximize=maximize)
    largest = 0.0
    for indices, weights in embedding_batches(200, STEPS, seed=0):
        for emb, o in ((ours, opt), (theirs, reference)):
            o.zero_grad()
            (emb(indices) * weights).sum().backward()
            o.step()
        largest = max(largest, float(theirs.weight.grad.coalesce()._values().abs().max()))
    # The stated tolerance, with exp_avg_sq's drift from torch's other decay (module docstring).
    assert_within_ulps(ours.weight.detach().numpy(), theirs.weight.detach().numpy(), "weight")
    assert_exp_avg_within_ulps(opt.state[ours.weight]["exp_avg"].numpy(),
                               reference.state[theirs.weight]["exp_avg"].numpy(), largest, "exp_avg")
    beta2 = Fraction(0.999)
    drift = abs(Fraction(float(np.float32(beta2))) - (1 - Fraction(float(np.float32(1 - beta2)))))
    assert_within_ulps(opt.state[ours.weight]["exp_avg_sq"].numpy(),
                       reference.state[theirs.weight]["exp_avg_sq"].numpy(), "exp_avg_sq",
                       relative_bias=STEPS * float(drift))
    # Rows no batch touched: not a bit changed, moments still zero.
    untouched = slice(50, None)
    assert_bitwise_equal(ours.weight.detach()[untouched].numpy(), start[untouched].numpy())
    assert not opt.state[ours.weight]["exp_avg"][untouched].any()
    assert opt.state_dict()["state"][0]["step"] == reference.state_dict()["state"][0]["step"] == STEPS


def test_adam_takes_a_sparse_gradient_as_the_lazy_update_bitwise_like_fastadam_adam():
    emb = torch.nn.Embedding(100, 8, sparse=True)
    head = torch.nn.Parameter(torch.randn(8))
    table, vector = emb.weight.detach().numpy().copy(), head.detach().numpy().copy()
    opt = fastadam.torch.Adam([emb.weight, head], lr=1e-2, weight_decay=0.1)
    numpy_opt = fastadam.Adam([table, vector], lr=1e-2, weight_decay=0.1)
    for indices, weights in embedding_batches(100, 20, seed=1):
        opt.zero_grad()
        (emb(indices) * weights * head).sum().backward()
        grad = emb.weight.grad  # uncoalesced: fastadam sums the repeated rows
        assert grad.is_sparse and not grad.is_coalesced()
        numpy_grads = [fastadam.RowSparseGrad(grad._indices()[0].numpy().copy(), grad._values().numpy().copy()),
                       head.grad.numpy().copy()]
        opt.step()
        numpy_opt.step(numpy_grads)
    assert_bitwise_equal(emb.weight.detach().numpy(), table)
    assert_bitwise_equal(head.detach().numpy(), vector)


def test_sparse_adam_refuses_dense_gradients_and_dense_adam_options_as_torch_does():
    p = torch.nn.Parameter(torch.zeros(4, 2))
    opt = fastadam.torch.SparseAdam([p])
    p.grad = torch.ones(4, 2)
    with pytest.raises(RuntimeError, match="SparseAdam does not support dense gradients"):
        opt.step()
    assert not p.detach().any()
    with pytest.raises(ValueError, match="Invalid learning rate"):
        fastadam.torch.SparseAdam([p], lr=0.0)  # torch's SparseAdam wants lr > 0
    with pytest.raises(TypeError):
        fastadam.torch.SparseAdam([p], weight_decay=0.1)


# -- float16 / bfloat16 params -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_low_precision_params_step_through_float32_master_weights_bitwise_like_fastadam_adam(dtype):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    numpy_dtype = ml_dtypes.bfloat16 if dtype is torch.bfloat16 else np.float16
    gen = torch.Generator().manual_seed(4)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in [(64, 9), (300,)]]
    arrays = [p.detach().float().numpy().astype(numpy_dtype) for p in params]
    opt = fastadam.torch.AdamW(params, lr=1e-2, master_weights=True)
    numpy_opt = fastadam.AdamW(arrays, lr=1e-2, master_weights=True)
    for _ in range(30):
        grads = [torch.randn(p.shape, generator=gen).to(dtype) for p in params]
        set_grads([params], grads)
        opt.step()
        numpy_opt.step([g.float().numpy().astype(numpy_dtype) for g in grads])
    for i, (p, a) in enumerate(zip(params, arrays)):
        assert p.dtype is dtype and opt.state[p]["exp_avg"].dtype is torch.float32
        assert_bitwise_equal(p.detach().float().numpy(), a.astype(np.float32), f"params[{i}]")
        for key in ("master_param", "exp_avg", "exp_avg_sq"):
            assert_bitwise_equal(opt.state[p][key].numpy(), numpy_opt.state[i][key], f"{key}[{i}]")


def test_low_precision_params_need_master_weights():
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[0\]: dtype torch.bfloat16 needs "
                                        r"master_weights=True"):
        fastadam.torch.Adam([p])


def test_the_float32_master_state_survives_loading_a_state_dict(tmp_path):
    pytest.importorskip("ml_dtypes")
    make = lambda: [torch.nn.Parameter(torch.linspace(-1, 1, 50).to(torch.bfloat16))]
    a, b = make(), make()
    opt = fastadam.torch.Adam(a, lr=1e-2, master_weights=True)
    a[0].grad = torch.full((50,), 0.3, dtype=torch.bfloat16)
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    other = fastadam.torch.Adam(b, lr=1e-2, master_weights=True)
    other.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    for key in ("master_param", "exp_avg", "exp_avg_sq"):  # torch's loader alone would round these to bfloat16
        assert other.state[b[0]][key].dtype is torch.float32
        assert torch.equal(other.state[b[0]][key], opt.state[a[0]][key])


# -- ZeroRedundancyOptimizer ---------------------------------------------------------------------------------

def zero_redundancy_optimizer():
    with warnings.catch_warnings():  # torch.distributed.optim's import warns about torch.jit.script
        warnings.simplefilter("ignore", DeprecationWarning)
        from torch.distributed.optim import ZeroRedundancyOptimizer
    return ZeroRedundancyOptimizer


@pytest.mark.parametrize("bucket_view", [False, True], ids=["params", "bucket-views"])
def test_zero_redundancy_optimizer_takes_it_as_its_optimizer_class(gloo_group, bucket_view):
    # In one process ZeRO's shard is every param: its steps must be, bit for bit, fastadam.torch.Adam's own.
    ZeroRedundancyOptimizer = zero_redundancy_optimizer()
    model, plain_model = (torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Linear(8, 2)) for _ in range(2))
    plain_model.load_state_dict(model.state_dict())
    # With bucket views, ZeRO moves each param's data into a shared buffer (p.data = view): the optimizer
    # must follow it to the new memory.
    zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=fastadam.torch.Adam, lr=1e-2,
                                   parameters_as_bucket_view=bucket_view)
    plain = fastadam.torch.Adam(plain_model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)

    def both_step() -> None:
        zero.zero_grad()
        model(torch.randn(4, 6, generator=gen)).square().sum().backward()
        copy_grads(model, plain_model)
        zero.step()
        plain.step()

    for _ in range(20):
        both_step()
    assert isinstance(zero.optim, fastadam.torch.Adam)
    zero.consolidate_state_dict()
    saved = zero.state_dict()
    zero.load_state_dict(saved)  # ZeRO writes the loaded state into optim.state[param] directly
    both_step()
    for p, q in zip(model.parameters(), plain_model.parameters()):
        assert_bitwise_equal(p.detach().numpy(), q.detach().numpy())
        assert float(zero.optim.state[p]["step"]) == 21
        assert_bitwise_equal(zero.optim.state[p]["exp_avg_sq"].numpy(), plain.state[q]["exp_avg_sq"].numpy())


# -- what the optimizer follows, and what it refuses ---------------------------------------------------------

@pytest.mark.parametrize("set_to_none", [True, False])
def test_gradients_are_read_where_they_are_whether_replaced_or_zeroed_in_place(set_to_none):
    model, reference_model = (torch.nn.Linear(5, 3) for _ in range(2))
    reference_model.load_state_dict(model.state_dict())
    opt = fastadam.torch.Adam(model.parameters(), lr=1e-2)
    numpy_params = [p.detach().numpy().copy() for p in reference_model.parameters()]
    numpy_opt = fastadam.Adam(numpy_params, lr=1e-2)
    gen = torch.Generator().manual_seed(2)
    for _ in range(6):
        opt.zero_grad(set_to_none=set_to_none)
        x = torch.randn(4, 5, generator=gen)
        for _ in range(2):  # two backward passes accumulate into the same .grad
            model(x).square().sum().backward()
        numpy_opt.step([p.grad.numpy().copy() for p in model.parameters()])
        opt.step()
    for p, a in zip(model.parameters(), numpy_params):
        assert_bitwise_equal(p.detach().numpy(), a)


def test_a_gradient_set_to_none_is_not_kept_alive_by_the_optimizer():
    import weakref

    p = torch.nn.Parameter(torch.ones(1000))
    opt = fastadam.torch.Adam([p])
    p.grad = torch.ones(1000)
    opt.step()
    grad = weakref.ref(p.grad)
    opt.zero_grad()
    assert grad() is None  # freed, as with torch.optim: no second set of gradients held between steps


def test_a_param_whose_data_is_replaced_is_updated_in_its_new_memory():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = fastadam.torch.Adam([p], lr=0.1)
    p.grad = torch.ones(4)
    opt.step()
    old = p.data
    p.data = torch.zeros(4)  # as model.to(...) and ZeRO's bucket views do
    opt.step()
    assert (p.detach() < 0).all()
    assert torch.allclose(old, torch.full((4,), -0.1))  # the old memory kept its first step only


def test_a_param_replaced_in_its_group_between_steps_is_the_one_updated():
    old, new = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(4))
    opt = fastadam.torch.Adam([old], lr=0.1)
    old.grad = new.grad = torch.ones(4)
    opt.step()
    opt.param_groups[0]["params"][0] = new
    opt.step()
    assert torch.equal(old.detach(), torch.full((4,), -0.1))  # its first step only
    assert torch.equal(new.detach(), torch.full((4,), -0.1))  # a first step, from fresh state
    assert float(opt.state[new]["step"]) == 1


@pytest.mark.parametrize("replacement, error, match", [
    (torch.ones(4, dtype=torch.float64), TypeError, r"the grad of param_groups\[0\]\['params'\]\[0\] is torch.float64"),
    (torch.ones(6), ValueError, r"the grad of param_groups\[0\]\['params'\]\[0\]: shape \(6,\) does not match"),
], ids=["dtype", "shape"])
def test_a_grad_whose_data_is_replaced_by_another_dtype_or_shape_is_refused_before_anything_changes(
        replacement, error, match):
    p = torch.nn.Parameter(torch.zeros(4))
    opt = fastadam.torch.Adam([p], lr=0.1)
    p.grad = torch.ones(4)
    opt.step()
    p.grad = torch.ones(4)  # a new gradient tensor, as after zero_grad() and backward()
    p.grad.data = replacement  # torch's .grad setter refuses both; .data does not
    before = [t.clone() for t in (p.detach(), opt.state[p]["exp_avg"], opt.state[p]["step"])]
    with pytest.raises(error, match=match):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, (p.detach(), opt.state[p]["exp_avg"], opt.state[p]["step"])))


@pytest.mark.parametrize("resize", [lambda p: p.data[:2], lambda p: torch.zeros(8)], ids=["view", "new-memory"])
def test_a_param_resized_through_data_is_noticed_and_steps_once_its_state_is_reset(resize):
    p = torch.nn.Parameter(torch.zeros(4))
    opt = fastadam.torch.Adam([p], lr=0.1)
    p.grad = torch.ones(4)
    opt.step()
    p.data = resize(p)  # the first keeps the param's address: its data pointer alone would not tell
    size = p.numel()
    p.grad = torch.ones(size)
    with pytest.raises(ValueError, match=rf"'exp_avg' must be a tensor of shape \({size},\), got shape \(4,\)"):
        opt.step()
    del opt.state[p]  # as a user would, to start the resized param afresh
    expected = torch.nn.Parameter(p.detach().clone())
    expected.grad = torch.ones(size)
    fastadam.torch.Adam([expected], lr=0.1).step()
    opt.step()
    assert_bitwise_equal(p.detach().numpy(), expected.detach().numpy())


def test_a_state_dict_loaded_between_steps_is_the_state_stepped_from():
    gen = torch.Generator().manual_seed(5)
    grads = [torch.randn(3, 4, generator=gen) for _ in range(3)]
    source, target = torch.nn.Parameter(torch.randn(3, 4, generator=gen)), torch.nn.Parameter(torch.zeros(3, 4))
    opt_source, opt_target = fastadam.torch.Adam([source], lr=0.01), fastadam.torch.Adam([target], lr=0.01)
    for g in grads[:2]:
        source.grad = g.clone()
        opt_source.step()
    target.grad = grads[0].clone()
    opt_target.step()  # a plan of its own, then replaced by the loaded state
    opt_target.load_state_dict(opt_source.state_dict())
    with torch.no_grad():
        target.copy_(source)
    source.grad, target.grad = grads[2].clone(), grads[2].clone()
    opt_source.step()
    opt_target.step()
    assert_bitwise_equal(target.detach().numpy(), source.detach().numpy())
    assert float(opt_target.state[target]["step"]) == 3


def test_new_gradients_laid_out_unlike_their_params_at_every_step_are_read_as_the_same_values():
    # Such gradients fail the core's check of the fast path, which then retakes the checked one (a copy laid
    # out as the param) for this and every later step.
    p, q = torch.nn.Parameter(torch.zeros(5, 4)), torch.nn.Parameter(torch.zeros(5, 4))
    opt, reference = fastadam.torch.Adam([p], lr=0.1), fastadam.torch.Adam([q], lr=0.1)
    for _ in range(3):
        grad = torch.randn(4, 5).t()
        p.grad, q.grad = grad, grad.contiguous()
        opt.step()
        reference.step()
    assert_bitwise_equal(p.detach().numpy(), q.detach().numpy())
    assert float(opt.state[p]["step"]) == 3


def test_the_step_counts_a_plan_advances_are_checked_like_any_array_it_writes():
    p = np.zeros(4, np.float32)
    plan = fastadam._core.AdamPlan([p], [np.zeros(4, np.float32)], [np.zeros(4, np.float32)], [None], [None], [0], 1,
                                   False, 0)
    group = [{"lr": 0.1, "betas": (0.9, 0.999), "eps": 1e-8}]
    for bad, match in [(np.zeros(2, np.float32), "expected a 1-d array of 1 counts"),
                       (np.zeros(1, np.int64), "dtype"), ([0.0], "expected a numpy.ndarray"),
                       (np.zeros((1, 1), np.float32), "expected a 1-d array")]:
        with pytest.raises((TypeError, ValueError), match=match):
            plan.set_step_counts(bad)
    read_only = np.zeros(1, np.float64)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        plan.set_step_counts(read_only)
    counts = np.zeros(1, np.float64)
    plan.set_step_counts(counts)
    plan.step([np.ones(4, np.float32)], group, None, False, 1)
    assert counts[0] == 1.0 and plan.steps == [1]
    counts.flags.writeable = False  # changed after it was set: refused before anything is written
    before = p.copy()
    with pytest.raises(ValueError, match="step_counts changed"):
        plan.step([np.ones(4, np.float32)], group, None, False, 1)
    assert counts[0] == 1.0 and plan.steps == [1]
    assert_bitwise_equal(p, before)
    plan.set_step_counts(None)
    plan.step([np.ones(4, np.float32)], group, None, False, 1)
    assert plan.steps == [2]


def test_a_state_tensor_put_in_by_hand_is_the_one_updated():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = fastadam.torch.Adam([p], lr=0.1)
    p.grad = torch.ones(4)
    opt.step()
    replacement = torch.zeros(4)
    opt.state[p]["exp_avg"] = replacement
    opt.step()
    assert replacement.abs().sum() > 0 and opt.state[p]["exp_avg"] is replacement


def test_a_step_count_written_in_place_sets_the_next_bias_correction():
    p = torch.nn.Parameter(torch.ones(6))
    opt = fastadam.torch.Adam([p], lr=0.1)
    p.grad = torch.full((6,), 0.5)
    opt.step()
    opt.state[p]["step"].fill_(0)  # as if this were the first step again
    state = {k: opt.state[p][k].numpy().copy() for k in ("exp_avg", "exp_avg_sq")}
    expected = p.detach().numpy().copy()
    fastadam.reference.adam_step(expected, p.grad.numpy(), state["exp_avg"], state["exp_avg_sq"], step=1, lr=0.1)
    opt.step()
    assert_bitwise_equal(p.detach().numpy(), expected)
    assert float(opt.state[p]["step"]) == 1


def test_a_grad_laid_out_unlike_its_param_is_read_as_the_same_values():
    p, q = torch.nn.Parameter(torch.zeros(5, 4)), torch.nn.Parameter(torch.zeros(5, 4))
    grad = torch.randn(4, 5).t()  # not contiguous
    opt, reference = fastadam.torch.Adam([p]), fastadam.torch.Adam([q])
    p.grad, q.grad = grad, grad.contiguous()
    opt.step()
    reference.step()
    assert_bitwise_equal(p.detach().numpy(), q.detach().numpy())


@pytest.mark.parametrize("make, error, match", [
    (lambda: fastadam.torch.Adam([torch.nn.Parameter(torch.ones(2))], capturable=True), ValueError,
     r"capturable=True is not supported"),
    (lambda: fastadam.torch.AdamW([torch.nn.Parameter(torch.ones(2))], differentiable=True), ValueError,
     r"differentiable=True is not supported"),
    (lambda: fastadam.torch.Adam([{"params": [torch.nn.Parameter(torch.ones(2))], "capturable": True}]),
     ValueError, r"param_groups\[0\]: capturable=True is not supported"),
    (lambda: fastadam.torch.Adam([torch.nn.Parameter(torch.ones(2, device="meta"))]), ValueError,
     r"param_groups\[0\]\['params'\]\[0\] is on meta; fastadam.torch steps CPU tensors in place"),
    (lambda: fastadam.torch.Adam([torch.ones(2, dtype=torch.int32)]), TypeError,
     r"dtype torch.int32 is not supported"),
    (lambda: fastadam.torch.Adam([torch.nn.Parameter(torch.ones(3, 4).t())]), ValueError,
     r"strides \(1, 4\) .*never works on a copy"),
    (lambda: fastadam.torch.Adam([torch.nn.Parameter(torch.ones(2))], lr=-1.0), ValueError,
     r"Invalid learning rate: -1.0"),
    (lambda: fastadam.torch.Adam([torch.nn.Parameter(torch.ones(2))], betas=(1.0, 0.9)), ValueError,
     r"Invalid beta parameter at index 0: 1.0"),
], ids=["capturable", "differentiable", "group-option", "device", "dtype", "layout", "lr", "betas"])
def test_what_it_cannot_do_is_refused_at_construction(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_the_same_param_twice_is_refused():
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\] is param_groups\[0\]\['params'\]\[0\]"):
        fastadam.torch.Adam([p, p])
    with pytest.raises(ValueError, match="more than one parameter group"):  # torch's own check
        fastadam.torch.Adam([{"params": [p]}, {"params": [p]}])


def test_an_option_switched_on_later_or_a_bad_grad_is_refused_before_anything_changes():
    p = torch.nn.Parameter(torch.ones(2, 3))
    opt = fastadam.torch.Adam([p])
    p.grad = torch.ones(2, 3)
    opt.step()
    before = p.detach().clone()
    opt.param_groups[0]["capturable"] = True
    with pytest.raises(ValueError, match=r"param_groups\[0\]: capturable=True is not supported"):
        opt.step()
    opt.param_groups[0]["capturable"] = False
    opt.param_groups[0]["amsgrad"] = True
    with pytest.raises(ValueError, match=r"amsgrad was switched on after its first step"):
        opt.step()
    opt.param_groups[0]["amsgrad"] = False
    p.grad = torch.ones(2, 3).to_sparse()  # sparse in both dimensions: not rows of the param
    with pytest.raises(ValueError, match=r"sparse along its first dimension only"):
        opt.step()
    opt.param_groups[0]["lr"] = -1.0
    p.grad = torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"param_groups\[0\]: lr must be >= 0"):
        opt.step()
    assert torch.equal(p.detach(), before) and float(opt.state[p]["step"]) == 1


def test_add_param_group_and_zero_grad_work_as_in_torch():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = fastadam.torch.Adam([a], lr=0.1)
    a.grad = torch.ones(3)
    opt.step()
    opt.add_param_group({"params": b, "lr": 0.01})
    a.grad, b.grad = torch.ones(3), torch.ones(2)
    opt.step()
    assert [float(opt.state[p]["step"]) for p in (a, b)] == [2.0, 1.0]
    assert torch.allclose(b.detach(), torch.full((2,), 0.99))
    opt.zero_grad()
    assert a.grad is None and b.grad is None
    a.grad = torch.ones(3)
    opt.zero_grad(set_to_none=False)
    assert torch.equal(a.grad, torch.zeros(3))


# -- documentation and benchmark ---------------------------------------------------------------------------

def test_the_modules_docstring_example_runs():
    result = doctest.testmod(fastadam.torch, verbose=False)
    assert result.attempted > 0 and result.failed == 0


def test_the_readme_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # it saves a checkpoint
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## PyTorch: `fastadam.torch`"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})


def test_the_benchmark_runs_and_writes_its_rows(tmp_path):
    out = tmp_path / "rows.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_torch_optim.py"), "--cases",
                             "single-4096", "--threads", "1", "--repeats", "2", "--sample-ms", "1", "--json",
                             str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert {r["grads"] for r in rows} == {"same", "new"}
    assert all(r["ratio"]["median"] > 0 and r["kernel_ratio"]["median"] > 0 for r in rows)
