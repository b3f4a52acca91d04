// One instruction-set level of the Adam kernel.
//
// CMake compiles this file once per level (baseline, avx2, avx512), each time
// with that level's -m flags and FASTADAM_ISA_NAME / FASTADAM_ISA_LEVEL set,
// and links all of them into the extension; csrc/dispatch.cpp picks one table
// at import.  The code below is the same for every level: only simd.hpp's
// register type changes.
#include <cstdint>
#include <utility>

#include "../kernel_api.hpp"
#include "adam_math.hpp"
#include "simd.hpp"

#if !defined(FASTADAM_ISA_NAME) || !defined(FASTADAM_ISA_LEVEL)
#error "FASTADAM_ISA_NAME and FASTADAM_ISA_LEVEL must be set by the build"
#endif
// The flags and the level must agree, or the dispatcher would run code the
// CPU was not checked for.
#if FASTADAM_ISA_LEVEL == 2 && !defined(__AVX512F__)
#error "the avx512 level must be compiled with AVX-512 enabled"
#elif FASTADAM_ISA_LEVEL == 1 && (!defined(__AVX2__) || defined(__AVX512F__))
#error "the avx2 level must be compiled with AVX2 and without AVX-512"
#elif FASTADAM_ISA_LEVEL == 0 && defined(__AVX__)
#error "the baseline level must be compiled without AVX"
#endif

#define FASTADAM_CONCAT_(a, b) a##b
#define FASTADAM_CONCAT(a, b) FASTADAM_CONCAT_(a, b)
#define FASTADAM_STRINGIFY_(a) #a
#define FASTADAM_STRINGIFY(a) FASTADAM_STRINGIFY_(a)

