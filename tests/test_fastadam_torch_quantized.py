"""fastadam.torch with 8-bit optimizer state: ``state_dtype="int8"``.

A moment in 8-bit state is three tensors in the param's state, named as in
``fastadam.Adam``'s: ``exp_avg_codes`` (uint8, the param's shape and
strides), ``exp_avg_absmax`` (float32, one per block of 256 elements of the
param's memory) and ``exp_avg_map`` (float32, the 256 values a code stands
for, one tensor per kind shared by the optimizer's params); likewise
``exp_avg_sq`` and amsgrad's ``max_exp_avg_sq``.  The step hands the kernel
NumPy views of them, so fastadam.torch is bitwise ``fastadam.AdamW`` on the
same numbers, and both are bitwise ``fastadam.reference`` (see
tests/test_state_int8.py for the quantizer itself).  A channels_last param's
blocks run over its memory, so it is compared with the NumPy optimizer on
its memory's flat copy.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed (CI installs torch==2.13.0 CPU)")
pytestmark = pytest.mark.torch

import fastadam  # noqa: E402
import fastadam.reference  # noqa: E402
import fastadam.torch  # noqa: E402
from conftest import assert_bitwise_equal  # noqa: E402
from fastadam import QuantizedState, dynamic_map  # noqa: E402

MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
PARTS = ("_codes", "_absmax", "_map")


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def small_model() -> torch.nn.ModuleDict:
    """Ten params around the edges of 8-bit state: weights of 4608 (channels_last), 4095, 4096, 4097 and
    257 * 20 + 3 elements, and biases below min_compressed_size (4096), which keep float32 moments."""
    model = torch.nn.ModuleDict({
        "conv": torch.nn.Conv2d(8, 16, 6),      # 16 * 8 * 6 * 6 = 4608
        "a": torch.nn.Linear(65, 63),           # 4095
        "b": torch.nn.Linear(64, 64),           # 4096
        "c": torch.nn.Linear(241, 17),          # 4097
        "d": torch.nn.Linear(139, 37),          # 5143 = 257 * 20 + 3
    })
    model["conv"].to(memory_format=torch.channels_last)
    assert model["conv"].weight.is_contiguous(memory_format=torch.channels_last)
    return model


def backward(model: torch.nn.ModuleDict, gen: torch.Generator) -> None:
    """Fresh gradients from autograd, of magnitudes spread over decades (zero_grad first, as a loop does)."""
    for p in model.parameters():
        p.grad = None
    loss = model["conv"](torch.randn(2, 8, 7, 7, generator=gen)).square().mean()
    for name in "abcd":
        layer = model[name]
        x = torch.randn(3, layer.in_features, generator=gen) * torch.exp(2 * torch.randn(1, generator=gen))
        loss = loss + layer(x).square().mean()
    loss.backward()


def memory(t: torch.Tensor) -> np.ndarray:
    """A copy of a tensor's memory, in memory order (a channels_last tensor's is not its logical order);
    bfloat16, which NumPy lacks, as its int16 bits."""
    t = t.detach()
    t = t.view(torch.int16) if t.dtype is torch.bfloat16 else t
    return t.as_strided((t.numel(),), (1,)).numpy().copy()


def bits(a: np.ndarray) -> np.ndarray:
    """ml_dtypes' bfloat16 as its int16 bits (as memory() gives a bfloat16 tensor's)."""
    return a.view(np.int16) if a.dtype.name == "bfloat16" else a


def grad_memory(p: torch.Tensor) -> np.ndarray:
    """The gradient's values in the param's memory order (the order in which fastadam.torch reads them)."""
    return memory(torch.empty_like(p).copy_(p.grad))


def assert_state_is_the_numpy_optimizers(opt, params, numpy_opt) -> None:
    for i, p in enumerate(params):
        mine, theirs = opt.state[p], numpy_opt.state[i]
        assert set(mine) == {"step"} | set(theirs), f"params[{i}]"
        for key, a in theirs.items():
            assert mine[key].dtype == getattr(torch, a.dtype.name), f"{key}[{i}]"
            # the NumPy optimizer's state arrays are flat: the params are memory() copies
            assert_bitwise_equal(memory(mine[key]), bits(a).reshape(-1), f"state[{i}][{key!r}]")
        assert float(mine["step"]) == numpy_opt.steps[i]


def reference_state(numpy_opt, i: int) -> list:
    """Copies of params[i]'s moments as fastadam.reference takes them (QuantizedState for 8-bit ones)."""
    s = numpy_opt.state[i]
    return [QuantizedState(*(s[key + part].copy() for part in PARTS)) if key + "_codes" in s
            else s[key].copy() if key in s else None for key in MOMENTS]


