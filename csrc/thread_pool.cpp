// Per-call worker threads (see thread_pool.hpp).
#include "thread_pool.hpp"

#include <new>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

namespace dcp_native {

void WorkQueue::fail(std::exception_ptr error) noexcept {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!error_) {
    error_ = std::move(error);
  }
  failed_.store(true, std::memory_order_relaxed);
}

void WorkQueue::rethrow_if_failed() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (error_) {
    std::rethrow_exception(error_);
  }
}

void run_workers(WorkQueue& queue, size_t threads, const std::function<void()>& worker) {
  auto guarded = [&queue, &worker]() noexcept {
    try {
      worker();
    } catch (...) {
      queue.fail(std::current_exception());
    }
  };
  std::vector<std::thread> helpers;
  if (threads > 1) {
    try {
      helpers.reserve(threads - 1);
      for (size_t i = 1; i < threads; ++i) {
        helpers.emplace_back(guarded);
      }
    } catch (const std::system_error&) {
      // Out of threads (RLIMIT_NPROC, memory): fewer workers are still correct.
    } catch (const std::bad_alloc&) {
    }
  }
  guarded();
  for (std::thread& helper : helpers) {
    helper.join();
  }
  queue.rethrow_if_failed();
}

}  // namespace dcp_native
