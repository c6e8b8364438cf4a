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

struct WritePlan {
  std::vector<iovec> iovs;
  std::vector<IoCall> calls;
  std::vector<int64_t> bytes_per_file;
};

WritePlan plan_writes(const std::vector<WriteFileSpec>& files, const WriteOptions& options) {
  WritePlan plan;
  plan.bytes_per_file.reserve(files.size());
  CallBuilder builder(plan.iovs, plan.calls, options.chunk_bytes);
  std::vector<Segment> segments;  // reused across files
  auto before = [](const Segment& a, const Segment& b) { return a.offset < b.offset; };
  for (size_t f = 0; f < files.size(); ++f) {
    segments.clear();
    plan.bytes_per_file.push_back(collect_segments(files[f], segments));
    if (!std::is_sorted(segments.begin(), segments.end(), before)) {
      std::sort(segments.begin(), segments.end(), before);
    }
    builder.begin_file(f);
    for (size_t i = 0; i < segments.size(); ++i) {
      const Segment& segment = segments[i];
      // Overlapping segments would race between threads: the plan is wrong.
      if (i > 0 && segment.offset < segments[i - 1].offset + segments[i - 1].length) {
        throw PlanError("write plan for " + files[f].path + ": segments overlap at file offset " +
                        std::to_string(segment.offset));
      }
      builder.add(segment.offset, segment.source, segment.length);
    }
    builder.end_file();
  }
  return plan;
}

}  // namespace

std::vector<int64_t> write_files(const std::vector<WriteFileSpec>& files,
                                 const WriteOptions& options) {
  if (options.threads < 1) {
    throw PlanError("threads must be at least 1, got " + std::to_string(options.threads));
  }
  if (options.chunk_bytes < 1) {
    throw PlanError("chunk_bytes must be at least 1, got " + std::to_string(options.chunk_bytes));
  }
  WritePlan plan = plan_writes(files, options);
  plan.calls = interleave_files(plan.calls, files.size(), static_cast<size_t>(options.threads));

  std::unique_ptr<SharedFile[]> shared = share_files(files.size(), plan.calls);
  FaultInjector faults(options.faults);
  const IoHooks hooks{options.short_io_cap, &faults};

  WorkQueue queue(plan.calls.size());
  auto worker = [&]() {
    size_t index = 0;
    while (queue.next(index)) {
      const IoCall& call = plan.calls[index];
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
  return std::move(plan.bytes_per_file);
}

}  // namespace dcp_native
