#include "parallel.hpp"

#include <algorithm>
#include <atomic>

#if defined(FASTADAM_HAVE_OPENMP)
#include <omp.h>
#endif

namespace fastadam {
namespace {

std::atomic<int> g_num_threads_override{0};

struct Position {
    std::size_t segment;  // == count means "the end"
    std::int64_t offset;
};

// Where the k-th of n equal stretches of the concatenated elements begins.
Position boundary(const std::int64_t* starts, std::size_t count, int k, int n, std::int64_t align) {
    const std::int64_t total = starts[count];
    const std::int64_t global = static_cast<std::int64_t>((static_cast<__int128>(total) * k) / n);
    if (global >= total) return {count, 0};
    // The last segment whose start is <= global: the one containing it.
    const std::int64_t* it = std::upper_bound(starts, starts + count + 1, global);
    const auto segment = static_cast<std::size_t>(it - starts - 1);
    const std::int64_t offset = global - starts[segment];
    return {segment, offset / align * align};
}

void run_stretch(const std::int64_t* starts, std::size_t count, Position from, Position to, PieceFn fn) {
    for (std::size_t s = from.segment; s < count && s <= to.segment; ++s) {
        const std::int64_t begin = s == from.segment ? from.offset : 0;
        const std::int64_t end = s == to.segment ? to.offset : starts[s + 1] - starts[s];
        if (begin < end) fn.call(fn.context, s, begin, end);
    }
}

}  // namespace

void for_each_piece(const std::int64_t* starts, std::size_t count, int threads, std::int64_t align,
                    PieceFn fn) {
    const Position end_of_all{count, 0};
#if defined(FASTADAM_HAVE_OPENMP)
    if (threads > 1) {
#pragma omp parallel num_threads(threads)
        {
            const int n = omp_get_num_threads();
            const int k = omp_get_thread_num();
            run_stretch(starts, count, boundary(starts, count, k, n, align),
                        k + 1 == n ? end_of_all : boundary(starts, count, k + 1, n, align), fn);
        }
        return;
    }
#else
    (void)threads;
    (void)align;
#endif
    run_stretch(starts, count, Position{0, 0}, end_of_all, fn);
}

int default_num_threads() {
    const int forced = g_num_threads_override.load(std::memory_order_relaxed);
    if (forced > 0) return forced;
#if defined(FASTADAM_HAVE_OPENMP)
    return omp_get_max_threads();
#else
    return 1;
#endif
}

void set_num_threads(int threads) { g_num_threads_override.store(threads, std::memory_order_relaxed); }
int num_threads_override() { return g_num_threads_override.load(std::memory_order_relaxed); }

bool have_openmp() {
#if defined(FASTADAM_HAVE_OPENMP)
    return true;
#else
    return false;
#endif
}

}  // namespace fastadam
