"""fastadam.torch with 4-bit optimizer state: what only 4-bit codes have, a memory order of their own.

4-bit codes (Li et al., NeurIPS 2023) are one flat uint8 run of ``ceil(numel / 2)`` bytes, element ``j`` of
the param's *memory* in the low four bits of byte ``j // 2`` when ``j`` is even, the high four when odd; unlike
8-bit codes, which have the param's shape and strides, they carry no layout.  So a channels_last param's codes
run over its memory, not its logical order; converted to float32, they come back laid out as the param; and a
param whose memory format changes between steps has its moments re-laid, one reshaped through ``.data``
refused; a checkpoint holds the strides the codes were written for, so it loads into any memory format.  What 4-bit state shares with 8-bit state (steps bitwise the NumPy optimizer and the reference,
checkpoints, conversions, bad state, nibble padding of odd sizes) is tested, for both storages, in
tests/test_fastadam_torch_quantized.py, whose model and helpers these tests use.
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
from test_fastadam_torch_quantized import MOMENTS, PARTS, memory, small_model, train  # noqa: E402

SIGNED4 = dynamic_map(True, bits=4)


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def values_of(s: dict, key: str, numel: int) -> np.ndarray:
    """The float32 values of 4-bit moment ``key`` of a state, in the param's memory order (map[code] * absmax)."""
    state = QuantizedState(*(s[key + part].numpy() for part in PARTS))
    return fastadam.reference.dequantize_blockwise(state, (numel,))


def test_4_bit_state_converted_to_float32_is_its_values_in_the_params_memory_order():
    model = small_model()
    src = fastadam.torch.AdamW(model.parameters(), lr=1e-2, state_dtype="int4")
    train(model, src, 2, seed=15)
    dst = fastadam.torch.AdamW(model.parameters(), lr=1e-2)
    dst.load_state_dict(src.state_dict())
    conv = model["conv"].weight
    for key in MOMENTS[:2]:
        t = dst.state[conv][key]
        assert t.stride() == conv.stride()  # laid out as its param: channels_last
        assert_bitwise_equal(memory(t), values_of(src.state[conv], key, conv.numel()), key)


def quantized_step(values: np.ndarray, factor: float) -> QuantizedState:
    """What a step with a zero gradient makes of flat float32 ``values`` put in as exp_avg: quantized (at the
    step, before it runs), decoded, scaled by beta1 = ``factor`` (exactly: a power of two) and quantized."""
    state = QuantizedState(np.empty((values.size + 1) // 2, np.uint8), np.empty(-(-values.size // 128),
                                                                                  np.float32), SIGNED4)
    fastadam.reference.quantize_blockwise(values, state)
    scaled = fastadam.reference.dequantize_blockwise(state, values.shape) * np.float32(factor)
    fastadam.reference.quantize_blockwise(scaled, state)
    return state


def test_a_channels_last_params_codes_run_over_its_memory():
    conv = torch.nn.Conv2d(8, 16, 6).to(memory_format=torch.channels_last)
    w = conv.weight
    opt = fastadam.torch.Adam([w], state_dtype="int4", betas=(0.5, 0.999))
    values = torch.randn(w.shape).to(memory_format=torch.channels_last)
    opt.state[w] = {"step": torch.tensor(0.0), "exp_avg": values.clone(), "exp_avg_sq": torch.zeros_like(values)}
    w.grad = torch.zeros_like(w)
    opt.step()
    in_memory_order = quantized_step(memory(values), 0.5)
    codes = opt.state[w]["exp_avg_codes"]
    assert codes.shape == (2304,) and codes.is_contiguous()
    np.testing.assert_array_equal(codes.numpy(), in_memory_order.codes)
    assert_bitwise_equal(opt.state[w]["exp_avg_absmax"].numpy(), in_memory_order.absmax)
    # ... which is not what the logical (C) order would give: the two orders differ for this param.
    in_logical_order = quantized_step(values.contiguous().numpy().reshape(-1), 0.5)
    assert not np.array_equal(in_logical_order.codes, in_memory_order.codes)


def test_a_param_changing_memory_format_between_steps_keeps_its_4_bit_moments():
    # model.to(memory_format=...) gives the param new memory in another order (p.data = ...). Its 4-bit
    # codes, one flat run, carry no layout: the optimizer remembers the order it wrote them in, and
    # re-lays them in the new one -- as loading their float32 values into a channels_last param would.
    model, twin = torch.nn.Conv2d(8, 16, 6), torch.nn.Conv2d(8, 16, 6)
    opt = fastadam.torch.AdamW(model.parameters(), lr=1e-2, amsgrad=True, state_dtype="int4")
    gen = torch.Generator().manual_seed(16)
    x = torch.randn(2, 8, 7, 7, generator=gen)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    twin.load_state_dict(model.state_dict())
    in_float32 = fastadam.torch.AdamW(twin.parameters(), lr=1e-2, amsgrad=True)
    in_float32.load_state_dict(opt.state_dict())  # the moments' values, as a C-contiguous param has them
    model.to(memory_format=torch.channels_last)
    twin.to(memory_format=torch.channels_last)
    twin_opt = fastadam.torch.AdamW(twin.parameters(), lr=1e-2, amsgrad=True, state_dtype="int4")
    twin_opt.load_state_dict(in_float32.state_dict())  # ... quantized in the channels_last order
    for m in (model, twin):
        m.zero_grad()
        m(x).square().mean().backward()
    opt.step()
    twin_opt.step()
    w, t = model.weight, twin.weight
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    assert_bitwise_equal(memory(w), memory(t))
    for key, value in twin_opt.state[t].items():
        assert torch.equal(opt.state[w][key], value), key