CONFIGS = {
    "AdamW": ("AdamW", dict(state_dtype="int8")),
    "AdamW amsgrad": ("AdamW", dict(state_dtype="int8", amsgrad=True)),
    "Adam weight_decay": ("Adam", dict(state_dtype="int8", weight_decay=0.1)),
    "Adam maximize": ("Adam", dict(state_dtype="int8", maximize=True, weight_decay=0.1)),
    "int8 exp_avg, float32 exp_avg_sq": ("AdamW", dict(state_dtype=("int8", "float32"), amsgrad=True)),
    "float32 exp_avg, int8 exp_avg_sq": ("AdamW", dict(state_dtype=("float32", "int8"), amsgrad=True)),
}


@pytest.mark.parametrize("config", CONFIGS)
def test_a_model_steps_bitwise_like_the_numpy_optimizer_and_the_reference(config):
    cls, options = CONFIGS[config]
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    model = small_model()
    params = list(model.parameters())
    arrays = [memory(p) for p in params]
    expected = [a.copy() for a in arrays]
    opt = getattr(fastadam.torch, cls)(model.parameters(), **hyper, **options)
    numpy_opt = getattr(fastadam, cls)(arrays, **hyper, **options)
    # The reference, from the NumPy optimizer's zero state (8-bit where it is large enough).
    reference_states = [reference_state(numpy_opt, i) for i in range(len(params))]
    reference_options = {key: value for key, value in numpy_opt.param_groups[0].items() if key != "params"}
    gen = torch.Generator().manual_seed(1)
    for step in range(1, 5):
        backward(model, gen)
        grads = [grad_memory(p) for p in params]
        opt.step()
        numpy_opt.step(grads)
        for p, g, (m, v, vmax) in zip(expected, grads, reference_states):
            fastadam.reference.adam_step(p, g, m, v, max_exp_avg_sqs=vmax, step=step, **reference_options)

    # Params of at least min_compressed_size (4096) elements hold 8-bit moments where state_dtype says so.
    kinds = options["state_dtype"]
    exp_avg_kind, exp_avg_sq_kind = (kinds, kinds) if isinstance(kinds, str) else kinds
    for p in params:
        large = p.numel() >= 4096
        assert ("exp_avg_codes" in opt.state[p]) == (large and exp_avg_kind == "int8")
        assert ("exp_avg_sq_codes" in opt.state[p]) == (large and exp_avg_sq_kind == "int8")
    for i, (p, a, e) in enumerate(zip(params, arrays, expected)):
        assert_bitwise_equal(memory(p), a, f"params[{i}] against the NumPy optimizer")
        assert_bitwise_equal(memory(p), e, f"params[{i}] against the reference")
        for key, want in zip(MOMENTS, reference_states[i]):
            if isinstance(want, QuantizedState):
                np.testing.assert_array_equal(memory(opt.state[p][key + "_codes"]), want.codes, f"{key}[{i}]")
                assert_bitwise_equal(opt.state[p][key + "_absmax"].numpy(), want.absmax, f"{key}[{i}]")
            elif want is not None:
                assert_bitwise_equal(memory(opt.state[p][key]), want, f"{key}[{i}]")
    assert_state_is_the_numpy_optimizers(opt, params, numpy_opt)


