#include "parallel.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <new>
#include <system_error>
#include <thread>
#include <vector>

#include <pthread.h>
#include <sched.h>
#if defined(FASTADAM_HAVE_OPENMP)
#include <omp.h>
#endif

#include "fpmode.hpp"

// Why not an OpenMP parallel region (it was one until issue 9)
// -------------------------------------------------------------
// Inside a training loop a step shares the cores with NumPy's BLAS and
// PyTorch, whose threads spin for a while after each matrix product.  An
// OpenMP region cannot end before every thread of its team has arrived at the
// closing barrier, so one worker that the kernel scheduler has not run yet (its
// core busy with a spinning BLAS thread) holds the whole call: on two cores the
// main job's step took 5.5 ms by default against 0.2 ms on one thread.  And
// libgomp's own workers spin for milliseconds after each region, taking the
// core from the BLAS that runs next; the setting that stops it
// (GOMP_SPINCOUNT / OMP_WAIT_POLICY) is read from the environment once, when
// libgomp loads, and would change every other OpenMP library in the process.
//
// So a call runs on this small pool instead.  Its work is cut into chunks that
// threads claim as they arrive: the caller starts at once and takes whatever
// the workers have not claimed, and it waits only for chunks a worker is
// actually running, never for a worker to wake up.  Each participant starts on
// its own "home" share of the chunks (the same share every call, which keeps a
// thread's part of an in-cache model in its own cache) and then helps with the
// others'.  Workers spin only briefly after a call (enough to catch the next
// call of a loop over parameters) and then sleep; they keep off the caller's
// processor (Pool::avoid_callers_cpu), and the pool stops waking them for calls
// of a size where they have not paid for themselves lately (Pool::learn).
// OpenMP still provides the thread-count settings (OMP_NUM_THREADS,
// omp_set_num_threads, threadpoolctl).