def test_a_param_reshaped_through_data_is_refused_by_its_4_bit_moments():
    w = torch.nn.Parameter(torch.randn(64, 64))
    opt = fastadam.torch.Adam([w], state_dtype="int4")
    w.grad = torch.ones(64, 64)
    opt.step()
    w.data = w.data.reshape(32, 128)  # as many elements, in another shape: which moment is whose?
    w.grad = torch.ones(32, 128)
    before = [t.clone() for t in opt.state[w].values()]
    with pytest.raises(ValueError, match=r"state\[param_groups\[0\]\['params'\]\[0\]\]\['exp_avg_codes'\]: 4-bit "
                                         r"codes written for a param of shape \(64, 64\), this one has shape "
                                         r"\(32, 128\)"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, opt.state[w].values()))



# -- checkpoints: the codes' layout travels with them --------------------------------------------------------
#
# 4-bit codes are in the memory order of the param they were written for, so a state dict holds, for each
# param with 4-bit moments, that param's strides: state["codes_strides"] (int64).  Loaded into a param of
# another memory order, the codes are read in theirs and re-laid in the param's at its next step, as after a
# memory-format change in process.

FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def conv_and_optimizer(memory_format, **options):
    conv = torch.nn.Conv2d(8, 16, 6).to(memory_format=memory_format)
    return conv, fastadam.torch.AdamW(conv.parameters(), lr=1e-2, amsgrad=True, **options)


def conv_step(conv, opt, seed: int) -> None:
    x = torch.randn(2, 8, 7, 7, generator=torch.Generator().manual_seed(seed))
    opt.zero_grad()
    conv(x).square().mean().backward()
    opt.step()


def saved_and_loaded(sd: dict, tmp_path) -> dict:
    torch.save(sd, tmp_path / "opt.pt")
    return torch.load(tmp_path / "opt.pt", weights_only=True)


@pytest.mark.parametrize("converted", ["before loading", "after loading"])
@pytest.mark.parametrize("loaded", FORMATS)
@pytest.mark.parametrize("saved", FORMATS)
def test_a_4_bit_checkpoint_loads_into_any_memory_format_as_an_uninterrupted_run_changes_format(
        saved, loaded, converted, tmp_path):
    # The model the checkpoint loads into is built C-contiguous, and converted to the memory format `loaded`
    # before or after its optimizer loads.  Channels_last -> channels_last after loading is the common case of
    # a model built, its optimizer's state loaded, then model.to(memory_format=torch.channels_last).
    conv, opt = conv_and_optimizer(FORMATS[saved], state_dtype="int4")
    for seed in (1, 2):
        conv_step(conv, opt, seed)
    sd = saved_and_loaded(opt.state_dict(), tmp_path)
    w = conv.weight
    assert torch.equal(sd["state"][0]["codes_strides"], torch.tensor(w.stride(), dtype=torch.int64))
    assert "codes_strides" not in sd["state"][1]  # the bias: 16 elements, float32 moments

    twin = torch.nn.Conv2d(8, 16, 6)
    twin.load_state_dict(conv.state_dict())
    if converted == "before loading":
        twin.to(memory_format=FORMATS[loaded])
    twin_opt = fastadam.torch.AdamW(twin.parameters(), lr=1e-2, amsgrad=True, state_dtype="int4")
    twin_opt.load_state_dict(sd)
    if converted == "after loading":  # the codes are still in the order they were written in (nothing lost)
        twin.to(memory_format=FORMATS[loaded])
    # The run that never went through the checkpoint: its param changes memory format the same way.
    conv.to(memory_format=FORMATS[loaded])
    assert twin.weight.stride() == w.stride()

    conv_step(conv, opt, 3)
    conv_step(twin, twin_opt, 3)
    for p, q in zip(conv.parameters(), twin.parameters()):
        assert p.stride() == q.stride()
        assert_bitwise_equal(memory(q), memory(p))
        assert twin_opt.state[q].keys() == opt.state[p].keys()  # "codes_strides" is no state entry
        for key, value in opt.state[p].items():
            assert torch.equal(twin_opt.state[q][key], value), key
    assert torch.equal(twin_opt.state_dict()["state"][0]["codes_strides"], torch.tensor(w.stride()))


