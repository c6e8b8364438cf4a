// dcp_native._C: the Python face of the native engine, and the only file that
// includes pybind11. It turns Python buffers into (pointer, length) views held
// for the whole call, releases the GIL for all planning, I/O and checksums,
// and maps the engine's C++ exceptions to OSError subclasses,
// TruncatedFileError and ValueError.
#include <Python.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "crc32c.hpp"
#include "fault_injection.hpp"
#include "file_io.hpp"
#include "io_error.hpp"
#include "read_engine.hpp"
#include "write_engine.hpp"

namespace py = pybind11;

namespace dcp_native {

namespace {

// A Py_buffer held for the lifetime of the object: the exporter (bytes,
// bytearray, array, memoryview, numpy) keeps the memory alive and, for
// resizable objects, refuses to resize it while the view exists.
class BufferView {
 public:
  BufferView(py::handle object, int flags, const char* what) {
    if (PyObject_GetBuffer(object.ptr(), &view_, flags) != 0) {
      throw py::error_already_set();
    }
    held_ = true;
    if (!PyBuffer_IsContiguous(&view_, 'C')) {
      throw PlanError(std::string(what) + " must be a C-contiguous buffer");
    }
  }
  BufferView(const BufferView&) = delete;
  BufferView& operator=(const BufferView&) = delete;
  BufferView(BufferView&& other) noexcept : view_(other.view_), held_(other.held_) {
    other.held_ = false;
  }
  BufferView& operator=(BufferView&&) = delete;
  ~BufferView() {
    if (held_) {
      PyBuffer_Release(&view_);
    }
  }

  const char* data() const noexcept { return static_cast<const char*>(view_.buf); }
  size_t size() const noexcept { return static_cast<size_t>(view_.len); }
  const Py_buffer& view() const noexcept { return view_; }

 private:
  Py_buffer view_{};
  bool held_ = false;
};

BufferView bytes_view(py::handle object, const char* what) {
  return BufferView(object, PyBUF_STRIDES, what);
}

// array('q'), numpy int64 or a memoryview of either; anything else is a plan
// built wrongly, so a ValueError rather than a silent reinterpretation.
BufferView int64_view(py::handle object, const char* what) {
  BufferView buffer(object, PyBUF_STRIDES | PyBUF_FORMAT, what);
  const Py_buffer& view = buffer.view();
  const char* format = view.format != nullptr ? view.format : "B";
  if (*format == '@' || *format == '=' || *format == '<') {
    ++format;
  }
  const bool int64 =
      view.itemsize == 8 && (std::strcmp(format, "q") == 0 || std::strcmp(format, "l") == 0);
  if (!int64 || view.ndim != 1) {
    throw PlanError(std::string(what) +
                    " must be a 1-D int64 buffer such as array('q'), got format '" +
                    (view.format != nullptr ? view.format : "B") + "' with itemsize " +
                    std::to_string(view.itemsize));
  }
  return buffer;
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
  py::bytes bytes = py::reinterpret_steal<py::bytes>(encoded);
  return std::string(bytes);
}

py::object decode_path(const std::string& path) {
  PyObject* decoded =
      PyUnicode_DecodeFSDefaultAndSize(path.data(), static_cast<Py_ssize_t>(path.size()));
  if (decoded == nullptr) {
    throw py::error_already_set();
  }
  return py::reinterpret_steal<py::object>(decoded);
}

void check_lengths(size_t expected, size_t actual, const char* what) {
  if (expected != actual) {
    throw PlanError(std::string(what) + " has " + std::to_string(actual) + " entries for " +
                    std::to_string(expected) + " paths");
  }
}

std::vector<FaultSpec> fault_specs(py::handle faults) {
  BufferView view = int64_view(faults, "faults");
  return parse_fault_specs(int64_data(view), view.size() / 8);
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

py::tuple py_write_files(const py::sequence& paths, const py::sequence& blobs,
                         const py::sequence& segments, const py::sequence& crc_blocks,
                         int64_t threads, bool sync, int64_t chunk_bytes, py::handle faults) {
  const size_t count = py::len(paths);
  check_lengths(count, py::len(blobs), "blobs");
  check_lengths(count, py::len(segments), "segments");
  check_lengths(count, py::len(crc_blocks), "crc_blocks");
  std::vector<BufferView> held;
  held.reserve(2 * count);
  std::vector<WriteFileSpec> files;
  files.reserve(count);
  for (size_t i = 0; i < count; ++i) {
    WriteFileSpec spec{encode_path(paths[i]), nullptr, 0, nullptr, 0};
    held.push_back(bytes_view(blobs[i], "blob"));
    spec.blob = held.back().data();
    spec.blob_length = held.back().size();
    held.push_back(int64_view(segments[i], "segments"));
    spec.segments = int64_data(held.back());
    spec.segments_length = held.back().size() / 8;
    spec.crc_block = crc_blocks[i].cast<int64_t>();
    files.push_back(std::move(spec));
  }
  WriteOptions options;
  options.threads = threads;
  options.sync = sync;
  options.chunk_bytes = chunk_bytes;
  options.short_io_cap = short_io_cap_from_env();
  options.faults = fault_specs(faults);
  options.crc32c = crc32c_from_env();
  WriteResult result;
  {
    py::gil_scoped_release release;
    result = write_files(files, options);
  }
  py::list crcs;
  for (size_t i = 0; i < count; ++i) {
    crcs.append(files[i].crc_block > 0 ? uint32_array(result.block_crcs[i]) : py::none());
  }
  return py::make_tuple(py::cast(result.bytes_per_file), crcs);
}

py::tuple py_read_files(const py::sequence& paths, const py::sequence& min_sizes,
                        const py::sequence& copies, const py::sequence& checks, int64_t threads,
                        int64_t max_gap, int64_t chunk_bytes, py::handle faults) {
  const size_t count = py::len(paths);
  check_lengths(count, py::len(min_sizes), "min_sizes");
  check_lengths(count, py::len(copies), "copies");
  check_lengths(count, py::len(checks), "checks");
  std::vector<BufferView> held;
  held.reserve(2 * count);
  std::vector<ReadFileSpec> files;
  files.reserve(count);
  for (size_t i = 0; i < count; ++i) {
    ReadFileSpec spec{encode_path(paths[i]), min_sizes[i].cast<int64_t>(), nullptr, 0};
    held.push_back(int64_view(copies[i], "copies"));
    spec.copies = int64_data(held.back());
    spec.copies_length = held.back().size() / 8;
    if (!checks[i].is_none()) {
      held.push_back(int64_view(checks[i], "checks"));
      spec.checks = int64_data(held.back());
      spec.checks_length = held.back().size() / 8;
    }
    files.push_back(std::move(spec));
  }
  ReadOptions options;
  options.threads = threads;
  options.max_gap = max_gap;
  options.chunk_bytes = chunk_bytes;
  options.short_io_cap = short_io_cap_from_env();
  options.faults = fault_specs(faults);
  options.crc32c = crc32c_from_env();
  ReadStats stats;
  {
    py::gil_scoped_release release;
    stats = read_files(files, options);
  }
  return py::make_tuple(stats.bytes_read, stats.calls, py::cast(stats.failed_checks));
}

// Below this size a checksum takes less time than handing the GIL to another
// thread and back, so the GIL is kept.
constexpr size_t kCrcGilFreeBytes = 64 << 10;

uint32_t py_crc32c(py::handle data, py::handle crc) {
  const uint32_t initial = crc_value(crc);
  const Crc32cFunction function = crc32c_from_env();
  BufferView view = bytes_view(data, "data");
  if (view.size() < kCrcGilFreeBytes) {
    return function(view.data(), view.size(), initial);
  }
  py::gil_scoped_release release;
  return function(view.data(), view.size(), initial);
}

std::string py_crc32c_impl() {
  const char* name = nullptr;
  crc32c_from_env(&name);
  return name;
}

// Raises `exception` (an instance) as the current Python error.
void set_error(const py::object& exception) {
  PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exception.ptr())), exception.ptr());
}

