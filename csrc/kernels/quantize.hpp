// Block-wise 8-bit state (Dettmers et al., ICLR 2022): a block of kQuantBlock
// consecutive elements is stored as one byte per element, a code into a
// 256-value map, and one float32 absmax; element j is map[code[j]] * absmax.
//
// Every level computes the codes in registers of Simd<float>::width lanes,
// a block's last partial register included (zeros past the end, whose codes
// are dropped), so the body and the tail are one formula.  The
// nearest code comes from the code book's bucket table (kernel_api.hpp's
// Codebook): the same code a search finds, which the host proved for every
// bucket when it built the book.  Integer and comparison operations only,
// apart from the one division by absmax, so every lane and level agree.
#pragma once

#include "../kernel_api.hpp"
#include "simd.hpp"

namespace fastadam {
namespace FASTADAM_LEVEL {

// Registers of 32-bit lanes as wide as this level's float registers.
struct CodeLanes {
    static constexpr int width = Simd<float>::width;
    typedef float F __attribute__((vector_size(4 * width)));
    typedef std::int32_t I __attribute__((vector_size(4 * width)));
    typedef std::uint32_t U __attribute__((vector_size(4 * width)));
    typedef std::uint8_t Bytes __attribute__((vector_size(width)));

    static FASTADAM_INLINE F floats(float x) { return F{} + x; }
    static FASTADAM_INLINE I ints(std::int32_t x) { return I{} + x; }