def test_int8_state_costs_2_03_bytes_per_element_and_one_map_of_each_kind():
    big, other = (torch.nn.Parameter(torch.zeros(1 << 16)) for _ in range(2))
    full, small = fastadam.torch.Adam([big]), fastadam.torch.Adam([big, other], state_dtype="int8")
    for opt in (full, small):
        big.grad, other.grad = torch.ones(1 << 16), torch.ones(1 << 16)
        opt.step()
    nbytes = lambda s, keys: sum(s[key].nbytes for key in keys)  # noqa: E731
    assert nbytes(full.state[big], MOMENTS[:2]) / big.numel() == 8
    s = small.state[big]
    assert set(s) == {"step"} | {key + part for key in MOMENTS[:2] for part in PARTS}
    per_element = nbytes(s, [key for key in s if key.endswith(("_codes", "_absmax"))]) / big.numel()
    assert per_element == 2 + 2 * 4 / 256  # a uint8 code per element, a float32 absmax per 256 elements
    assert s["exp_avg_codes"].dtype is torch.uint8 and s["exp_avg_codes"].shape == big.shape
    assert s["exp_avg_absmax"].dtype is torch.float32 and s["exp_avg_absmax"].shape == (256,)
    # The maps (1 KiB each) are fastadam.dynamic_map, one tensor of each kind for every param.
    assert torch.equal(s["exp_avg_map"], torch.from_numpy(dynamic_map(signed=True)))
    assert torch.equal(s["exp_avg_sq_map"], torch.from_numpy(dynamic_map(signed=False)))
    assert s["exp_avg_map"] is small.state[other]["exp_avg_map"]
    assert s["exp_avg_sq_map"] is small.state[other]["exp_avg_sq_map"]


def train(model, opt, steps: int, seed: int, scheduler=None) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        backward(model, gen)
        opt.step()
        if scheduler is not None:
            scheduler.step()


def twin_models():
    a = small_model()
    b = small_model()
    b.load_state_dict(a.state_dict())
    return a, b


def test_a_checkpoint_through_torch_save_resumes_bitwise_as_an_uninterrupted_run(tmp_path):
    whole_model, part_model = twin_models()
    make = lambda model: fastadam.torch.AdamW(model.parameters(), lr=1e-2, amsgrad=True,  # noqa: E731
                                              state_dtype="int8")
    whole, part = make(whole_model), make(part_model)
    train(whole_model, whole, 3, seed=1)
    train(part_model, part, 3, seed=1)
    torch.save(part.state_dict(), tmp_path / "opt.pt")
    saved = torch.load(tmp_path / "opt.pt", weights_only=True)
    fresh = make(part_model)
    fresh.load_state_dict(saved)
    # Loaded bitwise, into tensors of the optimizer's own (maps shared as they were).
    for i, p in enumerate(part_model.parameters()):
        assert fresh.state[p].keys() == part.state[p].keys()
        for key, t in fresh.state[p].items():
            assert torch.equal(t, part.state[p][key]) and t.stride() == part.state[p][key].stride(), key
            assert t is not saved["state"][i][key] or key == "step"
    weight = part_model["b"].weight
    assert fresh.state[weight]["exp_avg_map"] is fresh.state[part_model["c"].weight]["exp_avg_map"]
    train(whole_model, whole, 3, seed=2)
    train(part_model, fresh, 3, seed=2)
    for p, q in zip(whole_model.parameters(), part_model.parameters()):
        assert_bitwise_equal(memory(q), memory(p))
        for key, t in whole.state[p].items():
            assert torch.equal(fresh.state[q][key], t), key


def numpy_state_dict(sd: dict) -> dict:
    """A fastadam.torch state dict as fastadam.Adam's (memory-order arrays of the tensors, int steps)."""
    def array(t: torch.Tensor) -> np.ndarray:
        if t.dtype is torch.bfloat16:
            import ml_dtypes
            return memory(t).view(ml_dtypes.bfloat16)
        return memory(t) if t.dim() > 1 else t.numpy().copy()

    return {"state": {i: {key: int(t) if key == "step" else array(t) for key, t in s.items()}
                      for i, s in sd["state"].items()},
            "param_groups": [{key: g[key] for key in fastadam._core.HYPERPARAMETERS if key in g} |
                             {"params": g["params"], "eps_before_bias_correction": False}
                             for g in sd["param_groups"]]}


@pytest.mark.parametrize("source, target", [("float32", "int8"), ("int8", "float32"),
                                            (("int8", "float32"), ("float32", "int8")),
                                            ("bfloat16", "int8"), ("int8", "bfloat16")])
