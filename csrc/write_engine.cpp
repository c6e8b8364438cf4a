// Write planning and execution (see write_engine.hpp).
#include "write_engine.hpp"

#include <sys/uio.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>

#include "block_crc.hpp"
#include "call_plan.hpp"
#include "file_io.hpp"
#include "io_error.hpp"
#include "thread_pool.hpp"

namespace dcp_native {

namespace {

// Host writes go in steps of about this many bytes (whole blocks when checksummed).
constexpr int64_t kWriteStep = int64_t{256} << 10;

// Hands out consecutive byte ranges of an iovec array as iovec arrays.
class IovecCursor {
 public:
  explicit IovecCursor(const iovec* iovs) noexcept : iov_(iovs) {}
  // The next `bytes` into out (at most kMaxIovecs entries: the call's own
  // iovecs, cut at the ends); returns how many.
  int take(int64_t bytes, iovec* out) noexcept {
    int n = 0;
    while (bytes > 0) {
      const size_t left = iov_->iov_len - used_;
      const size_t take = std::min(left, static_cast<size_t>(bytes));
      out[n++] = iovec{static_cast<char*>(iov_->iov_base) + used_, take};
      bytes -= static_cast<int64_t>(take);
      used_ += take;
      if (used_ == iov_->iov_len) {
        ++iov_;
        used_ = 0;
      }
    }
    return n;
  }