    // table[index] per lane.
    static FASTADAM_INLINE F gather(const float* table, I index) {
#if defined(__AVX512F__)
        return reinterpret_cast<F>(_mm512_i32gather_ps(reinterpret_cast<__m512i>(index), table, 4));
#elif defined(__AVX2__)
        return reinterpret_cast<F>(_mm256_i32gather_ps(table, reinterpret_cast<__m256i>(index), 4));
#else
        F r;
        for (int l = 0; l < width; ++l) r[l] = table[index[l]];
        return r;
#endif
    }
    // table[index] per lane, 32-bit integers.
    static FASTADAM_INLINE I gather(const std::uint32_t* table, I index) {
#if defined(__AVX512F__)
        return reinterpret_cast<I>(_mm512_i32gather_epi32(reinterpret_cast<__m512i>(index), table, 4));
#elif defined(__AVX2__)
        return reinterpret_cast<I>(
            _mm256_i32gather_epi32(reinterpret_cast<const int*>(table), reinterpret_cast<__m256i>(index), 4));
#else
        I r;
        for (int l = 0; l < width; ++l) r[l] = static_cast<std::int32_t>(table[index[l]]);
        return r;
#endif
    }
    // `width` codes, zero-extended to 32-bit lanes.
    static FASTADAM_INLINE I load_codes(const std::uint8_t* p) {
#if defined(__AVX512F__)
        return reinterpret_cast<I>(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(__AVX2__)
        return reinterpret_cast<I>(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#else
        Bytes b;
        std::memcpy(&b, p, sizeof b);
        return __builtin_convertvector(b, I);
#endif
    }
    // Codes (0..255 in each lane) to bytes: the saturating packs are plain
    // narrowing here (GCC's generic narrowing extracts lane by lane).
    static FASTADAM_INLINE void store_codes(std::uint8_t* p, I codes) {
#if defined(__AVX512F__)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(reinterpret_cast<__m512i>(codes)));
#elif defined(__AVX2__)
        const __m256i c = reinterpret_cast<__m256i>(codes);
        const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packus_epi16(words, words));
#elif defined(__SSE2__)
        const __m128i words = _mm_packs_epi32(reinterpret_cast<__m128i>(codes), reinterpret_cast<__m128i>(codes));
        const int four = _mm_cvtsi128_si32(_mm_packus_epi16(words, words));
        std::memcpy(p, &four, 4);
#else
        for (int l = 0; l < width; ++l) p[l] = static_cast<std::uint8_t>(codes[l]);
#endif
    }
};

// The bucket table's fields as locals: the loop that stores codes through a
// byte pointer (which may alias anything) keeps them in registers instead of
// re-reading the book after every store.
struct BucketTable {
    const std::uint32_t* entries;
    std::uint32_t floor_bits;
    std::uint32_t rank_mask;
    std::int32_t shift;
    std::int32_t buckets;
    std::int32_t zero_code;
    explicit BucketTable(const Codebook& book)
        : entries(book.bucket),
          floor_bits(book.floor_bits),
          rank_mask((1u << book.shift) - 1u),
          shift(book.shift),
          buckets(book.buckets),
          zero_code(book.zero_code) {}
};

// The codes of the values x of one block whose absmax is `absmax` (> 0):
// kernel_api.hpp's Codebook table.  A NaN or inf element gets the code of 0.
FASTADAM_INLINE CodeLanes::I nearest_codes(const BucketTable& table, CodeLanes::F x, CodeLanes::F absmax) {
    using L = CodeLanes;
    const L::F y = x / absmax;  // correctly rounded, in [-1, 1] for finite x: as fastadam.reference
    const L::U bits = reinterpret_cast<L::U>(y);
    const L::U one = L::U{} + 0x3F800000u, floor = L::U{} + table.floor_bits;
    L::U magnitude = bits & 0x7FFFFFFFu;
    magnitude = magnitude < one ? magnitude : one;  // NaN lanes stay inside the table
    magnitude = magnitude > floor ? magnitude : floor;
    const L::U above_floor = magnitude - floor;
    const L::I negative = reinterpret_cast<L::I>(bits) >> 31;  // all ones for negative y
    const L::I bucket = reinterpret_cast<L::I>(above_floor >> table.shift) + (negative & table.buckets);
    const L::I entry = L::gather(table.entries, bucket);
    const L::I rank = reinterpret_cast<L::I>(above_floor & table.rank_mask);
    const L::I threshold = entry & 0xFFFFFF;
    const L::I step = negative ? rank < threshold : rank > threshold;  // a true comparison is -1
    const L::I code = reinterpret_cast<L::I>(reinterpret_cast<L::U>(entry) >> 24) - step;
    const L::I finite = (reinterpret_cast<L::I>(x) & 0x7FFFFFFF) < 0x7F800000;
    return finite ? code : L::ints(table.zero_code);
}

// The nearest code of y by binary search: for maps whose midpoints lie too
// close for a bucket table (Codebook::buckets == 0).  Arithmetic on the
// comparison, not a branch: the data decide each step.
FASTADAM_INLINE int searched_code(const Codebook& book, float y) {
    int code = 0;
    for (int step = 128; step >= 1; step >>= 1) code += static_cast<int>(book.midpoint[code + step - 1] < y) * step;
    return code;
}

// The floats of a block at element j: a whole register, or past the block's
// last full register its n - j remaining elements and zeros.
FASTADAM_INLINE CodeLanes::F block_floats(const float* from, std::int64_t j, std::int64_t n) {
    CodeLanes::F x = CodeLanes::floats(0.0f);
    if (n - j >= CodeLanes::width) std::memcpy(&x, from + j, sizeof x);
    else std::memcpy(&x, from + j, sizeof(float) * static_cast<std::size_t>(n - j));
    return x;
}

// n elements of a block (n <= kQuantBlock): codes to floats, map[code] *
// absmax (one correctly rounded multiply, as fastadam.reference).
FASTADAM_INLINE void dequantize_block(const Codebook& book, const std::uint8_t* codes, float absmax, float* to,
                                      std::int64_t n) {
    using L = CodeLanes;
    const L::F scale = L::floats(absmax);
    std::int64_t j = 0;
    for (; j + L::width <= n; j += L::width) {
        const L::F x = L::gather(book.value, L::load_codes(codes + j)) * scale;
        std::memcpy(to + j, &x, sizeof x);
    }
    if (j < n) {
        const std::size_t rest = static_cast<std::size_t>(n - j);
        std::uint8_t some[L::width] = {};
        std::memcpy(some, codes + j, rest);
        const L::F x = L::gather(book.value, L::load_codes(some)) * scale;
        std::memcpy(to + j, &x, sizeof(float) * rest);
    }
}

// The largest finite |x| of n elements of a block: for non-negative floats,
// integer order is float order; NaN and inf count as 0 (and so do the zeros
// past n).
FASTADAM_INLINE float block_absmax(const float* from, std::int64_t n) {
    using L = CodeLanes;
    L::I largest = L::ints(0);
    const auto count_in = [&largest](L::F x) FASTADAM_LAMBDA_INLINE {
        const L::I magnitude = reinterpret_cast<L::I>(x) & 0x7FFFFFFF;
        const L::I finite = magnitude < 0x7F800000;
        const L::I counted = finite & magnitude;
        largest = counted > largest ? counted : largest;
    };
    std::int64_t whole = 0;
    for (; whole + L::width <= n; whole += L::width) {
        L::F x;
        std::memcpy(&x, from + whole, sizeof x);
        count_in(x);
    }
    if (whole < n) count_in(block_floats(from, whole, n));
    std::int32_t top = 0;
    for (int l = 0; l < L::width; ++l) top = largest[l] > top ? largest[l] : top;
    float absmax;
    std::memcpy(&absmax, &top, sizeof absmax);
    return absmax;
}

// n elements of a block (n <= kQuantBlock) to codes; returns the block's new
// absmax, the largest finite |x|.  A NaN or inf element is stored as the code
// of 0 (its param shows the NaN or inf; the rest of the block keeps its
// scale).  A block of zeros has absmax 0 and every code 0's.
FASTADAM_INLINE float quantize_block(const Codebook& book, const float* from, std::uint8_t* codes, std::int64_t n) {
    using L = CodeLanes;
    const float absmax = block_absmax(from, n);
    if (absmax == 0.0f) {
        for (std::int64_t j = 0; j < n; ++j) codes[j] = book.zero_code;
        return absmax;
    }
    if (book.buckets == 0) {
        for (std::int64_t j = 0; j < n; ++j) {
            const float x = from[j];
            codes[j] = static_cast<std::uint8_t>(__builtin_fabsf(x) <= 3.40282347e38f ? searched_code(book, x / absmax)
                                                                                         : book.zero_code);
        }
        return absmax;
    }
    const L::F scale = L::floats(absmax);
    const BucketTable table(book);
    std::int64_t j = 0;
    for (; j + L::width <= n; j += L::width) {
        L::F x;
        std::memcpy(&x, from + j, sizeof x);
        L::store_codes(codes + j, nearest_codes(table, x, scale));
    }
    if (j < n) {
        std::uint8_t some[L::width];
        L::store_codes(some, nearest_codes(table, block_floats(from, j, n), scale));
        std::memcpy(codes + j, some, static_cast<std::size_t>(n - j));
    }
    return absmax;
}

// -- 4-bit state: 16-value maps, two codes per byte ---------------------------

// `width` codes from width / 2 bytes: lane 2k the low nibble of byte k, lane
// 2k + 1 its high nibble.
FASTADAM_INLINE CodeLanes::I load_nibbles(const std::uint8_t* p) {
    using L = CodeLanes;
#if defined(__AVX2__) && !defined(__AVX512F__)
    std::int32_t four;
    std::memcpy(&four, p, sizeof four);
    const __m256i bytes = _mm256_cvtepu8_epi32(_mm_cvtsi32_si128(four));
    const __m256i pairs = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
    return reinterpret_cast<L::I>(_mm256_srlv_epi32(pairs, _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4))) & 15;
#else
    L::I r;
    for (int l = 0; l < L::width; ++l) r[l] = (p[l >> 1] >> ((l & 1) * 4)) & 15;
    return r;
#endif
}

// Codes (0..15 per lane) into width / 2 bytes, as load_nibbles reads them.
FASTADAM_INLINE void store_nibbles(std::uint8_t* p, CodeLanes::I codes) {
    using L = CodeLanes;
#if defined(__AVX2__) && !defined(__AVX512F__)
    const __m256i shifted =
        _mm256_sllv_epi32(reinterpret_cast<__m256i>(codes), _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4));
    const __m256i joined = _mm256_or_si256(shifted, _mm256_srli_epi64(shifted, 32));  // lane 2k: its byte
    const __m256i even = _mm256_permutevar8x32_epi32(joined, _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6));
    const __m128i words = _mm_packus_epi32(_mm256_castsi256_si128(even), _mm256_castsi256_si128(even));
    const int four = _mm_cvtsi128_si32(_mm_packus_epi16(words, words));
    std::memcpy(p, &four, sizeof four);
#else
    for (int k = 0; k < L::width / 2; ++k) p[k] = static_cast<std::uint8_t>(codes[2 * k] | codes[2 * k + 1] << 4);
#endif
}

