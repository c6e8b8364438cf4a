// Finding and resolving the CUDA runtime at run time (see cuda_runtime.hpp).
#include "cuda_runtime.hpp"

#include <dlfcn.h>
#include <link.h>

#include <cstdio>
#include <fstream>
#include <type_traits>
#include <utility>

namespace dcp_native {

namespace {

// The path the dynamic loader opened for a handle (a soname alone says
// little when several CUDA versions are installed).
std::string handle_path(void* handle, const std::string& fallback) {
  link_map* map = nullptr;
  if (dlinfo(handle, RTLD_DI_LINKMAP, &map) == 0 && map != nullptr && map->l_name != nullptr &&
      map->l_name[0] != '\0') {
    return map->l_name;
  }
  return fallback;
}

// A libcudart mapped into the process under a name the sonames above miss
// (a pip wheel's nvidia/cuda_runtime/lib/libcudart.so.13, a private copy).
std::string mapped_cudart() {
  std::ifstream maps("/proc/self/maps");
  std::string line;
  while (std::getline(maps, line)) {
    // The path starts at the line's first '/', its file name after the last.
    const size_t slash = line.find('/');
    if (slash != std::string::npos && line.compare(line.rfind('/') + 1, 12, "libcudart.so") == 0) {
      return line.substr(slash);
    }
  }
  return "";
}

// Resolves every function of `api`; false with the reason at the first one
// missing.
bool resolve_all(void* handle, const std::string& library, cuda::Api& api, std::string* reason) {
  bool ok = true;
  auto get = [&](auto& function, const char* name) {
    void* symbol = ok ? dlsym(handle, name) : nullptr;
    if (ok && symbol == nullptr) {
      *reason = std::string("symbol ") + name + " missing in " + library;
      ok = false;
    }
    function = reinterpret_cast<std::remove_reference_t<decltype(function)>>(symbol);
  };
  get(api.get_error_string, "cudaGetErrorString");
  get(api.get_last_error, "cudaGetLastError");
  get(api.get_device_count, "cudaGetDeviceCount");
  get(api.get_device, "cudaGetDevice");
  get(api.set_device, "cudaSetDevice");
  get(api.stream_create_with_flags, "cudaStreamCreateWithFlags");
  get(api.stream_destroy, "cudaStreamDestroy");
  get(api.stream_synchronize, "cudaStreamSynchronize");
  get(api.stream_wait_event, "cudaStreamWaitEvent");
  get(api.event_create_with_flags, "cudaEventCreateWithFlags");
  get(api.event_record, "cudaEventRecord");
  get(api.event_synchronize, "cudaEventSynchronize");
  get(api.event_destroy, "cudaEventDestroy");
  get(api.memcpy_async, "cudaMemcpyAsync");
  get(api.memcpy_2d_async, "cudaMemcpy2DAsync");
  get(api.host_alloc, "cudaHostAlloc");
  get(api.free_host, "cudaFreeHost");
  return ok;
}

// Opens the library the environment selects: a handle, or null with the reason.
void* open_library(const std::string& named, std::string* library, std::string* reason) {
  if (!named.empty()) {
    void* handle = dlopen(named.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr) {
      const char* error = dlerror();
      *reason = "cannot load DCP_NATIVE_CUDART=" + named + ": " +
                (error != nullptr ? error : "dlopen failed");
      return nullptr;
    }
    *library = handle_path(handle, named);
    return handle;
  }
  for (const char* soname : {"libcudart.so.13", "libcudart.so.12"}) {
    if (void* handle = dlopen(soname, RTLD_NOW | RTLD_NOLOAD)) {
      *library = handle_path(handle, soname);
      return handle;
    }
  }
  const std::string mapped = mapped_cudart();
  if (!mapped.empty()) {
    if (void* handle = dlopen(mapped.c_str(), RTLD_NOW | RTLD_NOLOAD)) {
      *library = handle_path(handle, mapped);
      return handle;
    }
  }
  *reason = "libcudart not loaded in this process (import torch and initialise CUDA first)";
  return nullptr;
}

}  // namespace

CudaCallError::CudaCallError(std::string operation, int code, const std::string& error_string)
    : std::runtime_error(operation + ": " + error_string + " (cudaError " +
                         std::to_string(code) + ")"),
      operation_(std::move(operation)),
      code_(code) {}

std::string hex_address(uintptr_t address) {
  char text[32];
  std::snprintf(text, sizeof(text), "0x%llx", static_cast<unsigned long long>(address));
  return text;
}

std::string CudaRuntime::error_string(cuda::Error code) const {
  const char* text = api_.get_error_string(code);
  return text != nullptr ? text : "unknown CUDA error";
}

void CudaRuntime::fail(cuda::Error code, const std::string& operation) const {
  // The failed call also set this thread's last error; left there, it would
  // surface from torch's check after the caller's next kernel launch.
  (void)api_.get_last_error();
  throw CudaCallError(operation, code, error_string(code));
}

cuda::Stream CudaRuntime::copy_stream(int device) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto found = streams_.find(device);
  if (found != streams_.end()) {
    return found->second;
  }
  cuda::Stream stream = nullptr;
  check(api_.stream_create_with_flags(&stream, cuda::kStreamNonBlocking),
        "cudaStreamCreateWithFlags for the copy stream of device " + std::to_string(device));
  streams_.emplace(device, stream);
  return stream;
}

