// dcp_native._C: the Python face of the native engine, and the only file that
// includes pybind11. It turns Python buffers into (pointer, length) views held
// for the whole call, releases the GIL for all planning, I/O and checksums,
// and maps the engine's C++ exceptions to OSError subclasses,
// TruncatedFileError, CorruptCheckpointError, CudaError and ValueError.
#include <Python.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "crc32c.hpp"
#include "cuda_runtime.hpp"
#include "direct_io.hpp"
#include "fault_injection.hpp"
#include "file_io.hpp"
#include "io_error.hpp"
#include "metadata_pickle.hpp"
#include "pinned_pool.hpp"
#include "read_engine.hpp"
#include "write_engine.hpp"

namespace py = pybind11;

namespace dcp_native {

namespace {

// A Py_buffer held for the lifetime of the object: the exporter (bytes,
// bytearray, array, memoryview, numpy) keeps the memory alive and, for
// resizable objects, refuses to resize it while the view exists. Released
// also when the constructor throws (PyBuffer_Release ignores a view that was
// never filled).
class BufferView {
 public:
  BufferView(py::handle object, int flags, const char* what) : view_(new Py_buffer()) {
    if (PyObject_GetBuffer(object.ptr(), view_.get(), flags) != 0) {
      throw py::error_already_set();
    }
    if (!PyBuffer_IsContiguous(view_.get(), 'C')) {
      throw PlanError(std::string(what) + " must be a C-contiguous buffer");
    }
  }

  const char* data() const noexcept { return static_cast<const char*>(view_->buf); }
  size_t size() const noexcept { return static_cast<size_t>(view_->len); }
  const Py_buffer& view() const noexcept { return *view_; }

