// Finding and resolving the CUDA runtime at run time (see cuda_runtime.hpp).
#include "cuda_runtime.hpp"

#include <dlfcn.h>
#include <link.h>

#include <cstdio>
#include <fstream>
#include <thread>
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

// Calls visit(slot, name) for every function of `api`, in Api's order.
template <class Visit>
void each_function(cuda::Api& api, Visit&& visit) {
  visit(api.get_error_name, "cudaGetErrorName");
  visit(api.get_error_string, "cudaGetErrorString");
  visit(api.get_last_error, "cudaGetLastError");
  visit(api.get_device_count, "cudaGetDeviceCount");
  visit(api.get_device, "cudaGetDevice");
  visit(api.set_device, "cudaSetDevice");
  visit(api.stream_create_with_flags, "cudaStreamCreateWithFlags");
  visit(api.stream_destroy, "cudaStreamDestroy");
  visit(api.stream_synchronize, "cudaStreamSynchronize");
  visit(api.stream_wait_event, "cudaStreamWaitEvent");
  visit(api.event_create_with_flags, "cudaEventCreateWithFlags");
  visit(api.event_record, "cudaEventRecord");
  visit(api.event_synchronize, "cudaEventSynchronize");
  visit(api.event_destroy, "cudaEventDestroy");
  visit(api.memcpy_async, "cudaMemcpyAsync");
  visit(api.memcpy_2d_async, "cudaMemcpy2DAsync");
  visit(api.host_register, "cudaHostRegister");
  visit(api.host_unregister, "cudaHostUnregister");
}

// Resolves every function of `api`; false with the reason at the first one
// missing.
bool resolve_all(void* handle, const std::string& library, cuda::Api& api, std::string* reason) {
  bool ok = true;
  each_function(api, [&](auto& function, const char* name) {
    void* symbol = ok ? dlsym(handle, name) : nullptr;
    if (ok && symbol == nullptr) {
      *reason = std::string("symbol ") + name + " missing in " + library;
      ok = false;
    }
    function = reinterpret_cast<std::remove_reference_t<decltype(function)>>(symbol);
  });
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

const std::vector<std::string>& cuda::symbol_names() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> out;
    cuda::Api api{};
    each_function(api, [&out](auto&, const char* name) { out.emplace_back(name); });
    return out;
  }();
  return names;
}

CudaCallError::CudaCallError(std::string operation, int code, const std::string& description)
    : std::runtime_error(operation + ": " + description),
      operation_(std::move(operation)),
      code_(code) {}

std::string hex_address(uintptr_t address) {
  char text[32];
  std::snprintf(text, sizeof(text), "0x%llx", static_cast<unsigned long long>(address));
  return text;
}

std::string CudaRuntime::describe(cuda::Error code) const {
  const char* name = api_.get_error_name(code);
  const char* text = api_.get_error_string(code);
  return std::string(name != nullptr ? name : "cudaError") + " (" + std::to_string(code) +
         "): " + (text != nullptr ? text : "unknown CUDA error");
}

void CudaRuntime::fail(cuda::Error code, const std::string& operation) const {
  // The failed call also set this thread's last error; left there, it would
  // surface from torch's check after the caller's next kernel launch.
  (void)api_.get_last_error();
  throw CudaCallError(operation, code, describe(code));
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
  // cudaGetDeviceCount creates no context. Its error says what is missing:
  // cudaErrorNoDevice, or a driver that is absent or older than the runtime
  // (cudaErrorInsufficientDriver), in CUDA's own words.
  if (code != cuda::kSuccess) {
    const char* state = code == 35    ? "no NVIDIA driver, or one older than the runtime: "
                        : code == 100 ? "no CUDA device: "
                                      : "";
    status.reason = state + std::string("cudaGetDeviceCount failed with ") +
                    runtime->describe(code) + " (runtime " + runtime->library() + ")";
  } else if (count < 1) {
    status.reason = "no CUDA device: cudaGetDeviceCount found none (runtime " +
                    runtime->library() + ")";
  } else {
    status.usable = true;
  }
  return status;
}

void ThreadDevice::set(int device) {
  if (device != current_) {
    runtime_.check(runtime_.api().set_device(device),
                   "cudaSetDevice(" + std::to_string(device) + ")");
    current_ = device;
  }
}

void on_engine_thread(const CudaRuntime& runtime,
                      const std::function<void(ThreadDevice&)>& work) {
  std::exception_ptr error;
  std::thread thread([&] {
    try {
      ThreadDevice device(runtime);
      work(device);
    } catch (...) {
      error = std::current_exception();
    }
  });
  thread.join();
  if (error) {
    std::rethrow_exception(error);
  }
}

CallStreams::~CallStreams() {
  if (events_.empty()) {
    return;
  }
  try {
    on_engine_thread(runtime_, [this](ThreadDevice& device) {
      for (const auto& event : events_) {
        device.set(event.first);
        runtime_.api().event_destroy(event.second);
      }
    });
  } catch (...) {  // no thread: the events stay (a leak, not a fault)
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

void CallStreams::wait_for(ThreadDevice& device_of_thread, const CallerStreams& streams,
                           const char* role) {
  const cuda::Api& api = runtime_.api();
  for (const auto& caller : streams) {
    const int device = caller.first.first;
    const int64_t stream = caller.first.second;
    device_of_thread.set(device);
    const cuda::Stream copy = get(device);
    const std::string where = std::string(role) + " " +
                              hex_address(static_cast<uintptr_t>(stream)) + " of device " +
                              std::to_string(device) + " (for " + *caller.second + ")";
    cuda::Event event = nullptr;
    runtime_.check(api.event_create_with_flags(&event, cuda::kEventDisableTiming),
                   "cudaEventCreateWithFlags for " + where);
    events_.emplace_back(device, event);
    runtime_.check(
        api.event_record(event, reinterpret_cast<cuda::Stream>(static_cast<uintptr_t>(stream))),
        "cudaEventRecord on " + where);
    runtime_.check(api.stream_wait_event(copy, event, 0),
                   "cudaStreamWaitEvent of the copy stream on " + where);
  }
}

cuda::Error CallStreams::synchronize(ThreadDevice& device, std::string* operation) {
  cuda::Error first = cuda::kSuccess;
  for (const auto& used : streams_) {
    cuda::Error code = cuda::kSuccess;
    try {
      device.set(used.first);
      code = runtime_.api().stream_synchronize(used.second);
    } catch (const CudaCallError& error) {
      code = error.code();
    }
    if (code != cuda::kSuccess && first == cuda::kSuccess) {
      first = code;
      *operation = "cudaStreamSynchronize of the copy stream of device " + std::to_string(used.first);
    }
  }
  return first;
}

}  // namespace dcp_native