namespace fastadam {
namespace {

// How a block of elements is moved between memory and registers: a whole
// register, or only its first `count` lanes for the tail of a range.  The
// update itself does not know which one it got, so body and tail round alike.
template <class T>
struct FullBlock {
    using V = typename Simd<T>::V;
    V load(const T* p) const { return load_full<T>(p); }
    void store(T* p, V x) const { store_full<T>(p, x); }
};

template <class T>
struct PartialBlock {
    using V = typename Simd<T>::V;
    int count;
    V load(const T* p) const { return Simd<T>::load_first(p, count); }
    void store(T* p, V x) const { Simd<T>::store_first(p, x, count); }
};

template <class T>
const AdamConstants<T>& constants_for(const AdamConstantsPair& pair) {
    if constexpr (sizeof(T) == sizeof(float)) {
        return pair.f32;
    } else {
        return pair.f64;
    }
}

// The tensor's buffers as typed locals: held in registers for the whole
// range rather than re-read from the AdamTensor after every store.
template <class T>
struct AdamBuffers {
    T* param;
    const T* grad;
    T* exp_avg;
    T* exp_avg_sq;
    T* max_exp_avg_sq;
};

template <class T, unsigned Variant, class Block>
inline void adam_block(const AdamBuffers<T>& b, std::int64_t i, const Block& block,
                       const Coefficients<typename Simd<T>::V>& c) {
    using V = typename Simd<T>::V;
    constexpr bool amsgrad = (Variant & kAmsgrad) != 0;
    V p = block.load(b.param + i);
    V m = block.load(b.exp_avg + i);
    V v = block.load(b.exp_avg_sq + i);
    V v_max = p;  // unused unless amsgrad; any initialised value will do
    if constexpr (amsgrad) v_max = block.load(b.max_exp_avg_sq + i);

    adam_update<Variant>(p, block.load(b.grad + i), m, v, v_max, c, Simd<T>::sqrt);

    block.store(b.param + i, p);
    block.store(b.exp_avg + i, m);
    block.store(b.exp_avg_sq + i, v);
    if constexpr (amsgrad) block.store(b.max_exp_avg_sq + i, v_max);
}

template <class T, unsigned Variant>
inline void adam_loop(const AdamBuffers<T>& b, std::int64_t i, std::int64_t end,
                      const Coefficients<typename Simd<T>::V>& c) {
    constexpr int width = Simd<T>::width;
    // Two registers per iteration give the divider two independent chains.
    for (; i + 2 * width <= end; i += 2 * width) {
        adam_block<T, Variant>(b, i, FullBlock<T>{}, c);
        adam_block<T, Variant>(b, i + width, FullBlock<T>{}, c);
    }
    for (; i + width <= end; i += width) adam_block<T, Variant>(b, i, FullBlock<T>{}, c);
    if (i < end) adam_block<T, Variant>(b, i, PartialBlock<T>{static_cast<int>(end - i)}, c);
}

template <class T>
AdamBuffers<T> buffers_at(const AdamTensor& t, std::int64_t offset, const void* grad) {
    auto at = [offset](void* p) { return p == nullptr ? nullptr : static_cast<T*>(p) + offset; };
    return {at(t.param), static_cast<const T*>(grad), at(t.exp_avg), at(t.exp_avg_sq), at(t.max_exp_avg_sq)};
}

// Rows this far ahead are prefetched: table rows are scattered, so the
// hardware prefetcher cannot guess them, and each one would otherwise wait
// for its own memory round trip.
constexpr std::int64_t kPrefetchRows = 8;

template <class T>
inline void prefetch_row(const AdamTensor& t, std::int64_t row) {
    const std::int64_t offset = row * t.row_size;
    const std::int64_t bytes = t.row_size * static_cast<std::int64_t>(sizeof(T));
    void* const tables[] = {t.param, t.exp_avg, t.exp_avg_sq, t.max_exp_avg_sq};
    for (void* base : tables) {
        if (base == nullptr) continue;
        const char* p = reinterpret_cast<const char*>(static_cast<T*>(base) + offset);
        for (std::int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b, 1, 3);
    }
}

template <class T, unsigned Variant>
void adam_range_typed(const AdamTensor& t, std::int64_t begin, std::int64_t end) {
    const auto c = broadcast_coefficients(constants_for<T>(*t.constants), Simd<T>::broadcast);
    if (t.rows == nullptr) {
        adam_loop<T, Variant>(buffers_at<T>(t, 0, t.grad), begin, end, c);
        return;
    }
    // A row gather: walk the rows that [begin, end) covers.
    std::int64_t k = begin / t.row_size;
    std::int64_t column = begin % t.row_size;
    const std::int64_t row_count = t.size / t.row_size;
    for (std::int64_t e = begin; e < end; ++k, column = 0) {
        if (k + kPrefetchRows < row_count) prefetch_row<T>(t, t.rows[k + kPrefetchRows]);
        const std::int64_t rest = t.row_size - column;  // (no std::min: see VariantTable)
        const std::int64_t stop = column + (rest < end - e ? rest : end - e);
        const AdamBuffers<T> row = buffers_at<T>(t, t.rows[k] * t.row_size, t.grad_rows[k]);
        adam_loop<T, Variant>(row, column, stop, c);
        e += stop - column;
    }
}

using AdamRangeFn = void (*)(const AdamTensor&, std::int64_t, std::int64_t);

// A plain array rather than std::array: no std:: member function may be
// instantiated here, since its out-of-line copy could be shared with (and
// picked over) the copy of a translation unit built for another level.
struct VariantTable {
    AdamRangeFn fn[kVariantCount];
};

template <class T, std::size_t... Variant>
constexpr VariantTable make_variant_table(std::index_sequence<Variant...>) {
    return VariantTable{{&adam_range_typed<T, Variant>...}};
}

void adam_range(const AdamTensor& t, std::int64_t begin, std::int64_t end) {
    static constexpr auto float32_variants = make_variant_table<float>(std::make_index_sequence<kVariantCount>{});
    static constexpr auto float64_variants = make_variant_table<double>(std::make_index_sequence<kVariantCount>{});
    const auto& table = t.dtype == DType::float32 ? float32_variants : float64_variants;
    table.fn[t.variant](t, begin, end);
}

// The speed limit: the Adam step's memory traffic (read a, b, c, d; write a,
// c, d) with one multiply-add per array instead of the update formula.
template <class T, class Block>
inline void probe_block(const ProbeTensor& t, std::int64_t i, const Block& block, typename Simd<T>::V half) {
    T* a = static_cast<T*>(t.a) + i;
    const T* b = static_cast<const T*>(t.b) + i;
    T* c = static_cast<T*>(t.c) + i;
    T* d = static_cast<T*>(t.d) + i;
    const auto bv = block.load(b);
    block.store(a, block.load(a) * half + bv);
    block.store(c, block.load(c) * half + bv);
    block.store(d, block.load(d) * half + bv);
}

template <class T>
void probe_range_typed(const ProbeTensor& t, std::int64_t begin, std::int64_t end) {
    constexpr int width = Simd<T>::width;
    const auto half = Simd<T>::broadcast(T(0.5));
    std::int64_t i = begin;
    for (; i + width <= end; i += width) probe_block<T>(t, i, FullBlock<T>{}, half);
    if (i < end) probe_block<T>(t, i, PartialBlock<T>{static_cast<int>(end - i)}, half);
}

void probe_range(const ProbeTensor& t, std::int64_t begin, std::int64_t end) {
    if (t.dtype == DType::float32) {
        probe_range_typed<float>(t, begin, end);
    } else {
        probe_range_typed<double>(t, begin, end);
    }
}

}  // namespace

extern const KernelTable FASTADAM_CONCAT(kernel_table_, FASTADAM_ISA_NAME) = {
    FASTADAM_STRINGIFY(FASTADAM_ISA_NAME),
    &adam_range,
    &probe_range,
    static_cast<int>(sizeof(typename Simd<float>::V)),
};

}  // namespace fastadam
