// The code books of 8-bit block-wise state (see kernel_api.hpp's Codebook):
// built on the host, once per map, and shared by every tensor and call that
// uses the same 256 values.
#pragma once

#include <memory>

#include "kernel_api.hpp"

namespace fastadam {

// The code book of `map` (`count` finite float32 values, strictly ascending:
// 256 holding 0.0, or 16; the caller has checked).  Maps are compared by
// value: a recently used map's book is reused, so a step costs a 1 KiB
// comparison, not a rebuild.  The pointer keeps the book alive while a step
// uses it.
std::shared_ptr<const Codebook> codebook_for(const float* map, int count);

// The nearest code of y by binary search over the book's midpoints: the
// definition the bucket table is proven against.
int searched_code(const Codebook& book, float y);

}  // namespace fastadam
