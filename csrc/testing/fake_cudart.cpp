// A fake CUDA runtime for tests on machines without a GPU: the functions the
// engines resolve (see csrc/cuda_runtime.hpp and dcp_native/_cudart.py),
// implemented with host memory and threads. Tests point DCP_NATIVE_CUDART at
// this library; "device memory" is any host memory (torch CPU tensors).
//
// It behaves like the real runtime where the engines could get it wrong:
// every stream, the legacy default stream 0 included, is a FIFO served by its
// own thread, and cudaMemcpyAsync returns at once while the copy happens
// later, after a delay (DCP_NATIVE_FAKE_CUDA_DELAY_US, default 300), so a
// missing event or stream synchronisation shows up as wrong data. Events are
// markers in a stream's queue. cudaHostRegister records pinned ranges and
// counts them. Every call that needs a context is recorded with the device it
// acts on (the calling thread's current device; for cudaSetDevice, its
// argument), as the real runtime creates a primary context there: a test can
// check that nothing touched a device it must not (a thread starts on 0).
//
// Test-only exports (extern "C", for ctypes): delayed "kernels" that fill or
// copy memory on a stream, counters, a reset, and failure injection
// (DCP_NATIVE_FAKE_CUDA_FAIL=function:nth:code, or fake_cuda_fail()).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#define FAKE_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

// Error codes with the values of the real runtime.
constexpr int kSuccess = 0;
constexpr int kInvalidValue = 1;
constexpr int kMemoryAllocation = 2;
constexpr int kNoDevice = 100;
constexpr int kInvalidDevice = 101;
constexpr int kInvalidResourceHandle = 400;
constexpr int kIllegalAddress = 700;
constexpr int kHostMemoryAlreadyRegistered = 712;
constexpr int kHostMemoryNotRegistered = 713;

constexpr int kHostToDevice = 1;
constexpr int kDeviceToHost = 2;

// ---------------------------------------------------------------- counters

struct Counters {
  std::atomic<long long> pinned_bytes{0};
  std::atomic<long long> pinned_peak{0};
  std::atomic<long long> host_allocs{0};  // cudaHostRegister calls that pinned
  std::atomic<long long> host_frees{0};  // and cudaHostUnregister calls that unpinned
  std::atomic<long long> copies{0};
  std::atomic<long long> copies_2d{0};
  std::atomic<long long> copies_h2d{0};
  std::atomic<long long> copies_d2h{0};
  std::atomic<long long> bytes_h2d{0};
  std::atomic<long long> bytes_d2h{0};
  std::atomic<long long> in_flight{0};
  std::atomic<long long> max_in_flight{0};
  // Copies whose host side is not memory pinned by cudaHostRegister: the engines
  // must always stage through pinned buffers.
  std::atomic<long long> unpinned_copies{0};
  std::atomic<long long> streams_created{0};
  std::atomic<long long> events_created{0};
  std::atomic<long long> events_live{0};
  std::atomic<long long> stream_waits{0};
  std::atomic<long long> set_device_calls{0};
};

Counters& counters() {
  static Counters* instance = new Counters();  // leaked: stream threads outlive exit
  return *instance;
}

void raise_max(std::atomic<long long>& max, long long value) {
  long long seen = max.load();
  while (value > seen && !max.compare_exchange_weak(seen, value)) {
  }
}

std::atomic<long long> g_delay_us{-1};

long long delay_us() {
  long long value = g_delay_us.load();
  if (value < 0) {
    const char* env = std::getenv("DCP_NATIVE_FAKE_CUDA_DELAY_US");
    value = env != nullptr && env[0] != '\0' ? std::atoll(env) : 300;
    g_delay_us.store(value);
  }
  return value;
}

int device_count() {
  const char* env = std::getenv("DCP_NATIVE_FAKE_CUDA_DEVICES");
  return env != nullptr && env[0] != '\0' ? std::atoi(env) : 1;
}

thread_local int t_device = 0;

