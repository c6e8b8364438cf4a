// The pinned buffer pool (see pinned_pool.hpp).
#include "pinned_pool.hpp"

#include <sys/mman.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <string>

#include "io_error.hpp"

namespace dcp_native {

void register_host(const CudaRuntime& runtime, int device, void* address, size_t bytes) {
  on_engine_thread(runtime, [&](ThreadDevice& thread) {
    thread.set(device);
    runtime.check(runtime.api().host_register(address, bytes, cuda::kHostRegisterPortable),
                  "cudaHostRegister of " + std::to_string(bytes) + " bytes at " +
                      hex_address(reinterpret_cast<uintptr_t>(address)) + " on device " +
                      std::to_string(device));
  });
}

void unregister_host(const CudaRuntime& runtime, int device, void* address) {
  on_engine_thread(runtime, [&](ThreadDevice& thread) {
    thread.set(device);
    runtime.check(runtime.api().host_unregister(address),
                  "cudaHostUnregister of " + hex_address(reinterpret_cast<uintptr_t>(address)) +
                      " on device " + std::to_string(device));
  });
}

PinnedPool::PinnedPool(std::shared_ptr<CudaRuntime> runtime, int device, int64_t capacity,
                       int64_t chunk_bytes)
    : runtime_(std::move(runtime)), device_(device), capacity_(capacity) {
  if (device < 0) {
    throw PlanError("pinned pool: device must be >= 0, got " + std::to_string(device));
  }
  if (capacity < 2 * kPageBytes) {
    throw PlanError("pinned pool: capacity must be at least two pages (" +
                    std::to_string(2 * kPageBytes) + " bytes), got " + std::to_string(capacity));
  }
  if (chunk_bytes < 1) {
    throw PlanError("pinned pool: chunk_bytes must be at least 1, got " +
                    std::to_string(chunk_bytes));
  }
  const int64_t wanted = std::min(chunk_bytes, capacity / 2);
  chunk_bytes_ = std::max(kPageBytes, wanted / kPageBytes * kPageBytes);
  max_buffers_ = static_cast<size_t>(capacity / chunk_bytes_);
}

PinnedPool::~PinnedPool() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!all_.empty()) {
    try {
      on_engine_thread(*runtime_, [this](ThreadDevice& thread) {
        thread.set(device_);
        free_all_locked();
      });
    } catch (...) {  // nothing to report to from a destructor
    }
  }
}

int64_t PinnedPool::bytes_held() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return static_cast<int64_t>(all_.size()) * chunk_bytes_;
}

bool PinnedPool::closed() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return closed_;
}

char* PinnedPool::take_locked(std::unique_lock<std::mutex>& lock) {
  if (!free_.empty()) {
    char* buffer = free_.back();
    free_.pop_back();
    return buffer;
  }
  if (all_.size() + allocating_ >= max_buffers_) {
    return nullptr;
  }
  // Pinning takes milliseconds: others may take and release buffers meanwhile.
  ++allocating_;
  lock.unlock();
  const size_t bytes = static_cast<size_t>(chunk_bytes_);
  void* memory = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  const int mmap_error = errno;
  const cuda::Error code = memory == MAP_FAILED ? cuda::kSuccess
                           : runtime_->api().host_register(memory, bytes, cuda::kHostRegisterPortable);
  lock.lock();
  --allocating_;
  if (memory == MAP_FAILED || code != cuda::kSuccess) {
    released_.notify_all();  // the slot it reserved is free again
    const std::string what = std::to_string(bytes) + " bytes for the pinned pool of device " +
                             std::to_string(device_);
    if (memory == MAP_FAILED) {
      throw IoError(mmap_error, "mmap of " + what, "");
    }
    munmap(memory, bytes);
    runtime_->fail(code, "cudaHostRegister of " + what);
  }
  all_.push_back(static_cast<char*>(memory));
  return static_cast<char*>(memory);
}

char* PinnedPool::acquire(const std::atomic<bool>& stop) {
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    if (stop.load(std::memory_order_relaxed)) {
      return nullptr;
    }
    if (char* buffer = take_locked(lock)) {
      return buffer;
    }
    // The timeout only bounds how late a stop is seen: whoever sets `stop`
    // does not know which pools have waiters.
    released_.wait_for(lock, std::chrono::milliseconds(20));
  }
}

char* PinnedPool::try_acquire() {
  std::unique_lock<std::mutex> lock(mutex_);
  return take_locked(lock);
}

void PinnedPool::release(char* buffer) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    free_.push_back(buffer);
  }
  released_.notify_one();
}

cuda::Error PinnedPool::free_all_locked() {
  // Every buffer is freed even if one fails; the first failure is returned.
  cuda::Error first = cuda::kSuccess;
  for (char* buffer : all_) {
    const cuda::Error code = runtime_->api().host_unregister(buffer);
    munmap(buffer, static_cast<size_t>(chunk_bytes_));
    if (first == cuda::kSuccess) {
      first = code;
    }
  }
  all_.clear();
  free_.clear();
  return first;
}

void PinnedPool::close() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (users_ > 0) {
    throw PlanError("the pinned pool is in use by an engine call and cannot be closed");
  }
  closed_ = true;
  if (all_.empty()) {
    return;
  }
  on_engine_thread(*runtime_, [this](ThreadDevice& thread) {
    thread.set(device_);
    runtime_->check(free_all_locked(),
                    "cudaHostUnregister of the pinned pool of device " + std::to_string(device_));
  });
}

PinnedPool::Use::Use(PinnedPool& pool) : pool_(pool) {
  std::lock_guard<std::mutex> lock(pool.mutex_);
  if (pool.closed_) {
    throw PlanError("the pinned pool is closed");
  }
  ++pool.users_;
}

PinnedPool::Use::~Use() {
  std::lock_guard<std::mutex> lock(pool_.mutex_);
  --pool_.users_;
}

}  // namespace dcp_native