// The 16 values of a 4-bit map, by code.
struct NibbleTable {
#if defined(__AVX2__) && !defined(__AVX512F__)
    __m256 low, high;  // values 0..7 and 8..15
    explicit NibbleTable(const Codebook& book)
        : low(_mm256_loadu_ps(book.value)), high(_mm256_loadu_ps(book.value + 8)) {}
    FASTADAM_INLINE CodeLanes::F operator()(CodeLanes::I code) const {
        const __m256i c = reinterpret_cast<__m256i>(code);
        const __m256 from_high = _mm256_castsi256_ps(_mm256_slli_epi32(c, 28));  // sign bit: code >= 8
        return reinterpret_cast<CodeLanes::F>(_mm256_blendv_ps(_mm256_permutevar8x32_ps(low, c),
                                                               _mm256_permutevar8x32_ps(high, c), from_high));
    }
#else
    const float* value;
    explicit NibbleTable(const Codebook& book) : value(book.value) {}
    FASTADAM_INLINE CodeLanes::F operator()(CodeLanes::I code) const { return CodeLanes::gather(value, code); }
#endif
};

// n elements (n <= kQuantBlock4) of a 4-bit block whose codes start at
// `codes` (the block's first byte): map[code] * absmax.
// (Not inlined: one copy per level, not one per variant of the staged loop.)
__attribute__((noinline)) inline void dequantize_block4(const Codebook& book, const std::uint8_t* codes,
                                                        float absmax, float* to, std::int64_t n) {
    using L = CodeLanes;
    const NibbleTable table(book);
    const L::F scale = L::floats(absmax);
    std::int64_t j = 0;
    for (; j + L::width <= n; j += L::width) {
        const L::F x = table(load_nibbles(codes + j / 2)) * scale;
        std::memcpy(to + j, &x, sizeof x);
    }
    if (j < n) {
        std::uint8_t some[L::width / 2] = {};
        std::memcpy(some, codes + j / 2, static_cast<std::size_t>((n - j + 1) / 2));
        const L::F x = table(load_nibbles(some)) * scale;
        std::memcpy(to + j, &x, sizeof(float) * static_cast<std::size_t>(n - j));
    }
}

