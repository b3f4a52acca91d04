"""fastadam.torch with quantized optimizer state: ``state_dtype="int8"`` and ``"int4"``.

A moment in quantized state is three tensors in the param's state, named as in
``fastadam.Adam``'s: ``exp_avg_codes`` (uint8), ``exp_avg_absmax`` (float32,
one per block of the param's memory) and ``exp_avg_map`` (float32, the values
a code stands for, one tensor per kind shared by the optimizer's params);
likewise ``exp_avg_sq`` and amsgrad's ``max_exp_avg_sq``.  The two storages
differ only in their layout (STORAGES): 8-bit codes have the param's shape and
strides, blocks of 256 elements and maps of 256 values (``dynamic_map``);
4-bit codes (Li et al., NeurIPS 2023) are one flat run of ``ceil(numel / 2)``
bytes, element ``j`` of the param's *memory* in the low four bits of byte
``j // 2`` when ``j`` is even, the high four when odd, with blocks of 128
elements and maps of 16 values (``dynamic_map(True, bits=4)`` for
``exp_avg``, ``linear_map(4)`` for the others).  The step hands the kernel
NumPy views of them, so fastadam.torch is bitwise ``fastadam.AdamW`` on the
same numbers, and both are bitwise ``fastadam.reference`` (see
tests/test_state_int8.py and tests/test_state_int4.py for the quantizers
themselves).  A channels_last param's blocks (and nibble pairs) run over its
memory, so it is compared with the NumPy optimizer on its memory's flat copy.
Every test here runs for both storages; tests/test_fastadam_torch_int4.py
holds what only 4-bit codes have: a memory order of their own.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed (CI installs torch==2.13.0 CPU)")
pytestmark = pytest.mark.torch

import fastadam  # noqa: E402
import fastadam.reference  # noqa: E402
import fastadam.torch  # noqa: E402
from conftest import assert_bitwise_equal  # noqa: E402
from fastadam import QuantizedState, dynamic_map, linear_map  # noqa: E402

MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
PARTS = ("_codes", "_absmax", "_map")
#: The tests that set min_compressed_size set it here, so that the model's params of 127, 128 and 129
#: elements straddle it; the others keep the default, 4096, which its 4095, 4096 and 4097 straddle.
MIN_SIZE = 128


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Codes of 0..15, one per element, as 4-bit state stores them: two a byte, the even element's low."""
    padded = np.append(codes, np.zeros(codes.size % 2, codes.dtype)).reshape(-1, 2).astype(np.uint8)
    return padded[:, 0] | (padded[:, 1] << 4)


