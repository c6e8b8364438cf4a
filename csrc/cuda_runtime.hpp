// The CUDA runtime, found at run time instead of linked: the module is built
// without the toolkit and one binary serves CPU-only and GPU machines. It
// uses the libcudart that torch has already loaded into the process (dlopen
// with RTLD_NOLOAD: libcudart.so.13, .12, then any libcudart.so* mapped into
// the process), or the library DCP_NATIVE_CUDART names (the fake runtime of
// the tests), and resolves the few functions the GPU path calls. The types
// below are the runtime's ABI, declared here so that no CUDA header is needed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace dcp_native {

namespace cuda {

// cudaError_t is an enum, int-sized in the runtime's ABI.
using Error = int;
using Stream = void*;  // cudaStream_t
using Event = void*;   // cudaEvent_t

constexpr Error kSuccess = 0;
// cudaMemcpyKind
constexpr int kHostToDevice = 1;
constexpr int kDeviceToHost = 2;
// cudaStreamCreateWithFlags: no implicit synchronisation with the legacy stream.
constexpr unsigned kStreamNonBlocking = 0x01;
// cudaEventCreateWithFlags: a waiting host thread sleeps instead of spinning
// (I/O threads have better uses for the CPU); no timing.
constexpr unsigned kEventBlockingSync = 0x01;
constexpr unsigned kEventDisableTiming = 0x02;
// cudaHostRegister: pinned for every device, not only the current one.
constexpr unsigned kHostRegisterPortable = 0x01;

struct Api {
  const char* (*get_error_name)(Error);
  const char* (*get_error_string)(Error);
  Error (*get_last_error)();
  Error (*get_device_count)(int*);
  Error (*get_device)(int*);
  Error (*set_device)(int);
  Error (*stream_create_with_flags)(Stream*, unsigned);
  Error (*stream_destroy)(Stream);
  Error (*stream_synchronize)(Stream);
  Error (*stream_wait_event)(Stream, Event, unsigned);
  Error (*event_create_with_flags)(Event*, unsigned);
  Error (*event_record)(Event, Stream);
  Error (*event_synchronize)(Event);
  Error (*event_destroy)(Event);
  Error (*memcpy_async)(void*, const void*, size_t, int, Stream);
  Error (*memcpy_2d_async)(void*, size_t, const void*, size_t, size_t, size_t, int, Stream);
  Error (*host_register)(void*, size_t, unsigned);
  Error (*host_unregister)(void*);
};

// The runtime's names of the functions of Api, in its order.
const std::vector<std::string>& symbol_names();

}  // namespace cuda

// A runtime call that failed: what dcp_native was doing, the runtime's code
// and error string. bindings.cpp raises dcp_native.CudaError from it.
class CudaCallError : public std::runtime_error {
 public:
  CudaCallError(std::string operation, int code, const std::string& error_string);
  const std::string& operation() const noexcept { return operation_; }
  int code() const noexcept { return code_; }

 private:
  std::string operation_;
  int code_;
};

// The runtime cannot be used at all (not loaded, a symbol missing, no device).
class CudaUnavailableError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// One loaded runtime with its resolved functions. Never unloaded: streams
// and pinned memory outlive any one call, and unloading libcudart while
// torch uses it would be fatal.
class CudaRuntime {
 public:
  CudaRuntime(cuda::Api api, std::string library) : api_(api), library_(std::move(library)) {}
  CudaRuntime(const CudaRuntime&) = delete;
  CudaRuntime& operator=(const CudaRuntime&) = delete;

  const cuda::Api& api() const noexcept { return api_; }
  const std::string& library() const noexcept { return library_; }
  // "cudaErrorName (code): description", CUDA's own words.
  std::string describe(cuda::Error code) const;
  // Throws CudaCallError(operation, code) unless code is success.
  void check(cuda::Error code, const std::string& operation) const {
    if (code != cuda::kSuccess) {
      fail(code, operation);
    }
  }
  [[noreturn]] void fail(cuda::Error code, const std::string& operation) const;

