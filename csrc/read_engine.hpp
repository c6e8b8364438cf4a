// Executes read plans: boxes of runs copied from files into memory at raw
// addresses (the record format is in docs/ARCHITECTURE.md). Runs are sorted
// and coalesced per file, packed into preadv calls and spread over threads;
// coalescing gaps land in a per-thread scratch buffer, never in the caller's
// memory. Files read with their checksum table are read in whole blocks,
// each checked by the thread that read it (device files in the pinned
// buffer, before the copy to the device). Files whose destinations are
// device memory are read into pinned buffers and copied to the device on the
// engine's copy stream while later pieces are read.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "block_crc.hpp"
#include "engine_options.hpp"

namespace dcp_native {

// Runs this small are merged regardless of the 1/8 rule (see should_merge).
constexpr int64_t kTinySpan = 4096;
// Most dimensions of one box (torch tensors have at most 64).
constexpr int64_t kMaxNdim = 64;

struct ReadFileSpec {
  std::string path;
  int64_t min_size = 0;
  // Flat int64 records (file_offset, dest_addr, inner_bytes, ndim,
  // counts[ndim], file_strides[ndim], dest_strides[ndim]).
  const int64_t* copies = nullptr;
  size_t copies_length = 0;
  // The checksum table of the file (crc_count CRCs, one per block of
  // `grid`), or null: with one, every read is widened to whole blocks and
  // each block read is checked against it (block_crc.hpp).
  const uint32_t* crcs = nullptr;
  size_t crc_count = 0;
  BlockGrid grid;
  bool has_table = false;
  // >= 0: every destination is device memory on this CUDA device.
  int device = -1;
  // The consumer's cudaStream_t as an integer (0: the legacy default stream):
  // work queued on it before the call completes before the copies write.
  int64_t stream = 0;
};

struct ReadOptions : EngineOptions {
  int64_t max_gap = 0;
};

struct ReadStats {
  // Bytes read from the files, coalescing gaps included.
  int64_t bytes_read = 0;
  // preadv calls planned; resuming a short transfer does not count.
  int64_t calls = 0;
  // (file index, block index) of every block whose CRC differs from its
  // file's table, sorted.
  std::vector<std::pair<int64_t, int64_t>> failed_blocks;
};

// Whether two neighbouring runs of lengths prev_len and next_len separated by
// `gap` bytes share one call: the gap costs at most 1/8 of the smaller run,
// or all of it fits in one small read. dcp_native.engine.should_merge is the
// same rule.
bool should_merge(int64_t prev_len, int64_t gap, int64_t next_len, int64_t max_gap) noexcept;

// Validates the whole plan (throws PlanError before touching any file), then
// reads it. Call without the GIL: it never touches Python objects.
ReadStats read_files(const std::vector<ReadFileSpec>& files, const ReadOptions& options);

}  // namespace dcp_native