 private:
  const iovec* iov_;
  size_t used_ = 0;
};

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
    } else if (kind == kSourceHost || kind == kSourceDevice) {
      int64_t source_end = 0;
      if (source < 0 || __builtin_add_overflow(source, length, &source_end) ||
          (source == 0 && length > 0)) {
        bad_segment(file.path, i, (kind == kSourceHost ? "host address " : "device address ") +
                                      std::to_string(source) + " is invalid");
      }
      if (kind == kSourceDevice && file.device < 0 && length > 0) {
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

// A piece of a device segment, copied through one pinned buffer.
struct DevicePiece {
  size_t file;
  int64_t offset;
  int64_t length;
  uintptr_t source;
};

enum class WorkKind { kCall, kDevice };

// One unit of work for the threads: a write call or a device piece (by its
// position in issue order) of file `file`. Each checksums what it writes
// (block_crc.hpp).
struct Work {
  WorkKind kind;
  size_t index;
  size_t file;
};

struct WritePlan {
  std::vector<iovec> iovs;
  std::vector<IoCall> calls;
  std::vector<int64_t> bytes_per_file;
  // Per file: its blocks (block 0: no checksums), and its device pieces.
  std::vector<BlockGrid> grids;
  std::vector<std::vector<DevicePiece>> device_pieces;
};

WritePlan plan_writes(const std::vector<WriteFileSpec>& files, const WriteOptions& options,
                      int64_t piece_bytes) {
  WritePlan plan;
  plan.bytes_per_file.reserve(files.size());
  plan.grids.resize(files.size());
  plan.device_pieces.resize(files.size());
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
      if (!segment.device) {
        builder.add(segment.offset, segment.source, segment.length);
        continue;
      }
      // Device memory is copied in pieces of `piece_bytes` (the pool's buffer size).
      for (int64_t pos = segment.offset; pos < covered; pos += piece_bytes) {
        const uintptr_t source = reinterpret_cast<uintptr_t>(segment.source) +
                                 static_cast<uintptr_t>(pos - segment.offset);
        plan.device_pieces[f].push_back(
            DevicePiece{f, pos, std::min(piece_bytes, covered - pos), source});
      }
    }
    builder.end_file();
    plan.grids[f] = BlockGrid{file.crc_block, file.crc_block > 0 ? covered : 0};
  }
  return plan;
}

// The order in which threads take the work: the calls, and a file's device
// pieces after its last call (every file has one), so files open and close
// in the waves of interleave_files. Device pieces are appended to `pieces`
// in that order, which is the order the issuer copies them in: a worker
// waiting for piece k then only waits for buffers that pieces before k
// hold, and those are taken.
std::vector<Work> schedule(const WritePlan& plan, std::vector<DevicePiece>& pieces) {
  std::vector<size_t> calls_left(plan.grids.size(), 0);
  for (const IoCall& call : plan.calls) {
    ++calls_left[call.file];
  }
  std::vector<Work> order;
  for (size_t c = 0; c < plan.calls.size(); ++c) {
    const size_t f = plan.calls[c].file;
    order.push_back(Work{WorkKind::kCall, c, f});
    if (--calls_left[f] == 0) {
      for (const DevicePiece& piece : plan.device_pieces[f]) {
        order.push_back(Work{WorkKind::kDevice, pieces.size(), f});
        pieces.push_back(piece);
      }
    }
  }
  return order;
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
        slots_(pieces.size()), streams_(new CallStreams(runtime_)) {}
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
  // failure left behind, on an engine thread. With `check`, a failing stream
  // synchronisation throws (a successful call must not return before its
  // copies are done).
  void finish(bool check) {
    if (thread_.joinable()) {
      thread_.join();
    }
    if (finished_) {
      return;
    }
    finished_ = true;
    cuda::Error first = cuda::kSuccess;
    std::string operation;
    try {
      on_engine_thread(runtime_, [&](ThreadDevice& device) {
        first = streams_->synchronize(device, &operation);
        for (size_t k = 0; k < slots_.size(); ++k) {
          if (slots_[k].buffer != nullptr) {
            device.set(files_[pieces_[k].file].device);
            consumed(slots_[k]);
          }
        }
        streams_.reset();
      });
    } catch (...) {
      if (check) {
        throw;
      }
    }
    if (check && first != cuda::kSuccess) {
      runtime_.fail(first, operation);
    }
  }

 private:
  void issue_all() {
    try {
      ThreadDevice device(runtime_);
      // Work queued on each producer stream before the call (the kernels
      // that wrote the tensors) completes before the copy stream reads it.
      CallerStreams producers;
      for (const DevicePiece& piece : pieces_) {
        const WriteFileSpec& file = files_[piece.file];
        producers.emplace(std::make_pair(file.device, file.stream), &file.path);
      }
      streams_->wait_for(device, producers, "the producer stream");
      for (size_t k = 0; k < pieces_.size(); ++k) {
        const DevicePiece& piece = pieces_[k];
        const WriteFileSpec& file = files_[piece.file];
        device.set(file.device);
        const cuda::Stream stream = streams_->get(file.device);
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
  // Only the issuer uses it until it is joined; reset by finish().
  std::unique_ptr<CallStreams> streams_;
  bool finished_ = false;
};

// The device of the first file with device memory, -1 for none (or for a
// file without a device: planning reports it).
int first_device(const std::vector<WriteFileSpec>& files) {
  for (const WriteFileSpec& file : files) {
    if (file.segments_length % 4 != 0) {
      continue;  // planning reports it
    }
    for (size_t i = 0; i < file.segments_length; i += 4) {
      if (file.segments[i + 1] == kSourceDevice && file.segments[i + 3] > 0) {
        return file.device;
      }
    }
  }
  return -1;
}

}  // namespace

WriteResult write_files(const std::vector<WriteFileSpec>& files, const WriteOptions& options) {
  check_options(options);
  const std::shared_ptr<PinnedPool> pool = call_pool(options, first_device(files));
  WritePlan plan = plan_writes(files, options, pool ? pool->chunk_bytes() : 1);
  plan.calls = interleave_files(plan.calls, files.size(), static_cast<size_t>(options.threads));
  std::vector<DevicePiece> pieces;
  const std::vector<Work> order = schedule(plan, pieces);

  WriteResult result;
  result.bytes_per_file = std::move(plan.bytes_per_file);
  result.block_crcs.resize(files.size());
  for (size_t f = 0; f < files.size(); ++f) {
    result.block_crcs[f].resize(static_cast<size_t>(plan.grids[f].blocks()));
  }
  const Crc32cFunction crc32c = options.crc32c != nullptr ? options.crc32c : crc32c_select(false);
  // Each work item's pieces of the blocks it shares with others (block_crc.hpp).
  std::vector<BlockPiece> shared_blocks(2 * order.size());
  std::vector<int> shared_count(order.size(), 0);
  auto checksum = [&](size_t index, size_t f, int64_t offset, int64_t bytes, const iovec* iovs) {
    const BlockGrid& grid = plan.grids[f];
    if (grid.block > 0 && bytes > 0) {
      uint32_t* out = result.block_crcs[f].data();
      shared_count[index] = checksum_range(
          grid, offset, bytes, iovs, crc32c, [out](int64_t k, uint32_t crc) { out[k] = crc; },
          &shared_blocks[2 * index]);
    }
  };

  std::unique_ptr<SharedFile[]> shared = share_files(files.size(), order);
  std::unique_ptr<DirectFile[]> direct(new DirectFile[files.size()]);
  FaultInjector faults(options.faults);
  const IoHooks hooks{options.short_io_cap, &faults};
  const bool use_direct = direct_allowed(options.direct_io, hooks);

  WorkQueue queue(order.size());
  std::unique_ptr<PinnedPool::Use> pool_use;
  std::unique_ptr<DeviceStaging> staging;
  if (!pieces.empty()) {
    pool_use.reset(new PinnedPool::Use(*pool));
    staging.reset(new DeviceStaging(files, pieces, *pool, queue));
  }

  auto worker = [&]() {
    std::unique_ptr<ThreadDevice> device;
    if (staging) {
      device.reset(new ThreadDevice(staging->runtime()));
    }
    size_t index = 0;
    while (queue.next(index)) {
      const Work& work = order[index];
      const WriteFileSpec& file = files[work.file];
      SharedFile& shared_file = shared[work.file];
      auto open = [&file, &hooks]() { return open_for_write(file.path, hooks); };
      if (work.kind == WorkKind::kDevice) {
        const DevicePiece& piece = pieces[work.index];
        Slot* slot = staging->wait_issued(work.index);
        if (slot == nullptr) {
          return;  // the call failed; the error is recorded
        }
        device->set(file.device);
        CudaRuntime& runtime = staging->runtime();
        runtime.check(runtime.api().event_synchronize(slot->event),
                      "cudaEventSynchronize after the " + d2h_operation(file.path, piece, file.device));
        const int fd = shared_file.acquire(open);
        direct[work.file].write(fd, use_direct, slot->buffer, piece.offset, piece.length,
                                file.path, hooks, options.direct_refusal);
        if (options.sync) {
          start_writeback(fd, piece.offset, piece.length);
        }
        const iovec pinned{slot->buffer, static_cast<size_t>(piece.length)};
        checksum(index, work.file, piece.offset, piece.length, &pinned);
        staging->consumed(*slot);
      } else {
        const IoCall& call = plan.calls[work.index];
        const int fd = shared_file.acquire(open);
        if (call.iov_count > 0) {
          // In steps of about kWriteStep, whole blocks when checksummed:
          // each step is checksummed, then written while the CRC's reads
          // keep it in cache (one pass over memory, not two), and the page
          // cache takes modest writes (one of 8 MiB holds the file's lock
          // while it copies and starts writeback late: up to 2x slower
          // here). Steps end on block boundaries, so only the call's ends
          // can hold part of a block.
          const BlockGrid& grid = plan.grids[work.file];
          const int64_t step = grid.block == 0 ? kWriteStep
                                               : std::max<int64_t>(1, kWriteStep / grid.block) * grid.block;
          IovecCursor cursor(plan.iovs.data() + call.first_iov);
          iovec step_iovs[kMaxIovecs];
          BlockPiece ends[2];
          int count = 0;
          for (int64_t pos = call.offset, end = call.offset + call.bytes; pos < end;) {
            const int64_t next = std::min(end, (pos / step + 1) * step);
            const int n = cursor.take(next - pos, step_iovs);
            if (grid.block > 0) {
              const int found = checksum_range(
                  grid, pos, next - pos, step_iovs, crc32c,
                  [&](int64_t k, uint32_t crc) { result.block_crcs[work.file][k] = crc; }, ends);
              std::copy(ends, ends + found, &shared_blocks[2 * index] + count);
              count += found;
            }
            write_fully(fd, step_iovs, n, pos, next - pos, file.path, hooks);
            pos = next;
          }
          shared_count[index] = count;
          if (options.sync) {
            start_writeback(fd, call.offset, call.bytes);
          }
        }
      }
      if (shared_file.finish_piece()) {
        // The last piece's worker syncs and closes, so files finish in
        // parallel instead of in a serial pass at the end.
        direct[work.file].close();
        FdGuard guard(shared_file.release());
        if (options.sync) {
          sync_file(guard.get(), file.path, hooks);
        }
        close_file(guard.release(), file.path, hooks);
      }
    }
  };
  if (staging) {
    staging->start();
  }
  // On failure, staging's destructor joins the issuer and cleans up. With
  // device memory the caller's thread does no work: it makes no runtime call.
  run_workers(queue, std::min(static_cast<size_t>(options.threads), queue.size()), worker,
              !staging);
  if (staging) {
    staging->finish(true);
    queue.rethrow_if_failed();
  }
  std::vector<std::vector<BlockPiece>> by_file(files.size());
  for (size_t i = 0; i < order.size(); ++i) {
    std::vector<BlockPiece>& joined = by_file[order[i].file];
    joined.insert(joined.end(), &shared_blocks[2 * i], &shared_blocks[2 * i] + shared_count[i]);
  }
  for (size_t f = 0; f < files.size(); ++f) {
    uint32_t* out = result.block_crcs[f].data();
    join_pieces(by_file[f], plan.grids[f], [out](int64_t k, uint32_t crc) { out[k] = crc; });
  }
  return result;
}

}  // namespace dcp_native