 private:
  struct Release {
    void operator()(Py_buffer* view) const noexcept {
      PyBuffer_Release(view);
      delete view;
    }
  };
  std::unique_ptr<Py_buffer, Release> view_;
};

// A 1-D buffer of `itemsize`-byte integers whose format is one of `formats`
// (array('q') or array('I'), numpy, a memoryview of either); anything else
// is a plan built wrongly, so a ValueError rather than a reinterpretation.
BufferView int_view(py::handle object, ssize_t itemsize, const char* formats, const char* what,
                    const char* example) {
  BufferView buffer(object, PyBUF_STRIDES | PyBUF_FORMAT, what);
  const Py_buffer& view = buffer.view();
  const char* format = view.format != nullptr ? view.format : "B";
  if (*format == '@' || *format == '=' || *format == '<') {
    ++format;
  }
  const bool ok = view.itemsize == itemsize && format[0] != '\0' && format[1] == '\0' &&
                  std::strchr(formats, format[0]) != nullptr && view.ndim == 1;
  if (!ok) {
    throw PlanError(std::string(what) + " must be a 1-D " + std::to_string(8 * itemsize) +
                    "-bit buffer such as " + example + ", got format '" +
                    (view.format != nullptr ? view.format : "B") + "' with itemsize " +
                    std::to_string(view.itemsize));
  }
  return buffer;
}

BufferView int64_view(py::handle object, const char* what) {
  return int_view(object, 8, "ql", what, "array('q')");
}

const int64_t* int64_data(const BufferView& buffer) {
  return reinterpret_cast<const int64_t*>(buffer.data());
}

// str, bytes or os.PathLike to the bytes the OS sees (os.fsencode).
std::string encode_path(py::handle path) {
  PyObject* encoded = nullptr;
  if (PyUnicode_FSConverter(path.ptr(), &encoded) == 0) {
    throw py::error_already_set();
  }
  return std::string(py::reinterpret_steal<py::bytes>(encoded));
}

py::object decode_path(const std::string& path) {
  PyObject* decoded =
      PyUnicode_DecodeFSDefaultAndSize(path.data(), static_cast<Py_ssize_t>(path.size()));
  if (decoded == nullptr) {
    throw py::error_already_set();
  }
  return py::reinterpret_steal<py::object>(decoded);
}

// f() with the GIL released (it must not touch Python objects).
template <class F>
auto without_gil(F&& f) {
  py::gil_scoped_release release;
  return f();
}

// A CRC argument: an int in [0, 2**32).
uint32_t crc_value(py::handle object) {
  int overflow = 0;
  const long long value = PyLong_AsLongLongAndOverflow(object.ptr(), &overflow);
  if (value == -1 && PyErr_Occurred() != nullptr) {
    throw py::error_already_set();
  }
  if (overflow != 0 || value < 0 || value > 0xFFFFFFFFLL) {
    throw PlanError("crc must be in [0, 2**32), got " + std::string(py::str(py::repr(object))));
  }
  return static_cast<uint32_t>(value);
}

// array('I') of the values; 'I' is 4 bytes on every platform torch runs on.
py::object uint32_array(const std::vector<uint32_t>& values) {
  static_assert(sizeof(unsigned int) == sizeof(uint32_t), "array('I') must hold uint32");
  py::object array = py::module_::import("array").attr("array")("I");
  array.attr("frombytes")(py::memoryview::from_memory(
      values.data(), static_cast<py::ssize_t>(values.size() * sizeof(uint32_t))));
  return array;
}

// The pool argument of a call: None or a PinnedPool.
std::shared_ptr<PinnedPool> pool_argument(py::handle pool) {
  if (pool.is_none()) {
    return nullptr;
  }
  if (!py::isinstance<PinnedPool>(pool)) {
    throw py::type_error("pool must be a pinned pool of the native engine "
                         "(NativeEngine.pinned_pool()), got " +
                         std::string(py::str(py::type::of(pool).attr("__name__"))));
  }
  return pool.cast<std::shared_ptr<PinnedPool>>();
}

int device_argument(py::handle value) {
  const int64_t device = value.cast<int64_t>();
  if (device < -1 || device > 1 << 20) {
    throw PlanError("device must be -1 or a CUDA device index, got " + std::to_string(device));
  }
  return static_cast<int>(device);
}

// The settings dcp_native.config.Config.native() passes to every call:
// (fault triples, short-I/O cap, portable CRC32C, O_DIRECT refusal, CUDA
// runtime library). The C++ side reads no environment variable.
void apply_config(py::handle config, int64_t threads, int64_t chunk_bytes, py::handle pool,
                  bool direct_io, EngineOptions& options) {
  options.threads = threads;
  options.chunk_bytes = chunk_bytes;
  options.pool = pool_argument(pool);
  options.direct_io = direct_io;
  const py::tuple values = config.cast<py::tuple>();
  if (values.size() != 4) {
    throw PlanError("config must be Config.native()'s 4-tuple");
  }
  BufferView view = int64_view(values[0], "faults");
  options.faults = parse_fault_specs(int64_data(view), view.size() / 8);
  options.short_io_cap = values[1].cast<int64_t>();
  if (options.short_io_cap < 0) {
    throw PlanError("the short-I/O cap must be non-negative");
  }
  options.crc32c = crc32c_select(values[2].cast<bool>());
  const int64_t refusal = values[3].cast<int64_t>();
  if (refusal < 0 || refusal > static_cast<int64_t>(DirectRefusal::kTransfer)) {
    throw PlanError("unknown O_DIRECT refusal " + std::to_string(refusal));
  }
  options.direct_refusal = static_cast<DirectRefusal>(refusal);
}

// The plans arrive as the dataclasses of dcp_native.engine (WriteFile,
// ReadFile), read attribute by attribute; their buffers are held until the
// call returns.
py::tuple py_write_files(const py::sequence& plan, int64_t threads, bool sync, int64_t chunk_bytes,
                         py::handle config, py::handle pool, bool direct_io) {
  const size_t count = py::len(plan);
  std::vector<BufferView> held;
  held.reserve(2 * count);
  std::vector<WriteFileSpec> files;
  files.reserve(count);
  for (const py::handle file : plan) {
    WriteFileSpec spec{encode_path(file.attr("path")), nullptr, 0, nullptr, 0};
    held.push_back(BufferView(file.attr("blob"), PyBUF_STRIDES, "blob"));
    spec.blob = held.back().data();
    spec.blob_length = held.back().size();
    held.push_back(int64_view(file.attr("segments"), "segments"));
    spec.segments = int64_data(held.back());
    spec.segments_length = held.back().size() / 8;
    spec.crc_block = file.attr("crc_block").cast<int64_t>();
    spec.device = device_argument(file.attr("device"));
    spec.stream = file.attr("stream").cast<int64_t>();
    files.push_back(std::move(spec));
  }
  WriteOptions options;
  options.sync = sync;
  apply_config(config, threads, chunk_bytes, pool, direct_io, options);
  const WriteResult result = without_gil([&] { return write_files(files, options); });
  py::list crcs;
  for (size_t i = 0; i < count; ++i) {
    crcs.append(files[i].crc_block > 0 ? uint32_array(result.block_crcs[i]) : py::none());
  }
  return py::make_tuple(py::cast(result.bytes_per_file), crcs);
}

py::tuple py_read_files(const py::sequence& plan, int64_t threads, int64_t max_gap,
                        int64_t chunk_bytes, py::handle config, py::handle pool, bool direct_io) {
  const size_t count = py::len(plan);
  std::vector<BufferView> held;
  held.reserve(2 * count);
  std::vector<ReadFileSpec> files;
  files.reserve(count);
  for (const py::handle file : plan) {
    ReadFileSpec spec;
    spec.path = encode_path(file.attr("path"));
    spec.min_size = file.attr("min_size").cast<int64_t>();
    held.push_back(int64_view(file.attr("copies"), "copies"));
    spec.copies = int64_data(held.back());
    spec.copies_length = held.back().size() / 8;
    const py::object table = file.attr("table");
    if (!table.is_none()) {
      spec.grid = BlockGrid{table.attr("block").cast<int64_t>(), table.attr("size").cast<int64_t>()};
      held.push_back(int_view(table.attr("crcs"), 4, "IL", "crcs", "array('I')"));
      spec.crcs = reinterpret_cast<const uint32_t*>(held.back().data());
      spec.crc_count = held.back().size() / 4;
      spec.has_table = true;
    }
    spec.device = device_argument(file.attr("device"));
    spec.stream = file.attr("stream").cast<int64_t>();
    files.push_back(std::move(spec));
  }
  ReadOptions options;
  options.max_gap = max_gap;
  apply_config(config, threads, chunk_bytes, pool, direct_io, options);
  const ReadStats stats = without_gil([&] { return read_files(files, options); });
  return py::make_tuple(stats.bytes_read, stats.calls, py::cast(stats.failed_blocks));
}

// Below this size a checksum takes less time than handing the GIL to another
// thread and back, so the GIL is kept.
constexpr size_t kCrcGilFreeBytes = 64 << 10;

uint32_t py_crc32c(py::handle data, py::handle crc, bool portable) {
  const uint32_t initial = crc_value(crc);
  const Crc32cFunction function = crc32c_select(portable);
  BufferView view(data, PyBUF_STRIDES, "data");
  if (view.size() < kCrcGilFreeBytes) {
    return function(view.data(), view.size(), initial);
  }
  py::gil_scoped_release release;
  return function(view.data(), view.size(), initial);
}

// Test hook: crc32c_variant(name) on `data`; None where the CPU lacks it.
py::object py_crc32c_variant(const std::string& name, py::handle data, py::handle crc) {
  const Crc32cFunction function = crc32c_variant(name.c_str());
  if (function == nullptr) {
    return py::none();
  }
  BufferView view(data, PyBUF_STRIDES, "data");
  return py::int_(function(view.data(), view.size(), crc_value(crc)));
}

std::string py_crc32c_impl(bool portable) {
  const char* name = nullptr;
  crc32c_select(portable, &name);
  return name;
}

py::tuple py_cuda_status(const std::string& cudart) {
  const CudaStatusInfo status = without_gil([&] { return cuda_status(cudart); });
  return py::make_tuple(status.usable, status.reason, status.library);
}

// Pins (or unpins) host memory torch allocated, for the async staging
// buffer: through the runtime the engine uses, from an engine thread on
// `device` (the caller's thread may sit on a device it has no context on).
void py_host_register(int64_t address, int64_t bytes, int64_t device, const std::string& cudart,
                      bool pin) {
  if (address == 0 || address % kPageBytes != 0 || bytes < 0 || device < 0 || device > 1 << 20) {
    throw PlanError("host_register: page-aligned address, bytes >= 0 and a device >= 0 needed");
  }
  py::gil_scoped_release release;
  const std::shared_ptr<CudaRuntime> runtime = require_cuda_runtime(cudart);
  void* memory = reinterpret_cast<void*>(static_cast<uintptr_t>(address));
  if (pin) {
    register_host(*runtime, static_cast<int>(device), memory, static_cast<size_t>(bytes));
  } else {
    unregister_host(*runtime, static_cast<int>(device), memory);
  }
}

std::shared_ptr<PinnedPool> make_pool(int64_t device, int64_t capacity, int64_t chunk_bytes,
                                      const std::string& cudart) {
  py::gil_scoped_release release;
  const CudaStatusInfo status = cuda_status(cudart);
  if (!status.usable) {
    throw CudaUnavailableError("CUDA is not usable: " + status.reason);
  }
  if (device < 0 || device > 1 << 20) {
    throw PlanError("pinned pool: device must be >= 0, got " + std::to_string(device));
  }
  // Unpinning memory can wait for the device: when the last reference goes
  // away in Python (a pool dropped without close()), the deleter lets other
  // Python threads run meanwhile.
  return std::shared_ptr<PinnedPool>(
      new PinnedPool(require_cuda_runtime(cudart), static_cast<int>(device), capacity,
                     chunk_bytes),
      [](PinnedPool* pool) {
        std::unique_ptr<PinnedPool> owned(pool);
        if (Py_IsInitialized() != 0 && PyGILState_Check() != 0) {
          py::gil_scoped_release unlocked;
          owned.reset();
        }
      });
}

uint32_t py_crc32c_combine(py::handle crc_a, py::handle crc_b, int64_t length_b) {
  if (length_b < 0) {
    throw PlanError("length_b must be non-negative, got " + std::to_string(length_b));
  }
  return crc32c_combine(crc_value(crc_a), crc_value(crc_b), static_cast<uint64_t>(length_b));
}

// Raises the exception make() builds as the current Python error (or the
// error building it raised). dcp_native._errors is imported here, not at
// module load: it imports nothing native, but _C must stay importable on its own.
template <class Make>
void set_error(Make&& make) {
  try {
    const py::object exception = make();
    PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exception.ptr())), exception.ptr());
  } catch (py::error_already_set& nested) {
    nested.restore();
  }
}

