// The instruction-set level this translation unit is compiled for.
//
// CMake compiles each kernel source once per level (baseline, avx2, avx512),
// with that level's -m flags and FASTADAM_ISA_NAME / FASTADAM_ISA_LEVEL set.
// All kernel code lives in a namespace named after the level
// (fastadam::isa_avx2, ...), never in a namespace shared by two levels: a
// level is split over several translation units, so its templates and inline
// functions have external linkage, and the linker merges identical symbols.
// Within a level that is harmless (same flags); across levels it could put an
// AVX-512 copy of a function on the baseline path.  For the same reason the
// kernels instantiate no std:: function (std::array's members, std::min, ...):
// those symbols would be the same in every level.
#pragma once

#if !defined(FASTADAM_ISA_NAME) || !defined(FASTADAM_ISA_LEVEL)
#error "FASTADAM_ISA_NAME and FASTADAM_ISA_LEVEL must be set by the build"
#endif
// The flags and the level must agree, or the dispatcher would run code the
// CPU was not checked for.
#if FASTADAM_ISA_LEVEL == 2 && !defined(__AVX512F__)
#error "the avx512 level must be compiled with AVX-512 enabled"
#elif FASTADAM_ISA_LEVEL == 1 && (!defined(__AVX2__) || defined(__AVX512F__))
#error "the avx2 level must be compiled with AVX2 and without AVX-512"
#elif FASTADAM_ISA_LEVEL == 0 && defined(__AVX__)
#error "the baseline level must be compiled without AVX"
#endif

#define FASTADAM_CONCAT_(a, b) a##b
#define FASTADAM_CONCAT(a, b) FASTADAM_CONCAT_(a, b)
#define FASTADAM_STRINGIFY_(a) #a
#define FASTADAM_STRINGIFY(a) FASTADAM_STRINGIFY_(a)

// fastadam::FASTADAM_LEVEL is this level's namespace, e.g. fastadam::isa_avx2.
#define FASTADAM_LEVEL FASTADAM_CONCAT(isa_, FASTADAM_ISA_NAME)
