#include "quantize.hpp"

#include "arrays.hpp"
#include "dispatch.hpp"
#include "launch.hpp"

namespace fastadam {
namespace {

// One conversion: pieces of whole blocks (the pool's pieces start on
// multiples of kPieceAlign, a multiple of kQuantBlock).
struct Conversion {
    const Codebook* book;
    float* values;
    std::uint8_t* codes;
    float* absmax;
    bool quantize;
};

void convert(const Conversion& c, std::int64_t size, int num_threads) {
    const std::int64_t starts[] = {0, size};
    auto piece = [](void* context, std::size_t, std::int64_t begin, std::int64_t end) {
        const auto* c = static_cast<const Conversion*>(context);
        if (c->quantize) kernels().quantize_range(*c->book, c->values, c->codes, c->absmax, begin, end);
        else kernels().dequantize_range(*c->book, c->codes, c->absmax, c->values, begin, end);
    };
    run_in_pieces(starts, 1, num_threads, PieceFn{const_cast<Conversion*>(&c), piece}, size);
}

// Checks the float32 array and the state (and that they do not overlap),
// then converts: values into state (quantize) or state into values.
void convert_checked(PyObject* values, const char* values_name, PyObject* state, bool quantize, int num_threads) {
    const ArgName v_name{values_name, -1}, s_name{"state", -1};
    const Access values_access = quantize ? Access::read : Access::write;
    const Access state_access = quantize ? Access::write : Access::read;
    const CheckedArray array = check_float_array(values, v_name, values_access);
    if (array.dtype != DType::float32)
        throw ArgTypeError{std::string(values_name) + ": dtype must be float32, got " + dtype_name(array.dtype)};
    const CheckedMoment m = check_quantized_state(state, s_name, array, v_name, state_access);
    OverlapCheck overlap;
    overlap.add(array, v_name, values_access);
    overlap.add(m.array, s_name, state_access);
    overlap.add(m.absmax, s_name, state_access);
    overlap.add(m.map, s_name, Access::read);
    overlap.check();
    convert({m.codebook.get(), static_cast<float*>(array.data), static_cast<std::uint8_t*>(PyArray_DATA(m.array)),
             static_cast<float*>(PyArray_DATA(m.absmax)), quantize},
            array.size, num_threads);
}

}  // namespace

void quantize_blockwise(PyObject* values, PyObject* state, int num_threads) {
    convert_checked(values, "values", state, true, num_threads);
}

void dequantize_blockwise(PyObject* state, PyObject* out, int num_threads) {
    convert_checked(out, "out", state, false, num_threads);
}

}  // namespace fastadam