// Calls that acted on each device since the last reset, and the first one's name.
constexpr int kMaxDevices = 16;
struct DeviceCalls {
  std::mutex mutex;
  long long count[kMaxDevices] = {};
  std::string first[kMaxDevices];
};

DeviceCalls& device_calls() {
  static DeviceCalls* instance = new DeviceCalls();
  return *instance;
}

void acted_on(int device, const char* function) {
  if (device < 0 || device >= kMaxDevices) {
    return;
  }
  DeviceCalls& calls = device_calls();
  std::lock_guard<std::mutex> lock(calls.mutex);
  if (calls.count[device]++ == 0) {
    calls.first[device] = function;
  }
}

// ---------------------------------------------------------------- pinned memory

struct Pinned {
  std::mutex mutex;
  std::map<uintptr_t, size_t> ranges;  // start -> length

  bool contains(const void* pointer, size_t length) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(pointer);
    std::lock_guard<std::mutex> lock(mutex);
    auto it = ranges.upper_bound(p);
    if (it == ranges.begin()) {
      return false;
    }
    --it;
    return p >= it->first && p + length <= it->first + it->second;
  }
};

Pinned& pinned() {
  static Pinned* instance = new Pinned();
  return *instance;
}

// ---------------------------------------------------------------- failure injection

struct Failure {
  std::string function;
  long long nth;
  int code;
  long long calls = 0;
};

struct Failures {
  std::mutex mutex;
  std::vector<Failure> armed;
  bool env_read = false;
};

Failures& failures() {
  static Failures* instance = new Failures();
  return *instance;
}

void arm_from_env_locked(Failures& f) {
  if (f.env_read) {
    return;
  }
  f.env_read = true;
  const char* env = std::getenv("DCP_NATIVE_FAKE_CUDA_FAIL");
  if (env == nullptr) {
    return;
  }
  std::string value = env;
  size_t start = 0;
  while (start < value.size()) {
    size_t end = value.find(',', start);
    if (end == std::string::npos) {
      end = value.size();
    }
    const std::string item = value.substr(start, end - start);
    const size_t a = item.find(':');
    const size_t b = a == std::string::npos ? a : item.find(':', a + 1);
    if (b != std::string::npos) {
      f.armed.push_back(Failure{item.substr(0, a), std::atoll(item.substr(a + 1, b - a - 1).c_str()),
                                std::atoi(item.substr(b + 1).c_str())});
    }
    start = end + 1;
  }
}

// The code the coming call of `function` must fail with (0: make it).
int injected(const char* function) {
  Failures& f = failures();
  std::lock_guard<std::mutex> lock(f.mutex);
  arm_from_env_locked(f);
  for (Failure& failure : f.armed) {
    if (failure.function == function && ++failure.calls == failure.nth) {
      return failure.code;
    }
  }
  return kSuccess;
}

// As the real runtime's: the last error of this thread, returned and reset
// by cudaGetLastError (torch checks it after its kernel launches, so a
// library that leaves one behind breaks the caller's next kernel).
thread_local int t_last_error = 0;

#define FAKE_INJECT(name)                   \
  do {                                      \
    if (const int code = injected(name)) {  \
      t_last_error = code;                  \
      return code;                          \
    }                                       \
  } while (0)

// A call that needs a context on the thread's current device.
#define FAKE_ACT(name)          \
  do {                          \
    acted_on(t_device, name);   \
    FAKE_INJECT(name);          \
  } while (0)

// ---------------------------------------------------------------- events and streams

struct EventState {
  std::mutex mutex;
  std::condition_variable changed;
  long long recorded = 0;   // generation of the last record
  long long completed = 0;  // generation the stream has passed

  void complete(long long generation) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      completed = std::max(completed, generation);
    }
    changed.notify_all();
  }
  void wait_for(long long generation) {
    std::unique_lock<std::mutex> lock(mutex);
    changed.wait(lock, [&] { return completed >= generation; });
  }
};

// What cudaEvent_t points to: the state outlives the handle while a queued
// marker or wait still refers to it.
struct Event {
  std::shared_ptr<EventState> state = std::make_shared<EventState>();
};