// The codes of the values x of a block whose absmax is `absmax` (> 0): the
// number of the map's midpoints below x / absmax (book.midpoint: the exact
// midpoints rounded down, which float comparisons make exact), 15 compares
// in registers; a NaN or inf element gets the code nearest 0.
struct NibbleCoder {
    CodeLanes::F midpoint[15];
    CodeLanes::I zero_code;
    explicit NibbleCoder(const Codebook& book) : zero_code(CodeLanes::ints(book.zero_code)) {
        for (int t = 0; t < 15; ++t) midpoint[t] = CodeLanes::floats(book.midpoint[t]);
    }
    FASTADAM_INLINE CodeLanes::I operator()(CodeLanes::F x, CodeLanes::F absmax) const {
        using L = CodeLanes;
        const L::F y = x / absmax;
        L::I code = L::ints(0);
        for (int t = 0; t < 15; ++t) code -= y > midpoint[t];  // a true comparison is -1
        const L::I finite = (reinterpret_cast<L::I>(x) & 0x7FFFFFFF) < 0x7F800000;
        return finite ? code : zero_code;
    }
};

// The same codes for the linear map (k + 1) / 16 (Codebook::linear16), by
// arithmetic: its midpoints are (2k + 3) / 32, so the count below y is
// ceil(16 y - 1.5) clamped to [0, 15], and both operations are exact -- 16 y
// is a power-of-two scaling, and 16 y - 1.5 is exact by Sterbenz's lemma for
// 16 y in [0.75, 3] and because 1.5 is a multiple of the ulp of 16 y above 3
// (below 0.75 the difference is under -0.75, which rounds to no more than
// that, and the count is 0 either way).  Ceiling of t in [-1, 16] as
// truncation plus one where that fell below t.
struct LinearNibbleCoder {
    CodeLanes::I zero_code;
    explicit LinearNibbleCoder(const Codebook& book) : zero_code(CodeLanes::ints(book.zero_code)) {}
    FASTADAM_INLINE CodeLanes::I operator()(CodeLanes::F x, CodeLanes::F absmax) const {
        using L = CodeLanes;
        const L::F y = x / absmax;
        L::F t = y * 16.0f - 1.5f;
        t = t > -1.0f ? t : L::floats(-1.0f);  // (NaN too: its lane is replaced below)
        t = t < 16.0f ? t : L::floats(16.0f);
        L::I code = __builtin_convertvector(t, L::I);  // toward zero
        code -= __builtin_convertvector(code, L::F) < t;  // a true comparison is -1: one more
        code = code > 0 ? code : L::ints(0);
        code = code < 15 ? code : L::ints(15);
        const L::I finite = (reinterpret_cast<L::I>(x) & 0x7FFFFFFF) < 0x7F800000;
        return finite ? code : zero_code;
    }
};

