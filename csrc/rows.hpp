// Row-sparse gradients: (indices, values) pairs, where values[i] is the
// gradient of row indices[i] of a table.  RowCoalescer checks the indices and
// merges repeated rows (summing their values), as PyTorch's coalesce() does
// for a sparse gradient; it knows nothing about Adam.
#pragma once

#include <cstdint>
#include <vector>

#include "arrays.hpp"

namespace fastadam {

class RowCoalescer {
   public:
    // One gradient's unique rows, in the order of their first appearance.
    struct Rows {
        std::size_t first, count;  // into row() / grad()
    };

    void clear();

    // Reads `indices` (a 1-D integer array, any stride) and groups repeats.
    // Throws ArgTypeError / ArgValueError naming the first bad index; nothing
    // outside this object is written.  `values` holds len(indices) rows of
    // `row_size` elements of `dtype`.
    Rows add(PyArrayObject* indices, const ArgName& name, std::int64_t num_rows, const void* values,
             std::int64_t row_size, DType dtype);

    // Sums the values of repeated rows, on up to `threads` threads.  Each sum
    // runs in the order the rows appear in `indices`, so the result does not
    // depend on the thread count.  After this, grad(k) is the coalesced
    // gradient of row(k): the values row itself when the row appears once.
    void sum_repeats(int threads);

    // The row numbers and coalesced gradient rows from position k on.
    const std::int64_t* rows(std::size_t k) const { return rows_.data() + k; }
    const void* const* grads(std::size_t k) const { return grads_.data() + k; }
    std::size_t size() const { return rows_.size(); }

   private:
    struct Repeated {        // a row that appears more than once
        std::size_t unique;  // its position in rows_ / grads_
        std::size_t entry;   // which add() it came from
        std::size_t occurrences_begin, occurrences_end;  // into occurrences_
        std::size_t scratch_offset;                      // bytes into scratch_
    };
    struct Entry {
        const void* values;
        std::int64_t row_size;
        DType dtype;
    };
    std::vector<std::int64_t> rows_;
    std::vector<const void*> grads_;
    std::vector<Entry> entries_;
    std::vector<Repeated> repeated_;
    std::vector<std::int64_t> occurrences_;  // positions in indices, grouped by repeated row
    std::vector<std::int64_t> scratch_starts_;
    std::vector<double> scratch_;            // the sums (double storage keeps float64 aligned)
    // Per-add scratch, reused: the row of each index, the unique position of
    // each index, the count of each unique row.
    std::vector<std::int64_t> index_rows_;
    std::vector<std::int32_t> slot_of_row_;  // -1 = not seen; reset after each add
    std::vector<std::int32_t> index_slots_;
    std::vector<std::int64_t> counts_;
};

}  // namespace fastadam
