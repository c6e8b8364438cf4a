// Validation of fault triples (see fault_injection.hpp).
#include "fault_injection.hpp"

#include <string>
#include <utility>

#include "io_error.hpp"

namespace dcp_native {

std::vector<FaultSpec> parse_fault_specs(const int64_t* values, size_t length) {
  constexpr int64_t kMaxErrno = 4095;  // Linux errno values are below 4096 (MAX_ERRNO)
  if (length % 3 != 0) {
    throw PlanError("faults has " + std::to_string(length) +
                    " values, not a multiple of 3 (op, errno, nth)");
  }
  std::vector<FaultSpec> specs;
  specs.reserve(length / 3);
  for (size_t i = 0; i < length; i += 3) {
    const int64_t op = values[i];
    const int64_t error_number = values[i + 1];
    const int64_t nth = values[i + 2];
    if (op < 0 || op >= kFaultOpCount || error_number < 1 || error_number > kMaxErrno ||
        nth < 1) {
      throw PlanError("fault " + std::to_string(i / 3) + " (" + std::to_string(op) + ", " +
                      std::to_string(error_number) + ", " + std::to_string(nth) +
                      ") is not (op in [0, " + std::to_string(kFaultOpCount) + "), errno in [1, 4095], nth >= 1)");
    }
    for (const FaultSpec& other : specs) {
      if (other.op == op && other.nth == nth) {
        throw PlanError("faults " + std::to_string(i / 3) +
                        " and an earlier one fail the same call");
      }
    }
    specs.push_back(FaultSpec{static_cast<int>(op), static_cast<int>(error_number), nth});
  }
  return specs;
}

FaultInjector::FaultInjector(std::vector<FaultSpec> specs) noexcept : specs_(std::move(specs)) {
  for (const FaultSpec& spec : specs_) {
    armed_[spec.op] = true;
  }
}

}  // namespace dcp_native
