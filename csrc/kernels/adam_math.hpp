// The Adam/AdamW update of one element -- or of one SIMD register of elements.
//
// This is the only place the formula is written.  Every instruction-set level
// and both dtypes instantiate it, for the full-width body and for the masked
// tail alike, and fastadam.reference spells out the same operations in the
// same order in NumPy.  Built with -ffp-contract=off, each line below is a
// fixed sequence of correctly rounded IEEE-754 operations, which is why every
// level, thread count and chunking gives the same bits.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "../kernel_api.hpp"
#include "simd.hpp"

namespace fastadam {
namespace FASTADAM_LEVEL {

// The constants of AdamConstants<T> broadcast to whatever V is (a register or
// a plain T).
template <class V>
struct Coefficients {
    V beta1, one_minus_beta1, beta2, one_minus_beta2;
    V weight_decay, lr_weight_decay, step_size, inv_bias_correction2_sqrt, eps, inv_grad_scale, grad_sign;
};

template <class Broadcast, class T>
FASTADAM_INLINE auto broadcast_coefficients(const AdamConstants<T>& k, Broadcast broadcast) {
    using V = decltype(broadcast(k.beta1));
    return Coefficients<V>{broadcast(k.beta1),        broadcast(k.one_minus_beta1),
                           broadcast(k.beta2),        broadcast(k.one_minus_beta2),
                           broadcast(k.weight_decay), broadcast(k.lr_weight_decay),
                           broadcast(k.step_size),    broadcast(k.inv_bias_correction2_sqrt),
                           broadcast(k.eps),          broadcast(k.inv_grad_scale),
                           broadcast(k.grad_sign)};
}

// a with the bits of `sign` XORed in: with sign = -0.0 that flips the sign
// bit alone, exactly what -a does, for NaN as for any value (a
// multiplication by -1 keeps a NaN's sign on x86, so it is not the same).
// V is a register of float or double lanes, or a plain float or double.
// The unsigned integer type with V's bits: one integer for a float or a
// double, a vector of them for a register.
template <class V, bool = std::is_floating_point_v<V>>
struct BitsOf {
    using type = std::conditional_t<sizeof(V) == 4, std::uint32_t, std::uint64_t>;
};
template <class V>
struct BitsOf<V, false> {
    using Lane = std::remove_cv_t<std::remove_reference_t<decltype(std::declval<V>()[0])>>;
    typedef typename BitsOf<Lane>::type type __attribute__((vector_size(sizeof(V))));
};

template <class V>
FASTADAM_INLINE V xor_sign(V a, V sign) {
    typename BitsOf<V>::type x, y;
    std::memcpy(&x, &a, sizeof a);
    std::memcpy(&y, &sign, sizeof sign);
    x ^= y;
    std::memcpy(&a, &x, sizeof a);
    return a;
}

// max(a, b) that returns NaN when either input is NaN, like torch.maximum and
// np.maximum (the bare maxps instruction would silently drop a NaN in `a`).
template <class V>
FASTADAM_INLINE V maximum_propagating_nan(V a, V b) {
    const auto take_b = (a < b) | (b != b);
    return take_b ? b : a;
}

// A kernel-internal variant bit: the gradient is used as it is, without the
// multiply by inv_grad_scale and the XOR with grad_sign.  The loops take it
// when those are 1 and +0.0 (no loss scaling, no maximize), where they are
// identities (see below): the bits are the same, and in cache the two
// operations held the step furthest below the exact-arithmetic probe
// (measured on Zen 3, float32 2^14-2^20, against the probe as it was before
// it kept its pointers in locals: 87.6-94.7% of it with them, 93.9-99.5%
// without).
constexpr unsigned kPlainGradient = kVariantCount;

//   g  = g * (1 / grad_scale)                 (1 without loss scaling)
//   g  = -g                                   if maximize (an XOR of the sign bit)
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
// Loss scaling and maximize are not compile-time variants (which would
// quadruple the kernels to build): every gradient is multiplied by
// inv_grad_scale and XORed with grad_sign.  Without them those are 1 and +0.0,
// and x * 1 is x bit for bit for every x -- -0, inf and subnormals included
// (the kernels run with subnormals kept) -- but a signalling NaN, which it
// quiets, as the multiplication that follows would anyway; x ^ +0.0 is x.
// With maximize, grad_sign is -0.0, and the XOR is exactly -g.
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
    if constexpr ((Variant & kPlainGradient) == 0) grad = xor_sign(grad * c.inv_grad_scale, c.grad_sign);
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

}  // namespace FASTADAM_LEVEL
}  // namespace fastadam
