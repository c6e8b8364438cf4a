// Pinned (page-locked) host buffers for copies between files and device
// memory, reused across engine calls: pinning costs milliseconds per buffer,
// far more than a copy through it. Buffers are allocated on first use, never
// more than `capacity` bytes in all; a caller that finds none free waits for
// one rather than allocating beyond the bound. Each buffer is anonymous
// memory from mmap (page-aligned, plain process memory) registered with
// cudaHostRegister, as kvikio's bounce buffers: O_DIRECT transfers into it
// cannot fault the way driver-mapped cudaHostAlloc memory can. Buffers are
// freed only by close() or the destructor, with the pool's device selected.
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

// Pins `bytes` at `address` (page-aligned) for every device, from an engine
// thread on `device` (torch's memory for async staging, and the pool's
// buffers); CudaCallError on failure. unregister_host undoes it.
void register_host(const CudaRuntime& runtime, int device, void* address, size_t bytes);
void unregister_host(const CudaRuntime& runtime, int device, void* address);

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
  // CudaCallError when pinning fails. Called from engine threads, whose
  // device is selected (ThreadDevice): pinning acts on it.
  char* acquire(const std::atomic<bool>& stop);
  // A free or newly allocated buffer without waiting; null when none.
  char* try_acquire();
  void release(char* buffer);

  // Frees every buffer (on an engine thread on the pool's device); PlanError
  // while a call uses the pool. Idempotent.
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
  // Unregisters and unmaps every buffer; the first runtime error is returned.
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