def test_load_state_dict_converts_between_float32_and_8_bits_as_the_numpy_optimizer_does(source, target):
    if "bfloat16" in (source, target):
        pytest.importorskip("ml_dtypes")
    old_model, model = twin_models()
    old = fastadam.torch.AdamW(old_model.parameters(), lr=1e-2, amsgrad=True, state_dtype=source)
    train(old_model, old, 2, seed=3)
    model.load_state_dict(old_model.state_dict())
    new = fastadam.torch.AdamW(model.parameters(), lr=1e-2, amsgrad=True, state_dtype=target)
    new.load_state_dict(old.state_dict())

    # The NumPy optimizers convert the same state.
    params = list(model.parameters())
    arrays = [memory(p) for p in params]
    numpy_new = fastadam.AdamW(arrays, lr=1e-2, amsgrad=True, state_dtype=target)
    numpy_new.load_state_dict(numpy_state_dict(old.state_dict()))
    assert_state_is_the_numpy_optimizers(new, params, numpy_new)
    converted = [key for key in new.state[params[0]] if key != "step"]
    assert converted != [key for key in old.state[list(old_model.parameters())[0]] if key != "step"]
    # ... and both step on from there alike.
    gen = torch.Generator().manual_seed(4)
    backward(model, gen)
    numpy_new.step([grad_memory(p) for p in params])
    new.step()
    for p, a in zip(params, arrays):
        assert_bitwise_equal(memory(p), a)
    assert_state_is_the_numpy_optimizers(new, params, numpy_new)


def test_a_torch_optim_checkpoint_continues_with_8_bit_state():
    theirs_model, model = twin_models()
    theirs = torch.optim.AdamW(theirs_model.parameters(), lr=1e-2)
    train(theirs_model, theirs, 2, seed=5)
    model.load_state_dict(theirs_model.state_dict())
    ours = fastadam.torch.AdamW(model.parameters(), lr=1e-2, state_dtype="int8")
    ours.load_state_dict(theirs.state_dict())
    for p, q in zip(theirs_model.parameters(), model.parameters()):
        s = ours.state[q]
        if q.numel() < 4096:  # below min_compressed_size: float32, copied bitwise
            assert torch.equal(s["exp_avg"], theirs.state[p]["exp_avg"])
            continue
        for key in MOMENTS[:2]:  # quantized as a step would store the values: fastadam.quantize_blockwise
            expected = QuantizedState(np.empty(q.numel(), np.uint8), np.empty(-(-q.numel() // 256), np.float32),
                                      s[key + "_map"].numpy())
            fastadam.quantize_blockwise(memory(theirs.state[p][key]), expected)
            np.testing.assert_array_equal(memory(s[key + "_codes"]), expected.codes, key)
            assert_bitwise_equal(s[key + "_absmax"].numpy(), expected.absmax, key)
    train(model, ours, 2, seed=6)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_master_weighted_low_precision_params_take_8_bit_state_bitwise_like_fastadam_adam(dtype):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    numpy_dtype = ml_dtypes.bfloat16 if dtype is torch.bfloat16 else np.float16
    gen = torch.Generator().manual_seed(7)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in [(70, 70), (300,)]]
    arrays = [p.detach().float().numpy().astype(numpy_dtype) for p in params]
    opt = fastadam.torch.AdamW(params, lr=1e-2, master_weights=True, state_dtype="int8")
    numpy_opt = fastadam.AdamW(arrays, lr=1e-2, master_weights=True, state_dtype="int8")
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=gen).to(dtype) for p in params]
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        numpy_opt.step([g.float().numpy().astype(numpy_dtype) for g in grads])
    for i, (p, a) in enumerate(zip(params, arrays)):
        assert_bitwise_equal(p.detach().float().numpy(), a.astype(np.float32), f"params[{i}]")
    assert "exp_avg_codes" in opt.state[params[0]] and "exp_avg" in opt.state[params[1]]
    assert_state_is_the_numpy_optimizers(opt, params, numpy_opt)


# -- the torch.optim machinery -------------------------------------------------------------------------------

def test_an_lr_scheduler_and_zero_grad_drive_it_as_they_drive_the_numpy_optimizer():
    model = small_model()
    params = list(model.parameters())
    arrays = [memory(p) for p in params]
    opt = fastadam.torch.AdamW(model.parameters(), lr=1e-2, state_dtype="int8")
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-2, total_steps=10)
    numpy_opt = fastadam.AdamW(arrays, lr=1e-2, state_dtype="int8")
    gen = torch.Generator().manual_seed(8)
    for _ in range(10):
        # OneCycleLR cycles the learning rate and beta1
        numpy_opt.param_groups[0].update(lr=opt.param_groups[0]["lr"], betas=opt.param_groups[0]["betas"])
        backward(model, gen)
        numpy_opt.step([grad_memory(p) for p in params])
        opt.step()
        opt.zero_grad()
        assert all(p.grad is None for p in params)
        scheduler.step()
    for p, a in zip(params, arrays):
        assert_bitwise_equal(memory(p), a)
    assert_state_is_the_numpy_optimizers(opt, params, numpy_opt)


