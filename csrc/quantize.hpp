// fastadam.quantize_blockwise and fastadam.dequantize_blockwise: the 8-bit
// state's conversion on its own, by the kernels the step uses (the same
// bits), multi-threaded by whole blocks.
#pragma once

#include <Python.h>

namespace fastadam {

// float32 `values` into `state` (a (codes, absmax, map) tuple): its codes and
// absmax are written.
void quantize_blockwise(PyObject* values, PyObject* state, int num_threads);
// `state` into the float32 array `out`, of the codes' shape.
void dequantize_blockwise(PyObject* state, PyObject* out, int num_threads);

}  // namespace fastadam
