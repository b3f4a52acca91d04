// A stress test of the thread pool (csrc/parallel.cpp), for ThreadSanitizer:
// tools/tsan_pool.sh builds it with -fsanitize=thread and runs it.
//
// Several caller threads each make many calls over random lists of segments,
// with random thread counts and pauses (so workers are found spinning, asleep,
// or busy with another caller's call).  Each call adds 1 to every element of
// its segments with plain, non-atomic writes: an element written twice in a
// call, or by two threads without ordering, is a data race for TSan; an
// element skipped or written twice fails the count check.
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <random>
#include <thread>
#include <vector>

#include "../csrc/parallel.hpp"

namespace {

struct Segments {
    std::vector<std::vector<std::int32_t>> data;
    std::vector<std::int64_t> starts;
};

void add_one(void* context, std::size_t segment, std::int64_t begin, std::int64_t end) {
    auto* s = static_cast<Segments*>(context);
    for (std::int64_t i = begin; i < end; ++i) s->data[segment][static_cast<std::size_t>(i)] += 1;
}

bool caller(unsigned seed, int calls) {
    std::mt19937_64 rng(seed);
    for (int c = 0; c < calls; ++c) {
        Segments s;
        const int count = 1 + static_cast<int>(rng() % 40);
        s.starts.push_back(0);
        for (int k = 0; k < count; ++k) {
            const std::int64_t n = (rng() % 4 == 0) ? static_cast<std::int64_t>(rng() % 200000)
                                                    : static_cast<std::int64_t>(rng() % 3000);
            s.data.emplace_back(static_cast<std::size_t>(n), 0);
            s.starts.push_back(s.starts.back() + n);
        }
        const int repeats = 1 + static_cast<int>(rng() % 3);
        for (int r = 0; r < repeats; ++r) {
            const int threads = 1 + static_cast<int>(rng() % 8);
            fastadam::for_each_piece(s.starts.data(), s.data.size(), threads, 64, fastadam::PieceFn{&s, &add_one});
            if (rng() % 4 == 0) std::this_thread::sleep_for(std::chrono::microseconds(rng() % 300));
        }
        for (const auto& segment : s.data)
            for (std::int32_t x : segment)
                if (x != repeats) {
                    std::fprintf(stderr, "an element was updated %d times, not %d\n", x, repeats);
                    return false;
                }
    }
    return true;
}

}  // namespace

int main() {
    std::vector<std::thread> threads;
    std::vector<char> ok(4, 0);
    for (unsigned t = 0; t < ok.size(); ++t)
        threads.emplace_back([t, &ok] { ok[t] = caller(1234 + t, 100); });
    for (auto& t : threads) t.join();
    for (char o : ok)
        if (!o) return 1;
    std::printf("pool stress test: every element updated exactly once per call\n");
    return 0;
}
