#include "rows.hpp"

#include <algorithm>
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

// At most this many table rows per index, a direct row -> slot table (4 bytes
// a row, so at most 16 bytes an index: no more than the hash table's 16-32)
// is used: it needs no probing.  Up to here it was as fast as the hash table
// or faster in benchmarks/bench_coalesce.py (10^5 and 10^6 indices); beyond,
// its first call fills more memory than the hash table would.
constexpr std::uint64_t kDirectRowsPerIndex = 4;

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

// Emptying a lookup after an add: one sequential sweep of the whole lookup
// when it has at most this many entries per row found (a sweep costs about a
// nanosecond an entry, a lookup of a row at random tens of nanoseconds), else
// one write per row found.
constexpr std::size_t kSweepPerRow = 16;

// The lookups group() uses; slot -1 means the row has not been seen.
struct DirectSlots {
    std::int32_t* slots;  // one per table row
    std::size_t size;
    void prefetch(std::int64_t row) const { __builtin_prefetch(slots + row); }
    std::int32_t& find(std::int64_t row) const { return slots[row]; }
    // Empties the slots of `rows` (the rows found since the last clear).
    void clear(const std::int64_t* rows, std::size_t count) const {
        if (size <= kSweepPerRow * count) {
            std::fill(slots, slots + size, -1);
            return;
        }
        for (std::size_t k = 0; k < count; ++k) slots[rows[k]] = -1;
    }
};

template <class Bucket>
struct HashedSlots {
    Bucket* buckets;  // a power of two of them, at least twice the indices
    std::uint64_t mask;
    int shift;
    std::uint64_t home(std::int64_t row) const {
        // Fibonacci hashing: the top bits of the product, so that consecutive
        // or evenly strided rows (the common patterns) spread over the table.
        return (static_cast<std::uint64_t>(row) * 0x9E3779B97F4A7C15ull) >> shift;
    }
    void prefetch(std::int64_t row) const { __builtin_prefetch(buckets + home(row)); }
    void clear(const std::int64_t* rows, std::size_t count) const {
        if (mask + 1 <= kSweepPerRow * count) {
            std::fill(buckets, buckets + mask + 1, Bucket{0, -1});
            return;
        }
        // Last-in first-out, so that every probe path a row took is still
        // intact when it is looked up again.
        constexpr std::size_t kPrefetchDistance = 16;
        for (std::size_t k = count; k-- > 0;) {
            if (k >= kPrefetchDistance) prefetch(rows[k - kPrefetchDistance]);
            find(rows[k]) = -1;
        }
    }
    // Linear probing: the slot of `row`, or the empty bucket where it goes
    // (claimed for it, its slot still -1 for the caller to fill).
    std::int32_t& find(std::int64_t row) const {
        const auto key = static_cast<decltype(Bucket::row)>(row);
        for (std::uint64_t b = home(row);; b = (b + 1) & mask) {
            Bucket& x = buckets[b];
            if (x.slot < 0) {
                x.row = key;
                return x.slot;
            }
            if (x.row == key) return x.slot;
        }
    }
};

template <class Bucket>
HashedSlots<Bucket> hashed_slots(std::vector<Bucket>& buckets, std::size_t n) {
    int bits = 4;
    while ((std::size_t{1} << bits) < 2 * n) ++bits;  // load factor at most 1/2
    const std::size_t capacity = std::size_t{1} << bits;
    if (buckets.size() < capacity) buckets.resize(capacity, Bucket{0, -1});
    // A larger table kept from an earlier call is all empty too; only its
    // first `capacity` buckets are used, so the lookups stay as compact.
    return {buckets.data(), capacity - 1, 64 - bits};
}

// Scratch is kept between calls, so a steady workload allocates nothing, but
// not forever at the size of one large call: every kTrimWindow steps, a
// buffer holding more than kTrimSlack times the most any of those steps used
// (and more than kTrimFloorBytes) is reallocated to that size.  A workload
// that alternates large and small steps within a window keeps its buffers
// (a steady one never reallocates); one that shrinks for good gives the
// memory back within two windows (the first may still hold the large step).
constexpr unsigned kTrimWindow = 32;
constexpr std::size_t kTrimSlack = 4;
constexpr std::size_t kTrimFloorBytes = std::size_t{256} << 10;

template <class T>
void trim_to(std::vector<T>& v, std::size_t need) {
    if (v.capacity() * sizeof(T) <= kTrimFloorBytes || v.capacity() <= kTrimSlack * need) return;
    // Kept elements keep their values: the lookup tables must stay all empty.
    std::vector<T> smaller(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(std::min(v.size(), need)));
    v.swap(smaller);
}

}  // namespace