class Stream {
 public:
  Stream() : thread_([this] { serve(); }) { thread_.detach(); }

  void enqueue(std::function<void()> op) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      ops_.push_back(std::move(op));
      ++queued_;
    }
    changed_.notify_all();
  }

  // Waits until every operation queued so far has run.
  void synchronize() {
    std::unique_lock<std::mutex> lock(mutex_);
    const long long target = queued_;
    changed_.wait(lock, [&] { return done_ >= target; });
  }

  // The worker deletes the stream once the queue is drained.
  void destroy() {
    enqueue([this] { stopping_ = true; });
  }

 private:
  void serve() {
    for (;;) {
      std::function<void()> op;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        changed_.wait(lock, [&] { return !ops_.empty(); });
        op = std::move(ops_.front());
        ops_.pop_front();
      }
      op();
      {
        std::lock_guard<std::mutex> lock(mutex_);
        ++done_;
      }
      changed_.notify_all();
      if (stopping_) {
        delete this;
        return;
      }
    }
  }

  std::mutex mutex_;
  std::condition_variable changed_;
  std::deque<std::function<void()>> ops_;
  long long queued_ = 0;
  long long done_ = 0;
  bool stopping_ = false;
  std::thread thread_;
};

// The legacy default stream (handle 0) and the per-thread one (handle 2)
// share one queue here: nothing in dcp_native distinguishes them.
Stream* resolve_stream(void* handle) {
  const uintptr_t value = reinterpret_cast<uintptr_t>(handle);
  if (value == 0 || value == 1 || value == 2) {
    static Stream* legacy = new Stream();  // leaked: its thread lives until exit
    return legacy;
  }
  return static_cast<Stream*>(handle);
}

void sleep_us(long long us) {
  if (us > 0) {
    std::this_thread::sleep_for(std::chrono::microseconds(us));
  }
}

// Queues a copy of `height` rows; counted in flight from the call until it ran.
int enqueue_copy(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width,
                 size_t height, int kind, void* stream, bool two_d) {
  if (kind != kHostToDevice && kind != kDeviceToHost) {
    return kInvalidValue;
  }
  if (height > 1 && (dpitch < width || spitch < width)) {
    return kInvalidValue;
  }
  if ((dst == nullptr || src == nullptr) && width > 0 && height > 0) {
    return kInvalidValue;
  }
  Counters& c = counters();
  const size_t bytes = width * height;
  const void* host = kind == kHostToDevice ? src : dst;
  const size_t host_pitch = kind == kHostToDevice ? spitch : dpitch;
  const size_t host_span = height == 0 ? 0 : (height - 1) * host_pitch + width;
  if (bytes > 0 && !pinned().contains(host, host_span)) {
    c.unpinned_copies++;
  }
  c.copies++;
  if (two_d) {
    c.copies_2d++;
  }
  (kind == kHostToDevice ? c.copies_h2d : c.copies_d2h)++;
  (kind == kHostToDevice ? c.bytes_h2d : c.bytes_d2h) += static_cast<long long>(bytes);
  raise_max(c.max_in_flight, ++c.in_flight);
  const long long delay = delay_us();
  resolve_stream(stream)->enqueue([=] {
    sleep_us(delay);
    for (size_t row = 0; row < height; ++row) {
      std::memcpy(static_cast<char*>(dst) + row * dpitch,
                  static_cast<const char*>(src) + row * spitch, width);
    }
    counters().in_flight--;
  });
  return kSuccess;
}

const char* error_name(int code) {
  switch (code) {
    case kSuccess:
      return "cudaSuccess";
    case kInvalidValue:
      return "cudaErrorInvalidValue";
    case kMemoryAllocation:
      return "cudaErrorMemoryAllocation";
    case kNoDevice:
      return "cudaErrorNoDevice";
    case kInvalidDevice:
      return "cudaErrorInvalidDevice";
    case kInvalidResourceHandle:
      return "cudaErrorInvalidResourceHandle";
    case kIllegalAddress:
      return "cudaErrorIllegalAddress";
    case kHostMemoryAlreadyRegistered:
      return "cudaErrorHostMemoryAlreadyRegistered";
    case kHostMemoryNotRegistered:
      return "cudaErrorHostMemoryNotRegistered";
    default:
      return "cudaErrorUnknown";
  }
}

