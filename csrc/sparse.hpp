// Row-sparse gradients: the checks of (indices, values) against a table,
// the gather of the rows they name, and fastadam.sparse_adam_step.
#pragma once

#include <Python.h>

#include <cstdint>

#include "arrays.hpp"
#include "hyper.hpp"
#include "rows.hpp"

namespace fastadam {

// The number of rows of a table and the elements per row.
void table_geometry(const CheckedArray& p, const ArgName& name, std::int64_t& rows, std::int64_t& row_size);

// values must have shape (len(indices),) + param.shape[1:] and param's dtype.
CheckedArray check_row_values(PyObject* values, const ArgName& values_name, PyObject* indices,
                              const ArgName& indices_name, const CheckedArray& p, const ArgName& p_name);

// The rows of `table` that a coalesced row-sparse gradient names, as one
// gather tensor (see AdamTensor::rows).
AdamTensor gather_tensor(const AdamTensor& table, const RowCoalescer& coalescer, const RowCoalescer::Rows& rows,
                         std::int64_t row_size);

// fastadam.sparse_adam_step: torch.optim.SparseAdam's lazy update of the rows
// of `param` named by `indices` (repeats summed first).
void sparse_adam_step(PyObject* param, PyObject* indices, PyObject* values, PyObject* exp_avg, PyObject* exp_avg_sq,
                      PyObject* step, const AdamHyper& hyper, int num_threads);

}  // namespace fastadam
