// Per-thread scratch objects that a call reuses, so that a warm step
// allocates nothing -- and that stay correct when a call re-enters itself.
#pragma once

#include <memory>

namespace fastadam {

// Lends the calling thread's cached T for the lifetime of the lease.  Python
// code can run in the middle of a call (a __float__, an __index__, a __del__
// when a reference drops) and call fastadam again on the same thread; that
// inner call must not clear or reuse the outer call's scratch, so it gets a
// fresh T of its own.  `Tag` keeps the caches of different users apart.
template <class T, class Tag>
class ScratchLease {
   public:
    ScratchLease() {
        Slot& slot = thread_slot();
        if (slot.in_use) {
            own_ = std::make_unique<T>();
            value_ = own_.get();
        } else {
            slot.in_use = true;
            value_ = &slot.value;
        }
    }
    ~ScratchLease() {
        if (!own_) thread_slot().in_use = false;
    }
    ScratchLease(const ScratchLease&) = delete;
    ScratchLease& operator=(const ScratchLease&) = delete;
    T& operator*() const { return *value_; }
    T* operator->() const { return value_; }

   private:
    struct Slot {
        T value;
        bool in_use = false;
    };
    static Slot& thread_slot() {
        thread_local Slot slot;
        return slot;
    }
    T* value_;
    std::unique_ptr<T> own_;
};

}  // namespace fastadam
