#include "codebook.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <list>
#include <mutex>

namespace fastadam {
namespace {

float round_down_to_float(double x) {
    const float f = static_cast<float>(x);  // to nearest
    return double(f) > x ? std::nextafter(f, -HUGE_VALF) : f;
}

float float_from_bits(std::uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

std::uint32_t float_to_bits_of(float f) {
    std::uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}

constexpr std::uint32_t kOneBits = 0x3F800000u;  // 1.0f: no block value exceeds it

// The nearest code of the float with magnitude bits a, on one side of zero.
int true_code(const Codebook& book, std::uint32_t a, bool negative) {
    const float magnitude = float_from_bits(a);
    return searched_code(book, negative ? -magnitude : magnitude);
}

// The code the table entry gives (kernel_api.hpp's formula, as the kernels
// compute it).
int table_code(const Codebook& book, std::uint32_t entry, std::uint32_t a, bool negative) {
    const std::uint32_t rank = (std::max(a, book.floor_bits) - book.floor_bits) & ((1u << book.shift) - 1u);
    const std::uint32_t threshold = entry & 0xFFFFFFu;
    return static_cast<int>(entry >> 24) + static_cast<int>(negative ? rank < threshold : rank > threshold);
}

// The entry of bucket k on one side, proven: or false if the bucket holds
// two midpoints (more than two codes).  Both the codes and the table's
// answers are monotonic in y and take at most two values in a bucket, so
// they agree everywhere once they agree at the bucket's ends and on both
// sides of the table's step.
bool bucket_entry(const Codebook& book, std::int64_t k, bool negative, std::uint32_t& entry) {
    const std::uint32_t width = 1u << book.shift;
    const std::uint32_t start = book.floor_bits + static_cast<std::uint32_t>(k) * width;
    const std::uint32_t lo = k == 0 ? 0 : start;
    const std::uint32_t hi = std::min(start + width - 1, kOneBits);
    // Codes ascend with y: on the negative side the largest magnitude is the lowest code.
    const int lowest = true_code(book, negative ? hi : lo, negative);
    const int highest = true_code(book, negative ? lo : hi, negative);
    if (highest - lowest > 1) return false;
    std::uint32_t threshold = negative ? 0 : width - 1;  // one code: the comparison never holds
    if (highest != lowest) {
        const std::uint32_t m = float_to_bits_of(std::fabs(book.midpoint[lowest]));
        if (m < start || m - start >= width) return false;
        threshold = m - start;
    }
    entry = static_cast<std::uint32_t>(lowest) << 24 | threshold;
    const std::uint32_t probes[] = {lo, hi, start + threshold - 1, start + threshold, start + threshold + 1,
                                    book.floor_bits - 1, book.floor_bits, book.floor_bits + 1};
    for (const std::uint32_t a : probes)
        if (a >= lo && a <= hi && table_code(book, entry, a, negative) != true_code(book, a, negative)) return false;
    return true;
}

// Fills the table for buckets of 2^-mantissa_bits of a binade; false if some
// bucket would hold two midpoints, or the table would be too large.
bool try_buckets(Codebook& book, int mantissa_bits) {
    book.shift = 23 - mantissa_bits;
    std::uint32_t entry = 0;
    // The floor: the largest power of two whose first bucket (with every
    // smaller magnitude) is proven on both sides.
    book.floor_bits = 0;
    for (std::uint32_t exponent = 126; exponent >= 1 && book.floor_bits == 0; --exponent) {
        book.floor_bits = exponent << 23;
        if (!bucket_entry(book, 0, false, entry) || !bucket_entry(book, 0, true, entry)) book.floor_bits = 0;
    }
    if (book.floor_bits == 0) return false;
    const std::int64_t buckets = ((kOneBits - book.floor_bits) >> book.shift) + 1;
    if (buckets > kMaxCodeBuckets) return false;
    for (std::int64_t k = 0; k < buckets; ++k) {
        if (!bucket_entry(book, k, false, book.bucket[k])) return false;
        if (!bucket_entry(book, k, true, book.bucket[buckets + k])) return false;
    }
    book.buckets = static_cast<std::int32_t>(buckets);
    return true;
}

std::shared_ptr<const Codebook> build(const float* map, int count) {
    auto book = std::make_shared<Codebook>();
    book->count = count;
    std::fill(book->value, book->value + 256, 0.0f);
    std::memcpy(book->value, map, sizeof(float) * static_cast<std::size_t>(count));
    std::fill(book->midpoint, book->midpoint + 256, HUGE_VALF);
    for (int k = 0; k + 1 < count; ++k)
        book->midpoint[k] = round_down_to_float((double(map[k]) + double(map[k + 1])) * 0.5);
    book->zero_code = static_cast<std::uint8_t>(searched_code(*book, 0.0f));
    std::memset(book->bucket, 0, sizeof book->bucket);
    book->buckets = 0;
    if (count != 256) {  // 16 values: compared in registers, or for the linear map computed
        book->linear16 = true;
        for (int k = 0; k < 16; ++k) book->linear16 = book->linear16 && map[k] == static_cast<float>(k + 1) / 16.0f;
        return book;
    }
    // The coarsest buckets that work: the smallest table (the part a step
    // touches stays in L1).
    bool table = false;
    for (int mantissa_bits = 0; mantissa_bits <= 13 && !table; ++mantissa_bits) table = try_buckets(*book, mantissa_bits);
    if (!table) book->buckets = 0;
    return book;
}

// A handful of maps per process is usual (an optimizer shares one signed and
// one unsigned map between all its params); the cache holds the most recent.
constexpr std::size_t kCachedBooks = 16;

}  // namespace

int searched_code(const Codebook& book, float y) {
    return static_cast<int>(std::lower_bound(book.midpoint, book.midpoint + 255, y) - book.midpoint);
}

std::shared_ptr<const Codebook> codebook_for(const float* map, int count) {
    static std::mutex mutex;
    static std::list<std::shared_ptr<const Codebook>> recent;  // most recently used first
    {
        const std::lock_guard<std::mutex> lock(mutex);
        for (auto it = recent.begin(); it != recent.end(); ++it) {
            if ((*it)->count != count || std::memcmp((*it)->value, map, sizeof(float) * count) != 0) continue;
            recent.splice(recent.begin(), recent, it);
            return recent.front();
        }
    }
    std::shared_ptr<const Codebook> book = build(map, count);  // outside the lock: a few milliseconds at most
    const std::lock_guard<std::mutex> lock(mutex);
    recent.push_front(book);
    if (recent.size() > kCachedBooks) recent.pop_back();
    return book;
}

}  // namespace fastadam
