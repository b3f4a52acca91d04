#include "dispatch.hpp"

#include <stdexcept>

namespace fastadam {
namespace {

struct IsaLevel {
    const char* name;
    const KernelTable* table;
    bool (*cpu_can_run)();
};

bool always() { return true; }

#if defined(FASTADAM_HAVE_X86_LEVELS)
// __builtin_cpu_supports also checks that the OS saves the wider registers
// (XCR0), so a level it reports is safe to run.  Each level checks every
// feature its -m flags allow the compiler to use.
bool cpu_has_avx2() {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
bool cpu_has_avx512() {
    return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512cd") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vl");
}
#endif

// Lowest first; the last one the CPU can run is the default.
const IsaLevel kLevels[] = {
    {"baseline", &kernel_table_baseline, &always},
#if defined(FASTADAM_HAVE_X86_LEVELS)
    {"avx2", &kernel_table_avx2, &cpu_has_avx2},
    {"avx512", &kernel_table_avx512, &cpu_has_avx512},
#endif
};

const KernelTable* g_selected = nullptr;

std::string join(const std::vector<std::string>& names) {
    std::string out;
    for (const auto& n : names) out += (out.empty() ? "" : ", ") + n;
    return out;
}

}  // namespace

std::vector<std::string> available_isas() {
    std::vector<std::string> names;
    for (const auto& level : kLevels)
        if (level.cpu_can_run()) names.emplace_back(level.name);
    return names;
}

void select_isa(const std::string& requested) {
    const KernelTable* chosen = nullptr;
    if (requested.empty()) {
        for (const auto& level : kLevels)
            if (level.cpu_can_run()) chosen = level.table;
    } else {
        bool known = false;
        for (const auto& level : kLevels) {
            if (requested != level.name) continue;
            known = true;
            if (level.cpu_can_run()) chosen = level.table;
        }
        if (!known) {
            std::string all;
            for (const auto& level : kLevels) all += (all.empty() ? "" : ", ") + std::string(level.name);
            throw std::invalid_argument("FASTADAM_ISA='" + requested + "' is not a level of this build (" + all +
                                        ")");
        }
        if (chosen == nullptr)
            throw std::invalid_argument("FASTADAM_ISA='" + requested +
                                        "' is not supported by this CPU; it can run: " + join(available_isas()));
    }
    g_selected = chosen;
}

const KernelTable& kernels() { return *g_selected; }

}  // namespace fastadam
