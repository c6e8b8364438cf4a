// Per-call worker threads (see thread_pool.hpp).
#include "thread_pool.hpp"

#include <cerrno>
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

void run_workers(WorkQueue& queue, size_t threads, const std::function<void()>& worker,
                 bool on_caller) {
  auto guarded = [&queue, &worker]() noexcept {
    try {
      worker();
    } catch (...) {
      queue.fail(std::current_exception());
    }
  };
  std::vector<std::thread> helpers;
  const size_t started = on_caller ? 1 : 0;
  if (threads > started) {
    try {
      helpers.reserve(threads - started);
      for (size_t i = started; i < threads; ++i) {
        helpers.emplace_back(guarded);
      }
    } catch (const std::system_error&) {
      // Out of threads (RLIMIT_NPROC, memory): fewer workers are still correct.
    } catch (const std::bad_alloc&) {
    }
  }
  if (on_caller) {
    guarded();
  } else if (helpers.empty() && threads > 0) {
    queue.fail(std::make_exception_ptr(
        std::system_error(EAGAIN, std::generic_category(), "cannot start a worker thread")));
  }
  for (std::thread& helper : helpers) {
    helper.join();
  }
  queue.rethrow_if_failed();
}

}  // namespace dcp_native
