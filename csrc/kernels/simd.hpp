// A minimal SIMD vocabulary for the instruction-set level this translation
// unit is compiled for (chosen by the -m flags CMake passes, visible here as
// the compiler's __AVX512F__ / __AVX2__ macros).
//
// Arithmetic (+ - * / < != | ?:) is written with the GCC/Clang vector
// extension operators directly on the intrinsic types; each of those is one
// IEEE-754 operation per lane, the same as the scalar C++ and NumPy ufunc it
// mirrors.  Only what the operators cannot express lives here: full-width and
// masked loads/stores, broadcast and square root.
//
// Everything is in the level's own namespace (see level.hpp), so the linker
// can never merge an AVX-512 instantiation into the baseline path (the
// one-definition-rule hazard of multi-ISA builds).
#pragma once

#include "level.hpp"

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

// Everything here is forced inline: a kernel file instantiates a few hundred
// variants, enough to exhaust GCC's inlining budget for the unit, and a call
// per register would cost more than the arithmetic it wraps.
#if defined(__GNUC__)
#define FASTADAM_INLINE inline __attribute__((always_inline))
#define FASTADAM_LAMBDA_INLINE __attribute__((always_inline))
#else
#define FASTADAM_INLINE inline
#define FASTADAM_LAMBDA_INLINE
#endif