  // The engine's copy stream on `device` (non-blocking), created on first
  // use and kept: every call's copies go through it. The current thread's
  // device must be `device` (ThreadDevice).
  cuda::Stream copy_stream(int device);

 private:
  cuda::Api api_;
  std::string library_;
  std::mutex mutex_;
  std::map<int, cuda::Stream> streams_;
};

struct CudaStatusInfo {
  bool usable = false;
  std::string reason;
  std::string library;
};

// The runtime in the library `named` (DCP_NATIVE_CUDART, see
// dcp_native/config.py), or, when it is empty, the libcudart this process has
// loaded. A runtime that resolved is kept for the process; a failure is
// retried at the next call (torch may initialise CUDA in between). Null on
// failure, with the reason.
std::shared_ptr<CudaRuntime> find_cuda_runtime(const std::string& named, std::string* reason);
// find_cuda_runtime, throwing CudaUnavailableError with the reason.
std::shared_ptr<CudaRuntime> require_cuda_runtime(const std::string& named);
// Whether the runtime is usable now: found, every symbol resolved, and at
// least one device.
CudaStatusInfo cuda_status(const std::string& named);

// The device of a thread the engine started. The CUDA runtime acts on the
// calling thread's current device, and its first call there creates that
// device's primary context (hundreds of MiB): on an 8-GPU node, a rank's
// thread left on device 0 would put a context on another rank's GPU. So
// every engine thread selects the device before its first runtime call and
// whenever it changes, and never restores one (the thread ends with its
// work). The caller's thread makes no runtime call that needs a context:
// what would run there runs on a thread of its own (on_engine_thread).
class ThreadDevice {
 public:
  explicit ThreadDevice(const CudaRuntime& runtime) noexcept : runtime_(runtime) {}
  ThreadDevice(const ThreadDevice&) = delete;
  ThreadDevice& operator=(const ThreadDevice&) = delete;
  void set(int device);

 private:
  const CudaRuntime& runtime_;
  int current_ = -1;
};

// Runs work(device) on a new thread and rethrows what it threw: runtime
// calls the caller's thread would otherwise make (closing a pool,
// registering memory, a call's set-up and clean-up), on a thread whose
// device is selected by the ThreadDevice it gets.
void on_engine_thread(const CudaRuntime& runtime, const std::function<void(ThreadDevice&)>& work);

// The caller's streams of a call, (device, cudaStream_t as an integer), each
// with the path that names it in errors.
using CallerStreams = std::map<std::pair<int, int64_t>, const std::string*>;

// The copy streams one engine call uses, by device, made to wait for the
// work queued so far on the caller's streams (the kernels that write what a
// save copies, or the fill of what a load overwrites) through events
// destroyed with this object (CUDA releases an event still pending once it
// completes). get() is thread-safe; like every runtime call, destruction
// happens on an engine thread.
class CallStreams {
 public:
  explicit CallStreams(CudaRuntime& runtime) noexcept : runtime_(runtime) {}
  CallStreams(const CallStreams&) = delete;
  CallStreams& operator=(const CallStreams&) = delete;
  ~CallStreams();

  // The copy stream of `device` (CudaRuntime::copy_stream), noted as used.
  cuda::Stream get(int device);
  // Makes the copy stream of each caller's stream's device wait for it;
  // `device` selects the devices, `role` names the streams in errors.
  void wait_for(ThreadDevice& device, const CallerStreams& streams, const char* role);
  // Synchronizes every copy stream used; the first failure is returned
  // (operation named in `operation`), the others are still waited for.
  cuda::Error synchronize(ThreadDevice& device, std::string* operation);
  // The copy streams used so far, by device.
  const std::map<int, cuda::Stream>& used() const noexcept { return streams_; }

 private:
  CudaRuntime& runtime_;
  std::mutex mutex_;
  std::map<int, cuda::Stream> streams_;
  std::vector<std::pair<int, cuda::Event>> events_;  // by device
};

// "0x..." for addresses in error messages.
std::string hex_address(uintptr_t address);

}  // namespace dcp_native
