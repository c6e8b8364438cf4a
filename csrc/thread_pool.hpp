// Runs the pieces of one engine call on a few threads. Workers take piece
// indices from a shared atomic counter, so a slow piece never holds up the
// queue behind it; the first failure stops everyone and is rethrown in the
// caller.
//
// Threads are started per call instead of living in a pool: one checkpoint
// call lasts far longer than starting a few threads (tens of microseconds),
// and a training process that forks (DataLoader workers, DCP's process mode)
// must not carry idle pool threads into its children.
#pragma once

#include <atomic>
#include <cstddef>
#include <exception>
#include <functional>
#include <mutex>

namespace dcp_native {

class WorkQueue {
 public:
  explicit WorkQueue(size_t items) noexcept : items_(items) {}
  WorkQueue(const WorkQueue&) = delete;
  WorkQueue& operator=(const WorkQueue&) = delete;

  size_t size() const noexcept { return items_; }

  // Hands out the next item; false when none are left or a worker failed.
  bool next(size_t& index) noexcept {
    if (failed_.load(std::memory_order_relaxed)) {
      return false;
    }
    index = next_.fetch_add(1, std::memory_order_relaxed);
    return index < items_;
  }

  bool failed() const noexcept { return failed_.load(std::memory_order_relaxed); }
  // Set once a worker failed: for waits that must give up then (pinned buffers).
  const std::atomic<bool>& failed_flag() const noexcept { return failed_; }

  // Records an error (the first one wins) and stops the other workers.
  void fail(std::exception_ptr error) noexcept;
  void rethrow_if_failed();

 private:
  size_t items_;
  std::atomic<size_t> next_{0};
  std::atomic<bool> failed_{false};
  std::mutex mutex_;
  std::exception_ptr error_;
};

// Calls worker() on `threads` threads, the caller being one of them unless
// `on_caller` is false, waits for all, and rethrows the first exception any
// of them threw. If the OS refuses to start a thread, the call continues on
// the threads it has (and fails if it has none but the caller's, which may
// not work).
void run_workers(WorkQueue& queue, size_t threads, const std::function<void()>& worker,
                 bool on_caller = true);

}  // namespace dcp_native