void translate(std::exception_ptr error) {
  try {
    std::rethrow_exception(error);
  } catch (const IoError& e) {
    try {
      // OSError(errno, message, filename) picks the subclass (FileNotFoundError, ...) itself.
      py::object os_error = py::module_::import("builtins").attr("OSError");
      set_error(os_error(e.error_number(), e.detail(), decode_path(e.path())));
    } catch (py::error_already_set& nested) {
      nested.restore();
    }
  } catch (const TruncatedError& e) {
    try {
      // Imported here, not at module load: dcp_native._errors imports
      // nothing native, but _C must stay importable on its own.
      py::object truncated = py::module_::import("dcp_native._errors").attr("TruncatedFileError");
      set_error(truncated(decode_path(e.path()), e.expected(), e.actual()));
    } catch (py::error_already_set& nested) {
      nested.restore();
    }
  }
}

}  // namespace

}  // namespace dcp_native

PYBIND11_MODULE(_C, m) {
  using namespace dcp_native;
  m.doc() = "dcp_native's native I/O engine; use it through dcp_native.engine (see its docs).";
  py::register_exception_translator(&translate);

  m.def("write_files", &py_write_files, py::arg("paths"), py::arg("blobs"), py::arg("segments"),
        py::arg("crc_blocks"), py::arg("threads"), py::arg("sync"), py::arg("chunk_bytes"),
        py::arg("faults"),
        "Create each file and write its segments (flat int64 4-tuples (file_offset, kind, source,\n"
        "length)). Returns (bytes written per file, per file array('I') of block CRC32Cs or\n"
        "None).");
  m.def("read_files", &py_read_files, py::arg("paths"), py::arg("min_sizes"), py::arg("copies"),
        py::arg("checks"), py::arg("threads"), py::arg("max_gap"), py::arg("chunk_bytes"),
        py::arg("faults"),
        "Execute a read plan (flat int64 box records per file), then its checks. Returns\n"
        "(bytes_read, calls, failed_checks).");
  m.def("should_merge", &should_merge, py::arg("prev_len"), py::arg("gap"), py::arg("next_len"),
        py::arg("max_gap"), "The coalescing rule as the native engine applies it.");
  m.def("crc32c", &py_crc32c, py::arg("data"), py::arg("crc") = 0,
        "CRC32C of a C-contiguous buffer, continuing crc (the CRC32C of the bytes before it).\n"
        "DCP_NATIVE_CRC32C=portable forces the table-driven implementation.");
  m.def("crc32c_impl", &py_crc32c_impl,
        "The CRC32C implementation in use: 'sse4.2', 'armv8' or 'portable'.");
  m.attr("MAX_IOVECS") = kMaxIovecs;
  m.attr("TINY_SPAN") = kTinySpan;
  m.attr("MAX_NDIM") = kMaxNdim;
  m.attr("SHORT_IO_ENV") = kShortIoEnv;
  m.attr("CRC32C_ENV") = kCrc32cEnv;
}
