// The Adam/AdamW update of one element -- or of one SIMD register of elements.
//
// This is the only place the formula is written.  Every instruction-set level
// and both dtypes instantiate it, for the full-width body and for the masked
// tail alike, and fastadam.reference spells out the same operations in the
// same order in NumPy.  Built with -ffp-contract=off, each line below is a
// fixed sequence of correctly rounded IEEE-754 operations, which is why every
// level, thread count and chunking gives the same bits.
#pragma once

#include "../kernel_api.hpp"
#include "simd.hpp"

namespace fastadam {
namespace {

// The constants of AdamConstants<T> broadcast to whatever V is (a register or
// a plain T).
template <class V>
struct Coefficients {
    V beta1, one_minus_beta1, beta2, one_minus_beta2;
    V weight_decay, lr_weight_decay, step_size, inv_bias_correction2_sqrt, eps, inv_grad_scale;
};

template <class Broadcast, class T>
FASTADAM_INLINE auto broadcast_coefficients(const AdamConstants<T>& k, Broadcast broadcast) {
    using V = decltype(broadcast(k.beta1));
    return Coefficients<V>{broadcast(k.beta1),        broadcast(k.one_minus_beta1),
                           broadcast(k.beta2),        broadcast(k.one_minus_beta2),
                           broadcast(k.weight_decay), broadcast(k.lr_weight_decay),
                           broadcast(k.step_size),    broadcast(k.inv_bias_correction2_sqrt),
                           broadcast(k.eps),          broadcast(k.inv_grad_scale)};
}

// max(a, b) that returns NaN when either input is NaN, like torch.maximum and
// np.maximum (the bare maxps instruction would silently drop a NaN in `a`).
template <class V>
FASTADAM_INLINE V maximum_propagating_nan(V a, V b) {
    const auto take_b = (a < b) | (b != b);
    return take_b ? b : a;
}

//   g  = g * (1 / grad_scale)                 if loss scaling (kScaleGrad)
//   g  = -g                                   if maximize
//   g  = g + weight_decay * p                 if L2 weight decay (Adam)
//   m  = beta1 * m + (1 - beta1) * g
//   v  = beta2 * v + ((1 - beta2) * g) * g
//   v' = max(v_max, v); v_max = v'            if amsgrad, else v' = v
//   u  = (step_size * m) / (sqrt(v') * inv_bias_correction2_sqrt + eps)
//   u  = (lr * weight_decay) * p + u          if decoupled weight decay (AdamW)
//   p  = p - u
// with step_size = lr / (1 - beta1^t) and inv_bias_correction2_sqrt =
// 1 / sqrt(1 - beta2^t).  Multiplying by that reciprocal (rounded once on the
// host) instead of dividing by sqrt(1 - beta2^t) leaves one division and one
// square root per element, the two slow instructions: it is what keeps the
// in-cache step close to the memory-bound probe.
//
// AdamW's decay is added to the update rather than applied as a factor
// p * (1 - lr * weight_decay) (PyTorch's form): rounded to float32, that
// factor is off by up to 2^-25 -- 19% of the decay at lr * weight_decay = 1e-7,
// all of it below 3e-8, where it rounds to 1 -- and the error is the same every
// step, so it builds up.  (lr * weight_decay) * p keeps float32's relative
// accuracy at any size, and p is rounded once per step instead of twice.
template <unsigned Variant, class V, class Sqrt>
FASTADAM_INLINE void adam_update(V& param, V grad, V& exp_avg, V& exp_avg_sq, V& max_exp_avg_sq,
                        const Coefficients<V>& c, Sqrt sqrt) {
    if constexpr ((Variant & kScaleGrad) != 0) grad = grad * c.inv_grad_scale;
    if constexpr ((Variant & kMaximize) != 0) grad = -grad;
    if constexpr ((Variant & kL2WeightDecay) != 0) grad = grad + c.weight_decay * param;

    exp_avg = c.beta1 * exp_avg + c.one_minus_beta1 * grad;
    exp_avg_sq = c.beta2 * exp_avg_sq + (c.one_minus_beta2 * grad) * grad;

    V second_moment = exp_avg_sq;
    if constexpr ((Variant & kAmsgrad) != 0) {
        max_exp_avg_sq = maximum_propagating_nan(max_exp_avg_sq, exp_avg_sq);
        second_moment = max_exp_avg_sq;
    }
    const V denom = sqrt(second_moment) * c.inv_bias_correction2_sqrt + c.eps;
    V update = (c.step_size * exp_avg) / denom;
    if constexpr ((Variant & kDecoupledDecay) != 0) update = c.lr_weight_decay * param + update;
    param = param - update;
}

}  // namespace
}  // namespace fastadam
