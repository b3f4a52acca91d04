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
    // A hash-table bucket: a row and its slot (-1 = empty).  Rows fit 32 bits
    // in any table of up to 2^32 rows, which halves the bucket.
    template <class Key>
    struct Bucket {
        Key row;
        std::int32_t slot;
    };
    // Everything kept between calls is sized by the indices, never by the
    // table: the largest need of the last few steps (see trim()).
    struct Needs {
        std::size_t indices = 0, uniques = 0, direct = 0, hashed32 = 0, hashed64 = 0;
        std::size_t rows = 0, entries = 0, repeated = 0, occurrences = 0, scratch = 0;
    };

    // Numbers each index's row by first appearance (index_slots_, counts_,
    // rows_, grads_), looking rows up in `slots`, which it leaves all empty.
    template <class Slots>
    void group(Slots slots, std::size_t n, const char* values, std::size_t row_bytes);
    void note_step_needs();
    void trim();

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
    std::vector<std::int32_t> index_slots_;
    std::vector<std::int64_t> counts_;
    // Row -> slot lookups, all empty between adds: a direct table (one slot
    // per table row) when the table is small next to the gradient, else an
    // open-addressing hash table of a power-of-two size about 2-4x the indices.
    std::vector<std::int32_t> slot_of_row_;  // -1 = not seen
    std::vector<Bucket<std::uint32_t>> buckets32_;
    std::vector<Bucket<std::uint64_t>> buckets64_;
    Needs window_;  // the largest needs since the last trim()
    Needs step_;    // the current step's per-add needs
    unsigned steps_since_trim_ = 0;
};

}  // namespace fastadam