const char* error_text(int code) {
  switch (code) {
    case kSuccess:
      return "no error";
    case kInvalidValue:
      return "invalid argument";
    case kMemoryAllocation:
      return "out of memory";
    case kNoDevice:
      return "no CUDA-capable device is detected";
    case kInvalidDevice:
      return "invalid device ordinal";
    case kInvalidResourceHandle:
      return "invalid resource handle";
    case kIllegalAddress:
      return "an illegal memory access was encountered";
    case kHostMemoryAlreadyRegistered:
      return "part or all of the requested memory range is already mapped";
    case kHostMemoryNotRegistered:
      return "pointer does not correspond to a registered memory region";
    default:
      return "unknown error";
  }
}

}  // namespace

// ---------------------------------------------------------------- the runtime API

FAKE_EXPORT const char* cudaGetErrorString(int code) { return error_text(code); }

FAKE_EXPORT const char* cudaGetErrorName(int code) { return error_name(code); }

FAKE_EXPORT int cudaGetLastError() {
  const int code = t_last_error;
  t_last_error = 0;
  return code;
}

// Test-only: this thread's last error, without resetting it.
FAKE_EXPORT int fake_cuda_peek_last_error() { return t_last_error; }

FAKE_EXPORT int cudaGetDeviceCount(int* count) {
  FAKE_INJECT("cudaGetDeviceCount");
  *count = device_count();
  return *count > 0 ? kSuccess : kNoDevice;
}

FAKE_EXPORT int cudaGetDevice(int* device) {
  FAKE_INJECT("cudaGetDevice");
  *device = t_device;
  return kSuccess;
}

FAKE_EXPORT int cudaSetDevice(int device) {
  acted_on(device, "cudaSetDevice");
  FAKE_INJECT("cudaSetDevice");
  counters().set_device_calls++;
  if (device < 0 || device >= device_count()) {
    return kInvalidDevice;
  }
  t_device = device;
  return kSuccess;
}

FAKE_EXPORT int cudaStreamCreateWithFlags(void** stream, unsigned /*flags*/) {
  FAKE_ACT("cudaStreamCreateWithFlags");
  *stream = new Stream();
  counters().streams_created++;
  return kSuccess;
}

FAKE_EXPORT int cudaStreamDestroy(void* stream) {
  FAKE_ACT("cudaStreamDestroy");
  if (reinterpret_cast<uintptr_t>(stream) <= 2) {
    return kInvalidResourceHandle;
  }
  static_cast<Stream*>(stream)->destroy();
  return kSuccess;
}

FAKE_EXPORT int cudaStreamSynchronize(void* stream) {
  FAKE_ACT("cudaStreamSynchronize");
  resolve_stream(stream)->synchronize();
  return kSuccess;
}

FAKE_EXPORT int cudaEventCreateWithFlags(void** event, unsigned /*flags*/) {
  FAKE_ACT("cudaEventCreateWithFlags");
  *event = new Event();
  counters().events_created++;
  counters().events_live++;
  return kSuccess;
}

FAKE_EXPORT int cudaEventDestroy(void* event) {
  FAKE_ACT("cudaEventDestroy");
  if (event == nullptr) {
    return kInvalidResourceHandle;
  }
  delete static_cast<Event*>(event);
  counters().events_live--;
  return kSuccess;
}

FAKE_EXPORT int cudaEventRecord(void* event, void* stream) {
  FAKE_ACT("cudaEventRecord");
  if (event == nullptr) {
    return kInvalidResourceHandle;
  }
  std::shared_ptr<EventState> state = static_cast<Event*>(event)->state;
  long long generation = 0;
  {
    std::lock_guard<std::mutex> lock(state->mutex);
    generation = ++state->recorded;
  }
  resolve_stream(stream)->enqueue([state, generation] { state->complete(generation); });
  return kSuccess;
}