def test_grad_scaler_unscales_8_bit_steps_and_skips_the_one_with_an_inf():
    # Loss scaling by a power of two is exact: the scaled run equals, bitwise, a run stepped with the unscaled
    # gradients that leaves out the step with the inf.
    model, unscaled_model = twin_models()
    opt = fastadam.torch.Adam(model.parameters(), lr=1e-2, state_dtype="int8")
    unscaled = fastadam.torch.Adam(unscaled_model.parameters(), lr=1e-2, state_dtype="int8")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    gen = torch.Generator().manual_seed(9)
    for step in range(1, 6):
        scale = scaler.get_scale()
        x = torch.randn(3, 64, generator=gen)
        for p in model.parameters():
            p.grad = None
        scaler.scale(model["b"](x).square().mean()).backward()
        if step == 3:
            model["b"].weight.grad[2, 3] = float("inf")
            before = [(memory(t), t) for t in opt.state[model["b"].weight].values()]
        else:
            for p, q in zip(model.parameters(), unscaled_model.parameters()):
                q.grad = None if p.grad is None else p.grad / scale
            unscaled.step()
        scaler.step(opt)
        scaler.update()
        if step == 3:  # skipped: no state tensor changed
            assert all(np.array_equal(memory(t), m) for m, t in before)
    assert float(opt.state[model["b"].weight]["step"]) == 4
    for p, q in zip(model.parameters(), unscaled_model.parameters()):
        assert_bitwise_equal(memory(p), memory(q))
    for key, t in unscaled.state[unscaled_model["b"].weight].items():
        assert torch.equal(opt.state[model["b"].weight][key], t), key


def test_zero_redundancy_optimizer_steps_and_reloads_8_bit_state_bitwise(gloo_group):
    # In one process ZeRO's shard is every param; its state dict round trip writes the loaded state into
    # optim.state[param] directly (no load_state_dict of ours): the step must take it as it is.
    import warnings

    with warnings.catch_warnings():  # torch.distributed.optim's import warns about torch.jit.script
        warnings.simplefilter("ignore", DeprecationWarning)
        from torch.distributed.optim import ZeroRedundancyOptimizer
    model, plain_model = twin_models()
    zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=fastadam.torch.Adam, lr=1e-2,
                                   state_dtype="int8")
    plain = fastadam.torch.Adam(plain_model.parameters(), lr=1e-2, state_dtype="int8")
    gen = torch.Generator().manual_seed(14)

    def both_step() -> None:
        backward(model, gen)
        for p, q in zip(model.parameters(), plain_model.parameters()):
            q.grad = p.grad.clone()
        zero.step()
        plain.step()

    for _ in range(3):
        both_step()
    zero.consolidate_state_dict()
    zero.load_state_dict(zero.state_dict())
    both_step()
    for p, q in zip(model.parameters(), plain_model.parameters()):
        assert_bitwise_equal(memory(p), memory(q))
        assert zero.optim.state[p].keys() == plain.state[q].keys()
        for key, t in plain.state[q].items():
            assert zero.optim.state[p][key].dtype is t.dtype and torch.equal(zero.optim.state[p][key], t), key


def test_a_step_bumps_the_version_counters_of_the_codes_and_absmax_it_writes():
    w = torch.nn.Parameter(torch.randn(5000))
    opt = fastadam.torch.Adam([w], state_dtype="int8")
    w.grad = torch.ones(5000)
    opt.step()
    s = opt.state[w]
    versions = {key: t._version for key, t in s.items()}
    opt.step()
    for key, t in s.items():
        if key.endswith("_map"):  # read, never written
            assert t._version == versions[key], key
        else:
            assert t._version > versions[key], key


