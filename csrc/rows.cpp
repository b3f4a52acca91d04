#include "rows.hpp"

#include <cstring>
#include <limits>
#include <string>

#include "launch.hpp"
#include "parallel.hpp"

namespace fastadam {
namespace {

template <class I>
void read_rows(PyArrayObject* indices, const ArgName& name, std::int64_t num_rows, std::int64_t* out) {
    const auto n = PyArray_DIM(indices, 0);
    const auto stride = PyArray_STRIDE(indices, 0);
    const char* base = static_cast<const char*>(PyArray_DATA(indices));
    for (npy_intp i = 0; i < n; ++i) {
        I value;
        std::memcpy(&value, base + i * stride, sizeof value);  // any alignment, any stride
        const bool in_range = value >= 0 && static_cast<std::uint64_t>(value) < static_cast<std::uint64_t>(num_rows);
        if (!in_range)
            throw ArgValueError{name.str() + "[" + std::to_string(i) + "] = " + std::to_string(value) +
                                " is out of range for a table of " + std::to_string(num_rows) + " rows"};
        out[i] = static_cast<std::int64_t>(value);
    }
}

std::size_t dtype_size(DType d) { return d == DType::float32 ? 4 : 8; }

template <class T>
void sum_rows(const T* values, std::int64_t row_size, const std::int64_t* occurrences, std::size_t count, T* out,
              std::int64_t begin, std::int64_t end) {
    // The first occurrence is the start (not 0 + x, which would turn -0 into
    // +0); the others are added in the order they appear.
    const T* first = values + occurrences[0] * row_size;
    for (std::int64_t j = begin; j < end; ++j) out[j] = first[j];
    for (std::size_t k = 1; k < count; ++k) {
        const T* next = values + occurrences[k] * row_size;
        for (std::int64_t j = begin; j < end; ++j) out[j] += next[j];
    }
}

}  // namespace

void RowCoalescer::clear() {
    rows_.clear();
    grads_.clear();
    entries_.clear();
    repeated_.clear();
    occurrences_.clear();
}

RowCoalescer::Rows RowCoalescer::add(PyArrayObject* indices, const ArgName& name, std::int64_t num_rows,
                                     const void* values, std::int64_t row_size, DType dtype) {
    if (PyArray_NDIM(indices) != 1 || !PyArray_ISINTEGER(indices) || PyArray_ISBOOL(indices))
        throw ArgTypeError{name.str() + ": expected a 1-D array of integer row numbers"};
    const npy_intp n = PyArray_DIM(indices, 0);
    if (n >= std::numeric_limits<std::int32_t>::max())
        throw ArgValueError{name.str() + ": more than 2^31 indices in one gradient"};

    index_rows_.resize(static_cast<std::size_t>(n));
    switch (PyArray_ITEMSIZE(indices) * (PyArray_ISUNSIGNED(indices) ? -1 : 1)) {
        case 1: read_rows<std::int8_t>(indices, name, num_rows, index_rows_.data()); break;
        case 2: read_rows<std::int16_t>(indices, name, num_rows, index_rows_.data()); break;
        case 4: read_rows<std::int32_t>(indices, name, num_rows, index_rows_.data()); break;
        case 8: read_rows<std::int64_t>(indices, name, num_rows, index_rows_.data()); break;
        case -1: read_rows<std::uint8_t>(indices, name, num_rows, index_rows_.data()); break;
        case -2: read_rows<std::uint16_t>(indices, name, num_rows, index_rows_.data()); break;
        case -4: read_rows<std::uint32_t>(indices, name, num_rows, index_rows_.data()); break;
        case -8: read_rows<std::uint64_t>(indices, name, num_rows, index_rows_.data()); break;
        default: throw ArgTypeError{name.str() + ": unsupported integer dtype"};
    }

    // Group repeats: each row gets a slot, numbered by first appearance.  The
    // row -> slot table spans the whole table but is touched only at the rows
    // present, and reset after, so the cost follows the gradient, not the table.
    if (slot_of_row_.size() < static_cast<std::size_t>(num_rows))
        slot_of_row_.resize(static_cast<std::size_t>(num_rows), -1);
    const std::size_t entry = entries_.size();
    entries_.push_back({values, row_size, dtype});
    const std::size_t first = rows_.size();
    const std::size_t row_bytes = static_cast<std::size_t>(row_size) * dtype_size(dtype);
    index_slots_.resize(static_cast<std::size_t>(n));
    counts_.clear();
    constexpr npy_intp kPrefetchDistance = 16;  // the table is large and the rows random: hide the misses
    for (npy_intp i = 0; i < n; ++i) {
        if (i + kPrefetchDistance < n)
            __builtin_prefetch(&slot_of_row_[static_cast<std::size_t>(index_rows_[static_cast<std::size_t>(i + kPrefetchDistance)])]);
        const std::int64_t r = index_rows_[static_cast<std::size_t>(i)];
        std::int32_t s = slot_of_row_[static_cast<std::size_t>(r)];
        if (s < 0) {
            s = static_cast<std::int32_t>(counts_.size());
            slot_of_row_[static_cast<std::size_t>(r)] = s;
            rows_.push_back(r);
            grads_.push_back(static_cast<const char*>(values) + static_cast<std::size_t>(i) * row_bytes);
            counts_.push_back(0);
        }
        ++counts_[static_cast<std::size_t>(s)];
        index_slots_[static_cast<std::size_t>(i)] = s;
    }
    for (std::size_t k = first; k < rows_.size(); ++k) slot_of_row_[static_cast<std::size_t>(rows_[k])] = -1;

    // Occurrence lists of the repeated rows, in index order.  counts_ turns
    // into each repeated slot's write cursor (-1 for rows seen once).
    for (std::size_t s = 0; s < counts_.size(); ++s) {
        if (counts_[s] > 1) {
            const std::size_t begin = occurrences_.size();
            const std::size_t end = begin + static_cast<std::size_t>(counts_[s]);
            repeated_.push_back({first + s, entry, begin, end, 0});
            occurrences_.resize(end);
            counts_[s] = static_cast<std::int64_t>(begin);
        } else {
            counts_[s] = -1;
        }
    }
    for (npy_intp i = 0; i < n; ++i) {
        std::int64_t& cursor = counts_[static_cast<std::size_t>(index_slots_[static_cast<std::size_t>(i)])];
        if (cursor >= 0) occurrences_[static_cast<std::size_t>(cursor++)] = i;
    }
    return {first, rows_.size() - first};
}

void RowCoalescer::sum_repeats(int threads) {
    if (repeated_.empty()) return;
    // Lay out the sums (8-byte aligned), then point each repeated row at its sum.
    std::size_t bytes = 0;
    scratch_starts_.resize(repeated_.size() + 1);
    scratch_starts_[0] = 0;
    for (std::size_t k = 0; k < repeated_.size(); ++k) {
        const Entry& e = entries_[repeated_[k].entry];
        repeated_[k].scratch_offset = bytes;
        bytes += (static_cast<std::size_t>(e.row_size) * dtype_size(e.dtype) + 7) / 8 * 8;
        scratch_starts_[k + 1] = scratch_starts_[k] + e.row_size;
    }
    scratch_.resize(bytes / 8);
    char* scratch = reinterpret_cast<char*>(scratch_.data());

    struct Context {
        RowCoalescer* self;
        char* scratch;
    } context{this, scratch};
    auto piece = [](void* ctx, std::size_t k, std::int64_t begin, std::int64_t end) {
        auto* c = static_cast<Context*>(ctx);
        const Repeated& r = c->self->repeated_[k];
        const Entry& e = c->self->entries_[r.entry];
        const std::int64_t* occ = c->self->occurrences_.data() + r.occurrences_begin;
        const std::size_t count = r.occurrences_end - r.occurrences_begin;
        void* out = c->scratch + r.scratch_offset;
        if (e.dtype == DType::float32)
            sum_rows(static_cast<const float*>(e.values), e.row_size, occ, count, static_cast<float*>(out), begin, end);
        else
            sum_rows(static_cast<const double*>(e.values), e.row_size, occ, count, static_cast<double*>(out), begin,
                     end);
    };
    run_in_pieces(scratch_starts_.data(), repeated_.size(), threads, PieceFn{&context, piece});
    for (const Repeated& r : repeated_) grads_[r.unique] = scratch + r.scratch_offset;
}

}  // namespace fastadam
