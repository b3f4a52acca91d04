// The floating-point mode every computation of fastadam runs in.
//
// The numerics contract (same bits on every thread count) needs every thread
// of a call to round alike.  The mode is per thread, and the caller's need not
// be the default: a library built with fast-math flags sets flush-to-zero and
// denormals-are-zero on the thread that loads it -- after fastadam's pool
// workers exist, so the caller's piece of a call would flush subnormals and the
// workers' would not.  This guard puts the thread in IEEE-754's default mode
// (round to nearest even, subnormals kept, exceptions masked so that a NaN can
// never raise SIGFPE) and restores the caller's mode when it goes out of scope.
// On x86-64 it costs one read of MXCSR when the mode is already the default.
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#else
#include <cfenv>
#endif

namespace fastadam {

class DefaultFloatingPointMode {
   public:
#if defined(__x86_64__) || defined(_M_X64)
    DefaultFloatingPointMode() : saved_(_mm_getcsr()) {
        // Keep the sticky exception flags (bits 0-5); everything above them --
        // the exception masks, the rounding control, FTZ and DAZ -- takes its
        // power-on value.
        const unsigned wanted = (saved_ & kStickyFlags) | kDefaultControl;
        changed_ = wanted != saved_;
        if (changed_) _mm_setcsr(wanted);
    }
    ~DefaultFloatingPointMode() {
        if (changed_) _mm_setcsr((saved_ & ~kStickyFlags) | (_mm_getcsr() & kStickyFlags));
    }

   private:
    static constexpr unsigned kStickyFlags = 0x3Fu;
    static constexpr unsigned kDefaultControl = 0x1F80u;  // all exceptions masked, nearest, no FTZ/DAZ
    unsigned saved_;
    bool changed_;
#else
    DefaultFloatingPointMode() {
        std::fegetenv(&saved_);
        std::fesetenv(FE_DFL_ENV);
    }
    ~DefaultFloatingPointMode() { std::fesetenv(&saved_); }

   private:
    std::fenv_t saved_;
#endif

   public:
    DefaultFloatingPointMode(const DefaultFloatingPointMode&) = delete;
    DefaultFloatingPointMode& operator=(const DefaultFloatingPointMode&) = delete;
};

}  // namespace fastadam