namespace fastadam {
namespace {

std::atomic<int> g_num_threads_override{0};

using Clock = std::chrono::steady_clock;

// A worker keeps polling for the next call this long before it sleeps.
constexpr auto kWorkerSpin = std::chrono::microseconds(50);
// The caller polls for the workers' last chunks this long before it sleeps.
constexpr auto kCallerSpin = std::chrono::microseconds(50);
// The most calls in a row of one size class that run on the caller alone
// after workers that did not pay for themselves (see Pool::learn).
constexpr int kMostRestingCalls = 256;
// Chunks per participant: enough to rebalance when one is late, few enough
// that claiming them costs nothing measurable.
constexpr std::int64_t kChunksPerSeat = 4;
// No chunk is smaller than this many elements (a few microseconds of work).
constexpr std::int64_t kMinChunkElements = std::int64_t(1) << 13;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
}

// Polls `done()` for about `limit`, pausing between polls; true if it became true.
template <class Done>
bool spin_until(Done done, std::chrono::microseconds limit) {
    const auto deadline = Clock::now() + limit;
    for (;;) {
        for (int i = 0; i < 64; ++i) {
            if (done()) return true;
            cpu_relax();
        }
        if (Clock::now() >= deadline) return done();
    }
}

struct Position {
    std::size_t segment;  // == count means "the end"
    std::int64_t offset;
};

// Where element `global` of the concatenation lies, moved back to a multiple
// of `align` from its segment's start.
Position position_of(const std::int64_t* starts, std::size_t count, std::int64_t global, std::int64_t align) {
    if (global >= starts[count]) return {count, 0};
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

// The whole call on the calling thread, in the default floating-point mode (fpmode.hpp).
void run_on_caller(const std::int64_t* starts, std::size_t count, PieceFn fn) {
    const DefaultFloatingPointMode fp_mode;
    run_stretch(starts, count, Position{0, 0}, Position{count, 0}, fn);
}

// One call's work: `chunks` chunks of `chunk_elements` consecutive elements
// (the last one shorter), over `seats` participants; seat 0 is the caller.
struct Job {
    const std::int64_t* starts;
    std::size_t count;
    std::int64_t align;
    PieceFn fn;
    std::int64_t chunk_elements;
    std::int64_t chunks;
    int seats;

    // Seat s's home share: chunks [first_chunk(s), first_chunk(s + 1)).
    std::int64_t first_chunk(int seat) const { return chunks * seat / seats; }

    void run_chunk(std::int64_t chunk) const {
        const std::int64_t begin = chunk * chunk_elements;
        run_stretch(starts, count, position_of(starts, count, begin, align),
                    position_of(starts, count, begin + chunk_elements, align), fn);
    }
};

// A seat's claim counter: which call it belongs to (the call's number, in
// the high bits) and how many of the seat's chunks are taken (the low bits).
// Claiming checks both in one compare-and-swap, so a worker that arrives after
// its call has ended can never take a chunk of a later call.
constexpr int kClaimBits = 24;
constexpr std::uint64_t kClaimMask = (std::uint64_t(1) << kClaimBits) - 1;
constexpr std::uint64_t kCallMask = (std::uint64_t(1) << (64 - kClaimBits)) - 1;
static_assert(kChunksPerSeat <= static_cast<std::int64_t>(kClaimMask), "a seat's chunks must fit its counter");

struct alignas(64) SeatCursor {
    std::atomic<std::uint64_t> claim{0};
};

class Pool {
   public:
    explicit Pool(int most_seats) : cursors_(static_cast<std::size_t>(most_seats)) {
#if defined(__linux__)
        CPU_ZERO(&allowed_);
        if (sched_getaffinity(0, sizeof allowed_, &allowed_) != 0) CPU_ZERO(&allowed_);
#endif
    }

    // Runs `job` on the caller and up to job.seats - 1 workers; false (nothing
    // done) if the pool is serving another thread's call or has no worker.
    bool run(Job job) {
        if (busy_.exchange(true, std::memory_order_acquire)) return false;
        job.seats = std::min({job.seats, start_workers(job.seats - 1) + 1, static_cast<int>(cursors_.size())});
        if (job.seats < 2) {
            busy_.store(false, std::memory_order_release);
            return false;
        }
        const auto start = Clock::now();
        avoid_callers_cpu();
        const std::uint64_t call = post(job);
        const auto posted = Clock::now();
        const std::int64_t own_chunks = take_chunks(job, call, 0);
        const auto ran_out = Clock::now();
        wait_for_chunks(job.chunks);
        learn(job, own_chunks, posted - start, ran_out - posted, Clock::now() - ran_out);
        stats_.parallel_calls.fetch_add(1, std::memory_order_relaxed);
        stats_.caller_chunks.fetch_add(own_chunks, std::memory_order_relaxed);
        stats_.worker_chunks.fetch_add(job.chunks - own_chunks, std::memory_order_relaxed);
        busy_.store(false, std::memory_order_release);
        return true;
    }

    // Whether a call of `total` elements should leave the workers out (see learn()).
    bool resting(std::int64_t total) {
        std::atomic<int>& rest = size_class(total).rest_calls;
        int left = rest.load(std::memory_order_relaxed);
        while (left > 0 && !rest.compare_exchange_weak(left, left - 1, std::memory_order_relaxed)) {
        }
        if (left > 0) stats_.rested_calls.fetch_add(1, std::memory_order_relaxed);
        return left > 0;
    }

    // Runs a call that resting() kept from the workers on the caller, and
    // times it: the measure learn() holds the workers' calls against.
    void run_alone(const std::int64_t* starts, std::size_t count, PieceFn fn) {
        const auto start = Clock::now();
        run_on_caller(starts, count, fn);
        const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
        const double sample = seconds / static_cast<double>(starts[count]);
        std::atomic<double>& pace = size_class(starts[count]).serial_seconds_per_element;
        const double old = pace.load(std::memory_order_relaxed);
        pace.store(old > 0 ? 0.75 * old + 0.25 * sample : sample, std::memory_order_relaxed);
    }

    PoolStats stats() const {
        return {stats_.parallel_calls.load(), stats_.rested_calls.load(), stats_.caller_chunks.load(),
                stats_.worker_chunks.load()};
    }

   private:
    // Starts workers until `wanted` exist (or no more can be made); how many exist.
    int start_workers(int wanted) {
        std::lock_guard<std::mutex> lock(mutex_);
        while (workers_ < wanted) {
            try {
                std::thread worker(&Pool::serve, this);
                handles_.push_back(worker.native_handle());
                worker.detach();
            } catch (const std::system_error&) {
                break;  // no memory for another thread: work with those there are
            }
            ++workers_;
            if (off_cpu_ >= 0) keep_off(handles_.back(), off_cpu_);
        }
        return workers_;
    }

    // Workers run anywhere but on the caller's processor.  A woken thread is
    // placed where the kernel sees room; when every core is busy -- the usual
    // case in a training loop, where a BLAS thread still spins on the other
    // core -- that is often the waker's own core, and the worker would push
    // the caller off it and run the call in its place.  Kept off the caller's
    // core, it takes the spinning thread's instead.  Changed only when the
    // caller's processor changes (one system call per worker).
    void avoid_callers_cpu() {
#if defined(__linux__)
        const int cpu = sched_getcpu();
        if (cpu == off_cpu_ || cpu < 0 || cpu >= CPU_SETSIZE || !CPU_ISSET(cpu, &allowed_) ||
            CPU_COUNT(&allowed_) < 2)
            return;
        std::lock_guard<std::mutex> lock(mutex_);
        off_cpu_ = cpu;
        for (pthread_t h : handles_) keep_off(h, cpu);
#endif
    }

    void keep_off(pthread_t worker, int cpu) {
#if defined(__linux__)
        cpu_set_t mask = allowed_;
        CPU_CLR(cpu, &mask);
        pthread_setaffinity_np(worker, sizeof mask, &mask);  // on failure it just runs anywhere
#else
        (void)worker, (void)cpu;
#endif
    }

    std::uint64_t post(const Job& job) {
        std::unique_lock<std::mutex> lock(mutex_);
        std::uint64_t call = (call_.load(std::memory_order_relaxed) + 1) & kCallMask;
        if (call == 0) call = 1;  // 0 is what a new worker has seen
        job_ = job;
        joined_ = 1;  // the caller's seat
        done_.store(0, std::memory_order_relaxed);
        for (int s = 0; s < job.seats; ++s)
            cursors_[static_cast<std::size_t>(s)].claim.store(call << kClaimBits, std::memory_order_relaxed);
        call_.store(call, std::memory_order_release);
        const int wake = std::min(job.seats - 1, sleepers_);
        lock.unlock();  // a woken worker would only block again on the mutex
        for (int s = 0; s < wake; ++s) wake_.notify_one();
        return call;
    }

    // Claims and runs chunks, the seat's own share first, then the other
    // seats'; how many it ran.
    std::int64_t take_chunks(const Job& job, std::uint64_t call, int seat) {
        std::int64_t ran = 0;
        // Every participant computes in the default mode, whatever its caller set (fpmode.hpp).
        const DefaultFloatingPointMode fp_mode;
        for (int k = 0; k < job.seats; ++k) {
            const int s = (seat + k) % job.seats;
            const std::int64_t first = job.first_chunk(s);
            const std::int64_t share = job.first_chunk(s + 1) - first;
            std::atomic<std::uint64_t>& claim = cursors_[static_cast<std::size_t>(s)].claim;
            for (std::int64_t taken; (taken = claim_one(claim, call, share)) >= 0;) {
                job.run_chunk(first + taken);
                ++ran;
                if (done_.fetch_add(1, std::memory_order_acq_rel) + 1 == job.chunks && seat != 0) {
                    // The last chunk, finished by a worker: the caller may be asleep.
                    { std::lock_guard<std::mutex> lock(mutex_); }
                    finished_.notify_one();
                }
            }
        }
        return ran;
    }

    // The index of a chunk taken from a seat's `share`, or -1 when all are
    // taken or the counter already belongs to another call.
    static std::int64_t claim_one(std::atomic<std::uint64_t>& claim, std::uint64_t call, std::int64_t share) {
        std::uint64_t seen = claim.load(std::memory_order_acquire);
        for (;;) {
            const auto taken = static_cast<std::int64_t>(seen & kClaimMask);
            if ((seen >> kClaimBits) != call || taken >= share) return -1;
            if (claim.compare_exchange_weak(seen, seen + 1, std::memory_order_acq_rel, std::memory_order_acquire))
                return taken;
        }
    }

    void wait_for_chunks(std::int64_t chunks) {
        auto all_done = [this, chunks] { return done_.load(std::memory_order_acquire) == chunks; };
        if (spin_until(all_done, kCallerSpin)) return;
        std::unique_lock<std::mutex> lock(mutex_);
        finished_.wait(lock, all_done);
    }

    [[noreturn]] void serve() {
        std::uint64_t seen = 0;
        for (;;) {
            auto new_call = [this, &seen] { return call_.load(std::memory_order_acquire) != seen; };
            spin_until(new_call, kWorkerSpin);
            std::unique_lock<std::mutex> lock(mutex_);
            if (!new_call()) {
                ++sleepers_;
                wake_.wait(lock, new_call);
                --sleepers_;
            }
            seen = call_.load(std::memory_order_relaxed);
            if (joined_ >= job_.seats) continue;  // full, or already over: wait for the next call
            const int seat = joined_++;
            const Job job = job_;
            lock.unlock();
            take_chunks(job, seen, seat);
        }
    }

    // Whether the workers paid for themselves: the call against the time the
    // caller alone would have taken, estimated from its own chunks.  They do
    // not when the machine has no core to spare (a worker woken late, or
    // losing its core mid-chunk while the caller waits for it), or when the
    // call is too short for a wake-up.  Then the next calls of that size class
    // run on the caller alone: 1, 2, 4 ... up to kMostRestingCalls of them while
    // it keeps happening (and at least as many as the time lost), fewer again
    // after calls that gained.  So a busy
    // machine costs one slow call now and then, not every call.
    void learn(const Job& job, std::int64_t own_chunks, Clock::duration posting, Clock::duration working,
               Clock::duration waiting) {
        SizeClass& size = size_class(job.starts[job.count]);
        // The caller alone: as timed in this size class's last calls without
        // workers, if any (the caller's own pace is slowed by the workers'
        // memory traffic when the call is bandwidth-bound), else that pace;
        // without a chunk of its own the caller has no estimate, and the
        // workers did it all.
        const double pace = size.serial_seconds_per_element.load(std::memory_order_relaxed);
        const std::int64_t total = job.starts[job.count];
        const Clock::duration alone =
            pace > 0 ? std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(pace * total))
            : own_chunks > 0 ? working * job.chunks / own_chunks
                             : Clock::duration::max();
        const Clock::duration took = posting + working + waiting;
        const bool lost = took > alone;
        int backoff = size.backoff.load(std::memory_order_relaxed);
        if (lost) {
            // At least as many calls as the time lost would have run alone: a
            // worker that lost its core mid-chunk can cost milliseconds, far
            // more than workers could ever save a short call.
            const double wasted = alone == Clock::duration::max() ? 0.0 : (took - alone) / alone;
            const double at_least = std::min(wasted, static_cast<double>(kMostRestingCalls));
            backoff = std::min(std::max({1, 2 * backoff, static_cast<int>(at_least)}), kMostRestingCalls);
        } else {
            backoff /= 2;
        }
        size.backoff.store(backoff, std::memory_order_relaxed);
        if (lost) size.rest_calls.store(backoff, std::memory_order_relaxed);
    }

    // Calls are classed by the binary order of magnitude of their element count.
    struct SizeClass {
        std::atomic<int> backoff{0};
        std::atomic<int> rest_calls{0};
        std::atomic<double> serial_seconds_per_element{0};  // of its calls without workers (average; 0: none yet)
    };
    SizeClass& size_class(std::int64_t total) {
        return size_classes_[63 - __builtin_clzll(static_cast<unsigned long long>(total | 1))];
    }

    struct {
        std::atomic<std::int64_t> parallel_calls{0}, rested_calls{0}, caller_chunks{0}, worker_chunks{0};
    } stats_;
    std::vector<SeatCursor> cursors_;
    std::atomic<bool> busy_{false};
    std::atomic<std::uint64_t> call_{0};
    std::atomic<std::int64_t> done_{0};
    SizeClass size_classes_[64];
    std::mutex mutex_;  // guards the members below
    std::condition_variable wake_;      // workers wait here for a call
    std::condition_variable finished_;  // the caller waits here for the last chunks
    Job job_{};
    int joined_ = 0;
    int workers_ = 0;
    std::vector<pthread_t> handles_;
    int off_cpu_ = -1;  // the processor the workers avoid (-1: none)
#if defined(__linux__)
    cpu_set_t allowed_;  // the process's processors when the pool was made
#endif
    int sleepers_ = 0;
};

// ---- fork() ------------------------------------------------------------------------------------------------
// A forked child has none of the parent's workers, and a mutex of the pool
// may have been held by one of them.  So the child abandons the pool (never
// destroys it: its workers' state stays behind) and makes its own at its first
// multi-threaded call; a child of a child does the same.
std::atomic<Pool*> g_pool{nullptr};
std::mutex g_pool_creation;

void after_fork_in_child() {
    g_pool.store(nullptr);
    new (&g_pool_creation) std::mutex();  // it may have been held by a thread that is gone
}

const bool g_fork_handler_registered = pthread_atfork(nullptr, nullptr, &after_fork_in_child) == 0;

Pool* pool() {
    Pool* p = g_pool.load();
    if (p == nullptr) {
        std::lock_guard<std::mutex> lock(g_pool_creation);
        p = g_pool.load();
        if (p == nullptr) {
            p = new (std::nothrow) Pool(max_threads());  // never freed: its workers outlive every caller
            g_pool.store(p);
        }
    }
    return p;
}

}  // namespace

