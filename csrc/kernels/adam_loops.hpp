// One instruction-set level's loops: the update of a range of elements, the
// skip_if_nonfinite check and the bandwidth probe, as templates, and the
// tables of kernels that this level's translation units instantiate from
// them.  Included only by the kernel sources, each compiled once per level
// (see level.hpp); the code is the same for every level: only simd.hpp's
// register type changes.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "../kernel_api.hpp"
#include "adam_math.hpp"
#include "quantize.hpp"
#include "simd.hpp"

namespace fastadam {
namespace FASTADAM_LEVEL {

// How a block of elements is moved between memory and registers: a whole
// register (FullBlock), only its first `count` lanes (PartialBlock), half a
// register (HalfBlock, where the level has one) or one element
// (ScalarBlock); see kShortStretches for which a level uses.  The update
// itself does not know which one it got, so every element rounds alike.
// load16/store16 move float16/bfloat16 storage (float registers only).
template <class T>
struct FullBlock {
    using V = typename Simd<T>::V;
    static FASTADAM_INLINE V broadcast(T x) { return Simd<T>::broadcast(x); }
    static FASTADAM_INLINE V sqrt(V x) { return Simd<T>::sqrt(x); }
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
struct PartialBlock : FullBlock<T> {
    using V = typename Simd<T>::V;
    int count;
    explicit PartialBlock(int n) : count(n) {}
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

template <Storage S>
FASTADAM_INLINE float widen16(std::uint16_t h) {
    return S == Storage::float16 ? f16_to_float(h) : bf16_to_float(h);
}
template <Storage S>
FASTADAM_INLINE std::uint16_t narrow16(float f) {
    return S == Storage::float16 ? float_to_f16(f) : float_to_bf16(f);
}

// A few lanes (a half register, or one element as a plain T): the 16-bit
// storage is converted lane by lane with the scalar definitions of simd.hpp.
template <class T, class Lanes>
struct NarrowBlock {
    using V = typename Lanes::V;
    static constexpr int width = Lanes::width;
    static FASTADAM_INLINE V broadcast(T x) { return Lanes::broadcast(x); }
    static FASTADAM_INLINE V sqrt(V x) { return Lanes::sqrt(x); }
    FASTADAM_INLINE V load(const T* p) const {
        V x;
        std::memcpy(&x, p, sizeof x);
        return x;
    }
    FASTADAM_INLINE void store(T* p, V x) const { std::memcpy(p, &x, sizeof x); }
    template <Storage S>
    FASTADAM_INLINE V load16(const std::uint16_t* p) const {
        if constexpr (width == 1) {
            return widen16<S>(*p);
        } else {
            V x;
            for (int lane = 0; lane < width; ++lane) x[lane] = widen16<S>(p[lane]);
            return x;
        }
    }
    template <Storage S>
    FASTADAM_INLINE void store16(std::uint16_t* p, V x) const {
        if constexpr (width == 1) {
            *p = narrow16<S>(x);
        } else {
            for (int lane = 0; lane < width; ++lane) p[lane] = narrow16<S>(x[lane]);
        }
    }
};

template <class T>
struct OneLane {
    using V = T;
    static constexpr int width = 1;
    static FASTADAM_INLINE V broadcast(T x) { return x; }
    static FASTADAM_INLINE V sqrt(V x) { return __builtin_sqrt(x); }  // correctly rounded, as sqrtss/sqrtsd
};
template <>
FASTADAM_INLINE float OneLane<float>::sqrt(float x) { return __builtin_sqrtf(x); }

template <class T>
using ScalarBlock = NarrowBlock<T, OneLane<T>>;
#if defined(__AVX2__) && !defined(__AVX512F__)
template <class T>
using HalfBlock = NarrowBlock<T, HalfSimd<T>>;
#else
template <class T>
using HalfBlock = ScalarBlock<T>;  // never used: kShortStretches.half is false
#endif

// The coefficients broadcast for each kind of block.
template <class T>
struct BlockCoefficients {
    Coefficients<typename FullBlock<T>::V> full;
    Coefficients<typename HalfBlock<T>::V> half;
    Coefficients<T> one;
    template <class Block>
    FASTADAM_INLINE const Coefficients<typename Block::V>& of() const {
        // By width: std::is_same on a vector type would drop its alignment
        // attribute (GCC warns, -Wignored-attributes).
        constexpr std::size_t width = sizeof(typename Block::V);
        if constexpr (width == sizeof(T)) return one;
        else if constexpr (width == sizeof(typename FullBlock<T>::V)) return full;
        else return half;
    }
};

template <class T>
FASTADAM_INLINE BlockCoefficients<T> broadcast_for_blocks(const AdamConstants<T>& k) {
    return {broadcast_coefficients(k, FullBlock<T>::broadcast), broadcast_coefficients(k, HalfBlock<T>::broadcast),
            broadcast_coefficients(k, ScalarBlock<T>::broadcast)};
}

template <class T>
FASTADAM_INLINE const AdamConstants<T>& constants_for(const AdamConstantsPair& pair) {
    if constexpr (sizeof(T) == sizeof(float)) {
        return pair.f32;
    } else {
        return pair.f64;
    }
}

template <class T, Storage S, class Block>
FASTADAM_INLINE typename Block::V load_grad(const void* grad, std::int64_t i, const Block& block) {
    if constexpr (S == Storage::same) return block.load(static_cast<const T*>(grad) + i);
    else return block.template load16<S>(static_cast<const std::uint16_t*>(grad) + i);
}

// The streams of a stretch of elements, as typed locals in the working
// dtype: held in registers for the whole stretch rather than re-read from the
// AdamTensor after every store.  Each points at the stream in memory, or, in
// the staged loop, at a tile that holds the stream widened to T.
//
// A moment is stored as T, or (M/V = bfloat16, float32 params) as bfloat16,
// moved by the block's 16-bit load (exact) and store (to nearest-even): so
// bfloat16 moments run fused in the direct loop, at 20 bytes per element,
// with no tile pass.  The amsgrad maximum is stored as exp_avg_sq is.
template <class T, Storage S>
using MomentPointer = std::conditional_t<S == Storage::same, T*, std::uint16_t*>;

template <class T, Storage M = Storage::same, Storage V = Storage::same>
struct AdamBuffers {
    T* param;
    const T* grad;
    MomentPointer<T, M> exp_avg;
    MomentPointer<T, V> exp_avg_sq;
    MomentPointer<T, V> max_exp_avg_sq;
};

template <Storage S, class Pointer, class Block>
FASTADAM_INLINE typename Block::V load_moment(Pointer p, const Block& block) {
    if constexpr (S == Storage::same) return block.load(p);
    else return block.template load16<S>(p);
}

template <Storage S, class Pointer, class Block>
FASTADAM_INLINE void store_moment(Pointer p, typename Block::V x, const Block& block) {
    if constexpr (S == Storage::same) block.store(p, x);
    else block.template store16<S>(p, x);
}

template <class T, unsigned Variant, Storage M, Storage Vs, class Block>
FASTADAM_INLINE void adam_block(const AdamBuffers<T, M, Vs>& b, std::int64_t i, const Block& block,
                                const BlockCoefficients<T>& coefficients) {
    using V = typename Block::V;
    const Coefficients<V>& c = coefficients.template of<Block>();
    constexpr bool amsgrad = (Variant & kAmsgrad) != 0;
    V p = block.load(b.param + i);
    V m = load_moment<M>(b.exp_avg + i, block);
    V v = load_moment<Vs>(b.exp_avg_sq + i, block);
    V v_max = p;  // unused unless amsgrad; any initialised value will do
    if constexpr (amsgrad) v_max = load_moment<Vs>(b.max_exp_avg_sq + i, block);

    adam_update<Variant>(p, block.load(b.grad + i), m, v, v_max, c, Block::sqrt);

    block.store(b.param + i, p);
    store_moment<M>(b.exp_avg + i, m, block);
    store_moment<Vs>(b.exp_avg_sq + i, v, block);
    if constexpr (amsgrad) store_moment<Vs>(b.max_exp_avg_sq + i, v_max, block);
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

// f(j) for each j in [i, end), at most Most of them.  A loop bounded by
// Most, with an exit, is unrolled by the compiler; a plain `j < end` loop
// would be vectorized (with runtime alias checks) into kilobytes of code per
// kernel for the few elements a register leaves over.
template <int Most, class F>
FASTADAM_INLINE void for_each_of_few(std::int64_t i, std::int64_t end, F&& f) {
    for (int k = 0; k < Most; ++k, ++i) {
        if (i >= end) break;
        f(i);
    }
}

// The stretch [i, end), shorter than a register, as kShortStretches says.
template <class T, class Block>
FASTADAM_INLINE void for_each_short_block(std::int64_t i, std::int64_t end, Block& block) {
    if constexpr (kShortStretches.masked) {
        if (i < end) block(i, PartialBlock<T>{static_cast<int>(end - i)});
    } else {
        if constexpr (kShortStretches.half) {
            if (end - i >= HalfBlock<T>::width) {
                block(i, HalfBlock<T>{});
                i += HalfBlock<T>::width;
            }
        }
        constexpr int most = (kShortStretches.half ? HalfBlock<T>::width : Simd<T>::width) - 1;
        for_each_of_few<most>(i, end, [&](std::int64_t j) FASTADAM_LAMBDA_INLINE { block(j, ScalarBlock<T>{}); });
    }
}

// The loop shape of every kernel and of the probes, which must share it to
// be the kernels' limits: block(i, kind) handles the elements from i on, as
// many as the kind of block holds.  With `aligned_by`, a range of at least
// kShortStretches.align_from registers first goes up to the address where
// aligned_by + i is register-aligned.
template <class T, class Block>
FASTADAM_INLINE void for_each_block(const T* aligned_by, std::int64_t i, std::int64_t end, Block&& block) {
    constexpr int width = Simd<T>::width;
    if (aligned_by != nullptr && end - i >= std::int64_t{kShortStretches.align_from} * width) {
        const std::int64_t head = elements_to_alignment(aligned_by, i, end);
        for_each_short_block<T>(i, i + head, block);
        i += head;
    }
    // Two registers per iteration give the divider two independent chains.
    for (; i + 2 * width <= end; i += 2 * width) {
        block(i, FullBlock<T>{});
        block(i + width, FullBlock<T>{});
    }
    for (; i + width <= end; i += width) block(i, FullBlock<T>{});
    for_each_short_block<T>(i, end, block);
}

// The update of elements [begin, end) of the buffers: the one loop every
// kernel runs, over memory (direct) or over tiles (staged).  Not inlined, so
// that its body is compiled once per (dtype, variant) for both callers.  The
// buffers and the coefficients are copied into locals that no store through
// the buffers can alias: they stay in registers (or, for constants that do
// not fit, on the stack) instead of being re-read after every store.
template <class T, unsigned Variant, Storage M = Storage::same, Storage V = Storage::same>
__attribute__((noinline)) void update_span(const AdamBuffers<T, M, V>& buffers, std::int64_t begin,
                                           std::int64_t end, const T* aligned_by,
                                           const BlockCoefficients<T>& coefficients) {
    const AdamBuffers<T, M, V> b = buffers;
    const BlockCoefficients<T> c = coefficients;
    for_each_block(aligned_by, begin, end, [&](std::int64_t j, const auto& kind) FASTADAM_LAMBDA_INLINE {
        adam_block<T, Variant>(b, j, kind, c);
    });
}

// The bytes of n elements of a stream stored as `storage`, working dtype T.
template <class T>
FASTADAM_INLINE std::int64_t stream_bytes(Storage storage, std::int64_t n) {
    switch (storage) {
        case Storage::same: return n * std::int64_t{sizeof(T)};
        case Storage::block8: return n;
        case Storage::block4: return n / 2;  // n is even: blocks and rows start on even elements
        default: return n * 2;
    }
}

template <class T>
FASTADAM_INLINE void* advance(void* p, Storage storage, std::int64_t n) {
    return p == nullptr ? nullptr : static_cast<char*>(p) + stream_bytes<T>(storage, n);
}
template <class T>
FASTADAM_INLINE const void* advance(const void* p, Storage storage, std::int64_t n) {
    return static_cast<const char*>(p) + stream_bytes<T>(storage, n);
}

// The staged loop's unit: a tile of this many elements per stream, on the
// stack (a few KiB: it stays in L1).
constexpr std::int64_t kTile = 512;

// n 16-bit values as T (exact: every float16 and bfloat16 is a float).
template <Storage S>
FASTADAM_INLINE void widen_span(const std::uint16_t* from, float* to, std::int64_t n) {
    constexpr int width = Simd<float>::width;
    std::int64_t i = 0;
    for (; i + width <= n; i += width) store_full<float>(to + i, FullBlock<float>{}.template load16<S>(from + i));
    for_each_of_few<width - 1>(i, n, [&](std::int64_t j) FASTADAM_LAMBDA_INLINE { to[j] = widen16<S>(from[j]); });
}

// n values rounded to nearest-even into 16 bits (the vector and the scalar
// conversions of simd.hpp round alike).
template <Storage S>
FASTADAM_INLINE void narrow_span(const float* from, std::uint16_t* to, std::int64_t n) {
    constexpr int width = Simd<float>::width;
    std::int64_t i = 0;
    for (; i + width <= n; i += width) FullBlock<float>{}.template store16<S>(to + i, load_full<float>(from + i));
    for_each_of_few<width - 1>(i, n, [&](std::int64_t j) FASTADAM_LAMBDA_INLINE { to[j] = narrow16<S>(from[j]); });
}

// Stochastic rounding's random bits: lowbias32 (a 32-bit integer hash by
// C. Wellons) applied twice, to the element index's low word and key, then
// its high word and key.  U is a 32-bit unsigned integer or a register of
// them; integer arithmetic, so every lane and the scalar tail agree.
template <class U>
FASTADAM_INLINE U lowbias32(U x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

// float bits u to bfloat16 bits, rounded up when the 16 bits dropped plus the
// 16 random bits r carry: with probability (dropped bits) / 2^16.  NaN stays
// a quiet NaN; inf stays inf (its dropped bits are 0).
template <class U>
FASTADAM_INLINE U bf16_bits_stochastic(U u, U low, U high, const StochasticRounding& k) {
    const U r = lowbias32(lowbias32(low ^ k.key_low) ^ high ^ k.key_high) & 0xFFFFu;
    const U rounded = (u + r) >> 16;
    const U quiet_nan = (u >> 16) | 0x40u;
    return (u & 0x7FFFFFFFu) > 0x7F800000u ? quiet_nan : rounded;
}

// n floats rounded stochastically into bfloat16; `index` is the element
// index (in the parameter) of from[0].
FASTADAM_INLINE void narrow_bf16_stochastic(const float* from, std::uint16_t* to, std::int64_t n, std::uint64_t index,
                                            const StochasticRounding& k) {
    constexpr int width = Simd<float>::width;
    typedef std::uint32_t U __attribute__((vector_size(sizeof(typename Simd<float>::V))));
    typedef std::int32_t Mask __attribute__((vector_size(sizeof(typename Simd<float>::V))));
    U lane;
    for (int l = 0; l < width; ++l) lane[l] = static_cast<std::uint32_t>(l);
    std::int64_t i = 0;
    for (; i + width <= n; i += width) {
        const std::uint64_t first = index + static_cast<std::uint64_t>(i);
        const U low = lane + static_cast<std::uint32_t>(first);
        // A lane whose low word wrapped past 2^32 carries into the high word.
        const Mask wrapped = low < lane;
        const U high = (lane - lane + static_cast<std::uint32_t>(first >> 32)) - reinterpret_cast<const U&>(wrapped);
        U u;
        std::memcpy(&u, from + i, sizeof u);
        const U b = bf16_bits_stochastic(u, low, high, k);
        for (int l = 0; l < width; ++l) to[i + l] = static_cast<std::uint16_t>(b[l]);
    }
    for_each_of_few<width - 1>(i, n, [&](std::int64_t j) FASTADAM_LAMBDA_INLINE {
        const std::uint64_t e = index + static_cast<std::uint64_t>(j);
        std::uint32_t u;
        std::memcpy(&u, from + j, sizeof u);
        to[j] = static_cast<std::uint16_t>(bf16_bits_stochastic<std::uint32_t>(
            u, static_cast<std::uint32_t>(e), static_cast<std::uint32_t>(e >> 32), k));
    });
}

// A stream's n elements at `data` as float: the memory itself when stored as
// float, else `tile` holding them widened.
FASTADAM_INLINE const float* widened(const void* data, Storage storage, float* tile, std::int64_t n) {
    switch (storage) {
        case Storage::float16: widen_span<Storage::float16>(static_cast<const std::uint16_t*>(data), tile, n); return tile;
        case Storage::bfloat16: widen_span<Storage::bfloat16>(static_cast<const std::uint16_t*>(data), tile, n); return tile;
        default: return static_cast<const float*>(data);
    }
}

FASTADAM_INLINE void narrow_into(const float* from, void* data, Storage storage, std::int64_t n) {
    auto* to = static_cast<std::uint16_t*>(data);
    if (storage == Storage::float16) narrow_span<Storage::float16>(from, to, n);
    else if (storage == Storage::bfloat16) narrow_span<Storage::bfloat16>(from, to, n);
}

// A moment's tile back into its storage: bfloat16 stochastically when asked.
FASTADAM_INLINE void narrow_moment(const float* from, void* data, Storage storage, std::int64_t n,
                                   std::uint64_t index, const StochasticRounding& rounding) {
    if (rounding.on && storage == Storage::bfloat16)
        narrow_bf16_stochastic(from, static_cast<std::uint16_t*>(data), n, index + rounding.first_element, rounding);
    else
        narrow_into(from, data, storage, n);
}

// The streams of one stretch (the tensor, or one row of a gather) at its
// element 0.
struct StretchStreams {
    void* param;
    const void* grad;
    void* exp_avg;
    void* exp_avg_sq;
    void* max_exp_avg_sq;
    void* model;
};

template <class T>
FASTADAM_INLINE StretchStreams stretch_at(const AdamTensor& t, std::int64_t offset, const void* grad) {
    return {advance<T>(t.param.data, t.param.storage, offset),
            grad,
            advance<T>(t.exp_avg.data, t.exp_avg.storage, offset),
            advance<T>(t.exp_avg_sq.data, t.exp_avg_sq.storage, offset),
            advance<T>(t.max_exp_avg_sq.data, t.max_exp_avg_sq.storage, offset),
            advance<T>(t.model.data, t.model.storage, offset)};
}

// A moment's n elements at `at` (element `index` of the param) as float:
// the memory itself when stored as float, else `tile` holding them widened.
FASTADAM_INLINE float* moment_in(const Stream& stream, void* at, std::int64_t index, float* tile, std::int64_t n) {
    if (stream.storage == Storage::block8) {
        dequantize_block(*stream.codebook, static_cast<const std::uint8_t*>(at), stream.absmax[index / kQuantBlock],
                         tile, n);
        return tile;
    }
    if (stream.storage == Storage::block4) {  // a tile is one or two 4-bit blocks
        for (std::int64_t s = 0; s < n; s += kQuantBlock4)
            dequantize_block4(*stream.codebook, static_cast<const std::uint8_t*>(at) + s / 2,
                              stream.absmax[(index + s) / kQuantBlock4], tile + s,
                              n - s < kQuantBlock4 ? n - s : kQuantBlock4);
        return tile;
    }
    return const_cast<float*>(widened(at, stream.storage, tile, n));
}

// A moment's tile back into its storage (nothing to do for float).
FASTADAM_INLINE void moment_out(const Stream& stream, const float* tile, void* at, std::int64_t index,
                                std::int64_t n, const StochasticRounding& rounding) {
    if (stream.storage == Storage::block8)
        stream.absmax[index / kQuantBlock] =
            quantize_block(*stream.codebook, tile, static_cast<std::uint8_t*>(at), n);
    else if (stream.storage == Storage::block4)
        for (std::int64_t s = 0; s < n; s += kQuantBlock4)
            stream.absmax[(index + s) / kQuantBlock4] =
                quantize_block4(*stream.codebook, tile + s, static_cast<std::uint8_t*>(at) + s / 2,
                                n - s < kQuantBlock4 ? n - s : kQuantBlock4);
    else
        narrow_moment(tile, at, stream.storage, n, static_cast<std::uint64_t>(index), rounding);
}

// The update runs on memory: a gradient in the working dtype, no model copy,
// and moments in it or bfloat16 rounded to nearest-even (the staged loop
// takes the rest: 16-bit gradients, the model copy, stochastic rounding,
// 8-bit state).
FASTADAM_INLINE bool is_direct(const AdamTensor& t) {
    // Both moments in the working dtype, or both in bfloat16: a pair of one of each goes staged, so that
    // the update loop is compiled for two storages, not four (the extension's size).
    const bool same = t.exp_avg.storage == Storage::same && t.exp_avg_sq.storage == Storage::same;
    const bool bf16 = t.exp_avg.storage == Storage::bfloat16 && t.exp_avg_sq.storage == Storage::bfloat16 &&
                      !t.rounding.on;
    return t.grad.storage == Storage::same && (same || bf16) && t.model.data == nullptr;
}

// The direct loop over one stretch, for the moments' storages.
template <class T, unsigned Variant, Storage M, Storage V>
FASTADAM_INLINE void direct_stretch(const StretchStreams& s, std::int64_t begin, std::int64_t end,
                                    const BlockCoefficients<T>& c) {
    const AdamBuffers<T, M, V> b{static_cast<T*>(s.param), static_cast<const T*>(s.grad),
                                 static_cast<MomentPointer<T, M>>(s.exp_avg),
                                 static_cast<MomentPointer<T, V>>(s.exp_avg_sq),
                                 static_cast<MomentPointer<T, V>>(s.max_exp_avg_sq)};
    update_span<T, Variant, M, V>(b, begin, end, b.param, c);
}

// The staged loop (float32 params): tile by tile, each stream not stored as
// float (a 16-bit gradient; bfloat16 or 8-bit moments) is widened into a
// tile, the same update_span runs on the tiles and the float streams in
// memory, and the tiles of the streams it wrote are narrowed back (the
// param, also into the model copy).  Widening is exact (8-bit: map[code] *
// absmax, one rounding) and narrowing is per element (8-bit: per block), so
// the bits are those of one fused pass.  With 8-bit moments a tile is one
// quantization block (the stretch starts on a block: launch.cpp, plan.cpp);
// otherwise, after a short first tile, every tile starts where the param is
// register-aligned, so that neither the tiles nor the streams in memory are
// read or written across cache lines.  `origin` is the element index (in
// the parameter) of the stretch's element 0.
template <unsigned Variant>
void staged_stretch(const AdamTensor& t, const StretchStreams& s, std::int64_t origin, std::int64_t begin,
                    std::int64_t end, const BlockCoefficients<float>& c) {
    // exp_avg's random bits are another stream than exp_avg_sq's; the maximum
    // shares exp_avg_sq's, so that it never rounds below exp_avg_sq.
    StochasticRounding first_moment = t.rounding;
    first_moment.key_low ^= 0x9e3779b9u;
    constexpr bool amsgrad = (Variant & kAmsgrad) != 0;
    alignas(64) float grad_tile[kTile], exp_avg_tile[kTile], exp_avg_sq_tile[kTile], max_tile[kTile];
    const bool blocks = is_quantized(t.exp_avg.storage) || is_quantized(t.exp_avg_sq.storage);
    const std::int64_t head = blocks ? 0 : elements_to_alignment(static_cast<const float*>(s.param), begin, end);
    for (std::int64_t i = begin; i < end;) {
        const std::int64_t tile = blocks ? kQuantBlock - (origin + i) % kQuantBlock : i == begin && head > 0 ? head : kTile;
        const std::int64_t n = tile < end - i ? tile : end - i;
        const std::int64_t index = origin + i;
        float* const param = static_cast<float*>(s.param) + i;
        const float* const grad = widened(advance<float>(s.grad, t.grad.storage, i), t.grad.storage, grad_tile, n);
        void* const exp_avg_at = advance<float>(s.exp_avg, t.exp_avg.storage, i);
        void* const exp_avg_sq_at = advance<float>(s.exp_avg_sq, t.exp_avg_sq.storage, i);
        void* const max_at = amsgrad ? advance<float>(s.max_exp_avg_sq, t.max_exp_avg_sq.storage, i) : nullptr;
        float* const exp_avg = moment_in(t.exp_avg, exp_avg_at, index, exp_avg_tile, n);
        float* const exp_avg_sq = moment_in(t.exp_avg_sq, exp_avg_sq_at, index, exp_avg_sq_tile, n);
        float* const max_exp_avg_sq = amsgrad ? moment_in(t.max_exp_avg_sq, max_at, index, max_tile, n) : nullptr;
        update_span<float, Variant>(AdamBuffers<float>{param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq}, 0, n,
                                    param, c);
        moment_out(t.exp_avg, exp_avg, exp_avg_at, index, n, first_moment);
        moment_out(t.exp_avg_sq, exp_avg_sq, exp_avg_sq_at, index, n, t.rounding);
        if constexpr (amsgrad) moment_out(t.max_exp_avg_sq, max_exp_avg_sq, max_at, index, n, t.rounding);
        if (s.model != nullptr) narrow_into(param, advance<float>(s.model, t.model.storage, i), t.model.storage, n);
        i += n;
    }
}

// Rows this far ahead are prefetched: table rows are scattered, so the
// hardware prefetcher cannot guess them, and each one would otherwise wait
// for its own memory round trip.  Measured on a 1e6 x 64 float32 table with
// 1% of its rows stepped (benchmarks/bench_sparse_mixed.py, Zen 3, AVX2):
// 4 rows ahead took 1.1-1.6 ms, 2 took 3.0, 6 took 2.8, 8 took 2.1, 16 took
// 2.2.  A 64-float row is 12 cache lines across its three tables, so more
// rows in flight than this only overflow the core's outstanding-miss slots.
constexpr std::int64_t kPrefetchRows = 4;

template <class T>
FASTADAM_INLINE void prefetch_row(const AdamTensor& t, std::int64_t row) {
    const std::int64_t offset = row * t.row_size;
    const Stream* const streams[] = {&t.param, &t.exp_avg, &t.exp_avg_sq, &t.max_exp_avg_sq};
    for (const Stream* stream : streams) {
        if (stream->data == nullptr) continue;
        const char* p = static_cast<const char*>(advance<T>(stream->data, stream->storage, offset));
        const std::int64_t bytes = stream_bytes<T>(stream->storage, t.row_size);
        for (std::int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b, 1, 3);
    }
}

// A dense range is one stretch; a row gather is a stretch per row, walked in
// the same loop.  Each stretch runs direct or staged.
template <class T, unsigned Variant>
void adam_range_typed(const AdamTensor& t, std::int64_t begin, std::int64_t end) {
    if (begin >= end) return;
    const AdamConstants<T>& constants = constants_for<T>(*t.constants);
    const BlockCoefficients<T> c = broadcast_for_blocks(constants);
    // The common float32 cases get the loop without the gradient's scale and sign (kPlainGradient); not
    // amsgrad, so that the extension stays small (each such loop is ~7 KB per level).  With bfloat16
    // moments that loop is the only direct one (amsgrad aside): loss scaling or maximize with them goes
    // staged, a rare case that does not pay for a loop of its own.
    constexpr bool has_plain_loop = sizeof(T) == sizeof(float) && (Variant & kAmsgrad) == 0;
    constexpr unsigned plain_variant = Variant | (has_plain_loop ? kPlainGradient : 0);
    const bool plain = has_plain_loop && constants.inv_grad_scale == T(1) && constants.grad_sign == T(0) &&
                       !__builtin_signbit(constants.grad_sign);
    const bool bf16_moments = t.exp_avg.storage == Storage::bfloat16;
    const bool direct = is_direct(t) && !(bf16_moments && has_plain_loop && !plain);
    const bool gather = t.rows != nullptr;
    const std::int64_t row_size = gather ? t.row_size : end;
    const std::int64_t row_count = gather ? t.size / t.row_size : 1;
    std::int64_t k = begin / row_size;
    std::int64_t column = begin % row_size;
    for (std::int64_t e = begin; e < end; ++k, column = 0) {
        if (gather && k + kPrefetchRows < row_count) prefetch_row<T>(t, t.rows[k + kPrefetchRows]);
        const std::int64_t rest = row_size - column;  // (no std::min: see level.hpp)
        const std::int64_t stop = column + (rest < end - e ? rest : end - e);
        const std::int64_t origin = gather ? t.rows[k] * row_size : 0;
        const StretchStreams s = stretch_at<T>(t, origin, gather ? t.grad_rows[k] : t.grad.data);
        if (direct) {
            constexpr Storage same = Storage::same, bf16 = Storage::bfloat16;
            if constexpr (sizeof(T) == sizeof(float)) {
                if (bf16_moments) direct_stretch<T, plain_variant, bf16, bf16>(s, column, stop, c);
                else if (plain) direct_stretch<T, plain_variant, same, same>(s, column, stop, c);
                else direct_stretch<T, Variant, same, same>(s, column, stop, c);
            } else {
                direct_stretch<T, Variant, same, same>(s, column, stop, c);
            }
        } else if constexpr (sizeof(T) == sizeof(float)) {
            staged_stretch<Variant>(t, s, origin, column, stop, c);
        }
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

template <class T, unsigned Variant>
constexpr AdamRangeFn kernel_for() {
    if constexpr ((Variant & kL2WeightDecay) != 0 && (Variant & kDecoupledDecay) != 0) return nullptr;
    else return &adam_range_typed<T, Variant>;
}

template <class T, std::size_t... Variant>
constexpr VariantTable make_variant_table(std::index_sequence<Variant...>) {
    return VariantTable{{kernel_for<T, Variant>()...}};
}

// The kernels of one working dtype, every storage of every stream included.
template <class T>
constexpr VariantTable variants() {
    return make_variant_table<T>(std::make_index_sequence<kVariantCount>{});
}

constexpr Storage kSame = Storage::same, kHalf = Storage::float16, kBf16 = Storage::bfloat16;

// Each in its own translation unit, so that a level's kernels compile in parallel.
extern const VariantTable kFloat32Kernels;  // (adam_float32.cpp)
extern const VariantTable kFloat64Kernels;  // (adam_kernels.cpp)

// skip_if_nonfinite's check: is any g * inv_grad_scale NaN or infinite?
template <class T, Storage Grad>
bool nonfinite_range_typed(const AdamTensor& t, std::int64_t begin, std::int64_t end) {
    using V = typename Simd<T>::V;
    constexpr int width = Simd<T>::width;
    const T scale = constants_for<T>(*t.constants).inv_grad_scale;
    const V zero = Simd<T>::broadcast(T(0));
    auto found = zero != zero;  // all lanes false
    bool found_short = false;
    auto check_span = [&](const void* grad, std::int64_t i, std::int64_t stop) {
        const auto check = [&](std::int64_t j, const auto& kind) FASTADAM_LAMBDA_INLINE {
            using Block = std::decay_t<decltype(kind)>;
            const auto g = load_grad<T, Grad>(grad, j, kind) * Block::broadcast(scale);
            const auto d = g - g;  // 0 when finite, NaN for NaN and inf
            if constexpr (std::is_same_v<typename Block::V, V>) {
                found = found | (d != d);
            } else if constexpr (Block::width == 1) {
                found_short = found_short || d != d;
            } else {
                const auto bad = d != d;
                for (int lane = 0; lane < Block::width; ++lane) found_short = found_short || bad[lane] != 0;
            }
        };
        for_each_block(static_cast<const T*>(nullptr), i, stop, check);
    };
    if (t.rows == nullptr) {
        check_span(t.grad.data, begin, end);
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
    return found_short;
}

// The speed limits.  The probe has the Adam step's memory traffic (read a, b,
// c, d; write a, c, d) with one multiply-add per array instead of the update
// formula: a = a * h + b, c = c * h + b, d = d * h + b * b (d stays a second
// moment, never negative, so that the benchmarks' steps on the same buffers
// never take the square root of a negative number and run on NaNs, whose
// bfloat16 rounding takes another path).  The exact probe has the same
// traffic and, like the step, exactly one correctly rounded division and one
// square root per element -- the work the bitwise contract allows no
// approximation of -- with as little else as keeps them: c = c * h + b,
// d = d * h + b * b, a = a - c / (sqrt(d) + k).
// Each of b, c and d may be stored as bfloat16 beside a float32 a (B, C, D):
// b is the mixed-precision step's gradient, which also writes e (a's new
// value in bfloat16); c and d are the bfloat16 moments.  A bfloat16 c or d is
// widened exactly, computed in float32 and stored rounded to nearest-even;
// like the step, a uses c and d before that rounding.
//
// An 8-bit c or d (block8) is read as its code bytes, converted to float
// (exact), and written back as the second byte of the new value's bits (no
// conversion back, whose out-of-range cases differ between lanes and C++);
// its per-block float becomes x / 2 + 1 / 2 (a multiply-add that neither
// grows nor vanishes over many calls) in a loop of its own (1/256 of the
// traffic).

// The lanes of a block that hold elements.
template <class Block>
FASTADAM_INLINE int lanes_of(const Block&) {
    return static_cast<int>(sizeof(typename Block::V) / sizeof(float));
}
FASTADAM_INLINE int lanes_of(const PartialBlock<float>& block) { return block.count; }

// A whole register goes through CodeLanes (a partial one, staged in a
// zero-padded one); half a register or one element, lane by lane.
template <class Block>
FASTADAM_INLINE typename Block::V load_code_floats(const std::uint8_t* p, const Block& block) {
    using V = typename Block::V;
    constexpr int width = sizeof(V) / sizeof(float);
    if constexpr (width == CodeLanes::width) {
        std::uint8_t staged[CodeLanes::width] = {};
        const std::uint8_t* codes = p;
        if (lanes_of(block) < width) {
            std::memcpy(staged, p, static_cast<std::size_t>(lanes_of(block)));
            codes = staged;
        }
        return __builtin_convertvector(CodeLanes::load_codes(codes), V);
    } else if constexpr (width == 1) {
        return static_cast<float>(*p);
    } else {
        V x;
        for (int lane = 0; lane < width; ++lane) x[lane] = static_cast<float>(p[lane]);
        return x;
    }
}

template <class Block>
FASTADAM_INLINE void store_code_bytes(std::uint8_t* p, typename Block::V x, const Block& block) {
    using V = typename Block::V;
    constexpr int width = sizeof(V) / sizeof(float);
    if constexpr (width == CodeLanes::width) {
        const CodeLanes::I byte = (reinterpret_cast<CodeLanes::I>(x) >> 8) & 0xFF;
        if (lanes_of(block) == width) {
            CodeLanes::store_codes(p, byte);
        } else {
            std::uint8_t staged[CodeLanes::width];
            CodeLanes::store_codes(staged, byte);
            std::memcpy(p, staged, static_cast<std::size_t>(lanes_of(block)));
        }
    } else if constexpr (width == 1) {
        *p = static_cast<std::uint8_t>(float_to_bits(x) >> 8);
    } else {
        for (int lane = 0; lane < width; ++lane) p[lane] = static_cast<std::uint8_t>(float_to_bits(x[lane]) >> 8);
    }
}

template <class T, Storage S, class Block>
FASTADAM_INLINE typename Block::V load_probe_stream(const void* from, std::int64_t i, const Block& block) {
    if constexpr (S == Storage::block8) return load_code_floats(static_cast<const std::uint8_t*>(from) + i, block);
    else return load_grad<T, S>(from, i, block);
}

template <class T, Storage S, class Block>
FASTADAM_INLINE void store_probe_stream(void* to, std::int64_t i, const Block& block, typename Block::V x) {
    if constexpr (S == Storage::same) block.store(static_cast<T*>(to) + i, x);
    else if constexpr (S == Storage::block8) store_code_bytes(static_cast<std::uint8_t*>(to) + i, x, block);
    else block.template store16<S>(static_cast<std::uint16_t*>(to) + i, x);
}

template <class T, Storage B, Storage C, Storage D, bool Exact, class Block>
FASTADAM_INLINE void probe_block(const ProbeTensor& t, std::int64_t i, const Block& block) {
    using V = typename Block::V;
    const V h = Block::broadcast(T(0.5)), k = Block::broadcast(T(1e-8));
    T* a = static_cast<T*>(t.a) + i;
    const V bv = load_grad<T, B>(t.b, i, block);
    const V c_old = load_probe_stream<T, C>(t.c, i, block);
    const V d_old = load_probe_stream<T, D>(t.d, i, block);
    V av, cv, dv;
    if constexpr (Exact) {
        cv = c_old * h + bv;
        dv = d_old * h + bv * bv;
        av = block.load(a) - cv / (Block::sqrt(dv) + k);
    } else {
        av = block.load(a) * h + bv;
        cv = c_old * h + bv;
        dv = d_old * h + bv * bv;  // never negative: a step that shares the buffers takes its square root
    }
    store_probe_stream<T, C>(t.c, i, block, cv);
    store_probe_stream<T, D>(t.d, i, block, dv);
    block.store(a, av);
    if constexpr (B == kBf16) {
        if (t.e != nullptr) block.template store16<kBf16>(static_cast<std::uint16_t*>(t.e) + i, av);
    }
}

template <class T, Storage B, Storage C, Storage D, bool Exact>
void probe_range_typed(const ProbeTensor& tensor, std::int64_t begin, std::int64_t end) {
    const ProbeTensor t = tensor;  // a local copy: stores of code bytes cannot alias it (as update_span)
    const auto block = [&](std::int64_t i, const auto& kind) FASTADAM_LAMBDA_INLINE {
        probe_block<T, B, C, D, Exact>(t, i, kind);
    };
    for_each_block(static_cast<const T*>(t.a), begin, end, block);
    if constexpr (C == Storage::block8) {
        // A piece holds whole blocks (launch.cpp): the block of `begin` up to the one holding end - 1.
        for (std::int64_t k = begin / kQuantBlock; k * kQuantBlock < end; ++k) {
            t.absmax_c[k] = t.absmax_c[k] * 0.5f + 0.5f;
            t.absmax_d[k] = t.absmax_d[k] * 0.5f + 0.5f;
        }
    }
}

}  // namespace FASTADAM_LEVEL
}  // namespace fastadam
