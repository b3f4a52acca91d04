// Work splitting for element-wise kernels over a list of arrays.
//
// Nothing here knows about Adam: it sees a list of segment lengths and calls
// back with (segment, begin, end) pieces.  The whole list is covered by one
// OpenMP parallel region whose threads each take one contiguous, equally long
// stretch of the concatenated elements, so a call with a thousand small arrays
// costs one fork/join, not a thousand.
#pragma once

#include <cstddef>
#include <cstdint>

namespace fastadam {

// A non-owning callable reference (no allocation, no std::function).
struct PieceFn {
    void* context;
    void (*call)(void* context, std::size_t segment, std::int64_t begin, std::int64_t end);
};

// `starts` holds count + 1 prefix sums of the segment lengths (starts[0] = 0,
// starts[count] = total).  Piece boundaries inside a segment fall on multiples
// of `align` elements from its start, so neighbouring threads do not share a
// cache line of a 64-byte-aligned array.  threads <= 1 runs on the caller.
void for_each_piece(const std::int64_t* starts, std::size_t count, int threads, std::int64_t align,
                    PieceFn fn);

// The thread count a call uses when it does not name one: set_num_threads()'s
// value if set, otherwise OpenMP's own (OMP_NUM_THREADS, omp_set_num_threads,
// threadpoolctl).  1 without OpenMP.
int default_num_threads();
void set_num_threads(int threads);  // 0 restores "follow OpenMP"
int num_threads_override();

bool have_openmp();

}  // namespace fastadam
