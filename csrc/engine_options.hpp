// What every engine call takes besides its plan (see "The engine contract" in docs/ARCHITECTURE.md).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "crc32c.hpp"
#include "direct_io.hpp"
#include "fault_injection.hpp"
#include "io_error.hpp"
#include "pinned_pool.hpp"

namespace dcp_native {

struct EngineOptions {
  int64_t threads = 1;
  int64_t chunk_bytes = 1;
  // Pinned staging for device memory (required for it: pools live across
  // calls, since freeing pinned memory can stall the device).
  std::shared_ptr<PinnedPool> pool;
  // O_DIRECT for page-aligned pieces moved through pinned buffers.
  bool direct_io = true;
  // The settings of dcp_native/config.py: test hooks (a cap on each
  // syscall's transfer, 0 for none; injected faults; O_DIRECT refused), the
  // CRC32C implementation (null: the fastest).
  int64_t short_io_cap = 0;
  std::vector<FaultSpec> faults;
  DirectRefusal direct_refusal = DirectRefusal::kNone;
  Crc32cFunction crc32c = nullptr;
};

// What both engines require of the options; PlanError otherwise.
inline void check_options(const EngineOptions& options) {
  if (options.threads < 1) {
    throw PlanError("threads must be at least 1, got " + std::to_string(options.threads));
  }
  if (options.chunk_bytes < 1) {
    throw PlanError("chunk_bytes must be at least 1, got " + std::to_string(options.chunk_bytes));
  }
}

// The pool of a call whose first device memory is on `device` (-1: none):
// the caller's; PlanError when device memory comes without one.
inline std::shared_ptr<PinnedPool> call_pool(const EngineOptions& options, int device) {
  if (device >= 0 && !options.pool) {
    throw PlanError("device memory (device " + std::to_string(device) +
                    ") needs a pinned pool: pass pool=engine.pinned_pool(device)");
  }
  return device >= 0 ? options.pool : nullptr;
}

}  // namespace dcp_native