std::shared_ptr<CudaRuntime> find_cuda_runtime(const std::string& named, std::string* reason) {
  // By the value of DCP_NATIVE_CUDART ("" when unset). Leaked on purpose:
  // runtimes must outlive static destructors at exit, when other threads may
  // still be finishing calls.
  static std::mutex& mutex = *new std::mutex();
  static auto& runtimes = *new std::map<std::string, std::shared_ptr<CudaRuntime>>();
  std::lock_guard<std::mutex> lock(mutex);
  auto found = runtimes.find(named);
  if (found != runtimes.end()) {
    return found->second;
  }
  std::string library;
  std::string why;
  cuda::Api api{};
  void* handle = open_library(named, &library, &why);
  if (handle != nullptr && resolve_all(handle, library, api, &why)) {
    return runtimes.emplace(named, std::make_shared<CudaRuntime>(api, library)).first->second;
  }
  if (handle != nullptr) {
    dlclose(handle);
  }
  if (reason != nullptr) {
    *reason = why;
  }
  return nullptr;
}

std::shared_ptr<CudaRuntime> require_cuda_runtime(const std::string& named) {
  std::string reason;
  std::shared_ptr<CudaRuntime> runtime = find_cuda_runtime(named, &reason);
  if (!runtime) {
    throw CudaUnavailableError("CUDA is not usable: " + reason);
  }
  return runtime;
}

CudaStatusInfo cuda_status(const std::string& named) {
  CudaStatusInfo status;
  std::shared_ptr<CudaRuntime> runtime = find_cuda_runtime(named, &status.reason);
  if (!runtime) {
    return status;
  }
  status.library = runtime->library();
  int count = 0;
  const cuda::Error code = runtime->api().get_device_count(&count);
  if (code != cuda::kSuccess) {
    status.reason = "no CUDA device: cudaGetDeviceCount returned cudaError " +
                    std::to_string(code) + " (" + runtime->error_string(code) + ") in " +
                    runtime->library();
  } else if (count < 1) {
    status.reason = "no CUDA device: cudaGetDeviceCount found none in " + runtime->library();
  } else {
    status.usable = true;
  }
  return status;
}

DeviceGuard::~DeviceGuard() {
  if (previous_ >= 0 && current_ != previous_) {
    runtime_.api().set_device(previous_);  // best effort: nothing to report it to
  }
}

void DeviceGuard::set(int device) {
  if (device != current_ && previous_ < 0) {
    int previous = 0;  // previous_ stays -1 if cudaGetDevice fails
    runtime_.check(runtime_.api().get_device(&previous), "cudaGetDevice");
    previous_ = current_ = previous;
  }
  if (device != current_) {
    runtime_.check(runtime_.api().set_device(device),
                   "cudaSetDevice(" + std::to_string(device) + ")");
    current_ = device;
  }
}

CallStreams::~CallStreams() {
  for (cuda::Event event : events_) {
    runtime_.api().event_destroy(event);
  }
}

cuda::Stream CallStreams::get(int device) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto found = streams_.find(device);
  if (found == streams_.end()) {
    found = streams_.emplace(device, runtime_.copy_stream(device)).first;
  }
  return found->second;
}

void CallStreams::wait_for(DeviceGuard& guard, const CallerStreams& streams, const char* role) {
  const cuda::Api& api = runtime_.api();
  for (const auto& caller : streams) {
    const int device = caller.first.first;
    const int64_t stream = caller.first.second;
    guard.set(device);
    const cuda::Stream copy = get(device);
    const std::string where = std::string(role) + " " +
                              hex_address(static_cast<uintptr_t>(stream)) + " of device " +
                              std::to_string(device) + " (for " + *caller.second + ")";
    cuda::Event event = nullptr;
    runtime_.check(api.event_create_with_flags(&event, cuda::kEventDisableTiming),
                   "cudaEventCreateWithFlags for " + where);
    events_.push_back(event);
    runtime_.check(
        api.event_record(event, reinterpret_cast<cuda::Stream>(static_cast<uintptr_t>(stream))),
        "cudaEventRecord on " + where);
    runtime_.check(api.stream_wait_event(copy, event, 0),
                   "cudaStreamWaitEvent of the copy stream on " + where);
  }
}

}  // namespace dcp_native
