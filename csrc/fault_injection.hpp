// Fault injection for tests: DCP_NATIVE_FAULT=op:errno:nth makes the nth
// system call of an operation within one engine call fail with errno, as if
// the kernel had returned it, so every error path of the native engine can be
// reached deterministically. dcp_native.engine parses the variable (one
// parser for both engines) and passes it here as flat (op, errno, nth)
// triples, which are validated again: C++ trusts nothing it gets.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace dcp_native {

// The operations a fault can hit; the values are the indices of
// dcp_native.engine.FAULT_OPS.
enum class FaultOp : int {
  kOpen = 0,
  kRead = 1,   // pread, preadv
  kWrite = 2,  // pwrite, pwritev
  kFsync = 3,
  kClose = 4,
  kRename = 5,  // the commit's renames (Python only; no engine call renames)
};
constexpr int kFaultOpCount = 6;

struct FaultSpec {
  int op;
  int error_number;
  int64_t nth;  // 1-based
};

// Validates flat (op, errno, nth) triples; throws PlanError.
std::vector<FaultSpec> parse_fault_specs(const int64_t* values, size_t length);

// One engine call's fault counters: a system call asks next() first and, if
// it returns an errno, fails with it instead of being made. Each operation's
// counter is atomic, so exactly one call is the nth whatever the threads do.
class FaultInjector {
 public:
  explicit FaultInjector(std::vector<FaultSpec> specs) noexcept;
  FaultInjector(const FaultInjector&) = delete;
  FaultInjector& operator=(const FaultInjector&) = delete;

  // The errno the coming call of `op` must fail with, 0 to make it.
  int next(FaultOp op) noexcept {
    const int index = static_cast<int>(op);
    if (!armed_[index]) {
      return 0;  // no atomic traffic when the operation has no fault
    }
    const int64_t count = counts_[index].fetch_add(1, std::memory_order_relaxed) + 1;
    for (const FaultSpec& spec : specs_) {
      if (spec.op == index && spec.nth == count) {
        return spec.error_number;
      }
    }
    return 0;
  }

 private:
  std::vector<FaultSpec> specs_;
  bool armed_[kFaultOpCount] = {};
  std::atomic<int64_t> counts_[kFaultOpCount] = {};
};

}  // namespace dcp_native