@dataclass(frozen=True)
class Storage:
    """What the tests need to know of one quantized storage: its figures and the layout of its codes."""

    kind: str                     # the state_dtype
    bits: int                     # of a code; a map holds 2**bits values
    block: int                    # elements per absmax value
    maps: tuple                   # exp_avg's, and exp_avg_sq's (and max_exp_avg_sq's), as NumPy arrays
    bytes_per_param: float        # the two moments' codes and absmax, per element of the param
    codes_shape: Callable         # the codes' shape for a param of this shape
    packed: Callable              # per-element codes (memory order) -> the bytes the codes tensor holds
    sparse_row: int               # a row width SparseAdam takes: a multiple of ``block``
    not_dense: str                # why codes of other strides are refused (a pattern)

    def blocks(self, numel: int) -> int:
        """The absmax values of a param of ``numel`` elements: ceil(numel / block)."""
        return -(-numel // self.block)


STORAGES = {
    "int8": Storage(
        "int8", bits=8, block=256, maps=(dynamic_map(signed=True), dynamic_map(signed=False)),
        bytes_per_param=2 * (1 + 4 / 256),  # 2.03: a uint8 code per element, a float32 absmax per 256
        codes_shape=lambda shape: tuple(shape), packed=lambda codes: codes.astype(np.uint8),
        sparse_row=512, not_dense=r"\(C-contiguous or channels_last\)"),
    "int4": Storage(
        "int4", bits=4, block=128, maps=(dynamic_map(True, bits=4), linear_map(4)),
        bytes_per_param=2 * (1 / 2 + 4 / 128),  # 1.06: two codes a byte, a float32 absmax per 128
        codes_shape=lambda shape: (-(-math.prod(shape) // 2),), packed=pack_nibbles,
        # three 4-bit blocks: 8-bit state, with blocks of 256, would refuse these rows
        sparse_row=384, not_dense=r"\(4-bit codes are one contiguous run"),
}


@pytest.fixture(params=list(STORAGES))
def storage(request) -> Storage:
    return STORAGES[request.param]


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def small_model() -> torch.nn.ModuleDict:
    """Params around the edges of quantized state: weights of 4608 and 135 elements (channels_last; 135 is
    odd, so 4-bit codes' last byte holds one code), 4095, 4096, 4097 and 5143 (= 128 * 40 + 23 = 256 * 20 + 23)
    elements, and of 127, 128 and 129 elements around MIN_SIZE and the 128-element block."""
    model = torch.nn.ModuleDict({
        "conv": torch.nn.Conv2d(8, 16, 6),      # 16 * 8 * 6 * 6 = 4608, bias 16
        "odd": torch.nn.Conv2d(3, 5, 3),        # 5 * 3 * 3 * 3 = 135, bias 5
        "a": torch.nn.Linear(65, 63),           # 4095, bias 63
        "b": torch.nn.Linear(64, 64),           # 4096
        "c": torch.nn.Linear(241, 17),          # 4097
        "d": torch.nn.Linear(139, 37),          # 5143
        "e": torch.nn.Linear(1, 127),           # 127 and 127
        "f": torch.nn.Linear(1, 128),           # 128 and 128
        "g": torch.nn.Linear(1, 129),           # 129 and 129
    })
    for conv in ("conv", "odd"):
        model[conv].to(memory_format=torch.channels_last)
        assert model[conv].weight.is_contiguous(memory_format=torch.channels_last)
        assert not model[conv].weight.is_contiguous()  # its memory order is not its logical order
    return model


def backward(model: torch.nn.ModuleDict, gen: torch.Generator) -> None:
    """Fresh gradients from autograd, of magnitudes spread over decades (zero_grad first, as a loop does)."""
    for p in model.parameters():
        p.grad = None
    loss = model["conv"](torch.randn(2, 8, 7, 7, generator=gen)).square().mean()
    loss = loss + model["odd"](torch.randn(2, 3, 5, 5, generator=gen)).square().mean()
    for name in "abcdefg":
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



def assert_params_and_state_are_the_numpy_optimizers(opt, params, arrays, numpy_opt) -> None:
    """The params' memory bitwise the NumPy optimizer's ``arrays``, and the state its state."""
    for i, (p, a) in enumerate(zip(params, arrays)):
        assert_bitwise_equal(memory(p), a, f"params[{i}]")
    assert_state_is_the_numpy_optimizers(opt, params, numpy_opt)

def reference_state(numpy_opt, i: int) -> list:
    """Copies of params[i]'s moments as fastadam.reference takes them (QuantizedState for quantized ones)."""
    s = numpy_opt.state[i]
    return [QuantizedState(*(s[key + part].copy() for part in PARTS)) if key + "_codes" in s
            else s[key].copy() if key in s else None for key in MOMENTS]


def held_as(s: dict, key: str) -> str:
    """How a fastadam.torch state holds moment ``key``: "int4" or "int8" (its map's length says which), or
    its tensor's dtype name."""
    if key + "_codes" in s:
        return "int4" if s[key + "_map"].numel() == 16 else "int8"
    return str(s[key].dtype).removeprefix("torch.")


def configs(kind: str) -> dict:
    """The optimizer configurations run with ``kind`` of quantized state, by name."""
    return {
        f"{kind} AdamW": ("AdamW", dict(state_dtype=kind)),
        f"{kind} AdamW amsgrad": ("AdamW", dict(state_dtype=kind, amsgrad=True)),
        f"{kind} Adam weight_decay": ("Adam", dict(state_dtype=kind, weight_decay=0.1)),
        f"{kind} Adam maximize": ("Adam", dict(state_dtype=kind, maximize=True, weight_decay=0.1)),
        f"{kind} exp_avg, float32 exp_avg_sq": ("AdamW", dict(state_dtype=(kind, "float32"), amsgrad=True)),
        f"float32 exp_avg, {kind} exp_avg_sq": ("AdamW", dict(state_dtype=("float32", kind), amsgrad=True)),
    }


CONFIGS = configs("int8") | configs("int4") | {
    "int4 exp_avg, int8 exp_avg_sq": ("AdamW", dict(state_dtype=("int4", "int8"), amsgrad=True)),
    "int8 exp_avg, int4 exp_avg_sq": ("AdamW", dict(state_dtype=("int8", "int4"), amsgrad=True)),
}


@pytest.mark.parametrize("config", CONFIGS)
def test_a_model_steps_bitwise_like_the_numpy_optimizer_and_the_reference(config):
    cls, options = CONFIGS[config]
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, min_compressed_size=MIN_SIZE)
    model = small_model()
    params = list(model.parameters())
    arrays = [memory(p) for p in params]
    expected = [a.copy() for a in arrays]
    opt = getattr(fastadam.torch, cls)(model.parameters(), **hyper, **options)
    numpy_opt = getattr(fastadam, cls)(arrays, **hyper, **options)
    # The reference, from the NumPy optimizer's zero state (quantized where it is large enough).
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

    # Params of at least min_compressed_size elements hold quantized moments where state_dtype says so,
    # laid out as their storage lays them out.
    kinds = options["state_dtype"]
    exp_avg_kind, exp_avg_sq_kind = (kinds, kinds) if isinstance(kinds, str) else kinds
    for p in params:
        large = p.numel() >= MIN_SIZE
        for key, kind in (("exp_avg", exp_avg_kind), ("exp_avg_sq", exp_avg_sq_kind)):
            s = opt.state[p]
            assert (key + "_codes" in s) == (large and kind in STORAGES), key
            if key + "_codes" in s:
                assert s[key + "_codes"].shape == STORAGES[kind].codes_shape(p.shape), key
                assert s[key + "_absmax"].shape == (STORAGES[kind].blocks(p.numel()),), key
                assert s[key + "_map"].shape == (1 << STORAGES[kind].bits,), key
    for i, (p, a, e) in enumerate(zip(params, arrays, expected)):
        assert_bitwise_equal(memory(p), a, f"params[{i}] against the NumPy optimizer")
        assert_bitwise_equal(memory(p), e, f"params[{i}] against the reference")
        for key, want in zip(MOMENTS, reference_states[i]):
            if isinstance(want, QuantizedState):
                np.testing.assert_array_equal(memory(opt.state[p][key + "_codes"]), want.codes.reshape(-1),
                                              f"{key}[{i}]")
                assert_bitwise_equal(opt.state[p][key + "_absmax"].numpy(), want.absmax, f"{key}[{i}]")
            elif want is not None:
                assert_bitwise_equal(memory(opt.state[p][key]), want, f"{key}[{i}]")
    assert_state_is_the_numpy_optimizers(opt, params, numpy_opt)


def test_state_costs_its_codes_and_a_float32_per_block_and_one_map_of_each_kind(storage):
    big, other = torch.nn.Parameter(torch.zeros(1 << 16)), torch.nn.Parameter(torch.zeros(4097))
    full, small = fastadam.torch.Adam([big]), fastadam.torch.Adam([big, other], state_dtype=storage.kind)
    for opt in (full, small):
        big.grad, other.grad = torch.ones(1 << 16), torch.ones(4097)
        opt.step()
    nbytes = lambda s, keys: sum(s[key].nbytes for key in keys)  # noqa: E731
    assert nbytes(full.state[big], MOMENTS[:2]) / big.numel() == 8
    s = small.state[big]
    assert set(s) == {"step"} | {key + part for key in MOMENTS[:2] for part in PARTS}
    per_element = nbytes(s, [key for key in s if key.endswith(("_codes", "_absmax"))]) / big.numel()
    assert per_element == storage.bytes_per_param
    assert s["exp_avg_codes"].dtype is torch.uint8
    assert s["exp_avg_codes"].shape == storage.codes_shape(big.shape) == ((1 << 16) * storage.bits // 8,)
    assert s["exp_avg_absmax"].dtype is torch.float32 and s["exp_avg_absmax"].shape == ((1 << 16) // storage.block,)
    # An odd size, a partial block (and for 4-bit codes, a last byte holding one code).
    assert small.state[other]["exp_avg_codes"].shape == storage.codes_shape((4097,))
    assert small.state[other]["exp_avg_absmax"].shape == (4097 // storage.block + 1,)
    # The maps (4 << bits bytes each: 1 KiB, 64 bytes) are the storage's, one tensor of each kind for every param.
    assert torch.equal(s["exp_avg_map"], torch.from_numpy(storage.maps[0]))
    assert torch.equal(s["exp_avg_sq_map"], torch.from_numpy(storage.maps[1]))
    assert s["exp_avg_map"].shape == s["exp_avg_sq_map"].shape == (1 << storage.bits,)
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


def test_a_checkpoint_through_torch_save_resumes_bitwise_as_an_uninterrupted_run(storage, tmp_path):
    whole_model, part_model = twin_models()
    make = lambda model: fastadam.torch.AdamW(model.parameters(), lr=1e-2, amsgrad=True,  # noqa: E731
                                              state_dtype=storage.kind, min_compressed_size=MIN_SIZE)
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
    assert "exp_avg_codes" in fresh.state[part_model["conv"].weight]
    weight = part_model["b"].weight
    assert fresh.state[weight]["exp_avg_map"] is fresh.state[part_model["c"].weight]["exp_avg_map"]
    train(whole_model, whole, 3, seed=2)
    train(part_model, fresh, 3, seed=2)
    for p, q in zip(whole_model.parameters(), part_model.parameters()):
        assert_bitwise_equal(memory(q), memory(p))
        for key, t in whole.state[p].items():
            assert torch.equal(fresh.state[q][key], t), key
    # The loaded maps, equal to the optimizer's own, became them: a param added later takes the same tensors.
    extra = torch.nn.Parameter(torch.zeros(4096))
    fresh.add_param_group({"params": [extra]})
    extra.grad = torch.ones(4096)
    fresh.step()
    for key in ("exp_avg_map", "exp_avg_sq_map", "max_exp_avg_sq_map"):
        assert fresh.state[extra][key] is fresh.state[weight][key], key


def numpy_state_dict(sd: dict) -> dict:
    """A fastadam.torch state dict as fastadam.Adam's (memory-order arrays of the tensors, int steps).

    fastadam.Adam's 4-bit codes are in the memory order of its arrays: those of params whose memory format
    has not changed since the codes were written, whose saved ``codes_strides`` are the params' own (dropped).
    """
    def array(t: torch.Tensor) -> np.ndarray:
        if t.dtype is torch.bfloat16:
            import ml_dtypes
            return memory(t).view(ml_dtypes.bfloat16)
        return memory(t) if t.dim() > 1 else t.numpy().copy()

    return {"state": {i: {key: int(t) if key == "step" else array(t) for key, t in s.items() if key != "codes_strides"}
                      for i, s in sd["state"].items()},
            "param_groups": [{key: g[key] for key in fastadam._core.HYPERPARAMETERS if key in g} |
                             {"params": g["params"], "eps_before_bias_correction": False}
                             for g in sd["param_groups"]]}


def conversions(kind: str) -> list:
    """(source, target) state_dtypes converting to and from ``kind`` of quantized state."""
    return [("float32", kind), (kind, "float32"), ((kind, "float32"), ("float32", kind)),
            ("bfloat16", kind), (kind, "bfloat16")]


def conversion_id(dtype) -> str:
    return dtype if isinstance(dtype, str) else "+".join(dtype)  # a pair: exp_avg's+exp_avg_sq's


@pytest.mark.parametrize("source, target", [
    pytest.param(source, target, id=f"{conversion_id(source)}-to-{conversion_id(target)}")
    for source, target in conversions("int8") + conversions("int4") + [
        ("int8", "int4"), ("int4", "int8"), (("int4", "int8"), ("int8", "int4"))]])
def test_load_state_dict_converts_between_storages_as_the_numpy_optimizer_does(source, target):
    if "bfloat16" in (source, target):
        pytest.importorskip("ml_dtypes")
    old_model, model = twin_models()
    options = dict(lr=1e-2, amsgrad=True, min_compressed_size=MIN_SIZE)
    old = fastadam.torch.AdamW(old_model.parameters(), state_dtype=source, **options)
    train(old_model, old, 2, seed=3)
    model.load_state_dict(old_model.state_dict())
    new = fastadam.torch.AdamW(model.parameters(), state_dtype=target, **options)
    new.load_state_dict(old.state_dict())

    # The NumPy optimizers convert the same state (its params are the memory() copies of the torch ones').
    params = list(model.parameters())
    arrays = [memory(p) for p in params]
    numpy_new = fastadam.AdamW(arrays, state_dtype=target, **options)
    numpy_new.load_state_dict(numpy_state_dict(old.state_dict()))
    assert_state_is_the_numpy_optimizers(new, params, numpy_new)
    kinds = lambda dtype: (dtype, dtype) if isinstance(dtype, str) else dtype  # noqa: E731
    for p, old_p in zip(params, old_model.parameters()):
        if p.numel() >= MIN_SIZE:  # stored as the old optimizer stored them, converted as the new one stores them
            assert (held_as(old.state[old_p], "exp_avg"), held_as(old.state[old_p], "exp_avg_sq")) == kinds(source)
            assert (held_as(new.state[p], "exp_avg"), held_as(new.state[p], "exp_avg_sq")) == kinds(target)
    # ... and both step on from there alike.
    gen = torch.Generator().manual_seed(4)
    backward(model, gen)
    numpy_new.step([grad_memory(p) for p in params])
    new.step()
    assert_params_and_state_are_the_numpy_optimizers(new, params, arrays, numpy_new)


def test_a_torch_optim_checkpoint_continues_with_quantized_state(storage):
    theirs_model, model = twin_models()
    theirs = torch.optim.AdamW(theirs_model.parameters(), lr=1e-2)
    train(theirs_model, theirs, 2, seed=5)
    model.load_state_dict(theirs_model.state_dict())
    ours = fastadam.torch.AdamW(model.parameters(), lr=1e-2, state_dtype=storage.kind)
    ours.load_state_dict(theirs.state_dict())
    for p, q in zip(theirs_model.parameters(), model.parameters()):
        s = ours.state[q]
        if q.numel() < 4096:  # below min_compressed_size: float32, copied bitwise
            assert torch.equal(s["exp_avg"], theirs.state[p]["exp_avg"])
            continue
        for key in MOMENTS[:2]:  # quantized as a step would store the values, in the param's memory order
            expected = QuantizedState(np.empty(storage.codes_shape((q.numel(),)), np.uint8),
                                      np.empty(storage.blocks(q.numel()), np.float32), s[key + "_map"].numpy())
            fastadam.quantize_blockwise(memory(theirs.state[p][key]), expected)
            np.testing.assert_array_equal(memory(s[key + "_codes"]), expected.codes, key)
            assert_bitwise_equal(s[key + "_absmax"].numpy(), expected.absmax, key)
    train(model, ours, 2, seed=6)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_master_weighted_low_precision_params_take_quantized_state_bitwise_like_fastadam_adam(storage, dtype):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    numpy_dtype = ml_dtypes.bfloat16 if dtype is torch.bfloat16 else np.float16
    gen = torch.Generator().manual_seed(7)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in [(70, 70), (300,)]]
    arrays = [p.detach().float().numpy().astype(numpy_dtype) for p in params]
    opt = fastadam.torch.AdamW(params, lr=1e-2, master_weights=True, state_dtype=storage.kind)
    numpy_opt = fastadam.AdamW(arrays, lr=1e-2, master_weights=True, state_dtype=storage.kind)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=gen).to(dtype) for p in params]
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        numpy_opt.step([g.float().numpy().astype(numpy_dtype) for g in grads])
    for i, (p, a) in enumerate(zip(params, arrays)):
        assert_bitwise_equal(p.detach().float().numpy(), a.astype(np.float32), f"params[{i}]")
    assert "exp_avg_codes" in opt.state[params[0]] and "exp_avg" in opt.state[params[1]]
    assert opt.state[params[0]]["master_param"].dtype is torch.float32
    assert_state_is_the_numpy_optimizers(opt, params, numpy_opt)


# -- the torch.optim machinery -------------------------------------------------------------------------------

def test_an_lr_scheduler_and_zero_grad_drive_it_as_they_drive_the_numpy_optimizer(storage):
    model = small_model()
    params = list(model.parameters())
    arrays = [memory(p) for p in params]
    opt = fastadam.torch.AdamW(model.parameters(), lr=1e-2, state_dtype=storage.kind)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-2, total_steps=10)
    numpy_opt = fastadam.AdamW(arrays, lr=1e-2, state_dtype=storage.kind)
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
    assert_params_and_state_are_the_numpy_optimizers(opt, params, arrays, numpy_opt)


def test_grad_scaler_unscales_quantized_steps_and_skips_the_one_with_an_inf(storage):
    # Loss scaling by a power of two is exact: the scaled run equals, bitwise, a run stepped with the unscaled
    # gradients that leaves out the step with the inf.
    model, unscaled_model = twin_models()
    opt = fastadam.torch.Adam(model.parameters(), lr=1e-2, state_dtype=storage.kind)
    unscaled = fastadam.torch.Adam(unscaled_model.parameters(), lr=1e-2, state_dtype=storage.kind)
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
    assert "exp_avg_codes" in opt.state[model["b"].weight]
    for p, q in zip(model.parameters(), unscaled_model.parameters()):
        assert_bitwise_equal(memory(p), memory(q))
    for key, t in unscaled.state[unscaled_model["b"].weight].items():
        assert torch.equal(opt.state[model["b"].weight][key], t), key


def test_a_first_step_skipped_by_grad_scaler_leaves_zero_state_as_fastadam_adam_creates_it(storage):
    # The state is made before the step looks at found_inf: every code the null code (for 4-bit codes two a
    # byte, the odd size's last byte holding one), every absmax 0 -- a zero moment, in the NumPy optimizer's
    # bytes.
    w = torch.nn.Parameter(torch.randn(5001))
    opt = fastadam.torch.Adam([w], state_dtype=storage.kind, amsgrad=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    scaler.scale(w.sum() * float("inf")).backward()
    before = w.detach().clone()
    scaler.step(opt)
    assert torch.equal(w, before) and float(opt.state[w]["step"]) == 0
    numpy_opt = fastadam.Adam([before.numpy().copy()], state_dtype=storage.kind, amsgrad=True)
    assert_state_is_the_numpy_optimizers(opt, [w], numpy_opt)
    null_code = fastadam.reference.null_code(storage.maps[0])
    assert storage.maps[0][null_code] == 0
    np.testing.assert_array_equal(memory(opt.state[w]["exp_avg_codes"]), storage.packed(np.full(5001, null_code)))


def test_zero_redundancy_optimizer_steps_and_reloads_quantized_state_bitwise(storage, gloo_group):
    # In one process ZeRO's shard is every param; its state dict round trip writes the loaded state into
    # optim.state[param] directly (no load_state_dict of ours): the step must take it as it is.
    import warnings

    with warnings.catch_warnings():  # torch.distributed.optim's import warns about torch.jit.script
        warnings.simplefilter("ignore", DeprecationWarning)
        from torch.distributed.optim import ZeroRedundancyOptimizer
    model, plain_model = twin_models()
    zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=fastadam.torch.Adam, lr=1e-2,
                                   state_dtype=storage.kind)
    plain = fastadam.torch.Adam(plain_model.parameters(), lr=1e-2, state_dtype=storage.kind)
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


def test_a_step_bumps_the_version_counters_of_the_codes_and_absmax_it_writes(storage):
    w = torch.nn.Parameter(torch.randn(5001))
    opt = fastadam.torch.Adam([w], state_dtype=storage.kind)
    w.grad = torch.ones(5001)
    opt.step()
    s = opt.state[w]
    versions = {key: t._version for key, t in s.items()}
    opt.step()
    for key, t in s.items():
        if key.endswith("_map"):  # read, never written
            assert t._version == versions[key], key
        else:
            assert t._version > versions[key], key


def test_a_quantized_state_tensor_replaced_between_steps_is_the_one_updated(storage):
    w = torch.nn.Parameter(torch.randn(5000))
    opt = fastadam.torch.Adam([w], state_dtype=storage.kind)
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


def test_state_put_in_by_hand_as_float32_is_quantized_at_the_next_step(storage):
    w = torch.nn.Parameter(torch.randn(5001))
    opt = fastadam.torch.Adam([w], state_dtype=storage.kind)
    opt.state[w] = {"step": torch.tensor(3.0), "exp_avg": torch.full((5001,), 0.25),
                    "exp_avg_sq": torch.full((5001,), 0.5)}
    w.grad = torch.zeros(5001)
    opt.step()
    s = opt.state[w]
    assert "exp_avg" not in s and s["exp_avg_codes"].dtype is torch.uint8
    assert s["exp_avg_codes"].shape == storage.codes_shape((5001,))
    # beta1 * 0.25 and beta2 * 0.5 in every element: absmax those values, every code that of 1.0 (the last of
    # both maps) -- for 4-bit codes two to a byte, and the last byte, holding element 5000 alone, 15 in its low
    # half.
    assert torch.equal(s["exp_avg_absmax"], torch.full((storage.blocks(5001),), np.float32(0.9) * np.float32(0.25)))
    assert torch.equal(s["exp_avg_sq_absmax"],
                       torch.full((storage.blocks(5001),), np.float32(0.999) * np.float32(0.5)))
    last = (1 << storage.bits) - 1
    assert storage.maps[0][last] == storage.maps[1][last] == 1
    for key in ("exp_avg_codes", "exp_avg_sq_codes"):
        np.testing.assert_array_equal(memory(s[key]), storage.packed(np.full(5001, last)), key)


def test_sparse_adam_takes_quantized_state_with_rows_of_whole_blocks_as_the_numpy_optimizer_does(storage):
    emb = torch.nn.Embedding(50, storage.sparse_row, sparse=True)
    table = emb.weight.detach().numpy().copy()
    opt = fastadam.torch.SparseAdam(emb.parameters(), lr=1e-2, state_dtype=storage.kind)
    numpy_opt = fastadam.SparseAdam([table], lr=1e-2, state_dtype=storage.kind)
    gen = torch.Generator().manual_seed(10)
    for _ in range(3):
        opt.zero_grad()
        indices = torch.randint(0, 20, (30,), generator=gen)
        (emb(indices) * torch.randn(30, storage.sparse_row, generator=gen)).sum().backward()
        grad = emb.weight.grad
        numpy_opt.step([fastadam.RowSparseGrad(grad._indices()[0].numpy().copy(), grad._values().numpy().copy())])
        opt.step()
    assert_bitwise_equal(emb.weight.detach().numpy(), table)
    assert "exp_avg_codes" in opt.state[emb.weight]
    assert_state_is_the_numpy_optimizers(opt, [emb.weight], numpy_opt)

    # Rows of 64 elements would split a block between rows: refused as fastadam.SparseAdam refuses them.
    narrow = torch.nn.Embedding(100, 64, sparse=True)
    opt = fastadam.torch.SparseAdam(narrow.parameters(), state_dtype=storage.kind, min_compressed_size=0)
    before = narrow.weight.detach().clone()
    narrow(torch.tensor([1])).sum().backward()
    with pytest.raises(ValueError, match=r"the grad of param_groups\[0\]\['params'\]\[0\]: a row-sparse gradient "
                                         rf"needs rows of a multiple of {storage.block} elements with "
                                         rf"{storage.bits}-bit state"):
        opt.step()
    assert torch.equal(narrow.weight, before)


# -- bad state: a clear error naming the entry, nothing changed ----------------------------------------------

#: state[8] is model["c"].weight, of 4097 elements (17 rows of 241).
WHERE = r"state_dict\['state'\]\[8\] \(for param_groups\[0\]\['params'\]\[8\]\)"


def _replace(key, make):
    return lambda sd: sd["state"][8].__setitem__(key, make(sd["state"][8][key]))


def _set(key, index, value):
    return lambda sd: sd["state"][8][key].__setitem__(index, value)


def described(dtype: str, shape: tuple) -> str:
    """A pattern for an array as the errors describe it: ``uint8(17, 241)``."""
    return re.escape(f"{dtype}{tuple(shape)}")


def bad_states(storage: Storage) -> dict:
    """Corruptions of state[8] of a state dict in ``storage`` and the error each gets, by name."""
    codes = storage.codes_shape((17, 241))
    other = next(s for s in STORAGES.values() if s is not storage)
    other_codes = other.codes_shape((17, 241))
    strided = lambda: torch.zeros(*codes[:-1], 2 * codes[-1], dtype=torch.uint8)[..., ::2]  # noqa: E731
    blocks, values = storage.blocks(4097), 1 << storage.bits
    cases = {
        "codes-dtype": (_replace("exp_avg_codes", lambda t: t.float()),
                        WHERE + r"\['exp_avg_codes'\]: expected a torch.uint8 tensor, got a torch.float32 tensor"),
        "codes-shape": (_replace("exp_avg_codes", lambda t: t[..., :-1]),
                        WHERE + rf"\['exp_avg_codes'\]: expected {described('uint8', codes)}, "
                                rf"got {described('uint8', codes[:-1] + (codes[-1] - 1,))}"),
        f"codes-of-{other.kind}-state": (
            _replace("exp_avg_codes", lambda t: torch.zeros(other_codes, dtype=torch.uint8)),
            WHERE + rf"\['exp_avg_codes'\]: expected {described('uint8', codes)}, "
                    rf"got {described('uint8', other_codes)}"),
        "codes-strided": (_replace("exp_avg_codes", lambda t: strided()),
                          WHERE + rf"\['exp_avg_codes'\]: strides {re.escape(str(strided().stride()))} are not dense "
                          + storage.not_dense),
        "absmax-count": (_replace("exp_avg_absmax", lambda t: t[:-1]),
                         WHERE + rf"\['exp_avg_absmax'\]: expected {described('float32', (blocks,))}, "
                                 rf"got {described('float32', (blocks - 1,))}"),
        "map-size": (_replace("exp_avg_sq_map", lambda t: t[:-1]),
                     WHERE + r"\['exp_avg_sq_map'\]: expected float32\(256,\) \(8-bit codes\) or float32\(16,\) "
                             rf"\(4-bit\), got {described('float32', (values - 1,))}"),
        "map-unsorted": (_replace("exp_avg_sq_map", lambda t: t.flip(0)),
                         WHERE + rf"\['exp_avg_sq_map'\]: map: must hold {values} finite values in strictly "
                                 r"ascending order"),
        "map-nan": (_set("exp_avg_map", 3, float("nan")),
                    WHERE + rf"\['exp_avg_map'\]: map: must hold {values} finite values in strictly ascending order"),
        "missing-absmax": (lambda sd: sd["state"][8].pop("exp_avg_sq_absmax"), WHERE + r": no 'exp_avg_sq_absmax'"),
        "both-storages": (lambda sd: sd["state"][8].__setitem__("exp_avg", torch.zeros(17, 241)),
                          WHERE + r": holds both 'exp_avg' and 'exp_avg_codes'"),
    }
    if storage.bits == 8:  # an 8-bit map must hold 0 (the code of a zero moment); 4-bit linear_map does not
        zero = int(np.flatnonzero(storage.maps[0] == 0)[0])
        cases["map-without-zero"] = (_set("exp_avg_map", zero, 1e-9),
                                     WHERE + r"\['exp_avg_map'\]: map: must hold 0.0")
    return cases


@pytest.mark.parametrize("kind, corruption", [(kind, name) for kind, s in STORAGES.items() for name in bad_states(s)])
@pytest.mark.parametrize("target", ["int8", "int4", "float32"])
def test_bad_quantized_state_is_refused_on_loading_and_nothing_changes(kind, corruption, target):
    corrupt, match = bad_states(STORAGES[kind])[corruption]
    model = small_model()
    opt = fastadam.torch.AdamW(model.parameters(), lr=1e-2, state_dtype=kind)
    train(model, opt, 2, seed=11)
    sd = opt.state_dict()
    sd = {"state": {k: {key: t.clone() for key, t in s.items()} for k, s in sd["state"].items()},
          "param_groups": [{**g, "params": list(g["params"])} for g in sd["param_groups"]]}
    assert list(model.parameters())[8] is model["c"].weight and model["c"].weight.numel() == 4097
    assert sd["state"][8]["exp_avg_codes"].shape == STORAGES[kind].codes_shape((17, 241))
    assert torch.equal(sd["state"][8]["exp_avg_map"], torch.from_numpy(STORAGES[kind].maps[0]))
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


def test_quantized_state_for_a_float64_param_is_refused_as_fastadam_adam_refuses_it(storage):
    w32, w64 = torch.nn.Parameter(torch.randn(5000)), torch.nn.Parameter(torch.randn(5000, dtype=torch.float64))
    opt = fastadam.torch.Adam([w32], state_dtype=storage.kind)
    w32.grad = torch.ones(5000)
    opt.step()
    into = fastadam.torch.Adam([w64], state_dtype=storage.kind)
    with pytest.raises(ValueError, match=rf"\['exp_avg_codes'\]: {storage.bits}-bit state needs a float32 param "
                                         r"\(or float16/bfloat16 with master weights\), this one is torch.float64"):
        into.load_state_dict(opt.state_dict())
    assert not into.state
    # float64 params keep float64 moments under a quantized state_dtype, as in fastadam.Adam
    w64.grad = torch.ones(5000, dtype=torch.float64)
    into.step()
    assert into.state[w64]["exp_avg"].dtype is torch.float64


def test_bad_quantized_state_put_in_by_hand_is_refused_at_the_step_and_nothing_changes(storage):
    w = torch.nn.Parameter(torch.randn(5000))
    opt = fastadam.torch.Adam([w], state_dtype=storage.kind)
    w.grad = torch.ones(5000)
    opt.step()
    before = w.detach().clone(), opt.state[w]["exp_avg_codes"].clone()
    opt.state[w]["exp_avg_absmax"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"state\[param_groups\[0\]\['params'\]\[0\]\]\['exp_avg_absmax'\]: "
                                         rf"expected {storage.blocks(5000)} values \(one per block of "
                                         rf"{storage.block} elements"):
        opt.step()
    assert torch.equal(w, before[0]) and torch.equal(opt.state[w]["exp_avg_codes"], before[1])
    assert float(opt.state[w]["step"]) == 1
