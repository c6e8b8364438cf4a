// Pinned (page-locked) host buffers for copies between files and device
// memory, reused across engine calls: cudaHostAlloc costs milliseconds per
// buffer, far more than a copy through it. Buffers are allocated on first
// use, never more than `capacity` bytes in all; a caller that finds none free
// waits for one rather than allocating beyond the bound.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "cuda_runtime.hpp"
#include "direct_io.hpp"

namespace dcp_native {

// A call with device memory and no pool stages through a pool of this many
// bytes in buffers of at most kDefaultDeviceChunkBytes, made for the call
// (dcp_native.engine.DEFAULT_STAGING_BYTES and DEFAULT_DEVICE_CHUNK_BYTES).
constexpr int64_t kDefaultStagingBytes = int64_t{256} << 20;
constexpr int64_t kDefaultDeviceChunkBytes = int64_t{32} << 20;

class PinnedPool {
 public:
  // Buffers of min(chunk_bytes, capacity / 2) rounded down to a page, so at
  // least two fit (double buffering); PlanError for a capacity under two
  // pages or a chunk_bytes under 1.
  PinnedPool(std::shared_ptr<CudaRuntime> runtime, int device, int64_t capacity,
             int64_t chunk_bytes);
  PinnedPool(const PinnedPool&) = delete;
  PinnedPool& operator=(const PinnedPool&) = delete;
  ~PinnedPool();

  int device() const noexcept { return device_; }
  int64_t capacity() const noexcept { return capacity_; }
  int64_t chunk_bytes() const noexcept { return chunk_bytes_; }
  int64_t bytes_held() const;
  const std::shared_ptr<CudaRuntime>& runtime() const noexcept { return runtime_; }

  // A free buffer, allocating one when below capacity, else waiting for a
  // release. Returns null once `stop` is set (a failed call); throws
  // CudaCallError when cudaHostAlloc fails. The calling thread's device must
  // be the pool's (DeviceGuard).
  char* acquire(const std::atomic<bool>& stop);
  // A free or newly allocated buffer without waiting; null when none.
  char* try_acquire();
  void release(char* buffer);

  // Frees every buffer; PlanError while a call uses the pool. Idempotent.
  void close();
  bool closed() const;

  // Marks the pool in use by a call for its lifetime (close() refuses then);
  // PlanError for a closed pool.
  class Use {
   public:
    explicit Use(PinnedPool& pool);
    Use(const Use&) = delete;
    Use& operator=(const Use&) = delete;
    ~Use();

   private:
    PinnedPool& pool_;
  };

 private:
  char* take_locked(std::unique_lock<std::mutex>& lock);
  cuda::Error free_all_locked();

  std::shared_ptr<CudaRuntime> runtime_;
  int device_;
  int64_t capacity_;
  int64_t chunk_bytes_;
  size_t max_buffers_;
  mutable std::mutex mutex_;
  std::condition_variable released_;
  std::vector<char*> all_;
  std::vector<char*> free_;
  // Buffers being allocated (outside the lock): they count towards capacity.
  size_t allocating_ = 0;
  int64_t users_ = 0;
  bool closed_ = false;
};

}  // namespace dcp_native
