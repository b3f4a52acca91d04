"""A plain NumPy implementation of the Adam / AdamW step: the specification.

This is Algorithm 1 of Kingma & Ba, *Adam: A Method for Stochastic
Optimization* (ICLR 2015), with the options of ``torch.optim.Adam``:

.. code-block:: text

    g_t = -g_t                                    if maximize
    g_t = g_t + weight_decay * p_{t-1}            if weight_decay and not decoupled  (Adam, L2)
    m_t = beta1 * m_{t-1} + (1 - beta1) * g_t                  (first moment)
    v_t = beta2 * v_{t-1} + (1 - beta2) * g_t * g_t            (second moment)
    v'_t = max(v'_{t-1}, v_t)                     if amsgrad, else v'_t = v_t
    u_t = lr / (1 - beta1^t) * m_t / (sqrt(v'_t) / sqrt(1 - beta2^t) + eps)
    u_t = lr * sqrt(1 - beta2^t) / (1 - beta1^t) * m_t / (sqrt(v'_t) + eps)
                                                  instead, if eps_before_bias_correction
    u_t = u_t + lr * weight_decay * p_{t-1}       if weight_decay and decoupled      (AdamW)
    p_t = p_{t-1} - u_t

evaluated as ``u = (step_size * m_t) / (sqrt(v'_t) * inv_bias_correction2_sqrt + eps)``,
``u = lr_weight_decay * p + u`` (AdamW) and ``p - u``, with ``step_size = lr / (1 - beta1^t)``,
``inv_bias_correction2_sqrt = 1 / sqrt(1 - beta2^t)`` and ``lr_weight_decay = lr * weight_decay``.

AdamW's decay ``p * (1 - lr * weight_decay)`` (Loshchilov & Hutter) is the same
number; it is computed as ``p - (lr * weight_decay) * p``, folded into the
update, because ``1 - lr * weight_decay`` rounded to float32 is off by up to
2**-25 -- 19% of the decay at ``lr * weight_decay = 1e-7``, and all of it below
about 3e-8, where the factor rounds to 1 -- while ``(lr * weight_decay) * p`` keeps
float32's relative accuracy at any size.

``m_t / (1 - beta1^t)`` and ``v_t / (1 - beta2^t)`` are the paper's
bias-corrected moments; folding the corrections into the step size and the
denominator, as PyTorch does, costs two scalar operations per step instead of
two array passes; multiplying by the reciprocal of ``sqrt(1 - beta2^t)``
leaves one division and one square root per element, the slow instructions.

This module fixes *which* IEEE operations are done and in which order: every
line below is one NumPy ufunc on arrays of the parameter's dtype, with float
constants that were computed in double precision and rounded once to that
dtype (:func:`constants`).  fastadam's compiled kernel performs exactly these
operations, so its results are bitwise equal to this function's on every
instruction-set level and thread count.  It is written for reading, not
speed: it walks memory a dozen times and allocates temporaries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np

__all__ = ["AdamConstants", "constants", "adam_step", "coalesce_rows", "sparse_adam_step"]

ArrayOrList = Union[np.ndarray, Sequence[np.ndarray]]


@dataclass(frozen=True)
class AdamConstants:
    """The per-step scalars, each rounded once from double to the working dtype."""

    beta1: np.floating
    one_minus_beta1: np.floating
    beta2: np.floating
    one_minus_beta2: np.floating
    weight_decay: np.floating
    lr_weight_decay: np.floating  # lr * weight_decay
    step_size: np.floating  # lr / (1 - beta1^t)
    inv_bias_correction2_sqrt: np.floating  # 1 / sqrt(1 - beta2^t)
    eps: np.floating
    inv_grad_scale: np.floating  # 1 / grad_scale


def constants(step: int, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
              dtype: np.dtype, eps_before_bias_correction: bool = False,
              grad_scale: Optional[float] = None) -> AdamConstants:
    """Compute the step-``step`` constants in double, then round each to ``dtype``.

    With ``eps_before_bias_correction`` (the form of Keras, scikit-learn and
    ``torch.optim.SparseAdam``,
    ``p - lr * sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + eps)``) the
    step size absorbs the second bias correction and its reciprocal becomes
    1, so that ``sqrt(v) * 1 + eps`` -- exact -- is SparseAdam's denominator.
    """
    beta1, beta2 = float(betas[0]), float(betas[1])
    lr, eps, weight_decay = float(lr), float(eps), float(weight_decay)
    bias_correction1 = 1.0 - math.pow(beta1, step)
    bias_correction2 = 1.0 - math.pow(beta2, step)
    as_dtype = np.dtype(dtype).type
    return AdamConstants(
        beta1=as_dtype(beta1),
        one_minus_beta1=as_dtype(1.0 - beta1),
        beta2=as_dtype(beta2),
        one_minus_beta2=as_dtype(1.0 - beta2),
        weight_decay=as_dtype(weight_decay),
        lr_weight_decay=as_dtype(lr * weight_decay),
        step_size=as_dtype(lr * math.sqrt(bias_correction2) / bias_correction1 if eps_before_bias_correction
                           else lr / bias_correction1),
        inv_bias_correction2_sqrt=as_dtype(1.0 if eps_before_bias_correction else 1.0 / math.sqrt(bias_correction2)),
        eps=as_dtype(eps),
        inv_grad_scale=as_dtype(1.0 / grad_scale if grad_scale else 1.0),
    )


def _as_list(x: Optional[ArrayOrList]) -> list:
    if x is None:
        return []
    return [x] if isinstance(x, (np.ndarray, QuantizedState)) else list(x)


def adam_step(params: ArrayOrList, grads: ArrayOrList, exp_avgs: ArrayOrList, exp_avg_sqs: ArrayOrList, *,
              step: int, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
              weight_decay: float = 0.0, decoupled_weight_decay: bool = False, amsgrad: bool = False,
              max_exp_avg_sqs: Optional[ArrayOrList] = None, maximize: bool = False,
              eps_before_bias_correction: bool = False,
              model_params: Optional[ArrayOrList] = None, grad_scale: Optional[float] = None,
              skip_if_nonfinite: bool = False, stochastic_rounding: bool = False, rounding_seed: int = 0) -> bool:
    """One Adam/AdamW step, in place, written as NumPy array expressions.

    Same arguments and semantics as :func:`fastadam.adam_step` (see the module
    docstring for the formula); no argument checking beyond NumPy's own.
    Mixed precision: float16/bfloat16 gradients are widened (exactly) to the
    param's float32, multiplied by ``1 / grad_scale`` when given, and each
    updated param is rounded into its ``model_params`` copy by NumPy's (or
    ml_dtypes') round-to-nearest-even ``astype``.
    """
    params_l, exp_avgs_l, exp_avg_sqs_l = _as_list(params), _as_list(exp_avgs), _as_list(exp_avg_sqs)
    max_l = _as_list(max_exp_avg_sqs) if amsgrad else [None] * len(params_l)
    models_l = _as_list(model_params) if model_params is not None else [None] * len(params_l)
    cs = [constants(step, lr, betas, eps, weight_decay, p.dtype, grad_scale=grad_scale,
                    eps_before_bias_correction=eps_before_bias_correction) for p in params_l]
    with np.errstate(invalid="ignore", over="ignore"):
        grads_l = [g.astype(p.dtype) * c.inv_grad_scale if grad_scale else g.astype(p.dtype, copy=False)
                   for p, g, c in zip(params_l, _as_list(grads), cs)]
    if skip_if_nonfinite and not all(np.isfinite(g).all() for g in grads_l):
        return False
    for index, (p, g, m, v, v_max, model, c) in enumerate(
            zip(params_l, grads_l, exp_avgs_l, exp_avg_sqs_l, max_l, models_l, cs)):
        # Moments stored in bfloat16 (beside float32 params): widened exactly to float32, updated in float32,
        # rounded back to nearest-even -- per element, so the kernel's tiles give the same bits.
        state = [m, v] + ([v_max] if amsgrad else [])
        work = [dequantize_blockwise(s, p.shape) if isinstance(s, tuple)
                else s.astype(p.dtype) if s.dtype != p.dtype else s
                for s in state]
        _step_one(p, g, work[0], work[1], work[2] if amsgrad else None, c, maximize=maximize,
                  l2=weight_decay != 0 and not decoupled_weight_decay,
                  decoupled=weight_decay != 0 and decoupled_weight_decay, amsgrad=amsgrad)
        key = rounding_key(rounding_seed, step, index) if stochastic_rounding else None
        for k, (stored, computed) in enumerate(zip(state, work)):
            if computed is stored:
                continue
            if isinstance(stored, tuple):
                quantize_blockwise(computed, QuantizedState(*stored))
            elif key is not None and stored.dtype.name == "bfloat16":
                stored[...] = stochastic_round_bfloat16(computed, key ^ _FIRST_MOMENT_STREAM if k == 0 else key)
            else:
                with np.errstate(invalid="ignore", over="ignore"):
                    stored[...] = computed.astype(stored.dtype)
        if model is not None:
            with np.errstate(invalid="ignore", over="ignore"):  # NaN and overflow round like the kernel's
                model[...] = p.astype(model.dtype)
    return True


# NaN and inf in a gradient are not errors: they propagate, silently, as in
# fastadam's kernel and in PyTorch.
@np.errstate(invalid="ignore", divide="ignore", over="ignore", under="ignore")
def _step_one(p: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray, v_max: Optional[np.ndarray],
              c: AdamConstants, *, maximize: bool, l2: bool, decoupled: bool, amsgrad: bool) -> None:
    """The update of one parameter array: each line one ufunc, in the kernel's order."""
    if maximize:
        g = -g
    if l2:
        g = g + c.weight_decay * p

    m[...] = c.beta1 * m + c.one_minus_beta1 * g
    v[...] = c.beta2 * v + (c.one_minus_beta2 * g) * g
    second_moment = v
    if amsgrad:
        v_max[...] = np.maximum(v_max, v)  # NaN-propagating, like torch.maximum
        second_moment = v_max
    denom = np.sqrt(second_moment) * c.inv_bias_correction2_sqrt + c.eps
    update = (c.step_size * m) / denom
    if decoupled:
        update = c.lr_weight_decay * p + update
    p[...] = p - update


