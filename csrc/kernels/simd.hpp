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
// Everything is in an anonymous namespace: each ISA translation unit gets its
// own internal copy, so the linker can never merge an AVX-512 instantiation
// into the baseline path (the one-definition-rule hazard of multi-ISA builds).
#pragma once

#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace fastadam {
namespace {

template <class T>
struct Simd;

#if defined(__AVX512F__)

template <>
struct Simd<float> {
    using V = __m512;
    static constexpr int width = 16;
    static V broadcast(float x) { return _mm512_set1_ps(x); }
    static V sqrt(V x) { return _mm512_sqrt_ps(x); }
    static __mmask16 first(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
    static V load_first(const float* p, int n) { return _mm512_maskz_loadu_ps(first(n), p); }
    static void store_first(float* p, V x, int n) { _mm512_mask_storeu_ps(p, first(n), x); }
};

template <>
struct Simd<double> {
    using V = __m512d;
    static constexpr int width = 8;
    static V broadcast(double x) { return _mm512_set1_pd(x); }
    static V sqrt(V x) { return _mm512_sqrt_pd(x); }
    static __mmask8 first(int n) { return static_cast<__mmask8>((1u << n) - 1u); }
    static V load_first(const double* p, int n) { return _mm512_maskz_loadu_pd(first(n), p); }
    static void store_first(double* p, V x, int n) { _mm512_mask_storeu_pd(p, first(n), x); }
};

#elif defined(__AVX2__)

template <>
struct Simd<float> {
    using V = __m256;
    static constexpr int width = 8;
    static V broadcast(float x) { return _mm256_set1_ps(x); }
    static V sqrt(V x) { return _mm256_sqrt_ps(x); }
    static __m256i first(int n) {
        return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    }
    static V load_first(const float* p, int n) { return _mm256_maskload_ps(p, first(n)); }
    static void store_first(float* p, V x, int n) { _mm256_maskstore_ps(p, first(n), x); }
};

template <>
struct Simd<double> {
    using V = __m256d;
    static constexpr int width = 4;
    static V broadcast(double x) { return _mm256_set1_pd(x); }
    static V sqrt(V x) { return _mm256_sqrt_pd(x); }
    static __m256i first(int n) {
        return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
    }
    static V load_first(const double* p, int n) { return _mm256_maskload_pd(p, first(n)); }
    static void store_first(double* p, V x, int n) { _mm256_maskstore_pd(p, first(n), x); }
};

#else  // baseline: 16-byte vectors (SSE2 on x86-64, the compiler's choice elsewhere)

template <class T>
struct BaselineSimd {
    typedef T V __attribute__((vector_size(16)));
    static constexpr int width = 16 / sizeof(T);
    static V broadcast(T x) {
        V r;
        for (int i = 0; i < width; ++i) r[i] = x;
        return r;
    }
    static V sqrt(V x) {
        for (int i = 0; i < width; ++i) x[i] = __builtin_sqrt(x[i]);  // correctly rounded, like sqrtps/sqrtpd
        return x;
    }
    // No masked moves before AVX: stage the tail through a zeroed register.
    static V load_first(const T* p, int n) {
        V r = broadcast(T(0));
        std::memcpy(&r, p, sizeof(T) * static_cast<unsigned>(n));
        return r;
    }
    static void store_first(T* p, V x, int n) { std::memcpy(p, &x, sizeof(T) * static_cast<unsigned>(n)); }
};

template <>
struct Simd<float> : BaselineSimd<float> {
    static V sqrt(V x) {
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
    static V sqrt(V x) { return reinterpret_cast<V>(_mm_sqrt_pd(reinterpret_cast<__m128d>(x))); }
#endif
};

#endif

// Full-width unaligned moves are the same on every level: memcpy of one
// register, which the compiler lowers to a single (v)movups/(v)movupd.
template <class T>
inline typename Simd<T>::V load_full(const T* p) {
    typename Simd<T>::V r;
    std::memcpy(&r, p, sizeof r);
    return r;
}

template <class T>
inline void store_full(T* p, typename Simd<T>::V x) {
    std::memcpy(p, &x, sizeof x);
}

}  // namespace
}  // namespace fastadam