// The codes of a block's n elements (after block_absmax, absmax > 0).
template <class Coder>
FASTADAM_INLINE void code_block4(const Coder& coder, const float* from, std::uint8_t* codes, std::int64_t n,
                                 float absmax) {
    using L = CodeLanes;
    const L::F scale = L::floats(absmax);
    std::int64_t j = 0;
    for (; j + L::width <= n; j += L::width) {
        L::F x;
        std::memcpy(&x, from + j, sizeof x);
        store_nibbles(codes + j / 2, coder(x, scale));
    }
    if (j < n) {
        std::uint8_t some[L::width / 2];
        store_nibbles(some, coder(block_floats(from, j, n), scale));
        if ((n - j) % 2 != 0) some[(n - j) / 2] &= 0x0F;
        std::memcpy(codes + j / 2, some, static_cast<std::size_t>((n - j + 1) / 2));
    }
}

// n elements (n <= kQuantBlock4) into a 4-bit block's codes (from its first
// byte); returns the block's new absmax, as quantize_block.  Past an odd n,
// the last byte's high nibble is 0.
// (Not inlined, as dequantize_block4.)
__attribute__((noinline)) inline float quantize_block4(const Codebook& book, const float* from, std::uint8_t* codes,
                                                       std::int64_t n) {
    const float absmax = block_absmax(from, n);
    if (absmax == 0.0f) {
        std::memset(codes, book.zero_code | book.zero_code << 4, static_cast<std::size_t>(n / 2));
        if (n % 2 != 0) codes[n / 2] = book.zero_code;
    } else if (book.linear16) {
        code_block4(LinearNibbleCoder(book), from, codes, n, absmax);
    } else {
        code_block4(NibbleCoder(book), from, codes, n, absmax);
    }
    return absmax;
}

}  // namespace FASTADAM_LEVEL
}  // namespace fastadam