void RowCoalescer::clear() {
    note_step_needs();
    rows_.clear();
    grads_.clear();
    entries_.clear();
    repeated_.clear();
    occurrences_.clear();
    if (++steps_since_trim_ >= kTrimWindow) trim();  // after clearing: nothing stale is copied
}

// The step that just ended (the vectors still hold its sizes) into the window.
void RowCoalescer::note_step_needs() {
    Needs& w = window_;
    w.indices = std::max(w.indices, step_.indices);
    w.uniques = std::max(w.uniques, step_.uniques);
    w.direct = std::max(w.direct, step_.direct);
    w.hashed32 = std::max(w.hashed32, step_.hashed32);
    w.hashed64 = std::max(w.hashed64, step_.hashed64);
    w.rows = std::max(w.rows, rows_.size());
    w.entries = std::max(w.entries, entries_.size());
    w.repeated = std::max(w.repeated, repeated_.size());
    w.occurrences = std::max(w.occurrences, occurrences_.size());
    w.scratch = std::max(w.scratch, scratch_.size());
    step_ = Needs{};
}

void RowCoalescer::trim() {
    const Needs& w = window_;
    trim_to(rows_, w.rows);
    trim_to(grads_, w.rows);
    trim_to(entries_, w.entries);
    trim_to(repeated_, w.repeated);
    trim_to(scratch_starts_, w.repeated + 1);
    trim_to(occurrences_, w.occurrences);
    trim_to(scratch_, w.scratch);
    trim_to(index_rows_, w.indices);
    trim_to(index_slots_, w.indices);
    trim_to(counts_, w.uniques);
    trim_to(slot_of_row_, w.direct);
    trim_to(buckets32_, w.hashed32);
    trim_to(buckets64_, w.hashed64);
    window_ = Needs{};
    steps_since_trim_ = 0;
}

template <class Slots>
void RowCoalescer::group(Slots slots, std::size_t n, const char* values, std::size_t row_bytes) {
    const std::size_t first = rows_.size();
    const std::int64_t* index_rows = index_rows_.data();
    constexpr std::size_t kPrefetchDistance = 16;  // lookups land at random: hide the misses
    for (std::size_t i = 0; i < n; ++i) {
        if (i + kPrefetchDistance < n) slots.prefetch(index_rows[i + kPrefetchDistance]);
        const std::int64_t r = index_rows[i];
        std::int32_t& s = slots.find(r);
        if (s < 0) {
            s = static_cast<std::int32_t>(counts_.size());
            rows_.push_back(r);
            grads_.push_back(values + i * row_bytes);
            counts_.push_back(0);
        }
        ++counts_[static_cast<std::size_t>(s)];
        index_slots_[i] = s;
    }
    slots.clear(rows_.data() + first, rows_.size() - first);
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
    // row -> slot lookup is sized by the indices, not the table (whose rows
    // may be 10^8 while a step names a few): a direct table only when the
    // table has at most kDirectRowsPerIndex rows per index, a hash table else.
    const auto count = static_cast<std::size_t>(n);
    const auto table_rows = static_cast<std::uint64_t>(num_rows);
    const std::size_t entry = entries_.size();
    entries_.push_back({values, row_size, dtype});
    const std::size_t first = rows_.size();
    const std::size_t row_bytes = static_cast<std::size_t>(row_size) * dtype_size(dtype);
    index_slots_.resize(count);
    counts_.clear();
    const char* bytes = static_cast<const char*>(values);
    step_.indices = std::max(step_.indices, count);
    if (table_rows <= kDirectRowsPerIndex * static_cast<std::uint64_t>(count)) {
        if (slot_of_row_.size() < table_rows) slot_of_row_.resize(static_cast<std::size_t>(table_rows), -1);
        step_.direct = std::max(step_.direct, static_cast<std::size_t>(table_rows));
        group(DirectSlots{slot_of_row_.data(), static_cast<std::size_t>(table_rows)}, count, bytes, row_bytes);
    } else if (table_rows <= std::uint64_t{1} << 32) {
        const auto slots = hashed_slots(buckets32_, count);
        step_.hashed32 = std::max(step_.hashed32, static_cast<std::size_t>(slots.mask + 1));
        group(slots, count, bytes, row_bytes);
    } else {
        const auto slots = hashed_slots(buckets64_, count);
        step_.hashed64 = std::max(step_.hashed64, static_cast<std::size_t>(slots.mask + 1));
        group(slots, count, bytes, row_bytes);
    }
    step_.uniques = std::max(step_.uniques, counts_.size());

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
    // Summing rows reads one array and writes one: lighter than a step, so counted as float32 elements.
    run_in_pieces(scratch_starts_.data(), repeated_.size(), threads, PieceFn{&context, piece},
                  scratch_starts_[repeated_.size()]);
    for (const Repeated& r : repeated_) grads_[r.unique] = scratch + r.scratch_offset;
}

}  // namespace fastadam