py::object dcp_error(const char* name) {
  return py::module_::import("dcp_native._errors").attr(name);
}

void translate(std::exception_ptr error) {
  try {
    std::rethrow_exception(error);
  } catch (const IoError& e) {
    // OSError(errno, message, filename) picks the subclass (FileNotFoundError, ...) itself.
    set_error([&] {
      return py::module_::import("builtins").attr("OSError")(e.error_number(), e.detail(),
                                                             decode_path(e.path()));
    });
  } catch (const CudaCallError& e) {
    set_error([&] {
      return dcp_error("CudaError")(e.what(), py::arg("operation") = e.operation(),
                                    py::arg("code") = e.code());
    });
  } catch (const CudaUnavailableError& e) {
    set_error([&] {
      return dcp_error("CudaError")(e.what(), py::arg("operation") = "find the CUDA runtime",
                                    py::arg("code") = py::none());
    });
  } catch (const TruncatedError& e) {
    set_error([&] {
      return dcp_error("TruncatedFileError")(decode_path(e.path()), e.expected(), e.actual());
    });
  } catch (const NotRegularFileError& e) {
    // The path decoded as Python decodes it, then _fileio.not_regular's words.
    set_error([&] {
      py::object path = decode_path(e.path());
      return dcp_error("CorruptCheckpointError")(path + py::str(e.detail()),
                                                 py::arg("filename") = path);
    });
  }
}

}  // namespace

}  // namespace dcp_native