def test_an_8_bit_state_tensor_replaced_between_steps_is_the_one_updated():
    w = torch.nn.Parameter(torch.randn(5000))
    opt = fastadam.torch.Adam([w], state_dtype="int8")
    w.grad = torch.ones(5000)
    opt.step()
    old_codes, old_absmax = opt.state[w]["exp_avg_codes"], opt.state[w]["exp_avg_absmax"]
    opt.state[w]["exp_avg_codes"] = new_codes = old_codes.clone()
    opt.state[w]["exp_avg_absmax"] = new_absmax = old_absmax.clone()
    frozen = old_codes.clone(), old_absmax.clone()
    w.grad = torch.full((5000,), -3.0)
    opt.step()
    assert torch.equal(old_codes, frozen[0]) and torch.equal(old_absmax, frozen[1])  # let go of
    assert not torch.equal(new_absmax, frozen[1])  # the step wrote the new ones
    assert opt.state[w]["exp_avg_codes"] is new_codes and opt.state[w]["exp_avg_absmax"] is new_absmax


def test_state_put_in_by_hand_as_float32_is_quantized_at_the_next_step():
    w = torch.nn.Parameter(torch.randn(5000))
    opt = fastadam.torch.Adam([w], state_dtype="int8")
    opt.state[w] = {"step": torch.tensor(3.0), "exp_avg": torch.full((5000,), 0.25),
                    "exp_avg_sq": torch.full((5000,), 0.5)}
    w.grad = torch.zeros(5000)
    opt.step()
    assert "exp_avg" not in opt.state[w] and opt.state[w]["exp_avg_codes"].dtype is torch.uint8
    # beta1 * 0.25 and beta2 * 0.5 in every element: absmax those values, every code that of 1.0
    assert torch.equal(opt.state[w]["exp_avg_absmax"], torch.full((20,), np.float32(0.9) * np.float32(0.25)))
    assert (opt.state[w]["exp_avg_codes"] == 255).all()


def test_sparse_adam_takes_8_bit_state_with_rows_of_whole_blocks_as_the_numpy_optimizer_does():
    emb = torch.nn.Embedding(50, 512, sparse=True)
    table = emb.weight.detach().numpy().copy()
    opt = fastadam.torch.SparseAdam(emb.parameters(), lr=1e-2, state_dtype="int8")
    numpy_opt = fastadam.SparseAdam([table], lr=1e-2, state_dtype="int8")
    gen = torch.Generator().manual_seed(10)
    for _ in range(3):
        opt.zero_grad()
        indices = torch.randint(0, 20, (30,), generator=gen)
        (emb(indices) * torch.randn(30, 512, generator=gen)).sum().backward()
        grad = emb.weight.grad
        numpy_opt.step([fastadam.RowSparseGrad(grad._indices()[0].numpy().copy(), grad._values().numpy().copy())])
        opt.step()
    assert_bitwise_equal(emb.weight.detach().numpy(), table)
    assert_state_is_the_numpy_optimizers(opt, [emb.weight], numpy_opt)

    # Rows of 64 elements would split a block between rows: refused as fastadam.SparseAdam refuses them.
    narrow = torch.nn.Embedding(100, 64, sparse=True)
    opt = fastadam.torch.SparseAdam(narrow.parameters(), state_dtype="int8", min_compressed_size=0)
    before = narrow.weight.detach().clone()
    narrow(torch.tensor([1])).sum().backward()
    with pytest.raises(ValueError, match=r"the grad of param_groups\[0\]\['params'\]\[0\]: a row-sparse gradient "
                                         r"needs rows of a multiple of 256 elements with 8-bit state"):
        opt.step()
    assert torch.equal(narrow.weight, before)


# -- bad state: a clear error naming the entry, nothing changed ----------------------------------------------

WHERE = r"state_dict\['state'\]\[6\] \(for param_groups\[0\]\['params'\]\[6\]\)"


def _unsorted(sd):
    sd["state"][6]["exp_avg_sq_map"] = sd["state"][6]["exp_avg_sq_map"].flip(0)