# -- 8-bit block-wise state ---------------------------------------------------------------------------------

#: Elements per quantization block of 8-bit state.
QUANT_BLOCK = 256
#: Elements per quantization block of 4-bit state (Li et al., NeurIPS 2023: B128).
QUANT_BLOCK_4BIT = 128


def dynamic_map(signed: bool, bits: int = 8) -> np.ndarray:
    """The ``2**bits`` values of the dynamic data type (Dettmers, "8-Bit Approximations for Parallelism in
    Deep Learning", ICLR 2016; the block-wise optimizers of Dettmers et al., ICLR 2022), ascending, as float32.

    8 bits: seven decades of exponent, 10**-7 to 1: decade ``i`` (0..6) holds the midpoints of
    ``2**i + 1`` (signed) or ``2**(i+1) + 1`` (unsigned) equally spaced points from 0.1 to 1, scaled by
    ``10**(i - 6)``; a signed map has their negatives too; both hold 0 and 1.  Computed in float64 and
    rounded once to float32 (bitsandbytes builds the same values with float32 ``linspace``, so an entry
    may differ from its by an ulp).

    4 bits (signed only: the first moment of Li et al., NeurIPS 2023, "Memory Efficient Optimizers with
    4-bit States"): the same rule with 3 of the 4 bits for the magnitude keeps the top three decades, 1, 2
    and 4 midpoints in 10**-2, 10**-1 and 1, their negatives, 0 and 1 -- 16 values.
    """
    if bits not in (4, 8) or (bits == 4 and not signed):
        raise ValueError(f"dynamic_map: bits must be 8, or 4 with signed=True, got bits={bits}, signed={signed}")
    values = [0.0, 1.0]
    for i in range(7):
        exponent = i + bits - 8 + (0 if signed else 1)  # the decade's 2**exponent midpoints (none below 0)
        if exponent < 0:
            continue
        edges = np.linspace(0.1, 1.0, 2**exponent + 1)
        means = (edges[:-1] + edges[1:]) / 2.0 * 10.0**(i - 6)
        values += means.tolist() + ((-means).tolist() if signed else [])
    out = np.sort(np.array(values, dtype=np.float32))
    assert out.size == 2**bits and np.all(np.diff(out) > 0)
    return out


