// The interface between the ISA-neutral host code (bindings, dispatch,
// threading) and the per-ISA kernel translation units.
//
// Only plain data and function-pointer tables live here: nothing in this header
// is compiled into machine code, so including it from translation units built
// with different -m flags cannot leak an AVX-512 instruction into the baseline.
#pragma once

#include <cstdint>

namespace fastadam {

enum class DType : std::uint8_t { float32 = 0, float64 = 1 };

// Compile-time options of the element formula: the form of weight decay and
// amsgrad.  A kernel is instantiated for each combination so that the inner
// loop never branches on them; AdamTensor::variant holds these bits and
// indexes a table of kVariantCount kernels (kL2WeightDecay | kDecoupledDecay
// is never used).  Maximize and loss scaling are not options: every gradient
// is multiplied by AdamConstants::inv_grad_scale and has the sign bit of
// AdamConstants::grad_sign XORed into it (see adam_math.hpp), which leaves it
// unchanged when they are 1 and +0.0.
enum AdamVariant : std::uint8_t {
    kL2WeightDecay = 1u << 0,    // g = g + weight_decay * p          (Adam)
    kDecoupledDecay = 1u << 1,   // p = p - (lr * weight_decay) * p   (AdamW)
    kAmsgrad = 1u << 2,          // v_used = max(v_max, v)
};
constexpr unsigned kVariantCount = 1u << 3;
constexpr unsigned kVariantMask = kVariantCount - 1u;

// How one stream of a tensor (its gradient, a moment, the model copy) is
// stored when it is not the working dtype.  The kernels compute in the
// working dtype; a stream in another storage is widened into it before the
// update and narrowed back after (see adam_loops.hpp's staged loop).
// block8: 8-bit codes, block-wise dynamic quantization (Dettmers et al., ICLR
// 2022): each block of kQuantBlock consecutive elements has a float32
// absmax, and element j is map[code[j]] * absmax of its block.  block4:
// 4-bit codes (Li et al., NeurIPS 2023), two per byte (element 2k in the low
// nibble of byte k), a float32 absmax per block of kQuantBlock4 elements, a
// 16-value map.
enum class Storage : std::uint8_t { same = 0, float16 = 1, bfloat16 = 2, block8 = 3, block4 = 4 };

// Elements per quantization block of block8 and of block4 state; a block is
// never split between threads (launch.cpp's pieces start on multiples of
// kQuantBlock, which kQuantBlock4 divides).
constexpr std::int64_t kQuantBlock = 256;
constexpr std::int64_t kQuantBlock4 = 128;
inline bool is_quantized(Storage s) { return s == Storage::block8 || s == Storage::block4; }

// The code book of block8 state: the 256 values of the codes (the map, in
// ascending order) and a table that finds the nearest code of a value
// without a search.  Built once per map on the host (codebook.cpp, which
// proves every entry of the table), read by the kernels.
//
// The code of y (a float in [-1, 1]: a value over its block's absmax) is the
// number of midpoints below it: the nearest map value, a tie going to the
// lower code.  midpoint[k] is the exact midpoint of value[k] and value[k+1]
// rounded down to a float: for a float y, y > midpoint exactly when y >
// midpoint[k] (no float lies between them), so float comparisons give the
// exact answer.
//
// The table cuts the magnitudes a = bits(|y|) into buckets of 2^shift
// consecutive bit patterns from floor_bits up (the magnitudes below
// floor_bits count as floor_bits): bucket k = (max(a, floor_bits) -
// floor_bits) >> shift, the negative y in a second run of `buckets` entries.
// No bucket holds more than one midpoint.  Entry = lowest code << 24 |
// threshold: with r the magnitude's rank in its bucket ((max(a, floor_bits)
// - floor_bits) mod 2^shift), the code is lowest + (r > threshold) for
// positive y and lowest + (r < threshold) for negative y -- one load and two
// integer comparisons, the same code as the search (codebook.cpp checks each
// entry at its bucket's ends and on both sides of its threshold; the code is
// monotonic in y).  A map whose midpoints lie too close for kMaxCodeBuckets
// buckets is searched instead (buckets == 0).
constexpr std::int32_t kMaxCodeBuckets = 8192;  // per sign
//
// A 16-value map (block4) has no table: its codes count the 15 midpoints
// below y, compared in registers (value[16..] and midpoint[15..] unused,
// midpoint[15..] = +inf so that the search still works).
struct Codebook {
    float value[256];
    float midpoint[256];  // [count - 1 ..] = +inf
    std::int32_t count = 256;  // 256 (block8) or 16 (block4) values
    bool linear16 = false;     // the 16 values (k + 1) / 16: codes by arithmetic (kernels/quantize.hpp)
    std::uint32_t floor_bits = 0;
    std::int32_t shift = 0;
    std::int32_t buckets = 0;
    // The code of the value nearest 0.0 (of 0.0 itself where the map holds it,
    // as every 8-bit map must): a NaN or inf element's, and a zero block's.
    std::uint8_t zero_code = 0;
    std::uint32_t bucket[2 * kMaxCodeBuckets];
};

// Where one stream of a tensor lives, and how it is stored.  For block8 and
// block4, `data` holds the codes, `absmax` one float per block (written by the
// step), `codebook` the map's.
struct Stream {
    void* data = nullptr;
    Storage storage = Storage::same;
    float* absmax = nullptr;
    const Codebook* codebook = nullptr;
};
// A stream the step only reads (the gradient).
struct ReadStream {
    const void* data = nullptr;
    Storage storage = Storage::same;
};

// The per-element constants, rounded from double to the working dtype once on
// the host.  fastadam.reference derives exactly the same values.
template <class T>
struct AdamConstants {
    T beta1;
    T one_minus_beta1;
    T beta2;
    T one_minus_beta2;
    T weight_decay;           // used by the L2 form only
    T lr_weight_decay;        // lr * weight_decay, used by the decoupled form only
    T step_size;              // lr / (1 - beta1^t)
    T inv_bias_correction2_sqrt;  // 1 / sqrt(1 - beta2^t)
    T eps;
    T inv_grad_scale;  // 1 / grad_scale (1 without loss scaling)
    T grad_sign;       // -0.0 to maximize (its one set bit flips the gradient's sign), else +0.0
};

// The same constants in both working dtypes, so one set serves a call that
// mixes float32 and float64 parameters.
struct AdamConstantsPair {
    AdamConstants<float> f32;
    AdamConstants<double> f64;
};

// One parameter's streams, `size` elements each, contiguous.  The param is
// in the working dtype `dtype`; max_exp_avg_sq.data is null unless the
// variant has kAmsgrad; model.data is null unless the updated param is also
// rounded (to nearest-even) into a float16/bfloat16 model copy.  Storages
// other than `same` are for float32 params only: a float16/bfloat16
// gradient, bfloat16 moments (max_exp_avg_sq stored as exp_avg_sq is), the
// model copy.
//
// With `rows` set, the tensor is instead a gather of rows from a table whose
// rows hold `row_size` elements (the streams point at the table): element e
// is column e % row_size of row rows[e / row_size], and that row's gradient
// is grad_rows[e / row_size] (grad.storage still applies); size = row count *
// row_size.  This is how a row-sparse gradient updates only the rows it names.
// How bfloat16 moments are rounded: to nearest-even, or stochastically --
// up with probability equal to the value's distance from the bfloat16 below,
// the random bits a counter-based hash of (key, element index), so that the
// result depends on neither thread count nor chunking, and a resumed run
// repeats an uninterrupted one.  The key is derived on the host from (seed,
// step, parameter) (see hyper.cpp's rounding_key).
struct StochasticRounding {
    bool on = false;
    std::uint32_t key_low = 0, key_high = 0;
    // Added to the element index: the place of the tensor's element 0 in the
    // array whose key this is (a rank's piece of a param in fastadam.distributed
    // draws the bits of those elements of the whole param).
    std::uint64_t first_element = 0;
};

struct AdamTensor {
    Stream param;
    ReadStream grad;
    Stream exp_avg;
    Stream exp_avg_sq;
    Stream max_exp_avg_sq;
    Stream model;
    std::int64_t size = 0;
    const AdamConstantsPair* constants = nullptr;
    DType dtype = DType::float32;
    std::uint8_t variant = 0;
    const std::int64_t* rows = nullptr;
    const void* const* grad_rows = nullptr;
    std::int64_t row_size = 0;
    StochasticRounding rounding;  // of bfloat16 moments (the model copy is always rounded to nearest-even)
};

// The memory-traffic twin of the Adam step: reads four arrays, writes three,
// with trivial arithmetic -- or, with `exact`, with exactly the correctly
// rounded division and square root per element that the bitwise contract
// requires of the step.  They are the benchmark's two speed limits.
struct ProbeTensor {
    void* a;        // read and written
    const void* b;  // read only (bfloat16 when bf16_b)
    void* c;        // read and written (bfloat16 when bf16_c)
    void* d;        // read and written (bfloat16 when bf16_d)
    std::int64_t size;
    DType dtype;
    // The mixed-precision pattern (float32 only): b is bfloat16, and e (a
    // bfloat16 array, when set) receives a's new value rounded to bfloat16.
    bool bf16_b = false;
    void* e = nullptr;
    // The bfloat16-moment patterns (float32 only): c and/or d are bfloat16,
    // read widened and written rounded to nearest-even.
    bool bf16_c = false;
    bool bf16_d = false;
    // The 8-bit state pattern (float32 only): c and d are one code byte per
    // element and one float32 per block of kQuantBlock elements (absmax_c,
    // absmax_d), read and written as the 8-bit step does.
    bool block8 = false;
    float* absmax_c = nullptr;
    float* absmax_d = nullptr;
    // c = c * h + b, d = d * h + b * b, a = a - c / (sqrt(d) + k) instead.
    bool exact = false;
};

// What one instruction-set level provides.  Each function updates the
// elements [begin, end) of one tensor.
struct KernelTable {
    const char* isa_name;
    void (*adam_range)(const AdamTensor& tensor, std::int64_t begin, std::int64_t end);
    void (*probe_range)(const ProbeTensor& tensor, std::int64_t begin, std::int64_t end);
    // Whether any gradient element of [begin, end), times inv_grad_scale, is
    // NaN or infinite (the check of skip_if_nonfinite).
    bool (*nonfinite_range)(const AdamTensor& tensor, std::int64_t begin, std::int64_t end);
    int vector_bytes;  // SIMD register width used by this level
    // Elements [begin, end) of a block8 stream of `size` elements (begin on a
    // block): float32 `values` into codes and absmax (quantize), or back
    // (dequantize) -- what the step does to its moments, on their own.
    void (*quantize_range)(const Codebook& book, const float* values, std::uint8_t* codes, float* absmax,
                           std::int64_t begin, std::int64_t end);
    void (*dequantize_range)(const Codebook& book, const std::uint8_t* codes, const float* absmax, float* values,
                             std::int64_t begin, std::int64_t end);
};

// Defined once per ISA level (see csrc/kernels/adam_kernels.cpp).
extern const KernelTable kernel_table_baseline;
#if defined(FASTADAM_HAVE_X86_LEVELS)
extern const KernelTable kernel_table_avx2;
extern const KernelTable kernel_table_avx512;
#endif

}  // namespace fastadam
