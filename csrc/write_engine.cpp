// Write planning and execution (see write_engine.hpp).
#include "write_engine.hpp"

#include <sys/uio.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>

#include "call_plan.hpp"
#include "file_io.hpp"
#include "io_error.hpp"
#include "thread_pool.hpp"

namespace dcp_native {

namespace {

struct Segment {
  int64_t offset;
  int64_t length;
  // Host memory, or a device address for device segments.
  char* source;
  bool device = false;
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
    } else if (kind == kSourceDevice) {
      int64_t source_end = 0;
      if (source < 0 || __builtin_add_overflow(source, length, &source_end) ||
          (source == 0 && length > 0)) {
        bad_segment(file.path, i, "device address " + std::to_string(source) + " is invalid");
      }
      if (file.device < 0 && length > 0) {
        bad_segment(file.path, i,
                    "device memory, but the file's device is " + std::to_string(file.device));
      }
      memory = reinterpret_cast<char*>(static_cast<uintptr_t>(source));
    } else {
      bad_segment(file.path, i, "unknown source kind " + std::to_string(kind));
    }
    if (length > 0) {
      segments.push_back(Segment{offset, length, memory, kind == kSourceDevice});
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

// Files with device memory get their block CRCs from ranges of their
// content (host memory, or one device piece's pinned copy) checksummed
// independently: a range stores the CRCs of the blocks it covers whole and
// the CRCs of its parts of the (at most two) blocks it shares with its
// neighbours, which the caller combines once every range is done.
struct CrcRange {
  size_t file;
  int64_t offset;
  int64_t length;
  const char* source;  // host memory; null for a device piece's range
  uint32_t head = 0;   // its part of its first block, when not whole
  uint32_t tail = 0;   // its part of its last block, when not whole and not the first
};

// A piece of a device segment, copied through one pinned buffer.
struct DevicePiece {
  size_t file;
  int64_t offset;
  int64_t length;
  uintptr_t source;
  size_t range;  // its CrcRange, or kNoRange
};
constexpr size_t kNoRange = static_cast<size_t>(-1);

enum class WorkKind { kCall, kCrc, kRange, kDevice };

// One unit of work for the threads: a write call, a CRC item, a CRC range or
// a device piece (by its position in issue order).
struct Work {
  WorkKind kind;
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
  // Files with device memory: their CRC ranges (in file order, each file's
  // contiguous) and device pieces.
  std::vector<CrcRange> crc_ranges;
  std::vector<DevicePiece> device_pieces;
  // Per file: whether its CRCs come from ranges, and where its ranges start.
  std::vector<char> ranged;
  std::vector<size_t> first_range;
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

// The ranges and device pieces of a file with device memory. Host ranges
// are cut every `per_range` bytes of the file (whole blocks), device pieces
// every `piece_bytes` bytes of their segment (the pool's buffer size).
void plan_device_file(size_t file, const WriteFileSpec& spec, const std::vector<Segment>& segments,
                      int64_t chunk_bytes, int64_t piece_bytes, WritePlan& plan) {
  const bool crcs = spec.crc_block > 0;
  plan.ranged[file] = crcs ? 1 : 0;
  plan.first_range[file] = plan.crc_ranges.size();
  const int64_t block = spec.crc_block;
  const int64_t per_range = crcs ? std::max<int64_t>(1, chunk_bytes / block) * block : 0;
  for (const Segment& segment : segments) {
    const int64_t end = segment.offset + segment.length;
    if (segment.device) {
      for (int64_t pos = segment.offset; pos < end; pos += piece_bytes) {
        const int64_t length = std::min(piece_bytes, end - pos);
        size_t range = kNoRange;
        if (crcs) {
          range = plan.crc_ranges.size();
          plan.crc_ranges.push_back(CrcRange{file, pos, length, nullptr});
        }
        const uintptr_t source =
            reinterpret_cast<uintptr_t>(segment.source) + static_cast<uintptr_t>(pos - segment.offset);
        plan.device_pieces.push_back(DevicePiece{file, pos, length, source, range});
      }
    } else if (crcs) {
      for (int64_t pos = segment.offset; pos < end;) {
        const int64_t cut = std::min(end, (pos / per_range + 1) * per_range);
        plan.crc_ranges.push_back(
            CrcRange{file, pos, cut - pos, segment.source + (pos - segment.offset)});
        pos = cut;
      }
    }
  }
  if (crcs) {
    const int64_t size = segments.empty() ? 0 : segments.back().offset + segments.back().length;
    plan.crc_files[file] = CrcFile{block, size, size / block + (size % block != 0 ? 1 : 0)};
  }
}

WritePlan plan_writes(const std::vector<WriteFileSpec>& files, const WriteOptions& options,
                      int64_t piece_bytes) {
  WritePlan plan;
  plan.bytes_per_file.reserve(files.size());
  plan.crc_files.resize(files.size());
  plan.ranged.assign(files.size(), 0);
  plan.first_range.assign(files.size(), 0);
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
    bool has_device = false;
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
      if (segment.device) {
        has_device = true;
      } else {
        builder.add(segment.offset, segment.source, segment.length);
      }
    }
    builder.end_file();
    if (has_device) {
      plan_device_file(f, file, segments, options.chunk_bytes, piece_bytes, plan);
    } else if (file.crc_block > 0) {
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
  // A file's CRC ranges and device pieces follow its last write call, so
  // files open and close in the waves of interleave_files.
  std::vector<size_t> calls_left(file_count, 0);
  for (const IoCall& call : plan.calls) {
    ++calls_left[call.file];
  }
  std::vector<std::vector<size_t>> ranges(file_count);
  for (size_t r = 0; r < plan.crc_ranges.size(); ++r) {
    if (plan.crc_ranges[r].source != nullptr) {
      ranges[plan.crc_ranges[r].file].push_back(r);
    }
  }
  std::vector<std::vector<size_t>> pieces(file_count);
  for (size_t p = 0; p < plan.device_pieces.size(); ++p) {
    pieces[plan.device_pieces[p].file].push_back(p);
  }
  std::vector<Work> order;
  order.reserve(plan.calls.size() + plan.crc_items.size() + plan.crc_ranges.size() +
                plan.device_pieces.size());
  for (size_t c = 0; c < plan.calls.size(); ++c) {
    order.push_back(Work{WorkKind::kCall, c});
    const IoCall& call = plan.calls[c];
    const size_t f = call.file;
    const int64_t block = plan.crc_files[f].block;
    const int64_t call_end = call.offset + call.bytes;
    while (next[f] < stop[f] && plan.crc_items[next[f]].first_block * block < call_end) {
      order.push_back(Work{WorkKind::kCrc, next[f]++});
    }
    if (--calls_left[f] == 0) {
      for (size_t r : ranges[f]) {
        order.push_back(Work{WorkKind::kRange, r});
      }
      for (size_t p : pieces[f]) {
        order.push_back(Work{WorkKind::kDevice, p});
      }
    }
  }
  for (size_t f = 0; f < file_count; ++f) {
    for (; next[f] < stop[f]; ++next[f]) {
      order.push_back(Work{WorkKind::kCrc, next[f]});
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

// The part of block `block` that [pos, end) covers, up to `stop`.
struct BlockPart {
  int64_t block;
  int64_t stop;
  bool starts_block;  // pos is the block's first byte
  bool ends_block;    // stop is the block's end
  bool whole;         // both: the range holds the whole block
};

BlockPart block_part(int64_t pos, int64_t end, const CrcFile& file) noexcept {
  const int64_t b = pos / file.block;
  const int64_t block_start = b * file.block;
  const int64_t block_end = std::min(block_start + file.block, file.size);
  const int64_t stop = std::min(end, block_end);
  const bool starts = pos == block_start;
  const bool ends = stop == block_end;
  return BlockPart{b, stop, starts, ends, starts && ends};
}

// Checksums one range (`data` holds its bytes): the blocks it covers whole
// go straight to `out`, its parts of shared blocks to head and tail.
void checksum_range(CrcRange& range, const char* data, const CrcFile& file, uint32_t* out,
                    Crc32cFunction crc32c) {
  const int64_t end = range.offset + range.length;
  int64_t pos = range.offset;
  while (pos < end) {
    const BlockPart part = block_part(pos, end, file);
    const int64_t stop = part.stop;
    const uint32_t crc =
        crc32c(data + (pos - range.offset), static_cast<size_t>(stop - pos), 0);
    if (part.whole) {
      out[part.block] = crc;
    } else if (pos == range.offset) {
      range.head = crc;
    } else {
      range.tail = crc;
    }
    pos = stop;
  }
}

// The CRCs of the blocks a file's ranges share, combined in file order.
void combine_ranges(const CrcRange* ranges, size_t count, const CrcFile& file, uint32_t* out) {
  uint32_t crc = 0;
  for (size_t r = 0; r < count; ++r) {
    const CrcRange& range = ranges[r];
    const int64_t end = range.offset + range.length;
    int64_t pos = range.offset;
    while (pos < end) {
      const BlockPart part = block_part(pos, end, file);
      const int64_t stop = part.stop;
      if (!part.whole) {
        const uint32_t piece = pos == range.offset ? range.head : range.tail;
        crc = part.starts_block
                  ? piece
                  : crc32c_combine(crc, piece, static_cast<uint64_t>(stop - pos));
        if (part.ends_block) {
          out[part.block] = crc;
        }
      }
      pos = stop;
      // Blocks in the middle of the range are whole: jump to its last block.
      const int64_t last_start = (end - 1) / file.block * file.block;
      if (pos < last_start) {
        pos = last_start;
      }
    }
  }
}

std::string d2h_operation(const std::string& path, const DevicePiece& piece, int device) {
  return "cudaMemcpyAsync D2H of " + path + " at offset " + std::to_string(piece.offset) + " (" +
         std::to_string(piece.length) + " bytes from device " + std::to_string(device) +
         " address " + hex_address(piece.source) + ")";
}

// One issued device piece: its pinned buffer and the event after its copy.
// The issuer fills it, one worker consumes it; whatever is left after the
// workers stop (a failed call) is cleaned up by the caller.
struct Slot {
  char* buffer = nullptr;
  cuda::Event event = nullptr;
};

// The device half of a write call: the issuing thread and what it shares
// with the workers.
class DeviceStaging {
 public:
  DeviceStaging(const std::vector<WriteFileSpec>& files, const std::vector<DevicePiece>& pieces,
                PinnedPool& pool, WorkQueue& queue)
      : files_(files), pieces_(pieces), pool_(pool), runtime_(*pool.runtime()), queue_(queue),
        slots_(pieces.size()) {}
  DeviceStaging(const DeviceStaging&) = delete;
  DeviceStaging& operator=(const DeviceStaging&) = delete;
  ~DeviceStaging() { finish(false); }

  CudaRuntime& runtime() { return runtime_; }

  void start() { thread_ = std::thread([this] { issue_all(); }); }

  // The issued slot of the piece at position `k` of issue order, or null once
  // the call failed (the worker then stops).
  Slot* wait_issued(size_t k) {
    std::unique_lock<std::mutex> lock(mutex_);
    while (issued_ <= k) {
      if (queue_.failed()) {
        return nullptr;
      }
      // Timed: a worker's failure does not notify this condition.
      issued_changed_.wait_for(lock, std::chrono::milliseconds(20));
    }
    return &slots_[k];
  }

  // A worker is done with a slot: the buffer goes back to the pool.
  void consumed(Slot& slot) {
    if (slot.event != nullptr) {
      runtime_.api().event_destroy(slot.event);
      slot.event = nullptr;
    }
    pool_.release(slot.buffer);
    slot.buffer = nullptr;
  }

  // Joins the issuer, waits for the copy streams and gives back whatever a
  // failure left behind. With `check`, a failing stream synchronisation
  // throws (a successful call must not return before its copies are done).
  void finish(bool check) {
    if (thread_.joinable()) {
      thread_.join();
    }
    if (finished_) {
      return;
    }
    finished_ = true;
    DeviceGuard guard(runtime_);
    cuda::Error first = cuda::kSuccess;
    std::string operation;
    for (const auto& used : streams_) {
      const cuda::Error code = [&] {
        try {
          guard.set(used.first);
        } catch (const CudaCallError& error) {
          return static_cast<cuda::Error>(error.code());
        }
        return runtime_.api().stream_synchronize(used.second);
      }();
      if (code != cuda::kSuccess && first == cuda::kSuccess) {
        first = code;
        operation = "cudaStreamSynchronize of the copy stream of device " +
                    std::to_string(used.first);
      }
    }
    for (Slot& slot : slots_) {
      if (slot.buffer != nullptr) {
        consumed(slot);
      }
    }
    for (cuda::Event event : producer_events_) {
      runtime_.api().event_destroy(event);
    }
    producer_events_.clear();
    if (check && first != cuda::kSuccess) {
      runtime_.fail(first, operation);
    }
  }

 private:
  void issue_all() {
    try {
      DeviceGuard guard(runtime_);
      wait_for_producers(guard);
      for (size_t k = 0; k < pieces_.size(); ++k) {
        const DevicePiece& piece = pieces_[k];
        const WriteFileSpec& file = files_[piece.file];
        guard.set(file.device);
        const cuda::Stream stream = copy_stream(file.device);
        char* buffer = pool_.acquire(queue_.failed_flag());
        if (buffer == nullptr) {
          return;  // the call failed
        }
        Slot& slot = slots_[k];
        slot.buffer = buffer;
        const cuda::Api& api = runtime_.api();
        runtime_.check(api.event_create_with_flags(
                           &slot.event, cuda::kEventBlockingSync | cuda::kEventDisableTiming),
                       "cudaEventCreateWithFlags for the D2H copy of " + file.path);
        runtime_.check(
            api.memcpy_async(buffer, reinterpret_cast<const void*>(piece.source),
                             static_cast<size_t>(piece.length), cuda::kDeviceToHost, stream),
            d2h_operation(file.path, piece, file.device));
        runtime_.check(api.event_record(slot.event, stream),
                       "cudaEventRecord after the D2H copy of " + file.path + " at offset " +
                           std::to_string(piece.offset));
        {
          std::lock_guard<std::mutex> lock(mutex_);
          issued_ = k + 1;
        }
        issued_changed_.notify_all();
      }
    } catch (...) {
      queue_.fail(std::current_exception());
      issued_changed_.notify_all();
    }
  }

  cuda::Stream copy_stream(int device) {
    auto found = streams_.find(device);
    if (found != streams_.end()) {
      return found->second;
    }
    const cuda::Stream stream = runtime_.copy_stream(device);
    streams_.emplace(device, stream);
    return stream;
  }

  // Work queued on each producer stream before the call (the kernels that
  // wrote the tensors) completes before the copy stream reads the memory.
  void wait_for_producers(DeviceGuard& guard) {
    std::map<std::pair<int, int64_t>, const std::string*> producers;
    for (const DevicePiece& piece : pieces_) {
      const WriteFileSpec& file = files_[piece.file];
      producers.emplace(std::make_pair(file.device, file.stream), &file.path);
    }
    const cuda::Api& api = runtime_.api();
    for (const auto& producer : producers) {
      const int device = producer.first.first;
      const int64_t stream_value = producer.first.second;
      guard.set(device);
      const cuda::Stream copy = copy_stream(device);
      const cuda::Stream stream =
          reinterpret_cast<cuda::Stream>(static_cast<uintptr_t>(stream_value));
      const std::string where = "the producer stream " +
                                hex_address(static_cast<uintptr_t>(stream_value)) +
                                " of device " + std::to_string(device) + " (writing " +
                                *producer.second + ")";
      cuda::Event event = nullptr;
      runtime_.check(api.event_create_with_flags(&event, cuda::kEventDisableTiming),
                     "cudaEventCreateWithFlags for " + where);
      producer_events_.push_back(event);
      runtime_.check(api.event_record(event, stream), "cudaEventRecord on " + where);
      runtime_.check(api.stream_wait_event(copy, event, 0),
                     "cudaStreamWaitEvent of the copy stream on " + where);
    }
  }

  const std::vector<WriteFileSpec>& files_;
  const std::vector<DevicePiece>& pieces_;
  PinnedPool& pool_;
  CudaRuntime& runtime_;
  WorkQueue& queue_;
  std::vector<Slot> slots_;
  std::mutex mutex_;
  std::condition_variable issued_changed_;
  size_t issued_ = 0;
  std::thread thread_;
  // Only the issuer touches these until it is joined.
  std::map<int, cuda::Stream> streams_;
  std::vector<cuda::Event> producer_events_;
  bool finished_ = false;
};

// Writes a piece from a pinned buffer: its page-aligned part with O_DIRECT
// when allowed and accepted, the rest through the normal descriptor.
void write_pinned(int fd, DirectFile& direct, bool use_direct, const char* buffer,
                  int64_t offset, int64_t length, const std::string& path, const IoHooks& hooks,
                  DirectRefusal refusal) {
  int64_t done = 0;
  if (use_direct && offset % kPageBytes == 0) {
    const int64_t aligned = length / kPageBytes * kPageBytes;
    if (aligned > 0 && direct.write(path, buffer, aligned, offset, hooks, refusal)) {
      done = aligned;
    }
  }
  if (done < length) {
    iovec iov{const_cast<char*>(buffer) + done, static_cast<size_t>(length - done)};
    write_fully(fd, &iov, 1, offset + done, length - done, path, hooks);
  }
}

bool has_device_memory(const std::vector<WriteFileSpec>& files, int* device) {
  for (const WriteFileSpec& file : files) {
    if (file.segments_length % 4 != 0) {
      continue;  // planning reports it
    }
    for (size_t i = 0; i < file.segments_length; i += 4) {
      if (file.segments[i + 1] == kSourceDevice && file.segments[i + 3] > 0) {
        *device = file.device;
        return true;
      }
    }
  }
  return false;
}

}  // namespace

WriteResult write_files(const std::vector<WriteFileSpec>& files, const WriteOptions& options) {
  if (options.threads < 1) {
    throw PlanError("threads must be at least 1, got " + std::to_string(options.threads));
  }
  if (options.chunk_bytes < 1) {
    throw PlanError("chunk_bytes must be at least 1, got " + std::to_string(options.chunk_bytes));
  }
  int first_device = -1;
  std::shared_ptr<PinnedPool> pool;
  int64_t piece_bytes = 1;
  if (has_device_memory(files, &first_device)) {
    pool = options.pool;
    if (!pool && first_device >= 0) {
      pool = std::make_shared<PinnedPool>(require_cuda_runtime(), first_device,
                                          kDefaultStagingBytes, kDefaultDeviceChunkBytes);
    }
    if (pool) {
      piece_bytes = pool->chunk_bytes();
    }
  }
  WritePlan plan = plan_writes(files, options, piece_bytes);
  plan.calls = interleave_files(plan.calls, files.size(), static_cast<size_t>(options.threads));
  std::vector<Work> order = schedule(plan);
  // Device pieces are numbered in the order workers take them, which is the
  // order the issuer copies them in: a worker waiting for piece k then only
  // waits for buffers that pieces before k hold, and those are taken.
  std::vector<DevicePiece> pieces;
  pieces.reserve(plan.device_pieces.size());
  for (Work& work : order) {
    if (work.kind == WorkKind::kDevice) {
      pieces.push_back(plan.device_pieces[work.index]);
      work.index = pieces.size() - 1;
    }
  }

  WriteResult result;
  result.bytes_per_file = std::move(plan.bytes_per_file);
  result.block_crcs.resize(files.size());
  for (size_t f = 0; f < files.size(); ++f) {
    result.block_crcs[f].resize(static_cast<size_t>(plan.crc_files[f].blocks));
  }

  std::unique_ptr<SharedFile[]> shared = share_files(files.size(), plan.calls);
  std::vector<int64_t> device_pieces_per_file(files.size(), 0);
  for (const DevicePiece& piece : pieces) {
    ++device_pieces_per_file[piece.file];
  }
  for (size_t f = 0; f < files.size(); ++f) {
    if (device_pieces_per_file[f] > 0) {
      int64_t calls = 0;
      for (const IoCall& call : plan.calls) {
        calls += call.file == f ? 1 : 0;
      }
      shared[f].set_pieces(calls + device_pieces_per_file[f]);
    }
  }
  std::unique_ptr<DirectFile[]> direct(new DirectFile[files.size()]);
  FaultInjector faults(options.faults);
  const IoHooks hooks{options.short_io_cap, &faults};
  const bool use_direct = direct_allowed(options.direct_io, hooks);
  const Crc32cFunction crc32c = options.crc32c != nullptr ? options.crc32c : crc32c_best();

  WorkQueue queue(order.size());
  std::unique_ptr<PinnedPool::Use> pool_use;
  std::unique_ptr<DeviceStaging> staging;
  if (!pieces.empty()) {
    pool_use.reset(new PinnedPool::Use(*pool));
    staging.reset(new DeviceStaging(files, pieces, *pool, queue));
  }

  auto finish_file = [&](size_t f) {
    const WriteFileSpec& file = files[f];
    SharedFile& shared_file = shared[f];
    if (shared_file.finish_piece()) {
      // The last piece's worker syncs and closes, so files finish in
      // parallel instead of in a serial pass at the end.
      direct[f].close();
      FdGuard guard(shared_file.release());
      if (options.sync) {
        sync_file(guard.get(), file.path, hooks);
      }
      close_file(guard.release(), file.path, hooks);
    }
  };

  auto worker = [&]() {
    std::unique_ptr<DeviceGuard> device_guard;
    if (staging) {
      device_guard.reset(new DeviceGuard(staging->runtime()));
    }
    size_t index = 0;
    while (queue.next(index)) {
      const Work& work = order[index];
      if (work.kind == WorkKind::kCrc) {
        const CrcItem& item = plan.crc_items[work.index];
        compute_block_crcs(item, plan.crc_segments.data(), plan.crc_files[item.file],
                           result.block_crcs[item.file].data(), crc32c);
        continue;
      }
      if (work.kind == WorkKind::kRange) {
        CrcRange& range = plan.crc_ranges[work.index];
        checksum_range(range, range.source, plan.crc_files[range.file],
                       result.block_crcs[range.file].data(), crc32c);
        continue;
      }
      if (work.kind == WorkKind::kDevice) {
        const DevicePiece& piece = pieces[work.index];
        const WriteFileSpec& file = files[piece.file];
        Slot* slot = staging->wait_issued(work.index);
        if (slot == nullptr) {
          return;  // the call failed; the error is recorded
        }
        device_guard->set(file.device);
        CudaRuntime& runtime = staging->runtime();
        runtime.check(runtime.api().event_synchronize(slot->event),
                      "cudaEventSynchronize after the " + d2h_operation(file.path, piece, file.device));
        const int fd = shared[piece.file].acquire(
            [&file, &hooks]() { return open_for_write(file.path, hooks); });
        write_pinned(fd, direct[piece.file], use_direct, slot->buffer, piece.offset,
                     piece.length, file.path, hooks, options.direct_refusal);
        if (options.sync) {
          start_writeback(fd, piece.offset, piece.length);
        }
        if (piece.range != kNoRange) {
          checksum_range(plan.crc_ranges[piece.range], slot->buffer, plan.crc_files[piece.file],
                         result.block_crcs[piece.file].data(), crc32c);
        }
        staging->consumed(*slot);
        finish_file(piece.file);
        continue;
      }
      const IoCall& call = plan.calls[work.index];
      const WriteFileSpec& file = files[call.file];
      const int fd =
          shared[call.file].acquire([&file, &hooks]() { return open_for_write(file.path, hooks); });
      if (call.iov_count > 0) {
        // Each call runs once, on one thread, so it may consume its own iovecs.
        write_fully(fd, plan.iovs.data() + call.first_iov, call.iov_count, call.offset,
                    call.bytes, file.path, hooks);
        if (options.sync) {
          start_writeback(fd, call.offset, call.bytes);
        }
      }
      finish_file(call.file);
    }
  };
  if (staging) {
    staging->start();
  }
  try {
    run_workers(queue, std::min(static_cast<size_t>(options.threads), queue.size()), worker);
  } catch (...) {
    if (staging) {
      staging->finish(false);
    }
    throw;
  }
  if (staging) {
    staging->finish(true);
    queue.rethrow_if_failed();
  }
  for (size_t f = 0; f < files.size(); ++f) {
    if (plan.ranged[f] != 0) {
      const size_t first = plan.first_range[f];
      size_t stop = first;
      while (stop < plan.crc_ranges.size() && plan.crc_ranges[stop].file == f) {
        ++stop;
      }
      combine_ranges(plan.crc_ranges.data() + first, stop - first, plan.crc_files[f],
                     result.block_crcs[f].data());
    }
  }
  return result;
}

}  // namespace dcp_native
