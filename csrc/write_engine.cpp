// Write planning and execution (see write_engine.hpp).
#include "write_engine.hpp"

#include <sys/uio.h>

#include <algorithm>
#include <memory>

#include "call_plan.hpp"
#include "file_io.hpp"
#include "io_error.hpp"
#include "thread_pool.hpp"

namespace dcp_native {

namespace {

struct Segment {
  int64_t offset;
  int64_t length;
  char* source;
};

[[noreturn]] void bad_segment(const std::string& path, size_t index, const std::string& why) {
  throw PlanError("write plan for " + path + ": segment " + std::to_string(index) + ": " + why);
}

// Validates a file's segments and appends the non-empty ones; returns their
// total length.
int64_t collect_segments(const WriteFileSpec& file, std::vector<Segment>& segments) {
  if (file.segments_length % 4 != 0) {
    throw PlanError("write plan for " + file.path + ": segments has " +
                    std::to_string(file.segments_length) +
                    " values, not a multiple of 4 (file_offset, kind, source, length)");
  }
  const size_t count = file.segments_length / 4;
  const int64_t blob_length = static_cast<int64_t>(file.blob_length);
  int64_t total = 0;
  for (size_t i = 0; i < count; ++i) {
    const int64_t* values = file.segments + 4 * i;
    const int64_t offset = values[0];
    const int64_t kind = values[1];
    const int64_t source = values[2];
    const int64_t length = values[3];
    int64_t end = 0;
    if (offset < 0 || length < 0 || __builtin_add_overflow(offset, length, &end)) {
      bad_segment(file.path, i, "file range [" + std::to_string(offset) + ", +" +
                                    std::to_string(length) + ") is negative or overflows");
    }
    char* memory = nullptr;
    if (kind == kSourceBlob) {
      if (source < 0 || source > blob_length || length > blob_length - source) {
        bad_segment(file.path, i, "blob range [" + std::to_string(source) + ", +" +
                                      std::to_string(length) + ") is outside the blob of " +
                                      std::to_string(blob_length) + " bytes");
      }
      // pwritev never writes through its iovecs; the cast only fits iovec.
      memory = const_cast<char*>(file.blob) + source;
    } else if (kind == kSourceHost) {
      int64_t source_end = 0;
      if (source < 0 || __builtin_add_overflow(source, length, &source_end) ||
          (source == 0 && length > 0)) {
        bad_segment(file.path, i, "host address " + std::to_string(source) + " is invalid");
      }
      memory = reinterpret_cast<char*>(static_cast<uintptr_t>(source));
    } else {
      bad_segment(file.path, i, "unknown source kind " + std::to_string(kind));
    }
    if (length > 0) {
      segments.push_back(Segment{offset, length, memory});
      total += length;
    }
  }
  return total;
}

// A file's block CRCs are computed in items of whole blocks, about
// chunk_bytes each, like its write calls.
struct CrcItem {
  size_t file;
  int64_t first_block;
  int64_t blocks;
  // Index into WritePlan::crc_segments of the segment holding the first byte.
  size_t segment;
};

struct CrcFile {
  int64_t block = 0;  // 0: no CRCs for this file
  int64_t size = 0;
  int64_t blocks = 0;
};

// One unit of work for the threads: a write call or a CRC item.
struct Work {
  bool crc;
  size_t index;
};

struct WritePlan {
  std::vector<iovec> iovs;
  std::vector<IoCall> calls;
  std::vector<int64_t> bytes_per_file;
  std::vector<CrcFile> crc_files;
  // The segments of the files with CRCs, sorted, each file's contiguous.
  std::vector<Segment> crc_segments;
  // Grouped by file, in block order.
  std::vector<CrcItem> crc_items;
};

void plan_block_crcs(size_t file, int64_t block, const std::vector<Segment>& segments,
                     int64_t chunk_bytes, WritePlan& plan) {
  const size_t first = plan.crc_segments.size();
  plan.crc_segments.insert(plan.crc_segments.end(), segments.begin(), segments.end());
  const int64_t size = segments.empty() ? 0 : segments.back().offset + segments.back().length;
  const int64_t blocks = size / block + (size % block != 0 ? 1 : 0);
  plan.crc_files[file] = CrcFile{block, size, blocks};
  const int64_t per_item = std::max<int64_t>(1, chunk_bytes / block);
  size_t segment = first;
  for (int64_t b = 0; b < blocks; b += per_item) {
    const int64_t start = b * block;  // < size: no overflow
    while (plan.crc_segments[segment].offset + plan.crc_segments[segment].length <= start) {
      ++segment;
    }
    plan.crc_items.push_back(CrcItem{file, b, std::min(per_item, blocks - b), segment});
  }
}

WritePlan plan_writes(const std::vector<WriteFileSpec>& files, const WriteOptions& options) {
  WritePlan plan;
  plan.bytes_per_file.reserve(files.size());
  plan.crc_files.resize(files.size());
  CallBuilder builder(plan.iovs, plan.calls, options.chunk_bytes);
  std::vector<Segment> segments;  // reused across files
  auto before = [](const Segment& a, const Segment& b) { return a.offset < b.offset; };
  for (size_t f = 0; f < files.size(); ++f) {
    const WriteFileSpec& file = files[f];
    if (file.crc_block < 0) {
      throw PlanError("write plan for " + file.path + ": negative crc_block " +
                      std::to_string(file.crc_block));
    }
    segments.clear();
    plan.bytes_per_file.push_back(collect_segments(file, segments));
    if (!std::is_sorted(segments.begin(), segments.end(), before)) {
      std::sort(segments.begin(), segments.end(), before);
    }
    builder.begin_file(f);
    int64_t covered = 0;  // end of the previous segment
    for (const Segment& segment : segments) {
      // Overlapping segments would race between threads: the plan is wrong.
      if (segment.offset < covered) {
        throw PlanError("write plan for " + file.path + ": segments overlap at file offset " +
                        std::to_string(segment.offset));
      }
      // A hole's bytes come from no memory, so no CRC could cover them.
      if (file.crc_block > 0 && segment.offset > covered) {
        throw PlanError("write plan for " + file.path +
                        ": crc_block needs segments that cover the file, but nothing covers [" +
                        std::to_string(covered) + ", " + std::to_string(segment.offset) + ")");
      }
      covered = segment.offset + segment.length;
      builder.add(segment.offset, segment.source, segment.length);
    }
    builder.end_file();
    if (file.crc_block > 0) {
      plan_block_crcs(f, file.crc_block, segments, options.chunk_bytes, plan);
    }
  }
  return plan;
}

// The order in which threads take the work: each file's CRC items right
// after the write call that covers their first byte, so the source memory is
// read by the CRC while the write still has it in cache, and the CRCs finish
// with the writes instead of after them.
std::vector<Work> schedule(const WritePlan& plan) {
  const size_t file_count = plan.crc_files.size();
  std::vector<size_t> next(file_count, 0);
  std::vector<size_t> stop(file_count, 0);
  for (size_t i = plan.crc_items.size(); i-- > 0;) {
    next[plan.crc_items[i].file] = i;
    stop[plan.crc_items[i].file] = std::max(stop[plan.crc_items[i].file], i + 1);
  }
  std::vector<Work> order;
  order.reserve(plan.calls.size() + plan.crc_items.size());
  for (size_t c = 0; c < plan.calls.size(); ++c) {
    order.push_back(Work{false, c});
    const IoCall& call = plan.calls[c];
    const size_t f = call.file;
    const int64_t block = plan.crc_files[f].block;
    const int64_t call_end = call.offset + call.bytes;
    while (next[f] < stop[f] && plan.crc_items[next[f]].first_block * block < call_end) {
      order.push_back(Work{true, next[f]++});
    }
  }
  for (size_t f = 0; f < file_count; ++f) {
    for (; next[f] < stop[f]; ++next[f]) {
      order.push_back(Work{true, next[f]});
    }
  }
  return order;
}

// The CRCs of one item's blocks, streamed over the segments each block spans.
void compute_block_crcs(const CrcItem& item, const Segment* segments, const CrcFile& file,
                        uint32_t* out, Crc32cFunction crc32c) {
  const Segment* segment = segments + item.segment;
  int64_t pos = item.first_block * file.block;
  for (int64_t b = item.first_block; b < item.first_block + item.blocks; ++b) {
    const int64_t end = pos + std::min(file.block, file.size - pos);
    uint32_t crc = 0;
    while (pos < end) {
      const int64_t segment_end = segment->offset + segment->length;
      const int64_t take = std::min(end, segment_end) - pos;
      crc = crc32c(segment->source + (pos - segment->offset), static_cast<size_t>(take), crc);
      pos += take;
      if (pos == segment_end) {
        ++segment;
      }
    }
    out[b] = crc;
  }
}

}  // namespace

WriteResult write_files(const std::vector<WriteFileSpec>& files, const WriteOptions& options) {
  if (options.threads < 1) {
    throw PlanError("threads must be at least 1, got " + std::to_string(options.threads));
  }
  if (options.chunk_bytes < 1) {
    throw PlanError("chunk_bytes must be at least 1, got " + std::to_string(options.chunk_bytes));
  }
  WritePlan plan = plan_writes(files, options);
  plan.calls = interleave_files(plan.calls, files.size(), static_cast<size_t>(options.threads));
  const std::vector<Work> order = schedule(plan);

  WriteResult result;
  result.bytes_per_file = std::move(plan.bytes_per_file);
  result.block_crcs.resize(files.size());
  for (size_t f = 0; f < files.size(); ++f) {
    result.block_crcs[f].resize(static_cast<size_t>(plan.crc_files[f].blocks));
  }

  std::unique_ptr<SharedFile[]> shared = share_files(files.size(), plan.calls);
  FaultInjector faults(options.faults);
  const IoHooks hooks{options.short_io_cap, &faults};
  const Crc32cFunction crc32c = options.crc32c != nullptr ? options.crc32c : crc32c_best();

  WorkQueue queue(order.size());
  auto worker = [&]() {
    size_t index = 0;
    while (queue.next(index)) {
      const Work& work = order[index];
      if (work.crc) {
        const CrcItem& item = plan.crc_items[work.index];
        compute_block_crcs(item, plan.crc_segments.data(), plan.crc_files[item.file],
                           result.block_crcs[item.file].data(), crc32c);
        continue;
      }
      const IoCall& call = plan.calls[work.index];
      const WriteFileSpec& file = files[call.file];
      SharedFile& shared_file = shared[call.file];
      const int fd =
          shared_file.acquire([&file, &hooks]() { return open_for_write(file.path, hooks); });
      if (call.iov_count > 0) {
        // Each call runs once, on one thread, so it may consume its own iovecs.
        write_fully(fd, plan.iovs.data() + call.first_iov, call.iov_count, call.offset,
                    call.bytes, file.path, hooks);
      }
      if (shared_file.finish_piece()) {
        // The last piece's worker syncs and closes, so files finish in
        // parallel instead of in a serial pass at the end.
        FdGuard guard(shared_file.release());
        if (options.sync) {
          sync_file(guard.get(), file.path, hooks);
        }
        close_file(guard.release(), file.path, hooks);
      }
    }
  };
  run_workers(queue, std::min(static_cast<size_t>(options.threads), queue.size()), worker);
  return result;
}

}  // namespace dcp_native
