// Running a kernel over a list of tensors: the thread count, the serial
// cut-off for small calls, and releasing the GIL.  ISA-neutral host code.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernel_api.hpp"
#include "parallel.hpp"

namespace fastadam {

// Below this many elements in a whole call, the work runs on the calling
// thread: handing chunks to a second thread costs more than it saves.  Per
// dtype, where two threads start to win on back-to-back calls (measured with
// `benchmarks/bench_step.py --threshold`): a float64 element is twice the
// bytes and twice the divider time of a float32 one.  A call that mixes
// dtypes counts each element as its dtype's share of the cut-off.  (Calls in
// a training loop, where the workers are asleep, are left to the pool's own
// learning: parallel.cpp.)
constexpr std::int64_t kMinParallelElementsFloat32 = std::int64_t(1) << 15;
constexpr std::int64_t kMinParallelElementsFloat64 = std::int64_t(1) << 14;
static_assert(kMinParallelElementsFloat32 % kMinParallelElementsFloat64 == 0, "float64 counts as a whole multiple");
constexpr std::int64_t kFloat64Weight = kMinParallelElementsFloat32 / kMinParallelElementsFloat64;
// Each extra thread must get at least this many elements.
constexpr std::int64_t kMinElementsPerThread = std::int64_t(1) << 14;
// Below this, keeping the GIL is cheaper than the release/acquire pair
// (NumPy's ufuncs draw the same line, at 500 elements).
constexpr std::int64_t kReleaseGilElements = std::int64_t(1) << 13;

// The number of threads a call of `total` elements runs on; `weight` is its
// size in float32 elements' worth of work (see kMinParallelElementsFloat32).
int threads_for(std::int64_t total, std::int64_t weight, int requested);

// for_each_piece with the thread count from threads_for(), the GIL released
// for large calls.  `starts` as for for_each_piece.
void run_in_pieces(const std::int64_t* starts, std::size_t count, int requested_threads, PieceFn fn,
                   std::int64_t weight);

void run_adam(const AdamTensor* tensors, std::size_t count, int requested_threads);
// run_adam, unless skip_if_nonfinite and a gradient holds a NaN or inf
// (checked first, before anything is written): then returns false.
bool run_adam_step(const AdamTensor* tensors, std::size_t count, int requested_threads, bool skip_if_nonfinite);
// Whether any gradient element times inv_grad_scale is NaN or infinite.
bool any_nonfinite_grad(const AdamTensor* tensors, std::size_t count, int requested_threads);
void run_probe(const ProbeTensor* tensors, std::size_t count, int requested_threads);

}  // namespace fastadam