void for_each_piece(const std::int64_t* starts, std::size_t count, int threads, std::int64_t align,
                    PieceFn fn) {
    const std::int64_t total = starts[count];
    if (threads > 1 && total > kMinChunkElements) {
        const std::int64_t wanted_chunks = static_cast<std::int64_t>(threads) * kChunksPerSeat;
        std::int64_t chunk = std::max(kMinChunkElements, (total + wanted_chunks - 1) / wanted_chunks);
        chunk = (chunk + align - 1) / align * align;
        const std::int64_t chunks = (total + chunk - 1) / chunk;
        const int seats = static_cast<int>(std::min<std::int64_t>(threads, chunks));
        Pool* p = seats > 1 ? pool() : nullptr;
        if (p != nullptr && p->resting(total)) {
            p->run_alone(starts, count, fn);
            return;
        }
        if (p != nullptr && p->run(Job{starts, count, align, fn, chunk, chunks, seats})) return;
    }
    run_on_caller(starts, count, fn);
}

PoolStats pool_stats() {
    Pool* p = g_pool.load();
    return p == nullptr ? PoolStats{} : p->stats();
}

int max_threads() {
    // The processors this process may run on: counted from the affinity
    // mask, with a system call, so read once.
#if defined(FASTADAM_HAVE_OPENMP)
    static const int processors = std::max(1, omp_get_num_procs());
#else
    static const int processors = std::max(1u, std::thread::hardware_concurrency());
#endif
    return processors;
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

bool fork_handler_registered() { return g_fork_handler_registered; }

}  // namespace fastadam
