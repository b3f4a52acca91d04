// Work splitting for element-wise kernels over a list of arrays.
//
// Nothing here knows about Adam: it sees a list of segment lengths and calls
// back with (segment, begin, end) pieces.  The concatenated elements of the
// whole list are cut into chunks that the caller and a small pool of workers
// claim as they arrive (parallel.cpp says why not OpenMP), so a call with a
// thousand small arrays costs one hand-out, not a thousand.
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
// Every thread runs its pieces in the default floating-point mode (fpmode.hpp),
// and a forked child's steps work (parallel.cpp explains how).  `fn` must not
// throw.
void for_each_piece(const std::int64_t* starts, std::size_t count, int threads, std::int64_t align,
                    PieceFn fn);

// The most threads a call runs on: the processors this process may use (read
// once, at the first call that may go parallel).  More never speeds up a
// memory-bound step, and each one costs a stack, so a larger request
// (num_threads=4096) is capped.
int max_threads();

// The thread count a call uses when it does not name one: set_num_threads()'s
// value if set, otherwise OpenMP's own (OMP_NUM_THREADS, omp_set_num_threads,
// threadpoolctl).  1 without OpenMP.
int default_num_threads();
void set_num_threads(int threads);  // 0 restores "follow OpenMP"
int num_threads_override();

// What the pool has done so far in this process (for benchmarks): calls
// run with workers, calls kept on the caller by the pool's learning
// (parallel.cpp), and the chunks the callers and the workers ran.
struct PoolStats {
    std::int64_t parallel_calls = 0;
    std::int64_t rested_calls = 0;
    std::int64_t caller_chunks = 0;
    std::int64_t worker_chunks = 0;
};
PoolStats pool_stats();

bool have_openmp();
// Whether the fork handler that keeps steps working in forked children is in place.
bool fork_handler_registered();

}  // namespace fastadam