def test_a_checkpoint_loaded_and_saved_again_before_a_step_keeps_the_codes_layout():
    conv, opt = conv_and_optimizer(torch.channels_last, state_dtype="int4")
    conv_step(conv, opt, 4)
    twin, twin_opt = conv_and_optimizer(torch.contiguous_format, state_dtype="int4")
    twin_opt.load_state_dict(opt.state_dict())
    resaved = twin_opt.state_dict()["state"][0]
    assert torch.equal(resaved["codes_strides"], torch.tensor(conv.weight.stride()))
    for key in ("exp_avg_codes", "exp_avg_sq_codes", "max_exp_avg_sq_codes"):
        assert torch.equal(resaved[key], opt.state[conv.weight][key]), key


@pytest.mark.parametrize("target", ["float32", "int8"])
def test_4_bit_codes_load_into_float32_or_8_bit_moments_in_the_order_they_were_written_in(target):
    conv, opt = conv_and_optimizer(torch.channels_last, state_dtype="int4")
    conv_step(conv, opt, 5)
    w = conv.weight
    twin, twin_opt = conv_and_optimizer(torch.contiguous_format, state_dtype=target)
    twin_opt.load_state_dict(opt.state_dict())
    # The codes' values are in w's memory order: laid out with w's (channels_last) strides, they are the
    # moments' logical values.
    values = {key: torch.from_numpy(values_of(opt.state[w], key, w.numel())).as_strided(w.shape, w.stride())
              for key in MOMENTS}
    loaded = twin_opt.state[twin.weight]
    if target == "float32":
        for key in MOMENTS:
            assert loaded[key].is_contiguous()
            assert_bitwise_equal(loaded[key].numpy(), values[key].contiguous().numpy(), key)
        return
    # ... quantized at 8 bits in the contiguous param's order, as those values load as float32 moments.
    from_values = fastadam.torch.AdamW([torch.nn.Parameter(torch.zeros(w.shape))], state_dtype="int8", amsgrad=True)
    from_values.load_state_dict({"state": {0: {"step": torch.tensor(1.0), **values}},
                                 "param_groups": from_values.state_dict()["param_groups"]})
    expected = next(iter(from_values.state.values()))
    for key in MOMENTS:
        assert loaded[key + "_codes"].is_contiguous()
        for part in PARTS:
            assert torch.equal(loaded[key + part], expected[key + part]), key + part


def test_only_4_bit_moments_carry_codes_strides():
    for state_dtype in ("float32", "int8", ("int8", "int4")):
        conv, opt = conv_and_optimizer(torch.channels_last, state_dtype=state_dtype)
        conv_step(conv, opt, 6)
        has_entry = [("codes_strides" in s) for s in opt.state_dict()["state"].values()]
        assert has_entry == [state_dtype == ("int8", "int4"), False], state_dtype  # weight, bias


@pytest.mark.parametrize("bad, message", [
    (None, r"no 'codes_strides': 4-bit codes are one flat run in the memory order of the param they were "
           r"written for, whose strides are needed to read them"),
    ([288, 1, 48, 8], r"\['codes_strides'\]: expected an int64 tensor of 4 values .* got list"),
    (torch.tensor([288, 1, 48, 8], dtype=torch.int32), r"expected an int64 tensor of 4 values .* got a "
                                                       r"torch.int32 tensor of shape \(4,\)"),
    (torch.tensor([288, 1, 48]), r"expected an int64 tensor of 4 values .* got a torch.int64 tensor of shape \(3,\)"),
    (torch.tensor([1, 1, 1, 1]), r"strides \(1, 1, 1, 1\) are not a dense layout of the param's shape "
                                 r"\(16, 8, 6, 6\)"),
    (torch.tensor([576, 2, 96, 16]), r"strides \(576, 2, 96, 16\) are not a dense layout"),  # gaps
    (torch.tensor([288, -1, 48, 8]), r"are not a dense layout"),
])
def test_a_bad_or_missing_codes_strides_is_refused_and_nothing_changes(bad, message):
    conv, opt = conv_and_optimizer(torch.channels_last, state_dtype="int4")
    conv_step(conv, opt, 7)
    sd = opt.state_dict()
    sd["state"] = {i: dict(s) for i, s in sd["state"].items()}
    if bad is None:
        del sd["state"][0]["codes_strides"]
    else:
        sd["state"][0]["codes_strides"] = bad
    twin, twin_opt = conv_and_optimizer(torch.contiguous_format, state_dtype="int4")
    conv_step(twin, twin_opt, 8)
    before = {p: {key: t.clone() for key, t in twin_opt.state[p].items()} for p in twin.parameters()}
    with pytest.raises(ValueError, match=message) as refused:
        twin_opt.load_state_dict(sd)
    assert str(refused.value).startswith("state_dict['state'][0] (for param_groups[0]['params'][0])")
    for p in twin.parameters():
        assert twin_opt.state[p].keys() == before[p].keys()
        for key, t in before[p].items():
            assert torch.equal(twin_opt.state[p][key], t), key
