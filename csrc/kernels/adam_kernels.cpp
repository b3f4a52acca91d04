// One instruction-set level's kernel table: the dispatch on dtype and
// variant, the float64 kernels, the skip_if_nonfinite check and the probe.
//
// CMake compiles this file and the other adam_*.cpp files of this folder once
// per level, each time with that level's flags (see level.hpp), and links all
// of them into the extension; csrc/dispatch.cpp picks one table at import.
#include "adam_loops.hpp"

namespace fastadam {
namespace FASTADAM_LEVEL {

const VariantTable kFloat64Kernels = variants<double>();

namespace {

void adam_range(const AdamTensor& t, std::int64_t begin, std::int64_t end) {
    const VariantTable& family = t.dtype == DType::float64 ? kFloat64Kernels : kFloat32Kernels;
    family.fn[t.variant & kVariantMask](t, begin, end);
}

bool nonfinite_range(const AdamTensor& t, std::int64_t begin, std::int64_t end) {
    if (t.dtype == DType::float64) return nonfinite_range_typed<double, kSame>(t, begin, end);
    switch (t.grad.storage) {
        case Storage::float16: return nonfinite_range_typed<float, kHalf>(t, begin, end);
        case Storage::bfloat16: return nonfinite_range_typed<float, kBf16>(t, begin, end);
        default: return nonfinite_range_typed<float, kSame>(t, begin, end);
    }
}

// The float32 probe for each storage of b, c and d (bfloat16 or float32; 8-bit c and d beside float32 b).
template <bool Exact, Storage B, Storage C>
void probe_float_range(const ProbeTensor& t, std::int64_t begin, std::int64_t end) {
    if (t.bf16_d) probe_range_typed<float, B, C, kBf16, Exact>(t, begin, end);
    else probe_range_typed<float, B, C, kSame, Exact>(t, begin, end);
}
template <bool Exact, Storage B>
void probe_float_range(const ProbeTensor& t, std::int64_t begin, std::int64_t end) {
    if (t.bf16_c) probe_float_range<Exact, B, kBf16>(t, begin, end);
    else probe_float_range<Exact, B, kSame>(t, begin, end);
}

template <bool Exact>
void probe_range_of(const ProbeTensor& t, std::int64_t begin, std::int64_t end) {
    if (t.dtype == DType::float64) probe_range_typed<double, kSame, kSame, kSame, Exact>(t, begin, end);
    else if (t.block8) probe_range_typed<float, kSame, Storage::block8, Storage::block8, Exact>(t, begin, end);
    else if (t.bf16_b) probe_float_range<Exact, kBf16>(t, begin, end);
    else probe_float_range<Exact, kSame>(t, begin, end);
}

void probe_range(const ProbeTensor& t, std::int64_t begin, std::int64_t end) {
    if (t.exact) probe_range_of<true>(t, begin, end);
    else probe_range_of<false>(t, begin, end);
}

void quantize_range(const Codebook& book, const float* values, std::uint8_t* codes, float* absmax,
                    std::int64_t begin, std::int64_t end) {
    if (book.count == 16) {
        for (std::int64_t i = begin; i < end; i += kQuantBlock4) {
            const std::int64_t n = end - i < kQuantBlock4 ? end - i : kQuantBlock4;
            absmax[i / kQuantBlock4] = quantize_block4(book, values + i, codes + i / 2, n);
        }
        return;
    }
    for (std::int64_t i = begin; i < end; i += kQuantBlock) {
        const std::int64_t n = end - i < kQuantBlock ? end - i : kQuantBlock;
        absmax[i / kQuantBlock] = quantize_block(book, values + i, codes + i, n);
    }
}

void dequantize_range(const Codebook& book, const std::uint8_t* codes, const float* absmax, float* values,
                      std::int64_t begin, std::int64_t end) {
    if (book.count == 16) {
        for (std::int64_t i = begin; i < end; i += kQuantBlock4) {
            const std::int64_t n = end - i < kQuantBlock4 ? end - i : kQuantBlock4;
            dequantize_block4(book, codes + i / 2, absmax[i / kQuantBlock4], values + i, n);
        }
        return;
    }
    for (std::int64_t i = begin; i < end; i += kQuantBlock) {
        const std::int64_t n = end - i < kQuantBlock ? end - i : kQuantBlock;
        dequantize_block(book, codes + i, absmax[i / kQuantBlock], values + i, n);
    }
}

}  // namespace
}  // namespace FASTADAM_LEVEL

extern const KernelTable FASTADAM_CONCAT(kernel_table_, FASTADAM_ISA_NAME) = {
    FASTADAM_STRINGIFY(FASTADAM_ISA_NAME),
    &FASTADAM_LEVEL::adam_range,
    &FASTADAM_LEVEL::probe_range,
    &FASTADAM_LEVEL::nonfinite_range,
    static_cast<int>(sizeof(typename FASTADAM_LEVEL::Simd<float>::V)),
    &FASTADAM_LEVEL::quantize_range,
    &FASTADAM_LEVEL::dequantize_range,
};

}  // namespace fastadam