def linear_map(bits: int = 4) -> np.ndarray:
    """The ``2**bits`` values ``(k + 1) / 2**bits``, k = 0 .. 2**bits - 1: the linear map without zero that Li
    et al. (NeurIPS 2023) keep the second moment in at 4 bits.  Without a zero code a small ``v`` is never
    stored as 0, which would turn ``m / sqrt(v)`` into a huge update: it reads back as at least
    ``absmax / 2**bits``."""
    if bits != 4:
        raise ValueError(f"linear_map: bits must be 4, got {bits}")
    return (np.arange(1, 2**bits + 1, dtype=np.float32) / np.float32(2**bits)).astype(np.float32)


class QuantizedState(NamedTuple):
    """A moment in block-wise quantized state: element j stands for ``map[code_j] * absmax[j // block]``.

    8-bit (a ``map`` of 256 values: :func:`dynamic_map`): ``codes`` is uint8 of the param's shape, one code
    per element, and ``absmax`` one float32 per block of 256 consecutive elements of the flat param.

    4-bit (a ``map`` of 16 values: ``dynamic_map(True, bits=4)`` or :func:`linear_map`): ``codes`` is a flat
    uint8 array of ``ceil(size / 2)`` bytes, two codes per byte -- element ``2k`` in the low four bits of
    byte ``k``, element ``2k + 1`` in the high four (0 past an odd size's last element) -- and ``absmax``
    one float32 per block of 128 elements.

    ``map`` is ascending float32: the codes' values.
    """

    codes: np.ndarray
    absmax: np.ndarray
    map: np.ndarray