PYBIND11_MODULE(_C, m) {
  using namespace dcp_native;
  m.doc() = "dcp_native's native I/O engine; use it through dcp_native.engine (see its docs).";
  py::register_exception_translator(&translate);

  py::class_<PinnedPool, std::shared_ptr<PinnedPool>>(
      m, "PinnedPool",
      "Pinned host buffers for device staging, reused across calls (see dcp_native.engine).\n"
      "PinnedPool(device, capacity, chunk_bytes, cudart): buffers of min(chunk_bytes,\n"
      "capacity // 2) rounded down to 4096 bytes, allocated on first use, never more than\n"
      "capacity bytes; cudart names the runtime library ('': the one torch loaded).")
      .def(py::init(&make_pool), py::arg("device"), py::arg("capacity"), py::arg("chunk_bytes"),
           py::arg("cudart") = "")
      .def_property_readonly("device", &PinnedPool::device)
      .def_property_readonly("capacity", &PinnedPool::capacity)
      .def_property_readonly("chunk_bytes", &PinnedPool::chunk_bytes)
      .def_property_readonly("bytes_held", &PinnedPool::bytes_held,
                             "Pinned bytes allocated now (0 after close).")
      .def_property_readonly("closed", &PinnedPool::closed)
      .def("close", &PinnedPool::close, py::call_guard<py::gil_scoped_release>(),
           "Free every buffer (idempotent); ValueError while a call uses the pool.")
      .def("__enter__", [](py::object self) { return self; })
      .def("__exit__", [](PinnedPool& self, py::args) {
        py::gil_scoped_release release;
        self.close();
      })
      .def("__repr__", [](const PinnedPool& self) {
        return "<dcp_native._C.PinnedPool device=" + std::to_string(self.device()) +
               " capacity=" + std::to_string(self.capacity()) +
               " chunk_bytes=" + std::to_string(self.chunk_bytes()) +
               " bytes_held=" + std::to_string(self.bytes_held()) +
               (self.closed() ? " closed>" : ">");
      });

  m.def("write_files", &py_write_files, py::arg("files"), py::arg("threads"), py::arg("sync"),
        py::arg("chunk_bytes"), py::arg("config"), py::arg("pool"), py::arg("direct_io"),
        "Create each file (dcp_native.engine.WriteFile) and write its segments; device segments\n"
        "through the pool (required for them). Returns (bytes written per file, per file\n"
        "array('I') of block CRC32Cs or None).");
  m.def("read_files", &py_read_files, py::arg("files"), py::arg("threads"), py::arg("max_gap"),
        py::arg("chunk_bytes"), py::arg("config"), py::arg("pool"), py::arg("direct_io"),
        "Execute a read plan (dcp_native.engine.ReadFile per file, checked against its table\n"
        "when it has one). Returns (bytes_read, calls, failed_blocks).");
  m.def("cuda_status", &py_cuda_status, py::arg("cudart") = "",
        "(usable, reason, library) of the CUDA runtime in the library cudart names ('': the\n"
        "one torch loaded).");
  m.def("host_register", &py_host_register, py::arg("address"), py::arg("bytes"),
        py::arg("device"), py::arg("cudart"), py::arg("pin") = true,
        "Pin (pin=False: unpin) page-aligned host memory for every device, from a thread on\n"
        "`device`; CudaError on failure.");
  m.attr("CUDA_SYMBOLS") = py::tuple(py::cast(cuda::symbol_names()));
  m.def("crc32c_combine", &py_crc32c_combine, py::arg("crc_a"), py::arg("crc_b"),
        py::arg("length_b"), "The CRC32C of a + b from crc32c(a), crc32c(b) and len(b).");
  m.def("_direct_io_bytes", &direct_io_bytes,
        "Bytes this process moved with O_DIRECT so far (tests).");
  m.def("should_merge", &should_merge, py::arg("prev_len"), py::arg("gap"), py::arg("next_len"),
        py::arg("max_gap"), "The coalescing rule as the native engine applies it.");
  m.def("crc32c", &py_crc32c, py::arg("data"), py::arg("crc") = 0, py::arg("portable") = false,
        "CRC32C of a C-contiguous buffer, continuing crc (the CRC32C of the bytes before it);\n"
        "portable: the table-driven implementation instead of the fastest.");
  m.def("_crc32c_variant", &py_crc32c_variant, py::arg("name"), py::arg("data"), py::arg("crc") = 0,
        "crc32c by one hardware implementation ('instruction', 'fold128', 'fold512'); None\n"
        "where the CPU lacks it (tests).");
  m.def("crc32c_impl", &py_crc32c_impl, py::arg("portable") = false,
        "The CRC32C implementation crc32c uses: 'sse4.2', 'armv8' or 'portable'.");
  m.def(
      "pickle_tree",
      [](py::handle obj, py::dict globals, py::dict classes) {
        PyObject* out = pickle_tree(obj.ptr(), globals.ptr(), classes.ptr());
        if (out == nullptr) {
          throw py::error_already_set();
        }
        return py::reinterpret_steal<py::object>(out);
      },
      py::arg("obj"), py::arg("globals"), py::arg("classes"),
      "The protocol-4 pickle of obj, or None where it holds something outside the tables\n"
      "(see dcp_native._metadata_pickle, which builds them).");
  m.attr("MAX_IOVECS") = kMaxIovecs;
  m.attr("TINY_SPAN") = kTinySpan;
  m.attr("MAX_NDIM") = kMaxNdim;
  m.attr("PAGE_BYTES") = kPageBytes;
}
