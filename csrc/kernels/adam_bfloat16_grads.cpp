// The kernels of float32 params with bfloat16 gradients, by model copy (none,
// float16, bfloat16): one of the translation units of a level (see adam_loops.hpp).
#include "adam_loops.hpp"

namespace fastadam {
namespace FASTADAM_LEVEL {

const VariantTable kBfloat16GradKernels[3] = {
    variants<float, kBf16, kSame>(), variants<float, kBf16, kHalf>(), variants<float, kBf16, kBf16>()};

}  // namespace FASTADAM_LEVEL
}  // namespace fastadam