FAKE_EXPORT int cudaEventSynchronize(void* event) {
  FAKE_ACT("cudaEventSynchronize");
  if (event == nullptr) {
    return kInvalidResourceHandle;
  }
  std::shared_ptr<EventState> state = static_cast<Event*>(event)->state;
  long long target = 0;
  {
    std::lock_guard<std::mutex> lock(state->mutex);
    target = state->recorded;
  }
  state->wait_for(target);
  return kSuccess;
}

FAKE_EXPORT int cudaStreamWaitEvent(void* stream, void* event, unsigned /*flags*/) {
  FAKE_ACT("cudaStreamWaitEvent");
  if (event == nullptr) {
    return kInvalidResourceHandle;
  }
  std::shared_ptr<EventState> state = static_cast<Event*>(event)->state;
  long long target = 0;
  {
    std::lock_guard<std::mutex> lock(state->mutex);
    target = state->recorded;
  }
  counters().stream_waits++;
  resolve_stream(stream)->enqueue([state, target] { state->wait_for(target); });
  return kSuccess;
}

FAKE_EXPORT int cudaMemcpyAsync(void* dst, const void* src, size_t count, int kind,
                                void* stream) {
  FAKE_ACT("cudaMemcpyAsync");
  return enqueue_copy(dst, count, src, count, count, 1, kind, stream, false);
}

FAKE_EXPORT int cudaMemcpy2DAsync(void* dst, size_t dpitch, const void* src, size_t spitch,
                                  size_t width, size_t height, int kind, void* stream) {
  FAKE_ACT("cudaMemcpy2DAsync");
  return enqueue_copy(dst, dpitch, src, spitch, width, height, kind, stream, true);
}

FAKE_EXPORT int cudaHostRegister(void* pointer, size_t size, unsigned /*flags*/) {
  FAKE_ACT("cudaHostRegister");
  if (pointer == nullptr || size == 0) {
    return kInvalidValue;
  }
  {
    std::lock_guard<std::mutex> lock(pinned().mutex);
    const uintptr_t start = reinterpret_cast<uintptr_t>(pointer);
    auto next = pinned().ranges.lower_bound(start);
    const bool overlaps_next = next != pinned().ranges.end() && next->first < start + size;
    const bool overlaps_previous = next != pinned().ranges.begin() &&
                                   std::prev(next)->first + std::prev(next)->second > start;
    if (overlaps_next || overlaps_previous) {
      t_last_error = kHostMemoryAlreadyRegistered;
      return kHostMemoryAlreadyRegistered;
    }
    pinned().ranges[start] = size;
  }
  Counters& c = counters();
  c.host_allocs++;
  raise_max(c.pinned_peak, c.pinned_bytes += static_cast<long long>(size));
  return kSuccess;
}

FAKE_EXPORT int cudaHostUnregister(void* pointer) {
  FAKE_ACT("cudaHostUnregister");
  size_t size = 0;
  {
    std::lock_guard<std::mutex> lock(pinned().mutex);
    auto it = pinned().ranges.find(reinterpret_cast<uintptr_t>(pointer));
    if (it == pinned().ranges.end()) {
      t_last_error = kHostMemoryNotRegistered;
      return kHostMemoryNotRegistered;
    }
    size = it->second;
    pinned().ranges.erase(it);
  }
  counters().host_frees++;
  counters().pinned_bytes -= static_cast<long long>(size);
  return kSuccess;
}

// ---------------------------------------------------------------- test-only exports

// A "kernel" on `stream`: after delay_us, sets n bytes at dst to value.
FAKE_EXPORT int fake_cuda_fill_async(void* dst, int value, size_t n, void* stream,
                                     long long delay) {
  resolve_stream(stream)->enqueue([=] {
    sleep_us(delay);
    std::memset(dst, value, n);
  });
  return kSuccess;
}

