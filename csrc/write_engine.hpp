// Executes write plans: each file is created (or truncated) and its segments,
// from a Python-owned blob, raw host addresses or device memory, are written
// at their offsets with pwritev calls spread over threads (the segment format
// is in docs/ARCHITECTURE.md). Device memory is copied in pieces into pinned
// buffers on the engine's copy stream by one issuing thread that runs ahead
// as far as the pool allows, and each piece is written by a worker once its
// copy completed. Files that ask for it get the CRC32C of every block of
// their content: each call and device piece checksums the range it writes,
// on its thread, while the bytes are hot (block_crc.hpp).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "engine_options.hpp"

namespace dcp_native {

constexpr int64_t kSourceBlob = 0;
constexpr int64_t kSourceHost = 1;
constexpr int64_t kSourceDevice = 2;

struct WriteFileSpec {
  std::string path;
  const char* blob;
  size_t blob_length;
  // Flat int64 4-tuples (file_offset, kind, source, length).
  const int64_t* segments;
  size_t segments_length;
  // > 0: the segments must cover [0, size) without holes, and the result has
  // the CRC32C of every crc_block bytes of the file (the last block shorter).
  int64_t crc_block = 0;
  // CUDA device of the kSourceDevice segments (-1: none), and the producer's
  // stream (cudaStream_t as an integer) the copies must wait for.
  int device = -1;
  int64_t stream = 0;
};

struct WriteOptions : EngineOptions {
  bool sync = false;
};

struct WriteResult {
  std::vector<int64_t> bytes_per_file;
  // Per file: the block CRCs, empty for files without crc_block (and for
  // empty files).
  std::vector<std::vector<uint32_t>> block_crcs;
};

// Validates the whole plan (throws PlanError before creating any file), then
// writes it. Call without the GIL.
WriteResult write_files(const std::vector<WriteFileSpec>& files, const WriteOptions& options);

}  // namespace dcp_native
