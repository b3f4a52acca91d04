#include "parallel.hpp"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <system_error>
#include <thread>

#if defined(FASTADAM_HAVE_OPENMP)
#include <omp.h>
#include <pthread.h>
#endif

#include "fpmode.hpp"

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
    // Each thread computes in the default mode whatever its caller set (fpmode.hpp).
    const DefaultFloatingPointMode fp_mode;
    for (std::size_t s = from.segment; s < count && s <= to.segment; ++s) {
        const std::int64_t begin = s == from.segment ? from.offset : 0;
        const std::int64_t end = s == to.segment ? to.offset : starts[s + 1] - starts[s];
        if (begin < end) fn.call(fn.context, s, begin, end);
    }
}

#if defined(FASTADAM_HAVE_OPENMP)

void parallel_region(const std::int64_t* starts, std::size_t count, int threads, std::int64_t align, PieceFn fn) {
    const Position end_of_all{count, 0};
#pragma omp parallel num_threads(threads)
    {
        const int n = omp_get_num_threads();
        const int k = omp_get_thread_num();
        run_stretch(starts, count, boundary(starts, count, k, n, align),
                    k + 1 == n ? end_of_all : boundary(starts, count, k + 1, n, align), fn);
    }
}

// ---- fork() ------------------------------------------------------------------------------------------------
// GNU libgomp keeps the worker team of each thread that opened a parallel
// region in that thread's own state.  fork() copies the state into the child
// but not the workers, so in the child the thread that forked would wait
// forever for them at its next region; a thread created in the child starts
// with no team and works.  So a fork handler marks the forking thread, and in
// the child that thread hands its regions to a relay thread made there, on
// first use (one hand-over per multi-threaded call, a few microseconds; other
// threads, and the parent, are not affected).  The relay never runs Python.

thread_local bool t_team_lost_in_fork = false;

class Relay {
   public:
    // False when its thread cannot be made (no memory): then the caller runs the work itself.
    bool run(const std::int64_t* starts, std::size_t count, int threads, std::int64_t align, PieceFn fn) {
        std::unique_lock<std::mutex> lock(mutex_);
        if (!started_) {
            try {
                std::thread(&Relay::serve, this).detach();
            } catch (const std::system_error&) {
                return false;
            }
            started_ = true;
        }
        job_ = Job{starts, count, threads, align, fn};
        has_job_ = true;
        wake_.notify_one();
        wake_.wait(lock, [this] { return !has_job_; });
        return true;
    }

   private:
    struct Job {
        const std::int64_t* starts;
        std::size_t count;
        int threads;
        std::int64_t align;
        PieceFn fn;
    };
    void serve() {
        std::unique_lock<std::mutex> lock(mutex_);
        for (;;) {
            wake_.wait(lock, [this] { return has_job_; });
            parallel_region(job_.starts, job_.count, job_.threads, job_.align, job_.fn);
            has_job_ = false;
            wake_.notify_all();
        }
    }
    std::mutex mutex_;
    std::condition_variable wake_;
    Job job_{};
    bool has_job_ = false;
    bool started_ = false;
};

// Made in a forked child only.  A child of a child makes its own: the
// relay's thread, and whatever state its mutex was in, stay behind in the
// parent, so the old object is abandoned (never destroyed), not reused.
std::atomic<Relay*> g_relay{nullptr};
std::mutex g_relay_creation;

void after_fork_in_child() {
    t_team_lost_in_fork = true;
    g_relay.store(nullptr);
    new (&g_relay_creation) std::mutex();  // it may have been held by a thread that is gone
}

Relay& relay() {
    Relay* r = g_relay.load();
    if (r == nullptr) {
        std::lock_guard<std::mutex> lock(g_relay_creation);
        r = g_relay.load();
        if (r == nullptr) {
            r = new Relay();
            g_relay.store(r);
        }
    }
    return *r;
}

const bool g_fork_handler_registered = pthread_atfork(nullptr, nullptr, &after_fork_in_child) == 0;

#endif

}  // namespace

void for_each_piece(const std::int64_t* starts, std::size_t count, int threads, std::int64_t align,
                    PieceFn fn) {
#if defined(FASTADAM_HAVE_OPENMP)
    if (threads > 1) {
        if (!t_team_lost_in_fork) {
            parallel_region(starts, count, threads, align, fn);
            return;
        }
        if (relay().run(starts, count, threads, align, fn)) return;
    }
#else
    (void)threads;
    (void)align;
#endif
    run_stretch(starts, count, Position{0, 0}, Position{count, 0}, fn);
}

int max_threads() {
#if defined(FASTADAM_HAVE_OPENMP)
    // The processors this process may run on: libgomp counts the affinity
    // mask, with a system call each time, so it is read once.
    static const int processors = std::max(1, omp_get_num_procs());
    return processors;
#else
    return 1;
#endif
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

bool fork_handler_registered() {
#if defined(FASTADAM_HAVE_OPENMP)
    return g_fork_handler_registered;
#else
    return true;
#endif
}

}  // namespace fastadam
