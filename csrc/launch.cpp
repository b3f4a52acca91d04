#include "launch.hpp"

#include <Python.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "dispatch.hpp"
#include "parallel.hpp"

namespace fastadam {
namespace {

// Piece boundaries: a multiple of a cache line for every dtype, and of the
// 8-bit state's quantization block, which one thread must requantize whole.
constexpr std::int64_t kPieceAlign = kQuantBlock;

template <class Tensor>
struct RangeCall {
    const Tensor* tensors;
    void (*range)(const Tensor&, std::int64_t, std::int64_t);
    static void call(void* self, std::size_t segment, std::int64_t begin, std::int64_t end) {
        auto* rc = static_cast<RangeCall*>(self);
        rc->range(rc->tensors[segment], begin, end);
    }
};

// Keeps the GIL released for its lifetime when asked to.
class MaybeReleaseGil {
   public:
    explicit MaybeReleaseGil(bool release) : state_(release ? PyEval_SaveThread() : nullptr) {}
    ~MaybeReleaseGil() {
        if (state_ != nullptr) PyEval_RestoreThread(state_);
    }
    MaybeReleaseGil(const MaybeReleaseGil&) = delete;
    MaybeReleaseGil& operator=(const MaybeReleaseGil&) = delete;

   private:
    PyThreadState* state_;
};

// The count + 1 prefix sums of the tensors' sizes, in storage reused between
// calls (a step allocates nothing once warmed up).
template <class Tensor>
const std::int64_t* prefix_sizes(const Tensor* tensors, std::size_t count) {
    thread_local std::vector<std::int64_t> starts;
    starts.resize(count + 1);
    starts[0] = 0;
    for (std::size_t i = 0; i < count; ++i) starts[i + 1] = starts[i] + tensors[i].size;
    return starts.data();
}

// The call's size in float32 elements' worth of work.
template <class Tensor>
std::int64_t weight_of(const Tensor* tensors, std::size_t count) {
    std::int64_t weight = 0;
    for (std::size_t i = 0; i < count; ++i)
        weight += tensors[i].size * (tensors[i].dtype == DType::float64 ? kFloat64Weight : 1);
    return weight;
}

template <class Tensor>
void run(const Tensor* tensors, std::size_t count, int requested_threads,
         void (*range)(const Tensor&, std::int64_t, std::int64_t)) {
    RangeCall<Tensor> rc{tensors, range};
    run_in_pieces(prefix_sizes(tensors, count), count, requested_threads, PieceFn{&rc, &RangeCall<Tensor>::call},
                  weight_of(tensors, count));
}

}  // namespace

void run_in_pieces(const std::int64_t* starts, std::size_t count, int requested_threads, PieceFn fn,
                   std::int64_t weight) {
    const std::int64_t total = starts[count];
    if (total == 0) return;
    const int threads = threads_for(total, weight, requested_threads);
    MaybeReleaseGil gil(total >= kReleaseGilElements);
    for_each_piece(starts, count, threads, kPieceAlign, fn);
}

int threads_for(std::int64_t total, std::int64_t weight, int requested) {
    if (weight < kMinParallelElementsFloat32) return 1;
    const int wanted = std::min(requested > 0 ? requested : default_num_threads(), max_threads());
    const std::int64_t useful = std::max<std::int64_t>(1, total / kMinElementsPerThread);
    return static_cast<int>(std::min<std::int64_t>(wanted, useful));
}

void run_adam(const AdamTensor* tensors, std::size_t count, int requested_threads) {
    run(tensors, count, requested_threads, kernels().adam_range);
}

bool any_nonfinite_grad(const AdamTensor* tensors, std::size_t count, int requested_threads) {
    struct Context {
        const AdamTensor* tensors;
        std::atomic<bool> found{false};
    } context{tensors};
    auto piece = [](void* ctx, std::size_t k, std::int64_t begin, std::int64_t end) {
        auto* c = static_cast<Context*>(ctx);
        if (!c->found.load(std::memory_order_relaxed) && kernels().nonfinite_range(c->tensors[k], begin, end))
            c->found.store(true, std::memory_order_relaxed);
    };
    run_in_pieces(prefix_sizes(tensors, count), count, requested_threads, PieceFn{&context, piece},
                  weight_of(tensors, count));
    return context.found.load();
}

bool run_adam_step(const AdamTensor* tensors, std::size_t count, int requested_threads, bool skip_if_nonfinite) {
    if (skip_if_nonfinite && any_nonfinite_grad(tensors, count, requested_threads)) return false;
    run_adam(tensors, count, requested_threads);
    return true;
}

void run_probe(const ProbeTensor* tensors, std::size_t count, int requested_threads) {
    run(tensors, count, requested_threads, kernels().probe_range);
}

}  // namespace fastadam