def code_bits(qmap: np.ndarray) -> int:
    """4 or 8: the bits of a code into ``qmap`` (16 or 256 values)."""
    return 4 if qmap.size == 16 else 8


def quantization_block(qmap: np.ndarray) -> int:
    """The elements per absmax of state with codes into ``qmap``: 128 for 4-bit, 256 for 8-bit."""
    return QUANT_BLOCK_4BIT if code_bits(qmap) == 4 else QUANT_BLOCK


def _unpacked_codes(state: QuantizedState, size: int) -> np.ndarray:
    flat = state.codes.reshape(-1)
    if code_bits(state.map) == 8:
        return flat
    pairs = np.stack([flat & 0xF, flat >> 4], axis=1).reshape(-1)
    return pairs[:size]


def dequantize_blockwise(state: QuantizedState, shape: Optional[tuple[int, ...]] = None) -> np.ndarray:
    """The float32 values of ``state``: ``map[code] * absmax`` of its block (one correctly rounded multiply),
    shaped as ``shape`` -- by default the codes' shape, which is the values' for 8-bit state (4-bit state
    needs ``shape``: its codes are packed)."""
    if shape is None:
        if code_bits(state.map) == 4:
            raise ValueError("dequantize_blockwise: 4-bit state needs the values' shape")
        shape = state.codes.shape
    size = int(np.prod(shape, dtype=np.int64))
    codes = _unpacked_codes(state, size)
    scale = np.repeat(state.absmax, quantization_block(state.map))[:size]
    return (state.map[codes] * scale).reshape(shape)


