// The kernels of float32 params, every storage of their streams included:
// one of the translation units of a level (see adam_loops.hpp).
#include "adam_loops.hpp"

namespace fastadam {
namespace FASTADAM_LEVEL {

const VariantTable kFloat32Kernels = variants<float>();

}  // namespace FASTADAM_LEVEL
}  // namespace fastadam
