// What every engine call takes besides its plan (see "The engine contract" in docs/ARCHITECTURE.md).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "crc32c.hpp"
#include "direct_io.hpp"
#include "fault_injection.hpp"
#include "pinned_pool.hpp"

namespace dcp_native {

struct EngineOptions {
  int64_t threads = 1;
  int64_t chunk_bytes = 1;
  // Pinned staging for device memory; null: a pool for the call.
  std::shared_ptr<PinnedPool> pool;
  // O_DIRECT for page-aligned pieces moved through pinned buffers.
  bool direct_io = true;
  // The settings of dcp_native/config.py: test hooks (a cap on each
  // syscall's transfer, 0 for none; injected faults; O_DIRECT refused), the
  // CRC32C implementation (null: the fastest), the CUDA runtime library to
  // load for a call's own pool ("": torch's).
  int64_t short_io_cap = 0;
  std::vector<FaultSpec> faults;
  DirectRefusal direct_refusal = DirectRefusal::kNone;
  Crc32cFunction crc32c = nullptr;
  std::string cudart;
};

}  // namespace dcp_native