@pytest.mark.parametrize("corrupt, match", [
    (lambda sd: sd["state"][6].__setitem__("exp_avg_codes", sd["state"][6]["exp_avg_codes"].float()),
     WHERE + r"\['exp_avg_codes'\]: expected a torch.uint8 tensor, got a torch.float32 tensor"),
    (lambda sd: sd["state"][6].__setitem__("exp_avg_codes", sd["state"][6]["exp_avg_codes"][:, :-1]),
     WHERE + r"\['exp_avg_codes'\]: expected uint8\(17, 241\), got uint8\(17, 240\)"),
    (lambda sd: sd["state"][6].__setitem__("exp_avg_absmax", sd["state"][6]["exp_avg_absmax"][:-1]),
     WHERE + r"\['exp_avg_absmax'\]: expected float32\(17,\), got float32\(16,\)"),
    (_unsorted, WHERE + r"\['exp_avg_sq_map'\]: map: must hold 256 finite values in strictly ascending order"),
    (lambda sd: sd["state"][6]["exp_avg_map"].__setitem__(127, 1e-9),
     WHERE + r"\['exp_avg_map'\]: map: must hold 0.0"),
    (lambda sd: sd["state"][6].pop("exp_avg_sq_absmax"), WHERE + r": no 'exp_avg_sq_absmax'"),
    (lambda sd: sd["state"][6].__setitem__("exp_avg", torch.zeros(17, 241)),
     WHERE + r": holds both 'exp_avg' and 'exp_avg_codes'"),
], ids=["codes-dtype", "codes-shape", "absmax-length", "map-unsorted", "map-without-zero", "missing-absmax",
        "both-storages"])
@pytest.mark.parametrize("target", ["int8", "float32"])
def test_bad_8_bit_state_is_refused_on_loading_and_nothing_changes(corrupt, match, target):
    model = small_model()
    opt = fastadam.torch.AdamW(model.parameters(), lr=1e-2, state_dtype="int8")
    train(model, opt, 2, seed=11)
    sd = opt.state_dict()
    sd = {"state": {k: {key: t.clone() for key, t in s.items()} for k, s in sd["state"].items()},
          "param_groups": [{**g, "params": list(g["params"])} for g in sd["param_groups"]]}
    assert list(model.parameters())[6] is model["c"].weight and model["c"].weight.numel() == 4097
    assert sd["state"][6]["exp_avg_map"][127] == 0
    corrupt(sd)
    into = fastadam.torch.AdamW(model.parameters(), lr=5e-3, state_dtype=target)
    train(model, into, 1, seed=12)
    before = {id(t): (t, t.clone()) for s in into.state.values() for t in s.values()}
    with pytest.raises(ValueError, match=match):
        into.load_state_dict(sd)
    assert into.param_groups[0]["lr"] == 5e-3
    now = [t for s in into.state.values() for t in s.values()]
    assert {id(t) for t in now} == set(before) and all(torch.equal(t, c) for t, c in before.values())
    train(model, into, 1, seed=13)  # and it still steps


def test_8_bit_state_for_a_float64_param_is_refused_as_fastadam_adam_refuses_it():
    w32, w64 = torch.nn.Parameter(torch.randn(5000)), torch.nn.Parameter(torch.randn(5000, dtype=torch.float64))
    opt = fastadam.torch.Adam([w32], state_dtype="int8")
    w32.grad = torch.ones(5000)
    opt.step()
    into = fastadam.torch.Adam([w64], state_dtype="int8")
    with pytest.raises(ValueError, match=r"\['exp_avg_codes'\]: 8-bit state needs a float32 param \(or "
                                         r"float16/bfloat16 with master weights\), this one is torch.float64"):
        into.load_state_dict(opt.state_dict())
    assert not into.state
    # float64 params keep float64 moments under state_dtype="int8", as in fastadam.Adam
    w64.grad = torch.ones(5000, dtype=torch.float64)
    into.step()
    assert into.state[w64]["exp_avg"].dtype is torch.float64


def test_bad_8_bit_state_put_in_by_hand_is_refused_at_the_step_and_nothing_changes():
    w = torch.nn.Parameter(torch.randn(5000))
    opt = fastadam.torch.Adam([w], state_dtype="int8")
    w.grad = torch.ones(5000)
    opt.step()
    before = w.detach().clone(), opt.state[w]["exp_avg_codes"].clone()
    opt.state[w]["exp_avg_absmax"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"state\[param_groups\[0\]\['params'\]\[0\]\]\['exp_avg_absmax'\]: "
                                         r"expected 20 values"):
        opt.step()
    assert torch.equal(w, before[0]) and torch.equal(opt.state[w]["exp_avg_codes"], before[1])
    assert float(opt.state[w]["step"]) == 1
