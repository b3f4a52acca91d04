// The kernels of float32 params with float32 gradients, by model copy (none,
// float16, bfloat16): one of the translation units of a level (see adam_loops.hpp).
#include "adam_loops.hpp"

namespace fastadam {
namespace FASTADAM_LEVEL {

const VariantTable kFloat32Kernels[3] = {
    variants<float, kSame, kSame>(), variants<float, kSame, kHalf>(), variants<float, kSame, kBf16>()};

}  // namespace FASTADAM_LEVEL
}  // namespace fastadam