namespace fastadam {
namespace FASTADAM_LEVEL {

template <class T>
struct Simd;

// 16-byte vectors of the compiler's vector extension: the baseline level's
// registers, and the AVX2 level's half registers (SSE) for short stretches.
template <class T>
struct BaselineSimd {
    typedef T V __attribute__((vector_size(16)));
    static constexpr int width = 16 / sizeof(T);
    static FASTADAM_INLINE V broadcast(T x) {
        V r;
        for (int i = 0; i < width; ++i) r[i] = x;
        return r;
    }
    static FASTADAM_INLINE V sqrt(V x) {
        for (int i = 0; i < width; ++i) x[i] = __builtin_sqrt(x[i]);  // correctly rounded, like sqrtps/sqrtpd
        return x;
    }
    // No masked moves before AVX: stage the tail through a zeroed register.
    static FASTADAM_INLINE V load_first(const T* p, int n) {
        V r = broadcast(T(0));
        std::memcpy(&r, p, sizeof(T) * static_cast<unsigned>(n));
        return r;
    }
    static FASTADAM_INLINE void store_first(T* p, V x, int n) { std::memcpy(p, &x, sizeof(T) * static_cast<unsigned>(n)); }
};


#if defined(__AVX512F__)

template <>
struct Simd<float> {
    using V = __m512;
    static constexpr int width = 16;
    static FASTADAM_INLINE V broadcast(float x) { return _mm512_set1_ps(x); }
    static FASTADAM_INLINE V sqrt(V x) { return _mm512_sqrt_ps(x); }
    static FASTADAM_INLINE __mmask16 first(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
    static FASTADAM_INLINE V load_first(const float* p, int n) { return _mm512_maskz_loadu_ps(first(n), p); }
    static FASTADAM_INLINE void store_first(float* p, V x, int n) { _mm512_mask_storeu_ps(p, first(n), x); }
};

template <>
struct Simd<double> {
    using V = __m512d;
    static constexpr int width = 8;
    static FASTADAM_INLINE V broadcast(double x) { return _mm512_set1_pd(x); }
    static FASTADAM_INLINE V sqrt(V x) { return _mm512_sqrt_pd(x); }
    static FASTADAM_INLINE __mmask8 first(int n) { return static_cast<__mmask8>((1u << n) - 1u); }
    static FASTADAM_INLINE V load_first(const double* p, int n) { return _mm512_maskz_loadu_pd(first(n), p); }
    static FASTADAM_INLINE void store_first(double* p, V x, int n) { _mm512_mask_storeu_pd(p, first(n), x); }
};

#elif defined(__AVX2__)

template <>
struct Simd<float> {
    using V = __m256;
    static constexpr int width = 8;
    static FASTADAM_INLINE V broadcast(float x) { return _mm256_set1_ps(x); }
    static FASTADAM_INLINE V sqrt(V x) { return _mm256_sqrt_ps(x); }
    static FASTADAM_INLINE __m256i first(int n) {
        return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    }
    static FASTADAM_INLINE V load_first(const float* p, int n) { return _mm256_maskload_ps(p, first(n)); }
    static FASTADAM_INLINE void store_first(float* p, V x, int n) { _mm256_maskstore_ps(p, first(n), x); }
};

template <>
struct Simd<double> {
    using V = __m256d;
    static constexpr int width = 4;
    static FASTADAM_INLINE V broadcast(double x) { return _mm256_set1_pd(x); }
    static FASTADAM_INLINE V sqrt(V x) { return _mm256_sqrt_pd(x); }
    static FASTADAM_INLINE __m256i first(int n) {
        return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
    }
    static FASTADAM_INLINE V load_first(const double* p, int n) { return _mm256_maskload_pd(p, first(n)); }
    static FASTADAM_INLINE void store_first(double* p, V x, int n) { _mm256_maskstore_pd(p, first(n), x); }
};

// Half a register, for stretches shorter than a whole one (see ShortStretches).
template <class T>
struct HalfSimd;
template <>
struct HalfSimd<float> : BaselineSimd<float> {
    static FASTADAM_INLINE V sqrt(V x) { return reinterpret_cast<V>(_mm_sqrt_ps(reinterpret_cast<__m128>(x))); }
};
template <>
struct HalfSimd<double> : BaselineSimd<double> {
    static FASTADAM_INLINE V sqrt(V x) { return reinterpret_cast<V>(_mm_sqrt_pd(reinterpret_cast<__m128d>(x))); }
};

#else  // baseline: 16-byte vectors (SSE2 on x86-64, the compiler's choice elsewhere)

template <>
struct Simd<float> : BaselineSimd<float> {
    static FASTADAM_INLINE V sqrt(V x) {
#if defined(__SSE2__)
        return reinterpret_cast<V>(_mm_sqrt_ps(reinterpret_cast<__m128>(x)));
#else
        for (int i = 0; i < width; ++i) x[i] = __builtin_sqrtf(x[i]);
        return x;
#endif
    }
};
template <>
struct Simd<double> : BaselineSimd<double> {
#if defined(__SSE2__)
    static FASTADAM_INLINE V sqrt(V x) { return reinterpret_cast<V>(_mm_sqrt_pd(reinterpret_cast<__m128d>(x))); }
#endif
};

#endif

// How this level handles the stretches shorter than a register: the head of
// a range up to an aligned address, and its tail.  Which lanes compute an
// element does not change its bits (each lane does the same IEEE operations),
// so this is a matter of speed, chosen per level by measurement
// (benchmarks/bench_sparse_mixed.py's row-sparse step, whose 64-element rows
// are all head and tail, and bench_step.py's small tensors):
// - AVX-512: a masked register; its masked moves cost what full ones do.
// - AVX2: half a register (SSE), then single elements.  AVX2's masked moves
//   (vmaskmovps, vpmaskmovd) are microcoded and slow: with them a step of
//   10,000 rows of 64 floats took 9x as long as a dense step over as many
//   elements (AMD Zen 3).
// - baseline: single elements.
// align_from: ranges shorter than this many registers are not aligned
// first.  An unaligned full-width access costs little, a head of single
// elements costs about as much as a register each: aligning pays only where
// it spares many cache-line-straddling accesses.
struct ShortStretches {
    bool masked;        // one masked (or zero-padded) register
    bool half;          // else: half a register first (levels with HalfSimd), then single elements
    int align_from;     // in registers
};
#if defined(__AVX512F__)
constexpr ShortStretches kShortStretches{true, false, 0};
#elif defined(__AVX2__)
constexpr ShortStretches kShortStretches{false, true, 16};
#else
constexpr ShortStretches kShortStretches{false, false, 16};
#endif

// Full-width unaligned moves are the same on every level: memcpy of one
// register, which the compiler lowers to a single (v)movups/(v)movupd.
template <class T>
FASTADAM_INLINE typename Simd<T>::V load_full(const T* p) {
    typename Simd<T>::V r;
    std::memcpy(&r, p, sizeof r);
    return r;
}

template <class T>
FASTADAM_INLINE void store_full(T* p, typename Simd<T>::V x) {
    std::memcpy(p, &x, sizeof x);
}


// ---- 16-bit float storage (mixed precision) ----------------------------------------------------------------
// The scalar functions are the definition; each level's register versions
// give the same bits.  Rounding is to nearest, ties to even; subnormals are
// kept; NaN stays NaN (quiet) and inf stays inf.  bfloat16 is converted with
// integer arithmetic on every level: AVX-512 BF16's vcvtneps2bf16 would be
// faster but flushes subnormal inputs to zero.

FASTADAM_INLINE float bits_to_float(std::uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}
FASTADAM_INLINE std::uint32_t float_to_bits(float f) {
    std::uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}

FASTADAM_INLINE float bf16_to_float(std::uint16_t h) { return bits_to_float(std::uint32_t(h) << 16); }

FASTADAM_INLINE std::uint16_t float_to_bf16(float f) {
    const std::uint32_t u = float_to_bits(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<std::uint16_t>((u >> 16) | 0x40u);  // quiet NaN
    return static_cast<std::uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);  // ties to even; overflow -> inf
}

FASTADAM_INLINE float f16_to_float(std::uint16_t h) {
    const std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16;
    const std::uint32_t exponent = (h >> 10) & 0x1Fu;
    const std::uint32_t mantissa = h & 0x3FFu;
    if (exponent == 0x1Fu) return bits_to_float(sign | 0x7F800000u | (mantissa << 13) | (mantissa ? 0x400000u : 0u));
    if (exponent != 0) return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
    // Subnormal (or zero): mantissa * 2^-24, exact in float.
    return bits_to_float(sign | float_to_bits(static_cast<float>(mantissa) * 0x1p-24f));
}

FASTADAM_INLINE std::uint16_t float_to_f16(float f) {
    const std::uint32_t u = float_to_bits(f);
    const std::uint32_t sign = (u >> 16) & 0x8000u;
    std::uint32_t a = u & 0x7FFFFFFFu;
    if (a >= 0x7F800000u)  // inf, or NaN (made quiet)
        return static_cast<std::uint16_t>(sign | (a > 0x7F800000u ? 0x7E00u | ((a >> 13) & 0x3FFu) : 0x7C00u));
    if (a >= 0x477FF000u) return static_cast<std::uint16_t>(sign | 0x7C00u);  // >= 65520 rounds to inf
    if (a < 0x38800000u) {
        // Below 2^-14: a float16 subnormal.  Adding 0.5 makes the float's last
        // mantissa bit weigh 2^-24, the float16 subnormal step, so the float
        // addition itself rounds to nearest even.
        const float shifted = bits_to_float(a) + 0.5f;
        return static_cast<std::uint16_t>(sign | (float_to_bits(shifted) - 0x3F000000u));
    }
    // Normal: rebias the exponent (15 - 127) and round the 13 dropped bits to nearest even.
    a += 0xC8000FFFu + ((a >> 13) & 1u);
    return static_cast<std::uint16_t>(sign | (a >> 13));
}

// Whole registers of Simd<float>::width values to and from 16-bit storage.
#if defined(__AVX512F__)
FASTADAM_INLINE __m512 load_bf16(const std::uint16_t* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
FASTADAM_INLINE void store_bf16(std::uint16_t* p, __m512 x) {
    const __m512i u = _mm512_castps_si512(x);
    const __m512i high = _mm512_srli_epi32(u, 16);
    const __m512i bias = _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(high, _mm512_set1_epi32(1)));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
    r = _mm512_mask_or_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), high, _mm512_set1_epi32(0x40));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
}
FASTADAM_INLINE __m512 load_f16(const std::uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
FASTADAM_INLINE void store_f16(std::uint16_t* p, __m512 x) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#elif defined(__AVX2__)
// Zen 3 runs shifts, shuffles and lane crossings on two of its four vector
// pipes, beside the multiplies, the divider and the square root; these
// conversions use one such operation per register to load and two to store
// (not 2 and 4: with bfloat16 moments that halved the in-cache step).
FASTADAM_INLINE __m256 load_bf16(const std::uint16_t* p) {
    // The 8 values in both halves; each lands in the high 16 bits of its lane (0x80: a zero byte).
    const __m256i h = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256i to_high_halves = _mm256_setr_epi8(
        -128, -128, 0, 1, -128, -128, 2, 3, -128, -128, 4, 5, -128, -128, 6, 7,
        -128, -128, 8, 9, -128, -128, 10, 11, -128, -128, 12, 13, -128, -128, 14, 15);
    return _mm256_castsi256_ps(_mm256_shuffle_epi8(h, to_high_halves));
}
FASTADAM_INLINE void store_bf16(std::uint16_t* p, __m256 x) {
    const __m256i u = _mm256_castps_si256(x);
    // float_to_bf16 before its final shift: bit 16 (the last bit kept) is min(u & 0x10000, 1), no shift needed.
    const __m256i last_kept = _mm256_min_epu32(_mm256_and_si256(u, _mm256_set1_epi32(0x10000)), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), last_kept);
    const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
    __m256i r = rounded;
    if (__builtin_expect(_mm256_movemask_ps(nan) != 0, 0)) {  // (a test and a branch: two operations, not three)
        const __m256i quiet_nan = _mm256_or_si256(u, _mm256_set1_epi32(0x400000));
        r = _mm256_blendv_epi8(rounded, quiet_nan, _mm256_castps_si256(nan));
    }
    // The high 16 bits of each lane into the low 8 bytes of its 128-bit half, each half stored on its own
    // (an extraction, not a lane-crossing permute, which would queue for the divider's pipe).
    const __m256i from_high_halves = _mm256_setr_epi8(
        2, 3, 6, 7, 10, 11, 14, 15, -128, -128, -128, -128, -128, -128, -128, -128,
        2, 3, 6, 7, 10, 11, 14, 15, -128, -128, -128, -128, -128, -128, -128, -128);
    const __m256i packed = _mm256_shuffle_epi8(r, from_high_halves);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p + 4), _mm256_extracti128_si256(packed, 1));
}
FASTADAM_INLINE __m256 load_f16(const std::uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
FASTADAM_INLINE void store_f16(std::uint16_t* p, __m256 x) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#else
#if defined(__SSE2__)
// The baseline level's bfloat16 in registers too (the scalar definition's
// branch on NaN kept the compiler from vectorizing it, and a one-pass
// mixed-precision step was slower than separate passes).
FASTADAM_INLINE Simd<float>::V load_bf16(const std::uint16_t* p) {
    const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return reinterpret_cast<Simd<float>::V>(_mm_unpacklo_epi16(_mm_setzero_si128(), h));  // each into a high half
}
FASTADAM_INLINE void store_bf16(std::uint16_t* p, Simd<float>::V x) {
    const __m128i u = reinterpret_cast<__m128i>(x);
    const __m128i last_kept = _mm_and_si128(_mm_srli_epi32(u, 16), _mm_set1_epi32(1));
    __m128i r = _mm_add_epi32(_mm_add_epi32(u, _mm_set1_epi32(0x7FFF)), last_kept);
    const __m128i nan = _mm_castps_si128(_mm_cmpunord_ps(reinterpret_cast<__m128>(x), reinterpret_cast<__m128>(x)));
    if (__builtin_expect(_mm_movemask_epi8(nan) != 0, 0)) {
        const __m128i quiet_nan = _mm_or_si128(u, _mm_set1_epi32(0x400000));
        r = _mm_or_si128(_mm_andnot_si128(nan, r), _mm_and_si128(nan, quiet_nan));
    }
    // The high halves as signed 16-bit values, which the saturating pack keeps as they are.
    const __m128i high = _mm_srai_epi32(r, 16);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packs_epi32(high, high));
}
#else
FASTADAM_INLINE Simd<float>::V load_bf16(const std::uint16_t* p) {
    Simd<float>::V r;
    for (int i = 0; i < Simd<float>::width; ++i) r[i] = bf16_to_float(p[i]);
    return r;
}
FASTADAM_INLINE void store_bf16(std::uint16_t* p, Simd<float>::V x) {
    for (int i = 0; i < Simd<float>::width; ++i) p[i] = float_to_bf16(x[i]);
}
#endif
FASTADAM_INLINE Simd<float>::V load_f16(const std::uint16_t* p) {
    Simd<float>::V r;
    for (int i = 0; i < Simd<float>::width; ++i) r[i] = f16_to_float(p[i]);
    return r;
}
FASTADAM_INLINE void store_f16(std::uint16_t* p, Simd<float>::V x) {
    for (int i = 0; i < Simd<float>::width; ++i) p[i] = float_to_f16(x[i]);
}
#endif

}  // namespace FASTADAM_LEVEL
}  // namespace fastadam
