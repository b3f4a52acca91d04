// The kernels of float32 params with float16 gradients, by model copy (none,
// float16, bfloat16): one of the translation units of a level (see adam_loops.hpp).
#include "adam_loops.hpp"

namespace fastadam {
namespace FASTADAM_LEVEL {

const VariantTable kFloat16GradKernels[3] = {
    variants<float, kHalf, kSame>(), variants<float, kHalf, kHalf>(), variants<float, kHalf, kBf16>()};

}  // namespace FASTADAM_LEVEL
}  // namespace fastadam
