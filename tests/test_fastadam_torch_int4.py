"""fastadam.torch with 4-bit optimizer state: what only 4-bit codes have, a memory order of their own.

4-bit codes (Li et al., NeurIPS 2023) are one flat uint8 run of ``ceil(numel / 2)`` bytes, element ``j`` of
the param's *memory* in the low four bits of byte ``j // 2`` when ``j`` is even, the high four when odd; unlike
8-bit codes, which have the param's shape and strides, they carry no layout.  So a channels_last param's codes
run over its memory, not its logical order; converted to float32, they come back laid out as the param; and a
param whose memory format changes between steps has its moments re-laid, one reshaped through ``.data``
refused.  What 4-bit state shares with 8-bit state (steps bitwise the NumPy optimizer and the reference,
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

