// Executes write plans: each file is created (or truncated) and its segments,
// from a Python-owned blob or from raw host addresses, are written at their
// offsets with pwritev calls spread over threads (the segment format is in
// dcp_native/engine.py).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "fault_injection.hpp"

namespace dcp_native {

constexpr int64_t kSourceBlob = 0;
constexpr int64_t kSourceHost = 1;

struct WriteFileSpec {
  std::string path;
  const char* blob;
  size_t blob_length;
  // Flat int64 4-tuples (file_offset, kind, source, length).
  const int64_t* segments;
  size_t segments_length;
};

struct WriteOptions {
  int64_t threads = 1;
  bool sync = false;
  int64_t chunk_bytes = 1;
  // Test hooks: cap on each syscall's transfer (0 for none), injected faults.
  int64_t short_io_cap = 0;
  std::vector<FaultSpec> faults;
};

// Validates the whole plan (throws PlanError before creating any file), then
// writes it; returns the bytes written per file. Call without the GIL.
std::vector<int64_t> write_files(const std::vector<WriteFileSpec>& files,
                                 const WriteOptions& options);

}  // namespace dcp_native
