// Read planning and execution (see read_engine.hpp).
#include "read_engine.hpp"

#include <sys/uio.h>

#include <algorithm>
#include <deque>
#include <memory>
#include <mutex>
#include <tuple>
#include <utility>

#include "call_plan.hpp"
#include "file_io.hpp"
#include "io_error.hpp"
#include "thread_pool.hpp"

namespace dcp_native {

namespace {

// One contiguous range of a box: `length` bytes at file `offset` to `dest`.
struct Run {
  int64_t offset;
  int64_t length;
  char* dest;
  // Position of the box's record in the file's copies: copies to the device
  // only join runs of one box into a 2-D copy (one destination allocation).
  int64_t box;
};

bool run_before(const Run& a, const Run& b) noexcept {
  // Ties on offset are ordered by length so that the merge decisions, hence
  // the stats, do not depend on the order of the records.
  return std::tie(a.offset, a.length) < std::tie(b.offset, b.length);
}

[[noreturn]] void bad_record(const std::string& path, size_t index, const std::string& why) {
  throw PlanError("read plan for " + path + ": copy record at index " + std::to_string(index) +
                  ": " + why);
}

// a + b * c for non-negative operands, false on int64 overflow.
bool add_product(int64_t a, int64_t b, int64_t c, int64_t& out) noexcept {
  int64_t product = 0;
  return !__builtin_mul_overflow(b, c, &product) && !__builtin_add_overflow(a, product, &out);
}

// Expands one validated box into runs (odometer over all but the innermost
// dimension, which is a tight loop).
void expand_box(int64_t box, int64_t file_offset, int64_t dest_addr, int64_t inner, int64_t ndim,
                const int64_t* counts, const int64_t* file_strides, const int64_t* dest_strides,
                std::vector<Run>& runs) {
  auto dest_at = [](int64_t addr) { return reinterpret_cast<char*>(static_cast<uintptr_t>(addr)); };
  if (ndim == 0) {
    runs.push_back(Run{file_offset, inner, dest_at(dest_addr), box});
    return;
  }
  const int64_t last = ndim - 1;
  int64_t index[kMaxNdim] = {};
  for (;;) {
    int64_t file_pos = file_offset;
    int64_t dest_pos = dest_addr;
    for (int64_t d = 0; d < last; ++d) {
      file_pos += index[d] * file_strides[d];
      dest_pos += index[d] * dest_strides[d];
    }
    for (int64_t k = 0; k < counts[last]; ++k) {
      runs.push_back(Run{file_pos, inner, dest_at(dest_pos), box});
      file_pos += file_strides[last];
      dest_pos += dest_strides[last];
    }
    int64_t d = last - 1;
    while (d >= 0 && ++index[d] == counts[d]) {
      index[d] = 0;
      --d;
    }
    if (d < 0) {
      return;
    }
  }
}

// Parses and validates a file's records, appending its runs; returns the end
// offset of the furthest run (0 if none).
int64_t collect_runs(const ReadFileSpec& file, std::vector<Run>& runs) {
  const int64_t* copies = file.copies;
  const size_t length = file.copies_length;
  int64_t furthest = 0;
  size_t pos = 0;
  while (pos < length) {
    const size_t record = pos;
    if (length - pos < 4) {
      bad_record(file.path, record, "truncated header (need 4 values, " +
                                        std::to_string(length - pos) + " left)");
    }
    const int64_t file_offset = copies[pos];
    const int64_t dest_addr = copies[pos + 1];
    const int64_t inner = copies[pos + 2];
    const int64_t ndim = copies[pos + 3];
    if (ndim < 0 || ndim > kMaxNdim) {
      bad_record(file.path, record,
                 "ndim " + std::to_string(ndim) + " is outside [0, " +
                     std::to_string(kMaxNdim) + "]");
    }
    const size_t dims = static_cast<size_t>(ndim);
    if ((length - pos - 4) / 3 < dims) {
      bad_record(file.path, record, "truncated: ndim " + std::to_string(ndim) + " needs " +
                                        std::to_string(3 * dims) + " more values");
    }
    const int64_t* counts = copies + pos + 4;
    const int64_t* file_strides = counts + dims;
    const int64_t* dest_strides = file_strides + dims;
    pos += 4 + 3 * dims;

    if (file_offset < 0 || dest_addr < 0 || inner < 0) {
      bad_record(file.path, record, "negative file offset, destination address or inner_bytes");
    }
    int64_t box_runs = 1;
    for (size_t d = 0; d < dims; ++d) {
      if (counts[d] < 0 || file_strides[d] < 0 || dest_strides[d] < 0) {
        bad_record(file.path, record, "negative count or stride in dimension " + std::to_string(d));
      }
      if (__builtin_mul_overflow(box_runs, counts[d], &box_runs)) {
        bad_record(file.path, record, "the number of runs overflows int64");
      }
    }
    if (box_runs == 0 || inner == 0) {
      continue;  // an empty box copies nothing
    }
    if (dest_addr == 0) {
      bad_record(file.path, record, "null destination address");
    }
    int64_t file_end = file_offset;
    int64_t dest_end = dest_addr;
    bool ok = true;
    for (size_t d = 0; d < dims && ok; ++d) {
      ok = add_product(file_end, counts[d] - 1, file_strides[d], file_end) &&
           add_product(dest_end, counts[d] - 1, dest_strides[d], dest_end);
    }
    ok = ok && !__builtin_add_overflow(file_end, inner, &file_end) &&
         !__builtin_add_overflow(dest_end, inner, &dest_end);
    if (!ok) {
      bad_record(file.path, record, "the box's file or memory range overflows int64");
    }
    furthest = std::max(furthest, file_end);
    runs.reserve(runs.size() + static_cast<size_t>(box_runs));
    expand_box(static_cast<int64_t>(record), file_offset, dest_addr, inner, ndim, counts,
               file_strides, dest_strides, runs);
  }
  return furthest;
}

struct ReadPlan {
  std::vector<iovec> iovs;
  // Per iovec: the box (record position) its run belongs to, -1 for a gap.
  std::vector<int64_t> iov_box;
  std::vector<IoCall> calls;
  // Per file: the size it must have, max(min_size, end of its furthest run).
  std::vector<int64_t> required;
  // Scratch a worker needs: the most gap bytes of one call (each gap has
  // its own, for the checks).
  int64_t scratch_bytes = 0;
  ReadStats stats;
};

void check_table(const ReadFileSpec& file, int64_t furthest) {
  const BlockGrid& grid = file.grid;
  if (grid.block <= 0 || grid.size < 0 ||
      file.crc_count != static_cast<size_t>(grid.blocks()) ||
      (file.crc_count > 0 && file.crcs == nullptr)) {
    throw PlanError("read plan for " + file.path + ": a checksum table of " +
                    std::to_string(file.crc_count) + " CRCs does not describe a file of " +
                    std::to_string(grid.size) + " bytes in blocks of " +
                    std::to_string(grid.block));
  }
  if (furthest > grid.size) {
    throw PlanError("read plan for " + file.path + ": a run ends at " + std::to_string(furthest) +
                    ", past the " + std::to_string(grid.size) +
                    " bytes the checksum table describes");
  }
}

// Packs a file's sorted runs into calls. Without a table, neighbouring runs
// share a call when should_merge says so and the call has room. With one,
// every group of runs is widened to the blocks it touches (the bytes around
// the runs read into scratch), and runs that share a block always share a
// group, whatever the call limits: calls then split only between blocks' bytes
// a call of the group holds in order, so every block is read whole.
void pack_runs(const ReadFileSpec& file, const std::vector<Run>& runs, CallBuilder& builder,
               int64_t max_gap) {
  const bool checked = file.has_table;
  const int64_t block = file.grid.block;
  auto block_end = [&](int64_t pos) {
    return std::min((pos + block - 1) / block * block, file.grid.size);
  };
  int64_t prev_length = 0;
  bool open = false;  // a group is open (for checked files)
  for (const Run& run : runs) {
    if (checked ? open : !builder.empty()) {
      const int64_t end = builder.end();
      const int64_t gap = run.offset - end;
      const bool merge =
          checked ? gap >= 0 && (run.offset / block * block < block_end(end) ||
                                 should_merge(prev_length, gap, run.length, max_gap))
                  : should_merge(prev_length, gap, run.length, max_gap) && builder.can_extend(gap);
      if (merge) {
        builder.add(end, nullptr, gap);  // the call has room (unchecked) or splits (checked)
      } else {
        if (checked) {
          builder.add(end, nullptr, block_end(end) - end);
        }
        builder.flush();
        open = false;
      }
    }
    if (checked && !open) {
      const int64_t start = run.offset / block * block;
      builder.add(start, nullptr, run.offset - start);
      open = true;
    }
    builder.add(run.offset, run.dest, run.length, run.box);
    prev_length = run.length;
  }
  if (checked && open) {
    builder.add(builder.end(), nullptr, block_end(builder.end()) - builder.end());
  }
}

ReadPlan plan_reads(const std::vector<ReadFileSpec>& files, const ReadOptions& options,
                    int64_t device_chunk_bytes) {
  ReadPlan plan;
  plan.required.reserve(files.size());
  CallBuilder host_builder(plan.iovs, plan.calls, options.chunk_bytes, &plan.iov_box);
  // A device file's calls each fill one pinned buffer.
  CallBuilder device_builder(plan.iovs, plan.calls,
                             std::min(options.chunk_bytes, device_chunk_bytes), &plan.iov_box);
  std::vector<Run> runs;  // reused across files
  for (size_t f = 0; f < files.size(); ++f) {
    const ReadFileSpec& file = files[f];
    if (file.min_size < 0) {
      throw PlanError("read plan for " + file.path + ": negative min_size " +
                      std::to_string(file.min_size));
    }
    CallBuilder& builder = file.device >= 0 ? device_builder : host_builder;
    runs.clear();
    const int64_t furthest = collect_runs(file, runs);
    plan.required.push_back(std::max(file.min_size, furthest));
    if (file.has_table) {
      check_table(file, furthest);
    }
    // Planners emit runs in file order almost always; checking is cheaper
    // than sorting.
    if (!std::is_sorted(runs.begin(), runs.end(), run_before)) {
      std::sort(runs.begin(), runs.end(), run_before);
    }
    builder.begin_file(f);
    pack_runs(file, runs, builder, options.max_gap);
    builder.end_file();
  }
  for (const IoCall& call : plan.calls) {
    plan.stats.bytes_read += call.bytes;
    plan.stats.calls += call.iov_count > 0 ? 1 : 0;
    int64_t gaps = 0;
    for (int i = 0; i < call.iov_count; ++i) {
      const iovec& iov = plan.iovs[call.first_iov + i];
      gaps += iov.iov_base == nullptr ? static_cast<int64_t>(iov.iov_len) : 0;
    }
    plan.scratch_bytes = std::max(plan.scratch_bytes, gaps);
  }
  return plan;
}

// A pinned buffer whose host-to-device copies were queued: it goes back to
// the pool once they are done.
struct PendingCopy {
  char* buffer;
  int device;
  cuda::Stream stream;
  cuda::Event event;  // null until recorded: then the whole stream is waited for
  const std::string* path;
};

// A worker's buffers with copies in flight, oldest first. Whatever is left
// when the worker stops (a failure) is waited for and released.
class PendingCopies {
 public:
  PendingCopies(CudaRuntime& runtime, PinnedPool& pool, ThreadDevice& device)
      : runtime_(runtime), pool_(pool), device_(device) {}
  PendingCopies(const PendingCopies&) = delete;
  PendingCopies& operator=(const PendingCopies&) = delete;
  ~PendingCopies() {
    for (PendingCopy& pending : list_) {
      try {
        device_.set(pending.device);
      } catch (const CudaCallError&) {
      }
      if (pending.event != nullptr) {
        runtime_.api().event_synchronize(pending.event);
        runtime_.api().event_destroy(pending.event);
      } else {
        runtime_.api().stream_synchronize(pending.stream);
      }
      pool_.release(pending.buffer);
    }
  }

