// Choosing the instruction-set level once, at import.
#pragma once

#include <string>
#include <vector>

#include "kernel_api.hpp"

namespace fastadam {

// The levels this build contains and this CPU can run, from lowest to best.
std::vector<std::string> available_isas();

// Picks the best available level, or the one named by `requested` (the value
// of FASTADAM_ISA; empty means "best").  Throws std::invalid_argument for an
// unknown name or a level this CPU cannot run.
void select_isa(const std::string& requested);

// The selected level's kernels.  select_isa() must have run.
const KernelTable& kernels();

}  // namespace fastadam
