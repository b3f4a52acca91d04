// One instruction-set level's loops: the update of a range of elements, the
// skip_if_nonfinite check and the bandwidth probe, as templates, and the
// tables of kernels that this level's translation units instantiate from
// them.  Included only by the kernel sources, each compiled once per level
// (see level.hpp); the code is the same for every level: only simd.hpp's
// register type changes.
#pragma once

#include <cstdint>
#include <cstring>
#include <utility>

#include "../kernel_api.hpp"
#include "adam_math.hpp"
#include "simd.hpp"

namespace fastadam {
namespace FASTADAM_LEVEL {

// How a block of elements is moved between memory and registers: a whole
// register, or only its first `count` lanes for the tail of a range.  The
// update itself does not know which one it got, so body and tail round alike.
// load16/store16 move float16/bfloat16 storage (float registers only).
template <class T>
struct FullBlock {
    using V = typename Simd<T>::V;
    FASTADAM_INLINE V load(const T* p) const { return load_full<T>(p); }
    FASTADAM_INLINE void store(T* p, V x) const { store_full<T>(p, x); }
    template <Storage S>
    FASTADAM_INLINE V load16(const std::uint16_t* p) const {
        if constexpr (S == Storage::float16) return load_f16(p);
        else return load_bf16(p);
    }
    template <Storage S>
    FASTADAM_INLINE void store16(std::uint16_t* p, V x) const {
        if constexpr (S == Storage::float16) store_f16(p, x);
        else store_bf16(p, x);
    }
};

template <class T>
struct PartialBlock {
    using V = typename Simd<T>::V;
    int count;
    FASTADAM_INLINE V load(const T* p) const { return Simd<T>::load_first(p, count); }
    FASTADAM_INLINE void store(T* p, V x) const { Simd<T>::store_first(p, x, count); }
    // Staged through a zeroed register's worth of 16-bit values.
    template <Storage S>
    FASTADAM_INLINE V load16(const std::uint16_t* p) const {
        std::uint16_t staged[Simd<T>::width] = {};
        std::memcpy(staged, p, sizeof(std::uint16_t) * static_cast<unsigned>(count));
        return FullBlock<T>{}.template load16<S>(staged);
    }
    template <Storage S>
    FASTADAM_INLINE void store16(std::uint16_t* p, V x) const {
        std::uint16_t staged[Simd<T>::width];
        FullBlock<T>{}.template store16<S>(staged, x);
        std::memcpy(p, staged, sizeof(std::uint16_t) * static_cast<unsigned>(count));
    }
};

template <class T>
FASTADAM_INLINE const AdamConstants<T>& constants_for(const AdamConstantsPair& pair) {
    if constexpr (sizeof(T) == sizeof(float)) {
        return pair.f32;
    } else {
        return pair.f64;
    }
}

// The tensor's buffers as typed locals: held in registers for the whole
// range rather than re-read from the AdamTensor after every store.  The
// gradient is a T or a 16-bit value (per Grad); `model` is the optional
// 16-bit copy of the params.
template <class T>
struct AdamBuffers {
    T* param;
    const void* grad;
    T* exp_avg;
    T* exp_avg_sq;
    T* max_exp_avg_sq;
    std::uint16_t* model;
};

template <class T, Storage S, class Block>
FASTADAM_INLINE typename Simd<T>::V load_grad(const void* grad, std::int64_t i, const Block& block) {
    if constexpr (S == Storage::same) return block.load(static_cast<const T*>(grad) + i);
    else return block.template load16<S>(static_cast<const std::uint16_t*>(grad) + i);
}

template <class T, unsigned Variant, Storage Grad, Storage Model, class Block>
FASTADAM_INLINE void adam_block(const AdamBuffers<T>& b, std::int64_t i, const Block& block,
                       const Coefficients<typename Simd<T>::V>& c) {
    using V = typename Simd<T>::V;
    constexpr bool amsgrad = (Variant & kAmsgrad) != 0;
    V p = block.load(b.param + i);
    V m = block.load(b.exp_avg + i);
    V v = block.load(b.exp_avg_sq + i);
    V v_max = p;  // unused unless amsgrad; any initialised value will do
    if constexpr (amsgrad) v_max = block.load(b.max_exp_avg_sq + i);

    adam_update<Variant>(p, load_grad<T, Grad>(b.grad, i, block), m, v, v_max, c, Simd<T>::sqrt);

    block.store(b.param + i, p);
    block.store(b.exp_avg + i, m);
    block.store(b.exp_avg_sq + i, v);
    if constexpr (amsgrad) block.store(b.max_exp_avg_sq + i, v_max);
    if constexpr (Model != Storage::same) block.template store16<Model>(b.model + i, p);
}

// Elements before `p + i` reaches a register-aligned address (0 when it
// cannot, for a pointer not aligned to its element).  NumPy places large
// arrays 16 bytes past a 64-byte boundary, all alike, so aligning the param
// aligns every stream and no load or store straddles two cache lines.
template <class T>
FASTADAM_INLINE std::int64_t elements_to_alignment(const T* p, std::int64_t i, std::int64_t end) {
    constexpr std::uintptr_t bytes = sizeof(typename Simd<T>::V);
    const auto address = reinterpret_cast<std::uintptr_t>(p + i);
    if (address % sizeof(T) != 0) return 0;
    const auto head = static_cast<std::int64_t>(((bytes - address % bytes) % bytes) / sizeof(T));
    return head < end - i ? head : end - i;
}

// The loop shape of every kernel and of the probes, which must share it to
// be the kernels' limits: block(i, kind) handles the elements from i on, a
// whole register of them (FullBlock) or fewer (PartialBlock).
template <class T, class Block>
FASTADAM_INLINE void for_each_block(const T* aligned_by, std::int64_t i, std::int64_t end, Block&& block) {
    constexpr int width = Simd<T>::width;
    // A masked head first, so that the full registers below are aligned.
    if (const std::int64_t head = elements_to_alignment(aligned_by, i, end); head > 0) {
        block(i, PartialBlock<T>{static_cast<int>(head)});
        i += head;
    }
    // Two registers per iteration give the divider two independent chains.
    for (; i + 2 * width <= end; i += 2 * width) {
        block(i, FullBlock<T>{});
        block(i + width, FullBlock<T>{});
    }
    for (; i + width <= end; i += width) block(i, FullBlock<T>{});
    if (i < end) block(i, PartialBlock<T>{static_cast<int>(end - i)});
}

// Not inlined: the dense range and every row of a gather share one copy
// (a call per row costs next to nothing; a second copy doubles the build).
template <class T, unsigned Variant, Storage Grad, Storage Model>
FASTADAM_NOINLINE void adam_loop(const AdamBuffers<T>& buffers, std::int64_t i, std::int64_t end,
                                 const Coefficients<typename Simd<T>::V>& coefficients) {
    // Local copies, which no store through the buffers can alias: the
    // pointers stay in registers and the constants are not re-read after
    // every store.
    const AdamBuffers<T> b = buffers;
    const Coefficients<typename Simd<T>::V> c = coefficients;
    for_each_block(b.param, i, end, [&](std::int64_t j, const auto& kind) FASTADAM_LAMBDA_INLINE {
        adam_block<T, Variant, Grad, Model>(b, j, kind, c);
    });
}

template <class T>
FASTADAM_INLINE AdamBuffers<T> buffers_at(const AdamTensor& t, std::int64_t offset, const void* grad) {
    auto at = [offset](void* p) { return p == nullptr ? nullptr : static_cast<T*>(p) + offset; };
    auto* model = t.model == nullptr ? nullptr : static_cast<std::uint16_t*>(t.model) + offset;
    return {at(t.param), grad, at(t.exp_avg), at(t.exp_avg_sq), at(t.max_exp_avg_sq), model};
}

// Rows this far ahead are prefetched: table rows are scattered, so the
// hardware prefetcher cannot guess them, and each one would otherwise wait
// for its own memory round trip.
constexpr std::int64_t kPrefetchRows = 8;

template <class T>
FASTADAM_INLINE void prefetch_row(const AdamTensor& t, std::int64_t row) {
    const std::int64_t offset = row * t.row_size;
    const std::int64_t bytes = t.row_size * static_cast<std::int64_t>(sizeof(T));
    void* const tables[] = {t.param, t.exp_avg, t.exp_avg_sq, t.max_exp_avg_sq};
    for (void* base : tables) {
        if (base == nullptr) continue;
        const char* p = reinterpret_cast<const char*>(static_cast<T*>(base) + offset);
        for (std::int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b, 1, 3);
    }
}

template <class T, unsigned Variant, Storage Grad, Storage Model>
void adam_range_typed(const AdamTensor& t, std::int64_t begin, std::int64_t end) {
    const auto c = broadcast_coefficients(constants_for<T>(*t.constants), Simd<T>::broadcast);
    if (t.rows == nullptr) {
        adam_loop<T, Variant, Grad, Model>(buffers_at<T>(t, 0, t.grad), begin, end, c);
        return;
    }
    // A row gather: walk the rows that [begin, end) covers.
    std::int64_t k = begin / t.row_size;
    std::int64_t column = begin % t.row_size;
    const std::int64_t row_count = t.size / t.row_size;
    for (std::int64_t e = begin; e < end; ++k, column = 0) {
        if (k + kPrefetchRows < row_count) prefetch_row<T>(t, t.rows[k + kPrefetchRows]);
        const std::int64_t rest = t.row_size - column;  // (no std::min: see level.hpp)
        const std::int64_t stop = column + (rest < end - e ? rest : end - e);
        const AdamBuffers<T> row = buffers_at<T>(t, t.rows[k] * t.row_size, t.grad_rows[k]);
        adam_loop<T, Variant, Grad, Model>(row, column, stop, c);
        e += stop - column;
    }
}

using AdamRangeFn = void (*)(const AdamTensor&, std::int64_t, std::int64_t);

// One kernel per option combination (AdamTensor::variant); null for the
// unused kL2WeightDecay | kDecoupledDecay.  A plain array rather than
// std::array: see level.hpp.
struct VariantTable {
    AdamRangeFn fn[kVariantCount];
};

template <class T, Storage Grad, Storage Model, unsigned Variant>
constexpr AdamRangeFn kernel_for() {
    if constexpr ((Variant & kL2WeightDecay) != 0 && (Variant & kDecoupledDecay) != 0) return nullptr;
    else return &adam_range_typed<T, Variant, Grad, Model>;
}

template <class T, Storage Grad, Storage Model, std::size_t... Variant>
constexpr VariantTable make_variant_table(std::index_sequence<Variant...>) {
    return VariantTable{{kernel_for<T, Grad, Model, Variant>()...}};
}

// The kernels of one (dtype, gradient storage, model storage) family.
template <class T, Storage Grad, Storage Model>
constexpr VariantTable variants() {
    return make_variant_table<T, Grad, Model>(std::make_index_sequence<kVariantCount>{});
}

constexpr Storage kSame = Storage::same, kHalf = Storage::float16, kBf16 = Storage::bfloat16;

// The families, indexed by model storage, each defined in its own
// translation unit so that the level's kernels compile in parallel.
extern const VariantTable kFloat32Kernels[3];      // float32 gradients    (adam_float32.cpp)
extern const VariantTable kFloat16GradKernels[3];  // float16 gradients    (adam_float16_grads.cpp)
extern const VariantTable kBfloat16GradKernels[3]; // bfloat16 gradients   (adam_bfloat16_grads.cpp)
extern const VariantTable kFloat64Kernels;         //                      (adam_kernels.cpp)

// skip_if_nonfinite's check: is any g * inv_grad_scale NaN or infinite?
template <class T, Storage Grad>
bool nonfinite_range_typed(const AdamTensor& t, std::int64_t begin, std::int64_t end) {
    using V = typename Simd<T>::V;
    constexpr int width = Simd<T>::width;
    const V scale = Simd<T>::broadcast(constants_for<T>(*t.constants).inv_grad_scale);
    const V zero = Simd<T>::broadcast(T(0));
    auto found = zero != zero;  // all lanes false
    auto check = [&](V g) {
        const V d = g * scale - g * scale;  // 0 when finite, NaN for NaN and inf
        found = found | (d != d);
    };
    auto check_span = [&](const void* grad, std::int64_t i, std::int64_t stop) {
        for (; i + width <= stop; i += width) check(load_grad<T, Grad>(grad, i, FullBlock<T>{}));
        if (i < stop) check(load_grad<T, Grad>(grad, i, PartialBlock<T>{static_cast<int>(stop - i)}));
    };
    if (t.rows == nullptr) {
        check_span(t.grad, begin, end);
    } else {
        for (std::int64_t e = begin; e < end;) {  // a row gather: each row's gradient is its own buffer
            const std::int64_t k = e / t.row_size, column = e % t.row_size;
            const std::int64_t stop = column + (t.row_size - column < end - e ? t.row_size - column : end - e);
            check_span(t.grad_rows[k], column, stop);
            e += stop - column;
        }
    }
    for (int lane = 0; lane < width; ++lane)
        if (found[lane]) return true;
    return false;
}

// The speed limits.  The probe has the Adam step's memory traffic (read a, b,
// c, d; write a, c, d) with one multiply-add per array instead of the update
// formula.  The exact probe has the same traffic and, like the step, exactly
// one correctly rounded division and one square root per element -- the work
// the bitwise contract allows no approximation of -- with as little else as
// keeps them: c = c * h + b, d = d * h + b * b, a = a - c / (sqrt(d) + k).
// The mixed-precision pattern reads b as bfloat16 and also writes e.
template <class V>
struct ProbeCoefficients {
    V h, k;
};

template <class T, bool Bf16, bool Exact, class Block>
FASTADAM_INLINE void probe_block(const ProbeTensor& t, std::int64_t i, const Block& block,
                                 const ProbeCoefficients<typename Simd<T>::V>& k) {
    T* a = static_cast<T*>(t.a) + i;
    T* c = static_cast<T*>(t.c) + i;
    T* d = static_cast<T*>(t.d) + i;
    const auto bv = load_grad<T, Bf16 ? kBf16 : kSame>(t.b, i, block);
    typename Simd<T>::V av;
    if constexpr (Exact) {
        const auto cv = block.load(c) * k.h + bv;
        const auto dv = block.load(d) * k.h + bv * bv;
        av = block.load(a) - cv / (Simd<T>::sqrt(dv) + k.k);
        block.store(c, cv);
        block.store(d, dv);
    } else {
        av = block.load(a) * k.h + bv;
        block.store(c, block.load(c) * k.h + bv);
        block.store(d, block.load(d) * k.h + bv);
    }
    block.store(a, av);
    if constexpr (Bf16) {
        if (t.e != nullptr) block.template store16<kBf16>(static_cast<std::uint16_t*>(t.e) + i, av);
    }
}

template <class T, bool Bf16, bool Exact>
void probe_range_typed(const ProbeTensor& t, std::int64_t begin, std::int64_t end) {
    const ProbeCoefficients<typename Simd<T>::V> k{Simd<T>::broadcast(T(0.5)), Simd<T>::broadcast(T(1e-8))};
    const auto block = [&](std::int64_t i, const auto& kind) FASTADAM_LAMBDA_INLINE {
        probe_block<T, Bf16, Exact>(t, i, kind, k);
    };
    for_each_block(static_cast<const T*>(t.a), begin, end, block);
}

}  // namespace FASTADAM_LEVEL
}  // namespace fastadam