  bool empty() const noexcept { return list_.empty(); }
  PendingCopy& add(char* buffer, int device, cuda::Stream stream, const std::string& path) {
    list_.push_back(PendingCopy{buffer, device, stream, nullptr, &path});
    return list_.back();
  }

  // Waits for the oldest buffer's copies; returns the buffer, no longer pending.
  char* take_oldest() {
    PendingCopy pending = list_.front();
    list_.pop_front();
    try {
      device_.set(pending.device);
      const cuda::Error code = runtime_.api().event_synchronize(pending.event);
      runtime_.api().event_destroy(pending.event);
      runtime_.check(code, "cudaEventSynchronize after the H2D copies of " + *pending.path +
                               " to device " + std::to_string(pending.device));
    } catch (...) {
      // Released even so: the runtime reported the copies finished or dead.
      pool_.release(pending.buffer);
      throw;
    }
    return pending.buffer;
  }

  void drain() {
    while (!list_.empty()) {
      pool_.release(take_oldest());
    }
  }

 private:
  CudaRuntime& runtime_;
  PinnedPool& pool_;
  ThreadDevice& device_;
  std::deque<PendingCopy> list_;
};

// Largest pitch cudaMemcpy2DAsync accepts on current GPUs (cudaDevAttrMaxPitch).
constexpr uintptr_t kMaxPitch = 2147483647;

// Queues the copies of one call's runs from `buffer` (the call's bytes) to
// the device: a run of equal runs at regular strides in the buffer and on
// the device becomes one cudaMemcpy2DAsync (a column slice of a row-major
// tensor: one copy instead of one per row).
void copy_to_device(const CudaRuntime& runtime, cuda::Stream stream, const char* buffer,
                    const iovec* iovs, const int64_t* boxes, int count, const IoCall& call,
                    const std::string& path, int device) {
  struct Piece {
    int64_t at;  // offset in the buffer
    uintptr_t dest;
    int64_t length;
    int64_t box;
  };
  std::vector<Piece> pieces;
  pieces.reserve(static_cast<size_t>(count));
  int64_t at = 0;
  for (int i = 0; i < count; ++i) {
    const int64_t length = static_cast<int64_t>(iovs[i].iov_len);
    if (iovs[i].iov_base != nullptr) {
      pieces.push_back(Piece{at, reinterpret_cast<uintptr_t>(iovs[i].iov_base), length, boxes[i]});
    }
    at += length;
  }
  const cuda::Api& api = runtime.api();
  size_t i = 0;
  while (i < pieces.size()) {
    const Piece& first = pieces[i];
    size_t j = i + 1;
    // The pitches to the next piece, if it continues the first (the loop checks).
    const int64_t source_pitch = j < pieces.size() ? pieces[j].at - first.at : 0;
    const uintptr_t dest_pitch = j < pieces.size() ? pieces[j].dest - first.dest : 0;
    if (dest_pitch >= static_cast<uintptr_t>(first.length) && source_pitch >= first.length &&
        dest_pitch <= kMaxPitch && source_pitch <= static_cast<int64_t>(kMaxPitch)) {
      while (j < pieces.size() && pieces[j].length == first.length && pieces[j].box == first.box &&
             pieces[j].at - pieces[j - 1].at == source_pitch &&
             pieces[j].dest > pieces[j - 1].dest && pieces[j].dest - pieces[j - 1].dest == dest_pitch) {
        ++j;
      }
    }
    const size_t rows = j - i;
    const std::string where = " of " + path + " at offset " +
                              std::to_string(call.offset + first.at) + " to device " +
                              std::to_string(device) + " address " + hex_address(first.dest);
    void* dest = reinterpret_cast<void*>(first.dest);
    const char* source = buffer + first.at;
    const bool dense = rows > 1 && source_pitch == first.length &&
                       dest_pitch == static_cast<uintptr_t>(first.length);
    if (rows == 1 || dense) {
      const size_t bytes = static_cast<size_t>(first.length) * rows;
      runtime.check(api.memcpy_async(dest, source, bytes, cuda::kHostToDevice, stream),
                    "cudaMemcpyAsync H2D" + where + " (" + std::to_string(bytes) + " bytes)");
    } else {
      runtime.check(api.memcpy_2d_async(dest, static_cast<size_t>(dest_pitch), source,
                                        static_cast<size_t>(source_pitch),
                                        static_cast<size_t>(first.length), rows,
                                        cuda::kHostToDevice, stream),
                    "cudaMemcpy2DAsync H2D" + where + " (" + std::to_string(rows) + " rows of " +
                        std::to_string(first.length) + " bytes)");
    }
    i = j;
  }
}

int first_device(const std::vector<ReadFileSpec>& files) {
  for (const ReadFileSpec& file : files) {
    if (file.device >= 0 && file.copies_length > 0) {
      return file.device;
    }
  }
  return -1;
}

}  // namespace

bool should_merge(int64_t prev_len, int64_t gap, int64_t next_len, int64_t max_gap) noexcept {
  if (gap < 0 || gap > max_gap) {
    return false;
  }
  // 8 * gap <= m  <=>  gap <= m / 8 for non-negative integers, without overflow.
  if (gap <= std::min(prev_len, next_len) / 8) {
    return true;
  }
  return prev_len <= kTinySpan && gap <= kTinySpan && next_len <= kTinySpan &&
         prev_len + gap + next_len <= kTinySpan;
}

ReadStats read_files(const std::vector<ReadFileSpec>& files, const ReadOptions& options) {
  check_options(options);
  if (options.max_gap < 0) {
    throw PlanError("max_gap must be non-negative, got " + std::to_string(options.max_gap));
  }
  const std::shared_ptr<PinnedPool> pool = call_pool(options, first_device(files));
  ReadPlan plan = plan_reads(files, options, pool ? pool->chunk_bytes() : options.chunk_bytes);

  std::unique_ptr<SharedFile[]> shared = share_files(files.size(), plan.calls);
  std::unique_ptr<DirectFile[]> direct(new DirectFile[files.size()]);
  FaultInjector faults(options.faults);
  const IoHooks hooks{options.short_io_cap, &faults};
  const bool use_direct = direct_allowed(options.direct_io, hooks);
  std::unique_ptr<PinnedPool::Use> pool_use;
  CudaRuntime* runtime = nullptr;
  if (pool) {
    pool_use.reset(new PinnedPool::Use(*pool));
    runtime = pool->runtime().get();
  }
  // Work queued on each consumer stream before the call (kernels still
  // writing the destinations, such as the fill of freshly allocated
  // tensors) completes before the copy streams write them.
  std::unique_ptr<CallStreams> streams;
  if (runtime != nullptr) {
    streams.reset(new CallStreams(*runtime));
    CallerStreams consumers;
    for (const ReadFileSpec& file : files) {
      if (file.device >= 0) {
        consumers.emplace(std::make_pair(file.device, file.stream), &file.path);
      }
    }
    on_engine_thread(*runtime, [&](ThreadDevice& device) {
      streams->wait_for(device, consumers, "the consumer stream");
    });
  }

  WorkQueue queue(plan.calls.size());
  const size_t scratch_bytes = static_cast<size_t>(plan.scratch_bytes);
  const Crc32cFunction crc32c = options.crc32c != nullptr ? options.crc32c : crc32c_select(false);
  // Each call's pieces of the blocks it shares with other calls, and the
  // blocks that failed their check (block_crc.hpp).
  std::vector<BlockPiece> shared_blocks(2 * plan.calls.size());
  std::vector<int> shared_count(plan.calls.size(), 0);
  std::mutex failed_mutex;
  std::vector<std::pair<int64_t, int64_t>>& failed = plan.stats.failed_blocks;
  auto compare = [&](size_t f, int64_t k, uint32_t crc) {
    if (crc != files[f].crcs[k]) {
      std::lock_guard<std::mutex> lock(failed_mutex);
      failed.emplace_back(static_cast<int64_t>(f), k);
    }
  };
  // Checks the blocks a call read (whole, in `iovs`), on its thread.
  auto check_call = [&](size_t index, const IoCall& call, const iovec* iovs) {
    const size_t f = call.file;
    if (files[f].has_table) {
      shared_count[index] = checksum_range(
          files[f].grid, call.offset, call.bytes, iovs, crc32c,
          [&compare, f](int64_t k, uint32_t crc) { compare(f, k, crc); },
          &shared_blocks[2 * index]);
    }
  };
  auto worker = [&]() {
    // One scratch buffer per thread takes the gaps of its calls.
    std::unique_ptr<char[]> scratch(scratch_bytes > 0 ? new char[scratch_bytes] : nullptr);
    iovec local[kMaxIovecs];
    iovec checked[kMaxIovecs];
    std::unique_ptr<ThreadDevice> device;
    std::unique_ptr<PendingCopies> pending;
    if (runtime != nullptr) {
      device.reset(new ThreadDevice(*runtime));
      pending.reset(new PendingCopies(*runtime, *pool, *device));
    }
    size_t index = 0;
    while (queue.next(index)) {
      const IoCall& call = plan.calls[index];
      const ReadFileSpec& file = files[call.file];
      const int64_t required = plan.required[call.file];
      SharedFile& shared_file = shared[call.file];
      const int fd = shared_file.acquire([&file, &hooks, required]() {
        FdGuard guard(open_for_read(file.path, hooks));
        // Checking the size up front fails fast, before reading anything,
        // with the size the plan needs rather than the first run that fails.
        const int64_t size = file_size(guard.get(), file.path);
        if (size < required) {
          throw TruncatedError(file.path, required, size);
        }
        return guard.release();
      });
      if (call.iov_count > 0 && file.device >= 0) {
        device->set(file.device);  // before the pool pins a buffer on it
        // A buffer of the pool if one is free, else this worker's oldest
        // (its copies done), else wait for another worker's.
        char* buffer = pool->try_acquire();
        if (buffer == nullptr) {
          buffer = !pending->empty() ? pending->take_oldest() : pool->acquire(queue.failed_flag());
        }
        if (buffer == nullptr) {
          return;  // the call failed; the error is recorded
        }
        device->set(file.device);  // take_oldest may have changed it
        const cuda::Stream stream = [&] {
          try {
            return streams->get(file.device);
          } catch (...) {
            pool->release(buffer);
            throw;
          }
        }();
        PendingCopy& entry = pending->add(buffer, file.device, stream, file.path);
        direct[call.file].read(fd, use_direct, buffer, call.offset, call.bytes, file.path,
                               required, hooks, options.direct_refusal);
        // Checked in the pinned buffer, before anything reaches the device.
        const iovec pinned{buffer, static_cast<size_t>(call.bytes)};
        check_call(index, call, &pinned);
        copy_to_device(*runtime, stream, buffer, plan.iovs.data() + call.first_iov,
                       plan.iov_box.data() + call.first_iov, call.iov_count, call, file.path, file.device);
        cuda::Event event = nullptr;
        runtime->check(runtime->api().event_create_with_flags(
                           &event, cuda::kEventBlockingSync | cuda::kEventDisableTiming),
                       "cudaEventCreateWithFlags for the H2D copies of " + file.path);
        const cuda::Error recorded = runtime->api().event_record(event, stream);
        if (recorded != cuda::kSuccess) {
          runtime->api().event_destroy(event);
          runtime->fail(recorded, "cudaEventRecord after the H2D copies of " + file.path +
                                      " at offset " + std::to_string(call.offset));
        }
        entry.event = event;
      } else if (call.iov_count > 0) {
        const iovec* planned = plan.iovs.data() + call.first_iov;
        char* gap = scratch.get();
        for (int i = 0; i < call.iov_count; ++i) {
          local[i] = planned[i];
          if (local[i].iov_base == nullptr) {
            local[i].iov_base = gap;
            gap += local[i].iov_len;
          }
        }
        // read_fully consumes its iovecs; the check needs them whole.
        std::copy(local, local + (file.has_table ? call.iov_count : 0), checked);
        read_fully(fd, local, call.iov_count, call.offset, call.bytes, file.path, required, hooks);
        check_call(index, call, checked);
      }
      if (shared_file.finish_piece()) {
        direct[call.file].close();
        close_read_only(shared_file.release(), hooks);
      }
    }
    if (pending) {
      pending->drain();
    }
  };
  // With device memory the caller's thread does no work: it makes no runtime call.
  run_workers(queue, std::min(static_cast<size_t>(options.threads), queue.size()), worker,
              runtime == nullptr);
  if (runtime != nullptr) {
    // Every worker waited for its own copies; the streams are synchronised
    // too, so that nothing of this call is left on them when it returns.
    on_engine_thread(*runtime, [&](ThreadDevice& device) {
      std::string operation;
      const cuda::Error code = streams->synchronize(device, &operation);
      if (code != cuda::kSuccess) {
        runtime->fail(code, operation);
      }
    });
  }

  std::vector<std::vector<BlockPiece>> by_file(files.size());
  for (size_t c = 0; c < plan.calls.size(); ++c) {
    std::vector<BlockPiece>& pieces = by_file[plan.calls[c].file];
    pieces.insert(pieces.end(), &shared_blocks[2 * c], &shared_blocks[2 * c] + shared_count[c]);
  }
  for (size_t f = 0; f < files.size(); ++f) {
    join_pieces(by_file[f], files[f].grid, [&compare, f](int64_t k, uint32_t crc) { compare(f, k, crc); });
  }
  // A block two overlapping runs both read whole is checked twice.
  std::sort(failed.begin(), failed.end());
  failed.erase(std::unique(failed.begin(), failed.end()), failed.end());
  return std::move(plan.stats);
}

}  // namespace dcp_native