// A "kernel" on `stream`: after delay_us, copies n bytes from src to dst
// (not counted as a memcpy).
FAKE_EXPORT int fake_cuda_write_async(void* dst, const void* src, size_t n, void* stream,
                                      long long delay) {
  resolve_stream(stream)->enqueue([=] {
    sleep_us(delay);
    std::memcpy(dst, src, n);
  });
  return kSuccess;
}

// Calls that acted on `device` since the last reset; the first one's name.
FAKE_EXPORT long long fake_cuda_device_calls(int device) {
  if (device < 0 || device >= kMaxDevices) {
    return -1;
  }
  std::lock_guard<std::mutex> lock(device_calls().mutex);
  return device_calls().count[device];
}

FAKE_EXPORT const char* fake_cuda_first_call(int device) {
  if (device < 0 || device >= kMaxDevices) {
    return "";
  }
  std::lock_guard<std::mutex> lock(device_calls().mutex);
  return device_calls().first[device].c_str();
}

// A counter by name (see Counters); -1 for an unknown name.
FAKE_EXPORT long long fake_cuda_counter(const char* name) {
  Counters& c = counters();
  const std::map<std::string, std::atomic<long long>*> table = {
      {"pinned_bytes", &c.pinned_bytes},
      {"pinned_peak", &c.pinned_peak},
      {"host_allocs", &c.host_allocs},
      {"host_frees", &c.host_frees},
      {"copies", &c.copies},
      {"copies_2d", &c.copies_2d},
      {"copies_h2d", &c.copies_h2d},
      {"copies_d2h", &c.copies_d2h},
      {"bytes_h2d", &c.bytes_h2d},
      {"bytes_d2h", &c.bytes_d2h},
      {"in_flight", &c.in_flight},
      {"max_in_flight", &c.max_in_flight},
      {"unpinned_copies", &c.unpinned_copies},
      {"streams_created", &c.streams_created},
      {"events_created", &c.events_created},
      {"events_live", &c.events_live},
      {"stream_waits", &c.stream_waits},
      {"set_device_calls", &c.set_device_calls},
  };
  auto it = table.find(name);
  return it == table.end() ? -1 : it->second->load();
}

// Zeroes the event counters (not the live ones: pinned_bytes, in_flight,
// events_live), resets the peak to the live pinned bytes, disarms every
// injected failure and restores the default delay.
FAKE_EXPORT void fake_cuda_reset() {
  Counters& c = counters();
  for (std::atomic<long long>* counter :
       {&c.host_allocs, &c.host_frees, &c.copies, &c.copies_2d, &c.copies_h2d, &c.copies_d2h,
        &c.bytes_h2d, &c.bytes_d2h, &c.max_in_flight, &c.unpinned_copies, &c.streams_created,
        &c.events_created, &c.stream_waits, &c.set_device_calls}) {
    counter->store(0);
  }
  c.pinned_peak.store(c.pinned_bytes.load());
  {
    std::lock_guard<std::mutex> lock(device_calls().mutex);
    for (int d = 0; d < kMaxDevices; ++d) {
      device_calls().count[d] = 0;
      device_calls().first[d].clear();
    }
  }
  Failures& f = failures();
  std::lock_guard<std::mutex> lock(f.mutex);
  f.env_read = true;  // a reset also drops what the environment armed
  f.armed.clear();
  g_delay_us.store(-1);
}

// The nth call (from now, 1-based) of `function` returns `code`.
FAKE_EXPORT void fake_cuda_fail(const char* function, long long nth, int code) {
  Failures& f = failures();
  std::lock_guard<std::mutex> lock(f.mutex);
  arm_from_env_locked(f);
  f.armed.push_back(Failure{function, nth, code});
}

// Delay of every later copy in microseconds (-1: back to the environment's).
FAKE_EXPORT void fake_cuda_set_delay_us(long long delay) { g_delay_us.store(delay); }

// Waits until every queue has drained: the legacy stream's and, through
// their own synchronisation, the engines' (tests call it before reading
// counters that copies update when they run).
FAKE_EXPORT void fake_cuda_wait_idle() {
  while (counters().in_flight.load() > 0) {
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
}