def moment_map(first_moment: bool, bits: int) -> np.ndarray:
    """The map fastadam's optimizers keep a moment in at ``bits`` (8 or 4): 8-bit, the signed
    :func:`dynamic_map` for ``exp_avg`` and the unsigned one for ``exp_avg_sq`` (and amsgrad's maximum); 4-bit
    (Li et al.), ``dynamic_map(True, bits=4)`` for ``exp_avg`` and :func:`linear_map` for the others."""
    if bits == 8:
        return dynamic_map(signed=first_moment)
    return dynamic_map(True, bits=4) if first_moment else linear_map(bits)


def zero_state(shape: tuple[int, ...], qmap: np.ndarray) -> QuantizedState:
    """A moment of zeros over ``qmap`` for values of ``shape``, as :func:`quantize_blockwise` stores one:
    every code the :func:`null_code` (4-bit: twice a byte, 0 past an odd size's last element), absmax 0."""
    size = math.prod(shape)
    null = null_code(qmap)
    if code_bits(qmap) == 8:
        codes = np.full(shape, null, np.uint8)
    else:
        codes = np.full(-(-size // 2), null * 0x11, np.uint8)
        if size % 2:
            codes[-1] = null
    return QuantizedState(codes, np.zeros(-(-size // quantization_block(qmap)), np.float32), qmap)


def null_code(qmap: np.ndarray) -> int:
    """The code of the map value nearest 0 (a tie going to the lower code): 0's own code where the map holds
    0 -- the code of a NaN or inf element and of a block of zeros."""
    midpoints = (qmap[:-1].astype(np.float64) + qmap[1:].astype(np.float64)) / 2
    return int(np.searchsorted(midpoints, 0.0, side="left"))


@np.errstate(invalid="ignore", divide="ignore")
def quantize_blockwise(x: np.ndarray, state: QuantizedState) -> None:
    """Store float32 ``x`` into ``state`` (its codes and absmax), block by block.

    A block's absmax is the largest finite ``|x|`` in it; each element's code is that of the map value
    nearest to ``x / absmax`` (the float32 quotient) in exact arithmetic, a tie going to the lower code --
    the number of midpoints between consecutive map values (exact in float64) below it.  A NaN or inf
    element is stored as the :func:`null_code` (0's code: it reads back as 0 where the map holds 0; with
    :func:`linear_map`, as ``absmax / 16``) and leaves its block's scale alone; a block of zeros has absmax 0
    and every code the null code.  4-bit codes are packed two to a byte (see :class:`QuantizedState`).
    """
    block = quantization_block(state.map)
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    blocks = -(-flat.size // block)
    padded = np.zeros(blocks * block, np.float32)
    padded[:flat.size] = flat
    padded = padded.reshape(blocks, block)
    finite = np.isfinite(padded)
    absmax = np.where(finite, np.abs(padded), np.float32(0)).max(axis=1).astype(np.float32)
    normalized = (padded / absmax[:, None]).astype(np.float32)
    midpoints = (state.map[:-1].astype(np.float64) + state.map[1:].astype(np.float64)) / 2
    codes = np.searchsorted(midpoints, normalized.astype(np.float64), side="left").astype(np.uint8)
    codes[~finite | (absmax[:, None] == 0)] = null_code(state.map)
    codes = codes.reshape(-1)[:flat.size]
    if code_bits(state.map) == 4:
        pairs = np.zeros(2 * (-(-flat.size // 2)), np.uint8)
        pairs[:flat.size] = codes
        codes = pairs[0::2] | (pairs[1::2] << 4)
    state.codes.reshape(-1)[...] = codes
    state.absmax[...] = absmax


_MASK64 = (1 << 64) - 1
#: exp_avg's random bits come from another stream than exp_avg_sq's (and its maximum's): its key's low
#: word is XORed with this.
_FIRST_MOMENT_STREAM = 0x9E3779B9


def _splitmix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def rounding_key(seed: int, step: int, param_index: int) -> int:
    """The 64-bit key of stochastic rounding for one parameter at one step."""
    return _splitmix64(_splitmix64(_splitmix64(seed) ^ step) ^ param_index)


def _lowbias32(x: np.ndarray) -> np.ndarray:
    """C. Wellons' lowbias32 integer hash, on uint32 arrays (wrapping multiplication)."""
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


@np.errstate(over="ignore")
def stochastic_round_bfloat16(x: np.ndarray, key: int, first_index: int = 0) -> np.ndarray:
    """float32 ``x`` rounded stochastically to bfloat16 (returned as ml_dtypes.bfloat16).

    Element ``i`` (whose index in its parameter is ``first_index + i``) gets
    16 random bits ``r = lowbias32(lowbias32(lo ^ key_lo) ^ hi ^ key_hi) &
    0xFFFF`` from the low and high 32-bit words of its index; its float bits
    plus ``r``, with the low 16 bits dropped, are the result: it rounds up
    with probability (dropped bits) / 2**16.  NaN becomes a quiet NaN, inf
    stays inf, and a value above bfloat16's largest may round up to inf.
    """
    import ml_dtypes

    u = np.ascontiguousarray(x, dtype=np.float32).reshape(-1).view(np.uint32)
    index = np.arange(first_index, first_index + u.size, dtype=np.uint64)
    lo, hi = (index & np.uint64(0xFFFFFFFF)).astype(np.uint32), (index >> np.uint64(32)).astype(np.uint32)
    k_lo, k_hi = np.uint32(key & 0xFFFFFFFF), np.uint32(key >> 32)
    r = _lowbias32(_lowbias32(lo ^ k_lo) ^ hi ^ k_hi) & np.uint32(0xFFFF)
    bits = (u + r) >> np.uint32(16)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    bits = np.where(nan, (u >> np.uint32(16)) | np.uint32(0x40), bits).astype(np.uint16)
    return bits.view(ml_dtypes.bfloat16).reshape(np.shape(x))


def coalesce_rows(indices: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge repeated row indices of a row-sparse gradient: ``(unique rows, summed values)``.

    Each sum starts from the row's first occurrence and adds the others in the
    order they appear in ``indices`` -- the order fastadam's kernel uses, so
    the sums are bitwise equal.
    """
    rows, first, inverse = np.unique(indices, return_index=True, return_inverse=True)
    summed = values[first].copy()
    is_first = np.zeros(len(indices), bool)
    is_first[first] = True
    for i in np.flatnonzero(~is_first):
        summed[inverse[i]] += values[i]
    return rows, summed


def sparse_adam_step(param: np.ndarray, indices: np.ndarray, values: np.ndarray, exp_avg: np.ndarray,
                     exp_avg_sq: np.ndarray, *, step: int, lr: float = 1e-3,
                     betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, maximize: bool = False) -> None:
    """``torch.optim.SparseAdam``'s lazy step: only the rows in ``indices`` change (see
    :func:`fastadam.sparse_adam_step`)."""
    rows, grad = coalesce_rows(np.asarray(indices), values)
    c = constants(step, lr, betas, eps, 0.0, param.dtype, eps_before_bias_correction=True)
    # Copies of the present rows, the moments widened to the param's dtype (exactly, from bfloat16).
    p, m, v = param[rows], exp_avg[rows].astype(param.dtype), exp_avg_sq[rows].astype(param.dtype)
    _step_one(p, grad, m, v, None, c, maximize=maximize, l2=False, decoupled=False, amsgrad=False)
    with np.errstate(invalid="ignore", over="ignore"):  # rounded back to nearest-even where they are bfloat16
        param[rows], exp_avg[rows], exp_avg_sq[rows] = p, m.astype(exp_avg.dtype), v.astype(exp_avg_sq.dtype)
